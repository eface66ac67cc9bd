//! Sessions, runs, transcripts and usage in the state database (migration 3).
//!
//! Invariants:
//! - Message bodies and compaction summaries are sealed with the data subject's key before
//!   they are written; only ids, times, sizes, roles, classes and token counts are stored in
//!   the clear.
//! - A session belongs to one user: a request for another user's session key is refused.
//! - Sequence numbers within a session are dense and increasing (UNIQUE(session_key, seq)).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use chitin_store::{Conn, Row};

use crate::store::{Store, StoreError, params};

/// Seals and opens content with a data subject's key (the vault).
pub trait Sealer: Send + Sync {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String>;
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String>;
}

/// Errors of the transcript store.
#[derive(Debug, thiserror::Error)]
pub enum TranscriptError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Db(#[from] chitin_store::Error),
    #[error("cannot seal or open transcript content: {0}")]
    Seal(String),
    #[error("stored message is not readable: {0}")]
    Corrupt(String),
    #[error("session `{0}` belongs to another user")]
    NotYours(String),
    #[error("no session `{0}`")]
    NoSession(String),
    #[error("no run `{0}`")]
    NoRun(String),
}

/// The data subject of a user's content.
pub fn subject_of(user: &str) -> String {
    format!(
        "Chitin::User::{}",
        serde_json::Value::String(user.to_string())
    )
}

/// A tool call as stored (what the model asked for, unparsed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCall {
    pub id: String,
    pub name: String,
    pub arguments_json: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
}

/// A message as stored (sealed as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Stored {
    User {
        text: String,
        from: String,
        /// From someone who is not an owner: shown to the model as data.
        #[serde(default)]
        untrusted: bool,
    },
    Assistant {
        text: String,
        #[serde(default)]
        tool_calls: Vec<StoredCall>,
    },
    Tool {
        tool_use_id: String,
        tool: String,
        content: String,
        is_error: bool,
        /// allow | deny | approval_required | invalid | error | interrupted (it may have run:
        /// the run was cancelled or timed out, or the gateway stopped, while it ran) | not_run
        /// (older records)
        decision: String,
        outcome: String,
        /// Images the tool returned (a browser screenshot), for models that accept them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        images: Vec<crate::providers::ImagePart>,
    },
}

impl Stored {
    fn role(&self) -> &'static str {
        match self {
            Self::User { .. } => "user",
            Self::Assistant { .. } => "assistant",
            Self::Tool { .. } => "tool",
        }
    }
}

/// A stored message with its position.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: i64,
    pub run_id: Option<String>,
    pub created_ms: i64,
    pub message: Stored,
}

/// A message row before opening: seq, run id, time, subject, sealed body.
type RawEntry = (i64, Option<String>, i64, String, Vec<u8>);

/// A session's metadata.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub key: String,
    pub user: String,
    pub channel: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub tainted: bool,
    pub messages: i64,
    pub runs: i64,
}

/// A run's metadata.
#[derive(Debug, Clone, Serialize)]
pub struct RunRow {
    pub id: String,
    pub session: String,
    pub user: String,
    pub status: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub finished_ms: Option<i64>,
    pub steps: i64,
    pub model: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cost_usd: f64,
    pub approval_id: Option<String>,
    pub error: Option<String>,
    /// What started it (`channel:...`, `cron:...`, `hook:...`; none for a chat turn).
    pub origin: Option<String>,
}

/// One model call's usage, attributed.
#[derive(Debug, Clone)]
pub struct UsageRow<'a> {
    pub at_ms: i64,
    pub user: &'a str,
    pub session: &'a str,
    pub run_id: &'a str,
    pub model: &'a str,
    /// The tool whose result this call answered, if any.
    pub tool: Option<&'a str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_usd: Option<f64>,
}

/// The transcript store.
#[derive(Clone)]
pub struct Transcripts {
    store: Arc<Store>,
    sealer: Arc<dyn Sealer>,
}

const RUN_COLUMNS: &str = "id, session_key, user_id, status, created_ms, updated_ms, finished_ms, steps, model, input_tokens, output_tokens, cost_usd, approval_id, error, origin";

fn run_row(r: &Row) -> Result<RunRow, TranscriptError> {
    Ok(RunRow {
        id: r.get(0)?,
        session: r.get(1)?,
        user: r.get(2)?,
        status: r.get(3)?,
        created_ms: r.get(4)?,
        updated_ms: r.get(5)?,
        finished_ms: r.get(6)?,
        steps: r.get(7)?,
        model: r.get(8)?,
        input_tokens: r.get(9)?,
        output_tokens: r.get(10)?,
        cost_usd: r.get(11)?,
        approval_id: r.get(12)?,
        error: r.get(13)?,
        origin: r.get(14)?,
    })
}

impl Transcripts {
    pub fn new(store: Arc<Store>, sealer: Arc<dyn Sealer>) -> Self {
        Self { store, sealer }
    }

    fn seal(&self, subject: &str, m: &impl Serialize) -> Result<Vec<u8>, TranscriptError> {
        let plain = Zeroizing::new(
            serde_json::to_vec(m).map_err(|e| TranscriptError::Corrupt(e.to_string()))?,
        );
        self.sealer
            .seal(subject, &plain)
            .map_err(TranscriptError::Seal)
    }

    fn open<T: for<'de> Deserialize<'de>>(
        &self,
        subject: &str,
        sealed: &[u8],
    ) -> Result<T, TranscriptError> {
        let plain = self
            .sealer
            .open(subject, sealed)
            .map_err(TranscriptError::Seal)?;
        serde_json::from_slice(&plain).map_err(|e| TranscriptError::Corrupt(e.to_string()))
    }

    /// The owner of a session, if it exists.
    pub fn session_owner(&self, key: &str) -> Result<Option<String>, TranscriptError> {
        self.store.db().with(|c| {
            c.query_opt("SELECT user_id FROM sessions WHERE key = ?1", params![key])?
                .map(|r| r.get(0))
                .transpose()
                .map_err(TranscriptError::from)
        })
    }

    pub fn is_tainted(&self, key: &str) -> Result<bool, TranscriptError> {
        let t: Option<i64> = self.store.db().with(|c| {
            c.query_opt("SELECT tainted FROM sessions WHERE key = ?1", params![key])?
                .map(|r| r.get(0))
                .transpose()
        })?;
        Ok(t.unwrap_or(0) != 0)
    }

    pub fn set_tainted(&self, key: &str) -> Result<(), TranscriptError> {
        self.store.db().with(|c| {
            c.execute(
                "UPDATE sessions SET tainted = 1 WHERE key = ?1 AND tainted = 0",
                params![key],
            )
        })?;
        Ok(())
    }

    fn insert_message(
        &self,
        tx: &mut Conn<'_>,
        key: &str,
        user: &str,
        run_id: Option<&str>,
        message: &Stored,
        now: i64,
    ) -> Result<i64, TranscriptError> {
        let subject = subject_of(user);
        let body = self.seal(&subject, message)?;
        let class = match message {
            Stored::Tool { .. } => "tool_output",
            _ => "transcript",
        };
        let size = i64::try_from(body.len()).unwrap_or(i64::MAX);
        let seq: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE session_key = ?1",
                params![key],
            )?
            .get(0)?;
        tx.execute(
            "INSERT INTO messages (session_key, run_id, subject, seq, role, class, created_ms, size, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![key, run_id, subject, seq, message.role(), class, now, size, body],
        )?;
        tx.execute(
            "UPDATE sessions SET updated_ms = ?2 WHERE key = ?1",
            params![key, now],
        )?;
        Ok(seq)
    }

    /// The start of a turn, in one transaction (one fsync): the session (created for `user`
    /// if new; refused if it is another user's), the queued run and the user's message, and
    /// the taint when the message is untrusted.
    #[allow(
        clippy::too_many_arguments,
        reason = "one transaction's worth of fields"
    )]
    /// With `origin` (what started the turn, e.g. `channel:<name>:<event row>`), a turn is
    /// begun once per origin: when a run with that origin exists, nothing is written and its
    /// id is returned (`Some`).
    pub fn begin_turn(
        &self,
        key: &str,
        user: &str,
        channel: &str,
        run_id: &str,
        origin: Option<&str>,
        message: &Stored,
        untrusted: bool,
        now: i64,
    ) -> Result<Option<String>, TranscriptError> {
        self.store.db().tx(|tx| {
            if let Some(origin) = origin {
                let existing: Option<String> = tx
                    .query_opt("SELECT id FROM runs WHERE origin = ?1", params![origin])?
                    .map(|r| r.get(0))
                    .transpose()?;
                if existing.is_some() {
                    return Ok(existing);
                }
            }
            let owner: Option<String> = tx
                .query_opt("SELECT user_id FROM sessions WHERE key = ?1", params![key])?
                .map(|r| r.get(0))
                .transpose()?;
            match owner {
                Some(o) if o == user => {}
                Some(_) => return Err(TranscriptError::NotYours(key.into())),
                None => {
                    tx.execute(
                        "INSERT INTO sessions (key, user_id, subject, channel, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                        params![key, user, subject_of(user), channel, now],
                    )?;
                }
            }
            tx.execute(
                "INSERT INTO runs (id, session_key, user_id, subject, status, created_ms, updated_ms, origin) VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?5, ?6)",
                params![run_id, key, user, subject_of(user), now, origin],
            )?;
            self.insert_message(tx, key, user, Some(run_id), message, now)?;
            if untrusted {
                tx.execute("UPDATE sessions SET tainted = 1 WHERE key = ?1", params![key])?;
            }
            Ok(None)
        })
    }

    /// A step of a run in one transaction (one fsync): the message, the model call's usage
    /// (when it was a model answer) and the run's new status (when it changes).
    #[allow(
        clippy::too_many_arguments,
        reason = "one transaction's worth of fields"
    )]
    pub fn append_step(
        &self,
        key: &str,
        user: &str,
        run_id: Option<&str>,
        message: &Stored,
        usage: Option<&UsageRow<'_>>,
        status: Option<&str>,
        now: i64,
    ) -> Result<i64, TranscriptError> {
        self.store.db().tx(|tx| {
            let seq = self.insert_message(tx, key, user, run_id, message, now)?;
            if let Some(u) = usage {
                Self::insert_usage(tx, u)?;
            }
            if let (Some(st), Some(id)) = (status, run_id) {
                let finished = st == "completed";
                tx.execute(
                    "UPDATE runs SET status = ?2, updated_ms = ?3,
                                     finished_ms = CASE WHEN ?4 THEN ?3 ELSE finished_ms END
                     WHERE id = ?1",
                    params![id, st, now, finished],
                )?;
            }
            Ok(seq)
        })
    }

    /// The compaction summary (if any) and the messages after it, oldest first.
    pub fn history(&self, key: &str) -> Result<(Option<String>, Vec<Entry>), TranscriptError> {
        let (summary, upto) = {
            let r = self
                .store
                .db()
                .with(|c| {
                    c.query_opt(
                        "SELECT subject, summary, summary_seq FROM sessions WHERE key = ?1",
                        params![key],
                    )
                })?
                .ok_or_else(|| TranscriptError::NoSession(key.into()))?;
            (
                (r.get::<String>(0)?, r.get::<Option<Vec<u8>>>(1)?),
                r.get::<i64>(2)?,
            )
        };
        let summary = match summary {
            (subject, Some(blob)) => Some(self.open::<String>(&subject, &blob)?),
            (_, None) => None,
        };
        Ok((summary, self.messages_after(key, upto)?))
    }

    /// Every message of a session with `seq > after`, oldest first.
    pub fn messages_after(&self, key: &str, after: i64) -> Result<Vec<Entry>, TranscriptError> {
        let rows: Vec<RawEntry> = self.store.db().with(|c| {
            c.query_map(
                "SELECT seq, run_id, created_ms, subject, body FROM messages WHERE session_key = ?1 AND seq > ?2 ORDER BY seq",
                params![key, after],
                |r| Ok::<_, TranscriptError>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
        })?;
        rows.into_iter()
            .map(|(seq, run_id, created_ms, subject, body)| {
                Ok(Entry {
                    seq,
                    run_id,
                    created_ms,
                    message: self.open(&subject, &body)?,
                })
            })
            .collect()
    }

    /// Replaces the compaction summary: it now stands for every message up to `upto_seq`.
    pub fn set_summary(
        &self,
        key: &str,
        user: &str,
        summary: &str,
        upto_seq: i64,
    ) -> Result<(), TranscriptError> {
        let sealed = self.seal(&subject_of(user), &summary)?;
        self.store.db().with(|c| {
            c.execute(
                "UPDATE sessions SET summary = ?2, summary_seq = ?3 WHERE key = ?1",
                params![key, sealed, upto_seq],
            )
        })?;
        Ok(())
    }

    /// Sets a run's status (and, for a final status, its end time and error).
    pub fn set_run_status(
        &self,
        id: &str,
        status: &str,
        approval_id: Option<&str>,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), TranscriptError> {
        let finished = matches!(
            status,
            "completed" | "failed" | "cancelled" | "timed_out" | "interrupted"
        );
        self.store.db().with(|c| {
            c.execute(
                "UPDATE runs SET status = ?2, approval_id = ?3, error = COALESCE(?4, error), updated_ms = ?5,
                                 finished_ms = CASE WHEN ?6 THEN ?5 ELSE finished_ms END
                 WHERE id = ?1",
                params![id, status, approval_id, error, now, finished],
            )
        })?;
        Ok(())
    }

    /// Adds one model call to a run's totals and records its usage.
    pub fn record_usage(&self, u: &UsageRow<'_>) -> Result<(), TranscriptError> {
        self.store.db().tx(|tx| Self::insert_usage(tx, u))
    }

    fn insert_usage(tx: &mut Conn<'_>, u: &UsageRow<'_>) -> Result<(), TranscriptError> {
        let input = i64::try_from(u.input_tokens).unwrap_or(i64::MAX);
        let output = i64::try_from(u.output_tokens).unwrap_or(i64::MAX);
        // What caused the call: the agent run's origin, or a workflow's `llm.invoke` (a
        // workflow run is not an agent run).
        let origin: Option<Option<String>> = tx
            .query_opt("SELECT origin FROM runs WHERE id = ?1", params![u.run_id])?
            .map(|r| r.get(0))
            .transpose()?;
        let task = super::usage::Task::of_call(origin.as_ref().map(Option::as_deref));
        tx.execute(
            "INSERT INTO usage (at_ms, user_id, subject, session_key, run_id, model, tool, input_tokens, output_tokens, cost_usd, task)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![u.at_ms, u.user, subject_of(u.user), u.session, u.run_id, u.model, u.tool, input, output, u.cost_usd, task.as_str()],
        )?;
        tx.execute(
            "UPDATE runs SET steps = steps + 1, model = ?2, input_tokens = input_tokens + ?3,
                             output_tokens = output_tokens + ?4, cost_usd = cost_usd + ?5, updated_ms = ?6
             WHERE id = ?1",
            params![u.run_id, u.model, input, output, u.cost_usd.unwrap_or(0.0), u.at_ms],
        )?;
        Ok(())
    }

    /// What `user` has spent in the UTC day of `now_ms`, in USD.
    pub fn spend_today(&self, user: &str, now_ms: i64) -> Result<f64, TranscriptError> {
        const DAY: i64 = 86_400_000;
        let start = now_ms.div_euclid(DAY) * DAY;
        Ok(self.store.db().with(|c| {
            c.query_row(
                "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE user_id = ?1 AND at_ms >= ?2 AND at_ms < ?3",
                params![user, start, start + DAY],
            )?
            .get(0)
        })?)
    }

    pub fn run(&self, id: &str) -> Result<RunRow, TranscriptError> {
        self.store
            .db()
            .with(|c| {
                c.query_opt(
                    &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                    params![id],
                )
            })?
            .map(|r| run_row(&r))
            .transpose()?
            .ok_or_else(|| TranscriptError::NoRun(id.into()))
    }

    /// A session's runs, oldest first.
    pub fn session_runs(&self, key: &str) -> Result<Vec<RunRow>, TranscriptError> {
        self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE session_key = ?1 ORDER BY created_ms, id"
                ),
                params![key],
                run_row,
            )
        })
    }

    /// Runs that had not finished (queued, running, waiting for an approval), oldest first.
    pub fn unfinished_runs(&self) -> Result<Vec<RunRow>, TranscriptError> {
        self.store.db().with(|c| {
            c.query_map(
                &format!(
                    "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running', 'waiting_approval') ORDER BY created_ms, id"
                ),
                params![],
                run_row,
            )
        })
    }

    /// The messages a run added, oldest first.
    pub fn run_messages(&self, run_id: &str) -> Result<Vec<Entry>, TranscriptError> {
        let key: String = self
            .store
            .db()
            .with(|c| {
                c.query_opt(
                    "SELECT session_key FROM runs WHERE id = ?1",
                    params![run_id],
                )
            })?
            .ok_or_else(|| TranscriptError::NoRun(run_id.into()))?
            .get(0)?;
        let rows: Vec<(i64, i64, String, Vec<u8>)> = self.store.db().with(|c| {
            c.query_map(
                "SELECT seq, created_ms, subject, body FROM messages WHERE session_key = ?1 AND run_id = ?2 ORDER BY seq",
                params![key, run_id],
                |r| Ok::<_, TranscriptError>((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
        })?;
        rows.into_iter()
            .map(|(seq, created_ms, subject, body)| {
                Ok(Entry {
                    seq,
                    run_id: Some(run_id.to_string()),
                    created_ms,
                    message: self.open(&subject, &body)?,
                })
            })
            .collect()
    }

    /// Sessions, newest activity first (all users when `user` is `None`).
    pub fn sessions(&self, user: Option<&str>) -> Result<Vec<SessionRow>, TranscriptError> {
        self.session_rows(user, None)
    }

    fn session_rows(
        &self,
        user: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<SessionRow>, TranscriptError> {
        self.store.db().with(|c| {
            c.query_map(
                "SELECT s.key, s.user_id, s.channel, s.created_ms, s.updated_ms, s.tainted,
                        (SELECT COUNT(*) FROM messages m WHERE m.session_key = s.key),
                        (SELECT COUNT(*) FROM runs r WHERE r.session_key = s.key)
                 FROM sessions s WHERE (?1 IS NULL OR s.user_id = ?1) AND (?2 IS NULL OR s.key = ?2)
                 ORDER BY s.updated_ms DESC, s.key",
                params![user, key],
                |r| {
                    Ok::<_, TranscriptError>(SessionRow {
                        key: r.get(0)?,
                        user: r.get(1)?,
                        channel: r.get(2)?,
                        created_ms: r.get(3)?,
                        updated_ms: r.get(4)?,
                        tainted: r.get::<i64>(5)? != 0,
                        messages: r.get(6)?,
                        runs: r.get(7)?,
                    })
                },
            )
        })
    }

    pub fn session(&self, key: &str) -> Result<SessionRow, TranscriptError> {
        self.session_rows(None, Some(key))?
            .into_iter()
            .next()
            .ok_or_else(|| TranscriptError::NoSession(key.into()))
    }
}
