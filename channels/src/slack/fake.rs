//! A fake Slack on 127.0.0.1 for tests, speaking the real wire formats: the Web API methods the
//! adapter calls (`POST /api/<method>` with `Authorization: Bearer` and a JSON body, answers
//! `{"ok":true,…}` or `{"ok":false,"error":"…"}`), private file downloads, and a Socket Mode
//! WebSocket endpoint; plus builders for Events API bodies, interactivity payloads and their
//! signatures, for the adapter's webhook routes.
//!
//! Behaviour that matches the real API:
//! - no `Authorization` header is `not_authed`, an unknown token `invalid_auth`, the app token
//!   on a bot method (or the reverse) `not_allowed_token_type`, all with HTTP 200; an unknown
//!   method is `unknown_method`;
//! - `auth.test` answers the bot's `user_id`, `user`, `bot_id`, `team_id`;
//! - `chat.postMessage` needs a conversation the fake knows (from a built event, or
//!   [`FakeSlack::add_channel`]; else `channel_not_found`), a text or blocks (`no_text`),
//!   refuses texts over 40,000 characters (`msg_too_long`; the real API truncates them),
//!   `section` texts over 3000 characters, button labels over 75 and values over 2000
//!   (`invalid_blocks`), assigns increasing `ts`s and keeps the message;
//! - `chat.update` of an unknown message is `message_not_found`; `blocks: []` removes the
//!   blocks, no `blocks` keeps them;
//! - `chat.postEphemeral` needs a known conversation and a `user`;
//! - `apps.connections.open` (app token) answers a single-use `ws://127.0.0.1:…/link/?ticket=…`
//!   URL; the WebSocket refuses a used or unknown ticket (HTTP 401), sends `hello`, then every
//!   envelope not acknowledged yet (oldest first; `retry_attempt` counts earlier deliveries), and
//!   records each `{"envelope_id": …}` it receives as an acknowledgement. On a new connection
//!   it first waits (up to 5 s) for the previous connections to close, so the acknowledgements
//!   sent on them are counted before it redelivers. [`FakeSlack::send_disconnect`] sends
//!   `{"type":"disconnect","reason":"refresh_requested"}` (the connection then gets no more
//!   envelopes, as Slack does before it closes one); [`FakeSlack::drop_connections`] closes the
//!   sockets without a word.
//! - `GET` of a file's `url_private_download` needs the bot token (without it: a 302 to a login
//!   page, as Slack answers).
//!
//! Scripted failures of the next calls of a method: [`FakeSlack::fail_next`] (429 with
//! `Retry-After`, 500, an `ok:false` error, dropped connections).
//!
//! Not modelled: form-encoded Web API bodies, pagination, `response_url`, several simultaneous
//! Socket Mode connections, redelivery on the same connection after Slack's timeout.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, StatusCode};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request as WsRequest, Response as WsResponse,
};

use super::sign;
use crate::fake_http::{self, Answered, Reply, Script, Server, lock};

/// The bot token [`FakeSlack::start`] accepts.
pub const BOT_TOKEN: &str = "xoxb-1000000001-2000000002-FakeBotTokenForTestsOnly0123";
/// The app-level token [`FakeSlack::start`] accepts for `apps.connections.open`.
pub const APP_TOKEN: &str = "xapp-1-A0FAKEAPP1-3000000003-fakeapptokenfortestsonly0123456789";
/// A signing secret for tests.
pub const SIGNING_SECRET: &str = "8f742231b10e8888abcd99fakesecret";
/// The bot's user id.
pub const BOT_USER_ID: &str = "U0BOT00001";
/// The bot's bot id (on its messages).
pub const BOT_ID: &str = "B0BOT00001";
/// The bot's user name.
pub const BOT_NAME: &str = "chitin";
pub const TEAM_ID: &str = "T0TEAM0001";
pub const APP_ID: &str = "A0FAKEAPP1";
/// A fixed Unix time (seconds) for signed requests; give the adapter a clock at this time.
pub const NOW: i64 = 1_712_345_678;

/// A workspace member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub id: String,
    pub name: String,
}

impl FakeUser {
    pub fn new(id: &str, name: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
        }
    }

    /// The `user_profile` Slack puts on message events.
    pub fn profile(&self) -> Value {
        json!({ "name": self.name.to_lowercase(), "real_name": self.name, "display_name": self.name, "team": TEAM_ID })
    }
}

/// A conversation's `channel_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelType {
    /// A direct message with the bot (`D…`).
    Im,
    /// A public channel (`C…`).
    Channel,
    /// A private channel.
    Group,
    /// A group direct message.
    Mpim,
}

impl ChannelType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Im => "im",
            Self::Channel => "channel",
            Self::Group => "group",
            Self::Mpim => "mpim",
        }
    }
}

/// A conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeChannel {
    pub id: String,
    pub kind: ChannelType,
}

impl FakeChannel {
    pub fn dm(id: &str) -> Self {
        Self {
            id: id.into(),
            kind: ChannelType::Im,
        }
    }

    pub fn public(id: &str) -> Self {
        Self {
            id: id.into(),
            kind: ChannelType::Channel,
        }
    }

    pub fn private(id: &str) -> Self {
        Self {
            id: id.into(),
            kind: ChannelType::Group,
        }
    }

    pub fn mpim(id: &str) -> Self {
        Self {
            id: id.into(),
            kind: ChannelType::Mpim,
        }
    }
}

/// A file stored in the fake ([`FakeSlack::put_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFile {
    pub id: String,
    pub name: String,
    pub mimetype: String,
    pub size: u64,
    pub url_private_download: String,
}

impl FakeFile {
    /// The file object of a message's `files`.
    pub fn json(&self) -> Value {
        let url_private = self.url_private_download.replace("/download/", "/");
        json!({
            "id": self.id,
            "created": NOW,
            "timestamp": NOW,
            "name": self.name,
            "title": self.name,
            "mimetype": self.mimetype,
            "filetype": self.name.rsplit('.').next().unwrap_or("bin"),
            "pretty_type": "File",
            "user": "U0ALICE001",
            "mode": "hosted",
            "is_external": false,
            "is_public": false,
            "size": self.size,
            "url_private": url_private,
            "url_private_download": self.url_private_download,
        })
    }
}

/// A user's message to build (ids are assigned when it is built).
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    channel: FakeChannel,
    user: Option<FakeUser>,
    text: String,
    thread: Option<(String, String)>,
    subtype: Option<String>,
    files: Vec<Value>,
    extra: Map<String, Value>,
}

impl MessageBuilder {
    /// A text message from `user` in `channel` (Slack markup as the client sends it: a mention
    /// is `<@U…>`, `&`, `<`, `>` typed by the user are `&amp;`, `&lt;`, `&gt;`).
    pub fn text(channel: &FakeChannel, user: &FakeUser, text: &str) -> Self {
        Self {
            channel: channel.clone(),
            user: Some(user.clone()),
            text: text.into(),
            thread: None,
            subtype: None,
            files: Vec::new(),
            extra: Map::new(),
        }
    }

    /// A reply in the thread of `thread_ts`, whose parent `parent_user_id` wrote.
    pub fn in_thread(mut self, thread_ts: &str, parent_user_id: &str) -> Self {
        self.thread = Some((thread_ts.into(), parent_user_id.into()));
        self
    }

    /// With a file (the message gets `subtype: file_share`).
    pub fn file(mut self, file: &FakeFile) -> Self {
        self.files.push(file.json());
        self.subtype = Some("file_share".into());
        self
    }

    pub fn subtype(mut self, subtype: &str) -> Self {
        self.subtype = Some(subtype.into());
        self
    }

    /// Posted by a bot or an app (`bot_id`, as Slack marks them).
    pub fn from_bot(mut self, bot_id: &str) -> Self {
        self.extra.insert("bot_id".into(), bot_id.into());
        self
    }

    /// Any other field of the event.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    fn build(self, ts: &str) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), "message".into());
        if let Some(s) = &self.subtype {
            m.insert("subtype".into(), s.as_str().into());
        }
        m.insert("text".into(), self.text.into());
        if let Some(u) = &self.user {
            m.insert("user".into(), u.id.as_str().into());
            m.insert("user_profile".into(), u.profile());
        }
        m.insert("ts".into(), ts.into());
        if let Some((thread_ts, parent)) = &self.thread {
            m.insert("thread_ts".into(), thread_ts.as_str().into());
            m.insert("parent_user_id".into(), parent.as_str().into());
        }
        if !self.files.is_empty() {
            m.insert("files".into(), self.files.into());
            m.insert("upload".into(), false.into());
        }
        m.insert("team".into(), TEAM_ID.into());
        m.insert("channel".into(), self.channel.id.as_str().into());
        m.insert("event_ts".into(), ts.into());
        m.insert("channel_type".into(), self.channel.kind.as_str().into());
        m.extend(self.extra);
        Value::Object(m)
    }
}

/// A built event.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub event_id: String,
    /// The message's `ts` (its id); empty for events that are not about a message.
    pub ts: String,
    pub channel: String,
    /// The inner `event`.
    pub event: Value,
    /// The whole `event_callback` body.
    pub body: Value,
}

impl Pushed {
    /// The body as Slack posts it.
    pub fn bytes(&self) -> Vec<u8> {
        self.body.to_string().into_bytes()
    }
}

/// The headers Slack signs a request with: `X-Slack-Request-Timestamp` and `X-Slack-Signature`.
pub fn signed_headers(secret: &str, timestamp: i64, body: &[u8]) -> Vec<(String, String)> {
    let ts = timestamp.to_string();
    vec![
        ("X-Slack-Request-Timestamp".into(), ts.clone()),
        ("X-Slack-Signature".into(), sign(secret, &ts, body)),
    ]
}

/// An interactivity request body: `payload=<json>`, form-encoded.
pub fn interactivity_body(payload: &Value) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", &payload.to_string())
        .finish()
        .into_bytes()
}

/// A failure of the next call(s) of a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// HTTP 429 with `Retry-After` (seconds) and `{"ok":false,"error":"ratelimited"}`.
    RateLimited { retry_after: u64 },
    /// HTTP 500 with an HTML body, as a front proxy answers.
    ServerError,
    /// HTTP 200 `{"ok":false,"error":<code>}`.
    Error(String),
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is posted), then the connection is closed without an
    /// answer.
    DropAfterHandling,
}

/// A `chat.postMessage` that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Posted {
    pub channel: String,
    pub ts: String,
    /// The `text` as received (escaped by the adapter).
    pub text: String,
    pub thread_ts: Option<String>,
    /// The buttons of the `actions` blocks: (label, value).
    pub buttons: Vec<(String, String)>,
    /// The `section` texts.
    pub sections: Vec<String>,
    pub params: Value,
}

/// A `chat.update` that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub channel: String,
    pub ts: String,
    pub text: String,
    /// The new buttons; `None` when the request had no `blocks`.
    pub buttons: Option<Vec<(String, String)>>,
    pub params: Value,
}

/// A `chat.postEphemeral` that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Ephemeral {
    pub channel: String,
    pub user: String,
    pub text: String,
    pub thread_ts: Option<String>,
    pub params: Value,
}

/// One Web API request with an accepted token (failed or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Value,
    pub content_type: String,
}

struct Envelope {
    id: String,
    frame: Value,
    deliveries: u32,
    acked: bool,
}

struct State {
    bot_token: String,
    app_token: String,
    origin: String,
    ws_addr: SocketAddr,
    next_ts: u64,
    next_id: u64,
    channels: HashSet<String>,
    /// The bot's messages by (channel, ts), as they are now.
    messages: HashMap<(String, String), Value>,
    posted: Vec<Posted>,
    updates: Vec<Update>,
    ephemerals: Vec<Ephemeral>,
    calls: Vec<Call>,
    failures: Script<String, Failure>,
    /// Files by id: (name, mimetype, bytes).
    files: HashMap<String, (String, String, Vec<u8>)>,
    downloads: Vec<String>,
    tickets: HashSet<String>,
    envelopes: Vec<Envelope>,
    acks: Vec<String>,
    connections: usize,
    live: usize,
    disconnects: u64,
    drops: u64,
}

impl State {
    fn ts(&mut self) -> String {
        self.next_ts += 1;
        format!("{NOW}.{:06}", self.next_ts)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}{:010}", self.next_id)
    }

    fn envelope(&mut self, kind: &str, payload: Value) -> String {
        self.next_id += 1;
        let id = format!("9a6e1f0b-5c4d-4e3f-8a2b-{:012}", self.next_id);
        let mut frame = json!({
            "envelope_id": id,
            "payload": payload,
            "type": kind,
            "accepts_response_payload": kind == "interactive",
        });
        if kind == "events_api" {
            frame["retry_attempt"] = 0.into();
            frame["retry_reason"] = "".into();
        }
        self.envelopes.push(Envelope {
            id: id.clone(),
            frame,
            deliveries: 0,
            acked: false,
        });
        id
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeSlack {
    /// The Web API (the first listener) and the Socket Mode WebSocket; its changes wake the
    /// socket connections and the waiters for acknowledgements.
    server: Server<State>,
}

impl fmt::Debug for FakeSlack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.server.debug("FakeSlack", f)
    }
}

impl FakeSlack {
    /// Starts a fake for [`BOT_TOKEN`] and [`APP_TOKEN`].
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(BOT_TOKEN, APP_TOKEN).await
    }

    /// Starts a fake for these tokens on free ports of 127.0.0.1 (Web API and WebSocket).
    pub async fn start_with(bot_token: &str, app_token: &str) -> std::io::Result<Self> {
        let listener = fake_http::bind("/api").await?;
        let ws_listener = fake_http::bind("/").await?;
        let state = State {
            bot_token: bot_token.into(),
            app_token: app_token.into(),
            origin: format!("http://{}", listener.addr),
            ws_addr: ws_listener.addr,
            next_ts: 100,
            next_id: 0,
            channels: HashSet::new(),
            messages: HashMap::new(),
            posted: Vec::new(),
            updates: Vec::new(),
            ephemerals: Vec::new(),
            calls: Vec::new(),
            failures: Script::default(),
            files: HashMap::new(),
            downloads: Vec::new(),
            tickets: HashSet::new(),
            envelopes: Vec::new(),
            acks: Vec::new(),
            connections: 0,
            live: 0,
            disconnects: 0,
            drops: 0,
        };
        let mut server = listener.serve(state, |state, _, req| handle(state, req));
        server.accept(ws_listener, serve_socket);
        Ok(Self { server })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    fn notify(&self) {
        self.server.notify();
    }

    /// The API root to configure (`http://127.0.0.1:<port>/api`).
    pub fn api_base(&self) -> Url {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Makes a conversation known (building an event in it does it too).
    pub fn add_channel(&self, channel: &FakeChannel) {
        self.lock().channels.insert(channel.id.clone());
    }

    /// An `event_callback` with this inner event and a fresh `event_id` (not queued anywhere:
    /// post it to the adapter's webhook, or push it over Socket Mode with
    /// [`FakeSlack::push_event`]).
    pub fn event_callback(&self, event: Value) -> Pushed {
        let mut st = self.lock();
        let event_id = st.id("Ev");
        let channel = event["channel"].as_str().unwrap_or_default().to_owned();
        if !channel.is_empty() {
            st.channels.insert(channel.clone());
        }
        let ts = event["ts"].as_str().unwrap_or_default().to_owned();
        let body = json!({
            "token": "legacyVerificationToken0",
            "team_id": TEAM_ID,
            "context_team_id": TEAM_ID,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": event_id,
            "event_time": NOW,
            "authorizations": [{
                "enterprise_id": null,
                "team_id": TEAM_ID,
                "user_id": BOT_USER_ID,
                "is_bot": true,
                "is_enterprise_install": false,
            }],
            "is_ext_shared_channel": false,
            "event_context": format!("4-{event_id}"),
        });
        Pushed {
            event_id,
            ts,
            channel,
            event,
            body,
        }
    }

    /// A `message` event with a fresh `ts` and `event_id`.
    pub fn message(&self, m: MessageBuilder) -> Pushed {
        let ts = self.lock().ts();
        self.event_callback(m.build(&ts))
    }

    /// The `app_mention` event Slack sends, besides the `message` event, for a message that
    /// mentions the bot in a channel (its own `event_id`).
    pub fn app_mention_of(&self, message: &Pushed) -> Pushed {
        let m = &message.event;
        let mut event = json!({
            "type": "app_mention",
            "user": m["user"],
            "text": m["text"],
            "ts": m["ts"],
            "team": TEAM_ID,
            "channel": m["channel"],
            "event_ts": m["ts"],
        });
        if let Some(t) = m["thread_ts"].as_str() {
            event["thread_ts"] = t.into();
        }
        if !m["files"].is_null() {
            event["files"] = m["files"].clone();
        }
        self.event_callback(event)
    }

    /// A `message_changed` event: `original` (a built message) with a new text.
    pub fn edit_of(&self, original: &Pushed, new_text: &str) -> Pushed {
        let ts = self.lock().ts();
        let mut message = original.event.clone();
        message["text"] = new_text.into();
        message["edited"] = json!({ "user": original.event["user"], "ts": ts });
        if let Some(m) = message.as_object_mut() {
            m.remove("channel");
            m.remove("channel_type");
            m.remove("event_ts");
        }
        let event = json!({
            "type": "message",
            "subtype": "message_changed",
            "hidden": true,
            "message": message,
            "channel": original.channel,
            "previous_message": original.event,
            "event_ts": ts,
            "ts": ts,
            "channel_type": original.event["channel_type"],
        });
        let mut pushed = self.event_callback(event);
        pushed.ts = original.ts.clone();
        pushed
    }

    /// A `block_actions` payload: `user` pressed the button with `value` under the bot's
    /// message `message_ts` in `channel` (its label and thread taken from the message, if the
    /// bot posted it here).
    pub fn button_press(
        &self,
        user: &FakeUser,
        channel: &str,
        message_ts: &str,
        value: &str,
    ) -> Value {
        let mut st = self.lock();
        let action_ts = st.ts();
        let trigger = st.id("");
        let message = st
            .messages
            .get(&(channel.to_owned(), message_ts.to_owned()))
            .cloned()
            .unwrap_or_else(|| {
                json!({ "type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "ts": message_ts, "text": "" })
            });
        let label = buttons_of(&message["blocks"])
            .into_iter()
            .find(|(_, v)| v == value)
            .map_or_else(|| "Button".to_owned(), |(l, _)| l);
        let mut container = json!({
            "type": "message",
            "message_ts": message_ts,
            "channel_id": channel,
            "is_ephemeral": false,
        });
        if let Some(t) = message["thread_ts"].as_str() {
            container["thread_ts"] = t.into();
        }
        json!({
            "type": "block_actions",
            "user": { "id": user.id, "username": user.name.to_lowercase(), "name": user.name.to_lowercase(), "team_id": TEAM_ID },
            "api_app_id": APP_ID,
            "token": "legacyVerificationToken0",
            "container": container,
            "trigger_id": format!("{trigger}.{}.fake", NOW),
            "team": { "id": TEAM_ID, "domain": "fake" },
            "enterprise": null,
            "is_enterprise_install": false,
            "channel": { "id": channel, "name": if channel.starts_with('D') { "directmessage" } else { "general" } },
            "message": message,
            "state": { "values": {} },
            "response_url": "https://hooks.slack.com/actions/T0TEAM0001/1/fakeResponseUrl",
            "actions": [{
                "action_id": "chitin_0",
                "block_id": "chitin_buttons",
                "text": { "type": "plain_text", "text": label, "emoji": true },
                "value": value,
                "type": "button",
                "action_ts": action_ts,
            }],
        })
    }

    /// Queues an `events_api` envelope with this `event_callback` body; returns its id.
    pub fn push_event(&self, body: &Value) -> String {
        self.push_envelope("events_api", body.clone())
    }

    /// Queues an `interactive` envelope with this payload; returns its id.
    pub fn push_interactive(&self, payload: &Value) -> String {
        self.push_envelope("interactive", payload.clone())
    }

    /// Queues an envelope of any type (`slash_commands`, …); returns its id.
    pub fn push_envelope(&self, kind: &str, payload: Value) -> String {
        let id = self.lock().envelope(kind, payload);
        self.notify();
        id
    }

    /// Sends `disconnect` (`refresh_requested`) on the open connections.
    pub fn send_disconnect(&self) {
        self.lock().disconnects += 1;
        self.notify();
    }

    /// Closes the open connections without a word.
    pub fn drop_connections(&self) {
        self.lock().drops += 1;
        self.notify();
    }

    /// The envelope ids acknowledged, in order (a repeated acknowledgement appears again).
    pub fn acks(&self) -> Vec<String> {
        self.lock().acks.clone()
    }

    /// Waits (up to 10 s) until at least `n` acknowledgements were received; returns them.
    pub async fn wait_for_acks(&self, n: usize) -> Vec<String> {
        let mut rx = self.server.changes().subscribe();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            rx.borrow_and_update();
            let acks = self.acks();
            if acks.len() >= n {
                return acks;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return acks;
            }
        }
    }

    /// The ids of the envelopes not acknowledged yet.
    pub fn unacked(&self) -> Vec<String> {
        self.lock()
            .envelopes
            .iter()
            .filter(|e| !e.acked)
            .map(|e| e.id.clone())
            .collect()
    }

    /// How many times each envelope was sent, by id.
    pub fn deliveries(&self, envelope_id: &str) -> u32 {
        self.lock()
            .envelopes
            .iter()
            .find(|e| e.id == envelope_id)
            .map_or(0, |e| e.deliveries)
    }

    /// WebSocket connections accepted so far.
    pub fn connections(&self) -> usize {
        self.lock().connections
    }

    /// Stores a file a user shared; its `url_private_download` is served by the fake.
    pub fn put_file(&self, name: &str, mimetype: &str, bytes: Vec<u8>) -> FakeFile {
        let mut st = self.lock();
        let id = st.id("F");
        let url = format!("{}/files-pri/{TEAM_ID}-{id}/download/{name}", st.origin);
        let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        st.files
            .insert(id.clone(), (name.into(), mimetype.into(), bytes));
        FakeFile {
            id,
            name: name.into(),
            mimetype: mimetype.into(),
            size,
            url_private_download: url,
        }
    }

    /// The file ids downloaded, in order.
    pub fn downloads(&self) -> Vec<String> {
        self.lock().downloads.clone()
    }

    pub fn posted(&self) -> Vec<Posted> {
        self.lock().posted.clone()
    }

    pub fn updates(&self) -> Vec<Update> {
        self.lock().updates.clone()
    }

    pub fn ephemerals(&self) -> Vec<Ephemeral> {
        self.lock().ephemerals.clone()
    }

    /// Every request with an accepted token, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The parameters of every call of `method`.
    pub fn calls_of(&self, method: &str) -> Vec<Value> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method == method)
            .map(|c| c.params.clone())
            .collect()
    }

    /// The bot's message as it is now.
    pub fn bot_message(&self, channel: &str, ts: &str) -> Option<Value> {
        self.lock()
            .messages
            .get(&(channel.to_owned(), ts.to_owned()))
            .cloned()
    }

    /// The next `times` calls of `method` fail with `failure` (after earlier scripted ones).
    pub fn fail_next(&self, method: &str, times: usize, failure: Failure) {
        self.lock().failures.push(method.to_owned(), times, failure);
    }
}

// ---- The Web API ----

fake_http::failing_by_drop_variants!(Failure);

fn respond(status: StatusCode, body: Value) -> Reply {
    fake_http::respond(status, "application/json; charset=utf-8", body.to_string())
}

fn ok(mut fields: Value) -> Reply {
    fields["ok"] = true.into();
    respond(StatusCode::OK, fields)
}

fn error(code: &str) -> Reply {
    respond(StatusCode::OK, json!({ "ok": false, "error": code }))
}

fn failure_response(f: &Failure) -> Reply {
    match f {
        Failure::RateLimited { retry_after } => {
            let mut r = respond(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "ok": false, "error": "ratelimited" }),
            );
            fake_http::set_header(&mut r, "retry-after", retry_after.to_string());
            r
        }
        Failure::ServerError => fake_http::respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/html",
            "<html><body>500 Internal Server Error</body></html>",
        ),
        Failure::Error(code) => error(code),
        // Not reached: drops are handled before.
        Failure::Drop | Failure::DropAfterHandling => error("internal_error"),
    }
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Incoming>) -> Answered {
    let path = req.uri().path().to_owned();
    let bearer = fake_http::bearer(req.headers());
    if req.method() == Method::GET && path.starts_with("/files-pri/") {
        return Ok(download(&state, &path, bearer.as_deref()));
    }
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = fake_http::body(req).await?;
    let Some(method) = path.strip_prefix("/api/").map(String::from) else {
        return Ok(respond(
            StatusCode::NOT_FOUND,
            json!({ "ok": false, "error": "not_found" }),
        ));
    };
    let params: Value = if body.is_empty() {
        json!({})
    } else if content_type.starts_with("application/json") {
        match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(error("invalid_json")),
        }
    } else {
        return Ok(error("invalid_arguments"));
    };
    let failure = {
        let mut st = lock(&state);
        let Some(token) = bearer else {
            return Ok(error("not_authed"));
        };
        let wants_app = method == "apps.connections.open";
        let (right, other) = if wants_app {
            (&st.app_token, &st.bot_token)
        } else {
            (&st.bot_token, &st.app_token)
        };
        if token == *other {
            return Ok(error("not_allowed_token_type"));
        }
        if token != *right {
            return Ok(error("invalid_auth"));
        }
        st.calls.push(Call {
            method: method.clone(),
            params: params.clone(),
            content_type,
        });
        st.failures.next(method.as_str())
    };
    fake_http::scripted(failure, failure_response, || async {
        dispatch(&state, &method, &params)
    })
    .await
}

fn download(state: &Arc<Mutex<State>>, path: &str, bearer: Option<&str>) -> Reply {
    let mut st = lock(state);
    if bearer != Some(st.bot_token.as_str()) {
        let mut r = fake_http::empty(StatusCode::FOUND);
        fake_http::set_header(
            &mut r,
            "location",
            "https://fake.slack.com/?redir=%2Ffiles-pri",
        );
        return r;
    }
    // /files-pri/<team>-<id>/download/<name>
    let id = path
        .strip_prefix("/files-pri/")
        .and_then(|rest| rest.split('/').next())
        .and_then(|team_file| team_file.split_once('-'))
        .map(|(_, id)| id.to_owned())
        .unwrap_or_default();
    match st.files.get(&id).cloned() {
        Some((_, mime, bytes)) => {
            st.downloads.push(id);
            fake_http::respond(StatusCode::OK, &mime, bytes)
        }
        None => {
            let mut r = fake_http::empty(StatusCode::NOT_FOUND);
            *r.body_mut() = fake_http::whole("Not Found");
            r
        }
    }
}

/// The (label, value) of every button of these blocks.
fn buttons_of(blocks: &Value) -> Vec<(String, String)> {
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "actions")
        .flat_map(|b| b["elements"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["type"] == "button")
        .map(|e| {
            (
                e["text"]["text"].as_str().unwrap_or_default().to_owned(),
                e["value"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn sections_of(blocks: &Value) -> Vec<String> {
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b["type"] == "section")
        .map(|b| b["text"]["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Blocks Slack would refuse (`invalid_blocks`).
fn bad_blocks(blocks: &Value) -> bool {
    if blocks.is_null() {
        return false;
    }
    let Some(list) = blocks.as_array() else {
        return true;
    };
    if list.len() > 50 {
        return true;
    }
    for b in list {
        match b["type"].as_str() {
            Some("section") => {
                let t = b["text"]["text"].as_str().unwrap_or_default();
                if t.is_empty() || t.chars().count() > 3000 {
                    return true;
                }
            }
            Some("actions") => {
                let Some(elements) = b["elements"].as_array() else {
                    return true;
                };
                if elements.is_empty() || elements.len() > 25 {
                    return true;
                }
                let mut ids = HashSet::new();
                for e in elements {
                    let label = e["text"]["text"].as_str().unwrap_or_default();
                    let value = e["value"].as_str().unwrap_or_default();
                    if label.is_empty()
                        || label.chars().count() > 75
                        || value.chars().count() > 2000
                        || !ids.insert(e["action_id"].as_str().unwrap_or_default().to_owned())
                    {
                        return true;
                    }
                }
            }
            _ => return true,
        }
    }
    false
}

fn dispatch(state: &Arc<Mutex<State>>, method: &str, params: &Value) -> Reply {
    let mut st = lock(state);
    match method {
        "auth.test" => ok(json!({
            "url": "https://fake.slack.com/",
            "team": "Fake Team",
            "user": BOT_NAME,
            "team_id": TEAM_ID,
            "user_id": BOT_USER_ID,
            "bot_id": BOT_ID,
            "is_enterprise_install": false,
        })),
        "chat.postMessage" => post_message(&mut st, params),
        "chat.update" => update_message(&mut st, params),
        "chat.postEphemeral" => {
            let channel = params["channel"].as_str().unwrap_or_default().to_owned();
            if !st.channels.contains(&channel) {
                return error("channel_not_found");
            }
            let Some(user) = params["user"].as_str().filter(|u| !u.is_empty()) else {
                return error("user_not_in_channel");
            };
            let text = params["text"].as_str().unwrap_or_default();
            if text.is_empty() {
                return error("no_text");
            }
            st.ephemerals.push(Ephemeral {
                channel,
                user: user.into(),
                text: text.into(),
                thread_ts: params["thread_ts"].as_str().map(String::from),
                params: params.clone(),
            });
            let ts = st.ts();
            ok(json!({ "message_ts": ts }))
        }
        "apps.connections.open" => {
            let ticket = st.id("ticket-");
            st.tickets.insert(ticket.clone());
            let url = format!("ws://{}/link/?ticket={ticket}&app_id={APP_ID}", st.ws_addr);
            ok(json!({ "url": url }))
        }
        _ => error("unknown_method"),
    }
}

fn post_message(st: &mut State, params: &Value) -> Reply {
    let channel = params["channel"].as_str().unwrap_or_default().to_owned();
    if !st.channels.contains(&channel) {
        return error("channel_not_found");
    }
    let text = params["text"].as_str().unwrap_or_default();
    let blocks = &params["blocks"];
    if text.trim().is_empty() && blocks.is_null() {
        return error("no_text");
    }
    if text.chars().count() > 40_000 {
        return error("msg_too_long");
    }
    if bad_blocks(blocks) {
        return error("invalid_blocks");
    }
    let ts = st.ts();
    let thread_ts = params["thread_ts"].as_str().map(String::from);
    let mut message = json!({
        "type": "message",
        "user": BOT_USER_ID,
        "bot_id": BOT_ID,
        "app_id": APP_ID,
        "text": text,
        "ts": ts,
        "team": TEAM_ID,
    });
    if let Some(t) = &thread_ts {
        message["thread_ts"] = t.as_str().into();
    }
    if !blocks.is_null() {
        message["blocks"] = blocks.clone();
    }
    st.messages
        .insert((channel.clone(), ts.clone()), message.clone());
    st.posted.push(Posted {
        channel: channel.clone(),
        ts: ts.clone(),
        text: text.into(),
        thread_ts,
        buttons: buttons_of(blocks),
        sections: sections_of(blocks),
        params: params.clone(),
    });
    ok(json!({ "channel": channel, "ts": ts, "message": message }))
}

fn update_message(st: &mut State, params: &Value) -> Reply {
    let channel = params["channel"].as_str().unwrap_or_default().to_owned();
    let ts = params["ts"].as_str().unwrap_or_default().to_owned();
    if !st.channels.contains(&channel) {
        return error("channel_not_found");
    }
    let text = params["text"].as_str().unwrap_or_default();
    let blocks = &params["blocks"];
    if bad_blocks(blocks) && blocks.as_array().is_none_or(|b| !b.is_empty()) {
        return error("invalid_blocks");
    }
    let Some(current) = st.messages.get_mut(&(channel.clone(), ts.clone())) else {
        return error("message_not_found");
    };
    if text.trim().is_empty() && blocks.is_null() {
        return error("no_text");
    }
    current["text"] = text.into();
    current["edited"] = json!({ "user": BOT_USER_ID, "ts": ts });
    let buttons = if blocks.is_null() {
        None
    } else {
        if blocks.as_array().is_some_and(Vec::is_empty) {
            if let Some(m) = current.as_object_mut() {
                m.remove("blocks");
            }
        } else {
            current["blocks"] = blocks.clone();
        }
        Some(buttons_of(blocks))
    };
    let answer = current.clone();
    st.updates.push(Update {
        channel: channel.clone(),
        ts: ts.clone(),
        text: text.into(),
        buttons,
        params: params.clone(),
    });
    ok(json!({ "channel": channel, "ts": ts, "text": text, "message": answer }))
}

// ---- Socket Mode ----

/// What a connection must do after a change of the fake's state.
enum Todo {
    Send(Vec<String>),
    Disconnect,
    Drop,
}

/// Accepts a WebSocket handshake only with a ticket `apps.connections.open` gave and nobody
/// used yet.
struct TicketCheck(Arc<Mutex<State>>);

impl Callback for TicketCheck {
    fn on_request(self, req: &WsRequest, resp: WsResponse) -> Result<WsResponse, ErrorResponse> {
        let ticket = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .find_map(|kv| kv.strip_prefix("ticket="))
            .unwrap_or_default()
            .to_owned();
        let mut st = lock(&self.0);
        if st.tickets.remove(&ticket) {
            Ok(resp)
        } else {
            let mut refused = ErrorResponse::new(Some("invalid or used ticket".into()));
            *refused.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refused)
        }
    }
}

async fn serve_socket(state: Arc<Mutex<State>>, changes: watch::Sender<u64>, tcp: TcpStream) {
    let check_ticket = TicketCheck(Arc::clone(&state));
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, check_ticket).await else {
        return;
    };
    let mut rx = changes.subscribe();
    // Wait for the previous connections to close, so their acknowledgements count first.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut seen_disconnects, mut seen_drops) = loop {
        rx.borrow_and_update();
        {
            let mut st = lock(&state);
            if st.live == 0 || Instant::now() >= deadline {
                st.live += 1;
                st.connections += 1;
                break (st.disconnects, st.drops);
            }
        }
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    };
    changes.send_modify(|n| *n += 1);
    let hello = json!({
        "type": "hello",
        "num_connections": 1,
        "debug_info": { "host": "applink-fake-1", "build_number": 1, "approximate_connection_time": 18060 },
        "connection_info": { "app_id": APP_ID },
    });
    let mut alive = ws.send(WsMessage::text(hello.to_string())).await.is_ok();
    let mut sent_here: HashSet<String> = HashSet::new();
    let mut retired = false;
    while alive {
        rx.borrow_and_update();
        let todo = {
            let mut st = lock(&state);
            if st.drops > seen_drops {
                seen_drops = st.drops;
                Todo::Drop
            } else if st.disconnects > seen_disconnects {
                seen_disconnects = st.disconnects;
                Todo::Disconnect
            } else if retired {
                Todo::Send(Vec::new())
            } else {
                let mut frames = Vec::new();
                for e in st.envelopes.iter_mut().filter(|e| !e.acked) {
                    if sent_here.insert(e.id.clone()) {
                        let mut frame = e.frame.clone();
                        if frame.get("retry_attempt").is_some() {
                            frame["retry_attempt"] = e.deliveries.into();
                            frame["retry_reason"] =
                                if e.deliveries > 0 { "timeout" } else { "" }.into();
                        }
                        e.deliveries += 1;
                        frames.push(frame.to_string());
                    }
                }
                Todo::Send(frames)
            }
        };
        match todo {
            Todo::Drop => break,
            Todo::Disconnect => {
                retired = true;
                let bye = json!({
                    "type": "disconnect",
                    "reason": "refresh_requested",
                    "debug_info": { "host": "applink-fake-1" },
                });
                alive = ws.send(WsMessage::text(bye.to_string())).await.is_ok();
                continue;
            }
            Todo::Send(frames) => {
                for f in frames {
                    if ws.send(WsMessage::text(f)).await.is_err() {
                        alive = false;
                        break;
                    }
                }
            }
        }
        if !alive {
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            msg = ws.next() => match msg {
                Some(Ok(WsMessage::Text(t))) => {
                    let id = serde_json::from_str::<Value>(t.as_str())
                        .ok()
                        .and_then(|v| v["envelope_id"].as_str().map(String::from));
                    if let Some(id) = id {
                        let mut st = lock(&state);
                        if let Some(e) = st.envelopes.iter_mut().find(|e| e.id == id) {
                            e.acked = true;
                        }
                        st.acks.push(id);
                        drop(st);
                        changes.send_modify(|n| *n += 1);
                    }
                }
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => alive = false,
                Some(Ok(_)) => {}
            },
        }
    }
    drop(ws);
    lock(&state).live -= 1;
    changes.send_modify(|n| *n += 1);
}
