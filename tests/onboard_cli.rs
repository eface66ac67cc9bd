//! `chitin onboard`, driven as a script would (flags, `--non-interactive`) and as a person
//! would (questions on a pseudo-terminal, through util-linux `script`), against a fake
//! OpenAI-compatible provider on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;
#[path = "support/home.rs"]
mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use harness::free_port;

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

/// `chitin onboard` on a pseudo-terminal (util-linux `script`): questions are read as they
/// appear, answers typed when asked.
struct Tty {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    rx: mpsc::Receiver<Vec<u8>>,
    /// Output not yet matched by `expect`.
    unseen: String,
    /// Everything the terminal showed.
    all: String,
    deadline: Instant,
}

impl Tty {
    fn start(home: &Path) -> Self {
        Self::start_with(home, &[])
    }

    /// `chitin onboard ARGS` (flags given are not asked; `script` runs it through `sh -c`, so
    /// the arguments must be shell-safe words).
    fn start_with(home: &Path, args: &[&str]) -> Self {
        let cmd = format!(
            "{} onboard {}",
            env!("CARGO_BIN_EXE_chitin"),
            args.join(" ")
        );
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
        let stdin = child.stdin.take();
        Self {
            child,
            stdin,
            rx,
            unseen: String::new(),
            all: String::new(),
            deadline: Instant::now() + Duration::from_secs(180),
        }
    }

    /// Waits until the terminal shows `text`.
    fn expect(&mut self, text: &str) {
        while !self.unseen.contains(text) {
            let left = self.deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "never shown {text:?}; the terminal shows:\n{}",
                self.all
            );
            match self.rx.recv_timeout(left) {
                Ok(chunk) => {
                    let t = String::from_utf8_lossy(&chunk);
                    self.unseen.push_str(&t);
                    self.all.push_str(&t);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("onboard ended before showing {text:?}:\n{}", self.all)
                }
            }
        }
        let at = self.unseen.find(text).unwrap() + text.len();
        self.unseen = self.unseen[at..].to_string();
    }

    fn answer(&mut self, prompt: &str, answer: &str) {
        self.expect(prompt);
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(format!("{answer}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Reads the rest until the program ends; the whole transcript and the exit status.
    fn finish(mut self) -> (String, std::process::ExitStatus) {
        loop {
            match self
                .rx
                .recv_timeout(self.deadline.saturating_duration_since(Instant::now()))
            {
                Ok(chunk) => self.all.push_str(&String::from_utf8_lossy(&chunk)),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("onboard did not finish:\n{}", self.all)
                }
            }
        }
        drop(self.stdin.take());
        (self.all, self.child.wait().unwrap())
    }
}

fn onboard_on_a_terminal(
    home: &Path,
    answers: &[(&str, &str)],
) -> (String, std::process::ExitStatus) {
    let mut tty = Tty::start(home);
    for (prompt, answer) in answers {
        tty.answer(prompt, answer);
    }
    tty.finish()
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
            (
                "A chat channel now (telegram, slack, discord, none) [none]: ",
                "",
            ),
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

#[test]
fn onboarding_adds_a_telegram_bot_and_pairs_the_first_person_who_writes_to_it() {
    use chitin_channels::telegram::fake::{
        FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::text("OK")]))
        .unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let (_t, home) = fresh_home();
    assert!(chitin(&home, &["init"], &[]).status.success());
    // The bot's API root is the fake's (as with a self-hosted Bot API server); everything else
    // is asked on the terminal.
    let api = format!("http://{}", tg.addr());
    let mut tty = Tty::start_with(&home, &["--channel-api-base", &api]);
    tty.answer("Model provider (anthropic, openai, ollama): ", "openai");
    tty.answer("API root [https://api.openai.com/v1]: ", &model.base_url());
    tty.answer("Model [gpt-4o-mini]: ", "m1");
    tty.answer("API key for 127.0.0.1 (not shown): ", "sk-onboard-telegram");
    tty.answer(
        "A chat channel now (telegram, slack, discord, none) [none]: ",
        "telegram",
    );
    tty.answer("Telegram bot token (from @BotFather) (not shown): ", TOKEN);
    tty.answer("Daily budget per user in USD (0: no limit) [0]: ", "0");
    tty.expect("Start the gateway in another terminal");
    // As the person would: start the gateway, write to the bot, read the code it answers.
    let port = free_port();
    let mut gateway = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--port", &port.to_string()])
        .env("CHITIN_HOME", &home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let code = loop {
        if let Some(m) = tg.sent().into_iter().find(|m| m.chat_id == dm.id) {
            let o = chitin(&home, &["pairing", "list", "--json"], &[]);
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let code = v[0]["code"].as_str().unwrap().to_string();
            assert!(m.text.contains(&code), "{}", m.text);
            break code;
        }
        assert!(Instant::now() < deadline, "the bot sent no pairing code");
        std::thread::sleep(Duration::from_millis(100));
    };
    tty.answer("Pairing code (Enter to skip): ", &code);
    let (all, status) = tty.finish();
    let _ = Command::new("kill").arg(gateway.id().to_string()).status();
    let _ = gateway.wait();
    assert!(status.success(), "{all}");
    assert!(all.contains("telegram:4242"), "{all}");
    let c = config(&home);
    assert_eq!(c.channels.len(), 1);
    assert_eq!(c.channels[0].name, "telegram");
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(raw.contains("token = \"secret:telegram_token\""), "{raw}");
    assert!(!raw.contains(TOKEN));
    let o = chitin(&home, &["pairing", "list", "--json"], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

fn gateway(home: &Path, port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--port", &port.to_string()])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn stop(mut gateway: std::process::Child) {
    let _ = Command::new("kill").arg(gateway.id().to_string()).status();
    let _ = gateway.wait();
}

/// Polls `f` until it gives a value (a generous deadline: the machine may be busy).
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn open_pairing_code(home: &Path) -> Option<String> {
    let o = chitin(home, &["pairing", "list", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    v[0]["code"].as_str().map(str::to_string)
}

fn secrets_json(home: &Path) -> String {
    let o = chitin(home, &["secrets", "list", "--json"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn non_interactive_onboarding_adds_a_slack_app_in_socket_mode_that_pairs_its_first_user() {
    use chitin_channels::slack::fake::{
        APP_TOKEN, BOT_TOKEN, FakeChannel, FakeSlack, FakeUser, MessageBuilder,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::text("OK")]))
        .unwrap();
    let slack = rt.block_on(FakeSlack::start()).unwrap();
    let (_t, home) = fresh_home();
    let api = slack.api_base().to_string();
    let o = chitin(
        &home,
        &[
            "onboard",
            "--non-interactive",
            "--provider",
            "openai",
            "--base-url",
            &model.base_url(),
            "--api-key-env",
            "ONBOARD_KEY",
            "--model",
            "m1",
            "--channel",
            "slack",
            "--channel-token-env",
            "SLACK_BOT",
            "--slack-app-token-env",
            "SLACK_APP",
            "--channel-api-base",
            &api,
        ],
        &[
            ("ONBOARD_KEY", "sk-onboard-slack"),
            ("SLACK_BOT", BOT_TOKEN),
            ("SLACK_APP", APP_TOKEN),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("pair later: message the bot on slack"),
        "{}",
        text(&o)
    );
    let c = config(&home);
    assert_eq!(c.channels.len(), 1);
    assert_eq!(c.channels[0].name, "slack");
    assert_eq!(c.channels[0].kind.as_str(), "slack");
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(
        raw.contains("kind = \"slack\"\nbot_token = \"secret:slack_bot_token\"\napp_token = \"secret:slack_app_token\"\nmode = \"socket\"\n"),
        "{raw}"
    );
    assert!(!raw.contains(BOT_TOKEN) && !raw.contains(APP_TOKEN));
    // Both tokens are stored for the API host only.
    let list = secrets_json(&home);
    for name in ["slack_bot_token", "slack_app_token"] {
        let line = list
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(line.contains("127.0.0.1"), "{line}");
    }
    // The gateway connects with them; the first person to write gets a code, approved here.
    let gw = gateway(&home, free_port());
    until("the channel connected", || {
        let o = chitin(&home, &["status", "--json"], &[]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v["channels"][0]["state"] == "connected").then_some(())
    });
    let alice = FakeUser::new("U0ALICE001", "Alice");
    let dm = FakeChannel::dm("D0ALICE001");
    let hello = slack.message(MessageBuilder::text(&dm, &alice, "hello bot"));
    slack.push_event(&hello.body);
    let code = until("the pairing code", || open_pairing_code(&home));
    until("the code posted to Alice", || {
        slack
            .posted()
            .into_iter()
            .find(|p| p.channel == dm.id && p.text.contains(&code))
    });
    let o = chitin(&home, &["pairing", "approve", &code], &[]);
    stop(gw);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("slack:U0ALICE001"), "{}", text(&o));
}

#[test]
fn onboarding_a_slack_app_with_the_events_api_stores_the_signing_secret_and_says_where_slack_posts()
{
    use chitin_channels::slack::fake::{BOT_TOKEN, SIGNING_SECRET};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::text("OK")]))
        .unwrap();
    let (_t, home) = fresh_home();
    let o = chitin(
        &home,
        &[
            "onboard",
            "--non-interactive",
            "--provider",
            "openai",
            "--base-url",
            &model.base_url(),
            "--api-key-env",
            "ONBOARD_KEY",
            "--model",
            "m1",
            "--channel",
            "slack",
            "--channel-name",
            "work",
            "--slack-mode",
            "events",
            "--channel-token-env",
            "SLACK_BOT",
            "--slack-signing-secret-env",
            "SLACK_SIGN",
        ],
        &[
            ("ONBOARD_KEY", "sk-onboard-slack"),
            ("SLACK_BOT", BOT_TOKEN),
            ("SLACK_SIGN", SIGNING_SECRET),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("/channels/work/events"), "{}", text(&o));
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(
        raw.contains("name = \"work\"\nkind = \"slack\"\nbot_token = \"secret:work_bot_token\"\nsigning_secret = \"secret:work_signing_secret\"\nmode = \"events\"\n"),
        "{raw}"
    );
    assert!(!raw.contains(SIGNING_SECRET));
    let list = secrets_json(&home);
    for name in ["work_bot_token", "work_signing_secret"] {
        let line = list
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{list}"));
        assert!(line.contains("slack.com"), "{line}");
    }
}

#[test]
fn a_slack_token_of_the_wrong_kind_is_refused_before_anything_is_written() {
    use chitin_channels::slack::fake::APP_TOKEN;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::text("OK")]))
        .unwrap();
    let (_t, home) = fresh_home();
    assert!(chitin(&home, &["init"], &[]).status.success());
    let before = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    // A user token (xoxp-) where the bot token (xoxb-) belongs.
    let o = chitin(
        &home,
        &[
            "onboard",
            "--non-interactive",
            "--provider",
            "openai",
            "--base-url",
            &model.base_url(),
            "--api-key-env",
            "ONBOARD_KEY",
            "--model",
            "m1",
            "--channel",
            "slack",
            "--channel-token-env",
            "SLACK_BOT",
            "--slack-app-token-env",
            "SLACK_APP",
        ],
        &[
            ("ONBOARD_KEY", "sk-onboard-slack"),
            ("SLACK_BOT", "xoxp-1-user-token-pasted-by-mistake"),
            ("SLACK_APP", APP_TOKEN),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("Slack: channel configuration: the bot token is not of the form xoxb-"),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("user-token-pasted"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(home.join("chitin.toml")).unwrap(),
        before
    );
    let list = secrets_json(&home);
    assert!(
        !list.contains("slack_") && !list.contains("openai_key"),
        "{list}"
    );
}

#[test]
fn onboarding_adds_a_discord_bot_on_a_terminal_and_pairs_the_first_person_who_writes_to_it() {
    use chitin_channels::discord::fake::{
        FakeChannel, FakeDiscord, FakeUser, MessageBuilder, TOKEN,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::text("OK")]))
        .unwrap();
    let dc = rt.block_on(FakeDiscord::start()).unwrap();
    let (_t, home) = fresh_home();
    assert!(chitin(&home, &["init"], &[]).status.success());
    let api = dc.api_base().to_string();
    let mut tty = Tty::start_with(&home, &["--channel-api-base", &api]);
    tty.answer("Model provider (anthropic, openai, ollama): ", "openai");
    tty.answer("API root [https://api.openai.com/v1]: ", &model.base_url());
    tty.answer("Model [gpt-4o-mini]: ", "m1");
    tty.answer("API key for 127.0.0.1 (not shown): ", "sk-onboard-discord");
    tty.answer(
        "A chat channel now (telegram, slack, discord, none) [none]: ",
        "discord",
    );
    tty.answer(
        "Discord bot token (Developer Portal, Bot; enable the Message Content intent) (not shown): ",
        TOKEN,
    );
    tty.answer("Daily budget per user in USD (0: no limit) [0]: ", "0");
    tty.expect("Start the gateway in another terminal");
    let gw = gateway(&home, free_port());
    assert!(rt.block_on(dc.wait_ready()), "the gateway never identified");
    let alice = FakeUser::new("200000000000000001", "alice");
    let dm = FakeChannel::dm("300000000000000001");
    dc.add_channel(&dm);
    dc.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let code = until("the pairing code", || open_pairing_code(&home));
    until("the code sent to alice", || {
        dc.sent()
            .into_iter()
            .find(|m| m.channel_id == dm.id && m.content.contains(&code))
    });
    tty.answer("Pairing code (Enter to skip): ", &code);
    let (all, status) = tty.finish();
    stop(gw);
    assert!(status.success(), "{all}");
    assert!(all.contains("discord:200000000000000001"), "{all}");
    let raw = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    assert!(
        raw.contains("kind = \"discord\"\ntoken = \"secret:discord_token\"\n"),
        "{raw}"
    );
    assert!(!raw.contains(TOKEN));
    let o = chitin(&home, &["pairing", "list", "--json"], &[]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}
