//! `chitin cron list [--json] | add NAME ... | remove NAME | run NAME`.
//!
//! The jobs live in `state.db`; the running gateway fires them. `add`, `remove` and `run` are
//! decided by Cedar `cron.manage` for the CLI operator (`[cli] operator`, default the owner)
//! with `origin = "user"`; a refusal prints `refused: ...` and exits 1. `run` asks the gateway
//! to run the job at its next look (within a second while it runs).

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{CmdResult, Globals, Runtime};
use crate::automation::AutomationError;
use crate::automation::jobs::JobStore;
use crate::clock::rfc3339;
use crate::config::automation::{CronJob, Missed};
use crate::gate::Verdict;
use crate::tools::cron::ManageRequest;

#[derive(Debug, Subcommand)]
pub enum CronCmd {
    /// The jobs: from chitin.toml, `chitin cron add` and the agent's `cron` tool, with their
    /// next and last run.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a job that runs as the operator (or --user).
    Add(Box<AddArgs>),
    /// Remove a job added with `chitin cron add` or by the agent.
    Remove {
        #[arg(value_name = "NAME")]
        name: String,
    },
    /// Ask the gateway to run a job now (at its next look, within a second).
    Run {
        #[arg(value_name = "NAME")]
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The job's name (a-z 0-9 _ . -).
    #[arg(value_name = "NAME")]
    name: String,
    /// A cron expression: 5 fields, or 6 with seconds first ("0 7 * * 1-5").
    #[arg(long, value_name = "EXPR", conflicts_with = "every")]
    schedule: Option<String>,
    /// The time zone of --schedule [default: UTC].
    #[arg(long, value_name = "IANA NAME", requires = "schedule")]
    timezone: Option<String>,
    /// An interval instead of a schedule ("15m", "1h30m").
    #[arg(long, value_name = "DURATION")]
    every: Option<String>,
    /// The text of the agent turn to start.
    #[arg(long, value_name = "TEXT", conflicts_with = "workflow")]
    prompt: Option<String>,
    /// A workflow file to run instead of a turn.
    #[arg(long, value_name = "FILE")]
    workflow: Option<String>,
    /// Workflow arguments as a JSON object.
    #[arg(long, value_name = "JSON", requires = "workflow")]
    args_json: Option<String>,
    /// The session of the turn [default: cron:<name>].
    #[arg(long, value_name = "KEY")]
    session: Option<String>,
    /// Where answers go: channel:<name>:<dm|group>:<chat id> [default: the session only].
    #[arg(long, value_name = "TARGET")]
    deliver: Option<String>,
    /// What a time missed while the gateway was down does: skip or run_once [default: skip].
    #[arg(long, value_name = "POLICY")]
    missed: Option<String>,
    /// The user the job runs as [default: the operator].
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

/// Decides `cron.manage` for the operator; `Some(exit 1)` after printing the refusal.
fn decide(
    rt: &Runtime,
    op: &str,
    job: &str,
    job_user: &str,
    add: Option<&CronJob>,
    args: &Value,
) -> Result<Option<ExitCode>, super::BoxError> {
    let operator = rt.config.operator().to_string();
    let req = ManageRequest {
        principal: &operator,
        origin: "user",
        op,
        session: "",
        tainted: false,
        job,
        job_user,
        add,
    }
    .to_policy()?;
    let refused = |why: String| {
        println!("refused: {why}");
        Ok(Some(ExitCode::from(1)))
    };
    match rt.gate.check_call(&req, args, None)? {
        Verdict::Allowed(..) => Ok(None),
        Verdict::Denied(d) => refused(format!(
            "policy denied `cron.manage` ({op} `{job}`, runs as `{job_user}`) for Chitin::User::{operator:?} (determining policies: [{}])",
            d.policies.join(", ")
        )),
        Verdict::ApprovalRequired { .. } => refused(format!(
            "policy asks for an approval of `cron.manage` ({op} `{job}`), which the command line cannot wait for"
        )),
    }
}

/// The job store, its prompts sealed with the vault.
fn jobs(globals: &Globals, rt: &Runtime) -> Result<JobStore, super::BoxError> {
    let vault = crate::vault::Vault::for_db(
        &globals.home,
        rt.store.db(),
        &mut rt.secrets.write(),
        Arc::clone(&rt.clock),
    )?;
    Ok(JobStore::new(
        Arc::clone(&rt.store),
        Arc::clone(&rt.clock),
        rt.config.channels.clone(),
        Arc::new(vault),
    ))
}

/// A command-defined failure (exit 1) or an error (exit 2).
fn failed(e: AutomationError) -> CmdResult {
    match e {
        AutomationError::NoJob(_)
        | AutomationError::FromConfig(_)
        | AutomationError::Exists(_)
        | AutomationError::Invalid(_) => {
            println!("refused: {e}");
            Ok(ExitCode::from(1))
        }
        other => Err(other.into()),
    }
}

pub fn run(cmd: CronCmd, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    let store = jobs(globals, &rt)?;
    // The configured jobs as the gateway sees them (it does the same every minute).
    store.sync_config(&rt.config)?;
    match cmd {
        CronCmd::List { json } => list(&store, json),
        CronCmd::Add(a) => add(&rt, &store, *a),
        CronCmd::Remove { name } => {
            let row = match store.get(&name)? {
                Some(r) => r,
                None => return failed(AutomationError::NoJob(name)),
            };
            if matches!(row.source.as_str(), "config" | "heartbeat") {
                return failed(AutomationError::FromConfig(name));
            }
            let args = json!({"op": "remove", "name": name});
            if let Some(code) = decide(&rt, "remove", &name, &row.user, None, &args)? {
                return Ok(code);
            }
            match store.remove(&name) {
                Ok(()) => {
                    println!("removed: {name}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => failed(e),
            }
        }
        CronCmd::Run { name } => {
            let row = match store.get(&name)? {
                Some(r) => r,
                None => return failed(AutomationError::NoJob(name)),
            };
            let args = json!({"op": "run", "name": name});
            if let Some(code) = decide(&rt, "run", &name, &row.user, None, &args)? {
                return Ok(code);
            }
            let operator = rt.config.operator().to_string();
            let f = store.request_run(&name, &operator)?;
            println!(
                "queued: {name} runs at the gateway's next look (within a second while it runs); firing {}",
                f.id
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn add(rt: &Runtime, store: &JobStore, a: AddArgs) -> CmdResult {
    let args = match a.args_json.as_deref().map(serde_json::from_str::<Value>) {
        None => None,
        Some(Ok(v @ Value::Object(_))) => Some(v),
        Some(Ok(_)) => return Err("--args-json must be a JSON object".into()),
        Some(Err(e)) => return Err(format!("--args-json is not JSON: {e}").into()),
    };
    let missed = match a.missed.as_deref() {
        None | Some("skip") => Missed::Skip,
        Some("run_once") => Missed::RunOnce,
        Some(other) => {
            return Err(format!(
                "--missed must be `skip` or `run_once`, not `{}`",
                other.escape_default()
            )
            .into());
        }
    };
    let user = a
        .user
        .clone()
        .unwrap_or_else(|| rt.config.operator().to_string());
    let job = CronJob {
        name: a.name.clone(),
        schedule: a.schedule,
        every: a.every,
        timezone: a.timezone,
        prompt: a.prompt,
        workflow: a.workflow,
        args,
        session: a.session,
        deliver: a.deliver,
        missed,
        user: Some(user.clone()),
    };
    if let Err(e) = store.check_new(&job) {
        return failed(e);
    }
    let decided_args = serde_json::to_value(&job)?;
    if let Some(code) = decide(rt, "add", &job.name, &user, Some(&job), &decided_args)? {
        return Ok(code);
    }
    let operator = rt.config.operator().to_string();
    let row = match store.add(&job, &user, "cli", &format!("cli:{operator}")) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let next = row
        .job
        .parsed_schedule()
        .ok()
        .and_then(|s| s.next_after(rt.clock.now_ms()))
        .map_or_else(|| "never".to_string(), rfc3339);
    println!(
        "added: {} (runs as {}; {}; next run {next})",
        row.name,
        row.user,
        row.job
            .parsed_schedule()
            .map(|s| s.describe())
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

fn list(store: &JobStore, json: bool) -> CmdResult {
    let rows = store.all()?;
    let summaries: Vec<Value> = rows.iter().map(|r| store.summary(r)).collect();
    if json {
        println!("{}", serde_json::to_string(&summaries)?);
        return Ok(ExitCode::SUCCESS);
    }
    if summaries.is_empty() {
        println!("no cron jobs");
        return Ok(ExitCode::SUCCESS);
    }
    for s in &summaries {
        let target = match (s["prompt"].as_str(), s["workflow"].as_str()) {
            (Some(_), _) => "prompt".to_string(),
            (_, Some(w)) => format!("workflow {}", w.escape_default()),
            _ => "invalid".to_string(),
        };
        let last = if s["last"].is_null() {
            "never ran".to_string()
        } else {
            format!(
                "last {} {} ({})",
                s["last"]["kind"].as_str().unwrap_or(""),
                s["last"]["status"].as_str().unwrap_or(""),
                s["last"]["at"].as_str().unwrap_or("")
            )
        };
        println!(
            "{}  {}  {target}  as {}  next {}  {last}  [{}]",
            s["name"].as_str().unwrap_or(""),
            s["schedule"].as_str().unwrap_or(""),
            s["user"].as_str().unwrap_or("").escape_default(),
            s["next_run"].as_str().unwrap_or("never"),
            s["source"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
