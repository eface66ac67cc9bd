//! OpenTelemetry traces over OTLP/HTTP from the real gateway binary to a fake collector on
//! loopback: a chat turn with a tool call arrives as one trace (request → turn → model calls,
//! gate decisions, tool run) with the right names, attributes and parents, and without any
//! secret, argument or message text; log lines written inside a span carry its trace id; with
//! no `[telemetry] otlp_endpoint` nothing is exported. Also: a webhook's workflow steps stay in
//! the webhook request's trace; a compaction is a `model.call` span (decided first) of its
//! turn; the tools that decide for themselves have `tool.run` spans; the collector's
//! credentials come from the secret store (`[telemetry] headers`), released by Cedar.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/chat.rs"]
mod chat;
#[path = "support/gateway.rs"]
mod harness;
#[path = "support/fake_otlp.rs"]
mod otlp;

use std::process::Command;
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
        assert_eq!(str_attr(c, "chitin.purpose"), "turn");
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

/// Appends `text` to the gateway's `chitin.toml`.
fn append_config(gw: &Gw, text: &str) {
    let path = gw.home.join("chitin.toml");
    let mut cfg = std::fs::read_to_string(&path).unwrap();
    cfg.push_str(text);
    std::fs::write(&path, cfg).unwrap();
}

const HOOK_SECRET: &str = "generic-hook-secret-otel-31";

#[test]
fn a_webhooks_workflow_runs_its_steps_inside_the_webhook_requests_trace() {
    let collector = FakeCollector::start();
    let (_rt, model) = fake(vec![]);
    model.set_fallback(Step::text("unused"));
    let mut gw = Gw::start(&config(&model.base_url(), ""));
    chat::set_secret(&gw, "gen_hook", "generic.hooks.invalid", HOOK_SECRET);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    append_config(
        &gw,
        &format!(
            "\n[[hooks]]\nname = \"generic\"\nsecret = \"secret:gen_hook\"\nformat = \"generic\"\nworkflow = \"hook-echo.lobster\"\n\n[telemetry]\notlp_endpoint = \"{}\"\n",
            collector.endpoint()
        ),
    );
    std::fs::write(
        gw.workspace().join("hook-echo.lobster"),
        "name: hook-echo\nargs:\n  payload:\n    default: \"\"\n  event:\n    default: \"\"\n  delivery:\n    default: \"\"\nsteps:\n  - id: save\n    run: printf '%s' ${payload} > from-hook.txt\n",
    )
    .unwrap();
    gw.spawn();
    let body = format!(r#"{{"note":"{ARG_CANARY}"}}"#);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = chitin::automation::hooks::sign_generic(
        HOOK_SECRET.as_bytes(),
        i64::try_from(now).unwrap(),
        body.as_bytes(),
    );
    let r = gw
        .try_req(
            "POST",
            "/hooks/generic",
            &[
                ("Content-Type", "application/json"),
                ("X-Chitin-Signature", &sig),
                ("X-Chitin-Delivery", "d-otel-1"),
            ],
            body.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    let spans = collector.wait_for(Duration::from_secs(60), |spans| {
        spans
            .iter()
            .any(|s| s.name == "workflow.run" && s.attr("chitin.outcome").is_some())
            && spans.iter().any(|s| s.name == "tool.run")
    });
    let request = one(&spans, "webhook request", |s| s.name == "POST /hooks");
    let trace = request.trace_id.clone();
    let run = one(&spans, "workflow run", |s| s.name == "workflow.run");
    assert_eq!(run.trace_id, trace, "{run:#?}");
    assert_eq!(run.parent_span_id, request.span_id);
    assert_eq!(str_attr(run, "chitin.hook"), "generic");
    assert_eq!(str_attr(run, "chitin.delivery"), "d-otel-1");
    assert_eq!(str_attr(run, "chitin.outcome"), "completed");
    let step = one(&spans, "workflow step", |s| s.name == "workflow.step");
    assert_eq!(step.trace_id, trace);
    assert_eq!(step.parent_span_id, run.span_id);
    assert_eq!(str_attr(step, "chitin.step"), "save");
    let tool = one(&spans, "tool run", |s| s.name == "tool.run");
    assert_eq!(tool.trace_id, trace);
    assert_eq!(tool.parent_span_id, step.span_id);
    assert_eq!(str_attr(tool, "chitin.tool"), "exec");
    assert_eq!(int_attr(tool, "process.exit.code"), 0);
    // The step's decision is in the trace too, under the step.
    let decision = one(&spans, "the step's exec decision", |s| {
        s.name == "gate.decision" && s.attr("chitin.action") == Some(&Attr::Str("exec".into()))
    });
    assert_eq!(decision.trace_id, trace);
    assert_eq!(decision.parent_span_id, step.span_id);
    assert_eq!(str_attr(decision, "chitin.decision"), "allow");
    // The webhook's body never left in a span.
    for body in collector.bodies() {
        assert!(
            !body
                .windows(ARG_CANARY.len())
                .any(|w| w == ARG_CANARY.as_bytes())
        );
    }
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
}

fn chat_in(gw: &Gw, session: &str, text: &str) -> Value {
    let r = gw
        .try_req(
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", &gw.bearer()),
                ("Content-Type", "application/json"),
            ],
            json!({"model": "chitin", "user": session, "messages": [{"role": "user", "content": text}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

#[test]
fn a_compaction_is_a_decided_model_call_span_of_its_turn() {
    let collector = FakeCollector::start();
    let (_rt, model) = fake(vec![
        Step::text("a1"),
        Step::text("a2"),
        Step::text("SUMMARY-OF-EARLIER"),
        Step::text("a3"),
    ]);
    let gw = Gw::start(
        &config(
            &model.base_url(),
            &format!(
                "[telemetry]\notlp_endpoint = \"{}\"\n",
                collector.endpoint()
            ),
        )
        .replacen("[agent]\n", "[agent]\ncontext_budget_tokens = 1024\n", 1),
    );
    let big = "x".repeat(1500);
    chat_in(&gw, "compact-me", &format!("one {big}"));
    chat_in(&gw, "compact-me", &format!("two {big}"));
    let answer = chat_in(&gw, "compact-me", "three");
    assert_eq!(answer["choices"][0]["message"]["content"], "a3", "{answer}");
    assert_eq!(model.requests().len(), 4);

    let spans = collector.wait_for(Duration::from_secs(60), |spans| {
        spans.iter().filter(|s| s.name == "agent.turn").count() >= 3
            && spans.iter().filter(|s| s.name == "model.call").count() >= 4
    });
    let compaction = one(&spans, "compaction call", |s| {
        s.name == "model.call" && s.attr("chitin.purpose") == Some(&Attr::Str("compaction".into()))
    });
    let turn = one(&spans, "the third turn", |s| {
        s.span_id == compaction.parent_span_id
    });
    assert_eq!(turn.name, "agent.turn");
    assert_eq!(turn.trace_id, compaction.trace_id);
    assert_eq!(int_attr(compaction, "gen_ai.usage.input_tokens"), 10);
    assert_eq!(str_attr(compaction, "gen_ai.response.model"), "fake/m1");
    // In that turn: the summary's model.call decision, then the answer's.
    let decided = spans
        .iter()
        .filter(|s| {
            s.name == "gate.decision"
                && s.parent_span_id == turn.span_id
                && s.attr("chitin.action") == Some(&Attr::Str("model.call".into()))
        })
        .count();
    assert_eq!(
        decided, 2,
        "one decision for the summary, one for the answer"
    );
    let answer_call = one(&spans, "the third turn's answer", |s| {
        s.name == "model.call"
            && s.parent_span_id == turn.span_id
            && s.attr("chitin.purpose") == Some(&Attr::Str("turn".into()))
    });
    assert_eq!(answer_call.trace_id, turn.trace_id);
}

#[test]
fn a_tool_that_decides_for_itself_has_a_tool_run_span_under_its_turn() {
    let collector = FakeCollector::start();
    let (_rt, model) = fake(vec![
        Step::tool_call("c1", "sessions_list", "{}"),
        Step::text("listed"),
    ]);
    let gw = Gw::start(&config(
        &model.base_url(),
        &format!(
            "[telemetry]\notlp_endpoint = \"{}\"\n",
            collector.endpoint()
        ),
    ));
    let answer = chat(&gw, "which sessions do I have?");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "listed",
        "{answer}"
    );
    let spans = collector.wait_for(Duration::from_secs(60), |spans| {
        spans.iter().any(|s| s.name == "tool.run")
            && spans.iter().filter(|s| s.name == "model.call").count() >= 2
    });
    let turn = one(&spans, "turn", |s| s.name == "agent.turn");
    let run = one(&spans, "tool run", |s| s.name == "tool.run");
    assert_eq!(run.trace_id, turn.trace_id);
    assert_eq!(run.parent_span_id, turn.span_id);
    assert_eq!(str_attr(run, "chitin.tool"), "sessions_list");
    assert_eq!(str_attr(run, "chitin.sandbox"), "none");
    assert_eq!(str_attr(run, "chitin.outcome"), "ran");
    assert!(int_attr(run, "chitin.duration_ms") >= 0);
    // Its own decision (`session.read`) sits under the tool run.
    let decision = one(&spans, "sessions decision", |s| {
        s.name == "gate.decision" && s.parent_span_id == run.span_id
    });
    assert_eq!(str_attr(decision, "chitin.decision"), "allow");
}

const OTLP_TOKEN: &str = "otlp-collector-token-9c1e";

#[test]
fn the_collectors_credentials_come_from_the_secret_store_for_its_host_only() {
    let collector =
        FakeCollector::start_requiring("authorization", &format!("Bearer {OTLP_TOKEN}"));
    let mut gw = Gw::start("");
    chat::set_secret(&gw, "otlp_token", "127.0.0.1", OTLP_TOKEN);
    chat::set_secret(&gw, "elsewhere", "otel.example.com", OTLP_TOKEN);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let base = std::fs::read_to_string(gw.home.join("chitin.toml")).unwrap();

    // A secret whose audience does not name the collector's host: the gateway does not start.
    std::fs::write(
        gw.home.join("chitin.toml"),
        format!(
            "{base}\n[telemetry]\notlp_endpoint = \"{}\"\nheaders = {{ Authorization = \"Bearer secret:elsewhere\" }}\n",
            collector.endpoint()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--bind", &format!("127.0.0.1:{}", gw.port)])
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", harness::PASS)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[telemetry] headers `Authorization`"), "{err}");
    assert!(
        err.contains("chitin secrets set elsewhere --audience 127.0.0.1"),
        "{err}"
    );
    assert!(!err.contains(OTLP_TOKEN), "{err}");

    // The right secret: every export carries it, with the plain tenant header.
    std::fs::write(
        gw.home.join("chitin.toml"),
        format!(
            "{base}\n[telemetry]\notlp_endpoint = \"{}\"\nheaders = {{ Authorization = \"Bearer secret:otlp_token\", \"X-Scope-OrgID\" = \"team-a\" }}\n",
            collector.endpoint()
        ),
    )
    .unwrap();
    gw.spawn();
    assert_eq!(gw.get("/ready").status, 200);
    let spans = collector.wait_for(Duration::from_secs(60), |s| {
        s.iter().any(|s| s.name == "GET /ready")
    });
    assert!(!spans.is_empty());
    assert!(collector.refused().is_empty(), "{:?}", collector.refused());
    for h in collector.headers() {
        assert_eq!(
            h.get("authorization").map(String::as_str),
            Some(format!("Bearer {OTLP_TOKEN}").as_str())
        );
        assert_eq!(h.get("x-scope-orgid").map(String::as_str), Some("team-a"));
    }
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    // The release was decided and audited; the token itself is in no log.
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(!log.contains(OTLP_TOKEN));
    let q = gw.chitin(&["audit", "query", "--kind", "secret_use", "--json"]);
    let records: Value = serde_json::from_slice(&q.stdout).unwrap_or(Value::Null);
    let released = records.as_array().into_iter().flatten().any(|r| {
        r["actor"].as_str().is_some_and(|a| a.contains("telemetry"))
            && r["resource"]
                .as_str()
                .is_some_and(|x| x.contains("otlp_token"))
    });
    assert!(released, "{}", String::from_utf8_lossy(&q.stdout));
}
