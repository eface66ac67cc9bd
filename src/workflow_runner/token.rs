//! Resume tokens: what `requiresApproval.resumeToken` / `requiresInput.resumeToken` carry.
//!
//! Lobster's token is base64url JSON naming a state file: anyone can forge one, and it never
//! expires. Here a token is `cwt1.<payload>.<mac>`: the payload (base64url JSON, [`Claims`])
//! names the pause and binds the run id, the workflow file's SHA-256, the step id, the
//! arguments' digest, the pause's random nonce and an expiry; the MAC is HMAC-SHA256 over
//! the payload with a key that lives only in the encrypted secret store (the reserved secret
//! [`TOKEN_KEY_SECRET`]). A token is opaque to clients; a changed byte fails the MAC, a late
//! one fails the expiry (the [`crate::clock::Clock`]), and the pause it names is single use
//! (checked against `state.db`, not here).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secrets::{SecretName, SecretStore, SecretValue, SecretsError};

/// The reserved secret holding the MAC key (64 hex digits), created on first use.
pub const TOKEN_KEY_SECRET: &str = "chitin.workflow-token-key";

const PREFIX: &str = "cwt1.";
/// Longest token accepted (a real one is a few hundred bytes).
const MAX_TOKEN_BYTES: usize = 4096;

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the resume token is malformed ({0}); pass the resumeToken exactly as the run printed it"
    )]
    Malformed(String),
    #[error(
        "the resume token was not issued by this gateway or was modified (its signature does not match); nothing was resumed"
    )]
    BadMac,
    #[error(
        "the resume token expired at {at}; nothing was resumed. Run the workflow again ([workflows] resume_token_ttl_secs sets how long a pause waits)"
    )]
    Expired { at: String },
}

/// What a token binds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// Format version (1).
    pub v: u32,
    /// The run.
    pub run: String,
    /// The pause (its id; the approval id for approval pauses).
    pub pause: String,
    /// The step it paused at.
    pub step: String,
    /// `sha256:<hex>` of the workflow file when it paused.
    pub file: String,
    /// `sha256:<hex>` of the run's arguments.
    pub args: String,
    /// The pause's random nonce (hex).
    pub nonce: String,
    /// Expiry, ms since the epoch.
    pub exp: i64,
}

/// The MAC key (zeroized on drop; no `Debug`).
pub struct TokenKey(Zeroizing<[u8; 32]>);

impl TokenKey {
    /// A key from raw bytes (tests, benchmarks).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// The key kept in the secret store (the reserved [`TOKEN_KEY_SECRET`]), created there on
    /// first use.
    pub fn from_store(store: &mut SecretStore) -> Result<Self, SecretsError> {
        let name = SecretName::parse(TOKEN_KEY_SECRET).map_err(SecretsError::InvalidName)?;
        if let Some(v) = store.internal_value(&name) {
            return parse_hex_key(v.expose()).ok_or_else(|| SecretsError::InvalidValue {
                name: TOKEN_KEY_SECRET.into(),
                reason: "is not 64 hex digits; remove it only by restoring the store from a backup (paused workflow runs then cannot be resumed)".into(),
            });
        }
        let mut k = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut k[..]).map_err(|e| SecretsError::InvalidValue {
            name: TOKEN_KEY_SECRET.into(),
            reason: format!("no randomness from the OS: {e}"),
        })?;
        let hex = Zeroizing::new(chitin_audit::to_hex(&k[..]));
        store.set(&name, SecretValue::from_str_copy(&hex), &[])?;
        Ok(Self(k))
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC; this one is always 32 bytes.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..])
            .unwrap_or_else(|_| unreachable_key_length());
        m.update(b"chitin-workflow-resume-token-v1\0");
        m.update(payload);
        m
    }

    /// The token for `claims`.
    pub fn mint(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let tag = self.mac(&payload).finalize().into_bytes();
        format!(
            "{PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The claims of a token this key minted, if it has not expired at `now_ms`. The MAC is
    /// checked (in constant time) before anything of the payload is read.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed("too long".into()));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| TokenError::Malformed("it does not start with `cwt1.`".into()))?;
        let (p, t) = rest
            .split_once('.')
            .ok_or_else(|| TokenError::Malformed("it has no signature part".into()))?;
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| TokenError::Malformed("the payload is not base64url".into()))?;
        let tag = URL_SAFE_NO_PAD
            .decode(t)
            .map_err(|_| TokenError::Malformed("the signature is not base64url".into()))?;
        self.mac(&payload)
            .verify_slice(&tag)
            .map_err(|_| TokenError::BadMac)?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|e| TokenError::Malformed(format!("unreadable claims: {e}")))?;
        if claims.v != 1 {
            return Err(TokenError::Malformed(format!("version {}", claims.v)));
        }
        if now_ms >= claims.exp {
            return Err(TokenError::Expired {
                at: crate::clock::rfc3339(claims.exp),
            });
        }
        Ok(claims)
    }
}

#[expect(
    clippy::panic,
    reason = "HMAC accepts keys of every length; never reached"
)]
fn unreachable_key_length() -> Hmac<Sha256> {
    panic!("HMAC-SHA256 refused a 32-byte key")
}

fn parse_hex_key(b: &[u8]) -> Option<TokenKey> {
    if b.len() != 64 {
        return None;
    }
    let mut k = Zeroizing::new([0u8; 32]);
    for (i, pair) in b.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        k[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(TokenKey(k))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    fn claims() -> Claims {
        Claims {
            v: 1,
            run: "wf_1".into(),
            pause: "ab".repeat(16),
            step: "confirm".into(),
            file: format!("sha256:{}", "cd".repeat(32)),
            args: format!("sha256:{}", "ef".repeat(32)),
            nonce: "01".repeat(16),
            exp: 2_000,
        }
    }

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.mint(&claims());
        assert!(t.starts_with("cwt1."));
        assert_eq!(k.verify(&t, 1_999).unwrap(), claims());
        assert!(matches!(
            k.verify(&t, 2_000),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn every_changed_character_or_another_key_fails_the_mac() {
        let k = TokenKey::from_bytes([7; 32]);
        let t = k.mint(&claims());
        for i in PREFIX.len()..t.len() {
            let mut b = t.clone().into_bytes();
            if b[i] == b'.' {
                continue;
            }
            b[i] = if b[i] == b'A' { b'B' } else { b'A' };
            let bad = String::from_utf8(b).unwrap();
            if bad == t {
                continue;
            }
            let e = k.verify(&bad, 0).unwrap_err();
            assert!(
                matches!(e, TokenError::BadMac | TokenError::Malformed(_)),
                "{i}: {e}"
            );
        }
        let other = TokenKey::from_bytes([8; 32]);
        assert_eq!(other.verify(&t, 0).unwrap_err(), TokenError::BadMac);
    }

    #[test]
    fn a_forged_lobster_style_token_is_malformed() {
        let k = TokenKey::from_bytes([7; 32]);
        let forged = URL_SAFE_NO_PAD
            .encode(br#"{"protocolVersion":1,"v":1,"kind":"workflow-file","stateKey":"x"}"#);
        assert!(matches!(
            k.verify(&forged, 0),
            Err(TokenError::Malformed(_))
        ));
    }
}
