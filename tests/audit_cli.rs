//! The `chitin audit` contract, checked from outside through the real binary.
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

struct Home {
    _dir: tempfile::TempDir,
    home: PathBuf,
}

fn home() -> Home {
    // The audit signing key lives in the secret store: every command unlocks it with a
    // passphrase (cheap scrypt for tests), the way the gateway opens the log.
    let dir = tempfile::tempdir().unwrap();
    let home = support::private_home(dir.path(), "state");
    // The CLI operator (default: the gateway owner, `owner`) is an owner: `audit append`,
    // `query` and `export` are decided by the policies for it.
    support::write_owner_entities(&home);
    Home { _dir: dir, home }
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "audit-cli-test-passphrase")
        .env("USER", "tester")
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn append(home: &Path, i: usize) {
    let actor = format!("user{i}");
    let payload = format!("{{\"n\":{i}}}");
    let o = chitin(
        home,
        &[
            "audit",
            "append",
            "--kind",
            "system",
            "--actor",
            &actor,
            "--action",
            "exec",
            "--resource",
            "tool:exec",
            "--payload",
            &payload,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("appended: seq "), "{}", stdout(&o));
}

/// `ok: N records, head <64 hex>, last checkpoint <seq>`.
fn assert_ok_line(o: &Output, records: u64, checkpoint: i64) {
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(o), stderr(o));
    let line = stdout(o);
    let line = line.trim_end();
    let prefix = format!("ok: {records} records, head ");
    assert!(line.starts_with(&prefix), "{line}");
    let rest = &line[prefix.len()..];
    let (head, cp) = rest.split_once(", last checkpoint ").unwrap();
    assert_eq!(head.len(), 64);
    assert!(head.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(cp, checkpoint.to_string());
}

#[test]
fn append_and_checkpoint_are_recorded_and_verify_prints_the_ok_line() {
    let h = home();
    append(&h.home, 1);
    append(&h.home, 2);
    // Each append writes the policy decision (`audit.append` for the operator), the operator's
    // admin record and the record itself, and the process checkpoints on exit.
    let o = chitin(&h.home, &["audit", "checkpoint"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("checkpoint: seq 7 head "),
        "{}",
        stdout(&o)
    );
    assert_ok_line(&chitin(&h.home, &["audit", "verify"]), 7, 7);

    let o = chitin(&h.home, &["audit", "query", "--kind", "admin", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let actions: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        vec!["audit.append", "audit.append", "audit.checkpoint"]
    );
    assert_eq!(v[0]["actor"], "operator:tester");

    let o = chitin(
        &h.home,
        &["audit", "query", "--actor", "user2", "--limit", "5"],
    );
    assert!(o.status.success());
    let text = stdout(&o);
    assert!(text.starts_with("#6 "), "{text}");
    assert!(
        text.contains("system user2 exec tool:exec -> operator-written"),
        "{text}"
    );
    assert!(text.contains("\"payload\":{\"n\":2}"), "{text}");
    assert!(
        text.contains("\"operator_written\":true,\"payload\":{\"n\":2},\"written_by\":\"Chitin::User::\\\"owner\\\"\""),
        "{text}"
    );
}

#[test]
fn a_tampered_database_exits_1_with_the_first_bad_record() {
    let h = home();
    for i in 0..3 {
        append(&h.home, i);
    }
    let db = rusqlite::Connection::open(h.home.join("audit.db")).unwrap();
    db.execute_batch("DROP TRIGGER records_only_payload_removal")
        .unwrap();
    db.execute("UPDATE records SET actor = 'userX' WHERE seq = 4", [])
        .unwrap();
    drop(db);
    let o = chitin(&h.home, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o).trim_end(),
        "tampered: first bad record 4: modified field actor"
    );
}

#[test]
fn a_database_truncated_behind_a_checkpoint_exits_1() {
    let h = home();
    for i in 0..3 {
        append(&h.home, i);
    }
    let db = rusqlite::Connection::open(h.home.join("audit.db")).unwrap();
    db.execute_batch(
        "DROP TRIGGER records_no_delete; DROP TRIGGER checkpoints_no_delete;
         DELETE FROM records WHERE seq > 3; DELETE FROM checkpoints WHERE seq > 3;",
    )
    .unwrap();
    drop(db);
    let o = chitin(&h.home, &["audit", "verify"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with("tampered: first bad record 4: tail truncated behind a checkpoint"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn an_export_verifies_offline_and_a_tampered_export_exits_1() {
    let h = home();
    for i in 0..3 {
        append(&h.home, i);
    }
    let out = h.home.join("out.jsonl");
    let o = chitin(
        &h.home,
        &["audit", "export", "--out", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // 9 records + the export's decision and its own admin record.
    let o = chitin(
        &h.home,
        &["audit", "verify", "--export", out.to_str().unwrap()],
    );
    assert_ok_line(&o, 11, 11);

    let text = std::fs::read_to_string(&out).unwrap();
    // The first `"user1"` is record 6's actor (record 5's payload holds it escaped).
    let tampered = h.home.join("tampered.jsonl");
    std::fs::write(&tampered, text.replacen("\"user1\"", "\"userX\"", 1)).unwrap();
    let o = chitin(
        &h.home,
        &["audit", "verify", "--export", tampered.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with("tampered: first bad record 6: modified field actor"),
        "{}",
        stdout(&o)
    );

    // The wrong public key.
    let other = home();
    append(&other.home, 0);
    let o = chitin(
        &h.home,
        &[
            "audit",
            "verify",
            "--export",
            out.to_str().unwrap(),
            "--pubkey",
            other.home.join("audit.pub").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains(": wrong key"), "{}", stdout(&o));
}

#[test]
fn export_time_filters_and_csv_work_and_csv_is_refused_by_verify() {
    let h = home();
    append(&h.home, 0);
    let csv = h.home.join("out.csv");
    let o = chitin(
        &h.home,
        &[
            "audit",
            "export",
            "--format",
            "csv",
            "--since",
            "2000-01-01T00:00:00Z",
            "--out",
            csv.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("seq,time,kind,actor,action"));
    let o = chitin(
        &h.home,
        &["audit", "verify", "--export", csv.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--format jsonl"), "{}", stderr(&o));

    let o = chitin(&h.home, &["audit", "export", "--since", "yesterday"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("not an RFC 3339 time"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn append_fails_closed_when_the_audit_database_is_locked() {
    let h = home();
    append(&h.home, 0);
    let config = h.home.join("chitin.toml");
    std::fs::write(&config, "[audit]\nlock_timeout_ms = 100\n").unwrap();
    let db = rusqlite::Connection::open(h.home.join("audit.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let o = chitin(
        &h.home,
        &[
            "audit",
            "append",
            "--kind",
            "admin",
            "--actor",
            "a",
            "--action",
            "b",
            "--resource",
            "c",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("audit unavailable"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    db.execute_batch("ROLLBACK").unwrap();
    drop(db);
    assert_ok_line(&chitin(&h.home, &["audit", "verify"]), 3, 3);
}

#[test]
fn append_rejects_an_unknown_kind_and_invalid_json() {
    let h = home();
    let o = chitin(
        &h.home,
        &[
            "audit",
            "append",
            "--kind",
            "nope",
            "--actor",
            "a",
            "--action",
            "b",
            "--resource",
            "c",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("unknown record kind"), "{}", stderr(&o));
    let o = chitin(
        &h.home,
        &[
            "audit",
            "append",
            "--kind",
            "admin",
            "--actor",
            "a",
            "--action",
            "b",
            "--resource",
            "c",
            "--payload",
            "{nope",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--payload is not valid JSON"),
        "{}",
        stderr(&o)
    );
}

/// Runs `chitin ARGS` with stdout a pipe whose reader is already gone (`chitin ... | head`
/// after head exited).
fn into_closed_pipe(home: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "audit-cli-test-passphrase")
        .env("USER", "tester")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The only read end is ours: once it is closed, every write the child makes is EPIPE.
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn long_output_into_a_closed_pipe_ends_quietly_without_a_panic() {
    let h = home();
    for i in 0..3 {
        append(&h.home, i);
    }
    for args in [
        &["audit", "query"][..],
        &["audit", "query", "--json"],
        &["audit", "export"],
        &["usage"],
        &["sessions", "list"],
        // A command that prints with println!: the fallback for every other command.
        &[
            "policy",
            "validate",
            "--dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/policies"),
        ],
    ] {
        let o = into_closed_pipe(&h.home, args);
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("Broken pipe"), "{args:?}: {err}");
        assert_eq!(o.status.code(), Some(141), "{args:?}: {err}");
    }
    // With a reader, the same commands succeed.
    assert!(chitin(&h.home, &["audit", "query"]).status.success());
}
