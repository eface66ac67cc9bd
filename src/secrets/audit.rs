//! The audit hook for secret use. Every release and reveal is recorded through
//! [`SecretAudit`] *before* the value is handed out; if recording fails, nothing is released.
//!
//! The gateway implements this trait with the hash-chained audit log. Until that is wired,
//! the CLI uses [`FileSecretAudit`], an append-only JSON-lines file in the state directory.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::Clock;

use super::SecretName;
use super::fsutil;

/// Records secret use. Implementations must be durable before returning `Ok` and must never
/// receive a value: only names, audiences, hosts and who asked.
pub trait SecretAudit {
    /// A value was released for a request to `host` (or into a tool environment, then
    /// `host` is `env:<tool>`), on behalf of `who` (the Cedar principal).
    fn record_release(
        &self,
        name: &SecretName,
        audience: &[String],
        who: &str,
        host: &str,
    ) -> Result<(), String>;

    /// An operator printed the value (`chitin secrets get NAME --reveal`).
    fn record_reveal(&self, name: &SecretName, who: &str) -> Result<(), String>;

    /// A management operation: `set`, `rm`, `rotate-key`, `import-identity`,
    /// `export-identity`. `name` is the secret concerned, if any.
    fn record_change(&self, op: &str, name: Option<&SecretName>, who: &str) -> Result<(), String>;
}

/// An append-only JSON-lines audit file (`$CHITIN_HOME/secrets-audit.jsonl`, mode 0600),
/// fsynced after each record. Interim until the hash-chained audit log is wired in.
pub struct FileSecretAudit {
    path: PathBuf,
    clock: Arc<dyn Clock>,
}

/// The file name of the interim audit trail.
pub const AUDIT_FILE: &str = "secrets-audit.jsonl";

impl FileSecretAudit {
    pub fn new(home: &Path, clock: Arc<dyn Clock>) -> Self {
        Self {
            path: home.join(AUDIT_FILE),
            clock,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, record: serde_json::Value) -> Result<(), String> {
        let mut line = record.to_string();
        line.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
        let meta = f
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", self.path.display()))?;
        fsutil::check_private(&self.path, &meta).map_err(|e| e.to_string())?;
        f.write_all(line.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))
    }

    fn ts(&self) -> String {
        crate::clock::rfc3339(self.clock.now_ms())
    }
}

impl SecretAudit for FileSecretAudit {
    fn record_release(
        &self,
        name: &SecretName,
        audience: &[String],
        who: &str,
        host: &str,
    ) -> Result<(), String> {
        self.append(serde_json::json!({
            "ts": self.ts(), "event": "secret.release", "name": name.as_str(),
            "audience": audience, "who": who, "host": host,
        }))
    }

    fn record_reveal(&self, name: &SecretName, who: &str) -> Result<(), String> {
        self.append(serde_json::json!({
            "ts": self.ts(), "event": "secret.reveal", "name": name.as_str(), "who": who,
        }))
    }

    fn record_change(&self, op: &str, name: Option<&SecretName>, who: &str) -> Result<(), String> {
        self.append(serde_json::json!({
            "ts": self.ts(), "event": format!("secret.{op}"),
            "name": name.map(SecretName::as_str), "who": who,
        }))
    }
}
