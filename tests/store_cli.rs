//! `chitin store migrate | check | copy` through the real binary: a used SQLite home (agent
//! turns, an approval) copied into PostgreSQL (a fresh database on 127.0.0.1), the counts
//! agreeing, the copy readable by the ported modules; and `chitin gateway` refusing
//! PostgreSQL until every module is ported.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use age::secrecy::SecretString;
use chitin::approvals::{Approvals, DEFAULT_TTL_MS};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;
use chitin_store::Db;
use chitin_store::testing::TestPg;
use serde_json::{Value, json};

const PASS: &str = "store-cli-pass";

struct Env {
    _t: tempfile::TempDir,
    home: PathBuf,
    _rt: tokio::runtime::Runtime,
    server: FakeServer,
}

fn config(url: &str, store: &str) -> String {
    format!(
        "{}\n[gateway]\nworkspace = \"../ws\"\n\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmax_attempts = 1\nconnect_timeout_ms = 500\n{store}",
        support::TEST_SECRETS_CONFIG
    )
}

fn write_config(e: &Env, store: &str) {
    let path = e.home.join("chitin.toml");
    let _ = std::fs::remove_file(&path);
    support::write_private(&path, config(&e.server.base_url(), store).as_bytes());
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A home used for a while: two sessions with turns (runs, messages, usage) and an approval.
fn used_home() -> Env {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(FakeOpenAi::start(vec![
            Step::text("first answer"),
            Step::text("second answer"),
            Step::text("third answer"),
        ]))
        .unwrap();
    let home = support::private_home(t.path(), "home");
    let e = Env {
        _t: t,
        home,
        _rt: rt,
        server,
    };
    write_config(&e, "");
    ok(&chitin(&e.home, &["init"]));
    ok(&chitin(
        &e.home,
        &["agent", "-m", "hello", "--session", "cli:owner"],
    ));
    ok(&chitin(
        &e.home,
        &["agent", "-m", "again", "--session", "cli:owner"],
    ));
    ok(&chitin(
        &e.home,
        &["agent", "-m", "other", "--session", "cli:second"],
    ));
    approvals_on(&e.home, Store::open(&e.home.join("state.db")).unwrap())
        .request(
            "owner",
            "cli:owner",
            "exec",
            &json!({"argv": ["rm", "x"]}),
            [9; 32],
        )
        .unwrap();
    e
}

fn approvals_on(home: &Path, store: Store) -> Approvals {
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 16,
        ..SecretsConfig::default()
    };
    let mut secrets = SecretStore::open_with(
        home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    let signer = chitin::secrets::audit_key::signer(&mut secrets, home).unwrap();
    let audit = chitin_audit::AuditLog::open(
        home,
        chitin_audit::AuditOptions {
            signer: Some(Arc::new(signer)),
            ..Default::default()
        },
    )
    .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.to_path_buf()),
    })
    .unwrap();
    Approvals::new(
        Arc::new(store),
        Gate::new(Arc::new(engine), Arc::new(audit)),
        Arc::new(chitin::clock::SystemClock),
        DEFAULT_TTL_MS,
    )
}

fn postgres_section(pg: &TestPg) -> String {
    format!(
        "\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n",
        pg.url()
    )
}

#[test]
fn store_copy_moves_a_used_sqlite_home_and_store_check_agrees_on_the_counts() {
    let e = used_home();
    let pg = TestPg::new().unwrap();
    let sqlite_counts = Db::sqlite_unmigrated(&e.home.join("state.db"))
        .unwrap()
        .row_counts()
        .unwrap();
    let count = |t: &str| {
        sqlite_counts
            .iter()
            .find(|(n, _)| n == t)
            .map(|(_, c)| *c)
            .unwrap()
    };
    assert_eq!(count("sessions"), 2);
    assert_eq!(count("runs"), 3);
    assert_eq!(count("approvals"), 1);
    assert!(count("messages") >= 6 && count("usage") >= 3);

    write_config(&e, &postgres_section(&pg));
    // Before the copy the target is empty but migrated by `store migrate`.
    let out = ok(&chitin(&e.home, &["store", "migrate"]));
    assert!(
        out.contains(&format!(
            "{} (postgres): schema 0 -> {}",
            pg_location(&pg),
            latest()
        )),
        "{out}"
    );
    let out = ok(&chitin(
        &e.home,
        &["store", "copy", "--from", "sqlite", "--to", "postgres"],
    ));
    assert!(out.contains("copied"), "{out}");
    assert!(out.contains("the audit log is not copied"), "{out}");

    let check: Value =
        serde_json::from_str(&ok(&chitin(&e.home, &["store", "check", "--json"]))).unwrap();
    assert_eq!(check["backend"], "postgres");
    assert_eq!(check["connected"], true);
    assert_eq!(check["version"], json!(latest()));
    assert_eq!(check["pending"], 0);
    for (table, n) in &sqlite_counts {
        assert_eq!(check["tables"][table], json!(n), "{table}: {check}");
    }
    // The copy is what the ported modules read.
    let store = Store::from_db(pg.db().unwrap());
    let pending = approvals_on(&e.home, store.clone()).list(false).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].summary, "run `rm x`");
    let mut secrets = SecretStore::open_with(
        &e.home,
        &SecretsConfig {
            backend: IdentityBackend::Passphrase,
            scrypt_work_factor: 16,
            ..SecretsConfig::default()
        },
        Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    let sealer: Arc<dyn chitin::agent::Sealer> = Arc::new(
        chitin::vault::Vault::from_store(
            &e.home,
            &mut secrets,
            Arc::new(chitin::clock::SystemClock),
        )
        .unwrap(),
    );
    let t = chitin::agent::Transcripts::new(Arc::new(store), sealer);
    let (_, history) = t.history("cli:owner").unwrap();
    assert_eq!(history.len(), 4, "two turns of the first session");
    assert!(
        matches!(&history[1].message, chitin::agent::Stored::Assistant { text, .. } if text == "first answer")
    );
    // New rows continue after the copied ids.
    let next: i64 = pg
        .db()
        .unwrap()
        .with(|c| {
            c.query_row(
                "INSERT INTO usage (at_ms, user_id, subject, session_key, run_id, model, input_tokens, output_tokens)
                 VALUES (1, 'u', 's', 'k', 'r', 'm', 0, 0) RETURNING id",
                chitin_store::params![],
            )?
            .get(0)
        })
        .unwrap();
    assert_eq!(next, count("usage") + 1);

    // A second copy would mix two deployments: refused, nothing changed.
    let out = chitin(
        &e.home,
        &["store", "copy", "--from", "sqlite", "--to", "postgres"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already has rows") && err.contains("--replace"),
        "{err}"
    );
    // Unless told: the target's rows are replaced in the same transaction.
    ok(&chitin(
        &e.home,
        &[
            "store",
            "copy",
            "--from",
            "sqlite",
            "--to",
            "postgres",
            "--replace",
        ],
    ));
    let check: Value =
        serde_json::from_str(&ok(&chitin(&e.home, &["store", "check", "--json"]))).unwrap();
    assert_eq!(check["tables"]["usage"], json!(count("usage")));
    assert_eq!(check["tables"]["sessions"], json!(2));
}

#[test]
fn the_gateway_refuses_postgres_and_names_what_is_not_ported() {
    let e = used_home();
    let pg = TestPg::new().unwrap();
    write_config(&e, &postgres_section(&pg));
    let out = chitin(&e.home, &["gateway"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the gateway cannot run on PostgreSQL yet"),
        "{err}"
    );
    assert!(err.contains("Not ported yet: accounts"), "{err}");
    assert!(
        err.contains("Ported: approvals, agent::transcripts"),
        "{err}"
    );
    // Refused before it connected: the database was not even migrated.
    let v = Db::postgres_unmigrated(&pg.config())
        .unwrap()
        .version()
        .unwrap();
    assert_eq!(v, 0);
}

#[test]
fn store_copy_only_goes_from_sqlite_to_postgres_and_needs_a_postgres_store() {
    let e = used_home();
    let out = chitin(
        &e.home,
        &["store", "copy", "--from", "postgres", "--to", "sqlite"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("a copy goes from SQLite to PostgreSQL"));
    let out = chitin(
        &e.home,
        &["store", "copy", "--from", "sqlite", "--to", "postgres"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set `[store] backend = \"postgres\"`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // On SQLite, `store check` reports the home's state.db.
    let out = ok(&chitin(&e.home, &["store", "check"]));
    assert!(out.contains("backend:    sqlite"), "{out}");
    assert!(
        out.contains(&format!(
            "schema:     {} of {} (0 pending)",
            latest(),
            latest()
        )),
        "{out}"
    );
    assert!(out.contains("sessions"), "{out}");
}

fn latest() -> i64 {
    chitin_store::latest_version()
}

fn pg_location(pg: &TestPg) -> String {
    format!("postgres://127.0.0.1:5432/{}", pg.name())
}
