//! The policy decision point: Cedar policies, validated strictly against the Chitin schema.
//!
//! Invariants:
//! - Default deny. A forbid policy that errors during evaluation counts as a deny.
//! - A policy set is only ever active whole: an invalid set is refused at start-up, and on
//!   reload the last good set stays active and the error is kept for `/ready`.
//! - Every policy has a unique `@id`, which is its policy id in every decision.
//! - `@mode("shadow")` policies are evaluated and reported, never enforced.
//! - Derived context attributes (`in_workspace`, `touches_state_dir`, `prompt_file`,
//!   `memory_file`, `command_writable`) are computed here from the request, never taken from
//!   the caller.

mod action;
pub mod builtin;
mod diag;
pub mod diff;
pub mod explain;
pub mod lint;
pub mod shadow_report;
pub mod vectors;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Effect, Entities, EntityId,
    EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint, Request,
    ResourceConstraint, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use action::{Action, INVOKABLE, TOOLS, Tool, conversation_uid, identity_uid, user_uid};
pub use diag::Diagnostic;

/// Errors of the policy engine.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy set is invalid:\n{}", format_diags(.0))]
    Invalid(Vec<Diagnostic>),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entities {source_name}: {message}")]
    Entities {
        source_name: String,
        message: String,
    },
    #[error("malformed request: {0}")]
    Request(String),
}

fn format_diags(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A named text (a policy or schema file).
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub text: String,
}

/// The schema and policy files making up a policy set.
#[derive(Debug, Clone)]
pub struct PolicyInput {
    pub schema: Source,
    pub policies: Vec<Source>,
}

impl PolicyInput {
    /// The schema and default policies built into the binary.
    pub fn embedded() -> Self {
        Self {
            schema: Source {
                name: "<built-in>/schema.cedarschema".into(),
                text: builtin::SCHEMA.into(),
            },
            policies: builtin::DEFAULT_POLICIES
                .iter()
                .map(|(n, t)| Source {
                    name: format!("<built-in>/{n}"),
                    text: (*t).into(),
                })
                .collect(),
        }
    }

    /// Every `*.cedar` file below `dir` (sorted, recursive), and `dir/schema.cedarschema` if
    /// present (otherwise the built-in schema).
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let meta = std::fs::metadata(dir).map_err(|source| PolicyError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(PolicyError::Read {
                path: dir.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            });
        }
        // Every file that becomes policy must be writable by its owner only, wherever it is.
        let perms = |path: &Path| {
            crate::state::check_not_writable_by_others(path).map_err(|e| PolicyError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()),
            })
        };
        perms(dir)?;
        let schema_path = dir.join("schema.cedarschema");
        let schema = if schema_path.exists() {
            Source {
                name: schema_path.display().to_string(),
                text: read(&schema_path)?,
            }
        } else {
            Source {
                name: "<built-in>/schema.cedarschema".into(),
                text: builtin::SCHEMA.into(),
            }
        };
        let mut files = Vec::new();
        collect_cedar_files(dir, &mut files, 8)?;
        files.sort();
        for f in &files {
            perms(f)?;
        }
        if schema_path.exists() {
            perms(&schema_path)?;
        }
        let policies = files
            .iter()
            .map(|p| {
                Ok(Source {
                    name: p.display().to_string(),
                    text: read(p)?,
                })
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        Ok(Self { schema, policies })
    }
}

fn collect_cedar_files(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    depth: usize,
) -> Result<(), PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.is_dir() {
            if depth > 0 {
                collect_cedar_files(&path, out, depth - 1)?;
            }
        } else if path.extension().is_some_and(|e| e == "cedar") {
            out.push(path);
        }
    }
    Ok(())
}

/// Where a policy's scope pins it: the entity its principal scope names (`== E`, `in E`,
/// `is T in E`) and the entity its resource scope names, `None` for a scope that names none
/// (`principal`, `principal is T`; likewise for the resource).
type ScopeKey = (Option<EntityUid>, Option<EntityUid>);

/// The policies that can apply to one action, indexed by principal and resource scope.
#[derive(Debug, Default)]
struct Slice {
    /// Every policy whose action scope can match the action, in file order.
    policies: Vec<Policy>,
    /// Indexes into `policies` by the entities their principal and resource scopes name.
    by_scope: HashMap<ScopeKey, Vec<usize>>,
    /// The entities some policy's principal scope names.
    principal_anchors: HashSet<EntityUid>,
    /// The entities some policy's resource scope names.
    resource_anchors: HashSet<EntityUid>,
    /// For each policy (same index as `policies`), the string its first `when` clause's
    /// leading conjunct compares a context attribute with ([`leading_context_literal`]).
    literals: Vec<Option<(String, String)>>,
    /// The context attributes some policy's leading conjunct compares with a string literal,
    /// and the literals.
    literal_attrs: BTreeMap<String, HashSet<String>>,
}

/// Which policies with a leading `context.ATTR == "literal"` conjunct on one attribute a
/// request keeps (see [`Slice::literals`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LiteralPick {
    /// Every one: the request's context has no plain string under that attribute (the
    /// comparison may error, which Cedar reports, so those policies are evaluated).
    All,
    /// Only those comparing with this string (`None`: the request's string matches none).
    Only(Option<String>),
}

/// The sets evaluated for one (action, principal anchors, resource anchors) combination.
#[derive(Debug)]
struct Sets {
    enforced: PolicySet,
    /// Enforced plus shadow policies; `None` when no shadow policy is among them.
    with_shadow: Option<PolicySet>,
    /// The policies of `enforced` that read `context.approved` (see [`reads_approved`]):
    /// the only ones the approval re-evaluation has to evaluate again. `None` when there are
    /// none.
    enforced_approval: Option<PolicySet>,
    /// The same for `with_shadow`.
    with_shadow_approval: Option<PolicySet>,
}

/// An action, the principal anchors and the resource anchors (`None`: every resource) that
/// have policies for it.
type SetKey = (
    EntityUid,
    Vec<EntityUid>,
    Option<Vec<EntityUid>>,
    Option<Vec<LiteralPick>>,
);

/// A request's context attribute as the policies will see it (`None`: no context to go by,
/// every policy is kept).
type ContextLookup<'a> = Option<&'a dyn Fn(&str) -> Option<Value>>;

/// Context attributes never indexed by literal: `approved` differs between the first
/// evaluation and the approval re-evaluation, and `requester` / `user` are entities in some
/// actions' contexts even when the caller writes a string.
const UNINDEXED_ATTRS: &[&str] = &["approved", "requester", "user"];

/// How many (action, anchors) combinations are kept before the cache starts over.
const SET_CACHE_LIMIT: usize = 4096;

/// A validated, compiled policy set.
#[derive(Debug)]
pub struct Compiled {
    schema: Schema,
    slices: HashMap<EntityUid, Slice>,
    set_cache: RwLock<HashMap<SetKey, Arc<Sets>>>,
    forbids: HashSet<PolicyId>,
    /// The policies whose conditions may read `context.approved` ([`reads_approved`]).
    approval_dependent: HashSet<PolicyId>,
    shadow: HashSet<PolicyId>,
    reasons: BTreeMap<String, String>,
    enforced_count: usize,
    files: Vec<String>,
    warnings: Vec<Diagnostic>,
    listing: Vec<PolicyListing>,
    /// Every policy (enforced and shadow), in file order, keyed by `@id`.
    all: Vec<Policy>,
    /// Where each policy starts: `@id` -> (file, line, col).
    locations: HashMap<String, (String, usize, usize)>,
    /// The schema's text (what tooling reads context shapes from).
    schema_text: String,
}

/// One policy of a compiled set, as the Control UI lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyListing {
    pub id: String,
    /// The file it was read from.
    pub file: String,
    /// `enforce` or `shadow`.
    pub mode: &'static str,
    /// `permit` or `forbid`.
    pub effect: &'static str,
    pub reason: Option<String>,
    /// The policy in Cedar syntax.
    pub text: String,
}

impl Compiled {
    /// Every policy of the set, in file order.
    pub fn listing(&self) -> &[PolicyListing] {
        &self.listing
    }

    /// Every policy of the set (enforced and shadow), in file order.
    pub fn policies(&self) -> &[Policy] {
        &self.all
    }
    /// Whether the policy with this id is in shadow mode.
    pub fn is_shadow(&self, id: &str) -> bool {
        self.shadow.contains(&PolicyId::new(id))
    }
    /// Where a policy starts, as `file:line:col`.
    pub fn location(&self, id: &str) -> Option<String> {
        self.locations
            .get(id)
            .map(|(f, l, c)| format!("{f}:{l}:{c}"))
    }
    /// The schema's text.
    pub fn schema_text(&self) -> &str {
        &self.schema_text
    }
    /// For each policy id, the schema actions its action scope matches.
    pub fn actions_by_policy(&self) -> HashMap<String, BTreeSet<EntityUid>> {
        let mut out: HashMap<String, BTreeSet<EntityUid>> = HashMap::new();
        for (action, slice) in &self.slices {
            for p in &slice.policies {
                out.entry(p.id().to_string())
                    .or_default()
                    .insert(action.clone());
            }
        }
        out
    }
    /// The policies (enforced and shadow) whose action scope can match `action`, in file
    /// order.
    pub fn policies_for_action(&self, action: &EntityUid) -> Vec<&Policy> {
        let Some(slice) = self.slices.get(action) else {
            return Vec::new();
        };
        let ids: HashSet<&PolicyId> = slice.policies.iter().map(Policy::id).collect();
        self.all.iter().filter(|p| ids.contains(p.id())).collect()
    }
    /// The schema the set was validated against.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }
    /// Number of enforced policies.
    pub fn enforced_count(&self) -> usize {
        self.enforced_count
    }
    /// Number of shadow-mode policies.
    pub fn shadow_count(&self) -> usize {
        self.shadow.len()
    }
    /// The files the set came from.
    pub fn files(&self) -> &[String] {
        &self.files
    }
    /// Validator warnings (not errors).
    pub fn warnings(&self) -> &[Diagnostic] {
        &self.warnings
    }
    /// The `@reason` of a policy.
    pub fn reason(&self, id: &str) -> Option<&str> {
        self.reasons.get(id).map(String::as_str)
    }
}

/// Parses, re-keys by `@id`, validates strictly and slices a policy set. All problems are
/// returned together, each located as `file:line:col`.
pub fn compile(input: &PolicyInput) -> Result<Compiled, PolicyError> {
    let mut diags = Vec::new();
    // The built-in schema is read from its JSON form (the same schema, a fifth of the parse).
    let schema = if input.schema.text == builtin::SCHEMA
        && let Ok(schema) = Schema::from_json_str(builtin::SCHEMA_JSON)
    {
        schema
    } else {
        match Schema::from_cedarschema_str(&input.schema.text) {
            Ok((schema, _warnings)) => schema,
            Err(e) => {
                Diagnostic::from_miette(&input.schema.name, &input.schema.text, &e, &mut diags);
                return Err(PolicyError::Invalid(diags));
            }
        }
    };

    // Parse each file; re-key every policy by its @id.
    let mut policies: Vec<Policy> = Vec::new();
    // Each policy's EST (what slicing and the approval analysis read), in `policies`' order.
    let mut ests: Vec<Option<Value>> = Vec::new();
    let mut origin: HashMap<String, usize> = HashMap::new(); // policy id -> file index
    let mut shadow = HashSet::new();
    let mut reasons = BTreeMap::new();
    let mut locations = HashMap::new();
    for (file_idx, src) in input.policies.iter().enumerate() {
        let set = match PolicySet::from_str(&src.text) {
            Ok(s) => s,
            Err(errs) => {
                for e in errs.iter() {
                    Diagnostic::from_miette(&src.name, &src.text, e, &mut diags);
                }
                continue;
            }
        };
        let mut file_ests = file_ests(&src.text);
        let starts = diag::policy_starts(&src.text);
        let at = |n: usize| starts.get(n).copied().unwrap_or(0);
        if set.templates().next().is_some() {
            diags.push(Diagnostic::at_offset(
                &src.name,
                &src.text,
                0,
                "policy templates are not supported; write static policies",
            ));
        }
        // `from_str` names policies policy0, policy1, ... in file order.
        let mut parsed: Vec<&Policy> = set.policies().collect();
        parsed.sort_by_key(|p| {
            p.id()
                .to_string()
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(0)
        });
        for (n, p) in parsed.into_iter().enumerate() {
            let Some(id) = annotation(p, "id").map(str::to_string) else {
                diags.push(Diagnostic::at_offset(
                    &src.name,
                    &src.text,
                    at(n),
                    "policy has no @id(\"...\") annotation; every policy needs a unique id",
                ));
                continue;
            };
            if id.trim().is_empty() {
                diags.push(Diagnostic::at_offset(
                    &src.name,
                    &src.text,
                    at(n),
                    "@id must not be empty",
                ));
                continue;
            }
            if let Some(prev) = origin.get(&id) {
                let prev_name = input.policies.get(*prev).map_or("?", |s| s.name.as_str());
                diags.push(Diagnostic::at_offset(
                    &src.name,
                    &src.text,
                    at(n),
                    format!("duplicate @id(\"{id}\") (also used in {prev_name})"),
                ));
                continue;
            }
            match annotation(p, "mode") {
                None | Some("enforce") => {}
                Some("shadow") => {
                    shadow.insert(PolicyId::new(&id));
                }
                Some(other) => diags.push(Diagnostic::at_offset(
                    &src.name,
                    &src.text,
                    at(n),
                    format!("unknown @mode(\"{other}\"); use \"shadow\" or leave it out"),
                )),
            }
            if let Some(r) = annotation(p, "reason") {
                reasons.insert(id.clone(), r.to_string());
            }
            origin.insert(id.clone(), file_idx);
            let at_ = Diagnostic::at_offset(&src.name, &src.text, at(n), "");
            locations.insert(id.clone(), (src.name.clone(), at_.line, at_.col));
            ests.push(
                file_ests
                    .remove(AsRef::<str>::as_ref(p.id()))
                    .or_else(|| p.to_json().ok()),
            );
            policies.push(p.new_id(PolicyId::new(&id)));
        }
    }
    if !diags.is_empty() {
        return Err(PolicyError::Invalid(diags));
    }

    // A file byte for byte one of the built-in policy files, against the built-in schema, is
    // known valid: the test suite validates the built-in set strictly and finds neither
    // errors nor warnings (`the_built_in_policies_validate_strictly_without_warnings`), and
    // validation looks at each policy on its own. So only the other policies are validated
    // (on a default install, none: validation was a fifth of a start; issue #21).
    let builtin_schema = input.schema.text == builtin::SCHEMA;
    let known_valid = |p: &Policy| {
        builtin_schema
            && origin
                .get(AsRef::<str>::as_ref(p.id()))
                .and_then(|i| input.policies.get(*i))
                .is_some_and(|f| builtin::DEFAULT_POLICIES.iter().any(|(_, t)| *t == f.text))
    };
    let all = match PolicySet::from_policies(policies.iter().filter(|p| !known_valid(p)).cloned()) {
        Ok(s) => s,
        Err(e) => {
            diags.push(Diagnostic {
                file: "<policy set>".into(),
                line: 1,
                col: 1,
                message: e.to_string(),
            });
            return Err(PolicyError::Invalid(diags));
        }
    };
    let locate = |id: &PolicyId| -> (&str, &str) {
        origin
            .get(AsRef::<str>::as_ref(id))
            .and_then(|i| input.policies.get(*i))
            .map_or(("<policy set>", ""), |s| (s.name.as_str(), s.text.as_str()))
    };
    let result = Validator::new(schema.clone()).validate(&all, ValidationMode::Strict);
    drop(all);
    for e in result.validation_errors() {
        let (file, text) = locate(e.policy_id());
        Diagnostic::from_miette(file, text, e, &mut diags);
    }
    let mut warnings = Vec::new();
    for w in result.validation_warnings() {
        let (file, text) = locate(w.policy_id());
        Diagnostic::from_miette(file, text, w, &mut warnings);
    }
    if !diags.is_empty() {
        return Err(PolicyError::Invalid(diags));
    }

    let forbids: HashSet<PolicyId> = policies
        .iter()
        .filter(|p| p.effect() == Effect::Forbid)
        .map(|p| p.id().clone())
        .collect();
    let approval_dependent: HashSet<PolicyId> = policies
        .iter()
        .zip(&ests)
        .filter(|(_, est)| reads_approved_est(est.as_ref()))
        .map(|(p, _)| p.id().clone())
        .collect();
    let slices = slice_by_action(&schema, &policies, &ests).map_err(|m| {
        PolicyError::Invalid(vec![Diagnostic {
            file: input.schema.name.clone(),
            line: 1,
            col: 1,
            message: m,
        }])
    })?;
    let listing = policies
        .iter()
        .map(|p| {
            let id = AsRef::<str>::as_ref(p.id()).to_string();
            PolicyListing {
                file: locate(p.id()).0.to_string(),
                mode: if shadow.contains(p.id()) {
                    "shadow"
                } else {
                    "enforce"
                },
                effect: match p.effect() {
                    Effect::Permit => "permit",
                    Effect::Forbid => "forbid",
                },
                reason: reasons.get(&id).cloned(),
                text: p.to_string(),
                id,
            }
        })
        .collect();
    Ok(Compiled {
        listing,
        schema,
        slices,
        set_cache: RwLock::new(HashMap::new()),
        forbids,
        approval_dependent,
        enforced_count: policies.len() - shadow.len(),
        shadow,
        reasons,
        files: input.policies.iter().map(|s| s.name.clone()).collect(),
        warnings,
        all: policies,
        locations,
        schema_text: input.schema.text.clone(),
    })
}

/// A policy's annotation `key` (`Some("")` for one without a value). `Policy::annotation`
/// runs Cedar's parser on the key at every call (its own lexer each time: three calls per
/// policy were a twentieth of a start); this looks it up among the policy's annotations.
pub(crate) fn annotation<'p>(p: &'p Policy, key: &str) -> Option<&'p str> {
    p.annotations().find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The EST of every policy of a file, keyed by the id `PolicySet::from_str` gives it
/// (`policy0`, `policy1`, ... in file order), from one parse of the whole file:
/// `Policy::to_json` parses each policy's text again with a lexer of its own, which took
/// longer than parsing all the files (issue #21, start time). Empty when the file does not
/// parse (its errors are reported from `PolicySet::from_str`); a policy missing here falls
/// back on `Policy::to_json`.
fn file_ests(text: &str) -> HashMap<String, Value> {
    let Ok(cst) = cedar_policy_core::parser::text_to_cst::parse_policies(text) else {
        return HashMap::new();
    };
    let Ok(policies) = cst.with_generated_policyids() else {
        return HashMap::new();
    };
    policies
        .filter_map(|(id, node)| {
            let est: cedar_policy_core::est::Policy =
                node.node.as_ref()?.clone().try_into().ok()?;
            Some((id.to_string(), serde_json::to_value(est).ok()?))
        })
        .collect()
}

/// For every action of the schema, the policies whose action scope can match it, indexed by
/// their principal and resource scopes. Evaluating only the policies whose action scope matches
/// the action, whose principal scope names the principal or one of its ancestors (or none) and
/// whose resource scope names the resource or one of its ancestors (or none) gives the same
/// decision as the whole set (any other policy's scope is false, so it can neither be satisfied
/// nor error), and keeps latency flat as the set grows.
fn slice_by_action(
    schema: &Schema,
    policies: &[Policy],
    ests: &[Option<Value>],
) -> Result<HashMap<EntityUid, Slice>, String> {
    let action_entities = schema.action_entities().map_err(|e| e.to_string())?;
    // Once per policy, not per (action, policy): a policy can apply to many actions.
    let literals: Vec<Option<(String, String)>> = ests
        .iter()
        .map(|e| e.as_ref().and_then(leading_context_literal_est))
        .collect();
    let mut slices = HashMap::new();
    for action in schema.actions() {
        let mut lineage: HashSet<&EntityUid> = action_entities
            .ancestors(action)
            .map(|a| a.collect())
            .unwrap_or_default();
        lineage.insert(action);
        let applies = |p: &Policy| match p.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(a) => lineage.contains(&a),
            ActionConstraint::In(list) => list.iter().any(|a| lineage.contains(a)),
        };
        let mut slice = Slice::default();
        for (p, literal) in policies.iter().zip(&literals).filter(|(p, _)| applies(p)) {
            let principal = match p.principal_constraint() {
                PrincipalConstraint::Any | PrincipalConstraint::Is(_) => None,
                PrincipalConstraint::Eq(e)
                | PrincipalConstraint::In(e)
                | PrincipalConstraint::IsIn(_, e) => Some(e),
            };
            let resource = match p.resource_constraint() {
                ResourceConstraint::Any | ResourceConstraint::Is(_) => None,
                ResourceConstraint::Eq(e)
                | ResourceConstraint::In(e)
                | ResourceConstraint::IsIn(_, e) => Some(e),
            };
            slice.principal_anchors.extend(principal.clone());
            slice.resource_anchors.extend(resource.clone());
            slice
                .by_scope
                .entry((principal, resource))
                .or_default()
                .push(slice.policies.len());
            let literal = literal.clone();
            if let Some((attr, lit)) = &literal {
                slice
                    .literal_attrs
                    .entry(attr.clone())
                    .or_default()
                    .insert(lit.clone());
            }
            slice.literals.push(literal);
            slice.policies.push(p.clone());
        }
        slices.insert(action.clone(), slice);
    }
    Ok(slices)
}

/// `(ATTR, "literal")` when the first condition of `p` is a `when` clause whose leftmost
/// `&&` operand is `context.ATTR == "literal"` (either way round). Cedar evaluates a policy as
/// its scope (which cannot error) `&&` its clauses in order, left to right, stopping at the
/// first false: so for a request whose context holds a *string* under ATTR other than the
/// literal, that comparison is false without an error and so is the whole policy. Leaving
/// such a policy out of the evaluated set changes neither the decision nor the reasons nor
/// the errors Cedar reports (an index over conditions, for many policies on one action that
/// differ in the command, host or path they name).
#[cfg(test)]
fn leading_context_literal(p: &Policy) -> Option<(String, String)> {
    leading_context_literal_est(&p.to_json().ok()?)
}

/// [`leading_context_literal`] on the policy's EST.
fn leading_context_literal_est(est: &Value) -> Option<(String, String)> {
    let first = est.get("conditions")?.as_array()?.first()?;
    if first.get("kind")?.as_str()? != "when" {
        return None;
    }
    let mut body = first.get("body")?;
    while let Some(and) = body.get("&&") {
        body = and.get("left")?;
    }
    let eq = body.get("==")?;
    let (l, r) = (eq.get("left")?, eq.get("right")?);
    let attr_of = |v: &Value| -> Option<String> {
        let dot = v.get(".")?;
        (dot.get("left")?.get("Var")?.as_str()? == "context")
            .then(|| dot.get("attr")?.as_str().map(str::to_string))
            .flatten()
    };
    let lit_of = |v: &Value| v.get("Value")?.as_str().map(str::to_string);
    let (attr, lit) = match (attr_of(l), lit_of(r)) {
        (Some(a), Some(v)) => (a, v),
        _ => (attr_of(r)?, lit_of(l)?),
    };
    (!UNINDEXED_ATTRS.contains(&attr.as_str())).then_some((attr, lit))
}

/// The entities of `index` that `uid` is or descends from, sorted: the anchors under which
/// policies whose scope can match `uid` are filed.
fn anchors_of(index: &HashSet<EntityUid>, uid: &EntityUid, entities: &Entities) -> Vec<EntityUid> {
    let mut out: Vec<EntityUid> = Vec::new();
    if index.is_empty() {
        return out;
    }
    if index.contains(uid) {
        out.push(uid.clone());
    }
    if let Some(ancestors) = entities.ancestors(uid) {
        out.extend(ancestors.filter(|a| index.contains(*a)).cloned());
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether a policy's conditions may read `context.approved`: they mention it, or use
/// `context` other than by naming one of its attributes (`context == ...`, `context` passed
/// whole). Every other policy evaluates the same with `approved = true` as with `false`
/// (same principal, action, resource, entities and other attributes), so the approval
/// re-evaluation reuses its first result. Errs on the side of `true`.
#[cfg(test)]
fn reads_approved(p: &Policy) -> bool {
    reads_approved_est(p.to_json().ok().as_ref())
}

/// [`reads_approved`] on the policy's EST (`None`: it has none, so it may read anything).
fn reads_approved_est(est: Option<&Value>) -> bool {
    fn walk(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.iter().any(|(k, x)| {
                if (k == "." || k == "has")
                    && let Some(o) = x.as_object()
                    && o.get("left")
                        .and_then(|l| l.get("Var"))
                        .and_then(Value::as_str)
                        == Some("context")
                {
                    // `context.<attr>` / `context has <attr>`: only `approved` (or an
                    // unreadable attribute) counts; `left` is the bare variable.
                    return o.len() != 2
                        || o.get("attr")
                            .and_then(Value::as_str)
                            .is_none_or(|a| a == "approved");
                }
                (k == "Var" && x.as_str() == Some("context")) || walk(x)
            }),
            Value::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    est.is_none_or(walk)
}

impl Compiled {
    /// The policy sets to evaluate for `action`, `principal` and `resource` (`None`: every
    /// resource), built once per distinct combination of the relevant anchors and cached.
    fn sets_for(
        &self,
        action: &EntityUid,
        principal: &EntityUid,
        resource: Option<&EntityUid>,
        entities: &Entities,
        context: ContextLookup<'_>,
    ) -> Result<Arc<Sets>, PolicyError> {
        let slice = self
            .slices
            .get(action)
            .ok_or_else(|| PolicyError::Request(format!("unknown action {action}")))?;
        let p_anchors = anchors_of(&slice.principal_anchors, principal, entities);
        let r_anchors = resource.map(|r| anchors_of(&slice.resource_anchors, r, entities));
        // Per indexed attribute, which of its literal-led policies can be satisfied.
        let picks: Option<Vec<LiteralPick>> = match context {
            Some(get) if !slice.literal_attrs.is_empty() => Some(
                slice
                    .literal_attrs
                    .iter()
                    .map(|(attr, lits)| match get(attr.as_str()) {
                        Some(Value::String(v)) => {
                            LiteralPick::Only(if lits.contains(&v) { Some(v) } else { None })
                        }
                        _ => LiteralPick::All,
                    })
                    .collect(),
            ),
            _ => None,
        };
        let key: SetKey = (action.clone(), p_anchors, r_anchors, picks);
        if let Some(sets) = self
            .set_cache
            .read()
            .ok()
            .and_then(|c| c.get(&key).cloned())
        {
            return Ok(sets);
        }
        let principal_ok = |a: &Option<EntityUid>| a.as_ref().is_none_or(|a| key.1.contains(a));
        let resource_ok = |a: &Option<EntityUid>| match (a, &key.2) {
            (None, _) | (Some(_), None) => true,
            (Some(a), Some(anchors)) => anchors.contains(a),
        };
        let literal_ok = |i: usize| {
            let (Some(picks), Some(Some((attr, lit)))) = (&key.3, slice.literals.get(i)) else {
                return true;
            };
            slice
                .literal_attrs
                .keys()
                .zip(picks)
                .find(|(a, _)| *a == attr)
                .is_none_or(|(_, pick)| match pick {
                    LiteralPick::All => true,
                    LiteralPick::Only(v) => v.as_deref() == Some(lit.as_str()),
                })
        };
        let mut chosen: Vec<usize> = slice
            .by_scope
            .iter()
            .filter(|((p, r), _)| principal_ok(p) && resource_ok(r))
            .flat_map(|(_, ix)| ix.iter().copied())
            .filter(|i| literal_ok(*i))
            .collect();
        // File order, whatever the map's order.
        chosen.sort_unstable();
        let chosen: Vec<&Policy> = chosen
            .into_iter()
            .filter_map(|i| slice.policies.get(i))
            .collect();
        let set_err = |e: cedar_policy::PolicySetError| PolicyError::Request(e.to_string());
        let build = |keep: &dyn Fn(&Policy) -> bool| -> Result<Option<PolicySet>, PolicyError> {
            let picked: Vec<Policy> = chosen
                .iter()
                .filter(|p| keep(p))
                .map(|p| (*p).clone())
                .collect();
            if picked.is_empty() {
                return Ok(None);
            }
            PolicySet::from_policies(picked).map(Some).map_err(set_err)
        };
        let enforced = build(&|p| !self.shadow.contains(p.id()))?.unwrap_or_default();
        let has_shadow = chosen.iter().any(|p| self.shadow.contains(p.id()));
        let with_shadow = if has_shadow { build(&|_| true)? } else { None };
        let enforced_approval =
            build(&|p| !self.shadow.contains(p.id()) && self.approval_dependent.contains(p.id()))?;
        let with_shadow_approval = if has_shadow {
            build(&|p| self.approval_dependent.contains(p.id()))?
        } else {
            None
        };
        let sets = Arc::new(Sets {
            enforced,
            with_shadow,
            enforced_approval,
            with_shadow_approval,
        });
        if let Ok(mut cache) = self.set_cache.write() {
            if cache.len() >= SET_CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, Arc::clone(&sets));
        }
        Ok(sets)
    }
}

/// Where entities come from: a name for messages and the Cedar entity JSON (an array).
#[derive(Debug, Clone)]
pub struct EntitySource {
    pub name: String,
    pub json: Value,
}

impl EntitySource {
    /// Reads a Cedar entity JSON file.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        crate::state::check_not_writable_by_others(path).map_err(|e| PolicyError::Entities {
            source_name: path.display().to_string(),
            message: e.to_string(),
        })?;
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let json = serde_json::from_str(&text).map_err(|e| PolicyError::Entities {
            source_name: path.display().to_string(),
            message: format!("not valid JSON: {e}"),
        })?;
        Ok(Self {
            name: path.display().to_string(),
            json,
        })
    }
}

/// The name the managed entity store has in error messages.
pub const MANAGED_SOURCE: &str = "managed entities (state.db: paired identities)";

/// The entity files followed by the managed entities (when there are any).
fn with_managed(files: &[EntitySource], managed: &[Value]) -> Vec<EntitySource> {
    let mut out = files.to_vec();
    if !managed.is_empty() {
        out.push(EntitySource {
            name: MANAGED_SOURCE.into(),
            json: Value::Array(managed.to_vec()),
        });
    }
    out
}

/// Builds the entity store: the built-in entities plus each source, checked against the
/// schema. A source that redefines an entity (including a built-in tool) is an error.
pub fn build_entities(schema: &Schema, sources: &[EntitySource]) -> Result<Entities, PolicyError> {
    let mut all = match builtin::entities_json() {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let mut seen: HashMap<String, String> = HashMap::new();
    for v in &all {
        seen.insert(uid_key(v), "<built-in>".into());
    }
    for src in sources {
        let Value::Array(items) = &src.json else {
            return Err(PolicyError::Entities {
                source_name: src.name.clone(),
                message: "must be a JSON array of Cedar entities".into(),
            });
        };
        Entities::from_json_value(src.json.clone(), Some(schema)).map_err(|e| {
            PolicyError::Entities {
                source_name: src.name.clone(),
                message: e.to_string(),
            }
        })?;
        for item in items {
            let key = uid_key(item);
            if let Some(prev) = seen.insert(key.clone(), src.name.clone()) {
                return Err(PolicyError::Entities {
                    source_name: src.name.clone(),
                    message: format!("entity {key} is already defined in {prev}"),
                });
            }
            all.push(item.clone());
        }
    }
    Entities::from_json_value(Value::Array(all), Some(schema)).map_err(|e| PolicyError::Entities {
        source_name: "entities".into(),
        message: e.to_string(),
    })
}

fn uid_key(v: &Value) -> String {
    let uid = v.get("uid");
    let ty = uid
        .and_then(|u| u.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    let id = uid
        .and_then(|u| u.get("id"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{ty}::{id:?}")
}

/// A request to decide.
#[derive(Debug, Clone)]
pub struct PolicyRequest {
    pub principal: EntityUid,
    pub action: EntityUid,
    pub resource: EntityUid,
    pub context: Map<String, Value>,
}

impl PolicyRequest {
    /// Parses `{"principal", "action", "resource", "context"}` (entity references in Cedar
    /// syntax, e.g. `Chitin::User::"alice"`). Unknown keys are refused.
    pub fn from_json(v: &Value) -> Result<Self, PolicyError> {
        let obj = v
            .as_object()
            .ok_or_else(|| PolicyError::Request("the request must be a JSON object".into()))?;
        for k in obj.keys() {
            if !matches!(k.as_str(), "principal" | "action" | "resource" | "context") {
                return Err(PolicyError::Request(format!(
                    "unknown field `{k}` (expected principal, action, resource, context)"
                )));
            }
        }
        let uid = |field: &str| -> Result<EntityUid, PolicyError> {
            let s = obj.get(field).and_then(Value::as_str).ok_or_else(|| {
                PolicyError::Request(format!(
                    "`{field}` must be a string like Chitin::User::\"alice\""
                ))
            })?;
            EntityUid::from_str(s).map_err(|e| PolicyError::Request(format!("`{field}`: {e}")))
        };
        let context = match obj.get("context") {
            None => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(_) => {
                return Err(PolicyError::Request(
                    "`context` must be a JSON object".into(),
                ));
            }
        };
        Ok(Self {
            principal: uid("principal")?,
            action: uid("action")?,
            resource: uid("resource")?,
            context,
        })
    }

    /// A request for one of Chitin's own actions.
    pub fn new(
        principal: EntityUid,
        action: Action,
        resource: EntityUid,
        context: Map<String, Value>,
    ) -> Self {
        Self {
            principal,
            action: action.uid(),
            resource,
            context,
        }
    }

    /// The action's id, e.g. `exec`.
    pub fn action_name(&self) -> String {
        self.action.id().unescaped().to_string()
    }

    /// The action, when it is one of Chitin's (an operator's schema may declare others, which
    /// `chitin policy eval` and vectors can decide but the gate never authorizes).
    pub fn chitin_action(&self) -> Option<Action> {
        Action::from_uid(&self.action)
    }
}

/// The three outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allow,
    Deny,
    ApprovalRequired,
}

impl Outcome {
    /// `allow`, `deny` or `approval_required`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::ApprovalRequired => "approval_required",
        }
    }
}

/// A decision with its reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The enforced outcome.
    pub decision: Outcome,
    /// The determining policies: the permits that allow (or that approval would unlock), or
    /// the forbids that deny (including forbids that errored). Empty for a default deny.
    pub policies: Vec<String>,
    /// Shadow policies that would have changed the outcome had they been enforced: those
    /// that make the request as made, or its approval re-evaluation, come out differently.
    pub shadow: Vec<String>,
    /// The outcome had the shadow policies been enforced; present only when it differs from
    /// `decision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_decision: Option<Outcome>,
    /// Evaluation errors, as `policy <id>: <message>`.
    pub errors: Vec<String>,
}

/// One evaluation of one policy set.
struct Eval {
    allow: bool,
    policies: BTreeSet<String>,
    errors: Vec<String>,
    /// Cedar's answer, kept so that the approval re-evaluation can reuse it.
    raw: Raw,
}

/// Cedar's answer for one set: its decision, its determining policies (the satisfied permits
/// when it allows, every satisfied forbid when it denies, none for a default deny) and the
/// policies that errored.
#[derive(Debug, Default)]
struct Raw {
    allow: bool,
    reason: Vec<PolicyId>,
    errors: Vec<(PolicyId, String)>,
}

fn cedar_eval(set: &PolicySet, req: &Request, entities: &Entities) -> Raw {
    let resp = Authorizer::new().is_authorized(req, set, entities);
    Raw {
        allow: resp.decision() == CedarDecision::Allow,
        reason: resp.diagnostics().reason().cloned().collect(),
        errors: resp
            .diagnostics()
            .errors()
            .map(|e| (err_policy(e).clone(), err_message(e)))
            .collect(),
    }
}

/// Chitin's rules on Cedar's answer: a forbid that errored denies, and determines the deny
/// with the satisfied forbids.
fn judge(raw: Raw, forbids: &HashSet<PolicyId>) -> Eval {
    let errored_forbid = raw.errors.iter().any(|(id, _)| forbids.contains(id));
    let policies: BTreeSet<String> = if errored_forbid {
        raw.reason
            .iter()
            .chain(raw.errors.iter().map(|(id, _)| id))
            .filter(|id| forbids.contains(*id))
            .map(ToString::to_string)
            .collect()
    } else {
        raw.reason.iter().map(ToString::to_string).collect()
    };
    Eval {
        allow: raw.allow && !errored_forbid,
        policies,
        errors: raw
            .errors
            .iter()
            .map(|(id, m)| format!("policy {id}: {m}"))
            .collect(),
        raw,
    }
}

fn evaluate(
    set: &PolicySet,
    req: &Request,
    entities: &Entities,
    forbids: &HashSet<PolicyId>,
) -> Eval {
    judge(cedar_eval(set, req, entities), forbids)
}

/// A policy set and its policies that read `context.approved` (`None`: none do).
#[derive(Clone, Copy)]
struct Scoped<'a> {
    set: &'a PolicySet,
    approval: Option<&'a PolicySet>,
}

/// The evaluation of `scoped.set` for `alt`, the request as made with `approved = true`, given
/// `first`, Cedar's answer for the request as made. The two requests differ only in
/// `context.approved`, so a policy that does not read it ([`reads_approved`]) is satisfied,
/// unsatisfied or erroring in both alike: only `scoped.approval` is evaluated again and the
/// rest is taken from `first`. What `first` tells about the other policies: when it allows,
/// exactly which permits were satisfied (and no forbid); when it denies with reasons, exactly
/// which forbids were satisfied (the permits stay unknown); when it denies without reasons,
/// that none was satisfied. Only when the permits are unknown and no forbid decides does the
/// whole set get evaluated again. Exact: the same decision, determining policies and errors
/// as evaluating the whole set for `alt` (tests/policy_property.rs compares with plain Cedar).
fn evaluate_approved(
    scoped: Scoped<'_>,
    dependent: &HashSet<PolicyId>,
    first: &Raw,
    alt: &Request,
    entities: &Entities,
    forbids: &HashSet<PolicyId>,
) -> Eval {
    let again = scoped
        .approval
        .map(|s| cedar_eval(s, alt, entities))
        .unwrap_or_default();
    // (satisfied forbids, satisfied permits when known) among the policies `keep` accepts.
    let split = |r: &Raw, keep: &dyn Fn(&PolicyId) -> bool| {
        let ids: Vec<PolicyId> = r.reason.iter().filter(|id| keep(id)).cloned().collect();
        if r.allow {
            (Vec::new(), Some(ids))
        } else if r.reason.is_empty() {
            (Vec::new(), Some(Vec::new()))
        } else {
            (ids, None)
        }
    };
    let unchanged = |id: &PolicyId| !dependent.contains(id);
    let (mut satisfied_forbids, permits) = split(first, &unchanged);
    let (again_forbids, again_permits) = split(&again, &|_| true);
    satisfied_forbids.extend(again_forbids);
    let mut errors: Vec<(PolicyId, String)> = first
        .errors
        .iter()
        .filter(|(id, _)| unchanged(id))
        .cloned()
        .collect();
    errors.extend(again.errors);
    let raw = if !satisfied_forbids.is_empty() {
        Raw {
            allow: false,
            reason: satisfied_forbids,
            errors,
        }
    } else if let (Some(mut permits), Some(again_permits)) = (permits, again_permits) {
        permits.extend(again_permits);
        Raw {
            allow: !permits.is_empty(),
            reason: permits,
            errors,
        }
    } else {
        cedar_eval(scoped.set, alt, entities)
    };
    judge(raw, forbids)
}

fn err_policy(e: &cedar_policy::AuthorizationError) -> &PolicyId {
    match e {
        cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => pe.policy_id(),
    }
}

fn err_message(e: &cedar_policy::AuthorizationError) -> String {
    match e {
        cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => pe.inner().to_string(),
    }
}

/// The decision over one set: both evaluations it made and the outcome.
struct Decided {
    outcome: Outcome,
    /// The request as made.
    first: Eval,
    /// The same request with `approved = true`, when the first was denied and the request
    /// can be approved.
    approved: Option<Eval>,
}

impl Decided {
    /// The determining policies and the errors reported for the outcome.
    fn reasons(self) -> (Vec<String>, Vec<String>) {
        let errors = self.first.errors;
        let policies = match (self.outcome, self.approved) {
            (Outcome::ApprovalRequired, Some(a)) => a.policies,
            _ => self.first.policies,
        };
        (policies.into_iter().collect(), errors)
    }
}

/// The decision procedure over one set: allow / deny / approval_required, with reasons.
/// `approved` builds the same request with `approved = true`; it is only called after a deny,
/// and only the policies that read `context.approved` are evaluated for it
/// ([`evaluate_approved`]).
fn decide_in(
    scoped: Scoped<'_>,
    dependent: &HashSet<PolicyId>,
    first: &Request,
    approved: &mut dyn FnMut() -> Result<Option<Request>, PolicyError>,
    entities: &Entities,
    forbids: &HashSet<PolicyId>,
) -> Result<Decided, PolicyError> {
    let e = evaluate(scoped.set, first, entities, forbids);
    if e.allow {
        return Ok(Decided {
            outcome: Outcome::Allow,
            first: e,
            approved: None,
        });
    }
    if let Some(alt) = approved()? {
        let a = evaluate_approved(scoped, dependent, &e.raw, &alt, entities, forbids);
        return Ok(Decided {
            outcome: if a.allow {
                Outcome::ApprovalRequired
            } else {
                Outcome::Deny
            },
            first: e,
            approved: Some(a),
        });
    }
    Ok(Decided {
        outcome: Outcome::Deny,
        first: e,
        approved: None,
    })
}

/// The workspace files that become the system prompt, in the order they are included
/// (`crate::agent::context` reads exactly these; policies see `context.prompt_file`).
pub const BOOTSTRAP_FILES: &[&str] = &["AGENTS.md", "SOUL.md", "USER.md", "MEMORY.md"];
/// The agent's memory: this file at the workspace root ...
pub const MEMORY_FILE: &str = "MEMORY.md";
/// ... and everything under this directory of the workspace (`context.memory_file`).
pub const MEMORY_DIR: &str = "memory";

/// Host directories every sandboxed tool can write besides its workspace: the sandbox's
/// private scratch mounts (`chitin_sandbox::SCRATCH_DIRS`, kept a subset of this list by a
/// test) and the host's shared temp directories.
pub const AGENT_SCRATCH_DIRS: &[&str] = &["/tmp", "/var/tmp", "/dev/shm"];

/// Whether `path` (absolute) lies in a location the agent can write: the workspace (when
/// given) or anything below it, or one of [`AGENT_SCRATCH_DIRS`] (also by its canonical
/// form). Lexical: `path` is normalized, nothing on it is followed.
pub fn agent_can_write(path: &Path, workspace: Option<&Path>) -> bool {
    static SCRATCH: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    let Some(p) = normalize(path) else {
        // Not absolute: it cannot be placed, so it counts as writable (fail closed).
        return true;
    };
    let scratch = SCRATCH.get_or_init(|| {
        let mut v: Vec<PathBuf> = AGENT_SCRATCH_DIRS.iter().map(PathBuf::from).collect();
        for d in AGENT_SCRATCH_DIRS {
            if let Ok(c) = std::fs::canonicalize(d)
                && !v.contains(&c)
            {
                v.push(c);
            }
        }
        v
    });
    workspace
        .and_then(normalize)
        .is_some_and(|w| p.starts_with(w))
        || scratch.iter().any(|s| p.starts_with(s))
}

/// Whether a program named `program` (argv\[0\]) from `cwd` is reached through a place the
/// agent can write: only a name with a `/` is looked up from `cwd` (a bare name goes through
/// the sandbox's PATH of system directories). A name with `..` counts as writable: `..` after
/// a link the agent controls leads wherever the link does, which no lexical check can tell.
pub fn named_program_writable(program: &str, cwd: &Path, workspace: Option<&Path>) -> bool {
    if !program.contains('/') {
        return false;
    }
    let p = Path::new(program);
    p.components().any(|c| c == Component::ParentDir) || agent_can_write(&cwd.join(p), workspace)
}

/// Whether `rel` (a path relative to the workspace root) is a bootstrap file. Compared
/// without regard to ASCII case, so a case-folding filesystem cannot give a second name.
fn is_prompt_file(rel: &Path) -> bool {
    let mut c = rel.components();
    match (c.next(), c.next()) {
        (Some(Component::Normal(n)), None) => BOOTSTRAP_FILES
            .iter()
            .any(|b| n.to_str().is_some_and(|n| n.eq_ignore_ascii_case(b))),
        _ => false,
    }
}

/// Whether `rel` (relative to the workspace root) is `MEMORY.md` or in `memory/`.
fn is_memory_file(rel: &Path) -> bool {
    let first = rel.components().next();
    let single = rel.components().count() == 1;
    match first {
        Some(Component::Normal(n)) => n.to_str().is_some_and(|n| {
            (single && n.eq_ignore_ascii_case(MEMORY_FILE)) || n.eq_ignore_ascii_case(MEMORY_DIR)
        }),
        _ => false,
    }
}

/// Computes the derived context attributes: `in_workspace` and `touches_state_dir` for file
/// tools and exec; `prompt_file` and `memory_file` for file tools; `command_writable` for
/// exec and for a `secret.use` request that names a program (`command_path`). Empty for
/// other requests. A caller's value under a derived name is replaced.
fn derive_context(
    action: &str,
    ctx: &Map<String, Value>,
    state_dirs: &[PathBuf],
) -> Vec<(&'static str, bool)> {
    let string = |k: &str| ctx.get(k).and_then(Value::as_str);
    if action == "secret.use" {
        // The releasing code computes it with the workspace; the engine can only add what the
        // path itself shows (a temp dir), never clear it.
        return match string("command_path") {
            Some(p) => {
                let said = ctx.get("command_writable").and_then(Value::as_bool);
                let ws = string("workspace").map(Path::new);
                vec![(
                    "command_writable",
                    said.unwrap_or(false) || agent_can_write(Path::new(p), ws),
                )]
            }
            None => Vec::new(),
        };
    }
    match derive_paths(action, ctx, state_dirs) {
        Some((in_ws, touches)) => {
            let mut out = vec![("in_workspace", in_ws), ("touches_state_dir", touches)];
            let workspace = string("workspace").and_then(|w| normalize(Path::new(w)));
            let exec_shape =
                action == "exec" || ctx.contains_key("cwd") || ctx.contains_key("argv");
            if !exec_shape {
                let rel = match (
                    string("path").and_then(|p| normalize(Path::new(p))),
                    &workspace,
                ) {
                    (Some(p), Some(w)) => p.strip_prefix(w).ok().map(Path::to_path_buf),
                    _ => None,
                };
                let rel = rel.as_deref();
                out.push(("prompt_file", rel.is_some_and(is_prompt_file)));
                out.push(("memory_file", rel.is_some_and(is_memory_file)));
            } else if action == "exec" || ctx.contains_key("command_path") {
                // The program, or the name it was given by (a link the agent could swap
                // between this decision and the exec), lies where the agent can write.
                let ws = workspace.as_deref();
                let resolved =
                    string("command_path").is_none_or(|p| agent_can_write(Path::new(p), ws));
                let cwd = Path::new(string("cwd").unwrap_or(""));
                let named = ctx
                    .get("argv")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .and_then(Value::as_str)
                    .is_some_and(|p| named_program_writable(p, cwd, ws));
                out.push(("command_writable", resolved || named));
            }
            out
        }
        None => Vec::new(),
    }
}

/// `in_workspace` and `touches_state_dir` for file tools and exec; `None` for other actions.
fn derive_paths(
    action: &str,
    ctx: &Map<String, Value>,
    state_dirs: &[PathBuf],
) -> Option<(bool, bool)> {
    let string = |k: &str| ctx.get(k).and_then(Value::as_str);
    let workspace = string("workspace").and_then(|w| normalize(Path::new(w)));
    let under_state = |p: &Path| state_dirs.iter().any(|s| p.starts_with(s));
    // By the context's shape, not the action's name: an operator's own file action with a
    // `path` gets the same derived attributes (and the caller's values are ignored).
    let shape =
        if action == Action::Exec.as_str() || ctx.contains_key("cwd") || ctx.contains_key("argv") {
            "exec"
        } else if ctx.contains_key("path") {
            "file"
        } else {
            ""
        };
    let (target, extra_touch) = match shape {
        "file" => (string("path"), false),
        "exec" => {
            let cwd = string("cwd");
            let cwd_path = cwd.and_then(|c| normalize(Path::new(c)));
            let argv_touch = ctx
                .get("argv")
                .and_then(Value::as_array)
                .is_some_and(|argv| {
                    argv.iter().filter_map(Value::as_str).any(|arg| {
                        let joined = match &cwd_path {
                            Some(c) if !arg.starts_with('/') => normalize(&c.join(arg)),
                            _ => normalize(Path::new(arg)),
                        };
                        joined.as_deref().is_some_and(under_state)
                            || state_dirs
                                .iter()
                                .any(|s| arg.contains(&*s.to_string_lossy()))
                    })
                });
            (cwd, argv_touch)
        }
        _ => return None,
    };
    let target = target.and_then(|t| normalize(Path::new(t)));
    let in_ws = match (&target, &workspace) {
        (Some(t), Some(w)) => t.starts_with(w),
        _ => false,
    };
    let touches = extra_touch || target.as_deref().is_some_and(under_state);
    Some((in_ws, touches))
}

/// Lexical normalization of an absolute path (`.` and `..` resolved without touching the
/// filesystem). `None` for a relative path. The gate canonicalizes real paths before they get
/// here; this keeps hand-written requests honest too.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    if !p.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// What an engine loads: where policies and entities come from, and Chitin's state dir.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// A policy directory, or `None` for the built-in defaults.
    pub policy_dir: Option<PathBuf>,
    /// Entity files; a file that does not exist is skipped.
    pub entity_files: Vec<PathBuf>,
    /// Chitin's state directory (for `touches_state_dir`).
    pub state_dir: Option<PathBuf>,
}

/// A compiled set with its entities: what a decision is made against.
#[derive(Debug)]
pub struct Active {
    pub compiled: Arc<Compiled>,
    pub entities: Entities,
    pub source: String,
    /// The entity files as read for this set (reused when only the managed entities change).
    files: Vec<EntitySource>,
    /// [`PolicyEngine::could_allow`] answers for this set (it is replaced whole on reload).
    could_allow: RwLock<HashMap<(EntityUid, EntityUid), bool>>,
}

/// Summary of a (re)load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub source: String,
    pub policies: usize,
    pub shadow: usize,
    pub files: usize,
}

/// The policy engine: the active set, swapped whole on a successful reload.
#[derive(Debug)]
pub struct PolicyEngine {
    spec: EngineSpec,
    active: RwLock<Arc<Active>>,
    /// Entities Chitin manages in `state.db` (paired identities), merged with the entity
    /// files on every build; see [`Self::set_managed_entities`].
    managed: RwLock<Vec<Value>>,
    /// Operator accounts Chitin manages in `state.db` (`User` entities with their groups, from
    /// `chitin users add` and single sign-on); see [`Self::set_managed_users`].
    managed_users: RwLock<Vec<Value>>,
    /// Serializes reloads and managed-entity updates (each builds from the other's result).
    updating: Mutex<()>,
    last_error: Mutex<Option<String>>,
    state_dirs: Vec<PathBuf>,
}

impl PolicyEngine {
    /// Loads and validates; an invalid set is an error (refuse to start).
    pub fn load(spec: EngineSpec) -> Result<Self, PolicyError> {
        let active = Self::build(&spec, &[])?;
        let mut state_dirs = Vec::new();
        if let Some(sd) = &spec.state_dir {
            if let Some(n) = normalize(sd) {
                state_dirs.push(n);
            }
            if let Ok(c) = std::fs::canonicalize(sd)
                && !state_dirs.contains(&c)
            {
                state_dirs.push(c);
            }
        }
        Ok(Self {
            spec,
            active: RwLock::new(Arc::new(active)),
            managed: RwLock::default(),
            managed_users: RwLock::default(),
            updating: Mutex::new(()),
            last_error: Mutex::new(None),
            state_dirs,
        })
    }

    /// Builds an engine from an already compiled set (tests, `policy test`).
    pub fn from_parts(compiled: Compiled, entities: Entities, state_dir: Option<PathBuf>) -> Self {
        let spec = EngineSpec {
            policy_dir: None,
            entity_files: Vec::new(),
            state_dir: state_dir.clone(),
        };
        Self {
            spec,
            active: RwLock::new(Arc::new(Active {
                compiled: Arc::new(compiled),
                entities,
                source: "<in memory>".into(),
                files: Vec::new(),
                could_allow: RwLock::default(),
            })),
            managed: RwLock::default(),
            managed_users: RwLock::default(),
            updating: Mutex::new(()),
            last_error: Mutex::new(None),
            state_dirs: state_dir.into_iter().collect(),
        }
    }

    fn build(spec: &EngineSpec, managed: &[Value]) -> Result<Active, PolicyError> {
        let (input, source) = match &spec.policy_dir {
            Some(d) => (PolicyInput::from_dir(d)?, d.display().to_string()),
            None => (PolicyInput::embedded(), "<built-in defaults>".to_string()),
        };
        let compiled = compile(&input)?;
        let mut sources = Vec::new();
        for f in &spec.entity_files {
            if f.exists() {
                sources.push(EntitySource::from_file(f)?);
            }
        }
        let entities = build_entities(compiled.schema(), &with_managed(&sources, managed))?;
        Ok(Active {
            compiled: Arc::new(compiled),
            entities,
            source,
            files: sources,
            could_allow: RwLock::default(),
        })
    }

    /// The managed entities as they are now (paired identities, then managed users).
    fn managed_now(&self) -> Vec<Value> {
        let mut all = match self.managed.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        all.extend(self.users_now());
        all
    }

    /// The managed users as they are now.
    fn users_now(&self) -> Vec<Value> {
        match self.managed_users.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Checks that `users` (managed `User` entities) would build with the active set and the
    /// paired identities. Changes nothing.
    pub fn check_managed_users(&self, users: &[Value]) -> Result<(), PolicyError> {
        let mut all = match self.managed.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        all.extend(users.iter().cloned());
        self.with_managed_entities(&all).map(|_| ())
    }

    /// Replaces the managed users (operator accounts kept in `state.db`) and installs the
    /// rebuilt entity store, whole or not at all; the same set again costs nothing.
    pub fn set_managed_users(&self, users: Vec<Value>) -> Result<(), PolicyError> {
        let _serial = self.updating.lock().map_err(|_| PolicyError::Entities {
            source_name: MANAGED_SOURCE.into(),
            message: "policy engine lock poisoned; restart the gateway".into(),
        })?;
        if self.users_now() == users {
            return Ok(());
        }
        let mut all = match self.managed.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        all.extend(users.iter().cloned());
        let active = self.with_managed_entities(&all)?;
        match self.managed_users.write() {
            Ok(mut g) => *g = users,
            Err(poisoned) => *poisoned.into_inner() = users,
        }
        let mut g = match self.active.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Arc::new(active);
        Ok(())
    }

    /// The groups `user` is in (transitively) in the active entity store, sorted; empty for a
    /// user the store does not know.
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        let active = self.active();
        let Ok(uid) =
            format!("Chitin::User::{}", Value::String(user.to_string())).parse::<EntityUid>()
        else {
            return Vec::new();
        };
        let mut out: Vec<String> = active
            .entities
            .ancestors(&uid)
            .into_iter()
            .flatten()
            .filter(|a| a.type_name().to_string() == "Chitin::Group")
            .map(|a| a.id().unescaped().to_string())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The ids of the `Chitin::User` entities the entity files define, sorted.
    pub fn entity_file_users(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .active()
            .files
            .iter()
            .filter_map(|f| f.json.as_array())
            .flatten()
            .filter(|v| v["uid"]["type"] == "Chitin::User")
            .filter_map(|v| v["uid"]["id"].as_str().map(str::to_string))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether the entity files (not the managed store) define `Chitin::User::"<user>"`.
    pub fn user_in_entity_files(&self, user: &str) -> bool {
        let key = format!("Chitin::User::{user:?}");
        self.active().files.iter().any(|f| {
            f.json
                .as_array()
                .is_some_and(|a| a.iter().any(|v| uid_key(v) == key))
        })
    }

    /// The active set with `managed` as the managed entities (same policies, same entity
    /// files as read for the active set): built, not installed.
    fn with_managed_entities(&self, managed: &[Value]) -> Result<Active, PolicyError> {
        let active = self.active();
        let entities = build_entities(
            active.compiled.schema(),
            &with_managed(&active.files, managed),
        )?;
        Ok(Active {
            compiled: Arc::clone(&active.compiled),
            entities,
            source: active.source.clone(),
            files: active.files.clone(),
            could_allow: RwLock::default(),
        })
    }

    /// Checks that `managed` (Cedar entity JSON, e.g. paired identities from `state.db`)
    /// would build with the active set: valid against the schema and redefining nothing the
    /// entity files define. Changes nothing.
    pub fn check_managed_entities(&self, managed: &[Value]) -> Result<(), PolicyError> {
        let mut all = managed.to_vec();
        all.extend(self.users_now());
        self.with_managed_entities(&all).map(|_| ())
    }

    /// Replaces the managed entities (the entity store Chitin keeps in `state.db`: paired
    /// identities as members of their `User`) and installs the rebuilt entity store with the
    /// active policies, whole or not at all. Every later reload merges them again with the
    /// entity files; an entity file that redefines a managed entity makes that reload fail
    /// (the last good set stays).
    /// The same set again (the channel engine re-reads the store before every batch) changes
    /// nothing and costs no rebuild.
    pub fn set_managed_entities(&self, managed: Vec<Value>) -> Result<(), PolicyError> {
        let _serial = self.updating.lock().map_err(|_| PolicyError::Entities {
            source_name: MANAGED_SOURCE.into(),
            message: "policy engine lock poisoned; restart the gateway".into(),
        })?;
        let unchanged = match self.managed.read() {
            Ok(g) => *g == managed,
            Err(poisoned) => *poisoned.into_inner() == managed,
        };
        if unchanged {
            return Ok(());
        }
        let mut all = managed.clone();
        all.extend(self.users_now());
        let active = self.with_managed_entities(&all)?;
        match self.managed.write() {
            Ok(mut g) => *g = managed,
            Err(poisoned) => *poisoned.into_inner() = managed,
        }
        let mut g = match self.active.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Arc::new(active);
        Ok(())
    }

    /// Re-reads policies and entities. On success the new set replaces the old one atomically;
    /// on failure the old set stays active and the error is remembered (see [`Self::last_error`]).
    pub fn reload(&self) -> Result<LoadReport, PolicyError> {
        let _serial = match self.updating.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        match Self::build(&self.spec, &self.managed_now()) {
            Ok(active) => {
                let report = report_of(&active);
                // A poisoned lock only means a reader panicked; the swap itself is still whole.
                let mut g = match self.active.write() {
                    Ok(g) => g,
                    Err(poisoned) => poisoned.into_inner(),
                };
                *g = Arc::new(active);
                drop(g);
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(report)
            }
            Err(err) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(err.to_string());
                }
                Err(err)
            }
        }
    }

    /// The files a reload reads (the policy directory, when not the built-in defaults, and the
    /// entity files): what a file watcher should watch.
    pub fn watched_paths(&self) -> Vec<PathBuf> {
        self.spec
            .policy_dir
            .iter()
            .cloned()
            .chain(self.spec.entity_files.iter().cloned())
            .collect()
    }

    /// The error of the last failed reload, if the last reload failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// The active set.
    pub fn active(&self) -> Arc<Active> {
        match self.active.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Summary of the active set.
    pub fn report(&self) -> LoadReport {
        report_of(&self.active())
    }

    /// Whether `principal` could ever be allowed `action` under the active set: some enforced
    /// permit's scope can match them, and no enforced forbid without conditions covers every
    /// resource. A `false` is certain (the agent does not offer such tools to the model); a
    /// `true` still needs a real decision for each call.
    pub fn could_allow(
        &self,
        principal: &EntityUid,
        action: &EntityUid,
    ) -> Result<bool, PolicyError> {
        let active = self.active();
        let key = (principal.clone(), action.clone());
        if let Some(v) = active
            .could_allow
            .read()
            .ok()
            .and_then(|c| c.get(&key).copied())
        {
            return Ok(v);
        }
        let v = Self::could_allow_uncached(&active, principal, action)?;
        if let Ok(mut c) = active.could_allow.write() {
            if c.len() >= SET_CACHE_LIMIT {
                c.clear();
            }
            c.insert(key, v);
        }
        Ok(v)
    }

    fn could_allow_uncached(
        active: &Active,
        principal: &EntityUid,
        action: &EntityUid,
    ) -> Result<bool, PolicyError> {
        let sets = active
            .compiled
            .sets_for(action, principal, None, &active.entities, None)?;
        let mut permit = false;
        for p in sets.enforced.policies() {
            // The set holds every policy that may apply to some principal with these anchors
            // (`principal is T` and `principal == E` for an ancestor E are in it too): only
            // those whose scope matches this principal count, either way.
            if !principal_scope_matches(p, principal, &active.entities) {
                continue;
            }
            match p.effect() {
                cedar_policy::Effect::Permit => permit = true,
                cedar_policy::Effect::Forbid => {
                    if is_unconditional(p)
                        && matches!(p.resource_constraint(), ResourceConstraint::Any)
                    {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(permit)
    }

    /// Decides a request. `Err` means the request itself is malformed (unknown action,
    /// context that does not match the schema, ...): callers must treat that as a deny.
    pub fn decide(&self, req: &PolicyRequest) -> Result<Decision, PolicyError> {
        self.decide_with_entities(req, &[])
    }

    /// Decides a request with request-specific entities added to the active entity store for
    /// this decision only (e.g. the `Skill` entity built from a verified signature). `extra`
    /// is Cedar entity JSON, checked against the schema; an entity that is already defined is
    /// an error (so a request cannot redefine an operator's entity), and so is anything that
    /// does not match the schema.
    pub fn decide_with_entities(
        &self,
        req: &PolicyRequest,
        extra: &[Value],
    ) -> Result<Decision, PolicyError> {
        let active = self.active();
        let merged;
        let entities = if extra.is_empty() {
            &active.entities
        } else {
            merged = merge_extra(&active, extra)?;
            &merged
        };
        self.decide_in_active(&active, req, entities, &[])
    }

    /// The derived context attributes the engine computes for `req` (name, value): what
    /// overrides anything the caller sent under those names.
    pub fn derived_context(&self, req: &PolicyRequest) -> Vec<(&'static str, bool)> {
        derive_context(&req.action_name(), &req.context, &self.state_dirs)
    }

    /// Decides `req` against `active` with `overrides` (context attribute, JSON value)
    /// replacing the caller's values and the derived ones (what `explain` asks: "what if this
    /// attribute were different").
    pub(crate) fn decide_in_active(
        &self,
        active: &Active,
        req: &PolicyRequest,
        entities: &Entities,
        overrides: &[(String, Value)],
    ) -> Result<Decision, PolicyError> {
        let compiled = &active.compiled;
        let schema = &compiled.schema;
        let action_name = req.action_name();
        let mut derived: Vec<(&str, Value)> =
            derive_context(&action_name, &req.context, &self.state_dirs)
                .into_iter()
                .map(|(n, v)| (n, Value::Bool(v)))
                .collect();
        for (name, v) in overrides {
            derived.retain(|(n, _)| *n != name.as_str());
            derived.push((name.as_str(), v.clone()));
        }
        // The context as Cedar will see it: derived attributes and overrides first.
        let lookup = |k: &str| -> Option<Value> {
            derived
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| req.context.get(k).cloned())
        };
        let sets = compiled.sets_for(
            &req.action,
            &req.principal,
            Some(&req.resource),
            entities,
            Some(&lookup),
        )?;
        let is_grant = action_name == "approval.grant";
        let is_secret_use = action_name == "secret.use";
        let entity_field =
            |k: &str| (is_grant && k == "requester") || (is_secret_use && k == "user");
        let replaced = |k: &str, approved: Option<bool>| {
            derived.iter().any(|(name, _)| *name == k) || (approved.is_some() && k == "approved")
        };
        // Builds the request from the caller's context without copying it: derived attributes
        // (and overrides) replace whatever the caller sent under those names, and `approved`
        // can be overridden.
        let fast = |approved: Option<bool>| -> Result<Request, PolicyError> {
            let mut pairs = Vec::with_capacity(req.context.len() + 2);
            for (k, v) in &req.context {
                if replaced(k, approved) {
                    continue;
                }
                // Typed pairs are ~8x cheaper than Cedar's JSON context parser; the schema
                // check happens in `Request::new` (types, missing and undeclared attributes).
                let value = if entity_field(k) {
                    requester_entity(v)
                } else {
                    restricted(v)
                }
                .map_err(|e| PolicyError::Request(format!("context.{k}: {e}")))?;
                pairs.push((k.clone(), value));
            }
            for (name, v) in &derived {
                let value = restricted(v)
                    .map_err(|e| PolicyError::Request(format!("context.{name}: {e}")))?;
                pairs.push(((*name).into(), value));
            }
            if let Some(a) = approved {
                pairs.push(("approved".into(), RestrictedExpression::new_bool(a)));
            }
            let context = Context::from_pairs(pairs)
                .map_err(|e| PolicyError::Request(format!("context: {e}")))?;
            // The approval variant differs from the schema-checked first request only in the
            // Bool `approved`, so checking it again would prove nothing new.
            let check = if approved.is_some() {
                None
            } else {
                Some(schema)
            };
            Request::new(
                req.principal.clone(),
                req.action.clone(),
                req.resource.clone(),
                context,
                check,
            )
            .map_err(|e| PolicyError::Request(e.to_string()))
        };
        // Cedar's own schema-directed JSON parser: it accepts every form Cedar does (a decimal
        // or IP address written as a plain string where the schema expects one, the
        // `{"fn": ..., "arg": ...}` and `{"__extn": ...}` forms, implicit entity references).
        // Used only when the typed build refuses the context.
        let cedar_json = |approved: Option<bool>| -> Result<Request, PolicyError> {
            let mut m = Map::new();
            for (k, v) in &req.context {
                if replaced(k, approved) {
                    continue;
                }
                let value = match v {
                    Value::String(s) if entity_field(k) => user_entity_json(s)
                        .map_err(|e| PolicyError::Request(format!("context.{k}: {e}")))?,
                    other => other.clone(),
                };
                m.insert(k.clone(), value);
            }
            for (name, v) in &derived {
                m.insert((*name).to_string(), v.clone());
            }
            if let Some(a) = approved {
                m.insert("approved".into(), Value::Bool(a));
            }
            let context = Context::from_json_value(Value::Object(m), Some((schema, &req.action)))
                .map_err(|e| PolicyError::Request(format!("context: {e}")))?;
            Request::new(
                req.principal.clone(),
                req.action.clone(),
                req.resource.clone(),
                context,
                Some(schema),
            )
            .map_err(|e| PolicyError::Request(e.to_string()))
        };
        let (first, use_json) = match fast(None) {
            Ok(r) => (r, false),
            // The typed build's message is kept when Cedar refuses the context too.
            Err(e) => (cedar_json(None).map_err(|_| e)?, true),
        };
        let build = |approved: Option<bool>| {
            if use_json {
                cedar_json(approved)
            } else {
                fast(approved)
            }
        };
        // The `approved = true` variant, built at most once and only when a deny needs it.
        let wants_variant = matches!(req.context.get("approved"), Some(Value::Bool(false)));
        let mut variant: Option<Request> = None;
        let mut approved = || -> Result<Option<Request>, PolicyError> {
            if wants_variant && variant.is_none() {
                variant = Some(build(Some(true))?);
            }
            Ok(variant.clone())
        };
        let forbids = &compiled.forbids;
        let dependent = &compiled.approval_dependent;
        let enforced_scoped = Scoped {
            set: &sets.enforced,
            approval: sets.enforced_approval.as_ref(),
        };
        let enforced = decide_in(
            enforced_scoped,
            dependent,
            &first,
            &mut approved,
            entities,
            forbids,
        )?;
        let outcome = enforced.outcome;
        let mut shadow = BTreeSet::new();
        let mut shadow_decision = None;
        if let Some(with_shadow) = &sets.with_shadow {
            let trial = decide_in(
                Scoped {
                    set: with_shadow,
                    approval: sets.with_shadow_approval.as_ref(),
                },
                dependent,
                &first,
                &mut approved,
                entities,
                forbids,
            )?;
            if trial.outcome != outcome {
                // The shadow policies that make an evaluation come out differently: in the
                // request as made and, where the outcome depends on it, in the approval
                // re-evaluation. Ids are carried as data, never read back out of messages.
                let ids = |e: &Eval| -> Vec<String> {
                    e.policies
                        .iter()
                        .filter(|id| compiled.shadow.contains(&PolicyId::new(id.as_str())))
                        .cloned()
                        .collect()
                };
                if trial.first.allow != enforced.first.allow {
                    shadow.extend(ids(&trial.first));
                }
                if let Some(t2) = &trial.approved {
                    let e2 = match &enforced.approved {
                        Some(e2) => Some(e2.allow),
                        None => approved()?.map(|alt| {
                            evaluate_approved(
                                enforced_scoped,
                                dependent,
                                &enforced.first.raw,
                                &alt,
                                entities,
                                forbids,
                            )
                            .allow
                        }),
                    };
                    if e2.is_some_and(|allow| allow != t2.allow) {
                        shadow.extend(ids(t2));
                    }
                }
                shadow_decision = Some(trial.outcome);
            }
        }
        let (policies, errors) = enforced.reasons();
        Ok(Decision {
            decision: outcome,
            policies,
            shadow: shadow.into_iter().collect(),
            shadow_decision,
            errors,
        })
    }
}

/// Whether `p`'s principal scope matches `principal` (with its ancestors in `entities`).
pub(crate) fn principal_scope_matches(
    p: &Policy,
    principal: &EntityUid,
    entities: &Entities,
) -> bool {
    let within = |e: &EntityUid| {
        e == principal
            || entities
                .ancestors(principal)
                .is_some_and(|mut a| a.any(|x| x == e))
    };
    match p.principal_constraint() {
        PrincipalConstraint::Any => true,
        PrincipalConstraint::Is(t) => principal.type_name() == &t,
        PrincipalConstraint::Eq(e) => &e == principal,
        PrincipalConstraint::In(e) => within(&e),
        PrincipalConstraint::IsIn(t, e) => principal.type_name() == &t && within(&e),
    }
}

/// Whether a policy has no `when` / `unless` clause.
pub(crate) fn is_unconditional(p: &Policy) -> bool {
    p.to_json()
        .ok()
        .and_then(|j| {
            j.get("conditions")
                .and_then(Value::as_array)
                .map(Vec::is_empty)
        })
        .unwrap_or(false)
}

/// The active entities with `extra` added, each checked against the schema; one already
/// defined differently is an error ([`PolicyEngine::decide_with_entities`]).
///
/// Each entity is parsed by itself: a set parsed with the schema gets the schema's action
/// entities too, which then had to be compared one by one with the active set's (issue #21:
/// with the copy of the set, 6 % of a gateway's CPU per channel message). Entities without
/// parents (what the channels add: an unpaired identity, a conversation) change no entity's
/// ancestors, so the transitive closure, already computed for the active set, is kept as it
/// is instead of recomputed over every entity. (One narrowing against parsing them as a set:
/// an entity re-declared identically whose ancestors beyond its parents came only from other
/// request entities is now refused as a duplicate; nothing sends such a set.)
fn merge_extra(active: &Active, extra: &[Value]) -> Result<Entities, PolicyError> {
    use cedar_policy_core::entities::TCComputation;
    let request =
        |e: &dyn std::fmt::Display| PolicyError::Request(format!("request entities: {e}"));
    let schema = &active.compiled.schema;
    let add = extra
        .iter()
        .map(|v| {
            cedar_policy::Entity::from_json_value(v.clone(), Some(schema)).map_err(|e| request(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let closure = if add.iter().any(|e| e.as_ref().parents().next().is_some()) {
        TCComputation::ComputeNow
    } else {
        TCComputation::AssumeAlreadyComputed
    };
    let core: &cedar_policy_core::entities::Entities = active.entities.as_ref();
    // Conformance was checked by the parse.
    core.clone()
        .add_entities(
            add.into_iter().map(|e| Arc::new(e.as_ref().clone())),
            None::<&cedar_policy_core::entities::NoEntitiesSchema>,
            closure,
            cedar_policy_core::extensions::Extensions::all_available(),
        )
        .map(Entities::from)
        .map_err(|e| request(&e))
}

/// A `User` written as an id (`"alice"`) or an entity reference (`Chitin::User::"alice"`),
/// in Cedar's JSON entity form.
fn user_entity_json(s: &str) -> Result<Value, String> {
    let uid = if s.contains("::") {
        EntityUid::from_str(s).map_err(|e| e.to_string())?
    } else {
        let ty = EntityTypeName::from_str("Chitin::User").map_err(|e| e.to_string())?;
        EntityUid::from_type_name_and_id(ty, EntityId::new(s))
    };
    Ok(serde_json::json!({"__entity": {
        "type": uid.type_name().to_string(),
        "id": uid.id().unescaped(),
    }}))
}

/// `approval.grant`'s `requester` and `secret.use`'s `user` are a `User`. It may be given as a
/// user id (`"alice"`), an entity reference (`"Chitin::User::\"alice\""`) or Cedar's JSON
/// entity forms.
fn requester_entity(v: &Value) -> Result<RestrictedExpression, String> {
    match v {
        Value::String(s) if s.contains("::") => {
            let uid = EntityUid::from_str(s).map_err(|e| e.to_string())?;
            Ok(RestrictedExpression::new_entity_uid(uid))
        }
        Value::String(s) => {
            let ty = EntityTypeName::from_str("Chitin::User").map_err(|e| e.to_string())?;
            Ok(RestrictedExpression::new_entity_uid(
                EntityUid::from_type_name_and_id(ty, EntityId::new(s)),
            ))
        }
        other => restricted(other),
    }
}

/// `decimal(arg)`, as [`RestrictedExpression::new_decimal`] builds it but with the name
/// `decimal` parsed once per process (`new_decimal` runs Cedar's parser on it at every call:
/// ~15 µs, twice per `model.call` decision). Like `new_decimal`, `arg` is checked when the
/// request is made.
fn decimal(arg: &str) -> RestrictedExpression {
    use cedar_policy_core::ast::{Name, RestrictedExpr, UnreservedId};
    static NAME: std::sync::OnceLock<Option<Name>> = std::sync::OnceLock::new();
    let name = NAME.get_or_init(|| {
        "decimal"
            .parse::<UnreservedId>()
            .ok()
            .map(Name::unqualified_name)
    });
    match name {
        Some(n) => RestrictedExpression::from(RestrictedExpr::call_extension_fn(
            n.clone(),
            [RestrictedExpr::val(arg)],
        )),
        None => RestrictedExpression::new_decimal(arg),
    }
}

/// Converts a JSON context value to a Cedar value: strings, booleans, integers, sets (arrays),
/// records (objects) and entity references (`{"__entity": {"type": ..., "id": ...}}`).
fn restricted(v: &Value) -> Result<RestrictedExpression, String> {
    Ok(match v {
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => RestrictedExpression::new_long(
            n.as_i64()
                .ok_or_else(|| format!("{n} is not a 64-bit integer"))?,
        ),
        Value::Array(items) => RestrictedExpression::new_set(
            items
                .iter()
                .map(restricted)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(m)
            if (m.len() == 1 && m.contains_key("__extn"))
                || (m.len() == 2 && m.contains_key("fn") && m.contains_key("arg")) =>
        {
            // An extension value: `{"__extn": {"fn": "decimal" | "ip", "arg": "..."}}` or
            // Cedar's implicit form `{"fn": ..., "arg": ...}`.
            let e = m.get("__extn").unwrap_or(v);
            let f = e
                .get("fn")
                .and_then(Value::as_str)
                .ok_or("__extn needs a string `fn`")?;
            let arg = e
                .get("arg")
                .and_then(Value::as_str)
                .ok_or("__extn needs a string `arg`")?;
            match f {
                "decimal" => decimal(arg),
                "ip" | "ipaddr" => RestrictedExpression::new_ip(arg),
                other => return Err(format!("unsupported extension function `{other}`")),
            }
        }
        Value::Object(m) => {
            // Cedar's implicit entity form `{"type": ..., "id": ...}` (no record in the schema
            // has exactly these two fields), or the explicit `{"__entity": {...}}`.
            let implicit =
                (m.len() == 2 && m.contains_key("type") && m.contains_key("id")).then_some(v);
            if let Some(e) = m.get("__entity").or(implicit) {
                let ty = e
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or("__entity needs a string `type`")?;
                let id = e
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("__entity needs a string `id`")?;
                let uid = EntityUid::from_type_name_and_id(
                    EntityTypeName::from_str(ty).map_err(|e| e.to_string())?,
                    EntityId::new(id),
                );
                RestrictedExpression::new_entity_uid(uid)
            } else {
                let fields = m
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), restricted(v)?)))
                    .collect::<Result<Vec<_>, String>>()?;
                RestrictedExpression::new_record(fields).map_err(|e| e.to_string())?
            }
        }
        Value::Null => return Err("null is not a Cedar value".into()),
    })
}

fn report_of(active: &Active) -> LoadReport {
    LoadReport {
        source: active.source.clone(),
        policies: active.compiled.enforced_count,
        shadow: active.compiled.shadow.len(),
        files: active.compiled.files.len(),
    }
}

#[cfg(test)]
mod slicing_tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse(None, text).unwrap()
    }

    #[test]
    fn a_decimal_context_value_is_the_one_cedar_builds() {
        for arg in [
            "0.0000",
            "12.5000",
            "900000000000.0000",
            "not a decimal",
            "",
        ] {
            assert_eq!(
                decimal(arg),
                RestrictedExpression::new_decimal(arg),
                "{arg}"
            );
        }
    }

    #[test]
    fn the_built_in_policies_validate_strictly_without_warnings() {
        let schema = Schema::from_json_str(builtin::SCHEMA_JSON).expect("the schema parses");
        let mut all = Vec::new();
        for (name, text) in builtin::DEFAULT_POLICIES {
            let set = PolicySet::from_str(text).expect("the file parses");
            for p in set.policies() {
                all.push(p.new_id(PolicyId::new(format!("{name}:{}", p.id()))));
            }
        }
        assert!(all.len() > builtin::DEFAULT_POLICIES.len());
        let set = PolicySet::from_policies(all).expect("distinct ids");
        let result = Validator::new(schema).validate(&set, ValidationMode::Strict);
        let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
        let warnings: Vec<String> = result
            .validation_warnings()
            .map(|w| w.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn a_changed_built_in_file_or_a_schema_of_ones_own_is_validated() {
        // One character more in a built-in file: its policies are validated again.
        let mut input = PolicyInput::embedded();
        input.policies[0].text.push_str(
            "\n@id(\"typo\") permit(principal, action, resource) when { context.no_such_attr };\n",
        );
        let Err(PolicyError::Invalid(diags)) = compile(&input) else {
            panic!("a policy naming an undeclared attribute must not compile");
        };
        assert!(
            diags.iter().any(|d| d.file.ends_with("agent.cedar")),
            "{diags:?}"
        );
        // The built-in files, unchanged, against a schema of one's own: validated against it.
        let mut input = PolicyInput::embedded();
        input.schema.text = "namespace Chitin { entity User; }".into();
        assert!(
            matches!(compile(&input), Err(PolicyError::Invalid(_))),
            "the built-in policies do not validate against a schema without their types"
        );
        // Unchanged, against the built-in schema: compiles.
        compile(&PolicyInput::embedded()).expect("the built-in set compiles");
    }

    #[test]
    fn every_policys_est_from_its_files_one_parse_is_the_one_cedar_gives_it() {
        let mut files: Vec<String> = builtin::DEFAULT_POLICIES
            .iter()
            .map(|(_, t)| (*t).to_string())
            .collect();
        files.push(
            "@id(\"a\") permit(principal, action, resource) when { context.approved };\n\
             // a comment between\n\
             @id(\"b\") forbid(principal == Chitin::User::\"x\", action, resource)\n\
               when { context.path like \"/etc/*\" && resource.risk == \"high\" }\n\
               unless { [1, 2].contains(3) || {k: \"v\"}.k != \"v\" };"
                .into(),
        );
        let mut compared = 0;
        for text in &files {
            let set = PolicySet::from_str(text).expect("the file parses");
            let ests = file_ests(text);
            assert_eq!(ests.len(), set.policies().count());
            for p in set.policies() {
                let own = p.to_json().expect("Cedar gives the policy an EST");
                assert_eq!(ests.get(&p.id().to_string()), Some(&own), "{p}");
                compared += 1;
            }
        }
        assert!(compared > builtin::DEFAULT_POLICIES.len());
        // A file that does not parse has none (its errors come from `PolicySet::from_str`).
        assert!(file_ests("permit(principal, action, resource) when {").is_empty());
    }

    #[test]
    fn a_policy_reads_approved_when_it_names_it_or_uses_the_whole_context() {
        let reads = [
            "permit(principal, action, resource) when { context.approved };",
            "permit(principal, action, resource) unless { !context[\"approved\"] };",
            "permit(principal, action, resource) when { context has approved };",
            "permit(principal, action, resource) when { context == {approved: true} };",
            "permit(principal, action, resource) when { {c: context}.c.approved };",
            "forbid(principal, action, resource) when { context.tainted } unless { context.approved };",
        ];
        for text in reads {
            assert!(reads_approved(&policy(text)), "{text}");
        }
        let independent = [
            "permit(principal, action, resource);",
            "permit(principal, action, resource) when { context.tainted && context.path like \"approved*\" };",
            "permit(principal, action, resource) when { context has network && context.network };",
            "permit(principal, action, resource) when { principal.approved == context.session };",
        ];
        for text in independent {
            assert!(!reads_approved(&policy(text)), "{text}");
        }
    }

    #[test]
    fn only_a_leading_string_comparison_of_the_first_when_clause_is_indexed() {
        let p = "permit(principal, action, resource)";
        let indexed = [
            (
                format!("{p} when {{ context.command == \"ls\" }};"),
                "command",
                "ls",
            ),
            (
                format!("{p} when {{ context.command == \"ls\" && !context.network }};"),
                "command",
                "ls",
            ),
            (
                format!(
                    "{p} when {{ \"/w/a\" == context.path && context.tainted && context.network }};"
                ),
                "path",
                "/w/a",
            ),
            (
                format!(
                    "{p} when {{ context[\"host\"] == \"a.example\" }} unless {{ context.tainted }};"
                ),
                "host",
                "a.example",
            ),
        ];
        for (text, attr, lit) in &indexed {
            assert_eq!(
                leading_context_literal(&policy(text)),
                Some(((*attr).to_string(), (*lit).to_string())),
                "{text}"
            );
        }
        let not_indexed = [
            format!("{p};"),
            // Something that may error or be false first, then the comparison.
            format!("{p} when {{ context.network && context.command == \"ls\" }};"),
            format!("{p} when {{ context.command == \"ls\" || context.network }};"),
            format!("{p} when {{ !(context.command == \"ls\") }};"),
            format!("{p} when {{ context.command != \"ls\" }};"),
            format!("{p} unless {{ context.command == \"ls\" }};"),
            format!("{p} unless {{ context.tainted }} when {{ context.command == \"ls\" }};"),
            format!("{p} when {{ principal.name == \"ls\" }};"),
            format!("{p} when {{ context.count == 3 }};"),
            format!("{p} when {{ context.command == context.cwd }};"),
            // Attributes whose value differs between evaluations or is an entity.
            format!("{p} when {{ context.approved == \"yes\" }};"),
            format!("{p} when {{ context.requester == \"alice\" }};"),
            format!("{p} when {{ context.user == \"alice\" }};"),
        ];
        for text in &not_indexed {
            assert_eq!(leading_context_literal(&policy(text)), None, "{text}");
        }
    }

    #[test]
    fn policies_whose_literal_the_request_does_not_name_are_left_out_of_the_evaluated_set() {
        let mut input = PolicyInput::embedded();
        input.policies.push(Source {
            name: "many.cedar".into(),
            text: (0..50)
                .map(|i| {
                    format!(
                        "@id(\"gen.{i}\")\npermit (principal, action == Chitin::Action::\"exec\", resource)\nwhen {{ context.command == \"tool{i}\" && !context.network }};\n"
                    )
                })
                .collect(),
        });
        let compiled = compile(&input).unwrap();
        let entities = build_entities(compiled.schema(), &[]).unwrap();
        let exec = EntityUid::from_str("Chitin::Action::\"exec\"").unwrap();
        let alice = EntityUid::from_str("Chitin::User::\"alice\"").unwrap();
        let tool = EntityUid::from_str("Chitin::Tool::\"exec\"").unwrap();
        let count = |command: Option<&str>| {
            let get = |k: &str| -> Option<Value> {
                if k == "command" {
                    command.map(Value::from)
                } else {
                    None
                }
            };
            let lookup: ContextLookup<'_> = Some(&get);
            let sets = compiled
                .sets_for(&exec, &alice, Some(&tool), &entities, lookup)
                .unwrap();
            sets.enforced
                .policies()
                .filter(|p| p.id().to_string().starts_with("gen."))
                .count()
        };
        assert_eq!(count(Some("ls")), 0);
        assert_eq!(count(Some("tool7")), 1);
        // No string to go by: every one of them is evaluated (and may error).
        assert_eq!(count(None), 50);
        let all = compiled
            .sets_for(&exec, &alice, Some(&tool), &entities, None)
            .unwrap();
        assert_eq!(
            all.enforced
                .policies()
                .filter(|p| p.id().to_string().starts_with("gen."))
                .count(),
            50
        );
    }
}
