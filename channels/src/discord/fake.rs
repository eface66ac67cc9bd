//! A fake Discord on 127.0.0.1 for tests: the HTTP API v10 the adapter uses (real answer and
//! error shapes, rate limit headers) and a gateway WebSocket (v10, JSON) with sessions.
//!
//! The test drives it: it pushes gateway events ([`FakeDiscord::push_message`],
//! [`FakeDiscord::push_edit`], [`FakeDiscord::push_button`], [`FakeDiscord::push_guild`],
//! [`FakeDiscord::push_dispatch`]), breaks the connection in Discord's ways
//! ([`FakeDiscord::drop_gateway`], [`FakeDiscord::send_reconnect`],
//! [`FakeDiscord::invalidate_session`], [`FakeDiscord::expire_session`],
//! [`FakeDiscord::stop_acking_heartbeats`], [`FakeDiscord::close_gateway`]), reads what the
//! bot did (messages, edits, typing, interaction callbacks and followups, identifies,
//! resumes, heartbeats, connections) and scripts failures of the next requests of an
//! [`Endpoint`] ([`FakeDiscord::fail_next`]) or a small rate limit bucket
//! ([`FakeDiscord::set_bucket`]). [`FakeDiscord::wait_until`] waits for a condition on it.
//!
//! Behaviour that matches Discord:
//! - the API needs `Authorization: Bot <TOKEN>` (else 401 `{"message": "401: Unauthorized",
//!   "code": 0}`), except interaction callbacks and followups (their token is in the path);
//! - `GET /gateway/bot` answers this fake's `ws://` gateway URL and a session start limit;
//! - creating a message needs a known channel (`Unknown Channel`, 10003), refuses empty
//!   content without components and content over 2000 code points (50035), checks
//!   components (one row of at most 5 buttons, `custom_id` 1–100 characters and distinct,
//!   label at most 80), answers a repeated `nonce` with `enforce_nonce` with the message it
//!   already created (no second message), keeps or drops `message_reference` by
//!   `fail_if_not_exists`, and dispatches the bot's own message as `MESSAGE_CREATE` (Discord
//!   does); editing needs one of the bot's messages (`Unknown Message`, 10008) and dispatches
//!   `MESSAGE_UPDATE`;
//! - an interaction can be called back once (`Interaction has already been acknowledged.`,
//!   40060, then), a followup needs an acknowledged interaction;
//! - every bucketed answer has `X-RateLimit-Bucket`, `-Limit`, `-Remaining`, `-Reset`,
//!   `-Reset-After`; a request over the bucket is a 429 with `retry_after` (JSON, seconds,
//!   float), `Retry-After` and `X-RateLimit-Scope`; a scripted global 429 adds
//!   `X-RateLimit-Global: true`;
//! - the gateway sends Hello, acknowledges heartbeats (op 11) unless told not to, answers
//!   Identify (the right token, else close 4004; `MESSAGE_CONTENT` refused with 4014 when
//!   [`FakeDiscord::refuse_message_content`]) with READY (s = 1) giving a session id and a
//!   `resume_gateway_url` on the path `/resume`, numbers dispatches per session, keeps them,
//!   and answers Resume of a valid session by replaying the dispatches after its `seq`, then
//!   RESUMED; Resume of an unknown or expired session gets Invalid Session (`d: false`).
//!   Events pushed while no session exists (before Identify, after the session expired) are
//!   lost, as on Discord.
//!
//! Not modelled: sharding, compression, ETF, slash commands, uploads, presence.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::fake_http::{self, Answered, Reply, Script, Server, lock};

/// The token [`FakeDiscord::start`] accepts.
pub const TOKEN: &str = "MTAwMDAwMDAwMDAwMDAwMDAx.GFakeT.fake_token-for-tests-only_0123456789";
/// The bot's user id (also its application id).
pub const BOT_ID: &str = "100000000000000001";
/// The path prefix of the API root ([`FakeDiscord::api_base`]).
pub const API_PREFIX: &str = "/api/v10";
/// How long [`FakeDiscord::wait_until`] waits.
pub const WAIT: Duration = Duration::from_secs(15);
/// The default heartbeat interval (Discord's usual value).
pub const HEARTBEAT_INTERVAL_MS: u64 = 41_250;

/// A user (or the bot) as Discord describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub id: String,
    pub username: String,
    pub global_name: Option<String>,
    pub bot: bool,
}

impl FakeUser {
    pub fn new(id: &str, username: &str) -> Self {
        Self {
            id: id.into(),
            username: username.into(),
            global_name: None,
            bot: false,
        }
    }

    pub fn with_global_name(mut self, name: &str) -> Self {
        self.global_name = Some(name.into());
        self
    }

    /// Another application's bot.
    pub fn other_bot(id: &str, username: &str) -> Self {
        Self {
            bot: true,
            ..Self::new(id, username)
        }
    }

    /// This fake's bot: `chitin`, id [`BOT_ID`].
    pub fn bot() -> Self {
        Self {
            bot: true,
            ..Self::new(BOT_ID, "chitin")
        }
    }

    pub fn json(&self) -> Value {
        let mut v = json!({
            "id": self.id, "username": self.username, "discriminator": "0",
            "global_name": self.global_name, "avatar": null,
        });
        if self.bot {
            v["bot"] = true.into();
        }
        v
    }
}

/// A channel: a DM, a guild text channel or a thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeChannel {
    pub id: String,
    /// Discord's channel type: 0 text, 1 DM, 11 public thread, 12 private thread, 15 forum.
    pub kind: u64,
    pub guild_id: Option<String>,
    pub parent_id: Option<String>,
}

impl FakeChannel {
    /// The DM channel `id` (with one user).
    pub fn dm(id: &str) -> Self {
        Self {
            id: id.into(),
            kind: 1,
            guild_id: None,
            parent_id: None,
        }
    }

    /// A text channel of a guild.
    pub fn text(guild: &str, id: &str) -> Self {
        Self {
            id: id.into(),
            kind: 0,
            guild_id: Some(guild.into()),
            parent_id: None,
        }
    }

    /// A public thread of `parent`.
    pub fn thread(parent: &FakeChannel, id: &str) -> Self {
        Self {
            id: id.into(),
            kind: 11,
            guild_id: parent.guild_id.clone(),
            parent_id: Some(parent.id.clone()),
        }
    }

    pub fn json(&self) -> Value {
        let mut v = json!({ "id": self.id, "type": self.kind, "name": format!("ch-{}", self.id) });
        if let Some(g) = &self.guild_id {
            v["guild_id"] = g.as_str().into();
        }
        if let Some(p) = &self.parent_id {
            v["parent_id"] = p.as_str().into();
        }
        v
    }
}

/// A user's message to push (its id is assigned when it is pushed).
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    channel: FakeChannel,
    author: FakeUser,
    content: String,
    nick: Option<String>,
    mentions: Vec<FakeUser>,
    mention_roles: Vec<String>,
    reply_to: Option<Value>,
    attachments: Vec<Value>,
    extra: Map<String, Value>,
}

impl MessageBuilder {
    /// A text message from `author` in `channel`.
    pub fn text(channel: &FakeChannel, author: &FakeUser, content: &str) -> Self {
        Self {
            channel: channel.clone(),
            author: author.clone(),
            content: content.into(),
            nick: None,
            mentions: Vec::new(),
            mention_roles: Vec::new(),
            reply_to: None,
            attachments: Vec::new(),
            extra: Map::new(),
        }
    }

    /// Mentions `user` (`<@id>` is added to the text, the user to `mentions`).
    pub fn mentioning(mut self, user: &FakeUser) -> Self {
        self.content = format!("<@{}> {}", user.id, self.content);
        self.mentions.push(user.clone());
        self
    }

    /// Mentions the role `role` (`<@&id>` in the text, the id in `mention_roles`).
    pub fn mentioning_role(mut self, role: &str) -> Self {
        self.content = format!("<@&{role}> {}", self.content);
        self.mention_roles.push(role.into());
        self
    }

    /// A reply to `message` (a pushed message, or one the bot sent: [`SentMessage::message`]).
    pub fn reply_to(mut self, message: &Value) -> Self {
        self.reply_to = Some(message.clone());
        self
    }

    /// The author's nickname in the guild (`member.nick`).
    pub fn nick(mut self, nick: &str) -> Self {
        self.nick = Some(nick.into());
        self
    }

    /// An attachment (`url` from [`FakeDiscord::put_file`], or any URL).
    pub fn attachment(mut self, filename: &str, content_type: &str, size: u64, url: &str) -> Self {
        let id = format!("90000000000000{:04}", self.attachments.len());
        self.attachments.push(json!({
            "id": id, "filename": filename, "content_type": content_type, "size": size,
            "url": url, "proxy_url": url,
        }));
        self
    }

    /// Any other field of the message (`webhook_id`, `type`, …).
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    fn build(self, id: &str) -> Value {
        let mut m = json!({
            "id": id,
            "channel_id": self.channel.id,
            "author": self.author.json(),
            "content": self.content,
            "timestamp": now_iso(),
            "edited_timestamp": null,
            "tts": false,
            "mention_everyone": false,
            "mentions": self.mentions.iter().map(FakeUser::json).collect::<Vec<_>>(),
            "mention_roles": self.mention_roles,
            "attachments": self.attachments,
            "embeds": [],
            "pinned": false,
            "type": 0,
        });
        if let Some(g) = &self.channel.guild_id {
            m["guild_id"] = g.as_str().into();
            m["member"] = json!({ "nick": self.nick, "roles": [] });
        }
        if let Some(r) = self.reply_to {
            m["type"] = 19.into();
            m["message_reference"] = json!({
                "type": 0, "message_id": r["id"], "channel_id": r["channel_id"],
            });
            m["referenced_message"] = r;
        }
        if let Some(obj) = m.as_object_mut() {
            obj.extend(self.extra);
        }
        m
    }
}

/// A guild for `GUILD_CREATE`: its channels and active threads, and the bot's managed role.
#[derive(Debug, Clone)]
pub struct FakeGuild {
    pub id: String,
    pub channels: Vec<FakeChannel>,
    pub threads: Vec<FakeChannel>,
    /// The id of the role Discord made for the bot (`tags.bot_id`).
    pub bot_role: Option<String>,
}

/// An endpoint of the fake API (for [`FakeDiscord::fail_next`] and
/// [`FakeDiscord::set_bucket`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    UsersMe,
    GatewayBot,
    GetChannel,
    CreateMessage,
    EditMessage,
    Typing,
    InteractionCallback,
    Followup,
}

impl Endpoint {
    fn bucket(self) -> &'static str {
        match self {
            Self::UsersMe => "b-users-me",
            Self::GatewayBot => "b-gateway-bot",
            Self::GetChannel => "b-get-channel",
            Self::CreateMessage => "b-create-message",
            Self::EditMessage => "b-edit-message",
            Self::Typing => "b-typing",
            Self::InteractionCallback => "b-interaction",
            Self::Followup => "b-followup",
        }
    }
}

/// A failure of the next request(s) to an endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// 429 with `retry_after` (seconds); `global` adds `X-RateLimit-Global: true`.
    RateLimited { retry_after: f64, global: bool },
    /// 500 with Discord's JSON error.
    ServerError,
    /// 502 with an HTML body, as a front proxy answers.
    BadGateway,
    /// This status with Discord's JSON error `{code, message}`.
    Status {
        status: u16,
        code: u64,
        message: String,
    },
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is created), then the connection is closed without
    /// an answer.
    DropAfterHandling,
}

/// A message the bot created.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub channel_id: String,
    pub message_id: String,
    pub content: String,
    /// The request body as received.
    pub body: Value,
    /// The message as the fake answered it (reply to it with [`MessageBuilder::reply_to`]).
    pub message: Value,
}

/// A message edit that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    pub channel_id: String,
    pub message_id: String,
    pub body: Value,
}

/// An interaction callback that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Callback {
    pub interaction_id: String,
    /// The callback `type` (4 message, 6 deferred update, …).
    pub kind: u64,
    pub body: Value,
}

/// A followup message that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Followup {
    pub interaction_id: String,
    pub body: Value,
}

/// One API request with acceptable credentials (failed or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub endpoint: Endpoint,
    pub method: String,
    /// The path after [`API_PREFIX`]; interaction tokens shown as `<token>`.
    pub path: String,
    pub body: Value,
    /// The `Authorization` header as received, if any.
    pub authorization: Option<String>,
}

/// A pushed message.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub message_id: String,
    /// Its dispatch's `s`; `None` when no session received it (lost, as on Discord).
    pub seq: Option<u64>,
    pub message: Value,
}

/// A pushed button press.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedPress {
    pub interaction_id: String,
    pub token: String,
    pub seq: Option<u64>,
    pub interaction: Value,
}

#[derive(Debug, Clone, Copy)]
struct BucketConfig {
    limit: u64,
    reset_after: f64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    used: u64,
    started: Instant,
}

struct OpenInteraction {
    token: String,
    acknowledged: bool,
}

struct SessionLog {
    events: Vec<Value>,
    valid: bool,
}

enum Cmd {
    Send(String),
    Drop,
    Close(u16),
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Cmd>,
}

struct State {
    token: String,
    bot: FakeUser,
    gateway_port: u16,
    rest_port: u16,
    next_id: u64,
    channels: HashMap<String, FakeChannel>,
    /// Every message by id (users' and the bot's), as it is now.
    messages: HashMap<String, Value>,
    nonces: HashMap<String, String>,
    sent: Vec<SentMessage>,
    edits: Vec<Edit>,
    callbacks: Vec<Callback>,
    followups: Vec<Followup>,
    typing: Vec<String>,
    calls: Vec<Call>,
    rate_limited: usize,
    deduplicated: usize,
    failures: Script<Endpoint, Failure>,
    buckets: HashMap<Endpoint, BucketConfig>,
    windows: HashMap<(Endpoint, String), Window>,
    interactions: HashMap<String, OpenInteraction>,
    files: HashMap<String, Vec<u8>>,
    downloads: Vec<String>,
    // The gateway.
    heartbeat_interval_ms: u64,
    refuse_message_content: bool,
    sessions: HashMap<String, SessionLog>,
    /// The session events go to (survives a dropped connection).
    session: Option<String>,
    /// The live connection attached to the session.
    conn: Option<Conn>,
    next_conn: u64,
    next_session: u64,
    silent: HashSet<u64>,
    identifies: Vec<Value>,
    resumes: Vec<Value>,
    connections: Vec<String>,
    heartbeats: Vec<Value>,
}

impl State {
    fn snowflake(&mut self) -> String {
        self.next_id += 1;
        self.next_id.to_string()
    }

    /// Numbers a dispatch in the current session, keeps it, and sends it on the live
    /// connection; `None` when there is no session (the event is lost).
    fn dispatch(&mut self, t: &str, d: Value) -> Option<u64> {
        let id = self.session.clone()?;
        let log = self.sessions.get_mut(&id).filter(|l| l.valid)?;
        let seq = log.events.len() as u64 + 1;
        let payload = json!({ "op": 0, "t": t, "s": seq, "d": d });
        log.events.push(payload.clone());
        if let Some(conn) = &self.conn {
            let _ = conn.tx.send(Cmd::Send(payload.to_string()));
        }
        Some(seq)
    }

    fn send_op(&self, payload: Value) -> bool {
        match &self.conn {
            Some(conn) => conn.tx.send(Cmd::Send(payload.to_string())).is_ok(),
            None => false,
        }
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeDiscord {
    /// The HTTP API (the first listener) and the gateway; its changes wake
    /// [`FakeDiscord::wait_until`].
    server: Server<State>,
    gateway_addr: SocketAddr,
}

impl fmt::Debug for FakeDiscord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeDiscord")
            .field("rest_addr", &self.server.addr())
            .field("gateway_addr", &self.gateway_addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        // The accept loops stop with `server`; the live gateway connection is closed here.
        if let Some(conn) = self.lock().conn.take() {
            let _ = conn.tx.send(Cmd::Drop);
        }
    }
}

type Shared = (Arc<Mutex<State>>, watch::Sender<u64>);

impl FakeDiscord {
    /// Starts a fake for [`TOKEN`] and the bot [`FakeUser::bot`].
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(TOKEN, FakeUser::bot()).await
    }

    /// Starts a fake for `token` and `bot`: the API and the gateway on free ports of
    /// 127.0.0.1.
    pub async fn start_with(token: &str, bot: FakeUser) -> std::io::Result<Self> {
        let rest = fake_http::bind(API_PREFIX).await?;
        let gateway = fake_http::bind("/").await?;
        let gateway_addr = gateway.addr;
        let state = State {
            token: token.into(),
            bot,
            gateway_port: gateway_addr.port(),
            rest_port: rest.addr.port(),
            next_id: 1_300_000_000_000_000_000,
            channels: HashMap::new(),
            messages: HashMap::new(),
            nonces: HashMap::new(),
            sent: Vec::new(),
            edits: Vec::new(),
            callbacks: Vec::new(),
            followups: Vec::new(),
            typing: Vec::new(),
            calls: Vec::new(),
            rate_limited: 0,
            deduplicated: 0,
            failures: Script::default(),
            buckets: HashMap::new(),
            windows: HashMap::new(),
            interactions: HashMap::new(),
            files: HashMap::new(),
            downloads: Vec::new(),
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            refuse_message_content: false,
            sessions: HashMap::new(),
            session: None,
            conn: None,
            next_conn: 0,
            next_session: 0,
            silent: HashSet::new(),
            identifies: Vec::new(),
            resumes: Vec::new(),
            connections: Vec::new(),
            heartbeats: Vec::new(),
        };
        let mut server = rest.serve(state, |state, changed, req| handle((state, changed), req));
        server.accept(gateway, |state, changed, sock| {
            serve_gateway((state, changed), sock)
        });
        Ok(Self {
            server,
            gateway_addr,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    fn bump(&self) {
        self.server.notify();
    }

    /// The API root to configure (`http://127.0.0.1:<port>/api/v10`).
    pub fn api_base(&self) -> Url {
        self.server.url()
    }

    /// The gateway's main URL (as `GET /gateway/bot` answers it).
    pub fn gateway_url(&self) -> String {
        format!("ws://{}", self.gateway_addr)
    }

    pub fn bot(&self) -> FakeUser {
        self.lock().bot.clone()
    }

    /// Waits (up to [`WAIT`]) until `cond` holds; false if it never did.
    pub async fn wait_until(&self, mut cond: impl FnMut() -> bool) -> bool {
        let mut rx = self.server.changes().subscribe();
        let deadline = Instant::now() + WAIT;
        loop {
            rx.borrow_and_update();
            if cond() {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return cond();
            }
        }
    }

    /// Waits until a connection is attached to a valid session (READY or RESUMED sent).
    pub async fn wait_ready(&self) -> bool {
        self.wait_until(|| self.session_live()).await
    }

    /// A connection is attached to a valid session.
    pub fn session_live(&self) -> bool {
        let st = self.lock();
        st.conn.is_some()
            && st
                .session
                .as_ref()
                .and_then(|s| st.sessions.get(s))
                .is_some_and(|l| l.valid)
    }

    /// The current session's id.
    pub fn session_id(&self) -> Option<String> {
        self.lock().session.clone()
    }

    // ---- Channels, files, settings ----

    /// Makes a channel known to the API (`GET /channels/{id}`, sending into it).
    pub fn add_channel(&self, channel: &FakeChannel) {
        self.lock()
            .channels
            .insert(channel.id.clone(), channel.clone());
    }

    /// Stores a file the bot can download; returns its URL (on this fake's API host).
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) -> String {
        let mut st = self.lock();
        let path = format!("/attachments/{}/{name}", st.snowflake());
        st.files.insert(path.clone(), bytes);
        format!("http://127.0.0.1:{}{path}", st.rest_port)
    }

    /// The attachment paths downloaded, in order.
    pub fn downloads(&self) -> Vec<String> {
        self.lock().downloads.clone()
    }

    /// The heartbeat interval later connections get in Hello.
    pub fn set_heartbeat_interval(&self, ms: u64) {
        self.lock().heartbeat_interval_ms = ms;
    }

    /// Identify with `MESSAGE_CONTENT` is closed with 4014 (the intent is not enabled).
    pub fn refuse_message_content(&self, refuse: bool) {
        self.lock().refuse_message_content = refuse;
    }

    /// The endpoint's bucket allows `limit` requests per `reset_after` seconds (per channel
    /// or interaction); over it, a 429.
    pub fn set_bucket(&self, endpoint: Endpoint, limit: u64, reset_after: f64) {
        self.lock()
            .buckets
            .insert(endpoint, BucketConfig { limit, reset_after });
    }

    /// The next `times` requests to `endpoint` fail with `failure` (after earlier scripted
    /// ones).
    pub fn fail_next(&self, endpoint: Endpoint, times: usize, failure: Failure) {
        self.lock().failures.push(endpoint, times, failure);
    }

    // ---- Gateway events ----

    /// Dispatches `MESSAGE_CREATE` for a user's message (the channel becomes known).
    pub fn push_message(&self, m: MessageBuilder) -> Pushed {
        let pushed = {
            let mut st = self.lock();
            let id = st.snowflake();
            st.channels.insert(m.channel.id.clone(), m.channel.clone());
            let message = m.build(&id);
            st.messages.insert(id.clone(), message.clone());
            let seq = st.dispatch("MESSAGE_CREATE", message.clone());
            Pushed {
                message_id: id,
                seq,
                message,
            }
        };
        self.bump();
        pushed
    }

    /// Dispatches `MESSAGE_UPDATE`: `original` (a pushed message) with a new text and an
    /// `edited_timestamp`.
    pub fn push_edit(&self, original: &Value, content: &str) -> Pushed {
        let pushed = {
            let mut st = self.lock();
            let mut message = original.clone();
            message["content"] = content.into();
            message["edited_timestamp"] = now_iso_unique(&mut st).into();
            let id = message["id"].as_str().unwrap_or_default().to_owned();
            st.messages.insert(id.clone(), message.clone());
            let seq = st.dispatch("MESSAGE_UPDATE", message.clone());
            Pushed {
                message_id: id,
                seq,
                message,
            }
        };
        self.bump();
        pushed
    }

    /// Dispatches `INTERACTION_CREATE`: `user` pressed the button `custom_id` under the
    /// bot's message `message` (a [`SentMessage::message`]).
    pub fn push_button(&self, user: &FakeUser, message: &Value, custom_id: &str) -> PushedPress {
        let pressed = {
            let mut st = self.lock();
            let id = st.snowflake();
            let token = format!("aW50ZXJhY3Rpb246{id}.fakeInteractionToken_-x");
            let channel_id = message["channel_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let channel = st
                .channels
                .get(&channel_id)
                .cloned()
                .unwrap_or_else(|| FakeChannel::dm(&channel_id));
            let mut interaction = json!({
                "id": id,
                "application_id": st.bot.id,
                "type": 3,
                "token": token,
                "version": 1,
                "data": { "custom_id": custom_id, "component_type": 2 },
                "channel": channel.json(),
                "channel_id": channel.id,
                "message": message,
                "locale": "en-US",
            });
            match &channel.guild_id {
                Some(g) => {
                    interaction["guild_id"] = g.as_str().into();
                    interaction["member"] =
                        json!({ "user": user.json(), "nick": null, "roles": [] });
                }
                None => interaction["user"] = user.json(),
            }
            st.interactions.insert(
                id.clone(),
                OpenInteraction {
                    token: token.clone(),
                    acknowledged: false,
                },
            );
            let seq = st.dispatch("INTERACTION_CREATE", interaction.clone());
            PushedPress {
                interaction_id: id,
                token,
                seq,
                interaction,
            }
        };
        self.bump();
        pressed
    }

    /// Dispatches `GUILD_CREATE` for `guild` (its channels become known to the API).
    pub fn push_guild(&self, guild: &FakeGuild) -> Option<u64> {
        let seq = {
            let mut st = self.lock();
            for c in guild.channels.iter().chain(&guild.threads) {
                st.channels.insert(c.id.clone(), c.clone());
            }
            let mut roles = vec![json!({ "id": guild.id, "name": "@everyone", "tags": {} })];
            if let Some(r) = &guild.bot_role {
                roles.push(json!({ "id": r, "name": "Chitin", "managed": true, "tags": { "bot_id": st.bot.id } }));
            }
            let d = json!({
                "id": guild.id,
                "name": format!("guild-{}", guild.id),
                "unavailable": false,
                "channels": guild.channels.iter().map(FakeChannel::json).collect::<Vec<_>>(),
                "threads": guild.threads.iter().map(FakeChannel::json).collect::<Vec<_>>(),
                "roles": roles,
                "members": [],
            });
            st.dispatch("GUILD_CREATE", d)
        };
        self.bump();
        seq
    }

    /// Dispatches any event.
    pub fn push_dispatch(&self, t: &str, d: Value) -> Option<u64> {
        let seq = self.lock().dispatch(t, d);
        self.bump();
        seq
    }

    // ---- Breaking the gateway ----

    /// Closes the live connection without a close frame (the session stays valid: the
    /// client should resume). False when there is none.
    pub fn drop_gateway(&self) -> bool {
        let conn = self.lock().conn.take();
        let dropped = conn.is_some_and(|c| c.tx.send(Cmd::Drop).is_ok());
        self.bump();
        dropped
    }

    /// Sends Reconnect (op 7).
    pub fn send_reconnect(&self) -> bool {
        self.lock().send_op(json!({ "op": 7, "d": null }))
    }

    /// Asks for a heartbeat now (op 1).
    pub fn request_heartbeat(&self) -> bool {
        self.lock().send_op(json!({ "op": 1, "d": null }))
    }

    /// Sends Invalid Session (op 9) with `d: resumable`; not resumable also ends the session.
    pub fn invalidate_session(&self, resumable: bool) -> bool {
        let sent = {
            let mut st = self.lock();
            let sent = st.send_op(json!({ "op": 9, "d": resumable }));
            if !resumable {
                expire(&mut st);
            }
            sent
        };
        self.bump();
        sent
    }

    /// Ends the current session silently (as Discord does some minutes after its connection
    /// dropped): a later Resume gets Invalid Session, and events pushed until a new Identify
    /// are lost.
    pub fn expire_session(&self) {
        expire(&mut self.lock());
        self.bump();
    }

    /// The live connection stops acknowledging heartbeats (a zombie connection; later
    /// connections acknowledge again).
    pub fn stop_acking_heartbeats(&self) -> bool {
        let mut st = self.lock();
        match st.conn.as_ref().map(|c| c.id) {
            Some(id) => st.silent.insert(id),
            None => false,
        }
    }

    /// Closes the live connection with a close frame of `code`.
    pub fn close_gateway(&self, code: u16) -> bool {
        let conn = self.lock().conn.take();
        let sent = conn.is_some_and(|c| c.tx.send(Cmd::Close(code)).is_ok());
        self.bump();
        sent
    }

    // ---- What the bot did ----

    /// Every Identify's `d`, in order.
    pub fn identifies(&self) -> Vec<Value> {
        self.lock().identifies.clone()
    }

    /// Every Resume's `d`, in order.
    pub fn resumes(&self) -> Vec<Value> {
        self.lock().resumes.clone()
    }

    /// Every gateway connection's request path and query, in order.
    pub fn connections(&self) -> Vec<String> {
        self.lock().connections.clone()
    }

    /// Every heartbeat's `d`, in order.
    pub fn heartbeats(&self) -> Vec<Value> {
        self.lock().heartbeats.clone()
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.lock().sent.clone()
    }

    pub fn edits(&self) -> Vec<Edit> {
        self.lock().edits.clone()
    }

    pub fn callbacks(&self) -> Vec<Callback> {
        self.lock().callbacks.clone()
    }

    pub fn followups(&self) -> Vec<Followup> {
        self.lock().followups.clone()
    }

    /// The channels typing was shown in.
    pub fn typing(&self) -> Vec<String> {
        self.lock().typing.clone()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn calls_to(&self, endpoint: Endpoint) -> Vec<Call> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.endpoint == endpoint)
            .cloned()
            .collect()
    }

    /// Requests answered 429 because their bucket was spent (scripted 429s not counted).
    pub fn rate_limited(&self) -> usize {
        self.lock().rate_limited
    }

    /// Creates answered with an earlier message because their nonce repeated.
    pub fn deduplicated(&self) -> usize {
        self.lock().deduplicated
    }

    /// A message as it is now.
    pub fn message(&self, id: &str) -> Option<Value> {
        self.lock().messages.get(id).cloned()
    }
}

fn expire(st: &mut State) {
    if let Some(id) = st.session.take()
        && let Some(log) = st.sessions.get_mut(&id)
    {
        log.valid = false;
    }
}

fn now_iso() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("2025-01-01T00:00:00.{:06}+00:00", d.subsec_micros())
}

/// An edit time distinct from every earlier one of this fake.
fn now_iso_unique(st: &mut State) -> String {
    let n = st.snowflake();
    format!("2025-01-01T00:00:00.{n}+00:00")
}

// ---- The gateway ----

async fn serve_gateway(shared: Shared, sock: TcpStream) {
    let (state, changed) = shared;
    let mut path = String::new();
    #[allow(
        clippy::result_large_err,
        reason = "the signature tungstenite's handshake callback has"
    )]
    let callback = |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        path = req.uri().to_string();
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(sock, callback).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let (conn_id, interval) = {
        let mut st = lock(&state);
        st.next_conn += 1;
        st.connections.push(path);
        (st.next_conn, st.heartbeat_interval_ms)
    };
    changed.send_modify(|n| *n += 1);
    let (mut sink, mut stream) = ws.split();
    let hello = json!({ "op": 10, "d": { "heartbeat_interval": interval }, "s": null, "t": null });
    if sink.send(WsMessage::text(hello.to_string())).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Send(text)) => {
                    if sink.send(WsMessage::text(text)).await.is_err() {
                        break;
                    }
                }
                Some(Cmd::Close(code)) => {
                    let frame = CloseFrame { code: code.into(), reason: "closed by the fake".into() };
                    let _ = sink.send(WsMessage::Close(Some(frame))).await;
                    break;
                }
                // Dropping the socket closes TCP without a close frame.
                Some(Cmd::Drop) | None => break,
            },
            msg = stream.next() => {
                let text = match msg {
                    Some(Ok(WsMessage::Text(t))) => t.to_string(),
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => continue,
                };
                let Ok(payload) = serde_json::from_str::<Value>(&text) else {
                    let frame = CloseFrame { code: 4002.into(), reason: "decode error".into() };
                    let _ = sink.send(WsMessage::Close(Some(frame))).await;
                    break;
                };
                let out = on_client_payload(&state, conn_id, &tx, &payload);
                changed.send_modify(|n| *n += 1);
                let mut stop = false;
                for o in out {
                    let msg = match o {
                        Out::Text(t) => WsMessage::text(t),
                        Out::Close(code) => {
                            stop = true;
                            WsMessage::Close(Some(CloseFrame { code: code.into(), reason: "closed by the fake".into() }))
                        }
                    };
                    if sink.send(msg).await.is_err() {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
        }
    }
    let mut st = lock(&state);
    if st.conn.as_ref().is_some_and(|c| c.id == conn_id) {
        st.conn = None;
    }
    drop(st);
    changed.send_modify(|n| *n += 1);
}

enum Out {
    Text(String),
    Close(u16),
}

/// What the fake answers a client payload with (written in order by the connection task, so
/// dispatches pushed meanwhile come after them).
fn on_client_payload(
    state: &Mutex<State>,
    conn_id: u64,
    tx: &mpsc::UnboundedSender<Cmd>,
    p: &Value,
) -> Vec<Out> {
    let mut st = lock(state);
    let d = &p["d"];
    match p["op"].as_u64() {
        Some(1) => {
            st.heartbeats.push(d.clone());
            if st.silent.contains(&conn_id) {
                vec![]
            } else {
                vec![Out::Text(json!({ "op": 11 }).to_string())]
            }
        }
        Some(2) => {
            if d["token"].as_str() != Some(st.token.as_str()) {
                return vec![Out::Close(4004)];
            }
            st.identifies.push(d.clone());
            let intents = d["intents"].as_u64().unwrap_or(0);
            if st.refuse_message_content && intents & (1 << 15) != 0 {
                return vec![Out::Close(4014)];
            }
            st.next_session += 1;
            let session_id = format!("fake-session-{}", st.next_session);
            if let Some(old) = st.conn.replace(Conn {
                id: conn_id,
                tx: tx.clone(),
            }) && old.id != conn_id
            {
                let _ = old.tx.send(Cmd::Drop);
            }
            let ready_d = json!({
                "v": 10,
                "user": st.bot.json(),
                "guilds": [],
                "session_id": session_id,
                "resume_gateway_url": format!("ws://127.0.0.1:{}/resume", st.gateway_port),
                "application": { "id": st.bot.id, "flags": 0 },
            });
            let ready = json!({ "op": 0, "t": "READY", "s": 1, "d": ready_d });
            st.sessions.insert(
                session_id.clone(),
                SessionLog {
                    events: vec![ready.clone()],
                    valid: true,
                },
            );
            st.session = Some(session_id);
            vec![Out::Text(ready.to_string())]
        }
        Some(6) => {
            if d["token"].as_str() != Some(st.token.as_str()) {
                return vec![Out::Close(4004)];
            }
            st.resumes.push(d.clone());
            let session_id = d["session_id"].as_str().unwrap_or_default().to_owned();
            let seq = d["seq"].as_u64().unwrap_or(0);
            let valid = st.sessions.get(&session_id).is_some_and(|l| l.valid);
            if !valid {
                return vec![Out::Text(json!({ "op": 9, "d": false }).to_string())];
            }
            if let Some(old) = st.conn.replace(Conn {
                id: conn_id,
                tx: tx.clone(),
            }) && old.id != conn_id
            {
                let _ = old.tx.send(Cmd::Drop);
            }
            st.session = Some(session_id.clone());
            let mut out: Vec<Out> = Vec::new();
            if let Some(log) = st.sessions.get_mut(&session_id) {
                for e in &log.events {
                    if e["s"].as_u64().is_some_and(|s| s > seq) {
                        out.push(Out::Text(e.to_string()));
                    }
                }
                let s = log.events.len() as u64 + 1;
                let resumed = json!({ "op": 0, "t": "RESUMED", "s": s, "d": null });
                log.events.push(resumed.clone());
                out.push(Out::Text(resumed.to_string()));
            }
            out
        }
        _ => vec![],
    }
}

// ---- The HTTP API ----

fake_http::failing_by_drop_variants!(Failure);

fn error(status: u16, code: u64, message: &str) -> Reply {
    fake_http::json(
        fake_http::status(status, StatusCode::BAD_REQUEST),
        &json!({ "message": message, "code": code }),
    )
}

fn form_error(field: &str, message: &str) -> Reply {
    fake_http::json(
        StatusCode::BAD_REQUEST,
        &json!({
            "message": "Invalid Form Body",
            "code": 50035,
            "errors": { field: { "_errors": [{ "code": "BASE_TYPE_INVALID", "message": message }] } },
        }),
    )
}

fn failure_response(f: &Failure, endpoint: Endpoint) -> Reply {
    match f {
        Failure::RateLimited {
            retry_after,
            global,
        } => {
            let mut r = fake_http::json(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({ "message": "You are being rate limited.", "retry_after": retry_after, "global": global }),
            );
            fake_http::set_header(&mut r, "retry-after", format!("{}", retry_after.ceil()));
            if *global {
                fake_http::set_header(&mut r, "x-ratelimit-global", "true");
                fake_http::set_header(&mut r, "x-ratelimit-scope", "global");
            } else {
                fake_http::set_header(&mut r, "x-ratelimit-scope", "user");
                fake_http::set_header(&mut r, "x-ratelimit-bucket", endpoint.bucket());
                fake_http::set_header(&mut r, "x-ratelimit-limit", "5");
                fake_http::set_header(&mut r, "x-ratelimit-remaining", "0");
                fake_http::set_header(
                    &mut r,
                    "x-ratelimit-reset-after",
                    format!("{retry_after:.3}"),
                );
            }
            r
        }
        Failure::ServerError => error(500, 0, "500: Internal Server Error"),
        Failure::BadGateway => fake_http::respond(
            StatusCode::BAD_GATEWAY,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>",
        ),
        Failure::Status {
            status,
            code,
            message,
        } => error(*status, *code, message),
        // Not reached: drops are handled before.
        Failure::Drop | Failure::DropAfterHandling => error(500, 0, "500: Internal Server Error"),
    }
}

/// Which endpoint a request is for, and its ids.
fn classify(method: &Method, path: &str) -> Option<(Endpoint, Vec<String>)> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    match (method, parts.as_slice()) {
        (&Method::GET, ["users", "@me"]) => Some((Endpoint::UsersMe, vec![])),
        (&Method::GET, ["gateway", "bot"]) => Some((Endpoint::GatewayBot, vec![])),
        (&Method::GET, ["channels", id]) => Some((Endpoint::GetChannel, owned(&[id]))),
        (&Method::POST, ["channels", id, "messages"]) => {
            Some((Endpoint::CreateMessage, owned(&[id])))
        }
        (&Method::PATCH, ["channels", id, "messages", mid]) => {
            Some((Endpoint::EditMessage, owned(&[id, mid])))
        }
        (&Method::POST, ["channels", id, "typing"]) => Some((Endpoint::Typing, owned(&[id]))),
        (&Method::POST, ["interactions", id, token, "callback"]) => {
            Some((Endpoint::InteractionCallback, owned(&[id, token])))
        }
        (&Method::POST, ["webhooks", app, token]) => {
            Some((Endpoint::Followup, owned(&[app, token])))
        }
        _ => None,
    }
}

async fn handle(shared: Shared, req: Request<Incoming>) -> Answered {
    let (state, changed) = shared;
    let method = req.method().clone();
    let full_path = req.uri().path().to_owned();
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if method == Method::GET && full_path.starts_with("/attachments/") {
        let mut st = lock(&state);
        let found = st.files.get(&full_path).cloned();
        return Ok(match found {
            Some(bytes) => {
                st.downloads.push(full_path);
                fake_http::respond(StatusCode::OK, "application/octet-stream", bytes)
            }
            None => error(404, 0, "404: Not Found"),
        });
    }
    let body = fake_http::body(req).await?;
    let Some(path) = full_path.strip_prefix(API_PREFIX) else {
        return Ok(error(404, 0, "404: Not Found"));
    };
    let Some((endpoint, ids)) = classify(&method, path) else {
        return Ok(error(404, 0, "404: Not Found"));
    };
    let params: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return Ok(error(400, 50109, "The request body contains invalid JSON.")),
        }
    };
    let needs_auth = !matches!(endpoint, Endpoint::InteractionCallback | Endpoint::Followup);
    let failure = {
        let mut st = lock(&state);
        let expected = format!("Bot {}", st.token);
        if needs_auth && authorization.as_deref() != Some(expected.as_str()) {
            return Ok(error(401, 0, "401: Unauthorized"));
        }
        let shown_path = match endpoint {
            Endpoint::InteractionCallback | Endpoint::Followup => {
                format!(
                    "/{}/{}/<token>",
                    path.split('/').nth(1).unwrap_or_default(),
                    ids[0]
                )
            }
            _ => path.to_owned(),
        };
        st.calls.push(Call {
            endpoint,
            method: method.to_string(),
            path: shown_path,
            body: params.clone(),
            authorization: authorization.clone(),
        });
        st.failures.next(&endpoint)
    };
    changed.send_modify(|n| *n += 1);
    // Every answer, and a request handled before its connection is dropped, is a change.
    let bump = |answer: Reply| {
        changed.send_modify(|n| *n += 1);
        answer
    };
    fake_http::scripted(
        failure,
        |f| bump(failure_response(f, endpoint)),
        || async { bump(route(&state, endpoint, &ids, &params)) },
    )
    .await
}

/// Applies the endpoint's bucket: the 429 when it is spent, else the headers to add.
fn bucket(
    st: &mut State,
    endpoint: Endpoint,
    major: &str,
) -> Result<Vec<(&'static str, String)>, Box<Reply>> {
    let cfg = st.buckets.get(&endpoint).copied().unwrap_or(BucketConfig {
        limit: 1000,
        reset_after: 60.0,
    });
    let now = Instant::now();
    let window = st
        .windows
        .entry((endpoint, major.to_owned()))
        .or_insert(Window {
            used: 0,
            started: now,
        });
    if now.duration_since(window.started).as_secs_f64() >= cfg.reset_after {
        *window = Window {
            used: 0,
            started: now,
        };
    }
    let left = (cfg.reset_after - now.duration_since(window.started).as_secs_f64()).max(0.0);
    if window.used >= cfg.limit {
        st.rate_limited += 1;
        let mut r = fake_http::json(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({ "message": "You are being rate limited.", "retry_after": left, "global": false }),
        );
        fake_http::set_header(&mut r, "retry-after", format!("{}", left.ceil()));
        fake_http::set_header(&mut r, "x-ratelimit-scope", "user");
        fake_http::set_header(&mut r, "x-ratelimit-bucket", endpoint.bucket());
        fake_http::set_header(&mut r, "x-ratelimit-limit", cfg.limit.to_string());
        fake_http::set_header(&mut r, "x-ratelimit-remaining", "0");
        fake_http::set_header(&mut r, "x-ratelimit-reset-after", format!("{left:.3}"));
        return Err(Box::new(r));
    }
    window.used += 1;
    let remaining = cfg.limit - window.used;
    let reset = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
        + left;
    Ok(vec![
        ("x-ratelimit-bucket", endpoint.bucket().to_owned()),
        ("x-ratelimit-limit", cfg.limit.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset", format!("{reset:.3}")),
        ("x-ratelimit-reset-after", format!("{left:.3}")),
    ])
}

fn route(state: &Mutex<State>, endpoint: Endpoint, ids: &[String], params: &Value) -> Reply {
    let mut st = lock(state);
    let major = ids.first().cloned().unwrap_or_default();
    let headers = match bucket(&mut st, endpoint, &major) {
        Ok(h) => h,
        Err(limited) => return *limited,
    };
    let mut answer = match endpoint {
        Endpoint::UsersMe => fake_http::json(StatusCode::OK, &st.bot.json()),
        Endpoint::GatewayBot => fake_http::json(
            StatusCode::OK,
            &json!({
                "url": format!("ws://127.0.0.1:{}", st.gateway_port),
                "shards": 1,
                "session_start_limit": { "total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1 },
            }),
        ),
        Endpoint::GetChannel => match st.channels.get(&major) {
            Some(c) => fake_http::json(StatusCode::OK, &c.json()),
            None => error(404, 10003, "Unknown Channel"),
        },
        Endpoint::CreateMessage => create_message(&mut st, &major, params),
        Endpoint::EditMessage => edit_message(
            &mut st,
            &major,
            ids.get(1).map_or("", String::as_str),
            params,
        ),
        Endpoint::Typing => {
            if st.channels.contains_key(&major) {
                st.typing.push(major);
                fake_http::empty(StatusCode::NO_CONTENT)
            } else {
                error(404, 10003, "Unknown Channel")
            }
        }
        Endpoint::InteractionCallback => {
            let token = ids.get(1).map_or("", String::as_str);
            match st.interactions.get_mut(&major) {
                Some(i) if i.token == token => {
                    if i.acknowledged {
                        error(400, 40060, "Interaction has already been acknowledged.")
                    } else {
                        i.acknowledged = true;
                        st.callbacks.push(Callback {
                            interaction_id: major,
                            kind: params["type"].as_u64().unwrap_or(0),
                            body: params.clone(),
                        });
                        fake_http::empty(StatusCode::NO_CONTENT)
                    }
                }
                _ => error(404, 10062, "Unknown interaction"),
            }
        }
        Endpoint::Followup => {
            let token = ids.get(1).map_or("", String::as_str);
            let found = (major == st.bot.id)
                .then(|| {
                    st.interactions
                        .iter()
                        .find(|(_, i)| i.token == token)
                        .map(|(id, i)| (id.clone(), i.acknowledged))
                })
                .flatten();
            match found {
                Some((id, true)) => {
                    st.followups.push(Followup {
                        interaction_id: id,
                        body: params.clone(),
                    });
                    let mid = st.snowflake();
                    fake_http::json(
                        StatusCode::OK,
                        &json!({ "id": mid, "content": params["content"], "flags": params["flags"], "author": st.bot.json() }),
                    )
                }
                Some((_, false)) => error(400, 40060, "Interaction has not been acknowledged."),
                None => error(404, 10015, "Unknown Webhook"),
            }
        }
    };
    for (name, value) in headers {
        fake_http::set_header(&mut answer, name, value);
    }
    answer
}

/// A components array Discord would refuse, refused here.
fn bad_components(components: &Value) -> Option<Reply> {
    let Some(rows) = components.as_array() else {
        return (!components.is_null()).then(|| form_error("components", "must be an array"));
    };
    let mut ids = HashSet::new();
    for row in rows {
        if row["type"].as_u64() != Some(1) {
            return Some(form_error(
                "components",
                "top-level components must be action rows",
            ));
        }
        let Some(buttons) = row["components"].as_array() else {
            return Some(form_error("components", "an action row needs components"));
        };
        if buttons.is_empty() || buttons.len() > 5 {
            return Some(form_error("components", "an action row holds 1-5 buttons"));
        }
        for b in buttons {
            let id = b["custom_id"].as_str().unwrap_or_default();
            let label = b["label"].as_str().unwrap_or_default();
            if b["type"].as_u64() != Some(2)
                || !matches!(b["style"].as_u64(), Some(1..=4))
                || id.is_empty()
                || id.chars().count() > 100
                || label.chars().count() > 80
                || !ids.insert(id.to_owned())
            {
                return Some(form_error("components", "invalid button"));
            }
        }
    }
    None
}

fn bad_content(params: &Value, creating: bool) -> Option<Reply> {
    let content = params["content"].as_str().unwrap_or_default();
    let has_components = params["components"]
        .as_array()
        .is_some_and(|c| !c.is_empty());
    if creating && content.trim().is_empty() && !has_components {
        return Some(error(400, 50006, "Cannot send an empty message"));
    }
    if content.chars().count() > 2000 {
        return Some(form_error("content", "Must be 2000 or fewer in length."));
    }
    bad_components(&params["components"])
}

fn create_message(st: &mut State, channel_id: &str, params: &Value) -> Reply {
    let Some(channel) = st.channels.get(channel_id).cloned() else {
        return error(404, 10003, "Unknown Channel");
    };
    if let Some(bad) = bad_content(params, true) {
        return bad;
    }
    let nonce = match &params["nonce"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    if nonce.as_ref().is_some_and(|n| n.chars().count() > 25) {
        return form_error("nonce", "Must be 25 or fewer in length.");
    }
    if params["enforce_nonce"].as_bool() == Some(true)
        && let Some(n) = &nonce
        && let Some(existing) = st.nonces.get(n).and_then(|id| st.messages.get(id)).cloned()
    {
        st.deduplicated += 1;
        return fake_http::json(StatusCode::OK, &existing);
    }
    let reference = &params["message_reference"];
    let mut referenced = None;
    if let Some(rid) = reference["message_id"].as_str() {
        match st.messages.get(rid) {
            Some(m) => referenced = Some(m.clone()),
            None if reference["fail_if_not_exists"].as_bool() == Some(false) => {}
            None => return form_error("message_reference", "Unknown message"),
        }
    }
    let id = st.snowflake();
    let content = params["content"].as_str().unwrap_or_default().to_owned();
    let mut message = json!({
        "id": id,
        "channel_id": channel.id,
        "author": st.bot.json(),
        "content": content,
        "timestamp": now_iso(),
        "edited_timestamp": null,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "components": params["components"].as_array().cloned().unwrap_or_default(),
        "flags": params["flags"].as_u64().unwrap_or(0),
        "type": 0,
    });
    if let Some(g) = &channel.guild_id {
        message["guild_id"] = g.as_str().into();
    }
    if let Some(n) = &nonce {
        message["nonce"] = n.as_str().into();
        st.nonces.insert(n.clone(), id.clone());
    }
    if let Some(r) = referenced {
        message["type"] = 19.into();
        message["message_reference"] =
            json!({ "type": 0, "message_id": r["id"], "channel_id": r["channel_id"] });
        message["referenced_message"] = r;
    }
    st.messages.insert(id.clone(), message.clone());
    st.sent.push(SentMessage {
        channel_id: channel.id,
        message_id: id,
        content,
        body: params.clone(),
        message: message.clone(),
    });
    // Discord sends the bot its own messages too.
    st.dispatch("MESSAGE_CREATE", message.clone());
    fake_http::json(StatusCode::OK, &message)
}

fn edit_message(st: &mut State, channel_id: &str, message_id: &str, params: &Value) -> Reply {
    if !st.channels.contains_key(channel_id) {
        return error(404, 10003, "Unknown Channel");
    }
    let Some(current) = st.messages.get(message_id).cloned() else {
        return error(404, 10008, "Unknown Message");
    };
    if current["channel_id"].as_str() != Some(channel_id) {
        return error(404, 10008, "Unknown Message");
    }
    if current["author"]["id"] != st.bot.json()["id"] {
        return error(403, 50005, "Cannot edit a message authored by another user");
    }
    if let Some(bad) = bad_content(params, false) {
        return bad;
    }
    let mut message = current;
    if let Some(c) = params["content"].as_str() {
        message["content"] = c.into();
    }
    if let Some(c) = params["components"].as_array() {
        message["components"] = Value::Array(c.clone());
    }
    message["edited_timestamp"] = now_iso_unique(st).into();
    st.messages.insert(message_id.to_owned(), message.clone());
    st.edits.push(Edit {
        channel_id: channel_id.to_owned(),
        message_id: message_id.to_owned(),
        body: params.clone(),
    });
    st.dispatch("MESSAGE_UPDATE", message.clone());
    fake_http::json(StatusCode::OK, &message)
}
