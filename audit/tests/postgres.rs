//! The audit log on PostgreSQL (feature `postgres`): the same chain, checkpoints, readers,
//! verification, payload removal and exports as on SQLite, one chain across several writers,
//! and the copy of a SQLite log. Each test runs on its own fresh database.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;
mod common_pg;

use std::collections::VecDeque;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use chitin_audit::export::{self, Format};
use chitin_audit::{
    AuditError, AuditLog, AuditOptions, AuditReader, CheckpointSigner, KeySigner, Kind, PgConfig,
    PgTls, Query, RecordInput, Tamper, Verifier, VerifyReport, copy_from_sqlite,
};
use common::*;
use common_pg::TestDb;

const SEED: [u8; 32] = [7u8; 32];

fn signer() -> Arc<dyn CheckpointSigner> {
    Arc::new(KeySigner::from_seed(&SEED))
}

fn options(clock: &TestClock, every: u64) -> AuditOptions {
    AuditOptions {
        checkpoint_every_records: every,
        checkpoint_every_ms: 0,
        signer: Some(signer()),
        ..clock.options()
    }
}

/// `n` records, one at a time, on a clock that moves 7 ms per record (deterministic: the same
/// calls on SQLite give the same records and checkpoints).
fn fill(log: &AuditLog, clock: &TestClock, offset: usize, n: usize) {
    for i in 0..n {
        clock.advance(7);
        log.append(input(offset + i)).unwrap();
    }
}

fn pg_verify(db: &TestDb, files: &[&Path]) -> Result<VerifyReport, Tamper> {
    Verifier::new(signer().public_key())
        .verify_postgres(&db.config(), files)
        .unwrap()
}

/// A PostgreSQL log of `n` records (checkpoint every `every`), closed. Returns the state dir.
fn build_pg(db: &TestDb, n: usize, every: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, every)).unwrap();
    fill(&log, &clock, 0, n);
    log.shutdown().unwrap();
    dir
}

/// The same log in SQLite (same key, same clock, same records).
fn build_sqlite(n: usize, every: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open(dir.path(), options(&clock, every)).unwrap();
    fill(&log, &clock, 0, n);
    log.shutdown().unwrap();
    dir
}

#[test]
fn appends_to_postgresql_form_a_chain_that_verifies_with_readers_and_checkpoints() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 5)).unwrap();
    assert_eq!(log.backend(), "postgres");
    fill(&log, &clock, 0, 12);
    let receipt = log.append(input(12)).unwrap();
    assert_eq!(receipt.seq, 13);

    let reader = log.reader().unwrap();
    let all = reader.range(1, 100).unwrap();
    assert_eq!(all.len(), 13);
    assert_eq!(all[12].hash, receipt.hash.to_vec());
    for w in all.windows(2) {
        assert_eq!(w[1].prev_hash, w[0].hash);
        assert_eq!(w[1].seq, w[0].seq + 1);
    }
    assert_eq!(reader.head().unwrap(), Some((13, receipt.hash.to_vec())));
    let tools = reader
        .query(&Query {
            kind: Some("tool_run".into()),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(
        tools.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 6, 10]
    );
    let recent = reader
        .query(&Query {
            limit: Some(2),
            ..Query::default()
        })
        .unwrap();
    assert_eq!(
        recent.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![12, 13]
    );
    assert_eq!(
        reader
            .seq_bounds(Some(T0 + 7 * 3), Some(T0 + 7 * 5))
            .unwrap(),
        Some((3, 5))
    );
    let cps: Vec<i64> = reader
        .checkpoints()
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(cps, vec![5, 10]);

    log.shutdown().unwrap();
    let witness = dir.path().join("audit.checkpoints");
    let report = pg_verify(&db, &[&witness]).unwrap();
    assert_eq!(report.records, 13);
    assert_eq!(report.last_checkpoint, Some(13));
    assert_eq!(report.head, receipt.hash);
    // The witness file holds what this writer signed.
    let text = std::fs::read_to_string(&witness).unwrap();
    assert_eq!(text.lines().count(), 3);
}

#[test]
fn a_reopened_postgresql_log_continues_the_chain_and_verifies_through_the_log_itself() {
    let db = TestDb::new();
    let dir = build_pg(&db, 4, 0);
    let clock = TestClock::new(T0 + 1000);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap();
    fill(&log, &clock, 4, 3);
    log.checkpoint_now().unwrap();
    let report = log.verify().unwrap().unwrap();
    assert_eq!(report.records, 7);
    assert_eq!(report.last_checkpoint, Some(7));
}

#[test]
fn several_logs_in_several_threads_append_one_gap_free_chain() {
    let db = TestDb::new();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let logs: Vec<Arc<AuditLog>> = dirs
        .iter()
        .map(|d| {
            Arc::new(
                AuditLog::open_postgres(
                    d.path(),
                    &db.config(),
                    AuditOptions {
                        checkpoint_every_records: 40,
                        signer: Some(signer()),
                        ..AuditOptions::default()
                    },
                )
                .unwrap(),
            )
        })
        .collect();
    let per_thread = 60usize;
    let mut handles = Vec::new();
    for (w, log) in logs.iter().enumerate() {
        for t in 0..2 {
            let log = log.clone();
            handles.push(std::thread::spawn(move || {
                let mut inflight = VecDeque::new();
                let mut seqs = Vec::new();
                for i in 0..per_thread {
                    if inflight.len() >= 8 {
                        let p: chitin_audit::PendingReceipt = inflight.pop_front().unwrap();
                        seqs.push(p.wait().unwrap().seq);
                    }
                    let rec = RecordInput::new(
                        Kind::Decision,
                        format!("writer{w}-thread{t}"),
                        format!("action{i}"),
                        "Chitin::Tool::\"exec\"",
                    );
                    inflight.push_back(log.submit(rec).unwrap());
                }
                seqs.extend(inflight.into_iter().map(|p| p.wait().unwrap().seq));
                seqs
            }));
        }
    }
    let mut seqs: Vec<i64> = Vec::new();
    for h in handles {
        seqs.extend(h.join().unwrap());
    }
    for log in &logs {
        log.shutdown().unwrap();
    }
    let total = 3 * 2 * per_thread;
    let reader = AuditReader::open_postgres(&db.config()).unwrap();
    let all = reader.range(i64::MIN, i64::MAX).unwrap();
    assert_eq!(all.len(), total);
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=i64::try_from(total).unwrap()).collect::<Vec<_>>(),
        "one gap-free sequence"
    );
    for w in 0..3 {
        for t in 0..2 {
            let actor = format!("writer{w}-thread{t}");
            assert_eq!(all.iter().filter(|r| r.actor == actor).count(), per_thread);
        }
    }
    // Every receipt names a distinct record.
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), total);
    let witnesses: Vec<std::path::PathBuf> = dirs
        .iter()
        .map(|d| d.path().join("audit.checkpoints"))
        .collect();
    let refs: Vec<&Path> = witnesses.iter().map(|p| p.as_path()).collect();
    let report = pg_verify(&db, &refs).unwrap();
    assert_eq!(report.records, u64::try_from(total).unwrap());
    assert_eq!(report.last_checkpoint, Some(i64::try_from(total).unwrap()));
}

/// The gateway appends from async tasks; the synchronous PostgreSQL client cannot run on a
/// thread that drives a runtime, so the records are committed by the writer's own thread.
#[test]
fn appends_and_controls_from_inside_an_async_runtime_reach_postgresql() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log =
        Arc::new(AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let l = Arc::clone(&log);
    let (seqs, cp) = rt.block_on(async move {
        let mut seqs = Vec::new();
        for i in 0..3 {
            seqs.push(l.append(input(i)).unwrap().seq);
        }
        // On a worker thread too.
        let l2 = Arc::clone(&l);
        let more = tokio::spawn(async move { l2.append(input(3)).unwrap().seq })
            .await
            .unwrap();
        seqs.push(more);
        (seqs, l.checkpoint_now().unwrap())
    });
    assert_eq!(seqs, [1, 2, 3, 4]);
    assert_eq!(cp.seq, 4);
    let removed = rt.block_on(async { log.remove_payload(2, "retention", "owner").unwrap() });
    assert_eq!(removed.seq, 5);
    rt.block_on(async { log.shutdown().unwrap() });
    let witness = dir.path().join("audit.checkpoints");
    assert_eq!(pg_verify(&db, &[&witness]).unwrap().records, 5);
}

#[test]
fn queued_records_wait_for_the_head_lock_and_then_commit_in_one_transaction() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap();
    log.append(input(0)).unwrap();
    // Another writer's append transaction holds the head row.
    let mut other = db.client();
    let mut held = other.transaction().unwrap();
    held.query_one("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE", &[])
        .unwrap();
    let first = log.submit(input(1)).unwrap();
    // The writer now waits for the lock (polled, generous deadline).
    let mut watcher = db.client();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
                 AND application_name = 'chitin-audit' AND wait_event_type = 'Lock'",
                &[&db.name],
            )
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never waited for the head lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Everything submitted meanwhile queues behind it ...
    let queued: Vec<_> = (2..50).map(|i| log.submit(input(i)).unwrap()).collect();
    held.commit().unwrap();
    assert_eq!(first.wait().unwrap().seq, 2);
    let seqs: Vec<i64> = queued.into_iter().map(|p| p.wait().unwrap().seq).collect();
    assert_eq!(seqs, (3..=50).collect::<Vec<_>>());
    // ... and commits as one batch: one transaction (one xmin) for records 3..=50.
    let xids: Vec<String> = watcher
        .query(
            "SELECT xmin::text FROM audit_records WHERE seq >= 2 ORDER BY seq",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(xids.len(), 49);
    assert!(xids[1..].iter().all(|x| *x == xids[1]), "{xids:?}");
    assert_ne!(xids[0], xids[1]);
    log.shutdown().unwrap();
    let witness = dir.path().join("audit.checkpoints");
    assert_eq!(pg_verify(&db, &[&witness]).unwrap().records, 50);
}

#[test]
fn a_writer_with_another_audit_key_is_refused() {
    let db = TestDb::new();
    let _first = build_pg(&db, 2, 0);
    let dir = tempfile::tempdir().unwrap();
    let other: Arc<dyn CheckpointSigner> = Arc::new(KeySigner::from_seed(&[9u8; 32]));
    let err = AuditLog::open_postgres(
        dir.path(),
        &db.config(),
        AuditOptions {
            signer: Some(other),
            ..AuditOptions::default()
        },
    )
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(matches!(err, AuditError::KeyFile { .. }), "{text}");
    assert!(
        text.contains(&format!(
            "this audit log is signed by key {}",
            signer().public_key().id_hex()
        )) && text.contains("every gateway of a deployment needs the same audit key"),
        "{text}"
    );
}

#[test]
fn the_append_only_triggers_refuse_an_update_a_delete_and_a_truncate() {
    let db = TestDb::new();
    let _dir = build_pg(&db, 3, 0);
    let mut c = db.client();
    for sql in [
        "UPDATE audit_records SET actor = 'mallory' WHERE seq = 2",
        "DELETE FROM audit_records WHERE seq = 3",
        "TRUNCATE audit_records",
        "DELETE FROM audit_checkpoints",
        "UPDATE audit_checkpoints SET seq = 1",
    ] {
        let err = c.batch_execute(sql).err().unwrap();
        let msg = err.as_db_error().unwrap().message().to_string();
        assert!(msg.contains("append-only"), "{sql}: {msg}");
    }
    assert!(pg_verify(&db, &[]).is_ok());
}

/// Flips one bit of the middle byte of a text (keeps it valid UTF-8 for ASCII).
fn flip_text(s: &str) -> String {
    let mut b = s.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    String::from_utf8(b).unwrap()
}

#[test]
fn a_tampered_row_is_reported_exactly_as_on_sqlite() {
    let k: i64 = 7;
    let text_cols = [
        "kind", "actor", "action", "resource", "decision", "policies", "outcome", "payload",
    ];
    let blob_cols = ["payload_digest", "field_check", "prev_hash", "hash"];
    let mut cases: Vec<(String, &str)> = Vec::new();
    for col in text_cols {
        cases.push((format!("text:{col}"), col));
    }
    for col in blob_cols {
        cases.push((format!("blob:{col}"), col));
    }
    cases.push(("int:ts_ms".into(), "ts"));
    cases.push(("delete".into(), "missing record"));
    cases.push(("swap".into(), "reordered"));
    for (case, _) in &cases {
        // SQLite: the reference verdict.
        let sdir = build_sqlite(12, 5);
        let home = sdir.path();
        {
            let s = attacker(home);
            tamper_sqlite(&s, case, k);
        }
        let sqlite_verdict = verify(home).err().unwrap().to_string();
        // PostgreSQL: the same log, the same tamper.
        let db = TestDb::new();
        let pdir = build_pg(&db, 12, 5);
        tamper_pg(&mut db.attacker(), case, k);
        let witness = pdir.path().join("audit.checkpoints");
        let pg_verdict = pg_verify(&db, &[&witness]).err().unwrap().to_string();
        assert_eq!(pg_verdict, sqlite_verdict, "{case}");
        assert!(
            pg_verdict.starts_with(&format!("tampered: first bad record {k}: ")),
            "{case}: {pg_verdict}"
        );
    }
}

fn tamper_sqlite(s: &rusqlite::Connection, case: &str, k: i64) {
    let (what, col) = case.split_once(':').unwrap_or((case, ""));
    match what {
        "text" => {
            let v: String = s
                .query_row(
                    &format!("SELECT {col} FROM records WHERE seq = ?1"),
                    [k],
                    |r| r.get(0),
                )
                .unwrap();
            s.execute(
                &format!("UPDATE records SET {col} = ?1 WHERE seq = ?2"),
                rusqlite::params![flip_text(&v), k],
            )
            .unwrap();
        }
        "blob" => {
            let mut v: Vec<u8> = s
                .query_row(
                    &format!("SELECT {col} FROM records WHERE seq = ?1"),
                    [k],
                    |r| r.get(0),
                )
                .unwrap();
            v[3] ^= 0x80;
            s.execute(
                &format!("UPDATE records SET {col} = ?1 WHERE seq = ?2"),
                rusqlite::params![v, k],
            )
            .unwrap();
        }
        "int" => {
            s.execute(
                &format!("UPDATE records SET {col} = ({col} | 256) - ({col} & 256) WHERE seq = ?1"),
                [k],
            )
            .unwrap();
        }
        "delete" => {
            s.execute("DELETE FROM records WHERE seq = ?1", [k])
                .unwrap();
        }
        "swap" => {
            let cols = "ts_ms, kind, actor, action, resource, decision, policies, outcome, \
                        payload_digest, payload, field_check, prev_hash, hash";
            s.execute_batch(&format!(
                "UPDATE records SET ({cols}) = (SELECT {cols} FROM records WHERE seq = {}) \
                 WHERE seq = {k};",
                k - 1
            ))
            .unwrap();
        }
        other => panic!("unknown case {other}"),
    }
}

fn tamper_pg(c: &mut postgres::Client, case: &str, k: i64) {
    let (what, col) = case.split_once(':').unwrap_or((case, ""));
    match what {
        "text" => {
            let v: String = c
                .query_one(
                    format!("SELECT {col} FROM audit_records WHERE seq = $1").as_str(),
                    &[&k],
                )
                .unwrap()
                .get(0);
            c.execute(
                format!("UPDATE audit_records SET {col} = $1 WHERE seq = $2").as_str(),
                &[&flip_text(&v), &k],
            )
            .unwrap();
        }
        "blob" => {
            let mut v: Vec<u8> = c
                .query_one(
                    format!("SELECT {col} FROM audit_records WHERE seq = $1").as_str(),
                    &[&k],
                )
                .unwrap()
                .get(0);
            v[3] ^= 0x80;
            c.execute(
                format!("UPDATE audit_records SET {col} = $1 WHERE seq = $2").as_str(),
                &[&v, &k],
            )
            .unwrap();
        }
        "int" => {
            c.execute(
                format!("UPDATE audit_records SET {col} = {col} # 256 WHERE seq = $1").as_str(),
                &[&k],
            )
            .unwrap();
        }
        "delete" => {
            c.execute("DELETE FROM audit_records WHERE seq = $1", &[&k])
                .unwrap();
        }
        "swap" => {
            let cols = "ts_ms, kind, actor, action, resource, decision, policies, outcome, \
                        payload_digest, payload, field_check, prev_hash, hash";
            c.batch_execute(&format!(
                "UPDATE audit_records SET ({cols}) = (SELECT {cols} FROM audit_records \
                 WHERE seq = {}) WHERE seq = {k};",
                k - 1
            ))
            .unwrap();
        }
        other => panic!("unknown case {other}"),
    }
}

#[test]
fn rows_rewritten_by_a_database_administrator_behind_a_checkpoint_are_caught_by_the_witness_file() {
    let db = TestDb::new();
    let dir = build_pg(&db, 10, 5);
    // The administrator deletes the last records and the checkpoints that cover them.
    let mut c = db.attacker();
    c.batch_execute(
        "DELETE FROM audit_records WHERE seq > 6; DELETE FROM audit_checkpoints WHERE seq > 5;",
    )
    .unwrap();
    let witness = dir.path().join("audit.checkpoints");
    let t = pg_verify(&db, &[&witness]).err().unwrap();
    assert_eq!(
        t.to_string(),
        "tampered: first bad record 7: tail truncated behind a checkpoint (checkpoint 10 covers \
         records up to 10, the log ends at 6)"
    );
}

#[test]
fn the_writer_refuses_to_append_after_the_tail_was_deleted_outside_chitin() {
    let db = TestDb::new();
    let dir = build_pg(&db, 5, 0);
    db.attacker()
        .batch_execute("DELETE FROM audit_records WHERE seq = 5")
        .unwrap();
    let clock = TestClock::new(T0 + 10_000);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap();
    let err = log.append(input(9)).err().unwrap().to_string();
    assert!(
        err.contains("the head row says record 5 but the records end at 4")
            && err.contains("the action was not performed"),
        "{err}"
    );
    assert!(!log.health().is_ok());
}

#[test]
fn a_payload_removed_on_postgresql_leaves_a_chain_that_verifies() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap();
    fill(&log, &clock, 0, 4);
    let r = log
        .remove_payload(2, "gdpr erasure #12", "operator:root")
        .unwrap();
    assert_eq!(r.seq, 5);
    let again = log
        .remove_payload(2, "again", "operator:root")
        .err()
        .unwrap();
    assert!(again.to_string().contains("already removed"), "{again}");
    log.shutdown().unwrap();
    let rec = AuditReader::open_postgres(&db.config())
        .unwrap()
        .range(2, 2)
        .unwrap()
        .remove(0);
    assert_eq!(rec.payload, None);
    assert_eq!(rec.removed_reason.as_deref(), Some("gdpr erasure #12"));
    let witness = dir.path().join("audit.checkpoints");
    assert_eq!(pg_verify(&db, &[&witness]).unwrap().records, 5);
}

#[test]
fn a_record_with_a_nul_character_is_refused_alone() {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0)).unwrap();
    let err = log
        .append(RecordInput::new(Kind::Admin, "op", "x", "file\0name"))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("the record's resource contains a NUL character"),
        "{err}"
    );
    assert_eq!(log.append(input(1)).unwrap().seq, 1);
    assert!(log.health().is_ok());
}

#[test]
fn a_sqlite_log_copied_into_postgresql_verifies_with_the_same_key_and_continues() {
    let sdir = build_sqlite(23, 10);
    let home = sdir.path();
    // A removed payload travels too.
    {
        let clock = TestClock::new(T0 + 5000);
        let log = AuditLog::open(home, options(&clock, 10)).unwrap();
        log.remove_payload(4, "retention", "gateway").unwrap();
        log.shutdown().unwrap();
    }
    let before = verify(home).unwrap();
    let db = TestDb::new();
    let key = pubkey(home);
    let summary = copy_from_sqlite(
        &home.join("audit.db"),
        Some(&home.join("audit.checkpoints")),
        &key,
        &db.config(),
    )
    .unwrap();
    assert_eq!(summary.records, 24);
    assert_eq!(summary.head_seq, 24);
    // 10 and 20 by count, 23 and 24 on the two shutdowns.
    assert_eq!(summary.checkpoints, 4);
    // The copied chain alone (no witness file) verifies to the same head.
    let after = pg_verify(&db, &[]).unwrap();
    assert_eq!(after, before);
    assert_eq!(
        AuditReader::open_postgres(&db.config())
            .unwrap()
            .range(1, 100)
            .unwrap(),
        all_records(home)
    );
    // A gateway on PostgreSQL continues the chain with the deployment's key.
    let gw = tempfile::tempdir().unwrap();
    std::fs::copy(home.join("audit.pub"), gw.path().join("audit.pub")).unwrap();
    let clock = TestClock::new(T0 + 9000);
    let log = AuditLog::open_postgres(gw.path(), &db.config(), options(&clock, 0)).unwrap();
    assert_eq!(log.append(input(99)).unwrap().seq, 25);
    log.shutdown().unwrap();
    let witness = gw.path().join("audit.checkpoints");
    assert_eq!(pg_verify(&db, &[&witness]).unwrap().records, 25);
    // A second copy into the now non-empty database is refused.
    let err = copy_from_sqlite(
        &home.join("audit.db"),
        Some(&home.join("audit.checkpoints")),
        &key,
        &db.config(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("already holds an audit log (25 records"),
        "{err}"
    );
}

#[test]
fn a_tampered_sqlite_log_is_not_copied() {
    let sdir = build_sqlite(8, 4);
    let home = sdir.path();
    attacker(home)
        .execute("UPDATE records SET actor = 'mallory' WHERE seq = 3", [])
        .unwrap();
    let db = TestDb::new();
    let err = copy_from_sqlite(
        &home.join("audit.db"),
        Some(&home.join("audit.checkpoints")),
        &pubkey(home),
        &db.config(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("does not verify (tampered: first bad record 3: modified field actor)"),
        "{err}"
    );
    // Refused before anything was written: the target has no audit tables.
    let absent: bool = db
        .client()
        .query_one("SELECT to_regclass('audit_records') IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(absent);
}

/// `n` records with a checkpoint after every `every`, each checkpoint requested in order
/// (`checkpoint_now`), so its time cannot race the clock: the same log on either backend.
fn build_exact(
    open: impl Fn(&Path, AuditOptions) -> AuditLog,
    n: usize,
    every: usize,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = open(dir.path(), options(&clock, 0));
    for i in 0..n {
        clock.advance(7);
        log.append(input(i)).unwrap();
        if (i + 1) % every == 0 {
            log.checkpoint_now().unwrap();
        }
    }
    log.shutdown().unwrap();
    dir
}

fn export_of(reader: &AuditReader, witness: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    export::write_export(
        reader,
        Some(witness),
        None,
        None,
        Format::Jsonl,
        T0,
        &mut out,
    )
    .unwrap();
    out
}

fn run_verifier(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_chitin-audit-verify"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn an_export_from_postgresql_is_the_sqlite_export_byte_for_byte_and_the_standalone_verifier_accepts_it()
 {
    let db = TestDb::new();
    let config = db.config();
    let pdir = build_exact(|d, o| AuditLog::open_postgres(d, &config, o).unwrap(), 9, 4);
    let sdir = build_exact(|d, o| AuditLog::open(d, o).unwrap(), 9, 4);
    let pg_export = export_of(
        &AuditReader::open_postgres(&db.config()).unwrap(),
        &pdir.path().join("audit.checkpoints"),
    );
    let sqlite_export = export_of(
        &AuditReader::open(&sdir.path().join("audit.db")).unwrap(),
        &sdir.path().join("audit.checkpoints"),
    );
    assert_eq!(
        String::from_utf8(pg_export.clone()).unwrap(),
        String::from_utf8(sqlite_export).unwrap()
    );

    let x = pdir.path().join("x.jsonl");
    std::fs::write(&x, &pg_export).unwrap();
    let key = pdir.path().join("audit.pub");
    let expected = pg_verify(&db, &[]).unwrap().ok_line();
    let (code, stdout, stderr) = run_verifier(&[
        "--export",
        x.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim_end(), expected);

    // The live database, with this writer's checkpoint file as witness.
    let witness = pdir.path().join("audit.checkpoints");
    let (code, stdout, stderr) = run_verifier(&[
        "--postgres",
        &db.url(),
        "--pubkey",
        key.to_str().unwrap(),
        "--checkpoints",
        witness.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim_end(), expected);

    // A record removed from the export is named.
    let text = String::from_utf8(pg_export).unwrap();
    let without_3: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| l)
        .collect();
    std::fs::write(&x, without_3.join("\n")).unwrap();
    let (code, stdout, _) = run_verifier(&[
        "--export",
        x.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stdout.trim_end(),
        "tampered: first bad record 3: missing record"
    );
}

#[test]
fn a_database_from_a_newer_chitin_is_refused() {
    let db = TestDb::new();
    let _dir = build_pg(&db, 1, 0);
    db.client()
        .batch_execute("UPDATE audit_meta SET value = '99' WHERE name = 'schema_version'")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let err = AuditLog::open_postgres(dir.path(), &db.config(), options(&clock, 0))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("written by a newer Chitin (layout 99, this build knows up to 1)"),
        "{err}"
    );
    let err = AuditReader::open_postgres(&db.config())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("newer Chitin"), "{err}");
}

#[test]
fn tls_to_postgresql_is_negotiated_or_refused_never_skipped() {
    let db = TestDb::new();
    let ssl: String = db.client().query_one("SHOW ssl", &[]).unwrap().get(0);
    let require = PgConfig::from_url(&db.url())
        .unwrap()
        .with_tls(PgTls::Require);
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let opened = AuditLog::open_postgres(dir.path(), &require, options(&clock, 0));
    if ssl == "on" {
        // Encrypted (the session says so), and the log works over it.
        let log = opened.unwrap();
        assert_eq!(log.append(input(0)).unwrap().seq, 1);
        let mut c = db.client();
        let encrypted: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'chitin-audit' AND a.datname = $1 AND s.ssl",
                &[&db.name],
            )
            .unwrap()
            .get(0);
        assert!(encrypted >= 1, "the audit connection is not encrypted");
        // verify-full checks the certificate and the name: the server's own (self-signed)
        // certificate as the CA does not make it valid for 127.0.0.1.
        let cert_file: String = c.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
        let pem: String = c
            .query_one("SELECT pg_read_file($1)", &[&cert_file])
            .unwrap()
            .get(0);
        let ca = dir.path().join("server-ca.pem");
        std::fs::write(&ca, pem).unwrap();
        let strict = PgConfig::from_url(&db.url())
            .unwrap()
            .with_tls(PgTls::VerifyFull {
                ca_file: Some(ca.clone()),
            });
        let err = AuditReader::open_postgres(&strict)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(
                "cannot connect (error performing TLS handshake: invalid peer certificate"
            ),
            "{err}"
        );
    } else {
        let err = opened.err().unwrap().to_string();
        assert!(err.contains("cannot connect"), "{err}");
    }
}

#[test]
fn an_unreachable_database_fails_closed_with_a_clear_error() {
    let cfg = PgConfig::from_url("postgres://postgres@127.0.0.1:1/none?sslmode=disable").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = AuditLog::open_postgres(dir.path(), &cfg, AuditOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with("audit database postgresql://postgres@127.0.0.1:1/none: cannot connect"),
        "{err}"
    );
}

/// `AuditReader::copy_to_sqlite` (a backup of a PostgreSQL deployment): the copy is the same
/// log the same appends give on SQLite, record for record, with the checkpoints in its table
/// and its file; it verifies offline with the same verdict; a copy never overwrites files.
#[test]
fn a_postgresql_log_copied_to_sqlite_is_the_log_sqlite_keeps_and_verifies_offline() {
    let db = TestDb::new();
    let _pg_dir = build_pg(&db, 12, 5);
    let sqlite = build_sqlite(12, 5);
    let reader = AuditReader::open_postgres(&db.config()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (copy_db, copy_cps) = (
        out.path().join("audit.db"),
        out.path().join("audit.checkpoints"),
    );
    assert_eq!(reader.copy_to_sqlite(&copy_db, &copy_cps).unwrap(), 12);
    let copied = AuditReader::open(&copy_db).unwrap();
    let native = AuditReader::open(&sqlite.path().join("audit.db")).unwrap();
    assert_eq!(copied.range(1, 12).unwrap(), native.range(1, 12).unwrap());
    assert_eq!(copied.checkpoints().unwrap(), reader.checkpoints().unwrap());
    let from_file =
        chitin_audit::parse_checkpoint_lines(&std::fs::read_to_string(&copy_cps).unwrap()).unwrap();
    assert_eq!(from_file, reader.checkpoints().unwrap());
    let key = signer().public_key();
    let verdict = Verifier::new(key)
        .verify_db(&copy_db, Some(&copy_cps))
        .unwrap()
        .unwrap();
    assert_eq!(
        verdict.ok_line(),
        verify(sqlite.path()).unwrap().ok_line(),
        "the same verdict as the SQLite log"
    );
    let again = reader.copy_to_sqlite(&copy_db, &copy_cps).unwrap_err();
    assert!(again.to_string().contains("exists already"), "{again}");
}
