//! The WebSocket control plane at `GET /ws` (issue #7): authentication by a first `connect`
//! frame, JSON request/response/event frames, and the forwarding of a [`ChatBackend`]'s
//! events to the connections of the user they belong to. The protocol is documented in
//! `docs/protocol.md` ("WebSocket protocol"); that text is the contract.
//!
//! Invariants:
//! - Before the upgrade, first of all: a present `Origin` that is not one of the gateway's own
//!   origins or `[gateway] allowed_origins` (or `Sec-Fetch-Site` saying another site) is
//!   refused (403 `origin_refused`) and counts as nothing. Then a credential in the query
//!   string is refused (401, counted as a failed authentication) and the connection cap is
//!   enforced (503). A request without `Origin` (not a browser) may upgrade; it still has to
//!   authenticate. Earlier failures never refuse a `connect` with the right token.
//! - Nothing but `connect` is served before authentication. A first frame that is not a
//!   `connect` with the right token (or none within `ws_connect_timeout_secs`) gets an error
//!   response, counts as a failed authentication of the client address, and the connection is
//!   closed (1008).
//! - After authentication a bad frame (malformed JSON, unknown method, bad params, too large,
//!   binary) gets an error response and the connection stays open. A message over 4× the
//!   limit is refused by the WebSocket codec itself and closes the connection.
//! - A connection receives only the events whose `user` is the user its token maps to;
//!   `seq` is assigned by the single writer, so it increases by one per event as the client
//!   receives them.
//! - Frame contents are never logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tracing::{Instrument, info};

use super::auth::{self, AuthFailure, LimitConfig, Limiter};
use super::backend::{BackendError, BackendEvent, ChatBackend, EventKind, NOT_CONFIGURED};
use super::metrics::Metrics;
use crate::config::gateway::GatewayConfig;

/// The protocol version reported by `connect`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Requests of one connection that may be waiting on the backend at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// Default and largest `agent.wait` timeout.
pub const DEFAULT_WAIT_MS: u64 = 30_000;
pub const MAX_WAIT_MS: u64 = 600_000;
/// Default and largest `chat.history` limit.
pub const DEFAULT_HISTORY: usize = 50;
pub const MAX_HISTORY: usize = 500;

/// The methods, as reported by `connect`.
pub const METHODS: [&str; 13] = [
    "connect",
    "agent",
    "agent.wait",
    "agent.cancel",
    "chat.send",
    "chat.history",
    "sessions.list",
    "approvals.list",
    "approvals.show",
    "approvals.resolve",
    "pairing.list",
    "pairing.resolve",
    "health",
];

/// Who a token belongs to, and the failed-authentication bookkeeping. The gateway implements
/// it over its own token and limiter (and audit log); tests use [`TokenAuth`].
pub trait WsAuth: Send + Sync {
    /// The user a presented token acts for (constant-time comparison), `None` if no user.
    fn user_for(&self, token: &[u8]) -> Option<String>;
    /// Records one failed authentication of `client` (limiter, metrics, log, audit);
    /// `Some(retry_after)` when the client is over its allowance of failed attempts (the
    /// refusal then says `rate_limited`).
    fn failed(&self, client: IpAddr, why: AuthFailure) -> Option<Duration>;
    /// The user of a browser session cookie on the upgrade request (a live session whose
    /// device, if any, is approved), so the page's `connect` needs no token. `None` by
    /// default.
    fn cookie_user(&self, _headers: &axum::http::HeaderMap) -> Option<String> {
        None
    }
}

/// A [`WsAuth`] over one token acting for one user, with its own limiter (for running the
/// WebSocket router on its own, e.g. in tests).
pub struct TokenAuth {
    token: zeroize::Zeroizing<Vec<u8>>,
    user: String,
    limits: LimitConfig,
    limiter: Mutex<Limiter>,
    failures: Mutex<Vec<(IpAddr, AuthFailure)>>,
}

impl TokenAuth {
    pub fn new(token: &[u8], user: &str, limits: LimitConfig) -> Self {
        Self {
            token: zeroize::Zeroizing::new(token.to_vec()),
            user: user.into(),
            limits,
            limiter: Mutex::new(Limiter::default()),
            failures: Mutex::new(Vec::new()),
        }
    }

    /// Every failure recorded so far.
    pub fn failures(&self) -> Vec<(IpAddr, AuthFailure)> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }
}

impl WsAuth for TokenAuth {
    fn user_for(&self, token: &[u8]) -> Option<String> {
        use subtle::ConstantTimeEq;
        (self.token.len() == token.len() && bool::from(self.token.as_slice().ct_eq(token)))
            .then(|| self.user.clone())
    }
    fn failed(&self, client: IpAddr, why: AuthFailure) -> Option<Duration> {
        if let Ok(mut f) = self.failures.lock() {
            f.push((client, why));
        }
        match self.limiter.lock() {
            Ok(mut l) => l.fail(client, why, Instant::now(), self.limits),
            Err(p) => p
                .into_inner()
                .fail(client, why, Instant::now(), self.limits),
        }
        .throttled
    }
}

/// The gateway's own [`WsAuth`]: its token (reloaded on SIGHUP) maps to the owner; failures
/// go through the same limiter, metrics and audit records as HTTP authentication.
pub(super) struct AppAuth(pub(super) Weak<super::App>);

impl WsAuth for AppAuth {
    fn user_for(&self, token: &[u8]) -> Option<String> {
        let app = self.0.upgrade()?;
        // The gateway token is the owner's; a per-user API token is its user's.
        if super::read(&app.token).matches(token) {
            return Some(app.owner.clone());
        }
        match app.accounts.verify_token(token) {
            Ok(found) => found.map(|(_, user)| user),
            Err(e) => {
                tracing::warn!(error = %e, "API token lookup failed");
                None
            }
        }
    }
    fn cookie_user(&self, headers: &axum::http::HeaderMap) -> Option<String> {
        let app = self.0.upgrade()?;
        let cookie = auth::cookie(headers, auth::SESSION_COOKIE)?;
        let idle = super::read(&app.config).auth.session_idle_secs;
        let idle_ms = i64::try_from(idle.saturating_mul(1000)).unwrap_or(i64::MAX);
        let s = app.accounts.session(cookie, idle_ms).ok()??;
        if let Some(d) = &s.device {
            let dev = app.accounts.device_by_id(d).ok()??;
            if dev.status != "approved" {
                return None;
            }
        }
        Some(s.user)
    }
    fn failed(&self, client: IpAddr, why: AuthFailure) -> Option<Duration> {
        let app = self.0.upgrade()?;
        super::record_failure(&app, client, why).throttled
    }
}

/// The WebSocket settings (from `[gateway]`; SIGHUP may replace them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsSettings {
    /// Largest message answered normally (bytes); up to 4× is answered `frame_too_large`.
    pub max_message: usize,
    pub connect_timeout: Duration,
    pub ping_interval: Duration,
    pub max_connections: usize,
    /// Extra allowed origins, normalized.
    pub allowed_origins: Vec<String>,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self::from_config(&GatewayConfig::default()).unwrap_or(Self {
            max_message: 256 * 1024,
            connect_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            max_connections: 256,
            allowed_origins: Vec::new(),
        })
    }
}

impl WsSettings {
    pub fn from_config(c: &GatewayConfig) -> Result<Self, String> {
        Ok(Self {
            max_message: c.ws_max_frame_kib.max(1).saturating_mul(1024),
            connect_timeout: Duration::from_secs(c.ws_connect_timeout_secs.max(1)),
            ping_interval: Duration::from_secs(c.ws_ping_interval_secs.max(1)),
            max_connections: c.ws_max_connections.max(1),
            allowed_origins: c.origins()?,
        })
    }
}

/// The WebSocket control plane: shared by every connection.
pub struct Ws {
    backend: Option<Arc<dyn ChatBackend>>,
    /// The channel engine, for `pairing.list` / `pairing.resolve` (none: no `[[channels]]`).
    pairing: Option<Arc<crate::channels::Engine>>,
    auth: Arc<dyn WsAuth>,
    metrics: Arc<Metrics>,
    settings: RwLock<WsSettings>,
    own_origins: RwLock<Vec<String>>,
    open: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Ws {
    pub fn new(
        backend: Option<Arc<dyn ChatBackend>>,
        auth: Arc<dyn WsAuth>,
        metrics: Arc<Metrics>,
        settings: WsSettings,
    ) -> Self {
        Self {
            backend,
            pairing: None,
            auth,
            metrics,
            settings: RwLock::new(settings),
            own_origins: RwLock::new(Vec::new()),
            open: Arc::new(AtomicUsize::new(0)),
            stop: watch::channel(false).0,
        }
    }

    /// The channel engine (pairing requests, channel state), if channels are configured.
    pub fn pairing_engine(&self) -> Option<&Arc<crate::channels::Engine>> {
        self.pairing.as_ref()
    }

    /// Serves `pairing.list` / `pairing.resolve` from the channel engine.
    #[must_use]
    pub fn with_pairing(mut self, engine: Option<Arc<crate::channels::Engine>>) -> Self {
        self.pairing = engine;
        self
    }

    /// Sets the gateway's own origins from the address it listens on (call after binding):
    /// `http(s)://127.0.0.1:P`, `http(s)://localhost:P`, `http(s)://[::1]:P` and the bound
    /// address itself when it is not unspecified.
    pub fn set_local_addr(&self, addr: SocketAddr) {
        let port = addr.port();
        let mut hosts = vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "[::1]".to_string(),
        ];
        let ip = addr.ip().to_canonical();
        if !ip.is_unspecified() {
            hosts.push(match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            });
        }
        let mut list = Vec::new();
        for h in hosts {
            for scheme in ["http", "https"] {
                let o = format!("{scheme}://{h}:{port}");
                if !list.contains(&o) {
                    list.push(o);
                }
            }
        }
        *self.own_origins.write().unwrap_or_else(|p| p.into_inner()) = list;
    }

    /// Replaces the settings (SIGHUP); open connections keep the ones they started with.
    pub fn set_settings(&self, s: WsSettings) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = s;
    }

    pub fn settings(&self) -> WsSettings {
        self.settings
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Whether a browser `Origin` may open the WebSocket.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let Some(o) = crate::config::gateway::normalize_origin(origin) else {
            return false;
        };
        let own = self
            .own_origins
            .read()
            .map(|l| l.contains(&o))
            .unwrap_or(false);
        own || self.settings().allowed_origins.contains(&o)
    }

    /// Whether a request comes from another site's page: a present `Origin` that is not
    /// allowed ([`Self::origin_allowed`]; several `Origin` headers count as foreign), or, without
    /// `Origin`, `Sec-Fetch-Site` other than `same-origin` or `none` (a browser's own
    /// navigation). Requests without either header are not from a browser page.
    pub fn foreign_request(&self, headers: &axum::http::HeaderMap) -> bool {
        let origins: Vec<&HeaderValue> = headers.get_all(header::ORIGIN).iter().collect();
        if !origins.is_empty() {
            return !(origins.len() == 1
                && origins[0].to_str().is_ok_and(|o| self.origin_allowed(o)));
        }
        headers
            .get_all("sec-fetch-site")
            .iter()
            .any(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"))
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Closes every connection (1001 "gateway shutting down"); new upgrades are refused.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    pub fn backend(&self) -> Option<&Arc<dyn ChatBackend>> {
        self.backend.as_ref()
    }

    /// Whether chats reach an agent.
    pub fn agent_configured(&self) -> bool {
        self.backend.as_ref().is_some_and(|b| b.agent_configured())
    }
}

/// The routes of the control plane and the web page: `GET /ws`, `GET /`, `GET /app.js`,
/// `GET /app.css`. Mount them on any router (`.merge(ws::routes(ws))`).
pub fn routes<S: Clone + Send + Sync + 'static>(ws: Arc<Ws>) -> Router<S> {
    Router::new()
        .route("/ws", get(upgrade))
        .merge(super::web::routes())
        .with_state(ws)
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// The client address: the gateway's front middleware's (trusted-proxy rule applied), else
/// the TCP peer.
fn client_of(req: &Request) -> IpAddr {
    if let Some(c) = req.extensions().get::<super::Client>() {
        return c.0;
    }
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip().to_canonical())
}

/// The refusal of a WebSocket upgrade from another site's page (403 `origin_refused`).
pub fn origin_refused() -> Response {
    error_response(
        StatusCode::FORBIDDEN,
        "origin_refused",
        "this page's origin may not open the gateway's WebSocket; open the web chat from the gateway's own address or add the origin to [gateway] allowed_origins",
    )
}

/// Decrements the open-connection count when the connection (or a failed upgrade) ends.
struct OpenGuard {
    open: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.metrics.ws_open(false);
    }
}

async fn upgrade(State(ws): State<Arc<Ws>>, req: Request) -> Response {
    let client = client_of(&req);
    // The origin first: another site's page is refused before anything is counted.
    if ws.foreign_request(req.headers()) {
        ws.metrics.ws_connection("refused_origin");
        return origin_refused();
    }
    if auth::query_has_token(req.uri().query()) {
        ws.metrics.ws_connection("auth_failed");
        if let Some(remaining) = ws.auth.failed(client, AuthFailure::QueryToken) {
            ws.metrics.auth_failure("rate_limited");
            let mut resp =
                error_response(StatusCode::TOO_MANY_REQUESTS, "rate_limited", RATE_LIMITED);
            if let Ok(v) = HeaderValue::from_str(&remaining.as_secs().max(1).to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            AuthFailure::QueryToken.message(),
        );
    }
    if *ws.stop.borrow() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the gateway is shutting down",
        );
    }
    // A browser session (cookie) authenticates the upgrade itself; the origin check above
    // keeps other sites' pages from riding on it.
    let pre = ws.auth.cookie_user(req.headers());
    let settings = ws.settings();
    let n = ws.open.fetch_add(1, Ordering::Relaxed);
    ws.metrics.ws_open(true);
    let guard = OpenGuard {
        open: Arc::clone(&ws.open),
        metrics: Arc::clone(&ws.metrics),
    };
    if n >= settings.max_connections {
        ws.metrics.ws_connection("refused_capacity");
        drop(guard);
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            "the gateway has as many WebSocket connections open as [gateway] ws_max_connections allows; close one or retry later",
        );
    }
    let (mut parts, _body) = req.into_parts();
    let up = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rejection) => return rejection.into_response(),
    };
    // The codec's own cap: beyond it a message is not even buffered and the connection ends.
    let hard = settings.max_message.saturating_mul(4).max(64 * 1024);
    up.max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| async move {
            ws.metrics.ws_connection("upgraded");
            connection(ws, socket, client, settings, pre).await;
            drop(guard);
        })
}

/// One frame to write, in the order the single writer sends them.
enum Out {
    Res(Value),
}

fn res_ok(id: &Value, payload: Value) -> Value {
    json!({"type": "res", "id": id, "ok": true, "payload": payload})
}

fn res_err(id: &Value, code: &str, message: &str) -> Value {
    json!({"type": "res", "id": id, "ok": false, "error": {"code": code, "message": message}})
}

/// A parsed request envelope.
struct Req {
    id: Value,
    method: String,
    params: Value,
}

/// Parses the envelope; on error returns the id (if any could be read), a code and a message.
fn parse_req(text: &str) -> Result<Req, (Value, &'static str, String)> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        (
            Value::Null,
            "invalid_frame",
            format!("the frame is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut m) = v else {
        return Err((
            Value::Null,
            "invalid_frame",
            "a frame must be a JSON object {\"type\":\"req\",\"id\",\"method\",\"params\"}".into(),
        ));
    };
    let id = m.remove("id").unwrap_or(Value::Null);
    let id_ok = match &id {
        Value::String(s) => !s.is_empty() && s.len() <= 128,
        Value::Number(_) => true,
        _ => false,
    };
    if !id_ok {
        return Err((
            Value::Null,
            "invalid_frame",
            "\"id\" must be a string of 1-128 characters or a number".into(),
        ));
    }
    if m.get("type").and_then(Value::as_str) != Some("req") {
        return Err((id, "invalid_frame", "\"type\" must be \"req\"".into()));
    }
    let Some(method) = m.get("method").and_then(Value::as_str).map(str::to_string) else {
        return Err((id, "invalid_frame", "\"method\" must be a string".into()));
    };
    let params = m.remove("params").unwrap_or(Value::Null);
    let params = match params {
        Value::Null => Value::Object(serde_json::Map::new()),
        p @ Value::Object(_) => p,
        _ => {
            return Err((id, "invalid_params", "\"params\" must be an object".into()));
        }
    };
    if let Some(k) = m.keys().find(|k| !matches!(k.as_str(), "type" | "method")) {
        return Err((
            id,
            "invalid_frame",
            format!("unknown field {k:?} in the frame"),
        ));
    }
    Ok(Req { id, method, params })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectParams {
    /// The gateway token or an API token; may be left out when the upgrade request carried a
    /// browser session cookie.
    #[serde(default)]
    token: Option<String>,
    /// Free-form client description (logged length-limited); optional.
    #[serde(default)]
    #[expect(dead_code, reason = "accepted for forward compatibility, not used")]
    client: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentParams {
    message: String,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatSendParams {
    text: String,
    #[serde(default)]
    session: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitParams {
    run_id: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelParams {
    run_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryParams {
    session: String,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowParams {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResolveParams {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    id: Option<String>,
    decision: Decision,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Decision {
    Approve,
    Deny,
}

fn params<T: serde::de::DeserializeOwned>(method: &str, p: Value) -> Result<T, String> {
    serde_json::from_value(p).map_err(|e| format!("bad params for {method}: {e}"))
}

fn check_session(s: Option<&str>) -> Result<(), String> {
    match s {
        Some(s) if !super::valid_session(s) => {
            Err("session must be 1-128 characters of letters, digits, `.`, `_`, `:` or `-`".into())
        }
        _ => Ok(()),
    }
}

fn check_id(name: &str, s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 128 || s.chars().any(char::is_control) {
        Err(format!("{name} must be 1-128 printable characters"))
    } else {
        Ok(())
    }
}

/// The first phase: wait for `connect`. `Some(user)` when authenticated; `None` when the
/// connection was refused and closed (or went away).
async fn authenticate(
    ws: &Ws,
    socket: &mut WebSocket,
    client: IpAddr,
    settings: &WsSettings,
    pre: Option<String>,
) -> Option<(Value, String)> {
    let deadline = tokio::time::Instant::now() + settings.connect_timeout;
    loop {
        let msg = tokio::select! {
            m = socket.recv() => m,
            () = tokio::time::sleep_until(deadline) => {
                refuse_failed(ws, socket, client, AuthFailure::Missing, &Value::Null, "unauthorized",
                    "no connect request with the token arrived in time; send {\"type\":\"req\",\"id\":1,\"method\":\"connect\",\"params\":{\"token\":\"...\"}} first").await;
                return None;
            }
        };
        let text = match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Binary(_))) => {
                ws.metrics.ws_frame("in");
                refuse_failed(
                    ws,
                    socket,
                    client,
                    AuthFailure::Missing,
                    &Value::Null,
                    "unauthorized",
                    "the first frame must be a JSON text connect request with the token",
                )
                .await;
                return None;
            }
            Some(Ok(Message::Text(t))) => t,
        };
        ws.metrics.ws_frame("in");
        if text.len() > settings.max_message {
            refuse_failed(
                ws,
                socket,
                client,
                AuthFailure::Malformed,
                &Value::Null,
                "frame_too_large",
                "the connect frame is larger than the frame limit",
            )
            .await;
            return None;
        }
        let req = match parse_req(text.as_str()) {
            Ok(r) => r,
            Err((id, _, msg)) => {
                refuse_failed(
                    ws,
                    socket,
                    client,
                    AuthFailure::Malformed,
                    &id,
                    "unauthorized",
                    &format!("the first frame must be a connect request: {msg}"),
                )
                .await;
                return None;
            }
        };
        if req.method != "connect" {
            refuse_failed(ws, socket, client, AuthFailure::Missing,
                &req.id,
                "unauthorized",
                "send the connect request with the gateway token first (`chitin token show` prints it)",
            ).await;
            return None;
        }
        let p: ConnectParams = match params("connect", req.params) {
            Ok(p) => p,
            Err(_) => {
                refuse_failed(ws, socket, client, AuthFailure::Missing,
                    &req.id,
                    "unauthorized",
                    "connect needs params {\"token\": \"<gateway token>\"} (`chitin token show` prints it)",
                ).await;
                return None;
            }
        };
        let token = match (p.token, pre) {
            (Some(t), _) => zeroize::Zeroizing::new(t),
            // The upgrade came with a live browser session: that is who connects.
            (None, Some(user)) => return Some((req.id, user)),
            (None, None) => {
                refuse_failed(ws, socket, client, AuthFailure::Missing,
                    &req.id,
                    "unauthorized",
                    "connect needs params {\"token\": \"<gateway token>\"} (`chitin token show` prints it)",
                ).await;
                return None;
            }
        };
        return match ws.auth.user_for(token.as_bytes()) {
            Some(user) => Some((req.id, user)),
            None => {
                refuse_failed(
                    ws,
                    socket,
                    client,
                    AuthFailure::Wrong,
                    &req.id,
                    "unauthorized",
                    AuthFailure::Wrong.message(),
                )
                .await;
                None
            }
        };
    }
}

/// The refusal of a failed attempt of a client over its allowance.
const RATE_LIMITED: &str = "too many failed authentications from this address; wait and retry (a connect with the right token is never refused)";

/// Records a failed authentication and refuses it: `rate_limited` when the client is over its
/// allowance, else `code` with `message`.
async fn refuse_failed(
    ws: &Ws,
    socket: &mut WebSocket,
    client: IpAddr,
    why: AuthFailure,
    id: &Value,
    code: &str,
    message: &str,
) {
    if ws.auth.failed(client, why).is_some() {
        ws.metrics.auth_failure("rate_limited");
        refuse(ws, socket, id, "rate_limited", RATE_LIMITED).await;
    } else {
        refuse(ws, socket, id, code, message).await;
    }
}

/// Sends an error response and closes with 1008 (policy violation).
async fn refuse(ws: &Ws, socket: &mut WebSocket, id: &Value, code: &str, message: &str) {
    ws.metrics.ws_connection("auth_failed");
    ws.metrics.ws_error(code);
    ws.metrics.ws_frame("out");
    let _ = socket
        .send(Message::Text(res_err(id, code, message).to_string().into()))
        .await;
    close(socket, 1008, "authentication failed").await;
}

/// The closing handshake: sends Close, then reads (discarding) until the client's Close, the
/// end of the stream or 2 s, so the client receives our frames before the TCP connection ends.
async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let sent = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })))
        .await;
    if sent.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Resolves when the gateway shuts down (never if the sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let down = rx.wait_for(|s| *s).await.is_ok();
    if !down {
        std::future::pending::<()>().await;
    }
}

async fn next_event(
    rx: &mut Option<broadcast::Receiver<BackendEvent>>,
) -> Result<BackendEvent, broadcast::error::RecvError> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

async fn connection(
    ws: Arc<Ws>,
    mut socket: WebSocket,
    client: IpAddr,
    settings: WsSettings,
    pre: Option<String>,
) {
    let mut stop = ws.stop.subscribe();
    let authed = tokio::select! {
        a = authenticate(&ws, &mut socket, client, &settings, pre) => a,
        () = stopped(&mut stop) => None,
    };
    let Some((connect_id, user)) = authed else {
        return;
    };
    ws.metrics.ws_connection("authenticated");
    info!(client = %client, user = %user, "WebSocket connected");
    let mut events = ws.backend.as_ref().map(|b| b.subscribe());
    let payload = json!({
        "user": user,
        "protocol": PROTOCOL_VERSION,
        "server": {"name": "chitin", "version": env!("CARGO_PKG_VERSION")},
        "agent": ws.agent_configured(),
        "limits": {
            "max_frame_bytes": settings.max_message,
            "ping_interval_ms": u64::try_from(settings.ping_interval.as_millis()).unwrap_or(u64::MAX),
            "max_in_flight": MAX_IN_FLIGHT,
        },
        "methods": METHODS,
        "events": EventKind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
    });
    let mut seq: u64 = 0;
    if send(&ws, &mut socket, res_ok(&connect_id, payload))
        .await
        .is_err()
    {
        return;
    }
    let (out_tx, mut out_rx) = mpsc::channel::<Out>(256);
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let closing = loop {
        tokio::select! {
            m = socket.recv() => {
                let msg = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        // The codec refused the message (over 4× the limit) or the stream broke.
                        // (tungstenite: "Space limit exceeded: Message too long: N > M")
                        let text = e.to_string().to_ascii_lowercase();
                        let too_big = text.contains("too long") || text.contains("limit exceeded");
                        if too_big {
                            ws.metrics.ws_error("frame_too_large");
                            break Some((1009, "message too big"));
                        }
                        break None;
                    }
                    None => break None,
                };
                last_heard = Instant::now();
                match msg {
                    Message::Text(t) => {
                        ws.metrics.ws_frame("in");
                        if let Some(reply) = handle_text(&ws, &user, &settings, t.as_str(), &out_tx, &in_flight)
                            && send(&ws, &mut socket, reply).await.is_err()
                        {
                            break None;
                        }
                    }
                    Message::Binary(_) => {
                        ws.metrics.ws_frame("in");
                        let reply = error(&ws, &Value::Null, "binary_not_supported",
                            "binary frames are not part of the protocol; send JSON text frames");
                        if send(&ws, &mut socket, reply).await.is_err() { break None; }
                    }
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => break None,
                }
            }
            Some(Out::Res(v)) = out_rx.recv() => {
                if send(&ws, &mut socket, v).await.is_err() { break None; }
            }
            ev = next_event(&mut events) => {
                let frame = match ev {
                    Ok(ev) if ev.user == user => {
                        seq += 1;
                        json!({"type": "event", "event": ev.event.as_str(), "payload": ev.payload, "seq": seq})
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        seq += 1;
                        json!({"type": "event", "event": "events.lagged", "payload": {"missed": n}, "seq": seq})
                    }
                    Err(broadcast::error::RecvError::Closed) => { events = None; continue; }
                };
                if send(&ws, &mut socket, frame).await.is_err() { break None; }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > settings.ping_interval.saturating_mul(3) {
                    break Some((1001, "no answer to pings"));
                }
                if socket.send(Message::Ping(axum::body::Bytes::from_static(b"chitin"))).await.is_err() {
                    break None;
                }
            }
            () = stopped(&mut stop) => break Some((1001, "gateway shutting down")),
        }
    };
    if let Some((code, reason)) = closing {
        close(&mut socket, code, reason).await;
    }
    info!(client = %client, user = %user, "WebSocket closed");
}

async fn send(ws: &Ws, socket: &mut WebSocket, frame: Value) -> Result<(), axum::Error> {
    ws.metrics.ws_frame("out");
    socket.send(Message::Text(frame.to_string().into())).await
}

fn error(ws: &Ws, id: &Value, code: &str, message: &str) -> Value {
    ws.metrics.ws_error(code);
    res_err(id, code, message)
}

fn backend_error(ws: &Ws, id: &Value, e: &BackendError) -> Value {
    error(ws, id, e.code(), &e.to_string())
}

/// Handles one text frame of an authenticated connection: an immediate reply, or `None` when
/// a task will answer through `out`.
fn handle_text(
    ws: &Arc<Ws>,
    user: &str,
    settings: &WsSettings,
    text: &str,
    out: &mpsc::Sender<Out>,
    in_flight: &Arc<Semaphore>,
) -> Option<Value> {
    if text.len() > settings.max_message {
        return Some(error(
            ws,
            &Value::Null,
            "frame_too_large",
            &format!(
                "the frame is {} bytes, over the limit of {} ([gateway] ws_max_frame_kib)",
                text.len(),
                settings.max_message
            ),
        ));
    }
    let req = match parse_req(text) {
        Ok(r) => r,
        Err((id, code, msg)) => return Some(error(ws, &id, code, &msg)),
    };
    let id = req.id.clone();
    let bad = |msg: String| Some(error(ws, &id, "invalid_params", &msg));
    match req.method.as_str() {
        "connect" => Some(error(
            ws,
            &id,
            "invalid_request",
            "this connection is already authenticated",
        )),
        "health" => {
            if let Err(e) = params::<Empty>("health", req.params) {
                return bad(e);
            }
            let backend = ws.backend.as_ref().map(|b| b.health());
            let agent = ws.agent_configured();
            Some(res_ok(
                &id,
                json!({
                    "ok": true,
                    "version": env!("CARGO_PKG_VERSION"),
                    "connections": ws.open_connections(),
                    "agent": agent,
                    "backend": backend,
                }),
            ))
        }
        "agent" | "chat.send" => {
            let (text, session) = if req.method == "agent" {
                match params::<AgentParams>("agent", req.params) {
                    Ok(p) => (p.message, p.session),
                    Err(e) => return bad(e),
                }
            } else {
                match params::<ChatSendParams>("chat.send", req.params) {
                    Ok(p) => (p.text, p.session),
                    Err(e) => return bad(e),
                }
            };
            if let Err(e) = check_session(session.as_deref()) {
                return bad(e);
            }
            if text.trim().is_empty() {
                return bad("the message is empty".into());
            }
            let Some(b) = ws.backend.as_ref() else {
                return Some(error(ws, &id, "not_configured", NOT_CONFIGURED));
            };
            // One trace per chat turn (the connection lives longer than any of them): the
            // agent's turn span is its child.
            let span = tracing::info_span!(
                parent: None,
                "ws.turn",
                otel.kind = "server",
                rpc.method = %req.method,
                chitin.user = %user,
                chitin.run_id = tracing::field::Empty,
            );
            let _in_turn = span.enter();
            Some(match b.start_run(user, session.as_deref(), &text) {
                Ok(r) => {
                    span.record("chitin.run_id", r.run_id.as_str());
                    res_ok(&id, json!({"run_id": r.run_id, "session": r.session}))
                }
                Err(e) => backend_error(ws, &id, &e),
            })
        }
        "agent.wait" | "agent.cancel" | "chat.history" | "sessions.list" | "approvals.list"
        | "approvals.show" | "approvals.resolve" => {
            let call = match prepare(&req.method, req.params) {
                Ok(c) => c,
                Err(e) => return bad(e),
            };
            let Some(b) = ws.backend.as_ref().map(Arc::clone) else {
                return Some(error(ws, &id, "not_configured", NOT_CONFIGURED));
            };
            let Ok(permit) = Arc::clone(in_flight).try_acquire_owned() else {
                return Some(error(
                    ws,
                    &id,
                    "busy",
                    &format!(
                        "{MAX_IN_FLIGHT} requests of this connection are still waiting; wait for their responses"
                    ),
                ));
            };
            let ws = Arc::clone(ws);
            let out = out.clone();
            let user = user.to_string();
            let span = tracing::info_span!(
                parent: None,
                "ws.request",
                otel.kind = "server",
                rpc.method = %req.method,
                chitin.user = %user,
            );
            tokio::spawn(
                async move {
                    let reply = match call.run(b.as_ref(), &user).await {
                        Ok(v) => res_ok(&id, v),
                        Err(e) => backend_error(&ws, &id, &e),
                    };
                    let _ = out.send(Out::Res(reply)).await;
                    drop(permit);
                }
                .instrument(span),
            );
            None
        }
        "pairing.list" | "pairing.resolve" => {
            let call = match prepare_pairing(&req.method, req.params) {
                Ok(c) => c,
                Err(e) => return bad(e),
            };
            let Some(engine) = ws.pairing.as_ref().map(Arc::clone) else {
                return Some(error(
                    ws,
                    &id,
                    "not_configured",
                    "no chat channel is configured ([[channels]] in chitin.toml), so there is nothing to pair",
                ));
            };
            let Ok(permit) = Arc::clone(in_flight).try_acquire_owned() else {
                return Some(error(
                    ws,
                    &id,
                    "busy",
                    &format!(
                        "{MAX_IN_FLIGHT} requests of this connection are still waiting; wait for their responses"
                    ),
                ));
            };
            let ws = Arc::clone(ws);
            let out = out.clone();
            let user = user.to_string();
            tokio::spawn(async move {
                let done = tokio::task::spawn_blocking(move || call.run(&engine, &user)).await;
                let reply = match done {
                    Ok(Ok(v)) => res_ok(&id, v),
                    Ok(Err(e)) => {
                        let code = match &e {
                            crate::channels::ChannelsError::PairingRefused { .. } => "forbidden",
                            crate::channels::ChannelsError::PairingNotFound(_) => "not_found",
                            crate::channels::ChannelsError::PairingNotPending { .. }
                            | crate::channels::ChannelsError::PairingExpired(_) => "conflict",
                            crate::channels::ChannelsError::UnknownUser(_) => "invalid_params",
                            _ => "internal",
                        };
                        error(&ws, &id, code, &e.to_string())
                    }
                    Err(_) => error(
                        &ws,
                        &id,
                        "internal",
                        "the pairing task failed; see the gateway log",
                    ),
                };
                let _ = out.send(Out::Res(reply)).await;
                drop(permit);
            });
            None
        }
        other => Some(error(
            ws,
            &id,
            "unknown_method",
            &format!(
                "unknown method {:?}; the methods are {}",
                other.chars().take(64).collect::<String>(),
                METHODS.join(", ")
            ),
        )),
    }
}

/// A validated pairing call, decided by the channel engine (Cedar `pairing.approve` for the
/// connection's user).
enum PairingCall {
    List,
    Approve { code: String, user: Option<String> },
    Deny(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PairingResolveParams {
    code: String,
    decision: String,
    #[serde(default)]
    user: Option<String>,
}

fn prepare_pairing(method: &str, p: Value) -> Result<PairingCall, String> {
    if method == "pairing.list" {
        params::<Empty>(method, p)?;
        return Ok(PairingCall::List);
    }
    let p: PairingResolveParams = params(method, p)?;
    let code = p.code.trim().to_string();
    if code.is_empty() || code.len() > 64 {
        return Err("pairing.resolve needs the pairing `code` the person received".into());
    }
    match (p.decision.as_str(), p.user) {
        ("approve", user) => Ok(PairingCall::Approve { code, user }),
        ("deny", None) => Ok(PairingCall::Deny(code)),
        ("deny", Some(_)) => Err("`user` is only for decision \"approve\"".into()),
        _ => Err("`decision` must be \"approve\" or \"deny\"".into()),
    }
}

impl PairingCall {
    fn run(
        self,
        engine: &crate::channels::Engine,
        user: &str,
    ) -> Result<Value, crate::channels::ChannelsError> {
        Ok(match self {
            Self::List => json!({"requests": engine.pairing_list_for(user)?}),
            Self::Approve { code, user: target } => {
                let target = target.unwrap_or_else(|| user.to_string());
                json!({"request": engine.pairing_approve(&code, user, &target)?})
            }
            Self::Deny(code) => json!({"request": engine.pairing_deny(&code, user)?}),
        })
    }
}

/// A validated call to the backend.
enum Call {
    Wait(String, Duration),
    Cancel(String),
    History(String, usize),
    Sessions,
    Approvals,
    Show(crate::approvals::ApprovalRef),
    Resolve(crate::approvals::ApprovalRef, bool),
}

fn prepare(method: &str, p: Value) -> Result<Call, String> {
    Ok(match method {
        "agent.wait" => {
            let p: WaitParams = params(method, p)?;
            check_id("run_id", &p.run_id)?;
            let ms = p.timeout_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS);
            Call::Wait(p.run_id, Duration::from_millis(ms))
        }
        "agent.cancel" => {
            let p: CancelParams = params(method, p)?;
            check_id("run_id", &p.run_id)?;
            Call::Cancel(p.run_id)
        }
        "chat.history" => {
            let p: HistoryParams = params(method, p)?;
            check_session(Some(&p.session))?;
            let limit = p.limit.unwrap_or(DEFAULT_HISTORY);
            if limit == 0 || limit > MAX_HISTORY {
                return Err(format!("limit must be between 1 and {MAX_HISTORY}"));
            }
            Call::History(p.session, limit)
        }
        "sessions.list" => {
            params::<Empty>(method, p)?;
            Call::Sessions
        }
        "approvals.list" => {
            params::<Empty>(method, p)?;
            Call::Approvals
        }
        "approvals.show" => {
            let p: ShowParams = params(method, p)?;
            Call::Show(approval_ref(method, p.code, p.id)?)
        }
        _ => {
            let p: ResolveParams = params(method, p)?;
            let key = approval_ref(method, p.code, p.id)?;
            Call::Resolve(key, matches!(p.decision, Decision::Approve))
        }
    })
}

/// Exactly one of `code` and `id`; an id names exactly that approval (never another with the
/// same code).
fn approval_ref(
    method: &str,
    code: Option<String>,
    id: Option<String>,
) -> Result<crate::approvals::ApprovalRef, String> {
    let key = match (code, id) {
        (Some(c), None) => crate::approvals::ApprovalRef::Code(c.trim().to_ascii_uppercase()),
        (None, Some(i)) => crate::approvals::ApprovalRef::Id(i),
        _ => return Err(format!("{method} needs exactly one of code or id")),
    };
    check_id("code/id", key.as_str())?;
    Ok(key)
}

impl Call {
    async fn run(self, b: &dyn ChatBackend, user: &str) -> Result<Value, BackendError> {
        match self {
            Self::Wait(run_id, timeout) => {
                // The backend bounds the wait; this bounds a backend that does not.
                let slack = timeout.saturating_add(Duration::from_secs(5));
                tokio::time::timeout(slack, b.wait_run(user, &run_id, timeout))
                    .await
                    .unwrap_or(Err(BackendError::Timeout(timeout)))
            }
            Self::Cancel(run_id) => b.cancel_run(user, &run_id).await,
            Self::History(session, limit) => b.history(user, &session, limit).await,
            Self::Sessions => b.sessions(user).await,
            Self::Approvals => b.approvals(user).await,
            Self::Show(key) => b.approval(user, &key).await,
            Self::Resolve(key, grant) => b.resolve_approval(user, &key, grant).await,
        }
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

    fn ws() -> Ws {
        let auth = Arc::new(TokenAuth::new(
            b"t",
            "owner",
            LimitConfig {
                max_failures: 3,
                window: Duration::from_secs(60),
                lockout: Duration::from_secs(60),
            },
        ));
        Ws::new(
            None,
            auth,
            Arc::new(Metrics::default()),
            WsSettings {
                allowed_origins: vec!["https://chat.example.com".into()],
                ..WsSettings::default()
            },
        )
    }

    #[test]
    fn only_the_gateways_own_origins_and_configured_ones_are_allowed() {
        let ws = ws();
        ws.set_local_addr("127.0.0.1:18789".parse().unwrap());
        for ok in [
            "http://127.0.0.1:18789",
            "https://127.0.0.1:18789",
            "http://localhost:18789",
            "HTTP://LOCALHOST:18789/",
            "http://[::1]:18789",
            "https://chat.example.com",
        ] {
            assert!(ws.origin_allowed(ok), "{ok}");
        }
        for bad in [
            "http://127.0.0.1:18790",
            "http://evil.example",
            "http://localhost.evil.example:18789",
            "null",
            "file://",
            "http://127.0.0.1",
            "https://chat.example.com.evil",
        ] {
            assert!(!ws.origin_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn a_non_loopback_bind_address_is_one_of_the_own_origins() {
        let ws = ws();
        ws.set_local_addr("192.168.1.5:443".parse().unwrap());
        assert!(ws.origin_allowed("https://192.168.1.5:443"));
        ws.set_local_addr("0.0.0.0:443".parse().unwrap());
        assert!(!ws.origin_allowed("https://0.0.0.0:443"));
    }

    #[test]
    fn envelopes_are_parsed_strictly_and_keep_the_id_for_the_error() {
        let r = parse_req(r#"{"type":"req","id":"a","method":"health"}"#)
            .ok()
            .unwrap();
        assert_eq!(r.method, "health");
        assert_eq!(r.params, json!({}));
        let (id, code, _) = parse_req("{nope").err().unwrap();
        assert_eq!((id, code), (Value::Null, "invalid_frame"));
        let (id, code, _) = parse_req(r#"{"type":"req","id":7,"method":"x","params":[1]}"#)
            .err()
            .unwrap();
        assert_eq!((id, code), (json!(7), "invalid_params"));
        let (id, code, _) = parse_req(r#"{"type":"res","id":7,"method":"x"}"#)
            .err()
            .unwrap();
        assert_eq!((id, code), (json!(7), "invalid_frame"));
        let (_, code, _) = parse_req(r#"{"type":"req","id":{"a":1},"method":"x"}"#)
            .err()
            .unwrap();
        assert_eq!(code, "invalid_frame");
        let (_, code, msg) = parse_req(r#"{"type":"req","id":1,"method":"x","extra":1}"#)
            .err()
            .unwrap();
        assert_eq!(code, "invalid_frame");
        assert!(msg.contains("extra"));
    }

    #[test]
    fn resolve_needs_exactly_one_of_code_and_id_and_a_known_decision() {
        assert!(
            prepare(
                "approvals.resolve",
                json!({"code": "ABC", "decision": "approve"})
            )
            .is_ok()
        );
        assert!(prepare("approvals.resolve", json!({"id": "x", "decision": "deny"})).is_ok());
        for bad in [
            json!({"decision": "approve"}),
            json!({"code": "A", "id": "B", "decision": "approve"}),
            json!({"code": "A", "decision": "yes"}),
            json!({"code": "A"}),
            json!({"code": "", "decision": "deny"}),
        ] {
            assert!(prepare("approvals.resolve", bad.clone()).is_err(), "{bad}");
        }
        // An id is an id, a code a code: never taken for one another.
        match prepare(
            "approvals.resolve",
            json!({"id": "ABC123", "decision": "deny"}),
        ) {
            Ok(Call::Resolve(crate::approvals::ApprovalRef::Id(i), false)) => {
                assert_eq!(i, "ABC123")
            }
            _ => panic!("an id param is resolved as an id"),
        }
        assert!(matches!(
            prepare("approvals.show", json!({"code": "abc123"})),
            Ok(Call::Show(crate::approvals::ApprovalRef::Code(c))) if c == "ABC123"
        ));
        assert!(prepare("approvals.show", json!({})).is_err());
        assert!(prepare("approvals.show", json!({"id": "a", "decision": "deny"})).is_err());
    }

    #[test]
    fn wait_timeouts_are_capped_and_history_limits_checked() {
        match prepare("agent.wait", json!({"run_id": "r", "timeout_ms": u64::MAX}))
            .ok()
            .unwrap()
        {
            Call::Wait(_, d) => assert_eq!(d, Duration::from_millis(MAX_WAIT_MS)),
            _ => panic!("not a wait"),
        }
        assert!(prepare("chat.history", json!({"session": "s", "limit": 0})).is_err());
        assert!(prepare("chat.history", json!({"session": "s/../x"})).is_err());
        assert!(prepare("sessions.list", json!({"x": 1})).is_err());
    }
}
