//! The policy decision point, through its library API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};

use chitin::policy::{
    self, EngineSpec, EntitySource, Outcome, PolicyEngine, PolicyError, PolicyInput, PolicyRequest,
    Source,
};
use serde_json::{Value, json};

fn input(files: &[(&str, &str)]) -> PolicyInput {
    let mut i = PolicyInput::embedded();
    i.policies = files
        .iter()
        .map(|(n, t)| Source {
            name: (*n).into(),
            text: (*t).into(),
        })
        .collect();
    i
}

fn engine_for(input: &PolicyInput, entities: Value) -> PolicyEngine {
    let compiled = policy::compile(input).unwrap();
    let ents = policy::build_entities(
        compiled.schema(),
        &[EntitySource {
            name: "test".into(),
            json: entities,
        }],
    )
    .unwrap();
    PolicyEngine::from_parts(compiled, ents, Some(PathBuf::from("/srv/chitin")))
}

fn owners() -> Value {
    json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}
    ])
}

fn exec_req(tool: &str, argv: &[&str], network: bool) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": "Chitin::User::\"alice\"",
        "action": "Chitin::Action::\"exec\"",
        "resource": format!("Chitin::Tool::\"{tool}\""),
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w",
                    "command": argv[0], "command_path": format!("/usr/bin/{}", argv[0]), "argv": argv, "cwd": "/w", "network": network}
    }))
    .unwrap()
}

fn read_req(path: &str) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": "Chitin::User::\"alice\"",
        "action": "Chitin::Action::\"read_file\"",
        "resource": "Chitin::Tool::\"read_file\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w", "path": path}
    }))
    .unwrap()
}

#[test]
fn everything_is_denied_when_no_policy_permits_it() {
    let e = engine_for(&input(&[]), owners());
    let d = e.decide(&exec_req("exec", &["ls"], false)).unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert!(d.policies.is_empty());
}

#[test]
fn a_forbid_wins_over_any_permit() {
    let e = engine_for(
        &input(&[(
            "p.cedar",
            r#"@id("allow-all") permit (principal, action, resource);
               @id("no-rm") forbid (principal, action == Chitin::Action::"exec", resource) when { context.command == "rm" };"#,
        )]),
        owners(),
    );
    let d = e
        .decide(&exec_req("exec", &["rm", "-rf", "/"], false))
        .unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert_eq!(d.policies, vec!["no-rm"]);
    let d = e.decide(&exec_req("exec", &["ls"], false)).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert_eq!(d.policies, vec!["allow-all"]);
}

#[test]
fn a_forbid_that_errors_during_evaluation_denies() {
    // `resource.risk` on a tool that is not in the entity store is an evaluation error.
    // Cedar itself would skip the erroring forbid and allow; Chitin denies.
    let e = engine_for(
        &input(&[(
            "p.cedar",
            r#"@id("allow-exec") permit (principal, action == Chitin::Action::"exec", resource);
               @id("no-high-risk") forbid (principal, action == Chitin::Action::"exec", resource) when { resource.risk == "high" };"#,
        )]),
        owners(),
    );
    let d = e.decide(&exec_req("ghost-tool", &["ls"], false)).unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert_eq!(d.policies, vec!["no-high-risk"]);
    assert_eq!(d.errors.len(), 1, "{:?}", d.errors);
    assert!(
        d.errors[0].starts_with("policy no-high-risk:"),
        "{:?}",
        d.errors
    );
    // The same forbid evaluating cleanly on a known tool does not get in the way.
    assert_eq!(
        e.decide(&exec_req("exec", &["ls"], false))
            .unwrap()
            .decision,
        Outcome::Allow
    );
}

#[test]
fn a_permit_that_errors_grants_nothing() {
    let e = engine_for(
        &input(&[(
            "p.cedar",
            r#"@id("low-only") permit (principal, action == Chitin::Action::"exec", resource) when { resource.risk == "low" };"#,
        )]),
        owners(),
    );
    let d = e.decide(&exec_req("ghost-tool", &["ls"], false)).unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert!(d.policies.is_empty());
    assert_eq!(d.errors.len(), 1);
}

#[test]
fn approval_required_means_denied_now_but_allowed_when_approved() {
    let e = engine_for(&PolicyInput::embedded(), owners());
    let d = e.decide(&exec_req("exec", &["curl", "x"], true)).unwrap();
    assert_eq!(d.decision, Outcome::ApprovalRequired);
    assert_eq!(d.policies, vec!["tools.owner-exec-network-approved"]);
}

#[test]
fn a_request_already_marked_approved_is_not_asked_again() {
    let e = engine_for(&PolicyInput::embedded(), owners());
    let mut r = exec_req("exec", &["curl", "x"], true);
    r.context.insert("approved".into(), json!(true));
    assert_eq!(e.decide(&r).unwrap().decision, Outcome::Allow);
}

#[test]
fn shadow_policies_report_what_they_would_change_without_enforcing() {
    let mut files: Vec<(String, String)> = policy::builtin::DEFAULT_POLICIES
        .iter()
        .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
        .collect();
    files.push((
        "trial.cedar".into(),
        r#"@id("trial.no-reads") @mode("shadow")
           forbid (principal, action == Chitin::Action::"read_file", resource) when { context.path like "*.env" };
           @id("trial.harmless") @mode("shadow")
           forbid (principal, action == Chitin::Action::"read_file", resource) when { context.path like "*.never" };"#
            .into(),
    ));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let inp = input(&refs);
    let compiled = policy::compile(&inp).unwrap();
    assert_eq!(compiled.shadow_count(), 2);
    let e = engine_for(&inp, owners());
    let d = e.decide(&read_req("/w/.env")).unwrap();
    assert_eq!(
        d.decision,
        Outcome::Allow,
        "shadow policies are never enforced"
    );
    assert_eq!(d.shadow, vec!["trial.no-reads"]);
    let d = e.decide(&read_req("/w/readme.md")).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert!(
        d.shadow.is_empty(),
        "a shadow policy that changes nothing is not reported"
    );
}

#[test]
fn a_shadow_permit_reports_a_would_be_allow() {
    let e = engine_for(
        &input(&[(
            "p.cedar",
            r#"@id("trial.etc") @mode("shadow") permit (principal, action == Chitin::Action::"read_file", resource);"#,
        )]),
        owners(),
    );
    let d = e.decide(&read_req("/etc/hosts")).unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert_eq!(d.shadow, vec!["trial.etc"]);
}

/// All requests of the committed decision vectors.
fn vector_requests() -> Vec<(Value, PolicyRequest)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tests");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
        for c in v["cases"].as_array().unwrap() {
            out.push((
                v["entities"].clone(),
                PolicyRequest::from_json(&c["request"]).unwrap(),
            ));
        }
    }
    assert!(out.len() > 40);
    out
}

#[test]
fn shuffled_split_and_duplicated_policy_sets_decide_identically() {
    // Every default policy in its own file...
    let mut single: Vec<(String, String)> = Vec::new();
    for (name, text) in policy::builtin::DEFAULT_POLICIES {
        for (i, chunk) in text.split("\n\n").filter(|c| c.contains("@id")).enumerate() {
            single.push((format!("{name}.{i}"), chunk.to_string()));
        }
    }
    assert!(single.len() >= 15);
    let as_input = |v: &[(String, String)]| {
        let refs: Vec<(&str, &str)> = v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        input(&refs)
    };
    let original = PolicyInput::embedded();
    let mut reversed = single.clone();
    reversed.reverse();
    let mut rotated = single.clone();
    rotated.rotate_left(7);
    // ...and every policy twice (the copy renamed, since ids are unique).
    let mut duplicated = single.clone();
    for (n, t) in &single {
        duplicated.push((
            format!("{n}.dup"),
            t.replace("\")\n@reason", "#dup\")\n@reason"),
        ));
    }
    let dup_input = as_input(&duplicated);
    assert_eq!(
        policy::compile(&dup_input).unwrap().enforced_count(),
        2 * single.len()
    );
    let variants = [
        as_input(&single),
        as_input(&reversed),
        as_input(&rotated),
        dup_input,
    ];
    for (entities, req) in vector_requests() {
        let base = engine_for(&original, entities.clone())
            .decide(&req)
            .unwrap();
        for v in &variants {
            let d = engine_for(v, entities.clone()).decide(&req).unwrap();
            assert_eq!(d.decision, base.decision, "{req:?}");
            let mut ids: Vec<String> = d
                .policies
                .iter()
                .map(|p| p.trim_end_matches("#dup").to_string())
                .collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids, base.policies, "{req:?}");
        }
    }
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn an_invalid_policy_set_is_refused_at_start_up() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "bad.cedar",
        r#"@id("x") permit (principal, action, resource) when { context.nope };"#,
    );
    let err = PolicyEngine::load(EngineSpec {
        policy_dir: Some(t.path().into()),
        entity_files: vec![],
        state_dir: None,
    })
    .unwrap_err();
    assert!(matches!(err, PolicyError::Invalid(_)), "{err}");
}

#[test]
fn a_hot_reload_with_an_invalid_file_keeps_the_last_good_set_whole() {
    let t = tempfile::tempdir().unwrap();
    let ents = t.path().join("entities.json");
    std::fs::write(&ents, owners().to_string()).unwrap();
    write(
        t.path(),
        "a.cedar",
        r#"@id("reads") permit (principal, action == Chitin::Action::"read_file", resource);"#,
    );
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: Some(t.path().into()),
        entity_files: vec![ents],
        state_dir: None,
    })
    .unwrap();
    assert_eq!(
        engine.decide(&read_req("/w/a")).unwrap().decision,
        Outcome::Allow
    );

    // A valid new file plus an invalid one: neither may take effect.
    write(
        t.path(),
        "b.cedar",
        r#"@id("no-reads") forbid (principal, action == Chitin::Action::"read_file", resource);"#,
    );
    write(
        t.path(),
        "c.cedar",
        "@id(\"broken\") permit (principal, action, resource) when { context.path == };",
    );
    let err = engine.reload().unwrap_err().to_string();
    assert!(err.contains("c.cedar:1:"), "{err}");
    assert!(engine.last_error().is_some());
    assert_eq!(
        engine.decide(&read_req("/w/a")).unwrap().decision,
        Outcome::Allow,
        "old set still active, whole"
    );
    assert_eq!(engine.report().policies, 1);

    // Fixing it applies the whole new set at once.
    std::fs::remove_file(t.path().join("c.cedar")).unwrap();
    let report = engine.reload().unwrap();
    assert_eq!(report.policies, 2);
    assert!(engine.last_error().is_none());
    let d = engine.decide(&read_req("/w/a")).unwrap();
    assert_eq!(
        (d.decision, d.policies),
        (Outcome::Deny, vec!["no-reads".to_string()])
    );
}

#[test]
fn a_context_of_the_wrong_type_is_a_malformed_request_not_a_decision() {
    let e = engine_for(&PolicyInput::embedded(), owners());
    let mut r = read_req("/w/a");
    r.context.insert("approved".into(), json!("yes"));
    assert!(matches!(e.decide(&r), Err(PolicyError::Request(_))));
    let mut r = read_req("/w/a");
    r.context.insert("smuggled".into(), json!(true));
    assert!(
        matches!(e.decide(&r), Err(PolicyError::Request(_))),
        "undeclared context attributes are refused"
    );
}

#[test]
fn entity_files_cannot_redefine_built_in_tools() {
    let compiled = policy::compile(&PolicyInput::embedded()).unwrap();
    let err = policy::build_entities(
        compiled.schema(),
        &[EntitySource {
            name: "evil.json".into(),
            json: json!([{"uid": {"type": "Chitin::Tool", "id": "exec"}, "attrs": {"risk": "low", "effects": []}, "parents": []}]),
        }],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("evil.json") && err.contains("already defined in <built-in>"),
        "{err}"
    );
}
