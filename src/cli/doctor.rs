//! `chitin doctor [--json] [--fix]` and `chitin security audit [--json] [--deep] [--identity
//! FILE]`: the checks of `crate::security`, printed as text or JSON.
//!
//! Exit status (both commands): 0 when nothing above `low` was found, 1 for a `medium` or
//! `high` finding, 2 for a `critical` one (after `--fix`, what is left counts).
//!
//! `doctor` checks the installation without the passphrase (the secret store stays locked)
//! and verifies the audit chain; `--fix` repairs what is safe to repair: it clears
//! permission bits that give other users access and creates missing directories 0700, and
//! never widens anything. `security audit` also unlocks the secret store to read names,
//! audiences and ages (never values); `--deep` verifies the audit chain and test-decrypts the
//! newest backup.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{CmdResult, Globals};
use crate::clock::{Clock, SystemClock};
use crate::security::{self, Context, Report};

/// What to run.
pub struct Options {
    pub json: bool,
    pub fix: bool,
    pub deep: bool,
    pub identity: Option<PathBuf>,
    /// `security audit` (unlocks the secret store) rather than `doctor`.
    pub audit: bool,
}

fn context(globals: &Globals, o: &Options) -> Context {
    let config = globals.load_config().map_err(|e| e.to_string());
    let policy = config
        .as_ref()
        .ok()
        .map(|c| super::policy::engine_spec(globals, c, None, None).map_err(|e| e.to_string()));
    Context {
        home: globals.home.clone(),
        config_path: globals.config_path.clone(),
        config,
        policy,
        now_ms: SystemClock.now_ms(),
        verify_chain: !o.audit || o.deep,
        test_backup: o.audit && o.deep,
        backup_identity: o.identity.clone(),
        executable: std::env::current_exe().ok(),
        open_secrets: o.audit,
    }
}

fn print(report: &Report, json: bool) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write as _;
    let text = if json {
        let mut t = serde_json::to_string_pretty(&report.to_json())?;
        t.push('\n');
        t
    } else {
        report.to_text()
    };
    // A reader that stops early (`| head`) is not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Runs the checks (and the repairs with `fix`) and prints the report.
pub fn run(globals: &Globals, o: &Options) -> CmdResult {
    let mut report = security::run(&context(globals, o));
    if o.fix {
        let (done, failed) = security::repair(&report);
        // The repairs go to stderr with --json, so stdout stays one JSON document.
        for d in &done {
            if o.json {
                eprintln!("fixed: {d}");
            } else {
                println!("fixed: {d}");
            }
        }
        for f in &failed {
            eprintln!("could not fix: {f}");
        }
        if !done.is_empty() || !failed.is_empty() {
            report = security::run(&context(globals, o));
        } else if !o.json {
            println!("nothing to fix automatically");
        }
    } else if !o.json && report.findings.iter().any(|f| f.repairable) {
        // Said once, after the list.
        let n = report.findings.iter().filter(|f| f.repairable).count();
        print(&report, false)?;
        println!(
            "{n} of these can be repaired with `chitin doctor --fix` (permissions narrowed, missing directories created; nothing is widened)"
        );
        return Ok(ExitCode::from(report.exit_code()));
    }
    print(&report, o.json)?;
    Ok(ExitCode::from(report.exit_code()))
}
