//! Starting what a trigger targets (an agent turn, or a workflow through the
//! [`WorkflowLauncher`]) and delivering the answer.
//!
//! Answers go to a chat conversation through the channels' outbox (`Messenger::send`, durable
//! before it returns) or stay in the session's transcript (the web chat shows it). Delivery
//! is at least once: a gateway stopped after the send was queued but before the firing was
//! marked finished delivers again on recovery.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use serde_json::Value;

use super::WorkflowLauncher;
use crate::agent::{Agent, RunSummary, TurnRequest};
use crate::config::automation::heartbeat_delivery;
use crate::config::channels::ChannelConfig;
use crate::tools::message::Messenger;

/// The longest a trigger's turn is waited for before its answer is given up.
const TURN_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// How an answer is filtered before delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Delivered as is.
    None,
    /// The heartbeat convention, with `ack_max_chars`.
    Heartbeat(usize),
}

/// The status of an [`Outcome`] left to another replica: the firing was taken over while
/// this one was stalled (PostgreSQL); nothing was delivered or recorded here.
pub const TAKEN_OVER: &str = "taken_over";

/// What happened to a finished turn's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `completed` or `failed`; [`TAKEN_OVER`] for a cron firing another replica took over.
    pub status: &'static str,
    /// A short line for `chitin cron list` and the log (never the answer's text).
    pub result: String,
}

/// Starts targets and delivers answers (shared by the scheduler and the webhook receiver).
pub struct Runner {
    agent: OnceLock<Agent>,
    launcher: RwLock<Option<Arc<dyn WorkflowLauncher>>>,
    messenger: Option<Arc<dyn Messenger>>,
    /// Channel name → platform kind (for `deliver` targets written with a raw chat id).
    kinds: BTreeMap<String, &'static str>,
    /// The heartbeat's `ack_max_chars`.
    ack_max_chars: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner").finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new(messenger: Option<Arc<dyn Messenger>>, channels: &[ChannelConfig]) -> Self {
        Self {
            agent: OnceLock::new(),
            launcher: RwLock::new(None),
            messenger,
            kinds: channels
                .iter()
                .map(|c| (c.name.clone(), c.kind.as_str()))
                .collect(),
            ack_max_chars: std::sync::atomic::AtomicUsize::new(300),
        }
    }

    /// The agent that runs prompt targets (set once).
    pub fn set_agent(&self, agent: Agent) {
        let _already = self.agent.set(agent);
    }

    /// The agent, when attached.
    pub fn agent(&self) -> Option<&Agent> {
        self.agent.get()
    }

    /// The workflow executor for workflow targets.
    pub fn set_launcher(&self, launcher: Arc<dyn WorkflowLauncher>) {
        match self.launcher.write() {
            Ok(mut l) => *l = Some(launcher),
            Err(p) => *p.into_inner() = Some(launcher),
        }
    }

    /// The heartbeat's `ack_max_chars` (from the config, re-read with it).
    pub fn set_ack_max_chars(&self, n: usize) {
        self.ack_max_chars
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The filter of a heartbeat's answers.
    pub fn heartbeat_filter(&self) -> Filter {
        Filter::Heartbeat(
            self.ack_max_chars
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Submits a turn (tainted: its text carries fenced untrusted data). Returns the run id;
    /// the same `origin` submitted again gives back the first run.
    pub async fn submit(&self, req: TurnRequest, tainted: bool) -> Result<String, String> {
        let Some(agent) = self.agent.get() else {
            return Err("no agent is attached to the scheduler".into());
        };
        let r = if tainted {
            agent.submit_tainted(req).await
        } else {
            agent.submit(req).await
        };
        r.map_err(|e| e.to_string())
    }

    /// Waits for a run, then delivers its answer to `deliver` (`""`: the transcript only),
    /// filtered by `filter`.
    pub async fn finish_turn(&self, run_id: &str, deliver: &str, filter: Filter) -> Outcome {
        self.finish_turn_if(run_id, deliver, filter, || async { true })
            .await
    }

    /// [`Self::finish_turn`] for work another replica may take over: once the run ended,
    /// `still_ours()` is asked before anything is delivered; `false` gives the outcome
    /// [`TAKEN_OVER`] and delivers nothing.
    pub async fn finish_turn_if<F, Fut>(
        &self,
        run_id: &str,
        deliver: &str,
        filter: Filter,
        still_ours: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let Some(agent) = self.agent.get() else {
            return Outcome {
                status: "failed",
                result: "no agent is attached".into(),
            };
        };
        let summary: RunSummary = match agent.wait(run_id, TURN_WAIT).await {
            Ok(s) => s,
            Err(e) => {
                return Outcome {
                    status: "failed",
                    result: format!("run {run_id}: {e}"),
                };
            }
        };
        if !still_ours().await {
            return taken_over(run_id);
        }
        if summary.status != "completed" {
            return Outcome {
                status: "failed",
                result: format!(
                    "run {run_id} {}: {}",
                    summary.status,
                    summary.error.unwrap_or_default()
                ),
            };
        }
        let reply = summary.reply.unwrap_or_default();
        let text = match filter {
            Filter::None => (!reply.trim().is_empty()).then_some(reply),
            Filter::Heartbeat(max) => heartbeat_delivery(&reply, max),
        };
        let Some(text) = text else {
            return Outcome {
                status: "completed",
                result: format!("run {run_id}: nothing to deliver (HEARTBEAT_OK)"),
            };
        };
        if deliver.is_empty() {
            return Outcome {
                status: "completed",
                result: format!("run {run_id}: answer kept in the session"),
            };
        }
        match self.deliver(deliver, &text, &format!("automation:{run_id}")) {
            Ok(_) => Outcome {
                status: "completed",
                result: format!("run {run_id}: delivered to {deliver}"),
            },
            Err(e) => Outcome {
                status: "failed",
                result: format!("run {run_id}: not delivered to {deliver}: {e}"),
            },
        }
    }

    /// Queues `text` for the chat conversation `deliver` (`channel:<name>:<dm|group>:<id>`)
    /// in the channels' outbox, once per `key` (a run delivered again after a restart is not
    /// sent twice).
    pub fn deliver(&self, deliver: &str, text: &str, key: &str) -> Result<String, String> {
        let Some(m) = &self.messenger else {
            return Err("no chat channels are running in this gateway".into());
        };
        let mut parts = deliver.splitn(3, ':');
        let (_, channel, rest) = (parts.next(), parts.next(), parts.next());
        let (Some(channel), Some(rest)) = (channel, rest) else {
            return Err(format!(
                "`{}` is not a chat conversation",
                deliver.escape_default()
            ));
        };
        // As a session key first (ids escaped as the channel engine writes them), then as
        // `<kind>:<dm|group>:<raw chat id>`.
        match m.send_once(channel, deliver, text, key) {
            Ok(r) => Ok(r),
            Err(first) => match self.kinds.get(channel) {
                Some(kind) => m.send_once(channel, &format!("{kind}:{rest}"), text, key),
                None => Err(first),
            },
        }
    }

    /// Runs a workflow target on the blocking pool; returns the envelope's status, or why it
    /// could not run.
    pub async fn run_workflow(
        &self,
        file: &str,
        args: Value,
        principal: &str,
        origin: &str,
    ) -> Outcome {
        let launcher = match self.launcher.read() {
            Ok(l) => l.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let Some(launcher) = launcher else {
            return Outcome {
                status: "failed",
                result: "workflow targets need the workflow executor, which this gateway does not have yet".into(),
            };
        };
        let (file, principal, origin) =
            (file.to_string(), principal.to_string(), origin.to_string());
        // The steps' decisions and tool runs belong to the caller's trace.
        let span = tracing::Span::current();
        let r = tokio::task::spawn_blocking(move || {
            span.in_scope(|| launcher.start(Path::new(&file), args, &principal, &origin))
        })
        .await;
        match r {
            Ok(Ok(envelope)) => {
                let ok = envelope["ok"].as_bool().unwrap_or(false);
                let status = envelope["status"].as_str().unwrap_or("unknown").to_string();
                Outcome {
                    status: if ok { "completed" } else { "failed" },
                    result: if ok {
                        format!("workflow {status}")
                    } else {
                        format!(
                            "workflow failed: {}",
                            envelope["error"]["message"].as_str().unwrap_or(&status)
                        )
                    },
                }
            }
            Ok(Err(e)) => Outcome {
                status: "failed",
                result: format!("workflow could not start: {e}"),
            },
            Err(e) => Outcome {
                status: "failed",
                result: format!("workflow task failed: {e}"),
            },
        }
    }
}

/// The outcome of work another replica took over (nothing delivered or recorded here).
pub fn taken_over(what: &str) -> Outcome {
    Outcome {
        status: TAKEN_OVER,
        result: format!("{what}: taken over by another replica; left to it"),
    }
}
