//! What is built into the binary: the schema, the default policies and the built-in entities
//! (the tools with their risk and effects, and the gateway).

use serde_json::{Value, json};

/// The Cedar schema (`policies/schema.cedarschema`).
pub const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");

/// The default policies (`policies/default/*.cedar`), as (file name, text).
pub const DEFAULT_POLICIES: &[(&str, &str)] = &[
    (
        "agent.cedar",
        include_str!("../../policies/default/agent.cedar"),
    ),
    (
        "admission.cedar",
        include_str!("../../policies/default/admission.cedar"),
    ),
    (
        "admin.cedar",
        include_str!("../../policies/default/admin.cedar"),
    ),
    (
        "guardrails.cedar",
        include_str!("../../policies/default/guardrails.cedar"),
    ),
    (
        "tools.cedar",
        include_str!("../../policies/default/tools.cedar"),
    ),
    (
        "skills.cedar",
        include_str!("../../policies/default/skills.cedar"),
    ),
    (
        "secrets.cedar",
        include_str!("../../policies/default/secrets.cedar"),
    ),
];

/// A built-in tool: its name, risk and effects.
#[derive(Debug, Clone, Copy)]
pub struct ToolInfo {
    pub name: &'static str,
    pub risk: &'static str,
    pub effects: &'static [&'static str],
}

/// The built-in tools. Their Cedar actions have the same names.
pub const TOOLS: &[ToolInfo] = &[
    ToolInfo {
        name: "exec",
        risk: "medium",
        effects: &["exec"],
    },
    ToolInfo {
        name: "read_file",
        risk: "low",
        effects: &["fs_read"],
    },
    ToolInfo {
        name: "list_dir",
        risk: "low",
        effects: &["fs_read"],
    },
    ToolInfo {
        name: "write_file",
        risk: "medium",
        effects: &["fs_write"],
    },
    ToolInfo {
        name: "edit_file",
        risk: "medium",
        effects: &["fs_write"],
    },
    ToolInfo {
        name: "web_fetch",
        risk: "medium",
        effects: &["network"],
    },
    ToolInfo {
        name: "send_message",
        risk: "medium",
        effects: &["message"],
    },
];

/// The gateway entity's id (`Chitin::Gateway::"gateway"`), the resource of admin actions.
pub const GATEWAY_ID: &str = "gateway";

/// Looks up a built-in tool.
pub fn tool(name: &str) -> Option<&'static ToolInfo> {
    TOOLS.iter().find(|t| t.name == name)
}

/// The built-in entities as Cedar entity JSON.
pub fn entities_json() -> Value {
    let mut out: Vec<Value> = TOOLS
        .iter()
        .map(|t| {
            json!({
                "uid": {"type": "Chitin::Tool", "id": t.name},
                "attrs": {"risk": t.risk, "effects": t.effects},
                "parents": []
            })
        })
        .collect();
    out.push(
        json!({"uid": {"type": "Chitin::Gateway", "id": GATEWAY_ID}, "attrs": {}, "parents": []}),
    );
    Value::Array(out)
}
