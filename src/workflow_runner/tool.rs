//! The agent's `workflow` tool over the runner: the model runs a whole deterministic pipeline
//! in one call, or resumes one.
//!
//! The run is for the session's user with origin `model` (Cedar `workflow.run`; a file that
//! changed during the session needs the owner's approval), in the session (its approvals are
//! posted to its chat), tainted when the session is. The model can continue a run a person
//! approved, answer an input gate, or cancel; it can never approve: `approve: true` on a
//! pending approval changes nothing, and the agent waits for a person instead.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Envelope, Intent, ResumeKey, ResumeRequest, Runner, StartRequest};
use crate::agent::{BoxFut, WorkflowAnswer, WorkflowCall, WorkflowTool};
use crate::gate::Origin;
use crate::providers::ToolSpec;
use crate::workflows::envelope::{self, ErrorKind};

/// How long a tool call waits for a run another resumer continued (the gateway's loop after
/// an approval) to finish.
const SETTLE_WAIT: Duration = Duration::from_secs(600);

/// The arguments the model sends (strict: unknown fields are refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Args {
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    resume: Option<Resume>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Resume {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    id: Option<String>,
    /// `true`: continue after a person approved (the model cannot approve); `false`: deny.
    #[serde(default)]
    approve: Option<bool>,
    #[serde(default)]
    response: Option<Value>,
    #[serde(default)]
    cancel: bool,
}

/// [`WorkflowTool`] for the agent.
#[derive(Clone)]
pub struct RunnerTool {
    runner: Runner,
}

impl RunnerTool {
    pub fn new(runner: Runner) -> Self {
        Self { runner }
    }
}

fn answer(e: Envelope) -> WorkflowAnswer {
    WorkflowAnswer {
        approval_id: (e.status() == "needs_approval")
            .then(|| e.approval_id.clone())
            .flatten(),
        envelope: e.value,
    }
}

fn invalid(m: &str) -> WorkflowAnswer {
    WorkflowAnswer {
        envelope: envelope::failure(ErrorKind::Parse, m),
        approval_id: None,
    }
}

impl RunnerTool {
    async fn run(&self, call: WorkflowCall) -> WorkflowAnswer {
        let a: Args = match serde_json::from_value(call.args.clone()) {
            Ok(a) => a,
            Err(e) => return invalid(&format!("invalid workflow tool arguments: {e}")),
        };
        match (a.file, a.resume) {
            (Some(file), None) => answer(
                self.runner
                    .start(StartRequest {
                        file,
                        args: a.args,
                        principal: call.user,
                        origin: Origin::Model,
                        session: Some(call.session),
                        tainted: call.tainted,
                    })
                    .await,
            ),
            (None, Some(r)) => {
                if a.args.is_some() {
                    return invalid("`args` goes with `file`, not with `resume`");
                }
                let key = match (r.token, r.id) {
                    (Some(t), None) => ResumeKey::Token(t),
                    (None, Some(id)) => ResumeKey::Id(id),
                    _ => return invalid("resume needs exactly one of `token` or `id`"),
                };
                let intent = match (r.approve, r.response, r.cancel) {
                    (Some(true), None, false) => Intent::Continue,
                    (Some(false), None, false) => Intent::Approve(false),
                    (None, Some(v), false) => Intent::Respond(v),
                    (None, None, true) => Intent::Cancel,
                    _ => {
                        return invalid(
                            "resume needs exactly one of `approve`, `response` or `cancel`",
                        );
                    }
                };
                answer(
                    self.runner
                        .resume(ResumeRequest {
                            key,
                            intent,
                            principal: call.user,
                            origin: Origin::Model,
                        })
                        .await,
                )
            }
            _ => invalid("pass either `file` (and `args`) to run a workflow, or `resume`"),
        }
    }

    /// Continues after the approval was decided: granted goes on, denied cancels; one that is
    /// still pending (the agent's wait ended) leaves the run paused, with its token.
    async fn settle_inner(&self, call: WorkflowCall, id: String) -> WorkflowAnswer {
        let env = self
            .runner
            .resume(ResumeRequest {
                key: ResumeKey::Id(id.clone()),
                intent: Intent::Continue,
                principal: call.user,
                origin: Origin::Model,
            })
            .await;
        // Another resumer (the gateway's loop) may have continued it: wait for its end.
        if env.status() == "error"
            && let Some(run) = env.run_id.clone()
        {
            let msg = env.value["error"]["message"].as_str().unwrap_or("");
            if msg.contains("resumed") || msg.contains("being resumed") {
                return answer(self.wait_settled(&run).await);
            }
        }
        answer(env)
    }

    async fn wait_settled(&self, run: &str) -> Envelope {
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        loop {
            let e = self.runner.envelope_of(run);
            let running = e.status() == "error"
                && e.value["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("still running"));
            if !running || tokio::time::Instant::now() >= deadline {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl WorkflowTool for RunnerTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: crate::policy::Tool::Workflow.as_str().into(),
            description: "Run a Lobster workflow file (a deterministic pipeline of steps) from the workspace or the workflow library in one call, or resume a paused run. Every step is still checked by policy and sandboxed. The result is Lobster's envelope: status ok with the output, needs_approval (a person must approve; you cannot), needs_input (answer with resume.response), or an error.".into(),
            input_schema: json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "file": {"type": "string", "description": "the workflow file (.lobster, .yaml, .yml, .json), relative to the workspace"},
                    "args": {"type": "object", "description": "the workflow's arguments"},
                    "resume": {
                        "type": "object",
                        "additionalProperties": false,
                        "description": "resume a paused run: token or id, and one of approve (true: continue after a person approved; false: deny), response (for an input request) or cancel",
                        "properties": {
                            "token": {"type": "string"},
                            "id": {"type": "string"},
                            "approve": {"type": "boolean"},
                            "response": {},
                            "cancel": {"type": "boolean"}
                        }
                    }
                }
            }),
        }
    }

    fn call(&self, call: WorkflowCall) -> BoxFut<'_, WorkflowAnswer> {
        Box::pin(self.run(call))
    }

    fn settle(
        &self,
        call: WorkflowCall,
        approval_id: String,
        _granted: bool,
    ) -> BoxFut<'_, WorkflowAnswer> {
        Box::pin(self.settle_inner(call, approval_id))
    }
}
