//! Retention: deletes each class of data older than its configured period, except for
//! subjects under legal hold; legal holds themselves.
//!
//! One run: count what is expired (per class: rows and the time range), write one audit record
//! with those counts (never content) — if that fails nothing is deleted —, delete in one
//! transaction, remove expired audit payloads through the audit crate (digests stay), then
//! scrub both databases (`VACUUM`, WAL truncated).

use std::collections::BTreeSet;

use crate::store::params;
use chitin_audit::{Kind, RecordInput};
use chitin_store::{Conn, ToValue};
use serde::Serialize;
use serde_json::json;

use super::{Lifecycle, LifecycleError, concerns};
use crate::config::retention::RetentionConfig;
use crate::vault::Subject;

/// What one class lost (or would lose, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassReport {
    pub class: &'static str,
    /// `None`: kept forever.
    pub cutoff_ms: Option<i64>,
    /// Rows (or audit payloads) deleted.
    pub deleted: u64,
    /// Oldest and newest creation time among them.
    pub oldest_ms: Option<i64>,
    pub newest_ms: Option<i64>,
    /// Expired rows kept because their subject is under legal hold.
    pub held: u64,
}

/// The result of one retention run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    pub dry_run: bool,
    pub now_ms: i64,
    pub classes: Vec<ClassReport>,
    /// Sessions and runs removed with the transcripts class (metadata of expired conversations).
    pub sessions: u64,
    pub runs: u64,
    /// The audit record of the run (`None` in a dry run).
    pub audit_seq: Option<i64>,
    /// Whether the databases were rebuilt and their WALs truncated right away (false: a
    /// reader kept them busy; the next run does it).
    pub scrubbed: bool,
}

/// A legal hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub subject: String,
    pub reason: String,
    pub created_ms: i64,
    pub created_by: String,
}

/// The subjects under legal hold.
pub fn holds(lc: &Lifecycle) -> Result<Vec<Hold>, LifecycleError> {
    lc.store.db().with(|c| {
        c.query_map(
            "SELECT subject, reason, created_ms, created_by FROM holds ORDER BY subject",
            params![],
            hold_row,
        )
    })
}

/// The hold on `subject`, if any.
pub fn hold_of(lc: &Lifecycle, subject: &Subject) -> Result<Option<Hold>, LifecycleError> {
    lc.store
        .db()
        .with(|c| hold_of_conn(c, &subject.to_string()))
}

fn hold_row(r: &chitin_store::Row) -> Result<Hold, LifecycleError> {
    Ok(Hold {
        subject: r.get(0)?,
        reason: r.get(1)?,
        created_ms: r.get(2)?,
        created_by: r.get(3)?,
    })
}

pub(crate) fn hold_of_conn(
    conn: &mut Conn<'_>,
    subject: &str,
) -> Result<Option<Hold>, LifecycleError> {
    conn.query_opt(
        "SELECT subject, reason, created_ms, created_by FROM holds WHERE subject = ?1",
        params![subject],
    )?
    .map(|r| hold_row(&r))
    .transpose()
}

/// Puts `subject` under legal hold (audited first). Returns false if it already was (the
/// reason is then updated).
pub fn hold(
    lc: &Lifecycle,
    subject: &Subject,
    reason: &str,
    actor: &str,
) -> Result<bool, LifecycleError> {
    let s = subject.to_string();
    let existed = hold_of(lc, subject)?.is_some();
    lc.audit.append(
        RecordInput::new(Kind::Retention, actor, "retention.hold", s.clone())
            .with_payload(json!({ "reason": reason, "already_held": existed })),
    )?;
    lc.store.db().with(|c| {
        c.execute(
            "INSERT INTO holds (subject, reason, created_ms, created_by) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(subject) DO UPDATE SET reason = excluded.reason",
            params![s, reason, lc.clock.now_ms(), actor],
        )
    })?;
    Ok(!existed)
}

/// Releases a legal hold (audited first). Returns false if there was none.
pub fn release(lc: &Lifecycle, subject: &Subject, actor: &str) -> Result<bool, LifecycleError> {
    let s = subject.to_string();
    let existed = hold_of(lc, subject)?.is_some();
    lc.audit.append(
        RecordInput::new(Kind::Retention, actor, "retention.release", s.clone())
            .with_payload(json!({ "was_held": existed })),
    )?;
    lc.store
        .db()
        .with(|c| c.execute("DELETE FROM holds WHERE subject = ?1", params![s]))?;
    Ok(existed)
}

const TERMINAL_RUNS: &str = "('completed', 'failed', 'cancelled', 'timed_out', 'interrupted')";
const NOT_HELD: &str = "subject NOT IN (SELECT subject FROM holds)";
/// A chat event not about a held subject (an event without text has no subject).
const CHAT_NOT_HELD: &str = "(subject IS NULL OR subject NOT IN (SELECT subject FROM holds))";
/// Outbox rows that are done with: sent, failed or dead (never one still to send).
const CHAT_OUTBOX_DONE: &str = "status IN ('sent', 'failed', 'dead')";
/// Pairing requests that were decided or expired (an open one stays until it expires).
const CHAT_PAIRING_DONE: &str = "status <> 'pending'";

/// Workflow runs that ended (a sub-workflow's run goes with its top-level run).
const WORKFLOW_DONE: &str =
    "parent_run IS NULL AND status IN ('ok', 'failed', 'cancelled', 'interrupted')
     AND NOT EXISTS (SELECT 1 FROM workflow_pauses p WHERE p.run_id = workflow_runs.id
                     AND p.status IN ('pending', 'claimed'))";

struct Plan {
    classes: Vec<ClassReport>,
    approval_ids: Vec<String>,
    /// Top-level workflow runs to delete (with their sub-workflow runs, steps and pauses).
    workflow_runs: Vec<String>,
    /// Cron firings (ids) and webhook deliveries (hook, delivery id) to delete.
    firings: Vec<i64>,
    deliveries: Vec<(String, String)>,
    audit_seqs: Vec<i64>,
    sessions: u64,
    runs: u64,
}

fn range(
    conn: &mut Conn<'_>,
    sql: &str,
    p: &[&dyn ToValue],
) -> Result<(u64, Option<i64>, Option<i64>), chitin_store::Error> {
    let r = conn.query_row(sql, p)?;
    Ok((
        u64::try_from(r.get::<i64>(0)?).unwrap_or(0),
        r.get(1)?,
        r.get(2)?,
    ))
}

fn plan(lc: &Lifecycle, cfg: &RetentionConfig, now: i64) -> Result<Plan, LifecycleError> {
    let held: Vec<Subject> = holds(lc)?
        .iter()
        .filter_map(|h| Subject::parse(&h.subject).ok())
        .collect();
    let held_users: BTreeSet<String> = held
        .iter()
        .filter_map(|s| s.user_id().map(str::to_owned))
        .collect();
    let mut classes = Vec::new();
    let mut approval_ids = Vec::new();
    let mut workflow_runs = Vec::new();
    let mut firings = Vec::new();
    let mut deliveries = Vec::new();
    let mut audit_seqs = Vec::new();
    let (mut sessions, mut runs) = (0, 0);
    lc.store.db().with(|conn| -> Result<(), LifecycleError> {
        for (class, period) in cfg.classes() {
            let cutoff = period.cutoff(now);
            let mut rep = ClassReport {
                class,
                cutoff_ms: cutoff,
                deleted: 0,
                oldest_ms: None,
                newest_ms: None,
                held: 0,
            };
            let Some(cutoff) = cutoff else {
                classes.push(rep);
                continue;
            };
            match class {
                "transcripts" | "tool_output" | "attachments" => {
                    let mclass = match class {
                        "transcripts" => "transcript",
                        "attachments" => "attachment",
                        other => other,
                    };
                    (rep.deleted, rep.oldest_ms, rep.newest_ms) = range(
                        conn,
                        &format!(
                            "SELECT COUNT(*), MIN(created_ms), MAX(created_ms) FROM messages
                         WHERE class = ?1 AND created_ms < ?2 AND {NOT_HELD}"
                        ),
                        params![mclass, cutoff],
                    )?;
                    rep.held = range(
                    conn,
                    "SELECT COUNT(*), NULL, NULL FROM messages WHERE class = ?1 AND created_ms < ?2
                     AND subject IN (SELECT subject FROM holds)",
                    params![mclass, cutoff],
                )?
                .0;
                    if class == "transcripts" {
                        runs = range(
                            conn,
                            &format!(
                                "SELECT COUNT(*), NULL, NULL FROM runs WHERE updated_ms < ?1
                             AND status IN {TERMINAL_RUNS} AND {NOT_HELD}"
                            ),
                            params![cutoff],
                        )?
                        .0;
                        // Sessions idle since the cutoff with no message left after this run.
                        let c =
                            |p: crate::config::retention::Period| p.cutoff(now).unwrap_or(i64::MIN);
                        sessions = range(
                            conn,
                            &format!(
                            "SELECT COUNT(*), NULL, NULL FROM sessions s WHERE s.updated_ms < ?1
                             AND s.{NOT_HELD} AND NOT EXISTS (SELECT 1 FROM messages m
                               WHERE m.session_key = s.key AND NOT (
                                (m.class = 'transcript' AND m.created_ms < ?2)
                                OR (m.class = 'tool_output' AND m.created_ms < ?3)
                                OR (m.class = 'attachment' AND m.created_ms < ?4)))"
                        ),
                            params![
                                cutoff,
                                c(cfg.transcripts),
                                c(cfg.tool_output),
                                c(cfg.attachments)
                            ],
                        )?
                        .0;
                    }
                }
                "chat" => {
                    let events = range(
                        conn,
                        &format!(
                        "SELECT COUNT(*), MIN(received_ms), MAX(received_ms) FROM channel_events
                         WHERE received_ms < ?1 AND {CHAT_NOT_HELD}"
                    ),
                        params![cutoff],
                    )?;
                    rep.held = range(
                        conn,
                        "SELECT COUNT(*), NULL, NULL FROM channel_events WHERE received_ms < ?1
                     AND subject IN (SELECT subject FROM holds)",
                        params![cutoff],
                    )?
                    .0;
                    let outbox = range(
                        conn,
                        &format!(
                            "SELECT COUNT(*), MIN(created_ms), MAX(created_ms) FROM channel_outbox
                         WHERE created_ms < ?1 AND {CHAT_OUTBOX_DONE}"
                        ),
                        params![cutoff],
                    )?;
                    let pairings = range(
                        conn,
                        &format!(
                        "SELECT COUNT(*), MIN(created_ms), MAX(created_ms) FROM pairing_requests
                         WHERE created_ms < ?1 AND {CHAT_PAIRING_DONE}"
                    ),
                        params![cutoff],
                    )?;
                    rep.deleted = events.0 + outbox.0 + pairings.0;
                    let times = [events, outbox, pairings];
                    rep.oldest_ms = times.iter().filter_map(|t| t.1).min();
                    rep.newest_ms = times.iter().filter_map(|t| t.2).max();
                }
                "approvals" => {
                    let rows = conn.query_all(
                        "SELECT id, requester, created_ms FROM approvals WHERE created_ms < ?1
                     AND (status IN ('denied', 'expired', 'used') OR expires_ms < ?2)
                     ORDER BY created_ms, id",
                        params![cutoff, now],
                    )?;
                    for r in rows {
                        let (id, requester, created) =
                            (r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?);
                        if held_users.contains(&requester) {
                            rep.held += 1;
                            continue;
                        }
                        rep.deleted += 1;
                        rep.oldest_ms = Some(rep.oldest_ms.map_or(created, |o| o.min(created)));
                        rep.newest_ms = Some(rep.newest_ms.map_or(created, |o| o.max(created)));
                        approval_ids.push(id);
                    }
                }
                "workflows" => {
                    let rows = conn.query_all(
                        &format!(
                        "SELECT id, subject, COALESCE(finished_ms, updated_ms) FROM workflow_runs
                         WHERE COALESCE(finished_ms, updated_ms) < ?1 AND {WORKFLOW_DONE}
                         ORDER BY id"
                    ),
                        params![cutoff],
                    )?;
                    let held_subjects: BTreeSet<String> =
                        held.iter().map(ToString::to_string).collect();
                    for r in rows {
                        let (id, subject, at) =
                            (r.get::<String>(0)?, r.get::<String>(1)?, r.get::<i64>(2)?);
                        if held_subjects.contains(&subject) {
                            rep.held += 1;
                            continue;
                        }
                        rep.deleted += 1;
                        rep.oldest_ms = Some(rep.oldest_ms.map_or(at, |o| o.min(at)));
                        rep.newest_ms = Some(rep.newest_ms.map_or(at, |o| o.max(at)));
                        workflow_runs.push(id);
                    }
                }
                "automation" => {
                    let held_subjects: BTreeSet<String> =
                        held.iter().map(ToString::to_string).collect();
                    // Firings that ended, except each job's latest; a held user's jobs are kept.
                    let rows = conn.query_all(
                        "SELECT f.id, j.user_id, f.created_ms FROM cron_firings f
                     LEFT JOIN cron_jobs j ON j.name = f.job
                     WHERE f.created_ms < ?1 AND f.status NOT IN ('requested', 'started')
                       AND f.id NOT IN (SELECT MAX(id) FROM cron_firings GROUP BY job)
                     ORDER BY f.id",
                        params![cutoff],
                    )?;
                    for r in rows {
                        let (id, user, at) = (
                            r.get::<i64>(0)?,
                            r.get::<Option<String>>(1)?,
                            r.get::<i64>(2)?,
                        );
                        if user.is_some_and(|u| held_users.contains(&u)) {
                            rep.held += 1;
                            continue;
                        }
                        rep.deleted += 1;
                        rep.oldest_ms = Some(rep.oldest_ms.map_or(at, |o| o.min(at)));
                        rep.newest_ms = Some(rep.newest_ms.map_or(at, |o| o.max(at)));
                        firings.push(id);
                    }
                    // Deliveries that ended (never one acknowledged and not yet started or
                    // still starting).
                    let rows = conn.query_all(
                        "SELECT hook, delivery_id, subject, received_ms FROM hook_deliveries
                     WHERE received_ms < ?1 AND status NOT IN ('accepted', 'started')
                     ORDER BY hook, delivery_id",
                        params![cutoff],
                    )?;
                    for r in rows {
                        let (hook, delivery, subject, at) = (
                            r.get::<String>(0)?,
                            r.get::<String>(1)?,
                            r.get::<Option<String>>(2)?,
                            r.get::<i64>(3)?,
                        );
                        if subject.is_some_and(|s| held_subjects.contains(&s)) {
                            rep.held += 1;
                            continue;
                        }
                        rep.deleted += 1;
                        rep.oldest_ms = Some(rep.oldest_ms.map_or(at, |o| o.min(at)));
                        rep.newest_ms = Some(rep.newest_ms.map_or(at, |o| o.max(at)));
                        deliveries.push((hook, delivery));
                    }
                }
                "audit_payloads" => {
                    let reader = lc.audit.reader()?;
                    reader.for_each_from(1, |r| {
                        if r.ts_ms >= cutoff {
                            return false;
                        }
                        let removable = r.payload.is_some()
                            && !(r.kind == "retention" && r.action == "payload_removed");
                        if removable {
                            if held.iter().any(|s| concerns(&r, s)) {
                                rep.held += 1;
                            } else {
                                rep.deleted += 1;
                                rep.oldest_ms =
                                    Some(rep.oldest_ms.map_or(r.ts_ms, |o| o.min(r.ts_ms)));
                                rep.newest_ms =
                                    Some(rep.newest_ms.map_or(r.ts_ms, |o| o.max(r.ts_ms)));
                                audit_seqs.push(r.seq);
                            }
                        }
                        true
                    })?;
                }
                _ => {}
            }
            classes.push(rep);
        }
        Ok(())
    })?;
    Ok(Plan {
        classes,
        approval_ids,
        workflow_runs,
        firings,
        deliveries,
        audit_seqs,
        sessions,
        runs,
    })
}

/// One retention run (what the gateway calls on its schedule and `chitin retention run` calls).
/// `dry_run`: count only, change and record nothing.
pub fn run(
    lc: &Lifecycle,
    cfg: &RetentionConfig,
    actor: &str,
    dry_run: bool,
) -> Result<RetentionReport, LifecycleError> {
    let now = lc.clock.now_ms();
    let p = plan(lc, cfg, now)?;
    let mut report = RetentionReport {
        dry_run,
        now_ms: now,
        classes: p.classes,
        sessions: p.sessions,
        runs: p.runs,
        audit_seq: None,
        scrubbed: true,
    };
    if dry_run {
        return Ok(report);
    }
    // Counts and time ranges only: never content, never subjects.
    let receipt = lc.audit.append(
        RecordInput::new(Kind::Retention, actor, "retention.run", "state").with_payload(json!({
            "now_ms": now,
            "classes": report.classes,
            "sessions": report.sessions,
            "runs": report.runs,
        })),
    )?;
    report.audit_seq = Some(receipt.seq);
    let cutoff = |class: &str| {
        report
            .classes
            .iter()
            .find(|c| c.class == class)
            .and_then(|c| c.cutoff_ms)
    };
    let deleted_rows = lc.store.db().tx(|tx| {
        let mut n = 0u64;
        for (class, mclass) in [
            ("transcripts", "transcript"),
            ("tool_output", "tool_output"),
            ("attachments", "attachment"),
        ] {
            if let Some(c) = cutoff(class) {
                n += tx.execute(
                    &format!(
                        "DELETE FROM messages WHERE class = ?1 AND created_ms < ?2 AND {NOT_HELD}"
                    ),
                    params![mclass, c],
                )?;
            }
        }
        if let Some(c) = cutoff("transcripts") {
            n += tx.execute(
                &format!(
                    "DELETE FROM runs WHERE updated_ms < ?1 AND status IN {TERMINAL_RUNS} AND {NOT_HELD}"
                ),
                params![c],
            )?;
            n += tx.execute(
                &format!(
                    "DELETE FROM sessions WHERE updated_ms < ?1 AND {NOT_HELD}
                     AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.session_key = sessions.key)"
                ),
                params![c],
            )?;
        }
        for id in &p.approval_ids {
            n += tx.execute("DELETE FROM approvals WHERE id = ?1", params![id])?;
        }
        for id in &p.workflow_runs {
            // The run and its sub-workflow runs (`<id>.<hex>`, nested the same way).
            let family = "(id = ?1 OR substr(id, 1, length(?1) + 1) = ?1 || '.')";
            for table in ["workflow_steps", "workflow_pauses"] {
                n += tx.execute(
                    &format!(
                        "DELETE FROM {table} WHERE run_id IN (SELECT id FROM workflow_runs WHERE {family})"
                    ),
                    params![id],
                )?;
            }
            n += tx.execute(
                &format!("DELETE FROM workflow_runs WHERE {family}"),
                params![id],
            )?;
        }
        for id in &p.firings {
            n += tx.execute("DELETE FROM cron_firings WHERE id = ?1", params![id])?;
        }
        for (hook, delivery) in &p.deliveries {
            n += tx.execute(
                "DELETE FROM hook_deliveries WHERE hook = ?1 AND delivery_id = ?2 AND status NOT IN ('accepted', 'started')",
                params![hook, delivery],
            )?;
        }
        if let Some(c) = cutoff("chat") {
            n += tx.execute(
                &format!("DELETE FROM channel_events WHERE received_ms < ?1 AND {CHAT_NOT_HELD}"),
                params![c],
            )?;
            n += tx.execute(
                &format!("DELETE FROM channel_outbox WHERE created_ms < ?1 AND {CHAT_OUTBOX_DONE}"),
                params![c],
            )?;
            n += tx.execute(
                &format!(
                    "DELETE FROM pairing_requests WHERE created_ms < ?1 AND {CHAT_PAIRING_DONE}"
                ),
                params![c],
            )?;
        }
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('retention.last_run_ms', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![now.to_string()],
        )?;
        Ok::<_, chitin_store::Error>(n)
    })?;
    for seq in &p.audit_seqs {
        lc.audit.remove_payload(*seq, "retention", actor)?;
    }
    // A busy database only defers the rebuild (secure_delete already zeroed the freed
    // cells); the next run scrubs again.
    if deleted_rows > 0 {
        report.scrubbed &= super::scrub_store(&lc.store).unwrap_or(false);
    }
    if !p.audit_seqs.is_empty() {
        report.scrubbed &= super::scrub_audit_db(&lc.audit.paths().db).unwrap_or(false);
    }
    Ok(report)
}

/// `meta` key: when a retention run was last claimed (unix ms), see [`claim`].
pub const CLAIMED: &str = "retention.claimed_ms";

/// Claims the scheduled retention run due at `now` for this replica: a conditional upsert of
/// [`CLAIMED`] that succeeds only when the last claim is at least `interval_ms` old. With
/// several gateways on one database exactly one of them gets each tick (on PostgreSQL the
/// second upsert waits for the first and re-checks the condition on the row it wrote); the
/// others skip it. Returns whether this call claimed it.
pub fn claim(lc: &Lifecycle, interval_ms: i64, now: i64) -> Result<bool, LifecycleError> {
    let n = lc.store.db().with(|c| {
        c.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value
             WHERE CAST(meta.value AS BIGINT) <= ?3",
            params![CLAIMED, now.to_string(), now.saturating_sub(interval_ms)],
        )
    })?;
    Ok(n == 1)
}

/// When retention last ran (unix ms), for a readiness "retention lag" check.
pub fn last_run_ms(lc: &Lifecycle) -> Result<Option<i64>, LifecycleError> {
    Ok(lc
        .store
        .meta("retention.last_run_ms")?
        .and_then(|v| v.parse().ok()))
}
