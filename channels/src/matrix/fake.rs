//! A fake Matrix homeserver on 127.0.0.1 for tests, speaking the real Client-Server API wire
//! format (`/_matrix/client/v3/...` with `Authorization: Bearer <token>`, JSON bodies, errors
//! as `{"errcode": "M_…", "error": "…"}`).
//!
//! The test drives it: it creates rooms ([`FakeMatrix::create_room`],
//! [`FakeMatrix::create_encrypted_room`]), marks DMs in the bot's `m.direct`
//! ([`FakeMatrix::set_direct`]), invites the bot ([`FakeMatrix::invite_bot`]), pushes events
//! ([`FakeMatrix::push_text`], [`FakeMatrix::push`]), stores media ([`FakeMatrix::put_media`]),
//! reads what the bot did ([`FakeMatrix::sent`], [`FakeMatrix::typing`],
//! [`FakeMatrix::joins`], [`FakeMatrix::leaves`], [`FakeMatrix::downloads`],
//! [`FakeMatrix::calls`]) and scripts failures of the next requests to an endpoint
//! ([`FakeMatrix::fail_next`]).
//!
//! Behaviour that matches a real homeserver (Synapse):
//! - a missing token is `401 M_MISSING_TOKEN`, a wrong one `401 M_UNKNOWN_TOKEN`; an unknown
//!   endpoint is `404 M_UNRECOGNIZED`; path segments are percent-decoded (an event id with a
//!   `/` must arrive encoded, or the request goes nowhere);
//! - every change is an event at a position of one stream; `/sync` answers `next_batch` =
//!   `s<position>` and, with `since`, only what came after it (so the same `since` gives the
//!   same events again); without `since` the rooms' state and last timeline events. It honours
//!   the filter's `room.timeline.limit` (older events are dropped with `limited: true`) and
//!   `types`/`not_types` (with `*` wildcards), `account_data` types, and `lazy_load_members`
//!   (member events of the timeline's senders; the summary's `m.joined_member_count` only then,
//!   and only when it changed or the room is new to the sync). With a `timeout` and nothing
//!   new it waits until something happens (tests never wait the timeout out);
//! - invitations carry stripped `invite_state` (`m.room.create`, `m.room.encryption` if the
//!   room is encrypted, the inviter's and the bot's `m.room.member`);
//! - `PUT /rooms/{roomId}/send/{type}/{txnId}` deduplicates by path: the same transaction id
//!   answers the same `event_id` and the event is recorded once; the bot's events come back in
//!   `/sync` like anyone's; sending to a room the bot has not joined is `403 M_FORBIDDEN`. The
//!   fake, like a homeserver, accepts plaintext in an encrypted room: tests check the bot never
//!   sends one;
//! - `POST /join/{roomId}` works for an invitation (or a room already joined), otherwise
//!   `403 M_FORBIDDEN`; `POST /rooms/{roomId}/leave` leaves or rejects an invitation;
//! - `GET /rooms/{roomId}/state/m.room.encryption` is the encryption content or
//!   `404 M_NOT_FOUND`; `/event/{eventId}` and `/joined_members` answer for joined rooms;
//! - `GET /_matrix/client/v1/media/download/{server}/{mediaId}` serves stored media with
//!   `Content-Length` (or chunked, without it), or redirects (307) to an unauthenticated
//!   `/cdn/<mediaId>` as a homeserver with a CDN does.
//!
//! Not modelled: filter ids (`POST /user/{userId}/filter`), presence, receipts, typing of
//! others, redactions, room aliases, federation, uploads, end-to-end encryption itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::fake_http::{self, Answered, Reply, Script, Server, lock};

/// The access token [`FakeMatrix::start`] accepts.
pub const TOKEN: &str = "syt_Y2hpdGlu_FakeMatrixAccessTokenForTests_0a1B2c";
/// The fake's server name.
pub const SERVER: &str = "fake.test";
/// The bot's user id.
pub const BOT: &str = "@chitin:fake.test";
/// The bot's display name.
pub const BOT_NAME: &str = "Chitin";

/// A failure of the next request(s) to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 429 `M_LIMIT_EXCEEDED` with `retry_after_ms` in the body (and `Retry-After` rounded up).
    RateLimited { retry_after_ms: u64 },
    /// 429 `M_LIMIT_EXCEEDED` with only a `Retry-After` header (seconds), as Matrix 1.10+
    /// recommends.
    RateLimitedHeader { retry_after_secs: u64 },
    /// 500 `M_UNKNOWN` "Internal server error".
    ServerError,
    /// 502 with an HTML body, as a front proxy answers.
    BadGateway,
    /// 403 `M_FORBIDDEN` with this message.
    Forbidden(String),
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is posted), then the connection is closed without an
    /// answer: the sender cannot know it was posted.
    DropAfterHandling,
}

/// An event the bot sent (recorded once per transaction).
#[derive(Debug, Clone, PartialEq)]
pub struct SentEvent {
    pub room_id: String,
    pub event_id: String,
    pub txn_id: String,
    pub event_type: String,
    pub content: Value,
}

/// A typing notification the bot set.
#[derive(Debug, Clone, PartialEq)]
pub struct Typing {
    pub room_id: String,
    pub user_id: String,
    pub body: Value,
}

/// A media download that was served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub media_id: String,
    /// The request carried an `Authorization` header (a CDN must never see the token).
    pub authorized: bool,
    /// Served by `/cdn/` after a redirect.
    pub via_cdn: bool,
}

/// One request (any token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `whoami`, `profile`, `sync`, `send`, `typing`, `join`, `leave`, `state`, `event`,
    /// `joined_members`, `media`, `cdn`, or `unknown`.
    pub endpoint: &'static str,
    pub method: String,
    /// The request target as received (path and query, still percent-encoded).
    pub target: String,
    /// The query's pairs, decoded.
    pub query: Vec<(String, String)>,
    /// It carried the right bearer token.
    pub authorized: bool,
}

impl Call {
    /// The decoded query parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Join,
    Invite,
    Leave,
}

impl Membership {
    fn as_str(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Invite => "invite",
            Self::Leave => "leave",
        }
    }
}

struct Room {
    encrypted: bool,
    members: BTreeMap<String, Membership>,
    /// Every event with its stream position, oldest first.
    events: Vec<(u64, Value)>,
}

impl Room {
    fn membership(&self, user: &str) -> Option<Membership> {
        self.members.get(user).copied()
    }

    fn joined(&self) -> impl Iterator<Item = &String> {
        self.members
            .iter()
            .filter(|(_, m)| **m == Membership::Join)
            .map(|(u, _)| u)
    }

    /// The position of the latest membership event of `user`.
    fn membership_pos(&self, user: &str) -> Option<u64> {
        self.events
            .iter()
            .rev()
            .find(|(_, e)| e["type"] == "m.room.member" && e["state_key"].as_str() == Some(user))
            .map(|(p, _)| *p)
    }

    /// The current content of the state event (`type`, `state_key`).
    fn state(&self, kind: &str, key: &str) -> Option<&Value> {
        self.events
            .iter()
            .rev()
            .find(|(_, e)| e["type"] == kind && e["state_key"].as_str() == Some(key))
            .map(|(_, e)| e)
    }
}

struct Media {
    content_type: String,
    bytes: Vec<u8>,
    /// Served without `Content-Length`.
    chunked: bool,
    /// The authenticated download redirects to `/cdn/`.
    cdn: bool,
}

#[derive(Default)]
struct State {
    token: String,
    bot: String,
    bot_name: Option<String>,
    base: String,
    /// The stream position of the latest change.
    pos: u64,
    next_event: u64,
    next_room: u64,
    rooms: BTreeMap<String, Room>,
    names: HashMap<String, String>,
    direct: BTreeMap<String, Vec<String>>,
    direct_pos: Option<u64>,
    /// Transactions by request path → event id.
    txns: HashMap<String, String>,
    sent: Vec<SentEvent>,
    typing: Vec<Typing>,
    joins: Vec<String>,
    leaves: Vec<String>,
    media: HashMap<String, Media>,
    downloads: Vec<Download>,
    calls: Vec<Call>,
    /// Scripted failures by endpoint.
    failures: Script<String, Failure>,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.pos += 1;
        self.pos
    }

    fn event_id(&mut self) -> String {
        self.next_event += 1;
        // Room version 3 event ids are unpadded base64 with `/` and `+`: they must be
        // percent-encoded in a path.
        format!("$Ev{:04}aB/cD+eF{}", self.next_event, self.next_event)
    }

    fn member_content(&self, user: &str, membership: Membership) -> Value {
        let mut c = json!({ "membership": membership.as_str() });
        let name = if user == self.bot {
            self.bot_name.clone()
        } else {
            self.names.get(user).cloned()
        };
        if let Some(n) = name {
            c["displayname"] = n.into();
        }
        c
    }

    /// Appends an event to a room's timeline; its id.
    fn append(
        &mut self,
        room_id: &str,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
    ) -> String {
        let id = self.event_id();
        let pos = self.tick();
        let mut ev = json!({
            "event_id": id,
            "sender": sender,
            "type": kind,
            "content": content,
            "origin_server_ts": now_ms(),
            "unsigned": { "age": 1 },
        });
        if let Some(k) = state_key {
            ev["state_key"] = k.into();
        }
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.events.push((pos, ev));
        }
        id
    }

    fn set_membership(&mut self, room_id: &str, user: &str, sender: &str, m: Membership) {
        let mut content = self.member_content(user, m);
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.members.insert(user.to_owned(), m);
        }
        if m == Membership::Invite {
            content["is_direct"] = false.into();
        }
        self.append(room_id, sender, "m.room.member", Some(user), content);
    }

    fn new_room(&mut self, creator: &str) -> String {
        self.next_room += 1;
        let id = format!("!room{}:{SERVER}", self.next_room);
        self.rooms.insert(
            id.clone(),
            Room {
                encrypted: false,
                members: BTreeMap::new(),
                events: Vec::new(),
            },
        );
        self.append(
            &id,
            creator,
            "m.room.create",
            Some(""),
            json!({ "room_version": "10" }),
        );
        id
    }

    fn encrypt(&mut self, room_id: &str, sender: &str) {
        if let Some(room) = self.rooms.get_mut(room_id) {
            room.encrypted = true;
        }
        self.append(
            room_id,
            sender,
            "m.room.encryption",
            Some(""),
            json!({ "algorithm": "m.megolm.v1.aes-sha2" }),
        );
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeMatrix {
    /// The state; its changes wake a waiting `/sync`.
    server: Server<State>,
}

impl fmt::Debug for FakeMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.server.debug("FakeMatrix", f)
    }
}

impl FakeMatrix {
    /// Starts a fake for [`TOKEN`] and the bot [`BOT`] named [`BOT_NAME`].
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(TOKEN, BOT, Some(BOT_NAME)).await
    }

    /// Starts a fake for `token` and the bot `bot` on a free port of 127.0.0.1.
    pub async fn start_with(
        token: &str,
        bot: &str,
        bot_name: Option<&str>,
    ) -> std::io::Result<Self> {
        let listener = fake_http::bind("/").await?;
        let state = State {
            token: token.into(),
            bot: bot.into(),
            bot_name: bot_name.map(String::from),
            base: format!("http://{}", listener.addr),
            pos: 1000,
            ..State::default()
        };
        Ok(Self {
            server: listener.serve(state, handle),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    fn notify(&self) {
        self.server.notify();
    }

    /// The homeserver URL to configure (`http://127.0.0.1:<port>/`).
    pub fn homeserver(&self) -> Url {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The `next_batch` a sync would answer now.
    pub fn next_batch(&self) -> String {
        format!("s{}", self.lock().pos)
    }

    /// Sets a user's display name (used by the member events created after this).
    pub fn set_name(&self, user: &str, name: &str) {
        self.lock().names.insert(user.into(), name.into());
    }

    /// A room the bot and `members` have joined (the first member created it).
    pub fn create_room(&self, members: &[&str]) -> String {
        self.room(members, false)
    }

    /// A room with `m.room.encryption` that the bot and `members` have joined.
    pub fn create_encrypted_room(&self, members: &[&str]) -> String {
        self.room(members, true)
    }

    fn room(&self, members: &[&str], encrypted: bool) -> String {
        let id = {
            let mut st = self.lock();
            let bot = st.bot.clone();
            let creator = members.first().copied().unwrap_or(bot.as_str()).to_owned();
            let id = st.new_room(&creator);
            st.set_membership(&id, &creator, &creator, Membership::Join);
            if encrypted {
                st.encrypt(&id, &creator);
            }
            for m in members.iter().skip(1) {
                st.set_membership(&id, m, m, Membership::Join);
            }
            if creator != bot {
                st.set_membership(&id, &bot, &bot, Membership::Join);
            }
            id
        };
        self.notify();
        id
    }

    /// Turns on encryption in a room (an `m.room.encryption` state event from `sender`).
    pub fn enable_encryption(&self, room: &str, sender: &str) {
        self.lock().encrypt(room, sender);
        self.notify();
    }

    /// Lists `room` as a DM with `user` in the bot's `m.direct` account data.
    pub fn set_direct(&self, user: &str, room: &str) {
        {
            let mut st = self.lock();
            st.direct.entry(user.into()).or_default().push(room.into());
            let pos = st.tick();
            st.direct_pos = Some(pos);
        }
        self.notify();
    }

    /// `user` joins `room`.
    pub fn join_member(&self, room: &str, user: &str) {
        self.lock()
            .set_membership(room, user, user, Membership::Join);
        self.notify();
    }

    /// `inviter` creates a room (encrypted or not) and invites the bot (`is_direct` as a DM
    /// invitation does); the room's id.
    pub fn invite_bot(&self, inviter: &str, is_direct: bool, encrypted: bool) -> String {
        let id = {
            let mut st = self.lock();
            let bot = st.bot.clone();
            let id = st.new_room(inviter);
            st.set_membership(&id, inviter, inviter, Membership::Join);
            if encrypted {
                st.encrypt(&id, inviter);
            }
            let mut content = st.member_content(&bot, Membership::Invite);
            content["is_direct"] = is_direct.into();
            if let Some(room) = st.rooms.get_mut(&id) {
                room.members.insert(bot.clone(), Membership::Invite);
            }
            st.append(&id, inviter, "m.room.member", Some(&bot), content);
            id
        };
        self.notify();
        id
    }

    /// Appends an event of `kind` with `content` from `sender` to `room`'s timeline; its id.
    pub fn push(&self, room: &str, sender: &str, kind: &str, content: Value) -> String {
        let id = self.lock().append(room, sender, kind, None, content);
        self.notify();
        id
    }

    /// An `m.text` message; its event id.
    pub fn push_text(&self, room: &str, sender: &str, body: &str) -> String {
        self.push(
            room,
            sender,
            "m.room.message",
            json!({ "msgtype": "m.text", "body": body }),
        )
    }

    /// The event `event_id` of `room` as stored.
    pub fn event(&self, room: &str, event_id: &str) -> Option<Value> {
        self.lock()
            .rooms
            .get(room)?
            .events
            .iter()
            .find(|(_, e)| e["event_id"] == event_id)
            .map(|(_, e)| e.clone())
    }

    /// The bot's membership of `room` (`join`, `invite`, `leave`), if any.
    pub fn bot_membership(&self, room: &str) -> Option<&'static str> {
        let st = self.lock();
        st.rooms
            .get(room)?
            .membership(&st.bot)
            .map(Membership::as_str)
    }

    /// Stores media served at `mxc://fake.test/<media_id>`; the URI.
    pub fn put_media(&self, media_id: &str, content_type: &str, bytes: Vec<u8>) -> String {
        self.media(media_id, content_type, bytes, false, false)
    }

    /// Like [`FakeMatrix::put_media`], served without `Content-Length` (chunked).
    pub fn put_media_chunked(&self, media_id: &str, content_type: &str, bytes: Vec<u8>) -> String {
        self.media(media_id, content_type, bytes, true, false)
    }

    /// Like [`FakeMatrix::put_media`], the download redirecting to `/cdn/<media_id>`.
    pub fn put_media_behind_cdn(
        &self,
        media_id: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> String {
        self.media(media_id, content_type, bytes, false, true)
    }

    fn media(&self, id: &str, ct: &str, bytes: Vec<u8>, chunked: bool, cdn: bool) -> String {
        self.lock().media.insert(
            id.into(),
            Media {
                content_type: ct.into(),
                bytes,
                chunked,
                cdn,
            },
        );
        format!("mxc://{SERVER}/{id}")
    }

    /// Every event the bot sent, in order (a deduplicated retry is not recorded again).
    pub fn sent(&self) -> Vec<SentEvent> {
        self.lock().sent.clone()
    }

    pub fn typing(&self) -> Vec<Typing> {
        self.lock().typing.clone()
    }

    /// Rooms the bot joined through `/join`, in order.
    pub fn joins(&self) -> Vec<String> {
        self.lock().joins.clone()
    }

    /// Rooms the bot left (or whose invitation it rejected), in order.
    pub fn leaves(&self) -> Vec<String> {
        self.lock().leaves.clone()
    }

    pub fn downloads(&self) -> Vec<Download> {
        self.lock().downloads.clone()
    }

    /// Every request, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The requests to `endpoint`.
    pub fn calls_to(&self, endpoint: &str) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .cloned()
            .collect()
    }

    /// The next `times` requests to `endpoint` (as in [`Call::endpoint`]) fail with `failure`
    /// (after earlier scripted ones).
    pub fn fail_next(&self, endpoint: &str, times: usize, failure: Failure) {
        self.lock().failures.push(endpoint.into(), times, failure);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

// ---- HTTP ----

/// A body of known chunks whose size is not announced (sent chunked).
struct Chunked(VecDeque<Bytes>);

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

fake_http::failing_by_drop_variants!(Failure);

fn ok(body: Value) -> Reply {
    fake_http::json(StatusCode::OK, &body)
}

fn error(status: u16, errcode: &str, message: &str) -> Reply {
    fake_http::json(
        fake_http::status(status, StatusCode::BAD_REQUEST),
        &json!({ "errcode": errcode, "error": message }),
    )
}

fn failure_response(f: &Failure) -> Reply {
    match f {
        Failure::RateLimited { retry_after_ms } => {
            let mut r = fake_http::json(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({
                    "errcode": "M_LIMIT_EXCEEDED",
                    "error": "Too Many Requests",
                    "retry_after_ms": retry_after_ms,
                }),
            );
            r.headers_mut().insert(
                RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000)),
            );
            r
        }
        Failure::RateLimitedHeader { retry_after_secs } => {
            let mut r = fake_http::json(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests" }),
            );
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            r
        }
        Failure::ServerError => error(500, "M_UNKNOWN", "Internal server error"),
        Failure::BadGateway => fake_http::respond(
            StatusCode::BAD_GATEWAY,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        ),
        Failure::Forbidden(m) => error(403, "M_FORBIDDEN", m),
        // Not reached: drops are handled before.
        Failure::Drop | Failure::DropAfterHandling => {
            error(500, "M_UNKNOWN", "Internal server error")
        }
    }
}

/// Percent-decodes one path segment; `None` when it is not valid UTF-8 or a bad escape.
fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A request, routed.
enum Route {
    Whoami,
    Profile(String),
    Sync,
    Send {
        room: String,
        kind: String,
        txn: String,
    },
    Typing {
        room: String,
        user: String,
    },
    Join(String),
    Leave(String),
    State {
        room: String,
        kind: String,
        key: String,
    },
    Event {
        room: String,
        event_id: String,
    },
    JoinedMembers(String),
    Media {
        server: String,
        media_id: String,
    },
    Cdn(String),
    Unknown,
}

impl Route {
    fn endpoint(&self) -> &'static str {
        match self {
            Self::Whoami => "whoami",
            Self::Profile(_) => "profile",
            Self::Sync => "sync",
            Self::Send { .. } => "send",
            Self::Typing { .. } => "typing",
            Self::Join(_) => "join",
            Self::Leave(_) => "leave",
            Self::State { .. } => "state",
            Self::Event { .. } => "event",
            Self::JoinedMembers(_) => "joined_members",
            Self::Media { .. } => "media",
            Self::Cdn(_) => "cdn",
            Self::Unknown => "unknown",
        }
    }
}

fn route(method: &str, segments: &[String]) -> Route {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    match (method, s.as_slice()) {
        ("GET", ["_matrix", "client", "v3", "account", "whoami"]) => Route::Whoami,
        ("GET", ["_matrix", "client", "v3", "profile", user, "displayname"]) => {
            Route::Profile((*user).into())
        }
        ("GET", ["_matrix", "client", "v3", "sync"]) => Route::Sync,
        ("PUT", ["_matrix", "client", "v3", "rooms", room, "send", kind, txn]) => Route::Send {
            room: (*room).into(),
            kind: (*kind).into(),
            txn: (*txn).into(),
        },
        ("PUT", ["_matrix", "client", "v3", "rooms", room, "typing", user]) => Route::Typing {
            room: (*room).into(),
            user: (*user).into(),
        },
        ("POST", ["_matrix", "client", "v3", "join", room]) => Route::Join((*room).into()),
        ("POST", ["_matrix", "client", "v3", "rooms", room, "leave"]) => {
            Route::Leave((*room).into())
        }
        ("GET", ["_matrix", "client", "v3", "rooms", room, "state", kind]) => Route::State {
            room: (*room).into(),
            kind: (*kind).into(),
            key: String::new(),
        },
        ("GET", ["_matrix", "client", "v3", "rooms", room, "state", kind, key]) => Route::State {
            room: (*room).into(),
            kind: (*kind).into(),
            key: (*key).into(),
        },
        ("GET", ["_matrix", "client", "v3", "rooms", room, "event", event_id]) => Route::Event {
            room: (*room).into(),
            event_id: (*event_id).into(),
        },
        ("GET", ["_matrix", "client", "v3", "rooms", room, "joined_members"]) => {
            Route::JoinedMembers((*room).into())
        }
        (
            "GET",
            [
                "_matrix",
                "client",
                "v1",
                "media",
                "download",
                server,
                media_id,
            ],
        )
        | (
            "GET",
            [
                "_matrix",
                "client",
                "v1",
                "media",
                "download",
                server,
                media_id,
                _,
            ],
        ) => Route::Media {
            server: (*server).into(),
            media_id: (*media_id).into(),
        },
        ("GET", ["cdn", media_id]) => Route::Cdn((*media_id).into()),
        _ => Route::Unknown,
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    pushed: watch::Sender<u64>,
    req: Request<Incoming>,
) -> Answered {
    let method = req.method().as_str().to_owned();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    let query: Vec<(String, String)> = Url::parse(&format!("http://fake{target}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    let bearer = fake_http::bearer(req.headers());
    let segments: Option<Vec<String>> = req.uri().path().split('/').skip(1).map(decode).collect();
    let body = fake_http::body(req).await?;
    let Some(segments) = segments else {
        return Ok(error(400, "M_UNRECOGNIZED", "Invalid path encoding"));
    };
    let route = route(&method, &segments);
    let failure = {
        let mut st = lock(&state);
        let authorized = bearer.as_deref() == Some(st.token.as_str());
        st.calls.push(Call {
            endpoint: route.endpoint(),
            method: method.clone(),
            target,
            query: query.clone(),
            authorized,
        });
        match (&route, bearer.is_some(), authorized) {
            (Route::Cdn(_), _, _) => {}
            (_, false, _) => {
                return Ok(error(401, "M_MISSING_TOKEN", "Missing access token."));
            }
            (_, true, false) => {
                return Ok(fake_http::json(
                    StatusCode::UNAUTHORIZED,
                    &json!({
                        "errcode": "M_UNKNOWN_TOKEN",
                        "error": "Invalid access token passed.",
                        "soft_logout": false,
                    }),
                ));
            }
            _ => {}
        }
        st.failures.next(route.endpoint())
    };
    let params: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(error(400, "M_NOT_JSON", "Content not JSON.")),
        }
    };
    let authorization = bearer.is_some();
    fake_http::scripted(failure, failure_response, || {
        dispatch(&state, &pushed, route, &query, &params, authorization)
    })
    .await
}

async fn dispatch(
    state: &Arc<Mutex<State>>,
    pushed: &watch::Sender<u64>,
    route: Route,
    query: &[(String, String)],
    params: &Value,
    has_authorization: bool,
) -> Reply {
    if let Route::Sync = route {
        return sync(state, pushed, query).await;
    }
    let mut st = lock(state);
    let changed_before = st.pos;
    let resp = match route {
        Route::Whoami => {
            ok(json!({ "user_id": st.bot, "device_id": "FAKEDEVICE", "is_guest": false }))
        }
        Route::Profile(user) => {
            let name = if user == st.bot {
                st.bot_name.clone()
            } else {
                st.names.get(&user).cloned()
            };
            match name {
                Some(n) => ok(json!({ "displayname": n })),
                None => error(404, "M_NOT_FOUND", "Profile was not found"),
            }
        }
        Route::Send { room, kind, txn } => send(&mut st, &room, &kind, &txn, params),
        Route::Typing { room, user } => {
            if user != st.bot {
                error(
                    403,
                    "M_FORBIDDEN",
                    "Cannot set typing state for other users",
                )
            } else if joined(&st, &room).is_none() {
                not_in_room(&st, &room)
            } else {
                st.typing.push(Typing {
                    room_id: room,
                    user_id: user,
                    body: params.clone(),
                });
                ok(json!({}))
            }
        }
        Route::Join(room) => join(&mut st, &room),
        Route::Leave(room) => {
            let bot = st.bot.clone();
            match st.rooms.get(&room).and_then(|r| r.membership(&bot)) {
                Some(Membership::Join | Membership::Invite) => {
                    st.set_membership(&room, &bot, &bot, Membership::Leave);
                    st.leaves.push(room);
                    ok(json!({}))
                }
                _ => not_in_room(&st, &room),
            }
        }
        Route::State { room, kind, key } => match joined(&st, &room) {
            None => not_in_room(&st, &room),
            Some(r) => match r.state(&kind, &key) {
                Some(ev) => ok(ev["content"].clone()),
                None => error(404, "M_NOT_FOUND", "Event not found."),
            },
        },
        Route::Event { room, event_id } => match joined(&st, &room) {
            None => not_in_room(&st, &room),
            Some(r) => match r
                .events
                .iter()
                .find(|(_, e)| e["event_id"] == event_id.as_str())
            {
                Some((_, e)) => {
                    let mut e = e.clone();
                    e["room_id"] = room.as_str().into();
                    ok(e)
                }
                None => error(404, "M_NOT_FOUND", "Event not found."),
            },
        },
        Route::JoinedMembers(room) => match joined(&st, &room) {
            None => not_in_room(&st, &room),
            Some(r) => {
                let mut joined = Map::new();
                for u in r.joined() {
                    let name = if *u == st.bot {
                        st.bot_name.clone()
                    } else {
                        st.names.get(u).cloned()
                    };
                    joined.insert(
                        u.clone(),
                        json!({ "display_name": name, "avatar_url": null }),
                    );
                }
                ok(json!({ "joined": joined }))
            }
        },
        Route::Media { server, media_id } => media(&mut st, &server, &media_id),
        Route::Cdn(media_id) => match st.media.get(&media_id) {
            Some(m) if m.cdn => {
                let resp = media_body(m);
                st.downloads.push(Download {
                    media_id,
                    authorized: has_authorization,
                    via_cdn: true,
                });
                resp
            }
            _ => error(404, "M_NOT_FOUND", "Not found"),
        },
        Route::Sync | Route::Unknown => error(404, "M_UNRECOGNIZED", "Unrecognized request"),
    };
    if st.pos != changed_before {
        drop(st);
        pushed.send_modify(|n| *n += 1);
    }
    resp
}

fn joined<'s>(st: &'s State, room: &str) -> Option<&'s Room> {
    st.rooms
        .get(room)
        .filter(|r| r.membership(&st.bot) == Some(Membership::Join))
}

fn not_in_room(st: &State, room: &str) -> Reply {
    error(
        403,
        "M_FORBIDDEN",
        &format!("User {} not in room {room}", st.bot),
    )
}

fn send(st: &mut State, room: &str, kind: &str, txn: &str, content: &Value) -> Reply {
    if joined(st, room).is_none() {
        return not_in_room(st, room);
    }
    let key = format!("{room}\u{0}{kind}\u{0}{txn}");
    if let Some(id) = st.txns.get(&key) {
        return ok(json!({ "event_id": id }));
    }
    let bot = st.bot.clone();
    let id = st.append(room, &bot, kind, None, content.clone());
    st.txns.insert(key, id.clone());
    st.sent.push(SentEvent {
        room_id: room.into(),
        event_id: id.clone(),
        txn_id: txn.into(),
        event_type: kind.into(),
        content: content.clone(),
    });
    ok(json!({ "event_id": id }))
}

fn join(st: &mut State, room: &str) -> Reply {
    let bot = st.bot.clone();
    let Some(r) = st.rooms.get(room) else {
        return error(
            404,
            "M_NOT_FOUND",
            "Can't join remote room because no servers that are in the room have been provided.",
        );
    };
    match r.membership(&bot) {
        Some(Membership::Join) => ok(json!({ "room_id": room })),
        Some(Membership::Invite) => {
            st.set_membership(room, &bot, &bot, Membership::Join);
            st.joins.push(room.into());
            ok(json!({ "room_id": room }))
        }
        _ => error(403, "M_FORBIDDEN", "You are not invited to this room."),
    }
}

fn media(st: &mut State, server: &str, media_id: &str) -> Reply {
    let found = (server == SERVER).then(|| st.media.get(media_id)).flatten();
    let Some(m) = found else {
        return error(404, "M_NOT_FOUND", "Not found");
    };
    if m.cdn {
        let mut r = fake_http::respond(StatusCode::TEMPORARY_REDIRECT, "text/plain", "");
        fake_http::set_header(&mut r, "location", format!("{}/cdn/{media_id}", st.base));
        return r;
    }
    let resp = media_body(m);
    st.downloads.push(Download {
        media_id: media_id.into(),
        authorized: true,
        via_cdn: false,
    });
    resp
}

fn media_body(m: &Media) -> Reply {
    let mut resp = if m.chunked {
        let chunks: VecDeque<Bytes> = m.bytes.chunks(1024).map(Bytes::copy_from_slice).collect();
        Response::new(Chunked(chunks).boxed())
    } else {
        Response::new(fake_http::whole(m.bytes.clone()))
    };
    if let Ok(v) = HeaderValue::from_str(&m.content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        hyper::header::CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment"),
    );
    resp
}

// ---- /sync ----

/// The parts of a sync filter the fake honours.
struct Filter {
    limit: usize,
    types: Option<Vec<String>>,
    not_types: Vec<String>,
    account_data_types: Option<Vec<String>>,
    account_data_not: Vec<String>,
    lazy_members: bool,
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect()
    })
}

impl Filter {
    fn parse(json: Option<&str>) -> Result<Self, Box<Reply>> {
        let v: Value = match json {
            None => json!({}),
            Some(s) if s.starts_with('{') => serde_json::from_str(s)
                .map_err(|_| error(400, "M_INVALID_PARAM", "filter is not valid JSON"))?,
            Some(_) => return Err(Box::new(error(404, "M_NOT_FOUND", "No such filter"))),
        };
        let t = &v["room"]["timeline"];
        Ok(Self {
            // Synapse's default timeline limit.
            limit: t["limit"]
                .as_u64()
                .map_or(10, |l| l.clamp(1, 1000) as usize),
            types: strings(&t["types"]),
            not_types: strings(&t["not_types"]).unwrap_or_default(),
            account_data_types: strings(&v["account_data"]["types"]),
            account_data_not: strings(&v["account_data"]["not_types"]).unwrap_or_default(),
            lazy_members: v["room"]["state"]["lazy_load_members"].as_bool() == Some(true),
        })
    }

    fn timeline_allows(&self, kind: &str) -> bool {
        allowed(kind, self.types.as_deref(), &self.not_types)
    }

    fn account_data_allows(&self, kind: &str) -> bool {
        allowed(
            kind,
            self.account_data_types.as_deref(),
            &self.account_data_not,
        )
    }
}

fn matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

fn allowed(kind: &str, types: Option<&[String]>, not_types: &[String]) -> bool {
    if not_types.iter().any(|p| matches(p, kind)) {
        return false;
    }
    types.is_none_or(|t| t.iter().any(|p| matches(p, kind)))
}

async fn sync(
    state: &Arc<Mutex<State>>,
    pushed: &watch::Sender<u64>,
    query: &[(String, String)],
) -> Reply {
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let filter = match Filter::parse(param("filter")) {
        Ok(f) => f,
        Err(resp) => return *resp,
    };
    let since = match param("since") {
        None => None,
        Some(s) => match s.strip_prefix('s').and_then(|n| n.parse::<u64>().ok()) {
            Some(n) => Some(n),
            None => return error(400, "M_UNKNOWN", "Invalid stream token"),
        },
    };
    let timeout = Duration::from_millis(param("timeout").and_then(|t| t.parse().ok()).unwrap_or(0));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rx = pushed.subscribe();
    loop {
        rx.borrow_and_update();
        {
            let st = lock(state);
            let (answer, has_data) = sync_answer(&st, since, &filter);
            if has_data || since.is_none() {
                return ok(answer);
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            let st = lock(state);
            return ok(sync_answer(&st, since, &filter).0);
        }
    }
}

/// The sync answer for `since` (`None`: initial) and whether it carries anything.
fn sync_answer(st: &State, since: Option<u64>, filter: &Filter) -> (Value, bool) {
    let after = |pos: u64| since.is_none_or(|s| pos > s);
    let mut join = Map::new();
    let mut invite = Map::new();
    let mut leave = Map::new();
    for (id, room) in &st.rooms {
        let changed = room.membership_pos(&st.bot).is_some_and(after);
        match room.membership(&st.bot) {
            Some(Membership::Join) => {
                if let Some(v) = joined_room(st, room, since, filter) {
                    join.insert(id.clone(), v);
                }
            }
            Some(Membership::Invite) if changed => {
                invite.insert(id.clone(), invited_room(st, room));
            }
            Some(Membership::Leave) if changed && since.is_some() => {
                let last: Vec<Value> = room
                    .events
                    .iter()
                    .rev()
                    .take(1)
                    .map(|(_, e)| e.clone())
                    .collect();
                leave.insert(
                    id.clone(),
                    json!({
                        "timeline": { "events": last, "limited": false },
                        "state": { "events": [] },
                    }),
                );
            }
            Some(Membership::Invite | Membership::Leave) => {}
            None => {}
        }
    }
    let mut account_data = Vec::new();
    if st.direct_pos.is_some_and(after) && filter.account_data_allows("m.direct") {
        account_data.push(json!({ "type": "m.direct", "content": st.direct }));
    }
    let has_data =
        !join.is_empty() || !invite.is_empty() || !leave.is_empty() || !account_data.is_empty();
    let answer = json!({
        "next_batch": format!("s{}", st.pos),
        "rooms": { "join": join, "invite": invite, "leave": leave, "knock": {} },
        "account_data": { "events": account_data },
        "presence": { "events": [] },
        "to_device": { "events": [] },
    });
    (answer, has_data)
}

fn joined_room(st: &State, room: &Room, since: Option<u64>, filter: &Filter) -> Option<Value> {
    let bot_joined_at = room.membership_pos(&st.bot).unwrap_or(0);
    let new_to_sync = since.is_none_or(|s| bot_joined_at > s);
    let window: Vec<&(u64, Value)> = room
        .events
        .iter()
        .filter(|(p, _)| since.is_none_or(|s| *p > s))
        .collect();
    let mut timeline: Vec<&(u64, Value)> = window
        .iter()
        .copied()
        .filter(|(_, e)| filter.timeline_allows(e["type"].as_str().unwrap_or_default()))
        .collect();
    let limited = timeline.len() > filter.limit;
    if limited {
        timeline.drain(..timeline.len() - filter.limit);
    }
    let first_pos = timeline.first().map_or(u64::MAX, |(p, _)| *p);
    let in_timeline = |e: &Value| timeline.iter().any(|(_, t)| t["event_id"] == e["event_id"]);

    let mut state: Vec<Value> = Vec::new();
    // Non-member state before the timeline: all of it for a room new to this sync, else the
    // changes in the window the timeline does not show.
    let mut latest: BTreeMap<(String, String), &Value> = BTreeMap::new();
    for (p, e) in &room.events {
        let (Some(kind), Some(key)) = (e["type"].as_str(), e["state_key"].as_str()) else {
            continue;
        };
        if kind == "m.room.member" || *p >= first_pos {
            continue;
        }
        if new_to_sync || since.is_some_and(|s| *p > s) {
            latest.insert((kind.into(), key.into()), e);
        }
    }
    state.extend(latest.into_values().filter(|e| !in_timeline(e)).cloned());
    // Members: with lazy loading, the timeline's senders (and the bot in a new room);
    // otherwise everyone, in a room new to the sync.
    let mut members: Vec<&String> = Vec::new();
    let mut add = |u: &str| {
        if let Some((u, _)) = room.members.get_key_value(u)
            && !members.contains(&u)
        {
            members.push(u);
        }
    };
    if filter.lazy_members {
        for (_, e) in &timeline {
            if let Some(s) = e["sender"].as_str() {
                add(s);
            }
        }
        if new_to_sync {
            add(&st.bot);
        }
    } else if new_to_sync {
        for u in room.members.keys() {
            add(u);
        }
    }
    for u in members {
        if let Some(ev) = room.state("m.room.member", u)
            && !in_timeline(ev)
        {
            state.push(ev.clone());
        }
    }
    let membership_changed = window.iter().any(|(_, e)| e["type"] == "m.room.member");
    let mut out = json!({
        "timeline": {
            "events": timeline.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>(),
            "limited": limited,
            "prev_batch": format!("t{}", first_pos.saturating_sub(1)),
        },
        "state": { "events": state },
        "ephemeral": { "events": [] },
        "account_data": { "events": [] },
        "unread_notifications": { "highlight_count": 0, "notification_count": 0 },
    });
    let summary = filter.lazy_members && (new_to_sync || membership_changed);
    if summary {
        let heroes: Vec<&String> = room.joined().filter(|u| **u != st.bot).take(5).collect();
        out["summary"] = json!({
            "m.joined_member_count": room.joined().count(),
            "m.invited_member_count": room.members.values().filter(|m| **m == Membership::Invite).count(),
            "m.heroes": heroes,
        });
    }
    let has = !timeline.is_empty()
        || !out["state"]["events"].as_array().is_none_or(Vec::is_empty)
        || summary;
    has.then_some(out)
}

fn invited_room(st: &State, room: &Room) -> Value {
    let mut events = Vec::new();
    let strip = |e: &Value| {
        json!({
            "type": e["type"],
            "state_key": e["state_key"],
            "sender": e["sender"],
            "content": e["content"],
        })
    };
    if let Some(e) = room.state("m.room.create", "") {
        events.push(strip(e));
    }
    if let Some(e) = room.state("m.room.encryption", "") {
        events.push(strip(e));
    }
    if let Some(inv) = room.state("m.room.member", &st.bot) {
        if let Some(inviter) = inv["sender"].as_str()
            && let Some(e) = room.state("m.room.member", inviter)
        {
            events.push(strip(e));
        }
        events.push(strip(inv));
    }
    json!({ "invite_state": { "events": events } })
}
