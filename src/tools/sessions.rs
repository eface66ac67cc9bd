//! `sessions_list`, `sessions_history`, `sessions_send`: the agent looks at the user's other
//! sessions and posts into them.
//!
//! Invariants:
//! - Reading is decided by Cedar `session.read` on the session (`Session::"*"` for a list),
//!   with `owner` the user the session belongs to (the default policies allow owners their
//!   own sessions only); a list holds only the caller's sessions whatever the policy says.
//! - Posting is decided by Cedar `sessions_send` like `send_message` (`target`,
//!   `target_owner`, `same_conversation`, `tainted`): by default a tainted session needs the
//!   owner's approval, and another user's session is forbidden. The text arrives in the
//!   target session fenced as untrusted (it was written by a model) and taints it.
//! - The sessions live in the agent's transcript store, reached through a [`SessionStore`]
//!   the agent attaches (`Sandbox::with_sessions`); without one the tools are not offered.
//! - What comes back (other sessions' messages, titles) is tool output: fenced and tainting.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::gated::{self, Gated};
use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult};
use crate::approvals::Approvals;
use crate::gate::{Authorized, CallContext, Gate, StepContext};
use crate::policy::{Action, PolicyRequest, Tool};

/// Messages returned when the model does not say, and the most.
pub const DEFAULT_HISTORY: u32 = 20;
pub const MAX_HISTORY: u32 = 200;
/// The longest text posted.
pub const MAX_SEND_BYTES: usize = 32 * 1024;

pub const LIST_DESCRIPTION: &str = "List your sessions (other conversations with you: chats, cron jobs, the web page) with when they were last active.";
pub const HISTORY_DESCRIPTION: &str =
    "Read the latest messages of one of your sessions (by its key, as sessions_list shows it).";
pub const SEND_DESCRIPTION: &str = "Post a message into another of your sessions: it starts a turn there, shown as a message from this session.";

pub fn list_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {}})
}

pub fn history_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["session"], "properties": {
        "session": {"type": "string", "description": "the session key"},
        "limit": {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY}
    }})
}

pub fn send_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["session", "text"], "properties": {
        "session": {"type": "string", "description": "the session key to post into"},
        "text": {"type": "string"}
    }})
}

/// `sessions_list` arguments: none.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsListArgs {}

/// `sessions_history` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsHistoryArgs {
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// `sessions_send` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSendArgs {
    pub session: String,
    pub text: String,
}

/// Where sessions live (the agent's transcripts). Errors are sentences for the model.
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// The user a session belongs to; `None` when there is no such session.
    fn owner(&self, session: &str) -> Result<Option<String>, String>;
    /// The sessions of `user` (metadata: key, channel, times, message count, tainted).
    fn list(&self, user: &str) -> Result<Vec<Value>, String>;
    /// The last `limit` messages of `session` (which is `user`'s), oldest first.
    fn history(&self, user: &str, session: &str, limit: u32) -> Result<Vec<Value>, String>;
    /// Starts a turn of `user` in `target` with `text` (fenced as untrusted, tainting
    /// `target`), sent from session `from`; returns the new run's id.
    fn post(&self, user: &str, from: &str, target: &str, text: &str) -> Result<String, String>;
}

fn session_uid(key: &str) -> Result<cedar_policy::EntityUid, InvokeError> {
    format!("Chitin::Session::{}", Value::String(key.to_string()))
        .parse()
        .map_err(|e| InvokeError::InvalidArgs {
            tool: String::new(),
            message: format!("invalid session key: {e}"),
        })
}

fn user_entity(user: &str) -> Value {
    json!({"__entity": {"type": "Chitin::User", "id": user}})
}

/// Runs what an `Authorized` for `sessions_list` covers.
pub fn sessions_list(
    auth: &Authorized,
    store: &dyn SessionStore,
    call: &CallContext,
    args: &SessionsListArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::SessionsList, args)?;
    let started = Instant::now();
    let list = store
        .list(&call.user)
        .map_err(|e| ToolError::InvalidArgs(format!("sessions_list: {e}")))?;
    Ok(gated::output(
        started,
        json!({"current": call.session, "sessions": list}),
    ))
}

/// Runs what an `Authorized` for `sessions_history` covers.
pub fn sessions_history(
    auth: &Authorized,
    store: &dyn SessionStore,
    call: &CallContext,
    args: &SessionsHistoryArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::SessionsHistory, args)?;
    let started = Instant::now();
    let messages = store
        .history(
            &call.user,
            &args.session,
            args.limit.unwrap_or(DEFAULT_HISTORY),
        )
        .map_err(|e| ToolError::InvalidArgs(format!("sessions_history: {e}")))?;
    Ok(gated::output(
        started,
        json!({"session": args.session, "messages": messages}),
    ))
}

/// Runs what an `Authorized` for `sessions_send` covers.
pub fn sessions_send(
    auth: &Authorized,
    store: &dyn SessionStore,
    call: &CallContext,
    args: &SessionsSendArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::SessionsSend, args)?;
    let started = Instant::now();
    let run = store
        .post(&call.user, &call.session, &args.session, &args.text)
        .map_err(|e| ToolError::InvalidArgs(format!("sessions_send: {e}")))?;
    Ok(gated::output(
        started,
        json!({"session": args.session, "posted": true, "run_id": run}),
    ))
}

/// Runs one `sessions_*` call (the tool path of [`super::invoke::invoke`]).
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    tool: Tool,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let Some(store) = sandbox.sessions().map(Arc::clone) else {
        let e = gated::invalid(
            tool,
            "sessions are kept by the agent; this runtime has none",
        );
        return Err(gated::refused(gate, call, tool, e, args));
    };
    let user = gated::user_uid(&call.user)?;
    let started = Instant::now();
    let owner_of = |session: &str| -> Result<String, InvokeError> {
        match store.owner(session) {
            Ok(Some(o)) => Ok(o),
            Ok(None) => Err(gated::refused(
                gate,
                call,
                tool,
                gated::invalid(tool, format!("no session `{}`", session.escape_default())),
                args,
            )),
            Err(e) => Err(gated::invalid(tool, e)),
        }
    };
    match tool {
        Tool::SessionsList => {
            let parsed: SessionsListArgs = gated::parse(gate, call, tool, args)?;
            let norm = json!({});
            let mut ctx = gated::base_context(call, step, false);
            ctx.insert("op".into(), json!("list"));
            ctx.insert("owner".into(), user_entity(&call.user));
            let req = PolicyRequest::new(user, Action::SessionRead, session_uid("*")?, ctx);
            let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
                Gated::Go(g) => g,
                Gated::Done(i) => return Ok(i),
            };
            let run = sessions_list(&go.auth, store.as_ref(), call, &parsed);
            gated::finish(gate, call, tool, &[tool.as_str().into()], started, run, go)
        }
        Tool::SessionsHistory => {
            let parsed: SessionsHistoryArgs = gated::parse(gate, call, tool, args)?;
            if parsed
                .limit
                .is_some_and(|l| !(1..=MAX_HISTORY).contains(&l))
            {
                let e = gated::invalid(tool, format!("limit must be 1 to {MAX_HISTORY}"));
                return Err(gated::refused(gate, call, tool, e, args));
            }
            let owner = owner_of(&parsed.session)?;
            let norm =
                serde_json::to_value(&parsed).map_err(|e| gated::invalid(tool, e.to_string()))?;
            let mut ctx = gated::base_context(call, step, false);
            ctx.insert("op".into(), json!("history"));
            ctx.insert("owner".into(), user_entity(&owner));
            let req = PolicyRequest::new(
                user,
                Action::SessionRead,
                session_uid(&parsed.session)?,
                ctx,
            );
            let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
                Gated::Go(g) => g,
                Gated::Done(i) => return Ok(i),
            };
            let run = sessions_history(&go.auth, store.as_ref(), call, &parsed);
            let argv = vec![tool.as_str().to_string(), parsed.session.clone()];
            gated::finish(gate, call, tool, &argv, started, run, go)
        }
        Tool::SessionsSend => {
            let parsed: SessionsSendArgs = gated::parse(gate, call, tool, args)?;
            let bad = if parsed.text.trim().is_empty() {
                Some("text is empty".to_string())
            } else if parsed.text.len() > MAX_SEND_BYTES {
                Some(format!("text is larger than {MAX_SEND_BYTES} bytes"))
            } else if parsed.session == call.session {
                Some("that is this session; answer here instead of posting to it".to_string())
            } else {
                None
            };
            if let Some(m) = bad {
                return Err(gated::refused(
                    gate,
                    call,
                    tool,
                    gated::invalid(tool, m),
                    args,
                ));
            }
            let owner = owner_of(&parsed.session)?;
            let norm =
                serde_json::to_value(&parsed).map_err(|e| gated::invalid(tool, e.to_string()))?;
            let mut ctx = gated::base_context(call, step, true);
            ctx.insert("target".into(), json!(parsed.session));
            ctx.insert("target_owner".into(), user_entity(&owner));
            ctx.insert(
                "same_conversation".into(),
                json!(parsed.session == call.session),
            );
            let req = PolicyRequest::new(user, Action::SessionsSend, tool.uid(), ctx);
            let go = match gated::decide(gate, approvals, &[req], &norm, norm.clone())? {
                Gated::Go(g) => g,
                Gated::Done(i) => return Ok(i),
            };
            let run = sessions_send(&go.auth, store.as_ref(), call, &parsed);
            let argv = vec![tool.as_str().to_string(), parsed.session.clone()];
            gated::finish(gate, call, tool, &argv, started, run, go)
        }
        _ => Err(InvokeError::UnknownTool(tool.as_str().into())),
    }
}
