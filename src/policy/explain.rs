//! `chitin policy explain`: a decision with the policies that determined it and their
//! reasons, and for a request that is not allowed, the single context changes that would
//! allow it (or make it approvable) and which policies would then decide.
//!
//! The input is the request JSON `chitin policy eval` takes ([`PolicyRequest::from_json`]);
//! the output is [`Explanation`] (serde; the Control UI's `POST /api/v1/policy/explain`
//! returns it as is). Documented in `docs/policy-tooling.md`.

use std::collections::{BTreeMap, BTreeSet};

use cedar_policy::Effect;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::lint::{conditions_of, context_attr};
use super::{Active, Compiled, Decision, Outcome, PolicyEngine, PolicyError, PolicyRequest};

/// A policy named by an explanation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub id: String,
    /// `permit` or `forbid`.
    pub effect: String,
    /// `enforce` or `shadow`.
    pub mode: String,
    /// Its `@reason`, if it has one.
    pub reason: Option<String>,
    /// Where it starts, `file:line:col`.
    pub location: Option<String>,
}

/// One context change and what it would decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The context attribute changed.
    pub attribute: String,
    /// Its value in the request (for a derived attribute: as the engine derived it).
    pub from: Value,
    /// The value tried.
    pub to: Value,
    /// Whether Chitin derives the attribute (the caller cannot set it; the request itself
    /// would have to change, e.g. a path inside the workspace).
    pub derived: bool,
    /// The decision with the change.
    pub decision: Outcome,
    /// The policies that would determine it.
    pub policies: Vec<PolicyRef>,
}

/// A decision explained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub decision: Outcome,
    /// The determining policies (empty for a default deny: no permit applies).
    pub policies: Vec<PolicyRef>,
    /// Shadow policies that would change the decision, and what it would then be.
    pub shadow: Vec<PolicyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<Outcome>,
    pub errors: Vec<String>,
    /// The derived context attributes as the engine computed them.
    pub derived: BTreeMap<String, bool>,
    /// For a request that is not allowed: the single context changes that would allow it
    /// (or, for a deny, make it approvable), in attribute order. Empty for an allow.
    pub would_allow: Vec<Change>,
}

/// What to try.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainOptions {
    /// Only these context attributes are changed (all when empty).
    #[serde(default)]
    pub attributes: Vec<String>,
}

/// [`explain`] for a request in JSON (the form `chitin policy eval` takes).
pub fn explain_value(
    engine: &PolicyEngine,
    request: &Value,
    opts: &ExplainOptions,
) -> Result<Explanation, PolicyError> {
    explain(engine, &PolicyRequest::from_json(request)?, opts)
}

/// Explains the engine's decision on `req`.
pub fn explain(
    engine: &PolicyEngine,
    req: &PolicyRequest,
    opts: &ExplainOptions,
) -> Result<Explanation, PolicyError> {
    let active = engine.active();
    let decision = engine.decide_in_active(&active, req, &active.entities, &[])?;
    let compiled = &active.compiled;
    let derived: BTreeMap<String, bool> = engine
        .derived_context(req)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let mut would_allow = Vec::new();
    if decision.decision != Outcome::Allow {
        for (attribute, from, to) in candidates(compiled, req, &derived) {
            if !opts.attributes.is_empty() && !opts.attributes.contains(&attribute) {
                continue;
            }
            let overrides = [(attribute.clone(), to.clone())];
            // A value the schema refuses is not a change a request could make.
            let Ok(d) = engine.decide_in_active(&active, req, &active.entities, &overrides) else {
                continue;
            };
            let better = match decision.decision {
                Outcome::Deny => d.decision != Outcome::Deny,
                _ => d.decision == Outcome::Allow,
            };
            if better {
                would_allow.push(Change {
                    derived: derived.contains_key(&attribute),
                    attribute,
                    from,
                    to,
                    decision: d.decision,
                    policies: refs(compiled, &d.policies),
                });
            }
        }
    }
    Ok(explained(&active, decision, derived, would_allow))
}

fn explained(
    active: &Active,
    d: Decision,
    derived: BTreeMap<String, bool>,
    would_allow: Vec<Change>,
) -> Explanation {
    let compiled = &active.compiled;
    Explanation {
        decision: d.decision,
        policies: refs(compiled, &d.policies),
        shadow: refs(compiled, &d.shadow),
        shadow_decision: d.shadow_decision,
        errors: d.errors,
        derived,
        would_allow,
    }
}

/// The named policies with their effect, mode, reason and location.
pub fn refs(compiled: &Compiled, ids: &[String]) -> Vec<PolicyRef> {
    ids.iter()
        .map(|id| {
            let p = compiled
                .policies()
                .iter()
                .find(|p| p.id().to_string() == *id);
            PolicyRef {
                id: id.clone(),
                effect: match p.map(cedar_policy::Policy::effect) {
                    Some(Effect::Forbid) => "forbid".into(),
                    _ => "permit".into(),
                },
                mode: if compiled.is_shadow(id) {
                    "shadow".into()
                } else {
                    "enforce".into()
                },
                reason: compiled.reason(id).map(str::to_string),
                location: compiled.location(id),
            }
        })
        .collect()
}

/// The changes to try: every Boolean attribute (given or derived) flipped, and every string
/// attribute set to each literal the action's policies compare it with (`context.a == "x"`).
/// `approved` is left alone: approval is what `approval_required` already says.
fn candidates(
    compiled: &Compiled,
    req: &PolicyRequest,
    derived: &BTreeMap<String, bool>,
) -> Vec<(String, Value, Value)> {
    let mut current: BTreeMap<String, Value> = req
        .context
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in derived {
        current.insert(k.clone(), Value::Bool(*v));
    }
    let mut literals: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in compiled.policies_for_action(&req.action) {
        for c in &conditions_of(p) {
            collect_literals(c, &mut literals);
        }
    }
    let mut out = Vec::new();
    for (name, value) in &current {
        if name == "approved" {
            continue;
        }
        match value {
            Value::Bool(b) => out.push((name.clone(), value.clone(), Value::Bool(!b))),
            Value::String(s) => {
                for lit in literals.get(name).into_iter().flatten() {
                    if lit != s {
                        out.push((name.clone(), value.clone(), Value::String(lit.clone())));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `context.<a> == "<literal>"` (either side) anywhere in a condition.
fn collect_literals(v: &Value, out: &mut BTreeMap<String, BTreeSet<String>>) {
    match v {
        Value::Object(m) => {
            if let Some(eq) = m.get("==") {
                let (l, r) = (eq.get("left"), eq.get("right"));
                for (a, b) in [(l, r), (r, l)] {
                    let (Some(a), Some(b)) = (a, b) else { continue };
                    let lit = b.get("Value").and_then(Value::as_str);
                    let attr = a
                        .get(".")
                        .and_then(|d| d.get("attr"))
                        .and_then(Value::as_str);
                    if let (Some(lit), Some(attr)) = (lit, attr)
                        && *a == context_attr(attr)
                    {
                        out.entry(attr.to_string())
                            .or_default()
                            .insert(lit.to_string());
                    }
                }
            }
            for x in m.values() {
                collect_literals(x, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                collect_literals(x, out);
            }
        }
        _ => {}
    }
}
