//! The workflow runner: executes Lobster workflow files (`crate::workflows`) with every step
//! as a gated tool call, pauses at approval and input gates, and resumes only with a valid,
//! single-use, expiring resume token from an authenticated principal.
//!
//! Invariants:
//! - A run starts only after Cedar allows `workflow.run` on `Chitin::Workflow::"<name>"` (the
//!   entity built from the bytes read, with their SHA-256); each sub-workflow is decided again.
//! - Every step with an effect goes through the gate: `run` and `exec` stages as the `exec`
//!   tool (`tools::invoke_step`: strict arguments, Cedar, sandbox, audit, redaction),
//!   `chitin.invoke` as the tool it names, `llm.invoke` as `model.call` (with the user's budget)
//!   and counted against `cost_limit`. They are decided with `origin = "automation"`, the
//!   run's owner as principal, and `workflow`, `workflow_digest` and `step` in the context. A
//!   denial fails the step with the policy ids; an approval the policy asks for pauses the run.
//! - Commands get the sandbox's minimal environment plus the workflow's declared `env` and
//!   `LOBSTER_ARG_*` / `LOBSTER_ARGS_JSON`; never the gateway's environment. Values are
//!   substituted as single quoted words (`crate::workflows::template`), and a pipeline never
//!   reads a substituted value as a flag or as shell text (`exec --shell` with one is refused).
//! - Runs, step results and pauses live in `state.db` (sealed with the owner's key); a pause is
//!   claimed once; a resume re-hashes the workflow file and refuses if it changed; the approver
//!   is the authenticated principal, decided by Cedar `approval.grant`, with
//!   `required_approver` / `require_different_approver` enforced by the approval itself.
//! - A step that was running when its process died is `interrupted`: re-run only when the step
//!   has `retry`, otherwise it fails (and `on_error` applies).
//!
//! API for the rest of the gateway (cron, webhooks, the agent's `workflow` tool, the CLI):
//! [`Runner::start`], [`Runner::resume`], [`Runner::recover`], [`Runner::tick`],
//! [`Runner::list`], [`Runner::show`], [`Runner::envelope_of`].

mod engine;
pub mod pipeline;
pub mod schema;
pub mod store;
pub mod token;
pub mod tool;

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::agent::{Sealer, Transcripts};
use crate::approvals::{Approval, ApprovalError, ApprovalRef, Approvals};
use crate::clock::Clock;
use crate::config::agent::BudgetsConfig;
use crate::gate::{Gate, Origin, Verdict};
use crate::policy::{Action, PolicyRequest};
use crate::providers::Router;
use crate::providers::retry::Sleeper;
use crate::store::Store;
use crate::tools::Sandbox;
use crate::workflows::envelope::{self, ErrorKind, Status};
use crate::workflows::format::MAX_FILE_BYTES;
use crate::workflows::{Args, StepKind, Workflow};
pub use store::{PauseRow, RunRow, RunStore, RunStoreError, StepRow};
pub use token::{Claims, TOKEN_KEY_SECRET, TokenError, TokenKey};

/// Deepest chain of sub-workflows.
pub const MAX_DEPTH: usize = 8;

/// What the runner runs on.
pub struct RunnerParts {
    pub gate: Gate,
    pub store: Arc<Store>,
    /// The tool sandbox (tool secrets attached as for the agent).
    pub sandbox: Sandbox,
    /// The agent workspace (commands run there; workflow files are read from it).
    pub workspace: PathBuf,
    /// `[workflows] library`: more directories workflow files may be read from.
    pub library: Vec<PathBuf>,
    /// The model for `llm.invoke` (`None`: such stages fail, saying so).
    pub router: Option<Arc<Router>>,
    pub sealer: Arc<dyn Sealer>,
    pub clock: Arc<dyn Clock>,
    /// Waits between retries and `for_each` batches.
    pub sleeper: Arc<dyn Sleeper>,
    /// The resume tokens' MAC key.
    pub token_key: TokenKey,
    /// How long a pause (its token and approval) stays valid.
    pub token_ttl_ms: i64,
    /// The daily budgets `llm.invoke` counts against.
    pub budgets: BudgetsConfig,
    /// Largest number of steps one run executes.
    pub max_steps: u64,
    /// Told about approvals the runner opens (the gateway shows them in chats and on the web
    /// page; `None`: nobody is told).
    pub events: Option<Arc<dyn Fn(RunnerEvent) + Send + Sync>>,
}

/// Something other parts of the gateway may want to show.
#[derive(Debug, Clone)]
pub enum RunnerEvent {
    /// A run paused for an approval (a gate, a step's call, or the run itself).
    ApprovalRequested {
        user: String,
        session: String,
        run_id: String,
        /// The run's origin (`model`: the agent's tool call waits for it and says so itself).
        origin: String,
        approval: Box<Approval>,
    },
}

/// Starting a run: what the gateway (cron, webhooks), the agent's tool and the CLI call.
#[derive(Debug, Clone)]
pub struct StartRequest {
    /// The workflow file: relative to the workspace (then the library directories), or an
    /// absolute path inside one of them. With `Origin::User` (the operator's CLI) any absolute
    /// path is accepted (the directory it is in bounds its sub-workflows).
    pub file: String,
    /// `--args-json`: an object, or `None`.
    pub args: Option<Value>,
    /// The authenticated principal the run is for (`Chitin::User::"<principal>"`): every
    /// step is decided for them.
    pub principal: String,
    /// `User` (CLI, API), `Model` (the agent's `workflow` tool), `Automation` (cron,
    /// webhooks). Steps are always decided as `automation`.
    pub origin: Origin,
    /// The session the run belongs to (a chat session: its approvals are posted there);
    /// `None`: `workflow:<run id>`.
    pub session: Option<String>,
    /// The run starts from untrusted input (a webhook body, a tainted session): every step is
    /// decided with `tainted = true`.
    pub tainted: bool,
}

/// How a pause is named when resuming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeKey {
    /// The `resumeToken` of the envelope.
    Token(String),
    /// The `approvalId` (or a pause id from `chitin workflow show`).
    Id(String),
}

/// What the resumer wants.
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// `--approve yes|no`: the principal grants or denies the approval (Cedar
    /// `approval.grant`), and the run continues or is cancelled.
    Approve(bool),
    /// `--response-json`: the answer to an input gate.
    Respond(Value),
    /// `--cancel`.
    Cancel,
    /// Continue after the approval was decided elsewhere (web page, chat, `chitin approvals`):
    /// granted continues, denied cancels, pending changes nothing.
    Continue,
}

impl Intent {
    fn as_str(&self) -> &'static str {
        match self {
            Intent::Approve(true) => "approve",
            Intent::Approve(false) => "deny",
            Intent::Respond(_) => "respond",
            Intent::Cancel => "cancel",
            Intent::Continue => "continue",
        }
    }
}

/// Resuming a paused run.
#[derive(Debug, Clone)]
pub struct ResumeRequest {
    pub key: ResumeKey,
    pub intent: Intent,
    /// Who resumes (the CLI operator, the web page's user, a paired chat identity's user).
    pub principal: String,
    /// `Model`: the agent's tool; it can continue a run a person approved, never approve one.
    pub origin: Origin,
}

/// Lobster's tool envelope, with the run it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// `{"protocolVersion":1,"ok":...,...}` exactly as Lobster prints it.
    pub value: Value,
    /// The run, when one was created.
    pub run_id: Option<String>,
    /// The approval a paused run waits for.
    pub approval_id: Option<String>,
}

impl Envelope {
    fn error(kind: ErrorKind, message: &str, run_id: Option<String>) -> Self {
        Self {
            value: envelope::failure(kind, message),
            run_id,
            approval_id: None,
        }
    }

    /// `ok`, `needs_approval`, `needs_input`, `cancelled`, or `error`.
    pub fn status(&self) -> &str {
        if self.value["ok"] == json!(false) {
            return "error";
        }
        self.value["status"].as_str().unwrap_or("error")
    }

    /// The process exit code Lobster uses: 0, 1 (runtime error) or 2 (parse error).
    pub fn exit_code(&self) -> u8 {
        match self.value["error"]["type"].as_str() {
            Some("parse_error") => 2,
            Some(_) => 1,
            None => 0,
        }
    }
}

/// A failure before or outside a run's steps.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    fn parse(m: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Parse,
            message: m.to_string(),
        }
    }
    fn runtime(m: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Runtime,
            message: m.to_string(),
        }
    }
}

impl From<RunStoreError> for Failure {
    fn from(e: RunStoreError) -> Self {
        Self::runtime(e)
    }
}

impl From<ApprovalError> for Failure {
    fn from(e: ApprovalError) -> Self {
        Self::runtime(e)
    }
}

/// Where a workflow file was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Workspace,
    Library,
    /// An absolute path the operator named on the command line.
    Operator,
}

/// A workflow file: read beneath `root` at `rel` (through `wsfs`: no symlink followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub root: PathBuf,
    pub rel: PathBuf,
    pub place: Place,
}

impl Located {
    /// `root/rel`, for messages and the Workflow entity's `path`.
    pub fn shown(&self) -> String {
        self.root.join(&self.rel).display().to_string()
    }
}

/// A file as read.
pub(crate) struct Read {
    text: String,
    sha: String,
    changed_ms: i64,
}

/// One run in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: String,
    pub name: String,
    pub file: String,
    pub owner: String,
    pub origin: String,
    pub status: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub cost_usd: f64,
}

impl RunSummary {
    pub fn to_json(&self) -> Value {
        json!({"id": self.id, "name": self.name, "file": self.file, "owner": self.owner,
               "origin": self.origin, "status": self.status,
               "created_at": crate::clock::rfc3339(self.created_ms),
               "updated_at": crate::clock::rfc3339(self.updated_ms), "cost_usd": self.cost_usd})
    }
}

fn summary_of(r: &RunRow) -> RunSummary {
    RunSummary {
        id: r.id.clone(),
        name: r.name.clone(),
        file: Path::new(&r.file_root)
            .join(&r.file_rel)
            .display()
            .to_string(),
        owner: r.owner.clone(),
        origin: r.origin.clone(),
        status: r.status.clone(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        cost_usd: r.cost_usd,
    }
}

pub(crate) struct Inner {
    p: RunnerParts,
    runs: RunStore,
    transcripts: Transcripts,
    approvals: Approvals,
    /// This process (pid and start time): the runner of the runs it adopts.
    me: (i64, i64),
}

/// The workflow runner (cheap to clone).
#[derive(Clone)]
pub struct Runner(Arc<Inner>);

pub(crate) fn hex(b: &[u8]) -> String {
    chitin_audit::to_hex(b)
}

pub(crate) fn sha256_hex(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn random_hex<const N: usize>() -> Result<String, Failure> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Failure::runtime(format!("no randomness: {e}")))?;
    Ok(hex(&b))
}

pub(crate) fn origin_str(o: Origin) -> &'static str {
    match o {
        Origin::User => "user",
        Origin::Model => "model",
        Origin::Automation => "automation",
    }
}

fn origin_of(s: &str) -> Origin {
    match s {
        "user" => Origin::User,
        "model" => Origin::Model,
        _ => Origin::Automation,
    }
}

/// The start time of process `pid` (clock ticks since boot, from `/proc/<pid>/stat`), which
/// with the pid names one process for good (a reused pid has another start time).
pub fn process_start(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22, counted after the command name (which may contain spaces and parentheses).
    let after = stat.rsplit_once(')')?.1;
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process that recorded `(pid, start)` is still running.
fn alive(pid: Option<i64>, start: Option<i64>) -> bool {
    match (pid.and_then(|p| u32::try_from(p).ok()), start) {
        (Some(p), Some(s)) => process_start(p) == Some(s),
        _ => false,
    }
}

/// Whether `run` (status `running`) was left by a runner that stopped. SQLite (`shared`
/// false: one machine): its process is gone. PostgreSQL: a gateway replica's run when that
/// replica is neither this one nor `live`; a run of a process that is no replica (`chitin
/// workflow run`) only on its own machine, when its process is gone there.
fn abandoned(
    run: &RunRow,
    shared: bool,
    me_replica: Option<&str>,
    me_host: &str,
    live: &std::collections::HashSet<String>,
) -> bool {
    if shared {
        if let Some(r) = &run.runner_replica {
            return Some(r.as_str()) != me_replica && !live.contains(r);
        }
        if run.runner_host.as_deref().is_some_and(|h| h != me_host) {
            return false;
        }
    }
    !alive(run.runner_pid, run.runner_start)
}

/// The canonical JSON digest of a run's arguments (`sha256:<hex>`).
fn args_digest(args: &Value) -> String {
    let mut s = String::new();
    crate::gate::canonical_json(args, &mut s);
    format!("sha256:{}", sha256_hex(s.as_bytes()))
}

/// Normalizes a relative path lexically; `None` when it leaves its base (`..` too far), is
/// absolute or empty.
fn clean_rel(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

impl Runner {
    /// A runner over `parts`.
    pub fn new(parts: RunnerParts) -> Self {
        let pid = i64::from(std::process::id());
        let start = process_start(std::process::id()).unwrap_or(0);
        let approvals = Approvals::new(
            Arc::clone(&parts.store),
            parts.gate.clone(),
            Arc::clone(&parts.clock),
            parts.token_ttl_ms,
        );
        Self(Arc::new(Inner {
            runs: RunStore::new(Arc::clone(&parts.store), Arc::clone(&parts.sealer)),
            transcripts: Transcripts::new(Arc::clone(&parts.store), Arc::clone(&parts.sealer)),
            approvals,
            me: (pid, start),
            p: parts,
        }))
    }

    fn now(&self) -> i64 {
        self.0.p.clock.now_ms()
    }

    /// The approval workflow the runner opens approvals with (its TTL is the pause TTL).
    pub fn approvals(&self) -> &Approvals {
        &self.0.approvals
    }

    /// Records `id` (this gateway's `cluster::Replica`) as the runner of the runs this
    /// process starts or takes over, so that other replicas leave them while it is live.
    pub fn set_replica(&self, id: &str) {
        self.0.runs.set_replica(id);
    }

    /// The run store.
    pub fn runs(&self) -> &RunStore {
        &self.0.runs
    }

    /// A record of the run's life in the audit log (`kind` system): who, which run, what
    /// happened; never step output or arguments. Best effort: the steps' own decisions and
    /// tool runs are recorded (fail closed) by the gate.
    fn audit(&self, actor: &str, action: &str, run: &str, outcome: &str, payload: Value) {
        let actor = if actor.starts_with("Chitin::") {
            actor.to_string()
        } else {
            format!("Chitin::User::{}", Value::String(actor.to_string()))
        };
        let r = self.0.p.gate.audit().append(
            chitin_audit::RecordInput::new(
                chitin_audit::Kind::System,
                actor,
                action,
                format!("workflow_run:{run}"),
            )
            .with_outcome(outcome)
            .with_payload(payload),
        );
        if let Err(e) = r {
            tracing::error!(run, action, error = %e, "workflow audit record could not be written");
        }
    }

    fn notify(&self, e: RunnerEvent) {
        if let Some(f) = &self.0.p.events {
            f(e);
        }
    }

    // ---- files --------------------------------------------------------------------------

    fn workspace_root(&self) -> PathBuf {
        crate::wsfs::canonical_root(&self.0.p.workspace)
            .unwrap_or_else(|_| self.0.p.workspace.clone())
    }

    fn library_roots(&self) -> Vec<PathBuf> {
        self.0
            .p
            .library
            .iter()
            .map(|d| crate::wsfs::canonical_root(d).unwrap_or_else(|_| d.clone()))
            .collect()
    }

    /// Where `file` is (see [`StartRequest::file`]).
    pub fn locate(&self, file: &str, origin: Origin) -> Result<Located, String> {
        if file.is_empty() || file.contains('\0') {
            return Err("the workflow file name is empty or contains NUL".into());
        }
        if crate::workflows::FileFormat::from_path(Path::new(file)).is_none() {
            return Err(format!(
                "{file}: not a workflow file; name it *.lobster, *.yaml, *.yml or *.json"
            ));
        }
        let ws = self.workspace_root();
        let libs = self.library_roots();
        let p = Path::new(file);
        if p.is_absolute() {
            let abs = crate::policy::normalize(p).ok_or("not an absolute path")?;
            if let Ok(rel) = abs.strip_prefix(&ws)
                && let Some(rel) = clean_rel(rel)
            {
                return Ok(Located {
                    root: ws,
                    rel,
                    place: Place::Workspace,
                });
            }
            for lib in &libs {
                if let Ok(rel) = abs.strip_prefix(lib)
                    && let Some(rel) = clean_rel(rel)
                {
                    return Ok(Located {
                        root: lib.clone(),
                        rel,
                        place: Place::Library,
                    });
                }
            }
            if origin == Origin::User
                && let (Some(parent), Some(name)) = (abs.parent(), abs.file_name())
            {
                return Ok(Located {
                    root: parent.to_path_buf(),
                    rel: PathBuf::from(name),
                    place: Place::Operator,
                });
            }
            return Err(format!(
                "{file}: a workflow file must be in the agent workspace or a [workflows] library directory"
            ));
        }
        let rel = clean_rel(p).ok_or_else(|| {
            format!("{file}: the path leaves the workspace (`..`); name a file inside it")
        })?;
        let found = |root: &Path| {
            crate::wsfs::WsDir::root(root)
                .and_then(|d| d.read_capped(&rel, 0))
                .is_ok()
        };
        if found(&ws) || libs.is_empty() {
            return Ok(Located {
                root: ws,
                rel,
                place: Place::Workspace,
            });
        }
        for lib in libs {
            if found(&lib) {
                return Ok(Located {
                    root: lib,
                    rel,
                    place: Place::Library,
                });
            }
        }
        Ok(Located {
            root: ws,
            rel,
            place: Place::Workspace,
        })
    }

    /// Reads a located file: a regular file with one link, no symlink on the way, at most
    /// [`MAX_FILE_BYTES`], UTF-8.
    fn read(&self, loc: &Located) -> Result<Read, Failure> {
        let shown = loc.shown();
        let dir = crate::wsfs::WsDir::root(&loc.root)
            .map_err(|e| Failure::runtime(format!("cannot read workflow {shown}: {e}")))?;
        let c = dir
            .read_capped(&loc.rel, MAX_FILE_BYTES as u64 + 1)
            .map_err(|e| Failure::runtime(format!("cannot read workflow {shown}: {e}")))?;
        if c.bytes.len() > MAX_FILE_BYTES {
            return Err(Failure::parse(format!(
                "{shown}: the file is larger than {MAX_FILE_BYTES} bytes; a workflow file is small"
            )));
        }
        let sha = sha256_hex(&c.bytes);
        let text = String::from_utf8(c.bytes)
            .map_err(|_| Failure::parse(format!("{shown}: the file is not UTF-8 text")))?;
        Ok(Read {
            text,
            sha,
            changed_ms: c.changed_ms,
        })
    }

    fn parse(&self, loc: &Located, read: &Read) -> Result<Workflow, Failure> {
        let name = loc.rel.display().to_string();
        let shown = if loc.place == Place::Operator {
            loc.shown()
        } else {
            name
        };
        Workflow::parse(&read.text, &shown).map_err(Failure::parse)
    }

    /// The Workflow entity's id: the file's `name:`, else its file name without extension.
    fn wf_name(wf: &Workflow, loc: &Located) -> String {
        wf.name.clone().unwrap_or_else(|| {
            loc.rel
                .file_stem()
                .map_or_else(|| "workflow".into(), |s| s.to_string_lossy().into_owned())
        })
    }

    // ---- decisions ----------------------------------------------------------------------

    /// `written_in_session`: the file lies in the workspace and changed (ctime) after the
    /// session began (2 s of slack for coarse file-system timestamps). The session's start
    /// comes from the transcripts (its first turn); a session without turns began now.
    fn written_in_session(&self, loc: &Located, read: &Read, session: &str) -> bool {
        if loc.place != Place::Workspace {
            return false;
        }
        let began = self
            .0
            .transcripts
            .session(session)
            .map_or_else(|_| self.now(), |s| s.created_ms);
        read.changed_ms >= began.saturating_sub(2_000)
    }

    /// The `workflow.run` / `workflow.resume` request and the Workflow entity.
    #[allow(
        clippy::too_many_arguments,
        reason = "one request's parts, each named at the call"
    )]
    fn wf_request(
        &self,
        action: Action,
        principal: &str,
        name: &str,
        loc: &Located,
        sha: &str,
        mut ctx: Map<String, Value>,
    ) -> Result<(PolicyRequest, Vec<Value>), Failure> {
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| Failure::runtime(format!("invalid entity id: {e}")))
        };
        ctx.insert("approved".into(), json!(false));
        ctx.insert("in_workspace".into(), json!(loc.place == Place::Workspace));
        ctx.insert("in_library".into(), json!(loc.place == Place::Library));
        let req = PolicyRequest::new(
            uid(format!("Chitin::User::{}", q(principal)))?,
            action,
            uid(format!("Chitin::Workflow::{}", q(name)))?,
            ctx,
        );
        let entity = json!({
            "uid": {"type": "Chitin::Workflow", "id": name},
            "attrs": {"digest": format!("sha256:{sha}"), "path": loc.shown()},
            "parents": [],
        });
        Ok((req, vec![entity]))
    }

    /// Reasons of the policies behind a decision, for a refusal message.
    fn reasons(&self, policies: &[String]) -> String {
        if policies.is_empty() {
            return "no policy permits it (deny by default)".into();
        }
        let active = self.0.p.gate.engine().active();
        policies
            .iter()
            .map(|p| {
                active
                    .compiled
                    .reason(p)
                    .map_or_else(|| p.clone(), |r| format!("{p}: {r}"))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    // ---- start --------------------------------------------------------------------------

    /// Starts a run and drives it until it ends or pauses. Never panics; every failure is an
    /// error envelope (`parse_error` for a file or arguments that cannot be understood,
    /// `runtime_error` otherwise).
    pub async fn start(&self, req: StartRequest) -> Envelope {
        match self.start_inner(req).await {
            Ok(e) => e,
            Err((f, run)) => Envelope::error(f.kind, &self.0.p.gate.redact(&f.message), run),
        }
    }

    async fn start_inner(&self, req: StartRequest) -> Result<Envelope, (Failure, Option<String>)> {
        let no_run = |f: Failure| (f, None);
        // A webhook delivery's run is started once: its session names the delivery, and a
        // second start (the next gateway starting a delivery the last one had claimed) gets
        // the first run's envelope, once that run no longer runs.
        if let Some(s) = req.session.as_deref().filter(|s| s.starts_with("hook:"))
            && let Some(run) = self
                .0
                .runs
                .run_of_session(s)
                .map_err(|e| no_run(e.into()))?
        {
            loop {
                let now = self.0.runs.run(&run.id).map_err(|e| no_run(e.into()))?;
                if now.as_ref().is_none_or(|r| r.status != "running") {
                    return Ok(self.envelope_of(&run.id));
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        let loc = self
            .locate(&req.file, req.origin)
            .map_err(|m| no_run(Failure::runtime(m)))?;
        let read = self.read(&loc).map_err(no_run)?;
        let wf = self.parse(&loc, &read).map_err(no_run)?;
        let args = Args::resolve(&wf, req.args.as_ref()).map_err(|e| no_run(Failure::parse(e)))?;
        let run_id = format!("wf_{}", random_hex::<12>().map_err(no_run)?);
        let session = req
            .session
            .clone()
            .unwrap_or_else(|| format!("workflow:{run_id}"));
        let name = Self::wf_name(&wf, &loc);
        let args_json = Value::Object(args.values().clone().into_iter().collect());
        let mut ctx = Map::new();
        ctx.insert("origin".into(), json!(origin_str(req.origin)));
        ctx.insert("session".into(), json!(session));
        ctx.insert("tainted".into(), json!(req.tainted));
        ctx.insert(
            "written_in_session".into(),
            json!(self.written_in_session(&loc, &read, &session)),
        );
        ctx.insert("sub_workflow".into(), json!(false));
        let (preq, entities) = self
            .wf_request(
                Action::WorkflowRun,
                &req.principal,
                &name,
                &loc,
                &read.sha,
                ctx,
            )
            .map_err(no_run)?;
        let verdict = self
            .0
            .p
            .gate
            .check_redeemed(&preq, &entities, None)
            .map_err(|e| no_run(Failure::runtime(e)))?;
        let now = self.now();
        let row = RunRow {
            id: run_id.clone(),
            name: name.clone(),
            file_root: loc.root.display().to_string(),
            file_rel: loc.rel.display().to_string(),
            file_sha256: read.sha.clone(),
            owner: req.principal.clone(),
            origin: origin_str(req.origin).into(),
            session: session.clone(),
            tainted: req.tainted,
            parent_run: None,
            status: "running".into(),
            args: args_json.clone(),
            args_digest: args_digest(&args_json),
            cursor: 0,
            cost_usd: 0.0,
            output: None,
            error: None,
            runner_pid: Some(self.0.me.0),
            runner_start: Some(self.0.me.1),
            runner_replica: self.0.runs.runner_ids().0,
            runner_host: Some(self.0.runs.runner_ids().1),
            created_ms: now,
            updated_ms: now,
            finished_ms: None,
        };
        match verdict {
            Verdict::Allowed(..) => {}
            Verdict::Denied(d) => {
                return Err(no_run(Failure::runtime(format!(
                    "policy denied running workflow `{name}` for {} (policies: [{}]): {}",
                    req.principal,
                    d.policies.join(", "),
                    self.reasons(&d.policies)
                ))));
            }
            Verdict::ApprovalRequired {
                decision,
                request_digest,
                ..
            } => {
                // The run itself waits for a person: a pause before its first step.
                let mut paused = row;
                paused.status = "paused".into();
                self.0
                    .runs
                    .create_run(&paused)
                    .map_err(|e| no_run(e.into()))?;
                let shown = json!({
                    "workflow": name, "file": loc.shown(), "file_sha256": format!("sha256:{}", read.sha),
                    "run": run_id, "args": args_json, "origin": origin_str(req.origin), "session": session,
                    "prompt": format!("Run workflow `{name}` ({})? {}", loc.shown(), self.reasons(&decision.policies)),
                });
                let approval = self
                    .open_approval(&paused, "workflow", &shown, request_digest, None)
                    .map_err(|f| (f, Some(run_id.clone())))?;
                let prompt = shown["prompt"].as_str().unwrap_or_default().to_string();
                let request = json!({"type": "approval_request", "prompt": prompt,
                                     "items": [shown.clone()], "initiatedBy": req.principal});
                let mut nonce = [0u8; 16];
                getrandom::fill(&mut nonce)
                    .map_err(|e| (Failure::runtime(format!("no randomness: {e}")), None))?;
                let env = self
                    .pause(
                        &paused,
                        "(start)",
                        "run",
                        request,
                        Some(&approval),
                        None,
                        nonce,
                    )
                    .map_err(|f| (f, Some(run_id.clone())))?;
                return Ok(env);
            }
        }
        self.0
            .runs
            .create_run(&row)
            .map_err(|e| (e.into(), Some(run_id.clone())))?;
        self.audit(
            &req.principal,
            "workflow.start",
            &run_id,
            "running",
            json!({"workflow": name, "file": loc.shown(), "digest": format!("sha256:{}", read.sha),
                   "origin": origin_str(req.origin), "session": session}),
        );
        Ok(self.drive_run(row, loc, read, wf, 0, None).await)
    }

    // ---- pauses -------------------------------------------------------------------------

    /// Opens an approval of the run (tool `workflow` or the step's tool) and tells listeners.
    fn open_approval(
        &self,
        run: &RunRow,
        tool: &str,
        args: &Value,
        digest: [u8; 32],
        limits: Option<&crate::approvals::Constraints>,
    ) -> Result<Approval, Failure> {
        let a = match self.0.approvals.open_for(&digest)? {
            Some(a) => a,
            None => self.0.approvals.request_constrained(
                &run.owner,
                &run.session,
                tool,
                args,
                digest,
                limits.unwrap_or(&crate::approvals::Constraints::default()),
            )?,
        };
        self.notify(RunnerEvent::ApprovalRequested {
            user: run.owner.clone(),
            session: run.session.clone(),
            run_id: run.id.clone(),
            origin: run.origin.clone(),
            approval: Box::new(a.clone()),
        });
        Ok(a)
    }

    /// Records a pause of `run` at `step` and returns its envelope. `request` is what the
    /// envelope's `requiresApproval` / `requiresInput` shows (without the token);
    /// `pause_id`: the id to use (default: the approval's id, else a random one).
    #[allow(
        clippy::too_many_arguments,
        reason = "one pause's parts, each named at the call"
    )]
    fn pause(
        &self,
        run: &RunRow,
        step: &str,
        kind: &str,
        request: Value,
        approval: Option<&Approval>,
        pause_id: Option<String>,
        nonce: [u8; 16],
    ) -> Result<Envelope, Failure> {
        let now = self.now();
        let id = match (pause_id, approval) {
            (Some(id), _) => id,
            (None, Some(a)) => a.id.clone(),
            (None, None) => random_hex::<16>()?,
        };
        let p = PauseRow {
            id,
            run_id: run.id.clone(),
            step: step.to_string(),
            kind: kind.to_string(),
            nonce: nonce.to_vec(),
            approval_id: approval.map(|a| a.id.clone()),
            request,
            status: "pending".into(),
            created_ms: now,
            expires_ms: now.saturating_add(self.0.p.token_ttl_ms),
            used_ms: None,
            used_by: None,
        };
        self.0.runs.save_pause(run, &p, now)?;
        self.audit(
            &run.owner,
            "workflow.pause",
            &run.id,
            kind,
            json!({"step": step, "approval": p.approval_id, "pause": p.id,
                   "expires_at": crate::clock::rfc3339(p.expires_ms)}),
        );
        Ok(self.paused_envelope(run, &p))
    }

    /// The token of a pause (deterministic: the same claims give the same token).
    fn token_of(&self, run: &RunRow, p: &PauseRow) -> String {
        self.0.p.token_key.mint(&Claims {
            v: 1,
            run: run.id.clone(),
            pause: p.id.clone(),
            step: p.step.clone(),
            file: format!("sha256:{}", run.file_sha256),
            args: run.args_digest.clone(),
            nonce: hex(&p.nonce),
            exp: p.expires_ms,
        })
    }

    /// The envelope of a run paused at `p`.
    fn paused_envelope(&self, run: &RunRow, p: &PauseRow) -> Envelope {
        let token = self.token_of(run, p);
        let mut req = p.request.clone();
        if let Value::Object(m) = &mut req {
            m.insert("resumeToken".into(), json!(token));
            if let Some(a) = &p.approval_id {
                m.insert("approvalId".into(), json!(a));
            }
        }
        let (status, approval, input) = if p.kind == "input" {
            (Status::NeedsInput, None, Some(req))
        } else {
            (Status::NeedsApproval, Some(req), None)
        };
        let output = match (&approval, p.kind.as_str()) {
            (Some(r), "approval") => r["items"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        Envelope {
            value: envelope::success(status, output, approval, input),
            run_id: Some(run.id.clone()),
            approval_id: p.approval_id.clone(),
        }
    }

    // ---- resume -------------------------------------------------------------------------

    /// Resumes a paused run (see [`Intent`]) and drives it on. Every refusal is an error
    /// envelope saying why (malformed, modified or expired token, a pause already used, a
    /// changed workflow file, an approver the approval does not accept, a policy denial).
    pub async fn resume(&self, req: ResumeRequest) -> Envelope {
        let (who, intent) = (req.principal.clone(), req.intent.as_str());
        let by = match &req.key {
            ResumeKey::Token(_) => "token",
            ResumeKey::Id(_) => "id",
        };
        match self.resume_inner(req).await {
            Ok(e) => {
                if let Some(run) = &e.run_id {
                    self.audit(
                        &who,
                        "workflow.resume",
                        run,
                        e.status(),
                        json!({"intent": intent, "by": by}),
                    );
                }
                e
            }
            Err((f, run)) => {
                let m = self.0.p.gate.redact(&f.message);
                self.audit(
                    &who,
                    "workflow.resume",
                    run.as_deref().unwrap_or("unknown"),
                    &format!("refused: {m}"),
                    json!({"intent": intent, "by": by}),
                );
                Envelope::error(f.kind, &m, run)
            }
        }
    }

    fn find_pause(&self, key: &ResumeKey) -> Result<PauseRow, Failure> {
        let now = self.now();
        match key {
            ResumeKey::Token(t) => {
                let c = self
                    .0
                    .p
                    .token_key
                    .verify(t, now)
                    .map_err(Failure::runtime)?;
                let p = self.0.runs.pause(&c.pause)?.ok_or_else(|| {
                    Failure::runtime("the resume token names a pause this gateway does not have")
                })?;
                let run = self.0.runs.run(&p.run_id)?.ok_or_else(|| {
                    Failure::runtime("the resume token names a run this gateway does not have")
                })?;
                if c.run != p.run_id
                    || c.step != p.step
                    || c.nonce != hex(&p.nonce)
                    || c.file != format!("sha256:{}", run.file_sha256)
                    || c.args != run.args_digest
                    || c.exp != p.expires_ms
                {
                    return Err(Failure::runtime(
                        "the resume token does not match the paused run it names; nothing was resumed",
                    ));
                }
                Ok(p)
            }
            ResumeKey::Id(id) => {
                let id = id.trim().to_ascii_lowercase();
                if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Failure::runtime(format!(
                        "`{}` is not an approval id (32 hex digits); pass the approvalId or the resumeToken",
                        crate::approvals::visible(&id)
                    )));
                }
                self.0.runs.pause(&id)?.ok_or_else(|| {
                    Failure::runtime(format!(
                        "no paused workflow waits for approval `{id}`; `chitin workflow list` shows the runs"
                    ))
                })
            }
        }
    }

    async fn resume_inner(
        &self,
        req: ResumeRequest,
    ) -> Result<Envelope, (Failure, Option<String>)> {
        let pause = self.find_pause(&req.key).map_err(|f| (f, None))?;
        let rid = Some(pause.run_id.clone());
        let err = |f: Failure| (f, rid.clone());
        let now = self.now();
        match pause.status.as_str() {
            "pending" => {}
            "used" => {
                return Err(err(Failure::runtime(format!(
                    "this pause was already resumed{}; a resume token works once",
                    pause
                        .used_ms
                        .map(|t| format!(" at {}", crate::clock::rfc3339(t)))
                        .unwrap_or_default()
                ))));
            }
            "claimed" => {
                return Err(err(Failure::runtime(
                    "this pause is being resumed right now by another request",
                )));
            }
            _ => {
                return Err(err(Failure::runtime(
                    "this pause was cancelled (denied, expired or cancelled); nothing was resumed",
                )));
            }
        }
        if now >= pause.expires_ms {
            return Err(err(Failure::runtime(format!(
                "this pause expired at {}; nothing was resumed. Run the workflow again",
                crate::clock::rfc3339(pause.expires_ms)
            ))));
        }
        let run = self
            .0
            .runs
            .run(&pause.run_id)
            .map_err(|e| err(e.into()))?
            .ok_or_else(|| err(Failure::runtime("the paused run is gone")))?;
        // The file must be exactly the one that paused: re-read and re-hash it.
        let loc = Located {
            root: PathBuf::from(&run.file_root),
            rel: PathBuf::from(&run.file_rel),
            place: self.place_of(&run),
        };
        let read = self.read(&loc).map_err(err)?;
        if read.sha != run.file_sha256 {
            return Err(err(Failure::runtime(format!(
                "the workflow file {} changed since the run paused (sha256 {} then, {} now); nothing was resumed. Run the workflow again to use the new file",
                loc.shown(),
                run.file_sha256,
                read.sha
            ))));
        }
        let wf = self.parse(&loc, &read).map_err(err)?;
        let mut ctx = Map::new();
        ctx.insert("origin".into(), json!(origin_str(req.origin)));
        ctx.insert("session".into(), json!(run.session));
        ctx.insert("tainted".into(), json!(run.tainted));
        ctx.insert("written_in_session".into(), json!(false));
        ctx.insert("sub_workflow".into(), json!(false));
        ctx.insert(
            "owner".into(),
            json!({"__entity": {"type": "Chitin::User", "id": run.owner}}),
        );
        ctx.insert("intent".into(), json!(req.intent.as_str()));
        let (preq, entities) = self
            .wf_request(
                Action::WorkflowResume,
                &req.principal,
                &run.name,
                &loc,
                &read.sha,
                ctx,
            )
            .map_err(err)?;
        match self.0.p.gate.check_redeemed(&preq, &entities, None) {
            Ok(Verdict::Allowed(..)) => {}
            Ok(other) => {
                let d = other.decision();
                return Err(err(Failure::runtime(format!(
                    "policy denied resuming workflow `{}` for {} (policies: [{}]): {}",
                    run.name,
                    req.principal,
                    d.policies.join(", "),
                    self.reasons(&d.policies)
                ))));
            }
            Err(e) => return Err(err(Failure::runtime(e))),
        }
        let approval = match &pause.approval_id {
            Some(id) => Some(self.0.approvals.get(id).map_err(|e| err(e.into()))?),
            None => None,
        };
        // What to do, from the intent and the pause.
        enum Then {
            Go,
            Cancel(String),
            Unchanged,
        }
        let then = match (&req.intent, pause.kind.as_str()) {
            (Intent::Cancel, _) => Then::Cancel(format!("cancelled by {}", req.principal)),
            (Intent::Respond(_), "input") => Then::Go,
            (Intent::Respond(_), _) => {
                return Err(err(Failure::runtime(
                    "this run waits for an approval, not for input; resume it with --approve yes|no",
                )));
            }
            (_, "input") => {
                return Err(err(Failure::runtime(
                    "this run waits for input; resume it with --response-json '{...}' (or --cancel)",
                )));
            }
            (Intent::Approve(false), _) => Then::Cancel(format!("denied by {}", req.principal)),
            (Intent::Approve(true) | Intent::Continue, _) => {
                match approval.as_ref().map(|a| a.status.as_str()) {
                    Some("granted") => Then::Go,
                    Some("denied") => Then::Cancel(format!(
                        "denied by {}",
                        approval
                            .as_ref()
                            .and_then(|a| a.resolved_by.clone())
                            .unwrap_or_default()
                    )),
                    Some("pending")
                        if req.intent == Intent::Approve(true) && req.origin != Origin::Model =>
                    {
                        Then::Go
                    }
                    Some("pending") => Then::Unchanged,
                    Some(s) => {
                        return Err(err(Failure::runtime(format!(
                            "the approval of this pause is {s}; nothing was resumed"
                        ))));
                    }
                    None => {
                        return Err(err(Failure::runtime("this pause has no approval")));
                    }
                }
            }
        };
        if let Then::Unchanged = then {
            return Ok(self.paused_envelope(&run, &pause));
        }
        // Claim the pause first: from here no other resumer (the gateway, a second click) can.
        let claimer = format!("claim:{}:{}", self.0.me.0, self.0.me.1);
        if !self
            .0
            .runs
            .claim(&pause.id, &claimer, now)
            .map_err(|e| err(e.into()))?
        {
            return Err(err(Failure::runtime(
                "this pause was resumed or cancelled meanwhile; a resume token works once",
            )));
        }
        let pause_id = pause.id.clone();
        let release = |f: Failure| {
            let _ = self.0.runs.release(&pause_id);
            (f, rid.clone())
        };
        // The approver's decision, as an authenticated principal through Cedar's
        // `approval.grant` and the approval's own limits.
        if let (Some(a), Intent::Approve(grant)) = (&approval, &req.intent)
            && a.status == "pending"
            && let Err(e) =
                self.0
                    .approvals
                    .resolve_ref(&ApprovalRef::Id(a.id.clone()), &req.principal, *grant)
        {
            return Err(release(e.into()));
        }
        if let Then::Cancel(why) = then {
            // A cancelled run's approval is no longer asked for: deny it (as the canceller,
            // when they may; otherwise it simply expires).
            if let Some(a) = &approval
                && a.status == "pending"
                && req.intent == Intent::Cancel
            {
                let _ = self.0.approvals.resolve_ref(
                    &ApprovalRef::Id(a.id.clone()),
                    &req.principal,
                    false,
                );
            }
            return Ok(self.cancel_run(&run, &pause, &req.principal, &why));
        }
        let by = approval
            .as_ref()
            .and_then(|a| self.0.approvals.get(&a.id).ok())
            .and_then(|a| a.resolved_by)
            .unwrap_or_else(|| req.principal.clone());
        self.go_on(run, loc, read, wf, pause, approval, &req, &by)
            .await
            .map_err(release)
    }

    fn place_of(&self, run: &RunRow) -> Place {
        let root = Path::new(&run.file_root);
        if root == self.workspace_root() {
            Place::Workspace
        } else if self.library_roots().iter().any(|l| l == root) {
            Place::Library
        } else {
            Place::Operator
        }
    }

    /// Ends a claimed pause and its run as cancelled.
    fn cancel_run(&self, run: &RunRow, pause: &PauseRow, by: &str, why: &str) -> Envelope {
        let now = self.now();
        let _ = self.0.runs.close_pause(&pause.id, "cancelled", by, now);
        if let Err(e) = self
            .0
            .runs
            .set_status(run, "cancelled", None, Some(why), now)
        {
            return Envelope::error(ErrorKind::Runtime, &e.to_string(), Some(run.id.clone()));
        }
        Envelope {
            value: envelope::success(Status::Cancelled, Vec::new(), None, None),
            run_id: Some(run.id.clone()),
            approval_id: pause.approval_id.clone(),
        }
    }

    /// Continues a claimed pause: records the gate's answer, then drives the run on.
    #[allow(
        clippy::too_many_arguments,
        reason = "the resumed run's parts, each named at the call"
    )]
    async fn go_on(
        &self,
        run: RunRow,
        loc: Located,
        read: Read,
        wf: Workflow,
        pause: PauseRow,
        approval: Option<Approval>,
        req: &ResumeRequest,
        by: &str,
    ) -> Result<Envelope, Failure> {
        let now = self.now();
        // The top-level step the pause is in; `nested`: the pause is inside it (a branch, a
        // for_each item, a pipeline stage), and the step runs again, its completed parts kept.
        let idx = engine::top_index(&wf, &pause.step);
        let nested = idx.is_some_and(|i| wf.steps[i].id != pause.step);
        let mut answer: Option<(String, crate::workflows::StepResult)> = None;
        let from = match pause.kind.as_str() {
            "run" => {
                let a = approval
                    .as_ref()
                    .ok_or_else(|| Failure::runtime("the run's approval is missing"))?;
                let digest = digest_of(&a.request_digest)?;
                let redeemed = self.0.approvals.redeem(&digest)?;
                // Decided again as approved: the approval binds this exact request.
                let mut ctx = Map::new();
                ctx.insert("origin".into(), json!(run.origin));
                ctx.insert("session".into(), json!(run.session));
                ctx.insert("tainted".into(), json!(run.tainted));
                ctx.insert(
                    "written_in_session".into(),
                    json!(self.written_in_session(&loc, &read, &run.session)),
                );
                ctx.insert("sub_workflow".into(), json!(false));
                let (preq, ents) = self.wf_request(
                    Action::WorkflowRun,
                    &run.owner,
                    &run.name,
                    &loc,
                    &read.sha,
                    ctx,
                )?;
                match self
                    .0
                    .p
                    .gate
                    .check_redeemed(&preq, &ents, Some(redeemed.proof()))
                {
                    Ok(Verdict::Allowed(..)) => 0,
                    Ok(other) => {
                        return Err(Failure::runtime(format!(
                            "policy still does not allow running workflow `{}` after the approval (policies: [{}])",
                            run.name,
                            other.decision().policies.join(", ")
                        )));
                    }
                    Err(e) => return Err(Failure::runtime(e)),
                }
            }
            "policy" => idx.ok_or_else(|| Failure::runtime("the paused step is gone"))?,
            "approval" => {
                let i = idx.ok_or_else(|| Failure::runtime("the paused step is gone"))?;
                let a = approval
                    .as_ref()
                    .ok_or_else(|| Failure::runtime("the gate's approval is missing"))?;
                self.0.approvals.redeem(&digest_of(&a.request_digest)?)?;
                let mut result = self
                    .0
                    .runs
                    .steps(&run)?
                    .into_iter()
                    .find(|s| s.step == pause.step)
                    .and_then(|s| s.result)
                    .map(|v| engine::result_from_json(&v))
                    .unwrap_or_default();
                result.approved = Some(true);
                result.approved_by = Some(by.to_string());
                result.initiated_by = Some(run.owner.clone());
                answer = Some((pause.step.clone(), result));
                if nested { i } else { i + 1 }
            }
            "input" if nested => {
                let i = idx.ok_or_else(|| Failure::runtime("the paused step is gone"))?;
                let Intent::Respond(value) = &req.intent else {
                    return Err(Failure::runtime("this run waits for input"));
                };
                let mut value = value.clone();
                if let (Value::Object(m), Some(Value::Object(d))) =
                    (&mut value, pause.request.get("defaults"))
                {
                    for (k, v) in d {
                        m.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                if let Some(schema) = pause.request.get("responseSchema") {
                    schema::check(schema, &value).map_err(|e| {
                        Failure::runtime(format!(
                            "the response does not match the input's responseSchema: {e}; nothing was resumed"
                        ))
                    })?;
                }
                answer = Some((
                    pause.step.clone(),
                    crate::workflows::StepResult {
                        json: Some(value.clone()),
                        response: Some(value),
                        ..Default::default()
                    },
                ));
                i
            }
            "input" => {
                let i = idx.ok_or_else(|| Failure::runtime("the paused step is gone"))?;
                let Intent::Respond(value) = &req.intent else {
                    return Err(Failure::runtime("this run waits for input"));
                };
                let StepKind::Input(ir) = &wf.steps[i].kind else {
                    return Err(Failure::runtime("the paused step is not an input gate"));
                };
                let mut value = value.clone();
                if let (Value::Object(m), Some(Value::Object(d))) = (&mut value, &ir.defaults) {
                    for (k, v) in d {
                        m.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
                schema::check(&ir.response_schema, &value).map_err(|e| {
                    Failure::runtime(format!(
                        "the response does not match the input's responseSchema: {e}; nothing was resumed"
                    ))
                })?;
                answer = Some((
                    pause.step.clone(),
                    crate::workflows::StepResult {
                        response: Some(value),
                        ..Default::default()
                    },
                ));
                i + 1
            }
            other => return Err(Failure::runtime(format!("unknown pause kind `{other}`"))),
        };
        if let Some((step, result)) = &answer {
            self.0
                .runs
                .answer_step(&run, step, &result.to_json(step), from, now)?;
        }
        self.0.runs.close_pause(&pause.id, "used", by, now)?;
        self.0.runs.adopt(&run.id, self.0.me.0, self.0.me.1, now)?;
        let mut run = run;
        run.status = "running".into();
        Ok(self.drive_run(run, loc, read, wf, from, None).await)
    }

    // ---- the gateway's background work --------------------------------------------------

    /// Continues runs whose approval was decided elsewhere (granted: on; denied: cancelled)
    /// and cancels pauses whose time is up. Returns how many pauses it handled.
    pub async fn tick(&self) -> usize {
        let due = match self.0.runs.decided_or_expired(self.now()) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "workflow pauses could not be read");
                return 0;
            }
        };
        let mut n = 0;
        for (id, state) in due {
            let Ok(Some(p)) = self.0.runs.pause(&id) else {
                continue;
            };
            let Ok(Some(run)) = self.0.runs.run(&p.run_id) else {
                continue;
            };
            n += 1;
            if state == "expired" {
                // Claimed like any resume (the time check is the caller's here), so a resumer
                // that got in first keeps it.
                if self
                    .0
                    .runs
                    .claim(&p.id, "expiry", i64::MIN)
                    .unwrap_or(false)
                {
                    let _ = self.cancel_run(
                        &run,
                        &p,
                        "expiry",
                        "the pause expired before anyone answered",
                    );
                }
                continue;
            }
            let env = self
                .resume(ResumeRequest {
                    key: ResumeKey::Id(p.id.clone()),
                    intent: Intent::Continue,
                    principal: run.owner.clone(),
                    origin: Origin::Automation,
                })
                .await;
            tracing::info!(run = %run.id, status = env.status(), "workflow continued after its approval was decided");
        }
        n
    }

    /// Continues the runs a process that died left `running` (this process adopts them): a
    /// step that was running is `interrupted` and re-run only if it has `retry`. Claims of
    /// pauses by dead processes are given back. Returns how many runs it took over.
    pub async fn recover(&self) -> usize {
        let runs = match self.0.runs.with_status("running") {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "workflow runs could not be read");
                return 0;
            }
        };
        let shared = self.0.runs.shared();
        let (me_replica, me_host) = self.0.runs.runner_ids();
        let now = self.now();
        let stale = crate::cluster::STALE_MS;
        // On SQLite a runner is dead when its process is; on PostgreSQL a replica's run is
        // taken only once the replica stopped beating (issue #18).
        let (live, cutoff) = if shared {
            match self.0.runs.live_replicas(now, stale) {
                Ok(l) => (l, now.saturating_sub(stale)),
                Err(e) => {
                    tracing::error!(error = %e, "the live replicas could not be read");
                    return 0;
                }
            }
        } else {
            (std::collections::HashSet::new(), i64::MAX)
        };
        let mut n = 0;
        for run in runs {
            if !abandoned(&run, shared, me_replica.as_deref(), &me_host, &live) {
                continue;
            }
            let now = self.now();
            if run.parent_run.is_some() {
                // A sub-workflow's run is continued through its parent's step.
                let _ = self.0.runs.set_status(
                    &run,
                    "interrupted",
                    None,
                    Some("the process running it stopped"),
                    now,
                );
                continue;
            }
            let loc = Located {
                root: PathBuf::from(&run.file_root),
                rel: PathBuf::from(&run.file_rel),
                place: self.place_of(&run),
            };
            let env = match self.read(&loc) {
                Ok(read) if read.sha == run.file_sha256 => match self.parse(&loc, &read) {
                    Ok(wf) => {
                        // Taken over once: another gateway on the same database recovering
                        // the same run at the same time gets `false` and leaves it.
                        if !matches!(
                            self.0
                                .runs
                                .take_over(&run, self.0.me.0, self.0.me.1, now, cutoff),
                            Ok(true)
                        ) {
                            continue;
                        }
                        let interrupted = self
                            .0
                            .runs
                            .steps(&run)
                            .ok()
                            .and_then(|s| {
                                // `paused` without a pause: it died while pausing. A part of a
                                // step (a branch, an item) interrupts the whole step.
                                s.into_iter()
                                    .find(|s| s.status == "running" || s.status == "paused")
                                    .and_then(|s| engine::top_index(&wf, &s.step))
                                    .map(|i| wf.steps[i].id.clone())
                            });
                        let cursor = run.cursor;
                        self.drive_run(run, loc, read, wf, cursor, interrupted)
                            .await
                    }
                    Err(f) => self.fail_recovered(&run, &f.message),
                },
                Ok(read) => self.fail_recovered(
                    &run,
                    &format!(
                        "the workflow file changed while the run was interrupted (sha256 {} then, {} now); not continued",
                        run.file_sha256, read.sha
                    ),
                ),
                Err(f) => self.fail_recovered(&run, &f.message),
            };
            n += 1;
            tracing::info!(run = %env.run_id.clone().unwrap_or_default(), status = env.status(), "interrupted workflow run recovered");
        }
        n
    }

    fn fail_recovered(&self, run: &RunRow, why: &str) -> Envelope {
        let _ = self
            .0
            .runs
            .set_status(run, "interrupted", None, Some(why), self.now());
        Envelope::error(ErrorKind::Runtime, why, Some(run.id.clone()))
    }

    /// The gateway's loop: [`Self::recover`] once, then [`Self::tick`] every second until
    /// `stop` turns true. On PostgreSQL also [`Self::recover`] every
    /// [`crate::cluster::HEARTBEAT_MS`] (on its own task: a run taken over is driven there),
    /// for the runs of replicas that stopped meanwhile.
    pub async fn background(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let n = self.recover().await;
        if n > 0 {
            tracing::info!(
                runs = n,
                "continued workflow runs left by a stopped process"
            );
        }
        let shared = self.0.runs.shared();
        let every = u64::try_from(crate::cluster::HEARTBEAT_MS / 1_000)
            .unwrap_or(5)
            .max(1);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            if *stop.borrow() {
                return;
            }
            self.tick().await;
            ticks = ticks.wrapping_add(1);
            if shared && ticks.is_multiple_of(every) {
                let me = self.clone();
                tokio::spawn(async move {
                    let n = me.recover().await;
                    if n > 0 {
                        tracing::info!(
                            runs = n,
                            "continued workflow runs of a replica that stopped"
                        );
                    }
                });
            }
        }
    }

    // ---- reading ------------------------------------------------------------------------

    /// Top-level runs, newest first (of `owner` when given).
    pub fn list(&self, owner: Option<&str>, limit: usize) -> Result<Vec<RunSummary>, String> {
        self.0
            .runs
            .list(owner, limit)
            .map(|v| v.iter().map(summary_of).collect())
            .map_err(|e| e.to_string())
    }

    /// One run in full: its record, steps, pauses' state and current envelope.
    pub fn show(&self, run_id: &str) -> Result<Value, String> {
        let run = self
            .0
            .runs
            .run(run_id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no workflow run `{}`", crate::approvals::visible(run_id)))?;
        let steps = self.0.runs.steps(&run).map_err(|e| e.to_string())?;
        let steps: Vec<Value> = steps
            .iter()
            .map(|s| {
                json!({"step": s.step, "status": s.status, "attempts": s.attempts,
                       "result": s.result, "started_at": crate::clock::rfc3339(s.started_ms),
                       "finished_at": s.finished_ms.map(crate::clock::rfc3339)})
            })
            .collect();
        let mut v = summary_of(&run).to_json();
        if let Value::Object(m) = &mut v {
            m.insert("file_sha256".into(), json!(run.file_sha256));
            m.insert("session".into(), json!(run.session));
            m.insert("args".into(), run.args.clone());
            m.insert("error".into(), json!(run.error));
            m.insert("steps".into(), Value::Array(steps));
            m.insert("parent_run".into(), json!(run.parent_run));
            m.insert("envelope".into(), self.envelope_of(run_id).value);
        }
        Ok(v)
    }

    /// The envelope of a run as it stands: its output when done, its pause (with the token)
    /// when paused, its error when it failed.
    pub fn envelope_of(&self, run_id: &str) -> Envelope {
        let run = match self.0.runs.run(run_id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Envelope::error(
                    ErrorKind::Runtime,
                    &format!("no workflow run `{}`", crate::approvals::visible(run_id)),
                    None,
                );
            }
            Err(e) => return Envelope::error(ErrorKind::Runtime, &e.to_string(), None),
        };
        let id = Some(run.id.clone());
        match run.status.as_str() {
            "ok" => Envelope {
                value: envelope::success(
                    Status::Ok,
                    run.output
                        .as_ref()
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default(),
                    None,
                    None,
                ),
                run_id: id,
                approval_id: None,
            },
            "cancelled" => Envelope {
                value: envelope::success(Status::Cancelled, Vec::new(), None, None),
                run_id: id,
                approval_id: None,
            },
            "paused" => match self.0.runs.pending_pause_of(&run.id) {
                Ok(Some(p)) => self.paused_envelope(&run, &p),
                _ => Envelope::error(ErrorKind::Runtime, "the run's pause is gone", id),
            },
            "running" => Envelope::error(
                ErrorKind::Runtime,
                "the run is still running; ask again when it has finished",
                id,
            ),
            _ => Envelope::error(
                ErrorKind::Runtime,
                run.error.as_deref().unwrap_or("the run failed"),
                id,
            ),
        }
    }

    /// The owner of a run (for access checks by callers that show runs to users).
    pub fn owner_of(&self, run_id: &str) -> Option<String> {
        self.0.runs.run(run_id).ok().flatten().map(|r| r.owner)
    }
}

fn digest_of(hex_digest: &str) -> Result<[u8; 32], Failure> {
    let mut out = [0u8; 32];
    if hex_digest.len() != 64 {
        return Err(Failure::runtime("the approval's digest is malformed"));
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex_digest[i * 2..i * 2 + 2], 16)
            .map_err(|_| Failure::runtime("the approval's digest is malformed"))?;
    }
    Ok(out)
}

/// `origin` of a stored run.
pub(crate) fn stored_origin(r: &RunRow) -> Origin {
    origin_of(&r.origin)
}
