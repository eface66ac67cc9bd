//! Matrix through the real `chitin gateway` binary, against the fake homeserver of
//! `chitin-channels` and a fake model: pairing in a direct room, the model's answer as a
//! plain-text `m.room.message` reply sent once, invitations joined only for an admitted
//! inviter, and an approval answered with `/approve CODE` (Matrix has no buttons).
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
use chitin_channels::matrix::fake::{BOT, FakeMatrix, TOKEN};
use harness::Gw;

const ALICE: &str = "@alice:fake.test";

fn config(model_url: &str, mx: &FakeMatrix) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{model_url}\"\n\n\
         [[channels]]\nname = \"mx\"\nkind = \"matrix\"\nhomeserver = \"{}\"\naccess_token = \"secret:mx_token\"\nuser_id = \"{BOT}\"\npoll_timeout_secs = 1\n",
        mx.homeserver()
    )
}

/// The bot's messages in `room` (body, and the event it replies to).
fn replies(mx: &FakeMatrix, room: &str) -> Vec<(String, Option<String>)> {
    mx.sent()
        .into_iter()
        .filter(|e| e.room_id == room && e.event_type == "m.room.message")
        .map(|e| {
            (
                e.content["body"].as_str().unwrap_or_default().to_string(),
                e.content["m.relates_to"]["m.in_reply_to"]["event_id"]
                    .as_str()
                    .map(str::to_string),
            )
        })
        .collect()
}

/// The gateway on `mx` with its access token stored, after its first sync.
fn start(model: &FakeServer, mx: &FakeMatrix) -> Gw {
    let mut gw = Gw::start(&config(&model.base_url(), mx));
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "mx_token", "127.0.0.1", TOKEN);
    gw.spawn();
    // Connected, and the first sync (which skips history) is done.
    until("the first sync", &gw, || {
        let s = status_of(&gw, "mx");
        (s["connected"] == true && s["cursor"].is_string()).then_some(())
    });
    gw
}

/// A direct room with `user`, a stranger: one pairing code, approved with the CLI, and the
/// notice. Returns the room.
fn pair_in_dm(gw: &Gw, mx: &FakeMatrix, user: &str) -> String {
    let dm = mx.create_room(&[user]);
    mx.push_text(&dm, user, "hello bot");
    let code_msg = until("the pairing code", gw, || {
        replies(mx, &dm).into_iter().next()
    });
    assert!(code_msg.0.contains("Pairing code"), "{}", code_msg.0);
    assert_eq!(approve_open_pairing(gw, None), format!("matrix:{user}"));
    until("the pairing notice", gw, || {
        replies(mx, &dm)
            .into_iter()
            .find(|r| r.0.starts_with("Paired:"))
    });
    dm
}

#[test]
fn on_matrix_a_stranger_is_paired_answers_are_plain_replies_and_invitations_follow_cedar() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mx = rt.block_on(FakeMatrix::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(Reply::text(["The answer is <b>42</b>."])),
            Step::tool_call(
                "c1",
                "exec",
                r#"{"argv": ["true"], "network": ["127.0.0.1:9"]}"#,
            ),
            Step::Reply(Reply::text(["It ran."])),
        ]))
        .unwrap();
    let mut gw = start(&model, &mx);

    // A direct room: the stranger gets one pairing code and nothing reaches the model.
    let dm = pair_in_dm(&gw, &mx, ALICE);

    // An admitted message: the answer is a plain-text reply (no HTML, no mentions), sent once.
    let asked = mx.push_text(&dm, ALICE, "what is the answer?");
    let answer = until("the answer", &gw, || {
        mx.sent().into_iter().find(|e| {
            e.room_id == dm
                && e.content["m.relates_to"]["m.in_reply_to"]["event_id"] == asked.as_str()
        })
    });
    assert_eq!(answer.content["body"], "The answer is <b>42</b>.");
    assert_eq!(answer.content["msgtype"], "m.text");
    assert!(
        answer.content.get("formatted_body").is_none(),
        "{}",
        answer.content
    );
    assert_eq!(answer.content["m.mentions"], serde_json::json!({}));
    // The transaction id is the outbox row's delivery id: a retry could not post twice.
    assert!(answer.txn_id.starts_with("chitin-mx-"), "{}", answer.txn_id);

    // Invitations: a stranger's is refused by Cedar (not joined); the owner's is joined.
    let strangers = mx.invite_bot("@mallory:fake.test", false, false);
    let owners = mx.invite_bot(ALICE, false, false);
    until("the owner's room joined", &gw, || {
        mx.joins().contains(&owners).then_some(())
    });
    assert!(!mx.joins().contains(&strangers), "{:?}", mx.joins());

    // An approval needs /approve: the prompt says so and carries no buttons.
    let run = mx.push_text(&dm, ALICE, "run it");
    let prompt = until("the approval prompt", &gw, || {
        replies(&mx, &dm)
            .into_iter()
            .find(|r| r.0.starts_with("Approval needed"))
    });
    assert!(prompt.0.contains("Reply /approve "), "{}", prompt.0);
    assert!(!prompt.0.contains("buttons"), "{}", prompt.0);
    let code = prompt
        .0
        .split("Reply /approve ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    mx.push_text(&dm, ALICE, &format!("/approve {code}"));
    until("the run's answer", &gw, || {
        replies(&mx, &dm)
            .into_iter()
            .find(|r| r.0 == "It ran." && r.1.as_deref() == Some(run.as_str()))
    });
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(
        !log.contains(TOKEN),
        "the access token is in the gateway log"
    );
}

/// A Matrix user id from before the strict grammar may hold `'` (Cedar's entity parser wants
/// it escaped): the sender is paired and answered like any other, and a poll holding its
/// message is not refused whole.
#[test]
fn on_matrix_a_sender_whose_id_has_an_apostrophe_is_paired_and_answered() {
    const OBRIEN: &str = "@o'brien:fake.test";
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mx = rt.block_on(FakeMatrix::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::Reply(Reply::text([
            "Hello, O'Brien.",
        ]))]))
        .unwrap();
    let mut gw = start(&model, &mx);
    let dm = pair_in_dm(&gw, &mx, OBRIEN);
    let asked = mx.push_text(&dm, OBRIEN, "are you there?");
    let answer = until("the answer", &gw, || {
        replies(&mx, &dm)
            .into_iter()
            .find(|r| r.1.as_deref() == Some(asked.as_str()))
    });
    assert_eq!(answer.0, "Hello, O'Brien.");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
}
