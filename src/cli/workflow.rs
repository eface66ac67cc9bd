//! `chitin workflow run FILE [--args-json JSON] [--dry-run] [--json]` and
//! `chitin workflow graph FILE [--format mermaid|dot|ascii]`.
//!
//! Both read a Lobster workflow file (`.lobster`, `.yaml`, `.yml`, `.json`) and check it
//! completely (see `crate::workflows::format`). `run --dry-run` prints the plan: every step in
//! order with its command, arguments substituted as quoted words, nothing executed. Running
//! for real needs the executor (steps as gated tool calls in the sandbox, approvals, state),
//! which this build does not have yet: `run` without `--dry-run` says so and exits 1.
//!
//! With `--json` the output is Lobster's tool envelope (exit 0 on success; a parse error exits
//! 2, a runtime error 1). Without it, the plan goes to stdout and errors to stderr as
//! `chitin: <message>`, with the same exit codes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args as ClapArgs, Subcommand};
use serde_json::Value;

use super::CmdResult;
use crate::workflows::envelope::{self, ErrorKind, Status};
use crate::workflows::format::MAX_FILE_BYTES;
use crate::workflows::{Args, GraphFormat, Workflow, graph, plan};

#[derive(Debug, Subcommand)]
pub enum WorkflowCmd {
    /// Check a workflow file and print its plan (--dry-run); nothing is executed.
    Run(RunArgs),
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

pub fn run(cmd: WorkflowCmd) -> CmdResult {
    match cmd {
        WorkflowCmd::Run(args) => Ok(run_workflow(&args)),
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

fn run_workflow(a: &RunArgs) -> ExitCode {
    let result = load(&a.file).and_then(|wf| {
        let args = Args::from_json_text(&wf, a.args_json.as_deref()).map_err(Failure::parse)?;
        if !a.dry_run {
            return Err(Failure::runtime(format!(
                "{}: running workflows is not available in this build yet (the executor that runs each step as a gated tool call in the sandbox is not wired in); nothing was run. Use --dry-run to check the file and see the plan",
                a.file.display()
            )));
        }
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
