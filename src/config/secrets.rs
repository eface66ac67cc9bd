//! The `[secrets]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[secrets]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[secrets]
# Secrets (API keys, bot tokens, signing keys) live in $CHITIN_HOME/secrets.age, an age file
# encrypted to an X25519 identity. This section says how that identity is protected.
#
# backend: "auto" | "keyring" | "passphrase" | "file"
#   auto       - "keyring" when the kernel keyring works for this process, else "passphrase".
#   keyring    - the identity is encrypted with your passphrase in secrets.identity.age (the
#                durable copy) and the unlocked identity is cached in the kernel keyring
#                (keyutils, per user), so later commands need no passphrase. The cache is lost
#                at reboot or after the persistent keyring expires; the passphrase then unlocks
#                the file again. A reboot never makes the store unreadable.
#   passphrase - the identity is encrypted with your passphrase (age scrypt) in
#                secrets.identity.age; every start needs CHITIN_PASSPHRASE or a prompt.
#   file       - the identity sits UNENCRYPTED in secrets.identity (mode 0600). Only allowed
#                with allow_plaintext_identity = true; `chitin doctor` flags it.
backend = "auto"
# Must be true for backend = "file". Anyone who can read secrets.identity can read every secret.
allow_plaintext_identity = false
# scrypt work factor (log2 N) used when encrypting the identity with a passphrase.
# 18 takes about 1 s; lower only for tests.
scrypt_work_factor = 18
# Highest scrypt work factor accepted when decrypting (protects against a planted file that
# would take hours to open). Must be >= scrypt_work_factor.
max_scrypt_work_factor = 22
"#;

/// How the age identity that encrypts the store is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityBackend {
    /// The kernel keyring when it works, else a passphrase.
    #[default]
    Auto,
    /// Passphrase-encrypted identity file, unlocked copy cached in the kernel keyring.
    Keyring,
    /// Passphrase-encrypted identity file only.
    Passphrase,
    /// Plaintext identity file (explicit opt-in).
    File,
}

impl IdentityBackend {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Keyring => "keyring",
            Self::Passphrase => "passphrase",
            Self::File => "file",
        }
    }
}

/// The `[secrets]` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    pub backend: IdentityBackend,
    pub allow_plaintext_identity: bool,
    pub scrypt_work_factor: u8,
    pub max_scrypt_work_factor: u8,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            backend: IdentityBackend::Auto,
            allow_plaintext_identity: false,
            scrypt_work_factor: 18,
            max_scrypt_work_factor: 22,
        }
    }
}

impl SecretsConfig {
    /// Checks the values that serde cannot; the message names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        if self.backend == IdentityBackend::File && !self.allow_plaintext_identity {
            return Err("[secrets] backend = \"file\" keeps the identity unencrypted on disk; \
                 set allow_plaintext_identity = true to accept that, or use backend = \"passphrase\""
                .into());
        }
        if !(1..=30).contains(&self.scrypt_work_factor) {
            return Err(format!(
                "[secrets] scrypt_work_factor = {} is out of range; use 1..=30 (default 18)",
                self.scrypt_work_factor
            ));
        }
        if self.max_scrypt_work_factor < self.scrypt_work_factor || self.max_scrypt_work_factor > 30
        {
            return Err(format!(
                "[secrets] max_scrypt_work_factor = {} must be between scrypt_work_factor ({}) and 30",
                self.max_scrypt_work_factor, self.scrypt_work_factor
            ));
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
        let c: toml::Table = toml::from_str(TEMPLATE).unwrap();
        let s: SecretsConfig = c["secrets"].clone().try_into().unwrap();
        let d = SecretsConfig::default();
        assert_eq!(s.backend, d.backend);
        assert_eq!(s.allow_plaintext_identity, d.allow_plaintext_identity);
        assert_eq!(s.scrypt_work_factor, d.scrypt_work_factor);
        assert_eq!(s.max_scrypt_work_factor, d.max_scrypt_work_factor);
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_plaintext_identity_without_opt_in_is_a_config_error() {
        let s: SecretsConfig = toml::from_str("backend = \"file\"").unwrap();
        let e = s.validate().unwrap_err();
        assert!(e.contains("allow_plaintext_identity = true"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let r: Result<SecretsConfig, _> = toml::from_str("bakend = \"file\"");
        assert!(r.is_err());
    }
}
