//! The audit hook for secret use. Every release and reveal is recorded through
//! [`SecretAudit`] *before* the value is handed out; if recording fails, nothing is released.
//!
//! The hash-chained audit log ([`chitin_audit::AuditLog`]) implements it; tests may use their
//! own implementations (e.g. one that fails, to show nothing is released).

use super::SecretName;

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

/// Secret events go to the hash-chained audit log: releases and reveals as `secret_use`
/// records, store changes as `admin` records. Names, audiences, hosts and actors only.
impl SecretAudit for chitin_audit::AuditLog {
    fn record_release(
        &self,
        name: &SecretName,
        audience: &[String],
        who: &str,
        host: &str,
    ) -> Result<(), String> {
        let input = chitin_audit::RecordInput::new(
            chitin_audit::Kind::SecretUse,
            who,
            "secret.use",
            format!("Chitin::Secret::{:?}", name.as_str()),
        )
        .with_payload(serde_json::json!({"event": "release", "audience": audience, "host": host}));
        self.append(input).map(|_| ()).map_err(|e| e.to_string())
    }

    fn record_reveal(&self, name: &SecretName, who: &str) -> Result<(), String> {
        let input = chitin_audit::RecordInput::new(
            chitin_audit::Kind::SecretUse,
            who,
            "secret.reveal",
            format!("Chitin::Secret::{:?}", name.as_str()),
        )
        .with_payload(serde_json::json!({"event": "reveal"}));
        self.append(input).map(|_| ()).map_err(|e| e.to_string())
    }

    fn record_change(&self, op: &str, name: Option<&SecretName>, who: &str) -> Result<(), String> {
        let resource = name.map_or_else(
            || "secrets".to_string(),
            |n| format!("Chitin::Secret::{:?}", n.as_str()),
        );
        let input = chitin_audit::RecordInput::admin(
            who,
            format!("secrets.{op}"),
            resource,
            serde_json::json!({"event": op}),
        );
        self.append(input).map(|_| ()).map_err(|e| e.to_string())
    }
}
