//! The manifest: every file of a skill with its SHA-256, in one canonical text form.
//!
//! ```text
//! chitin-skill-manifest/v1
//! <sha256 hex>  <relative/path>
//! ...
//! ```
//! Lines are sorted by path (byte order), paths use `/`, and nothing else is allowed: no
//! blank lines, no duplicates, no `.`/`..`/empty components, no control characters or
//! backslashes. `skill.sigstore.json` at the top level is excluded (it carries the signature).
//! The skill's digest is `sha256:<hex>` of these bytes.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::{BUNDLE_FILE, Limits, SkillError};

const HEADER: &str = "chitin-skill-manifest/v1";

/// One file: its relative path and the SHA-256 of its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub sha256: [u8; 32],
}

/// Every file of a skill, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    files: BTreeMap<String, [u8; 32]>,
}

/// The first difference between a signed manifest and what is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    Changed(String),
    Missing(String),
    Extra(String),
}

impl From<Tamper> for SkillError {
    fn from(t: Tamper) -> Self {
        match t {
            Tamper::Changed(p) => SkillError::FileChanged(p),
            Tamper::Missing(p) => SkillError::FileMissing(p),
            Tamper::Extra(p) => SkillError::ExtraFile(p),
        }
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Checks one relative path: `/`-separated, no empty, `.` or `..` components, no control
/// characters, no backslash, at most 1024 bytes and 32 components.
pub fn check_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 1024 {
        return Err("empty or longer than 1024 bytes".into());
    }
    if p.starts_with('/') {
        return Err("absolute path".into());
    }
    if p.chars().any(|c| c.is_control() || c == '\\') {
        return Err("control character or backslash in the name".into());
    }
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() > 32 {
        return Err("nested deeper than 32 directories".into());
    }
    for part in parts {
        match part {
            "" => return Err("empty path component".into()),
            "." | ".." => return Err("`.` or `..` component".into()),
            _ => {}
        }
    }
    Ok(())
}

impl Manifest {
    /// Builds a manifest from entries; every path is checked and must be unique.
    pub fn from_entries(entries: impl IntoIterator<Item = FileEntry>) -> Result<Self, SkillError> {
        let mut files = BTreeMap::new();
        for e in entries {
            check_rel_path(&e.path)
                .map_err(|why| SkillError::InvalidManifest(format!("{:?}: {why}", e.path)))?;
            if e.path == BUNDLE_FILE {
                return Err(SkillError::InvalidManifest(format!(
                    "{BUNDLE_FILE} cannot be part of the manifest"
                )));
            }
            if files.insert(e.path.clone(), e.sha256).is_some() {
                return Err(SkillError::InvalidManifest(format!(
                    "duplicate path {:?}",
                    e.path
                )));
            }
        }
        Ok(Self { files })
    }

    /// Hashes every file under `dir` (the top-level `skill.sigstore.json` excluded). Symlinks,
    /// devices, FIFOs and sockets are refused, as are names that are not valid UTF-8 or fail
    /// [`check_rel_path`]; `limits` bound the number of files and bytes.
    pub fn from_dir(dir: &Path, limits: &Limits) -> Result<Self, SkillError> {
        let mut files = BTreeMap::new();
        let mut total: u64 = 0;
        walk(dir, "", 0, limits, &mut files, &mut total)?;
        Ok(Self { files })
    }

    /// The files, sorted by path.
    pub fn entries(&self) -> impl Iterator<Item = FileEntry> + '_ {
        self.files.iter().map(|(p, h)| FileEntry {
            path: p.clone(),
            sha256: *h,
        })
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// No files at all.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Whether `path` is in the manifest.
    pub fn contains(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// The canonical text.
    pub fn canonical(&self) -> String {
        let mut out = String::with_capacity(32 + self.files.len() * 96);
        out.push_str(HEADER);
        out.push('\n');
        for (p, h) in &self.files {
            out.push_str(&hex(h));
            out.push_str("  ");
            out.push_str(p);
            out.push('\n');
        }
        out
    }

    /// SHA-256 of the canonical text.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.canonical().as_bytes()).into()
    }

    /// `sha256:<hex>` of the canonical text: the skill's digest.
    pub fn digest_string(&self) -> String {
        format!("sha256:{}", hex(&self.digest()))
    }

    /// Parses the canonical text; anything not exactly canonical is refused.
    pub fn parse(text: &str) -> Result<Self, SkillError> {
        let bad = |why: String| SkillError::InvalidManifest(why);
        let body = text
            .strip_prefix(HEADER)
            .and_then(|r| r.strip_prefix('\n'))
            .ok_or_else(|| bad(format!("must start with the line {HEADER:?}")))?;
        if !body.is_empty() && !body.ends_with('\n') {
            return Err(bad("must end with a newline".into()));
        }
        let mut files = BTreeMap::new();
        let mut last: Option<String> = None;
        for (i, line) in body.split_terminator('\n').enumerate() {
            let n = i + 2;
            let (h, p) = line
                .split_once("  ")
                .ok_or_else(|| bad(format!("line {n}: expected `<sha256 hex>  <path>`")))?;
            let hash = unhex32(h)
                .ok_or_else(|| bad(format!("line {n}: not a lower-case SHA-256 hex digest")))?;
            check_rel_path(p).map_err(|why| bad(format!("line {n}: {why}")))?;
            if p == BUNDLE_FILE {
                return Err(bad(format!("line {n}: {BUNDLE_FILE} cannot be listed")));
            }
            if let Some(prev) = &last
                && prev.as_str() >= p
            {
                return Err(bad(format!("line {n}: paths must be sorted and unique")));
            }
            last = Some(p.to_string());
            files.insert(p.to_string(), hash);
        }
        Ok(Self { files })
    }

    /// The first difference from `self` (the signed manifest) to `actual` (on disk), in path
    /// order: a changed file, a signed file that is missing, or a file that is not signed.
    pub fn diff(&self, actual: &Manifest) -> Option<Tamper> {
        let mut paths: Vec<&String> = self.files.keys().chain(actual.files.keys()).collect();
        paths.sort();
        paths.dedup();
        for p in paths {
            match (self.files.get(p), actual.files.get(p)) {
                (Some(a), Some(b)) if a != b => return Some(Tamper::Changed(p.clone())),
                (Some(_), None) => return Some(Tamper::Missing(p.clone())),
                (None, Some(_)) => return Some(Tamper::Extra(p.clone())),
                _ => {}
            }
        }
        None
    }
}

fn walk(
    dir: &Path,
    prefix: &str,
    depth: usize,
    limits: &Limits,
    files: &mut BTreeMap<String, [u8; 32]>,
    total: &mut u64,
) -> Result<(), SkillError> {
    if depth > 32 {
        return Err(SkillError::UnsafeFile {
            path: prefix.to_string(),
            why: "nested deeper than 32 directories".into(),
        });
    }
    let rd = std::fs::read_dir(dir).map_err(|e| SkillError::io(dir, e))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| SkillError::io(dir, e))?;
        names.push(entry.file_name());
    }
    names.sort();
    for name in names {
        let shown = format!("{prefix}{}", name.to_string_lossy());
        let name = name.into_string().map_err(|_| SkillError::UnsafeFile {
            path: shown.clone(),
            why: "the name is not valid UTF-8".into(),
        })?;
        let rel = format!("{prefix}{name}");
        if depth == 0 && name == BUNDLE_FILE {
            continue;
        }
        check_rel_path(&rel).map_err(|why| SkillError::UnsafeFile {
            path: rel.clone(),
            why,
        })?;
        let path = dir.join(&name);
        let meta = std::fs::symlink_metadata(&path).map_err(|e| SkillError::io(&path, e))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            return Err(SkillError::UnsafeFile {
                path: rel,
                why: "symbolic links are not allowed in a skill".into(),
            });
        } else if ft.is_dir() {
            walk(&path, &format!("{rel}/"), depth + 1, limits, files, total)?;
        } else if ft.is_file() {
            if files.len() >= limits.max_files {
                return Err(SkillError::TooLarge(format!(
                    "more than {} files",
                    limits.max_files
                )));
            }
            let hash = hash_file(&path, limits, total)?;
            files.insert(rel, hash);
        } else {
            return Err(SkillError::UnsafeFile {
                path: rel,
                why: "not a regular file or directory".into(),
            });
        }
    }
    Ok(())
}

fn hash_file(path: &Path, limits: &Limits, total: &mut u64) -> Result<[u8; 32], SkillError> {
    let f = std::fs::File::open(path).map_err(|e| SkillError::io(path, e))?;
    let budget = limits.max_bytes.saturating_sub(*total);
    let mut r = f.take(budget.saturating_add(1));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n_total: u64 = 0;
    loop {
        let n = r.read(&mut buf).map_err(|e| SkillError::io(path, e))?;
        if n == 0 {
            break;
        }
        n_total += n as u64;
        if n_total > budget {
            return Err(SkillError::TooLarge(format!(
                "more than {} bytes in all",
                limits.max_bytes
            )));
        }
        h.update(buf.get(..n).unwrap_or_default());
    }
    *total += n_total;
    Ok(h.finalize().into())
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

    fn e(p: &str, b: u8) -> FileEntry {
        FileEntry {
            path: p.into(),
            sha256: [b; 32],
        }
    }

    #[test]
    fn the_canonical_text_parses_back_to_the_same_manifest() {
        let m = Manifest::from_entries([e("b/c.txt", 2), e("SKILL.md", 1), e("a", 3)]).unwrap();
        let text = m.canonical();
        assert!(text.starts_with("chitin-skill-manifest/v1\n"));
        assert_eq!(Manifest::parse(&text).unwrap(), m);
    }

    #[test]
    fn a_non_canonical_manifest_is_refused() {
        let m = Manifest::from_entries([e("a", 1), e("b", 2)]).unwrap();
        let text = m.canonical();
        let lines: Vec<&str> = text.lines().collect();
        let swapped = format!("{}\n{}\n{}\n", lines[0], lines[2], lines[1]);
        assert!(Manifest::parse(&swapped).is_err(), "unsorted");
        let dup = format!("{}\n{}\n{}\n", lines[0], lines[1], lines[1]);
        assert!(Manifest::parse(&dup).is_err(), "duplicate");
        assert!(Manifest::parse(&text.replace("  a", "  ../a")).is_err());
        assert!(Manifest::parse(&text.replace("  a", "  /a")).is_err());
        assert!(Manifest::parse(&text.to_uppercase()).is_err());
        assert!(Manifest::parse(text.trim_end()).is_err());
    }

    #[test]
    fn diff_names_the_first_changed_missing_or_extra_file() {
        let signed = Manifest::from_entries([e("a", 1), e("b", 2)]).unwrap();
        let changed = Manifest::from_entries([e("a", 1), e("b", 9)]).unwrap();
        let missing = Manifest::from_entries([e("a", 1)]).unwrap();
        let extra = Manifest::from_entries([e("a", 1), e("b", 2), e("c", 3)]).unwrap();
        assert_eq!(signed.diff(&signed), None);
        assert_eq!(signed.diff(&changed), Some(Tamper::Changed("b".into())));
        assert_eq!(signed.diff(&missing), Some(Tamper::Missing("b".into())));
        assert_eq!(signed.diff(&extra), Some(Tamper::Extra("c".into())));
    }
}
