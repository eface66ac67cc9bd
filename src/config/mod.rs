//! `chitin.toml`: the operator's configuration.
//!
//! Every key is documented in [`default_toml`] with its default. Unknown keys are an error
//! that names the key and its line; missing keys take their documented defaults.
//! Each section lives in its own file and owns its own documentation text (`TEMPLATE`).

pub mod agent;
pub mod audit;
pub mod auth;
pub mod automation;
pub mod backup;
pub mod channels;
pub mod cli;
pub mod gateway;
pub mod mcp;
pub mod paths;
pub mod policy;
pub mod providers;
pub mod retention;
pub mod sandbox;
pub mod schedule;
pub mod secret_ref;
pub mod secrets;
pub mod skills;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod workflows;

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config {path}: {source}; create it with `chitin init` or pass --config FILE"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "{what} {} (resolved: {}) overlaps {area_name} {}, which the agent's tools or other local processes can write; a file there could change what Chitin allows or trusts. Move {what} outside it",
        path.display(), resolved.display(), area.display()
    )]
    Overlap {
        what: String,
        path: PathBuf,
        resolved: PathBuf,
        area_name: String,
        area: PathBuf,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub policy: policy::PolicyConfig,
    pub audit: audit::AuditConfig,
    pub sandbox: sandbox::SandboxConfig,
    pub secrets: secrets::SecretsConfig,
    pub skills: skills::SkillsConfig,
    pub workflows: workflows::WorkflowsConfig,
    pub providers: Vec<providers::ProviderConfig>,
    pub agent: agent::AgentConfig,
    pub pricing: providers::PricingConfig,
    pub budgets: agent::BudgetsConfig,
    pub gateway: gateway::GatewayConfig,
    pub retention: retention::RetentionConfig,
    pub backup: backup::BackupConfig,
    pub cli: cli::CliConfig,
    pub auth: auth::AuthConfig,
    pub channels: Vec<channels::ChannelConfig>,
    pub cron: Vec<automation::CronJob>,
    pub hooks: Vec<automation::HookConfig>,
    pub tools: tools::ToolsConfig,
    pub mcp: mcp::McpConfig,
    pub telemetry: telemetry::TelemetryConfig,
    pub store: store::StoreConfig,
}

impl Config {
    /// The user the command line acts as: `[cli] operator`, else the gateway owner.
    pub fn operator(&self) -> &str {
        if self.cli.operator.is_empty() {
            &self.gateway.owner
        } else {
            &self.cli.operator
        }
    }

    /// The agent workspace: `[agent] workspace` (with `~/` expanded), else `[gateway] workspace`.
    pub fn workspace_dir(&self, home: &std::path::Path) -> std::path::PathBuf {
        let w = self.agent.workspace.trim();
        if w.is_empty() {
            return self.gateway.workspace_dir(home);
        }
        if let Some(rest) = w.strip_prefix("~/")
            && let Some(h) = std::env::var_os("HOME")
        {
            return std::path::PathBuf::from(h).join(rest);
        }
        let p = std::path::Path::new(w);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            home.join(p)
        }
    }

    /// Parses a configuration text. `path` is only used in error messages.
    ///
    /// Error messages name the line, column and key but never quote the file's text: a
    /// mistyped credential key must not echo a credential into a terminal or a log.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let location = e.span().map(|span| {
                let before = text.get(..span.start).unwrap_or("");
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                format!("line {line}, column {col}: ")
            });
            let place = e
                .span()
                .map(|span| where_in_toml(text, span.start))
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "{}{}{place}",
                    location.unwrap_or_default(),
                    e.message().trim_end()
                ),
            }
        })?;
        config
            .secrets
            .validate()
            .and_then(|()| providers::validate(&config.providers, &config.agent, &config.pricing))
            .and_then(|()| config.budgets.validate())
            .and_then(|()| config.agent.validate())
            .and_then(|()| config.sandbox.validate())
            .and_then(|()| config.workflows.validate())
            .and_then(|()| {
                config
                    .tools
                    .web_search
                    .as_ref()
                    .map_or(Ok(()), tools::WebSearchConfig::validate)
            })
            .and_then(|()| config.mcp.validate())
            .and_then(|()| config.store.validate())
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        config
            .gateway
            .validate()
            .and_then(|()| config.backup.validate())
            .and_then(|()| config.cli.validate())
            .and_then(|()| config.auth.validate())
            .and_then(|()| config.telemetry.validate())
            .and_then(|()| channels::validate(&config.channels))
            .and_then(|()| {
                automation::validate(
                    &config.cron,
                    &config.hooks,
                    &config.agent.heartbeat,
                    &config.channels,
                )
            })
            .map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(config)
    }

    /// Loads `path`; a missing file means "all defaults".
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// A TOML table header (`[a.b]` or `[[a]]`) on `line`, as written (names only, no values).
fn header_of(line: &str) -> Option<&str> {
    let t = line.trim();
    let t = t.split_once('#').map_or(t, |(h, _)| h).trim_end();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.strip_suffix("]]"))
        .or_else(|| t.strip_prefix('[').and_then(|r| r.strip_suffix(']')))?;
    let inner = inner.trim();
    let plain = !inner.is_empty()
        && inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"' | ' '));
    plain.then_some(t)
}

/// A bare key (`name = ...`) at the start of `line`, if it is one.
fn key_of(line: &str) -> Option<&str> {
    let (k, _) = line.split_once('=')?;
    let k = k.trim();
    let plain = !k.is_empty()
        && k.len() <= 64
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    plain.then_some(k)
}

/// Names the table (and the key) of the config line holding byte `at`, for parse errors
/// whose own message does not ("duplicate key"): " (key `model` in table [agent]; ...)".
/// Only names are quoted, never a value. A second definition of a table says where the
/// first one is, and that its keys are edited there.
fn where_in_toml(text: &str, at: usize) -> String {
    let before = text.get(..at).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text
        .get(line_start..)
        .and_then(|r| r.split('\n').next())
        .unwrap_or("");
    let headers: Vec<(usize, &str)> = text
        .split('\n')
        .enumerate()
        .filter_map(|(i, l)| header_of(l).map(|h| (i + 1, h)))
        .collect();
    let this_line = before.matches('\n').count() + 1;
    if let Some(h) = header_of(line) {
        if h.starts_with("[[") {
            return format!(" (table {h})");
        }
        if let Some((first, _)) = headers.iter().find(|(n, x)| *x == h && *n < this_line) {
            return format!(
                " (table {h} is defined twice: first at line {first}, again at line {this_line}; \
                 a table may appear once, so change its keys in the first {h} instead of adding another)"
            );
        }
        return format!(" (table {h})");
    }
    let table = headers
        .iter()
        .rev()
        .find(|(n, _)| *n < this_line)
        .map_or("the top level (before any table)", |(_, h)| h);
    match key_of(line) {
        Some(k) => format!(" (key `{k}` in table {table})"),
        None => format!(" (in table {table})"),
    }
}

/// The documented default configuration that `chitin init` writes.
pub fn default_toml() -> String {
    let mut out = String::from(
        "# Chitin configuration. Every key is shown with its default value.\n\
         # Unknown keys are an error. Credentials never go here: use \"secret:NAME\".\n\n",
    );
    for section in [
        policy::TEMPLATE,
        audit::TEMPLATE,
        sandbox::TEMPLATE,
        secrets::TEMPLATE,
        skills::TEMPLATE,
        workflows::TEMPLATE,
        providers::TEMPLATE,
        agent::TEMPLATE,
        gateway::TEMPLATE,
        retention::TEMPLATE,
        backup::TEMPLATE,
        cli::TEMPLATE,
        auth::TEMPLATE,
        channels::TEMPLATE,
        automation::TEMPLATE,
        tools::TEMPLATE,
        mcp::TEMPLATE,
        telemetry::TEMPLATE,
        store::TEMPLATE,
    ] {
        out.push_str(section.trim());
        out.push_str("\n\n");
    }
    out
}

/// What every command knows: where the state lives and which config file to read.
#[derive(Debug, Clone)]
pub struct Globals {
    /// The state directory (`CHITIN_HOME`, default `~/.chitin`).
    pub home: PathBuf,
    /// The configuration file (`--config`, default `$CHITIN_HOME/chitin.toml`).
    pub config_path: PathBuf,
    /// Whether `--config` named the file (then it must exist).
    pub config_explicit: bool,
}

impl Globals {
    /// The state dir `home` and the `--config` file, if one was named.
    pub fn resolve(home: PathBuf, config: Option<PathBuf>) -> Self {
        let config_explicit = config.is_some();
        let config_path = config.unwrap_or_else(|| home.join("chitin.toml"));
        Self {
            home,
            config_path,
            config_explicit,
        }
    }

    /// Loads the configuration (defaults for a missing file).
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        if self.config_path.exists() {
            crate::state::check_not_writable_by_others(&self.config_path).map_err(|e| {
                ConfigError::Parse {
                    path: self.config_path.clone(),
                    message: e.to_string(),
                }
            })?;
        }
        if self.config_explicit && !self.config_path.exists() {
            return Err(ConfigError::Read {
                path: self.config_path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        Config::load(&self.config_path)
    }
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
    fn the_documented_default_config_parses_to_the_defaults() {
        let c = Config::parse(&default_toml(), Path::new("chitin.toml")).unwrap();
        assert_eq!(c.policy.dir, "policies");
        assert_eq!(c.policy.entities, "entities.json");
        assert_eq!(c.cli.operator, "");
        assert_eq!(c.operator(), "owner");
    }

    #[test]
    fn the_cli_operator_is_the_configured_user_or_the_owner() {
        let c = Config::parse("[cli]\noperator = \"mallory\"\n", Path::new("c")).unwrap();
        assert_eq!(c.operator(), "mallory");
        let c = Config::parse("[gateway]\nowner = \"alice\"\n", Path::new("c")).unwrap();
        assert_eq!(c.operator(), "alice");
        let e = Config::parse("[cli]\noperator = \" x\"\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("[cli] operator"), "{e}");
        let e = Config::parse("[cli]\nas = \"x\"\n", Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("as"), "{e}");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_the_key_and_line() {
        let text = "[policy]\ndir = \"p\"\nditr = \"typo\"\n";
        let err = Config::parse(text, Path::new("/x/chitin.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ditr"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("/x/chitin.toml"), "{err}");
    }

    #[test]
    fn a_config_error_never_quotes_the_offending_text() {
        let text = "[policy]\nentitiez = \"sk-live-CANARY-51f0c2\"\n";
        let err = Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("entitiez") && err.contains("line 2"), "{err}");
        assert!(!err.contains("CANARY"), "{err}");
    }

    #[test]
    fn an_unknown_section_is_an_error() {
        let err = Config::parse("[polcy]\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("polcy"), "{err}");
    }

    #[test]
    fn appending_a_second_agent_table_names_the_table_and_both_lines() {
        let text = format!("{}\n[agent]\nmodel = \"local/llama3.1\"\n", default_toml());
        let err = Config::parse(&text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("table [agent] is defined twice"), "{err}");
        let first = default_toml()
            .split('\n')
            .position(|l| l == "[agent]")
            .unwrap()
            + 1;
        assert!(err.contains(&format!("first at line {first}")), "{err}");
        assert!(
            err.contains("change its keys in the first [agent]"),
            "{err}"
        );
    }

    #[test]
    fn a_duplicate_or_mistyped_key_names_the_key_and_its_table() {
        let err = Config::parse(
            "[agent]\nmodel = \"a/b\"\nmodel = \"c/d\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `model` in table [agent]"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        let err = Config::parse(
            "[gateway]\nbind = \"x\"\n[agent]\nmax_steps = \"many\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("key `max_steps` in table [agent]"), "{err}");
    }

    #[test]
    fn missing_keys_take_their_defaults() {
        let c =
            Config::parse("[policy]\ndir = \"/etc/chitin/policies\"\n", Path::new("c")).unwrap();
        assert_eq!(c.policy.dir, "/etc/chitin/policies");
        assert_eq!(c.policy.entities, "entities.json");
    }
}
