//! `chitin policy lint | explain | diff | shadow-report` on crafted policy sets, through the
//! real binary, with the exact outputs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use chitin::config::Globals;
use chitin::gate::{CallContext, Gate, Origin, ToolInput};
use chitin::policy::{EngineSpec, PolicyEngine};
use serde_json::{Value, json};

fn chitin(home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
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
    if let Some(s) = stdin {
        let _ = input.write_all(s.as_bytes());
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A private directory with `files` (mode 0600), as policy files must be.
fn policy_dir(at: &Path, files: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(at).unwrap();
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o700)).unwrap();
    for (name, text) in files {
        let p = at.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    at.to_path_buf()
}

fn private_file(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

const CRAFTED: &str = r#"@id("open-door")
permit (principal, action, resource);

@id("anyone-reads")
@reason("Anyone may read files in the workspace.")
permit (principal, action == Chitin::Action::"read_file", resource == Chitin::Tool::"read_file")
when { context.in_workspace };

@id("owners-exec-online")
@reason("Owners may run commands that use the network.")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"exec", resource)
when { context.network && context.in_workspace };

@id("no-network")
@reason("No command may use the network.")
forbid (principal, action in Chitin::Action::"effect:exec", resource)
when { context.network };

@id("owners-deploy-approved")
@reason("Owners may run the deploy tool once approved.")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"exec", resource == Chitin::Tool::"deploy")
when { context.approved };

@id("ghost-group")
@reason("Members of a group nobody is in.")
permit (principal in Chitin::Group::"nobody", action == Chitin::Action::"read_file", resource);

@id("switched-off")
@reason("Switched off.")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"list_dir", resource)
when { false };

@id("owners-install-skills")
@reason("Owners install any skill.")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"skill.install", resource);
"#;

const DEPLOY_TOOL: &str = r#"[{"uid": {"type": "Chitin::Tool", "id": "deploy"}, "attrs": {"risk": "high", "effects": ["exec"]}, "parents": []}]"#;

#[test]
fn lint_reports_each_kind_of_finding_on_a_crafted_set_with_exact_text_and_exit_2() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    let dir = policy_dir(&t.path().join("p"), &[("crafted.cedar", CRAFTED)]);
    let ents = t.path().join("tools.json");
    private_file(&ents, DEPLOY_TOOL);
    let f = format!("{}/crafted.cedar", dir.display());
    let args = [
        "policy",
        "lint",
        "--dir",
        dir.to_str().unwrap(),
        "--entities",
        ents.to_str().unwrap(),
    ];
    let o = chitin(&home, &args, None);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    let want = format!(
        r#"critical permit-allows-everything open-door at {f}:1:1: permit open-door allows every request
  observed: scope `principal, action, resource` and no when/unless clause
  fix: name the principals (`principal in Chitin::Group::"..."`), the actions and a condition, or delete the policy
high permit-high-risk-without-approval open-door at {f}:1:1: permit open-door can allow high-risk tools without approval
  observed: it can apply to Chitin::Tool::"deploy" (risk "high") and no clause requires context.approved
  fix: add `&& context.approved` to its when clause, or exclude high-risk tools with `when {{ resource.risk != "high" }}`
low policy-missing-reason open-door at {f}:1:1: policy open-door has no @reason
  observed: no @reason("...") annotation
  fix: add @reason("<why this rule exists>") above @id("open-door")
high permit-unconstrained-principal anyone-reads at {f}:4:1: permit anyone-reads applies to every principal
  observed: principal scope `principal` and no condition on `principal`
  fix: constrain the principal, e.g. `principal in Chitin::Group::"owners"`
high permit-high-risk-without-approval owners-exec-online at {f}:9:1: permit owners-exec-online can allow high-risk tools without approval
  observed: it can apply to Chitin::Tool::"deploy" (risk "high") and no clause requires context.approved
  fix: add `&& context.approved` to its when clause, or exclude high-risk tools with `when {{ resource.risk != "high" }}`
medium permit-shadowed-by-forbid owners-exec-online at {f}:9:1: permit owners-exec-online is shadowed by forbid no-network
  observed: forbid no-network ({f}:14:1) covers every principal, action and resource of the permit, and its condition holds whenever the permit's does
  fix: narrow forbid no-network or delete permit owners-exec-online, whichever is not meant
medium policy-unreachable ghost-group at {f}:24:1: policy ghost-group can never apply
  observed: no entity is in Chitin::Group::"nobody" (entities.json and the built-in entities), and Chitin::Group::"nobody" cannot itself be the principal of its actions
  fix: fix the scope or condition so that it can match a request, or delete the policy
medium policy-unreachable switched-off at {f}:28:1: policy switched-off can never apply
  observed: its `when` clause is the constant false
  fix: fix the scope or condition so that it can match a request, or delete the policy
low permit-unconstrained-resource owners-install-skills at {f}:33:1: permit owners-install-skills applies to every resource
  observed: resource scope without an entity and no condition on `resource`
  fix: constrain the resource in the scope (`resource == <Type>::"<id>"`, `resource in ...`) or in a condition on `resource`
9 findings in 8 policies: 1 critical, 3 high, 3 medium, 2 low
"#
    );
    assert_eq!(out(&o), want);

    // --json: the same findings as data, each with its stable id.
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let o = chitin(&home, &json_args, None);
    assert_eq!(o.status.code(), Some(2));
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    let ids: Vec<(String, String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["id"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
                f["policy"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, c: &str| (a.to_string(), b.to_string(), c.to_string());
    assert_eq!(
        ids,
        vec![
            s("permit-allows-everything", "critical", "open-door"),
            s("permit-high-risk-without-approval", "high", "open-door"),
            s("policy-missing-reason", "low", "open-door"),
            s("permit-unconstrained-principal", "high", "anyone-reads"),
            s(
                "permit-high-risk-without-approval",
                "high",
                "owners-exec-online"
            ),
            s("permit-shadowed-by-forbid", "medium", "owners-exec-online"),
            s("policy-unreachable", "medium", "ghost-group"),
            s("policy-unreachable", "medium", "switched-off"),
            s(
                "permit-unconstrained-resource",
                "low",
                "owners-install-skills"
            ),
        ]
    );
    assert_eq!(v["policies"], 8);
    assert_eq!(v["suppressed"], 0);
    assert_eq!(v["findings"][0]["location"], format!("{f}:1:1"));
}

#[test]
fn lint_exit_codes_follow_the_worst_severity_and_lint_allow_opts_a_policy_out() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());

    // The shipped defaults are clean (their deliberate exceptions say so with @lint_allow).
    let o = chitin(&home, &["policy", "lint"], None);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert_eq!(
        out(&o),
        "ok: no findings in 54 policies (checked: unconstrained permits, high-risk permits without approval, permits shadowed by forbids, unreachable policies, missing @reason); 7 left out by @lint_allow\n"
    );

    // Only low findings: exit 0.
    let low = policy_dir(
        &t.path().join("low"),
        &[(
            "a.cedar",
            r#"@id("owners-read")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"read_file", resource);
"#,
        )],
    );
    let o = chitin(
        &home,
        &["policy", "lint", "--dir", low.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).ends_with("1 findings in 1 policies: 0 critical, 0 high, 0 medium, 1 low\n"));

    // A medium finding: exit 1. Opting out of it: exit 0, and the report says so.
    let medium = r#"@id("owners-read")
@reason("Owners read.")
permit (principal in Chitin::Group::"owners", action == Chitin::Action::"read_file", resource)
when { context.in_workspace };

@id("no-reads")
@reason("No reads.")
forbid (principal, action in Chitin::Action::"effect:fs_read", resource);
"#;
    let mid = policy_dir(&t.path().join("mid"), &[("a.cedar", medium)]);
    let o = chitin(
        &home,
        &["policy", "lint", "--dir", mid.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("medium permit-shadowed-by-forbid owners-read"));
    let allowed = medium.replace(
        "@id(\"owners-read\")",
        "@id(\"owners-read\")\n@lint_allow(\"permit-shadowed-by-forbid\")",
    );
    let ok = policy_dir(&t.path().join("ok"), &[("a.cedar", &allowed)]);
    let o = chitin(
        &home,
        &["policy", "lint", "--dir", ok.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        out(&o).starts_with("ok: no findings in 2 policies"),
        "{}",
        out(&o)
    );
    assert!(
        out(&o).ends_with("; 1 left out by @lint_allow\n"),
        "{}",
        out(&o)
    );
}

#[test]
fn explain_names_the_determining_policies_with_reasons_and_the_changes_that_would_allow() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    let p = |f: &str| format!("{}/policies/{f}", home.display());
    // A write outside the workspace: denied by a guard; in the workspace it would be allowed.
    let req = json!({
        "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"write_file\"",
        "resource": "Chitin::Tool::\"write_file\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                    "workspace": "/ws", "path": "/etc/x"}
    });
    let o = chitin(
        &home,
        &["policy", "explain", "--request", "-"],
        Some(&req.to_string()),
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        format!(
            "decision: deny
determined by:
  forbid guard.writes-outside-workspace-need-approval at {}:26:1: No default policy permits writes outside the workspace; if an operator's policy ever does, each such write still needs approval.
derived: in_workspace=false memory_file=false prompt_file=false touches_state_dir=false
would be allowed if:
  in_workspace (derived) were true (not false): allow
    permit tools.owner-files-in-workspace at {}:3:1: Owners may read and write files inside the agent workspace with low- and medium-risk tools.
",
            p("guardrails.cedar"),
            p("tools.cedar")
        )
    );

    // A command that needs the network asks for approval; offline it would be allowed.
    let exec = json!({
        "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"exec\"",
        "resource": "Chitin::Tool::\"exec\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                    "workspace": "/ws", "command": "curl", "command_path": "/usr/bin/curl",
                    "argv": ["curl", "x"], "cwd": "/ws", "network": true}
    });
    let o = chitin(
        &home,
        &["policy", "explain", "--request", "-", "--json"],
        Some(&exec.to_string()),
    );
    assert!(o.status.success(), "{}", err(&o));
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["decision"], "approval_required");
    assert_eq!(
        v["policies"],
        json!([{"id": "tools.owner-exec-network-approved", "effect": "permit", "mode": "enforce",
                "reason": "A command that needs the network is high risk: it runs only after the owner approves it.",
                "location": format!("{}:17:1", p("tools.cedar"))}])
    );
    assert_eq!(
        v["derived"],
        json!({"command_writable": false, "in_workspace": true, "touches_state_dir": false})
    );
    let changes: Vec<(String, Value, String, Vec<String>)> = v["would_allow"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["attribute"].as_str().unwrap().to_string(),
                c["to"].clone(),
                c["decision"].as_str().unwrap().to_string(),
                c["policies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p["id"].as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        vec![(
            "network".to_string(),
            json!(false),
            "allow".to_string(),
            vec!["tools.owner-exec-offline-in-workspace".to_string()]
        )]
    );

    // --attribute limits what is tried.
    let o = chitin(
        &home,
        &[
            "policy",
            "explain",
            "--request",
            "-",
            "--attribute",
            "tainted",
        ],
        Some(&exec.to_string()),
    );
    assert!(
        out(&o).ends_with("no single context change would allow it\n"),
        "{}",
        out(&o)
    );

    // A malformed request: exit 1 with the reason, nothing on stdout.
    let o = chitin(
        &home,
        &["policy", "explain", "--request", "-"],
        Some("{\"principal\": 1}"),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(out(&o).is_empty());
    assert!(
        err(&o).contains("`principal` must be a string"),
        "{}",
        err(&o)
    );
}

#[test]
fn diff_lists_the_requests_whose_decision_changes_between_two_policy_sets() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    let old = home.join("policies");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&old)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap(),
            )
        })
        .collect();
    files.push((
        "change.cedar".into(),
        r#"@id("tools.no-curl")
@reason("No curl, even offline.")
forbid (principal, action == Chitin::Action::"exec", resource) when { context.command == "curl" };
"#
        .into(),
    ));
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let new = policy_dir(&t.path().join("new"), &refs);
    let exec = |cmd: &str| {
        json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"exec\"",
               "resource": "Chitin::Tool::\"exec\"",
               "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                           "workspace": "/ws", "command": cmd, "command_path": format!("/usr/bin/{cmd}"),
                           "argv": [cmd], "cwd": "/ws", "network": false}})
    };
    let reqs = t.path().join("requests.json");
    private_file(
        &reqs,
        &json!([exec("ls"), exec("curl"), {"principal": "nope"}]).to_string(),
    );
    let args = [
        "policy",
        "diff",
        "--old",
        old.to_str().unwrap(),
        "--new",
        new.to_str().unwrap(),
        "--requests",
        reqs.to_str().unwrap(),
    ];
    let o = chitin(&home, &args, None);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert_eq!(
        out(&o),
        "#1 Chitin::User::\"owner\" Chitin::Action::\"exec\" Chitin::Tool::\"exec\": allow [tools.owner-exec-offline-in-workspace] -> deny [tools.no-curl]\n\
         1 of 3 requests change (allow -> deny: 1)\n"
    );
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let v: Value = serde_json::from_str(&out(&chitin(&home, &json_args, None))).unwrap();
    assert_eq!(v["requests"], 3);
    assert_eq!(v["summary"], json!({"allow -> deny": 1}));
    assert_eq!(v["changed"][0]["index"], 1);
    assert_eq!(v["changed"][0]["request"], exec("curl"));
    assert_eq!(
        v["changed"][0]["old"],
        json!({"decision": "allow", "policies": ["tools.owner-exec-offline-in-workspace"]})
    );
    assert_eq!(
        v["changed"][0]["new"],
        json!({"decision": "deny", "policies": ["tools.no-curl"]})
    );

    // Generated requests: deterministic for a seed, and they find the change.
    let gen_args = [
        "policy",
        "diff",
        "--old",
        old.to_str().unwrap(),
        "--new",
        new.to_str().unwrap(),
        "--generate",
        "400",
        "--seed",
        "7",
    ];
    let first = chitin(&home, &gen_args, None);
    assert_eq!(first.status.code(), Some(1), "{}", err(&first));
    let again = chitin(&home, &gen_args, None);
    assert_eq!(out(&first), out(&again));
    let text = out(&first);
    let lines: Vec<&str> = text.lines().collect();
    let (last, changes) = lines.split_last().unwrap();
    assert!(!changes.is_empty());
    for l in changes {
        assert!(l.ends_with("-> deny [tools.no-curl]"), "{l}");
        assert!(l.contains("Chitin::Action::\"exec\""), "{l}");
    }
    // Both allowed and approvable requests can be newly denied; the summary counts each kind.
    let allowed = changes
        .iter()
        .filter(|l| l.contains(": approval_required ["))
        .count();
    let kinds: Vec<String> = [
        ("allow", changes.len() - allowed),
        ("approval_required", allowed),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| format!("{k} -> deny: {n}"))
    .collect();
    assert_eq!(
        *last,
        format!(
            "{} of 400 requests change ({})",
            changes.len(),
            kinds.join(", ")
        ),
        "{text}"
    );

    // The same set on both sides changes nothing: exit 0.
    let o = chitin(
        &home,
        &[
            "policy",
            "diff",
            "--old",
            old.to_str().unwrap(),
            "--new",
            old.to_str().unwrap(),
            "--generate",
            "50",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o), "0 of 50 requests change\n");

    // Neither requests nor --generate: a usage error.
    let o = chitin(
        &home,
        &[
            "policy",
            "diff",
            "--old",
            old.to_str().unwrap(),
            "--new",
            old.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("--requests FILE or --generate N"),
        "{}",
        err(&o)
    );
}

#[test]
fn shadow_report_summarizes_the_shadow_records_of_the_audit_log() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    // A plaintext identity, so that this test process can open the audit log without a
    // passphrase prompt (the binary and the test share the home).
    std::fs::create_dir(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    private_file(
        &home.join("chitin.toml"),
        "[secrets]\nbackend = \"file\"\nallow_plaintext_identity = true\n",
    );
    let o = chitin(&home, &["init"], None);
    assert!(o.status.success(), "{}", err(&o));
    private_file(
        &home.join("policies/trial.cedar"),
        r#"@id("trial:no-network") @mode("shadow") @reason("Trial: no approved network commands.")
forbid (principal, action == Chitin::Action::"exec", resource) when { context.approved };

@id("trial:writes-need-approval") @mode("shadow") @reason("Trial: every write needs approval.")
forbid (principal, action == Chitin::Action::"write_file", resource) unless { context.approved };
"#,
    );
    let ws = t.path().join("ws");
    std::fs::create_dir(&ws).unwrap();
    {
        // Decisions as the gateway makes them, recorded in the home's audit log.
        let globals = Globals::resolve(home.clone(), None);
        let audit = chitin::cli::open_audit(&globals).unwrap();
        let engine = PolicyEngine::load(EngineSpec {
            policy_dir: Some(home.join("policies")),
            entity_files: vec![home.join("entities.json")],
            state_dir: Some(home.clone()),
        })
        .unwrap();
        let gate = Gate::new(Arc::new(engine), Arc::clone(&audit));
        let call = CallContext {
            user: "owner".into(),
            origin: Origin::Model,
            session: "s1".into(),
            workspace: ws.clone(),
            tainted: false,
        };
        let net = ToolInput::Exec {
            argv: vec!["ls".into()],
            cwd: None,
            network: true,
        };
        gate.check_tool(&call, &net).unwrap();
        gate.check_tool(&call, &net).unwrap();
        gate.check_tool(
            &call,
            &ToolInput::WriteFile {
                path: "a.txt".into(),
            },
        )
        .unwrap();
        gate.check_tool(&call, &ToolInput::ListDir { path: ".".into() })
            .unwrap();
        audit.shutdown().unwrap();
    }
    let o = chitin(
        &home,
        &["policy", "shadow-report", "--since", "1d", "--json"],
        None,
    );
    assert!(o.status.success(), "{}", err(&o));
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["records"], 3);
    let seqs = |p: &Value| {
        (
            p["first_seq"].as_i64().unwrap(),
            p["last_seq"].as_i64().unwrap(),
        )
    };
    let net = &v["policies"][0];
    let write = &v["policies"][1];
    assert_eq!(net["policy"], "trial:no-network");
    assert_eq!(net["decisions"], 2);
    assert_eq!(net["changes"], json!({"approval_required -> deny": 2}));
    assert_eq!(net["actions"], json!({"exec": 2}));
    assert_eq!(net["principals"], 1);
    assert_eq!(write["policy"], "trial:writes-need-approval");
    assert_eq!(write["decisions"], 1);
    assert_eq!(write["changes"], json!({"allow -> approval_required": 1}));
    assert_eq!(write["actions"], json!({"write_file": 1}));
    assert_eq!(v["policies"].as_array().unwrap().len(), 2);

    let o = chitin(&home, &["policy", "shadow-report", "--since", "1d"], None);
    assert!(o.status.success(), "{}", err(&o));
    let text = out(&o);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("shadow policies since "), "{text}");
    assert!(
        lines[0].ends_with(": 3 decision(s) would have changed"),
        "{text}"
    );
    let (a, b) = seqs(net);
    assert_eq!(
        lines[1],
        format!(
            "trial:no-network: 2 decision(s) (approval_required -> deny: 2); actions exec: 2; 1 principal(s); audit seq {a}..{b}"
        )
    );
    let (a, b) = seqs(write);
    assert_eq!(
        lines[2],
        format!(
            "trial:writes-need-approval: 1 decision(s) (allow -> approval_required: 1); actions write_file: 1; 1 principal(s); audit seq {a}..{b}"
        )
    );

    // A window before the records: nothing. A bad window: a clear error.
    let o = chitin(
        &home,
        &["policy", "shadow-report", "--since", "2999-01-01T00:00:00Z"],
        None,
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(
        out(&o),
        "shadow policies since 2999-01-01T00:00:00Z: 0 decision(s) would have changed\n"
    );
    let o = chitin(&home, &["policy", "shadow-report", "--since", "soon"], None);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err(&o).contains("--since \"soon\" is neither a window like 7d"),
        "{}",
        err(&o)
    );
}
