//! `chitin policy validate | eval | test`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};
use crate::config::Config;
use crate::policy::{
    self, EngineSpec, PolicyEngine, PolicyError, PolicyInput, PolicyRequest, vectors,
};
use crate::state::Home;

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Validate the schema and every policy file strictly; print errors as file:line:col: message.
    Validate {
        /// Policy directory [default: the configured one, or the built-in defaults]
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Decide one request and print {"decision", "policies", "shadow", "errors"}.
    Eval {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Extra Cedar entity JSON, on top of the built-in ones and the state dir's entities.json
        #[arg(long, value_name = "FILE")]
        entities: Option<PathBuf>,
        /// The request JSON, or - for standard input
        #[arg(long, value_name = "FILE|-")]
        request: String,
    },
    /// Run decision vectors and print "N passed, N failed".
    Test {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Vector files [default: policies/tests/*.json]
        files: Vec<PathBuf>,
    },
}

/// A path from config: absolute as is, otherwise relative to the state directory.
pub(crate) fn resolve_in_home(home: &Home, configured: &str) -> PathBuf {
    resolve(home.root(), configured)
}

fn resolve(home: &Path, configured: &str) -> PathBuf {
    let p = Path::new(configured);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        home.join(p)
    }
}

/// The policy directory in force: `--dir`, else the configured directory if it exists, else
/// `None` (the built-in defaults).
/// A directory the operator named (`--dir`, or a non-default `[policy] dir`) must exist: a
/// typo or an unmounted path never silently brings back the built-in defaults.
pub(crate) fn policy_dir(
    globals: &Globals,
    config: &Config,
    dir: Option<PathBuf>,
) -> Result<Option<PathBuf>, PolicyError> {
    if let Some(d) = dir {
        return Ok(Some(d));
    }
    let d = resolve(&globals.home, &config.policy.dir);
    if d.exists() {
        return Ok(Some(d));
    }
    if config.policy.dir == crate::config::policy::PolicyConfig::default().dir {
        return Ok(None);
    }
    Err(PolicyError::Read {
        path: d,
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the configured [policy] dir does not exist; create it or fix the path in chitin.toml",
        ),
    })
}

/// The engine spec every command and the gateway use.
pub(crate) fn engine_spec(
    globals: &Globals,
    config: &Config,
    dir: Option<PathBuf>,
    extra_entities: Option<PathBuf>,
) -> Result<EngineSpec, PolicyError> {
    let mut entity_files = vec![resolve(&globals.home, &config.policy.entities)];
    entity_files.extend(extra_entities);
    Ok(EngineSpec {
        policy_dir: policy_dir(globals, config, dir)?,
        entity_files,
        state_dir: Some(globals.home.clone()),
    })
}

/// Checks the state dir's permissions when it exists (it holds entities.json and policies).
fn check_home(globals: &Globals) -> Result<(), crate::state::StateError> {
    Home::open_if_exists(&globals.home).map(|_| ())
}

pub fn run(cmd: PolicyCmd, globals: &Globals) -> CmdResult {
    let config = globals.load_config()?;
    match cmd {
        PolicyCmd::Validate { dir } => {
            check_home(globals)?;
            let input = policy_dir(globals, &config, dir).and_then(|d| match d {
                Some(d) => PolicyInput::from_dir(&d),
                None => Ok(PolicyInput::embedded()),
            });
            match input.and_then(|i| policy::compile(&i)) {
                Ok(c) => {
                    for w in c.warnings() {
                        eprintln!("{}:{}:{}: warning: {}", w.file, w.line, w.col, w.message);
                    }
                    println!(
                        "ok: {} policies ({} shadow) in {} files validate against the schema",
                        c.enforced_count() + c.shadow_count(),
                        c.shadow_count(),
                        c.files().len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(PolicyError::Invalid(diags)) => {
                    for d in &diags {
                        println!("{d}");
                    }
                    Ok(ExitCode::from(1))
                }
                // A directory or file that cannot be read is a validation failure too, in the
                // same one-line format.
                Err(PolicyError::Read { path, source }) => {
                    println!("{}:1:1: cannot read: {source}", path.display());
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
        PolicyCmd::Eval {
            dir,
            entities,
            request,
        } => {
            check_home(globals)?;
            let text = if request == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s)?;
                s
            } else {
                match std::fs::read_to_string(&request) {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("chitin: cannot read request {request}: {e}");
                        return Ok(ExitCode::from(1));
                    }
                }
            };
            // No decision without a valid policy set and entities: exit 1 with the reason.
            let engine =
                match engine_spec(globals, &config, dir, entities).and_then(PolicyEngine::load) {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!("chitin: {e}");
                        return Ok(ExitCode::from(1));
                    }
                };
            let parsed = serde_json::from_str::<serde_json::Value>(&text)
                .map_err(|e| PolicyError::Request(format!("not valid JSON: {e}")))
                .and_then(|v| PolicyRequest::from_json(&v))
                .and_then(|r| engine.decide(&r));
            match parsed {
                Ok(decision) => {
                    println!("{}", serde_json::to_string(&decision)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("chitin: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        PolicyCmd::Test { dir, files } => {
            check_home(globals)?;
            let files = if files.is_empty() {
                default_vector_files()?
            } else {
                files
            };
            if files.is_empty() {
                eprintln!("chitin: no vector files given and none found in policies/tests/*.json");
                return Ok(ExitCode::from(1));
            }
            let input = match policy_dir(globals, &config, dir)? {
                Some(d) => PolicyInput::from_dir(&d)?,
                None => PolicyInput::embedded(),
            };
            let compile = || policy::compile(&input);
            let mut report = vectors::VectorReport::default();
            for f in &files {
                if let Err(e) = vectors::run_file(f, &compile, Some(&globals.home), &mut report) {
                    report.failed += 1;
                    report.failures.push(format!("{}: {e}", f.display()));
                }
            }
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{} passed, {} failed", report.passed, report.failed);
            Ok(if report.failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn default_vector_files() -> std::io::Result<Vec<PathBuf>> {
    let dir = Path::new("policies/tests");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    Ok(v)
}
