//! GDPR erasure of one subject: rows deleted everywhere, data key destroyed (crypto-shredding:
//! copies in free pages, WAL frames and old backups become unreadable), payloads of the audit
//! records about them removed (digests stay, so the chain verifies), an erasure receipt.
//!
//! The receipt and the start record name the subject only by [`super::subject_digest`]; the
//! counts and times are all they carry.

use crate::store::params;
use chitin_audit::RecordInput;
use serde::Serialize;
use serde_json::json;

use super::{Lifecycle, LifecycleError, concerns, retention, subject_digest};
use crate::vault::Subject;

/// What an erasure deletes (or would delete, in a dry run).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ErasePlan {
    pub messages: u64,
    pub sessions: u64,
    pub runs: u64,
    pub usage: u64,
    /// Approvals the subject requested (deleted).
    pub approvals_requested: u64,
    /// Approvals the subject granted or denied for others (the approver is replaced by
    /// `erased`; the other person's request stays).
    pub approvals_resolved: u64,
    /// Audit records about the subject whose payload is removed.
    pub audit_payloads: u64,
    /// Whether the subject has a data key (destroyed by the erasure).
    pub data_key: bool,
    /// Chat messages the subject sent (`channel_events` sealed with their key; deleted).
    pub chat_messages: u64,
    /// Chat identities paired to the user (unpaired: the pairing says who they are).
    pub chat_pairings: u64,
    /// Cron jobs the user added (with `chitin cron add` or the agent's `cron` tool) and their
    /// firings; jobs from `chitin.toml` stay (they are the operator's configuration).
    pub cron_jobs: u64,
    /// The user's operator account (issue #17): the managed user row (`account_users`; a
    /// user of `entities.json` is the operator's file and stays there), API tokens, browser
    /// sessions and devices. Rows that name the user only as who issued a token, decided a
    /// device or added a user keep the row with `erased` in that place. A removal tombstone
    /// (`account_removed`, SHA-256 of the id only) stays, so a removed user stays removed.
    pub account_user: u64,
    pub api_tokens: u64,
    pub web_sessions: u64,
    pub devices: u64,
}

/// The outcome of an erasure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EraseReport {
    pub subject_digest: String,
    pub dry_run: bool,
    pub plan: ErasePlan,
    /// The erasure receipt in the audit log (`None` in a dry run).
    pub receipt_seq: Option<i64>,
    /// Whether both databases' WALs were truncated right away.
    pub wal_truncated: bool,
}

fn count(
    conn: &mut chitin_store::Conn<'_>,
    sql: &str,
    p: &[&dyn chitin_store::ToValue],
) -> Result<u64, chitin_store::Error> {
    conn.query_row(sql, p)?
        .get::<i64>(0)
        .map(|n| u64::try_from(n).unwrap_or(0))
}

/// Audit records about `subject` that still have a payload (and may lose it).
fn audit_seqs(lc: &Lifecycle, subject: &Subject) -> Result<Vec<i64>, LifecycleError> {
    let mut seqs = Vec::new();
    lc.audit.reader()?.for_each_from(1, |r| {
        if r.payload.is_some()
            && !(r.kind == "retention" && r.action == "payload_removed")
            && concerns(&r, subject)
        {
            seqs.push(r.seq);
        }
        true
    })?;
    Ok(seqs)
}

/// What erasing `subject` would delete.
pub fn plan(lc: &Lifecycle, subject: &Subject) -> Result<ErasePlan, LifecycleError> {
    let s = subject.to_string();
    let user = subject.user_id().unwrap_or("");
    let is_user = subject.user_id().is_some();
    let mut p = lc.store.db().with(|conn| {
        Ok::<_, chitin_store::Error>(ErasePlan {
            messages: count(
                conn,
                "SELECT COUNT(*) FROM messages WHERE subject = ?1",
                params![s],
            )?,
            sessions: count(
                conn,
                "SELECT COUNT(*) FROM sessions WHERE subject = ?1",
                params![s],
            )?,
            runs: count(conn, "SELECT COUNT(*) FROM runs WHERE subject = ?1", params![s])?,
            usage: count(conn, "SELECT COUNT(*) FROM usage WHERE subject = ?1", params![s])?,
            approvals_requested: count(
                conn,
                "SELECT COUNT(*) FROM approvals WHERE ?2 AND requester = ?1",
                params![user, is_user],
            )?,
            approvals_resolved: count(
                conn,
                "SELECT COUNT(*) FROM approvals WHERE ?2 AND resolved_by = ?1 AND requester <> ?1",
                params![user, is_user],
            )?,
            audit_payloads: 0,
            data_key: false,
            chat_messages: count(
                conn,
                "SELECT COUNT(*) FROM channel_events WHERE subject = ?1",
                params![s],
            )?,
            chat_pairings: count(
                conn,
                "SELECT COUNT(*) FROM managed_entities WHERE ?2 AND user_id = ?1",
                params![user, is_user],
            )?,
            cron_jobs: count(
                conn,
                "SELECT COUNT(*) FROM cron_jobs WHERE ?2 AND user_id = ?1 AND source IN ('cli', 'agent')",
                params![user, is_user],
            )?,
            account_user: count(
                conn,
                "SELECT COUNT(*) FROM account_users WHERE ?2 AND user_id = ?1",
                params![user, is_user],
            )?,
            api_tokens: count(
                conn,
                "SELECT COUNT(*) FROM api_tokens WHERE ?2 AND user_id = ?1",
                params![user, is_user],
            )?,
            web_sessions: count(
                conn,
                "SELECT COUNT(*) FROM web_sessions WHERE ?2 AND user_id = ?1",
                params![user, is_user],
            )?,
            devices: count(
                conn,
                "SELECT COUNT(*) FROM devices WHERE ?2 AND user_id = ?1",
                params![user, is_user],
            )?,
        })
    })?;
    p.audit_payloads = u64::try_from(audit_seqs(lc, subject)?.len()).unwrap_or(0);
    p.data_key = lc.vault.has_key(&s)?;
    Ok(p)
}

/// Erases `subject` (see the module documentation). The caller has already asked Cedar
/// (`data.erase`, [`super::admin_check`]). A subject under legal hold is refused. Running it
/// twice is fine (the second run finds nothing and still writes a receipt).
pub fn erase(
    lc: &Lifecycle,
    subject: &Subject,
    actor: &str,
    dry_run: bool,
) -> Result<EraseReport, LifecycleError> {
    erase_with(lc, subject, actor, dry_run, true)
}

fn erase_with(
    lc: &Lifecycle,
    subject: &Subject,
    actor: &str,
    dry_run: bool,
    destroy_key: bool,
) -> Result<EraseReport, LifecycleError> {
    if let Some(h) = retention::hold_of(lc, subject)? {
        return Err(LifecycleError::Held {
            subject: subject.to_string(),
            reason: h.reason,
        });
    }
    let digest = subject_digest(subject);
    let p = plan(lc, subject)?;
    let mut report = EraseReport {
        subject_digest: digest.clone(),
        dry_run,
        plan: p.clone(),
        receipt_seq: None,
        wal_truncated: false,
    };
    if dry_run {
        return Ok(report);
    }
    // Intent first: no record, nothing erased.
    lc.audit.append(RecordInput::admin(
        actor,
        "data.erase.start",
        digest.clone(),
        json!({ "plan": p }),
    ))?;
    let s = subject.to_string();
    let user = subject.user_id().unwrap_or("");
    let is_user = subject.user_id().is_some();
    // The key first: from here on the content is unreadable everywhere, even if a step below
    // fails (running the erasure again finishes it). A message a running gateway seals
    // between these steps uses the destroyed key's successor only if it seals after the
    // destroy; anything sealed with the destroyed key is swept by the purge below.
    // (After a restore, the key the subject has now was made after the erasure: keep it.)
    let key_destroyed = destroy_key && lc.vault.destroy(&s)?;
    lc.store.db().tx(|tx| {
        // The memory index too: its documents (and, by trigger, their index terms), its key
        // and cursor.
        for table in [
            "messages",
            "sessions",
            "runs",
            "usage",
            "memory_docs",
            "memory_index_keys",
            "memory_cursor",
        ] {
            tx.execute(&format!("DELETE FROM {table} WHERE subject = ?1"), params![s])?;
        }
        // Workflow runs (their steps and pauses first: they hang off the run).
        for table in ["workflow_steps", "workflow_pauses"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE run_id IN (SELECT id FROM workflow_runs WHERE subject = ?1)"),
                params![s],
            )?;
        }
        tx.execute("DELETE FROM workflow_runs WHERE subject = ?1", params![s])?;
        // What their workflows kept (`state.set`) and their webhook deliveries' stored bodies.
        tx.execute("DELETE FROM workflow_state WHERE subject = ?1", params![s])?;
        tx.execute(
            "UPDATE hook_deliveries SET body = NULL, status = CASE WHEN status IN ('accepted', 'started') THEN 'failed' ELSE status END,
                    result = CASE WHEN status IN ('accepted', 'started') THEN 'erased before it started' ELSE result END
             WHERE subject = ?1 AND body IS NOT NULL",
            params![s],
        )?;
        // Chat: the messages they sent, the identities paired to them (and the pairing
        // requests naming them), the jobs they added and those jobs' firings.
        tx.execute("DELETE FROM channel_events WHERE subject = ?1", params![s])?;
        tx.execute(
            "DELETE FROM managed_entities WHERE ?2 AND user_id = ?1",
            params![user, is_user],
        )?;
        tx.execute(
            "DELETE FROM pairing_requests WHERE ?2 AND user_id = ?1",
            params![user, is_user],
        )?;
        tx.execute(
            "DELETE FROM cron_firings WHERE job IN (SELECT name FROM cron_jobs WHERE ?2 AND user_id = ?1 AND source IN ('cli', 'agent'))",
            params![user, is_user],
        )?;
        tx.execute(
            "DELETE FROM cron_jobs WHERE ?2 AND user_id = ?1 AND source IN ('cli', 'agent')",
            params![user, is_user],
        )?;
        tx.execute(
            "DELETE FROM approvals WHERE ?2 AND requester = ?1",
            params![user, is_user],
        )?;
        tx.execute(
            "UPDATE approvals SET resolved_by = 'erased' WHERE ?2 AND resolved_by = ?1",
            params![user, is_user],
        )?;
        // Their operator account: what they hold goes; where they acted for others, the
        // other person's row stays with `erased` in their place. (`oidc_logins` and
        // `oidc_nonces_used` name nobody: a login's state before the user is known.)
        for table in ["api_tokens", "web_sessions", "devices", "account_users"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE ?2 AND user_id = ?1"),
                params![user, is_user],
            )?;
        }
        for (table, column) in [
            ("api_tokens", "created_by"),
            ("devices", "decided_by"),
            ("account_users", "added_by"),
        ] {
            tx.execute(
                &format!("UPDATE {table} SET {column} = 'erased' WHERE ?2 AND {column} = ?1"),
                params![s, is_user],
            )?;
        }
        Ok::<_, chitin_store::Error>(())
    })?;
    purge_erased_blobs(lc)?;
    let seqs = audit_seqs(lc, subject)?;
    for seq in &seqs {
        lc.audit.remove_payload(*seq, "erasure", actor)?;
    }
    // The rows are gone and the key is destroyed whatever happens next; a busy database (a
    // long reader in another process) only defers the rebuild: say so in the receipt rather
    // than fail without one. secure_delete has already zeroed the freed cells.
    let state_ok = super::scrub_store(&lc.store).unwrap_or(false);
    let audit_ok = super::scrub_audit_db(&lc.audit.paths().db).unwrap_or(false);
    report.wal_truncated = state_ok && audit_ok;
    let receipt = lc.audit.append(RecordInput::admin(
        actor,
        "data.erase.receipt",
        digest,
        json!({
            "erased_ms": lc.clock.now_ms(),
            "deleted": p,
            "audit_payloads_removed": seqs.len(),
            "data_key_destroyed": key_destroyed,
            "databases_rebuilt": report.wal_truncated,
        }),
    ))?;
    lc.audit.checkpoint_now()?;
    report.receipt_seq = Some(receipt.seq);
    Ok(report)
}

/// After a restore: deletes rows sealed with a data key that has since been destroyed (their
/// content is unreadable anyway), so an erasure made after the backup stays an erasure.
/// Returns how many rows went.
pub fn purge_erased_blobs(lc: &Lifecycle) -> Result<u64, LifecycleError> {
    let gone = lc.store.db().tx(|tx| {
        let mut gone = 0u64;
        for (table, key, col) in [("messages", "id", "body"), ("sessions", "key", "summary")] {
            let mut doomed: Vec<chitin_store::Value> = Vec::new();
            for r in tx.query_all(
                &format!("SELECT {key}, {col} FROM {table} WHERE {col} IS NOT NULL"),
                params![],
            )? {
                let blob: Vec<u8> = r.get(1)?;
                if lc.vault.is_erased_blob(&blob).unwrap_or(false) {
                    doomed.push(r.get(0)?);
                }
            }
            for k in doomed {
                gone += tx.execute(&format!("DELETE FROM {table} WHERE {key} = ?1"), params![k])?;
            }
        }
        Ok::<_, chitin_store::Error>(gone)
    })?;
    if gone > 0 {
        super::scrub_store(&lc.store)?;
    }
    Ok(gone)
}

/// What [`reapply_after_restore`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reapplied {
    /// Subjects erased again (by digest).
    pub subjects: Vec<String>,
    /// Subjects that could not be erased again because the restored state holds them under
    /// legal hold (by digest); the operator decides.
    pub held: Vec<String>,
    /// Rows sealed with destroyed keys that were deleted.
    pub purged_rows: u64,
}

/// Every subject the state names: the agent's tables, approvals, holds, audit actors and
/// resources.
fn known_subjects(lc: &Lifecycle) -> Result<std::collections::BTreeSet<Subject>, LifecycleError> {
    let mut texts = std::collections::BTreeSet::new();
    lc.store.db().with(|conn| {
        for sql in [
            "SELECT DISTINCT subject FROM messages",
            "SELECT DISTINCT subject FROM sessions",
            "SELECT DISTINCT subject FROM runs",
            "SELECT DISTINCT subject FROM usage",
            "SELECT DISTINCT subject FROM workflow_runs",
            "SELECT subject FROM holds",
        ] {
            for r in conn.query_all(sql, params![])? {
                texts.insert(r.get::<String>(0)?);
            }
        }
        for r in conn.query_all(
            "SELECT requester FROM approvals UNION SELECT resolved_by FROM approvals WHERE resolved_by IS NOT NULL",
            params![],
        )? {
            texts.insert(format!("Chitin::User::\"{}\"", r.get::<String>(0)?));
        }
        Ok::<_, chitin_store::Error>(())
    })?;
    lc.audit.reader()?.for_each_from(1, |r| {
        texts.insert(r.actor);
        texts.insert(r.resource);
        true
    })?;
    Ok(texts
        .iter()
        .filter_map(|t| Subject::parse(t).ok())
        .collect())
}

/// After restoring a backup made at `backup_created_ms`: every subject erased after that time
/// (the vault's tombstones, which outlive the restore because `vault.keys` is never in a
/// backup) is erased again from what the backup brought back — rows, approvals, audit payloads —
/// and rows sealed with destroyed keys are purged. Audited like any erasure.
pub fn reapply_after_restore(
    lc: &Lifecycle,
    backup_created_ms: i64,
    actor: &str,
) -> Result<Reapplied, LifecycleError> {
    let mut out = Reapplied::default();
    let digests: std::collections::BTreeSet<String> = lc
        .vault
        .erasures_since(backup_created_ms)?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    if !digests.is_empty() {
        for s in known_subjects(lc)? {
            let d = s.digest();
            if !digests.contains(&d) {
                continue;
            }
            match erase_with(lc, &s, actor, false, false) {
                Ok(_) => out.subjects.push(d),
                Err(LifecycleError::Held { .. }) => out.held.push(d),
                Err(e) => return Err(e),
            }
        }
    }
    out.purged_rows = purge_erased_blobs(lc)?;
    Ok(out)
}
