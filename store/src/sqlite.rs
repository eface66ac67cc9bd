//! The SQLite backend: one connection behind a mutex (the gateway's `state.db`), WAL,
//! `secure_delete`, migrations with a copy of the database taken first.
//!
//! **Group commit.** The connection runs `synchronous=NORMAL`: a commit appends to the WAL
//! without waiting for the disk. A unit of work that wrote ([`Db::with`](crate::Db::with) or
//! [`Db::tx`](crate::Db::tx)) is then made durable by [`SqliteDb::sync_to`] *after* the
//! connection is handed back and before the caller gets its result: one `fdatasync` of the WAL
//! covers every commit written before it, so callers committing at the same time share one
//! flush instead of taking turns flushing under the connection lock. A result returned to the
//! caller is as durable as with `synchronous=FULL` (what the gateway acknowledges survives
//! power loss); what differs is that another thread may *read* a commit in the short time
//! between its write and its flush.

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use crate::error::{Error, Result};
use crate::migrations::SQLITE;
use crate::value::{Row, Ty, Value};

pub(crate) struct SqliteDb {
    pub(crate) path: PathBuf,
    pub(crate) location: String,
    pub(crate) conn: Mutex<Connection>,
    pub(crate) migrated: Option<(i64, PathBuf)>,
    /// The leases of this file, in memory (`lease`: one gateway per SQLite file).
    pub(crate) leases: std::sync::Arc<crate::lease::MemLeases>,
    /// Units of work that wrote, counted under the connection lock.
    pub(crate) written: AtomicU64,
    /// The last unit of work known durable, and the WAL file flushed to make it so.
    pub(crate) synced: Mutex<(u64, Option<File>)>,
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Self::Null(_) => ToSqlOutput::Borrowed(ValueRef::Null),
            Self::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Self::Bool(b) => ToSqlOutput::Borrowed(ValueRef::Integer(i64::from(*b))),
            Self::Real(r) => ToSqlOutput::Borrowed(ValueRef::Real(*r)),
            Self::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Self::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

pub(crate) fn err(location: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |source| Error::Sqlite {
        location: location.to_string(),
        source,
    }
}

/// Opens (creating if needed) the database at `path` with the gateway's settings. The file
/// is expected to exist with its mode set by the caller (the gateway makes it 0600 first).
/// Prepared statements kept per connection (`rusqlite`'s LRU cache).
const STATEMENT_CACHE: usize = 512;

pub(crate) fn open(path: &Path, migrate_now: bool) -> Result<SqliteDb> {
    let location = path.display().to_string();
    let sql = err(&location);
    let mut conn = Connection::open(path).map_err(&sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&sql)?;
    // The gateway has a few hundred distinct statements for this one connection; the cache
    // holds every one it uses (64 was about what one turn and its outbox run). A prepared
    // statement costs a few KiB, and only the ones used are kept. (What re-prepared the hot
    // statements on every call was SQLite expiring them on a new bound value, not the cache
    // size: see `Transcripts::rows_after`.)
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(&sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(sql(rusqlite::Error::InvalidQuery));
    }
    // Durability comes from `SqliteDb::sync_to` (group commit) before a result is returned.
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(&sql)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(&sql)?;
    // Deleted content is overwritten, not left in free pages.
    conn.pragma_update(None, "secure_delete", "ON")
        .map_err(&sql)?;
    let found = version(&conn).map_err(&sql)?;
    refuse_newer(&location, found)?;
    let migrated = if migrate_now {
        migrate(&mut conn, path)?
    } else {
        None
    };
    Ok(SqliteDb {
        path: path.to_path_buf(),
        location: location.clone(),
        conn: Mutex::new(conn),
        migrated,
        leases: crate::lease::mem_leases(path),
        written: AtomicU64::new(1),
        // Unit 1: opening (a migration may have written); made durable below.
        synced: Mutex::new((0, None)),
    })
    .and_then(|db| {
        db.sync_to(1)?;
        Ok(db)
    })
}

pub(crate) fn refuse_newer(location: &str, found: i64) -> Result<()> {
    let known = crate::latest_version();
    if found > known {
        return Err(Error::TooNew {
            location: location.to_string(),
            found,
            known,
        });
    }
    Ok(())
}

pub(crate) fn version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

impl SqliteDb {
    pub(crate) fn lock(&self) -> Result<MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| Error::Internal("store lock poisoned by a panic in another thread".into()))
    }

    pub(crate) fn migrate(&self) -> Result<usize> {
        let mut conn = self.lock()?;
        let before = version(&conn).map_err(err(&self.location))?;
        let r = migrate(&mut conn, &self.path);
        let unit = self.wrote();
        drop(conn);
        self.sync_to(unit)?;
        r?;
        Ok(usize::try_from(crate::latest_version() - before).unwrap_or(0))
    }

    /// Counts a unit of work that wrote; call it while holding the connection lock, after
    /// the commit. Returns its number for [`Self::sync_to`].
    pub(crate) fn wrote(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once unit `unit` is on disk: one `fdatasync` of the WAL (taken after every
    /// commit counted so far) covers it and every unit before it, so concurrent callers share
    /// flushes. Call it without holding the connection lock.
    pub(crate) fn sync_to(&self, unit: u64) -> Result<()> {
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| Error::Internal("store sync lock poisoned by a panic".into()))?;
        if synced.0 >= unit {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        let io = |source: std::io::Error| Error::Io {
            path: self.path.clone(),
            source,
        };
        // The WAL file of this connection: opened once, again if it was replaced (removed
        // when the last connection of another process closed it, then created anew).
        // A replaced WAL was removed first (SQLite deletes it when its last connection closes):
        // the open file then has no link left. One `fstat` per flush, no path lookup.
        let stale = match &synced.1 {
            Some(f) => {
                use std::os::unix::fs::MetadataExt;
                f.metadata().map_err(io)?.nlink() == 0
            }
            None => true,
        };
        if stale {
            let wal = self.path.with_file_name(format!(
                "{}-wal",
                self.path
                    .file_name()
                    .map_or_else(|| "state.db".into(), |n| n.to_string_lossy().into_owned())
            ));
            synced.1 = match File::open(&wal) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(e)),
            };
        }
        match &synced.1 {
            Some(f) => f.sync_data().map_err(io)?,
            // No WAL (checkpointed and removed): the commits are in the database file.
            None => File::open(&self.path)
                .and_then(|f| f.sync_data())
                .map_err(io)?,
        }
        synced.0 = target;
        Ok(())
    }
}

/// Copies the database (consistent, through SQLite: `VACUUM INTO`) to
/// `<path>.before-schema-<known>.bak`, mode 0600, replacing an older copy atomically.
fn backup_before_migrating(conn: &Connection, path: &Path, known: i64) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .map_or_else(|| "state.db".into(), |n| n.to_string_lossy().into_owned());
    let target = path.with_file_name(format!("{name}.before-schema-{known}.bak"));
    let tmp = path.with_file_name(format!("{name}.before-schema-{known}.bak.tmp"));
    let io = |source: std::io::Error| Error::Io {
        path: tmp.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    // Created empty and private first: VACUUM INTO fills an empty file and keeps its mode.
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io)?,
    );
    let tmp_text = tmp.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [&tmp_text])
        .map_err(err(&tmp_text))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &target).map_err(io)?;
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(target)
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<Option<(i64, PathBuf)>> {
    let location = path.display().to_string();
    let sql = err(&location);
    let found = version(conn).map_err(&sql)?;
    let known = crate::latest_version();
    refuse_newer(&location, found)?;
    // An existing database is copied before the first migration touches it.
    let migrated = if found > 0 && found < known {
        Some((found, backup_before_migrating(conn, path, known)?))
    } else {
        None
    };
    for (i, migration) in SQLITE
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        let tx = conn.transaction().map_err(&sql)?;
        tx.execute_batch(migration).map_err(&sql)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(&sql)?;
        tx.commit().map_err(&sql)?;
    }
    Ok(migrated)
}

fn cell(v: ValueRef<'_>, column: usize) -> Result<Value> {
    Ok(match v {
        ValueRef::Null => Value::Null(Ty::Text),
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => {
            Value::Text(String::from_utf8(t.to_vec()).map_err(|_| Error::Type {
                column,
                expected: "UTF-8 text",
                found: "text that is not UTF-8",
            })?)
        }
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    })
}

pub(crate) fn execute(
    c: &Connection,
    loc: &str,
    wrote: &Cell<bool>,
    sql: &str,
    params: &[Value],
) -> Result<u64> {
    let e = err(loc);
    let mut st = c.prepare_cached(sql).map_err(&e)?;
    let before = c.total_changes();
    let n = st.execute(rusqlite::params_from_iter(params.iter()));
    note_write(c, wrote, sql, st.readonly(), before, n.is_err());
    Ok(u64::try_from(n.map_err(&e)?).unwrap_or(u64::MAX))
}

/// Marks the unit of work as one that wrote (to be flushed) unless the statement is read-only
/// or is an `INSERT`, `UPDATE`, `DELETE` or `REPLACE` that completed without changing a row (an idle
/// gateway's once-a-second claims of requested cron firings, for one: nothing to flush).
/// Anything else that is not read-only (DDL, pragmas, a failed statement) counts as a write.
fn note_write(
    c: &Connection,
    wrote: &Cell<bool>,
    sql: &str,
    readonly: bool,
    before: u64,
    failed: bool,
) {
    if readonly {
        return;
    }
    let first = sql
        .trim_start()
        .split(|ch: char| !ch.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    let row_change = ["INSERT", "UPDATE", "DELETE", "REPLACE"]
        .iter()
        .any(|k| first.eq_ignore_ascii_case(k));
    if failed || !row_change || c.total_changes() != before {
        wrote.set(true);
    }
}

pub(crate) fn query(
    c: &Connection,
    loc: &str,
    wrote: &Cell<bool>,
    sql: &str,
    params: &[Value],
    limit: Option<usize>,
) -> Result<Vec<Row>> {
    let e = err(loc);
    let mut st = c.prepare_cached(sql).map_err(&e)?;
    let readonly = st.readonly();
    let before = c.total_changes();
    // Its rows are dropped on return: the statement is reset and its changes counted.
    let out = read_rows(&mut st, &e, params, limit);
    note_write(c, wrote, sql, readonly, before, out.is_err());
    out
}

fn read_rows(
    st: &mut rusqlite::CachedStatement<'_>,
    e: &impl Fn(rusqlite::Error) -> Error,
    params: &[Value],
    limit: Option<usize>,
) -> Result<Vec<Row>> {
    let n = st.column_count();
    let mut rows = st
        .query(rusqlite::params_from_iter(params.iter()))
        .map_err(e)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(e)? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(cell(r.get_ref(i).map_err(e)?, i)?);
        }
        out.push(Row::new(values));
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use std::sync::atomic::Ordering;

    use crate::{Backend, Db, params};

    fn units(db: &Db) -> (u64, u64) {
        match &*db.inner {
            Backend::Sqlite(s) => (s.written.load(Ordering::SeqCst), s.synced.lock().unwrap().0),
            Backend::Postgres(_) => unreachable!("a SQLite test"),
        }
    }

    #[test]
    fn a_transaction_holds_the_write_lock_from_its_start_so_a_read_then_write_never_fails_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (a, b) = (Db::sqlite(&path).unwrap(), Db::sqlite(&path).unwrap());
        a.with(|c| c.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
            .unwrap();
        // The other connection does not wait: it shows who holds the lock.
        b.sqlite_connection()
            .unwrap()
            .unwrap()
            .busy_timeout(std::time::Duration::ZERO)
            .unwrap();
        let n = a
            .tx(|c| {
                // Before this transaction's first statement, the other cannot write: the
                // lock was taken at BEGIN, so this read-then-write cannot be refused later.
                let other = b.with(|c| c.execute("INSERT INTO t (n) VALUES (1)", params![]));
                match other {
                    Err(crate::Error::Sqlite { source, .. }) => assert_eq!(
                        source.sqlite_error_code(),
                        Some(rusqlite::ErrorCode::DatabaseBusy)
                    ),
                    other => panic!("the other connection wrote inside the transaction: {other:?}"),
                }
                let n = c.query_all("SELECT n FROM t", params![])?.len();
                c.execute("INSERT INTO t (n) VALUES (2)", params![])?;
                Ok::<_, crate::Error>(n)
            })
            .unwrap();
        assert_eq!(n, 0);
        // Committed: the lock is free again.
        b.with(|c| c.execute("INSERT INTO t (n) VALUES (1)", params![]))
            .unwrap();
    }

    #[test]
    fn a_statement_that_changes_no_row_is_not_flushed_and_one_that_does_is() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(&dir.path().join("state.db")).unwrap();
        db.with(|c| c.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY, s TEXT NOT NULL)"))
            .unwrap();
        let flushed = units(&db);
        assert_eq!(flushed.0, flushed.1, "DDL is flushed");
        // Nothing matches: no unit of work counted, no flush.
        db.tx(|c| c.execute("UPDATE t SET s = 'x' WHERE n = ?1", params![1]))
            .unwrap();
        let rows = db
            .tx(|c| {
                c.query_all(
                    "UPDATE t SET s = 'y' WHERE s = 'none' RETURNING n",
                    params![],
                )
            })
            .unwrap();
        assert!(rows.is_empty());
        db.with(|c| c.execute("DELETE FROM t WHERE n = ?1", params![9]))
            .unwrap();
        db.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO t (n, s) VALUES (?1, ?2)",
                params![1, "a"],
            )
        })
        .unwrap();
        let after_insert = units(&db);
        assert_eq!(after_insert.0, flushed.0 + 1, "the insert changed a row");
        assert_eq!(after_insert.0, after_insert.1, "and was flushed");
        db.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO t (n, s) VALUES (?1, ?2)",
                params![1, "b"],
            )
        })
        .unwrap();
        db.tx(|c| c.execute("DELETE FROM t WHERE n = ?1", params![2]))
            .unwrap();
        assert_eq!(
            units(&db),
            after_insert,
            "ignored and unmatched: nothing to flush"
        );
        // A change through RETURNING counts; so does one through a transaction.
        let rows = db
            .tx(|c| c.query_all("UPDATE t SET s = 'c' WHERE n = 1 RETURNING n", params![]))
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(units(&db).0, after_insert.0 + 1);
        db.tx(|c| c.execute("DELETE FROM t WHERE n = ?1", params![1]))
            .unwrap();
        let done = units(&db);
        assert_eq!(done.0, after_insert.0 + 2);
        assert_eq!(done.0, done.1);
        // A statement that fails counts as a write (what it did is not looked into).
        let failed = db.with(|c| c.execute("INSERT INTO t (n, s) VALUES (?1, NULL)", params![5]));
        assert!(failed.is_err());
        assert_eq!(units(&db).0, done.0 + 1);
    }

    #[test]
    fn every_write_returned_by_with_or_tx_is_flushed_and_concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(&dir.path().join("state.db")).unwrap();
        db.with(|c| c.execute_batch("CREATE TABLE t (n INTEGER NOT NULL, w INTEGER NOT NULL)"))
            .unwrap();
        let threads: Vec<_> = (0..6)
            .map(|w| {
                let db = db.clone();
                std::thread::spawn(move || {
                    for n in 0..40_i64 {
                        // The unit this transaction will be counted as: one more than the
                        // units counted when it held the lock.
                        let unit = db
                            .tx(|c| {
                                c.execute("INSERT INTO t (n, w) VALUES (?1, ?2)", params![n, w])?;
                                Ok::<_, crate::Error>(units(&db).0 + 1)
                            })
                            .unwrap();
                        let (_, synced) = units(&db);
                        assert!(
                            synced >= unit,
                            "returned before its flush: {synced} < {unit}"
                        );
                        let unit = db
                            .with(|c| {
                                c.execute(
                                    "UPDATE t SET n = n WHERE w = ?1 AND n = ?2",
                                    params![w, n],
                                )?;
                                Ok::<_, crate::Error>(units(&db).0 + 1)
                            })
                            .unwrap();
                        assert!(units(&db).1 >= unit);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n: i64 = db
            .with(|c| c.query_row("SELECT COUNT(*) FROM t", params![])?.get(0))
            .unwrap();
        assert_eq!(n, 240);
        // Reads alone count no unit and flush nothing.
        let before = units(&db);
        let _: i64 = db
            .with(|c| c.query_row("SELECT COUNT(*) FROM t", params![])?.get(0))
            .unwrap();
        assert_eq!(units(&db), before);
        assert_eq!(before.0, before.1, "everything written is flushed");
    }
}
