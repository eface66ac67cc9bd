//! The external test vectors in `tests/vectors/` are the authors' files, unchanged: every file
//! is listed in `SHA256SUMS` with its digest, and nothing else is there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let ty = entry.file_type().unwrap();
        if ty.is_dir() {
            walk(root, &path, out);
        } else {
            assert!(ty.is_file(), "{} is not a regular file", path.display());
            let rel = format!("./{}", path.strip_prefix(root).unwrap().display());
            if rel == "./SHA256SUMS" {
                continue;
            }
            let digest = Sha256::digest(std::fs::read(&path).unwrap());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            out.insert(rel, hex);
        }
    }
}

#[test]
fn the_vendored_test_vectors_match_their_recorded_digests() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let listed: BTreeMap<String, String> = std::fs::read_to_string(root.join("SHA256SUMS"))
        .unwrap()
        .lines()
        .map(|l| {
            let (digest, name) = l.split_once("  ").unwrap();
            (name.to_string(), digest.to_string())
        })
        .collect();
    let mut found = BTreeMap::new();
    walk(&root, &root, &mut found);
    assert!(
        found.len() > 200,
        "the vectors are missing: only {} files under tests/vectors",
        found.len()
    );
    for (name, digest) in &found {
        match listed.get(name) {
            None => panic!("{name} is not listed in tests/vectors/SHA256SUMS"),
            Some(d) => assert_eq!(d, digest, "{name} differs from the recorded upstream copy"),
        }
    }
    for name in listed.keys() {
        assert!(found.contains_key(name), "{name} is listed but missing");
    }
}
