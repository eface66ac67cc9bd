//! The `[agent]` and `[budgets]` sections of `chitin.toml`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Documentation and defaults for `[agent]` and `[budgets]`, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[agent]
# The model the agent uses, as "<provider name>/<model>" ([[providers]]); empty = no agent.
model = ""
# Models tried in order when `model` keeps failing (after its retries), same form.
fallbacks = []
# The agent's working directory (tools run inside it; "~/" is your home). Empty: [gateway]
# workspace. It may not overlap the state directory (tools never see Chitin's own state).
workspace = ""
# Extra instructions appended to Chitin's built-in system prompt.
system_prompt = ""
# Model calls per run (each round of tool calls is one step); the run stops with an error beyond it.
max_steps = 16
# Wall-clock limit of one run in seconds (waiting for an approval counts).
run_timeout_secs = 900
# Runs in progress at once across all sessions (each session runs one at a time).
max_concurrent_runs = 8
# Upper bound on the tokens of one model answer.
max_tokens = 4096
# Approximate context window in tokens: history is summarized by the model when it nears this.
context_budget_tokens = 64000
# Tool results are cut to this many bytes before the model sees them.
tool_result_max_bytes = 16384
# Opened (decrypted) conversation history kept in memory, in KiB, so a step decrypts and
# converts and writes only the messages that are new (each message is kept as sent to the model
# and as the JSON written for it; least recently used sessions are dropped first; an erased
# user's messages at once). 0 = none: every step decrypts the whole history.
history_cache_kib = 12288

[budgets]
# Daily spend limit per user in USD, from [pricing] (UTC days; 0 = no limit).
daily_usd_per_user = 0.0
# Per-user overrides: user id = USD per day (0 = no limit for that user).
# users = { alice = 5.0 }
users = {}
"#;

/// The `[agent]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub model: String,
    pub fallbacks: Vec<String>,
    pub workspace: String,
    pub system_prompt: String,
    pub max_steps: u32,
    pub run_timeout_secs: u64,
    pub max_concurrent_runs: u32,
    pub max_tokens: u32,
    pub context_budget_tokens: u64,
    pub tool_result_max_bytes: usize,
    pub history_cache_kib: u64,
    /// `[agent.heartbeat]` (documented in `config::automation`).
    pub heartbeat: super::automation::HeartbeatConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            fallbacks: Vec::new(),
            workspace: String::new(),
            system_prompt: String::new(),
            max_steps: 16,
            run_timeout_secs: 900,
            max_concurrent_runs: 8,
            max_tokens: 4096,
            context_budget_tokens: 64_000,
            tool_result_max_bytes: 16 * 1024,
            history_cache_kib: 12288,
            heartbeat: super::automation::HeartbeatConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Checks the limits (each must be usable: a zero step limit would make every run fail).
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool); 7] = [
            ("max_steps", (1..=1000).contains(&self.max_steps)),
            (
                "run_timeout_secs",
                (1..=86_400).contains(&self.run_timeout_secs),
            ),
            (
                "max_concurrent_runs",
                (1..=1024).contains(&self.max_concurrent_runs),
            ),
            ("max_tokens", (1..=1_000_000).contains(&self.max_tokens)),
            (
                "context_budget_tokens",
                (1024..=10_000_000).contains(&self.context_budget_tokens),
            ),
            (
                "tool_result_max_bytes",
                (256..=16 * 1024 * 1024).contains(&self.tool_result_max_bytes),
            ),
            (
                "history_cache_kib",
                self.history_cache_kib <= 4 * 1024 * 1024,
            ),
        ];
        for (key, ok) in checks {
            if !ok {
                return Err(format!(
                    "[agent] {key} is out of range; see the comments in `chitin init`'s chitin.toml for its bounds"
                ));
            }
        }
        Ok(())
    }

    /// `model` followed by `fallbacks`: the order models are tried in.
    pub fn model_chain(&self) -> Vec<String> {
        std::iter::once(&self.model)
            .filter(|m| !m.is_empty())
            .chain(self.fallbacks.iter())
            .cloned()
            .collect()
    }
}

/// The `[budgets]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetsConfig {
    pub daily_usd_per_user: f64,
    pub users: BTreeMap<String, f64>,
}

impl BudgetsConfig {
    /// The user's daily limit in USD, `None` when unlimited.
    pub fn daily_limit_usd(&self, user: &str) -> Option<f64> {
        let v = self
            .users
            .get(user)
            .copied()
            .unwrap_or(self.daily_usd_per_user);
        (v > 0.0).then_some(v)
    }

    pub fn validate(&self) -> Result<(), String> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(self.daily_usd_per_user) {
            return Err("[budgets] daily_usd_per_user must be a number >= 0 (0 = no limit)".into());
        }
        for (u, v) in &self.users {
            if !ok(*v) {
                return Err(format!(
                    "[budgets] users.{}: must be a number >= 0 (0 = no limit)",
                    u.escape_default()
                ));
            }
        }
        Ok(())
    }
}
