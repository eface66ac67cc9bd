//! The `[skills]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[skills]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[skills]
# Installed skills live in the state directory under skills/: lock.json (name, version, digest,
# signer of each installed skill), trust.json (the trusted signers, 0600; change it only with
# `chitin skills trust add|remove`) and store/<name>/<digest>/ (read-only verified copies).
# Trust the Chitin project's signing key (it signs the skills shipped in the repository).
trust_project_key = true
# Sigstore trusted root (Fulcio CAs, Rekor and CT log keys, timestamp authorities) used to
# verify keyless signatures, as a trusted_root.json path; "" = the Sigstore public-good root
# shipped with Chitin. Verification never uses the network.
trusted_root = ""
# Most files in one skill (directory or archive entries).
max_files = 1000
# Most bytes in one skill, all files together, in MiB (archives: after decompression).
max_total_mb = 50
"#;

/// The `[skills]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SkillsConfig {
    pub trust_project_key: bool,
    pub trusted_root: String,
    pub max_files: usize,
    pub max_total_mb: u64,
}

impl Default for SkillsConfig {
    fn default() -> Self {
        Self {
            trust_project_key: true,
            trusted_root: String::new(),
            max_files: 1000,
            max_total_mb: 50,
        }
    }
}

impl SkillsConfig {
    /// The size limits.
    pub fn limits(&self) -> chitin_skills::Limits {
        chitin_skills::Limits {
            max_files: self.max_files.max(1),
            max_bytes: self.max_total_mb.saturating_mul(1 << 20),
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
        struct W {
            skills: SkillsConfig,
        }
        let w: W = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(w.skills, SkillsConfig::default());
    }
}
