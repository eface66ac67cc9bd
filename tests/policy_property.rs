//! The engine's decisions (sliced sets, typed context building, derived context, three
//! outcomes, shadow reports) against a plain `cedar-policy` evaluation of the whole policy set
//! over generated policy sets and requests: the slicing must stay an exact reduction.
//!
//! The reference builds each context with Cedar's own schema-directed JSON parser, with the
//! derived attributes taken from a hand-made table (not from the engine), evaluates the whole
//! enforced set (and the whole set with shadow policies) and applies Chitin's documented rules
//! on top: an erroring forbid denies; `approval_required` is "denied now, allowed with
//! `approved = true`"; shadow ids are the shadow policies determining an evaluation whose
//! result differs from the enforced one. A small deterministic generator (fixed seeds) keeps it
//! reproducible and quick.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Effect, Entities, EntityUid, Policy, PolicyId,
    PolicySet, Request, Schema,
};
use chitin::policy::{
    self, EntitySource, Outcome, PolicyEngine, PolicyInput, PolicyRequest, Source,
};
use serde_json::{Map, Value, json};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn entities_json() -> Value {
    json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::Group", "id": "staff"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "bob"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "staff"}]},
        {"uid": {"type": "Chitin::User", "id": "carol"}, "attrs": {}, "parents": []}
    ])
}

const PRINCIPAL_SCOPES: &[&str] = &[
    "principal",
    "principal is Chitin::User",
    r#"principal == Chitin::User::"alice""#,
    r#"principal == Chitin::User::"carol""#,
    r#"principal in Chitin::Group::"owners""#,
    r#"principal in Chitin::Group::"staff""#,
    r#"principal is Chitin::User in Chitin::Group::"staff""#,
];

/// An action family: its scopes, the resource scopes and conditions valid for every action
/// they cover.
struct Family {
    scopes: &'static [&'static str],
    resources: &'static [&'static str],
    conditions: &'static [&'static str],
}

/// Resource scopes over the tools the requests name (and one they never do): the engine
/// indexes policies by the entity a resource scope names.
const TOOL_RESOURCES: &[&str] = &[
    "resource",
    "resource",
    "resource is Chitin::Tool",
    r#"resource == Chitin::Tool::"exec""#,
    r#"resource == Chitin::Tool::"write_file""#,
    r#"resource in Chitin::Tool::"read_file""#,
    r#"resource is Chitin::Tool in Chitin::Tool::"workflow""#,
    r#"resource == Chitin::Tool::"unused""#,
];

const FILE_CONDS: &[&str] = &[
    "context.in_workspace",
    "context.approved",
    "context.tainted",
    "context.prompt_file",
    "context.memory_file",
    "context.touches_state_dir",
    r#"context.path like "*.env""#,
    r#"resource.risk == "high""#,
    r#"resource.risk != "low""#,
    r#"principal in Chitin::Group::"staff""#,
    r#"context.origin == "model""#,
    r#"context.path == "/w/a.txt""#,
    r#""/etc/hosts" == context.path"#,
];

const FAMILIES: &[Family] = &[
    Family {
        scopes: &[
            r#"action == Chitin::Action::"read_file""#,
            r#"action == Chitin::Action::"write_file""#,
            r#"action in [Chitin::Action::"read_file", Chitin::Action::"write_file"]"#,
            r#"action in Chitin::Action::"effect:fs_write""#,
            r#"action in [Chitin::Action::"effect:fs_read", Chitin::Action::"effect:fs_write"]"#,
        ],
        resources: TOOL_RESOURCES,
        conditions: FILE_CONDS,
    },
    Family {
        scopes: &[
            r#"action == Chitin::Action::"exec""#,
            r#"action in Chitin::Action::"effect:exec""#,
        ],
        resources: TOOL_RESOURCES,
        conditions: &[
            "context.network",
            "context.approved",
            "context.in_workspace",
            "context.command_writable",
            "context.touches_state_dir",
            r#"context.command == "curl""#,
            r#"context.command == "ls""#,
            r#""rm" == context.command"#,
            r#"resource.risk != "high""#,
            r#"context.argv.contains("-rf")"#,
        ],
    },
    Family {
        scopes: &[r#"action == Chitin::Action::"model.call""#],
        resources: &[
            "resource",
            r#"resource == Chitin::Agent::"main""#,
            r#"resource == Chitin::Agent::"other""#,
            "resource is Chitin::Agent",
        ],
        conditions: &[
            r#"context.spend_today_usd.greaterThan(decimal("5.0"))"#,
            "context.spend_today_usd.greaterThanOrEqual(context.daily_budget_usd)",
            "context.tainted",
            r#"context.model == "a/b""#,
            r#"context.model == "c/d""#,
        ],
    },
    Family {
        scopes: &["action"],
        resources: &["resource"],
        conditions: &[
            r#"principal in Chitin::Group::"staff""#,
            "principal is Chitin::User",
        ],
    },
];

fn condition(rng: &mut Rng, pool: &[&str]) -> String {
    let atom = |rng: &mut Rng| {
        let a = rng.pick(pool).to_string();
        if rng.chance(25) { format!("!({a})") } else { a }
    };
    match rng.below(3) {
        0 => atom(rng),
        1 => format!("{} && {}", atom(rng), atom(rng)),
        _ => format!("({} || {})", atom(rng), atom(rng)),
    }
}

/// A policy set of 3 to 9 policies (ids with `.`, `:` and `-`), some in shadow mode.
fn policy_set(rng: &mut Rng, n: usize) -> String {
    let mut out = String::new();
    let count = 3 + rng.below(7);
    for i in 0..count {
        let fam = rng.pick(FAMILIES);
        let effect = if rng.chance(60) { "permit" } else { "forbid" };
        let mode = if rng.chance(20) {
            r#" @mode("shadow")"#
        } else {
            ""
        };
        let sep = rng.pick(&[".", ":", "-"]);
        let mut text = format!(
            "@id(\"set{n}{sep}p{i}\"){mode}\n{effect} ({}, {}, {})",
            rng.pick(PRINCIPAL_SCOPES),
            rng.pick(fam.scopes),
            rng.pick(fam.resources)
        );
        for _ in 0..rng.below(3) {
            let kw = if rng.chance(70) { "when" } else { "unless" };
            text.push_str(&format!(" {kw} {{ {} }}", condition(rng, fam.conditions)));
        }
        text.push_str(";\n");
        out.push_str(&text);
    }
    out
}

/// A file path with its derived attributes (in_workspace, touches_state_dir, prompt_file,
/// memory_file), worked out by hand for workspace `/w` and state dir `/srv/chitin`.
const PATHS: &[(&str, [bool; 4])] = &[
    ("/w/a.txt", [true, false, false, false]),
    ("/w/AGENTS.md", [true, false, true, false]),
    ("/w/memory/x.md", [true, false, false, true]),
    ("/w/MEMORY.md", [true, false, true, true]),
    ("/w/sub/../.env", [true, false, false, false]),
    ("/w/../etc/passwd", [false, false, false, false]),
    ("/srv/chitin/secrets.age", [false, true, false, false]),
    ("/etc/hosts", [false, false, false, false]),
];

/// exec: (cwd, argv, command_path, in_workspace, touches_state_dir, command_writable).
const EXECS: &[(&str, &[&str], &str, [bool; 3])] = &[
    ("/w", &["ls"], "/usr/bin/ls", [true, false, false]),
    (
        "/w/sub",
        &["curl", "x"],
        "/usr/bin/curl",
        [true, false, false],
    ),
    (
        "/w",
        &["rm", "-rf", "/srv/chitin/k"],
        "/usr/bin/rm",
        [true, true, false],
    ),
    ("/tmp", &["tool"], "/w/bin/tool", [false, false, true]),
    ("/w", &["x"], "/tmp/x", [true, false, true]),
];

const DECIMALS: &[&str] = &["0.0", "5.0", "5.5", "10.25"];

fn decimal(rng: &mut Rng) -> Value {
    let d = *rng.pick(DECIMALS);
    match rng.below(3) {
        0 => json!(d),
        1 => json!({"fn": "decimal", "arg": d}),
        _ => json!({"__extn": {"fn": "decimal", "arg": d}}),
    }
}

/// A request (as `chitin policy eval` takes it) and the context the reference judges (the
/// caller's context with the derived attributes from the tables).
fn request(rng: &mut Rng) -> (Value, Value) {
    let principal = format!(
        "Chitin::User::\"{}\"",
        rng.pick(&["alice", "bob", "carol", "ghost"])
    );
    let approved = rng.chance(50);
    let tool = *rng.pick(&["exec", "read_file", "write_file", "workflow", "ghost"]);
    let base = |rng: &mut Rng| {
        let mut m = Map::new();
        m.insert("origin".into(), json!(rng.pick(&["model", "user"])));
        m.insert("session".into(), json!("s"));
        m.insert("approved".into(), json!(approved));
        m.insert("tainted".into(), json!(rng.chance(30)));
        m.insert("workspace".into(), json!("/w"));
        m
    };
    let (action, resource, ctx, derived) = match rng.below(4) {
        0 | 1 => {
            let action = *rng.pick(&["read_file", "write_file", "list_dir", "edit_file"]);
            let (path, d) = *rng.pick(PATHS);
            let mut m = base(rng);
            m.insert("path".into(), json!(path));
            let names = [
                "in_workspace",
                "touches_state_dir",
                "prompt_file",
                "memory_file",
            ];
            let derived: Vec<(&str, bool)> = names.iter().copied().zip(d).collect();
            (action, format!("Chitin::Tool::\"{tool}\""), m, derived)
        }
        2 => {
            let (cwd, argv, command_path, d) = *rng.pick(EXECS);
            let mut m = base(rng);
            m.insert("command".into(), json!(argv[0]));
            m.insert("command_path".into(), json!(command_path));
            m.insert("argv".into(), json!(argv));
            m.insert("cwd".into(), json!(cwd));
            m.insert("network".into(), json!(rng.chance(50)));
            let names = ["in_workspace", "touches_state_dir", "command_writable"];
            let derived: Vec<(&str, bool)> = names.iter().copied().zip(d).collect();
            ("exec", format!("Chitin::Tool::\"{tool}\""), m, derived)
        }
        _ => {
            let mut m = Map::new();
            m.insert("session".into(), json!("s"));
            m.insert("model".into(), json!(rng.pick(&["a/b", "c/d"])));
            m.insert("tainted".into(), json!(rng.chance(30)));
            m.insert("spend_today_usd".into(), decimal(rng));
            m.insert("daily_budget_usd".into(), decimal(rng));
            (
                "model.call",
                "Chitin::Agent::\"main\"".to_string(),
                m,
                Vec::new(),
            )
        }
    };
    let mut sent = ctx.clone();
    let mut judged = ctx;
    for (name, v) in derived {
        // The caller's values under derived names are ignored: sometimes send a wrong one.
        if rng.chance(30) {
            sent.insert(name.into(), json!(!v));
        }
        judged.insert(name.into(), json!(v));
    }
    let req = |ctx: Map<String, Value>| {
        json!({"principal": principal, "action": format!("Chitin::Action::\"{action}\""),
               "resource": resource, "context": ctx})
    };
    (req(sent), req(judged))
}

/// One reference evaluation: (allow, determining policies).
fn reference_eval(
    set: &PolicySet,
    req: &Request,
    entities: &Entities,
    forbids: &HashSet<String>,
) -> (bool, BTreeSet<String>) {
    let resp = Authorizer::new().is_authorized(req, set, entities);
    let errored: BTreeSet<String> = resp
        .diagnostics()
        .errors()
        .map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(pe) => {
                pe.policy_id().to_string()
            }
        })
        .filter(|id| forbids.contains(id))
        .collect();
    let reasons: BTreeSet<String> = resp
        .diagnostics()
        .reason()
        .map(ToString::to_string)
        .collect();
    if errored.is_empty() {
        (resp.decision() == CedarDecision::Allow, reasons)
    } else {
        let mut p: BTreeSet<String> = reasons
            .into_iter()
            .filter(|id| forbids.contains(id))
            .collect();
        p.extend(errored);
        (false, p)
    }
}

struct Reference {
    schema: Schema,
    enforced: PolicySet,
    with_shadow: PolicySet,
    shadow: HashSet<String>,
    forbids: HashSet<String>,
    entities: Entities,
}

/// (outcome, policies, evaluations made: first, approved variant).
type RefDecision = (
    Outcome,
    BTreeSet<String>,
    (bool, BTreeSet<String>),
    Option<(bool, BTreeSet<String>)>,
);

impl Reference {
    fn new(text: &str) -> Self {
        let schema = Schema::from_cedarschema_str(policy::builtin::SCHEMA)
            .unwrap()
            .0;
        let parsed = PolicySet::from_str(text).unwrap();
        let mut all: Vec<Policy> = Vec::new();
        let mut shadow = HashSet::new();
        for p in parsed.policies() {
            let id = p.annotation("id").unwrap().to_string();
            if p.annotation("mode") == Some("shadow") {
                shadow.insert(id.clone());
            }
            all.push(p.new_id(PolicyId::new(&id)));
        }
        let forbids = all
            .iter()
            .filter(|p| p.effect() == Effect::Forbid)
            .map(|p| p.id().to_string())
            .collect();
        let enforced = PolicySet::from_policies(
            all.iter()
                .filter(|p| !shadow.contains(&p.id().to_string()))
                .cloned(),
        )
        .unwrap();
        let with_shadow = PolicySet::from_policies(all.iter().cloned()).unwrap();
        let mut ents = match policy::builtin::entities_json() {
            Value::Array(a) => a,
            _ => unreachable!(),
        };
        ents.extend(entities_json().as_array().unwrap().iter().cloned());
        let entities = Entities::from_json_value(Value::Array(ents), Some(&schema)).unwrap();
        Self {
            schema,
            enforced,
            with_shadow,
            shadow,
            forbids,
            entities,
        }
    }

    fn request(&self, judged: &Value, approved: Option<bool>) -> Request {
        let mut ctx = judged["context"].clone();
        if let Some(a) = approved {
            ctx["approved"] = json!(a);
        }
        let action = EntityUid::from_str(judged["action"].as_str().unwrap()).unwrap();
        let context = Context::from_json_value(ctx, Some((&self.schema, &action))).unwrap();
        Request::new(
            EntityUid::from_str(judged["principal"].as_str().unwrap()).unwrap(),
            action,
            EntityUid::from_str(judged["resource"].as_str().unwrap()).unwrap(),
            context,
            Some(&self.schema),
        )
        .unwrap()
    }

    fn decide(&self, set: &PolicySet, judged: &Value) -> RefDecision {
        let first = reference_eval(
            set,
            &self.request(judged, None),
            &self.entities,
            &self.forbids,
        );
        if first.0 {
            return (Outcome::Allow, first.1.clone(), first, None);
        }
        if judged["context"]["approved"] == json!(false) {
            let alt = reference_eval(
                set,
                &self.request(judged, Some(true)),
                &self.entities,
                &self.forbids,
            );
            if alt.0 {
                return (Outcome::ApprovalRequired, alt.1.clone(), first, Some(alt));
            }
            return (Outcome::Deny, first.1.clone(), first, Some(alt));
        }
        (Outcome::Deny, first.1.clone(), first, None)
    }

    /// (outcome, policies, shadow ids, shadow outcome when different).
    fn full(&self, judged: &Value) -> (Outcome, Vec<String>, Vec<String>, Option<Outcome>) {
        let (outcome, policies, e1, e2) = self.decide(&self.enforced, judged);
        let (s_out, _, s1, s2) = self.decide(&self.with_shadow, judged);
        let mut shadow = BTreeSet::new();
        let mut s_decision = None;
        if s_out != outcome {
            let ids = |p: &BTreeSet<String>| -> Vec<String> {
                p.iter()
                    .filter(|id| self.shadow.contains(*id))
                    .cloned()
                    .collect()
            };
            if s1.0 != e1.0 {
                shadow.extend(ids(&s1.1));
            }
            if let Some(s2) = &s2 {
                let e2 = e2.map(|e| e.0).unwrap_or_else(|| {
                    reference_eval(
                        &self.enforced,
                        &self.request(judged, Some(true)),
                        &self.entities,
                        &self.forbids,
                    )
                    .0
                });
                if e2 != s2.0 {
                    shadow.extend(ids(&s2.1));
                }
            }
            s_decision = Some(s_out);
        }
        (
            outcome,
            policies.into_iter().collect(),
            shadow.into_iter().collect(),
            s_decision,
        )
    }
}

#[test]
fn sliced_engine_decisions_equal_a_plain_cedar_evaluation_of_the_whole_set() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut valid_sets = 0;
    let mut compared = 0;
    let mut seen = BTreeSet::new();
    let mut shadow_reports = 0;
    for n in 0..70 {
        // Every third set sits on top of the default policies (anchored scopes, groups of
        // actions, derived attributes, approval paths as shipped).
        let mut text = if n % 3 == 0 {
            policy::builtin::DEFAULT_POLICIES
                .iter()
                .map(|(_, t)| *t)
                .collect::<Vec<_>>()
                .join("\n")
        } else {
            String::new()
        };
        text.push_str(&policy_set(&mut rng, n));
        let mut input = PolicyInput::embedded();
        input.policies = vec![Source {
            name: format!("set{n}.cedar"),
            text: text.clone(),
        }];
        // Sets the strict validator refuses are skipped (counted below).
        let compiled = match policy::compile(&input) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("SKIP {e}");
                continue;
            }
        };
        valid_sets += 1;
        let ents = policy::build_entities(
            compiled.schema(),
            &[EntitySource {
                name: "gen".into(),
                json: entities_json(),
            }],
        )
        .unwrap();
        let engine = PolicyEngine::from_parts(compiled, ents, Some(PathBuf::from("/srv/chitin")));
        let reference = Reference::new(&text);
        for _ in 0..50 {
            let (sent, judged) = request(&mut rng);
            let req = PolicyRequest::from_json(&sent).unwrap();
            let got = engine
                .decide(&req)
                .unwrap_or_else(|e| panic!("{sent}: {e}\n{text}"));
            let (outcome, policies, shadow, s_decision) = reference.full(&judged);
            let mut got_policies = got.policies.clone();
            got_policies.sort();
            assert_eq!(
                (
                    got.decision,
                    &got_policies,
                    &got.shadow,
                    got.shadow_decision
                ),
                (outcome, &policies, &shadow, s_decision),
                "request {sent}\npolicies:\n{text}"
            );
            // What the agent would offer agrees with what is decided.
            if !engine.could_allow(&req.principal, &req.action).unwrap() {
                assert_eq!(
                    got.decision,
                    Outcome::Deny,
                    "could_allow is false for {sent}\n{text}"
                );
            }
            seen.insert(got.decision.as_str());
            if !got.shadow.is_empty() {
                shadow_reports += 1;
            }
            compared += 1;
        }
    }
    // The generator must exercise what it claims to.
    assert!(
        valid_sets >= 50,
        "only {valid_sets} generated sets validated"
    );
    assert_eq!(seen.len(), 3, "outcomes seen: {seen:?}");
    assert!(shadow_reports >= 20, "only {shadow_reports} shadow reports");
    assert!(compared >= 2500, "{compared}");
}
