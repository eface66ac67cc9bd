//! `chitin.toml`: the operator's configuration.
//!
//! Every key is documented in [`default_toml`] with its default. Unknown keys are an error
//! that names the key and its line; missing keys take their documented defaults.
//! Each section lives in its own file and owns its own documentation text (`TEMPLATE`).

pub mod audit;
pub mod sandbox;
pub mod secrets;

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
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub audit: audit::AuditConfig,
    pub sandbox: sandbox::SandboxConfig,
    pub secrets: secrets::SecretsConfig,
}

impl Config {
    /// Parses a configuration text. `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
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

/// The documented default configuration that `chitin init` writes.
pub fn default_toml() -> String {
    let mut out = String::from(
        "# Chitin configuration. Every key is shown with its default value.\n\
         # Unknown keys are an error. Credentials never go here: use \"secret:NAME\".\n\n",
    );
    for section in [audit::TEMPLATE, sandbox::TEMPLATE, secrets::TEMPLATE] {
        out.push_str(section.trim());
        out.push_str("\n\n");
    }
    out
}
