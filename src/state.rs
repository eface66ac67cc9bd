//! The state directory (`CHITIN_HOME`, default `~/.chitin`).
//!
//! Invariants: the directory is created 0700 and every file Chitin writes there is 0600.
//! Chitin refuses to use a state directory that is itself, or contains a file or directory
//! that is, group- or world-writable, and names the path and the `chmod` that fixes it.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors about the state directory and its files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "refusing to start: {path} is {what} (mode {mode:04o}); fix it with `chmod {fix} {path}`"
    )]
    Permissions {
        path: PathBuf,
        what: &'static str,
        mode: u32,
        fix: &'static str,
    },
    #[error("state directory {path} does not exist; create it with `chitin init`")]
    Missing { path: PathBuf },
    #[error("{path} is not a directory; point CHITIN_HOME at a directory")]
    NotADirectory { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StateError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How deep the permission check descends (the state dir is shallow by design).
const CHECK_DEPTH: usize = 4;

/// A checked state directory.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// Creates the state directory (0700) when missing, then checks it.
    pub fn create(root: &Path) -> Result<Self, StateError> {
        match fs::metadata(root) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(root)
                    .map_err(|e| StateError::io("create", root, e))?;
                // DirBuilder's mode is filtered by the umask; make it exact.
                fs::set_permissions(root, fs::Permissions::from_mode(0o700))
                    .map_err(|e| StateError::io("set permissions on", root, e))?;
            }
            Err(e) => return Err(StateError::io("inspect", root, e)),
        }
        Self::open(root)
    }

    /// Opens an existing state directory after checking its permissions.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let meta = match fs::metadata(root) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::Missing {
                    path: root.to_path_buf(),
                });
            }
            Err(e) => return Err(StateError::io("inspect", root, e)),
        };
        if !meta.is_dir() {
            return Err(StateError::NotADirectory {
                path: root.to_path_buf(),
            });
        }
        let home = Self {
            root: root.to_path_buf(),
        };
        home.check_permissions()?;
        Ok(home)
    }

    /// Opens the state directory if it exists (`None` if it does not).
    pub fn open_if_exists(root: &Path) -> Result<Option<Self>, StateError> {
        match Self::open(root) {
            Ok(h) => Ok(Some(h)),
            Err(StateError::Missing { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A path inside the state directory.
    pub fn path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.root.join(rel)
    }

    /// Refuses group/world-writable entries: the directory, and every file and directory
    /// below it (to a small depth). Symlinks are judged by what they point to.
    pub fn check_permissions(&self) -> Result<(), StateError> {
        check_entry(&self.root, true)?;
        check_tree(&self.root, CHECK_DEPTH, true)
    }

    /// Creates a directory inside the state dir with mode 0700 (no-op if it exists).
    pub fn ensure_dir(&self, rel: impl AsRef<Path>) -> Result<PathBuf, StateError> {
        let p = self.path(rel);
        if !p.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&p)
                .map_err(|e| StateError::io("create", &p, e))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
                .map_err(|e| StateError::io("set permissions on", &p, e))?;
        }
        Ok(p)
    }

    /// Writes a file only if it does not exist yet (mode 0600). Returns whether it wrote.
    /// This is how `chitin init` stays idempotent and never overwrites an operator's edits.
    pub fn write_if_absent(
        &self,
        rel: impl AsRef<Path>,
        contents: &[u8],
    ) -> Result<bool, StateError> {
        let p = self.path(rel);
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(StateError::io("create", &p, e)),
        };
        f.write_all(contents)
            .and_then(|()| f.sync_all())
            .map_err(|e| StateError::io("write", &p, e))?;
        Ok(true)
    }
}

/// Writes `contents` to `path` atomically: a 0600 temporary file in the same directory,
/// fsync, rename over the target, fsync the directory. A crash leaves the old or the new file,
/// never a half-written one.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        StateError::io("write", path, e)
    })
}

/// Creates an empty 0600 file if it is missing (used before SQLite opens a database, so the
/// database and its -wal/-shm companions are never world-readable).
pub fn ensure_private_file(path: &Path) -> Result<(), StateError> {
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(StateError::io("create", path, e)),
    }
}

/// Refuses a file or directory that others may write to, wherever it lives (policy files,
/// entity files and the config can sit outside the state dir). Follows symlinks, and checks
/// the directory that holds the file too.
pub fn check_not_writable_by_others(path: &Path) -> Result<(), StateError> {
    let meta = fs::metadata(path).map_err(|e| StateError::io("inspect", path, e))?;
    check_entry(path, meta.is_dir())?;
    if !meta.is_dir()
        && let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
    {
        check_entry(parent, true)?;
    }
    Ok(())
}

fn check_entry(path: &Path, is_dir: bool) -> Result<(), StateError> {
    let meta = fs::metadata(path).map_err(|e| StateError::io("inspect", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        let what = match (is_dir, mode & 0o002 != 0) {
            (true, true) => "a world-writable directory",
            (true, false) => "a group-writable directory",
            (false, true) => "a world-writable file",
            (false, false) => "a group-writable file",
        };
        let fix = if is_dir { "700" } else { "600" };
        return Err(StateError::Permissions {
            path: path.to_path_buf(),
            what,
            mode,
            fix,
        });
    }
    Ok(())
}

fn check_tree(dir: &Path, depth: usize, top: bool) -> Result<(), StateError> {
    let entries = fs::read_dir(dir).map_err(|e| StateError::io("read", dir, e))?;
    let mut subdirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StateError::io("read", dir, e))?;
        let path = entry.path();
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            // A dangling symlink grants nothing; ignore it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(StateError::io("inspect", &path, e)),
        };
        check_entry(&path, meta.is_dir())?;
        if meta.is_dir() && !entry.file_type().is_ok_and(|t| t.is_symlink()) {
            subdirs.push(path);
        }
    }
    if depth > 0 {
        for sub in subdirs {
            // The agent workspace lives under the state dir by default; what the agent writes
            // there is not Chitin's state, so it is not held to these rules.
            if top
                && sub
                    .file_name()
                    .is_some_and(|n| n == "workspace" || n == "workspaces")
            {
                continue;
            }
            check_tree(&sub, depth - 1, false)?;
        }
    }
    Ok(())
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
    fn a_new_state_dir_is_created_private() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("home");
        let home = Home::create(&root).unwrap();
        let mode = fs::metadata(home.root()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(home.write_if_absent("a.txt", b"x").unwrap());
        let mode = fs::metadata(home.path("a.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn write_if_absent_never_overwrites() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::create(&t.path().join("h")).unwrap();
        assert!(home.write_if_absent("c.toml", b"first").unwrap());
        assert!(!home.write_if_absent("c.toml", b"second").unwrap());
        assert_eq!(fs::read(home.path("c.toml")).unwrap(), b"first");
    }

    #[test]
    fn a_world_writable_state_dir_is_refused_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("h");
        Home::create(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Home::open(&root).unwrap_err().to_string();
        assert!(err.contains("world-writable directory"), "{err}");
        assert!(
            err.contains(&format!("chmod 700 {}", root.display())),
            "{err}"
        );
    }

    #[test]
    fn a_group_writable_file_inside_is_refused_and_named() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::create(&t.path().join("h")).unwrap();
        home.ensure_dir("policies").unwrap();
        home.write_if_absent("policies/x.cedar", b"").unwrap();
        let f = home.path("policies/x.cedar");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o664)).unwrap();
        let err = Home::open(home.root()).unwrap_err().to_string();
        assert!(err.contains("group-writable file"), "{err}");
        assert!(err.contains(&format!("chmod 600 {}", f.display())), "{err}");
    }

    #[test]
    fn atomic_writes_replace_whole_files_with_private_mode() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let leftovers: Vec<_> = fs::read_dir(t.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }
}
