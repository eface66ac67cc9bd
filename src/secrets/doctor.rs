//! Checks for `chitin doctor` / `chitin security audit`: secret-file permissions, a plaintext
//! identity, a missing identity, leftover temp files. Needs no passphrase and decrypts
//! nothing.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::config::secrets::{IdentityBackend, SecretsConfig};

use super::{IDENTITY_ENCRYPTED_FILE, IDENTITY_PLAINTEXT_FILE, STORE_FILE, fsutil};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warn,
    Critical,
}

/// One finding, with a stable id for `--json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub id: &'static str,
    pub severity: Severity,
    pub message: String,
    pub fix: String,
}

/// Runs every secrets check for the state directory `home`.
pub fn findings(home: &Path, cfg: &SecretsConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    if let Err(e) = cfg.validate() {
        out.push(Finding {
            id: "secrets.config_invalid",
            severity: Severity::Critical,
            message: e,
            fix: "edit the [secrets] section of chitin.toml".into(),
        });
    }
    if cfg.backend != IdentityBackend::File && cfg.scrypt_work_factor < 16 {
        out.push(Finding {
            id: "secrets.weak_scrypt",
            severity: Severity::Warn,
            message: format!(
                "[secrets] scrypt_work_factor = {} makes passphrase guessing cheap",
                cfg.scrypt_work_factor
            ),
            fix: "use scrypt_work_factor = 18 (the default), then `chitin secrets rotate-key`"
                .into(),
        });
    }
    let uid = fsutil::effective_uid().ok();
    for name in [STORE_FILE, IDENTITY_ENCRYPTED_FILE, IDENTITY_PLAINTEXT_FILE] {
        let path = home.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            out.push(Finding {
                id: "secrets.file_symlink",
                severity: Severity::Critical,
                message: format!("{} is a symbolic link", path.display()),
                fix: format!(
                    "replace {} with the regular file it points to",
                    path.display()
                ),
            });
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(Finding {
                id: "secrets.file_permissions",
                severity: Severity::Critical,
                message: format!(
                    "{} has mode {mode:04o} (other users can reach it)",
                    path.display()
                ),
                fix: format!("chmod 600 {}", path.display()),
            });
        }
        if uid.is_some_and(|u| u != meta.uid()) {
            out.push(Finding {
                id: "secrets.file_owner",
                severity: Severity::Critical,
                message: format!("{} is owned by uid {}", path.display(), meta.uid()),
                fix: format!("chown $(id -u) {}", path.display()),
            });
        }
    }
    let plain = home.join(IDENTITY_PLAINTEXT_FILE);
    if fsutil::exists(&plain) {
        let allowed = cfg.backend == IdentityBackend::File && cfg.allow_plaintext_identity;
        out.push(Finding {
            id: "secrets.identity_plaintext",
            severity: if allowed { Severity::Warn } else { Severity::Critical },
            message: format!(
                "the secret store identity is UNENCRYPTED in {}{}",
                plain.display(),
                if allowed { " (allowed by allow_plaintext_identity = true)" } else { " and the config does not allow it" }
            ),
            fix: format!(
                "set [secrets] backend = \"passphrase\" (or \"auto\"), run `chitin secrets import-identity < {0}`, then delete {0}",
                plain.display()
            ),
        });
    }
    let store = home.join(STORE_FILE);
    if fsutil::exists(&store)
        && !fsutil::exists(&plain)
        && !fsutil::exists(&home.join(IDENTITY_ENCRYPTED_FILE))
    {
        out.push(Finding {
            id: "secrets.identity_missing",
            severity: Severity::Critical,
            message: format!("{} exists but no identity protects it", store.display()),
            fix: "restore the identity with `chitin secrets import-identity`".into(),
        });
    }
    if let Ok(rd) = std::fs::read_dir(home) {
        for e in rd.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with('.') && n.contains(".tmp.") && n.contains("secrets") {
                out.push(Finding {
                    id: "secrets.stale_temp_file",
                    severity: Severity::Info,
                    message: format!(
                        "{} is left over from an interrupted write (the store itself is intact)",
                        e.path().display()
                    ),
                    fix: format!("rm {}", e.path().display()),
                });
            }
        }
    }
    out
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
    fn a_plaintext_identity_and_wide_permissions_are_flagged() {
        let d = tempfile::tempdir().unwrap();
        let cfg = SecretsConfig {
            backend: IdentityBackend::File,
            allow_plaintext_identity: true,
            ..SecretsConfig::default()
        };
        assert!(findings(d.path(), &cfg).is_empty());
        fsutil::write_atomic(&d.path().join(IDENTITY_PLAINTEXT_FILE), b"x").unwrap();
        fsutil::write_atomic(&d.path().join(STORE_FILE), b"x").unwrap();
        std::fs::set_permissions(
            d.path().join(STORE_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let f = findings(d.path(), &cfg);
        let ids: Vec<_> = f.iter().map(|f| f.id).collect();
        assert_eq!(
            ids,
            ["secrets.file_permissions", "secrets.identity_plaintext"]
        );
        assert_eq!(f[1].severity, Severity::Warn);
        let strict = findings(d.path(), &SecretsConfig::default());
        assert_eq!(strict[1].severity, Severity::Critical);
    }

    #[test]
    fn a_store_without_identity_is_flagged() {
        let d = tempfile::tempdir().unwrap();
        fsutil::write_atomic(&d.path().join(STORE_FILE), b"x").unwrap();
        let ids: Vec<_> = findings(d.path(), &SecretsConfig::default())
            .iter()
            .map(|f| f.id)
            .collect();
        assert_eq!(ids, ["secrets.identity_missing"]);
    }
}
