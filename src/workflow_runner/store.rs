//! Workflow runs, step results and pauses in `state.db` (migration 12).
//!
//! Invariants:
//! - Arguments, step results, outputs, errors and pause requests are sealed with the run
//!   owner's data key before they are written; ids, names, digests, statuses and times are in
//!   the clear (for listing, recovery and retention).
//! - A pause is claimed at most once: `pending -> claimed` is one conditional UPDATE, so two
//!   resumers (the CLI and the gateway, two chat buttons) cannot both continue a run.
//! - A step is marked `running` before it starts and gets its result in the same transaction
//!   that moves the run's cursor past it: a crash in between leaves a `running` step, which
//!   recovery reports as `interrupted`.
//! - On PostgreSQL a replica writes a run's steps, pauses, spend and end only while the run is
//!   still its own: each of those transactions first locks the top-level run's row and checks
//!   `runner_replica` is this replica ([`RunStore::step_started`] and the others; a run
//!   another replica took over while this one was stalled gives
//!   [`RunStoreError::TakenOver`] and nothing is written).

use std::sync::Arc;

use serde_json::Value;

use crate::agent::Sealer;
use crate::agent::transcripts::subject_of;
use crate::store::{Store, StoreError, params};

/// Errors of the run store.
#[derive(Debug, thiserror::Error)]
pub enum RunStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("workflow run store: {0}")]
    Db(#[from] chitin_store::Error),
    #[error("cannot seal or open workflow run data: {0}")]
    Seal(String),
    #[error("stored workflow run data is not readable: {0}")]
    Corrupt(String),
    /// Another replica took the run over while this one was stalled past
    /// `cluster::STALE_MS`: this replica must not run or write anything more of it.
    #[error(
        "workflow run `{run}` was taken over by another gateway replica while this one was stalled (no heartbeat for longer than cluster::STALE_MS); this replica stopped it and left it to the other: see `chitin workflow show {run}`"
    )]
    TakenOver { run: String },
}

impl RunStoreError {
    /// Whether the run was taken over by another replica (stop it here quietly).
    pub fn taken_over(&self) -> bool {
        matches!(self, RunStoreError::TakenOver { .. })
    }
}

/// The top-level run of a run id: a sub-workflow's run is `<parent id>.<hex>`, and a
/// top-level id (`wf_<hex>`) has no dot.
fn top_run(run_id: &str) -> &str {
    run_id.split('.').next().unwrap_or(run_id)
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: String,
    pub name: String,
    /// The directory the file is read beneath, and its path there.
    pub file_root: String,
    pub file_rel: String,
    /// Hex SHA-256 of the file when the run started.
    pub file_sha256: String,
    pub owner: String,
    pub origin: String,
    pub session: String,
    pub tainted: bool,
    pub parent_run: Option<String>,
    pub status: String,
    pub args: Value,
    pub args_digest: String,
    pub cursor: usize,
    pub cost_usd: f64,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub runner_pid: Option<i64>,
    pub runner_start: Option<i64>,
    /// The gateway replica (`cluster::Replica` id) running it; `None` for a process that is
    /// not a replica (`chitin workflow run`) and for rows written before migration 23.
    pub runner_replica: Option<String>,
    /// The machine of the runner process (its pid means something only there).
    pub runner_host: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
}

/// A step's row.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRow {
    pub step: String,
    pub status: String,
    pub attempts: i64,
    /// The step result (Lobster's fields), when it has one.
    pub result: Option<Value>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
}

/// A pause as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct PauseRow {
    pub id: String,
    pub run_id: String,
    pub step: String,
    /// `approval` (an approval gate), `input`, `policy` (a step's call needs approval),
    /// `run` (`workflow.run` itself needs approval).
    pub kind: String,
    pub nonce: Vec<u8>,
    pub approval_id: Option<String>,
    /// What was asked (prompt, items, schema, ...), as the envelope shows it.
    pub request: Value,
    pub status: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub used_ms: Option<i64>,
    pub used_by: Option<String>,
}

/// The run store (cheap to clone).
#[derive(Clone)]
pub struct RunStore {
    store: Arc<Store>,
    sealer: Arc<dyn Sealer>,
    /// This process as a runner: its replica id (a gateway) and its machine.
    replica: Arc<std::sync::RwLock<Option<String>>>,
    host: String,
}

const RUN_COLUMNS: &str = "id, name, file_root, file_rel, file_sha256, owner, origin, session, tainted, parent_run, status, args, args_digest, cursor, cost_usd, output, error, runner_pid, runner_start, created_ms, updated_ms, finished_ms, runner_replica, runner_host";
/// A new step's place in its run: after every step the run has (`workflow_steps.seq`).
const NEXT_SEQ: &str =
    "(SELECT COALESCE(MAX(s.seq), 0) + 1 FROM workflow_steps s WHERE s.run_id = ?1)";
const PAUSE_COLUMNS: &str = "id, run_id, step, kind, nonce, approval_id, request, status, created_ms, expires_ms, used_ms, used_by";

struct RawRun {
    row: RunRow,
    args: Vec<u8>,
    output: Option<Vec<u8>>,
    error: Option<Vec<u8>>,
}

fn raw_run(r: &chitin_store::Row) -> Result<RawRun, RunStoreError> {
    let cursor: i64 = r.get(13)?;
    Ok(RawRun {
        row: RunRow {
            id: r.get(0)?,
            name: r.get(1)?,
            file_root: r.get(2)?,
            file_rel: r.get(3)?,
            file_sha256: r.get(4)?,
            owner: r.get(5)?,
            origin: r.get(6)?,
            session: r.get(7)?,
            tainted: r.get::<i64>(8)? != 0,
            parent_run: r.get(9)?,
            status: r.get(10)?,
            args: Value::Null,
            args_digest: r.get(12)?,
            cursor: usize::try_from(cursor).unwrap_or(0),
            cost_usd: r.get(14)?,
            output: None,
            error: None,
            runner_pid: r.get(17)?,
            runner_start: r.get(18)?,
            created_ms: r.get(19)?,
            updated_ms: r.get(20)?,
            finished_ms: r.get(21)?,
            runner_replica: r.get(22)?,
            runner_host: r.get(23)?,
        },
        args: r.get(11)?,
        output: r.get(15)?,
        error: r.get(16)?,
    })
}

impl RunStore {
    pub fn new(store: Arc<Store>, sealer: Arc<dyn Sealer>) -> Self {
        Self {
            store,
            sealer,
            replica: Arc::new(std::sync::RwLock::new(None)),
            host: crate::cluster::host_name(),
        }
    }

    /// Records `id` (this gateway's `cluster::Replica`) as the runner of the runs this
    /// process creates, adopts or takes over from now on.
    pub fn set_replica(&self, id: &str) {
        let mut r = match self.replica.write() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        *r = Some(id.to_string());
    }

    /// This process as a runner: its replica id (when it is a gateway) and its machine.
    pub fn runner_ids(&self) -> (Option<String>, String) {
        let r = match self.replica.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        };
        (r, self.host.clone())
    }

    /// Whether several processes on several machines may share the database (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.store.db().dialect() == crate::store::Dialect::Postgres
    }

    /// The replica whose ownership of a run guards this process's writes to it: this
    /// replica on PostgreSQL; `None` on SQLite (one gateway owns the file) and for a process
    /// that is no replica (its runs are taken over only once its pid is gone).
    fn fence(&self) -> Option<String> {
        if self.shared() {
            self.runner_ids().0
        } else {
            None
        }
    }

    /// In a transaction, before it writes: locks the row of `run_id`'s top-level run and
    /// checks that it is still run by `fence` (this replica). A replica taking it over
    /// (`take_over`) waits for this transaction, or this one for it and then finds the run
    /// gone: [`RunStoreError::TakenOver`], and the transaction writes nothing.
    fn hold(
        tx: &mut chitin_store::Conn<'_>,
        run_id: &str,
        fence: Option<&str>,
    ) -> Result<(), RunStoreError> {
        let Some(me) = fence else {
            return Ok(());
        };
        let top = top_run(run_id);
        let mine = tx
            .query_opt(
                "SELECT 1 FROM workflow_runs WHERE id = ?1 AND runner_replica = ?2 FOR UPDATE",
                params![top, me],
            )?
            .is_some();
        if mine {
            Ok(())
        } else {
            Err(RunStoreError::TakenOver {
                run: top.to_string(),
            })
        }
    }

    /// The ids of the replicas live at `now_ms` (heartbeat within `stale_ms`).
    pub fn live_replicas(
        &self,
        now_ms: i64,
        stale_ms: i64,
    ) -> Result<std::collections::HashSet<String>, RunStoreError> {
        Ok(self
            .store
            .db()
            .replicas_live(now_ms, stale_ms)?
            .into_iter()
            .map(|r| r.id)
            .collect())
    }

    fn seal(&self, owner: &str, v: &Value) -> Result<Vec<u8>, RunStoreError> {
        let bytes = serde_json::to_vec(v).map_err(|e| RunStoreError::Seal(e.to_string()))?;
        self.sealer
            .seal(&subject_of(owner), &bytes)
            .map_err(RunStoreError::Seal)
    }

    fn open(&self, owner: &str, blob: &[u8]) -> Result<Value, RunStoreError> {
        let bytes = self
            .sealer
            .open(&subject_of(owner), blob)
            .map_err(RunStoreError::Seal)?;
        serde_json::from_slice(&bytes).map_err(|e| RunStoreError::Corrupt(e.to_string()))
    }

    fn finish_raw(&self, raw: RawRun) -> Result<RunRow, RunStoreError> {
        let mut row = raw.row;
        row.args = self.open(&row.owner, &raw.args)?;
        row.output = raw.output.map(|b| self.open(&row.owner, &b)).transpose()?;
        row.error = raw
            .error
            .map(|b| self.open(&row.owner, &b))
            .transpose()?
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string));
        Ok(row)
    }

    /// Creates a run (its arguments sealed).
    pub fn create_run(&self, r: &RunRow) -> Result<(), RunStoreError> {
        let args = self.seal(&r.owner, &r.args)?;
        self.store.db().with(|c| c.execute(
            "INSERT INTO workflow_runs (id, name, file_root, file_rel, file_sha256, owner, subject, origin, session,
                    tainted, parent_run, status, args, args_digest, cursor, cost_usd, runner_pid, runner_start,
                    created_ms, updated_ms, runner_replica, runner_host)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
            params![
                r.id, r.name, r.file_root, r.file_rel, r.file_sha256, r.owner, subject_of(&r.owner),
                r.origin, r.session, i64::from(r.tainted), r.parent_run, r.status, args,
                r.args_digest, i64::try_from(r.cursor).unwrap_or(0), r.cost_usd, r.runner_pid,
                r.runner_start, r.created_ms, r.updated_ms, r.runner_replica, r.runner_host,
            ],
        ))?;
        Ok(())
    }

    /// One run.
    pub fn run(&self, id: &str) -> Result<Option<RunRow>, RunStoreError> {
        let raw = self.store.db().with(|c| {
            c.query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE id = ?1"),
                params![id],
            )?
            .map(|r| raw_run(&r))
            .transpose()
        })?;
        raw.map(|r| self.finish_raw(r)).transpose()
    }

    /// Runs, newest first: top-level ones (of `owner`, when given), at most `limit`.
    pub fn list(&self, owner: Option<&str>, limit: usize) -> Result<Vec<RunRow>, RunStoreError> {
        let raws: Vec<RawRun> = self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE parent_run IS NULL AND (?1 IS NULL OR owner = ?1) ORDER BY created_ms DESC, id LIMIT ?2"
                ),
                params![owner, i64::try_from(limit).unwrap_or(i64::MAX)],
                raw_run,
            )
        })?;
        raws.into_iter().map(|r| self.finish_raw(r)).collect()
    }

    /// The top-level run of a session, the oldest first (a trigger's session names one
    /// delivery: at most one run).
    pub fn run_of_session(&self, session: &str) -> Result<Option<RunRow>, RunStoreError> {
        let raw = self.store.db().with(|c| {
            c.query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM workflow_runs WHERE session = ?1 AND parent_run IS NULL ORDER BY created_ms, id LIMIT 1"),
                params![session],
            )?
            .map(|r| raw_run(&r))
            .transpose()
        })?;
        raw.map(|r| self.finish_raw(r)).transpose()
    }

    /// Runs in `status`.
    pub fn with_status(&self, status: &str) -> Result<Vec<RunRow>, RunStoreError> {
        let raws: Vec<RawRun> = self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM workflow_runs WHERE status = ?1 ORDER BY created_ms, id"
                ),
                params![status],
                raw_run,
            )
        })?;
        raws.into_iter().map(|r| self.finish_raw(r)).collect()
    }

    /// Sets a run's status (and its output or error when it ends); `finished` marks the end.
    /// For a run this process does not drive (recovery, a cancelled pause); the runner ends
    /// its runs with [`Self::end_run`].
    pub fn set_status(
        &self,
        run: &RunRow,
        status: &str,
        output: Option<&Value>,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        self.write_status(None, run, status, output, error, now)
    }

    /// [`Self::set_status`] by the run's runner: on PostgreSQL only while the run is still
    /// this replica's ([`RunStoreError::TakenOver`] otherwise, nothing written).
    pub fn end_run(
        &self,
        run: &RunRow,
        status: &str,
        output: Option<&Value>,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        self.write_status(self.fence().as_deref(), run, status, output, error, now)
    }

    fn write_status(
        &self,
        fence: Option<&str>,
        run: &RunRow,
        status: &str,
        output: Option<&Value>,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        let output = output.map(|o| self.seal(&run.owner, o)).transpose()?;
        let error = error
            .map(|e| self.seal(&run.owner, &Value::String(e.to_string())))
            .transpose()?;
        let finished = matches!(status, "ok" | "failed" | "cancelled" | "interrupted");
        self.store.db().tx(|c| {
            Self::hold(c, &run.id, fence)?;
            c.execute(
                "UPDATE workflow_runs SET status = ?2, output = COALESCE(?3, output), error = COALESCE(?4, error),
                        updated_ms = ?5, finished_ms = CASE WHEN ?6 THEN ?5 ELSE finished_ms END
                 WHERE id = ?1",
                params![run.id, status, output, error, now, finished],
            )?;
            Ok(())
        })
    }

    /// Takes a run over for this process (`running`, its pid and start time).
    pub fn adopt(&self, run_id: &str, pid: i64, start: i64, now: i64) -> Result<(), RunStoreError> {
        let (replica, host) = self.runner_ids();
        self.store.db().with(|c| {
            c.execute(
                "UPDATE workflow_runs SET status = 'running', runner_pid = ?2, runner_start = ?3, updated_ms = ?4,
                        runner_replica = ?5, runner_host = ?6 WHERE id = ?1",
                params![run_id, pid, start, now, replica, host],
            )
        })?;
        Ok(())
    }

    /// Takes over a `running` run whose runner (`run.runner_pid`, `run.runner_start`,
    /// `run.runner_replica` as read) stopped, for this process; `false` when another
    /// recoverer (a second gateway on the same database) took it over first, it is no longer
    /// running, or its replica is live again (a heartbeat newer than `cutoff`; pass
    /// `i64::MAX` on SQLite, where liveness is the pid's). The condition on the runner as read
    /// makes this a claim: of two takeovers at once, one changes the row.
    pub fn take_over(
        &self,
        run: &RunRow,
        pid: i64,
        start: i64,
        now: i64,
        cutoff: i64,
    ) -> Result<bool, RunStoreError> {
        let (replica, host) = self.runner_ids();
        let n = self.store.db().with(|c| {
            c.execute(
                &format!(
                    "UPDATE workflow_runs SET runner_pid = ?2, runner_start = ?3, updated_ms = ?4,
                            runner_replica = ?8, runner_host = ?9
                     WHERE id = ?1 AND status = 'running'
                       AND COALESCE(runner_pid, -1) = COALESCE(?5, -1)
                       AND COALESCE(runner_start, -1) = COALESCE(?6, -1)
                       AND COALESCE(runner_replica, '') = COALESCE(?7, '') AND {}",
                    crate::cluster::not_live_sql("runner_replica", 10)
                ),
                params![
                    run.id,
                    pid,
                    start,
                    now,
                    run.runner_pid,
                    run.runner_start,
                    run.runner_replica,
                    replica,
                    host,
                    cutoff
                ],
            )
        })?;
        Ok(n == 1)
    }

    /// Adds LLM spend to a run (on PostgreSQL only while it is this replica's).
    pub fn add_cost(&self, run_id: &str, usd: f64) -> Result<(), RunStoreError> {
        let fence = self.fence();
        self.store.db().tx(|c| {
            Self::hold(c, run_id, fence.as_deref())?;
            c.execute(
                "UPDATE workflow_runs SET cost_usd = cost_usd + ?2 WHERE id = ?1",
                params![run_id, usd],
            )?;
            Ok(())
        })
    }

    /// Marks a step `running` (one more attempt) and the run's cursor at it, BEFORE the step
    /// runs. On PostgreSQL the same transaction first checks the run is still this replica's
    /// ([`RunStoreError::TakenOver`]: nothing written, and the step must not run).
    pub fn step_started(
        &self,
        run_id: &str,
        step: &str,
        cursor: Option<usize>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        let fence = self.fence();
        self.store.db().tx(|tx| {
            Self::hold(tx, run_id, fence.as_deref())?;
            tx.execute(
                &format!(
                    "INSERT INTO workflow_steps (run_id, step, status, attempts, result, started_ms, finished_ms, seq)
                     VALUES (?1, ?2, 'running', 1, NULL, ?3, NULL, {NEXT_SEQ})
                     ON CONFLICT (run_id, step) DO UPDATE SET status = 'running', attempts = workflow_steps.attempts + 1,
                            started_ms = excluded.started_ms, finished_ms = NULL"
                ),
                params![run_id, step, now],
            )?;
            if let Some(c) = cursor {
                tx.execute(
                    "UPDATE workflow_runs SET cursor = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![run_id, i64::try_from(c).unwrap_or(0), now],
                )?;
            }
            Ok::<_, RunStoreError>(())
        })
    }

    /// Records a step's result and status; with `cursor`, moves the run's cursor in the same
    /// transaction. On PostgreSQL only while the run is still this replica's
    /// ([`RunStoreError::TakenOver`] otherwise, nothing written).
    pub fn step_finished(
        &self,
        run: &RunRow,
        step: &str,
        status: &str,
        result: Option<&Value>,
        cursor: Option<usize>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        self.write_step(
            self.fence().as_deref(),
            run,
            step,
            status,
            result,
            cursor,
            now,
        )
    }

    /// Records the answer to a gate by the resumer that claimed its pause (the run is not
    /// this process's yet: it adopts it next).
    pub fn answer_step(
        &self,
        run: &RunRow,
        step: &str,
        result: &Value,
        cursor: usize,
        now: i64,
    ) -> Result<(), RunStoreError> {
        self.write_step(None, run, step, "ok", Some(result), Some(cursor), now)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one step record's parts, each named at the call"
    )]
    fn write_step(
        &self,
        fence: Option<&str>,
        run: &RunRow,
        step: &str,
        status: &str,
        result: Option<&Value>,
        cursor: Option<usize>,
        now: i64,
    ) -> Result<(), RunStoreError> {
        let sealed = result.map(|r| self.seal(&run.owner, r)).transpose()?;
        self.store.db().tx(|tx| {
            Self::hold(tx, &run.id, fence)?;
            tx.execute(
                &format!(
                    "INSERT INTO workflow_steps (run_id, step, status, attempts, result, started_ms, finished_ms, seq)
                     VALUES (?1, ?2, ?3, 0, ?4, ?5, ?5, {NEXT_SEQ})
                     ON CONFLICT (run_id, step) DO UPDATE SET status = excluded.status,
                            result = COALESCE(excluded.result, workflow_steps.result), finished_ms = excluded.finished_ms"
                ),
                params![run.id, step, status, sealed, now],
            )?;
            if let Some(c) = cursor {
                tx.execute(
                    "UPDATE workflow_runs SET cursor = ?2, updated_ms = ?3 WHERE id = ?1",
                    params![run.id, i64::try_from(c).unwrap_or(0), now],
                )?;
            }
            Ok::<_, RunStoreError>(())
        })
    }

    /// The steps of a run, in the order they started.
    pub fn steps(&self, run: &RunRow) -> Result<Vec<StepRow>, RunStoreError> {
        type Raw = (String, String, i64, Option<Vec<u8>>, i64, Option<i64>);
        let raws: Vec<Raw> = self.store.db().with(|c| {
            c.query_map(
                "SELECT step, status, attempts, result, started_ms, finished_ms FROM workflow_steps
                 WHERE run_id = ?1 ORDER BY started_ms, COALESCE(seq, 0), step",
                params![run.id],
                |r| {
                    Ok::<_, RunStoreError>((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                },
            )
        })?;
        raws.into_iter()
            .map(
                |(step, status, attempts, result, started_ms, finished_ms)| {
                    Ok(StepRow {
                        step,
                        status,
                        attempts,
                        result: result.map(|b| self.open(&run.owner, &b)).transpose()?,
                        started_ms,
                        finished_ms,
                    })
                },
            )
            .collect()
    }

    /// Saves a pause (its request sealed) and marks the run `paused`, in one transaction (on
    /// PostgreSQL only while the run is still this replica's).
    pub fn save_pause(&self, run: &RunRow, p: &PauseRow, now: i64) -> Result<(), RunStoreError> {
        let request = self.seal(&run.owner, &p.request)?;
        let fence = self.fence();
        self.store.db().tx(|tx| {
            Self::hold(tx, &run.id, fence.as_deref())?;
            tx.execute(
                &format!("INSERT INTO workflow_pauses ({PAUSE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8, ?9, NULL, NULL)"),
                params![p.id, p.run_id, p.step, p.kind, p.nonce, p.approval_id, request, p.created_ms, p.expires_ms],
            )?;
            tx.execute(
                "UPDATE workflow_runs SET status = 'paused', updated_ms = ?2 WHERE id = ?1",
                params![run.id, now],
            )?;
            Ok::<_, RunStoreError>(())
        })
    }

    fn pause_where(&self, clause: &str, key: &str) -> Result<Option<PauseRow>, RunStoreError> {
        type Raw = (PauseRow, Vec<u8>, String);
        let raw: Option<Raw> = self.store.db().with(|c| {
            c.query_opt(
                &format!(
                    "SELECT p.{}, r.owner FROM workflow_pauses p JOIN workflow_runs r ON r.id = p.run_id WHERE {clause}",
                    PAUSE_COLUMNS.replace(", ", ", p.")
                ),
                params![key],
            )?
            .map(|r| {
                    Ok::<_, RunStoreError>((
                        PauseRow {
                            id: r.get(0)?,
                            run_id: r.get(1)?,
                            step: r.get(2)?,
                            kind: r.get(3)?,
                            nonce: r.get(4)?,
                            approval_id: r.get(5)?,
                            request: Value::Null,
                            status: r.get(7)?,
                            created_ms: r.get(8)?,
                            expires_ms: r.get(9)?,
                            used_ms: r.get(10)?,
                            used_by: r.get(11)?,
                        },
                        r.get(6)?,
                        r.get(12)?,
                    ))
            })
            .transpose()
        })?;
        raw.map(|(mut p, blob, owner)| {
            p.request = self.open(&owner, &blob)?;
            Ok(p)
        })
        .transpose()
    }

    /// A pause by its id, or by the id of the approval it waits for.
    pub fn pause(&self, id: &str) -> Result<Option<PauseRow>, RunStoreError> {
        match self.pause_where("p.id = ?1", id)? {
            Some(p) => Ok(Some(p)),
            None => self.pause_where(
                "p.approval_id = ?1 ORDER BY p.created_ms DESC, p.id DESC LIMIT 1",
                id,
            ),
        }
    }

    /// The pending pause of a run, if it is paused.
    pub fn pending_pause_of(&self, run_id: &str) -> Result<Option<PauseRow>, RunStoreError> {
        self.pause_where(
            "p.run_id = ?1 AND p.status = 'pending' ORDER BY p.created_ms DESC, p.id DESC LIMIT 1",
            run_id,
        )
    }

    /// Claims a pending, unexpired pause for one resumer. `false`: it was already claimed,
    /// used, cancelled or has expired.
    pub fn claim(&self, pause_id: &str, by: &str, now: i64) -> Result<bool, RunStoreError> {
        // On PostgreSQL a second claimer (another replica) waits for the first's row lock and
        // then re-checks `status = 'pending'`: it changes nothing.
        let n = self.store.db().with(|c| {
            c.execute(
                "UPDATE workflow_pauses SET status = 'claimed', used_by = ?2 WHERE id = ?1 AND status = 'pending' AND expires_ms > ?3",
                params![pause_id, by, now],
            )
        })?;
        Ok(n == 1)
    }

    /// Gives a claimed pause back (the resumer could not go on: nothing changed).
    pub fn release(&self, pause_id: &str) -> Result<(), RunStoreError> {
        self.store.db().with(|c| {
            c.execute(
                "UPDATE workflow_pauses SET status = 'pending', used_by = NULL WHERE id = ?1 AND status = 'claimed'",
                params![pause_id],
            )
        })?;
        Ok(())
    }

    /// Ends a claimed pause: `used` (resumed) or `cancelled`.
    pub fn close_pause(
        &self,
        pause_id: &str,
        status: &str,
        by: &str,
        now: i64,
    ) -> Result<(), RunStoreError> {
        self.store.db().with(|c| {
            c.execute(
                "UPDATE workflow_pauses SET status = ?2, used_by = ?3, used_ms = ?4 WHERE id = ?1",
                params![pause_id, status, by, now],
            )
        })?;
        Ok(())
    }

    /// Pending pauses whose approval was decided (granted or denied) somewhere, or whose
    /// time is up: what the gateway continues or ends without a resumer.
    pub fn decided_or_expired(&self, now: i64) -> Result<Vec<(String, String)>, RunStoreError> {
        self.store.db().with(|c| {
            c.query_map(
                "SELECT p.id, CASE WHEN p.expires_ms <= ?1 THEN 'expired' ELSE a.status END
                 FROM workflow_pauses p LEFT JOIN approvals a ON a.id = p.approval_id
                 WHERE p.status = 'pending' AND (p.expires_ms <= ?1 OR a.status IN ('granted', 'denied', 'expired'))
                 ORDER BY p.created_ms, p.id",
                params![now],
                |r| Ok::<_, RunStoreError>((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// A value a workflow kept with `state.set` (or `diff.last`), opened.
    pub fn state_get(
        &self,
        owner: &str,
        workflow: &str,
        key: &str,
    ) -> Result<Option<Value>, RunStoreError> {
        let blob: Option<Vec<u8>> = self.store.db().with(|c| {
            c.query_opt(
                "SELECT value FROM workflow_state WHERE owner = ?1 AND workflow = ?2 AND key = ?3",
                params![owner, workflow, key],
            )?
            .map(|r| r.get(0))
            .transpose()
        })?;
        blob.map(|b| self.open(owner, &b)).transpose()
    }

    /// Keeps `value` under `key` for the owner's workflow (sealed); returns the value it
    /// replaces, read and written in one transaction.
    pub fn state_swap(
        &self,
        owner: &str,
        workflow: &str,
        key: &str,
        value: &Value,
        now: i64,
    ) -> Result<Option<Value>, RunStoreError> {
        let sealed = self.seal(owner, value)?;
        let before: Option<Vec<u8>> = self.store.db().tx(|tx| {
            // New: inserted (a replica inserting the same key at once waits, then inserts
            // nothing). Existing: its row locked first (the UPDATE), then read and replaced,
            // so two swaps at once (two replicas) never both return the same `before`.
            let new = tx.execute(
                "INSERT INTO workflow_state (owner, subject, workflow, key, value, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (owner, workflow, key) DO NOTHING",
                params![owner, subject_of(owner), workflow, key, sealed, now],
            )?;
            if new == 1 {
                return Ok(None);
            }
            tx.execute(
                "UPDATE workflow_state SET updated_ms = ?4 WHERE owner = ?1 AND workflow = ?2 AND key = ?3",
                params![owner, workflow, key, now],
            )?;
            let before = tx
                .query_opt(
                    "SELECT value FROM workflow_state WHERE owner = ?1 AND workflow = ?2 AND key = ?3",
                    params![owner, workflow, key],
                )?
                .map(|r| r.get::<Vec<u8>>(0))
                .transpose()?;
            tx.execute(
                "UPDATE workflow_state SET value = ?4, updated_ms = ?5 WHERE owner = ?1 AND workflow = ?2 AND key = ?3",
                params![owner, workflow, key, sealed, now],
            )?;
            Ok::<_, RunStoreError>(before)
        })?;
        before.map(|b| self.open(owner, &b)).transpose()
    }
}
