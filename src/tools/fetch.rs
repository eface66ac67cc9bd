//! `web_fetch`: an HTTP(S) request made by the gateway for the agent.
//!
//! Invariants:
//! - No network before the decision: the gate decides on the URL as written, resolves the
//!   host only after that allow, and decides again on every resolved address (see
//!   `Gate::check_tool_call`).
//! - The gate and the fetch see the same addresses: the `Authorized` carries the addresses the
//!   second decision judged, and the request connects only to those (this module never
//!   resolves a name; there is no second DNS lookup an attacker's resolver could answer
//!   differently).
//! - Redirects are not followed: the answer carries the `Location`, and following it is a new,
//!   separately decided call.
//! - Bodies are capped ([`MAX_RESPONSE_BYTES`]); only the text the model will see is returned.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ToolError, ToolResult};
use crate::gate::Authorized;
use crate::net::WebUrl;
use crate::policy::Tool;

/// Upper bound on the response body read.
pub const MAX_RESPONSE_BYTES: usize = 512 * 1024;
/// Upper bound on a request body.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(20);

/// `web_fetch` arguments.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebFetchArgs {
    pub url: String,
    /// GET (default), HEAD, POST, PUT, PATCH or DELETE.
    #[serde(default = "default_method")]
    pub method: String,
    /// Request body (text), for POST/PUT/PATCH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

impl WebFetchArgs {
    /// Normalizes and checks the arguments (method known and upper case, body size).
    pub fn normalize(mut self) -> Result<Self, ToolError> {
        self.method = self.method.to_ascii_uppercase();
        if !["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"].contains(&self.method.as_str()) {
            return Err(ToolError::InvalidArgs(format!(
                "method `{}` is not supported; use GET, HEAD, POST, PUT, PATCH or DELETE",
                self.method.escape_default()
            )));
        }
        // A body goes only with the methods that carry one (and that the default policies send
        // for approval): a GET or HEAD with a body would move data out without one.
        if self.body.is_some() && !["POST", "PUT", "PATCH"].contains(&self.method.as_str()) {
            return Err(ToolError::InvalidArgs(format!(
                "a request body is sent only with POST, PUT or PATCH, not {}",
                self.method
            )));
        }
        if self
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BYTES)
        {
            return Err(ToolError::InvalidArgs(format!(
                "body is larger than {MAX_REQUEST_BYTES} bytes"
            )));
        }
        WebUrl::parse(&self.url).map_err(ToolError::InvalidArgs)?;
        Ok(self)
    }
}

/// The only resolver a `web_fetch` client has: the judged host's pinned addresses, nothing
/// else (see [`fetch`]).
struct PinnedResolver {
    host: String,
    addrs: Vec<std::net::SocketAddr>,
}

/// A host name as DNS compares it: ASCII case folded, trailing dots removed.
fn dns_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let answer: Result<reqwest::dns::Addrs, Box<dyn std::error::Error + Send + Sync>> =
            if dns_key(name.as_str()) == self.host {
                Ok(Box::new(self.addrs.clone().into_iter()))
            } else {
                Err(format!(
                    "web_fetch resolves only the host the gate judged, not `{}`",
                    name.as_str().escape_default()
                )
                .into())
            };
        Box::pin(std::future::ready(answer))
    }
}

/// Makes the request an `Authorized` covers, connecting only to the pinned addresses.
pub fn fetch(auth: &Authorized, args: &WebFetchArgs) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::WebFetch, args)?;
    let target = WebUrl::parse(&args.url).map_err(ToolError::InvalidArgs)?;
    let pinned = auth.pinned_addrs();
    if pinned.is_empty() || pinned.iter().any(|a| a.port() != target.port) {
        return Err(ToolError::InvalidArgs(
            "the authorization carries no resolved addresses for this url; ask the gate for this exact call".into(),
        ));
    }
    let started = Instant::now();
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        ToolError::InvalidArgs("web_fetch needs the gateway's async runtime".into())
    })?;
    let method = reqwest::Method::from_bytes(args.method.as_bytes())
        .map_err(|e| ToolError::InvalidArgs(e.to_string()))?;
    // The process's one lazily loaded root store, not one load of the system's roots per call.
    let tls = crate::net::client_tls().map_err(ToolError::InvalidArgs)?;
    let mut builder = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .user_agent(concat!("chitin/", env!("CARGO_PKG_VERSION")));
    // Nothing here ever asks DNS: the client's only resolver answers the name the gate judged
    // (in any spelling reqwest may pass: letter case, a trailing dot) with the pinned addresses
    // and refuses every other name, so no fallback to the system resolver exists. An IP
    // literal is its own single pinned address.
    if let Some(host) = target.host_name() {
        builder = builder.dns_resolver(PinnedResolver {
            host: dns_key(host),
            addrs: pinned.to_vec(),
        });
    } else if target
        .ip
        .map(|ip| std::net::SocketAddr::new(ip, target.port))
        != pinned.first().copied()
    {
        return Err(ToolError::InvalidArgs(
            "the authorization was given for another address; ask the gate for this exact call"
                .into(),
        ));
    }
    let client = builder
        .build()
        .map_err(|e| ToolError::InvalidArgs(format!("http client: {e}")))?;
    let mut req = client.request(method, target.url.clone());
    if let Some(b) = &args.body {
        req = req.body(b.clone());
    }
    let outcome = handle.block_on(async move {
        let mut resp = req.send().await?;
        let status = resp.status().as_u16();
        let header = |n: reqwest::header::HeaderName| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header(reqwest::header::CONTENT_TYPE);
        let location = header(reqwest::header::LOCATION);
        let mut body = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = resp.chunk().await? {
            let room = MAX_RESPONSE_BYTES.saturating_sub(body.len());
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                truncated = true;
                break;
            }
            body.extend_from_slice(&chunk);
        }
        Ok::<_, reqwest::Error>((status, content_type, location, body, truncated))
    });
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match outcome {
        Ok((status, content_type, location, body, truncated)) => {
            let text = String::from_utf8_lossy(&body).into_owned();
            Ok(ToolResult {
                exit_code: Some(if (200..400).contains(&status) { 0 } else { 1 }),
                signal: None,
                killed: None,
                stdout: String::new(),
                stderr: String::new(),
                truncated,
                duration_ms,
                output: Some(json!({
                    "status": status,
                    "content_type": content_type,
                    "location": location,
                    "body": text,
                })),
            })
        }
        Err(e) => Ok(ToolResult {
            exit_code: Some(1),
            signal: None,
            killed: None,
            stdout: String::new(),
            stderr: format!("request failed: {}", e.without_url()),
            truncated: false,
            duration_ms,
            output: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    #[test]
    fn the_fetch_resolver_answers_only_the_judged_host_in_any_spelling() {
        use reqwest::dns::Resolve as _;
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let r = PinnedResolver {
            host: dns_key("Pinned.Invalid"),
            addrs: vec![addr],
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for name in ["pinned.invalid", "pinned.invalid.", "PINNED.INVALID.."] {
            let got: Vec<_> = rt
                .block_on(r.resolve(name.parse().unwrap()))
                .unwrap()
                .collect();
            assert_eq!(got, vec![addr], "{name}");
        }
        for other in ["evil.tld", "pinned.invalid.evil.tld", "localhost"] {
            let e = rt
                .block_on(r.resolve(other.parse().unwrap()))
                .err()
                .unwrap();
            assert_eq!(
                e.to_string(),
                format!("web_fetch resolves only the host the gate judged, not `{other}`")
            );
        }
    }

    #[test]
    fn a_body_is_refused_with_methods_that_do_not_carry_one() {
        for m in ["GET", "get", "HEAD", "DELETE"] {
            let a = WebFetchArgs {
                url: "http://example.com/".into(),
                method: m.into(),
                body: Some("secret data".into()),
            };
            let e = a.normalize().err().unwrap();
            assert_eq!(
                e.to_string(),
                ToolError::InvalidArgs(format!(
                    "a request body is sent only with POST, PUT or PATCH, not {}",
                    m.to_ascii_uppercase()
                ))
                .to_string()
            );
        }
        let ok = WebFetchArgs {
            url: "http://example.com/".into(),
            method: "post".into(),
            body: Some("x".into()),
        };
        assert_eq!(ok.normalize().unwrap().method, "POST");
    }

    #[test]
    fn a_fetch_without_pinned_addresses_is_refused_before_any_network() {
        let auth = Authorized::for_test(
            "Chitin::User::\"a\"",
            "web_fetch",
            "Chitin::Tool::\"web_fetch\"",
        );
        let args = WebFetchArgs {
            url: "http://example.invalid/".into(),
            method: "GET".into(),
            body: None,
        };
        let e = fetch(&auth, &args).unwrap_err();
        assert!(e.to_string().contains("no resolved addresses"), "{e}");
    }

    #[test]
    fn an_authorization_for_another_action_does_not_fetch() {
        let auth = Authorized::for_test(
            "Chitin::User::\"a\"",
            "read_file",
            "Chitin::Tool::\"web_fetch\"",
        );
        let args = WebFetchArgs {
            url: "http://example.invalid/".into(),
            method: "GET".into(),
            body: None,
        };
        let e = fetch(&auth, &args).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the authorization is for `read_file`, not for `web_fetch`"
        );
    }

    #[test]
    fn methods_other_than_the_six_are_refused() {
        let bad = WebFetchArgs {
            url: "http://127.0.0.1/".into(),
            method: "TRACE".into(),
            body: None,
        };
        assert!(bad.normalize().is_err());
    }
}
