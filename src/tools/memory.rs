//! `memory_search` and `memory_get`: the user's memory files (`MEMORY.md`, `memory/**/*.md`
//! in the workspace, read through [`crate::wsfs`]) and their past transcripts, through a
//! per-user full-text index in the state store: SQLite FTS5, or on PostgreSQL two plain tables
//! (`memory_fts (rowid, length)`, `memory_terms (term, doc, tf)`) from which the search computes
//! FTS5's BM25 in SQL (see [`MemoryIndex::search`]).
//!
//! Invariants:
//! - The index never holds a plaintext term: each word is stored as a keyed hash
//!   (HMAC-SHA-256 under a random per-user index key, itself sealed with the user's data key
//!   in the vault). A query is hashed the same way; snippets come from decrypting the hit
//!   (only the asking user's messages are opened). One user's terms cannot match another's.
//! - Searches and reads only ever return the asking user's data: transcript documents are
//!   filtered by the user's subject, a `transcript:` reference names a session that must be
//!   theirs, files come from the call's workspace.
//! - The index is covered by retention and erasure: deleting a transcript message deletes its
//!   document and that document's index entries (triggers, migration "memory index"), FTS5
//!   `secure-delete` removes them from the index pages, erasure deletes the user's
//!   documents, key and cursor (and destroys the data key that sealed the index key).
//! - Updated incrementally before each search: transcript messages after the user's cursor,
//!   memory files whose content changed (compared by keyed digest), files gone.
//! - Decided before anything is read: Cedar `memory_search` (the query) and `memory_get`
//!   (`source`, the file's canonical path with the derived `memory_file`, or the session).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::gated::{self, Gated};
use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult};
use crate::approvals::Approvals;
use crate::gate::{Authorized, CallContext, Gate, StepContext};
use crate::policy::{Action, PolicyRequest, Tool};
use crate::store::{Dialect, Store, params};

/// A stored message as the index reads it: id, session key, seq, role, created, sealed body.
type MessageRow = (i64, String, i64, String, i64, Vec<u8>);

/// Results returned when the model does not say, and the most.
pub const DEFAULT_LIMIT: u32 = 8;
pub const MAX_LIMIT: u32 = 50;
/// The longest query.
pub const MAX_QUERY_CHARS: usize = 400;
/// Memory files larger than this are indexed up to it; `memory_get` returns up to it.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Memory files indexed per workspace (the rest are skipped, and the answer says so).
pub const MAX_FILES: usize = 2000;
const MAX_DEPTH: usize = 8;
const SNIPPET_CHARS: usize = 240;
/// Transcript messages indexed per batch (one transaction each).
const BATCH: i64 = 500;

/// What the model is told.
pub const SEARCH_DESCRIPTION: &str = "Search your memory: the memory files (MEMORY.md, memory/*.md) and your past conversations. Returns ranked hits with a snippet and a `path` to read in full with memory_get.";
pub const GET_DESCRIPTION: &str = "Read one memory file (MEMORY.md or memory/...md) or one past message (`transcript:<session>#<seq>`, as memory_search returns it).";

pub fn search_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["query"], "properties": {
        "query": {"type": "string", "description": "words to look for"},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
    }})
}

pub fn get_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["path"], "properties": {
        "path": {"type": "string", "description": "MEMORY.md, memory/<file>.md, or transcript:<session>#<seq>"}
    }})
}

/// `memory_search` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySearchArgs {
    pub query: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `memory_get` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryGetArgs {
    pub path: String,
}

/// Seals and opens content with a data subject's key (the vault).
pub trait Sealing: Send + Sync {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String>;
}

/// Errors of the memory index; sentences for the model or the operator.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("state database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("state database: {0}")]
    Db(#[from] chitin_store::Error),
    #[error("the memory index key cannot be sealed or opened: {0}")]
    Key(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// The data subject of a user (as `sessions.subject` and `messages.subject` name it).
pub fn subject_of(user: &str) -> String {
    format!("Chitin::User::{}", Value::String(user.to_string()))
}

/// What a reference in `memory_get` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryRef {
    /// A workspace-relative memory file.
    File(String),
    /// A message of a session.
    Transcript { session: String, seq: i64 },
}

impl MemoryRef {
    /// Parses `transcript:<session>#<seq>` or a workspace-relative memory file path
    /// (`MEMORY.md`, `memory/...md`; lexically, without `..`).
    pub fn parse(p: &str) -> Result<Self, String> {
        if let Some(rest) = p.strip_prefix("transcript:") {
            let (session, seq) = rest
                .rsplit_once('#')
                .ok_or("a transcript reference is `transcript:<session>#<seq>`")?;
            let seq: i64 = seq
                .parse()
                .map_err(|_| "the message number after `#` must be a number")?;
            if session.is_empty() {
                return Err("the transcript reference names no session".into());
            }
            return Ok(Self::Transcript {
                session: session.to_string(),
                seq,
            });
        }
        let path = p.trim_start_matches("./");
        let lower = path.to_ascii_lowercase();
        let parts: Vec<&str> = path.split('/').collect();
        if path.contains('\0')
            || parts
                .iter()
                .any(|c| c.is_empty() || *c == "." || *c == "..")
        {
            return Err(format!(
                "`{}` is not a memory file path; use MEMORY.md or memory/<file>.md",
                p.escape_default()
            ));
        }
        let is_memory = lower == "memory.md"
            || (lower.starts_with("memory/") && lower.ends_with(".md") && parts.len() >= 2);
        if !is_memory {
            return Err(format!(
                "`{}` is not a memory file (MEMORY.md or memory/**/*.md); read other files with read_file",
                p.escape_default()
            ));
        }
        Ok(Self::File(path.to_string()))
    }
}

/// Words of a text with their byte ranges: maximal runs of alphanumeric characters, lower
/// case, 1 to 64 characters.
fn words(text: &str) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let push = |out: &mut Vec<(usize, usize, String)>, s: usize, e: usize| {
        let w = text[s..e].to_lowercase();
        if w.chars().count() <= 64 {
            out.push((s, e, w));
        }
    };
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            start.get_or_insert(i);
        } else if let Some(s) = start.take() {
            push(&mut out, s, i);
        }
    }
    if let Some(s) = start {
        push(&mut out, s, text.len());
    }
    out
}

/// The per-user index.
pub struct MemoryIndex {
    store: Arc<Store>,
    sealing: Arc<dyn Sealing>,
}

impl std::fmt::Debug for MemoryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryIndex").finish_non_exhaustive()
    }
}

/// One hit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// What to pass to `memory_get`.
    pub path: String,
    /// `file` | `transcript`.
    pub source: &'static str,
    pub snippet: String,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    pub created_ms: i64,
}

type Key = Zeroizing<[u8; 32]>;

impl MemoryIndex {
    pub fn new(store: Arc<Store>, sealing: Arc<dyn Sealing>) -> Self {
        Self { store, sealing }
    }

    /// The user's index key (made and stored sealed on first use).
    fn key(&self, subject: &str) -> Result<Key, MemoryError> {
        let read = |c: &mut chitin_store::Conn<'_>| -> Result<Option<Vec<u8>>, MemoryError> {
            Ok(c.query_opt(
                "SELECT sealed FROM memory_index_keys WHERE subject = ?1",
                params![subject],
            )?
            .map(|r| r.get::<Vec<u8>>(0))
            .transpose()?)
        };
        let sealed = self.store.db().with(read)?;
        let bytes = match sealed {
            Some(s) => self.sealing.open(subject, &s).map_err(MemoryError::Key)?,
            None => {
                let mut k = Zeroizing::new(vec![0u8; 32]);
                getrandom::fill(&mut k).map_err(|e| MemoryError::Key(e.to_string()))?;
                let sealed = self.sealing.seal(subject, &k).map_err(MemoryError::Key)?;
                let stored = self.store.db().with(|c| {
                    c.execute(
                        "INSERT INTO memory_index_keys (subject, sealed) VALUES (?1, ?2)
                         ON CONFLICT(subject) DO NOTHING",
                        params![subject, sealed],
                    )?;
                    // Another process (or replica) may have won the race: use the stored one.
                    read(c)
                })?;
                let stored = stored.ok_or_else(|| {
                    MemoryError::Key("the index key was not stored; try again".into())
                })?;
                self.sealing
                    .open(subject, &stored)
                    .map_err(MemoryError::Key)?
            }
        };
        let mut key: Key = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(MemoryError::Key(
                "the stored index key has the wrong length".into(),
            ));
        }
        key.copy_from_slice(&bytes);
        Ok(key)
    }

    fn mac(key: &Key, domain: &[u8], data: &[u8]) -> Result<[u8; 32], MemoryError> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key.as_slice())
            .map_err(|e| MemoryError::Key(e.to_string()))?;
        m.update(domain);
        m.update(data);
        Ok(m.finalize().into_bytes().into())
    }

    /// The indexed form of one (lower-case) word: `t` and 20 hex digits of its keyed hash.
    fn term(key: &Key, word: &str) -> Result<String, MemoryError> {
        let h = Self::mac(key, b"chitin-memory-term-v1\0", word.as_bytes())?;
        let mut s = String::from("t");
        for b in &h[..10] {
            s.push_str(&format!("{b:02x}"));
        }
        Ok(s)
    }

    /// The indexed form of `word` for `user` (what the raw index holds for it).
    pub fn term_for(&self, user: &str, word: &str) -> Result<String, MemoryError> {
        let key = self.key(&subject_of(user))?;
        Self::term(&key, &word.to_lowercase())
    }

    fn terms(key: &Key, text: &str) -> Result<Vec<String>, MemoryError> {
        words(text)
            .into_iter()
            .map(|(_, _, w)| Self::term(key, &w))
            .collect()
    }

    /// Indexes document `doc` with its terms: one FTS5 row (the terms space-separated) on
    /// SQLite; on PostgreSQL its length and one `memory_terms` row per distinct term with its
    /// count (what FTS5's BM25 reads from its own index).
    fn index_doc(
        c: &mut chitin_store::Conn<'_>,
        doc: i64,
        terms: &[String],
    ) -> Result<(), MemoryError> {
        if c.dialect() == Dialect::Sqlite {
            c.execute(
                "INSERT INTO memory_fts (rowid, terms) VALUES (?1, ?2)",
                params![doc, terms.join(" ")],
            )?;
            return Ok(());
        }
        let length = i64::try_from(terms.len()).unwrap_or(i64::MAX);
        c.execute(
            "INSERT INTO memory_fts (rowid, length) VALUES (?1, ?2)",
            params![doc, length],
        )?;
        let mut tf: std::collections::BTreeMap<&str, i64> = std::collections::BTreeMap::new();
        for t in terms {
            *tf.entry(t.as_str()).or_default() += 1;
        }
        let tf: Vec<(&str, i64)> = tf.into_iter().collect();
        for part in tf.chunks(500) {
            let mut sql = String::from("INSERT INTO memory_terms (term, doc, tf) VALUES ");
            let mut vals: Vec<chitin_store::Value> = Vec::with_capacity(part.len() * 3);
            for (i, (t, n)) in part.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("(?{}, ?{}, ?{})", i * 3 + 1, i * 3 + 2, i * 3 + 3));
                vals.push(chitin_store::Value::Text((*t).to_string()));
                vals.push(chitin_store::Value::Int(doc));
                vals.push(chitin_store::Value::Int(*n));
            }
            let refs: Vec<&dyn chitin_store::ToValue> = vals
                .iter()
                .map(|v| v as &dyn chitin_store::ToValue)
                .collect();
            c.execute(&sql, &refs)?;
        }
        Ok(())
    }

    /// Serializes the index updates of one subject for the rest of the transaction: on
    /// PostgreSQL across replicas (an advisory lock); on SQLite the transaction takes the write
    /// lock before it reads (a no-op write first, waiting for another connection's writer as
    /// an immediate transaction would).
    fn lock_subject(c: &mut chitin_store::Conn<'_>, subject: &str) -> Result<(), MemoryError> {
        if c.dialect() == Dialect::Sqlite {
            c.execute(
                "UPDATE memory_cursor SET last_message_id = last_message_id WHERE subject = ?1",
                params![subject],
            )?;
        } else {
            let h = chitin_audit::sha256(format!("chitin-memory-index\0{subject}").as_bytes());
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[..8]);
            c.execute(
                "SELECT pg_advisory_xact_lock(?1)",
                params![i64::from_be_bytes(b)],
            )?;
        }
        Ok(())
    }

    /// Brings the user's index up to date: new transcript messages, changed memory files.
    pub fn sync(&self, user: &str, workspace: &Path) -> Result<(), MemoryError> {
        let subject = subject_of(user);
        let key = self.key(&subject)?;
        self.sync_transcripts(&subject, &key)?;
        self.sync_files(&subject, &key, workspace)
    }

    fn sync_transcripts(&self, subject: &str, key: &Key) -> Result<(), MemoryError> {
        loop {
            let more = self.store.db().tx(|tx| {
                Self::lock_subject(tx, subject)?;
                let cursor: i64 = tx
                    .query_opt(
                        "SELECT last_message_id FROM memory_cursor WHERE subject = ?1",
                        params![subject],
                    )?
                    .map(|r| r.get::<i64>(0))
                    .transpose()?
                    .unwrap_or(0);
                let rows = tx.query_map(
                    "SELECT id, session_key, seq, role, created_ms, body FROM messages
                     WHERE subject = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                    params![subject, cursor, BATCH],
                    |r| -> Result<MessageRow, MemoryError> {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                    },
                )?;
                let Some(last) = rows.last().map(|r| r.0) else {
                    return Ok::<_, MemoryError>(false);
                };
                for (id, session, seq, role, created, body) in &rows {
                    // A message that cannot be opened (its key destroyed) has nothing to index.
                    let Ok(plain) = self.sealing.open(subject, body) else {
                        continue;
                    };
                    let text = message_text(&plain);
                    if text.trim().is_empty() {
                        continue;
                    }
                    let doc = tx.query_opt(
                        "INSERT INTO memory_docs (subject, kind, message_id, session_key, seq, role, created_ms)
                         VALUES (?1, 'transcript', ?2, ?3, ?4, ?5, ?6)
                         ON CONFLICT DO NOTHING RETURNING id",
                        params![subject, id, session, seq, role, created],
                    )?;
                    if let Some(doc) = doc {
                        Self::index_doc(tx, doc.get(0)?, &Self::terms(key, &text)?)?;
                    }
                }
                tx.execute(
                    "INSERT INTO memory_cursor (subject, last_message_id) VALUES (?1, ?2)
                     ON CONFLICT(subject) DO UPDATE SET last_message_id = excluded.last_message_id",
                    params![subject, last],
                )?;
                Ok(true)
            })?;
            if !more {
                return Ok(());
            }
        }
    }

    /// The memory files of a workspace: `MEMORY.md` and `memory/**/*.md` (no symlinks).
    fn memory_files(workspace: &Path) -> Vec<(String, Vec<u8>, i64)> {
        let Ok(root) = crate::wsfs::WsDir::root(workspace) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Ok(c) = root.read_capped(Path::new("MEMORY.md"), MAX_FILE_BYTES) {
            out.push(("MEMORY.md".to_string(), c.bytes, c.changed_ms));
        }
        if let Ok(dir) = root.open_dir(Path::new("memory")) {
            Self::walk(&dir, "memory", 0, &mut out);
        }
        out
    }

    fn walk(
        dir: &crate::wsfs::WsDir,
        rel: &str,
        depth: usize,
        out: &mut Vec<(String, Vec<u8>, i64)>,
    ) {
        let Ok(mut names) = dir.names() else {
            return;
        };
        names.sort();
        for n in names {
            if out.len() >= MAX_FILES {
                return;
            }
            let Some(name) = n.to_str() else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            let path = format!("{rel}/{name}");
            if name.to_ascii_lowercase().ends_with(".md")
                && let Ok(c) = dir.read_capped(Path::new(OsStr::new(name)), MAX_FILE_BYTES)
            {
                out.push((path, c.bytes, c.changed_ms));
            } else if depth < MAX_DEPTH
                && let Ok(sub) = dir.open_dir(Path::new(OsStr::new(name)))
            {
                Self::walk(&sub, &path, depth + 1, out);
            }
        }
    }

    fn sync_files(&self, subject: &str, key: &Key, workspace: &Path) -> Result<(), MemoryError> {
        let ws = crate::wsfs::canonical_root(workspace)
            .unwrap_or_else(|_| workspace.to_path_buf())
            .to_string_lossy()
            .into_owned();
        let files = Self::memory_files(workspace);
        self.store.db().tx(|tx| {
            Self::lock_subject(tx, subject)?;
            let known = tx.query_map(
                "SELECT id, path, mac FROM memory_docs WHERE subject = ?1 AND kind = 'file' AND workspace = ?2",
                params![subject, ws],
                |r| -> Result<(i64, String, String), MemoryError> {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                },
            )?;
            let mut present = BTreeSet::new();
            for (path, bytes, changed) in &files {
                present.insert(path.clone());
                let mac = hex(&Self::mac(key, b"chitin-memory-file-v1\0", bytes)?);
                if known.iter().any(|(_, p, m)| p == path && *m == mac) {
                    continue;
                }
                tx.execute(
                    "DELETE FROM memory_docs WHERE subject = ?1 AND kind = 'file' AND workspace = ?2 AND path = ?3",
                    params![subject, ws, path],
                )?;
                let text = String::from_utf8_lossy(bytes);
                let doc: i64 = tx
                    .query_row(
                        "INSERT INTO memory_docs (subject, kind, workspace, path, mac, created_ms)
                         VALUES (?1, 'file', ?2, ?3, ?4, ?5) RETURNING id",
                        params![subject, ws, path, mac, changed],
                    )?
                    .get(0)?;
                Self::index_doc(tx, doc, &Self::terms(key, &text)?)?;
            }
            for (id, path, _) in &known {
                if !present.contains(path) {
                    tx.execute("DELETE FROM memory_docs WHERE id = ?1", params![id])?;
                }
            }
            Ok(())
        })
    }

    /// Searches the user's memory files (in `workspace`) and transcripts; syncs first.
    pub fn search(
        &self,
        user: &str,
        workspace: &Path,
        query: &str,
        limit: u32,
    ) -> Result<Vec<Hit>, MemoryError> {
        self.sync(user, workspace)?;
        let subject = subject_of(user);
        let key = self.key(&subject)?;
        let qwords: BTreeSet<String> = words(query).into_iter().map(|(_, _, w)| w).collect();
        if qwords.is_empty() {
            return Err(MemoryError::Invalid(
                "the query has no words to look for".into(),
            ));
        }
        let terms = qwords
            .iter()
            .map(|w| Self::term(&key, w))
            .collect::<Result<Vec<_>, _>>()?;
        let ws = crate::wsfs::canonical_root(workspace)
            .unwrap_or_else(|_| workspace.to_path_buf())
            .to_string_lossy()
            .into_owned();
        let rows: Vec<SearchRow> = self.store.db().with(|c| {
            let row = |r: &chitin_store::Row| -> Result<SearchRow, MemoryError> {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                ))
            };
            match c.dialect() {
                Dialect::Sqlite => {
                    let expr = terms
                        .iter()
                        .map(|t| format!("\"{t}\""))
                        .collect::<Vec<_>>()
                        .join(" OR ");
                    c.query_map(
                        "SELECT d.kind, d.path, d.message_id, d.session_key, d.seq, d.role, d.created_ms, -bm25(memory_fts)
                         FROM memory_fts JOIN memory_docs d ON d.id = memory_fts.rowid
                         WHERE memory_fts MATCH ?1 AND d.subject = ?2
                           AND (d.kind = 'transcript' OR d.workspace = ?3)
                         ORDER BY bm25(memory_fts) LIMIT ?4",
                        params![expr, subject, ws, limit],
                        row,
                    )
                }
                Dialect::Postgres => {
                    let mut vals: Vec<chitin_store::Value> = vec![
                        chitin_store::Value::Text(subject.clone()),
                        chitin_store::Value::Text(ws.clone()),
                        chitin_store::Value::Int(i64::from(limit)),
                    ];
                    let list = terms
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            vals.push(chitin_store::Value::Text(t.clone()));
                            format!("?{}", i + 4)
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    let refs: Vec<&dyn chitin_store::ToValue> =
                        vals.iter().map(|v| v as &dyn chitin_store::ToValue).collect();
                    c.query_map(&pg_bm25_query(&list), &refs, row)
                }
            }
        })?;
        let mut hits = Vec::new();
        for (kind, path, message_id, session, seq, role, created, score) in rows {
            let (text, reference, source) = match (kind.as_str(), path, message_id, &session, seq) {
                ("file", Some(p), _, _, _) => {
                    let text = crate::wsfs::WsDir::root(workspace)
                        .and_then(|r| r.read_capped(Path::new(&p), MAX_FILE_BYTES))
                        .map(|c| String::from_utf8_lossy(&c.bytes).into_owned())
                        .unwrap_or_default();
                    (text, p, "file")
                }
                (_, _, Some(id), Some(s), Some(q)) => {
                    let body: Option<Vec<u8>> = self.store.db().with(|c| {
                        c.query_opt(
                            "SELECT body FROM messages WHERE id = ?1 AND subject = ?2",
                            params![id, subject],
                        )?
                        .map(|r| r.get::<Vec<u8>>(0))
                        .transpose()
                    })?;
                    let text = body
                        .and_then(|b| self.sealing.open(&subject, &b).ok())
                        .map(|p| message_text(&p))
                        .unwrap_or_default();
                    (text, format!("transcript:{s}#{q}"), "transcript")
                }
                _ => continue,
            };
            hits.push(Hit {
                path: reference,
                source,
                snippet: snippet(&text, &qwords),
                score,
                session: session.clone(),
                role,
                created_ms: created,
            });
        }
        Ok(hits)
    }

    /// One memory file of `workspace` or one message of the user's own transcripts.
    pub fn get(&self, user: &str, workspace: &Path, r: &MemoryRef) -> Result<Value, MemoryError> {
        match r {
            MemoryRef::File(p) => {
                let root = crate::wsfs::WsDir::root(workspace)
                    .map_err(|e| MemoryError::NotFound(e.to_string()))?;
                let c = root
                    .read_capped(Path::new(p), MAX_FILE_BYTES)
                    .map_err(|e| MemoryError::NotFound(e.to_string()))?;
                Ok(json!({"path": p, "source": "file",
                          "content": String::from_utf8_lossy(&c.bytes),
                          "truncated": c.truncated(), "bytes": c.size}))
            }
            MemoryRef::Transcript { session, seq } => {
                let subject = subject_of(user);
                let row: Option<(String, i64, Vec<u8>, String)> = self.store.db().with(|c| {
                    c.query_opt(
                        "SELECT m.role, m.created_ms, m.body, s.user_id FROM messages m
                         JOIN sessions s ON s.key = m.session_key
                         WHERE m.session_key = ?1 AND m.seq = ?2 AND m.subject = ?3",
                        params![session, seq, subject],
                    )?
                    .map(|r| -> Result<_, chitin_store::Error> {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                    })
                    .transpose()
                })?;
                let Some((role, created, body, owner)) = row.filter(|r| r.3 == user) else {
                    return Err(MemoryError::NotFound(format!(
                        "no message {seq} in a session `{}` of yours",
                        session.escape_default()
                    )));
                };
                let _ = owner;
                let plain = self.sealing.open(&subject, &body).map_err(|e| {
                    MemoryError::NotFound(format!("the message cannot be opened: {e}"))
                })?;
                Ok(
                    json!({"path": format!("transcript:{session}#{seq}"), "source": "transcript",
                          "session": session, "seq": seq, "role": role, "created_ms": created,
                          "content": message_text(&plain)}),
                )
            }
        }
    }

    /// The user a session belongs to, if it exists.
    pub fn session_owner(&self, session: &str) -> Result<Option<String>, MemoryError> {
        Ok(self.store.db().with(|c| {
            c.query_opt(
                "SELECT user_id FROM sessions WHERE key = ?1",
                params![session],
            )?
            .map(|r| r.get::<String>(0))
            .transpose()
        })?)
    }
}

/// A search hit as the index returns it: kind, path, message id, session, seq, role,
/// created, score (higher is better).
type SearchRow = (
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
    Option<String>,
    i64,
    f64,
);

/// FTS5's `bm25()` in SQL over the PostgreSQL form of the index, for the query terms `list`
/// (placeholders `?4..`; `?1` subject, `?2` workspace, `?3` limit). The same formula as FTS5
/// (`fts5_aux.c`, k1 = 1.2, b = 0.75), negated so that higher is better, as the SQLite path
/// reports it:
///
/// ```text
/// score(D) = Σ_q IDF(q) · tf(q,D)·(k1 + 1) / (tf(q,D) + k1·(1 − b + b·|D| / avgdl))
/// IDF(q)   = ln((N − n(q) + 0.5) / (n(q) + 0.5)), or 1e-6 where that is ≤ 0
/// ```
///
/// with FTS5's statistics: `N` every document of the index (all users, as FTS5 counts its
/// table's rows), `n(q)` the documents holding term `q`, `|D|` the document's length in terms
/// and `avgdl` the mean length. Ties are broken by document id (FTS5 leaves them in index
/// order).
fn pg_bm25_query(list: &str) -> String {
    format!(
        "WITH stats AS (
            SELECT CAST(COUNT(*) AS DOUBLE PRECISION) AS n,
                   CAST(COALESCE(AVG(length), 0) AS DOUBLE PRECISION) AS avgdl
            FROM memory_fts),
         idf AS (
            SELECT t.term, CASE WHEN ln((s.n - COUNT(*) + 0.5) / (COUNT(*) + 0.5)) <= 0 THEN 1e-6
                           ELSE ln((s.n - COUNT(*) + 0.5) / (COUNT(*) + 0.5)) END AS w
            FROM memory_terms t, stats s WHERE t.term IN ({list}) GROUP BY t.term, s.n)
         SELECT d.kind, d.path, d.message_id, d.session_key, d.seq, d.role, d.created_ms,
                CAST(SUM(i.w * (CAST(t.tf AS DOUBLE PRECISION) * 2.2)
                    / (CAST(t.tf AS DOUBLE PRECISION)
                       + 1.2 * (0.25 + 0.75 * CAST(f.length AS DOUBLE PRECISION) / s.avgdl)))
                    AS DOUBLE PRECISION) AS score
         FROM memory_terms t
         JOIN idf i ON i.term = t.term
         JOIN memory_fts f ON f.rowid = t.doc
         JOIN memory_docs d ON d.id = t.doc
         CROSS JOIN stats s
         WHERE d.subject = ?1 AND (d.kind = 'transcript' OR d.workspace = ?2)
         GROUP BY d.id, d.kind, d.path, d.message_id, d.session_key, d.seq, d.role, d.created_ms
         ORDER BY score DESC, d.id
         LIMIT ?3"
    )
}

fn hex(b: &[u8]) -> String {
    chitin_audit::to_hex(b)
}

/// The text of a stored transcript message (its sealed JSON): a user's or the assistant's
/// text, a tool result's content.
fn message_text(plain: &[u8]) -> String {
    let v: Value = serde_json::from_slice(plain).unwrap_or(Value::Null);
    let field = match v.get("role").and_then(Value::as_str) {
        Some("tool") => "content",
        _ => "text",
    };
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// About [`SNIPPET_CHARS`] characters of `text` around the first query word in it.
fn snippet(text: &str, qwords: &BTreeSet<String>) -> String {
    let at = words(text)
        .into_iter()
        .find(|(_, _, w)| qwords.contains(w))
        .map_or(0, |(s, _, _)| s);
    let before: Vec<(usize, char)> = text[..at].char_indices().collect();
    let start = before
        .len()
        .checked_sub(SNIPPET_CHARS / 3)
        .and_then(|i| before.get(i))
        .map_or(0, |(i, _)| *i);
    let rest = &text[start..];
    let end = rest
        .char_indices()
        .nth(SNIPPET_CHARS)
        .map_or(rest.len(), |(i, _)| i);
    let mut s = rest[..end].split_whitespace().collect::<Vec<_>>().join(" ");
    if start > 0 {
        s.insert_str(0, "… ");
    }
    if end < rest.len() {
        s.push_str(" …");
    }
    s
}

fn memory(sandbox: &Sandbox) -> Option<Arc<MemoryIndex>> {
    sandbox.memory().map(Arc::clone)
}

/// Runs the search an `Authorized` covers.
pub fn memory_search(
    auth: &Authorized,
    index: &MemoryIndex,
    call: &CallContext,
    args: &MemorySearchArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::MemorySearch, args)?;
    let started = Instant::now();
    let limit = args.limit.unwrap_or(DEFAULT_LIMIT);
    let hits = index
        .search(&call.user, &call.workspace, &args.query, limit)
        .map_err(|e| ToolError::InvalidArgs(format!("memory_search: {e}")))?;
    Ok(gated::output(
        started,
        json!({"query": args.query, "results": hits}),
    ))
}

/// Reads what an `Authorized` covers.
pub fn memory_get(
    auth: &Authorized,
    index: &MemoryIndex,
    call: &CallContext,
    args: &MemoryGetArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::MemoryGet, args)?;
    let started = Instant::now();
    let r = MemoryRef::parse(&args.path).map_err(ToolError::InvalidArgs)?;
    let v = index
        .get(&call.user, &call.workspace, &r)
        .map_err(|e| ToolError::InvalidArgs(format!("memory_get: {e}")))?;
    Ok(gated::output(started, v))
}

/// Runs one `memory_search` / `memory_get` call (the tool path of
/// [`super::invoke::invoke`]).
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    tool: Tool,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let Some(index) = memory(sandbox) else {
        let e = gated::invalid(
            tool,
            "the memory index is kept by the agent; this runtime has none",
        );
        return Err(gated::refused(gate, call, tool, e, args));
    };
    let user = gated::user_uid(&call.user)?;
    let started = Instant::now();
    if tool == Tool::MemorySearch {
        let parsed: MemorySearchArgs = gated::parse(gate, call, tool, args)?;
        let limit = parsed.limit.unwrap_or(DEFAULT_LIMIT);
        let bad = if parsed.query.trim().is_empty() || words(&parsed.query).is_empty() {
            Some("the query has no words to look for".to_string())
        } else if parsed.query.chars().count() > MAX_QUERY_CHARS {
            Some(format!("query is longer than {MAX_QUERY_CHARS} characters"))
        } else if !(1..=MAX_LIMIT).contains(&limit) {
            Some(format!("limit must be 1 to {MAX_LIMIT}"))
        } else {
            None
        };
        if let Some(m) = bad {
            return Err(gated::refused(
                gate,
                call,
                tool,
                gated::invalid(tool, m),
                args,
            ));
        }
        let norm =
            serde_json::to_value(&parsed).map_err(|e| gated::invalid(tool, e.to_string()))?;
        let mut ctx = gated::base_context(call, step, true);
        ctx.insert("query".into(), json!(parsed.query));
        ctx.insert("limit".into(), json!(limit));
        let req = PolicyRequest::new(user, Action::MemorySearch, tool.uid(), ctx);
        let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
            Gated::Go(g) => g,
            Gated::Done(i) => return Ok(i),
        };
        let run = memory_search(&go.auth, &index, call, &parsed);
        let argv = vec![tool.as_str().to_string(), parsed.query.clone()];
        return gated::finish(gate, call, tool, &argv, started, run, go);
    }
    let parsed: MemoryGetArgs = gated::parse(gate, call, tool, args)?;
    let r = match MemoryRef::parse(&parsed.path) {
        Ok(r) => r,
        Err(m) => {
            return Err(gated::refused(
                gate,
                call,
                tool,
                gated::invalid(tool, m),
                args,
            ));
        }
    };
    let mut ctx = gated::base_context(call, step, true);
    match &r {
        MemoryRef::File(p) => {
            // Located as read_file's path is: canonical, beneath the workspace descriptor.
            let ws = crate::tools::Workspace::new(&call.workspace)?;
            let abs: PathBuf = match ws.resolve(p) {
                Ok(w) => w.abs,
                Err(e) => return Err(gated::refused(gate, call, tool, e.into(), args)),
            };
            ctx.insert("source".into(), json!("file"));
            ctx.insert("path".into(), json!(abs.to_string_lossy()));
            ctx.insert("target_session".into(), json!(""));
        }
        MemoryRef::Transcript { session, .. } => {
            // Only the user's own sessions: another user's is refused before any decision.
            match index.session_owner(session) {
                Ok(Some(owner)) if owner == call.user => {}
                Ok(_) => {
                    let e = gated::invalid(
                        tool,
                        format!("no session `{}` of yours", session.escape_default()),
                    );
                    return Err(gated::refused(gate, call, tool, e, args));
                }
                Err(e) => return Err(gated::invalid(tool, e.to_string())),
            }
            ctx.insert("source".into(), json!("transcript"));
            ctx.insert("path".into(), json!(""));
            ctx.insert("target_session".into(), json!(session));
        }
    }
    let norm = serde_json::to_value(&parsed).map_err(|e| gated::invalid(tool, e.to_string()))?;
    let req = PolicyRequest::new(user, Action::MemoryGet, tool.uid(), ctx);
    let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
        Gated::Go(g) => g,
        Gated::Done(i) => return Ok(i),
    };
    let run = memory_get(&go.auth, &index, call, &parsed);
    let argv = vec![tool.as_str().to_string(), parsed.path.clone()];
    gated::finish(gate, call, tool, &argv, started, run, go)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn memory_references_are_memory_files_or_transcript_messages_only() {
        assert_eq!(
            MemoryRef::parse("MEMORY.md").unwrap(),
            MemoryRef::File("MEMORY.md".into())
        );
        assert_eq!(
            MemoryRef::parse("memory/2026-01-02.md").unwrap(),
            MemoryRef::File("memory/2026-01-02.md".into())
        );
        assert_eq!(
            MemoryRef::parse("transcript:chitin#12").unwrap(),
            MemoryRef::Transcript {
                session: "chitin".into(),
                seq: 12
            }
        );
        for bad in [
            "notes.md",
            "memory/../secrets.md",
            "/etc/passwd",
            "memory/x.txt",
            "transcript:a#x",
            "memory//a.md",
        ] {
            assert!(MemoryRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn words_are_lower_case_runs_of_letters_and_digits_with_their_place() {
        let w = words("Hello, Wörld 42!");
        let ws: Vec<&str> = w.iter().map(|x| x.2.as_str()).collect();
        assert_eq!(ws, ["hello", "wörld", "42"]);
        assert_eq!(&"Hello, Wörld 42!"[w[1].0..w[1].1], "Wörld");
    }

    #[test]
    fn a_snippet_shows_the_text_around_the_first_query_word() {
        let text = format!(
            "{} the needle is here {}",
            "a ".repeat(200),
            "b ".repeat(200)
        );
        let q: BTreeSet<String> = ["needle".to_string()].into();
        let s = snippet(&text, &q);
        assert!(s.contains("the needle is here"), "{s}");
        assert!(s.starts_with("… ") && s.ends_with(" …"), "{s}");
    }
}
