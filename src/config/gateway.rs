//! The `[gateway]` section of `chitin.toml`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Documentation and defaults for the `[gateway]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[gateway]
# Address the gateway listens on (`chitin gateway --bind` overrides it). A non-loopback address
# is refused unless tls_cert and tls_key are set (or put a TLS-terminating reverse proxy on
# loopback in front and list it in trusted_proxies).
bind = "127.0.0.1:18789"
# The user the gateway token acts for: requests carry the Cedar principal Chitin::User::"<owner>".
owner = "owner"
# Peer addresses (IPs) of reverse proxies whose X-Forwarded-For header is believed for the
# client address (rate limiting, logs). Empty: the TCP peer address is always the client.
trusted_proxies = []
# PEM certificate chain and private key (PKCS#8, PKCS#1 or SEC1) for HTTPS (rustls, TLS 1.2/1.3).
# Both or neither; relative paths are in the state directory. Read at start (restart to change).
tls_cert = ""
tls_key = ""
# The agent workspace tool calls run in. Empty: "chitin-workspace" next to the state directory
# (~/chitin-workspace for ~/.chitin), created 0700. It may not overlap the state directory.
workspace = ""
# Failed authentications allowed per client (an IPv4 address, or an IPv6 /64) within
# auth_window_secs; after that, that client's *failed* attempts are answered 429 for
# auth_lockout_secs. A request with the right token is never refused. Requests from other
# sites' pages (a foreign Origin, Sec-Fetch-Site cross-site, CORS preflights) are refused
# (403) and do not count. Failures are audited once per client and window plus one summary
# with their count.
auth_max_failures = 5
auth_window_secs = 60
auth_lockout_secs = 300
# Largest request body accepted, in KiB (larger: 400 body_too_large).
max_body_kib = 1024
# Seconds a client has to send a complete request head; a slower one (slowloris) has its
# connection closed.
header_timeout_secs = 10
# On SIGTERM, how long in-flight requests may take to finish before the gateway stops anyway.
shutdown_grace_secs = 10
# Extra browser origins (scheme://host[:port]) allowed to open the WebSocket at /ws, e.g. the
# https origin of a reverse proxy in front of the gateway. The gateway's own origins
# (http(s)://127.0.0.1:PORT, http(s)://localhost:PORT, http(s)://[::1]:PORT and the bind
# address) are always allowed; a request without Origin (not a browser) is allowed; any other
# Origin is refused with 403 before the upgrade.
allowed_origins = []
# Largest WebSocket message accepted, in KiB. A larger one is answered with a frame_too_large
# error and the connection stays open; one over 4 times this closes the connection (1009).
ws_max_frame_kib = 256
# Seconds a new WebSocket connection has to send its `connect` request with the token.
ws_connect_timeout_secs = 10
# Seconds between server pings; a connection silent for 3 intervals is closed.
ws_ping_interval_secs = 20
# Most WebSocket connections open at once (more: 503 before the upgrade).
ws_max_connections = 256
"#;

/// The `[gateway]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    pub bind: String,
    pub owner: String,
    pub trusted_proxies: Vec<String>,
    pub tls_cert: String,
    pub tls_key: String,
    pub workspace: String,
    pub auth_max_failures: u32,
    pub auth_window_secs: u64,
    pub auth_lockout_secs: u64,
    pub max_body_kib: usize,
    pub header_timeout_secs: u64,
    pub shutdown_grace_secs: u64,
    pub allowed_origins: Vec<String>,
    pub ws_max_frame_kib: usize,
    pub ws_connect_timeout_secs: u64,
    pub ws_ping_interval_secs: u64,
    pub ws_max_connections: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:18789".into(),
            owner: "owner".into(),
            trusted_proxies: Vec::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            workspace: String::new(),
            auth_max_failures: 5,
            auth_window_secs: 60,
            auth_lockout_secs: 300,
            max_body_kib: 1024,
            header_timeout_secs: 10,
            shutdown_grace_secs: 10,
            allowed_origins: Vec::new(),
            ws_max_frame_kib: 256,
            ws_connect_timeout_secs: 10,
            ws_ping_interval_secs: 20,
            ws_max_connections: 256,
        }
    }
}

impl GatewayConfig {
    /// Checks the values that can be checked without touching the network or files.
    pub fn validate(&self) -> Result<(), String> {
        self.bind_addr(None)?;
        self.proxies()?;
        if self.owner.trim().is_empty() {
            return Err("[gateway] owner may not be empty".into());
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err("[gateway] tls_cert and tls_key must be set together".into());
        }
        if self.auth_max_failures == 0 {
            return Err("[gateway] auth_max_failures must be at least 1".into());
        }
        if self.header_timeout_secs == 0 {
            return Err("[gateway] header_timeout_secs must be at least 1".into());
        }
        self.origins()?;
        if self.ws_max_frame_kib == 0 || self.ws_max_frame_kib > 16 * 1024 {
            return Err("[gateway] ws_max_frame_kib must be between 1 and 16384".into());
        }
        if self.ws_connect_timeout_secs == 0 || self.ws_ping_interval_secs == 0 {
            return Err(
                "[gateway] ws_connect_timeout_secs and ws_ping_interval_secs must be at least 1"
                    .into(),
            );
        }
        if self.ws_max_connections == 0 {
            return Err("[gateway] ws_max_connections must be at least 1".into());
        }
        Ok(())
    }

    /// The extra allowed WebSocket origins, normalized (`scheme://host[:port]`, lowercase,
    /// no trailing slash).
    pub fn origins(&self) -> Result<Vec<String>, String> {
        self.allowed_origins
            .iter()
            .map(|o| {
                normalize_origin(o).ok_or_else(|| {
                    format!(
                        "[gateway] allowed_origins: {o:?} is not an origin; write scheme://host[:port] with scheme http or https and no path (e.g. https://chat.example.com)"
                    )
                })
            })
            .collect()
    }

    /// The listen address (`over` is the `--bind` flag).
    pub fn bind_addr(&self, over: Option<&str>) -> Result<SocketAddr, String> {
        let s = over.unwrap_or(&self.bind);
        s.parse().map_err(|_| {
            format!("[gateway] bind {s:?} is not an IP:PORT address (e.g. 127.0.0.1:18789)")
        })
    }

    /// The trusted proxy addresses.
    pub fn proxies(&self) -> Result<Vec<IpAddr>, String> {
        self.trusted_proxies
            .iter()
            .map(|p| {
                p.parse()
                    .map_err(|_| format!("[gateway] trusted_proxies: {p:?} is not an IP address"))
            })
            .collect()
    }

    /// Whether TLS is configured.
    pub fn tls(&self) -> bool {
        !self.tls_cert.is_empty() && !self.tls_key.is_empty()
    }

    /// The workspace directory for a state dir `home`.
    pub fn workspace_dir(&self, home: &Path) -> PathBuf {
        if !self.workspace.is_empty() {
            let p = Path::new(&self.workspace);
            return if p.is_absolute() {
                p.to_path_buf()
            } else {
                home.join(p)
            };
        }
        match home.parent() {
            Some(parent) => parent.join("chitin-workspace"),
            None => PathBuf::from("/chitin-workspace"),
        }
    }
}

/// `scheme://host[:port]` with scheme `http`/`https`, lowercased, without a trailing slash;
/// `None` for anything else (paths, queries, credentials, other schemes, `null`).
pub fn normalize_origin(o: &str) -> Option<String> {
    let o = o.trim().trim_end_matches('/').to_ascii_lowercase();
    let rest = o
        .strip_prefix("http://")
        .or_else(|| o.strip_prefix("https://"))?;
    let ok = !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    ok.then_some(o)
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
    fn the_default_workspace_is_next_to_the_state_dir_not_inside_it() {
        let c = GatewayConfig::default();
        let ws = c.workspace_dir(Path::new("/home/a/.chitin"));
        assert_eq!(ws, Path::new("/home/a/chitin-workspace"));
        assert!(!ws.starts_with("/home/a/.chitin"));
    }

    #[test]
    fn a_bad_bind_address_or_proxy_is_an_error_naming_it() {
        let c = GatewayConfig {
            bind: "localhost".into(),
            ..GatewayConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("localhost"));
        let c = GatewayConfig {
            trusted_proxies: vec!["proxy.local".into()],
            ..GatewayConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("proxy.local"));
    }

    #[test]
    fn an_allowed_origin_must_be_scheme_host_port_and_is_normalized() {
        let c = GatewayConfig {
            allowed_origins: vec![
                "HTTPS://Chat.Example.com/".into(),
                "http://[::1]:8080".into(),
            ],
            ..GatewayConfig::default()
        };
        assert_eq!(
            c.origins().unwrap(),
            ["https://chat.example.com", "http://[::1]:8080"]
        );
        for bad in [
            "chat.example.com",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "null",
            "https://",
        ] {
            let c = GatewayConfig {
                allowed_origins: vec![bad.into()],
                ..GatewayConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert!(e.contains("allowed_origins"), "{bad}: {e}");
        }
    }

    #[test]
    fn websocket_limits_of_zero_are_errors() {
        for c in [
            GatewayConfig {
                ws_max_frame_kib: 0,
                ..GatewayConfig::default()
            },
            GatewayConfig {
                ws_connect_timeout_secs: 0,
                ..GatewayConfig::default()
            },
            GatewayConfig {
                ws_max_connections: 0,
                ..GatewayConfig::default()
            },
        ] {
            assert!(c.validate().unwrap_err().contains("ws_"));
        }
    }

    #[test]
    fn a_certificate_without_a_key_is_an_error() {
        let c = GatewayConfig {
            tls_cert: "/c.pem".into(),
            ..GatewayConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("together"));
    }
}
