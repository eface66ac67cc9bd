//! Defects found by the differential test against the reference `cedar` CLI (issue 19): shadow
//! reports in the approval re-evaluation, policy ids with `:`, `could_allow` against an
//! unconditional `forbid (principal is T, ...)`, and Cedar's decimal forms.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use chitin::gate::{CallContext, Gate, Origin, ToolInput};
use chitin::policy::{
    self, EngineSpec, EntitySource, Outcome, PolicyEngine, PolicyInput, PolicyRequest, Source,
};
use chitin_audit::{AuditLog, AuditOptions, Query};
use serde_json::{Value, json};

fn owners() -> Value {
    json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}
    ])
}

/// The default policies plus `extra` (one more file).
fn defaults_with(extra: &str) -> PolicyInput {
    let mut i = PolicyInput::embedded();
    i.policies.push(Source {
        name: "trial.cedar".into(),
        text: extra.into(),
    });
    i
}

fn engine(input: &PolicyInput) -> PolicyEngine {
    let compiled = policy::compile(input).unwrap();
    let ents = policy::build_entities(
        compiled.schema(),
        &[EntitySource {
            name: "test".into(),
            json: owners(),
        }],
    )
    .unwrap();
    PolicyEngine::from_parts(compiled, ents, Some(PathBuf::from("/srv/chitin")))
}

fn exec_req(tool: &str, network: bool) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": "Chitin::User::\"alice\"",
        "action": "Chitin::Action::\"exec\"",
        "resource": format!("Chitin::Tool::\"{tool}\""),
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w",
                    "command": "curl", "command_path": "/usr/bin/curl", "argv": ["curl", "x"], "cwd": "/w", "network": network}
    }))
    .unwrap()
}

fn write_req(path: &str) -> PolicyRequest {
    PolicyRequest::from_json(&json!({
        "principal": "Chitin::User::\"alice\"",
        "action": "Chitin::Action::\"write_file\"",
        "resource": "Chitin::Tool::\"write_file\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false, "workspace": "/w", "path": path}
    }))
    .unwrap()
}

#[test]
fn a_shadow_forbid_on_approved_requests_reports_approval_required_turning_into_deny() {
    let e = engine(&defaults_with(
        r#"@id("trial.no-network") @mode("shadow")
           forbid (principal, action == Chitin::Action::"exec", resource) when { context.approved };"#,
    ));
    let d = e.decide(&exec_req("exec", true)).unwrap();
    assert_eq!(d.decision, Outcome::ApprovalRequired);
    assert_eq!(d.policies, vec!["tools.owner-exec-network-approved"]);
    assert_eq!(d.shadow, vec!["trial.no-network"]);
    assert_eq!(d.shadow_decision, Some(Outcome::Deny));
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        json!({"decision": "approval_required", "policies": ["tools.owner-exec-network-approved"],
               "shadow": ["trial.no-network"], "shadow_decision": "deny", "errors": []})
    );
}

#[test]
fn a_shadow_forbid_unless_approved_reports_allow_turning_into_approval_required() {
    let e = engine(&defaults_with(
        r#"@id("trial.writes-need-approval") @mode("shadow")
           forbid (principal, action == Chitin::Action::"write_file", resource) unless { context.approved };"#,
    ));
    let d = e.decide(&write_req("/w/a.txt")).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert_eq!(d.shadow, vec!["trial.writes-need-approval"]);
    assert_eq!(d.shadow_decision, Some(Outcome::ApprovalRequired));
}

#[test]
fn only_the_shadow_policy_that_changes_the_approval_re_evaluation_is_named() {
    // `trial.redundant` denies the request as made, which the enforced set already denies
    // (approval is required); only `trial.never-approve` changes the outcome.
    let e = engine(&defaults_with(
        r#"@id("trial.redundant") @mode("shadow")
           forbid (principal, action == Chitin::Action::"exec", resource) when { context.network } unless { context.approved };
           @id("trial.never-approve") @mode("shadow")
           forbid (principal, action == Chitin::Action::"exec", resource) when { context.approved && context.network };"#,
    ));
    let d = e.decide(&exec_req("exec", true)).unwrap();
    assert_eq!(d.decision, Outcome::ApprovalRequired);
    assert_eq!(d.shadow, vec!["trial.never-approve"]);
    assert_eq!(d.shadow_decision, Some(Outcome::Deny));
    // A request the shadow policies do not change reports nothing.
    let mut offline = exec_req("exec", false);
    offline
        .context
        .insert("command_path".into(), json!("/usr/bin/ls"));
    let d = e.decide(&offline).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert!(d.shadow.is_empty(), "{d:?}");
    assert_eq!(d.shadow_decision, None);
}

#[test]
fn a_shadow_permit_in_the_approval_re_evaluation_reports_deny_turning_into_approval_required() {
    let e = engine(&defaults_with(
        r#"@id("trial.outside-writes") @mode("shadow")
           permit (principal in Chitin::Group::"owners", action == Chitin::Action::"write_file", resource)
           when { context.approved };"#,
    ));
    let d = e.decide(&write_req("/elsewhere/a.txt")).unwrap();
    assert_eq!(d.decision, Outcome::Deny);
    assert_eq!(d.shadow, vec!["trial.outside-writes"]);
    assert_eq!(d.shadow_decision, Some(Outcome::ApprovalRequired));
}

#[test]
fn an_erroring_shadow_forbid_with_a_colon_in_its_id_is_reported_by_its_whole_id() {
    // `resource.risk` of a tool that is not in the entity store is an evaluation error, and
    // an erroring forbid denies.
    let e = engine(&defaults_with(
        r#"@id("trial:risky-tools") @mode("shadow")
           forbid (principal, action == Chitin::Action::"write_file", resource) when { resource.risk == "high" };
           @id("trial:ghost-writes") @mode("shadow")
           permit (principal in Chitin::Group::"owners", action == Chitin::Action::"write_file", resource)
           when { context.in_workspace };"#,
    ));
    let mut r = write_req("/w/a.txt");
    r.resource = r#"Chitin::Tool::"ghost""#.parse().unwrap();
    let d = e.decide(&r).unwrap();
    // Enforced: the default permit errors on `resource.risk` (grants nothing): deny.
    assert_eq!(d.decision, Outcome::Deny);
    assert_eq!(
        d.shadow_decision, None,
        "the shadow forbid errors too: {d:?}"
    );
    // On a known tool the shadow forbid evaluates cleanly and changes nothing.
    let d = e.decide(&write_req("/w/a.txt")).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert!(d.shadow.is_empty(), "{d:?}");

    // Enforced allow by a permit that does not look at the resource; the shadow forbid that
    // errors would deny. Its id is reported whole.
    let e = engine(&defaults_with(
        r#"@id("trial:risky-tools") @mode("shadow")
           forbid (principal, action == Chitin::Action::"write_file", resource) when { resource.risk == "high" };
           @id("ops:ghost-writes")
           permit (principal in Chitin::Group::"owners", action == Chitin::Action::"write_file", resource)
           when { context.in_workspace };"#,
    ));
    let d = e.decide(&r).unwrap();
    assert_eq!(d.decision, Outcome::Allow);
    assert_eq!(d.policies, vec!["ops:ghost-writes"]);
    assert_eq!(d.shadow, vec!["trial:risky-tools"]);
    assert_eq!(d.shadow_decision, Some(Outcome::Deny));
    // The errors reported are the enforced set's (the shadow set is only reported by id).
    assert_eq!(
        d.errors,
        vec![
            "policy tools.owner-files-in-workspace: entity `Chitin::Tool::\"ghost\"` does not exist"
        ]
    );
}

#[test]
fn a_shadow_forbid_that_errors_only_before_approval_is_named_whatever_its_id() {
    // Enforced: an operator's permit allows writes in the workspace, on any tool. The shadow
    // forbid is `unless approved` first, so it errors on `resource.risk` (a tool the entity
    // store does not know) only in the request as made: allow would become approval_required.
    // The id is reported whole, with `.` or `:` alike.
    for id in ["trial.risky-tools", "trial:risky-tools", "a:b:c"] {
        let e = engine(&defaults_with(&format!(
            r#"@id("{id}") @mode("shadow")
               forbid (principal, action == Chitin::Action::"write_file", resource)
               unless {{ context.approved }} when {{ resource.risk == "high" }};
               @id("ops:ghost-writes")
               permit (principal in Chitin::Group::"owners", action == Chitin::Action::"write_file", resource)
               when {{ context.in_workspace }};"#
        )));
        let mut r = write_req("/w/a.txt");
        r.resource = r#"Chitin::Tool::"ghost""#.parse().unwrap();
        let d = e.decide(&r).unwrap();
        assert_eq!(d.decision, Outcome::Allow, "{id}");
        assert_eq!(d.policies, vec!["ops:ghost-writes"], "{id}");
        assert_eq!(d.shadow, vec![id.to_string()], "{id}");
        assert_eq!(d.shadow_decision, Some(Outcome::ApprovalRequired), "{id}");
    }
}

#[test]
fn an_unconditional_forbid_on_another_principal_type_does_not_hide_tools_that_are_allowed() {
    let e = engine(&defaults_with(
        r#"@id("tools-get-no-secrets") forbid (principal is Chitin::Tool, action, resource);"#,
    ));
    let alice: cedar_policy::EntityUid = r#"Chitin::User::"alice""#.parse().unwrap();
    for tool in chitin::policy::INVOKABLE {
        let offered = e.could_allow(&alice, &tool.action().uid()).unwrap();
        assert!(offered, "{} is not offered", tool.as_str());
    }
    assert_eq!(
        e.decide(&write_req("/w/a.txt")).unwrap().decision,
        Outcome::Allow
    );
    let offered: Vec<String> = chitin::agent::context::offered_tools(&e, "alice")
        .into_iter()
        .map(|t| t.name.clone())
        .collect();
    assert!(offered.contains(&"write_file".to_string()), "{offered:?}");
    assert!(offered.contains(&"exec".to_string()), "{offered:?}");

    // The same forbid on users does hide them, and decide agrees.
    let e = engine(&defaults_with(
        r#"@id("no-users") forbid (principal is Chitin::User, action, resource);"#,
    ));
    assert!(
        !e.could_allow(&alice, &chitin::policy::Tool::WriteFile.action().uid())
            .unwrap()
    );
    assert!(chitin::agent::context::offered_tools(&e, "alice").is_empty());
    assert_eq!(
        e.decide(&write_req("/w/a.txt")).unwrap().decision,
        Outcome::Deny
    );

    // A forbid on one user named by `==` does not hide anything from another user.
    let e = engine(&defaults_with(
        r#"@id("not-bob") forbid (principal == Chitin::User::"bob", action, resource);
           @id("not-owners-directly") forbid (principal == Chitin::Group::"owners", action, resource);"#,
    ));
    assert!(
        e.could_allow(&alice, &chitin::policy::Tool::WriteFile.action().uid())
            .unwrap()
    );
    assert_eq!(
        e.decide(&write_req("/w/a.txt")).unwrap().decision,
        Outcome::Allow
    );
}

fn chitin_bin(home: &Path, args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn policy_eval_accepts_each_of_cedars_decimal_forms() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin_bin(&home, &["init"], "").status.success());
    let forms = [
        (json!("10.0"), json!("5.0")),
        (
            json!({"fn": "decimal", "arg": "10.0"}),
            json!({"fn": "decimal", "arg": "5.0"}),
        ),
        (
            json!({"__extn": {"fn": "decimal", "arg": "10.0"}}),
            json!({"__extn": {"fn": "decimal", "arg": "5.0"}}),
        ),
        (json!("10.0"), json!({"fn": "decimal", "arg": "5.0"})),
    ];
    for (spend, budget) in forms {
        for (spend, want, policies) in [
            (
                spend.clone(),
                "deny",
                json!(["budget.deny-over-daily-budget"]),
            ),
            (json!("1.25"), "allow", json!(["agent.owner-model-calls"])),
        ] {
            let req = json!({
                "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"model.call\"",
                "resource": "Chitin::Agent::\"main\"",
                "context": {"session": "s", "model": "anthropic/claude", "tainted": false,
                            "spend_today_usd": spend, "daily_budget_usd": budget}
            });
            let o = chitin_bin(
                &home,
                &["policy", "eval", "--request", "-"],
                &req.to_string(),
            );
            assert!(
                o.status.success(),
                "{req}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let v: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(
                v,
                json!({"decision": want, "policies": policies, "shadow": [], "errors": []}),
                "{req}"
            );
        }
    }
    // Not a decimal in any form: still malformed, with the typed build's reason.
    let req = json!({
        "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"model.call\"",
        "resource": "Chitin::Agent::\"main\"",
        "context": {"session": "s", "model": "m", "tainted": false,
                    "spend_today_usd": "ten", "daily_budget_usd": "5.0"}
    });
    let o = chitin_bin(
        &home,
        &["policy", "eval", "--request", "-"],
        &req.to_string(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("malformed request"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

struct GateFixture {
    _t: tempfile::TempDir,
    gate: Gate,
    ws: PathBuf,
}

/// A gate over the default policies plus `trial` (a policy directory on disk).
fn gate_with(trial: &str) -> GateFixture {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let dir = t.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    for (name, text) in policy::builtin::DEFAULT_POLICIES {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("trial.cedar"), trial).unwrap();
    let ents = home.join("entities.json");
    std::fs::write(
        &ents,
        json!([
            {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}
        ])
        .to_string(),
    )
    .unwrap();
    let ws = t.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: Some(dir),
        entity_files: vec![ents],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let audit = Arc::new(AuditLog::open(&home, AuditOptions::default()).unwrap());
    GateFixture {
        gate: Gate::new(Arc::new(engine), audit),
        ws,
        _t: t,
    }
}

fn call(ws: &Path) -> CallContext {
    CallContext {
        user: "owner".into(),
        origin: Origin::Model,
        session: "s1".into(),
        workspace: ws.to_path_buf(),
        tainted: false,
    }
}

/// (decision, policies, outcome, payload) of every decision record.
fn decision_records(f: &GateFixture) -> Vec<(String, String, String, Value)> {
    f.gate
        .audit()
        .reader()
        .unwrap()
        .query(&Query {
            kind: Some("decision".into()),
            ..Query::default()
        })
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.decision,
                r.policies,
                r.outcome,
                serde_json::from_str(r.payload.as_deref().unwrap_or("null")).unwrap(),
            )
        })
        .collect()
}

#[test]
fn the_gate_records_a_shadow_change_in_the_approval_re_evaluation_with_its_label() {
    let f = gate_with(
        r#"@id("trial:no-network") @mode("shadow")
           forbid (principal, action == Chitin::Action::"exec", resource) when { context.approved };"#,
    );
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::Exec {
                argv: vec!["ls".into()],
                cwd: None,
                network: true,
            },
        )
        .unwrap();
    assert_eq!(v.decision().decision, Outcome::ApprovalRequired);
    assert_eq!(v.decision().shadow, vec!["trial:no-network"]);
    let recs = decision_records(&f);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0].0, "approval_required");
    assert_eq!(recs[0].3["shadow"], json!(["trial:no-network"]));
    assert_eq!(recs[1].0, "shadow_deny");
    assert_eq!(recs[1].1, r#"["trial:no-network"]"#);
    assert_eq!(recs[1].2, "not enforced (enforced: approval_required)");
    assert_eq!(recs[1].3["enforced"], "approval_required");
    assert_eq!(recs[1].3["shadow_decision"], "deny");
    assert_eq!(recs[1].3["request_digest"], recs[0].3["request_digest"]);
}

#[test]
fn the_gate_records_allow_turning_into_approval_required_as_shadow_approval_required() {
    let f = gate_with(
        r#"@id("trial:writes-need-approval") @mode("shadow")
           forbid (principal, action == Chitin::Action::"write_file", resource) unless { context.approved };"#,
    );
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "a.txt".into(),
            },
        )
        .unwrap();
    assert_eq!(v.decision().decision, Outcome::Allow);
    let recs = decision_records(&f);
    assert_eq!(recs.len(), 2, "{recs:?}");
    assert_eq!(recs[0].0, "allow");
    assert_eq!(recs[1].0, "shadow_approval_required");
    assert_eq!(recs[1].1, r#"["trial:writes-need-approval"]"#);
    assert_eq!(recs[1].3["enforced"], "allow");
    // A request the trial does not change writes no shadow record.
    f.gate
        .check_tool(&call(&f.ws), &ToolInput::ListDir { path: ".".into() })
        .unwrap();
    assert_eq!(decision_records(&f).len(), 3);
}

#[test]
fn decision_vectors_can_pin_what_a_shadow_trial_would_change() {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("policies");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut files: Vec<(String, String)> = policy::builtin::DEFAULT_POLICIES
        .iter()
        .map(|(n, t)| ((*n).to_string(), (*t).to_string()))
        .collect();
    files.push((
        "trial.cedar".into(),
        r#"@id("trial:no-network") @mode("shadow")
           forbid (principal, action == Chitin::Action::"exec", resource) when { context.approved };"#
            .into(),
    ));
    for (n, text) in &files {
        std::fs::write(dir.join(n), text).unwrap();
        std::fs::set_permissions(dir.join(n), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let case = |shadow_decision: &str| {
        json!({"entities": owners(), "state_dir": "/srv/chitin", "cases": [{
            "name": "network exec under the trial",
            "request": {"principal": "Chitin::User::\"alice\"", "action": "Chitin::Action::\"exec\"",
                        "resource": "Chitin::Tool::\"exec\"",
                        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                                    "workspace": "/w", "command": "curl", "command_path": "/usr/bin/curl",
                                    "argv": ["curl"], "cwd": "/w", "network": true}},
            "decision": "approval_required", "policies": ["tools.owner-exec-network-approved"],
            "shadow": ["trial:no-network"], "shadow_decision": shadow_decision}]})
    };
    let good = t.path().join("good.json");
    std::fs::write(&good, case("deny").to_string()).unwrap();
    let bad = t.path().join("bad.json");
    std::fs::write(&bad, case("allow").to_string()).unwrap();
    let home = t.path().join("home");
    let run = |f: &Path| {
        chitin_bin(
            &home,
            &[
                "policy",
                "test",
                "--dir",
                dir.to_str().unwrap(),
                f.to_str().unwrap(),
            ],
            "",
        )
    };
    let o = run(&good);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "1 passed, 0 failed\n");
    let o = run(&bad);
    assert_eq!(o.status.code(), Some(1));
    let f = bad.display();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "FAIL {f}: network exec under the trial: expected approval_required [\"tools.owner-exec-network-approved\"] shadow [\"trial:no-network\"] shadow_decision allow, \
             got approval_required [\"tools.owner-exec-network-approved\"] shadow [\"trial:no-network\"] shadow_decision deny errors []\n0 passed, 1 failed\n"
        )
    );
}
