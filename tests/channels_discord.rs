//! Discord through the real `chitin gateway` binary, against the fake Discord (REST and
//! gateway WebSocket) of `chitin-channels` and a fake model: pairing in a DM, an answer that
//! cannot ping anyone, mention gating in a guild channel, an approval by button refused for a
//! stranger and granted for the owner, and a dropped gateway socket resumed without losing the
//! message sent meanwhile.
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
use chitin::providers::testing::{FakeOpenAi, Reply, Step};
use chitin_channels::discord::fake::{FakeChannel, FakeDiscord, FakeUser, MessageBuilder, TOKEN};
use harness::Gw;
use serde_json::json;

fn sent_in(dc: &FakeDiscord, channel: &str) -> Vec<chitin_channels::discord::fake::SentMessage> {
    dc.sent()
        .into_iter()
        .filter(|m| m.channel_id == channel)
        .collect()
}

#[test]
fn on_discord_pairing_answers_mentions_and_approvals_work_and_a_dropped_socket_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dc = rt.block_on(FakeDiscord::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(Reply::text(["Hi @everyone, the answer is **42**."])),
            Step::tool_call(
                "c1",
                "exec",
                r#"{"argv": ["true"], "network": ["127.0.0.1:9"]}"#,
            ),
            Step::Reply(Reply::text(["It ran."])),
            Step::Reply(Reply::text(["After the drop."])),
        ]))
        .unwrap();
    let config = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[channels]]\nname = \"dc\"\nkind = \"discord\"\ntoken = \"secret:dc_token\"\napi_base = \"{}\"\npoll_timeout_secs = 1\n",
        model.base_url(),
        dc.api_base()
    );
    let mut gw = Gw::start(&config);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "dc_token", "127.0.0.1", TOKEN);
    gw.spawn();
    assert!(rt.block_on(dc.wait_ready()), "the gateway never identified");
    until("the channel connected", &gw, || {
        (status_of(&gw, "dc")["connected"] == true).then_some(())
    });

    let alice = FakeUser::new("200000000000000001", "alice");
    let dm = FakeChannel::dm("300000000000000001");
    dc.add_channel(&dm);
    dc.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let code = until("the pairing code", &gw, || {
        sent_in(&dc, &dm.id).into_iter().next()
    });
    assert!(code.content.contains("Pairing code"), "{}", code.content);
    assert_eq!(
        approve_open_pairing(&gw, None),
        "discord:200000000000000001"
    );
    until("the pairing notice", &gw, || {
        sent_in(&dc, &dm.id)
            .into_iter()
            .find(|m| m.content.starts_with("Paired:"))
    });

    // The answer: no one can be pinged, markdown shown as typed.
    let asked = dc.push_message(MessageBuilder::text(&dm, &alice, "what is the answer?"));
    let answer = until("the answer", &gw, || {
        sent_in(&dc, &dm.id)
            .into_iter()
            .find(|m| m.body["message_reference"]["message_id"] == asked.message_id.as_str())
    });
    assert_eq!(
        answer.body["allowed_mentions"],
        json!({"parse": [], "replied_user": false})
    );
    assert!(
        answer.content.contains("\\*\\*42\\*\\*"),
        "{}",
        answer.content
    );

    // In a guild channel only a mention is answered; an approval comes with buttons.
    let general = FakeChannel::text("400000000000000001", "500000000000000001");
    dc.add_channel(&general);
    dc.push_message(MessageBuilder::text(&general, &alice, "just chatting"));
    let run = dc.push_message(
        MessageBuilder::text(&general, &alice, "<@100000000000000001> run it")
            .mentioning(&dc.bot()),
    );
    // The prompt is split at Discord's limit; the buttons are on its last part.
    let prompt = until("the approval prompt", &gw, || {
        sent_in(&dc, &general.id).into_iter().find(|m| {
            m.body["components"]
                .as_array()
                .is_some_and(|c| !c.is_empty())
        })
    });
    let parts = sent_in(&dc, &general.id);
    assert!(
        parts[0].content.starts_with("Approval needed"),
        "{}",
        parts[0].content
    );
    assert!(
        parts
            .iter()
            .all(|m| m.body["message_reference"]["message_id"] != "x"),
        "the unmentioned message was answered"
    );
    let approve = prompt.body["components"][0]["components"][0]["custom_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(approve.starts_with("a:"), "{}", prompt.body);
    let mallory = FakeUser::new("200000000000000666", "mallory");
    dc.push_button(&mallory, &prompt.message, &approve);
    until("the stranger's press refused", &gw, || {
        dc.followups()
            .into_iter()
            .chain(
                dc.callbacks()
                    .into_iter()
                    .map(|c| chitin_channels::discord::fake::Followup {
                        interaction_id: c.interaction_id,
                        body: c.body,
                    }),
            )
            .find(|f| f.body.to_string().contains("not allowed to decide"))
    });
    dc.push_button(&alice, &prompt.message, &approve);
    until("the run's answer", &gw, || {
        sent_in(&dc, &general.id).into_iter().find(|m| {
            m.content == "It ran."
                && m.body["message_reference"]["message_id"] == run.message_id.as_str()
        })
    });

    // The socket drops; a message sent meanwhile is replayed on resume and answered once.
    assert!(dc.drop_gateway());
    let later = dc.push_message(MessageBuilder::text(&dm, &alice, "still there?"));
    until("the answer after the drop", &gw, || {
        sent_in(&dc, &dm.id).into_iter().find(|m| {
            m.content == "After the drop."
                && m.body["message_reference"]["message_id"] == later.message_id.as_str()
        })
    });
    assert_eq!(model.requests().len(), 4);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(!log.contains(TOKEN), "the bot token is in the gateway log");
}
