//! Workflows through the real binaries: `chitin workflow run|resume|list|show|recover` next to
//! a running `chitin gateway`; a paused run approved over the CLI, and one approved over the
//! WebSocket (the gateway continues it); a run whose process is killed with SIGKILL mid-step,
//! continued after a gateway restart (the step re-run because it has `retry`) or reported
//! interrupted (without `retry`); the examples under `examples/workflows/`, run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed assertion is the report"
)]

#[path = "support/gateway.rs"]
mod gateway;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gateway::{Gw, PASS};
use serde_json::{Value, json};

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn envelope(o: &Output) -> Value {
    serde_json::from_str(&out(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", out(o), err(o)))
}

fn write(gw: &Gw, name: &str, text: &str) -> String {
    let p = gw.workspace().join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, text).unwrap();
    p.to_string_lossy().into_owned()
}

/// `chitin workflow show RUN --json`, until `done` says so (or 60 s pass).
fn show_until(gw: &Gw, run: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = gw.chitin(&["workflow", "show", run, "--json"]);
        assert!(o.status.success(), "{}", err(&o));
        let v: Value = serde_json::from_str(&out(&o)).unwrap();
        if done(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "run never got there: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_id_of(gw: &Gw) -> String {
    let o = gw.chitin(&["workflow", "list", "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    v[0]["id"].as_str().unwrap().to_string()
}

const GATED: &str = "name: tidy\nsteps:\n  - id: list\n    run: printf '[\"old.log\"]'\n    approval:\n      prompt: Delete old.log?\n  - id: delete\n    when: $list.approved\n    run: rm -f old.log && echo deleted\n";

#[test]
fn a_paused_run_is_approved_over_the_cli_and_finishes() {
    let gw = Gw::start("");
    let f = write(&gw, "tidy.lobster", GATED);
    write(&gw, "old.log", "x");
    let o = gw.chitin(&["workflow", "run", &f, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let env = envelope(&o);
    let keys: Vec<&String> = env.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "protocolVersion",
            "ok",
            "status",
            "output",
            "requiresApproval",
            "requiresInput"
        ]
    );
    assert_eq!(env["status"], "needs_approval");
    let req = &env["requiresApproval"];
    assert_eq!(req["type"], "approval_request");
    assert_eq!(req["items"], json!(["old.log"]));
    let id = req["approvalId"].as_str().unwrap().to_string();
    let token = req["resumeToken"].as_str().unwrap().to_string();
    assert!(gw.workspace().join("old.log").exists());
    // It waits where tool approvals wait.
    let o = gw.chitin(&["approvals", "list"]);
    assert!(
        out(&o).contains("workflow: workflow tidy, step list; prompt: \"Delete old.log?\""),
        "{}",
        out(&o)
    );
    let o = gw.chitin(&[
        "workflow",
        "resume",
        "--id",
        &id,
        "--approve",
        "yes",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let env = envelope(&o);
    assert_eq!(env["status"], "ok", "{env}");
    assert_eq!(env["output"], json!(["deleted\n"]));
    assert!(!gw.workspace().join("old.log").exists());
    // The token of the same pause is used up.
    let o = gw.chitin(&[
        "workflow",
        "resume",
        "--token",
        &token,
        "--approve",
        "yes",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let env = envelope(&o);
    assert_eq!(env["error"]["type"], "runtime_error");
    assert!(
        env["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("this pause was already resumed at "),
        "{env}"
    );
    // Without --json: for a person.
    let o = gw.chitin(&["workflow", "list"]);
    assert!(out(&o).contains("  ok  "), "{}", out(&o));
    let run = run_id_of(&gw);
    let o = gw.chitin(&["workflow", "show", &run]);
    assert!(out(&o).contains("delete"), "{}", out(&o));
    // Exactly one intent.
    let o = gw.chitin(&[
        "workflow",
        "resume",
        "--id",
        &id,
        "--approve",
        "yes",
        "--cancel",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_call(ws: &mut Ws, id: &str, method: &str, params: Value) -> Value {
    let req = json!({"type": "req", "id": id, "method": method, "params": params});
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        req.to_string(),
    ))
    .await
    .unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("no answer")
            .expect("closed")
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "res" && v["id"] == id {
                return v;
            }
        }
    }
}

#[test]
fn a_paused_run_approved_over_the_websocket_is_finished_by_the_gateway() {
    let gw = Gw::start("");
    let f = write(&gw, "tidy.lobster", GATED);
    write(&gw, "old.log", "x");
    let env = envelope(&gw.chitin(&["workflow", "run", &f, "--json"]));
    let id = env["requiresApproval"]["approvalId"]
        .as_str()
        .unwrap()
        .to_string();
    let run = run_id_of(&gw);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
                .await
                .unwrap();
        let r = ws_call(&mut ws, "1", "connect", json!({"token": gw.token})).await;
        assert_eq!(r["ok"], true, "{r}");
        let r = ws_call(&mut ws, "2", "approvals.list", json!({})).await;
        assert!(r.to_string().contains(&id), "{r}");
        let r = ws_call(
            &mut ws,
            "3",
            "approvals.resolve",
            json!({"id": id, "decision": "approve"}),
        )
        .await;
        assert_eq!(r["ok"], true, "{r}");
    });
    // Until it has finished: after the approval it runs (`running`) before it ends.
    let v = show_until(&gw, &run, |v| {
        !matches!(v["status"].as_str(), Some("paused" | "running"))
    });
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["envelope"]["output"], json!(["deleted\n"]));
    assert!(!gw.workspace().join("old.log").exists());
}

/// Starts `chitin workflow run FILE --json` in its own process group (so the test can kill
/// it with its sandbox, as a crash of the machine's process tree would).
fn spawn_run(gw: &Gw, file: &str) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["workflow", "run", file, "--json"])
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

fn wait_for_file(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill_group(child: &mut std::process::Child) {
    let pgid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status()
            .unwrap()
            .success()
    );
    let _ = child.wait();
}

const SLOW: &str = "steps:\n  - id: first\n    run: touch started; while [ ! -e go ]; do sleep 0.05; done; echo first\n    RETRY\n  - id: second\n    run: echo second\n";

#[test]
fn a_run_killed_mid_step_is_continued_after_a_restart_and_its_step_rerun_because_it_has_retry() {
    let mut gw = Gw::start("");
    let f = write(
        &gw,
        "slow.lobster",
        &SLOW.replace("RETRY", "retry: {max: 2, delay_ms: 10}"),
    );
    let mut child = spawn_run(&gw, &f);
    wait_for_file(&gw.workspace().join("started"));
    kill_group(&mut child);
    let run = run_id_of(&gw);
    let o = gw.chitin(&["workflow", "show", &run, "--json"]);
    let v: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(v["status"], "running", "left behind as it was: {v}");
    std::fs::write(gw.workspace().join("go"), "").unwrap();
    // A new gateway continues it.
    gw.signal("-TERM");
    gw.wait_exit();
    gw.spawn();
    let v = show_until(&gw, &run, |v| v["status"] != "running");
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["envelope"]["output"], json!(["second\n"]));
    let first = &v["steps"][0];
    assert_eq!(first["step"], "first");
    assert_eq!(first["status"], "ok");
    assert_eq!(first["attempts"], 2, "{first}");
}

#[test]
fn a_step_interrupted_by_a_kill_without_retry_is_reported_interrupted_and_not_rerun() {
    let gw = Gw::start("");
    let f = write(&gw, "slow.lobster", &SLOW.replace("    RETRY\n", ""));
    let mut child = spawn_run(&gw, &f);
    wait_for_file(&gw.workspace().join("started"));
    kill_group(&mut child);
    std::fs::remove_file(gw.workspace().join("started")).unwrap();
    std::fs::write(gw.workspace().join("go"), "").unwrap();
    let run = run_id_of(&gw);
    let o = gw.chitin(&["workflow", "recover", "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(envelope(&o), json!({"recovered": 1, "continued": 0}));
    let v = show_until(&gw, &run, |v| v["status"] != "running");
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["steps"][0]["status"], "interrupted", "{v}");
    let e = v["error"].as_str().unwrap();
    assert!(e.contains("interrupted"), "{e}");
    assert!(e.contains("no `retry`"), "{e}");
    assert!(
        !gw.workspace().join("started").exists(),
        "the step ran again"
    );
    // A second recover finds nothing.
    let o = gw.chitin(&["workflow", "recover", "--json"]);
    assert_eq!(envelope(&o), json!({"recovered": 0, "continued": 0}));
}

#[test]
fn the_examples_run_as_far_as_this_machine_has_their_programs() {
    let gw = Gw::start("");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::create_dir_all(gw.workspace().join("examples")).unwrap();
        std::fs::copy(
            e.path(),
            gw.workspace().join("examples").join(e.file_name()),
        )
        .unwrap();
    }
    let ex = |name: &str| {
        gw.workspace()
            .join("examples")
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    // downloads-cleanup: two old files, one new; approved, the old ones are deleted.
    if Path::new("/usr/bin/jq").exists() {
        let dl = gw.workspace().join("Downloads");
        std::fs::create_dir_all(&dl).unwrap();
        for f in ["a.zip", "b.pdf", "new.txt"] {
            std::fs::write(dl.join(f), f).unwrap();
        }
        for f in ["a.zip", "b.pdf"] {
            let s = Command::new("touch")
                .args(["-d", "2020-01-01"])
                .arg(dl.join(f))
                .status()
                .unwrap();
            assert!(s.success());
        }
        let env = envelope(&gw.chitin(&[
            "workflow",
            "run",
            &ex("downloads-cleanup.lobster"),
            "--json",
        ]));
        assert_eq!(env["status"], "needs_approval", "{env}");
        assert_eq!(env["requiresApproval"]["requiredApprover"], "owner");
        let mut items: Vec<String> = env["requiresApproval"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        items.sort();
        assert_eq!(items, ["Downloads/a.zip", "Downloads/b.pdf"]);
        let id = env["requiresApproval"]["approvalId"].as_str().unwrap();
        let env = envelope(&gw.chitin(&[
            "workflow",
            "resume",
            "--id",
            id,
            "--approve",
            "yes",
            "--json",
        ]));
        assert_eq!(env["status"], "ok", "{env}");
        assert_eq!(
            env["output"],
            json!(["deleted 2 files older than 30 days from Downloads\n"])
        );
        assert!(!dl.join("a.zip").exists() && !dl.join("b.pdf").exists());
        assert!(dl.join("new.txt").exists());
    } else {
        eprintln!("skipped downloads-cleanup: /usr/bin/jq is not installed");
    }
    // The others need programs (gh, cargo) or services (gog) a test machine does not have:
    // they run in the sandbox until the first of them and fail saying so.
    let cases = [
        (
            "ci-triage.yaml",
            r#"{"repo": "octo/app", "run_id": "1"}"#,
            "workflow step `run` failed: command failed (exit 127)",
        ),
        (
            "repo-report.yaml",
            "{}",
            "workflow step `repos` failed: command failed (exit 127)",
        ),
        (
            "release-checks.json",
            r#"{"version": "1.0.0"}"#,
            "workflow step `checks` failed: parallel branch failed",
        ),
        (
            "morning-inbox.lobster",
            "{}",
            "pipeline stage `gog.gmail.search` is not available in Chitin's workflow runner",
        ),
    ];
    for (file, args, want) in cases {
        let o = gw.chitin(&["workflow", "run", &ex(file), "--json", "--args-json", args]);
        assert_eq!(o.status.code(), Some(1), "{file}: {}{}", out(&o), err(&o));
        let env = envelope(&o);
        let m = env["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{file}: {m}");
    }
}

const LOOP_AND_PIPELINE: &str = "name: tidy-each\nsteps:\n  - id: list\n    run: printf '[\"a.log\", \"b.log\"]'\n  - id: each\n    for_each: $list.json\n    steps:\n      - id: ask\n        approval: Delete this log?\n      - id: rm\n        when: $ask.approved\n        run: rm -- $item.json && printf '%s' $item.json\n  - id: record\n    stdin: $each.json\n    pipeline: pick item | diff.last --key deleted | approve --prompt \"Record the deletions?\" | exec --stdin json \"cat > record.json\"\n";

fn resume_cli(gw: &Gw, token: &str) -> Value {
    let o = gw.chitin(&[
        "workflow",
        "resume",
        "--token",
        token,
        "--approve",
        "yes",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}{}", out(&o), err(&o));
    envelope(&o)
}

/// Through the binary: a for_each body's approval gate asks per item (showing the item) and a
/// pipeline's `approve` stage asks before its last stage; each `chitin workflow resume`
/// continues exactly there, and `diff.last` keeps its value for the next run.
#[test]
fn gates_inside_a_loop_and_a_pipeline_are_approved_over_the_cli_one_by_one() {
    let gw = Gw::start("");
    let f = write(&gw, "tidy-each.lobster", LOOP_AND_PIPELINE);
    write(&gw, "a.log", "a");
    write(&gw, "b.log", "b");
    let o = gw.chitin(&["workflow", "run", &f, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    let mut env = envelope(&o);
    for (file, left) in [("a.log", true), ("b.log", false)] {
        assert_eq!(env["status"], "needs_approval", "{env}");
        assert_eq!(env["requiresApproval"]["items"], json!([file]));
        assert_eq!(env["requiresApproval"]["prompt"], "Delete this log?");
        env = resume_cli(
            &gw,
            env["requiresApproval"]["resumeToken"].as_str().unwrap(),
        );
        assert!(!gw.workspace().join(file).exists());
        assert_eq!(gw.workspace().join("b.log").exists(), left);
    }
    assert_eq!(env["status"], "needs_approval", "{env}");
    let req = &env["requiresApproval"];
    assert_eq!(req["prompt"], "Record the deletions?");
    assert_eq!(req["items"][0]["changed"], true);
    assert_eq!(
        req["items"][0]["after"],
        json!([{"item": "a.log"}, {"item": "b.log"}])
    );
    let env = resume_cli(&gw, req["resumeToken"].as_str().unwrap());
    assert_eq!(env["status"], "ok", "{env}");
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(gw.workspace().join("record.json")).unwrap())
            .unwrap();
    assert_eq!(record[0]["kind"], "diff.last");
    assert_eq!(record[0]["before"], Value::Null);
    // `chitin workflow show` lists the loop's parts per item.
    let run = run_id_of(&gw);
    let show = show_until(&gw, &run, |v| v["status"] == "ok");
    let names: Vec<&str> = show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["step"].as_str())
        .collect();
    assert!(names.contains(&"each[1].rm"), "{names:?}");
}

/// The `downloads-review` example: one approval per file (showing the file), a "no" stops the
/// review, the next run asks about what is left, and an unchanged folder asks nothing.
#[test]
fn the_downloads_review_example_asks_per_file_and_remembers_the_folder() {
    if !Path::new("/usr/bin/jq").exists() {
        eprintln!("skipped downloads-review: /usr/bin/jq is not installed");
        return;
    }
    let gw = Gw::start("");
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/workflows/downloads-review.lobster");
    let f = write(
        &gw,
        "downloads-review.lobster",
        &std::fs::read_to_string(src).unwrap(),
    );
    let dl = gw.workspace().join("Downloads");
    std::fs::create_dir_all(&dl).unwrap();
    for name in ["x.zip", "y.pdf"] {
        std::fs::write(dl.join(name), name).unwrap();
    }
    let run = || envelope(&gw.chitin(&["workflow", "run", &f, "--json"]));
    let answer = |env: &Value, yes: &str| {
        envelope(&gw.chitin(&[
            "workflow",
            "resume",
            "--id",
            env["requiresApproval"]["approvalId"].as_str().unwrap(),
            "--approve",
            yes,
            "--json",
        ]))
    };
    let env = run();
    assert_eq!(
        env["requiresApproval"]["items"],
        json!(["Downloads/x.zip"]),
        "{env}"
    );
    let env = answer(&env, "yes");
    assert!(!dl.join("x.zip").exists());
    assert_eq!(
        env["requiresApproval"]["items"],
        json!(["Downloads/y.pdf"]),
        "{env}"
    );
    let env = answer(&env, "no");
    assert_eq!(env["status"], "cancelled", "{env}");
    assert!(dl.join("y.pdf").exists());
    // The folder changed since the first run: asked again about what is left.
    let env = run();
    assert_eq!(
        env["requiresApproval"]["items"],
        json!(["Downloads/y.pdf"]),
        "{env}"
    );
    let env = answer(&env, "yes");
    assert_eq!(env["status"], "ok", "{env}");
    assert_eq!(env["output"][0]["delete"], "deleted Downloads/y.pdf");
    // Empty now (changed once more), then unchanged: nothing is asked.
    assert_eq!(run()["status"], "ok");
    let env = run();
    assert_eq!(env["status"], "ok", "{env}");
    assert_eq!(
        env["output"],
        json!([{"kind": "diff.last", "key": "downloads", "changed": false, "before": [], "after": []}])
    );
}
