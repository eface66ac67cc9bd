//! Retries, timeouts, dropped streams, failover, and where API keys may go.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/fake_provider.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chitin::config::Config;
use chitin::providers::testing::{FakeAnthropic, FakeOpenAi, Reply, StaticKeys, Step};
use chitin::providers::{ChatRequest, Message, ProviderError, ProviderEvent, ProviderKind};
use support::{provider, recorder, router, router_with};

fn hello() -> ChatRequest {
    ChatRequest::new(vec![Message::user("hello")], 64)
}

fn all_failed(e: &ProviderError) -> &[chitin::providers::AttemptFailure] {
    match e {
        ProviderError::AllFailed(a) => a,
        other => panic!("expected AllFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn a_429_is_retried_after_the_servers_retry_after_in_seconds_or_as_a_date() {
    // The router's clock is 2026-10-21T07:28:00Z; the date is 3 s later.
    let f = FakeOpenAi::start(vec![
        Step::rate_limited("2"),
        Step::rate_limited("Wed, 21 Oct 2026 07:28:03 GMT"),
        Step::text("ok"),
    ])
    .await
    .unwrap();
    let s = router(ProviderKind::Openai, &f.base_url());
    let (events, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "ok");
    assert_eq!(f.requests().len(), 3);
    assert_eq!(
        s.sleeper.waits(),
        vec![Duration::from_secs(2), Duration::from_secs(3)]
    );
    assert_eq!(r.failed_attempts.len(), 2);
    assert!(
        r.failed_attempts[0].reason.contains("429"),
        "{:?}",
        r.failed_attempts
    );
    let retries = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, ProviderEvent::Retry { .. }))
        .count();
    assert_eq!(retries, 2);
}

#[tokio::test]
async fn a_retry_after_longer_than_the_cap_waits_only_the_cap() {
    let f = FakeAnthropic::start(vec![Step::rate_limited("86400"), Step::text("ok")])
        .await
        .unwrap();
    let keys = Arc::new(StaticKeys::default().with("p", "sk-test-KEY-0123456789"));
    let mut p = provider("p", ProviderKind::Anthropic, &f.base_url(), Some("k"));
    p.retry_after_max_ms = 1500;
    let s = router_with(vec![p], "p/m", &[], keys);
    let (_e, mut sink) = recorder();
    s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(s.sleeper.waits(), vec![Duration::from_millis(1500)]);
}

#[tokio::test]
async fn server_errors_are_retried_with_backoff_until_success() {
    for (kind, f) in [
        (
            ProviderKind::Anthropic,
            FakeAnthropic::start(vec![Step::status(500), Step::status(503), Step::text("ok")])
                .await
                .unwrap(),
        ),
        (
            ProviderKind::Openai,
            FakeOpenAi::start(vec![Step::status(502), Step::status(500), Step::text("ok")])
                .await
                .unwrap(),
        ),
    ] {
        let s = router(kind, &f.base_url());
        let (_e, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        assert_eq!(r.text, "ok");
        assert_eq!(f.requests().len(), 3, "{kind:?}");
        // Exponential backoff with jitter: base 1 ms, cap 2 ms.
        let waits = s.sleeper.waits();
        assert_eq!(waits.len(), 2);
        assert!(
            waits.iter().all(|w| *w <= Duration::from_millis(2)),
            "{waits:?}"
        );
        assert!(
            r.failed_attempts[0].reason.contains("HTTP 50"),
            "{:?}",
            r.failed_attempts
        );
    }
}

#[tokio::test]
async fn a_client_error_is_never_retried() {
    for status in [400, 401, 403, 404, 422] {
        let f = FakeOpenAi::start(vec![Step::status(status), Step::text("never")])
            .await
            .unwrap();
        let s = router(ProviderKind::Openai, &f.base_url());
        let (_e, mut sink) = recorder();
        let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
        assert_eq!(f.requests().len(), 1, "HTTP {status} must not be retried");
        assert!(e.to_string().contains(&format!("HTTP {status}")), "{e}");
        assert!(s.sleeper.waits().is_empty());
    }
}

#[tokio::test]
async fn a_408_and_a_409_are_retried() {
    let f = FakeOpenAi::start(vec![Step::status(408), Step::status(409), Step::text("ok")])
        .await
        .unwrap();
    let s = router(ProviderKind::Openai, &f.base_url());
    let (_e, mut sink) = recorder();
    assert_eq!(s.router.chat(&hello(), &mut sink).await.unwrap().text, "ok");
    assert_eq!(f.requests().len(), 3);
}

#[tokio::test]
async fn a_response_that_never_comes_times_out_and_is_retried() {
    let f = FakeAnthropic::start(vec![Step::Hang, Step::text("ok")])
        .await
        .unwrap();
    let keys = Arc::new(StaticKeys::default().with("p", "sk-test-KEY-0123456789"));
    let mut p = provider("p", ProviderKind::Anthropic, &f.base_url(), Some("k"));
    p.first_byte_timeout_ms = 200;
    let s = router_with(vec![p], "p/m", &[], keys);
    let (_e, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "ok");
    assert!(
        r.failed_attempts[0]
            .reason
            .contains("no response within 200 ms"),
        "{:?}",
        r.failed_attempts
    );
}

#[tokio::test]
async fn a_stream_that_goes_silent_times_out_and_is_retried() {
    let f = FakeOpenAi::start(vec![
        Step::HangAfter {
            reply: Reply::text(["partial ", "answer"]),
            events: 2,
        },
        Step::text("complete"),
    ])
    .await
    .unwrap();
    let keys = Arc::new(StaticKeys::default());
    let mut p = provider("p", ProviderKind::Openai, &f.base_url(), None);
    p.idle_timeout_ms = 200;
    let s = router_with(vec![p], "p/m", &[], keys);
    let (events, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "complete");
    assert!(
        r.failed_attempts[0]
            .reason
            .contains("no data (idle) within 200 ms"),
        "{:?}",
        r.failed_attempts
    );
    // The partial text was streamed, then voided by a Retry event.
    let ev = events.lock().unwrap().clone();
    let partial = ev
        .iter()
        .position(|e| *e == ProviderEvent::TextDelta("partial ".into()));
    let retry = ev
        .iter()
        .position(|e| matches!(e, ProviderEvent::Retry { .. }));
    assert!(partial.unwrap() < retry.unwrap());
}

#[tokio::test]
async fn a_whole_attempt_longer_than_the_total_timeout_is_cut_off() {
    let f = FakeAnthropic::start(vec![Step::HangAfter {
        reply: Reply::text(["a", "b", "c"]),
        events: 3,
    }])
    .await
    .unwrap();
    let keys = Arc::new(StaticKeys::default());
    let mut p = provider("p", ProviderKind::Anthropic, &f.base_url(), None);
    p.total_timeout_ms = 300;
    p.max_attempts = 1;
    let s = router_with(vec![p], "p/m", &[], keys);
    let (_e, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    assert!(
        e.to_string().contains("no complete response within 300 ms"),
        "{e}"
    );
}

#[tokio::test]
async fn a_connection_dropped_mid_stream_is_retried_and_the_partial_answer_discarded() {
    for kind in [ProviderKind::Anthropic, ProviderKind::Openai] {
        let drop = Step::DropAfter {
            reply: Reply::text(["this will ", "be cut"]).tool_call(
                "c1",
                "exec",
                r#"{"argv":["ls"]}"#,
                3,
            ),
            events: 4,
        };
        let f = match kind {
            ProviderKind::Anthropic => {
                FakeAnthropic::start(vec![drop, Step::text("second try")]).await
            }
            ProviderKind::Openai => FakeOpenAi::start(vec![drop, Step::text("second try")]).await,
        }
        .unwrap();
        let s = router(kind, &f.base_url());
        let (events, mut sink) = recorder();
        let r = s.router.chat(&hello(), &mut sink).await.unwrap();
        assert_eq!(r.text, "second try", "{kind:?}");
        assert!(
            r.tool_calls.is_empty(),
            "nothing of the dropped attempt survives"
        );
        assert_eq!(f.requests().len(), 2);
        assert!(
            r.failed_attempts[0].reason.contains("ended early"),
            "{kind:?}: {:?}",
            r.failed_attempts
        );
        assert!(
            events
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, ProviderEvent::Retry { attempt: 2, .. }))
        );
    }
}

#[tokio::test]
async fn a_connection_dropped_on_every_attempt_ends_in_a_clear_error() {
    let f = FakeAnthropic::start(vec![]).await.unwrap();
    f.set_fallback(Step::DropAfter {
        reply: Reply::text(["x", "y"]),
        events: 2,
    });
    let s = router(ProviderKind::Anthropic, &f.base_url());
    let (_e, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    let a = all_failed(&e);
    assert_eq!(a.len(), 3, "3 attempts: {e}");
    assert!(a.iter().all(|x| x.reason.contains("ended early")), "{e}");
    assert!(
        e.to_string()
            .starts_with("every model failed: p/m1 (attempts 1-3)"),
        "{e}"
    );
}

#[tokio::test]
async fn when_every_attempt_fails_the_fallback_model_answers() {
    let primary = FakeAnthropic::start(vec![]).await.unwrap();
    primary.set_fallback(Step::status(529));
    let backup = FakeOpenAi::start(vec![Step::text("from the fallback")])
        .await
        .unwrap();
    let keys = Arc::new(
        StaticKeys::default()
            .with("anthropic", "sk-ant-PRIMARY-0123456789")
            .with("local", "sk-local-BACKUP-0123456789"),
    );
    let s = router_with(
        vec![
            provider(
                "anthropic",
                ProviderKind::Anthropic,
                &primary.base_url(),
                Some("ant"),
            ),
            provider(
                "local",
                ProviderKind::Openai,
                &backup.base_url(),
                Some("loc"),
            ),
        ],
        "anthropic/claude-sonnet-4-5",
        &["local/llama3.1"],
        keys,
    );
    let (events, mut sink) = recorder();
    let r = s.router.chat(&hello(), &mut sink).await.unwrap();
    assert_eq!(r.text, "from the fallback");
    assert_eq!(r.model, "local/llama3.1");
    assert_eq!(primary.requests().len(), 3);
    assert_eq!(backup.requests()[0].body["model"], "llama3.1");
    assert_eq!(r.failed_attempts.len(), 3);
    assert!(
        r.failed_attempts
            .iter()
            .all(|a| a.model == "anthropic/claude-sonnet-4-5")
    );
    assert!(events.lock().unwrap().iter().any(|e| matches!(e,
        ProviderEvent::Failover { from, to, .. }
            if from == "anthropic/claude-sonnet-4-5" && to == "local/llama3.1")));
}

#[tokio::test]
async fn when_every_model_fails_the_error_names_each_model_and_why() {
    let a = FakeAnthropic::start(vec![]).await.unwrap();
    a.set_fallback(Step::status(500));
    let b = FakeOpenAi::start(vec![Step::status(401)]).await.unwrap();
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/v1", dead.local_addr().unwrap());
    drop(dead);
    let keys = Arc::new(
        StaticKeys::default()
            .with("a", "sk-A-0123456789")
            .with("b", "sk-B-0123456789"),
    );
    let s = router_with(
        vec![
            provider("a", ProviderKind::Anthropic, &a.base_url(), Some("ka")),
            provider("b", ProviderKind::Openai, &b.base_url(), Some("kb")),
            provider("c", ProviderKind::Openai, &dead_url, None),
            provider("d", ProviderKind::Openai, &b.base_url(), Some("kd")),
        ],
        "a/big",
        &["b/medium", "c/small", "d/denied"],
        keys,
    );
    let (_e, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    let msg = e.to_string();
    for want in [
        "a/big (attempts 1-3)",
        "HTTP 500",
        "b/medium (attempt 1)",
        "HTTP 401",
        "c/small (attempts 1-3)",
        "cannot connect",
        "d/denied (attempt 1)",
        "no API key for provider `d`",
    ] {
        assert!(msg.contains(want), "missing {want:?} in: {msg}");
    }
    assert!(
        !msg.contains("b/medium (attempt 2)"),
        "401 is not retried: {msg}"
    );
    assert!(!msg.contains("sk-"), "{msg}");
}

#[tokio::test]
async fn the_api_key_goes_only_to_its_own_providers_host() {
    let fa = FakeAnthropic::start(vec![Step::text("a")]).await.unwrap();
    let fb = FakeOpenAi::start(vec![Step::text("b")]).await.unwrap();
    // The same port on another loopback address is another host.
    let fb_other_host = fb.base_url().replace("127.0.0.1", "localhost");
    let keys = Arc::new(
        StaticKeys::default()
            .with("alpha", "sk-ALPHA-0123456789")
            .with("beta", "sk-BETA-0123456789"),
    );
    let s = router_with(
        vec![
            provider(
                "alpha",
                ProviderKind::Anthropic,
                &fa.base_url(),
                Some("alpha_key"),
            ),
            provider(
                "beta",
                ProviderKind::Openai,
                &fb_other_host,
                Some("beta_key"),
            ),
        ],
        "alpha/m",
        &["beta/m"],
        keys.clone(),
    );
    let (_e, mut sink) = recorder();
    s.router.chat(&hello(), &mut sink).await.unwrap();
    let models = s.router.models().to_vec();
    s.router
        .chat_with_models(&models[1..], &hello(), &mut sink)
        .await
        .unwrap();
    assert_eq!(
        keys.asked(),
        vec![
            ("alpha".to_string(), "127.0.0.1".to_string()),
            ("beta".to_string(), "localhost".to_string())
        ]
    );
    let ra = &fa.requests()[0];
    let rb = &fb.requests()[0];
    assert_eq!(ra.header("x-api-key"), Some("sk-ALPHA-0123456789"));
    assert_eq!(
        rb.header("authorization"),
        Some("Bearer sk-BETA-0123456789")
    );
    for (r, other) in [(ra, "sk-BETA"), (rb, "sk-ALPHA")] {
        let all = format!("{:?} {}", r.headers, String::from_utf8_lossy(&r.raw_body));
        assert!(
            !all.contains(other),
            "a foreign key reached a server: {all}"
        );
    }
}

#[tokio::test]
async fn a_redirect_is_not_followed_so_the_key_cannot_reach_another_server() {
    let thief = FakeOpenAi::start(vec![Step::text("stolen")]).await.unwrap();
    let f = FakeOpenAi::start(vec![Step::Redirect {
        location: format!("{}/chat/completions", thief.base_url()),
    }])
    .await
    .unwrap();
    let s = router(ProviderKind::Openai, &f.base_url());
    let (_e, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    assert!(e.to_string().contains("redirects are not followed"), "{e}");
    assert!(
        thief.requests().is_empty(),
        "the redirect target was contacted"
    );
    assert_eq!(all_failed(&e).len(), 1, "a redirect is not retried");
}

#[tokio::test]
async fn an_api_key_never_appears_in_debug_output_errors_or_events() {
    const KEY: &str = "sk-live-CANARY-7f3a9b2c4d";
    // A server that echoes the key in its error message.
    let f = FakeOpenAi::start(vec![Step::Status {
        status: 401,
        retry_after: None,
        message: format!("Incorrect API key provided: {KEY}"),
    }])
    .await
    .unwrap();
    let keys = Arc::new(StaticKeys::default().with("p", KEY));
    let s = router_with(
        vec![provider(
            "p",
            ProviderKind::Openai,
            &f.base_url(),
            Some("p_key"),
        )],
        "p/m",
        &[],
        keys,
    );
    let (events, mut sink) = recorder();
    let e = s.router.chat(&hello(), &mut sink).await.unwrap_err();
    assert_eq!(
        f.requests()[0].header("authorization"),
        Some(&*format!("Bearer {KEY}"))
    );
    let everything = format!("{e} {e:?} {:?} {:?}", events.lock().unwrap(), s.router);
    assert!(!everything.contains("CANARY"), "{everything}");
    assert!(everything.contains("[REDACTED]"), "{everything}");
    // The config names the secret, never a value.
    assert!(format!("{:?}", s.router).contains("p_key"));
}

#[test]
fn a_literal_credential_in_config_is_refused_with_the_secrets_set_hint() {
    let text = "[[providers]]\nname = \"openai\"\nkind = \"openai\"\napi_key = \"sk-proj-LITERAL-123456\"\n";
    let e = Config::parse(text, Path::new("chitin.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("chitin secrets set NAME"), "{e}");
    assert!(e.contains("secret:NAME"), "{e}");
    assert!(e.contains("line 4"), "{e}");
    assert!(!e.contains("LITERAL"), "{e}");
}

#[test]
fn the_documented_provider_config_parses_and_resolves_its_models() {
    let text = r#"
[[providers]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:11434/v1"
api_key = "secret:local_key"

[[providers]]
name = "anthropic"
kind = "anthropic"
api_key = "env:ANTHROPIC_API_KEY"

[agent]
model = "local/llama3.1"
fallbacks = ["anthropic/claude-sonnet-4-5"]
workspace = "~/.chitin/workspace"

[pricing]
"anthropic/claude-sonnet-4-5" = { input_per_mtok = 3.0, output_per_mtok = 15.0 }

[budgets]
daily_usd_per_user = 5.0
users = { alice = 20.0 }
"#;
    let c = Config::parse(text, Path::new("chitin.toml")).unwrap();
    assert_eq!(c.providers.len(), 2);
    assert_eq!(
        c.agent.model_chain(),
        vec!["local/llama3.1", "anthropic/claude-sonnet-4-5"]
    );
    assert_eq!(c.budgets.daily_limit_usd("alice"), Some(20.0));
    assert_eq!(c.budgets.daily_limit_usd("bob"), Some(5.0));
    let r = chitin::providers::Router::from_config(
        &c,
        Arc::new(chitin::providers::NoKeys),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    assert_eq!(r.host_of("anthropic"), Some("api.anthropic.com"));
    assert_eq!(r.host_of("local"), Some("127.0.0.1"));
}

#[test]
fn bad_provider_config_is_refused_with_what_to_fix() {
    let base = "[[providers]]\nname = \"p\"\nkind = \"openai\"\n";
    for (extra, want) in [
        (
            "[agent]\nmodel = \"q/m\"\n",
            "PROVIDER is one of the [[providers]] names (p)",
        ),
        (
            "[agent]\nmodel = \"nomodel\"\n",
            "must be \"PROVIDER/MODEL\"",
        ),
        (
            "base_url = \"http://10.1.2.3:8000/v1\"\napi_key = \"secret:k\"\n",
            "clear text over http://",
        ),
        (
            "base_url = \"https://user:pw@example.com/v1\"\n",
            "must not contain a user name or password",
        ),
        ("max_attempts = 0\n", "max_attempts must be 1..=10"),
        ("kind2 = \"x\"\n", "kind2"),
    ] {
        let text = format!("{base}{extra}");
        let e = Config::parse(&text, Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{text}\n=> {e}");
        assert!(!e.contains("pw@"), "{e}");
    }
    let dup = format!("{base}{base}");
    let e = Config::parse(&dup, Path::new("c.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("used twice"), "{e}");
    // Plain http to a LAN server without a key is fine (Ollama on another machine).
    let ok = format!("{base}base_url = \"http://10.1.2.3:11434/v1\"\n");
    assert!(Config::parse(&ok, Path::new("c.toml")).is_ok());
}
