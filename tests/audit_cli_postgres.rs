//! `chitin audit` with `[store] backend = "postgres"`, through the real binary: the database
//! URL is a `secret:` in the secret store, the deployment's audit log is in the same
//! PostgreSQL database (a fresh one on 127.0.0.1), and every command (append, checkpoint,
//! query, export, verify) works on it; the state directory's `audit.db` is no longer written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chitin_store::testing::TestPg;
use serde_json::Value;

const PASS: &str = "audit-pg-cli-pass";

fn chitin_in(home: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("USER", "tester")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    chitin_in(home, args, b"")
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

fn write_config(home: &Path, store: &str) {
    let path = home.join("chitin.toml");
    let _ = std::fs::remove_file(&path);
    support::write_private(
        &path,
        format!("{}{store}", support::TEST_SECRETS_CONFIG).as_bytes(),
    );
}

fn sqlite_head(home: &Path) -> Option<(i64, Vec<u8>)> {
    chitin_audit::AuditReader::open(&home.join(chitin_audit::DB_FILE))
        .unwrap()
        .head()
        .unwrap()
}

fn pg_audit(pg: &TestPg) -> chitin_audit::PgConfig {
    chitin_audit::PgConfig::from_url(&format!("{}?sslmode=disable", pg.url())).unwrap()
}

struct Deployment {
    t: tempfile::TempDir,
    home: PathBuf,
    pg: TestPg,
}

/// A home whose store URL is the secret `pg_url`, moved to PostgreSQL with `store copy`.
fn moved_to_postgres() -> Deployment {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let pg = TestPg::new().unwrap();
    ok(&chitin(&home, &["init"]));
    // The credential goes into the secret store while the deployment is still on SQLite.
    ok(&chitin_in(
        &home,
        &[
            "secrets",
            "set",
            "pg_url",
            "--audience",
            "url.store.invalid",
        ],
        pg.url().as_bytes(),
    ));
    write_config(
        &home,
        "\n[store]\nbackend = \"postgres\"\nurl = \"secret:pg_url\"\n",
    );
    let out = ok(&chitin(
        &home,
        &["store", "copy", "--from", "sqlite", "--to", "postgres"],
    ));
    assert!(out.contains("copied the audit log:"), "{out}");
    Deployment { t, home, pg }
}

#[test]
fn every_audit_command_works_on_the_postgres_log_and_audit_db_is_no_longer_written() {
    let d = moved_to_postgres();
    let home = &d.home;
    let local_after_copy = sqlite_head(home);
    let pg_head_after_copy = chitin_audit::AuditReader::open_postgres(&pg_audit(&d.pg))
        .unwrap()
        .head()
        .unwrap()
        .unwrap();
    assert!(
        pg_head_after_copy.0 > local_after_copy.as_ref().unwrap().0,
        "the copy continues the chain in PostgreSQL"
    );

    let out = ok(&chitin(
        home,
        &[
            "audit",
            "append",
            "--kind",
            "system",
            "--actor",
            "pg-tester",
            "--action",
            "note",
            "--resource",
            "replica-1",
            "--payload",
            "{\"n\":1}",
        ],
    ));
    assert!(out.starts_with("appended: seq "), "{out}");
    let appended: i64 = out["appended: seq ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(appended > pg_head_after_copy.0, "{out}");

    let out = ok(&chitin(home, &["audit", "checkpoint"]));
    assert!(out.starts_with("checkpoint: seq "), "{out}");

    let q: Value = serde_json::from_str(&ok(&chitin(
        home,
        &["audit", "query", "--actor", "pg-tester", "--json"],
    )))
    .unwrap();
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0]["seq"], appended);
    assert_eq!(q[0]["resource"], "replica-1");
    // The store credential's releases through the gate are in the shared log too (the ones
    // decided before the log was open are its first records of each command).
    let uses: Value = serde_json::from_str(&ok(&chitin(
        home,
        &["audit", "query", "--kind", "secret_use", "--json"],
    )))
    .unwrap();
    let uses = uses.as_array().unwrap();
    assert!(
        uses.iter()
            .filter(|r| r["actor"] == "Chitin::Gateway::\"store\""
                && r["resource"].as_str().unwrap().contains("pg_url"))
            .count()
            >= 2,
        "{uses:?}"
    );

    let export = d.t.path().join("export.jsonl");
    ok(&chitin(
        home,
        &["audit", "export", "--out", export.to_str().unwrap()],
    ));
    let out = ok(&chitin(
        home,
        &["audit", "verify", "--export", export.to_str().unwrap()],
    ));
    assert!(out.starts_with("ok: "), "{out}");

    let out = ok(&chitin(home, &["audit", "verify"]));
    assert!(out.starts_with("ok: "), "{out}");
    let head = chitin_audit::AuditReader::open_postgres(&pg_audit(&d.pg))
        .unwrap()
        .head()
        .unwrap()
        .unwrap();
    assert!(
        out.contains(&format!("head {}", chitin_audit::to_hex(&head.1))),
        "{out}"
    );
    assert!(out.contains(&format!("ok: {} records", head.0)), "{out}");
    // Everything after the copy went to PostgreSQL; audit.db stayed as the copy left it.
    assert_eq!(sqlite_head(home), local_after_copy);
}

#[test]
fn a_row_rewritten_in_the_postgres_log_makes_audit_verify_report_it() {
    let d = moved_to_postgres();
    ok(&chitin(&d.home, &["audit", "checkpoint"]));
    d.pg.db()
        .unwrap()
        .with(|c| {
            c.execute_batch(
                "ALTER TABLE audit_records DISABLE TRIGGER USER;
                 UPDATE audit_records SET actor = 'mallory' WHERE seq = 2;",
            )
        })
        .unwrap();
    let out = chitin(&d.home, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("tampered: first bad record 2"), "{text}");
}
