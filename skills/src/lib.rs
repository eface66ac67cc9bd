//! Chitin skills: the pieces that need no gateway.
//!
//! - [`manifest`]: every file of a skill with its SHA-256, in canonical text form.
//! - [`skillmd`]: the `SKILL.md` front-matter parser (AgentSkills/OpenClaw compatible).
//! - [`keys`]: operator ECDSA P-256 signing keys (PKCS#8 / SPKI PEM).
//! - [`signature`]: signing (public-key mode) and verification (keyless and public-key) of
//!   the Sigstore bundle `skill.sigstore.json`, offline.
//! - [`archive`]: safe unpacking of `.tar.gz` and `.zip` skills.
//!
//! Policy (who may install what, whose signatures count) is not decided here: the gateway
//! turns a [`signature::VerifiedSkill`] into a Cedar `Skill` entity and asks the gate.

pub mod archive;
mod error;
pub mod keys;
pub mod manifest;
pub mod signature;
pub mod skillmd;

pub use error::SkillError;
pub use keys::{PublicKey, SecretSigningKey};
pub use manifest::{FileEntry, Manifest, Tamper};
pub use signature::{
    Signer, TrustRoot, TrustedSigner, Verified, VerifiedSkill, parse_bundle, sign_skill_dir,
    verify_bundle, verify_skill_dir,
};
pub use skillmd::{SkillMeta, Version};

/// The signature bundle, next to `SKILL.md`, excluded from the manifest.
pub const BUNDLE_FILE: &str = "skill.sigstore.json";
/// The skill's description and instructions.
pub const SKILL_MD: &str = "SKILL.md";

/// Size limits for skill directories and archives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most files (archive entries, directories included).
    pub max_files: usize,
    /// Most bytes in all files together.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_files: 1000,
            max_bytes: 50 * 1024 * 1024,
        }
    }
}
