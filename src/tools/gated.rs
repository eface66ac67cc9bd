//! The tool path shared by the tools that build their own Cedar requests (`web_search`,
//! `apply_patch`, `memory_*`, `sessions_*`): the decision bound to the normalized arguments
//! (with the redemption of a granted approval of exactly this call), then, after the run, the
//! `tool_run` audit record and the redacted result. Same invariants as [`super::invoke`]:
//! nothing runs before an allow, every run is recorded, and a run whose record cannot be
//! written is reported as [`InvokeError::RanUnaudited`].

use serde_json::{Value, json};

use super::invoke::{InvokeError, Invoked};
use super::{ToolError, ToolResult};
use crate::approvals::{ApprovalError, Approvals};
use crate::gate::{Authorized, CallContext, Gate, StepContext, Verdict};
use crate::policy::{Decision, PolicyRequest, Tool};
use chitin_audit::{RecordInput, ToolRun};

/// An allowed call: the proof to run it with.
pub(super) struct Go {
    pub auth: Authorized,
    pub decision: Decision,
    /// The approval redeemed for it, if it needed one.
    pub approval: Option<String>,
}

/// What the gate said.
pub(super) enum Gated {
    Go(Go),
    /// Denied, or waiting for an approval: hand this back, nothing runs.
    Done(Invoked),
}

/// The Cedar principal of the caller, as audit records name it.
pub(super) fn actor(call: &CallContext) -> String {
    format!("Chitin::User::{}", Value::String(call.user.clone()))
}

/// `Chitin::User::"<user>"` as an entity uid.
pub(super) fn user_uid(user: &str) -> Result<cedar_policy::EntityUid, InvokeError> {
    format!("Chitin::User::{}", Value::String(user.to_string()))
        .parse()
        .map_err(|e| InvokeError::InvalidArgs {
            tool: String::new(),
            message: format!("invalid user: {e}"),
        })
}

/// The context every tool request carries: `origin`, `session`, `tainted`, `workspace`, and a
/// workflow step's `workflow`, `workflow_digest`, `step` (`approved` is set by the gate).
pub(super) fn base_context(
    call: &CallContext,
    step: Option<&StepContext>,
    workspace: bool,
) -> serde_json::Map<String, Value> {
    let mut ctx = serde_json::Map::new();
    ctx.insert("origin".into(), json!(origin(call)));
    ctx.insert("session".into(), json!(call.session));
    ctx.insert("tainted".into(), json!(call.tainted));
    if workspace {
        let ws =
            crate::wsfs::canonical_root(&call.workspace).unwrap_or_else(|_| call.workspace.clone());
        ctx.insert("workspace".into(), json!(ws.to_string_lossy()));
    }
    if let Some(s) = step {
        s.insert_into(&mut ctx);
    }
    ctx
}

fn origin(call: &CallContext) -> &'static str {
    match call.origin {
        crate::gate::Origin::Model => "model",
        crate::gate::Origin::User => "user",
        crate::gate::Origin::Automation => "automation",
    }
}

/// Parses the arguments strictly; a failure is recorded as a refusal.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    gate: &Gate,
    call: &CallContext,
    tool: Tool,
    args: &Value,
) -> Result<T, InvokeError> {
    super::parse_args(args).map_err(|e| {
        let err = invalid(
            tool,
            match e {
                ToolError::InvalidArgs(m) => m,
                other => other.to_string(),
            },
        );
        match super::invoke::refuse(gate, &actor(call), tool.as_str(), &err, args) {
            Ok(()) => err,
            Err(audit) => audit,
        }
    })
}

/// An invalid-arguments error for `tool`.
pub(super) fn invalid(tool: Tool, message: impl Into<String>) -> InvokeError {
    InvokeError::InvalidArgs {
        tool: tool.as_str().into(),
        message: message.into(),
    }
}

/// A call to a tool that needs something the gateway may not have (the browser, a search
/// backend), before its decision: the arguments as parsed, the capability, what the tool's own
/// check of the arguments made of them, and the arguments normalized (what the decision and an
/// approval bind).
pub(super) struct Prepared<A, C, R> {
    pub args: A,
    pub cap: C,
    pub checked: R,
    pub norm: Value,
}

/// The start such a call shares: the arguments parsed strictly; the capability, or the call
/// refused (audited) with `missing` saying why it is not there; the tool's `check` of the
/// arguments against it, or the call refused (audited) with its message.
pub(super) fn prepare<A, C, R>(
    gate: &Gate,
    call: &CallContext,
    tool: Tool,
    args: &Value,
    cap: Option<C>,
    missing: &str,
    check: impl FnOnce(&A, &C) -> Result<R, String>,
) -> Result<Prepared<A, C, R>, InvokeError>
where
    A: serde::de::DeserializeOwned + serde::Serialize,
{
    let parsed: A = parse(gate, call, tool, args)?;
    let Some(cap) = cap else {
        return Err(refused(gate, call, tool, invalid(tool, missing), args));
    };
    let checked = match check(&parsed, &cap) {
        Ok(r) => r,
        Err(m) => return Err(refused(gate, call, tool, invalid(tool, m), args)),
    };
    let norm = serde_json::to_value(&parsed).map_err(|e| invalid(tool, e.to_string()))?;
    Ok(Prepared {
        args: parsed,
        cap,
        checked,
        norm,
    })
}

/// Records `err` (a call refused before any decision) and returns it.
pub(super) fn refused(
    gate: &Gate,
    call: &CallContext,
    tool: Tool,
    err: InvokeError,
    args: &Value,
) -> InvokeError {
    match super::invoke::refuse(gate, &actor(call), tool.as_str(), &err, args) {
        Ok(()) => err,
        Err(audit) => audit,
    }
}

/// Decides the call on `reqs` (all must allow; see `Gate::check_calls`), bound to `args`; a
/// granted approval of exactly this call is redeemed once. `shown` is what an approval
/// request shows (the arguments, plus anything the gate resolved from them).
pub(super) fn decide(
    gate: &Gate,
    approvals: Option<&Approvals>,
    reqs: &[PolicyRequest],
    args: &Value,
    shown: Value,
) -> Result<Gated, InvokeError> {
    let mut verdict = gate.check_calls(reqs, args, None)?;
    let mut approval = None;
    if let (Verdict::ApprovalRequired { request_digest, .. }, Some(ap)) = (&verdict, approvals) {
        match ap.redeem(request_digest) {
            Ok(redeemed) => {
                approval = Some(redeemed.approval().id.clone());
                verdict = gate.check_calls(reqs, args, Some(redeemed.proof()))?;
            }
            Err(ApprovalError::NotApproved) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(match verdict {
        Verdict::Allowed(auth, decision) => Gated::Go(Go {
            auth,
            decision,
            approval,
        }),
        Verdict::Denied(d) => Gated::Done(Invoked::Denied(d)),
        Verdict::ApprovalRequired {
            decision,
            request_digest,
            ..
        } => Gated::Done(Invoked::ApprovalRequired {
            decision,
            request_digest,
            args: shown,
        }),
    })
}

/// A result with structured output and no process.
pub(super) fn output(started: std::time::Instant, v: Value) -> ToolResult {
    ToolResult {
        exit_code: Some(0),
        signal: None,
        killed: None,
        stdout: String::new(),
        stderr: String::new(),
        truncated: false,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        output: Some(v),
    }
}

/// A result of a call that ran and failed (no process): exit 1, `stderr` saying why. Its text
/// reaches the model fenced as untrusted like any other result (it can quote what a page or
/// a backend answered).
pub(super) fn failed(started: std::time::Instant, stderr: String) -> ToolResult {
    ToolResult {
        exit_code: Some(1),
        signal: None,
        killed: None,
        stdout: String::new(),
        stderr,
        truncated: false,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        output: None,
    }
}

/// After the run: the `tool_run` record (argv redacted), then the redacted result.
pub(super) fn finish(
    gate: &Gate,
    call: &CallContext,
    tool: Tool,
    argv: &[String],
    started: std::time::Instant,
    run: Result<ToolResult, ToolError>,
    go: Go,
) -> Result<Invoked, InvokeError> {
    let redact = |s: &str| gate.redact(s);
    let argv: Vec<String> = argv.iter().map(|a| redact(a)).collect();
    let record = match &run {
        Ok(r) => ToolRun {
            argv,
            limits: json!({}),
            exit_code: r.exit_code,
            signal: r.signal,
            killed_by: r.killed.clone(),
            duration_ms: r.duration_ms,
        },
        Err(_) => ToolRun {
            argv,
            limits: json!({}),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..ToolRun::default()
        },
    };
    let mut input = RecordInput::tool_run(actor(call), tool.as_str(), &record);
    if let Err(e) = &run {
        input = input.with_outcome(format!("error: {}", redact(&e.to_string())));
    }
    let audited = gate.audit().append(input);
    let mut result = match (run, audited) {
        (Ok(r), Ok(_)) => r,
        (Ok(mut r), Err(e)) => {
            r.redact_with(redact);
            return Err(InvokeError::RanUnaudited {
                tool: tool.as_str().to_string(),
                audit: redact(&e.to_string()),
                result: Box::new(r),
                decision: Box::new(go.decision),
            });
        }
        (Err(_), Err(e)) => return Err(InvokeError::Audit(e.to_string())),
        (Err(e), Ok(_)) => return Err(e.into()),
    };
    result.redact_with(redact);
    Ok(Invoked::Ran {
        result,
        decision: go.decision,
        approval: go.approval,
    })
}
