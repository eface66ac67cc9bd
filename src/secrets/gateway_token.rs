//! The gateway's bearer token, kept in the secret store under a reserved name.
//!
//! Invariants: the token is 32 bytes from the OS RNG, stored hex-encoded (64 digits) only inside
//! `secrets.age`; in memory it lives in a [`GatewayToken`] (no Debug/Display, zeroized on drop)
//! and is compared in constant time. Names under `chitin.` are reserved (see `audit_key`).

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{SecretName, SecretStore, SecretValue, SecretsError};

/// The reserved secret holding the gateway token.
pub const GATEWAY_TOKEN_SECRET: &str = "chitin.gateway-token";

/// The gateway token. Never printed except by `chitin token show`.
pub struct GatewayToken(Zeroizing<String>);

impl GatewayToken {
    /// The token text (for `chitin token show` only).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time independent of where they differ. (The length
    /// is public: every token is 64 hex digits.) `subtle` is already in the tree through the
    /// crypto crates and its `ct_eq` is written not to be turned into an early-exit loop.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        mine.len() == presented.len() && bool::from(mine.ct_eq(presented))
    }
}

fn name() -> Result<SecretName, SecretsError> {
    SecretName::parse(GATEWAY_TOKEN_SECRET).map_err(SecretsError::InvalidName)
}

fn generate() -> Result<Zeroizing<String>, SecretsError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut raw[..]).map_err(|e| SecretsError::InvalidValue {
        name: GATEWAY_TOKEN_SECRET.into(),
        reason: format!("no randomness from the OS: {e}"),
    })?;
    let mut s = Zeroizing::new(String::with_capacity(64));
    for b in raw.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

fn of_value(v: &SecretValue) -> Result<GatewayToken, SecretsError> {
    let text = v.expose_str().unwrap_or("");
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SecretsError::InvalidValue {
            name: GATEWAY_TOKEN_SECRET.into(),
            reason: "is not 64 hex digits; replace it with `chitin token rotate`".into(),
        });
    }
    Ok(GatewayToken(Zeroizing::new(text.to_string())))
}

/// The stored token, if there is one.
pub fn get(store: &SecretStore) -> Result<Option<GatewayToken>, SecretsError> {
    store.internal_value(&name()?).map(of_value).transpose()
}

/// The stored token, created (and saved) when there is none. The bool says it was created.
pub fn ensure(store: &mut SecretStore) -> Result<(GatewayToken, bool), SecretsError> {
    if let Some(t) = get(store)? {
        return Ok((t, false));
    }
    Ok((rotate(store)?, true))
}

/// Replaces the token with a new random one and saves the store.
pub fn rotate(store: &mut SecretStore) -> Result<GatewayToken, SecretsError> {
    let token = generate()?;
    store.set(&name()?, SecretValue::from_str_copy(&token), &[])?;
    Ok(GatewayToken(token))
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
    fn a_token_matches_only_itself() {
        let t = GatewayToken(generate().unwrap());
        let text = t.expose().to_string();
        assert_eq!(text.len(), 64);
        assert!(t.matches(text.as_bytes()));
        let mut other = text.clone().into_bytes();
        other[63] = if other[63] == b'0' { b'1' } else { b'0' };
        assert!(!t.matches(&other));
        assert!(!t.matches(&text.as_bytes()[..63]));
        assert!(!t.matches(b""));
    }

    #[test]
    fn two_generated_tokens_differ() {
        assert_ne!(*generate().unwrap(), *generate().unwrap());
    }
}
