//! The Streamable HTTP transport: each message is a POST of one JSON-RPC message to the
//! configured URL (and only there: no redirects, no proxy), answered with JSON or with an SSE
//! stream that carries the answer (and possibly notifications before it). The session id the
//! server gives at `initialize` (`Mcp-Session-Id`) and the negotiated protocol version
//! (`MCP-Protocol-Version`) go with every later request.
//!
//! Configured headers (`[[mcp.servers]] headers`, secrets released through the gate when the
//! connection starts) go with every request, marked sensitive; they are never logged.
//!
//! The client runs on its own thread with a single-threaded tokio runtime, so callers (the
//! tool path on the blocking pool, the CLI) wait on a plain channel and nothing here depends
//! on the caller's runtime.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::McpError;
use super::wire;
use crate::tools::cancel::Cancel;

/// What a POST produced.
enum Posted {
    /// 202: a notification was accepted.
    Accepted,
    /// The answer to the request.
    Answer(Result<Value, String>),
}

struct Job {
    msg: Value,
    id: Option<u64>,
    reply: mpsc::Sender<Result<Posted, String>>,
}

/// A configured request header carrying a secret (`[[mcp.servers]] headers`). No Debug; the
/// value is wiped on drop and each request's copy is marked sensitive (never shown by the
/// HTTP client's debug output).
pub struct Header {
    name: reqwest::header::HeaderName,
    value: zeroize::Zeroizing<String>,
}

impl Header {
    /// `prefix` (`""` or e.g. `"Bearer "`) followed by the secret's value.
    pub fn new(name: &str, prefix: &str, secret: &str) -> Result<Self, String> {
        let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("`{}` is not a header name", name.escape_default()))?;
        let mut value = zeroize::Zeroizing::new(String::with_capacity(prefix.len() + secret.len()));
        value.push_str(prefix);
        value.push_str(secret.trim());
        if reqwest::header::HeaderValue::from_str(&value).is_err() {
            return Err(format!(
                "the secret of header `{name}` cannot be sent in a header (control characters or non-ASCII)"
            ));
        }
        Ok(Self { name, value })
    }
}

struct Ctx {
    client: reqwest::Client,
    url: reqwest::Url,
    headers: Vec<Header>,
    session: Mutex<Option<String>>,
    version: Mutex<Option<String>>,
    list_changed: AtomicBool,
    max_bytes: usize,
    on_refused: wire::OnRefused,
}

/// A Streamable HTTP server.
pub struct HttpConn {
    server: String,
    ctx: Arc<Ctx>,
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    dead: Mutex<Option<String>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConn")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl HttpConn {
    /// A client for `url` (nothing is sent yet). `max_bytes`: the largest answer accepted.
    pub fn new(
        server: &str,
        url: &str,
        headers: Vec<Header>,
        timeout: Duration,
        max_bytes: usize,
        on_refused: wire::OnRefused,
    ) -> Result<Self, McpError> {
        let start = |reason: String| McpError::Start {
            server: server.to_string(),
            reason,
        };
        let url = reqwest::Url::parse(url).map_err(|e| start(format!("bad url: {e}")))?;
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .timeout(timeout)
            .user_agent(concat!("chitin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| start(format!("HTTP client: {e}")))?;
        let ctx = Arc::new(Ctx {
            client,
            url,
            headers,
            session: Mutex::new(None),
            version: Mutex::new(None),
            list_changed: AtomicBool::new(false),
            max_bytes,
            on_refused,
        });
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let worker_ctx = Arc::clone(&ctx);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| start(format!("cannot start the HTTP client's runtime: {e}")))?;
        std::thread::Builder::new()
            .name(format!("mcp-http-{server}"))
            .spawn(move || {
                rt.block_on(async move {
                    while let Some(job) = rx.recv().await {
                        let ctx = Arc::clone(&worker_ctx);
                        tokio::spawn(async move {
                            let r = post(&ctx, &job.msg, job.id).await;
                            let _ = job.reply.send(r);
                        });
                    }
                });
            })
            .map_err(|e| start(format!("cannot start the HTTP client's thread: {e}")))?;
        Ok(Self {
            server: server.to_string(),
            ctx,
            jobs: tx,
            dead: Mutex::new(None),
            next_id: AtomicU64::new(1),
        })
    }

    pub fn alive(&self) -> bool {
        self.dead.lock().map(|d| d.is_none()).unwrap_or(false)
    }

    pub fn take_list_changed(&self) -> bool {
        self.ctx.list_changed.swap(false, Ordering::SeqCst)
    }

    /// Records the negotiated protocol version (sent with every later request).
    pub fn set_version(&self, v: &str) {
        if let Ok(mut g) = self.ctx.version.lock() {
            *g = Some(v.to_string());
        }
    }

    fn die(&self, why: &str) {
        if let Ok(mut d) = self.dead.lock()
            && d.is_none()
        {
            *d = Some(why.to_string());
        }
    }

    pub fn stop(&self, why: &str) {
        self.die(why);
    }

    fn send(
        &self,
        msg: Value,
        id: Option<u64>,
        timeout: Duration,
        cancel: Option<&Cancel>,
    ) -> Result<Posted, McpError> {
        if let Some(why) = self.dead.lock().ok().and_then(|d| d.clone()) {
            return Err(McpError::Exited {
                server: self.server.clone(),
                reason: why,
            });
        }
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Job { msg, id, reply: tx })
            .map_err(|_| McpError::Exited {
                server: self.server.clone(),
                reason: "the HTTP client stopped".into(),
            })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(McpError::Timeout {
                    server: self.server.clone(),
                    secs: timeout.as_secs(),
                });
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(reason)) => {
                    self.die(&reason);
                    return Err(McpError::Exited {
                        server: self.server.clone(),
                        reason,
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if cancel.and_then(Cancel::reason).is_some() {
                        return Err(McpError::Cancelled {
                            server: self.server.clone(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(McpError::Exited {
                        server: self.server.clone(),
                        reason: "the HTTP client stopped".into(),
                    });
                }
            }
        }
    }

    pub fn notify(&self, method: &str, params: Value) -> Result<(), McpError> {
        self.send(
            wire::notification(method, params),
            None,
            Duration::from_secs(30),
            None,
        )
        .map(|_| ())
    }

    pub fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
        cancel: Option<&Cancel>,
    ) -> Result<Value, McpError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        match self.send(wire::request(id, method, params), Some(id), timeout, cancel)? {
            Posted::Answer(Ok(v)) => Ok(v),
            Posted::Answer(Err(message)) => Err(McpError::Server {
                server: self.server.clone(),
                message,
            }),
            Posted::Accepted => Err(McpError::Protocol {
                server: self.server.clone(),
                message: "the server accepted a request without answering it".into(),
            }),
        }
    }
}

/// Reads the body up to the cap.
async fn capped_body(resp: &mut reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("cannot read the server's answer: {}", e.without_url()))?
    {
        body.extend_from_slice(&chunk);
        if body.len() > cap {
            return Err(format!(
                "the server's answer is larger than {cap} bytes (max_result_kib)"
            ));
        }
    }
    Ok(body)
}

/// Handles one message of the server; the answer to `id` if it is one. A request of the
/// server (in a stream, before the answer it waits on) is answered with a POST of its own.
fn dispatch(ctx: &Arc<Ctx>, msg: &Value, id: Option<u64>) -> Option<Result<Value, String>> {
    match wire::classify(msg) {
        Some(wire::Incoming::Response { id: got, result }) if Some(got) == id => Some(result),
        Some(wire::Incoming::Request { id: rid, method }) => {
            let answer = wire::answer_server_request(&rid, &method);
            if wire::refused_server_request(&method).is_some() {
                (ctx.on_refused)(&method);
            }
            tokio::spawn(send_answer(Arc::clone(ctx), answer));
            None
        }
        Some(wire::Incoming::Notification { method })
            if method == "notifications/tools/list_changed" =>
        {
            ctx.list_changed.store(true, Ordering::SeqCst);
            None
        }
        _ => None,
    }
}

/// POSTs the answer to a server's request (a JSON-RPC response: the server accepts it with
/// 202); a failure is logged, the call that was waiting goes on.
async fn send_answer(ctx: Arc<Ctx>, answer: Value) {
    let resp = request_to(&ctx, &answer).send().await;
    match resp {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(
            status = r.status().as_u16(),
            "an MCP server refused Chitin's answer to its request"
        ),
        Err(e) => {
            tracing::warn!(error = %e.without_url(), "could not answer an MCP server's request")
        }
    }
}

/// A POST of `msg` to the server's URL with the configured headers, the session and the
/// protocol version.
fn request_to(ctx: &Ctx, msg: &Value) -> reqwest::RequestBuilder {
    let mut req = ctx
        .client
        .post(ctx.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(
            reqwest::header::ACCEPT,
            "application/json, text/event-stream",
        )
        .body(msg.to_string());
    for h in &ctx.headers {
        if let Ok(mut v) = reqwest::header::HeaderValue::from_str(&h.value) {
            v.set_sensitive(true);
            req = req.header(h.name.clone(), v);
        }
    }
    if let Some(s) = ctx.session.lock().ok().and_then(|s| s.clone()) {
        req = req.header("Mcp-Session-Id", s);
    }
    if let Some(v) = ctx.version.lock().ok().and_then(|s| s.clone()) {
        req = req.header("MCP-Protocol-Version", v);
    }
    req
}

async fn post(ctx: &Arc<Ctx>, msg: &Value, id: Option<u64>) -> Result<Posted, String> {
    let mut resp = request_to(ctx, msg)
        .send()
        .await
        .map_err(|e| format!("cannot reach the server: {}", e.without_url()))?;
    let status = resp.status();
    if msg.get("method").and_then(Value::as_str) == Some("initialize")
        && let Some(s) = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        && let Ok(mut g) = ctx.session.lock()
    {
        *g = Some(s.to_string());
    }
    if status == reqwest::StatusCode::NOT_FOUND
        && ctx.session.lock().map(|s| s.is_some()).unwrap_or(false)
    {
        return Err("the server ended the session (HTTP 404)".into());
    }
    if !status.is_success() {
        return Err(format!("the server answered HTTP {}", status.as_u16()));
    }
    if id.is_none() {
        return Ok(Posted::Accepted);
    }
    if status == reqwest::StatusCode::ACCEPTED {
        return Ok(Posted::Accepted);
    }
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let cap = ctx.max_bytes;
    if ctype.starts_with("text/event-stream") {
        let mut buf: Vec<u8> = Vec::new();
        let mut data = String::new();
        let mut total = 0usize;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("cannot read the server's stream: {}", e.without_url()))?
        {
            total += chunk.len();
            if total > cap {
                return Err(format!(
                    "the server's answer is larger than {cap} bytes (max_result_kib)"
                ));
            }
            buf.extend_from_slice(&chunk);
            while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    if !data.is_empty() {
                        if let Ok(v) = serde_json::from_str::<Value>(&data)
                            && let Some(r) = dispatch(ctx, &v, id)
                        {
                            return Ok(Posted::Answer(r));
                        }
                        data.clear();
                    }
                } else if let Some(d) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
        }
        if !data.is_empty()
            && let Ok(v) = serde_json::from_str::<Value>(&data)
            && let Some(r) = dispatch(ctx, &v, id)
        {
            return Ok(Posted::Answer(r));
        }
        return Err("the server's event stream ended without the answer".into());
    }
    let body = capped_body(&mut resp, cap).await?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("the server's answer is not JSON: {e}"))?;
    let messages = match v {
        Value::Array(items) => items,
        other => vec![other],
    };
    for m in &messages {
        if let Some(r) = dispatch(ctx, m, id) {
            return Ok(Posted::Answer(r));
        }
    }
    Err("the server's answer does not answer the request".into())
}
