//! JSON Web Token verification against a JWKS (an OIDC issuer's keys or a trusted identity
//! proxy's), with `jsonwebtoken` on aws-lc-rs.
//!
//! - Only asymmetric algorithms (RS*, PS*, ES256/384, EdDSA); `none` and HMAC are refused, so
//!   a public key can never be used as an HMAC secret.
//! - The key is chosen by the header's `kid`. An unknown `kid` re-fetches the JWKS (key
//!   rotation), at most once per [`REFETCH_INTERVAL`]; a key still unknown is refused.
//! - `iss` and `aud` must match exactly; `exp` is checked against the [`crate::clock::Clock`]
//!   time with [`LEEWAY_S`] of leeway (`nbf` too, when present).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Clock skew allowed on `exp` and `nbf`.
pub const LEEWAY_S: i64 = 60;
/// An unknown key id re-fetches the key set at most this often.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);

const ALLOWED: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a login or a proxy token is refused. The messages are shown to the person signing in
/// and written to the audit log (never with a token in them).
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("single sign-on is not configured ([auth.oidc] issuer in chitin.toml)")]
    NotConfigured,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's algorithm {0} is not accepted (only RS*, PS*, ES256, ES384 and EdDSA)")]
    Algorithm(String),
    #[error("the token's signature does not verify against the issuer's keys")]
    BadSignature,
    #[error(
        "the token is signed with key id `{0}`, which the issuer's key set (JWKS) does not list"
    )]
    UnknownKey(String),
    #[error("the token's issuer (iss) is not the configured issuer")]
    WrongIssuer,
    #[error("the token's audience (aud) is not this gateway")]
    WrongAudience,
    #[error("the token has expired (exp)")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the ID token's nonce was already used: a replayed login is refused")]
    NonceReplayed,
    #[error("the ID token's nonce does not match this login")]
    NonceMismatch,
    #[error("the login state is unknown, expired or already used; start again at /auth/login")]
    StateUnknown,
    #[error("this login was started in another browser; start again at /auth/login")]
    OtherBrowser,
    #[error("the identity provider refused the login: {0}")]
    Provider(String),
    #[error("the token has no usable `{0}` claim to name the user")]
    NoUser(String),
    #[error("the identity provider's discovery document is unusable: {0}")]
    Discovery(String),
    #[error("the identity provider's keys (JWKS) could not be read: {0}")]
    Jwks(String),
    #[error("the code exchange with the identity provider failed: {0}")]
    Exchange(String),
    #[error("the client secret could not be released: {0}")]
    Secret(String),
    #[error("too many sign-ins are in progress; try again in a few minutes")]
    Busy,
    #[error(
        "the user `{0}` was removed by an operator and is not created again by signing in; ask an owner to add them back (`chitin users add`)"
    )]
    Removed(String),
    #[error(transparent)]
    Accounts(#[from] super::AccountsError),
}

impl LoginError {
    /// A stable machine code for the refusal (API bodies, audit outcomes).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured => "not_configured",
            Self::Malformed(_) => "malformed",
            Self::Algorithm(_) => "bad_algorithm",
            Self::BadSignature => "bad_signature",
            Self::UnknownKey(_) => "unknown_kid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NonceReplayed => "nonce_replayed",
            Self::NonceMismatch => "nonce_mismatch",
            Self::StateUnknown => "state_unknown",
            Self::OtherBrowser => "other_browser",
            Self::Provider(_) => "provider_refused",
            Self::NoUser(_) => "no_user_claim",
            Self::Discovery(_) => "discovery_failed",
            Self::Jwks(_) => "jwks_failed",
            Self::Exchange(_) => "exchange_failed",
            Self::Secret(_) => "secret_unavailable",
            Self::Busy => "busy",
            Self::Removed(_) => "user_removed",
            Self::Accounts(_) => "accounts_error",
        }
    }
}

/// The HTTP client for identity providers: rustls, no redirects, no proxies, bounded time.
pub fn http_client() -> Result<reqwest::Client, LoginError> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| LoginError::Jwks(e.to_string()))
}

/// Reads a JSON document (at most 1 MiB) from `url`.
pub async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let resp = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {}", status.as_u16()));
    }
    let bytes = resp.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    if bytes.len() > 1024 * 1024 {
        return Err(format!("GET {url}: the document is larger than 1 MiB"));
    }
    serde_json::from_slice(&bytes).map_err(|e| format!("GET {url}: not JSON: {e}"))
}

struct Cached {
    set: Arc<JwkSet>,
    /// When a token's unknown key id last made us fetch the set again.
    refetched: Option<Instant>,
}

/// A JWKS at a URL, cached; re-fetched when a token names a key it does not hold (rate
/// limited).
pub struct KeySet {
    url: String,
    client: reqwest::Client,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl KeySet {
    pub fn new(url: String, client: reqwest::Client) -> Self {
        Self {
            url,
            client,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    async fn fetch(&self) -> Result<Arc<JwkSet>, LoginError> {
        let v = get_json(&self.client, &self.url)
            .await
            .map_err(LoginError::Jwks)?;
        // Keys this crate cannot use (other key types, encryption keys) are left out rather
        // than failing the whole set.
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| LoginError::Jwks(format!("{}: no `keys` array", self.url)))?;
        let usable: Vec<Value> = keys
            .iter()
            .filter(|k| serde_json::from_value::<jsonwebtoken::jwk::Jwk>((*k).clone()).is_ok())
            .cloned()
            .collect();
        let set: JwkSet = serde_json::from_value(serde_json::json!({ "keys": usable }))
            .map_err(|e| LoginError::Jwks(e.to_string()))?;
        Ok(Arc::new(set))
    }

    /// The key set, fetched if there is none yet; with `refresh` (a token named a key the
    /// set does not hold: the issuer may have rotated its keys), fetched again unless such a
    /// re-fetch happened less than [`REFETCH_INTERVAL`] ago (so a flood of tokens with made-up
    /// key ids cannot make the gateway hammer the issuer).
    async fn get(&self, refresh: bool) -> Result<(Arc<JwkSet>, bool), LoginError> {
        let mut g = self.cache.lock().await;
        if let Some(c) = g.as_ref()
            && (!refresh || c.refetched.is_some_and(|t| t.elapsed() < REFETCH_INTERVAL))
        {
            return Ok((Arc::clone(&c.set), false));
        }
        let set = self.fetch().await?;
        *g = Some(Cached {
            set: Arc::clone(&set),
            refetched: if refresh { Some(Instant::now()) } else { None },
        });
        Ok((set, true))
    }

    /// Verifies `token`: signature by a key of this set, `iss`, `aud`, `exp`, `nbf`. Returns
    /// the claims.
    pub async fn verify(
        &self,
        token: &str,
        issuer: &str,
        audience: &str,
        now_ms: i64,
    ) -> Result<Map<String, Value>, LoginError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| LoginError::Malformed(format!("header: {e}")))?;
        if !ALLOWED.contains(&header.alg) {
            return Err(LoginError::Algorithm(format!("{:?}", header.alg)));
        }
        let kid = header.kid.clone().unwrap_or_default();
        let pick = |set: &JwkSet| -> Option<jsonwebtoken::jwk::Jwk> {
            if kid.is_empty() {
                // Without a kid only a set with exactly one key is unambiguous.
                return (set.keys.len() == 1).then(|| set.keys[0].clone());
            }
            set.find(&kid).cloned()
        };
        let (set, fresh) = self.get(false).await?;
        let jwk = match pick(&set) {
            Some(k) => k,
            None if !fresh => {
                let (set, _) = self.get(true).await?;
                pick(&set).ok_or_else(|| LoginError::UnknownKey(printable(&kid)))?
            }
            None => return Err(LoginError::UnknownKey(printable(&kid))),
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Err(LoginError::UnknownKey(printable(&kid)));
        }
        if let Some(a) = jwk.common.key_algorithm
            && format!("{a:?}") != format!("{:?}", header.alg)
        {
            return Err(LoginError::Algorithm(format!(
                "{:?} (the key is for {a:?})",
                header.alg
            )));
        }
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| LoginError::Jwks(e.to_string()))?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.validate_exp = false;
        v.validate_nbf = false;
        v.validate_aud = true;
        v.set_audience(&[audience]);
        v.set_issuer(&[issuer]);
        v.set_required_spec_claims(&["iss", "aud"]);
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => LoginError::BadSignature,
                    ErrorKind::InvalidAudience => LoginError::WrongAudience,
                    ErrorKind::InvalidIssuer => LoginError::WrongIssuer,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                        LoginError::Algorithm(format!("{:?}", header.alg))
                    }
                    ErrorKind::MissingRequiredClaim(c) => {
                        LoginError::Malformed(format!("the `{c}` claim is missing"))
                    }
                    other => LoginError::Malformed(format!("{other:?}")),
                }
            })?;
        let claims = data.claims;
        let now_s = now_ms.div_euclid(1000);
        let exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| LoginError::Malformed("the `exp` claim is missing".into()))?;
        if now_s > exp.saturating_add(LEEWAY_S) {
            return Err(LoginError::Expired);
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
            && now_s.saturating_add(LEEWAY_S) < nbf
        {
            return Err(LoginError::NotYetValid);
        }
        Ok(claims)
    }
}

fn printable(s: &str) -> String {
    s.chars()
        .take(64)
        .collect::<String>()
        .escape_default()
        .to_string()
}

/// The user and groups a verified token names: `user_claim` (a non-empty string; for
/// `email`, an `email_verified: false` refuses) and `groups_claim` (a list of strings or one
/// string; absent = no groups).
pub fn user_and_groups(
    claims: &Map<String, Value>,
    user_claim: &str,
    groups_claim: &str,
) -> Result<(String, Vec<String>), LoginError> {
    let user = claims
        .get(user_claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| LoginError::NoUser(user_claim.to_string()))?
        .to_string();
    if user_claim == "email" && claims.get("email_verified") == Some(&Value::Bool(false)) {
        return Err(LoginError::NoUser("email (not verified)".into()));
    }
    super::valid_user(&user)?;
    let groups = match claims.get(groups_claim) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    Ok((user, groups))
}

/// A trusted identity proxy: its signed JWT header, verified against its keys.
#[derive(Debug)]
pub struct ProxyAuth {
    cfg: crate::config::auth::ProxyConfig,
    keys: KeySet,
}

impl ProxyAuth {
    pub fn new(cfg: crate::config::auth::ProxyConfig) -> Result<Self, LoginError> {
        let keys = KeySet::new(cfg.jwks_url.clone(), http_client()?);
        Ok(Self { cfg, keys })
    }

    /// The header the proxy puts its token in.
    pub fn header(&self) -> &str {
        &self.cfg.header
    }

    /// The user and groups of a proxy token.
    pub async fn verify(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<(String, Vec<String>), LoginError> {
        let claims = self
            .keys
            .verify(token.trim(), &self.cfg.issuer, &self.cfg.audience, now_ms)
            .await?;
        user_and_groups(&claims, &self.cfg.user_claim, &self.cfg.groups_claim)
    }
}
