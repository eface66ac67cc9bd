//! `chitin policy validate | eval | test | lint | explain | diff | shadow-report`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};
use crate::config::Config;
use crate::policy::{
    self, EngineSpec, PolicyEngine, PolicyError, PolicyInput, PolicyRequest, diff, explain, lint,
    shadow_report, vectors,
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
    /// Decide one request and print {"decision", "policies", "shadow", ["shadow_decision",] "errors"}.
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
    /// Find permits that say too little, policies that can never apply and missing reasons;
    /// exit 0 (nothing above low), 1 (medium or high), 2 (critical).
    Lint {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Extra Cedar entity JSON, on top of the built-in ones and the state dir's entities.json
        #[arg(long, value_name = "FILE")]
        entities: Option<PathBuf>,
        /// Print {"policies", "findings": [...]} as JSON
        #[arg(long)]
        json: bool,
    },
    /// Decide one request and say why: the determining policies with their reasons and, when
    /// it is not allowed, the context changes that would allow it.
    Explain {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        entities: Option<PathBuf>,
        /// The request JSON (as for `policy eval`), or - for standard input
        #[arg(long, value_name = "FILE|-")]
        request: String,
        /// Only try changing this context attribute (repeatable)
        #[arg(long = "attribute", value_name = "NAME")]
        attributes: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The requests whose decision changes between two policy directories; exit 0 when none
    /// does, 1 when some do.
    Diff {
        #[arg(long, value_name = "DIR")]
        old: PathBuf,
        #[arg(long, value_name = "DIR")]
        new: PathBuf,
        /// Requests: a JSON array, a decision-vector file or JSON lines
        #[arg(long, value_name = "FILE", conflicts_with = "generate")]
        requests: Option<PathBuf>,
        /// Generate N requests from the new set's schema, entities and policies
        #[arg(long, value_name = "N")]
        generate: Option<usize>,
        /// Seed of the generated requests
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_name = "FILE")]
        entities: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What the shadow-mode policies would have changed, from the audit log.
    ShadowReport {
        /// The window: 7d, 24h, 30m (or an RFC 3339 time)
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long)]
        json: bool,
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
        PolicyCmd::Lint {
            dir,
            entities,
            json,
        } => lint_cmd(globals, &config, dir, entities, json),
        PolicyCmd::Explain {
            dir,
            entities,
            request,
            attributes,
            json,
        } => explain_cmd(globals, &config, dir, entities, &request, attributes, json),
        PolicyCmd::Diff {
            old,
            new,
            requests,
            generate,
            seed,
            entities,
            json,
        } => diff_cmd(
            globals, &config, old, new, requests, generate, seed, entities, json,
        ),
        PolicyCmd::ShadowReport { since, json } => shadow_report_cmd(globals, &since, json),
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

fn read_request(request: &str) -> Result<String, String> {
    if request == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("cannot read the request from standard input: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(request).map_err(|e| format!("cannot read request {request}: {e}"))
    }
}

fn lint_cmd(
    globals: &Globals,
    config: &Config,
    dir: Option<PathBuf>,
    entities: Option<PathBuf>,
    json: bool,
) -> CmdResult {
    check_home(globals)?;
    let engine = PolicyEngine::load(engine_spec(globals, config, dir, entities)?)?;
    let report = lint::lint_engine(&engine);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", lint_text(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}

fn suppressed_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} left out by @lint_allow")
    }
}

/// The text form of a lint report.
fn lint_text(report: &lint::LintReport) -> String {
    let mut out = String::new();
    for f in &report.findings {
        out.push_str(&format!(
            "{} {} {} at {}: {}\n  observed: {}\n  fix: {}\n",
            f.severity.as_str(),
            f.id,
            f.policy,
            f.location,
            f.title,
            f.observed,
            f.fix
        ));
    }
    if report.findings.is_empty() {
        out.push_str(&format!(
            "ok: no findings in {} policies (checked: unconstrained permits, high-risk permits without approval, permits shadowed by forbids, unreachable policies, missing @reason){}\n",
            report.policies,
            suppressed_note(report.suppressed)
        ));
    } else {
        let count = |s: lint::Severity| report.findings.iter().filter(|f| f.severity == s).count();
        out.push_str(&format!(
            "{} findings in {} policies: {} critical, {} high, {} medium, {} low{}\n",
            report.findings.len(),
            report.policies,
            count(lint::Severity::Critical),
            count(lint::Severity::High),
            count(lint::Severity::Medium),
            count(lint::Severity::Low),
            suppressed_note(report.suppressed)
        ));
    }
    out
}

fn explain_cmd(
    globals: &Globals,
    config: &Config,
    dir: Option<PathBuf>,
    entities: Option<PathBuf>,
    request: &str,
    attributes: Vec<String>,
    json: bool,
) -> CmdResult {
    check_home(globals)?;
    let text = match read_request(request) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("chitin: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let engine = match engine_spec(globals, config, dir, entities).and_then(PolicyEngine::load) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("chitin: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let opts = explain::ExplainOptions { attributes };
    let explained = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| PolicyError::Request(format!("not valid JSON: {e}")))
        .and_then(|v| PolicyRequest::from_json(&v))
        .and_then(|r| explain::explain(&engine, &r, &opts));
    match explained {
        Ok(x) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&x)?);
            } else {
                print!("{}", explain_text(&x));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("chitin: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn policy_line(p: &explain::PolicyRef) -> String {
    let mut s = format!("{} {}", p.effect, p.id);
    if p.mode == "shadow" {
        s.push_str(" (shadow)");
    }
    if let Some(l) = &p.location {
        s.push_str(&format!(" at {l}"));
    }
    match &p.reason {
        Some(r) => s.push_str(&format!(": {r}")),
        None => s.push_str(": (no @reason)"),
    }
    s
}

/// The text form of an explanation.
fn explain_text(x: &explain::Explanation) -> String {
    let mut out = format!("decision: {}\n", x.decision.as_str());
    if x.policies.is_empty() {
        out.push_str("determined by: no policy (default deny: no permit applies)\n");
    } else {
        out.push_str("determined by:\n");
        for p in &x.policies {
            out.push_str(&format!("  {}\n", policy_line(p)));
        }
    }
    for e in &x.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    if let Some(s) = x.shadow_decision {
        out.push_str(&format!("shadow policies would make it: {}\n", s.as_str()));
        for p in &x.shadow {
            out.push_str(&format!("  {}\n", policy_line(p)));
        }
    }
    if !x.derived.is_empty() {
        let d: Vec<String> = x.derived.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("derived: {}\n", d.join(" ")));
    }
    if x.decision != policy::Outcome::Allow {
        if x.would_allow.is_empty() {
            out.push_str("no single context change would allow it\n");
        } else {
            out.push_str("would be allowed if:\n");
            for c in &x.would_allow {
                out.push_str(&format!(
                    "  {}{} were {} (not {}): {}\n",
                    c.attribute,
                    if c.derived { " (derived)" } else { "" },
                    c.to,
                    c.from,
                    c.decision.as_str()
                ));
                for p in &c.policies {
                    out.push_str(&format!("    {}\n", policy_line(p)));
                }
            }
        }
    }
    out
}

#[expect(clippy::too_many_arguments, reason = "one parameter per flag")]
fn diff_cmd(
    globals: &Globals,
    config: &Config,
    old: PathBuf,
    new: PathBuf,
    requests: Option<PathBuf>,
    generate: Option<usize>,
    seed: u64,
    entities: Option<PathBuf>,
    json: bool,
) -> CmdResult {
    check_home(globals)?;
    let load = |d: PathBuf| {
        engine_spec(globals, config, Some(d), entities.clone()).and_then(PolicyEngine::load)
    };
    let old_engine = load(old)?;
    let new_engine = load(new)?;
    let reqs = match (requests, generate) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(&f)
                .map_err(|e| format!("cannot read requests {}: {e}", f.display()))?;
            diff::parse_requests(&text)?
        }
        (None, Some(n)) => diff::generate_requests(
            &old_engine.active().compiled,
            &new_engine.active().compiled,
            &new_engine,
            n,
            seed,
            Some(&globals.home),
        )?,
        (None, None) => {
            return Err("give the requests to compare: --requests FILE or --generate N".into());
        }
    };
    let report = diff::diff(&old_engine, &new_engine, &reqs);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", diff_text(&report));
    }
    Ok(if report.changed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The text form of a diff.
fn diff_text(r: &diff::DiffReport) -> String {
    let mut out = String::new();
    for c in &r.changed {
        let s = |v: &str| {
            c.request
                .get(v)
                .and_then(|x| x.as_str())
                .unwrap_or("?")
                .to_string()
        };
        let side = |d: &diff::DiffSide| match (&d.error, d.policies.is_empty()) {
            (Some(e), _) => format!("error ({e})"),
            (None, true) => d.label().to_string(),
            (None, false) => format!("{} [{}]", d.label(), d.policies.join(", ")),
        };
        out.push_str(&format!(
            "#{} {} {} {}: {} -> {}\n",
            c.index,
            s("principal"),
            s("action"),
            s("resource"),
            side(&c.old),
            side(&c.new)
        ));
    }
    let summary: Vec<String> = r.summary.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    out.push_str(&format!(
        "{} of {} requests change{}\n",
        r.changed.len(),
        r.requests,
        if summary.is_empty() {
            String::new()
        } else {
            format!(" ({})", summary.join(", "))
        }
    ));
    out
}

fn shadow_report_cmd(globals: &Globals, since: &str, json: bool) -> CmdResult {
    use crate::clock::Clock;
    let now = crate::clock::SystemClock.now_ms();
    let since_ms = match shadow_report::parse_window(since) {
        Some(w) => now.saturating_sub(w),
        None => crate::clock::parse_rfc3339(since).ok_or_else(|| {
            format!("--since {since:?} is neither a window like 7d, 24h, 30m nor an RFC 3339 time")
        })?,
    };
    let log = match super::audit::decided_log(globals, crate::policy::Action::AuditRead)? {
        Ok((log, _)) => log,
        Err(refused) => return Ok(refused),
    };
    let reader = log.reader()?;
    let records = reader.query(&chitin_audit::Query {
        kind: Some("decision".into()),
        since_ms: Some(since_ms),
        ..chitin_audit::Query::default()
    })?;
    drop(reader);
    log.shutdown()?;
    let shadow: Vec<shadow_report::ShadowRecord> = records
        .into_iter()
        .filter_map(|r| {
            let outcome = shadow_report::outcome_of_label(&r.decision)?;
            let payload: serde_json::Value = r
                .payload
                .as_deref()
                .and_then(|p| serde_json::from_str(p).ok())
                .unwrap_or_default();
            Some(shadow_report::ShadowRecord {
                seq: r.seq,
                ts_ms: r.ts_ms,
                actor: r.actor,
                action: r.action,
                resource: r.resource,
                enforced: payload
                    .get("enforced")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("unknown")
                    .to_string(),
                shadow: outcome.to_string(),
                policies: serde_json::from_str(&r.policies).unwrap_or_default(),
            })
        })
        .collect();
    let report = shadow_report::report(&shadow, since_ms);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", shadow_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

/// The text form of a shadow report.
fn shadow_text(r: &shadow_report::ShadowReport) -> String {
    let mut out = format!(
        "shadow policies since {}: {} decision(s) would have changed\n",
        crate::clock::rfc3339(r.since_ms),
        r.records
    );
    for p in &r.policies {
        let changes: Vec<String> = p.changes.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let actions: Vec<String> = p.actions.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!(
            "{}: {} decision(s) ({}); actions {}; {} principal(s); audit seq {}..{}\n",
            p.policy,
            p.decisions,
            changes.join(", "),
            actions.join(", "),
            p.principals,
            p.first_seq,
            p.last_seq
        ));
    }
    out
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
