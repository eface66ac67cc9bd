//! OpenTelemetry traces over OTLP/HTTP from the real gateway binary to a fake collector on
//! loopback: a chat turn with a tool call arrives as one trace (request → turn → model calls,
//! gate decisions, tool run) with the right names, attributes and parents, and without any
//! secret, argument or message text; log lines written inside a span carry its trace id; with
//! no `[telemetry] otlp_endpoint` nothing is exported.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;
#[path = "support/fake_otlp.rs"]
mod otlp;

use std::time::Duration;

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use harness::Gw;
use otlp::{Attr, FakeCollector, Span};
use serde_json::{Value, json};

const ARG_CANARY: &str = "ARG-CANARY-5d1e";
const MSG_CANARY: &str = "MSG-CANARY-77b0";

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

/// The model asks for one `exec` (allowed for the owner offline in the workspace), then
/// answers.
fn tool_turn() -> Vec<Step> {
    let call = json!({"argv": ["echo", ARG_CANARY]}).to_string();
    vec![Step::tool_call("c1", "exec", &call), Step::text("done")]
}

fn config(model_url: &str, telemetry: &str) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{model_url}\"\n\n[pricing]\n\"fake/m1\" = {{ input_per_mtok = 1000.0, output_per_mtok = 2000.0 }}\n\n{telemetry}\n"
    )
}

fn chat(gw: &Gw, text: &str) -> Value {
    let r = gw
        .try_req(
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
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn one<'a>(spans: &'a [Span], what: &str, f: impl Fn(&Span) -> bool) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| f(s)).collect();
    assert_eq!(found.len(), 1, "expected one {what}, got {found:#?}");
    found[0]
}

fn str_attr<'a>(s: &'a Span, key: &str) -> &'a str {
    s.attr(key)
        .and_then(Attr::str)
        .unwrap_or_else(|| panic!("{} has no string attribute {key}: {s:#?}", s.name))
}

fn int_attr(s: &Span, key: &str) -> i64 {
    match s.attr(key) {
        Some(Attr::Int(i)) => *i,
        other => panic!("{} attribute {key} is {other:?}, not an integer", s.name),
    }
}

fn turn_is_complete(spans: &[Span]) -> bool {
    let named = |n: &str| spans.iter().filter(|s| s.name == n).count();
    named("POST /v1/chat/completions") >= 1
        && named("agent.turn") >= 1
        && named("model.call") >= 2
        && named("tool.run") >= 1
        && spans.iter().any(|s| {
            s.name == "gate.decision" && s.attr("chitin.action") == Some(&Attr::Str("exec".into()))
        })
}

#[test]
fn a_chat_turn_with_a_tool_call_arrives_as_one_trace_with_the_turn_as_parent() {
    let collector = FakeCollector::start();
    let (_rt, model) = fake(tool_turn());
    let mut gw = Gw::start(&config(
        &model.base_url(),
        &format!(
            "[telemetry]\notlp_endpoint = \"{}\"\nservice_name = \"chitin-under-test\"\n",
            collector.endpoint()
        ),
    ));
    let answer = chat(&gw, &format!("run the echo please {MSG_CANARY}"));
    assert_eq!(
        answer["choices"][0]["message"]["content"], "done",
        "{answer}"
    );

    let spans = collector.wait_for(Duration::from_secs(60), turn_is_complete);
    assert!(collector.refused().is_empty(), "{:?}", collector.refused());

    // The HTTP request is the root of the trace, a server span.
    let request = one(&spans, "chat request span", |s| {
        s.name == "POST /v1/chat/completions"
    });
    assert!(request.parent_span_id.is_empty(), "{request:#?}");
    assert_eq!(request.kind, 2, "server");
    assert_eq!(str_attr(request, "http.route"), "/v1/chat/completions");
    assert_eq!(str_attr(request, "http.request.method"), "POST");
    let trace = request.trace_id.clone();
    assert_eq!(trace.len(), 32);
    assert_eq!(
        request.resource.get("service.name"),
        Some(&Attr::Str("chitin-under-test".into()))
    );

    // The turn is the request's child, and the parent of the model calls, the decisions and
    // the tool run; all of them in the request's trace.
    let turn = one(&spans, "turn", |s| s.name == "agent.turn");
    assert_eq!(turn.trace_id, trace);
    assert_eq!(turn.parent_span_id, request.span_id);
    assert!(str_attr(turn, "chitin.run_id").starts_with("run_"));
    assert_eq!(str_attr(turn, "chitin.user"), "owner");

    let calls: Vec<&Span> = spans.iter().filter(|s| s.name == "model.call").collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    for c in &calls {
        assert_eq!(c.trace_id, trace);
        assert_eq!(c.parent_span_id, turn.span_id, "{c:#?}");
        assert_eq!(c.kind, 3, "client");
        assert_eq!(str_attr(c, "gen_ai.request.model"), "fake/m1");
        assert_eq!(str_attr(c, "gen_ai.response.model"), "fake/m1");
        assert_eq!(int_attr(c, "gen_ai.usage.input_tokens"), 10);
        assert_eq!(int_attr(c, "gen_ai.usage.output_tokens"), 5);
        // 10 input tokens at $1000/Mtok + 5 output tokens at $2000/Mtok.
        match c.attr("chitin.cost_usd") {
            Some(Attr::Double(d)) => assert!((d - 0.02).abs() < 1e-9, "{d}"),
            other => panic!("cost is {other:?}"),
        }
    }

    // The turn's decisions: its model calls and its tool call.
    let decisions: Vec<Span> = spans
        .iter()
        .filter(|s| {
            s.name == "gate.decision"
                && s.trace_id == trace
                && matches!(
                    s.attr("chitin.action").and_then(Attr::str),
                    Some("model.call" | "exec")
                )
        })
        .cloned()
        .collect();
    for d in &decisions {
        assert_eq!(d.parent_span_id, turn.span_id, "{d:#?}");
    }
    let model_calls_decided = decisions
        .iter()
        .filter(|d| str_attr(d, "chitin.action") == "model.call")
        .count();
    assert_eq!(model_calls_decided, 2, "{decisions:#?}");
    let exec = one(&decisions, "exec decision", |d| {
        str_attr(d, "chitin.action") == "exec"
    });
    assert_eq!(str_attr(exec, "chitin.decision"), "allow");
    assert_eq!(str_attr(exec, "chitin.resource"), "Chitin::Tool::\"exec\"");
    assert!(
        str_attr(exec, "chitin.policy_ids")
            .split(',')
            .any(|p| p == "tools.owner-exec-offline-in-workspace"),
        "{exec:#?}"
    );

    let run = one(&spans, "tool run", |s| s.name == "tool.run");
    assert_eq!(run.trace_id, trace);
    assert_eq!(run.parent_span_id, turn.span_id);
    assert_eq!(str_attr(run, "chitin.tool"), "exec");
    assert_eq!(str_attr(run, "chitin.sandbox"), "spawned");
    assert_eq!(int_attr(run, "process.exit.code"), 0);
    assert!(int_attr(run, "chitin.duration_ms") >= 0);

    // No secret, tool argument or message text left the gateway in a span.
    for body in collector.bodies() {
        for needle in [gw.token.as_str(), ARG_CANARY, MSG_CANARY] {
            assert!(
                !body.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "an export carried {needle}"
            );
        }
    }

    // Log lines written inside the turn carry its trace id.
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    let started = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["fields"]["message"] == "run started")
        .unwrap_or_else(|| panic!("no run started line in {log}"));
    assert_eq!(started["trace_id"], trace.as_str(), "{started}");
    assert_eq!(started["span_id"], turn.span_id.as_str(), "{started}");

    // The metrics count what was exported and that nothing was dropped.
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains("chitin_otlp_spans_dropped_total{reason=\"queue_full\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("chitin_otlp_spans_dropped_total{reason=\"export_failed\"} 0"),
        "{metrics}"
    );
    let exported: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chitin_otlp_spans_exported_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(exported >= 6, "{metrics}");

    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
}

#[test]
fn a_trusted_proxys_traceparent_is_continued_and_anyone_elses_is_ignored() {
    let collector = FakeCollector::start();
    let mut gw = Gw::start(&format!(
        "trusted_proxies = [\"127.0.0.1\"]\n\n[telemetry]\notlp_endpoint = \"{}\"\n",
        collector.endpoint()
    ));
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = gw
        .try_req(
            "GET",
            "/ready",
            &[(
                "traceparent",
                &format!("00-{caller_trace}-00f067aa0ba902b7-01"),
            )],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let spans = collector.wait_for(Duration::from_secs(60), |s| {
        s.iter().any(|s| s.name == "GET /ready")
    });
    let ready = one(&spans, "ready request", |s| s.name == "GET /ready");
    assert_eq!(ready.trace_id, caller_trace);
    assert_eq!(ready.parent_span_id, "00f067aa0ba902b7");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());

    // The same header from a caller that is not a trusted proxy starts a new trace.
    let collector = FakeCollector::start();
    let mut gw = Gw::start(&format!(
        "\n[telemetry]\notlp_endpoint = \"{}\"\n",
        collector.endpoint()
    ));
    let r = gw
        .try_req(
            "GET",
            "/ready",
            &[(
                "traceparent",
                &format!("00-{caller_trace}-00f067aa0ba902b7-01"),
            )],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let spans = collector.wait_for(Duration::from_secs(60), |s| {
        s.iter().any(|s| s.name == "GET /ready")
    });
    let ready = one(&spans, "ready request", |s| s.name == "GET /ready");
    assert_ne!(ready.trace_id, caller_trace);
    assert!(ready.parent_span_id.is_empty());
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
}

#[test]
fn with_no_endpoint_configured_nothing_is_exported_even_with_otel_environment_variables() {
    let collector = FakeCollector::start();
    let (_rt, model) = fake(tool_turn());
    let mut gw = Gw::start_custom(
        harness::free_port(),
        &config(&model.base_url(), ""),
        false,
        |_| {},
    );
    // The standard variables name the collector; the configuration does not turn tracing on.
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    gw.env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), collector.endpoint()),
        (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(),
            format!("{}/v1/traces", collector.endpoint()),
        ),
    ];
    gw.spawn();
    let answer = chat(&gw, "run the echo please");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "done",
        "{answer}"
    );
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains("chitin_otlp_spans_exported_total 0"),
        "{metrics}"
    );
    // A stopping gateway sends what its exporter holds: after the exit, nothing can still
    // be on its way.
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    assert_eq!(collector.requests(), 0);
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(log.contains("run started"), "{log}");
    assert!(!log.contains("\"trace_id\""), "{log}");
}
