//! The channel engine in process, over the real state database, gate (Cedar + audit log) and
//! vault: durable ingress, admission, pairing and the outbox. The platform is scripted. Every
//! test that touches the store runs on SQLite and on PostgreSQL (`<test>::on_sqlite`,
//! `<test>::on_postgres`; a fresh database per test), and the races of several gateways on one
//! PostgreSQL database (two `Store`s = two replicas) are tested there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod home;
#[path = "support/scripted_platform.rs"]
mod scripted;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use age::secrecy::SecretString;
use chitin::channels::{
    Admission, ChannelSettings, ChannelsError, DenyReason, Engine, FailureOutcome, OutboxKind,
    OutboxNew, OutboxStatus, Sealer, deliver_due, session_key,
};
use chitin::clock::{Clock, ManualClock};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::{Store, params};
use chitin::vault::Vault;
use chitin_channels::{
    ChatKind, ChatRef, Event, Inbound, Message, Polled, SendError, Sender as Who,
};
use chitin_store::Dialect;
use chitin_store::testing::TestPg;
use scripted::ScriptedPlatform;
use zeroize::Zeroizing;

const PASS: &str = "channels-test-pass";
/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
const CH: &str = "tg";

/// The vault, with a switch that makes sealing fail (to break a commit half-way).
struct Switchable {
    vault: Vault,
    fail: AtomicBool,
}

impl Sealer for Switchable {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        if self.fail.load(Ordering::SeqCst) {
            return Err("sealing switched off by the test".into());
        }
        Sealer::seal(&self.vault, subject, plaintext)
    }
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        Sealer::open(&self.vault, subject, sealed)
    }
}

/// Where the state lives: the home's `state.db`, or a fresh PostgreSQL database.
enum Db {
    Sqlite(PathBuf),
    Postgres(TestPg),
}

impl Db {
    /// A new connection to the state (a restarted gateway, a second sender, another replica).
    fn store(&self) -> Store {
        match self {
            Self::Sqlite(path) => Store::open(path).unwrap(),
            Self::Postgres(pg) => Store::postgres(&pg.config()).unwrap(),
        }
    }
}

/// Runs a test body on SQLite and on PostgreSQL (`<test>::on_sqlite`, `<test>::on_postgres`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn on_sqlite() {
                super::$name(chitin_store::Dialect::Sqlite)
            }
            #[test]
            fn on_postgres() {
                super::$name(chitin_store::Dialect::Postgres)
            }
        }
    )*};
}

on_both_backends!(
    a_redelivered_poll_is_committed_once_and_admitted_once,
    a_commit_that_fails_half_way_stores_neither_events_nor_cursor_and_the_retry_stores_both,
    an_unpaired_dm_gets_one_pairing_code_and_a_second_message_within_the_hour_gets_none,
    an_owner_approving_the_code_pairs_the_identity_and_its_next_message_is_admitted,
    a_sender_whose_id_has_quotes_and_an_apostrophe_is_paired_and_admitted,
    a_non_owner_cannot_approve_a_pairing_and_the_refusal_is_audited,
    a_group_message_without_a_mention_is_denied_and_never_stored_with_its_text,
    two_senders_racing_for_one_row_claim_it_once,
    a_429_waits_exactly_retry_after_then_the_row_is_sent_once,
    a_permanent_refusal_marks_the_row_failed_and_it_is_not_retried,
    transient_failures_back_off_and_end_as_a_dead_letter_after_the_last_attempt,
    a_row_left_sending_by_a_crash_is_not_resent_silently_after_the_restart,
    a_timeout_after_the_request_went_out_is_not_retried_and_a_chats_rows_stay_in_order,
    a_long_reply_is_queued_in_parts_within_the_limit,
    a_message_queued_twice_under_one_key_is_one_row_and_one_send,
    a_draft_still_queued_takes_the_final_text_and_no_second_message_is_sent,
    a_sent_draft_is_edited_to_the_final_text_and_finalizing_again_changes_nothing,
    a_final_edit_the_platform_refuses_is_sent_as_a_new_message_instead,
    a_final_text_on_a_draft_that_fails_to_send_is_queued_again_as_its_own_message,
    a_turn_whose_reply_was_not_queued_is_listed_once_for_its_reply_after_a_restart,
    the_files_of_an_admitted_message_survive_a_restart_sealed_with_its_text,
    a_reaction_is_traced_to_the_approval_whose_prompt_it_reacts_to,
    on_a_platform_that_deduplicates_by_delivery_id_an_interrupted_send_is_sent_again_with_the_same_id,
    delivery_reports_are_recorded_on_the_row_and_a_reported_failure_is_an_audited_dead_letter,
);

struct H {
    _t: tempfile::TempDir,
    home: PathBuf,
    db: Db,
    clock: ManualClock,
    gate: Gate,
    sealer: Arc<Switchable>,
    engine: Engine,
}

fn settings() -> ChannelSettings {
    ChannelSettings {
        max_send_attempts: 3,
        ..ChannelSettings::new(CH, "telegram")
    }
}

/// A private home where `User::"owner"` is in `Group::"owners"`, `User::"mallory"` in no
/// group, and `Identity::"telegram:1"` (defined in entities.json) is the owner's. The state is
/// on backend `d`.
fn harness_on(d: Dialect) -> H {
    let t = tempfile::tempdir().unwrap();
    let home = home::private_home(t.path(), "home");
    let ents = serde_json::json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::Identity", "id": "telegram:1"}, "attrs": {"channel": CH}, "parents": [{"type": "Chitin::User", "id": "owner"}]}
    ]);
    home::write_private(&home.join("entities.json"), ents.to_string().as_bytes());
    let clock = ManualClock::new(T0);
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 16,
        ..SecretsConfig::default()
    };
    let mut secrets = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    let signer = chitin::secrets::audit_key::signer(&mut secrets, &home).unwrap();
    let c = clock.clone();
    let audit = Arc::new(
        chitin_audit::AuditLog::open(
            &home,
            chitin_audit::AuditOptions {
                signer: Some(Arc::new(signer)),
                clock: Arc::new(move || c.now_ms()),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let vault = Vault::from_store(
        &home,
        &mut secrets,
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    )
    .unwrap();
    let policy = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let gate = Gate::new(Arc::new(policy), audit);
    let sealer = Arc::new(Switchable {
        vault,
        fail: AtomicBool::new(false),
    });
    let db = match d {
        Dialect::Sqlite => Db::Sqlite(home.join("state.db")),
        Dialect::Postgres => Db::Postgres(TestPg::new().unwrap()),
    };
    let engine = engine_on(&db, &gate, &clock, &sealer);
    H {
        _t: t,
        home,
        db,
        clock,
        gate,
        sealer,
        engine,
    }
}

/// An engine on its own connection to the state (as after a restart, a second sender, or
/// another replica on PostgreSQL).
fn engine_on(db: &Db, gate: &Gate, clock: &ManualClock, sealer: &Arc<Switchable>) -> Engine {
    let store = Arc::new(db.store());
    let e = Engine::new(
        store,
        gate.clone(),
        Arc::new(clock.clone()),
        Arc::clone(sealer) as Arc<dyn Sealer>,
        vec![settings()],
    );
    e.load_managed_entities().unwrap();
    e
}

fn dm(sender: &str) -> ChatRef {
    ChatRef {
        id: sender.into(),
        kind: ChatKind::Dm,
        thread: None,
    }
}

fn group() -> ChatRef {
    ChatRef {
        id: "-100777".into(),
        kind: ChatKind::Group,
        thread: None,
    }
}

fn msg(chat: ChatRef, sender: &str, id: &str, text: &str, mentioned: bool) -> Message {
    Message {
        chat,
        message_id: id.into(),
        sender: Who {
            id: sender.into(),
            display: format!("user {sender}"),
            is_bot: false,
        },
        text: text.into(),
        mentioned,
        reply_to: None,
        attachments: Vec::new(),
    }
}

fn inbound(event_id: &str, m: Message) -> Inbound {
    Inbound {
        event_id: event_id.into(),
        event: Event::Message(m),
    }
}

fn polled(events: Vec<Inbound>, cursor: &str) -> Polled {
    Polled {
        events,
        cursor: Some(cursor.into()),
    }
}

fn count(h: &H, sql: &str) -> i64 {
    h.db.store()
        .db()
        .with(|c| c.query_row(sql, params![])?.get(0))
        .unwrap()
}

fn audit_records(h: &H) -> Vec<chitin_audit::Record> {
    h.gate
        .audit()
        .reader()
        .unwrap()
        .query(&chitin_audit::Query::default())
        .unwrap()
}

/// Every byte Chitin wrote under the home (state.db and its WAL, audit log, vault, ...).
fn home_bytes_contain(home: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![home.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p)
                && b.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// The pairing code the engine sent to a stranger (from its one outbox row).
fn code_sent(h: &H) -> String {
    let rows = h.engine.outbox(CH).unwrap();
    let row = rows
        .iter()
        .rev()
        .find(|r| r.kind == OutboxKind::Pairing)
        .unwrap();
    row.text
        .split("Pairing code: ")
        .nth(1)
        .unwrap()
        .chars()
        .take(8)
        .collect()
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

// ---- durable ingress ----------------------------------------------------------------------

fn a_redelivered_poll_is_committed_once_and_admitted_once(d: Dialect) {
    let h = harness_on(d);
    let p = polled(
        vec![inbound("u:10", msg(dm("1"), "1", "5", "hello", false))],
        "11",
    );
    let first = h.engine.commit_polled(CH, &p).unwrap();
    assert_eq!(
        (first.stored, first.duplicates, first.admitted.len()),
        (1, 0, 1)
    );
    // The platform did not see the acknowledgement (crash after the commit): same update again.
    let again = h.engine.commit_polled(CH, &p).unwrap();
    assert_eq!(
        (again.stored, again.duplicates, again.admitted.len()),
        (0, 1, 0)
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_events"), 1);
    assert_eq!(h.engine.next_cursor(CH).unwrap().as_deref(), Some("11"));
    assert_eq!(h.engine.counters().duplicates, 1);
}

fn a_commit_that_fails_half_way_stores_neither_events_nor_cursor_and_the_retry_stores_both(
    d: Dialect,
) {
    let h = harness_on(d);
    h.engine
        .commit_polled(CH, &polled(Vec::new(), "10"))
        .unwrap();
    let p = polled(
        vec![
            inbound("u:10", msg(group(), "666", "7", "not for the bot", false)),
            inbound("u:11", msg(dm("1"), "1", "8", "admitted, sealed", false)),
        ],
        "12",
    );
    // The first event is inserted, then sealing the second fails: the transaction is dropped.
    h.sealer.fail.store(true, Ordering::SeqCst);
    let err = h.engine.commit_polled(CH, &p).unwrap_err();
    assert!(
        matches!(&err, ChannelsError::Seal(m) if m.contains("switched off")),
        "{err}"
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_events"), 0);
    assert_eq!(h.engine.next_cursor(CH).unwrap().as_deref(), Some("10"));
    // The platform redelivers from the old cursor; this time the commit goes through.
    h.sealer.fail.store(false, Ordering::SeqCst);
    let ok = h.engine.commit_polled(CH, &p).unwrap();
    assert_eq!((ok.stored, ok.duplicates), (2, 0));
    assert_eq!(h.engine.next_cursor(CH).unwrap().as_deref(), Some("12"));
    let pending = h.engine.admitted_pending(CH).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].message.text, "admitted, sealed");
    assert_eq!(pending[0].user, "owner");
    assert!(h.engine.mark_done(pending[0].row_id).unwrap());
    assert!(h.engine.admitted_pending(CH).unwrap().is_empty());
}

// ---- admission and pairing ----------------------------------------------------------------

fn an_unpaired_dm_gets_one_pairing_code_and_a_second_message_within_the_hour_gets_none(d: Dialect) {
    let h = harness_on(d);
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound(
                    "u:1",
                    msg(dm("500"), "500", "1", "hi, who are you?", false),
                )],
                "2",
            ),
        )
        .unwrap();
    assert!(
        matches!(c.admissions[0].1, Admission::PairingCodeSent { .. }),
        "{:?}",
        c.admissions
    );
    assert!(c.admitted.is_empty());
    let rows = h.engine.outbox(CH).unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].kind, OutboxKind::Pairing);
    assert_eq!(rows[0].chat, dm("500"));
    let code = code_sent(&h);
    assert_eq!(code.len(), 8);
    let list = h.engine.pairing_list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].code.as_str(), list[0].identity.as_str()),
        (code.as_str(), "telegram:500")
    );

    h.clock.advance(10 * 60 * 1000);
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:2", msg(dm("500"), "500", "2", "hello??", false))],
                "3",
            ),
        )
        .unwrap();
    assert_eq!(
        c.admissions[0].1,
        Admission::Denied(DenyReason::PairingAlreadySent)
    );
    assert_eq!(h.engine.outbox(CH).unwrap().len(), 1, "no second code");
    // Neither message kept its text.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM channel_events WHERE text IS NOT NULL"
        ),
        0
    );
    assert!(home_bytes_contain(&h.home, b"who are you").is_empty());
    // (The scan does see what is stored in clear: the outbox row with the code.)
    assert!(!home_bytes_contain(&h.home, code.as_bytes()).is_empty());
    assert_eq!(h.engine.counters().denied, 2);
    // The request was audited (and the decisions, by the gate).
    let recs = audit_records(&h);
    assert!(recs.iter().any(|r| r.action == "pairing.request"
        && r.actor == "Chitin::Identity::\"telegram:500\""
        && r.outcome == "pending"));
    assert_eq!(
        recs.iter()
            .filter(|r| r.action == "message.receive" && r.decision == "deny")
            .count(),
        2
    );
}

fn an_owner_approving_the_code_pairs_the_identity_and_its_next_message_is_admitted(d: Dialect) {
    let h = harness_on(d);
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:1", msg(dm("500"), "500", "1", "hi", false))],
                "2",
            ),
        )
        .unwrap();
    let code = code_sent(&h);
    let r = h
        .engine
        .pairing_approve(&code.to_lowercase(), "owner", "owner")
        .unwrap();
    assert_eq!(
        (r.status.as_str(), r.user.as_deref()),
        ("approved", Some("owner"))
    );
    assert_eq!(h.engine.users_of("telegram:500").unwrap(), ["owner"]);
    // The code is single use.
    let again = h
        .engine
        .pairing_approve(&code, "owner", "owner")
        .unwrap_err();
    assert!(
        matches!(&again, ChannelsError::PairingNotPending { status, .. } if status == "approved"),
        "{again}"
    );
    // The person is told, in the DM.
    let rows = h.engine.outbox(CH).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows[1].text.starts_with("Paired"), "{}", rows[1].text);

    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound(
                    "u:2",
                    msg(dm("500"), "500", "2", "secret plans 7d1f", false),
                )],
                "3",
            ),
        )
        .unwrap();
    assert_eq!(
        c.admissions[0].1,
        Admission::Admitted {
            user: "owner".into(),
            session: session_key(CH, &dm("500")),
        }
    );
    assert_eq!(c.admitted[0].message.text, "secret plans 7d1f");
    // Stored sealed: the text is nowhere in clear.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM channel_events WHERE status = 'admitted' AND text IS NOT NULL AND subject = 'Chitin::User::\"owner\"'"
        ),
        1
    );
    assert!(home_bytes_contain(&h.home, b"secret plans 7d1f").is_empty());
    assert_eq!(
        h.engine.admitted_pending(CH).unwrap()[0].message.text,
        "secret plans 7d1f"
    );
    // The pairing survives a restart (managed store in state.db, loaded into a new engine).
    let policy = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![h.home.join("entities.json")],
        state_dir: Some(h.home.clone()),
    })
    .unwrap();
    let gate2 = Gate::new(Arc::new(policy), Arc::clone(h.gate.audit()));
    let e2 = engine_on(&h.db, &gate2, &h.clock, &h.sealer);
    assert_eq!(e2.users_of("telegram:500").unwrap(), ["owner"]);
    // And a reload of the policies keeps it.
    gate2.reload_policies("owner").unwrap();
    assert_eq!(e2.users_of("telegram:500").unwrap(), ["owner"]);

    // Revoking makes it a stranger again.
    h.engine
        .pairing_revoke("Chitin::Identity::\"telegram:500\"", "owner")
        .unwrap();
    assert!(h.engine.users_of("telegram:500").unwrap().is_empty());
}

/// Cedar's entity-reference parser refuses `'` unescaped: the identity and its conversation
/// are built as typed uids, so such a sender is decided like any other.
fn a_sender_whose_id_has_quotes_and_an_apostrophe_is_paired_and_admitted(d: Dialect) {
    let h = harness_on(d);
    let sender = r#"o'brien "the" \ one"#;
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:1", msg(dm(sender), sender, "1", "hi", false))],
                "2",
            ),
        )
        .unwrap();
    let code = code_sent(&h);
    let r = h.engine.pairing_approve(&code, "owner", "owner").unwrap();
    assert_eq!(r.status, "approved");
    let identity = format!("telegram:{sender}");
    assert_eq!(h.engine.users_of(&identity).unwrap(), ["owner"]);
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:2", msg(dm(sender), sender, "2", "next", false))],
                "3",
            ),
        )
        .unwrap();
    assert_eq!(
        c.admissions[0].1,
        Admission::Admitted {
            user: "owner".into(),
            session: session_key(CH, &dm(sender)),
        }
    );
    assert_eq!(c.admitted[0].message.text, "next");
}

fn a_non_owner_cannot_approve_a_pairing_and_the_refusal_is_audited(d: Dialect) {
    let h = harness_on(d);
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:1", msg(dm("500"), "500", "1", "hi", false))],
                "2",
            ),
        )
        .unwrap();
    let code = code_sent(&h);
    let err = h
        .engine
        .pairing_approve(&code, "mallory", "mallory")
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "mallory may not decide pairings (policy decision: deny)"
    );
    let recs = audit_records(&h);
    assert!(recs.iter().any(|r| r.actor == "Chitin::User::\"mallory\""
        && r.action == "pairing.approve"
        && r.decision == "deny"));
    assert!(
        !recs
            .iter()
            .any(|r| r.action == "pairing.approve" && r.kind == "admin")
    );
    // Nothing changed: still unpaired, code still open, and the stranger is still refused.
    assert!(h.engine.users_of("telegram:500").unwrap().is_empty());
    assert_eq!(h.engine.pairing_list().unwrap().len(), 1);
    let err = h
        .engine
        .pairing_revoke("telegram:1", "mallory")
        .unwrap_err();
    assert!(matches!(err, ChannelsError::PairingRefused { .. }), "{err}");
    // An expired code cannot be approved by anyone.
    h.clock.advance(61 * 60 * 1000);
    let err = h
        .engine
        .pairing_approve(&code, "owner", "owner")
        .unwrap_err();
    assert!(matches!(err, ChannelsError::PairingExpired(_)), "{err}");
}

fn a_group_message_without_a_mention_is_denied_and_never_stored_with_its_text(d: Dialect) {
    let h = harness_on(d);
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![
                    inbound("u:1", msg(group(), "1", "1", "group chatter c0ffee", false)),
                    inbound(
                        "u:2",
                        msg(group(), "1", "2", "@chitin_bot what time is it", true),
                    ),
                ],
                "3",
            ),
        )
        .unwrap();
    assert_eq!(
        c.admissions[0].1,
        Admission::Denied(DenyReason::Policy(vec![
            "admission.groups-need-mention".into()
        ]))
    );
    assert_eq!(
        c.admissions[1].1,
        Admission::Admitted {
            user: "owner".into(),
            session: session_key(CH, &group()),
        }
    );
    // No pairing code in a group, no text for the denied message anywhere on disk.
    assert!(h.engine.outbox(CH).unwrap().is_empty());
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM channel_events WHERE status = 'denied' AND text IS NULL AND subject IS NULL"
        ),
        1
    );
    assert!(home_bytes_contain(&h.home, b"c0ffee").is_empty());
    // Not stored: only the dedup key remains, without chat, sender or message id.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM channel_events WHERE event_id = 'u:1' AND chat_id IS NULL
             AND chat_kind IS NULL AND thread IS NULL AND sender_id IS NULL AND message_id IS NULL"
        ),
        1
    );
    // ... and a webhook-style redelivery of the same update is still recognized.
    let again = h
        .engine
        .commit_events(
            CH,
            &[inbound(
                "u:1",
                msg(group(), "1", "1", "group chatter c0ffee", false),
            )],
            None,
        )
        .unwrap();
    assert_eq!((again.stored, again.duplicates), (0, 1));
    // The audit record of the refusal stays (without the text).
    let recs = audit_records(&h);
    assert!(
        recs.iter()
            .any(|r| format!("{r:?}").contains("admission.groups-need-mention")),
        "the refusal is audited"
    );
    assert!(!recs.iter().any(|r| format!("{r:?}").contains("c0ffee")));
    // A paired non-owner mentioning the bot in the group is not admitted either.
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:3", msg(dm("600"), "600", "1", "hi", false))],
                "4",
            ),
        )
        .unwrap();
    let code = code_sent(&h);
    h.engine.pairing_approve(&code, "owner", "mallory").unwrap();
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound(
                    "u:4",
                    msg(group(), "600", "3", "@chitin_bot hi", true),
                )],
                "5",
            ),
        )
        .unwrap();
    assert_eq!(
        c.admissions[0].1,
        Admission::Denied(DenyReason::Policy(Vec::new()))
    );
}

#[test]
fn each_conversation_and_topic_is_its_own_session() {
    let topic = ChatRef {
        thread: Some("9".into()),
        ..group()
    };
    let keys = [
        session_key(CH, &dm("1")),
        session_key(CH, &group()),
        session_key(CH, &topic),
        session_key("other", &dm("1")),
    ];
    let unique: std::collections::BTreeSet<_> = keys.iter().collect();
    assert_eq!(unique.len(), 4, "{keys:?}");
    assert_eq!(keys[2], "channel:tg:group:-100777:thread:9");
}

// ---- outbox --------------------------------------------------------------------------------

fn reply(text: &str) -> OutboxNew {
    OutboxNew {
        channel: CH.into(),
        chat: dm("1"),
        text: text.into(),
        buttons: Vec::new(),
        reply_to: None,
        kind: OutboxKind::Reply,
        dedup_key: None,
    }
}

fn two_senders_racing_for_one_row_claim_it_once(d: Dialect) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("once")).unwrap();
    let a = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let b = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let barrier = Barrier::new(2);
    let now = h.clock.now_ms();
    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| {
            barrier.wait();
            a.claim_due(CH, now, 10).unwrap()
        });
        let tb = s.spawn(|| {
            barrier.wait();
            b.claim_due(CH, now, 10).unwrap()
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    let claimed: Vec<i64> = ra.iter().chain(rb.iter()).map(|r| r.id).collect();
    assert_eq!(claimed, [id]);
    assert!(h.engine.claim_due(CH, now, 10).unwrap().is_empty());
}

fn a_429_waits_exactly_retry_after_then_the_row_is_sent_once(d: Dialect) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("after the flood")).unwrap();
    let p = ScriptedPlatform::new();
    p.fail_next(SendError::RateLimited {
        retry_after: Duration::from_secs(7),
    });
    let r = block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert_eq!(r.retried, [id]);
    let row = h.engine.outbox_row(id).unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Queued);
    assert_eq!(row.next_attempt_ms, T0 + 7_000);
    assert_eq!(row.attempts, 0, "a rate-limited attempt is not counted");
    h.clock.advance(6_999);
    assert!(
        block_on(deliver_due(&h.engine, CH, &p, 10))
            .unwrap()
            .sent
            .is_empty()
    );
    h.clock.advance(1);
    assert_eq!(
        block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap().sent,
        [id]
    );
    let row = h.engine.outbox_row(id).unwrap().unwrap();
    assert_eq!(
        (row.status, row.platform_message_id.as_deref()),
        (OutboxStatus::Sent, Some("1001"))
    );
    // Sent rows are never sent again.
    h.clock.advance(3_600_000);
    assert!(
        block_on(deliver_due(&h.engine, CH, &p, 10))
            .unwrap()
            .sent
            .is_empty()
    );
    assert_eq!(p.sends().len(), 2);
}

fn a_permanent_refusal_marks_the_row_failed_and_it_is_not_retried(d: Dialect) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("to a blocked chat")).unwrap();
    let p = ScriptedPlatform::new();
    p.fail_next(SendError::Permanent(
        "Forbidden: bot was blocked by the user".into(),
    ));
    assert_eq!(
        block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap().failed,
        [id]
    );
    let row = h.engine.outbox_row(id).unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Failed);
    assert!(row.last_error.unwrap().contains("blocked by the user"));
    h.clock.advance(3_600_000);
    assert!(
        h.engine
            .claim_due(CH, h.clock.now_ms(), 10)
            .unwrap()
            .is_empty()
    );
    assert_eq!(p.sends().len(), 1);
    assert!(
        audit_records(&h)
            .iter()
            .any(|r| r.action == "message.send" && r.outcome == "failed")
    );
}

fn transient_failures_back_off_and_end_as_a_dead_letter_after_the_last_attempt(d: Dialect) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("into the void")).unwrap();
    let p = ScriptedPlatform::new();
    let transient = || SendError::Transient {
        message: "HTTP 502".into(),
        maybe_delivered: false,
    };
    for attempt in 1..=2u32 {
        p.fail_next(transient());
        let now = h.clock.now_ms();
        assert_eq!(
            block_on(deliver_due(&h.engine, CH, &p, 10))
                .unwrap()
                .retried,
            [id]
        );
        let row = h.engine.outbox_row(id).unwrap().unwrap();
        let full = 1_000 * (1_i64 << (attempt - 1));
        assert!(
            (now + full / 2..=now + full).contains(&row.next_attempt_ms),
            "attempt {attempt}: due {} not in the backoff band",
            row.next_attempt_ms - now
        );
        h.clock.set(row.next_attempt_ms);
    }
    p.fail_next(transient());
    assert_eq!(
        block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap().dead,
        [id]
    );
    let row = h.engine.outbox_row(id).unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OutboxStatus::Dead, 3));
    assert!(
        row.last_error
            .unwrap()
            .starts_with("retries exhausted after 3 attempts")
    );
    assert_eq!(h.engine.status(CH).unwrap().dead, 1);
    assert_eq!(h.engine.counters().dead, 1);
    assert!(
        audit_records(&h)
            .iter()
            .any(|r| r.action == "message.send" && r.outcome == "dead")
    );
    h.clock.advance(3_600_000);
    assert!(
        h.engine
            .claim_due(CH, h.clock.now_ms(), 10)
            .unwrap()
            .is_empty()
    );
}

fn a_row_left_sending_by_a_crash_is_not_resent_silently_after_the_restart(d: Dialect) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("maybe twice")).unwrap();
    let claimed = h.engine.claim_due(CH, h.clock.now_ms(), 10).unwrap();
    assert_eq!(claimed.len(), 1);
    // The gateway dies here (the request may have reached the platform). Restart:
    let restarted = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    if d == Dialect::Postgres {
        // Other replicas may be sending: a claim is a dead sender's only once it expired.
        assert!(restarted.recover_interrupted_sends().unwrap().is_empty());
        assert_eq!(
            restarted.outbox_row(id).unwrap().unwrap().status,
            OutboxStatus::Sending
        );
        h.clock.advance(chitin::channels::SEND_CLAIM_TTL_MS);
    }
    assert_eq!(restarted.recover_interrupted_sends().unwrap(), [id]);
    let row = restarted.outbox_row(id).unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Failed);
    assert!(row.last_error.unwrap().contains("may have been delivered"));
    let p = ScriptedPlatform::new();
    h.clock.advance(3_600_000);
    let r = block_on(deliver_due(&restarted, CH, &p, 10)).unwrap();
    assert!(r.sent.is_empty());
    assert!(p.sends().is_empty(), "nothing is re-sent");
    // A late answer from the old process cannot flip it to sent either.
    assert!(matches!(
        h.engine.record_sent(id, "999"),
        Err(ChannelsError::NotSending(_))
    ));
    assert_eq!(restarted.counters().maybe_delivered, 1);
    assert!(audit_records(&h).iter().any(|r| {
        r.action == "message.send"
            && r.outcome == "failed"
            && r.payload
                .as_deref()
                .is_some_and(|p| p.contains("may have been delivered"))
    }));
}

fn a_timeout_after_the_request_went_out_is_not_retried_and_a_chats_rows_stay_in_order(d: Dialect) {
    let h = harness_on(d);
    let first = h.engine.enqueue(&reply("one")).unwrap();
    let second = h.engine.enqueue(&reply("two")).unwrap();
    // Only the oldest unsent row of a chat is claimable.
    let c = h.engine.claim_due(CH, h.clock.now_ms(), 10).unwrap();
    assert_eq!(c.iter().map(|r| r.id).collect::<Vec<_>>(), [first]);
    assert_eq!(
        h.engine
            .record_failure(
                first,
                &SendError::Transient {
                    message: "timed out waiting for the answer".into(),
                    maybe_delivered: true,
                }
            )
            .unwrap(),
        FailureOutcome::Failed
    );
    let p = ScriptedPlatform::new();
    let r = block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert_eq!(r.sent, [second]);
    assert_eq!(p.sends().len(), 1);
    assert_eq!(p.sends()[0].text, "two");
}

fn a_long_reply_is_queued_in_parts_within_the_limit(d: Dialect) {
    let h = harness_on(d);
    let para = "word ".repeat(199) + "word";
    let text = vec![para; 10].join("\n\n");
    let ids = h.engine.enqueue_split(&reply(&text), 4096).unwrap();
    assert_eq!(ids.len(), 3);
    let rows = h.engine.outbox(CH).unwrap();
    // Telegram counts UTF-16 code units; the parts are cut after paragraph breaks and join
    // back to exactly the text.
    assert!(rows.iter().all(|r| r.text.encode_utf16().count() <= 4096));
    assert!(
        rows[..rows.len() - 1]
            .iter()
            .all(|r| r.text.ends_with("\n\n"))
    );
    assert_eq!(
        rows.iter().map(|r| r.text.as_str()).collect::<String>(),
        text
    );
}

// ---- exactly-once replies and streamed answers ------------------------------------------------

fn keyed(text: &str, key: &str) -> OutboxNew {
    OutboxNew {
        dedup_key: Some(key.into()),
        ..reply(text)
    }
}

fn outbox_texts(h: &H) -> Vec<(String, OutboxStatus, Option<String>)> {
    h.engine
        .outbox(CH)
        .unwrap()
        .into_iter()
        .map(|r| (r.text, r.status, r.dedup_key))
        .collect()
}

fn a_message_queued_twice_under_one_key_is_one_row_and_one_send(d: Dialect) {
    let h = harness_on(d);
    let first = h
        .engine
        .enqueue_split(&keyed("Approve this?", "approval:a1"), 4096)
        .unwrap();
    // The run resumed after a restart asks again for the same approval.
    let again = h
        .engine
        .enqueue_split(&keyed("Approve this?", "approval:a1"), 4096)
        .unwrap();
    assert_eq!(first, again);
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert_eq!(p.sends().len(), 1);
    assert_eq!(
        outbox_texts(&h),
        [(
            "Approve this?".to_string(),
            OutboxStatus::Sent,
            Some("approval:a1#0".to_string())
        )]
    );
}

fn a_draft_still_queued_takes_the_final_text_and_no_second_message_is_sent(d: Dialect) {
    let h = harness_on(d);
    h.engine
        .enqueue(&keyed("The answer so far …", "draft:r1"))
        .unwrap();
    h.engine
        .finalize_reply(
            Some("draft:r1"),
            &keyed("The whole answer.", "reply:r1"),
            4096,
        )
        .unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    let sends: Vec<String> = p.sends().into_iter().map(|m| m.text).collect();
    assert_eq!(sends, ["The whole answer."]);
    assert!(p.edits().is_empty());
}

fn a_sent_draft_is_edited_to_the_final_text_and_finalizing_again_changes_nothing(d: Dialect) {
    let h = harness_on(d);
    let draft = h
        .engine
        .enqueue(&keyed("The answer so far …", "draft:r1"))
        .unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    // A long final answer: the first part replaces the draft, the rest follows it.
    let long = format!("{}\n\n{}", "a".repeat(30), "b".repeat(30));
    let ids = h
        .engine
        .finalize_reply(Some("draft:r1"), &keyed(&long, "reply:r1"), 40)
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], draft);
    // A second finalization (the reply task after a restart) adds nothing.
    let again = h
        .engine
        .finalize_reply(Some("draft:r1"), &keyed(&long, "reply:r1"), 40)
        .unwrap();
    assert_eq!(again, ids);
    let r = block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert_eq!(r.sent, [ids[1]]);
    assert_eq!(r.edited, [draft]);
    let edits = p.edits();
    assert_eq!(edits.len(), 1);
    let first = format!("{}\n\n", "a".repeat(30));
    assert_eq!(
        (edits[0].1.as_str(), edits[0].2.as_str()),
        ("1001", first.as_str())
    );
    let row = h.engine.outbox_row(draft).unwrap().unwrap();
    assert_eq!((row.text, row.edit_text), (first, None));
    assert_eq!(p.sends()[1].text, "b".repeat(30));
    // Nothing is left to edit or send.
    let r = block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert!(r.sent.is_empty() && r.edited.is_empty());
    assert_eq!(p.sends().len(), 2);
}

fn a_final_edit_the_platform_refuses_is_sent_as_a_new_message_instead(d: Dialect) {
    let h = harness_on(d);
    let draft = h.engine.enqueue(&keyed("So far …", "draft:r2")).unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    h.engine
        .finalize_reply(Some("draft:r2"), &keyed("Final.", "reply:r2"), 4096)
        .unwrap();
    // The user deleted the draft message: the edit is refused for good.
    p.fail_next_edit(SendError::Permanent("message to edit not found".into()));
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    let sends: Vec<String> = p.sends().into_iter().map(|m| m.text).collect();
    assert_eq!(sends, ["So far …", "Final."]);
    let row = h.engine.outbox_row(draft).unwrap().unwrap();
    assert_eq!((row.edit_text, row.dedup_key), (None, None));
    assert!(row.last_error.unwrap().contains("sent as a new message"));
}

fn a_final_text_on_a_draft_that_fails_to_send_is_queued_again_as_its_own_message(d: Dialect) {
    let h = harness_on(d);
    let draft = h.engine.enqueue(&keyed("So far …", "draft:r3")).unwrap();
    let claimed = h.engine.claim_due(CH, T0, 10).unwrap();
    assert_eq!(claimed[0].id, draft);
    // Finalized while the draft is being sent; then the send is refused.
    h.engine
        .finalize_reply(Some("draft:r3"), &keyed("Final answer.", "reply:r3"), 4096)
        .unwrap();
    h.engine
        .record_failure(draft, &SendError::Permanent("chat not found".into()))
        .unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    let sends: Vec<String> = p.sends().into_iter().map(|m| m.text).collect();
    assert_eq!(sends, ["Final answer."]);
    let rows = outbox_texts(&h);
    assert_eq!(rows[0].1, OutboxStatus::Failed);
    assert_eq!(
        rows[1],
        (
            "Final answer.".to_string(),
            OutboxStatus::Sent,
            Some("reply:r3#0".to_string())
        )
    );
}

fn a_turn_whose_reply_was_not_queued_is_listed_once_for_its_reply_after_a_restart(d: Dialect) {
    let h = harness_on(d);
    let c = h
        .engine
        .commit_polled(
            CH,
            &polled(
                vec![inbound("u:1", msg(dm("1"), "1", "10", "question", true))],
                "2",
            ),
        )
        .unwrap();
    let ev = &c.admitted[0];
    // The turn was recorded (run with this message as origin) and the message marked done;
    // the gateway stopped before the reply was queued.
    h.db.store()
        .db()
        .tx(|c| {
            c.execute(
                "INSERT INTO sessions (key, user_id, subject, channel, created_ms, updated_ms) VALUES (?1, 'owner', 'Chitin::User::\"owner\"', 'tg', ?2, ?2)",
                params![ev.session, T0],
            )?;
            c.execute(
                "INSERT INTO runs (id, session_key, user_id, subject, status, created_ms, updated_ms, origin) VALUES ('run-1', ?1, 'owner', 'Chitin::User::\"owner\"', 'completed', ?2, ?2, ?3)",
                params![ev.session, T0, format!("channel:{CH}:{}", ev.row_id)],
            )
        })
        .unwrap();
    h.engine.mark_done(ev.row_id).unwrap();
    let waiting = h.engine.turns_without_reply(CH, T0 - 1).unwrap();
    assert_eq!(
        waiting,
        [("run-1".to_string(), dm("1"), Some("10".to_string()))]
    );
    // Once its reply is queued (whoever does it first), it is not listed again.
    h.engine
        .finalize_reply(Some("draft:run-1"), &keyed("Answer.", "reply:run-1"), 4096)
        .unwrap();
    assert!(h.engine.turns_without_reply(CH, T0 - 1).unwrap().is_empty());
    // Turns older than the window are not answered any more.
    assert!(h.engine.turns_without_reply(CH, T0 + 1).unwrap().is_empty());
}

fn the_files_of_an_admitted_message_survive_a_restart_sealed_with_its_text(d: Dialect) {
    let h = harness_on(d);
    let mut m = msg(dm("1"), "1", "10", "see attached", true);
    m.attachments = vec![chitin_channels::Attachment {
        file_ref: "doc-1".into(),
        name: Some("secret-plans.pdf".into()),
        mime: Some("application/pdf".into()),
        size: Some(1234),
    }];
    h.engine
        .commit_polled(CH, &polled(vec![inbound("u:1", m.clone())], "2"))
        .unwrap();
    let pending = h.engine.admitted_pending(CH).unwrap();
    assert_eq!(pending[0].message.attachments, m.attachments);
    assert!(
        home_bytes_contain(&h.home, b"secret-plans.pdf").is_empty(),
        "an attachment's name is stored in clear"
    );
}

fn a_reaction_is_traced_to_the_approval_whose_prompt_it_reacts_to(d: Dialect) {
    let h = harness_on(d);
    let prompt = OutboxNew {
        kind: OutboxKind::Approval,
        ..keyed("Approval needed: exec", "approval:0123abcd")
    };
    h.engine.enqueue_split(&prompt, 4096).unwrap();
    h.engine.enqueue(&reply("an ordinary answer")).unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    assert_eq!(
        h.engine.approval_of_message(CH, &dm("1"), "1001").unwrap(),
        Some("0123abcd".to_string())
    );
    // Another message of the bot, another chat, or an unknown id: no approval.
    assert_eq!(
        h.engine.approval_of_message(CH, &dm("1"), "1002").unwrap(),
        None
    );
    assert_eq!(
        h.engine.approval_of_message(CH, &dm("2"), "1001").unwrap(),
        None
    );
    assert_eq!(
        h.engine.approval_of_message(CH, &dm("1"), "9").unwrap(),
        None
    );
}

fn on_a_platform_that_deduplicates_by_delivery_id_an_interrupted_send_is_sent_again_with_the_same_id(
    d: Dialect,
) {
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("exactly once")).unwrap();
    let claimed = h.engine.claim_due(CH, h.clock.now_ms(), 10).unwrap();
    let first_id = claimed[0].message().delivery_id;
    // The gateway dies mid-send. The channel's platform deduplicates resends (Matrix txnId):
    let restarted = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    if d == Dialect::Postgres {
        h.clock.advance(chitin::channels::SEND_CLAIM_TTL_MS);
    }
    assert!(
        restarted
            .recover_interrupted_sends_except(&[CH.to_string()])
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        restarted.outbox_row(id).unwrap().unwrap().status,
        OutboxStatus::Queued
    );
    let p = ScriptedPlatform::new();
    let r = block_on(deliver_due(&restarted, CH, &p, 10)).unwrap();
    assert_eq!(r.sent, [id]);
    // The resend carries the same delivery id, which the platform deduplicates on.
    assert_eq!(p.sends()[0].delivery_id, first_id);
    assert_eq!(restarted.counters().maybe_delivered, 0);
}

fn delivery_reports_are_recorded_on_the_row_and_a_reported_failure_is_an_audited_dead_letter(
    d: Dialect,
) {
    use chitin_channels::{DeliveryReport, DeliveryState};
    let h = harness_on(d);
    let id = h.engine.enqueue(&reply("hello")).unwrap();
    let p = ScriptedPlatform::new();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    let status = |e: &str, state: DeliveryState| Inbound {
        event_id: e.into(),
        event: Event::Status(DeliveryReport {
            message_id: "1001".into(),
            state,
        }),
    };
    let platform_status = || {
        count(
            &h,
            &format!(
                "SELECT COUNT(*) FROM channel_outbox WHERE id = {id} AND platform_status = 'read'"
            ),
        )
    };
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![
                    status("s:1", DeliveryState::Delivered),
                    status("s:2", DeliveryState::Read),
                    // A late "delivered" does not go back from "read".
                    status("s:3", DeliveryState::Delivered),
                ],
                "2",
            ),
        )
        .unwrap();
    assert_eq!(platform_status(), 1);
    assert_eq!(
        h.engine.outbox_row(id).unwrap().unwrap().status,
        OutboxStatus::Sent
    );

    let id2 = h.engine.enqueue(&reply("outside the window")).unwrap();
    block_on(deliver_due(&h.engine, CH, &p, 10)).unwrap();
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![Inbound {
                    event_id: "s:4".into(),
                    event: Event::Status(DeliveryReport {
                        message_id: "1002".into(),
                        state: DeliveryState::Failed(
                            "131047: more than 24 hours since the customer last replied".into(),
                        ),
                    }),
                }],
                "3",
            ),
        )
        .unwrap();
    let row = h.engine.outbox_row(id2).unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Dead);
    assert!(
        row.last_error
            .unwrap()
            .contains("the platform reported it undelivered: 131047"),
    );
    assert_eq!(h.engine.counters().undelivered, 1);
    assert_eq!(h.engine.counters().dead, 1);
    assert!(audit_records(&h).iter().any(|r| r.action == "message.send"
        && r.outcome == "dead"
        && r.payload.as_deref().is_some_and(|p| p.contains("131047"))));
    // A report about a message the bot never sent changes nothing.
    h.engine
        .commit_polled(
            CH,
            &polled(
                vec![Inbound {
                    event_id: "s:5".into(),
                    event: Event::Status(DeliveryReport {
                        message_id: "999999".into(),
                        state: DeliveryState::Failed("?".into()),
                    }),
                }],
                "4",
            ),
        )
        .unwrap();
    assert_eq!(h.engine.counters().undelivered, 1);
}

// ---- several gateways on one database (issue #18) -----------------------------------------

/// Two replicas (two `Store`s on one database), each delivering from several threads, claim
/// from one outbox of many chats: every row is claimed exactly once, with one attempt, and the
/// rows of each chat are claimed in order.
fn two_replicas_claiming_from_many_threads_claim_every_row_exactly_once(d: Dialect) {
    let h = harness_on(d);
    const CHATS: usize = 12;
    const PER_CHAT: usize = 4;
    let mut ids = Vec::new();
    for n in 0..PER_CHAT {
        for c in 0..CHATS {
            ids.push(
                h.engine
                    .enqueue(&OutboxNew {
                        chat: dm(&format!("chat-{c}")),
                        ..reply(&format!("message {n} to chat {c}"))
                    })
                    .unwrap(),
            );
        }
    }
    let replicas = [
        engine_on(&h.db, &h.gate, &h.clock, &h.sealer),
        engine_on(&h.db, &h.gate, &h.clock, &h.sealer),
    ];
    let now = h.clock.now_ms();
    let claims = std::sync::Mutex::new(Vec::<(i64, String)>::new());
    let barrier = Barrier::new(8);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    std::thread::scope(|s| {
        for t in 0..8 {
            let e = &replicas[t % 2];
            let (claims, barrier) = (&claims, &barrier);
            s.spawn(move || {
                barrier.wait();
                loop {
                    let rows = e.claim_due(CH, now, 3).unwrap();
                    for r in &rows {
                        claims.lock().unwrap().push((r.id, r.chat.id.clone()));
                        e.record_sent(r.id, &format!("p-{}", r.id)).unwrap();
                    }
                    if rows.is_empty() {
                        if claims.lock().unwrap().len() >= CHATS * PER_CHAT {
                            return;
                        }
                        assert!(
                            std::time::Instant::now() < deadline,
                            "the outbox was not drained"
                        );
                        std::thread::yield_now();
                    }
                }
            });
        }
    });
    let claims = claims.into_inner().unwrap();
    let mut claimed: Vec<i64> = claims.iter().map(|(id, _)| *id).collect();
    claimed.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(claimed, expected, "every row claimed exactly once");
    for r in h.engine.outbox(CH).unwrap() {
        assert_eq!(
            (r.status, r.attempts),
            (OutboxStatus::Sent, 1),
            "row {}",
            r.id
        );
    }
    for c in 0..CHATS {
        let chat = format!("chat-{c}");
        let order: Vec<i64> = claims
            .iter()
            .filter(|(_, ch)| *ch == chat)
            .map(|(id, _)| *id)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "the rows of {chat} go out in order");
    }
}

/// The platform of the hand-over test: events `u:1` .. `u:40`; a poll from cursor `c`
/// returns the next five and the cursor after them.
fn poll_from(cursor: Option<&str>) -> Polled {
    let from: usize = cursor.map_or(0, |c| c.parse().unwrap());
    let to = (from + 5).min(40);
    polled(
        (from + 1..=to)
            .map(|i| {
                inbound(
                    &format!("u:{i}"),
                    msg(dm("1"), "1", &i.to_string(), &format!("event {i}"), false),
                )
            })
            .collect(),
        &to.to_string(),
    )
}

/// Two replicas polling one channel at once, as after a hand-over whose old owner has not
/// noticed yet: one starts from the stored cursor while the other goes on from its own. Every
/// event is stored and admitted once, nothing is lost, and the stored cursor never goes back
/// (the stale replica's commits do not move it).
fn two_replicas_ingesting_the_same_events_store_each_once_and_the_cursor_never_goes_back(
    d: Dialect,
) {
    let h = harness_on(d);
    let replicas = [
        engine_on(&h.db, &h.gate, &h.clock, &h.sealer),
        engine_on(&h.db, &h.gate, &h.clock, &h.sealer),
    ];
    let observer = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let done = AtomicBool::new(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (results, seen) = std::thread::scope(|s| {
        let pollers: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let observer = &observer;
                s.spawn(move || {
                    if i == 1 {
                        // The second replica takes over once the first has made progress.
                        while observer
                            .status(CH)
                            .unwrap()
                            .cursor
                            .is_none_or(|c| c.parse::<usize>().unwrap() < 10)
                        {
                            assert!(std::time::Instant::now() < deadline, "no progress");
                            std::thread::yield_now();
                        }
                    }
                    let mut cursor = e.next_cursor(CH).unwrap();
                    let mut committed = Vec::new();
                    while cursor.as_deref() != Some("40") {
                        let p = poll_from(cursor.as_deref());
                        let c = e.commit_polled(CH, &p).unwrap();
                        cursor = p.cursor.clone();
                        committed.push(c);
                    }
                    committed
                })
            })
            .collect();
        let watch = s.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if let Some(c) = observer.status(CH).unwrap().cursor {
                    seen.push(c.parse::<usize>().unwrap());
                }
                std::thread::yield_now();
            }
            seen
        });
        let results: Vec<_> = pollers.into_iter().map(|p| p.join().unwrap()).collect();
        done.store(true, Ordering::SeqCst);
        (results, watch.join().unwrap())
    });
    let all: Vec<_> = results.iter().flatten().collect();
    let stored: usize = all.iter().map(|c| c.stored).sum();
    let admitted: Vec<String> = all
        .iter()
        .flat_map(|c| c.admitted.iter().map(|a| a.event_id.clone()))
        .collect();
    assert_eq!(stored, 40, "each event stored once");
    assert_eq!(admitted.len(), 40, "each message admitted once");
    let mut distinct = admitted.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 40);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_events"), 40);
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM channel_events WHERE status = 'admitted'"
        ),
        40
    );
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "the stored cursor went back: {seen:?}"
    );
    assert_eq!(h.engine.status(CH).unwrap().cursor.as_deref(), Some("40"));
    // The replica that polled first from the stored cursor moved it; at least one commit of
    // the two was a duplicate of the other's or stale.
    assert!(all.iter().any(|c| !c.stale_cursor));
}

/// A stale replica (its poll started from a cursor another replica has moved since) stores
/// the new events of its poll but does not move the cursor back.
fn a_stale_replica_stores_its_new_events_but_does_not_move_the_cursor_back(d: Dialect) {
    let h = harness_on(d);
    let a = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let b = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    assert_eq!(a.next_cursor(CH).unwrap(), None);
    assert_eq!(b.next_cursor(CH).unwrap(), None);
    let first = a.commit_polled(CH, &poll_from(None)).unwrap();
    assert_eq!((first.stored, first.stale_cursor), (5, false));
    // B polled from the same (empty) cursor: its batch is all duplicates, the cursor stays.
    let late = b.commit_polled(CH, &poll_from(None)).unwrap();
    assert_eq!(
        (late.stored, late.duplicates, late.stale_cursor),
        (0, 5, true)
    );
    // B takes over: it reads the stored cursor and moves it on.
    assert_eq!(b.next_cursor(CH).unwrap().as_deref(), Some("5"));
    let b1 = b.commit_polled(CH, &poll_from(Some("5"))).unwrap();
    let b2 = b.commit_polled(CH, &poll_from(Some("10"))).unwrap();
    assert_eq!((b1.stored, b2.stored), (5, 5));
    assert!(!b1.stale_cursor && !b2.stale_cursor);
    // A has not noticed: its next poll (from 5) is stored as duplicates and cannot move the
    // cursor from 15 back to 10.
    let stale = a.commit_polled(CH, &poll_from(Some("5"))).unwrap();
    assert_eq!(
        (stale.stored, stale.duplicates, stale.stale_cursor),
        (0, 5, true)
    );
    assert_eq!(a.next_cursor(CH).unwrap().as_deref(), Some("15"));
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_events"), 15);
}

/// On PostgreSQL another replica may be sending right now: a `sending` row is recovered only
/// once its claim expired (its sender died), then by today's rule, by whichever replica
/// delivers next, and never sent again.
fn a_dead_replicas_claim_is_recovered_by_another_after_it_expires_and_not_resent(d: Dialect) {
    let h = harness_on(d);
    let dead = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let survivor = engine_on(&h.db, &h.gate, &h.clock, &h.sealer);
    let id = h.engine.enqueue(&reply("in flight")).unwrap();
    let next = h.engine.enqueue(&reply("after it")).unwrap();
    assert_eq!(dead.claim_due(CH, h.clock.now_ms(), 10).unwrap().len(), 1);
    // The claimant dies mid-send. Within the claim's lifetime nothing touches the row, and
    // the chat's next row waits behind it.
    let p = ScriptedPlatform::new();
    let r = block_on(deliver_due(&survivor, CH, &p, 10)).unwrap();
    assert!(r.sent.is_empty() && r.failed.is_empty());
    assert_eq!(
        survivor.outbox_row(id).unwrap().unwrap().status,
        OutboxStatus::Sending
    );
    h.clock.advance(chitin::channels::SEND_CLAIM_TTL_MS);
    let r = block_on(deliver_due(&survivor, CH, &p, 10)).unwrap();
    if d == Dialect::Postgres {
        // Any replica recovers an expired claim while delivering.
        assert_eq!(
            (r.failed.as_slice(), r.sent.as_slice()),
            ([id].as_slice(), [next].as_slice())
        );
    } else {
        // One gateway owns a SQLite store: it recovers at its start.
        assert!(r.sent.is_empty());
        assert_eq!(survivor.recover_interrupted_sends().unwrap(), [id]);
        let r = block_on(deliver_due(&survivor, CH, &p, 10)).unwrap();
        assert_eq!(r.sent, [next]);
    }
    let row = survivor.outbox_row(id).unwrap().unwrap();
    assert_eq!(row.status, OutboxStatus::Failed);
    assert!(row.last_error.unwrap().contains("may have been delivered"));
    assert_eq!(p.sends().len(), 1, "the interrupted row is not re-sent");
    assert_eq!(p.sends()[0].text, "after it");
    assert!(matches!(
        dead.record_sent(id, "late"),
        Err(ChannelsError::NotSending(_))
    ));
    // Recovered (and audited) once, whoever else looks.
    assert!(
        h.engine
            .recover_expired_claims(CH, false)
            .unwrap()
            .is_empty()
    );
    let audited = audit_records(&h)
        .iter()
        .filter(|r| {
            r.action == "message.send"
                && r.payload
                    .as_deref()
                    .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
                    .is_some_and(|p| p["outbox_id"] == id)
        })
        .count();
    assert_eq!(audited, 1);
}

on_both_backends!(
    two_replicas_claiming_from_many_threads_claim_every_row_exactly_once,
    two_replicas_ingesting_the_same_events_store_each_once_and_the_cursor_never_goes_back,
    a_stale_replica_stores_its_new_events_but_does_not_move_the_cursor_back,
    a_dead_replicas_claim_is_recovered_by_another_after_it_expires_and_not_resent,
);
