//! The vault on a real secret store: the master key is a reserved secret, created once, never
//! replaced behind an existing key file, and data keys survive a reopen.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use std::sync::Arc;

use chitin::secrets::SecretName;
use chitin::vault::{VAULT_KEY_SECRET, Vault, VaultError};
use lifecycle_support::*;

#[test]
fn sealed_data_opens_after_a_reopen_with_the_same_secret_store() {
    let h = harness();
    let alice = user("alice");
    let sealed = h.lc.vault.seal(&alice, b"kept across restarts").unwrap();
    let mut store = open_store(&h.home);
    assert!(store.contains(&SecretName::parse(VAULT_KEY_SECRET).unwrap()));
    let again = Vault::from_store(&h.home, &mut store, Arc::new(h.clock.clone())).unwrap();
    assert_eq!(
        &again.open(&alice, &sealed).unwrap()[..],
        b"kept across restarts"
    );
}

#[test]
fn a_key_file_whose_master_key_is_gone_is_refused_not_replaced() {
    let h = harness();
    h.lc.vault.seal(&user("alice"), b"x").unwrap();
    let before = std::fs::read(h.home.join("vault.keys")).unwrap();
    let mut store = open_store(&h.home);
    store
        .remove(&SecretName::parse(VAULT_KEY_SECRET).unwrap())
        .unwrap();
    let e = Vault::from_store(&h.home, &mut store, Arc::new(h.clock.clone())).unwrap_err();
    assert!(matches!(e, VaultError::MasterKeyMissing { .. }), "{e}");
    assert!(e.to_string().contains("restore the secret store"), "{e}");
    assert_eq!(std::fs::read(h.home.join("vault.keys")).unwrap(), before);
    assert!(!store.contains(&SecretName::parse(VAULT_KEY_SECRET).unwrap()));
}

#[test]
fn the_master_key_is_never_revealed_as_an_ordinary_secret() {
    let h = harness();
    let store = open_store(&h.home);
    let e = store
        .reveal(
            &SecretName::parse(VAULT_KEY_SECRET).unwrap(),
            "operator",
            &*h.lc.audit,
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("reserved"), "{e}");
}
