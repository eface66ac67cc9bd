//! A fake `signal-cli daemon --http` on 127.0.0.1 for tests, speaking signal-cli's formats:
//! JSON-RPC 2.0 on `POST /api/v1/rpc` (`Content-Type: application/json` required, as the
//! daemon does; answers `{"jsonrpc":"2.0","result":...,"id":...}` or
//! `{"jsonrpc":"2.0","error":{"code","message","data"},"id":...}`), the server-sent events
//! stream `GET /api/v1/events` (`event:receive` / `data:{"account":...,"envelope":{...}}`),
//! and `GET /api/v1/check`.
//!
//! The test pushes envelopes ([`FakeSignal::push`] with the [`Envelope`] builders: direct and
//! group messages, mentions, quotes, attachments, reactions, edits, typing, receipts, sync
//! messages). Envelopes pushed while no stream is open wait for the next one, as signal-cli
//! with `--receive-mode=on-connection` leaves them on the Signal server. The test drops the
//! open streams ([`FakeSignal::drop_streams`]), makes the next connections fail
//! ([`FakeSignal::refuse_streams`]), waits for a reconnection ([`FakeSignal::wait_for_stream`]),
//! reads what the bot did ([`FakeSignal::sends`], [`FakeSignal::typing`],
//! [`FakeSignal::calls`]) and scripts failures of the next calls of a method
//! ([`FakeSignal::fail_next`]).
//!
//! Methods: `version`, `getUserStatus`, `send` (`recipient` or `groupId`, `message`,
//! `quoteTimestamp` + `quoteAuthor`, `editTimestamp`; answers `{timestamp, results}` with
//! increasing timestamps; a group must be known: [`FakeSignal::add_group`]), `sendTyping`,
//! `sendReaction`, `getAttachment` (files stored with [`FakeSignal::put_attachment`]); any
//! other is `-32601`. An `account` parameter other than the fake's is `-32602` ("Specified
//! account does not exist"), as in multi-account mode.

use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::fake_http::{self, Answered, Reply, Script, Server, lock};

/// The bot's number the fake serves.
pub const ACCOUNT: &str = "+15550001111";
/// The bot's ACI.
pub const ACCOUNT_UUID: &str = "8f0e4c4e-1b8e-4a4d-9d57-00000000b07a";

/// A Signal user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeContact {
    /// `None`: the number is hidden (phone number privacy).
    pub number: Option<String>,
    pub uuid: String,
    pub name: String,
}

impl FakeContact {
    pub fn new(number: &str, uuid: &str, name: &str) -> Self {
        Self {
            number: Some(number.into()),
            uuid: uuid.into(),
            name: name.into(),
        }
    }

    /// A contact whose number signal-cli does not know.
    pub fn without_number(uuid: &str, name: &str) -> Self {
        Self {
            number: None,
            uuid: uuid.into(),
            name: name.into(),
        }
    }

    /// The bot itself.
    pub fn bot() -> Self {
        Self::new(ACCOUNT, ACCOUNT_UUID, "Chitin")
    }

    /// The id the adapter uses for this contact (the ACI).
    pub fn id(&self) -> String {
        self.uuid.clone()
    }

    fn source_fields(&self, envelope: &mut Value) {
        envelope["source"] = self
            .number
            .clone()
            .unwrap_or_else(|| self.uuid.clone())
            .into();
        envelope["sourceNumber"] = self.number.clone().map_or(Value::Null, Value::from);
        envelope["sourceUuid"] = self.uuid.as_str().into();
        envelope["sourceName"] = self.name.as_str().into();
        envelope["sourceDevice"] = 1.into();
    }

    fn address(&self, prefix: &str, v: &mut Value) {
        v[prefix] = self
            .number
            .clone()
            .unwrap_or_else(|| self.uuid.clone())
            .into();
        v[format!("{prefix}Number")] = self.number.clone().map_or(Value::Null, Value::from);
        v[format!("{prefix}Uuid")] = self.uuid.as_str().into();
    }
}

#[derive(Debug, Clone)]
enum Content {
    Data(Value),
    Edit { target: u64, data: Value },
    Other(&'static str, Value),
}

/// An envelope to push (its timestamp is assigned when it is pushed).
#[derive(Debug, Clone)]
pub struct Envelope {
    from: FakeContact,
    content: Content,
}

impl Envelope {
    /// A text message.
    pub fn text(from: &FakeContact, text: &str) -> Self {
        Self {
            from: from.clone(),
            content: Content::Data(json!({
                "message": text,
                "expiresInSeconds": 0,
                "viewOnce": false,
            })),
        }
    }

    /// Sent in the group `group_id` (base64).
    pub fn in_group(mut self, group_id: &str) -> Self {
        if let Some(data) = self.data_mut() {
            data["groupInfo"] = json!({
                "groupId": group_id,
                "groupName": "Team",
                "revision": 3,
                "type": "DELIVER",
            });
        }
        self
    }

    /// A group update (members, title ...), no text.
    pub fn group_update(from: &FakeContact, group_id: &str) -> Self {
        let mut e = Self {
            from: from.clone(),
            content: Content::Data(json!({ "message": null, "expiresInSeconds": 0 })),
        };
        if let Some(data) = e.data_mut() {
            data["groupInfo"] = json!({ "groupId": group_id, "groupName": "Team", "revision": 4, "type": "UPDATE" });
        }
        e
    }

    /// Prepends a mention of `who` (a placeholder character, as the apps send it).
    pub fn mentioning(mut self, who: &FakeContact) -> Self {
        if let Some(data) = self.data_mut() {
            let text = data["message"].as_str().unwrap_or_default().to_owned();
            data["message"] = format!("\u{FFFC} {text}").into();
            let mut mentions = data["mentions"].as_array().cloned().unwrap_or_default();
            for m in &mut mentions {
                if let Some(start) = m["start"].as_u64() {
                    m["start"] = (start + 2).into();
                }
            }
            let mut m = json!({ "start": 0, "length": 1 });
            m["name"] = who
                .number
                .clone()
                .unwrap_or_else(|| who.uuid.clone())
                .into();
            m["number"] = who.number.clone().map_or(Value::Null, Value::from);
            m["uuid"] = who.uuid.as_str().into();
            mentions.insert(0, m);
            data["mentions"] = mentions.into();
        }
        self
    }

    /// Quotes the message `timestamp` by `author`.
    pub fn quoting(mut self, timestamp: u64, author: &FakeContact, text: &str) -> Self {
        if let Some(data) = self.data_mut() {
            let mut q = json!({ "id": timestamp, "text": text, "attachments": [] });
            author.address("author", &mut q);
            data["quote"] = q;
        }
        self
    }

    /// Adds an attachment signal-cli has stored under `id`.
    pub fn attachment(
        mut self,
        id: &str,
        content_type: &str,
        filename: Option<&str>,
        size: u64,
    ) -> Self {
        if let Some(data) = self.data_mut() {
            let mut list = data["attachments"].as_array().cloned().unwrap_or_default();
            let mut a = json!({ "contentType": content_type, "id": id, "size": size });
            if let Some(f) = filename {
                a["filename"] = f.into();
            }
            list.push(a);
            data["attachments"] = list.into();
        }
        self
    }

    /// A reaction to the message `target_timestamp` by `target_author`.
    pub fn reaction(
        from: &FakeContact,
        emoji: &str,
        target_author: &FakeContact,
        target_timestamp: u64,
        remove: bool,
    ) -> Self {
        let mut r =
            json!({ "emoji": emoji, "targetSentTimestamp": target_timestamp, "isRemove": remove });
        target_author.address("targetAuthor", &mut r);
        Self {
            from: from.clone(),
            content: Content::Data(
                json!({ "message": null, "expiresInSeconds": 0, "reaction": r }),
            ),
        }
    }

    /// An edit of the sender's message `target_timestamp`.
    pub fn edit(from: &FakeContact, target_timestamp: u64, new_text: &str) -> Self {
        Self {
            from: from.clone(),
            content: Content::Edit {
                target: target_timestamp,
                data: json!({ "message": new_text, "expiresInSeconds": 0 }),
            },
        }
    }

    /// A typing indicator.
    pub fn typing(from: &FakeContact) -> Self {
        Self {
            from: from.clone(),
            content: Content::Other("typingMessage", json!({ "action": "STARTED" })),
        }
    }

    /// A delivery receipt for the bot's message `timestamp`.
    pub fn receipt(from: &FakeContact, timestamp: u64) -> Self {
        Self {
            from: from.clone(),
            content: Content::Other(
                "receiptMessage",
                json!({ "when": timestamp, "isDelivery": true, "isRead": false, "isViewed": false, "timestamps": [timestamp] }),
            ),
        }
    }

    /// A message the account sent from another device, synced to this one.
    pub fn sync_sent(from: &FakeContact, destination: &str, text: &str) -> Self {
        Self {
            from: from.clone(),
            content: Content::Other(
                "syncMessage",
                json!({ "sentMessage": { "destination": destination, "message": text } }),
            ),
        }
    }

    fn data_mut(&mut self) -> Option<&mut Value> {
        match &mut self.content {
            Content::Data(d) | Content::Edit { data: d, .. } => Some(d),
            Content::Other(..) => None,
        }
    }

    fn build(&self, timestamp: u64) -> Value {
        let mut env = json!({
            "timestamp": timestamp,
            "serverReceivedTimestamp": timestamp + 5,
            "serverDeliveredTimestamp": timestamp + 9,
        });
        self.from.source_fields(&mut env);
        match &self.content {
            Content::Data(d) => {
                let mut d = d.clone();
                d["timestamp"] = timestamp.into();
                env["dataMessage"] = d;
            }
            Content::Edit { target, data } => {
                let mut d = data.clone();
                d["timestamp"] = timestamp.into();
                env["editMessage"] = json!({ "targetSentTimestamp": target, "dataMessage": d });
            }
            Content::Other(field, v) => {
                let mut v = v.clone();
                if *field == "typingMessage" {
                    v["timestamp"] = timestamp.into();
                }
                env[*field] = v;
            }
        }
        json!({ "envelope": env, "account": ACCOUNT })
    }
}

/// A failure of the next call(s) of a method.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// A JSON-RPC error object.
    Rpc {
        code: i64,
        message: String,
        data: Value,
    },
    /// `-5`: every recipient rate limited, with `retryAfterSeconds`.
    RateLimited { retry_after_secs: u64 },
    /// `-4`: a recipient's identity key changed.
    Untrusted,
    /// `-1` "Failed to send message" with every recipient a network failure.
    NetworkFailure,
    /// `-32603`, as for an unexpected exception in the daemon.
    Internal,
    /// This HTTP status without a body.
    Http(u16),
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is sent), then the connection is closed.
    DropAfterHandling,
}

/// A `send` (message or edit) the bot made.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub timestamp: u64,
    pub recipient: Option<String>,
    pub group_id: Option<String>,
    pub message: String,
    pub quote_timestamp: Option<u64>,
    pub quote_author: Option<String>,
    pub edit_timestamp: Option<u64>,
    pub params: Value,
}

/// A `sendTyping` the bot made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Typing {
    pub recipient: Option<String>,
    pub group_id: Option<String>,
    pub stop: bool,
}

/// One JSON-RPC request (failed or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub params: Value,
}

#[derive(Default)]
struct State {
    next_ts: u64,
    subscribers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Frames pushed while no stream was open.
    pending: VecDeque<Bytes>,
    /// HTTP statuses the next stream connections are answered with.
    refused_streams: VecDeque<u16>,
    calls: Vec<Call>,
    sends: Vec<SentMessage>,
    typing: Vec<Typing>,
    reactions: Vec<Value>,
    failures: Script<String, Failure>,
    attachments: HashMap<String, Vec<u8>>,
    groups: HashSet<String>,
}

impl State {
    fn timestamp(&mut self) -> u64 {
        self.next_ts += 1;
        self.next_ts
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeSignal {
    /// The state; its changes count the stream connections accepted so far.
    server: Server<State>,
}

impl fmt::Debug for FakeSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.server.debug("FakeSignal", f)
    }
}

impl FakeSignal {
    /// Starts a fake daemon for [`ACCOUNT`] on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let state = State {
            next_ts: 1_700_000_000_000,
            ..State::default()
        };
        Ok(Self {
            server: fake_http::bind("").await?.serve(state, handle),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    /// The daemon's root to configure (`http://127.0.0.1:<port>`).
    pub fn api_base(&self) -> Url {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Streams an envelope (or queues it until a stream is open); returns its timestamp (the
    /// message's Signal id).
    pub fn push(&self, envelope: Envelope) -> u64 {
        let mut st = self.lock();
        let ts = st.timestamp();
        let frame = sse_frame(&envelope.build(ts));
        deliver(&mut st, frame);
        ts
    }

    /// Streams any notification object as the data of a `receive` event.
    pub fn push_raw(&self, notification: &Value) {
        let mut st = self.lock();
        deliver(&mut st, sse_frame(notification));
    }

    /// Closes every open event stream (the client sees the stream end).
    pub fn drop_streams(&self) {
        self.lock().subscribers.clear();
    }

    /// The next `times` stream connections are answered with HTTP `status`.
    pub fn refuse_streams(&self, times: usize, status: u16) {
        self.lock()
            .refused_streams
            .extend(std::iter::repeat_n(status, times));
    }

    /// Stream connections accepted so far.
    pub fn streams_opened(&self) -> u64 {
        *self.server.changes().borrow()
    }

    /// Waits (at most `deadline`) until `count` stream connections were accepted.
    pub async fn wait_for_stream(&self, count: u64, deadline: Duration) -> bool {
        let mut rx = self.server.changes().subscribe();
        tokio::time::timeout(deadline, rx.wait_for(|n| *n >= count))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Open event streams.
    pub fn open_streams(&self) -> usize {
        let mut st = self.lock();
        st.subscribers.retain(|s| !s.is_closed());
        st.subscribers.len()
    }

    /// Makes a group known (the bot is a member).
    pub fn add_group(&self, group_id: &str) {
        self.lock().groups.insert(group_id.into());
    }

    /// Stores an attachment signal-cli has downloaded.
    pub fn put_attachment(&self, id: &str, bytes: Vec<u8>) {
        self.lock().attachments.insert(id.into(), bytes);
    }

    /// Every `send` (messages and edits), in order.
    pub fn sends(&self) -> Vec<SentMessage> {
        self.lock().sends.clone()
    }

    pub fn typing(&self) -> Vec<Typing> {
        self.lock().typing.clone()
    }

    /// The parameters of every `sendReaction`.
    pub fn reactions(&self) -> Vec<Value> {
        self.lock().reactions.clone()
    }

    /// Every JSON-RPC request, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The next `times` calls of `method` fail (after the ones scripted before).
    pub fn fail_next(&self, method: &str, times: usize, failure: Failure) {
        self.lock().failures.push(method.into(), times, failure);
    }
}

fn sse_frame(notification: &Value) -> Bytes {
    Bytes::from(format!("event:receive\ndata:{notification}\n\n"))
}

/// To every open stream, or queued when none is open.
fn deliver(st: &mut State, frame: Bytes) {
    st.subscribers.retain(|s| !s.is_closed());
    let mut delivered = false;
    for s in &st.subscribers {
        delivered |= s.send(frame.clone()).is_ok();
    }
    if !delivered {
        st.pending.push_back(frame);
    }
}

/// A response body fed by a channel (the event stream).
struct StreamBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

impl hyper::body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fake_http::failing_by_drop_variants!(Failure);

fn empty(status: u16) -> Reply {
    fake_http::empty(fake_http::status(status, StatusCode::INTERNAL_SERVER_ERROR))
}

fn json_response(body: &Value) -> Reply {
    fake_http::json(StatusCode::OK, body)
}

fn rpc_error(id: &Value, code: i64, message: &str, data: Value) -> Reply {
    json_response(&json!({
        "jsonrpc": "2.0",
        "error": { "code": code, "message": message, "data": data },
        "id": id,
    }))
}

fn failure_response(id: &Value, f: &Failure) -> Reply {
    match f {
        Failure::Rpc {
            code,
            message,
            data,
        } => rpc_error(id, *code, message, data.clone()),
        Failure::RateLimited { retry_after_secs } => rpc_error(
            id,
            -5,
            "Failed to send message due to rate limiting",
            json!({ "response": { "timestamp": 0, "results": [
                { "recipientAddress": { "uuid": null, "number": null }, "type": "RATE_LIMIT_FAILURE", "retryAfterSeconds": retry_after_secs }
            ] } }),
        ),
        Failure::Untrusted => rpc_error(
            id,
            -4,
            "Failed to send message due to untrusted identities",
            json!({ "response": { "timestamp": 0, "results": [ { "type": "IDENTITY_FAILURE" } ] } }),
        ),
        Failure::NetworkFailure => rpc_error(
            id,
            -1,
            "Failed to send message",
            json!({ "response": { "timestamp": 0, "results": [ { "type": "NETWORK_FAILURE" } ] } }),
        ),
        Failure::Internal => rpc_error(
            id,
            -32603,
            "Failed to send message: Connection reset (IOException)",
            Value::Null,
        ),
        Failure::Http(status) => empty(*status),
        Failure::Drop | Failure::DropAfterHandling => empty(500),
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    streams: watch::Sender<u64>,
    req: Request<Incoming>,
) -> Answered {
    let path = req.uri().path().to_owned();
    let method = req.method().as_str().to_owned();
    match (method.as_str(), path.as_str()) {
        ("GET", "/api/v1/check") => Ok(empty(200)),
        ("GET", "/api/v1/events") => Ok(events(&state, &streams)),
        ("POST", "/api/v1/rpc") => {
            let json_body = req
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let body = fake_http::body(req).await?;
            if !json_body {
                return Ok(empty(415));
            }
            rpc(&state, &body).await
        }
        (_, "/api/v1/rpc" | "/api/v1/events" | "/api/v1/check") => Ok(empty(405)),
        _ => Ok(empty(404)),
    }
}

fn events(state: &Arc<Mutex<State>>, streams: &watch::Sender<u64>) -> Reply {
    let mut st = lock(state);
    if let Some(status) = st.refused_streams.pop_front() {
        return empty(status);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    while let Some(frame) = st.pending.pop_front() {
        let _ = tx.send(frame);
    }
    st.subscribers.push(tx);
    drop(st);
    streams.send_modify(|n| *n += 1);
    let mut r = Response::new(StreamBody { rx }.boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r
}

async fn rpc(state: &Arc<Mutex<State>>, body: &[u8]) -> Answered {
    let Ok(request) = serde_json::from_slice::<Value>(body) else {
        return Ok(rpc_error(&Value::Null, -32700, "Parse error", Value::Null));
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let Some(method) = request.get("method").and_then(Value::as_str) else {
        return Ok(rpc_error(
            &id,
            -32600,
            "method field must be set",
            Value::Null,
        ));
    };
    let params = request.get("params").cloned().unwrap_or_else(|| json!({}));
    let failure = {
        let mut st = lock(state);
        st.calls.push(Call {
            method: method.into(),
            params: params.clone(),
        });
        if params
            .get("account")
            .and_then(Value::as_str)
            .is_some_and(|a| a != ACCOUNT)
        {
            return Ok(rpc_error(
                &id,
                -32602,
                "Specified account does not exist",
                Value::Null,
            ));
        }
        st.failures.next(method)
    };
    fake_http::scripted(
        failure,
        |f| failure_response(&id, f),
        || async { dispatch(state, &id, method, &params) },
    )
    .await
}

fn ok(id: &Value, result: Value) -> Reply {
    json_response(&json!({ "jsonrpc": "2.0", "result": result, "id": id }))
}

/// `recipient` (a string or a list) and `groupId`.
fn targets(params: &Value) -> (Option<String>, Option<String>) {
    let recipient = match &params["recipient"] {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) => a.first().and_then(Value::as_str).map(String::from),
        _ => None,
    };
    let group = params["groupId"].as_str().map(String::from);
    (recipient, group)
}

fn dispatch(state: &Arc<Mutex<State>>, id: &Value, method: &str, params: &Value) -> Reply {
    let mut st = lock(state);
    match method {
        "version" => ok(id, json!({ "version": "0.13.99-fake" })),
        "getUserStatus" => {
            let list: Vec<Value> = match &params["recipient"] {
                Value::Array(a) => a.clone(),
                v @ Value::String(_) => vec![v.clone()],
                _ => Vec::new(),
            };
            let out: Vec<Value> = list
                .iter()
                .filter_map(Value::as_str)
                .map(|r| {
                    let uuid = if r == ACCOUNT { ACCOUNT_UUID } else { "" };
                    json!({ "recipient": r, "number": r, "uuid": uuid, "isRegistered": true })
                })
                .collect();
            ok(id, out.into())
        }
        "send" | "sendTyping" | "sendReaction" => {
            let (recipient, group_id) = targets(params);
            if recipient.is_some() == group_id.is_some() {
                return rpc_error(id, -1, "No recipients given", Value::Null);
            }
            if let Some(g) = &group_id
                && !st.groups.contains(g)
            {
                return rpc_error(id, -1, &format!("Group not found: {g}"), Value::Null);
            }
            match method {
                "sendTyping" => {
                    st.typing.push(Typing {
                        recipient,
                        group_id,
                        stop: params["stop"].as_bool() == Some(true),
                    });
                    ok(id, json!({}))
                }
                "sendReaction" => {
                    st.reactions.push(params.clone());
                    let ts = st.timestamp();
                    ok(id, json!({ "timestamp": ts, "results": [] }))
                }
                _ => {
                    let message = params["message"].as_str().unwrap_or_default().to_owned();
                    if message.is_empty() {
                        return rpc_error(
                            id,
                            -1,
                            "Sending empty message is not allowed, either a message, attachment or sticker must be given.",
                            Value::Null,
                        );
                    }
                    let quote_timestamp = params["quoteTimestamp"].as_u64();
                    let quote_author = params["quoteAuthor"].as_str().map(String::from);
                    if quote_timestamp.is_some() && quote_author.is_none() {
                        return rpc_error(id, -1, "Quote author parameter is missing", Value::Null);
                    }
                    let ts = st.timestamp();
                    let to = recipient
                        .clone()
                        .or_else(|| group_id.clone())
                        .unwrap_or_default();
                    st.sends.push(SentMessage {
                        timestamp: ts,
                        recipient,
                        group_id: group_id.clone(),
                        message,
                        quote_timestamp,
                        quote_author,
                        edit_timestamp: params["editTimestamp"].as_u64(),
                        params: params.clone(),
                    });
                    let mut result = json!({ "recipientAddress": { "uuid": null, "number": to }, "type": "SUCCESS" });
                    if let Some(g) = group_id {
                        result["groupId"] = g.into();
                    }
                    ok(id, json!({ "timestamp": ts, "results": [result] }))
                }
            }
        }
        "getAttachment" => {
            let aid = params["id"].as_str().unwrap_or_default();
            match st.attachments.get(aid) {
                Some(bytes) => ok(
                    id,
                    json!({ "data": base64::engine::general_purpose::STANDARD.encode(bytes) }),
                ),
                None => rpc_error(
                    id,
                    -1,
                    &format!("Could not find attachment with ID: {aid}"),
                    Value::Null,
                ),
            }
        }
        _ => rpc_error(id, -32601, "Method not implemented", Value::Null),
    }
}
