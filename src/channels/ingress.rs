//! Durable ingress and admission: events and cursor in one transaction, each new message
//! decided by Cedar `message.receive` before it is stored.

use std::sync::atomic::Ordering;

use chitin_channels::{Event, Inbound, Message, Polled};
use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::{Value, json};

use super::{
    ChannelSettings, ChannelsError, Engine, chat_kind_str, conversation_id, conversation_uid,
    identity_id, identity_uid, parse_chat_kind, session_key,
};
use crate::gate::Verdict;
use crate::policy::PolicyRequest;

/// The longest button data kept (the platform limits it further; Telegram: 64 bytes).
const MAX_BUTTON_DATA: usize = 256;

/// Why a message was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// Cedar denied it; the determining policies.
    Policy(Vec<String>),
    /// Cedar admitted it, but the identity is in no `User`, so a turn would have no principal.
    NoUser,
    /// Unpaired in a DM, but this identity already got a code within the hour.
    PairingAlreadySent,
    /// Unpaired in a DM, but [`super::MAX_PENDING_PAIRINGS`] codes are open.
    PairingListFull,
}

/// The engine's answer for one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The message goes to the agent: `user` is the principal of the turn, `session` the
    /// conversation's session key.
    Admitted { user: String, session: String },
    /// Not admitted; nothing reaches the model.
    Denied(DenyReason),
    /// Not admitted; an unpaired identity in a DM got a pairing code (one outbox row).
    PairingCodeSent { outbox_id: i64 },
}

impl Admission {
    fn status(&self) -> &'static str {
        match self {
            Self::Admitted { .. } => "admitted",
            Self::Denied(_) => "denied",
            Self::PairingCodeSent { .. } => "pairing",
        }
    }
}

/// An admitted message, stored and waiting for (or in) its turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedEvent {
    /// The row in `channel_events` ([`Engine::mark_done`] after the turn).
    pub row_id: i64,
    pub event_id: String,
    pub user: String,
    pub session: String,
    pub message: Message,
}

/// What [`Engine::commit_polled`] stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Committed {
    /// New events stored (any outcome).
    pub stored: usize,
    /// Redelivered events dropped.
    pub duplicates: usize,
    /// The admitted messages among them, in order.
    pub admitted: Vec<AdmittedEvent>,
    /// Button presses (and reactions) stored, to be decided.
    pub presses: usize,
    /// The outcome of every new message, by event id, in order.
    pub admissions: Vec<(String, Admission)>,
    /// Invitations whose inviter Cedar admitted: the conversations to join, in order.
    pub invites: Vec<AdmittedInvite>,
}

/// An invitation of the bot into a conversation that Cedar admitted (join it, then
/// [`Engine::mark_done`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmittedInvite {
    pub row_id: i64,
    pub event_id: String,
    pub chat: chitin_channels::ChatRef,
    /// The inviter's identity (`<kind>:<id>`).
    pub inviter: String,
}

/// Who a sender is to Cedar.
struct Principal {
    uid: String,
    /// The users the identity is a member of (sorted); the first is the turn's principal.
    users: Vec<String>,
    /// Entities to add for this decision (identity / conversation the stores do not define).
    extra: Vec<Value>,
}

impl Engine {
    /// The cursor to resume polling from (`None`: from the start).
    pub fn next_cursor(&self, channel: &str) -> Result<Option<String>, ChannelsError> {
        self.settings(channel)?;
        let conn = self.store.conn()?;
        Ok(conn
            .query_row(
                "SELECT cursor FROM channel_cursors WHERE channel = ?1",
                [channel],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Stores what one poll returned: every event not seen before (deduplicated on
    /// `(channel, event_id)`), each message decided by Cedar, and the new cursor, all in one
    /// transaction. Only after this returns may the platform be told (the next poll with the
    /// new cursor; a webhook's 200). On any error nothing is stored and the cursor is
    /// unchanged, so the platform redelivers.
    pub fn commit_polled(
        &self,
        channel: &str,
        polled: &Polled,
    ) -> Result<Committed, ChannelsError> {
        self.commit_events(channel, &polled.events, polled.cursor.as_deref())
    }

    /// [`Engine::commit_polled`] for a webhook request's events (no cursor).
    pub fn commit_events(
        &self,
        channel: &str,
        events: &[Inbound],
        cursor: Option<&str>,
    ) -> Result<Committed, ChannelsError> {
        let ch = self.settings(channel)?.clone();
        let now = self.clock.now_ms();
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        let mut out = Committed::default();
        for ev in events {
            let seen: Option<i64> = tx
                .prepare_cached(
                    "SELECT id FROM channel_events WHERE channel = ?1 AND event_id = ?2",
                )?
                .query_row(params![channel, ev.event_id], |r| r.get(0))
                .optional()?;
            if seen.is_some() {
                out.duplicates += 1;
                continue;
            }
            self.store_event(&tx, &ch, ev, now, &mut out)?;
            out.stored += 1;
        }
        if let Some(c) = cursor {
            tx.execute(
                "INSERT INTO channel_cursors (channel, cursor, updated_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(channel) DO UPDATE SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
                params![channel, c, now],
            )?;
        }
        tx.commit()?;
        let c = &self.counters;
        c.duplicates.fetch_add(
            u64::try_from(out.duplicates).unwrap_or(0),
            Ordering::Relaxed,
        );
        for (_, a) in &out.admissions {
            match a {
                super::Admission::Admitted { .. } => {}
                super::Admission::PairingCodeSent { .. } => {
                    c.denied.fetch_add(1, Ordering::Relaxed);
                    c.pairing_codes.fetch_add(1, Ordering::Relaxed);
                }
                super::Admission::Denied(_) => {
                    c.denied.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(out)
    }

    fn store_event(
        &self,
        tx: &Transaction<'_>,
        ch: &ChannelSettings,
        ev: &Inbound,
        now: i64,
        out: &mut Committed,
    ) -> Result<(), ChannelsError> {
        let insert = "INSERT INTO channel_events (channel, event_id, received_ms, event_kind, chat_id, chat_kind, thread,
                          sender_id, message_id, status, subject, text, callback_id, button_data, updated_ms)
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?3)";
        match &ev.event {
            Event::Message(m) => {
                let admission = self.admit_in(tx, ch, m, now)?;
                let (subject, text) = match &admission {
                    Admission::Admitted { user, .. } => {
                        let subject = super::user_uid(user);
                        let sealed = self
                            .sealer
                            .seal(&subject, m.text.as_bytes())
                            .map_err(ChannelsError::Seal)?;
                        (Some(subject), Some(sealed))
                    }
                    _ => (None, None),
                };
                // A group message that is not admitted is not stored: only the dedup key
                // `(channel, event_id)` is kept, so a webhook redelivery of the same update is
                // still recognized. No chat, sender or message id, no text (the audit record of
                // the Cedar decision is the only trace of who wrote where).
                let keep_ids = matches!(admission, Admission::Admitted { .. })
                    || m.chat.kind != chitin_channels::ChatKind::Group;
                let ids = |v: &str| keep_ids.then(|| v.to_owned());
                let thread = if keep_ids {
                    m.chat.thread.clone()
                } else {
                    None
                };
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "message",
                    ids(&m.chat.id),
                    keep_ids.then(|| chat_kind_str(m.chat.kind)),
                    thread,
                    ids(&m.sender.id),
                    ids(&m.message_id),
                    admission.status(),
                    subject,
                    text,
                    Option::<String>::None,
                    Option::<String>::None,
                ])?;
                if let Admission::Admitted { user, session } = &admission {
                    let row_id = tx.last_insert_rowid();
                    if !m.attachments.is_empty() {
                        let subject = super::user_uid(user);
                        let sealed = self
                            .sealer
                            .seal(&subject, attachments_json(&m.attachments).as_bytes())
                            .map_err(ChannelsError::Seal)?;
                        tx.prepare_cached(
                            "UPDATE channel_events SET attachments = ?2 WHERE id = ?1",
                        )?
                        .execute(params![row_id, sealed])?;
                    }
                    out.admitted.push(AdmittedEvent {
                        row_id,
                        event_id: ev.event_id.clone(),
                        user: user.clone(),
                        session: session.clone(),
                        message: m.clone(),
                    });
                }
                out.admissions.push((ev.event_id.clone(), admission));
            }
            Event::Edited(m) => {
                // An edit is not a new turn: recorded (for deduplication), never stored with text.
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "edited",
                    m.chat.id,
                    chat_kind_str(m.chat.kind),
                    m.chat.thread,
                    m.sender.id,
                    m.message_id,
                    "ignored",
                    Option::<String>::None,
                    Option::<Vec<u8>>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                ])?;
            }
            Event::Button(b) => {
                // Decided by the approval flow (whose identity may press it), not here.
                let mut data = b.data.clone();
                if data.len() > MAX_BUTTON_DATA {
                    let mut cut = MAX_BUTTON_DATA;
                    while !data.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    data.truncate(cut);
                }
                out.presses += 1;
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "button",
                    b.chat.id,
                    chat_kind_str(b.chat.kind),
                    b.chat.thread,
                    b.sender.id,
                    b.message_id,
                    "new",
                    Option::<String>::None,
                    Option::<Vec<u8>>::None,
                    b.callback_id,
                    data,
                ])?;
            }
            Event::Invited { chat, sender } => {
                // Decided like a message addressed to the bot, without a pairing offer (the
                // bot cannot write into a conversation it has not joined).
                let probe = Message {
                    chat: chat.clone(),
                    message_id: String::new(),
                    sender: sender.clone(),
                    text: String::new(),
                    mentioned: true,
                    reply_to: None,
                    attachments: Vec::new(),
                };
                let admitted = matches!(
                    self.decide_in(ch, &probe)?,
                    (Verdict::Allowed(..), users) if !users.is_empty()
                );
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "invite",
                    chat.id,
                    chat_kind_str(chat.kind),
                    chat.thread,
                    sender.id,
                    Option::<String>::None,
                    if admitted { "admitted" } else { "denied" },
                    Option::<String>::None,
                    Option::<Vec<u8>>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                ])?;
                if admitted {
                    out.invites.push(AdmittedInvite {
                        row_id: tx.last_insert_rowid(),
                        event_id: ev.event_id.clone(),
                        chat: chat.clone(),
                        inviter: identity_id(&ch.kind, &sender.id),
                    });
                }
            }
            Event::Status(report) => {
                self.record_platform_status(tx, &ch.name, report, now)?;
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "ignored",
                    Option::<String>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                    report.message_id,
                    "ignored",
                    Option::<String>::None,
                    Option::<Vec<u8>>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                ])?;
            }
            Event::Ignored { .. } => {
                tx.prepare_cached(insert)?.execute(params![
                    ch.name,
                    ev.event_id,
                    now,
                    "ignored",
                    Option::<String>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                    "ignored",
                    Option::<String>::None,
                    Option::<Vec<u8>>::None,
                    Option::<String>::None,
                    Option::<String>::None,
                ])?;
            }
        }
        Ok(())
    }

    /// Decides one message of `channel` (Cedar `message.receive`, audited by the gate) and,
    /// for an unpaired identity in a DM, issues a pairing code with one outbox reply, in its
    /// own transaction. [`Engine::commit_polled`] does the same inside the commit.
    pub fn admit(&self, channel: &str, message: &Message) -> Result<Admission, ChannelsError> {
        let ch = self.settings(channel)?.clone();
        let now = self.clock.now_ms();
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        let a = self.admit_in(&tx, &ch, message, now)?;
        tx.commit()?;
        Ok(a)
    }

    /// The users `identity` (`<kind>:<id>`) is a member of, sorted; the first is the principal
    /// of its turns. Empty: not paired.
    pub fn users_of(&self, identity: &str) -> Result<Vec<String>, ChannelsError> {
        Ok(self.principal(identity, "", None)?.users)
    }

    fn principal(
        &self,
        identity: &str,
        channel: &str,
        conversation: Option<(&str, &chitin_channels::ChatRef)>,
    ) -> Result<Principal, ChannelsError> {
        let uid = identity_uid(identity);
        let parse = |s: &str| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| ChannelsError::InvalidIdentity(format!("{}: {e}", s.escape_default())))
        };
        let euid = parse(&uid)?;
        let active = self.gate.engine().active();
        let mut extra = Vec::new();
        let mut users: Vec<String> = match active.entities.ancestors(&euid) {
            Some(it) => it
                .filter(|a| a.type_name().to_string() == "Chitin::User")
                .map(|a| a.id().unescaped().to_string())
                .collect(),
            None => Vec::new(),
        };
        users.sort();
        users.dedup();
        if active.entities.get(&euid).is_none() {
            extra.push(json!({
                "uid": {"type": "Chitin::Identity", "id": identity},
                "attrs": {"channel": channel},
                "parents": [],
            }));
        }
        if let Some((kind, chat)) = conversation {
            let cuid = parse(&conversation_uid(kind, chat))?;
            if active.entities.get(&cuid).is_none() {
                extra.push(json!({
                    "uid": {"type": "Chitin::Conversation", "id": conversation_id(kind, chat)},
                    "attrs": {"channel": channel, "kind": chat.kind.as_str()},
                    "parents": [],
                }));
            }
        }
        Ok(Principal { uid, users, extra })
    }

    pub(super) fn admit_in(
        &self,
        tx: &Transaction<'_>,
        ch: &ChannelSettings,
        m: &Message,
        now: i64,
    ) -> Result<Admission, ChannelsError> {
        let identity = identity_id(&ch.kind, &m.sender.id);
        let (verdict, users) = self.decide_in(ch, m)?;
        let paired = !users.is_empty();
        match verdict {
            Verdict::Allowed(..) => match users.first() {
                Some(user) => Ok(Admission::Admitted {
                    user: user.clone(),
                    session: session_key(&ch.name, &m.chat),
                }),
                None => Ok(Admission::Denied(DenyReason::NoUser)),
            },
            other => {
                let policies = other.decision().policies.clone();
                if m.chat.kind == chitin_channels::ChatKind::Dm && !paired && !m.sender.is_bot {
                    self.offer_pairing_in(tx, ch, &identity, m, now)
                } else {
                    Ok(Admission::Denied(DenyReason::Policy(policies)))
                }
            }
        }
    }

    /// Cedar `message.receive` for `m` (recorded by the gate: principal, conversation and
    /// context, never the text), and the users its sender is paired to.
    fn decide_in(
        &self,
        ch: &ChannelSettings,
        m: &Message,
    ) -> Result<(Verdict, Vec<String>), ChannelsError> {
        let identity = identity_id(&ch.kind, &m.sender.id);
        let p = self.principal(&identity, &ch.name, Some((&ch.kind, &m.chat)))?;
        let paired = !p.users.is_empty();
        let req = PolicyRequest::from_json(&json!({
            "principal": p.uid,
            "action": "Chitin::Action::\"message.receive\"",
            "resource": conversation_uid(&ch.kind, &m.chat),
            "context": {"mentioned": m.mentioned, "paired": paired},
        }))
        .map_err(crate::gate::GateError::from)?;
        let verdict = self.gate.check_with_entities(&req, &p.extra)?;
        Ok((verdict, p.users))
    }

    /// Admitted invitations not joined yet (what a restarted gateway joins).
    pub fn invites_pending(&self, channel: &str) -> Result<Vec<AdmittedInvite>, ChannelsError> {
        let conn = self.store.conn()?;
        let mut st = conn.prepare(
            "SELECT id, event_id, chat_id, chat_kind, thread, sender_id FROM channel_events
             WHERE channel = ?1 AND status = 'admitted' AND event_kind = 'invite' ORDER BY id",
        )?;
        let kind = self
            .channels
            .get(channel)
            .map(|c| c.kind.clone())
            .unwrap_or_default();
        let rows = st
            .query_map([channel], |r| {
                let chat_kind: String = r.get(3)?;
                Ok(AdmittedInvite {
                    row_id: r.get(0)?,
                    event_id: r.get(1)?,
                    chat: chitin_channels::ChatRef {
                        id: r.get(2)?,
                        kind: parse_chat_kind(&chat_kind),
                        thread: r.get(4)?,
                    },
                    inviter: identity_id(&kind, &r.get::<_, String>(5)?),
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Admitted messages whose turn was never recorded (no run has them as origin) and that
    /// were not answered otherwise (marked done), oldest first, with their text opened: what a
    /// restarted gateway runs. A message whose turn was recorded stays `admitted`: its run is
    /// the record, so no second write is needed per message.
    pub fn admitted_pending(&self, channel: &str) -> Result<Vec<AdmittedEvent>, ChannelsError> {
        let conn = self.store.conn()?;
        let mut st = conn.prepare(
            "SELECT id, event_id, chat_id, chat_kind, thread, sender_id, message_id, subject, text, attachments
             FROM channel_events WHERE channel = ?1 AND status = 'admitted' AND event_kind = 'message'
               AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.origin = 'channel:' || channel_events.channel || ':' || channel_events.id)
             ORDER BY id",
        )?;
        type Row = (
            i64,
            String,
            String,
            String,
            Option<String>,
            String,
            String,
            String,
            Vec<u8>,
            Option<Vec<u8>>,
        );
        let rows: Vec<Row> = st
            .query_map([channel], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        drop(st);
        drop(conn);
        let mut out = Vec::with_capacity(rows.len());
        for (row_id, event_id, chat_id, kind, thread, sender, message_id, subject, sealed, files) in
            rows
        {
            let plain = self
                .sealer
                .open(&subject, &sealed)
                .map_err(ChannelsError::Seal)?;
            let text = String::from_utf8_lossy(&plain).into_owned();
            let attachments = match files {
                Some(f) => parse_attachments(
                    &self
                        .sealer
                        .open(&subject, &f)
                        .map_err(ChannelsError::Seal)?,
                ),
                None => Vec::new(),
            };
            let user = subject
                .strip_prefix("Chitin::User::")
                .and_then(|q| serde_json::from_str::<String>(q).ok())
                .unwrap_or_default();
            let chat = chitin_channels::ChatRef {
                id: chat_id,
                kind: parse_chat_kind(&kind),
                thread,
            };
            out.push(AdmittedEvent {
                row_id,
                event_id,
                user,
                session: session_key(channel, &chat),
                message: Message {
                    chat,
                    message_id,
                    sender: chitin_channels::Sender {
                        id: sender,
                        display: String::new(),
                        is_bot: false,
                    },
                    text,
                    mentioned: true,
                    reply_to: None,
                    attachments,
                },
            });
        }
        Ok(out)
    }

    /// The turns of `channel` started since `since_ms` whose reply is not queued yet (the
    /// gateway stopped while they ran, or between their end and the queuing of the reply):
    /// (run id, conversation, the message to reply to). Their reply is queued once
    /// (`reply:<run>`), whatever the order of restarts.
    pub fn turns_without_reply(
        &self,
        channel: &str,
        since_ms: i64,
    ) -> Result<Vec<(String, chitin_channels::ChatRef, Option<String>)>, ChannelsError> {
        let conn = self.store.conn()?;
        let mut st = conn.prepare(
            "SELECT r.id, e.chat_id, e.chat_kind, e.thread, e.message_id
             FROM channel_events e JOIN runs r ON r.origin = 'channel:' || e.channel || ':' || e.id
             WHERE e.channel = ?1 AND e.status IN ('admitted', 'done') AND e.received_ms >= ?2
               AND NOT EXISTS (SELECT 1 FROM channel_outbox o
                               WHERE o.channel = ?1 AND o.dedup_key = 'reply:' || r.id || '#0')
             ORDER BY e.id",
        )?;
        let rows = st
            .query_map(params![channel, since_ms], |r| {
                let kind: String = r.get(2)?;
                Ok((
                    r.get::<_, String>(0)?,
                    chitin_channels::ChatRef {
                        id: r.get(1)?,
                        kind: parse_chat_kind(&kind),
                        thread: r.get(3)?,
                    },
                    r.get::<_, Option<String>>(4)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Marks an admitted event as handled (its turn finished).
    pub fn mark_done(&self, row_id: i64) -> Result<bool, ChannelsError> {
        let now = self.clock.now_ms();
        let conn = self.store.conn()?;
        Ok(conn.execute(
            "UPDATE channel_events SET status = 'done', updated_ms = ?2 WHERE id = ?1 AND status = 'admitted'",
            params![row_id, now],
        )? == 1)
    }
}

/// The attachments of a message as stored (sealed): platform reference, name, type, size.
fn attachments_json(a: &[chitin_channels::Attachment]) -> String {
    serde_json::Value::Array(
        a.iter()
            .map(|a| {
                serde_json::json!({
                    "file_ref": a.file_ref, "name": a.name, "mime": a.mime, "size": a.size,
                })
            })
            .collect(),
    )
    .to_string()
}

fn parse_attachments(bytes: &[u8]) -> Vec<chitin_channels::Attachment> {
    let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(bytes) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|v| {
            Some(chitin_channels::Attachment {
                file_ref: v.get("file_ref")?.as_str()?.to_string(),
                name: v.get("name").and_then(|n| n.as_str()).map(str::to_string),
                mime: v.get("mime").and_then(|n| n.as_str()).map(str::to_string),
                size: v.get("size").and_then(serde_json::Value::as_u64),
            })
        })
        .collect()
}
