//! The file helper: `chitin __fs-helper`, run *inside* the sandbox (never in the gateway).
//!
//! It reads one JSON [`Request`] on stdin and prints one JSON [`Answer`] on stdout. Its working
//! directory is the workspace; every path is opened with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_MAGICLINKS)` relative to it, so a symlink (or a race that swaps a directory for a
//! symlink) can never lead outside, and landlock would stop it anyway. Files with more than one
//! hard link are refused. Writes go to a temporary file that is renamed over the target, so a
//! failed write leaves the old content and a write never goes through a link.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use chitin_sandbox::fs as sfs;
use serde::{Deserialize, Serialize};

/// argv[1] that selects the helper (dispatched before clap).
pub const HELPER_ARG: &str = "__fs-helper";

/// The helper's own small binary, installed next to `chitin` (`bin/chitin-fs-helper.rs`).
pub const BINARY: &str = "chitin-fs-helper";

const O_RDONLY: i32 = 0;
const O_DIRECTORY: i32 = 0o200_000;
const O_PATH: i32 = 0o10_000_000;
const EXDEV: i32 = 18;
const ELOOP: i32 = 40;
const ENOENT: i32 = 2;
/// The most entries `list_dir` shows.
pub const MAX_ENTRIES: usize = 10_000;

/// One request from the tool layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Read {
        path: String,
        max_bytes: usize,
    },
    Write {
        path: String,
        content: String,
        create_dirs: bool,
    },
    Edit {
        path: String,
        old_string: String,
        new_string: String,
        replace_all: bool,
        max_bytes: usize,
    },
    List {
        path: String,
    },
    /// `apply_patch`: every file or none (see [`patch_files`]).
    Patch {
        files: Vec<super::patch::FilePatch>,
        max_bytes: usize,
    },
}

impl Request {
    pub fn path(&self) -> &str {
        match self {
            Request::Read { path, .. }
            | Request::Write { path, .. }
            | Request::Edit { path, .. }
            | Request::List { path } => path,
            Request::Patch { files, .. } => files.first().map_or(".", |f| f.path.as_str()),
        }
    }
}

/// The helper's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Ok(serde_json::Value),
    Err {
        kind: String,
        message: String,
        #[serde(default)]
        links: Option<u64>,
        #[serde(default)]
        count: Option<usize>,
    },
}

fn err(kind: &str, message: impl Into<String>) -> Answer {
    Answer::Err {
        kind: kind.into(),
        message: message.into(),
        links: None,
        count: None,
    }
}

fn io_answer(path: &str, e: &std::io::Error) -> Answer {
    match e.raw_os_error() {
        Some(EXDEV) => err(
            "symlink_escape",
            format!("{path}: a symlink on the path leaves the workspace"),
        ),
        Some(ELOOP) => err(
            "symlink_loop",
            format!("{path}: too many symlinks or a /proc magic link"),
        ),
        Some(ENOENT) => err("not_found", format!("{path}: no such file or directory")),
        _ => err("io", format!("{path}: {e}")),
    }
}

/// Entry point of `chitin __fs-helper`.
pub fn main() -> ExitCode {
    let mut input = Vec::new();
    let answer = match std::io::stdin().take(64 << 20).read_to_end(&mut input) {
        Err(e) => err("io", format!("cannot read the request: {e}")),
        Ok(_) => match serde_json::from_slice::<Request>(&input) {
            Err(e) => err("invalid", format!("bad request: {e}")),
            Ok(req) => handle(&req),
        },
    };
    let mut out = std::io::stdout().lock();
    let ok = serde_json::to_writer(&mut out, &answer).is_ok() && writeln!(out).is_ok();
    ExitCode::from(if ok { 0 } else { 1 })
}

/// Handles one request relative to the current directory (the workspace).
pub fn handle(req: &Request) -> Answer {
    match sfs::open_dir(Path::new(".")) {
        Ok(r) => handle_at(r.as_fd(), req),
        Err(e) => err("io", format!("cannot open the workspace: {e}")),
    }
}

/// Handles one request relative to the workspace directory `root`.
pub fn handle_at(root: BorrowedFd<'_>, req: &Request) -> Answer {
    let r = match req {
        Request::Read { path, max_bytes } => read(root, path, *max_bytes)
            .map(|text| serde_json::json!({"path": path, "content": text, "bytes": text.len()})),
        Request::Write {
            path,
            content,
            create_dirs,
        } => write(root, path, content.as_bytes(), *create_dirs)
            .map(|n| serde_json::json!({"path": path, "bytes_written": n})),
        Request::Edit {
            path,
            old_string,
            new_string,
            replace_all,
            max_bytes,
        } => edit(root, path, old_string, new_string, *replace_all, *max_bytes)
            .map(|n| serde_json::json!({"path": path, "replacements": n})),
        Request::List { path } => list(root, path),
        Request::Patch { files, max_bytes } => patch_files(root, files, *max_bytes),
    };
    match r {
        Ok(v) => Answer::Ok(v),
        Err(a) => a,
    }
}

fn rel(path: &str) -> Result<&Path, Answer> {
    let p = Path::new(path);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(err(
            "invalid",
            format!("{path}: not a workspace-relative path"),
        ));
    }
    Ok(p)
}

fn open_file(root: BorrowedFd<'_>, path: &str, max: usize) -> Result<std::fs::File, Answer> {
    let fd = sfs::open_beneath(root, rel(path)?, O_RDONLY, 0).map_err(|e| io_answer(path, &e))?;
    let f = std::fs::File::from(fd);
    let md = f.metadata().map_err(|e| io_answer(path, &e))?;
    if !md.is_file() {
        return Err(err("not_a_file", format!("{path}: not a regular file")));
    }
    let links = std::os::unix::fs::MetadataExt::nlink(&md);
    if links > 1 {
        return Err(Answer::Err {
            kind: "hardlink".into(),
            message: format!("{path}: {links} hard links"),
            links: Some(links),
            count: None,
        });
    }
    if md.len() > u64::try_from(max).unwrap_or(u64::MAX) {
        return Err(err(
            "too_large",
            format!("{path}: {} bytes, more than the {max}-byte limit", md.len()),
        ));
    }
    Ok(f)
}

fn read(root: BorrowedFd<'_>, path: &str, max: usize) -> Result<String, Answer> {
    let mut f = open_file(root, path, max)?;
    let mut buf = Vec::new();
    Read::by_ref(&mut f)
        .take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_to_end(&mut buf)
        .map_err(|e| io_answer(path, &e))?;
    String::from_utf8(buf).map_err(|_| err("not_text", format!("{path}: not valid UTF-8 text")))
}

/// Opens (creating if asked) the parent directory of `path` beneath the root.
fn parent_dir<'a>(
    root: BorrowedFd<'_>,
    path: &'a str,
    create: bool,
) -> Result<(OwnedFd, &'a OsStr), Answer> {
    let p = rel(path)?;
    let name = p
        .file_name()
        .ok_or_else(|| err("invalid", format!("{path}: no file name")))?;
    let parent = p.parent().unwrap_or(Path::new(""));
    let mut dir = sfs::open_beneath(root, Path::new("."), O_PATH | O_DIRECTORY, 0)
        .map_err(|e| io_answer(path, &e))?;
    for comp in parent.components() {
        let c = comp.as_os_str();
        let next = sfs::open_beneath(dir.as_fd(), Path::new(c), O_PATH | O_DIRECTORY, 0);
        dir = match next {
            Ok(d) => d,
            Err(e) if create && e.raw_os_error() == Some(ENOENT) => {
                sfs::mkdir_at(dir.as_fd(), c, 0o755).map_err(|e| io_answer(path, &e))?;
                sfs::open_beneath(dir.as_fd(), Path::new(c), O_PATH | O_DIRECTORY, 0)
                    .map_err(|e| io_answer(path, &e))?
            }
            Err(e) => return Err(io_answer(path, &e)),
        };
    }
    Ok((dir, name))
}

fn write(
    root: BorrowedFd<'_>,
    path: &str,
    data: &[u8],
    create_dirs: bool,
) -> Result<usize, Answer> {
    let (dir, name) = parent_dir(root, path, create_dirs)?;
    let mut mode = 0o644;
    match sfs::lstat_at(dir.as_fd(), name) {
        Ok(st) if st.is_symlink => {
            // Where does it point? Outside: the escape error; inside: refuse to guess.
            return Err(
                match sfs::open_beneath(dir.as_fd(), Path::new(name), O_PATH, 0) {
                    Err(e) if e.raw_os_error() == Some(EXDEV) => io_answer(path, &e),
                    _ => err(
                        "symlink",
                        format!("{path}: is a symlink; write to the path it points to"),
                    ),
                },
            );
        }
        Ok(st) if st.is_dir => return Err(err("not_a_file", format!("{path}: is a directory"))),
        Ok(st) if !st.is_file => {
            return Err(err("not_a_file", format!("{path}: not a regular file")));
        }
        Ok(st) if st.nlink > 1 => {
            return Err(Answer::Err {
                kind: "hardlink".into(),
                message: format!("{path}: {} hard links", st.nlink),
                links: Some(st.nlink),
                count: None,
            });
        }
        Ok(st) => mode = st.mode & 0o777,
        Err(e) if e.raw_os_error() == Some(ENOENT) => {}
        Err(e) => return Err(io_answer(path, &e)),
    }
    let tmp_name = format!(".chitin-write-{}.tmp", std::process::id());
    let tmp = OsStr::new(&tmp_name);
    let _ = sfs::unlink_at(dir.as_fd(), tmp);
    let mut f = sfs::create_excl_at(dir.as_fd(), tmp, 0o600).map_err(|e| io_answer(path, &e))?;
    let written = f
        .write_all(data)
        .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|()| f.sync_all());
    if let Err(e) = written {
        let _ = sfs::unlink_at(dir.as_fd(), tmp);
        return Err(io_answer(path, &e));
    }
    drop(f);
    if let Err(e) = sfs::rename_at(dir.as_fd(), tmp, name) {
        let _ = sfs::unlink_at(dir.as_fd(), tmp);
        return Err(io_answer(path, &e));
    }
    Ok(data.len())
}

fn edit(
    root: BorrowedFd<'_>,
    path: &str,
    old: &str,
    new: &str,
    all: bool,
    max: usize,
) -> Result<usize, Answer> {
    if old.is_empty() {
        return Err(err("invalid", "old_string must not be empty"));
    }
    let text = read(root, path, max)?;
    let count = text.matches(old).count();
    if count == 0 {
        return Err(err("no_match", format!("{path}: old_string not found")));
    }
    if count > 1 && !all {
        return Err(Answer::Err {
            kind: "ambiguous".into(),
            message: format!("{path}: old_string occurs {count} times"),
            links: None,
            count: Some(count),
        });
    }
    let replaced = if all {
        text.replace(old, new)
    } else {
        text.replacen(old, new, 1)
    };
    write(root, path, replaced.as_bytes(), false)?;
    Ok(count)
}

/// One file of a patch, staged.
struct Staged<'a> {
    path: &'a str,
    op: super::patch::FileOp,
    dir: OwnedFd,
    name: &'a OsStr,
    /// The staged new content (create, modify) or, once deleted, the old file's parking name.
    tmp: String,
    done: bool,
}

/// Applies a patch atomically: every hunk is checked against every file before anything is
/// written; new contents are staged beside their targets (fsynced), then swapped in with
/// `renameat2`; a failure part way swaps back what was done. All files or none.
fn patch_files(
    root: BorrowedFd<'_>,
    files: &[super::patch::FilePatch],
    max: usize,
) -> Result<serde_json::Value, Answer> {
    use super::patch::{FileOp, apply_file};
    use chitin_sandbox::fs::Rename;
    // 1. Check: read each file, apply its hunks in memory.
    let mut planned: Vec<(&super::patch::FilePatch, Option<String>, u32)> = Vec::new();
    for f in files {
        let (current, mode) = match f.op {
            FileOp::Create => {
                let (dir, name) = match parent_dir(root, &f.path, false) {
                    Ok(x) => x,
                    // A missing parent directory is created in the commit step.
                    Err(Answer::Err { kind, .. }) if kind == "not_found" => {
                        planned.push((
                            f,
                            apply_file(f, None).map_err(|e| err("patch", e.to_string()))?,
                            0o644,
                        ));
                        continue;
                    }
                    Err(a) => return Err(a),
                };
                match sfs::lstat_at(dir.as_fd(), name) {
                    Err(e) if e.raw_os_error() == Some(ENOENT) => (None, 0o644),
                    Ok(_) => {
                        return Err(err(
                            "patch",
                            format!("{}: the file to create exists already", f.path),
                        ));
                    }
                    Err(e) => return Err(io_answer(&f.path, &e)),
                }
            }
            FileOp::Modify | FileOp::Delete => {
                let file = open_file(root, &f.path, max)?;
                let mode = file
                    .metadata()
                    .map_or(0o644, |m| m.permissions().mode() & 0o777);
                drop(file);
                (Some(read(root, &f.path, max)?), mode)
            }
        };
        let new = apply_file(f, current.as_deref()).map_err(|e| err("patch", e.to_string()))?;
        if new.as_ref().is_some_and(|n| n.len() > max) {
            return Err(err(
                "too_large",
                format!(
                    "{}: the patched file would be larger than the {max}-byte limit",
                    f.path
                ),
            ));
        }
        planned.push((f, new, mode));
    }
    // 2. Stage: the new contents beside their targets.
    let pid = std::process::id();
    let mut staged: Vec<Staged<'_>> = Vec::new();
    let cleanup = |staged: &[Staged<'_>]| {
        for s in staged {
            if !s.done {
                let _ = sfs::unlink_at(s.dir.as_fd(), OsStr::new(&s.tmp));
            }
        }
    };
    for (i, (f, new, mode)) in planned.iter().enumerate() {
        let (dir, name) = match parent_dir(root, &f.path, f.op == FileOp::Create) {
            Ok(x) => x,
            Err(a) => {
                cleanup(&staged);
                return Err(a);
            }
        };
        let tmp = format!(".chitin-patch-{pid}-{i}.tmp");
        if let Some(content) = new {
            let _ = sfs::unlink_at(dir.as_fd(), OsStr::new(&tmp));
            let written =
                sfs::create_excl_at(dir.as_fd(), OsStr::new(&tmp), 0o600).and_then(|mut t| {
                    t.write_all(content.as_bytes())?;
                    t.set_permissions(std::fs::Permissions::from_mode(*mode))?;
                    t.sync_all()
                });
            if let Err(e) = written {
                let _ = sfs::unlink_at(dir.as_fd(), OsStr::new(&tmp));
                cleanup(&staged);
                return Err(io_answer(&f.path, &e));
            }
        }
        staged.push(Staged {
            path: &f.path,
            op: f.op,
            dir,
            name,
            tmp,
            done: false,
        });
    }
    // 3. Commit: swap each one in; on a failure, undo the ones done (in reverse).
    let mut failed: Option<Answer> = None;
    for s in &mut staged {
        let tmp = OsStr::new(&s.tmp);
        let r = match s.op {
            FileOp::Modify => match sfs::lstat_at(s.dir.as_fd(), s.name) {
                Ok(st) if st.is_file && !st.is_symlink && st.nlink == 1 => {
                    sfs::rename2_at(s.dir.as_fd(), tmp, s.name, Rename::Exchange)
                }
                Ok(_) => Err(std::io::Error::other("changed while the patch was applied")),
                Err(e) => Err(e),
            },
            FileOp::Create => sfs::rename2_at(s.dir.as_fd(), tmp, s.name, Rename::NoReplace),
            FileOp::Delete => sfs::rename2_at(s.dir.as_fd(), s.name, tmp, Rename::NoReplace),
        };
        match r {
            Ok(()) => s.done = true,
            Err(e) => {
                failed = Some(io_answer(s.path, &e));
                break;
            }
        }
    }
    if let Some(a) = failed {
        for s in staged.iter().rev().filter(|s| s.done) {
            let tmp = OsStr::new(&s.tmp);
            let _ = match s.op {
                FileOp::Modify => sfs::rename2_at(s.dir.as_fd(), tmp, s.name, Rename::Exchange),
                FileOp::Create => sfs::unlink_at(s.dir.as_fd(), s.name),
                FileOp::Delete => sfs::rename2_at(s.dir.as_fd(), tmp, s.name, Rename::NoReplace),
            };
        }
        for s in &mut staged {
            s.done = false;
        }
        cleanup(&staged);
        return Err(a);
    }
    // 4. The old contents (swapped out, parked) go.
    let mut changed = Vec::new();
    for s in &staged {
        if s.op != FileOp::Create {
            let _ = sfs::unlink_at(s.dir.as_fd(), OsStr::new(&s.tmp));
        }
        changed.push(serde_json::json!({"path": s.path, "op": s.op.as_str()}));
    }
    Ok(serde_json::json!({"applied": true, "files": changed}))
}

fn list(root: BorrowedFd<'_>, path: &str) -> Result<serde_json::Value, Answer> {
    let fd = sfs::open_beneath(root, rel(path)?, O_RDONLY | O_DIRECTORY, 0)
        .map_err(|e| io_answer(path, &e))?;
    let dir = std::fs::read_dir(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .map_err(|e| io_answer(path, &e))?;
    let mut entries = Vec::new();
    let mut more = false;
    for e in dir {
        let e = e.map_err(|e| io_answer(path, &e))?;
        if entries.len() >= MAX_ENTRIES {
            more = true;
            break;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        let st = sfs::lstat_at(fd.as_fd(), &e.file_name()).ok();
        let kind = match st {
            Some(s) if s.is_symlink => "symlink",
            Some(s) if s.is_dir => "dir",
            Some(s) if s.is_file => "file",
            _ => "other",
        };
        entries.push(serde_json::json!({
            "name": name,
            "kind": kind,
            "size": st.map_or(0, |s| s.size),
        }));
    }
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(serde_json::json!({"path": path, "entries": entries, "truncated": more}))
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

    fn root(d: &Path) -> OwnedFd {
        sfs::open_dir(d).unwrap()
    }

    fn kind(a: &Answer) -> &str {
        match a {
            Answer::Err { kind, .. } => kind,
            Answer::Ok(_) => "ok",
        }
    }

    #[test]
    fn a_symlink_swapped_in_for_a_directory_cannot_lead_outside() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("dir")).unwrap();
        let r = read(root(d.path()).as_fd(), "dir/hostname", 1000).unwrap_err();
        assert_eq!(kind(&r), "symlink_escape");
    }

    #[test]
    fn writing_through_a_hardlinked_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "x").unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        let r = write(root(d.path()).as_fd(), "b", b"changed", false).unwrap_err();
        assert_eq!(kind(&r), "hardlink");
        assert_eq!(std::fs::read_to_string(d.path().join("a")).unwrap(), "x");
    }

    #[test]
    fn writing_to_a_symlink_pointing_outside_is_refused_and_the_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), "keep").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("s")).unwrap();
        let r = write(root(d.path()).as_fd(), "s", b"pwned", false).unwrap_err();
        assert_eq!(kind(&r), "symlink_escape");
        assert_eq!(std::fs::read_to_string(outside.path()).unwrap(), "keep");
    }

    #[test]
    fn edit_replaces_exactly_one_occurrence_or_refuses() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), "a b a").unwrap();
        let r = root(d.path());
        assert_eq!(
            kind(&edit(r.as_fd(), "f", "a", "c", false, 100).unwrap_err()),
            "ambiguous"
        );
        assert_eq!(
            kind(&edit(r.as_fd(), "f", "zz", "c", false, 100).unwrap_err()),
            "no_match"
        );
        assert_eq!(edit(r.as_fd(), "f", "b", "B", false, 100).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(d.path().join("f")).unwrap(),
            "a B a"
        );
        assert_eq!(edit(r.as_fd(), "f", "a", "x", true, 100).unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(d.path().join("f")).unwrap(),
            "x B x"
        );
    }

    #[test]
    fn a_directory_flipping_to_a_symlink_never_yields_outside_content() {
        // T-SBX-05: one thread swaps `d` between a directory and a symlink to a directory
        // outside; reads of `d/f` must only ever return the inside content.
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), "OUTSIDE").unwrap();
        let d = ws.path().join("d");
        let real = ws.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("f"), "inside").unwrap();
        std::fs::rename(&real, &d).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flipper = {
            let (d, real, out, stop) = (
                d.clone(),
                real.clone(),
                outside.path().to_path_buf(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = std::fs::rename(&d, &real);
                    let _ = std::os::unix::fs::symlink(&out, &d);
                    let _ = std::fs::remove_file(&d);
                    let _ = std::fs::rename(&real, &d);
                }
            })
        };
        let r = root(ws.path());
        let (mut inside, mut refused) = (0, 0);
        for _ in 0..10_000 {
            match handle_at(
                r.as_fd(),
                &Request::Read {
                    path: "d/f".into(),
                    max_bytes: 100,
                },
            ) {
                Answer::Ok(v) => {
                    assert_eq!(v["content"], "inside");
                    inside += 1;
                }
                Answer::Err { kind, .. } => {
                    assert!(
                        ["symlink_escape", "not_found"].contains(&kind.as_str()),
                        "{kind}"
                    );
                    refused += 1;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(inside + refused, 10_000);
    }

    fn patch(text: &str) -> Vec<super::super::patch::FilePatch> {
        super::super::patch::parse(text).unwrap()
    }

    #[test]
    fn a_patch_applies_to_every_file_or_to_none() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), "1\n2\n").unwrap();
        std::fs::write(d.path().join("c"), "gone\n").unwrap();
        std::fs::write(d.path().join("h"), "x\n").unwrap();
        std::fs::hard_link(d.path().join("h"), d.path().join("h2")).unwrap();
        let r = root(d.path());
        // The second file is hard-linked: refused, and the first is untouched.
        let bad = patch(
            "--- a/a\n+++ b/a\n@@ -1,2 +1,2 @@\n 1\n-2\n+two\n--- a/h\n+++ b/h\n@@ -1 +1 @@\n-x\n+y\n",
        );
        let a = handle_at(
            r.as_fd(),
            &Request::Patch {
                files: bad,
                max_bytes: 100,
            },
        );
        assert_eq!(kind(&a), "hardlink");
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "1\n2\n"
        );
        assert_eq!(std::fs::read_to_string(d.path().join("h")).unwrap(), "x\n");
        // Modify, create (with its directory), delete: all applied.
        let good = patch(
            "--- a/a\n+++ b/a\n@@ -1,2 +1,2 @@\n 1\n-2\n+two\n--- /dev/null\n+++ b/sub/new\n@@ -0,0 +1 @@\n+fresh\n--- a/c\n+++ /dev/null\n@@ -1 +0,0 @@\n-gone\n",
        );
        let a = handle_at(
            r.as_fd(),
            &Request::Patch {
                files: good,
                max_bytes: 100,
            },
        );
        assert_eq!(kind(&a), "ok", "{a:?}");
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "1\ntwo\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("sub/new")).unwrap(),
            "fresh\n"
        );
        assert!(!d.path().join("c").exists());
        for e in std::fs::read_dir(d.path()).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!n.starts_with(".chitin-"), "{n}");
        }
        // Creating a file that exists is refused before anything is written.
        let again = patch(
            "--- a/a\n+++ b/a\n@@ -1 +1 @@\n-1\n+one\n--- /dev/null\n+++ b/sub/new\n@@ -0,0 +1 @@\n+x\n",
        );
        let a = handle_at(
            r.as_fd(),
            &Request::Patch {
                files: again,
                max_bytes: 100,
            },
        );
        assert_eq!(kind(&a), "patch");
        assert_eq!(
            std::fs::read_to_string(d.path().join("a")).unwrap(),
            "1\ntwo\n"
        );
    }

    #[test]
    fn write_creates_directories_only_when_asked() {
        let d = tempfile::tempdir().unwrap();
        let r = root(d.path());
        assert_eq!(
            kind(&write(r.as_fd(), "x/y/z.txt", b"1", false).unwrap_err()),
            "not_found"
        );
        assert_eq!(write(r.as_fd(), "x/y/z.txt", b"1", true).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(d.path().join("x/y/z.txt")).unwrap(),
            "1"
        );
    }
}
