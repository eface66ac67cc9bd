//! The kernel-keyring backend: a cache of the unlocked identity in front of the durable,
//! passphrase-encrypted identity file. Deterministic both where the keyring works (a cache
//! hit needs no passphrase; losing the cache, as a reboot does, falls back to the file) and
//! where it does not (explicit `keyring` is a clear error, `auto` falls back to passphrase).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use age::secrecy::SecretString;
use chitin::clock::SystemClock;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;

const PASS: &str = "keyring test passphrase";

fn run(home: &Path, args: &[&str], stdin: &[u8], pass: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env_clear()
        .env("CHITIN_HOME", home)
        // Never the right one unless given: a cache miss then fails instead of prompting.
        .env("CHITIN_PASSPHRASE", pass)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn home(backend: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("chitin.toml"),
        format!("[secrets]\nbackend = \"{backend}\"\nscrypt_work_factor = 4\nmax_scrypt_work_factor = 12\n"),
    )
    .unwrap();
    // The CLI operator (the default owner) is an owner: set and reveal are allowed.
    std::fs::write(d.path().join("entities.json"), r#"[{"uid":{"type":"Chitin::Group","id":"owners"},"attrs":{},"parents":[]},{"uid":{"type":"Chitin::User","id":"owner"},"attrs":{},"parents":[{"type":"Chitin::Group","id":"owners"}]}]"#).unwrap();
    d
}

#[test]
fn the_keyring_caches_the_identity_and_losing_it_falls_back_to_the_passphrase_file() {
    let h = home("keyring");
    let set = run(
        h.path(),
        &["secrets", "set", "K"],
        b"keyring-value-1234",
        PASS,
    );
    if !set.status.success() {
        // No usable kernel keyring here (container seccomp, no keyutils): the explicit
        // backend says so clearly, and `auto` falls back to the passphrase file.
        assert!(
            err(&set).contains("the kernel keyring is not usable here"),
            "{}",
            err(&set)
        );
        let a = home("auto");
        let o = run(
            a.path(),
            &["secrets", "set", "K"],
            b"keyring-value-1234",
            PASS,
        );
        assert!(o.status.success(), "{}", err(&o));
        assert!(err(&o).contains("kernel keyring not used"), "{}", err(&o));
        return;
    }
    assert!(
        err(&set).contains("kernel keyring (keyutils) cache"),
        "{}",
        err(&set)
    );

    // Cache hit: a later process opens the store without the passphrase.
    let cached = run(h.path(), &["secrets", "get", "K", "--reveal"], b"", "wrong");
    assert!(cached.status.success(), "{}", err(&cached));
    assert_eq!(cached.stdout, b"keyring-value-1234\n");

    // Lose the cache (what a reboot or the persistent-keyring expiry does).
    let cfg = SecretsConfig {
        backend: IdentityBackend::Keyring,
        scrypt_work_factor: 4,
        max_scrypt_work_factor: 12,
        ..SecretsConfig::default()
    };
    let open = || {
        SecretStore::open_with(
            h.path(),
            &cfg,
            Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
            Arc::new(SystemClock),
        )
        .unwrap()
    };
    open().forget_cached_identity();
    let miss = run(h.path(), &["secrets", "list"], b"", "wrong");
    assert_eq!(miss.status.code(), Some(2));
    assert!(
        err(&miss).contains("wrong passphrase for"),
        "{}",
        err(&miss)
    );

    // The passphrase unlocks the durable file and refills the cache.
    let unlock = run(h.path(), &["secrets", "list"], b"", PASS);
    assert!(unlock.status.success(), "{}", err(&unlock));
    let again = run(h.path(), &["secrets", "list"], b"", "wrong");
    assert!(again.status.success(), "{}", err(&again));

    // A stale cache (identity rotated by another process) is detected and replaced.
    let rotate = run(h.path(), &["secrets", "rotate-key"], b"", PASS);
    assert!(rotate.status.success(), "{}", err(&rotate));
    let after = run(h.path(), &["secrets", "get", "K", "--reveal"], b"", "wrong");
    assert!(after.status.success(), "{}", err(&after));
    open().forget_cached_identity();
}
