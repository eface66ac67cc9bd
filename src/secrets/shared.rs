//! [`SharedSecretStore`]: the opened store shared by the threads and tasks of the gateway
//! (provider key source, tool environments, redaction), with interior locking.
//!
//! Reads (release, audience, redactor) take a read lock; `set`/`rm`/reopen take the write
//! lock. Values handed out are copies in fresh [`SecretValue`]s (zeroized on drop), so no lock
//! is held while a value is in use.

use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde_json::{Value, json};

use super::{Redactor, SecretAudit, SecretName, SecretStore, SecretValue, SecretsError};
use crate::gate::Authorized;

/// A [`SecretStore`] behind `Arc<RwLock<..>>`. Cloning shares the same store.
#[derive(Clone)]
pub struct SharedSecretStore(Arc<RwLock<SecretStore>>);

fn copy(v: &SecretValue) -> SecretValue {
    SecretValue::from_bytes(v.expose().to_vec())
}

impl SharedSecretStore {
    pub fn new(store: SecretStore) -> Self {
        Self(Arc::new(RwLock::new(store)))
    }

    /// Read access (a poisoned lock is still usable: readers never leave the store half-changed).
    pub fn read(&self) -> RwLockReadGuard<'_, SecretStore> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Write access, for `set`/`remove`/`rotate_key`.
    pub fn write(&self) -> RwLockWriteGuard<'_, SecretStore> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the store (the gateway reopens it on SIGHUP); the old one is dropped (wiped).
    pub fn replace(&self, store: SecretStore) {
        *self.write() = store;
    }

    /// The audience of a secret (None: no such secret).
    pub fn audience(&self, name: &SecretName) -> Option<Vec<String>> {
        self.read().audience(name).map(<[String]>::to_vec)
    }

    /// The Cedar entity of a secret (see [`SecretStore::cedar_entity`]).
    pub fn cedar_entity(&self, name: &SecretName) -> Option<Value> {
        self.read().cedar_entity(name)
    }

    /// [`SecretStore::release`], returning a copy of the value.
    pub fn release(
        &self,
        authz: &Authorized,
        host: &str,
        audit: &dyn SecretAudit,
    ) -> Result<SecretValue, SecretsError> {
        self.read().release(authz, host, audit).map(copy)
    }

    /// [`SecretStore::release_to_tool_env`], returning a copy of the value.
    pub fn release_to_tool_env(
        &self,
        authz: &Authorized,
        audit: &dyn SecretAudit,
    ) -> Result<(SecretName, SecretValue), SecretsError> {
        self.read()
            .release_to_tool_env(authz, audit)
            .map(|(n, v)| (n.clone(), copy(v)))
    }

    /// A redactor for every current value.
    pub fn redactor(&self) -> Redactor {
        self.read().redactor()
    }

    /// [`SecretStore::redaction_window`].
    pub fn redaction_window(&self) -> usize {
        self.read().redaction_window()
    }
}

impl SecretStore {
    /// The audience of a secret (None: no such secret).
    pub fn audience(&self, name: &SecretName) -> Option<&[String]> {
        self.list_entry_audience(name)
    }

    /// The Cedar entity of a secret, for requests that policies judge by the secret's
    /// audience: `{"uid": Chitin::Secret::"NAME", "attrs": {"audience": [hosts]}}`. None for
    /// a missing or reserved secret (policies then cannot read an audience, so a permit that
    /// needs one does not apply).
    pub fn cedar_entity(&self, name: &SecretName) -> Option<Value> {
        if super::audit_key::is_reserved(name) {
            return None;
        }
        let audience = self.audience(name)?;
        Some(json!({
            "uid": {"type": "Chitin::Secret", "id": name.as_str()},
            "attrs": {"audience": audience},
            "parents": [],
        }))
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
    use crate::clock::ManualClock;
    use crate::config::secrets::{IdentityBackend, SecretsConfig};
    use crate::secrets::identity::FixedPassphrase;
    use age::secrecy::SecretString;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_store_can_be_shared_across_threads_of_the_gateway() {
        assert_send_sync::<SecretStore>();
        assert_send_sync::<SharedSecretStore>();
        assert_send_sync::<crate::secrets::ToolSecrets>();
    }

    fn store(home: &std::path::Path) -> SecretStore {
        let cfg = SecretsConfig {
            backend: IdentityBackend::Passphrase,
            scrypt_work_factor: 4,
            max_scrypt_work_factor: 10,
            ..SecretsConfig::default()
        };
        SecretStore::open_with(
            home,
            &cfg,
            Box::new(FixedPassphrase(SecretString::from("pw".to_string()))),
            Arc::new(ManualClock::new(1_000)),
        )
        .unwrap()
    }

    #[test]
    fn concurrent_releases_get_their_own_copies_and_a_replaced_store_is_used_next() {
        let d = tempfile::tempdir().unwrap();
        let mut s = store(d.path());
        let name = SecretName::parse("gh").unwrap();
        s.set(
            &name,
            SecretValue::from_str_copy("ghp-value-0001"),
            &["api.github.com".into()],
        )
        .unwrap();
        let shared = SharedSecretStore::new(s);
        struct Quiet;
        impl SecretAudit for Quiet {
            fn record_release(
                &self,
                _: &SecretName,
                _: &[String],
                _: &str,
                _: &str,
            ) -> Result<(), String> {
                Ok(())
            }
            fn record_reveal(&self, _: &SecretName, _: &str) -> Result<(), String> {
                Ok(())
            }
            fn record_change(
                &self,
                _: &str,
                _: Option<&SecretName>,
                _: &str,
            ) -> Result<(), String> {
                Ok(())
            }
        }
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let sh = shared.clone();
                std::thread::spawn(move || {
                    let a = Authorized::for_test(
                        "Chitin::Tool::\"exec\"",
                        "secret.use",
                        "Chitin::Secret::\"gh\"",
                    );
                    let (n, v) = sh.release_to_tool_env(&a, &Quiet).unwrap();
                    (n.to_string(), v.expose().to_vec())
                })
            })
            .collect();
        for t in threads {
            assert_eq!(
                t.join().unwrap(),
                ("gh".to_string(), b"ghp-value-0001".to_vec())
            );
        }
        assert_eq!(
            shared.cedar_entity(&name).unwrap(),
            json!({"uid": {"type": "Chitin::Secret", "id": "gh"}, "attrs": {"audience": ["api.github.com"]}, "parents": []})
        );
        assert!(
            shared
                .cedar_entity(&SecretName::parse("nope").unwrap())
                .is_none()
        );
        // SIGHUP: the reopened store replaces the old one for every holder.
        shared.replace(store(d.path()));
        assert_eq!(shared.audience(&name).unwrap(), ["api.github.com"]);
    }
}
