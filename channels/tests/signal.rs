//! The Signal adapter against the fake signal-cli daemon (`signal::fake`), through the real
//! HTTP client, JSON-RPC and the server-sent events stream.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::time::Duration;

use chitin_channels::signal::fake::{
    ACCOUNT, ACCOUNT_UUID, Envelope, Failure, FakeContact, FakeSignal,
};
use chitin_channels::signal::{Signal, SignalConfig, reaction_verdict};
use chitin_channels::{
    Attachment, ChannelError, ChatKind, ChatRef, Event, Message, OutMessage, Platform, Polled,
    SendError, WebhookRequest,
};
use serde_json::json;
use support::{chat, ignored, message, press, text_to};

const GROUP: &str = "Pmpi+EfPWmsxiomLe9Nx2XF9HOE483p6iKiFj65iMwI=";
/// Generous: only reached when something is broken.
const DEADLINE: Duration = Duration::from_secs(20);

fn config(fake: &FakeSignal, poll_timeout_secs: u32) -> SignalConfig {
    let mut c = SignalConfig::new(fake.api_base(), ACCOUNT);
    c.poll_timeout_secs = poll_timeout_secs;
    c
}

async fn connected(fake: &FakeSignal) -> Signal {
    let sig = Signal::new(config(fake, 5)).unwrap();
    sig.connect().await.unwrap();
    sig
}

fn alice() -> FakeContact {
    FakeContact::new(
        "+15550002222",
        "a11ce000-0000-4000-8000-000000000001",
        "Alice",
    )
}

fn bob() -> FakeContact {
    FakeContact::without_number("b0b00000-0000-4000-8000-000000000002", "Bob")
}

fn dm(c: &FakeContact) -> ChatRef {
    chat(&c.id(), ChatKind::Dm)
}

fn group() -> ChatRef {
    chat(GROUP, ChatKind::Group)
}

fn out(chat: &ChatRef, text: &str) -> OutMessage {
    text_to(chat, text, "d-1")
}

/// Polls without acknowledging until at least `n` events are buffered (a poll answers at
/// once while some are, so the loop yields to let the stream reader run; a reconnecting
/// stream's transient errors are waited out).
async fn poll_until(sig: &Signal, n: usize) -> Polled {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match sig.poll(None).await {
                Ok(p) if p.events.len() >= n => return p,
                Ok(_) | Err(ChannelError::Transient(_)) => tokio::task::yield_now().await,
                Err(e) => panic!("{e:?}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("fewer than {n} events before the deadline"))
}

#[tokio::test]
async fn connect_checks_the_daemon_learns_the_bots_aci_and_opens_the_stream() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = Signal::new(config(&fake, 5)).unwrap();
    let bot = sig.connect().await.unwrap();
    assert_eq!(bot.id, ACCOUNT_UUID);
    assert_eq!(bot.username, ACCOUNT);
    assert_eq!(sig.kind(), "signal");
    let calls = fake.calls();
    assert_eq!(calls[0].method, "version");
    assert_eq!(calls[0].params["account"], ACCOUNT);
    assert_eq!(calls[1].method, "getUserStatus");
    assert_eq!(calls[1].params["recipient"], json!([ACCOUNT]));
    assert!(fake.wait_for_stream(1, DEADLINE).await);
}

#[tokio::test]
async fn a_daemon_without_the_account_is_unauthorized() {
    let fake = FakeSignal::start().await.unwrap();
    let mut c = config(&fake, 5);
    c.account = "+15559999999".into();
    let err = Signal::new(c).unwrap().connect().await.unwrap_err();
    assert!(
        matches!(&err, ChannelError::Unauthorized(m) if m.contains("Specified account does not exist")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_direct_message_is_a_dm_from_the_senders_aci_and_addresses_the_bot() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = connected(&fake).await;
    let t1 = fake.push(Envelope::text(&alice(), "hello *there* <b>"));
    let t2 = fake.push(Envelope::text(&bob(), "hi from a hidden number"));
    let events = poll_until(&sig, 2).await.events;
    assert_eq!(events[0].event_id, format!("s:{}:{t1}", alice().uuid));
    let m = message(&events[0]);
    assert_eq!(m.chat, dm(&alice()));
    assert_eq!(m.message_id, t1.to_string());
    assert_eq!(m.sender.id, alice().uuid);
    assert_eq!(m.sender.display, "Alice");
    assert!(!m.sender.is_bot);
    assert_eq!(m.text, "hello *there* <b>");
    assert!(m.mentioned);
    assert_eq!(m.reply_to, None);
    let b = message(&events[1]);
    assert_eq!(events[1].event_id, format!("s:{}:{t2}", bob().uuid));
    assert_eq!(b.sender.id, bob().uuid);
    assert_eq!(b.chat.id, bob().uuid);
}

#[tokio::test]
async fn group_messages_address_the_bot_only_by_a_mention_or_a_quote_of_its_message() {
    let fake = FakeSignal::start().await.unwrap();
    fake.add_group(GROUP);
    let sig = connected(&fake).await;
    let bot_msg: u64 = sig
        .send(&out(&group(), "I am the bot"))
        .await
        .unwrap()
        .message_id
        .parse()
        .unwrap();
    let human = fake.push(Envelope::text(&alice(), "plain").in_group(GROUP));
    fake.push(
        Envelope::text(&bob(), "hi")
            .in_group(GROUP)
            .mentioning(&FakeContact::bot()),
    );
    // A mention that names only the bot's ACI (the number hidden) counts too.
    fake.push(
        Envelope::text(&bob(), "and you")
            .in_group(GROUP)
            .mentioning(&FakeContact::without_number(ACCOUNT_UUID, "Chitin")),
    );
    fake.push(
        Envelope::text(&bob(), "cc")
            .in_group(GROUP)
            .mentioning(&alice()),
    );
    fake.push(Envelope::text(&bob(), "thanks").in_group(GROUP).quoting(
        bot_msg,
        &FakeContact::bot(),
        "I am the bot",
    ));
    fake.push(
        Envelope::text(&bob(), "+1")
            .in_group(GROUP)
            .quoting(human, &alice(), "plain"),
    );
    let events = poll_until(&sig, 6).await.events;
    let msgs: Vec<&Message> = events.iter().map(message).collect();
    assert!(msgs.iter().all(|m| m.chat == group()));
    let mentioned: Vec<bool> = msgs.iter().map(|m| m.mentioned).collect();
    assert_eq!(mentioned, [false, true, true, false, true, false]);
    assert_eq!(msgs[1].text, format!("@{ACCOUNT} hi"));
    assert_eq!(msgs[2].text, format!("@{ACCOUNT_UUID} and you"));
    assert_eq!(msgs[3].text, "@+15550002222 cc");
    assert_eq!(msgs[4].reply_to, Some(bot_msg.to_string()));
    assert_eq!(msgs[5].reply_to, Some(human.to_string()));
}

#[tokio::test]
async fn a_reaction_to_the_bots_message_is_a_button_press_on_its_timestamp() {
    let fake = FakeSignal::start().await.unwrap();
    fake.add_group(GROUP);
    let sig = connected(&fake).await;
    let prompt = sig
        .send(&out(
            &dm(&alice()),
            "Approval needed: ... reply /approve K7Q2 or react 👍/👎",
        ))
        .await
        .unwrap();
    let ts: u64 = prompt.message_id.parse().unwrap();
    assert_eq!(
        ts,
        fake.sends()[0].timestamp,
        "a sent message's id is its timestamp"
    );
    let in_group = sig
        .send(&out(&group(), "prompt in the group"))
        .await
        .unwrap();
    let own = fake.push(Envelope::text(&alice(), "mine"));

    let r1 = fake.push(Envelope::reaction(
        &alice(),
        "👍🏽",
        &FakeContact::bot(),
        ts,
        false,
    ));
    fake.push(Envelope::reaction(
        &alice(),
        "👍",
        &FakeContact::bot(),
        ts,
        true,
    ));
    fake.push(Envelope::reaction(&bob(), "👎", &alice(), own, false));
    fake.push(Envelope::reaction(
        &bob(),
        "👎",
        &FakeContact::bot(),
        in_group.message_id.parse().unwrap(),
        false,
    ));
    let mut group_reaction = Envelope::reaction(
        &bob(),
        "👎",
        &FakeContact::bot(),
        in_group.message_id.parse().unwrap(),
        false,
    );
    group_reaction = group_reaction.in_group(GROUP);
    fake.push(group_reaction);
    let events = poll_until(&sig, 6).await.events;
    let p = press(&events[1]);
    assert_eq!(events[1].event_id, format!("s:{}:{r1}", alice().uuid));
    assert_eq!(p.data, "react:👍🏽");
    assert_eq!(reaction_verdict(&p.data), Some(true));
    assert_eq!(p.message_id, prompt.message_id);
    assert_eq!(p.chat, dm(&alice()));
    assert_eq!(p.sender.id, alice().uuid);
    assert_eq!(p.callback_id, format!("s:{}:{r1}", alice().uuid));
    assert_eq!(ignored(&events[2]), "a reaction removed");
    assert_eq!(
        ignored(&events[3]),
        "a reaction to another member's message"
    );
    // In a DM from Bob (no group info) it is Bob's DM; in the group it is the group.
    assert_eq!(press(&events[4]).chat, dm(&bob()));
    let g = press(&events[5]);
    assert_eq!(g.chat, group());
    assert_eq!(reaction_verdict(&g.data), Some(false));
    assert_eq!(g.message_id, in_group.message_id);
}

#[tokio::test]
async fn edits_attachments_and_other_envelopes_map_as_documented() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = connected(&fake).await;
    let original = fake.push(Envelope::text(&alice(), "typo"));
    let edit = fake.push(Envelope::edit(&alice(), original, "fixed"));
    fake.push(Envelope::text(&alice(), "").attachment(
        "eZ4mEFMU7xPdS7Yk2pCu.jpg",
        "image/jpeg",
        Some("cat.jpg"),
        5120,
    ));
    let typing = fake.push(Envelope::typing(&alice()));
    fake.push(Envelope::receipt(&alice(), original));
    fake.push(Envelope::sync_sent(
        &FakeContact::bot(),
        "+15550002222",
        "from my phone",
    ));
    fake.push(Envelope::group_update(&alice(), GROUP));
    fake.push(Envelope::text(&FakeContact::bot(), "echo of my own"));
    fake.push_raw(&json!({ "envelope": "not an envelope" }));
    let events = poll_until(&sig, 9).await.events;

    match &events[1].event {
        Event::Edited(m) => {
            assert_eq!(m.message_id, original.to_string());
            assert_eq!(m.text, "fixed");
        }
        other => panic!("expected an edit, got {other:?}"),
    }
    assert_eq!(
        events[1].event_id,
        format!("s:{}:{edit}:edit", alice().uuid)
    );
    let photo = message(&events[2]);
    assert_eq!(photo.text, "");
    assert_eq!(
        photo.attachments,
        [Attachment {
            file_ref: format!("eZ4mEFMU7xPdS7Yk2pCu.jpg|dm|{}", alice().uuid),
            name: Some("cat.jpg".into()),
            mime: Some("image/jpeg".into()),
            size: Some(5120),
        }]
    );
    assert_eq!(
        events[3].event_id,
        format!("s:{}:{typing}:typing", alice().uuid)
    );
    let whats: Vec<&str> = events[3..].iter().map(ignored).collect();
    assert_eq!(
        whats,
        [
            "typing",
            "a receipt",
            "a message from the bot's own account",
            "a group update",
            "a message from the bot's own account",
            "a notification this adapter cannot read",
        ]
    );
    assert!(events[8].event_id.starts_with("s:raw:"));
    // Event ids are unique.
    let mut ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len());
}

#[tokio::test]
async fn the_cursor_acknowledges_and_without_it_events_come_again() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = Signal::new(config(&fake, 1)).unwrap();
    sig.connect().await.unwrap();
    fake.push(Envelope::text(&alice(), "one"));
    fake.push(Envelope::text(&alice(), "two"));
    let first = poll_until(&sig, 2).await;
    let cursor = first.cursor.clone().unwrap();
    // The engine crashed before storing the cursor: the same events come again.
    let again = sig.poll(None).await.unwrap();
    assert_eq!(again, first);
    // A cursor of an earlier process acknowledges nothing.
    assert_eq!(sig.poll(Some("0123456789abcdef:99")).await.unwrap(), first);
    // With the cursor: acknowledged, nothing left (an empty poll after the timeout).
    let after = sig.poll(Some(&cursor)).await.unwrap();
    assert_eq!(after.events, []);
    assert_eq!(after.cursor, None);
    let t3 = fake.push(Envelope::text(&alice(), "three"));
    let next = poll_until(&sig, 1).await;
    assert_eq!(next.events.len(), 1);
    assert_eq!(message(&next.events[0]).message_id, t3.to_string());
    assert_ne!(next.cursor.as_deref(), Some(cursor.as_str()));
}

#[tokio::test]
async fn a_poll_answers_as_soon_as_an_envelope_arrives() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = Signal::new(config(&fake, 600)).unwrap();
    sig.connect().await.unwrap();
    assert!(fake.wait_for_stream(1, DEADLINE).await);
    let polling = tokio::spawn(async move { sig.poll(None).await });
    let ts = fake.push(Envelope::text(&alice(), "wake up"));
    let polled = tokio::time::timeout(DEADLINE, polling)
        .await
        .expect("the poll did not wake up")
        .unwrap()
        .unwrap();
    assert_eq!(message(&polled.events[0]).message_id, ts.to_string());
}

#[tokio::test]
async fn the_stream_reconnects_after_a_drop_and_keeps_unacknowledged_events() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = connected(&fake).await;
    let t1 = fake.push(Envelope::text(&alice(), "one"));
    let t2 = fake.push(Envelope::text(&alice(), "two"));
    let before = poll_until(&sig, 2).await;
    // The daemon restarts (the stream ends); a message arrives meanwhile.
    fake.drop_streams();
    let t3 = fake.push(Envelope::text(&bob(), "three"));
    assert!(fake.wait_for_stream(2, DEADLINE).await, "no reconnection");
    let after = poll_until(&sig, 3).await;
    let ids: Vec<String> = after
        .events
        .iter()
        .map(|e| message(e).message_id.clone())
        .collect();
    assert_eq!(ids, [t1.to_string(), t2.to_string(), t3.to_string()]);
    assert_eq!(after.events[..2], before.events[..]);
    // Acknowledged, they are gone; later envelopes follow (the poll waits for this one).
    let t4 = fake.push(Envelope::text(&alice(), "four"));
    let next = sig.poll(after.cursor.as_deref()).await.unwrap();
    assert_eq!(next.events.len(), 1);
    assert_eq!(message(&next.events[0]).message_id, t4.to_string());
}

#[tokio::test]
async fn an_unreachable_stream_makes_poll_fail_transiently_until_it_is_back() {
    let fake = FakeSignal::start().await.unwrap();
    fake.refuse_streams(1, 500);
    let sig = Signal::new(config(&fake, 5)).unwrap();
    let err = sig.poll(None).await.unwrap_err();
    assert_eq!(
        err,
        ChannelError::Transient("the signal-cli event stream: HTTP 500".into())
    );
    // The reader retries on its own (after a short backoff).
    assert!(fake.wait_for_stream(1, DEADLINE).await);
    let ts = fake.push(Envelope::text(&alice(), "back"));
    let polled = poll_until(&sig, 1).await;
    assert_eq!(message(&polled.events[0]).message_id, ts.to_string());
}

#[tokio::test]
async fn a_reply_quotes_the_message_with_its_author() {
    let fake = FakeSignal::start().await.unwrap();
    fake.add_group(GROUP);
    let sig = connected(&fake).await;
    let from_alice = fake.push(Envelope::text(&alice(), "question?"));
    let from_bob = fake.push(Envelope::text(&bob(), "group question?").in_group(GROUP));
    poll_until(&sig, 2).await;

    let mut reply = out(&dm(&alice()), "answer");
    reply.reply_to = Some(from_alice.to_string());
    sig.send(&reply).await.unwrap();
    let mut reply = out(&group(), "group answer");
    reply.reply_to = Some(from_bob.to_string());
    sig.send(&reply).await.unwrap();
    // Authors not seen since start: a DM quotes the other party, a group does not quote.
    let mut reply = out(&dm(&bob()), "to an old message");
    reply.reply_to = Some("1600000000000".into());
    sig.send(&reply).await.unwrap();
    let mut reply = out(&group(), "to an old group message");
    reply.reply_to = Some("1600000000000".into());
    sig.send(&reply).await.unwrap();

    let sends = fake.sends();
    assert_eq!(sends[0].recipient.as_deref(), Some(alice().uuid.as_str()));
    assert_eq!(sends[0].group_id, None);
    assert_eq!(sends[0].message, "answer");
    assert_eq!(sends[0].quote_timestamp, Some(from_alice));
    assert_eq!(
        sends[0].quote_author.as_deref(),
        Some(alice().uuid.as_str())
    );
    assert_eq!(sends[1].group_id.as_deref(), Some(GROUP));
    assert_eq!(sends[1].quote_timestamp, Some(from_bob));
    assert_eq!(sends[1].quote_author.as_deref(), Some(bob().uuid.as_str()));
    assert_eq!(sends[2].quote_author.as_deref(), Some(bob().uuid.as_str()));
    assert_eq!(sends[3].quote_timestamp, None);
    assert_eq!(sends[3].quote_author, None);
    assert_eq!(sends[3].params.get("quoteTimestamp"), None);
}

#[tokio::test]
async fn an_edit_sends_with_the_original_timestamp_and_typing_goes_to_the_conversation() {
    let fake = FakeSignal::start().await.unwrap();
    fake.add_group(GROUP);
    let sig = connected(&fake).await;
    let sent = sig.send(&out(&group(), "Thinking…")).await.unwrap();
    sig.edit(&group(), &sent.message_id, "The answer is 42.", None)
        .await
        .unwrap();
    sig.edit(&group(), &sent.message_id, "The answer is 42!", None)
        .await
        .unwrap();
    let sends = fake.sends();
    assert_eq!(sends.len(), 3);
    let original: u64 = sent.message_id.parse().unwrap();
    assert_eq!(sends[1].edit_timestamp, Some(original));
    assert_eq!(
        sends[2].edit_timestamp,
        Some(original),
        "every edit names the original"
    );
    assert_eq!(sends[2].message, "The answer is 42!");
    assert_eq!(sends[2].group_id.as_deref(), Some(GROUP));
    assert!(matches!(
        sig.edit(&group(), "not-a-timestamp", "x", None).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("not a Signal message id")
    ));

    sig.typing(&group()).await.unwrap();
    sig.typing(&dm(&alice())).await.unwrap();
    let typing = fake.typing();
    assert_eq!(typing[0].group_id.as_deref(), Some(GROUP));
    assert_eq!(typing[1].recipient.as_deref(), Some(alice().uuid.as_str()));
    assert!(!typing[0].stop);
    sig.answer_button("s:x:1", "Approved").await.unwrap();
    assert!(fake.reactions().is_empty());
}

#[tokio::test]
async fn send_errors_say_whether_to_wait_retry_or_give_up() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = connected(&fake).await;
    let hi = out(&dm(&alice()), "hi");
    fake.fail_next(
        "send",
        1,
        Failure::RateLimited {
            retry_after_secs: 42,
        },
    );
    assert_eq!(
        sig.send(&hi).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(42)
        }
    );
    fake.fail_next(
        "send",
        1,
        Failure::Rpc {
            code: -5,
            message: "Failed to send message due to rate limiting".into(),
            data: serde_json::Value::Null,
        },
    );
    assert_eq!(
        sig.send(&hi).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(60)
        }
    );
    fake.fail_next("send", 1, Failure::Untrusted);
    assert!(matches!(
        sig.send(&hi).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("safety number changed")
    ));
    fake.fail_next("send", 1, Failure::NetworkFailure);
    assert!(matches!(
        sig.send(&hi).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: false,
            ..
        }
    ));
    fake.fail_next("send", 1, Failure::Internal);
    assert!(matches!(
        sig.send(&hi).await.unwrap_err(),
        SendError::Transient { maybe_delivered: true, message } if message.contains("Connection reset")
    ));
    fake.fail_next("send", 1, Failure::Http(502));
    assert!(matches!(
        sig.send(&hi).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: true,
            ..
        }
    ));
    fake.fail_next("send", 1, Failure::DropAfterHandling);
    assert!(matches!(
        sig.send(&hi).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: true,
            ..
        }
    ));
    assert_eq!(fake.sends().len(), 1, "sent although the answer was lost");
    // A group the bot is not in.
    assert!(matches!(
        sig.send(&out(&group(), "hi")).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("Group not found")
    ));
    // Refused before any request.
    let calls = fake.calls().len();
    assert!(matches!(
        sig.send(&out(&dm(&alice()), " ")).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("empty")
    ));
    assert!(matches!(
        sig.send(&out(&dm(&alice()), &"x".repeat(2001))).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("over this adapter's 2000")
    ));
    let bad_chat = ChatRef {
        id: "a b".into(),
        kind: ChatKind::Dm,
        thread: None,
    };
    assert!(matches!(
        sig.send(&out(&bad_chat, "hi")).await.unwrap_err(),
        SendError::Permanent(_)
    ));
    assert_eq!(fake.calls().len(), calls);

    // Nobody listening: certainly not delivered.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gone = Signal::new(SignalConfig::new(
        format!("http://{addr}").parse().unwrap(),
        ACCOUNT,
    ))
    .unwrap();
    assert!(matches!(
        gone.send(&hi).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: false,
            ..
        }
    ));
    assert!(matches!(
        gone.connect().await.unwrap_err(),
        ChannelError::Transient(_)
    ));
}

#[tokio::test]
async fn an_attachment_is_fetched_through_the_daemon_and_refused_over_the_limit() {
    let fake = FakeSignal::start().await.unwrap();
    fake.add_group(GROUP);
    let sig = connected(&fake).await;
    fake.put_attachment("eZ4mEFMU7xPdS7Yk2pCu.pdf", b"%PDF-1.7 tiny".to_vec());
    fake.push(
        Envelope::text(&bob(), "the report")
            .in_group(GROUP)
            .attachment(
                "eZ4mEFMU7xPdS7Yk2pCu.pdf",
                "application/pdf",
                Some("r.pdf"),
                13,
            ),
    );
    let events = poll_until(&sig, 1).await.events;
    let a = message(&events[0]).attachments[0].clone();
    assert_eq!(
        a.file_ref,
        format!("eZ4mEFMU7xPdS7Yk2pCu.pdf|group|{GROUP}")
    );
    assert_eq!(
        sig.fetch_attachment(&a, 1024).await.unwrap(),
        b"%PDF-1.7 tiny"
    );
    let call = fake.calls().into_iter().last().unwrap();
    assert_eq!(call.method, "getAttachment");
    assert_eq!(call.params["id"], "eZ4mEFMU7xPdS7Yk2pCu.pdf");
    assert_eq!(call.params["groupId"], GROUP);

    let calls = fake.calls().len();
    // Announced too large: refused before any request.
    let big = Attachment {
        size: Some(5000),
        ..a.clone()
    };
    assert_eq!(
        sig.fetch_attachment(&big, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    // A reference that could leave signal-cli's attachment directory is refused.
    for evil in [
        "../../data/accounts.json|dm|x",
        "plain-id-without-chat",
        ".hidden|dm|x",
    ] {
        let e = Attachment {
            file_ref: evil.into(),
            ..a.clone()
        };
        assert!(matches!(
            sig.fetch_attachment(&e, 1024).await.unwrap_err(),
            ChannelError::Protocol(_)
        ));
    }
    assert_eq!(fake.calls().len(), calls);
    // Announced small, larger in fact: refused.
    fake.put_attachment("big.bin", vec![7u8; 4000]);
    let lying = Attachment {
        file_ref: format!("big.bin|dm|{}", alice().uuid),
        size: Some(10),
        ..a.clone()
    };
    assert_eq!(
        sig.fetch_attachment(&lying, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    // Unknown to the daemon.
    let unknown = Attachment {
        file_ref: format!("gone.jpg|dm|{}", alice().uuid),
        size: None,
        ..a
    };
    assert!(matches!(
        sig.fetch_attachment(&unknown, 1024).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("Could not find attachment")
    ));
}

#[tokio::test]
async fn signal_has_no_webhook_routes() {
    let fake = FakeSignal::start().await.unwrap();
    let sig = Signal::new(config(&fake, 5)).unwrap();
    let req = WebhookRequest {
        method: "POST",
        route: "webhook",
        query: "",
        headers: &[],
        body: b"{}",
    };
    assert_eq!(sig.webhook(&req).unwrap_err(), ChannelError::NoSuchRoute);
    assert!(!sig.sends_are_idempotent());
}
