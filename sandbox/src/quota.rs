//! The workspace quota: how much disk space and how many inodes a workspace holds.
//!
//! Measured by the launcher before each run, through directory file descriptors (`openat`
//! with `O_NOFOLLOW`, `fstatat` with `AT_SYMLINK_NOFOLLOW`): symlinks are counted, never
//! followed, and other filesystems mounted inside the workspace are not entered. Bytes are
//! allocated bytes (`st_blocks * 512`, as `du`), each inode once (hard links); inodes are
//! every entry including directories. The walk stops as soon as a limit is passed, so its
//! cost is bounded by the quota.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sys;

/// A workspace quota; 0 means no limit for that dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    pub bytes: u64,
    pub inodes: u64,
}

/// What a measurement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
    /// The walk stopped early because a limit was passed (the real usage is higher).
    pub partial: bool,
}

impl Quota {
    pub fn is_unlimited(&self) -> bool {
        self.bytes == 0 && self.inodes == 0
    }

    /// Whether `u` is at or over a limit.
    pub fn exceeded_by(&self, u: &Usage) -> bool {
        (self.bytes != 0 && u.bytes >= self.bytes) || (self.inodes != 0 && u.inodes >= self.inodes)
    }

    /// Bytes left before the byte limit (`None`: no byte limit).
    pub fn bytes_left(&self, u: &Usage) -> Option<u64> {
        (self.bytes != 0).then(|| self.bytes.saturating_sub(u.bytes))
    }
}

impl fmt::Display for Usage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let more = if self.partial { "at least " } else { "" };
        write!(
            f,
            "{more}{} bytes in {more}{} inodes",
            self.bytes, self.inodes
        )
    }
}

/// Why a workspace could not be measured.
#[derive(Debug)]
pub struct MeasureError {
    pub path: PathBuf,
    pub source: io::Error,
}

fn cname(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn allocated(st: &libc::stat) -> u64 {
    u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512)
}

/// Measures the workspace at `root`, stopping once `quota` is exceeded.
pub fn measure(root: &Path, quota: &Quota) -> Result<Usage, MeasureError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MeasureError { path, source }
    };
    let c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
        .map_err(err(root))?;
    let top = sys::open_subdir(libc::AT_FDCWD, &c).map_err(err(root))?;
    let st = sys::lstat_at(top.as_raw_fd(), c".").map_err(err(root))?;
    let dev = st.st_dev;
    let mut usage = Usage {
        bytes: allocated(&st),
        inodes: 1,
        partial: false,
    };
    let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut stack: Vec<(OwnedFd, PathBuf)> = vec![(top, PathBuf::new())];
    while let Some((dir, rel)) = stack.pop() {
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(err(&root.join(&rel)))?;
        for entry in listing {
            let entry = entry.map_err(err(&root.join(&rel)))?;
            let name = entry.file_name();
            let path = rel.join(&name);
            let cn = cname(&name).map_err(err(&root.join(&path)))?;
            let st = match sys::lstat_at(dir.as_raw_fd(), &cn) {
                Ok(st) => st,
                // Removed between listing and stat: nothing to count.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(err(&root.join(&path))(e)),
            };
            usage.inodes += 1;
            if st.st_nlink <= 1 || seen.insert((st.st_dev, st.st_ino)) {
                usage.bytes = usage.bytes.saturating_add(allocated(&st));
            }
            if quota.exceeded_by(&usage) {
                usage.partial = true;
                return Ok(usage);
            }
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR && st.st_dev == dev {
                match sys::open_subdir(dir.as_raw_fd(), &cn) {
                    Ok(fd) => stack.push((fd, path)),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(err(&root.join(&path))(e)),
                }
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn files_directories_and_links_are_counted_once_and_never_followed() {
        let d = tempfile_dir();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a"), vec![1u8; 100_000]).unwrap();
        std::fs::hard_link(d.join("sub/a"), d.join("b")).unwrap();
        std::os::unix::fs::symlink("/usr", d.join("usr")).unwrap();
        let u = measure(&d, &Quota::default()).unwrap();
        // root, sub, sub/a, b (same inode as sub/a), usr
        assert_eq!(u.inodes, 5);
        assert!(u.bytes >= 100_000 && u.bytes < 200_000, "{u}");
        assert!(!u.partial);
        let q = Quota {
            bytes: 0,
            inodes: 3,
        };
        let u = measure(&d, &q).unwrap();
        assert!(u.partial && q.exceeded_by(&u), "{u}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("chitin-quota-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        d
    }
}
