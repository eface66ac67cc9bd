//! Skill verification costs: manifest hashing, public-key signature check, a full directory
//! verification, and one keyless (Fulcio + Rekor) bundle verification from the conformance
//! suite. `cargo bench -p chitin-skills --bench verify` for the full run; under
//! `cargo test --all-targets` it runs a few iterations only (smoke mode).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "bench"
)]

use std::path::Path;
use std::time::Instant;

use chitin_skills::{
    Limits, Manifest, SecretSigningKey, TrustRoot, TrustedSigner, parse_bundle, sign_skill_dir,
    verify_bundle, verify_skill_dir,
};

fn time<F: FnMut()>(name: &str, iters: u32, mut f: F) {
    f();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let per = start.elapsed() / iters;
    println!("{name:<48} {per:>12.2?} per op ({iters} iterations)");
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = |k: u32| if full { k } else { 2 };
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::write(
        dir.join("SKILL.md"),
        "---\nname: bench\ndescription: d\nversion: \"1.0.0\"\n---\nbody\n",
    )
    .unwrap();
    for i in 0..20 {
        std::fs::write(dir.join(format!("scripts/f{i}.sh")), vec![b'x'; 4096]).unwrap();
    }
    let key = SecretSigningKey::generate().unwrap();
    let limits = Limits::default();
    let trust = vec![TrustedSigner::Key {
        name: "k".into(),
        key: key.public_key().unwrap(),
    }];
    let root = TrustRoot::production().unwrap();
    time(
        "TrustRoot::production (parse + Verifier::new)",
        n(50),
        || {
            TrustRoot::production().unwrap();
        },
    );
    time("Manifest::from_dir (21 files, 80 KiB)", n(500), || {
        Manifest::from_dir(&dir, &limits).unwrap();
    });
    time("sign_skill_dir (21 files)", n(200), || {
        sign_skill_dir(&dir, &key, &limits).unwrap();
    });
    time("verify_skill_dir, public key (21 files)", n(500), || {
        verify_skill_dir(&dir, &root, &trust, &limits).unwrap();
    });
    let conf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors/sigstore-bundle-verify/bundle-verify");
    if let (Ok(a), Ok(b)) = (
        std::fs::read(conf.join("a.txt")),
        std::fs::read_to_string(conf.join("happy-path-v0.3/bundle.sigstore.json")),
    ) {
        let bundle = parse_bundle(&b).unwrap();
        let kl = vec![TrustedSigner::Keyless {
            name: "c".into(),
            issuer: "https://token.actions.githubusercontent.com".into(),
            subject: "https://github.com/sigstore-conformance/extremely-dangerous-public-oidc-beacon/.github/workflows/extremely-dangerous-oidc-beacon.yml@refs/heads/main".into(),
        }];
        time(
            "verify_bundle, keyless Rekor v1 (conformance)",
            n(500),
            || {
                verify_bundle(&root, a.as_slice(), &bundle, &kl).unwrap();
            },
        );
    } else {
        println!(
            "keyless: conformance suite not found at {}, skipped",
            conf.display()
        );
    }
}
