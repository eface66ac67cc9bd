//! Every chat platform through the real `chitin gateway` binary, against the loopback fakes of
//! `chitin-channels` and a zero-latency fake model: the gateway's CPU per inbound message
//! (one message at a time in a paired direct conversation: admission, persistence with its
//! fsyncs, the turn, the reply through the outbox) for Slack (Events API and Socket Mode),
//! Discord, WhatsApp, Signal and Matrix, and the time from a dropped socket to the answer of a
//! message sent right after the drop (Discord's gateway, Slack's Socket Mode). Telegram has
//! its own bench (`channels`, 100 conversations); here it runs the same way as the others, as
//! the baseline. Every platform's messages go to one conversation, so its history grows over
//! the run (the agent's context cost per turn grows with it: issue #21's "flat in session
//! length"), which the baseline shares.
//!
//! `cargo bench --bench channels_platforms` prints the numbers for BENCHMARKS.md. Under `cargo
//! test --all-targets` (no `--bench` argument) it does a short smoke run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark driver: a failure is a panic with the gateway log"
)]

#[path = "support/stats.rs"]
mod stats;
use stats::*;

#[path = "../tests/support/chat.rs"]
mod chat;
#[path = "../tests/support/gateway.rs"]
mod harness;

use std::time::{Duration, Instant};

use chat::{approve_open_pairing, set_secret, status_of};
use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use harness::Gw;

const ANSWER: &str = "ok from the model";

/// Waits with a 250 µs poll (which bounds the latency resolution).
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
        std::thread::sleep(Duration::from_micros(250));
    }
}

/// Starts the gateway with one `[[channels]]` table, its secrets stored first, connected.
fn gateway(model: &FakeServer, channel: &str, secrets: &[(&str, &str)], name: &str) -> Gw {
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n{channel}",
        model.base_url()
    );
    let mut gw = Gw::start(&cfg);
    if !secrets.is_empty() {
        gw.signal("-TERM");
        assert!(gw.wait_exit().success());
        for (k, v) in secrets {
            set_secret(&gw, k, "127.0.0.1", v);
        }
        gw.spawn();
    }
    until("the channel connected", &gw, || {
        (status_of(&gw, name)["connected"] == true).then_some(())
    });
    gw
}

/// Pairs the first open code, then measures `n` messages one at a time (after one warm-up):
/// `send(i)` offers message `i`, `answers()` counts the model's answers the platform received.
fn measure(name: &str, gw: &Gw, n: usize, send: impl Fn(usize), answers: impl Fn() -> usize) {
    let pid = gw.child.as_ref().unwrap().id().to_string();
    let one = |i: usize| {
        let before = answers();
        send(i);
        until("the answer", gw, || (answers() > before).then_some(()));
    };
    one(0);
    let mut lat = Vec::with_capacity(n);
    let cpu0 = cpu_seconds_of(&pid);
    for i in 1..=n {
        let t0 = Instant::now();
        one(i);
        lat.push(t0.elapsed());
    }
    let cpu = (cpu_seconds_of(&pid) - cpu0) * 1e3 / n as f64;
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  {name:<14} CPU/message {cpu:.2} ms   message -> reply p50 {:.2} ms  p99 {:.2} ms  (n = {n})",
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99))
    );
}

/// Time from dropping the connection (`drop`) to the answer of a message sent right after.
fn reconnect(
    name: &str,
    gw: &Gw,
    drop: impl Fn(),
    send: impl Fn(usize),
    answers: impl Fn() -> usize,
) {
    let before = answers();
    let t0 = Instant::now();
    drop();
    send(999_999);
    until("the answer after the drop", gw, || {
        (answers() > before).then_some(())
    });
    println!(
        "  {name:<14} dropped socket -> answer of a message sent meanwhile: {:.0} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
}

fn now_secs() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 200 } else { 2 };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let model = rt.block_on(FakeOpenAi::start(Vec::new())).unwrap();
    model.set_fallback(Step::Reply(Reply::text([ANSWER])));
    println!("chat platforms (loopback fakes + zero-latency fake model), one message at a time:");

    // Telegram, the same way (one direct conversation), as the baseline of this table.
    {
        use chitin_channels::telegram::fake::{
            FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN,
        };
        let tg = rt.block_on(FakeTelegram::start()).unwrap();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:t\"\napi_base = \"http://{}\"\n",
                tg.addr()
            ),
            &[("t", TOKEN)],
            "tg",
        );
        let alice = FakeUser::new(4242, "Alice");
        let dm = FakeChat::private(&alice);
        tg.push_message(MessageBuilder::text(&dm, &alice, "hi"));
        until("the pairing code", &gw, || tg.sent().into_iter().next());
        approve_open_pairing(&gw, None);
        let answers = || tg.sent().iter().filter(|m| m.text == ANSWER).count();
        let send = |i: usize| {
            tg.push_message(MessageBuilder::text(&dm, &alice, &format!("q{i}")));
        };
        measure("telegram", &gw, n, send, answers);
    }

    // Slack, Events API (signed POSTs to the gateway) and Socket Mode.
    {
        use chitin_channels::slack::fake::{
            APP_TOKEN, BOT_TOKEN, FakeChannel, FakeSlack, FakeUser, MessageBuilder, SIGNING_SECRET,
            signed_headers,
        };
        let slack = rt.block_on(FakeSlack::start()).unwrap();
        let alice = FakeUser::new("U0ALICE001", "Alice");
        let dm = FakeChannel::dm("D0ALICE001");
        let answers = || slack.posted().iter().filter(|p| p.text == ANSWER).count();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"sl\"\nkind = \"slack\"\nbot_token = \"secret:b\"\nsigning_secret = \"secret:s\"\napi_base = \"{}\"\n",
                slack.api_base()
            ),
            &[("b", BOT_TOKEN), ("s", SIGNING_SECRET)],
            "sl",
        );
        let post = |body: &[u8]| {
            let h = signed_headers(SIGNING_SECRET, now_secs(), body);
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(
                gw.try_req("POST", "/channels/sl/events", &h, body)
                    .unwrap()
                    .status,
                200
            );
        };
        post(
            &slack
                .message(MessageBuilder::text(&dm, &alice, "hi"))
                .bytes(),
        );
        until("the pairing code", &gw, || {
            slack.posted().into_iter().next()
        });
        approve_open_pairing(&gw, None);
        let send = |i: usize| {
            post(
                &slack
                    .message(MessageBuilder::text(&dm, &alice, &format!("q{i}")))
                    .bytes(),
            );
        };
        measure("slack events", &gw, n, send, answers);
        drop(gw);

        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"sl\"\nkind = \"slack\"\nmode = \"socket\"\nbot_token = \"secret:b\"\napp_token = \"secret:a\"\napi_base = \"{}\"\npoll_timeout_secs = 5\n",
                slack.api_base()
            ),
            &[("b", BOT_TOKEN), ("a", APP_TOKEN)],
            "sl",
        );
        slack.push_event(&slack.message(MessageBuilder::text(&dm, &alice, "hi")).body);
        until("the pairing code", &gw, || {
            slack
                .posted()
                .into_iter()
                .rfind(|p| p.text.contains("Pairing code"))
        });
        approve_open_pairing(&gw, None);
        let send = |i: usize| {
            slack.push_event(
                &slack
                    .message(MessageBuilder::text(&dm, &alice, &format!("q{i}")))
                    .body,
            );
        };
        measure("slack socket", &gw, n, send, answers);
        reconnect(
            "slack socket",
            &gw,
            || slack.drop_connections(),
            send,
            answers,
        );
    }

    // Discord: gateway WebSocket in, REST out.
    {
        use chitin_channels::discord::fake::{
            FakeChannel, FakeDiscord, FakeUser, MessageBuilder, TOKEN,
        };
        let dc = rt.block_on(FakeDiscord::start()).unwrap();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"dc\"\nkind = \"discord\"\ntoken = \"secret:t\"\napi_base = \"{}\"\npoll_timeout_secs = 5\n",
                dc.api_base()
            ),
            &[("t", TOKEN)],
            "dc",
        );
        let alice = FakeUser::new("200000000000000001", "alice");
        let dm = FakeChannel::dm("300000000000000001");
        dc.add_channel(&dm);
        assert!(rt.block_on(dc.wait_ready()));
        dc.push_message(MessageBuilder::text(&dm, &alice, "hi"));
        until("the pairing code", &gw, || dc.sent().into_iter().next());
        approve_open_pairing(&gw, None);
        let answers = || dc.sent().iter().filter(|m| m.content == ANSWER).count();
        let send = |i: usize| {
            dc.push_message(MessageBuilder::text(&dm, &alice, &format!("q{i}")));
        };
        measure("discord", &gw, n, send, answers);
        reconnect("discord", &gw, || assert!(dc.drop_gateway()), send, answers);
    }

    // WhatsApp: signed webhook POSTs in, Graph API out.
    {
        use chitin_channels::whatsapp::fake::{
            ACCESS_TOKEN, APP_SECRET, FakeUser, FakeWhatsApp, Incoming, PHONE_NUMBER_ID,
            VERIFY_TOKEN,
        };
        let wa = rt.block_on(FakeWhatsApp::start()).unwrap();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"wa\"\nkind = \"whatsapp\"\naccess_token = \"secret:t\"\napp_secret = \"secret:s\"\nverify_token = \"secret:v\"\nphone_number_id = \"{PHONE_NUMBER_ID}\"\napi_base = \"{}\"\n",
                wa.api_base()
            ),
            &[("t", ACCESS_TOKEN), ("s", APP_SECRET), ("v", VERIFY_TOKEN)],
            "wa",
        );
        let alice = FakeUser::new("16505551234", "Alice");
        let post = |text: &str| {
            let note = wa.notification(&[Incoming::text(&alice, text)]);
            let h = note.headers();
            let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(
                gw.try_req("POST", "/channels/wa/webhook", &h, &note.body)
                    .unwrap()
                    .status,
                200
            );
        };
        post("hi");
        until("the pairing code", &gw, || wa.sent().into_iter().next());
        approve_open_pairing(&gw, None);
        let answers = || wa.sent().iter().filter(|m| m.text == ANSWER).count();
        measure("whatsapp", &gw, n, |i| post(&format!("q{i}")), answers);
    }

    // Signal: signal-cli's event stream in, JSON-RPC out.
    {
        use chitin_channels::signal::fake::{ACCOUNT, Envelope, FakeContact, FakeSignal};
        let sig = rt.block_on(FakeSignal::start()).unwrap();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"sg\"\nkind = \"signal\"\napi_base = \"{}\"\naccount = \"{ACCOUNT}\"\npoll_timeout_secs = 5\n",
                sig.api_base()
            ),
            &[],
            "sg",
        );
        let alice = FakeContact::new(
            "+15550002222",
            "0b5c1a50-0000-4000-8000-00000000a11c",
            "Alice",
        );
        sig.push(Envelope::text(&alice, "hi"));
        until("the pairing code", &gw, || sig.sends().into_iter().next());
        approve_open_pairing(&gw, None);
        let answers = || sig.sends().iter().filter(|m| m.message == ANSWER).count();
        let send = |i: usize| {
            sig.push(Envelope::text(&alice, &format!("q{i}")));
        };
        measure("signal", &gw, n, send, answers);
    }

    // Matrix: /sync long polls in, PUT send out.
    {
        use chitin_channels::matrix::fake::{BOT, FakeMatrix, TOKEN};
        let mx = rt.block_on(FakeMatrix::start()).unwrap();
        let gw = gateway(
            &model,
            &format!(
                "[[channels]]\nname = \"mx\"\nkind = \"matrix\"\nhomeserver = \"{}\"\naccess_token = \"secret:t\"\nuser_id = \"{BOT}\"\npoll_timeout_secs = 5\n",
                mx.homeserver()
            ),
            &[("t", TOKEN)],
            "mx",
        );
        until("the first sync", &gw, || {
            status_of(&gw, "mx")["cursor"].as_str().map(drop)
        });
        let alice = "@alice:fake.test";
        let dm = mx.create_room(&[alice]);
        mx.push_text(&dm, alice, "hi");
        until("the pairing code", &gw, || mx.sent().into_iter().next());
        approve_open_pairing(&gw, None);
        let answers = || {
            mx.sent()
                .iter()
                .filter(|e| e.content["body"] == ANSWER)
                .count()
        };
        let send = |i: usize| {
            mx.push_text(&dm, alice, &format!("q{i}"));
        };
        measure("matrix", &gw, n, send, answers);
    }
    drop(rt);
}
