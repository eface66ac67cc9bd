//! MCP client: the configured MCP servers (`[[mcp.servers]]`), their lifecycle, the trust
//! pins, and the tools they offer to the agent as `mcp__<server>__<tool>`.
//!
//! A small JSON-RPC 2.0 client of our own, not `rmcp`: the two transports Chitin needs are
//! newline-delimited JSON over the sandboxed server's stdio and one POST per message over
//! HTTP (JSON or SSE answers), about 600 lines over crates already in the tree (serde_json,
//! reqwest, tokio), where `rmcp` would add its macro and schema stack to a 2-core clean build
//! and hide the process and the HTTP client this module must control (the sandbox launcher,
//! no redirects, no proxy, capped answers).
//!
//! Invariants:
//! - A stdio server runs only through the sandbox launcher (`chitin sandbox exec`), in its
//!   own directory `$CHITIN_HOME/workspaces/mcp-<name>`, with network only to the declared
//!   `hosts` a policy allows (`mcp.egress`), and secrets in its environment only as Cedar
//!   `secret.use` (principal `Chitin::Tool::"mcp:<name>"`) allows.
//! - An HTTP server is reached only at its configured URL.
//! - A server nobody trusted is never started to offer tools; only pinned tools whose
//!   definition has not changed since `chitin mcp trust` are offered or callable, and only
//!   while the server's command line (or URL) is the one that was trusted.
//! - A server that crashes, hangs past `timeout_secs`, answers too much or breaks the protocol
//!   is a tool error, never a gateway error; it is stopped and started again at the next use
//!   (immediately after one failure, then after 2, 4, ... 60 s while it keeps failing).

pub mod http;
pub mod pins;
pub mod stdio;
pub mod wire;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::config::mcp::{McpConfig, McpServerConfig, Transport};
use crate::gate::{Authorized, Gate, Verdict};
use crate::policy::{Action, PolicyRequest};
use crate::tools::cancel::Cancel;
use crate::tools::mcp::{McpOutput, McpToolInfo, McpTools};
use wire::ToolDef;

/// Errors of the MCP client. Messages are sentences for the model or the operator.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("no MCP server named `{0}` is configured ([[mcp.servers]] in chitin.toml)")]
    NotConfigured(String),
    #[error("MCP server `{server}` could not be started: {reason}")]
    Start { server: String, reason: String },
    #[error("MCP server `{server}` stopped: {reason}; it is started again at the next use")]
    Exited { server: String, reason: String },
    #[error(
        "MCP server `{server}` did not answer within {secs} s (timeout_secs); it was stopped and is started again at the next use"
    )]
    Timeout { server: String, secs: u64 },
    #[error("MCP server `{server}`: the call was stopped with its run")]
    Cancelled { server: String },
    #[error("MCP server `{server}`: {message}")]
    Server { server: String, message: String },
    #[error("MCP server `{server}` broke the protocol: {message}")]
    Protocol { server: String, message: String },
    #[error("MCP server `{server}` answered {bytes} bytes; at most {max} (max_result_kib)")]
    TooLarge {
        server: String,
        bytes: usize,
        max: usize,
    },
    #[error(
        "MCP server `{server}` failed {failures} times in a row; it is started again in {secs} s"
    )]
    Backoff {
        server: String,
        failures: u32,
        secs: u64,
    },
    #[error("the MCP trust store: {0}")]
    Store(String),
    #[error(transparent)]
    Gate(#[from] crate::gate::GateError),
}

/// A live connection.
enum Conn {
    Stdio(stdio::StdioConn),
    Http(http::HttpConn),
}

impl Conn {
    fn alive(&self) -> bool {
        match self {
            Self::Stdio(c) => c.alive(),
            Self::Http(c) => c.alive(),
        }
    }
    fn take_list_changed(&self) -> bool {
        match self {
            Self::Stdio(c) => c.take_list_changed(),
            Self::Http(c) => c.take_list_changed(),
        }
    }
    fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
        cancel: Option<&Cancel>,
    ) -> Result<Value, McpError> {
        match self {
            Self::Stdio(c) => c.request(method, params, timeout, cancel),
            Self::Http(c) => c.request(method, params, timeout, cancel),
        }
    }
    fn notify(&self, method: &str, params: Value) -> Result<(), McpError> {
        match self {
            Self::Stdio(c) => c.notify(method, params),
            Self::Http(c) => c.notify(method, params),
        }
    }
    fn stop(&self, why: &str) {
        match self {
            Self::Stdio(c) => c.stop(why),
            Self::Http(c) => c.stop(why),
        }
    }
}

#[derive(Default)]
struct SlotState {
    conn: Option<Arc<Conn>>,
    /// The negotiated protocol version of `conn`.
    version: Option<String>,
    /// Failures in a row (start, crash, timeout); reset by a good answer.
    failures: u32,
    retry_at: Option<Instant>,
    /// The last listing of `conn`.
    listing: Option<Vec<ToolDef>>,
}

struct Slot {
    cfg: McpServerConfig,
    state: Mutex<SlotState>,
}

/// How the sandbox launcher is started (from the tools' `Sandbox`).
#[derive(Debug, Clone)]
struct Launch {
    launcher: PathBuf,
    home: PathBuf,
    config: Option<PathBuf>,
    sandbox: crate::config::sandbox::SandboxConfig,
}

/// The configured MCP servers.
pub struct Hub {
    slots: Vec<Arc<Slot>>,
    pins: pins::Pins,
    gate: Gate,
    launch: Launch,
    secrets: Option<Arc<crate::secrets::ToolSecrets>>,
    /// The user a server's start is decided for (`secret.use` context `user`): the gateway
    /// owner.
    owner: String,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field(
                "servers",
                &self
                    .slots
                    .iter()
                    .map(|s| s.cfg.name.clone())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// How long to wait before starting a server again after `failures` failures in a row: not
/// at all after the first, then 2, 4, 8, ... seconds, at most 60.
pub fn backoff(failures: u32) -> Duration {
    if failures <= 1 {
        return Duration::ZERO;
    }
    Duration::from_secs((1u64 << failures.saturating_sub(1).min(6)).min(60))
}

/// A tool's standing against the pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolStatus {
    /// Pinned and unchanged: offered.
    Trusted,
    /// Pinned, but its definition changed since: withheld until trusted again.
    Changed,
    /// Not pinned: withheld until trusted.
    New,
    /// Pinned but no longer listed.
    Removed,
    /// Cannot be offered whatever the pins say.
    Unusable(String),
}

impl ToolStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Trusted => "trusted",
            Self::Changed => "changed",
            Self::New => "new",
            Self::Removed => "removed",
            Self::Unusable(_) => "unusable",
        }
    }
}

/// One tool in a server's report.
#[derive(Debug, Clone)]
pub struct ToolReport {
    pub name: String,
    pub status: ToolStatus,
    pub risk: &'static str,
    /// The server's definition (absent for removed tools).
    pub def: Option<ToolDef>,
}

/// What `chitin mcp list` shows of one server.
#[derive(Debug, Clone)]
pub struct ServerReport {
    pub name: String,
    pub transport: &'static str,
    /// The command line or URL.
    pub target: String,
    pub trust: Option<pins::Trust>,
    /// The server's command line or URL differs from the one that was trusted.
    pub identity_changed: bool,
    pub protocol: Option<String>,
    pub tools: Vec<ToolReport>,
    /// Why the server could not be asked for its tools.
    pub error: Option<String>,
}

impl Hub {
    /// The hub for `config`'s servers; stdio servers are launched like `sandbox`'s tools (its
    /// launcher, state dir, config file and `[sandbox]` limits). Nothing starts yet.
    pub fn new(
        config: &McpConfig,
        gate: Gate,
        store: Arc<crate::store::Store>,
        sandbox: &crate::tools::Sandbox,
        secrets: Option<Arc<crate::secrets::ToolSecrets>>,
        owner: &str,
    ) -> Self {
        Self {
            slots: config
                .servers
                .iter()
                .map(|c| {
                    Arc::new(Slot {
                        cfg: c.clone(),
                        state: Mutex::new(SlotState::default()),
                    })
                })
                .collect(),
            pins: pins::Pins::new(store),
            gate,
            launch: Launch {
                launcher: sandbox.launcher.clone(),
                home: sandbox.home.clone(),
                config: sandbox.config.clone(),
                sandbox: sandbox.config_section.clone(),
            },
            secrets,
            owner: owner.to_string(),
        }
    }

    /// The configured server names.
    pub fn servers(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.cfg.name.clone()).collect()
    }

    fn slot(&self, server: &str) -> Result<&Arc<Slot>, McpError> {
        self.slots
            .iter()
            .find(|s| s.cfg.name == server)
            .ok_or_else(|| McpError::NotConfigured(server.to_string()))
    }

    /// `sha256:<hex>` of the server's identity (command line or URL).
    pub fn identity(cfg: &McpServerConfig) -> String {
        wire::digest(&cfg.identity())
    }

    /// The server's directory (created 0700).
    fn server_dir(&self, name: &str) -> Result<PathBuf, McpError> {
        let home = crate::state::Home::open(&self.launch.home).map_err(|e| McpError::Start {
            server: name.to_string(),
            reason: e.to_string(),
        })?;
        home.ensure_dir(format!("workspaces/mcp-{name}"))
            .map_err(|e| McpError::Start {
                server: name.to_string(),
                reason: e.to_string(),
            })
    }

    /// Decides `mcp.egress` for each declared host; the allowed ones.
    fn egress(&self, cfg: &McpServerConfig) -> Result<Vec<chitin_sandbox::NetDest>, McpError> {
        let mut out = Vec::new();
        for h in &cfg.hosts {
            let Ok(dest) = h.parse::<chitin_sandbox::NetDest>() else {
                continue;
            };
            let uid = |s: String| {
                s.parse::<cedar_policy::EntityUid>().map_err(|e| {
                    McpError::Gate(crate::gate::GateError::InvalidRequest(e.to_string()))
                })
            };
            let mut context = Map::new();
            context.insert("host".into(), json!(dest.host));
            context.insert("port".into(), json!(dest.port));
            let req = PolicyRequest {
                principal: uid(format!(
                    "Chitin::McpServer::{}",
                    Value::String(cfg.name.clone())
                ))?,
                action: Action::McpEgress.uid(),
                resource: uid(format!(
                    "Chitin::Gateway::{}",
                    Value::String(crate::policy::builtin::GATEWAY_ID.into())
                ))?,
                context,
            };
            match self.gate.check(&req)? {
                Verdict::Allowed(..) => out.push(dest),
                Verdict::Denied(_) | Verdict::ApprovalRequired { .. } => {
                    tracing::info!(server = %cfg.name, host = %h, "mcp.egress not allowed: the server gets no network to it");
                }
            }
        }
        Ok(out)
    }

    /// Starts a stdio server in the sandbox.
    fn spawn_stdio(&self, cfg: &McpServerConfig, command: &str) -> Result<Conn, McpError> {
        let name = &cfg.name;
        let start = |reason: String| McpError::Start {
            server: name.clone(),
            reason,
        };
        let dir = self.server_dir(name)?;
        let net = self.egress(cfg)?;
        // Secrets of `env`: each one decided as `secret.use` by Tool::"mcp:<name>".
        let tool = format!("mcp:{name}");
        let entries: Vec<crate::config::sandbox::SecretEnvEntry> = cfg
            .env
            .iter()
            .filter_map(|(k, v)| {
                v.strip_prefix("secret:")
                    .map(|s| crate::config::sandbox::SecretEnvEntry {
                        tool: tool.clone(),
                        secret: s.to_string(),
                        var: k.clone(),
                    })
            })
            .collect();
        let secret_env = if entries.is_empty() {
            None
        } else {
            let Some(ts) = &self.secrets else {
                return Err(start(
                    "its env names secrets, and this runtime releases none".into(),
                ));
            };
            let program = crate::gate::program_location(command, &dir, &dir).ok();
            // The start is no session's: it acts on no untrusted content (the server gets
            // its secrets for its whole life, whichever call started it).
            let start_call = crate::gate::CallContext {
                user: self.owner.clone(),
                origin: crate::gate::Origin::Automation,
                session: format!("mcp:{name}"),
                workspace: dir.clone(),
                tainted: false,
            };
            let released = ts
                .release(&tool, Some(&start_call), program.as_ref(), &entries)
                .map_err(|e| start(e.to_string()))?;
            if let Some(d) = released.denied.first() {
                return Err(start(format!(
                    "policy did not allow secret `{d}` for it (Cedar secret.use by Chitin::Tool::\"{tool}\")"
                )));
            }
            Some(released.env)
        };
        let l = &self.launch;
        let mut cmd = std::process::Command::new(&l.launcher);
        cmd.env_clear();
        cmd.env("CHITIN_HOME", &l.home);
        if let Some(c) = &l.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(["sandbox", "exec", "--workspace"]).arg(&dir);
        cmd.arg("--timeout").arg(cfg.lifetime_secs.to_string());
        cmd.arg("--memory").arg(cfg.memory_mb.to_string());
        cmd.arg("--max-procs").arg(l.sandbox.max_procs.to_string());
        for n in &net {
            cmd.arg("--net").arg(n.to_string());
        }
        for p in &cfg.ro {
            cmd.arg("--ro").arg(p);
        }
        if command.starts_with('/') {
            cmd.arg("--ro").arg(command);
        }
        for (k, v) in &cfg.env {
            if !v.starts_with("secret:") {
                cmd.arg("--env").arg(format!("{k}={v}"));
            }
        }
        let secret = match secret_env {
            Some(env) if !env.is_empty() => {
                let (w, r, fd) = chitin_sandbox::secret_env::pass_to_child(&mut cmd)
                    .map_err(|e| start(format!("cannot pass its secrets: {e}")))?;
                cmd.arg("--env-fd").arg(fd.to_string());
                Some((w, r, env))
            }
            _ => None,
        };
        cmd.arg("--").arg(command).args(&cfg.args);
        let cap = cfg.max_result_bytes().max(1024 * 1024) + 64 * 1024;
        Ok(Conn::Stdio(stdio::StdioConn::spawn(
            name,
            cmd,
            secret,
            cap,
            self.on_refused(name),
        )?))
    }

    /// What happens when the server asks for something Chitin refuses (sampling, elicitation):
    /// an audit record (`kind = system`, action `mcp.server_request`, resource the method,
    /// outcome `refused`) and a log line. The server got a JSON-RPC error already.
    fn on_refused(&self, server: &str) -> wire::OnRefused {
        let audit = Arc::clone(self.gate.audit());
        let server = server.to_string();
        Arc::new(move |method: &str| {
            tracing::warn!(server = %server, method = %method.escape_default(), "refused an MCP server's request");
            let rec = chitin_audit::RecordInput::new(
                chitin_audit::Kind::System,
                format!("mcp:{server}"),
                "mcp.server_request",
                method.chars().take(200).collect::<String>(),
            )
            .with_outcome("refused")
            .with_payload(json!({
                "server": server,
                "method": method.chars().take(200).collect::<String>(),
                "reason": wire::refused_server_request(method).unwrap_or("not offered"),
            }));
            if let Err(e) = audit.append(rec) {
                tracing::error!(server = %server, error = %e, "the refusal of an MCP server's request could not be audited");
            }
        })
    }

    /// The configured headers of an HTTP server, each secret released through the gate
    /// (`secret.use` by `Chitin::Tool::"mcp:<name>"` for the URL's host). A header whose secret
    /// the policy does not allow keeps the server from starting: a server asked without its
    /// credentials would only fail later, less clearly.
    fn http_headers(
        &self,
        cfg: &McpServerConfig,
        url: &str,
    ) -> Result<Vec<http::Header>, McpError> {
        let name = &cfg.name;
        let start = |reason: String| McpError::Start {
            server: name.clone(),
            reason,
        };
        if cfg.headers.is_empty() {
            return Ok(Vec::new());
        }
        let Some(ts) = &self.secrets else {
            return Err(start(
                "its headers name secrets, and this runtime releases none".into(),
            ));
        };
        let host = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| {
                u.host_str()
                    .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
            })
            .ok_or_else(|| start("its url has no host".into()))?;
        let tool = format!("mcp:{name}");
        // Released once per connection, for no session's run (like a stdio server's env).
        let call = crate::gate::CallContext {
            user: self.owner.clone(),
            origin: crate::gate::Origin::Automation,
            session: format!("mcp:{name}"),
            workspace: self.launch.home.clone(),
            tainted: false,
        };
        let mut out = Vec::new();
        for (header, value) in &cfg.headers {
            let (prefix, secret) =
                crate::config::mcp::header_secret(name, header, value).map_err(start)?;
            let secret = crate::secrets::SecretName::parse(secret).map_err(start)?;
            let released = ts
                .release_header(&tool, &call, &secret, &host, header)
                .map_err(|e| start(e.to_string()))?;
            let Some(v) = released else {
                return Err(start(format!(
                    "policy did not allow secret `{secret}` for its header `{header}` (Cedar secret.use by Chitin::Tool::\"{tool}\" for host {host}; the secret's audience must name {host})"
                )));
            };
            let text = v
                .expose_str()
                .ok_or_else(|| start(format!("secret `{secret}` is not text")))?;
            out.push(http::Header::new(header, prefix, text).map_err(start)?);
        }
        Ok(out)
    }

    /// Starts (and initializes) the server.
    fn start(&self, cfg: &McpServerConfig) -> Result<(Conn, String), McpError> {
        let conn = match cfg.transport() {
            Transport::Stdio { command, .. } => self.spawn_stdio(cfg, command)?,
            Transport::Http { url } => Conn::Http(http::HttpConn::new(
                &cfg.name,
                url,
                self.http_headers(cfg, url)?,
                cfg.startup_timeout(),
                cfg.max_result_bytes().max(1024 * 1024),
                self.on_refused(&cfg.name),
            )?),
        };
        let init = conn.request(
            "initialize",
            wire::initialize_params(),
            cfg.startup_timeout(),
            None,
        );
        let version = init.and_then(|r| {
            wire::negotiated_version(&r).map_err(|message| McpError::Protocol {
                server: cfg.name.clone(),
                message,
            })
        });
        let version = match version {
            Ok(v) => v,
            Err(e) => {
                conn.stop("the start failed");
                return Err(e);
            }
        };
        if let Conn::Http(h) = &conn {
            h.set_version(&version);
        }
        if let Err(e) = conn.notify("notifications/initialized", json!({})) {
            conn.stop("the start failed");
            return Err(e);
        }
        Ok((conn, version))
    }

    /// The live connection of `slot` (started when needed, unless in backoff).
    fn conn(&self, slot: &Slot, st: &mut SlotState) -> Result<Arc<Conn>, McpError> {
        if let Some(c) = &st.conn {
            if c.alive() {
                return Ok(Arc::clone(c));
            }
            st.conn = None;
            st.listing = None;
        }
        if let Some(at) = st.retry_at
            && at > Instant::now()
        {
            return Err(McpError::Backoff {
                server: slot.cfg.name.clone(),
                failures: st.failures,
                secs: at
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1),
            });
        }
        match self.start(&slot.cfg) {
            Ok((c, v)) => {
                let c = Arc::new(c);
                st.conn = Some(Arc::clone(&c));
                st.version = Some(v);
                st.listing = None;
                st.retry_at = None;
                Ok(c)
            }
            Err(e) => {
                Self::failed(st);
                Err(e)
            }
        }
    }

    fn failed(st: &mut SlotState) {
        st.failures = st.failures.saturating_add(1);
        st.retry_at = Some(Instant::now() + backoff(st.failures));
        if let Some(c) = st.conn.take() {
            c.stop("it failed");
        }
        st.listing = None;
    }

    /// Handles the outcome of a request on `conn`: a dead or hung server is stopped and
    /// counts as a failure; a good answer resets the failures.
    fn settle<T>(st: &mut SlotState, r: Result<T, McpError>) -> Result<T, McpError> {
        match &r {
            Ok(_) => {
                st.failures = 0;
                st.retry_at = None;
            }
            Err(McpError::Timeout { .. } | McpError::Exited { .. } | McpError::Protocol { .. }) => {
                Self::failed(st);
            }
            Err(_) => {}
        }
        r
    }

    /// Asks the server for its tools (every page).
    fn list_now(&self, slot: &Slot, st: &mut SlotState) -> Result<Vec<ToolDef>, McpError> {
        let conn = self.conn(slot, st)?;
        let _ = conn.take_list_changed();
        let name = &slot.cfg.name;
        let listed = (|| {
            let mut all = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..wire::MAX_PAGES {
                let params = match &cursor {
                    Some(c) => json!({"cursor": c}),
                    None => json!({}),
                };
                let r = conn.request("tools/list", params, slot.cfg.startup_timeout(), None)?;
                let (page, next) =
                    wire::parse_tools_page(&r).map_err(|message| McpError::Protocol {
                        server: name.clone(),
                        message,
                    })?;
                all.extend(page);
                if all.len() > wire::MAX_TOOLS {
                    return Err(McpError::Protocol {
                        server: name.clone(),
                        message: format!("it lists more than {} tools", wire::MAX_TOOLS),
                    });
                }
                match next {
                    Some(c) => cursor = Some(c),
                    None => return Ok(all),
                }
            }
            Err(McpError::Protocol {
                server: name.clone(),
                message: format!("its tool list has more than {} pages", wire::MAX_PAGES),
            })
        })();
        let listed = Self::settle(st, listed)?;
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = listed.iter().find(|t| !seen.insert(t.name.clone())) {
            return Err(McpError::Protocol {
                server: name.clone(),
                message: format!("it lists the tool `{}` twice", dup.name.escape_default()),
            });
        }
        st.listing = Some(listed.clone());
        Ok(listed)
    }

    /// The listing: the cached one unless the server said it changed.
    fn listing(&self, slot: &Slot, st: &mut SlotState) -> Result<Vec<ToolDef>, McpError> {
        let changed = st.conn.as_ref().is_some_and(|c| c.take_list_changed());
        match (
            &st.listing,
            changed,
            st.conn.as_ref().is_some_and(|c| c.alive()),
        ) {
            (Some(l), false, true) => Ok(l.clone()),
            _ => self.list_now(slot, st),
        }
    }

    fn info(cfg: &McpServerConfig, def: &ToolDef) -> McpToolInfo {
        McpToolInfo {
            server: cfg.name.clone(),
            tool: def.name.clone(),
            title: def.title.clone(),
            description: def.description.clone(),
            input_schema: def.input_schema.clone(),
            risk: cfg.risk(&def.name).as_str(),
        }
    }

    /// The report of one server: its trust, and each listed (or pinned) tool's standing.
    /// Asks the server (starting it) even when nobody trusted it yet.
    pub fn report(&self, server: &str) -> Result<ServerReport, McpError> {
        let slot = self.slot(server)?;
        let cfg = &slot.cfg;
        let trust = self.pins.get(server)?;
        let identity_changed = trust
            .as_ref()
            .is_some_and(|t| t.identity != Self::identity(cfg));
        let (transport, target) = match cfg.transport() {
            Transport::Stdio { command, args } => {
                let mut t = vec![command.to_string()];
                t.extend(args.iter().cloned());
                ("stdio", t.join(" "))
            }
            Transport::Http { url } => ("http", url.to_string()),
        };
        let mut st = slot
            .state
            .lock()
            .map_err(|_| McpError::Store("a server's lock was poisoned".into()))?;
        let (listed, error) = match self.list_now(slot, &mut st) {
            Ok(l) => (l, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let pins = trust.as_ref().map(|t| t.pins.clone()).unwrap_or_default();
        let mut tools: Vec<ToolReport> = listed
            .iter()
            .map(|d| {
                let status = if let Some(why) = wire::unusable(server, d) {
                    ToolStatus::Unusable(why)
                } else {
                    match pins.get(&d.name) {
                        Some(p) if *p == d.digest && !identity_changed => ToolStatus::Trusted,
                        Some(p) if *p == d.digest => ToolStatus::Changed,
                        Some(_) => ToolStatus::Changed,
                        None => ToolStatus::New,
                    }
                };
                ToolReport {
                    name: d.name.clone(),
                    status,
                    risk: cfg.risk(&d.name).as_str(),
                    def: Some(d.clone()),
                }
            })
            .collect();
        if error.is_none() {
            for name in pins.keys() {
                if !listed.iter().any(|d| &d.name == name) {
                    tools.push(ToolReport {
                        name: name.clone(),
                        status: ToolStatus::Removed,
                        risk: cfg.risk(name).as_str(),
                        def: None,
                    });
                }
            }
        }
        Ok(ServerReport {
            name: server.to_string(),
            transport,
            target,
            trust,
            identity_changed,
            protocol: st.version.clone(),
            tools,
            error,
        })
    }

    /// Pins the server's current tool list (`chitin mcp trust`): asks the server, records the
    /// digest of every definition and of the whole list. The caller decided `mcp.trust`.
    pub fn trust(&self, server: &str, by: &str, now_ms: i64) -> Result<Vec<ToolDef>, McpError> {
        let slot = self.slot(server)?;
        let mut st = slot
            .state
            .lock()
            .map_err(|_| McpError::Store("a server's lock was poisoned".into()))?;
        let listed = self.list_now(slot, &mut st)?;
        self.pins.trust(
            server,
            &Self::identity(&slot.cfg),
            &wire::list_digest(&listed),
            &listed,
            now_ms,
            by,
        )?;
        Ok(listed)
    }

    /// Drops the server's pins (`chitin mcp untrust`); whether it was trusted. The caller
    /// decided `mcp.trust`.
    pub fn untrust(&self, server: &str) -> Result<bool, McpError> {
        self.slot(server)?;
        self.pins.untrust(server)
    }

    /// The trusted, unchanged tools of one server (asks it for its list).
    fn offered_by(&self, slot: &Slot) -> Result<Vec<McpToolInfo>, McpError> {
        let cfg = &slot.cfg;
        let Some(trust) = self.pins.get(&cfg.name)? else {
            return Ok(Vec::new());
        };
        if trust.identity != Self::identity(cfg) {
            tracing::warn!(server = %cfg.name, "MCP server's command line or URL changed since it was trusted: no tool offered until `chitin mcp trust` again");
            return Ok(Vec::new());
        }
        let mut st = slot
            .state
            .lock()
            .map_err(|_| McpError::Store("a server's lock was poisoned".into()))?;
        let listed = self.list_now(slot, &mut st)?;
        let mut out = Vec::new();
        for d in &listed {
            if wire::unusable(&cfg.name, d).is_some() {
                continue;
            }
            match trust.pins.get(&d.name) {
                Some(p) if *p == d.digest => out.push(Self::info(cfg, d)),
                Some(_) => {
                    tracing::warn!(server = %cfg.name, tool = %d.name, "MCP tool changed since it was trusted: withheld until `chitin mcp trust` again");
                }
                None => {
                    tracing::info!(server = %cfg.name, tool = %d.name, "new MCP tool: withheld until `chitin mcp trust`");
                }
            }
        }
        Ok(out)
    }
}

/// The refusal of a tool whose definition is not the pinned one any more.
fn changed(server: &str, tool: &str) -> String {
    format!(
        "MCP tool `{tool}` of `{server}` changed (its description or schema, or it is gone) since it was trusted; it is withheld until an owner runs `chitin mcp trust {server}` again"
    )
}

impl Hub {
    /// The server's trust record, when it is trusted under its current identity.
    fn trusted(&self, server: &str) -> Result<pins::Trust, String> {
        let slot = self.slot(server).map_err(|e| e.to_string())?;
        let trust = self
            .pins
            .get(server)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "MCP server `{server}` is not trusted; an owner must review its tools and run `chitin mcp trust {server}`"
                )
            })?;
        if trust.identity != Self::identity(&slot.cfg) {
            return Err(format!(
                "MCP server `{server}`'s command line or URL changed since it was trusted; an owner must run `chitin mcp trust {server}` again"
            ));
        }
        Ok(trust)
    }
}

impl McpTools for Hub {
    fn offered(&self) -> Vec<McpToolInfo> {
        let mut out = Vec::new();
        for slot in &self.slots {
            match self.offered_by(slot) {
                Ok(t) => out.extend(t),
                Err(e) => {
                    tracing::warn!(server = %slot.cfg.name, error = %e, "MCP server offers no tools now");
                }
            }
        }
        out
    }

    /// Decides nothing and starts nothing: the tool must be pinned (and the server's identity
    /// unchanged). When the server is running, its current listing (asked again if it said
    /// the list changed) must still match the pin; otherwise the pinned definition is used and
    /// [`Self::call`] checks the live one before sending anything.
    fn resolve(&self, server: &str, tool: &str) -> Result<McpToolInfo, String> {
        let slot = self.slot(server).map_err(|e| e.to_string())?;
        let cfg = &slot.cfg;
        let trust = self.trusted(server)?;
        let Some(pin) = trust.pins.get(tool) else {
            return Err(format!(
                "MCP tool `{}` of `{server}` is not trusted (new, or unknown); it is withheld until an owner runs `chitin mcp trust {server}`",
                tool.escape_default()
            ));
        };
        let mut st = slot
            .state
            .lock()
            .map_err(|_| "a server's lock was poisoned".to_string())?;
        let running = st.conn.as_ref().is_some_and(|c| c.alive());
        let def = if running {
            let listed = self.listing(slot, &mut st).map_err(|e| e.to_string())?;
            let Some(def) = listed.into_iter().find(|d| d.name == tool) else {
                return Err(format!(
                    "MCP server `{server}` no longer lists the tool `{}`",
                    tool.escape_default()
                ));
            };
            if def.digest != *pin {
                return Err(changed(server, tool));
            }
            def
        } else {
            let raw = trust
                .definitions
                .get(tool)
                .cloned()
                .ok_or_else(|| format!("the pin of MCP tool `{tool}` has no definition"))?;
            let (mut defs, _) = wire::parse_tools_page(&json!({ "tools": [raw] }))?;
            defs.pop()
                .ok_or_else(|| format!("the pin of MCP tool `{tool}` has no definition"))?
        };
        if let Some(why) = wire::unusable(server, &def) {
            return Err(format!(
                "MCP tool `{}` cannot be used: {why}",
                tool.escape_default()
            ));
        }
        Ok(Self::info(cfg, &def))
    }

    fn call(
        &self,
        auth: &Authorized,
        server: &str,
        tool: &str,
        args: &Value,
        cancel: Option<&Cancel>,
    ) -> Result<McpOutput, String> {
        if auth.action() != Action::McpCall
            || auth.resource() != crate::tools::mcp::resource_uid(server, tool)
            || !auth.covers_args(args)
        {
            return Err("the authorization does not cover this MCP call".into());
        }
        let slot = self.slot(server).map_err(|e| e.to_string())?;
        let cfg = &slot.cfg;
        // The slot is held only to get the connection and check the definition: before
        // anything is sent, the tool the server lists now must still be the pinned one.
        let trust = self.trusted(server)?;
        let conn = {
            let mut st = slot
                .state
                .lock()
                .map_err(|_| "a server's lock was poisoned".to_string())?;
            let conn = self.conn(slot, &mut st).map_err(|e| e.to_string())?;
            let listed = self.listing(slot, &mut st).map_err(|e| e.to_string())?;
            let live = listed.iter().find(|d| d.name == tool).map(|d| &d.digest);
            if live.is_none() || live != trust.pins.get(tool) {
                return Err(changed(server, tool));
            }
            conn
        };
        let r = conn.request(
            "tools/call",
            json!({"name": tool, "arguments": args}),
            cfg.timeout(),
            cancel,
        );
        let r = r.and_then(|v| {
            let bytes = v.to_string().len();
            if bytes > cfg.max_result_bytes() {
                return Err(McpError::TooLarge {
                    server: server.to_string(),
                    bytes,
                    max: cfg.max_result_bytes(),
                });
            }
            wire::call_output(&v).map_err(|message| McpError::Protocol {
                server: server.to_string(),
                message,
            })
        });
        let mut st = slot
            .state
            .lock()
            .map_err(|_| "a server's lock was poisoned".to_string())?;
        // Only the connection this call used is judged (another call may have restarted it).
        let same = st.conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn));
        if same {
            Self::settle(&mut st, r).map_err(|e| e.to_string())
        } else {
            if matches!(r, Err(McpError::Timeout { .. })) {
                conn.stop("it timed out");
            }
            r.map_err(|e| e.to_string())
        }
    }
}

/// The JSON `chitin mcp list --json` prints for one server.
pub fn report_json(r: &ServerReport) -> Value {
    let tools: Vec<Value> = r
        .tools
        .iter()
        .map(|t| {
            let mut m = Map::new();
            m.insert("name".into(), json!(t.name));
            m.insert(
                "full_name".into(),
                json!(crate::tools::mcp::tool_name(&r.name, &t.name)),
            );
            m.insert("status".into(), json!(t.status.as_str()));
            if let ToolStatus::Unusable(why) = &t.status {
                m.insert("reason".into(), json!(why));
            }
            m.insert("risk".into(), json!(t.risk));
            if let Some(d) = &t.def {
                m.insert("description".into(), json!(d.description));
                m.insert("digest".into(), json!(d.digest));
            }
            Value::Object(m)
        })
        .collect();
    json!({
        "name": r.name,
        "transport": r.transport,
        "target": r.target,
        "trusted": r.trust.is_some(),
        "trusted_by": r.trust.as_ref().map(|t| t.trusted_by.clone()),
        "trusted_ms": r.trust.as_ref().map(|t| t.trusted_ms),
        "identity_changed": r.identity_changed,
        "protocol": r.protocol,
        "error": r.error,
        "tools": tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_wait_longer_the_more_a_server_keeps_failing() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::ZERO);
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(60));
    }
}
