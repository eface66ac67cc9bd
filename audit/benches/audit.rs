//! Audit throughput on this machine: durable appends (WAL, synchronous=FULL, group commit)
//! with 1 and 8 writers, blocking and pipelined, and verification speed.
//!
//! Run: `cargo bench -p chitin-audit --bench audit` (optionally `-- --quick` or `-- --verify-only`).
//! PostgreSQL (feature `postgres`, a server on 127.0.0.1:5432 or `CHITIN_TEST_PG`):
//! `cargo bench -p chitin-audit --features postgres --bench audit -- --postgres`.
//! Under `cargo test --all-targets` it only runs a few records through every path.
//! Results and method: docs/parts/BENCHMARKS.audit.md.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark"
)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use chitin_audit::export::{self, Format};
use chitin_audit::{AuditLog, AuditOptions, AuditReader, Kind, PublicKey, RecordInput, Verifier};

fn input(i: u64) -> RecordInput {
    RecordInput::new(
        Kind::Decision,
        format!("Chitin::User::\"user{}\"", i % 97),
        "exec",
        "Chitin::Tool::\"exec\"",
    )
    .with_payload(serde_json::json!({
        "argv": ["git", "status", "--porcelain"],
        "cwd": "/workspace/project",
        "request": i,
        "risk": 1,
    }))
}

fn options() -> AuditOptions {
    AuditOptions {
        checkpoint_every_records: 1000,
        ..AuditOptions::default()
    }
}

/// `writers` threads, each keeping `window` appends in flight (window 1 = plain blocking
/// `append`). Returns durable records/s.
fn appends(writers: u64, per_writer: u64, window: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(AuditLog::open(dir.path(), options()).unwrap());
    let start = Instant::now();
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut inflight = VecDeque::new();
                for i in 0..per_writer {
                    if inflight.len() >= window {
                        let p: chitin_audit::PendingReceipt = inflight.pop_front().unwrap();
                        p.wait().unwrap();
                    }
                    inflight.push_back(log.submit(input(w * per_writer + i)).unwrap());
                }
                for p in inflight {
                    p.wait().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    log.shutdown().unwrap();
    (writers * per_writer) as f64 / secs
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it:
    // then only check that every path works, on a few records.
    if !std::env::args().any(|a| a == "--bench") {
        println!("smoke run (use `cargo bench` for numbers)");
        appends(2, 3, 2);
        verify_benches(Some(500));
        #[cfg(feature = "postgres")]
        pg::appends(2, 2, 3, 2);
        return;
    }
    #[cfg(feature = "postgres")]
    if std::env::args().any(|a| a == "--postgres") {
        let scale = if std::env::args().any(|a| a == "--quick") {
            1
        } else {
            4
        };
        pg::benches(scale);
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let verify_only = std::env::args().any(|a| a == "--verify-only");
    let scale = if quick { 1 } else { 4 };
    println!("chitin-audit benchmark (WAL, synchronous=FULL, group commit)");
    if !verify_only {
        append_benches(scale);
    }
    verify_benches(quick.then_some(50_000));
}

fn append_benches(scale: u64) {
    println!(
        "1 writer, blocking append:           {:>9.0} records/s",
        appends(1, 250 * scale, 1)
    );
    println!(
        "8 writers, blocking append:          {:>9.0} records/s",
        appends(8, 250 * scale, 1)
    );
    println!(
        "1 writer, 256 in flight (submit):    {:>9.0} records/s",
        appends(1, 10_000 * scale, 256)
    );
    println!(
        "8 writers, 64 in flight each:        {:>9.0} records/s",
        appends(8, 2_500 * scale, 64)
    );
}

fn verify_benches(records: Option<u64>) {
    // Verification: a log of `n` records, checkpoints every 1000.
    let n: u64 = records.unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    {
        let log = AuditLog::open(dir.path(), options()).unwrap();
        let mut inflight = VecDeque::new();
        for i in 0..n {
            if inflight.len() >= 1024 {
                let p: chitin_audit::PendingReceipt = inflight.pop_front().unwrap();
                p.wait().unwrap();
            }
            inflight.push_back(log.submit(input(i)).unwrap());
        }
        for p in inflight {
            p.wait().unwrap();
        }
        log.shutdown().unwrap();
    }
    let key = PublicKey::load(&dir.path().join("audit.pub")).unwrap();
    let verifier = Verifier::new(key);
    let start = Instant::now();
    let report = verifier
        .verify_db(
            &dir.path().join("audit.db"),
            Some(&dir.path().join("audit.checkpoints")),
        )
        .unwrap()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(report.records, n);
    println!(
        "verify database ({n} records):   {:>9.0} records/s",
        n as f64 / secs
    );

    let reader = AuditReader::open(&dir.path().join("audit.db")).unwrap();
    let mut bytes = Vec::new();
    export::write_export(
        &reader,
        Some(&dir.path().join("audit.checkpoints")),
        None,
        None,
        Format::Jsonl,
        0,
        &mut bytes,
    )
    .unwrap();
    let start = Instant::now();
    let report = verifier.verify_export_bytes(&bytes).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(report.records, n);
    println!(
        "verify jsonl export ({} MB):        {:>9.0} records/s",
        bytes.len() / 1_000_000,
        n as f64 / secs
    );
}

/// Appends through PostgreSQL: `writers` separate `AuditLog`s (as separate gateways would be,
/// each with its own connection and writer thread) on one fresh database.
#[cfg(feature = "postgres")]
mod pg {
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::time::Instant;

    use chitin_audit::{AuditLog, AuditOptions, KeySigner, PgConfig, Verifier};

    fn server() -> String {
        std::env::var("CHITIN_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }

    fn admin() -> postgres::Client {
        postgres::Client::connect(
            &format!("{}/test?sslmode=disable", server()),
            postgres::NoTls,
        )
        .expect("PostgreSQL on 127.0.0.1:5432 (or CHITIN_TEST_PG)")
    }

    /// Durable records/s with `writers` logs × `threads` threads, each keeping `window` in
    /// flight (1 = blocking `append`).
    pub fn appends(writers: usize, threads: usize, per_thread: u64, window: usize) -> f64 {
        let mut rnd = [0u8; 8];
        getrandom::fill(&mut rnd).unwrap();
        let name = format!("chitin_audit_bench_{}", chitin_audit::to_hex(&rnd));
        admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        let config = PgConfig::from_url(&format!("{}/{name}?sslmode=disable", server())).unwrap();
        let signer: Arc<dyn chitin_audit::CheckpointSigner> =
            Arc::new(KeySigner::from_seed(&[3u8; 32]));
        let dirs: Vec<tempfile::TempDir> =
            (0..writers).map(|_| tempfile::tempdir().unwrap()).collect();
        let logs: Vec<Arc<AuditLog>> = dirs
            .iter()
            .map(|d| {
                Arc::new(
                    AuditLog::open_postgres(
                        d.path(),
                        &config,
                        AuditOptions {
                            checkpoint_every_records: 1000,
                            signer: Some(signer.clone()),
                            ..AuditOptions::default()
                        },
                    )
                    .unwrap(),
                )
            })
            .collect();
        let start = Instant::now();
        let handles: Vec<_> = logs
            .iter()
            .enumerate()
            .flat_map(|(w, log)| (0..threads).map(move |t| (w, t, log.clone())))
            .map(|(w, t, log)| {
                std::thread::spawn(move || {
                    let mut inflight = VecDeque::new();
                    for i in 0..per_thread {
                        if inflight.len() >= window {
                            let p: chitin_audit::PendingReceipt = inflight.pop_front().unwrap();
                            p.wait().unwrap();
                        }
                        let n = (w * 1_000 + t) as u64 * per_thread + i;
                        inflight.push_back(log.submit(super::input(n)).unwrap());
                    }
                    for p in inflight {
                        p.wait().unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        for log in &logs {
            log.shutdown().unwrap();
        }
        let total = writers as u64 * threads as u64 * per_thread;
        let start = Instant::now();
        let report = Verifier::new(signer.public_key())
            .verify_postgres(&config, &[])
            .unwrap()
            .unwrap();
        let verify_secs = start.elapsed().as_secs_f64();
        assert_eq!(report.records, total);
        if total >= 10_000 {
            println!(
                "  (verify_postgres of these {total} records: {:.0} records/s)",
                total as f64 / verify_secs
            );
        }
        drop(logs);
        let _ = admin().batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
        total as f64 / secs
    }

    pub fn benches(scale: u64) {
        println!("chitin-audit on PostgreSQL (synchronous_commit=on, group commit, one chain)");
        println!(
            "1 writer, blocking append:                {:>9.0} records/s",
            appends(1, 1, 250 * scale, 1)
        );
        println!(
            "1 writer, 8 threads blocking:             {:>9.0} records/s",
            appends(1, 8, 250 * scale, 1)
        );
        println!(
            "1 writer, 256 in flight:                  {:>9.0} records/s",
            appends(1, 1, 5_000 * scale, 256)
        );
        println!(
            "3 writers, 8 threads each blocking:       {:>9.0} records/s",
            appends(3, 8, 100 * scale, 1)
        );
        println!(
            "3 writers, 64 in flight each:             {:>9.0} records/s",
            appends(3, 1, 2_000 * scale, 64)
        );
    }
}
