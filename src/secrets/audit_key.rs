//! The audit log's Ed25519 checkpoint-signing key, kept in the secret store.
//!
//! Invariants: the key exists only inside `secrets.age` (encrypted) and in memory while the
//! log is open; a legacy `audit.key` file is moved into the store and deleted; names under
//! `chitin.` are reserved for Chitin and cannot be set or removed with `chitin secrets`.

use std::path::Path;

use chitin_audit::KeySigner;
use zeroize::Zeroizing;

use super::{SecretName, SecretStore, SecretValue, SecretsError};

/// The reserved secret holding the signing key's seed (64 hex digits).
pub const AUDIT_KEY_SECRET: &str = "chitin.audit-signing-key";

/// Names Chitin keeps for itself.
pub fn is_reserved(name: &SecretName) -> bool {
    name.is_reserved()
}

fn hex(seed: &[u8; 32]) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(64));
    for b in seed {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn seed_of(value: &SecretValue) -> Result<Zeroizing<[u8; 32]>, SecretsError> {
    let bad = || SecretsError::InvalidValue {
        name: AUDIT_KEY_SECRET.into(),
        reason: "is not 64 hex digits; restore the store from a backup".into(),
    };
    let text = value.expose_str().ok_or_else(bad)?;
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(bad());
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| bad())?;
        seed[i] = u8::from_str_radix(s, 16).map_err(|_| bad())?;
    }
    Ok(seed)
}

/// The checkpoint signer: the key from the store; else a legacy `audit.key` from the state dir
/// (moved into the store, then deleted); else a new key, created in the store.
pub fn signer(store: &mut SecretStore, home: &Path) -> Result<KeySigner, SecretsError> {
    let name = SecretName::parse(AUDIT_KEY_SECRET).map_err(SecretsError::InvalidName)?;
    let legacy = home.join(chitin_audit::KEY_FILE);
    if let Some(v) = store.internal_value(&name) {
        let seed = seed_of(v)?;
        if legacy.exists() {
            let other = chitin_audit::read_key_file_seed(&legacy).map_err(|e| audit_err(&e))?;
            if *other != *seed {
                return Err(SecretsError::InvalidValue {
                    name: AUDIT_KEY_SECRET.into(),
                    reason: format!(
                        "differs from the key file {}; keep the one matching audit.pub and remove the other",
                        legacy.display()
                    ),
                });
            }
            remove(&legacy)?;
        }
        return Ok(KeySigner::from_seed(&seed));
    }
    let seed = if legacy.exists() {
        chitin_audit::read_key_file_seed(&legacy).map_err(|e| audit_err(&e))?
    } else if home.join(chitin_audit::PUB_FILE).exists() {
        // A log exists but its key is in neither place (e.g. secrets.age restored from a backup
        // older than the log): a new key would not match audit.pub. Refuse before writing.
        return Err(SecretsError::InvalidValue {
            name: AUDIT_KEY_SECRET.into(),
            reason: format!(
                "is missing from the secret store, but the audit log {} exists; restore the secret store that holds its key (or move the log aside to start a new one)",
                home.join(chitin_audit::PUB_FILE).display()
            ),
        });
    } else {
        chitin_audit::new_seed().map_err(|e| audit_err(&e))?
    };
    let value = SecretValue::from_str_copy(&hex(&seed));
    store.set(&name, value, &[])?;
    if legacy.exists() {
        remove(&legacy)?;
    }
    Ok(KeySigner::from_seed(&seed))
}

fn remove(path: &Path) -> Result<(), SecretsError> {
    std::fs::remove_file(path).map_err(|e| SecretsError::InvalidValue {
        name: AUDIT_KEY_SECRET.into(),
        reason: format!(
            "moved into the store, but {} could not be deleted: {e}; delete it",
            path.display()
        ),
    })
}

fn audit_err(e: &chitin_audit::AuditError) -> SecretsError {
    SecretsError::InvalidValue {
        name: AUDIT_KEY_SECRET.into(),
        reason: e.to_string(),
    }
}
