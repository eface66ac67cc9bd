//! The agent behind the real gateway binary: `/v1/chat/completions` (JSON and SSE) with a fake
//! OpenAI-compatible provider on loopback, the no-model answer, and a SIGTERM in the middle of
//! a run that loses nothing acknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;

use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use harness::{Gw, Resp};
use serde_json::{Value, json};

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

fn with_model(url: &str) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{url}\"\n"
    )
}

fn chat(gw: &Gw, body: &Value) -> Resp {
    gw.try_req(
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &gw.bearer()),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .unwrap()
}

#[test]
fn chat_completions_runs_the_agent_as_json_and_as_sse_chunks_ending_in_done() {
    let (_rt, s) = fake(vec![
        Step::Reply(Reply::text(["Hello", " from", " the agent"])),
        Step::Reply(Reply::text(["Str", "eam", "ed"])),
    ]);
    let gw = Gw::start(&with_model(&s.base_url()));
    let r = chat(
        &gw,
        &json!({"model": "chitin", "user": "alice-app", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the agent"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["total_tokens"].as_i64().unwrap() > 0);
    assert_eq!(v["chitin"]["session"], "api:alice-app");

    let r = chat(
        &gw,
        &json!({"model": "chitin:default", "stream": true, "user": "alice-app",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "again"}]}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events: Vec<&str> = r
        .body
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{}", r.body);
    let mut text = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if !c["choices"][0]["finish_reason"].is_null() {
            finish = c["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string);
        }
    }
    assert_eq!(text, "Streamed");
    assert_eq!(finish.as_deref(), Some("stop"));
    // The same `user` is the same session: the second request carried the first exchange.
    let second = s.requests()[1].body.to_string();
    assert!(second.contains("Hello from the agent"), "{second}");
}

#[test]
fn chat_completions_refuses_a_missing_token_and_a_foreign_model_name() {
    let (_rt, s) = fake(vec![]);
    let gw = Gw::start(&with_model(&s.base_url()));
    let body = json!({"model": "chitin", "messages": [{"role": "user", "content": "hi"}]});
    let r = gw
        .try_req(
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 401);
    let r = chat(
        &gw,
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    let r = chat(
        &gw,
        &json!({"model": "chitin", "messages": [{"role": "system", "content": "x"}]}),
    );
    assert_eq!(r.status, 400);
    assert!(s.requests().is_empty());
}

#[test]
fn with_no_model_configured_chat_answers_how_to_configure_one() {
    let gw = Gw::start("");
    let r = chat(
        &gw,
        &json!({"model": "chitin", "messages": [{"role": "user", "content": "hello?"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let reply = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reply.contains("No model is configured") && reply.contains("[[providers]]"),
        "{reply}"
    );
}

#[test]
fn sigterm_mid_run_loses_nothing_acknowledged_and_the_run_completes_after_restart() {
    let (_rt, s) = fake(vec![Step::Hang]);
    let mut gw = Gw::start(&format!(
        "shutdown_grace_secs = 1\n{}",
        with_model(&s.base_url())
    ));
    let port = gw.port;
    let token = gw.bearer();
    let client = std::thread::spawn(move || {
        let body = json!({"model": "chitin", "user": "durable",
                          "messages": [{"role": "user", "content": "ACKED-MESSAGE"}]});
        harness::http(
            port,
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", &token),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
    });
    // The provider has the request: the run is in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.requests().is_empty() {
        assert!(Instant::now() < deadline, "the provider was never called");
        std::thread::sleep(Duration::from_millis(50));
    }
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let _ = client.join();
    // Restart: the run resumes and the provider now answers.
    s.set_fallback(Step::text("answered after the restart"));
    gw.spawn();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = gw.chitin(&["sessions", "show", "api:durable", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let msgs = v["messages"].as_array().unwrap().clone();
        assert_eq!(msgs[0]["message"]["text"], "ACKED-MESSAGE");
        if msgs
            .iter()
            .any(|m| m["message"]["text"] == "answered after the restart")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the run was not resumed: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
