//! The `[workflows]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[workflows]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[workflows]
# How long a paused workflow run waits for its answer: its resumeToken and the approval it
# opened expire after this many seconds (an expired token is refused; run the workflow again).
resume_token_ttl_secs = 86400
# Directories of reviewed workflow files (absolute, or starting with ~/) that the agent's
# `workflow` tool, cron jobs and webhooks may run besides the agent workspace. Keep them
# outside the workspace: tools cannot write there, so the model cannot change them.
library = []
# Largest number of steps one run executes (loop iterations and sub-workflow steps count):
# a guard against a runaway loop.
max_steps = 10000
"#;

/// The `[workflows]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WorkflowsConfig {
    pub resume_token_ttl_secs: u64,
    pub library: Vec<String>,
    pub max_steps: u64,
}

impl Default for WorkflowsConfig {
    fn default() -> Self {
        Self {
            resume_token_ttl_secs: 24 * 60 * 60,
            library: Vec::new(),
            max_steps: 10_000,
        }
    }
}

/// The longest a resume token may live (30 days).
pub const MAX_TTL_SECS: u64 = 30 * 24 * 60 * 60;

impl WorkflowsConfig {
    /// Checks the values: a TTL between 1 s and 30 days, absolute library directories.
    pub fn validate(&self) -> Result<(), String> {
        if self.resume_token_ttl_secs == 0 || self.resume_token_ttl_secs > MAX_TTL_SECS {
            return Err(format!(
                "[workflows] resume_token_ttl_secs must be between 1 and {MAX_TTL_SECS} (30 days)"
            ));
        }
        if self.max_steps == 0 {
            return Err("[workflows] max_steps must be at least 1".into());
        }
        for d in &self.library {
            if !(d.starts_with('/') || d.starts_with("~/")) {
                return Err(format!(
                    "[workflows] library: `{d}` must be an absolute directory (or start with ~/)"
                ));
            }
        }
        Ok(())
    }

    /// The TTL in milliseconds.
    pub fn ttl_ms(&self) -> i64 {
        i64::try_from(self.resume_token_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// The library directories with `~/` expanded (`home`: the user's home directory).
    pub fn library_dirs(&self, home: Option<&std::path::Path>) -> Vec<std::path::PathBuf> {
        self.library
            .iter()
            .filter_map(|d| match d.strip_prefix("~/") {
                Some(rest) => home.map(|h| h.join(rest)),
                None => Some(std::path::PathBuf::from(d)),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_defaults_are_a_day_and_no_library() {
        let c = WorkflowsConfig::default();
        assert_eq!(c.ttl_ms(), 86_400_000);
        assert!(c.validate().is_ok());
        assert!(c.library.is_empty());
    }

    #[test]
    fn a_zero_or_huge_ttl_and_a_relative_library_are_refused() {
        for ttl in [0, MAX_TTL_SECS + 1] {
            let c = WorkflowsConfig {
                resume_token_ttl_secs: ttl,
                ..WorkflowsConfig::default()
            };
            assert!(c.validate().is_err(), "{ttl}");
        }
        let c = WorkflowsConfig {
            library: vec!["flows".into()],
            ..WorkflowsConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("absolute"));
    }
}
