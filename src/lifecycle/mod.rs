//! Data lifecycle (issue #9): retention, legal hold, GDPR export and erasure, encrypted backups.
//!
//! Everything here runs on a [`Lifecycle`]: the state store, the audit log, the vault and a
//! clock — what the gateway already holds. Deletion is real: rows are removed with SQLite
//! `secure_delete`, then the database is rebuilt (`VACUUM`) and its WAL truncated, so neither
//! free pages nor WAL frames keep a copy. Every destructive step is audited first (fail closed:
//! no record, nothing deleted).
//!
//! **Which audit records concern a subject** ([`concerns`]): a record whose `actor` or
//! `resource` is the subject's entity reference, or (for a `Chitin::User`) whose payload names
//! the user at the top level in `requester`, `user`, `user_id`, `subject` or `principal`
//! (approvals, tool runs and decisions are recorded that way). The gateway's own records about
//! other principals are not theirs.

pub mod backup;
pub mod erase;
pub mod export;
pub mod offsite;
pub mod retention;
pub mod s3;
pub mod schedule;

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chitin_audit::{AuditLog, Record};
use rusqlite::Connection;

use crate::clock::Clock;
use crate::gate::{Gate, GateError, Verdict};
use crate::store::{Store, StoreError};
use crate::vault::{Subject, Vault, VaultError};

/// Errors of the lifecycle operations. Messages say what to do; none carries content.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database: {0}")]
    Db(#[from] chitin_store::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit log: {0}; nothing was deleted or written")]
    Audit(#[from] chitin_audit::AuditError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("cannot {op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("policy denied `{action}` for {principal} (determining policies: [{}])", policies.join(", "))]
    Denied {
        action: String,
        principal: String,
        policies: Vec<String>,
    },
    #[error(
        "{subject} is under legal hold ({reason}); release it with `chitin retention release --subject '{subject}'` first"
    )]
    Held { subject: String, reason: String },
    #[error("{0}")]
    Backup(String),
    #[error("a gateway is running on {home} (it holds {lock}); stop it before restoring a backup")]
    GatewayRunning { home: PathBuf, lock: PathBuf },
    #[error(
        "another gateway is already running on {home} (it holds {lock}); one gateway serves a state directory: \
         use the running one (`chitin status`), stop it first, or give this one its own state directory with CHITIN_HOME"
    )]
    AlreadyRunning { home: PathBuf, lock: PathBuf },
}

pub(crate) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> LifecycleError + 'a {
    move |source| LifecycleError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// What the lifecycle operations run on (the gateway and the CLI hold all of it).
#[derive(Clone)]
pub struct Lifecycle {
    pub home: PathBuf,
    pub store: Arc<Store>,
    pub audit: Arc<AuditLog>,
    pub vault: Arc<Vault>,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("home", &self.home)
            .finish_non_exhaustive()
    }
}

/// Whether audit record `r` concerns `subject` (see the module documentation).
pub fn concerns(r: &Record, subject: &Subject) -> bool {
    let s = subject.to_string();
    if r.actor == s || r.resource == s {
        return true;
    }
    let Some(user) = subject.user_id() else {
        return false;
    };
    let Some(serde_json::Value::Object(p)) = r.payload_json() else {
        return false;
    };
    ["requester", "user", "user_id", "subject", "principal"]
        .iter()
        .filter_map(|k| p.get(*k).and_then(serde_json::Value::as_str))
        .any(|v| v == user || v == s)
}

/// Rebuilds `conn`'s database so no free page keeps deleted content, then truncates its WAL.
/// Returns false when the WAL could not be truncated now (another connection is reading); it
/// is then truncated at the next checkpoint.
pub fn scrub(conn: &Connection) -> Result<bool, rusqlite::Error> {
    conn.execute_batch("VACUUM;")?;
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))?;
    Ok(busy == 0)
}

/// The tables retention and erasure delete from (what [`scrub_store`] vacuums on PostgreSQL).
const DELETED_FROM: &[&str] = &[
    "messages",
    "sessions",
    "runs",
    "usage",
    "approvals",
    "memory_docs",
    "memory_fts",
    "memory_terms",
    "memory_index_keys",
    "memory_cursor",
    "workflow_runs",
    "workflow_steps",
    "workflow_pauses",
    "workflow_state",
    "hook_deliveries",
    "channel_events",
    "channel_outbox",
    "pairing_requests",
    "managed_entities",
    "cron_jobs",
    "cron_firings",
    "api_tokens",
    "web_sessions",
    "devices",
    "account_users",
];

/// [`scrub`] for the state store on either backend. SQLite: rebuilt, WAL truncated.
/// PostgreSQL has no `secure_delete` and no WAL of ours to truncate: the tables deleted from
/// are `VACUUM`ed, so the dead rows' space is reclaimed for reuse (their bytes stay in the
/// pages until overwritten; the database belongs on encrypted storage, `docs/storage.md`).
/// Returns false when the rebuild could not be done now.
pub fn scrub_store(store: &Store) -> Result<bool, LifecycleError> {
    let db = store.db();
    match db.dialect() {
        crate::store::Dialect::Sqlite => {
            let c = db
                .sqlite_connection()
                .ok_or_else(|| LifecycleError::Backup("no SQLite connection".into()))??;
            let done = scrub(&c)?;
            drop(c);
            // Written through the raw connection: durable before the erasure is reported.
            db.flush()?;
            Ok(done)
        }
        crate::store::Dialect::Postgres => {
            let list = DELETED_FROM.join(", ");
            db.with(|c| c.execute_batch(&format!("VACUUM {list}")))?;
            Ok(true)
        }
    }
}

/// Scrubs the audit database (after payload removals): its own connection, `secure_delete`,
/// `VACUUM`, WAL truncated.
pub fn scrub_audit_db(db: &Path) -> Result<bool, LifecycleError> {
    let conn = Connection::open(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    Ok(scrub(&conn)?)
}

/// `sha256:<hex>` of a subject, for records that must not carry the subject itself (erasure
/// receipts). Same as [`Subject::digest`].
pub fn subject_digest(subject: &Subject) -> String {
    subject.digest()
}

/// Decides an administrative action (`data.export`, `retention.run`, `backup.restore`, ...) for
/// `Chitin::User::"<user>"` on the gateway, through the gate (which records the decision). `user`
/// is the real principal: the CLI's configured operator, or the gateway's authenticated user.
pub fn admin_check(
    gate: &Gate,
    user: &str,
    action: crate::policy::Action,
) -> Result<(), LifecycleError> {
    let req = crate::gate::admin_request(user, action, serde_json::Map::new())?;
    match gate.check(&req)? {
        Verdict::Allowed(..) => Ok(()),
        Verdict::Denied(d) | Verdict::ApprovalRequired { decision: d, .. } => {
            Err(LifecycleError::Denied {
                action: action.as_str().into(),
                principal: format!("Chitin::User::{user:?}"),
                policies: d.policies,
            })
        }
    }
}

/// The lock file a running gateway holds (exclusive `flock`) for as long as it runs.
pub const GATEWAY_LOCK: &str = "gateway.lock";

/// Proof that this process is the gateway of a state directory: holds an exclusive lock on
/// `gateway.lock` until dropped. `chitin backup restore` refuses while one is held.
#[derive(Debug)]
pub struct GatewayLock {
    _file: std::fs::File,
}

impl GatewayLock {
    /// Takes the lock; an error when another gateway already runs on `home`.
    pub fn acquire(home: &Path) -> Result<Self, LifecycleError> {
        let path = home.join(GATEWAY_LOCK);
        let file = open_lock(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(LifecycleError::GatewayRunning {
                home: home.to_path_buf(),
                lock: path,
            }),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path, "lock")(e)),
        }
    }

    /// Takes the lock for a starting gateway: the same lock as [`Self::acquire`], with an
    /// error that says a gateway already serves `home` (not what a restore needs).
    pub fn acquire_for_gateway(home: &Path) -> Result<Self, LifecycleError> {
        Self::acquire(home).map_err(|e| match e {
            LifecycleError::GatewayRunning { home, lock } => {
                LifecycleError::AlreadyRunning { home, lock }
            }
            other => other,
        })
    }
}

fn open_lock(path: &Path) -> Result<std::fs::File, LifecycleError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err(path, "open"))
}

/// Notes for `chitin security audit`: data classes kept forever, and no backup recipient.
pub fn findings(config: &crate::config::Config) -> Vec<(String, &'static str, String, String)> {
    let mut out = Vec::new();
    for (class, period) in config.retention.classes() {
        if period == crate::config::retention::Period::Forever {
            out.push((
                format!("retention.forever.{class}"),
                "info",
                format!("[retention] {class} = \"forever\": this data is never deleted (GDPR storage limitation, Art. 5(1)(e))"),
                format!("set [retention] {class} to a duration such as \"365d\" unless keeping it forever is required"),
            ));
        }
    }
    out
}
