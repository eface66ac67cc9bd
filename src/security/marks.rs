//! When an operator's periodic checks last succeeded, kept in `state.db`'s `meta` table so the
//! security audit can say "the audit chain was last verified 40 days ago" or "backups were
//! never test-restored".
//!
//! Keys (values are unix ms as decimal text):
//! - `security.audit_verified_ms`: `chitin audit verify` (of this state dir's log) or
//!   `chitin security audit --deep` / `chitin doctor` verified the chain.
//! - `security.backup_verified_ms`: `chitin backup verify` or `--deep` decrypted and checked a
//!   backup (a test restore into a scratch directory).
//! - `security.backup_created_ms`: `chitin backup create` wrote a backup (scheduled backups
//!   keep their own `backup.last_run_ms`).

use std::path::Path;

/// A success worth remembering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    AuditVerified,
    BackupVerified,
    BackupCreated,
}

impl Mark {
    pub fn key(self) -> &'static str {
        match self {
            Self::AuditVerified => "security.audit_verified_ms",
            Self::BackupVerified => "security.backup_verified_ms",
            Self::BackupCreated => "security.backup_created_ms",
        }
    }
}

/// The scheduled backups' own mark (written by `lifecycle::schedule`).
pub const SCHEDULED_BACKUP_KEY: &str = "backup.last_run_ms";

/// Records `mark` at `now_ms` in `home/state.db`. Only when the state database exists already
/// (a check never creates one); a failure to record is returned for the caller to print as a
/// note: the check itself succeeded.
pub fn record(home: &Path, mark: Mark, now_ms: i64) -> Result<(), String> {
    let db = home.join("state.db");
    if !db.exists() {
        return Ok(());
    }
    let store = crate::store::Store::open(&db).map_err(|e| e.to_string())?;
    store
        .set_meta(mark.key(), &now_ms.to_string())
        .map_err(|e| e.to_string())
}

/// Reads a `meta` value as unix ms, without creating or migrating anything (a read-only
/// connection). `None` when the database, the table or the key does not exist.
pub fn read_ms(home: &Path, key: &str) -> Option<i64> {
    let db = home.join("state.db");
    if !db.exists() {
        return None;
    }
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
        r.get::<_, String>(0)
    })
    .ok()
    .and_then(|v| v.parse().ok())
}

/// Reads a mark.
pub fn last(home: &Path, mark: Mark) -> Option<i64> {
    read_ms(home, mark.key())
}
