//! Telegram through the real `chitin gateway` binary, against the fake Bot API server of
//! `chitin-channels` and a fake model: pairing end to end, the model's answer as a
//! `sendMessage`, and a redelivered update processed once.
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

use std::sync::Arc;

use chat::{set_secret, until};
use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use chitin_channels::telegram::fake::{
    Failure, FakeChat, FakeTelegram, FakeUser, MessageBuilder, SentMessage, TOKEN,
};
use harness::Gw;
use serde_json::Value;

fn config(model: &FakeServer, tg: &FakeTelegram) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
         [[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:tg_token\"\napi_base = \"http://{}\"\nmode = \"polling\"\n",
        model.base_url(),
        tg.addr()
    )
}

fn status(gw: &Gw) -> Value {
    let out = gw.chitin(&["channels", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0].clone()
}

fn sent_to(tg: &FakeTelegram, chat: i64) -> Vec<SentMessage> {
    tg.sent()
        .into_iter()
        .filter(|m| m.chat_id == chat)
        .collect()
}

#[test]
fn a_stranger_gets_one_pairing_code_and_after_approval_the_models_answer_once_per_update() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![
            Step::Reply(Reply::text(["The answer is 42."])),
            Step::Reply(Reply::text(["Pong from the model."])),
        ]))
        .unwrap();
    // The gateway starts without the token in the store: the channel is left out (logged),
    // the gateway runs. Then the token is stored for the fake's host and the gateway restarted.
    let mut gw = Gw::start(&config(&model, &tg));
    assert_eq!(gw.get("/health").status, 200);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    gw.spawn();

    let out = gw.chitin(&["channels", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "tg");
    assert_eq!(list[0]["kind"], "telegram");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(TOKEN));

    // An unpaired DM: one pairing code, nothing to the model.
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    let code_msg = until("the pairing code reply", &gw, || {
        sent_to(&tg, dm.id).into_iter().next()
    });
    let out = gw.chitin(&["pairing", "list", "--json"]);
    assert!(out.status.success());
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
    let code = pending[0]["code"].as_str().unwrap().to_string();
    assert_eq!(pending[0]["identity"], "telegram:4242");
    assert!(code_msg.text.contains(&code), "{}", code_msg.text);
    assert_eq!(code_msg.parse_mode, None);

    // A second DM before approval: stored, not admitted, no second code.
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello again"));
    until("the second DM to be stored", &gw, || {
        (status(&gw)["events"].as_i64() == Some(2)).then_some(())
    });
    let s = status(&gw);
    assert_eq!(s["denied"], 2, "{s}");
    assert_eq!(s["queued"], 0, "{s}");
    assert_eq!(sent_to(&tg, dm.id).len(), 1);
    assert!(model.requests().is_empty(), "the model saw an unpaired DM");

    // The owner (the CLI operator) approves; the gateway sees it at its next batch.
    let out = gw.chitin(&["pairing", "approve", &code]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("telegram:4242"));

    // The next DM reaches the model; the same update delivered twice is one turn.
    let asked = tg.push_message_twice(MessageBuilder::text(&dm, &alice, "what is the answer?"));
    let answer = until("the model's answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(asked.message_id))
    });
    assert_eq!(answer.text, "The answer is 42.");
    assert_eq!(answer.parse_mode, None);

    // A later message gets the model's *second* reply: had the duplicate been a second turn,
    // it would have taken that reply.
    let ping = tg.push_message(MessageBuilder::text(&dm, &alice, "ping"));
    let pong = until("the reply to the next message", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(ping.message_id))
    });
    assert_eq!(pong.text, "Pong from the model.");
    assert_eq!(model.requests().len(), 2);
    let replies_to_asked = sent_to(&tg, dm.id)
        .iter()
        .filter(|m| m.reply_to == Some(asked.message_id))
        .count();
    assert_eq!(replies_to_asked, 1);

    // SIGTERM stops the gateway cleanly; the token never reached its log.
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(!log.contains(TOKEN), "the bot token is in the gateway log");
    assert!(log.contains("channel connected"), "{log}");
    // The redelivered copy was recognized and dropped at the commit.
    assert!(log.contains("\"duplicates\":1"), "{log}");
}

/// A gateway with the `tg` channel and `alice` (4242) paired with the owner through the CLI.
fn paired(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeTelegram, FakeServer, Gw) {
    paired_with(steps, "")
}

/// [`paired`] with more keys in the `[[channels]]` table.
fn paired_with(
    steps: Vec<Step>,
    channel_keys: &str,
) -> (tokio::runtime::Runtime, FakeTelegram, FakeServer, Gw) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    let mut gw = Gw::start(&format!("{}{channel_keys}", config(&model, &tg)));
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    gw.spawn();
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
    until("the pairing code reply", &gw, || {
        sent_to(&tg, dm.id).into_iter().next()
    });
    let out = gw.chitin(&["pairing", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = pending[0]["code"].as_str().unwrap().to_string();
    let out = gw.chitin(&["pairing", "approve", &code]);
    assert!(out.status.success());
    // The approval's notice, queued by the CLI, is delivered by the running gateway.
    until("the pairing notice", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.text.starts_with("Paired:"))
    });
    (rt, tg, model, gw)
}

#[test]
fn a_turn_cut_by_sigkill_is_resumed_after_restart_and_answered_once() {
    let (_rt, tg, model, mut gw) = paired(vec![
        Step::Hang,
        Step::Reply(Reply::text(["Answer after the restart."])),
        Step::Reply(Reply::text(["Pong."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "a question"));
    // The update is committed and acknowledged, the model is working on it: kill the gateway.
    until("the model to be asked", &gw, || {
        (!model.requests().is_empty()).then_some(())
    });
    gw.signal("-KILL");
    let _ = gw.wait_exit();
    // The restarted channel cannot connect for 3 s (a 429 on getMe), so the resumed run
    // (the model answers at once) finishes before the channel's tasks start: its reply must
    // still be sent (the runs to answer are noted before the agent resumes them).
    tg.fail_next("getMe", 1, Failure::RateLimited { retry_after: 3 });
    gw.spawn();
    until("the resumed run to reach the model", &gw, || {
        (model.requests().len() >= 2).then_some(())
    });
    let answer = until("the resumed run's answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.text == "Answer after the restart.")
    });
    assert_eq!(answer.parse_mode, None);
    // The message is not run a second time: the next one gets the next scripted reply.
    let ping = tg.push_message(MessageBuilder::text(&dm, &alice, "ping"));
    let pong = until("the reply to the next message", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(ping.message_id))
    });
    assert_eq!(pong.text, "Pong.");
    let answers = sent_to(&tg, dm.id)
        .iter()
        .filter(|m| m.text == "Answer after the restart.")
        .count();
    assert_eq!(answers, 1);
    assert_eq!(model.requests().len(), 3);
}

#[test]
fn a_long_answer_is_split_a_429_is_waited_out_and_a_refused_send_is_not_retried() {
    let long: String = (0..100)
        .map(|i| format!("Paragraph {i}: {}", "x".repeat(85)))
        .collect::<Vec<_>>()
        .join("\n\n");
    assert!(long.len() > 9_000);
    let (_rt, tg, _model, gw) = paired(vec![
        Step::Reply(Reply::text([long.as_str()])),
        Step::Reply(Reply::text(["Pong."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    // The first send of the answer is rate limited for 1 s: it is sent after the wait.
    tg.fail_next("sendMessage", 1, Failure::RateLimited { retry_after: 1 });
    let asked = tg.push_message(MessageBuilder::text(&dm, &alice, "a long one please"));
    let parts = until("every part of the long answer", &gw, || {
        let parts: Vec<SentMessage> = sent_to(&tg, dm.id)
            .into_iter()
            .skip_while(|m| m.reply_to != Some(asked.message_id))
            .collect();
        parts
            .last()
            .is_some_and(|m| m.text.ends_with(&"x".repeat(85)) && m.text.contains("Paragraph 99"))
            .then_some(parts)
    });
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert!(parts.iter().all(|m| m.text.encode_utf16().count() <= 4096));
    // Split on paragraph boundaries: nothing lost, nothing added but whitespace.
    let joined: Vec<&str> = parts
        .iter()
        .flat_map(|m| m.text.split_whitespace())
        .collect();
    assert_eq!(joined, long.split_whitespace().collect::<Vec<_>>());
    // The 429 was one more sendMessage call than the messages delivered.
    assert_eq!(tg.calls_of("sendMessage").len(), tg.sent().len() + 1);
    let s = status(&gw);
    assert_eq!(s["queued"], 0, "{s}");

    // A permanent refusal (400) is recorded as failed, never sent again.
    tg.fail_next(
        "sendMessage",
        1,
        Failure::BadRequest("Bad Request: chat not found".into()),
    );
    tg.push_message(MessageBuilder::text(&dm, &alice, "ping"));
    until("the refused reply to be recorded", &gw, || {
        (status(&gw)["failed"].as_i64() == Some(1)).then_some(())
    });
    assert!(sent_to(&tg, dm.id).iter().all(|m| m.text != "Pong."));
    assert_eq!(status(&gw)["queued"], 0);
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains(
            "chitin_channel_outbox{channel=\"tg\",kind=\"telegram\",status=\"failed\"} 1"
        ),
        "{metrics}"
    );
}

#[test]
fn in_a_group_the_bot_answers_only_when_mentioned() {
    let (_rt, tg, model, gw) = paired(vec![Step::Reply(Reply::text(["Hello group."]))]);
    let alice = FakeUser::new(4242, "Alice");
    let group = FakeChat::group(-5001, "Friends");
    let before = status(&gw)["events"].as_i64().unwrap();
    tg.push_message(MessageBuilder::text(&group, &alice, "just chatting"));
    until("the unmentioned group message to be decided", &gw, || {
        (status(&gw)["events"].as_i64() == Some(before + 1)).then_some(())
    });
    assert!(sent_to(&tg, group.id).is_empty());
    assert!(model.requests().is_empty());
    let asked = tg.push_message(MessageBuilder::text(
        &group,
        &alice,
        "@chitin_test_bot say hello",
    ));
    let answer = until("the answer in the group", &gw, || {
        sent_to(&tg, group.id)
            .into_iter()
            .find(|m| m.reply_to == Some(asked.message_id))
    });
    assert_eq!(answer.text, "Hello group.");
    assert_eq!(model.requests().len(), 1);
    assert_eq!(sent_to(&tg, group.id).len(), 1);
}

#[test]
fn an_operator_cedar_does_not_permit_cannot_approve_a_pairing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::Reply(Reply::text(["never"]))]))
        .unwrap();
    let mut gw = Gw::start(&config(&model, &tg));
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    gw.spawn();
    let mallory = FakeUser::new(666, "Mallory");
    let dm = FakeChat::private(&mallory);
    tg.push_message(MessageBuilder::text(&dm, &mallory, "let me in"));
    until("the pairing code reply", &gw, || {
        sent_to(&tg, dm.id).into_iter().next()
    });
    let out = gw.chitin(&["pairing", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = pending[0]["code"].as_str().unwrap().to_string();
    // The CLI acts as `[cli] operator`; a user no policy lets decide pairings is refused.
    let cfg = gw.home.join("chitin.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("\n[cli]\noperator = \"mallory\"\n");
    std::fs::write(&cfg, text).unwrap();
    let out = gw.chitin(&["pairing", "approve", &code]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("refused: mallory may not decide pairings (policy decision: deny"),
        "{stdout}"
    );
    // Still unpaired: the request is still open and the next DM does not reach the model.
    let out = gw.chitin(&["pairing", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pending[0]["code"], code.as_str());
    tg.push_message(MessageBuilder::text(&dm, &mallory, "am I in?"));
    until("the second DM to be decided", &gw, || {
        (status(&gw)["events"].as_i64() == Some(2)).then_some(())
    });
    assert_eq!(status(&gw)["denied"], 2);
    assert!(model.requests().is_empty());
    assert_eq!(sent_to(&tg, dm.id).len(), 1);
}

#[test]
fn a_bot_token_is_not_released_for_an_api_host_outside_its_audience() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::Reply(Reply::text(["never"]))]))
        .unwrap();
    let mut gw = Gw::start(&config(&model, &tg));
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    // The token is meant for the public API only; the config points the channel elsewhere.
    set_secret(&gw, "tg_token", "api.telegram.org", TOKEN);
    gw.spawn();
    // The channel is set up before the gateway listens: the refusal is already logged.
    let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap();
    assert!(
        log.contains(
            "policy denied: secret.use by Chitin::Channel::\\\"tg\\\" on secret tg_token for host 127.0.0.1"
        ),
        "{log}"
    );
    assert!(!log.contains(TOKEN));
    assert!(tg.calls().is_empty(), "the fake Bot API was called");
    assert_eq!(gw.get("/health").status, 200);
    let ready = gw.get("/ready").json();
    assert_eq!(
        ready["checks"]["channels"],
        serde_json::json!({"ok": false, "detail": "tg: not started (see the gateway log)"}),
        "{ready}"
    );
}

const HOOK_SECRET: &str = "hook-secret_0123456789abcdefABCDEF";

fn post_webhook(gw: &Gw, secret: Option<&str>, update: &Value) -> harness::Resp {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(s) = secret {
        headers.push(("X-Telegram-Bot-Api-Secret-Token", s));
    }
    gw.try_req(
        "POST",
        "/channels/tg/webhook",
        &headers,
        update.to_string().as_bytes(),
    )
    .unwrap()
}

#[test]
fn webhook_mode_refuses_a_wrong_secret_and_commits_a_right_one_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tg = rt.block_on(FakeTelegram::start()).unwrap();
    let model = rt
        .block_on(FakeOpenAi::start(vec![Step::Reply(Reply::text(["never"]))]))
        .unwrap();
    // Where the platform is told to post (the test posts itself).
    let url = format!(
        "http://127.0.0.1:{}/channels/tg/webhook",
        harness::free_port()
    );
    let cfg = config(&model, &tg).replace(
        "mode = \"polling\"",
        &format!(
            "mode = \"webhook\"\nwebhook_secret = \"secret:tg_hook\"\nwebhook_url = \"{url}\""
        ),
    );
    let mut gw = Gw::start(&cfg);
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    set_secret(&gw, "tg_token", "127.0.0.1", TOKEN);
    set_secret(&gw, "tg_hook", "127.0.0.1", HOOK_SECRET);
    gw.spawn();
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    let update = tg
        .webhook_update(MessageBuilder::text(&dm, &alice, "hello bot"))
        .update;

    // No secret, a wrong one: 401, nothing stored, nothing sent.
    let r = post_webhook(&gw, None, &update);
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post_webhook(&gw, Some("hook-secret_0123456789abcdefABCDEX"), &update);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
    assert_eq!(status(&gw)["events"], 0);

    // The right secret: committed before the 200 (the pairing code follows); the same update
    // delivered again is recognized.
    let r = post_webhook(&gw, Some(HOOK_SECRET), &update);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status(&gw)["events"], 1);
    let r = post_webhook(&gw, Some(HOOK_SECRET), &update);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(status(&gw)["events"], 1);
    let code = until("the pairing code reply", &gw, || {
        sent_to(&tg, dm.id).into_iter().next()
    });
    assert!(code.text.contains("Pairing code:"), "{}", code.text);
    assert_eq!(status(&gw)["queued"], 0);
    assert_eq!(sent_to(&tg, dm.id).len(), 1);
    assert!(tg.calls_of("getUpdates").is_empty());
    // Registered at start, with the secret.
    let hook = until("the webhook registration", &gw, || tg.webhook());
    assert_eq!(hook.url, url);
    assert_eq!(hook.secret_token.as_deref(), Some(HOOK_SECRET));
    // Both refusals are in the audit log, with the reason and without the body.
    let out = gw.chitin(&["audit", "export"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = String::from_utf8_lossy(&out.stdout);
    let refused: Vec<&str> = export
        .lines()
        .filter(|l| l.contains("channel.webhook.refused"))
        .collect();
    assert_eq!(refused.len(), 2, "{export}");
    assert!(refused[0].contains("header is missing"), "{}", refused[0]);
    assert!(refused[1].contains("header is wrong"), "{}", refused[1]);
    assert!(refused.iter().all(|l| !l.contains("hello bot")));
}

fn net_exec(argv: &[&str]) -> String {
    serde_json::json!({"argv": argv, "network": ["127.0.0.1:9"]}).to_string()
}

/// The approval prompt posted into `chat` (the message with buttons) and its approval id.
fn approval_prompt(tg: &FakeTelegram, gw: &Gw, chat: i64) -> (SentMessage, String) {
    let prompt = until("the approval prompt in the chat", gw, || {
        sent_to(tg, chat)
            .into_iter()
            .find(|m| !m.buttons.is_empty())
    });
    let id = prompt.buttons[0].1.trim_start_matches("a:").to_string();
    assert_eq!(id.len(), 32, "{:?}", prompt.buttons);
    (prompt, id)
}

fn approval_status(gw: &Gw, id: &str) -> String {
    let out = gw.chitin(&["approvals", "list", "--all", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id)
        .map(|a| a["status"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn an_approval_is_posted_in_the_chat_a_strangers_press_is_refused_and_the_owners_press_runs_the_call()
 {
    let (_rt, tg, _model, gw) = paired(vec![
        Step::tool_call("c1", "exec", &net_exec(&["true"])),
        Step::Reply(Reply::text(["It ran."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "run it"));
    let (prompt, id) = approval_prompt(&tg, &gw, dm.id);
    assert_eq!(
        prompt.buttons,
        vec![
            ("Approve".to_string(), format!("a:{id}")),
            ("Deny".to_string(), format!("d:{id}")),
        ]
    );
    // Everything the approval binds, and where the full text is.
    assert!(prompt.text.contains("127.0.0.1:9"), "{}", prompt.text);
    assert!(prompt.text.contains("argv"), "{}", prompt.text);
    assert!(
        prompt.text.contains(&format!("chitin approvals show {id}")),
        "{}",
        prompt.text
    );
    assert_eq!(prompt.parse_mode, None);

    // A stranger (never paired) presses Approve: refused by Cedar, answered, still pending.
    let mallory = FakeUser::new(666, "Mallory");
    let press = tg.push_callback(&mallory, dm.id, prompt.message_id, &format!("a:{id}"));
    let answer = until("the refusal of the stranger's press", &gw, || {
        tg.answers()
            .into_iter()
            .find(|a| a.callback_id == press.callback_id)
    });
    assert_eq!(
        answer.text.as_deref(),
        Some("Refused: you are not allowed to decide this approval.")
    );
    assert_eq!(approval_status(&gw, &id), "pending");
    assert!(tg.edits().is_empty());
    let out = gw.chitin(&["audit", "query", "--kind", "decision", "--json"]);
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "approval.grant"
                && r["decision"] == "deny"
                && r.to_string().contains("telegram:666")),
        "{audit}"
    );

    // Approve data replayed from another chat (even by the owner): not that conversation's.
    let press = tg.push_callback(&alice, 999, 1, &format!("a:{id}"));
    let answer = until("the refusal of a press from another chat", &gw, || {
        tg.answers()
            .into_iter()
            .find(|a| a.callback_id == press.callback_id)
    });
    assert_eq!(
        answer.text.as_deref(),
        Some("This approval does not belong to this conversation.")
    );
    assert_eq!(approval_status(&gw, &id), "pending");

    // The owner presses Approve: the call runs, the message shows who decided, the answer comes.
    let press = tg.push_callback(&alice, dm.id, prompt.message_id, &format!("a:{id}"));
    let answer = until("the answer to the owner's press", &gw, || {
        tg.answers()
            .into_iter()
            .find(|a| a.callback_id == press.callback_id)
    });
    assert_eq!(answer.text.as_deref(), Some("Approved."));
    let edit = until("the approval message edited", &gw, || {
        tg.edits()
            .into_iter()
            .find(|e| e.message_id == prompt.message_id)
    });
    assert!(
        edit.text.starts_with("Approved by owner: "),
        "{}",
        edit.text
    );
    assert!(edit.buttons.unwrap_or_default().is_empty());
    until("the run's answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.text == "It ran.")
    });
    assert_eq!(approval_status(&gw, &id), "used");
}

#[test]
fn deny_with_the_code_in_the_chat_refuses_the_call() {
    let (_rt, tg, model, gw) = paired(vec![
        Step::tool_call("c1", "exec", &net_exec(&["true"])),
        Step::Reply(Reply::text(["Not done."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "run it"));
    let (prompt, id) = approval_prompt(&tg, &gw, dm.id);
    let out = gw.chitin(&["approvals", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = list[0]["code"].as_str().unwrap().to_string();
    assert!(
        prompt.text.contains(&format!("/deny {code}")),
        "{}",
        prompt.text
    );
    let deny = tg.push_message(MessageBuilder::text(&dm, &alice, &format!("/deny {code}")));
    let reply = until("the reply to /deny", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(deny.message_id))
    });
    assert!(
        reply.text.starts_with("Denied by owner: "),
        "{}",
        reply.text
    );
    until("the run's answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.text == "Not done.")
    });
    assert_eq!(approval_status(&gw, &id), "denied");
    // The prompt shows the outcome, whoever decided and however (here: the text command).
    let edit = until("the approval message edited", &gw, || {
        tg.edits()
            .into_iter()
            .find(|e| e.message_id == prompt.message_id)
    });
    assert!(edit.text.starts_with("Denied by owner: "), "{}", edit.text);
    assert!(edit.buttons.unwrap_or_default().is_empty());
    // The model was told the call was refused; `/deny` itself never reached the model.
    assert_eq!(model.requests().len(), 2);
}

#[test]
fn send_message_to_the_same_conversation_is_delivered_through_the_outbox() {
    let (_rt, tg, model, gw) = paired(vec![
        Step::tool_call(
            "c1",
            "send_message",
            &serde_json::json!({"channel": "tg", "target": "telegram:dm:4242", "text": "Hello from the tool."})
                .to_string(),
        ),
        Step::Reply(Reply::text(["Sent it."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "say hello"));
    until("the run's answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.text == "Sent it.")
    });
    let sent: Vec<_> = sent_to(&tg, dm.id)
        .into_iter()
        .filter(|m| m.text == "Hello from the tool.")
        .collect();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].parse_mode, None);
    // Offered to the model, with this conversation named as a target.
    let first = model.requests()[0].body.to_string();
    assert!(first.contains("\"send_message\""), "{first}");
    assert!(first.contains("channel:tg:dm:4242"), "{first}");
    // Decided by Cedar `send_message` as the same conversation.
    let out = gw.chitin(&["audit", "query", "--kind", "decision", "--json"]);
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "send_message"
                && r["decision"] == "allow"
                && r.to_string().contains("same_conversation")),
        "{audit}"
    );
}

#[test]
fn a_slow_answer_is_streamed_into_one_message_that_is_then_edited_to_the_whole_answer() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let first = format!("Streaming starts here. {}", "word ".repeat(60));
    let rest = "And this is the end.";
    let (_rt, tg, _model, gw) = paired_with(
        vec![Step::Gated {
            reply: Reply::text([first.clone(), rest.to_string()]),
            // The role event and the first piece; the rest waits for the gate.
            events: 2,
            gate: Arc::clone(&gate),
        }],
        "stream_edit_ms = 500\n",
    );
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    let asked = tg.push_message(MessageBuilder::text(&dm, &alice, "tell me slowly"));
    // While the model is paused mid-answer, the text so far is shown as a reply.
    let draft = until("the streamed draft", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(asked.message_id))
    });
    assert!(
        draft.text.starts_with("Streaming starts here."),
        "{}",
        draft.text
    );
    assert!(draft.text.ends_with(" …"), "{}", draft.text);
    assert_eq!(draft.parse_mode, None);
    // "typing…" was shown while the model worked.
    assert!(
        tg.chat_actions()
            .iter()
            .any(|a| a.chat_id == dm.id && a.action == "typing"),
        "{:?}",
        tg.chat_actions()
    );
    gate.notify_one();
    let whole = format!("{first}{rest}");
    until("the draft edited to the whole answer", &gw, || {
        tg.edits()
            .into_iter()
            .find(|e| e.message_id == draft.message_id && e.text == whole)
    });
    // One message for the answer: no second copy was sent.
    let ping = tg.push_message(MessageBuilder::text(&dm, &alice, "ping"));
    until("the reply to the next message", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(ping.message_id))
    });
    let answers = sent_to(&tg, dm.id)
        .into_iter()
        .filter(|m| m.reply_to == Some(asked.message_id))
        .count();
    assert_eq!(answers, 1);
    // Nothing edited the message after the whole answer.
    let last = tg
        .edits()
        .into_iter()
        .rfind(|e| e.message_id == draft.message_id)
        .unwrap();
    assert_eq!(last.text, whole);
}

#[test]
fn files_sent_by_a_paired_user_are_saved_in_the_workspace_inbox_and_named_to_the_model() {
    let (_rt, tg, model, gw) = paired_with(
        vec![
            Step::Reply(Reply::text(["Got the file."])),
            Step::Reply(Reply::text(["Too big, sorry."])),
        ],
        "max_attachment_mb = 1\n",
    );
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.put_file(
        "doc-1",
        "documents/file_1.txt",
        b"hello attachment".to_vec(),
    );
    let sent = tg.push_message(MessageBuilder::document(
        &dm,
        &alice,
        "doc-1",
        "../../etc/report.txt",
        "text/plain",
        16,
        Some("please read it"),
    ));
    until("the answer to the file", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(sent.message_id))
    });
    // Saved inside the workspace's inbox under a cleaned name, as data (not executable).
    let inbox = gw.workspace().join("inbox").join("tg");
    let files: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.ends_with("-0-_.._etc_report.txt"), "{name}");
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"hello attachment");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // The model is told where it is, with the caption.
    let asked = model.requests()[0].body.to_string();
    assert!(asked.contains("please read it"), "{asked}");
    assert!(
        asked.contains(&format!("saved to inbox/tg/{name} in the workspace")),
        "{asked}"
    );

    // Over the channel's limit: not fetched, and the model is told why.
    tg.put_file("doc-2", "documents/file_2.bin", vec![0u8; 2 * 1024 * 1024]);
    let big = tg.push_message(MessageBuilder::document(
        &dm,
        &alice,
        "doc-2",
        "big.bin",
        "application/octet-stream",
        2 * 1024 * 1024,
        None,
    ));
    until("the answer to the big file", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(big.message_id))
    });
    let asked = model.requests()[1].body.to_string();
    assert!(
        asked.contains("big.bin (application/octet-stream) was not saved: the file is larger than the limit of 1048576 bytes"),
        "{asked}"
    );
    assert_eq!(tg.downloads(), ["documents/file_1.txt"]);
    assert_eq!(std::fs::read_dir(&inbox).unwrap().count(), 1);
}

/// Runs SQL against the stopped gateway's `state.db`.
fn with_state_db(gw: &Gw, sql: &str) -> usize {
    let conn = rusqlite::Connection::open(gw.home.join("state.db")).unwrap();
    conn.execute(sql, []).unwrap()
}

#[test]
fn a_message_whose_turn_was_recorded_is_not_run_again_and_a_reply_lost_before_queuing_is_sent_after_restart()
 {
    let (_rt, tg, model, mut gw) = paired(vec![
        Step::Reply(Reply::text(["First answer."])),
        Step::Reply(Reply::text(["Pong one."])),
        Step::Reply(Reply::text(["Pong two."])),
    ]);
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    let asked = tg.push_message(MessageBuilder::text(&dm, &alice, "a question"));
    until("the answer", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(asked.message_id))
    });
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    // The message's row is still `admitted` (its run, whose origin it is, is the record that
    // its turn started): the restart must not run it a second time.
    let n = with_state_db(
        &gw,
        "UPDATE channel_events SET status = 'admitted' WHERE event_kind = 'message' AND status = 'admitted'",
    );
    assert_eq!(n, 1);
    gw.spawn();
    let ping = tg.push_message(MessageBuilder::text(&dm, &alice, "ping"));
    let pong = until("the reply to the next message", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(ping.message_id))
    });
    assert_eq!(pong.text, "Pong one.");
    assert_eq!(model.requests().len(), 2, "the recorded turn ran again");
    let firsts = |tg: &FakeTelegram| {
        sent_to(tg, dm.id)
            .iter()
            .filter(|m| m.text == "First answer.")
            .count()
    };
    assert_eq!(firsts(&tg), 1, "the recorded turn was answered twice");

    // As if the gateway had died after the run ended but before its reply was queued: the
    // reply is queued once after the restart, without asking the model again.
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let n = with_state_db(
        &gw,
        "DELETE FROM channel_outbox WHERE dedup_key LIKE 'reply:%' AND text = 'First answer.'",
    );
    assert_eq!(n, 1);
    gw.spawn();
    until("the lost reply sent after the restart", &gw, || {
        (firsts(&tg) == 2).then_some(())
    });
    let ping = tg.push_message(MessageBuilder::text(&dm, &alice, "ping again"));
    let pong = until("the reply to the last message", &gw, || {
        sent_to(&tg, dm.id)
            .into_iter()
            .find(|m| m.reply_to == Some(ping.message_id))
    });
    assert_eq!(pong.text, "Pong two.");
    assert_eq!(model.requests().len(), 3);
    assert_eq!(firsts(&tg), 2);
}

#[test]
fn a_paired_non_owner_in_the_same_group_cannot_approve_and_the_owner_can() {
    let (_rt, tg, _model, gw) = paired(vec![
        Step::tool_call("c1", "exec", &net_exec(&["true"])),
        Step::Reply(Reply::text(["It ran in the group."])),
    ]);
    // Bob is paired too, but to the user `bob`, who is not an owner.
    let bob = FakeUser::new(5151, "Bob");
    let bob_dm = FakeChat::private(&bob);
    tg.push_message(MessageBuilder::text(&bob_dm, &bob, "hi"));
    until("bob's pairing code", &gw, || {
        sent_to(&tg, bob_dm.id).into_iter().next()
    });
    let out = gw.chitin(&["pairing", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&out.stdout).unwrap();
    let code = pending[0]["code"].as_str().unwrap().to_string();
    let ents_path = gw.home.join("entities.json");
    let mut ents: Value =
        serde_json::from_str(&std::fs::read_to_string(&ents_path).unwrap()).unwrap();
    ents.as_array_mut().unwrap().push(serde_json::json!(
        {"uid": {"type": "Chitin::User", "id": "bob"}, "attrs": {}, "parents": []}
    ));
    std::fs::write(&ents_path, ents.to_string()).unwrap();
    let out = gw.chitin(&["pairing", "approve", &code, "--user", "bob"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alice = FakeUser::new(4242, "Alice");
    let group = FakeChat::group(-5002, "Team");
    tg.push_message(MessageBuilder::text(
        &group,
        &alice,
        "@chitin_test_bot run it",
    ));
    let (prompt, id) = approval_prompt(&tg, &gw, group.id);
    let press = tg.push_callback(&bob, group.id, prompt.message_id, &format!("a:{id}"));
    let answer = until("the refusal of bob's press", &gw, || {
        tg.answers()
            .into_iter()
            .find(|a| a.callback_id == press.callback_id)
    });
    assert_eq!(
        answer.text.as_deref(),
        Some("Refused: you are not allowed to decide this approval.")
    );
    assert_eq!(approval_status(&gw, &id), "pending");
    let out = gw.chitin(&["audit", "query", "--kind", "decision", "--json"]);
    let audit: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "approval.grant"
                && r["decision"] == "deny"
                && r.to_string().contains("User::\\\"bob\\\"")),
        "{audit}"
    );
    // The owner's press in the same group runs the call.
    let press = tg.push_callback(&alice, group.id, prompt.message_id, &format!("a:{id}"));
    let answer = until("the owner's press answered", &gw, || {
        tg.answers()
            .into_iter()
            .find(|a| a.callback_id == press.callback_id)
    });
    assert_eq!(answer.text.as_deref(), Some("Approved."));
    until("the run's answer in the group", &gw, || {
        sent_to(&tg, group.id)
            .into_iter()
            .find(|m| m.text == "It ran in the group.")
    });
}

#[test]
fn status_metrics_and_ready_report_a_channel_that_cannot_connect_while_the_gateway_keeps_serving() {
    let (_rt, tg, _model, gw) = paired(vec![Step::Reply(Reply::text(["Still here."]))]);
    let s = status(&gw);
    assert_eq!(
        (s["kind"].as_str(), s["connected"].as_bool()),
        (Some("telegram"), Some(true)),
        "{s}"
    );
    assert!(
        s["connected_since_ms"].is_i64() && s["reported_ms"].is_i64(),
        "{s}"
    );
    let ready = gw.get("/ready").json();
    assert_eq!(ready["checks"]["channels"]["ok"], true, "{ready}");
    assert_eq!(
        ready["checks"]["channels"]["detail"], "tg: connected",
        "{ready}"
    );

    // The platform starts refusing the token: the channel reports it, the gateway stays up.
    tg.fail_next(
        "getUpdates",
        1,
        Failure::Forbidden("Forbidden: bot was kicked".into()),
    );
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    // A pushed message ends the current long poll; the next poll is the refused one.
    tg.push_message(MessageBuilder::text(&dm, &alice, "are you there?"));
    let s = until("the channel reported disconnected", &gw, || {
        let s = status(&gw);
        (s["connected"] == false).then_some(s)
    });
    assert!(
        s["connection_error"]
            .as_str()
            .unwrap()
            .contains("bot was kicked"),
        "{s}"
    );
    let ready = gw.get("/ready").json();
    assert_eq!(ready["checks"]["channels"]["ok"], false, "{ready}");
    let detail = ready["checks"]["channels"]["detail"].as_str().unwrap();
    assert!(detail.starts_with("tg: cannot connect:"), "{detail}");
    assert!(!detail.contains(TOKEN), "{detail}");
    // The API still answers; readiness does not depend on a chat platform.
    assert_eq!(gw.get("/health").status, 200);
    let metrics = gw.get("/metrics").body;
    assert!(
        metrics.contains("chitin_channel_connected{channel=\"tg\",kind=\"telegram\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("chitin_channel_lag_seconds{channel=\"tg\",kind=\"telegram\"}"));
    assert!(
        metrics.contains(
            "chitin_channel_last_event_timestamp_seconds{channel=\"tg\",kind=\"telegram\"}"
        ),
        "{metrics}"
    );
    let out = gw.chitin(&["channels", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("tg (telegram)  cannot connect:"), "{text}");
}

#[test]
fn a_workflow_the_model_runs_from_a_chat_pauses_for_an_approval_pressed_in_the_chat_and_finishes() {
    let (_rt, tg, _model, gw) = paired(vec![
        Step::tool_call("c1", "workflow", r#"{"file": "chat-approval.lobster"}"#),
        Step::Reply(Reply::text(["Done."])),
    ]);
    std::fs::write(
        gw.workspace().join("chat-approval.lobster"),
        "name: chat-approval\nsteps:\n  - id: ask\n    approval: \"Write the marker file?\"\n  - id: write\n    run: echo approved > marker.txt\n",
    )
    .unwrap();
    let alice = FakeUser::new(4242, "Alice");
    let dm = FakeChat::private(&alice);
    tg.push_message(MessageBuilder::text(&dm, &alice, "run the workflow"));
    // Every approval the run asks for is posted here with buttons (the workflow's gate, and
    // the run itself if policy asks for it); the owner presses Approve on each.
    let mut pressed = std::collections::BTreeSet::new();
    until("the model's final answer", &gw, || {
        for p in sent_to(&tg, dm.id)
            .into_iter()
            .filter(|m| !m.buttons.is_empty())
        {
            if pressed.insert(p.message_id) {
                tg.push_callback(&alice, dm.id, p.message_id, &p.buttons[0].1);
            }
        }
        sent_to(&tg, dm.id).into_iter().find(|m| m.text == "Done.")
    });
    assert!(!pressed.is_empty(), "no approval was posted in the chat");
    let prompts: Vec<String> = sent_to(&tg, dm.id)
        .into_iter()
        .filter(|m| !m.buttons.is_empty())
        .map(|m| m.text)
        .collect();
    assert!(
        prompts.iter().any(|t| t.contains("Write the marker file?")),
        "{prompts:?}"
    );
    assert_eq!(
        std::fs::read_to_string(gw.workspace().join("marker.txt")).unwrap(),
        "approved\n"
    );
}
