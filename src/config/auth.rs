//! The `[auth]` section of `chitin.toml`: browser sessions, device pairing, single sign-on
//! (`[auth.oidc]`) and a trusted identity proxy (`[auth.proxy]`).

use serde::{Deserialize, Deserializer};

use super::secret_ref::{CredentialField, SecretName, SecretRef};

/// Documentation and defaults for the `[auth]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[auth]
# Browser sessions (after a single sign-on login): the session ends after this many seconds
# without a request, and after session_max_secs whatever happens. Logging out
# (POST /auth/logout) and removing the user (`chitin users remove`) end it at once.
session_idle_secs = 3600
session_max_secs = 43200
# A new browser that signs in from an address that is not loopback is held as a pending
# device until an owner approves it (`chitin devices approve ID`, Cedar `pairing.approve`).
device_pairing = true

# Single sign-on for the Control UI: OpenID Connect authorization-code flow with PKCE.
# Empty issuer = off. The issuer must be https://, except a loopback one
# (http://127.0.0.1:PORT) for local identity providers and tests. Discovery reads
# <issuer>/.well-known/openid-configuration.
[auth.oidc]
issuer = ""
client_id = ""
# "secret:NAME" (released by Cedar `secret.use` for Chitin::Provider::"oidc" to the token
# endpoint's host: `chitin secrets set NAME --audience <that host>`); "" = a public client
# (PKCE only).
client_secret = ""
# The gateway's callback as registered with the identity provider, e.g.
# "https://chitin.example.com/auth/callback".
redirect_uri = ""
# The ID token claim that names the Cedar user (Chitin::User::"<value>") and the claim that
# lists the user's groups (each a Chitin::Group parent).
user_claim = "email"
groups_claim = "groups"
scopes = ["openid", "email", "profile"]

# A trusted identity proxy in front of the gateway (oauth2-proxy, Cloudflare Access): it sends
# a signed JWT in `header`, verified against its JWKS with `issuer` and `audience`. A bare
# unsigned user header is never accepted. Empty header = off.
[auth.proxy]
header = ""
jwks_url = ""
issuer = ""
audience = ""
user_claim = "email"
groups_claim = "groups"
"#;

/// The `[auth]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub session_idle_secs: u64,
    pub session_max_secs: u64,
    pub device_pairing: bool,
    pub oidc: OidcConfig,
    pub proxy: ProxyConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_idle_secs: 3600,
            session_max_secs: 43_200,
            device_pairing: true,
            oidc: OidcConfig::default(),
            proxy: ProxyConfig::default(),
        }
    }
}

/// `[auth.oidc]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct OidcConfig {
    pub issuer: String,
    pub client_id: String,
    #[serde(deserialize_with = "client_secret")]
    pub client_secret: Option<CredentialField>,
    pub redirect_uri: String,
    pub user_claim: String,
    pub groups_claim: String,
    pub scopes: Vec<String>,
}

impl Default for OidcConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            client_id: String::new(),
            client_secret: None,
            redirect_uri: String::new(),
            user_claim: "email".into(),
            groups_claim: "groups".into(),
            scopes: vec!["openid".into(), "email".into(), "profile".into()],
        }
    }
}

/// `[auth.proxy]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    pub header: String,
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    pub user_claim: String,
    pub groups_claim: String,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            header: String::new(),
            jwks_url: String::new(),
            issuer: String::new(),
            audience: String::new(),
            user_claim: "email".into(),
            groups_claim: "groups".into(),
        }
    }
}

/// The client secret: "" (none) or `secret:NAME`; never echoed.
fn client_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CredentialField>, D::Error> {
    let s = zeroize::Zeroizing::new(String::deserialize(d)?);
    if s.is_empty() {
        return Ok(None);
    }
    match SecretRef::parse_credential("auth.oidc.client_secret", &s)
        .map_err(serde::de::Error::custom)?
    {
        r @ SecretRef::Secret(_) => Ok(Some(CredentialField(r))),
        SecretRef::Env(_) => Err(serde::de::Error::custom(
            "config field `auth.oidc.client_secret` must be \"secret:NAME\": the client secret is \
             released only from the secret store, through Cedar `secret.use`",
        )),
    }
}

/// Whether `url` is an acceptable issuer / endpoint: `https://`, or `http://127.0.0.1:PORT`
/// (also `[::1]` and `localhost`) for local identity providers and tests.
pub fn secure_or_loopback(url: &str) -> bool {
    if let Some(rest) = url.strip_prefix("https://") {
        return !rest.is_empty() && !rest.starts_with('/');
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let name = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => return false,
    };
    matches!(name, "127.0.0.1" | "[::1]" | "localhost")
}

impl OidcConfig {
    /// Whether single sign-on is configured.
    pub fn enabled(&self) -> bool {
        !self.issuer.is_empty()
    }

    /// The client secret's name, when there is one.
    pub fn secret_name(&self) -> Option<&SecretName> {
        match self.client_secret.as_ref().map(|c| &c.0) {
            Some(SecretRef::Secret(n)) => Some(n),
            _ => None,
        }
    }

    /// The issuer without a trailing `/` (what discovery appends to and ID tokens carry,
    /// compared exactly as configured).
    pub fn discovery_url(&self) -> String {
        format!(
            "{}/.well-known/openid-configuration",
            self.issuer.trim_end_matches('/')
        )
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        if !secure_or_loopback(&self.issuer) {
            return Err("[auth.oidc] issuer must be an https:// URL (or a loopback http://127.0.0.1:PORT for a local identity provider)".into());
        }
        if self.client_id.trim().is_empty() {
            return Err("[auth.oidc] client_id is required when issuer is set".into());
        }
        if !(self.redirect_uri.starts_with("https://") || secure_or_loopback(&self.redirect_uri))
            || !self.redirect_uri.ends_with("/auth/callback")
        {
            return Err("[auth.oidc] redirect_uri must be the gateway's https://HOST/auth/callback (or http://127.0.0.1:PORT/auth/callback on loopback)".into());
        }
        if self.user_claim.trim().is_empty() {
            return Err(
                "[auth.oidc] user_claim may not be empty (e.g. \"email\" or \"sub\")".into(),
            );
        }
        if !self.scopes.iter().any(|s| s == "openid") {
            return Err("[auth.oidc] scopes must include \"openid\"".into());
        }
        Ok(())
    }
}

impl ProxyConfig {
    /// Whether the trusted-proxy mode is on.
    pub fn enabled(&self) -> bool {
        !self.header.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        let h = &self.header;
        if !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(
                "[auth.proxy] header must be an HTTP header name (letters, digits, -)".into(),
            );
        }
        if h.eq_ignore_ascii_case("authorization") || h.eq_ignore_ascii_case("cookie") {
            return Err("[auth.proxy] header may not be Authorization or Cookie".into());
        }
        if !secure_or_loopback(&self.jwks_url) {
            return Err("[auth.proxy] jwks_url must be an https:// URL (or loopback http://127.0.0.1:PORT) of the proxy's signing keys".into());
        }
        if self.issuer.trim().is_empty() || self.audience.trim().is_empty() {
            return Err("[auth.proxy] issuer and audience are required: a token is accepted only when both match".into());
        }
        if self.user_claim.trim().is_empty() {
            return Err("[auth.proxy] user_claim may not be empty".into());
        }
        Ok(())
    }
}

impl AuthConfig {
    /// Checks the section.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_idle_secs == 0 || self.session_max_secs == 0 {
            return Err("[auth] session_idle_secs and session_max_secs must be above 0".into());
        }
        if self.session_idle_secs > self.session_max_secs {
            return Err("[auth] session_idle_secs may not exceed session_max_secs".into());
        }
        self.oidc.validate()?;
        self.proxy.validate()
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

    fn parse(text: &str) -> Result<AuthConfig, String> {
        // As `Config::parse` reports it: the message, never the file's text.
        let c: AuthConfig = toml::from_str(text).map_err(|e| e.message().to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn the_issuer_must_be_https_or_loopback() {
        let ok = "[oidc]\nissuer = \"https://id.example.com\"\nclient_id = \"c\"\nredirect_uri = \"https://gw.example.com/auth/callback\"\n";
        assert!(parse(ok).is_ok());
        let local = "[oidc]\nissuer = \"http://127.0.0.1:8080\"\nclient_id = \"c\"\nredirect_uri = \"http://127.0.0.1:9/auth/callback\"\n";
        assert!(parse(local).is_ok());
        let plain = "[oidc]\nissuer = \"http://id.example.com\"\nclient_id = \"c\"\nredirect_uri = \"https://gw.example.com/auth/callback\"\n";
        assert!(parse(plain).unwrap_err().contains("https://"));
        let tricky = "[oidc]\nissuer = \"http://127.0.0.1.evil.com:80\"\nclient_id = \"c\"\nredirect_uri = \"https://gw.example.com/auth/callback\"\n";
        assert!(parse(tricky).is_err());
    }

    #[test]
    fn a_literal_client_secret_is_refused_without_echoing_it() {
        let e = parse("[oidc]\nclient_secret = \"hunter2-CANARY\"\n").unwrap_err();
        assert!(e.contains("auth.oidc.client_secret"), "{e}");
        assert!(!e.contains("hunter2-CANARY"), "{e}");
        let c = parse("[oidc]\nclient_secret = \"secret:oidc_client\"\n").unwrap();
        assert_eq!(c.oidc.secret_name().unwrap().as_str(), "oidc_client");
    }

    #[test]
    fn the_proxy_mode_needs_issuer_audience_and_keys() {
        let e = parse("[proxy]\nheader = \"Cf-Access-Jwt-Assertion\"\njwks_url = \"https://team.cloudflareaccess.com/cdn-cgi/access/certs\"\n").unwrap_err();
        assert!(e.contains("issuer and audience"), "{e}");
        let e = parse("[proxy]\nheader = \"X-User\"\njwks_url = \"http://proxy.example.com/jwks\"\nissuer = \"i\"\naudience = \"a\"\n").unwrap_err();
        assert!(e.contains("jwks_url"), "{e}");
    }
}
