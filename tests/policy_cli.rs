//! The `chitin init` and `chitin policy ...` contracts, run as an operator would.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn chitin(home: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chitin"));
    cmd.args(args)
        .env("CHITIN_HOME", home)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        // A command may exit before reading its input (e.g. on a config error): not a failure.
        let _ = input.write_all(s.as_bytes());
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_creates_a_private_state_dir_and_is_idempotent() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let o = chitin(&home, &["init"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode(&home), 0o700);
    for f in [
        "chitin.toml",
        "entities.json",
        "state.db",
        "policies/tools.cedar",
    ] {
        assert_eq!(mode(&home.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&home.join("policies")), 0o700);

    // The operator edits the config and removes a default policy: init leaves both alone.
    let edited = "[policy]\ndir = \"policies\"\n";
    std::fs::write(home.join("chitin.toml"), edited).unwrap();
    std::fs::remove_file(home.join("policies/admin.cedar")).unwrap();
    let o = chitin(&home, &["init"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(home.join("chitin.toml")).unwrap(),
        edited
    );
    assert!(!home.join("policies/admin.cedar").exists());
    assert!(stdout(&o).contains("kept    config"), "{}", stdout(&o));
}

#[test]
fn a_world_writable_state_file_stops_every_command_with_the_fix() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    let f = home.join("entities.json");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = chitin(&home, &["policy", "validate"], None);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains(&f.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn an_unknown_config_key_is_reported_with_its_name_and_line() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[policy]\nentities = \"e.json\"\nentitties = \"typo\"\n",
    )
    .unwrap();
    let o = chitin(
        &t.path().join("h"),
        &["--config", cfg.to_str().unwrap(), "policy", "validate"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("entitties") && err.contains("line 3"), "{err}");
}

#[test]
fn validate_accepts_the_default_policies() {
    let t = tempfile::tempdir().unwrap();
    let o = chitin(t.path(), &["policy", "validate", "--dir", "policies"], None);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: 54 policies"), "{}", stdout(&o));
}

#[test]
fn validate_prints_each_error_as_file_line_col() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("a.cedar"),
        "@id(\"ok\")\npermit (principal, action == Chitin::Action::\"exec\", resource);\n\n@id(\"typo\")\npermit (principal, action == Chitin::Action::\"read_file\", resource)\nwhen { context.pathh == \"/x\" };\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.cedar"),
        "// no id\npermit (principal, action, resource);\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("c.cedar"),
        "@id(\"x\")\npermit (principal, action, resource) when { 1 + };\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("d.cedar"),
        "@id(\"ok\")\nforbid (principal, action, resource);\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("e.cedar"),
        "@id(\"m\") @mode(\"audit\")\nforbid (principal, action, resource);\n",
    )
    .unwrap();
    let o = chitin(
        t.path(),
        &["policy", "validate", "--dir", dir.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let d = dir.display();
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{d}/b.cedar:2:1: ")) && l.contains("no @id")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{d}/c.cedar:2:"))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{d}/d.cedar:1:1: duplicate @id(\"ok\")"))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{d}/e.cedar:1:1: unknown @mode"))),
        "{out}"
    );
    // Schema errors are found once the syntax is fixed.
    for f in ["b.cedar", "c.cedar", "d.cedar", "e.cedar"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let o = chitin(
        t.path(),
        &["policy", "validate", "--dir", dir.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{d}/a.cedar:6:")) && l.contains("pathh")),
        "{out}"
    );
}

#[test]
fn a_broken_schema_is_reported_with_its_location() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("schema.cedarschema"),
        "namespace Chitin {\n  entity User in [Nope];\n}\n",
    )
    .unwrap();
    let o = chitin(
        t.path(),
        &["policy", "validate", "--dir", dir.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with(&format!("{}/schema.cedarschema:", dir.display())),
        "{}",
        stdout(&o)
    );
}

fn eval(home: &Path, req: &Value) -> Output {
    chitin(
        home,
        &["policy", "eval", "--request", "-"],
        Some(&req.to_string()),
    )
}

#[test]
fn eval_prints_one_decision_object() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    let ws = t.path().join("ws");
    let req = json!({
        "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"write_file\"",
        "resource": "Chitin::Tool::\"write_file\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                    "workspace": ws, "path": ws.join("a.txt")}
    });
    let o = eval(&home, &req);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        v,
        json!({"decision": "allow", "policies": ["tools.owner-files-in-workspace"], "shadow": [], "errors": []})
    );

    // The real state dir is off limits, wherever CHITIN_HOME points.
    let mut bad = req.clone();
    bad["context"]["path"] = json!(home.join("entities.json"));
    let v: Value = serde_json::from_str(stdout(&eval(&home, &bad)).trim()).unwrap();
    assert_eq!(v["decision"], "deny");
    assert_eq!(
        v["policies"],
        json!([
            "guard.state-dir-off-limits",
            "guard.writes-outside-workspace-need-approval"
        ])
    );
}

#[test]
fn eval_takes_extra_entities_and_a_request_file() {
    let t = tempfile::tempdir().unwrap();
    let ents = t.path().join("e.json");
    std::fs::write(
        &ents,
        json!([{"uid": {"type": "Chitin::User", "id": "bob"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}]).to_string(),
    )
    .unwrap();
    let reqf = t.path().join("r.json");
    std::fs::write(
        &reqf,
        json!({"principal": "Chitin::User::\"bob\"", "action": "Chitin::Action::\"config.write\"", "resource": "Chitin::Gateway::\"gateway\"", "context": {}}).to_string(),
    )
    .unwrap();
    let home = t.path().join("nohome");
    let args = [
        "policy",
        "eval",
        "--entities",
        ents.to_str().unwrap(),
        "--request",
        reqf.to_str().unwrap(),
    ];
    let o = chitin(&home, &args, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["policies"], json!(["admin.owners"]));
    // Without the extra entities bob is nobody.
    let o = chitin(
        &home,
        &["policy", "eval", "--request", reqf.to_str().unwrap()],
        None,
    );
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["decision"], "deny");
}

#[test]
fn eval_refuses_malformed_input_with_exit_1_and_a_reason() {
    let t = tempfile::tempdir().unwrap();
    let cases = [
        ("{not json", "not valid JSON"),
        (r#"{"principal": "User::alice"}"#, "principal"),
        (
            r#"{"principal": "Chitin::User::\"a\"", "action": "Chitin::Action::\"nope\"", "resource": "Chitin::Tool::\"exec\""}"#,
            "unknown action",
        ),
        (
            r#"{"principal": "Chitin::User::\"a\"", "action": "Chitin::Action::\"exec\"", "resource": "Chitin::Tool::\"exec\"", "context": {"approved": true}}"#,
            "context",
        ),
        (
            r#"{"principal": "Chitin::User::\"a\"", "action": "Chitin::Action::\"audit.read\"", "resource": "Chitin::Gateway::\"gateway\"", "approved": true}"#,
            "unknown field `approved`",
        ),
    ];
    for (input, why) in cases {
        let o = chitin(t.path(), &["policy", "eval", "--request", "-"], Some(input));
        assert_eq!(o.status.code(), Some(1), "{input}");
        assert!(stdout(&o).is_empty(), "no decision is printed for {input}");
        assert!(stderr(&o).contains(why), "{input}: {}", stderr(&o));
    }
}

#[test]
fn policy_test_runs_the_committed_vectors() {
    let t = tempfile::tempdir().unwrap();
    let o = chitin(&t.path().join("h"), &["policy", "test"], None);
    assert!(o.status.success(), "{}", stdout(&o));
    let last = stdout(&o).lines().last().unwrap().to_string();
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 53, "{last}");
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
}

#[test]
fn policy_test_fails_on_a_wrong_expectation() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("v.json");
    std::fs::write(
        &f,
        json!({"cases": [
            {"name": "right", "request": {"principal": "Chitin::User::\"x\"", "action": "Chitin::Action::\"audit.read\"", "resource": "Chitin::Gateway::\"gateway\"", "context": {}}, "decision": "deny", "policies": []},
            {"name": "wrong", "request": {"principal": "Chitin::User::\"x\"", "action": "Chitin::Action::\"audit.read\"", "resource": "Chitin::Gateway::\"gateway\"", "context": {}}, "decision": "allow", "policies": ["admin.owners"]}
        ]})
        .to_string(),
    )
    .unwrap();
    let o = chitin(
        &t.path().join("h"),
        &["policy", "test", f.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(
        out.contains("FAIL") && out.contains("wrong: expected allow"),
        "{out}"
    );
    assert_eq!(out.lines().last(), Some("1 passed, 1 failed"));
}

#[test]
fn validate_reports_an_unreadable_directory_in_the_same_format() {
    let t = tempfile::tempdir().unwrap();
    let missing = t.path().join("nope");
    let o = chitin(
        t.path(),
        &["policy", "validate", "--dir", missing.to_str().unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with(&format!("{}:1:1: cannot read:", missing.display())),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_configured_policy_directory_that_is_missing_is_an_error_not_the_defaults() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[policy]\ndir = \"{}/strict-policies\"\n",
            t.path().display()
        ),
    )
    .unwrap();
    let req = json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"audit.read\"",
                     "resource": "Chitin::Gateway::\"gateway\"", "context": {}});
    let o = chitin(
        &t.path().join("h"),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "policy",
            "eval",
            "--request",
            "-",
        ],
        Some(&req.to_string()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).is_empty(),
        "no decision from the built-in defaults"
    );
    assert!(
        stderr(&o).contains("the configured [policy] dir does not exist"),
        "{}",
        stderr(&o)
    );
    // An explicit --config that does not exist is an error too.
    let o = chitin(
        &t.path().join("h"),
        &["--config", "/nonexistent/chitin.toml", "policy", "validate"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot read config /nonexistent/chitin.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn eval_with_malformed_extra_entities_exits_1() {
    let t = tempfile::tempdir().unwrap();
    let ents = t.path().join("e.json");
    std::fs::write(&ents, "{not json").unwrap();
    let req = json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"audit.read\"",
                     "resource": "Chitin::Gateway::\"gateway\"", "context": {}});
    let o = chitin(
        &t.path().join("h"),
        &[
            "policy",
            "eval",
            "--entities",
            ents.to_str().unwrap(),
            "--request",
            "-",
        ],
        Some(&req.to_string()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
}

#[test]
fn writable_policy_entity_and_config_files_are_refused_wherever_they_are() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], None).status.success());
    // Deep inside the policy dir, and in a directory named like the workspace.
    let deep = home.join("policies/a/b/c/d/e/f");
    std::fs::create_dir_all(&deep).unwrap();
    for d in [
        "policies/a",
        "policies/a/b",
        "policies/a/b/c",
        "policies/a/b/c/d",
        "policies/a/b/c/d/e",
        "policies/a/b/c/d/e/f",
    ] {
        std::fs::set_permissions(home.join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let f = deep.join("x.cedar");
    std::fs::write(&f, "@id(\"deep\") permit (principal, action, resource);\n").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = chitin(&home, &["policy", "validate"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("world-writable file"), "{}", stdout(&o));
    std::fs::remove_file(&f).unwrap();
    // Entities and config outside the state dir.
    let outside = t.path().join("etc");
    std::fs::create_dir(&outside).unwrap();
    let ents = outside.join("entities.json");
    std::fs::write(&ents, "[]").unwrap();
    std::fs::set_permissions(&ents, std::fs::Permissions::from_mode(0o666)).unwrap();
    let cfg = outside.join("c.toml");
    std::fs::write(
        &cfg,
        format!("[policy]\nentities = \"{}\"\n", ents.display()),
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let req = json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"audit.read\"",
                     "resource": "Chitin::Gateway::\"gateway\"", "context": {}});
    let o = chitin(
        &home,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "policy",
            "eval",
            "--request",
            "-",
        ],
        Some(&req.to_string()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("world-writable file"), "{}", stderr(&o));
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o622)).unwrap();
    let o = chitin(
        &home,
        &["--config", cfg.to_str().unwrap(), "policy", "validate"],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("c.toml") && stderr(&o).contains("chmod 600"),
        "{}",
        stderr(&o)
    );
}
