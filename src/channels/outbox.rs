//! The durable outbox: every message the gateway sends is a row first; a sender claims due
//! rows atomically, sends them through the platform adapter and records the outcome.
//!
//! Row states: `queued` (waiting, due at `next_attempt_ms`) -> `sending` (claimed) -> `sent`
//! (platform message id recorded; never sent again) | `queued` again (retry) | `failed`
//! (refused by the platform, or may have been delivered: never re-sent automatically) |
//! `dead` (retries exhausted or too old). A row found `sending` when the gateway starts was
//! being sent when it stopped: the request may have reached the platform, so it is marked
//! `failed` ("may have been delivered"), audited and counted, never re-sent silently.

use std::sync::atomic::Ordering;

use chitin_audit::{Kind, RecordInput};
use chitin_channels::{Button, ChatRef, OutMessage, Platform, SendError};
use chitin_store::{Conn, Dialect};
use serde::Serialize;
use serde_json::{Value, json};
use tracing::Instrument;

use super::{
    BACKOFF_BASE_MS, BACKOFF_MAX_MS, ChannelsError, Engine, MAX_OUTBOX_AGE_MS, SEND_CLAIM_TTL_MS,
    chat_kind_str, parse_chat_kind,
};
use crate::store::params;

/// What an outbox row is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxKind {
    /// The agent's answer in a conversation.
    Reply,
    /// An approval prompt with Approve / Deny buttons.
    Approval,
    /// A pairing code, or the confirmation of a pairing.
    Pairing,
    /// The agent's `send_message` tool.
    SendMessage,
}

impl OutboxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reply => "reply",
            Self::Approval => "approval",
            Self::Pairing => "pairing",
            Self::SendMessage => "send_message",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "approval" => Self::Approval,
            "pairing" => Self::Pairing,
            "send_message" => Self::SendMessage,
            _ => Self::Reply,
        }
    }
}

/// Where an outbox row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    Queued,
    Sending,
    Sent,
    Failed,
    Dead,
}

impl OutboxStatus {
    fn parse(s: &str) -> Self {
        match s {
            "sending" => Self::Sending,
            "sent" => Self::Sent,
            "failed" => Self::Failed,
            "dead" => Self::Dead,
            _ => Self::Queued,
        }
    }
}

/// A message to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxNew {
    pub channel: String,
    pub chat: ChatRef,
    /// Plain text, at most the platform's limit (see [`Engine::enqueue_split`]).
    pub text: String,
    pub buttons: Vec<Button>,
    pub reply_to: Option<String>,
    pub kind: OutboxKind,
    /// Queued once per key per channel (a reply per run, a prompt per approval): queuing the
    /// same key again adds nothing. [`Engine::enqueue_split`] keys its parts `<key>#<n>`.
    pub dedup_key: Option<String>,
}

/// One outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub id: i64,
    pub channel: String,
    pub chat: ChatRef,
    pub text: String,
    pub buttons: Vec<Button>,
    pub reply_to: Option<String>,
    pub kind: OutboxKind,
    pub status: OutboxStatus,
    /// Attempts made (a claim counts one; a rate-limited attempt is given back).
    pub attempts: u32,
    pub next_attempt_ms: i64,
    pub platform_message_id: Option<String>,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub dedup_key: Option<String>,
    /// The text the sent message is still to be edited to (a streamed reply's final text).
    pub edit_text: Option<String>,
}

impl OutboxRow {
    /// What the adapter sends.
    pub fn message(&self) -> OutMessage {
        OutMessage {
            chat: self.chat.clone(),
            text: self.text.clone(),
            reply_to: self.reply_to.clone(),
            buttons: self.buttons.clone(),
            delivery_id: format!("chitin-{}-{}", self.channel, self.id),
        }
    }
}

/// What [`Engine::record_failure`] did with a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Queued again, due at this time (unix ms).
    Retry { at_ms: i64 },
    /// Refused by the platform, or possibly delivered: not sent again.
    Failed,
    /// Retries exhausted (or too old): a dead letter.
    Dead,
}

/// What one [`deliver_due`] step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub sent: Vec<i64>,
    /// Rows whose final edit was attempted.
    pub edited: Vec<i64>,
    pub retried: Vec<i64>,
    pub failed: Vec<i64>,
    pub dead: Vec<i64>,
}

fn buttons_json(b: &[Button]) -> String {
    Value::Array(
        b.iter()
            .map(|x| json!({"label": x.label, "data": x.data}))
            .collect(),
    )
    .to_string()
}

fn parse_buttons(s: &str) -> Vec<Button> {
    serde_json::from_str::<Vec<Value>>(s)
        .unwrap_or_default()
        .iter()
        .map(|v| Button {
            label: v
                .get("label")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            data: v
                .get("data")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        })
        .collect()
}

const COLUMNS: &str = "id, channel, chat_id, chat_kind, thread, text, buttons_json, reply_to, kind, status, attempts, next_attempt_ms, platform_message_id, last_error, created_ms, dedup_key, edit_text";

/// The rows [`Engine::due_edits`] reads: through the partial index `channel_outbox_edits`
/// (migration 25), never by reading every sent row of the channel. The casts are
/// `claim_due`'s: a bare `LIMIT ?3` makes SQLite expire the cached statement whenever a value
/// is bound, so it was prepared again at every sender step (the test below); the channel's
/// cast keeps `?1` out of planning as well.
const DUE_EDITS: &str = "FROM channel_outbox
     WHERE channel = CAST(?1 AS TEXT) AND status = 'sent' AND edit_text IS NOT NULL AND next_attempt_ms <= ?2
     ORDER BY id LIMIT CAST(?3 AS BIGINT)";

fn row(r: &chitin_store::Row) -> Result<OutboxRow, ChannelsError> {
    Ok(OutboxRow {
        id: r.get(0)?,
        channel: r.get(1)?,
        chat: ChatRef {
            id: r.get(2)?,
            kind: parse_chat_kind(&r.get::<String>(3)?),
            thread: r.get(4)?,
        },
        text: r.get(5)?,
        buttons: parse_buttons(&r.get::<String>(6)?),
        reply_to: r.get(7)?,
        kind: OutboxKind::parse(&r.get::<String>(8)?),
        status: OutboxStatus::parse(&r.get::<String>(9)?),
        attempts: u32::try_from(r.get::<i64>(10)?).unwrap_or(0),
        next_attempt_ms: r.get(11)?,
        platform_message_id: r.get(12)?,
        last_error: r.get(13)?,
        created_ms: r.get(14)?,
        dedup_key: r.get(15)?,
        edit_text: r.get(16)?,
    })
}

/// The row queued under `key` in `channel`, if any.
fn outbox_id_of(tx: &mut Conn<'_>, channel: &str, key: &str) -> Result<Option<i64>, ChannelsError> {
    Ok(tx
        .query_opt(
            "SELECT id FROM channel_outbox WHERE channel = ?1 AND dedup_key = ?2",
            params![channel, key],
        )?
        .map(|r| r.get::<i64>(0))
        .transpose()?)
}

/// The random 50-100 % share of a delay (jitter), from the OS; the full delay without
/// randomness.
fn jittered(delay_ms: i64) -> i64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return delay_ms;
    }
    let half = delay_ms / 2;
    let span = u64::try_from(delay_ms - half + 1).unwrap_or(1).max(1);
    half + i64::try_from(u64::from_le_bytes(b) % span).unwrap_or(0)
}

/// The backoff before retry number `attempt` (1-based): `base * 2^(attempt-1)`, capped.
pub fn backoff_ms(attempt: u32) -> i64 {
    let exp = attempt.saturating_sub(1).min(30);
    BACKOFF_BASE_MS
        .saturating_mul(1_i64 << exp)
        .min(BACKOFF_MAX_MS)
}

impl Engine {
    /// Queues `m` inside the caller's transaction; a row already queued under its key is
    /// returned instead. Two gateways queuing one key at once: the second waits for the first
    /// (`ON CONFLICT DO NOTHING` on the unique key) and returns its row.
    pub(super) fn enqueue_in(
        &self,
        tx: &mut Conn<'_>,
        m: &OutboxNew,
        now: i64,
    ) -> Result<i64, ChannelsError> {
        if let Some(key) = &m.dedup_key
            && let Some(id) = outbox_id_of(tx, &m.channel, key)?
        {
            return Ok(id);
        }
        let inserted = tx.query_opt(
            "INSERT INTO channel_outbox (channel, chat_id, chat_kind, thread, text, buttons_json, reply_to, kind, status,
                 attempts, next_attempt_ms, created_ms, updated_ms, dedup_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', 0, ?9, ?9, ?9, ?10)
             ON CONFLICT (channel, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING
             RETURNING id",
            params![
                m.channel,
                m.chat.id,
                chat_kind_str(m.chat.kind),
                m.chat.thread,
                m.text,
                buttons_json(&m.buttons),
                m.reply_to,
                m.kind.as_str(),
                now,
                m.dedup_key,
            ],
        )?;
        match (inserted, &m.dedup_key) {
            (Some(r), _) => Ok(r.get(0)?),
            (None, Some(key)) => outbox_id_of(tx, &m.channel, key)?.ok_or_else(|| {
                ChannelsError::Db(chitin_store::Error::Internal(
                    "an outbox row queued under a key by another gateway cannot be read back"
                        .into(),
                ))
            }),
            (None, None) => Err(ChannelsError::Db(chitin_store::Error::NoRow)),
        }
    }

    /// Queues one message (due now). Returns its row id.
    pub fn enqueue(&self, m: &OutboxNew) -> Result<i64, ChannelsError> {
        self.settings(&m.channel)?;
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| self.enqueue_in(tx, m, now))
    }

    /// Queues a long text as several messages of at most `max_chars` UTF-16 code units each
    /// (`chitin_channels::text::split`), split on paragraph, line and word boundaries (buttons go with the last part), in one transaction;
    /// they are sent in order. Returns the row ids.
    pub fn enqueue_split(
        &self,
        m: &OutboxNew,
        max_chars: usize,
    ) -> Result<Vec<i64>, ChannelsError> {
        self.settings(&m.channel)?;
        // Telegram's unit (UTF-16 code units); whitespace-only pieces are not messages.
        let parts: Vec<String> = chitin_channels::text::split(&m.text, max_chars)
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .collect();
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            let mut ids = Vec::with_capacity(parts.len());
            let last = parts.len().saturating_sub(1);
            for (i, part) in parts.into_iter().enumerate() {
                let piece = OutboxNew {
                    text: part,
                    buttons: if i == last {
                        m.buttons.clone()
                    } else {
                        Vec::new()
                    },
                    reply_to: if i == 0 { m.reply_to.clone() } else { None },
                    dedup_key: m.dedup_key.as_ref().map(|k| format!("{k}#{i}")),
                    ..m.clone()
                };
                ids.push(self.enqueue_in(tx, &piece, now)?);
            }
            Ok(ids)
        })
    }

    /// One outbox row.
    pub fn outbox_row(&self, id: i64) -> Result<Option<OutboxRow>, ChannelsError> {
        self.store.db().with(|c| {
            c.query_opt(
                &format!("SELECT {COLUMNS} FROM channel_outbox WHERE id = ?1"),
                params![id],
            )?
            .map(|r| row(&r))
            .transpose()
        })
    }

    /// The outbox rows of a channel, oldest first.
    pub fn outbox(&self, channel: &str) -> Result<Vec<OutboxRow>, ChannelsError> {
        self.store.db().with(|c| {
            c.query_map(
                &format!("SELECT {COLUMNS} FROM channel_outbox WHERE channel = ?1 ORDER BY id"),
                params![channel],
                row,
            )
        })
    }

    /// Claims up to `limit` rows of `channel` that are due at `now_ms`, `queued -> sending`
    /// in one statement (a row is claimed by one sender only), counting one attempt each. Per
    /// chat only the oldest unsent row is claimable, so a chat's messages go out in order.
    ///
    /// On PostgreSQL, where several gateways deliver from one outbox, the candidate rows are
    /// locked `FOR UPDATE SKIP LOCKED`: a row another sender is claiming is skipped (not
    /// waited for), and the claim re-checks `status = 'queued'` on the row it locked.
    pub fn claim_due(
        &self,
        channel: &str,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<OutboxRow>, ChannelsError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // The casts keep SQLite from planning around the bound channel and limit, which made
        // it re-prepare this cached statement on every poll (see `Transcripts::rows_after`).
        let candidates = "SELECT o.id FROM channel_outbox o
               WHERE o.channel = CAST(?1 AS TEXT) AND o.status = 'queued' AND o.next_attempt_ms <= ?2
                 AND NOT EXISTS (SELECT 1 FROM channel_outbox p
                                 WHERE p.channel = o.channel AND p.chat_id = o.chat_id AND p.id < o.id
                                   AND p.status IN ('queued', 'sending'))
               ORDER BY o.id LIMIT CAST(?3 AS BIGINT)";
        let mut rows: Vec<OutboxRow> = self.store.db().with(|c| {
            let sql = match c.dialect() {
                Dialect::Sqlite => format!(
                    "UPDATE channel_outbox SET status = 'sending', attempts = attempts + 1, updated_ms = ?2
                     WHERE id IN ({candidates})
                     AND status = 'queued'
                     RETURNING {COLUMNS}"
                ),
                // The candidates are chosen (and locked) once, in a materialized CTE.
                Dialect::Postgres => format!(
                    "WITH claim AS MATERIALIZED ({candidates} FOR UPDATE OF o SKIP LOCKED)
                     UPDATE channel_outbox SET status = 'sending', attempts = attempts + 1, updated_ms = ?2
                     WHERE id IN (SELECT id FROM claim)
                     AND status = 'queued'
                     RETURNING {COLUMNS}"
                ),
            };
            c.query_map(&sql, params![channel, now_ms, limit], row)
        })?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    /// Records a successful send: `sending -> sent` with the platform's message id. A row
    /// that is not `sending` (recovered at start, resolved elsewhere) is not touched.
    pub fn record_sent(&self, id: i64, platform_message_id: &str) -> Result<(), ChannelsError> {
        let now = self.clock.now_ms();
        let n = self.store.db().with(|c| {
            c.execute(
                "UPDATE channel_outbox SET status = 'sent', platform_message_id = ?2, last_error = NULL, updated_ms = ?3
                 WHERE id = ?1 AND status = 'sending'",
                params![id, platform_message_id, now],
            )
        })?;
        if n == 1 {
            Ok(())
        } else {
            Err(ChannelsError::NotSending(id))
        }
    }

    /// Records a failed send and decides what happens next:
    /// - `RateLimited { retry_after }`: queued again exactly `retry_after` later; the attempt
    ///   is given back (the platform said when);
    /// - `Transient` that did not reach the platform: queued again after exponential backoff
    ///   with jitter (`1 s * 2^(n-1)`, capped at 5 min, 50-100 %), until
    ///   `max_send_attempts` attempts were made, then a dead letter;
    /// - `Transient` that may have reached it (`maybe_delivered`): `failed`, "may have been
    ///   delivered", not sent again (never silently twice);
    /// - `Permanent`: `failed`.
    ///
    /// A row older than [`MAX_OUTBOX_AGE_MS`] becomes a dead letter at any failure. Failed and
    /// dead rows are audited and counted.
    pub fn record_failure(
        &self,
        id: i64,
        err: &SendError,
    ) -> Result<FailureOutcome, ChannelsError> {
        let now = self.clock.now_ms();
        let Some(r) = self.outbox_row(id)? else {
            return Err(ChannelsError::NotSending(id));
        };
        if r.status != OutboxStatus::Sending {
            return Err(ChannelsError::NotSending(id));
        }
        let max = self
            .channels
            .get(&r.channel)
            .map_or(super::DEFAULT_MAX_SEND_ATTEMPTS, |c| c.max_send_attempts);
        let too_old = now.saturating_sub(r.created_ms) > MAX_OUTBOX_AGE_MS;
        let message = err.to_string();
        let (outcome, attempts, why) = match err {
            _ if too_old => (FailureOutcome::Dead, r.attempts, "too old"),
            SendError::RateLimited { retry_after } => {
                let wait = i64::try_from(retry_after.as_millis()).unwrap_or(i64::MAX);
                (
                    FailureOutcome::Retry {
                        at_ms: now.saturating_add(wait),
                    },
                    r.attempts.saturating_sub(1),
                    "rate limited",
                )
            }
            SendError::Transient {
                maybe_delivered: true,
                ..
            } => (
                FailureOutcome::Failed,
                r.attempts,
                "may have been delivered",
            ),
            SendError::Transient { .. } if r.attempts >= max => {
                (FailureOutcome::Dead, r.attempts, "retries exhausted")
            }
            SendError::Transient { .. } => (
                FailureOutcome::Retry {
                    at_ms: now.saturating_add(jittered(backoff_ms(r.attempts))),
                },
                r.attempts,
                "transient",
            ),
            SendError::Permanent(_) => (FailureOutcome::Failed, r.attempts, "refused"),
        };
        let (status, next) = match &outcome {
            FailureOutcome::Retry { at_ms } => ("queued", *at_ms),
            FailureOutcome::Failed => ("failed", r.next_attempt_ms),
            FailureOutcome::Dead => ("dead", r.next_attempt_ms),
        };
        let last_error = if why == "may have been delivered" {
            format!("may have been delivered, not sent again: {message}")
        } else if matches!(outcome, FailureOutcome::Dead) {
            format!("{why} after {attempts} attempts: {message}")
        } else {
            message
        };
        let last_error = self.gate.redact(&last_error);
        self.store.db().tx(|tx| {
            let n = tx.execute(
                "UPDATE channel_outbox SET status = ?2, attempts = ?3, next_attempt_ms = ?4, last_error = ?5, updated_ms = ?6
                 WHERE id = ?1 AND status = 'sending'",
                params![id, status, i64::from(attempts), next, last_error, now],
            )?;
            if n != 1 {
                return Err(ChannelsError::NotSending(id));
            }
            if !matches!(outcome, FailureOutcome::Retry { .. }) {
                self.audit_undelivered(&r, status, &last_error)?;
                self.requeue_final_text(tx, &r, now)?;
            }
            Ok(())
        })?;
        match outcome {
            FailureOutcome::Dead => {
                self.counters.dead.fetch_add(1, Ordering::Relaxed);
            }
            FailureOutcome::Failed if why == "may have been delivered" => {
                self.counters
                    .maybe_delivered
                    .fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Ok(outcome)
    }

    fn audit_undelivered(
        &self,
        r: &OutboxRow,
        status: &str,
        why: &str,
    ) -> Result<(), ChannelsError> {
        self.audit(
            RecordInput::new(
                Kind::Message,
                "gateway",
                "message.send",
                format!("channel:{}", r.channel),
            )
            .with_outcome(status.to_string())
            .with_payload(json!({
                "outbox_id": r.id, "kind": r.kind.as_str(), "chat": r.chat.id,
                "attempts": r.attempts, "error": why, "chars": r.text.chars().count(),
            })),
        )
    }

    /// Makes `reply` (keyed `reply:<run>` by the caller) the final answer of a streamed
    /// reply whose draft row is keyed `draft_key` (if any), idempotently, in one transaction:
    /// - when `<key>#0` is queued already, nothing changes (it was finalized before);
    /// - the draft still queued takes the first part as its text; a draft being sent or sent
    ///   keeps its message and gets the first part as `edit_text` (the sender edits it);
    ///   a draft that failed, or none, means the first part is queued as a new message;
    /// - the other parts are queued after it. Returns the rows of the answer, in order.
    pub fn finalize_reply(
        &self,
        draft_key: Option<&str>,
        reply: &OutboxNew,
        max_chars: usize,
    ) -> Result<Vec<i64>, ChannelsError> {
        self.settings(&reply.channel)?;
        let Some(key) = reply.dedup_key.clone() else {
            return self.enqueue_split(reply, max_chars);
        };
        let parts: Vec<String> = chitin_channels::text::split(&reply.text, max_chars)
            .into_iter()
            .filter(|p| !p.trim().is_empty())
            .collect();
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            let first_key = format!("{key}#0");
            let done = tx.query_opt(
                "SELECT id FROM channel_outbox WHERE channel = ?1 AND dedup_key = ?2",
                params![reply.channel, first_key],
            )?;
            if done.is_some() {
                // The parts `<key>#<n>`: a prefix compared exactly (no LIKE: SQLite's ignores
                // case, PostgreSQL's does not).
                let prefix = format!("{key}#");
                let len = i64::try_from(prefix.chars().count()).unwrap_or(i64::MAX);
                return tx.query_map(
                    "SELECT id FROM channel_outbox WHERE channel = ?1 AND substr(dedup_key, 1, CAST(?3 AS INTEGER)) = ?2 ORDER BY id",
                    params![reply.channel, prefix, len],
                    |r| Ok::<_, ChannelsError>(r.get::<i64>(0)?),
                );
            }
            let draft_status: Option<(i64, String)> = match draft_key {
                Some(k) => tx
                    .query_opt(
                        "SELECT id, status FROM channel_outbox WHERE channel = ?1 AND dedup_key = ?2",
                        params![reply.channel, k],
                    )?
                    .map(|r| Ok::<_, ChannelsError>((r.get(0)?, r.get(1)?)))
                    .transpose()?,
                None => None,
            };
            let mut ids = Vec::with_capacity(parts.len());
            for (i, part) in parts.into_iter().enumerate() {
                let part_key = format!("{key}#{i}");
                if i == 0
                    && let Some((id, status)) = &draft_status
                {
                    let sql = match status.as_str() {
                        "queued" => Some(
                            "UPDATE channel_outbox SET text = ?2, dedup_key = ?3, updated_ms = ?4 WHERE id = ?1",
                        ),
                        "sending" | "sent" => Some(
                            "UPDATE channel_outbox SET edit_text = ?2, dedup_key = ?3, updated_ms = ?4 WHERE id = ?1",
                        ),
                        _ => None,
                    };
                    if let Some(sql) = sql {
                        tx.execute(sql, params![id, part, part_key, now])?;
                        ids.push(*id);
                        continue;
                    }
                }
                let piece = OutboxNew {
                    text: part,
                    reply_to: if i == 0 { reply.reply_to.clone() } else { None },
                    dedup_key: Some(part_key),
                    ..reply.clone()
                };
                ids.push(self.enqueue_in(tx, &piece, now)?);
            }
            Ok(ids)
        })
    }

    /// A row that will not be sent (failed, dead) or whose final edit cannot be made, but
    /// carries a streamed reply's final text (`edit_text`): that text is queued as a new
    /// message under the row's key (the row gives it up), so the answer is not lost.
    fn requeue_final_text(
        &self,
        tx: &mut Conn<'_>,
        r: &OutboxRow,
        now: i64,
    ) -> Result<(), ChannelsError> {
        let Some(text) = &r.edit_text else {
            return Ok(());
        };
        tx.execute(
            "UPDATE channel_outbox SET dedup_key = NULL, edit_text = NULL, updated_ms = ?2 WHERE id = ?1",
            params![r.id, now],
        )?;
        let m = OutboxNew {
            channel: r.channel.clone(),
            chat: r.chat.clone(),
            text: text.clone(),
            buttons: r.buttons.clone(),
            reply_to: r.reply_to.clone(),
            kind: r.kind,
            dedup_key: r.dedup_key.clone(),
        };
        self.enqueue_in(tx, &m, now)?;
        Ok(())
    }

    /// Sent rows of `channel` whose message is still to be edited to its `edit_text`.
    pub fn due_edits(&self, channel: &str, limit: usize) -> Result<Vec<OutboxRow>, ChannelsError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            c.query_map(
                &format!("SELECT {COLUMNS} {DUE_EDITS}"),
                params![channel, now, limit],
                row,
            )
        })
    }

    /// Records the outcome of a final edit: done (the row's text becomes the edited text),
    /// retried later (rate limit, transient; up to `max_send_attempts`), or given up and the
    /// text queued as a new message instead (refused, e.g. the message was deleted).
    pub fn record_edit(
        &self,
        id: i64,
        result: Result<(), &SendError>,
    ) -> Result<(), ChannelsError> {
        let now = self.clock.now_ms();
        let Some(r) = self.outbox_row(id)? else {
            return Ok(());
        };
        let Some(text) = r.edit_text.clone() else {
            return Ok(());
        };
        let max = self
            .channels
            .get(&r.channel)
            .map_or(super::DEFAULT_MAX_SEND_ATTEMPTS, |c| c.max_send_attempts);
        self.store.db().tx(|tx| {
            match result {
                Ok(()) => {
                    tx.execute(
                        "UPDATE channel_outbox SET text = ?2, edit_text = NULL, last_error = NULL, updated_ms = ?3
                         WHERE id = ?1 AND edit_text = ?2",
                        params![id, text, now],
                    )?;
                }
                Err(SendError::RateLimited { retry_after }) => {
                    let wait = i64::try_from(retry_after.as_millis()).unwrap_or(i64::MAX);
                    tx.execute(
                        "UPDATE channel_outbox SET next_attempt_ms = ?2, updated_ms = ?3 WHERE id = ?1",
                        params![id, now.saturating_add(wait), now],
                    )?;
                }
                Err(e @ SendError::Transient { .. }) if r.attempts < max.saturating_add(1) => {
                    let attempts = r.attempts.saturating_add(1);
                    tx.execute(
                        "UPDATE channel_outbox SET attempts = ?2, next_attempt_ms = ?3, last_error = ?4, updated_ms = ?5 WHERE id = ?1",
                        params![
                            id,
                            i64::from(attempts),
                            now.saturating_add(jittered(backoff_ms(attempts))),
                            self.gate.redact(&format!("final edit: {e}")),
                            now
                        ],
                    )?;
                }
                Err(e) => {
                    tx.execute(
                        "UPDATE channel_outbox SET last_error = ?2 WHERE id = ?1",
                        params![
                            id,
                            self.gate
                                .redact(&format!("final edit failed, sent as a new message: {e}"))
                        ],
                    )?;
                    self.requeue_final_text(tx, &r, now)?;
                }
            }
            Ok(())
        })
    }

    /// Records what the platform reported of a sent message on its outbox row (inside the
    /// ingress transaction): `delivered`/`read`/`sent` as `platform_status`; `failed` makes the
    /// row a dead letter with the platform's reason, audited and counted (it is not sent
    /// again: WhatsApp refuses free-form messages outside its 24-hour window, and a template is
    /// the operator's decision). Reports of unknown ids are ignored.
    pub(super) fn record_platform_status(
        &self,
        tx: &mut Conn<'_>,
        channel: &str,
        report: &chitin_channels::DeliveryReport,
        now: i64,
    ) -> Result<(), ChannelsError> {
        use chitin_channels::DeliveryState;
        let row: Option<OutboxRow> = tx
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM channel_outbox WHERE channel = ?1 AND platform_message_id = ?2 ORDER BY id DESC LIMIT 1"
                ),
                params![channel, report.message_id],
            )?
            .map(|r| row(&r))
            .transpose()?;
        let Some(r) = row else {
            return Ok(());
        };
        match &report.state {
            DeliveryState::Failed(why) => {
                let why = self
                    .gate
                    .redact(&format!("the platform reported it undelivered: {why}"));
                let n = tx.execute(
                    "UPDATE channel_outbox SET status = 'dead', platform_status = 'failed', last_error = ?2, updated_ms = ?3
                     WHERE id = ?1 AND status = 'sent'",
                    params![r.id, why, now],
                )?;
                if n == 1 {
                    self.audit_undelivered(&r, "dead", &why)?;
                    self.counters.undelivered.fetch_add(1, Ordering::Relaxed);
                    self.counters.dead.fetch_add(1, Ordering::Relaxed);
                }
            }
            state => {
                let s = match state {
                    DeliveryState::Sent => "sent",
                    DeliveryState::Delivered => "delivered",
                    _ => "read",
                };
                // A later report never goes back (read, then a late "delivered").
                tx.execute(
                    "UPDATE channel_outbox SET platform_status = ?2, updated_ms = ?3
                     WHERE id = ?1 AND COALESCE(platform_status, '') NOT IN ('read', 'failed')
                       AND NOT (?2 = 'sent' AND platform_status = 'delivered')",
                    params![r.id, s, now],
                )?;
            }
        }
        Ok(())
    }

    /// At start, before any sender runs: every row left `sending` by the previous process was
    /// being sent when it stopped, and the platform may have received it. Such rows are marked
    /// `failed` ("may have been delivered"), audited and counted, and never re-sent
    /// automatically. Returns their ids.
    ///
    /// On PostgreSQL other gateways may be sending at this moment: only claims older than
    /// [`SEND_CLAIM_TTL_MS`] (their sender died) are recovered, here and at every
    /// [`deliver_due`] step ([`Engine::recover_expired_claims`]).
    pub fn recover_interrupted_sends(&self) -> Result<Vec<i64>, ChannelsError> {
        self.recover_interrupted_sends_except(&[])
    }

    /// [`Self::recover_interrupted_sends`], except that the rows of `idempotent` channels
    /// (whose platform deduplicates a resend by the row's delivery id, e.g. Matrix `txnId`)
    /// are queued again: resending them cannot post twice. Returns the ids marked failed.
    pub fn recover_interrupted_sends_except(
        &self,
        idempotent: &[String],
    ) -> Result<Vec<i64>, ChannelsError> {
        let now = self.clock.now_ms();
        // SQLite: one gateway owns `state.db` (the gateway lock), so every `sending` row is
        // its predecessor's. PostgreSQL: only a claim that expired is a dead sender's.
        let claimed_before = match self.store.db().dialect() {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(now.saturating_sub(SEND_CLAIM_TTL_MS)),
        };
        self.recover_sends(None, idempotent, claimed_before, now)
    }

    /// The rows of `channel` claimed `sending` more than [`SEND_CLAIM_TTL_MS`] ago, by a
    /// sender that died (another gateway on the same PostgreSQL database, or this one hung):
    /// recovered by the rule of [`Self::recover_interrupted_sends`] (queued again only when
    /// the platform's sends are `idempotent`). Returns the ids marked failed.
    pub fn recover_expired_claims(
        &self,
        channel: &str,
        idempotent: bool,
    ) -> Result<Vec<i64>, ChannelsError> {
        let now = self.clock.now_ms();
        let idempotent = if idempotent {
            vec![channel.to_string()]
        } else {
            Vec::new()
        };
        self.recover_sends(
            Some(channel),
            &idempotent,
            Some(now.saturating_sub(SEND_CLAIM_TTL_MS)),
            now,
        )
    }

    /// Recovers the `sending` rows (of `channel`, or all; claimed at or before
    /// `claimed_before`, or any) in one transaction. A row another gateway recovers or
    /// finishes at the same time is left to it (each change is conditional on the row still
    /// being the claim that was read), so it is audited and counted once.
    fn recover_sends(
        &self,
        channel: Option<&str>,
        idempotent: &[String],
        claimed_before: Option<i64>,
        now: i64,
    ) -> Result<Vec<i64>, ChannelsError> {
        let why = if claimed_before.is_some() {
            "interrupted while sending (its sender stopped and its claim expired): may have been delivered, not sent again"
        } else {
            "interrupted while sending (the gateway stopped): may have been delivered, not sent again"
        };
        let failed = self.store.db().tx(|tx| {
            let rows = tx.query_map(
                &format!(
                    "SELECT {COLUMNS} FROM channel_outbox
                     WHERE status = 'sending' AND (?1 IS NULL OR channel = ?1) AND (?2 IS NULL OR updated_ms <= ?2)
                     ORDER BY id"
                ),
                params![channel, claimed_before],
                row,
            )?;
            let (resend, rows): (Vec<OutboxRow>, Vec<OutboxRow>) = rows
                .into_iter()
                .partition(|r| idempotent.contains(&r.channel));
            for r in &resend {
                tx.execute(
                    "UPDATE channel_outbox SET status = 'queued', next_attempt_ms = ?2, updated_ms = ?2
                     WHERE id = ?1 AND status = 'sending' AND (?3 IS NULL OR updated_ms <= ?3)",
                    params![r.id, now, claimed_before],
                )?;
            }
            let mut failed = Vec::with_capacity(rows.len());
            for r in &rows {
                let n = tx.execute(
                    "UPDATE channel_outbox SET status = 'failed', last_error = ?2, updated_ms = ?3
                     WHERE id = ?1 AND status = 'sending' AND (?4 IS NULL OR updated_ms <= ?4)",
                    params![r.id, why, now, claimed_before],
                )?;
                if n == 1 {
                    self.audit_undelivered(r, "failed", why)?;
                    self.requeue_final_text(tx, r, now)?;
                    failed.push(r.id);
                }
            }
            Ok::<_, ChannelsError>(failed)
        })?;
        self.counters
            .maybe_delivered
            .fetch_add(u64::try_from(failed.len()).unwrap_or(0), Ordering::Relaxed);
        Ok(failed)
    }
}

/// One sender step for `channel`: claims the due rows, sends each through `platform` and
/// records the outcome. Call it whenever a row was queued or the earliest `next_attempt_ms`
/// has come.
pub async fn deliver_due(
    engine: &Engine,
    channel: &str,
    platform: &dyn Platform,
    limit: usize,
) -> Result<DeliveryReport, ChannelsError> {
    let mut report = DeliveryReport::default();
    // Several gateways deliver from one PostgreSQL outbox: a claim whose sender died is
    // recovered by whichever delivers next (never re-sent unless the platform deduplicates).
    if engine.store.db().dialect() == Dialect::Postgres {
        report.failed = engine.recover_expired_claims(channel, platform.sends_are_idempotent())?;
    }
    let rows = engine.claim_due(channel, engine.now_ms(), limit)?;
    for r in rows {
        // One trace per delivery attempt (the turn that queued it may be long over).
        let span = tracing::info_span!(
            parent: None,
            "outbox.deliver",
            otel.kind = "producer",
            chitin.channel = channel,
            chitin.outbox_id = r.id,
            chitin.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let sent = platform.send(&r.message()).instrument(span.clone()).await;
        span.record(
            "chitin.outcome",
            if sent.is_ok() { "sent" } else { "failed" },
        );
        if sent.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        drop(span);
        match sent {
            Ok(sent) => {
                engine.record_sent(r.id, &sent.message_id)?;
                report.sent.push(r.id);
            }
            // A platform that deduplicates resends by delivery id: an answer lost in transit
            // is retried like any transient failure.
            Err(SendError::Transient {
                message,
                maybe_delivered: true,
            }) if platform.sends_are_idempotent() => match engine.record_failure(
                r.id,
                &SendError::Transient {
                    message,
                    maybe_delivered: false,
                },
            )? {
                FailureOutcome::Retry { .. } => report.retried.push(r.id),
                FailureOutcome::Failed => report.failed.push(r.id),
                FailureOutcome::Dead => report.dead.push(r.id),
            },
            Err(e) => match engine.record_failure(r.id, &e)? {
                FailureOutcome::Retry { .. } => report.retried.push(r.id),
                FailureOutcome::Failed => report.failed.push(r.id),
                FailureOutcome::Dead => report.dead.push(r.id),
            },
        }
    }
    // Final edits of streamed replies (idempotent: the same text again changes nothing).
    for r in engine.due_edits(channel, limit)? {
        let (Some(message_id), Some(text)) = (&r.platform_message_id, &r.edit_text) else {
            continue;
        };
        let buttons = (!r.buttons.is_empty()).then_some(r.buttons.as_slice());
        let result = platform.edit(&r.chat, message_id, text, buttons).await;
        engine.record_edit(r.id, result.as_ref().map(|_| ()))?;
        report.edited.push(r.id);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn due_edits_are_read_through_their_index_not_by_reading_every_sent_row() {
        let dir = tempfile::tempdir().unwrap();
        let db = chitin_store::Db::sqlite(&dir.path().join("state.db")).unwrap();
        let plan: Vec<String> = db
            .with(|c| {
                c.query_map(
                    &format!("EXPLAIN QUERY PLAN SELECT {COLUMNS} {DUE_EDITS}"),
                    params!["tg", 0_i64, 16_i64],
                    |r| r.get::<String>(3),
                )
            })
            .unwrap();
        assert_eq!(
            plan.first().map(String::as_str),
            Some(
                "SEARCH channel_outbox USING INDEX channel_outbox_edits (channel=? AND status=? AND next_attempt_ms<?)"
            ),
            "{plan:?}"
        );
        // Run as the sender runs it (another channel, another time, the same limit): SQLite
        // keeps the prepared statement instead of preparing it again for each new value.
        let c = db.sqlite_connection().unwrap().unwrap();
        let mut st = c.prepare(&format!("SELECT {COLUMNS} {DUE_EDITS}")).unwrap();
        for (channel, now) in [("tg", 1_i64), ("slack", 2), ("tg", 3), ("discord", 4)] {
            st.query(rusqlite::params![channel, now, 16_i64])
                .unwrap()
                .next()
                .unwrap();
        }
        assert_eq!(
            st.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "the statement was prepared again for a new bound value"
        );
    }
}
