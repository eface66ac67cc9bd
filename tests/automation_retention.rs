//! Retention of workflow runs, cron firings and webhook deliveries (`[retention] workflows`
//! and `automation`) with an injected clock: what ended before the period is deleted (a run
//! with its steps, pauses and sub-workflow runs); a paused run, a firing still running, a
//! delivery acknowledged but not started, each job's latest firing and anything of a held
//! subject are kept.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use chitin::config::retention::{Period, RetentionConfig};
use chitin::lifecycle::retention;
use chitin::vault::Subject;
use lifecycle_support::*;
use rusqlite::params;

fn cfg() -> RetentionConfig {
    RetentionConfig {
        workflows: Period::Ms(90 * DAY),
        automation: Period::Ms(30 * DAY),
        ..RetentionConfig::default()
    }
}

fn wf_run(h: &H, id: &str, owner: &str, status: &str, parent: Option<&str>, at: i64) {
    h.lc.store
        .conn()
        .unwrap()
        .execute(
            "INSERT INTO workflow_runs (id, name, file_root, file_rel, file_sha256, owner, subject, origin, session,
                    parent_run, status, args, args_digest, created_ms, updated_ms, finished_ms)
             VALUES (?1, 'wf', '/w', 'a.lobster', 'ab', ?2, ?3, 'user', 's', ?4, ?5, x'00', 'd', ?6, ?6,
                     CASE WHEN ?5 IN ('ok', 'failed', 'cancelled', 'interrupted') THEN ?6 END)",
            params![id, owner, user(owner), parent, status, at],
        )
        .unwrap();
    h.lc.store
        .conn()
        .unwrap()
        .execute(
            "INSERT INTO workflow_steps (run_id, step, status, attempts, result, started_ms, finished_ms)
             VALUES (?1, 'one', 'ok', 1, x'00', ?2, ?2)",
            params![id, at],
        )
        .unwrap();
}

fn pause(h: &H, id: &str, run: &str, status: &str, at: i64) {
    h.lc.store
        .conn()
        .unwrap()
        .execute(
            "INSERT INTO workflow_pauses (id, run_id, step, kind, nonce, request, status, created_ms, expires_ms)
             VALUES (?1, ?2, 'gate', 'approval', x'00', x'00', ?3, ?4, ?4 + 86400000)",
            params![id, run, status, at],
        )
        .unwrap();
}

fn firing(h: &H, job: &str, slot: &str, status: &str, at: i64) {
    h.lc.store
        .conn()
        .unwrap()
        .execute(
            "INSERT INTO cron_firings (job, slot, tick_ms, kind, status, created_ms) VALUES (?1, ?2, ?3, 'scheduled', ?4, ?3)",
            params![job, slot, at, status],
        )
        .unwrap();
}

fn delivery(h: &H, id: &str, owner: &str, status: &str, body: bool, at: i64) {
    h.lc.store
        .conn()
        .unwrap()
        .execute(
            "INSERT INTO hook_deliveries (hook, delivery_id, event, body_sha256, body_bytes, status, received_ms, body, subject)
             VALUES ('gh', ?1, 'push', 'x', 1, ?2, ?3, CASE WHEN ?4 THEN x'00' END, ?5)",
            params![id, status, at, body, user(owner)],
        )
        .unwrap();
}

fn ids(h: &H, sql: &str) -> Vec<String> {
    let conn = h.lc.store.conn().unwrap();
    let mut st = conn.prepare(sql).unwrap();
    st.query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn ended_workflow_runs_firings_and_deliveries_are_deleted_after_their_period_and_pending_or_held_ones_kept()
 {
    let h = harness();
    let now = T0 + 400 * DAY;
    let old = now - 100 * DAY;
    let young = now - 10 * DAY;
    // Workflow runs: an old finished one with a sub-workflow and a used pause; an old paused
    // one; a young one; an old one of a held user.
    wf_run(&h, "wf_old", "alice", "ok", None, old);
    wf_run(&h, "wf_old.0a1b", "alice", "ok", Some("wf_old"), old);
    pause(&h, "p_used", "wf_old", "used", old);
    wf_run(&h, "wf_paused", "alice", "paused", None, old);
    pause(&h, "p_pending", "wf_paused", "pending", old);
    wf_run(&h, "wf_young", "alice", "failed", None, young);
    wf_run(&h, "wf_held", "bob", "cancelled", None, old);
    // Cron: alice's job has a firing still running, two old ended ones and a young latest;
    // bob's (held) job has old ended firings.
    for (name, user_id) in [("j_alice", "alice"), ("j_bob", "bob")] {
        h.lc.store
            .conn()
            .unwrap()
            .execute(
                "INSERT INTO cron_jobs (name, source, user_id, job_json, created_by, created_ms, updated_ms) VALUES (?1, 'cli', ?2, '', ?2, 1, 1)",
                params![name, user_id],
            )
            .unwrap();
    }
    firing(&h, "j_alice", "t:1", "started", old - DAY);
    firing(&h, "j_alice", "t:2", "completed", old);
    firing(&h, "j_alice", "t:3", "failed", old + 1);
    firing(&h, "j_alice", "t:4", "completed", young);
    firing(&h, "j_bob", "t:1", "completed", old);
    firing(&h, "j_bob", "t:2", "completed", old + 1);
    // Deliveries: old ended, old not yet started (with its body), old being started, young,
    // and an old one of the held user.
    delivery(&h, "d_old", "alice", "completed", false, old);
    delivery(&h, "d_waiting", "alice", "accepted", true, old);
    delivery(&h, "d_starting", "alice", "started", true, old);
    delivery(&h, "d_young", "alice", "failed", false, young);
    delivery(&h, "d_held", "bob", "completed", false, old);
    retention::hold(
        &h.lc,
        &Subject::parse(&user("bob")).unwrap(),
        "litigation",
        "test",
    )
    .unwrap();
    h.clock.set(now);

    let dry = retention::run(&h.lc, &cfg(), "test", true).unwrap();
    let class = |r: &retention::RetentionReport, c: &str| {
        r.classes.iter().find(|x| x.class == c).unwrap().clone()
    };
    assert_eq!(class(&dry, "workflows").deleted, 1);
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM workflow_runs"),
        5,
        "a dry run deletes nothing"
    );

    let r = retention::run(&h.lc, &cfg(), "test", false).unwrap();
    let w = class(&r, "workflows");
    assert_eq!((w.deleted, w.held), (1, 1));
    assert_eq!(w.oldest_ms, Some(old));
    let a = class(&r, "automation");
    // Firings t:2 and t:3 of alice and delivery d_old go; bob's t:1 and d_held are held (his
    // t:2 is his job's latest, kept anyway).
    assert_eq!((a.deleted, a.held), (3, 2));
    assert_eq!(
        ids(&h, "SELECT id FROM workflow_runs ORDER BY id"),
        ["wf_held", "wf_paused", "wf_young"]
    );
    assert_eq!(
        count(
            &h,
            "SELECT COUNT(*) FROM workflow_steps WHERE run_id IN ('wf_old', 'wf_old.0a1b')"
        ),
        0
    );
    assert_eq!(
        ids(&h, "SELECT id FROM workflow_pauses ORDER BY id"),
        ["p_pending"]
    );
    assert_eq!(
        ids(
            &h,
            "SELECT job || ' ' || slot FROM cron_firings ORDER BY job, slot"
        ),
        ["j_alice t:1", "j_alice t:4", "j_bob t:1", "j_bob t:2"]
    );
    assert_eq!(
        ids(
            &h,
            "SELECT delivery_id FROM hook_deliveries ORDER BY delivery_id"
        ),
        ["d_held", "d_starting", "d_waiting", "d_young"]
    );
    // Counts only in the audit record of the run.
    let rec =
        h.lc.audit
            .reader()
            .unwrap()
            .query(&chitin_audit::Query::default())
            .unwrap()
            .into_iter()
            .rfind(|x| x.action == "retention.run")
            .unwrap();
    let payload = rec.payload.unwrap().to_string();
    assert!(payload.contains("\"workflows\"") && payload.contains("\"automation\""));
    assert!(!payload.contains("wf_old") && !payload.contains("d_old"));

    // Kept forever: nothing of theirs goes.
    h.clock.set(now + 1000 * DAY);
    let forever = RetentionConfig {
        workflows: Period::Forever,
        automation: Period::Forever,
        ..RetentionConfig::default()
    };
    let r = retention::run(&h.lc, &forever, "test", false).unwrap();
    assert_eq!(class(&r, "workflows").deleted, 0);
    assert_eq!(class(&r, "automation").deleted, 0);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM workflow_runs"), 3);
}
