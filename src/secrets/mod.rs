//! Encrypted secrets: the age-encrypted store, identity protection (kernel keyring cache,
//! passphrase, or an explicitly allowed plaintext file), secret references in config, gated
//! and audited release, and redaction.
//!
//! Invariants:
//! - A secret value exists in plaintext only in memory, inside [`SecretValue`] (zeroized on
//!   drop, no `Debug`/`Display`/`Clone`). On disk it is only inside `secrets.age`.
//! - A value leaves the store only through [`SecretStore::release`] /
//!   [`SecretStore::release_to_tool_env`] (which need a gate [`crate::gate::Authorized`] for
//!   `secret.use` on exactly that secret, and an audit record written first) or
//!   [`SecretStore::reveal`] (operator CLI, audited first).
//! - The store file is never overwritten unless it decrypted completely first; every write is
//!   atomic.

pub mod audit;
pub mod audit_key;
pub mod doctor;
pub mod format;
pub mod fsutil;
pub mod gateway_token;
pub mod identity;
pub mod redact;
pub mod reference;
pub mod shared;
pub mod store;
pub mod tool_env;
pub mod value;

use std::path::{Path, PathBuf};

pub use audit::SecretAudit;
pub use identity::{PassphraseSource, Protection};
pub use redact::{Redactor, StreamRedactor};
pub use reference::{CredentialField, SecretRef};
pub use shared::SharedSecretStore;
pub use store::{SecretInfo, SecretStore};
pub use tool_env::ToolSecrets;
pub use value::{SecretName, SecretValue};

/// File names inside the state directory.
pub const STORE_FILE: &str = "secrets.age";
/// The passphrase-encrypted identity (age scrypt, armored).
pub const IDENTITY_ENCRYPTED_FILE: &str = "secrets.identity.age";
/// The plaintext identity (only with `allow_plaintext_identity = true`).
pub const IDENTITY_PLAINTEXT_FILE: &str = "secrets.identity";

/// Errors of the secrets component. No message ever contains a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{path} has mode {mode:04o}, which lets other users read or change it; \
         run `chmod 600 {path}`"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path} is owned by uid {owner}, not by this user (uid {uid}); \
         run `chown {uid} {path}` if the file is really yours"
    )]
    Owner { path: PathBuf, owner: u32, uid: u32 },
    #[error("{path} is a symbolic link; secret files must be regular files")]
    Symlink { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(
        "secret store {path} cannot be decrypted: {reason}. It was left untouched; \
         restore it from a backup, or move it away to start a new store"
    )]
    StoreCorrupt { path: PathBuf, reason: String },
    #[error(
        "secret store {path} is not encrypted to this identity; import the right one with \
         `chitin secrets import-identity`"
    )]
    WrongIdentity { path: PathBuf },
    #[error(
        "wrong passphrase for {path} (set CHITIN_PASSPHRASE or type it again); \
         nothing was changed"
    )]
    WrongPassphrase { path: PathBuf },
    #[error("identity file {path} cannot be used: {reason}")]
    IdentityCorrupt { path: PathBuf, reason: String },
    #[error(
        "secret store {store} exists but its identity is missing ({expected}); restore it with \
         `chitin secrets import-identity`"
    )]
    IdentityMissing { store: PathBuf, expected: PathBuf },
    #[error(
        "found a plaintext identity {path} but [secrets] backend = \"{backend}\"; protect it with \
         `chitin secrets import-identity < {path}` and then delete {path}, or set \
         backend = \"file\" and allow_plaintext_identity = true"
    )]
    UnexpectedPlaintextIdentity {
        path: PathBuf,
        backend: &'static str,
    },
    #[error("a passphrase is needed: {0}")]
    PassphraseUnavailable(String),
    #[error("the kernel keyring is not usable here ({0}); set [secrets] backend = \"passphrase\"")]
    KeyringUnavailable(String),
    #[error("invalid [secrets] configuration: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("invalid audience `{host}`: {reason}")]
    InvalidAudience { host: String, reason: String },
    #[error("invalid value for secret `{name}`: {reason}")]
    InvalidValue { name: String, reason: String },
    #[error("no secret named `{0}`; list them with `chitin secrets list`")]
    NotFound(String),
    #[error("release of secret `{name}` refused: {reason}")]
    ReleaseRefused { name: String, reason: String },
    #[error(
        "audit record for secret `{name}` could not be written ({reason}); the value was not released"
    )]
    AuditFailed { name: String, reason: String },
    #[error(
        "secret store {path} was changed by another process since it was opened; nothing was \
         written, run the command again"
    )]
    ConcurrentModification { path: PathBuf },
    #[error("encryption failed: {0}")]
    Encrypt(String),
    #[error("secret store contents are malformed: {0}")]
    Malformed(String),
}

impl SecretsError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}
