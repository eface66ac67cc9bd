//! First contact, tried as a new user would from the README (issue #19): the real binary on a
//! private state dir, a fake OpenAI-compatible provider on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;
#[path = "support/home.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use harness::{Gw, Resp, free_port};
use serde_json::{Value, json};

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

fn chat(gw: &Gw, text: &str) -> Resp {
    gw.try_req(
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &gw.bearer()),
            ("Content-Type", "application/json"),
        ],
        json!({"model": "chitin", "messages": [{"role": "user", "content": text}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap()
}

/// Replaces the gateway's config file (0600) with `text`.
fn rewrite_config(home: &Path, text: &str) {
    let p = home.join("chitin.toml");
    std::fs::remove_file(&p).unwrap();
    support::write_private(&p, text.as_bytes());
}

/// Polls `/ready` until `pred` holds (60 s).
fn ready_until(gw: &Gw, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = gw.get("/ready").json();
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn reply_of(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn changing_the_model_takes_effect_on_reload_without_a_restart() {
    let (_rt, s) = fake(vec![Step::Reply(Reply::text([
        "answered by the new model",
    ]))]);
    let gw = Gw::start("");
    assert!(
        reply_of(&chat(&gw, "hello")).starts_with("No model is configured"),
        "control: no model at start"
    );
    let base = std::fs::read_to_string(gw.home.join("chitin.toml")).unwrap();
    rewrite_config(
        &gw.home,
        &format!(
            "{base}\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
            s.base_url()
        ),
    );
    gw.signal("-HUP");
    ready_until(&gw, "the new model in /ready", |v| {
        v["checks"]["config"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("model: fake/m1"))
    });
    assert_eq!(
        reply_of(&chat(&gw, "hello again")),
        "answered by the new model"
    );
    assert_eq!(s.requests().len(), 1, "the fake provider answered the chat");
}

#[test]
fn an_invalid_config_on_reload_is_said_in_ready_naming_the_table_and_the_old_one_stays() {
    let gw = Gw::start("");
    let base = std::fs::read_to_string(gw.home.join("chitin.toml")).unwrap();
    // What appending a README snippet with a table the file already has gives.
    rewrite_config(
        &gw.home,
        &format!("{base}\n[gateway]\nbind = \"127.0.0.1:1\"\n"),
    );
    gw.signal("-HUP");
    let v = ready_until(&gw, "the config error in /ready", |v| {
        v["checks"]["config"]["ok"] == json!(false)
    });
    let detail = v["checks"]["config"]["detail"].as_str().unwrap();
    assert!(
        detail.contains("table [gateway] is defined twice"),
        "{detail}"
    );
    assert!(
        detail.contains("the previous config stays in effect"),
        "{detail}"
    );
    assert_eq!(v["ready"], false);
    // Fixed: ready again.
    rewrite_config(&gw.home, &base);
    gw.signal("-HUP");
    ready_until(&gw, "ready after the fix", |v| v["ready"] == json!(true));
}

#[test]
fn get_v1_models_lists_the_agent_for_openai_clients_and_needs_the_token() {
    let gw = Gw::start("");
    let r = gw.get("/v1/models");
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "chitin");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(gw.get("/v1/models/chitin").json()["id"], "chitin");
    let r = gw.get("/v1/models/gpt-4o");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = gw.try_req("GET", "/v1/models", &[], b"").unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
}

#[test]
fn a_second_gateway_on_the_same_home_is_told_one_already_runs() {
    let gw = Gw::start("");
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--port", &free_port().to_string()])
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", harness::PASS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another gateway is already running"), "{err}");
    assert!(!err.contains("restoring a backup"), "{err}");
}

/// Starts `chitin gateway ARGS` on a fresh home with stdout in a file; returns the child, the
/// home's parent and the stdout path once `/health` answers on `port`.
fn gateway_with_stdout(
    args: &[&str],
    port: u16,
) -> (std::process::Child, tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let stdout = t.path().join("stdout");
    let child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", &home)
        .env("CHITIN_PASSPHRASE", harness::PASS)
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if harness::exchange(
            &mut match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => s,
                Err(_) => {
                    assert!(Instant::now() < deadline, "the gateway did not start");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
            port,
            "GET",
            "/health",
            &[],
            b"",
        )
        .is_ok_and(|r| r.status == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "the gateway did not answer");
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, t, stdout)
}

#[test]
fn gateway_port_is_127_0_0_1_port_and_the_banner_names_every_entry_point() {
    let port = free_port();
    let (mut child, _t, stdout) =
        gateway_with_stdout(&["gateway", "--port", &port.to_string()], port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let banner = loop {
        let b = std::fs::read_to_string(&stdout).unwrap();
        if b.contains("health:") {
            break b;
        }
        assert!(Instant::now() < deadline, "no banner: {b}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let base = format!("http://127.0.0.1:{port}");
    for needle in [
        format!("listening on {base}"),
        format!("web chat:  {base}/"),
        format!("POST {base}/v1/chat/completions"),
        format!("GET {base}/v1/models"),
        format!("ws://127.0.0.1:{port}/ws"),
    ] {
        assert!(banner.contains(&needle), "{needle:?} not in {banner}");
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

#[test]
fn version_shows_the_commit_the_build_date_and_rustc() {
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.starts_with(&format!("chitin {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    assert!(v.contains(", built 20"), "{v}");
    assert!(v.contains("rustc 1."), "{v}");
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", harness::PASS)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn init_creates_the_secret_store_and_the_token_so_token_show_works_right_after() {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let o = chitin(&home, &["init"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("created secrets"), "{}", text(&o));
    assert!(home.join("secrets.age").is_file());
    assert!(home.join("audit.pub").is_file());
    let o = chitin(&home, &["token", "show"]);
    assert!(o.status.success(), "{}", text(&o));
    let token = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert_eq!(token.len(), 64, "{token}");
    // The token was made by init, not by `token show`: init recorded its creation.
    let o = chitin(&home, &["audit", "query", "--actor", "cli:init", "--json"]);
    let q = text(&o);
    assert!(q.contains("gateway.token.create"), "{q}");
    // A second init keeps everything.
    let o = chitin(&home, &["init"]);
    assert!(text(&o).contains("kept    secrets"), "{}", text(&o));
    assert_eq!(
        String::from_utf8_lossy(&chitin(&home, &["token", "show"]).stdout).trim(),
        token
    );
}

#[test]
fn a_state_db_from_a_newer_chitin_is_refused_with_what_to_do() {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    assert!(chitin(&home, &["init"]).status.success());
    let c = rusqlite::Connection::open(home.join("state.db")).unwrap();
    c.pragma_update(None, "user_version", 9999).unwrap();
    drop(c);
    let o = chitin(&home, &["gateway", "--port", &free_port().to_string()]);
    assert!(!o.status.success());
    let e = text(&o);
    assert!(e.contains("schema version 9999, newer than"), "{e}");
    assert!(e.contains("Run the newer `chitin` binary"), "{e}");
}

fn agent_home(url: &str) -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    rewrite_config(
        &home,
        &format!(
            "{}\n[gateway]\nworkspace = \"../ws\"\n\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmax_attempts = 1\n",
            support::TEST_SECRETS_CONFIG
        ),
    );
    let o = chitin(&home, &["init"]);
    assert!(o.status.success(), "{}", text(&o));
    (t, home)
}

#[test]
fn an_approval_left_pending_by_a_run_that_ended_is_expired_with_it() {
    let call = r#"{"argv":["touch","net-marker"],"network":["127.0.0.1:9"]}"#;
    let (_rt, s) = fake(vec![
        Step::tool_call("c1", "exec", call),
        Step::text("not approved"),
        Step::tool_call("c2", "exec", call),
        Step::text("still not approved"),
    ]);
    let (_t, home) = agent_home(&s.base_url());
    let o = chitin(
        &home,
        &["agent", "-m", "go", "--approval-timeout", "0", "--json"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tool_calls"][0]["decision"], "approval_required");
    // The run is over: its approval is no longer open, and approving it now is refused.
    let o = chitin(&home, &["approvals", "list", "--all", "--json"]);
    let list: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let a = &list.as_array().unwrap()[0];
    assert_eq!(a["status"], "expired", "{list}");
    let code = a["code"].as_str().unwrap();
    let o = chitin(&home, &["approvals", "approve", code]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("expired"), "{}", text(&o));
    // The next identical call asks again; nothing ran.
    let o = chitin(
        &home,
        &["agent", "-m", "again", "--approval-timeout", "0", "--json"],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tool_calls"][0]["decision"], "approval_required", "{v}");
    assert!(!home.parent().unwrap().join("ws/net-marker").exists());
}

fn set_secret(home: &Path, name: &str, audience: &str, value: &str) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["secrets", "set", name, "--audience", audience])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", harness::PASS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn status_shows_the_gateway_model_approvals_backup_and_audit_head() {
    let (_rt, s) = fake(vec![]);
    s.set_models(&["m0", "m1"]);
    s.require_models_key("status-probe-key-0001");
    let mut gw = Gw::start(&format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\napi_key = \"secret:fake_key\"\n",
        s.base_url()
    ));
    // The key is stored while the gateway is stopped, so it starts ready.
    gw.signal("-TERM");
    gw.wait_exit();
    set_secret(&gw.home, "fake_key", "127.0.0.1", "status-probe-key-0001");
    gw.spawn();
    let o = gw.chitin(&["status", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["gateway"]["running"], true, "{v}");
    assert_eq!(v["gateway"]["ready"], true, "{v}");
    assert_eq!(v["model"]["model"], "fake/m1");
    assert_eq!(v["model"]["reachable"], true, "{v}");
    assert_eq!(v["model"]["http_status"], 200, "{v}");
    assert_eq!(v["model"]["key_accepted"], true, "{v}");
    assert_eq!(v["model"]["model_listed"], true, "{v}");
    assert_eq!(v["approvals_pending"], 0);
    assert!(v["audit_head"]["seq"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(v["backup"]["last_at"], Value::Null);
    // The running gateway is listed as the one live replica, with its host and version.
    let replicas = v["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{v}");
    let version = replicas[0]["version"].as_str().unwrap();
    assert!(v["version"].as_str().unwrap().starts_with(version), "{v}");
    assert!(replicas[0]["heartbeat_ms"].as_i64().unwrap() > 0, "{v}");
    assert_eq!(replicas[0]["leases"], serde_json::json!([]), "{v}");
    // The probe was an HTTP request for the model list, with the key, and spent nothing.
    let asked: Vec<_> = s
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/models")
        .collect();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].method, "GET");
    assert_eq!(
        asked[0].header("authorization"),
        Some("Bearer status-probe-key-0001")
    );
    assert!(s.requests().iter().all(|r| r.path == "/v1/models"));
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("status-probe-key-0001"),
        "the key is never printed"
    );
    let o = gw.chitin(&["status"]);
    let screen = String::from_utf8_lossy(&o.stdout);
    assert!(
        screen.contains("gateway    up and ready at http://"),
        "{screen}"
    );
    assert!(
        screen.contains(&format!(
            "model      fake/m1: reachable (GET {}/models: HTTP 200, the model is listed)",
            s.base_url()
        )),
        "{screen}"
    );
    assert!(screen.contains("approvals  0 pending"), "{screen}");
    assert!(screen.contains("replicas   1 live: "), "{screen}");
    assert!(screen.contains("audit      head seq "), "{screen}");

    // A wrong key is said to be refused by the provider.
    set_secret(&gw.home, "fake_key", "127.0.0.1", "a-wrong-key-000000001");
    let o = gw.chitin(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model"]["reachable"], true, "{v}");
    assert_eq!(v["model"]["http_status"], 401, "{v}");
    assert_eq!(v["model"]["key_accepted"], false, "{v}");
    let o = gw.chitin(&["status"]);
    let screen = String::from_utf8_lossy(&o.stdout);
    assert!(
        screen.contains("model      fake/m1: reachable but the key is REFUSED (GET "),
        "{screen}"
    );
}

#[test]
fn status_says_a_port_that_accepts_connections_but_speaks_no_http_is_not_a_reachable_model() {
    // A listener that accepts and hangs up: a TCP connect succeeds, no HTTP answer comes.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    let (_t, home) = agent_home(&format!("http://127.0.0.1:{port}/v1"));
    let o = chitin(&home, &["status", "--json"]);
    let v: Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["model"]["reachable"], false, "{v}");
    let detail = v["model"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("GET http://127.0.0.1:{port}/v1/models: ")),
        "{detail}"
    );
}

#[test]
fn status_without_a_gateway_says_so_and_exits_1() {
    let (_rt, s) = fake(vec![]);
    let (_t, home) = agent_home(&s.base_url());
    drop(s);
    let o = chitin(&home, &["status"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let screen = String::from_utf8_lossy(&o.stdout);
    assert!(screen.contains("gateway    not running"), "{screen}");
}

/// The README's `toml` blocks, each as written.
fn readme_toml_blocks() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in readme.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```toml") => cur = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => out.push(cur.take().unwrap()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn every_readme_toml_snippet_pastes_into_the_generated_config() {
    let blocks = readme_toml_blocks();
    assert!(!blocks.is_empty());
    for b in &blocks {
        let text = format!("{}\n{b}", chitin::config::default_toml());
        if let Err(e) = chitin::config::Config::parse(&text, Path::new("chitin.toml")) {
            panic!("appending this README snippet to the generated config fails: {e}\n{b}");
        }
    }
}

#[test]
fn the_readme_says_how_to_run_chitin_and_chitin_audit_verify_which_is_built() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(
        readme.contains("cargo install --path ."),
        "how to get `chitin` on the PATH"
    );
    assert!(
        readme.contains("cargo install --path audit"),
        "how to get `chitin-audit-verify`"
    );
    let audit = std::fs::read_to_string(root.join("audit/Cargo.toml")).unwrap();
    assert!(audit.contains("name = \"chitin-audit-verify\""));
    assert!(root.join("audit/src/bin/chitin-audit-verify.rs").is_file());
    // The README's edit instruction names the line the template has.
    assert!(chitin::config::default_toml().contains("[agent]\n# The model the agent uses"));
    assert!(
        readme.contains("model = \"\""),
        "the README names the line to edit"
    );
}

#[test]
fn a_pasted_duplicate_table_is_refused_naming_the_table_by_the_cli_too() {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let o = chitin(&home, &["init"]);
    assert!(o.status.success());
    rewrite_config(
        &home,
        &format!(
            "{}\n[agent]\nmax_steps = 4\n\n[agent]\nmodel = \"local/llama3.1\"\n",
            support::TEST_SECRETS_CONFIG
        ),
    );
    let o = chitin(&home, &["status"]);
    let e = text(&o);
    assert!(!o.status.success());
    assert!(e.contains("table [agent] is defined twice"), "{e}");
    assert!(e.contains("first at line 5, again at line 8"), "{e}");
    assert!(!e.contains("llama3.1"), "values are never quoted: {e}");
}

#[test]
fn init_without_a_passphrase_sets_up_the_rest_and_says_how_to_create_the_secret_store() {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let o = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .arg("init")
        .env("CHITIN_HOME", &home)
        .env_remove("CHITIN_PASSPHRASE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("the secret store and the gateway token were not created")
            && err.contains("CHITIN_PASSPHRASE"),
        "{err}"
    );
    assert!(home.join("state.db").is_file());
    assert!(!home.join("secrets.age").exists());
    // With the passphrase, init finishes the job.
    let o = chitin(&home, &["init"]);
    assert!(text(&o).contains("created secrets"), "{}", text(&o));
    assert!(chitin(&home, &["token", "show"]).status.success());
}
