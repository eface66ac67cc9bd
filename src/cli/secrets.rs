//! `chitin secrets ...`

use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: SecretsCmd, _globals: &Globals) -> CmdResult {
    match cmd {
        SecretsCmd::Unavailable => {
            eprintln!("chitin: secrets: not built yet");
            Ok(ExitCode::from(1))
        }
    }
}
