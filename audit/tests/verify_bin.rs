//! The standalone `chitin-audit-verify` binary: same verdicts, offline, from the audit crate.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::process::Command;

use chitin_audit::AuditReader;
use chitin_audit::export::{self, Format};
use common::*;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_chitin-audit-verify"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn the_standalone_verifier_accepts_a_valid_export_and_rejects_a_tampered_one() {
    let (_d, home) = build_log(9, 4);
    let reader = AuditReader::open(&home.join("audit.db")).unwrap();
    let mut out = Vec::new();
    export::write_export(
        &reader,
        Some(&home.join("audit.checkpoints")),
        None,
        None,
        Format::Jsonl,
        T0,
        &mut out,
    )
    .unwrap();
    let x = home.join("x.jsonl");
    std::fs::write(&x, &out).unwrap();
    let key = home.join("audit.pub");
    let (code, stdout, _) = run(&[
        "--export",
        x.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0));
    let expected = verify(&home).unwrap().ok_line();
    assert_eq!(stdout.trim_end(), expected);

    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let without_3: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3)
        .map(|(_, l)| *l)
        .collect();
    std::fs::write(&x, without_3.join("\n")).unwrap();
    let (code, stdout, _) = run(&[
        "--export",
        x.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert_eq!(
        stdout.trim_end(),
        "tampered: first bad record 3: missing record"
    );

    // The database form, with the checkpoint file next to it by default.
    let (code, stdout, _) = run(&[
        "--db",
        home.join("audit.db").to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim_end(), expected);
}

#[test]
fn the_standalone_verifier_explains_its_usage() {
    let (code, _, stderr) = run(&["--export", "x"]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("--pubkey FILE is required"), "{stderr}");
}
