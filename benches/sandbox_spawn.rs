//! Spawn overhead of a sandboxed `/bin/true` versus a plain spawn.
//!
//! `cargo bench --bench sandbox_spawn [-- RUNS]` (default 300 runs per variant, interleaved so
//! machine load hits every variant alike). Prints median and p99 per variant and the extra cost
//! of the sandbox. Method and results: docs/parts/BENCHMARKS.sandbox.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let d = t.elapsed();
    match status {
        Ok(s) if s.success() => d,
        other => {
            eprintln!("benchmark command failed: {other:?} ({cmd:?})");
            std::process::exit(1);
        }
    }
}

fn stats(name: &str, v: &mut [Duration]) -> (f64, f64) {
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let med = ms(v[v.len() / 2]);
    let p99 = ms(v[(v.len() * 99 / 100).min(v.len() - 1)]);
    println!(
        "{name:<40} median {med:7.3} ms   p99 {p99:7.3} ms   (n={})",
        v.len()
    );
    (med, p99)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it,
    // and then a 3-run smoke test is enough.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let runs: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if benching { 300 } else { 3 });
    let chitin = env!("CARGO_BIN_EXE_chitin");
    let home = tempfile::tempdir().unwrap_or_else(|e| {
        eprintln!("tempdir: {e}");
        std::process::exit(1)
    });
    let ws = tempfile::tempdir().unwrap_or_else(|e| {
        eprintln!("tempdir: {e}");
        std::process::exit(1)
    });
    let home_nocg = tempfile::tempdir().unwrap_or_else(|e| {
        eprintln!("tempdir: {e}");
        std::process::exit(1)
    });
    if let Err(e) = std::fs::write(
        home_nocg.path().join("chitin.toml"),
        "[sandbox]\ncgroup = \"off\"\n",
    ) {
        eprintln!("config: {e}");
        std::process::exit(1)
    }
    let sandboxed_in = |h: &std::path::Path| {
        let mut c = Command::new(chitin);
        c.env("CHITIN_HOME", h)
            .args(["sandbox", "exec", "--workspace"])
            .arg(ws.path())
            .args(["--", "/bin/true"]);
        c
    };
    let sandboxed = || sandboxed_in(home.path());
    let sandboxed_nocg = || sandboxed_in(home_nocg.path());
    let launcher_only = || {
        let mut c = Command::new(chitin);
        c.arg("--version");
        c
    };
    // Warm up page cache and the binary.
    for _ in 0..10 {
        time(&mut sandboxed());
        time(&mut Command::new("/bin/true"));
    }
    let (mut plain, mut launcher, mut sbx, mut nocg) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        plain.push(time(&mut Command::new("/bin/true")));
        launcher.push(time(&mut launcher_only()));
        sbx.push(time(&mut sandboxed()));
        nocg.push(time(&mut sandboxed_nocg()));
    }
    println!("sandbox spawn overhead, {runs} interleaved runs per variant");
    let (pm, pp) = stats("plain spawn of /bin/true", &mut plain);
    stats("`chitin --version` (launcher exec only)", &mut launcher);
    let (sm, sp) = stats("sandboxed, cgroup = auto (default)", &mut sbx);
    let (nm, np) = stats("sandboxed, cgroup = off", &mut nocg);
    println!(
        "extra for the sandbox: median {:.3} ms, p99 {:.3} ms (cgroup = off: median {:.3} ms, p99 {:.3} ms)",
        sm - pm,
        sp - pp,
        nm - pm,
        np - pp
    );
}
