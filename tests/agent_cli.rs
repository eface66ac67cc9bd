//! `chitin agent` and `chitin sessions`, checked from outside: the real binary against a fake
//! OpenAI-compatible provider on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use serde_json::{Value, json};

const PASS: &str = "agent-cli-pass";

struct Env {
    _t: tempfile::TempDir,
    home: PathBuf,
    _rt: tokio::runtime::Runtime,
    server: FakeServer,
}

fn env(steps: Vec<Step>) -> Env {
    // Not under /tmp: the sandbox gives every command a private /tmp.
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    let home = support::private_home(t.path(), "home");
    write_config(&home, &server.base_url());
    let e = Env {
        _t: t,
        home,
        _rt: rt,
        server,
    };
    let out = chitin(&e.home, &["init"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    e
}

fn write_config(home: &Path, url: &str) {
    let path = home.join("chitin.toml");
    let _ = std::fs::remove_file(&path);
    support::write_private(
        &path,
        format!(
            "{}\n[gateway]\nworkspace = \"../ws\"\n\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmax_attempts = 1\nconnect_timeout_ms = 500\n",
            support::TEST_SECRETS_CONFIG
        )
        .as_bytes(),
    );
}

fn cmd(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
    c.args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS);
    c
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    cmd(home, args).output().unwrap()
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn one_turn_prints_the_reply_and_with_json_the_run_tool_calls_and_usage() {
    let e = env(vec![
        Step::tool_call("c1", "write_file", r#"{"path":"hello.txt","content":"hi"}"#),
        Step::text("wrote hello.txt"),
        Step::text("plain answer"),
    ]);
    let v = json_of(&chitin(&e.home, &["agent", "-m", "write a file", "--json"]));
    assert_eq!(v["reply"], "wrote hello.txt");
    assert!(v["run_id"].as_str().unwrap().starts_with("run_"));
    assert_eq!(
        v["tool_calls"],
        json!([{"tool": "write_file", "decision": "allow", "outcome": "ok"}])
    );
    assert_eq!(v["usage"]["steps"], 2);
    assert!(e.home.parent().unwrap().join("ws/hello.txt").is_file());
    let out = chitin(
        &e.home,
        &["agent", "-m", "and now?", "--session", "cli:owner"],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "plain answer");
    // Sessions: listed, and the transcript shows the decisions.
    let out = chitin(&e.home, &["sessions", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("cli:owner") && list.contains("runs=2"),
        "{list}"
    );
    let out = chitin(&e.home, &["sessions", "show", "cli:owner"]);
    let show = String::from_utf8_lossy(&out.stdout);
    assert!(
        show.contains("tool write_file: decision=allow outcome=ok"),
        "{show}"
    );
    assert!(show.contains("assistant: plain answer"), "{show}");
}

#[test]
fn approval_timeout_zero_refuses_at_once_and_the_turn_still_completes() {
    let e = env(vec![
        Step::tool_call(
            "c1",
            "exec",
            r#"{"argv":["touch","net-marker"],"network":["127.0.0.1:9"]}"#,
        ),
        Step::text("approval was not given"),
    ]);
    let v = json_of(&chitin(
        &e.home,
        &["agent", "-m", "go", "--approval-timeout", "0", "--json"],
    ));
    assert_eq!(v["tool_calls"][0]["decision"], "approval_required");
    assert!(
        v["tool_calls"][0]["outcome"]
            .as_str()
            .unwrap()
            .contains("not awaited")
    );
    assert!(!e.home.parent().unwrap().join("ws/net-marker").exists());
}

#[test]
fn a_call_needing_approval_waits_for_approvals_approve_from_another_terminal() {
    let e = env(vec![
        Step::tool_call(
            "c1",
            "exec",
            r#"{"argv":["touch","approved-marker"],"network":["127.0.0.1:9"],"stdin":"upload \u202e everything"}"#,
        ),
        Step::text("done"),
    ]);
    let mut child = cmd(&e.home, &["agent", "-m", "go", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut code = None;
    let mut prompt = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        prompt.push(line.clone());
        if let Some(rest) = line
            .trim()
            .strip_prefix("approve with: chitin approvals approve ")
        {
            code = rest.split_whitespace().next().map(str::to_string);
            break;
        }
    }
    let code = code.expect("the approval code was printed on stderr");
    // The prompt shows everything the approval binds, stdin included, escaped.
    assert!(
        prompt.iter().any(|l| l.starts_with(
            "approval needed: exec: run `touch approved-marker` with network access to 127.0.0.1:9; stdin: \"upload \\u{202e} everything\"; resolved.cwd: \""
        ) && l.ends_with("; resolved.command_path: \"/usr/bin/touch\"")),
        "{prompt:?}"
    );
    assert!(
        prompt.iter().any(|l| l
            .trim()
            .starts_with("see everything it binds: chitin approvals show ")),
        "{prompt:?}"
    );
    let out = chitin(&e.home, &["approvals", "approve", &code]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child.wait_with_output().unwrap();
    let v = json_of(&out);
    assert_eq!(v["reply"], "done");
    assert_eq!(v["tool_calls"][0]["decision"], "allow");
    assert!(e.home.parent().unwrap().join("ws/approved-marker").exists());
}

#[test]
fn an_unreachable_provider_is_a_clear_error_and_a_nonzero_exit() {
    let e = env(vec![]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    write_config(&e.home, &url);
    let out = chitin(&e.home, &["agent", "-m", "hello"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not be reached"), "{err}");
    assert!(e.server.requests().is_empty());
    // The message was kept.
    let out = chitin(&e.home, &["sessions", "show", "cli:owner", "--json"]);
    let v = json_of(&out);
    assert_eq!(v["messages"][0]["message"]["text"], "hello");
}

#[test]
fn without_a_model_the_command_says_how_to_configure_one() {
    let e = env(vec![]);
    let path = e.home.join("chitin.toml");
    std::fs::remove_file(&path).unwrap();
    support::write_private(&path, support::TEST_SECRETS_CONFIG.as_bytes());
    let out = chitin(&e.home, &["agent", "-m", "hello"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no model is configured") && err.contains("[agent] model"),
        "{err}"
    );
}
