//! The scheduler: fires the jobs that are due, from the [`Clock`].
//!
//! One look ([`Scheduler::tick`]) at `now`: for each job, the latest of its times in
//! `(last time considered, now]`. A time at most [`GRACE_MS`] old runs (`scheduled`). An older
//! one was missed (the gateway was down or asleep): with `missed = "run_once"` it runs once
//! (`missed`), however many times were missed; with `"skip"` it is recorded as skipped and the
//! job waits for its next time. A new job starts counting at its creation. Then every
//! `chitin cron run` request is started. The gateway calls `tick` once a second; tests call it
//! after moving a `ManualClock`.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tracing::Instrument;

use super::AutomationError;
use super::jobs::{FiringRow, JobRow, JobStore};
use super::run::{Filter, Outcome, Runner, TAKEN_OVER};
use crate::agent::TurnRequest;
use crate::clock::{Clock, rfc3339};
use crate::config::automation::Target;

/// How late a time may be found and still count as on time (a slow or briefly suspended
/// loop); older times count as missed.
pub const GRACE_MS: i64 = 60_000;
/// How often the gateway looks.
const TICK: Duration = Duration::from_secs(1);
/// How often the configured jobs are re-read, in ticks (old firings and deliveries are
/// deleted by retention: `[retention] automation`).
const RESYNC_TICKS: u64 = 60;

/// A firing that was started by a tick (its task delivers the answer and records the end).
#[derive(Debug)]
pub struct Started {
    pub job: String,
    pub firing: FiringRow,
    /// The agent run, for a prompt target.
    pub run_id: Option<String>,
    /// Ends when the firing is finished and recorded.
    pub done: JoinHandle<Outcome>,
}

/// What one look did.
#[derive(Debug, Default)]
pub struct TickReport {
    pub started: Vec<Started>,
    /// `(job, time)` recorded as skipped.
    pub skipped: Vec<(String, i64)>,
}

/// The scheduler over a job store.
pub struct Scheduler {
    jobs: Arc<JobStore>,
    runner: Arc<Runner>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

/// One trace per firing: its turn (or workflow) is the child.
fn fire_span(job: &str, kind: &str) -> tracing::Span {
    tracing::info_span!(
        parent: None,
        "cron.fire",
        otel.kind = "internal",
        chitin.job = job,
        chitin.firing = kind,
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AutomationError> + Send + 'static,
) -> Result<T, AutomationError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AutomationError::Task(e.to_string()))?
}

impl Scheduler {
    pub fn new(jobs: Arc<JobStore>, runner: Arc<Runner>, clock: Arc<dyn Clock>) -> Self {
        Self {
            jobs,
            runner,
            clock,
        }
    }

    /// Looks once at the clock: records and starts every job that is due, records skipped
    /// ones, and starts the requested runs.
    pub async fn tick(&self) -> Result<TickReport, AutomationError> {
        let now = self.clock.now_ms();
        let jobs = Arc::clone(&self.jobs);
        let all = blocking(move || jobs.all()).await?;
        let mut report = TickReport::default();
        for job in all {
            let schedule = match job.job.parsed_schedule() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(job = %job.name, error = %e, "cron job has an invalid schedule; it does not run");
                    continue;
                }
            };
            let since = job.last_tick_ms.unwrap_or(job.created_ms);
            let Some(latest) = schedule.latest_between(since, now) else {
                continue;
            };
            let on_time = now - latest <= GRACE_MS;
            let kind = if on_time {
                "scheduled"
            } else if job.job.missed == crate::config::automation::Missed::RunOnce {
                "missed"
            } else {
                let (jobs, name) = (Arc::clone(&self.jobs), job.name.clone());
                blocking(move || jobs.skip_tick(&name, latest)).await?;
                tracing::info!(job = %job.name, time = %rfc3339(latest), "cron time missed while the gateway was down; skipped");
                report.skipped.push((job.name.clone(), latest));
                continue;
            };
            // Recorded before it runs: a time is claimed once, by one gateway.
            let (jobs, name) = (Arc::clone(&self.jobs), job.name.clone());
            let Some(firing) = blocking(move || jobs.claim_tick(&name, latest, kind)).await? else {
                continue;
            };
            let span = fire_span(&job.name, kind);
            span.in_scope(|| {
                tracing::info!(job = %job.name, time = %rfc3339(latest), kind, "cron job fired");
            });
            report
                .started
                .push(self.start(job, firing).instrument(span).await);
        }
        let jobs = Arc::clone(&self.jobs);
        for firing in blocking(move || jobs.claim_requested()).await? {
            let (jobs, name) = (Arc::clone(&self.jobs), firing.job.clone());
            match blocking(move || jobs.get(&name)).await? {
                Some(job) => {
                    let span = fire_span(&job.name, "requested");
                    span.in_scope(|| {
                        tracing::info!(job = %job.name, "cron job run on request");
                    });
                    report
                        .started
                        .push(self.start(job, firing).instrument(span).await);
                }
                None => {
                    let (jobs, id) = (Arc::clone(&self.jobs), firing.id);
                    blocking(move || {
                        jobs.finish(id, "failed", "the job was removed before it ran")
                    })
                    .await?;
                }
            }
        }
        Ok(report)
    }

    /// Starts a recorded firing: submits the turn (origin `cron:<job>:<slot>`, so a second
    /// submission of the same firing gives back the first run) or the workflow, and spawns
    /// the task that waits for the end, delivers and records it.
    ///
    /// On PostgreSQL each of these is done only while the firing is still this replica's
    /// (`cron_firings.replica`): one that another replica took over while this one was
    /// stalled past `cluster::STALE_MS` is left to it (outcome [`TAKEN_OVER`]: no turn
    /// submitted, no workflow started, nothing delivered or recorded here).
    async fn start(&self, job: JobRow, firing: FiringRow) -> Started {
        let origin = format!("cron:{}:{}", job.name, firing.slot);
        let runner = Arc::clone(&self.runner);
        let jobs = Arc::clone(&self.jobs);
        let id = firing.id;
        let finish = move |o: Outcome| {
            let jobs = Arc::clone(&jobs);
            async move {
                if o.status == TAKEN_OVER {
                    tracing::info!(
                        firing = id,
                        "cron firing taken over by another replica while this one was stalled; left to it"
                    );
                    return o;
                }
                let (status, result) = (o.status, o.result.clone());
                match tokio::task::spawn_blocking(move || jobs.finish(id, status, &result)).await {
                    Ok(Ok(true)) => o,
                    Ok(Ok(false)) => {
                        tracing::info!(
                            firing = id,
                            "cron firing taken over by another replica while this one was stalled; its outcome is left to it"
                        );
                        super::run::taken_over(&format!("firing {id}"))
                    }
                    Ok(Err(e)) => {
                        tracing::error!(firing = id, error = %e, "firing outcome not recorded");
                        o
                    }
                    Err(e) => {
                        tracing::error!(firing = id, error = %e, "firing outcome task failed");
                        o
                    }
                }
            }
        };
        let mine = Arc::clone(&self.jobs);
        let still_mine = move || {
            let jobs = Arc::clone(&mine);
            async move {
                match blocking(move || jobs.still_mine(id)).await {
                    Ok(m) => m,
                    Err(e) => {
                        // Unknown: go on (the turn's origin and the delivery key keep a
                        // repeat from acting twice).
                        tracing::warn!(firing = id, error = %e, "cannot check that the cron firing is still this replica's");
                        true
                    }
                }
            }
        };
        let target = match job.job.target() {
            Ok(t) => t,
            Err(e) => {
                let o = Outcome {
                    status: "failed",
                    result: e,
                };
                return Started {
                    job: job.name,
                    firing,
                    run_id: None,
                    done: tokio::spawn(finish(o)),
                };
            }
        };
        match target {
            Target::Prompt(text) => {
                if !still_mine().await {
                    return Started {
                        job: job.name,
                        firing,
                        run_id: None,
                        done: tokio::spawn(finish(super::run::taken_over(&format!("firing {id}")))),
                    };
                }
                let req = TurnRequest {
                    session: job.job.session_key(),
                    user: job.user.clone(),
                    channel: "cron".into(),
                    text,
                    approval_wait: None,
                    origin: Some(origin),
                };
                let run_id = match runner.submit(req, false).await {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::error!(job = %job.name, error = %e, "cron turn could not start");
                        let o = Outcome {
                            status: "failed",
                            result: format!("the turn could not start: {e}"),
                        };
                        return Started {
                            job: job.name,
                            firing,
                            run_id: None,
                            done: tokio::spawn(finish(o)),
                        };
                    }
                };
                let (jobs, rid) = (Arc::clone(&self.jobs), run_id.clone());
                match blocking(move || jobs.set_run(id, &rid)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(
                            firing = id,
                            "cron firing taken over by another replica while this one was stalled; its run is recorded there"
                        );
                    }
                    Err(e) => {
                        tracing::error!(firing = id, error = %e, "firing's run not recorded");
                    }
                }
                let deliver = job.job.deliver.clone().unwrap_or_default();
                let filter = if job.is_heartbeat() {
                    runner.heartbeat_filter()
                } else {
                    Filter::None
                };
                let rid = run_id.clone();
                let done = tokio::spawn(async move {
                    let o = runner
                        .finish_turn_if(&rid, &deliver, filter, still_mine)
                        .await;
                    finish(o).await
                });
                Started {
                    job: job.name,
                    firing,
                    run_id: Some(run_id),
                    done,
                }
            }
            Target::Workflow { file, args } => {
                let user = job.user.clone();
                let done = tokio::spawn(async move {
                    let o = if still_mine().await {
                        runner.run_workflow(&file, args, &user, &origin).await
                    } else {
                        super::run::taken_over(&format!("firing {id}"))
                    };
                    finish(o).await
                });
                Started {
                    job: job.name,
                    firing,
                    run_id: None,
                    done,
                }
            }
        }
    }

    /// The firings a stopped gateway left `started` are finished. A turn that was submitted
    /// (its run recorded under the firing's origin) is waited for and delivered, never run
    /// again; a prompt firing whose turn was not recorded yet is submitted now (the origin
    /// makes this a no-op if it was); a workflow firing is reported `interrupted` (the
    /// executor keeps its own runs).
    ///
    /// On SQLite (one gateway owns the file) this runs at start and takes every `started`
    /// firing. On PostgreSQL (several replicas) it runs at start and every
    /// [`crate::cluster::HEARTBEAT_MS`], and takes only the firings of replicas that are not
    /// live ([`crate::cluster::STALE_MS`]), each claimed once ([`JobStore::take_over`]).
    pub async fn recover(&self) -> Result<Vec<Started>, AutomationError> {
        let jobs = Arc::clone(&self.jobs);
        let open = if self.jobs.shared() {
            let now = self.clock.now_ms();
            let stale = crate::cluster::STALE_MS;
            let candidates = blocking(move || jobs.abandoned(now, stale)).await?;
            let mut taken = Vec::new();
            for f in candidates {
                let jobs = Arc::clone(&self.jobs);
                if let Some(f) =
                    blocking(move || Ok(jobs.take_over(&f, now, stale)?.then_some(f))).await?
                {
                    taken.push(f);
                }
            }
            taken
        } else {
            blocking(move || jobs.unfinished()).await?
        };
        let mut out = Vec::new();
        for firing in open {
            let (jobs, name) = (Arc::clone(&self.jobs), firing.job.clone());
            let job = blocking(move || jobs.get(&name)).await?;
            let prompt = job
                .as_ref()
                .is_some_and(|j| matches!(j.job.target(), Ok(Target::Prompt(_))));
            match job {
                Some(job) if prompt => {
                    tracing::info!(job = %job.name, firing = firing.id, "resuming a cron firing left by the last gateway");
                    out.push(self.start(job, firing).await);
                }
                _ => {
                    let (jobs, id) = (Arc::clone(&self.jobs), firing.id);
                    blocking(move || {
                        jobs.finish(
                            id,
                            "interrupted",
                            "the gateway stopped while it ran; not run again",
                        )
                    })
                    .await?;
                }
            }
        }
        Ok(out)
    }

    /// The gateway's loop: recovery, then a look every second until `stop`; every minute the
    /// configured jobs are re-read from the config file.
    pub async fn run(
        self: Arc<Self>,
        globals: crate::config::Globals,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        match self.recover().await {
            Ok(v) if !v.is_empty() => {
                tracing::info!(
                    firings = v.len(),
                    "cron firings of the last gateway resumed"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cron firings could not be recovered"),
        }
        let shared = self.jobs.shared();
        let recover_every = u64::try_from(crate::cluster::HEARTBEAT_MS / 1_000)
            .unwrap_or(5)
            .max(1);
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            n = n.wrapping_add(1);
            if n.is_multiple_of(RESYNC_TICKS) {
                let (jobs, g, runner) = (
                    Arc::clone(&self.jobs),
                    globals.clone(),
                    Arc::clone(&self.runner),
                );
                let r = blocking(move || {
                    let config = g
                        .load_config()
                        .map_err(|e| AutomationError::Invalid(e.to_string()))?;
                    runner.set_ack_max_chars(config.agent.heartbeat.ack_max_chars);
                    jobs.sync_config(&config)
                })
                .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "cron jobs not re-read from the config; the previous ones stay");
                }
            }
            if let Err(e) = self.tick().await {
                tracing::error!(error = %e, "cron scheduler look failed");
            }
            if shared && n.is_multiple_of(recover_every) {
                // Another replica may have died since: its firings are finished here.
                match self.recover().await {
                    Ok(v) if !v.is_empty() => {
                        tracing::info!(
                            firings = v.len(),
                            "cron firings of a replica that stopped were taken over"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "cron firings could not be recovered"),
                }
            }
        }
    }
}
