//! The agent loop behind the WebSocket control plane: [`ChatBackend`] over [`Agent`].
//!
//! Invariants: every call is for the authenticated user; a run, session or approval of another
//! user is reported as not found (nothing about it leaks), and approvals are resolved through
//! `Approvals::resolve`, where Cedar (`approval.grant`) decides whether this user may.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::backend::{
    ApprovalDesk, BackendError, BackendEvent, BoxFut, ChatBackend, EventKind, RunStarted,
};
use crate::agent::{Agent, AgentError, Stored, TurnRequest};
use crate::clock::rfc3339;

/// [`ChatBackend`] for the gateway's agent.
pub struct AgentBackend {
    agent: Agent,
    events: broadcast::Sender<BackendEvent>,
    desk: ApprovalDesk,
}

fn kind(name: &str) -> Option<EventKind> {
    EventKind::ALL.into_iter().find(|k| k.as_str() == name)
}

fn agent_err(e: AgentError) -> BackendError {
    match e {
        AgentError::InvalidSession(_) | AgentError::InvalidUser | AgentError::InvalidMessage => {
            BackendError::Invalid(e.to_string())
        }
        AgentError::NoRun(id) => BackendError::NotFound(format!("no run `{id}`")),
        AgentError::Transcript(crate::agent::transcripts::TranscriptError::NotYours(s)) => {
            BackendError::NotFound(format!("no session `{s}`"))
        }
        AgentError::Transcript(crate::agent::transcripts::TranscriptError::NoSession(s)) => {
            BackendError::NotFound(format!("no session `{s}`"))
        }
        other => BackendError::Unavailable(other.to_string()),
    }
}

impl AgentBackend {
    /// Wraps the agent and starts forwarding its events (must run inside the gateway runtime).
    /// Approvals are listed and resolved through an [`ApprovalDesk`] over `approvals`.
    pub fn new(agent: Agent, approvals: crate::approvals::Approvals) -> Self {
        let (events, _) = broadcast::channel(1024);
        let mut rx = agent.subscribe();
        let tx = events.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let Some(k) = kind(e.event) else { continue };
                        let mut payload = e.payload;
                        if k == EventKind::RunFinished
                            && payload["status"].as_str() == Some("timed_out")
                        {
                            payload["status"] = json!("timeout");
                        }
                        let _nobody = tx.send(BackendEvent {
                            user: e.user,
                            session: e.session,
                            event: k,
                            payload,
                        });
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        let desk = ApprovalDesk::new(approvals, events.clone());
        Self {
            agent,
            events,
            desk,
        }
    }

    async fn owned_run(&self, user: &str, run_id: &str) -> Result<(), BackendError> {
        let t = self.agent.transcripts().clone();
        let (u, id) = (user.to_string(), run_id.to_string());
        let row = tokio::task::spawn_blocking(move || t.run(&id))
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?;
        match row {
            Ok(r) if r.user == u => Ok(()),
            _ => Err(BackendError::NotFound(format!("no run `{run_id}`"))),
        }
    }
}

impl ChatBackend for AgentBackend {
    fn start_run(
        &self,
        user: &str,
        session: Option<&str>,
        text: &str,
    ) -> Result<RunStarted, BackendError> {
        let session = match session {
            Some(s) => s.to_string(),
            None => {
                // A new session for each message without one.
                let mut b = [0u8; 8];
                getrandom::fill(&mut b).map_err(|e| BackendError::Internal(e.to_string()))?;
                format!("ws:{}", chitin_audit::to_hex(&b))
            }
        };
        let req = TurnRequest {
            session: session.clone(),
            user: user.to_string(),
            channel: "ws".into(),
            text: text.to_string(),
            approval_wait: None,
            origin: None,
        };
        let agent = self.agent.clone();
        // Persisting the message before answering is the point: wait for it here.
        let run_id = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(agent.submit(req))
        })
        .map_err(agent_err)?;
        Ok(RunStarted { run_id, session })
    }

    fn wait_run(
        &self,
        user: &str,
        run_id: &str,
        timeout: Duration,
    ) -> BoxFut<'_, Result<Value, BackendError>> {
        let (user, run_id) = (user.to_string(), run_id.to_string());
        Box::pin(async move {
            self.owned_run(&user, &run_id).await?;
            let s = match self.agent.wait(&run_id, timeout).await {
                Ok(s) => s,
                Err(AgentError::WaitTimeout(_)) => return Err(BackendError::Timeout(timeout)),
                Err(e) => return Err(agent_err(e)),
            };
            let status = if s.status == "timed_out" {
                "timeout".to_string()
            } else {
                s.status.clone()
            };
            Ok(
                json!({"run_id": s.run_id, "session": s.session, "status": status,
                      "reply": s.reply, "error": s.error, "tool_calls": s.tool_calls, "usage": s.usage}),
            )
        })
    }

    fn history(
        &self,
        user: &str,
        session: &str,
        limit: usize,
    ) -> BoxFut<'_, Result<Value, BackendError>> {
        let (user, session) = (user.to_string(), session.to_string());
        Box::pin(async move {
            let t = self.agent.transcripts().clone();
            let s2 = session.clone();
            let got = tokio::task::spawn_blocking(move || match t.session_owner(&s2)? {
                Some(o) if o == user => t.messages_after(&s2, 0).map(Some),
                _ => Ok(None),
            })
            .await
            .map_err(|e| BackendError::Internal(e.to_string()))?
            .map_err(|e| agent_err(e.into()))?;
            let Some(msgs) = got else {
                return Err(BackendError::NotFound(format!("no session `{session}`")));
            };
            let skip = msgs.len().saturating_sub(limit);
            let out: Vec<Value> = msgs
                .iter()
                .skip(skip)
                .map(|e| {
                    let (role, text) = match &e.message {
                        Stored::User { text, .. } => ("user", text.clone()),
                        Stored::Assistant { text, tool_calls } => {
                            let calls: Vec<&str> = tool_calls.iter().map(|c| c.name.as_str()).collect();
                            if calls.is_empty() {
                                ("assistant", text.clone())
                            } else {
                                ("assistant", format!("{text}{}[calls {}]", if text.is_empty() { "" } else { " " }, calls.join(", ")))
                            }
                        }
                        Stored::Tool(t) => {
                            ("tool", format!("{}: {} ({})", t.tool, t.decision, t.outcome))
                        }
                    };
                    json!({"role": role, "text": text, "at": rfc3339(e.created_ms), "run_id": e.run_id})
                })
                .collect();
            Ok(json!({"session": session, "messages": out}))
        })
    }

    fn sessions(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        let user = user.to_string();
        Box::pin(async move {
            let t = self.agent.transcripts().clone();
            let list = tokio::task::spawn_blocking(move || t.sessions(Some(&user)))
                .await
                .map_err(|e| BackendError::Internal(e.to_string()))?
                .map_err(|e| agent_err(e.into()))?;
            let out: Vec<Value> = list
                .iter()
                .map(|s| {
                    json!({"session": s.key, "updated_at": rfc3339(s.updated_ms), "runs": s.runs,
                                "messages": s.messages, "channel": s.channel, "tainted": s.tainted})
                })
                .collect();
            Ok(json!({"sessions": out}))
        })
    }

    fn approvals(&self, user: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.pending(user)
    }

    fn approval(
        &self,
        user: &str,
        key: &crate::approvals::ApprovalRef,
    ) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.show(user, key)
    }

    fn resolve_approval(
        &self,
        user: &str,
        key: &crate::approvals::ApprovalRef,
        grant: bool,
    ) -> BoxFut<'_, Result<Value, BackendError>> {
        self.desk.resolve(user, key, grant)
    }

    fn subscribe(&self) -> broadcast::Receiver<BackendEvent> {
        self.events.subscribe()
    }

    fn health(&self) -> Value {
        json!({"model_configured": self.agent.has_model()})
    }

    fn cancel_run(&self, user: &str, run_id: &str) -> BoxFut<'_, Result<Value, BackendError>> {
        let (user, run_id) = (user.to_string(), run_id.to_string());
        Box::pin(async move {
            self.owned_run(&user, &run_id).await?;
            let cancelled = self.agent.cancel(&run_id);
            Ok(json!({"run_id": run_id, "cancelled": cancelled}))
        })
    }

    fn agent_configured(&self) -> bool {
        self.agent.has_model()
    }

    fn approval_opened(&self, user: &str, approval: &crate::approvals::Approval) {
        let _nobody = self.events.send(self.desk.requested(user, None, approval));
    }
}
