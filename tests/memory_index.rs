//! The memory index (`tools::memory`) on both backends: the same hits and the same BM25
//! scores from FTS5 (SQLite) and from the SQL over `memory_fts` / `memory_terms`
//! (PostgreSQL); erasure and retention leave no document and no index term of what they
//! delete; two replicas indexing one user at once index each message once.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use std::path::PathBuf;
use std::sync::Arc;

use chitin::config::retention::{Period, RetentionConfig};
use chitin::lifecycle::{erase, retention};
use chitin::store::{Dialect, Store, params};
use chitin::tools::memory::{Hit, MemoryIndex, Sealing};
use chitin::vault::{Subject, Vault};
use lifecycle_support::*;
use serde_json::json;

/// Runs each named test (`fn name(d: Dialect)`) on SQLite and on a fresh PostgreSQL database.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn on_sqlite() {
                super::$name(chitin::store::Dialect::Sqlite)
            }
            #[test]
            fn on_postgres() {
                super::$name(chitin::store::Dialect::Postgres)
            }
        }
    )*};
}

on_both_backends!(
    memory_search_finds_the_asking_users_files_and_transcripts_only,
    erasing_a_user_leaves_no_memory_document_and_no_index_term_of_theirs,
    retention_removes_the_index_terms_of_the_messages_it_deletes,
    two_replicas_syncing_one_users_index_at_once_index_each_message_once,
);

/// The index's keys sealed with the vault, as the agent does.
struct VaultSealing(Arc<Vault>);

impl Sealing for VaultSealing {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        self.0.seal(subject, plaintext).map_err(|e| e.to_string())
    }
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        self.0.open(subject, sealed).map_err(|e| e.to_string())
    }
}

fn index_on(h: &H, store: Arc<Store>) -> MemoryIndex {
    MemoryIndex::new(store, Arc::new(VaultSealing(Arc::clone(&h.lc.vault))))
}

fn index(h: &H) -> MemoryIndex {
    index_on(h, Arc::clone(&h.lc.store))
}

/// A transcript message as the agent stores it (`{"role", "text"}` sealed for the subject).
fn said(h: &H, session: &str, who: &str, seq: i64, role: &str, at: i64, text: &str) -> i64 {
    let subject = user(who);
    let body = json!({"role": role, "text": text}).to_string();
    let sealed = h.lc.vault.seal(&subject, body.as_bytes()).unwrap();
    h.lc.store
        .db()
        .with(|c| {
            c.query_row(
                "INSERT INTO messages (session_key, run_id, subject, seq, role, class, created_ms, size, body)
                 VALUES (?1, NULL, ?2, ?3, ?4, 'transcript', ?5, ?6, ?7) RETURNING id",
                params![session, subject, seq, role, at, i64::try_from(body.len()).unwrap(), sealed],
            )?
            .get::<i64>(0)
        })
        .unwrap()
}

fn workspace(h: &H) -> PathBuf {
    let ws = h.home.parent().unwrap().join("ws");
    std::fs::create_dir_all(ws.join("memory")).unwrap();
    std::fs::write(
        ws.join("MEMORY.md"),
        "# Memory\nThe pineapple garden is in Lisbon.\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("memory/2026-01-05.md"),
        "Bought seeds; nothing about fruit.\n",
    )
    .unwrap();
    std::fs::write(
        ws.join("memory/notes.md"),
        "Launch checklist: the launch window opens at dawn; pineapple crates to the launch pad.\n",
    )
    .unwrap();
    ws
}

/// The owner's and Alice's conversations (the same rows, in the same order, on each backend).
fn corpus(h: &H) -> PathBuf {
    session(h, "s-old", &user("owner"), "owner", T0, None);
    session(h, "s-alice", &user("alice"), "alice", T0, None);
    said(
        h,
        "s-old",
        "owner",
        1,
        "user",
        T0,
        "remember: the launch code is pineapple-42",
    );
    said(
        h,
        "s-old",
        "owner",
        2,
        "assistant",
        T0 + 1,
        "Noted: launch code pineapple 42.",
    );
    said(
        h,
        "s-old",
        "owner",
        3,
        "user",
        T0 + 2,
        "Also the garden needs water every morning, garden hose is blue",
    );
    said(
        h,
        "s-old",
        "owner",
        4,
        "assistant",
        T0 + 3,
        "I will remember the garden and the hose.",
    );
    said(
        h,
        "s-old",
        "owner",
        5,
        "user",
        T0 + 4,
        "pineapple pineapple pineapple, I really like pineapple juice in the morning",
    );
    said(
        h,
        "s-old",
        "owner",
        6,
        "user",
        T0 + 5,
        "Lisbon trip: flights booked, hotel near the river, no fruit market visit",
    );
    said(
        h,
        "s-alice",
        "alice",
        1,
        "user",
        T0 + 6,
        "my pineapple secret is alice-only-77",
    );
    said(
        h,
        "s-alice",
        "alice",
        2,
        "user",
        T0 + 7,
        "alice has a launch too, garden party in Lisbon",
    );
    workspace(h)
}

fn search(h: &H, ws: &std::path::Path, who: &str, q: &str) -> Vec<Hit> {
    index(h).search(who, ws, q, 50).unwrap()
}

fn memory_search_finds_the_asking_users_files_and_transcripts_only(d: Dialect) {
    let h = harness_on(d);
    let ws = corpus(&h);
    let hits = search(&h, &ws, "owner", "Pineapple");
    let paths: Vec<&str> = hits.iter().map(|x| x.path.as_str()).collect();
    assert!(paths.contains(&"MEMORY.md"), "{paths:?}");
    assert!(paths.contains(&"transcript:s-old#1"), "{paths:?}");
    assert!(paths.contains(&"memory/notes.md"), "{paths:?}");
    assert!(!paths.contains(&"memory/2026-01-05.md"), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("s-alice")), "{paths:?}");
    // The message that says it four times ranks first.
    assert_eq!(paths[0], "transcript:s-old#5", "{hits:?}");
    let garden = hits.iter().find(|x| x.path == "MEMORY.md").unwrap();
    assert!(garden.snippet.contains("pineapple garden"), "{garden:?}");
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "{hits:?}"
    );
    // Alice finds her own message, never the owner's.
    let alice = search(&h, &ws, "alice", "pineapple");
    let paths: Vec<&str> = alice.iter().map(|x| x.path.as_str()).collect();
    assert!(paths.contains(&"transcript:s-alice#1"), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("s-old")), "{paths:?}");
}

#[test]
fn memory_search_ranks_with_the_same_bm25_scores_on_sqlite_and_postgres() {
    let lite = harness_on(Dialect::Sqlite);
    let pg = harness_on(Dialect::Postgres);
    let (ws_lite, ws_pg) = (corpus(&lite), corpus(&pg));
    for q in [
        "pineapple",
        "launch code",
        "garden",
        "Lisbon fruit",
        "pineapple garden launch morning",
        "hose",
        "nothing matches this",
    ] {
        for who in ["owner", "alice"] {
            let a = search(&lite, &ws_lite, who, q);
            let b = search(&pg, &ws_pg, who, q);
            let key = |hits: &[Hit]| {
                let mut v: Vec<(String, f64)> =
                    hits.iter().map(|x| (x.path.clone(), x.score)).collect();
                // Equal scores may come in either order (FTS5 does not break ties).
                v.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
                v
            };
            let (ka, kb) = (key(&a), key(&b));
            assert_eq!(
                ka.iter().map(|x| &x.0).collect::<Vec<_>>(),
                kb.iter().map(|x| &x.0).collect::<Vec<_>>(),
                "{who}: {q}: {ka:?} / {kb:?}"
            );
            for ((p, sa), (_, sb)) in ka.iter().zip(&kb) {
                assert!(
                    (sa - sb).abs() <= 1e-9 * sa.abs().max(1.0),
                    "{who}: {q}: {p}: FTS5 {sa}, PostgreSQL {sb}"
                );
            }
            // The order as returned is by score on both.
            assert!(b.windows(2).all(|w| w[0].score >= w[1].score), "{b:?}");
            if q == "pineapple" {
                assert!(!ka.is_empty(), "{who}: control");
            }
        }
    }
}

/// How many index entries hold `term` (FTS5 on SQLite, `memory_terms` on PostgreSQL).
fn entries_of(h: &H, term: &str) -> i64 {
    h.lc.store
        .db()
        .with(|c| {
            let (sql, p) = match c.dialect() {
                Dialect::Sqlite => (
                    "SELECT COUNT(*) FROM memory_fts WHERE memory_fts MATCH ?1",
                    format!("\"{term}\""),
                ),
                Dialect::Postgres => (
                    "SELECT COUNT(*) FROM memory_terms WHERE term = ?1",
                    term.to_string(),
                ),
            };
            c.query_row(sql, params![p])?.get::<i64>(0)
        })
        .unwrap()
}

/// Index rows without their document (none may be left behind by a delete).
fn orphans(h: &H) -> i64 {
    let fts = count(
        h,
        "SELECT COUNT(*) FROM memory_fts WHERE rowid NOT IN (SELECT id FROM memory_docs)",
    );
    let terms = match h.lc.store.db().dialect() {
        Dialect::Postgres => count(
            h,
            "SELECT COUNT(*) FROM memory_terms WHERE doc NOT IN (SELECT id FROM memory_docs)",
        ),
        Dialect::Sqlite => 0,
    };
    fts + terms
}

fn erasing_a_user_leaves_no_memory_document_and_no_index_term_of_theirs(d: Dialect) {
    let h = harness_on(d);
    let ws = corpus(&h);
    assert!(!search(&h, &ws, "alice", "pineapple").is_empty());
    assert!(!search(&h, &ws, "owner", "pineapple").is_empty());
    let ix = index(&h);
    let alice_terms: Vec<String> = ["pineapple", "secret", "alice", "77", "garden", "lisbon"]
        .iter()
        .map(|w| ix.term_for("alice", w).unwrap())
        .collect();
    let owner_term = ix.term_for("owner", "pineapple").unwrap();
    assert!(
        alice_terms.iter().all(|t| entries_of(&h, t) >= 1),
        "control"
    );
    let s = Subject::parse(&user("alice")).unwrap();
    erase::erase(&h.lc, &s, "op", false).unwrap();
    for t in &alice_terms {
        assert_eq!(entries_of(&h, t), 0, "an index term of Alice's is left");
    }
    let subject = user("alice");
    for table in ["memory_docs", "memory_index_keys", "memory_cursor"] {
        let n =
            h.lc.store
                .db()
                .with(|c| {
                    c.query_row(
                        &format!("SELECT COUNT(*) FROM {table} WHERE subject = ?1"),
                        params![subject],
                    )?
                    .get::<i64>(0)
                })
                .unwrap();
        assert_eq!(n, 0, "{table}");
    }
    assert_eq!(orphans(&h), 0);
    // The owner's index is intact.
    assert!(entries_of(&h, &owner_term) >= 1);
    assert!(!search(&h, &ws, "owner", "pineapple").is_empty());
}

fn retention_removes_the_index_terms_of_the_messages_it_deletes(d: Dialect) {
    let h = harness_on(d);
    let ws = corpus(&h);
    let now = T0 + 100 * DAY;
    h.clock.set(now);
    said(
        &h,
        "s-old",
        "owner",
        7,
        "user",
        now - DAY,
        "kumquat season started",
    );
    assert!(!search(&h, &ws, "owner", "pineapple hose kumquat").is_empty());
    let ix = index(&h);
    let (old, young) = (
        ix.term_for("owner", "hose").unwrap(),
        ix.term_for("owner", "kumquat").unwrap(),
    );
    assert!(
        entries_of(&h, &old) >= 1 && entries_of(&h, &young) >= 1,
        "control"
    );
    let cfg = RetentionConfig {
        transcripts: Period::Ms(90 * DAY),
        ..RetentionConfig::default()
    };
    let r = retention::run(&h.lc, &cfg, "retention:test", false).unwrap();
    assert!(
        r.classes
            .iter()
            .any(|c| c.class == "transcripts" && c.deleted == 8),
        "{r:?}"
    );
    assert_eq!(
        entries_of(&h, &old),
        0,
        "the deleted message's term is left"
    );
    assert_eq!(entries_of(&h, &young), 1);
    assert_eq!(orphans(&h), 0);
    let hits = search(&h, &ws, "owner", "pineapple hose kumquat");
    assert!(
        hits.iter()
            .all(|x| x.source == "file" || x.path == "transcript:s-old#7"),
        "{hits:?}"
    );
}

fn two_replicas_syncing_one_users_index_at_once_index_each_message_once(d: Dialect) {
    let h = harness_on(d);
    let ws = corpus(&h);
    for i in 0..40 {
        said(
            &h,
            "s-old",
            "owner",
            100 + i,
            "user",
            T0 + 10 + i,
            &format!("note number {i} about pineapple"),
        );
    }
    let a = index(&h);
    let b = index_on(&h, second_store(&h));
    std::thread::scope(|sc| {
        let t1 = sc.spawn(|| a.sync("owner", &ws));
        let t2 = sc.spawn(|| b.sync("owner", &ws));
        t1.join().unwrap().unwrap();
        t2.join().unwrap().unwrap();
    });
    let owner = user("owner");
    let docs = h.lc.store
        .db()
        .with(|c| {
            c.query_row(
                "SELECT COUNT(*), COUNT(DISTINCT message_id) FROM memory_docs WHERE subject = ?1 AND kind = 'transcript'",
                params![owner],
            )
            .and_then(|r| Ok((r.get::<i64>(0)?, r.get::<i64>(1)?)))
        })
        .unwrap();
    assert_eq!(docs, (46, 46));
    let files = count(&h, "SELECT COUNT(*) FROM memory_docs WHERE kind = 'file'");
    assert_eq!(files, 3);
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM memory_fts"),
        count(&h, "SELECT COUNT(*) FROM memory_docs")
    );
    assert_eq!(orphans(&h), 0);
    let hits = a.search("owner", &ws, "pineapple", 50).unwrap();
    assert_eq!(
        hits.iter()
            .filter(|x| x.path.starts_with("transcript:s-old#1"))
            .count(),
        41,
        "{hits:?}"
    );
}
