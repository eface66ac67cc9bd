//! Safe unpacking of `.tar.gz` / `.tgz` and `.zip` skill archives.
//!
//! Every entry name is checked before anything is written: no absolute paths, no `..`, no
//! backslashes or control characters; symlinks, hard links, devices and FIFOs are refused
//! outright (a skill is plain files, and a link is how archives escape their directory).
//! Files are created with `create_new` inside a fresh destination directory (never
//! following an existing name), and the number of entries and the bytes actually
//! decompressed are bounded (zip bombs stop at the limit, not at the declared size).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::manifest::check_rel_path;
use crate::{Limits, SKILL_MD, SkillError};

fn unsafe_entry(name: &str, why: &str) -> SkillError {
    SkillError::UnsafeArchiveEntry(format!("{name} ({why})"))
}

/// Normalizes an entry name (`./a/b`, `a/b/` for directories) and checks it.
fn entry_path(raw: &[u8]) -> Result<String, SkillError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let name = std::str::from_utf8(raw).map_err(|_| unsafe_entry(&shown, "name is not UTF-8"))?;
    if name.starts_with('/') {
        return Err(unsafe_entry(name, "absolute path"));
    }
    let mut trimmed = name;
    while let Some(r) = trimmed.strip_prefix("./") {
        trimmed = r;
    }
    let trimmed = trimmed.trim_end_matches('/');
    if trimmed.split('/').any(|c| c == "..") {
        return Err(unsafe_entry(name, "`..` component"));
    }
    check_rel_path(trimmed).map_err(|why| unsafe_entry(name, &why))?;
    Ok(trimmed.to_string())
}

struct Writer<'a> {
    dest: &'a Path,
    limits: &'a Limits,
    entries: usize,
    bytes: u64,
}

impl Writer<'_> {
    fn count(&mut self) -> Result<(), SkillError> {
        self.entries += 1;
        if self.entries > self.limits.max_files {
            return Err(SkillError::TooLarge(format!(
                "the archive has more than {} entries",
                self.limits.max_files
            )));
        }
        Ok(())
    }

    fn dir(&mut self, rel: &str) -> Result<(), SkillError> {
        self.count()?;
        let p = self.dest.join(rel);
        std::fs::create_dir_all(&p).map_err(|e| SkillError::io(&p, e))
    }

    fn file(&mut self, rel: &str, mut r: impl Read) -> Result<(), SkillError> {
        self.count()?;
        let p = self.dest.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| SkillError::io(parent, e))?;
        }
        // No symlink can exist under dest (none are ever created), and create_new refuses
        // an existing name (a duplicate entry).
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    unsafe_entry(rel, "duplicate entry")
                } else {
                    SkillError::io(&p, e)
                }
            })?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = r.read(&mut buf).map_err(|e| SkillError::io(&p, e))?;
            if n == 0 {
                break;
            }
            self.bytes += n as u64;
            if self.bytes > self.limits.max_bytes {
                return Err(SkillError::TooLarge(format!(
                    "the archive unpacks to more than {} bytes",
                    self.limits.max_bytes
                )));
            }
            f.write_all(buf.get(..n).unwrap_or_default())
                .map_err(|e| SkillError::io(&p, e))?;
        }
        Ok(())
    }
}

/// Unpacks `archive` into `dest` (which must exist and be empty) and returns the skill root:
/// `dest` itself when it holds `SKILL.md`, or the single top-level directory that does.
/// On error, `dest` may hold a partial tree: the caller removes it.
pub fn unpack(archive: &Path, dest: &Path, limits: &Limits) -> Result<PathBuf, SkillError> {
    let mut magic = [0u8; 4];
    {
        let mut f = std::fs::File::open(archive).map_err(|e| SkillError::io(archive, e))?;
        f.read_exact(&mut magic)
            .map_err(|e| SkillError::io(archive, e))?;
    }
    let mut w = Writer {
        dest,
        limits,
        entries: 0,
        bytes: 0,
    };
    if magic[..2] == [0x1f, 0x8b] {
        unpack_tar_gz(archive, &mut w)?;
    } else if magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06" {
        unpack_zip(archive, &mut w)?;
    } else {
        return Err(SkillError::UnsafeArchiveEntry(format!(
            "{}: not a .tar.gz or .zip archive",
            archive.display()
        )));
    }
    skill_root(dest)
}

fn skill_root(dest: &Path) -> Result<PathBuf, SkillError> {
    if dest.join(SKILL_MD).is_file() {
        return Ok(dest.to_path_buf());
    }
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(dest).map_err(|e| SkillError::io(dest, e))? {
        let e = e.map_err(|e| SkillError::io(dest, e))?;
        dirs.push(e.path());
    }
    match dirs.as_slice() {
        [only] if only.is_dir() && only.join(SKILL_MD).is_file() => Ok(only.clone()),
        _ => Err(SkillError::InvalidSkillMd(format!(
            "the archive has no {SKILL_MD} at its top level or in a single top-level directory"
        ))),
    }
}

fn unpack_tar_gz(archive: &Path, w: &mut Writer<'_>) -> Result<(), SkillError> {
    let f = std::fs::File::open(archive).map_err(|e| SkillError::io(archive, e))?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
    let io = |e: std::io::Error| SkillError::io(archive, e);
    for entry in ar.entries().map_err(io)? {
        let entry = entry.map_err(io)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        use tar::EntryType as T;
        match kind {
            T::Symlink => return Err(unsafe_entry(&shown, "symbolic link")),
            T::Link => return Err(unsafe_entry(&shown, "hard link")),
            T::Directory => {
                let rel = entry_path(&raw)?;
                w.dir(&rel)?;
            }
            T::Regular | T::Continuous => {
                let rel = entry_path(&raw)?;
                w.file(&rel, entry)?;
            }
            // Metadata entries (pax, GNU long names) are consumed by the tar reader itself;
            // global pax headers carry no file.
            T::XGlobalHeader => {}
            _ => return Err(unsafe_entry(&shown, "not a regular file or directory")),
        }
    }
    Ok(())
}

fn unpack_zip(archive: &Path, w: &mut Writer<'_>) -> Result<(), SkillError> {
    let f = std::fs::File::open(archive).map_err(|e| SkillError::io(archive, e))?;
    let mut z = zip::ZipArchive::new(f)
        .map_err(|e| SkillError::UnsafeArchiveEntry(format!("{}: {e}", archive.display())))?;
    if z.len() > w.limits.max_files {
        return Err(SkillError::TooLarge(format!(
            "the archive has more than {} entries",
            w.limits.max_files
        )));
    }
    for i in 0..z.len() {
        let file = z
            .by_index(i)
            .map_err(|e| SkillError::UnsafeArchiveEntry(format!("entry {i}: {e}")))?;
        let raw = file.name_raw().to_vec();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        if file.is_symlink() {
            return Err(unsafe_entry(&shown, "symbolic link"));
        }
        if let Some(mode) = file.unix_mode() {
            let ty = mode & 0o170_000;
            if ty != 0 && ty != 0o100_000 && ty != 0o040_000 {
                return Err(unsafe_entry(&shown, "not a regular file or directory"));
            }
        }
        let rel = entry_path(&raw)?;
        if file.is_dir() {
            w.dir(&rel)?;
        } else {
            w.file(&rel, file)?;
        }
    }
    Ok(())
}
