//! Several gateway processes on one PostgreSQL audit log: each child process is a writer
//! (`AuditLog::open_postgres` in its own state directory, the deployment's key), the parent
//! appends from two more writers at the same time, and the result is one gap-free chain that
//! verifies with every writer's checkpoint file.
//!
//! Runs without the libtest harness: the same binary is the test (no arguments) and the child
//! writer (`--append-child`), so the children need no separate helper binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common_pg;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use chitin_audit::{
    AuditLog, AuditOptions, AuditReader, CheckpointSigner, KeySigner, Kind, PgConfig, RecordInput,
    Verifier,
};
use common_pg::TestDb;

const SEED: [u8; 32] = [5u8; 32];
const CHILDREN: usize = 3;
const PER_CHILD: usize = 150;
const IN_PROCESS: usize = 2;
const PER_IN_PROCESS: usize = 100;

fn signer() -> Arc<dyn CheckpointSigner> {
    Arc::new(KeySigner::from_seed(&SEED))
}

/// One writer: `count` records from `name`, up to 16 in flight.
fn write(dir: &Path, url: &str, name: &str, count: usize) {
    let log = AuditLog::open_postgres(
        dir,
        &PgConfig::from_url(url).unwrap(),
        AuditOptions {
            checkpoint_every_records: 100,
            signer: Some(signer()),
            ..AuditOptions::default()
        },
    )
    .unwrap();
    let mut inflight = VecDeque::new();
    for i in 0..count {
        if inflight.len() >= 16 {
            let p: chitin_audit::PendingReceipt = inflight.pop_front().unwrap();
            p.wait().unwrap();
        }
        let rec = RecordInput::new(Kind::Decision, name, format!("action{i}"), "audit-test")
            .with_payload(serde_json::json!({ "writer": name, "i": i }));
        inflight.push_back(log.submit(rec).unwrap());
    }
    for p in inflight {
        p.wait().unwrap();
    }
    log.shutdown().unwrap();
}

fn child(args: &[String]) {
    let [_, dir, url, name, count] = args else {
        panic!("usage: --append-child DIR URL NAME COUNT");
    };
    write(Path::new(dir), url, name, count.parse().unwrap());
}

fn several_gateway_processes_append_one_gap_free_chain_that_verifies() {
    let db = TestDb::new();
    let dirs: Vec<tempfile::TempDir> = (0..CHILDREN + IN_PROCESS)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    // Create the tables first, so every writer starts on the same schema.
    drop(
        AuditLog::open_postgres(
            dirs[0].path(),
            &db.config(),
            AuditOptions {
                signer: Some(signer()),
                ..AuditOptions::default()
            },
        )
        .unwrap(),
    );
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..CHILDREN)
        .map(|c| {
            Command::new(&exe)
                .arg("--append-child")
                .arg(dirs[c].path())
                .arg(db.url())
                .arg(format!("process{c}"))
                .arg(PER_CHILD.to_string())
                .stdin(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let url = db.url();
    let threads: Vec<_> = (0..IN_PROCESS)
        .map(|t| {
            let dir = dirs[CHILDREN + t].path().to_path_buf();
            let url = url.clone();
            std::thread::spawn(move || write(&dir, &url, &format!("thread{t}"), PER_IN_PROCESS))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for mut c in children {
        let status = c.wait().unwrap();
        assert!(status.success(), "a child writer failed: {status}");
    }

    let total = CHILDREN * PER_CHILD + IN_PROCESS * PER_IN_PROCESS;
    let reader = AuditReader::open_postgres(&db.config()).unwrap();
    let all = reader.range(i64::MIN, i64::MAX).unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=i64::try_from(total).unwrap()).collect::<Vec<_>>(),
        "one gap-free sequence"
    );
    for w in (0..CHILDREN)
        .map(|c| format!("process{c}"))
        .chain((0..IN_PROCESS).map(|t| format!("thread{t}")))
    {
        let mine: Vec<_> = all.iter().filter(|r| r.actor == w).collect();
        let expected = if w.starts_with("process") {
            PER_CHILD
        } else {
            PER_IN_PROCESS
        };
        assert_eq!(mine.len(), expected, "{w}");
        // Each writer's records are in its own submission order.
        let order: Vec<String> = mine.iter().map(|r| r.action.clone()).collect();
        let want: Vec<String> = (0..expected).map(|i| format!("action{i}")).collect();
        assert_eq!(order, want, "{w}");
    }
    let witnesses: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.path().join("audit.checkpoints"))
        .collect();
    for w in &witnesses[..CHILDREN] {
        assert!(
            !std::fs::read_to_string(w).unwrap().is_empty(),
            "every child signed at least its shutdown checkpoint"
        );
    }
    let files: Vec<&Path> = witnesses.iter().map(PathBuf::as_path).collect();
    let report = Verifier::new(signer().public_key())
        .verify_postgres(&db.config(), &files)
        .unwrap()
        .unwrap();
    assert_eq!(report.records, u64::try_from(total).unwrap());
    assert_eq!(report.last_checkpoint, Some(i64::try_from(total).unwrap()));
    assert_eq!(report.uncovered, 0);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--append-child") {
        child(&args);
        return;
    }
    // `cargo test -- --list` and filters: this file holds one test.
    if args.iter().any(|a| a == "--list") {
        println!("several_gateway_processes_append_one_gap_free_chain_that_verifies: test");
        return;
    }
    let name = "several_gateway_processes_append_one_gap_free_chain_that_verifies";
    if let Some(filter) = args.iter().find(|a| !a.starts_with('-'))
        && !name.contains(filter.as_str())
    {
        println!("running 0 tests (filtered out: {name})");
        return;
    }
    println!("running 1 test");
    several_gateway_processes_append_one_gap_free_chain_that_verifies();
    println!("test {name} ... ok");
}
