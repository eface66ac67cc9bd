//! T-SEC-06: the C2SP CCTV age test vectors through Chitin's decrypt path
//! (`chitin::secrets::format::decrypt_into`, the function the store and the identity file use).
//!
//! Vectors live in the repository's own copy, `tests/vectors/age-testkit` (source, version and
//! licence in `tests/vectors/README.md`). Vectors that need hybrid post-quantum identities
//! (`AGE-SECRET-KEY-PQ-1...`) are skipped: Chitin's store uses X25519 and scrypt only. Skipped
//! vectors are counted and listed; the test fails if no vector ran.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use age::secrecy::SecretString;
use chitin::secrets::format::{DecryptKeys, decrypt_into};
use sha2::Digest;
use zeroize::Zeroizing;

/// The default `[secrets] max_scrypt_work_factor`: the store decrypts with this bound.
const MAX_WORK_FACTOR: u8 = 22;

fn testkit_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/age-testkit")
}

struct Vector {
    expect: String,
    payload: Option<String>,
    identities: Vec<String>,
    passphrases: Vec<String>,
    compressed: bool,
    body: Vec<u8>,
}

fn parse(bytes: &[u8]) -> Option<Vector> {
    let split = bytes.windows(2).position(|w| w == b"\n\n")?;
    let header = std::str::from_utf8(&bytes[..split]).ok()?;
    let mut v = Vector {
        expect: String::new(),
        payload: None,
        identities: Vec::new(),
        passphrases: Vec::new(),
        compressed: false,
        body: bytes[split + 2..].to_vec(),
    };
    for line in header.lines() {
        let (k, val) = line.split_once(": ")?;
        match k {
            "expect" => v.expect = val.to_string(),
            "payload" => v.payload = Some(val.to_string()),
            "identity" => v.identities.push(val.to_string()),
            "passphrase" => v.passphrases.push(val.to_string()),
            "compressed" => v.compressed = val == "zlib",
            "file key" | "comment" | "armored" => {}
            // Upstream: files with unknown keys should be ignored.
            _ => return None,
        }
    }
    if v.compressed {
        let mut out = Vec::new();
        flate2::read::ZlibDecoder::new(&v.body[..])
            .read_to_end(&mut out)
            .ok()?;
        v.body = out;
    }
    Some(v)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_supported_age_testkit_vector_gives_the_expected_result_through_the_store_decrypt_path() {
    let dir = testkit_dir();
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".md") && !n.starts_with('.'))
        .collect();
    names.sort();

    let (mut ran, mut skipped, mut failures) = (Vec::new(), Vec::new(), Vec::new());
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let Some(v) = parse(&bytes) else {
            skipped.push(format!("{name} (unknown header key or unparsable)"));
            continue;
        };
        if v.identities
            .iter()
            .any(|i| i.starts_with("AGE-SECRET-KEY-PQ-"))
        {
            skipped.push(format!("{name} (hybrid post-quantum identity)"));
            continue;
        }
        let mut keys = DecryptKeys::new(MAX_WORK_FACTOR);
        for i in &v.identities {
            keys = keys.with_x25519(age::x25519::Identity::from_str(i).unwrap());
        }
        for p in &v.passphrases {
            keys = keys.with_passphrase(SecretString::from(p.clone()));
        }
        let mut out = Zeroizing::new(Vec::new());
        let result = decrypt_into(&v.body, &keys, &mut out);
        let got = match &result {
            Ok(()) => "success",
            Err(e) => e.class(),
        };
        ran.push(name.clone());
        if got != v.expect {
            failures.push(format!(
                "{name}: expected `{}`, got `{got}` ({:?})",
                v.expect,
                result.err()
            ));
            continue;
        }
        // Success and payload failure: everything released must hash to `payload`.
        if v.expect == "success" || v.expect == "payload failure" {
            if let Some(want) = &v.payload {
                let have = hex(&sha2::Sha256::digest(&out[..]));
                if &have != want {
                    failures.push(format!(
                        "{name}: released plaintext hashes to {have}, expected {want}"
                    ));
                }
            }
        } else if !out.is_empty() {
            failures.push(format!("{name}: released {} bytes on `{got}`", out.len()));
        }
    }

    println!(
        "age-testkit: {} vectors ran, {} skipped, {} failed",
        ran.len(),
        skipped.len(),
        failures.len()
    );
    for s in &skipped {
        println!("  skipped: {s}");
    }
    assert!(
        !ran.is_empty(),
        "no age-testkit vector ran (looked in {})",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {} vectors disagree:\n{}",
        failures.len(),
        ran.len(),
        failures.join("\n")
    );
}
