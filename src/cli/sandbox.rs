//! `chitin sandbox ...`

use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};

#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: SandboxCmd, _globals: &Globals) -> CmdResult {
    match cmd {
        SandboxCmd::Unavailable => {
            eprintln!("chitin: sandbox: not built yet");
            Ok(ExitCode::from(1))
        }
    }
}
