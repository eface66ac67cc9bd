//! `[tools.*]`: settings of individual agent tools.

use serde::Deserialize;

use super::secret_ref::{CredentialField, SecretRef};

pub const TEMPLATE: &str = r#"
# [tools.web_search]: where the agent's `web_search` tool sends queries. Without this section
# the tool is not offered. Each search is decided by Cedar `web_search` (context: the query,
# the backend and its host); results are untrusted and taint the session.
# [tools.web_search]
# "searxng": a SearXNG instance's JSON API (GET <api_base>/search?q=...&format=json; the
# instance must have `json` in its search formats). "brave": the Brave Search API
# (GET <api_base>/web/search?q=...).
# backend = "searxng"
# The API's base URL (https://, or http:// only for a loopback address).
# api_base = "https://searx.example.org"
# Brave only: the subscription token, as "secret:NAME" (`chitin secrets set NAME --audience
# api.search.brave.com`). It is released to Chitin::Provider::"web_search" for the api host
# through Cedar `secret.use`, and never shown to the model.
# api_key = "secret:brave_search"
# Results returned when the model does not say, and the most it may ask for.
# count = 5
# max_count = 20
# timeout_secs = 15

# [tools.browser]: the agent's `browser` tool, a headless Chromium driven over the DevTools
# protocol inside the sandbox (its own directory under workspaces/, its profile in the
# sandbox's private /tmp, network only through the gateway's egress proxy). Offered when the
# binary below is installed; `chitin security audit` reports `tools.browser_unavailable`
# otherwise. Every navigation (the `navigate` call, links, forms, redirects, frames) is
# decided by Cedar `browser.navigate`; the other actions by `browser.interact`.
# [tools.browser]
# enabled = true
# chromium = "/usr/bin/chromium"
# Stop a session's browser after this long without a call, and after this long in any case.
# idle_secs = 300
# lifetime_secs = 3600
# Limits of the browser's sandbox (Chromium needs more than a command does).
# memory_mb = 2048
# max_procs = 512
# tmp_size_mb = 512
# How long one action may take, and the browser's start.
# timeout_secs = 30
# start_timeout_secs = 30
# The most page text one snapshot returns (KiB), and the largest download kept (MiB; downloads
# go to the workspace's inbox/).
# max_text_kib = 64
# max_download_mb = 50
"#;

/// The `[tools]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ToolsConfig {
    pub web_search: Option<WebSearchConfig>,
    pub browser: BrowserConfig,
}

/// `[tools.browser]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct BrowserConfig {
    pub enabled: bool,
    /// The Chromium binary (absolute path).
    pub chromium: String,
    pub idle_secs: u64,
    pub lifetime_secs: u64,
    pub memory_mb: u64,
    pub max_procs: u64,
    /// The sandbox's private /tmp (profile, caches, shared memory), MiB.
    pub tmp_size_mb: u64,
    pub timeout_secs: u64,
    pub start_timeout_secs: u64,
    pub max_text_kib: u64,
    pub max_download_mb: u64,
}

impl Default for BrowserConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            chromium: "/usr/bin/chromium".into(),
            idle_secs: 300,
            lifetime_secs: 3600,
            memory_mb: 2048,
            max_procs: 512,
            tmp_size_mb: 512,
            timeout_secs: 30,
            start_timeout_secs: 30,
            max_text_kib: 64,
            max_download_mb: 50,
        }
    }
}

impl BrowserConfig {
    /// Checks the section's numbers.
    pub fn validate(&self) -> Result<(), String> {
        if !self.chromium.starts_with('/') {
            return Err("[tools.browser] chromium must be an absolute path".into());
        }
        let checks = [
            ("idle_secs", self.idle_secs, 10, 86_400),
            ("lifetime_secs", self.lifetime_secs, 60, 86_400),
            ("memory_mb", self.memory_mb, 256, 65_536),
            ("max_procs", self.max_procs, 16, 4096),
            ("tmp_size_mb", self.tmp_size_mb, 64, 16_384),
            ("timeout_secs", self.timeout_secs, 1, 600),
            ("start_timeout_secs", self.start_timeout_secs, 1, 600),
            ("max_text_kib", self.max_text_kib, 1, 4096),
            ("max_download_mb", self.max_download_mb, 1, 4096),
        ];
        for (k, v, lo, hi) in checks {
            if !(lo..=hi).contains(&v) {
                return Err(format!("[tools.browser] {k} must be {lo}..={hi}"));
            }
        }
        Ok(())
    }
}

/// A search backend.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SearchBackend {
    Searxng,
    Brave,
}

impl SearchBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Searxng => "searxng",
            Self::Brave => "brave",
        }
    }
}

/// `[tools.web_search]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebSearchConfig {
    pub backend: SearchBackend,
    pub api_base: String,
    #[serde(default)]
    pub api_key: Option<CredentialField>,
    #[serde(default = "default_count")]
    pub count: u32,
    #[serde(default = "default_max_count")]
    pub max_count: u32,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_count() -> u32 {
    5
}
fn default_max_count() -> u32 {
    20
}
fn default_timeout() -> u64 {
    15
}

impl WebSearchConfig {
    /// Checks the section: an `api_base` with a host (https, or http for loopback), the key
    /// Brave needs (a `secret:` reference), counts that make sense.
    pub fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.api_base).map_err(|e| {
            format!("[tools.web_search] api_base is not a URL ({e}); write e.g. \"https://searx.example.org\"")
        })?;
        let host = url.host_str().unwrap_or("");
        if host.is_empty() {
            return Err("[tools.web_search] api_base has no host".into());
        }
        let loopback = host == "localhost"
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => {
                return Err(
                    "[tools.web_search] api_base must be https:// (http:// only for a loopback address)"
                        .into(),
                );
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "[tools.web_search] api_base must not carry credentials; use api_key = \"secret:NAME\""
                    .into(),
            );
        }
        match (&self.backend, &self.api_key) {
            (SearchBackend::Brave, None) => {
                return Err("[tools.web_search] backend \"brave\" needs api_key = \"secret:NAME\" (its subscription token)".into());
            }
            (_, Some(CredentialField(SecretRef::Env(_)))) => {
                return Err("[tools.web_search] api_key must be \"secret:NAME\" (store it with `chitin secrets set NAME --audience HOST`)".into());
            }
            _ => {}
        }
        if self.count == 0 || self.count > self.max_count || self.max_count > 100 {
            return Err("[tools.web_search] needs 1 <= count <= max_count <= 100".into());
        }
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return Err("[tools.web_search] timeout_secs must be 1..=300".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn parse(t: &str) -> Result<WebSearchConfig, String> {
        let c: WebSearchConfig = toml::from_str(t).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn a_searxng_backend_needs_only_its_base_and_brave_needs_a_secret_key() {
        let c = parse("backend = \"searxng\"\napi_base = \"http://127.0.0.1:8888\"").unwrap();
        assert_eq!((c.count, c.max_count), (5, 20));
        let e = parse("backend = \"brave\"\napi_base = \"https://api.search.brave.com/res/v1\"")
            .unwrap_err();
        assert!(e.contains("needs api_key"), "{e}");
        parse("backend = \"brave\"\napi_base = \"https://api.search.brave.com/res/v1\"\napi_key = \"secret:brave\"").unwrap();
        // Through the whole file, as `chitin` reads it: the credential is never echoed.
        let e = crate::config::Config::parse(
            "[tools.web_search]\nbackend = \"brave\"\napi_base = \"https://x.example\"\napi_key = \"sk-literal-value\"\n",
            std::path::Path::new("chitin.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("literal credential"), "{e}");
        assert!(!e.contains("sk-literal-value"), "{e}");
    }

    #[test]
    fn plain_http_is_refused_except_on_loopback() {
        let e =
            parse("backend = \"searxng\"\napi_base = \"http://searx.example.org\"").unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let e = parse("backend = \"bing\"\napi_base = \"https://x\"").unwrap_err();
        assert!(e.contains("unknown variant"), "{e}");
    }
}
