//! What is built into the binary: the schema, the default policies and the built-in entities
//! (the tools with their risk and effects, and the gateway).

use serde_json::{Value, json};

use super::Tool;

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
    (
        "automation.cedar",
        include_str!("../../policies/default/automation.cedar"),
    ),
    (
        "accounts.cedar",
        include_str!("../../policies/default/accounts.cedar"),
    ),
    (
        "workflows.cedar",
        include_str!("../../policies/default/workflows.cedar"),
    ),
    (
        "control.cedar",
        include_str!("../../policies/default/control.cedar"),
    ),
    (
        "mcp.cedar",
        include_str!("../../policies/default/mcp.cedar"),
    ),
];

/// A built-in tool: its name, risk and effects.
#[derive(Debug, Clone, Copy)]
pub struct ToolInfo {
    pub name: &'static str,
    pub risk: &'static str,
    pub effects: &'static [&'static str],
}

/// The built-in tools (every [`Tool`], in its order). Their Cedar actions have the same names.
pub const TOOLS: &[ToolInfo] = &[
    ToolInfo {
        name: Tool::Exec.as_str(),
        risk: "medium",
        effects: &["exec"],
    },
    ToolInfo {
        name: Tool::ReadFile.as_str(),
        risk: "low",
        effects: &["fs_read"],
    },
    ToolInfo {
        name: Tool::ListDir.as_str(),
        risk: "low",
        effects: &["fs_read"],
    },
    ToolInfo {
        name: Tool::WriteFile.as_str(),
        risk: "medium",
        effects: &["fs_write"],
    },
    ToolInfo {
        name: Tool::EditFile.as_str(),
        risk: "medium",
        effects: &["fs_write"],
    },
    ToolInfo {
        name: Tool::WebFetch.as_str(),
        risk: "medium",
        effects: &["network"],
    },
    ToolInfo {
        name: Tool::SendMessage.as_str(),
        risk: "medium",
        effects: &["message"],
    },
    // A workflow runs commands, files, the network and the model, each step decided on its own.
    ToolInfo {
        name: Tool::Workflow.as_str(),
        risk: "high",
        effects: &["workflow"],
    },
    ToolInfo {
        name: Tool::WebSearch.as_str(),
        risk: "medium",
        effects: &["network"],
    },
    // Decided path by path as `write_file` (the resource is `Tool::"write_file"`).
    ToolInfo {
        name: Tool::ApplyPatch.as_str(),
        risk: "medium",
        effects: &["fs_write"],
    },
    ToolInfo {
        name: Tool::MemorySearch.as_str(),
        risk: "low",
        effects: &["memory_read"],
    },
    ToolInfo {
        name: Tool::MemoryGet.as_str(),
        risk: "low",
        effects: &["memory_read"],
    },
    ToolInfo {
        name: Tool::SessionsList.as_str(),
        risk: "low",
        effects: &["session_read"],
    },
    ToolInfo {
        name: Tool::SessionsHistory.as_str(),
        risk: "low",
        effects: &["session_read"],
    },
    ToolInfo {
        name: Tool::SessionsSend.as_str(),
        risk: "medium",
        effects: &["message"],
    },
    ToolInfo {
        name: Tool::Browser.as_str(),
        risk: "medium",
        effects: &["network"],
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_one_built_in_entity() {
        let names: Vec<&str> = TOOLS.iter().map(|t| t.name).collect();
        let tools: Vec<&str> = Tool::ALL.iter().map(|t| t.as_str()).collect();
        let (mut a, mut b) = (names.clone(), tools.clone());
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }
}
