//! OpenID Connect single sign-on: the authorization-code flow with PKCE (S256).
//!
//! `begin` discovers the issuer (`<issuer>/.well-known/openid-configuration`, whose `issuer`
//! must equal the configured one exactly), stores a login (state, nonce, PKCE verifier, a hash
//! of a browser-binding value kept in a cookie) in `state.db` and returns the authorization
//! URL. `finish` consumes the login (once, before it expires), checks the browser binding,
//! exchanges the code at the token endpoint (with the verifier; the client secret, when
//! configured, released through Cedar `secret.use` for `Chitin::Provider::"oidc"` to the token
//! endpoint's host), verifies the ID token against the issuer's JWKS (`iss`, `aud`, `azp`,
//! `exp`), checks its nonce (single use) and maps its claims to a user and groups.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::jwt::{KeySet, LoginError, get_json, http_client, user_and_groups};
use super::{Accounts, Source, b64url, random};
use crate::config::auth::{OidcConfig, secure_or_loopback};
use crate::gate::Verdict;
use crate::policy::{Action, PolicyRequest};
use crate::store::params;

/// How long a started login may take.
pub const LOGIN_TTL_MS: i64 = 10 * 60 * 1000;
/// Logins that may be in flight at once (started, not finished, not expired).
pub const MAX_OPEN_LOGINS: i64 = 10_000;

#[derive(Debug, Clone)]
struct Discovery {
    authorization_endpoint: String,
    token_endpoint: String,
}

/// The signed-in person a login produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedIn {
    pub user: String,
    pub groups: Vec<String>,
    /// Whether the identity provider's groups were applied (not for users the operator
    /// defined).
    pub groups_applied: bool,
}

/// The OIDC relying party.
pub struct Oidc {
    cfg: OidcConfig,
    http: reqwest::Client,
    accounts: Accounts,
    secrets: Option<crate::secrets::SharedSecretStore>,
    discovery: tokio::sync::Mutex<Option<(Discovery, Arc<KeySet>)>>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.cfg.issuer)
            .finish_non_exhaustive()
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

fn host_of(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
}

impl Oidc {
    pub fn new(
        cfg: OidcConfig,
        accounts: Accounts,
        secrets: Option<crate::secrets::SharedSecretStore>,
    ) -> Result<Self, LoginError> {
        if !cfg.enabled() {
            return Err(LoginError::NotConfigured);
        }
        Ok(Self {
            cfg,
            http: http_client()?,
            accounts,
            secrets,
            discovery: tokio::sync::Mutex::new(None),
        })
    }

    /// The discovery document (read once, then cached) and the issuer's key set.
    async fn discover(&self) -> Result<(Discovery, Arc<KeySet>), LoginError> {
        let mut g = self.discovery.lock().await;
        if let Some((d, k)) = g.as_ref() {
            return Ok((d.clone(), Arc::clone(k)));
        }
        let doc = get_json(&self.http, &self.cfg.discovery_url())
            .await
            .map_err(LoginError::Discovery)?;
        let field = |k: &str| -> Result<String, LoginError> {
            doc.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| LoginError::Discovery(format!("`{k}` is missing")))
        };
        let issuer = field("issuer")?;
        if issuer != self.cfg.issuer {
            return Err(LoginError::Discovery(format!(
                "it names the issuer {issuer:?}, not the configured {:?}",
                self.cfg.issuer
            )));
        }
        let d = Discovery {
            authorization_endpoint: field("authorization_endpoint")?,
            token_endpoint: field("token_endpoint")?,
        };
        let jwks_uri = field("jwks_uri")?;
        for (name, url) in [
            ("authorization_endpoint", &d.authorization_endpoint),
            ("token_endpoint", &d.token_endpoint),
            ("jwks_uri", &jwks_uri),
        ] {
            if !secure_or_loopback(url) {
                return Err(LoginError::Discovery(format!(
                    "{name} must be https:// (or loopback http://127.0.0.1:PORT)"
                )));
            }
        }
        if let Some(methods) = doc
            .get("code_challenge_methods_supported")
            .and_then(Value::as_array)
            && !methods.iter().any(|m| m == "S256")
        {
            return Err(LoginError::Discovery(
                "the issuer does not support PKCE with S256".into(),
            ));
        }
        let keys = Arc::new(KeySet::new(jwks_uri, self.http.clone()));
        *g = Some((d.clone(), Arc::clone(&keys)));
        Ok((d, keys))
    }

    /// Starts a login bound to the browser that holds `binding` (a random value the gateway
    /// put in a cookie): the URL to send the browser to.
    pub async fn begin(&self, binding: &str) -> Result<String, LoginError> {
        let (d, _) = self.discover().await?;
        let state = b64url(&random::<32>()?);
        let nonce = b64url(&random::<32>()?);
        let verifier = b64url(&random::<32>()?);
        let challenge = b64url(&sha256(verifier.as_bytes()));
        let now = self.accounts.now_ms();
        let stored = self.accounts.store().db().tx(|c| {
            c.execute(
                "DELETE FROM oidc_logins WHERE expires_ms < ?1",
                params![now],
            )?;
            // Anyone may start a login: a bound on the ones in flight keeps that from filling
            // the database.
            let open: i64 = c
                .query_row("SELECT count(*) FROM oidc_logins", params![])?
                .get(0)?;
            if open >= MAX_OPEN_LOGINS {
                return Ok(false);
            }
            c.execute(
                "INSERT INTO oidc_logins (state, nonce, verifier, browser, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    state,
                    nonce,
                    verifier,
                    sha256(binding.as_bytes()),
                    now,
                    now + LOGIN_TTL_MS
                ],
            )?;
            Ok::<_, super::AccountsError>(true)
        })?;
        if !stored {
            return Err(LoginError::Busy);
        }
        let mut url = reqwest::Url::parse(&d.authorization_endpoint)
            .map_err(|e| LoginError::Discovery(format!("authorization_endpoint: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", &self.cfg.redirect_uri)
            .append_pair("scope", &self.cfg.scopes.join(" "))
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(url.into())
    }

    /// Finishes a login: the user it signed in.
    pub async fn finish(
        &self,
        state: &str,
        code: &str,
        binding: &str,
    ) -> Result<LoggedIn, LoginError> {
        let now = self.accounts.now_ms();
        // Consumed first: a state is good for one attempt, whatever happens next.
        let row: Option<(String, String, Vec<u8>)> = self.accounts.store().db().with(|c| {
            c.query_opt(
                "UPDATE oidc_logins SET used_ms = ?2
                 WHERE state = ?1 AND used_ms IS NULL AND expires_ms > ?2
                 RETURNING nonce, verifier, browser",
                params![state, now],
            )?
            .map(|r| -> Result<_, super::AccountsError> { Ok((r.get(0)?, r.get(1)?, r.get(2)?)) })
            .transpose()
        })?;
        let Some((nonce, verifier, browser)) = row else {
            return Err(LoginError::StateUnknown);
        };
        if !super::ct_eq(&sha256(binding.as_bytes()), &browser) {
            return Err(LoginError::OtherBrowser);
        }
        let (d, keys) = self.discover().await?;
        let id_token = self.exchange(&d, code, &verifier).await?;
        let claims = keys
            .verify(&id_token, &self.cfg.issuer, &self.cfg.client_id, now)
            .await?;
        self.check_azp(&claims)?;
        let got = claims
            .get("nonce")
            .and_then(Value::as_str)
            .ok_or(LoginError::NonceMismatch)?;
        let nonce_ok = self.accounts.store().db().tx(|c| {
            let used = c
                .query_opt(
                    "SELECT 1 FROM oidc_nonces_used WHERE nonce = ?1",
                    params![got],
                )?
                .is_some();
            if used {
                return Ok(Err(LoginError::NonceReplayed));
            }
            if !super::ct_eq(got.as_bytes(), nonce.as_bytes()) {
                return Ok(Err(LoginError::NonceMismatch));
            }
            // Recorded once: a replica racing with the same ID token finds the row there
            // (the loser of the race inserts nothing and is refused as a replay).
            let recorded = c.execute(
                "INSERT INTO oidc_nonces_used (nonce, used_ms) VALUES (?1, ?2)
                 ON CONFLICT(nonce) DO NOTHING",
                params![got, now],
            )?;
            if recorded != 1 {
                return Ok(Err(LoginError::NonceReplayed));
            }
            // A nonce is only ever sent by a login that lives LOGIN_TTL_MS, so remembering
            // used ones for a day covers every ID token that could still carry one.
            c.execute(
                "DELETE FROM oidc_nonces_used WHERE used_ms < ?1",
                params![now - 86_400_000],
            )?;
            Ok::<_, super::AccountsError>(Ok(()))
        })?;
        nonce_ok?;
        let (user, groups) =
            user_and_groups(&claims, &self.cfg.user_claim, &self.cfg.groups_claim)?;
        let groups_applied = match self.accounts.provision(&user, &groups, Source::Oidc) {
            Ok(applied) => applied,
            Err(super::AccountsError::Removed(u)) => return Err(LoginError::Removed(u)),
            Err(e) => return Err(e.into()),
        };
        Ok(LoggedIn {
            user,
            groups,
            groups_applied,
        })
    }

    /// With several audiences, `azp` must be this client (OIDC Core 3.1.3.7).
    fn check_azp(&self, claims: &Map<String, Value>) -> Result<(), LoginError> {
        let many = claims
            .get("aud")
            .and_then(Value::as_array)
            .is_some_and(|a| a.len() > 1);
        let azp = claims.get("azp").and_then(Value::as_str);
        match azp {
            Some(a) if a != self.cfg.client_id => Err(LoginError::WrongAudience),
            None if many => Err(LoginError::WrongAudience),
            _ => Ok(()),
        }
    }

    /// The client secret, released through the gate for the token endpoint's host.
    fn client_secret(&self, host: &str) -> Result<Option<crate::secrets::SecretValue>, LoginError> {
        let Some(name) = self.cfg.secret_name() else {
            return Ok(None);
        };
        let Some(secrets) = &self.secrets else {
            return Err(LoginError::Secret("the secret store is not open".into()));
        };
        let gate = self.accounts.gate();
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let uid = |s: String| {
            s.parse::<cedar_policy::EntityUid>()
                .map_err(|e| LoginError::Secret(e.to_string()))
        };
        let mut context = Map::new();
        context.insert("host".into(), json!(host));
        let req = PolicyRequest {
            principal: uid(format!("Chitin::Provider::{}", q("oidc")))?,
            action: Action::SecretUse.uid(),
            resource: uid(format!("Chitin::Secret::{}", q(name.as_str())))?,
            context,
        };
        let extra: Vec<Value> = secrets.cedar_entity(name).into_iter().collect();
        let refused = || {
            LoginError::Secret(format!(
                "policy denied secret.use by Chitin::Provider::\"oidc\" on secret {name} for host {host}; store it with `chitin secrets set {name} --audience {host}`"
            ))
        };
        let authz = match gate
            .check_with_entities(&req, &extra)
            .map_err(|e| LoginError::Secret(e.to_string()))?
        {
            Verdict::Allowed(a, _) => a,
            _ => return Err(refused()),
        };
        secrets
            .release(&authz, host, gate.audit().as_ref())
            .map(Some)
            .map_err(|e| LoginError::Secret(e.to_string()))
    }

    async fn exchange(
        &self,
        d: &Discovery,
        code: &str,
        verifier: &str,
    ) -> Result<String, LoginError> {
        let host = host_of(&d.token_endpoint)
            .ok_or_else(|| LoginError::Discovery("token_endpoint has no host".into()))?;
        let secret = self.client_secret(&host)?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.cfg.redirect_uri.as_str()),
            ("code_verifier", verifier),
            ("client_id", self.cfg.client_id.as_str()),
        ];
        let body = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let mut req = self
            .http
            .post(&d.token_endpoint)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(body);
        if let Some(s) = &secret {
            // client_secret_basic (RFC 6749 2.3.1: both parts form-url-encoded first).
            const FORM: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
                .remove(b'-')
                .remove(b'.')
                .remove(b'_')
                .remove(b'*');
            let enc = |b: &[u8]| percent_encoding::percent_encode(b, FORM).to_string();
            let user = enc(self.cfg.client_id.as_bytes());
            let pass = zeroize::Zeroizing::new(enc(s.expose().trim_ascii()));
            req = req.basic_auth(user, Some(pass.as_str()));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| LoginError::Exchange(format!("POST {}: {e}", d.token_endpoint)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| LoginError::Exchange(e.to_string()))?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let err = v.get("error").and_then(Value::as_str).unwrap_or("");
            return Err(LoginError::Exchange(format!(
                "HTTP {} {}",
                status.as_u16(),
                err.chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(64)
                    .collect::<String>()
            )));
        }
        v.get("id_token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| LoginError::Exchange("the response has no id_token".into()))
    }
}
