//! `chitin onboard`, driven as a script would (flags, `--non-interactive`) and as a person
//! would (questions on a pseudo-terminal, through util-linux `script`), against a fake
//! OpenAI-compatible provider on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};

const PASS: &str = "onboard-pass";

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

/// A state dir whose config is the documented template (as `chitin init` writes it), with the
/// test's cheap passphrase settings.
fn fresh_home() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = support::private_home(t.path(), "home");
    let template = chitin::config::default_toml()
        .replace("backend = \"auto\"", "backend = \"passphrase\"")
        .replace("scrypt_work_factor = 18", "scrypt_work_factor = 16");
    std::fs::remove_file(home.join("chitin.toml")).unwrap();
    support::write_private(&home.join("chitin.toml"), template.as_bytes());
    (t, home)
}

fn chitin(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
    c.args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn config(home: &Path) -> chitin::config::Config {
    let p = home.join("chitin.toml");
    chitin::config::Config::parse(&std::fs::read_to_string(&p).unwrap(), &p).unwrap()
}

#[test]
fn non_interactive_onboarding_tests_the_key_then_writes_the_config_and_stores_the_key() {
    let (_rt, s) = fake(vec![Step::text("OK")]);
    let (_t, home) = fresh_home();
    let o = chitin(
        &home,
        &[
            "onboard",
            "--non-interactive",
            "--provider",
            "openai",
            "--base-url",
            &s.base_url(),
            "--api-key-env",
            "ONBOARD_KEY",
            "--model",
            "m1",
            "--budget-usd",
            "5",
        ],
        &[("ONBOARD_KEY", "sk-onboard-test-key")],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("key test passed"), "{}", text(&o));
    // The test request carried the key to the provider.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].header("authorization"),
        Some("Bearer sk-onboard-test-key")
    );
    let c = config(&home);
    assert_eq!(c.agent.model, "openai/m1");
    assert_eq!(c.budgets.daily_usd_per_user, 5.0);
    assert_eq!(c.providers.len(), 1);
    assert_eq!(
        c.providers[0].base_url.as_deref(),
        Some(s.base_url().as_str())
    );
    // The template's comments are kept; the key is only a reference.
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(raw.contains("# The model the agent uses"));
    assert!(raw.contains("api_key = \"secret:openai_key\""));
    assert!(!raw.contains("sk-onboard-test-key"));
    let o = chitin(&home, &["secrets", "list", "--json"], &[]);
    let list = text(&o);
    assert!(
        list.contains("openai_key") && list.contains("127.0.0.1"),
        "{list}"
    );
    // The agent now answers with that model, key through the gate.
    s.push(Step::text("hello from m1"));
    let o = chitin(&home, &["agent", "-m", "hi"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "hello from m1");
}

#[test]
fn a_failing_key_test_writes_nothing() {
    let (_rt, s) = fake(vec![Step::status(401)]);
    let (_t, home) = fresh_home();
    let before = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    let o = chitin(
        &home,
        &[
            "onboard",
            "--non-interactive",
            "--provider",
            "openai",
            "--base-url",
            &s.base_url(),
            "--api-key-env",
            "ONBOARD_KEY",
            "--model",
            "m1",
        ],
        &[("ONBOARD_KEY", "sk-wrong")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("key test failed"), "{}", text(&o));
    assert!(text(&o).contains("HTTP 401"), "{}", text(&o));
    assert!(!text(&o).contains("sk-wrong"));
    assert_eq!(
        std::fs::read_to_string(home.join("chitin.toml")).unwrap(),
        before
    );
    let o = chitin(&home, &["secrets", "list", "--json"], &[]);
    assert!(!text(&o).contains("openai_key"), "{}", text(&o));
}

#[test]
fn without_a_terminal_or_flags_onboard_says_what_to_pass() {
    let (_t, home) = fresh_home();
    let o = chitin(&home, &["onboard"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--non-interactive"), "{}", text(&o));
    let o = chitin(&home, &["onboard", "--non-interactive"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--provider is required"), "{}", text(&o));
}

/// `chitin onboard` on a pseudo-terminal (`script`), answering each question when it is
/// asked; returns the whole terminal transcript and the exit status.
fn onboard_on_a_terminal(
    home: &Path,
    answers: &[(&str, &str)],
) -> (String, std::process::ExitStatus) {
    let cmd = format!("{} onboard", env!("CARGO_BIN_EXE_chitin"));
    let mut child = Command::new("script")
        .args(["-q", "-f", "-e", "-c", &cmd, "/dev/null"])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut stdin = child.stdin.take().unwrap();
    let mut seen = String::new();
    let mut all = String::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    for (prompt, answer) in answers {
        // Wait for the question, then answer it.
        while !seen.contains(prompt) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "never asked {prompt:?}; the terminal shows:\n{seen}"
            );
            if let Ok(chunk) = rx.recv_timeout(left) {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                all.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
        // What comes after this question is looked at for the next one.
        let at = seen.find(prompt).unwrap() + prompt.len();
        seen = seen[at..].to_string();
        stdin.write_all(format!("{answer}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    // The rest of the transcript until the program ends.
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(chunk) => all.push_str(&String::from_utf8_lossy(&chunk)),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("onboard did not finish:\n{all}"),
        }
    }
    drop(stdin);
    (all, child.wait().unwrap())
}

#[test]
fn interactive_onboarding_on_a_terminal_asks_each_question_and_writes_the_answers() {
    let (_rt, s) = fake(vec![Step::text("OK")]);
    let (_t, home) = fresh_home();
    // init first, so the terminal session has no passphrase questions.
    assert!(chitin(&home, &["init"], &[]).status.success());
    let base = s.base_url();
    let (rest, status) = onboard_on_a_terminal(
        &home,
        &[
            ("Model provider (anthropic, openai, ollama): ", "openai"),
            ("API root [https://api.openai.com/v1]: ", &base),
            ("Model [gpt-4o-mini]: ", "m2"),
            ("API key for 127.0.0.1 (not shown): ", "sk-typed-on-a-tty"),
            ("A chat channel now (telegram, none) [none]: ", ""),
            ("Daily budget per user in USD (0: no limit) [0]: ", "2.5"),
        ],
    );
    assert!(status.success(), "{rest}");
    assert!(rest.contains("key test passed"), "{rest}");
    // (Whether the terminal echoed the key is not asserted: the prompt is printed before
    // echo is turned off, and a fast typist can beat that; the key is read either way.)
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(!raw.contains("sk-typed-on-a-tty"));
    assert_eq!(
        s.requests()[0].header("authorization"),
        Some("Bearer sk-typed-on-a-tty")
    );
    let c = config(&home);
    assert_eq!(c.agent.model, "openai/m2");
    assert_eq!(c.budgets.daily_usd_per_user, 2.5);
}
