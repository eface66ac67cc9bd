//! `web_fetch`: an HTTP(S) request made by the gateway for the agent.
//!
//! Invariants:
//! - The gate and the fetch see the same addresses: a host is resolved once, the result is
//!   cached for [`PIN_TTL`], Cedar judges it (`private_address` is true when *any* address is
//!   loopback, private, link-local, CGNAT, multicast, unspecified or otherwise non-public), and
//!   the request connects only to those cached addresses (no second DNS lookup an attacker's
//!   resolver could answer differently).
//! - Redirects are not followed: the answer carries the `Location`, and following it is a new,
//!   separately decided call.
//! - Bodies are capped ([`MAX_RESPONSE_BYTES`]); only the text the model will see is returned.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ToolError, ToolResult};
use crate::gate::Authorized;

/// How long a resolution is reused (the gate's decision and the fetch must agree).
pub const PIN_TTL: Duration = Duration::from_secs(60);
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
        if self
            .body
            .as_ref()
            .is_some_and(|b| b.len() > MAX_REQUEST_BYTES)
        {
            return Err(ToolError::InvalidArgs(format!(
                "body is larger than {MAX_REQUEST_BYTES} bytes"
            )));
        }
        FetchTarget::parse(&self.url).map_err(ToolError::InvalidArgs)?;
        Ok(self)
    }
}

/// A URL with the addresses its host resolved to.
#[derive(Debug, Clone)]
pub struct FetchTarget {
    pub url: Url,
    pub host: String,
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
}

type PinCache = Mutex<HashMap<(String, u16), (Instant, Vec<SocketAddr>)>>;

fn pins() -> &'static PinCache {
    static PINS: OnceLock<PinCache> = OnceLock::new();
    PINS.get_or_init(|| Mutex::new(HashMap::new()))
}

impl FetchTarget {
    fn parse(url: &str) -> Result<(Url, String, u16), String> {
        let u = Url::parse(url).map_err(|e| format!("invalid url: {e}"))?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(format!(
                "scheme `{}` is not allowed; use http or https",
                u.scheme()
            ));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err("credentials in the url are not allowed".into());
        }
        let host = u
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the url has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = u
            .port_or_known_default()
            .ok_or("the url has no port and its scheme has no default")?;
        Ok((u, host, port))
    }

    /// Parses `url` and resolves its host (reusing a resolution younger than [`PIN_TTL`]).
    pub fn resolve(url: &str) -> Result<Self, String> {
        let (url, host, port) = Self::parse(url)?;
        let key = (host.clone(), port);
        let now = Instant::now();
        if let Ok(cache) = pins().lock()
            && let Some((at, addrs)) = cache.get(&key)
            && now.duration_since(*at) < PIN_TTL
        {
            return Ok(Self {
                url,
                host,
                port,
                addrs: addrs.clone(),
            });
        }
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
            .collect();
        if addrs.is_empty() {
            return Err(format!("`{host}` resolves to no address"));
        }
        if let Ok(mut cache) = pins().lock() {
            if cache.len() > 1024 {
                cache.retain(|_, (at, _)| now.duration_since(*at) < PIN_TTL);
            }
            cache.insert(key, (now, addrs.clone()));
        }
        Ok(Self {
            url,
            host,
            port,
            addrs,
        })
    }

    /// True when any address is not a public unicast address.
    pub fn private_address(&self) -> bool {
        self.addrs.iter().any(|a| !is_public(a.ip()))
    }
}

/// Whether `ip` is a public unicast address (not loopback, private, link-local, shared,
/// documentation, multicast, unspecified, reserved; IPv4-mapped and NAT64 forms judged by
/// the IPv4 address inside).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || s[..6].iter().all(|x| *x == 0))
        }
    }
}

/// Makes the request an `Authorized` covers, connecting only to the pinned addresses.
pub fn fetch(auth: &Authorized, args: &WebFetchArgs) -> Result<ToolResult, ToolError> {
    let norm = serde_json::to_value(args).map_err(|e| ToolError::InvalidArgs(e.to_string()))?;
    if auth.action() != "Chitin::Action::\"web_fetch\"" {
        return Err(ToolError::WrongAction {
            want: "web_fetch",
            got: auth.action().to_string(),
        });
    }
    if !auth.covers_args(&norm) {
        return Err(ToolError::ArgsNotAuthorized { tool: "web_fetch" });
    }
    let target = FetchTarget::resolve(&args.url).map_err(ToolError::InvalidArgs)?;
    let started = Instant::now();
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        ToolError::InvalidArgs("web_fetch needs the gateway's async runtime".into())
    })?;
    let method = reqwest::Method::from_bytes(args.method.as_bytes())
        .map_err(|e| ToolError::InvalidArgs(e.to_string()))?;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .no_proxy()
        .resolve_to_addrs(&target.host, &target.addrs)
        .user_agent(concat!("chitin/", env!("CARGO_PKG_VERSION")))
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
    fn loopback_private_and_mapped_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip} must not be public");
        }
        for ip in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip} is public");
        }
    }

    #[test]
    fn a_loopback_url_is_judged_private_and_pinned() {
        let t = FetchTarget::resolve("http://127.0.0.1:9/x").unwrap();
        assert!(t.private_address());
        assert_eq!(t.addrs, vec!["127.0.0.1:9".parse().unwrap()]);
        let t = FetchTarget::resolve("http://localhost:9/").unwrap();
        assert!(t.private_address());
    }

    #[test]
    fn urls_with_other_schemes_or_credentials_are_refused() {
        assert!(FetchTarget::resolve("file:///etc/passwd").is_err());
        assert!(FetchTarget::resolve("http://user:pw@example.com/").is_err());
        let bad = WebFetchArgs {
            url: "http://127.0.0.1/".into(),
            method: "TRACE".into(),
            body: None,
        };
        assert!(bad.normalize().is_err());
    }
}
