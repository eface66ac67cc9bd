//! GDPR export: complete for the subject, nothing of anyone else, audit records verifiable
//! from the archive, each tamper of the audit part detected, audited, new 0600 file.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use chitin::lifecycle::export;
use chitin::store::Dialect;
use chitin::vault::Subject;
use lifecycle_support::*;

/// Runs each named test (`fn name(d: Dialect)`) on SQLite and on a fresh PostgreSQL database.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn on_sqlite() {
                super::$name(chitin::store::Dialect::Sqlite)
            }
            #[test]
            fn on_postgres() {
                super::$name(chitin::store::Dialect::Postgres)
            }
        }
    )*};
}

on_both_backends!(
    the_export_holds_every_item_of_the_subject_and_nothing_of_anyone_else,
    an_identity_subject_exports_its_own_rows,
);
use serde_json::{Value, json};

const BOB_SECRET: &str = "bob-private-text-99x";

struct Seeded {
    alice: String,
    message_ids: Vec<i64>,
}

fn seed(h: &H) -> Seeded {
    let alice = user("alice");
    let bob = user("bob");
    let ident = "Chitin::Identity::\"telegram:12345\"".to_string();
    let mut ids = Vec::new();
    for (i, s) in ["s-a1", "s-a2"].iter().enumerate() {
        let at = T0 + i64::try_from(i).unwrap() * DAY;
        session(h, s, &alice, "alice", at, Some(&format!("summary {s}")));
        ids.push(message(
            h,
            s,
            &alice,
            1,
            "user",
            "transcript",
            at,
            &format!("alice says {s}"),
        ));
        ids.push(message(
            h,
            s,
            &alice,
            2,
            "assistant",
            "transcript",
            at,
            &format!("agent replies {s}"),
        ));
        ids.push(message(
            h,
            s,
            &alice,
            3,
            "tool",
            "tool_output",
            at,
            &format!("tool out {s}"),
        ));
        ids.push(message(
            h,
            s,
            &alice,
            4,
            "user",
            "attachment",
            at,
            &format!("file {s}"),
        ));
        run_row(h, &format!("r-{s}"), s, &alice, "alice", at);
        usage_row(h, &alice, "alice", s, &format!("r-{s}"), at);
    }
    approval(
        h,
        "ap-alice",
        "alice",
        Some("owner"),
        "used",
        T0,
        "alice asked",
    );
    approval(h, "ap-bob", "bob", Some("alice"), "used", T0, BOB_SECRET);
    audit_record(h, &alice, "message.receive", "web", json!({"n": 1}));
    audit_record(
        h,
        "gateway",
        "approval.request",
        "Chitin::Tool::\"exec\"",
        json!({"requester": "alice"}),
    );
    // Other people, interleaved.
    session(h, "s-b", &bob, "bob", T0, Some(BOB_SECRET));
    message(h, "s-b", &bob, 1, "user", "transcript", T0, BOB_SECRET);
    run_row(h, "r-b", "s-b", &bob, "bob", T0);
    usage_row(h, &bob, "bob", "s-b", "r-b", T0);
    audit_record(
        h,
        &bob,
        "message.receive",
        "web",
        json!({"text": BOB_SECRET}),
    );
    session(h, "s-i", &ident, "telegram:12345", T0, None);
    message(h, "s-i", &ident, 1, "user", "transcript", T0, BOB_SECRET);
    audit_record(h, &alice, "message.send", "web", json!({"n": 2}));
    Seeded {
        alice,
        message_ids: ids,
    }
}

fn lines(files: &BTreeMap<String, Vec<u8>>, name: &str) -> Vec<Value> {
    String::from_utf8(files[name].clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn the_export_holds_every_item_of_the_subject_and_nothing_of_anyone_else(d: Dialect) {
    let h = harness_on(d);
    let s = seed(&h);
    let out = h.home.parent().unwrap().join("alice-export.tar");
    let counts = export::export(&h.lc, &Subject::parse(&s.alice).unwrap(), &out, "op").unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let files = export::read_tar(&std::fs::read(&out).unwrap()).unwrap();
    for name in [
        "README.md",
        "subject.json",
        "sessions.jsonl",
        "messages.jsonl",
        "runs.jsonl",
        "usage.jsonl",
        "approvals.jsonl",
        "audit/records.jsonl",
        "audit/chain.jsonl",
        "audit/checkpoints.jsonl",
        "audit/audit.pub",
    ] {
        assert!(files.contains_key(name), "{name} missing");
        assert!(
            String::from_utf8_lossy(&files["README.md"]).contains(name),
            "README does not describe {name}"
        );
    }
    // Every item keyed to Alice is there, decrypted.
    let msgs = lines(&files, "messages.jsonl");
    let got: Vec<i64> = msgs.iter().map(|m| m["id"].as_i64().unwrap()).collect();
    let mut want = s.message_ids.clone();
    want.sort_unstable();
    let mut got_sorted = got.clone();
    got_sorted.sort_unstable();
    assert_eq!(got_sorted, want);
    let all = String::from_utf8_lossy(&files["messages.jsonl"]).into_owned();
    for s in ["s-a1", "s-a2"] {
        for text in [
            format!("alice says {s}"),
            format!("agent replies {s}"),
            format!("tool out {s}"),
            format!("file {s}"),
        ] {
            assert!(all.contains(&text), "{text}");
        }
    }
    let sessions = lines(&files, "sessions.jsonl");
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions[0]["summary"]["summary"], "summary s-a1");
    assert_eq!(lines(&files, "runs.jsonl").len(), 2);
    assert_eq!(lines(&files, "usage.jsonl").len(), 2);
    let approvals = lines(&files, "approvals.jsonl");
    assert_eq!(approvals.len(), 2);
    assert!(
        approvals
            .iter()
            .any(|a| a["role"] == "requester" && a["id"] == "ap-alice")
    );
    assert!(
        approvals
            .iter()
            .any(|a| a["role"] == "approver" && a["id"] == "ap-bob")
    );
    let recs = lines(&files, "audit/records.jsonl");
    let actions: Vec<&str> = recs.iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert!(
        actions.contains(&"message.receive")
            && actions.contains(&"message.send")
            && actions.contains(&"approval.request"),
        "{actions:?}"
    );
    assert_eq!(counts.messages, 8);
    assert_eq!(counts.audit_records, u64::try_from(recs.len()).unwrap());

    // Nothing of anyone else: Bob's and the Telegram identity's text, ids and keys.
    for (name, bytes) in &files {
        for other in [
            BOB_SECRET,
            "s-b",
            "r-b",
            "telegram:12345",
            "\"bob\"",
            "User::\\\"bob",
        ] {
            assert!(!contains(bytes, other.as_bytes()), "{other} in {name}");
        }
    }
    // Never secrets: no vault, secret store or identity material.
    for (name, bytes) in &files {
        for marker in [
            "AGE-SECRET-KEY",
            "chitin.vault-key",
            "chitin.audit-signing-key",
            "age-encryption.org",
        ] {
            assert!(!contains(bytes, marker.as_bytes()), "{marker} in {name}");
        }
    }
    // The export is audited.
    let mut exported = false;
    h.lc.audit
        .reader()
        .unwrap()
        .for_each_from(1, |r| {
            exported |= r.action == "data.export" && r.resource == s.alice;
            true
        })
        .unwrap();
    assert!(exported);
    // An existing file is never overwritten.
    assert!(export::export(&h.lc, &Subject::parse(&s.alice).unwrap(), &out, "op").is_err());
}

#[test]
fn the_audit_part_verifies_and_each_kind_of_tamper_fails() {
    let h = harness();
    let s = seed(&h);
    let (files, _) = export::collect(&h.lc, &Subject::parse(&s.alice).unwrap()).unwrap();
    let n = export::verify_audit_part(&files).unwrap();
    assert!(n >= 3);

    let edit = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut files = files.clone();
        let mut ls = lines(&files, name);
        f(&mut ls[0]);
        let text: String = ls.iter().map(|l| format!("{l}\n")).collect();
        files.insert(name.into(), text.into_bytes());
        export::verify_audit_part(&files).unwrap_err()
    };
    let e = edit("audit/records.jsonl", &|r| {
        r["payload"] = json!("{\"n\":9}")
    });
    assert!(e.contains("payload does not match"), "{e}");
    let e = edit("audit/records.jsonl", &|r| {
        r["action"] = json!("message.forged")
    });
    assert!(e.contains("hash does not match"), "{e}");
    let e = edit("audit/chain.jsonl", &|l| l["hash"] = json!("00".repeat(32)));
    assert!(e.contains("chain broken") || e.contains("differs"), "{e}");
    let e = edit("audit/checkpoints.jsonl", &|c| {
        let mut sig = c["sig"].as_str().unwrap().to_string();
        sig.replace_range(0..2, if &sig[0..2] == "00" { "11" } else { "00" });
        c["sig"] = json!(sig);
    });
    assert!(e.contains("no checkpoint signed"), "{e}");
    let mut other_key = files.clone();
    other_key.insert(
        "audit/audit.pub".into(),
        format!("chitin-audit-ed25519:{}\n", "ab".repeat(32)).into_bytes(),
    );
    assert!(export::verify_audit_part(&other_key).is_err());
    let mut dropped = files.clone();
    dropped.remove("audit/chain.jsonl");
    assert!(
        export::verify_audit_part(&dropped)
            .unwrap_err()
            .contains("missing")
    );
}

fn an_identity_subject_exports_its_own_rows(d: Dialect) {
    let h = harness_on(d);
    seed(&h);
    let ident = Subject::parse("Chitin::Identity::\"telegram:12345\"").unwrap();
    let (files, counts) = export::collect(&h.lc, &ident).unwrap();
    assert_eq!(
        (counts.sessions, counts.messages, counts.approvals),
        (1, 1, 0)
    );
    assert!(contains(&files["messages.jsonl"], BOB_SECRET.as_bytes()));
    assert!(!contains(&files["messages.jsonl"], b"alice"));
}
