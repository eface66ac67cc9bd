//! Exports: a jsonl export verifies offline on its own; each tamper of the file is detected.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use chitin_audit::export::{self, Format};
use chitin_audit::{AuditReader, Verifier};
use common::*;

fn export_bytes(
    home: &std::path::Path,
    since: Option<i64>,
    until: Option<i64>,
    format: Format,
) -> Vec<u8> {
    let reader = AuditReader::open(&home.join("audit.db")).unwrap();
    let mut out = Vec::new();
    export::write_export(
        &reader,
        Some(&home.join("audit.checkpoints")),
        since,
        until,
        format,
        T0,
        &mut out,
    )
    .unwrap();
    out
}

fn verify_bytes(
    home: &std::path::Path,
    bytes: &[u8],
) -> Result<chitin_audit::VerifyReport, chitin_audit::Tamper> {
    Verifier::new(pubkey(home)).verify_export_bytes(bytes)
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn join(lines: &[String]) -> Vec<u8> {
    let mut s = lines.join("\n");
    s.push('\n');
    s.into_bytes()
}

#[test]
fn a_full_export_verifies_offline() {
    let (_d, home) = build_log(12, 5);
    let bytes = export_bytes(&home, None, None, Format::Jsonl);
    let report = verify_bytes(&home, &bytes).unwrap();
    assert_eq!(report.records, 12);
    assert_eq!(report.last_checkpoint, Some(12));
    assert_eq!(report, verify(&home).unwrap());
}

#[test]
fn a_time_window_export_is_extended_to_its_covering_checkpoint_and_verifies() {
    let (_d, home) = build_log(12, 5);
    // Records are 7 ms apart starting at T0 + 7: select seqs 3..=6.
    let bytes = export_bytes(&home, Some(T0 + 21), Some(T0 + 42), Format::Jsonl);
    let report = verify_bytes(&home, &bytes).unwrap();
    assert_eq!(report.first_seq, Some(3));
    // Extended from 6 to the checkpoint at 10.
    assert_eq!(report.last_seq, Some(10));
    assert_eq!(report.records, 8);
}

#[test]
fn each_tamper_of_an_export_file_is_detected_at_the_right_record() {
    let (_d, home) = build_log(12, 5);
    let original = lines(&export_bytes(&home, None, None, Format::Jsonl));
    // Line 0 is the header, lines 1..=12 are records 1..=12, then checkpoints 5, 10, 12.
    assert_eq!(original.len(), 16);

    // A changed field.
    let mut l = original.clone();
    l[7] = l[7].replace(
        "\"actor\":\"Chitin::User::\\\"user6\\\"\"",
        "\"actor\":\"Chitin::User::\\\"mallory\\\"\"",
    );
    assert_ne!(l, original);
    assert_tamper(verify_bytes(&home, &join(&l)), 7, "modified field actor");

    // A deleted record line.
    let mut l = original.clone();
    l.remove(4);
    assert_tamper(verify_bytes(&home, &join(&l)), 4, "missing record");

    // Two swapped record lines.
    let mut l = original.clone();
    l.swap(4, 5);
    assert_tamper(verify_bytes(&home, &join(&l)), 4, "reordered");

    // A duplicated (replayed) record line.
    let mut l = original.clone();
    let dup = l[4].clone();
    l.insert(5, dup);
    assert_tamper(verify_bytes(&home, &join(&l)), 5, "reordered");

    // The last checkpoint removed: the tail is not covered any more.
    let mut l = original.clone();
    l.pop();
    assert_tamper(verify_bytes(&home, &join(&l)), 11, "inserted");

    // Records and checkpoint after 10 cut off: the header still says 12.
    let mut l = original.clone();
    l.truncate(11);
    l.push(original[13].clone());
    l.push(original[14].clone());
    assert_tamper(
        verify_bytes(&home, &join(&l)),
        11,
        "tail truncated behind a checkpoint",
    );

    // A broken line.
    let mut l = original.clone();
    l[9].truncate(40);
    assert_tamper(
        verify_bytes(&home, &join(&l)),
        9,
        "malformed export (line 10",
    );

    // A checkpoint signature replaced.
    let mut l = original.clone();
    let sig_of = |s: &str| {
        let v: serde_json::Value = serde_json::from_str(s).unwrap();
        v["sig"].as_str().unwrap().to_string()
    };
    let s5 = sig_of(&l[13]);
    let s10 = sig_of(&l[14]);
    l[14] = l[14].replace(&s10, &s5);
    assert_tamper(
        verify_bytes(&home, &join(&l)),
        10,
        "bad checkpoint signature",
    );
}

#[test]
fn an_export_verified_with_another_key_is_reported_as_wrong_key() {
    let (_d, home) = build_log(6, 5);
    let (_d2, other) = build_log(1, 0);
    let bytes = export_bytes(&home, None, None, Format::Jsonl);
    let result = Verifier::new(pubkey(&other)).verify_export_bytes(&bytes);
    assert_tamper(result, 5, "wrong key");
}

#[test]
fn a_csv_export_is_readable_and_verify_refuses_it_with_a_clear_message() {
    let (_d, home) = build_log(3, 0);
    let bytes = export_bytes(&home, None, None, Format::Csv);
    let text = String::from_utf8(bytes.clone()).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 4);
    assert!(rows[0].starts_with("seq,time,kind,actor"));
    assert!(
        rows[1].starts_with("1,2026-11-27T08:19:46.007Z,decision,"),
        "{}",
        rows[1]
    );
    let path = home.join("export.csv");
    std::fs::write(&path, &bytes).unwrap();
    let err = Verifier::new(pubkey(&home))
        .verify_export(&path)
        .unwrap_err();
    assert!(err.to_string().contains("csv is for reading only"), "{err}");
    assert!(err.to_string().contains("--format jsonl"), "{err}");
}

#[test]
fn an_export_of_an_uncheckpointed_tail_is_refused_until_a_checkpoint_exists() {
    let dir = tempfile::tempdir().unwrap();
    let log =
        chitin_audit::AuditLog::open(dir.path(), chitin_audit::AuditOptions::default()).unwrap();
    log.append(input(0)).unwrap();
    let reader = log.reader().unwrap();
    let mut out = Vec::new();
    let err =
        export::write_export(&reader, None, None, None, Format::Jsonl, T0, &mut out).unwrap_err();
    assert!(
        err.to_string()
            .contains("run `chitin audit checkpoint` first"),
        "{err}"
    );
}
