//! T-AUD-08: a writer killed with SIGKILL in the middle of appending loses nothing it
//! acknowledged, and the log still verifies after a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use chitin_audit::{AuditLog, AuditOptions};
use common::*;

const CHILD_ENV: &str = "CHITIN_AUDIT_CRASH_CHILD_DIR";

/// In the child: append from 4 threads forever, printing each acknowledged seq.
fn child(dir: &str) {
    let log = std::sync::Arc::new(
        AuditLog::open(
            std::path::Path::new(dir),
            AuditOptions {
                checkpoint_every_records: 50,
                ..AuditOptions::default()
            },
        )
        .unwrap(),
    );
    let out = std::sync::Arc::new(std::sync::Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let log = log.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for i in 0.. {
                    let r = log.append(input(t * 1_000_000 + i)).unwrap();
                    let mut o = out.lock().unwrap();
                    writeln!(o, "acked {}", r.seq).unwrap();
                    o.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn a_writer_killed_mid_append_keeps_every_acknowledged_record() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args([
                "a_writer_killed_mid_append_keeps_every_acknowledged_record",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = c.stdout.take().unwrap();
        let mut acked: Vec<i64> = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(seq) = line.strip_prefix("acked ") {
                acked.push(seq.parse().unwrap());
            }
            if acked.len() >= 150 + round * 37 {
                break;
            }
        }
        // SIGKILL: no shutdown, no final checkpoint, possibly in the middle of a commit.
        c.kill().unwrap();
        c.wait().unwrap();
        let max_acked = *acked.iter().max().unwrap();
        let records = all_records(dir.path());
        let last = records.last().unwrap().seq;
        assert!(
            last >= max_acked,
            "acknowledged {max_acked}, database ends at {last}"
        );
        for seq in &acked {
            assert!(
                records.iter().any(|r| r.seq == *seq),
                "acknowledged record {seq} lost"
            );
        }
        let report = verify(dir.path()).unwrap();
        assert_eq!(i64::try_from(report.records).unwrap(), last);
    }
    // And the log keeps working after the crashes.
    let log = AuditLog::open(dir.path(), AuditOptions::default()).unwrap();
    log.append(input(1)).unwrap();
    log.shutdown().unwrap();
    assert!(verify(dir.path()).is_ok());
}
