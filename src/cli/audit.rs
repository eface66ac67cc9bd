//! `chitin audit ...`: verify, export, query, checkpoint, append.
//!
//! Contract (checked from outside):
//! - `verify`: exit 0 + `ok: N records, head <hex>, last checkpoint <seq>`, or exit 1 +
//!   `tampered: first bad record <seq>: <reason>`; other errors exit 2.
//! - `append` and `checkpoint` write through `chitin_audit::AuditLog::open`, the same path the
//!   gateway uses, and are themselves recorded as admin actions.
//! - With `[store] backend = "postgres"` every command works on the deployment's log in that
//!   database (`verify` cross-checks it with this state directory's `audit.checkpoints`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chitin_audit::export::{self, Format};
use chitin_audit::{AuditLog, Kind, PublicKey, Query, RecordInput, Verifier};
use clap::{Subcommand, ValueEnum};

use super::{CmdResult, Globals};

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain and every checkpoint signature (of the database, or an export).
    Verify {
        /// Audit database [default: $CHITIN_HOME/audit.db]
        #[arg(long, value_name = "FILE", conflicts_with = "export")]
        db: Option<PathBuf>,
        /// Public key [default: $CHITIN_HOME/audit.pub]
        #[arg(long, value_name = "FILE")]
        pubkey: Option<PathBuf>,
        /// Verify this jsonl export instead of a database
        #[arg(long, value_name = "FILE")]
        export: Option<PathBuf>,
        /// Checkpoint file to cross-check the database against
        /// [default: audit.checkpoints next to the database]
        #[arg(long, value_name = "FILE", conflicts_with = "export")]
        checkpoints: Option<PathBuf>,
    },
    /// Export records plus the checkpoints that cover them (jsonl verifies offline).
    Export {
        /// Only records at or after this time (RFC 3339)
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// Only records at or before this time (RFC 3339)
        #[arg(long, value_name = "RFC3339")]
        until: Option<String>,
        /// jsonl (verifiable) or csv (for reading only)
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Output file (created 0600) [default: stdout]
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Show records for operators.
    Query {
        /// Only this kind (decision, tool_run, approval, message, admin, secret_use, skill,
        /// retention, system)
        #[arg(long, value_name = "K")]
        kind: Option<String>,
        /// Only this actor
        #[arg(long, value_name = "A")]
        actor: Option<String>,
        /// Only records at or after this time (RFC 3339)
        #[arg(long, value_name = "RFC3339")]
        since: Option<String>,
        /// Only records at or before this time (RFC 3339)
        #[arg(long, value_name = "RFC3339")]
        until: Option<String>,
        /// At most the N most recent matching records
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// Print a JSON array instead of text
        #[arg(long)]
        json: bool,
    },
    /// Write a signed checkpoint now.
    Checkpoint,
    /// Write one record through the gateway's audit path (operator/testing entry point).
    Append {
        #[arg(long, value_name = "K")]
        kind: String,
        #[arg(long, value_name = "A")]
        actor: String,
        #[arg(long, value_name = "X")]
        action: String,
        #[arg(long, value_name = "R")]
        resource: String,
        /// Payload (JSON, already redacted)
        #[arg(long, value_name = "JSON")]
        payload: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(cmd: AuditCmd, globals: &Globals) -> CmdResult {
    match cmd {
        AuditCmd::Verify {
            db,
            pubkey,
            export,
            checkpoints,
        } => verify(globals, db, pubkey, export, checkpoints),
        AuditCmd::Export {
            since,
            until,
            format,
            out,
        } => export_cmd(globals, since, until, format, out),
        AuditCmd::Query {
            kind,
            actor,
            since,
            until,
            limit,
            json,
        } => query(globals, kind, actor, since, until, limit, json),
        AuditCmd::Checkpoint => checkpoint(globals),
        AuditCmd::Append {
            kind,
            actor,
            action,
            resource,
            payload,
        } => append(globals, &kind, actor, action, resource, payload),
    }
}

/// Who runs the CLI, for admin records. Local and unauthenticated: whoever can run this
/// command can already write the state directory.
fn operator() -> String {
    use std::os::unix::fs::MetadataExt;
    match std::env::var("USER").ok().filter(|u| !u.is_empty()) {
        Some(user) => format!("operator:{user}"),
        None => std::fs::metadata("/proc/self").map_or_else(
            |_| "operator:unknown".into(),
            |m| format!("operator:uid{}", m.uid()),
        ),
    }
}

/// The log as the gateway opens it (signing key from the secret store).
fn open_log(globals: &Globals) -> Result<std::sync::Arc<AuditLog>, BoxError> {
    super::open_audit(globals)
}

/// The log, once `action` (`audit.read`, `audit.export`, `audit.append`) is allowed for the
/// CLI operator ([cli] operator) by the policies; the decision is recorded either way. `Err`
/// carries the refusal's exit code (the refusal is printed).
pub(super) fn decided_log(
    globals: &Globals,
    action: crate::policy::Action,
) -> Result<Result<(std::sync::Arc<AuditLog>, String), ExitCode>, BoxError> {
    let config = globals.load_config()?;
    crate::state::Home::create(&globals.home)?;
    let mut store = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let gate = super::admin_gate(globals, &config, &mut store)?;
    let log = std::sync::Arc::clone(gate.audit());
    match super::operator_may(&gate, &config, action)? {
        None => Ok(Ok((log, config.operator().to_string()))),
        Some(refused) => {
            log.shutdown()?;
            Ok(Err(refused))
        }
    }
}

fn parse_time(flag: &str, value: Option<String>) -> Result<Option<i64>, BoxError> {
    match value {
        None => Ok(None),
        Some(v) => crate::clock::parse_rfc3339(&v).map(Some).ok_or_else(|| {
            format!("--{flag} {v:?} is not an RFC 3339 time (e.g. 2026-11-21T08:00:00Z)").into()
        }),
    }
}

fn verify(
    globals: &Globals,
    db: Option<PathBuf>,
    pubkey: Option<PathBuf>,
    export: Option<PathBuf>,
    checkpoints: Option<PathBuf>,
) -> CmdResult {
    let pubkey = pubkey.unwrap_or_else(|| globals.home.join(chitin_audit::PUB_FILE));
    let key = PublicKey::load(&pubkey)?;
    let verifier = Verifier::new(key);
    // Only a verification of this state dir's own log is remembered (`chitin security audit`
    // reports when it last succeeded).
    let own_log = export.is_none()
        && db
            .as_deref()
            .is_none_or(|d| d == globals.home.join(chitin_audit::DB_FILE));
    // With `[store] backend = "postgres"` the deployment's log is in the database (once
    // `store copy` moved it there): verified with this state directory's checkpoint file as
    // a witness.
    let shared = if export.is_none() && db.is_none() && globals.config_path.exists() {
        let config = globals.load_config()?;
        if config.store.backend == crate::config::store::Backend::Postgres {
            let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
            let (log, pg) = super::open_audit_on(globals, &config, &mut secrets, None)?;
            let on_postgres = log.backend() == "postgres";
            log.shutdown()?;
            match pg {
                Some(pg) if on_postgres => Some(super::audit_pg_config(&pg)?),
                _ => None,
            }
        } else {
            None
        }
    } else {
        None
    };
    let spin = super::progress::spinner("verifying the audit log");
    let verdict = match (export, shared) {
        (Some(x), _) => verifier.verify_export(&x)?,
        (None, Some(pg)) => {
            let cps =
                checkpoints.unwrap_or_else(|| globals.home.join(chitin_audit::CHECKPOINT_FILE));
            verifier.verify_postgres(&pg, &[cps.as_path()])?
        }
        (None, None) => {
            let db = db.unwrap_or_else(|| globals.home.join(chitin_audit::DB_FILE));
            let cps = checkpoints.unwrap_or_else(|| {
                db.parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join(chitin_audit::CHECKPOINT_FILE)
            });
            verifier.verify_db(&db, Some(&cps))?
        }
    };
    spin.finish_and_clear();
    match verdict {
        Ok(report) => {
            println!("{}", report.ok_line());
            if own_log {
                use crate::clock::Clock as _;
                let now = crate::clock::SystemClock.now_ms();
                if let Err(e) = crate::security::marks::record(
                    &globals.home,
                    crate::security::marks::Mark::AuditVerified,
                    now,
                ) {
                    eprintln!("note: could not record the verification in state.db: {e}");
                }
            }
            if report.last_checkpoint.is_none() && report.records > 0 {
                eprintln!(
                    "note: the log has no signed checkpoint yet, so only the chain protects it; \
                     run `chitin audit checkpoint`"
                );
            } else if report.uncovered > 0 {
                eprintln!(
                    "note: the last {} record(s) are after the last checkpoint and protected by the \
                     chain only; run `chitin audit checkpoint` to sign them",
                    report.uncovered
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(tamper) => {
            println!("{tamper}");
            Ok(ExitCode::from(1))
        }
    }
}

fn export_cmd(
    globals: &Globals,
    since: Option<String>,
    until: Option<String>,
    format: ExportFormat,
    out: Option<PathBuf>,
) -> CmdResult {
    let since_ms = parse_time("since", since)?;
    let until_ms = parse_time("until", until)?;
    let log = match decided_log(globals, crate::policy::Action::AuditExport)? {
        Ok((log, _)) => log,
        Err(refused) => return Ok(refused),
    };
    // Reading the log out is recorded, and the checkpoint that follows covers every record,
    // so the export verifies on its own.
    log.append(RecordInput::admin(
        operator(),
        "audit.export",
        "audit",
        serde_json::json!({
            "since_ms": since_ms,
            "until_ms": until_ms,
            "format": match format { ExportFormat::Jsonl => "jsonl", ExportFormat::Csv => "csv" },
            "out": out.as_ref().map(|p| p.display().to_string()),
        }),
    ))?;
    log.checkpoint_now()?;
    let reader = log.reader()?;
    let fmt = match format {
        ExportFormat::Jsonl => Format::Jsonl,
        ExportFormat::Csv => Format::Csv,
    };
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let cps = log.paths().checkpoints.clone();
    let spin = super::progress::spinner("exporting the audit log");
    let summary = match &out {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode_private()
                .open(path)
                .map_err(|e| {
                    format!(
                        "cannot create {}: {e} (it must not exist yet)",
                        path.display()
                    )
                })?;
            let mut w = std::io::BufWriter::new(file);
            let s =
                export::write_export(&reader, Some(&cps), since_ms, until_ms, fmt, now, &mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            s
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            export::write_export(&reader, Some(&cps), since_ms, until_ms, fmt, now, &mut w)?
        }
    };
    spin.finish_and_clear();
    drop(reader);
    log.shutdown()?;
    eprintln!(
        "exported {} record(s){} and {} checkpoint(s)",
        summary.records,
        match (summary.first_seq, summary.last_seq) {
            (Some(a), Some(b)) => format!(" (seq {a}..{b})"),
            _ => String::new(),
        },
        summary.checkpoints
    );
    Ok(ExitCode::SUCCESS)
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for std::fs::OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

fn query(
    globals: &Globals,
    kind: Option<String>,
    actor: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u64>,
    json: bool,
) -> CmdResult {
    if let Some(k) = &kind {
        k.parse::<Kind>()?;
    }
    let q = Query {
        kind,
        actor,
        since_ms: parse_time("since", since)?,
        until_ms: parse_time("until", until)?,
        limit,
    };
    let log = match decided_log(globals, crate::policy::Action::AuditRead)? {
        Ok((log, _)) => log,
        Err(refused) => return Ok(refused),
    };
    let reader = log.reader()?;
    let records = reader.query(&q)?;
    drop(reader);
    log.shutdown()?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json {
        let items: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "seq": r.seq,
                    "time": crate::clock::rfc3339(r.ts_ms),
                    "kind": r.kind,
                    "actor": r.actor,
                    "action": r.action,
                    "resource": r.resource,
                    "decision": r.decision,
                    "policies": r.policy_ids(),
                    "outcome": r.outcome,
                    "payload": r.payload_json(),
                    "payload_removed": r.removed_reason.as_ref().map(|why| serde_json::json!({
                        "at": r.removed_at_ms.map(crate::clock::rfc3339),
                        "reason": why,
                    })),
                    "hash": chitin_audit::to_hex(&r.hash),
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&items)?)?;
    } else {
        for r in &records {
            let decision = if r.decision.is_empty() {
                String::new()
            } else {
                format!(" {} [{}]", r.decision, r.policy_ids().join(", "))
            };
            let payload = match (&r.payload, &r.removed_reason) {
                (Some(p), _) => p.clone(),
                (None, Some(why)) => format!("(payload removed: {why})"),
                (None, None) => "(no payload)".into(),
            };
            writeln!(
                out,
                "#{} {} {} {} {} {}{} -> {}\n    {}",
                r.seq,
                crate::clock::rfc3339(r.ts_ms),
                r.kind,
                r.actor,
                r.action,
                r.resource,
                decision,
                r.outcome,
                payload
            )?;
        }
        if records.is_empty() {
            eprintln!("no matching records");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn checkpoint(globals: &Globals) -> CmdResult {
    let log = open_log(globals)?;
    log.append(RecordInput::admin(
        operator(),
        "audit.checkpoint",
        "audit",
        serde_json::Value::Null,
    ))?;
    let cp = log.checkpoint_now()?;
    log.shutdown()?;
    println!("checkpoint: seq {} head {}", cp.seq, cp.head);
    Ok(ExitCode::SUCCESS)
}

fn append(
    globals: &Globals,
    kind: &str,
    actor: String,
    action: String,
    resource: String,
    payload: Option<String>,
) -> CmdResult {
    let kind: Kind = kind.parse()?;
    let payload: serde_json::Value = match payload {
        None => serde_json::Value::Null,
        Some(text) => {
            serde_json::from_str(&text).map_err(|e| format!("--payload is not valid JSON: {e}"))?
        }
    };
    // Decisions and tool runs are written by the gate and the sandbox only: an operator's
    // record can never pass for one. Checked before anything is opened or recorded.
    if !kind.operator_writable() {
        println!(
            "refused: `chitin audit append` writes only admin and system records, not `{kind}`; \
             decision and tool_run records come from the gate and the sandbox only"
        );
        return Ok(ExitCode::from(1));
    }
    let (log, operator_user) = match decided_log(globals, crate::policy::Action::AuditAppend)? {
        Ok(v) => v,
        Err(refused) => return Ok(refused),
    };
    let by = crate::skills_host::user_uid(&operator_user);
    let input = RecordInput::operator_written(kind, &by, actor, action, resource, payload);
    // The operator's own action is recorded first, then the record itself.
    log.append(RecordInput::admin(
        operator(),
        "audit.append",
        "audit",
        serde_json::json!({
            "kind": input.kind.as_str(),
            "actor": input.actor,
            "action": input.action,
            "resource": input.resource,
        }),
    ))?;
    let receipt = log.append(input)?;
    log.shutdown()?;
    println!(
        "appended: seq {} hash {}",
        receipt.seq,
        chitin_audit::to_hex(&receipt.hash)
    );
    Ok(ExitCode::SUCCESS)
}
