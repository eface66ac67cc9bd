//! The Control UI's JSON API (`/api/v1/*`, issue #17) through the real `chitin gateway`
//! binary: every endpoint answers the owner (a session made by a real agent turn against a
//! fake model, an approval opened by `/tools/invoke`, the audit log the gateway writes),
//! refuses a request without a valid token with 401, and refuses with 403 and the
//! determining policy ids when Cedar forbids the action.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;

use serde_json::{Value, json};

#[path = "support/gateway.rs"]
mod harness;

use harness::{Gw, Resp};

/// Every endpoint of the API, as (method, path, body) a client can send.
fn endpoints(approval_id: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/api/v1/sessions".into(), None),
        ("GET", "/api/v1/sessions/api:t1".into(), None),
        ("GET", "/api/v1/approvals?status=all".into(), None),
        ("GET", format!("/api/v1/approvals/{approval_id}"), None),
        (
            "POST",
            format!("/api/v1/approvals/{approval_id}/resolve"),
            Some(json!({"decision": "deny"})),
        ),
        ("GET", "/api/v1/audit?limit=5".into(), None),
        ("GET", "/api/v1/audit/1".into(), None),
        ("GET", "/api/v1/audit/verify".into(), None),
        ("GET", "/api/v1/audit/export".into(), None),
        ("GET", "/api/v1/usage?by=model".into(), None),
        ("GET", "/api/v1/policy".into(), None),
        (
            "POST",
            "/api/v1/policy/explain".into(),
            Some(
                json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"usage.read\"", "resource": "Chitin::Gateway::\"gateway\""}),
            ),
        ),
        ("GET", "/api/v1/policy/shadow".into(), None),
        ("GET", "/api/v1/pairing".into(), None),
        (
            "POST",
            "/api/v1/pairing/ABCDEF/resolve".into(),
            Some(json!({"decision": "deny"})),
        ),
        ("GET", "/api/v1/health".into(), None),
        ("GET", "/api/v1/devices".into(), None),
        (
            "POST",
            "/api/v1/devices/0123456789abcdef/resolve".into(),
            Some(json!({"decision": "approve"})),
        ),
    ]
}

fn send(gw: &Gw, method: &str, path: &str, body: Option<&Value>, auth: Option<&str>) -> Resp {
    let text = body.map(Value::to_string).unwrap_or_default();
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth {
        headers.push(("Authorization", a));
    }
    gw.try_req(method, path, &headers, text.as_bytes()).unwrap()
}

fn get(gw: &Gw, path: &str) -> Value {
    let r = gw.get(path);
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

fn post(gw: &Gw, path: &str, body: &Value) -> Resp {
    send(gw, "POST", path, Some(body), Some(&gw.bearer()))
}

/// The gateway with an agent on a fake OpenAI-compatible model (priced), with a generous
/// failed-authentication allowance (these tests fail on purpose, many times).
fn start(
    rt: &tokio::runtime::Runtime,
    extra: &str,
) -> (Gw, chitin::providers::testing::FakeServer) {
    use chitin::providers::testing::{FakeOpenAi, Reply, Step};
    let fake = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(
                Reply::text(["Looking."])
                    .tool_call("c1", "list_dir", r#"{"path": "."}"#, 1)
                    .usage(1000, 100),
            ),
            Step::Reply(Reply::text(["Nothing ", "there."]).usage(2000, 50)),
        ]))
        .unwrap();
    let cfg = format!(
        "auth_max_failures = 1000\n\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n[pricing]\n\"fake/m1\" = {{ input_per_mtok = 3.0, output_per_mtok = 15.0 }}\n{extra}",
        fake.base_url()
    );
    (Gw::start(&cfg), fake)
}

/// One agent turn over the OpenAI-compatible API: session `api:t1`, a `list_dir` call.
fn chat_turn(gw: &Gw) {
    let r = post(
        gw,
        "/v1/chat/completions",
        &json!({"model": "chitin", "user": "t1", "messages": [{"role": "user", "content": "what is in the workspace?"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// An `exec` with network access: approval required; returns the approval.
fn open_approval(gw: &Gw, marker: &str, stdin: &str) -> Value {
    let r = gw.invoke(&json!({"tool": "exec", "args": {"argv": ["touch", marker], "network": ["127.0.0.1:9"], "stdin": stdin}, "session": "ops"}));
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()["approval"].clone()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_owner_sees_sessions_runs_approvals_audit_usage_policy_pairing_and_health() {
    let rt = runtime();
    let keep = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = policy_dir(keep.path(), SHADOW);
    let (gw, _fake) = start(
        &rt,
        &format!("\n[policy]\ndir = {:?}\n", dir.display().to_string()),
    );
    chat_turn(&gw);

    // Sessions: the turn's session with its channel, user, activity, spend and taint.
    let list = get(&gw, "/api/v1/sessions");
    let s = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"] == "api:t1")
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert_eq!(s["user"], "owner");
    assert_eq!(s["channel"], "api");
    // The tool's output entered the context: the session is tainted, and the list says so.
    assert_eq!(s["tainted"], true);
    // (1000 * 3 + 100 * 15 + 2000 * 3 + 50 * 15) / 1e6 USD
    let spend = s["spend_usd"].as_f64().unwrap();
    assert!((spend - 0.01125).abs() < 1e-9, "{s}");
    assert_eq!(list["hidden_owners"], 0);

    // One session: the decrypted transcript, the run with its task, cost and tool call.
    let one = get(&gw, "/api/v1/sessions/api:t1");
    let texts: Vec<String> = one["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        texts.contains(&"what is in the workspace?".to_string()),
        "{one}"
    );
    assert!(texts.contains(&"Nothing there.".to_string()), "{one}");
    let run = &one["runs"][0];
    assert_eq!(run["task"], "chat");
    assert_eq!(run["status"], "completed");
    assert_eq!(run["input_tokens"], 3000);
    assert!((run["cost_usd"].as_f64().unwrap() - 0.01125).abs() < 1e-9);
    assert_eq!(run["tool_calls"][0]["tool"], "list_dir");
    assert_eq!(run["tool_calls"][0]["decision"], "allow");
    assert_eq!(run["tool_calls"][0]["arguments"], r#"{"path": "."}"#);
    let missing = gw.get("/api/v1/sessions/api:nobody");
    assert_eq!(missing.status, 404, "{}", missing.body);

    // Approvals: the complete request, approve with the same check as everywhere.
    let stdin = format!("HEAD{}TAIL", "x".repeat(4000));
    let a = open_approval(&gw, "approved-marker", &stdin);
    let id = a["id"].as_str().unwrap().to_string();
    let pending = get(&gw, "/api/v1/approvals");
    assert!(
        pending["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == id.as_str()),
        "{pending}"
    );
    // The list abbreviates the large stdin; the approval itself has every value whole.
    let listed = pending["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == id.as_str())
        .unwrap()
        .clone();
    let listed_stdin = listed["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["label"] == "stdin")
        .unwrap()
        .clone();
    assert_eq!(listed_stdin["complete"], false);
    let full = get(&gw, &format!("/api/v1/approvals/{id}"))["approval"].clone();
    let full_stdin = full["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["label"] == "stdin")
        .unwrap()
        .clone();
    assert_eq!(full_stdin["complete"], true);
    assert_eq!(full_stdin["value"], stdin.as_str());
    assert_eq!(full["arguments"]["stdin"], stdin.as_str());
    assert_eq!(
        full["arguments"]["argv"],
        json!(["touch", "approved-marker"])
    );
    assert_eq!(full["requester"], "owner");
    assert!(full["expires_at"].as_str().unwrap().ends_with('Z'));

    let bad = post(
        &gw,
        &format!("/api/v1/approvals/{id}/resolve"),
        &json!({"decision": "yes"}),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let ok = post(
        &gw,
        &format!("/api/v1/approvals/{id}/resolve"),
        &json!({"decision": "approve"}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["approval"]["status"], "granted");
    let again = post(
        &gw,
        &format!("/api/v1/approvals/{id}/resolve"),
        &json!({"decision": "deny"}),
    );
    assert_eq!(again.status, 409, "{}", again.body);
    // The granted approval lets exactly that call run once.
    assert!(!gw.workspace().join("approved-marker").exists());
    let ran = gw.invoke(&json!({"tool": "exec", "args": {"argv": ["touch", "approved-marker"], "network": ["127.0.0.1:9"], "stdin": stdin}, "session": "ops"}));
    assert_eq!(ran.status, 200, "{}", ran.body);
    assert!(gw.workspace().join("approved-marker").exists());
    let b = open_approval(&gw, "denied-marker", "");
    let denied = post(
        &gw,
        &format!("/api/v1/approvals/{}/resolve", b["id"].as_str().unwrap()),
        &json!({"decision": "deny"}),
    );
    assert_eq!(denied.status, 200, "{}", denied.body);
    assert_eq!(denied.json()["approval"]["status"], "denied");
    let all = get(&gw, "/api/v1/approvals?status=all");
    let statuses: Vec<&str> = all["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["status"].as_str().unwrap())
        .collect();
    assert!(
        statuses.contains(&"used") && statuses.contains(&"denied"),
        "{all}"
    );
    assert_eq!(
        get(&gw, "/api/v1/approvals")["approvals"],
        json!([]),
        "nothing is pending any more"
    );

    // Audit: query by action and decision (newest first, paged), one record, verify, export.
    let q = get(
        &gw,
        "/api/v1/audit?action=exec&decision=approval_required&limit=1",
    );
    let first = &q["records"][0];
    assert_eq!(first["action"], "exec");
    assert_eq!(first["decision"], "approval_required");
    assert_eq!(first["actor"], "Chitin::User::\"owner\"");
    let before = q["next_before"].as_i64().unwrap();
    let older = get(
        &gw,
        &format!("/api/v1/audit?action=exec&decision=approval_required&limit=1&before={before}"),
    );
    let older_seq = older["records"][0]["seq"].as_i64().unwrap();
    assert!(older_seq < first["seq"].as_i64().unwrap(), "{older}");
    let detail = get(&gw, &format!("/api/v1/audit/{older_seq}"));
    assert_eq!(detail["record"]["seq"], older_seq);
    assert_eq!(detail["record"]["prev_hash"].as_str().unwrap().len(), 64);
    let v = get(&gw, "/api/v1/audit/verify");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["summary"].as_str().unwrap().starts_with("ok: "), "{v}");
    let export = gw.get("/api/v1/audit/export");
    assert_eq!(export.status, 200);
    assert!(
        export
            .header("content-disposition")
            .unwrap()
            .contains("chitin-audit.jsonl")
    );
    assert!(export.body.lines().count() > 10, "{}", export.body);
    assert!(
        export.body.contains("\"audit.export\""),
        "the export is itself recorded"
    );
    let unknown = gw.get("/api/v1/audit?acter=x");
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert!(
        unknown.body.contains("unknown query parameter"),
        "{}",
        unknown.body
    );

    // Usage: per model and per task, the same numbers as `chitin usage`.
    let by_model = get(&gw, "/api/v1/usage?by=model");
    assert_eq!(by_model["groups"][0]["key"], "fake/m1");
    assert_eq!(by_model["groups"][0]["calls"], 2);
    assert_eq!(by_model["groups"][0]["runs"], 1);
    assert_eq!(by_model["groups"][0]["input_tokens"], 3000);
    let by_task = get(&gw, "/api/v1/usage?by=task&since=1d");
    assert_eq!(by_task["groups"][0]["key"], "chat");
    assert_eq!(by_task["budgets"][0]["user"], "owner");
    let cli = gw.chitin(&["usage", "--by", "model", "--json"]);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(cli["groups"], by_model["groups"]);
    let text = gw.chitin(&["usage", "--by", "task"]);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("chat ") && l.contains("0.0112")),
        "{text}"
    );
    assert_eq!(gw.get("/api/v1/usage?by=colour").status, 400);

    // Policy: the set with @reasons, explain (an allow and a default deny), shadow report.
    let pol = get(&gw, "/api/v1/policy");
    let own = pol["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "session.own")
        .unwrap()
        .clone();
    assert_eq!(own["effect"], "permit");
    assert_eq!(own["mode"], "enforce");
    assert!(
        own["reason"]
            .as_str()
            .unwrap()
            .contains("their own sessions")
    );
    assert!(own["text"].as_str().unwrap().contains("session.read"));
    assert!(pol["last_reload_error"].is_null());
    let allow = post(
        &gw,
        "/api/v1/policy/explain",
        &json!({"principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"usage.read\"", "resource": "Chitin::Gateway::\"gateway\""}),
    );
    assert_eq!(allow.status, 200, "{}", allow.body);
    let allow = allow.json();
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["policies"][0]["id"], "control.owners");
    assert!(
        allow["policies"][0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("Owners may see usage")
    );
    let deny = post(
        &gw,
        "/api/v1/policy/explain",
        &json!({"principal": "Chitin::User::\"mallory\"", "action": "Chitin::Action::\"session.read\"", "resource": "Chitin::Session::\"api:t1\"", "context": {"origin": "control", "session": "", "approved": false, "tainted": false, "op": "read", "owner": {"__entity": {"type": "Chitin::User", "id": "owner"}}, "channel": "api"}}),
    )
    .json();
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["policies"], json!([]));
    assert!(deny.get("change").is_none(), "{deny}");
    // mallory reading her own session would be allowed by `session.own`: the hint is not a
    // context attribute change (`owner` is an entity), so there is none.
    assert_eq!(deny["would_allow"], json!([]));

    // A crafted denial with a would-allow hint: the API and `chitin policy explain --json`
    // answer the same JSON (the same code, `policy::explain`).
    let crafted = json!({
        "principal": "Chitin::User::\"owner\"", "action": "Chitin::Action::\"write_file\"",
        "resource": "Chitin::Tool::\"write_file\"",
        "context": {"origin": "model", "session": "s", "approved": false, "tainted": false,
                    "workspace": "/ws", "path": "/etc/x"}
    });
    let api = post(&gw, "/api/v1/policy/explain", &crafted);
    assert_eq!(api.status, 200, "{}", api.body);
    let api = api.json();
    let file = gw.root.join("explain-request.json");
    std::fs::write(&file, crafted.to_string()).unwrap();
    let cli = gw.chitin(&[
        "policy",
        "explain",
        "--request",
        file.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let cli: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(api, cli);
    assert_eq!(api["decision"], "deny");
    assert_eq!(
        api["policies"][0]["id"],
        "guard.writes-outside-workspace-need-approval"
    );
    assert_eq!(api["policies"][0]["effect"], "forbid");
    assert_eq!(
        api["would_allow"],
        json!([{
            "attribute": "in_workspace", "from": false, "to": true, "derived": true,
            "decision": "allow", "policies": [cli["would_allow"][0]["policies"][0].clone()],
        }])
    );
    assert_eq!(
        api["would_allow"][0]["policies"][0]["id"],
        "tools.owner-files-in-workspace"
    );
    assert_eq!(api["derived"]["in_workspace"], false);
    let malformed = post(&gw, "/api/v1/policy/explain", &json!({"principal": 1}));
    assert_eq!(malformed.status, 400, "{}", malformed.body);
    assert_eq!(pol["shadow"], 1);
    let sp = pol["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "test.shadow-no-listing")
        .unwrap()
        .clone();
    assert_eq!(sp["mode"], "shadow");
    assert_eq!(sp["effect"], "forbid");
    // The shadow report: the turn's `list_dir` would have been denied.
    let shadow = get(&gw, "/api/v1/policy/shadow?days=3");
    assert_eq!(shadow["days"], 3);
    assert_eq!(
        shadow["policies"],
        json!([{"id": "test.shadow-no-listing", "would_deny": 1, "would_allow": 0}])
    );
    assert_eq!(shadow["latest"][0]["action"], "list_dir");
    assert_eq!(shadow["latest"][0]["decision"], "shadow_deny");
    assert_eq!(gw.get("/api/v1/policy/shadow?days=91").status, 400);

    // Pairing without channels: nothing pending, nothing to resolve.
    assert_eq!(
        get(&gw, "/api/v1/pairing"),
        json!({"requests": [], "channels": [], "devices": []})
    );
    assert_eq!(get(&gw, "/api/v1/devices"), json!({"devices": []}));
    let r = post(
        &gw,
        "/api/v1/devices/0123456789abcdef/resolve",
        &json!({"decision": "approve"}),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    let r = post(
        &gw,
        "/api/v1/pairing/ABCDEF/resolve",
        &json!({"decision": "deny"}),
    );
    assert_eq!(r.status, 404, "{}", r.body);

    // Health: readiness details, version, uptime, sandbox, retention and backups.
    let h = get(&gw, "/api/v1/health");
    assert_eq!(h["version"], env!("CARGO_PKG_VERSION"));
    assert!(h["uptime_secs"].as_i64().unwrap() >= 0);
    assert_eq!(h["checks"]["sandbox"]["ok"], h["sandbox"]["enforced"]);
    assert!(h["checks"]["audit"]["detail"].is_string());
    assert_eq!(h["backup"]["configured"], false);
    assert!(h["retention"]["interval_minutes"].as_u64().is_some());
}

#[test]
fn every_endpoint_refuses_a_request_without_a_valid_token_with_401() {
    let rt = runtime();
    let (gw, _fake) = start(&rt, "");
    let a = open_approval(&gw, "never", "");
    let id = a["id"].as_str().unwrap().to_string();
    for (method, path, body) in endpoints(&id) {
        for auth in [
            None,
            Some("Bearer not-the-token"),
            Some("Basic b3duZXI6eA=="),
        ] {
            let r = send(&gw, method, &path, body.as_ref(), auth);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.body);
            assert_eq!(r.header("www-authenticate"), Some("Bearer"));
            assert_eq!(r.json()["error"]["code"], "unauthorized");
        }
    }
    // Nothing was resolved by the refused requests.
    assert_eq!(
        get(&gw, &format!("/api/v1/approvals/{id}"))["approval"]["status"],
        "pending"
    );
}

const SHADOW: &str = r#"
@id("test.shadow-no-listing")
@mode("shadow")
@reason("Trying out: no directory listings.")
forbid (principal, action == Chitin::Action::"list_dir", resource);
"#;

const FORBID: &str = r#"
@id("test.forbid-control")
@reason("This gateway's owner may not use the control API.")
forbid (
  principal == Chitin::User::"owner",
  action in [
    Chitin::Action::"session.read",
    Chitin::Action::"usage.read",
    Chitin::Action::"policy.read",
    Chitin::Action::"health.read",
    Chitin::Action::"audit.read",
    Chitin::Action::"audit.export",
    Chitin::Action::"pairing.approve",
    Chitin::Action::"approval.grant"
  ],
  resource
);
"#;

/// A policy directory: the default policies and `extra`.
fn policy_dir(root: &Path, extra: &str) -> std::path::PathBuf {
    let dir = root.join("policies");
    std::fs::create_dir(&dir).unwrap();
    let defaults = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/default");
    for e in std::fs::read_dir(defaults).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    std::fs::write(dir.join("zz-test.cedar"), extra).unwrap();
    dir
}

#[test]
fn every_endpoint_refuses_with_403_and_the_policy_ids_when_cedar_forbids_it() {
    let rt = runtime();
    let keep = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let dir = policy_dir(keep.path(), FORBID);
    let (gw, _fake) = start(
        &rt,
        &format!("\n[policy]\ndir = {:?}\n", dir.display().to_string()),
    );
    chat_turn(&gw);
    let a = open_approval(&gw, "never", "");
    let id = a["id"].as_str().unwrap().to_string();
    for (method, path, body) in endpoints(&id) {
        let r = send(&gw, method, &path, body.as_ref(), Some(&gw.bearer()));
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        let e = r.json()["error"].clone();
        assert_eq!(e["code"], "policy_denied", "{method} {path}: {e}");
        assert_eq!(
            e["policies"],
            json!(["test.forbid-control"]),
            "{method} {path}: {e}"
        );
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("Chitin::User::\"owner\""),
            "{e}"
        );
    }
    // The refusals changed nothing and were recorded as decisions.
    let out = gw.chitin(&["approvals", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["status"], "pending", "{list}");
    let cli = gw.chitin(&["usage"]);
    assert_eq!(
        cli.status.code(),
        Some(1),
        "chitin usage is decided the same way"
    );
    assert!(String::from_utf8_lossy(&cli.stdout).contains("refused"));
}

/// `GET /api/v1/audit?action=session.read` as the owner: the records, newest first.
fn session_read_records(gw: &Gw) -> Vec<Value> {
    get(gw, "/api/v1/audit?action=session.read&limit=500")["records"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn sessions_are_paged_with_a_cursor_and_each_list_request_is_one_audit_record() {
    use chitin::providers::testing::{Reply, Step};
    let rt = runtime();
    let (gw, fake) = start(&rt, "");
    chat_turn(&gw);
    fake.set_fallback(Step::Reply(Reply::text(["Fine."]).usage(10, 1)));
    for user in ["t2", "t3", "t4"] {
        let r = post(
            &gw,
            "/v1/chat/completions",
            &json!({"model": "chitin", "user": user, "messages": [{"role": "user", "content": "hi"}]}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Another owner's session, through an API token of theirs.
    let out = gw.chitin(&["users", "add", "bob", "--group", "owners"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.chitin(&["tokens", "issue", "--user", "bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bob = format!(
        "Bearer {}",
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .trim()
    );
    let r = send(
        &gw,
        "POST",
        "/v1/chat/completions",
        Some(
            &json!({"model": "chitin", "user": "b1", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        Some(&bob),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // The whole list, then the same in pages of two.
    let whole = get(&gw, "/api/v1/sessions");
    let keys = |v: &Value| -> Vec<String> {
        v["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["key"].as_str().unwrap().to_string())
            .collect()
    };
    let all = keys(&whole);
    assert_eq!(all.len(), 4, "{whole}");
    assert!(all.iter().all(|k| k.starts_with("api:t")), "{whole}");
    assert_eq!(whole["next"], Value::Null);
    assert_eq!(
        whole["hidden_owners"], 1,
        "bob's sessions are not the owner's"
    );
    let first = get(&gw, "/api/v1/sessions?limit=2");
    assert_eq!(keys(&first), all[..2].to_vec());
    let cursor = first["next"].as_str().unwrap().to_string();
    let second = get(&gw, &format!("/api/v1/sessions?limit=2&cursor={cursor}"));
    assert_eq!(keys(&second), all[2..].to_vec());
    assert_eq!(second["next"], Value::Null);
    let third = get(&gw, "/api/v1/sessions?limit=3");
    let rest = get(
        &gw,
        &format!(
            "/api/v1/sessions?limit=3&cursor={}",
            third["next"].as_str().unwrap()
        ),
    );
    assert_eq!(keys(&rest), all[3..].to_vec());
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "cursor=nonsense!",
        "cursor=MTI",
    ] {
        let r = gw.get(&format!("/api/v1/sessions?{bad}"));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    // One list request, two owners decided: one `session.read` record, with both decisions.
    let before = session_read_records(&gw).len();
    get(&gw, "/api/v1/sessions?limit=1");
    let after = session_read_records(&gw);
    assert_eq!(after.len(), before + 1, "one record per list request");
    let rec = &after[0];
    assert_eq!(rec["actor"], "Chitin::User::\"owner\"");
    assert_eq!(rec["resource"], "Chitin::Session::\"*\"");
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["policies"], json!(["session.own"]));
    let listing = rec["payload"]["listing"].as_array().unwrap();
    assert_eq!(listing.len(), 2, "{rec}");
    assert_eq!(
        listing[0]["context"]["owner"],
        json!({"__entity": {"type": "Chitin::User", "id": "owner"}})
    );
    assert_eq!(listing[0]["decision"], "allow");
    assert_eq!(
        listing[1]["context"]["owner"],
        json!({"__entity": {"type": "Chitin::User", "id": "bob"}})
    );
    assert_eq!(listing[1]["decision"], "deny");
    // The approvals list too.
    let before = session_read_records(&gw).len();
    get(&gw, "/api/v1/approvals?status=all");
    assert_eq!(session_read_records(&gw).len(), before + 1);

    // bob sees only his own session, on his own list.
    let r = send(&gw, "GET", "/api/v1/sessions", None, Some(&bob));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(keys(&r.json()), vec!["api:bob:b1".to_string()]);
}
