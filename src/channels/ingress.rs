//! Durable ingress and admission: events and cursor in one transaction, each new message
//! decided by Cedar `message.receive` before it is stored.

use std::sync::atomic::Ordering;

use chitin_channels::{Event, Inbound, Message, Polled};
use chitin_store::Conn;
use serde_json::{Value, json};

use super::{
    ChannelSettings, ChannelsError, Engine, chat_kind_str, conversation_id, identity_id,
    parse_chat_kind, session_key,
};
use crate::gate::Verdict;
use crate::policy::PolicyRequest;
use crate::store::params;

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
    /// The cursor was not moved: another gateway moved it since this one read it (it took
    /// the channel over), so this poll was stale. Its events were deduplicated as usual.
    pub stale_cursor: bool,
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
    uid: cedar_policy::EntityUid,
    /// The users the identity is a member of (sorted); the first is the turn's principal.
    users: Vec<String>,
    /// Entities to add for this decision (identity / conversation the stores do not define).
    extra: Vec<Value>,
}

impl Engine {
    /// The cursor to resume polling from (`None`: from the start).
    pub fn next_cursor(&self, channel: &str) -> Result<Option<String>, ChannelsError> {
        self.settings(channel)?;
        let cursor: Option<String> = self.store.db().with(|c| {
            c.query_opt(
                "SELECT cursor FROM channel_cursors WHERE channel = ?1",
                params![channel],
            )?
            .map(|r| r.get(0))
            .transpose()
        })?;
        self.set_known_cursor(channel, cursor.clone());
        Ok(cursor)
    }

    /// Stores what one poll returned: every event not seen before (deduplicated on
    /// `(channel, event_id)`), each message decided by Cedar, and the new cursor, all in one
    /// transaction. Only after this returns may the platform be told (the next poll with the
    /// new cursor; a webhook's 200). On any error nothing is stored and the cursor is
    /// unchanged, so the platform redelivers.
    ///
    /// Several gateways on one database (a channel handed over from one replica to another):
    /// each event is claimed by inserting its key `(channel, event_id)` first (`ON CONFLICT
    /// DO NOTHING`; a concurrent commit of the same event waits for the other and then finds
    /// it), so an event is stored and decided once; the cursor moves only from the one this
    /// engine's poll started from ([`Engine::next_cursor`] or its last commit), so a stale
    /// replica never moves it back ([`Committed::stale_cursor`]).
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
        let known = cursor.and_then(|_| self.known_cursor(channel));
        let out = self.store.db().tx(|tx| {
            let mut out = Committed::default();
            for ev in events {
                let claimed = tx.query_opt(
                    "INSERT INTO channel_events (channel, event_id, received_ms, event_kind, status, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, 'new', ?3)
                     ON CONFLICT (channel, event_id) DO NOTHING
                     RETURNING id",
                    params![channel, ev.event_id, now, event_kind(&ev.event)],
                )?;
                let Some(claimed) = claimed else {
                    out.duplicates += 1;
                    continue;
                };
                self.store_event(tx, &ch, ev, claimed.get(0)?, now, &mut out)?;
                out.stored += 1;
            }
            if let Some(c) = cursor {
                let moved = match &known {
                    // Never read by this engine: as one gateway always did.
                    None => tx.execute(
                        "INSERT INTO channel_cursors (channel, cursor, updated_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT(channel) DO UPDATE SET cursor = excluded.cursor, updated_ms = excluded.updated_ms",
                        params![channel, c, now],
                    )?,
                    Some(None) => tx.execute(
                        "INSERT INTO channel_cursors (channel, cursor, updated_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT(channel) DO NOTHING",
                        params![channel, c, now],
                    )?,
                    Some(Some(from)) => tx.execute(
                        "UPDATE channel_cursors SET cursor = ?2, updated_ms = ?3 WHERE channel = ?1 AND cursor = ?4",
                        params![channel, c, now, from],
                    )?,
                };
                out.stale_cursor = moved != 1;
            }
            Ok::<_, ChannelsError>(out)
        })?;
        if let Some(c) = cursor
            && !out.stale_cursor
        {
            self.set_known_cursor(channel, Some(c.to_string()));
        }
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

    /// Fills in the row `row_id` that [`Engine::commit_events`] claimed for `ev`.
    fn store_event(
        &self,
        tx: &mut Conn<'_>,
        ch: &ChannelSettings,
        ev: &Inbound,
        row_id: i64,
        now: i64,
        out: &mut Committed,
    ) -> Result<(), ChannelsError> {
        match &ev.event {
            Event::Message(m) => {
                let admission = self.admit_in(tx, ch, m, now)?;
                let (subject, text, files) = match &admission {
                    Admission::Admitted { user, .. } => {
                        let subject = super::user_uid(user);
                        let sealed = self
                            .sealer
                            .seal(&subject, m.text.as_bytes())
                            .map_err(ChannelsError::Seal)?;
                        let files = if m.attachments.is_empty() {
                            None
                        } else {
                            Some(
                                self.sealer
                                    .seal(&subject, attachments_json(&m.attachments).as_bytes())
                                    .map_err(ChannelsError::Seal)?,
                            )
                        };
                        (Some(subject), Some(sealed), files)
                    }
                    _ => (None, None, None),
                };
                // A group message that is not admitted is not stored: only the dedup key
                // `(channel, event_id)` is kept, so a webhook redelivery of the same update is
                // still recognized. No chat, sender or message id, no text (the audit record of
                // the Cedar decision is the only trace of who wrote where).
                let keep_ids = matches!(admission, Admission::Admitted { .. })
                    || m.chat.kind != chitin_channels::ChatKind::Group;
                let ids = |v: &str| keep_ids.then(|| v.to_owned());
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        chat_id: ids(&m.chat.id),
                        chat_kind: keep_ids.then(|| chat_kind_str(m.chat.kind)),
                        thread: if keep_ids {
                            m.chat.thread.clone()
                        } else {
                            None
                        },
                        sender_id: ids(&m.sender.id),
                        message_id: ids(&m.message_id),
                        status: admission.status(),
                        subject,
                        text,
                        attachments: files,
                        ..EventRow::default()
                    },
                )?;
                if let Admission::Admitted { user, session } = &admission {
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
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        chat_id: Some(m.chat.id.clone()),
                        chat_kind: Some(chat_kind_str(m.chat.kind)),
                        thread: m.chat.thread.clone(),
                        sender_id: Some(m.sender.id.clone()),
                        message_id: Some(m.message_id.clone()),
                        status: "ignored",
                        ..EventRow::default()
                    },
                )?;
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
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        chat_id: Some(b.chat.id.clone()),
                        chat_kind: Some(chat_kind_str(b.chat.kind)),
                        thread: b.chat.thread.clone(),
                        sender_id: Some(b.sender.id.clone()),
                        message_id: Some(b.message_id.clone()),
                        status: "new",
                        callback_id: Some(b.callback_id.clone()),
                        button_data: Some(data),
                        ..EventRow::default()
                    },
                )?;
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
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        chat_id: Some(chat.id.clone()),
                        chat_kind: Some(chat_kind_str(chat.kind)),
                        thread: chat.thread.clone(),
                        sender_id: Some(sender.id.clone()),
                        status: if admitted { "admitted" } else { "denied" },
                        ..EventRow::default()
                    },
                )?;
                if admitted {
                    out.invites.push(AdmittedInvite {
                        row_id,
                        event_id: ev.event_id.clone(),
                        chat: chat.clone(),
                        inviter: identity_id(&ch.kind, &sender.id),
                    });
                }
            }
            Event::Status(report) => {
                self.record_platform_status(tx, &ch.name, report, now)?;
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        message_id: Some(report.message_id.clone()),
                        status: "ignored",
                        ..EventRow::default()
                    },
                )?;
            }
            Event::Ignored { .. } => {
                fill(
                    tx,
                    row_id,
                    now,
                    EventRow {
                        status: "ignored",
                        ..EventRow::default()
                    },
                )?;
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
        self.store
            .db()
            .tx(|tx| self.admit_in(tx, &ch, message, now))
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
        conversation: Option<(&str, chitin_channels::ChatKind)>,
    ) -> Result<Principal, ChannelsError> {
        let euid = crate::policy::identity_uid(identity);
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
        if let Some((id, kind)) = conversation {
            let cuid = crate::policy::conversation_uid(id);
            if active.entities.get(&cuid).is_none() {
                extra.push(json!({
                    "uid": {"type": "Chitin::Conversation", "id": id},
                    "attrs": {"channel": channel, "kind": kind.as_str()},
                    "parents": [],
                }));
            }
        }
        Ok(Principal {
            uid: euid,
            users,
            extra,
        })
    }

    pub(super) fn admit_in(
        &self,
        tx: &mut Conn<'_>,
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
        let conversation = conversation_id(&ch.kind, &m.chat);
        let p = self.principal(&identity, &ch.name, Some((&conversation, m.chat.kind)))?;
        let paired = !p.users.is_empty();
        let mut context = serde_json::Map::new();
        context.insert("mentioned".into(), Value::Bool(m.mentioned));
        context.insert("paired".into(), Value::Bool(paired));
        let req = PolicyRequest::new(
            p.uid,
            crate::policy::Action::MessageReceive,
            crate::policy::conversation_uid(&conversation),
            context,
        );
        let verdict = self.gate.check_with_entities(&req, &p.extra)?;
        Ok((verdict, p.users))
    }

    /// Admitted invitations not joined yet (what a restarted gateway joins).
    pub fn invites_pending(&self, channel: &str) -> Result<Vec<AdmittedInvite>, ChannelsError> {
        let kind = self
            .channels
            .get(channel)
            .map(|c| c.kind.clone())
            .unwrap_or_default();
        self.store.db().with(|c| {
            c.query_map(
                "SELECT id, event_id, chat_id, chat_kind, thread, sender_id FROM channel_events
                 WHERE channel = ?1 AND status = 'admitted' AND event_kind = 'invite' ORDER BY id",
                params![channel],
                |r| {
                    let chat_kind: String = r.get(3)?;
                    Ok::<_, ChannelsError>(AdmittedInvite {
                        row_id: r.get(0)?,
                        event_id: r.get(1)?,
                        chat: chitin_channels::ChatRef {
                            id: r.get(2)?,
                            kind: parse_chat_kind(&chat_kind),
                            thread: r.get(4)?,
                        },
                        inviter: identity_id(&kind, &r.get::<String>(5)?),
                    })
                },
            )
        })
    }

    /// Admitted messages whose turn was never recorded (no run has them as origin) and that
    /// were not answered otherwise (marked done), oldest first, with their text opened: what a
    /// restarted gateway runs. A message whose turn was recorded stays `admitted`: its run is
    /// the record, so no second write is needed per message.
    pub fn admitted_pending(&self, channel: &str) -> Result<Vec<AdmittedEvent>, ChannelsError> {
        let sql = "SELECT id, event_id, chat_id, chat_kind, thread, sender_id, message_id, subject, text, attachments
             FROM channel_events WHERE channel = ?1 AND status = 'admitted' AND event_kind = 'message'
               AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.origin = 'channel:' || channel_events.channel || ':' || channel_events.id)
             ORDER BY id";
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
        let rows: Vec<Row> = self.store.db().with(|c| {
            c.query_map(sql, params![channel], |r| {
                Ok::<_, ChannelsError>((
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
            })
        })?;
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
        self.store.db().with(|c| {
            c.query_map(
                "SELECT r.id, e.chat_id, e.chat_kind, e.thread, e.message_id
                 FROM channel_events e JOIN runs r ON r.origin = 'channel:' || e.channel || ':' || e.id
                 WHERE e.channel = ?1 AND e.status IN ('admitted', 'done') AND e.received_ms >= ?2
                   AND NOT EXISTS (SELECT 1 FROM channel_outbox o
                                   WHERE o.channel = ?1 AND o.dedup_key = 'reply:' || r.id || '#0')
                 ORDER BY e.id",
                params![channel, since_ms],
                |r| {
                    let kind: String = r.get(2)?;
                    Ok::<_, ChannelsError>((
                        r.get::<String>(0)?,
                        chitin_channels::ChatRef {
                            id: r.get(1)?,
                            kind: parse_chat_kind(&kind),
                            thread: r.get(3)?,
                        },
                        r.get::<Option<String>>(4)?,
                    ))
                },
            )
        })
    }

    /// Marks an admitted event as handled (its turn finished).
    pub fn mark_done(&self, row_id: i64) -> Result<bool, ChannelsError> {
        let now = self.clock.now_ms();
        let n = self.store.db().with(|c| {
            c.execute(
                "UPDATE channel_events SET status = 'done', updated_ms = ?2 WHERE id = ?1 AND status = 'admitted'",
                params![row_id, now],
            )
        })?;
        Ok(n == 1)
    }
}

/// The `event_kind` a stored event gets.
fn event_kind(e: &Event) -> &'static str {
    match e {
        Event::Message(_) => "message",
        Event::Edited(_) => "edited",
        Event::Button(_) => "button",
        Event::Invited { .. } => "invite",
        Event::Status(_) | Event::Ignored { .. } => "ignored",
    }
}

/// The columns of a claimed `channel_events` row that its outcome fills in.
#[derive(Default)]
struct EventRow {
    chat_id: Option<String>,
    chat_kind: Option<&'static str>,
    thread: Option<String>,
    sender_id: Option<String>,
    message_id: Option<String>,
    status: &'static str,
    subject: Option<String>,
    text: Option<Vec<u8>>,
    callback_id: Option<String>,
    button_data: Option<String>,
    attachments: Option<Vec<u8>>,
}

fn fill(tx: &mut Conn<'_>, row_id: i64, now: i64, r: EventRow) -> Result<(), ChannelsError> {
    tx.execute(
        "UPDATE channel_events SET chat_id = ?2, chat_kind = ?3, thread = ?4, sender_id = ?5,
           message_id = ?6, status = ?7, subject = ?8, text = ?9, callback_id = ?10,
           button_data = ?11, attachments = ?12, updated_ms = ?13
         WHERE id = ?1",
        params![
            row_id,
            r.chat_id,
            r.chat_kind,
            r.thread,
            r.sender_id,
            r.message_id,
            r.status,
            r.subject,
            r.text,
            r.callback_id,
            r.button_data,
            r.attachments,
            now
        ],
    )?;
    Ok(())
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
