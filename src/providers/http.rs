//! One provider endpoint: builds the HTTP request, injects the key, enforces the timeouts
//! and size limit, and decodes the answer (SSE or whole JSON). One call = one attempt;
//! retries and failover are the router's.

use std::time::Duration;

use reqwest::header::{self, HeaderValue};
use tokio::time::timeout;
use zeroize::Zeroizing;

use super::collect::{Collected, Collector};
use super::retry::{RetryPolicy, parse_retry_after};
use super::sse::SseDecoder;
use super::{
    ChatRequest, MAX_RESPONSE_BYTES, ProviderError, ProviderEvent, ProviderKind, anthropic, openai,
};
use crate::config::providers::ProviderConfig;
use crate::secrets::{SecretRef, SecretValue};

/// Most bytes of an error response body read (for its message).
const MAX_ERROR_BODY: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub first_byte: Duration,
    pub idle: Duration,
    pub total: Duration,
}

pub struct ProviderClient {
    pub name: String,
    pub kind: ProviderKind,
    pub endpoint: reqwest::Url,
    /// The only host the key is sent to.
    pub host: String,
    pub api_key: Option<SecretRef>,
    pub stream: bool,
    pub max_tokens_field: String,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    http: reqwest::Client,
}

impl std::fmt::Debug for ProviderClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderClient")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint.as_str())
            .field("api_key", &self.api_key)
            .finish_non_exhaustive()
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl ProviderClient {
    pub fn new(cfg: &ProviderConfig) -> Result<Self, ProviderError> {
        let (base, host) = cfg.parsed_base_url().map_err(ProviderError::Config)?;
        let path = match cfg.kind {
            ProviderKind::Anthropic => "v1/messages",
            ProviderKind::Openai => "chat/completions",
        };
        let endpoint = format!("{}/{path}", base.as_str().trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint)
            .map_err(|e| ProviderError::Config(format!("`{}`: bad endpoint: {e}", cfg.name)))?;
        // The process's one lazily loaded root store (`net::client_tls`), not one per client.
        let tls = crate::net::client_tls().map_err(ProviderError::Config)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(ms(cfg.connect_timeout_ms))
            // A redirect could carry the key to another host; a proxy would see it.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("chitin/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProviderError::Config(format!("`{}`: HTTP client: {e}", cfg.name)))?;
        Ok(Self {
            name: cfg.name.clone(),
            kind: cfg.kind,
            endpoint,
            host,
            api_key: cfg.api_key.as_ref().map(|k| k.0.clone()),
            stream: cfg.stream,
            max_tokens_field: cfg.max_tokens_field.clone(),
            timeouts: Timeouts {
                first_byte: ms(cfg.first_byte_timeout_ms),
                idle: ms(cfg.idle_timeout_ms),
                total: ms(cfg.total_timeout_ms),
            },
            retry: RetryPolicy {
                max_attempts: cfg.max_attempts.max(1),
                base_ms: cfg.backoff_base_ms,
                max_ms: cfg.backoff_max_ms,
                retry_after_max_ms: cfg.retry_after_max_ms,
            },
            http,
        })
    }

    fn url(&self) -> String {
        self.endpoint.to_string()
    }

    /// One attempt, bounded by the total timeout.
    pub async fn attempt(
        &self,
        model: &str,
        req: &ChatRequest,
        key: Option<&SecretValue>,
        now_ms: i64,
        sink: &mut (dyn FnMut(ProviderEvent) + Send),
    ) -> Result<Collected, ProviderError> {
        match timeout(
            self.timeouts.total,
            self.attempt_inner(model, req, key, now_ms, sink),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Timeout {
                url: self.url(),
                phase: "complete response",
                after_ms: millis(self.timeouts.total),
            }),
        }
    }

    async fn attempt_inner(
        &self,
        model: &str,
        req: &ChatRequest,
        key: Option<&SecretValue>,
        now_ms: i64,
        sink: &mut (dyn FnMut(ProviderEvent) + Send),
    ) -> Result<Collected, ProviderError> {
        let stream = req.stream && self.stream;
        let body = match self.kind {
            ProviderKind::Anthropic => anthropic::request_body(model, req, stream),
            ProviderKind::Openai => {
                openai::request_body(model, req, stream, &self.max_tokens_field)
            }
        };
        let body =
            body.map_err(|e| ProviderError::InvalidRequest(format!("cannot encode: {e}")))?;
        let mut rb = self
            .http
            .post(self.endpoint.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::ACCEPT,
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(body);
        if self.kind == ProviderKind::Anthropic {
            rb = rb.header("anthropic-version", anthropic::API_VERSION);
        }
        if let Some(key) = key {
            let (name, value) = match self.kind {
                ProviderKind::Anthropic => ("x-api-key", Zeroizing::new(key.expose().to_vec())),
                ProviderKind::Openai => {
                    let mut v = Zeroizing::new(Vec::with_capacity(7 + key.len()));
                    v.extend_from_slice(b"Bearer ");
                    v.extend_from_slice(key.expose());
                    ("authorization", v)
                }
            };
            let mut hv = HeaderValue::from_bytes(&value).map_err(|_| ProviderError::Key {
                provider: self.name.clone(),
                reason: "the key contains bytes that are not allowed in an HTTP header \
                             (a newline?); store it again with `chitin secrets set`"
                    .into(),
            })?;
            hv.set_sensitive(true);
            rb = rb.header(name, hv);
        }

        let resp = match timeout(self.timeouts.first_byte, rb.send()).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    url: self.url(),
                    phase: "response",
                    after_ms: millis(self.timeouts.first_byte),
                });
            }
            Ok(Err(e)) => {
                return Err(ProviderError::Connect {
                    url: self.url(),
                    reason: error_chain(&e),
                });
            }
            Ok(Ok(r)) => r,
        };
        let mut resp = resp;
        let status = resp.status();
        let retry_after_ms = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now_ms));
        if !status.is_success() {
            let body = self
                .read_body(&mut resp, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            if status.as_u16() == 429 {
                return Err(ProviderError::RateLimited {
                    url: self.url(),
                    retry_after_ms,
                });
            }
            let message = if status.is_redirection() {
                "redirects are not followed (the API key must not reach another host); \
                 set base_url to the final address"
                    .to_string()
            } else {
                let m = match self.kind {
                    ProviderKind::Anthropic => anthropic::error_message(&body),
                    ProviderKind::Openai => openai::error_message(&body),
                };
                clean(&m.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()))
            };
            return Err(ProviderError::Http {
                url: self.url(),
                status: status.as_u16(),
                message,
                retry_after_ms,
            });
        }
        let is_sse = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        let mut col = Collector::new(sink);
        if is_sse {
            self.read_sse(&mut resp, &mut col).await?;
        } else {
            let body = self.read_body(&mut resp, MAX_RESPONSE_BYTES).await?;
            let r = match self.kind {
                ProviderKind::Anthropic => anthropic::decode_whole(&body, &mut col),
                ProviderKind::Openai => openai::decode_whole(&body, &mut col),
            };
            r.map_err(|e| self.decode_error(e))?;
        }
        Ok(col.finish())
    }

    fn decode_error(&self, e: anthropic::DecodeError) -> ProviderError {
        match e {
            anthropic::DecodeError::Protocol(reason) => ProviderError::Protocol {
                url: self.url(),
                reason: clean(&reason),
            },
            anthropic::DecodeError::Upstream { kind, message } => ProviderError::Upstream {
                url: self.url(),
                kind: clean(&kind),
                message: clean(&message),
            },
        }
    }

    async fn next_chunk(
        &self,
        resp: &mut reqwest::Response,
    ) -> Result<Option<bytes::Bytes>, ProviderError> {
        match timeout(self.timeouts.idle, resp.chunk()).await {
            Err(_) => Err(ProviderError::Timeout {
                url: self.url(),
                phase: "data (idle)",
                after_ms: millis(self.timeouts.idle),
            }),
            Ok(Err(e)) => Err(ProviderError::StreamDropped {
                url: self.url(),
                reason: error_chain(&e),
            }),
            Ok(Ok(c)) => Ok(c),
        }
    }

    async fn read_body(
        &self,
        resp: &mut reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ProviderError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next_chunk(resp).await? {
            if out.len() + chunk.len() > limit {
                return Err(ProviderError::Protocol {
                    url: self.url(),
                    reason: format!("the response is larger than {limit} bytes"),
                });
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    async fn read_sse(
        &self,
        resp: &mut reqwest::Response,
        col: &mut Collector<'_>,
    ) -> Result<(), ProviderError> {
        let mut sse = SseDecoder::default();
        let mut a = anthropic::StreamDecoder::default();
        let mut o = openai::StreamDecoder::default();
        let mut total = 0usize;
        let proto = |e: String| ProviderError::Protocol {
            url: self.url(),
            reason: e,
        };
        let mut finished = false;
        while !finished {
            let Some(chunk) = self.next_chunk(resp).await? else {
                break;
            };
            total += chunk.len();
            if total > MAX_RESPONSE_BYTES {
                return Err(proto(format!(
                    "the response is larger than {MAX_RESPONSE_BYTES} bytes"
                )));
            }
            for ev in sse.feed(&chunk).map_err(proto)? {
                let r = match self.kind {
                    ProviderKind::Anthropic => a.on_event(&ev, col),
                    ProviderKind::Openai => o.on_event(&ev, col),
                };
                r.map_err(|e| self.decode_error(e))?;
                finished = a.finished || o.finished;
                if finished {
                    break;
                }
            }
        }
        if !finished {
            for ev in sse.finish().map_err(proto)? {
                let r = match self.kind {
                    ProviderKind::Anthropic => a.on_event(&ev, col),
                    ProviderKind::Openai => o.on_event(&ev, col),
                };
                r.map_err(|e| self.decode_error(e))?;
            }
            finished = a.finished || o.finished;
        }
        // An OpenAI-compatible server that sent a finish_reason but no `[DONE]` has answered.
        let complete = finished || (self.kind == ProviderKind::Openai && col.has_stop());
        if !complete {
            return Err(ProviderError::StreamDropped {
                url: self.url(),
                reason: match self.kind {
                    ProviderKind::Anthropic => "the connection closed before message_stop",
                    ProviderKind::Openai => "the connection closed before the answer finished",
                }
                .into(),
            });
        }
        // Let the connection go back to the pool when the rest arrives at once.
        for _ in 0..4 {
            match timeout(Duration::from_millis(20), resp.chunk()).await {
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// An error and its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Text from a server, made safe for an error message: control characters replaced,
/// at most 300 characters.
pub fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(300)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().count() > 300 {
        out.push('…');
    }
    out
}
