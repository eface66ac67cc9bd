//! The gateway server: one process, one tokio runtime, an axum router (issue #7, foundation).
//!
//! Invariants:
//! - Every route except `/health` and `/ready` needs `Authorization: Bearer <gateway token>`;
//!   the token maps to one principal, the configured owner (`Chitin::User::"<owner>"`).
//! - A token in the URL query is refused (401) on every route, even next to a valid header,
//!   and the attempt is logged and audited without the value.
//! - A request with the valid token is never refused because of failures (its own client's
//!   or anyone else's). Failed authentications are limited per client (IPv4 address, IPv6
//!   /64): over the allowance, failed attempts get 429. Requests from other sites' pages
//!   (foreign `Origin`, `Sec-Fetch-Site` not same-origin, CORS preflights) are refused with
//!   403 first and never count. Failures are audited once per client and window plus a summary.
//! - A client has `[gateway] header_timeout_secs` to send a request head (slowloris).
//! - `/tools/invoke` goes through `tools::invoke` (strict parsing, the gate, the sandbox, the
//!   audit log) on a blocking thread; approvals are redeemed only for the exact request digest.
//! - Log lines are passed through the secrets redactor; request bodies and query strings are
//!   never logged.

pub mod agent_backend;
pub mod api;
pub mod auth;
pub mod backend;
pub mod channels;
pub mod logging;
pub mod login;
pub mod metrics;
mod openai;
pub mod tls;
pub mod web;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chitin_audit::{AuditLog, Kind, RecordInput};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{Instrument, error, info, warn};

use crate::approvals::{ApprovalError, Approvals};
use crate::config::Globals;
use crate::gate::{CallContext, Gate, GateError, Origin};
use crate::secrets::gateway_token::{self, GatewayToken};
use crate::store::Store;
use crate::tools::Sandbox;
use crate::tools::invoke::{InvokeError, Invoked};
use auth::{AuthFailure, LimitConfig, Limiter};
use logging::SharedRedactor;
use metrics::Metrics;

/// Errors starting or running the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "refusing to listen on {addr}: it is not a loopback address and no TLS is configured, so the token and every tool call would cross the network in clear text; bind 127.0.0.1 (or ::1) and put a TLS-terminating reverse proxy in front (list it in [gateway] trusted_proxies), or set [gateway] tls_cert and tls_key"
    )]
    ExposedWithoutTls { addr: SocketAddr },
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}; pick another address with --bind")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid [gateway] settings: {0}")]
    Config(String),
    #[error("workspace {path}: {reason}")]
    Workspace { path: PathBuf, reason: String },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error("audit log could not be closed with a final checkpoint: {0}")]
    AuditShutdown(String),
}

/// Everything the server runs on, opened by `chitin gateway`.
pub struct Parts {
    pub globals: Globals,
    pub config: crate::config::Config,
    pub gate: Gate,
    pub store: Arc<Store>,
    pub clock: Arc<dyn crate::clock::Clock>,
    pub token: GatewayToken,
    pub secrets_path: PathBuf,
    pub secrets_count: usize,
    pub redactor: SharedRedactor,
    pub sandbox: Sandbox,
    /// `chitin_sandbox::check()` at start: enforced, and what is missing.
    pub sandbox_check: (bool, String),
    pub workspace: PathBuf,
    pub bind: SocketAddr,
    /// HTTPS when set (`[gateway] tls_cert` + `tls_key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub metrics: Arc<Metrics>,
    /// The agent behind the WebSocket chat methods (none: chat answers `not_configured`;
    /// approvals still work through `backend::NoAgent`).
    pub backend: Option<Arc<dyn backend::ChatBackend>>,
    /// The agent loop (`/v1/chat/completions`, and the WebSocket backend when `backend` is
    /// `None`).
    pub agent: Option<crate::agent::Agent>,
    /// The unlocked store the agent releases provider keys and tool secrets from (reopened
    /// and replaced on SIGHUP).
    pub shared_secrets: Option<crate::secrets::SharedSecretStore>,
    /// Retention and scheduled backups, run once a minute when due.
    pub lifecycle: Option<crate::lifecycle::Lifecycle>,
    /// The chat channels (`[[channels]]`); none configured: nothing of them runs.
    pub channels: Option<channels::ChannelsRuntime>,
    /// Cron jobs, webhooks (`POST /hooks/<name>`) and the heartbeat.
    pub automation: Option<crate::automation::Automation>,
    /// The workflow runner (its background loop continues approved and interrupted runs).
    pub workflows: Option<crate::workflow_runner::Runner>,
    /// Applies a reloaded config to the agent (model router, `[agent]`, `[budgets]`); built
    /// by the command line, which knows how to assemble a router.
    pub reconfigure_agent: Option<ReconfigureAgent>,
}

/// See [`Parts::reconfigure_agent`]: an error keeps the agent's previous settings.
pub type ReconfigureAgent = Arc<dyn Fn(&crate::config::Config) -> Result<(), String> + Send + Sync>;

/// `meta` key in `state.db`: the URL the running gateway listens on (`chitin status`).
pub const LISTENING_META: &str = "gateway.listening";

/// Settings that SIGHUP may change without a restart.
#[derive(Debug, Clone)]
struct Settings {
    limits: LimitConfig,
    proxies: Vec<IpAddr>,
    max_body: usize,
    /// How long a client may take to send a request head (new connections).
    header_timeout: Duration,
}

impl Settings {
    fn of(c: &crate::config::gateway::GatewayConfig) -> Result<Self, String> {
        Ok(Self {
            limits: LimitConfig {
                max_failures: c.auth_max_failures.max(1),
                window: Duration::from_secs(c.auth_window_secs.max(1)),
                lockout: Duration::from_secs(c.auth_lockout_secs),
            },
            proxies: c.proxies()?,
            max_body: c.max_body_kib.saturating_mul(1024).max(1024),
            header_timeout: Duration::from_secs(c.header_timeout_secs.max(1)),
        })
    }
}

struct App {
    agent: Option<crate::agent::Agent>,
    /// This gateway's registration among the replicas on the store (issue #18).
    replica: Option<Arc<crate::cluster::Replica>>,
    reconfigure_agent: Option<ReconfigureAgent>,
    /// Why the last config reload failed (the file did not parse or validate), shown by
    /// `/ready` until a reload succeeds: the gateway never keeps an old config silently.
    config_error: RwLock<Option<String>>,
    channel_metrics: Option<channels::ChannelMetrics>,
    /// `GET|POST /channels/<name>/<route>` (no gateway token: the platform's secret or signature instead).
    channel_webhooks: Option<Arc<channels::Webhooks>>,
    /// `POST /hooks/<name>` (no gateway token: the hook's signature instead).
    hooks: Option<Arc<crate::automation::hooks::Hooks>>,
    shared_secrets: Option<crate::secrets::SharedSecretStore>,
    clock: Arc<dyn crate::clock::Clock>,
    gate: Gate,
    store: Arc<Store>,
    approvals: Approvals,
    sandbox: Sandbox,
    workspace: PathBuf,
    owner: String,
    token: RwLock<Arc<GatewayToken>>,
    secrets: RwLock<(bool, String)>,
    secrets_path: PathBuf,
    redactor: SharedRedactor,
    settings: RwLock<Settings>,
    config: RwLock<crate::config::Config>,
    limiter: Mutex<Limiter>,
    /// On PostgreSQL: the failed-authentication counts of every gateway of the deployment.
    shared_failures: Option<auth::SharedFailures>,
    metrics: Arc<Metrics>,
    sandbox_check: (bool, String),
    globals: Globals,
    audit_head_at_start: i64,
    /// When the gateway started (unix ms).
    started_ms: i64,
    /// Installed skills, re-verified against the lockfile (audited) at start and on SIGHUP;
    /// `/ready` reports the last result. (Each use re-verifies again: `SkillsHost::load`.)
    skills: Option<crate::skills_host::SkillsHost>,
    skills_status: RwLock<(bool, String)>,
    /// Why the last reload was refused as a whole (a trust path overlapping a writable area),
    /// shown by `/ready` until a reload succeeds.
    reload_refused: RwLock<Option<String>>,
    /// The WebSocket control plane (`/ws`) and the chat backend slot.
    ws: Arc<ws::Ws>,
    /// Operator accounts: managed users, API tokens, browser sessions, devices.
    accounts: crate::accounts::Accounts,
    /// Single sign-on (`[auth.oidc]`), when configured.
    oidc: Option<Arc<crate::accounts::oidc::Oidc>>,
    /// A trusted identity proxy (`[auth.proxy]`), when configured.
    proxy_auth: Option<Arc<crate::accounts::jwt::ProxyAuth>>,
    /// Whether the gateway serves TLS itself (cookies get `Secure`).
    tls_on: bool,
}

/// Re-verifies every installed skill (each verification is audited) and summarizes it for
/// `/ready`: not ready while any installed skill fails.
fn verify_skills(skills: Option<&crate::skills_host::SkillsHost>, gate: &Gate) -> (bool, String) {
    let Some(host) = skills else {
        return (false, "the skills store could not be opened".into());
    };
    match host.verify_installed(gate, "gateway", None) {
        Ok(list) => {
            let bad: Vec<String> = list
                .iter()
                .filter_map(|s| s.error.as_ref().map(|e| format!("{}: {e}", s.name)))
                .collect();
            if bad.is_empty() {
                (true, format!("{} installed skills verified", list.len()))
            } else {
                error!(failed = %bad.join("; "), "installed skills failed verification");
                (false, format!("refused: {}", bad.join("; ")))
            }
        }
        Err(e) => (false, format!("verification failed: {e}")),
    }
}

/// The TCP peer of a connection, plain or TLS.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

/// The client address of a request (after the trusted-proxy rule).
#[derive(Debug, Clone, Copy)]
struct Client(IpAddr);

fn read<T: Clone>(l: &RwLock<T>) -> T {
    match l.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn write<T>(l: &RwLock<T>, v: T) {
    match l.write() {
        Ok(mut g) => *g = v,
        Err(p) => *p.into_inner() = v,
    }
}

fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

fn audit_head(audit: &AuditLog) -> i64 {
    audit
        .reader()
        .ok()
        .and_then(|r| r.head().ok().flatten())
        .map_or(0, |(seq, _)| seq)
}

/// How long a thread of the blocking pool waits for work before it exits (tokio's default is
/// 10 s). A burst of concurrent turns starts a thread per turn waiting on the pool; the
/// gateway's periodic work (the file watch, the scheduler's tick) wakes the idle threads in
/// turn, which restarts each one's wait: at 10 s, none of a burst's threads ever timed out
/// (measured: 29 threads 5 and 15 s after a 20-client load, against 7 idle). At 2 s they exit
/// after the burst, down to what the periodic work keeps alive (7 threads 5 s after the same
/// load); starting one again costs tens of microseconds.
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Runs the gateway until SIGTERM/SIGINT; returns after the final audit checkpoint.
pub fn run(parts: Parts) -> Result<(), GatewayError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("chitin-gateway")
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .build()
        .map_err(GatewayError::Runtime)?;
    let result = rt.block_on(serve(parts));
    // Blocking tool runs still going past the grace period are abandoned (their audit writes
    // fail closed once the log is shut down).
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/tools/invoke", post(invoke_handler))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{id}", get(openai::model))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            require_auth,
        ));
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready_handler))
        .route(
            "/channels/{name}/{route}",
            get(channel_webhook).post(channel_webhook),
        )
        .route("/hooks/{name}", post(hook_webhook))
        .merge(protected)
        .merge(login::routes())
        .merge(api::routes(&app))
        .merge(ws::routes(Arc::clone(&app.ws)))
        .fallback(|| async { error_body(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(middleware::from_fn_with_state(Arc::clone(&app), front))
        .with_state(app)
}

async fn serve(parts: Parts) -> Result<(), GatewayError> {
    let settings = Settings::of(&parts.config.gateway).map_err(GatewayError::Config)?;
    let approvals = Approvals::new(
        Arc::clone(&parts.store),
        parts.gate.clone(),
        Arc::clone(&parts.clock),
        crate::approvals::DEFAULT_TTL_MS,
    );
    let audit = Arc::clone(parts.gate.audit());
    // The PostgreSQL reader is synchronous (its own runtime): never on an async thread.
    let head = tokio::task::block_in_place(|| audit_head(&audit));
    let grace = Duration::from_secs(parts.config.gateway.shutdown_grace_secs);
    let tls = parts.tls.clone();
    let skills =
        match crate::skills_host::SkillsHost::open(&parts.globals.home, &parts.config.skills) {
            Ok(h) => Some(h),
            Err(e) => {
                error!(error = %e, "skills store unavailable");
                None
            }
        };
    let skills_status = verify_skills(skills.as_ref(), &parts.gate);
    let ws_settings =
        ws::WsSettings::from_config(&parts.config.gateway).map_err(GatewayError::Config)?;
    // The agent when there is one; without it, approvals still work over the WebSocket (chat
    // answers what to configure).
    let backend = parts
        .backend
        .or_else(|| {
            parts.agent.clone().map(|a| {
                Arc::new(agent_backend::AgentBackend::new(a, approvals.clone()))
                    as Arc<dyn backend::ChatBackend>
            })
        })
        .unwrap_or_else(|| {
            Arc::new(backend::NoAgent::new(approvals.clone())) as Arc<dyn backend::ChatBackend>
        });
    let (backend, metrics) = (Some(backend), Arc::clone(&parts.metrics));
    if let Some(lc) = parts.lifecycle {
        let offsite = parts
            .shared_secrets
            .clone()
            .map(|secrets| (parts.gate.clone(), secrets));
        tokio::spawn(lifecycle_schedule(lc, parts.globals.clone(), offsite));
    }
    let lease_ms = parts.config.store.lease_ms;
    let replica =
        match crate::cluster::Replica::join(parts.store.db().clone(), Arc::clone(&parts.clock)) {
            Ok(r) => {
                info!(replica = r.id(), "registered as a replica");
                if let Some(agent) = &parts.agent {
                    // Before resuming runs: their leases are this replica's.
                    agent.set_replica(r.id(), lease_ms);
                }
                // Before their recovery: the firings, deliveries and workflow runs this
                // gateway handles carry its id, so other replicas leave them while it beats.
                if let Some(auto) = &parts.automation {
                    auto.set_replica(r.id());
                }
                if let Some(w) = &parts.workflows {
                    w.set_replica(r.id());
                }
                Some(r)
            }
            Err(e) => {
                error!(error = %e, "could not register this gateway as a replica");
                None
            }
        };
    let shared_store = parts.store.db().dialect() == crate::store::Dialect::Postgres;
    if shared_store && let Some(agent) = &parts.agent {
        // Several gateways on one database: run events reach the other replicas' clients.
        if let Err(e) = agent.start_relay() {
            error!(error = %e, "run events of other replicas will not be shown here");
        }
    }
    if parts.agent.is_none() && !shared_store {
        // One gateway per SQLite database (the gateway lock): the leases of the process
        // before this one (its channels') are void. With an agent, its recovery does this.
        let db = parts.store.db().clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || db.leases_clear()).await {
            warn!(error = %e, "the leases of the previous gateway could not be voided; its channels are taken over when they expire");
        }
    }
    if let Some(agent) = &parts.agent {
        match agent.recover().await {
            Ok(0) => {}
            Ok(n) => info!(runs = n, "resumed runs left unfinished by the last gateway"),
            Err(e) => error!(error = %e, "could not resume unfinished runs"),
        }
    }
    if let (Some(auto), Some(agent)) = (&parts.automation, &parts.agent) {
        auto.set_agent(agent.clone());
    }
    let accounts = crate::accounts::Accounts::new(
        Arc::clone(&parts.store),
        parts.gate.clone(),
        Arc::clone(&parts.clock),
    );
    if let Err(e) = accounts.sync() {
        error!(error = %e, "managed users could not be installed; only the entity files apply");
    }
    let oidc = if parts.config.auth.oidc.enabled() {
        Some(Arc::new(
            crate::accounts::oidc::Oidc::new(
                parts.config.auth.oidc.clone(),
                accounts.clone(),
                parts.shared_secrets.clone(),
            )
            .map_err(|e| GatewayError::Config(e.to_string()))?,
        ))
    } else {
        None
    };
    let proxy_auth = if parts.config.auth.proxy.enabled() {
        Some(Arc::new(
            crate::accounts::jwt::ProxyAuth::new(parts.config.auth.proxy.clone())
                .map_err(|e| GatewayError::Config(e.to_string()))?,
        ))
    } else {
        None
    };
    let channel_agent = parts.agent.clone();
    let channel_metrics = parts
        .channels
        .as_ref()
        .map(channels::ChannelsRuntime::metrics);
    let channel_webhooks = parts
        .channels
        .as_ref()
        .map(channels::ChannelsRuntime::webhooks);
    let shared_failures = (parts.store.db().dialect() == crate::store::Dialect::Postgres)
        .then(|| auth::SharedFailures::new(parts.store.db().clone()));
    let app = Arc::new_cyclic(|me| App {
        agent: parts.agent,
        replica,
        reconfigure_agent: parts.reconfigure_agent,
        config_error: RwLock::new(None),
        channel_metrics,
        channel_webhooks,
        hooks: parts
            .automation
            .as_ref()
            .map(crate::automation::Automation::hooks),
        shared_secrets: parts.shared_secrets,
        clock: Arc::clone(&parts.clock),
        gate: parts.gate,
        store: parts.store,
        approvals,
        sandbox: parts.sandbox,
        workspace: parts.workspace,
        owner: parts.config.gateway.owner.clone(),
        token: RwLock::new(Arc::new(parts.token)),
        secrets: RwLock::new((true, format!("unlocked ({} secrets)", parts.secrets_count))),
        secrets_path: parts.secrets_path,
        redactor: parts.redactor,
        settings: RwLock::new(settings),
        config: RwLock::new(parts.config),
        limiter: Mutex::new(Limiter::default()),
        shared_failures,
        metrics: parts.metrics,
        sandbox_check: parts.sandbox_check,
        globals: parts.globals,
        audit_head_at_start: head,
        started_ms: parts.clock.now_ms(),
        skills,
        skills_status: RwLock::new(skills_status),
        reload_refused: RwLock::new(None),
        accounts,
        oidc,
        proxy_auth,
        tls_on: tls.is_some(),
        ws: Arc::new(
            ws::Ws::new(
                backend,
                Arc::new(ws::AppAuth(me.clone())),
                metrics,
                ws_settings,
            )
            .with_pairing(
                parts
                    .channels
                    .as_ref()
                    .map(channels::ChannelsRuntime::engine),
            ),
        ),
    });

    let listener = tokio::net::TcpListener::bind(parts.bind)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: parts.bind,
            source,
        })?;
    let local = listener.local_addr().map_err(GatewayError::Serve)?;
    app.ws.set_local_addr(local);
    let record = RecordInput::new(Kind::System, "gateway", "gateway.start", "gateway")
        .with_payload(json!({"bind": local.to_string(), "owner": app.owner}));
    let _ = tokio::task::spawn_blocking({
        let audit = Arc::clone(&audit);
        move || audit.append(record)
    })
    .await;
    let scheme = if tls.is_some() { "https" } else { "http" };
    // Where this gateway listens, for `chitin status` (a --bind/--port may differ from the config).
    if let Err(e) = app
        .store
        .set_meta(LISTENING_META, &format!("{scheme}://{local}"))
    {
        warn!(error = %e, "cannot record the listening address for `chitin status`");
    }
    let ws_scheme = if tls.is_some() { "wss" } else { "ws" };
    println!("chitin gateway listening on {scheme}://{local}");
    println!("  web chat:  {scheme}://{local}/ (paste the token)");
    println!(
        "  OpenAI:    POST {scheme}://{local}/v1/chat/completions  GET {scheme}://{local}/v1/models"
    );
    println!("  WebSocket: {ws_scheme}://{local}/ws");
    println!("  send `Authorization: Bearer <token>` (`chitin token show` prints the token)");
    println!("  health: {scheme}://{local}/health  readiness: {scheme}://{local}/ready");
    info!(bind = %local, tls = tls.is_some(), workspace = %app.workspace.display(), "gateway listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(signals(Arc::clone(&app), stop_tx));
    if let Some(runner) = parts.workflows {
        tokio::spawn(runner.background(stop_rx.clone()));
    }
    if let Some(ch) = parts.channels {
        // Each polling or socket channel is served by the replica holding its lease.
        let leases = app.replica.as_ref().map(|r| channels::ChannelLeases {
            db: r.db().clone(),
            owner: r.id().to_string(),
            ttl_ms: lease_ms,
            clock: Arc::new(crate::clock::SystemClock),
        });
        ch.spawn(channel_agent, app.accounts.clone(), leases, stop_rx.clone());
    }
    // After the agent resumed its runs: the scheduler finishes the firings of the last
    // gateway, then looks once a second.
    if let Some(auto) = &parts.automation {
        auto.spawn(app.globals.clone(), stop_rx.clone());
    }
    tokio::spawn(watch_files(Arc::clone(&app)));
    tokio::spawn(auth_summaries(Arc::clone(&app)));
    if let Some(r) = &app.replica {
        tokio::spawn(Arc::clone(r).run(stop_rx.clone()));
    }
    if shared_store && let Some(agent) = app.agent.clone() {
        // Runs of replicas that died are taken over once their leases expire.
        tokio::spawn(adopt_runs(agent, stop_rx.clone()));
    }

    let mut stop_for_server = stop_rx.clone();
    let ws_plane = Arc::clone(&app.ws);
    let shutdown = async move {
        let _ = stop_for_server.wait_for(|s| *s).await;
        ws_plane.shutdown();
    };
    let mut stop_for_bound = stop_rx;
    let bound = async move {
        let _ = stop_for_bound.wait_for(|s| *s).await;
        tokio::time::sleep(grace).await;
    };
    let routes = router(Arc::clone(&app));
    let served = match tls {
        None => serve_http(listener, &app, routes, shutdown, bound).await,
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config).map_err(GatewayError::Serve)?;
            serve_http(listener, &app, routes, shutdown, bound).await
        }
    };
    if let Some(r) = app.replica.clone() {
        // A clean stop hands this replica's leases over at once.
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || r.leave()).await {
            warn!(error = %e, "could not deregister this replica");
        }
    }
    info!("gateway stopping: writing the final audit checkpoint");
    // The failed authentications not yet audited are summarized before the log closes.
    let pending: Vec<RecordInput> = flush_auth_summaries(&app, true)
        .iter()
        .map(summary_record)
        .collect();
    let closed = tokio::task::spawn_blocking(move || {
        for r in pending {
            if let Err(e) = audit.append(r) {
                error!(error = %e, "auth failure summary could not be audited");
            }
        }
        let _ = audit.append(RecordInput::new(
            Kind::System,
            "gateway",
            "gateway.stop",
            "gateway",
        ));
        audit.shutdown()
    })
    .await;
    match closed {
        Ok(Ok(cp)) => {
            if let Some(cp) = cp {
                info!(seq = cp.seq, head = %cp.head, "final audit checkpoint written");
            }
        }
        Ok(Err(e)) => return Err(GatewayError::AuditShutdown(e.to_string())),
        Err(e) => return Err(GatewayError::AuditShutdown(e.to_string())),
    }
    served
}

/// The router with the connection's peer address as `ConnectInfo<Peer>` on every request.
#[derive(Clone)]
struct WithPeer {
    inner: hyper_util::service::TowerToHyperService<Router>,
    peer: Peer,
}

type Incoming = hyper::Request<hyper::body::Incoming>;

impl hyper::service::Service<Incoming> for WithPeer {
    type Response = <hyper_util::service::TowerToHyperService<Router> as hyper::service::Service<
        Incoming,
    >>::Response;
    type Error = <hyper_util::service::TowerToHyperService<Router> as hyper::service::Service<
        Incoming,
    >>::Error;
    type Future = <hyper_util::service::TowerToHyperService<Router> as hyper::service::Service<
        Incoming,
    >>::Future;

    fn call(&self, mut req: Incoming) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        hyper::service::Service::call(&self.inner, req)
    }
}

/// The HTTP/1.1 server: one task per connection, each with the header read timeout
/// (`[gateway] header_timeout_secs`), so a client that sends its request head slowly
/// (slowloris) is cut off instead of holding a connection for good. HTTP/2 is not served (its
/// server has no such timeout). On `shutdown` it stops accepting and lets the open
/// connections finish their requests until `bound`.
async fn serve_http<L>(
    mut listener: L,
    app: &Arc<App>,
    routes: Router,
    shutdown: impl std::future::Future<Output = ()>,
    bound: impl std::future::Future<Output = ()>,
) -> Result<(), GatewayError>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
{
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            c = listener.accept() => c,
            () = &mut shutdown => break,
        };
        let header_timeout = read(&app.settings).header_timeout;
        let svc = WithPeer {
            inner: hyper_util::service::TowerToHyperService::new(routes.clone()),
            peer: Peer(addr),
        };
        let mut stop = stop_rx.clone();
        let open = closed_rx.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .with_upgrades();
            tokio::pin!(conn);
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(client = %addr, error = %e, "connection ended");
                        }
                        break;
                    }
                    _ = stop.wait_for(|s| *s), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(closed_rx);
    tokio::select! {
        () = closed_tx.closed() => {}
        () = bound => {
            warn!("in-flight requests did not finish in time; stopping anyway");
        }
    }
    Ok(())
}

/// What a change of the watched files looks like: every file (a directory's entries
/// included) with its size, modification and change times; a missing file counts too.
fn fingerprint(paths: &[PathBuf]) -> Vec<(PathBuf, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let stamp = |p: PathBuf, m: &std::fs::Metadata| {
        (
            p,
            m.mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            m.ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.ctime_nsec()),
            m.len(),
        )
    };
    let mut out = Vec::new();
    for p in paths {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                out.push(stamp(p.clone(), &m));
                if let Ok(rd) = std::fs::read_dir(p) {
                    for e in rd.flatten() {
                        if let Ok(m) = e.metadata() {
                            out.push(stamp(e.path(), &m));
                        }
                    }
                }
            }
            Ok(m) => out.push(stamp(p.clone(), &m)),
            Err(_) => out.push((p.clone(), -1, -1, 0)),
        }
    }
    out.sort();
    out
}

/// Hot reload on file change: the config file, the policy directory and the entity files are
/// checked every 2 s; a change runs the same reload as SIGHUP (a valid change applies whole,
/// an invalid one is rejected and shows in `/ready`, the log and the audit log).
async fn watch_files(app: Arc<App>) {
    let paths = || {
        let mut p = app.gate.engine().watched_paths();
        p.push(app.globals.config_path.clone());
        p
    };
    let mut last = fingerprint(&paths());
    let mut every = tokio::time::interval(Duration::from_secs(2));
    loop {
        every.tick().await;
        let now = {
            let paths = paths();
            tokio::task::spawn_blocking(move || fingerprint(&paths))
                .await
                .unwrap_or_default()
        };
        if now != last {
            last = now;
            info!("config or policy files changed: reloading");
            let app = Arc::clone(&app);
            let _ = tokio::task::spawn_blocking(move || reload(&app)).await;
        }
    }
}

/// SIGHUP: reload config, policies and the token; SIGTERM/SIGINT: stop.
async fn signals(app: Arc<App>, stop: tokio::sync::watch::Sender<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stopping");
        let _ = stop.send(true);
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let app = Arc::clone(&app);
                let _ = tokio::task::spawn_blocking(move || reload(&app)).await;
            }
            _ = term.recv() => { info!(signal = "SIGTERM", "shutting down"); break; }
            _ = int.recv() => { info!(signal = "SIGINT", "shutting down"); break; }
        }
    }
    let _ = stop.send(true);
}

/// The SIGHUP reload. Each part keeps its last good state when its new one is invalid.
fn reload(app: &App) {
    info!("reloading config, policies and the gateway token");
    let loaded = app.globals.load_config();
    // A config (or a swapped directory or symlink) that puts a trust path where the agent's
    // tools can write is refused whole: the last good config and policies stay.
    let candidate = loaded
        .as_ref()
        .map_or_else(|_| read(&app.config), Clone::clone);
    let running_workspace = read(&app.config).workspace_dir(&app.globals.home);
    if let Err(e) = crate::config::paths::check_separation_also(
        &candidate,
        &app.globals.home,
        &app.globals.config_path,
        Some(&running_workspace),
    ) {
        app.metrics.policy_reload("rejected");
        error!(error = %e, "reload refused; the last good config and policies stay active");
        let _ = app.gate.audit().append(
            RecordInput::admin(
                "gateway",
                "config.reload",
                "config",
                json!({"error": e.to_string()}),
            )
            .with_outcome("rejected: the last good config and policies stay active"),
        );
        write(&app.reload_refused, Some(e.to_string()));
        return;
    }
    write(&app.reload_refused, None);
    match loaded {
        Ok(new) => {
            let old = read(&app.config);
            match Settings::of(&new.gateway) {
                Ok(s) => write(&app.settings, s),
                Err(e) => warn!(error = %e, "gateway settings not reloaded"),
            }
            match ws::WsSettings::from_config(&new.gateway) {
                Ok(s) => app.ws.set_settings(s),
                Err(e) => warn!(error = %e, "WebSocket settings not reloaded"),
            }
            let needs_restart = [
                ("bind", old.gateway.bind != new.gateway.bind),
                ("owner", old.gateway.owner != new.gateway.owner),
                (
                    "workspace",
                    old.workspace_dir(&app.globals.home) != new.workspace_dir(&app.globals.home),
                ),
                (
                    "tls",
                    old.gateway.tls_cert != new.gateway.tls_cert
                        || old.gateway.tls_key != new.gateway.tls_key,
                ),
                (
                    "policy",
                    format!("{:?}", old.policy) != format!("{:?}", new.policy),
                ),
                (
                    "sandbox",
                    format!("{:?}", old.sandbox) != format!("{:?}", new.sandbox),
                ),
                (
                    "secrets",
                    format!("{:?}", old.secrets) != format!("{:?}", new.secrets),
                ),
                (
                    "audit",
                    format!("{:?}", old.audit) != format!("{:?}", new.audit),
                ),
                (
                    "auth.oidc / auth.proxy",
                    old.auth.oidc != new.auth.oidc || old.auth.proxy != new.auth.proxy,
                ),
            ];
            for (key, changed) in needs_restart {
                if changed {
                    warn!(
                        section = key,
                        "changed in the config, takes effect only after a restart"
                    );
                }
            }
            if old.agent.max_concurrent_runs != new.agent.max_concurrent_runs {
                warn!(
                    section = "agent.max_concurrent_runs",
                    "changed in the config, takes effect only after a restart"
                );
            }
            // The model, the other [agent] settings, providers, pricing and budgets apply now.
            let agent_changed = format!("{:?}", old.agent) != format!("{:?}", new.agent)
                || format!("{:?}", old.providers) != format!("{:?}", new.providers)
                || format!("{:?}", old.pricing) != format!("{:?}", new.pricing)
                || format!("{:?}", old.budgets) != format!("{:?}", new.budgets);
            let mut agent_error = None;
            if agent_changed && let Some(reconfigure) = &app.reconfigure_agent {
                match reconfigure(&new) {
                    Ok(()) => info!(model = %new.agent.model, "agent settings reloaded"),
                    Err(e) => {
                        error!(error = %e, "agent settings not reloaded; the previous model and settings stay in effect");
                        agent_error = Some(format!(
                            "the agent settings were not applied ({e}); the previous model and settings stay in effect"
                        ));
                    }
                }
            }
            write(&app.config_error, agent_error);
            write(&app.config, new);
        }
        Err(e) => {
            // Said everywhere an operator looks: the log, stderr, `/ready`, the audit log.
            error!(error = %e, "config not reloaded; the previous config stays in effect");
            eprintln!("chitin: {e}; the previous config stays in effect until the file is fixed");
            let _ = app.gate.audit().append(
                RecordInput::admin(
                    "gateway",
                    "config.reload",
                    "config",
                    json!({"error": e.to_string()}),
                )
                .with_outcome("rejected: the previous config stays in effect"),
            );
            write(
                &app.config_error,
                Some(format!(
                    "the config was not reloaded, the previous config stays in effect: {e}"
                )),
            );
        }
    }
    // `policy.reload` is decided for the operator: a SIGHUP or a file change comes from whoever
    // controls the host, the same person the command line acts for ([cli] operator).
    let operator = read(&app.config).operator().to_string();
    let allowed = crate::gate::admin_request(
        &operator,
        crate::policy::Action::PolicyReload,
        serde_json::Map::new(),
    )
    .and_then(|req| app.gate.check(&req));
    let reloaded = match allowed {
        Ok(crate::gate::Verdict::Allowed(..)) => app
            .gate
            .reload_policies(&format!("Chitin::User::{operator:?}")),
        Ok(_) => Err(crate::gate::GateError::InvalidRequest(format!(
            "policy denied `policy.reload` for Chitin::User::{operator:?}"
        ))),
        Err(e) => Err(e),
    };
    match reloaded {
        Ok(r) => {
            app.metrics.policy_reload("ok");
            info!(
                policies = r.policies,
                shadow = r.shadow,
                "policies reloaded"
            );
        }
        Err(e) => {
            app.metrics.policy_reload("rejected");
            error!(error = %e, "policy reload rejected; the last good set stays active");
        }
    }
    write(
        &app.skills_status,
        verify_skills(app.skills.as_ref(), &app.gate),
    );
    let cfg = read(&app.config);
    match crate::secrets::SecretStore::open(&app.globals.home, &cfg.secrets) {
        Ok(store) => {
            match gateway_token::get(&store) {
                Ok(Some(t)) => {
                    let changed = !read(&app.token).matches(t.expose().as_bytes());
                    write(&app.token, Arc::new(t));
                    info!(changed, "gateway token reloaded");
                }
                Ok(None) => warn!("no gateway token in the store; keeping the current one"),
                Err(e) => warn!(error = %e, "gateway token not reloaded"),
            }
            let n = store.list().len();
            write(&*app.redactor, store.redactor());
            write(&app.secrets, (true, format!("unlocked ({n} secrets)")));
            if let Some(shared) = &app.shared_secrets {
                shared.replace(store);
            }
        }
        Err(e) => {
            error!(error = %e, "secret store could not be reopened");
            write(
                &app.secrets,
                (false, format!("reopening the store failed: {e}")),
            );
        }
    }
}

/// Runs retention and scheduled backups when due (checked once a minute), with the config as
/// it is now (SIGHUP may have changed it).
async fn lifecycle_schedule(
    lc: crate::lifecycle::Lifecycle,
    globals: Globals,
    offsite: Option<(Gate, crate::secrets::SharedSecretStore)>,
) {
    let lc = Arc::new(lc);
    let offsite = Arc::new(offsite);
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        every.tick().await;
        let (lc2, g, off) = (Arc::clone(&lc), globals.clone(), Arc::clone(&offsite));
        let report = tokio::task::spawn_blocking(move || {
            let off = off.as_ref().as_ref().map(|(gate, secrets)| (gate, secrets));
            g.load_config()
                .map(|c| crate::lifecycle::schedule::tick_with(&lc2, &c, off))
                .map_err(|e| e.to_string())
        })
        .await;
        match report {
            Ok(Ok(r)) => {
                if let Some(res) = r.retention {
                    match res {
                        Ok(rep) => info!(report = ?rep, "retention run"),
                        Err(e) => error!(error = %e, "retention run failed"),
                    }
                }
                if let Some(res) = r.backup {
                    match res {
                        Ok(path) => info!(path = %path.display(), "scheduled backup written"),
                        Err(e) => error!(error = %e, "scheduled backup failed"),
                    }
                }
                match r.offsite {
                    Some(Ok(rep)) => {
                        match &rep.upload {
                            Some(Ok(key)) => {
                                info!(key = %key, pruned = rep.pruned.len(), "off-site backup uploaded")
                            }
                            Some(Err(e)) => error!(error = %e, "off-site backup upload failed"),
                            None => {}
                        }
                        match &rep.test_restore {
                            Some(Ok(key)) => {
                                info!(key = %key, "off-site backup test-restore passed")
                            }
                            Some(Err(e)) => {
                                error!(error = %e, "off-site backup test-restore failed")
                            }
                            None => {}
                        }
                    }
                    Some(Err(e)) => error!(error = %e, "off-site backup round failed"),
                    None => {}
                }
            }
            Ok(Err(e)) => error!(error = %e, "lifecycle schedule: config unreadable"),
            Err(e) => error!(error = %e, "lifecycle schedule task failed"),
        }
    }
}

/// Request id, client address, the query-token refusal, the access log and request metrics.
async fn front(
    State(app): State<Arc<App>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let id = request_id();
    let proxies = read(&app.settings).proxies;
    let xff = req
        .headers()
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    let client = auth::client_addr(peer, xff, &proxies);
    let route: &'static str = match req.uri().path() {
        "/health" => "/health",
        "/ready" => "/ready",
        "/metrics" => "/metrics",
        "/tools/invoke" => "/tools/invoke",
        "/ws" => "/ws",
        "/" | "/app.js" | "/app.css" => "/",
        "/auth/login" | "/auth/callback" => "/auth/login",
        p if p.starts_with("/auth/") => "/auth",
        "/control" | "/control.js" | "/control.css" => "/control",
        p if p.starts_with("/api/") => "/api",
        p if p.starts_with("/hooks/") => "/hooks",
        "/v1/chat/completions" => "/v1/chat/completions",
        p if p.starts_with("/v1/models") => "/v1/models",
        p if p.starts_with("/channels/") => "/channels",
        _ => "other",
    };
    let method = req.method().clone();
    let otel_name = format!("{method} {route}");
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        %method,
        route,
        client = %client,
        otel.name = %otel_name,
        otel.kind = "server",
        http.request.method = %method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    // A trusted proxy (`[gateway] trusted_proxies`) may continue its caller's trace; anyone
    // else's `traceparent` is ignored (a new trace starts here).
    if proxies.contains(&peer.ip().to_canonical())
        && let Some(tp) = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
    {
        crate::telemetry::continue_trace(&span, tp);
    }
    req.extensions_mut().insert(Client(client));
    // Another site's page (an `<img>`, a form, a fetch, a CORS preflight, a WebSocket) is
    // refused before anything else and is not a failed authentication: the owner's browser
    // sends it, so counting it would let any page throttle the owner's address.
    // `/auth/login` and `/auth/callback` are top-level navigations that come from other
    // sites (a link, the identity provider's redirect); they change nothing a page could
    // abuse (the login is bound to its browser by a cookie and a one-time state).
    let guarded = !matches!(
        route,
        "/health" | "/ready" | "/" | "/auth/login" | "/control"
    );
    let mut resp = if guarded
        && (method == axum::http::Method::OPTIONS || app.ws.foreign_request(req.headers()))
    {
        let _g = span.enter();
        tracing::debug!(client = %client, "cross-origin request refused");
        if route == "/ws" {
            app.metrics.ws_connection("refused_origin");
            ws::origin_refused()
        } else {
            error_body(
                StatusCode::FORBIDDEN,
                "cross_origin_refused",
                CROSS_ORIGIN_REFUSED,
            )
        }
    } else if auth::query_has_token(req.uri().query()) {
        // Never look at the value; record the attempt and refuse.
        let _g = span.enter();
        auth_failed(&app, client, AuthFailure::QueryToken)
    } else {
        next.run(req).instrument(span.clone()).await
    };
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    app.metrics.request(route, status);
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    let _g = span.enter();
    info!(
        status,
        ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "request"
    );
    resp
}

/// The refusal of a request from another site's page.
const CROSS_ORIGIN_REFUSED: &str = "requests from other sites' pages are refused (a foreign Origin, Sec-Fetch-Site other than same-origin, or a CORS preflight); use the gateway's own web page, an origin in [gateway] allowed_origins, or a client outside the browser";

fn request_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        b = N
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Records a failed authentication (metrics, limiter, log, audit) and answers 401, or 429
/// when the client is over its allowance of failed attempts. The log and the audit log get
/// the first failure of a client's window and one summary of the rest (`audit_summary`).
fn auth_failed(app: &Arc<App>, client: IpAddr, why: AuthFailure) -> Response {
    let f = record_failure(app, client, why);
    match f.throttled {
        Some(remaining) => rate_limited(remaining),
        None => {
            let mut resp = error_body(StatusCode::UNAUTHORIZED, "unauthorized", why.message());
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            resp
        }
    }
}

/// The bookkeeping of one failed authentication (shared by HTTP and the WebSocket).
fn record_failure(app: &Arc<App>, client: IpAddr, why: AuthFailure) -> auth::Failure {
    app.metrics.auth_failure(why.as_str());
    let limits = read(&app.settings).limits;
    let mut f = match app.limiter.lock() {
        Ok(mut l) => l.fail(client, why, Instant::now(), limits),
        Err(p) => p.into_inner().fail(client, why, Instant::now(), limits),
    };
    // Several gateways: the deployment's count decides (this gateway's keeps the audit
    // aggregation). A database error keeps this gateway's own count.
    if let Some(shared) = &app.shared_failures {
        let now = app.clock.now_ms();
        let count = || shared.fail(f.client, now, limits);
        let counted = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(count)
            }
            _ => count(),
        };
        match counted {
            Ok(v) => {
                f.throttled = v.throttled;
                f.throttled_now = v.throttled_now;
            }
            Err(e) => {
                error!(error = %e, "the deployment-wide failed-authentication count is unavailable; this gateway's own count decides")
            }
        }
    }
    if f.throttled.is_some() {
        app.metrics.auth_failure("rate_limited");
    }
    if let Some(s) = f.ended.clone() {
        audit_summary(app, &s);
    }
    if f.audit_now || f.throttled_now {
        warn!(reason = why.as_str(), client = %f.client, throttled = f.throttled_now, "authentication failed");
    } else {
        tracing::debug!(reason = why.as_str(), client = %f.client, "authentication failed");
    }
    if f.audit_now {
        let input = RecordInput::new(
            Kind::System,
            format!("client:{}", f.client),
            "gateway.auth",
            "gateway",
        )
        .with_outcome(format!("refused: {}", why.as_str()));
        append_detached(app, input, "auth failure");
    }
    f
}

/// One audit record for the failures of a client's window after its first one.
fn audit_summary(app: &Arc<App>, s: &auth::Summary) {
    warn!(client = %s.client, count = s.count, "more failed authentications in the window");
    append_detached(app, summary_record(s), "auth failure summary");
}

fn summary_record(s: &auth::Summary) -> RecordInput {
    RecordInput::new(
        Kind::System,
        format!("client:{}", s.client),
        "gateway.auth",
        "gateway",
    )
    .with_outcome(format!(
        "refused {} more times within {} s",
        s.count,
        s.window.as_secs()
    ))
    .with_payload(
        json!({"count": s.count, "reasons": s.reasons, "window_secs": s.window.as_secs()}),
    )
}

/// Appends without making the caller wait: nothing is allowed either way.
fn append_detached(app: &Arc<App>, input: RecordInput, what: &'static str) {
    let audit = Arc::clone(app.gate.audit());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = audit.append(input) {
            error!(error = %e, "{what} could not be audited");
        }
    });
}

/// Writes the summaries of the failed-authentication windows that have ended (all pending
/// ones with `all`, at shutdown).
fn flush_auth_summaries(app: &Arc<App>, all: bool) -> Vec<auth::Summary> {
    let limits = read(&app.settings).limits;
    match app.limiter.lock() {
        Ok(mut l) => l.summaries(Instant::now(), limits, all),
        Err(p) => p.into_inner().summaries(Instant::now(), limits, all),
    }
}

/// Audits the summaries of ended windows every few seconds.
async fn auth_summaries(app: Arc<App>) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        every.tick().await;
        for s in flush_auth_summaries(&app, false) {
            audit_summary(&app, &s);
        }
    }
}

/// 429 with `Retry-After` for a failed attempt of a client over its allowance.
fn rate_limited(remaining: Duration) -> Response {
    let mut resp = error_body(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many failed authentications from this address; wait and retry (a request with the right token is never refused)",
    );
    if let Ok(v) = HeaderValue::from_str(&remaining.as_secs().max(1).to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn client_of(req: &Request) -> IpAddr {
    req.extensions()
        .get::<Client>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0)
}

/// The authentication middleware of the protected routes: the request goes on with its
/// [`auth::AuthedUser`] as an extension (`Extension<AuthedUser>` in a handler), or is refused
/// (401, 403, 429). See [`login::authenticate`].
async fn require_auth(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let client = client_of(&req);
    match login::authenticate(&app, client, req.method(), req.headers()).await {
        Ok(user) => {
            req.extensions_mut().insert(user);
            next.run(req).await
        }
        Err(resp) => *resp,
    }
}

/// How readiness names the state store: `state.db`, or the PostgreSQL database.
fn state_name(db: &crate::store::Db) -> String {
    match db.dialect() {
        crate::store::Dialect::Sqlite => "state.db".into(),
        crate::store::Dialect::Postgres => format!("the database {}", db.location()),
    }
}

/// One readiness check.
fn check(ok: bool, detail: impl Into<String>) -> (bool, String) {
    (ok, detail.into())
}

fn checks(app: &App) -> Vec<(&'static str, (bool, String))> {
    let store = match app
        .store
        .db()
        .with(|c| -> Result<i64, crate::store::StoreError> {
            Ok(c.query_row(
                "SELECT count(*) FROM approvals WHERE status IN ('pending', 'granted')",
                crate::store::params![],
            )?
            .get(0)?)
        }) {
        Ok(n) => check(
            true,
            format!(
                "{} answers ({n} open approvals)",
                state_name(app.store.db())
            ),
        ),
        Err(e) => check(
            false,
            format!("{} unavailable: {e}", state_name(app.store.db())),
        ),
    };
    let audit = match app.gate.audit().health() {
        chitin_audit::AuditHealth::Ok => check(true, "writing"),
        chitin_audit::AuditHealth::Failed { reason, .. } => check(false, reason),
    };
    let engine = app.gate.engine();
    let refused = read(&app.reload_refused);
    let policies = match engine.last_error() {
        _ if refused.is_some() => check(
            false,
            format!(
                "the last reload was refused, the previous config and policies stay active: {}",
                refused.unwrap_or_default()
            ),
        ),
        Some(e) => check(
            false,
            format!("the last reload failed, the previous set stays active: {e}"),
        ),
        None => {
            let active = engine.active();
            let n = active.compiled.enforced_count();
            if n == 0 {
                check(false, "no enforced policy is active")
            } else {
                check(
                    true,
                    format!("{n} enforced, {} shadow", active.compiled.shadow_count()),
                )
            }
        }
    };
    let (unlocked, detail) = read(&app.secrets);
    let secrets = if !unlocked {
        check(false, detail)
    } else if !app.secrets_path.exists() {
        check(false, format!("{} is missing", app.secrets_path.display()))
    } else {
        check(true, detail)
    };
    let sandbox = check(app.sandbox_check.0, app.sandbox_check.1.clone());
    let cfg = read(&app.config);
    let providers = providers_check(app, &cfg);
    let (skills_ok, skills_detail) = read(&app.skills_status);
    let configured: Vec<String> = cfg.channels.iter().map(|c| c.name.clone()).collect();
    let config_check = match read(&app.config_error) {
        Some(e) => check(false, e),
        None => check(
            true,
            format!(
                "{} in effect (model: {})",
                app.globals.config_path.display(),
                if cfg.agent.model.is_empty() {
                    "none"
                } else {
                    cfg.agent.model.as_str()
                }
            ),
        ),
    };
    let mut list = vec![
        ("config", config_check),
        ("store", store),
        ("audit", audit),
        ("policies", policies),
        ("secrets", secrets),
        ("sandbox", sandbox),
        ("providers", providers),
        ("skills", check(skills_ok, skills_detail)),
        ("replicas", replicas_check(app)),
    ];
    if !configured.is_empty() {
        let channels = match &app.channel_metrics {
            Some(m) => m.readiness(&configured),
            None => check(
                false,
                "the channels could not be started (see the gateway log)",
            ),
        };
        list.push((CHANNELS_CHECK, channels));
    }
    list
}

/// Every heartbeat, takes over the unfinished runs whose replica stopped renewing them.
async fn adopt_runs(agent: crate::agent::Agent, mut stop: tokio::sync::watch::Receiver<bool>) {
    let period =
        Duration::from_millis(u64::try_from(crate::cluster::HEARTBEAT_MS).unwrap_or(5_000));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match agent.adopt().await {
            Ok(0) => {}
            Ok(n) => info!(runs = n, "took over runs of a replica that stopped"),
            Err(e) => warn!(error = %e, "cannot look for runs to take over"),
        }
    }
}

/// The `/ready` check of the replicas: the live ones on the store and the leases each holds
/// (issue #18). Fails when this gateway could not register or the table cannot be read.
fn replicas_check(app: &App) -> (bool, String) {
    let Some(me) = &app.replica else {
        return check(
            false,
            "this gateway is not registered as a replica (see the log)",
        );
    };
    match crate::cluster::live_replicas(app.store.db(), app.clock.now_ms()) {
        Ok(list) => check(true, crate::cluster::describe(&list, Some(me.id()))),
        Err(e) => check(false, format!("the replica list cannot be read: {e}")),
    }
}

/// The `/ready` check of the chat channels. It is reported but does not make the gateway
/// unready: a channel that cannot connect must not take the API, the web chat and the other
/// channels out of service.
const CHANNELS_CHECK: &str = "channels";

/// Model calls in a row that must fail (after retries and fallbacks) before `/ready` reports
/// the providers as not ok.
const PROVIDER_FAILURES_NOT_READY: u64 = 3;

/// The `providers` check: the model configuration, every provider's key reference resolving
/// (whether the named secret is in the store or the variable is set; never the value), and
/// the outcome of the last model calls.
fn providers_check(app: &App, cfg: &crate::config::Config) -> (bool, String) {
    use crate::secrets::SecretRef;
    if cfg.agent.model.is_empty() {
        return check(
            true,
            "no model configured; set [agent] model and [[providers]] in chitin.toml",
        );
    }
    let mut problems = Vec::new();
    for p in &cfg.providers {
        match p.api_key.as_ref().map(|k| &k.0) {
            Some(SecretRef::Secret(name)) => {
                let present = app
                    .shared_secrets
                    .as_ref()
                    .is_some_and(|s| s.read().contains(name));
                if !present {
                    problems.push(format!(
                        "provider {}: api_key secret:{} is not in the secret store (store it with `chitin secrets set {}`, then reload with SIGHUP)",
                        p.name,
                        name.as_str(),
                        name.as_str()
                    ));
                }
            }
            Some(SecretRef::Env(var)) if std::env::var_os(var).is_none_or(|v| v.is_empty()) => {
                problems.push(format!(
                    "provider {}: api_key env:{var} is not set in the gateway's environment",
                    p.name
                ));
            }
            Some(SecretRef::Env(_)) | None => {}
        }
    }
    if !problems.is_empty() {
        return check(false, problems.join("; "));
    }
    if let Some(agent) = &app.agent {
        let (failed, last) = agent.model_health();
        if failed >= PROVIDER_FAILURES_NOT_READY {
            return check(
                false,
                format!(
                    "the last {failed} model calls failed (after retries and fallbacks); last error: {}",
                    last.unwrap_or_default()
                ),
            );
        }
    }
    check(
        true,
        format!(
            "model {} configured, {} providers, their keys present",
            cfg.agent.model,
            cfg.providers.len()
        ),
    )
}

/// `GET /ready`: public; the `detail` texts only for a caller with the token.
async fn ready_handler(State(app): State<Arc<App>>, req: Request) -> Response {
    let client = client_of(&req);
    let detailed = if req.headers().contains_key(header::AUTHORIZATION) {
        match login::authenticate(&app, client, req.method(), req.headers()).await {
            Ok(_) => true,
            Err(resp) => return *resp,
        }
    } else {
        false
    };
    let app2 = Arc::clone(&app);
    let Ok(list) = tokio::task::spawn_blocking(move || checks(&app2)).await else {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "readiness checks failed to run",
        );
    };
    let ready = list
        .iter()
        .filter(|(name, _)| *name != CHANNELS_CHECK)
        .all(|(_, (ok, _))| *ok);
    let mut map = serde_json::Map::new();
    for (name, (ok, detail)) in list {
        let v = if detailed {
            json!({"ok": ok, "detail": logging::redact(&app.redactor, &detail)})
        } else {
            json!({"ok": ok})
        };
        map.insert(name.into(), v);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({"ready": ready, "checks": Value::Object(map)})),
    )
        .into_response()
}

/// A platform's webhook request (`GET|POST /channels/<name>/<route>`): checked by the
/// channel's adapter with the platform's secret or signature (not the gateway token),
/// committed before the 200.
async fn channel_webhook(
    State(app): State<Arc<App>>,
    axum::extract::Path((name, route)): axum::extract::Path<(String, String)>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(hooks) = app.channel_webhooks.clone() else {
        return error_body(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let hdrs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let req = chitin_channels::WebhookRequest {
        method: method.as_str(),
        route: &route,
        query: uri.query().unwrap_or(""),
        headers: &hdrs,
        body: &body,
    };
    let a = hooks.handle(&name, &req).await;
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::OK {
        return match a.body {
            Some(b) => ([(header::CONTENT_TYPE, b.content_type)], b.body).into_response(),
            None => axum::Json(json!({"ok": true})).into_response(),
        };
    }
    error_body(status, a.code, &a.message)
}

/// `POST /hooks/<name>`: the body is read up to the hook's `max_body_kib` (413 beyond), then
/// handed to `automation::hooks` (signature, deduplication, Cedar, the turn or workflow).
async fn hook_webhook(
    State(app): State<Arc<App>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let Some(hooks) = app.hooks.clone() else {
        return error_body(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let Some(limit) = hooks.max_body(&name) else {
        return error_body(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let hdrs: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| {
            v.to_str()
                .ok()
                .map(|v| (k.as_str().to_string(), v.to_string()))
        })
        .collect();
    let Ok(body) = axum::body::to_bytes(req.into_body(), limit).await else {
        return error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!(
                "the body is larger than this hook's limit of {} KiB ([[hooks]] max_body_kib)",
                limit / 1024
            ),
        );
    };
    let a = hooks.handle(&name, &hdrs, &body).await;
    let status = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(a.body)).into_response()
}

async fn metrics_handler(State(app): State<Arc<App>>) -> Response {
    let app2 = Arc::clone(&app);
    let head = tokio::task::spawn_blocking(move || audit_head(app2.gate.audit()))
        .await
        .ok();
    let appends = head.map(|h| u64::try_from(h - app.audit_head_at_start).unwrap_or(0));
    let agent_refusals = app
        .agent
        .as_ref()
        .map(|a| a.sandbox_refusals())
        .unwrap_or_default();
    let mut text = app.metrics.render_with(appends, &agent_refusals);
    let (audit_ok, since) = match app.gate.audit().health() {
        chitin_audit::AuditHealth::Ok => (true, None),
        chitin_audit::AuditHealth::Failed { since_ms, .. } => (false, Some(since_ms)),
    };
    let store = Arc::clone(&app.store);
    let now = app.clock.now_ms();
    let pending = tokio::task::spawn_blocking(move || {
        store
            .db()
            .with(|c| -> Result<i64, crate::store::StoreError> {
                Ok(c.query_row(
                    "SELECT count(*) FROM approvals WHERE status = 'pending' AND expires_ms > ?1",
                    crate::store::params![now],
                )?
                .get(0)?)
            })
            .ok()
    })
    .await
    .ok()
    .flatten()
    .and_then(|n| u64::try_from(n).ok());
    text.push_str(&metrics::render_state(audit_ok, since, pending));
    text.push_str(&metrics::render_telemetry(crate::telemetry::counts()));
    if let Some(a) = &app.agent {
        text.push_str(&a.metrics_text());
    }
    if let Some(m) = app.channel_metrics.clone()
        && let Ok(t) = tokio::task::spawn_blocking(move || m.render()).await
    {
        text.push_str(&t);
    }
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// The body of `POST /tools/invoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    tool: String,
    #[serde(default = "empty_args")]
    args: Value,
    #[serde(default)]
    session: Option<String>,
}

fn empty_args() -> Value {
    Value::Object(serde_json::Map::new())
}

fn valid_session(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

async fn invoke_handler(
    State(app): State<Arc<App>>,
    axum::Extension(user): axum::Extension<auth::AuthedUser>,
    req: Request<Body>,
) -> Response {
    let max = read(&app.settings).max_body;
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), max).await else {
        app.metrics.tool_call("invalid");
        return error_body(
            StatusCode::BAD_REQUEST,
            "body_too_large",
            &format!(
                "the request body is larger than {} KiB ([gateway] max_body_kib)",
                max / 1024
            ),
        );
    };
    let body: InvokeBody = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            app.metrics.tool_call("invalid");
            return error_body(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &logging::redact(
                    &app.redactor,
                    &format!(
                        "expected {{\"tool\": NAME, \"args\": {{...}}, \"session\": KEY?}}: {e}"
                    ),
                ),
            );
        }
    };
    let session = body.session.clone().unwrap_or_else(|| "gateway".into());
    if !valid_session(&session) {
        app.metrics.tool_call("invalid");
        return error_body(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "session must be 1-128 characters of letters, digits, `.`, `_`, `:` or `-`",
        );
    }
    let app2 = Arc::clone(&app);
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || {
        span.in_scope(|| run_tool(&app2, user.id(), &body, &session))
    })
    .await
    {
        Ok(resp) => resp,
        Err(e) => {
            error!(error = %e, "tool task failed");
            app.metrics.tool_call("error");
            error_body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the tool call failed",
            )
        }
    }
}

/// The blocking tool path: decide, redeem or request an approval, run.
fn run_tool(app: &App, user: &str, body: &InvokeBody, session: &str) -> Response {
    let call = CallContext {
        user: user.to_string(),
        origin: Origin::User,
        session: session.to_string(),
        workspace: app.workspace.clone(),
        tainted: false,
    };
    let tool = body.tool.as_str();
    // `invoke` redeems a granted approval bound to exactly this call itself (single use);
    // there is no way to pass "approved" in.
    let result = crate::tools::invoke::invoke(
        &app.gate,
        &app.sandbox,
        &call,
        tool,
        &body.args,
        Some(&app.approvals),
    );
    match result {
        Ok(Invoked::ApprovalRequired {
            request_digest,
            args,
            ..
        }) => {
            app.metrics.tool_call("approval_required");
            // A retry of a call that already waits for a person gets the same approval.
            let open = match app.approvals.open_for(&request_digest) {
                Ok(Some(a)) => Ok(a),
                Ok(None) => app
                    .approvals
                    .request(user, session, tool, &args, request_digest)
                    .inspect(|a| {
                        app.metrics.approval("requested");
                        info!(tool, code = %a.code, "approval requested");
                        // Live on the WebSocket (the web page's approval list).
                        if let Some(b) = app.ws.backend() {
                            b.approval_opened(user, a);
                        }
                    }),
                Err(e) => Err(e),
            };
            match open {
                Ok(a) => (
                    StatusCode::ACCEPTED,
                    axum::Json(json!({ "approval": a.to_json(false) })),
                )
                    .into_response(),
                Err(e) => approval_error(app, &e),
            }
        }
        Ok(Invoked::Ran {
            result,
            decision,
            approval,
        }) => {
            if let Some(id) = &approval {
                app.metrics.approval("redeemed");
                info!(tool, approval = %id, "approval redeemed");
            }
            respond(
                app,
                tool,
                Ok(Invoked::Ran {
                    result,
                    decision,
                    approval: approval.clone(),
                }),
                approval.as_deref(),
            )
        }
        other => respond(app, tool, other, None),
    }
}

fn approval_error(app: &App, e: &ApprovalError) -> Response {
    app.metrics.tool_call("error");
    let msg = logging::redact(&app.redactor, &e.to_string());
    error!(error = %msg, "approval step failed");
    let status = match e {
        ApprovalError::Audit(_) | ApprovalError::Gate(GateError::AuditUnavailable(_)) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_body(status, "approval_failed", &msg)
}

fn respond(
    app: &App,
    tool: &str,
    outcome: Result<Invoked, InvokeError>,
    approval: Option<&str>,
) -> Response {
    match outcome {
        Ok(Invoked::Ran {
            result, decision, ..
        }) => {
            app.metrics.tool_call("allow");
            if let Some(k) = &result.killed {
                app.metrics.sandbox_kill(k);
            }
            info!(tool, exit_code = ?result.exit_code, killed = ?result.killed, "tool ran");
            (
                StatusCode::OK,
                axum::Json(json!({
                    "result": result,
                    "decision": {"outcome": decision.decision.as_str(), "policies": decision.policies},
                    "approval": approval,
                })),
            )
                .into_response()
        }
        Ok(Invoked::Denied(d)) => {
            app.metrics.tool_call("deny");
            info!(tool, policies = ?d.policies, "tool call denied");
            (
                StatusCode::FORBIDDEN,
                axum::Json(json!({"error": {
                    "code": "policy_denied",
                    "message": "the policy engine denied this call",
                    "policies": d.policies,
                }})),
            )
                .into_response()
        }
        Ok(Invoked::ApprovalRequired { .. }) => {
            // Only reachable when a redeemed approval did not unlock the call (the policies
            // changed in between): the approval is spent and nothing ran.
            app.metrics.tool_call("deny");
            error_body(
                StatusCode::FORBIDDEN,
                "policy_denied",
                "the approval did not unlock this call under the current policies; nothing ran",
            )
        }
        Err(e) => {
            let msg = logging::redact(&app.redactor, &e.to_string());
            if let InvokeError::RanUnaudited {
                result, decision, ..
            } = e
            {
                // The tool ran: say so, with its result, never "nothing ran".
                app.metrics.tool_call("error");
                if let Some(k) = &result.killed {
                    app.metrics.sandbox_kill(k);
                }
                error!(tool, error = %msg, "tool ran but its audit record failed");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({
                        "error": {
                            "code": "audit_failed_after_run",
                            "message": msg,
                            "ran": true,
                            "audit": "failed",
                        },
                        "result": result,
                        "decision": {"outcome": decision.decision.as_str(), "policies": decision.policies},
                        "approval": approval,
                    })),
                )
                    .into_response();
            }
            let (status, code, metric) = match &e {
                InvokeError::UnknownTool(_) => (StatusCode::NOT_FOUND, "unknown_tool", "invalid"),
                InvokeError::InvalidArgs { .. } => {
                    (StatusCode::BAD_REQUEST, "invalid_args", "invalid")
                }
                InvokeError::Gate(GateError::InvalidPath { .. } | GateError::InvalidRequest(_)) => {
                    (StatusCode::BAD_REQUEST, "invalid_args", "invalid")
                }
                InvokeError::Gate(GateError::AuditUnavailable(_)) | InvokeError::Audit(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "error",
                ),
                InvokeError::Gate(GateError::Policy(_)) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "policy_error", "error")
                }
                InvokeError::Gate(GateError::ApprovalMismatch) => {
                    (StatusCode::FORBIDDEN, "approval_mismatch", "error")
                }
                InvokeError::Gate(GateError::Unresolvable(_)) => {
                    (StatusCode::BAD_GATEWAY, "host_unresolvable", "error")
                }
                InvokeError::Approval(crate::approvals::ApprovalError::Audit(_)) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "audit_unavailable",
                    "error",
                ),
                InvokeError::Approval(_) => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "approval_error", "error")
                }
                InvokeError::Tool(t) => tool_status(t),
                InvokeError::RanUnaudited { .. } => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "audit_failed_after_run",
                    "error",
                ),
            };
            app.metrics.tool_call(metric);
            if code == "sandbox_unavailable" {
                app.metrics.sandbox_refusal(tool);
            }
            warn!(tool, code, error = %msg, "tool call failed");
            error_body(status, code, &msg)
        }
    }
}

fn tool_status(t: &crate::tools::ToolError) -> (StatusCode, &'static str, &'static str) {
    use crate::tools::ToolError as T;
    match t {
        T::InvalidArgs(_) => (StatusCode::BAD_REQUEST, "invalid_args", "invalid"),
        T::Path { .. } | T::SymlinkEscape { .. } | T::Hardlink { .. } => {
            (StatusCode::FORBIDDEN, "path_refused", "error")
        }
        T::File { .. } | T::EditNoMatch { .. } | T::EditAmbiguous { .. } => {
            (StatusCode::UNPROCESSABLE_ENTITY, "tool_failed", "error")
        }
        T::SandboxUnavailable(_) | T::Sandbox(_) | T::Launcher { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "sandbox_unavailable",
            "error",
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "tool_failed", "error"),
    }
}
