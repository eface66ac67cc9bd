//! The WebSocket control plane's own overhead, in-process on loopback with the scripted
//! backend (zero work behind it): connection set-up (TCP + upgrade + `connect` frame),
//! request round trips (`health`, `agent`), and event delivery (a run of N deltas from
//! `agent` to `run.finished`).
//!
//! `cargo bench --bench ws` prints the numbers. Under `cargo test --all-targets` (no
//! `--bench` argument) it does a short smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::gateway::auth::LimitConfig;
use chitin::gateway::backend::ChatBackend;
use chitin::gateway::backend::testing::{ScriptedBackend, Step};
use chitin::gateway::metrics::Metrics;
use chitin::gateway::ws::{TokenAuth, Ws, WsSettings};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "bench-token";

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn report(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let mean = d.iter().sum::<Duration>() / u32::try_from(d.len().max(1)).unwrap_or(1);
    println!(
        "{name:<40} n={:<6} p50={:>9.1?} p99={:>9.1?} mean={:>9.1?}",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.99),
        mean
    );
}

async fn serve(script: Vec<Step>) -> u16 {
    let backend = ScriptedBackend::new(script);
    let auth = Arc::new(TokenAuth::new(
        TOKEN.as_bytes(),
        "owner",
        LimitConfig {
            max_failures: 5,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
        },
    ));
    let dynb: Arc<dyn ChatBackend> = backend;
    let ws = Arc::new(Ws::new(
        Some(dynb),
        auth,
        Arc::new(Metrics::default()),
        WsSettings::default(),
    ));
    let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
        return 0;
    };
    let Ok(addr) = listener.local_addr() else {
        return 0;
    };
    ws.set_local_addr(addr);
    let app = chitin::gateway::ws::routes::<()>(ws);
    tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .into_future(),
    );
    addr.port()
}

async fn next_json(ws: &mut Stream) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

async fn call(ws: &mut Stream, id: u64, method: &str, params: Value) -> Option<Value> {
    let req = json!({"type": "req", "id": id, "method": method, "params": params});
    ws.send(Message::text(req.to_string())).await.ok()?;
    loop {
        let f = next_json(ws).await?;
        if f["type"] == "res" && f["id"] == id {
            return Some(f);
        }
    }
}

async fn connect(port: u16) -> Option<Stream> {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .ok()?;
    let r = call(&mut ws, 0, "connect", json!({"token": TOKEN})).await?;
    (r["ok"] == true).then_some(ws)
}

async fn measure(n: usize, deltas: usize) {
    // Set-up: TCP connect + HTTP upgrade + connect frame + response.
    let port = serve(vec![]).await;
    let mut setup = Vec::with_capacity(n / 10 + 1);
    for _ in 0..(n / 10).max(5) {
        let t = Instant::now();
        let Some(mut ws) = connect(port).await else {
            println!("connect failed");
            return;
        };
        setup.push(t.elapsed());
        let _ = ws.close(None).await;
    }
    report("connect (tcp+upgrade+auth)", setup);

    let Some(mut ws) = connect(port).await else {
        return;
    };
    let mut rt = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        if call(&mut ws, i as u64 + 1, "health", json!({}))
            .await
            .is_none()
        {
            println!("health failed");
            return;
        }
        rt.push(t.elapsed());
    }
    report("health round trip", rt);

    // A run of `deltas` deltas: agent -> run.finished.
    let port = serve((0..deltas).map(|i| Step::Delta(format!("d{i} "))).collect()).await;
    let Some(mut ws) = connect(port).await else {
        return;
    };
    let runs = (n / 100).max(3);
    let mut agent_rt = Vec::new();
    let mut whole = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        if call(
            &mut ws,
            10_000 + i as u64,
            "agent",
            json!({"message": "go"}),
        )
        .await
        .is_none()
        {
            return;
        }
        agent_rt.push(t.elapsed());
        let mut seen = 0usize;
        loop {
            let Some(f) = next_json(&mut ws).await else {
                return;
            };
            if f["event"] == "assistant.delta" {
                seen += 1;
            }
            if f["event"] == "run.finished" {
                break;
            }
        }
        // The scripted backend waits 20 ms before the first event; not ours.
        whole.push(t.elapsed().saturating_sub(Duration::from_millis(20)));
        if seen != deltas {
            println!("lost events: {seen} of {deltas}");
        }
    }
    report("agent round trip (run id back)", agent_rt);
    let per_event: Vec<Duration> = whole
        .iter()
        .map(|d| *d / u32::try_from(deltas + 2).unwrap_or(1))
        .collect();
    report(&format!("run of {deltas} deltas, per event"), per_event);
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (n, deltas) = if bench { (2000, 1000) } else { (20, 10) };
    if !bench {
        println!("smoke run (use `cargo bench --bench ws` for numbers)");
    }
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        println!("no runtime");
        return;
    };
    rt.block_on(measure(n, deltas));
}
