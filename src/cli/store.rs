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

/// Releases `[store] url` / `password` (`env:VAR`, or `secret:NAME` through Cedar
/// `secret.use` for `Chitin::Gateway::"store"`, audited) and builds the connection settings.
pub fn pg_config(
    cfg: &StoreConfig,
    gate: &crate::gate::Gate,
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
    gate: &crate::gate::Gate,
    secrets: &crate::secrets::SecretStore,
) -> Result<Zeroizing<String>, BoxError> {
    super::credentials::release(PRINCIPAL, field, r, host, gate, secrets)
}

struct Opened {
    config: Config,
    home: crate::state::Home,
    gate: crate::gate::Gate,
    secrets: crate::secrets::SecretStore,
}

fn open(globals: &Globals) -> Result<Opened, BoxError> {
    let config = globals.load_config()?;
    let home = crate::state::Home::create(&globals.home)?;
    let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let gate = super::admin_gate(globals, &config, &mut secrets)?;
    Ok(Opened {
        config,
        home,
        gate,
        secrets,
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
            let pg = pg_config(&o.config.store, &o.gate, &o.secrets)?;
            if migrate {
                Db::postgres(&pg)?
            } else {
                Db::postgres_unmigrated(&pg)?
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
                           "tables": tables})
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
            }
            Ok(if version == latest {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        StoreCmd::Copy { from, to, replace } => {
            if (from, to) != (Kind::Sqlite, Kind::Postgres) {
                return Err("a copy goes from SQLite to PostgreSQL: `chitin store copy --from sqlite --to postgres`".into());
            }
            let o = open(globals)?;
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
            let rows: i64 = copied.iter().map(|(_, n)| n).sum();
            record(
                "copied",
                json!({"from": src.path().display().to_string(), "to": dst.location(),
                       "tables": copied.len(), "rows": rows, "replace": replace}),
            )?;
            println!(
                "copied {rows} row(s) of {} table(s) from {} to {}",
                copied.len(),
                src.path().display(),
                dst.location()
            );
            println!(
                "the audit log is not copied: it stays in this state directory (audit/) until the audit crate has a PostgreSQL backend"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
