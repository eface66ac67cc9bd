//! The Telegram adapter against the fake Bot API server (`telegram::fake`), through the real
//! HTTP client and the real wire format.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::time::Duration;

use chitin_channels::telegram::fake::{
    Failure, FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN,
};
use chitin_channels::telegram::{Telegram, TelegramConfig, TelegramMode, default_allowed_updates};
use chitin_channels::text::{split, utf16_len};
use chitin_channels::{
    Button, ChannelError, ChatKind, ChatRef, Event, Inbound, Message, OutMessage, Platform,
    SendError,
};
use serde_json::json;
use support::{Shown, chat, closed_port, message, text_to};
use zeroize::Zeroizing;

const SECRET: &str = "wh-secret_0123456789abcdef";

fn config(fake: &FakeTelegram, token: &str) -> TelegramConfig {
    let mut c = TelegramConfig::new(Zeroizing::new(token.to_owned())).unwrap();
    c.api_base = fake.api_base();
    // An empty poll answers at once (tests never wait a poll timeout out).
    c.poll_timeout_secs = 0;
    c
}

fn config_at(addr: std::net::SocketAddr, token: &str) -> TelegramConfig {
    let mut c = TelegramConfig::new(Zeroizing::new(token.to_owned())).unwrap();
    c.api_base = format!("http://{addr}/").parse().unwrap();
    c
}

async fn connected(fake: &FakeTelegram) -> Telegram {
    let tg = Telegram::new(config(fake, TOKEN)).unwrap();
    tg.connect().await.unwrap();
    tg
}

fn webhook_adapter(fake: &FakeTelegram) -> Telegram {
    let mut c = config(fake, TOKEN);
    c.mode = TelegramMode::Webhook;
    c.webhook_secret = Some(Zeroizing::new(SECRET.into()));
    Telegram::new(c).unwrap()
}

fn alice() -> FakeUser {
    FakeUser::new(1001, "Alice").with_username("alice")
}

fn bob() -> FakeUser {
    FakeUser::new(1002, "Bob")
}

fn group() -> FakeChat {
    FakeChat::supergroup(-100_555, "Team")
}

fn out(chat: &ChatRef, text: &str) -> OutMessage {
    text_to(chat, text, "test-1")
}

fn dm_ref(user: &FakeUser) -> ChatRef {
    chat(&user.id.to_string(), ChatKind::Dm)
}

fn group_ref() -> ChatRef {
    chat(&group().id.to_string(), ChatKind::Group)
}

/// Polls once and acknowledges (a second poll with the cursor), returning the first batch.
async fn poll_all(tg: &Telegram) -> Vec<Inbound> {
    let polled = tg.poll(None).await.unwrap();
    if let Some(c) = &polled.cursor {
        let after = tg.poll(Some(c)).await.unwrap();
        assert!(after.events.is_empty(), "{:?}", after.events);
    }
    polled.events
}

#[tokio::test]
async fn connect_learns_the_bot_account_and_removes_a_webhook_in_polling_mode() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = Telegram::new(config(&fake, TOKEN)).unwrap();
    let bot = tg.connect().await.unwrap();
    assert_eq!(bot.id, "7000000001");
    assert_eq!(bot.username, "chitin_test_bot");
    let methods: Vec<String> = fake.calls().into_iter().map(|c| c.method).collect();
    assert_eq!(methods, ["getMe", "deleteWebhook"]);
    assert_eq!(
        fake.calls_of("deleteWebhook")[0]["drop_pending_updates"],
        false
    );
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_the_error_does_not_show_it() {
    let fake = FakeTelegram::start().await.unwrap();
    let wrong = "7000000001:WrongTokenValue_zzzzzzzzzzzzzzzzzzzz";
    let tg = Telegram::new(config(&fake, wrong)).unwrap();
    let err = tg.connect().await.unwrap_err();
    assert_eq!(err, ChannelError::Unauthorized("Unauthorized".into()));
    assert_eq!(
        err.to_string(),
        "the platform refused the bot's credentials: Unauthorized; check the token \
         (`chitin secrets set`) and `api_base`"
    );
    assert!(
        fake.calls().is_empty(),
        "the fake records only calls with its token"
    );
}

#[tokio::test]
async fn direct_and_group_messages_map_to_events_with_mentions_commands_and_senders() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    let dm = FakeChat::private(&alice());
    let g = group();
    let p1 = fake.push_message(MessageBuilder::text(&dm, &alice(), "hello there"));
    fake.push_message(MessageBuilder::text(&dm, &alice(), "/start"));
    fake.push_message(MessageBuilder::text(&g, &bob(), "hello all"));
    fake.push_message(MessageBuilder::text(
        &g,
        &bob(),
        "hey @Chitin_Test_Bot 😀 what's up",
    ));
    fake.push_message(MessageBuilder::text(&g, &bob(), "/help@chitin_test_bot"));
    fake.push_message(MessageBuilder::text(&g, &bob(), "/help"));
    fake.push_message(MessageBuilder::text(&g, &bob(), "ask @chitin_test_bot_fan"));

    let events = poll_all(&tg).await;
    assert_eq!(events.len(), 7);
    assert_eq!(events[0].event_id, format!("u:{}", p1.update_id));
    let first = message(&events[0]);
    assert_eq!(
        first.chat,
        ChatRef {
            id: "1001".into(),
            kind: ChatKind::Dm,
            thread: None
        }
    );
    assert_eq!(first.message_id, p1.message_id.to_string());
    assert_eq!(first.sender.id, "1001");
    assert_eq!(first.sender.display, "Alice");
    assert!(!first.sender.is_bot);
    assert_eq!(first.text, "hello there");
    assert_eq!(first.reply_to, None);
    let mentioned: Vec<bool> = events.iter().map(|e| message(e).mentioned).collect();
    assert_eq!(mentioned, [false, true, false, true, true, false, false]);
    let kinds: Vec<ChatKind> = events.iter().map(|e| message(e).chat.kind).collect();
    assert_eq!(kinds[2..], [ChatKind::Group; 5]);
    assert_eq!(message(&events[2]).chat.id, "-100555");
}

#[tokio::test]
async fn a_reply_to_the_bot_is_addressed_to_it_and_a_forum_topic_is_a_thread() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    let forum = FakeChat::forum(-100_777, "Forum");
    fake.add_chat(&forum);
    fake.add_chat(&group());
    let sent = tg.send(&out(&group_ref(), "I am the bot")).await.unwrap();
    let bot_msg = fake.sent()[0].message.clone();
    assert_eq!(sent.message_id, fake.sent()[0].message_id.to_string());
    let human = fake.push_message(MessageBuilder::text(
        &group(),
        &alice(),
        "a human's message",
    ));

    fake.push_message(MessageBuilder::text(&group(), &bob(), "thanks").reply_to(&bot_msg));
    fake.push_message(MessageBuilder::text(&group(), &bob(), "+1").reply_to(&human.message));
    // Every message in a topic implicitly replies to the topic's first message, which the bot
    // created here: that alone must not count as addressing the bot.
    fake.push_message(MessageBuilder::text(&forum, &bob(), "in the topic").in_topic(77));
    fake.push_message(MessageBuilder::text(&forum, &bob(), "@chitin_test_bot hi").in_topic(77));

    let events = poll_all(&tg).await;
    let msgs: Vec<&Message> = events[1..].iter().map(message).collect();
    assert!(msgs[0].mentioned);
    assert_eq!(msgs[0].reply_to, Some(sent.message_id.clone()));
    assert!(!msgs[1].mentioned);
    assert_eq!(msgs[1].reply_to, Some(human.message_id.to_string()));
    assert!(!msgs[2].mentioned);
    assert_eq!(msgs[2].reply_to, None);
    assert_eq!(
        msgs[2].chat,
        ChatRef {
            id: "-100777".into(),
            kind: ChatKind::Group,
            thread: Some("77".into())
        }
    );
    assert!(msgs[3].mentioned);
    assert_eq!(msgs[3].chat.thread.as_deref(), Some("77"));
}

#[tokio::test]
async fn media_captions_edits_and_unsupported_updates_map_as_documented() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    let g = group();
    fake.push_message(MessageBuilder::photo(
        &g,
        &bob(),
        "PHOTO-LARGE",
        Some("@chitin_test_bot look"),
    ));
    fake.push_message(MessageBuilder::document(
        &FakeChat::private(&alice()),
        &alice(),
        "DOC-1",
        "report.pdf",
        "application/pdf",
        4242,
        None,
    ));
    let original = fake.push_message(MessageBuilder::text(&g, &bob(), "typo"));
    fake.push_edit(&original.message, "fixed");
    fake.push_message_as(
        "channel_post",
        MessageBuilder::text(&FakeChat::channel(-100_999, "News"), &bob(), "post"),
    );
    fake.push_message(MessageBuilder::text(&g, &bob(), "anon").on_behalf_of(&g));
    fake.push_message(
        MessageBuilder::text(&g, &bob(), "").field("new_chat_members", json!([bob().json()])),
    );
    fake.push_update("my_chat_member", json!({ "chat": g.json() }));
    // A message whose fields are not what the Bot API documents: ignored, not a stuck queue.
    fake.push_update("message", json!({ "message_id": "not a number" }));

    let events = poll_all(&tg).await;
    assert_eq!(events.len(), 9);
    let photo = message(&events[0]);
    assert_eq!(photo.text, "@chitin_test_bot look");
    assert!(photo.mentioned, "a mention in a caption counts");
    assert_eq!(photo.attachments.len(), 1);
    assert_eq!(photo.attachments[0].file_ref, "PHOTO-LARGE");
    assert_eq!(photo.attachments[0].mime.as_deref(), Some("image/jpeg"));
    let doc = message(&events[1]);
    assert_eq!(doc.text, "");
    assert_eq!(doc.attachments[0].file_ref, "DOC-1");
    assert_eq!(doc.attachments[0].name.as_deref(), Some("report.pdf"));
    assert_eq!(doc.attachments[0].mime.as_deref(), Some("application/pdf"));
    assert_eq!(doc.attachments[0].size, Some(4242));
    match &events[3].event {
        Event::Edited(m) => {
            assert_eq!(m.text, "fixed");
            assert_eq!(m.message_id, original.message_id.to_string());
        }
        other => panic!("expected an edit, got {other:?}"),
    }
    let ignored: Vec<String> = events[4..]
        .iter()
        .map(|e| match &e.event {
            Event::Ignored { what } => what.clone(),
            other => panic!("expected Ignored, got {other:?}"),
        })
        .collect();
    assert_eq!(
        ignored,
        [
            "channel_post",
            "a message sent on behalf of a chat (anonymous admin or channel)",
            "a service message or content Chitin does not handle",
            "my_chat_member",
            "an update this adapter cannot read",
        ]
    );
    assert_eq!(fake.pending(), 0, "ignored updates are acknowledged too");
}

#[tokio::test]
async fn the_cursor_acknowledges_and_without_it_updates_are_delivered_again() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    let dm = FakeChat::private(&alice());
    let a = fake.push_message(MessageBuilder::text(&dm, &alice(), "one"));
    let b = fake.push_message(MessageBuilder::text(&dm, &alice(), "two"));

    let first = tg.poll(None).await.unwrap();
    let ids: Vec<&str> = first.events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids,
        [format!("u:{}", a.update_id), format!("u:{}", b.update_id)]
    );
    let cursor = first.cursor.clone().unwrap();
    assert_eq!(cursor, (b.update_id + 1).to_string());

    // The engine crashed before storing the cursor: the same events come again.
    let again = tg.poll(None).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(fake.pending(), 2);

    // With the cursor: acknowledged, not returned again, the cursor unchanged.
    let after = tg.poll(Some(&cursor)).await.unwrap();
    assert!(after.events.is_empty());
    assert_eq!(after.cursor, None);
    assert_eq!(fake.pending(), 0);
    let c = fake.push_message(MessageBuilder::text(&dm, &alice(), "three"));
    let next = tg.poll(Some(&cursor)).await.unwrap();
    assert_eq!(next.events.len(), 1);
    assert_eq!(next.events[0].event_id, format!("u:{}", c.update_id));

    let polls = fake.calls_of("getUpdates");
    assert_eq!(polls[0].get("offset"), None);
    assert_eq!(polls[2]["offset"], b.update_id + 1);
    assert_eq!(polls[2]["timeout"], 0);
    assert_eq!(
        polls[2]["allowed_updates"],
        json!(default_allowed_updates())
    );
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_update_arrives() {
    let fake = FakeTelegram::start().await.unwrap();
    let mut c = config(&fake, TOKEN);
    c.poll_timeout_secs = 600;
    let tg = Telegram::new(c).unwrap();
    tg.connect().await.unwrap();
    let polling = tokio::spawn(async move { tg.poll(None).await });
    let pushed = fake.push_message(MessageBuilder::text(
        &FakeChat::private(&alice()),
        &alice(),
        "wake up",
    ));
    let polled = polling.await.unwrap().unwrap();
    assert_eq!(polled.events[0].event_id, format!("u:{}", pushed.update_id));
}

#[tokio::test]
async fn text_with_markup_arrives_verbatim_as_plain_text() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&FakeChat::private(&alice()));
    let text = "*bold* _it_ <b>html</b> [click](https://evil.example/?q=secret) @admin `code`";
    tg.send(&out(&dm_ref(&alice()), text)).await.unwrap();
    let sent = &fake.sent()[0];
    assert_eq!(sent.text, text);
    assert_eq!(sent.parse_mode, None);
    assert_eq!(sent.params.get("parse_mode"), None);
    assert_eq!(sent.params.get("entities"), None);
    assert_eq!(sent.params["link_preview_options"]["is_disabled"], true);
    assert_eq!(sent.chat_id, 1001);
}

#[tokio::test]
async fn a_reply_in_a_topic_goes_to_the_topic_and_typing_shows_there() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    let forum = FakeChat::forum(-100_777, "Forum");
    let asked = fake.push_message(MessageBuilder::text(&forum, &bob(), "q").in_topic(77));
    let chat = ChatRef {
        id: "-100777".into(),
        kind: ChatKind::Group,
        thread: Some("77".into()),
    };
    tg.typing(&chat).await.unwrap();
    let mut msg = out(&chat, "answer");
    msg.reply_to = Some(asked.message_id.to_string());
    tg.send(&msg).await.unwrap();
    let sent = &fake.sent()[0];
    assert_eq!(sent.thread, Some(77));
    assert_eq!(sent.reply_to, Some(asked.message_id));
    assert_eq!(
        sent.params["reply_parameters"]["allow_sending_without_reply"],
        true
    );
    assert_eq!(fake.chat_actions()[0].action, "typing");
    assert_eq!(fake.chat_actions()[0].thread, Some(77));
}

#[tokio::test]
async fn buttons_are_sent_pressed_answered_and_removed_by_an_edit() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    let mut msg = out(&group_ref(), "Run `ls` in /work? (code K7Q2)");
    msg.buttons = vec![
        Button {
            label: "Approve".into(),
            data: "ap:K7Q2:y".into(),
        },
        Button {
            label: "Deny".into(),
            data: "ap:K7Q2:n".into(),
        },
    ];
    let sent = tg.send(&msg).await.unwrap();
    let rec = &fake.sent()[0];
    assert_eq!(
        rec.buttons,
        [
            ("Approve".to_owned(), "ap:K7Q2:y".to_owned()),
            ("Deny".to_owned(), "ap:K7Q2:n".to_owned())
        ]
    );
    let mid: i64 = sent.message_id.parse().unwrap();
    let press = fake.push_callback(&alice(), group().id, mid, "ap:K7Q2:y");
    let events = poll_all(&tg).await;
    match &events[0].event {
        Event::Button(p) => {
            assert_eq!(p.callback_id, press.callback_id);
            assert_eq!(p.chat, group_ref());
            assert_eq!(p.message_id, sent.message_id);
            assert_eq!(p.sender.id, "1001");
            assert_eq!(p.data, "ap:K7Q2:y");
        }
        other => panic!("expected a button press, got {other:?}"),
    }
    tg.answer_button(&press.callback_id, "Approved")
        .await
        .unwrap();
    assert_eq!(fake.answers()[0].text.as_deref(), Some("Approved"));
    // Telegram accepts one answer per press.
    let again = tg.answer_button(&press.callback_id, "x").await.unwrap_err();
    assert_eq!(
        again,
        SendError::Permanent(
            "Bad Request: query is too old and response timeout expired or query ID is invalid"
                .into()
        )
    );

    tg.edit(&group_ref(), &sent.message_id, "Approved by Alice", None)
        .await
        .unwrap();
    let edit = &fake.edits()[0];
    assert_eq!(edit.text, "Approved by Alice");
    assert_eq!(edit.buttons, Some(vec![]));
    assert_eq!(edit.params.get("parse_mode"), None);
    let now = fake.bot_message(group().id, mid).unwrap();
    assert_eq!(now.get("reply_markup"), None, "the buttons are gone");
    // The same edit again ("message is not modified") is a success, not a failure.
    tg.edit(&group_ref(), &sent.message_id, "Approved by Alice", None)
        .await
        .unwrap();
    assert_eq!(fake.edits().len(), 1);
    let missing = tg
        .edit(&group_ref(), "999999", "x", None)
        .await
        .unwrap_err();
    assert_eq!(
        missing,
        SendError::Permanent("Bad Request: message to edit not found".into())
    );
}

#[tokio::test]
async fn a_button_with_data_over_64_bytes_is_refused_before_any_request() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    let mut msg = out(&group_ref(), "x");
    msg.buttons = vec![Button {
        label: "Go".into(),
        data: "d".repeat(65),
    }];
    let err = tg.send(&msg).await.unwrap_err();
    assert_eq!(
        err,
        SendError::Permanent("a button's data is 65 bytes; Telegram takes 1-64".into())
    );
    assert!(fake.calls_of("sendMessage").is_empty());
}

#[tokio::test]
async fn a_429_is_rate_limited_with_the_platforms_exact_retry_after() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    fake.fail_next("sendMessage", 1, Failure::RateLimited { retry_after: 17 });
    let err = tg.send(&out(&group_ref(), "hi")).await.unwrap_err();
    assert_eq!(
        err,
        SendError::RateLimited {
            retry_after: Duration::from_secs(17)
        }
    );
    assert!(fake.sent().is_empty());
    // The next call goes through.
    tg.send(&out(&group_ref(), "hi")).await.unwrap();
    assert_eq!(fake.sent().len(), 1);

    fake.fail_next("getUpdates", 1, Failure::RateLimited { retry_after: 3 });
    assert_eq!(
        tg.poll(None).await.unwrap_err(),
        ChannelError::RateLimited {
            retry_after: Duration::from_secs(3)
        }
    );
}

#[tokio::test]
async fn server_errors_are_transient_and_may_have_been_delivered() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    fake.fail_next("sendMessage", 1, Failure::ServerError);
    fake.fail_next("sendMessage", 1, Failure::BadGateway);
    assert_eq!(
        tg.send(&out(&group_ref(), "hi")).await.unwrap_err(),
        SendError::Transient {
            message: "Internal Server Error".into(),
            maybe_delivered: true
        }
    );
    assert_eq!(
        tg.send(&out(&group_ref(), "hi")).await.unwrap_err(),
        SendError::Transient {
            message: "sendMessage: HTTP 502 without a Bot API answer".into(),
            maybe_delivered: true
        }
    );
    fake.fail_next("getUpdates", 1, Failure::ServerError);
    assert_eq!(
        tg.poll(None).await.unwrap_err(),
        ChannelError::Transient("Internal Server Error".into())
    );
}

#[tokio::test]
async fn bad_requests_are_permanent() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    // A chat the platform does not know: the fake refuses it as Telegram does.
    let err = tg.send(&out(&group_ref(), "hi")).await.unwrap_err();
    assert_eq!(
        err,
        SendError::Permanent("Bad Request: chat not found".into())
    );
    fake.add_chat(&group());
    fake.fail_next(
        "sendMessage",
        1,
        Failure::Forbidden("Forbidden: bot was kicked from the supergroup chat".into()),
    );
    assert_eq!(
        tg.send(&out(&group_ref(), "hi")).await.unwrap_err(),
        SendError::Permanent("Forbidden: bot was kicked from the supergroup chat".into())
    );
    // Texts Telegram would refuse are refused without a request.
    let long = "x".repeat(4097);
    assert_eq!(
        tg.send(&out(&group_ref(), &long)).await.unwrap_err(),
        SendError::Permanent(
            "the text is 4097 UTF-16 units, over Telegram's 4096: split it with \
             `chitin_channels::text::split`"
                .into()
        )
    );
    assert_eq!(
        tg.send(&out(&group_ref(), " \n ")).await.unwrap_err(),
        SendError::Permanent("the message text is empty (Telegram refuses empty messages)".into())
    );
    assert_eq!(fake.calls_of("sendMessage").len(), 2);
}

#[tokio::test]
async fn a_dropped_connection_is_transient_and_says_the_message_may_have_arrived() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    fake.fail_next("sendMessage", 1, Failure::DropAfterHandling);
    match tg.send(&out(&group_ref(), "once")).await.unwrap_err() {
        SendError::Transient {
            maybe_delivered, ..
        } => assert!(maybe_delivered),
        other => panic!("expected Transient, got {other:?}"),
    }
    // It did arrive: retrying blindly would send it twice (the engine's outbox decides).
    assert_eq!(fake.sent().len(), 1);
    fake.fail_next("sendMessage", 1, Failure::Drop);
    match tg.send(&out(&group_ref(), "twice")).await.unwrap_err() {
        SendError::Transient {
            maybe_delivered, ..
        } => assert!(maybe_delivered),
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(fake.sent().len(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_transient_and_certainly_not_delivered() {
    let tg = Telegram::new(config_at(closed_port(), TOKEN)).unwrap();
    let err = tg.send(&out(&dm_ref(&alice()), "hi")).await.unwrap_err();
    match err {
        SendError::Transient {
            message,
            maybe_delivered,
        } => {
            assert!(!maybe_delivered, "{message}");
            assert!(message.starts_with("sendMessage: "), "{message}");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn the_token_never_appears_in_any_error_text_or_debug_output() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&group());
    let secret_part = TOKEN.split_once(':').unwrap().1;
    let mut shown = Shown::default();
    for f in [
        Failure::RateLimited { retry_after: 1 },
        Failure::ServerError,
        Failure::BadGateway,
        Failure::Drop,
        // A proxy that echoes the request path in its error.
        Failure::BadRequest(format!("Bad Request: POST /bot{TOKEN}/sendMessage failed")),
    ] {
        fake.fail_next("sendMessage", 1, f.clone());
        shown.error(&tg.send(&out(&group_ref(), "hi")).await.unwrap_err());
        fake.fail_next("getUpdates", 1, f);
        shown.error(&tg.poll(None).await.unwrap_err());
    }
    shown.debug(&tg);
    // Nobody listening: reqwest's own error would name the URL, token included.
    let gone = Telegram::new(config_at(closed_port(), TOKEN)).unwrap();
    shown.error(&gone.connect().await.unwrap_err());
    shown.error(&gone.send(&out(&group_ref(), "hi")).await.unwrap_err());

    shown.assert_hides(&[secret_part]);
    shown.assert_some_contains("Bad Request: POST /bot<redacted>/sendMessage");
}

/// A `POST /channels/<name>/webhook` request to the adapter.
fn parse_webhook(
    tg: &Telegram,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Vec<chitin_channels::Inbound>, ChannelError> {
    let req = chitin_channels::WebhookRequest {
        method: "POST",
        route: "webhook",
        query: "",
        headers,
        body,
    };
    tg.webhook(&req).map(|p| {
        assert_eq!(p.reply, None, "Telegram expects no answer body");
        p.events
    })
}

#[tokio::test]
async fn a_webhook_request_to_another_route_or_method_is_not_found() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = webhook_adapter(&fake);
    let headers = vec![(
        "x-telegram-bot-api-secret-token".to_owned(),
        SECRET.to_owned(),
    )];
    for (method, route) in [("GET", "webhook"), ("POST", "events"), ("POST", "")] {
        let req = chitin_channels::WebhookRequest {
            method,
            route,
            query: "",
            headers: &headers,
            body: b"{}",
        };
        assert_eq!(
            tg.webhook(&req).unwrap_err(),
            ChannelError::NoSuchRoute,
            "{method} {route}"
        );
    }
}

#[tokio::test]
async fn an_attachment_is_fetched_with_get_file_and_refused_over_the_limit() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.put_file("doc-1", "documents/file_7.pdf", b"%PDF-1.7 tiny".to_vec());
    let a = chitin_channels::Attachment {
        file_ref: "doc-1".into(),
        name: Some("report.pdf".into()),
        mime: Some("application/pdf".into()),
        size: Some(13),
    };
    assert_eq!(
        tg.fetch_attachment(&a, 1024).await.unwrap(),
        b"%PDF-1.7 tiny"
    );
    assert_eq!(fake.downloads(), vec!["documents/file_7.pdf".to_string()]);

    // Announced too large: refused before any request.
    let big = chitin_channels::Attachment {
        size: Some(5000),
        ..a.clone()
    };
    assert_eq!(
        tg.fetch_attachment(&big, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    // Announced small but larger in fact: refused, nothing kept.
    fake.put_file("doc-2", "documents/file_8.bin", vec![7u8; 4000]);
    let lying = chitin_channels::Attachment {
        file_ref: "doc-2".into(),
        size: Some(10),
        ..a.clone()
    };
    assert_eq!(
        tg.fetch_attachment(&lying, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    assert_eq!(
        fake.downloads().len(),
        1,
        "refused on getFile's size, before the download"
    );
    // An unknown file is the platform's refusal, without the token.
    let unknown = chitin_channels::Attachment {
        file_ref: "nope".into(),
        size: None,
        ..a
    };
    let e = tg.fetch_attachment(&unknown, 1024).await.unwrap_err();
    assert!(e.to_string().contains("wrong file_id"), "{e}");
    assert!(
        !e.to_string()
            .contains(chitin_channels::telegram::fake::TOKEN),
        "{e}"
    );
}

#[tokio::test]
async fn a_webhook_request_without_the_right_secret_is_refused() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = webhook_adapter(&fake);
    tg.connect().await.unwrap();
    let pushed = fake.webhook_update(MessageBuilder::text(
        &FakeChat::private(&alice()),
        &alice(),
        "hi",
    ));
    let body = pushed.update.to_string();
    let header = |v: &str| vec![("x-telegram-bot-api-secret-token".to_owned(), v.to_owned())];

    assert_eq!(
        parse_webhook(&tg, &[], body.as_bytes()).unwrap_err(),
        ChannelError::WebhookRefused(
            "the X-Telegram-Bot-Api-Secret-Token header is missing".into()
        )
    );
    for wrong in [
        "",
        "wh-secret_0123456789abcdeX",
        "wh-secret_0123456789abcdef0",
        "wh",
    ] {
        assert_eq!(
            parse_webhook(&tg, &header(wrong), body.as_bytes()).unwrap_err(),
            ChannelError::WebhookRefused(
                "the X-Telegram-Bot-Api-Secret-Token header is wrong".into()
            ),
            "{wrong:?}"
        );
    }
    let mut twice = header(SECRET);
    twice.extend(header("other"));
    assert_eq!(
        parse_webhook(&tg, &twice, body.as_bytes()).unwrap_err(),
        ChannelError::WebhookRefused("more than one X-Telegram-Bot-Api-Secret-Token header".into())
    );

    let events = parse_webhook(&tg, &header(SECRET), body.as_bytes()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_id, format!("u:{}", pushed.update_id));
    assert_eq!(message(&events[0]).text, "hi");
    assert_eq!(
        parse_webhook(&tg, &header(SECRET), b"{not json").unwrap_err(),
        ChannelError::BadWebhook(
            "the body is not JSON: key must be a string at line 1 column 2".into()
        )
    );

    // A polling channel takes no webhook requests, even with a matching header.
    let polling = connected(&fake).await;
    assert_eq!(
        parse_webhook(&polling, &header(SECRET), body.as_bytes()).unwrap_err(),
        ChannelError::WebhookRefused(
            "this channel is in polling mode: it takes no webhook requests".into()
        )
    );
}

#[tokio::test]
async fn set_webhook_registers_the_url_with_the_secret_and_blocks_polling() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = webhook_adapter(&fake);
    tg.connect().await.unwrap();
    assert!(fake.calls_of("deleteWebhook").is_empty());
    let url = "https://chitin.example.org/channels/tg/webhook"
        .parse()
        .unwrap();
    tg.set_webhook(&url).await.unwrap();
    let hook = fake.webhook().unwrap();
    assert_eq!(hook.url, "https://chitin.example.org/channels/tg/webhook");
    assert_eq!(hook.secret_token.as_deref(), Some(SECRET));
    assert_eq!(
        hook.params["allowed_updates"],
        json!(default_allowed_updates())
    );
    // A polling adapter for the same bot: connect removes the webhook, then polling works.
    let polling = Telegram::new(config(&fake, TOKEN)).unwrap();
    assert!(matches!(
        polling.poll(None).await.unwrap_err(),
        ChannelError::Transient(m) if m.starts_with("Conflict: can't use getUpdates")
    ));
    polling.connect().await.unwrap();
    assert_eq!(fake.webhook(), None);
    polling.poll(None).await.unwrap();
}

#[tokio::test]
async fn a_ten_thousand_character_answer_is_split_and_every_piece_is_accepted() {
    let fake = FakeTelegram::start().await.unwrap();
    let tg = connected(&fake).await;
    fake.add_chat(&FakeChat::private(&alice()));
    // Emoji count twice against Telegram's limit: a splitter counting characters would send
    // pieces the platform refuses.
    let mut text = String::new();
    let mut n = 0;
    while text.chars().count() < 10_000 {
        n += 1;
        text.push_str(&format!(
            "{n}. Résumé 😀 of step {n}: the quick brown fox 🦊 jumps.\n"
        ));
        if n % 5 == 0 {
            text.push('\n');
        }
    }
    let text: String = text.chars().take(10_000).collect();
    let limit = tg.limits().max_text_chars;
    assert_eq!(limit, 4096);
    let pieces = split(&text, limit);
    assert!(pieces.len() >= 3);
    for p in &pieces {
        assert!(utf16_len(p) <= limit);
        tg.send(&out(&dm_ref(&alice()), p)).await.unwrap();
    }
    let sent: Vec<String> = fake.sent().into_iter().map(|s| s.text).collect();
    assert_eq!(sent.len(), pieces.len());
    assert_eq!(sent.concat(), text);
}
