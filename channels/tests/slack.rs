//! The Slack adapter against the fake Slack (`slack::fake`): the Web API through the real HTTP
//! client, Events API and interactivity requests signed as Slack signs them, and Socket Mode
//! over a real WebSocket.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use chitin_channels::slack::fake::{
    APP_TOKEN, BOT_ID, BOT_TOKEN, BOT_USER_ID, Failure, FakeChannel, FakeSlack, FakeUser,
    MessageBuilder, NOW, SIGNING_SECRET, interactivity_body, signed_headers,
};
use chitin_channels::slack::{Clock, MAX_TEXT, Slack, SlackConfig, SlackMode};
use chitin_channels::{
    Attachment, Button, ChannelError, ChatKind, ChatRef, Event, Inbound, OutMessage, Platform,
    SendError, WebhookBody, WebhookParsed, WebhookRequest,
};
use serde_json::{Value, json};
use support::{Shown, closed_port, ignored, message, press, text_to};
use zeroize::Zeroizing;

fn clock() -> Clock {
    Arc::new(|| NOW * 1000 + 250)
}

fn events_config(fake: &FakeSlack) -> SlackConfig {
    let mut c = SlackConfig::events(
        Zeroizing::new(BOT_TOKEN.into()),
        Zeroizing::new(SIGNING_SECRET.into()),
    )
    .unwrap();
    c.api_base = fake.api_base();
    c.clock = clock();
    c
}

fn socket_config(fake: &FakeSlack) -> SlackConfig {
    let mut c = SlackConfig::socket(
        Zeroizing::new(BOT_TOKEN.into()),
        Zeroizing::new(APP_TOKEN.into()),
    )
    .unwrap();
    c.api_base = fake.api_base();
    c.clock = clock();
    // A poll with nothing to read returns after this (only tests that expect nothing wait).
    c.poll_timeout = Duration::from_millis(300);
    c
}

async fn connected(fake: &FakeSlack) -> Slack {
    let s = Slack::new(events_config(fake)).unwrap();
    s.connect().await.unwrap();
    s
}

async fn socket_connected(fake: &FakeSlack) -> Slack {
    let s = Slack::new(socket_config(fake)).unwrap();
    s.connect().await.unwrap();
    s
}

fn alice() -> FakeUser {
    FakeUser::new("U0ALICE001", "Alice")
}

fn bob() -> FakeUser {
    FakeUser::new("U0BOB00001", "Bob")
}

fn dm() -> FakeChannel {
    FakeChannel::dm("D0ALICE001")
}

fn general() -> FakeChannel {
    FakeChannel::public("C0GENERAL1")
}

fn request<'a>(
    route: &'a str,
    headers: &'a [(String, String)],
    body: &'a [u8],
) -> WebhookRequest<'a> {
    WebhookRequest {
        method: "POST",
        route,
        query: "",
        headers,
        body,
    }
}

/// A signed `POST /channels/<name>/events`.
fn post_event(s: &Slack, body: &[u8]) -> Result<WebhookParsed, ChannelError> {
    let headers = signed_headers(SIGNING_SECRET, NOW, body);
    s.webhook(&request("events", &headers, body))
}

/// The one event of a signed events request.
fn event_of(s: &Slack, body: &[u8]) -> Inbound {
    let parsed = post_event(s, body).unwrap();
    assert_eq!(parsed.reply, None);
    assert_eq!(parsed.events.len(), 1, "{:?}", parsed.events);
    parsed.events.into_iter().next().unwrap()
}

/// A signed `POST /channels/<name>/interactivity`.
fn post_interaction(s: &Slack, payload: &Value) -> Result<Vec<Inbound>, ChannelError> {
    let body = interactivity_body(payload);
    let headers = signed_headers(SIGNING_SECRET, NOW, &body);
    s.webhook(&request("interactivity", &headers, &body))
        .map(|p| p.events)
}

fn out(chat: &ChatRef, text: &str) -> OutMessage {
    text_to(chat, text, "test-1")
}

fn group_thread(channel: &FakeChannel, ts: &str) -> ChatRef {
    ChatRef {
        id: channel.id.clone(),
        kind: ChatKind::Group,
        thread: Some(ts.into()),
    }
}

fn dm_ref() -> ChatRef {
    support::chat(&dm().id, ChatKind::Dm)
}

fn approve_deny() -> Vec<Button> {
    support::approve_deny("approval:7f3a:approve", "approval:7f3a:deny")
}

#[tokio::test]
async fn connect_learns_the_bot_with_auth_test_and_sends_json_with_a_bearer_token() {
    let fake = FakeSlack::start().await.unwrap();
    let s = Slack::new(events_config(&fake)).unwrap();
    assert_eq!(s.kind(), "slack");
    let bot = s.connect().await.unwrap();
    assert_eq!(bot.id, BOT_USER_ID);
    assert_eq!(bot.username, "chitin");
    let calls = fake.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].method, "auth.test");
    assert_eq!(calls[0].content_type, "application/json; charset=utf-8");
    // Typing has no Web API for bots: a no-op that succeeds without a request.
    s.typing(&dm_ref()).await.unwrap();
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_says_which_call_failed() {
    let fake = FakeSlack::start().await.unwrap();
    let mut c = events_config(&fake);
    c.bot_token = Zeroizing::new("xoxb-1-2-WrongTokenValue".into());
    let s = Slack::new(c).unwrap();
    let err = s.connect().await.unwrap_err();
    assert_eq!(
        err,
        ChannelError::Unauthorized("auth.test: invalid_auth".into())
    );
    assert_eq!(
        err.to_string(),
        "the platform refused the bot's credentials: auth.test: invalid_auth; check the token \
         (`chitin secrets set`) and `api_base`"
    );
    assert!(
        fake.calls().is_empty(),
        "the fake records only accepted tokens"
    );
}

#[tokio::test]
async fn a_signed_request_is_accepted_and_every_bad_signature_is_refused_with_its_reason() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let pushed = fake.message(MessageBuilder::text(&dm(), &alice(), "hello"));
    let body = pushed.bytes();
    let good = signed_headers(SIGNING_SECRET, NOW, &body);
    assert_eq!(
        s.webhook(&request("events", &good, &body))
            .unwrap()
            .events
            .len(),
        1
    );

    let refused = |headers: &[(String, String)], body: &[u8]| match s
        .webhook(&request("events", headers, body))
        .unwrap_err()
    {
        ChannelError::WebhookRefused(why) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let ts = good[0].clone();
    let sig = good[1].clone();
    assert_eq!(
        refused(&[], &body),
        "the X-Slack-Request-Timestamp header is missing"
    );
    assert_eq!(
        refused(std::slice::from_ref(&ts), &body),
        "the X-Slack-Signature header is missing"
    );
    assert_eq!(
        refused(std::slice::from_ref(&sig), &body),
        "the X-Slack-Request-Timestamp header is missing"
    );
    assert_eq!(
        refused(&[ts.clone(), sig.clone(), sig.clone()], &body),
        "more than one X-Slack-Signature header"
    );
    assert_eq!(
        refused(&[ts.clone(), ts.clone(), sig.clone()], &body),
        "more than one X-Slack-Request-Timestamp header"
    );
    let mismatch = "the X-Slack-Signature header does not match the body (wrong signing secret, \
                    or an altered request)";
    // Another body under the same signature.
    let mut altered = body.clone();
    altered.extend_from_slice(b" ");
    assert_eq!(refused(&good, &altered), mismatch);
    // Signed with another secret.
    assert_eq!(
        refused(&signed_headers("another-secret", NOW, &body), &body),
        mismatch
    );
    // The signature of another timestamp.
    let other_ts = signed_headers(SIGNING_SECRET, NOW - 1, &body);
    assert_eq!(refused(&[ts.clone(), other_ts[1].clone()], &body), mismatch);
    let upper = sig.1.to_uppercase();
    let wrongs: [&str; 5] = ["", "v0=", "v1=abc", &upper, &sig.1[..sig.1.len() - 1]];
    for wrong in wrongs {
        let h = [
            ts.clone(),
            ("x-slack-signature".to_owned(), wrong.to_owned()),
        ];
        assert_eq!(refused(&h, &body), mismatch, "{wrong:?}");
    }
    // Stale or from the future: more than 5 minutes from the clock, even if correctly signed.
    let stale = "the X-Slack-Request-Timestamp is more than 5 minutes from the gateway's clock (a \
                 replayed or delayed request, or a wrong clock)";
    for t in [NOW - 301, NOW + 301, 0] {
        assert_eq!(
            refused(&signed_headers(SIGNING_SECRET, t, &body), &body),
            stale,
            "{t}"
        );
    }
    for t in [NOW - 299, NOW + 299] {
        s.webhook(&request(
            "events",
            &signed_headers(SIGNING_SECRET, t, &body),
            &body,
        ))
        .unwrap();
    }
    for bad in ["abc", "-5", "1712345678.5", ""] {
        let h = [
            ("X-Slack-Request-Timestamp".to_owned(), bad.to_owned()),
            sig.clone(),
        ];
        assert_eq!(
            refused(&h, &body),
            "the X-Slack-Request-Timestamp header is not a Unix time",
            "{bad:?}"
        );
    }
    // Interactivity is signed the same way.
    let payload = fake.button_press(&alice(), &dm().id, "1712345678.000001", "x");
    let form = interactivity_body(&payload);
    assert_eq!(
        s.webhook(&request("interactivity", &good, &form))
            .unwrap_err(),
        ChannelError::WebhookRefused(mismatch.into())
    );
    post_interaction(&s, &payload).unwrap();
}

#[tokio::test]
async fn a_request_to_another_route_or_method_or_mode_is_refused() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let body = b"{}";
    let headers = signed_headers(SIGNING_SECRET, NOW, body);
    for (method, route) in [
        ("GET", "events"),
        ("POST", "webhook"),
        ("GET", "interactivity"),
        ("POST", ""),
    ] {
        let req = WebhookRequest {
            method,
            route,
            query: "",
            headers: &headers,
            body,
        };
        assert_eq!(
            s.webhook(&req).unwrap_err(),
            ChannelError::NoSuchRoute,
            "{method} {route}"
        );
    }
    // An Events API channel is not polled.
    assert!(matches!(
        s.poll(None).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("Events API mode")
    ));
    // A Socket Mode channel takes no webhook requests, however well signed.
    let socket = Slack::new(socket_config(&fake)).unwrap();
    assert_eq!(
        socket
            .webhook(&request("events", &headers, body))
            .unwrap_err(),
        ChannelError::WebhookRefused(
            "this channel is in Socket Mode: it takes no webhook requests".into()
        )
    );
    // A signed body that is not JSON, or not an Events API request.
    assert!(matches!(
        post_event(&s, b"{nope").unwrap_err(),
        ChannelError::BadWebhook(m) if m.starts_with("the body is not JSON")
    ));
    assert_eq!(
        post_event(&s, b"{}").unwrap_err(),
        ChannelError::BadWebhook("the body is not an Events API request (no type)".into())
    );
    let big = vec![b' '; chitin_channels::slack::MAX_WEBHOOK_BODY + 1];
    assert!(matches!(
        post_event(&s, &big).unwrap_err(),
        ChannelError::BadWebhook(m) if m.contains("larger than")
    ));
}

#[tokio::test]
async fn url_verification_is_answered_with_the_challenge_as_plain_text() {
    let fake = FakeSlack::start().await.unwrap();
    // Before `connect` too: Slack verifies the URL when the app is configured.
    let s = Slack::new(events_config(&fake)).unwrap();
    let body = json!({
        "token": "Jhj5dZrVaK7ZwHHjRyZWjbDl",
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
        "type": "url_verification",
    })
    .to_string();
    let parsed = post_event(&s, body.as_bytes()).unwrap();
    assert!(parsed.events.is_empty());
    assert_eq!(
        parsed.reply,
        Some(WebhookBody {
            content_type: "text/plain",
            body: b"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".to_vec(),
        })
    );
    // Unsigned, it is refused like any other request.
    assert!(matches!(
        s.webhook(&request("events", &[], body.as_bytes()))
            .unwrap_err(),
        ChannelError::WebhookRefused(_)
    ));
}

#[tokio::test]
async fn messages_in_a_dm_a_channel_and_a_thread_map_to_conversations_and_sessions() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;

    // A DM: one session for the whole DM, always addressed to the bot.
    let p = fake.message(MessageBuilder::text(
        &dm(),
        &alice(),
        "tea &amp; cake &lt;3",
    ));
    let ev = event_of(&s, &p.bytes());
    assert_eq!(ev.event_id, format!("m:{}:{}", dm().id, p.ts));
    let m = message(&ev);
    assert_eq!(m.chat, dm_ref());
    assert_eq!(m.message_id, p.ts);
    assert_eq!(m.sender.id, "U0ALICE001");
    assert_eq!(m.sender.display, "Alice");
    assert!(!m.sender.is_bot);
    assert_eq!(m.text, "tea & cake <3", "Slack's entities are decoded");
    assert!(m.mentioned);
    assert_eq!(m.reply_to, None);

    // A top-level channel message starts a thread session keyed by its own ts.
    let top = fake.message(MessageBuilder::text(&general(), &bob(), "morning all"));
    let ev = event_of(&s, &top.bytes());
    let m = message(&ev);
    assert_eq!(m.chat, group_thread(&general(), &top.ts));
    assert!(!m.mentioned);
    assert_eq!(m.reply_to, None);

    // A reply in that thread is in the same session.
    let reply = fake.message(
        MessageBuilder::text(&general(), &alice(), "same here").in_thread(&top.ts, &bob().id),
    );
    let m = message(&event_of(&s, &reply.bytes())).clone();
    assert_eq!(m.chat, group_thread(&general(), &top.ts));
    assert_eq!(m.message_id, reply.ts);
    assert_eq!(m.reply_to.as_deref(), Some(top.ts.as_str()));

    // A reply in a DM thread is that thread's session.
    let dm_reply =
        fake.message(MessageBuilder::text(&dm(), &alice(), "more").in_thread(&p.ts, &alice().id));
    let m = message(&event_of(&s, &dm_reply.bytes())).clone();
    assert_eq!(
        m.chat,
        ChatRef {
            id: dm().id,
            kind: ChatKind::Dm,
            thread: Some(p.ts.clone())
        }
    );

    // Private channels and group DMs are groups.
    for ch in [
        FakeChannel::private("G0PRIVATE1"),
        FakeChannel::mpim("G0MPIM0001"),
    ] {
        let p = fake.message(MessageBuilder::text(&ch, &alice(), "hi"));
        assert_eq!(
            message(&event_of(&s, &p.bytes())).chat.kind,
            ChatKind::Group
        );
    }
}

#[tokio::test]
async fn a_mention_is_the_bots_user_id_an_app_mention_or_a_reply_in_the_bots_thread() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let mentioned = |text: &str, thread: Option<(&str, &str)>| {
        let mut b = MessageBuilder::text(&general(), &alice(), text);
        if let Some((ts, parent)) = thread {
            b = b.in_thread(ts, parent);
        }
        message(&event_of(&s, &fake.message(b).bytes())).mentioned
    };
    assert!(mentioned(
        &format!("<@{BOT_USER_ID}> what time is it?"),
        None
    ));
    assert!(mentioned(&format!("hey <@{BOT_USER_ID}|chitin>!"), None));
    assert!(!mentioned("<@U0BOB00001> what time is it?", None));
    assert!(!mentioned(&format!("<@{BOT_USER_ID}X> hi"), None));
    assert!(!mentioned("@chitin hi", None));
    // Typed by the user as text: Slack escapes it, so it is no mention.
    assert!(!mentioned(&format!("&lt;@{BOT_USER_ID}&gt;"), None));
    // A reply in a thread the bot started is addressed to it; in someone else's, it is not.
    assert!(mentioned(
        "and tomorrow?",
        Some(("1712345678.000050", BOT_USER_ID))
    ));
    assert!(!mentioned(
        "and tomorrow?",
        Some(("1712345678.000050", "U0BOB00001"))
    ));

    // Slack sends a `message` and an `app_mention` for one mention: both are the same event
    // for the engine (the same id), addressed to the bot, whichever comes first.
    let msg = fake.message(MessageBuilder::text(
        &general(),
        &bob(),
        &format!("<@{BOT_USER_ID}> deploy?"),
    ));
    let mention = fake.app_mention_of(&msg);
    assert_ne!(msg.event_id, mention.event_id);
    let a = event_of(&s, &mention.bytes());
    let b = event_of(&s, &msg.bytes());
    assert_eq!(a.event_id, b.event_id);
    // The same message; only the display name differs (an app_mention has no user_profile).
    let (ma, mb) = (message(&a), message(&b));
    assert_eq!(
        (&ma.chat, &ma.message_id, &ma.text),
        (&mb.chat, &mb.message_id, &mb.text)
    );
    assert_eq!(ma.sender.id, mb.sender.id);
    assert_eq!((ma.mentioned, mb.mentioned), (true, true));
    assert_eq!(message(&a).text, format!("<@{BOT_USER_ID}> deploy?"));

    // Before `connect`, the bot is known from the event's authorizations.
    let fresh = Slack::new(events_config(&fake)).unwrap();
    assert!(message(&event_of(&fresh, &msg.bytes())).mentioned);
}

#[tokio::test]
async fn a_retried_event_is_the_same_event_for_the_engine() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let p = fake.message(MessageBuilder::text(&dm(), &alice(), "once"));
    let body = p.bytes();
    let first = event_of(&s, &body);
    for n in 1..=3 {
        let mut headers = signed_headers(SIGNING_SECRET, NOW, &body);
        headers.push(("X-Slack-Retry-Num".into(), n.to_string()));
        headers.push(("X-Slack-Retry-Reason".into(), "http_timeout".into()));
        let again = s.webhook(&request("events", &headers, &body)).unwrap();
        assert_eq!(again.events, vec![first.clone()]);
    }
    // An edit is its own event (keyed by Slack's event_id), the same on a retry too.
    let edit = fake.edit_of(&p, "twice");
    let e1 = event_of(&s, &edit.bytes());
    assert_eq!(e1.event_id, format!("e:{}", edit.event_id));
    assert_eq!(event_of(&s, &edit.bytes()), e1);
}

#[tokio::test]
async fn bot_messages_edits_files_and_other_events_map_as_documented() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    // Other bots and the bot itself are ignored.
    let other_bot =
        fake.message(MessageBuilder::text(&general(), &bob(), "beep").from_bot("B0OTHER001"));
    assert_eq!(
        ignored(&event_of(&s, &other_bot.bytes())),
        "a message from a bot or an app"
    );
    let me = FakeUser::new(BOT_USER_ID, "chitin");
    let own = fake.message(MessageBuilder::text(&general(), &me, "my answer"));
    assert_eq!(
        ignored(&event_of(&s, &own.bytes())),
        "the bot's own message"
    );
    let own_bot = fake.message(MessageBuilder::text(&general(), &me, "x").from_bot(BOT_ID));
    assert!(matches!(
        event_of(&s, &own_bot.bytes()).event,
        Event::Ignored { .. }
    ));

    // An edit.
    let p = fake.message(MessageBuilder::text(&general(), &alice(), "helo"));
    let edit = fake.edit_of(&p, "hello");
    match &event_of(&s, &edit.bytes()).event {
        Event::Edited(m) => {
            assert_eq!(m.text, "hello");
            assert_eq!(m.message_id, p.ts);
            assert_eq!(m.chat, group_thread(&general(), &p.ts));
        }
        other => panic!("expected an edit, got {other:?}"),
    }

    // Other subtypes and event types are acknowledged and ignored.
    let join = fake.message(
        MessageBuilder::text(&general(), &bob(), "<@U0BOB00001> has joined")
            .subtype("channel_join"),
    );
    let ev = event_of(&s, &join.bytes());
    assert_eq!(ev.event_id, format!("e:{}", join.event_id));
    assert_eq!(ignored(&ev), "a message of subtype channel_join");
    let reaction = fake.event_callback(json!({
        "type": "reaction_added", "user": "U0ALICE001", "reaction": "thumbsup",
        "item": { "type": "message", "channel": "C0GENERAL1", "ts": p.ts }, "event_ts": p.ts,
    }));
    assert_eq!(
        ignored(&event_of(&s, &reaction.bytes())),
        "a reaction_added event"
    );

    // A file share is a message with an attachment, text or not.
    let file = fake.put_file("notes.txt", "text/plain", b"remember the milk".to_vec());
    let shared = fake.message(MessageBuilder::text(&dm(), &alice(), "").file(&file));
    let m = message(&event_of(&s, &shared.bytes())).clone();
    assert_eq!(m.text, "");
    assert_eq!(
        m.attachments,
        vec![Attachment {
            file_ref: format!("{} {}", file.id, file.url_private_download),
            name: Some("notes.txt".into()),
            mime: Some("text/plain".into()),
            size: Some(17),
        }]
    );
    // Without text or files there is nothing to answer.
    let empty = fake.message(MessageBuilder::text(&dm(), &alice(), " "));
    assert_eq!(
        ignored(&event_of(&s, &empty.bytes())),
        "a message without text or files"
    );
}

#[tokio::test]
async fn a_post_goes_to_its_thread_escaped_with_buttons_and_without_unfurling() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let top = fake.message(MessageBuilder::text(
        &general(),
        &alice(),
        "<@U0BOT00001> deploy?",
    ));
    let chat = group_thread(&general(), &top.ts);
    let mut msg = out(&chat, "Run `deploy` on prod? <ok> & go");
    msg.buttons = approve_deny();
    let sent = s.send(&msg).await.unwrap();
    let posted = fake.posted();
    assert_eq!(posted.len(), 1);
    let p = &posted[0];
    assert_eq!(sent.message_id, p.ts);
    assert_eq!(p.channel, general().id);
    assert_eq!(p.thread_ts.as_deref(), Some(top.ts.as_str()));
    assert_eq!(p.text, "Run `deploy` on prod? &lt;ok&gt; &amp; go");
    assert_eq!(p.sections, vec![p.text.clone()]);
    assert_eq!(
        p.buttons,
        vec![
            ("Approve".to_owned(), "approval:7f3a:approve".to_owned()),
            ("Deny".to_owned(), "approval:7f3a:deny".to_owned()),
        ]
    );
    assert_eq!(p.params["unfurl_links"], false);
    assert_eq!(p.params["unfurl_media"], false);
    assert_eq!(p.params["parse"], "none");
    assert_eq!(p.params["link_names"], false);
    assert_eq!(p.params["blocks"][0]["text"]["verbatim"], true);
    // `reply_to` does not move a DM answer into a thread: the session decides.
    fake.add_channel(&dm());
    let mut plain = out(&dm_ref(), "hi");
    plain.reply_to = Some(top.ts.clone());
    s.send(&plain).await.unwrap();
    let p = &fake.posted()[1];
    assert_eq!(p.thread_ts, None);
    assert!(p.params.get("blocks").is_none());
}

#[tokio::test]
async fn model_text_cannot_broadcast_mention_or_forge_a_link() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    fake.add_channel(&general());
    let chat = group_thread(&general(), "1712345678.000001");
    let attack = "<!channel> <!here> <!everyone> <@U0ALICE001> <#C0GENERAL1> \
                  <https://evil.example/login|https://slack.com> &lt;!channel&gt;";
    let mut msg = out(&chat, attack);
    s.send(&msg).await.unwrap();
    msg.buttons = approve_deny();
    s.send(&msg).await.unwrap();
    s.answer_button(&format!("{} U0ALICE001", general().id), attack)
        .await
        .unwrap();
    let posted = fake.posted();
    let texts = posted
        .iter()
        .map(|p| p.text.clone())
        .chain(posted[1].sections.clone())
        .chain(fake.ephemerals().into_iter().map(|e| e.text));
    for t in texts {
        assert!(!t.contains('<') && !t.contains('>'), "{t}");
        assert!(t.starts_with("&lt;!channel&gt; &lt;!here&gt;"), "{t}");
        assert!(t.ends_with("&amp;lt;!channel&amp;gt;"), "{t}");
    }
}

#[tokio::test]
async fn an_edit_replaces_the_text_and_removes_or_keeps_the_buttons() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    fake.add_channel(&general());
    let chat = group_thread(&general(), "1712345678.000001");
    let mut msg = out(&chat, "Approve?");
    msg.buttons = approve_deny();
    let sent = s.send(&msg).await.unwrap();

    s.edit(&chat, &sent.message_id, "Approved by <@x>", None)
        .await
        .unwrap();
    let u = &fake.updates()[0];
    assert_eq!(u.ts, sent.message_id);
    assert_eq!(u.text, "Approved by &lt;@x&gt;");
    assert_eq!(
        u.buttons,
        Some(vec![]),
        "an empty block list removes the buttons"
    );
    let now = fake.bot_message(&general().id, &sent.message_id).unwrap();
    assert!(now.get("blocks").is_none(), "{now}");

    let keep = approve_deny();
    s.edit(&chat, &sent.message_id, "Still pending", Some(&keep))
        .await
        .unwrap();
    assert_eq!(fake.updates()[1].buttons.as_ref().unwrap().len(), 2);

    let e = s
        .edit(&chat, "1712345678.999999", "x", None)
        .await
        .unwrap_err();
    assert_eq!(
        e,
        SendError::Permanent("chat.update: message_not_found".into())
    );
    let e = s.edit(&chat, "not-a-ts", "x", None).await.unwrap_err();
    assert!(matches!(e, SendError::Permanent(m) if m.contains("not a Slack message ts")));
}

#[tokio::test]
async fn a_button_press_maps_to_a_button_event_and_is_answered_to_the_presser_only() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let top = fake.message(MessageBuilder::text(
        &general(),
        &alice(),
        "<@U0BOT00001> rm -rf?",
    ));
    let chat = group_thread(&general(), &top.ts);
    let mut msg = out(&chat, "Approve `rm -rf build/`?");
    msg.buttons = approve_deny();
    let sent = s.send(&msg).await.unwrap();

    let payload = fake.button_press(
        &bob(),
        &general().id,
        &sent.message_id,
        "approval:7f3a:deny",
    );
    let events = post_interaction(&s, &payload).unwrap();
    assert_eq!(events.len(), 1);
    let action_ts = payload["actions"][0]["action_ts"].as_str().unwrap();
    assert_eq!(events[0].event_id, format!("a:U0BOB00001:{action_ts}"));
    let b = press(&events[0]);
    assert_eq!(b.data, "approval:7f3a:deny");
    assert_eq!(b.message_id, sent.message_id);
    assert_eq!(b.chat, chat, "the press is in the session's thread");
    assert_eq!(b.sender.id, "U0BOB00001");
    assert_eq!(b.sender.display, "bob");
    // The same payload again (Slack retried) is the same event.
    assert_eq!(post_interaction(&s, &payload).unwrap(), events);

    s.answer_button(&b.callback_id, "Denied.").await.unwrap();
    let eph = fake.ephemerals();
    assert_eq!(eph.len(), 1);
    assert_eq!(eph[0].channel, general().id);
    assert_eq!(eph[0].user, "U0BOB00001");
    assert_eq!(eph[0].text, "Denied.");
    assert_eq!(eph[0].thread_ts.as_deref(), Some(top.ts.as_str()));
    // Nothing to say: no request.
    s.answer_button(&b.callback_id, "").await.unwrap();
    assert_eq!(fake.ephemerals().len(), 1);
    assert!(matches!(
        s.answer_button("garbage", "x").await.unwrap_err(),
        SendError::Permanent(_)
    ));

    // A DM press is a DM event without a thread; other interactions are ignored.
    fake.add_channel(&dm());
    let dm_sent = s.send(&out(&dm_ref(), "ok?")).await.unwrap();
    let payload = fake.button_press(&alice(), &dm().id, &dm_sent.message_id, "yes");
    let b = press(&post_interaction(&s, &payload).unwrap()[0]).clone();
    assert_eq!(b.chat, dm_ref());
    let shortcut = json!({ "type": "shortcut", "callback_id": "x", "trigger_id": "1.2.3", "user": { "id": "U0ALICE001" } });
    let ev = post_interaction(&s, &shortcut).unwrap();
    assert!(ev[0].event_id.starts_with("i:"));
    assert_eq!(ignored(&ev[0]), "an interaction of type shortcut");
    assert_eq!(post_interaction(&s, &shortcut).unwrap(), ev, "stable id");
}

#[tokio::test]
async fn a_429_is_rate_limited_with_slacks_retry_after() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    fake.add_channel(&dm());
    fake.fail_next(
        "chat.postMessage",
        1,
        Failure::RateLimited { retry_after: 17 },
    );
    assert_eq!(
        s.send(&out(&dm_ref(), "hi")).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(17)
        }
    );
    // `ratelimited` without a header: Slack's per-minute window.
    fake.fail_next("chat.postMessage", 1, Failure::Error("ratelimited".into()));
    assert_eq!(
        s.send(&out(&dm_ref(), "hi")).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(30)
        }
    );
    fake.fail_next("chat.update", 1, Failure::RateLimited { retry_after: 3 });
    assert_eq!(
        s.edit(&dm_ref(), "1712345678.000001", "x", None)
            .await
            .unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(3)
        }
    );
    assert!(fake.posted().is_empty());
    s.send(&out(&dm_ref(), "hi")).await.unwrap();
}

#[tokio::test]
async fn server_errors_and_lost_answers_are_transient_and_may_have_been_delivered() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    fake.add_channel(&dm());
    for f in [
        Failure::ServerError,
        Failure::Error("internal_error".into()),
        Failure::DropAfterHandling,
        Failure::Drop,
    ] {
        fake.fail_next("chat.postMessage", 1, f.clone());
        match s.send(&out(&dm_ref(), "hi")).await.unwrap_err() {
            SendError::Transient {
                maybe_delivered, ..
            } => assert!(maybe_delivered, "{f:?}"),
            other => panic!("{f:?}: expected Transient, got {other:?}"),
        }
    }
    assert_eq!(
        fake.posted().len(),
        1,
        "the one handled before its answer was lost"
    );
    // Nobody listening: certainly not delivered.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = events_config(&fake);
    c.api_base = format!("http://{closed}/api").parse().unwrap();
    let gone = Slack::new(c).unwrap();
    match gone.send(&out(&dm_ref(), "hi")).await.unwrap_err() {
        SendError::Transient {
            maybe_delivered, ..
        } => assert!(!maybe_delivered),
        other => panic!("expected Transient, got {other:?}"),
    }
}

#[tokio::test]
async fn slack_refusals_are_permanent_and_oversized_requests_are_refused_before_sending() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    assert_eq!(
        s.send(&out(&dm_ref(), "hi")).await.unwrap_err(),
        SendError::Permanent("chat.postMessage: channel_not_found".into())
    );
    fake.add_channel(&dm());
    fake.fail_next(
        "chat.postMessage",
        1,
        Failure::Error("not_in_channel".into()),
    );
    assert_eq!(
        s.send(&out(&dm_ref(), "hi")).await.unwrap_err(),
        SendError::Permanent("chat.postMessage: not_in_channel".into())
    );
    fake.fail_next("chat.postMessage", 1, Failure::Error("invalid_auth".into()));
    match s.send(&out(&dm_ref(), "hi")).await.unwrap_err() {
        SendError::Permanent(m) => assert!(
            m.starts_with("chat.postMessage: invalid_auth: the bot token was refused"),
            "{m}"
        ),
        other => panic!("expected Permanent, got {other:?}"),
    }
    let calls = fake.calls().len();
    assert_eq!(s.limits().max_text_chars, MAX_TEXT);
    assert_eq!(s.limits().max_button_data, 2000);
    let too_long = "x".repeat(MAX_TEXT + 1);
    assert!(matches!(
        s.send(&out(&dm_ref(), &too_long)).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("split it")
    ));
    assert!(matches!(
        s.send(&out(&dm_ref(), "  ")).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("empty")
    ));
    let mut big_button = out(&dm_ref(), "ok?");
    big_button.buttons = vec![Button {
        label: "Yes".into(),
        data: "d".repeat(2001),
    }];
    assert!(matches!(
        s.send(&big_button).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("1-2000")
    ));
    assert_eq!(fake.calls().len(), calls, "refused without a request");
    // The longest text, all of it escaping to five characters, is accepted whole.
    let worst = "&".repeat(MAX_TEXT);
    let mut with_buttons = out(&dm_ref(), &worst);
    with_buttons.buttons = approve_deny();
    s.send(&with_buttons).await.unwrap();
    let p = fake.posted().pop().unwrap();
    assert_eq!(p.text.len(), MAX_TEXT * 5);
    assert_eq!(p.sections.concat(), p.text);
}

#[tokio::test]
async fn an_attachment_is_downloaded_with_the_bot_token_only_from_slack_and_within_the_limit() {
    let fake = FakeSlack::start().await.unwrap();
    let s = connected(&fake).await;
    let file = fake.put_file("report.pdf", "application/pdf", b"%PDF-1.7 tiny".to_vec());
    let shared = fake.message(MessageBuilder::text(&dm(), &alice(), "see").file(&file));
    let a = message(&event_of(&s, &shared.bytes())).attachments[0].clone();
    assert_eq!(
        s.fetch_attachment(&a, 1024).await.unwrap(),
        b"%PDF-1.7 tiny"
    );
    assert_eq!(fake.downloads(), vec![file.id.clone()]);

    // Announced too large, or larger in fact: refused.
    let big = Attachment {
        size: Some(5000),
        ..a.clone()
    };
    assert_eq!(
        s.fetch_attachment(&big, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    let lying = Attachment {
        size: Some(1),
        ..a.clone()
    };
    assert_eq!(
        s.fetch_attachment(&lying, 5).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 5 }
    );
    let downloads = fake.downloads().len();
    // Another host never receives the token; nor does a file ref without a URL.
    for file_ref in [
        format!("{} https://evil.example/files-pri/x/download/a", file.id),
        format!("{} http://files.slack.com/files-pri/x/download/a", file.id),
        format!("{} https://user:pw@files.slack.com/x", file.id),
        file.id.clone(),
    ] {
        let other = Attachment {
            file_ref,
            ..a.clone()
        };
        assert!(
            matches!(
                s.fetch_attachment(&other, 1024).await.unwrap_err(),
                ChannelError::Protocol(_)
            ),
            "{}",
            other.file_ref
        );
    }
    assert_eq!(fake.downloads().len(), downloads);
    // Without access, Slack redirects to a login page: not followed.
    let mut c = events_config(&fake);
    c.bot_token = Zeroizing::new("xoxb-1-2-NotThisBot".into());
    let stranger = Slack::new(c).unwrap();
    assert!(matches!(
        stranger.fetch_attachment(&a, 1024).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("HTTP 302")
    ));
}

#[tokio::test]
async fn no_credential_appears_in_any_error_or_debug_output() {
    let fake = FakeSlack::start().await.unwrap();
    let secret_parts = [
        BOT_TOKEN.rsplit('-').next().unwrap(),
        APP_TOKEN.rsplit('-').next().unwrap(),
        SIGNING_SECRET,
    ];
    let mut shown = Shown::default();
    let s = connected(&fake).await;
    fake.add_channel(&dm());
    for f in [
        Failure::RateLimited { retry_after: 1 },
        Failure::ServerError,
        Failure::Drop,
        // A proxy that echoes the request's credentials in its error.
        Failure::Error(format!("bad header Bearer {BOT_TOKEN}")),
    ] {
        fake.fail_next("chat.postMessage", 1, f);
        shown.error(&s.send(&out(&dm_ref(), "hi")).await.unwrap_err());
    }
    shown.assert_some_contains("bad header Bearer <redacted>");
    shown.debug(&s);
    shown.debug(&events_config(&fake));
    let sock = Slack::new(socket_config(&fake)).unwrap();
    shown.debug(&sock);
    shown.debug(&socket_config(&fake));
    fake.fail_next(
        "apps.connections.open",
        1,
        Failure::Error(format!("echo {APP_TOKEN}")),
    );
    shown.text(sock.connect().await.unwrap_err());
    // Nobody listening: the error must not carry the Authorization header either.
    let mut c = socket_config(&fake);
    c.api_base = format!("http://{}/api", closed_port()).parse().unwrap();
    let gone = Slack::new(c).unwrap();
    shown.error(&gone.connect().await.unwrap_err());
    shown.text(post_event(&s, b"{}").unwrap_err());
    shown.assert_hides(&secret_parts);
    shown.assert_some_contains("<redacted>");
}

// ---- Socket Mode ----

/// Polls (acknowledging with `cursor`) until at least `n` events came; returns them and the
/// last cursor.
async fn poll_events(
    s: &Slack,
    mut cursor: Option<String>,
    n: usize,
) -> (Vec<Inbound>, Option<String>) {
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < n {
        assert!(tokio::time::Instant::now() < deadline, "only {events:?}");
        let polled = s.poll(cursor.as_deref()).await.unwrap();
        events.extend(polled.events);
        if polled.cursor.is_some() {
            cursor = polled.cursor;
        }
    }
    (events, cursor)
}

#[tokio::test]
async fn socket_mode_returns_events_and_acknowledges_them_only_on_the_next_poll() {
    let fake = FakeSlack::start().await.unwrap();
    let s = socket_connected(&fake).await;
    assert_eq!(fake.connections(), 1);
    let msg = fake.message(MessageBuilder::text(&dm(), &alice(), "over the socket"));
    let env = fake.push_event(&msg.body);

    let first = s.poll(None).await.unwrap();
    assert_eq!(first.events.len(), 1);
    assert_eq!(
        first.events[0].event_id,
        format!("m:{}:{}", dm().id, msg.ts)
    );
    assert_eq!(message(&first.events[0]).text, "over the socket");
    assert_eq!(first.cursor.as_deref(), Some(env.as_str()));
    assert!(
        fake.acks().is_empty(),
        "nothing acknowledged by the poll that returned it"
    );

    // A new connection (Slack refreshes it) proves it: the envelope was not acknowledged, so
    // Slack delivers it again, and it is the same event.
    fake.send_disconnect();
    let (again, cursor) = poll_events(&s, None, 1).await;
    assert_eq!(fake.connections(), 2);
    assert_eq!(again, first.events);
    assert_eq!(fake.deliveries(&env), 2);
    assert!(fake.acks().is_empty());

    // The next poll, given the cursor the engine committed, acknowledges it.
    let later = fake.message(MessageBuilder::text(&dm(), &alice(), "next"));
    let env2 = fake.push_event(&later.body);
    let (next, cursor2) = poll_events(&s, cursor, 1).await;
    assert_eq!(fake.wait_for_acks(1).await, vec![env.clone()]);
    assert_eq!(message(&next[0]).text, "next");
    assert_eq!(fake.unacked(), vec![env2.clone()]);
    // The same cursor again (a poll that returned nothing keeps it) is not acknowledged twice.
    let polled = s.poll(cursor2.as_deref()).await.unwrap();
    assert!(polled.events.is_empty());
    assert_eq!(polled.cursor, None);
    let polled = s.poll(cursor2.as_deref()).await.unwrap();
    assert!(polled.events.is_empty());
    // A new connection: the fake has counted every frame of the old one before it opens.
    fake.send_disconnect();
    s.poll(None).await.unwrap();
    assert_eq!(fake.connections(), 3);
    assert_eq!(fake.acks(), vec![env, env2]);
    assert!(fake.unacked().is_empty());
}

#[tokio::test]
async fn a_dropped_socket_is_reopened_and_a_restarted_adapter_acknowledges_the_committed_cursor() {
    let fake = FakeSlack::start().await.unwrap();
    let s = socket_connected(&fake).await;
    let msg = fake.message(MessageBuilder::text(
        &general(),
        &alice(),
        "<@U0BOT00001> hi",
    ));
    let env = fake.push_event(&msg.body);
    let (events, cursor) = poll_events(&s, None, 1).await;
    assert!(message(&events[0]).mentioned);

    // The connection dies without a word; the next poll opens a new one by itself.
    fake.drop_connections();
    let (again, _) = poll_events(&s, None, 1).await;
    assert_eq!(
        again, events,
        "redelivered, recognized by the same event id"
    );
    assert_eq!(fake.connections(), 2);

    // The gateway restarts after committing the events and the cursor.
    drop(s);
    let restarted = Slack::new(socket_config(&fake)).unwrap();
    restarted.connect().await.unwrap();
    let polled = restarted.poll(cursor.as_deref()).await.unwrap();
    assert_eq!(fake.wait_for_acks(1).await, vec![env]);
    assert!(fake.unacked().is_empty());
    // It may have been delivered once more before the acknowledgement arrived: the same event.
    assert!(
        polled
            .events
            .iter()
            .all(|e| e.event_id == events[0].event_id)
    );
}

#[tokio::test]
async fn a_disconnected_socket_mode_adapter_drops_its_socket_and_gets_the_unacknowledged_events_again()
 {
    let fake = FakeSlack::start().await.unwrap();
    let s = socket_connected(&fake).await;
    let msg = fake.message(MessageBuilder::text(
        &dm(),
        &alice(),
        "before the hand-over",
    ));
    let env = fake.push_event(&msg.body);
    let (events, _) = poll_events(&s, None, 1).await;
    assert_eq!(fake.connections(), 1);

    // The channel moved to another replica: the socket and what it read are dropped.
    s.disconnect().await;
    // Never acknowledged: on the next connection Slack delivers it again, the same event.
    let (again, cursor) = poll_events(&s, None, 1).await;
    assert_eq!(again, events);
    assert_eq!(fake.connections(), 2);
    assert_eq!(fake.deliveries(&env), 2);
    assert!(fake.acks().is_empty());
    s.poll(cursor.as_deref()).await.unwrap();
    assert_eq!(fake.wait_for_acks(1).await, vec![env]);
}

#[tokio::test]
async fn socket_mode_maps_interactive_envelopes_and_ignores_slash_commands() {
    let fake = FakeSlack::start().await.unwrap();
    let s = socket_connected(&fake).await;
    fake.add_channel(&general());
    let chat = group_thread(&general(), "1712345678.000001");
    let mut msg = out(&chat, "Approve?");
    msg.buttons = approve_deny();
    let sent = s.send(&msg).await.unwrap();
    let payload = fake.button_press(
        &bob(),
        &general().id,
        &sent.message_id,
        "approval:7f3a:approve",
    );
    let e1 = fake.push_interactive(&payload);
    let e2 = fake.push_envelope(
        "slash_commands",
        json!({ "command": "/chitin", "text": "hi", "user_id": "U0BOB00001", "channel_id": general().id }),
    );
    let (events, cursor) = poll_events(&s, None, 2).await;
    let b = press(&events[0]);
    assert_eq!(b.data, "approval:7f3a:approve");
    assert_eq!(b.chat, chat);
    assert_eq!(events[1].event_id, format!("s:{e2}"));
    assert_eq!(ignored(&events[1]), "a slash command");
    let polled = s.poll(cursor.as_deref()).await.unwrap();
    assert!(polled.events.is_empty());
    assert_eq!(fake.wait_for_acks(2).await, vec![e1, e2]);
}

#[tokio::test]
async fn socket_mode_refuses_a_bad_cursor_and_a_wrong_app_token() {
    let fake = FakeSlack::start().await.unwrap();
    let s = socket_connected(&fake).await;
    assert!(matches!(
        s.poll(Some("not an id!")).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("envelope ids")
    ));
    let mut c = socket_config(&fake);
    c.app_token = Some(Zeroizing::new("xapp-1-A0FAKEAPP1-3-WrongAppToken".into()));
    let wrong = Slack::new(c).unwrap();
    assert_eq!(
        wrong.connect().await.unwrap_err(),
        ChannelError::Unauthorized("apps.connections.open: invalid_auth".into())
    );
    let mut c = socket_config(&fake);
    c.app_token = Some(Zeroizing::new(BOT_TOKEN.replace("xoxb-", "xapp-")));
    c.mode = SlackMode::Socket;
    assert!(matches!(
        Slack::new(c).unwrap().connect().await.unwrap_err(),
        ChannelError::Unauthorized(_)
    ));
}
