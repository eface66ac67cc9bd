//! `chitin backup create --out FILE | verify FILE | restore FILE | keygen --out FILE`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{CmdResult, Globals};
use crate::clock::{Clock, SystemClock, rfc3339};
use crate::lifecycle::{LifecycleError, backup};

#[derive(Debug, Subcommand)]
pub enum BackupCmd {
    /// Write an encrypted, consistent snapshot of the state directory (to [backup] recipient).
    Create {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Decrypt a backup and check it: every member's digest, the database, the audit chain.
    Verify {
        file: PathBuf,
        /// The backup identity (default: [backup] identity)
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// Verify the audit log with this public key instead of the one in the backup
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
    },
    /// Restore a backup into the state directory (refused while a gateway runs on it).
    Restore {
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
    },
    /// Make a backup identity: writes FILE (keep it off this host) and prints the recipient.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn identity_path(
    given: Option<PathBuf>,
    config: &crate::config::Config,
) -> Result<PathBuf, LifecycleError> {
    given
        .or_else(|| (!config.backup.identity.is_empty()).then(|| PathBuf::from(&config.backup.identity)))
        .ok_or_else(|| {
            LifecycleError::Backup(
                "no backup identity: pass --identity FILE (the file `chitin backup keygen` wrote) or set [backup] identity".into(),
            )
        })
}

fn verified(
    file: &Path,
    identity: &Path,
    pubkey: Option<&Path>,
) -> Result<(backup::Opened, backup::VerifyReport), LifecycleError> {
    let id = backup::load_identity(identity)?;
    let opened = backup::open(file, &id)?;
    let report = backup::check(&opened, pubkey)?;
    Ok((opened, report))
}

pub fn run(cmd: BackupCmd, globals: &Globals) -> CmdResult {
    match cmd {
        BackupCmd::Keygen { out } => {
            let public = backup::keygen(&out, SystemClock.now_ms())?;
            println!("{public}");
            eprintln!(
                "wrote the backup identity to {} (keep it OFF this host); add to chitin.toml:\n[backup]\nrecipient = \"{public}\"",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Create { out } => {
            let rt = super::Runtime::open(globals)?;
            backup::recipient(&rt.config.backup.recipient)?;
            let audit = rt.gate.audit();
            let m = backup::create(
                &globals.home,
                &rt.store,
                audit,
                &rt.config.backup.recipient,
                &out,
                rt.clock.now_ms(),
            )?;
            println!(
                "backup written to {}: {} files, audit through seq {} (data keys are never included)",
                out.display(),
                m.members.len(),
                m.audit_last_seq
            );
            audit.shutdown()?;
            Ok(ExitCode::SUCCESS)
        }
        BackupCmd::Verify {
            file,
            identity,
            pubkey,
        } => {
            let config = globals.load_config()?;
            let identity = identity_path(identity, &config)?;
            match verified(&file, &identity, pubkey.as_deref()) {
                Ok((_, r)) => {
                    println!(
                        "ok: {} files, {} bytes, created {}, state schema {}; audit {}",
                        r.members,
                        r.bytes,
                        rfc3339(r.created_ms),
                        r.state_version,
                        r.audit
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(LifecycleError::Backup(why)) => {
                    println!("bad backup: {why}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
        BackupCmd::Restore { file, identity } => {
            let config = globals.load_config()?;
            let identity = identity_path(identity, &config)?;
            let (opened, report) = match verified(&file, &identity, None) {
                Ok(v) => v,
                Err(LifecycleError::Backup(why)) => {
                    println!("bad backup: {why}; nothing was restored");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            crate::state::Home::create(&globals.home)?;
            let n = match backup::restore(&opened, &globals.home) {
                Ok(n) => n,
                Err(e @ LifecycleError::GatewayRunning { .. }) => {
                    println!("refused: {e}");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            // The restored log records its own restore; rows sealed with keys destroyed since
            // the backup are deleted so an erasure stays an erasure.
            let (_rt, lc) = super::data::open_lifecycle(globals)?;
            lc.audit.append(chitin_audit::RecordInput::admin(
                "backup:cli",
                "backup.restore",
                file.display().to_string(),
                json!({"created_ms": report.created_ms, "files": report.members}),
            ))?;
            let again = crate::lifecycle::erase::reapply_after_restore(
                &lc,
                report.created_ms,
                "backup:cli",
            )?;
            lc.audit.shutdown()?;
            println!(
                "restored {n} files from {} (created {})",
                file.display(),
                rfc3339(report.created_ms)
            );
            println!(
                "erased again {} subject(s) erased since the backup; purged {} rows sealed with destroyed keys",
                again.subjects.len(),
                again.purged_rows
            );
            for d in &again.held {
                println!("not erased again (under legal hold in the restored state): {d}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
