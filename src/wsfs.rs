//! The gateway process's only door to workspace files.
//!
//! The workspace is writable by sandboxed programs, which run concurrently with the gateway
//! and can swap any name in it for a symlink, a FIFO, a hard link to a host file or a huge
//! sparse file between a check and a use. So the gateway never touches a workspace path by
//! name. Invariants:
//! - Everything starts from one directory descriptor on the workspace root ([`WsDir::root`]);
//!   every other name is opened relative to a descriptor with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: no `..` above
//!   it, no absolute path, no symlink anywhere on the way (swapped-in links fail with `ELOOP`).
//! - Files are opened `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY` (a FIFO cannot block the opener),
//!   then checked on the open descriptor (`fstat`): a regular file with exactly one link; at
//!   most `limit` bytes are ever read, whatever size the file claims.
//! - Nothing is created, changed or removed by path: `mkdirat`, `openat2(O_CREAT|O_EXCL)`,
//!   `fchmod` on an open descriptor, `unlinkat` relative to a directory descriptor that was
//!   itself opened without following links.
//! - What the gate shows Cedar ([`locate`]) is found by walking the path one name at a time
//!   beneath the root descriptor (`fstatat(AT_SYMLINK_NOFOLLOW)`, `readlinkat` for links inside
//!   the workspace); once the path or a link's target leaves the workspace the rest is only
//!   normalized lexically, never looked at: no decision or message depends on what exists
//!   outside. What the tools accept ([`resolve`]) is an `openat2(RESOLVE_BENEATH)` walk that
//!   refuses any escape, read back from the descriptor.
//! - Known limit: the gate's resolution and the file helper's (inside the sandbox) are two
//!   walks; a symlink swapped inside the workspace between them can redirect a call to
//!   another file inside the workspace (never outside: the helper resolves beneath its own
//!   root descriptor, and landlock holds it to the workspace). Policies that tell files
//!   inside the workspace apart are subject to that race.
//!
//! `tests/tidy_workspace_fs.rs` fails when a filesystem operation by path appears anywhere in
//! `src/` outside its allow-list (this module, the in-sandbox helper, and modules that never
//! see a workspace path, each with its reason).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

/// How deep [`WsDir::remove_tree`] descends before giving up.
const MAX_DEPTH: usize = 64;

/// Errors of workspace file access. Each names the workspace-relative path.
#[derive(Debug, thiserror::Error)]
pub enum WsFsError {
    #[error(
        "`{path}` is a symbolic link or leads through one; the gateway opens only real files and directories in the workspace (replace the link with the file itself)"
    )]
    Symlink { path: String },
    #[error("`{path}` leaves the workspace; use a path inside it")]
    Escapes { path: String },
    #[error("`{path}` is {kind}, not a regular file; only regular files are read")]
    NotRegular { path: String, kind: &'static str },
    #[error(
        "`{path}` has {links} hard links, so other names for it may be outside the workspace; copy it instead of linking it"
    )]
    HardLinked { path: String, links: u64 },
    #[error("`{path}` is not a directory")]
    NotADirectory { path: String },
    #[error("`{path}` does not exist")]
    NotFound { path: String },
    #[error("`{path}` must be one plain file name (no `/`, `.` or `..`)")]
    BadName { path: String },
    #[error("`{path}` is nested deeper than {MAX_DEPTH} directories; remove it by hand")]
    TooDeep { path: String },
    #[error("the workspace {root} cannot be used: {reason}")]
    Root { root: PathBuf, reason: String },
    #[error("`{path}`: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl WsFsError {
    fn from_errno(path: &Path, e: rustix::io::Errno) -> Self {
        let path = path.display().to_string();
        match e {
            rustix::io::Errno::LOOP => Self::Symlink { path },
            rustix::io::Errno::XDEV => Self::Escapes { path },
            rustix::io::Errno::NOENT => Self::NotFound { path },
            rustix::io::Errno::NOTDIR => Self::NotADirectory { path },
            e => Self::Io {
                path,
                source: e.into(),
            },
        }
    }
}

fn no_links() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// One plain name (a single component).
fn plain(name: &OsStr) -> Result<&OsStr, WsFsError> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(WsFsError::BadName {
            path: name.to_string_lossy().into_owned(),
        });
    }
    Ok(name)
}

fn widen<T: Into<u64>>(v: T) -> u64 {
    v.into()
}

fn kind(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "an unknown kind of file",
    }
}

/// At most `limit` bytes of a workspace file, and the size it claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capped {
    pub bytes: Vec<u8>,
    /// The size `fstat` reported on the open descriptor.
    pub size: u64,
    /// The inode's change time (`st_ctime`) in ms since the epoch: the kernel sets it on
    /// every write, rename or attribute change, and no process can set it to another value.
    pub changed_ms: i64,
}

impl Capped {
    /// Whether the file was longer than what was read.
    pub fn truncated(&self) -> bool {
        self.size > self.bytes.len() as u64
    }
}

/// A directory in the workspace, held open (never by name).
#[derive(Debug)]
pub struct WsDir {
    fd: OwnedFd,
    /// Workspace-relative path, for messages only.
    rel: PathBuf,
}

impl WsDir {
    /// Opens the workspace root. The root is the operator's configured directory (its
    /// ancestors are not writable by the sandbox), so it is the one path opened by name.
    pub fn root(root: &Path) -> Result<Self, WsFsError> {
        let fd = rustix::fs::open(
            root,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| WsFsError::Root {
            root: root.to_path_buf(),
            reason: std::io::Error::from(e).to_string(),
        })?;
        Ok(Self {
            fd,
            rel: PathBuf::new(),
        })
    }

    fn rel(&self, name: &Path) -> PathBuf {
        self.rel.join(name)
    }

    fn open_beneath(&self, rel: &Path, flags: OFlags, mode: Mode) -> Result<OwnedFd, WsFsError> {
        let r = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        // `openat2` refuses `O_NOCTTY` beside `O_PATH`.
        let extra = if flags.contains(OFlags::PATH) {
            OFlags::empty()
        } else {
            OFlags::NOCTTY
        };
        rustix::fs::openat2(
            &self.fd,
            r,
            flags | extra | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
            no_links(),
        )
        .map_err(|e| WsFsError::from_errno(&self.rel(rel), e))
    }

    /// Opens the directory `rel` beneath this one (no symlink on the way or at the end).
    pub fn open_dir(&self, rel: &Path) -> Result<WsDir, WsFsError> {
        let fd = match self.open_beneath(
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            // `O_DIRECTORY` on a symlink says "not a directory"; name the link as such.
            Err(WsFsError::NotADirectory { path }) if self.is_link(rel) => {
                return Err(WsFsError::Symlink { path });
            }
            Err(e) => return Err(e),
        };
        Ok(WsDir {
            fd,
            rel: self.rel(rel),
        })
    }

    /// Whether `rel` itself is a symlink (looked at through an `O_PATH` descriptor on the link,
    /// resolved beneath this directory without following any link).
    fn is_link(&self, rel: &Path) -> bool {
        self.open_beneath(rel, OFlags::PATH, Mode::empty())
            .ok()
            .and_then(|fd| rustix::fs::fstat(&fd).ok())
            .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Symlink)
    }

    /// Reads at most `limit` bytes of the regular file `rel` (one link, no symlink on the
    /// way). A FIFO, device, socket, directory or hard-linked file is refused without reading.
    pub fn read_capped(&self, rel: &Path, limit: u64) -> Result<Capped, WsFsError> {
        let shown = self.rel(rel);
        let fd = self.open_beneath(rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
        let st = rustix::fs::fstat(&fd).map_err(|e| WsFsError::from_errno(&shown, e))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::RegularFile {
            return Err(WsFsError::NotRegular {
                path: shown.display().to_string(),
                kind: kind(ft),
            });
        }
        // `nlink_t` is 64-bit on some architectures, 32-bit on others.
        let links = widen(st.st_nlink);
        if links != 1 {
            return Err(WsFsError::HardLinked {
                path: shown.display().to_string(),
                links,
            });
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut bytes = Vec::with_capacity(usize::try_from(size.min(limit)).unwrap_or(0));
        std::fs::File::from(fd)
            .take(limit)
            .read_to_end(&mut bytes)
            .map_err(|source| WsFsError::Io {
                path: shown.display().to_string(),
                source,
            })?;
        #[allow(
            clippy::useless_conversion,
            reason = "st_ctime is i64 on 64-bit targets, i32 on some others"
        )]
        let ctime = i64::try_from(st.st_ctime).unwrap_or(i64::MAX);
        let changed_ms = ctime
            .saturating_mul(1000)
            .saturating_add(i64::try_from(st.st_ctime_nsec).unwrap_or(0) / 1_000_000);
        Ok(Capped {
            bytes,
            size,
            changed_ms,
        })
    }

    /// The directory `name` in this one, created (mode `mode`) when missing. An existing
    /// symlink, file or anything else there is refused, never followed.
    pub fn ensure_dir(&self, name: &OsStr, mode: u32) -> Result<WsDir, WsFsError> {
        let name = plain(name)?;
        match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(WsFsError::from_errno(&self.rel(Path::new(name)), e)),
        }
        self.open_dir(Path::new(name))
    }

    /// Creates the new file `name` (fails if anything exists there) with `bytes`, then sets
    /// its mode on the open descriptor.
    pub fn create_file(&self, name: &OsStr, bytes: &[u8], mode: u32) -> Result<(), WsFsError> {
        let name = plain(name)?;
        let shown = self.rel(Path::new(name));
        let fd = self.open_beneath(
            Path::new(name),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o600),
        )?;
        let io = |source| WsFsError::Io {
            path: shown.display().to_string(),
            source,
        };
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes).map_err(io)?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))
            .map_err(|e| WsFsError::from_errno(&shown, e))
    }

    /// Whether this directory has an entry `name` (of any kind; a symlink is not followed).
    pub fn has(&self, name: &OsStr) -> bool {
        plain(name)
            .is_ok_and(|n| rustix::fs::statat(&self.fd, n, AtFlags::SYMLINK_NOFOLLOW).is_ok())
    }

    /// Renames the entry `from` of this directory to `to` (both plain names), refusing to
    /// replace anything already at `to`.
    pub fn rename_new(&self, from: &OsStr, to: &OsStr) -> Result<(), WsFsError> {
        let (from, to) = (plain(from)?, plain(to)?);
        rustix::fs::renameat_with(
            &self.fd,
            from,
            &self.fd,
            to,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| WsFsError::from_errno(&self.rel(Path::new(to)), e))
    }

    /// Sets this directory's mode (`fchmod` on the held descriptor).
    pub fn chmod(&self, mode: u32) -> Result<(), WsFsError> {
        rustix::fs::fchmod(&self.fd, Mode::from_raw_mode(mode))
            .map_err(|e| WsFsError::from_errno(&self.rel, e))
    }

    /// Removes the entry `name` of this directory; a directory with everything in it. A
    /// symlink is removed itself (its target is never touched); subdirectories are opened
    /// without following links and emptied through their descriptors.
    pub fn remove_tree(&self, name: &OsStr) -> Result<(), WsFsError> {
        self.remove_entry(plain(name)?, 0)
    }

    fn remove_entry(&self, name: &OsStr, depth: usize) -> Result<(), WsFsError> {
        let shown = self.rel(Path::new(name));
        let st = rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| WsFsError::from_errno(&shown, e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                .map_err(|e| WsFsError::from_errno(&shown, e));
        }
        if depth >= MAX_DEPTH {
            return Err(WsFsError::TooDeep {
                path: shown.display().to_string(),
            });
        }
        let sub = self.open_dir(Path::new(name))?;
        // Staged copies are read-only (0555): make this one writable, through its descriptor.
        sub.chmod(0o700)?;
        for n in sub.names()? {
            sub.remove_entry(&n, depth + 1)?;
        }
        rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR)
            .map_err(|e| WsFsError::from_errno(&shown, e))
    }

    /// The entries of the directory `rel` beneath this one (no symlink on the way or at the
    /// end), at most `max` of them in the order the directory gives them (`more` says whether
    /// there were others). Each entry is looked at with `fstatat(AT_SYMLINK_NOFOLLOW)` on the
    /// directory's descriptor: a symlink is reported as one, never followed; an entry that
    /// vanished between the read and the look is `other` with size 0.
    pub fn list(&self, rel: &Path, max: usize) -> Result<Listing, WsFsError> {
        let dir = self.open_dir(rel)?;
        let fd = dir.open_beneath(
            Path::new("."),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )?;
        let entries = rustix::fs::Dir::new(fd).map_err(|e| WsFsError::from_errno(&dir.rel, e))?;
        let mut out = Listing {
            entries: Vec::new(),
            more: false,
        };
        for entry in entries {
            let entry = entry.map_err(|e| WsFsError::from_errno(&dir.rel, e))?;
            let n = entry.file_name();
            if matches!(n.to_bytes(), b"." | b"..") {
                continue;
            }
            if out.entries.len() >= max {
                out.more = true;
                break;
            }
            let st = rustix::fs::statat(&dir.fd, n, AtFlags::SYMLINK_NOFOLLOW).ok();
            let kind = match st.map(|s| FileType::from_raw_mode(s.st_mode)) {
                Some(FileType::Symlink) => EntryKind::Symlink,
                Some(FileType::Directory) => EntryKind::Dir,
                Some(FileType::RegularFile) => EntryKind::File,
                _ => EntryKind::Other,
            };
            out.entries.push(Entry {
                name: OsStr::from_bytes(n.to_bytes()).to_os_string(),
                kind,
                size: st.map_or(0, |s| u64::try_from(s.st_size).unwrap_or(0)),
            });
        }
        Ok(out)
    }

    /// The names in this directory (without `.` and `..`).
    pub fn names(&self) -> Result<Vec<std::ffi::OsString>, WsFsError> {
        let fd = self.open_beneath(
            Path::new("."),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )?;
        let dir = rustix::fs::Dir::new(fd).map_err(|e| WsFsError::from_errno(&self.rel, e))?;
        let mut out = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| WsFsError::from_errno(&self.rel, e))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(out)
    }
}

/// What [`WsDir::list`] found in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// Whether the directory had more entries than were listed.
    pub more: bool,
}

/// One directory entry (the entry itself: a symlink is not followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: std::ffi::OsString,
    pub kind: EntryKind,
    /// `st_size` of the entry itself.
    pub size: u64,
}

/// What kind of entry a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    /// The word the `list_dir` tool shows.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// The canonical workspace root: the configured directory with its symlinks resolved (the
/// operator's path, read once), which must be a directory other than `/`.
pub fn canonical_root(root: &Path) -> Result<PathBuf, WsFsError> {
    let bad = |reason: String| WsFsError::Root {
        root: root.to_path_buf(),
        reason,
    };
    let canonical = std::fs::canonicalize(root).map_err(|e| bad(e.to_string()))?;
    let dir = WsDir::root(&canonical)?;
    let st = rustix::fs::fstat(&dir.fd).map_err(|e| bad(std::io::Error::from(e).to_string()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory || canonical == Path::new("/") {
        return Err(bad("it must be a directory other than /".into()));
    }
    Ok(canonical)
}

/// Where a workspace-relative path leads, resolved from the root descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The canonical absolute path: read back from the descriptor of the path, or of its
    /// nearest existing ancestor with the missing plain names appended (a file, or directories,
    /// to create).
    pub abs: PathBuf,
    /// Whether the whole path exists.
    pub exists: bool,
}

/// Canonicalizes the (lexically checked, relative, no `..`) path `rel` beneath `root` for the
/// gate: an `openat2(O_PATH, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` walk, so symlinks inside
/// the workspace are resolved by the kernel and any that leave it fail with
/// [`WsFsError::Escapes`], whatever lies outside (no existence oracle).
pub fn resolve(root: &Path, rel: &Path) -> Result<Resolved, WsFsError> {
    let dir = WsDir::root(root)?;
    let beneath = |p: &Path| {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        rustix::fs::openat2(
            &dir.fd,
            p,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        )
    };
    let back = |fd: OwnedFd| {
        std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd())
        ))
        .map_err(|source| WsFsError::Io {
            path: rel.display().to_string(),
            source,
        })
    };
    // The nearest existing ancestor (the root at worst), and the names below it.
    let mut existing = rel;
    let mut missing: Vec<&OsStr> = Vec::new();
    loop {
        match beneath(existing) {
            Ok(fd) => {
                let mut abs = back(fd)?;
                for m in missing.iter().rev() {
                    abs.push(m);
                }
                return Ok(Resolved {
                    abs,
                    exists: missing.is_empty(),
                });
            }
            Err(rustix::io::Errno::NOENT) => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(WsFsError::BadName {
                        path: rel.display().to_string(),
                    });
                };
                missing.push(name);
                existing = parent;
            }
            Err(e) => return Err(WsFsError::from_errno(rel, e)),
        }
    }
}

/// Where a path a tool call names leads, as the gate shows it to Cedar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Located {
    /// Inside the workspace (symlinks inside it resolved).
    Inside(Resolved),
    /// Outside the workspace: the host path it names, normalized lexically (`.` and `..`
    /// removed) and never looked at, so nothing about what exists outside leaks into the
    /// decision or the refusal. A symlink in the workspace that leads out gives the path its
    /// target names, joined with the rest of the path.
    Outside(PathBuf),
}

/// Normalizes `p` lexically: `.` dropped, `..` removes the previous name (never above `/`).
pub fn normalize_lexically(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir => out.push("/"),
            Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// How many symlinks [`locate`] follows inside the workspace (the kernel's limit).
const MAX_LINKS: usize = 40;

/// Locates `path` (absolute, or relative to the workspace `root`, which must be canonical) for
/// the gate, walking it one component at a time from the root descriptor: each name is looked
/// at with `fstatat(AT_SYMLINK_NOFOLLOW)` beneath the directory reached so far (opened with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`); a symlink's target is read with `readlinkat` and
/// walked the same way. The walk never opens, stats or reads anything outside the workspace:
/// as soon as the path (or a link's target) leaves it, the rest is only normalized lexically
/// ([`Located::Outside`]).
pub fn locate(root: &Path, path: &Path) -> Result<Located, WsFsError> {
    use std::collections::VecDeque;
    use std::path::Component;
    let shown = || path.display().to_string();
    let rest: VecDeque<std::ffi::OsString> = if path.is_absolute() {
        let norm = normalize_lexically(path);
        match norm.strip_prefix(root) {
            Ok(r) => r.iter().map(OsStr::to_os_string).collect(),
            Err(_) => return Ok(Located::Outside(norm)),
        }
    } else {
        path.iter().map(OsStr::to_os_string).collect()
    };
    let mut rest = rest;
    let root_dir = WsDir::root(root)?;
    // The directories walked into, each held open: (name, descriptor).
    let mut stack: Vec<(std::ffi::OsString, WsDir)> = Vec::new();
    let mut links = 0;
    let here = |stack: &[(std::ffi::OsString, WsDir)]| {
        let mut p = root.to_path_buf();
        for (n, _) in stack {
            p.push(n);
        }
        p
    };
    while let Some(c) = rest.pop_front() {
        match Path::new(&c).components().next() {
            None | Some(Component::CurDir) => continue,
            Some(Component::ParentDir) => {
                if stack.pop().is_none() {
                    // Above the workspace root: the rest is outside.
                    let mut out = root.join("..");
                    out.extend(rest.iter());
                    return Ok(Located::Outside(normalize_lexically(&out)));
                }
                continue;
            }
            Some(Component::RootDir | Component::Prefix(_)) => {
                return Err(WsFsError::BadName { path: shown() });
            }
            Some(Component::Normal(_)) => {}
        }
        let dir = stack.last().map_or(&root_dir, |(_, d)| d);
        let st = match rustix::fs::statat(&dir.fd, c.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => {
                // Not there yet (a file, or directories, to create): the rest must be names.
                let mut abs = here(&stack);
                abs.push(&c);
                for r in &rest {
                    if !matches!(Path::new(r).components().next(), Some(Component::Normal(_))) {
                        return Err(WsFsError::BadName { path: shown() });
                    }
                    abs.push(r);
                }
                return Ok(Located::Inside(Resolved { abs, exists: false }));
            }
            Err(e) => return Err(WsFsError::from_errno(path, e)),
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Symlink => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(WsFsError::Symlink { path: shown() });
                }
                let target = rustix::fs::readlinkat(&dir.fd, c.as_os_str(), Vec::new())
                    .map_err(|e| WsFsError::from_errno(path, e))?;
                let target = PathBuf::from(OsStr::from_bytes(target.to_bytes()));
                if target.is_absolute() {
                    // The kernel never follows an absolute link beneath the workspace (the
                    // tools refuse it), so it counts as leaving, wherever it points.
                    let mut out = target;
                    out.extend(rest.iter());
                    return Ok(Located::Outside(normalize_lexically(&out)));
                }
                for t in target.iter().rev() {
                    rest.push_front(t.to_os_string());
                }
            }
            FileType::Directory => {
                let d = dir.open_dir(Path::new(&c))?;
                stack.push((c, d));
            }
            _ if rest.iter().all(|r| r == ".") => {
                let mut abs = here(&stack);
                abs.push(&c);
                return Ok(Located::Inside(Resolved { abs, exists: true }));
            }
            _ => {
                return Err(WsFsError::NotADirectory {
                    path: here(&stack).join(&c).display().to_string(),
                });
            }
        }
    }
    Ok(Located::Inside(Resolved {
        abs: here(&stack),
        exists: true,
    }))
}
