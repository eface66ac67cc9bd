//! Automation triggers of the gateway: cron jobs, inbound webhooks and the heartbeat.
//!
//! - [`jobs::JobStore`]: the jobs (`[[cron]]`, `chitin cron add`, the agent's `cron` tool,
//!   `[agent.heartbeat]`) and their firings in `state.db`.
//! - [`scheduler::Scheduler`]: in the gateway, looks at the [`Clock`] once a second and fires
//!   the jobs that are due; `chitin cron run` requests are fired the same way.
//! - [`hooks::Hooks`]: `POST /hooks/<name>`: signature (GitHub or generic), deduplication by
//!   delivery id, Cedar `webhook.receive`, then the hook's turn or workflow.
//! - [`run::Runner`]: starts a target (an agent turn, or a workflow through a
//!   [`WorkflowLauncher`]) and delivers the answer to a chat conversation through the
//!   channels' outbox (`tools::message::Messenger`).
//!
//! Invariants:
//! - A firing is recorded (unique per job and time) and the job's last time advanced in one
//!   transaction BEFORE the run starts: a restart never runs the same time twice. A turn is
//!   submitted with the origin `cron:<job>:<slot>` / `hook:<hook>:<delivery>`, which the agent
//!   records once, so even a crash between the record and the submission starts one run.
//! - On PostgreSQL a firing is worked on only while it is this replica's
//!   (`cron_firings.replica`): a replica that stalled past `cluster::STALE_MS` while another
//!   took its firing over submits no turn, delivers nothing and records nothing for it.
//! - All time comes from the [`Clock`]; nothing here sleeps to decide anything (the gateway's
//!   loop only wakes the scheduler).
//! - A webhook's body reaches the model only fenced as untrusted data, and taints the session
//!   it enters; a request whose signature does not verify is refused (401) and audited before
//!   anything is parsed, stored or decided; a delivery id is recorded before the 2xx, so a
//!   replay runs nothing.
//! - A hook's signing secret is released through Cedar `secret.use` (principal
//!   `Chitin::Hook::"<name>"`, host `<name>.hooks.invalid`) and compared in constant time.

pub mod hooks;
pub mod jobs;
pub mod run;
pub mod scheduler;

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use crate::clock::Clock;
use crate::config::Config;
use crate::gate::Gate;
use crate::secrets::SharedSecretStore;
use crate::store::Store;

/// Errors of the automation components.
#[derive(Debug, thiserror::Error)]
pub enum AutomationError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("state database: {0}")]
    Db(#[from] chitin_store::Error),
    #[error("stored cron job `{name}` is unreadable: {reason}")]
    BadJob { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("no cron job named `{0}`; `chitin cron list` shows the jobs")]
    NoJob(String),
    #[error(
        "cron job `{0}` is defined in chitin.toml; remove or change its table there (the gateway picks the change up within a minute)"
    )]
    FromConfig(String),
    #[error("a cron job named `{0}` exists already; remove it first or pick another name")]
    Exists(String),
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Starts workflow runs for cron jobs and webhooks whose target is a `workflow`. The gateway's
/// workflow executor implements it; until one is attached, such targets fail with a message
/// saying so.
pub trait WorkflowLauncher: Send + Sync {
    /// Runs (or starts) the workflow `file` with `args` (a JSON object) as `principal` (the
    /// job's or hook's user); `origin` names the trigger (`cron:<job>:<slot>` or
    /// `hook:<hook>:<delivery id>`; unique per trigger, so a launcher can refuse to start the
    /// same origin twice). Arguments of a `hook:` origin carry the webhook's body: untrusted
    /// data. Returns Lobster's tool envelope (`{"protocolVersion":1,"ok":..,"status":..}`) or
    /// an error sentence.
    fn start(
        &self,
        file: &Path,
        args: Value,
        principal: &str,
        origin: &str,
    ) -> Result<Value, String>;
}

/// The automation of one gateway: the job store, the scheduler and the webhook receiver,
/// sharing one [`run::Runner`].
pub struct Automation {
    jobs: Arc<jobs::JobStore>,
    runner: Arc<run::Runner>,
    hooks: Arc<hooks::Hooks>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Automation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Automation").finish_non_exhaustive()
    }
}

impl Automation {
    /// Opens the job store, writes the configured jobs into it, and releases each hook's
    /// signing secret through the gate (a hook whose secret is refused is logged and answers
    /// 503 until a restart). `messenger` is where answers to chat conversations are queued
    /// (the channels' outbox), when channels run.
    pub fn build(
        config: &Config,
        gate: &Gate,
        store: &Arc<Store>,
        clock: &Arc<dyn Clock>,
        secrets: &SharedSecretStore,
        messenger: Option<Arc<dyn crate::tools::message::Messenger>>,
        sealer: Arc<dyn crate::agent::Sealer>,
    ) -> Result<Self, AutomationError> {
        let jobs = Arc::new(jobs::JobStore::new(
            Arc::clone(store),
            Arc::clone(clock),
            config.channels.clone(),
            Arc::clone(&sealer),
        ));
        let sealed = jobs.seal_legacy()?;
        if sealed > 0 {
            tracing::info!(
                jobs = sealed,
                "cron jobs stored before sealing are now sealed"
            );
        }
        jobs.sync_config(config)?;
        let runner = Arc::new(run::Runner::new(messenger, &config.channels));
        runner.set_ack_max_chars(config.agent.heartbeat.ack_max_chars);
        let hooks = Arc::new(hooks::Hooks::build(
            &config.hooks,
            &config.gateway.owner,
            gate,
            secrets,
            Arc::clone(&runner),
            Arc::clone(store),
            Arc::clone(clock),
            sealer,
        ));
        Ok(Self {
            jobs,
            runner,
            hooks,
            clock: Arc::clone(clock),
        })
    }

    /// Where the agent's `cron` tool keeps jobs (`Sandbox::with_cron`).
    pub fn jobs(&self) -> Arc<jobs::JobStore> {
        Arc::clone(&self.jobs)
    }

    /// The webhook receiver (`POST /hooks/<name>`).
    pub fn hooks(&self) -> Arc<hooks::Hooks> {
        Arc::clone(&self.hooks)
    }

    /// Attaches the workflow executor for `workflow` targets.
    pub fn set_launcher(&self, launcher: Arc<dyn WorkflowLauncher>) {
        self.runner.set_launcher(launcher);
    }

    /// Attaches the agent (turns of prompt targets). Until then, such targets fail.
    pub fn set_agent(&self, agent: crate::agent::Agent) {
        self.runner.set_agent(agent);
    }

    /// Records `id` (this gateway's `cluster::Replica`) on the firings and webhook deliveries
    /// this gateway handles, so that recovery on PostgreSQL tells them from those of replicas
    /// that stopped (issue #18). Call before [`Self::spawn`].
    pub fn set_replica(&self, id: &str) {
        self.jobs.set_replica(id);
        self.hooks.set_replica(id);
    }

    /// The scheduler over this automation's jobs.
    pub fn scheduler(&self) -> Arc<scheduler::Scheduler> {
        Arc::new(scheduler::Scheduler::new(
            Arc::clone(&self.jobs),
            Arc::clone(&self.runner),
            Arc::clone(&self.clock),
        ))
    }

    /// Recovers the firings a previous gateway left unfinished, then runs the scheduler once
    /// a second until `stop`; every minute the configured jobs are re-read from `globals`'
    /// config (a SIGHUP or file change takes effect without a restart). Call after
    /// [`Self::set_agent`] and after the agent recovered its own runs.
    pub fn spawn(&self, globals: crate::config::Globals, stop: tokio::sync::watch::Receiver<bool>) {
        let scheduler = self.scheduler();
        tokio::spawn(scheduler.run(globals, stop.clone()));
        // Webhook deliveries acknowledged by a gateway that stopped before starting them.
        // On PostgreSQL, also every heartbeat: those of a replica that stopped meanwhile.
        let hooks = Arc::clone(&self.hooks);
        let shared = self.jobs.shared();
        let mut stop = stop;
        tokio::spawn(async move {
            let period = std::time::Duration::from_millis(
                u64::try_from(crate::cluster::HEARTBEAT_MS).unwrap_or(5_000),
            );
            loop {
                let n = hooks.start_pending().await;
                if n > 0 {
                    tracing::info!(
                        deliveries = n,
                        "started webhook deliveries a stopped gateway had acknowledged"
                    );
                }
                if !shared {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(period) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }
}
