//! Chitin's storage: one backend-neutral API over SQLite (the embedded default, `state.db`)
//! and PostgreSQL (the shared store of several gateways), with the schema migrations of both.
//!
//! ```text
//! let db = Db::sqlite(path)?;                       // or Db::postgres(&PgConfig)?
//! db.tx(|t| {
//!     t.execute("INSERT INTO meta (key, value) VALUES (?1, ?2)
//!                ON CONFLICT (key) DO UPDATE SET value = excluded.value", params![k, v])?;
//!     let n: i64 = t.query_row("SELECT COUNT(*) FROM meta", params![])?.get(0)?;
//!     Ok::<_, Error>(n)
//! })?;
//! ```
//!
//! SQL is written once in the portable subset documented in `docs/storage.md`: numbered `?N`
//! placeholders (rewritten to `$N` for PostgreSQL), the types of [`Ty`], `ON CONFLICT`
//! upserts, `RETURNING`; what cannot be shared branches on [`Conn::dialect`].
//!
//! Synchronous callers use [`Db::with`] / [`Db::tx`]; on PostgreSQL the statements run on the
//! store's own runtime and the caller waits on a channel (never `block_on`), so it may be a
//! thread of another runtime. Async callers use [`Db::call`] / [`Db::call_tx`].
//!
//! Invariants: migrations run in order, one transaction each, and are append-only; a
//! database from a newer Chitin is refused before anything is written to it.

mod config;
pub mod copy;
mod error;
pub mod lease;
pub mod migrations;
pub mod notify;
mod pg;
pub mod replica;
mod sql;
mod sqlite;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
mod value;

use std::path::Path;
use std::sync::{Arc, MutexGuard};

pub use config::{PgConfig, TlsMode};
pub use error::{Error, Result};
pub use lease::{Lease, LeaseInfo};
pub use notify::{Listener, Notice, Notification};
pub use replica::Replica;
pub use sql::{Dialect, rewrite};
pub use value::{FromValue, Row, ToValue, Ty, Typed, Value};

/// The schema version this build migrates to (the same on both backends).
pub fn latest_version() -> i64 {
    i64::try_from(migrations::SQLITE.len()).unwrap_or(i64::MAX)
}

enum Backend {
    Sqlite(sqlite::SqliteDb),
    Postgres(pg::PgDb),
}

/// A database (cheap to clone: the connection or the pool is shared).
#[derive(Clone)]
pub struct Db {
    inner: Arc<Backend>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("location", &self.location())
            .finish()
    }
}

fn values(params: &[&dyn ToValue]) -> Vec<Value> {
    params.iter().map(|p| p.to_value()).collect()
}

impl Db {
    /// Opens (creating if needed) and migrates the SQLite database at `path` (WAL,
    /// `synchronous=FULL`, `secure_delete`; an existing database is copied to
    /// `<file>.before-schema-<N>.bak` before its first migration).
    pub fn sqlite(path: &Path) -> Result<Self> {
        Ok(Self {
            inner: Arc::new(Backend::Sqlite(sqlite::open(path, true)?)),
        })
    }

    /// Opens the SQLite database without migrating it (a newer one is still refused).
    pub fn sqlite_unmigrated(path: &Path) -> Result<Self> {
        Ok(Self {
            inner: Arc::new(Backend::Sqlite(sqlite::open(path, false)?)),
        })
    }

    /// Connects to PostgreSQL and migrates it (replicas starting together migrate once).
    pub fn postgres(cfg: &PgConfig) -> Result<Self> {
        let db = Self::postgres_unmigrated(cfg)?;
        db.migrate()?;
        Ok(db)
    }

    /// Connects without migrating; a database from a newer Chitin is refused.
    pub fn postgres_unmigrated(cfg: &PgConfig) -> Result<Self> {
        let p = pg::PgDb::connect(cfg)?;
        let found = p.version()?;
        sqlite::refuse_newer(&p.location, found)?;
        Ok(Self {
            inner: Arc::new(Backend::Postgres(p)),
        })
    }

    /// Applies pending migrations; returns how many.
    pub fn migrate(&self) -> Result<usize> {
        match &*self.inner {
            Backend::Sqlite(s) => s.migrate(),
            Backend::Postgres(p) => p.migrate(),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match &*self.inner {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Whether the leases live in this process (SQLite: one gateway owns the file), so that
    /// taking, renewing and giving one back never waits on I/O and may be done on an async
    /// task without a trip to a blocking thread.
    pub fn leases_in_process(&self) -> bool {
        matches!(&*self.inner, Backend::Sqlite(_))
    }

    /// The SQLite file's path or `postgres://host:port/dbname` (never a password).
    pub fn location(&self) -> &str {
        match &*self.inner {
            Backend::Sqlite(s) => &s.location,
            Backend::Postgres(p) => &p.location,
        }
    }

    /// The SQLite file, for the SQLite backend.
    pub fn sqlite_path(&self) -> Option<&Path> {
        match &*self.inner {
            Backend::Sqlite(s) => Some(&s.path),
            Backend::Postgres(_) => None,
        }
    }

    /// When opening migrated an existing SQLite database: its schema version before, and
    /// the copy taken first.
    pub fn migrated_from(&self) -> Option<(i64, &Path)> {
        match &*self.inner {
            Backend::Sqlite(s) => s.migrated.as_ref().map(|(v, p)| (*v, p.as_path())),
            Backend::Postgres(_) => None,
        }
    }

    /// The schema version of the database.
    pub fn version(&self) -> Result<i64> {
        match &*self.inner {
            Backend::Sqlite(s) => {
                let c = s.lock()?;
                sqlite::version(&c).map_err(sqlite::err(&s.location))
            }
            Backend::Postgres(p) => p.version(),
        }
    }

    /// Makes every write so far durable. Needed only after writing through
    /// [`Db::sqlite_connection`] (`with` and `tx` return durable results by themselves).
    pub fn flush(&self) -> Result<()> {
        match &*self.inner {
            Backend::Sqlite(s) => {
                let unit = {
                    let _c = s.lock()?;
                    s.wrote()
                };
                s.sync_to(unit)
            }
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// The SQLite connection itself, for code not yet on the neutral API (`None` on
    /// PostgreSQL). Holding it excludes every other user of the database.
    pub fn sqlite_connection(&self) -> Option<Result<MutexGuard<'_, rusqlite::Connection>>> {
        match &*self.inner {
            Backend::Sqlite(s) => Some(s.lock()),
            Backend::Postgres(_) => None,
        }
    }

    /// Runs `f` on a connection, outside a transaction (each statement commits by itself).
    pub fn with<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut Conn<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        match &*self.inner {
            Backend::Sqlite(s) => {
                let wrote = std::cell::Cell::new(false);
                let c = s.lock()?;
                let out = f(&mut Conn {
                    inner: ConnInner::Sqlite(&c, &s.location, &s.leases, &wrote),
                });
                // Each statement committed by itself: what wrote is made durable (group
                // commit, `sqlite`), whether `f` then succeeded or not.
                if wrote.get() {
                    let unit = s.wrote();
                    drop(c);
                    s.sync_to(unit)?;
                }
                out
            }
            Backend::Postgres(p) => {
                let mut session = p.session(false)?;
                f(&mut Conn {
                    inner: ConnInner::Postgres(&mut session),
                })
            }
        }
    }

    /// Runs `f` in one transaction: committed when `f` returns `Ok`, rolled back when it
    /// returns `Err` (or panics).
    ///
    /// On SQLite the transaction takes the write lock when it begins (`BEGIN IMMEDIATE`),
    /// waiting for another connection's write up to the busy timeout. A deferred one that
    /// read first and then wrote would fail with "database is locked" at once when another
    /// connection (a second gateway on the same file, a CLI command) held the lock then:
    /// SQLite cannot wait for a lock a reader upgrades to.
    pub fn tx<T, E: From<Error>>(
        &self,
        f: impl FnOnce(&mut Conn<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        match &*self.inner {
            Backend::Sqlite(s) => {
                let wrote = std::cell::Cell::new(false);
                let mut c = s.lock()?;
                let tx = c
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(sqlite::err(&s.location))?;
                let out = f(&mut Conn {
                    inner: ConnInner::Sqlite(&tx, &s.location, &s.leases, &wrote),
                })?;
                tx.commit().map_err(sqlite::err(&s.location))?;
                if wrote.get() {
                    // Durable before the caller sees the result (group commit, `sqlite`).
                    let unit = s.wrote();
                    drop(c);
                    s.sync_to(unit)?;
                }
                Ok(out)
            }
            Backend::Postgres(p) => {
                let mut session = p.session(true)?;
                let out = f(&mut Conn {
                    inner: ConnInner::Postgres(&mut session),
                })?;
                session.call(pg::Op::Commit)?;
                Ok(out)
            }
        }
    }

    /// [`Db::with`] for async callers: `f` runs on a blocking thread of the caller's runtime.
    pub async fn call<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut Conn<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.with(f))
            .await
            .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
    }

    /// [`Db::tx`] for async callers.
    pub async fn call_tx<T, E, F>(&self, f: F) -> std::result::Result<T, E>
    where
        F: FnOnce(&mut Conn<'_>) -> std::result::Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.tx(f))
            .await
            .map_err(|e| Error::Internal(format!("store task failed: {e}")))?
    }

    /// The tables of the schema (bookkeeping of the backend itself excluded), sorted.
    pub fn tables(&self) -> Result<Vec<String>> {
        let sql = match self.dialect() {
            Dialect::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
                   AND name NOT LIKE 'memory_fts_%' ORDER BY name"
            }
            Dialect::Postgres => {
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename"
            }
        };
        self.with(|c| {
            c.query_all(sql, params![])?
                .iter()
                .map(|r| r.get::<String>(0))
                .collect()
        })
    }

    /// The number of rows of each table of [`Db::tables`].
    pub fn row_counts(&self) -> Result<Vec<(String, i64)>> {
        let tables = self.tables()?;
        self.with(|c| {
            tables
                .into_iter()
                .map(|t| {
                    let n: i64 = c
                        .query_row(
                            &format!("SELECT COUNT(*) FROM {}", quote_ident(&t)),
                            params![],
                        )?
                        .get(0)?;
                    Ok((t, n))
                })
                .collect()
        })
    }
}

/// `"name"` with inner quotes doubled (both backends).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

enum ConnInner<'a> {
    Sqlite(
        &'a rusqlite::Connection,
        &'a str,
        &'a lease::MemLeases,
        &'a std::cell::Cell<bool>,
    ),
    Postgres(&'a mut pg::Session),
}

/// A connection lent by [`Db::with`] / [`Db::tx`].
pub struct Conn<'a> {
    inner: ConnInner<'a>,
}

impl Conn<'_> {
    pub fn dialect(&self) -> Dialect {
        match self.inner {
            ConnInner::Sqlite(..) => Dialect::Sqlite,
            ConnInner::Postgres(_) => Dialect::Postgres,
        }
    }

    fn prepare(&self, sql: &str, params: &[&dyn ToValue]) -> Result<(String, Vec<Value>)> {
        let (text, max) = rewrite(sql, self.dialect())?;
        if max > params.len() {
            return Err(Error::Sql(format!(
                "the statement uses ?{max} but {} parameter(s) were given",
                params.len()
            )));
        }
        Ok((text, values(params)))
    }

    /// Runs a statement; returns the number of rows it changed.
    pub fn execute(&mut self, sql: &str, params: &[&dyn ToValue]) -> Result<u64> {
        let (text, vals) = self.prepare(sql, params)?;
        match &mut self.inner {
            ConnInner::Sqlite(c, loc, _, w) => sqlite::execute(c, loc, w, &text, &vals),
            ConnInner::Postgres(s) => match s.call(pg::Op::Execute(text, vals))? {
                pg::Reply::Count(n) => Ok(n),
                _ => Err(Error::Internal("unexpected reply".into())),
            },
        }
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[&dyn ToValue],
        limit: Option<usize>,
    ) -> Result<Vec<Row>> {
        let (text, vals) = self.prepare(sql, params)?;
        match &mut self.inner {
            ConnInner::Sqlite(c, loc, _, w) => sqlite::query(c, loc, w, &text, &vals, limit),
            ConnInner::Postgres(s) => match s.call(pg::Op::Query(text, vals, limit))? {
                pg::Reply::Rows(r) => Ok(r),
                _ => Err(Error::Internal("unexpected reply".into())),
            },
        }
    }

    /// The first row; [`Error::NoRow`] when there is none.
    pub fn query_row(&mut self, sql: &str, params: &[&dyn ToValue]) -> Result<Row> {
        self.query_opt(sql, params)?.ok_or(Error::NoRow)
    }

    /// The first row, if any.
    pub fn query_opt(&mut self, sql: &str, params: &[&dyn ToValue]) -> Result<Option<Row>> {
        Ok(self.query(sql, params, Some(1))?.into_iter().next())
    }

    /// Every row.
    pub fn query_all(&mut self, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>> {
        self.query(sql, params, None)
    }

    /// Every row, each read by `f`.
    pub fn query_map<T, E: From<Error>>(
        &mut self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnMut(&Row) -> std::result::Result<T, E>,
    ) -> std::result::Result<Vec<T>, E> {
        self.query_all(sql, params)?.iter().map(f).collect()
    }

    /// Runs several statements without parameters (dialect-specific DDL, ...).
    pub fn execute_batch(&mut self, sql: &str) -> Result<()> {
        match &mut self.inner {
            ConnInner::Sqlite(c, loc, _, w) => {
                w.set(true);
                c.execute_batch(sql).map_err(sqlite::err(loc))
            }
            ConnInner::Postgres(s) => s.call(pg::Op::Batch(sql.to_string())).map(|_| ()),
        }
    }
}
