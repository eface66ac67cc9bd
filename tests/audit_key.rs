//! The audit log's signing key lives in the secret store, never in a plaintext file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};

fn setup() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let home = support::private_home(t.path(), "state");
    support::write_owner_entities(&home);
    (t, home)
}

fn chitin(home: &Path, args: &[&str], pass: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
    c.env("CHITIN_HOME", home)
        .args(args)
        .stdin(std::process::Stdio::null());
    match pass {
        Some(p) => c.env("CHITIN_PASSPHRASE", p),
        None => c.env_remove("CHITIN_PASSPHRASE"),
    };
    c.output().unwrap()
}

fn append(home: &Path, pass: Option<&str>) -> Output {
    chitin(
        home,
        &[
            "audit",
            "append",
            "--kind",
            "admin",
            "--actor",
            "op",
            "--action",
            "x",
            "--resource",
            "r",
        ],
        pass,
    )
}

#[test]
fn a_new_log_keeps_its_signing_key_only_inside_the_encrypted_store() {
    let (_t, home) = setup();
    let o = append(&home, Some("pw-1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!home.join("audit.key").exists(), "no plaintext key file");
    assert!(home.join("secrets.age").exists() && home.join("audit.pub").exists());
    assert!(
        chitin(&home, &["audit", "checkpoint"], Some("pw-1"))
            .status
            .success()
    );
    let o = chitin(&home, &["audit", "verify"], None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn without_the_passphrase_nothing_can_be_appended() {
    let (_t, home) = setup();
    assert!(append(&home, Some("pw-1")).status.success());
    let o = append(&home, None);
    assert_eq!(o.status.code(), Some(2));
    let o = append(&home, Some("wrong"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .to_lowercase()
            .contains("passphrase"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_legacy_key_file_is_moved_into_the_store_and_the_chain_continues() {
    let (_t, home) = setup();
    // A log created by an earlier version: key in a 0600 file.
    let log = chitin_audit::AuditLog::open(&home, chitin_audit::AuditOptions::default()).unwrap();
    log.append(chitin_audit::RecordInput::new(
        chitin_audit::Kind::System,
        "old",
        "start",
        "gateway",
    ))
    .unwrap();
    log.checkpoint_now().unwrap();
    log.shutdown().unwrap();
    drop(log);
    assert!(home.join("audit.key").exists());
    let pub_before = std::fs::read(home.join("audit.pub")).unwrap();
    let o = append(&home, Some("pw-1"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !home.join("audit.key").exists(),
        "the file is gone once the store holds the key"
    );
    assert_eq!(
        std::fs::read(home.join("audit.pub")).unwrap(),
        pub_before,
        "same key"
    );
    assert!(
        chitin(&home, &["audit", "checkpoint"], Some("pw-1"))
            .status
            .success()
    );
    assert!(chitin(&home, &["audit", "verify"], None).status.success());
}

#[test]
fn the_reserved_key_cannot_be_overwritten_or_removed_with_the_secrets_cli() {
    let (_t, home) = setup();
    assert!(append(&home, Some("pw-1")).status.success());
    let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
    let o = c
        .env("CHITIN_HOME", &home)
        .env("CHITIN_PASSPHRASE", "pw-1")
        .args(["secrets", "rm", "chitin.audit-signing-key"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is reserved for Chitin"));
}

#[test]
fn the_audit_key_is_never_revealed_even_to_the_operator() {
    let (_t, home) = setup();
    assert!(append(&home, Some("pw-1")).status.success());
    let o = chitin(
        &home,
        &["secrets", "get", "chitin.audit-signing-key", "--reveal"],
        Some("pw-1"),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("reserved for Chitin and never printed"));
    assert!(o.stdout.is_empty());
}

#[test]
fn a_store_without_the_key_of_an_existing_log_is_refused_before_anything_is_written() {
    let (_t, home) = setup();
    assert!(append(&home, Some("pw-1")).status.success());
    // The secret store is lost (or restored from before the log existed); the log remains.
    for f in ["secrets.age", "secrets.identity.age", "secrets.lock"] {
        let _ = std::fs::remove_file(home.join(f));
    }
    let o = append(&home, Some("pw-2"));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("is missing from the secret store, but the audit log"),
        "{err}"
    );
    assert!(
        !home.join("secrets.age").exists(),
        "no new key was minted into a new store"
    );
}
