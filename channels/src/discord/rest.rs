//! Discord's HTTP API (`<api_base>/<route>`, JSON): one request helper that keeps Discord's
//! per-route rate limit buckets and the global limit.
//!
//! **Buckets.** Every answer may carry `X-RateLimit-Bucket` (an opaque id shared by the routes
//! that share a limit), `X-RateLimit-Remaining` and `X-RateLimit-Reset-After` (seconds, with a
//! fraction). A route is mapped to its bucket when an answer names it, and the bucket's state
//! is kept per top-level resource (the channel, or the interaction / webhook): a request whose
//! bucket is empty waits for the reset before it is sent, up to [`MAX_BUCKET_WAIT`]; a longer
//! wait is returned as [`ApiError::RateLimited`] so the engine's outbox waits instead of a
//! sender task. A request counts against its bucket when it is sent, so concurrent requests do
//! not all spend the last one.
//!
//! **429.** The JSON body's `retry_after` (seconds, a float) or else the `Retry-After` header
//! is the wait; `X-RateLimit-Global: true` (or `"global": true`) makes every request wait that
//! long (interaction routes excepted: Discord does not count them against the global limit).
//!
//! **Secrets.** The bot token travels only in the `Authorization: Bot …` header, built once
//! and marked sensitive; interaction tokens are in URL paths, so request errors are taken
//! without their URL and every message is scrubbed of both.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use reqwest::Method;
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::http;

/// The longest wait for an empty bucket before a request is sent; longer is `RateLimited`.
pub(super) const MAX_BUCKET_WAIT: Duration = Duration::from_secs(10);
/// The wait when a 429 names none.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest `retry_after` believed (a bigger one is clamped).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Largest answer read (a message object is a few KiB).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bucket maps are cleared when they grow past this (they are only a cache of the headers).
const MAX_BUCKETS: usize = 10_000;

/// One request: what it is, where it goes and how it counts against the rate limits.
pub(super) struct Route {
    pub method: Method,
    /// The path after the API root, ids already checked (`/channels/123/messages`).
    pub path: String,
    /// The route with its ids replaced (`POST /channels/{}/messages`): the key Discord's
    /// buckets are learned under.
    pub key: &'static str,
    /// The top-level resource (channel id, interaction id, webhook id) the bucket is kept
    /// per.
    pub major: String,
    /// Sent with the bot's `Authorization` (interaction callbacks and followups are
    /// authenticated by their token in the path instead).
    pub auth: bool,
    /// Counts against the global limit (interaction routes do not).
    pub global: bool,
    /// A secret in the path (an interaction token), scrubbed from error texts.
    pub secret: Option<Zeroizing<String>>,
}

/// Why a request failed.
pub(super) type CallError = http::CallError<ApiError>;

/// What Discord's rate limits or error answer said.
#[derive(Debug)]
pub(super) enum ApiError {
    /// HTTP 429, or a bucket that stays empty longer than [`MAX_BUCKET_WAIT`].
    RateLimited { retry_after: Duration },
    /// Discord answered with an error status: its JSON error `code` and `message`, if any.
    Status {
        status: u16,
        code: Option<u64>,
        message: String,
    },
}

#[derive(Clone, Copy)]
struct Bucket {
    remaining: u64,
    reset_at: Instant,
}

#[derive(Default)]
struct Limits {
    /// Route key → bucket id (from `X-RateLimit-Bucket`).
    routes: HashMap<&'static str, String>,
    /// (bucket id, major resource) → state.
    buckets: HashMap<(String, String), Bucket>,
    global_until: Option<Instant>,
}

pub(super) struct Rest {
    /// The API root without a trailing `/`.
    base: String,
    /// `Bot <token>`, marked sensitive.
    auth: HeaderValue,
    token: Zeroizing<String>,
    http: reqwest::Client,
    limits: Mutex<Limits>,
}

impl fmt::Debug for Rest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.base)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Rest {
    pub(super) fn new(
        base: String,
        token: Zeroizing<String>,
        http: reqwest::Client,
    ) -> Result<Self, String> {
        let auth = http::auth_header("Bot", &token)
            .ok_or_else(|| "the bot token is not a valid header value".to_owned())?;
        Ok(Self {
            base,
            auth,
            token,
            http,
            limits: Mutex::new(Limits::default()),
        })
    }

    pub(super) fn base(&self) -> &str {
        &self.base
    }

    pub(super) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The bot token and `extra` (an interaction token): what every text leaving the adapter
    /// is scrubbed of.
    pub(super) fn secrets<'a>(&'a self, extra: Option<&'a str>) -> [&'a str; 2] {
        [self.token.as_str(), extra.unwrap_or_default()]
    }

    /// Sends one request (after waiting for its bucket) and returns the JSON answer (`Null`
    /// for an empty one, as `204 No Content`).
    pub(super) async fn call(
        &self,
        route: &Route,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        self.wait_for_bucket(route).await?;
        let secrets = self.secrets(route.secret.as_ref().map(|s| s.as_str()));
        let url = Zeroizing::new(format!("{}{}", self.base, route.path));
        let mut req = self
            .http
            .request(route.method.clone(), url.as_str())
            .timeout(REQUEST_TIMEOUT);
        if route.auth {
            req = req.header(AUTHORIZATION, self.auth.clone());
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let what = route.key;
        let mut resp = req
            .send()
            .await
            .map_err(|e| CallError::network(what, e, true, &secrets))?;
        let status = resp.status().as_u16();
        self.learn(route, resp.headers(), status);
        let header_retry = retry_after_header(resp.headers());
        let header_global = resp
            .headers()
            .get("x-ratelimit-global")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let bytes = http::read_answer(what, &mut resp, MAX_ANSWER_BYTES, &secrets).await?;
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if (200..300).contains(&status) {
            return match json {
                Some(v) => Ok(v),
                None if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Value::Null),
                None => Err(CallError::BadAnswer(format!(
                    "{what}: HTTP {status} with a body that is not JSON"
                ))),
            };
        }
        if status == 429 {
            let body_retry = json
                .as_ref()
                .and_then(|j| j.get("retry_after"))
                .and_then(Value::as_f64)
                .and_then(seconds);
            let global = header_global
                || json
                    .as_ref()
                    .and_then(|j| j.get("global"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            let retry_after = body_retry.or(header_retry).unwrap_or(DEFAULT_RETRY_AFTER);
            self.limited(route, retry_after, global);
            return Err(CallError::Api(ApiError::RateLimited { retry_after }));
        }
        let code = json
            .as_ref()
            .and_then(|j| j.get("code"))
            .and_then(Value::as_u64);
        let message = json
            .as_ref()
            .and_then(|j| j.get("message"))
            .and_then(Value::as_str)
            .map_or_else(
                || format!("HTTP {status}"),
                |m| format!("{m} (HTTP {status})"),
            );
        Err(CallError::Api(ApiError::Status {
            status,
            code,
            message: http::redact(format!("{what}: {message}"), &secrets),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Limits> {
        self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits while the global limit or the route's bucket is exhausted (at most
    /// [`MAX_BUCKET_WAIT`]), then counts the request against its bucket.
    async fn wait_for_bucket(&self, route: &Route) -> Result<(), CallError> {
        loop {
            let wait = {
                let mut l = self.lock();
                let now = Instant::now();
                let global = l
                    .global_until
                    .filter(|until| route.global && *until > now)
                    .map(|until| (until - now, true));
                match global {
                    Some(w) => Some(w),
                    None => {
                        let key = l
                            .routes
                            .get(route.key)
                            .map(|b| (b.clone(), route.major.clone()));
                        match key.and_then(|k| l.buckets.get_mut(&k)) {
                            Some(b) if b.remaining == 0 && b.reset_at > now => {
                                Some((b.reset_at - now, false))
                            }
                            Some(b) => {
                                if b.reset_at <= now {
                                    // The window is over: the next answer says how many
                                    // are left; until then this one is allowed.
                                    b.remaining = 1;
                                }
                                b.remaining = b.remaining.saturating_sub(1);
                                None
                            }
                            None => None,
                        }
                    }
                }
            };
            match wait {
                None => return Ok(()),
                Some((d, _)) if d > MAX_BUCKET_WAIT => {
                    return Err(CallError::Api(ApiError::RateLimited { retry_after: d }));
                }
                Some((d, _)) => tokio::time::sleep(d).await,
            }
        }
    }

    /// Learns the route's bucket from an answer's headers.
    fn learn(&self, route: &Route, headers: &HeaderMap, status: u16) {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let Some(bucket) = text("x-ratelimit-bucket") else {
            return;
        };
        let remaining = text("x-ratelimit-remaining").and_then(|v| v.trim().parse::<u64>().ok());
        let reset_after = text("x-ratelimit-reset-after")
            .and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(seconds);
        let mut l = self.lock();
        if l.routes.len() > MAX_BUCKETS || l.buckets.len() > MAX_BUCKETS {
            l.routes.clear();
            l.buckets.clear();
        }
        l.routes.insert(route.key, bucket.to_owned());
        if let (Some(remaining), Some(reset_after)) = (remaining, reset_after) {
            // A 429 sets the bucket from its retry_after instead (see `limited`).
            if status != 429 {
                l.buckets.insert(
                    (bucket.to_owned(), route.major.clone()),
                    Bucket {
                        remaining,
                        reset_at: Instant::now() + reset_after,
                    },
                );
            }
        }
    }

    /// Records a 429: the global limit, or the route's bucket, is exhausted for `retry_after`.
    fn limited(&self, route: &Route, retry_after: Duration, global: bool) {
        let mut l = self.lock();
        let until = Instant::now() + retry_after;
        if global {
            l.global_until = Some(l.global_until.map_or(until, |g| g.max(until)));
            return;
        }
        if let Some(bucket) = l.routes.get(route.key).cloned() {
            l.buckets.insert(
                (bucket, route.major.clone()),
                Bucket {
                    remaining: 0,
                    reset_at: until,
                },
            );
        }
    }
}

fn retry_after_header(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(seconds)
}

/// A wait in seconds (with a fraction) as a `Duration`, clamped to [`MAX_RETRY_AFTER`];
/// `None` for a negative or non-finite value.
pub(super) fn seconds(s: f64) -> Option<Duration> {
    if !s.is_finite() || s < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(s).map_or(MAX_RETRY_AFTER, |d| d.min(MAX_RETRY_AFTER)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn waits_in_seconds_are_read_with_their_fraction_and_clamped() {
        assert_eq!(seconds(0.529), Some(Duration::from_millis(529)));
        assert_eq!(seconds(1e12), Some(MAX_RETRY_AFTER));
        assert_eq!(seconds(-1.0), None);
        assert_eq!(seconds(f64::NAN), None);
    }

    #[test]
    fn the_token_is_scrubbed_from_error_texts() {
        let rest = Rest::new(
            "http://127.0.0.1:9".into(),
            Zeroizing::new("TOKENVALUE.abc".into()),
            reqwest::Client::new(),
        )
        .unwrap();
        let out = http::redact(
            "x TOKENVALUE.abc y ITOKEN".into(),
            &rest.secrets(Some("ITOKEN")),
        );
        assert_eq!(out, "x <redacted> y <redacted>");
        assert!(!format!("{rest:?}").contains("TOKENVALUE"));
    }
}
