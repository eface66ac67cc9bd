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
# The agent's working directory (tools run inside it).
workspace = "~/.chitin/workspace"

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
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            fallbacks: Vec::new(),
            workspace: "~/.chitin/workspace".into(),
        }
    }
}

impl AgentConfig {
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
