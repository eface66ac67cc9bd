//! Decision test vectors: JSON files of requests with their expected decisions.
//!
//! ```json
//! { "description": "...",
//!   "entities": [ Cedar entity JSON ... ],
//!   "cases": [ { "name": "...", "request": {principal, action, resource, context},
//!                "decision": "allow", "policies": ["tools.owner-files-in-workspace"],
//!                "shadow": [], "shadow_decision": "deny" } ],
//!   "state_dir": "/srv/chitin" }
//! ```
//! `policies` (and `shadow` and `shadow_decision`, when given) must match exactly, order
//! aside.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::{Compiled, EntitySource, PolicyEngine, PolicyError, PolicyRequest, build_entities};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VectorFile {
    #[serde(default)]
    #[allow(dead_code, reason = "documentation for readers of the vector file")]
    description: String,
    #[serde(default)]
    entities: Vec<Value>,
    /// The state directory to assume (for `touches_state_dir`); default: the real one.
    #[serde(default)]
    state_dir: Option<std::path::PathBuf>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    request: Value,
    decision: String,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    shadow: Option<Vec<String>>,
    /// The decision the shadow policies would give (`null` or absent: they change nothing).
    #[serde(default)]
    shadow_decision: Option<String>,
}

/// The result of running vector files.
#[derive(Debug, Default)]
pub struct VectorReport {
    pub passed: usize,
    pub failed: usize,
    /// One line per failure: `file: case: expected ..., got ...`.
    pub failures: Vec<String>,
}

/// Runs one vector file against a compiled policy set. `compile` is called to get a fresh
/// compiled set (entities differ per file).
pub fn run_file(
    path: &Path,
    compile: &dyn Fn() -> Result<Compiled, PolicyError>,
    state_dir: Option<&Path>,
    report: &mut VectorReport,
) -> Result<(), PolicyError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: VectorFile = serde_json::from_str(&text)
        .map_err(|e| PolicyError::Request(format!("{name}: not a decision-vector file: {e}")))?;
    let compiled = compile()?;
    let entities = build_entities(
        compiled.schema(),
        &[EntitySource {
            name: format!("{name} (entities)"),
            json: Value::Array(file.entities),
        }],
    )?;
    let state_dir = file
        .state_dir
        .clone()
        .or_else(|| state_dir.map(Path::to_path_buf));
    let engine = PolicyEngine::from_parts(compiled, entities, state_dir);
    for case in file.cases {
        let got = PolicyRequest::from_json(&case.request).and_then(|r| engine.decide(&r));
        let verdict = match got {
            Err(e) => Err(format!("error: {e}")),
            Ok(d) => {
                let mut want_p = case.policies.clone();
                want_p.sort();
                let mut got_p = d.policies.clone();
                got_p.sort();
                let shadow_ok = case.shadow.as_ref().is_none_or(|s| {
                    let mut s = s.clone();
                    s.sort();
                    s == d.shadow
                });
                let shadow_decision_ok = case
                    .shadow_decision
                    .as_deref()
                    .is_none_or(|want| d.shadow_decision.map(super::Outcome::as_str) == Some(want));
                if d.decision.as_str() == case.decision
                    && want_p == got_p
                    && shadow_ok
                    && shadow_decision_ok
                {
                    Ok(())
                } else {
                    Err(format!(
                        "expected {} {:?}{}{}, got {} {:?} shadow {:?}{} errors {:?}",
                        case.decision,
                        case.policies,
                        case.shadow
                            .as_ref()
                            .map(|s| format!(" shadow {s:?}"))
                            .unwrap_or_default(),
                        case.shadow_decision
                            .as_ref()
                            .map(|s| format!(" shadow_decision {s}"))
                            .unwrap_or_default(),
                        d.decision.as_str(),
                        d.policies,
                        d.shadow,
                        d.shadow_decision
                            .map(|s| format!(" shadow_decision {}", s.as_str()))
                            .unwrap_or_default(),
                        d.errors
                    ))
                }
            }
        };
        match verdict {
            Ok(()) => report.passed += 1,
            Err(why) => {
                report.failed += 1;
                report
                    .failures
                    .push(format!("{name}: {}: {why}", case.name));
            }
        }
    }
    Ok(())
}
