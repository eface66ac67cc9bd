//! The writer: durability, checkpoint cadence, fail-closed behaviour, retention, files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitin_audit::{
    AuditError, AuditHealth, AuditLog, AuditOptions, GateDecision, Kind, RecordInput, ToolRun,
};
use common::*;

#[test]
fn state_files_are_private_and_the_public_key_is_exported() {
    let (_d, home) = build_log(3, 0);
    let mode = |p: &str| {
        std::fs::metadata(home.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700);
    for f in ["audit.db", "audit.key", "audit.pub", "audit.checkpoints"] {
        assert_eq!(mode(f), 0o600, "{f}");
    }
    let text = std::fs::read_to_string(home.join("audit.pub")).unwrap();
    assert!(text.starts_with("chitin-audit-ed25519:"), "{text}");
}

#[test]
fn a_signing_key_that_does_not_match_audit_pub_is_refused() {
    let (_d, home) = build_log(1, 0);
    let other = chitin_audit::KeySigner::from_seed(&[5u8; 32]);
    let err = AuditLog::open(
        &home,
        AuditOptions {
            signer: Some(Arc::new(other)),
            ..AuditOptions::default()
        },
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("the signing key was replaced"),
        "{err}"
    );
}

#[test]
fn a_missing_signing_key_is_not_silently_replaced() {
    let (_d, home) = build_log(1, 0);
    std::fs::remove_file(home.join("audit.key")).unwrap();
    let err = AuditLog::open(&home, AuditOptions::default())
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("audit.key: is missing but"),
        "{err}"
    );
    assert!(err.to_string().contains("restore it from backup"), "{err}");
    assert!(!home.join("audit.key").exists());
}

#[test]
fn a_group_readable_key_file_is_refused() {
    let (_d, home) = build_log(1, 0);
    std::fs::set_permissions(
        home.join("audit.key"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let err = AuditLog::open(&home, AuditOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn checkpoints_are_written_every_n_records_and_every_t_seconds_even_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let (tx, rx) = std::sync::mpsc::channel::<i64>();
    let tx = Mutex::new(tx);
    let log = AuditLog::open(
        dir.path(),
        AuditOptions {
            checkpoint_every_records: 4,
            checkpoint_every_ms: 10_000,
            on_checkpoint: Some(Arc::new(move |c| {
                let _ = tx.lock().unwrap().send(c.seq);
            })),
            ..clock.options()
        },
    )
    .unwrap();
    for i in 0..9 {
        log.append(input(i)).unwrap();
    }
    // By count: 4 and 8.
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![4, 8]);
    // Record 9 is uncovered; once 10 s pass on the clock the writer checkpoints it by itself.
    clock.advance(9_000);
    assert!(rx.recv_timeout(Duration::from_millis(600)).is_err());
    clock.advance(1_001);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 9);
    // Idle: a heartbeat checkpoint of the same head every 10 s.
    clock.advance(10_000);
    assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 9);
    let cp = log.checkpoint_now().unwrap();
    assert_eq!(cp.seq, 9);
    log.shutdown().unwrap();
    let lines = std::fs::read_to_string(dir.path().join("audit.checkpoints")).unwrap();
    let cps = chitin_audit::parse_checkpoint_lines(&lines).unwrap();
    assert_eq!(
        cps.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![4, 8, 9, 9, 9]
    );
    assert_eq!(cps[3].time_ms, T0 + 20_001);
    assert!(verify(dir.path()).is_ok());
}

#[test]
fn shutdown_checkpoints_the_uncovered_tail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open(dir.path(), clock.options()).unwrap();
    log.append(input(0)).unwrap();
    let cp = log.shutdown().unwrap().unwrap();
    assert_eq!(cp.seq, 1);
    assert_eq!(verify(dir.path()).unwrap().last_checkpoint, Some(1));
}

#[test]
fn a_submitted_record_is_committed_while_its_caller_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    let pending = log.submit(input(0)).unwrap();
    let reader = log.reader().unwrap();
    // Nobody waits on `pending`: the background thread commits it (polled, generous deadline).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while reader.head().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the submitted record was never committed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(reader.head().unwrap().unwrap().0, 1);
    assert_eq!(pending.wait().unwrap().seq, 1);
    // An append commits on its own thread, after the submitted one.
    assert_eq!(log.append(input(1)).unwrap().seq, 2);
    log.shutdown().unwrap();
    assert_eq!(verify(dir.path()).unwrap().records, 2);
}

#[test]
fn appends_and_submissions_from_many_threads_form_one_chain_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(dir.path(), AuditOptions::default()).unwrap());
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..30 {
                    let n = t * 100 + i;
                    let seq = if t % 2 == 0 {
                        log.append(input(n)).unwrap().seq
                    } else {
                        log.submit(input(n)).unwrap().wait().unwrap().seq
                    };
                    seqs.push(seq);
                }
                seqs
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for h in handles {
        let mine = h.join().unwrap();
        // One thread's records are chained in the order it appended them.
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "{mine:?}");
        seqs.extend(mine);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=180).collect::<Vec<_>>());
    log.shutdown().unwrap();
    assert!(matches!(log.submit(input(999)), Err(AuditError::Closed)));
    assert_eq!(verify(dir.path()).unwrap().records, 180);
}

#[test]
fn eight_concurrent_writers_get_unique_sequence_numbers_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(dir.path(), AuditOptions::default()).unwrap());
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|i| log.append(input(t * 100 + i)).unwrap().seq)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=320).collect::<Vec<_>>());
    log.shutdown().unwrap();
    assert_eq!(verify(dir.path()).unwrap().records, 320);
}

#[test]
fn the_gate_helpers_record_decision_tool_run_and_admin_fields() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    log.append(RecordInput::gate_decision(
        "Chitin::User::\"alice\"",
        "exec",
        "Chitin::Tool::\"exec\"",
        GateDecision::ApprovalRequired,
        vec!["high-risk-needs-approval".into()],
        serde_json::json!({"argv": ["rm", "-rf", "x"]}),
    ))
    .unwrap();
    log.append(RecordInput::tool_run(
        "Chitin::User::\"alice\"",
        "exec",
        &ToolRun {
            argv: vec!["sleep".into(), "100".into()],
            limits: serde_json::json!({"wall_ms": 1000}),
            exit_code: None,
            signal: Some(9),
            killed_by: Some("wall".into()),
            duration_ms: 1001,
        },
    ))
    .unwrap();
    log.append(RecordInput::admin(
        "operator:root",
        "policy.reload",
        "policies",
        serde_json::json!({"files": 3}),
    ))
    .unwrap();
    log.append(RecordInput::approval(
        "Chitin::User::\"bob\"",
        "approval:42",
        false,
        serde_json::json!({"channel": "telegram"}),
    ))
    .unwrap();
    log.append(RecordInput::secret_use(
        "Chitin::User::\"alice\"",
        "github_token",
        "exec",
    ))
    .unwrap();
    let recs = log.reader().unwrap().range(1, 5).unwrap();
    assert_eq!(recs[3].kind, "approval");
    assert_eq!(recs[3].outcome, "rejected");
    assert_eq!(recs[4].kind, "secret_use");
    assert_eq!(recs[4].resource, "github_token");
    assert_eq!(recs[4].payload.as_deref(), Some("{\"tool\":\"exec\"}"));
    assert_eq!(recs[0].kind, "decision");
    assert_eq!(recs[0].decision, "approval_required");
    assert_eq!(recs[0].policy_ids(), vec!["high-risk-needs-approval"]);
    assert_eq!(recs[1].kind, "tool_run");
    assert_eq!(recs[1].outcome, "killed: wall");
    assert_eq!(recs[1].payload_json().unwrap()["killed_by"], "wall");
    assert_eq!(recs[2].kind, "admin");
    assert_eq!(recs[2].action, "policy.reload");
    // Payloads are stored as canonical JSON (sorted keys).
    assert!(recs[1].payload.as_ref().unwrap().starts_with("{\"argv\":"));
}

#[test]
fn a_locked_database_refuses_the_audited_action_and_readiness_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open(
        dir.path(),
        AuditOptions {
            lock_timeout: Duration::from_millis(50),
            ..clock.options()
        },
    )
    .unwrap();
    log.append(input(0)).unwrap();
    assert_eq!(log.health(), AuditHealth::Ok);

    // Another process takes the write lock and keeps it: the database is unwritable.
    let other = rusqlite::Connection::open(dir.path().join("audit.db")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let marker = dir.path().join("action-ran");
    let result = log.audited(input(1), |_| std::fs::write(&marker, b"ran").unwrap());
    match result {
        Err(AuditError::Unavailable(reason)) => {
            assert!(reason.contains("database is locked"), "{reason}")
        }
        other => panic!("expected an audit-unavailable error, got {other:?}"),
    }
    assert!(!marker.exists(), "the audited action ran without a record");
    match log.health() {
        AuditHealth::Failed { reason, since_ms } => {
            assert!(reason.contains("database is locked"), "{reason}");
            assert_eq!(since_ms, T0);
        }
        AuditHealth::Ok => panic!("readiness must report the failed audit sink"),
    }

    // Recovery: the lock goes away, the next record succeeds, and the outage is in the log.
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    clock.advance(5_000);
    let receipt = log.audited(input(2), |_| std::fs::write(&marker, b"ran").unwrap());
    assert!(receipt.is_ok());
    assert!(marker.exists());
    assert_eq!(log.health(), AuditHealth::Ok);
    log.shutdown().unwrap();
    let recs = all_records(dir.path());
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1].kind, "system");
    assert_eq!(recs[1].action, "audit.outage");
    let note = recs[1].payload_json().unwrap();
    assert_eq!(note["since_ms"], T0);
    assert_eq!(note["recovered_ms"], T0 + 5_000);
    assert!(verify(dir.path()).is_ok());
}

#[test]
fn a_full_database_refuses_the_audited_action() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(
        dir.path(),
        AuditOptions {
            max_db_bytes: Some(64 * 1024),
            checkpoint_every_records: 0,
            ..AuditOptions::default()
        },
    )
    .unwrap();
    let big = "x".repeat(4000);
    let mut refused = None;
    for i in 0..100 {
        match log.append(input(i).with_payload(serde_json::json!({ "blob": big }))) {
            Ok(_) => {}
            Err(e) => {
                refused = Some((i, e));
                break;
            }
        }
    }
    let (at, err) = refused.expect("the size cap was never hit");
    assert!(at > 0);
    assert!(
        err.to_string().contains("database or disk is full"),
        "{err}"
    );
    assert!(!log.health().is_ok());
    // Everything acknowledged before the failure is intact.
    log.shutdown().unwrap();
    assert_eq!(
        verify(dir.path()).unwrap().records,
        u64::try_from(at).unwrap()
    );
}

#[test]
fn removing_a_payload_for_retention_keeps_the_chain_valid_and_documents_it() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open(dir.path(), clock.options()).unwrap();
    for i in 0..5 {
        log.append(input(i)).unwrap();
    }
    log.checkpoint_now().unwrap();
    clock.advance(1000);
    let receipt = log
        .remove_payload(3, "retention: 30 days", "retention-job")
        .unwrap();
    assert_eq!(receipt.seq, 6);
    // Twice is refused, and the retention record's own payload cannot be removed.
    assert!(log.remove_payload(3, "again", "x").is_err());
    assert!(log.remove_payload(6, "hide", "x").is_err());
    log.shutdown().unwrap();
    let recs = all_records(dir.path());
    assert_eq!(recs[2].payload, None);
    assert_eq!(recs[2].removed_at_ms, Some(T0 + 1000));
    assert_eq!(
        recs[2].removed_reason.as_deref(),
        Some("retention: 30 days")
    );
    assert_eq!(recs[5].kind, Kind::Retention.as_str());
    assert_eq!(recs[5].resource, "audit:3");
    assert_eq!(verify(dir.path()).unwrap().records, 6);

    // Editing the documented reason is detected, on the record whose payload went.
    let (_c, h) = copy_home(dir.path());
    attacker(&h)
        .execute(
            "UPDATE records SET removed_reason = 'oops' WHERE seq = 3",
            [],
        )
        .unwrap();
    assert_tamper(verify(&h), 3, "modified field removed_reason");
}

#[test]
fn a_payload_removed_by_hand_without_a_retention_record_is_detected() {
    let (_d, home) = build_log(6, 3);
    attacker(&home)
        .execute(
            "UPDATE records SET payload = NULL, removed_at_ms = 1, removed_reason = 'cleanup' WHERE seq = 2",
            [],
        )
        .unwrap();
    assert_tamper(verify(&home), 2, "modified field payload");
}

#[test]
fn the_append_only_triggers_refuse_ordinary_updates_and_deletes() {
    let (_d, home) = build_log(3, 0);
    let db = rusqlite::Connection::open(home.join("audit.db")).unwrap();
    let upd = db.execute("UPDATE records SET actor = 'x' WHERE seq = 1", []);
    assert!(upd.unwrap_err().to_string().contains("append-only"));
    let del = db.execute("DELETE FROM records WHERE seq = 1", []);
    assert!(del.unwrap_err().to_string().contains("append-only"));
}

#[test]
fn a_second_process_appending_to_the_same_database_keeps_one_chain() {
    let dir = tempfile::tempdir().unwrap();
    let a = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    let b = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    for i in 0..10 {
        let log = if i % 2 == 0 { &a } else { &b };
        assert_eq!(
            log.append(input(i)).unwrap().seq,
            i64::try_from(i).unwrap() + 1
        );
    }
    a.shutdown().unwrap();
    b.shutdown().unwrap();
    assert_eq!(verify(dir.path()).unwrap().records, 10);
}

#[test]
fn an_unknown_kind_is_a_clear_error() {
    let err = "decisions".parse::<Kind>().unwrap_err();
    assert!(
        err.to_string().contains("use one of decision, tool_run"),
        "{err}"
    );
}

#[test]
fn the_writer_refuses_to_sign_a_checkpoint_over_a_tampered_tail() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(
        dir.path(),
        AuditOptions {
            checkpoint_every_records: 0,
            checkpoint_every_ms: 0,
            ..AuditOptions::default()
        },
    )
    .unwrap();
    for i in 0..4 {
        log.append(input(i)).unwrap();
    }
    log.checkpoint_now().unwrap();
    for i in 4..8 {
        log.append(input(i)).unwrap();
    }
    // Record 6 is not signed yet; an attacker edits it on disk.
    attacker(dir.path())
        .execute("UPDATE records SET outcome = 'deny' WHERE seq = 6", [])
        .unwrap();
    let err = log.checkpoint_now().unwrap_err();
    assert!(
        err.to_string()
            .contains("refusing to sign a checkpoint over a tampered log (tampered: first bad record 6: modified field outcome)"),
        "{err}"
    );
    match log.health() {
        AuditHealth::Failed { reason, .. } => {
            assert!(reason.contains("refusing to sign"), "{reason}")
        }
        AuditHealth::Ok => panic!("readiness must report the refused checkpoint"),
    }
}

#[test]
fn readiness_reports_a_stopped_writer() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    assert!(log.health().is_ok());
    log.shutdown().unwrap();
    assert!(!log.health().is_ok());
    assert!(matches!(log.append(input(0)), Err(AuditError::Closed)));
}

/// Clears the immutable flag again even if the test fails (root cannot delete an immutable
/// file, so the temp dir could not be cleaned up otherwise).
struct Immutable(Vec<std::path::PathBuf>);

impl Immutable {
    /// `chattr +i` on each file; `None` when the filesystem or host has no chattr support.
    fn set(files: Vec<std::path::PathBuf>) -> Option<Self> {
        for f in &files {
            let out = std::process::Command::new("chattr")
                .arg("+i")
                .arg(f)
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    eprintln!(
                        "chattr +i unsupported here: {}",
                        String::from_utf8_lossy(&o.stderr)
                    );
                    drop(Self(files.clone()));
                    return None;
                }
                Err(e) => {
                    eprintln!("chattr not available: {e}");
                    return None;
                }
            }
        }
        Some(Self(files))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(f)
                .status();
        }
    }
}

#[test]
fn an_audit_database_made_unwritable_mid_run_refuses_the_audited_action() {
    // A real I/O error, even for root: the immutable flag makes every write to the open
    // database and WAL fail with EPERM. Runs on the repository's filesystem (ext4 here).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let clock = TestClock::new(T0);
    let log = AuditLog::open(dir.path(), clock.options()).unwrap();
    log.append(input(0)).unwrap();
    let files = vec![dir.path().join("audit.db"), dir.path().join("audit.db-wal")];
    let Some(guard) = Immutable::set(files) else {
        eprintln!(
            "note: this filesystem has no immutable flag; the lock and size-cap tests cover fail-closed"
        );
        return;
    };
    let marker = dir.path().join("action-ran");
    let result = log.audited(input(1), |_| std::fs::write(&marker, b"ran").unwrap());
    let err = result.unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err:?}");
    assert!(
        err.to_string().contains("the action was not performed"),
        "{err}"
    );
    assert!(!marker.exists(), "the audited action ran without a record");
    assert!(!log.health().is_ok());

    drop(guard);
    clock.advance(1000);
    log.audited(input(2), |_| std::fs::write(&marker, b"ran").unwrap())
        .unwrap();
    assert!(marker.exists());
    assert!(log.health().is_ok());
    log.shutdown().unwrap();
    let recs = all_records(dir.path());
    assert_eq!(
        recs.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
        vec!["action0", "audit.outage", "action2"]
    );
    assert!(verify(dir.path()).is_ok());
}

#[test]
fn the_log_can_be_shared_across_threads_and_tasks() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<AuditLog>();
    shareable::<chitin_audit::Verifier>();
    shareable::<AuditHealth>();
    shareable::<AuditError>();
}
