//! Shared helpers for the audit integration tests.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chitin_audit::{
    AuditLog, AuditOptions, Kind, PublicKey, Record, RecordInput, Tamper, Verifier, VerifyReport,
};

/// A clock the test moves by hand.
#[derive(Clone)]
pub struct TestClock(pub Arc<AtomicI64>);

impl TestClock {
    pub fn new(ms: i64) -> Self {
        Self(Arc::new(AtomicI64::new(ms)))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    pub fn options(&self) -> AuditOptions {
        let c = self.0.clone();
        AuditOptions {
            clock: Arc::new(move || c.load(Ordering::SeqCst)),
            ..AuditOptions::default()
        }
    }
}

pub const T0: i64 = 1_795_767_586_000;

/// A varied record for position `i`.
pub fn input(i: usize) -> RecordInput {
    let kinds = [Kind::Decision, Kind::ToolRun, Kind::Admin, Kind::Message];
    let mut r = RecordInput::new(
        kinds[i % kinds.len()],
        format!("Chitin::User::\"user{i}\""),
        format!("action{i}"),
        format!("Chitin::Tool::\"tool{i}\""),
    )
    .with_payload(serde_json::json!({"i": i, "text": format!("payload number {i}"), "z": [1, 2]}));
    r.decision = "allow".into();
    r.policies = vec![format!("policy-{i}"), "base".into()];
    r.outcome = format!("outcome {i}");
    r
}

/// A log in a fresh temp dir with `n` records, checkpoints every `every` records, closed (so
/// the WAL is folded into the database file). Returns the dir guard and its path.
pub fn build_log(n: usize, every: u64) -> (tempfile::TempDir, PathBuf) {
    build_log_from(0, n, every)
}

/// Like [`build_log`], with the records `input(offset..offset + n)`.
pub fn build_log_from(offset: usize, n: usize, every: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("state");
    let clock = TestClock::new(T0);
    let log = AuditLog::open(
        &home,
        AuditOptions {
            checkpoint_every_records: every,
            checkpoint_every_ms: 0,
            ..clock.options()
        },
    )
    .unwrap();
    for i in 0..n {
        clock.advance(7);
        log.append(input(offset + i)).unwrap();
    }
    log.shutdown().unwrap();
    drop(log);
    (dir, home)
}

pub fn pubkey(home: &Path) -> PublicKey {
    PublicKey::load(&home.join("audit.pub")).unwrap()
}

pub fn verify(home: &Path) -> Result<VerifyReport, Tamper> {
    Verifier::new(pubkey(home))
        .verify_db(
            &home.join("audit.db"),
            Some(&home.join("audit.checkpoints")),
        )
        .unwrap()
}

/// Opens the database as an attacker would: raw, with the append-only triggers dropped.
pub fn attacker(home: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(home.join("audit.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER IF EXISTS records_no_delete;
         DROP TRIGGER IF EXISTS records_only_payload_removal;
         DROP TRIGGER IF EXISTS checkpoints_no_update;
         DROP TRIGGER IF EXISTS checkpoints_no_delete;",
    )
    .unwrap();
    c
}

/// Copies a state dir so each tamper starts from the same valid log.
pub fn copy_home(home: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("state");
    std::fs::create_dir(&to).unwrap();
    for e in std::fs::read_dir(home).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    (dir, to)
}

pub fn all_records(home: &Path) -> Vec<Record> {
    chitin_audit::AuditReader::open(&home.join("audit.db"))
        .unwrap()
        .range(i64::MIN, i64::MAX)
        .unwrap()
}

/// Asserts a tamper at `seq` whose reason starts with `reason`.
pub fn assert_tamper(result: Result<VerifyReport, Tamper>, seq: i64, reason: &str) {
    match result {
        Ok(r) => panic!(
            "expected tamper at {seq} ({reason}), verified: {}",
            r.ok_line()
        ),
        Err(t) => {
            let text = t.to_string();
            assert_eq!(t.seq, seq, "wrong first bad record: {text}");
            assert!(
                text.starts_with(&format!("tampered: first bad record {seq}: {reason}")),
                "wrong reason: {text} (wanted {reason})"
            );
        }
    }
}
