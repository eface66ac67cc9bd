//! The WhatsApp adapter against the fake Cloud API (`whatsapp::fake`), through the real HTTP
//! client, the real wire format and signed webhook notifications.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod support;

use std::time::Duration;

use chitin_channels::text::utf16_len;
use chitin_channels::whatsapp::fake::{
    ACCESS_TOKEN, APP_SECRET, DISPLAY_NUMBER, Failure, FakeUser, FakeWhatsApp, Incoming,
    PHONE_NUMBER_ID, VERIFY_TOKEN, handshake_query, status_json,
};
use chitin_channels::whatsapp::{
    DeliveryStatus, MAX_INTERACTIVE_BODY, StatusError, WhatsApp, WhatsAppConfig,
};
use chitin_channels::{
    Attachment, Button, ChannelError, ChatKind, ChatRef, Event, OutMessage, Platform, SendError,
    WebhookBody, WebhookParsed, WebhookRequest,
};
use serde_json::json;
use support::{Shown, approve_deny, chat, message, press, text_to};
use zeroize::Zeroizing;

fn config(fake: &FakeWhatsApp) -> WhatsAppConfig {
    let mut c = WhatsAppConfig::new(
        PHONE_NUMBER_ID,
        Zeroizing::new(ACCESS_TOKEN.into()),
        Zeroizing::new(APP_SECRET.into()),
        Zeroizing::new(VERIFY_TOKEN.into()),
    )
    .unwrap();
    c.api_base = fake.api_base();
    c
}

fn adapter(fake: &FakeWhatsApp) -> WhatsApp {
    WhatsApp::new(config(fake)).unwrap()
}

fn alice() -> FakeUser {
    FakeUser::new("16505551234", "Alice")
}

fn dm(user: &FakeUser) -> ChatRef {
    chat(&user.wa_id, ChatKind::Dm)
}

fn out(chat: &ChatRef, text: &str) -> OutMessage {
    text_to(chat, text, "d-1")
}

fn approval_buttons() -> Vec<Button> {
    approve_deny("a:01J9ZQ3", "d:01J9ZQ3")
}

fn post(
    wa: &WhatsApp,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<WebhookParsed, ChannelError> {
    wa.webhook(&WebhookRequest {
        method: "POST",
        route: "webhook",
        query: "",
        headers,
        body,
    })
}

fn get(wa: &WhatsApp, query: &str) -> Result<WebhookParsed, ChannelError> {
    wa.webhook(&WebhookRequest {
        method: "GET",
        route: "webhook",
        query,
        headers: &[],
        body: b"",
    })
}

fn refused(e: Result<WebhookParsed, ChannelError>) -> String {
    match e {
        Err(ChannelError::WebhookRefused(why)) => why,
        other => panic!("expected WebhookRefused, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_checks_the_token_and_learns_the_business_number() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let bot = wa.connect().await.unwrap();
    assert_eq!(bot.id, PHONE_NUMBER_ID);
    assert_eq!(
        bot.username, "15550783881",
        "{DISPLAY_NUMBER} without punctuation"
    );
    assert_eq!(wa.kind(), "whatsapp");
    assert!(!wa.sends_are_idempotent());
    let calls = fake.calls();
    assert_eq!(calls[0].method, "phone");
    assert!(
        calls[0]
            .path
            .starts_with(&format!("/{PHONE_NUMBER_ID}?fields="))
    );
}

#[tokio::test]
async fn a_wrong_token_is_unauthorized_and_an_expired_one_says_so() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let mut c = config(&fake);
    c.access_token = Zeroizing::new("EAAWrongTokenValue".into());
    let wa = WhatsApp::new(c).unwrap();
    let err = wa.connect().await.unwrap_err();
    assert!(
        matches!(&err, ChannelError::Unauthorized(m) if m.contains("Invalid OAuth access token")),
        "{err:?}"
    );
    assert!(
        fake.calls().is_empty(),
        "the fake records only calls with its token"
    );

    let wa = adapter(&fake);
    fake.fail_next("send", 1, Failure::expired_token());
    let err = wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err();
    assert!(
        matches!(&err, SendError::Permanent(m) if m.contains("access token was refused") && m.contains("chitin secrets set")),
        "{err:?}"
    );
}

#[tokio::test]
async fn the_verification_handshake_answers_the_challenge_only_for_subscribe_and_the_right_token() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let ok = get(
        &wa,
        &handshake_query("subscribe", VERIFY_TOKEN, "1158201444"),
    )
    .unwrap();
    assert!(ok.events.is_empty());
    assert_eq!(
        ok.reply,
        Some(WebhookBody {
            content_type: "text/plain",
            body: b"1158201444".to_vec()
        })
    );

    let wrong_token = refused(get(
        &wa,
        &handshake_query("subscribe", "fake-verify-token-43", "1158201444"),
    ));
    assert_eq!(
        wrong_token,
        "the verification request's hub.verify_token is wrong"
    );
    let wrong_mode = refused(get(
        &wa,
        &handshake_query("unsubscribe", VERIFY_TOKEN, "1158201444"),
    ));
    assert_eq!(
        wrong_mode,
        "the verification request's hub.mode is not `subscribe`"
    );
    assert_eq!(
        refused(get(&wa, "")),
        "the verification request's hub.mode is not `subscribe`"
    );
    assert_eq!(
        refused(get(&wa, "hub.mode=subscribe&hub.challenge=1")),
        "the verification request has no hub.verify_token"
    );
    // A challenge that would reflect markup is not echoed.
    assert_eq!(
        refused(get(
            &wa,
            &handshake_query("subscribe", VERIFY_TOKEN, "<script>x</script>")
        )),
        "the verification request's hub.challenge is not a plain token"
    );
    // A token given twice (one right, one wrong) is refused outright.
    let twice = format!(
        "{}&hub.verify_token=other",
        handshake_query("subscribe", VERIFY_TOKEN, "7")
    );
    assert_eq!(
        refused(get(&wa, &twice)),
        "a verification parameter is repeated"
    );

    // Other routes and methods are not served.
    for (method, route) in [("PUT", "webhook"), ("POST", "events"), ("GET", "")] {
        let req = WebhookRequest {
            method,
            route,
            query: "",
            headers: &[],
            body: b"",
        };
        assert_eq!(wa.webhook(&req).unwrap_err(), ChannelError::NoSuchRoute);
    }
}

#[tokio::test]
async fn a_notification_is_accepted_only_with_the_right_signature_over_the_exact_body() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let note = fake.notification(&[Incoming::text(&alice(), "hello")]);
    let parsed = post(&wa, &note.headers(), &note.body).unwrap();
    assert_eq!(parsed.reply, None);
    assert_eq!(parsed.events.len(), 1);
    assert_eq!(parsed.events[0].event_id, format!("w:{}", note.wamids[0]));

    assert_eq!(
        refused(post(&wa, &[], &note.body)),
        "the X-Hub-Signature-256 header is missing"
    );
    let wrong_secret = note.headers_signed_with("another-app-secret");
    assert_eq!(
        refused(post(&wa, &wrong_secret, &note.body)),
        "the X-Hub-Signature-256 signature is wrong"
    );
    // One byte of the body changed after signing.
    let mut tampered = note.body.clone();
    let i = tampered.iter().position(|&b| b == b'h').unwrap();
    tampered[i] = b'j';
    assert_eq!(
        refused(post(&wa, &note.headers(), &tampered)),
        "the X-Hub-Signature-256 signature is wrong"
    );
    let mut twice = note.headers();
    twice.push(("X-Hub-Signature-256".into(), "sha256=00".into()));
    assert_eq!(
        refused(post(&wa, &twice, &note.body)),
        "more than one X-Hub-Signature-256 header"
    );
    for bad in ["sha1=abcd", "sha256=xyz", "sha256=", "abcdef"] {
        let headers = vec![("x-hub-signature-256".to_owned(), bad.to_owned())];
        assert_eq!(
            refused(post(&wa, &headers, &note.body)),
            "the X-Hub-Signature-256 header is not sha256=<64 hex digits>",
            "{bad}"
        );
    }
    // Signed but not JSON: a bad webhook, not a refused one.
    let junk = b"{not json".to_vec();
    let headers = vec![(
        "X-Hub-Signature-256".to_owned(),
        chitin_channels::whatsapp::signature(APP_SECRET.as_bytes(), &junk),
    )];
    assert!(matches!(
        post(&wa, &headers, &junk).unwrap_err(),
        ChannelError::BadWebhook(m) if m.starts_with("the body is not JSON")
    ));
}

#[tokio::test]
async fn a_replayed_notification_is_accepted_with_the_same_event_ids_so_the_engine_drops_it() {
    // The signature has no timestamp (there is no "stale" to check): replay protection is the
    // engine's deduplication by event id.
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let note = fake.notification(&[Incoming::text(&alice(), "pay 10")]);
    let first = post(&wa, &note.headers(), &note.body).unwrap();
    let again = post(&wa, &note.headers(), &note.body).unwrap();
    assert_eq!(first, again);
}

#[tokio::test]
async fn text_button_replies_reactions_media_and_unsupported_messages_map_as_documented() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let bob = FakeUser::new("447700900123", "Bob");
    let note = fake.notification(&[
        Incoming::text(&alice(), "hi *there* https://x.example").reply_to("wamid.PREVIOUS"),
        Incoming::button_reply(&alice(), "wamid.BOTPROMPT", "a:01J9ZQ3", "Approve"),
        Incoming::image(&bob, "1479537139650973", Some("look")),
        Incoming::document(
            &bob,
            "1479537139650974",
            "report.pdf",
            "application/pdf",
            None,
        ),
        Incoming::audio(&bob, "1479537139650975", true),
        Incoming::reaction(&alice(), "wamid.BOTPROMPT", "👍"),
        Incoming::reaction(&alice(), "wamid.BOTPROMPT", ""),
        Incoming::quick_reply(&alice(), "wamid.TEMPLATE", "stop-alerts", "Stop"),
        Incoming::of_type(
            &bob,
            "location",
            json!({ "latitude": 1.0, "longitude": 2.0 }),
        ),
        Incoming::of_type(
            &bob,
            "interactive",
            json!({ "type": "list_reply", "list_reply": { "id": "x", "title": "X" } }),
        ),
    ]);
    let events = post(&wa, &note.headers(), &note.body).unwrap().events;
    assert_eq!(events.len(), 10);
    for (ev, wamid) in events.iter().zip(&note.wamids) {
        assert_eq!(ev.event_id, format!("w:{wamid}"));
    }

    let text = message(&events[0]);
    assert_eq!(
        text.chat,
        ChatRef {
            id: "16505551234".into(),
            kind: ChatKind::Dm,
            thread: None
        }
    );
    assert_eq!(text.message_id, note.wamids[0]);
    assert_eq!(text.sender.id, "16505551234");
    assert_eq!(text.sender.display, "Alice");
    assert!(!text.sender.is_bot);
    assert_eq!(text.text, "hi *there* https://x.example");
    assert!(text.mentioned, "every DM addresses the bot");
    assert_eq!(text.reply_to.as_deref(), Some("wamid.PREVIOUS"));

    let approve = press(&events[1]);
    assert_eq!(approve.data, "a:01J9ZQ3");
    assert_eq!(approve.message_id, "wamid.BOTPROMPT");
    assert_eq!(approve.callback_id, note.wamids[1]);
    assert_eq!(approve.sender.id, "16505551234");
    assert_eq!(approve.chat.kind, ChatKind::Dm);

    let image = message(&events[2]);
    assert_eq!(image.text, "look");
    assert_eq!(image.sender.display, "Bob");
    assert_eq!(
        image.attachments,
        [Attachment {
            file_ref: "1479537139650973".into(),
            name: None,
            mime: Some("image/jpeg".into()),
            size: None
        }]
    );
    let doc = message(&events[3]);
    assert_eq!(doc.text, "");
    assert_eq!(doc.attachments[0].name.as_deref(), Some("report.pdf"));
    assert_eq!(doc.attachments[0].mime.as_deref(), Some("application/pdf"));
    let voice = message(&events[4]);
    assert_eq!(voice.attachments[0].file_ref, "1479537139650975");

    let thumbs = press(&events[5]);
    assert_eq!(thumbs.data, "react:👍");
    assert_eq!(thumbs.message_id, "wamid.BOTPROMPT");
    assert_eq!(
        events[6].event,
        Event::Ignored {
            what: "a reaction removed".into()
        }
    );
    let quick = press(&events[7]);
    assert_eq!(quick.data, "stop-alerts");
    assert_eq!(quick.message_id, "wamid.TEMPLATE");
    assert_eq!(
        events[8].event,
        Event::Ignored {
            what: "a message of type location".into()
        }
    );
    assert_eq!(
        events[9].event,
        Event::Ignored {
            what: "an interactive list_reply reply".into()
        }
    );
}

#[tokio::test]
async fn notifications_for_another_number_or_field_produce_no_events() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let other = fake.notification_for("999999999999999", &[Incoming::text(&alice(), "hi")]);
    assert!(
        post(&wa, &other.headers(), &other.body)
            .unwrap()
            .events
            .is_empty()
    );

    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [ { "id": "1", "changes": [ { "field": "account_update", "value": { "event": "VERIFIED_ACCOUNT" } } ] } ],
    })
    .to_string()
    .into_bytes();
    let headers = vec![(
        "X-Hub-Signature-256".to_owned(),
        chitin_channels::whatsapp::signature(APP_SECRET.as_bytes(), &body),
    )];
    assert!(post(&wa, &headers, &body).unwrap().events.is_empty());
}

#[tokio::test]
async fn statuses_are_delivery_reports_and_parse_statuses_gives_them_with_their_errors() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let note = fake.statuses_notification(vec![
        status_json("wamid.A", "16505551234", "sent", None),
        status_json("wamid.A", "16505551234", "delivered", None),
        status_json("wamid.A", "16505551234", "read", None),
        status_json("wamid.B", "16505551234", "failed", Some(131_047)),
    ]);
    let events = post(&wa, &note.headers(), &note.body).unwrap().events;
    let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "ws:wamid.A:sent",
            "ws:wamid.A:delivered",
            "ws:wamid.A:read",
            "ws:wamid.B:failed"
        ]
    );
    assert_eq!(
        events[1].event,
        Event::Status(chitin_channels::DeliveryReport {
            message_id: "wamid.A".into(),
            state: chitin_channels::DeliveryState::Delivered,
        })
    );
    match &events[3].event {
        Event::Status(chitin_channels::DeliveryReport {
            message_id,
            state: chitin_channels::DeliveryState::Failed(why),
        }) => {
            assert_eq!(message_id, "wamid.B");
            assert!(why.contains("131047") && why.contains("24 hours"), "{why}");
        }
        other => panic!("{other:?}"),
    }

    let statuses = wa.parse_statuses(&note.body).unwrap();
    assert_eq!(statuses.len(), 4);
    assert_eq!(
        statuses[1],
        DeliveryStatus {
            wamid: "wamid.A".into(),
            status: "delivered".into(),
            recipient: "16505551234".into(),
            timestamp: statuses[1].timestamp,
            error: None,
        }
    );
    assert!(statuses[1].timestamp.is_some());
    let failed = &statuses[3];
    assert_eq!(failed.status, "failed");
    let error: &StatusError = failed.error.as_ref().unwrap();
    assert_eq!(error.code, 131_047);
    assert_eq!(error.title, "Re-engagement message");
    match error.send_error() {
        SendError::Permanent(m) => {
            assert!(m.contains("24-hour customer service window"), "{m}");
            assert!(m.contains("template message"), "{m}");
        }
        other => panic!("expected Permanent, got {other:?}"),
    }
    // Another number's statuses are not ours.
    let other = chitin_channels::whatsapp::fake::notification_json(
        "999",
        &[],
        vec![],
        vec![status_json("wamid.C", "1", "sent", None)],
    )
    .to_string();
    assert!(wa.parse_statuses(other.as_bytes()).unwrap().is_empty());
}

#[tokio::test]
async fn a_reply_is_sent_as_plain_text_with_its_context_and_no_link_preview() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    let mut msg = out(&dm(&alice()), "*bold* [x](https://evil.example) done");
    msg.reply_to = Some("wamid.QUESTION".into());
    let sent = wa.send(&msg).await.unwrap();
    let s = &fake.sent()[0];
    assert_eq!(sent.message_id, s.wamid);
    assert_eq!(s.to, "16505551234");
    assert_eq!(s.kind, "text");
    assert_eq!(s.text, "*bold* [x](https://evil.example) done");
    assert_eq!(s.preview_url, Some(false));
    assert_eq!(s.context.as_deref(), Some("wamid.QUESTION"));
    assert!(s.delivered);
    assert_eq!(s.params["recipient_type"], "individual");

    // A group conversation does not exist on the Cloud API.
    let group = ChatRef {
        id: "120363".into(),
        kind: ChatKind::Group,
        thread: None,
    };
    assert!(matches!(
        wa.send(&out(&group, "hi")).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("only 1:1 chats")
    ));
}

#[tokio::test]
async fn approval_buttons_go_as_one_interactive_message_within_whatsapp_limits() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    let mut msg = out(
        &dm(&alice()),
        "Approval needed: run `ls`.\n\nApprove or deny.",
    );
    msg.buttons = approval_buttons();
    msg.buttons[1].label = "Deny this request, and say why later".into();
    let sent = wa.send(&msg).await.unwrap();
    let all = fake.sent();
    assert_eq!(all.len(), 1);
    let s = &all[0];
    assert_eq!(s.kind, "interactive");
    assert_eq!(sent.message_id, s.wamid);
    assert_eq!(s.text, msg.text);
    assert_eq!(
        s.buttons,
        [
            ("a:01J9ZQ3".to_string(), "Approve".to_string()),
            ("d:01J9ZQ3".to_string(), "Deny this request, a".to_string()),
        ]
    );
}

#[tokio::test]
async fn a_text_too_long_for_an_interactive_body_goes_first_and_the_buttons_carry_its_end() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    let mut text = String::new();
    let mut n = 0;
    while utf16_len(&text) < 3000 {
        n += 1;
        text.push_str(&format!("{n}. argument 😀 value {n}\n"));
    }
    let mut msg = out(&dm(&alice()), &text);
    msg.buttons = approval_buttons();
    msg.reply_to = Some("wamid.ASK".into());
    let sent = wa.send(&msg).await.unwrap();
    let all = fake.sent();
    assert!(all.len() >= 2);
    let (last, head) = all.split_last().unwrap();
    assert_eq!(last.kind, "interactive");
    assert_eq!(
        sent.message_id, last.wamid,
        "presses refer to the message with buttons"
    );
    assert!(utf16_len(&last.text) <= MAX_INTERACTIVE_BODY);
    assert!(
        head.iter()
            .all(|s| s.kind == "text" && s.buttons.is_empty())
    );
    assert_eq!(head[0].context.as_deref(), Some("wamid.ASK"));
    assert!(all[1..].iter().all(|s| s.context.is_none()));
    let rebuilt: String = all.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(rebuilt, text);
}

#[tokio::test]
async fn a_failed_piece_is_retried_without_sending_the_delivered_pieces_again() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    let mut msg = out(&dm(&alice()), &"word ".repeat(600));
    msg.buttons = approval_buttons();
    // The text piece goes; the interactive piece hits the throughput limit.
    fake.pass_next("send", 1);
    fake.fail_next("send", 1, Failure::throughput());
    let err = wa.send(&msg).await.unwrap_err();
    assert!(matches!(err, SendError::RateLimited { .. }), "{err:?}");
    assert_eq!(fake.sent().len(), 1);
    assert_eq!(fake.sent()[0].kind, "text");

    // The engine retries the same row: only the interactive piece is sent.
    let sent = wa.send(&msg).await.unwrap();
    let all = fake.sent();
    let kinds: Vec<&str> = all.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["text", "interactive"]);
    assert_eq!(sent.message_id, all[1].wamid);

    // Another row with the same text starts from the beginning.
    msg.delivery_id = "d-2".into();
    wa.send(&msg).await.unwrap();
    assert_eq!(fake.sent().len(), 4);
    // A finished row is forgotten: sending it again sends it all again.
    wa.send(&msg).await.unwrap();
    assert_eq!(fake.sent().len(), 6);
}

#[tokio::test]
async fn more_than_three_buttons_or_bad_button_data_are_refused_before_any_request() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let mut msg = out(&dm(&alice()), "choose");
    msg.buttons = (0..4)
        .map(|i| Button {
            label: format!("B{i}"),
            data: format!("b:{i}"),
        })
        .collect();
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("at most 3")
    ));
    msg.buttons = vec![Button {
        label: "Long".into(),
        data: "x".repeat(257),
    }];
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("1-256")
    ));
    msg.buttons = vec![
        Button {
            label: "One".into(),
            data: "same".into(),
        },
        Button {
            label: "Two".into(),
            data: "same".into(),
        },
    ];
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("unique")
    ));
    msg.buttons = vec![];
    msg.text = " \n ".into();
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("empty")
    ));
    msg.text = "x".repeat(4097);
    assert!(matches!(
        wa.send(&msg).await.unwrap_err(),
        SendError::Permanent(m) if m.contains("over WhatsApp's 4096")
    ));
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn outside_the_24_hour_window_a_send_is_permanent_and_names_the_window() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    // The usual way: accepted, then a failed status arrives on the webhook.
    let sent = wa
        .send(&out(&dm(&alice()), "a notification"))
        .await
        .unwrap();
    assert!(!fake.sent()[0].delivered);
    let note = fake.status_notification().unwrap();
    assert_eq!(
        post(&wa, &note.headers(), &note.body).unwrap().events[0].event_id,
        format!("ws:{}:failed", sent.message_id)
    );
    let statuses = wa.parse_statuses(&note.body).unwrap();
    assert_eq!(statuses[0].wamid, sent.message_id);
    let from_status = statuses[0].error.as_ref().unwrap().send_error();

    // The synchronous way.
    fake.fail_next("send", 1, Failure::reengagement());
    let from_send = wa.send(&out(&dm(&alice()), "again")).await.unwrap_err();
    for e in [from_status, from_send] {
        match e {
            SendError::Permanent(m) => {
                assert!(m.contains("131047"), "{m}");
                assert!(m.contains("24-hour customer service window"), "{m}");
                assert!(m.contains("template message must be configured"), "{m}");
            }
            other => panic!("expected Permanent, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn rate_limits_are_rate_limited_with_a_wait_fitting_the_limit() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    for (failure, secs) in [
        (Failure::too_many_calls(), 60),
        (Failure::throughput(), 5),
        (Failure::pair_rate_limit(), 6),
        (
            Failure::Graph {
                http: 400,
                code: 80_007,
                message: "(#80007) Rate limit issues".into(),
                details: String::new(),
                is_transient: false,
            },
            60,
        ),
    ] {
        fake.fail_next("send", 1, failure.clone());
        assert_eq!(
            wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err(),
            SendError::RateLimited {
                retry_after: Duration::from_secs(secs)
            },
            "{failure:?}"
        );
    }
    assert!(fake.sent().is_empty());
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_transient_and_say_whether_delivered() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    fake.fail_next("send", 1, Failure::server_error());
    assert!(matches!(
        wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err(),
        SendError::Transient { maybe_delivered: true, message } if message.contains("unknown error")
    ));
    fake.fail_next("send", 1, Failure::BadGateway);
    assert!(matches!(
        wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: true,
            ..
        }
    ));
    fake.fail_next("send", 1, Failure::DropAfterHandling);
    assert!(matches!(
        wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: true,
            ..
        }
    ));
    assert_eq!(
        fake.sent().len(),
        1,
        "accepted although the answer was lost"
    );

    // Nobody listening: certainly not delivered.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut c = config(&fake);
    c.api_base = format!("http://{addr}/v26.0").parse().unwrap();
    let gone = WhatsApp::new(c).unwrap();
    assert!(matches!(
        gone.send(&out(&dm(&alice()), "hi")).await.unwrap_err(),
        SendError::Transient {
            maybe_delivered: false,
            ..
        }
    ));
}

#[tokio::test]
async fn edit_is_permanent_so_the_engine_sends_anew_and_typing_and_answers_are_no_ops() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    let err = wa
        .edit(&dm(&alice()), "wamid.X", "new text", None)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        SendError::Permanent(
            "WhatsApp cannot edit messages: send the new text as a new message".into()
        )
    );
    wa.typing(&dm(&alice())).await.unwrap();
    wa.answer_button("wamid.PRESS", "Approved").await.unwrap();
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn poll_has_nothing_to_fetch_and_does_not_return_at_once() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    // It waits minutes; a short bound shows it does not spin.
    let waited = tokio::time::timeout(Duration::from_millis(200), wa.poll(None)).await;
    assert!(waited.is_err(), "{waited:?}");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn an_attachment_is_fetched_through_its_media_url_and_refused_over_the_limit_or_off_meta() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.put_media(
        "1479537139650973",
        "image/jpeg",
        b"\xff\xd8\xff tiny jpeg".to_vec(),
    );
    let a = Attachment {
        file_ref: "1479537139650973".into(),
        name: None,
        mime: Some("image/jpeg".into()),
        size: None,
    };
    assert_eq!(
        wa.fetch_attachment(&a, 1024).await.unwrap(),
        b"\xff\xd8\xff tiny jpeg"
    );
    assert_eq!(fake.downloads(), ["1479537139650973"]);
    let media_call = &fake.calls()[0];
    assert_eq!(
        media_call.path,
        format!("/1479537139650973?phone_number_id={PHONE_NUMBER_ID}")
    );

    // Larger than the limit by the media's file_size: not downloaded.
    fake.put_media("2", "application/pdf", vec![7u8; 4000]);
    let big = Attachment {
        file_ref: "2".into(),
        ..a.clone()
    };
    assert_eq!(
        wa.fetch_attachment(&big, 1024).await.unwrap_err(),
        ChannelError::TooLarge { max_bytes: 1024 }
    );
    assert_eq!(fake.downloads().len(), 1);

    // A download URL off Meta's hosts is not fetched (the token would go there).
    fake.put_media("3", "image/png", b"png".to_vec());
    fake.set_media_url("3", "https://attacker.example/steal?mid=3");
    let off = Attachment {
        file_ref: "3".into(),
        ..a.clone()
    };
    assert!(matches!(
        wa.fetch_attachment(&off, 1024).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("not one of Meta's")
    ));
    fake.set_media_url(
        "3",
        "http://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=3",
    );
    assert!(matches!(
        wa.fetch_attachment(&off, 1024).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("not one of Meta's")
    ));
    assert_eq!(fake.downloads().len(), 1);

    // A reference that is not a media id never reaches the API.
    let calls = fake.calls().len();
    let evil = Attachment {
        file_ref: "../me/accounts".into(),
        ..a.clone()
    };
    assert!(matches!(
        wa.fetch_attachment(&evil, 1024).await.unwrap_err(),
        ChannelError::Protocol(_)
    ));
    assert_eq!(fake.calls().len(), calls);

    // An unknown media id is the platform's refusal.
    let unknown = Attachment {
        file_ref: "404".into(),
        ..a
    };
    assert!(matches!(
        wa.fetch_attachment(&unknown, 1024).await.unwrap_err(),
        ChannelError::Protocol(m) if m.contains("does not exist")
    ));
}

#[tokio::test]
async fn credentials_never_appear_in_any_error_text_or_debug_output() {
    let fake = FakeWhatsApp::start().await.unwrap();
    let wa = adapter(&fake);
    fake.open_window(&alice().wa_id);
    let mut shown = Shown::default();
    shown.debug(&wa);
    shown.debug(&config(&fake));
    for f in [
        Failure::server_error(),
        Failure::BadGateway,
        Failure::Drop,
        Failure::expired_token(),
        // A proxy that echoes the request's headers in its error.
        Failure::Graph {
            http: 400,
            code: 100,
            message: format!("bad request with Authorization: Bearer {ACCESS_TOKEN}"),
            details: format!("secret {APP_SECRET} and {VERIFY_TOKEN}"),
            is_transient: false,
        },
    ] {
        fake.fail_next("send", 1, f.clone());
        shown.error(&wa.send(&out(&dm(&alice()), "hi")).await.unwrap_err());
        fake.fail_next("phone", 1, f);
        shown.error(&wa.connect().await.unwrap_err());
    }
    let note = fake.notification(&[Incoming::text(&alice(), "x")]);
    let e = post(&wa, &note.headers_signed_with("wrong"), &note.body).unwrap_err();
    shown.debug(&e);
    shown.debug(&get(&wa, &handshake_query("subscribe", "nope", "1")).unwrap_err());
    shown.assert_hides(&[ACCESS_TOKEN, APP_SECRET, VERIFY_TOKEN]);
    shown.assert_some_contains("Bearer <redacted>");
}
