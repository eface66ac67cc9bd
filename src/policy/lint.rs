//! `chitin policy lint`: findings about a policy set that validates but may not say what its
//! author meant. Pure: it reads a compiled set and its entities, nothing else.
//!
//! Each finding has a stable `id` (one per check, listed in [`CHECKS`]), a severity, the
//! policy it is about with its location, what was observed and the exact fix. The checks are
//! syntactic over Cedar's policy AST (documented in `docs/policy-tooling.md`): a condition
//! "requires" `context.approved` when `context.approved` is one of the top-level `&&` terms of
//! a `when` clause (or `!context.approved` of an `unless` clause).

use std::collections::{BTreeSet, HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, Effect, Entities, EntityTypeName, EntityUid, Policy, PrincipalConstraint,
    ResourceConstraint,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Compiled;

/// How serious a finding is (the same scale as `chitin security audit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// `critical`, `high`, `medium`, `low` or `info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The check's stable id, e.g. `permit-unconstrained-principal`.
    pub id: String,
    pub severity: Severity,
    /// The `@id` of the policy the finding is about.
    pub policy: String,
    /// Where that policy starts, `file:line:col`.
    pub location: String,
    /// One line: what is wrong.
    pub title: String,
    /// What was observed (no secret values: policies hold none).
    pub observed: String,
    /// The exact fix.
    pub fix: String,
}

/// The result of linting a set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LintReport {
    /// Policies examined (enforced and shadow).
    pub policies: usize,
    /// Findings ordered by location, then id.
    pub findings: Vec<Finding>,
    /// Findings left out because their policy opts out with `@lint_allow("<check id>")`.
    pub suppressed: usize,
}

impl LintReport {
    /// 0 when nothing is above `low`, 1 for `medium` or `high`, 2 for `critical`.
    pub fn exit_code(&self) -> u8 {
        match self.findings.iter().map(|f| f.severity).max() {
            Some(Severity::Critical) => 2,
            Some(Severity::High | Severity::Medium) => 1,
            _ => 0,
        }
    }
}

/// The checks, by id, with their severities (a finding's severity is the check's).
pub const CHECKS: &[(&str, Severity, &str)] = &[
    (
        "permit-allows-everything",
        Severity::Critical,
        "a permit with no scope and no condition allows every request",
    ),
    (
        "permit-unconstrained-principal",
        Severity::High,
        "a permit whose scope and conditions never say who",
    ),
    (
        "permit-unconstrained-action",
        Severity::High,
        "a permit whose scope and conditions never say which actions",
    ),
    (
        "permit-unconstrained-resource",
        Severity::Low,
        "a permit whose scope and conditions never say on what (tools, secrets, skills, ...)",
    ),
    (
        "permit-high-risk-without-approval",
        Severity::High,
        "a permit that can apply to a high-risk tool without requiring context.approved",
    ),
    (
        "permit-shadowed-by-forbid",
        Severity::Medium,
        "a permit that can never allow: an enforced forbid covers its scope and its condition",
    ),
    (
        "policy-unreachable",
        Severity::Medium,
        "a policy that can never apply to any request",
    ),
    (
        "policy-missing-reason",
        Severity::Low,
        "a policy without @reason (decisions and approvals show the reason)",
    ),
];

fn severity_of(id: &str) -> Severity {
    CHECKS
        .iter()
        .find(|(c, _, _)| *c == id)
        .map_or(Severity::Info, |(_, s, _)| *s)
}

/// Resource types that say nothing more when left unconstrained: the singletons
/// (`Gateway::"gateway"`, `Agent::"main"`) and `Tool`, which for a tool action is always the
/// tool of that action.
const FIXED_RESOURCES: &[&str] = &["Chitin::Gateway", "Chitin::Agent", "Chitin::Tool"];

/// Principal types that are configured components, not people: a permit for every provider,
/// channel or hook is about the component's own credentials and targets.
const COMPONENT_PRINCIPALS: &[&str] = &[
    "Chitin::Provider",
    "Chitin::Channel",
    "Chitin::Hook",
    "Chitin::Tool",
    "Chitin::Agent",
];

/// The checks a policy opts out of with `@lint_allow("<check id> ...")` (ids separated by
/// spaces or commas).
fn allowed_checks(p: &Policy) -> Vec<String> {
    super::annotation(p, "lint_allow")
        .map(|a| {
            a.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Lints the engine's active set with its entities (what `chitin security audit` calls).
pub fn lint_engine(engine: &super::PolicyEngine) -> LintReport {
    let active = engine.active();
    lint(&active.compiled, &active.entities)
}

/// Lints a compiled set with its entities.
pub fn lint(compiled: &Compiled, entities: &Entities) -> LintReport {
    let mut out = Vec::new();
    let mut suppressed = 0;
    let actions = compiled.actions_by_policy();
    let info: Vec<PolicyInfo> = compiled
        .policies()
        .iter()
        .map(|p| PolicyInfo::new(compiled, p, &actions))
        .collect();
    for p in &info {
        let allowed = allowed_checks(p.policy);
        let mut push = |id: &str, title: String, observed: String, fix: String| {
            if allowed.iter().any(|a| a == id) {
                suppressed += 1;
                return;
            }
            out.push(Finding {
                id: id.into(),
                severity: severity_of(id),
                policy: p.id.clone(),
                location: p.location.clone(),
                title,
                observed,
                fix,
            });
        };
        if p.reason.is_none() {
            push(
                "policy-missing-reason",
                format!("policy {} has no @reason", p.id),
                "no @reason(\"...\") annotation".into(),
                format!(
                    "add @reason(\"<why this rule exists>\") above @id(\"{}\")",
                    p.id
                ),
            );
        }
        if let Some(why) = unreachable(compiled, entities, p) {
            push(
                "policy-unreachable",
                format!("policy {} can never apply", p.id),
                why,
                "fix the scope or condition so that it can match a request, or delete the policy"
                    .into(),
            );
            continue;
        }
        if p.effect != Effect::Permit {
            continue;
        }
        let principal_types: Vec<String> = match p.policy.principal_constraint() {
            PrincipalConstraint::Is(t) => vec![t.to_string()],
            _ => p
                .actions
                .iter()
                .filter_map(|a| compiled.schema().principals_for_action(a))
                .flatten()
                .map(ToString::to_string)
                .collect(),
        };
        let people = principal_types
            .iter()
            .any(|t| !COMPONENT_PRINCIPALS.contains(&t.as_str()));
        let principal_free = matches!(
            p.policy.principal_constraint(),
            PrincipalConstraint::Any | PrincipalConstraint::Is(_)
        ) && !p.mentions("principal");
        let action_free =
            matches!(p.policy.action_constraint(), ActionConstraint::Any) && !p.mentions("action");
        let resource_free = matches!(
            p.policy.resource_constraint(),
            ResourceConstraint::Any | ResourceConstraint::Is(_)
        ) && !p.mentions("resource");
        if principal_free && action_free && resource_free && p.conditions.is_empty() {
            push(
                "permit-allows-everything",
                format!("permit {} allows every request", p.id),
                "scope `principal, action, resource` and no when/unless clause".into(),
                "name the principals (`principal in Chitin::Group::\"...\"`), the actions and a condition, or delete the policy".into(),
            );
        } else {
            if principal_free && people {
                push(
                    "permit-unconstrained-principal",
                    format!("permit {} applies to every principal", p.id),
                    format!(
                        "principal scope `{}` and no condition on `principal`",
                        scope_text(&p.policy.principal_constraint())
                    ),
                    "constrain the principal, e.g. `principal in Chitin::Group::\"owners\"`".into(),
                );
            }
            if action_free {
                push(
                    "permit-unconstrained-action",
                    format!("permit {} applies to every action", p.id),
                    "action scope `action` and no condition on `action`".into(),
                    "name the actions, e.g. `action == Chitin::Action::\"read_file\"` or `action in Chitin::Action::\"effect:fs_read\"`".into(),
                );
            }
            let meaningful = p.actions.iter().any(|a| {
                compiled
                    .schema()
                    .resources_for_action(a)
                    .is_some_and(|mut r| {
                        r.any(|t| !FIXED_RESOURCES.contains(&t.to_string().as_str()))
                    })
            });
            if resource_free && meaningful {
                push(
                    "permit-unconstrained-resource",
                    format!("permit {} applies to every resource", p.id),
                    "resource scope without an entity and no condition on `resource`".into(),
                    "constrain the resource in the scope (`resource == <Type>::\"<id>\"`, `resource in ...`) or in a condition on `resource`".into(),
                );
            }
        }
        let high = high_risk_tools(compiled, entities, p);
        if !high.is_empty() && !p.requires_approved() {
            push(
                "permit-high-risk-without-approval",
                format!(
                    "permit {} can allow high-risk tools without approval",
                    p.id
                ),
                format!(
                    "it can apply to {} (risk \"high\") and no clause requires context.approved",
                    high.join(", ")
                ),
                "add `&& context.approved` to its when clause, or exclude high-risk tools with `when { resource.risk != \"high\" }`".into(),
            );
        }
        if let Some(f) = info.iter().find(|f| shadows(compiled, entities, f, p)) {
            push(
                "permit-shadowed-by-forbid",
                format!("permit {} is shadowed by forbid {}", p.id, f.id),
                format!(
                    "forbid {} ({}) covers every principal, action and resource of the permit, and its condition holds whenever the permit's does",
                    f.id, f.location
                ),
                format!(
                    "narrow forbid {} or delete permit {}, whichever is not meant",
                    f.id, p.id
                ),
            );
        }
    }
    out.sort_by(|a, b| {
        location_key(&a.location)
            .cmp(&location_key(&b.location))
            .then_with(|| a.id.cmp(&b.id))
    });
    LintReport {
        policies: info.len(),
        findings: out,
        suppressed,
    }
}

fn location_key(l: &str) -> (String, usize, usize) {
    let mut parts = l.rsplitn(3, ':');
    let col = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    let line = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    (parts.next().unwrap_or("").to_string(), line, col)
}

fn scope_text(c: &PrincipalConstraint) -> String {
    match c {
        PrincipalConstraint::Is(t) => format!("principal is {t}"),
        _ => "principal".into(),
    }
}

/// What the checks need to know about one policy.
pub(crate) struct PolicyInfo<'a> {
    pub(crate) id: String,
    pub(crate) location: String,
    pub(crate) reason: Option<String>,
    pub(crate) effect: Effect,
    pub(crate) policy: &'a Policy,
    /// The schema actions the action scope matches.
    pub(crate) actions: BTreeSet<EntityUid>,
    /// The `when` / `unless` clauses, as Cedar's JSON AST.
    pub(crate) conditions: Vec<Value>,
    /// The top-level `&&` terms every clause requires (an `unless { e }` as `!e`).
    pub(crate) conjuncts: Vec<Value>,
}

impl<'a> PolicyInfo<'a> {
    pub(crate) fn new(
        compiled: &Compiled,
        policy: &'a Policy,
        actions: &HashMap<String, BTreeSet<EntityUid>>,
    ) -> Self {
        let id = policy.id().to_string();
        let conditions = conditions_of(policy);
        let mut conjuncts = Vec::new();
        for c in &conditions {
            let body = c.get("body").cloned().unwrap_or(Value::Null);
            if c.get("kind").and_then(Value::as_str) == Some("unless") {
                conjuncts.push(negate(body));
            } else {
                flatten_and(&body, &mut conjuncts);
            }
        }
        let actions = actions.get(&id).cloned().unwrap_or_default();
        Self {
            location: compiled.location(&id).unwrap_or_default(),
            reason: super::annotation(policy, "reason")
                .filter(|r| !r.trim().is_empty())
                .map(str::to_string),
            effect: policy.effect(),
            id,
            policy,
            actions,
            conditions,
            conjuncts,
        }
    }

    /// Whether a condition refers to `var` (`principal`, `action`, `resource`).
    fn mentions(&self, var: &str) -> bool {
        self.conditions.iter().any(|c| mentions_var(c, var))
    }

    fn requires_approved(&self) -> bool {
        let approved = context_attr("approved");
        let eq_true = serde_json::json!({"==": {"left": approved, "right": {"Value": true}}});
        self.conjuncts
            .iter()
            .any(|c| *c == approved || *c == eq_true)
    }
}

fn negate(body: Value) -> Value {
    match body.get("!").and_then(|n| n.get("arg")) {
        Some(inner) => inner.clone(),
        None => serde_json::json!({"!": {"arg": body}}),
    }
}

fn flatten_and(e: &Value, out: &mut Vec<Value>) {
    match e.get("&&") {
        Some(and) => {
            if let Some(l) = and.get("left") {
                flatten_and(l, out);
            }
            if let Some(r) = and.get("right") {
                flatten_and(r, out);
            }
        }
        None => out.push(e.clone()),
    }
}

fn mentions_var(v: &Value, var: &str) -> bool {
    match v {
        Value::Object(m) => {
            m.get("Var").and_then(Value::as_str) == Some(var)
                || m.values().any(|x| mentions_var(x, var))
        }
        Value::Array(a) => a.iter().any(|x| mentions_var(x, var)),
        _ => false,
    }
}

/// A policy's `when` / `unless` clauses as Cedar's JSON AST (`{"kind", "body"}`).
pub(crate) fn conditions_of(p: &Policy) -> Vec<Value> {
    p.to_json()
        .ok()
        .and_then(|j| j.get("conditions").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// `context.<name>` in Cedar's JSON AST.
pub(crate) fn context_attr(name: &str) -> Value {
    serde_json::json!({".": {"left": {"Var": "context"}, "attr": name}})
}

/// Whether `e` is in `anchor` (the entity itself or one of its ancestors).
fn within(entities: &Entities, e: &EntityUid, anchor: &EntityUid) -> bool {
    e == anchor
        || entities
            .ancestors(e)
            .is_some_and(|mut a| a.any(|x| x == anchor))
}

/// The high-risk tools (`Tool` entities with `risk == "high"`) the permit can apply to:
/// those its resource scope matches and its condition does not rule out by
/// `resource.risk != "high"`, `resource.risk == "<other>"` or `resource == <other tool>`.
fn high_risk_tools(compiled: &Compiled, entities: &Entities, p: &PolicyInfo<'_>) -> Vec<String> {
    let takes_tools = p.actions.iter().any(|a| {
        compiled
            .schema()
            .resources_for_action(a)
            .is_some_and(|mut r| r.any(|t| t.to_string() == "Chitin::Tool"))
    });
    if !takes_tools {
        return Vec::new();
    }
    let risk = serde_json::json!({".": {"left": {"Var": "resource"}, "attr": "risk"}});
    let excludes_high = p.conjuncts.iter().any(|c| {
        let cmp = |op: &str| {
            c.get(op)
                .filter(|o| o.get("left") == Some(&risk))
                .and_then(|o| o.get("right"))
                .and_then(|r| r.get("Value"))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        cmp("!=").is_some_and(|v| v == "high") || cmp("==").is_some_and(|v| v != "high")
    });
    if excludes_high {
        return Vec::new();
    }
    let named: Option<EntityUid> = p.conjuncts.iter().find_map(|c| {
        let o = c.get("==")?;
        if o.get("left") != Some(&serde_json::json!({"Var": "resource"})) {
            return None;
        }
        let e = o.get("right")?.get("Value")?.get("__entity")?;
        let uid = format!(
            "{}::{}",
            e.get("type")?.as_str()?,
            Value::String(e.get("id")?.as_str()?.to_string())
        );
        uid.parse().ok()
    });
    // For a tool action the resource is the tool of that action; a tool the operator defined
    // (entities.json) may be the resource of any action that takes tools.
    let own: Vec<String> = p
        .actions
        .iter()
        .filter(|a| a.id().unescaped() != "approval.grant")
        .map(|a| {
            format!(
                "Chitin::Tool::{}",
                Value::String(a.id().unescaped().to_string())
            )
        })
        .collect();
    let mut out = Vec::new();
    for tool in entities.iter() {
        let uid = tool.uid();
        if uid.type_name().to_string() != "Chitin::Tool" {
            continue;
        }
        let builtin = super::builtin::tool(uid.id().unescaped()).is_some();
        if builtin && !own.contains(&uid.to_string()) {
            continue;
        }
        if !builtin
            && p.actions
                .iter()
                .all(|a| a.id().unescaped() == "approval.grant")
        {
            continue;
        }
        let high = matches!(
            tool.attr("risk"),
            Some(Ok(cedar_policy::EvalResult::String(r))) if r == "high"
        );
        if !high {
            continue;
        }
        if named.as_ref().is_some_and(|n| *n != uid) {
            continue;
        }
        let in_scope = match p.policy.resource_constraint() {
            ResourceConstraint::Any => true,
            ResourceConstraint::Is(t) => *uid.type_name() == t,
            ResourceConstraint::Eq(e) => e == uid,
            ResourceConstraint::In(e) => within(entities, &uid, &e),
            ResourceConstraint::IsIn(t, e) => *uid.type_name() == t && within(entities, &uid, &e),
        };
        if in_scope {
            out.push(uid.to_string());
        }
    }
    out.sort();
    out
}

/// Why the policy can never apply, if it cannot.
fn unreachable(compiled: &Compiled, entities: &Entities, p: &PolicyInfo<'_>) -> Option<String> {
    if p.actions.is_empty() {
        return Some("its action scope matches no action of the schema".into());
    }
    for c in &p.conditions {
        let body = c.get("body");
        let constant = body.and_then(|b| b.get("Value")).and_then(Value::as_bool);
        let kind = c.get("kind").and_then(Value::as_str);
        if (kind == Some("when") && constant == Some(false))
            || (kind == Some("unless") && constant == Some(true))
        {
            return Some(format!(
                "its `{}` clause is the constant {}",
                kind.unwrap_or("when"),
                constant.unwrap_or(false)
            ));
        }
    }
    if p.policy
        .get_valid_request_envs(compiled.schema())
        .next()
        .is_none()
    {
        return Some(
            "no principal, action and resource types of the schema fit its scope together".into(),
        );
    }
    // `in E` where nothing is in E and E itself can never be the principal or resource.
    let principal_types: HashSet<EntityTypeName> = p
        .actions
        .iter()
        .filter_map(|a| compiled.schema().principals_for_action(a))
        .flatten()
        .cloned()
        .collect();
    let resource_types: HashSet<EntityTypeName> = p
        .actions
        .iter()
        .filter_map(|a| compiled.schema().resources_for_action(a))
        .flatten()
        .cloned()
        .collect();
    let empty_group = |anchor: &EntityUid, types: &HashSet<EntityTypeName>| {
        !types.contains(anchor.type_name())
            && !entities.iter().any(|e| {
                let u = e.uid();
                u != *anchor && within(entities, &u, anchor)
            })
    };
    let principal_anchor = match p.policy.principal_constraint() {
        PrincipalConstraint::In(e) | PrincipalConstraint::IsIn(_, e) => Some(e),
        _ => None,
    };
    if let Some(e) = principal_anchor
        && empty_group(&e, &principal_types)
    {
        return Some(format!(
            "no entity is in {e} (entities.json and the built-in entities), and {e} cannot itself be the principal of its actions"
        ));
    }
    let resource_anchor = match p.policy.resource_constraint() {
        ResourceConstraint::In(e) | ResourceConstraint::IsIn(_, e) => Some(e),
        _ => None,
    };
    if let Some(e) = resource_anchor
        && empty_group(&e, &resource_types)
    {
        return Some(format!(
            "no entity is in {e} (entities.json and the built-in entities), and {e} cannot itself be the resource of its actions"
        ));
    }
    None
}

/// Whether the enforced forbid `f` covers the permit `p` entirely: every principal, action
/// and resource of `p`'s scope is in `f`'s, and `f`'s condition holds whenever `p`'s does
/// (`f` has no condition, or each of its terms is one of `p`'s).
fn shadows(
    compiled: &Compiled,
    entities: &Entities,
    f: &PolicyInfo<'_>,
    p: &PolicyInfo<'_>,
) -> bool {
    if f.effect != Effect::Forbid || compiled.is_shadow(&f.id) {
        return false;
    }
    if !p.actions.is_subset(&f.actions) {
        return false;
    }
    if !f.conjuncts.iter().all(|c| p.conjuncts.contains(c)) {
        return false;
    }
    covers(
        entities,
        scope_of_principal(&f.policy.principal_constraint()),
        scope_of_principal(&p.policy.principal_constraint()),
    ) && covers(
        entities,
        scope_of_resource(&f.policy.resource_constraint()),
        scope_of_resource(&p.policy.resource_constraint()),
    )
}

/// A principal or resource scope: (type, anchor, exact).
type Scope = (Option<EntityTypeName>, Option<EntityUid>, bool);

fn scope_of_principal(c: &PrincipalConstraint) -> Scope {
    match c {
        PrincipalConstraint::Any => (None, None, false),
        PrincipalConstraint::Is(t) => (Some(t.clone()), None, false),
        PrincipalConstraint::Eq(e) => (Some(e.type_name().clone()), Some(e.clone()), true),
        PrincipalConstraint::In(e) => (None, Some(e.clone()), false),
        PrincipalConstraint::IsIn(t, e) => (Some(t.clone()), Some(e.clone()), false),
    }
}

fn scope_of_resource(c: &ResourceConstraint) -> Scope {
    match c {
        ResourceConstraint::Any => (None, None, false),
        ResourceConstraint::Is(t) => (Some(t.clone()), None, false),
        ResourceConstraint::Eq(e) => (Some(e.type_name().clone()), Some(e.clone()), true),
        ResourceConstraint::In(e) => (None, Some(e.clone()), false),
        ResourceConstraint::IsIn(t, e) => (Some(t.clone()), Some(e.clone()), false),
    }
}

/// Whether every entity matching `inner` matches `outer`.
fn covers(entities: &Entities, outer: Scope, inner: Scope) -> bool {
    let (o_ty, o_anchor, o_exact) = outer;
    let (i_ty, i_anchor, i_exact) = inner;
    if let Some(t) = &o_ty
        && i_ty.as_ref() != Some(t)
    {
        return false;
    }
    match (o_anchor, i_anchor) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(o), Some(i)) => {
            if o_exact {
                i_exact && o == i
            } else {
                within(entities, &i, &o)
            }
        }
    }
}
