//! The production key source: every API key request is a gate decision, audited, and only an
//! allow reaches the secret store; the key then goes to the fake provider's host only.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/fake_provider.rs"]
mod support;

use std::sync::{Arc, Mutex};

use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::providers::keys::ReleaseFn;
use chitin::providers::testing::{FakeAnthropic, Step};
use chitin::providers::{ChatRequest, GateKeySource, KeyRequest, KeySource, Message, ProviderKind};
use chitin::secrets::{SecretName, SecretRef, SecretValue};
use chitin_audit::{AuditLog, AuditOptions, Query};
use support::{provider, recorder, router_with};

const POLICY: &str = r#"
@id("providers.alpha-key-to-loopback")
@reason("The alpha provider may use its key for the loopback test server only.")
permit (
  principal == Chitin::Provider::"alpha",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"alpha_key"
)
when { context.host == "127.0.0.1" };
"#;

struct Fixture {
    _t: tempfile::TempDir,
    source: GateKeySource,
    released: Arc<Mutex<Vec<(String, String, String)>>>,
    audit: Arc<AuditLog>,
}

fn fixture() -> Fixture {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let pol = t.path().join("policies");
    std::fs::create_dir(&pol).unwrap();
    std::fs::write(pol.join("providers.cedar"), POLICY).unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: Some(pol),
        entity_files: vec![],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let audit = Arc::new(AuditLog::open(&home, AuditOptions::default()).unwrap());
    let gate = Gate::new(Arc::new(engine), audit.clone());
    let released = Arc::new(Mutex::new(Vec::new()));
    let r2 = released.clone();
    // Stands in for `store.release(authz, host, audit)`.
    let release: ReleaseFn = Arc::new(move |authz, host| {
        r2.lock().unwrap().push((
            authz.principal().to_string(),
            authz.resource().to_string(),
            host.to_string(),
        ));
        Ok(SecretValue::from_str_copy("sk-ALPHA-from-store-0123"))
    });
    Fixture {
        _t: t,
        source: GateKeySource::new(gate, release),
        released,
        audit,
    }
}

fn secret(name: &str) -> SecretRef {
    SecretRef::Secret(SecretName::parse(name).unwrap())
}

#[test]
fn an_allowed_key_request_is_released_for_exactly_that_provider_secret_and_host() {
    let f = fixture();
    let s = secret("alpha_key");
    let v = f
        .source
        .key_for(&KeyRequest {
            provider: "alpha",
            secret: &s,
            host: "127.0.0.1",
        })
        .unwrap();
    assert_eq!(v.expose(), b"sk-ALPHA-from-store-0123");
    assert_eq!(
        *f.released.lock().unwrap(),
        vec![(
            "Chitin::Provider::\"alpha\"".to_string(),
            "Chitin::Secret::\"alpha_key\"".to_string(),
            "127.0.0.1".to_string()
        )]
    );
}

#[test]
fn a_key_request_for_another_host_provider_or_secret_is_denied_and_never_reaches_the_store() {
    let f = fixture();
    let alpha = secret("alpha_key");
    let beta = secret("beta_key");
    for (provider, s, host) in [
        ("alpha", &alpha, "evil.example"),
        ("beta", &alpha, "127.0.0.1"),
        ("alpha", &beta, "127.0.0.1"),
    ] {
        let e = f
            .source
            .key_for(&KeyRequest {
                provider,
                secret: s,
                host,
            })
            .err()
            .unwrap();
        assert!(e.contains("policy denied"), "{e}");
        assert!(e.contains(host), "{e}");
    }
    assert!(f.released.lock().unwrap().is_empty());
    // Each decision is in the audit chain, with the provider as actor.
    let recs = f.audit.reader().unwrap().query(&Query::default()).unwrap();
    let denies: Vec<_> = recs
        .iter()
        .filter(|r| r.action.contains("secret.use") && r.decision == "deny")
        .collect();
    assert_eq!(denies.len(), 3, "{recs:?}");
    assert!(
        denies
            .iter()
            .any(|r| r.actor == "Chitin::Provider::\"beta\""),
        "{denies:?}"
    );
}

#[test]
fn env_credentials_are_refused_unless_enabled() {
    let f = fixture();
    let s = SecretRef::Env("ALPHA_KEY".into());
    let req = KeyRequest {
        provider: "alpha",
        secret: &s,
        host: "127.0.0.1",
    };
    // The default policy above does not allow `env:ALPHA_KEY`: denied first.
    let e = f.source.key_for(&req).err().unwrap();
    assert!(e.contains("policy denied"), "{e}");
    let pr = GateKeySource::policy_request(&req).unwrap();
    assert_eq!(pr.resource.to_string(), "Chitin::Secret::\"env:ALPHA_KEY\"");
}

#[tokio::test]
async fn a_provider_gets_its_key_through_the_gate_and_sends_it_to_its_own_host_only() {
    let f = fixture();
    let fake = FakeAnthropic::start(vec![Step::text("hi")]).await.unwrap();
    let s = router_with(
        vec![provider(
            "alpha",
            ProviderKind::Anthropic,
            &fake.base_url(),
            Some("alpha_key"),
        )],
        "alpha/m",
        &[],
        Arc::new(f.source.clone()),
    );
    let (_e, mut sink) = recorder();
    let r = s
        .router
        .chat(&ChatRequest::new(vec![Message::user("x")], 10), &mut sink)
        .await
        .unwrap();
    assert_eq!(r.text, "hi");
    assert_eq!(
        fake.requests()[0].header("x-api-key"),
        Some("sk-ALPHA-from-store-0123")
    );
    // The same provider pointed at another host is refused before any request is sent.
    let other = FakeAnthropic::start(vec![Step::text("never")])
        .await
        .unwrap();
    let url = other.base_url().replace("127.0.0.1", "localhost");
    let s = router_with(
        vec![provider(
            "alpha",
            ProviderKind::Anthropic,
            &url,
            Some("alpha_key"),
        )],
        "alpha/m",
        &[],
        Arc::new(f.source.clone()),
    );
    let e = s
        .router
        .chat(&ChatRequest::new(vec![Message::user("x")], 10), &mut sink)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("policy denied"), "{e}");
    assert!(other.requests().is_empty());
}
