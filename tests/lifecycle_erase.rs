//! GDPR erasure: the canary sweep over every file of the state dir (database free pages and
//! WAL included) and over a backup taken before the erase, the audit chain after erasure,
//! policy gating, dry runs, legal holds and repeated erasure.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use chitin::lifecycle::{self, LifecycleError, backup, erase, retention};
use chitin::store::Dialect;
use chitin::vault::{Subject, Vault, VaultError};
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
    the_erasure_receipt_names_no_subject_and_the_chain_verifies,
    erasing_twice_succeeds_and_the_second_time_finds_nothing,
    a_dry_run_lists_what_would_go_and_changes_nothing,
    a_subject_under_legal_hold_is_not_erased,
);
use serde_json::json;

const CANARIES: [&str; 4] = [
    "CANARY-MSG-5e1f0c",
    "CANARY-TOOL-77a2d9",
    "CANARY-ATTACH-c0ffee",
    "CANARY-SUMMARY-b16b00",
];
const AUDIT_CANARY: &str = "CANARY-AUDIT-9f3e21";
const BOB_TEXT: &str = "bob-keeps-this-3a4b";

/// Alice's content in every class (and a summary), Bob's alongside.
fn seed(h: &H) -> (String, String) {
    let alice = user("alice");
    let bob = user("bob");
    session(h, "s-a", &alice, "alice", T0, Some(CANARIES[3]));
    message(h, "s-a", &alice, 1, "user", "transcript", T0, CANARIES[0]);
    message(
        h,
        "s-a",
        &alice,
        2,
        "assistant",
        "transcript",
        T0,
        &format!("reply to {}", CANARIES[0]),
    );
    message(h, "s-a", &alice, 3, "tool", "tool_output", T0, CANARIES[1]);
    message(h, "s-a", &alice, 4, "user", "attachment", T0, CANARIES[2]);
    run_row(h, "r-a", "s-a", &alice, "alice", T0);
    usage_row(h, &alice, "alice", "s-a", "r-a", T0);
    approval(
        h,
        "ap-a",
        "alice",
        Some("owner"),
        "used",
        T0,
        "alice wants to run a tool",
    );
    approval(
        h,
        "ap-b",
        "bob",
        Some("alice"),
        "used",
        T0,
        "bob asked, alice granted",
    );
    audit_record(
        h,
        &alice,
        "message.receive",
        "web",
        json!({"text": AUDIT_CANARY}),
    );
    session(h, "s-b", &bob, "bob", T0, Some(BOB_TEXT));
    message(h, "s-b", &bob, 1, "user", "transcript", T0, BOB_TEXT);
    audit_record(h, &bob, "message.receive", "web", json!({"text": BOB_TEXT}));
    (alice, bob)
}

fn all_bytes(h: &H) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    files_under(&h.home)
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Every sealed blob (`CV1` + key id) found anywhere in `bytes` whose key still exists.
fn blobs_with_live_keys(vault: &Vault, bytes: &[u8]) -> usize {
    let live = vault.live_key_ids().unwrap();
    bytes
        .windows(3 + 16)
        .filter(|w| w.starts_with(b"CV1") && live.iter().any(|id| &w[3..] == id.as_slice()))
        .count()
}

#[test]
fn after_erase_no_file_and_no_earlier_backup_yields_the_canaries() {
    let h = harness();
    let (alice, bob) = seed(&h);
    let identity_file = h.home.parent().unwrap().join("backup-identity.txt");
    let recipient = backup::keygen(&identity_file, T0).unwrap();
    let before = h.home.parent().unwrap().join("before-erase.age");
    backup::create(&h.home, &h.lc.store, &h.lc.audit, &recipient, &before, T0).unwrap();

    // Controls: the sweep can see what it looks for. Before the erase, Alice's audit payload is
    // on disk in plaintext and her sealed rows are blobs with a live key.
    let disk = all_bytes(&h);
    assert!(
        disk.iter()
            .any(|(_, b)| contains(b, AUDIT_CANARY.as_bytes()))
    );
    let alice_key = {
        let body: Vec<u8> =
            h.lc.store
                .conn()
                .unwrap()
                .query_row(
                    "SELECT body FROM messages WHERE session_key = 's-a' AND seq = 1",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
        Vault::key_id_of(&body).unwrap()
    };
    assert!(disk.iter().any(|(_, b)| contains(b, &alice_key)));

    let s = Subject::parse(&alice).unwrap();
    let r = erase::erase(&h.lc, &s, "Chitin::User::\"owner\"", false).unwrap();
    assert_eq!(r.plan.messages, 4);
    assert!(r.plan.data_key);
    assert!(r.wal_truncated);

    // 1. No file under the state dir holds a canary in plaintext, nor any blob sealed with
    //    Alice's key id... and no blob anywhere opens with the keys that remain (except Bob's).
    for (path, bytes) in all_bytes(&h) {
        for c in CANARIES.iter().chain([&AUDIT_CANARY]) {
            assert!(!contains(&bytes, c.as_bytes()), "{c} in {}", path.display());
        }
        assert!(
            !contains(&bytes, &alice_key),
            "Alice's key id in {}",
            path.display()
        );
    }
    assert!(!h.lc.vault.has_key(&alice).unwrap());
    assert!(
        matches!(h.lc.vault.live_key_ids().unwrap().as_slice(), [_]),
        "only Bob's key remains"
    );

    // 2. The backup taken before: decrypted with the backup identity, no canary in plaintext;
    //    its sealed rows do not open with the keys that remain.
    let id = backup::load_identity(&identity_file).unwrap();
    let opened = backup::open(&before, &id).unwrap();
    for (name, bytes) in &opened.members {
        for c in CANARIES {
            assert!(
                !contains(bytes, c.as_bytes()),
                "{c} in backup member {name}"
            );
        }
        // The data keys are in the backup only sealed under the vault master key (so that a
        // restore onto a new machine brings conversations back): no key id in plaintext. A
        // restore of this backup erases Alice again (`reapply_after_restore`).
        if name == "vault.keys" {
            assert!(
                !contains(bytes, &alice_key),
                "Alice's key id in plaintext in the backup's vault.keys"
            );
        }
        // Blobs sealed with a key that still exists: only Bob's.
        if name == "state.db" {
            assert!(
                blobs_with_live_keys(&h.lc.vault, bytes) >= 1,
                "control: Bob's rows"
            );
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("state.db");
    std::fs::write(&db, &opened.members["state.db"][..]).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut st = conn.prepare("SELECT subject, body FROM messages").unwrap();
    let rows: Vec<(String, Vec<u8>)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let (mut alice_rows, mut bob_rows) = (0, 0);
    for (subject, body) in &rows {
        // Try every subject's remaining key, not just the row's own.
        for who in [&alice, &bob] {
            match h.lc.vault.open(who, body) {
                Ok(plain) if subject == &bob && who == &bob => {
                    assert!(contains(&plain, BOB_TEXT.as_bytes()));
                    bob_rows += 1;
                }
                Ok(_) => panic!("{subject}'s row opened as {who} after the erase"),
                Err(
                    VaultError::Erased { .. }
                    | VaultError::Tampered { .. }
                    | VaultError::UnknownKey { .. },
                ) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        if subject == &alice {
            alice_rows += 1;
            assert!(matches!(
                h.lc.vault.open(&alice, body),
                Err(VaultError::Erased { .. })
            ));
        }
    }
    assert_eq!(
        (alice_rows, bob_rows),
        (4, 1),
        "the backup really held Alice's rows"
    );

    // 3. The audit chain still verifies; Bob's data is intact.
    audit_verifies(&h.home);
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM messages WHERE subject = 'Chitin::User::\"bob\"'"
        ),
        1
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM approvals WHERE id = 'ap-b' AND resolved_by = 'erased'"
        ),
        1
    );
}

fn the_erasure_receipt_names_no_subject_and_the_chain_verifies(d: Dialect) {
    let h = harness_on(d);
    let (alice, _) = seed(&h);
    let s = Subject::parse(&alice).unwrap();
    let r = erase::erase(&h.lc, &s, "Chitin::User::\"owner\"", false).unwrap();
    let seq = r.receipt_seq.unwrap();
    let rec = &h.lc.audit.reader().unwrap().range(seq, seq).unwrap()[0];
    assert_eq!(rec.action, "data.erase.receipt");
    assert_eq!(rec.resource, lifecycle::subject_digest(&s));
    let payload = rec.payload.clone().unwrap();
    assert!(!payload.contains("alice"), "{payload}");
    assert!(payload.contains("\"data_key_destroyed\":true"), "{payload}");
    // Every removed payload has its payload_removed note; the verifier accepts the log.
    assert!(audit_verifies(&h.home).starts_with("ok: "));
}

fn erasing_twice_succeeds_and_the_second_time_finds_nothing(d: Dialect) {
    let h = harness_on(d);
    let (alice, _) = seed(&h);
    let s = Subject::parse(&alice).unwrap();
    erase::erase(&h.lc, &s, "op", false).unwrap();
    let again = erase::erase(&h.lc, &s, "op", false).unwrap();
    assert_eq!(again.plan, erase::ErasePlan::default());
    assert!(again.receipt_seq.is_some());
    audit_verifies(&h.home);
}

fn a_dry_run_lists_what_would_go_and_changes_nothing(d: Dialect) {
    let h = harness_on(d);
    let (alice, _) = seed(&h);
    let s = Subject::parse(&alice).unwrap();
    let head = h.lc.audit.reader().unwrap().head().unwrap();
    let r = erase::erase(&h.lc, &s, "op", true).unwrap();
    assert_eq!(
        (
            r.plan.messages,
            r.plan.sessions,
            r.plan.runs,
            r.plan.usage,
            r.plan.approvals_requested,
            r.plan.approvals_resolved
        ),
        (4, 1, 1, 1, 1, 1)
    );
    assert!(r.plan.audit_payloads >= 1 && r.plan.data_key);
    assert!(r.receipt_seq.is_none());
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 5);
    assert!(h.lc.vault.has_key(&alice).unwrap());
    assert_eq!(h.lc.audit.reader().unwrap().head().unwrap(), head);
}

fn a_subject_under_legal_hold_is_not_erased(d: Dialect) {
    let h = harness_on(d);
    let (alice, _) = seed(&h);
    let s = Subject::parse(&alice).unwrap();
    retention::hold(&h.lc, &s, "court order", "op").unwrap();
    let e = erase::erase(&h.lc, &s, "op", false).unwrap_err();
    assert!(matches!(e, LifecycleError::Held { .. }), "{e}");
    assert!(e.to_string().contains("chitin retention release"), "{e}");
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 5);
    assert!(h.lc.vault.has_key(&alice).unwrap());
}

#[test]
fn erase_and_export_are_decided_by_cedar_and_a_non_owner_is_refused() {
    let h = harness();
    seed(&h);
    for action in [
        chitin::policy::Action::DataErase,
        chitin::policy::Action::DataExport,
    ] {
        let e = lifecycle::admin_check(&h.gate, "mallory", action).unwrap_err();
        assert!(matches!(e, LifecycleError::Denied { .. }), "{e}");
        assert!(e.to_string().contains(action.as_str()), "{e}");
        lifecycle::admin_check(&h.gate, "owner", action).unwrap();
    }
    // Both decisions were recorded by the gate.
    let mut decisions = Vec::new();
    h.lc.audit
        .reader()
        .unwrap()
        .for_each_from(1, |r| {
            if r.kind == "decision" {
                decisions.push((r.actor.clone(), r.action.clone(), r.decision.clone()));
            }
            true
        })
        .unwrap();
    assert!(
        decisions
            .iter()
            .any(|d| d.0.contains("mallory") && d.1.contains("data.erase") && d.2 == "deny"),
        "{decisions:?}"
    );
}

#[test]
fn a_restore_of_a_backup_older_than_an_erase_erases_the_subject_again() {
    let h = harness();
    let (alice, bob) = seed(&h);
    let identity_file = h.home.parent().unwrap().join("id.txt");
    let recipient = backup::keygen(&identity_file, T0).unwrap();
    let before = h.home.parent().unwrap().join("b.age");
    backup::create(&h.home, &h.lc.store, &h.lc.audit, &recipient, &before, T0).unwrap();
    h.clock.advance(60_000);
    erase::erase(&h.lc, &Subject::parse(&alice).unwrap(), "op", false).unwrap();
    let opened = backup::open(&before, &backup::load_identity(&identity_file).unwrap()).unwrap();
    let verified = backup::check(opened, &h.lc.audit.public_key()).unwrap();
    let home = h.home.clone();
    let clock = h.clock.clone();
    let H { _t, lc, gate, .. } = h;
    lc.audit.shutdown().unwrap();
    drop((lc, gate));
    backup::restore(&verified, &home).unwrap().commit();
    let h = open_at(_t, home, clock);
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM messages"),
        5,
        "the backup's rows are back"
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM approvals WHERE requester = 'alice'"
        ),
        1
    );
    let again = erase::reapply_after_restore(&h.lc, T0, "op").unwrap();
    assert_eq!(
        again.subjects,
        vec![Subject::parse(&alice).unwrap().digest()]
    );
    let q = |s: &str| s.replace('\'', "''");
    assert_eq!(
        count(
            &h,
            &format!(
                "SELECT COUNT(*) FROM messages WHERE subject = '{}'",
                q(&alice)
            )
        ),
        0
    );
    assert_eq!(
        count(
            &h,
            &format!(
                "SELECT COUNT(*) FROM sessions WHERE subject = '{}'",
                q(&alice)
            )
        ),
        0
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM approvals WHERE requester = 'alice'"
        ),
        0
    );
    assert_eq!(
        count(
            &h,
            &format!(
                "SELECT COUNT(*) FROM messages WHERE subject = '{}'",
                q(&bob)
            )
        ),
        1
    );
    // Alice's audit payload that the backup brought back is removed again: nothing on disk.
    for (path, bytes) in all_bytes(&h) {
        for c in CANARIES.iter().chain([&AUDIT_CANARY]) {
            assert!(!contains(&bytes, c.as_bytes()), "{c} in {}", path.display());
        }
    }
    audit_verifies(&h.home);
}

#[test]
fn erasing_a_user_removes_their_chat_messages_pairings_and_the_cron_jobs_they_added() {
    let h = harness();
    let (alice, _) = seed(&h);
    {
        let conn = h.lc.store.conn().unwrap();
        for (id, subject) in [(1, alice.as_str()), (2, "Chitin::User::\"bob\"")] {
            conn.execute(
                "INSERT INTO channel_events (id, channel, event_id, received_ms, event_kind, chat_id, chat_kind, sender_id, message_id, status, subject, text, updated_ms)
                 VALUES (?1, 'tg', ?2, 0, 'message', '42', 'dm', '42', '7', 'admitted', ?3, x'00', 0)",
                rusqlite::params![id, format!("u:{id}"), subject],
            )
            .unwrap();
        }
        for (identity, user) in [("telegram:42", "alice"), ("telegram:43", "bob")] {
            conn.execute(
                "INSERT INTO managed_entities (identity, user_id, channel, added_by, added_ms) VALUES (?1, ?2, 'tg', 'owner', 0)",
                rusqlite::params![identity, user],
            )
            .unwrap();
        }
        for (name, source, user) in [
            ("alice-daily", "agent", "alice"),
            ("alice-cfg", "config", "alice"),
            ("bob-daily", "cli", "bob"),
        ] {
            conn.execute(
                "INSERT INTO cron_jobs (name, source, user_id, job_json, created_by, created_ms, updated_ms) VALUES (?1, ?2, ?3, '{}', ?3, 0, 0)",
                rusqlite::params![name, source, user],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO cron_firings (job, slot, tick_ms, kind, status, created_ms) VALUES (?1, 't:0', 0, 'scheduled', 'completed', 0)",
                [name],
            )
            .unwrap();
        }
    }
    let s = Subject::parse(&alice).unwrap();
    let plan = erase::erase(&h.lc, &s, "op", true).unwrap().plan;
    assert_eq!(
        (plan.chat_messages, plan.chat_pairings, plan.cron_jobs),
        (1, 1, 1)
    );
    erase::erase(&h.lc, &s, "op", false).unwrap();
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_events"), 1);
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM managed_entities WHERE user_id = 'alice'"
        ),
        0
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM managed_entities"), 1);
    // The job she added and its firings go; the operator's configured job and Bob's stay.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM cron_jobs WHERE name = 'alice-daily'"
        ),
        0
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM cron_firings WHERE job = 'alice-daily'"
        ),
        0
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM cron_jobs"), 2);
}

#[test]
fn erasing_a_user_deletes_their_account_tokens_sessions_and_devices_and_keeps_others_rows() {
    let h = harness();
    let (alice, _) = seed(&h);
    {
        let conn = h.lc.store.conn().unwrap();
        for user in ["alice", "bob"] {
            conn.execute(
                "INSERT INTO account_users (user_id, groups, source, added_by, added_ms, updated_ms) VALUES (?1, '[]', 'oidc', ?2, 0, 0)",
                rusqlite::params![user, if user == "bob" { alice.as_str() } else { "oidc" }],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO api_tokens (id, user_id, name, hash, created_by, created_ms) VALUES (?1, ?2, 'api', x'00', ?3, 0)",
                rusqlite::params![format!("tok-{user}"), user, alice],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO web_sessions (id, hash, user_id, groups, method, csrf, client, created_ms, last_seen_ms, expires_ms) VALUES (?1, x'00', ?2, '[]', 'oidc', 'c', '127.0.0.1', 0, 0, 1)",
                rusqlite::params![format!("ses-{user}"), user],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO devices (id, hash, user_id, status, client, user_agent, created_ms, decided_by) VALUES (?1, x'00', ?2, 'approved', '203.0.113.7', 'ua', 0, ?3)",
                rusqlite::params![format!("dev-{user}"), user, alice],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO account_removed (user_hash, removed_ms) VALUES (x'0102', 0)",
            [],
        )
        .unwrap();
    }
    let s = Subject::parse(&alice).unwrap();
    let plan = erase::erase(&h.lc, &s, "op", true).unwrap().plan;
    assert_eq!(
        (
            plan.account_user,
            plan.api_tokens,
            plan.web_sessions,
            plan.devices
        ),
        (1, 1, 1, 1)
    );
    erase::erase(&h.lc, &s, "op", false).unwrap();
    for table in ["account_users", "api_tokens", "web_sessions", "devices"] {
        assert_eq!(
            count(
                &h,
                &format!("SELECT COUNT(*) FROM {table} WHERE user_id = 'alice'")
            ),
            0,
            "{table}"
        );
        assert_eq!(
            count(
                &h,
                &format!("SELECT COUNT(*) FROM {table} WHERE user_id = 'bob'")
            ),
            1,
            "{table}"
        );
    }
    // Where alice acted for bob, bob's rows stay and name her no more.
    for sql in [
        "SELECT COUNT(*) FROM api_tokens WHERE created_by = 'erased'",
        "SELECT COUNT(*) FROM devices WHERE decided_by = 'erased'",
        "SELECT COUNT(*) FROM account_users WHERE added_by = 'erased'",
    ] {
        assert_eq!(count(&h, sql), 1, "{sql}");
    }
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM api_tokens WHERE created_by LIKE '%alice%'"
        ),
        0
    );
    // A removal tombstone (a hash, no personal data) stays.
    assert_eq!(count(&h, "SELECT COUNT(*) FROM account_removed"), 1);
}

/// The agent's transcripts over the harness's store and vault, with a history cache.
fn cached_transcripts(h: &H, bytes: usize) -> chitin::agent::Transcripts {
    chitin::agent::Transcripts::new(
        std::sync::Arc::clone(&h.lc.store),
        std::sync::Arc::clone(&h.lc.vault) as std::sync::Arc<dyn chitin::agent::Sealer>,
    )
    .with_cache(bytes)
}

/// A turn of `user_id` in `key` as the agent stores it: the user's message, then the answer.
fn stored_turn(t: &chitin::agent::Transcripts, key: &str, user_id: &str, run: &str, text: &str) {
    let m = chitin::agent::Stored::User {
        text: text.into(),
        from: user_id.into(),
        untrusted: false,
    };
    t.begin_turn(key, user_id, "web", run, None, &m, false, T0)
        .unwrap();
    let a = chitin::agent::Stored::Assistant {
        text: format!("answer to {text}"),
        tool_calls: Vec::new(),
    };
    t.append_step(key, user_id, Some(run), &a, None, Some("completed"), T0)
        .unwrap();
}

fn texts(t: &chitin::agent::Transcripts, key: &str) -> Vec<String> {
    t.history_shared(key)
        .unwrap()
        .1
        .iter()
        .map(|e| match e.message() {
            chitin::providers::Message::User { text }
            | chitin::providers::Message::Assistant { text, .. } => text.clone(),
            chitin::providers::Message::ToolResult { content, .. } => content.clone(),
        })
        .collect()
}

#[test]
fn an_erased_users_opened_messages_leave_the_history_cache_when_the_erase_runs() {
    let h = harness();
    let t = cached_transcripts(&h, 1 << 20);
    stored_turn(&t, "s-alice", "alice", "r1", CANARIES[0]);
    stored_turn(&t, "s-bob", "bob", "r2", BOB_TEXT);
    assert_eq!(texts(&t, "s-alice").len(), 2);
    assert_eq!(texts(&t, "s-bob").len(), 2);
    let cache = t.cache().unwrap();
    assert!(cache.holds_subject(&user("alice")));
    assert!(cache.holds_subject(&user("bob")));

    erase::erase(&h.lc, &Subject::parse(&user("alice")).unwrap(), "op", false).unwrap();
    // Dropped by the erase itself, before anyone reads again; Bob's stay.
    assert!(!cache.holds_subject(&user("alice")));
    assert!(cache.holds_subject(&user("bob")));
    assert!(matches!(
        t.history_shared("s-alice"),
        Err(chitin::agent::transcripts::TranscriptError::NoSession(_))
    ));
    assert_eq!(
        texts(&t, "s-bob"),
        vec![BOB_TEXT.to_string(), format!("answer to {BOB_TEXT}")]
    );
}

#[test]
fn a_key_destroyed_by_another_process_empties_the_cache_before_it_serves_again() {
    let h = harness();
    let t = cached_transcripts(&h, 1 << 20);
    stored_turn(&t, "s-alice", "alice", "r1", CANARIES[0]);
    stored_turn(&t, "s-bob", "bob", "r2", BOB_TEXT);
    texts(&t, "s-alice");
    texts(&t, "s-bob");
    assert!(t.cache().unwrap().holds_subject(&user("alice")));
    // Another process (the CLI's `data erase`) with its own vault handle destroys the key.
    let mut secrets = open_store(&h.home);
    let other = Vault::from_store(
        &h.home,
        &mut secrets,
        std::sync::Arc::new(h.clock.clone()) as std::sync::Arc<dyn chitin::clock::Clock>,
    )
    .unwrap();
    assert!(other.destroy(&user("alice")).unwrap());
    // The next read of any session notices it first: Alice's plaintext is not kept, and her
    // messages no longer open.
    assert_eq!(texts(&t, "s-bob").len(), 2);
    assert!(!t.cache().unwrap().holds_subject(&user("alice")));
    assert!(matches!(
        t.history_shared("s-alice"),
        Err(chitin::agent::transcripts::TranscriptError::Seal(_))
    ));
}

#[test]
fn messages_deleted_by_another_connection_are_never_served_from_the_cache() {
    let h = harness();
    let t = cached_transcripts(&h, 1 << 20);
    stored_turn(&t, "s-bob", "bob", "r1", "first");
    stored_turn(&t, "s-bob", "bob", "r2", "second");
    assert_eq!(texts(&t, "s-bob").len(), 4);
    // Another process deletes the first turn (a retention run of the CLI, say).
    let other = chitin::store::Store::open(&h.home.join("state.db")).unwrap();
    other
        .conn()
        .unwrap()
        .execute(
            "DELETE FROM messages WHERE session_key = 's-bob' AND seq <= 2",
            [],
        )
        .unwrap();
    assert_eq!(
        texts(&t, "s-bob"),
        vec!["second".to_string(), "answer to second".to_string()]
    );
    // New messages after the deletion are read as usual.
    stored_turn(&t, "s-bob", "bob", "r3", "third");
    assert_eq!(texts(&t, "s-bob").len(), 4);
}

#[test]
fn a_compaction_summary_replaces_what_it_covers_in_the_cached_history() {
    let h = harness();
    let t = cached_transcripts(&h, 1 << 20);
    stored_turn(&t, "s-bob", "bob", "r1", "first");
    stored_turn(&t, "s-bob", "bob", "r2", "second");
    assert_eq!(texts(&t, "s-bob").len(), 4);
    t.set_summary("s-bob", "bob", "they said first", 2).unwrap();
    let (summary, entries) = t.history_shared("s-bob").unwrap();
    assert_eq!(
        summary.as_ref().map(|s| s.as_str()),
        Some("they said first")
    );
    assert_eq!(
        entries.iter().map(|e| e.seq()).collect::<Vec<_>>(),
        vec![3, 4]
    );
    t.set_summary("s-bob", "bob", "they said both", 4).unwrap();
    let (summary, entries) = t.history_shared("s-bob").unwrap();
    assert_eq!(summary.as_ref().map(|s| s.as_str()), Some("they said both"));
    assert!(entries.is_empty());
}

#[test]
fn a_cached_history_grows_in_place_and_a_read_still_held_does_not_change() {
    let h = harness();
    let t = cached_transcripts(&h, 1 << 20);
    stored_turn(&t, "s-bob", "bob", "r1", "first");
    let (_, held) = t.history_shared("s-bob").unwrap();
    assert_eq!(held.len(), 2);
    // A new turn while a step still holds its read: the next read sees it, the held one
    // keeps what it was given.
    stored_turn(&t, "s-bob", "bob", "r2", "second");
    let (_, next) = t.history_shared("s-bob").unwrap();
    assert_eq!(
        next.iter().map(|e| e.seq()).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(held.iter().map(|e| e.seq()).collect::<Vec<_>>(), vec![1, 2]);
    assert!(!std::sync::Arc::ptr_eq(&held, &next));
    // With every earlier read let go, new messages are appended to the cached list itself
    // (no copy of the session's messages per step). The first message, kept here, shows the
    // read was served from the cache (a miss would open it again, into a new entry); the
    // cache still holding the list meanwhile, a copy could not land at the same address.
    let list = std::sync::Arc::as_ptr(&next);
    let first = next[0].clone();
    drop((held, next));
    stored_turn(&t, "s-bob", "bob", "r3", "third");
    let (_, last) = t.history_shared("s-bob").unwrap();
    assert!(std::sync::Arc::ptr_eq(first.shared(), last[0].shared()));
    assert_eq!(std::sync::Arc::as_ptr(&last), list);
    assert_eq!(
        texts(&t, "s-bob"),
        vec![
            "first",
            "answer to first",
            "second",
            "answer to second",
            "third",
            "answer to third"
        ]
    );
    // A read with nothing new hands out the same list.
    let (_, again) = t.history_shared("s-bob").unwrap();
    assert!(std::sync::Arc::ptr_eq(&last, &again));
}

#[test]
fn the_history_cache_stays_within_its_bound_and_evicts_the_least_recently_read_session() {
    let h = harness();
    // Room for about one session of two short messages (each counted with its converted form
    // and that form's JSON).
    let t = cached_transcripts(&h, 1300);
    stored_turn(&t, "s-1", "bob", "r1", "one");
    stored_turn(&t, "s-2", "bob", "r2", "two");
    assert_eq!(texts(&t, "s-1").len(), 2);
    let (n, bytes) = t.cache().unwrap().usage();
    assert_eq!(n, 1);
    assert!(bytes <= 1300, "{bytes}");
    assert_eq!(texts(&t, "s-2"), vec!["two", "answer to two"]);
    let (n, bytes) = t.cache().unwrap().usage();
    assert_eq!(n, 1, "s-1 was evicted for s-2");
    assert!(bytes <= 1300, "{bytes}");
    // A session bigger than the whole bound is read correctly and not kept.
    let tiny = cached_transcripts(&h, 100);
    assert_eq!(texts(&tiny, "s-1"), vec!["one", "answer to one"]);
    assert_eq!(tiny.cache().unwrap().usage(), (0, 0));
}
