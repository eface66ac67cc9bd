//! The Control API's channels and pairing through the real `chitin gateway` binary, with the
//! fake Telegram Bot API of `chitin-channels` and a fake model: a stranger's pairing request
//! is listed with the channel's connection state, approved over `/api/v1/pairing/{code}/resolve`
//! (the paired user's next message then reaches the model, and its cost is attributed to the
//! `channel` task), and another one denied.
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

use chat::{set_secret, until};
use chitin::providers::testing::{FakeOpenAi, Reply, Step};
use chitin_channels::telegram::fake::{FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN};
use harness::Gw;
use serde_json::{Value, json};

fn api(gw: &Gw, method: &str, path: &str, body: Option<&Value>) -> harness::Resp {
    let text = body.map(Value::to_string).unwrap_or_default();
    gw.try_req(
        method,
        path,
        &[
            ("Authorization", &gw.bearer()),
            ("Content-Type", "application/json"),
        ],
        text.as_bytes(),
    )
    .unwrap()
}

#[test]
fn pairing_requests_are_listed_with_the_channels_state_and_approved_or_denied_over_the_api() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::Reply(
            Reply::text(["Hello Alice."]).usage(400, 40),
        )]))
        .unwrap();
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [pricing]\n\"fake/m1\" = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }}\n\n\
         [[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:tg_token\"\napi_base = \"http://{}\"\nmode = \"polling\"\n",
        model.base_url(),
        tg.addr()
    );
    let mut gw = Gw::start(&cfg);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    gw.spawn();

    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let listed = until("the pairing request in the API", &gw, || {
        let v = api(&gw, "GET", "/api/v1/pairing", None).json();
        (v["requests"].as_array().is_some_and(|r| r.len() == 1)
            && v["channels"][0]["connected"] == true)
            .then_some(v)
    });
    let req = &listed["requests"][0];
    assert_eq!(req["identity"], "telegram:4242");
    assert_eq!(req["channel"], "tg");
    assert_eq!(req["status"], "pending");
    let ch = &listed["channels"][0];
    assert_eq!(ch["channel"], "tg");
    assert_eq!(ch["kind"], "telegram");
    assert_eq!(ch["pending_pairings"], 1);
    assert!(!listed.to_string().contains(TOKEN));
    let code = req["code"].as_str().unwrap().to_string();

    // A body the API does not know is refused before anything happens.
    let bad = api(
        &gw,
        "POST",
        &format!("/api/v1/pairing/{code}/resolve"),
        Some(&json!({"decision": "deny", "user": "owner"})),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let ok = api(
        &gw,
        "POST",
        &format!("/api/v1/pairing/{code}/resolve"),
        Some(&json!({"decision": "approve"})),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    let r = ok.json();
    assert_eq!(r["request"]["status"], "approved", "{r}");
    assert_eq!(r["request"]["user"], "owner");
    assert_eq!(r["request"]["resolved_by"], "owner");
    let again = api(
        &gw,
        "POST",
        &format!("/api/v1/pairing/{code}/resolve"),
        Some(&json!({"decision": "deny"})),
    );
    assert_eq!(again.status, 409, "{}", again.body);

    // The paired user's message reaches the model; its cost is the `channel` task's.
    let asked = tg.push_message(MessageBuilder::text(&dm, &alice, "hi again"));
    until("the model's answer in the chat", &gw, || {
        tg.sent()
            .into_iter()
            .find(|m| m.reply_to == Some(asked.message_id))
    });
    let usage = until("the channel's usage", &gw, || {
        let v = api(&gw, "GET", "/api/v1/usage?by=task", None).json();
        (v["groups"][0]["key"] == "channel").then_some(v)
    });
    assert_eq!(usage["groups"][0]["calls"], 1);
    assert_eq!(usage["groups"][0]["input_tokens"], 400);

    // Another stranger, paired with another user (`bob`, also in `owners`, so his messages
    // are admitted): the owner's session list leaves bob's session out, and reading it is
    // refused (by default a user reads only their own sessions).
    let bob = FakeUser::new(777, "Bob");
    let dm_bob = FakeChat::private(&bob);
    tg.push_message(MessageBuilder::text(&dm_bob, &bob, "hello"));
    let code_bob = until("bob's request", &gw, || {
        let v = api(&gw, "GET", "/api/v1/pairing", None).json();
        v["requests"][0]["code"].as_str().map(str::to_string)
    });
    // Pairing with a user the entities do not have is refused in words...
    let unknown_user = api(
        &gw,
        "POST",
        &format!("/api/v1/pairing/{code_bob}/resolve"),
        Some(&json!({"decision": "approve", "user": "bob"})),
    );
    assert_eq!(unknown_user.status, 400, "{}", unknown_user.body);
    assert!(
        unknown_user.body.contains("add it to entities.json"),
        "{}",
        unknown_user.body
    );
    // ...and works once the user is added (the gateway reloads the entities on change).
    let ents_path = gw.home.join("entities.json");
    let mut ents: Value =
        serde_json::from_str(&std::fs::read_to_string(&ents_path).unwrap()).unwrap();
    ents.as_array_mut().unwrap().push(json!(
        {"uid": {"type": "Chitin::User", "id": "bob"}, "attrs": {},
         "parents": [{"type": "Chitin::Group", "id": "owners"}]}
    ));
    std::fs::write(&ents_path, ents.to_string()).unwrap();
    let paired = until("the pairing with bob", &gw, || {
        let r = api(
            &gw,
            "POST",
            &format!("/api/v1/pairing/{code_bob}/resolve"),
            Some(&json!({"decision": "approve", "user": "bob"})),
        );
        (r.status != 400).then_some(r)
    });
    assert_eq!(paired.status, 200, "{}", paired.body);
    assert_eq!(paired.json()["request"]["user"], "bob");
    tg.push_message(MessageBuilder::text(&dm_bob, &bob, "what do you know?"));
    let list = until("bob's session to exist", &gw, || {
        let v = api(&gw, "GET", "/api/v1/sessions", None).json();
        (v["hidden_owners"] == 1).then_some(v)
    });
    let keys: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["channel:tg:dm:4242"], "{list}");
    let refused = api(&gw, "GET", "/api/v1/sessions/channel:tg:dm:777", None);
    assert_eq!(refused.status, 403, "{}", refused.body);
    let e = refused.json()["error"].clone();
    assert_eq!(e["action"], "session.read");
    assert_eq!(e["policies"], json!([]), "a default deny names no policy");
    let own = api(&gw, "GET", "/api/v1/sessions/channel:tg:dm:4242", None);
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.json()["runs"][0]["task"], "channel");

    // A third stranger, denied from the API.
    let carol = FakeUser::new(778, "Carol");
    let dm2 = FakeChat::private(&carol);
    tg.push_message(MessageBuilder::text(&dm2, &carol, "let me in"));
    let code2 = until("the third request", &gw, || {
        let v = api(&gw, "GET", "/api/v1/pairing", None).json();
        v["requests"][0]["code"].as_str().map(str::to_string)
    });
    let denied = api(
        &gw,
        "POST",
        &format!("/api/v1/pairing/{code2}/resolve"),
        Some(&json!({"decision": "deny"})),
    );
    assert_eq!(denied.status, 200, "{}", denied.body);
    assert_eq!(denied.json()["request"]["status"], "denied");
    assert_eq!(
        api(&gw, "GET", "/api/v1/pairing", None).json()["requests"],
        json!([])
    );
    let unknown = api(
        &gw,
        "POST",
        "/api/v1/pairing/NOSUCH/resolve",
        Some(&json!({"decision": "deny"})),
    );
    assert_eq!(unknown.status, 404, "{}", unknown.body);
}
