//! Gateway-side overhead of one agent turn with a zero-latency fake provider on loopback: a
//! text-only turn, a turn with one sandboxed tool call, and turns/s with 50 sessions at once.
//! The provider round trip alone (`Router::chat` against the same fake) is measured too, so
//! the agent's own share can be read off.
//!
//! `cargo bench --bench agent_turn` prints the table for BENCHMARKS.md. Under `cargo test
//! --all-targets` (no `--bench` argument) it does a short smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;
#[path = "support/core.rs"]
mod core;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::agent::{Agent, AgentParts, TurnRequest};
use chitin::approvals::{Approvals, DEFAULT_TTL_MS};
use chitin::clock::SystemClock;
use chitin::config::agent::{AgentConfig, BudgetsConfig};
use chitin::config::providers::{PricingConfig, ProviderConfig};
use chitin::config::sandbox::SandboxConfig;

use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, StaticKeys, Step};
use chitin::providers::{ChatRequest, Message, ProviderKind, Router};
use chitin::tools::Sandbox;

use core::BoxError;

struct Setup {
    _dirs: Vec<tempfile::TempDir>,
    agent: Agent,
    router: Arc<Router>,
    /// The fake model when it runs in this process (scripted steps).
    fake: Option<FakeServer>,
    _child: Option<ChildFake>,
}

/// The fake model in a child process (this benchmark run with `--serve-fake-model`): the
/// process CPU measured is then the gateway's alone, without the fake parsing an ever longer
/// request (and its allocations mixing with the gateway's).
struct ChildFake {
    child: std::process::Child,
    base_url: String,
}

impl Drop for ChildFake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_fake() -> Result<ChildFake, BoxError> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("--serve-fake-model")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let out = child.stdout.take().ok_or("the fake model's stdout")?;
    std::io::BufReader::new(out).read_line(&mut line)?;
    let base_url = line.trim().to_string();
    if !base_url.starts_with("http://127.0.0.1:") {
        return Err(format!("the fake model process said {line:?}").into());
    }
    Ok(ChildFake { child, base_url })
}

/// `--serve-fake-model`: the fake model alone, answering every request with the bench's text
/// reply, until stdin closes (the benchmark ended).
async fn serve_fake_model() -> Result<(), BoxError> {
    let fake = start_fake().await?;
    println!("{}", fake.base_url());
    tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await?;
    Ok(())
}

async fn start_fake() -> Result<FakeServer, BoxError> {
    let fake = FakeOpenAi::start(vec![]).await?;
    // Copying every request it gets would be the fake's work measured with the gateway's.
    fake.set_recording(false);
    fake.set_fallback(Step::Reply(Reply::text([
        "Hello", ", ", "this ", "is ", "an ", "answer.",
    ])));
    Ok(fake)
}

/// The agent against a fake model: in this process, or (`separate`) in a child process.
async fn setup(base: &Path, cache_kib: u64, separate: bool) -> Result<Setup, BoxError> {
    let core::Core {
        dirs,
        home,
        ws: core_ws,
        gate,
        vault,
        store,
    } = core::core(base)?;
    let (fake, child) = if separate {
        (None, Some(spawn_fake()?))
    } else {
        (Some(start_fake().await?), None)
    };
    let base_url = match (&fake, &child) {
        (Some(f), _) => f.base_url(),
        (None, Some(c)) => c.base_url.clone(),
        (None, None) => return Err("no fake model".into()),
    };
    let config = AgentConfig {
        model: "fake/m".into(),
        max_concurrent_runs: 64,
        history_cache_kib: cache_kib,
        ..AgentConfig::default()
    };
    let provider = ProviderConfig::new("fake", ProviderKind::Openai, Some(&base_url));
    let router = Arc::new(Router::new(
        &[provider],
        &config,
        &PricingConfig::default(),
        Arc::new(StaticKeys::default()),
        Arc::new(SystemClock),
    )?);
    let agent = Agent::new(AgentParts {
        gate: gate.clone(),
        store: Arc::clone(&store),
        approvals: Approvals::new(store, gate, Arc::new(SystemClock), DEFAULT_TTL_MS),
        sandbox: {
            let mut sb = Sandbox::current(home.clone(), None, SandboxConfig::default())?;
            sb.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
            sb
        },
        workspace: core_ws,
        router: Some(Arc::clone(&router)),
        sealer: Arc::new(vault),
        clock: Arc::new(SystemClock),
        config,
        budgets: BudgetsConfig::default(),
        owners: vec!["owner".into()],
        skills: None,
        redaction_window: 0,
    });
    Ok(Setup {
        _dirs: dirs,
        agent,
        router,
        fake,
        _child: child,
    })
}

/// One session of `turns` text turns, measured in windows of `window` turns: wall p50 and
/// CPU per turn (all threads, ns resolution) of each window, and the provider alone with a
/// request of the same length (its share grows with the history in any gateway: the whole
/// conversation is sent each turn).
async fn long_session(
    s: &Setup,
    name: &str,
    turns: usize,
    window: usize,
) -> Result<Vec<(usize, Duration, f64, f64)>, BoxError> {
    let mut out = Vec::new();
    let mut history: Vec<Message> = Vec::new();
    let mut i = 0;
    while i < turns {
        let marks = [0, turns / 4, turns / 2, 3 * turns / 4, turns - window];
        let measured = marks.contains(&i);
        let mut d = Vec::new();
        let c0 = cpu_seconds_fine();
        for _ in 0..window {
            d.push(turn(&s.agent, name.to_string()).await?);
        }
        let cpu = (cpu_seconds_fine() - c0) / window as f64;
        for _ in 0..window {
            history.push(Message::user("What is on my list today?"));
            history.push(Message::Assistant {
                text: "Hello, this is an answer.".into(),
                tool_calls: Vec::new(),
            });
        }
        i += window;
        if measured {
            // The provider alone, with the request this window's last turn made.
            let mut req_msgs = history.clone();
            req_msgs.pop();
            let req = ChatRequest::new(req_msgs, 1024);
            let c1 = cpu_seconds_fine();
            for _ in 0..window {
                let mut sink = |_e| {};
                s.router.chat(&req, &mut sink).await?;
            }
            let provider = (cpu_seconds_fine() - c1) / window as f64;
            d.sort();
            out.push((i, pct(&d, 0.5), cpu, provider));
        }
    }
    Ok(out)
}

async fn turn(agent: &Agent, session: String) -> Result<Duration, BoxError> {
    let t = Instant::now();
    let id = agent
        .submit(TurnRequest {
            session,
            user: "owner".into(),
            channel: "bench".into(),
            text: "What is on my list today?".into(),
            approval_wait: Some(Duration::ZERO),
            origin: None,
        })
        .await?;
    let s = agent.wait(&id, Duration::from_secs(60)).await?;
    if s.status != "completed" {
        return Err(format!("turn ended {}: {:?}", s.status, s.error).into());
    }
    Ok(t.elapsed())
}

fn report(name: &str, mut d: Vec<Duration>, cpu: f64) {
    d.sort();
    let n = d.len().max(1);
    println!(
        "{name:<34} n={:<5} p50={:>8.2?} p99={:>8.2?} mean={:>8.2?} cpu/turn={:.2} ms",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.99),
        d.iter().sum::<Duration>() / u32::try_from(n).unwrap_or(1),
        cpu * 1000.0 / n as f64
    );
}

async fn main_async(full: bool) -> Result<(), BoxError> {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    if std::env::args().any(|a| a == "--long") {
        // Turn 1,000 of one session against turn 1 (issue #21), with the history cache
        // (default) and without it (`history_cache_kib = 0`), sessions interleaved.
        let turns = if full { 1000 } else { 20 };
        let window = if full { 50 } else { 5 };
        // The fake model in a child process: what grows with the session in the fake (parsing
        // the whole conversation) is not the gateway's.
        let on = setup(base, 8192, true).await?;
        let off = setup(base, 0, true).await?;
        for (s, label) in [(&on, "cache on"), (&off, "cache off")] {
            for i in 0..10 {
                turn(&s.agent, format!("warm-{}-{i}", label.replace(' ', "-"))).await?;
            }
        }
        let rounds = if full { 2 } else { 1 };
        // `AGENT_TURN_LONG=on` (or `off`): only that agent's sessions, e.g. under a profiler.
        let only = std::env::var("AGENT_TURN_LONG").ok();
        for round in 0..rounds {
            for (s, label) in [(&on, "cache on"), (&off, "cache off")] {
                if only
                    .as_deref()
                    .is_some_and(|o| format!("cache {o}") != label)
                {
                    continue;
                }
                let name = format!("long-{}-{round}", label.replace(' ', "-"));
                for (upto, p50, cpu, provider) in long_session(s, &name, turns, window).await? {
                    println!(
                        "{label:<9} round {round} turns {:>4}-{upto:<4} p50={p50:>8.2?} cpu/turn={:.3} ms provider alone={:.3} ms agent={:.3} ms",
                        upto + 1 - window,
                        cpu * 1000.0,
                        provider * 1000.0,
                        (cpu - provider) * 1000.0
                    );
                }
            }
        }
        return Ok(());
    }
    let s = setup(base, 8192, false).await?;
    let fake = s
        .fake
        .as_ref()
        .ok_or("the fake model runs in this process")?;
    let (n_text, n_tool, sessions, per_session) = if full {
        (300, 100, 50, 10)
    } else {
        (3, 1, 3, 1)
    };
    for i in 0..10.min(n_text) {
        turn(&s.agent, format!("warm-{i}")).await?;
    }
    // The provider alone.
    let req = ChatRequest::new(vec![Message::user("What is on my list today?")], 1024);
    let mut d = Vec::new();
    let c0 = cpu_seconds();
    for _ in 0..n_text {
        let t = Instant::now();
        let mut sink = |_e| {};
        s.router.chat(&req, &mut sink).await?;
        d.push(t.elapsed());
    }
    report("provider round trip alone", d, cpu_seconds() - c0);
    // Text-only turns, each in a new session.
    let mut d = Vec::new();
    let c0 = cpu_seconds();
    for i in 0..n_text {
        d.push(turn(&s.agent, format!("text-{i}")).await?);
    }
    report("text-only turn", d, cpu_seconds() - c0);
    // One sandboxed tool call per turn.
    let mut d = Vec::new();
    let c0 = cpu_seconds();
    for i in 0..n_tool {
        fake.push(Step::tool_call("c1", "exec", r#"{"argv":["true"]}"#));
        fake.push(Step::text("done"));
        d.push(turn(&s.agent, format!("tool-{i}")).await?);
    }
    report("turn with one sandboxed exec", d, cpu_seconds() - c0);
    // 50 sessions at once, text-only turns.
    let c0 = cpu_seconds();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..sessions {
        let a = s.agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut d = Vec::new();
            for j in 0..per_session {
                d.push(turn(&a, format!("conc-{k}-{j}")).await?);
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
    report(
        &format!("{sessions} sessions at once"),
        all,
        cpu_seconds() - c0,
    );
    println!(
        "{sessions} sessions at once: {n} turns in {wall:.2?} = {:.0} turns/s",
        n as f64 / wall.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if std::env::args().any(|a| a == "--serve-fake-model") {
        return rt.block_on(serve_fake_model());
    }
    rt.block_on(main_async(full))
}
