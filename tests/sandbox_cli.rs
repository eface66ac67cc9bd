//! The `chitin sandbox` CLI contract: `check` JSON and exit codes, `exec` pass-through,
//! fail-closed refusal, named egress, and ordinary programs working inside the workspace.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

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

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Env {
    fn cmd(&self, flags: &[&str], argv: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
        c.env("CHITIN_HOME", self.home.path())
            .args(["sandbox", "exec", "--workspace"])
            .arg(self.ws.path())
            .args(flags)
            .arg("--")
            .args(argv);
        c
    }
    fn run(&self, flags: &[&str], argv: &[&str]) -> Run {
        let out = self.cmd(flags, argv).output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

#[test]
fn check_prints_the_contract_json_and_exits_zero_with_full_enforcement() {
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["sandbox", "check"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "enforced",
            "etc",
            "identity",
            "landlock_abi",
            "missing",
            "net_ns",
            "pid_ns",
            "seccomp",
            "unix_sockets",
            "user_ns"
        ]
    );
    // The tests run as root: the report says tools would not.
    assert_eq!(v["identity"]["launcher_euid"], 0, "{v}");
    assert_ne!(v["identity"]["host_uid"], 0, "{v}");
    assert_ne!(v["identity"]["host_gid"], 0, "{v}");
    assert!(
        v["identity"]["workspace"]
            .as_str()
            .unwrap()
            .starts_with("id-mapped"),
        "{v}"
    );
    let etc: Vec<&str> = v["etc"]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(etc.contains(&"/etc/ssl/certs"), "{etc:?}");
    for never in [
        "/etc/ssl",
        "/etc/ssl/private",
        "/etc/shadow",
        "/etc/gshadow",
    ] {
        assert!(!etc.contains(&never), "{never} in {etc:?}");
    }
    // This machine (Linux 6.18, landlock ABI 7) gives full enforcement.
    assert!(v["landlock_abi"].as_i64().unwrap() >= 3);
    assert_eq!(v["seccomp"], true);
    assert_eq!(v["user_ns"], true);
    assert_eq!(v["pid_ns"], true);
    assert_eq!(v["net_ns"], true);
    assert_eq!(v["enforced"], true);
    assert_eq!(v["missing"], serde_json::json!([]));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn check_exits_one_and_names_the_missing_layer() {
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_SANDBOX_SIMULATE_MISSING", "landlock")
        .args(["sandbox", "check"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["enforced"], false);
    assert_eq!(v["missing"], serde_json::json!(["landlock (simulated)"]));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn exec_refuses_to_run_when_a_layer_is_missing() {
    let e = env();
    for layer in ["landlock", "seccomp", "user namespaces"] {
        let out = e
            .cmd(&[], &["touch", "ran"])
            .env("CHITIN_SANDBOX_SIMULATE_MISSING", layer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(
            err.contains(&format!("sandbox unavailable: missing {layer} (simulated)")),
            "{err}"
        );
        assert!(
            !e.ws.path().join("ran").exists(),
            "the program ran unconfined"
        );
    }
}

#[test]
fn exit_status_and_output_pass_through() {
    let e = env();
    let r = e.run(&[], &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(
        (r.code, r.stdout.as_str(), r.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    let r = e.run(&["--timeout", "18446744073709551615"], &["true"]);
    assert_eq!(r.code, 0, "a huge timeout is not an overflow: {}", r.stderr);
    let r = e.run(&[], &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(r.code, 128 + 15);
    assert_eq!(r.stderr, "", "a plain signal is not a sandbox kill");
    let out = e
        .cmd(&[], &["cat"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(b"stdin passes through")?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.stdout, b"stdin passes through");
}

#[test]
fn a_missing_program_exits_127_with_a_clear_message() {
    let e = env();
    let r = e.run(&[], &["no-such-program-xyz"]);
    assert_eq!(r.code, 127);
    assert!(
        r.stderr
            .contains("cannot execute no-such-program-xyz in the sandbox"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_flags_are_rejected_with_a_clear_error() {
    let e = env();
    let r = e.run(&["--net", "none", "--net", "localhost:80"], &["true"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("--net none cannot be combined"),
        "{}",
        r.stderr
    );
    let r = e.run(&["--net", "10.0.0.1:80"], &["true"]);
    assert!(
        r.stderr
            .contains("IP-literal destinations must be loopback"),
        "{}",
        r.stderr
    );
    let r = e.run(&["--env", "BAD KEY=1"], &["true"]);
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("environment key"), "{}", r.stderr);
    let r = e.run(&["--ro", "/nonexistent/path"], &["true"]);
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("cannot be resolved"), "{}", r.stderr);
    let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["sandbox", "exec", "--workspace", "/tmp", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "PROGRAM must come after --");
}

fn server() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        for c in l.incoming().take(4) {
            let Ok(mut c) = c else { break };
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).unwrap_or(0);
            let mut reply = b"hello ".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = c.write_all(&reply);
        }
    });
    (port, h)
}

#[test]
fn named_egress_reaches_only_the_granted_destination() {
    let e = env();
    let (allowed, _h1) = server();
    let (other, _h2) = server();
    let probe = format!(
        r#"
import socket, errno
def talk(host, port):
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b'sbx'); print(host, port, s.recv(64).decode())
    except OSError as e:
        print(host, port, errno.errorcode[e.errno])
talk('127.0.0.1', {allowed})
talk('localhost', {allowed})
talk('127.0.0.1', {other})
"#
    );
    let r = e.run(
        &[
            "--net",
            &format!("127.0.0.1:{allowed}"),
            "--net",
            &format!("localhost:{allowed}"),
        ],
        &["python3", "-c", &probe],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        format!(
            "127.0.0.1 {allowed} hello sbx\nlocalhost {allowed} hello sbx\n127.0.0.1 {other} EACCES\n"
        )
    );
    // Without a grant, even the allowed server is unreachable.
    let r = e.run(&[], &["python3", "-c", &probe]);
    assert!(
        r.stdout.contains(&format!("127.0.0.1 {allowed} EACCES")),
        "{}",
        r.stdout
    );
}

#[test]
fn a_named_host_is_pinned_in_the_sandbox_hosts_file() {
    let e = env();
    let r = e.run(
        &["--net", "api.example.test:443"],
        &["sh", "-c", "grep example /etc/hosts; cat /etc/resolv.conf"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.starts_with("127.0.0.10 api.example.test\n"),
        "{}",
        r.stdout
    );
}

#[test]
fn ordinary_programs_work_inside_the_workspace() {
    let e = env();
    let script = r#"
set -e
mkdir -p src && echo 'b
a' > src/x.txt
sort src/x.txt | tr '\n' ' '; echo
cp src/x.txt y.txt && mv y.txt z.txt && wc -l < z.txt && rm z.txt
ls src
echo tmp > /tmp/t && cat /tmp/t
python3 -c 'import json, sqlite3, hashlib; print(json.dumps({"ok": hashlib.sha256(b"x").hexdigest()[:8]}))'
git init -q repo && cd repo && echo hi > f && git add f
git -c user.name=t -c user.email=t@t commit -qm init && git log --oneline | wc -l
"#;
    let r = e.run(&[], &["sh", "-c", script]);
    assert_eq!(r.code, 0, "stdout {} stderr {}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "a b \n2\nx.txt\ntmp\n{\"ok\": \"2d711642\"}\n1\n");
    assert!(e.ws.path().join("repo/.git").is_dir());
}

#[test]
fn extra_read_only_and_read_write_paths_are_bound() {
    let e = env();
    let ro = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let rw = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(ro.path().join("data"), "ro-data").unwrap();
    let script = format!(
        "cat {ro}/data; echo; touch {ro}/new 2>&1 | grep -o 'Read-only file system'; echo w > {rw}/out",
        ro = ro.path().display(),
        rw = rw.path().display()
    );
    let r = e.run(
        &[
            "--ro",
            ro.path().to_str().unwrap(),
            "--rw",
            rw.path().to_str().unwrap(),
        ],
        &["sh", "-c", &script],
    );
    assert_eq!(r.stdout, "ro-data\nRead-only file system\n", "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(rw.path().join("out")).unwrap(),
        "w\n"
    );
    assert!(!ro.path().join("new").exists());
}

#[test]
fn a_real_missing_layer_fails_closed_naming_it() {
    // Inside a sandbox, unshare is denied: a nested launcher meets a kernel that "lacks"
    // namespaces and must refuse instead of running the program unconfined.
    let e = env();
    let chitin = env!("CARGO_BIN_EXE_chitin");
    let ws = e.ws.path().to_str().unwrap().to_string();
    let r = e.run(
        &["--ro", chitin, "--env", "CHITIN_HOME=/nonexistent-state"],
        &[
            chitin,
            "sandbox",
            "exec",
            "--workspace",
            &ws,
            "--",
            "touch",
            "nested-ran",
        ],
    );
    assert_eq!(r.code, 125, "stdout {} stderr {}", r.stdout, r.stderr);
    assert!(
        r.stderr.contains("sandbox setup failed at namespaces")
            && r.stderr.contains("Operation not permitted"),
        "{}",
        r.stderr
    );
    assert!(!e.ws.path().join("nested-ran").exists());
}
