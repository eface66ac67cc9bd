//! The `[backup]` section of `chitin.toml`: where encrypted backups go and who can read them.

use serde::Deserialize;

/// Documentation and defaults for the `[backup]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[backup]
# The age X25519 public key ("age1...") backups are encrypted to. Keep the matching identity
# OFF this machine. Make a pair with `age-keygen -o backup-identity.txt` (the public key is
# printed and written in the file's comment), or with `chitin backup keygen --out FILE`.
# "" = `chitin backup create` refuses and says how to make one.
recipient = ""
# Identity file used by `chitin backup verify` / `restore` when --identity is not given
# ("" = --identity is required).
identity = ""
# Scheduled backups (run by the gateway): directory for backup-<time>.chitin-backup files
# ("" = no scheduled backups), how often, and how many of the newest to keep.
dir = ""
interval_hours = 24
keep = 7
"#;

/// The `[backup]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    pub recipient: String,
    pub identity: String,
    pub dir: String,
    pub interval_hours: u64,
    pub keep: usize,
}

impl Default for BackupConfig {
    fn default() -> Self {
        Self {
            recipient: String::new(),
            identity: String::new(),
            dir: String::new(),
            interval_hours: 24,
            keep: 7,
        }
    }
}

impl BackupConfig {
    /// Checks the recipient (if set) is an age X25519 public key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.recipient.is_empty() && self.recipient.parse::<age::x25519::Recipient>().is_err() {
            return Err(
                "[backup] recipient is not an age X25519 public key (age1...); make one with `chitin backup keygen --out FILE`"
                    .into(),
            );
        }
        if self.keep == 0 {
            return Err("[backup] keep must be at least 1".into());
        }
        Ok(())
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
        struct W {
            backup: BackupConfig,
        }
        let w: W = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(w.backup, BackupConfig::default());
        assert!(w.backup.validate().is_ok());
    }

    #[test]
    fn a_recipient_that_is_not_an_age_key_is_refused() {
        let c = BackupConfig {
            recipient: "ssh-ed25519 AAAA".into(),
            ..BackupConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("age1"));
    }
}
