//! Retention with an injected clock: expired data is really deleted after one run, younger
//! data is untouched, held subjects survive, each run is audited with counts only, and the
//! audit chain still verifies after payloads expire.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use chitin::config::retention::{Period, RetentionConfig};
use chitin::lifecycle::retention;
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
    data_older_than_its_retention_is_gone_after_one_run_and_younger_data_is_untouched,
    each_run_writes_one_audit_record_with_counts_and_time_ranges_never_content,
    a_held_subject_survives_retention_and_goes_after_release,
    a_dry_run_counts_but_changes_and_records_nothing,
    retention_fires_once_per_tick_across_two_replicas,
);
use serde_json::json;

fn cfg() -> RetentionConfig {
    RetentionConfig {
        transcripts: Period::Ms(90 * DAY),
        tool_output: Period::Ms(30 * DAY),
        attachments: Period::Ms(30 * DAY),
        audit_payloads: Period::Ms(365 * DAY),
        approvals: Period::Ms(365 * DAY),
        chat: Period::Ms(30 * DAY),
        workflows: Period::Ms(90 * DAY),
        automation: Period::Ms(30 * DAY),
        interval_minutes: 60,
    }
}

/// Alice: one old conversation (100 days) and one young (1 day); tool output 40 days (expired
/// at 30) and 10 days (kept); approvals and audit records 400 days old and 10 days old.
fn seed(h: &H) -> (String, i64, i64) {
    let alice = user("alice");
    let now = T0 + 500 * DAY;
    let old = now - 100 * DAY;
    let young = now - DAY;
    h.clock.set(now - 400 * DAY);
    let old_audit = audit_record(
        h,
        &alice,
        "message.receive",
        "web",
        json!({"text": "old audit"}),
    );
    approval(
        h,
        "ap-old",
        "alice",
        Some("owner"),
        "used",
        now - 400 * DAY,
        "old approval",
    );
    h.clock.set(now - 10 * DAY);
    let young_audit = audit_record(
        h,
        &alice,
        "message.receive",
        "web",
        json!({"text": "young audit"}),
    );
    approval(
        h,
        "ap-young",
        "alice",
        Some("owner"),
        "used",
        now - 10 * DAY,
        "young approval",
    );
    session(h, "s-old", &alice, "alice", old, Some("old summary"));
    session(h, "s-young", &alice, "alice", young, Some("young summary"));
    message(
        h,
        "s-old",
        &alice,
        1,
        "user",
        "transcript",
        old,
        "old question",
    );
    message(
        h,
        "s-old",
        &alice,
        2,
        "assistant",
        "transcript",
        old,
        "old answer",
    );
    message(
        h,
        "s-young",
        &alice,
        1,
        "user",
        "transcript",
        young,
        "young question",
    );
    message(
        h,
        "s-young",
        &alice,
        2,
        "tool",
        "tool_output",
        now - 40 * DAY,
        "old tool output",
    );
    message(
        h,
        "s-young",
        &alice,
        3,
        "tool",
        "tool_output",
        now - 10 * DAY,
        "young tool output",
    );
    message(
        h,
        "s-young",
        &alice,
        4,
        "user",
        "attachment",
        now - 31 * DAY,
        "old attachment",
    );
    run_row(h, "r-old", "s-old", &alice, "alice", old);
    run_row(h, "r-young", "s-young", &alice, "alice", young);
    h.clock.set(now);
    (alice, old_audit, young_audit)
}

fn data_older_than_its_retention_is_gone_after_one_run_and_younger_data_is_untouched(d: Dialect) {
    let h = harness_on(d);
    let (alice, old_audit, young_audit) = seed(&h);
    let r = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    let by = |c: &str| r.classes.iter().find(|x| x.class == c).unwrap().clone();
    assert_eq!(by("transcripts").deleted, 2);
    assert_eq!(by("tool_output").deleted, 1);
    assert_eq!(by("attachments").deleted, 1);
    assert_eq!(by("approvals").deleted, 1);
    assert!(by("audit_payloads").deleted >= 1);
    assert_eq!((r.sessions, r.runs), (1, 1));
    assert!(r.scrubbed);
    assert_eq!(
        by("transcripts").oldest_ms,
        Some(T0 + 500 * DAY - 100 * DAY)
    );

    // Gone for real: rows removed.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM messages WHERE session_key = 's-old'"
        ),
        0
    );
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM sessions WHERE key = 's-old'"),
        0
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM runs WHERE id = 'r-old'"), 0);
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM approvals WHERE id = 'ap-old'"),
        0
    );
    // Younger data untouched, and still readable.
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM messages WHERE session_key = 's-young'"
        ),
        2
    );
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM sessions WHERE key = 's-young'"),
        1
    );
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM runs WHERE id = 'r-young'"),
        1
    );
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM approvals WHERE id = 'ap-young'"),
        1
    );
    let body: Vec<u8> =
        h.lc.store
            .db()
            .with(|c| {
                c.query_row(
                    "SELECT body FROM messages WHERE seq = 3 AND session_key = 's-young'",
                    chitin::store::params![],
                )?
                .get(0)
            })
            .unwrap();
    assert!(contains(
        &h.lc.vault.open(&alice, &body).unwrap(),
        b"young tool output"
    ));

    // The expired audit payload is removed, its digest kept; the young one stays; the chain
    // still verifies.
    let reader = h.lc.audit.reader().unwrap();
    let old = &reader.range(old_audit, old_audit).unwrap()[0];
    assert!(old.payload.is_none());
    assert_eq!(old.removed_reason.as_deref(), Some("retention"));
    assert_eq!(old.payload_digest.len(), 32);
    assert!(
        reader.range(young_audit, young_audit).unwrap()[0]
            .payload
            .is_some()
    );
    h.lc.audit.checkpoint_now().unwrap();
    audit_verifies(&h.home);

    // A second run at the same time finds nothing more.
    let again = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    assert!(again.classes.iter().all(|c| c.deleted == 0), "{again:?}");
}

fn each_run_writes_one_audit_record_with_counts_and_time_ranges_never_content(d: Dialect) {
    let h = harness_on(d);
    seed(&h);
    let r = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    let seq = r.audit_seq.unwrap();
    let rec = &h.lc.audit.reader().unwrap().range(seq, seq).unwrap()[0];
    assert_eq!(
        (rec.kind.as_str(), rec.action.as_str()),
        ("retention", "retention.run")
    );
    let payload = rec.payload.clone().unwrap();
    assert!(payload.contains("\"deleted\":2"), "{payload}");
    assert!(payload.contains("oldest_ms"), "{payload}");
    for content in [
        "old question",
        "old answer",
        "old approval",
        "old audit",
        "alice",
    ] {
        assert!(!payload.contains(content), "{content} in {payload}");
    }
}

fn a_held_subject_survives_retention_and_goes_after_release(d: Dialect) {
    let h = harness_on(d);
    let (alice, _, _) = seed(&h);
    let s = Subject::parse(&alice).unwrap();
    assert!(retention::hold(&h.lc, &s, "litigation 2026-17", "Chitin::User::\"owner\"").unwrap());
    let r = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    let t = r.classes.iter().find(|c| c.class == "transcripts").unwrap();
    assert_eq!((t.deleted, t.held), (0, 2));
    let a = r.classes.iter().find(|c| c.class == "approvals").unwrap();
    assert_eq!((a.deleted, a.held), (0, 1));
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 6);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM sessions"), 2);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM approvals"), 2);
    // Audit payloads about the held subject stay too.
    let reader = h.lc.audit.reader().unwrap();
    let mut removed = 0;
    reader
        .for_each_from(1, |r| {
            if r.actor == alice && r.payload.is_none() {
                removed += 1;
            }
            true
        })
        .unwrap();
    assert_eq!(removed, 0);
    // Hold and release are audited.
    assert!(retention::release(&h.lc, &s, "Chitin::User::\"owner\"").unwrap());
    let mut actions = Vec::new();
    reader
        .for_each_from(1, |r| {
            if r.resource == alice {
                actions.push(r.action.clone());
            }
            true
        })
        .unwrap();
    assert!(
        actions.contains(&"retention.hold".to_string()),
        "{actions:?}"
    );
    assert!(
        actions.contains(&"retention.release".to_string()),
        "{actions:?}"
    );
    let r = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    assert_eq!(
        r.classes
            .iter()
            .find(|c| c.class == "transcripts")
            .unwrap()
            .deleted,
        2
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 2);
}

fn a_dry_run_counts_but_changes_and_records_nothing(d: Dialect) {
    let h = harness_on(d);
    seed(&h);
    let before = h.lc.audit.reader().unwrap().head().unwrap();
    let r = retention::run(&h.lc, &cfg(), "retention:test", true).unwrap();
    assert!(r.dry_run && r.audit_seq.is_none());
    assert_eq!(
        r.classes
            .iter()
            .find(|c| c.class == "transcripts")
            .unwrap()
            .deleted,
        2
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 6);
    assert_eq!(h.lc.audit.reader().unwrap().head().unwrap(), before);
}

#[test]
fn forever_keeps_a_class_and_the_security_audit_notes_it() {
    let h = harness();
    seed(&h);
    let mut c = cfg();
    c.transcripts = Period::Forever;
    let r = retention::run(&h.lc, &c, "retention:test", false).unwrap();
    let t = r.classes.iter().find(|x| x.class == "transcripts").unwrap();
    assert_eq!((t.cutoff_ms, t.deleted), (None, 0));
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM messages WHERE class = 'transcript'"
        ),
        3
    );
    let config = chitin::config::Config {
        retention: c,
        ..Default::default()
    };
    let f = chitin::lifecycle::findings(&config);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, "retention.forever.transcripts");
}

#[test]
fn deleted_rows_leave_no_trace_in_the_database_file_or_its_wal() {
    let h = harness();
    let alice = user("alice");
    let now = T0 + 500 * DAY;
    // Plaintext that lives in the state db: an approval summary.
    approval(
        &h,
        "ap-x",
        "alice",
        Some("owner"),
        "used",
        now - 400 * DAY,
        "CANARY-APPROVAL-7731",
    );
    session(&h, "s", &alice, "alice", now - 400 * DAY, None);
    h.clock.set(now);
    let raw = |h: &H| {
        let mut all = Vec::new();
        for f in files_under(&h.home) {
            all.extend(std::fs::read(f).unwrap());
        }
        all
    };
    assert!(
        contains(&raw(&h), b"CANARY-APPROVAL-7731"),
        "control: the canary is on disk before"
    );
    retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    assert!(!contains(&raw(&h), b"CANARY-APPROVAL-7731"));
}

#[test]
fn the_gateway_schedule_runs_retention_and_backups_when_due_and_reports_lag() {
    use chitin::lifecycle::schedule;
    let h = harness();
    seed(&h);
    let id = h.home.parent().unwrap().join("id.txt");
    let recipient = chitin::lifecycle::backup::keygen(&id, T0).unwrap();
    let dir = h.home.parent().unwrap().join("backups");
    let config = chitin::config::Config {
        retention: RetentionConfig {
            interval_minutes: 60,
            ..cfg()
        },
        backup: chitin::config::backup::BackupConfig {
            recipient,
            dir: dir.to_string_lossy().into_owned(),
            interval_hours: 24,
            keep: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let first = schedule::tick(&h.lc, &config);
    let r = first.retention.unwrap().unwrap();
    assert_eq!(
        r.classes
            .iter()
            .find(|c| c.class == "transcripts")
            .unwrap()
            .deleted,
        2
    );
    assert!(first.backup.unwrap().unwrap().exists());
    assert_eq!(schedule::retention_lag_ms(&h.lc, &config), Some(0));
    // Nothing is due 30 minutes later.
    h.clock.advance(30 * 60_000);
    let t = schedule::tick(&h.lc, &config);
    assert!(t.retention.is_none() && t.backup.is_none());
    // An hour later retention is due again, the backup is not.
    h.clock.advance(31 * 60_000);
    let t = schedule::tick(&h.lc, &config);
    assert!(t.retention.is_some() && t.backup.is_none());
    // A job that stopped running shows as lag.
    h.clock.advance(5 * 3_600_000);
    assert_eq!(
        schedule::retention_lag_ms(&h.lc, &config),
        Some(4 * 3_600_000)
    );
    // A day later a second backup is made; rotation keeps two.
    h.clock.advance(24 * 3_600_000);
    assert!(schedule::tick(&h.lc, &config).backup.unwrap().is_ok());
    h.clock.advance(24 * 3_600_000);
    assert!(schedule::tick(&h.lc, &config).backup.unwrap().is_ok());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
}

#[test]
fn chat_events_sent_messages_and_decided_pairings_older_than_their_retention_are_deleted() {
    let h = harness();
    let now = T0 + 500 * DAY;
    h.clock.set(now);
    let alice = user("alice");
    let bob = user("bob");
    {
        let conn = h.lc.store.conn().unwrap();
        // (id, received, subject): an old admitted message, an old refused one without text,
        // a young one, and an old one of a subject under legal hold.
        for (id, at, subject) in [
            (1, now - 40 * DAY, Some(alice.as_str())),
            (2, now - 40 * DAY, None),
            (3, now - DAY, Some(alice.as_str())),
            (4, now - 40 * DAY, Some(bob.as_str())),
        ] {
            conn.execute(
                "INSERT INTO channel_events (id, channel, event_id, received_ms, event_kind, status, subject, text, updated_ms)
                 VALUES (?1, 'tg', ?2, ?3, 'message', 'admitted', ?4, x'00', ?3)",
                rusqlite::params![id, format!("u:{id}"), at, subject],
            )
            .unwrap();
        }
        for (id, at, status) in [
            (1, now - 40 * DAY, "sent"),
            (2, now - 40 * DAY, "dead"),
            (3, now - 40 * DAY, "queued"),
            (4, now - DAY, "sent"),
        ] {
            conn.execute(
                "INSERT INTO channel_outbox (id, channel, chat_id, chat_kind, text, kind, status, next_attempt_ms, created_ms, updated_ms)
                 VALUES (?1, 'tg', '42', 'dm', 'a reply', 'reply', ?2, ?3, ?3, ?3)",
                rusqlite::params![id, status, at],
            )
            .unwrap();
        }
        for (code, status) in [("AAAA1111", "approved"), ("BBBB2222", "pending")] {
            conn.execute(
                "INSERT INTO pairing_requests (code, channel, identity, chat_id, created_ms, expires_ms, status)
                 VALUES (?1, 'tg', 'telegram:42', '42', ?2, ?3, ?4)",
                rusqlite::params![code, now - 40 * DAY, now + DAY, status],
            )
            .unwrap();
        }
    }
    retention::hold(&h.lc, &Subject::parse(&bob).unwrap(), "court order", "op").unwrap();
    let r = retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    let chat = r.classes.iter().find(|c| c.class == "chat").unwrap();
    // Events 1 and 2, outbox rows 1 and 2, the approved pairing.
    assert_eq!((chat.deleted, chat.held), (5, 1));
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM channel_events ORDER BY id"),
        2
    );
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM channel_events WHERE id IN (3, 4)"),
        2
    );
    // A message still to be sent is never deleted, however old.
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM channel_outbox WHERE id IN (3, 4)"),
        2
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM channel_outbox"), 2);
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM pairing_requests WHERE status = 'pending'"
        ),
        1
    );
    assert_eq!(count(&h, "SELECT COUNT(*) FROM pairing_requests"), 1);
}

#[test]
fn messages_retention_deletes_are_gone_from_the_agents_cached_history() {
    let h = harness();
    let t = chitin::agent::Transcripts::new(
        std::sync::Arc::clone(&h.lc.store),
        std::sync::Arc::clone(&h.lc.vault) as std::sync::Arc<dyn chitin::agent::Sealer>,
    )
    .with_cache(1 << 20);
    let now = T0 + 500 * DAY;
    let turn = |run: &str, text: &str, at: i64| {
        let m = chitin::agent::Stored::User {
            text: text.into(),
            from: "bob".into(),
            untrusted: false,
        };
        t.begin_turn("s-bob", "bob", "web", run, None, &m, false, at)
            .unwrap();
    };
    turn("r-old", "old words", now - 100 * DAY);
    turn("r-young", "young words", now - DAY);
    assert_eq!(t.history_shared("s-bob").unwrap().1.len(), 2);
    h.clock.set(now);
    retention::run(&h.lc, &cfg(), "retention:test", false).unwrap();
    let (_, entries) = t.history_shared("s-bob").unwrap();
    let texts: Vec<&str> = entries
        .iter()
        .filter_map(|e| match e.message() {
            chitin::providers::Message::User { text } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, vec!["young words"]);
}

/// Two gateways on one database (two `Store`s: on PostgreSQL two pools, on SQLite two
/// connections) ticking at the same instant: one of them runs retention, once.
fn retention_fires_once_per_tick_across_two_replicas(d: Dialect) {
    use chitin::lifecycle::{Lifecycle, schedule};
    let h = harness_on(d);
    seed(&h);
    let replica = Lifecycle {
        store: second_store(&h),
        ..h.lc.clone()
    };
    let config = chitin::config::Config {
        retention: RetentionConfig {
            interval_minutes: 60,
            ..cfg()
        },
        ..Default::default()
    };
    let runs = |h: &H| {
        let mut n = 0;
        h.lc.audit
            .reader()
            .unwrap()
            .for_each_from(1, |r| {
                n += usize::from(r.action == "retention.run");
                true
            })
            .unwrap();
        n
    };
    for round in 1..=3 {
        let barrier = std::sync::Barrier::new(2);
        let (a, b) = std::thread::scope(|s| {
            let t1 = s.spawn(|| {
                barrier.wait();
                schedule::tick(&h.lc, &config)
            });
            let t2 = s.spawn(|| {
                barrier.wait();
                schedule::tick(&replica, &config)
            });
            (t1.join().unwrap(), t2.join().unwrap())
        });
        let ran: Vec<_> = [a.retention, b.retention].into_iter().flatten().collect();
        assert_eq!(ran.len(), 1, "round {round}: {ran:?}");
        assert!(ran[0].is_ok(), "{ran:?}");
        assert_eq!(runs(&h), round);
        // Nothing more is due within the hour, on either replica.
        h.clock.advance(59 * 60_000);
        assert!(schedule::tick(&replica, &config).retention.is_none());
        assert!(schedule::tick(&h.lc, &config).retention.is_none());
        h.clock.advance(60_000);
    }
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM messages WHERE session_key = 's-old'"
        ),
        0
    );
}
