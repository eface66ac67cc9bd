//! The audit crate's errors.

use std::path::PathBuf;

/// Everything that can go wrong writing or reading the audit log.
///
/// A write error means the record is NOT durable: the caller must not perform the action it
/// would have recorded (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "audit unavailable: {0}; the action was not performed (check disk space and permissions of the audit database, then `chitin audit verify`)"
    )]
    Unavailable(String),
    #[error("audit log is shut down; the action was not performed")]
    Closed,
    #[error("audit database {path}: {message}")]
    Database { path: PathBuf, message: String },
    #[error("audit database {target}: {message}")]
    Postgres { target: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "audit signing key {path}: {reason}; restore it from backup (a new key cannot sign for old checkpoints)"
    )]
    KeyFile { path: PathBuf, reason: String },
    #[error("unsafe file: {0}")]
    Unsafe(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("no record with seq {0}")]
    NoSuchRecord(i64),
    #[error("internal error: {0}")]
    Internal(String),
}
