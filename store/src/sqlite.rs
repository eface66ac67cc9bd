//! The SQLite backend: one connection behind a mutex (the gateway's `state.db`), WAL,
//! `synchronous=FULL`, `secure_delete`, migrations with a copy of the database taken first.

use std::path::{Path, PathBuf};
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
pub(crate) fn open(path: &Path, migrate_now: bool) -> Result<SqliteDb> {
    let location = path.display().to_string();
    let sql = err(&location);
    let mut conn = Connection::open(path).map_err(&sql)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(&sql)?;
    // The agent, approvals and retention reuse a few dozen statements on every turn.
    conn.set_prepared_statement_cache_capacity(64);
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(&sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(sql(rusqlite::Error::InvalidQuery));
    }
    conn.pragma_update(None, "synchronous", "FULL")
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
        migrate(&mut conn, &self.path)?;
        Ok(usize::try_from(crate::latest_version() - before).unwrap_or(0))
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

pub(crate) fn execute(c: &Connection, loc: &str, sql: &str, params: &[Value]) -> Result<u64> {
    let e = err(loc);
    let mut st = c.prepare_cached(sql).map_err(&e)?;
    let n = st
        .execute(rusqlite::params_from_iter(params.iter()))
        .map_err(&e)?;
    Ok(u64::try_from(n).unwrap_or(u64::MAX))
}

pub(crate) fn query(
    c: &Connection,
    loc: &str,
    sql: &str,
    params: &[Value],
    limit: Option<usize>,
) -> Result<Vec<Row>> {
    let e = err(loc);
    let mut st = c.prepare_cached(sql).map_err(&e)?;
    let n = st.column_count();
    let mut rows = st
        .query(rusqlite::params_from_iter(params.iter()))
        .map_err(&e)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next().map_err(&e)? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(cell(r.get_ref(i).map_err(&e)?, i)?);
        }
        out.push(Row::new(values));
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
    }
    Ok(out)
}
