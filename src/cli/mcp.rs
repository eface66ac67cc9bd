//! `chitin mcp list [--json] | trust SERVER | untrust SERVER`: the configured MCP servers and
//! the owner's trust pins.
//!
//! `trust` and `untrust` are decided by Cedar `mcp.trust` for the CLI operator (`[cli]
//! operator`, default the owner); a refusal prints `refused: ...` and exits 1. `list` and
//! `trust` start each server (in the sandbox) to ask it for its tools.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::{Value, json};

use super::{BoxError, CmdResult, Globals, Runtime};
use crate::clock::rfc3339;
use crate::gate::Verdict;
use crate::mcp::{Hub, ToolStatus};
use crate::policy::Action;

#[derive(Debug, Subcommand)]
pub enum McpCmd {
    /// The configured servers, whether they are trusted, and each tool's standing (trusted,
    /// changed, new, removed). Starts each server to ask for its tools.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Pin SERVER's tools as they are now: its tools are offered to the model as
    /// mcp__<server>__<tool> until their names, descriptions or schemas change.
    Trust {
        #[arg(value_name = "SERVER")]
        server: String,
    },
    /// Drop SERVER's pins: none of its tools is offered until it is trusted again.
    Untrust {
        #[arg(value_name = "SERVER")]
        server: String,
    },
}

/// The hub for the configured servers, attached to `sandbox` (unchanged when none are
/// configured). Used by the gateway, `chitin agent` and this command.
pub fn attach(
    sandbox: crate::tools::Sandbox,
    config: &crate::config::Config,
    gate: &crate::gate::Gate,
    store: &Arc<crate::store::Store>,
    secrets: &crate::secrets::SharedSecretStore,
) -> crate::tools::Sandbox {
    if config.mcp.servers.is_empty() {
        return sandbox;
    }
    let hub = hub(&sandbox, config, gate, store, secrets);
    sandbox.with_mcp(hub)
}

fn hub(
    sandbox: &crate::tools::Sandbox,
    config: &crate::config::Config,
    gate: &crate::gate::Gate,
    store: &Arc<crate::store::Store>,
    secrets: &crate::secrets::SharedSecretStore,
) -> Arc<Hub> {
    Arc::new(Hub::new(
        &config.mcp,
        gate.clone(),
        Arc::clone(store),
        sandbox,
        Some(Arc::new(crate::secrets::ToolSecrets::new(
            gate.clone(),
            secrets.clone(),
        ))),
        &config.gateway.owner,
    ))
}

pub fn run(cmd: McpCmd, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    let sandbox = super::sandbox_for(globals, &rt.config)?;
    let hub = hub(&sandbox, &rt.config, &rt.gate, &rt.store, &rt.secrets);
    match cmd {
        McpCmd::List { json } => list(&hub, json),
        McpCmd::Trust { server } => trust(&rt, &hub, &server),
        McpCmd::Untrust { server } => untrust(&rt, &hub, &server),
    }
}

fn list(hub: &Hub, json_out: bool) -> CmdResult {
    let servers = hub.servers();
    let mut reports = Vec::new();
    for s in &servers {
        reports.push(hub.report(s)?);
    }
    if json_out {
        let v: Vec<Value> = reports.iter().map(crate::mcp::report_json).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if reports.is_empty() {
        println!("no MCP servers are configured ([[mcp.servers]] in chitin.toml)");
    }
    for r in &reports {
        let trust = match &r.trust {
            Some(t) if r.identity_changed => format!(
                "trusted by {} at {}, but its command line or URL changed since: nothing offered until `chitin mcp trust {}`",
                t.trusted_by,
                rfc3339(t.trusted_ms),
                r.name
            ),
            Some(t) => format!("trusted by {} at {}", t.trusted_by, rfc3339(t.trusted_ms)),
            None => format!(
                "not trusted: nothing offered until `chitin mcp trust {}`",
                r.name
            ),
        };
        println!(
            "{}  {}  {}  {trust}{}",
            r.name,
            r.transport,
            r.target.escape_default(),
            r.protocol
                .as_ref()
                .map(|p| format!("  protocol {p}"))
                .unwrap_or_default()
        );
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
        for t in &r.tools {
            let note = match &t.status {
                ToolStatus::Trusted => String::new(),
                ToolStatus::Changed => format!(
                    "  (changed since trusted: withheld until `chitin mcp trust {}`)",
                    r.name
                ),
                ToolStatus::New => format!(
                    "  (not trusted yet: withheld until `chitin mcp trust {}`)",
                    r.name
                ),
                ToolStatus::Removed => "  (pinned, no longer listed by the server)".into(),
                ToolStatus::Unusable(why) => format!("  (cannot be offered: {why})"),
            };
            println!(
                "  {}  {}  risk={}{note}",
                crate::tools::mcp::tool_name(&r.name, &t.name).escape_default(),
                t.status.as_str(),
                t.risk
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Decides `mcp.trust` for the operator; `Some(exit 1)` after printing the refusal.
fn decide(rt: &Runtime, what: &str) -> Result<Option<ExitCode>, BoxError> {
    let operator = rt.config.operator().to_string();
    let req = crate::gate::admin_request(&operator, Action::McpTrust, serde_json::Map::new())?;
    match rt.gate.check(&req)? {
        Verdict::Allowed(..) => Ok(None),
        Verdict::Denied(d) | Verdict::ApprovalRequired { decision: d, .. } => {
            println!(
                "refused: policy denied `mcp.trust` ({what}) for Chitin::User::{operator:?} (determining policies: [{}])",
                d.policies.join(", ")
            );
            Ok(Some(ExitCode::from(1)))
        }
    }
}

fn trust(rt: &Runtime, hub: &Hub, server: &str) -> CmdResult {
    if rt.config.mcp.server(server).is_none() {
        return Err(crate::mcp::McpError::NotConfigured(server.to_string()).into());
    }
    if let Some(code) = decide(rt, &format!("trust `{server}`"))? {
        return Ok(code);
    }
    let operator = rt.config.operator().to_string();
    let now = rt.clock.now_ms();
    let tools = hub.trust(server, &operator, now)?;
    let cfg = rt.config.mcp.server(server);
    let pinned: Vec<Value> = tools
        .iter()
        .map(|t| json!({"tool": t.name, "digest": t.digest}))
        .collect();
    rt.gate.audit().append(chitin_audit::RecordInput::admin(
        format!("Chitin::User::{}", Value::String(operator.clone())),
        "mcp.trust",
        format!("mcp:{server}"),
        json!({"server": server, "op": "trust", "tools": pinned, "list_digest": crate::mcp::wire::list_digest(&tools)}),
    ))?;
    for t in &tools {
        let risk = cfg.map_or("high", |c| c.risk(&t.name).as_str());
        println!(
            "  {}  risk={risk}  {}",
            crate::tools::mcp::tool_name(server, &t.name).escape_default(),
            t.digest
        );
        println!("    description: \"{}\"", t.description.escape_default());
        println!(
            "    input schema: {}",
            t.input_schema.to_string().escape_default()
        );
    }
    println!(
        "trusted: {server} ({} tools pinned, list {})",
        tools.len(),
        crate::mcp::wire::list_digest(&tools)
    );
    Ok(ExitCode::SUCCESS)
}

fn untrust(rt: &Runtime, hub: &Hub, server: &str) -> CmdResult {
    if rt.config.mcp.server(server).is_none() {
        return Err(crate::mcp::McpError::NotConfigured(server.to_string()).into());
    }
    if let Some(code) = decide(rt, &format!("untrust `{server}`"))? {
        return Ok(code);
    }
    let operator = rt.config.operator().to_string();
    let was = hub.untrust(server)?;
    rt.gate.audit().append(chitin_audit::RecordInput::admin(
        format!("Chitin::User::{}", Value::String(operator)),
        "mcp.trust",
        format!("mcp:{server}"),
        json!({"server": server, "op": "untrust", "was_trusted": was}),
    ))?;
    if was {
        println!(
            "untrusted: {server} (none of its tools is offered until `chitin mcp trust {server}`)"
        );
    } else {
        println!("{server} was not trusted; nothing changed");
    }
    Ok(ExitCode::SUCCESS)
}
