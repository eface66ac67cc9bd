//! Fake model servers for tests (this crate's and later ones: the agent loop, the gateway,
//! the scripted-adversary suite). Hidden from the docs; not for production use.
//!
//! [`FakeAnthropic`] and [`FakeOpenAi`] listen on 127.0.0.1 (random port), speak the real
//! wire formats (SSE with chunked transfer encoding when the request says `"stream": true`,
//! one JSON body otherwise, keep-alive), answer from a script of [`Step`]s, and record
//! every request they receive ([`RecordedRequest`]).
//!
//! ```ignore
//! let fake = FakeOpenAi::start(vec![Step::status(500), Step::text("hi")]).await;
//! // [[providers]] base_url = fake.base_url()
//! assert_eq!(fake.requests().len(), 2);
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::retry::Sleeper;
use super::{KeyRequest, KeySource};
use crate::secrets::SecretValue;

/// One tool call the fake model makes.
#[derive(Debug, Clone)]
pub struct FakeToolCall {
    pub id: String,
    pub name: String,
    /// Sent as is (may be malformed on purpose).
    pub arguments_json: String,
    /// Into how many stream fragments the arguments are split.
    pub fragments: usize,
}

/// What the fake model answers.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Text, one stream delta per piece.
    pub text: Vec<String>,
    pub tool_calls: Vec<FakeToolCall>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The protocol's stop reason; default `end_turn`/`stop`, or `tool_use`/`tool_calls`
    /// when there are tool calls.
    pub stop_reason: Option<String>,
}

impl Reply {
    /// No text and no tool calls yet (add them with [`Reply::tool_call`]).
    pub fn empty() -> Self {
        Self::text(Vec::<String>::new())
    }

    /// Text in the given stream pieces.
    pub fn text<S: Into<String>>(pieces: impl IntoIterator<Item = S>) -> Self {
        Self {
            text: pieces.into_iter().map(Into::into).collect(),
            tool_calls: Vec::new(),
            input_tokens: 10,
            output_tokens: 5,
            stop_reason: None,
        }
    }

    /// Adds a tool call whose arguments stream in `fragments` pieces.
    #[must_use]
    pub fn tool_call(
        mut self,
        id: &str,
        name: &str,
        arguments_json: &str,
        fragments: usize,
    ) -> Self {
        self.tool_calls.push(FakeToolCall {
            id: id.into(),
            name: name.into(),
            arguments_json: arguments_json.into(),
            fragments: fragments.max(1),
        });
        self
    }

    #[must_use]
    pub fn usage(mut self, input: u64, output: u64) -> Self {
        self.input_tokens = input;
        self.output_tokens = output;
        self
    }

    #[must_use]
    pub fn stop_reason(mut self, r: &str) -> Self {
        self.stop_reason = Some(r.into());
        self
    }
}

/// One scripted answer (one per request, in order).
#[derive(Debug, Clone)]
pub enum Step {
    /// Answer normally.
    Reply(Reply),
    /// An HTTP error with the protocol's error body and an optional `retry-after` value.
    Status {
        status: u16,
        retry_after: Option<String>,
        message: String,
    },
    /// Read the request and never answer.
    Hang,
    /// Send the response head and the first `events` stream events, then go silent.
    HangAfter { reply: Reply, events: usize },
    /// Send the response head and the first `events` stream events, then close the
    /// connection (an incomplete chunked body).
    DropAfter { reply: Reply, events: usize },
    /// Stream the first `events` events, wait until the test calls `gate.notify_one()`, then
    /// stream the rest (a model that pauses mid-answer, for streamed replies).
    Gated {
        reply: Reply,
        events: usize,
        gate: std::sync::Arc<tokio::sync::Notify>,
    },
    /// A streamed error event after the first event (Anthropic `event: error`, OpenAI
    /// `data: {"error":...}`).
    StreamError { kind: String, message: String },
    /// `307 Temporary Redirect` to `location`.
    Redirect { location: String },
    /// Anything: status, content type, body.
    Raw {
        status: u16,
        content_type: String,
        body: String,
    },
}

impl Step {
    /// A streamed or whole text reply (one piece).
    pub fn text(s: &str) -> Self {
        Self::Reply(Reply::text([s]))
    }
    /// A reply that is only one tool call (arguments in 3 fragments).
    pub fn tool_call(id: &str, name: &str, arguments_json: &str) -> Self {
        Self::Reply(Reply::empty().tool_call(id, name, arguments_json, 3))
    }
    pub fn status(status: u16) -> Self {
        Self::Status {
            status,
            retry_after: None,
            message: format!("fake error {status}"),
        }
    }
    /// 429 with `retry-after: <value>`.
    pub fn rate_limited(retry_after: &str) -> Self {
        Self::Status {
            status: 429,
            retry_after: Some(retry_after.into()),
            message: "rate limited".into(),
        }
    }
}

/// A request the fake received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-case, in order.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Null` when it is not JSON).
    pub body: Value,
    pub raw_body: Vec<u8>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Anthropic,
    OpenAi,
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    fallback: Option<Step>,
    requests: Vec<RecordedRequest>,
    /// Whether requests are kept (see [`FakeServer::set_recording`]).
    recording: bool,
    /// The model ids `GET /v1/models` lists.
    models: Vec<String>,
    /// When set, `GET /v1/models` answers 401 unless this key is presented (`x-api-key` or
    /// `Authorization: Bearer`).
    models_key: Option<String>,
}

/// A running fake server. Stops accepting when dropped.
pub struct FakeServer {
    kind: Kind,
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeServer")
            .field("kind", &self.kind)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The Anthropic Messages API fake (`POST /v1/messages`).
#[derive(Debug)]
pub struct FakeAnthropic;

impl FakeAnthropic {
    pub async fn start(steps: Vec<Step>) -> std::io::Result<FakeServer> {
        FakeServer::start(Kind::Anthropic, steps).await
    }
}

/// The OpenAI Chat Completions fake (`POST /v1/chat/completions`).
#[derive(Debug)]
pub struct FakeOpenAi;

impl FakeOpenAi {
    pub async fn start(steps: Vec<Step>) -> std::io::Result<FakeServer> {
        FakeServer::start(Kind::OpenAi, steps).await
    }
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeServer {
    async fn start(kind: Kind, steps: Vec<Step>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State {
            script: steps.into(),
            recording: true,
            ..State::default()
        }));
        let st = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                tokio::spawn(serve(kind, sock, Arc::clone(&st)));
            }
        });
        Ok(Self {
            kind,
            addr,
            state,
            accept,
        })
    }

    /// The `base_url` to configure: `http://127.0.0.1:PORT` (Anthropic) or
    /// `http://127.0.0.1:PORT/v1` (OpenAI).
    pub fn base_url(&self) -> String {
        match self.kind {
            Kind::Anthropic => format!("http://{}", self.addr),
            Kind::OpenAi => format!("http://{}/v1", self.addr),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// Keeps (`true`, the default) or stops keeping a copy of each request received. A
    /// benchmark turns it off: copying an ever longer request is work of the fake's own that
    /// would be measured with the gateway's.
    pub fn set_recording(&self, on: bool) {
        lock(&self.state).recording = on;
    }

    /// Appends a step to the script.
    pub fn push(&self, step: Step) {
        lock(&self.state).script.push_back(step);
    }

    /// The model ids `GET /v1/models` lists (answered outside the script).
    pub fn set_models(&self, ids: &[&str]) {
        lock(&self.state).models = ids.iter().map(|s| (*s).to_string()).collect();
    }

    /// `GET /v1/models` answers 401 unless the request carries `key`.
    pub fn require_models_key(&self, key: &str) {
        lock(&self.state).models_key = Some(key.to_string());
    }

    /// The step answered (again and again) once the script is used up. Without one, an
    /// exhausted script answers 500 "fake script exhausted".
    pub fn set_fallback(&self, step: Step) {
        lock(&self.state).fallback = Some(step);
    }
}

async fn serve(kind: Kind, mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(req) = read_request(&mut sock, &mut buf).await else {
            return;
        };
        if req.method == "GET" && req.path == "/v1/models" {
            let (status, body) = {
                let mut s = lock(&state);
                if s.recording {
                    s.requests.push(req.clone());
                }
                models_answer(kind, &req, &s)
            };
            if !write_whole(&mut sock, status, "application/json", &[], &body).await {
                return;
            }
            continue;
        }
        let step = {
            let mut s = lock(&state);
            if s.recording {
                s.requests.push(req.clone());
            }
            s.script.pop_front().or_else(|| s.fallback.clone())
        };
        let expected = match kind {
            Kind::Anthropic => "/v1/messages",
            Kind::OpenAi => "/v1/chat/completions",
        };
        let keep = if req.method != "POST" || req.path != expected {
            let body = error_body(kind, "not_found_error", "no such endpoint");
            write_whole(&mut sock, 404, "application/json", &[], &body).await
        } else {
            let step = step.unwrap_or(Step::Status {
                status: 500,
                retry_after: None,
                message: "fake script exhausted".into(),
            });
            answer(kind, &mut sock, &req, step).await
        };
        if !keep {
            return;
        }
    }
}

/// Reads one request; `None` on EOF or garbage.
async fn read_request(sock: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RecordedRequest> {
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let mut chunk = [0u8; 8192];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
    };
    let head = String::from_utf8_lossy(buf.get(..head_end)?).into_owned();
    let mut lines = head.split("\r\n");
    let mut rl = lines.next()?.split(' ');
    let method = rl.next()?.to_string();
    let path = rl.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if len > 64 * 1024 * 1024 {
        return None;
    }
    let start = head_end + 4;
    while buf.len() < start + len {
        let mut chunk = [0u8; 65536];
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
    }
    let raw_body = buf.get(start..start + len)?.to_vec();
    buf.drain(..start + len);
    let body = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
    Some(RecordedRequest {
        method,
        path,
        headers,
        body,
        raw_body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        529 => "Overloaded",
        _ => "Status",
    }
}

async fn write_whole(
    sock: &mut TcpStream,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    body: &[u8],
) -> bool {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    for (n, v) in extra {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    sock.write_all(&bytes).await.is_ok()
}

/// `GET /v1/models` as each API answers it (OpenAI's list object, Anthropic's page).
fn models_answer(kind: Kind, req: &RecordedRequest, s: &State) -> (u16, Vec<u8>) {
    if let Some(key) = &s.models_key {
        let presented = req.header("x-api-key").or_else(|| {
            req.header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
        });
        if presented != Some(key.as_str()) {
            let body = error_body(kind, "authentication_error", "invalid x-api-key");
            return (401, body);
        }
    }
    let v = match kind {
        Kind::OpenAi => json!({"object": "list", "data": s.models.iter().map(|m| json!({
            "id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"})).collect::<Vec<_>>()}),
        Kind::Anthropic => json!({"data": s.models.iter().map(|m| json!({
            "type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"})).collect::<Vec<_>>(),
            "has_more": false, "first_id": s.models.first(), "last_id": s.models.last()}),
    };
    (200, v.to_string().into_bytes())
}

fn error_body(kind: Kind, ty: &str, message: &str) -> Vec<u8> {
    let v = match kind {
        Kind::Anthropic => json!({"type": "error", "error": {"type": ty, "message": message}}),
        Kind::OpenAi => json!({"error": {"message": message, "type": ty, "code": null}}),
    };
    v.to_string().into_bytes()
}

/// Answers one request; returns whether the connection stays usable.
async fn answer(kind: Kind, sock: &mut TcpStream, req: &RecordedRequest, step: Step) -> bool {
    let stream = req.body.get("stream").and_then(Value::as_bool) == Some(true);
    let model = req
        .body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("fake")
        .to_string();
    let include_usage = req
        .body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    match step {
        Step::Reply(r) => {
            if stream {
                let events = sse_events(kind, &model, &r, include_usage);
                write_sse(sock, &events, None).await
            } else {
                let body = whole_body(kind, &model, &r);
                write_whole(sock, 200, "application/json", &[], body.as_bytes()).await
            }
        }
        Step::Status {
            status,
            retry_after,
            message,
        } => {
            let ty = match status {
                429 => "rate_limit_error",
                s if s >= 500 => "api_error",
                _ => "invalid_request_error",
            };
            let extra: Vec<(&str, String)> = retry_after
                .map(|v| ("retry-after", v))
                .into_iter()
                .collect();
            write_whole(
                sock,
                status,
                "application/json",
                &extra,
                &error_body(kind, ty, &message),
            )
            .await
        }
        Step::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            false
        }
        Step::HangAfter { reply, events } if !stream => {
            partial_whole(kind, sock, &model, &reply, events, true).await
        }
        Step::DropAfter { reply, events } if !stream => {
            partial_whole(kind, sock, &model, &reply, events, false).await
        }
        Step::HangAfter { reply, events } => {
            let all = sse_events(kind, &model, &reply, include_usage);
            let part: Vec<String> = all.into_iter().take(events).collect();
            write_sse(sock, &part, Some(true)).await
        }
        Step::DropAfter { reply, events } => {
            let all = sse_events(kind, &model, &reply, include_usage);
            let part: Vec<String> = all.into_iter().take(events).collect();
            write_sse(sock, &part, Some(false)).await
        }
        Step::Gated {
            reply,
            events,
            gate,
        } if stream => {
            let all = sse_events(kind, &model, &reply, include_usage);
            let (first, rest) = all.split_at(events.min(all.len()));
            write_sse_gated(sock, first, rest, &gate).await
        }
        Step::Gated { reply, gate, .. } => {
            gate.notified().await;
            let body = whole_body(kind, &model, &reply);
            write_whole(sock, 200, "application/json", &[], body.as_bytes()).await
        }
        Step::StreamError { kind: ty, message } => {
            let first = sse_events(kind, &model, &Reply::text(["x"]), false)
                .into_iter()
                .next()
                .unwrap_or_default();
            let err = match kind {
                Kind::Anthropic => sse(
                    "error",
                    &json!({"type": "error", "error": {"type": ty, "message": message}}),
                ),
                Kind::OpenAi => sse("", &json!({"error": {"type": ty, "message": message}})),
            };
            write_sse(sock, &[first, err], None).await
        }
        Step::Redirect { location } => {
            write_whole(sock, 307, "text/plain", &[("location", location)], b"moved").await
        }
        Step::Raw {
            status,
            content_type,
            body,
        } => write_whole(sock, status, &content_type, &[], body.as_bytes()).await,
    }
}

/// A whole-body answer cut short: the head and the first `16 * events` bytes of the body,
/// then silence (`hang`) or a closed connection.
async fn partial_whole(
    kind: Kind,
    sock: &mut TcpStream,
    model: &str,
    reply: &Reply,
    events: usize,
    hang: bool,
) -> bool {
    let body = whole_body(kind, model, reply);
    let cut = body.len().min(events.saturating_mul(16).max(1));
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = sock.write_all(head.as_bytes()).await;
    let _ = sock
        .write_all(body.as_bytes().get(..cut).unwrap_or_default())
        .await;
    if hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    false
}

/// Writes SSE events as a chunked body. `end`: `None` = complete, `Some(true)` = then hang,
/// `Some(false)` = then close without the final chunk.
async fn write_sse(sock: &mut TcpStream, events: &[String], end: Option<bool>) -> bool {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                transfer-encoding: chunked\r\n\r\n";
    let mut out = head.as_bytes().to_vec();
    for e in events {
        out.extend_from_slice(format!("{:x}\r\n", e.len()).as_bytes());
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match end {
        None => {
            out.extend_from_slice(b"0\r\n\r\n");
            sock.write_all(&out).await.is_ok()
        }
        Some(hang) => {
            let _ = sock.write_all(&out).await;
            let _ = sock.flush().await;
            if hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let _ = sock.shutdown().await;
            false
        }
    }
}

/// A chunked SSE answer: `first`, a pause until `gate` is notified, then `rest` and the end.
async fn write_sse_gated(
    sock: &mut TcpStream,
    first: &[String],
    rest: &[String],
    gate: &tokio::sync::Notify,
) -> bool {
    let chunk = |e: &String| {
        let mut out = format!("{:x}\r\n", e.len()).into_bytes();
        out.extend_from_slice(e.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    };
    let mut out =
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                transfer-encoding: chunked\r\n\r\n"
            .to_vec();
    for e in first {
        out.extend(chunk(e));
    }
    if sock.write_all(&out).await.is_err() || sock.flush().await.is_err() {
        return false;
    }
    gate.notified().await;
    let mut out = Vec::new();
    for e in rest {
        out.extend(chunk(e));
    }
    out.extend_from_slice(b"0\r\n\r\n");
    sock.write_all(&out).await.is_ok()
}

fn sse(event: &str, data: &Value) -> String {
    if event.is_empty() {
        format!("data: {data}\n\n")
    } else {
        format!("event: {event}\ndata: {data}\n\n")
    }
}

/// Splits `s` into `n` pieces on character boundaries.
fn split_n(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let size = chars.len().div_ceil(n.max(1)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

fn stop_reason(kind: Kind, r: &Reply) -> String {
    if let Some(s) = &r.stop_reason {
        return s.clone();
    }
    match (kind, r.tool_calls.is_empty()) {
        (Kind::Anthropic, true) => "end_turn",
        (Kind::Anthropic, false) => "tool_use",
        (Kind::OpenAi, true) => "stop",
        (Kind::OpenAi, false) => "tool_calls",
    }
    .into()
}

/// The SSE events of a reply, in the real wire format.
fn sse_events(kind: Kind, model: &str, r: &Reply, include_usage: bool) -> Vec<String> {
    let mut out = Vec::new();
    let sr = stop_reason(kind, r);
    match kind {
        Kind::Anthropic => {
            out.push(sse(
                "message_start",
                &json!({"type": "message_start", "message": {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": r.input_tokens, "output_tokens": 1}}}),
            ));
            let mut index = 0u64;
            if !r.text.is_empty() {
                out.push(sse(
                    "content_block_start",
                    &json!({"type": "content_block_start",
                    "index": index, "content_block": {"type": "text", "text": ""}}),
                ));
                out.push(sse("ping", &json!({"type": "ping"})));
                for t in &r.text {
                    out.push(sse(
                        "content_block_delta",
                        &json!({"type": "content_block_delta",
                        "index": index, "delta": {"type": "text_delta", "text": t}}),
                    ));
                }
                out.push(sse(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                ));
                index += 1;
            }
            for c in &r.tool_calls {
                out.push(sse(
                    "content_block_start",
                    &json!({"type": "content_block_start",
                    "index": index, "content_block": {"type": "tool_use", "id": c.id,
                    "name": c.name, "input": {}}}),
                ));
                for f in split_n(&c.arguments_json, c.fragments) {
                    out.push(sse(
                        "content_block_delta",
                        &json!({"type": "content_block_delta",
                        "index": index, "delta": {"type": "input_json_delta", "partial_json": f}}),
                    ));
                }
                out.push(sse(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                ));
                index += 1;
            }
            out.push(sse(
                "message_delta",
                &json!({"type": "message_delta",
                "delta": {"stop_reason": sr, "stop_sequence": null},
                "usage": {"output_tokens": r.output_tokens}}),
            ));
            out.push(sse("message_stop", &json!({"type": "message_stop"})));
        }
        Kind::OpenAi => {
            let chunk = |delta: Value, finish: Value| {
                sse(
                    "",
                    &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                    "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}),
                )
            };
            out.push(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ));
            for t in &r.text {
                out.push(chunk(json!({"content": t}), Value::Null));
            }
            for (i, c) in r.tool_calls.iter().enumerate() {
                out.push(chunk(
                    json!({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": ""}}]}),
                    Value::Null,
                ));
                for f in split_n(&c.arguments_json, c.fragments) {
                    out.push(chunk(
                        json!({"tool_calls": [{"index": i,
                        "function": {"arguments": f}}]}),
                        Value::Null,
                    ));
                }
            }
            out.push(chunk(json!({}), json!(sr)));
            if include_usage {
                out.push(sse(
                    "",
                    &json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                    "created": 0, "model": model, "choices": [],
                    "usage": {"prompt_tokens": r.input_tokens, "completion_tokens": r.output_tokens,
                              "total_tokens": r.input_tokens + r.output_tokens}}),
                ));
            }
            out.push("data: [DONE]\n\n".to_string());
        }
    }
    out
}

fn whole_body(kind: Kind, model: &str, r: &Reply) -> String {
    let text: String = r.text.concat();
    let sr = stop_reason(kind, r);
    match kind {
        Kind::Anthropic => {
            let mut content = Vec::new();
            if !text.is_empty() {
                content.push(json!({"type": "text", "text": text}));
            }
            for c in &r.tool_calls {
                // The real API always sends an object; a malformed script sends the raw text
                // as a string so the client's check still has something to refuse.
                let input = serde_json::from_str::<Value>(&c.arguments_json)
                    .unwrap_or_else(|_| Value::String(c.arguments_json.clone()));
                content
                    .push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}));
            }
            json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": sr, "stop_sequence": null,
                   "usage": {"input_tokens": r.input_tokens, "output_tokens": r.output_tokens}})
            .to_string()
        }
        Kind::OpenAi => {
            let mut msg = serde_json::Map::new();
            msg.insert("role".into(), json!("assistant"));
            msg.insert(
                "content".into(),
                if text.is_empty() {
                    Value::Null
                } else {
                    json!(text)
                },
            );
            if !r.tool_calls.is_empty() {
                let calls: Vec<Value> = r.tool_calls.iter().map(|c| json!({"id": c.id,
                    "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}))
                    .collect();
                msg.insert("tool_calls".into(), Value::Array(calls));
            }
            json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
                   "model": model, "choices": [{"index": 0, "message": msg, "finish_reason": sr}],
                   "usage": {"prompt_tokens": r.input_tokens, "completion_tokens": r.output_tokens,
                             "total_tokens": r.input_tokens + r.output_tokens}})
            .to_string()
        }
    }
}

/// A key source with fixed keys per provider, recording every request for a key.
#[derive(Default)]
pub struct StaticKeys {
    keys: BTreeMap<String, String>,
    asked: Mutex<Vec<(String, String)>>,
}

impl StaticKeys {
    #[must_use]
    pub fn with(mut self, provider: &str, key: &str) -> Self {
        self.keys.insert(provider.into(), key.into());
        self
    }
    /// `(provider, host)` of every request, in order.
    pub fn asked(&self) -> Vec<(String, String)> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl KeySource for StaticKeys {
    fn key_for(&self, req: &KeyRequest<'_>) -> Result<SecretValue, String> {
        self.asked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((req.provider.into(), req.host.into()));
        self.keys
            .get(req.provider)
            .map(|k| SecretValue::from_str_copy(k))
            .ok_or_else(|| format!("policy denied secret.use for provider `{}`", req.provider))
    }
}

/// A sleeper that records the waits asked for and returns at once.
#[derive(Default)]
pub struct RecordingSleeper {
    waits: Mutex<Vec<Duration>>,
}

impl RecordingSleeper {
    pub fn waits(&self) -> Vec<Duration> {
        self.waits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Sleeper for RecordingSleeper {
    fn sleep(
        &self,
        d: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        self.waits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(d);
        Box::pin(std::future::ready(()))
    }
}
