//! MCP tools (`mcp__<server>__<tool>`): the tool path of a call to a tool of a configured MCP
//! server. The servers themselves (processes in the sandbox, HTTP clients, the trust pins)
//! live in `crate::mcp`, reached through the [`McpTools`] the CLI attaches to the sandbox
//! (`Sandbox::with_mcp`), so this module does not depend on it.
//!
//! Invariants:
//! - A call names a tool that is pinned (`chitin mcp trust SERVER`) and unchanged since; any
//!   other name is refused before the gate, recorded, and nothing is sent to the server.
//! - Arguments are a JSON object that satisfies the tool's schema's `required`,
//!   `additionalProperties: false` and top-level property types; anything else is refused
//!   before the gate.
//! - Every call is decided by Cedar `mcp.call` on `Chitin::McpTool::"<server>/<tool>"`
//!   (attributes `server`, `tool`, `risk`), context `origin`, `session`, `tainted`,
//!   `server`, `tool`, `args_digest` and `args` (an `McpArgs` entity whose tags are the
//!   declared arguments' values as strings), bound to the full arguments like a tool call:
//!   an approval covers exactly one call.
//! - The server is asked only with an `Authorized` for exactly this call; the call and its
//!   outcome are recorded as a `tool_run`; the result is redacted, and the agent fences it as
//!   untrusted and taints the session (like every tool result).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult};
use crate::approvals::{ApprovalError, Approvals};
use crate::gate::{Authorized, CallContext, Gate, StepContext, Verdict};
use crate::policy::{Action, PolicyRequest};
use chitin_audit::{RecordInput, ToolRun};

/// What every MCP tool's name starts with.
pub const PREFIX: &str = "mcp__";

/// The largest arguments object accepted (serialized), in bytes.
pub const MAX_ARGS_BYTES: usize = 256 * 1024;

/// One callable MCP tool: pinned by the owner and unchanged since. `description`, `title`
/// and `input_schema` come from the server: untrusted text, shown to the model only fenced.
#[derive(Debug, Clone, PartialEq)]
pub struct McpToolInfo {
    pub server: String,
    pub tool: String,
    pub title: Option<String>,
    pub description: String,
    pub input_schema: Value,
    /// `low`, `medium` or `high` (from the configuration).
    pub risk: &'static str,
}

impl McpToolInfo {
    /// `mcp__<server>__<tool>`.
    pub fn name(&self) -> String {
        tool_name(&self.server, &self.tool)
    }

    /// The argument names the schema declares (top-level `properties`).
    pub fn declared_args(&self) -> Vec<String> {
        self.input_schema
            .get("properties")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// What a server answered to a call (already capped by the hub).
#[derive(Debug, Clone, PartialEq)]
pub struct McpOutput {
    /// The result's `content` blocks (text, images, resources) as the server sent them.
    pub content: Value,
    /// `structuredContent`, if any.
    pub structured: Option<Value>,
    /// The server said the tool failed (`isError`).
    pub is_error: bool,
    /// The images of `content` models take as images (each replaced there by a note); the
    /// agent sends them as image parts.
    pub images: Vec<crate::providers::ImagePart>,
}

/// The hub of configured MCP servers, as the tool path and the agent see it.
pub trait McpTools: Send + Sync + std::fmt::Debug {
    /// The tools offered now: pinned and unchanged (servers are started or asked again as
    /// needed; a server that cannot be reached offers nothing).
    fn offered(&self) -> Vec<McpToolInfo>;
    /// The callable tool `server`/`tool`, or why it is not (a sentence for the model).
    fn resolve(&self, server: &str, tool: &str) -> Result<McpToolInfo, String>;
    /// Sends one decided call. `auth` must be the gate's `mcp.call` allow for exactly
    /// `args`; `cancel` stops waiting when the run is stopped. Errors are sentences (the
    /// server crashed, timed out, answered too much, ...); the gateway goes on.
    fn call(
        &self,
        auth: &Authorized,
        server: &str,
        tool: &str,
        args: &Value,
        cancel: Option<&super::cancel::Cancel>,
    ) -> Result<McpOutput, String>;
}

/// `mcp__<server>__<tool>`.
pub fn tool_name(server: &str, tool: &str) -> String {
    format!("{PREFIX}{server}__{tool}")
}

/// Splits `mcp__<server>__<tool>` (server names never contain `__`).
pub fn split_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (server, tool) = rest.split_once("__")?;
    (!server.is_empty() && !tool.is_empty()).then_some((server, tool))
}

/// `Chitin::McpTool::"<server>/<tool>"`.
pub fn resource_uid(server: &str, tool: &str) -> String {
    format!(
        "Chitin::McpTool::{}",
        Value::String(format!("{server}/{tool}"))
    )
}

/// `sha256:<hex>` of the canonical JSON of `args`.
pub fn args_digest(args: &Value) -> String {
    let mut s = String::new();
    crate::gate::canonical_json(args, &mut s);
    let d = Sha256::digest(s.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The value of an argument as a Cedar tag: strings as they are, anything else as JSON text.
fn tag_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The Cedar request and its entities (`McpTool`, `McpArgs`) for one call. `approved` is set
/// by the gate.
pub fn policy_request(
    call: &CallContext,
    step: Option<&StepContext>,
    info: &McpToolInfo,
    args: &Value,
) -> Result<(PolicyRequest, Vec<Value>), String> {
    let uid = |s: String| {
        s.parse::<cedar_policy::EntityUid>()
            .map_err(|e| format!("invalid entity: {e}"))
    };
    let digest = args_digest(args);
    let origin = match call.origin {
        crate::gate::Origin::Model => "model",
        crate::gate::Origin::User => "user",
        crate::gate::Origin::Automation => "automation",
    };
    let mut context = Map::new();
    context.insert("origin".into(), json!(origin));
    context.insert("session".into(), json!(call.session));
    context.insert("tainted".into(), json!(call.tainted));
    context.insert("server".into(), json!(info.server));
    context.insert("tool".into(), json!(info.tool));
    context.insert("args_digest".into(), json!(digest));
    context.insert(
        "args".into(),
        json!({"__entity": {"type": "Chitin::McpArgs", "id": digest}}),
    );
    if let Some(st) = step {
        st.insert_into(&mut context);
    }
    let declared = info.declared_args();
    let tags: BTreeMap<String, String> = args
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| declared.contains(k))
                .map(|(k, v)| (k.clone(), tag_value(v)))
                .collect()
        })
        .unwrap_or_default();
    let entities = vec![
        json!({
            "uid": {"type": "Chitin::McpTool", "id": format!("{}/{}", info.server, info.tool)},
            "attrs": {"server": info.server, "tool": info.tool, "risk": info.risk},
            "parents": []
        }),
        json!({
            "uid": {"type": "Chitin::McpArgs", "id": digest},
            "attrs": {},
            "parents": [],
            "tags": tags
        }),
    ];
    let req = PolicyRequest {
        principal: uid(format!(
            "Chitin::User::{}",
            Value::String(call.user.clone())
        ))?,
        action: Action::McpCall.uid(),
        resource: uid(resource_uid(&info.server, &info.tool))?,
        context,
    };
    Ok((req, entities))
}

/// Checks `args` against the parts of the tool's schema that can be checked without a
/// schema engine: an object, `required` present, no unknown key when `additionalProperties`
/// is false, and the JSON type of each declared property with a simple `type`.
pub fn check_args(schema: &Value, args: &Value) -> Result<(), String> {
    let Some(obj) = args.as_object() else {
        return Err("the arguments must be a JSON object".into());
    };
    let len = args.to_string().len();
    if len > MAX_ARGS_BYTES {
        return Err(format!(
            "the arguments are {len} bytes; at most {MAX_ARGS_BYTES}"
        ));
    }
    let props = schema.get("properties").and_then(Value::as_object);
    if let Some(req) = schema.get("required").and_then(Value::as_array) {
        for r in req.iter().filter_map(Value::as_str) {
            if !obj.contains_key(r) {
                return Err(format!(
                    "missing required argument `{}`",
                    r.escape_default()
                ));
            }
        }
    }
    if schema.get("additionalProperties") == Some(&Value::Bool(false)) {
        for k in obj.keys() {
            if !props.is_some_and(|p| p.contains_key(k)) {
                return Err(format!("unknown argument `{}`", k.escape_default()));
            }
        }
    }
    if let Some(p) = props {
        for (k, v) in obj {
            let Some(ty) = p.get(k).and_then(|d| d.get("type")).and_then(Value::as_str) else {
                continue;
            };
            let ok = match ty {
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "array" => v.is_array(),
                "object" => v.is_object(),
                "null" => v.is_null(),
                _ => true,
            };
            if !ok {
                return Err(format!(
                    "argument `{}` must be of type {ty}",
                    k.escape_default()
                ));
            }
        }
    }
    Ok(())
}

/// Runs one MCP tool call for `call.user` (the tool path of [`super::invoke::invoke_step`]).
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    name: &str,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let actor = format!("Chitin::User::{}", Value::String(call.user.clone()));
    let refused = |e: InvokeError| -> Result<Invoked, InvokeError> {
        super::invoke::refuse(gate, &actor, name, &e, args)?;
        Err(e)
    };
    let invalid = |message: String| InvokeError::InvalidArgs {
        tool: name.to_string(),
        message,
    };
    let (Some(hub), Some((server, tool))) = (sandbox.mcp(), split_name(name)) else {
        return refused(InvokeError::UnknownTool(name.to_string()));
    };
    let info = match hub.resolve(server, tool) {
        Ok(i) => i,
        Err(why) => return refused(invalid(why)),
    };
    if let Err(why) = check_args(&info.input_schema, args) {
        return refused(invalid(why));
    }
    let (req, entities) = match policy_request(call, step, &info, args) {
        Ok(r) => r,
        Err(e) => return refused(invalid(e)),
    };
    let mut verdict = gate.check_call_with_entities(&req, args, &entities, None)?;
    let mut redeemed_id = None;
    if let (Verdict::ApprovalRequired { request_digest, .. }, Some(ap)) = (&verdict, approvals) {
        match ap.redeem(request_digest) {
            Ok(redeemed) => {
                redeemed_id = Some(redeemed.approval().id.clone());
                verdict =
                    gate.check_call_with_entities(&req, args, &entities, Some(redeemed.proof()))?;
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
            ..
        } => {
            return Ok(Invoked::ApprovalRequired {
                decision,
                request_digest,
                args: args.clone(),
            });
        }
    };
    let started = std::time::Instant::now();
    let done = hub.call(&auth, server, tool, args, sandbox.cancel.as_ref());
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut input = RecordInput::tool_run(
        &actor,
        name,
        &ToolRun {
            argv: vec![name.to_string(), args_digest(args)],
            limits: json!({"server": server}),
            exit_code: Some(match &done {
                Ok(o) if !o.is_error => 0,
                _ => 1,
            }),
            duration_ms,
            ..ToolRun::default()
        },
    );
    if let Err(e) = &done {
        input = input.with_outcome(format!("error: {}", gate.redact(e)));
    }
    let audited = gate.audit().append(input);
    let output = match (done, audited) {
        (Ok(o), Ok(_)) => o,
        (Ok(o), Err(e)) => {
            let mut r = result(server, tool, &o, duration_ms);
            r.redact_with(|s| gate.redact(s));
            return Err(InvokeError::RanUnaudited {
                tool: name.to_string(),
                audit: e.to_string(),
                result: Box::new(r),
                decision: Box::new(decision),
            });
        }
        (Err(_), Err(e)) => return Err(InvokeError::Audit(e.to_string())),
        (Err(e), Ok(_)) => {
            return Err(ToolError::Mcp(e).into());
        }
    };
    let mut r = result(server, tool, &output, duration_ms);
    r.redact_with(|s| gate.redact(s));
    Ok(Invoked::Ran {
        result: r,
        decision,
        approval: redeemed_id,
    })
}

fn result(server: &str, tool: &str, o: &McpOutput, duration_ms: u64) -> ToolResult {
    let mut out = json!({
        "server": server,
        "tool": tool,
        "is_error": o.is_error,
        "content": o.content,
    });
    if let (Some(s), Value::Object(m)) = (&o.structured, &mut out) {
        m.insert("structured_content".into(), s.clone());
    }
    if let (false, Value::Object(m)) = (o.images.is_empty(), &mut out) {
        let images: Vec<Value> = o
            .images
            .iter()
            .map(|i| json!({"media_type": i.media_type, "data": i.data_base64}))
            .collect();
        m.insert("images".into(), Value::Array(images));
    }
    ToolResult {
        exit_code: Some(i32::from(o.is_error)),
        signal: None,
        killed: None,
        stdout: String::new(),
        stderr: String::new(),
        truncated: false,
        duration_ms,
        output: Some(out),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn names_split_at_the_first_separator_after_the_server() {
        assert_eq!(split_name("mcp__notes__search"), Some(("notes", "search")));
        assert_eq!(split_name("mcp__notes__a__b"), Some(("notes", "a__b")));
        assert_eq!(split_name("mcp__notes"), None);
        assert_eq!(split_name("exec"), None);
        assert_eq!(tool_name("notes", "search"), "mcp__notes__search");
    }

    #[test]
    fn arguments_are_checked_against_the_simple_parts_of_the_schema() {
        let schema = json!({"type": "object", "additionalProperties": false, "required": ["q"],
            "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}});
        assert!(check_args(&schema, &json!({"q": "x", "n": 3})).is_ok());
        assert!(
            check_args(&schema, &json!({"n": 3}))
                .unwrap_err()
                .contains("`q`")
        );
        assert!(
            check_args(&schema, &json!({"q": 1}))
                .unwrap_err()
                .contains("string")
        );
        assert!(
            check_args(&schema, &json!({"q": "x", "approved": true}))
                .unwrap_err()
                .contains("unknown")
        );
        assert!(check_args(&schema, &json!(["q"])).is_err());
    }
}
