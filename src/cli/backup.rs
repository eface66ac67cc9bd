//! `chitin backup create --out FILE | verify FILE | restore FILE | list | fetch NAME --out FILE |
//! keygen --out FILE`.
//!
//! A backup is trusted only when its manifest is signed by this deployment's audit key: the
//! state dir's current `audit.pub`, or `--trust-key FILE` (disaster recovery onto a new
//! machine). `restore` shows what it would replace and needs `--yes` or a "yes" on a terminal.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{CmdResult, Globals};
use crate::clock::{Clock, SystemClock, rfc3339};
use crate::lifecycle::{LifecycleError, backup, offsite};

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
        /// The audit public key the backup must be signed with [default: $CHITIN_HOME/audit.pub]
        #[arg(long = "trust-key", alias = "pubkey", value_name = "FILE")]
        trust_key: Option<PathBuf>,
    },
    /// Restore a backup into the state directory (refused while a gateway runs on it): shows
    /// what would be replaced, then asks (or needs --yes).
    Restore {
        file: PathBuf,
        #[arg(long, value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The audit public key the backup must be signed with [default: $CHITIN_HOME/audit.pub];
        /// for restoring onto a new machine: the audit.pub of the deployment that made it
        #[arg(long = "trust-key", value_name = "FILE")]
        trust_key: Option<PathBuf>,
        /// Replace the listed files without asking
        #[arg(long)]
        yes: bool,
    },
    /// List scheduled backups: local ([backup] dir) and remote ([backup] target), oldest first,
    /// with when the last upload and test-restore succeeded.
    List {
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Download one remote backup (a name from `chitin backup list`) to a new file.
    Fetch {
        name: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
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

/// The key a backup must be signed with: `--trust-key FILE`, else this deployment's audit.pub.
fn trusted_key(
    given: Option<&Path>,
    home: &Path,
) -> Result<chitin_audit::PublicKey, LifecycleError> {
    let path = given.map_or_else(|| home.join(chitin_audit::PUB_FILE), Path::to_path_buf);
    if given.is_none() && !path.exists() {
        return Err(LifecycleError::Backup(format!(
            "no audit key to check the backup against: {} does not exist; on a new machine pass \
             --trust-key FILE (the audit.pub of the deployment that made the backup)",
            path.display()
        )));
    }
    chitin_audit::PublicKey::load(&path)
        .map_err(|e| LifecycleError::Backup(format!("trusted key {}: {e}", path.display())))
}

fn verified(
    file: &Path,
    identity: &Path,
    trusted: &chitin_audit::PublicKey,
) -> Result<backup::Verified, LifecycleError> {
    let id = backup::load_identity(identity)?;
    let opened = backup::open(file, &id)?;
    backup::check(opened, trusted)
}

/// Prints what a restore would change; returns how many files it would write.
fn print_plan(
    file: &Path,
    home: &Path,
    plan: &[(String, backup::Change)],
    postgres: Option<&str>,
) -> usize {
    println!(
        "restoring {} into {} would:",
        file.display(),
        home.display()
    );
    let mut same = 0;
    for (path, change) in plan {
        match change {
            backup::Change::Replace { old_size, new_size } => {
                println!("  replace {path} ({old_size} bytes -> {new_size} bytes)");
            }
            backup::Change::Add { size } => println!("  add     {path} ({size} bytes)"),
            backup::Change::Same => same += 1,
        }
    }
    println!("  keep    {same} file(s) that are already identical");
    match postgres {
        None => println!(
            "  (state.db and audit.db are replaced whole: every table in them; files not in the backup are left as they are)"
        ),
        Some(db) => {
            println!(
                "  copy    the backup's state.db into the PostgreSQL database {db} (every table replaced, in one transaction)"
            );
            println!(
                "  keep    the database's audit chain (the backup's audit.db is for offline verification only; the restore is recorded in the chain)"
            );
            println!("  (files not in the backup are left as they are)");
        }
    }
    plan.len() - same
}

/// The configured PostgreSQL database as the restore plan names it: the URL without any
/// password, or the secret that holds it.
fn postgres_target(store: &crate::config::store::StoreConfig) -> String {
    let url = store.url.trim();
    if let Some(name) = url.strip_prefix("secret:") {
        return format!("(the URL in secret `{name}`)");
    }
    // `scheme://user:password@host/..`: the password is left out.
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let (head, rest) = url.split_at(at);
            let user = head[s + 3..].split(':').next().unwrap_or_default();
            format!("{}{user}{rest}", &head[..s + 3])
        }
        _ => url.to_string(),
    }
}

/// `--yes`, or "yes" typed on a terminal.
fn confirmed(yes: bool) -> Result<bool, std::io::Error> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    print!("Replace these files? Type \"yes\" to restore: ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim() == "yes")
}

/// Local scheduled backups in `dir` (name, created ms, size), oldest first.
fn local_backups(dir: &str) -> Vec<(String, i64, u64)> {
    if dir.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<(String, i64, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let ms = name
                .strip_prefix(backup::SCHEDULED_PREFIX)?
                .strip_suffix(backup::SCHEDULED_SUFFIX)?
                .parse()
                .ok()?;
            let size = e.metadata().ok()?.len();
            Some((name, ms, size))
        })
        .collect();
    out.sort();
    out
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "never".into(), rfc3339)
}

fn list(globals: &Globals, json_out: bool) -> CmdResult {
    let rt = super::Runtime::open(globals)?;
    let cfg = &rt.config.backup;
    let local = local_backups(&cfg.dir);
    let client = offsite::client(cfg, &rt.gate, &rt.secrets);
    let status = offsite::status(&rt.store)?;
    rt.gate.audit().shutdown()?;
    let remote = match client? {
        Some(c) => {
            let objects = offsite::block_on(c.list(rt.clock.now_ms()))??;
            Some(offsite::backups(c.target(), &objects))
        }
        None => None,
    };
    if json_out {
        let v = json!({
            "local": local.iter().map(|(n, ms, size)| json!({"name": n, "created_ms": ms, "size": size})).collect::<Vec<_>>(),
            "remote": remote.as_ref().map(|r| r.iter().map(|b| json!({"name": b.name, "key": b.key, "created_ms": b.created_ms, "size": b.size})).collect::<Vec<_>>()),
            "last_upload_ms": status.last_upload_ms,
            "last_upload_key": status.last_upload_key,
            "last_upload_error": status.last_error,
            "test_restore_last_attempt_ms": status.test_restore_attempt_ms,
            "test_restore_last_ok_ms": status.test_restore_ok_ms,
            "test_restore_last_error": status.test_restore_error,
        });
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    if cfg.dir.is_empty() {
        println!("local: no [backup] dir configured");
    }
    for (n, ms, size) in &local {
        println!("local   {n}  {}  {size} bytes", rfc3339(*ms));
    }
    match &remote {
        None => println!("remote: no [backup] target configured"),
        Some(r) => {
            for b in r {
                println!(
                    "remote  {}  {}  {} bytes",
                    b.name,
                    rfc3339(b.created_ms),
                    b.size
                );
            }
            println!("last upload: {}", when(status.last_upload_ms));
            if let Some(e) = &status.last_error {
                println!("last upload error: {e}");
            }
            println!(
                "last successful test-restore: {}",
                when(status.test_restore_ok_ms)
            );
            if let Some(e) = &status.test_restore_error {
                println!("last test-restore error: {e}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn fetch(globals: &Globals, name: &str, out: &Path) -> CmdResult {
    let rt = super::Runtime::open(globals)?;
    let client = offsite::client(&rt.config.backup, &rt.gate, &rt.secrets);
    rt.gate.audit().shutdown()?;
    let Some(client) = client? else {
        println!("refused: no [backup] target is configured; nothing to fetch from");
        return Ok(ExitCode::from(1));
    };
    let now = rt.clock.now_ms();
    let all = offsite::backups(client.target(), &offsite::block_on(client.list(now))??);
    let Some(found) = all.iter().find(|b| b.name == name || b.key == name) else {
        println!("refused: no remote backup named {name:?}; `chitin backup list` shows the names");
        return Ok(ExitCode::from(1));
    };
    let bytes = offsite::block_on(client.get(&found.key, now))??;
    backup::write_private(out, &bytes)?;
    println!(
        "fetched {} ({} bytes) to {}; check it with `chitin backup verify {}`",
        found.key,
        bytes.len(),
        out.display(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run(cmd: BackupCmd, globals: &Globals) -> CmdResult {
    match cmd {
        BackupCmd::List { json } => list(globals, json),
        BackupCmd::Fetch { name, out } => fetch(globals, &name, &out),
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
            if let Some(refused) =
                super::operator_may(&rt.gate, &rt.config, crate::policy::Action::BackupCreate)?
            {
                rt.gate.audit().shutdown()?;
                return Ok(refused);
            }
            backup::recipient(&rt.config.backup.recipient)?;
            let audit = rt.gate.audit();
            let store = configured_store(&rt)?;
            let spin = super::progress::spinner("creating the backup");
            let m = backup::create(
                &globals.home,
                &store,
                audit,
                &rt.config.backup.recipient,
                &out,
                rt.clock.now_ms(),
            );
            spin.finish_and_clear();
            let m = m?;
            if let Err(e) = crate::security::marks::record(
                &globals.home,
                crate::security::marks::Mark::BackupCreated,
                rt.clock.now_ms(),
            ) {
                eprintln!("note: could not record the backup in state.db: {e}");
            }
            println!(
                "backup written to {}: {} files (the data keys included), audit through seq {}",
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
            trust_key,
        } => {
            let config = globals.load_config()?;
            let identity = identity_path(identity, &config)?;
            match trusted_key(trust_key.as_deref(), &globals.home)
                .and_then(|key| verified(&file, &identity, &key))
            {
                Ok(v) => {
                    let r = &v.report;
                    if let Err(e) = crate::security::marks::record(
                        &globals.home,
                        crate::security::marks::Mark::BackupVerified,
                        SystemClock.now_ms(),
                    ) {
                        eprintln!("note: could not record the test restore in state.db: {e}");
                    }
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
        BackupCmd::Restore {
            file,
            identity,
            trust_key,
            yes,
        } => {
            let config = globals.load_config()?;
            let identity = identity_path(identity, &config)?;
            crate::state::Home::create(&globals.home)?;
            // Decided for the CLI operator before the backup is even opened; the decision is
            // recorded in the live log (which the restore then replaces: the restored log
            // records the restore itself, with the operator).
            let mut store = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
            let gate = super::admin_gate(globals, &config, &mut store)?;
            let decided = super::operator_may(&gate, &config, crate::policy::Action::BackupRestore);
            gate.audit().shutdown()?;
            drop((gate, store));
            if let Some(refused) = decided? {
                return Ok(refused);
            }
            let verified = match trusted_key(trust_key.as_deref(), &globals.home)
                .and_then(|key| verified(&file, &identity, &key))
            {
                Ok(v) => v,
                Err(LifecycleError::Backup(why)) => {
                    println!("bad backup: {why}; nothing was restored");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            let report = verified.report.clone();
            // With `[store] backend = "postgres"` the backup's state.db is not put in the state
            // directory: it is staged, erased again there, then copied into the database in
            // one transaction just before the restore is committed. Its audit log is not
            // restored either: the database's chain stays and records the restore.
            let postgres = config.store.backend == crate::config::store::Backend::Postgres;
            let except: &[&str] = if postgres {
                backup::NOT_RESTORED_ON_POSTGRES
            } else {
                &[]
            };
            let target = postgres.then(|| postgres_target(&config.store));
            let plan = backup::plan(&verified, &globals.home, except);
            print_plan(&file, &globals.home, &plan, target.as_deref());
            if !confirmed(yes)? {
                println!(
                    "refused: the restore was not confirmed; run it on a terminal and type yes, or pass --yes; nothing was restored"
                );
                return Ok(ExitCode::from(1));
            }
            let bar = super::progress::bar(0, "restoring");
            let restoring =
                match backup::restore_files(&verified, &globals.home, except, &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                }) {
                    Ok(r) => r,
                    Err(e @ LifecycleError::GatewayRunning { .. }) => {
                        bar.abandon();
                        println!("refused: {e}");
                        return Ok(ExitCode::from(1));
                    }
                    Err(e) => {
                        bar.abandon();
                        return Err(e.into());
                    }
                };
            bar.finish_and_clear();
            // The restored log records its own restore; every subject erased since the backup
            // is erased again from what it brought back, and rows sealed with keys destroyed
            // since are deleted, so an erasure stays an erasure. Only then is the restore
            // committed: if any of this fails, `restoring` puts every file back when dropped
            // (after the databases opened on the restored files are closed).
            let mut restored = restoring.restored().clone();
            let staging = if postgres {
                Some(backup::scratch_dir(&globals.home, "restore-db")?)
            } else {
                None
            };
            let again = {
                let (rt, mut lc) = super::data::open_lifecycle(globals)?;
                let staged = match &staging {
                    Some(dir) => {
                        let path = backup::stage_state(&verified, dir.path())?;
                        let state = std::sync::Arc::new(crate::store::Store::open(&path)?);
                        lc.store = std::sync::Arc::clone(&state);
                        Some(state)
                    }
                    None => None,
                };
                // On PostgreSQL the keys already in the database are kept, as a vault.keys
                // already here would be; a database without keys gets the backup's, last.
                let target = match &staged {
                    Some(_) => {
                        let pg = super::store::pg_config(
                            &config.store,
                            Some(&rt.gate),
                            &rt.secrets.read(),
                        )?;
                        let target = crate::store::Db::postgres(&pg)?;
                        restored.data_keys_restored = verified
                            .opened()
                            .members
                            .contains_key(crate::vault::VAULT_FILE)
                            && crate::vault::sealed_keys_in(&target)?.is_none();
                        Some(target)
                    }
                    None => None,
                };
                let operator = crate::skills_host::user_uid(config.operator());
                lc.audit.append(chitin_audit::RecordInput::admin(
                    operator.as_str(),
                    "backup.restore",
                    file.display().to_string(),
                    json!({"created_ms": report.created_ms, "files": report.members, "replaced": restored.replaced,
                           "audit_archive": restored.audit_archive.as_ref().map(|p| p.display().to_string()),
                           "data_keys_restored": restored.data_keys_restored,
                           "decision": "allow"}),
                ))?;
                let again = crate::lifecycle::erase::reapply_after_restore(
                    &lc,
                    report.created_ms,
                    &operator,
                )
                .and_then(|again| {
                    // Last: the database gets the backup's rows (erased again) all at once.
                    if let (Some(state), Some(target)) = (&staged, &target) {
                        let bar = super::progress::bar(0, "copying into PostgreSQL");
                        let copied = backup::restore_into_postgres(state, target, &mut |d, t| {
                            bar.set_length(t);
                            bar.set_position(d);
                        });
                        bar.finish_and_clear();
                        let copied = copied?;
                        println!(
                            "copied {} rows into {}",
                            copied.iter().map(|(_, n)| *n).sum::<i64>(),
                            target.location()
                        );
                        if restored.data_keys_restored {
                            backup::restore_keys_into_db(&verified, target)?;
                        }
                    }
                    Ok(again)
                });
                drop(staged);
                let shut = lc.audit.shutdown();
                drop((lc, rt));
                let again = again?;
                shut?;
                again
            };
            drop(staging);
            let keys_into_db = restored.data_keys_restored;
            let mut restored = restoring.commit();
            restored.data_keys_restored |= keys_into_db;
            println!(
                "restored {} files from {} (created {})",
                restored.replaced,
                file.display(),
                rfc3339(report.created_ms)
            );
            if let Some(dir) = &restored.audit_archive {
                println!(
                    "the audit log before the restore is kept, whole and verifiable, in {}",
                    dir.display()
                );
            }
            if restored.data_keys_restored {
                println!(
                    "the backup's data keys were installed: its conversations can be read here"
                );
            } else {
                println!(
                    "the data keys already here ({}) were kept: they open the backup's conversations unless erased since",
                    if postgres {
                        "in the database"
                    } else {
                        "vault.keys"
                    }
                );
            }
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

/// The configured state store: the runtime's, or PostgreSQL when `[store] backend =
/// "postgres"` and the runtime opened SQLite (its credentials released through the gate).
pub(super) fn configured_store(
    rt: &super::Runtime,
) -> Result<std::sync::Arc<crate::store::Store>, super::BoxError> {
    if rt.config.store.backend == crate::config::store::Backend::Postgres
        && rt.store.db().dialect() == crate::store::Dialect::Sqlite
    {
        let pg = super::store::pg_config(&rt.config.store, Some(&rt.gate), &rt.secrets.read())?;
        return Ok(std::sync::Arc::new(crate::store::Store::postgres(&pg)?));
    }
    Ok(std::sync::Arc::clone(&rt.store))
}
