//! The gate canonicalizes before Cedar sees a request, and only it hands out `Authorized`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chitin::gate::{CallContext, Gate, GateError, Origin, ToolInput, Verdict};
use chitin::policy::{EngineSpec, Outcome, PolicyEngine};
use chitin_audit::{AuditLog, AuditOptions, Query, Record, Verifier};
use serde_json::json;

struct Fixture {
    _t: tempfile::TempDir,
    gate: Gate,
    ws: PathBuf,
    home: PathBuf,
    outside: PathBuf,
}

fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("secrets.age"), "x").unwrap();
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
    std::fs::write(ws.join("notes.md"), "hi").unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "s").unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![ents],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let opts = AuditOptions {
        lock_timeout: std::time::Duration::from_millis(200),
        ..AuditOptions::default()
    };
    let audit = Arc::new(AuditLog::open(&home, opts).unwrap());
    Fixture {
        gate: Gate::new(Arc::new(engine), audit),
        ws,
        home,
        outside,
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

fn outcome(v: &Verdict) -> Outcome {
    v.decision().decision
}

#[test]
fn a_read_inside_the_workspace_is_authorized_for_exactly_that_request() {
    let f = fixture();
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "notes.md".into(),
            },
        )
        .unwrap();
    let Verdict::Allowed(auth, _) = v else {
        panic!("expected allow, got {v:?}")
    };
    assert_eq!(auth.action(), "read_file");
    assert_eq!(auth.principal(), "Chitin::User::\"owner\"");
    assert_eq!(auth.policies(), ["tools.owner-files-in-workspace"]);
}

#[test]
fn a_symlink_in_the_workspace_is_judged_by_its_target() {
    let f = fixture();
    std::os::unix::fs::symlink(f.outside.join("secret.txt"), f.ws.join("innocent.md")).unwrap();
    let req = f
        .gate
        .tool_request(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "innocent.md".into(),
            },
        )
        .unwrap();
    assert_eq!(
        req.context["path"],
        json!(f.outside.join("secret.txt").canonicalize().unwrap())
    );
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "innocent.md".into(),
            },
        )
        .unwrap();
    assert_eq!(outcome(&v), Outcome::Deny);
}

#[test]
fn a_symlinked_directory_pointing_at_the_state_dir_hits_the_guard() {
    let f = fixture();
    std::os::unix::fs::symlink(&f.home, f.ws.join("cache")).unwrap();
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "cache/secrets.age".into(),
            },
        )
        .unwrap();
    assert_eq!(outcome(&v), Outcome::Deny);
    assert_eq!(v.decision().policies, vec!["guard.state-dir-off-limits"]);
    // Writing a new file through the link is caught the same way.
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "cache/new.txt".into(),
            },
        )
        .unwrap();
    assert_eq!(outcome(&v), Outcome::Deny);
    assert!(
        v.decision()
            .policies
            .contains(&"guard.state-dir-off-limits".to_string())
    );
}

#[test]
fn dot_dot_paths_are_resolved_before_the_decision() {
    let f = fixture();
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "../outside/secret.txt".into(),
            },
        )
        .unwrap();
    assert_eq!(outcome(&v), Outcome::Deny);
}

#[test]
fn a_path_that_cannot_be_canonicalized_is_refused_as_invalid_input() {
    let f = fixture();
    let err = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::ReadFile {
                path: "missing/x".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, GateError::InvalidPath { .. }), "{err}");
    let err = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "no/such/../../../x".into(),
            },
        )
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("a directory to be created is not a plain name"),
        "{err}"
    );
    let err = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "a\0b".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, GateError::InvalidPath { .. }), "{err}");
    let err = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "sub/..".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(err, GateError::InvalidPath { .. }), "{err}");
}

#[test]
fn a_new_file_in_the_workspace_may_be_written() {
    let f = fixture();
    let v = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::WriteFile {
                path: "out.txt".into(),
            },
        )
        .unwrap();
    assert_eq!(outcome(&v), Outcome::Allow);
}

#[test]
fn exec_sees_the_real_program_behind_a_symlink() {
    let f = fixture();
    std::os::unix::fs::symlink("/bin/rm", f.ws.join("ls")).unwrap();
    let req = f
        .gate
        .tool_request(
            &call(&f.ws),
            &ToolInput::Exec {
                argv: vec!["./ls".into(), "-rf".into()],
                cwd: None,
                network: false,
            },
        )
        .unwrap();
    assert_eq!(req.context["command"], json!("rm"));
    let err = f
        .gate
        .check_tool(
            &call(&f.ws),
            &ToolInput::Exec {
                argv: vec!["no-such-program-xyz".into()],
                cwd: None,
                network: false,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("program not found"), "{err}");
}

#[test]
fn an_approval_binds_to_the_exact_request() {
    let f = fixture();
    let ask = |argv: &[&str]| {
        let input = ToolInput::Exec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            network: true,
        };
        match f.gate.check_tool(&call(&f.ws), &input).unwrap() {
            Verdict::ApprovalRequired { request_digest, .. } => request_digest,
            other => panic!("expected approval_required, got {other:?}"),
        }
    };
    let a = ask(&["rm", "./tmp/a"]);
    assert_eq!(
        a,
        ask(&["rm", "./tmp/a"]),
        "the same request has the same binding"
    );
    assert_ne!(
        a,
        ask(&["rm", "./tmp/b"]),
        "another request has another binding"
    );
    // Without a redeemed approval the call can never be decided as approved: there is no
    // parameter for it (the end-to-end redemption is in tests/tools_invoke.rs).
}

fn records(f: &Fixture) -> Vec<Record> {
    f.gate
        .audit()
        .reader()
        .unwrap()
        .query(&Query::default())
        .unwrap()
}

#[test]
fn every_decision_and_every_refusal_is_in_the_audit_chain() {
    let f = fixture();
    let c = call(&f.ws);
    f.gate
        .check_tool(
            &c,
            &ToolInput::ReadFile {
                path: "notes.md".into(),
            },
        )
        .unwrap();
    f.gate
        .check_tool(
            &c,
            &ToolInput::ReadFile {
                path: "../outside/secret.txt".into(),
            },
        )
        .unwrap();
    f.gate
        .check_tool(
            &c,
            &ToolInput::Exec {
                argv: vec!["curl".into(), "x".into()],
                cwd: None,
                network: true,
            },
        )
        .unwrap();
    let refused = f
        .gate
        .check_tool(
            &c,
            &ToolInput::ReadFile {
                path: "missing".into(),
            },
        )
        .unwrap_err();
    assert!(
        matches!(refused, GateError::InvalidPath { .. }),
        "{refused}"
    );
    let recs = records(&f);
    let got: Vec<(&str, &str, &str)> = recs
        .iter()
        .map(|r| (r.action.as_str(), r.decision.as_str(), r.kind.as_str()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("read_file", "allow", "decision"),
            ("read_file", "deny", "decision"),
            ("exec", "approval_required", "decision"),
            ("read_file", "deny", "decision"),
        ]
    );
    assert_eq!(recs[0].policy_ids(), vec!["tools.owner-files-in-workspace"]);
    assert!(
        recs[3].outcome.starts_with("refused: invalid path"),
        "{}",
        recs[3].outcome
    );
    // The chain verifies.
    let key = f.gate.audit().public_key();
    f.gate.audit().checkpoint_now().unwrap();
    let verdict = Verifier::new(key)
        .verify_db(&f.home.join("audit.db"), None)
        .unwrap();
    assert!(
        matches!(verdict, chitin_audit::Verdict::Ok(_)),
        "{verdict:?}"
    );
}

#[test]
fn a_policy_reload_is_recorded_whether_it_succeeds_or_not() {
    let f = fixture();
    f.gate.reload_policies("operator:test").unwrap();
    let recs = records(&f);
    let last = recs.last().unwrap();
    assert_eq!(
        (
            last.kind.as_str(),
            last.action.as_str(),
            last.outcome.as_str()
        ),
        ("admin", "policy.reload", "ok")
    );
}

#[test]
fn when_the_audit_log_cannot_be_written_nothing_is_authorized() {
    let f = fixture();
    let c = call(&f.ws);
    let read = ToolInput::ReadFile {
        path: "notes.md".into(),
    };
    assert!(matches!(
        f.gate.check_tool(&c, &read).unwrap(),
        Verdict::Allowed(..)
    ));
    // Another process holds the audit database's write lock.
    let blocker = rusqlite::Connection::open(f.home.join("audit.db")).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let err = f.gate.check_tool(&c, &read).unwrap_err();
    assert!(matches!(err, GateError::AuditUnavailable(_)), "{err}");
    assert!(
        err.to_string()
            .starts_with("audit log unavailable, so nothing is allowed"),
        "{err}"
    );
    drop(blocker);
    assert!(
        matches!(f.gate.check_tool(&c, &read).unwrap(), Verdict::Allowed(..)),
        "recovers once it can write"
    );
}
