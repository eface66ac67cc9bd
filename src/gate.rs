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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cedar_policy::EntityUid;
use chitin_audit::{AuditLog, GateDecision, RecordInput};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::approvals::Redeemed;
use crate::policy::{Decision, Outcome, PolicyEngine, PolicyError, PolicyRequest};

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
}

/// Proof that the policy engine allowed one specific request. It cannot be built outside
/// `gate`, and it names exactly what was allowed.
#[derive(Debug)]
pub struct Authorized {
    principal: String,
    action: String,
    resource: String,
    policies: Vec<String>,
    request_digest: [u8; 32],
    /// SHA-256 of the canonical tool arguments this authorization covers (tool calls only).
    args_digest: Option<[u8; 32]>,
}

impl Authorized {
    fn new(req: &PolicyRequest, decision: &Decision, args: Option<&Value>) -> Self {
        Self {
            principal: req.principal.to_string(),
            action: req.action_name(),
            resource: req.resource.to_string(),
            policies: decision.policies.clone(),
            request_digest: request_digest_with(req, args),
            args_digest: args.map(args_digest),
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
    pub(crate) fn for_test(principal: &str, action: &str, resource: &str) -> Self {
        Self {
            principal: principal.into(),
            action: action.into(),
            resource: resource.into(),
            policies: vec!["test".into()],
            request_digest: [0; 32],
            args_digest: None,
        }
    }

    /// The Cedar principal, e.g. `Chitin::User::"alice"`.
    pub fn principal(&self) -> &str {
        &self.principal
    }
    /// The Cedar action id, e.g. `exec`.
    pub fn action(&self) -> &str {
        &self.action
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
    },
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
    let mut ctx = req.context.clone();
    ctx.remove("approved");
    let mut v = json!({
        "principal": req.principal.to_string(),
        "action": req.action.to_string(),
        "resource": req.resource.to_string(),
        "context": Value::Object(ctx),
    });
    if let (Some(a), Value::Object(m)) = (args, &mut v) {
        m.insert("args".into(), a.clone());
    }
    let mut s = String::new();
    canonical_json(&v, &mut s);
    Sha256::digest(s.as_bytes()).into()
}

fn args_digest(args: &Value) -> [u8; 32] {
    let mut s = String::new();
    canonical_json(args, &mut s);
    Sha256::digest(s.as_bytes()).into()
}

/// Writes JSON with object keys sorted (recursively) and no insignificant whitespace.
pub fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(val) = m.get(*k) {
                    canonical_json(val, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
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
    /// `host` and `private_address` are derived by the gate from the URL (every address the
    /// host resolves to is checked).
    WebFetch {
        url: String,
        method: String,
    },
}

impl ToolInput {
    /// What the gate judges, derived from a tool call's normalized arguments (the same JSON the
    /// tool will run with): one source of truth for Cedar's context and for the run.
    pub fn from_args(tool: &str, args: &Value) -> Result<Self, GateError> {
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
            "exec" => {
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
            "read_file" => Self::ReadFile { path: path(None)? },
            "list_dir" => Self::ListDir {
                path: path(Some("."))?,
            },
            "write_file" => Self::WriteFile { path: path(None)? },
            "edit_file" => Self::EditFile { path: path(None)? },
            "send_message" => {
                let s = |k: &str| match args.get(k) {
                    Some(Value::String(v)) => Ok(v.clone()),
                    _ => Err(bad(&format!("`{k}` must be a string"))),
                };
                Self::SendMessage {
                    channel: s("channel")?,
                    target: s("target")?,
                }
            }
            "web_fetch" => {
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
            other => {
                return Err(GateError::InvalidRequest(format!(
                    "no built-in tool `{other}`"
                )));
            }
        })
    }

    /// The tool (and Cedar action) name.
    pub fn tool(&self) -> &'static str {
        match self {
            Self::Exec { .. } => "exec",
            Self::ReadFile { .. } => "read_file",
            Self::ListDir { .. } => "list_dir",
            Self::WriteFile { .. } => "write_file",
            Self::EditFile { .. } => "edit_file",
            Self::SendMessage { .. } => "send_message",
            Self::WebFetch { .. } => "web_fetch",
        }
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
        }
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
            crate::secrets::redact::redact_json_strings(&mut out, &|s| r(s));
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

    fn check_bound(
        &self,
        req: &PolicyRequest,
        args: Option<&Value>,
        extra: &[Value],
    ) -> Result<Verdict, GateError> {
        let actor = req.principal.to_string();
        let action = req.action_name();
        let resource = req.resource.to_string();
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
        let mut payload = json!({
            "context": self.redacted(&Value::Object(req.context.clone())),
            "shadow": decision.shadow,
            "errors": decision.errors,
            "request_digest": hex(&request_digest_with(req, args)),
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
        if !decision.shadow.is_empty() {
            // What the shadow policies would have done, as its own record for easy querying.
            let would = if decision.decision == Outcome::Allow {
                GateDecision::ShadowDeny
            } else {
                GateDecision::ShadowAllow
            };
            self.record(
                RecordInput::gate_decision(
                    &actor,
                    &action,
                    &resource,
                    would,
                    decision.shadow.clone(),
                    json!({"enforced": decision.decision.as_str()}),
                )
                .with_outcome(format!(
                    "not enforced (enforced: {})",
                    decision.decision.as_str()
                )),
            )?;
        }
        Ok(match decision.decision {
            Outcome::Allow => Verdict::Allowed(Authorized::new(req, &decision, args), decision),
            Outcome::Deny => Verdict::Denied(decision),
            Outcome::ApprovalRequired => Verdict::ApprovalRequired {
                request_digest: request_digest_with(req, args),
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
        let approved = false;
        let workspace = canonical_existing(&call.workspace.to_string_lossy(), None)?;
        let mut ctx = Map::new();
        ctx.insert("origin".into(), json!(call.origin.as_str()));
        ctx.insert("session".into(), json!(call.session));
        ctx.insert("approved".into(), json!(approved));
        ctx.insert("tainted".into(), json!(call.tainted));
        ctx.insert("workspace".into(), json!(workspace.to_string_lossy()));
        match input {
            ToolInput::Exec { argv, cwd, network } => {
                let program = argv.first().ok_or_else(|| {
                    GateError::InvalidRequest("exec needs a program (argv is empty)".into())
                })?;
                let cwd = match cwd {
                    Some(c) => workspace_path(&workspace, c, true)?,
                    None => workspace.clone(),
                };
                let resolved = resolve_program(program, &cwd)?;
                let command = resolved
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                ctx.insert("command".into(), json!(command));
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
                    json!(channel == "chitin" && *target == call.session),
                );
            }
            ToolInput::WebFetch { url, method } => {
                let target = crate::tools::fetch::FetchTarget::resolve(url)
                    .map_err(|e| GateError::InvalidRequest(format!("web_fetch: {e}")))?;
                ctx.insert("url".into(), json!(target.url.as_str()));
                ctx.insert("host".into(), json!(target.host));
                ctx.insert("method".into(), json!(method));
                ctx.insert("private_address".into(), json!(target.private_address()));
            }
        }
        let uid = |s: String| {
            s.parse::<EntityUid>()
                .map_err(|e| GateError::InvalidRequest(e.to_string()))
        };
        Ok(PolicyRequest {
            principal: uid(format!("Chitin::User::{}", quote(&call.user)))?,
            action: uid(format!("Chitin::Action::{}", quote(input.tool())))?,
            resource: uid(format!("Chitin::Tool::{}", quote(input.tool())))?,
            context: ctx,
        })
    }

    /// Canonicalizes and decides a tool call described by `input` (no approval, no argument
    /// binding: the resulting `Authorized` runs no tool). Input that cannot be canonicalized is
    /// recorded as a refusal and never reaches Cedar.
    pub fn check_tool(&self, call: &CallContext, input: &ToolInput) -> Result<Verdict, GateError> {
        match self.tool_request(call, input) {
            Ok(req) => self.check_bound(&req, None, &[]),
            Err(e) => Err(self.refuse_input(call, input.tool(), &format!("{input:?}"), e)?),
        }
    }

    /// Decides a tool call from its normalized, strictly parsed arguments. What Cedar sees is
    /// derived from exactly these arguments, the `Authorized` covers exactly them, and an
    /// approval counts only as a [`Redeemed`] approval for this exact call (its digest must
    /// match; only `Approvals::redeem` makes one).
    pub fn check_tool_call(
        &self,
        call: &CallContext,
        tool: &str,
        args: &Value,
        redeemed: Option<&Redeemed>,
    ) -> Result<Verdict, GateError> {
        let input = match ToolInput::from_args(tool, args) {
            Ok(i) => i,
            Err(e) => return Err(self.refuse_input(call, tool, &args.to_string(), e)?),
        };
        let mut req = match self.tool_request(call, &input) {
            Ok(r) => r,
            Err(e) => return Err(self.refuse_input(call, tool, &args.to_string(), e)?),
        };
        if let Some(r) = redeemed {
            if r.digest() != &request_digest_with(&req, Some(args)) {
                let e = GateError::ApprovalMismatch;
                return Err(self.refuse_input(call, tool, &args.to_string(), e)?);
            }
            req.context.insert("approved".into(), json!(true));
        }
        self.check_bound(&req, Some(args), &[])
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
        let details = json!({"input": input, "session": call.session});
        self.record_refusal(&actor, tool, &resource, &e.to_string(), details)?;
        Ok(e)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

/// Resolves a program like the sandbox will: a name with a `/` relative to `cwd`, a bare name
/// through [`TOOL_PATH`]; then symlinks are resolved, so `command` names the real binary.
pub fn resolve_program(program: &str, cwd: &Path) -> Result<PathBuf, GateError> {
    if program.contains('/') {
        return canonical_existing(program, Some(cwd));
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
