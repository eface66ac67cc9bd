//! The `[audit]` section of `chitin.toml`.

use std::time::Duration;

use serde::Deserialize;

/// Documentation and defaults for the `[audit]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[audit]
# The audit log lives in the state directory: audit.db (SQLite, append-only), audit.checkpoints
# (one signed checkpoint per line), audit.key (0600 Ed25519 signing key) and audit.pub.
# Write a signed checkpoint at least every this many records (0 = only on time and shutdown).
checkpoint_every_records = 1000
# ...and every this many seconds, also when idle (a heartbeat; 0 = never on time).
checkpoint_interval_secs = 60
# Most records committed (and fsynced) together in one transaction.
max_batch = 1024
# How long a write waits for a lock held by another process before it fails (fail closed).
lock_timeout_ms = 2000
# Refuse to grow audit.db beyond this many MiB (0 = no limit). When reached, audited actions
# are refused and /ready reports the audit sink as failed.
max_db_mb = 0
# `chitin security audit` and `chitin doctor` report audit.disk_low when the filesystem of the
# state directory has less than this many MiB free (high below a quarter of it; 0 = never).
min_free_disk_mb = 2048
"#;

/// The `[audit]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub checkpoint_every_records: u64,
    pub checkpoint_interval_secs: u64,
    pub max_batch: usize,
    pub lock_timeout_ms: u64,
    pub max_db_mb: u64,
    pub min_free_disk_mb: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every_records: 1000,
            checkpoint_interval_secs: 60,
            max_batch: 1024,
            lock_timeout_ms: 2000,
            max_db_mb: 0,
            min_free_disk_mb: 2048,
        }
    }
}

impl AuditConfig {
    /// Options for `chitin_audit::AuditLog::open` (real clock, key file signer, no sink: the
    /// gateway overrides `clock`, `signer` and `on_checkpoint` as it needs).
    pub fn options(&self) -> chitin_audit::AuditOptions {
        chitin_audit::AuditOptions {
            checkpoint_every_records: self.checkpoint_every_records,
            checkpoint_every_ms: i64::try_from(self.checkpoint_interval_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            max_batch: self.max_batch.max(1),
            lock_timeout: Duration::from_millis(self.lock_timeout_ms),
            max_db_bytes: (self.max_db_mb > 0).then(|| self.max_db_mb.saturating_mul(1 << 20)),
            ..chitin_audit::AuditOptions::default()
        }
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
    use super::*;

    #[test]
    fn the_template_parses_to_the_defaults() {
        #[derive(Deserialize)]
        struct Wrap {
            audit: AuditConfig,
        }
        let w: Wrap = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(w.audit, AuditConfig::default());
    }

    #[test]
    fn an_unknown_audit_key_is_an_error() {
        #[derive(Debug, Deserialize)]
        #[expect(dead_code, reason = "only parsed")]
        struct Wrap {
            audit: AuditConfig,
        }
        let err = toml::from_str::<Wrap>("[audit]\ncheckpoint_every = 5\n").unwrap_err();
        assert!(err.to_string().contains("checkpoint_every"), "{err}");
    }
}
