//! `chitin store migrate | check | copy`: the state database on SQLite (`state.db`) or
//! PostgreSQL (`[store] backend = "postgres"`; docs/storage.md).

use std::io::Write;
use std::process::ExitCode;

use chitin_audit::{Kind as AuditKind, RecordInput};
use clap::{Subcommand, ValueEnum};
use serde_json::{Map, json};
use zeroize::Zeroizing;

use super::{BoxError, CmdResult, Globals};
use crate::config::Config;
use crate::config::secret_ref::SecretRef;
use crate::config::store::{Backend, StoreConfig, UrlSource};
use crate::store::{Db, PgConfig, Store, TlsMode};

/// The principal that asks for the database credentials (`secret.use`).
pub const PRINCIPAL: &str = "Chitin::Gateway::\"store\"";
/// The audience host a secret holding the whole URL must name (the host is inside the
/// secret, so it cannot be the check): a name no request can reach, as for hook secrets.
pub const URL_AUDIENCE: &str = "url.store.invalid";

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Apply the pending schema migrations to the configured store ([store] backend).
    Migrate,
    /// The configured store: connectivity, schema version, migrations applied, rows per table.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Copy every table of this state directory's state.db into the configured PostgreSQL
    /// database, in one transaction (stop the gateway first).
    Copy {
        #[arg(long, value_enum)]
        from: Kind,
        #[arg(long, value_enum)]
        to: Kind,
        /// Delete the rows a non-empty target already has (in the same transaction)
        #[arg(long)]
        replace: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// Whether `[store] url` or `password` names a `secret:` (released through the gate).
pub fn needs_secret_store(cfg: &StoreConfig) -> Result<bool, BoxError> {
    let url = matches!(cfg.url_source()?, UrlSource::Ref(SecretRef::Secret(_)));
    let password = !cfg.password.is_empty()
        && matches!(
            SecretRef::parse_credential("[store] password", &cfg.password)?,
            SecretRef::Secret(_)
        );
    Ok(url || password)
}

/// Releases `[store] url` / `password` (`env:VAR`, or `secret:NAME` through Cedar
/// `secret.use` for `Chitin::Gateway::"store"`, audited) and builds the connection settings.
/// `gate` may be `None` only when [`needs_secret_store`] is false.
pub fn pg_config(
    cfg: &StoreConfig,
    gate: Option<&crate::gate::Gate>,
    secrets: &crate::secrets::SecretStore,
) -> Result<PgConfig, BoxError> {
    let url = match cfg.url_source()? {
        UrlSource::Plain(u) => Zeroizing::new(u),
        UrlSource::Ref(r) => credential("[store] url", r, URL_AUDIENCE, gate, secrets)?,
    };
    let mut pg = PgConfig::new(url.as_str());
    if !cfg.password.is_empty() {
        let host = pg
            .location()?
            .trim_start_matches("postgres://")
            .split([':', '/', ','])
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let r = SecretRef::parse_credential("[store] password", &cfg.password)?;
        pg.password = Some(credential("[store] password", r, &host, gate, secrets)?);
    }
    pg.tls = match cfg.tls.as_str() {
        "" => None,
        t => Some(TlsMode::parse(t).ok_or("[store] tls: unknown mode")?),
    };
    pg.ca_file = (!cfg.ca_file.is_empty()).then(|| cfg.ca_file.clone().into());
    pg.pool_size = cfg.pool_size;
    Ok(pg)
}

fn credential(
    field: &str,
    r: SecretRef,
    host: &str,
    gate: Option<&crate::gate::Gate>,
    secrets: &crate::secrets::SecretStore,
) -> Result<Zeroizing<String>, BoxError> {
    super::credentials::release(PRINCIPAL, field, r, host, gate, secrets)
}

struct Opened {
    config: Config,
    home: crate::state::Home,
    gate: crate::gate::Gate,
    secrets: crate::secrets::SecretStore,
    /// The connection settings the audit log was opened with (PostgreSQL backend).
    pg: Option<PgConfig>,
}

/// Config, secrets and the admin gate (its audit log: the deployment's, in PostgreSQL, or
/// still `audit.db` while a deployment on its way there has not been copied).
fn open(globals: &Globals) -> Result<Opened, BoxError> {
    let config = globals.load_config()?;
    let home = crate::state::Home::create(&globals.home)?;
    let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let (gate, pg) = super::admin_gate_on(globals, &config, &mut secrets)?;
    Ok(Opened {
        config,
        home,
        gate,
        secrets,
        pg,
    })
}

/// The configured database, migrated or not.
fn configured(o: &Opened, migrate: bool) -> Result<Db, BoxError> {
    Ok(match o.config.store.backend {
        Backend::Sqlite => {
            let path = o.home.path("state.db");
            crate::state::ensure_private_file(&path)?;
            if migrate {
                Db::sqlite(&path)?
            } else {
                Db::sqlite_unmigrated(&path)?
            }
        }
        Backend::Postgres => {
            let released;
            let pg = match &o.pg {
                Some(pg) => pg,
                None => {
                    released = pg_config(&o.config.store, Some(&o.gate), &o.secrets)?;
                    &released
                }
            };
            if migrate {
                Db::postgres(pg)?
            } else {
                Db::postgres_unmigrated(pg)?
            }
        }
    })
}

pub fn run(cmd: StoreCmd, globals: &Globals) -> CmdResult {
    match cmd {
        StoreCmd::Migrate => {
            let o = open(globals)?;
            if let Some(refused) =
                super::operator_may(&o.gate, &o.config, crate::policy::Action::StoreManage)?
            {
                return Ok(refused);
            }
            let db = configured(&o, false)?;
            let before = db.version()?;
            let applied = db.migrate()?;
            if let Some((from, copy)) = db.migrated_from() {
                eprintln!(
                    "chitin: the database as it was (schema {from}) is kept at {}",
                    copy.display()
                );
            }
            println!(
                "{} ({}): schema {before} -> {}, {applied} migration(s) applied",
                db.location(),
                db.dialect().name(),
                db.version()?
            );
            Ok(ExitCode::SUCCESS)
        }
        StoreCmd::Check { json } => {
            let o = open(globals)?;
            if let Some(refused) =
                super::operator_may(&o.gate, &o.config, crate::policy::Action::HealthRead)?
            {
                return Ok(refused);
            }
            let db = configured(&o, false)?;
            let version = db.version()?;
            let latest = Store::latest_version();
            let counts = db.row_counts()?;
            let audit = AuditCheck::of(o.gate.audit())?;
            let mut out = std::io::stdout().lock();
            if json {
                let tables: Map<String, serde_json::Value> =
                    counts.iter().map(|(t, n)| (t.clone(), json!(n))).collect();
                writeln!(
                    out,
                    "{}",
                    json!({"backend": db.dialect().name(), "location": db.location(),
                           "connected": true, "version": version, "latest": latest,
                           "migrations_applied": version, "pending": latest - version,
                           "tables": tables, "audit": audit.json()})
                )?;
            } else {
                writeln!(out, "backend:    {}", db.dialect().name())?;
                writeln!(out, "location:   {}", db.location())?;
                writeln!(out, "connected:  yes")?;
                writeln!(
                    out,
                    "schema:     {version} of {latest} ({} pending)",
                    latest - version
                )?;
                writeln!(out, "rows:")?;
                for (t, n) in &counts {
                    writeln!(out, "  {t:<24} {n}")?;
                }
                writeln!(out, "audit:      {}", audit.line())?;
            }
            Ok(if version == latest && audit.problem.is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        StoreCmd::Copy { from, to, replace } => {
            if (from, to) != (Kind::Sqlite, Kind::Postgres) {
                return Err("a copy goes from SQLite to PostgreSQL: `chitin store copy --from sqlite --to postgres`".into());
            }
            let mut o = open(globals)?;
            if o.config.store.backend != Backend::Postgres {
                return Err("the target is the configured PostgreSQL database: set `[store] backend = \"postgres\"` and its `url` first".into());
            }
            if let Some(refused) =
                super::operator_may(&o.gate, &o.config, crate::policy::Action::StoreManage)?
            {
                return Ok(refused);
            }
            // Nothing may write state.db while it is copied.
            let _lock = crate::lifecycle::GatewayLock::acquire(o.home.root())?;
            let path = o.home.path("state.db");
            if !path.exists() {
                return Err(format!("no {} to copy", path.display()).into());
            }
            let src = Store::open(&path)?;
            super::report_migration(&src);
            let dst = configured(&o, true)?;
            // The audit log goes along, and it cannot be merged or deleted: its tables in the
            // target are append-only. Checked before anything is copied.
            let existing = target_audit(&dst)?;
            if existing > 0 {
                return Err(format!(
                    "{} already holds an audit log ({existing} record(s) and checkpoint(s)); its tables are append-only, so `--replace` does not delete them and this deployment's chain cannot be merged into another. Copy into a new, empty database (`CREATE DATABASE ...`, then point `[store] url` at it)",
                    dst.location()
                )
                .into());
            }
            let local = o.gate.audit().paths().clone();
            if let Err(t) = o.gate.audit().verify()? {
                return Err(format!(
                    "the audit log {} does not verify ({t}); nothing was copied. Run `chitin audit verify` and look at it first",
                    local.db.display()
                )
                .into());
            }
            let record = |outcome: &str, payload: serde_json::Value| {
                o.gate
                    .audit()
                    .append(
                        RecordInput::new(
                            AuditKind::Admin,
                            format!(
                                "Chitin::User::{}",
                                serde_json::Value::String(o.config.operator().into())
                            ),
                            "store.copy",
                            "Chitin::Gateway::\"gateway\"",
                        )
                        .with_outcome(outcome)
                        .with_payload(payload),
                    )
                    .map(|_| ())
                    .map_err(|e| format!("audit log unavailable, nothing copied: {e}"))
            };
            record(
                "started",
                json!({"from": src.path().display().to_string(), "to": dst.location(), "replace": replace}),
            )?;
            let bar = super::progress::bar(0, "copying");
            let copied = chitin_store::copy::sqlite_to_postgres(
                src.db(),
                &dst,
                replace,
                &mut |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                },
            )?;
            bar.finish_and_clear();
            // The data keys go along: on PostgreSQL every replica reads them from the
            // database (same secret store, same master key), so the copied transcripts open.
            let keys_path = o.home.path(crate::vault::VAULT_FILE);
            let keys_copied = match crate::secrets::fsutil::read_private(&keys_path)? {
                Some(bytes) => {
                    crate::vault::install_sealed_keys(&dst, &bytes).map_err(|e| {
                        format!("the state was copied but the data keys ({}) were not: {e}. Fix that and run the copy again with --replace", keys_path.display())
                    })?;
                    true
                }
                None => false,
            };
            let rows: i64 = copied.iter().map(|(_, n)| n).sum();
            record(
                "copied",
                json!({"from": src.path().display().to_string(), "to": dst.location(),
                       "tables": copied.len(), "rows": rows, "replace": replace,
                       "data_keys": keys_copied}),
            )?;
            println!(
                "copied {rows} row(s) of {} table(s) from {} to {}",
                copied.len(),
                src.path().display(),
                dst.location()
            );
            if keys_copied {
                println!(
                    "copied the data keys of {} into the database (table vault_keys); every gateway on it opens them with this secret store's vault key",
                    keys_path.display()
                );
            }
            // The SQLite log is complete (its last checkpoint signed), then moved as it is.
            o.gate.audit().shutdown()?;
            let pg = match o.pg.take() {
                Some(pg) => pg,
                None => pg_config(&o.config.store, Some(&o.gate), &o.secrets)?,
            };
            let summary = chitin_audit::copy_from_sqlite(
                &local.db,
                Some(local.checkpoints.as_path()),
                &o.gate.audit().public_key(),
                &super::audit_pg_config(&pg)?,
            )
            .map_err(|e| {
                format!("the state was copied but the audit log was not: {e}. Fix that and run the copy again with --replace")
            })?;
            // It continues there: the copy is the first thing the shared log records.
            let (log, _) = super::open_audit_on(globals, &o.config, &mut o.secrets, None)?;
            log.append(
                RecordInput::new(
                    AuditKind::Admin,
                    format!(
                        "Chitin::User::{}",
                        serde_json::Value::String(o.config.operator().into())
                    ),
                    "store.copy",
                    "Chitin::Gateway::\"gateway\"",
                )
                .with_outcome("audit copied")
                .with_payload(
                    json!({"from": local.db.display().to_string(), "to": dst.location(),
                    "records": summary.records, "checkpoints": summary.checkpoints,
                    "head_seq": summary.head_seq}),
                ),
            )?;
            log.shutdown()?;
            println!(
                "copied the audit log: {} record(s) and {} checkpoint(s), head seq {}; it continues in {} ({} is kept as it was, no longer written)",
                summary.records,
                summary.checkpoints,
                summary.head_seq,
                dst.location(),
                local.db.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Records and checkpoints of an audit log already in the target database (0: none, or its
/// tables do not exist yet).
pub(super) fn target_audit(db: &Db) -> Result<i64, BoxError> {
    Ok(db.with(|c| -> Result<i64, chitin_store::Error> {
        let present: i64 = c
            .query_row(
                "SELECT count(*) FROM information_schema.tables
                 WHERE table_schema = current_schema()
                   AND table_name IN ('audit_records', 'audit_checkpoints')",
                crate::store::params![],
            )?
            .get(0)?;
        if present < 2 {
            return Ok(0);
        }
        c.query_row(
            "SELECT (SELECT count(*) FROM audit_records) + (SELECT count(*) FROM audit_checkpoints)",
            crate::store::params![],
        )?
        .get(0)
    })?)
}

/// What `store check` says about the audit log: where, how long, verified or not.
struct AuditCheck {
    backend: &'static str,
    report: Option<chitin_audit::VerifyReport>,
    problem: Option<String>,
}

impl AuditCheck {
    fn of(log: &chitin_audit::AuditLog) -> Result<Self, BoxError> {
        let (report, problem) = match log.verify()? {
            Ok(r) => (Some(r), None),
            Err(t) => (None, Some(t.to_string())),
        };
        Ok(Self {
            backend: log.backend(),
            report,
            problem,
        })
    }

    fn json(&self) -> serde_json::Value {
        match (&self.report, &self.problem) {
            (Some(r), _) => json!({"backend": self.backend, "verified": true,
                "records": r.records, "head": chitin_audit::to_hex(&r.head),
                "last_checkpoint": r.last_checkpoint, "uncovered": r.uncovered}),
            (None, p) => json!({"backend": self.backend, "verified": false, "problem": p}),
        }
    }

    fn line(&self) -> String {
        match (&self.report, &self.problem) {
            (Some(r), _) => format!(
                "{}, verified: {} records, head {}, last checkpoint {}",
                self.backend,
                r.records,
                chitin_audit::to_hex(&r.head),
                r.last_checkpoint
                    .map_or_else(|| "none".to_string(), |s| s.to_string())
            ),
            (None, p) => format!(
                "{}, DOES NOT VERIFY: {}",
                self.backend,
                p.as_deref().unwrap_or_default()
            ),
        }
    }
}
