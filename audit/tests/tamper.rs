//! Every verifier has a "valid passes" test and a "each kind of tamper fails" test: here each
//! tamper is really performed on the SQLite file (with the append-only triggers dropped, as an
//! attacker with write access would) and must be reported at the right first bad record.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod common;

use chitin_audit::{Checkpoint, KeySigner, Record};
use common::*;
use rusqlite::params;

#[test]
fn a_valid_log_verifies_with_its_head_and_last_checkpoint() {
    let (_d, home) = build_log(25, 10);
    let report = verify(&home).unwrap();
    assert_eq!(report.records, 25);
    // 10 and 20 by count, 25 on shutdown.
    assert_eq!(report.last_checkpoint, Some(25));
    let recs = all_records(&home);
    assert_eq!(report.head.to_vec(), recs[24].hash);
    assert_eq!(
        report.ok_line(),
        format!(
            "ok: 25 records, head {}, last checkpoint 25",
            chitin_audit::to_hex(&recs[24].hash)
        )
    );
}

fn flip_text(s: &str) -> String {
    let mut b = s.as_bytes().to_vec();
    let i = b.len() / 2;
    b[i] ^= 0x01;
    String::from_utf8(b).unwrap()
}

#[test]
fn flipping_one_byte_in_any_field_names_that_field_and_record() {
    let (_d, home) = build_log(12, 5);
    let k: i64 = 7;
    let text_cols = [
        "kind", "actor", "action", "resource", "decision", "policies", "outcome", "payload",
    ];
    let blob_cols = ["payload_digest", "field_check", "prev_hash", "hash"];
    for col in text_cols {
        let (_c, h) = copy_home(&home);
        let db = attacker(&h);
        let v: String = db
            .query_row(
                &format!("SELECT {col} FROM records WHERE seq = ?1"),
                [k],
                |r| r.get(0),
            )
            .unwrap();
        db.execute(
            &format!("UPDATE records SET {col} = ?1 WHERE seq = ?2"),
            params![flip_text(&v), k],
        )
        .unwrap();
        drop(db);
        assert_tamper(verify(&h), k, &format!("modified field {col}"));
    }
    for col in blob_cols {
        let (_c, h) = copy_home(&home);
        let db = attacker(&h);
        let mut v: Vec<u8> = db
            .query_row(
                &format!("SELECT {col} FROM records WHERE seq = ?1"),
                [k],
                |r| r.get(0),
            )
            .unwrap();
        v[3] ^= 0x80;
        db.execute(
            &format!("UPDATE records SET {col} = ?1 WHERE seq = ?2"),
            params![v, k],
        )
        .unwrap();
        drop(db);
        assert_tamper(verify(&h), k, &format!("modified field {col}"));
    }
    // Integer columns: flip one bit of the second byte.
    for col in ["ts_ms", "seq"] {
        let (_c, h) = copy_home(&home);
        let db = attacker(&h);
        // XOR with 256 (SQLite has no XOR operator).
        db.execute(
            &format!("UPDATE records SET {col} = ({col} | 256) - ({col} & 256) WHERE seq = ?1"),
            [k],
        )
        .unwrap();
        drop(db);
        let name = if col == "ts_ms" { "ts" } else { "seq" };
        assert_tamper(verify(&h), k, &format!("modified field {name}"));
    }
}

#[test]
fn copying_one_record_over_the_next_is_reported() {
    let (_d, home) = build_log(12, 5);
    let db = attacker(&home);
    let cols = "ts_ms, kind, actor, action, resource, decision, policies, outcome, \
                payload_digest, payload, field_check, prev_hash, hash";
    db.execute_batch(&format!(
        "UPDATE records SET ({cols}) = (SELECT {cols} FROM records WHERE seq = 6) WHERE seq = 7;"
    ))
    .unwrap();
    drop(db);
    assert_tamper(
        verify(&home),
        7,
        "reordered (the record stored at seq 7 is record 6)",
    );
}

#[test]
fn deleting_a_middle_record_is_reported_as_missing() {
    let (_d, home) = build_log(12, 5);
    let db = attacker(&home);
    db.execute("DELETE FROM records WHERE seq = 8", []).unwrap();
    drop(db);
    assert_tamper(verify(&home), 8, "missing record");
}

#[test]
fn deleting_the_tail_behind_a_checkpoint_is_reported() {
    let (_d, home) = build_log(12, 5);
    // Checkpoints at 5, 10 and 12 (shutdown). Drop everything after 9.
    let db = attacker(&home);
    db.execute("DELETE FROM records WHERE seq > 9", []).unwrap();
    drop(db);
    assert_tamper(verify(&home), 10, "tail truncated behind a checkpoint");
}

#[test]
fn an_emptied_database_is_reported_against_the_checkpoint_file() {
    let (_d, home) = build_log(6, 5);
    let db = attacker(&home);
    db.execute_batch("DELETE FROM records; DELETE FROM checkpoints;")
        .unwrap();
    drop(db);
    assert_tamper(verify(&home), 1, "database emptied or rewritten");
}

#[test]
fn a_database_rewritten_from_scratch_is_reported_against_the_checkpoint_file() {
    let (_d, home) = build_log(6, 5);
    let (_d2, fresh) = build_log_from(100, 6, 100);
    // The attacker replaces the database (and its key) with a new one, keeping the
    // checkpoint file the gateway wrote.
    std::fs::copy(fresh.join("audit.db"), home.join("audit.db")).unwrap();
    assert_tamper(
        verify(&home),
        1,
        "inserted or rewritten records (records 1..5 do not match signed checkpoint 5)",
    );
}

#[test]
fn swapping_the_contents_of_two_records_is_reported_as_reordered() {
    swap_and_expect(7, 8);
    swap_and_expect(4, 11);
}

fn swap_and_expect(a: i64, b: i64) {
    let (_d, home) = build_log(12, 5);
    let db = attacker(&home);
    let cols = "ts_ms, kind, actor, action, resource, decision, policies, outcome, \
                payload_digest, payload, field_check, prev_hash, hash";
    db.execute_batch(&format!(
        "CREATE TEMP TABLE a AS SELECT {cols} FROM records WHERE seq = {a};
         CREATE TEMP TABLE b AS SELECT {cols} FROM records WHERE seq = {b};
         UPDATE records SET ({cols}) = (SELECT {cols} FROM b) WHERE seq = {a};
         UPDATE records SET ({cols}) = (SELECT {cols} FROM a) WHERE seq = {b};"
    ))
    .unwrap();
    drop(db);
    assert_tamper(
        verify(&home),
        a,
        &format!("reordered (the record stored at seq {a} is record {b})"),
    );
}

/// Rewrites records from `from` on with a consistent chain (what an attacker without the key
/// can do): recompute seq, prev_hash, field checks and hashes.
fn rechain(db: &rusqlite::Connection, recs: &mut [Record]) {
    let mut prev = recs[0].prev_hash.clone();
    for r in recs.iter_mut() {
        r.prev_hash = prev.clone();
        r.hash = r.compute_hash().to_vec();
        r.field_check = r.compute_field_check().to_vec();
        db.execute(
            "INSERT OR REPLACE INTO records (seq, ts_ms, kind, actor, action, resource, decision, \
             policies, outcome, payload_digest, payload, removed_at_ms, removed_reason, \
             field_check, prev_hash, hash) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16)",
            params![
                r.seq, r.ts_ms, r.kind, r.actor, r.action, r.resource, r.decision, r.policies,
                r.outcome, r.payload_digest, r.payload, r.removed_at_ms, r.removed_reason,
                r.field_check, r.prev_hash, r.hash
            ],
        )
        .unwrap();
        prev = r.hash.clone();
    }
}

#[test]
fn a_forged_record_inserted_with_recomputed_hashes_is_not_covered_by_a_checkpoint() {
    let (_d, home) = build_log(12, 5);
    let recs = all_records(&home);
    // Insert a forged record at seq 8 and renumber 8..12 to 9..13, recomputing everything.
    let mut forged = recs[7].clone();
    forged.actor = "Chitin::User::\"mallory\"".into();
    forged.seq = 8;
    let mut tail: Vec<Record> = vec![forged];
    for r in &recs[7..] {
        let mut r = r.clone();
        r.seq += 1;
        tail.push(r);
    }
    let db = attacker(&home);
    db.execute("DELETE FROM records WHERE seq >= 8", [])
        .unwrap();
    rechain(&db, &mut tail);
    drop(db);
    assert_tamper(verify(&home), 8, "inserted");
}

#[test]
fn a_record_rewritten_with_a_recomputed_chain_is_caught_by_the_next_checkpoint() {
    let (_d, home) = build_log(12, 5);
    let mut recs = all_records(&home);
    recs[6].outcome = "deny".into();
    let db = attacker(&home);
    rechain(&db, &mut recs[6..]);
    drop(db);
    assert_tamper(
        verify(&home),
        6,
        "inserted or rewritten records (records 6..10",
    );
}

fn rewrite_checkpoint_file(home: &std::path::Path, f: impl Fn(&mut Checkpoint)) {
    let path = home.join("audit.checkpoints");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = String::new();
    for mut c in chitin_audit::parse_checkpoint_lines(&text).unwrap() {
        f(&mut c);
        out.push_str(&c.to_line().unwrap());
        out.push('\n');
    }
    std::fs::write(&path, out).unwrap();
}

#[test]
fn a_replaced_checkpoint_signature_is_reported() {
    let (_d, home) = build_log(12, 5);
    // Replace the signature of checkpoint 10 with the one of checkpoint 5, in both copies.
    let text = std::fs::read_to_string(home.join("audit.checkpoints")).unwrap();
    let cps = chitin_audit::parse_checkpoint_lines(&text).unwrap();
    let sig5 = cps.iter().find(|c| c.seq == 5).unwrap().sig.clone();
    rewrite_checkpoint_file(&home, |c| {
        if c.seq == 10 {
            c.sig = sig5.clone();
        }
    });
    let db = attacker(&home);
    db.execute("UPDATE checkpoints SET sig = ?1 WHERE seq = 10", [&sig5])
        .unwrap();
    drop(db);
    assert_tamper(verify(&home), 10, "bad checkpoint signature");
}

#[test]
fn a_checkpoint_forged_with_another_key_is_reported_as_wrong_key() {
    let (_d, home) = build_log(12, 5);
    let mallory = KeySigner::from_seed(&[7u8; 32]);
    let recs = all_records(&home);
    let head: [u8; 32] = recs[11].hash.clone().try_into().unwrap();
    let forged = Checkpoint::sign(&mallory, 12, &head, T0 + 1_000_000).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(home.join("audit.checkpoints"))
        .unwrap();
    use std::io::Write;
    writeln!(f, "{}", forged.to_line().unwrap()).unwrap();
    assert_tamper(verify(&home), 12, "wrong key");
}

#[test]
fn verifying_with_the_wrong_public_key_is_reported() {
    let (_d, home) = build_log(12, 5);
    let other = KeySigner::from_seed(&[9u8; 32]);
    let result = chitin_audit::Verifier::new(chitin_audit::CheckpointSigner::public_key(&other))
        .verify_db(
            &home.join("audit.db"),
            Some(&home.join("audit.checkpoints")),
        )
        .unwrap();
    assert_tamper(result, 5, "wrong key");
}

#[test]
fn a_checkpoint_removed_from_the_checkpoint_file_is_reported() {
    let (_d, home) = build_log(12, 5);
    let path = home.join("audit.checkpoints");
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"seq\":10,"))
        .collect();
    assert_eq!(kept.len(), 2);
    std::fs::write(&path, kept.join("\n")).unwrap();
    assert_tamper(
        verify(&home),
        10,
        "checkpoint file does not match the database",
    );
}

#[test]
fn a_deleted_checkpoint_file_is_reported() {
    let (_d, home) = build_log(12, 5);
    std::fs::remove_file(home.join("audit.checkpoints")).unwrap();
    assert_tamper(
        verify(&home),
        5,
        "checkpoint file does not match the database",
    );
}

#[test]
fn flipping_bytes_anywhere_in_the_database_file_never_verifies_with_changed_content() {
    let (_d, home) = build_log(6, 3);
    let original = std::fs::read(home.join("audit.db")).unwrap();
    let records = all_records(&home);
    let key = pubkey(&home);
    let mut detected = 0usize;
    let mut errors = 0usize;
    let mut harmless = 0usize;
    // Every 23rd byte of the file (header, b-tree pages, cells), each flipped in one bit.
    for i in (0..original.len()).step_by(23) {
        let (_c, h) = copy_home(&home);
        let mut bytes = original.clone();
        bytes[i] ^= 1 << (i % 8);
        std::fs::write(h.join("audit.db"), &bytes).unwrap();
        match chitin_audit::Verifier::new(key)
            .verify_db(&h.join("audit.db"), Some(&h.join("audit.checkpoints")))
        {
            Err(_) => errors += 1,
            Ok(Err(_)) => detected += 1,
            Ok(Ok(report)) => {
                // Passing is only allowed when every record still reads back the same
                // (free space, unused header bytes).
                let now = chitin_audit::AuditReader::open(&h.join("audit.db"))
                    .unwrap()
                    .range(i64::MIN, i64::MAX)
                    .unwrap();
                assert_eq!(
                    now,
                    records,
                    "byte {i} changed content but verified: {}",
                    report.ok_line()
                );
                harmless += 1;
            }
        }
    }
    eprintln!("detected {detected}, errors {errors}, harmless {harmless}");
    assert!(
        detected > 20,
        "detected {detected}, errors {errors}, harmless {harmless}"
    );
}
