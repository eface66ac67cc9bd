//! The `[cli]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[cli]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[cli]
# The Cedar user the `chitin` command line acts as: Chitin::User::"<operator>". Every
# administrative command (token show/rotate, secrets set/rm/get --reveal, backup
# create/restore, retention run/hold/release, data export/erase, audit query/export/append)
# is decided by the policies for this user and recorded in the audit log with it.
# "" = the gateway owner ([gateway] owner). On the command line the real control is access to
# the state directory and the secret store's passphrase; this decision is an additional
# policy check and the audit record.
operator = ""
"#;

/// The `[cli]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CliConfig {
    pub operator: String,
}

impl CliConfig {
    /// Checks the operator name: no surrounding spaces, no control characters.
    pub fn validate(&self) -> Result<(), String> {
        let o = &self.operator;
        if o.trim() != o || o.chars().any(char::is_control) {
            return Err(
                "[cli] operator must be a user id without surrounding spaces or control characters (\"\" = the gateway owner)"
                    .into(),
            );
        }
        Ok(())
    }
}
