//! The two wire protocols against fake servers speaking the real formats: text, streamed
//! fragments, tool calls, usage, malformed tool-call JSON, in-stream errors.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/fake_provider.rs"]
mod support;

use chitin::providers::testing::{FakeAnthropic, FakeOpenAi, FakeServer, Reply, Step};
use chitin::providers::{
    ChatRequest, Message, ProviderError, ProviderEvent, ProviderKind, StopReason, ToolCall,
    ToolSpec, Usage,
};
use serde_json::json;
use support::{recorder, router};

const KINDS: [ProviderKind; 2] = [ProviderKind::Anthropic, ProviderKind::Openai];

async fn fake(kind: ProviderKind, steps: Vec<Step>) -> FakeServer {
    match kind {
        ProviderKind::Anthropic => FakeAnthropic::start(steps).await.unwrap(),
        ProviderKind::Openai => FakeOpenAi::start(steps).await.unwrap(),
    }
}

fn hello() -> ChatRequest {
    let mut r = ChatRequest::new(vec![Message::user("hello")], 256);
    r.system = Some("be brief".into());
    r
}

fn weather_tool() -> ToolSpec {
    ToolSpec {
        name: "get_weather".into(),
        description: "Weather for a city".into(),
        input_schema: json!({"type": "object", "properties": {"city": {"type": "string"}},
                             "required": ["city"]}),
    }
}

#[tokio::test]
async fn a_plain_reply_is_streamed_and_collected_over_the_anthropic_protocol() {
    let f = fake(ProviderKind::Anthropic, vec![Step::text("Hi there")]).await;
    let s = router(ProviderKind::Anthropic, &f.base_url());
    let (events, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "Hi there");
    assert_eq!(r.model, "p/m1");
    assert_eq!(r.stop_reason, StopReason::EndTurn);
    assert!(r.tool_calls.is_empty());
    let reqs = f.requests();
    assert_eq!(reqs.len(), 1);
    let q = &reqs[0];
    assert_eq!(
        (q.method.as_str(), q.path.as_str()),
        ("POST", "/v1/messages")
    );
    assert_eq!(q.header("x-api-key"), Some("sk-test-KEY-0123456789"));
    assert_eq!(q.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(q.header("authorization"), None);
    assert_eq!(q.body["model"], "m1");
    assert_eq!(q.body["max_tokens"], 256);
    assert_eq!(q.body["stream"], true);
    assert_eq!(q.body["system"], "be brief");
    assert_eq!(
        q.body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}])
    );
    let ev = events.lock().unwrap().clone();
    assert_eq!(
        ev.first(),
        Some(&ProviderEvent::Usage(Usage {
            input_tokens: 10,
            output_tokens: 1
        }))
    );
    assert!(ev.contains(&ProviderEvent::TextDelta("Hi there".into())));
    assert_eq!(
        ev.last(),
        Some(&ProviderEvent::Done {
            stop_reason: StopReason::EndTurn
        })
    );
}

#[tokio::test]
async fn a_plain_reply_is_streamed_and_collected_over_the_openai_protocol() {
    let f = fake(ProviderKind::Openai, vec![Step::text("Hi there")]).await;
    let s = router(ProviderKind::Openai, &f.base_url());
    let (_events, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "Hi there");
    assert_eq!(r.stop_reason, StopReason::EndTurn);
    let q = &f.requests()[0];
    assert_eq!(q.path, "/v1/chat/completions");
    assert_eq!(
        q.header("authorization"),
        Some("Bearer sk-test-KEY-0123456789")
    );
    assert_eq!(q.header("x-api-key"), None);
    assert_eq!(q.body["stream"], true);
    assert_eq!(q.body["stream_options"], json!({"include_usage": true}));
    assert_eq!(q.body["max_tokens"], 256);
    assert_eq!(
        q.body["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    );
}

#[tokio::test]
async fn a_whole_non_streaming_reply_is_collected_over_both_protocols() {
    for kind in KINDS {
        let reply = Reply::text(["Whole ", "answer"])
            .tool_call("call_1", "get_weather", r#"{"city":"Oslo"}"#, 1)
            .usage(42, 7);
        let f = fake(kind, vec![Step::Reply(reply)]).await;
        let s = router(kind, &f.base_url());
        let mut req = hello();
        req.stream = false;
        let (events, mut sink) = recorder();
        let r = s.router.chat(&req, &mut sink).await.unwrap();
        assert_eq!(f.requests()[0].body["stream"], false, "{kind:?}");
        assert_eq!(r.text, "Whole answer", "{kind:?}");
        assert_eq!(r.stop_reason, StopReason::ToolUse, "{kind:?}");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 42,
                output_tokens: 7
            },
            "{kind:?}"
        );
        assert_eq!(r.tool_calls.len(), 1);
        assert_eq!(r.tool_calls[0].id, "call_1");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&r.tool_calls[0].arguments_json).unwrap(),
            json!({"city": "Oslo"})
        );
        // The same event shape as a streamed answer.
        let ev = events.lock().unwrap().clone();
        assert!(
            ev.iter()
                .any(|e| matches!(e, ProviderEvent::ToolCallDone { id, .. } if id == "call_1"))
        );
        assert!(matches!(ev.last(), Some(ProviderEvent::Done { .. })));
    }
}

#[tokio::test]
async fn multi_part_streamed_text_is_reassembled_in_order() {
    for kind in KINDS {
        let pieces = ["Hel", "lo, ", "wör", "ld", "! ✓"];
        let f = fake(kind, vec![Step::Reply(Reply::text(pieces))]).await;
        let s = router(kind, &f.base_url());
        let (events, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        assert_eq!(r.text, "Hello, wörld! ✓", "{kind:?}");
        let deltas: Vec<String> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::TextDelta(t) => Some(t.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(deltas, pieces, "{kind:?}");
    }
}

#[tokio::test]
async fn tool_calls_streamed_in_fragments_are_reassembled() {
    for kind in KINDS {
        let reply = Reply::text(["Checking."])
            .tool_call(
                "call_a",
                "get_weather",
                r#"{"city": "Zürich", "unit": "c"}"#,
                7,
            )
            .tool_call("call_b", "get_weather", r#"{"city": "Lyon"}"#, 3);
        let f = fake(kind, vec![Step::Reply(reply)]).await;
        let s = router(kind, &f.base_url());
        let mut req = hello();
        req.tools = vec![std::sync::Arc::new(weather_tool())];
        let (events, mut sink) = recorder();
        let r = s.router.chat(&req, &mut sink).await.unwrap();
        assert_eq!(r.stop_reason, StopReason::ToolUse, "{kind:?}");
        assert_eq!(r.text, "Checking.");
        let expect = [
            ("call_a", r#"{"city": "Zürich", "unit": "c"}"#),
            ("call_b", r#"{"city": "Lyon"}"#),
        ];
        assert_eq!(r.tool_calls.len(), 2, "{kind:?}");
        for (call, (id, args)) in r.tool_calls.iter().zip(expect) {
            assert_eq!(call.id, id);
            assert_eq!(call.name, "get_weather");
            assert_eq!(call.arguments_json, args, "raw arguments, byte for byte");
            assert_eq!(call.malformed, None);
        }
        let ev = events.lock().unwrap().clone();
        let fragments: String = ev
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::ToolCallDelta { id, fragment } if id == "call_a" => {
                    Some(fragment.clone())
                }
                _ => None,
            })
            .collect();
        assert_eq!(fragments, expect[0].1);
        let n_frag = ev
            .iter()
            .filter(|e| matches!(e, ProviderEvent::ToolCallDelta { id, .. } if id == "call_a"))
            .count();
        assert!(
            n_frag >= 5,
            "{kind:?}: arguments arrived in {n_frag} fragments"
        );
        let start = ev
            .iter()
            .position(|e| matches!(e, ProviderEvent::ToolCallStart { id, .. } if id == "call_a"));
        let done = ev
            .iter()
            .position(|e| matches!(e, ProviderEvent::ToolCallDone { id, .. } if id == "call_a"));
        assert!(start.unwrap() < done.unwrap());
        // The tool schema was sent in the protocol's shape.
        let body = &f.requests()[0].body;
        match kind {
            ProviderKind::Anthropic => assert_eq!(
                body["tools"],
                json!([{"name": "get_weather", "description": "Weather for a city",
                        "input_schema": weather_tool().input_schema}])
            ),
            ProviderKind::Openai => assert_eq!(
                body["tools"],
                json!([{"type": "function", "function": {"name": "get_weather",
                        "description": "Weather for a city",
                        "parameters": weather_tool().input_schema}}])
            ),
        }
    }
}

#[tokio::test]
async fn usage_is_parsed_from_both_protocols_and_priced() {
    for kind in KINDS {
        let f = fake(
            kind,
            vec![Step::Reply(Reply::text(["ok"]).usage(1_000_000, 200_000))],
        )
        .await;
        let s = router(kind, &f.base_url());
        let (events, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        let want = Usage {
            input_tokens: 1_000_000,
            output_tokens: 200_000,
        };
        assert_eq!(r.usage, want, "{kind:?}");
        // 1M in at 3 USD + 0.2M out at 15 USD.
        let cost = r.cost_usd.unwrap();
        assert!((cost - 6.0).abs() < 1e-9, "{kind:?}: {cost}");
        let last_usage = events.lock().unwrap().iter().rev().find_map(|e| match e {
            ProviderEvent::Usage(u) => Some(*u),
            _ => None,
        });
        assert_eq!(last_usage, Some(want));
    }
}

#[tokio::test]
async fn tool_results_are_echoed_back_in_each_protocols_format() {
    for kind in KINDS {
        let f = fake(kind, vec![Step::text("It is sunny.")]).await;
        let s = router(kind, &f.base_url());
        let mut req = ChatRequest::new(
            vec![
                Message::user("weather in Oslo and Lyon?"),
                Message::Assistant {
                    text: "Checking.".into(),
                    tool_calls: vec![
                        ToolCall {
                            id: "call_1".into(),
                            name: "get_weather".into(),
                            arguments_json: r#"{"city":"Oslo"}"#.into(),
                            malformed: None,
                        },
                        ToolCall {
                            id: "call_2".into(),
                            name: "get_weather".into(),
                            arguments_json: r#"{"city":"Lyon"}"#.into(),
                            malformed: None,
                        },
                    ],
                },
                Message::ToolResult {
                    tool_use_id: "call_1".into(),
                    content: "sunny".into(),
                    is_error: false,
                    images: Vec::new(),
                },
                Message::ToolResult {
                    tool_use_id: "call_2".into(),
                    content: "denied by policy".into(),
                    is_error: true,
                    images: Vec::new(),
                },
            ],
            100,
        );
        req.tools = vec![std::sync::Arc::new(weather_tool())];
        let (_e, mut sink) = recorder();
        s.router.chat(&req, &mut sink).await.unwrap();
        let body = &f.requests()[0].body;
        match kind {
            ProviderKind::Anthropic => assert_eq!(
                body["messages"],
                json!([
                    {"role": "user", "content": [{"type": "text", "text": "weather in Oslo and Lyon?"}]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
                        {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Lyon"}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny", "is_error": false},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "denied by policy", "is_error": true}]}
                ])
            ),
            ProviderKind::Openai => assert_eq!(
                body["messages"],
                json!([
                    {"role": "user", "content": "weather in Oslo and Lyon?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                    {"role": "tool", "tool_call_id": "call_2", "content": "[tool error] denied by policy"}
                ])
            ),
        }
    }
}

#[tokio::test]
async fn malformed_tool_call_json_surfaces_as_a_malformed_call_and_is_not_retried() {
    for kind in KINDS {
        for stream in [true, false] {
            let reply = Reply::text(["x"])
                .tool_call("call_bad", "exec", r#"{"argv": ["rm", "-rf"#, 4)
                .tool_call("call_arr", "exec", r#"["not", "an", "object"]"#, 2)
                .tool_call("call_ok", "read_file", r#"{"path":"a"}"#, 2);
            let f = fake(kind, vec![Step::Reply(reply)]).await;
            let s = router(kind, &f.base_url());
            let mut req = hello();
            req.stream = stream;
            let (events, mut sink) = recorder();
            let r = s.router.chat(&req, &mut sink).await.unwrap();
            assert_eq!(f.requests().len(), 1, "not retried");
            let bad = &r.tool_calls[0];
            assert_eq!(bad.id, "call_bad");
            if stream {
                assert_eq!(
                    bad.arguments_json, r#"{"argv": ["rm", "-rf"#,
                    "raw, as sent"
                );
            }
            let why = bad.malformed.as_deref().unwrap();
            // A whole Anthropic body carries `input` as JSON, so there the broken text
            // arrives as a JSON string: still malformed, but "not an object".
            assert!(
                why.contains("not valid JSON") || (!stream && why.contains("not an object")),
                "{kind:?} {stream}: {why}"
            );
            let why = r.tool_calls[1].malformed.as_deref().unwrap();
            assert!(why.contains("not an object"), "{kind:?} {stream}: {why}");
            assert_eq!(r.tool_calls[2].malformed, None);
            let ev = events.lock().unwrap().clone();
            assert!(ev.iter().any(|e| matches!(e,
                ProviderEvent::ToolCallMalformed { id, .. } if id == "call_bad")));
            assert!(!ev.iter().any(|e| matches!(e,
                ProviderEvent::ToolCallDone { id, .. } if id == "call_bad")));
        }
    }
}

#[tokio::test]
async fn an_error_event_inside_the_stream_is_reported_with_its_kind() {
    for kind in KINDS {
        let f = fake(
            kind,
            vec![Step::StreamError {
                kind: "invalid_request_error".into(),
                message: "prompt is too long".into(),
            }],
        )
        .await;
        let s = router(kind, &f.base_url());
        let (_e, mut sink) = recorder();
        let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
        let ProviderError::AllFailed(a) = &e else {
            panic!("{e:?}")
        };
        assert_eq!(a.len(), 1, "a non-transient error is not retried: {e}");
        assert!(a[0].reason.contains("invalid_request_error"), "{e}");
        assert!(a[0].reason.contains("prompt is too long"), "{e}");
    }
}

#[tokio::test]
async fn an_overloaded_error_event_inside_the_stream_is_retried() {
    let f = fake(
        ProviderKind::Anthropic,
        vec![
            Step::StreamError {
                kind: "overloaded_error".into(),
                message: "Overloaded".into(),
            },
            Step::text("fine now"),
        ],
    )
    .await;
    let s = router(ProviderKind::Anthropic, &f.base_url());
    let (_e, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "fine now");
    assert_eq!(f.requests().len(), 2);
    assert!(r.failed_attempts[0].reason.contains("overloaded_error"));
}

#[tokio::test]
async fn a_stream_with_garbage_instead_of_json_is_a_protocol_error_not_a_panic() {
    for kind in KINDS {
        let f = fake(
            kind,
            vec![Step::Raw {
                status: 200,
                content_type: "text/event-stream".into(),
                body: "event: message_start\ndata: {not json\n\n".into(),
            }],
        )
        .await;
        let s = router(kind, &f.base_url());
        let (_e, mut sink) = recorder();
        let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
        assert!(e.to_string().contains("malformed response"), "{e}");
    }
}

#[tokio::test]
async fn a_reply_that_is_only_a_tool_call_has_no_text_and_stops_for_tool_use() {
    for kind in KINDS {
        let f = fake(
            kind,
            vec![Step::tool_call("t1", "list_dir", r#"{"path":"."}"#)],
        )
        .await;
        let s = router(kind, &f.base_url());
        let (_e, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        assert_eq!(r.text, "", "{kind:?}");
        assert_eq!(r.stop_reason, StopReason::ToolUse);
        assert_eq!(r.tool_calls[0].arguments_json, r#"{"path":"."}"#);
    }
}

#[test]
fn the_chat_future_can_be_spawned_on_a_multi_threaded_runtime() {
    fn assert_send<T: Send>(_: &T) {}
    let s = router(ProviderKind::Openai, "http://127.0.0.1:9/v1");
    let req = hello();
    let mut sink = |_e: ProviderEvent| {};
    let fut = s.router.chat(&req, &mut sink);
    assert_send(&fut);
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<chitin::providers::Router>();
}

fn raw_sse(body: String) -> Step {
    Step::Raw {
        status: 200,
        content_type: "text/event-stream".into(),
        body,
    }
}

#[tokio::test]
async fn an_openai_compatible_server_without_call_ids_or_done_marker_still_works() {
    // Ollama-style: no tool-call id, the whole call in one chunk, no `[DONE]` after the
    // finish reason.
    let body = [
        r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"ok "}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"function":{"name":"list_dir","arguments":"{\"path\":\"/\"}"}}]}}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
    ]
    .iter()
    .map(|d| format!("data: {d}\n\n"))
    .collect::<String>();
    let f = fake(ProviderKind::Openai, vec![raw_sse(body)]).await;
    let s = router(ProviderKind::Openai, &f.base_url());
    let (_e, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "ok ");
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].id, "call_0", "a missing id is generated");
    assert_eq!(r.tool_calls[0].name, "list_dir");
    assert_eq!(r.tool_calls[0].arguments_json, r#"{"path":"/"}"#);
    assert_eq!(r.stop_reason, StopReason::ToolUse);
}

#[tokio::test]
async fn a_stream_that_ends_cleanly_before_the_answer_is_complete_is_a_dropped_stream() {
    for kind in KINDS {
        let body = match kind {
            ProviderKind::Anthropic => concat!(
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1,\"output_tokens\":1}}}\n\n",
                "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
                "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"cut\"}}\n\n",
            ),
            ProviderKind::Openai => {
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"cut\"}}]}\n\n"
            }
        };
        let f = fake(kind, vec![raw_sse(body.into()), Step::text("whole")]).await;
        let s = router(kind, &f.base_url());
        let (_e, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        assert_eq!(r.text, "whole", "{kind:?}");
        assert!(
            r.failed_attempts[0].reason.contains("closed before"),
            "{kind:?}: {:?}",
            r.failed_attempts
        );
    }
}

#[tokio::test]
async fn a_server_that_ignores_stream_true_and_sends_json_is_understood() {
    let body = serde_json::json!({"choices": [{"index": 0, "message": {"role": "assistant",
        "content": "plain json"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    .to_string();
    let f = fake(
        ProviderKind::Openai,
        vec![Step::Raw {
            status: 200,
            content_type: "application/json".into(),
            body,
        }],
    )
    .await;
    let s = router(ProviderKind::Openai, &f.base_url());
    let (_e, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "plain json");
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 3,
            output_tokens: 2
        }
    );
}

#[tokio::test]
async fn a_response_larger_than_the_cap_is_cut_off_with_an_error() {
    // 17 MiB of well-formed but meaningless events.
    let body = "data: {}\n\n".repeat(17 * 1024 * 1024 / 10);
    let f = fake(ProviderKind::Anthropic, vec![raw_sse(body)]).await;
    let s = router(ProviderKind::Anthropic, &f.base_url());
    let (_e, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    assert!(e.to_string().contains("larger than 16777216 bytes"), "{e}");
    assert_eq!(f.requests().len(), 1, "not retried");
}

#[test]
fn installing_the_tls_provider_twice_is_harmless_and_https_clients_build() {
    chitin::providers::init_tls();
    chitin::providers::init_tls();
    let s = router(ProviderKind::Anthropic, "https://api.anthropic.com");
    assert_eq!(s.router.host_of("p"), Some("api.anthropic.com"));
}

#[tokio::test]
async fn chat_stream_delivers_events_on_a_channel_and_the_answer_on_the_handle() {
    let f = fake(
        ProviderKind::Anthropic,
        vec![Step::Reply(Reply::text(["a", "b", "c"]).usage(7, 3))],
    )
    .await;
    let s = router(ProviderKind::Anthropic, &f.base_url());
    let router = std::sync::Arc::new(s.router);
    let (mut rx, handle) = router.chat_stream(hello());
    let r = handle.await.unwrap().unwrap();
    let mut text = String::new();
    while let Some(e) = rx.recv().await {
        if let ProviderEvent::TextDelta(t) = e {
            text.push_str(&t);
        }
    }
    assert_eq!(text, "abc");
    assert_eq!(r.text, "abc");
    // The answer goes back into the conversation as the assistant turn.
    assert_eq!(
        r.to_message(),
        Message::Assistant {
            text: "abc".into(),
            tool_calls: vec![]
        }
    );
    let rec = chitin::providers::UsageRecord::from_response("alice", 5, &r);
    assert_eq!(
        rec.usage,
        Usage {
            input_tokens: 7,
            output_tokens: 3
        }
    );
    assert_eq!(rec.model, "p/m1");
    assert!(rec.cost_usd.unwrap() > 0.0);
}
