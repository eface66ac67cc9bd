//! The gateway's store: `state.db` (bundled SQLite, WAL, `synchronous=FULL`, `secure_delete`)
//! or a PostgreSQL database, through the `chitin-store` crate. The audit log has its own
//! database (see the audit crate).
//!
//! Two ways in: [`Store::db`], the backend-neutral API every module is being ported onto
//! (`docs/storage.md`: the portable SQL subset, how to port a module), and [`Store::conn`], the
//! SQLite connection itself for the modules not yet ported (an error on PostgreSQL, naming the
//! backend; `chitin gateway` refuses PostgreSQL until every module is ported).
//!
//! Invariants: migrations are applied in order inside one transaction each and are never
//! edited once released (`store/src/migrations.rs`, both backends); a database written by a
//! newer Chitin is refused, not downgraded.

use std::path::{Path, PathBuf};
use std::sync::MutexGuard;

pub use chitin_store::{Db, Dialect, PgConfig, TlsMode, params};
use rusqlite::Connection;

/// Errors of the embedded store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(transparent)]
    Db(#[from] chitin_store::Error),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(
        "this part of Chitin still reads `state.db` through SQLite and cannot run on {0} yet; use `[store] backend = \"sqlite\"`"
    )]
    NotPorted(String),
}

/// The modules of `src/` still on [`Store::conn`] (SQLite only), by module path. Shrinks as
/// modules are ported to [`Store::db`]; `tests/store_backends.rs` checks it against the
/// source. While it is not empty, `chitin gateway` refuses `[store] backend = "postgres"`.
pub const NOT_PORTED: &[&str] = &[];

/// The modules already on the neutral API (they run on both backends).
pub const PORTED: &[&str] = &[
    "approvals",
    "agent::transcripts",
    "store (meta)",
    "channels",
    "channels::buttons",
    "channels::ingress",
    "channels::outbox",
    "channels::pairing",
    "accounts",
    "accounts::oidc",
    "agent::usage",
    "cli::status",
    "mcp::pins",
    "tools::prompt_guard",
    "lifecycle::backup",
    "lifecycle::erase",
    "lifecycle::export",
    "lifecycle::retention",
    "tools::memory",
    "automation::hooks",
    "automation::jobs",
    "workflow_runner::store",
    "gateway",
];

/// Why the gateway refuses PostgreSQL today, naming what is not ported.
pub fn gateway_refusal() -> Option<String> {
    if NOT_PORTED.is_empty() {
        return None;
    }
    Some(format!(
        "[store] backend = \"postgres\": the gateway cannot run on PostgreSQL yet, and does not start rather than run half on it. \
         Not ported yet: {}. Ported: {}. \
         Run the gateway with backend = \"sqlite\" for now; `chitin store migrate`, `check` and `copy --from sqlite --to postgres` already work with PostgreSQL",
        NOT_PORTED.join(", "),
        PORTED.join(", ")
    ))
}

/// The state database.
#[derive(Debug, Clone)]
pub struct Store {
    db: Db,
    /// The SQLite file; for PostgreSQL, its location (`postgres://host:port/db`).
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed, mode 0600) and migrates the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        crate::state::ensure_private_file(path)?;
        Ok(Self {
            db: Db::sqlite(path)?,
            path: path.to_path_buf(),
        })
    }

    /// Opens the SQLite database at `path` only when it is at this binary's schema version,
    /// so that opening it migrates nothing (the gateway opens it while its policies compile;
    /// a database is never upgraded by a start that then fails on its policies). `None`
    /// otherwise, or on any error: [`Store::open`] then opens it, migrating, and reports what
    /// went wrong.
    pub fn open_if_current(path: &Path) -> Option<Self> {
        crate::state::ensure_private_file(path).ok()?;
        let db = Db::sqlite_unmigrated(path).ok()?;
        (db.version().ok()? == Self::latest_version()).then(|| Self {
            db,
            path: path.to_path_buf(),
        })
    }

    /// Connects to PostgreSQL and migrates it.
    pub fn postgres(cfg: &PgConfig) -> Result<Self, StoreError> {
        let db = Db::postgres(cfg)?;
        Ok(Self {
            path: PathBuf::from(db.location()),
            db,
        })
    }

    /// A store over an open database.
    pub fn from_db(db: Db) -> Self {
        Self {
            path: db
                .sqlite_path()
                .map_or_else(|| PathBuf::from(db.location()), Path::to_path_buf),
            db,
        }
    }

    /// The backend-neutral API.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Whether opening migrated an existing database: the schema version it had, and where
    /// the copy taken before migrating is (`state.db.before-schema-<new>.bak`).
    pub fn migrated_from(&self) -> Option<(i64, &Path)> {
        self.db.migrated_from()
    }

    /// The database file (for PostgreSQL: its location, `postgres://host:port/db`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The schema version this binary migrates to.
    pub fn latest_version() -> i64 {
        chitin_store::latest_version()
    }

    /// The schema version of the open database.
    pub fn version(&self) -> Result<i64, StoreError> {
        Ok(self.db.version()?)
    }

    /// Exclusive access to the SQLite connection, for modules not yet on [`Store::db`].
    pub fn conn(&self) -> Result<MutexGuard<'_, Connection>, StoreError> {
        match self.db.sqlite_connection() {
            Some(c) => Ok(c?),
            None => Err(StoreError::NotPorted(self.db.location().to_string())),
        }
    }

    /// Reads a `meta` value.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.db.with(|c| {
            c.query_opt("SELECT value FROM meta WHERE key = ?1", params![key])?
                .map(|r| r.get::<String>(0))
                .transpose()
                .map_err(StoreError::from)
        })
    }

    /// Writes a `meta` value.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.db.with(|c| {
            c.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_new_store_is_private_wal_and_fully_migrated() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        let s = Store::open(&p).unwrap();
        assert_eq!(s.version().unwrap(), Store::latest_version());
        let mode: String = s
            .conn()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn reopening_keeps_data_and_does_not_rerun_migrations() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        Store::open(&p).unwrap().set_meta("k", "v").unwrap();
        let s = Store::open(&p).unwrap();
        assert_eq!(s.meta("k").unwrap().as_deref(), Some("v"));
        assert_eq!(s.version().unwrap(), Store::latest_version());
    }

    #[test]
    fn a_database_from_a_newer_chitin_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        drop(Store::open(&p).unwrap());
        let c = Connection::open(&p).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Store::open(&p).unwrap_err().to_string();
        assert!(err.contains("schema version 99, newer than"), "{err}");
        assert!(err.contains("Run the newer `chitin` binary"), "{err}");
        assert!(err.contains("chitin backup restore FILE"), "{err}");
        // Refused before anything was written: still the newer version.
        let c = Connection::open(&p).unwrap();
        assert_eq!(
            c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            99
        );
    }

    #[test]
    fn migrating_an_older_database_first_keeps_a_copy_of_it() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("state.db");
        // A database as the previous release left it: every migration but the last.
        let older = Store::latest_version() - 1;
        {
            let mut c = Connection::open(&p).unwrap();
            for (i, m) in chitin_store::migrations::SQLITE
                .iter()
                .take(usize::try_from(older).unwrap())
                .enumerate()
            {
                let tx = c.transaction().unwrap();
                tx.execute_batch(m).unwrap();
                tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap())
                    .unwrap();
                tx.commit().unwrap();
            }
            c.execute("INSERT INTO meta(key, value) VALUES ('k', 'before')", [])
                .unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.version().unwrap(), Store::latest_version());
        let (from, copy) = s.migrated_from().unwrap();
        assert_eq!(from, older);
        let copy = copy.to_path_buf();
        assert_eq!(
            copy,
            t.path().join(format!(
                "state.db.before-schema-{}.bak",
                Store::latest_version()
            ))
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let c = Connection::open(&copy).unwrap();
        assert_eq!(
            c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap(),
            older
        );
        let v: String = c
            .query_row("SELECT value FROM meta WHERE key = 'k'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, "before");
        // A database already at the latest version is not copied again.
        drop(s);
        std::fs::remove_file(&copy).unwrap();
        assert!(Store::open(&p).unwrap().migrated_from().is_none());
        assert!(!copy.exists());
    }
}
