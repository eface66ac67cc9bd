//! The HTTP client plumbing every adapter shares: building the client, wording a request that
//! got no answer, scrubbing credentials from texts, checking an API root, reading an answer of
//! bounded size, downloading an attachment of bounded size from an allowed host, and the shape
//! of a failed call.
//!
//! What is a platform's own stays in its adapter and reaches these functions as a parameter:
//! which credentials to scrub, which hosts a download may go to, what a status hints at, and
//! how an error answer maps to [`SendError`] and [`ChannelError`].

use std::net::IpAddr;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, Url};
use zeroize::Zeroizing;

use crate::{ChannelError, ConfigError, SendError};

/// How long connecting to a platform may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The User-Agent of the adapters (Discord asks for its own form).
pub(crate) const USER_AGENT: &str = concat!("chitin/", env!("CARGO_PKG_VERSION"));
/// What a credential is replaced with in a text.
pub(crate) const REDACTED: &str = "<redacted>";

/// An adapter's HTTP client: rustls, [`CONNECT_TIMEOUT`], `user_agent`, no redirects (a
/// redirect would carry a credential, in a header or in the URL, to wherever it points) and no
/// proxy (a proxy would see the credentials). Timeouts are set per request.
pub(crate) fn client(user_agent: &str) -> Result<reqwest::Client, ConfigError> {
    reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(user_agent)
        .build()
        .map_err(|e| ConfigError::Invalid(format!("HTTP client: {}", e.without_url())))
}

/// `text` with every non-empty one of `secrets` replaced by `<redacted>`: for a text that is
/// about to leave an adapter (a server or a proxy may echo a request).
pub(crate) fn redact(mut text: String, secrets: &[&str]) -> String {
    for secret in secrets {
        if !secret.is_empty() && text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }
    text
}

/// The text of a request that failed without an answer: `<what>: <error>: <cause>: …` (the
/// chain of causes, hyper's and io's, says what actually happened), without the request's
/// URL, scrubbed of `secrets`.
pub(crate) fn failure_text(what: &str, e: reqwest::Error, secrets: &[&str]) -> String {
    let e = e.without_url();
    let mut message = format!("{what}: {e}");
    let err: &dyn std::error::Error = &e;
    let mut cause = err.source();
    while let Some(c) = cause {
        message.push_str(": ");
        message.push_str(&c.to_string());
        cause = c.source();
    }
    redact(message, secrets)
}

/// `Authorization: <scheme> <secret>`, marked sensitive (reqwest and hyper leave it out of
/// their `Debug` output); the formatted value is wiped. `None` when the secret cannot be a
/// header value.
pub(crate) fn auth_header(scheme: &str, secret: &str) -> Option<HeaderValue> {
    let value = Zeroizing::new(format!("{scheme} {secret}"));
    let mut header = HeaderValue::from_str(value.as_str()).ok()?;
    header.set_sensitive(true);
    Some(header)
}

/// The `Retry-After` header in whole seconds (the HTTP-date form is not used by these
/// platforms).
pub(crate) fn retry_after_secs(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

// ---- A failed call ----

/// Why a call to a platform's API failed (mapped to [`SendError`] or [`ChannelError`] by the
/// adapter). `A` is what the adapter reads of an error answer.
#[derive(Debug)]
pub(crate) enum CallError<A> {
    /// No HTTP answer. `sent`: the request may have reached the platform.
    Network { message: String, sent: bool },
    /// The platform answered with an error.
    Api(A),
    /// A success status whose body is not what the API documents.
    BadAnswer(String),
}

impl<A> CallError<A> {
    /// A request that failed with `e` (see [`failure_text`]). `sent`: it had been sent, so it
    /// may have reached the platform unless it failed being built or connecting.
    pub(crate) fn network(what: &str, e: reqwest::Error, sent: bool, secrets: &[&str]) -> Self {
        let sent = sent && !e.is_connect() && !e.is_builder();
        Self::Network {
            message: failure_text(what, e, secrets),
            sent,
        }
    }

    /// The send's error: no answer and an unreadable success are temporary (maybe delivered
    /// unless the request never left); the platform's error goes through `api`.
    pub(crate) fn into_send_error(self, api: impl FnOnce(A) -> SendError) -> SendError {
        match self {
            Self::Network { message, sent } => SendError::Transient {
                message,
                maybe_delivered: sent,
            },
            Self::Api(a) => api(a),
            Self::BadAnswer(message) => SendError::Transient {
                message,
                maybe_delivered: true,
            },
        }
    }

    /// The receiving side's error: no answer is temporary, an unreadable success a protocol
    /// error; the platform's error goes through `api`.
    pub(crate) fn into_channel_error(self, api: impl FnOnce(A) -> ChannelError) -> ChannelError {
        match self {
            Self::Network { message, .. } => ChannelError::Transient(message),
            Self::Api(a) => api(a),
            Self::BadAnswer(message) => ChannelError::Protocol(message),
        }
    }
}

/// Reads an answer's body, at most `max` bytes: a larger one is [`CallError::BadAnswer`], a
/// failure while reading [`CallError::Network`] (the request had arrived).
pub(crate) async fn read_answer<A>(
    what: &str,
    resp: &mut Response,
    max: usize,
    secrets: &[&str],
) -> Result<Vec<u8>, CallError<A>> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(CallError::BadAnswer(format!(
                        "{what}: the answer is larger than {max} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(CallError::network(what, e, true, secrets)),
        }
    }
}

// ---- Attachment downloads ----

/// Refuses an attachment whose size, as announced, is over `max_bytes`.
pub(crate) fn check_size(size: Option<u64>, max_bytes: u64) -> Result<(), ChannelError> {
    if size.is_some_and(|n| n > max_bytes) {
        Err(ChannelError::TooLarge { max_bytes })
    } else {
        Ok(())
    }
}

/// Sends a download request; a failure is temporary (its text scrubbed of `secrets`).
pub(crate) async fn send_download(
    req: RequestBuilder,
    what: &str,
    secrets: &[&str],
) -> Result<Response, ChannelError> {
    req.send()
        .await
        .map_err(|e| ChannelError::Transient(failure_text(what, e, secrets)))
}

/// The error of a download answered with the unsuccessful `status`: 429 and 5xx are
/// temporary, anything else is refused, with `hint` (what the status means on this platform)
/// in parentheses.
pub(crate) fn download_refused(what: &str, status: u16, hint: Option<&str>) -> ChannelError {
    if status >= 500 || status == 429 {
        return ChannelError::Transient(format!("{what}: HTTP {status}"));
    }
    ChannelError::Protocol(match hint {
        Some(h) => format!("{what}: HTTP {status} ({h})"),
        None => format!("{what}: HTTP {status}"),
    })
}

/// Reads a download's body, at most `max_bytes`: the announced `Content-Length` first, then
/// the bytes as they come, so a larger file is [`ChannelError::TooLarge`] without being read
/// whole. A failure while reading is temporary.
pub(crate) async fn read_download(
    mut resp: Response,
    what: &str,
    max_bytes: u64,
    secrets: &[&str],
) -> Result<Vec<u8>, ChannelError> {
    check_size(resp.content_length(), max_bytes)?;
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ChannelError::Transient(failure_text(what, e, secrets)))?
    {
        if u64::try_from(body.len() + chunk.len()).unwrap_or(u64::MAX) > max_bytes {
            return Err(ChannelError::TooLarge { max_bytes });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A whole download: sends `req`, refuses an unsuccessful answer ([`download_refused`], with
/// `hint(status)`), and reads at most `max_bytes` ([`read_download`]).
pub(crate) async fn download(
    req: RequestBuilder,
    what: &str,
    max_bytes: u64,
    secrets: &[&str],
    hint: impl Fn(u16) -> Option<&'static str>,
) -> Result<Vec<u8>, ChannelError> {
    let resp = send_download(req, what, secrets).await?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(download_refused(what, status, hint(status)));
    }
    read_download(resp, what, max_bytes, secrets).await
}

/// Whether an attachment may be downloaded from `url`: on the API root's own origin (scheme,
/// host and port: a local proxy, the fake in tests), or over `https` on port 443 of one of
/// `hosts` (an entry starting with `.` stands for every subdomain of the rest). Never a URL
/// with a user name or password.
pub(crate) fn may_download(url: &Url, api_base: &Url, hosts: &[&str]) -> bool {
    if !url.username().is_empty() || url.password().is_some() {
        return false;
    }
    let Some(host) = url.host_str() else {
        return false;
    };
    let same_origin = url.scheme() == api_base.scheme()
        && api_base
            .host_str()
            .is_some_and(|h| h.eq_ignore_ascii_case(host))
        && url.port_or_known_default() == api_base.port_or_known_default();
    let listed = url.scheme() == "https"
        && url.port_or_known_default() == Some(443)
        && hosts.iter().any(|h| match h.strip_prefix('.') {
            Some(_) => ends_with_ignore_case(host, h),
            None => host.eq_ignore_ascii_case(h),
        });
    same_origin || listed
}

fn ends_with_ignore_case(s: &str, suffix: &str) -> bool {
    s.len() >= suffix.len()
        && s.get(s.len() - suffix.len()..)
            .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
}

// ---- API roots ----

/// The address `host` names, if it is an IP address (`[::1]` included).
pub(crate) fn host_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
}

/// `host` is `localhost` or a loopback address.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host_ip(host).is_some_and(|ip| ip.is_loopback())
}

/// The URL's host is `localhost` or a loopback address.
pub(crate) fn is_loopback(url: &Url) -> bool {
    url.host_str().is_some_and(is_loopback_host)
}

/// Refuses an API root with a user name, a password, a query or a fragment. `field` names the
/// setting in the message.
pub(crate) fn check_root_parts(url: &Url, field: &str) -> Result<(), ConfigError> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::Invalid(format!(
            "`{field}` must not contain a user name or password"
        )));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::Invalid(format!(
            "`{field}` must not have a query or fragment"
        )));
    }
    Ok(())
}

/// Checks an API root ([`check_root_parts`]) and its scheme: `https`, or plain `http` only on
/// a loopback address (tests, a local server), so `credential` ("the token") never crosses a
/// network in clear.
pub(crate) fn check_api_root(url: &Url, field: &str, credential: &str) -> Result<(), ConfigError> {
    check_root_parts(url, field)?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(ConfigError::Invalid(format!(
            "`{field}` {url} is plain http on a non-loopback host: {credential} would cross the \
             network in clear; use https"
        ))),
        other => Err(ConfigError::Invalid(format!(
            "`{field}` has the scheme {other:?}: use https"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn every_secret_is_scrubbed_and_empty_ones_are_ignored() {
        let out = redact("a TOKEN b APP c".into(), &["TOKEN", "", "APP"]);
        assert_eq!(out, "a <redacted> b <redacted> c");
    }

    #[test]
    fn downloads_go_to_the_api_origin_or_a_listed_https_host_only() {
        let api = Url::parse("http://127.0.0.1:8080/api").unwrap();
        let ok = |u: &str| {
            may_download(
                &Url::parse(u).unwrap(),
                &api,
                &["files.example", ".cdn.example"],
            )
        };
        assert!(ok("http://127.0.0.1:8080/files/1"));
        assert!(ok("https://files.example/f"));
        assert!(ok("https://FILES.example:443/f"));
        assert!(ok("https://a.cdn.example/f"));
        assert!(
            !ok("https://cdn.example/f"),
            "the bare suffix is not a subdomain"
        );
        assert!(!ok("https://evilcdn.example/f"));
        assert!(!ok("http://files.example/f"), "plain http");
        assert!(!ok("https://files.example:8443/f"), "another port");
        assert!(
            !ok("http://127.0.0.1:8081/f"),
            "another port of the API host"
        );
        assert!(!ok("https://user:pw@files.example/f"), "credentials");
        assert!(!ok("http://user@127.0.0.1:8080/f"), "credentials");
    }

    #[test]
    fn a_download_refusal_is_temporary_only_for_429_and_5xx() {
        assert_eq!(
            download_refused("d", 503, Some("x")),
            ChannelError::Transient("d: HTTP 503".into())
        );
        assert_eq!(
            download_refused("d", 429, None),
            ChannelError::Transient("d: HTTP 429".into())
        );
        assert_eq!(
            download_refused("d", 404, Some("links expire")),
            ChannelError::Protocol("d: HTTP 404 (links expire)".into())
        );
    }

    #[test]
    fn api_roots_are_https_or_loopback_http_without_credentials_query_or_fragment() {
        let check = |u: &str| check_api_root(&Url::parse(u).unwrap(), "api_base", "the token");
        check("https://api.example").unwrap();
        check("http://127.0.0.1:9/").unwrap();
        check("http://[::1]:9/").unwrap();
        check("http://localhost:9/").unwrap();
        let err = check("http://api.example").unwrap_err().to_string();
        assert!(
            err.contains("plain http on a non-loopback host: the token would"),
            "{err}"
        );
        assert!(check("ftp://127.0.0.1/").is_err());
        assert!(check("https://u:p@api.example/").is_err());
        assert!(check("https://api.example/?a=1").is_err());
        assert!(check("https://api.example/#f").is_err());
    }
}
