//! The channel engine: the gateway side of chat channels, shared by every platform adapter of
//! `chitin-channels` (adding a platform never touches this module).
//!
//! It owns durable ingress ([`Engine::commit_polled`]), admission by Cedar
//! ([`Engine::admit`]), pairing ([`Engine::pairing_approve`] and friends, the managed entity
//! store), conversation session keys, and the durable outbox ([`Engine::enqueue`],
//! [`Engine::claim_due`], [`Engine::record_sent`], [`Engine::record_failure`],
//! [`deliver_due`]). Everything is synchronous over `state.db` except [`deliver_due`], which
//! drives a [`Platform`].
//!
//! Invariants:
//! - **Durable ingress.** The events of one poll and the cursor that follows them are
//!   committed in one transaction, unique on `(channel, event_id)`: a crash before the commit
//!   redelivers them (the cursor did not move, so the platform was not told), a crash after it
//!   drops the redelivered duplicates. Admission is decided inside that transaction, so an
//!   event is stored with its outcome; its decision is audited before the commit (a crash in
//!   between shows the decision twice in the audit log, the event once in `state.db`).
//! - **Admission is Cedar** (`message.receive`): principal `Chitin::Identity::"<kind>:<user>"`
//!   (attribute `channel`, parents from the entity files and the managed store), resource
//!   `Chitin::Conversation::"<kind>:<dm|group>:<chat>"` (`channel`, `kind`), context
//!   `mentioned`, `paired`. A message that is not admitted is stored without its text and
//!   its decision record carries no text; a *group* message that is not admitted is not
//!   stored at all: only its dedup key `(channel, event_id)` and times remain (no chat,
//!   sender or message id), so a webhook redelivery is still dropped. An admitted message's
//!   text is sealed with its `User`'s data key (the subject of the turn).
//! - **Pairing.** Only an unpaired identity writing in a direct message gets a code: one code
//!   per identity per hour, at most [`MAX_PENDING_PAIRINGS`] open codes, 8 characters from a
//!   32-letter alphabet (40 bits, OS randomness), single use, expiring. Approving, denying and
//!   revoking are Cedar `pairing.approve` by the acting user and audited; an approval makes the
//!   identity a member of the target `User` in the managed entity store (`managed_entities`),
//!   which the policy engine merges with `entities.json`.
//! - **Durable outbox.** Every message is a row before it is sent. A row is claimed
//!   `queued -> sending` atomically (two senders never send one row), rows of one chat go out
//!   in order, a sent row is never sent again, and a row whose send may have reached the
//!   platform (found `sending` at start, or a transient failure after the request went out) is
//!   never re-sent automatically: it is marked `failed` with "may have been delivered",
//!   audited and counted (at most once, never silently twice).

mod buttons;
mod ingress;
mod outbox;
mod pairing;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use chitin_audit::RecordInput;
use chitin_channels::{ChatKind, ChatRef};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::gate::{Gate, GateError};
use crate::policy::PolicyError;
use crate::store::{Store, StoreError, params};

pub use buttons::PendingPress;
pub use ingress::{Admission, AdmittedEvent, AdmittedInvite, Committed, DenyReason};
pub use outbox::{
    DeliveryReport, FailureOutcome, OutboxKind, OutboxNew, OutboxRow, OutboxStatus, deliver_due,
};
pub use pairing::PairingRequest;

/// How long a pairing code is valid unless configured otherwise.
pub const DEFAULT_PAIRING_TTL_MS: i64 = 60 * 60 * 1000;
/// One pairing code per identity in this window.
pub const PAIRING_RATE_WINDOW_MS: i64 = 60 * 60 * 1000;
/// At most this many pairing codes are open at once; beyond, strangers get no code.
pub const MAX_PENDING_PAIRINGS: i64 = 64;
/// Tries per outgoing message unless configured otherwise.
pub const DEFAULT_MAX_SEND_ATTEMPTS: u32 = 8;
/// First retry delay of the outbox (doubled per attempt, 50-100 % jitter) ...
pub const BACKOFF_BASE_MS: i64 = 1_000;
/// ... capped at this.
pub const BACKOFF_MAX_MS: i64 = 5 * 60 * 1000;
/// A row still undelivered this long after it was queued is a dead letter at its next
/// failure, whatever the reason (rate limits included).
pub const MAX_OUTBOX_AGE_MS: i64 = 24 * 60 * 60 * 1000;
/// On a store shared by several gateways (PostgreSQL), a row claimed `sending` this long ago
/// belongs to a sender that died (a live one records the outcome of a send well within it):
/// any replica then recovers it by today's rule (`failed`, "may have been delivered", never
/// re-sent automatically). On SQLite one gateway owns the store and recovers every such row
/// at start.
pub const SEND_CLAIM_TTL_MS: i64 = 5 * 60 * 1000;

/// Errors of the channel engine. Messages never carry a message's text or a credential.
#[derive(Debug, thiserror::Error)]
pub enum ChannelsError {
    #[error("no channel `{0}` is configured; see [[channels]] in chitin.toml")]
    UnknownChannel(String),
    #[error("no pairing request with code {0}; `chitin pairing list` shows the open ones")]
    PairingNotFound(String),
    #[error("pairing code {code} is already {status}")]
    PairingNotPending { code: String, status: String },
    #[error("pairing code {0} has expired; the person must write to the bot again for a new one")]
    PairingExpired(String),
    #[error("{user} may not decide pairings (policy decision: {decision}{policies})")]
    PairingRefused {
        user: String,
        decision: String,
        policies: String,
    },
    #[error("no user `{0}` in the entities; add it to entities.json first")]
    UnknownUser(String),
    #[error(
        "identity {0} is defined in the entity files; change it there (the managed store cannot redefine it)"
    )]
    DefinedInEntityFiles(String),
    #[error("identity {0} is not paired")]
    NotPaired(String),
    #[error("invalid identity `{0}`: expected KIND:ID, e.g. telegram:12345")]
    InvalidIdentity(String),
    #[error("outbox row {0} is not being sent (it was recovered, sent or resolved elsewhere)")]
    NotSending(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("channel store: {0}")]
    Db(#[from] chitin_store::Error),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("audit log unavailable, nothing changed: {0}")]
    Audit(String),
    #[error("cannot seal or open a channel message: {0}")]
    Seal(String),
    #[error("no randomness from the OS: {0}")]
    Random(String),
}

/// Seals and opens message text with a data subject's key (the vault in production).
pub trait Sealer: Send + Sync {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String>;
}

impl Sealer for crate::vault::Vault {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        crate::vault::Vault::seal(self, subject, plaintext).map_err(|e| e.to_string())
    }
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        crate::vault::Vault::open(self, subject, sealed).map_err(|e| e.to_string())
    }
}

/// What the engine needs to know of one `[[channels]]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSettings {
    /// `[[channels]] name`.
    pub name: String,
    /// The platform kind (`telegram`): the prefix of identities and conversations.
    pub kind: String,
    pub pairing_ttl_ms: i64,
    pub max_send_attempts: u32,
}

impl ChannelSettings {
    /// A channel with the default pairing TTL and send attempts.
    pub fn new(name: &str, kind: &str) -> Self {
        Self {
            name: name.into(),
            kind: kind.into(),
            pairing_ttl_ms: DEFAULT_PAIRING_TTL_MS,
            max_send_attempts: DEFAULT_MAX_SEND_ATTEMPTS,
        }
    }

    /// The settings of a configured channel.
    pub fn from_config(c: &crate::config::channels::ChannelConfig) -> Self {
        Self {
            name: c.name.clone(),
            kind: c.kind.as_str().into(),
            pairing_ttl_ms: i64::try_from(c.pairing_code_ttl_secs.saturating_mul(1000))
                .unwrap_or(DEFAULT_PAIRING_TTL_MS),
            max_send_attempts: c.max_send_attempts,
        }
    }
}

/// Counters since start (the durable counts are in [`ChannelStatus`]).
#[derive(Debug, Default)]
struct Counters {
    denied: AtomicU64,
    pairing_codes: AtomicU64,
    duplicates: AtomicU64,
    dead: AtomicU64,
    maybe_delivered: AtomicU64,
    undelivered: AtomicU64,
}

/// Counters since start, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct EngineCounters {
    /// Messages not admitted.
    pub denied: u64,
    /// Pairing codes issued.
    pub pairing_codes: u64,
    /// Redelivered events dropped.
    pub duplicates: u64,
    /// Outbox rows that became dead letters (retries exhausted or too old).
    pub dead: u64,
    /// Outbox rows marked failed because their send may have reached the platform.
    pub maybe_delivered: u64,
    /// Sent messages the platform later reported undelivered.
    pub undelivered: u64,
}

/// The state of one channel, for `chitin channels status`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct ChannelStatus {
    pub channel: String,
    pub kind: String,
    /// As the running gateway last reported it (`None`: never; see `reported_ms`).
    pub connected: Option<bool>,
    /// Why the channel cannot connect (the platform's error, without credentials).
    pub connection_error: Option<String>,
    /// When the connection state last changed.
    pub connected_since_ms: Option<i64>,
    /// When the gateway last reported the connection (it refreshes it every
    /// [`CONNECTION_REFRESH_MS`] while the channel runs; older means no gateway runs it).
    pub reported_ms: Option<i64>,
    pub cursor: Option<String>,
    pub last_event_ms: Option<i64>,
    /// How long the oldest message waiting to be sent has waited (0: none waiting).
    pub lag_ms: i64,
    /// Messages waiting for a retry after a failed attempt.
    pub retrying: i64,
    pub events: i64,
    pub denied: i64,
    pub queued: i64,
    pub sending: i64,
    pub sent: i64,
    pub failed: i64,
    pub dead: i64,
    pub pending_pairings: i64,
    /// The replica that holds the channel's lease (`channel:<name>`) now, if any: the one
    /// that polls it (issue #18).
    pub owner: Option<String>,
}

/// The channel engine over the state database, the gate and a clock.
pub struct Engine {
    store: Arc<Store>,
    gate: Gate,
    clock: Arc<dyn Clock>,
    sealer: Arc<dyn Sealer>,
    channels: BTreeMap<String, ChannelSettings>,
    counters: Counters,
    /// Per channel, the cursor this engine last read ([`Engine::next_cursor`]) or committed:
    /// the cursor its poll started from. A commit moves the stored cursor only from this
    /// value, so a replica that lost the channel to another (which moved the cursor since)
    /// never moves it back.
    cursors: Mutex<HashMap<String, Option<String>>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("channels", &self.channels)
            .finish_non_exhaustive()
    }
}

/// A JSON string literal (how the gate quotes entity ids).
fn quoted(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// `Chitin::User::"<id>"`.
pub fn user_uid(id: &str) -> String {
    format!("Chitin::User::{}", quoted(id))
}

/// The Cedar id of a sender: `<kind>:<platform user id>`.
pub fn identity_id(kind: &str, sender_id: &str) -> String {
    format!("{kind}:{sender_id}")
}

/// `Chitin::Identity::"<kind>:<platform user id>"`.
pub fn identity_uid(identity: &str) -> String {
    format!("Chitin::Identity::{}", quoted(identity))
}

/// The Cedar id of a conversation: `<kind>:<dm|group>:<chat id>`.
pub fn conversation_id(kind: &str, chat: &ChatRef) -> String {
    format!("{kind}:{}:{}", chat.kind.as_str(), chat.id)
}

/// `Chitin::Conversation::"<kind>:<dm|group>:<chat id>"`.
pub fn conversation_uid(kind: &str, chat: &ChatRef) -> String {
    format!(
        "Chitin::Conversation::{}",
        quoted(&conversation_id(kind, chat))
    )
}

/// A part of a session key: every byte other than `A-Z a-z 0-9 . -` written as `_XX` (hex),
/// so the parts cannot run into each other (`:` is escaped) and the key stays within what
/// the agent accepts (Matrix `!room:server`, Signal group ids in base64, ...). Telegram's
/// numeric ids are unchanged.
fn key_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

/// The inverse of [`key_part`] (`None` for text it cannot have produced).
pub fn key_unpart(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'_' {
            let hex = [bytes.next()?, bytes.next()?];
            let hex = std::str::from_utf8(&hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
        } else if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            out.push(b);
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// The agent session of a conversation: one per direct message, per group and per thread of a
/// group (Telegram forum topic): `channel:<name>:<dm|group>:<chat id>[:thread:<id>]`. Every
/// sender in a group shares the group's session; each turn's principal is its own sender's
/// `User` ([`Admission::Admitted`]).
pub fn session_key(channel: &str, chat: &ChatRef) -> String {
    // Channel names are `[a-z0-9_-]` (checked by the config): they are used as they are.
    let mut k = format!(
        "channel:{channel}:{}:{}",
        chat.kind.as_str(),
        key_part(&chat.id)
    );
    if let Some(t) = &chat.thread {
        k.push_str(":thread:");
        k.push_str(&key_part(t));
    }
    k
}

fn chat_kind_str(k: ChatKind) -> &'static str {
    k.as_str()
}

fn parse_chat_kind(s: &str) -> ChatKind {
    if s == "group" {
        ChatKind::Group
    } else {
        ChatKind::Dm
    }
}

impl Engine {
    /// An engine for the given channels. Call [`Engine::load_managed_entities`] once at start
    /// (so paired identities are members of their users) and
    /// [`Engine::recover_interrupted_sends`] before the first sender runs.
    pub fn new(
        store: Arc<Store>,
        gate: Gate,
        clock: Arc<dyn Clock>,
        sealer: Arc<dyn Sealer>,
        channels: Vec<ChannelSettings>,
    ) -> Self {
        Self {
            store,
            gate,
            clock,
            sealer,
            channels: channels.into_iter().map(|c| (c.name.clone(), c)).collect(),
            counters: Counters::default(),
            cursors: Mutex::new(HashMap::new()),
        }
    }

    /// The clock's time (unix ms).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The cursor this engine's polls of `channel` start from (`None`: it never read one).
    fn known_cursor(&self, channel: &str) -> Option<Option<String>> {
        self.cursors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .cloned()
    }

    fn set_known_cursor(&self, channel: &str, cursor: Option<String>) {
        self.cursors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(channel.to_string(), cursor);
    }

    fn settings(&self, channel: &str) -> Result<&ChannelSettings, ChannelsError> {
        self.channels
            .get(channel)
            .ok_or_else(|| ChannelsError::UnknownChannel(channel.escape_default().to_string()))
    }

    fn audit(&self, input: RecordInput) -> Result<(), ChannelsError> {
        self.gate
            .audit()
            .append(input)
            .map(|_| ())
            .map_err(|e| ChannelsError::Audit(e.to_string()))
    }

    /// Counters since start.
    pub fn counters(&self) -> EngineCounters {
        let c = &self.counters;
        EngineCounters {
            denied: c.denied.load(Ordering::Relaxed),
            pairing_codes: c.pairing_codes.load(Ordering::Relaxed),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            dead: c.dead.load(Ordering::Relaxed),
            maybe_delivered: c.maybe_delivered.load(Ordering::Relaxed),
            undelivered: c.undelivered.load(Ordering::Relaxed),
        }
    }

    /// The durable state of a channel: cursor, last event, event and outbox counts by status,
    /// open pairing codes.
    pub fn status(&self, channel: &str) -> Result<ChannelStatus, ChannelsError> {
        let now = self.clock.now_ms();
        let kind = self
            .channels
            .get(channel)
            .map(|c| c.kind.clone())
            .unwrap_or_default();
        self.store.db().with(|c| {
            let mut one = |sql: &str| -> Result<i64, ChannelsError> {
                Ok(c.query_row(sql, params![channel])?
                    .get::<Option<i64>>(0)?
                    .unwrap_or_default())
            };
            let mut s = ChannelStatus {
                channel: channel.to_string(),
                kind,
                events: one("SELECT COUNT(*) FROM channel_events WHERE channel = ?1")?,
                denied: one(
                    "SELECT COUNT(*) FROM channel_events WHERE channel = ?1 AND status IN ('denied', 'pairing')",
                )?,
                pending_pairings: one(
                    "SELECT COUNT(*) FROM pairing_requests WHERE channel = ?1 AND status = 'pending'",
                )?,
                retrying: one(
                    "SELECT COUNT(*) FROM channel_outbox WHERE channel = ?1 AND status = 'queued' AND attempts > 0",
                )?,
                ..ChannelStatus::default()
            };
            s.cursor = c
                .query_opt(
                    "SELECT cursor FROM channel_cursors WHERE channel = ?1",
                    params![channel],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            s.last_event_ms = c
                .query_row(
                    "SELECT MAX(received_ms) FROM channel_events WHERE channel = ?1",
                    params![channel],
                )?
                .get(0)?;
            let oldest: Option<i64> = c
                .query_row(
                    "SELECT MIN(created_ms) FROM channel_outbox WHERE channel = ?1 AND status IN ('queued', 'sending')",
                    params![channel],
                )?
                .get(0)?;
            s.lag_ms = oldest.map_or(0, |t| now.saturating_sub(t).max(0));
            if let Some(r) = c.query_opt(
                "SELECT connected, since_ms, last_error, updated_ms FROM channel_state WHERE channel = ?1",
                params![channel],
            )? {
                s.connected = Some(r.get::<i64>(0)? != 0);
                s.connected_since_ms = Some(r.get(1)?);
                s.connection_error = r.get(2)?;
                s.reported_ms = Some(r.get(3)?);
            }
            // Lease times are wall-clock times.
            let wall = crate::clock::SystemClock.now_ms();
            s.owner = c
                .query_opt(
                    "SELECT owner FROM leases WHERE name = ?1 AND owner IS NOT NULL AND expires_ms > ?2",
                    params![format!("channel:{channel}"), wall],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            let counts = c.query_map(
                "SELECT status, COUNT(*) FROM channel_outbox WHERE channel = ?1 GROUP BY status ORDER BY status",
                params![channel],
                |r| Ok::<_, ChannelsError>((r.get::<String>(0)?, r.get::<i64>(1)?)),
            )?;
            for (status, n) in counts {
                match status.as_str() {
                    "queued" => s.queued = n,
                    "sending" => s.sending = n,
                    "sent" => s.sent = n,
                    "failed" => s.failed = n,
                    "dead" => s.dead = n,
                    _ => {}
                }
            }
            Ok(s)
        })
    }

    /// Records whether `channel` is connected (and why not), as its gateway sees it now. The
    /// time of the last change is kept while the state stays the same.
    pub fn report_connection(
        &self,
        channel: &str,
        connected: bool,
        error: Option<&str>,
    ) -> Result<(), ChannelsError> {
        let now = self.clock.now_ms();
        let error = error.map(|e| self.gate.redact(e));
        self.store.db().with(|c| {
            c.execute(
                "INSERT INTO channel_state (channel, connected, since_ms, last_error, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?3)
                 ON CONFLICT(channel) DO UPDATE SET
                   since_ms = CASE WHEN channel_state.connected = excluded.connected
                                   THEN channel_state.since_ms ELSE excluded.since_ms END,
                   connected = excluded.connected,
                   last_error = excluded.last_error,
                   updated_ms = excluded.updated_ms",
                params![channel, i64::from(connected), now, error],
            )
        })?;
        Ok(())
    }
}

/// How often a running channel refreshes its reported connection state.
pub const CONNECTION_REFRESH_MS: i64 = 30_000;
