//! The `chitin` command line. Each command group lives in its own file.

mod agent;
pub use agent::{build_agent, router as model_router};
mod approvals;
mod audit;
mod backup;
mod credentials;
mod cron;
mod data;
mod doctor;
mod gateway;
mod init;
mod mcp;
mod onboard;
mod pairing;
mod policy;
mod progress;
mod retention;
mod sandbox;
mod secrets;
mod service;
mod sessions;
mod skills;
mod status;
mod store;
mod token;
mod usage;
mod users;
mod workflow;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// The result of a command: an exit code, or an error that `main` prints as `chitin: <error>`
/// and turns into exit status 2.
pub type CmdResult = Result<ExitCode, Box<dyn std::error::Error + Send + Sync>>;

/// `chitin --version`: the version and what it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("CHITIN_BUILD_COMMIT"),
    ", built ",
    env!("CHITIN_BUILD_DATE"),
    ", ",
    env!("CHITIN_BUILD_RUSTC"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "chitin",
    version = VERSION,
    about = "A security-hardened policy gateway for AI agents"
)]
struct Cli {
    /// Configuration file [default: $CHITIN_HOME/chitin.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the state directory, a documented config, default policies and the store.
    Init,
    /// Check the installation: state permissions, config, policies, sandbox, secrets, audit;
    /// exit 0 (nothing above low), 1 (medium/high), 2 (critical).
    Doctor {
        #[arg(long)]
        json: bool,
        /// Repair what is safe: narrow permissions, create missing directories (never widens)
        #[arg(long)]
        fix: bool,
    },
    /// Run one agent turn in process: the model, tools through the gate, the reply.
    Agent(agent::AgentArgs),
    /// List and show the agent's sessions.
    #[command(subcommand)]
    Sessions(sessions::SessionsCmd),
    /// Approve or deny high-risk actions waiting for a person.
    #[command(subcommand)]
    Approvals(approvals::ApprovalsCmd),
    /// Security review of the whole deployment (exposure, files, secrets, sandbox, policy,
    /// skills, channels, approvals, audit, lifecycle, providers, updates).
    #[command(subcommand)]
    Security(SecurityCmd),
    /// Validate, evaluate, test, lint, explain and diff Cedar policies; report shadow trials.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Run commands inside the sandbox, check what the kernel can enforce.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCmd),
    /// Verify, export and query the tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Manage the encrypted secret store.
    #[command(subcommand)]
    Secrets(secrets::SecretsCmd),
    /// Sign, install, verify and trust skills.
    #[command(subcommand)]
    Skills(skills::SkillsCmd),
    /// Run the gateway server (HTTP API on loopback by default).
    Gateway(gateway::GatewayArgs),
    /// Show or rotate the gateway's bearer token.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Enforce data retention and manage legal holds.
    #[command(subcommand)]
    Retention(retention::RetentionCmd),
    /// GDPR: export or erase everything held about a data subject.
    #[command(subcommand)]
    Data(data::DataCmd),
    /// Encrypted backups of the state directory: create, verify, restore.
    #[command(subcommand)]
    Backup(backup::BackupCmd),
    /// Pair chat identities with users: list, approve, deny, revoke.
    #[command(subcommand)]
    Pairing(pairing::PairingCmd),
    /// The configured chat channels and their state.
    #[command(subcommand)]
    Channels(pairing::ChannelsCmd),
    /// Lobster-compatible workflows: run, resume, list, show, plan (--dry-run) and draw.
    #[command(subcommand)]
    Workflow(workflow::WorkflowCmd),
    /// Cron jobs the gateway runs: list, add, remove, run now.
    #[command(subcommand)]
    Cron(cron::CronCmd),
    /// Spend and tokens per user, model, session, day, tool or task, with today's budgets.
    Usage(usage::UsageArgs),
    /// Operator accounts: Cedar users in groups (add, list, remove).
    #[command(subcommand)]
    Users(users::UsersCmd),
    /// Per-user API tokens: issue, list, revoke.
    #[command(subcommand)]
    Tokens(users::TokensCmd),
    /// Browsers held for an owner's approval: list, approve, revoke.
    #[command(subcommand)]
    Devices(users::DevicesCmd),
    /// MCP servers: list them and their tools, trust (pin) or untrust a server's tools.
    #[command(subcommand)]
    Mcp(mcp::McpCmd),
    /// Run the gateway as a hardened systemd service: install, status, uninstall.
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// The state database on SQLite or PostgreSQL: migrate, check, copy to PostgreSQL.
    #[command(subcommand)]
    Store(store::StoreCmd),
    /// One screen: gateway up, model reachable, channels, pending approvals, last backup,
    /// audit head (exit 1 when the gateway is not running or not ready).
    Status(status::StatusArgs),
    /// First run, interactively or with flags: provider (key tested), model, a first
    /// channel (and its pairing), the budget; writes chitin.toml.
    Onboard(onboard::OnboardArgs),
}

#[derive(Debug, Subcommand)]
enum SecurityCmd {
    /// Run every security check; exit 0 (nothing above low), 1 (medium/high), 2 (critical).
    Audit {
        #[arg(long)]
        json: bool,
        /// Also verify the whole audit chain and test-decrypt the newest backup
        #[arg(long)]
        deep: bool,
        /// The backup identity for --deep [default: [backup] identity]
        #[arg(long, value_name = "FILE", requires = "deep")]
        identity: Option<PathBuf>,
    },
}

pub use crate::config::Globals;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens the audit log the way every command and the gateway do: the state dir is created
/// 0700 if missing, and the checkpoint-signing key comes from the secret store (unlocking it
/// needs `CHITIN_PASSPHRASE`, a prompt or the keyring cache).
pub fn open_audit(globals: &Globals) -> Result<std::sync::Arc<chitin_audit::AuditLog>, BoxError> {
    let config = globals.load_config()?;
    crate::state::Home::create(&globals.home)?;
    let mut store = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    open_audit_with(globals, &config, &mut store)
}

/// [`open_audit`] with a secret store the caller already unlocked.
pub fn open_audit_with(
    globals: &Globals,
    config: &Config,
    store: &mut crate::secrets::SecretStore,
) -> Result<std::sync::Arc<chitin_audit::AuditLog>, BoxError> {
    open_audit_with_sink(globals, config, store, None)
}

/// [`open_audit_with`] with a sink that receives every checkpoint (the gateway logs them).
pub fn open_audit_with_sink(
    globals: &Globals,
    config: &Config,
    store: &mut crate::secrets::SecretStore,
    on_checkpoint: Option<chitin_audit::CheckpointSink>,
) -> Result<std::sync::Arc<chitin_audit::AuditLog>, BoxError> {
    open_audit_on(globals, config, store, on_checkpoint).map(|(log, _)| log)
}

/// The audit log where the configuration puts it: `audit.db` in the state directory, or with
/// `[store] backend = "postgres"` the deployment's shared log in the same PostgreSQL database
/// as the state (same URL, TLS and password), with the connection settings it used. The
/// signing key is the deployment's audit key from the secret store either way.
pub fn open_audit_on(
    globals: &Globals,
    config: &Config,
    store: &mut crate::secrets::SecretStore,
    on_checkpoint: Option<chitin_audit::CheckpointSink>,
) -> Result<
    (
        std::sync::Arc<chitin_audit::AuditLog>,
        Option<crate::store::PgConfig>,
    ),
    BoxError,
> {
    crate::state::Home::create(&globals.home)?;
    let signer = crate::secrets::audit_key::signer(store, &globals.home)?;
    let mut options = config.audit.options();
    options.signer = Some(std::sync::Arc::new(signer));
    options.on_checkpoint = on_checkpoint;
    match config.store.backend {
        crate::config::store::Backend::Sqlite => Ok((
            std::sync::Arc::new(chitin_audit::AuditLog::open(&globals.home, options)?),
            None,
        )),
        crate::config::store::Backend::Postgres => {
            let (pg, decided) = store_credentials(globals, config, store)?;
            let log = match audit_not_moved(&globals.home, &pg)? {
                // A deployment on its way to PostgreSQL: its chain is still audit.db until
                // `store copy` moves it; starting a second chain in the database would fork it.
                Some(records) => {
                    eprintln!(
                        "note: the audit log is still {} ({records} records): `chitin store copy --from sqlite --to postgres` moves it to PostgreSQL with the state",
                        globals.home.join(chitin_audit::DB_FILE).display()
                    );
                    chitin_audit::AuditLog::open(&globals.home, options)?
                }
                None => chitin_audit::AuditLog::open_postgres(
                    &globals.home,
                    &audit_pg_config(&pg)?,
                    options,
                )?,
            };
            // The decisions that released the credentials come first.
            for record in decided {
                log.append(record).map_err(|e| {
                    format!("the audit log refused the record of the store credentials' release, nothing else was done: {e}")
                })?;
            }
            Ok((std::sync::Arc::new(log), Some(pg)))
        }
    }
}

/// `Some(records)` when this state directory's SQLite audit log has records and the
/// PostgreSQL database holds no audit log yet (the deployment has not been copied).
fn audit_not_moved(
    home: &std::path::Path,
    pg: &crate::store::PgConfig,
) -> Result<Option<i64>, BoxError> {
    let db = home.join(chitin_audit::DB_FILE);
    if !db.exists() {
        return Ok(None);
    }
    let Some((seq, _)) = chitin_audit::AuditReader::open(&db)?.head()? else {
        return Ok(None);
    };
    let target = crate::store::Db::postgres_unmigrated(pg)?;
    if store::target_audit(&target)? > 0 {
        return Ok(None);
    }
    Ok(Some(seq))
}

/// The audit crate's connection settings for the state store's PostgreSQL database.
pub fn audit_pg_config(pg: &crate::store::PgConfig) -> Result<chitin_audit::PgConfig, BoxError> {
    let tls = match pg.tls_mode()? {
        crate::store::TlsMode::Disable => chitin_audit::PgTls::Disable,
        crate::store::TlsMode::Require => chitin_audit::PgTls::Require,
        crate::store::TlsMode::VerifyFull => chitin_audit::PgTls::VerifyFull {
            ca_file: pg.ca_file.clone(),
        },
    };
    let mut config = chitin_audit::PgConfig::from_url(pg.url.as_str())?.with_tls(tls);
    if let Some(password) = &pg.password {
        config = config.with_password(password.clone());
    }
    Ok(config)
}

/// The `[store]` connection settings, with the audit records of any `secret:` credential's
/// release. A `secret:` reference is released through the gate (Cedar `secret.use` by
/// `Chitin::Gateway::"store"`), and a decision is recorded before it takes effect; but the log
/// it belongs in is the one this credential opens. So the gate decides over a throwaway log in
/// a private temporary directory, and its records are returned to be appended to the shared
/// log as its first records once it is open (a refusal ends here, with its message).
fn store_credentials(
    globals: &Globals,
    config: &Config,
    secrets: &crate::secrets::SecretStore,
) -> Result<(crate::store::PgConfig, Vec<chitin_audit::RecordInput>), BoxError> {
    if !store::needs_secret_store(&config.store)? {
        return Ok((store::pg_config(&config.store, None, secrets)?, Vec::new()));
    }
    let dir = PrivateTempDir::create(&globals.home, ".store-credentials")?;
    let throwaway = std::sync::Arc::new(chitin_audit::AuditLog::open(
        &dir.0,
        chitin_audit::AuditOptions {
            checkpoint_every_records: 0,
            checkpoint_every_ms: 0,
            ..chitin_audit::AuditOptions::default()
        },
    )?);
    let engine =
        crate::policy::PolicyEngine::load(policy::engine_spec(globals, config, None, None)?)?;
    let redactor = secrets.redactor();
    let gate = crate::gate::Gate::new(
        std::sync::Arc::new(engine),
        std::sync::Arc::clone(&throwaway),
    )
    .with_redactor(std::sync::Arc::new(move |s: &str| {
        redactor.redact(s).into_owned()
    }));
    let released = store::pg_config(&config.store, Some(&gate), secrets);
    drop(gate);
    throwaway.shutdown()?;
    let pg = released?;
    let reader = chitin_audit::AuditReader::open(&dir.0.join(chitin_audit::DB_FILE))?;
    let mut decided = Vec::new();
    for r in reader.range(1, i64::MAX)? {
        let policies = r.policy_ids();
        let payload = r.payload_json().unwrap_or(serde_json::Value::Null);
        decided.push(chitin_audit::RecordInput {
            kind: r.kind.parse()?,
            actor: r.actor,
            action: r.action,
            resource: r.resource,
            decision: r.decision,
            policies,
            outcome: r.outcome,
            payload,
        });
    }
    Ok((pg, decided))
}

/// A new 0700 directory in the state directory, removed with everything in it when dropped.
struct PrivateTempDir(std::path::PathBuf);

impl PrivateTempDir {
    fn create(parent: &std::path::Path, prefix: &str) -> Result<Self, BoxError> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!("{prefix}-{}-{nanos}", std::process::id()));
        // `create` fails on an existing path: never a directory someone else prepared.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The gate the command line decides administrative actions with: the configured policies and
/// entities, and the audit log (opened with `store`, which holds its signing key).
pub(crate) fn admin_gate(
    globals: &Globals,
    config: &Config,
    store: &mut crate::secrets::SecretStore,
) -> Result<crate::gate::Gate, BoxError> {
    admin_gate_on(globals, config, store).map(|(gate, _)| gate)
}

/// [`admin_gate`], with the PostgreSQL connection settings the audit log was opened with
/// (`[store] backend = "postgres"`; their credentials released and recorded once).
pub(crate) fn admin_gate_on(
    globals: &Globals,
    config: &Config,
    store: &mut crate::secrets::SecretStore,
) -> Result<(crate::gate::Gate, Option<crate::store::PgConfig>), BoxError> {
    let engine =
        crate::policy::PolicyEngine::load(policy::engine_spec(globals, config, None, None)?)?;
    // Managed users (`chitin users add`, single sign-on) may be the operator.
    let home = crate::state::Home::create(&globals.home)?;
    crate::accounts::install_users(&engine, &crate::store::Store::open(&home.path("state.db"))?)?;
    let (audit, pg) = open_audit_on(globals, config, store, None)?;
    let redactor = store.redactor();
    Ok((
        crate::gate::Gate::new(std::sync::Arc::new(engine), audit).with_redactor(
            std::sync::Arc::new(move |s: &str| redactor.redact(s).into_owned()),
        ),
        pg,
    ))
}

/// Decides administrative `action` for the command line's operator (`[cli] operator`, default
/// the gateway owner) through the gate, which records the decision. A refusal is printed as
/// `refused: policy denied `<action>` for Chitin::User::"<operator>" (...)` and its exit code
/// (1) returned: the caller then does nothing.
pub(crate) fn operator_may(
    gate: &crate::gate::Gate,
    config: &Config,
    action: crate::policy::Action,
) -> Result<Option<ExitCode>, BoxError> {
    match crate::lifecycle::admin_check(gate, config.operator(), action) {
        Ok(()) => Ok(None),
        Err(e @ crate::lifecycle::LifecycleError::Denied { .. }) => {
            println!("refused: {e}");
            Ok(Some(ExitCode::from(1)))
        }
        Err(e) => Err(e.into()),
    }
}

/// What the gateway and the commands that act run on: config, the gate (policy engine + audit
/// log) and the state store, built the same way everywhere.
pub struct Runtime {
    pub config: Config,
    pub gate: crate::gate::Gate,
    pub store: std::sync::Arc<crate::store::Store>,
    pub clock: std::sync::Arc<dyn crate::clock::Clock>,
    /// The unlocked secret store (provider keys and tool secrets are released from it through
    /// the gate).
    pub secrets: crate::secrets::SharedSecretStore,
}

impl Runtime {
    /// Checks the state dir, loads config and policies (an invalid set is an error), opens the
    /// audit log (its key from the secret store) and the configured state store (`state.db`,
    /// or the PostgreSQL database of `[store]`, its credentials released through the gate).
    pub fn open(globals: &Globals) -> Result<Self, BoxError> {
        let config = globals.load_config()?;
        let home = crate::state::Home::create(&globals.home)?;
        let engine =
            crate::policy::PolicyEngine::load(policy::engine_spec(globals, &config, None, None)?)?;
        let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
        let (audit, pg) = open_audit_on(globals, &config, &mut secrets, None)?;
        let redactor = secrets.redactor();
        let gate = crate::gate::Gate::new(std::sync::Arc::new(engine), audit).with_redactor(
            std::sync::Arc::new(move |s: &str| redactor.redact(s).into_owned()),
        );
        // The configured store, as the gateway opens it: with `[store] backend = "postgres"`
        // every command works on the deployment's database, never on a local state.db.
        let store = std::sync::Arc::new(match &pg {
            Some(pg) => crate::store::Store::postgres(pg)?,
            None => crate::store::Store::open(&home.path("state.db"))?,
        });
        // Managed users (`chitin users add`, single sign-on) are principals too.
        crate::accounts::install_users(gate.engine(), &store)?;
        report_migration(&store);
        Ok(Self {
            config,
            gate,
            store,
            clock: std::sync::Arc::new(crate::clock::SystemClock),
            secrets: crate::secrets::SharedSecretStore::new(secrets),
        })
    }

    /// The approval workflow.
    pub fn approvals(&self) -> crate::approvals::Approvals {
        crate::approvals::Approvals::new(
            std::sync::Arc::clone(&self.store),
            self.gate.clone(),
            std::sync::Arc::clone(&self.clock),
            crate::approvals::DEFAULT_TTL_MS,
        )
    }
}

/// Says on stderr that opening `store` upgraded its schema, and where the copy taken before
/// is.
pub(crate) fn report_migration(store: &crate::store::Store) {
    if let Some((from, copy)) = store.migrated_from() {
        eprintln!(
            "chitin: upgraded {} from schema {from} to {}; the database as it was is kept at {}",
            store.path().display(),
            crate::store::Store::latest_version(),
            copy.display()
        );
    }
}

/// The tool sandbox for this state dir and config (the launcher is given the config file,
/// when there is one, for the limits not passed as flags).
pub(crate) fn sandbox_for(
    globals: &Globals,
    config: &Config,
) -> Result<crate::tools::Sandbox, crate::tools::ToolError> {
    crate::tools::Sandbox::current(
        globals.home.clone(),
        globals
            .config_path
            .exists()
            .then(|| globals.config_path.clone()),
        config.sandbox.clone(),
    )
}

/// `CHITIN_HOME`, or `~/.chitin`.
pub fn state_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CHITIN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/"), PathBuf::from);
    home.join(".chitin")
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // The sandboxed file helper runs inside the sandbox; it never reaches clap or the config.
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(crate::tools::helper::HELPER_ARG))
    {
        return crate::tools::helper::main();
    }
    let cli = Cli::parse();
    let globals = Globals::resolve(state_home(), cli.config);
    if !matches!(cli.command, Command::Gateway(_)) {
        quiet_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Init => init::run(&globals),
        Command::Agent(args) => agent::run(args, &globals),
        Command::Sessions(cmd) => sessions::run(cmd, &globals),
        Command::Approvals(cmd) => approvals::run(cmd, &globals),
        Command::Doctor { json, fix } => doctor::run(
            &globals,
            &doctor::Options {
                json,
                fix,
                deep: false,
                identity: None,
                audit: false,
            },
        ),
        Command::Security(SecurityCmd::Audit {
            json,
            deep,
            identity,
        }) => doctor::run(
            &globals,
            &doctor::Options {
                json,
                fix: false,
                deep,
                identity,
                audit: true,
            },
        ),
        Command::Policy(cmd) => policy::run(cmd, &globals),
        Command::Sandbox(cmd) => sandbox::run(cmd, &globals),
        Command::Audit(cmd) => audit::run(cmd, &globals),
        Command::Secrets(cmd) => secrets::run(cmd, &globals),
        Command::Skills(cmd) => skills::run(cmd, &globals),
        Command::Gateway(args) => gateway::run(args, &globals),
        Command::Token(cmd) => token::run(cmd, &globals),
        Command::Retention(cmd) => retention::run(cmd, &globals),
        Command::Data(cmd) => data::run(cmd, &globals),
        Command::Backup(cmd) => backup::run(cmd, &globals),
        Command::Pairing(cmd) => pairing::run_pairing(cmd, &globals),
        Command::Channels(cmd) => pairing::run_channels(cmd, &globals),
        Command::Workflow(cmd) => workflow::run(cmd, &globals),
        Command::Cron(cmd) => cron::run(cmd, &globals),
        Command::Usage(args) => usage::run(args, &globals),
        Command::Users(cmd) => users::run_users(cmd, &globals),
        Command::Tokens(cmd) => users::run_tokens(cmd, &globals),
        Command::Devices(cmd) => users::run_devices(cmd, &globals),
        Command::Mcp(cmd) => mcp::run(cmd, &globals),
        Command::Service(cmd) => service::run(cmd, &globals),
        Command::Store(cmd) => store::run(cmd, &globals),
        Command::Status(args) => status::run(args, &globals),
        Command::Onboard(args) => onboard::run(args, &globals),
    };
    match result {
        Ok(code) => code,
        Err(e) if broken_pipe(&*e) => ExitCode::from(CLOSED_STDOUT_EXIT),
        Err(e) => {
            eprintln!("chitin: {e}");
            ExitCode::from(2)
        }
    }
}

/// The exit status of a command whose reader went away (`chitin audit list | head`): what a
/// shell shows for a program ended by SIGPIPE (128 + 13), without a message.
pub const CLOSED_STDOUT_EXIT: u8 = 141;

/// Whether `e`, or an error that caused it, is a write to a closed pipe.
fn broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A command's output is piped into something that stops reading (`| head`): the commands
/// with long output write with `writeln!` and their errors end as [`CLOSED_STDOUT_EXIT`]; for
/// any `println!` elsewhere (which panics on a write error), this hook ends the process the
/// same quiet way instead of printing a panic. Not for the gateway, whose stdout is a log.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(i32::from(CLOSED_STDOUT_EXIT));
        }
        default(info);
    }));
}
