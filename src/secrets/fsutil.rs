//! File handling for secret files: private reads (no symlinks, 0600, owned by us) and
//! atomic writes (temp file in the same directory, fsync, rename, fsync the directory).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::SecretsError;

/// The effective uid of this process, read from `/proc/self/status` (no `unsafe` here).
pub fn effective_uid() -> Result<u32, SecretsError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| SecretsError::Io {
        path: PathBuf::from("/proc/self/status"),
        op: "read",
        source: e,
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|rest| rest.split_whitespace().nth(1))
        .and_then(|euid| euid.parse().ok())
        .ok_or_else(|| SecretsError::Io {
            path: PathBuf::from("/proc/self/status"),
            op: "parse the effective uid from",
            source: std::io::Error::other("no Uid: line"),
        })
}

/// Checks that an open secret file is private: a regular file, owned by us, no group/other
/// bits.
pub fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), SecretsError> {
    if !meta.is_file() {
        return Err(SecretsError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let uid = effective_uid()?;
    if meta.uid() != uid {
        return Err(SecretsError::Owner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            uid,
        });
    }
    Ok(())
}

/// Reads a private file completely, refusing symlinks, wide permissions and foreign owners.
/// `Ok(None)` when it does not exist.
pub fn read_private(path: &Path) -> Result<Option<Zeroizing<Vec<u8>>>, SecretsError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(SecretsError::Symlink {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(SecretsError::io(path, "open", e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| SecretsError::io(path, "stat", e))?;
    check_private(path, &meta)?;
    let cap = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut buf = Zeroizing::new(Vec::with_capacity(cap));
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        let n = file
            .read(&mut chunk[..])
            .map_err(|e| SecretsError::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        let Some(part) = chunk.get(..n) else { break };
        super::format::reserve_zeroizing(&mut buf, n);
        buf.extend_from_slice(part);
    }
    Ok(Some(buf))
}

/// Whether `path` exists (without following a final symlink).
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Replaces `path` with `bytes` atomically: a crash leaves either the old or the new file,
/// never a mix. The new file is created 0600 with `O_EXCL`, fsynced, renamed over `path`,
/// then the directory is fsynced so the rename survives power loss.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SecretsError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("secret");
    // O_EXCL makes a name collision an error, never a race; the name only has to be unusual.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let nonce = format!("{}.{nanos:x}", std::process::id());
    let tmp = dir.join(format!(".{file_name}.tmp.{nonce}"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| SecretsError::io(&tmp, "create", e))?;
        f.write_all(bytes)
            .map_err(|e| SecretsError::io(&tmp, "write", e))?;
        f.sync_all()
            .map_err(|e| SecretsError::io(&tmp, "fsync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| SecretsError::io(path, "rename into", e))?;
        let d = File::open(dir).map_err(|e| SecretsError::io(dir, "open", e))?;
        d.sync_all()
            .map_err(|e| SecretsError::io(dir, "fsync", e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates the state directory (0700) if it is missing.
pub fn ensure_dir(dir: &Path) -> Result<(), SecretsError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SecretsError::io(dir, "create directory", e))
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
    fn an_atomic_write_leaves_a_private_file_and_no_temp_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.age");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(&read_private(&p).unwrap().unwrap()[..], b"two");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_group_readable_file_and_a_symlink_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.age");
        write_atomic(&p, b"one").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            read_private(&p),
            Err(SecretsError::Permissions { mode: 0o640, .. })
        ));
        let l = d.path().join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(matches!(
            read_private(&l),
            Err(SecretsError::Symlink { .. })
        ));
    }
}
