//! Resource limits and process-tree teardown, through `chitin sandbox exec`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

struct Env {
    home: tempfile::TempDir,
    ws: tempfile::TempDir,
}

fn env_with(config: &str) -> Env {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let e = Env {
        home: tempfile::tempdir_in(base).unwrap(),
        ws: tempfile::tempdir_in(base).unwrap(),
    };
    std::fs::write(e.home.path().join("chitin.toml"), config).unwrap();
    e
}

fn env() -> Env {
    env_with("")
}

impl Env {
    fn run(&self, flags: &[&str], argv: &[&str]) -> Run {
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .env("CHITIN_HOME", self.home.path())
            .args(["sandbox", "exec", "--workspace"])
            .arg(self.ws.path())
            .args(flags)
            .arg("--")
            .args(argv)
            .output()
            .unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: start.elapsed(),
        }
    }
}

/// Host processes whose command line contains `marker`.
fn survivors(marker: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(marker)
        {
            n += 1;
        }
    }
    n
}

fn assert_no_survivors(marker: &str) {
    // Namespace teardown is asynchronous by a few milliseconds.
    let deadline = Instant::now() + Duration::from_secs(3);
    while survivors(marker) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        survivors(marker),
        0,
        "processes with {marker} survived the sandbox"
    );
}

#[test]
fn the_wall_clock_timeout_kills_a_hang_and_reports_timeout() {
    let e = env();
    let marker = format!("chitin-hang-{}", std::process::id());
    let r = e.run(
        &["--timeout", "1"],
        &["sh", "-c", "sleep 600; echo $0", &marker],
    );
    assert_eq!(r.code, 124, "{}", r.stderr);
    assert!(
        r.stderr.contains("chitin: sandbox: killed: timeout"),
        "{}",
        r.stderr
    );
    assert!(r.took < Duration::from_secs(10), "took {:?}", r.took);
    assert_no_survivors(&marker);
}

#[test]
fn the_timeout_kills_daemonized_double_forked_children_too() {
    let e = env();
    let marker = format!("chitin-daemon-timeout-{}", std::process::id());
    let code = r#"
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "600"])
    os._exit(0)
time.sleep(600)
"#;
    let r = e.run(&["--timeout", "1"], &["python3", "-c", code, &marker]);
    assert_eq!(r.code, 124, "{}", r.stderr);
    assert_no_survivors(&marker);
}

#[test]
fn a_daemon_cannot_outlive_the_command() {
    let e = env();
    let marker = format!("chitin-daemon-{}", std::process::id());
    // Double fork + setsid + nohup-style ignore of SIGHUP, then the command exits at once.
    let code = r#"
import os, sys, time, signal
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.fork() == 0:
        time.sleep(600)
    os._exit(0)
print("parent done")
"#;
    let r = e.run(&["--timeout", "20"], &["python3", "-c", code, &marker]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "parent done\n");
    assert!(r.took < Duration::from_secs(15), "took {:?}", r.took);
    assert_no_survivors(&marker);
}

#[test]
fn a_fork_bomb_hits_the_process_limit_and_leaves_nothing_behind() {
    let e = env();
    let marker = format!("chitin-forkbomb-{}", std::process::id());
    let code = r#"
import os, errno, time, sys
n = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError as e:
    print(n, errno.errorcode[e.errno])
"#;
    let r = e.run(
        &["--max-procs", "16", "--timeout", "30"],
        &["python3", "-c", code, &marker],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut parts = r.stdout.split_whitespace();
    let n: u32 = parts.next().unwrap().parse().unwrap();
    assert_eq!(parts.next(), Some("EAGAIN"), "{}", r.stdout);
    assert!(n < 16, "forked {n} children with a limit of 16");
    assert_no_survivors(&marker);
}

#[test]
fn a_shell_fork_bomb_ends_with_the_sandbox() {
    let e = env();
    let r = e.run(
        &["--max-procs", "32", "--timeout", "3"],
        &["sh", "-c", "b(){ b|b& }; b; sleep 1; echo bomb-done"],
    );
    // The bomb cannot grow past the limit; the timeout or the shell's exit ends it all.
    assert!(r.took < Duration::from_secs(15), "took {:?}", r.took);
    assert!(
        r.code == 0 || r.code == 124,
        "code {} stderr {}",
        r.code,
        r.stderr
    );
}

#[test]
fn the_pid_namespace_caps_tasks_even_without_a_cgroup() {
    // cgroup off, a process limit the host uid (root) ignores: pid_max = 301 still holds.
    let e = env_with("[sandbox]\ncgroup = \"off\"\n");
    let marker = format!("chitin-pidmax-{}", std::process::id());
    let code = "import os, errno, time\nprint(open('/proc/sys/kernel/pid_max').read().strip())\nn = 0\ntry:\n  while True:\n    if os.fork() == 0:\n      time.sleep(30); os._exit(0)\n    n += 1\nexcept OSError as e:\n  print(n < 301, errno.errorcode[e.errno])";
    let r = e.run(
        &["--max-procs", "100000", "--timeout", "60"],
        &["python3", "-c", code, &marker],
    );
    assert_eq!(r.stdout, "301\nTrue EAGAIN\n", "{}", r.stderr);
    assert_no_survivors(&marker);
}

#[test]
fn a_memory_bomb_is_killed_and_reported_as_memory() {
    let e = env();
    let r = e.run(
        &["--memory", "64", "--timeout", "30"],
        &[
            "python3",
            "-c",
            "x = []\nwhile True: x.append(b'x' * (1 << 20))",
        ],
    );
    assert_eq!(r.code, 137, "stdout {} stderr {}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("chitin: sandbox: killed: memory"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_huge_allocation_fails_cleanly_under_the_address_space_limit() {
    let e = env();
    let r = e.run(
        &["--memory", "64"],
        &[
            "python3",
            "-c",
            "try:\n  b = bytearray(8 << 30)\nexcept MemoryError:\n  print('MemoryError')",
        ],
    );
    assert_eq!(r.stdout, "MemoryError\n", "{}", r.stderr);
}

#[test]
fn a_cpu_spin_is_killed_and_reported_as_cpu() {
    let e = env_with("[sandbox]\ncpu_secs = 1\n");
    let r = e.run(&["--timeout", "60"], &["python3", "-c", "while True: pass"]);
    assert_eq!(r.code, 128 + 24, "{}", r.stderr);
    assert!(
        r.stderr.contains("chitin: sandbox: killed: cpu"),
        "{}",
        r.stderr
    );
}

#[test]
fn disk_fill_hits_the_file_size_limit() {
    let e = env_with("[sandbox]\nfile_size_mb = 1\n");
    let r = e.run(
        &[],
        &["dd", "if=/dev/zero", "of=big", "bs=65536", "count=100"],
    );
    assert_eq!(r.code, 128 + 25, "{}", r.stderr);
    assert!(
        r.stderr.contains("chitin: sandbox: killed: file-size"),
        "{}",
        r.stderr
    );
    let len = std::fs::metadata(e.ws.path().join("big")).unwrap().len();
    assert_eq!(len, 1 << 20);
}

#[test]
fn filling_the_private_tmp_fails_with_enospc() {
    let e = env_with("[sandbox]\ntmp_size_mb = 2\n");
    let r = e.run(
        &[],
        &["python3", "-c", "import errno\ntry:\n  open('/tmp/x','wb').write(b'x' * (3 << 20))\nexcept OSError as e:\n  print(errno.errorcode[e.errno])"],
    );
    assert_eq!(r.stdout, "ENOSPC\n", "{}", r.stderr);
}

#[test]
fn core_dumps_are_disabled() {
    let e = env();
    let r = e.run(&[], &["python3", "-c", "import os, resource\nprint(resource.getrlimit(resource.RLIMIT_CORE), flush=True)\nos.abort()"]);
    assert_eq!(r.code, 128 + 6, "{}", r.stderr);
    assert_eq!(r.stdout, "(0, 0)\n");
    let files: Vec<_> = std::fs::read_dir(e.ws.path()).unwrap().collect();
    assert!(files.is_empty(), "a core file appeared: {files:?}");
}

#[test]
fn open_files_are_limited() {
    let e = env_with("[sandbox]\nopen_files = 32\n");
    let r = e.run(
        &[],
        &["python3", "-c", "import errno\nfs = []\ntry:\n  while True: fs.append(open('/dev/null'))\nexcept OSError as e:\n  print(errno.errorcode[e.errno], len(fs) < 32)"],
    );
    assert_eq!(r.stdout, "EMFILE True\n", "{}", r.stderr);
}

#[test]
fn with_cgroups_off_memory_is_bounded_by_the_address_space_limit() {
    let e = env_with("[sandbox]\ncgroup = \"off\"\n");
    let r = e.run(
        &["--memory", "64", "--timeout", "30"],
        &[
            "python3",
            "-c",
            "x = []\ntry:\n  while True: x.append(b'x' * (1 << 20))\nexcept MemoryError:\n  print('MemoryError', len(x) < 64)",
        ],
    );
    assert_eq!(r.stdout, "MemoryError True\n", "{}", r.stderr);
    assert!(!r.stderr.contains("killed"), "{}", r.stderr);
}

#[test]
fn cgroup_required_runs_where_a_cgroup_can_be_made() {
    // This machine lets root create memory+pids cgroups (v1); "required" must then run.
    let e = env_with("[sandbox]\ncgroup = \"required\"\n");
    let r = e.run(&["--max-procs", "8"], &["python3", "-c", "import os, errno\nn = 0\ntry:\n  while True:\n    if os.fork() == 0:\n      import time; time.sleep(30); os._exit(0)\n    n += 1\nexcept OSError as e:\n  print(n < 8, errno.errorcode[e.errno])"]);
    assert_eq!(r.stdout, "True EAGAIN\n", "{}", r.stderr);
}

#[test]
fn killing_the_launcher_kills_the_whole_sandbox() {
    let e = env();
    let marker = format!("chitin-orphan-{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", e.home.path())
        .args(["sandbox", "exec", "--workspace"])
        .arg(e.ws.path())
        .args([
            "--timeout",
            "600",
            "--",
            "python3",
            "-c",
            "import os, time\nos.fork()\ntime.sleep(600)",
        ])
        .arg(&marker)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The launcher, the sandbox init (a fork of it), the command and its child carry the
    // marker: four processes mean the command is running and has forked.
    while survivors(&marker) < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(survivors(&marker) >= 4, "the sandbox never started");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_no_survivors(&marker);
}

#[test]
fn sigterm_to_the_launcher_kills_the_whole_sandbox_and_reports_cancelled() {
    let e = env();
    let marker = format!("300.{}", std::process::id());
    // A daemonized child and the command itself sleep, each with the marker in its argv.
    let script = format!("(setsid sleep {marker} &); touch started; sleep {marker}; touch done");
    let child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", e.home.path())
        .args(["sandbox", "exec", "--capture-json", "65536", "--workspace"])
        .arg(e.ws.path())
        .args(["--timeout", "600", "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Launcher, sandbox init, `sh` and the two `sleep`s carry the marker.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(e.ws.path().join("started").exists() && survivors(&marker) >= 5) {
        assert!(Instant::now() < deadline, "the sandbox never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    // The launcher reports only after the sandbox is gone: nothing with the marker is left.
    assert_eq!(survivors(&marker), 0, "processes survived the cancel");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["killed"], "cancelled", "{report}");
    assert_eq!(report["signal"], 9, "{report}");
    assert!(!e.ws.path().join("done").exists());
}
