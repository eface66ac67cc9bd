//! The Matrix adapter against the fake homeserver (`matrix::fake`), through the real HTTP
//! client and the real Client-Server API wire format.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::time::Duration;

use chitin_channels::matrix::fake::{BOT, Failure, FakeMatrix, SERVER, TOKEN};
use chitin_channels::matrix::{MAX_TEXT, Matrix, MatrixConfig};
use chitin_channels::text::{split, utf16_len};
use chitin_channels::{
    Attachment, Button, ChannelError, ChatKind, ChatRef, Event, Inbound, Message, OutMessage,
    Platform, SendError, WebhookRequest,
};
use serde_json::{Value, json};
use support::{Shown, chat, closed_port, ignored, message, text_to};
use zeroize::Zeroizing;

const ALICE: &str = "@alice:fake.test";
const BOB: &str = "@bob:fake.test";
const CAROL: &str = "@carol:fake.test";

fn config(fake: &FakeMatrix, token: &str) -> MatrixConfig {
    let mut c = MatrixConfig::new(fake.homeserver(), BOT, Zeroizing::new(token.to_owned()));
    // An idle poll answers at once (tests never wait a poll timeout out).
    c.poll_timeout_ms = 0;
    c
}

async fn connected(fake: &FakeMatrix) -> Matrix {
    let m = Matrix::new(config(fake, TOKEN)).unwrap();
    m.connect().await.unwrap();
    m
}

/// Connected, and past the first poll: the cursor after which new events arrive.
async fn started(fake: &FakeMatrix) -> (Matrix, String) {
    let m = connected(fake).await;
    let first = m.poll(None).await.unwrap();
    (m, first.cursor.unwrap())
}

/// Polls from `cursor`: the events and the cursor after them.
async fn poll_from(m: &Matrix, cursor: &str) -> (Vec<Inbound>, String) {
    let polled = m.poll(Some(cursor)).await.unwrap();
    let next = polled.cursor.clone().unwrap_or_else(|| cursor.to_owned());
    (polled.events, next)
}

fn out(room: &str, text: &str, delivery_id: &str) -> OutMessage {
    text_to(&chat(room, ChatKind::Group), text, delivery_id)
}

/// Alice, Bob and Carol have display names; a DM room with Alice and a group with both.
fn rooms(fake: &FakeMatrix) -> (String, String) {
    fake.set_name(ALICE, "Alice");
    fake.set_name(BOB, "Bob");
    fake.set_name(CAROL, "Carol");
    let dm = fake.create_room(&[ALICE]);
    let group = fake.create_room(&[ALICE, BOB]);
    (dm, group)
}

#[tokio::test]
async fn connect_checks_the_account_and_learns_the_display_name() {
    let fake = FakeMatrix::start().await.unwrap();
    let m = Matrix::new(config(&fake, TOKEN)).unwrap();
    assert_eq!(m.kind(), "matrix");
    let bot = m.connect().await.unwrap();
    assert_eq!(bot.id, BOT);
    assert_eq!(bot.username, "Chitin");
    let endpoints: Vec<&str> = fake.calls().iter().map(|c| c.endpoint).collect();
    assert_eq!(endpoints, ["whoami", "profile", "sync"]);
    let sync = &fake.calls_to("sync")[0];
    assert_eq!(sync.param("since"), None);
    assert_eq!(sync.param("timeout"), Some("0"));
    assert!(fake.calls().iter().all(|c| c.authorized));

    // Without a display name, the localpart is the name.
    let nameless = FakeMatrix::start_with(TOKEN, BOT, None).await.unwrap();
    let m = Matrix::new(config(&nameless, TOKEN)).unwrap();
    assert_eq!(m.connect().await.unwrap().username, "chitin");
}

#[tokio::test]
async fn a_token_of_another_account_is_refused() {
    let fake = FakeMatrix::start_with(TOKEN, "@other:fake.test", None)
        .await
        .unwrap();
    let m = Matrix::new(config(&fake, TOKEN)).unwrap();
    assert_eq!(
        m.connect().await.unwrap_err(),
        ChannelError::Unauthorized(
            "the access token belongs to @other:fake.test, not to the configured user_id \
             @chitin:fake.test"
                .into()
        )
    );
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_the_error_does_not_show_it() {
    let fake = FakeMatrix::start().await.unwrap();
    let wrong = "syt_WrongTokenValue_zzzzzzzzzzzz";
    let m = Matrix::new(config(&fake, wrong)).unwrap();
    let err = m.connect().await.unwrap_err();
    assert_eq!(
        err,
        ChannelError::Unauthorized("whoami: Invalid access token passed. (M_UNKNOWN_TOKEN)".into())
    );
    assert_eq!(
        m.poll(Some("s1")).await.unwrap_err(),
        ChannelError::Unauthorized("whoami: Invalid access token passed. (M_UNKNOWN_TOKEN)".into())
    );
    let room = fake.create_room(&[ALICE]);
    let e = m.send(&out(&room, "hi", "d1")).await.unwrap_err();
    assert_eq!(
        e,
        SendError::Permanent(
            "room state: Invalid access token passed. (M_UNKNOWN_TOKEN): the homeserver refused \
             the access token; check it (`chitin secrets set`)"
                .into()
        )
    );
    assert!(!e.to_string().contains(wrong) && !err.to_string().contains(wrong));
    assert!(fake.sent().is_empty());
    assert!(fake.calls().iter().all(|c| !c.authorized));
}

#[tokio::test]
async fn the_first_poll_skips_history_keeps_invitations_and_returns_the_cursor() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    fake.push_text(&dm, ALICE, "an old message from before the bot ran");
    let invited = fake.invite_bot(CAROL, false, false);
    let m = connected(&fake).await;

    let first = m.poll(None).await.unwrap();
    assert_eq!(first.events.len(), 1, "{:?}", first.events);
    assert!(matches!(&first.events[0].event, Event::Invited { chat, .. } if chat.id == invited));
    let cursor = first.cursor.unwrap();
    assert_eq!(cursor, fake.next_batch());
    let first_sync = fake.calls_to("sync").pop().unwrap();
    assert_eq!(first_sync.param("since"), None);
    assert_eq!(first_sync.param("timeout"), Some("0"));

    let new = fake.push_text(&dm, ALICE, "a new one");
    let (events, _) = poll_from(&m, &cursor).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event_id, format!("e:{new}"));
    assert_eq!(message(&events[0]).text, "a new one");
}

#[tokio::test]
async fn direct_and_group_messages_map_with_senders_and_mentions() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    let first = fake.push_text(&dm, ALICE, "hello there");
    fake.push_text(&group, BOB, "hello all");
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({ "msgtype": "m.text", "body": "Chitin: hi", "m.mentions": { "user_ids": [BOT] } }),
    );
    fake.push_text(&group, BOB, "hey chitin, what's up?");
    fake.push_text(&group, BOB, "ping @chitin:fake.test");
    fake.push_text(&group, BOB, "chitinous shells");
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({ "msgtype": "m.text", "body": "@room hi all", "m.mentions": { "room": true } }),
    );
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({ "msgtype": "m.text", "body": "for alice", "m.mentions": { "user_ids": [ALICE] } }),
    );
    fake.push(
        &group,
        CAROL,
        "m.room.message",
        json!({ "msgtype": "m.notice", "body": "build passed" }),
    );
    fake.push(
        &dm,
        ALICE,
        "m.room.message",
        json!({ "msgtype": "m.emote", "body": "waves" }),
    );

    let (events, _) = poll_from(&m, &cursor).await;
    // Rooms come one after the other (their order is the homeserver's).
    let (in_dm, in_group): (Vec<&Inbound>, Vec<&Inbound>) =
        events.iter().partition(|e| message(e).chat.id == dm);
    assert_eq!(in_dm.len(), 2);
    assert_eq!(in_group.len(), 8);

    let hello = message(in_dm[0]);
    assert_eq!(in_dm[0].event_id, format!("e:{first}"));
    assert_eq!(hello.message_id, first);
    assert_eq!(hello.chat, chat(&dm, ChatKind::Dm));
    assert_eq!(hello.sender.id, ALICE);
    assert_eq!(hello.sender.display, "Alice");
    assert!(!hello.sender.is_bot);
    assert_eq!(hello.text, "hello there");
    assert!(hello.mentioned, "every DM message addresses the bot");
    assert_eq!(hello.reply_to, None);
    assert!(hello.attachments.is_empty());
    assert_eq!(message(in_dm[1]).text, "waves");

    let g: Vec<&Message> = in_group.iter().map(|e| message(e)).collect();
    assert!(g.iter().all(|m| m.chat == chat(&group, ChatKind::Group)));
    let mentioned: Vec<bool> = g.iter().map(|m| m.mentioned).collect();
    assert_eq!(
        mentioned,
        [false, true, true, true, false, false, false, false]
    );
    assert_eq!(g[0].sender.display, "Bob");
    let notice = g[7];
    assert_eq!(notice.text, "build passed");
    assert!(notice.sender.is_bot, "m.notice is what bots send");
    assert_eq!(
        notice.sender.display, "@carol:fake.test",
        "Carol never joined"
    );
}

#[tokio::test]
async fn a_room_in_m_direct_is_a_dm_until_more_than_two_have_joined() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, group) = rooms(&fake);
    // The bot alone in a room its own account lists as a DM with Carol (who left, say).
    let alone = fake.create_room(&[]);
    fake.set_direct(CAROL, &alone);
    fake.set_direct(BOB, &group);
    let (m, cursor) = started(&fake).await;
    fake.push_text(&alone, CAROL, "still there?");
    fake.push_text(&group, BOB, "in m.direct but three are here");
    fake.push_text(&dm, ALICE, "just us");
    let (events, cursor) = poll_from(&m, &cursor).await;
    let kind_in = |room: &str| {
        events
            .iter()
            .map(message)
            .find(|m| m.chat.id == room)
            .unwrap()
            .chat
            .kind
    };
    assert_eq!(kind_in(&alone), ChatKind::Dm);
    assert_eq!(kind_in(&group), ChatKind::Group);
    assert_eq!(kind_in(&dm), ChatKind::Dm);

    // A third member joins the DM: from then on it is a group.
    fake.join_member(&dm, CAROL);
    fake.push_text(&dm, ALICE, "Carol is here now");
    let (events, _) = poll_from(&m, &cursor).await;
    let now = message(&events[0]);
    assert_eq!(now.chat.kind, ChatKind::Group);
    assert!(!now.mentioned);
}

#[tokio::test]
async fn threads_replies_and_reply_fallbacks_map_as_documented() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    let bot_msg = m
        .send(&out(&group, "I am the bot", "d-1"))
        .await
        .unwrap()
        .message_id;
    let human = fake.push_text(&group, ALICE, "a human's message");
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "> <@chitin:fake.test> I am the bot\n\nthanks!",
            "m.relates_to": { "m.in_reply_to": { "event_id": bot_msg } },
        }),
    );
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "+1",
            "m.relates_to": { "m.in_reply_to": { "event_id": human } },
        }),
    );
    // A thread message whose reply is only the fallback for unthreaded clients.
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "in the thread",
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": human,
                "is_falling_back": true,
                "m.in_reply_to": { "event_id": bot_msg },
            },
        }),
    );
    // A real reply to the bot inside the thread.
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "answering you",
            "m.relates_to": {
                "rel_type": "m.thread",
                "event_id": human,
                "m.in_reply_to": { "event_id": bot_msg },
            },
        }),
    );
    let (events, _) = poll_from(&m, &cursor).await;
    assert_eq!(
        events.len(),
        5,
        "the bot's own message gives no event: {events:?}"
    );
    let msgs: Vec<&Message> = events[1..].iter().map(message).collect();

    assert!(msgs[0].mentioned, "a reply to the bot");
    assert_eq!(msgs[0].reply_to.as_deref(), Some(bot_msg.as_str()));
    assert_eq!(msgs[0].text, "thanks!", "the quoted fallback is removed");
    assert!(!msgs[1].mentioned);
    assert_eq!(msgs[1].reply_to.as_deref(), Some(human.as_str()));

    assert!(
        !msgs[2].mentioned,
        "a thread's fallback reply is not a reply"
    );
    assert_eq!(msgs[2].reply_to, None);
    assert_eq!(msgs[2].chat.thread.as_deref(), Some(human.as_str()));
    assert_eq!(msgs[2].chat.kind, ChatKind::Group);

    assert!(msgs[3].mentioned);
    assert_eq!(msgs[3].reply_to.as_deref(), Some(bot_msg.as_str()));
    assert_eq!(msgs[3].chat.thread.as_deref(), Some(human.as_str()));
    assert!(
        fake.calls_to("event").is_empty(),
        "the senders of events seen in a sync are known without asking"
    );
}

#[tokio::test]
async fn a_reply_to_a_message_the_bot_sent_before_a_restart_is_recognized() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (before, cursor) = started(&fake).await;
    let bot_msg = before
        .send(&out(&group, "sent before the restart", "d-1"))
        .await
        .unwrap()
        .message_id;
    let (_, cursor) = poll_from(&before, &cursor).await;
    drop(before);
    fake.push_text(&group, ALICE, "something else");

    let after = connected(&fake).await;
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "about that",
            "m.relates_to": { "m.in_reply_to": { "event_id": bot_msg } },
        }),
    );
    let (events, _) = poll_from(&after, &cursor).await;
    let reply = message(events.last().unwrap());
    assert!(reply.mentioned);
    assert_eq!(fake.calls_to("event").len(), 1, "looked up once");
    assert!(
        fake.calls_to("event")[0].target.contains(
            &bot_msg
                .replace('$', "%24")
                .replace('/', "%2F")
                .replace('+', "%2B")
        ),
        "{:?}",
        fake.calls_to("event")
    );
}

#[tokio::test]
async fn edits_map_to_edited_events_of_the_original_message() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    let original = fake.push_text(&group, BOB, "typo");
    let edit = fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.text",
            "body": "* fixed, chitin",
            "m.new_content": { "msgtype": "m.text", "body": "fixed, chitin" },
            "m.relates_to": { "rel_type": "m.replace", "event_id": original },
        }),
    );
    let (events, _) = poll_from(&m, &cursor).await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].event_id, format!("e:{edit}"));
    match &events[1].event {
        Event::Edited(e) => {
            assert_eq!(e.message_id, original);
            assert_eq!(e.text, "fixed, chitin");
            assert!(e.mentioned);
            assert_eq!(e.sender.id, BOB);
        }
        other => panic!("expected an edit, got {other:?}"),
    }
}

#[tokio::test]
async fn attachments_map_with_their_mxc_uri_name_type_and_size() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({
            "msgtype": "m.image",
            "body": "look at this, chitin",
            "filename": "cat.png",
            "url": "mxc://fake.test/CatPng",
            "info": { "mimetype": "image/png", "size": 4242, "w": 10, "h": 10 },
        }),
    );
    fake.push(
        &dm,
        ALICE,
        "m.room.message",
        json!({
            "msgtype": "m.file",
            "body": "report.pdf",
            "url": "mxc://fake.test/Report_1",
            "info": { "mimetype": "application/pdf" },
        }),
    );
    fake.push(
        &dm,
        ALICE,
        "m.room.message",
        json!({
            "msgtype": "m.file",
            "body": "secret.bin",
            "file": { "url": "mxc://fake.test/Enc", "v": "v2" },
        }),
    );
    fake.push(
        &dm,
        ALICE,
        "m.room.message",
        json!({ "msgtype": "m.location", "body": "Paris", "geo_uri": "geo:48.85,2.35" }),
    );
    let (events, _) = poll_from(&m, &cursor).await;
    let image = events
        .iter()
        .find(|e| matches!(&e.event, Event::Message(m) if m.chat.id == group))
        .unwrap();
    let image = message(image);
    assert_eq!(
        image.text, "look at this, chitin",
        "the body is the caption"
    );
    assert!(image.mentioned);
    assert_eq!(
        image.attachments,
        [Attachment {
            file_ref: "mxc://fake.test/CatPng".into(),
            name: Some("cat.png".into()),
            mime: Some("image/png".into()),
            size: Some(4242),
        }]
    );
    let in_dm: Vec<&Inbound> = events
        .iter()
        .filter(|e| !matches!(&e.event, Event::Message(m) if m.chat.id == group))
        .collect();
    let file = message(in_dm[0]);
    assert_eq!(file.text, "", "the body is only the file name");
    assert_eq!(file.attachments[0].name.as_deref(), Some("report.pdf"));
    assert_eq!(file.attachments[0].size, None);
    assert_eq!(ignored(in_dm[1]), "an m.file without a url (encrypted?)");
    assert_eq!(ignored(in_dm[2]), "an m.location message");
}

#[tokio::test]
async fn reactions_stickers_unreadable_events_and_the_bots_own_events() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    let target = fake.push_text(&group, ALICE, "vote");
    fake.push(
        &group,
        BOB,
        "m.reaction",
        json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "👍" } }),
    );
    fake.push(
        &group,
        BOB,
        "m.sticker",
        json!({ "body": "a cat", "url": "mxc://fake.test/S" }),
    );
    fake.push(
        &group,
        BOB,
        "m.room.message",
        json!({ "msgtype": 5, "body": ["x"] }),
    );
    fake.push(&group, BOB, "m.room.message", json!({}));
    fake.push_text(&group, BOT, "the bot's own message, sent from elsewhere");
    let (events, _) = poll_from(&m, &cursor).await;
    assert_eq!(events.len(), 5, "{events:?}");
    let what: Vec<&str> = events[1..].iter().map(ignored).collect();
    assert_eq!(
        what,
        [
            "a reaction",
            "a sticker",
            "a message this adapter cannot read",
            "a message without a msgtype (redacted?)",
        ]
    );
}

#[tokio::test]
async fn the_previous_cursor_redelivers_and_the_returned_cursor_does_not() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let (m, c0) = started(&fake).await;
    let a = fake.push_text(&dm, ALICE, "one");
    let b = fake.push_text(&dm, ALICE, "two");

    let first = m.poll(Some(&c0)).await.unwrap();
    let ids: Vec<&str> = first.events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(ids, [format!("e:{a}"), format!("e:{b}")]);
    let c1 = first.cursor.clone().unwrap();
    assert_ne!(c1, c0);

    // The engine crashed before storing c1: the same events come again, with the same ids.
    let again = m.poll(Some(&c0)).await.unwrap();
    assert_eq!(again, first);

    // With c1: nothing new, the cursor unchanged.
    let after = m.poll(Some(&c1)).await.unwrap();
    assert!(after.events.is_empty(), "{:?}", after.events);
    assert_eq!(after.cursor, None);
    let c = fake.push_text(&dm, ALICE, "three");
    let next = m.poll(Some(&c1)).await.unwrap();
    assert_eq!(next.events.len(), 1);
    assert_eq!(next.events[0].event_id, format!("e:{c}"));

    let polls = fake.calls_to("sync");
    let last = polls.last().unwrap();
    assert_eq!(last.param("since"), Some(c1.as_str()));
    assert_eq!(last.param("timeout"), Some("0"));
    let filter: Value = serde_json::from_str(last.param("filter").unwrap()).unwrap();
    assert_eq!(filter["room"]["timeline"]["limit"], 100);
    assert_eq!(filter["room"]["state"]["lazy_load_members"], true);
}

#[tokio::test]
async fn a_long_poll_answers_as_soon_as_an_event_arrives() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let mut c = config(&fake, TOKEN);
    c.poll_timeout_ms = 600_000;
    let m = Matrix::new(c).unwrap();
    m.connect().await.unwrap();
    let cursor = m.poll(None).await.unwrap().cursor.unwrap();
    let polling = tokio::spawn(async move { m.poll(Some(&cursor)).await });
    let pushed = fake.push_text(&dm, ALICE, "wake up");
    let polled = polling.await.unwrap().unwrap();
    assert_eq!(polled.events[0].event_id, format!("e:{pushed}"));
    assert_eq!(
        fake.calls_to("sync").last().unwrap().param("timeout"),
        Some("600000")
    );
}

#[tokio::test]
async fn text_is_sent_plain_without_markup_or_mentions() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let m = connected(&fake).await;
    let text = "*bold* <b>html</b> [click](https://evil.example/?q=secret) @room @alice:fake.test";
    let sent = m.send(&out(&dm, text, "delivery-1")).await.unwrap();
    let rec = &fake.sent()[0];
    assert_eq!(rec.event_id, sent.message_id);
    assert_eq!(rec.room_id, dm);
    assert_eq!(rec.txn_id, "delivery-1");
    assert_eq!(rec.event_type, "m.room.message");
    assert_eq!(
        rec.content,
        json!({ "msgtype": "m.text", "body": text, "m.mentions": {} })
    );
    assert_eq!(rec.content.get("format"), None);
    assert_eq!(rec.content.get("formatted_body"), None);
}

#[tokio::test]
async fn a_send_retried_with_the_same_delivery_id_posts_once() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let m = connected(&fake).await;
    assert!(m.sends_are_idempotent());
    let first = m.send(&out(&group, "once", "row-7")).await.unwrap();
    let again = m.send(&out(&group, "once", "row-7")).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(fake.sent().len(), 1);

    // Posted, but the answer was lost: the retry gets the same event, nothing posted twice.
    fake.fail_next("send", 1, Failure::DropAfterHandling);
    match m
        .send(&out(&group, "lost answer", "row-8"))
        .await
        .unwrap_err()
    {
        SendError::Transient {
            maybe_delivered, ..
        } => assert!(maybe_delivered),
        other => panic!("expected Transient, got {other:?}"),
    }
    assert_eq!(fake.sent().len(), 2);
    let retried = m.send(&out(&group, "lost answer", "row-8")).await.unwrap();
    assert_eq!(fake.sent().len(), 2);
    assert_eq!(retried.message_id, fake.sent()[1].event_id);
}

#[tokio::test]
async fn ids_with_reserved_characters_are_percent_encoded_in_the_path() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, _) = started(&fake).await;
    let asked = fake.push_text(&group, ALICE, "q");
    assert!(asked.contains('/') && asked.contains('+'), "{asked}");
    let mut msg = out(&group, "a", "out/7 ?#%");
    msg.reply_to = Some(asked.clone());
    m.send(&msg).await.unwrap();
    let rec = &fake.sent()[0];
    assert_eq!(rec.txn_id, "out/7 ?#%");
    assert_eq!(
        rec.content["m.relates_to"]["m.in_reply_to"]["event_id"],
        asked
    );
    let target = &fake.calls_to("send")[0].target;
    assert!(
        target.ends_with("/send/m.room.message/out%2F7%20%3F%23%25"),
        "{target}"
    );
    // A transaction id URL parsers would resolve as a dot segment is refused, not sent.
    let e = m.send(&out(&group, "a", "..")).await.unwrap_err();
    assert!(matches!(e, SendError::Permanent(_)), "{e:?}");
    assert_eq!(fake.sent().len(), 1);
}

#[tokio::test]
async fn replies_and_threads_are_sent_with_their_relations() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let m = connected(&fake).await;
    let root = fake.push_text(&group, ALICE, "root");
    let q = fake.push_text(&group, BOB, "question");

    let mut reply = out(&group, "reply", "d1");
    reply.reply_to = Some(q.clone());
    m.send(&reply).await.unwrap();
    let mut in_thread = out(&group, "in thread", "d2");
    in_thread.chat.thread = Some(root.clone());
    m.send(&in_thread).await.unwrap();
    let mut both = in_thread.clone();
    both.delivery_id = "d3".into();
    both.reply_to = Some(q.clone());
    m.send(&both).await.unwrap();

    let sent = fake.sent();
    assert_eq!(
        sent[0].content["m.relates_to"],
        json!({ "m.in_reply_to": { "event_id": q } })
    );
    assert_eq!(
        sent[1].content["m.relates_to"],
        json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": true,
            "m.in_reply_to": { "event_id": root },
        })
    );
    assert_eq!(
        sent[2].content["m.relates_to"],
        json!({
            "rel_type": "m.thread",
            "event_id": root,
            "is_falling_back": false,
            "m.in_reply_to": { "event_id": q },
        })
    );
    assert!(sent.iter().all(|s| s.content["m.mentions"] == json!({})));
    let e = m
        .send(&OutMessage {
            reply_to: Some("not-an-event-id".into()),
            ..out(&group, "x", "d4")
        })
        .await
        .unwrap_err();
    assert_eq!(
        e,
        SendError::Permanent("\"not-an-event-id\" is not a Matrix event id".into())
    );
}

#[tokio::test]
async fn buttons_are_not_rendered_and_there_is_no_press_to_answer() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let m = connected(&fake).await;
    let text = "Approval needed: run `ls`\n\nReply /approve K7Q2 or /deny K7Q2.";
    let mut msg = out(&dm, text, "appr-1");
    msg.buttons = vec![
        Button {
            label: "Approve".into(),
            data: "a:1".into(),
        },
        Button {
            label: "Deny".into(),
            data: "d:1".into(),
        },
    ];
    m.send(&msg).await.unwrap();
    assert_eq!(fake.sent()[0].content["body"], text);
    assert_eq!(
        m.answer_button("cb", "ok").await.unwrap_err(),
        SendError::Permanent("Matrix has no buttons: there is no button press to answer".into())
    );
}

#[tokio::test]
async fn a_429_is_rate_limited_with_the_homeservers_wait() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    fake.fail_next(
        "send",
        1,
        Failure::RateLimited {
            retry_after_ms: 1500,
        },
    );
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_millis(1500)
        }
    );
    fake.fail_next(
        "send",
        1,
        Failure::RateLimitedHeader {
            retry_after_secs: 7,
        },
    );
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_secs(7)
        }
    );
    assert!(fake.sent().is_empty());
    m.send(&out(&group, "hi", "d1")).await.unwrap();
    assert_eq!(fake.sent().len(), 1);

    fake.fail_next(
        "sync",
        1,
        Failure::RateLimited {
            retry_after_ms: 3000,
        },
    );
    assert_eq!(
        m.poll(Some(&cursor)).await.unwrap_err(),
        ChannelError::RateLimited {
            retry_after: Duration::from_secs(3)
        }
    );
    fake.fail_next(
        "typing",
        1,
        Failure::RateLimited {
            retry_after_ms: 250,
        },
    );
    assert_eq!(
        m.typing(&chat(&group, ChatKind::Group)).await.unwrap_err(),
        SendError::RateLimited {
            retry_after: Duration::from_millis(250)
        }
    );
}

#[tokio::test]
async fn server_errors_are_transient_and_refusals_permanent() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    fake.fail_next("send", 1, Failure::ServerError);
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::Transient {
            message: "send: Internal server error (M_UNKNOWN)".into(),
            maybe_delivered: true
        }
    );
    fake.fail_next("send", 1, Failure::BadGateway);
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::Transient {
            message: "send: HTTP 502 without a Matrix error".into(),
            maybe_delivered: true
        }
    );
    // The encryption check before the send failed: nothing can have been posted.
    fake.fail_next("state", 1, Failure::ServerError);
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::Transient {
            message: "room state: Internal server error (M_UNKNOWN)".into(),
            maybe_delivered: false
        }
    );
    fake.fail_next("send", 1, Failure::Forbidden("You are banned".into()));
    assert_eq!(
        m.send(&out(&group, "hi", "d1")).await.unwrap_err(),
        SendError::Permanent("send: You are banned (M_FORBIDDEN)".into())
    );
    // A room the bot is not in.
    let elsewhere = fake.invite_bot(ALICE, false, false);
    assert_eq!(
        m.send(&out(&elsewhere, "hi", "d2")).await.unwrap_err(),
        SendError::Permanent(format!(
            "room state: User @chitin:fake.test not in room {elsewhere} (M_FORBIDDEN)"
        ))
    );
    assert!(fake.sent().is_empty());
    fake.fail_next("sync", 1, Failure::ServerError);
    assert_eq!(
        m.poll(Some(&cursor)).await.unwrap_err(),
        ChannelError::Transient("sync: Internal server error (M_UNKNOWN)".into())
    );
    assert!(matches!(
        m.send(&out("not-a-room", "hi", "d3")).await.unwrap_err(),
        SendError::Permanent(e) if e == "\"not-a-room\" is not a Matrix room id"
    ));
    let long = "x".repeat(MAX_TEXT + 1);
    assert!(matches!(
        m.send(&out(&group, &long, "d4")).await.unwrap_err(),
        SendError::Permanent(e) if e.contains("4097 UTF-16 units")
    ));
}

#[tokio::test]
async fn a_refused_connection_is_transient_and_certainly_not_delivered() {
    let mut c = MatrixConfig::new(
        format!("http://{}/", closed_port()).parse().unwrap(),
        BOT,
        Zeroizing::new(TOKEN.into()),
    );
    c.poll_timeout_ms = 0;
    let m = Matrix::new(c).unwrap();
    match m.send(&out("!r:fake.test", "hi", "d1")).await.unwrap_err() {
        SendError::Transient {
            message,
            maybe_delivered,
        } => {
            assert!(!maybe_delivered, "{message}");
            assert!(message.starts_with("room state: "), "{message}");
        }
        other => panic!("expected Transient, got {other:?}"),
    }
    assert!(matches!(
        m.connect().await.unwrap_err(),
        ChannelError::Transient(e) if e.starts_with("whoami: ")
    ));
}

#[tokio::test]
async fn an_encrypted_room_is_never_sent_to_and_its_messages_are_ignored() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let secret = fake.create_encrypted_room(&[ALICE, BOB]);
    let (m, cursor) = started(&fake).await;
    fake.push(
        &secret,
        ALICE,
        "m.room.encrypted",
        json!({ "algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgAEn...", "session_id": "s" }),
    );
    fake.push_text(
        &secret,
        BOB,
        "chitin, plaintext from a client that ignores encryption",
    );
    let (events, _) = poll_from(&m, &cursor).await;
    let what: Vec<&str> = events.iter().map(ignored).collect();
    assert_eq!(
        what,
        [
            "an end-to-end encrypted message (this adapter cannot decrypt)",
            "a message in an end-to-end encrypted room",
        ]
    );
    let refusal = format!(
        "the room {secret} is an end-to-end encrypted room: Chitin cannot encrypt, and never \
         sends plaintext into an encrypted room; use a room without encryption"
    );
    assert_eq!(
        m.send(&out(&secret, "hello", "d1")).await.unwrap_err(),
        SendError::Permanent(refusal.clone())
    );
    assert_eq!(
        m.edit(&chat(&secret, ChatKind::Group), "$x", "hello", None)
            .await
            .unwrap_err(),
        SendError::Permanent(refusal)
    );

    // A room that turned encryption on after the adapter last synced: the check before the
    // send sees it.
    fake.enable_encryption(&group, ALICE);
    let e = m.send(&out(&group, "hello", "d2")).await.unwrap_err();
    assert!(
        matches!(&e, SendError::Permanent(m) if m.contains("end-to-end encrypted room")),
        "{e:?}"
    );
    assert!(fake.sent().is_empty(), "{:?}", fake.sent());

    // A fresh adapter (after a restart) learns it from its first sync, without asking.
    let fresh = connected(&fake).await;
    let before = fake.calls_to("state").len();
    assert!(matches!(
        fresh.send(&out(&secret, "hello", "d3")).await.unwrap_err(),
        SendError::Permanent(_)
    ));
    assert_eq!(fake.calls_to("state").len(), before);
    assert!(fake.sent().is_empty());
}

#[tokio::test]
async fn an_invitation_is_an_event_and_join_accepts_it() {
    let fake = FakeMatrix::start().await.unwrap();
    fake.set_name(ALICE, "Alice");
    let (m, cursor) = started(&fake).await;
    let room = fake.invite_bot(ALICE, true, false);
    let polled = m.poll(Some(&cursor)).await.unwrap();
    assert_eq!(polled.events.len(), 1);
    let inv = &polled.events[0];
    assert!(
        inv.event_id.starts_with(&format!("i:{room}:")),
        "{}",
        inv.event_id
    );
    match &inv.event {
        Event::Invited { chat, sender } => {
            assert_eq!(
                chat,
                &ChatRef {
                    id: room.clone(),
                    kind: ChatKind::Dm,
                    thread: None
                }
            );
            assert_eq!(sender.id, ALICE);
            assert_eq!(sender.display, "Alice");
        }
        other => panic!("expected an invitation, got {other:?}"),
    }
    // Redelivered with the same id.
    assert_eq!(m.poll(Some(&cursor)).await.unwrap(), polled);
    let cursor = polled.cursor.unwrap();

    m.join(&chat(&room, ChatKind::Dm)).await.unwrap();
    assert_eq!(fake.joins(), std::slice::from_ref(&room));
    assert_eq!(fake.bot_membership(&room), Some("join"));
    fake.push_text(&room, ALICE, "thanks for joining");
    let (events, _) = poll_from(&m, &cursor).await;
    let msg = message(events.last().unwrap());
    assert_eq!(msg.chat, chat(&room, ChatKind::Dm));
    assert_eq!(msg.text, "thanks for joining");

    // A group invitation; joining a room without an invitation is refused.
    let group = fake.invite_bot(BOB, false, false);
    let (events, _) = poll_from(&m, &cursor).await;
    let kinds: Vec<ChatKind> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Invited { chat, .. } if chat.id == group => Some(chat.kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, [ChatKind::Group]);
    // Joining twice is one join; a room the bot was not invited to is refused.
    m.join(&chat(&group, ChatKind::Group)).await.unwrap();
    m.join(&chat(&group, ChatKind::Group)).await.unwrap();
    assert_eq!(fake.joins(), [room.clone(), group.clone()]);
    let e = m
        .join(&chat("!nowhere:fake.test", ChatKind::Group))
        .await
        .unwrap_err();
    assert!(matches!(e, SendError::Permanent(_)), "{e:?}");
}

#[tokio::test]
async fn an_invitation_into_an_encrypted_room_is_refused_and_rejected() {
    let fake = FakeMatrix::start().await.unwrap();
    let (m, cursor) = started(&fake).await;
    let room = fake.invite_bot(ALICE, true, true);
    let (events, _) = poll_from(&m, &cursor).await;
    assert!(matches!(&events[0].event, Event::Invited { chat, .. } if chat.id == room));
    let e = m.join(&chat(&room, ChatKind::Dm)).await.unwrap_err();
    assert_eq!(
        e,
        SendError::Permanent(format!(
            "the room {room} is an end-to-end encrypted room: Chitin cannot encrypt, and never \
             sends plaintext into an encrypted room; use a room without encryption; the \
             invitation was rejected"
        ))
    );
    assert!(
        fake.joins().is_empty(),
        "refused from the invite state, before joining"
    );
    assert_eq!(fake.leaves(), std::slice::from_ref(&room));
    assert_eq!(fake.bot_membership(&room), Some("leave"));

    // An adapter that never saw the invite state finds out after joining, and leaves.
    let other = fake.invite_bot(BOB, false, true);
    let blind = Matrix::new(config(&fake, TOKEN)).unwrap();
    let e = blind
        .join(&chat(&other, ChatKind::Group))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, SendError::Permanent(m) if m.contains("end-to-end encrypted room")),
        "{e:?}"
    );
    assert_eq!(fake.joins(), std::slice::from_ref(&other));
    assert_eq!(fake.bot_membership(&other), Some("leave"));
    assert!(fake.sent().is_empty());
}

#[tokio::test]
async fn typing_shows_for_five_seconds() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let m = connected(&fake).await;
    m.typing(&chat(&dm, ChatKind::Dm)).await.unwrap();
    let t = &fake.typing()[0];
    assert_eq!(t.room_id, dm);
    assert_eq!(t.user_id, BOT);
    assert_eq!(t.body, json!({ "typing": true, "timeout": 5000 }));
}

#[tokio::test]
async fn an_edit_is_a_replacement_and_a_retried_edit_posts_once() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let m = connected(&fake).await;
    let g = chat(&group, ChatKind::Group);
    let sent = m.send(&out(&group, "Approve?", "d1")).await.unwrap();
    m.edit(&g, &sent.message_id, "Approved by Alice", None)
        .await
        .unwrap();
    let edit = &fake.sent()[1];
    assert_eq!(
        edit.content,
        json!({
            "msgtype": "m.text",
            "body": "* Approved by Alice",
            "m.new_content": { "msgtype": "m.text", "body": "Approved by Alice", "m.mentions": {} },
            "m.relates_to": { "rel_type": "m.replace", "event_id": sent.message_id },
            "m.mentions": {},
        })
    );
    assert!(edit.txn_id.starts_with("edit-"), "{}", edit.txn_id);
    // The same edit again is the same transaction.
    m.edit(&g, &sent.message_id, "Approved by Alice", None)
        .await
        .unwrap();
    assert_eq!(fake.sent().len(), 2);
    m.edit(&g, &sent.message_id, "Denied by Bob", None)
        .await
        .unwrap();
    assert_eq!(fake.sent().len(), 3);
    assert_ne!(fake.sent()[2].txn_id, edit.txn_id);
}

#[tokio::test]
async fn an_attachment_is_fetched_with_authenticated_media_and_refused_over_the_limit() {
    let fake = FakeMatrix::start().await.unwrap();
    let m = connected(&fake).await;
    let uri = fake.put_media("Doc_1", "application/pdf", b"%PDF-1.7 tiny".to_vec());
    let a = Attachment {
        file_ref: uri,
        name: Some("report.pdf".into()),
        mime: Some("application/pdf".into()),
        size: Some(13),
    };
    assert_eq!(
        m.fetch_attachment(&a, 1024).await.unwrap(),
        b"%PDF-1.7 tiny"
    );
    let call = fake.calls_to("media").pop().unwrap();
    assert_eq!(
        call.target,
        format!("/_matrix/client/v1/media/download/{SERVER}/Doc_1")
    );
    assert!(call.authorized);

    // Announced too large: refused before any request.
    let big = Attachment {
        size: Some(5000),
        ..a.clone()
    };
    assert_eq!(
        m.fetch_attachment(&big, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    assert_eq!(fake.calls_to("media").len(), 1);
    // Announced small, larger in fact: refused on Content-Length, and without it while reading.
    for uri in [
        fake.put_media("Big_1", "application/octet-stream", vec![7u8; 4000]),
        fake.put_media_chunked("Big_2", "application/octet-stream", vec![7u8; 4000]),
    ] {
        let lying = Attachment {
            file_ref: uri,
            size: Some(10),
            ..a.clone()
        };
        assert_eq!(
            m.fetch_attachment(&lying, 1024).await.unwrap_err(),
            ChannelError::TooLarge { max_bytes: 1024 }
        );
    }
    // Within the limit, chunked: read whole.
    let uri = fake.put_media_chunked("Mid_1", "text/plain", vec![b'x'; 3000]);
    let mid = Attachment {
        file_ref: uri,
        size: None,
        ..a.clone()
    };
    assert_eq!(m.fetch_attachment(&mid, 4096).await.unwrap().len(), 3000);

    // Behind a CDN: the redirect is followed without the token.
    let uri = fake.put_media_behind_cdn("Cdn_1", "image/png", b"PNG".to_vec());
    let cdn = Attachment {
        file_ref: uri,
        size: None,
        ..a.clone()
    };
    assert_eq!(m.fetch_attachment(&cdn, 1024).await.unwrap(), b"PNG");
    let d = fake.downloads().pop().unwrap();
    assert!(d.via_cdn);
    assert!(!d.authorized, "the CDN never sees the access token");

    // Unknown media, and a file_ref that is not a strict mxc URI (no request).
    let unknown = Attachment {
        file_ref: format!("mxc://{SERVER}/Nope"),
        size: None,
        ..a.clone()
    };
    assert_eq!(
        m.fetch_attachment(&unknown, 1024).await.unwrap_err(),
        ChannelError::Protocol("media download: Not found (M_NOT_FOUND)".into())
    );
    let before = fake.calls().len();
    for bad in [
        "https://evil.example/x",
        "mxc://fake.test/../../x",
        "mxc://fake.test/a/b",
    ] {
        let e = m
            .fetch_attachment(
                &Attachment {
                    file_ref: bad.into(),
                    ..a.clone()
                },
                1024,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, ChannelError::Protocol(_)), "{bad}: {e:?}");
    }
    assert_eq!(fake.calls().len(), before);
}

#[tokio::test]
async fn the_token_never_appears_in_urls_errors_or_debug_output() {
    let fake = FakeMatrix::start().await.unwrap();
    let (_, group) = rooms(&fake);
    let (m, cursor) = started(&fake).await;
    let mut shown = Shown::default();
    for f in [
        Failure::RateLimited { retry_after_ms: 1 },
        Failure::ServerError,
        Failure::BadGateway,
        Failure::Drop,
        // A proxy that echoes the request's Authorization header in its error.
        Failure::Forbidden(format!("refused Authorization: Bearer {TOKEN}")),
    ] {
        fake.fail_next("send", 1, f.clone());
        shown.error(&m.send(&out(&group, "hi", "d1")).await.unwrap_err());
        fake.fail_next("sync", 1, f.clone());
        shown.error(&m.poll(Some(&cursor)).await.unwrap_err());
        fake.fail_next("media", 1, f);
        let uri = fake.put_media("M_1", "text/plain", b"x".to_vec());
        let a = Attachment {
            file_ref: uri,
            name: None,
            mime: None,
            size: None,
        };
        if let Err(e) = m.fetch_attachment(&a, 10).await {
            shown.error(&e);
        }
    }
    shown.debug(&m);
    let gone = Matrix::new(MatrixConfig::new(
        format!("http://{}/", closed_port()).parse().unwrap(),
        BOT,
        Zeroizing::new(TOKEN.into()),
    ))
    .unwrap();
    shown.error(&gone.connect().await.unwrap_err());
    shown.error(&gone.send(&out(&group, "hi", "d1")).await.unwrap_err());

    shown.assert_hides(&[TOKEN]);
    shown.assert_some_contains("refused Authorization: Bearer <redacted>");
    for c in fake.calls() {
        assert!(!c.target.contains(TOKEN), "token in a URL: {}", c.target);
    }
}

#[tokio::test]
async fn webhook_requests_have_no_route() {
    let fake = FakeMatrix::start().await.unwrap();
    let m = Matrix::new(config(&fake, TOKEN)).unwrap();
    for (method, route) in [("POST", "webhook"), ("GET", "events"), ("POST", "")] {
        let req = WebhookRequest {
            method,
            route,
            query: "",
            headers: &[],
            body: b"{}",
        };
        assert_eq!(m.webhook(&req).unwrap_err(), ChannelError::NoSuchRoute);
    }
}

#[tokio::test]
async fn a_ten_thousand_character_answer_is_split_within_the_limit_and_every_piece_is_posted() {
    let fake = FakeMatrix::start().await.unwrap();
    let (dm, _) = rooms(&fake);
    let m = connected(&fake).await;
    let mut text = String::new();
    let mut n = 0;
    while text.chars().count() < 10_000 {
        n += 1;
        text.push_str(&format!(
            "{n}. Résumé 😀 of step {n}: the quick brown fox 🦊 jumps.\n"
        ));
    }
    let text: String = text.chars().take(10_000).collect();
    let limit = m.limits().max_text_chars;
    assert_eq!(limit, 4096);
    let pieces = split(&text, limit);
    assert!(pieces.len() >= 3);
    for (i, p) in pieces.iter().enumerate() {
        assert!(utf16_len(p) <= limit);
        m.send(&out(&dm, p, &format!("long-{i}"))).await.unwrap();
    }
    let sent: Vec<String> = fake
        .sent()
        .into_iter()
        .map(|s| s.content["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sent.concat(), text);
    // The worst case of the limit still fits an event: every unit a `\u00XX` escape, twice.
    let worst = "\u{1}".repeat(limit);
    let edit = json!({
        "msgtype": "m.text",
        "body": format!("* {worst}"),
        "m.new_content": { "msgtype": "m.text", "body": worst, "m.mentions": {} },
        "m.relates_to": { "rel_type": "m.replace", "event_id": "$x" },
        "m.mentions": {},
    });
    assert!(
        edit.to_string().len() < 65_536 - 8192,
        "{}",
        edit.to_string().len()
    );
}
