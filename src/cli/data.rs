//! `chitin data export --subject S --out FILE | erase --subject S [--dry-run]` (GDPR).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;

use super::{CmdResult, Globals, Runtime};
use crate::lifecycle::{self, Lifecycle, LifecycleError};
use crate::vault::{Subject, Vault};

#[derive(Debug, Subcommand)]
pub enum DataCmd {
    /// Export everything held about a subject into one archive (Cedar `data.export`).
    Export {
        /// Cedar entity reference, e.g. 'Chitin::User::"alice"' or 'Chitin::Identity::"telegram:12345"'
        #[arg(long, value_name = "SUBJECT")]
        subject: String,
        /// The archive to write (a new file, mode 0600)
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Erase a subject's data everywhere and destroy their data key (Cedar `data.erase`).
    Erase {
        #[arg(long, value_name = "SUBJECT")]
        subject: String,
        /// List what would be erased; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The runtime plus the lifecycle context (vault unlocked from the secret store).
pub(crate) fn open_lifecycle(
    globals: &Globals,
) -> Result<(Runtime, Lifecycle), Box<dyn std::error::Error + Send + Sync>> {
    let rt = Runtime::open(globals)?;
    // With `[store] backend = "postgres"` the deployment's database and its shared data keys:
    // an erasure destroys the key for every replica.
    let store = super::backup::configured_store(&rt)?;
    let mut secrets = crate::secrets::SecretStore::open(&globals.home, &rt.config.secrets)?;
    let vault = Vault::for_db(
        &globals.home,
        store.db(),
        &mut secrets,
        Arc::clone(&rt.clock),
    )?;
    let lc = Lifecycle {
        home: globals.home.clone(),
        store,
        audit: Arc::clone(rt.gate.audit()),
        vault: Arc::new(vault),
        clock: Arc::clone(&rt.clock),
    };
    Ok((rt, lc))
}

/// Policy refusals and legal holds are the command's answer (stdout, exit 1).
fn refusal(e: LifecycleError) -> CmdResult {
    match e {
        LifecycleError::Denied { .. } | LifecycleError::Held { .. } => {
            println!("refused: {e}");
            Ok(ExitCode::from(1))
        }
        other => Err(other.into()),
    }
}

pub fn run(cmd: DataCmd, globals: &Globals) -> CmdResult {
    let subject = match &cmd {
        DataCmd::Export { subject, .. } | DataCmd::Erase { subject, .. } => subject.clone(),
    };
    // Strict parsing before anything is opened or recorded.
    let subject = Subject::parse(&subject)?;
    let (rt, lc) = open_lifecycle(globals)?;
    // Decided for the CLI operator ([cli] operator, default the gateway owner): the command
    // line cannot claim to be someone else.
    let operator = rt.config.operator().to_string();
    let actor = crate::skills_host::user_uid(&operator);
    let code = match cmd {
        DataCmd::Export { out, .. } => {
            let spin = super::progress::spinner("exporting");
            let done =
                lifecycle::admin_check(&rt.gate, &operator, crate::policy::Action::DataExport)
                    .and_then(|()| lifecycle::export::export(&lc, &subject, &out, &actor));
            spin.finish_and_clear();
            match done {
                Ok(c) => {
                    println!(
                        "exported {subject} to {}: {} sessions, {} messages, {} runs, {} usage records, {} approvals, {} audit records",
                        out.display(),
                        c.sessions,
                        c.messages,
                        c.runs,
                        c.usage,
                        c.approvals,
                        c.audit_records
                    );
                    if c.unreadable > 0 {
                        println!(
                            "note: {} items could not be decrypted (their key was destroyed)",
                            c.unreadable
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => return refusal(e),
            }
        }
        DataCmd::Erase { dry_run, .. } => {
            let spin = super::progress::spinner(if dry_run {
                "planning the erasure"
            } else {
                "erasing"
            });
            let done =
                lifecycle::admin_check(&rt.gate, &operator, crate::policy::Action::DataErase)
                    .and_then(|()| lifecycle::erase::erase(&lc, &subject, &actor, dry_run));
            spin.finish_and_clear();
            match done {
                Ok(r) => {
                    let p = &r.plan;
                    let verb = if dry_run { "would erase" } else { "erased" };
                    println!("{verb} {subject} ({})", r.subject_digest);
                    println!("  messages: {}", p.messages);
                    println!("  sessions: {}", p.sessions);
                    println!("  runs: {}", p.runs);
                    println!("  usage records: {}", p.usage);
                    println!("  approvals requested: {}", p.approvals_requested);
                    println!(
                        "  approvals resolved for others (approver anonymized): {}",
                        p.approvals_resolved
                    );
                    println!("  audit payloads: {}", p.audit_payloads);
                    println!(
                        "  data key: {}",
                        if p.data_key { "destroyed" } else { "none" }
                    );
                    if let Some(seq) = r.receipt_seq {
                        println!("erasure receipt: audit seq {seq}");
                    }
                    if !dry_run && !r.wal_truncated {
                        eprintln!(
                            "note: a database WAL was busy and will be truncated at its next checkpoint"
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => return refusal(e),
            }
        }
    };
    lc.audit.shutdown()?;
    Ok(code)
}
