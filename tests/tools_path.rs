//! The tool path as the tools run it: `chitin sandbox exec --capture-json` (JSON report) and
//! the sandboxed file helper `chitin __fs-helper`, including requests that bypass the gate's
//! checks, to show the sandbox enforces the workspace boundary on its own.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

struct Env {
    home: tempfile::TempDir,
    ws: tempfile::TempDir,
}

fn env() -> Env {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    Env {
        home: tempfile::tempdir_in(base).unwrap(),
        ws: tempfile::tempdir_in(base).unwrap(),
    }
}

const CHITIN: &str = env!("CARGO_BIN_EXE_chitin");

impl Env {
    /// Runs argv the way `tools::exec` does and returns the launcher's JSON report.
    fn tool(&self, cap: usize, argv: &[&str], stdin: &[u8]) -> Value {
        let mut child = Command::new(CHITIN)
            .env_clear()
            .env("CHITIN_HOME", self.home.path())
            .args(["sandbox", "exec", "--workspace"])
            .arg(self.ws.path())
            .args([
                "--ro",
                CHITIN,
                "--timeout",
                "20",
                "--capture-json",
                &cap.to_string(),
                "--",
            ])
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(stdin);
        let out = child.wait_with_output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Sends one request to the sandboxed file helper, as the file tools do.
    fn helper(&self, req: &Value) -> Value {
        let report = self.tool(
            1 << 20,
            &[CHITIN, "__fs-helper"],
            req.to_string().as_bytes(),
        );
        assert_eq!(report["error"], Value::Null, "{report}");
        serde_json::from_str(report["stdout"].as_str().unwrap().trim()).unwrap()
    }
}

fn err_kind(answer: &Value) -> &str {
    answer["err"]["kind"].as_str().unwrap_or("ok")
}

#[test]
fn the_report_carries_status_output_duration_and_the_kill_reason() {
    let e = env();
    let r = e.tool(
        10,
        &["sh", "-c", "printf 0123456789abcdef; echo e >&2; exit 4"],
        b"",
    );
    assert_eq!(r["exit_code"], 4);
    assert_eq!(r["stdout"], "0123456789");
    assert_eq!(r["stdout_dropped"], 6);
    assert_eq!(r["stderr"], "e\n");
    assert_eq!(r["killed"], Value::Null);
    assert!(r["duration_ms"].as_u64().unwrap() < 20_000);
    let r = e.tool(
        100,
        &[
            "python3",
            "-c",
            "import ctypes; ctypes.CDLL(None).syscall(175, 0, 0, 0)",
        ],
        b"",
    );
    assert_eq!(r["killed"], "seccomp:init_module");
    assert_eq!(r["signal"], 31);
}

#[test]
fn the_report_says_when_the_sandbox_is_unavailable() {
    let e = env();
    let out = Command::new(CHITIN)
        .env_clear()
        .env("CHITIN_HOME", e.home.path())
        .env("CHITIN_SANDBOX_SIMULATE_MISSING", "seccomp")
        .args(["sandbox", "exec", "--workspace"])
        .arg(e.ws.path())
        .args(["--capture-json", "100", "--", "touch", "ran"])
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["error"]["kind"], "unavailable");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing seccomp (simulated)")
    );
    assert!(!e.ws.path().join("ran").exists());
}

#[test]
fn exec_probes_through_the_tool_path_are_refused() {
    let e = env();
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "tool-canary").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o666)).unwrap();
    let probe = format!(
        r#"
import os, errno
def t(name, f):
    try:
        f(); print(name, "OK")
    except OSError as e:
        print(name, errno.errorcode[e.errno])
t("read_outside", lambda: open({s:?}).read())
t("write_outside", lambda: open({s:?}, "a").write("x"))
t("escape_link", lambda: os.link("/etc/passwd", "l"))
t("connect", lambda: __import__("socket").create_connection(("127.0.0.1", 9), timeout=2))
"#,
        s = secret.to_str().unwrap()
    );
    let r = e.tool(4096, &["python3", "-c", &probe], b"");
    assert_eq!(
        r["stdout"],
        "read_outside ENOENT\nwrite_outside ENOENT\nescape_link EXDEV\nconnect EACCES\n",
        "{r}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "tool-canary");
    let r = e.tool(
        100,
        &[
            "python3",
            "-c",
            "import fcntl, termios; fcntl.ioctl(0, termios.TIOCSTI, b'x')",
        ],
        b"",
    );
    assert_eq!(r["killed"], "seccomp:ioctl");
}

#[test]
fn the_helper_round_trips_the_file_tools() {
    let e = env();
    let w = e.helper(
        &json!({"op": "write", "path": "d/f.txt", "content": "alpha beta", "create_dirs": true}),
    );
    assert_eq!(w["ok"]["bytes_written"], 10, "{w}");
    let ed = e.helper(&json!({"op": "edit", "path": "d/f.txt", "old_string": "beta", "new_string": "gamma", "replace_all": false, "max_bytes": 1000}));
    assert_eq!(ed["ok"]["replacements"], 1, "{ed}");
    let r = e.helper(&json!({"op": "read", "path": "d/f.txt", "max_bytes": 1000}));
    assert_eq!(r["ok"]["content"], "alpha gamma");
    let l = e.helper(&json!({"op": "list", "path": "d"}));
    assert_eq!(l["ok"]["entries"][0]["name"], "f.txt");
    assert_eq!(
        std::fs::read_to_string(e.ws.path().join("d/f.txt")).unwrap(),
        "alpha gamma"
    );
}

#[test]
fn the_helper_enforces_the_boundary_even_without_the_gate() {
    let e = env();
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(outside.path().join("s"), "helper-canary").unwrap();
    std::os::unix::fs::symlink(outside.path().join("s"), e.ws.path().join("abs-link")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../../etc/hostname",
        e.ws.path().join("rel-link"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path(), e.ws.path().join("dir-link")).unwrap();
    std::fs::hard_link(outside.path().join("s"), e.ws.path().join("hard")).unwrap();
    for (req, kind) in [
        (
            json!({"op": "read", "path": "abs-link", "max_bytes": 100}),
            "symlink_escape",
        ),
        (
            json!({"op": "read", "path": "rel-link", "max_bytes": 100}),
            "symlink_escape",
        ),
        (
            json!({"op": "read", "path": "dir-link/s", "max_bytes": 100}),
            "symlink_escape",
        ),
        (json!({"op": "list", "path": "dir-link"}), "symlink_escape"),
        (
            json!({"op": "read", "path": "hard", "max_bytes": 100}),
            "hardlink",
        ),
        (
            json!({"op": "write", "path": "abs-link", "content": "x", "create_dirs": false}),
            "symlink_escape",
        ),
        (
            json!({"op": "write", "path": "dir-link/new", "content": "x", "create_dirs": false}),
            "symlink_escape",
        ),
        (
            json!({"op": "read", "path": "../x", "max_bytes": 100}),
            "invalid",
        ),
        (
            json!({"op": "read", "path": "/etc/passwd", "max_bytes": 100}),
            "invalid",
        ),
        (
            json!({"op": "read", "path": "x", "max_bytes": 100, "approved": true}),
            "invalid",
        ),
    ] {
        let a = e.helper(&req);
        assert_eq!(err_kind(&a), kind, "{req} -> {a}");
    }
    assert_eq!(
        std::fs::read_to_string(outside.path().join("s")).unwrap(),
        "helper-canary"
    );
    assert!(!outside.path().join("new").exists());
}
