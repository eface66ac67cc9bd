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

// ---- the default policy with the real store: keys go only to their audience -------------------

struct StoreFixture {
    _t: tempfile::TempDir,
    source: GateKeySource,
    audit: Arc<AuditLog>,
}

/// The built-in default policies (no policy dir) and a real secret store holding
/// `alpha_key` with audience `api.alpha.example` and `127.0.0.1`.
fn store_fixture() -> StoreFixture {
    use age::secrecy::SecretString;
    use chitin::config::secrets::{IdentityBackend, SecretsConfig};
    use chitin::secrets::identity::FixedPassphrase;
    use chitin::secrets::{SecretStore, SharedSecretStore};
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 4,
        max_scrypt_work_factor: 12,
        ..SecretsConfig::default()
    };
    let mut store = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from("pw".to_string()))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    store
        .set(
            &SecretName::parse("alpha_key").unwrap(),
            SecretValue::from_str_copy("sk-ALPHA-real-store-0456"),
            &["api.alpha.example".into(), "127.0.0.1".into()],
        )
        .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let audit = Arc::new(AuditLog::open(&home, AuditOptions::default()).unwrap());
    let gate = Gate::new(Arc::new(engine), audit.clone());
    StoreFixture {
        _t: t,
        source: GateKeySource::from_store(gate, SharedSecretStore::new(store)),
        audit,
    }
}

#[test]
fn by_default_a_provider_gets_its_key_for_a_host_in_the_keys_audience_and_the_release_is_audited() {
    let f = store_fixture();
    let s = secret("alpha_key");
    let v = f
        .source
        .key_for(&KeyRequest {
            provider: "alpha",
            secret: &s,
            host: "api.alpha.example",
        })
        .unwrap();
    assert_eq!(v.expose(), b"sk-ALPHA-real-store-0456");
    let recs = f.audit.reader().unwrap().query(&Query::default()).unwrap();
    let allow = recs
        .iter()
        .find(|r| r.kind == "decision" && r.action == "secret.use")
        .unwrap();
    assert_eq!(allow.decision, "allow");
    assert_eq!(
        allow.policy_ids(),
        ["secrets.providers-use-keys-for-their-audience"]
    );
    let release = recs.iter().find(|r| r.kind == "secret_use").unwrap();
    assert_eq!(release.actor, "Chitin::Provider::\"alpha\"");
    let payload = release.payload.clone().unwrap();
    assert!(payload.contains("api.alpha.example"), "{payload}");
    assert!(!payload.contains("sk-ALPHA"), "{payload}");
}

#[test]
fn by_default_a_key_is_refused_for_a_foreign_host_or_a_secret_not_in_the_store() {
    let f = store_fixture();
    let alpha = secret("alpha_key");
    let missing = secret("beta_key");
    for (s, host) in [
        (&alpha, "evil.example"),
        (&alpha, "api.alpha.example.evil.example"),
        (&alpha, "x.api.alpha.example"),
        (&missing, "api.alpha.example"),
    ] {
        let e = f
            .source
            .key_for(&KeyRequest {
                provider: "alpha",
                secret: s,
                host,
            })
            .err()
            .unwrap();
        assert!(e.contains("policy denied"), "{host}: {e}");
    }
    let recs = f.audit.reader().unwrap().query(&Query::default()).unwrap();
    assert!(!recs.iter().any(|r| r.kind == "secret_use"), "{recs:?}");
    assert_eq!(
        recs.iter()
            .filter(|r| r.action == "secret.use" && r.decision == "deny")
            .count(),
        4
    );
}

#[test]
fn a_key_refused_for_a_host_outside_its_audience_says_to_add_the_host_with_audience() {
    let f = store_fixture();
    let alpha = secret("alpha_key");
    let e = f
        .source
        .key_for(&KeyRequest {
            provider: "alpha",
            secret: &alpha,
            host: "api.other.example",
        })
        .err()
        .unwrap();
    assert!(
        e.contains(
            "provider `alpha` sends its key to api.other.example, but secret `alpha_key` may only be sent to [api.alpha.example, 127.0.0.1]"
        ),
        "{e}"
    );
    assert!(
        e.contains("chitin secrets set alpha_key --audience api.other.example"),
        "{e}"
    );
    assert!(!e.contains("Cedar policy"), "{e}");
    assert!(!e.contains("sk-ALPHA"), "{e}");
    // A secret that is not in the store is still a plain refusal.
    let missing = secret("beta_key");
    let e = f
        .source
        .key_for(&KeyRequest {
            provider: "alpha",
            secret: &missing,
            host: "api.alpha.example",
        })
        .err()
        .unwrap();
    assert!(!e.contains("--audience"), "{e}");
}
