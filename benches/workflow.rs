//! Per-step overhead of a workflow run (Cedar decision, audit records, the sandbox, the run's
//! state in `state.db`) against the same commands in a plain shell script, and against the
//! same commands as single `exec` tool calls (gate + sandbox + audit, no workflow state), so
//! the runner's own share can be read off.
//!
//! `cargo bench --bench workflow` prints the table for BENCHMARKS.md. Under `cargo test
//! --all-targets` (no `--bench` argument) it does a short smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;
#[path = "support/core.rs"]
mod core;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::clock::SystemClock;
use chitin::config::agent::BudgetsConfig;
use chitin::config::sandbox::SandboxConfig;
use chitin::gate::{CallContext, Gate, Origin};
use chitin::tools::Sandbox;
use chitin::workflow_runner::{Runner, RunnerParts, StartRequest, TokenKey};

use core::BoxError;

struct Setup {
    _dirs: Vec<tempfile::TempDir>,
    runner: Runner,
    gate: Gate,
    sandbox: Sandbox,
    ws: PathBuf,
}

fn setup(base: &Path) -> Result<Setup, BoxError> {
    let core::Core {
        dirs,
        home,
        ws: core_ws,
        gate,
        vault,
        store,
    } = core::core(base)?;
    let ws = core_ws;
    let mut sandbox = Sandbox::current(home.clone(), None, SandboxConfig::default())?;
    sandbox.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    let runner = Runner::new(RunnerParts {
        gate: gate.clone(),
        store,
        sandbox: sandbox.clone(),
        workspace: ws.clone(),
        library: Vec::new(),
        router: None,
        sealer: Arc::new(vault),
        clock: Arc::new(SystemClock),
        sleeper: Arc::new(chitin::providers::retry::TokioSleeper),
        token_key: TokenKey::from_bytes([1; 32]),
        token_ttl_ms: 86_400_000,
        budgets: BudgetsConfig::default(),
        max_steps: 100_000,
        events: None,
    });
    Ok(Setup {
        _dirs: dirs,
        runner,
        gate,
        sandbox,
        ws,
    })
}

fn report(name: &str, mut d: Vec<Duration>, cpu: f64) {
    d.sort();
    let n = d.len().max(1);
    println!(
        "{name:<40} n={:<5} p50={:>9.2?} p99={:>9.2?} mean={:>9.2?} cpu/step={:.2} ms",
        d.len(),
        pct(&d, 0.5),
        pct(&d, 0.99),
        d.iter().sum::<Duration>() / u32::try_from(n).unwrap_or(1),
        cpu * 1000.0 / n as f64
    );
}

fn main() -> Result<(), BoxError> {
    let full = std::env::args().any(|a| a == "--bench");
    let (steps, runs) = if full { (20, 15) } else { (3, 1) };
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let s = setup(base)?;
    let commands: Vec<String> = (0..steps).map(|i| format!("echo step {i}")).collect();
    // The workflow: one `run:` step per command.
    let mut wf = String::from("name: bench\nsteps:\n");
    for (i, c) in commands.iter().enumerate() {
        wf.push_str(&format!("  - id: s{i}\n    run: {c}\n"));
    }
    std::fs::write(s.ws.join("bench.lobster"), &wf)?;
    // The same commands as a shell script.
    let script = s.ws.join("bench.sh");
    std::fs::write(&script, commands.join("\n") + "\n")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // 1. A plain shell script, no sandbox (the baseline).
    let mut d = Vec::new();
    let c0 = cpu_seconds();
    for _ in 0..runs {
        let t = Instant::now();
        let o = std::process::Command::new("sh").arg(&script).output()?;
        assert!(o.status.success());
        d.extend(std::iter::repeat_n(t.elapsed() / steps, steps as usize));
    }
    // The script's own processes are children: count their CPU time too.
    report(
        "shell script, per command",
        d,
        cpu_seconds() - c0 + children_cpu_seconds(),
    );

    // 1b. The script with a process per command (`sh -c '...'` per line, as Lobster and the
    // runner start one per step).
    let forked = s.ws.join("bench-forked.sh");
    let lines: Vec<String> = commands.iter().map(|c| format!("sh -c '{c}'")).collect();
    std::fs::write(&forked, lines.join("\n") + "\n")?;
    let mut d = Vec::new();
    let c0 = cpu_seconds() + children_cpu_seconds();
    for _ in 0..runs {
        let t = Instant::now();
        let o = std::process::Command::new("sh").arg(&forked).output()?;
        assert!(o.status.success());
        d.extend(std::iter::repeat_n(t.elapsed() / steps, steps as usize));
    }
    report(
        "shell script, sh -c per command",
        d,
        cpu_seconds() + children_cpu_seconds() - c0,
    );

    // 2. Each command as one `exec` tool call (gate + sandbox + audit).
    let call = CallContext {
        user: "owner".into(),
        origin: Origin::Automation,
        session: "bench".into(),
        workspace: s.ws.clone(),
        tainted: false,
    };
    let mut d = Vec::new();
    let c0 = cpu_seconds() + children_cpu_seconds();
    for _ in 0..runs {
        for c in &commands {
            let t = Instant::now();
            let args = serde_json::json!({"argv": ["sh", "-c", c]});
            let r = chitin::tools::invoke::invoke(&s.gate, &s.sandbox, &call, "exec", &args, None)?;
            assert!(matches!(r, chitin::tools::invoke::Invoked::Ran { .. }));
            d.push(t.elapsed());
        }
    }
    report(
        "exec tool call (gate+sandbox+audit)",
        d,
        cpu_seconds() + children_cpu_seconds() - c0,
    );

    // 3. The workflow run: per step.
    let mut d = Vec::new();
    let c0 = cpu_seconds() + children_cpu_seconds();
    for _ in 0..runs {
        let t = Instant::now();
        let env = rt.block_on(s.runner.start(StartRequest {
            file: "bench.lobster".into(),
            args: None,
            principal: "owner".into(),
            origin: Origin::User,
            session: None,
            tainted: false,
        }));
        assert_eq!(env.status(), "ok", "{}", env.value);
        d.extend(std::iter::repeat_n(t.elapsed() / steps, steps as usize));
    }
    report(
        "workflow step (+ run state, sealed)",
        d,
        cpu_seconds() + children_cpu_seconds() - c0,
    );
    // 4. Optional: Lobster itself on the same file (`LOBSTER=/path/to/node_modules/.bin/lobster`;
    // install `@clawdbot/lobster` in a scratch directory, never in this project). Its per-step
    // cost is (time of the N-step file - time of a 1-step file) / (N - 1), so Node's start-up
    // is left out.
    if let Some(lobster) = std::env::var_os("LOBSTER") {
        let one = s.ws.join("one.lobster");
        std::fs::write(
            &one,
            "name: one\nsteps:\n  - id: s0\n    run: echo step 0\n",
        )?;
        let time = |file: &Path| -> Result<Duration, BoxError> {
            let t = Instant::now();
            let o = std::process::Command::new(&lobster)
                .args(["run", "--mode", "tool"])
                .arg(file)
                .current_dir(&s.ws)
                .output()?;
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            Ok(t.elapsed())
        };
        let mut d = Vec::new();
        let c0 = children_cpu_seconds();
        let mut c1 = 0.0;
        for _ in 0..runs {
            let full_run = time(&s.ws.join("bench.lobster"))?;
            let c = children_cpu_seconds();
            let single = time(&one)?;
            c1 += children_cpu_seconds() - c;
            d.push(full_run.saturating_sub(single) / (steps - 1).max(1));
        }
        let cpu_full = children_cpu_seconds() - c0 - c1;
        let n = f64::from(runs * (steps - 1).max(1));
        d.sort();
        println!(
            "{:<40} n={:<5} p50={:>9.2?} p99={:>9.2?}                  cpu/step={:.2} ms",
            "lobster (node), per step",
            d.len(),
            pct(&d, 0.5),
            pct(&d, 0.99),
            (cpu_full - c1) * 1000.0 / n
        );
    }
    Ok(())
}

/// CPU time of this process's waited-for children (the sandbox launchers and their commands),
/// in seconds.
fn children_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // cutime and cstime are fields 16 and 17 (index n - 3).
    (ticks(13) + ticks(14)) / 100.0
}
