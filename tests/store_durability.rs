//! The state database's group commit (issue #21): a commit is on disk (its WAL fsynced) before
//! the connection guard it was made under is released to the caller, commits made at the same
//! time share fsyncs, and reads wait for none.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::sync::Arc;

use chitin::store::Store;

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let t = tempfile::tempdir().unwrap();
    let s = Store::open(&t.path().join("state.db")).unwrap();
    s.conn()
        .unwrap()
        .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    (t, Arc::new(s))
}

#[test]
fn every_commit_is_fsynced_before_its_guard_is_released() {
    let (_t, s) = store();
    for i in 0..20 {
        let before = {
            let mut conn = s.conn().unwrap();
            // No other commit can take a ticket while this guard is held: this commit's
            // ticket is the next one.
            let before = s.durability().commits;
            let tx = conn.transaction().unwrap();
            tx.execute("INSERT INTO t (v) VALUES (?1)", [format!("row {i}")])
                .unwrap();
            tx.commit().unwrap();
            before
        };
        let d = s.durability();
        assert_eq!(d.commits, before + 1);
        assert!(d.synced > before, "{d:?}");
    }
}

#[test]
fn commits_from_many_threads_are_each_durable_when_acknowledged() {
    let (_t, s) = store();
    let threads: Vec<_> = (0..8)
        .map(|k| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..25 {
                    let before = {
                        let conn = s.conn().unwrap();
                        let before = s.durability().commits;
                        conn.execute("INSERT INTO t (v) VALUES (?1)", [format!("{k}-{i}")])
                            .unwrap();
                        before
                    };
                    assert!(s.durability().synced > before);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let d = s.durability();
    // The table's creation was one commit too.
    assert_eq!(d.commits, 201);
    assert_eq!(d.synced, d.commits);
    assert!(d.fsyncs <= d.commits, "{d:?}");
    let n: i64 = s
        .conn()
        .unwrap()
        .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 200);
}

#[test]
fn reading_takes_no_ticket_and_waits_for_no_fsync() {
    let (_t, s) = store();
    let before = s.durability();
    let n: i64 = s
        .conn()
        .unwrap()
        .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(s.durability(), before);
}

#[test]
fn a_rolled_back_transaction_takes_no_ticket() {
    let (_t, s) = store();
    let before = s.durability();
    {
        let mut conn = s.conn().unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute("INSERT INTO t (v) VALUES ('gone')", []).unwrap();
        drop(tx);
    }
    assert_eq!(s.durability(), before);
}

#[test]
fn what_was_committed_is_there_after_the_store_is_opened_again() {
    let (t, s) = store();
    s.conn()
        .unwrap()
        .execute("INSERT INTO t (v) VALUES ('kept')", [])
        .unwrap();
    drop(s);
    let again = Store::open(&t.path().join("state.db")).unwrap();
    let v: String = again
        .conn()
        .unwrap()
        .query_row("SELECT v FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, "kept");
}
