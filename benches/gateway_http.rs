//! The gateway binary measured from outside, with a zero-latency fake OpenAI-compatible
//! provider on loopback: cold start to `/ready` (first start on an empty state dir, and a
//! restart), idle RSS, `/v1/chat/completions` latency (sequential, then concurrent clients) and
//! the gateway's CPU per request.
//!
//! `cargo bench --bench gateway_http` prints the table for BENCHMARKS.md (idle RSS after 60 s).
//! Under `cargo test --all-targets` (no `--bench` argument) it does a short smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, Reply, Step};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Gateway {
    child: Child,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the gateway and returns it with the time until `/ready` answered 200.
async fn start(home: &Path, client: &reqwest::Client) -> Result<(Gateway, Duration), BoxError> {
    let port = free_port()?;
    let t = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--bind", &format!("127.0.0.1:{port}")])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "bench-pass")
        .env("CHITIN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let gw = Gateway { child, port };
    let url = format!("http://127.0.0.1:{port}/ready");
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok((gw, t.elapsed()));
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the gateway did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn chat(
    client: &reqwest::Client,
    port: u16,
    token: &str,
    user: &str,
) -> Result<Duration, BoxError> {
    let t = Instant::now();
    let r = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .bearer_auth(token)
        .json(&serde_json::json!({"model": "chitin", "user": user,
                                  "messages": [{"role": "user", "content": "What is on my list today?"}]}))
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("status {}: {}", r.status(), r.text().await?).into());
    }
    let _ = r.bytes().await?;
    Ok(t.elapsed())
}

fn line(name: &str, mut d: Vec<Duration>, cpu: f64) {
    d.sort();
    let n = d.len().max(1);
    println!(
        "{name:<36} n={:<5} p50={:>8.2?} p99={:>8.2?} gateway cpu/request={:.2} ms",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.99),
        cpu * 1000.0 / n as f64
    );
}

async fn main_async(full: bool) -> Result<(), BoxError> {
    let (mut sequential, clients, per_client, idle) = if full {
        (200, 20, 50, Duration::from_secs(60))
    } else {
        (3, 2, 2, Duration::from_millis(200))
    };
    // `GATEWAY_HTTP_SEQUENTIAL=N`: a longer sequential phase, to attach a profiler to the
    // gateway while it runs (its pid is printed).
    if let Some(n) = std::env::var("GATEWAY_HTTP_SEQUENTIAL")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        sequential = n;
    }
    let fake = FakeOpenAi::start(vec![]).await?;
    fake.set_fallback(Step::Reply(Reply::text([
        "Hello", ", ", "this ", "is ", "an ", "answer.",
    ])));
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let home = dir.path().join("home");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let cfg = home.join("chitin.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nworkspace = \"../ws\"\nauth_max_failures = 100000\n\n[agent]\nmodel = \"fake/m\"\nmax_concurrent_runs = 64\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
            fake.base_url()
        ),
    )?;
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()?;

    let (gw, first) = start(&home, &client).await?;
    drop(gw);
    let (gw, warm) = start(&home, &client).await?;
    println!(
        "cold start to /ready: first start (creates the state dir) {first:.2?}, restart {warm:.2?}"
    );
    let token = {
        let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["token", "show"])
            .env("CHITIN_HOME", &home)
            .env("CHITIN_PASSPHRASE", "bench-pass")
            .output()?;
        String::from_utf8(out.stdout)?.trim().to_string()
    };
    tokio::time::sleep(idle).await;
    println!(
        "idle RSS after {idle:.0?}: {:.1} MiB",
        rss_kib(gw.child.id()) as f64 / 1024.0
    );

    // Warm-up.
    for i in 0..5 {
        chat(&client, gw.port, &token, &format!("warm{i}")).await?;
    }
    // Sequential requests, each from its own `user` (a new session each).
    let pid = gw.child.id();
    println!("gateway pid {pid}");
    let c0 = stats::cpu_seconds_of(&pid.to_string());
    let mut d = Vec::new();
    for i in 0..sequential {
        d.push(chat(&client, gw.port, &token, &format!("seq{i}")).await?);
    }
    line(
        &format!("{sequential} sequential"),
        d,
        stats::cpu_seconds_of(&pid.to_string()) - c0,
    );
    // Concurrent clients.
    let token = Arc::new(token);
    let c0 = stats::cpu_seconds_of(&pid.to_string());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (client, token, port) = (client.clone(), Arc::clone(&token), gw.port);
        tasks.push(tokio::spawn(async move {
            let mut d = Vec::new();
            for j in 0..per_client {
                d.push(chat(&client, port, &token, &format!("c{k}-{j}")).await?);
            }
            Ok::<_, BoxError>(d)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = t.elapsed();
    let n = all.len();
    line(
        &format!("{clients} concurrent x {per_client}"),
        all,
        stats::cpu_seconds_of(&pid.to_string()) - c0,
    );
    println!(
        "{clients} concurrent x {per_client}: {n} requests in {wall:.2?} = {:.0} requests/s",
        n as f64 / wall.as_secs_f64()
    );
    println!(
        "RSS after the load: {:.1} MiB",
        rss_kib(pid) as f64 / 1024.0
    );
    // Long-lived sessions (issue #21): 10,000 turns over 100 sessions (100 turns each, the
    // sessions' turns interleaved over 20 clients), then RSS.
    let (sessions, turns_each) = if full { (100, 100) } else { (4, 3) };
    let c0 = stats::cpu_seconds_of(&pid.to_string());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (client, token, port) = (client.clone(), Arc::clone(&token), gw.port);
        tasks.push(tokio::spawn(async move {
            let mut d = Vec::new();
            for round in 0..turns_each {
                for sess in (k..sessions).step_by(clients) {
                    let _ = round;
                    d.push(chat(&client, port, &token, &format!("long{sess}")).await?);
                }
            }
            Ok::<_, BoxError>(d)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = t.elapsed();
    let n = all.len();
    line(
        &format!("{sessions} sessions x {turns_each} turns"),
        all,
        stats::cpu_seconds_of(&pid.to_string()) - c0,
    );
    println!(
        "{sessions} sessions x {turns_each} turns: {n} requests in {wall:.2?} = {:.0} requests/s",
        n as f64 / wall.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(if full { 5 } else { 0 })).await;
    println!(
        "RSS after {n} turns over {sessions} sessions: {:.1} MiB",
        rss_kib(pid) as f64 / 1024.0
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(main_async(full))
}
