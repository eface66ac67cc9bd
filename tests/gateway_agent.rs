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

#[test]
fn chat_completions_refuses_unknown_fields_by_name_and_accepts_common_client_options() {
    let (_rt, s) = fake(vec![Step::text("fine")]);
    let gw = Gw::start(&with_model(&s.base_url()));
    let hi = json!([{"role": "user", "content": "hi"}]);
    let r = chat(
        &gw,
        &json!({"model": "chitin", "messages": hi, "approved": true}),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"error": {"code": "invalid_request", "message": "unknown field `approved`; accepted: model, messages, stream, user, n; accepted and ignored: temperature, top_p, max_tokens, max_completion_tokens, stop, presence_penalty, frequency_penalty, seed, logit_bias, logprobs, top_logprobs, stream_options, tools, tool_choice, parallel_tool_calls, response_format, metadata, store, reasoning_effort, service_tier"}})
    );
    let r = chat(&gw, &json!({"model": "chitin", "messages": hi, "n": 2}));
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["error"]["message"],
        "n must be 1: the agent gives one answer per request"
    );
    assert!(s.requests().is_empty(), "nothing reached the model");
    // What OpenAI clients commonly send is accepted (and ignored: the agent's config decides).
    let r = chat(
        &gw,
        &json!({"model": "chitin", "messages": hi, "temperature": 0.2, "top_p": 1,
                "max_tokens": 100, "max_completion_tokens": 100, "n": 1, "stop": ["\n"],
                "presence_penalty": 0, "frequency_penalty": 0, "seed": 7, "logprobs": false,
                "stream_options": {"include_usage": true}, "tool_choice": "auto",
                "tools": [{"type": "function", "function": {"name": "x", "parameters": {}}}],
                "parallel_tool_calls": false, "response_format": {"type": "text"},
                "metadata": {}, "store": false, "user": "u1"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "fine");
}

#[test]
fn ready_reports_a_missing_provider_key_and_failing_providers_and_ok_when_they_answer() {
    // A provider whose key reference does not resolve: not ok, with the reason (never a value).
    let (_rt, s) = fake(vec![]);
    let gw = Gw::start(&format!(
        "{}api_key = \"secret:fake_key\"\n",
        with_model(&s.base_url())
    ));
    let r = gw.get("/ready");
    assert_eq!(r.status, 503, "{}", r.body);
    let v = r.json();
    assert_eq!(v["ready"], false);
    assert_eq!(
        v["checks"]["providers"],
        json!({"ok": false, "detail": "provider fake: api_key secret:fake_key is not in the secret store (store it with `chitin secrets set fake_key`, then reload with SIGHUP)"})
    );
    drop(gw);

    // A provider that answers errors: ok until three calls in a row failed, then not ok with
    // the last error; ok again once it answers.
    let (_rt2, s2) = fake(vec![]);
    s2.set_fallback(Step::status(400));
    let gw = Gw::start(&format!("{}max_attempts = 1\n", with_model(&s2.base_url())));
    let ok =
        json!({"ok": true, "detail": "model fake/m1 configured, 1 providers, their keys present"});
    assert_eq!(gw.get("/ready").json()["checks"]["providers"], ok);
    let hi = json!({"model": "chitin", "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..3 {
        assert_eq!(chat(&gw, &hi).status, 502);
    }
    let r = gw.get("/ready");
    assert_eq!(r.status, 503, "{}", r.body);
    let p = r.json()["checks"]["providers"].clone();
    assert_eq!(p["ok"], false, "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(
            "the last 3 model calls failed (after retries and fallbacks); last error: "
        ),
        "{detail}"
    );
    assert!(detail.contains("fake error 400"), "{detail}");
    s2.set_fallback(Step::text("back"));
    assert_eq!(chat(&gw, &hi).status, 200);
    assert_eq!(gw.get("/ready").json()["checks"]["providers"], ok);
}
