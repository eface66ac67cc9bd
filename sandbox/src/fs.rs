//! Safe wrappers for workspace-confined file access (`openat2(RESOLVE_BENEATH)` and the
//! `*at` calls), used by the file tools both in the gate (canonicalization) and in the
//! sandboxed file helper (enforcement).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &[u8]) -> io::Result<CString> {
    CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory as an `O_PATH` handle (the workspace root).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let p = cpath(path.as_os_str().as_bytes())?;
    // SAFETY: p is a valid NUL-terminated path.
    let fd = unsafe {
        libc::open(
            p.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(libc::c_long::from(fd))
}

/// `openat2(dir, rel, flags, mode)` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`: resolution
/// may never leave `dir` (by `..`, an absolute path or a symlink); escapes fail with `EXDEV`.
pub fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
    const RESOLVE_BENEATH: u64 = 0x08;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let p = cpath(rel.as_os_str().as_bytes())?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC).unwrap_or(0),
        mode: u64::from(mode),
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: p is a valid path, how is a valid open_how of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            p.as_ptr(),
            &how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    owned(r)
}

/// Creates `name` (one component) in `dir`, failing if anything exists there (never follows
/// a symlink).
pub fn create_excl_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<File> {
    let p = cpath(name.as_bytes())?;
    // SAFETY: p is valid; flags never follow links (O_EXCL|O_NOFOLLOW).
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            p.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    owned(libc::c_long::from(fd)).map(File::from)
}

/// `renameat(dir, from, dir, to)`: replaces the directory entry, never writes through a link.
pub fn rename_at(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (f, t) = (cpath(from.as_bytes())?, cpath(to.as_bytes())?);
    // SAFETY: both names are valid C strings.
    let r = unsafe { libc::renameat(dir.as_raw_fd(), f.as_ptr(), dir.as_raw_fd(), t.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// How [`rename2_at`] renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rename {
    /// Fails with `EEXIST` when `to` exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swaps `from` and `to` atomically; both must exist (`RENAME_EXCHANGE`).
    Exchange,
}

/// `renameat2(dir, from, dir, to, flags)`: the entries are renamed (or swapped) atomically,
/// never written through a link.
pub fn rename2_at(dir: BorrowedFd<'_>, from: &OsStr, to: &OsStr, how: Rename) -> io::Result<()> {
    let (f, t) = (cpath(from.as_bytes())?, cpath(to.as_bytes())?);
    let flags = match how {
        Rename::NoReplace => libc::RENAME_NOREPLACE,
        Rename::Exchange => libc::RENAME_EXCHANGE,
    };
    // SAFETY: both names are valid C strings; the flags are one of the two constants above.
    let r = unsafe {
        libc::renameat2(
            dir.as_raw_fd(),
            f.as_ptr(),
            dir.as_raw_fd(),
            t.as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `unlinkat(dir, name, 0)`.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let n = cpath(name.as_bytes())?;
    // SAFETY: n is a valid C string.
    let r = unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mkdirat(dir, name, mode)`.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let n = cpath(name.as_bytes())?;
    // SAFETY: n is a valid C string.
    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What `fstatat(.., AT_SYMLINK_NOFOLLOW)` says about one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryStat {
    pub is_symlink: bool,
    pub is_dir: bool,
    pub is_file: bool,
    pub nlink: u64,
    pub size: u64,
    pub mode: u32,
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<EntryStat> {
    let n = cpath(name.as_bytes())?;
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: n is valid; st is writable.
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            n.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fmt = st.st_mode & libc::S_IFMT;
    Ok(EntryStat {
        is_symlink: fmt == libc::S_IFLNK,
        is_dir: fmt == libc::S_IFDIR,
        is_file: fmt == libc::S_IFREG,
        nlink: st.st_nlink,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
    })
}

/// The path the kernel has for an open fd (`/proc/self/fd/N`).
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}
