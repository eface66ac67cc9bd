//! The closed sets of Cedar actions and built-in tools, shared by the gate, the tools and the
//! policy layer: an action or tool name is a value of these enums, never a free string, so a
//! tool checking "was I authorized?" and the gate saying "this was authorized" cannot disagree
//! about spelling (a mismatch does not compile).

use std::fmt;
use std::str::FromStr;

use cedar_policy::{EntityId, EntityTypeName, EntityUid};

macro_rules! closed_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            /// The id as Cedar and the model see it.
            pub const fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }

            /// The value with this id, if there is one.
            pub fn from_id(id: &str) -> Option<Self> {
                match id { $($s => Some(Self::$v),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

closed_enum! {
    /// A Cedar action of the Chitin schema (`Chitin::Action::"<id>"`).
    Action {
        Exec => "exec",
        ReadFile => "read_file",
        ListDir => "list_dir",
        WriteFile => "write_file",
        EditFile => "edit_file",
        WebFetch => "web_fetch",
        SendMessage => "send_message",
        MessageReceive => "message.receive",
        SkillInstall => "skill.install",
        SkillLoad => "skill.load",
        SecretUse => "secret.use",
        ApprovalGrant => "approval.grant",
        ModelCall => "model.call",
        PolicyReload => "policy.reload",
        AuditRead => "audit.read",
        AuditExport => "audit.export",
        AuditAppend => "audit.append",
        DataExport => "data.export",
        DataErase => "data.erase",
        PairingApprove => "pairing.approve",
        ConfigWrite => "config.write",
        TokenShow => "token.show",
        TokenRotate => "token.rotate",
        SecretSet => "secret.set",
        SecretRemove => "secret.remove",
        SecretReveal => "secret.reveal",
        BackupCreate => "backup.create",
        BackupRestore => "backup.restore",
        /// `chitin store migrate` / `copy`: the schema of the state database, and copying all
        /// of it into PostgreSQL.
        StoreManage => "store.manage",
        RetentionRun => "retention.run",
        RetentionHold => "retention.hold",
        RetentionRelease => "retention.release",
        CronManage => "cron.manage",
        WebhookReceive => "webhook.receive",
        WorkflowRun => "workflow.run",
        WorkflowResume => "workflow.resume",
        SessionRead => "session.read",
        UsageRead => "usage.read",
        PolicyRead => "policy.read",
        HealthRead => "health.read",
        /// A web search through the configured backend (network egress to its host).
        WebSearch => "web_search",
        /// A search of the user's memory files and past transcripts.
        MemorySearch => "memory_search",
        /// Reading one memory file or one past transcript message.
        MemoryGet => "memory_get",
        /// Posting a message into another of the user's sessions.
        SessionsSend => "sessions_send",
        UserManage => "user.manage",
        TokenManage => "token.manage",
        McpCall => "mcp.call",
        McpEgress => "mcp.egress",
        McpTrust => "mcp.trust",
        /// A navigation of the `browser` tool (the `navigate` call, redirects, links, forms,
        /// frames, script navigations), decided before its request leaves Chromium.
        BrowserNavigate => "browser.navigate",
        /// The other `browser` actions (snapshot, click, type, screenshot, close), on the
        /// session's page.
        BrowserInteract => "browser.interact",
    }
}

closed_enum! {
    /// A built-in tool of the gate (`Chitin::Tool::"<name>"`); the name is what a model sees
    /// and calls, and each tool is decided as the action of the same name.
    Tool {
        Exec => "exec",
        ReadFile => "read_file",
        WriteFile => "write_file",
        EditFile => "edit_file",
        ListDir => "list_dir",
        WebFetch => "web_fetch",
        SendMessage => "send_message",
        /// Runs (and resumes) Lobster workflow files; decided as `workflow.run` /
        /// `workflow.resume` on `Chitin::Workflow::"<name>"` by the workflow runner, never
        /// through `tools::invoke`.
        Workflow => "workflow",
        /// Searches the web through the configured backend; decided as `web_search`.
        WebSearch => "web_search",
        /// Applies a unified diff over several workspace files; each touched path is decided
        /// as `write_file`, all or nothing.
        ApplyPatch => "apply_patch",
        /// Searches memory files and past transcripts; decided as `memory_search`.
        MemorySearch => "memory_search",
        /// Reads one memory file or transcript message; decided as `memory_get`.
        MemoryGet => "memory_get",
        /// Lists the user's sessions; decided as `session.read` on `Session::"*"`.
        SessionsList => "sessions_list",
        /// A session's history; decided as `session.read` on the session.
        SessionsHistory => "sessions_history",
        /// Posts into another of the user's sessions; decided as `sessions_send`.
        SessionsSend => "sessions_send",
        /// Drives a headless Chromium; navigations are decided as `browser.navigate`, the
        /// other actions as `browser.interact`.
        Browser => "browser",
    }
}

const ACTION_TYPE: &str = "Chitin::Action";
const TOOL_TYPE: &str = "Chitin::Tool";
const USER_TYPE: &str = "Chitin::User";
const IDENTITY_TYPE: &str = "Chitin::Identity";
const CONVERSATION_TYPE: &str = "Chitin::Conversation";

/// The entity types whose uids the hot paths build: their names are parsed once per process
/// (Cedar's `EntityTypeName::from_str` runs its full parser, several µs, and an agent turn
/// builds a few dozen uids).
#[derive(Clone, Copy)]
enum Ty {
    Action,
    Tool,
    User,
    Identity,
    Conversation,
}

fn uid(ty: Ty, id: &str) -> EntityUid {
    use std::sync::OnceLock;
    type Cell = OnceLock<Result<EntityTypeName, String>>;
    static ACTION: Cell = OnceLock::new();
    static TOOL: Cell = OnceLock::new();
    static USER: Cell = OnceLock::new();
    static IDENTITY: Cell = OnceLock::new();
    static CONVERSATION: Cell = OnceLock::new();
    let (cell, name) = match ty {
        Ty::Action => (&ACTION, ACTION_TYPE),
        Ty::Tool => (&TOOL, TOOL_TYPE),
        Ty::User => (&USER, USER_TYPE),
        Ty::Identity => (&IDENTITY, IDENTITY_TYPE),
        Ty::Conversation => (&CONVERSATION, CONVERSATION_TYPE),
    };
    match cell.get_or_init(|| EntityTypeName::from_str(name).map_err(|e| e.to_string())) {
        Ok(t) => EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id)),
        Err(e) => constant_type_refused(name, e),
    }
}

/// `Chitin::User::"<id>"`: the same uid as parsing `Chitin::User::` followed by `id` as a
/// quoted string, without running Cedar's parser.
pub fn user_uid(id: &str) -> EntityUid {
    uid(Ty::User, id)
}

/// `Chitin::Identity::"<id>"` (a chat-platform identity, `<kind>:<id>`), without Cedar's
/// parser.
pub fn identity_uid(id: &str) -> EntityUid {
    uid(Ty::Identity, id)
}

/// `Chitin::Conversation::"<id>"` (`<kind>:<dm|group>:<chat id>`), without Cedar's parser.
pub fn conversation_uid(id: &str) -> EntityUid {
    uid(Ty::Conversation, id)
}

/// `ty` is one of the constant type names above, which Cedar always accepts (the unit tests
/// build every uid); this is never reached.
#[expect(
    clippy::panic,
    reason = "constant, valid Cedar type names; never reached"
)]
fn constant_type_refused(ty: &str, e: &str) -> EntityUid {
    panic!("cedar refused the constant type name {ty}: {e}")
}

impl Action {
    /// `Chitin::Action::"<id>"`.
    pub fn uid(self) -> EntityUid {
        uid(Ty::Action, self.as_str())
    }

    /// The action a Cedar entity uid names, if it is one of Chitin's.
    pub fn from_uid(u: &EntityUid) -> Option<Self> {
        if u.type_name().to_string() != ACTION_TYPE {
            return None;
        }
        Self::from_id(u.id().unescaped())
    }

    /// The built-in tool decided as this action, if any.
    pub fn tool(self) -> Option<Tool> {
        Tool::ALL.iter().copied().find(|t| t.action() == self)
    }
}

impl Tool {
    /// The Cedar action this tool is decided as (same id; `workflow` is decided as
    /// `workflow.run`, on the workflow it runs).
    pub const fn action(self) -> Action {
        match self {
            Self::Workflow => Action::WorkflowRun,
            Self::Exec => Action::Exec,
            Self::ReadFile => Action::ReadFile,
            Self::WriteFile => Action::WriteFile,
            Self::EditFile => Action::EditFile,
            Self::ListDir => Action::ListDir,
            Self::WebFetch => Action::WebFetch,
            Self::SendMessage => Action::SendMessage,
            Self::WebSearch => Action::WebSearch,
            Self::ApplyPatch => Action::WriteFile,
            Self::MemorySearch => Action::MemorySearch,
            Self::MemoryGet => Action::MemoryGet,
            Self::SessionsList | Self::SessionsHistory => Action::SessionRead,
            Self::SessionsSend => Action::SessionsSend,
            Self::Browser => Action::BrowserNavigate,
        }
    }

    /// `Chitin::Tool::"<name>"`.
    pub fn uid(self) -> EntityUid {
        uid(Ty::Tool, self.as_str())
    }
}

/// The tools that can be invoked (and are offered to models).
pub const INVOKABLE: &[Tool] = &[
    Tool::Exec,
    Tool::ReadFile,
    Tool::WriteFile,
    Tool::EditFile,
    Tool::ListDir,
    Tool::WebFetch,
    Tool::WebSearch,
    Tool::ApplyPatch,
];

/// Their names.
pub const TOOLS: &[&str] = &[
    Tool::Exec.as_str(),
    Tool::ReadFile.as_str(),
    Tool::WriteFile.as_str(),
    Tool::EditFile.as_str(),
    Tool::ListDir.as_str(),
    Tool::WebFetch.as_str(),
    Tool::WebSearch.as_str(),
    Tool::ApplyPatch.as_str(),
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_user_uid_names_exactly_the_user_and_is_the_one_cedar_parses() {
        for id in [
            "alice",
            "o'brien",
            "quote\"d",
            "back\\slash",
            "ünïcödé 用户",
            "a b:c::d",
        ] {
            let u = user_uid(id);
            assert_eq!(u.type_name().to_string(), "Chitin::User");
            assert_eq!(u.id().unescaped(), id);
            // Cedar's parser accepts only the normalized spelling (`o'brien` must be written
            // `o\'brien`): where the JSON-quoted form parses, it is the same uid.
            if let Ok(parsed) = format!("Chitin::User::{}", serde_json::Value::String(id.into()))
                .parse::<EntityUid>()
            {
                assert_eq!(u, parsed, "{id}");
            }
        }
        assert_eq!(
            user_uid("alice"),
            "Chitin::User::\"alice\"".parse::<EntityUid>().unwrap()
        );
        assert_eq!(
            identity_uid("telegram:o'brien"),
            r#"Chitin::Identity::"telegram:o\'brien""#.parse::<EntityUid>().unwrap()
        );
        assert_eq!(
            conversation_uid("slack:group:C1"),
            r#"Chitin::Conversation::"slack:group:C1""#.parse::<EntityUid>().unwrap()
        );
    }

    #[test]
    fn every_action_id_round_trips_through_its_cedar_uid() {
        for a in Action::ALL {
            assert_eq!(a.uid().to_string(), format!("Chitin::Action::\"{a}\""));
            assert_eq!(Action::from_uid(&a.uid()), Some(*a));
            assert_eq!(Action::from_id(a.as_str()), Some(*a));
        }
        let other: EntityUid = "Chitin::Tool::\"exec\"".parse().unwrap();
        assert_eq!(Action::from_uid(&other), None);
    }

    #[test]
    fn every_tool_is_decided_as_the_action_of_the_same_name() {
        for t in Tool::ALL {
            if *t == Tool::Workflow {
                assert_eq!(t.action(), Action::WorkflowRun);
                assert_eq!(Action::WorkflowRun.tool(), Some(Tool::Workflow));
                continue;
            }
            // A patch writes files: each path it touches is decided as `write_file`.
            if *t == Tool::ApplyPatch {
                assert_eq!(t.action(), Action::WriteFile);
                continue;
            }
            // The browser's navigations are `browser.navigate` (its other actions
            // `browser.interact`).
            if *t == Tool::Browser {
                assert_eq!(t.action(), Action::BrowserNavigate);
                assert_eq!(Action::BrowserNavigate.tool(), Some(Tool::Browser));
                continue;
            }
            // Reading sessions (list, history) is one action, on the session read.
            if matches!(t, Tool::SessionsList | Tool::SessionsHistory) {
                assert_eq!(t.action(), Action::SessionRead);
                assert_eq!(Action::SessionRead.tool(), Some(Tool::SessionsList));
                continue;
            }
            assert_eq!(t.action().as_str(), t.as_str());
            assert_eq!(t.action().tool(), Some(*t));
            assert_eq!(t.uid().to_string(), format!("Chitin::Tool::\"{t}\""));
        }
        assert_eq!(Action::SecretUse.tool(), None);
    }

    fn undeclared() -> Vec<&'static str> {
        let (schema, _) = cedar_policy::Schema::from_cedarschema_str(super::super::builtin::SCHEMA)
            .expect("the built-in schema parses");
        let declared: Vec<EntityUid> = schema.actions().cloned().collect();
        Action::ALL
            .iter()
            .filter(|a| !declared.contains(&a.uid()))
            .map(|a| a.as_str())
            .collect()
    }

    #[test]
    fn every_action_is_declared_in_the_schema() {
        let missing = undeclared();
        assert!(
            missing.is_empty(),
            "actions missing from policies/schema.cedarschema: {missing:?}"
        );
    }
}
