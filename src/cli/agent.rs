//! `chitin agent -m TEXT [--session KEY] [--user USER] [--approval-timeout SECS] [--json]`:
//! one agent turn in process, with every gate the gateway has.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;

use super::{BoxError, CmdResult, Globals, Runtime};
use crate::agent::{Agent, AgentParts, Sealer, TurnRequest};
use crate::secrets::{SecretValue, SharedSecretStore, ToolSecrets};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The message to send.
    #[arg(short = 'm', long = "message", value_name = "TEXT")]
    message: String,
    /// The session to continue (created when new).
    #[arg(long, value_name = "KEY")]
    session: Option<String>,
    /// Who is asking (the Cedar principal); default: [gateway] owner.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// Seconds to wait for an approval (0: refuse calls that need one at once); default: until
    /// the approval expires.
    #[arg(long = "approval-timeout", value_name = "SECS")]
    approval_timeout: Option<u64>,
    /// Print {"reply", "run_id", "tool_calls", "usage"} as JSON.
    #[arg(long)]
    json: bool,
}

impl Sealer for crate::vault::Vault {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        crate::vault::Vault::seal(self, subject, plaintext).map_err(|e| e.to_string())
    }
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        crate::vault::Vault::open(self, subject, sealed).map_err(|e| e.to_string())
    }
    fn erasure_epoch(&self) -> Result<u64, String> {
        crate::vault::Vault::erasure_epoch(self).map_err(|e| e.to_string())
    }
    fn on_erase(&self, hook: std::sync::Weak<crate::agent::transcripts::EraseHook>) {
        crate::vault::Vault::on_erase(self, hook);
    }
}

/// The model router with keys released through the gate from `secrets` (`None`: no model
/// configured).
pub fn router(
    config: &crate::config::Config,
    gate: &crate::gate::Gate,
    secrets: &SharedSecretStore,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<Option<Arc<crate::providers::Router>>, BoxError> {
    if config.agent.model.trim().is_empty() {
        return Ok(None);
    }
    crate::providers::init_tls();
    let env: crate::providers::keys::EnvFn = Arc::new(|var: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| SecretValue::from_str_copy(&v))
    });
    let keys =
        crate::providers::GateKeySource::from_store(gate.clone(), secrets.clone()).with_env(env);
    Ok(Some(Arc::new(crate::providers::Router::from_config(
        config,
        Arc::new(keys),
        clock,
    )?)))
}

/// What an agent is assembled from (the gateway and `chitin agent` open these their own way).
pub struct AgentInputs<'a> {
    pub globals: &'a Globals,
    pub config: &'a crate::config::Config,
    pub gate: &'a crate::gate::Gate,
    pub store: &'a Arc<crate::store::Store>,
    pub clock: &'a Arc<dyn crate::clock::Clock>,
    pub secrets: &'a SharedSecretStore,
    /// The tool sandbox, already carrying the tool secrets (`with_secret_env`).
    pub sandbox: crate::tools::Sandbox,
    pub workspace: std::path::PathBuf,
    pub vault: Arc<crate::vault::Vault>,
}

/// The agent, assembled the same way for the gateway and `chitin agent`: the model router
/// with keys through the gate, approvals, skills, the vault as the transcripts' sealer, and
/// the streaming redaction window of the current secrets.
/// `sandbox` with the configured `web_search` backend attached ([tools.web_search]; its key
/// is released from `secrets` through the gate).
pub fn with_web_search(
    sandbox: crate::tools::Sandbox,
    config: &crate::config::Config,
    secrets: &SharedSecretStore,
) -> Result<crate::tools::Sandbox, BoxError> {
    let sandbox = match &config.tools.web_search {
        Some(c) => sandbox.with_web_search(Arc::new(crate::tools::search::WebSearch::new(
            c.clone(),
            Some(secrets.clone()),
        )?)),
        None => sandbox,
    };
    Ok(if sandbox.browser().is_some() {
        sandbox
    } else {
        with_browser(sandbox, config)
    })
}

/// `sandbox` with the `browser` tool attached where Chromium is installed (otherwise it is not
/// offered; `chitin security audit` says why). One set of browsers per process: attach it
/// once, before the sandbox is cloned for the agent and `/tools/invoke`.
pub fn with_browser(
    sandbox: crate::tools::Sandbox,
    config: &crate::config::Config,
) -> crate::tools::Sandbox {
    match crate::tools::browser::Browsers::new(config.tools.browser.clone(), &sandbox) {
        Ok(b) => sandbox.with_browser(Arc::new(b)),
        Err(why) => {
            tracing::info!(reason = %why, "the browser tool is not offered");
            sandbox
        }
    }
}

pub fn assemble_agent(i: AgentInputs<'_>) -> Result<Agent, BoxError> {
    let sandbox = with_web_search(i.sandbox, i.config, i.secrets)?;
    Ok(Agent::new(AgentParts {
        gate: i.gate.clone(),
        store: Arc::clone(i.store),
        approvals: crate::approvals::Approvals::new(
            Arc::clone(i.store),
            i.gate.clone(),
            Arc::clone(i.clock),
            crate::approvals::DEFAULT_TTL_MS,
        ),
        sandbox,
        workspace: i.workspace,
        router: router(i.config, i.gate, i.secrets, Arc::clone(i.clock))?,
        sealer: i.vault,
        clock: Arc::clone(i.clock),
        config: i.config.agent.clone(),
        budgets: i.config.budgets.clone(),
        owners: vec![i.config.gateway.owner.clone()],
        skills: crate::skills_host::SkillsHost::open(&i.globals.home, &i.config.skills)
            .ok()
            .map(Arc::new),
        redaction_window: i.secrets.redaction_window(),
    }))
}

/// The agent over an opened runtime (`chitin agent`).
pub fn build_agent(globals: &Globals, rt: &Runtime) -> Result<Agent, BoxError> {
    let workspace =
        super::gateway::prepare_workspace(&rt.config.workspace_dir(&globals.home), &globals.home)?;
    let vault = crate::vault::Vault::for_db(
        &globals.home,
        rt.store.db(),
        &mut rt.secrets.write(),
        Arc::clone(&rt.clock),
    )?;
    let sandbox = super::sandbox_for(globals, &rt.config)?.with_secret_env(Arc::new(
        ToolSecrets::new(rt.gate.clone(), rt.secrets.clone()),
    ));
    let sandbox = super::mcp::attach(sandbox, &rt.config, &rt.gate, &rt.store, &rt.secrets);
    let vault = Arc::new(vault);
    let agent = assemble_agent(AgentInputs {
        globals,
        config: &rt.config,
        gate: &rt.gate,
        store: &rt.store,
        clock: &rt.clock,
        secrets: &rt.secrets,
        sandbox: sandbox.clone(),
        workspace: workspace.clone(),
        vault: Arc::clone(&vault),
    })?;
    let runner = super::workflow::assemble_runner(super::workflow::RunnerInputs {
        config: &rt.config,
        gate: &rt.gate,
        store: &rt.store,
        clock: &rt.clock,
        secrets: &rt.secrets,
        sandbox,
        workspace,
        vault,
        events: None,
    })?;
    agent.set_workflow_tool(Arc::new(crate::workflow_runner::tool::RunnerTool::new(
        runner,
    )));
    Ok(agent)
}

pub fn run(args: AgentArgs, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    if rt.config.agent.model.trim().is_empty() {
        return Err(format!(
            "no model is configured: set [agent] model = \"<provider>/<model>\" and a [[providers]] entry in {}",
            globals.config_path.display()
        )
        .into());
    }
    let user = args
        .user
        .clone()
        .unwrap_or_else(|| rt.config.gateway.owner.clone());
    let session = args
        .session
        .clone()
        .unwrap_or_else(|| format!("cli:{user}"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let agent = build_agent(globals, &rt)?;
    let json_out = args.json;
    let summary = runtime.block_on(async move {
        let mut events = agent.subscribe();
        let run_id = agent
            .submit(TurnRequest {
                session,
                user,
                channel: "cli".into(),
                text: args.message,
                approval_wait: args.approval_timeout.map(Duration::from_secs),
                origin: None,
            })
            .await?;
        let printer = tokio::spawn({
            let run_id = run_id.clone();
            async move {
                while let Ok(e) = events.recv().await {
                    if e.payload.get("run_id").and_then(|r| r.as_str()) != Some(run_id.as_str()) {
                        continue;
                    }
                    match e.event {
                        "approval.requested" => {
                            let a = &e.payload["approval"];
                            let v = |k: &str| crate::approvals::visible(a[k].as_str().unwrap_or(""));
                            eprintln!(
                                "approval needed: {}: {}\n  see everything it binds: chitin approvals show {}\n  approve with: chitin approvals approve {}   (expires {})",
                                v("tool"),
                                v("summary"),
                                v("id"),
                                v("code"),
                                v("expires_at")
                            );
                        }
                        "assistant.delta" if !json_out => {
                            print!("{}", e.payload["text"].as_str().unwrap_or(""));
                            let _ = std::io::stdout().flush();
                        }
                        "run.finished" => break,
                        _ => {}
                    }
                }
            }
        });
        // Ctrl-C cancels the run (it ends `cancelled`, recorded) instead of leaving it behind.
        let forever = Duration::from_secs(u64::MAX / 4);
        let s = tokio::select! {
            s = agent.wait(&run_id, forever) => s?,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("cancelling the run ...");
                agent.cancel(&run_id);
                agent.wait(&run_id, Duration::from_secs(30)).await?
            }
        };
        let _ = printer.await;
        Ok::<_, BoxError>(s)
    })?;
    if json_out {
        println!(
            "{}",
            json!({
                "reply": summary.reply,
                "run_id": summary.run_id,
                "session": summary.session,
                "status": summary.status,
                "error": summary.error,
                "tool_calls": summary.tool_calls,
                "usage": summary.usage,
            })
        );
    } else {
        println!();
    }
    match summary.status.as_str() {
        "completed" => Ok(ExitCode::SUCCESS),
        _ => Err(format!(
            "the turn did not complete ({}): {}",
            summary.status,
            summary.error.unwrap_or_default()
        )
        .into()),
    }
}
