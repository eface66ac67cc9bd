//! Matrix, over the Client-Server API v3 (`<homeserver>/_matrix/client/v3/...`, JSON bodies,
//! the access token as a bearer token).
//!
//! A thin typed client over reqwest: rustls, no redirects (except one, unauthenticated, for a
//! media download a homeserver sends to its CDN), no proxy, bounded answers.
//!
//! - **Token.** Sent only in the `Authorization` header (marked sensitive), never in a URL, so
//!   it is not in reqwest's errors; every error text is scrubbed of it all the same (a server
//!   or proxy may echo a request), `Debug` shows `<redacted>`, and nothing here logs. Plain
//!   `http://` is accepted for the homeserver only on a loopback address.
//! - **Receiving.** Long polling with `/sync` (`since` = the cursor, the answer's `next_batch`
//!   the next cursor). Nothing is acknowledged: a poll with the previous cursor returns the same
//!   events again, and [`Inbound::event_id`] is `e:<event id>`, so the engine drops them.
//!   An inline filter keeps the answer to what is used: timeline events of the types
//!   [`TIMELINE_TYPES`] (at most [`TIMELINE_LIMIT`] per room and poll), the state
//!   `m.room.encryption` and lazily loaded `m.room.member` (display names of senders), the
//!   account data `m.direct`; no presence, receipts or typing.
//! - **No history replay.** The first poll (no cursor) is a sync without `since` and
//!   `timeout=0`: the state it carries is learned (encrypted rooms, DMs, member counts), its
//!   timeline is *not* returned (messages sent before the bot's first start are history, not
//!   requests), its pending invitations are (an invitation is not in any later sync), and its
//!   `next_batch` is the cursor. After a restart (a cursor given) [`Platform::connect`] learns
//!   the same state with a one-event-per-room sync whose timeline is ignored too, so the rooms'
//!   state is known before the first event is mapped.
//! - **Mapping.** `m.room.message` from anyone but the bot: `m.text`, `m.notice`, `m.emote` are
//!   text; `m.image`, `m.file`, `m.audio`, `m.video` are an [`Attachment`] (the `mxc://` URI as
//!   `file_ref`; `body` is the caption when `filename` is set and differs from it). Edits
//!   (`rel_type` `m.replace`) are [`Event::Edited`] of the original event; threads (`m.thread`)
//!   are [`ChatRef::thread`] = the thread root; replies (`m.in_reply_to`, not a thread's
//!   fallback) set [`Message::reply_to`], and their legacy quoted fallback (`> ` lines) is
//!   removed from the text. `m.reaction`, `m.sticker`, `m.room.encrypted`, other msgtypes and
//!   anything unreadable are [`Event::Ignored`]. The bot's own events give no event.
//! - **DM or group.** A room is a DM when exactly 2 users are joined (the sync's
//!   `m.joined_member_count`, or `/joined_members` when unknown), or when the bot's own
//!   `m.direct` account data lists it and no more than 2 are joined (a DM that grew into a group
//!   is a group). Anything unknown is a group (a group needs a mention).
//! - **Mentions.** Any DM; `m.mentions.user_ids` naming the bot; the body containing the bot's
//!   user id or its display name (as a whole word, case-insensitive); a reply to one of the
//!   bot's events (known from its sends and the sync, else looked up once). `@room` does not
//!   address the bot.
//! - **End-to-end encryption.** This adapter has no keys: it cannot read encrypted rooms and
//!   must never write plaintext into one (the members believe the room is private). Rooms
//!   with `m.room.encryption` in their state (sync state or timeline, invite state) are
//!   tracked; their messages are ignored, [`Platform::join`] refuses them (and rejects the
//!   invitation), and [`Platform::send`]/[`Platform::edit`] refuse them, checking the room's
//!   current state with the homeserver before every send (a room can become encrypted at any
//!   time, and a restarted adapter has not seen every room's history).
//! - **Sending.** `m.text` with a plain `body` only: no `format`/`formatted_body`, so the
//!   model's text cannot inject HTML, links or pills, and `"m.mentions": {}` so nobody is
//!   notified. The transaction id is [`OutMessage::delivery_id`]: the homeserver deduplicates
//!   a retried `PUT` (same access token, same txnId), so sends are idempotent. Matrix has no
//!   buttons: [`OutMessage::buttons`] are not rendered, the text must say what to answer (the
//!   engine's approval prompt names `/approve CODE` and `/deny CODE`); labels appended here
//!   would be dead text and could push a message over the length limit the engine split it at.

#[cfg(feature = "fake")]
pub mod fake;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::Duration;

use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::http;
use crate::text::check_sendable;
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ChannelError, ChatKind, ChatRef, ConfigError, Event,
    Inbound, Limits, Message, OutMessage, Platform, Polled, SendError, Sender, Sent, WebhookParsed,
    WebhookRequest,
};

/// Longest message text, in UTF-16 code units.
///
/// A Matrix event is at most 65,536 bytes of canonical JSON, signatures and hashes included.
/// In the worst case one UTF-16 unit costs 6 bytes (a control character escaped as `\u00XX`),
/// and an edit carries its text twice (`body` and `m.new_content.body`): 2 × 6 × 4096 =
/// 49,152 bytes, which leaves more than 16 KB for the event's envelope. Typical text (3 bytes
/// a unit at most) would allow far more, but the limit must hold for any text.
pub const MAX_TEXT: usize = 4096;
/// Longest button data, in bytes. Matrix has no buttons (the data never leaves the gateway);
/// the engine's approval data fits.
pub const MAX_BUTTON_DATA: usize = 64;
/// The default long-poll timeout of `/sync`, in milliseconds.
pub const DEFAULT_POLL_TIMEOUT_MS: u64 = 30_000;
/// Timeline events per room and poll. More in one poll (the bot was down, a busy room) makes
/// the homeserver answer `limited`: the older ones are skipped, not redelivered.
pub const TIMELINE_LIMIT: u32 = 100;
/// The timeline event types asked for.
pub const TIMELINE_TYPES: [&str; 5] = [
    "m.room.message",
    "m.room.encrypted",
    "m.room.encryption",
    "m.reaction",
    "m.sticker",
];
/// How long `typing` shows the bot as typing, in milliseconds.
pub const TYPING_TIMEOUT_MS: u64 = 5000;
/// Largest answer read (a sync with 100 events in many rooms is far below it).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Timeout of a request other than a long poll or a download.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How much longer than its `timeout` a long poll may take before it counts as failed.
const POLL_GRACE: Duration = Duration::from_secs(15);
/// The wait when a 429 carries neither `retry_after_ms` nor `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Event ids remembered with their sender being the bot or not (for replies to the bot).
const MAX_REMEMBERED_EVENTS: usize = 4096;
/// Display names remembered (room, user); the map is cleared when it grows past this.
const MAX_REMEMBERED_NAMES: usize = 10_000;
/// Look-ups (`/joined_members`, `/event`) one poll may make; more are left unknown.
const MAX_LOOKUPS_PER_POLL: usize = 20;
const CLIENT_V3: &str = "/_matrix/client/v3";
const CLIENT_V1: &str = "/_matrix/client/v1";

/// One Matrix channel's settings, the access token already released by the gateway.
pub struct MatrixConfig {
    /// The homeserver's client API root (`https://matrix.example.org`); `https`, or `http` on
    /// loopback only.
    pub homeserver: Url,
    /// The bot account's access token.
    pub access_token: Zeroizing<String>,
    /// The bot's user id (`@bot:example.org`); `connect` checks the token belongs to it.
    pub user_id: String,
    /// The long poll's `timeout` (milliseconds the homeserver holds an idle `/sync` open).
    pub poll_timeout_ms: u64,
}

impl MatrixConfig {
    /// A channel with the default poll timeout ([`DEFAULT_POLL_TIMEOUT_MS`]).
    pub fn new(homeserver: Url, user_id: &str, access_token: Zeroizing<String>) -> Self {
        Self {
            homeserver,
            access_token,
            user_id: user_id.to_owned(),
            poll_timeout_ms: DEFAULT_POLL_TIMEOUT_MS,
        }
    }
}

impl fmt::Debug for MatrixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MatrixConfig")
            .field("homeserver", &self.homeserver.as_str())
            .field("access_token", &"<redacted>")
            .field("user_id", &self.user_id)
            .field("poll_timeout_ms", &self.poll_timeout_ms)
            .finish()
    }
}

/// The bot's account as `connect` learned it.
#[derive(Debug, Clone)]
struct Me {
    user_id: String,
    display_name: Option<String>,
}

/// What the adapter knows of the rooms (from syncs, sends and look-ups).
#[derive(Default)]
struct Rooms {
    /// The state of every room has been learned from a sync without `since`.
    snapshot: bool,
    /// Rooms with `m.room.encryption` (never removed: encryption cannot be turned off).
    encrypted: HashSet<String>,
    /// Rooms listed in the bot's `m.direct` account data.
    direct: HashSet<String>,
    /// `m.joined_member_count` per room.
    joined: HashMap<String, u64>,
    /// Display names by (room, user).
    names: HashMap<(String, String), String>,
    /// Event id → sent by the bot.
    senders: Remembered,
}

/// A bounded map of event ids to "sent by the bot", oldest forgotten first.
#[derive(Default)]
struct Remembered {
    map: HashMap<String, bool>,
    order: VecDeque<String>,
}

impl Remembered {
    fn insert(&mut self, event_id: &str, by_bot: bool) {
        if self.map.insert(event_id.to_owned(), by_bot).is_none() {
            self.order.push_back(event_id.to_owned());
            while self.order.len() > MAX_REMEMBERED_EVENTS {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, event_id: &str) -> Option<bool> {
        self.map.get(event_id).copied()
    }
}

impl Rooms {
    fn kind(&self, room: &str) -> ChatKind {
        match self.joined.get(room).copied() {
            Some(2) => ChatKind::Dm,
            Some(n) if n > 2 => ChatKind::Group,
            _ if self.direct.contains(room) => ChatKind::Dm,
            _ => ChatKind::Group,
        }
    }

    fn remember_name(&mut self, room: &str, user: &str, name: &str) {
        if self.names.len() >= MAX_REMEMBERED_NAMES {
            self.names.clear();
        }
        self.names
            .insert((room.to_owned(), user.to_owned()), name.to_owned());
    }
}

/// The Matrix adapter. Build it with [`Matrix::new`], then `connect` before anything else
/// (it learns the bot's display name and the rooms' state).
pub struct Matrix {
    /// The homeserver root without a trailing `/`.
    base: String,
    token: Zeroizing<String>,
    user_id: String,
    poll_timeout_ms: u64,
    http: reqwest::Client,
    me: RwLock<Option<Me>>,
    rooms: Mutex<Rooms>,
}

impl fmt::Debug for Matrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Matrix")
            .field("homeserver", &self.base)
            .field("access_token", &"<redacted>")
            .field("user_id", &self.user_id)
            .field("poll_timeout_ms", &self.poll_timeout_ms)
            .finish_non_exhaustive()
    }
}

/// Why a call failed (internal; mapped to [`SendError`] or [`ChannelError`]).
type CallError = http::CallError<ApiError>;

/// The homeserver answered with an error status.
#[derive(Debug)]
struct ApiError {
    status: u16,
    /// `M_…`, empty when the answer was not a Matrix error.
    errcode: String,
    message: String,
    retry_after: Option<Duration>,
}

/// A Matrix error body (`{"errcode": "M_…", "error": "…"}`).
#[derive(Deserialize)]
struct ErrorBody {
    errcode: Option<String>,
    error: Option<String>,
    retry_after_ms: Option<u64>,
}

/// A path segment that cannot be put in a URL (empty, or only dots: URL parsers resolve
/// `.`/`..`, even percent-encoded, and the request would go elsewhere).
#[derive(Debug)]
struct BadSegment;

impl Matrix {
    /// Checks the configuration and builds the HTTP client; sends nothing.
    pub fn new(cfg: MatrixConfig) -> Result<Self, ConfigError> {
        http::check_api_root(&cfg.homeserver, "homeserver", "the access token")?;
        check_access_token(&cfg.access_token)?;
        check_user_id(&cfg.user_id)?;
        // No redirects: one could carry the request (and its body) elsewhere.
        let http = http::client(http::USER_AGENT)?;
        Ok(Self {
            base: cfg.homeserver.as_str().trim_end_matches('/').to_owned(),
            token: cfg.access_token,
            user_id: cfg.user_id,
            poll_timeout_ms: cfg.poll_timeout_ms,
            http,
            me: RwLock::new(None),
            rooms: Mutex::new(Rooms::default()),
        })
    }

    /// The bot's user id (as configured; `connect` checks it).
    pub fn user_id(&self) -> &str {
        &self.user_id
    }

    fn rooms(&self) -> std::sync::MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn me_snapshot(&self) -> Option<Me> {
        self.me
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `<base><api>/<segment>/<segment>…`, every segment percent-encoded.
    fn url(&self, api: &str, segments: &[&str]) -> Result<String, BadSegment> {
        let mut url = format!("{}{api}", self.base);
        for s in segments {
            url.push('/');
            url.push_str(&encode_segment(s)?);
        }
        Ok(url)
    }

    /// The credential every text leaving this adapter is scrubbed of.
    fn secrets(&self) -> [&str; 1] {
        [self.token.as_str()]
    }

    /// The error of a non-success answer.
    fn api_error(
        &self,
        what: &str,
        status: u16,
        header_retry: Option<Duration>,
        body: &[u8],
    ) -> CallError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) if e.errcode.is_some() => {
                let errcode = e.errcode.unwrap_or_default();
                let text = e.error.unwrap_or_else(|| format!("HTTP {status}"));
                CallError::Api(ApiError {
                    status,
                    message: http::redact(format!("{what}: {text} ({errcode})"), &self.secrets()),
                    errcode,
                    retry_after: e.retry_after_ms.map(Duration::from_millis).or(header_retry),
                })
            }
            _ => CallError::Api(ApiError {
                status,
                errcode: String::new(),
                message: format!("{what}: HTTP {status} without a Matrix error"),
                retry_after: header_retry,
            }),
        }
    }

    /// One API call with the bearer token; the JSON object answered on success.
    async fn call(
        &self,
        what: &str,
        method: Method,
        url: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(self.token.as_str())
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| CallError::network(what, e, true, &self.secrets()))?;
        let status = resp.status().as_u16();
        let header_retry = retry_after_header(&resp);
        let body = http::read_answer(what, &mut resp, MAX_ANSWER_BYTES, &self.secrets()).await?;
        if !(200..300).contains(&status) {
            return Err(self.api_error(what, status, header_retry, &body));
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(v @ Value::Object(_)) => Ok(v),
            _ => Err(CallError::BadAnswer(format!(
                "{what}: HTTP {status} with a body that is not a JSON object"
            ))),
        }
    }

    /// `GET /account/whoami` and the display name: the bot's account, checked against the
    /// configured user id.
    async fn whoami(&self) -> Result<Me, ChannelError> {
        let url = self
            .url(CLIENT_V3, &["account", "whoami"])
            .map_err(|_| ChannelError::Protocol("whoami: bad URL".into()))?;
        let who = self
            .call("whoami", Method::GET, &url, None, REQUEST_TIMEOUT)
            .await
            .map_err(account_error)?;
        let Some(user_id) = who.get("user_id").and_then(Value::as_str) else {
            return Err(ChannelError::Protocol(
                "whoami answered without a user_id".into(),
            ));
        };
        if user_id != self.user_id {
            return Err(ChannelError::Unauthorized(format!(
                "the access token belongs to {user_id}, not to the configured user_id {}",
                self.user_id
            )));
        }
        let display_name = self.display_name().await?;
        let me = Me {
            user_id: self.user_id.clone(),
            display_name,
        };
        *self.me.write().unwrap_or_else(PoisonError::into_inner) = Some(me.clone());
        Ok(me)
    }

    /// The bot's display name (`GET /profile/{userId}/displayname`), `None` when it has none.
    async fn display_name(&self) -> Result<Option<String>, ChannelError> {
        let url = self
            .url(CLIENT_V3, &["profile", &self.user_id, "displayname"])
            .map_err(|_| ChannelError::Protocol("profile: bad URL".into()))?;
        match self
            .call("profile", Method::GET, &url, None, REQUEST_TIMEOUT)
            .await
        {
            Ok(v) => Ok(v
                .get("displayname")
                .and_then(Value::as_str)
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)),
            Err(CallError::Api(ApiError { status: 404, .. })) => Ok(None),
            Err(e) => Err(channel_error(e)),
        }
    }

    /// The bot's account, from `connect` or learned now.
    async fn me(&self) -> Result<Me, ChannelError> {
        match self.me_snapshot() {
            Some(me) => Ok(me),
            None => self.whoami().await,
        }
    }

    /// One `/sync`.
    async fn sync(
        &self,
        since: Option<&str>,
        timeout_ms: u64,
        timeline_limit: u32,
    ) -> Result<SyncAnswer, ChannelError> {
        let base = self
            .url(CLIENT_V3, &["sync"])
            .map_err(|_| ChannelError::Protocol("sync: bad URL".into()))?;
        let mut url =
            Url::parse(&base).map_err(|e| ChannelError::Protocol(format!("sync: bad URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("filter", &sync_filter(timeline_limit));
            q.append_pair("timeout", &timeout_ms.to_string());
            if let Some(since) = since {
                q.append_pair("since", since);
            }
        }
        let timeout = Duration::from_millis(timeout_ms) + POLL_GRACE;
        let answer = self
            .call("sync", Method::GET, url.as_str(), None, timeout)
            .await
            .map_err(account_error)?;
        SyncAnswer::parse(answer)
    }

    /// Learns the state of every room from a sync without `since` whose timeline (one event
    /// per room) is ignored.
    async fn snapshot(&self, me: &Me) -> Result<(), ChannelError> {
        let answer = self.sync(None, 0, 1).await?;
        self.learn(&answer, me);
        self.rooms().snapshot = true;
        Ok(())
    }

    /// Updates what is known of the rooms from a sync answer (idempotent: a redelivered
    /// answer changes nothing).
    fn learn(&self, answer: &SyncAnswer, me: &Me) {
        let mut rooms = self.rooms();
        for ev in events_of(answer.account_data.as_ref()) {
            if ev.get("type").and_then(Value::as_str) == Some("m.direct") {
                rooms.direct = direct_rooms(ev.get("content"));
            }
        }
        for (room_id, room) in answer.joined() {
            if let Some(n) = room
                .get("summary")
                .and_then(|s| s.get("m.joined_member_count"))
                .and_then(Value::as_u64)
            {
                rooms.joined.insert(room_id.to_owned(), n);
            }
            let state = events_of(room.get("state"));
            let timeline = events_of(room.get("timeline"));
            for ev in state.iter().chain(timeline.iter()) {
                learn_event(&mut rooms, room_id, ev, me);
            }
        }
        for (room_id, room) in answer.invited() {
            for ev in events_of(room.get("invite_state")) {
                if ev.get("type").and_then(Value::as_str) == Some("m.room.encryption") {
                    rooms.encrypted.insert(room_id.to_owned());
                }
            }
        }
    }

    async fn poll_inner(&self, cursor: Option<&str>) -> Result<Polled, ChannelError> {
        let me = self.me().await?;
        let Some(since) = cursor else {
            // First start: learn the state, keep the pending invitations, skip the history.
            let answer = self.sync(None, 0, 1).await?;
            self.learn(&answer, &me);
            self.rooms().snapshot = true;
            let events = self.invitations(&answer, None, &me);
            return Ok(Polled {
                events,
                cursor: Some(answer.next_batch),
            });
        };
        if !self.rooms().snapshot {
            self.snapshot(&me).await?;
        }
        let answer = self
            .sync(Some(since), self.poll_timeout_ms, TIMELINE_LIMIT)
            .await?;
        self.learn(&answer, &me);
        let mut events = self.messages(&answer, &me).await;
        events.extend(self.invitations(&answer, Some(since), &me));
        let cursor = (answer.next_batch != since).then_some(answer.next_batch);
        Ok(Polled { events, cursor })
    }

    /// The timeline events of the joined rooms, mapped.
    async fn messages(&self, answer: &SyncAnswer, me: &Me) -> Vec<Inbound> {
        // Member counts of rooms with messages that no sync has told yet.
        let unknown: Vec<String> = {
            let rooms = self.rooms();
            answer
                .joined()
                .filter(|(id, room)| {
                    !rooms.joined.contains_key(*id)
                        && !rooms.encrypted.contains(*id)
                        && events_of(room.get("timeline")).iter().any(|ev| {
                            ev.get("type").and_then(Value::as_str) == Some("m.room.message")
                        })
                })
                .map(|(id, _)| id.to_owned())
                .take(MAX_LOOKUPS_PER_POLL)
                .collect()
        };
        for room in unknown {
            if let Some(n) = self.joined_member_count(&room).await {
                self.rooms().joined.insert(room, n);
            }
        }

        let mut drafts: Vec<Draft> = Vec::new();
        {
            let rooms = self.rooms();
            for (room_id, room) in answer.joined() {
                for ev in events_of(room.get("timeline")) {
                    if let Some(d) = draft(&rooms, room_id, ev, me) {
                        drafts.push(d);
                    }
                }
            }
        }

        // Replies whose target's sender is not known yet: looked up (bounded).
        let mut lookups = 0;
        for d in &mut drafts {
            let Some(target) = d.check_reply.clone() else {
                continue;
            };
            let known = self.rooms().senders.get(&target);
            let by_bot = match known {
                Some(b) => b,
                None if lookups < MAX_LOOKUPS_PER_POLL => {
                    lookups += 1;
                    match self.event_sender(&d.room, &target).await {
                        Some(sender) => {
                            let b = sender == me.user_id;
                            self.rooms().senders.insert(&target, b);
                            b
                        }
                        None => false,
                    }
                }
                None => false,
            };
            if let Event::Message(m) | Event::Edited(m) = &mut d.inbound.event {
                m.mentioned |= by_bot;
            }
        }
        drafts.into_iter().map(|d| d.inbound).collect()
    }

    /// `GET /rooms/{roomId}/joined_members`: how many are joined; `None` on any failure.
    async fn joined_member_count(&self, room: &str) -> Option<u64> {
        let url = self
            .url(CLIENT_V3, &["rooms", room, "joined_members"])
            .ok()?;
        let v = self
            .call("joined_members", Method::GET, &url, None, REQUEST_TIMEOUT)
            .await
            .ok()?;
        v.get("joined")
            .and_then(Value::as_object)
            .map(|m| m.len() as u64)
    }

    /// `GET /rooms/{roomId}/event/{eventId}`: the event's sender; `None` on any failure.
    async fn event_sender(&self, room: &str, event_id: &str) -> Option<String> {
        let url = self
            .url(CLIENT_V3, &["rooms", room, "event", event_id])
            .ok()?;
        let v = self
            .call("event", Method::GET, &url, None, REQUEST_TIMEOUT)
            .await
            .ok()?;
        v.get("sender").and_then(Value::as_str).map(String::from)
    }

    /// The invitations of a sync answer. Stripped state has no event id, so an invitation's
    /// id is the room and a digest of the inviter and the sync's `since` (stable when the same
    /// sync is redelivered; a later invitation into the same room is a new event).
    fn invitations(&self, answer: &SyncAnswer, since: Option<&str>, me: &Me) -> Vec<Inbound> {
        let mut out = Vec::new();
        for (room_id, room) in answer.invited() {
            let state = events_of(room.get("invite_state"));
            let invite = state.iter().find(|ev| {
                ev.get("type").and_then(Value::as_str) == Some("m.room.member")
                    && ev.get("state_key").and_then(Value::as_str) == Some(me.user_id.as_str())
                    && ev
                        .get("content")
                        .and_then(|c| c.get("membership"))
                        .and_then(Value::as_str)
                        == Some("invite")
            });
            let Some(invite) = invite else {
                continue;
            };
            let Some(inviter) = invite.get("sender").and_then(Value::as_str) else {
                continue;
            };
            let is_direct = invite
                .get("content")
                .and_then(|c| c.get("is_direct"))
                .and_then(Value::as_bool)
                == Some(true);
            let display = state
                .iter()
                .find(|ev| {
                    ev.get("type").and_then(Value::as_str) == Some("m.room.member")
                        && ev.get("state_key").and_then(Value::as_str) == Some(inviter)
                })
                .and_then(|ev| ev.get("content")?.get("displayname")?.as_str())
                .filter(|n| !n.trim().is_empty())
                .unwrap_or(inviter);
            let digest = short_digest(&[inviter, since.unwrap_or("")]);
            out.push(Inbound {
                event_id: format!("i:{room_id}:{digest}"),
                event: Event::Invited {
                    chat: ChatRef {
                        id: room_id.to_owned(),
                        // The inviter's claim; messages after the join are classified by the
                        // room's members.
                        kind: if is_direct {
                            ChatKind::Dm
                        } else {
                            ChatKind::Group
                        },
                        thread: None,
                    },
                    sender: Sender {
                        id: inviter.to_owned(),
                        display: display.to_owned(),
                        is_bot: false,
                    },
                },
            });
        }
        out
    }

    /// Whether the room is end-to-end encrypted: known from the sync, else asked
    /// (`GET /rooms/{roomId}/state/m.room.encryption`, 404 `M_NOT_FOUND` = no).
    async fn room_encrypted(&self, room: &str) -> Result<bool, SendError> {
        if self.rooms().encrypted.contains(room) {
            return Ok(true);
        }
        let url = self
            .url(CLIENT_V3, &["rooms", room, "state", "m.room.encryption"])
            .map_err(|_| bad_id("room id", room))?;
        match self
            .call("room state", Method::GET, &url, None, REQUEST_TIMEOUT)
            .await
        {
            Ok(_) => {
                self.rooms().encrypted.insert(room.to_owned());
                Ok(true)
            }
            Err(CallError::Api(ApiError {
                status: 404,
                errcode,
                ..
            })) if errcode == "M_NOT_FOUND" => Ok(false),
            // Nothing was sent: whatever failed, the message was not delivered.
            Err(e) => Err(match send_error(e) {
                SendError::Transient { message, .. } => SendError::Transient {
                    message,
                    maybe_delivered: false,
                },
                other => other,
            }),
        }
    }

    /// Refuses a room that is (or may be) end-to-end encrypted.
    async fn refuse_encrypted(&self, room: &str) -> Result<(), SendError> {
        if self.room_encrypted(room).await? {
            return Err(SendError::Permanent(encrypted_refusal(room)));
        }
        Ok(())
    }

    /// `PUT /rooms/{roomId}/send/m.room.message/{txnId}`: the new event's id.
    async fn put_message(
        &self,
        what: &str,
        room: &str,
        txn: &str,
        content: &Value,
    ) -> Result<String, SendError> {
        let url = self
            .url(CLIENT_V3, &["rooms", room, "send", "m.room.message", txn])
            .map_err(|_| {
                SendError::Permanent(format!(
                    "{what}: the room id or transaction id cannot be used in a URL"
                ))
            })?;
        let answer = self
            .call(what, Method::PUT, &url, Some(content), REQUEST_TIMEOUT)
            .await
            .map_err(send_error)?;
        match answer.get("event_id").and_then(Value::as_str) {
            Some(id) => {
                self.rooms().senders.insert(id, true);
                Ok(id.to_owned())
            }
            None => Err(SendError::Transient {
                message: format!("{what}: the answer has no event_id"),
                maybe_delivered: true,
            }),
        }
    }

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        check_text(&msg.text)?;
        let room = room_id(&msg.chat.id)?;
        if msg.delivery_id.is_empty() {
            return Err(SendError::Permanent(
                "the message has no delivery id (the Matrix transaction id)".into(),
            ));
        }
        let mut content = json!({
            "msgtype": "m.text",
            "body": msg.text,
            // Nobody is notified, whatever the text says.
            "m.mentions": {},
        });
        let reply_to = msg.reply_to.as_deref().map(event_id).transpose()?;
        let thread = msg.chat.thread.as_deref().map(event_id).transpose()?;
        match (thread, reply_to) {
            (Some(root), Some(reply)) => {
                content["m.relates_to"] = json!({
                    "rel_type": "m.thread",
                    "event_id": root,
                    "is_falling_back": false,
                    "m.in_reply_to": { "event_id": reply },
                });
            }
            (Some(root), None) => {
                content["m.relates_to"] = json!({
                    "rel_type": "m.thread",
                    "event_id": root,
                    "is_falling_back": true,
                    "m.in_reply_to": { "event_id": root },
                });
            }
            (None, Some(reply)) => {
                content["m.relates_to"] = json!({ "m.in_reply_to": { "event_id": reply } });
            }
            (None, None) => {}
        }
        self.refuse_encrypted(room).await?;
        let id = self
            .put_message("send", room, &msg.delivery_id, &content)
            .await?;
        Ok(Sent { message_id: id })
    }

    async fn edit_inner(
        &self,
        chat: &ChatRef,
        message_id: &str,
        text: &str,
    ) -> Result<(), SendError> {
        check_text(text)?;
        let room = room_id(&chat.id)?;
        let original = event_id(message_id)?;
        let content = json!({
            "msgtype": "m.text",
            "body": format!("* {text}"),
            "m.new_content": { "msgtype": "m.text", "body": text, "m.mentions": {} },
            "m.relates_to": { "rel_type": "m.replace", "event_id": original },
            "m.mentions": {},
        });
        self.refuse_encrypted(room).await?;
        // The same edit retried is the same transaction: the homeserver posts it once.
        let txn = format!("edit-{}", short_digest(&[room, original, text]));
        self.put_message("edit", room, &txn, &content)
            .await
            .map(drop)
    }

    async fn typing_inner(&self, chat: &ChatRef) -> Result<(), SendError> {
        let room = room_id(&chat.id)?;
        let url = self
            .url(CLIENT_V3, &["rooms", room, "typing", &self.user_id])
            .map_err(|_| bad_id("room id", room))?;
        let body = json!({ "typing": true, "timeout": TYPING_TIMEOUT_MS });
        self.call("typing", Method::PUT, &url, Some(&body), REQUEST_TIMEOUT)
            .await
            .map(drop)
            .map_err(send_error)
    }

    /// `POST /rooms/{roomId}/leave` (also rejects an invitation); the error as text.
    async fn leave(&self, room: &str) -> Result<(), String> {
        let url = self
            .url(CLIENT_V3, &["rooms", room, "leave"])
            .map_err(|_| "the room id cannot be used in a URL".to_owned())?;
        self.call(
            "leave",
            Method::POST,
            &url,
            Some(&json!({})),
            REQUEST_TIMEOUT,
        )
        .await
        .map(drop)
        .map_err(|e| send_error(e).to_string())
    }

    /// Leaves an encrypted room and says why.
    async fn refuse_and_leave(&self, room: &str) -> SendError {
        let mut why = encrypted_refusal(room);
        match self.leave(room).await {
            Ok(()) => why.push_str("; the invitation was rejected"),
            Err(e) => why.push_str(&format!("; leaving it failed too: {e}")),
        }
        SendError::Permanent(why)
    }

    async fn join_inner(&self, chat: &ChatRef) -> Result<(), SendError> {
        let room = chat.id.as_str();
        if !(room.starts_with('!') || room.starts_with('#')) || room.len() > 255 {
            return Err(bad_id("room id or alias", room));
        }
        if self.rooms().encrypted.contains(room) {
            return Err(self.refuse_and_leave(room).await);
        }
        let url = self
            .url(CLIENT_V3, &["join", room])
            .map_err(|_| bad_id("room id", room))?;
        let answer = self
            .call(
                "join",
                Method::POST,
                &url,
                Some(&json!({})),
                REQUEST_TIMEOUT,
            )
            .await
            .map_err(send_error)?;
        let joined = answer
            .get("room_id")
            .and_then(Value::as_str)
            .unwrap_or(room)
            .to_owned();
        // The invite state may not have said: the room's state now does.
        if self.room_encrypted(&joined).await? {
            return Err(self.refuse_and_leave(&joined).await);
        }
        Ok(())
    }

    /// The authenticated media download, bounded by `max_bytes` (the announced size first,
    /// then `Content-Length`, then the bytes as they come). A redirect (a CDN) is followed once,
    /// without the token, and only to `https` (or `http` on loopback).
    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        let Some((server, media)) = parse_mxc(&a.file_ref) else {
            return Err(ChannelError::Protocol(format!(
                "{:?} is not an mxc://<server>/<media id> URI",
                a.file_ref
            )));
        };
        http::check_size(a.size, max_bytes)?;
        let url = self
            .url(CLIENT_V1, &["media", "download", server, media])
            .map_err(|_| ChannelError::Protocol("media download: bad URL".into()))?;
        let what = "media download";
        let secrets = self.secrets();
        let req = self
            .http
            .get(&url)
            .bearer_auth(self.token.as_str())
            .timeout(DOWNLOAD_TIMEOUT);
        let mut resp = http::send_download(req, what, &secrets).await?;
        if matches!(resp.status().as_u16(), 307 | 308) {
            let target = redirect_target(&resp).ok_or_else(|| {
                ChannelError::Protocol(
                    "media download: a redirect to somewhere other than https".into(),
                )
            })?;
            let req = self.http.get(target).timeout(DOWNLOAD_TIMEOUT);
            resp = http::send_download(req, what, &secrets).await?;
        }
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let header_retry = retry_after_header(&resp);
            let body = http::read_answer::<ApiError>(what, &mut resp, 64 * 1024, &secrets)
                .await
                .unwrap_or_default();
            return Err(channel_error(self.api_error(
                what,
                status,
                header_retry,
                &body,
            )));
        }
        http::read_download(resp, what, max_bytes, &secrets).await
    }
}

impl Platform for Matrix {
    fn kind(&self) -> &'static str {
        "matrix"
    }

    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: MAX_BUTTON_DATA,
        }
    }

    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            let me = self.whoami().await?;
            self.snapshot(&me).await?;
            let localpart = me
                .user_id
                .trim_start_matches('@')
                .split(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            Ok(BotInfo {
                id: me.user_id.clone(),
                username: me.display_name.unwrap_or(localpart),
            })
        })
    }

    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(self.poll_inner(cursor))
    }

    /// Matrix delivers by `/sync` only: no webhook routes.
    fn webhook(&self, _req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        Err(ChannelError::NoSuchRoute)
    }

    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>> {
        Box::pin(self.send_inner(msg))
    }

    /// An `m.replace` edit; `buttons` are ignored (Matrix has none).
    fn edit<'a>(
        &'a self,
        chat: &'a ChatRef,
        message_id: &'a str,
        text: &'a str,
        _buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.edit_inner(chat, message_id, text))
    }

    /// Matrix has no buttons, so no press to answer.
    fn answer_button<'a>(
        &'a self,
        _callback_id: &'a str,
        _text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async {
            Err(SendError::Permanent(
                "Matrix has no buttons: there is no button press to answer".into(),
            ))
        })
    }

    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.typing_inner(chat))
    }

    fn join<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.join_inner(chat))
    }

    /// The homeserver deduplicates a retried send by its transaction id
    /// ([`OutMessage::delivery_id`]) for the same access token (Synapse keeps them for at
    /// least 30 minutes).
    fn sends_are_idempotent(&self) -> bool {
        true
    }

    /// Matrix messages have no buttons: approvals are answered with `/approve CODE`.
    fn has_buttons(&self) -> bool {
        false
    }

    fn fetch_attachment<'a>(
        &'a self,
        attachment: &'a Attachment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(self.fetch_inner(attachment, max_bytes))
    }
}

// ---- Errors ----

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|api| match api {
        ApiError {
            status: 429,
            retry_after,
            ..
        } => SendError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
        },
        // The homeserver received the request; whether it acted on it is unknown.
        ApiError {
            status: 500..,
            message,
            ..
        } => SendError::Transient {
            message,
            maybe_delivered: true,
        },
        ApiError {
            status: 401,
            message,
            ..
        } => SendError::Permanent(format!(
            "{message}: the homeserver refused the access token; check it (`chitin secrets set`)"
        )),
        ApiError { message, .. } => SendError::Permanent(message),
    })
}

/// For calls about something other than the account (media, look-ups): a 403 or 404 is the
/// thing's, not the token's.
fn channel_error(e: CallError) -> ChannelError {
    match e {
        CallError::Api(ApiError {
            status: 403 | 404,
            message,
            ..
        }) => ChannelError::Protocol(message),
        other => account_error(other),
    }
}

/// For `whoami` and `/sync`: a 401, 403 or 404 means the token or the homeserver URL is wrong.
fn account_error(e: CallError) -> ChannelError {
    e.into_channel_error(|api| match api {
        ApiError {
            status: 429,
            retry_after,
            ..
        } => ChannelError::RateLimited {
            retry_after: retry_after.unwrap_or(DEFAULT_RETRY_AFTER),
        },
        ApiError {
            status: 500..,
            message,
            ..
        } => ChannelError::Transient(message),
        ApiError {
            status: 401 | 403 | 404,
            message,
            ..
        } => ChannelError::Unauthorized(message),
        ApiError { message, .. } => ChannelError::Protocol(message),
    })
}

fn encrypted_refusal(room: &str) -> String {
    format!(
        "the room {room} is an end-to-end encrypted room: Chitin cannot encrypt, and never sends \
         plaintext into an encrypted room; use a room without encryption"
    )
}

fn bad_id(what: &str, id: &str) -> SendError {
    SendError::Permanent(format!("{:?} is not a Matrix {what}", id))
}

/// The `Retry-After` header (in seconds).
fn retry_after_header(resp: &reqwest::Response) -> Option<Duration> {
    http::retry_after_secs(resp.headers()).map(Duration::from_secs)
}

/// Where a media redirect points, if it is `https` (or `http` on loopback) without
/// credentials.
fn redirect_target(resp: &reqwest::Response) -> Option<Url> {
    let location = resp
        .headers()
        .get(reqwest::header::LOCATION)?
        .to_str()
        .ok()?;
    let url = resp.url().join(location).ok()?;
    let ok = url.username().is_empty()
        && url.password().is_none()
        && match url.scheme() {
            "https" => true,
            "http" => http::is_loopback(&url),
            _ => false,
        };
    ok.then_some(url)
}

// ---- Checks and encodings ----

fn check_access_token(token: &str) -> Result<(), ConfigError> {
    if !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        // Never echo the value: it may be a real credential pasted in the wrong place.
        Err(ConfigError::Invalid(
            "the Matrix access token must be 1-4096 printable ASCII characters without spaces; \
             set it again with `chitin secrets set`"
                .into(),
        ))
    }
}

fn check_user_id(user_id: &str) -> Result<(), ConfigError> {
    let ok = user_id.len() <= 255
        && user_id.strip_prefix('@').is_some_and(|rest| {
            rest.split_once(':')
                .is_some_and(|(local, server)| !local.is_empty() && !server.is_empty())
        })
        && user_id
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "`user_id` {:?} is not a Matrix user id of the form @name:server",
            user_id
        )))
    }
}

/// A text the homeserver would take, refused here without a request otherwise.
fn check_text(text: &str) -> Result<(), SendError> {
    check_sendable(text, MAX_TEXT, None, "this adapter's Matrix limit of")
}

fn room_id(id: &str) -> Result<&str, SendError> {
    if id.starts_with('!') && id.len() <= 255 {
        Ok(id)
    } else {
        Err(bad_id("room id", id))
    }
}

fn event_id(id: &str) -> Result<&str, SendError> {
    if id.starts_with('$') && id.len() <= 255 {
        Ok(id)
    } else {
        Err(bad_id("event id", id))
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a `/`, `?`, `#`, `%`
/// or space in an id (room v3 event ids contain `/` and `+`) stays inside its segment.
fn encode_segment(s: &str) -> Result<String, BadSegment> {
    if s.is_empty() || s.bytes().all(|b| b == b'.') {
        return Err(BadSegment);
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(out)
}

/// `mxc://<server name>/<media id>`, strictly: a server name of letters, digits, `.`, `-`,
/// `:` (port) and `[]` (IPv6), a media id of letters, digits, `_` and `-`.
fn parse_mxc(uri: &str) -> Option<(&str, &str)> {
    let rest = uri.strip_prefix("mxc://")?;
    let (server, media) = rest.split_once('/')?;
    let server_ok = !server.is_empty()
        && server.len() <= 255
        && server.bytes().any(|b| b.is_ascii_alphanumeric())
        && server
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    let media_ok = !media.is_empty()
        && media.len() <= 255
        && media
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (server_ok && media_ok).then_some((server, media))
}

/// The first 16 hex digits of the SHA-256 of the parts (NUL-separated): a stable id.
fn short_digest(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0u8]);
        }
        h.update(p.as_bytes());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The inline `/sync` filter: only what this adapter reads.
fn sync_filter(timeline_limit: u32) -> String {
    let none = json!({ "not_types": ["*"] });
    json!({
        "presence": none,
        "account_data": { "types": ["m.direct"] },
        "room": {
            "timeline": { "limit": timeline_limit, "types": TIMELINE_TYPES },
            "state": {
                "types": ["m.room.encryption", "m.room.member"],
                "lazy_load_members": true,
                // Senders' names even when the homeserver sent them to this device before
                // (a restarted adapter has forgotten them).
                "include_redundant_members": true,
            },
            "ephemeral": none,
            "account_data": none,
        },
    })
    .to_string()
}

// ---- The sync answer ----

/// A `/sync` answer; rooms are read leniently (one unreadable room or event is skipped, it
/// does not stall the channel).
struct SyncAnswer {
    next_batch: String,
    rooms: Value,
    account_data: Option<Value>,
}

impl SyncAnswer {
    fn parse(mut v: Value) -> Result<Self, ChannelError> {
        let Some(next_batch) = v
            .get("next_batch")
            .and_then(Value::as_str)
            .filter(|b| !b.is_empty())
            .map(String::from)
        else {
            return Err(ChannelError::Protocol(
                "sync answered without a next_batch".into(),
            ));
        };
        Ok(Self {
            next_batch,
            rooms: v.get_mut("rooms").map(Value::take).unwrap_or(Value::Null),
            account_data: v.get_mut("account_data").map(Value::take),
        })
    }

    fn section(&self, name: &str) -> impl Iterator<Item = (&str, &Value)> {
        self.rooms
            .get(name)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_str(), v))
    }

    fn joined(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.section("join")
    }

    fn invited(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.section("invite")
    }
}

/// The `events` list of a section (`state`, `timeline`, `invite_state`, `account_data`).
fn events_of(section: Option<&Value>) -> &[Value] {
    section
        .and_then(|s| s.get("events"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The rooms of an `m.direct` content (`{"@user:server": ["!room:server", …]}`).
fn direct_rooms(content: Option<&Value>) -> HashSet<String> {
    content
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(_, rooms)| rooms.as_array())
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

/// What one state or timeline event tells about the room.
fn learn_event(rooms: &mut Rooms, room: &str, ev: &Value, me: &Me) {
    let kind = ev.get("type").and_then(Value::as_str);
    let state_key = ev.get("state_key").and_then(Value::as_str);
    match (kind, state_key) {
        (Some("m.room.encryption"), Some("")) => {
            rooms.encrypted.insert(room.to_owned());
        }
        (Some("m.room.member"), Some(user)) => {
            let content = ev.get("content");
            let joined = content
                .and_then(|c| c.get("membership"))
                .and_then(Value::as_str)
                == Some("join");
            let name = content
                .and_then(|c| c.get("displayname"))
                .and_then(Value::as_str)
                .filter(|n| !n.trim().is_empty());
            if let (true, Some(name)) = (joined, name) {
                rooms.remember_name(room, user, name);
            }
        }
        _ => {}
    }
    // Who sent what, for replies to it later.
    if let (Some(id), Some(sender)) = (
        ev.get("event_id").and_then(Value::as_str),
        ev.get("sender").and_then(Value::as_str),
    ) {
        rooms.senders.insert(id, sender == me.user_id);
    }
}

#[derive(Deserialize)]
struct RoomEvent {
    event_id: String,
    sender: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    content: Value,
    state_key: Option<String>,
}

#[derive(Deserialize, Default)]
struct Content {
    msgtype: Option<String>,
    body: Option<String>,
    filename: Option<String>,
    url: Option<String>,
    info: Option<FileInfo>,
    #[serde(rename = "m.relates_to")]
    relates_to: Option<RelatesTo>,
    #[serde(rename = "m.mentions")]
    mentions: Option<Mentions>,
    #[serde(rename = "m.new_content")]
    new_content: Option<Box<Content>>,
}

#[derive(Deserialize, Default)]
struct FileInfo {
    mimetype: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
struct RelatesTo {
    rel_type: Option<String>,
    event_id: Option<String>,
    #[serde(rename = "m.in_reply_to")]
    in_reply_to: Option<InReplyTo>,
    #[serde(default)]
    is_falling_back: bool,
}

#[derive(Deserialize)]
struct InReplyTo {
    event_id: String,
}

#[derive(Deserialize, Default)]
struct Mentions {
    #[serde(default)]
    user_ids: Vec<String>,
}

/// A mapped event, with the reply target still to check when nothing else addressed the bot.
struct Draft {
    room: String,
    inbound: Inbound,
    check_reply: Option<String>,
}

/// Maps one timeline event; `None` for the bot's own events and state events.
fn draft(rooms: &Rooms, room: &str, ev: &Value, me: &Me) -> Option<Draft> {
    let Ok(ev) = RoomEvent::deserialize(ev) else {
        // Without an event id there is nothing to deduplicate it by; a homeserver always
        // sends one.
        let event_id = ev.get("event_id").and_then(Value::as_str)?;
        return Some(ignored(room, event_id, "an event this adapter cannot read"));
    };
    if ev.sender == me.user_id || ev.state_key.is_some() {
        return None;
    }
    let what = match ev.kind.as_str() {
        "m.room.message" if rooms.encrypted.contains(room) => {
            "a message in an end-to-end encrypted room"
        }
        "m.room.message" => return Some(draft_message(rooms, room, ev, me)),
        "m.room.encrypted" => "an end-to-end encrypted message (this adapter cannot decrypt)",
        "m.reaction" => "a reaction",
        "m.sticker" => "a sticker",
        _ => "an event of a type this adapter does not handle",
    };
    Some(ignored(room, &ev.event_id, what))
}

fn ignored(room: &str, event_id: &str, what: &str) -> Draft {
    Draft {
        room: room.to_owned(),
        inbound: Inbound {
            event_id: format!("e:{event_id}"),
            event: Event::Ignored { what: what.into() },
        },
        check_reply: None,
    }
}

fn draft_message(rooms: &Rooms, room: &str, ev: RoomEvent, me: &Me) -> Draft {
    let Ok(content) = Content::deserialize(&ev.content) else {
        return ignored(room, &ev.event_id, "a message this adapter cannot read");
    };
    let relates = content.relates_to.as_ref();
    let rel_type = relates.and_then(|r| r.rel_type.as_deref());
    let kind = rooms.kind(room);
    let display = rooms
        .names
        .get(&(room.to_owned(), ev.sender.clone()))
        .cloned()
        .unwrap_or_else(|| ev.sender.clone());

    if rel_type == Some("m.replace") {
        let Some(original) = relates.and_then(|r| r.event_id.clone()) else {
            return ignored(room, &ev.event_id, "an edit without the edited event");
        };
        let new = content.new_content.as_deref();
        let (msgtype, body, payload) = match new {
            Some(n) => (n.msgtype.as_deref(), n.body.as_deref(), n),
            None => (
                content.msgtype.as_deref(),
                content
                    .body
                    .as_deref()
                    .map(|b| b.strip_prefix("* ").unwrap_or(b)),
                &content,
            ),
        };
        let Ok((text, attachments)) = body_of(msgtype, body, payload) else {
            return ignored(
                room,
                &ev.event_id,
                "an edit into content this adapter does not handle",
            );
        };
        let mentioned = kind == ChatKind::Dm
            || mentions_bot(payload.mentions.as_ref(), me)
            || body_names_bot(&text, me);
        let message = Message {
            chat: ChatRef {
                id: room.to_owned(),
                kind,
                thread: None,
            },
            message_id: original,
            sender: sender(&ev.sender, display, msgtype),
            text,
            mentioned,
            reply_to: None,
            attachments,
        };
        return Draft {
            room: room.to_owned(),
            inbound: Inbound {
                event_id: format!("e:{}", ev.event_id),
                event: Event::Edited(message),
            },
            check_reply: None,
        };
    }

    let thread = match (rel_type, relates.and_then(|r| r.event_id.clone())) {
        (Some("m.thread"), Some(root)) => Some(root),
        _ => None,
    };
    let reply_to = relates
        .filter(|r| !(thread.is_some() && r.is_falling_back))
        .and_then(|r| r.in_reply_to.as_ref())
        .map(|r| r.event_id.clone());
    let body = match (&reply_to, content.body.as_deref()) {
        (Some(_), Some(b)) => Some(strip_reply_fallback(b)),
        (_, b) => b,
    };
    let msgtype = content.msgtype.as_deref();
    let (text, attachments) = match body_of(msgtype, body, &content) {
        Ok(x) => x,
        Err(what) => return ignored(room, &ev.event_id, &what),
    };
    let reply_by_bot = reply_to
        .as_deref()
        .and_then(|r| rooms.senders.get(r))
        .unwrap_or(false);
    let mentioned = kind == ChatKind::Dm
        || mentions_bot(content.mentions.as_ref(), me)
        || body_names_bot(&text, me)
        || reply_by_bot;
    let check_reply = match &reply_to {
        Some(r) if !mentioned && rooms.senders.get(r).is_none() => Some(r.clone()),
        _ => None,
    };
    Draft {
        room: room.to_owned(),
        inbound: Inbound {
            event_id: format!("e:{}", ev.event_id),
            event: Event::Message(Message {
                chat: ChatRef {
                    id: room.to_owned(),
                    kind,
                    thread,
                },
                message_id: ev.event_id.clone(),
                sender: sender(&ev.sender, display, msgtype),
                text,
                mentioned,
                reply_to,
                attachments,
            }),
        },
        check_reply,
    }
}

/// `m.notice` is what bots send by convention (and must not be answered, to avoid loops).
fn sender(id: &str, display: String, msgtype: Option<&str>) -> Sender {
    Sender {
        id: id.to_owned(),
        display,
        is_bot: msgtype == Some("m.notice"),
    }
}

/// The text and attachments of a message's content, or why it is ignored.
fn body_of(
    msgtype: Option<&str>,
    body: Option<&str>,
    content: &Content,
) -> Result<(String, Vec<Attachment>), String> {
    let Some(msgtype) = msgtype else {
        return Err("a message without a msgtype (redacted?)".into());
    };
    match msgtype {
        "m.text" | "m.notice" | "m.emote" => match body {
            Some(b) if !b.is_empty() => Ok((b.to_owned(), Vec::new())),
            _ => Err("a message without a body".into()),
        },
        "m.image" | "m.file" | "m.audio" | "m.video" => {
            let Some(url) = content.url.clone() else {
                return Err(format!("an {msgtype} without a url (encrypted?)"));
            };
            let body = body.unwrap_or_default();
            // With `filename` set, a `body` that differs from it is a caption.
            let (name, caption) = match content.filename.as_deref() {
                Some(f) if f != body => (Some(f.to_owned()), body.to_owned()),
                Some(f) => (Some(f.to_owned()), String::new()),
                None => ((!body.is_empty()).then(|| body.to_owned()), String::new()),
            };
            let info = content.info.as_ref();
            Ok((
                caption,
                vec![Attachment {
                    file_ref: url,
                    name,
                    mime: info.and_then(|i| i.mimetype.clone()),
                    size: info.and_then(|i| i.size),
                }],
            ))
        }
        other => Err(format!("an {other} message")),
    }
}

fn mentions_bot(mentions: Option<&Mentions>, me: &Me) -> bool {
    mentions.is_some_and(|m| m.user_ids.contains(&me.user_id))
}

/// The text names the bot: its user id anywhere, or its display name as a whole word
/// (case-insensitive both).
fn body_names_bot(text: &str, me: &Me) -> bool {
    let lower = text.to_lowercase();
    if lower.contains(&me.user_id.to_lowercase()) {
        return true;
    }
    let Some(name) = me.display_name.as_deref() else {
        return false;
    };
    let name = name.trim().to_lowercase();
    if name.is_empty() {
        return false;
    }
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    lower.match_indices(&name).any(|(i, m)| {
        let before = lower.get(..i).and_then(|s| s.chars().next_back());
        let after = lower.get(i + m.len()..).and_then(|s| s.chars().next());
        !word(before) && !word(after)
    })
}

/// Removes a rich reply's legacy fallback: the leading lines that start with `> `, and the
/// blank line after them.
fn strip_reply_fallback(body: &str) -> &str {
    let mut rest = body;
    let mut stripped = false;
    while rest.starts_with("> ") {
        stripped = true;
        rest = match rest.find('\n') {
            Some(i) => rest.get(i + 1..).unwrap_or_default(),
            None => "",
        };
    }
    if stripped {
        rest.strip_prefix('\n').unwrap_or(rest)
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    fn cfg(base: &str, token: &str) -> MatrixConfig {
        MatrixConfig::new(
            Url::parse(base).unwrap(),
            "@bot:example.org",
            Zeroizing::new(token.into()),
        )
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_accepted_on_it() {
        let err = Matrix::new(cfg("http://matrix.example.org", "syt_abc")).unwrap_err();
        assert!(
            err.to_string()
                .contains("plain http on a non-loopback host"),
            "{err}"
        );
        Matrix::new(cfg("http://127.0.0.1:9", "syt_abc")).unwrap();
        Matrix::new(cfg("http://[::1]:9/", "syt_abc")).unwrap();
        Matrix::new(cfg("https://matrix.example.org/", "syt_abc")).unwrap();
        let err = Matrix::new(cfg("https://u:p@matrix.example.org/", "syt_abc")).unwrap_err();
        assert!(err.to_string().contains("user name or password"), "{err}");
    }

    #[test]
    fn a_malformed_token_or_user_id_is_refused_without_echoing_the_token() {
        let err = Matrix::new(cfg("https://m.example.org", "syt abc SECRETPART")).unwrap_err();
        assert!(!err.to_string().contains("SECRETPART"), "{err}");
        assert!(err.to_string().contains("printable ASCII"), "{err}");
        assert!(Matrix::new(cfg("https://m.example.org", "")).is_err());
        for bad in [
            "bot:example.org",
            "@bot",
            "@:example.org",
            "@bot:",
            "@b ot:x",
        ] {
            let mut c = cfg("https://m.example.org", "syt_abc");
            c.user_id = bad.into();
            let err = Matrix::new(c).unwrap_err();
            assert!(
                err.to_string().contains("not a Matrix user id"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_access_token() {
        let c = cfg("https://m.example.org", "syt_SECRETTOKENVALUE");
        assert!(!format!("{c:?}").contains("SECRETTOKENVALUE"));
        let m = Matrix::new(c).unwrap();
        let shown = format!("{m:?}");
        assert!(!shown.contains("SECRETTOKENVALUE"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn path_segments_are_percent_encoded_and_dot_segments_refused() {
        assert_eq!(encode_segment("$ab/c+d=e").unwrap(), "%24ab%2Fc%2Bd%3De");
        assert_eq!(encode_segment("!r:ex.org").unwrap(), "%21r%3Aex.org");
        assert_eq!(encode_segment("a b?c#d%").unwrap(), "a%20b%3Fc%23d%25");
        assert_eq!(encode_segment("é").unwrap(), "%C3%A9");
        assert!(encode_segment("").is_err());
        assert!(encode_segment(".").is_err());
        assert!(encode_segment("..").is_err());
        assert_eq!(encode_segment("..a").unwrap(), "..a");
    }

    #[test]
    fn mxc_uris_are_parsed_strictly() {
        assert_eq!(
            parse_mxc("mxc://example.org/AbC_12-x"),
            Some(("example.org", "AbC_12-x"))
        );
        assert_eq!(
            parse_mxc("mxc://[::1]:8448/abc"),
            Some(("[::1]:8448", "abc"))
        );
        for bad in [
            "https://example.org/abc",
            "mxc://example.org",
            "mxc://example.org/",
            "mxc:///abc",
            "mxc://example.org/a/b",
            "mxc://example.org/../x",
            "mxc://../abc",
            "mxc://ex ample.org/abc",
            "mxc://example.org/a%2Fb",
            "mxc://example.org/abc?x=1",
        ] {
            assert_eq!(parse_mxc(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_reply_fallback_is_stripped_and_other_quotes_are_kept() {
        assert_eq!(
            strip_reply_fallback("> <@bot:ex.org> hello\n> more\n\nthanks!"),
            "thanks!"
        );
        assert_eq!(strip_reply_fallback("> quoted\nreply"), "reply");
        assert_eq!(
            strip_reply_fallback("no fallback\n> quote"),
            "no fallback\n> quote"
        );
        assert_eq!(strip_reply_fallback(">not a fallback"), ">not a fallback");
        assert_eq!(strip_reply_fallback("> only"), "");
    }

    #[test]
    fn the_display_name_counts_only_as_a_whole_word() {
        let me = Me {
            user_id: "@chitin:ex.org".into(),
            display_name: Some("Chitin".into()),
        };
        assert!(body_names_bot("hey chitin, what's up", &me));
        assert!(body_names_bot("CHITIN!", &me));
        assert!(body_names_bot("ask @Chitin:ex.org", &me));
        assert!(!body_names_bot("chitinous shells", &me));
        assert!(!body_names_bot("exoskeleton_chitin", &me));
        assert!(!body_names_bot("nothing here", &me));
        let nameless = Me {
            display_name: None,
            ..me
        };
        assert!(!body_names_bot("chitin", &nameless));
        assert!(body_names_bot("@chitin:ex.org", &nameless));
    }

    #[test]
    fn a_room_is_a_dm_with_two_members_or_in_m_direct_unless_it_grew() {
        let mut r = Rooms::default();
        r.joined.insert("!a".into(), 2);
        r.joined.insert("!b".into(), 3);
        r.joined.insert("!c".into(), 3);
        r.joined.insert("!d".into(), 1);
        r.direct.insert("!c".into());
        r.direct.insert("!d".into());
        r.direct.insert("!e".into());
        assert_eq!(r.kind("!a"), ChatKind::Dm);
        assert_eq!(r.kind("!b"), ChatKind::Group);
        assert_eq!(r.kind("!c"), ChatKind::Group, "a DM that grew is a group");
        assert_eq!(r.kind("!d"), ChatKind::Dm);
        assert_eq!(r.kind("!e"), ChatKind::Dm);
        assert_eq!(r.kind("!unknown"), ChatKind::Group);
    }

    #[test]
    fn remembered_events_are_bounded() {
        let mut r = Remembered::default();
        for i in 0..(MAX_REMEMBERED_EVENTS + 10) {
            r.insert(&format!("$e{i}"), true);
        }
        assert_eq!(r.map.len(), MAX_REMEMBERED_EVENTS);
        assert_eq!(r.get("$e0"), None);
        assert_eq!(
            r.get(&format!("$e{}", MAX_REMEMBERED_EVENTS + 9)),
            Some(true)
        );
    }

    #[test]
    fn the_sync_filter_asks_only_for_what_is_read() {
        let f: Value = serde_json::from_str(&sync_filter(7)).unwrap();
        assert_eq!(f["room"]["timeline"]["limit"], 7);
        assert_eq!(f["room"]["timeline"]["types"], json!(TIMELINE_TYPES));
        assert_eq!(f["room"]["state"]["lazy_load_members"], true);
        assert_eq!(f["presence"]["not_types"], json!(["*"]));
        assert_eq!(f["account_data"]["types"], json!(["m.direct"]));
    }
}
