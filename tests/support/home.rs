//! A private state directory for tests that unlock the secret store (which holds the audit
//! signing key): mode 0700, with a config that uses the passphrase backend and cheap scrypt.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Config for tests: passphrase backend (no keyring), scrypt work factor 16 (fast, and not
/// flagged as weak by `chitin doctor`).
pub const TEST_SECRETS_CONFIG: &str =
    "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n";

/// Creates `parent/name` (0700) with `chitin.toml` (0600) holding [`TEST_SECRETS_CONFIG`].
pub fn private_home(parent: &Path, name: &str) -> PathBuf {
    let home = parent.join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    write_private(&home.join("chitin.toml"), TEST_SECRETS_CONFIG.as_bytes());
    home
}

/// Writes a new 0600 file.
pub fn write_private(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, bytes).unwrap();
}

/// The entities `chitin init` writes: `User::"owner"` (the default CLI operator and gateway
/// owner) in `Group::"owners"`, plus `User::"mallory"`, who is in no group.
#[allow(
    dead_code,
    reason = "not every test binary that includes this file needs it"
)]
pub const OWNER_ENTITIES: &str = r#"[
  {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
  {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
  {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []}
]
"#;

/// Writes [`OWNER_ENTITIES`] as `home/entities.json` (0600).
#[allow(
    dead_code,
    reason = "not every test binary that includes this file needs it"
)]
pub fn write_owner_entities(home: &Path) {
    write_private(&home.join("entities.json"), OWNER_ENTITIES.as_bytes());
}
