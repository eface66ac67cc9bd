//! The one error type of the skills crate. `Display` is the one-line reason the CLI prints
//! (`unsigned`, `signature invalid: ...`, `file changed: PATH`, ...): a contract.

use std::path::PathBuf;

/// Why a skill, a key, a bundle or an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum SkillError {
    /// No `skill.sigstore.json` next to `SKILL.md`.
    #[error("unsigned")]
    Unsigned,
    /// The bundle is malformed, the signature does not verify, or it does not cover this
    /// manifest.
    #[error("signature invalid: {0}")]
    SignatureInvalid(String),
    /// A signed file's content differs (or the file is gone).
    #[error("file changed: {0}")]
    FileChanged(String),
    /// A signed file is missing from the skill directory.
    #[error("file changed: {0} (missing)")]
    FileMissing(String),
    /// A file that the signature does not cover.
    #[error("extra file: {0}")]
    ExtraFile(String),
    /// The signature was made by a key that is not trusted (so it cannot even be checked),
    /// or by an identity that policy does not trust.
    #[error("untrusted signer: {0}")]
    UntrustedSigner(String),
    /// A symlink, device, FIFO or badly named file inside the skill directory.
    #[error("unsafe file: {path}: {why}")]
    UnsafeFile { path: String, why: String },
    /// An archive entry that would leave the skill directory, or a link, or a limit hit.
    #[error("unsafe archive entry: {0}")]
    UnsafeArchiveEntry(String),
    /// A limit (files, bytes) was exceeded.
    #[error("too large: {0}")]
    TooLarge(String),
    /// `SKILL.md` is missing or its front matter is not valid.
    #[error("invalid SKILL.md: {0}")]
    InvalidSkillMd(String),
    /// A manifest text that is not in canonical form.
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    /// A key file that cannot be read or is not the expected format.
    #[error("invalid key {path}: {why}")]
    InvalidKey { path: PathBuf, why: String },
    /// A trusted root that cannot be parsed.
    #[error("invalid trusted root: {0}")]
    TrustedRoot(String),
    /// File system errors, with the path.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SkillError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
