//! The `[[providers]]` tables and the `[pricing]` table of `chitin.toml`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use super::secret_ref::{CredentialField, SecretRef};

/// Which wire protocol a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// `POST {base}/v1/messages` with `x-api-key`.
    Anthropic,
    /// `POST {base}/chat/completions` with `Authorization: Bearer`.
    Openai,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anthropic => "anthropic",
            Self::Openai => "openai",
        }
    }
}

/// Documentation and defaults for `[[providers]]` and `[pricing]`, written by `chitin init`.
pub const TEMPLATE: &str = r#"
# Model providers. Add one [[providers]] table per API endpoint; models are named
# "<provider name>/<model>" in [agent] (e.g. "local/llama3.1", "openrouter/openai/gpt-4o").
#
# [[providers]]
# name = "local"                        # required: a-z 0-9 _ -, unique
# kind = "openai"                       # required: "openai" (Chat Completions: OpenAI, Ollama,
#                                       #   LM Studio, vLLM, OpenRouter) or "anthropic" (Messages API)
# base_url = "http://127.0.0.1:11434/v1" # default: https://api.openai.com/v1 (openai),
#                                       #   https://api.anthropic.com (anthropic)
# api_key = "secret:local_key"          # optional; never the key itself: store it with
#                                       #   `chitin secrets set local_key --audience 127.0.0.1`
#                                       #   ("env:VAR" reads it from the environment). Sent only
#                                       #   to base_url's host; plain http only to loopback.
# stream = true                         # false: ask for whole responses (servers whose
#                                       #   streaming is broken)
# max_tokens_field = "max_tokens"       # openai only: or "max_completion_tokens" (o-series)
# connect_timeout_ms = 10000            # TCP + TLS connect
# first_byte_timeout_ms = 60000         # request sent -> response headers
# idle_timeout_ms = 120000              # longest silence between two pieces of a response
# total_timeout_ms = 600000             # one whole attempt
# max_attempts = 3                      # tries per model (timeouts, dropped streams, 408, 409,
#                                       #   429, 5xx); then the next model in [agent] fallbacks
# backoff_base_ms = 500                 # exponential backoff with jitter: base * 2^n ...
# backoff_max_ms = 20000                # ... capped at this
# retry_after_max_ms = 60000            # longest wait a server's retry-after can impose

[pricing]
# USD per million tokens, per "<provider>/<model>", for cost accounting and [budgets].
# Models without an entry are not priced (their cost is unknown and not counted).
# "anthropic/claude-sonnet-4-5" = { input_per_mtok = 3.0, output_per_mtok = 15.0 }
"#;

/// One `[[providers]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default, deserialize_with = "api_key_field")]
    pub api_key: Option<CredentialField>,
    #[serde(default = "yes")]
    pub stream: bool,
    #[serde(default = "max_tokens_field")]
    pub max_tokens_field: String,
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_first_byte")]
    pub first_byte_timeout_ms: u64,
    #[serde(default = "d_idle")]
    pub idle_timeout_ms: u64,
    #[serde(default = "d_total")]
    pub total_timeout_ms: u64,
    #[serde(default = "d_attempts")]
    pub max_attempts: u32,
    #[serde(default = "d_base")]
    pub backoff_base_ms: u64,
    #[serde(default = "d_max")]
    pub backoff_max_ms: u64,
    #[serde(default = "d_retry_after")]
    pub retry_after_max_ms: u64,
}

fn yes() -> bool {
    true
}
fn max_tokens_field() -> String {
    "max_tokens".into()
}
fn d_connect() -> u64 {
    10_000
}
fn d_first_byte() -> u64 {
    60_000
}
fn d_idle() -> u64 {
    120_000
}
fn d_total() -> u64 {
    600_000
}
fn d_attempts() -> u32 {
    3
}
fn d_base() -> u64 {
    500
}
fn d_max() -> u64 {
    20_000
}
fn d_retry_after() -> u64 {
    60_000
}

/// `api_key` accepts only `secret:NAME` / `env:VAR`; a literal key is refused with the fix,
/// and the value is never echoed.
fn api_key_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CredentialField>, D::Error> {
    let s = zeroize::Zeroizing::new(String::deserialize(d)?);
    SecretRef::parse_credential("providers.api_key", &s)
        .map(|r| Some(CredentialField(r)))
        .map_err(serde::de::Error::custom)
}

impl ProviderConfig {
    /// A provider with every optional key at its default.
    pub fn new(name: &str, kind: ProviderKind, base_url: Option<&str>) -> Self {
        Self {
            name: name.into(),
            kind,
            base_url: base_url.map(Into::into),
            api_key: None,
            stream: true,
            max_tokens_field: max_tokens_field(),
            connect_timeout_ms: d_connect(),
            first_byte_timeout_ms: d_first_byte(),
            idle_timeout_ms: d_idle(),
            total_timeout_ms: d_total(),
            max_attempts: d_attempts(),
            backoff_base_ms: d_base(),
            backoff_max_ms: d_max(),
            retry_after_max_ms: d_retry_after(),
        }
    }

    /// The base URL, or the provider kind's public endpoint.
    pub fn base_url_or_default(&self) -> &str {
        match (&self.base_url, self.kind) {
            (Some(u), _) => u,
            (None, ProviderKind::Anthropic) => "https://api.anthropic.com",
            (None, ProviderKind::Openai) => "https://api.openai.com/v1",
        }
    }

    /// The parsed base URL and its lower-case host, after the checks that keep a key on
    /// its way to the right server.
    pub fn parsed_base_url(&self) -> Result<(reqwest::Url, String), String> {
        let raw = self.base_url_or_default();
        let p = format!("[[providers]] `{}`", self.name);
        let url =
            reqwest::Url::parse(raw).map_err(|e| format!("{p}: base_url is not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{p}: base_url must start with https:// (or http:// for a local server)"
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{p}: base_url must not contain a user name or password; store the key with \
                 `chitin secrets set NAME` and set api_key = \"secret:NAME\""
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{p}: base_url must not have a query (?) or fragment (#)"
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{p}: base_url has no host"))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if url.scheme() == "http" && self.api_key.is_some() && !is_loopback(&host) {
            return Err(format!(
                "{p}: api_key would be sent in clear text over http:// to {host}; use https:// \
                 (plain http is allowed only for loopback servers)"
            ));
        }
        Ok((url, host))
    }
}

/// `localhost`, 127.0.0.0/8 or ::1.
pub fn is_loopback(host: &str) -> bool {
    if host == "localhost" {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// Prices of one model, USD per million tokens.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}

/// The `[pricing]` table: `"<provider>/<model>" = { input_per_mtok, output_per_mtok }`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct PricingConfig(pub BTreeMap<String, ModelPrice>);

impl PricingConfig {
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.0.get(model)
    }
}

/// Checks `[[providers]]`, `[pricing]` and the model names in `[agent]`.
pub fn validate(
    providers: &[ProviderConfig],
    agent: &super::agent::AgentConfig,
    pricing: &PricingConfig,
) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for p in providers {
        let ok = !p.name.is_empty()
            && p.name.len() <= 64
            && p.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !ok {
            return Err(format!(
                "[[providers]] name `{}` is invalid: use 1-64 characters a-z 0-9 _ -",
                p.name.escape_default()
            ));
        }
        if !names.insert(p.name.as_str()) {
            return Err(format!(
                "[[providers]] name `{}` is used twice; names must be unique",
                p.name
            ));
        }
        p.parsed_base_url()?;
        let pn = &p.name;
        for (key, v) in [
            ("connect_timeout_ms", p.connect_timeout_ms),
            ("first_byte_timeout_ms", p.first_byte_timeout_ms),
            ("idle_timeout_ms", p.idle_timeout_ms),
            ("total_timeout_ms", p.total_timeout_ms),
        ] {
            if v == 0 {
                return Err(format!(
                    "[[providers]] `{pn}`: {key} must be greater than 0"
                ));
            }
        }
        if !(1..=10).contains(&p.max_attempts) {
            return Err(format!(
                "[[providers]] `{pn}`: max_attempts must be 1..=10 (default 3)"
            ));
        }
        if !matches!(
            p.max_tokens_field.as_str(),
            "max_tokens" | "max_completion_tokens"
        ) {
            return Err(format!(
                "[[providers]] `{pn}`: max_tokens_field must be \"max_tokens\" or \"max_completion_tokens\""
            ));
        }
    }
    let models = std::iter::once(&agent.model)
        .filter(|m| !m.is_empty())
        .map(|m| ("model", m))
        .chain(agent.fallbacks.iter().map(|m| ("fallbacks", m)));
    for (key, m) in models {
        match m.split_once('/') {
            Some((p, model)) if names.contains(p) && !model.is_empty() => {}
            _ => {
                return Err(format!(
                    "[agent] {key}: `{}` must be \"PROVIDER/MODEL\" where PROVIDER is one of the \
                     [[providers]] names ({})",
                    m.escape_default(),
                    if names.is_empty() {
                        "none are configured".to_string()
                    } else {
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    }
                ));
            }
        }
    }
    if agent.model.is_empty() && !agent.fallbacks.is_empty() {
        return Err("[agent] fallbacks are set but model is empty; set model".into());
    }
    for (model, price) in &pricing.0 {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        if !ok(price.input_per_mtok) || !ok(price.output_per_mtok) {
            return Err(format!(
                "[pricing] `{}`: prices must be finite and not negative",
                model.escape_default()
            ));
        }
    }
    Ok(())
}
