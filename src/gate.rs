//! The gate: the only place that turns a policy decision into permission to act.
//!
//! Invariants:
//! - Only this module constructs [`Authorized`]. Tools, secret release and sandbox launches
//!   take an `&Authorized`, so nothing runs without an `allow` from the policy engine.
//! - Paths are canonicalized here (symlinks resolved, `..` removed) before they reach Cedar;
//!   a path that cannot be canonicalized is refused as invalid input, never passed raw.
//! - A request the engine cannot evaluate (malformed context, unknown action) is a deny.
//! - Every decision (and every refusal of bad input) is written to the audit log before the
//!   verdict is returned; if the record cannot be written, the verdict is "no" (fail closed).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cedar_policy::EntityUid;
use chitin_audit::{AuditLog, GateDecision, RecordInput};
use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::net::{Resolver, SystemResolver, WebUrl};
use crate::policy::{Action, Decision, Outcome, PolicyEngine, PolicyError, PolicyRequest, Tool};

/// Errors of the gate. Every one of them means "no action".
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("audit log unavailable, so nothing is allowed: {0}")]
    AuditUnavailable(String),
    #[error(
        "the approval presented was granted for a different request; this call needs its own approval"
    )]
    ApprovalMismatch,
    #[error("web_fetch: {0}; nothing was fetched")]
    Unresolvable(String),
}

/// Proof that the policy engine allowed one specific request. It cannot be built outside
/// `gate`, and it names exactly what was allowed.
#[derive(Debug)]
pub struct Authorized {
    principal: String,
    action: Action,
    resource: String,
    policies: Vec<String>,
    request_digest: [u8; 32],
    /// SHA-256 of the canonical tool arguments this authorization covers (tool calls only).
    args_digest: Option<[u8; 32]>,
    /// `web_fetch`: the addresses the second decision judged; the fetch connects to exactly
    /// these (it never resolves the host itself).
    pinned: Vec<SocketAddr>,
}

impl Authorized {
    /// An authorization for `decision`, with the principal, resource and request digest the
    /// gate computed for the decision's record (computed once for both).
    fn new(
        action: Action,
        principal: String,
        resource: String,
        decision: &Decision,
        request_digest: [u8; 32],
        args: Option<&Value>,
    ) -> Self {
        Self {
            principal,
            action,
            resource,
            policies: decision.policies.clone(),
            request_digest,
            args_digest: args.map(args_digest),
            pinned: Vec::new(),
        }
    }

    /// Whether this authorization covers exactly these tool arguments. An authorization that
    /// was not given for a tool call covers no arguments at all.
    pub fn covers_args(&self, args: &Value) -> bool {
        match self.args_digest {
            Some(d) => d == args_digest(args),
            None => cfg!(test) && self.policies == ["test"],
        }
    }

    /// Only for unit tests inside this crate.
    #[cfg(test)]
    #[allow(
        dead_code,
        reason = "used by unit tests of modules that take an Authorized"
    )]
    #[expect(
        clippy::panic,
        reason = "test helper: an unknown action id is a bug in the test"
    )]
    pub(crate) fn for_test(principal: &str, action: &str, resource: &str) -> Self {
        let Some(action) = Action::from_id(action) else {
            panic!("`{action}` is not an action id");
        };
        Self {
            principal: principal.into(),
            action,
            resource: resource.into(),
            policies: vec!["test".into()],
            request_digest: [0; 32],
            args_digest: None,
            pinned: Vec::new(),
        }
    }

    /// The Cedar principal, e.g. `Chitin::User::"alice"`.
    pub fn principal(&self) -> &str {
        &self.principal
    }
    /// The action that was allowed.
    pub fn action(&self) -> Action {
        self.action
    }
    /// The Cedar resource, e.g. `Chitin::Tool::"exec"`.
    pub fn resource(&self) -> &str {
        &self.resource
    }
    /// The ids of the policies that allowed it.
    pub fn policies(&self) -> &[String] {
        &self.policies
    }
    /// SHA-256 of the canonical request (without `approved`): what an approval is bound to.
    pub fn request_digest(&self) -> &[u8; 32] {
        &self.request_digest
    }
    /// `web_fetch`: the resolved addresses the gate judged, the only ones to connect to
    /// (empty for every other action).
    pub fn pinned_addrs(&self) -> &[SocketAddr] {
        &self.pinned
    }
}

/// Proof that a granted approval for one exact request was just redeemed (marked `used`,
/// once). Only `approvals::Approvals::redeem` makes one (the constructor is crate-visible, and
/// `tests/architecture_layers.rs` fails if any other module calls it); the gate decides a call
/// as approved only with it, and only when its digest is the digest of the call being decided.
#[derive(Debug)]
pub struct Redeemed {
    digest: [u8; 32],
}

impl Redeemed {
    /// Made by `Approvals::redeem` after it marked the approval used, in the same transaction.
    pub(crate) fn after_redemption(digest: [u8; 32]) -> Self {
        Self { digest }
    }
    /// The request digest the approval was bound to.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
}

/// The gate's answer.
#[derive(Debug)]
pub enum Verdict {
    /// Go ahead: the proof to hand to the tool, secret store or sandbox.
    Allowed(Authorized, Decision),
    /// No.
    Denied(Decision),
    /// Only with an approval bound to `request_digest`.
    ApprovalRequired {
        decision: Decision,
        request_digest: [u8; 32],
        /// What the gate resolved that the call's arguments do not say (canonical `path` and
        /// `cwd`, the program's `command_path`): the digest binds it, so an approval shows it.
        resolved: Map<String, Value>,
    },
}

/// The context keys the gate resolves (they can differ from what the arguments say).
const RESOLVED_KEYS: &[&str] = &["path", "cwd", "command_path"];

/// The resolved part of a request's context, for showing with an approval.
fn resolved_of(req: &PolicyRequest) -> Map<String, Value> {
    RESOLVED_KEYS
        .iter()
        .filter_map(|k| req.context.get(*k).map(|v| ((*k).to_string(), v.clone())))
        .collect()
}

impl Verdict {
    /// The decision behind the verdict.
    pub fn decision(&self) -> &Decision {
        match self {
            Self::Allowed(_, d) | Self::Denied(d) | Self::ApprovalRequired { decision: d, .. } => d,
        }
    }
}

/// SHA-256 over the canonical JSON (sorted keys) of principal, action, resource and the
/// context without `approved`: the identity of "this exact request".
pub fn request_digest(req: &PolicyRequest) -> [u8; 32] {
    request_digest_with(req, None)
}

/// [`request_digest`] that also covers a tool call's full arguments, so an approval for one
/// call (its argv, file content, network destinations, ...) never approves another.
pub fn request_digest_with(req: &PolicyRequest, args: Option<&Value>) -> [u8; 32] {
    // The canonical JSON of `{"action", "args" (if any), "context" (without `approved`),
    // "principal", "resource"}` (the keys in their sorted order), written directly rather
    // than built as a document and copied.
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"{\"action\":");
    write_json(&mut out, req.action.to_string().as_str());
    if let Some(a) = args {
        out.extend_from_slice(b",\"args\":");
        write_canonical(a, &mut out);
    }
    out.extend_from_slice(b",\"context\":");
    write_canonical_object(
        req.context.iter().filter(|(k, _)| k.as_str() != "approved"),
        &mut out,
    );
    out.extend_from_slice(b",\"principal\":");
    write_json(&mut out, req.principal.to_string().as_str());
    out.extend_from_slice(b",\"resource\":");
    write_json(&mut out, req.resource.to_string().as_str());
    out.push(b'}');
    Sha256::digest(&out).into()
}

/// The digest an approval of a call decided on several requests binds
/// ([`Gate::check_calls`]): SHA-256 over a domain string and each request's digest (with the
/// arguments).
pub fn calls_digest(reqs: &[PolicyRequest], args: &Value) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"chitin-calls-v1\0");
    for r in reqs {
        h.update(request_digest_with(r, Some(args)));
    }
    h.finalize().into()
}

fn args_digest(args: &Value) -> [u8; 32] {
    let mut s = String::new();
    canonical_json(args, &mut s);
    Sha256::digest(s.as_bytes()).into()
}

/// Applies `redact` to every string value of a JSON document, in place (keys are left alone:
/// they are names chosen by Chitin, not data). The one walker for audit payloads and tool
/// results.
pub fn redact_json_strings(v: &mut serde_json::Value, redact: &dyn Fn(&str) -> String) {
    match v {
        serde_json::Value::String(s) => *s = redact(s),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| redact_json_strings(x, redact)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| redact_json_strings(x, redact)),
        _ => {}
    }
}

/// Writes JSON with object keys sorted (recursively) and no insignificant whitespace.
pub fn canonical_json(v: &Value, out: &mut String) {
    let mut bytes = std::mem::take(out).into_bytes();
    write_canonical(v, &mut bytes);
    // serde_json's strings and numbers and ASCII punctuation: UTF-8 by construction.
    *out = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
}

/// [`canonical_json`] into bytes: strings and numbers as serde_json writes them.
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => write_canonical_object(m.iter(), out),
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        other => write_json(out, other),
    }
}

/// An object of these members, keys sorted (byte order; a map's keys are distinct).
fn write_canonical_object<'a>(
    members: impl Iterator<Item = (&'a String, &'a Value)>,
    out: &mut Vec<u8>,
) {
    let mut members: Vec<(&String, &Value)> = members.collect();
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(out, k.as_str());
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

/// A string or scalar as serde_json writes it (what `Value::to_string` gives). Writing into a
/// `Vec` cannot fail, nor can serializing a string or a JSON scalar.
fn write_json(out: &mut Vec<u8>, v: &(impl Serialize + ?Sized)) {
    let _ = serde_json::to_writer(out, v);
}

/// Where a tool request comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Model,
    User,
    Automation,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::User => "user",
            Self::Automation => "automation",
        }
    }
}

/// Who asks, in which session, over which workspace.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The user on whose behalf the agent acts (the Cedar principal `Chitin::User::"<id>"`).
    pub user: String,
    pub origin: Origin,
    pub session: String,
    /// The agent workspace (canonicalized by the gate).
    pub workspace: PathBuf,
    /// The session has taken in untrusted content (tool output, fetched pages, messages from
    /// non-owners); policies see it as `context.tainted`.
    pub tainted: bool,
}

/// The workflow step a tool call (or model call) is made for: named in the Cedar context as
/// `workflow`, `workflow_digest` and `step`, and covered by the request digest, so an approval
/// of one step's call never approves the same call in another workflow or step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepContext {
    /// The workflow's name (`Chitin::Workflow::"<name>"`).
    pub workflow: String,
    /// `sha256:<hex>` of the workflow file.
    pub workflow_digest: String,
    /// The step id (a branch or sub-step id inside `parallel` / `for_each`).
    pub step: String,
}

impl StepContext {
    /// Adds the three attributes to a Cedar context.
    pub fn insert_into(&self, ctx: &mut Map<String, Value>) {
        ctx.insert("workflow".into(), json!(self.workflow));
        ctx.insert("workflow_digest".into(), json!(self.workflow_digest));
        ctx.insert("step".into(), json!(self.step));
    }
}

/// A built-in tool call as the gate sees it (arguments already parsed strictly).
#[derive(Debug, Clone)]
pub enum ToolInput {
    Exec {
        argv: Vec<String>,
        cwd: Option<String>,
        network: bool,
    },
    ReadFile {
        path: String,
    },
    ListDir {
        path: String,
    },
    WriteFile {
        path: String,
    },
    EditFile {
        path: String,
    },
    /// `same_conversation` is derived by the gate (target == the calling session).
    SendMessage {
        channel: String,
        target: String,
    },
    /// Decided twice (see [`Gate::check_tool_call`]): first on the URL as written (no DNS),
    /// then, after an allow, on every address the host resolves to.
    WebFetch {
        url: String,
        method: String,
    },
}

impl ToolInput {
    /// What the gate judges, derived from a tool call's normalized arguments (the same JSON the
    /// tool will run with): one source of truth for Cedar's context and for the run.
    pub fn from_args(tool: Tool, args: &Value) -> Result<Self, GateError> {
        let bad = |m: &str| GateError::InvalidRequest(format!("{tool}: {m}"));
        let path = |default: Option<&str>| -> Result<String, GateError> {
            match args.get("path") {
                Some(Value::String(p)) => Ok(p.clone()),
                None => default
                    .map(str::to_string)
                    .ok_or_else(|| bad("missing `path`")),
                Some(_) => Err(bad("`path` must be a string")),
            }
        };
        Ok(match tool {
            Tool::Exec => {
                let argv = args
                    .get("argv")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("missing `argv`"))?
                    .iter()
                    .map(|a| {
                        a.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("`argv` must be strings"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let cwd = match args.get("cwd") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(c)) => Some(c.clone()),
                    Some(_) => return Err(bad("`cwd` must be a string")),
                };
                let network = match args.get("network") {
                    None | Some(Value::Null) => false,
                    Some(Value::Array(a)) => !a.is_empty(),
                    Some(_) => return Err(bad("`network` must be a list of HOST:PORT")),
                };
                Self::Exec { argv, cwd, network }
            }
            Tool::ReadFile => Self::ReadFile { path: path(None)? },
            Tool::ListDir => Self::ListDir {
                path: path(Some("."))?,
            },
            Tool::WriteFile => Self::WriteFile { path: path(None)? },
            Tool::EditFile => Self::EditFile { path: path(None)? },
            Tool::SendMessage => {
                let s = |k: &str| match args.get(k) {
                    Some(Value::String(v)) => Ok(v.clone()),
                    _ => Err(bad(&format!("`{k}` must be a string"))),
                };
                Self::SendMessage {
                    channel: s("channel")?,
                    target: s("target")?,
                }
            }
            Tool::WebFetch => {
                let url = match args.get("url") {
                    Some(Value::String(v)) => v.clone(),
                    _ => return Err(bad("`url` must be a string")),
                };
                let method = match args.get("method") {
                    None | Some(Value::Null) => "GET".to_string(),
                    Some(Value::String(m)) => m.to_ascii_uppercase(),
                    Some(_) => return Err(bad("`method` must be a string")),
                };
                Self::WebFetch { url, method }
            }
            Tool::Workflow => {
                return Err(bad(
                    "is decided by the workflow runner (`workflow.run` on the workflow), not as a tool call",
                ));
            }
            Tool::WebSearch
            | Tool::ApplyPatch
            | Tool::MemorySearch
            | Tool::MemoryGet
            | Tool::SessionsList
            | Tool::SessionsHistory
            | Tool::SessionsSend
            | Tool::Browser => {
                return Err(bad(
                    "is decided by its own module in `tools` (`Gate::check_call` / `check_calls`), not as a built-in tool input",
                ));
            }
        })
    }

    /// The tool (decided as the action of the same name).
    pub fn tool(&self) -> Tool {
        match self {
            Self::Exec { .. } => Tool::Exec,
            Self::ReadFile { .. } => Tool::ReadFile,
            Self::ListDir { .. } => Tool::ListDir,
            Self::WriteFile { .. } => Tool::WriteFile,
            Self::EditFile { .. } => Tool::EditFile,
            Self::SendMessage { .. } => Tool::SendMessage,
            Self::WebFetch { .. } => Tool::WebFetch,
        }
    }
}

/// Whether `send_message` to `target` of `channel` answers the calling session's own
/// conversation: the target is the session itself (`chitin`, or a channel's session key
/// `channel:<name>:...`), or `<kind>:<dm|group>:<chat id>` naming the chat that session is
/// (a forum topic's session is only matched by its session key).
fn same_conversation(channel: &str, target: &str, session: &str) -> bool {
    let part = |s: &str| s.replace('%', "%25").replace(':', "%3A");
    let prefix = format!("channel:{}:", part(channel));
    if channel == "chitin" {
        return target == session;
    }
    if !session.starts_with(&prefix) {
        return false;
    }
    if target == session {
        return true;
    }
    let mut it = target.splitn(3, ':');
    match (it.next(), it.next(), it.next()) {
        (Some(_kind), Some(k @ ("dm" | "group")), Some(chat)) if !chat.is_empty() => {
            format!("{prefix}{k}:{}", part(chat)) == session
        }
        _ => false,
    }
}

/// The directories searched for a bare program name (the sandbox's PATH).
pub const TOOL_PATH: &[&str] = &[
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
];

/// Replaces secret values (and their encodings) in text bound for the audit log.
pub type Redact = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// The gate.
#[derive(Clone)]
pub struct Gate {
    engine: Arc<PolicyEngine>,
    audit: Arc<AuditLog>,
    redact: Option<Redact>,
    /// Resolves `web_fetch` hosts, only after a first allow.
    resolver: Arc<dyn Resolver>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// A gate deciding with `engine` and recording every decision in `audit`.
    pub fn new(engine: Arc<PolicyEngine>, audit: Arc<AuditLog>) -> Self {
        Self {
            engine,
            audit,
            redact: None,
            resolver: Arc::new(SystemResolver),
        }
    }

    /// Resolves `web_fetch` hosts with `resolver` instead of the system resolver.
    #[must_use]
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolver>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The resolver the gate asks DNS through (the browser's egress proxy uses it too).
    pub fn resolver(&self) -> Arc<dyn Resolver> {
        Arc::clone(&self.resolver)
    }

    /// Resolves `host` through the gate's resolver: only after a first allow of a request
    /// that names it (the browser's `browser.navigate`, like `web_fetch`).
    pub fn resolve(&self, host: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        self.resolver.resolve(host, port)
    }

    /// Redacts every string of a decision's payload before it is recorded.
    #[must_use]
    pub fn with_redactor(mut self, redact: Redact) -> Self {
        self.redact = Some(redact);
        self
    }

    /// The audit log decisions are written to.
    pub fn audit(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    /// Redacts one text with the gate's redactor (identity when none is installed).
    pub fn redact(&self, text: &str) -> String {
        self.redact
            .as_ref()
            .map_or_else(|| text.to_string(), |r| r(text))
    }

    fn redacted(&self, v: &Value) -> Value {
        let mut out = v.clone();
        if let Some(r) = &self.redact {
            redact_json_strings(&mut out, &|s| r(s));
        }
        out
    }

    fn record(&self, input: RecordInput) -> Result<(), GateError> {
        self.audit
            .append(input)
            .map(|_| ())
            .map_err(|e| GateError::AuditUnavailable(e.to_string()))
    }

    /// Records a request that never reached a decision (bad input) as a deny.
    fn record_refusal(
        &self,
        actor: &str,
        action: &str,
        resource: &str,
        why: &str,
        details: Value,
    ) -> Result<(), GateError> {
        self.record(
            RecordInput::gate_decision(
                actor,
                action,
                resource,
                GateDecision::Deny,
                Vec::new(),
                self.redacted(&details),
            )
            .with_outcome(format!(
                "refused: {}",
                self.redacted(&Value::String(why.into()))
                    .as_str()
                    .unwrap_or("")
            )),
        )
    }

    /// Re-reads policies and entities (the set is swapped whole or not at all) and records the
    /// reload, successful or not, as an admin action by `actor`.
    pub fn reload_policies(&self, actor: &str) -> Result<crate::policy::LoadReport, GateError> {
        let result = self.engine.reload();
        let (outcome, payload) = match &result {
            Ok(r) => (
                "ok".to_string(),
                json!({"source": r.source, "policies": r.policies, "shadow": r.shadow, "files": r.files}),
            ),
            Err(e) => (
                "rejected: the last good policy set stays active".to_string(),
                json!({"error": e.to_string()}),
            ),
        };
        self.record(
            RecordInput::admin(actor, "policy.reload", "policies", payload).with_outcome(outcome),
        )?;
        result.map_err(GateError::from)
    }

    /// The policy engine behind the gate.
    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    /// Decides any request (admin actions, secret use, admission, ...) and records the
    /// decision. A malformed request is recorded as a refusal and returned as an error.
    pub fn check(&self, req: &PolicyRequest) -> Result<Verdict, GateError> {
        self.check_bound(req, None, &[])
    }

    /// Decides the requests of one listing together and records them as ONE decision record
    /// (the Control UI's lists are decided per owner of what they show; a page is one record,
    /// not one per owner). All requests have the same principal and action; the first one
    /// gates the listing (the caller's own items), so the record names the first request's
    /// resource and outcome, the determining policies of every request, and in its payload
    /// (`listing`) each request's resource, context (redacted), outcome, policies, shadow
    /// policies and errors. Shadow differences add one `shadow_*` record, as for
    /// [`Self::check`]. Returns each request's decision, in order. No `Authorized` is made:
    /// a listing only reads, and the caller filters what it shows by these decisions.
    pub fn check_listing(&self, reqs: &[PolicyRequest]) -> Result<Vec<Decision>, GateError> {
        let [first, ..] = reqs else {
            return Ok(Vec::new());
        };
        let actor = first.principal.to_string();
        let action = first.action_name();
        let resource = first.resource.to_string();
        let refuse = |why: String, ctx: &Map<String, Value>| -> Result<GateError, GateError> {
            let e = GateError::InvalidRequest(why);
            self.record_refusal(
                &actor,
                &action,
                &resource,
                &e.to_string(),
                Value::Object(ctx.clone()),
            )?;
            Ok(e)
        };
        match first.chitin_action() {
            Some(a) if a != Action::SecretUse => {}
            _ => {
                return Err(refuse(
                    format!(
                        "`{}` cannot be decided as a listing; the gate lists only Chitin's read actions",
                        first.action
                    ),
                    &first.context,
                )?);
            }
        }
        let mut decisions = Vec::with_capacity(reqs.len());
        for r in reqs {
            if r.principal != first.principal || r.action != first.action {
                return Err(refuse(
                    "a listing is decided for one principal and one action".into(),
                    &r.context,
                )?);
            }
            match self.engine.decide_with_entities(r, &[]) {
                Ok(d) => decisions.push(d),
                Err(e) => {
                    self.record_refusal(
                        &actor,
                        &action,
                        &r.resource.to_string(),
                        &e.to_string(),
                        Value::Object(r.context.clone()),
                    )?;
                    return Err(e.into());
                }
            }
        }
        let mut policies: Vec<String> = Vec::new();
        let mut shadow: Vec<String> = Vec::new();
        for d in &decisions {
            for p in &d.policies {
                if !policies.contains(p) {
                    policies.push(p.clone());
                }
            }
            for p in &d.shadow {
                if !shadow.contains(p) {
                    shadow.push(p.clone());
                }
            }
        }
        let items: Vec<Value> = reqs
            .iter()
            .zip(&decisions)
            .map(|(r, d)| {
                json!({
                    "resource": r.resource.to_string(),
                    "context": self.redacted(&Value::Object(r.context.clone())),
                    "decision": d.decision.as_str(),
                    "policies": d.policies,
                    "shadow": d.shadow,
                    "shadow_decision": d.shadow_decision.map(Outcome::as_str),
                    "errors": d.errors,
                })
            })
            .collect();
        let gate_decision = |o: Outcome| match o {
            Outcome::Allow => GateDecision::Allow,
            Outcome::Deny => GateDecision::Deny,
            Outcome::ApprovalRequired => GateDecision::ApprovalRequired,
        };
        let outcome = decisions.first().map_or(Outcome::Deny, |d| d.decision);
        self.record(RecordInput::gate_decision(
            &actor,
            &action,
            &resource,
            gate_decision(outcome),
            policies,
            json!({"listing": items, "requests": reqs.len()}),
        ))?;
        let would: Vec<Outcome> = decisions.iter().filter_map(|d| d.shadow_decision).collect();
        if !would.is_empty() {
            let label = if would.contains(&Outcome::Deny) {
                GateDecision::ShadowDeny
            } else if would.contains(&Outcome::Allow) {
                GateDecision::ShadowAllow
            } else {
                GateDecision::ShadowApprovalRequired
            };
            self.record(
                RecordInput::gate_decision(
                    &actor,
                    &action,
                    &resource,
                    label,
                    shadow,
                    json!({"enforced": outcome.as_str(), "listing": reqs.len()}),
                )
                .with_outcome(format!(
                    "not enforced in {} of {} listed requests",
                    would.len(),
                    reqs.len()
                )),
            )?;
        }
        Ok(decisions)
    }

    /// [`Self::check`] with request-specific entities (Cedar entity JSON) added for this
    /// decision only, e.g. the `Skill` entity built from a verified signature. They are
    /// recorded with the decision.
    pub fn check_with_entities(
        &self,
        req: &PolicyRequest,
        extra: &[Value],
    ) -> Result<Verdict, GateError> {
        self.check_bound(req, None, extra)
    }

    /// [`Self::check_with_entities`] for a request that an approval may cover (`workflow.run`
    /// of a file the model wrote): the request is decided as approved (`context.approved`
    /// true) only with a [`Redeemed`] approval whose digest is this request's digest (made
    /// only by `Approvals::redeem`); `approved` is false otherwise, whatever the caller put in
    /// the context.
    pub fn check_redeemed(
        &self,
        req: &PolicyRequest,
        extra: &[Value],
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        let mut req = req.clone();
        req.context.insert("approved".into(), json!(false));
        if let Some(r) = redeemed {
            if r.digest() != &request_digest(&req) {
                let e = GateError::ApprovalMismatch;
                self.record_refusal(
                    &req.principal.to_string(),
                    &req.action_name(),
                    &req.resource.to_string(),
                    &e.to_string(),
                    Value::Object(req.context.clone()),
                )?;
                return Err(e);
            }
            req.context.insert("approved".into(), json!(true));
        }
        self.check_bound(&req, None, extra)
    }

    /// [`Self::decide_bound`] inside a `gate.decision` span: the action, the resource, the
    /// outcome and the determining policy ids (never the context or the arguments).
    fn check_bound(
        &self,
        req: &PolicyRequest,
        args: Option<&Value>,
        extra: &[Value],
    ) -> Result<Verdict, GateError> {
        let span = tracing::info_span!(
            "gate.decision",
            chitin.action = %req.action_name(),
            chitin.resource = %req.resource,
            chitin.decision = tracing::field::Empty,
            chitin.policy_ids = tracing::field::Empty,
            chitin.shadow_policy_ids = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let _in = span.enter();
        let verdict = self.decide_bound(req, args, extra);
        let (outcome, d) = match &verdict {
            Ok(Verdict::Allowed(_, d)) => ("allow", Some(d)),
            Ok(Verdict::Denied(d)) => ("deny", Some(d)),
            Ok(Verdict::ApprovalRequired { decision, .. }) => ("approval_required", Some(decision)),
            Err(_) => ("refused", None),
        };
        span.record("chitin.decision", outcome);
        if let Some(d) = d {
            span.record("chitin.policy_ids", d.policies.join(",").as_str());
            if !d.shadow.is_empty() {
                span.record("chitin.shadow_policy_ids", d.shadow.join(",").as_str());
            }
        } else {
            span.record("otel.status_code", "ERROR");
        }
        verdict
    }

    fn decide_bound(
        &self,
        req: &PolicyRequest,
        args: Option<&Value>,
        extra: &[Value],
    ) -> Result<Verdict, GateError> {
        let actor = req.principal.to_string();
        let action = req.action_name();
        let resource = req.resource.to_string();
        let Some(chitin_action) = req.chitin_action() else {
            let e = GateError::InvalidRequest(format!(
                "`{}` is not one of Chitin's actions; the gate authorizes only those",
                req.action
            ));
            self.record_refusal(
                &actor,
                &action,
                &resource,
                &e.to_string(),
                Value::Object(req.context.clone()),
            )?;
            return Err(e);
        };
        if let Some(why) = tool_secret_refusal(req, chitin_action) {
            // Whatever the policy says: recorded as a refusal, and no `Authorized` exists.
            self.record_refusal(
                &actor,
                &action,
                &resource,
                &why,
                Value::Object(req.context.clone()),
            )?;
            return Ok(Verdict::Denied(Decision {
                decision: Outcome::Deny,
                policies: Vec::new(),
                shadow: Vec::new(),
                shadow_decision: None,
                errors: Vec::new(),
            }));
        }
        let decision = match self.engine.decide_with_entities(req, extra) {
            Ok(d) => d,
            Err(e) => {
                self.record_refusal(
                    &actor,
                    &action,
                    &resource,
                    &e.to_string(),
                    Value::Object(req.context.clone()),
                )?;
                return Err(e.into());
            }
        };
        let recorded = match decision.decision {
            Outcome::Allow => GateDecision::Allow,
            Outcome::Deny => GateDecision::Deny,
            Outcome::ApprovalRequired => GateDecision::ApprovalRequired,
        };
        let digest = request_digest_with(req, args);
        let mut payload = json!({
            "context": self.redacted(&Value::Object(req.context.clone())),
            "shadow": decision.shadow,
            "errors": decision.errors,
            "request_digest": hex(&digest),
        });
        if !extra.is_empty()
            && let Some(m) = payload.as_object_mut()
        {
            m.insert(
                "entities".into(),
                self.redacted(&Value::Array(extra.to_vec())),
            );
        }
        self.record(RecordInput::gate_decision(
            &actor,
            &action,
            &resource,
            recorded,
            decision.policies.clone(),
            payload,
        ))?;
        if let Some(would) = decision.shadow_decision {
            // What the shadow policies would have done, as its own record for easy querying:
            // labelled with the outcome they would have given, whichever evaluation (the
            // request as made or its approval re-evaluation) they change.
            let label = match would {
                Outcome::Allow => GateDecision::ShadowAllow,
                Outcome::Deny => GateDecision::ShadowDeny,
                Outcome::ApprovalRequired => GateDecision::ShadowApprovalRequired,
            };
            self.record(
                RecordInput::gate_decision(
                    &actor,
                    &action,
                    &resource,
                    label,
                    decision.shadow.clone(),
                    json!({
                        "enforced": decision.decision.as_str(),
                        "shadow_decision": would.as_str(),
                        "request_digest": hex(&digest),
                    }),
                )
                .with_outcome(format!(
                    "not enforced (enforced: {})",
                    decision.decision.as_str()
                )),
            )?;
        }
        Ok(match decision.decision {
            Outcome::Allow => Verdict::Allowed(
                Authorized::new(chitin_action, actor, resource, &decision, digest, args),
                decision,
            ),
            Outcome::Deny => Verdict::Denied(decision),
            Outcome::ApprovalRequired => Verdict::ApprovalRequired {
                request_digest: digest,
                resolved: resolved_of(req),
                decision,
            },
        })
    }

    /// Builds the Cedar request for a tool call: canonical paths, the resolved program, the
    /// per-tool context. `approved` is true only when a granted approval bound to this exact
    /// request is being redeemed.
    pub fn tool_request(
        &self,
        call: &CallContext,
        input: &ToolInput,
    ) -> Result<PolicyRequest, GateError> {
        self.tool_request_for(call, None, input)
    }

    /// [`Self::tool_request`] for a call made by a workflow step (`step`: named in the
    /// context).
    pub fn tool_request_for(
        &self,
        call: &CallContext,
        step: Option<&StepContext>,
        input: &ToolInput,
    ) -> Result<PolicyRequest, GateError> {
        let approved = false;
        let workspace = canonical_existing(&call.workspace.to_string_lossy(), None)?;
        let mut ctx = Map::new();
        ctx.insert("origin".into(), json!(call.origin.as_str()));
        ctx.insert("session".into(), json!(call.session));
        ctx.insert("approved".into(), json!(approved));
        ctx.insert("tainted".into(), json!(call.tainted));
        ctx.insert("workspace".into(), json!(workspace.to_string_lossy()));
        if let Some(st) = step {
            st.insert_into(&mut ctx);
        }
        match input {
            ToolInput::Exec { argv, cwd, network } => {
                let program = argv.first().ok_or_else(|| {
                    GateError::InvalidRequest("exec needs a program (argv is empty)".into())
                })?;
                let cwd = match cwd {
                    Some(c) => workspace_path(&workspace, c, true)?,
                    None => workspace.clone(),
                };
                let program = program_location(program, &cwd, &workspace)?;
                ctx.insert("command".into(), json!(program.command));
                ctx.insert("command_path".into(), json!(program.path.to_string_lossy()));
                ctx.insert("command_writable".into(), json!(program.writable));
                ctx.insert("argv".into(), json!(argv));
                ctx.insert("cwd".into(), json!(cwd.to_string_lossy()));
                ctx.insert("network".into(), json!(network));
            }
            ToolInput::ReadFile { path }
            | ToolInput::ListDir { path }
            | ToolInput::EditFile { path } => {
                let p = workspace_path(&workspace, path, true)?;
                ctx.insert("path".into(), json!(p.to_string_lossy()));
            }
            ToolInput::WriteFile { path } => {
                let p = workspace_path(&workspace, path, false)?;
                ctx.insert("path".into(), json!(p.to_string_lossy()));
            }
            ToolInput::SendMessage { channel, target } => {
                ctx.insert("channel".into(), json!(channel));
                ctx.insert("target".into(), json!(target));
                ctx.insert(
                    "same_conversation".into(),
                    json!(same_conversation(channel, target, &call.session)),
                );
            }
            ToolInput::WebFetch { url, method } => {
                // Phase 1: only what the request says. No DNS, no network.
                let target = WebUrl::parse(url)
                    .map_err(|e| GateError::InvalidRequest(format!("web_fetch: {e}")))?;
                let literal: Vec<IpAddr> = target.ip.into_iter().collect();
                ctx.insert("url".into(), json!(target.url.as_str()));
                ctx.insert("scheme".into(), json!(target.scheme));
                ctx.insert("host".into(), json!(target.host));
                ctx.insert("method".into(), json!(method));
                ctx.insert("ip_literal".into(), json!(target.ip.is_some()));
                ctx.insert("resolved".into(), json!(false));
                ctx.insert("addresses".into(), addresses_json(&literal));
                ctx.insert(
                    "private_address".into(),
                    json!(crate::net::any_private(&literal)),
                );
            }
        }
        let uid = |s: String| {
            s.parse::<EntityUid>()
                .map_err(|e| GateError::InvalidRequest(e.to_string()))
        };
        Ok(PolicyRequest::new(
            uid(format!("Chitin::User::{}", quote(&call.user)))?,
            input.tool().action(),
            input.tool().uid(),
            ctx,
        ))
    }

    /// Canonicalizes and decides a tool call described by `input` (no approval, no argument
    /// binding: the resulting `Authorized` runs no tool). Input that cannot be canonicalized is
    /// recorded as a refusal and never reaches Cedar.
    pub fn check_tool(&self, call: &CallContext, input: &ToolInput) -> Result<Verdict, GateError> {
        match self.tool_request(call, input) {
            Ok(req) => self.decide_tool(call, input, &req, None, &format!("{input:?}")),
            Err(e) => {
                Err(self.refuse_input(call, input.tool().as_str(), &format!("{input:?}"), e)?)
            }
        }
    }

    /// Decides a tool call from its normalized, strictly parsed arguments. What Cedar sees is
    /// derived from exactly these arguments, the `Authorized` covers exactly them, and an
    /// approval counts only as a [`Redeemed`] approval for this exact call (its digest must
    /// match; only `Approvals::redeem` makes one).
    ///
    /// `web_fetch` is decided twice, and nothing touches the network before the first allow:
    /// 1. on the request as written (scheme, host, whether it is an IP literal, method, URL;
    ///    `resolved` false; `private_address` true only for a non-public IP literal);
    /// 2. after that allow, the host is resolved (IP literals are not) and the request is
    ///    decided again with `resolved` true, `addresses` and `private_address` computed from
    ///    every address. The `Authorized` of the second allow carries those addresses, and the
    ///    fetch connects to exactly them.
    ///
    /// An approval binds the request as written (phase 1's digest with the full arguments,
    /// which is what the person was shown); it never binds DNS answers, which nobody saw.
    /// A redeemed approval counts as `approved` in both phases, and when the second decision
    /// asks for approval, the approval asked for is the same phase-1 digest. Both decisions
    /// are audited.
    pub fn check_tool_call(
        &self,
        call: &CallContext,
        tool: Tool,
        args: &Value,
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        self.check_tool_call_for(call, None, tool, args, redeemed)
    }

    /// [`Self::check_tool_call`] for a call made by a workflow step (`step`: named in the
    /// Cedar context and covered by the digest).
    pub fn check_tool_call_for(
        &self,
        call: &CallContext,
        step: Option<&StepContext>,
        tool: Tool,
        args: &Value,
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        let name = tool.as_str();
        let input = match ToolInput::from_args(tool, args) {
            Ok(i) => i,
            Err(e) => return Err(self.refuse_input(call, name, &args.to_string(), e)?),
        };
        let mut req = match self.tool_request_for(call, step, &input) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse_input(call, name, &args.to_string(), e)?),
        };
        if let Some(r) = redeemed {
            if r.digest() != &request_digest_with(&req, Some(args)) {
                let e = GateError::ApprovalMismatch;
                return Err(self.refuse_input(call, name, &args.to_string(), e)?);
            }
            req.context.insert("approved".into(), json!(true));
        }
        self.decide_tool(call, &input, &req, Some(args), &args.to_string())
    }

    /// Decides a model's or user's call of an action that is not a built-in tool but takes
    /// arguments (the agent's `cron` tool: `cron.manage`). As for a tool call, the decision
    /// binds the full `args` (the digest an approval is bound to, and the `Authorized`'s
    /// arguments), and `approved` is true only with a [`Redeemed`] approval of exactly this
    /// request. `req.context` must not carry `approved` (it is set here).
    pub fn check_call(
        &self,
        req: &PolicyRequest,
        args: &Value,
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        self.check_call_with_entities(req, args, &[], redeemed)
    }

    /// [`Self::check_call`] with request-specific entities (Cedar entity JSON, recorded with
    /// the decision), e.g. the `McpTool` and `McpArgs` entities of an MCP tool call.
    pub fn check_call_with_entities(
        &self,
        req: &PolicyRequest,
        args: &Value,
        extra: &[Value],
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        let mut req = req.clone();
        req.context.insert("approved".into(), json!(false));
        if let Some(r) = redeemed {
            if r.digest() != &request_digest_with(&req, Some(args)) {
                let e = GateError::ApprovalMismatch;
                self.record_refusal(
                    &req.principal.to_string(),
                    &req.action_name(),
                    &req.resource.to_string(),
                    &e.to_string(),
                    bounded_text("args", &self.redact(&args.to_string())),
                )?;
                return Err(e);
            }
            req.context.insert("approved".into(), json!(true));
        }
        self.check_bound(&req, Some(args), extra)
    }

    /// Decides one call that is several requests at once, all or nothing (`apply_patch`: each
    /// path it touches, decided as `write_file` would be). Every request is decided and
    /// recorded, bound to the full `args`; the call is allowed only when every request is: one
    /// deny denies the whole call (its decision is returned), otherwise one request needing
    /// approval makes the whole call need one approval, bound to the digest over all requests
    /// and `args` (so an approval shows and binds every path). With a [`Redeemed`] approval of
    /// exactly that digest, every request is decided as approved. One request is decided
    /// exactly as [`Self::check_call`] decides it. The `Authorized` names the first request's
    /// action and resource and covers `args`.
    pub fn check_calls(
        &self,
        reqs: &[PolicyRequest],
        args: &Value,
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        let [first, ..] = reqs else {
            return Err(GateError::InvalidRequest(
                "a call must be decided on at least one request".into(),
            ));
        };
        if reqs.len() == 1 {
            return self.check_call(first, args, redeemed);
        }
        let unapproved: Vec<PolicyRequest> = reqs
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.context.insert("approved".into(), json!(false));
                r
            })
            .collect();
        let digest = calls_digest(&unapproved, args);
        let approved = match redeemed {
            Some(r) if r.digest() != &digest => {
                let e = GateError::ApprovalMismatch;
                self.record_refusal(
                    &first.principal.to_string(),
                    &first.action_name(),
                    &first.resource.to_string(),
                    &e.to_string(),
                    bounded_text("args", &self.redact(&args.to_string())),
                )?;
                return Err(e);
            }
            Some(_) => true,
            None => false,
        };
        let mut needs_approval: Option<Decision> = None;
        let mut allowed: Vec<(Authorized, Decision)> = Vec::new();
        for r in &unapproved {
            let mut r = r.clone();
            r.context.insert("approved".into(), json!(approved));
            match self.check_bound(&r, Some(args), &[])? {
                Verdict::Denied(d) => return Ok(Verdict::Denied(d)),
                Verdict::ApprovalRequired { decision, .. } => {
                    needs_approval.get_or_insert(decision);
                }
                Verdict::Allowed(a, d) => allowed.push((a, d)),
            }
        }
        if let Some(decision) = needs_approval {
            return Ok(Verdict::ApprovalRequired {
                decision,
                request_digest: digest,
                resolved: Map::new(),
            });
        }
        let mut policies: Vec<String> = Vec::new();
        for (_, d) in &allowed {
            for p in &d.policies {
                if !policies.contains(p) {
                    policies.push(p.clone());
                }
            }
        }
        let Some((mut auth, mut decision)) = allowed.into_iter().next() else {
            return Err(GateError::InvalidRequest("no request was decided".into()));
        };
        auth.request_digest = digest;
        auth.policies.clone_from(&policies);
        decision.policies = policies;
        Ok(Verdict::Allowed(auth, decision))
    }

    /// Decides a built tool request; for `web_fetch`, both phases (see
    /// [`Self::check_tool_call`]).
    fn decide_tool(
        &self,
        call: &CallContext,
        input: &ToolInput,
        req: &PolicyRequest,
        args: Option<&Value>,
        shown: &str,
    ) -> Result<Verdict, GateError> {
        let first = self.check_bound(req, args, &[])?;
        let ToolInput::WebFetch { url, .. } = input else {
            return Ok(first);
        };
        let Verdict::Allowed(..) = first else {
            return Ok(first);
        };
        // Phase 2: only now may the network be asked.
        let target =
            WebUrl::parse(url).map_err(|e| GateError::InvalidRequest(format!("web_fetch: {e}")))?;
        let addrs = match (target.ip, target.host_name()) {
            (Some(ip), _) => vec![ip],
            (None, Some(host)) => match self.resolver.resolve(host, target.port) {
                Ok(a) if !a.is_empty() => a,
                Ok(_) => {
                    let e = GateError::Unresolvable(format!("`{host}` resolves to no address"));
                    return Err(self.refuse_input(call, Tool::WebFetch.as_str(), shown, e)?);
                }
                Err(why) => {
                    let e = GateError::Unresolvable(why);
                    return Err(self.refuse_input(call, Tool::WebFetch.as_str(), shown, e)?);
                }
            },
            (None, None) => {
                let e = GateError::InvalidRequest("web_fetch: the url has no host".into());
                return Err(self.refuse_input(call, Tool::WebFetch.as_str(), shown, e)?);
            }
        };
        let mut second = req.clone();
        second.context.insert("resolved".into(), json!(true));
        second
            .context
            .insert("addresses".into(), addresses_json(&addrs));
        second.context.insert(
            "private_address".into(),
            json!(crate::net::any_private(&addrs)),
        );
        Ok(match self.check_bound(&second, args, &[])? {
            Verdict::Allowed(mut auth, decision) => {
                auth.request_digest = request_digest_with(req, args);
                auth.pinned = addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, target.port))
                    .collect();
                Verdict::Allowed(auth, decision)
            }
            Verdict::Denied(d) => Verdict::Denied(d),
            // The approval to ask for is the one phase 1 binds (see above).
            Verdict::ApprovalRequired { decision, .. } => Verdict::ApprovalRequired {
                decision,
                request_digest: request_digest_with(req, args),
                resolved: resolved_of(req),
            },
        })
    }

    /// Records input that never reached Cedar as a refusal; returns the error to hand back.
    fn refuse_input(
        &self,
        call: &CallContext,
        tool: &str,
        input: &str,
        e: GateError,
    ) -> Result<GateError, GateError> {
        let actor = format!("Chitin::User::{}", quote(&call.user));
        let resource = format!("Chitin::Tool::{}", quote(tool));
        let mut details = bounded_text("input", &self.redact(input));
        if let Value::Object(m) = &mut details {
            m.insert("session".into(), json!(call.session));
        }
        self.record_refusal(&actor, tool, &resource, &e.to_string(), details)?;
        Ok(e)
    }
}

/// Largest refused input kept whole in an audit record.
pub const REFUSED_TEXT_KEPT: usize = 16 * 1024;

/// `{field: text}` for an audit payload when `text` is small; otherwise `{field_head,
/// field_bytes, field_sha256}` (the first [`REFUSED_TEXT_KEPT`] bytes, the size and the
/// SHA-256 of the whole), so one bad call cannot put megabytes into the log. Redact first.
pub fn bounded_text(field: &str, text: &str) -> Value {
    let mut m = Map::new();
    if text.len() <= REFUSED_TEXT_KEPT {
        m.insert(field.into(), json!(text));
        return Value::Object(m);
    }
    let mut end = REFUSED_TEXT_KEPT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    m.insert(format!("{field}_head"), json!(&text[..end]));
    m.insert(format!("{field}_bytes"), json!(text.len()));
    m.insert(
        format!("{field}_sha256"),
        json!(hex(&Sha256::digest(text.as_bytes()))),
    );
    Value::Object(m)
}

/// Addresses as a Cedar set of strings (sorted, no duplicates).
fn addresses_json(addrs: &[IpAddr]) -> Value {
    let mut v: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    v.sort();
    v.dedup();
    json!(v)
}

fn hex(bytes: &[u8]) -> String {
    chitin_audit::to_hex(bytes)
}

/// A Cedar string literal.
fn quote(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

fn absolute(path: &str, base: Option<&Path>) -> Result<PathBuf, GateError> {
    if path.is_empty() || path.contains('\0') {
        return Err(GateError::InvalidPath {
            path: path.into(),
            reason: "empty or contains NUL".into(),
        });
    }
    let p = Path::new(path);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    match base {
        Some(b) => Ok(b.join(p)),
        None => Err(GateError::InvalidPath {
            path: path.into(),
            reason: "must be absolute".into(),
        }),
    }
}

/// Canonicalizes a path that must exist (relative paths are taken from `base`).
pub fn canonical_existing(path: &str, base: Option<&Path>) -> Result<PathBuf, GateError> {
    let abs = absolute(path, base)?;
    std::fs::canonicalize(&abs).map_err(|e| GateError::InvalidPath {
        path: path.into(),
        reason: format!("cannot be resolved: {e}"),
    })
}

/// Locates a path a tool call names for Cedar ([`crate::wsfs::locate`]): inside the workspace
/// it is walked beneath the workspace descriptor (symlinks inside resolved, never followed by
/// name); outside it (an absolute path, `..`, a symlink that leads out) it is only normalized
/// lexically and never looked at, so the decision and its message do not depend on what exists
/// there. `must_exist`: a missing path inside the workspace is refused (read, list, edit, cwd);
/// otherwise it is where the file (and directories) will be created.
fn workspace_path(workspace: &Path, path: &str, must_exist: bool) -> Result<PathBuf, GateError> {
    use crate::wsfs::Located;
    let invalid = |reason: String| GateError::InvalidPath {
        path: path.into(),
        reason,
    };
    if path.is_empty() || path.contains('\0') {
        return Err(invalid("empty or contains NUL".into()));
    }
    match crate::wsfs::locate(workspace, Path::new(path)) {
        Ok(Located::Outside(p)) => Ok(p),
        Ok(Located::Inside(r)) if r.exists || !must_exist => Ok(r.abs),
        Ok(Located::Inside(_)) => Err(invalid(
            "cannot be resolved: no such file or directory in the workspace".into(),
        )),
        Err(crate::wsfs::WsFsError::BadName { .. }) => Err(invalid(
            "a directory to be created is not a plain name".into(),
        )),
        Err(e) => Err(invalid(e.to_string())),
    }
}

/// The program an `exec` runs, as the gate names it to Cedar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramLocation {
    /// Canonical absolute path (PATH lookup done, symlinks resolved): `command_path`.
    pub path: PathBuf,
    /// Its basename: `command`.
    pub command: String,
    /// The program, or the path it was named by (a link the agent could swap between the
    /// decision and the exec), lies where the agent can write: `command_writable`.
    pub writable: bool,
}

/// Resolves `program` (argv\[0\]) run from `cwd` in `workspace` (both canonical) like the
/// sandbox will, and says whether the agent could have put it there.
pub fn program_location(
    program: &str,
    cwd: &Path,
    workspace: &Path,
) -> Result<ProgramLocation, GateError> {
    let path = resolve_program(program, cwd, workspace)?;
    let command = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let writable = crate::policy::named_program_writable(program, cwd, Some(workspace))
        || crate::policy::agent_can_write(&path, Some(workspace));
    Ok(ProgramLocation {
        path,
        command,
        writable,
    })
}

/// The hard rule of tool secrets, checked before Cedar: a tool's `secret.use` is refused when
/// the program lies where the agent can write (`command_writable`, or a `command_path` in a
/// temp dir), and for `exec` when the program could not be named. The refusal text.
fn tool_secret_refusal(req: &PolicyRequest, action: Action) -> Option<String> {
    if action != Action::SecretUse || req.principal.type_name().to_string() != "Chitin::Tool" {
        return None;
    }
    let secret = req.resource.id().unescaped().to_string();
    let path = req.context.get("command_path").and_then(Value::as_str);
    let said = req.context.get("command_writable").and_then(Value::as_bool);
    match path {
        Some(p) if said != Some(false) || crate::policy::agent_can_write(Path::new(p), None) => {
            Some(writable_program_refusal(&secret, p))
        }
        None if req.principal.id().unescaped() == "exec" => Some(format!(
            "secret `{secret}` withheld: the program exec runs could not be resolved to a path"
        )),
        _ => None,
    }
}

/// The refusal (the audit record's outcome, after `refused: `) when a tool secret would go
/// to a program the agent could have written.
pub fn writable_program_refusal(secret: &str, command_path: &str) -> String {
    format!(
        "secret `{secret}` withheld from `{command_path}`: the program is in, or was named \
         through, a place the agent can write (the workspace, /tmp, /var/tmp, /dev/shm); tool \
         secrets go only to programs in system directories, run by name or by their real path"
    )
}

/// Resolves a program like the sandbox will: a name with a `/` relative to `cwd`, a bare name
/// through [`TOOL_PATH`]; then symlinks are resolved, so `command` names the real binary.
pub fn resolve_program(program: &str, cwd: &Path, workspace: &Path) -> Result<PathBuf, GateError> {
    if program.contains('/') {
        // A path: inside the workspace it is walked beneath the workspace descriptor (the
        // gateway never follows a workspace path by name); a path that is, or leads, outside
        // names a host program and is canonicalized there.
        let abs = absolute(program, Some(cwd))?;
        return match crate::wsfs::locate(workspace, &abs) {
            Ok(crate::wsfs::Located::Inside(r)) if r.exists => Ok(r.abs),
            Ok(crate::wsfs::Located::Inside(_)) => Err(GateError::InvalidPath {
                path: program.into(),
                reason: "cannot be resolved: no such file or directory in the workspace".into(),
            }),
            Ok(crate::wsfs::Located::Outside(host)) => {
                canonical_existing(&host.to_string_lossy(), None)
            }
            Err(e) => Err(GateError::InvalidPath {
                path: program.into(),
                reason: e.to_string(),
            }),
        };
    }
    for dir in TOOL_PATH {
        let candidate = Path::new(dir).join(program);
        if candidate.is_file() {
            return canonical_existing(&candidate.to_string_lossy(), None);
        }
    }
    Err(GateError::InvalidPath {
        path: program.into(),
        reason: format!("program not found in {}", TOOL_PATH.join(":")),
    })
}

/// The one place an administrative request is built: `principal` is the real user
/// (`Chitin::User::"<principal>"`: the gateway's authenticated user, or the CLI's configured
/// operator), `action` one of the administration actions of the schema (`policy.reload`,
/// `token.show`, `backup.restore`, ...), the resource is always `Chitin::Gateway::"gateway"`.
pub fn admin_request(
    principal: &str,
    action: Action,
    context: Map<String, Value>,
) -> Result<PolicyRequest, GateError> {
    let uid = |s: String| {
        s.parse::<EntityUid>()
            .map_err(|e| GateError::InvalidRequest(e.to_string()))
    };
    Ok(PolicyRequest {
        principal: uid(format!("Chitin::User::{}", quote(principal)))?,
        action: action.uid(),
        resource: uid(format!(
            "Chitin::Gateway::{}",
            quote(crate::policy::builtin::GATEWAY_ID)
        ))?,
        context,
    })
}

#[cfg(test)]
mod same_conversation_tests {
    use super::same_conversation;

    #[test]
    fn a_channel_session_is_its_own_conversation_by_key_or_by_chat() {
        let s = "channel:tg:dm:4242";
        assert!(same_conversation("tg", s, s));
        assert!(same_conversation("tg", "telegram:dm:4242", s));
        assert!(!same_conversation("tg", "telegram:dm:4243", s));
        assert!(!same_conversation("tg", "telegram:group:4242", s));
        // Another channel's chat with the same id is another conversation.
        assert!(!same_conversation("other", "telegram:dm:4242", s));
        assert!(!same_conversation("tg", "channel:tg:dm:4242", "web-1"));
        // A chat id cannot smuggle in a thread or another key part.
        assert!(!same_conversation(
            "tg",
            "telegram:group:-100:thread:7",
            "channel:tg:group:-100:thread:7"
        ));
        assert!(same_conversation("chitin", "web-1", "web-1"));
        assert!(!same_conversation("chitin", "web-2", "web-1"));
    }
}

#[cfg(test)]
mod digest_tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn tricky() -> Value {
        json!({
            "zeta": [1, -2, 3.5, 1e300, 18446744073709551615u64, -9223372036854775808i64, null, true],
            "alpha": {"b": "quote \" backslash \\ tab \t nul \u{0} bell \u{7} del \u{7f}", "a": "é ü 中 😀 \u{2028}"},
            "Émile": {"nested": {"z": false, "y": [{"q": 0.1}, {}], "x": []}},
            "": "empty key",
            "approved": true
        })
    }

    fn request() -> PolicyRequest {
        let Value::Object(context) = tricky() else {
            unreachable!()
        };
        PolicyRequest {
            principal: crate::policy::user_uid("bob \"the\" builder"),
            action: "Chitin::Action::\"model.call\"".parse().unwrap(),
            resource: "Chitin::Agent::\"main\"".parse().unwrap(),
            context,
        }
    }

    // Pinned: approvals bind these digests and audit records carry them, so the bytes hashed
    // must not change with the way they are written.
    #[test]
    fn canonical_json_sorts_keys_and_writes_serde_jsons_escapes_and_numbers() {
        let mut s = String::new();
        canonical_json(&tricky(), &mut s);
        assert_eq!(
            s,
            "{\"\":\"empty key\",\"alpha\":{\"a\":\"é ü 中 😀 \u{2028}\",\"b\":\"quote \\\" backslash \\\\ tab \\t nul \\u0000 bell \\u0007 del \u{7f}\"},\"approved\":true,\"zeta\":[1,-2,3.5,1e+300,18446744073709551615,-9223372036854775808,null,true],\"Émile\":{\"nested\":{\"x\":[],\"y\":[{\"q\":0.1},{}],\"z\":false}}}"
        );
    }

    #[test]
    fn a_request_digest_is_the_same_bytes_as_before() {
        let args = tricky();
        assert_eq!(
            hex(&request_digest_with(&request(), None)),
            "0269c242cefe798f24fc89607253056ca148431771dd7084c9171bcec8d5a3b0"
        );
        assert_eq!(
            hex(&request_digest_with(&request(), Some(&args))),
            "f5f4f8d2b2e8f84f2bcb700914c6b3f37e385dd4caec0947ac201995a1568694"
        );
    }
}
