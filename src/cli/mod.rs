//! The `chitin` command line. Each command group lives in its own file.

mod audit;
mod init;
mod policy;
mod sandbox;
mod secrets;
mod skills;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, ConfigError};

/// The result of a command: an exit code, or an error that `main` prints as `chitin: <error>`
/// and turns into exit status 2.
pub type CmdResult = Result<ExitCode, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Parser)]
#[command(
    name = "chitin",
    version,
    about = "A security-hardened policy gateway for AI agents"
)]
struct Cli {
    /// Configuration file [default: $CHITIN_HOME/chitin.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the state directory, a documented config, default policies and the store.
    Init,
    /// Validate, evaluate and test Cedar policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Run commands inside the sandbox, check what the kernel can enforce.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Verify, export and query the tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Manage the encrypted secret store.
    #[command(subcommand)]
    Secrets(secrets::SecretsCmd),
    /// Sign, install, verify and trust skills.
    #[command(subcommand)]
    Skills(skills::SkillsCmd),
}

/// What every command knows: where the state lives and which config file to read.
#[derive(Debug, Clone)]
pub struct Globals {
    /// The state directory (`CHITIN_HOME`, default `~/.chitin`).
    pub home: PathBuf,
    /// The configuration file (`--config`, default `$CHITIN_HOME/chitin.toml`).
    pub config_path: PathBuf,
}

impl Globals {
    fn resolve(config: Option<PathBuf>) -> Self {
        let home = state_home();
        let config_path = config.unwrap_or_else(|| home.join("chitin.toml"));
        Self { home, config_path }
    }

    /// Loads the configuration (defaults for a missing file).
    pub fn load_config(&self) -> Result<Config, ConfigError> {
        Config::load(&self.config_path)
    }
}

/// `CHITIN_HOME`, or `~/.chitin`.
pub fn state_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CHITIN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    home.join(".chitin")
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let globals = Globals::resolve(cli.config);
    let result = match cli.command {
        Command::Init => init::run(&globals),
        Command::Policy(cmd) => policy::run(cmd, &globals),
        Command::Sandbox(cmd) => sandbox::run(cmd, &globals),
        Command::Audit(cmd) => audit::run(cmd, &globals),
        Command::Secrets(cmd) => secrets::run(cmd, &globals),
        Command::Skills(cmd) => skills::run(cmd, &globals),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chitin: {e}");
            ExitCode::from(2)
        }
    }
}
