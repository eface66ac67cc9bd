//! `chitin doctor` and `chitin security audit`: checks an operator runs before trusting an
//! install. Each finding has a stable id, a severity, what is wrong and how to fix it.
//! Exit status 1 when any finding is critical.

use std::process::ExitCode;

use serde::Serialize;

use super::{CmdResult, Globals};
use crate::policy::{self, PolicyInput};
use crate::secrets::doctor::{self as secrets_doctor, Severity};
use crate::state::Home;

#[derive(Debug, Serialize)]
struct Finding {
    id: String,
    severity: &'static str,
    message: String,
    fix: String,
}

fn sev(s: Severity) -> &'static str {
    match s {
        Severity::Info => "info",
        Severity::Warn => "warn",
        Severity::Critical => "critical",
    }
}

fn push(out: &mut Vec<Finding>, id: &str, severity: &'static str, message: String, fix: &str) {
    out.push(Finding {
        id: id.into(),
        severity,
        message,
        fix: fix.into(),
    });
}

/// Runs every check and prints the findings (as JSON with `json`).
pub fn run(globals: &Globals, json: bool) -> CmdResult {
    let mut out = Vec::new();
    let home = match Home::open(&globals.home) {
        Ok(h) => Some(h),
        Err(e) => {
            push(
                &mut out,
                "state.unusable",
                "critical",
                e.to_string(),
                "fix the state directory as the message says, or run `chitin init`",
            );
            None
        }
    };
    let config = match globals.load_config() {
        Ok(c) => Some(c),
        Err(e) => {
            push(
                &mut out,
                "config.invalid",
                "critical",
                e.to_string(),
                "edit chitin.toml; every key is documented in the file `chitin init` writes",
            );
            None
        }
    };
    if let Some(config) = &config {
        let input = match super::policy::policy_dir(globals, config, None) {
            Err(e) => Err(e),
            Ok(Some(d)) => PolicyInput::from_dir(&d),
            Ok(None) => {
                push(
                    &mut out,
                    "policy.builtin",
                    "info",
                    "no policy directory: the built-in default policies are in force".into(),
                    "run `chitin init` to install editable copies",
                );
                Ok(PolicyInput::embedded())
            }
        };
        match input.and_then(|i| policy::compile(&i)) {
            Ok(c) if c.shadow_count() > 0 => push(
                &mut out,
                "policy.shadow",
                "info",
                format!(
                    "{} policies are in shadow mode (reported, not enforced)",
                    c.shadow_count()
                ),
                "remove @mode(\"shadow\") once the trial is over",
            ),
            Ok(_) => {}
            Err(e) => push(
                &mut out,
                "policy.invalid",
                "critical",
                e.to_string(),
                "run `chitin policy validate` and fix each file:line:col",
            ),
        }
        // Data lifecycle: classes kept forever (issue #9).
        for (id, severity, message, fix) in crate::lifecycle::findings(config) {
            out.push(Finding {
                id,
                severity,
                message,
                fix,
            });
        }
        for f in secrets_doctor::findings(&globals.home, &config.secrets) {
            out.push(Finding {
                id: f.id.into(),
                severity: sev(f.severity),
                message: f.message,
                fix: f.fix,
            });
        }
    }
    let support = chitin_sandbox::check();
    if !support.enforced() {
        push(
            &mut out,
            "sandbox.not_enforced",
            "critical",
            format!(
                "the kernel cannot fully confine tools (missing: {}); shell and file tools will refuse to run",
                support.missing.join(", ")
            ),
            "run on Linux with landlock (ABI >= 4), seccomp and unprivileged user namespaces enabled",
        );
    }
    if let Some(home) = &home {
        let db = home.path(chitin_audit::DB_FILE);
        let key = home.path(chitin_audit::PUB_FILE);
        let cps = home.path(chitin_audit::CHECKPOINT_FILE);
        if !db.exists() && (key.exists() || cps.exists()) {
            push(
                &mut out,
                "audit.missing",
                "critical",
                format!(
                    "the audit database {} is gone although its key and checkpoints exist",
                    db.display()
                ),
                "restore audit.db from a backup; `chitin audit verify --export FILE` checks an earlier export",
            );
        }
        if db.exists() && key.exists() {
            let verdict = chitin_audit::PublicKey::load(&key)
                .map_err(|e| e.to_string())
                .and_then(|k| {
                    chitin_audit::Verifier::new(k)
                        // Cross-checked against the checkpoint file: a truncated or emptied
                        // database does not pass.
                        .verify_db(&db, Some(&cps))
                        .map_err(|e| e.to_string())
                });
            match verdict {
                Ok(chitin_audit::Verdict::Ok(_)) => {}
                Ok(other) => push(
                    &mut out,
                    "audit.tampered",
                    "critical",
                    format!("{other:?}"),
                    "run `chitin audit verify` for the first bad record; restore from a backup",
                ),
                Err(e) => push(
                    &mut out,
                    "audit.unverifiable",
                    "critical",
                    e,
                    "run `chitin audit verify`",
                ),
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if out.is_empty() {
        println!("ok: no findings");
    } else {
        for f in &out {
            println!(
                "[{}] {}: {}\n    fix: {}",
                f.severity, f.id, f.message, f.fix
            );
        }
    }
    Ok(if out.iter().any(|f| f.severity == "critical") {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
