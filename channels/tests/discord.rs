//! The Discord adapter against the fake Discord (`discord::fake`): the real HTTP client, the
//! real WebSocket client and the real wire formats, on 127.0.0.1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use chitin_channels::discord::fake::{
    BOT_ID, Endpoint, Failure, FakeChannel, FakeDiscord, FakeGuild, FakeUser, MessageBuilder, TOKEN,
};
use chitin_channels::discord::{Discord, DiscordConfig, INTENTS, MAX_TEXT, escape_markdown};
use chitin_channels::{
    Attachment, Button, ButtonPress, ChannelError, ChatKind, ChatRef, Event, Inbound, Message,
    OutMessage, Platform, SendError,
};
use serde_json::json;
use support::{chat, closed_port, message, text_to};
use zeroize::Zeroizing;

const GUILD: &str = "700000000000000001";
const GENERAL: &str = "700000000000000010";
const THREAD: &str = "700000000000000020";
const LATE_THREAD: &str = "700000000000000030";
const BOT_ROLE: &str = "700000000000000099";
const DM: &str = "600000000000000001";

fn config(fake: &FakeDiscord, token: &str) -> DiscordConfig {
    let mut c = DiscordConfig::new(Zeroizing::new(token.to_owned())).unwrap();
    c.api_base = fake.api_base();
    // An empty poll answers after 1 s (tests wait on events, never on this).
    c.poll_timeout_secs = 1;
    c
}

/// An adapter whose gateway session is open.
async fn started(fake: &FakeDiscord) -> Discord {
    let d = Discord::new(config(fake, TOKEN)).unwrap();
    d.connect().await.unwrap();
    d.start(None).await.unwrap();
    assert!(fake.wait_ready().await, "the gateway session did not open");
    d
}

fn alice() -> FakeUser {
    FakeUser::new("500000000000000001", "alice").with_global_name("Alice")
}

fn bob() -> FakeUser {
    FakeUser::new("500000000000000002", "bob")
}

fn general() -> FakeChannel {
    FakeChannel::text(GUILD, GENERAL)
}

fn thread() -> FakeChannel {
    FakeChannel::thread(&general(), THREAD)
}

fn guild() -> FakeGuild {
    FakeGuild {
        id: GUILD.into(),
        channels: vec![general()],
        threads: vec![thread()],
        bot_role: Some(BOT_ROLE.into()),
    }
}

fn group_ref() -> ChatRef {
    chat(GENERAL, ChatKind::Group)
}

fn out(chat: &ChatRef, text: &str, delivery_id: &str) -> OutMessage {
    text_to(chat, text, delivery_id)
}

/// Polls (carrying the cursor, as the engine does) until `n` events arrived; then checks
/// that one more poll brings nothing.
async fn collect(d: &Discord, cursor: &mut Option<String>, n: usize) -> Vec<Inbound> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut events = Vec::new();
    while events.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events arrived: {events:?}",
            events.len()
        );
        match d.poll(cursor.as_deref()).await {
            Ok(p) => {
                if p.cursor.is_some() {
                    *cursor = p.cursor;
                }
                events.extend(p.events);
            }
            // The gateway reconnecting: poll again.
            Err(ChannelError::Transient(_)) => {}
            Err(e) => panic!("poll failed: {e}"),
        }
    }
    let after = d.poll(cursor.as_deref()).await.unwrap();
    assert!(
        after.events.is_empty(),
        "more events than expected: {:?}",
        after.events
    );
    assert_eq!(events.len(), n, "{events:?}");
    events
}

#[tokio::test]
async fn connect_learns_the_bot_account_with_the_bot_token_and_checks_the_gateway() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = Discord::new(config(&fake, TOKEN)).unwrap();
    let bot = d.connect().await.unwrap();
    assert_eq!(bot.id, BOT_ID);
    assert_eq!(bot.username, "chitin");
    let calls = fake.calls();
    let endpoints: Vec<Endpoint> = calls.iter().map(|c| c.endpoint).collect();
    assert_eq!(endpoints, [Endpoint::UsersMe, Endpoint::GatewayBot]);
    for c in &calls {
        assert_eq!(
            c.authorization.as_deref(),
            Some(format!("Bot {TOKEN}").as_str())
        );
    }
    assert!(
        fake.connections().is_empty(),
        "connect opens no gateway session"
    );
    assert_eq!(d.kind(), "discord");
    assert_eq!(d.limits().max_text_chars, MAX_TEXT);
    assert_eq!(d.limits().max_button_data, 100);
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_neither_errors_nor_debug_output_show_a_token() {
    let fake = FakeDiscord::start().await.unwrap();
    let wrong = "MTAwMDAwMDAwMDAwMDAwMDAx.GWrong.wrong_token-value_zzzzzzzzzzzzzz";
    let cfg = config(&fake, wrong);
    assert!(!format!("{cfg:?}").contains("wrong_token"));
    let d = Discord::new(cfg).unwrap();
    assert!(!format!("{d:?}").contains("wrong_token"));
    let err = d.connect().await.unwrap_err();
    assert!(matches!(err, ChannelError::Unauthorized(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong_token"), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    let err = d.poll(None).await.unwrap_err();
    assert!(matches!(err, ChannelError::Unauthorized(_)), "{err:?}");
    assert!(fake.connections().is_empty());

    // A send refused for the token says so, without it.
    let fake_chat = general();
    fake.add_channel(&fake_chat);
    let err = d
        .send(&out(&group_ref(), "hi", "chitin-d-1"))
        .await
        .unwrap_err();
    let SendError::Permanent(text) = &err else {
        panic!("{err:?}");
    };
    assert!(
        text.contains("token was refused") && !text.contains("wrong_token"),
        "{text}"
    );
}

#[tokio::test]
async fn the_gateway_identifies_with_the_token_and_the_documented_intents() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let identify = fake.identifies();
    assert_eq!(identify.len(), 1);
    assert_eq!(identify[0]["token"], TOKEN);
    // GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
    assert_eq!(INTENTS, 1 | 1 << 9 | 1 << 12 | 1 << 15);
    assert_eq!(identify[0]["intents"], INTENTS);
    assert_eq!(identify[0]["properties"]["browser"], "chitin");
    assert_eq!(fake.connections(), ["/?v=10&encoding=json"]);
    assert_eq!(d.intents(), INTENTS);
    assert!(fake.wait_until(|| d.gateway_connected()).await);

    // Without message content the privileged intent is not asked for.
    let fake2 = FakeDiscord::start().await.unwrap();
    let mut cfg = config(&fake2, TOKEN);
    cfg.message_content = false;
    let d2 = Discord::new(cfg).unwrap();
    d2.start(None).await.unwrap();
    assert!(fake2.wait_ready().await);
    assert_eq!(fake2.identifies()[0]["intents"], 1 | 1 << 9 | 1 << 12);
}

#[tokio::test]
async fn a_refused_intent_stops_the_session_with_an_error_that_says_what_to_enable() {
    let fake = FakeDiscord::start().await.unwrap();
    fake.refuse_message_content(true);
    let d = Discord::new(config(&fake, TOKEN)).unwrap();
    d.connect().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let err = loop {
        match d.poll(None).await {
            Err(e) => break e,
            Ok(p) => assert!(p.events.is_empty()),
        }
        assert!(tokio::time::Instant::now() < deadline, "no error reported");
    };
    assert!(matches!(err, ChannelError::Unauthorized(_)), "{err:?}");
    assert!(err.to_string().contains("4014"), "{err}");
    assert!(err.to_string().contains("Message Content intent"), "{err}");
    assert!(!err.to_string().contains(TOKEN));
    // Fixed in the Developer Portal: the next poll starts the session again.
    fake.refuse_message_content(false);
    let _ = d.poll(None).await;
    assert!(fake.wait_ready().await);
    assert_eq!(fake.identifies().len(), 2);
}

#[tokio::test]
async fn messages_in_dms_channels_and_threads_map_to_chats_with_the_mention_rules() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.push_guild(&guild()).unwrap();
    let late_thread = FakeChannel::thread(&general(), LATE_THREAD);
    let bot = fake.bot();
    let dm = FakeChannel::dm(DM);

    // The bot's message (for a reply to it).
    let mine = d
        .send(&out(&group_ref(), "I am the bot", "chitin-d-1"))
        .await
        .unwrap();
    let mine = fake.message(&mine.message_id).unwrap();

    let pushed = [
        fake.push_message(MessageBuilder::text(&dm, &alice(), "hello in a DM")),
        fake.push_message(MessageBuilder::text(&general(), &bob(), "hello all").nick("Bobby")),
        fake.push_message(MessageBuilder::text(&general(), &bob(), "hey").mentioning(&bot)),
        fake.push_message(
            MessageBuilder::text(&general(), &bob(), "hey role").mentioning_role(BOT_ROLE),
        ),
        fake.push_message(
            MessageBuilder::text(&general(), &bob(), "@everyone look")
                .field("mention_everyone", json!(true)),
        ),
        fake.push_message(MessageBuilder::text(&general(), &alice(), "a reply").reply_to(&mine)),
        fake.push_message(MessageBuilder::text(&thread(), &alice(), "in a thread")),
        fake.push_message(MessageBuilder::text(
            &late_thread,
            &alice(),
            "in a new thread",
        )),
        fake.push_message(
            MessageBuilder::text(&general(), &alice(), "mention other").mentioning(&bob()),
        ),
    ];
    let mut cursor = None;
    let events = collect(&d, &mut cursor, pushed.len()).await;
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let expected: Vec<String> = pushed
        .iter()
        .map(|p| format!("m:{}", p.message_id))
        .collect();
    assert_eq!(ids, expected);

    let m: Vec<&Message> = events.iter().map(message).collect();
    assert_eq!(
        m[0].chat,
        ChatRef {
            id: DM.into(),
            kind: ChatKind::Dm,
            thread: None
        }
    );
    assert_eq!(m[0].sender.id, alice().id);
    assert_eq!(m[0].sender.display, "Alice");
    assert!(!m[0].sender.is_bot);
    assert_eq!(m[0].text, "hello in a DM");
    assert_eq!(m[1].chat, group_ref());
    assert_eq!(m[1].sender.display, "Bobby");
    let mentioned: Vec<bool> = m.iter().map(|m| m.mentioned).collect();
    assert_eq!(
        mentioned,
        [true, false, true, true, false, true, false, false, false]
    );
    assert_eq!(m[5].reply_to.as_deref(), Some(mine["id"].as_str().unwrap()));
    assert_eq!(
        m[6].chat,
        ChatRef {
            id: GENERAL.into(),
            kind: ChatKind::Group,
            thread: Some(THREAD.into())
        }
    );
    // A thread the gateway did not announce is looked up once.
    assert_eq!(
        m[7].chat,
        ChatRef {
            id: GENERAL.into(),
            kind: ChatKind::Group,
            thread: Some(LATE_THREAD.into())
        }
    );
    let lookups: Vec<String> = fake
        .calls_to(Endpoint::GetChannel)
        .into_iter()
        .map(|c| c.path)
        .collect();
    assert_eq!(lookups, [format!("/channels/{LATE_THREAD}")]);
    // The cursor names the session and the last event's sequence number.
    let c = cursor.unwrap();
    let seq: u64 = c.split(':').next().unwrap().parse().unwrap();
    assert_eq!(Some(seq), pushed.last().unwrap().seq);
    assert!(c.contains(&fake.session_id().unwrap()), "{c}");
}

#[tokio::test]
async fn the_bots_own_other_bots_webhook_and_system_messages_are_not_returned() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    // The fake, as Discord, dispatches the bot's own message and its edit.
    let sent = d
        .send(&out(&group_ref(), "from the bot", "chitin-d-1"))
        .await
        .unwrap();
    d.edit(&group_ref(), &sent.message_id, "edited by the bot", None)
        .await
        .unwrap();
    fake.push_message(MessageBuilder::text(
        &general(),
        &FakeUser::other_bot("500000000000000009", "otherbot"),
        "beep",
    ));
    fake.push_message(
        MessageBuilder::text(&general(), &bob(), "via webhook")
            .field("webhook_id", json!("800000000000000001")),
    );
    fake.push_message(
        MessageBuilder::text(&general(), &bob(), "pinned a message").field("type", json!(6)),
    );
    fake.push_message(MessageBuilder::text(&general(), &bob(), ""));
    let human = fake.push_message(MessageBuilder::text(&general(), &bob(), "a person"));
    let events = collect(&d, &mut None, 1).await;
    assert_eq!(events[0].event_id, format!("m:{}", human.message_id));
}

#[tokio::test]
async fn an_edit_is_an_edited_event_whose_id_carries_the_edit_time() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let original = fake.push_message(MessageBuilder::text(&general(), &bob(), "frist"));
    let edit = fake.push_edit(&original.message, "first");
    let events = collect(&d, &mut None, 2).await;
    let ts = edit.message["edited_timestamp"].as_str().unwrap();
    assert_eq!(
        events[1].event_id,
        format!("e:{}:{ts}", original.message_id)
    );
    match &events[1].event {
        Event::Edited(m) => {
            assert_eq!(m.text, "first");
            assert_eq!(m.message_id, original.message_id);
        }
        other => panic!("{other:?}"),
    }
    // Discord adding a link preview (an update without an edit time) is not an edit.
    let mut unfurl = original.message.clone();
    unfurl["embeds"] = json!([{ "type": "link" }]);
    fake.push_dispatch("MESSAGE_UPDATE", unfurl).unwrap();
    assert!(d.poll(None).await.unwrap().events.is_empty());
}

fn approval_buttons() -> Vec<Button> {
    support::approve_deny("a:ap-1", "d:ap-1")
}

#[tokio::test]
async fn a_button_press_is_acknowledged_at_once_and_answered_privately_to_the_presser() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    let mut msg = out(&group_ref(), "Run `rm`?", "chitin-d-1");
    msg.buttons = approval_buttons();
    let sent = d.send(&msg).await.unwrap();
    let bot_message = fake.message(&sent.message_id).unwrap();
    let press = fake.push_button(&alice(), &bot_message, "d:ap-1");
    let events = collect(&d, &mut None, 1).await;
    assert_eq!(events[0].event_id, format!("i:{}", press.interaction_id));
    let Event::Button(b) = &events[0].event else {
        panic!("{:?}", events[0]);
    };
    let ButtonPress {
        callback_id,
        chat,
        message_id,
        sender,
        data,
    } = b;
    assert_eq!(chat, &group_ref());
    assert_eq!(message_id, &sent.message_id);
    assert_eq!(sender.id, alice().id);
    assert_eq!(data, "d:ap-1");
    assert!(callback_id.starts_with(&press.interaction_id));
    // Acknowledged by the adapter without waiting for the engine (Discord's 3 s).
    assert!(fake.wait_until(|| fake.callbacks().len() == 1).await);
    assert_eq!(fake.callbacks()[0].kind, 6);
    assert!(
        fake.calls_to(Endpoint::InteractionCallback)[0]
            .authorization
            .is_none()
    );

    d.answer_button(callback_id, "Denied. @everyone")
        .await
        .unwrap();
    let f = fake.followups();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].interaction_id, press.interaction_id);
    assert_eq!(f[0].body["content"], r"Denied. \@everyone");
    assert_eq!(f[0].body["flags"], 64 | 4);
    assert_eq!(f[0].body["allowed_mentions"], json!({ "parse": [] }));
    assert_eq!(fake.callbacks().len(), 1);
    // No error text carries the interaction token.
    let err = d.answer_button("1:2:not/a token", "x").await.unwrap_err();
    assert!(!err.to_string().contains("not/a"), "{err}");
}

#[tokio::test]
async fn a_press_whose_acknowledgement_failed_is_answered_with_an_ephemeral_message() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    let sent = d
        .send(&out(&group_ref(), "choose", "chitin-d-1"))
        .await
        .unwrap();
    fake.fail_next(Endpoint::InteractionCallback, 1, Failure::ServerError);
    let press = fake.push_button(&bob(), &fake.message(&sent.message_id).unwrap(), "a:x");
    let events = collect(&d, &mut None, 1).await;
    let Event::Button(b) = &events[0].event else {
        panic!("{:?}", events[0]);
    };
    assert!(
        fake.wait_until(|| fake.calls_to(Endpoint::InteractionCallback).len() == 1)
            .await
    );
    d.answer_button(&b.callback_id, "Approved.").await.unwrap();
    let cb = fake.callbacks();
    assert_eq!(cb.len(), 1);
    assert_eq!(cb[0].interaction_id, press.interaction_id);
    assert_eq!(cb[0].kind, 4);
    assert_eq!(cb[0].body["data"]["content"], "Approved.");
    assert_eq!(cb[0].body["data"]["flags"], 64 | 4);
    assert!(fake.followups().is_empty());
}

#[tokio::test]
async fn a_send_pings_nobody_replies_by_reference_and_carries_a_nonce_from_the_delivery_id() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let asked = fake.push_message(MessageBuilder::text(&general(), &bob(), "question"));
    let text = "@everyone **hi** <@500000000000000002> [x](https://evil.example/a_b)";
    let mut msg = out(&group_ref(), text, "chitin-discord-42");
    msg.reply_to = Some(asked.message_id.clone());
    let sent = d.send(&msg).await.unwrap();
    let s = &fake.sent()[0];
    assert_eq!(sent.message_id, s.message_id);
    assert_eq!(s.channel_id, GENERAL);
    assert_eq!(s.content, escape_markdown(text));
    assert_eq!(
        s.content,
        r"\@everyone \*\*hi\*\* \<\@500000000000000002\> \[x\](https://evil.example/a_b)"
    );
    assert_eq!(
        s.body["allowed_mentions"],
        json!({ "parse": [], "replied_user": false })
    );
    assert_eq!(
        s.body["message_reference"],
        json!({ "message_id": asked.message_id, "fail_if_not_exists": false })
    );
    assert_eq!(s.body["nonce"], "chitin-discord-42");
    assert_eq!(s.body["enforce_nonce"], true);
    assert_eq!(s.body["flags"], 4, "link previews suppressed");
    assert!(s.body.get("components").is_none());
    assert_eq!(s.message["type"], 19);

    // A reply to a message that is gone is still sent.
    let mut gone = out(&group_ref(), "still here", "chitin-discord-43");
    gone.reply_to = Some("799999999999999999".into());
    d.send(&gone).await.unwrap();
    assert_eq!(fake.sent()[1].message["type"], 0);

    // Into a thread, the message goes to the thread.
    fake.add_channel(&thread());
    let t = ChatRef {
        thread: Some(THREAD.into()),
        ..group_ref()
    };
    d.send(&out(&t, "in the thread", "chitin-discord-44"))
        .await
        .unwrap();
    assert_eq!(fake.sent()[2].channel_id, THREAD);
    d.typing(&t).await.unwrap();
    assert_eq!(fake.typing(), [THREAD]);
}

#[tokio::test]
async fn a_retried_send_with_the_same_delivery_id_does_not_post_twice() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    fake.fail_next(Endpoint::CreateMessage, 1, Failure::DropAfterHandling);
    let msg = out(&group_ref(), "once", "chitin-discord-7");
    let err = d.send(&msg).await.unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Transient {
                maybe_delivered: true,
                ..
            }
        ),
        "{err:?}"
    );
    let again = d.send(&msg).await.unwrap();
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(again.message_id, sent[0].message_id);
    assert_eq!(fake.deduplicated(), 1);
    // A long delivery id is hashed into 25 characters or fewer, the same on every retry.
    let long = out(
        &group_ref(),
        "long id",
        "chitin-a-very-long-channel-name-123456",
    );
    d.send(&long).await.unwrap();
    d.send(&long).await.unwrap();
    assert_eq!(fake.sent().len(), 2);
    let nonce = fake.sent()[1].body["nonce"].as_str().unwrap().to_owned();
    assert!(nonce.len() <= 25, "{nonce}");
    assert!(!d.sends_are_idempotent());
}

#[tokio::test]
async fn buttons_are_one_row_of_components_and_an_edit_without_buttons_removes_them() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    let mut msg = out(&group_ref(), "Approve?", "chitin-d-1");
    msg.buttons = approval_buttons();
    let sent = d.send(&msg).await.unwrap();
    assert_eq!(
        fake.sent()[0].body["components"],
        json!([{ "type": 1, "components": [
            { "type": 2, "style": 1, "label": "Approve", "custom_id": "a:ap-1" },
            { "type": 2, "style": 4, "label": "Deny", "custom_id": "d:ap-1" },
        ]}])
    );
    d.edit(&group_ref(), &sent.message_id, "Approved by alice.", None)
        .await
        .unwrap();
    let e = &fake.edits()[0];
    assert_eq!(e.message_id, sent.message_id);
    assert_eq!(e.body["components"], json!([]));
    assert_eq!(e.body["content"], "Approved by alice.");
    assert_eq!(
        e.body["allowed_mentions"],
        json!({ "parse": [], "replied_user": false })
    );
    assert_eq!(
        fake.message(&sent.message_id).unwrap()["components"],
        json!([])
    );
    let buttons = approval_buttons();
    d.edit(&group_ref(), &sent.message_id, "Again?", Some(&buttons))
        .await
        .unwrap();
    assert_eq!(
        fake.message(&sent.message_id).unwrap()["components"][0]["components"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Buttons Discord would refuse are refused before a request.
    let calls = fake.calls().len();
    let mut bad = out(&group_ref(), "x", "chitin-d-2");
    bad.buttons = vec![Button {
        label: "A".into(),
        data: "x".repeat(101),
    }];
    assert!(matches!(d.send(&bad).await, Err(SendError::Permanent(_))));
    bad.buttons = vec![
        Button {
            label: "A".into(),
            data: "same".into(),
        },
        Button {
            label: "B".into(),
            data: "same".into(),
        },
    ];
    assert!(matches!(d.send(&bad).await, Err(SendError::Permanent(_))));
    let err = d
        .edit(&group_ref(), "../../x", "y", None)
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Permanent(_)), "{err:?}");
    assert_eq!(fake.calls().len(), calls);
    // An unknown message is refused by Discord: permanent.
    let err = d
        .edit(&group_ref(), "799999999999999999", "y", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::Permanent(ref t) if t.contains("Unknown Message")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_429_is_rate_limited_with_discords_wait_for_a_bucket_and_globally() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    fake.fail_next(
        Endpoint::CreateMessage,
        1,
        Failure::RateLimited {
            retry_after: 0.25,
            global: false,
        },
    );
    let err = d
        .send(&out(&group_ref(), "a", "chitin-d-1"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SendError::RateLimited {
            retry_after: Duration::from_millis(250)
        }
    );
    // The bucket is empty for 0.25 s: the next send waits for it, then goes through.
    d.send(&out(&group_ref(), "b", "chitin-d-2")).await.unwrap();

    fake.fail_next(
        Endpoint::CreateMessage,
        1,
        Failure::RateLimited {
            retry_after: 42.5,
            global: true,
        },
    );
    let err = d
        .send(&out(&group_ref(), "c", "chitin-d-3"))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SendError::RateLimited {
            retry_after: Duration::from_millis(42_500)
        }
    );
    // The global limit holds every other request back (without sending it)...
    let calls = fake.calls().len();
    let err = d.typing(&group_ref()).await.unwrap_err();
    let SendError::RateLimited { retry_after } = err else {
        panic!("{err:?}");
    };
    assert!(retry_after > Duration::from_secs(40) && retry_after <= Duration::from_millis(42_500));
    assert_eq!(fake.calls().len(), calls);
    assert_eq!(fake.rate_limited(), 0);
}

#[tokio::test]
async fn an_empty_bucket_is_waited_for_instead_of_sending_into_a_429() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    fake.set_bucket(Endpoint::CreateMessage, 1, 0.3);
    for i in 0..3 {
        d.send(&out(&group_ref(), "tick", &format!("chitin-d-{i}")))
            .await
            .unwrap();
    }
    assert_eq!(fake.sent().len(), 3);
    assert_eq!(
        fake.rate_limited(),
        0,
        "a request went out with the bucket empty"
    );
}

#[tokio::test]
async fn server_errors_and_drops_are_transient_and_refusals_permanent() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.add_channel(&general());
    let x = out(&group_ref(), "x", "chitin-d-1");
    let send = || d.send(&x);
    fake.fail_next(Endpoint::CreateMessage, 1, Failure::ServerError);
    assert!(matches!(
        send().await,
        Err(SendError::Transient {
            maybe_delivered: true,
            ..
        })
    ));
    fake.fail_next(Endpoint::CreateMessage, 1, Failure::BadGateway);
    assert!(matches!(
        send().await,
        Err(SendError::Transient {
            maybe_delivered: true,
            ..
        })
    ));
    fake.fail_next(Endpoint::CreateMessage, 1, Failure::Drop);
    assert!(matches!(send().await, Err(SendError::Transient { .. })));
    fake.fail_next(
        Endpoint::CreateMessage,
        1,
        Failure::Status {
            status: 403,
            code: 50013,
            message: "Missing Permissions".into(),
        },
    );
    let err = send().await.unwrap_err();
    assert!(
        matches!(&err, SendError::Permanent(t) if t.contains("Missing Permissions")),
        "{err:?}"
    );
    let unknown = ChatRef {
        id: "799999999999999999".into(),
        ..group_ref()
    };
    let err = d.send(&out(&unknown, "x", "chitin-d-2")).await.unwrap_err();
    assert!(
        matches!(&err, SendError::Permanent(t) if t.contains("Unknown Channel")),
        "{err:?}"
    );
    assert!(matches!(
        d.send(&out(&group_ref(), "  ", "chitin-d-3")).await,
        Err(SendError::Permanent(_))
    ));

    // Nobody listening: not delivered.
    let mut cfg = config(&fake, TOKEN);
    cfg.api_base = format!("http://{}/api/v10", closed_port()).parse().unwrap();
    let offline = Discord::new(cfg).unwrap();
    let err = offline
        .send(&out(&group_ref(), "x", "chitin-d-4"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SendError::Transient {
                maybe_delivered: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(matches!(
        offline.connect().await,
        Err(ChannelError::Transient(_))
    ));
}

/// The session id and sequence number a cursor names.
fn cursor_parts(c: &str) -> (u64, String) {
    let mut parts = c.splitn(3, ':');
    let seq = parts.next().unwrap().parse().unwrap();
    (seq, parts.next().unwrap().to_owned())
}

#[tokio::test]
async fn a_dropped_socket_is_resumed_and_the_events_missed_meanwhile_arrive_exactly_once() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let first = fake.push_message(MessageBuilder::text(&general(), &bob(), "one"));
    let mut cursor = None;
    collect(&d, &mut cursor, 1).await;
    let session = fake.session_id().unwrap();

    assert!(fake.drop_gateway());
    // Pushed while no connection is attached: only a resume can bring them.
    let missed = [
        fake.push_message(MessageBuilder::text(&general(), &bob(), "two")),
        fake.push_message(MessageBuilder::text(&general(), &alice(), "three")),
    ];
    assert!(missed.iter().all(|m| m.seq.is_some()));
    let events = collect(&d, &mut cursor, 2).await;
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        ids,
        [
            format!("m:{}", missed[0].message_id),
            format!("m:{}", missed[1].message_id)
        ]
    );

    let resumes = fake.resumes();
    assert_eq!(resumes.len(), 1);
    assert_eq!(resumes[0]["session_id"], session.as_str());
    assert_eq!(resumes[0]["token"], TOKEN);
    assert_eq!(resumes[0]["seq"], first.seq.unwrap());
    assert_eq!(fake.identifies().len(), 1);
    assert_eq!(fake.connections()[1], "/resume?v=10&encoding=json");
    // And the session goes on.
    let later = fake.push_message(MessageBuilder::text(&general(), &bob(), "four"));
    let events = collect(&d, &mut cursor, 1).await;
    assert_eq!(events[0].event_id, format!("m:{}", later.message_id));
}

#[tokio::test]
async fn a_poll_with_an_older_cursor_gets_the_uncommitted_events_again() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.push_message(MessageBuilder::text(&general(), &bob(), "one"));
    let mut cursor = None;
    collect(&d, &mut cursor, 1).await;
    let committed = cursor.clone();
    let two = fake.push_message(MessageBuilder::text(&general(), &bob(), "two"));
    let first_try = collect_once(&d, committed.as_deref()).await;
    assert_eq!(
        first_try.events[0].event_id,
        format!("m:{}", two.message_id)
    );
    // The engine could not store them and polls again from its last committed cursor.
    let second_try = d.poll(committed.as_deref()).await.unwrap();
    assert_eq!(first_try, second_try);
    // Stored: the next poll acknowledges them.
    let after = d.poll(first_try.cursor.as_deref()).await.unwrap();
    assert!(after.events.is_empty(), "{after:?}");
}

/// One poll that returns events (waiting for them).
async fn collect_once(d: &Discord, cursor: Option<&str>) -> chitin_channels::Polled {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let p = d.poll(cursor).await.unwrap();
        if !p.events.is_empty() {
            return p;
        }
        assert!(tokio::time::Instant::now() < deadline, "no events arrived");
    }
}

#[tokio::test]
async fn a_reconnect_request_is_resumed_without_a_new_identify() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    assert!(fake.send_reconnect());
    assert!(
        fake.wait_until(|| fake.resumes().len() == 1 && fake.session_live())
            .await
    );
    let m = fake.push_message(MessageBuilder::text(&general(), &bob(), "after"));
    let events = collect(&d, &mut None, 1).await;
    assert_eq!(events[0].event_id, format!("m:{}", m.message_id));
    assert_eq!(fake.identifies().len(), 1);
}

#[tokio::test]
async fn an_invalid_session_leads_to_a_fresh_identify() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let old = fake.session_id().unwrap();
    assert!(fake.invalidate_session(false));
    assert!(
        fake.wait_until(|| fake.identifies().len() == 2 && fake.session_live())
            .await
    );
    assert!(fake.resumes().is_empty());
    assert_ne!(fake.session_id().unwrap(), old);
    let m = fake.push_message(MessageBuilder::text(&general(), &bob(), "new session"));
    let mut cursor = None;
    let events = collect(&d, &mut cursor, 1).await;
    assert_eq!(events[0].event_id, format!("m:{}", m.message_id));
    assert_eq!(cursor_parts(&cursor.unwrap()).1, fake.session_id().unwrap());
}

#[tokio::test]
async fn a_resumable_invalid_session_is_resumed() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    assert!(fake.invalidate_session(true));
    assert!(
        fake.wait_until(|| fake.resumes().len() == 1 && fake.session_live())
            .await
    );
    assert_eq!(fake.identifies().len(), 1);
    let m = fake.push_message(MessageBuilder::text(&general(), &bob(), "still here"));
    assert_eq!(
        collect(&d, &mut None, 1).await[0].event_id,
        format!("m:{}", m.message_id)
    );
}

#[tokio::test]
async fn a_zombie_connection_without_heartbeat_acks_is_closed_and_resumed() {
    let fake = FakeDiscord::start().await.unwrap();
    fake.set_heartbeat_interval(200);
    let d = started(&fake).await;
    let m1 = fake.push_message(MessageBuilder::text(&general(), &bob(), "one"));
    collect(&d, &mut None, 1).await;
    assert!(fake.wait_until(|| !fake.heartbeats().is_empty()).await);
    assert!(fake.stop_acking_heartbeats());
    assert!(
        fake.wait_until(|| fake.resumes().len() == 1 && fake.session_live())
            .await
    );
    // Heartbeats carry the last sequence number.
    assert!(
        fake.heartbeats()
            .iter()
            .any(|h| h == &json!(m1.seq.unwrap()))
    );
    assert_eq!(fake.resumes()[0]["seq"], m1.seq.unwrap());
    let m2 = fake.push_message(MessageBuilder::text(&general(), &bob(), "two"));
    assert_eq!(
        collect(&d, &mut None, 1).await[0].event_id,
        format!("m:{}", m2.message_id)
    );
}

#[tokio::test]
async fn a_heartbeat_request_is_answered_at_once() {
    let fake = FakeDiscord::start().await.unwrap();
    let _d = started(&fake).await;
    assert!(
        fake.heartbeats().is_empty(),
        "the first heartbeat is ~41 s away"
    );
    assert!(fake.request_heartbeat());
    assert!(fake.wait_until(|| fake.heartbeats().len() == 1).await);
}

#[tokio::test]
async fn after_a_restart_the_cursor_resumes_the_session_and_uncommitted_events_are_replayed() {
    let fake = FakeDiscord::start().await.unwrap();
    let a = started(&fake).await;
    fake.push_message(MessageBuilder::text(&general(), &bob(), "committed"));
    let mut cursor = None;
    collect(&a, &mut cursor, 1).await;
    let committed = cursor.clone().unwrap();
    // Received but not committed when the process stops.
    let uncommitted = fake.push_message(MessageBuilder::text(&general(), &bob(), "in flight"));
    let mut c = cursor.clone();
    collect(&a, &mut c, 1).await;
    drop(a);
    assert!(fake.wait_until(|| !fake.session_live()).await);
    let while_down = fake.push_message(MessageBuilder::text(&general(), &alice(), "while down"));
    assert!(while_down.seq.is_some());

    let b = Discord::new(config(&fake, TOKEN)).unwrap();
    b.connect().await.unwrap();
    let mut cursor = Some(committed.clone());
    let events = collect(&b, &mut cursor, 2).await;
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        ids,
        [
            format!("m:{}", uncommitted.message_id),
            format!("m:{}", while_down.message_id)
        ]
    );
    let (seq, session) = cursor_parts(&committed);
    let r = fake.resumes();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["session_id"], session.as_str());
    assert_eq!(r[0]["seq"], seq);
    assert_eq!(fake.identifies().len(), 1);
}

#[tokio::test]
async fn a_disconnected_adapter_ends_its_session_and_a_later_poll_resumes_from_the_given_cursor() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    fake.push_message(MessageBuilder::text(&general(), &bob(), "committed"));
    let mut cursor = None;
    collect(&d, &mut cursor, 1).await;
    let committed = cursor.clone().unwrap();
    // Read but not committed when the channel moves to another replica.
    let uncommitted = fake.push_message(MessageBuilder::text(&general(), &bob(), "in flight"));
    let mut c = cursor.clone();
    collect(&d, &mut c, 1).await;
    d.disconnect().await;
    assert!(fake.wait_until(|| !fake.session_live()).await);
    let meanwhile = fake.push_message(MessageBuilder::text(&general(), &alice(), "meanwhile"));
    assert!(meanwhile.seq.is_some());

    // The channel comes back to this adapter with the cursor committed last.
    let mut cursor = Some(committed.clone());
    let events = collect(&d, &mut cursor, 2).await;
    let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(
        ids,
        [
            format!("m:{}", uncommitted.message_id),
            format!("m:{}", meanwhile.message_id)
        ]
    );
    let (seq, session) = cursor_parts(&committed);
    let r = fake.resumes();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0]["session_id"], session.as_str());
    assert_eq!(r[0]["seq"], seq);
    assert_eq!(fake.identifies().len(), 1);
}

#[tokio::test]
async fn after_a_restart_with_an_expired_session_messages_sent_while_down_are_lost() {
    let fake = FakeDiscord::start().await.unwrap();
    let a = started(&fake).await;
    fake.push_message(MessageBuilder::text(&general(), &bob(), "before"));
    let mut cursor = None;
    collect(&a, &mut cursor, 1).await;
    drop(a);
    assert!(fake.wait_until(|| !fake.session_live()).await);
    fake.expire_session();
    let lost = fake.push_message(MessageBuilder::text(&general(), &bob(), "while down"));
    assert_eq!(lost.seq, None, "no session receives it");

    let b = Discord::new(config(&fake, TOKEN)).unwrap();
    b.start(cursor.as_deref()).await.unwrap();
    // The resume is refused (Invalid Session), then a fresh identify after 1-5 s.
    assert!(
        fake.wait_until(|| fake.identifies().len() == 2 && fake.session_live())
            .await
    );
    assert_eq!(fake.resumes().len(), 1);
    let after = fake.push_message(MessageBuilder::text(&general(), &bob(), "after"));
    let events = collect(&b, &mut cursor, 1).await;
    assert_eq!(events[0].event_id, format!("m:{}", after.message_id));
}

#[tokio::test]
async fn attachments_are_fetched_only_from_discords_hosts_and_within_the_limit() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let url = fake.put_file("notes.txt", b"hello file".to_vec());
    let m = fake.push_message(
        MessageBuilder::text(&general(), &bob(), "see attached").attachment(
            "notes.txt",
            "text/plain",
            10,
            &url,
        ),
    );
    let events = collect(&d, &mut None, 1).await;
    let a = &message(&events[0]).attachments[0];
    assert_eq!(
        a,
        &Attachment {
            file_ref: url.clone(),
            name: Some("notes.txt".into()),
            mime: Some("text/plain".into()),
            size: Some(10),
        }
    );
    assert_eq!(message(&events[0]).message_id, m.message_id);
    assert_eq!(d.fetch_attachment(a, 1024).await.unwrap(), b"hello file");
    assert!(matches!(
        d.fetch_attachment(a, 5).await,
        Err(ChannelError::TooLarge { max_bytes: 5 })
    ));
    // The announced size is believed too small: the bytes are counted as they come.
    let lying = Attachment {
        size: Some(1),
        ..a.clone()
    };
    assert!(matches!(
        d.fetch_attachment(&lying, 5).await,
        Err(ChannelError::TooLarge { .. })
    ));
    assert_eq!(fake.downloads().len(), 2);
    for elsewhere in [
        "http://example.com/file",
        "https://cdn.discordapp.com.evil.example/x",
        "file:///etc/passwd",
    ] {
        let other = Attachment {
            file_ref: elsewhere.into(),
            ..a.clone()
        };
        let err = d.fetch_attachment(&other, 1024).await.unwrap_err();
        assert!(
            matches!(err, ChannelError::Protocol(_)),
            "{elsewhere}: {err:?}"
        );
    }
    assert_eq!(fake.downloads().len(), 2);
}

#[tokio::test]
async fn a_full_buffer_pauses_the_connection_and_resumes_without_losing_events() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = started(&fake).await;
    let n = chitin_channels::discord::MAX_BUFFERED + 50;
    let mut expected = Vec::with_capacity(n);
    for i in 0..n {
        let m = fake.push_message(MessageBuilder::text(&general(), &bob(), &format!("m{i}")));
        expected.push(format!("m:{}", m.message_id));
    }
    // The adapter closes the connection at the limit (the session stays), ...
    assert!(fake.wait_until(|| !fake.session_live()).await);
    assert!(fake.resumes().is_empty());
    // ... and polling drains the buffer, then it resumes and the rest is replayed.
    let mut cursor = None;
    let events = collect(&d, &mut cursor, n).await;
    let ids: Vec<String> = events.into_iter().map(|e| e.event_id).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), n);
    assert_eq!(ids, expected);
    assert_eq!(fake.resumes().len(), 1);
    assert_eq!(fake.identifies().len(), 1);
}

#[tokio::test]
async fn the_adapter_serves_no_webhook_route() {
    let fake = FakeDiscord::start().await.unwrap();
    let d = Discord::new(config(&fake, TOKEN)).unwrap();
    let req = chitin_channels::WebhookRequest {
        method: "POST",
        route: "webhook",
        query: "",
        headers: &[],
        body: b"{}",
    };
    assert!(matches!(d.webhook(&req), Err(ChannelError::NoSuchRoute)));
}
