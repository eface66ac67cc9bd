//! Helpers shared by the provider tests: a router over fake servers with fast retries.
//! The fake servers themselves are `chitin::providers::testing` (reusable by any test).
#![allow(dead_code, reason = "shared by several test files; each uses a part")]

use std::sync::{Arc, Mutex};

use chitin::clock::ManualClock;
use chitin::config::agent::AgentConfig;
use chitin::config::providers::{ModelPrice, PricingConfig, ProviderConfig};
use chitin::providers::testing::{RecordingSleeper, StaticKeys};
use chitin::providers::{KeySource, ProviderEvent, ProviderKind, Router};
use chitin::secrets::{CredentialField, SecretName, SecretRef};

/// A provider config with fast retries (1-2 ms backoff) and short timeouts.
pub fn provider(
    name: &str,
    kind: ProviderKind,
    base_url: &str,
    key: Option<&str>,
) -> ProviderConfig {
    let mut p = ProviderConfig::new(name, kind, Some(base_url));
    p.api_key = key.map(|k| CredentialField(SecretRef::Secret(SecretName::parse(k).unwrap())));
    p.backoff_base_ms = 1;
    p.backoff_max_ms = 2;
    p.first_byte_timeout_ms = 5_000;
    p.idle_timeout_ms = 5_000;
    p.total_timeout_ms = 20_000;
    p
}

pub struct Setup {
    pub router: Router,
    pub sleeper: Arc<RecordingSleeper>,
}

pub fn router_with(
    providers: Vec<ProviderConfig>,
    model: &str,
    fallbacks: &[&str],
    keys: Arc<dyn KeySource>,
) -> Setup {
    let agent = AgentConfig {
        model: model.into(),
        fallbacks: fallbacks.iter().map(|s| (*s).to_string()).collect(),
        ..AgentConfig::default()
    };
    let mut pricing = PricingConfig::default();
    pricing.0.insert(
        model.into(),
        ModelPrice {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
        },
    );
    let sleeper = Arc::new(RecordingSleeper::default());
    let router = Router::new(
        &providers,
        &agent,
        &pricing,
        keys,
        Arc::new(ManualClock::new(1_792_567_680_000)),
    )
    .unwrap()
    .with_sleeper(sleeper.clone());
    Setup { router, sleeper }
}

/// One provider, no fallbacks, a key for it.
pub fn router(kind: ProviderKind, base_url: &str) -> Setup {
    let keys = Arc::new(StaticKeys::default().with("p", "sk-test-KEY-0123456789"));
    router_with(
        vec![provider("p", kind, base_url, Some("p_key"))],
        "p/m1",
        &[],
        keys,
    )
}

/// An event sink that keeps every event.
pub fn recorder() -> (
    Arc<Mutex<Vec<ProviderEvent>>>,
    impl FnMut(ProviderEvent) + Send,
) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e2 = events.clone();
    (events, move |e| e2.lock().unwrap().push(e))
}
