//! Spawn overhead of a sandboxed `/bin/true` versus a plain spawn.
//!
//! `cargo bench --bench sandbox_spawn [-- RUNS]` (default 300 runs per variant, interleaved so
//! machine load hits every variant alike). Prints median and p99 per variant and the extra cost
//! of the sandbox. Method and results: docs/parts/BENCHMARKS.sandbox.md.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn time(cmd: &mut Command) -> Duration {
    time_expect(cmd, true)
}

/// Runs `cmd` and returns its wall time; it must succeed (or, with `ok = false`, fail).
fn time_expect(cmd: &mut Command, ok: bool) -> Duration {
    let t = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let d = t.elapsed();
    match status {
        Ok(s) if s.success() == ok => d,
        other => {
            eprintln!("benchmark command failed: {other:?} ({cmd:?})");
            std::process::exit(1);
        }
    }
}

/// One tool-path launch through the zygote (`chitin_sandbox::zygote`): the launcher forked
/// instead of exec'd; its report read to the end and its exit awaited, as the gateway does.
fn time_zygote(z: &chitin_sandbox::zygote::Zygote, args: &[std::ffi::OsString]) -> Duration {
    use std::io::Read;
    let t = Instant::now();
    let run = || -> std::io::Result<i32> {
        let (mut out, out_w) = std::io::pipe()?;
        let (mut err, err_w) = std::io::pipe()?;
        let stdio = chitin_sandbox::zygote::Stdio3 {
            stdin: std::fs::File::open("/dev/null")?.into(),
            stdout: out_w.into(),
            stderr: err_w.into(),
        };
        let launched = z.spawn(args, stdio, None).map_err(std::io::Error::other)?;
        let mut sink = Vec::new();
        out.read_to_end(&mut sink)?;
        err.read_to_end(&mut sink)?;
        launched.wait()
    };
    match run() {
        Ok(0) => t.elapsed(),
        other => {
            eprintln!("benchmark launch through the zygote failed: {other:?} ({args:?})");
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
    // The tool path: the gateway's flags and the JSON report, through the small launcher
    // and (as before issue #21) through `chitin sandbox exec --capture-json`.
    let small = std::path::Path::new(chitin).with_file_name("chitin-sandbox-launch");
    let tool_small = |cgroup: &str| {
        let mut c = Command::new(&small);
        c.arg("--workspace")
            .arg(ws.path())
            .arg("--state-dir")
            .arg(home.path())
            .args(["--capture", "65536", "--cgroup", cgroup, "--", "/bin/true"]);
        c
    };
    let tool_old = |h: &std::path::Path| {
        let mut c = Command::new(chitin);
        c.env("CHITIN_HOME", h)
            .args(["sandbox", "exec", "--capture-json", "65536", "--workspace"])
            .arg(ws.path())
            .args(["--", "/bin/true"]);
        c
    };
    let zygote = chitin_sandbox::zygote::Zygote::new(&small);
    let zygote_args = |cgroup: &str| -> Vec<std::ffi::OsString> {
        tool_small(cgroup)
            .get_args()
            .map(ToOwned::to_owned)
            .collect()
    };
    let (zy_auto, zy_off) = (zygote_args("auto"), zygote_args("off"));
    let small_only = || {
        let mut c = Command::new(&small);
        c.arg("--version");
        c
    };
    // Warm up page cache and the binaries.
    for _ in 0..10 {
        time(&mut sandboxed());
        time(&mut tool_small("auto"));
        time(&mut Command::new("/bin/true"));
        time_zygote(&zygote, &zy_auto);
    }
    let mut v: Vec<Vec<Duration>> = vec![Vec::new(); 10];
    for _ in 0..runs {
        v[0].push(time(&mut Command::new("/bin/true")));
        v[1].push(time(&mut launcher_only()));
        v[2].push(time_expect(&mut small_only(), false));
        v[3].push(time(&mut tool_old(home.path())));
        v[4].push(time(&mut tool_small("auto")));
        v[5].push(time(&mut tool_old(home_nocg.path())));
        v[6].push(time(&mut tool_small("off")));
        v[7].push(time(&mut sandboxed_nocg()));
        v[8].push(time_zygote(&zygote, &zy_auto));
        v[9].push(time_zygote(&zygote, &zy_off));
    }
    println!("sandbox spawn overhead, {runs} interleaved runs per variant");
    let (pm, _) = stats("plain spawn of /bin/true", &mut v[0]);
    stats("`chitin --version` (big binary exec only)", &mut v[1]);
    stats(
        "`chitin-sandbox-launch --version` (small, exec only)",
        &mut v[2],
    );
    let (om, _) = stats("tool path, chitin sandbox exec, cgroup auto", &mut v[3]);
    let (sm, _) = stats("tool path, chitin-sandbox-launch, cgroup auto", &mut v[4]);
    let (onm, _) = stats("tool path, chitin sandbox exec, cgroup off", &mut v[5]);
    let (snm, _) = stats("tool path, chitin-sandbox-launch, cgroup off", &mut v[6]);
    stats(
        "`chitin sandbox exec` (CLI, pass-through), cgroup off",
        &mut v[7],
    );
    let (zm, _) = stats("tool path, through the zygote, cgroup auto", &mut v[8]);
    let (znm, _) = stats("tool path, through the zygote, cgroup off", &mut v[9]);
    println!(
        "median extra over a plain spawn: zygote {:.3} ms (cgroup off {:.3} ms); chitin-sandbox-launch {:.3} ms (cgroup off {:.3} ms); chitin sandbox exec {:.3} ms (cgroup off {:.3} ms)",
        zm - pm,
        znm - pm,
        sm - pm,
        snm - pm,
        om - pm,
        onm - pm
    );
}
