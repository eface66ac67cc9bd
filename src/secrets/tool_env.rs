//! Secrets in a tool's environment: [`ToolSecrets`] decides, per run, which of the secrets a
//! tool asks for (`[[sandbox.secret_env]]`) it gets.
//!
//! Invariants:
//! - A value enters a tool's environment only after the gate allowed Cedar `secret.use` with
//!   principal `Chitin::Tool::"<tool>"`, resource `Chitin::Secret::"<name>"` and context
//!   `{host: "env:<tool>", command, command_path, command_writable, user, session, tainted}`
//!   for this run, and after the release was audited
//!   ([`crate::secrets::SecretStore::release_to_tool_env`]: name, audience, who; never the
//!   value). A denied secret is absent; the gate has recorded the denial.
//! - A program the agent could have written (`command_writable`) never gets a secret: the gate
//!   refuses it before Cedar, whatever the policy says.
//! - A failed decision (audit unavailable, bad request) or a granted secret that cannot be
//!   released is an error: the tool does not run (fail closed, and the operator sees why).
//! - Values leave this module only inside a [`chitin_sandbox::SecretEnv`] (wiped on drop).

use chitin_sandbox::SecretEnv;
use serde_json::{Map, json};

use super::{SecretName, SecretsError, SharedSecretStore};
use crate::config::sandbox::SecretEnvEntry;
use crate::gate::{CallContext, Gate, GateError, ProgramLocation, Verdict};
use crate::policy::PolicyRequest;

/// Errors of the tool-environment release. Each one means the tool does not run.
#[derive(Debug, thiserror::Error)]
pub enum ToolSecretsError {
    #[error("invalid [[sandbox.secret_env]] entry for tool `{tool}`: {reason}")]
    Config { tool: String, reason: String },
    #[error(
        "the secret.use decision for secret `{name}` (tool `{tool}`) failed, so the tool does not run: {source}"
    )]
    Decision {
        tool: String,
        name: String,
        source: GateError,
    },
    #[error(
        "secret `{name}` is granted to tool `{tool}` but could not be released, so the tool does not run: {source}"
    )]
    Release {
        tool: String,
        name: String,
        source: SecretsError,
    },
    #[error("secret `{name}` cannot be passed to tool `{tool}` as `{var}`: {reason}")]
    Env {
        tool: String,
        name: String,
        var: String,
        reason: String,
    },
}

/// What one run of a tool gets.
#[derive(Debug, Default)]
pub struct Released {
    /// The allowed secrets, as the variables the sandbox sets (values wiped on drop).
    pub env: SecretEnv,
    /// Names of the secrets released.
    pub granted: Vec<SecretName>,
    /// Names of the secrets the policy did not grant (absent from the environment).
    pub denied: Vec<SecretName>,
}

/// Decides and releases tool-environment secrets through the gate. Shared by every run
/// (`Arc<ToolSecrets>` in [`crate::tools::Sandbox::with_secret_env`]).
#[derive(Clone)]
pub struct ToolSecrets {
    gate: Gate,
    store: SharedSecretStore,
}

impl std::fmt::Debug for ToolSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolSecrets")
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

/// The Cedar context host of a tool-environment release: `env:<tool>`.
pub fn env_host(tool: &str) -> String {
    format!("env:{tool}")
}

impl ToolSecrets {
    pub fn new(gate: Gate, store: SharedSecretStore) -> Self {
        Self { gate, store }
    }

    /// The Cedar request: `secret.use` by `Chitin::Tool::"<tool>"` on
    /// `Chitin::Secret::"<name>"` with context `{host: "env:<tool>"}`, plus `user`, `session`
    /// and `tainted` of the call, and `command`, `command_path` and `command_writable` when
    /// the tool runs a program (`exec`).
    pub fn policy_request(
        tool: &str,
        call: Option<&CallContext>,
        program: Option<&ProgramLocation>,
        name: &SecretName,
    ) -> Result<PolicyRequest, String> {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| format!("invalid entity: {e}"))
        };
        let mut context = Map::new();
        context.insert("host".into(), json!(env_host(tool)));
        if let Some(p) = program {
            context.insert("command".into(), json!(p.command));
            context.insert("command_path".into(), json!(p.path.to_string_lossy()));
            context.insert("command_writable".into(), json!(p.writable));
        }
        if let Some(c) = call {
            context.insert("user".into(), json!(c.user));
            context.insert("session".into(), json!(c.session));
            context.insert("tainted".into(), json!(c.tainted));
        }
        Ok(PolicyRequest {
            principal: uid(format!("Chitin::Tool::{}", q(tool)))?,
            action: crate::policy::Action::SecretUse.uid(),
            resource: uid(format!("Chitin::Secret::{}", q(name.as_str())))?,
            context,
        })
    }

    /// Decides and releases one secret an HTTP MCP server's configured header carries
    /// (`[[mcp.servers]] headers`): Cedar `secret.use` by `Chitin::Tool::"<tool>"` on the
    /// secret with context `host` = the server's URL host (which the store also requires in
    /// the secret's audience), `header` = the header's name, and the call's `user`, `session`
    /// and `tainted`. `Ok(None)`: the policy did not allow it (the gate recorded the denial).
    pub fn release_header(
        &self,
        tool: &str,
        call: &CallContext,
        name: &SecretName,
        host: &str,
        header: &str,
    ) -> Result<Option<super::SecretValue>, ToolSecretsError> {
        let config = |reason: String| ToolSecretsError::Config {
            tool: tool.to_string(),
            reason,
        };
        let mut req = Self::policy_request(tool, Some(call), None, name).map_err(config)?;
        req.context.insert("host".into(), json!(host));
        req.context.insert("header".into(), json!(header));
        let extra: Vec<serde_json::Value> = self.store.cedar_entity(name).into_iter().collect();
        let verdict = self
            .gate
            .check_with_entities(&req, &extra)
            .map_err(|source| ToolSecretsError::Decision {
                tool: tool.to_string(),
                name: name.to_string(),
                source,
            })?;
        let authz = match verdict {
            Verdict::Allowed(authz, _) => authz,
            Verdict::Denied(_) | Verdict::ApprovalRequired { .. } => return Ok(None),
        };
        self.store
            .release(&authz, host, self.gate.audit().as_ref())
            .map(Some)
            .map_err(|source| ToolSecretsError::Release {
                tool: tool.to_string(),
                name: name.to_string(),
                source,
            })
    }

    /// Decides every entry of `entries` that names `tool` and releases the allowed ones.
    /// `call`: who the run is for; `program`: what it executes, for `exec`.
    pub fn release<'a>(
        &self,
        tool: &str,
        call: Option<&CallContext>,
        program: Option<&ProgramLocation>,
        entries: impl IntoIterator<Item = &'a SecretEnvEntry>,
    ) -> Result<Released, ToolSecretsError> {
        let mut out = Released::default();
        for e in entries.into_iter().filter(|e| e.tool == tool) {
            let config = |reason: String| ToolSecretsError::Config {
                tool: tool.to_string(),
                reason,
            };
            let name = SecretName::parse(&e.secret).map_err(config)?;
            let req = Self::policy_request(tool, call, program, &name).map_err(config)?;
            let extra: Vec<serde_json::Value> =
                self.store.cedar_entity(&name).into_iter().collect();
            let verdict = self
                .gate
                .check_with_entities(&req, &extra)
                .map_err(|source| ToolSecretsError::Decision {
                    tool: tool.to_string(),
                    name: name.to_string(),
                    source,
                })?;
            let authz = match verdict {
                Verdict::Allowed(authz, _) => authz,
                Verdict::Denied(_) | Verdict::ApprovalRequired { .. } => {
                    out.denied.push(name);
                    continue;
                }
            };
            let (released, value) = self
                .store
                .release_to_tool_env(&authz, self.gate.audit().as_ref())
                .map_err(|source| ToolSecretsError::Release {
                    tool: tool.to_string(),
                    name: name.to_string(),
                    source,
                })?;
            out.env
                .push(&e.var, value.expose().to_vec())
                .map_err(|err| ToolSecretsError::Env {
                    tool: tool.to_string(),
                    name: name.to_string(),
                    var: e.var.clone(),
                    reason: err.to_string(),
                })?;
            out.granted.push(released);
        }
        Ok(out)
    }
}
