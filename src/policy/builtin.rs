//! What is built into the binary: the schema, the default policies and the built-in entities
//! (the tools with their risk and effects, and the gateway).

use serde_json::{Value, json};

use super::Tool;

/// The Cedar schema (`policies/schema.cedarschema`).
pub const SCHEMA: &str = include_str!("../../policies/schema.cedarschema");

/// The same schema in Cedar's JSON schema format (`policies/schema.json`), which is what the
/// gateway parses at start: Cedar reads it in a fifth of the time of the Cedar-syntax text
/// (whose parser builds a new lexer for every name it reads; issue #21, start time). The text
/// stays the one people read and edit; a test keeps the two the same schema
/// (`the_built_in_json_schema_is_the_cedar_schema_converted`, which also rewrites this file
/// when run with `CHITIN_UPDATE_SCHEMA_JSON=1`).
pub const SCHEMA_JSON: &str = include_str!("../../policies/schema.json");

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
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
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

    #[test]
    fn the_built_in_json_schema_is_the_cedar_schema_converted() {
        let (fragment, _) = cedar_policy::SchemaFragment::from_cedarschema_str(SCHEMA)
            .expect("the built-in schema parses");
        let converted = fragment
            .to_json_value()
            .expect("the built-in schema converts to JSON");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/policies/schema.json");
        if std::env::var_os("CHITIN_UPDATE_SCHEMA_JSON").is_some() {
            let text = serde_json::to_string_pretty(&converted).expect("JSON prints");
            std::fs::write(path, text + "\n").expect("policies/schema.json is writable");
            // Never a pass: the binary under test still embeds the file as it was.
            panic!(
                "rewrote policies/schema.json; run the tests again without CHITIN_UPDATE_SCHEMA_JSON"
            );
        }
        let embedded: Value = serde_json::from_str(SCHEMA_JSON).expect("schema.json is JSON");
        assert!(
            embedded == converted,
            "policies/schema.json is not policies/schema.cedarschema converted: run \
             `CHITIN_UPDATE_SCHEMA_JSON=1 cargo test --lib the_built_in_json_schema` and commit it"
        );
        // And both parse to a schema with the same entity types and actions.
        let from_json = cedar_policy::Schema::from_json_str(SCHEMA_JSON).expect("JSON parses");
        let (from_text, _) =
            cedar_policy::Schema::from_cedarschema_str(SCHEMA).expect("text parses");
        let sorted = |mut v: Vec<String>| {
            v.sort_unstable();
            v
        };
        assert_eq!(
            sorted(from_json.entity_types().map(|t| t.to_string()).collect()),
            sorted(from_text.entity_types().map(|t| t.to_string()).collect())
        );
        assert_eq!(
            sorted(from_json.actions().map(|a| a.to_string()).collect()),
            sorted(from_text.actions().map(|a| a.to_string()).collect())
        );
    }
}
