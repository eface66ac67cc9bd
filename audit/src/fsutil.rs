//! Private files: state files are 0600, directories 0700, and never followed through symlinks.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::AuditError;

fn io(what: String) -> impl FnOnce(std::io::Error) -> AuditError {
    move |source| AuditError::Io { what, source }
}

/// Creates `dir` (and parents) with mode 0700 if missing. Refuses a symlink.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), AuditError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => Err(AuditError::Unsafe(format!(
            "{} is a symlink; the audit state directory must be a real directory",
            dir.display()
        ))),
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(AuditError::Unsafe(format!(
            "{} exists and is not a directory",
            dir.display()
        ))),
        Err(_) => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(format!("create directory {}", dir.display()))),
    }
}

/// Refuses a symlink, or a file that group or others can read or write.
pub(crate) fn check_private(path: &Path) -> Result<(), AuditError> {
    let m = std::fs::symlink_metadata(path).map_err(io(format!("inspect {}", path.display())))?;
    if m.file_type().is_symlink() {
        return Err(AuditError::Unsafe(format!(
            "{} is a symlink; refusing to use it",
            path.display()
        )));
    }
    if m.mode() & 0o077 != 0 {
        return Err(AuditError::Unsafe(format!(
            "{} has mode {:o}; run `chmod 600 {}`",
            path.display(),
            m.mode() & 0o777,
            path.display()
        )));
    }
    Ok(())
}

/// Creates a new 0600 file; fails if it exists.
pub(crate) fn create_private_new(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("create {}", path.display())))
}

/// Opens (creating 0600 if needed) a file for appending. Refuses a symlink.
pub(crate) fn open_append_private(path: &Path) -> Result<File, AuditError> {
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_symlink()
    {
        return Err(AuditError::Unsafe(format!(
            "{} is a symlink; refusing to use it",
            path.display()
        )));
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("open {}", path.display())))
}

/// Writes `text` to `path` as 0600 (replacing the file atomically).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<(), AuditError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = create_private_new(&tmp)?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(format!("write {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("rename to {}", path.display())))?;
    Ok(())
}

/// Makes an existing file 0600 (SQLite creates its files with the umask).
pub(crate) fn chmod_private(path: &Path) -> Result<(), AuditError> {
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(format!("chmod 600 {}", path.display())))?;
    }
    Ok(())
}
