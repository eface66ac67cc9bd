//! `chitin policy diff`: the requests whose decision changes between two policy sets (the
//! review step before a policy change ships), over given requests or generated ones.
//!
//! Generated requests are deterministic for a seed: for each action of the new set's schema,
//! principals and resources from the entity store (plus one unknown of each type), and
//! contexts built from the schema's context shape, with values taken from the literals both
//! sets compare context attributes with, both Booleans, and a few paths (inside and outside
//! the workspace, the state directory). Documented in `docs/policy-tooling.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::lint::conditions_of;
use super::{Compiled, Outcome, PolicyEngine, PolicyError, PolicyRequest};

/// One side of a compared request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffSide {
    /// The decision, or `None` when this set refuses the request as malformed.
    pub decision: Option<Outcome>,
    pub policies: Vec<String>,
    /// Why the request is malformed for this set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DiffSide {
    /// `allow`, `deny`, `approval_required` or `error`.
    pub fn label(&self) -> &'static str {
        self.decision.map_or("error", Outcome::as_str)
    }
}

/// A request whose decision changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffEntry {
    /// Its position among the requests compared (from 0).
    pub index: usize,
    pub request: Value,
    pub old: DiffSide,
    pub new: DiffSide,
}

/// The result of a diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffReport {
    /// Requests compared.
    pub requests: usize,
    /// The requests whose decision changes, in input order.
    pub changed: Vec<DiffEntry>,
    /// How many changed, by `"<old> -> <new>"`.
    pub summary: BTreeMap<String, usize>,
}

fn side(engine: &PolicyEngine, request: &Value) -> DiffSide {
    match PolicyRequest::from_json(request).and_then(|r| engine.decide(&r)) {
        Ok(d) => {
            let mut policies = d.policies;
            policies.sort();
            DiffSide {
                decision: Some(d.decision),
                policies,
                error: None,
            }
        }
        Err(e) => DiffSide {
            decision: None,
            policies: Vec::new(),
            error: Some(e.to_string()),
        },
    }
}

/// Decides every request with both engines and reports those whose decision differs (a
/// request one set refuses as malformed and the other decides counts as changed).
pub fn diff(old: &PolicyEngine, new: &PolicyEngine, requests: &[Value]) -> DiffReport {
    let mut changed = Vec::new();
    let mut summary = BTreeMap::new();
    for (index, request) in requests.iter().enumerate() {
        let (o, n) = (side(old, request), side(new, request));
        if o.decision != n.decision {
            *summary
                .entry(format!("{} -> {}", o.label(), n.label()))
                .or_insert(0) += 1;
            changed.push(DiffEntry {
                index,
                request: request.clone(),
                old: o,
                new: n,
            });
        }
    }
    DiffReport {
        requests: requests.len(),
        changed,
        summary,
    }
}

/// Reads requests: a JSON array of requests, a decision-vector file (`{"cases": [{"request":
/// ...}]}`), or JSON lines (one request per line).
pub fn parse_requests(text: &str) -> Result<Vec<Value>, PolicyError> {
    let trimmed = text.trim_start();
    if (trimmed.starts_with('[') || trimmed.starts_with('{'))
        && let Ok(v) = serde_json::from_str::<Value>(text)
    {
        return match v {
            Value::Array(a) => Ok(a),
            Value::Object(m) if m.contains_key("cases") => Ok(m
                .get("cases")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("request").cloned())
                .collect()),
            Value::Object(m) => Ok(vec![Value::Object(m)]),
            _ => Err(PolicyError::Request(
                "requests must be a JSON array of requests".into(),
            )),
        };
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| PolicyError::Request(format!("line {}: not valid JSON: {e}", i + 1)))
        })
        .collect()
}

/// xorshift64*: deterministic for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        usize::try_from(self.next() % (n as u64)).unwrap_or(0)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len()))
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

/// What generation draws values from.
struct Pools {
    /// Entity uids by type name (`Chitin::User` -> [...]).
    entities: BTreeMap<String, Vec<String>>,
    /// String literals by context attribute, from both sets.
    literals: BTreeMap<String, BTreeSet<String>>,
    /// Paths: the workspace and files in and outside it.
    workspace: String,
    paths: Vec<String>,
}

/// Generates `n` requests (deterministic for `seed`) that exercise both sets: every action of
/// `new`'s schema in turn, valid against it.
pub fn generate_requests(
    old: &Compiled,
    new: &Compiled,
    engine: &PolicyEngine,
    n: usize,
    seed: u64,
    state_dir: Option<&Path>,
) -> Result<Vec<Value>, PolicyError> {
    let (shape, _) = cedar_policy::schema_str_to_json_with_resolved_types(new.schema_text())
        .map_err(|e| PolicyError::Request(format!("schema: {e}")))?;
    let mut pools = Pools {
        entities: BTreeMap::new(),
        literals: BTreeMap::new(),
        workspace: "/workspace".into(),
        paths: Vec::new(),
    };
    for e in engine.active().entities.iter() {
        let uid = e.uid();
        pools
            .entities
            .entry(uid.type_name().to_string())
            .or_default()
            .push(uid.to_string());
    }
    // The engine's entities come out in hash order: sort so a seed gives the same requests.
    for v in pools.entities.values_mut() {
        v.sort();
    }
    for compiled in [old, new] {
        for p in compiled.policies() {
            for c in &conditions_of(p) {
                collect_strings(c, &mut pools.literals);
            }
        }
    }
    let state = state_dir.map_or_else(|| "/var/lib/chitin".into(), |s| s.display().to_string());
    pools.paths = vec![
        "/workspace/notes.md".into(),
        "/workspace/AGENTS.md".into(),
        "/workspace/memory/today.md".into(),
        "/workspace/src/main.rs".into(),
        "/etc/passwd".into(),
        "/tmp/x".into(),
        format!("{state}/secrets.age"),
    ];
    // (action uid, principal types, resource types, context type), from the schema JSON.
    let mut actions = Vec::new();
    let namespaces = shape.as_object().cloned().unwrap_or_default();
    for (ns, body) in &namespaces {
        let common = body.get("commonTypes").cloned().unwrap_or(Value::Null);
        let Some(acts) = body.get("actions").and_then(Value::as_object) else {
            continue;
        };
        for (name, a) in acts {
            let Some(applies) = a.get("appliesTo") else {
                continue;
            };
            let types = |k: &str| -> Vec<String> {
                applies
                    .get(k)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|t| qualify(ns, t))
                    .collect()
            };
            let (principals, resources) = (types("principalTypes"), types("resourceTypes"));
            if principals.is_empty() || resources.is_empty() {
                continue;
            }
            let action = if ns.is_empty() {
                format!("Action::{}", Value::String(name.clone()))
            } else {
                format!("{ns}::Action::{}", Value::String(name.clone()))
            };
            let context = applies
                .get("context")
                .cloned()
                .unwrap_or(json!({"type": "Record", "attributes": {}}));
            actions.push((
                action,
                name.clone(),
                principals,
                resources,
                context,
                ns.clone(),
                common.clone(),
            ));
        }
    }
    actions.sort_by(|a, b| a.0.cmp(&b.0));
    if actions.is_empty() {
        return Ok(Vec::new());
    }
    let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1);
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0;
    while out.len() < n && attempts < n.saturating_mul(4).max(16) {
        attempts += 1;
        let Some((action, name, principals, resources, context, ns, common)) =
            actions.get(attempts % actions.len())
        else {
            break;
        };
        let principal = entity_of(&mut rng, &pools, principals, None);
        let resource = entity_of(&mut rng, &pools, resources, Some(name));
        let ctx = value_of(&mut rng, &pools, context, "", ns, common, 0);
        let req =
            json!({"principal": principal, "action": action, "resource": resource, "context": ctx});
        // Keep what the new set accepts (the generator follows its schema).
        if PolicyRequest::from_json(&req)
            .and_then(|r| engine.decide(&r))
            .is_ok()
        {
            out.push(req);
        }
    }
    Ok(out)
}

fn qualify(ns: &str, t: &str) -> String {
    if t.contains("::") || ns.is_empty() {
        t.to_string()
    } else {
        format!("{ns}::{t}")
    }
}

fn entity_of(rng: &mut Rng, pools: &Pools, types: &[String], action: Option<&str>) -> String {
    let ty = rng.pick(types).cloned().unwrap_or_default();
    // A tool action's resource is the tool of the same name (what the gate asks), mostly.
    if let Some(a) = action
        && ty.ends_with("::Tool")
    {
        let own = format!("{ty}::{}", Value::String(a.to_string()));
        if pools.entities.get(&ty).is_some_and(|v| v.contains(&own)) && rng.below(4) != 0 {
            return own;
        }
    }
    let known = pools.entities.get(&ty).cloned().unwrap_or_default();
    match rng.pick(&known) {
        Some(k) if rng.below(8) != 0 => k.clone(),
        _ => format!("{ty}::\"unknown\""),
    }
}

/// A value of the schema type `ty` for the attribute `attr`.
fn value_of(
    rng: &mut Rng,
    pools: &Pools,
    ty: &Value,
    attr: &str,
    ns: &str,
    common: &Value,
    depth: usize,
) -> Value {
    let kind = ty.get("type").and_then(Value::as_str).unwrap_or("");
    let name = ty.get("name").and_then(Value::as_str).unwrap_or("");
    let common_of = |n: &str| {
        let short = n.rsplit("::").next().unwrap_or(n);
        common.get(short).cloned()
    };
    if depth > 4 {
        return json!("");
    }
    match kind {
        "Boolean" | "Bool" => json!(rng.coin()),
        "Long" => json!(*rng.pick(&[0_i64, 1, 1024, 1_000_000]).unwrap_or(&0)),
        "String" => string_for(rng, pools, attr),
        "Set" => {
            let element = ty
                .get("element")
                .cloned()
                .unwrap_or(json!({"type": "String"}));
            let len = rng.below(3);
            Value::Array(
                (0..len)
                    .map(|_| value_of(rng, pools, &element, attr, ns, common, depth + 1))
                    .collect(),
            )
        }
        "Record" => {
            let mut m = Map::new();
            if let Some(attrs) = ty.get("attributes").and_then(Value::as_object) {
                for (k, t) in attrs {
                    let required = t.get("required").and_then(Value::as_bool).unwrap_or(true);
                    if !required && rng.coin() {
                        continue;
                    }
                    m.insert(k.clone(), value_of(rng, pools, t, k, ns, common, depth + 1));
                }
            }
            Value::Object(m)
        }
        "Extension" => match name {
            "decimal" => json!(*rng.pick(&["0.0", "1.5", "10.0"]).unwrap_or(&"0.0")),
            _ => json!(
                *rng.pick(&["127.0.0.1", "93.184.216.34"])
                    .unwrap_or(&"127.0.0.1")
            ),
        },
        "Entity" => {
            let uid = entity_of(rng, pools, &[qualify(ns, name)], None);
            entity_json(&uid)
        }
        "EntityOrCommon" => match common_of(name) {
            Some(t) => value_of(rng, pools, &t, attr, ns, common, depth + 1),
            None => entity_json(&entity_of(rng, pools, &[qualify(ns, name)], None)),
        },
        other => match common_of(other) {
            Some(t) => value_of(rng, pools, &t, attr, ns, common, depth + 1),
            None => json!(""),
        },
    }
}

fn entity_json(uid: &str) -> Value {
    match uid.parse::<cedar_policy::EntityUid>() {
        Ok(u) => json!({"__entity": {"type": u.type_name().to_string(), "id": u.id().unescaped()}}),
        Err(_) => json!(uid),
    }
}

fn string_for(rng: &mut Rng, pools: &Pools, attr: &str) -> Value {
    match attr {
        "workspace" => return json!(pools.workspace),
        "path" | "cwd" | "command_path" => {
            let mut options = pools.paths.clone();
            options.push(pools.workspace.clone());
            options.push("/usr/bin/ls".into());
            return json!(rng.pick(&options).cloned().unwrap_or_default());
        }
        _ => {}
    }
    let lits: Vec<String> = pools
        .literals
        .get(attr)
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    match rng.pick(&lits) {
        Some(l) if rng.below(4) != 0 => json!(l),
        _ => json!("x"),
    }
}

/// String literals compared with `context.<a>` (`==`, `like`, `contains`) anywhere.
fn collect_strings(v: &Value, out: &mut BTreeMap<String, BTreeSet<String>>) {
    if let Value::Object(m) = v {
        for (op, args) in m {
            if matches!(op.as_str(), "==" | "!=") {
                let (l, r) = (args.get("left"), args.get("right"));
                for (a, b) in [(l, r), (r, l)] {
                    let attr = a
                        .and_then(|a| a.get("."))
                        .filter(|d| d.get("left") == Some(&json!({"Var": "context"})))
                        .and_then(|d| d.get("attr"))
                        .and_then(Value::as_str);
                    let lit = b.and_then(|b| b.get("Value")).and_then(Value::as_str);
                    if let (Some(attr), Some(lit)) = (attr, lit) {
                        out.entry(attr.into()).or_default().insert(lit.into());
                    }
                }
            }
            collect_strings(args, out);
        }
    } else if let Value::Array(a) = v {
        for x in a {
            collect_strings(x, out);
        }
    }
}
