//! The router: resolves `provider/model` names, fetches keys, retries with backoff, fails
//! over along `[agent] fallbacks`, and prices the answer.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::http::ProviderClient;
use super::retry::{Sleeper, TokioSleeper};
use super::{
    AttemptFailure, ChatRequest, ChatResponse, KeyRequest, KeySource, ProviderError, ProviderEvent,
    cost_usd,
};
use crate::clock::Clock;
use crate::config::Config;
use crate::config::agent::AgentConfig;
use crate::config::providers::{PricingConfig, ProviderConfig};
use crate::secrets::SecretValue;

/// A model name: `provider/model` (the model part may itself contain `/`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelRef {
    pub provider: String,
    pub model: String,
}

impl ModelRef {
    pub fn parse(s: &str) -> Result<Self, ProviderError> {
        match s.split_once('/') {
            Some((p, m)) if !p.is_empty() && !m.is_empty() => Ok(Self {
                provider: p.into(),
                model: m.into(),
            }),
            _ => Err(ProviderError::UnknownModel(s.escape_default().to_string())),
        }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

/// All configured providers plus the model chain. Cheap to share (`Arc<Router>`); every
/// method takes `&self`.
pub struct Router {
    providers: BTreeMap<String, ProviderClient>,
    chain: Vec<ModelRef>,
    pricing: PricingConfig,
    keys: Arc<dyn KeySource>,
    sleeper: Arc<dyn Sleeper>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("providers", &self.providers.values().collect::<Vec<_>>())
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// From the whole configuration: `[[providers]]`, `[agent] model/fallbacks`, `[pricing]`.
    pub fn from_config(
        config: &Config,
        keys: Arc<dyn KeySource>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ProviderError> {
        Self::new(
            &config.providers,
            &config.agent,
            &config.pricing,
            keys,
            clock,
        )
    }

    pub fn new(
        providers: &[ProviderConfig],
        agent: &AgentConfig,
        pricing: &PricingConfig,
        keys: Arc<dyn KeySource>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ProviderError> {
        crate::config::providers::validate(providers, agent, pricing)
            .map_err(ProviderError::Config)?;
        let mut map = BTreeMap::new();
        for p in providers {
            map.insert(p.name.clone(), ProviderClient::new(p)?);
        }
        let chain = agent
            .model_chain()
            .iter()
            .map(|m| ModelRef::parse(m))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            providers: map,
            chain,
            pricing: pricing.clone(),
            keys,
            sleeper: Arc::new(TokioSleeper),
            clock,
        })
    }

    /// Replaces the sleeper used between retries (tests: one that returns at once).
    #[must_use]
    pub fn with_sleeper(mut self, sleeper: Arc<dyn Sleeper>) -> Self {
        self.sleeper = sleeper;
        self
    }

    /// `[agent] model` then `fallbacks`.
    pub fn models(&self) -> &[ModelRef] {
        &self.chain
    }

    /// The host a provider's key is for (`None` for an unknown provider).
    pub fn host_of(&self, provider: &str) -> Option<&str> {
        self.providers.get(provider).map(|p| p.host.as_str())
    }

    /// One model turn on `[agent] model`, falling back along `fallbacks`. Every event goes
    /// to `on_event` as it happens; the answer of the model that succeeded is returned.
    pub async fn chat(
        &self,
        req: &ChatRequest,
        on_event: &mut (dyn FnMut(ProviderEvent) + Send),
    ) -> Result<ChatResponse, ProviderError> {
        self.chat_with_models(&self.chain, req, on_event).await
    }

    /// Like [`Router::chat`] with an explicit model chain (e.g. a per-agent override).
    pub async fn chat_with_models(
        &self,
        models: &[ModelRef],
        req: &ChatRequest,
        on_event: &mut (dyn FnMut(ProviderEvent) + Send),
    ) -> Result<ChatResponse, ProviderError> {
        if req.max_tokens == 0 {
            return Err(ProviderError::InvalidRequest(
                "max_tokens must be greater than 0".into(),
            ));
        }
        if req.messages.is_empty() {
            return Err(ProviderError::InvalidRequest(
                "the conversation has no messages".into(),
            ));
        }
        let mut failures: Vec<AttemptFailure> = Vec::new();
        for (i, m) in models.iter().enumerate() {
            let name = m.to_string();
            let last_reason = match self.try_model(m, req, on_event, &mut failures).await {
                Ok(mut resp) => {
                    resp.failed_attempts = failures;
                    return Ok(resp);
                }
                Err(reason) => reason,
            };
            if let Some(next) = models.get(i + 1) {
                on_event(ProviderEvent::Failover {
                    from: name,
                    to: next.to_string(),
                    reason: last_reason,
                });
            }
        }
        Err(ProviderError::AllFailed(failures))
    }

    /// [`Router::chat`] on its own task: events arrive on the channel as they happen, the
    /// answer through the join handle. Dropping the handle does not stop the call; aborting
    /// it does.
    pub fn chat_stream(
        self: &Arc<Self>,
        req: ChatRequest,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<ProviderEvent>,
        tokio::task::JoinHandle<Result<ChatResponse, ProviderError>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let me = Arc::clone(self);
        let handle = tokio::spawn(async move {
            let mut sink = move |e: ProviderEvent| {
                // A receiver that went away only stops the events, not the call.
                let _gone = tx.send(e);
            };
            me.chat(&req, &mut sink).await
        });
        (rx, handle)
    }

    /// All attempts on one model. `Err` carries the last reason (already recorded).
    async fn try_model(
        &self,
        m: &ModelRef,
        req: &ChatRequest,
        on_event: &mut (dyn FnMut(ProviderEvent) + Send),
        failures: &mut Vec<AttemptFailure>,
    ) -> Result<ChatResponse, String> {
        let name = m.to_string();
        let mut fail = |attempt: u32, reason: String| {
            failures.push(AttemptFailure {
                model: name.clone(),
                attempt,
                reason: reason.clone(),
            });
            reason
        };
        let Some(client) = self.providers.get(&m.provider) else {
            return Err(fail(
                1,
                ProviderError::UnknownModel(name.clone()).to_string(),
            ));
        };
        let key: Option<SecretValue> = match &client.api_key {
            None => None,
            Some(secret) => {
                // The key source makes a gate decision and writes an audit record (fsync):
                // blocking work, so it runs on the blocking pool, not on a runtime worker.
                let keys = Arc::clone(&self.keys);
                let (provider, secret, host) =
                    (client.name.clone(), secret.clone(), client.host.clone());
                let got = tokio::task::spawn_blocking(move || {
                    keys.key_for(&KeyRequest {
                        provider: &provider,
                        secret: &secret,
                        host: &host,
                    })
                })
                .await
                .unwrap_or_else(|e| Err(format!("the key source failed: {e}")));
                match got {
                    Ok(k) => Some(k),
                    Err(reason) => {
                        let e = ProviderError::Key {
                            provider: client.name.clone(),
                            reason,
                        };
                        return Err(fail(1, e.to_string()));
                    }
                }
            }
        };
        let scrub = |s: String| match key.as_ref().and_then(SecretValue::expose_str) {
            Some(k) if !k.is_empty() && s.contains(k) => s.replace(k, "[REDACTED]"),
            _ => s,
        };
        let mut attempt = 1u32;
        loop {
            let now = self.clock.now_ms();
            match client
                .attempt(&m.model, req, key.as_ref(), now, on_event)
                .await
            {
                Ok(c) => {
                    return Ok(ChatResponse {
                        model: name.clone(),
                        cost_usd: cost_usd(&self.pricing, &name, c.usage),
                        text: c.text,
                        tool_calls: c.tool_calls,
                        stop_reason: c.stop_reason,
                        usage: c.usage,
                        failed_attempts: Vec::new(),
                    });
                }
                Err(e) => {
                    let reason = fail(attempt, scrub(e.to_string()));
                    if !e.is_retryable() || attempt >= client.retry.max_attempts {
                        return Err(reason);
                    }
                    on_event(ProviderEvent::Retry {
                        model: name.clone(),
                        attempt: attempt + 1,
                        reason,
                    });
                    let wait = client.retry.delay(attempt, e.retry_after_ms());
                    self.sleeper.sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}
