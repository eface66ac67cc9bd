//! SQLite storage: the schema, row conversion, the writer's store and the readers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, params};

use crate::AuditError;
use crate::backend::Head;
use crate::checkpoint::Checkpoint;
use crate::record::Record;

/// Database file name in the state directory.
pub const DB_FILE: &str = "audit.db";
/// Append-only checkpoint file (one JSON checkpoint per line).
pub const CHECKPOINT_FILE: &str = "audit.checkpoints";
/// The 0600 Ed25519 signing key (until the secret store holds it).
pub const KEY_FILE: &str = "audit.key";
/// The public key that verifies checkpoints.
pub const PUB_FILE: &str = "audit.pub";

const SCHEMA: &str = r"
CREATE TABLE IF NOT EXISTS records (
    seq            INTEGER PRIMARY KEY,
    ts_ms          INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    resource       TEXT NOT NULL,
    decision       TEXT NOT NULL,
    policies       TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    payload_digest BLOB NOT NULL,
    payload        TEXT,
    removed_at_ms  INTEGER,
    removed_reason TEXT,
    field_check    BLOB NOT NULL,
    prev_hash      BLOB NOT NULL,
    hash           BLOB NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS checkpoints (
    seq     INTEGER NOT NULL,
    head    TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    key_id  TEXT NOT NULL,
    sig     TEXT NOT NULL
) STRICT;
-- The newest checkpoint is read at every checkpoint (each minute): by index, not by reading
-- the whole table through the writer's small page cache.
CREATE INDEX IF NOT EXISTS checkpoints_seq ON checkpoints(seq);
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_only_payload_removal BEFORE UPDATE ON records
WHEN NOT (OLD.payload IS NOT NULL AND NEW.payload IS NULL
          AND NEW.removed_at_ms IS NOT NULL AND NEW.removed_reason IS NOT NULL
          AND NEW.seq = OLD.seq AND NEW.ts_ms = OLD.ts_ms AND NEW.kind = OLD.kind
          AND NEW.actor = OLD.actor AND NEW.action = OLD.action AND NEW.resource = OLD.resource
          AND NEW.decision = OLD.decision AND NEW.policies = OLD.policies
          AND NEW.outcome = OLD.outcome AND NEW.payload_digest = OLD.payload_digest
          AND NEW.field_check = OLD.field_check AND NEW.prev_hash = OLD.prev_hash
          AND NEW.hash = OLD.hash)
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only (only retention may remove a payload)'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END;
";

const INSERT_SQL: &str = "INSERT INTO records (seq, ts_ms, kind, actor, action, \
    resource, decision, policies, outcome, payload_digest, payload, removed_at_ms, removed_reason, \
    field_check, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, \
    NULL, ?12, ?13, ?14)";

const COLUMNS: &str = "seq, ts_ms, kind, actor, action, resource, decision, policies, outcome, \
    payload_digest, payload, removed_at_ms, removed_reason, field_check, prev_hash, hash";

pub(crate) fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |e| AuditError::Database {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The writer's page cache in KiB (64 pages of 4 KiB).
pub(crate) const WRITER_CACHE_KIB: i64 = 256;

/// Opens the database for writing: WAL, `synchronous=FULL` (a commit returns only after the
/// WAL is fsynced, so an acknowledged record survives power loss), schema, busy timeout.
pub(crate) fn open_writer(
    path: &Path,
    lock_timeout: Duration,
    max_db_bytes: Option<u64>,
) -> Result<Connection, AuditError> {
    let e = db_err(path);
    let conn = Connection::open(path).map_err(&e)?;
    crate::fsutil::chmod_private(path)?;
    conn.busy_timeout(lock_timeout).map_err(&e)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(&e)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::Database {
            path: path.to_path_buf(),
            message: format!("cannot switch to WAL (journal_mode is {mode})"),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&e)?;
    // An append touches the table's last pages only: SQLite's default page cache (2 MiB per
    // connection) was filled by a gateway's writer and kept for as long as it ran.
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
        .map_err(&e)?;
    conn.execute_batch(SCHEMA).map_err(&e)?;
    if let Some(max) = max_db_bytes {
        let page: i64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(&e)?;
        let pages = i64::try_from(max).unwrap_or(i64::MAX) / page.max(1);
        conn.query_row(
            &format!("PRAGMA max_page_count = {}", pages.max(1)),
            [],
            |_| Ok(()),
        )
        .map_err(&e)?;
    }
    Ok(conn)
}

/// Opens a database read-only (verification, query, export). Never creates it.
pub(crate) fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    if !path.exists() {
        return Err(AuditError::Database {
            path: path.to_path_buf(),
            message: "no such file; pass the audit database with --db FILE".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err(path))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(db_err(path))?;
    Ok(conn)
}

fn text(v: ValueRef<'_>) -> String {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => String::from_utf8_lossy(t).into_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Null => String::new(),
    }
}

fn opt_text(v: ValueRef<'_>) -> Option<String> {
    match v {
        ValueRef::Null => None,
        other => Some(text(other)),
    }
}

fn bytes(v: ValueRef<'_>) -> Vec<u8> {
    match v {
        ValueRef::Text(t) | ValueRef::Blob(t) => t.to_vec(),
        ValueRef::Integer(i) => i.to_be_bytes().to_vec(),
        ValueRef::Real(f) => f.to_be_bytes().to_vec(),
        ValueRef::Null => Vec::new(),
    }
}

fn int(v: ValueRef<'_>) -> i64 {
    match v {
        ValueRef::Integer(i) => i,
        // Tampered types still produce a record the verifier will reject.
        ValueRef::Real(f) => f as i64,
        ValueRef::Text(t) | ValueRef::Blob(t) => std::str::from_utf8(t)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(i64::MIN),
        ValueRef::Null => i64::MIN,
    }
}

fn opt_int(v: ValueRef<'_>) -> Option<i64> {
    match v {
        ValueRef::Null => None,
        other => Some(int(other)),
    }
}

/// Converts a row selected with [`COLUMNS`]. Tolerates tampered column types.
pub(crate) fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let g = |i: usize| row.get_ref(i);
    Ok(Record {
        seq: int(g(0)?),
        ts_ms: int(g(1)?),
        kind: text(g(2)?),
        actor: text(g(3)?),
        action: text(g(4)?),
        resource: text(g(5)?),
        decision: text(g(6)?),
        policies: text(g(7)?),
        outcome: text(g(8)?),
        payload_digest: bytes(g(9)?),
        payload: opt_text(g(10)?),
        removed_at_ms: opt_int(g(11)?),
        removed_reason: opt_text(g(12)?),
        field_check: bytes(g(13)?),
        prev_hash: bytes(g(14)?),
        hash: bytes(g(15)?),
    })
}

/// A filter for [`AuditReader::query`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub kind: Option<String>,
    pub actor: Option<String>,
    /// Inclusive, unix ms.
    pub since_ms: Option<i64>,
    /// Inclusive, unix ms.
    pub until_ms: Option<i64>,
    /// Most recent N (output is still in sequence order).
    pub limit: Option<u64>,
}

/// Read-only access to an audit log (its own connection; safe while gateways write): the SQLite
/// file, or (feature `postgres`) the PostgreSQL tables.
pub struct AuditReader {
    inner: ReaderInner,
}

enum ReaderInner {
    Sqlite {
        conn: Connection,
        path: PathBuf,
    },
    #[cfg(feature = "postgres")]
    Postgres(Box<crate::pg::PgReader>),
}

impl AuditReader {
    /// Opens the SQLite database `db` read-only.
    pub fn open(db: &Path) -> Result<Self, AuditError> {
        Ok(Self {
            inner: ReaderInner::Sqlite {
                conn: open_reader(db)?,
                path: db.to_path_buf(),
            },
        })
    }

    /// Opens a PostgreSQL-backed log read-only (a repeatable-read snapshot per query).
    #[cfg(feature = "postgres")]
    pub fn open_postgres(config: &crate::pg::PgConfig) -> Result<Self, AuditError> {
        Ok(Self {
            inner: ReaderInner::Postgres(Box::new(crate::pg::PgReader::open(config)?)),
        })
    }

    /// Another reader on the same log, with its own connection.
    pub(crate) fn reopen(&self) -> Result<Self, AuditError> {
        match &self.inner {
            ReaderInner::Sqlite { path, .. } => Self::open(path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => Ok(Self {
                inner: ReaderInner::Postgres(Box::new(r.reopen()?)),
            }),
        }
    }

    /// The database path (for PostgreSQL: the connection target without its password).
    pub fn path(&self) -> &Path {
        match &self.inner {
            ReaderInner::Sqlite { path, .. } => path,
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => r.target_path(),
        }
    }

    /// Whether the log is in SQLite (its checkpoint file must hold every checkpoint).
    pub(crate) fn is_sqlite(&self) -> bool {
        matches!(self.inner, ReaderInner::Sqlite { .. })
    }

    /// Records matching `q`, in sequence order.
    pub fn query(&self, q: &Query) -> Result<Vec<Record>, AuditError> {
        let (conn, path) = match &self.inner {
            ReaderInner::Sqlite { conn, path } => (conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => return r.query(q),
        };
        let sql = format!(
            "SELECT * FROM (SELECT {COLUMNS} FROM records \
             WHERE (?1 IS NULL OR kind = ?1) AND (?2 IS NULL OR actor = ?2) \
             AND (?3 IS NULL OR ts_ms >= ?3) AND (?4 IS NULL OR ts_ms <= ?4) \
             ORDER BY seq DESC LIMIT ?5) ORDER BY seq"
        );
        let limit = q.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let e = db_err(path);
        let mut st = conn.prepare(&sql).map_err(&e)?;
        let rows = st
            .query_map(
                params![q.kind, q.actor, q.since_ms, q.until_ms, limit],
                row_to_record,
            )
            .map_err(&e)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(&e)
    }

    /// Records with `from <= seq <= to`, in sequence order.
    pub fn range(&self, from: i64, to: i64) -> Result<Vec<Record>, AuditError> {
        let (conn, path) = match &self.inner {
            ReaderInner::Sqlite { conn, path } => (conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => return r.range(from, to),
        };
        let e = db_err(path);
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM records WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq"
            ))
            .map_err(&e)?;
        let rows = st.query_map(params![from, to], row_to_record).map_err(&e)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(&e)
    }

    /// Calls `f` for every record with `seq >= from`, in sequence order, until `f` returns false.
    pub fn for_each_from(
        &self,
        from: i64,
        mut f: impl FnMut(Record) -> bool,
    ) -> Result<(), AuditError> {
        let (conn, path) = match &self.inner {
            ReaderInner::Sqlite { conn, path } => (conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => return r.for_each_from(from, &mut f),
        };
        let e = db_err(path);
        let mut st = conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM records WHERE seq >= ?1 ORDER BY seq"
            ))
            .map_err(&e)?;
        let mut rows = st.query(params![from]).map_err(&e)?;
        while let Some(row) = rows.next().map_err(&e)? {
            if !f(row_to_record(row).map_err(&e)?) {
                break;
            }
        }
        Ok(())
    }

    /// The first seq with `ts_ms >= since` and the last with `ts_ms <= until`.
    pub fn seq_bounds(
        &self,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<Option<(i64, i64)>, AuditError> {
        let (conn, path) = match &self.inner {
            ReaderInner::Sqlite { conn, path } => (conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => return r.seq_bounds(since_ms, until_ms),
        };
        let e = db_err(path);
        let first: Option<i64> = conn
            .query_row(
                "SELECT MIN(seq) FROM records WHERE ?1 IS NULL OR ts_ms >= ?1",
                params![since_ms],
                |r| r.get(0),
            )
            .map_err(&e)?;
        let last: Option<i64> = conn
            .query_row(
                "SELECT MAX(seq) FROM records WHERE ?1 IS NULL OR ts_ms <= ?1",
                params![until_ms],
                |r| r.get(0),
            )
            .map_err(&e)?;
        Ok(match (first, last) {
            (Some(a), Some(b)) if a <= b => Some((a, b)),
            _ => None,
        })
    }

    /// The checkpoints stored in the database, in insertion order.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        let (conn, path) = match &self.inner {
            ReaderInner::Sqlite { conn, path } => (conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => return r.checkpoints(),
        };
        let e = db_err(path);
        let mut st = conn
            .prepare("SELECT seq, head, time_ms, key_id, sig FROM checkpoints ORDER BY rowid")
            .map_err(&e)?;
        let rows = st
            .query_map([], |r| {
                Ok(Checkpoint {
                    seq: int(r.get_ref(0)?),
                    head: text(r.get_ref(1)?),
                    time_ms: int(r.get_ref(2)?),
                    key_id: text(r.get_ref(3)?),
                    sig: text(r.get_ref(4)?),
                })
            })
            .map_err(&e)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(&e)
    }

    /// The number of records and the head `(seq, hash)`.
    pub fn head(&self) -> Result<Option<(i64, Vec<u8>)>, AuditError> {
        match &self.inner {
            ReaderInner::Sqlite { conn, path } => read_head(conn, path),
            #[cfg(feature = "postgres")]
            ReaderInner::Postgres(r) => r.head(),
        }
    }

    /// Writes this log as a SQLite deployment keeps it: the new database `db` ([`DB_FILE`]'s
    /// schema, every record up to the head read first, byte for byte, a removed payload
    /// removed) and the new checkpoint file `checkpoint_file` (one JSON line per checkpoint
    /// over those records, also in `db`'s table). Records appended meanwhile are left out: a
    /// copy is a prefix of the chain, and `chitin-audit-verify --db db --checkpoints
    /// checkpoint_file` verifies it offline. Returns the last record copied (0: none).
    pub fn copy_to_sqlite(&self, db: &Path, checkpoint_file: &Path) -> Result<i64, AuditError> {
        let last = self.head()?.map_or(0, |(seq, _)| seq);
        if db.exists() || checkpoint_file.exists() {
            return Err(AuditError::InvalidInput(format!(
                "{} or {} exists already; a copy of the audit log goes into new files only",
                db.display(),
                checkpoint_file.display()
            )));
        }
        let e = db_err(db);
        let mut conn = Connection::open(db).map_err(&e)?;
        crate::fsutil::chmod_private(db)?;
        conn.execute_batch(SCHEMA).map_err(&e)?;
        let tx = conn.transaction().map_err(&e)?;
        let mut failed: Option<AuditError> = None;
        {
            let mut st = tx
                .prepare(&format!(
                    "INSERT INTO records ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                     ?10, ?11, ?12, ?13, ?14, ?15, ?16)"
                ))
                .map_err(&e)?;
            self.for_each_from(i64::MIN, |r| {
                if r.seq > last {
                    return false;
                }
                match st.execute(params![
                    r.seq,
                    r.ts_ms,
                    r.kind,
                    r.actor,
                    r.action,
                    r.resource,
                    r.decision,
                    r.policies,
                    r.outcome,
                    r.payload_digest,
                    r.payload,
                    r.removed_at_ms,
                    r.removed_reason,
                    r.field_check,
                    r.prev_hash,
                    r.hash,
                ]) {
                    Ok(_) => true,
                    Err(err) => {
                        failed = Some(e(err));
                        false
                    }
                }
            })?;
        }
        if let Some(err) = failed {
            return Err(err);
        }
        let mut lines = String::new();
        for cp in self.checkpoints()?.into_iter().filter(|c| c.seq <= last) {
            tx.execute(
                "INSERT INTO checkpoints (seq, head, time_ms, key_id, sig) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![cp.seq, cp.head, cp.time_ms, cp.key_id, cp.sig],
            )
            .map_err(&e)?;
            lines.push_str(&cp.to_line()?);
            lines.push('\n');
        }
        tx.commit().map_err(&e)?;
        drop(conn);
        crate::fsutil::write_private(checkpoint_file, &lines)?;
        Ok(last)
    }
}

/// The SQLite side of the writer: one connection, `BEGIN IMMEDIATE` as the write lock (other
/// processes, e.g. the CLI, may append to the same file).
pub(crate) struct SqliteStore {
    conn: Option<Connection>,
    path: PathBuf,
    lock_timeout: Duration,
    max_db_bytes: Option<u64>,
}

impl SqliteStore {
    pub(crate) fn open(
        path: &Path,
        lock_timeout: Duration,
        max_db_bytes: Option<u64>,
    ) -> Result<Self, AuditError> {
        let conn = open_writer(path, lock_timeout, max_db_bytes)?;
        Ok(Self {
            conn: Some(conn),
            path: path.to_path_buf(),
            lock_timeout,
            max_db_bytes,
        })
    }

    fn conn(&mut self) -> Result<&mut Connection, AuditError> {
        if self.conn.is_none() {
            self.conn = Some(open_writer(
                &self.path,
                self.lock_timeout,
                self.max_db_bytes,
            )?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| AuditError::Internal("no connection".into()))
    }
}

impl crate::backend::WriterStore for SqliteStore {
    fn commit(
        &mut self,
        removal: Option<&crate::backend::Removal<'_>>,
        build: &mut crate::backend::BuildRows<'_>,
    ) -> Result<(), AuditError> {
        let path = self.path.clone();
        let e = db_err(&path);
        let conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&e)?;
        if let Some(r) = removal {
            let changed = tx
                .execute(
                    "UPDATE records SET payload = NULL, removed_at_ms = ?1, removed_reason = ?2 \
                     WHERE seq = ?3 AND payload IS NOT NULL AND payload_digest = ?4",
                    params![r.now, r.reason, r.seq, r.digest],
                )
                .map_err(&e)?;
            if changed != 1 {
                return Err(r.changed_error());
            }
        }
        // Re-read the head inside the write lock: another process (the CLI) may have appended.
        let head = read_head(&tx, &path)?;
        let rows = build(head)?;
        {
            let mut st = tx.prepare_cached(INSERT_SQL).map_err(&e)?;
            for r in &rows {
                st.execute(params![
                    r.seq,
                    r.ts_ms,
                    r.kind,
                    r.actor,
                    r.action,
                    r.resource,
                    r.decision,
                    r.policies,
                    r.outcome,
                    r.payload_digest,
                    r.payload,
                    r.field_check,
                    r.prev_hash,
                    r.hash,
                ])
                .map_err(&e)?;
            }
        }
        tx.commit().map_err(&e)
    }

    fn head(&mut self) -> Result<Head, AuditError> {
        let path = self.path.clone();
        read_head(self.conn()?, &path)
    }

    fn payload_facts(
        &mut self,
        seq: i64,
    ) -> Result<Option<crate::backend::PayloadFacts>, AuditError> {
        use rusqlite::OptionalExtension;
        let path = self.path.clone();
        self.conn()?
            .query_row(
                "SELECT payload_digest, payload, kind, action FROM records WHERE seq = ?1",
                params![seq],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(db_err(&path))
    }

    fn last_checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        use rusqlite::OptionalExtension;
        let path = self.path.clone();
        self.conn()?
            .query_row(
                "SELECT seq, head, time_ms, key_id, sig FROM checkpoints \
                 ORDER BY seq DESC, rowid DESC LIMIT 1",
                [],
                |r| {
                    Ok(Checkpoint {
                        seq: r.get(0)?,
                        head: r.get(1)?,
                        time_ms: r.get(2)?,
                        key_id: r.get(3)?,
                        sig: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(db_err(&path))
    }

    fn checkpoint_marks(&mut self) -> Result<Option<(i64, i64)>, AuditError> {
        Ok(self.last_checkpoint()?.map(|c| (c.seq, c.time_ms)))
    }

    fn insert_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), AuditError> {
        let path = self.path.clone();
        self.conn()?
            .execute(
                "INSERT INTO checkpoints (seq, head, time_ms, key_id, sig) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![cp.seq, cp.head, cp.time_ms, cp.key_id, cp.sig],
            )
            .map_err(db_err(&path))?;
        Ok(())
    }

    fn reader(&self) -> Result<AuditReader, AuditError> {
        AuditReader::open(&self.path)
    }

    fn shared(&self) -> bool {
        false
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

pub(crate) fn read_head(
    conn: &Connection,
    path: &Path,
) -> Result<Option<(i64, Vec<u8>)>, AuditError> {
    use rusqlite::OptionalExtension;
    // Read inside every commit: cached, not prepared again each time.
    conn.prepare_cached("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1")
        .and_then(|mut st| {
            st.query_row([], |r| Ok((int(r.get_ref(0)?), bytes(r.get_ref(1)?))))
                .optional()
        })
        .map_err(db_err(path))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_newest_checkpoint_is_found_by_index_not_by_reading_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let w = open_writer(&dir.path().join("audit.db"), Duration::from_secs(1), None).unwrap();
        let plan: Vec<String> = w
            .prepare(
                "EXPLAIN QUERY PLAN SELECT seq, head, time_ms, key_id, sig FROM checkpoints \
                 ORDER BY seq DESC, rowid DESC LIMIT 1",
            )
            .unwrap()
            .query_map([], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(plan, ["SCAN checkpoints USING INDEX checkpoints_seq"]);
    }

    #[test]
    fn the_writer_keeps_a_small_page_cache_and_a_reader_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let w = open_writer(&path, Duration::from_secs(1), None).unwrap();
        let cache: i64 = w.query_row("PRAGMA cache_size", [], |r| r.get(0)).unwrap();
        assert_eq!(cache, -WRITER_CACHE_KIB);
        // Verification reads the whole chain: its connection keeps SQLite's default.
        let r = open_reader(&path).unwrap();
        let cache: i64 = r.query_row("PRAGMA cache_size", [], |r| r.get(0)).unwrap();
        assert_eq!(cache, -2000);
    }
}
