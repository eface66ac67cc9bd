//! Signed checkpoints: `(seq, head hash, time)` signed with an Ed25519 key.
//!
//! # Signed message (API boundary)
//!
//! ```text
//! "chitin-audit-checkpoint-v1\0" || u64be(seq) || head[32] || i64be(time_ms) || key_id[8]
//! key_id = first 8 bytes of SHA-256(public key)
//! ```
//!
//! A checkpoint carries the id of the key that signed it, so the verifier can tell "signed by
//! another key" (wrong key) from "signature does not verify" (bad signature).

use std::io::Write;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::record::{from_hex, sha256, to_hex};
use crate::{AuditError, fsutil};

const CHECKPOINT_DOMAIN: &[u8] = b"chitin-audit-checkpoint-v1\0";
const PUB_PREFIX: &str = "chitin-audit-ed25519:";
const KEY_PREFIX: &str = "chitin-audit-ed25519-seed:";

/// One signed checkpoint. Also the JSON line format of `audit.checkpoints` and of exports
/// (with `"type":"checkpoint"` added in exports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The last record covered (0 = the empty log).
    pub seq: i64,
    /// That record's hash (hex).
    pub head: String,
    /// When the checkpoint was made (unix ms).
    pub time_ms: i64,
    /// First 8 bytes of SHA-256 of the signing public key (hex).
    pub key_id: String,
    /// Ed25519 signature (hex).
    pub sig: String,
}

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointProblem {
    WrongKey,
    BadSignature,
}

impl Checkpoint {
    /// The bytes that are signed.
    pub fn signed_message(seq: i64, head: &[u8; 32], time_ms: i64, key_id: &[u8; 8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 8 + 32 + 8 + 8);
        m.extend_from_slice(CHECKPOINT_DOMAIN);
        m.extend_from_slice(&seq.to_be_bytes());
        m.extend_from_slice(head);
        m.extend_from_slice(&time_ms.to_be_bytes());
        m.extend_from_slice(key_id);
        m
    }

    /// Makes and signs a checkpoint.
    pub fn sign(
        signer: &dyn CheckpointSigner,
        seq: i64,
        head: &[u8; 32],
        time_ms: i64,
    ) -> Result<Self, AuditError> {
        let key_id = key_id(&signer.public_key());
        let sig = signer.sign(&Self::signed_message(seq, head, time_ms, &key_id))?;
        Ok(Self {
            seq,
            head: to_hex(head),
            time_ms,
            key_id: to_hex(&key_id),
            sig: to_hex(&sig),
        })
    }

    /// The head hash as bytes, if well-formed.
    pub fn head_bytes(&self) -> Option<[u8; 32]> {
        from_hex(&self.head).and_then(|v| v.try_into().ok())
    }

    /// Checks the signature against `key`.
    pub fn verify(&self, key: &PublicKey) -> Result<(), CheckpointProblem> {
        let kid = key_id(key);
        if from_hex(&self.key_id).as_deref() != Some(&kid[..]) {
            return Err(CheckpointProblem::WrongKey);
        }
        let head = self.head_bytes().ok_or(CheckpointProblem::BadSignature)?;
        let sig: [u8; 64] = from_hex(&self.sig)
            .and_then(|v| v.try_into().ok())
            .ok_or(CheckpointProblem::BadSignature)?;
        let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| CheckpointProblem::BadSignature)?;
        vk.verify(
            &Self::signed_message(self.seq, &head, self.time_ms, &kid),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| CheckpointProblem::BadSignature)
    }

    /// The JSON line (no newline).
    pub fn to_line(&self) -> Result<String, AuditError> {
        serde_json::to_string(self).map_err(|e| AuditError::Internal(e.to_string()))
    }
}

const MANIFEST_DOMAIN: &[u8] = b"chitin-backup-manifest-v1\0";

/// A backup manifest's signature by the deployment's audit key (the key that signs the log's
/// checkpoints, under its own domain so neither signature can pass for the other).
///
/// ```text
/// signed = "chitin-backup-manifest-v1\0" || key_id[8] || SHA-256(manifest bytes)
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    /// First 8 bytes of SHA-256 of the signing public key (hex).
    pub key_id: String,
    /// Ed25519 signature (hex).
    pub sig: String,
}

impl ManifestSignature {
    fn message(manifest: &[u8], key_id: &[u8; 8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(MANIFEST_DOMAIN.len() + 8 + 32);
        m.extend_from_slice(MANIFEST_DOMAIN);
        m.extend_from_slice(key_id);
        m.extend_from_slice(&sha256(manifest));
        m
    }

    /// Signs `manifest` (its exact bytes).
    pub fn sign(signer: &dyn CheckpointSigner, manifest: &[u8]) -> Result<Self, AuditError> {
        let key_id = key_id(&signer.public_key());
        let sig = signer.sign(&Self::message(manifest, &key_id))?;
        Ok(Self {
            key_id: to_hex(&key_id),
            sig: to_hex(&sig),
        })
    }

    /// Checks the signature over `manifest` against `key`.
    pub fn verify(&self, key: &PublicKey, manifest: &[u8]) -> Result<(), CheckpointProblem> {
        let kid = key_id(key);
        if from_hex(&self.key_id).as_deref() != Some(&kid[..]) {
            return Err(CheckpointProblem::WrongKey);
        }
        let sig: [u8; 64] = from_hex(&self.sig)
            .and_then(|v| v.try_into().ok())
            .ok_or(CheckpointProblem::BadSignature)?;
        let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| CheckpointProblem::BadSignature)?;
        vk.verify(&Self::message(manifest, &kid), &Signature::from_bytes(&sig))
            .map_err(|_| CheckpointProblem::BadSignature)
    }
}

/// An Ed25519 public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The text form written to `audit.pub`: `chitin-audit-ed25519:<64 hex>`.
    pub fn to_text(&self) -> String {
        format!("{PUB_PREFIX}{}\n", to_hex(&self.0))
    }

    /// Parses `audit.pub` text (also accepts bare hex).
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let t = text.trim();
        let hex = t.strip_prefix(PUB_PREFIX).unwrap_or(t);
        let bytes: [u8; 32] = from_hex(hex)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| {
                AuditError::InvalidInput(format!(
                    "not an audit public key (expected `{PUB_PREFIX}` followed by 64 hex digits)"
                ))
            })?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| {
            AuditError::InvalidInput("the audit public key is not a valid Ed25519 point".into())
        })?;
        Ok(Self(bytes))
    }

    /// Reads a public key file.
    pub fn load(path: &Path) -> Result<Self, AuditError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuditError::Io {
            what: format!("read public key {}", path.display()),
            source: e,
        })?;
        Self::parse(&text)
    }

    /// The key id (hex) that checkpoints signed by this key carry.
    pub fn id_hex(&self) -> String {
        to_hex(&key_id(self))
    }
}

/// First 8 bytes of SHA-256 of the public key.
pub fn key_id(key: &PublicKey) -> [u8; 8] {
    let d = sha256(&key.0);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// Something that signs checkpoints. The gateway's key lives in a 0600 file for now
/// ([`FileKeySigner`]); once the secret store lands the lead can implement this trait over it.
pub trait CheckpointSigner: Send + Sync {
    fn public_key(&self) -> PublicKey;
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], AuditError>;
}

/// A signer whose key is kept in memory (zeroized on drop by ed25519-dalek).
pub struct KeySigner {
    key: SigningKey,
}

/// A fresh random Ed25519 seed (for a signer whose key is kept elsewhere, e.g. a secret store).
pub fn new_seed() -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut seed[..])
        .map_err(|e| AuditError::Internal(format!("no OS randomness for a new key: {e}")))?;
    Ok(seed)
}

/// Reads the seed of a key file written by [`KeySigner::load_or_create`] (to migrate it
/// somewhere safer). Refuses a file readable by group or others.
pub fn read_key_file_seed(path: &Path) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| AuditError::Io {
        what: format!("read key file {}", path.display()),
        source: e,
    })?);
    fsutil::check_private(path)?;
    let bad = |reason: &str| AuditError::KeyFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    };
    let hex = text
        .trim()
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| bad("does not start with the key prefix"))?;
    let bytes = Zeroizing::new(from_hex(hex).unwrap_or_default());
    let mut seed = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(bad("expected 64 hex digits after the prefix"));
    }
    seed.copy_from_slice(&bytes);
    Ok(seed)
}

impl KeySigner {
    /// From a 32-byte seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, AuditError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut seed[..])
            .map_err(|e| AuditError::Internal(format!("no OS randomness for a new key: {e}")))?;
        Ok(Self::from_seed(&seed))
    }

    /// Loads `path` (a 0600 seed file), or creates it with a fresh key (0600, O_EXCL) when it
    /// does not exist. Refuses a key file that is readable by group or others.
    pub fn load_or_create(path: &Path) -> Result<Self, AuditError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                fsutil::check_private(path)?;
                let text = Zeroizing::new(text);
                let hex =
                    text.trim()
                        .strip_prefix(KEY_PREFIX)
                        .ok_or_else(|| AuditError::KeyFile {
                            path: path.to_path_buf(),
                            reason: format!("does not start with `{KEY_PREFIX}`"),
                        })?;
                let bytes = Zeroizing::new(from_hex(hex).unwrap_or_default());
                let seed: &[u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| AuditError::KeyFile {
                            path: path.to_path_buf(),
                            reason: "expected 64 hex digits after the prefix".into(),
                        })?;
                Ok(Self::from_seed(seed))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let signer = Self::generate()?;
                let seed = Zeroizing::new(signer.key.to_bytes());
                let text = Zeroizing::new(format!("{KEY_PREFIX}{}\n", to_hex(&seed[..])));
                let mut f = fsutil::create_private_new(path)?;
                f.write_all(text.as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| AuditError::Io {
                        what: format!("write key file {}", path.display()),
                        source: e,
                    })?;
                Ok(signer)
            }
            Err(e) => Err(AuditError::Io {
                what: format!("read key file {}", path.display()),
                source: e,
            }),
        }
    }
}

impl CheckpointSigner for KeySigner {
    fn public_key(&self) -> PublicKey {
        PublicKey(self.key.verifying_key().to_bytes())
    }
    fn sign(&self, message: &[u8]) -> Result<[u8; 64], AuditError> {
        Ok(self.key.sign(message).to_bytes())
    }
}

/// Parses a checkpoint file: one JSON checkpoint per line. Returns the checkpoints, or the
/// 1-based number of the first line that is not a checkpoint.
pub fn parse_checkpoint_lines(text: &str) -> Result<Vec<Checkpoint>, usize> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Checkpoint>(line) {
            Ok(c) => out.push(c),
            Err(_) => return Err(i + 1),
        }
    }
    Ok(out)
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
    fn a_checkpoint_verifies_with_its_key_and_not_with_another() {
        let a = KeySigner::from_seed(&[1u8; 32]);
        let b = KeySigner::from_seed(&[2u8; 32]);
        let cp = Checkpoint::sign(&a, 7, &[9u8; 32], 1000).unwrap();
        assert_eq!(cp.verify(&a.public_key()), Ok(()));
        assert_eq!(cp.verify(&b.public_key()), Err(CheckpointProblem::WrongKey));
        let mut forged = cp.clone();
        forged.seq = 8;
        assert_eq!(
            forged.verify(&a.public_key()),
            Err(CheckpointProblem::BadSignature)
        );
    }

    #[test]
    fn a_manifest_signature_verifies_only_for_its_bytes_and_key_and_never_as_a_checkpoint() {
        let a = KeySigner::from_seed(&[1u8; 32]);
        let b = KeySigner::from_seed(&[2u8; 32]);
        let s = ManifestSignature::sign(&a, b"{\"members\":[]}").unwrap();
        assert_eq!(s.verify(&a.public_key(), b"{\"members\":[]}"), Ok(()));
        assert_eq!(
            s.verify(&a.public_key(), b"{\"members\":[1]}"),
            Err(CheckpointProblem::BadSignature)
        );
        assert_eq!(
            s.verify(&b.public_key(), b"{\"members\":[]}"),
            Err(CheckpointProblem::WrongKey)
        );
        let by_b = ManifestSignature::sign(&b, b"x").unwrap();
        let claimed = ManifestSignature {
            key_id: s.key_id.clone(),
            sig: by_b.sig,
        };
        assert_eq!(
            claimed.verify(&a.public_key(), b"x"),
            Err(CheckpointProblem::BadSignature)
        );
    }

    #[test]
    fn public_key_text_round_trips() {
        let a = KeySigner::from_seed(&[3u8; 32]);
        let text = a.public_key().to_text();
        assert_eq!(PublicKey::parse(&text).unwrap(), a.public_key());
        assert!(PublicKey::parse("chitin-audit-ed25519:zz").is_err());
    }
}
