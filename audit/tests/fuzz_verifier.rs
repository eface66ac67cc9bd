//! Property tests: the verifiers never panic on arbitrary input, and never accept an input
//! whose records or checkpoints differ from the original.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use std::sync::OnceLock;

use chitin_audit::export::{self, Format};
use chitin_audit::{AuditReader, Checkpoint, PublicKey, Record, Verifier};
use common::*;
use proptest::prelude::*;

struct Fixture {
    key: PublicKey,
    export: Vec<u8>,
    rows: Vec<Record>,
    checkpoints: Vec<Checkpoint>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (dir, home) = build_log(8, 3);
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
        Fixture {
            key: pubkey(&home),
            export: out,
            rows: all_records(&home),
            checkpoints: reader.checkpoints().unwrap(),
            _dir: dir,
        }
    })
}

fn parts(bytes: &[u8]) -> Option<(Vec<Record>, Vec<Checkpoint>)> {
    export::parse_jsonl(bytes)
        .ok()
        .map(|p| (p.records, p.checkpoints))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_never_verify_with_records(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let f = fixture();
        if let Ok(report) = Verifier::new(f.key).verify_export_bytes(&bytes) {
            // Only an (empty) export with nothing to prove can pass.
            prop_assert_eq!(report.records, 0);
        }
    }

    #[test]
    fn arbitrary_json_lines_never_panic(lines in proptest::collection::vec("[ -~]{0,120}", 0..12)) {
        let f = fixture();
        let mut text = String::from("{\"type\":\"chitin-audit-export\",\"format\":\"chitin-audit-export\",\"version\":1,\"first_seq\":1,\"last_seq\":3,\"key_id\":\"\",\"exported_at_ms\":0}\n");
        for l in &lines {
            text.push_str(l);
            text.push('\n');
        }
        let _ = Verifier::new(f.key).verify_export_bytes(text.as_bytes());
    }

    #[test]
    fn a_mutated_export_never_verifies_with_changed_content(
        pos in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        delete in any::<bool>(),
    ) {
        let f = fixture();
        let mut bytes = f.export.clone();
        let i = pos.index(bytes.len());
        if delete { bytes.remove(i); } else { bytes[i] = byte; }
        if Verifier::new(f.key).verify_export_bytes(&bytes).is_ok() {
            // The only mutations allowed to pass leave every record and checkpoint unchanged
            // (JSON whitespace, the unsigned export header fields).
            prop_assert_eq!(parts(&bytes), parts(&f.export));
        }
    }

    #[test]
    fn mutated_database_rows_never_panic_and_never_verify_when_changed(
        row in any::<prop::sample::Index>(),
        field in 0usize..16,
        int in any::<i64>(),
        text in ".{0,16}",
        blob in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let f = fixture();
        let mut rows = f.rows.clone();
        let r = &mut rows[row.index(f.rows.len())];
        match field {
            0 => r.seq = int,
            1 => r.ts_ms = int,
            2 => r.kind = text,
            3 => r.actor = text,
            4 => r.action = text,
            5 => r.resource = text,
            6 => r.decision = text,
            7 => r.policies = text,
            8 => r.outcome = text,
            9 => r.payload_digest = blob,
            10 => r.payload = Some(text),
            11 => r.removed_at_ms = Some(int),
            12 => r.removed_reason = Some(text),
            13 => r.field_check = blob,
            14 => r.prev_hash = blob,
            _ => r.hash = blob,
        }
        let changed = rows != f.rows;
        let result = Verifier::new(f.key).verify_rows(&rows, &f.checkpoints);
        if changed {
            prop_assert!(result.is_err(), "a changed row verified");
        } else {
            prop_assert!(result.is_ok());
        }
    }
}

#[test]
fn every_single_bit_flip_of_a_small_export_is_detected_or_changes_nothing() {
    // T-AUD-02 in small: flip every bit of a 2-record export in turn.
    let (_d, home) = build_log(2, 2);
    let reader = AuditReader::open(&home.join("audit.db")).unwrap();
    let mut original = Vec::new();
    export::write_export(
        &reader,
        Some(&home.join("audit.checkpoints")),
        None,
        None,
        Format::Jsonl,
        T0,
        &mut original,
    )
    .unwrap();
    let verifier = Verifier::new(pubkey(&home));
    assert!(verifier.verify_export_bytes(&original).is_ok());
    let want = parts(&original);
    let (mut detected, mut neutral) = (0usize, 0usize);
    for i in 0..original.len() {
        for bit in 0..8 {
            let mut bytes = original.clone();
            bytes[i] ^= 1 << bit;
            if verifier.verify_export_bytes(&bytes).is_ok() {
                assert_eq!(
                    parts(&bytes),
                    want,
                    "bit {bit} of byte {i} changed content but verified"
                );
                neutral += 1;
            } else {
                detected += 1;
            }
        }
    }
    eprintln!(
        "{detected} flips detected, {neutral} content-neutral (unsigned header fields, JSON whitespace)"
    );
    assert!(detected > neutral * 10);
}
