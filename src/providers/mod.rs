//! Model providers: the Anthropic Messages API and the OpenAI Chat Completions API (which
//! Ollama, LM Studio, vLLM and OpenRouter also speak), behind one provider-neutral API.
//!
//! The agent loop builds a [`Router`] from the configuration once and calls
//! [`Router::chat`] per model turn. It gets every [`ProviderEvent`] as it streams in and,
//! at the end, the collected [`ChatResponse`] (text, tool calls with their raw argument
//! JSON, stop reason, usage and cost).
//!
//! Invariants:
//! - An API key is fetched through the [`KeySource`] (the gate's `secret.use` decision) for
//!   exactly the provider's own host, and only ever sent to that host: redirects are never
//!   followed and no proxy is used. Keys never appear in errors, events or `Debug` output.
//! - Nothing here panics on what a server sends: malformed SSE, malformed JSON, malformed
//!   tool-call arguments and dropped connections are errors or events.
//! - Tool-call arguments are returned raw; the loop parses them strictly. Arguments that are
//!   not JSON are flagged ([`ToolCall::malformed`], [`ProviderEvent::ToolCallMalformed`]).
//! - A response larger than [`MAX_RESPONSE_BYTES`] is cut off with an error.

mod anthropic;
mod collect;
pub mod cost;
mod http;
mod json;
pub mod keys;
mod openai;
pub mod retry;
mod router;
mod sse;
#[doc(hidden)]
pub mod testing;

use std::fmt;
use std::sync::{Arc, OnceLock};

use zeroize::Zeroize;

pub use cost::{UsageRecord, check_budget, cost_usd, spend_today_usd};
pub use keys::GateKeySource;
pub use retry::{RetryPolicy, Sleeper, TokioSleeper};
pub use router::{ModelRef, Router};

use crate::secrets::{SecretRef, SecretValue};

/// The most bytes read from one model response (streamed or not).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Installs the aws-lc-rs crypto provider as the process default for rustls. Call it once,
/// first thing in `main`, before any HTTP client is built: with more than one provider
/// compiled in (chat crates bring `ring`), rustls panics on the first client otherwise.
/// Calling it again is harmless.
pub fn init_tls() {
    // `Err` only means a provider was already installed, which is what we want.
    let _already_installed = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub use crate::config::providers::ProviderKind;

/// One model turn, independent of the provider.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The system prompt.
    pub system: Option<String>,
    /// The conversation so far, oldest first. Shared (`Arc`): the agent keeps each stored
    /// message's converted form with the opened message, so building a request for a long
    /// session is a reference count per message, not a copy of its text, and each message is
    /// written as JSON once ([`SharedMessage`]).
    pub messages: Vec<Arc<SharedMessage>>,
    /// The tools the model may call (shared: the gateway's own specs are built once).
    pub tools: Vec<Arc<ToolSpec>>,
    /// Upper bound on generated tokens.
    pub max_tokens: u32,
    /// Sampling temperature (provider default when `None`).
    pub temperature: Option<f32>,
    /// Ask the provider to stream (SSE). `false` asks for one JSON response; the events are
    /// then produced from it, so the caller sees the same event sequence either way.
    pub stream: bool,
}

impl ChatRequest {
    /// A streaming request with `max_tokens` and no tools.
    pub fn new(messages: Vec<Message>, max_tokens: u32) -> Self {
        Self {
            messages: messages.into_iter().map(SharedMessage::arc).collect(),
            max_tokens,
            stream: true,
            ..Self::default()
        }
    }
}

/// A message of the conversation. Its texts are wiped when it is dropped (it holds opened
/// transcript plaintext).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// What the user said.
    User { text: String },
    /// What the model answered: text and the tool calls it made (replayed as they came).
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// The result of one tool call, tied to it by `tool_use_id` (= [`ToolCall::id`]).
    /// `images` (a browser screenshot) go to the model as image parts: in the Anthropic
    /// tool result itself, and for the OpenAI chat format in a user message right after the
    /// tool messages (its tool messages carry text only).
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
        images: Vec<ImagePart>,
    },
}

/// An image a tool returned, base64-encoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, Zeroize)]
pub struct ImagePart {
    /// `image/png`.
    pub media_type: String,
    pub data_base64: String,
}

impl Message {
    pub fn user(text: impl Into<String>) -> Self {
        Self::User { text: text.into() }
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        match self {
            Self::User { text } => text.zeroize(),
            Self::Assistant { text, tool_calls } => {
                text.zeroize();
                tool_calls.iter_mut().for_each(Zeroize::zeroize);
            }
            Self::ToolResult {
                tool_use_id,
                content,
                images,
                ..
            } => {
                tool_use_id.zeroize();
                content.zeroize();
                images.iter_mut().for_each(Zeroize::zeroize);
            }
        }
    }
}

/// The wire formats a message is written in ([`SharedMessage::json`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wire {
    /// The OpenAI chat format: the message object.
    OpenAi = 0,
    /// The Anthropic Messages format: the message's content blocks, comma-separated (the
    /// request merges consecutive messages of one role into one).
    Anthropic = 1,
}

/// A message as requests share it. A long session's every request carries every older
/// message again: each keeps its JSON form per wire format, written at its first request and
/// copied into the later ones, so a request costs a copy of the older messages' bytes, not
/// their conversion and escaping. A message only one request holds (the newest tool images,
/// a synthesized message) is written straight into that request instead. The kept JSON holds
/// the message's text and is wiped with it (it is written into a buffer sized up front for
/// twice the text, then copied into one of its own length and the first wiped; a text with
/// many escapes can outgrow the first, and a buffer given up on the way is not wiped, nor is
/// the request body it is copied into, like every body).
pub struct SharedMessage {
    message: Message,
    /// Boxed slices: exactly the bytes written, and 8 bytes smaller each than a `Vec`.
    json: [OnceLock<Box<[u8]>>; 2],
}

impl SharedMessage {
    pub fn new(message: Message) -> Self {
        Self {
            message,
            json: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// `message`, shared.
    pub fn arc(message: Message) -> Arc<Self> {
        Arc::new(Self::new(message))
    }

    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Whether `wire`'s form was written (and is kept).
    #[cfg(test)]
    pub(crate) fn is_written(&self, wire: Wire) -> bool {
        self.json[wire as usize].get().is_some()
    }

    /// The message in `wire`'s JSON: written the first time, kept for the later calls.
    pub(crate) fn json(&self, wire: Wire) -> &[u8] {
        self.json[wire as usize].get_or_init(|| {
            let mut out = Vec::with_capacity(2 * json::message_len(&self.message) + 160);
            write_message(wire, &self.message, &mut out);
            exact(out)
        })
    }
}

/// `v` in a buffer of its own length, `v`'s wiped. The room written into (twice the texts, so
/// that escapes rarely make it grow and leave a copy behind) would otherwise be kept for as
/// long as the message is: a session's messages stay in the history cache. Copied, not
/// shrunk in place (`realloc` may move it and leave the old bytes behind).
fn exact(mut v: Vec<u8>) -> Box<[u8]> {
    if v.capacity() == v.len() {
        return v.into_boxed_slice();
    }
    let kept: Box<[u8]> = v.as_slice().into();
    v.zeroize();
    kept
}

/// `m` in `wire`'s JSON: the OpenAI message object, or the Anthropic message's content
/// blocks (comma-separated, none for a message with nothing to say).
fn write_message(wire: Wire, m: &Message, out: &mut Vec<u8>) {
    match wire {
        Wire::OpenAi => openai::write_message(m, out),
        Wire::Anthropic => anthropic::write_message(m, out),
    }
}

impl fmt::Debug for SharedMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.message.fmt(f)
    }
}

impl Drop for SharedMessage {
    fn drop(&mut self) {
        for j in &mut self.json {
            if let Some(bytes) = j.get_mut() {
                // The whole capacity.
                bytes.zeroize();
            }
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments object.
    pub input_schema: serde_json::Value,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Zeroize)]
pub struct ToolCall {
    /// The provider's id for the call (echoed back in [`Message::ToolResult`]).
    pub id: String,
    pub name: String,
    /// The arguments exactly as the model produced them (unparsed).
    pub arguments_json: String,
    /// `Some(reason)` when `arguments_json` is not a JSON object: the model produced a
    /// malformed call, which the loop must not execute.
    pub malformed: Option<String>,
}

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why the model stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A complete answer (`end_turn` / `stop`).
    EndTurn,
    /// The model wants tool results (`tool_use` / `tool_calls`).
    ToolUse,
    /// `max_tokens` was reached (`max_tokens` / `length`).
    MaxTokens,
    /// A stop sequence matched.
    StopSequence,
    /// Anything else, as the provider spelled it (`refusal`, `content_filter`, ...).
    Other(String),
}

impl StopReason {
    fn from_anthropic(s: &str) -> Self {
        match s {
            "end_turn" => Self::EndTurn,
            "tool_use" => Self::ToolUse,
            "max_tokens" => Self::MaxTokens,
            "stop_sequence" => Self::StopSequence,
            other => Self::Other(other.to_string()),
        }
    }
    fn from_openai(s: &str) -> Self {
        match s {
            "stop" => Self::EndTurn,
            "tool_calls" | "function_call" => Self::ToolUse,
            "length" => Self::MaxTokens,
            other => Self::Other(other.to_string()),
        }
    }
}

/// What happens during a call, in order. Text and tool-call fragments arrive as the model
/// produces them; a `Retry` or `Failover` means everything received since the last `Retry`
/// or `Failover` (or the start) is void and the answer starts over.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// A piece of the answer text.
    TextDelta(String),
    /// The model started a tool call.
    ToolCallStart { id: String, name: String },
    /// A fragment of a tool call's argument JSON.
    ToolCallDelta { id: String, fragment: String },
    /// A tool call is complete and its arguments are a JSON object (still unvalidated).
    ToolCallDone {
        id: String,
        name: String,
        arguments_json: String,
    },
    /// A tool call is complete but its arguments are not a JSON object.
    ToolCallMalformed {
        id: String,
        name: String,
        arguments_json: String,
        error: String,
    },
    /// Token usage (may come more than once; the last one is the total).
    Usage(Usage),
    /// The model finished.
    Done { stop_reason: StopReason },
    /// The attempt failed and is being retried on the same model: discard partial output.
    /// `attempt` is the attempt about to start (2 = the first retry).
    Retry {
        model: String,
        attempt: u32,
        reason: String,
    },
    /// The model failed; the next model in the fallback chain is tried: discard partial output.
    Failover {
        from: String,
        to: String,
        reason: String,
    },
}

/// The collected answer of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatResponse {
    /// The model that answered (`provider/model`).
    pub model: String,
    /// The answer text (all text blocks concatenated).
    pub text: String,
    /// The tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
    pub stop_reason: StopReason,
    pub usage: Usage,
    /// Cost from the price table; `None` when the model has no price.
    pub cost_usd: Option<f64>,
    /// The failed attempts before this answer (retries and failovers), oldest first.
    pub failed_attempts: Vec<AttemptFailure>,
}

impl ChatResponse {
    /// The answer as the assistant message to append to the conversation (tool calls
    /// included, malformed ones too: their tool results must say why they did not run).
    pub fn to_message(&self) -> Message {
        Message::Assistant {
            text: self.text.clone(),
            tool_calls: self.tool_calls.clone(),
        }
    }
}

/// One failed attempt: which model, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptFailure {
    pub model: String,
    pub attempt: u32,
    pub reason: String,
}

impl fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (attempt {}): {}",
            self.model, self.attempt, self.reason
        )
    }
}

/// What the provider layer needs to fetch an API key: the provider's name, the secret the
/// config names (`api_key = "secret:NAME"` / `"env:VAR"`) and the host the key is for.
#[derive(Debug)]
pub struct KeyRequest<'a> {
    /// The `[[providers]] name` (Cedar principal `Chitin::Provider::"<name>"`).
    pub provider: &'a str,
    /// The configured credential reference.
    pub secret: &'a SecretRef,
    /// The host of the provider's `base_url`, lower-case: the only host the key is sent to.
    pub host: &'a str,
}

/// Hands out API keys. The gateway implements it with the gate (`secret.use` by principal
/// `Chitin::Provider::"<name>"`, resource `Chitin::Secret::"NAME"`, context `host`) and
/// [`crate::secrets::SecretStore::release`]. Called once per model per call, before the
/// first request; an `Err` fails that model (it is not retried) and the next fallback is
/// tried. The error text must not contain a key.
pub trait KeySource: Send + Sync {
    fn key_for(&self, req: &KeyRequest<'_>) -> Result<SecretValue, String>;
}

/// A key source with no keys: every provider that names an `api_key` fails. For servers
/// that need none (local Ollama), configure no `api_key`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoKeys;

impl KeySource for NoKeys {
    fn key_for(&self, req: &KeyRequest<'_>) -> Result<SecretValue, String> {
        Err(format!(
            "no key source is configured, so provider `{}` cannot get its API key",
            req.provider
        ))
    }
}

/// Errors of the provider layer. No message ever contains an API key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("invalid provider configuration: {0}")]
    Config(String),
    #[error(
        "model `{0}` is not of the form PROVIDER/MODEL with PROVIDER a [[providers]] name; \
         check [agent] model and fallbacks"
    )]
    UnknownModel(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("no API key for provider `{provider}`: {reason}")]
    Key { provider: String, reason: String },
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{url}: no {phase} within {after_ms} ms")]
    Timeout {
        url: String,
        phase: &'static str,
        after_ms: u64,
    },
    #[error("{url}: rate limited (HTTP 429){}", retry_after_text(*retry_after_ms))]
    RateLimited {
        url: String,
        retry_after_ms: Option<u64>,
    },
    #[error("{url}: HTTP {status}: {message}")]
    Http {
        url: String,
        status: u16,
        message: String,
        retry_after_ms: Option<u64>,
    },
    #[error("{url}: the response stream ended early: {reason}")]
    StreamDropped { url: String, reason: String },
    #[error("{url}: the provider reported an error ({kind}): {message}")]
    Upstream {
        url: String,
        kind: String,
        message: String,
    },
    #[error("{url}: malformed response: {reason}")]
    Protocol { url: String, reason: String },
    #[error("every model failed: {}", join_attempts(.0))]
    AllFailed(Vec<AttemptFailure>),
}

fn retry_after_text(ms: Option<u64>) -> String {
    ms.map(|ms| format!(", retry after {ms} ms"))
        .unwrap_or_default()
}

fn join_attempts(a: &[AttemptFailure]) -> String {
    if a.is_empty() {
        return "no model is configured; set [agent] model".into();
    }
    // Retries of one model that failed the same way are said once, with their attempts
    // ("m (attempts 1-3): reason"), not once per attempt.
    let mut groups: Vec<(&str, u32, u32, &str)> = Vec::new();
    for f in a {
        match groups.last_mut() {
            Some((model, _, last, reason)) if *model == f.model && *reason == f.reason => {
                *last = f.attempt;
            }
            _ => groups.push((&f.model, f.attempt, f.attempt, &f.reason)),
        }
    }
    groups
        .iter()
        .map(|(model, first, last, reason)| {
            if first == last {
                format!("{model} (attempt {first}): {reason}")
            } else {
                format!("{model} (attempts {first}-{last}): {reason}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl ProviderError {
    /// Whether the same request may succeed if sent again: timeouts, connection failures,
    /// dropped streams, 429, 408, 409, 5xx and overload errors. Never other 4xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::RateLimited { .. }
            | Self::StreamDropped { .. } => true,
            Self::Http { status, .. } => matches!(status, 408 | 409 | 429) || *status >= 500,
            Self::Upstream { kind, .. } => matches!(
                kind.as_str(),
                "overloaded_error" | "api_error" | "rate_limit_error" | "server_error"
            ),
            Self::Config(_)
            | Self::UnknownModel(_)
            | Self::InvalidRequest(_)
            | Self::Key { .. }
            | Self::Protocol { .. }
            | Self::AllFailed(_) => false,
        }
    }

    /// The server's `retry-after`, if it sent one.
    pub fn retry_after_ms(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_ms, .. } | Self::Http { retry_after_ms, .. } => {
                *retry_after_ms
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod first_contact_tests {
    use super::*;

    #[test]
    fn retries_failing_the_same_way_are_reported_once_with_their_attempts() {
        let f = |model: &str, attempt, reason: &str| AttemptFailure {
            model: model.into(),
            attempt,
            reason: reason.into(),
        };
        let e = ProviderError::AllFailed(vec![
            f(
                "local/llama",
                1,
                "cannot connect to http://127.0.0.1:9/v1: refused",
            ),
            f(
                "local/llama",
                2,
                "cannot connect to http://127.0.0.1:9/v1: refused",
            ),
            f(
                "local/llama",
                3,
                "cannot connect to http://127.0.0.1:9/v1: refused",
            ),
            f("other/m", 1, "HTTP 401"),
        ]);
        assert_eq!(
            e.to_string(),
            "every model failed: local/llama (attempts 1-3): cannot connect to \
             http://127.0.0.1:9/v1: refused; other/m (attempt 1): HTTP 401"
        );
    }
}

#[cfg(test)]
mod shared_message_tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn the_json_kept_for_a_message_holds_its_bytes_and_no_room_beyond() {
        let texts = ["x".repeat(1000), "tab\there \"quoted\" \u{1}".repeat(50)];
        for text in texts {
            let m = SharedMessage::new(Message::user(text.clone()));
            for wire in [Wire::OpenAi, Wire::Anthropic] {
                let written = m.json(wire).to_vec();
                // Kept as a boxed slice: no room beyond its bytes, by its type.
                // The same bytes as written into the larger buffer.
                let mut direct = Vec::new();
                write_message(wire, m.message(), &mut direct);
                assert_eq!(written, direct);
            }
        }
    }
}
