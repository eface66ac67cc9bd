//! `chitin retention run [--dry-run] | hold --subject S [--reason R] | release --subject S | holds`.

use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals, data::open_lifecycle};
use crate::clock::rfc3339;
use crate::lifecycle::retention;
use crate::vault::Subject;

#[derive(Debug, Subcommand)]
pub enum RetentionCmd {
    /// Delete data older than its [retention] period (held subjects excepted); audited.
    Run {
        /// Only count what would be deleted; change and record nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Put a subject under legal hold: retention and erasure leave their data alone.
    Hold {
        /// Cedar entity reference, e.g. 'Chitin::User::"alice"'
        #[arg(long, value_name = "SUBJECT")]
        subject: String,
        #[arg(long, default_value = "legal hold")]
        reason: String,
    },
    /// Release a legal hold.
    Release {
        #[arg(long, value_name = "SUBJECT")]
        subject: String,
    },
    /// List legal holds.
    Holds,
}

fn range(oldest: Option<i64>, newest: Option<i64>) -> String {
    match (oldest, newest) {
        (Some(a), Some(b)) => format!(" ({} .. {})", rfc3339(a), rfc3339(b)),
        _ => String::new(),
    }
}

pub fn run(cmd: RetentionCmd, globals: &Globals) -> CmdResult {
    // Subjects are parsed strictly before anything is opened or recorded.
    let subject = match &cmd {
        RetentionCmd::Hold { subject, .. } | RetentionCmd::Release { subject } => {
            Some(Subject::parse(subject)?)
        }
        RetentionCmd::Run { .. } | RetentionCmd::Holds => None,
    };
    let (rt, lc) = open_lifecycle(globals)?;
    // Decided for the CLI operator ([cli] operator), recorded; listing holds is not an action.
    let action = match &cmd {
        RetentionCmd::Run { .. } => Some(crate::policy::Action::RetentionRun),
        RetentionCmd::Hold { .. } => Some(crate::policy::Action::RetentionHold),
        RetentionCmd::Release { .. } => Some(crate::policy::Action::RetentionRelease),
        RetentionCmd::Holds => None,
    };
    if let Some(action) = action
        && let Some(refused) = super::operator_may(&rt.gate, &rt.config, action)?
    {
        lc.audit.shutdown()?;
        return Ok(refused);
    }
    let actor = crate::skills_host::user_uid(rt.config.operator());
    match cmd {
        RetentionCmd::Run { dry_run, json } => {
            let r = retention::run(&lc, &rt.config.retention, "retention:cli", dry_run)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let verb = if dry_run { "would delete" } else { "deleted" };
                for c in &r.classes {
                    match c.cutoff_ms {
                        None => println!("{}: kept forever", c.class),
                        Some(cut) => println!(
                            "{}: {verb} {}{} (older than {}), held {}",
                            c.class,
                            c.deleted,
                            range(c.oldest_ms, c.newest_ms),
                            rfc3339(cut),
                            c.held
                        ),
                    }
                }
                println!("sessions: {verb} {}, runs: {verb} {}", r.sessions, r.runs);
                if let Some(seq) = r.audit_seq {
                    println!("audit record: seq {seq}");
                }
                if !dry_run && !r.scrubbed {
                    eprintln!(
                        "note: a database was busy, so its rebuild (VACUUM) and WAL truncation wait for the next run"
                    );
                }
            }
        }
        RetentionCmd::Hold { reason, .. } => {
            let s = subject.ok_or("no subject")?;
            if retention::hold(&lc, &s, &reason, &actor)? {
                println!("held: {s}");
            } else {
                println!("already held: {s} (reason updated)");
            }
        }
        RetentionCmd::Release { .. } => {
            let s = subject.ok_or("no subject")?;
            if retention::release(&lc, &s, &actor)? {
                println!("released: {s}");
            } else {
                println!("not held: {s}");
            }
        }
        RetentionCmd::Holds => {
            let holds = retention::holds(&lc)?;
            if holds.is_empty() {
                println!("no legal holds");
            }
            for h in holds {
                println!(
                    "{}  since {}  by {}  reason: {}",
                    h.subject,
                    rfc3339(h.created_ms),
                    h.created_by,
                    crate::approvals::visible(&h.reason)
                );
            }
        }
    }
    lc.audit.shutdown()?;
    Ok(ExitCode::SUCCESS)
}
