//! `chitin workflow run FILE [--args-json JSON] [--dry-run] [--json]`,
//! `chitin workflow resume (--token T | --id ID) (--approve yes|no | --response-json JSON |
//! --cancel) [--json]`, `chitin workflow list [--json]`, `chitin workflow show RUN [--json]`,
//! `chitin workflow recover [--json]` and `chitin workflow graph FILE [--format
//! mermaid|dot|ascii]`.
//!
//! `run --dry-run` and `graph` only read the file (no state needed). A real run opens the
//! runtime (policies, audit log, secret store, state database) and runs the workflow in this
//! process through `crate::workflow_runner`: every step a gated tool call in the sandbox, as the
//! CLI's operator (`[cli] operator`, default the gateway owner) with origin `user`. A run that
//! pauses prints its approval (or input) request and the resume token; `resume` continues it
//! as the operator, who must be allowed `approval.grant` (and be the `required_approver`, or
//! not the run's owner when `require_different_approver`).
//!
//! With `--json` the output of `run` and `resume` is Lobster's tool envelope, exactly (exit 0 on
//! success; a parse error exits 2, a runtime error 1). Without it, results go to stdout and
//! errors to stderr as `chitin: <message>`, with the same exit codes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args as ClapArgs, Subcommand};
use serde_json::Value;

use super::{BoxError, CmdResult, Globals, Runtime};
use crate::gate::Origin;
use crate::workflow_runner::{
    Envelope, Intent, ResumeKey, ResumeRequest, Runner, RunnerParts, StartRequest, TokenKey,
};
use crate::workflows::envelope::{self, ErrorKind, Status};
use crate::workflows::format::MAX_FILE_BYTES;
use crate::workflows::{Args, GraphFormat, Workflow, graph, plan};

#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// Run a workflow file: every step a gated tool call in the sandbox (--dry-run: only check
    /// it and print the plan).
    Run(RunArgs),
    /// Continue a paused run: approve or deny its approval, answer its input, or cancel it.
    Resume(ResumeArgs),
    /// Workflow runs, newest first.
    List {
        /// One JSON array of runs.
        #[arg(long)]
        json: bool,
    },
    /// One run: its steps, their results and where it stands.
    Show {
        #[arg(value_name = "RUN")]
        run: String,
        #[arg(long)]
        json: bool,
    },
    /// Continue runs a stopped process left running (a step that was running is interrupted
    /// and re-run only when it has `retry`), and paused runs whose approval was decided
    /// elsewhere (or whose pause expired). The gateway does both on its own.
    Recover {
        #[arg(long)]
        json: bool,
    },
    /// Draw a workflow: steps, parallel branches, loop bodies, gates and conditional edges.
    Graph {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Output syntax.
        #[arg(long, default_value = "mermaid", value_parser = ["mermaid", "dot", "ascii"])]
        format: String,
    },
}

#[derive(Debug, ClapArgs)]
pub struct RunArgs {
    /// The workflow file (.lobster, .yaml, .yml or .json).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The workflow's arguments as a JSON object; declared defaults fill the rest.
    #[arg(long, value_name = "JSON")]
    args_json: Option<String>,
    /// Check everything and print the plan without running any step.
    #[arg(long)]
    dry_run: bool,
    /// Print Lobster's tool envelope (one JSON object) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, ClapArgs)]
#[command(group(clap::ArgGroup::new("key").required(true).args(["token", "id"])))]
#[command(group(clap::ArgGroup::new("intent").required(true).args(["approve", "response_json", "cancel"])))]
pub struct ResumeArgs {
    /// The resumeToken the paused run printed.
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// The approvalId the paused run printed.
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Grant (yes) or deny (no) the approval; denying cancels the run.
    #[arg(long, value_name = "yes|no", value_parser = ["yes", "no"])]
    approve: Option<String>,
    /// The answer to an input gate, as JSON (checked against its responseSchema).
    #[arg(long, value_name = "JSON")]
    response_json: Option<String>,
    /// Cancel the run.
    #[arg(long)]
    cancel: bool,
    /// Print Lobster's tool envelope instead of text.
    #[arg(long)]
    json: bool,
}

/// A failure of a workflow command, with Lobster's classification.
struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    fn parse(message: impl ToString) -> Self {
        Self {
            kind: ErrorKind::Parse,
            message: message.to_string(),
        }
    }

    fn runtime(message: impl ToString) -> Self {
        Self {
            kind: ErrorKind::Runtime,
            message: message.to_string(),
        }
    }

    fn report(&self, json: bool) -> ExitCode {
        if json {
            print_json(&envelope::failure(self.kind, &self.message));
        } else {
            eprintln!("chitin: {}", self.message);
        }
        ExitCode::from(self.kind.exit_code())
    }
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

pub fn run(cmd: WorkflowCmd, globals: &Globals) -> CmdResult {
    match cmd {
        WorkflowCmd::Run(args) if args.dry_run => Ok(dry_run(&args)),
        WorkflowCmd::Run(args) => Ok(real_run(&args, globals)),
        WorkflowCmd::Resume(args) => Ok(resume(&args, globals)),
        WorkflowCmd::List { json } => list(globals, json),
        WorkflowCmd::Show { run, json } => show(globals, &run, json),
        WorkflowCmd::Recover { json } => recover(globals, json),
        WorkflowCmd::Graph { file, format } => {
            let format: GraphFormat = format.parse()?;
            match load(&file) {
                Ok(wf) => {
                    print!("{}", graph::render(&wf, format));
                    Ok(ExitCode::SUCCESS)
                }
                Err(f) => Ok(f.report(false)),
            }
        }
    }
}

fn dry_run(a: &RunArgs) -> ExitCode {
    let result = load(&a.file).and_then(|wf| {
        let args = Args::from_json_text(&wf, a.args_json.as_deref()).map_err(Failure::parse)?;
        plan::plan(&wf, &args).map_err(Failure::runtime)
    });
    match result {
        Ok(plan) => {
            if a.json {
                print_json(&envelope::success(Status::Ok, plan.items, None, None));
            } else {
                print!("{}", plan.text);
            }
            ExitCode::SUCCESS
        }
        Err(f) => f.report(a.json),
    }
}

/// Reads and loads a workflow file: at most [`MAX_FILE_BYTES`], UTF-8.
fn load(path: &Path) -> Result<Workflow, Failure> {
    let shown = path.display().to_string();
    let file = std::fs::File::open(path)
        .map_err(|e| Failure::runtime(format!("cannot read workflow {shown}: {e}")))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Failure::runtime(format!("cannot read workflow {shown}: {e}")))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Failure::parse(format!(
            "{shown}: the file is larger than {MAX_FILE_BYTES} bytes; a workflow file is small"
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| Failure::parse(format!("{shown}: the file is not UTF-8 text")))?;
    Workflow::parse(&text, &shown).map_err(Failure::parse)
}

/// What a runner is built from (the CLI and the gateway open these their own way).
pub(crate) struct RunnerInputs<'a> {
    pub config: &'a crate::config::Config,
    pub gate: &'a crate::gate::Gate,
    pub store: &'a Arc<crate::store::Store>,
    pub clock: &'a Arc<dyn crate::clock::Clock>,
    pub secrets: &'a crate::secrets::SharedSecretStore,
    /// The tool sandbox, with the tool secrets (and, in the gateway, the channels' messenger).
    pub sandbox: crate::tools::Sandbox,
    pub workspace: PathBuf,
    pub vault: Arc<crate::vault::Vault>,
    pub events: Option<Arc<dyn Fn(crate::workflow_runner::RunnerEvent) + Send + Sync>>,
}

/// The runner, assembled the same way for the gateway and the CLI: `[workflows]`, the model
/// router (keys through the gate), the vault as sealer, the resume-token key from the secret
/// store (created there on first use).
pub(crate) fn assemble_runner(i: RunnerInputs<'_>) -> Result<Runner, BoxError> {
    let token_key = TokenKey::from_store(&mut i.secrets.write())?;
    let home_dir = std::env::var_os("HOME").map(PathBuf::from);
    Ok(Runner::new(RunnerParts {
        gate: i.gate.clone(),
        store: Arc::clone(i.store),
        sandbox: i.sandbox,
        workspace: i.workspace,
        library: i.config.workflows.library_dirs(home_dir.as_deref()),
        router: super::agent::router(i.config, i.gate, i.secrets, Arc::clone(i.clock))?,
        sealer: i.vault,
        clock: Arc::clone(i.clock),
        sleeper: Arc::new(crate::providers::retry::TokioSleeper),
        token_key,
        token_ttl_ms: i.config.workflows.ttl_ms(),
        budgets: i.config.budgets.clone(),
        max_steps: i.config.workflows.max_steps,
        events: i.events,
    }))
}

/// The runner over an opened runtime (the CLI).
pub(crate) fn build_runner(globals: &Globals, rt: &Runtime) -> Result<Runner, BoxError> {
    let workspace =
        super::gateway::prepare_workspace(&rt.config.workspace_dir(&globals.home), &globals.home)?;
    let vault = crate::vault::Vault::for_db(
        &globals.home,
        rt.store.db(),
        &mut rt.secrets.write(),
        Arc::clone(&rt.clock),
    )?;
    let sandbox = super::sandbox_for(globals, &rt.config)?.with_secret_env(Arc::new(
        crate::secrets::ToolSecrets::new(rt.gate.clone(), rt.secrets.clone()),
    ));
    assemble_runner(RunnerInputs {
        config: &rt.config,
        gate: &rt.gate,
        store: &rt.store,
        clock: &rt.clock,
        secrets: &rt.secrets,
        sandbox,
        workspace,
        vault: Arc::new(vault),
        events: None,
    })
}

fn tokio_rt() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(Failure::runtime)
}

/// The runtime and the runner, or the failure to report.
fn open(globals: &Globals) -> Result<(Runtime, Runner), Failure> {
    let rt = Runtime::open(globals).map_err(Failure::runtime)?;
    let runner = build_runner(globals, &rt).map_err(Failure::runtime)?;
    Ok((rt, runner))
}

fn real_run(a: &RunArgs, globals: &Globals) -> ExitCode {
    let args = match a.args_json.as_deref().map(serde_json::from_str::<Value>) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            return Failure::parse(crate::workflows::ArgsError::NotJson(e.to_string()))
                .report(a.json);
        }
    };
    let file = match std::fs::canonicalize(&a.file) {
        Ok(p) => p,
        Err(e) => {
            return Failure::runtime(format!("cannot read workflow {}: {e}", a.file.display()))
                .report(a.json);
        }
    };
    let (rt, runner) = match open(globals) {
        Ok(x) => x,
        Err(f) => return f.report(a.json),
    };
    let tokio = match tokio_rt() {
        Ok(t) => t,
        Err(f) => return f.report(a.json),
    };
    let env = tokio.block_on(runner.start(StartRequest {
        file: file.to_string_lossy().into_owned(),
        args,
        principal: rt.config.operator().to_string(),
        origin: Origin::User,
        session: None,
        tainted: false,
    }));
    print_envelope(&env, a.json)
}

fn resume(a: &ResumeArgs, globals: &Globals) -> ExitCode {
    let key = match (&a.token, &a.id) {
        (Some(t), _) => ResumeKey::Token(t.clone()),
        (None, Some(id)) => ResumeKey::Id(id.clone()),
        (None, None) => return Failure::parse("pass --token or --id").report(a.json),
    };
    let intent = match (&a.approve, &a.response_json, a.cancel) {
        (Some(yes), None, false) => Intent::Approve(yes == "yes"),
        (None, Some(j), false) => match serde_json::from_str(j) {
            Ok(v) => Intent::Respond(v),
            Err(e) => {
                return Failure::parse(format!("--response-json is not JSON: {e}")).report(a.json);
            }
        },
        (None, None, true) => Intent::Cancel,
        _ => {
            return Failure::parse(
                "pass exactly one of --approve yes|no, --response-json JSON, --cancel",
            )
            .report(a.json);
        }
    };
    let (rt, runner) = match open(globals) {
        Ok(x) => x,
        Err(f) => return f.report(a.json),
    };
    let tokio = match tokio_rt() {
        Ok(t) => t,
        Err(f) => return f.report(a.json),
    };
    let env = tokio.block_on(runner.resume(ResumeRequest {
        key,
        intent,
        principal: rt.config.operator().to_string(),
        origin: Origin::User,
    }));
    print_envelope(&env, a.json)
}

/// Prints an envelope (as JSON, or for a person) and returns Lobster's exit code.
fn print_envelope(env: &Envelope, json: bool) -> ExitCode {
    let code = ExitCode::from(env.exit_code());
    if json {
        print_json(&env.value);
        return code;
    }
    let v = crate::approvals::visible;
    let run = env.run_id.clone().unwrap_or_default();
    match env.status() {
        "error" => {
            eprintln!(
                "chitin: {}",
                env.value["error"]["message"].as_str().unwrap_or("failed")
            );
            if !run.is_empty() {
                eprintln!("  run {run}: `chitin workflow show {run}` shows its steps");
            }
        }
        "ok" => {
            for item in env.value["output"].as_array().into_iter().flatten() {
                match item {
                    Value::String(s) => println!("{}", v(s)),
                    other => println!("{other}"),
                }
            }
            eprintln!("run {run}: ok");
        }
        "cancelled" => println!("run {run}: cancelled"),
        "needs_approval" => {
            let r = &env.value["requiresApproval"];
            println!(
                "run {run} waits for approval: {}",
                v(r["prompt"].as_str().unwrap_or(""))
            );
            for item in r["items"].as_array().into_iter().flatten() {
                println!("  - {}", v(&item.to_string()));
            }
            if let Some(p) = r["preview"].as_str() {
                println!("  preview: {}", v(p));
            }
            let id = r["approvalId"].as_str().unwrap_or("");
            println!(
                "approve with: chitin workflow resume --id {id} --approve yes   (or --approve no)"
            );
            println!("resumeToken: {}", r["resumeToken"].as_str().unwrap_or(""));
        }
        "needs_input" => {
            let r = &env.value["requiresInput"];
            println!(
                "run {run} waits for input: {}",
                v(r["prompt"].as_str().unwrap_or(""))
            );
            println!("  responseSchema: {}", r["responseSchema"]);
            if !r["defaults"].is_null() {
                println!("  defaults: {}", r["defaults"]);
            }
            println!(
                "answer with: chitin workflow resume --token {} --response-json '{{...}}'",
                r["resumeToken"].as_str().unwrap_or("")
            );
        }
        other => println!("run {run}: {other}"),
    }
    code
}

fn list(globals: &Globals, json: bool) -> CmdResult {
    let (_rt, runner) = open(globals).map_err(|f| f.message)?;
    let runs = runner.list(None, 200)?;
    if json {
        let v: Vec<Value> = runs.iter().map(|r| r.to_json()).collect();
        println!("{}", serde_json::to_string(&v)?);
    } else if runs.is_empty() {
        println!("no workflow runs");
    } else {
        for r in &runs {
            println!(
                "{}  {:<11}  {}  {}  {} ({}; by {})",
                r.id,
                r.status,
                crate::clock::rfc3339(r.created_ms),
                crate::approvals::visible(&r.name),
                crate::approvals::visible(&r.file),
                r.origin,
                crate::approvals::visible(&r.owner)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show(globals: &Globals, run: &str, json: bool) -> CmdResult {
    let (_rt, runner) = open(globals).map_err(|f| f.message)?;
    let v = runner.show(run)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let s = |k: &str| crate::approvals::visible(v[k].as_str().unwrap_or(""));
    println!("run {}  {}", s("id"), s("status"));
    println!("workflow: {} ({})", s("name"), s("file"));
    println!("file sha256: {}", s("file_sha256"));
    println!(
        "owner: {} (origin {}, session {})",
        s("owner"),
        s("origin"),
        s("session")
    );
    println!("started: {}  updated: {}", s("created_at"), s("updated_at"));
    if v["cost_usd"].as_f64().unwrap_or(0.0) > 0.0 {
        println!("model spend: ${:.4}", v["cost_usd"].as_f64().unwrap_or(0.0));
    }
    if let Some(e) = v["error"].as_str() {
        println!("error: {}", crate::approvals::visible(e));
    }
    println!("steps:");
    for st in v["steps"].as_array().into_iter().flatten() {
        let r = &st["result"];
        let detail = r["errorMessage"]
            .as_str()
            .map(|e| format!(": {}", crate::approvals::visible(e)))
            .unwrap_or_default();
        println!(
            "  {:<20} {:<11} attempts {}{}",
            crate::approvals::visible(st["step"].as_str().unwrap_or("")),
            st["status"].as_str().unwrap_or(""),
            st["attempts"],
            detail
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn recover(globals: &Globals, json: bool) -> CmdResult {
    let (_rt, runner) = open(globals).map_err(|f| f.message)?;
    let tokio = tokio_rt().map_err(|f| f.message)?;
    let (n, m) = tokio.block_on(async { (runner.recover().await, runner.tick().await) });
    if json {
        println!("{}", serde_json::json!({"recovered": n, "continued": m}));
    } else {
        println!(
            "recovered {n} interrupted workflow run(s); continued or ended {m} paused run(s) whose approval was decided or whose pause expired"
        );
    }
    Ok(ExitCode::SUCCESS)
}
