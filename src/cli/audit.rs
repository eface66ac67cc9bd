//! `chitin audit ...`

use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Not built yet.
    Unavailable,
}

pub fn run(cmd: AuditCmd, _globals: &Globals) -> CmdResult {
    match cmd {
        AuditCmd::Unavailable => {
            eprintln!("chitin: audit: not built yet");
            Ok(ExitCode::from(1))
        }
    }
}
