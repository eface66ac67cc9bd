//! The tool path: a tool call (name + JSON arguments, as a model or an API caller sends it)
//! through strict parsing, the gate, the sandbox and the audit log.
//!
//! Invariants:
//! - Unknown tools and arguments that do not parse strictly (unknown fields such as an
//!   injected `"approved": true`, wrong types) never reach the gate's allow path: they are
//!   recorded as refusals and returned as errors.
//! - The gate sees, and the `Authorized` covers, the normalized parsed arguments; the tool runs
//!   exactly those (the tools re-check the binding).
//! - Every run is recorded (argv, limits, exit, which limit killed it, `cancelled` /
//!   `run-timeout` when a stopped run killed it) after it ends; output is redacted (with the
//!   gate's redactor) before anyone sees it or it is recorded. When that record cannot be
//!   written, the answer is [`InvokeError::RanUnaudited`]: the call ran, never "nothing ran".

use serde::Serialize;
use serde_json::{Value, json};

use super::{
    EditFileArgs, ExecArgs, ListDirArgs, ReadFileArgs, Sandbox, ToolError, ToolResult, Workspace,
    WriteFileArgs, fetch::WebFetchArgs, message::SendMessageArgs, prompt_guard,
};
use crate::approvals::{ApprovalError, Approvals};
use crate::gate::{Authorized, CallContext, Gate, GateError, StepContext, Verdict};
use crate::policy::{Decision, Tool};
use chitin_audit::{GateDecision, RecordInput, ToolRun};

pub use crate::policy::{INVOKABLE, TOOLS};

/// Errors of a tool call. Each one means nothing ran, except [`InvokeError::RanUnaudited`].
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error(
        "unknown tool `{0}`; available tools: exec, read_file, write_file, edit_file, list_dir, web_fetch, web_search, apply_patch (and, where configured, browser, send_message, cron, memory_search, memory_get, sessions_list, sessions_history, sessions_send)"
    )]
    UnknownTool(String),
    #[error("invalid arguments for `{tool}`: {message}")]
    InvalidArgs { tool: String, message: String },
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("audit log unavailable: {0}")]
    Audit(String),
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// The tool RAN (its effects happened) but the audit record of the run could not be
    /// written afterwards. Carries the (redacted) result: never report this as "nothing ran".
    #[error(
        "the `{tool}` call ran (its effects happened), but the audit record of the run could not be written: {audit}; check the audit log (`chitin doctor`) before running more tools"
    )]
    RanUnaudited {
        tool: String,
        audit: String,
        result: Box<ToolResult>,
        decision: Box<Decision>,
    },
}

/// What happened to a tool call.
#[derive(Debug)]
pub enum Invoked {
    /// Allowed and run (the result may still be a failing command). `approval` is the id of
    /// the approval redeemed for it, if it needed one.
    Ran {
        result: ToolResult,
        decision: Decision,
        approval: Option<String>,
    },
    /// Denied by policy.
    Denied(Decision),
    /// Needs an approval bound to `request_digest` before it can run. `args` are the
    /// normalized arguments that digest covers: open the approval with exactly these, so it
    /// shows what it binds.
    ApprovalRequired {
        decision: Decision,
        request_digest: [u8; 32],
        args: Value,
    },
}

/// A parsed tool call.
enum Parsed {
    Exec(ExecArgs),
    Read(ReadFileArgs),
    Write(WriteFileArgs),
    Edit(EditFileArgs),
    List(ListDirArgs),
    Fetch(WebFetchArgs),
    Send(SendMessageArgs),
}

impl Parsed {
    fn tool(&self) -> Tool {
        match self {
            Self::Exec(_) => Tool::Exec,
            Self::Read(_) => Tool::ReadFile,
            Self::Write(_) => Tool::WriteFile,
            Self::Edit(_) => Tool::EditFile,
            Self::List(_) => Tool::ListDir,
            Self::Fetch(_) => Tool::WebFetch,
            Self::Send(_) => Tool::SendMessage,
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(tool: &str, args: &Value) -> Result<T, InvokeError> {
    super::parse_args(args).map_err(|e| InvokeError::InvalidArgs {
        tool: tool.into(),
        message: match e {
            ToolError::InvalidArgs(m) => m,
            other => other.to_string(),
        },
    })
}

fn normalized<T: Serialize>(args: &T) -> Result<Value, InvokeError> {
    serde_json::to_value(args).map_err(|e| InvokeError::InvalidArgs {
        tool: String::new(),
        message: e.to_string(),
    })
}

/// Runs one tool call for `call.user`. When the gate asks for approval and `approvals` is
/// given, a granted approval bound to exactly this call is redeemed (once) and the call is
/// decided again as approved; otherwise the approval request is returned. There is no way to
/// pass "approved" in: it exists only as a redeemed approval.
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    tool: &str,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    invoke_step(gate, sandbox, call, None, tool, args, approvals)
}

/// Runs one of the tools that make their own Cedar requests under a `tool.run` span (what ran,
/// how it ended, how long it took; never its arguments), as the built-in tools' runs have.
fn traced(
    tool: &str,
    sandbox: &'static str,
    run: impl FnOnce() -> Result<Invoked, InvokeError>,
) -> Result<Invoked, InvokeError> {
    let span = tracing::info_span!(
        "tool.run",
        chitin.tool = tool,
        chitin.sandbox = sandbox,
        chitin.outcome = tracing::field::Empty,
        chitin.duration_ms = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let _in_run = span.enter();
    let started = std::time::Instant::now();
    let result = run();
    let outcome = match &result {
        Ok(Invoked::Ran { .. }) => "ran",
        Ok(Invoked::Denied(_)) => "denied",
        Ok(Invoked::ApprovalRequired { .. }) => "approval_required",
        Err(_) => "error",
    };
    span.record("chitin.outcome", outcome);
    // An i64, as the built-in tools' runs record it (OTLP has no unsigned integers).
    span.record(
        "chitin.duration_ms",
        i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX),
    );
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

/// [`invoke`] for a call a workflow step makes: `step` names the workflow, its file's digest
/// and the step in the Cedar context (and so in the digest an approval binds).
pub fn invoke_step(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    tool: &str,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    if tool == super::cron::TOOL {
        return super::cron::invoke(gate, sandbox, call, args, approvals);
    }
    // The tools that build their own Cedar requests (each run under its own `tool.run` span;
    // their decisions are its children).
    match Tool::from_id(tool) {
        Some(Tool::ApplyPatch) => {
            return traced(tool, "spawned", || {
                super::patch::invoke(gate, sandbox, call, step, args, approvals)
            });
        }
        Some(Tool::WebSearch) => {
            return traced(tool, "none", || {
                super::search::invoke(gate, sandbox, call, step, args, approvals)
            });
        }
        Some(Tool::Browser) => {
            return traced(tool, "browser", || {
                super::browser::invoke(gate, sandbox, call, step, args, approvals)
            });
        }
        Some(t @ (Tool::MemorySearch | Tool::MemoryGet)) => {
            return traced(tool, "none", || {
                super::memory::invoke(gate, sandbox, call, step, t, args, approvals)
            });
        }
        Some(t @ (Tool::SessionsList | Tool::SessionsHistory | Tool::SessionsSend)) => {
            return traced(tool, "none", || {
                super::sessions::invoke(gate, sandbox, call, step, t, args, approvals)
            });
        }
        _ => {}
    }
    if tool.starts_with(super::mcp::PREFIX) {
        return traced(tool, "server", || {
            super::mcp::invoke(gate, sandbox, call, step, tool, args, approvals)
        });
    }
    let actor = format!("Chitin::User::{}", Value::String(call.user.clone()));
    // `send_message` is invocable too; it runs only where a messenger is attached (channels).
    let known = Tool::from_id(tool).filter(|t| INVOKABLE.contains(t) || *t == Tool::SendMessage);
    let parsed = match known {
        Some(Tool::Exec) => parse(tool, args).map(Parsed::Exec),
        Some(Tool::ReadFile) => parse(tool, args).map(Parsed::Read),
        Some(Tool::WriteFile) => parse(tool, args).map(Parsed::Write),
        Some(Tool::EditFile) => parse(tool, args).map(Parsed::Edit),
        Some(Tool::ListDir) => parse(tool, args).map(Parsed::List),
        Some(Tool::WebFetch) => parse::<WebFetchArgs>(tool, args).and_then(|a| {
            a.normalize()
                .map(Parsed::Fetch)
                .map_err(|e| InvokeError::InvalidArgs {
                    tool: tool.into(),
                    message: e.to_string(),
                })
        }),
        Some(Tool::SendMessage) => parse(tool, args).map(Parsed::Send),
        // Filtered out above: the workflow runner decides and runs workflows.
        // The workflow runner decides and runs workflows; the tools above returned already.
        Some(
            Tool::Workflow
            | Tool::WebSearch
            | Tool::ApplyPatch
            | Tool::MemorySearch
            | Tool::MemoryGet
            | Tool::SessionsList
            | Tool::SessionsHistory
            | Tool::SessionsSend
            | Tool::Browser,
        )
        | None => Err(InvokeError::UnknownTool(tool.to_string())),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            refuse(gate, &actor, tool, &e, args)?;
            return Err(e);
        }
    };
    // The normalized arguments: what the gate judges, what an approval binds, what runs.
    let norm = match &parsed {
        Parsed::Exec(a) => normalized(a)?,
        Parsed::Read(a) => normalized(a)?,
        Parsed::Write(a) => normalized(a)?,
        Parsed::Edit(a) => normalized(a)?,
        Parsed::List(a) => normalized(a)?,
        Parsed::Fetch(a) => normalized(a)?,
        Parsed::Send(a) => normalized(a)?,
    };
    // Network destinations must parse before anything is decided.
    let mut sb = sandbox.clone().for_call(call);
    if let Parsed::Exec(a) = &parsed {
        sb.net = Vec::new();
        for d in &a.network {
            match d.parse() {
                Ok(dest) => sb.net.push(dest),
                Err(e) => {
                    let err = InvokeError::InvalidArgs {
                        tool: tool.into(),
                        message: format!("{e}"),
                    };
                    refuse(gate, &actor, tool, &err, args)?;
                    return Err(err);
                }
            }
        }
    }
    let tool_id = parsed.tool();
    let mut verdict = gate.check_tool_call_for(call, step, tool_id, &norm, None)?;
    let mut redeemed_id = None;
    if let (Verdict::ApprovalRequired { request_digest, .. }, Some(ap)) = (&verdict, approvals) {
        match ap.redeem(request_digest) {
            Ok(redeemed) => {
                redeemed_id = Some(redeemed.approval().id.clone());
                verdict =
                    gate.check_tool_call_for(call, step, tool_id, &norm, Some(redeemed.proof()))?;
            }
            Err(ApprovalError::NotApproved) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (auth, decision) = match verdict {
        Verdict::Allowed(auth, decision) => (auth, decision),
        Verdict::Denied(d) => return Ok(Invoked::Denied(d)),
        Verdict::ApprovalRequired {
            decision,
            request_digest,
            resolved,
        } => {
            // What a person is shown: the arguments, and what the gate resolved from them
            // (`resolved`: e.g. the file a workspace symlink leads to), both bound by the digest.
            let mut shown = norm;
            if let Value::Object(m) = &mut shown
                && !resolved.is_empty()
            {
                m.insert("resolved".into(), Value::Object(resolved));
            }
            return Ok(Invoked::ApprovalRequired {
                decision,
                request_digest,
                args: shown,
            });
        }
    };
    // The run, after the decision: a sibling of the gate's spans under the turn.
    // `list_dir` is read by the gateway through directory descriptors (a path through a
    // symlink goes to the sandboxed helper).
    let sandbox = match parsed {
        Parsed::Fetch(_) | Parsed::Send(_) => "none",
        Parsed::List(_) => "descriptors",
        _ => "spawned",
    };
    let span = tracing::info_span!(
        "tool.run",
        chitin.tool = tool_id.as_str(),
        chitin.sandbox = sandbox,
        chitin.approved = redeemed_id.is_some(),
        process.exit.code = tracing::field::Empty,
        chitin.signal = tracing::field::Empty,
        chitin.killed_by = tracing::field::Empty,
        chitin.duration_ms = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    let _in_run = span.enter();
    let ws = Workspace::new(&call.workspace)?;
    let started = std::time::Instant::now();
    // Around a sandboxed run of a tainted call: which prompt files it changed (recorded as
    // untrusted); an approved or untainted write of one vouches for its content.
    let target = match &parsed {
        Parsed::Write(a) => ws
            .resolve(&a.path)
            .ok()
            .and_then(|p| prompt_guard::Target::of(&p.rel, Some(&a.content))),
        Parsed::Edit(a) => ws
            .resolve(&a.path)
            .ok()
            .and_then(|p| prompt_guard::Target::of(&p.rel, None)),
        _ => None,
    };
    let watch = prompt_guard::Watch {
        call,
        actor: &actor,
        tool,
        approved: redeemed_id.is_some(),
        target: target.as_ref(),
    };
    let (run, watched) = match &parsed {
        // `web_fetch` runs no sandbox and touches no file.
        Parsed::Fetch(_) | Parsed::Send(_) => (run_parsed(&auth, &sb, &ws, &parsed), Ok(())),
        _ => match prompt_guard::Guard::before(sb.prompt_marks(), ws.root(), watch) {
            Ok(guard) => {
                let run = run_parsed(&auth, &sb, &ws, &parsed);
                let watched = guard.after(gate.audit(), run.is_ok()).map(|_| ());
                (run, watched)
            }
            Err(e) => (Err(ToolError::from(e)), Ok(())),
        },
    };
    let argv = match &parsed {
        Parsed::Exec(a) => a.argv.clone(),
        Parsed::Fetch(a) => vec![tool.to_string(), a.method.clone(), a.url.clone()],
        Parsed::Send(a) => vec![tool.to_string(), a.channel.clone(), a.target.clone()],
        _ => vec![tool.to_string(), path_of(&parsed).to_string()],
    };
    let redact_str = |s: &str| gate.redact(s);
    let limits = json!({
        "timeout_secs": sb.config_section.timeout_secs,
        "memory_mb": sb.config_section.memory_mb,
        "max_procs": sb.config_section.max_procs,
        "cpu_secs": sb.config_section.cpu_secs,
        "network": sb.net.iter().map(|d| format!("{}:{}", d.host, d.port)).collect::<Vec<_>>(),
    });
    let record = match &run {
        Ok(r) => ToolRun {
            argv: argv.iter().map(|a| redact_str(a)).collect(),
            limits,
            exit_code: r.exit_code,
            signal: r.signal,
            killed_by: r.killed.clone(),
            duration_ms: r.duration_ms,
        },
        Err(_) => ToolRun {
            argv: argv.iter().map(|a| redact_str(a)).collect(),
            limits,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ..ToolRun::default()
        },
    };
    match &run {
        Ok(r) => {
            if let Some(code) = r.exit_code {
                span.record("process.exit.code", code);
            }
            if let Some(sig) = r.signal {
                span.record("chitin.signal", sig);
            }
            if let Some(k) = &r.killed {
                span.record("chitin.killed_by", k.as_str());
            }
            if r.exit_code.is_some_and(|c| c != 0) || r.killed.is_some() {
                span.record("otel.status_code", "ERROR");
            }
        }
        Err(_) => {
            span.record("otel.status_code", "ERROR");
        }
    }
    span.record(
        "chitin.duration_ms",
        i64::try_from(record.duration_ms).unwrap_or(i64::MAX),
    );
    let mut input = RecordInput::tool_run(&actor, tool, &record);
    if let Err(e) = &run {
        input = input.with_outcome(format!("error: {}", redact_str(&e.to_string())));
    }
    let audited = gate.audit().append(input);
    // Prompt files this run changed that could not be recorded as untrusted: report it like
    // a run whose record failed (it ran; stop before running more).
    let audited = match (audited, watched) {
        (Ok(_), Err(w)) => Err(w),
        (Ok(r), Ok(())) => Ok(r),
        (Err(e), _) => Err(e.to_string()),
    };
    let mut result = match (run, audited) {
        (Ok(r), Ok(_)) => r,
        (Ok(mut r), Err(e)) => {
            r.redact_with(|s| gate.redact(s));
            return Err(InvokeError::RanUnaudited {
                tool: tool.to_string(),
                audit: redact_str(&e.to_string()),
                result: Box::new(r),
                decision: Box::new(decision),
            });
        }
        (Err(_), Err(e)) => return Err(InvokeError::Audit(e)),
        (Err(e), Ok(_)) => return Err(e.into()),
    };
    result.redact_with(|s| gate.redact(s));
    Ok(Invoked::Ran {
        result,
        decision,
        approval: redeemed_id,
    })
}

fn run_parsed(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    parsed: &Parsed,
) -> Result<ToolResult, ToolError> {
    match parsed {
        Parsed::Exec(a) => super::exec(auth, sb, ws, a),
        Parsed::Read(a) => super::read_file(auth, sb, ws, a),
        Parsed::Write(a) => super::write_file(auth, sb, ws, a),
        Parsed::Edit(a) => super::edit_file(auth, sb, ws, a),
        Parsed::List(a) => super::list_dir(auth, sb, ws, a),
        Parsed::Fetch(a) => super::fetch::fetch(auth, a),
        Parsed::Send(a) => super::message::send_message(auth, sb, a),
    }
}

fn path_of(parsed: &Parsed) -> &str {
    match parsed {
        Parsed::Exec(_) | Parsed::Fetch(_) | Parsed::Send(_) => "",
        Parsed::Read(a) => &a.path,
        Parsed::Write(a) => &a.path,
        Parsed::Edit(a) => &a.path,
        Parsed::List(a) => &a.path,
    }
}

/// Records a call that never reached a decision (unknown tool, bad arguments) as a refusal.
pub(super) fn refuse(
    gate: &Gate,
    actor: &str,
    tool: &str,
    err: &InvokeError,
    args: &Value,
) -> Result<(), InvokeError> {
    let r = |s: &str| gate.redact(s);
    let resource = format!("Chitin::Tool::{}", Value::String(tool.to_string()));
    let input = RecordInput::gate_decision(
        actor,
        tool,
        resource,
        GateDecision::Deny,
        Vec::new(),
        crate::gate::bounded_text("args", &r(&args.to_string())),
    )
    .with_outcome(format!("refused: {}", r(&err.to_string())));
    gate.audit()
        .append(input)
        .map(|_| ())
        .map_err(|e| InvokeError::Audit(e.to_string()))
}
