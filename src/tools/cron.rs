//! `cron`: the agent adds, lists and removes cron jobs that run as its user. Every call is
//! decided by Cedar `cron.manage` (context `origin`, `op`, `session`, `tainted`, `job_user`,
//! `target`, `schedule`, `deliver`), bound to its full arguments like a tool call: by the
//! default policies, adding or removing a job from a session that has taken in untrusted
//! content needs the owner's approval of exactly that job. The jobs live in the gateway's
//! automation store, reached through a [`CronJobs`] the gateway attaches to the sandbox
//! (`Sandbox::with_cron`); without one the tool is not offered and refuses to run.
//!
//! The model cannot choose whom a job runs as: a job always runs as the user of the call.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult};
use crate::approvals::{ApprovalError, Approvals};
use crate::config::automation::{CronJob, Missed, Target};
use crate::gate::{CallContext, Gate, Verdict};
use crate::policy::{Action, PolicyRequest};
use chitin_audit::{RecordInput, ToolRun};

/// The tool's name.
pub const TOOL: &str = "cron";

/// What the model is told the tool does.
pub const DESCRIPTION: &str = "Manage your scheduled jobs. op=add: a job that runs on a schedule (`schedule`: a cron expression with 5 fields, or 6 with seconds first, read in `timezone`; or `every`: an interval such as \"15m\") and either starts an agent turn with `prompt` (in `session`, default cron:<name>; its answer is sent to `deliver`, a chat conversation's session key, or kept in the session) or runs a `workflow` file with `args`; `missed`: skip (default) or run_once for times missed while the gateway was down. op=list: your jobs. op=remove: a job by `name`.";

/// The JSON schema of the arguments.
pub fn input_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["op"], "properties": {
        "op": {"type": "string", "enum": ["add", "list", "remove"]},
        "name": {"type": "string", "description": "the job's name: a-z 0-9 _ . - (add, remove)"},
        "schedule": {"type": "string", "description": "a cron expression, e.g. \"0 7 * * 1-5\""},
        "timezone": {"type": "string", "description": "IANA time zone of the schedule, default UTC"},
        "every": {"type": "string", "description": "an interval instead of a schedule, e.g. \"15m\""},
        "prompt": {"type": "string", "description": "the text of the agent turn to start"},
        "workflow": {"type": "string", "description": "a workflow file to run instead of a turn"},
        "args": {"type": "object", "description": "workflow arguments"},
        "session": {"type": "string"},
        "deliver": {"type": "string", "description": "channel:<name>:<dm|group>:<chat id>, or omit"},
        "missed": {"type": "string", "enum": ["skip", "run_once"]}
    }})
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CronOp {
    Add,
    List,
    Remove,
}

impl CronOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::List => "list",
            Self::Remove => "remove",
        }
    }
}

/// `cron` arguments (parsed strictly; an unknown field such as `user` is refused).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CronArgs {
    pub op: CronOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<Missed>,
}

impl CronArgs {
    /// The job an `add` describes.
    fn job(&self, name: &str) -> CronJob {
        CronJob {
            name: name.to_string(),
            schedule: self.schedule.clone(),
            every: self.every.clone(),
            timezone: self.timezone.clone(),
            prompt: self.prompt.clone(),
            workflow: self.workflow.clone(),
            args: self.args.clone(),
            session: self.session.clone(),
            deliver: self.deliver.clone(),
            missed: self.missed.unwrap_or_default(),
            user: None,
        }
    }

    /// Fields that only `add` takes.
    fn has_job_fields(&self) -> bool {
        self.schedule.is_some()
            || self.timezone.is_some()
            || self.every.is_some()
            || self.prompt.is_some()
            || self.workflow.is_some()
            || self.args.is_some()
            || self.session.is_some()
            || self.deliver.is_some()
            || self.missed.is_some()
    }
}

/// Where the jobs live (the gateway's automation store). Errors are sentences for the model
/// or the operator.
pub trait CronJobs: Send + Sync + std::fmt::Debug {
    /// Checks a job as it would be added (schedule, time zone, target, `deliver`, name free).
    fn check(&self, job: &CronJob) -> Result<(), String>;
    /// The user a job runs as; `None` when there is no such job.
    fn job_user(&self, name: &str) -> Result<Option<String>, String>;
    /// Adds a job that runs as `user`; `created_by` says who added it. Returns a summary.
    fn add(&self, job: &CronJob, user: &str, created_by: &str) -> Result<Value, String>;
    /// The jobs that run as `user`.
    fn list(&self, user: &str) -> Result<Value, String>;
    /// Removes a job (one from chitin.toml cannot be removed this way).
    fn remove(&self, name: &str) -> Result<(), String>;
}

/// A `cron.manage` request, as the `cron` tool and `chitin cron` make it.
#[derive(Debug, Clone)]
pub struct ManageRequest<'a> {
    /// The user asking (`Chitin::User::"<principal>"`).
    pub principal: &'a str,
    /// `model` (the tool) or `user` (the command line).
    pub origin: &'a str,
    pub op: &'a str,
    /// The session of the model's call (`""` from the command line).
    pub session: &'a str,
    pub tainted: bool,
    /// The job's name (`*` for a list).
    pub job: &'a str,
    /// The user the job runs as.
    pub job_user: &'a str,
    /// The job being added.
    pub add: Option<&'a CronJob>,
}

impl ManageRequest<'_> {
    /// The Cedar request (`approved` is set by the gate).
    pub fn to_policy(&self) -> Result<PolicyRequest, String> {
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| format!("invalid entity: {e}"))
        };
        let (target, schedule, deliver) = match self.add {
            Some(j) => (
                match j.target()? {
                    Target::Prompt(_) => "prompt",
                    Target::Workflow { .. } => "workflow",
                },
                j.parsed_schedule()?.describe(),
                j.deliver.clone().unwrap_or_default(),
            ),
            None => ("", String::new(), String::new()),
        };
        let mut context = Map::new();
        context.insert("origin".into(), json!(self.origin));
        context.insert("op".into(), json!(self.op));
        context.insert("session".into(), json!(self.session));
        context.insert("tainted".into(), json!(self.tainted));
        context.insert(
            "job_user".into(),
            json!({"__entity": {"type": "Chitin::User", "id": self.job_user}}),
        );
        context.insert("target".into(), json!(target));
        context.insert("schedule".into(), json!(schedule));
        context.insert("deliver".into(), json!(deliver));
        Ok(PolicyRequest {
            principal: uid(format!("Chitin::User::{}", q(self.principal)))?,
            action: Action::CronManage.uid(),
            resource: uid(format!("Chitin::CronJob::{}", q(self.job)))?,
            context,
        })
    }
}

/// Runs one `cron` call for `call.user` (the tool path of [`super::invoke::invoke`]): strict
/// parsing, then Cedar `cron.manage` bound to the normalized arguments (a granted approval of
/// exactly this call is redeemed once), then the change, audited as a tool run.
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let actor = format!("Chitin::User::{}", Value::String(call.user.clone()));
    let invalid = |message: String| InvokeError::InvalidArgs {
        tool: TOOL.into(),
        message,
    };
    let refused = |e: InvokeError| -> Result<Invoked, InvokeError> {
        super::invoke::refuse(gate, &actor, TOOL, &e, args)?;
        Err(e)
    };
    let parsed: CronArgs = match super::parse_args(args) {
        Ok(a) => a,
        Err(e) => return refused(invalid(e.to_string())),
    };
    let Some(jobs) = sandbox.cron_jobs() else {
        return refused(invalid(
            "cron jobs are kept by the gateway; this runtime has none".into(),
        ));
    };
    // What the decision is about: the job, whom it runs as, and (add) the job itself.
    let (job_name, job_user, job) = match (parsed.op, parsed.name.as_deref()) {
        (CronOp::List, None) if !parsed.has_job_fields() => {
            ("*".to_string(), call.user.clone(), None)
        }
        (CronOp::List, _) => {
            return refused(invalid("op `list` takes no other fields".into()));
        }
        (_, None) => {
            return refused(invalid(format!(
                "op `{}` needs the job's `name`",
                parsed.op.as_str()
            )));
        }
        (CronOp::Remove, Some(_)) if parsed.has_job_fields() => {
            return refused(invalid("op `remove` takes only `name`".into()));
        }
        (CronOp::Remove, Some(n)) => match jobs.job_user(n) {
            Ok(Some(u)) => (n.to_string(), u, None),
            Ok(None) => {
                return refused(invalid(format!(
                    "no cron job named `{}`",
                    n.escape_default()
                )));
            }
            Err(e) => return Err(ToolError::InvalidArgs(e).into()),
        },
        (CronOp::Add, Some(n)) => {
            let job = parsed.job(n);
            if let Err(e) = jobs.check(&job) {
                return refused(invalid(e));
            }
            (n.to_string(), call.user.clone(), Some(job))
        }
    };
    let origin = match call.origin {
        crate::gate::Origin::Model => "model",
        crate::gate::Origin::User => "user",
        crate::gate::Origin::Automation => "automation",
    };
    let req = match (ManageRequest {
        principal: &call.user,
        origin,
        op: parsed.op.as_str(),
        session: &call.session,
        tainted: call.tainted,
        job: &job_name,
        job_user: &job_user,
        add: job.as_ref(),
    })
    .to_policy()
    {
        Ok(r) => r,
        Err(e) => return refused(invalid(e)),
    };
    let norm = serde_json::to_value(&parsed).map_err(|e| invalid(e.to_string()))?;
    let mut verdict = gate.check_call(&req, &norm, None)?;
    let mut redeemed_id = None;
    if let (Verdict::ApprovalRequired { request_digest, .. }, Some(ap)) = (&verdict, approvals) {
        match ap.redeem(request_digest) {
            Ok(redeemed) => {
                redeemed_id = Some(redeemed.approval().id.clone());
                verdict = gate.check_call(&req, &norm, Some(redeemed.proof()))?;
            }
            Err(ApprovalError::NotApproved) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (auth, decision) = match verdict {
        Verdict::Allowed(auth, decision) => (auth, decision),
        Verdict::Denied(d) => return Ok(Invoked::Denied(d)),
        Verdict::ApprovalRequired {
            decision,
            request_digest,
            ..
        } => {
            return Ok(Invoked::ApprovalRequired {
                decision,
                request_digest,
                args: norm,
            });
        }
    };
    // The change runs only for exactly what was decided.
    if auth.action() != Action::CronManage || !auth.covers_args(&norm) {
        return Err(ToolError::InvalidArgs(
            "cron: the authorization does not cover this call".into(),
        )
        .into());
    }
    let started = std::time::Instant::now();
    let created_by = format!("agent:{}", call.session);
    let done = match (parsed.op, &job) {
        (CronOp::Add, Some(j)) => jobs
            .add(j, &call.user, &created_by)
            .map(|v| json!({"added": v})),
        (CronOp::Remove, _) => jobs
            .remove(&job_name)
            .map(|()| json!({"removed": job_name})),
        _ => jobs.list(&call.user).map(|v| json!({"jobs": v})),
    };
    let mut argv = vec![TOOL.to_string(), parsed.op.as_str().to_string()];
    if parsed.op != CronOp::List {
        argv.push(job_name.clone());
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut input = RecordInput::tool_run(
        &actor,
        TOOL,
        &ToolRun {
            argv,
            limits: json!({}),
            exit_code: Some(i32::from(done.is_err())),
            duration_ms,
            ..ToolRun::default()
        },
    );
    if let Err(e) = &done {
        input = input.with_outcome(format!("error: {}", gate.redact(e)));
    }
    let audited = gate.audit().append(input);
    let output = match (done, audited) {
        (Ok(v), Ok(_)) => v,
        (Ok(v), Err(e)) => {
            return Err(InvokeError::RanUnaudited {
                tool: TOOL.into(),
                audit: e.to_string(),
                result: Box::new(result(v, duration_ms)),
                decision: Box::new(decision),
            });
        }
        (Err(_), Err(e)) => return Err(InvokeError::Audit(e.to_string())),
        (Err(e), Ok(_)) => return Err(ToolError::InvalidArgs(format!("cron: {e}")).into()),
    };
    let mut r = result(output, duration_ms);
    r.redact_with(|s| gate.redact(s));
    Ok(Invoked::Ran {
        result: r,
        decision,
        approval: redeemed_id,
    })
}

fn result(output: Value, duration_ms: u64) -> ToolResult {
    ToolResult {
        exit_code: Some(0),
        signal: None,
        killed: None,
        stdout: String::new(),
        stderr: String::new(),
        truncated: false,
        duration_ms,
        output: Some(output),
    }
}
