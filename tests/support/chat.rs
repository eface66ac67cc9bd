//! What the chat-channel tests through the real gateway binary share: waiting on a condition
//! with a generous deadline, storing a channel credential, reading `chitin channels status`
//! and pairing an identity through the CLI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "tests"
)]

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::harness::{Gw, PASS};

/// Waits (generous deadline: a loaded machine) until `f` returns `Some`.
pub fn until<T>(what: &str, gw: &Gw, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; gateway log:\n{}",
            std::fs::read_to_string(gw.root.join("gateway.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `chitin secrets set NAME --audience AUDIENCE` with `value` on stdin.
pub fn set_secret(gw: &Gw, name: &str, audience: &str, value: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["secrets", "set", name, "--audience", audience])
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `chitin channels status --json`, the entry of channel `name`.
pub fn status_of(gw: &Gw, name: &str) -> Value {
    let out = gw.chitin(&["channels", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["channel"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Approves the one open pairing code through the CLI (as `user`, default the owner).
pub fn approve_open_pairing(gw: &Gw, user: Option<&str>) -> String {
    let out = gw.chitin(&["pairing", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = pending.as_array().unwrap();
    assert_eq!(list.len(), 1, "{pending}");
    let code = list[0]["code"].as_str().unwrap().to_string();
    let mut args = vec!["pairing", "approve", code.as_str()];
    if let Some(u) = user {
        args.extend(["--user", u]);
    }
    let out = gw.chitin(&args);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    list[0]["identity"].as_str().unwrap().to_string()
}
