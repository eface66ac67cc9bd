//! Slack through the real `chitin gateway` binary, against the fake Slack of `chitin-channels`
//! and a fake model: the Events API (signed requests, the URL challenge, pairing, an escaped
//! answer, a retried delivery dropped, a forged signature refused and audited, an approval by
//! button in a channel thread refused for a stranger and granted for the owner) and Socket
//! Mode (events acknowledged after the commit, a dropped socket reopened without loss).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/chat.rs"]
mod chat;
#[path = "support/gateway.rs"]
mod harness;

use chat::{approve_open_pairing, set_secret, status_of, until};
use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use chitin_channels::slack::fake::{
    APP_TOKEN, BOT_TOKEN, BOT_USER_ID, FakeChannel, FakeSlack, FakeUser, MessageBuilder, Posted,
    SIGNING_SECRET, interactivity_body, signed_headers,
};
use harness::{Gw, Resp};
use serde_json::{Value, json};

fn config(model: &FakeServer, slack: &FakeSlack, socket: bool) -> String {
    let mode = if socket {
        "mode = \"socket\"\napp_token = \"secret:sl_app\"\n"
    } else {
        "mode = \"events\"\nsigning_secret = \"secret:sl_sign\"\n"
    };
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[channels]]\nname = \"sl\"\nkind = \"slack\"\nbot_token = \"secret:sl_bot\"\napi_base = \"{}\"\npoll_timeout_secs = 1\n{mode}",
        model.base_url(),
        slack.api_base()
    )
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Posts a body to `/channels/sl/<route>` signed with `secret` (and extra headers).
fn post(gw: &Gw, route: &str, secret: &str, body: &[u8], extra: &[(&str, &str)]) -> Resp {
    let signed = signed_headers(secret, now(), body);
    let mut headers: Vec<(&str, &str)> = signed
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    headers.extend_from_slice(extra);
    if route == "interactivity" {
        headers.push(("Content-Type", "application/x-www-form-urlencoded"));
    } else {
        headers.push(("Content-Type", "application/json"));
    }
    gw.try_req("POST", &format!("/channels/sl/{route}"), &headers, body)
        .unwrap()
}

fn posted_in(slack: &FakeSlack, channel: &str) -> Vec<Posted> {
    slack
        .posted()
        .into_iter()
        .filter(|p| p.channel == channel)
        .collect()
}

fn started(steps: Vec<Step>, socket: bool) -> (tokio::runtime::Runtime, FakeSlack, FakeServer, Gw) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let slack = rt.block_on(FakeSlack::start()).unwrap();
    let model = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    let mut gw = Gw::start(&config(&model, &slack, socket));
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "sl_bot", "127.0.0.1", BOT_TOKEN);
    if socket {
        set_secret(&gw, "sl_app", "127.0.0.1", APP_TOKEN);
    } else {
        set_secret(&gw, "sl_sign", "127.0.0.1", SIGNING_SECRET);
    }
    gw.spawn();
    until("the channel connected", &gw, || {
        (status_of(&gw, "sl")["connected"] == true).then_some(())
    });
    (rt, slack, model, gw)
}

#[test]
fn slack_events_pair_answer_once_refuse_forgeries_and_take_approvals_by_button() {
    let (_rt, slack, model, gw) = started(
        vec![
            Step::Reply(Reply::text(["The answer is <b>42</b> & <!channel>."])),
            Step::tool_call(
                "c1",
                "exec",
                r#"{"argv": ["true"], "network": ["127.0.0.1:9"]}"#,
            ),
            Step::Reply(Reply::text(["It ran."])),
        ],
        false,
    );
    // The Request URL check: the challenge comes back as the body.
    let body = json!({"token": "x", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}).to_string();
    let r = post(&gw, "events", SIGNING_SECRET, body.as_bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body,
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    // A forged signature: 401, audited, nothing stored.
    let alice = FakeUser::new("U0ALICE001", "Alice");
    let dm = FakeChannel::dm("D0ALICE001");
    let hello = slack.message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let r = post(&gw, "events", "not-the-signing-secret", &hello.bytes(), &[]);
    assert_eq!(r.status, 401, "{}", r.body);
    let out = gw.chitin(&["audit", "export", "--format", "jsonl"]);
    let export = String::from_utf8_lossy(&out.stdout);
    assert!(
        export.contains("channel.webhook.refused") && export.contains("X-Slack-Signature"),
        "{export}"
    );
    assert_eq!(status_of(&gw, "sl")["events"], 0);

    // The stranger's DM: one pairing code.
    let r = post(&gw, "events", SIGNING_SECRET, &hello.bytes(), &[]);
    assert_eq!(r.status, 200, "{}", r.body);
    let code = until("the pairing code", &gw, || {
        posted_in(&slack, &dm.id).into_iter().next()
    });
    assert!(code.text.contains("Pairing code"), "{}", code.text);
    assert_eq!(approve_open_pairing(&gw, None), "slack:U0ALICE001");
    until("the pairing notice", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text.starts_with("Paired:"))
    });

    // An admitted DM, delivered twice (Slack retries): one turn, one escaped answer.
    let asked = slack.message(MessageBuilder::text(&dm, &alice, "what is the answer?"));
    let r = post(&gw, "events", SIGNING_SECRET, &asked.bytes(), &[]);
    assert_eq!(r.status, 200);
    let r = post(
        &gw,
        "events",
        SIGNING_SECRET,
        &asked.bytes(),
        &[
            ("X-Slack-Retry-Num", "1"),
            ("X-Slack-Retry-Reason", "http_timeout"),
        ],
    );
    assert_eq!(r.status, 200);
    let answer = until("the answer", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text.starts_with("The answer"))
    });
    assert_eq!(
        answer.text,
        "The answer is &lt;b&gt;42&lt;/b&gt; &amp; &lt;!channel&gt;."
    );
    assert_eq!(model.requests().len(), 1);

    // In a channel, the owner mentions the bot; the approval is posted in the thread with
    // buttons; a stranger's press is refused, the owner's runs the call.
    let general = FakeChannel::public("C0GENERAL1");
    let run = slack.message(MessageBuilder::text(
        &general,
        &alice,
        &format!("<@{BOT_USER_ID}> run it"),
    ));
    assert_eq!(
        post(&gw, "events", SIGNING_SECRET, &run.bytes(), &[]).status,
        200
    );
    let prompt = until("the approval prompt", &gw, || {
        posted_in(&slack, &general.id)
            .into_iter()
            .find(|p| !p.buttons.is_empty())
    });
    assert_eq!(prompt.thread_ts.as_deref(), Some(run.ts.as_str()));
    let approve = prompt.buttons[0].1.clone();
    assert!(approve.starts_with("a:"), "{:?}", prompt.buttons);
    let mallory = FakeUser::new("U0MALLORY1", "Mallory");
    let press = slack.button_press(&mallory, &general.id, &prompt.ts, &approve);
    let r = post(
        &gw,
        "interactivity",
        SIGNING_SECRET,
        &interactivity_body(&press),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let refused = until("the refusal shown to the stranger", &gw, || {
        slack
            .ephemerals()
            .into_iter()
            .find(|e| e.user == mallory.id)
    });
    assert_eq!(
        refused.text,
        "Refused: you are not allowed to decide this approval."
    );
    let press = slack.button_press(&alice, &general.id, &prompt.ts, &approve);
    let r = post(
        &gw,
        "interactivity",
        SIGNING_SECRET,
        &interactivity_body(&press),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let done = until("the run's answer in the thread", &gw, || {
        posted_in(&slack, &general.id)
            .into_iter()
            .find(|p| p.text == "It ran.")
    });
    assert_eq!(done.thread_ts.as_deref(), Some(run.ts.as_str()));
    until("the prompt updated to show who decided", &gw, || {
        slack
            .updates()
            .into_iter()
            .find(|u| u.ts == prompt.ts && u.text.starts_with("Approved by owner"))
    });
}

#[test]
fn slack_socket_mode_acknowledges_after_the_commit_and_survives_a_dropped_socket() {
    let (rt, slack, model, gw) = started(
        vec![
            Step::Reply(Reply::text(["First."])),
            Step::Reply(Reply::text(["Second."])),
        ],
        true,
    );
    let alice = FakeUser::new("U0ALICE001", "Alice");
    let dm = FakeChannel::dm("D0ALICE001");
    let hello = slack.message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let env = slack.push_event(&hello.body);
    until("the pairing code", &gw, || {
        posted_in(&slack, &dm.id).into_iter().next()
    });
    // The envelope is acknowledged once its event is stored.
    let acks = rt.block_on(slack.wait_for_acks(1));
    assert_eq!(acks, [env]);
    approve_open_pairing(&gw, None);
    let first = slack.message(MessageBuilder::text(&dm, &alice, "one"));
    slack.push_event(&first.body);
    until("the first answer", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text == "First.")
    });
    // The socket drops; an event pushed meanwhile arrives on the new socket, once.
    slack.drop_connections();
    let second = slack.message(MessageBuilder::text(&dm, &alice, "two"));
    slack.push_event(&second.body);
    until("the second answer", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text == "Second.")
    });
    assert_eq!(model.requests().len(), 2);
    let s: Value = status_of(&gw, "sl");
    assert_eq!(s["connected"], true, "{s}");
}

#[test]
fn a_slack_event_acknowledged_before_a_sigkill_is_answered_exactly_once_after_the_restart() {
    let (_rt, slack, model, mut gw) = started(
        vec![
            Step::Hang,
            Step::Reply(Reply::text(["Answer after the restart."])),
            Step::Reply(Reply::text(["Pong."])),
        ],
        false,
    );
    let alice = FakeUser::new("U0ALICE001", "Alice");
    let dm = FakeChannel::dm("D0ALICE001");
    let hello = slack.message(MessageBuilder::text(&dm, &alice, "hello bot"));
    assert_eq!(
        post(&gw, "events", SIGNING_SECRET, &hello.bytes(), &[]).status,
        200
    );
    until("the pairing code", &gw, || {
        posted_in(&slack, &dm.id).into_iter().next()
    });
    approve_open_pairing(&gw, None);
    until("the pairing notice", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text.starts_with("Paired:"))
    });
    // Slack got its 200 (the event is committed); the model is working on it: SIGKILL.
    let asked = slack.message(MessageBuilder::text(&dm, &alice, "a question"));
    assert_eq!(
        post(&gw, "events", SIGNING_SECRET, &asked.bytes(), &[]).status,
        200
    );
    until("the model asked", &gw, || {
        (!model.requests().is_empty()).then_some(())
    });
    gw.signal("-KILL");
    let _ = gw.wait_exit();
    gw.spawn();
    until("the resumed turn's answer", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text == "Answer after the restart.")
    });
    // Slack retries the delivery it may think was lost: recognized, not run again.
    assert_eq!(
        post(
            &gw,
            "events",
            SIGNING_SECRET,
            &asked.bytes(),
            &[("X-Slack-Retry-Num", "1")]
        )
        .status,
        200
    );
    let ping = slack.message(MessageBuilder::text(&dm, &alice, "ping"));
    assert_eq!(
        post(&gw, "events", SIGNING_SECRET, &ping.bytes(), &[]).status,
        200
    );
    until("the next answer", &gw, || {
        posted_in(&slack, &dm.id)
            .into_iter()
            .find(|p| p.text == "Pong.")
    });
    let answers = posted_in(&slack, &dm.id)
        .iter()
        .filter(|p| p.text == "Answer after the restart.")
        .count();
    assert_eq!(answers, 1);
    assert_eq!(model.requests().len(), 3);
}
