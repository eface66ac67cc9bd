//! Per-call client overhead of the provider layer against zero-latency fake servers on
//! loopback: `Router::chat` end to end (request build, key fetch, HTTP/1.1 keep-alive, SSE
//! decode, reassembly, pricing), streaming and whole, both protocols.
//!
//! `cargo bench --bench providers` prints p50/p99/mean per call. Under `cargo test
//! --all-targets` (no `--bench` argument) it does a short smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;

use std::sync::Arc;
use std::time::Instant;

use chitin::clock::SystemClock;
use chitin::config::agent::AgentConfig;
use chitin::config::providers::{ModelPrice, PricingConfig, ProviderConfig};
use chitin::providers::testing::{FakeAnthropic, FakeOpenAi, FakeServer, Reply, StaticKeys, Step};
use chitin::providers::{ChatRequest, Message, ProviderKind, Router, ToolSpec};
use chitin::secrets::{CredentialField, SecretName, SecretRef};

async fn run(
    kind: ProviderKind,
    stream: bool,
    with_tools: bool,
    with_key: bool,
    n: usize,
) -> Result<(), String> {
    let reply = if with_tools {
        Reply::text(["Let me ", "check ", "that."]).tool_call(
            "call_1",
            "read_file",
            r#"{"path": "notes/today.md"}"#,
            4,
        )
    } else {
        Reply::text(["Hello", ", ", "this ", "is ", "a ", "short ", "answer."])
    };
    let fake: FakeServer = match kind {
        ProviderKind::Anthropic => FakeAnthropic::start(vec![]).await,
        ProviderKind::Openai => FakeOpenAi::start(vec![]).await,
    }
    .map_err(|e| e.to_string())?;
    fake.set_fallback(Step::Reply(reply));
    let mut p = ProviderConfig::new("p", kind, Some(&fake.base_url()));
    if with_key {
        p.api_key = Some(CredentialField(SecretRef::Secret(
            SecretName::parse("p_key").map_err(|e| e.to_string())?,
        )));
    }
    let agent = AgentConfig {
        model: "p/m".into(),
        ..AgentConfig::default()
    };
    let mut pricing = PricingConfig::default();
    pricing.0.insert(
        "p/m".into(),
        ModelPrice {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
        },
    );
    let keys = Arc::new(StaticKeys::default().with("p", "sk-bench-0123456789abcdef"));
    let router = Router::new(&[p], &agent, &pricing, keys, Arc::new(SystemClock))
        .map_err(|e| e.to_string())?;
    let mut req = ChatRequest::new(
        vec![Message::user("What is on my list today? ".repeat(20))],
        512,
    );
    req.system = Some("You are a helpful assistant. ".repeat(40));
    req.stream = stream;
    req.tools = (0..8)
        .map(|i| {
            std::sync::Arc::new(ToolSpec {
                name: format!("tool_{i}"),
                description: "A tool with a small schema".into(),
                input_schema: serde_json::json!({"type": "object",
                    "properties": {"path": {"type": "string"}}, "required": ["path"]}),
            })
        })
        .collect();
    let mut sink = |_e| {};
    // Warm up (connection pool, allocator).
    for _ in 0..20.min(n) {
        router
            .chat(&req, &mut sink)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut times = Vec::with_capacity(n);
    let cpu0 = cpu_seconds();
    let t_all = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let r = router
            .chat(&req, &mut sink)
            .await
            .map_err(|e| e.to_string())?;
        times.push(t.elapsed());
        if r.text.is_empty() || (with_tools && r.tool_calls.len() != 1) {
            return Err("unexpected answer".into());
        }
    }
    let total = t_all.elapsed();
    let cpu = cpu_seconds() - cpu0;
    times.sort_unstable();
    println!(
        "{:<9} {:<5} {:<5} {:<6} n={n:<5} p50 {:>7.1} us  p99 {:>7.1} us  mean {:>7.1} us  \
         cpu/call {:>6.1} us (client + fake server)",
        kind.as_str(),
        if stream { "sse" } else { "whole" },
        if with_tools { "tools" } else { "text" },
        if with_key { "key" } else { "no-key" },
        pct(&times, 0.50).as_secs_f64() * 1e6,
        pct(&times, 0.99).as_secs_f64() * 1e6,
        total.as_secs_f64() * 1e6 / n as f64,
        cpu * 1e6 / n as f64,
    );
    Ok(())
}

fn main() {
    chitin::providers::init_tls();
    let bench = std::env::args().any(|a| a == "--bench");
    let n = if bench { 2000 } else { 20 };
    if !bench {
        println!("smoke run (use `cargo bench --bench providers` for numbers)");
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    for kind in [ProviderKind::Anthropic, ProviderKind::Openai] {
        for stream in [true, false] {
            for (tools, key) in [(false, false), (false, true), (true, true)] {
                if let Err(e) = rt.block_on(run(kind, stream, tools, key, n)) {
                    eprintln!("{kind:?} stream={stream} tools={tools}: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
