//! The cron jobs and their firings in `state.db` (tables `cron_jobs`, `cron_firings`).
//!
//! Jobs come from four places, kept apart by `source`: `config` (`[[cron]]`, written by
//! [`JobStore::sync_config`] at gateway start and every minute), `heartbeat`
//! (`[agent.heartbeat]`, the same way), `cli` (`chitin cron add`) and `agent` (the `cron`
//! tool). Only `cli` and `agent` jobs can be removed here; the others are changed in
//! chitin.toml.

use std::sync::{Arc, RwLock};

use serde_json::{Value, json};

use super::AutomationError;
use crate::agent::Sealer;
use crate::agent::transcripts::subject_of;
use crate::clock::{Clock, rfc3339};
use crate::cluster::not_live_sql;
use crate::config::Config;
use crate::config::automation::{CronJob, HEARTBEAT_JOB, Target};
use crate::config::channels::ChannelConfig;
use crate::store::{Store, params};

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub name: String,
    /// `config`, `heartbeat`, `cli` or `agent`.
    pub source: String,
    /// The user it runs as.
    pub user: String,
    pub job: CronJob,
    pub created_by: String,
    pub created_ms: i64,
    /// The latest time considered (fired or skipped); `None`: none yet.
    pub last_tick_ms: Option<i64>,
}

/// A `cron_jobs` row before its job JSON is opened and parsed: name, source, user, sealed job
/// JSON, created by, created, last time.
type RawJob = (
    String,
    String,
    String,
    Option<Vec<u8>>,
    String,
    i64,
    Option<i64>,
);

impl JobRow {
    /// Whether answers are filtered by the heartbeat convention.
    pub fn is_heartbeat(&self) -> bool {
        self.source == "heartbeat"
    }
}

/// A stored firing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FiringRow {
    pub id: i64,
    pub job: String,
    /// `t:<ms>` (a scheduled time) or `manual:<id>`.
    pub slot: String,
    pub tick_ms: i64,
    /// `scheduled`, `missed` or `manual`.
    pub kind: String,
    /// `requested`, `started`, `skipped`, `completed`, `failed` or `interrupted`.
    pub status: String,
    pub run_id: Option<String>,
    pub result: Option<String>,
    pub created_ms: i64,
    /// The replica (`cluster::Replica` id) that started it; `None` on rows written before
    /// migration 23 or by a gateway that could not register.
    pub replica: Option<String>,
}

/// What the job store knows beyond the database: which chat channels exist (for `deliver`),
/// as of the last config read.
#[derive(Debug, Clone)]
struct Settings {
    channels: Vec<ChannelConfig>,
}

/// The job store.
pub struct JobStore {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    /// Seals each job's JSON (its prompt is user text) with its user's data key.
    sealer: Arc<dyn Sealer>,
    settings: RwLock<Settings>,
    /// This gateway's replica id, recorded on the firings it starts (issue #18).
    replica: crate::cluster::ReplicaSlot,
}

impl std::fmt::Debug for JobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobStore").finish_non_exhaustive()
    }
}

fn firing_row(r: &chitin_store::Row) -> Result<FiringRow, AutomationError> {
    Ok(FiringRow {
        id: r.get(0)?,
        job: r.get(1)?,
        slot: r.get(2)?,
        tick_ms: r.get(3)?,
        kind: r.get(4)?,
        status: r.get(5)?,
        run_id: r.get(6)?,
        result: r.get(7)?,
        created_ms: r.get(8)?,
        replica: r.get(9)?,
    })
}

const FIRING_COLUMNS: &str =
    "id, job, slot, tick_ms, kind, status, run_id, result, created_ms, replica";

impl JobStore {
    /// The store over `state.db`; `channels` are the configured chat channels (for
    /// `deliver`).
    pub fn new(
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
        channels: Vec<ChannelConfig>,
        sealer: Arc<dyn Sealer>,
    ) -> Self {
        Self {
            store,
            clock,
            sealer,
            settings: RwLock::new(Settings { channels }),
            replica: crate::cluster::ReplicaSlot::default(),
        }
    }

    /// Records `id` (this gateway's `cluster::Replica`) on the firings started from now on.
    pub fn set_replica(&self, id: &str) {
        self.replica.set(id);
    }

    fn replica(&self) -> Option<String> {
        self.replica.get()
    }

    /// Whether several gateways may share the database (PostgreSQL): recovery then takes
    /// over only the work of replicas that are not live.
    pub fn shared(&self) -> bool {
        self.store.db().dialect() == crate::store::Dialect::Postgres
    }

    /// The replica whose ownership of a firing guards this gateway's work on it: this
    /// replica on PostgreSQL; `None` on SQLite (one gateway owns the file) or when this
    /// gateway could not register.
    fn fence(&self) -> Option<String> {
        if self.shared() { self.replica() } else { None }
    }

    /// Whether `firing` is still this replica's to run and finish: `false` when another
    /// replica took it over ([`Self::take_over`]) while this one was stalled past
    /// `cluster::STALE_MS` (PostgreSQL; always `true` on SQLite).
    pub fn still_mine(&self, firing: i64) -> Result<bool, AutomationError> {
        let Some(me) = self.fence() else {
            return Ok(true);
        };
        self.store.db().with(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM cron_firings WHERE id = ?1 AND replica = ?2",
                params![firing, me],
            )?
            .is_some())
        })
    }

    fn seal_job(&self, user: &str, text: &str) -> Result<Vec<u8>, AutomationError> {
        self.sealer
            .seal(&subject_of(user), text.as_bytes())
            .map_err(|e| AutomationError::Invalid(format!("cannot seal a cron job: {e}")))
    }

    fn open_job(&self, name: &str, user: &str, blob: &[u8]) -> Result<String, AutomationError> {
        let bytes =
            self.sealer
                .open(&subject_of(user), blob)
                .map_err(|e| AutomationError::BadJob {
                    name: name.to_string(),
                    reason: format!("cannot open it: {e}"),
                })?;
        String::from_utf8(bytes.to_vec()).map_err(|e| AutomationError::BadJob {
            name: name.to_string(),
            reason: e.to_string(),
        })
    }

    /// Seals the jobs written before jobs were sealed (schema 13): each one's JSON moves to
    /// `job_sealed` and `job_json` is emptied (secure_delete overwrites the old text). Returns
    /// how many it sealed; run once when the store is opened.
    pub fn seal_legacy(&self) -> Result<usize, AutomationError> {
        let rows: Vec<(String, String, String)> = self.store.db().with(|c| {
            c.query_map(
                "SELECT name, user_id, job_json FROM cron_jobs WHERE job_sealed IS NULL ORDER BY name",
                params![],
                |r| Ok::<_, AutomationError>((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })?;
        let mut n = 0;
        for (name, user, text) in rows {
            let sealed = self.seal_job(&user, &text)?;
            n += self.store.db().with(|c| {
                c.execute(
                    "UPDATE cron_jobs SET job_sealed = ?2, job_json = '' WHERE name = ?1 AND job_sealed IS NULL",
                    params![name, sealed],
                )
            })?;
        }
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn settings(&self) -> Settings {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Writes the jobs of `[[cron]]` and `[agent.heartbeat]` into the store in one
    /// transaction: new ones added, changed ones updated (their last time kept, so a change
    /// does not re-run a time), removed ones deleted. A `cli` or `agent` job with the name of
    /// a configured job is replaced by it (logged).
    pub fn sync_config(&self, config: &Config) -> Result<(), AutomationError> {
        if let Ok(mut s) = self.settings.write() {
            *s = Settings {
                channels: config.channels.clone(),
            };
        }
        let owner = config.gateway.owner.clone();
        let mut wanted: Vec<(CronJob, &str)> =
            config.cron.iter().map(|j| (j.clone(), "config")).collect();
        if let Some(h) = config.agent.heartbeat.job() {
            wanted.push((h, "heartbeat"));
        }
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
        for (job, source) in &wanted {
            let user = job.user.clone().unwrap_or_else(|| owner.clone());
            let text = serde_json::to_string(job).map_err(|e| AutomationError::BadJob {
                name: job.name.clone(),
                reason: e.to_string(),
            })?;
            let existing: Option<(String, Option<Vec<u8>>, String)> = tx
                .query_opt(
                    "SELECT source, job_sealed, user_id FROM cron_jobs WHERE name = ?1",
                    params![job.name],
                )?
                .map(|r| Ok::<_, chitin_store::Error>((r.get(0)?, r.get(1)?, r.get(2)?)))
                .transpose()?;
            let same = |blob: &Option<Vec<u8>>, u: &str| {
                blob.as_ref()
                    .and_then(|b| self.open_job(&job.name, u, b).ok())
                    .is_some_and(|j| j == text)
            };
            match existing {
                Some((s, j, u)) if s == *source && u == user && same(&j, &u) => {}
                Some((s, _, _)) => {
                    let sealed = self.seal_job(&user, &text)?;
                    if s != *source {
                        tracing::warn!(job = %job.name, was = %s, "a cron job added at run time is replaced by the one in chitin.toml");
                    }
                    tx.execute(
                        "UPDATE cron_jobs SET source = ?2, user_id = ?3, job_json = '', job_sealed = ?4, created_by = 'chitin.toml', updated_ms = ?5 WHERE name = ?1",
                        params![job.name, source, user, sealed, now],
                    )?;
                }
                None => {
                    let sealed = self.seal_job(&user, &text)?;
                    tx.execute(
                        // Another replica syncing the same chitin.toml at the same time may
                        // have inserted it first: the configured job wins either way.
                        "INSERT INTO cron_jobs (name, source, user_id, job_json, job_sealed, created_by, created_ms, updated_ms) VALUES (?1, ?2, ?3, '', ?4, 'chitin.toml', ?5, ?5)
                         ON CONFLICT(name) DO UPDATE SET source = excluded.source, user_id = excluded.user_id, job_json = '', job_sealed = excluded.job_sealed, created_by = 'chitin.toml', updated_ms = excluded.updated_ms",
                        params![job.name, source, user, sealed, now],
                    )?;
                }
            }
        }
        let names: Vec<String> = tx.query_map(
            "SELECT name FROM cron_jobs WHERE source IN ('config', 'heartbeat') ORDER BY name",
            params![],
            |r| Ok::<_, AutomationError>(r.get(0)?),
        )?;
        for n in names {
            if !wanted.iter().any(|(j, _)| j.name == n) {
                tx.execute("DELETE FROM cron_jobs WHERE name = ?1", params![n])?;
            }
        }
        Ok(())
        })
    }

    /// Every job, by name.
    pub fn all(&self) -> Result<Vec<JobRow>, AutomationError> {
        self.seal_legacy()?;
        let rows: Vec<RawJob> = self.store.db().with(|c| {
            c.query_map(
                "SELECT name, source, user_id, job_sealed, created_by, created_ms, last_tick_ms FROM cron_jobs ORDER BY name",
                params![],
                |r| {
                    Ok::<_, AutomationError>((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
        })?;
        // A job that cannot be opened (its user's key was destroyed by an erasure, a damaged
        // row) is left out and logged, never run: the others still run.
        let mut out = Vec::new();
        for (name, source, user, sealed, created_by, created_ms, last) in rows {
            let job = sealed
                .ok_or_else(|| AutomationError::BadJob {
                    name: name.clone(),
                    reason: "it is not sealed".into(),
                })
                .and_then(|b| self.open_job(&name, &user, &b))
                .and_then(|text| {
                    serde_json::from_str::<CronJob>(&text).map_err(|e| AutomationError::BadJob {
                        name: name.clone(),
                        reason: e.to_string(),
                    })
                });
            match job {
                Ok(job) => out.push(JobRow {
                    name,
                    source,
                    user,
                    job,
                    created_by,
                    created_ms,
                    last_tick_ms: last,
                }),
                Err(e) => tracing::error!(job = %name, error = %e, "cron job left out"),
            }
        }
        Ok(out)
    }

    /// One job.
    pub fn get(&self, name: &str) -> Result<Option<JobRow>, AutomationError> {
        Ok(self.all()?.into_iter().find(|j| j.name == name))
    }

    /// Checks a job that is to be added: valid (schedule, time zone, target, `deliver`
    /// against the configured channels) and its name free.
    pub fn check_new(&self, job: &CronJob) -> Result<(), AutomationError> {
        job.validate(&self.settings().channels)
            .map_err(AutomationError::Invalid)?;
        if self.get(&job.name)?.is_some() {
            return Err(AutomationError::Exists(job.name.clone()));
        }
        Ok(())
    }

    /// Adds a job (`source` `cli` or `agent`) that runs as `user`.
    pub fn add(
        &self,
        job: &CronJob,
        user: &str,
        source: &str,
        created_by: &str,
    ) -> Result<JobRow, AutomationError> {
        self.check_new(job)?;
        let mut job = job.clone();
        job.user = Some(user.to_string());
        let text = serde_json::to_string(&job).map_err(|e| AutomationError::BadJob {
            name: job.name.clone(),
            reason: e.to_string(),
        })?;
        let sealed = self.seal_job(user, &text)?;
        let now = self.clock.now_ms();
        let n = self.store.db().with(|c| {
            c.execute(
                "INSERT INTO cron_jobs (name, source, user_id, job_json, job_sealed, created_by, created_ms, updated_ms) VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?6) ON CONFLICT(name) DO NOTHING",
                params![job.name, source, user, sealed, created_by, now],
            )
        })?;
        if n == 0 {
            return Err(AutomationError::Exists(job.name.clone()));
        }
        Ok(JobRow {
            name: job.name.clone(),
            source: source.to_string(),
            user: user.to_string(),
            job,
            created_by: created_by.to_string(),
            created_ms: now,
            last_tick_ms: None,
        })
    }

    /// Removes a `cli` or `agent` job and its firings.
    pub fn remove(&self, name: &str) -> Result<(), AutomationError> {
        self.store.db().tx(|tx| {
            let source: Option<String> = tx
                .query_opt(
                    "SELECT source FROM cron_jobs WHERE name = ?1",
                    params![name],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            match source.as_deref() {
                None => return Err(AutomationError::NoJob(name.to_string())),
                Some("config" | "heartbeat") => {
                    return Err(AutomationError::FromConfig(name.to_string()));
                }
                Some(_) => {}
            }
            tx.execute("DELETE FROM cron_jobs WHERE name = ?1", params![name])?;
            tx.execute("DELETE FROM cron_firings WHERE job = ?1", params![name])?;
            Ok(())
        })
    }

    /// Records a time of `job` as fired (status `started`) and advances the job's last time,
    /// in one transaction, BEFORE the run starts. `None` when that time was recorded already
    /// (by this or an earlier gateway): it must not run again.
    pub fn claim_tick(
        &self,
        job: &str,
        tick_ms: i64,
        kind: &str,
    ) -> Result<Option<FiringRow>, AutomationError> {
        self.record_tick(job, tick_ms, kind, "started", None)
    }

    /// Records a time of `job` as skipped (missed while the gateway was down, `missed =
    /// "skip"`) and advances the job's last time.
    pub fn skip_tick(&self, job: &str, tick_ms: i64) -> Result<(), AutomationError> {
        self.record_tick(
            job,
            tick_ms,
            "missed",
            "skipped",
            Some("missed while the gateway was down; skipped (missed = \"skip\")"),
        )
        .map(|_| ())
    }

    fn record_tick(
        &self,
        job: &str,
        tick_ms: i64,
        kind: &str,
        status: &str,
        result: Option<&str>,
    ) -> Result<Option<FiringRow>, AutomationError> {
        let now = self.clock.now_ms();
        let slot = format!("t:{tick_ms}");
        let me = self.replica();
        // The claim: one row per job and time, deployment-wide. A replica inserting the same
        // time concurrently waits for this transaction and then inserts nothing (`ON
        // CONFLICT DO NOTHING`), so exactly one of them gets the row back and runs it.
        self.store.db().tx(|tx| {
            let row = tx
                .query_opt(
                    &format!(
                        "INSERT INTO cron_firings (job, slot, tick_ms, kind, status, result, created_ms, replica) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT(job, slot) DO NOTHING RETURNING {FIRING_COLUMNS}"
                    ),
                    params![job, slot, tick_ms, kind, status, result, now, me],
                )?
                .map(|r| firing_row(&r))
                .transpose()?;
            tx.execute(
                "UPDATE cron_jobs SET last_tick_ms = CASE WHEN last_tick_ms IS NULL OR last_tick_ms < ?2 THEN ?2 ELSE last_tick_ms END WHERE name = ?1",
                params![job, tick_ms],
            )?;
            Ok(row)
        })
    }

    /// Asks the gateway to run `job` now (`chitin cron run`): a `manual` firing in status
    /// `requested`, started at the scheduler's next look (within a second while it runs).
    pub fn request_run(&self, job: &str, requested_by: &str) -> Result<FiringRow, AutomationError> {
        if self.get(job)?.is_none() {
            return Err(AutomationError::NoJob(job.to_string()));
        }
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| AutomationError::Task(e.to_string()))?;
        let slot = format!(
            "manual:{}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            let r = c.query_row(
                &format!(
                    "INSERT INTO cron_firings (job, slot, tick_ms, kind, status, requested_by, created_ms) VALUES (?1, ?2, ?3, 'manual', 'requested', ?4, ?3) RETURNING {FIRING_COLUMNS}"
                ),
                params![job, slot, now, requested_by],
            )?;
            firing_row(&r)
        })
    }

    /// Claims every `requested` firing (status `started`), in one transaction.
    pub fn claim_requested(&self) -> Result<Vec<FiringRow>, AutomationError> {
        // A conditional UPDATE: a replica claiming at the same time waits for the rows this
        // one changed, finds them no longer `requested` and takes none of them.
        let me = self.replica();
        let mut rows: Vec<FiringRow> = self.store.db().tx(|tx| {
            tx.query_map(
                &format!(
                    "UPDATE cron_firings SET status = 'started', replica = ?1 WHERE status = 'requested' RETURNING {FIRING_COLUMNS}"
                ),
                params![me],
                firing_row,
            )
        })?;
        rows.sort_by_key(|f| f.id);
        Ok(rows)
    }

    /// Firings left `started` (by a gateway that stopped).
    pub fn unfinished(&self) -> Result<Vec<FiringRow>, AutomationError> {
        self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {FIRING_COLUMNS} FROM cron_firings WHERE status = 'started' ORDER BY id"
                ),
                params![],
                firing_row,
            )
        })
    }

    /// Firings left `started` by replicas that are not live at `now_ms` (no heartbeat for
    /// `stale_ms`, or no row), other than this one: candidates for [`Self::take_over`].
    pub fn abandoned(&self, now_ms: i64, stale_ms: i64) -> Result<Vec<FiringRow>, AutomationError> {
        let me = self.replica();
        let cutoff = now_ms.saturating_sub(stale_ms);
        self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {FIRING_COLUMNS} FROM cron_firings WHERE status = 'started'
                     AND (?1 IS NULL OR replica IS NULL OR replica <> ?1) AND {} ORDER BY id",
                    not_live_sql("replica", 2)
                ),
                params![me, cutoff],
                firing_row,
            )
        })
    }

    /// Takes over a firing [`Self::abandoned`] returned, for this replica: one conditional
    /// UPDATE on the replica as read and still not live, so of replicas recovering at once
    /// exactly one gets `true` (and a replica that came back in between keeps its firing).
    pub fn take_over(
        &self,
        firing: &FiringRow,
        now_ms: i64,
        stale_ms: i64,
    ) -> Result<bool, AutomationError> {
        let me = self.replica();
        let cutoff = now_ms.saturating_sub(stale_ms);
        let n = self.store.db().with(|c| {
            c.execute(
                &format!(
                    "UPDATE cron_firings SET replica = ?2 WHERE id = ?1 AND status = 'started'
                     AND COALESCE(replica, '') = COALESCE(?3, '') AND {}",
                    not_live_sql("replica", 4)
                ),
                params![firing.id, me, firing.replica, cutoff],
            )
        })?;
        Ok(n == 1)
    }

    /// Every firing of `job`, oldest first.
    pub fn firings(&self, job: &str) -> Result<Vec<FiringRow>, AutomationError> {
        self.store.db().with(|c| {
            c.query_map(
                &format!("SELECT {FIRING_COLUMNS} FROM cron_firings WHERE job = ?1 ORDER BY id"),
                params![job],
                firing_row,
            )
        })
    }

    /// The run a firing started. On PostgreSQL only while the firing is this replica's (in
    /// the statement): `false` when another replica took it over, and nothing is written.
    pub fn set_run(&self, firing: i64, run_id: &str) -> Result<bool, AutomationError> {
        let me = self.fence();
        let n = self.store.db().with(|c| {
            c.execute(
                "UPDATE cron_firings SET run_id = ?2 WHERE id = ?1 AND (?3 IS NULL OR replica = ?3)",
                params![firing, run_id, me],
            )
        })?;
        Ok(n == 1)
    }

    /// How a firing ended (`completed`, `failed` or `interrupted`). On PostgreSQL only while
    /// the firing is this replica's (in the statement): `false` when another replica took it
    /// over while this one was stalled, and its outcome is left to that replica.
    pub fn finish(&self, firing: i64, status: &str, result: &str) -> Result<bool, AutomationError> {
        let now = self.clock.now_ms();
        let me = self.fence();
        let n = self.store.db().with(|c| {
            c.execute(
                "UPDATE cron_firings SET status = ?2, result = ?3, finished_ms = ?4
                 WHERE id = ?1 AND (?5 IS NULL OR replica = ?5)",
                params![firing, status, result, now, me],
            )
        })?;
        Ok(n == 1)
    }

    /// A job as the `cron` tool, `chitin cron list --json` and the log show it.
    pub fn summary(&self, j: &JobRow) -> Value {
        let schedule = j.job.parsed_schedule();
        let now = self.clock.now_ms();
        let next = schedule
            .as_ref()
            .ok()
            .and_then(|s| s.next_after(now.max(j.last_tick_ms.unwrap_or(now))));
        let last = self
            .firings(&j.name)
            .ok()
            .and_then(|f| f.into_iter().next_back())
            .map(|f| {
                json!({"at": rfc3339(f.tick_ms), "kind": f.kind, "status": f.status,
                       "run_id": f.run_id, "result": f.result})
            });
        let mut v = json!({
            "name": j.name,
            "source": j.source,
            "user": j.user,
            "schedule": schedule.map_or_else(|e| format!("invalid: {e}"), |s| s.describe()),
            "session": j.job.session_key(),
            "deliver": j.job.deliver.clone().unwrap_or_default(),
            "missed": j.job.missed.as_str(),
            "next_run": next.map(rfc3339),
            "last": last,
            "created_by": j.created_by,
        });
        if let Some(m) = v.as_object_mut() {
            match j.job.target() {
                Ok(Target::Prompt(p)) => {
                    m.insert("prompt".into(), json!(p));
                }
                Ok(Target::Workflow { file, args }) => {
                    m.insert("workflow".into(), json!(file));
                    m.insert("args".into(), args);
                }
                Err(e) => {
                    m.insert("target".into(), json!(format!("invalid: {e}")));
                }
            }
        }
        v
    }
}

impl crate::tools::cron::CronJobs for JobStore {
    fn check(&self, job: &CronJob) -> Result<(), String> {
        if job.name == HEARTBEAT_JOB {
            return Err("the name `heartbeat` is reserved; pick another".into());
        }
        self.check_new(job).map_err(|e| e.to_string())
    }

    fn job_user(&self, name: &str) -> Result<Option<String>, String> {
        self.get(name)
            .map(|j| j.map(|j| j.user))
            .map_err(|e| e.to_string())
    }

    fn add(&self, job: &CronJob, user: &str, created_by: &str) -> Result<Value, String> {
        let row = JobStore::add(self, job, user, "agent", created_by).map_err(|e| e.to_string())?;
        tracing::info!(job = %row.name, user = %user, by = %created_by, "cron job added by the agent");
        Ok(self.summary(&row))
    }

    fn list(&self, user: &str) -> Result<Value, String> {
        let all = self.all().map_err(|e| e.to_string())?;
        Ok(Value::Array(
            all.iter()
                .filter(|j| j.user == user)
                .map(|j| self.summary(j))
                .collect(),
        ))
    }

    fn remove(&self, name: &str) -> Result<(), String> {
        JobStore::remove(self, name).map_err(|e| e.to_string())?;
        tracing::info!(job = %name, "cron job removed by the agent");
        Ok(())
    }
}
