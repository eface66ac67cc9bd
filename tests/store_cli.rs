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
use chitin::gateway::auth::{ClientKey, LimitConfig, SharedFailures, SharedVerdict};
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
    // A log of its own: the home's audit.checkpoints witnesses the deployment's log only.
    let audit = chitin_audit::AuditLog::open(
        &home.with_file_name("approvals-audit"),
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
    assert!(out.contains("copied the audit log:"), "{out}");
    assert!(out.contains("copied the data keys of"), "{out}");

    let check: Value =
        serde_json::from_str(&ok(&chitin(&e.home, &["store", "check", "--json"]))).unwrap();
    assert_eq!(check["backend"], "postgres");
    assert_eq!(check["connected"], true);
    assert_eq!(check["version"], json!(latest()));
    assert_eq!(check["pending"], 0);
    for (table, n) in sqlite_counts.iter().filter(|(t, _)| t != "vault_keys") {
        assert_eq!(check["tables"][table], json!(n), "{table}: {check}");
    }
    // The data keys are not a table of SQLite (it keeps vault.keys): the copy put the file's
    // sealed bytes into the database's one row.
    assert_eq!(count("vault_keys"), 0);
    assert_eq!(check["tables"]["vault_keys"], json!(1), "{check}");
    let file_keys = std::fs::read(e.home.join("vault.keys")).unwrap();
    assert_eq!(
        chitin::vault::sealed_keys_in(&pg.db().unwrap()).unwrap(),
        Some(file_keys)
    );
    // From here the database's keys are the ones: without the file, the copied transcripts
    // still open through the vault every gateway on PostgreSQL uses.
    std::fs::rename(e.home.join("vault.keys"), e.home.join("vault.keys.moved")).unwrap();
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
        chitin::vault::Vault::for_db(
            &e.home,
            store.db(),
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

    // A second copy would mix two deployments: refused, nothing changed. `--replace` does
    // not help once the target holds the audit log: its tables are append-only.
    for replace in [false, true] {
        let mut args = vec!["store", "copy", "--from", "sqlite", "--to", "postgres"];
        if replace {
            args.push("--replace");
        }
        let out = chitin(&e.home, &args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("already holds an audit log")
                && err.contains("append-only, so `--replace` does not delete them"),
            "{err}"
        );
    }
    let check: Value =
        serde_json::from_str(&ok(&chitin(&e.home, &["store", "check", "--json"]))).unwrap();
    assert_eq!(check["tables"]["usage"], json!(count("usage") + 1));
    assert_eq!(check["tables"]["sessions"], json!(2));
    assert_eq!(check["audit"]["verified"], true, "{check}");
}

#[test]
fn store_copy_moves_the_audit_chain_and_both_verifiers_agree_on_its_head_in_postgres() {
    let e = used_home();
    let pg = TestPg::new().unwrap();
    // The SQLite deployment's chain, before the move.
    let before = ok(&chitin(&e.home, &["audit", "verify"]));
    assert!(before.starts_with("ok: "), "{before}");
    let sqlite = chitin_audit::AuditReader::open(&e.home.join("audit.db")).unwrap();

    write_config(&e, &postgres_section(&pg));
    let out = ok(&chitin(
        &e.home,
        &["store", "copy", "--from", "sqlite", "--to", "postgres"],
    ));
    assert!(out.contains("copied the audit log:"), "{out}");
    assert!(out.contains("it continues in postgres://"), "{out}");
    let (local_seq, _) = sqlite.head().unwrap().unwrap();

    // `store check` reports the log in the database, verified.
    let check: Value =
        serde_json::from_str(&ok(&chitin(&e.home, &["store", "check", "--json"]))).unwrap();
    assert_eq!(check["audit"]["backend"], "postgres", "{check}");
    assert_eq!(check["audit"]["verified"], true, "{check}");
    assert!(
        check["audit"]["records"].as_u64().unwrap() > u64::try_from(local_seq).unwrap(),
        "{check}"
    );
    let text = ok(&chitin(&e.home, &["store", "check"]));
    assert!(text.contains("audit:      postgres, verified: "), "{text}");

    // Every record of the SQLite chain is in PostgreSQL as it was: same seq, same hash.
    let cfg = chitin_audit::PgConfig::from_url(&format!("{}?sslmode=disable", pg.url())).unwrap();
    let shared = chitin_audit::AuditReader::open_postgres(&cfg).unwrap();
    assert_eq!(
        shared.range(1, local_seq).unwrap(),
        sqlite.range(1, local_seq).unwrap()
    );

    // The offline verifier (what `chitin-audit-verify --postgres URL --pubkey audit.pub` runs)
    // and `chitin audit verify` agree on the head.
    let pubkey = e.home.join("audit.pub");
    let cps = e.home.join("audit.checkpoints");
    let offline = match offline_verifier() {
        Some(bin) => {
            let out = Command::new(bin)
                .args(["--postgres", &format!("{}?sslmode=disable", pg.url())])
                .arg("--pubkey")
                .arg(&pubkey)
                .arg("--checkpoints")
                .arg(&cps)
                .output()
                .unwrap();
            ok(&out)
        }
        None => {
            let key = chitin_audit::PublicKey::load(&pubkey).unwrap();
            let report = chitin_audit::Verifier::new(key)
                .verify_postgres(&cfg, &[cps.as_path()])
                .unwrap()
                .unwrap();
            format!("{}\n", report.ok_line())
        }
    };
    assert!(offline.starts_with("ok: "), "{offline}");
    let chitin_says = ok(&chitin(&e.home, &["audit", "verify"]));
    let head = |line: &str| {
        line.split("head ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        head(&chitin_says),
        head(&offline),
        "{chitin_says} / {offline}"
    );
    let (pg_seq, pg_hash) = shared.head().unwrap().unwrap();
    assert_eq!(head(&chitin_says), chitin_audit::to_hex(&pg_hash));
    assert!(
        chitin_says.starts_with(&format!("ok: {pg_seq} records")),
        "{chitin_says}"
    );
}

/// `chitin-audit-verify` next to `chitin` (the workspace build has it, with the `postgres`
/// feature `chitin` turns on); the library's verifier, which it runs, when it was not built.
fn offline_verifier() -> Option<PathBuf> {
    let bin = Path::new(env!("CARGO_BIN_EXE_chitin")).with_file_name("chitin-audit-verify");
    bin.is_file().then_some(bin)
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

fn limits() -> LimitConfig {
    LimitConfig {
        max_failures: 3,
        window: std::time::Duration::from_secs(60),
        lockout: std::time::Duration::from_secs(300),
    }
}

/// Two gateways' failed-authentication counts on one store: the allowance and the lockout
/// are the deployment's.
fn shared_lockout_is_held_by_every_gateway(db: &Db, one: &SharedFailures, two: &SharedFailures) {
    let c = limits();
    let client = ClientKey::of("203.0.113.9".parse().unwrap());
    let other = ClientKey::of("203.0.113.10".parse().unwrap());
    let t0 = 1_000_000;
    // Two failures on the first gateway, the third on the second.
    for i in 0..2 {
        let v = one.fail(client, t0 + i, c).unwrap();
        assert_eq!(
            v,
            SharedVerdict {
                throttled: None,
                throttled_now: false
            }
        );
    }
    let v = two.fail(client, t0 + 2, c).unwrap();
    assert_eq!(
        v,
        SharedVerdict {
            throttled: None,
            throttled_now: true
        }
    );
    // Locked out on both, for what is left of the lockout.
    let v = one.fail(client, t0 + 1_000, c).unwrap();
    assert_eq!(
        v.throttled,
        Some(c.lockout - std::time::Duration::from_millis(998))
    );
    assert!(two.fail(client, t0 + 2_000, c).unwrap().throttled.is_some());
    // Another address is not affected.
    assert_eq!(two.fail(other, t0 + 2_000, c).unwrap().throttled, None);
    // After the lockout the client counts anew, and the old rows are gone.
    let after = t0 + 2 + i64::try_from(c.lockout.as_millis()).unwrap();
    assert_eq!(one.fail(client, after, c).unwrap().throttled, None);
    let old: i64 = db
        .with(|x| {
            x.query_row(
                "SELECT count(*) FROM auth_failures WHERE at_ms < ?1",
                chitin_store::params![after],
            )?
            .get(0)
        })
        .unwrap();
    assert_eq!(old, 0, "failures older than the window are pruned");
}

#[test]
fn the_failed_authentication_lockout_is_shared_by_two_gateways_on_one_postgres() {
    let pg = TestPg::new().unwrap();
    // Two stores on one database: two replicas.
    let one = SharedFailures::new(pg.db().unwrap());
    let two = SharedFailures::new(pg.db().unwrap());
    shared_lockout_is_held_by_every_gateway(&pg.db().unwrap(), &one, &two);
}

#[test]
fn the_failed_authentication_count_follows_the_same_rules_on_sqlite() {
    let t = tempfile::tempdir().unwrap();
    let path = t.path().join("state.db");
    let db = Db::sqlite(&path).unwrap();
    let one = SharedFailures::new(db.clone());
    let two = SharedFailures::new(Db::sqlite(&path).unwrap());
    shared_lockout_is_held_by_every_gateway(&db, &one, &two);
}
