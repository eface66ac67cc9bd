//! The seam between the WebSocket control plane (`ws`) and whatever runs the conversations
//! (the agent loop). The WebSocket layer only authenticates, validates frames, routes methods
//! to a [`ChatBackend`] and forwards the backend's [`BackendEvent`]s to the connections of the
//! user they belong to. It never decides anything about tools or approvals itself.
//!
//! Contract for implementors (the agent loop):
//! - Every method gets the authenticated user id (`owner` today). A backend answers only
//!   about that user's runs and sessions: a run id or session of another user is
//!   [`BackendError::NotFound`] (not `Forbidden`: existence is not revealed). Approvals are
//!   listed for their requester and resolved by whoever Cedar's `approval.grant` allows
//!   ([`ApprovalDesk`] does both over `crate::approvals`).
//! - [`ChatBackend::start_run`] returns at once (the run continues in the background).
//! - Events are published on the broadcast channel returned by [`ChatBackend::subscribe`],
//!   with `user` set to the user the run belongs to; the WebSocket layer delivers an event only
//!   to connections authenticated as that user. Payload shapes are fixed (see [`EventKind`]
//!   and `docs/protocol.md`); the browser page and clients rely on them.
//! - Text in payloads is data, never markup: clients must render it as text.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::approvals::ApprovalRef;

/// A boxed future, the return type of the async backend methods (object-safe without a
/// macro crate).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A run that was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStarted {
    pub run_id: String,
    /// The session the run belongs to (the one asked for, or the one the backend chose).
    pub session: String,
}

/// The events a backend publishes. The names on the wire are the `as_str` values.
///
/// Payloads (every field required unless marked `?`):
/// - `run.started`: `{run_id, session}`
/// - `assistant.delta`: `{run_id, session, text}` (append `text` to the reply of `run_id`)
/// - `tool.start`: `{run_id, session, call_id, tool, args}`
/// - `tool.end`: `{run_id, session, call_id, tool, decision, outcome, policies}` with
///   `decision` one of `allow`, `deny`, `approval_required`, `invalid`; `outcome` a short
///   string or object describing what happened; `policies` the determining policy ids
/// - `approval.requested`: `{run_id, session, approval: {id, code, expires_at, tool, summary,
///   fields?, ...}}` (`run_id` null when `/tools/invoke` opened it; `fields` every argument the
///   approval binds, see `Approval::to_json`)
/// - `approval.resolved`: `{approval_id, code, granted, by}`
/// - `run.finished`: `{run_id, session, status, reply?, error?}` with `status` one of
///   `completed`, `failed`, `cancelled`, `timeout`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    RunStarted,
    AssistantDelta,
    ToolStart,
    ToolEnd,
    ApprovalRequested,
    ApprovalResolved,
    RunFinished,
}

impl EventKind {
    /// Every kind, in the order of a run's lifecycle.
    pub const ALL: [EventKind; 7] = [
        Self::RunStarted,
        Self::AssistantDelta,
        Self::ToolStart,
        Self::ToolEnd,
        Self::ApprovalRequested,
        Self::ApprovalResolved,
        Self::RunFinished,
    ];

    /// The event name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RunStarted => "run.started",
            Self::AssistantDelta => "assistant.delta",
            Self::ToolStart => "tool.start",
            Self::ToolEnd => "tool.end",
            Self::ApprovalRequested => "approval.requested",
            Self::ApprovalResolved => "approval.resolved",
            Self::RunFinished => "run.finished",
        }
    }
}

/// One event of one user's run or approval.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendEvent {
    /// The user the event belongs to; only that user's connections receive it.
    pub user: String,
    /// The session it belongs to (empty for events not tied to a session, e.g. an approval
    /// resolved from the CLI).
    pub session: String,
    pub event: EventKind,
    pub payload: Value,
}

/// Why a backend call failed. Each variant maps to one error `code` on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No agent is configured (e.g. no model): the message says what to configure.
    #[error("{0}")]
    NotConfigured(String),
    /// No such run / session / approval for this user.
    #[error("{0}")]
    NotFound(String),
    /// The request is well-formed but not acceptable (e.g. empty message, bad session key).
    #[error("{0}")]
    Invalid(String),
    /// The policies refused (e.g. `approval.grant` denied for this user).
    #[error("{0}")]
    Forbidden(String),
    /// `wait_run` did not see the run finish within the timeout (the run continues).
    #[error("the run did not finish within {0:?}; it continues, wait again")]
    Timeout(Duration),
    /// The approval is no longer pending (resolved, expired or used).
    #[error("{0}")]
    Conflict(String),
    /// Too many runs or requests at once; retry later.
    #[error("{0}")]
    Busy(String),
    /// Fail-closed conditions (audit log, store, sandbox unavailable).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl BackendError {
    /// The error `code` on the wire.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured(_) => "not_configured",
            Self::NotFound(_) => "not_found",
            Self::Invalid(_) => "invalid_params",
            Self::Forbidden(_) => "forbidden",
            Self::Timeout(_) => "timeout",
            Self::Conflict(_) => "conflict",
            Self::Busy(_) => "busy",
            Self::Unavailable(_) => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// What the WebSocket control plane needs from the agent. Object-safe; the gateway holds an
/// `Option<Arc<dyn ChatBackend>>` (none: every chat method answers `not_configured`).
///
/// Result payload shapes (documented in `docs/protocol.md`, relied on by the web page):
/// - `wait_run`: `{run_id, session, status, reply?, error?}` (same as `run.finished`)
/// - `history`: `{session, messages: [{role: "user"|"assistant"|"tool", text, at?, run_id?}]}`,
///   oldest first, at most `limit` (the most recent ones)
/// - `sessions`: `{sessions: [{session, title?, updated_at?, runs?}]}`
/// - `approvals`: `{approvals: [{id, code, expires_at, tool, summary, fields?, session?,
///   run_id?}]}` (pending ones of this user)
/// - `approval`: `{approval: {..., fields}}` with every field in full (`approvals.show`)
/// - `resolve_approval`: `{approval_id, code, granted, by}` (same as `approval.resolved`)
/// - `health`: any JSON object (merged into the `health` method's payload)
pub trait ChatBackend: Send + Sync {
    /// Starts a run of `text` in `session` (a new session when `None`) for `user`; returns
    /// at once.
    fn start_run(
        &self,
        user: &str,
        session: Option<&str>,
        text: &str,
    ) -> Result<RunStarted, BackendError>;
    /// Waits up to `timeout` for the run to finish and returns its result.
    fn wait_run(
        &self,
        user: &str,
        run_id: &str,
        timeout: Duration,
    ) -> BoxFut<'_, Result<Value, BackendError>>;
    /// The last `limit` messages of one of `user`'s sessions.
    fn history(
        &self,
        user: &str,
        session: &str,
        limit: usize,
    ) -> BoxFut<'_, Result<Value, BackendError>>;
    /// `user`'s sessions.
    fn sessions(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>>;
    /// The pending approvals `user` may see.
    fn approvals(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>>;
    /// One of `user`'s approvals by code or id, every field in full (`approvals.show`).
    fn approval(&self, user: &str, key: &ApprovalRef) -> BoxFut<'_, Result<Value, BackendError>> {
        let _ = user;
        let key = crate::approvals::visible(key.as_str());
        Box::pin(async move { Err(BackendError::NotFound(format!("no approval `{key}`"))) })
    }
    /// Grants (`grant == true`) or denies the approval with this code or id (an id: exactly
    /// that approval), as `user` (Cedar `approval.grant` decides whether `user` may).
    fn resolve_approval(
        &self,
        user: &str,
        key: &ApprovalRef,
        grant: bool,
    ) -> BoxFut<'_, Result<Value, BackendError>>;
    /// A receiver of every event from now on (all users; the WebSocket layer filters).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BackendEvent>;
    /// A small JSON object about the backend (model configured, runs in flight, ...).
    fn health(&self) -> Value;
    /// Asks one of `user`'s runs to stop; `{run_id, cancelled}` (`false`: it was not running).
    fn cancel_run(&self, user: &str, run_id: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        let _ = user;
        let run_id = run_id.to_string();
        Box::pin(async move { Err(BackendError::NotFound(format!("no run `{run_id}`"))) })
    }
    /// Whether an agent runs chats (false: only approvals work; `connect` reports
    /// `agent: false` and the page says what to configure).
    fn agent_configured(&self) -> bool {
        true
    }
    /// An approval was opened outside a run (by `POST /tools/invoke`): publish
    /// `approval.requested` for `user` with `run_id: null` (e.g. via
    /// [`ApprovalDesk::requested`]). The default publishes nothing.
    fn approval_opened(&self, user: &str, approval: &crate::approvals::Approval) {
        let _ = (user, approval);
    }
}

/// The approvals half of a backend over the real approval workflow (`crate::approvals`):
/// list this user's pending approvals, resolve one by code or id as this user (Cedar
/// `approval.grant` decides, audited), and publish `approval.resolved`. The agent's backend
/// can delegate its `approvals` / `resolve_approval` here, and call
/// [`ApprovalDesk::requested`] when it opens an approval.
#[derive(Clone)]
pub struct ApprovalDesk {
    approvals: crate::approvals::Approvals,
    events: tokio::sync::broadcast::Sender<BackendEvent>,
}

fn approval_error(e: crate::approvals::ApprovalError) -> BackendError {
    use crate::approvals::ApprovalError as A;
    use crate::gate::GateError;
    let msg = e.to_string();
    match e {
        A::NotFound(_) | A::UnknownId(_) => BackendError::NotFound(msg),
        A::NotPending { .. } | A::Expired(_) | A::NotApproved | A::AmbiguousCode(..) => {
            BackendError::Conflict(msg)
        }
        A::ApproverRefused { .. } | A::WrongApprover { .. } => BackendError::Forbidden(msg),
        A::Audit(_) | A::Gate(GateError::AuditUnavailable(_)) => BackendError::Unavailable(msg),
        _ => BackendError::Internal(msg),
    }
}

/// The wire shape of an approval (`approvals.list`, `approval.requested`): every field it
/// binds, large ones abbreviated (`approvals.show` gives them whole).
pub fn approval_json(a: &crate::approvals::Approval) -> Value {
    a.to_json(false)
}

impl ApprovalDesk {
    pub fn new(
        approvals: crate::approvals::Approvals,
        events: tokio::sync::broadcast::Sender<BackendEvent>,
    ) -> Self {
        Self { approvals, events }
    }

    /// The event for an approval just opened for `user` (in run `run_id`, or `None` for one
    /// opened by `/tools/invoke`); publish it on the backend's channel.
    pub fn requested(
        &self,
        user: &str,
        run_id: Option<&str>,
        a: &crate::approvals::Approval,
    ) -> BackendEvent {
        BackendEvent {
            user: user.into(),
            session: a.session.clone(),
            event: EventKind::ApprovalRequested,
            payload: serde_json::json!({"run_id": run_id, "session": a.session,
                                        "approval": approval_json(a)}),
        }
    }

    /// `user`'s pending approvals (`{approvals: [...]}`), newest first.
    pub fn pending(&self, user: &str) -> BoxFut<'static, Result<Value, BackendError>> {
        let approvals = self.approvals.clone();
        let user = user.to_string();
        Box::pin(async move {
            let list = tokio::task::spawn_blocking(move || approvals.list(false))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))?
                .map_err(approval_error)?;
            let mine: Vec<Value> = list
                .iter()
                .filter(|a| a.requester == user)
                .map(approval_json)
                .collect();
            Ok(serde_json::json!({ "approvals": mine }))
        })
    }

    /// One of `user`'s approvals (by code or id) with every field in full
    /// (`{approval: {...}}`); another user's is not found.
    pub fn show(
        &self,
        user: &str,
        key: &ApprovalRef,
    ) -> BoxFut<'static, Result<Value, BackendError>> {
        let approvals = self.approvals.clone();
        let user = user.to_string();
        let key = key.clone();
        Box::pin(async move {
            let a = tokio::task::spawn_blocking(move || approvals.find(&key))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))?
                .map_err(approval_error)?;
            if a.requester != user {
                return Err(BackendError::NotFound(format!(
                    "no approval with id {}",
                    crate::approvals::visible(&a.id)
                )));
            }
            Ok(serde_json::json!({ "approval": a.to_json(true) }))
        })
    }

    /// Grants or denies the pending approval with this code or id as `user`; publishes
    /// `approval.resolved` and returns its payload.
    pub fn resolve(
        &self,
        user: &str,
        key: &ApprovalRef,
        grant: bool,
    ) -> BoxFut<'static, Result<Value, BackendError>> {
        let approvals = self.approvals.clone();
        let events = self.events.clone();
        let user = user.to_string();
        let key = key.clone();
        Box::pin(async move {
            let by = user.clone();
            let done = tokio::task::spawn_blocking(move || {
                // A code is 6 characters, an id 32 hex digits: an id resolves exactly that
                // approval. Who may resolve is Cedar's decision (`approval.grant`) either way,
                // as for `chitin approvals approve`.
                approvals.resolve_ref(&key, &by, grant)
            })
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .map_err(approval_error)?;
            let payload = serde_json::json!({
                "approval_id": done.id, "code": done.code, "granted": grant, "by": user,
            });
            let _ = events.send(BackendEvent {
                user: done.requester.clone(),
                session: done.session.clone(),
                event: EventKind::ApprovalResolved,
                payload: payload.clone(),
            });
            Ok(payload)
        })
    }
}

/// The backend of a gateway without an agent: chat methods answer `not_configured` with what
/// to configure; approvals (e.g. those `/tools/invoke` opened) can still be listed and
/// resolved from the web page.
pub struct NoAgent {
    desk: ApprovalDesk,
    events: tokio::sync::broadcast::Sender<BackendEvent>,
}

impl NoAgent {
    pub fn new(approvals: crate::approvals::Approvals) -> Self {
        let (events, _) = tokio::sync::broadcast::channel(256);
        Self {
            desk: ApprovalDesk::new(approvals, events.clone()),
            events,
        }
    }
}

/// What a gateway without an agent answers to chat methods.
pub const NOT_CONFIGURED: &str = "no agent is configured on this gateway: set [agent] model and add a [[providers]] entry in chitin.toml, then restart `chitin gateway`";

fn not_configured<'a>() -> BoxFut<'a, Result<Value, BackendError>> {
    Box::pin(async { Err(BackendError::NotConfigured(NOT_CONFIGURED.into())) })
}

impl ChatBackend for NoAgent {
    fn start_run(&self, _: &str, _: Option<&str>, _: &str) -> Result<RunStarted, BackendError> {
        Err(BackendError::NotConfigured(NOT_CONFIGURED.into()))
    }
    fn wait_run(&self, _: &str, _: &str, _: Duration) -> BoxFut<'_, Result<Value, BackendError>> {
        not_configured()
    }
    fn history(&self, _: &str, _: &str, _: usize) -> BoxFut<'_, Result<Value, BackendError>> {
        not_configured()
    }
    fn sessions(&self, _: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        not_configured()
    }
    fn approvals(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.pending(user)
    }
    fn approval(&self, user: &str, key: &ApprovalRef) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.show(user, key)
    }
    fn resolve_approval(
        &self,
        user: &str,
        key: &ApprovalRef,
        grant: bool,
    ) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.resolve(user, key, grant)
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }
    fn health(&self) -> Value {
        serde_json::json!({"agent": "not configured"})
    }
    fn agent_configured(&self) -> bool {
        false
    }
    fn approval_opened(&self, user: &str, approval: &crate::approvals::Approval) {
        let _ = self.events.send(self.desk.requested(user, None, approval));
    }
}

/// A scripted in-process backend for tests of the WebSocket layer and the web page.
#[doc(hidden)]
pub mod testing {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use serde_json::{Value, json};
    use tokio::sync::{broadcast, watch};

    use super::{BackendError, BackendEvent, BoxFut, ChatBackend, EventKind, RunStarted};

    /// One scripted step of a run, played in order after `run.started`.
    #[derive(Debug, Clone)]
    pub enum Step {
        /// `assistant.delta` with this text.
        Delta(String),
        /// `tool.start` then `tool.end` with this decision (`allow`, `deny`, ...).
        Tool {
            tool: String,
            args: Value,
            decision: String,
        },
        /// `approval.requested`; the run then waits until the approval is resolved (through
        /// `resolve_approval`) before playing the next step.
        Approval { tool: String, summary: String },
        /// Pause between steps.
        Sleep(Duration),
    }

    /// A call the backend received.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Call {
        StartRun {
            user: String,
            session: Option<String>,
            text: String,
        },
        Wait {
            user: String,
            run_id: String,
        },
        History {
            user: String,
            session: String,
            limit: usize,
        },
        Sessions {
            user: String,
        },
        Approvals {
            user: String,
        },
        Resolve {
            user: String,
            code_or_id: String,
            grant: bool,
        },
    }

    #[derive(Debug, Clone)]
    struct PendingApproval {
        id: String,
        code: String,
        user: String,
        session: String,
        run_id: String,
        tool: String,
        summary: String,
        resolved: watch::Sender<Option<bool>>,
    }

    #[derive(Debug, Default)]
    struct State {
        calls: Vec<Call>,
        /// run id → (user, session, result when finished)
        runs: HashMap<String, (String, String, watch::Sender<Option<Value>>)>,
        approvals: Vec<PendingApproval>,
        history: HashMap<(String, String), Vec<Value>>,
    }

    /// The scripted backend. Every run plays `script` and finishes with the concatenated
    /// deltas as its reply (`status: "completed"`, or `"failed"` when an approval was denied).
    pub struct ScriptedBackend {
        script: Vec<Step>,
        events: broadcast::Sender<BackendEvent>,
        state: Arc<Mutex<State>>,
        next: AtomicU64,
    }

    impl ScriptedBackend {
        pub fn new(script: Vec<Step>) -> Arc<Self> {
            let (events, _) = broadcast::channel(1024);
            Arc::new(Self {
                script,
                events,
                state: Arc::new(Mutex::new(State::default())),
                next: AtomicU64::new(1),
            })
        }

        /// Every call received so far.
        pub fn calls(&self) -> Vec<Call> {
            self.state
                .lock()
                .map(|s| s.calls.clone())
                .unwrap_or_default()
        }

        /// Publishes an arbitrary event (as the agent would).
        pub fn publish(&self, event: BackendEvent) {
            let _ = self.events.send(event);
        }

        fn record(&self, call: Call) {
            if let Ok(mut s) = self.state.lock() {
                s.calls.push(call);
            }
        }

        fn id(&self, prefix: &str) -> String {
            format!("{prefix}-{}", self.next.fetch_add(1, Ordering::Relaxed))
        }
    }

    fn emit(
        tx: &broadcast::Sender<BackendEvent>,
        user: &str,
        session: &str,
        ev: EventKind,
        p: Value,
    ) {
        let _ = tx.send(BackendEvent {
            user: user.into(),
            session: session.into(),
            event: ev,
            payload: p,
        });
    }

    impl ChatBackend for ScriptedBackend {
        fn start_run(
            &self,
            user: &str,
            session: Option<&str>,
            text: &str,
        ) -> Result<RunStarted, BackendError> {
            self.record(Call::StartRun {
                user: user.into(),
                session: session.map(str::to_string),
                text: text.into(),
            });
            if text.trim().is_empty() {
                return Err(BackendError::Invalid("the message is empty".into()));
            }
            let run_id = self.id("run");
            let session = session.map_or_else(|| self.id("session"), str::to_string);
            let (done_tx, _) = watch::channel(None);
            {
                let mut s = self
                    .state
                    .lock()
                    .map_err(|_| BackendError::Internal("state poisoned".into()))?;
                s.runs.insert(
                    run_id.clone(),
                    (user.to_string(), session.clone(), done_tx.clone()),
                );
                s.history
                    .entry((user.to_string(), session.clone()))
                    .or_default()
                    .push(json!({"role": "user", "text": text, "run_id": run_id}));
            }
            let tx = self.events.clone();
            let script = self.script.clone();
            let state = Arc::clone(&self.state);
            let (user, sess, run) = (user.to_string(), session.clone(), run_id.clone());
            let mut n = 0u64;
            tokio::spawn(async move {
                // Let the caller answer with the run id before the first event.
                tokio::time::sleep(Duration::from_millis(20)).await;
                emit(
                    &tx,
                    &user,
                    &sess,
                    EventKind::RunStarted,
                    json!({"run_id": run, "session": sess}),
                );
                let mut reply = String::new();
                let mut status = "completed";
                for step in script {
                    n += 1;
                    match step {
                        Step::Delta(t) => {
                            reply.push_str(&t);
                            emit(
                                &tx,
                                &user,
                                &sess,
                                EventKind::AssistantDelta,
                                json!({"run_id": run, "session": sess, "text": t}),
                            );
                        }
                        Step::Tool {
                            tool,
                            args,
                            decision,
                        } => {
                            let call_id = format!("call-{n}");
                            emit(
                                &tx,
                                &user,
                                &sess,
                                EventKind::ToolStart,
                                json!({"run_id": run, "session": sess, "call_id": call_id, "tool": tool, "args": args}),
                            );
                            let outcome = if decision == "allow" {
                                "ran (exit 0)"
                            } else {
                                "nothing ran"
                            };
                            emit(
                                &tx,
                                &user,
                                &sess,
                                EventKind::ToolEnd,
                                json!({"run_id": run, "session": sess, "call_id": call_id, "tool": tool,
                                       "decision": decision, "outcome": outcome,
                                       "policies": [format!("scripted.{decision}")]}),
                            );
                        }
                        Step::Approval { tool, summary } => {
                            let id = format!("appr-{run}-{n}");
                            let code = format!("C{n:05}");
                            let (rtx, mut rrx) = watch::channel(None);
                            if let Ok(mut s) = state.lock() {
                                s.approvals.push(PendingApproval {
                                    id: id.clone(),
                                    code: code.clone(),
                                    user: user.clone(),
                                    session: sess.clone(),
                                    run_id: run.clone(),
                                    tool: tool.clone(),
                                    summary: summary.clone(),
                                    resolved: rtx,
                                });
                            }
                            emit(
                                &tx,
                                &user,
                                &sess,
                                EventKind::ApprovalRequested,
                                json!({"run_id": run, "session": sess, "approval": {
                                    "id": id, "code": code, "expires_at": "2099-01-01T00:00:00Z",
                                    "tool": tool, "summary": summary}}),
                            );
                            let granted = loop {
                                if let Some(g) = *rrx.borrow_and_update() {
                                    break g;
                                }
                                if rrx.changed().await.is_err() {
                                    break false;
                                }
                            };
                            if !granted {
                                status = "failed";
                                break;
                            }
                        }
                        Step::Sleep(d) => tokio::time::sleep(d).await,
                    }
                }
                let result = if status == "completed" {
                    json!({"run_id": run, "session": sess, "status": status, "reply": reply})
                } else {
                    json!({"run_id": run, "session": sess, "status": status, "error": "the approval was denied"})
                };
                if let Ok(mut s) = state.lock() {
                    s.history
                        .entry((user.clone(), sess.clone()))
                        .or_default()
                        .push(json!({"role": "assistant", "text": reply, "run_id": run}));
                }
                let _ = done_tx.send(Some(result.clone()));
                emit(&tx, &user, &sess, EventKind::RunFinished, result);
            });
            Ok(RunStarted { run_id, session })
        }

        fn wait_run(
            &self,
            user: &str,
            run_id: &str,
            timeout: Duration,
        ) -> BoxFut<'_, Result<Value, BackendError>> {
            self.record(Call::Wait {
                user: user.into(),
                run_id: run_id.into(),
            });
            let found = self.state.lock().ok().and_then(|s| {
                s.runs
                    .get(run_id)
                    .filter(|(u, _, _)| u == user)
                    .map(|(_, _, tx)| tx.subscribe())
            });
            let run_id = run_id.to_string();
            Box::pin(async move {
                let Some(mut rx) = found else {
                    return Err(BackendError::NotFound(format!("no run {run_id}")));
                };
                let wait = async {
                    loop {
                        if let Some(v) = rx.borrow_and_update().clone() {
                            return Ok(v);
                        }
                        if rx.changed().await.is_err() {
                            return Err(BackendError::Internal("the run vanished".into()));
                        }
                    }
                };
                tokio::time::timeout(timeout, wait)
                    .await
                    .unwrap_or(Err(BackendError::Timeout(timeout)))
            })
        }

        fn history(
            &self,
            user: &str,
            session: &str,
            limit: usize,
        ) -> BoxFut<'_, Result<Value, BackendError>> {
            self.record(Call::History {
                user: user.into(),
                session: session.into(),
                limit,
            });
            let msgs = self.state.lock().ok().and_then(|s| {
                s.history
                    .get(&(user.to_string(), session.to_string()))
                    .cloned()
            });
            let session = session.to_string();
            Box::pin(async move {
                let Some(all) = msgs else {
                    return Err(BackendError::NotFound(format!("no session {session}")));
                };
                let tail: Vec<Value> = all[all.len().saturating_sub(limit)..].to_vec();
                Ok(json!({"session": session, "messages": tail}))
            })
        }

        fn sessions(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>> {
            self.record(Call::Sessions { user: user.into() });
            let mut list: Vec<String> = self
                .state
                .lock()
                .map(|s| {
                    s.history
                        .keys()
                        .filter(|(u, _)| u == user)
                        .map(|(_, s)| s.clone())
                        .collect()
                })
                .unwrap_or_default();
            list.sort();
            Box::pin(async move {
                Ok(
                    json!({"sessions": list.iter().map(|s| json!({"session": s})).collect::<Vec<_>>()}),
                )
            })
        }

        fn approvals(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>> {
            self.record(Call::Approvals { user: user.into() });
            let list: Vec<Value> = self
                .state
                .lock()
                .map(|s| {
                    s.approvals
                        .iter()
                        .filter(|a| a.user == user && a.resolved.borrow().is_none())
                        .map(|a| {
                            json!({"id": a.id, "code": a.code, "expires_at": "2099-01-01T00:00:00Z",
                                   "tool": a.tool, "summary": a.summary, "session": a.session,
                                   "run_id": a.run_id})
                        })
                        .collect()
                })
                .unwrap_or_default();
            Box::pin(async move { Ok(json!({"approvals": list})) })
        }

        fn resolve_approval(
            &self,
            user: &str,
            key: &crate::approvals::ApprovalRef,
            grant: bool,
        ) -> BoxFut<'_, Result<Value, BackendError>> {
            let code_or_id = key.as_str();
            self.record(Call::Resolve {
                user: user.into(),
                code_or_id: code_or_id.into(),
                grant,
            });
            let found = self.state.lock().ok().and_then(|s| {
                s.approvals
                    .iter()
                    .find(|a| a.user == user && (a.id == code_or_id || a.code == code_or_id))
                    .cloned()
            });
            let tx = self.events.clone();
            let user = user.to_string();
            let code_or_id = code_or_id.to_string();
            Box::pin(async move {
                let Some(a) = found else {
                    return Err(BackendError::NotFound(format!(
                        "no pending approval {code_or_id}"
                    )));
                };
                if a.resolved.borrow().is_some() {
                    return Err(BackendError::Conflict(format!(
                        "approval {} is no longer pending",
                        a.code
                    )));
                }
                let _ = a.resolved.send(Some(grant));
                let payload =
                    json!({"approval_id": a.id, "code": a.code, "granted": grant, "by": user});
                emit(
                    &tx,
                    &user,
                    &a.session,
                    EventKind::ApprovalResolved,
                    payload.clone(),
                );
                Ok(payload)
            })
        }

        fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
            self.events.subscribe()
        }

        fn health(&self) -> Value {
            json!({"backend": "scripted", "model": "none"})
        }
    }
}
