//! Modules ported to the neutral store API (issue #18), on both backends: the prompt-file
//! taint marks and the MCP trust pins. With two `Store`s on one database (two replicas), what
//! one writes the other reads.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::sync::Arc;

use chitin::mcp::pins::Pins;
use chitin::mcp::wire::ToolDef;
use chitin::store::Store;
use chitin::tools::prompt_guard::PromptMarks;
use chitin_store::testing::TestPg;
use chitin_store::{Db, Dialect, params};
use serde_json::json;

/// A database of one backend, alive as long as the value.
struct Backend {
    t: tempfile::TempDir,
    pg: Option<TestPg>,
}

impl Backend {
    fn new(d: Dialect) -> Self {
        Self {
            t: tempfile::tempdir().unwrap(),
            pg: (d == Dialect::Postgres).then(|| TestPg::new().unwrap()),
        }
    }

    /// A replica's store: its own connection (pool) to the database.
    fn store(&self) -> Arc<Store> {
        let db = match &self.pg {
            Some(pg) => pg.db().unwrap(),
            None => Db::sqlite(&self.t.path().join("state.db")).unwrap(),
        };
        Arc::new(Store::from_db(db))
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn on_sqlite() {
                super::$name(chitin_store::Dialect::Sqlite)
            }
            #[test]
            fn on_postgres() {
                super::$name(chitin_store::Dialect::Postgres)
            }
        }
    )*};
}

on_both_backends!(
    a_prompt_files_taint_mark_is_kept_per_content_and_seen_by_another_replica,
    mcp_trust_pins_are_replaced_whole_and_seen_by_another_replica,
);

fn a_prompt_files_taint_mark_is_kept_per_content_and_seen_by_another_replica(d: Dialect) {
    let b = Backend::new(d);
    let (one, two) = (b.store(), b.store());
    let ws = Path::new("/srv/ws");
    let marks = PromptMarks::new(Arc::clone(&one)).for_run("run-1");
    let other = PromptMarks::new(Arc::clone(&two));
    assert!(!other.is_marked(ws, "AGENTS.md", "sha256:aa").unwrap());
    marks.mark(ws, "AGENTS.md", "sha256:aa", "web-1").unwrap();
    // Marked again by a later run: still one mark, and the latest record wins.
    PromptMarks::new(Arc::clone(&one))
        .for_run("run-2")
        .mark(ws, "AGENTS.md", "sha256:aa", "web-2")
        .unwrap();
    assert!(other.is_marked(ws, "AGENTS.md", "sha256:aa").unwrap());
    // Another content, another file or another workspace is not marked.
    assert!(!other.is_marked(ws, "AGENTS.md", "sha256:bb").unwrap());
    assert!(!other.is_marked(ws, "SOUL.md", "sha256:aa").unwrap());
    assert!(
        !other
            .is_marked(Path::new("/srv/other"), "AGENTS.md", "sha256:aa")
            .unwrap()
    );
    let (session, run): (String, Option<String>) = one
        .db()
        .with(|c| {
            let r = c.query_row(
                "SELECT session, run_id FROM prompt_file_taint WHERE workspace = ?1 AND name = ?2",
                params!["/srv/ws", "AGENTS.md"],
            )?;
            Ok::<_, chitin_store::Error>((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((session.as_str(), run.as_deref()), ("web-2", Some("run-2")));
    // Vouched for on one replica: cleared for both, once.
    assert!(other.clear(ws, "AGENTS.md", "sha256:aa").unwrap());
    assert!(!marks.is_marked(ws, "AGENTS.md", "sha256:aa").unwrap());
    assert!(!marks.clear(ws, "AGENTS.md", "sha256:aa").unwrap());
}

fn tool(name: &str, description: &str) -> ToolDef {
    let raw = json!({"name": name, "description": description, "inputSchema": {"type": "object"}});
    ToolDef {
        name: name.into(),
        title: None,
        description: description.into(),
        input_schema: json!({"type": "object"}),
        digest: chitin::mcp::wire::digest(&raw),
        raw,
    }
}

fn mcp_trust_pins_are_replaced_whole_and_seen_by_another_replica(d: Dialect) {
    let b = Backend::new(d);
    let (one, two) = (Pins::new(b.store()), Pins::new(b.store()));
    assert_eq!(two.get("files").unwrap(), None);
    let tools = [
        tool("read", "Reads a file"),
        tool("list", "Lists a directory"),
    ];
    one.trust(
        "files",
        "sha256:id1",
        "sha256:list1",
        &tools,
        1_000,
        "owner",
    )
    .unwrap();
    let t = two.get("files").unwrap().unwrap();
    assert_eq!(
        (
            t.identity.as_str(),
            t.list_digest.as_str(),
            t.trusted_ms,
            t.trusted_by.as_str()
        ),
        ("sha256:id1", "sha256:list1", 1_000, "owner")
    );
    assert_eq!(t.pins.len(), 2);
    assert_eq!(t.pins["read"], tools[0].digest);
    assert_eq!(t.definitions["list"], tools[1].raw);
    // Trusted again with another listing: the old pins are gone, not merged.
    let changed = [tool("read", "Reads a file, now with a twist")];
    two.trust(
        "files",
        "sha256:id2",
        "sha256:list2",
        &changed,
        2_000,
        "owner",
    )
    .unwrap();
    let t = one.get("files").unwrap().unwrap();
    assert_eq!(t.identity, "sha256:id2");
    assert_eq!(t.pins.keys().collect::<Vec<_>>(), vec!["read"]);
    assert_eq!(t.pins["read"], changed[0].digest);
    // A pinned definition edited in the database pins nothing.
    b.store()
        .db()
        .with(|c| {
            c.execute(
                "UPDATE mcp_pins SET definition = ?1 WHERE server = 'files'",
                params![json!({"name": "read", "description": "evil"}).to_string()],
            )
        })
        .unwrap();
    assert!(one.get("files").unwrap().unwrap().pins.is_empty());
    assert!(one.untrust("files").unwrap());
    assert_eq!(two.get("files").unwrap(), None);
    assert!(!two.untrust("files").unwrap());
}
