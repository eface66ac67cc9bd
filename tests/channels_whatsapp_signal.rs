//! WhatsApp (Cloud API webhooks) and Signal (a signal-cli daemon) through the real `chitin
//! gateway` binary, against the fakes of `chitin-channels` and a fake model.
//!
//! WhatsApp: the verification handshake, a forged signature refused and audited, pairing, an
//! answer as a reply, an approval by reply button, and a message refused later by WhatsApp
//! (outside the 24-hour window) recorded as a dead letter on its outbox row.
//! Signal: pairing, an answer quoting the question, and an approval answered by a 👍 reaction
//! from the owner after a stranger's reaction was refused.
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
use harness::Gw;

fn model_section(model: &FakeServer) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n",
        model.base_url()
    )
}

const EXEC: &str = r#"{"argv": ["true"], "network": ["127.0.0.1:9"]}"#;

#[test]
fn on_whatsapp_the_handshake_signatures_pairing_buttons_and_late_failures_work() {
    use chitin_channels::whatsapp::fake::{
        ACCESS_TOKEN, APP_SECRET, FakeUser, FakeWhatsApp, Incoming, PHONE_NUMBER_ID, VERIFY_TOKEN,
        handshake_query,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wa = rt.block_on(FakeWhatsApp::start()).unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let model = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(Reply::text(["The answer is 42."])),
            Step::tool_call("c1", "exec", EXEC),
            Step::Reply(Reply::text(["It ran."])),
            Step::Gated {
                reply: Reply::text(["A late answer."]),
                events: 1,
                gate: std::sync::Arc::clone(&gate),
            },
        ]))
        .unwrap();
    let config = format!(
        "{}[[channels]]\nname = \"wa\"\nkind = \"whatsapp\"\naccess_token = \"secret:wa_token\"\napp_secret = \"secret:wa_app\"\nverify_token = \"secret:wa_verify\"\nphone_number_id = \"{PHONE_NUMBER_ID}\"\napi_base = \"{}\"\n",
        model_section(&model),
        wa.api_base()
    );
    let mut gw = Gw::start(&config);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "wa_token", "127.0.0.1", ACCESS_TOKEN);
    set_secret(&gw, "wa_app", "127.0.0.1", APP_SECRET);
    set_secret(&gw, "wa_verify", "127.0.0.1", VERIFY_TOKEN);
    gw.spawn();
    until("the channel connected", &gw, || {
        (status_of(&gw, "wa")["connected"] == true).then_some(())
    });
    let post = |headers: &[(String, String)], body: &[u8]| {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        gw.try_req("POST", "/channels/wa/webhook", &h, body)
            .unwrap()
    };

    // The verification handshake: the challenge for the right verify token only.
    let r = gw
        .try_req(
            "GET",
            &format!(
                "/channels/wa/webhook?{}",
                handshake_query("subscribe", VERIFY_TOKEN, "1158201444")
            ),
            &[],
            b"",
        )
        .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "1158201444"));
    let r = gw
        .try_req(
            "GET",
            &format!(
                "/channels/wa/webhook?{}",
                handshake_query("subscribe", "wrong", "1")
            ),
            &[],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 401);

    // A forged signature: 401, nothing stored.
    let alice = FakeUser::new("16505551234", "Alice");
    let hello = wa.notification(&[Incoming::text(&alice, "hello bot")]);
    let r = post(
        &hello.headers_signed_with("not-the-app-secret"),
        &hello.body,
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(status_of(&gw, "wa")["events"], 0);

    // Pairing, then an answer as a reply to the question.
    assert_eq!(post(&hello.headers(), &hello.body).status, 200);
    let code = until("the pairing code", &gw, || wa.sent().into_iter().next());
    assert!(code.text.contains("Pairing code"), "{}", code.text);
    assert_eq!(approve_open_pairing(&gw, None), "whatsapp:16505551234");
    until("the pairing notice", &gw, || {
        wa.sent()
            .into_iter()
            .find(|m| m.text.starts_with("Paired:"))
    });
    let asked = wa.notification(&[Incoming::text(&alice, "what is the answer?")]);
    assert_eq!(post(&asked.headers(), &asked.body).status, 200);
    // Meta redelivers the same notification: one turn.
    assert_eq!(post(&asked.headers(), &asked.body).status, 200);
    let answer = until("the answer", &gw, || {
        wa.sent()
            .into_iter()
            .find(|m| m.text == "The answer is 42.")
    });
    assert_eq!(answer.context.as_deref(), Some(asked.wamids[0].as_str()));
    assert_eq!(answer.preview_url, Some(false));

    // An approval as reply buttons; the owner's button reply runs the call.
    let run = wa.notification(&[Incoming::text(&alice, "run it")]);
    assert_eq!(post(&run.headers(), &run.body).status, 200);
    let prompt = until("the approval buttons", &gw, || {
        wa.sent().into_iter().find(|m| !m.buttons.is_empty())
    });
    let (approve_id, title) = prompt.buttons[0].clone();
    assert_eq!(title, "Approve");
    let press = wa.notification(&[Incoming::button_reply(
        &alice,
        &prompt.wamid,
        &approve_id,
        &title,
    )]);
    assert_eq!(post(&press.headers(), &press.body).status, 200);
    until("the run's answer", &gw, || {
        wa.sent().into_iter().find(|m| m.text == "It ran.")
    });

    // The answer goes out after the 24-hour window closed (the model took its time):
    // WhatsApp accepts the send, then reports it failed; the row becomes a dead letter.
    let late = wa.notification(&[Incoming::text(&alice, "one more")]);
    assert_eq!(post(&late.headers(), &late.body).status, 200);
    until("the model asked", &gw, || {
        (model.requests().len() == 4).then_some(())
    });
    wa.close_window(&alice.wa_id);
    gate.notify_one();
    let sent = until("the late answer sent", &gw, || {
        wa.sent().into_iter().find(|m| m.text == "A late answer.")
    });
    assert!(!sent.delivered);
    let note = wa.status_notification().unwrap();
    assert_eq!(post(&note.headers(), &note.body).status, 200);
    let s = until("the dead letter recorded", &gw, || {
        let s = status_of(&gw, "wa");
        (s["dead"] == 1).then_some(s)
    });
    assert!(s["sent"].as_i64().unwrap() >= 4, "{s}");
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains("chitin_channel_undelivered_total 1"),
        "{metrics}"
    );
}

#[test]
fn on_signal_pairing_quoted_answers_and_approval_by_reaction_work() {
    use chitin_channels::signal::fake::{ACCOUNT, Envelope, FakeContact, FakeSignal};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sig = rt.block_on(FakeSignal::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(Reply::text(["The answer is 42."])),
            Step::tool_call("c1", "exec", EXEC),
            Step::Reply(Reply::text(["It ran."])),
        ]))
        .unwrap();
    let config = format!(
        "{}[[channels]]\nname = \"sg\"\nkind = \"signal\"\napi_base = \"{}\"\naccount = \"{ACCOUNT}\"\npoll_timeout_secs = 1\n",
        model_section(&model),
        sig.api_base()
    );
    let gw = Gw::start(&config);
    until("the channel connected", &gw, || {
        (status_of(&gw, "sg")["connected"] == true).then_some(())
    });
    let alice = FakeContact::new(
        "+15550002222",
        "0b5c1a50-0000-4000-8000-00000000a11c",
        "Alice",
    );
    let bot = FakeContact::bot();
    sig.push(Envelope::text(&alice, "hello bot"));
    let code = until("the pairing code", &gw, || sig.sends().into_iter().next());
    assert!(code.message.contains("Pairing code"), "{}", code.message);
    let identity = approve_open_pairing(&gw, None);
    assert_eq!(identity, format!("signal:{}", alice.id()));
    until("the pairing notice", &gw, || {
        sig.sends()
            .into_iter()
            .find(|m| m.message.starts_with("Paired:"))
    });
    let asked = sig.push(Envelope::text(&alice, "what is the answer?"));
    let answer = until("the answer", &gw, || {
        sig.sends()
            .into_iter()
            .find(|m| m.message == "The answer is 42.")
    });
    assert_eq!(answer.quote_timestamp, Some(asked));

    // The approval prompt says how to answer without buttons; a stranger's 👍 decides
    // nothing, the owner's runs the call.
    sig.push(Envelope::text(&alice, "run it"));
    let prompt = until("the approval prompt", &gw, || {
        sig.sends()
            .into_iter()
            .rfind(|m| m.message.contains("Reply /approve "))
    });
    assert!(!prompt.message.contains("buttons"), "{}", prompt.message);
    let mallory = FakeContact::new(
        "+15550006666",
        "0b5c1a50-0000-4000-8000-0000000bad00",
        "Mallory",
    );
    sig.push(Envelope::reaction(
        &mallory,
        "\u{1F44D}",
        &bot,
        prompt.timestamp,
        false,
    ));
    sig.push(Envelope::reaction(
        &alice,
        "\u{1F44D}",
        &bot,
        prompt.timestamp,
        false,
    ));
    until("the run's answer", &gw, || {
        sig.sends().into_iter().find(|m| m.message == "It ran.")
    });
    // The stranger's reaction (from another conversation) decided nothing: the owner did.
    let out = gw.chitin(&["approvals", "list", "--all", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &list.as_array().unwrap()[0];
    assert_eq!(
        (a["status"].as_str(), a["resolved_by"].as_str()),
        (Some("used"), Some("owner")),
        "{a}"
    );
}
