//! `chitin gateway [--bind ADDR:PORT]`: opens everything the server runs on and serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use clap::Args;
use serde_json::json;

use super::{CmdResult, Globals};
use crate::gateway::{GatewayError, Parts, logging, metrics::Metrics};
use crate::secrets::gateway_token;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Listen address [default: [gateway] bind, 127.0.0.1:18789]
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "port")]
    bind: Option<String>,
    /// Listen on 127.0.0.1:PORT (shorthand of `--bind 127.0.0.1:PORT`)
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
}

impl GatewayArgs {
    /// The `--bind` address, or `127.0.0.1:PORT` for `--port PORT`.
    fn bind_override(&self) -> Option<String> {
        self.port
            .map(|p| format!("127.0.0.1:{p}"))
            .or_else(|| self.bind.clone())
    }
}

/// Refuses a non-loopback address without TLS.
pub fn check_exposure(addr: SocketAddr, tls: bool) -> Result<(), GatewayError> {
    if !tls && !addr.ip().to_canonical().is_loopback() {
        return Err(GatewayError::ExposedWithoutTls { addr });
    }
    Ok(())
}

/// Creates the workspace (0700) and checks that it and the state dir do not overlap.
pub fn prepare_workspace(ws: &Path, home: &Path) -> Result<PathBuf, GatewayError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |reason: String| GatewayError::Workspace {
        path: ws.to_path_buf(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(ws)
        .map_err(|e| err(format!("cannot create it: {e}")))?;
    let ws = std::fs::canonicalize(ws).map_err(|e| err(e.to_string()))?;
    let home = std::fs::canonicalize(home).map_err(|e| err(e.to_string()))?;
    if ws.starts_with(&home) || home.starts_with(&ws) {
        return Err(err(format!(
            "overlaps the state directory {}; tools may never see it. Set [gateway] workspace to a directory outside it",
            home.display()
        )));
    }
    Ok(ws)
}

pub fn run(args: GatewayArgs, globals: &Globals) -> CmdResult {
    // Before the gateway starts a thread: an arena per core, not eight (the memory a burst
    // freed is kept per arena; `chitin_sandbox::memory`).
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    if let Some(n) = chitin_sandbox::memory::arena_cap(
        std::env::var_os("MALLOC_ARENA_MAX").as_deref(),
        std::env::var_os("GLIBC_TUNABLES").as_deref(),
        cores,
    ) {
        chitin_sandbox::memory::cap_malloc_arenas(n);
    }
    let config = globals.load_config()?;
    // PostgreSQL only once every module is ported: never half on one database, half on
    // another. Refused before anything is created or connected.
    if config.store.backend == crate::config::store::Backend::Postgres
        && let Some(why) = crate::store::gateway_refusal()
    {
        return Err(why.into());
    }
    let bind = config.gateway.bind_addr(args.bind_override().as_deref())?;
    // Before anything is created: an exposed gateway never starts.
    check_exposure(bind, config.gateway.tls())?;
    crate::gateway::tls::install_provider();
    let tls = if config.gateway.tls() {
        let path = |p: &str| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                globals.home.join(p)
            }
        };
        Some(
            crate::gateway::tls::server_config(
                &path(&config.gateway.tls_cert),
                &path(&config.gateway.tls_key),
            )
            .map_err(GatewayError::Tls)?,
        )
    } else {
        None
    };

    // Before anything is created: no path that defines behaviour or trust may overlap the
    // workspace or the shared temp directories.
    crate::config::paths::check_separation(&config, &globals.home, &globals.config_path)?;

    let redactor: logging::SharedRedactor =
        Arc::new(RwLock::new(crate::secrets::Redactor::empty()));
    // Kept until the gateway stops: dropping it sends the last spans.
    let mut telemetry = logging::init(Arc::clone(&redactor), &config.telemetry)?;

    // A fresh machine: the same steps as `chitin init` (idempotent, never overwrites).
    if !globals.home.join("state.db").exists() || !globals.config_path.exists() {
        // An invalid installed policy set makes the engine load below fail with the reason.
        super::init::run_files(globals)?;
    }
    let config = globals.load_config()?;
    // The kernel check forks a child that creates namespaces and waits for it to exit (their
    // teardown included): several milliseconds mostly spent waiting, so it runs on its own
    // thread beside the rest of the start (`check` is safe in a multithreaded process: the
    // child only makes raw syscalls on memory prepared before the fork).
    let support = std::thread::Builder::new()
        .name("chitin-sandbox-check".into())
        .spawn(chitin_sandbox::check)
        .map_err(|e| format!("could not start the sandbox check: {e}"))?;

    let home = crate::state::Home::create(&globals.home)?;
    // One gateway per state dir; `chitin backup restore` refuses while this is held.
    let _lock = crate::lifecycle::GatewayLock::acquire_for_gateway(&globals.home)?;
    // Compiling the policies (parse, strict validation, slicing) is the longest step of a start
    // and needs nothing that follows until the gate is built: it runs on its own thread while
    // the secret store, the audit log and the token are opened (issue #21, start time).
    let spec = super::policy::engine_spec(globals, &config, None, None)?;
    let engine = std::thread::Builder::new()
        .name("chitin-policy-load".into())
        .spawn(move || crate::policy::PolicyEngine::load(spec))
        .map_err(|e| format!("could not start the policy loader: {e}"))?;
    let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let (token, created) = gateway_token::ensure(&mut secrets)?;
    match redactor.write() {
        Ok(mut g) => *g = secrets.redactor(),
        Err(p) => *p.into_inner() = secrets.redactor(),
    }
    let metrics = Arc::new(Metrics::default());
    let sink: chitin_audit::CheckpointSink = {
        let m = Arc::clone(&metrics);
        Arc::new(move |cp: &chitin_audit::Checkpoint| {
            m.checkpoint();
            tracing::info!(seq = cp.seq, head = %cp.head, key_id = %cp.key_id, "audit checkpoint");
        })
    };
    let (audit, pg) = super::open_audit_on(globals, &config, &mut secrets, Some(sink))?;
    // On PostgreSQL the state and the audit log are both in the database: a deployment whose
    // chain is still in audit.db is moved first (`chitin store copy`), never forked.
    if pg.is_some() && audit.backend() != "postgres" {
        return Err("[store] backend = \"postgres\": this state directory's audit log has not been copied to PostgreSQL yet; stop here and run `chitin store copy --from sqlite --to postgres` first".into());
    }
    if created {
        audit
            .append(chitin_audit::RecordInput::admin(
                "gateway",
                "gateway.token.create",
                format!("secret:{}", gateway_token::GATEWAY_TOKEN_SECRET),
                json!({}),
            ))
            .map_err(|e| format!("audit record could not be written: {e}"))?;
        println!("created the gateway token (`chitin token show` prints it)");
    }
    // What needs neither the policies nor the gate is opened while they compile (issue #21,
    // start time): the workspace, the sandbox and, when it has nothing to migrate, the state
    // database. Their errors are reported after the policies' (as before), and the database
    // is not migrated, nor the vault's or the resume-token key made, until the policies are
    // known to be valid.
    let early_store = match &pg {
        None => crate::store::Store::open_if_current(&home.path("state.db")),
        Some(_) => None,
    };
    let early = || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
        let workspace = prepare_workspace(&config.workspace_dir(&globals.home), &globals.home)?;
        let sandbox = super::sandbox_for(globals, &config)?;
        Ok((workspace, sandbox))
    };
    let early = early();
    let engine = engine.join().map_err(
        |_| "the policy loader stopped unexpectedly; run `chitin policy validate` to see why",
    )??;
    let store = Arc::new(match (early_store, &pg) {
        (Some(store), _) => store,
        (None, Some(pg)) => crate::store::Store::postgres(pg)?,
        (None, None) => crate::store::Store::open(&home.path("state.db"))?,
    });
    super::report_migration(&store);
    let (workspace, sandbox) = early?;
    match sandbox.small_launcher() {
        Some(l) => tracing::info!(launcher = %l.display(), "sandbox launcher"),
        None => tracing::warn!(
            launcher = %sandbox.launcher.display(),
            "chitin-sandbox-launch is not installed next to chitin: tool calls start their sandbox through `chitin sandbox exec` (the same confinement, ~1.5 ms slower per call); install both binaries"
        ),
    }
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(crate::clock::SystemClock);
    let secrets_path = secrets.path().to_path_buf();
    let vault = Arc::new(crate::vault::Vault::for_db(
        &globals.home,
        store.db(),
        &mut secrets,
        Arc::clone(&clock),
    )?);
    // The workflow runner's resume-token key exists before the secrets are counted (`/ready`).
    drop(crate::workflow_runner::TokenKey::from_store(&mut secrets)?);
    let support = support
        .join()
        .map_err(|_| "the sandbox check stopped unexpectedly; run `chitin sandbox check`")?;
    let sandbox_check = if support.enforced() {
        (
            true,
            format!(
                "enforced (landlock ABI {}, seccomp, namespaces)",
                support.landlock_abi
            ),
        )
    } else {
        (false, format!("missing: {}", support.missing.join(", ")))
    };
    let r = Arc::clone(&redactor);
    let gate = crate::gate::Gate::new(Arc::new(engine), audit)
        .with_redactor(Arc::new(move |s: &str| logging::redact(&r, s)));
    // Spans queued since start are sent once the collector's headers are released.
    if let Some(t) = telemetry.as_mut() {
        let headers = super::credentials::telemetry_headers(&config.telemetry, &gate, &secrets)?;
        t.start(headers)?;
    }
    let secrets_count = secrets.list().len();
    let secrets = crate::secrets::SharedSecretStore::new(secrets);
    let sandbox = sandbox
        .with_secret_env(Arc::new(crate::secrets::ToolSecrets::new(
            gate.clone(),
            secrets.clone(),
        )))
        .with_prompt_marks(crate::tools::prompt_guard::PromptMarks::new(Arc::clone(
            &store,
        )));
    // `mcp__<server>__<tool>` for the agent and /tools/invoke (only with [[mcp.servers]]).
    let sandbox = super::mcp::attach(sandbox, &config, &gate, &store, &secrets);
    // One set of browsers, shared by the agent and `/tools/invoke`, stopped with the gateway.
    let sandbox = super::agent::with_browser(sandbox, &config);
    if config.agent.model.trim().is_empty() {
        println!(
            "no model is configured: chat answers with how to add one ([[providers]] and [agent] model in {})",
            globals.config_path.display()
        );
    }
    // Only when `[[channels]]` are configured: tokens released through the gate now.
    let channels = crate::gateway::channels::ChannelsRuntime::build(
        &config.channels,
        &gate,
        &store,
        &clock,
        &secrets,
        Arc::clone(&vault) as Arc<dyn crate::channels::Sealer>,
        &workspace,
    );
    // Cron jobs, webhooks and the heartbeat: configured jobs written to state.db, hook
    // secrets released through the gate now; answers go to chats through the channels'
    // outbox.
    let automation = crate::automation::Automation::build(
        &config,
        &gate,
        &store,
        &clock,
        &secrets,
        channels
            .as_ref()
            .map(crate::gateway::channels::ChannelsRuntime::messenger),
        Arc::clone(&vault) as Arc<dyn crate::agent::Sealer>,
    )?;
    // The agent's `send_message` delivers through the channels' outbox (only with channels);
    // its `cron` tool keeps jobs in the automation's store.
    let agent_sandbox = match &channels {
        Some(c) => sandbox.clone().with_messenger(c.messenger()),
        None => sandbox.clone(),
    }
    .with_cron(automation.jobs());
    let agent = super::agent::assemble_agent(super::agent::AgentInputs {
        globals,
        config: &config,
        gate: &gate,
        store: &store,
        clock: &clock,
        secrets: &secrets,
        sandbox: agent_sandbox.clone(),
        workspace: workspace.clone(),
        vault: Arc::clone(&vault),
    })?;
    // Workflows: approvals they open show where the agent's do (chats, the web page); the
    // agent's own `workflow` calls announce theirs themselves.
    let events: Arc<dyn Fn(crate::workflow_runner::RunnerEvent) + Send + Sync> = {
        let agent = agent.clone();
        Arc::new(move |e| match e {
            crate::workflow_runner::RunnerEvent::ApprovalRequested {
                user,
                session,
                run_id,
                origin,
                approval,
            } if origin != "model" => agent.publish(crate::agent::AgentEvent {
                user,
                session: session.clone(),
                event: "approval.requested",
                payload: json!({"approval": approval.to_json(false), "run_id": null,
                                "session": session, "workflow_run": run_id}),
            }),
            crate::workflow_runner::RunnerEvent::ApprovalRequested { .. } => {}
        })
    };
    let workflows = super::workflow::assemble_runner(super::workflow::RunnerInputs {
        config: &config,
        gate: &gate,
        store: &store,
        clock: &clock,
        secrets: &secrets,
        sandbox: agent_sandbox,
        workspace: workspace.clone(),
        vault: Arc::clone(&vault),
        events: Some(events),
    })?;
    agent.set_workflow_tool(Arc::new(crate::workflow_runner::tool::RunnerTool::new(
        workflows.clone(),
    )));
    // A reload (SIGHUP or a file change) applies a changed model, [agent], [[providers]],
    // [pricing] and [budgets] to the running agent: keys through the same gate and store.
    let reconfigure_agent: crate::gateway::ReconfigureAgent = {
        let (agent, gate, secrets, clock) = (
            agent.clone(),
            gate.clone(),
            secrets.clone(),
            Arc::clone(&clock),
        );
        Arc::new(move |config: &crate::config::Config| {
            let router = super::agent::router(config, &gate, &secrets, Arc::clone(&clock))
                .map_err(|e| e.to_string())?;
            agent.reconfigure(router, config.agent.clone(), config.budgets.clone());
            Ok(())
        })
    };
    // Cron and webhook targets that name a workflow run it through the same runner.
    automation.set_launcher(Arc::new(RunnerLauncher(workflows.clone())));
    // `/tools/invoke` offers what the agent does: web search, its memory index, its sessions.
    let sandbox = super::agent::with_web_search(sandbox, &config, &secrets)?
        .with_sessions(agent.session_store());
    let sandbox = match agent.memory_index() {
        Some(m) => sandbox.with_memory(m),
        None => sandbox,
    };
    let store_for_lifecycle = Arc::clone(&store);
    let audit_for_lifecycle = Arc::clone(gate.audit());
    let parts = Parts {
        globals: globals.clone(),
        secrets_path,
        secrets_count,
        config,
        gate,
        store,
        clock,
        token,
        redactor,
        sandbox,
        sandbox_check,
        workspace,
        bind,
        tls,
        metrics,
        backend: None,
        agent: Some(agent),
        shared_secrets: Some(secrets),
        lifecycle: Some(crate::lifecycle::Lifecycle {
            home: globals.home.clone(),
            store: Arc::clone(&store_for_lifecycle),
            audit: Arc::clone(&audit_for_lifecycle),
            vault,
            clock: Arc::new(crate::clock::SystemClock),
        }),
        channels,
        automation: Some(automation),
        workflows: Some(workflows),
        reconfigure_agent: Some(reconfigure_agent),
    };
    crate::gateway::run(parts)?;
    if let Some(t) = telemetry {
        t.shutdown();
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts the workflows of cron jobs and webhooks (`automation::WorkflowLauncher`) with the
/// workflow runner: as the job's or hook's user, origin `automation` (steps are decided as
/// automation), tainted when the arguments carry a webhook's body.
struct RunnerLauncher(crate::workflow_runner::Runner);

impl crate::automation::WorkflowLauncher for RunnerLauncher {
    fn start(
        &self,
        file: &std::path::Path,
        args: serde_json::Value,
        principal: &str,
        origin: &str,
    ) -> Result<serde_json::Value, String> {
        let req = crate::workflow_runner::StartRequest {
            file: file.to_string_lossy().into_owned(),
            args: Some(args),
            principal: principal.to_string(),
            origin: crate::gate::Origin::Automation,
            // A webhook delivery's run has the delivery as its session: started once.
            session: origin.starts_with("hook:").then(|| origin.to_string()),
            tainted: origin.starts_with("hook:"),
        };
        // Called on the blocking pool (`automation::run`), inside the gateway's runtime.
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| format!("the workflow runner needs the gateway's runtime: {e}"))?;
        Ok(handle.block_on(self.0.start(req)).value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn only_loopback_without_tls_is_accepted() {
        assert!(check_exposure("127.0.0.1:1".parse().unwrap(), false).is_ok());
        assert!(check_exposure("[::1]:1".parse().unwrap(), false).is_ok());
        assert!(check_exposure("0.0.0.0:1".parse().unwrap(), true).is_ok());
        let e = check_exposure("0.0.0.0:1".parse().unwrap(), false).unwrap_err();
        assert!(matches!(e, GatewayError::ExposedWithoutTls { .. }));
        assert!(e.to_string().contains("clear text"));
        assert!(matches!(
            check_exposure("[::ffff:10.0.0.1]:1".parse().unwrap(), false),
            Err(GatewayError::ExposedWithoutTls { .. })
        ));
    }

    #[test]
    fn a_workspace_inside_the_state_dir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        std::fs::create_dir(&home).unwrap();
        let e = prepare_workspace(&home.join("workspace"), &home).unwrap_err();
        assert!(
            e.to_string().contains("overlaps the state directory"),
            "{e}"
        );
        let ok = prepare_workspace(&t.path().join("ws"), &home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(ok).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
