//! Decision latency of the policy engine (`cargo bench --bench policy`).
//!
//! Measures `PolicyEngine::decide` end to end (context derivation, schema-checked request
//! construction, evaluation, approval and shadow passes) for:
//! 1. the default policies;
//! 2. 500 generated policies + 1,000 entities spread over the actions (a realistic estate);
//! 3. 500 generated policies all on the `exec` action (the worst case for per-action slicing);
//! 4. 1,000 generated policies all on `exec`, over 50 groups (principal index);
//! 5. 1,000 generated policies all on `secret.use`, one per secret, all for the same principal
//!    `Tool::"exec"` (resource index);
//! 6. 1,000 generated policies all on `exec` for the same principal and resource, differing only
//!    in their conditions (nothing to index: Cedar evaluates them all).
//!
//! Run under `cargo test` it does nothing (no `--bench` argument), so CI stays fast.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness"
)]

use std::path::PathBuf;
use std::time::Instant;

use chitin::policy::{self, EntitySource, PolicyEngine, PolicyInput, PolicyRequest, Source};
use serde_json::{Value, json};

const ACTIONS: &[&str] = &[
    "exec",
    "read_file",
    "list_dir",
    "write_file",
    "edit_file",
    "web_fetch",
    "send_message",
];

fn entities(n_users: usize, n_groups: usize) -> Value {
    let mut v =
        vec![json!({"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []})];
    for g in 0..n_groups {
        v.push(json!({"uid": {"type": "Chitin::Group", "id": format!("g{g}")}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}));
    }
    for u in 0..n_users {
        v.push(
            json!({"uid": {"type": "Chitin::User", "id": format!("u{u}")}, "attrs": {},
                      "parents": [{"type": "Chitin::Group", "id": format!("g{}", u % n_groups)}]}),
        );
    }
    Value::Array(v)
}

fn generated(n: usize, spread: bool) -> String {
    let mut s = String::new();
    for i in 0..n {
        let action = if spread {
            ACTIONS[i % ACTIONS.len()]
        } else {
            "exec"
        };
        let g = i % 50;
        let body = match action {
            "exec" => format!("context.command == \"tool{i}\" && !context.network"),
            "web_fetch" => format!("context.host == \"host{i}.example\""),
            "send_message" => format!("context.target == \"chan{i}\""),
            _ => format!("context.path like \"/data/g{g}/p{i}/*\""),
        };
        let effect = if i % 10 == 0 { "forbid" } else { "permit" };
        s.push_str(&format!(
            "@id(\"gen.{i}\")\n{effect} (principal in Chitin::Group::\"g{g}\", action == Chitin::Action::\"{action}\", resource)\nwhen {{ {body} }};\n"
        ));
    }
    s
}

/// `n` policies on `secret.use` for `Tool::"exec"`, one per secret `s<i>`: each releases its
/// secret to one program (10% are forbids on a tainted session instead).
fn secrets_generated(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let (effect, body) = if i % 10 == 0 {
            (
                "forbid",
                "context has tainted && context.tainted".to_string(),
            )
        } else {
            (
                "permit",
                format!("context has command_path && context.command_path == \"/usr/bin/tool{i}\""),
            )
        };
        s.push_str(&format!(
            "@id(\"sec.{i}\")\n{effect} (principal == Chitin::Tool::\"exec\", action == Chitin::Action::\"secret.use\", resource == Chitin::Secret::\"s{i}\")\nwhen {{ {body} }};\n"
        ));
    }
    s
}

/// `n` policies on `exec` for the owners group and every resource, differing only in their
/// conditions.
fn same_scope_generated(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let effect = if i % 10 == 0 { "forbid" } else { "permit" };
        s.push_str(&format!(
            "@id(\"same.{i}\")\n{effect} (principal in Chitin::Group::\"owners\", action == Chitin::Action::\"exec\", resource)\nwhen {{ context.command == \"tool{i}\" && !context.network }};\n"
        ));
    }
    s
}

fn secret_req(i: usize) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": "Chitin::Tool::\"exec\"",
        "action": "Chitin::Action::\"secret.use\"",
        "resource": format!("Chitin::Secret::\"s{i}\""),
        "context": {"host": "env:exec", "command": format!("tool{i}"),
                    "command_path": format!("/usr/bin/tool{i}"), "command_writable": false,
                    "session": "s", "tainted": false}
    }))
    .unwrap()
}

fn exec_req(user: &str) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": format!("Chitin::User::\"{user}\""),
        "action": "Chitin::Action::\"exec\"",
        "resource": "Chitin::Tool::\"exec\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w",
                    "command": "ls", "command_path": "/usr/bin/ls", "argv": ["ls", "-la"], "cwd": "/w", "network": true}
    }))
    .unwrap()
}

/// Nanoseconds this thread has spent on a CPU (not waiting for one): less sensitive to other
/// load on the machine than wall-clock time.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

fn measure(name: &str, engine: &PolicyEngine, reqs: &[PolicyRequest], iters: usize) {
    // `-- --bench --only TEXT`: only the cases whose name contains TEXT (to profile one).
    let args: Vec<String> = std::env::args().collect();
    if let Some(only) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        && !name.contains(only.as_str())
    {
        return;
    }
    for r in reqs.iter().cycle().take(1000) {
        engine.decide(r).unwrap();
    }
    let mut samples = Vec::with_capacity(iters);
    let cpu0 = thread_cpu_ns();
    for r in reqs.iter().cycle().take(iters) {
        let t = Instant::now();
        let d = engine.decide(r).unwrap();
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
        std::hint::black_box(d);
    }
    let cpu_us = (thread_cpu_ns() - cpu0) as f64 / iters as f64 / 1000.0;
    samples.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize];
    println!(
        "{name:<60} n={iters:>6}  p50 {:>7.1} us  p99 {:>7.1} us  max {:>8.1} us  cpu/decision {:>6.1} us",
        pct(0.50),
        pct(0.99),
        samples[samples.len() - 1],
        cpu_us
    );
}

fn engine_with(extra: Option<String>, ents: Value) -> PolicyEngine {
    let mut input = PolicyInput::embedded();
    if let Some(text) = extra {
        input.policies.push(Source {
            name: "generated.cedar".into(),
            text,
        });
    }
    let compiled = policy::compile(&input).unwrap();
    let entities = policy::build_entities(
        compiled.schema(),
        &[EntitySource {
            name: "bench".into(),
            json: ents,
        }],
    )
    .unwrap();
    PolicyEngine::from_parts(compiled, entities, Some(PathBuf::from("/srv/chitin")))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let iters = 20_000;
    // Requests alternate between a file read (allow), an exec needing approval (two passes)
    // and a default deny.
    let users: Vec<String> = (0..100).map(|u| format!("u{u}")).collect();
    let mut reqs = Vec::new();
    for u in &users {
        reqs.push(exec_req(u));
        reqs.push(
            PolicyRequest::from_json(&json!({
                "principal": format!("Chitin::User::\"{u}\""),
                "action": "Chitin::Action::\"read_file\"", "resource": "Chitin::Tool::\"read_file\"",
                "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w", "path": "/w/a.txt"}
            }))
            .unwrap(),
        );
        reqs.push(
            PolicyRequest::from_json(&json!({
                "principal": format!("Chitin::User::\"{u}\""),
                "action": "Chitin::Action::\"web_fetch\"", "resource": "Chitin::Tool::\"web_fetch\"",
                "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w",
                            "host": "10.0.0.1", "url": "http://10.0.0.1/", "method": "POST", "private_address": true,
                            "scheme": "http", "ip_literal": true, "resolved": false, "addresses": ["10.0.0.1"]}
            }))
            .unwrap(),
        );
    }
    let kinds: [(&str, Vec<PolicyRequest>); 3] = [
        (
            "exec needing approval",
            reqs.iter().step_by(3).cloned().collect(),
        ),
        (
            "read_file allowed",
            reqs.iter().skip(1).step_by(3).cloned().collect(),
        ),
        (
            "web_fetch denied by a forbid",
            reqs.iter().skip(2).step_by(3).cloned().collect(),
        ),
    ];
    let ents = entities(950, 50);
    println!(
        "entities: {} (plus the built-in tools)",
        ents.as_array().map_or(0, Vec::len)
    );
    let engines = [
        ("default policies (15)", engine_with(None, ents.clone())),
        (
            "default + 500 generated, spread over 7 actions",
            engine_with(Some(generated(500, true)), ents.clone()),
        ),
        (
            "default + 500 generated, all on exec",
            engine_with(Some(generated(500, false)), ents),
        ),
    ];
    for (name, engine) in &engines {
        measure(&format!("{name}: mix"), engine, &reqs, iters);
        for (kind, rs) in &kinds {
            measure(&format!("  {kind}"), engine, rs, iters / 2);
        }
    }
    // 1,000 policies on one action.
    let ents = entities(950, 50);
    let exec_reqs: Vec<PolicyRequest> = users.iter().map(|u| exec_req(u)).collect();
    let read_reqs: Vec<PolicyRequest> = reqs.iter().skip(1).step_by(3).cloned().collect();
    let on_exec = engine_with(Some(generated(1000, false)), ents.clone());
    measure(
        "default + 1,000 generated, all on exec (50 groups): exec needing approval",
        &on_exec,
        &exec_reqs,
        iters / 2,
    );
    measure("  read_file allowed", &on_exec, &read_reqs, iters / 2);
    let on_secrets = engine_with(Some(secrets_generated(1000)), ents.clone());
    let secret_reqs: Vec<PolicyRequest> = (0..300).map(|i| secret_req(i * 3 + 1)).collect();
    let d = on_secrets.decide(&secret_reqs[0]).unwrap();
    assert_eq!(d.decision, policy::Outcome::Allow, "{d:?}");
    measure(
        "default + 1,000 generated, all on secret.use (one per secret): allowed",
        &on_secrets,
        &secret_reqs,
        iters / 2,
    );
    let same = engine_with(Some(same_scope_generated(1000)), ents);
    measure(
        "default + 1,000 generated, all on exec, same principal and resource: exec needing approval",
        &same,
        &exec_reqs,
        iters / 10,
    );
}
