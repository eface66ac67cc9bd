//! Every case of the sigstore-conformance `bundle-verify` suite, through Chitin's own
//! verification path (`chitin_skills::verify_bundle`, the function `chitin skills` uses),
//! with the artifact's bytes and with its SHA-256 digest. Full agreement is required.
//!
//! Cases are read at run time from the repository's own copy,
//! `tests/vectors/sigstore-bundle-verify` (source, version and licence in `tests/vectors/README.md`).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};

use chitin_skills::{PublicKey, TrustRoot, TrustedSigner, parse_bundle, verify_bundle};
use sha2::{Digest, Sha256};
use sigstore_verify::types::Sha256Hash;

const DEFAULT_IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const DEFAULT_ISSUER: &str = "https://token.actions.githubusercontent.com";

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors/sigstore-bundle-verify/bundle-verify")
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// `Ok` means Chitin accepts: the signature verified and the signer is trusted.
fn chitin_accepts(case: &Path, artifact: &[u8], digest_mode: bool) -> Result<(), String> {
    let root = match case.join("trusted_root.json") {
        p if p.exists() => TrustRoot::from_file(&p),
        _ => TrustRoot::production(),
    }
    .map_err(|e| e.to_string())?;
    let trust = match std::fs::read_to_string(case.join("key.pub")) {
        Ok(pem) => vec![TrustedSigner::Key {
            name: "case".into(),
            key: PublicKey::from_pem(&pem)?,
        }],
        Err(_) => vec![TrustedSigner::Keyless {
            name: "case".into(),
            issuer: read_trimmed(&case.join("issuer")).unwrap_or_else(|| DEFAULT_ISSUER.into()),
            subject: read_trimmed(&case.join("identity"))
                .unwrap_or_else(|| DEFAULT_IDENTITY.into()),
        }],
    };
    let text =
        std::fs::read_to_string(case.join("bundle.sigstore.json")).map_err(|e| e.to_string())?;
    let bundle = parse_bundle(&text).map_err(|e| e.to_string())?;
    let verified = if digest_mode {
        let d: [u8; 32] = Sha256::digest(artifact).into();
        verify_bundle(&root, Sha256Hash::new(d), &bundle, &trust)
    } else {
        verify_bundle(&root, artifact, &bundle, &trust)
    }
    .map_err(|e| e.to_string())?;
    match verified.trusted_as {
        Some(_) => Ok(()),
        None => Err(format!("untrusted signer: {}", verified.signer)),
    }
}

#[test]
fn chitin_agrees_with_every_sigstore_conformance_bundle_case_in_bytes_and_digest_mode() {
    let dir = suite_dir();
    let default_artifact = std::fs::read(dir.join("a.txt"))
        .unwrap_or_else(|e| panic!("conformance suite not found at {}: {e}", dir.display()));
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("bundle.sigstore.json").exists())
        .collect();
    cases.sort();
    let mut ran = 0;
    let mut disagreements = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let expect_ok = !name.ends_with("_fail");
        let artifact =
            std::fs::read(case.join("artifact")).unwrap_or_else(|_| default_artifact.clone());
        for digest_mode in [false, true] {
            ran += 1;
            let got = chitin_accepts(case, &artifact, digest_mode);
            if got.is_ok() != expect_ok {
                disagreements.push(format!(
                    "{name} ({}): expected {}, got {:?}",
                    if digest_mode { "digest" } else { "bytes" },
                    if expect_ok { "accept" } else { "reject" },
                    got
                ));
            }
        }
    }
    assert!(
        ran > 0,
        "no conformance case ran (looked in {})",
        dir.display()
    );
    assert!(
        disagreements.is_empty(),
        "{} of {ran} runs disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    eprintln!("{} cases, {ran} runs, all agree", cases.len());
}
