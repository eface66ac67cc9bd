//! Telegram through the real `chitin gateway` binary, against the fake Bot API server of
//! `chitin-channels` and a zero-latency fake model on loopback: the gateway's CPU per inbound
//! message (admission, persistence with its fsyncs, the turn, the reply through the outbox),
//! the latency from an update being offered to `getUpdates` to its reply's `sendMessage`
//! (p50/p99, one message at a time), and sustained messages/s across 100 conversations.
//!
//! `cargo bench --bench channels` prints the numbers for BENCHMARKS.md. Under `cargo test
//! --all-targets` (no `--bench` argument) it does a short smoke run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark driver: a failure is a panic with the gateway log"
)]

#[path = "support/stats.rs"]
mod stats;
use stats::*;

#[path = "../tests/support/gateway.rs"]
mod harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, Reply, Step};
use chitin_channels::telegram::fake::{FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN};
use harness::{Gw, PASS};
use serde_json::Value;

const ANSWER: &str = "ok from the model";

fn until<T>(what: &str, gw: &Gw, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; gateway log:\n{}",
            std::fs::read_to_string(gw.root.join("gateway.log")).unwrap_or_default()
        );
        // The poll interval bounds the latency resolution (reported with the results).
        std::thread::sleep(Duration::from_micros(250));
    }
}

fn answers(tg: &FakeTelegram) -> usize {
    tg.sent().iter().filter(|m| m.text == ANSWER).count()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (serial, convs, rounds) = if full { (300, 100, 10) } else { (3, 3, 1) };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt.block_on(FakeOpenAi::start(Vec::new())).unwrap();
    model.set_fallback(Step::Reply(Reply::text([ANSWER])));
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:tg_token\"\napi_base = \"http://{}\"\nmode = \"polling\"\n",
        model.base_url(),
        tg.addr()
    );
    let mut gw = Gw::start(&cfg);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["secrets", "set", "tg_token", "--audience", "127.0.0.1"])
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(TOKEN.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    gw.spawn();
    let pid = gw.child.as_ref().unwrap().id().to_string();

    // Alice pairs with the owner; then every conversation is a group in which she mentions
    // the bot (admitted by `admission.groups-need-mention`), one session per group.
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let code = until("a pairing request", &gw, || {
        let out = gw.chitin(&["pairing", "list", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v[0]["code"].as_str().map(str::to_string)
    });
    assert!(gw.chitin(&["pairing", "approve", &code]).status.success());
    until("the pairing notice", &gw, || {
        tg.sent()
            .iter()
            .any(|m| m.text.starts_with("Paired:"))
            .then_some(())
    });
    let groups: Vec<FakeChat> = (0..convs)
        .map(|i| FakeChat::group(-7000 - i64::from(i), &format!("g{i}")))
        .collect();
    let ask = |g: &FakeChat, n: usize| {
        tg.push_message(MessageBuilder::text(
            g,
            &alice,
            &format!("@chitin_test_bot question {n}"),
        ))
    };
    // Warm-up: one turn in every conversation (sessions created, connections open).
    for (n, g) in groups.iter().enumerate() {
        ask(g, n);
    }
    until("the warm-up answers", &gw, || {
        (answers(&tg) >= groups.len()).then_some(())
    });

    // 1. One message at a time: latency from the update being offered to its reply's
    //    sendMessage, and the gateway's CPU per message.
    let mut lat = Vec::with_capacity(serial);
    let done = answers(&tg);
    let cpu0 = cpu_seconds_of(&pid);
    for n in 0..serial {
        let g = &groups[n % groups.len()];
        let t0 = Instant::now();
        let asked = ask(g, n);
        until("the answer", &gw, || {
            tg.sent()
                .iter()
                .any(|m| m.chat_id == g.id && m.reply_to == Some(asked.message_id))
                .then_some(())
        });
        lat.push(t0.elapsed());
    }
    let serial_cpu = cpu_seconds_of(&pid) - cpu0;
    assert_eq!(answers(&tg), done + serial);
    lat.sort();

    // 2. Sustained: `rounds` messages in each of the conversations, all offered at once.
    let total = convs as usize * rounds;
    let done = answers(&tg);
    let cpu0 = cpu_seconds_of(&pid);
    let t0 = Instant::now();
    for r in 0..rounds {
        for g in &groups {
            ask(g, r);
        }
    }
    until("the sustained answers", &gw, || {
        (answers(&tg) >= done + total).then_some(())
    });
    let wall = t0.elapsed();
    let sustained_cpu = cpu_seconds_of(&pid) - cpu0;
    assert_eq!(answers(&tg), done + total, "a reply was sent twice");

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "channels (Telegram, fake Bot API + zero-latency fake model), {serial} serial messages:"
    );
    println!(
        "  update -> sendMessage  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99)),
        ms(pct(&lat, 1.0))
    );
    println!(
        "  gateway CPU per message (serial)     {:.2} ms",
        serial_cpu * 1e3 / serial as f64
    );
    println!("sustained, {convs} conversations x {rounds} messages = {total}:");
    println!(
        "  {:.0} messages/s  (wall {:.2} s)  gateway CPU per message {:.2} ms",
        total as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        sustained_cpu * 1e3 / total as f64
    );
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    drop(rt);
}
