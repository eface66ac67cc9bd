//! The store's one error type.

use std::path::PathBuf;

/// Errors of the storage layer. `location` names the database: a SQLite file's path or a
/// PostgreSQL `host:port/dbname` (never a password).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store {location}: {source}")]
    Sqlite {
        location: String,
        source: rusqlite::Error,
    },
    #[error("store {location}: {message}")]
    Postgres {
        location: String,
        /// The server's message with its detail and hint, or the client's.
        message: String,
        /// The SQLSTATE code when the server answered (`23505`: unique violation, ...).
        code: Option<String>,
    },
    #[error(
        "store {location} has schema version {found}, newer than this Chitin understands ({known}): \
         it was written by a newer Chitin, and this one refuses to touch it rather than lose data. \
         Run the newer `chitin` binary again (`chitin --version` shows which one this is), or, to go \
         back to this version, restore a backup made by it (`chitin backup restore FILE`, or the \
         copy `state.db.before-schema-*.bak` kept by the upgrade next to the database)"
    )]
    TooNew {
        location: String,
        found: i64,
        known: i64,
    },
    #[error("store: no row where one was expected")]
    NoRow,
    #[error(
        "store: column {column} is {found}, read as {expected}; change the query's type (see docs/storage.md, the portable subset)"
    )]
    Type {
        column: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("store: column {0} does not exist in the row")]
    NoColumn(usize),
    #[error(
        "store: PostgreSQL column `{column}` has type {ty}, outside the portable subset (BIGINT, INTEGER, DOUBLE PRECISION, TEXT, BYTEA, BOOLEAN); CAST it in the query"
    )]
    UnportableType { column: String, ty: String },
    #[error("store: SQL outside the portable subset: {0} (see docs/storage.md)")]
    Sql(String),
    #[error("store configuration: {0}")]
    Config(String),
    #[error("store {location}: cannot connect: {message}")]
    Connect { location: String, message: String },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}; restart the gateway")]
    Internal(String),
    #[error("store: {0}")]
    Lease(String),
    #[error(
        "store: the lease `{name}` (token {fence}) was lost: it expired or another replica took it over; stop the work it protected"
    )]
    LeaseLost { name: String, fence: i64 },
    #[error("store notification: {0}")]
    Notify(String),
}

impl Error {
    /// Whether a unique constraint refused the statement (`SQLITE_CONSTRAINT_UNIQUE` /
    /// `SQLITE_CONSTRAINT_PRIMARYKEY`, PostgreSQL `23505`).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Self::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => {
                e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            }
            Self::Postgres { code, .. } => code.as_deref() == Some("23505"),
            _ => false,
        }
    }

    /// Whether a CHECK constraint refused the statement.
    pub fn is_check_violation(&self) -> bool {
        match self {
            Self::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_CHECK,
            Self::Postgres { code, .. } => code.as_deref() == Some("23514"),
            _ => false,
        }
    }

    pub(crate) fn pg(location: &str, e: &tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => {
                let mut message = format!("{}: {}", db.severity(), db.message());
                if let Some(d) = db.detail() {
                    message.push_str(&format!(" (detail: {d})"));
                }
                if let Some(h) = db.hint() {
                    message.push_str(&format!(" (hint: {h})"));
                }
                Self::Postgres {
                    location: location.to_string(),
                    message,
                    code: Some(db.code().code().to_string()),
                }
            }
            None => {
                let mut message = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    message.push_str(&format!(": {s}"));
                    src = s.source();
                }
                Self::Postgres {
                    location: location.to_string(),
                    message,
                    code: None,
                }
            }
        }
    }
}

/// Results of the store.
pub type Result<T, E = Error> = std::result::Result<T, E>;
