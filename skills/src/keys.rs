//! Operator signing keys (public-key mode): ECDSA P-256.
//!
//! Private keys are PKCS#8 PEM, written 0600: `-----BEGIN ENCRYPTED PRIVATE KEY-----` (PBES2,
//! scrypt + AES-256-CBC) when a passphrase is given (`CHITIN_PASSPHRASE` in the CLI), else
//! `-----BEGIN PRIVATE KEY-----`; public keys are
//! SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`, the same format as cosign's and
//! OpenSSL's `ec -pubout`). A key's fingerprint is `sha256:<hex>` of its DER
//! SubjectPublicKeyInfo; it is the `publicKey.hint` of the bundles it signs.

use std::io::{Read, Write};
use std::path::Path;

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use sha2::{Digest, Sha256};
use sigstore_verify::types::DerPublicKey;

use crate::SkillError;
use crate::manifest::hex;

/// A private signing key. No `Debug`, no `Clone`; the scalar is wiped on drop (p256's
/// `SigningKey` zeroizes itself).
pub struct SecretSigningKey {
    key: SigningKey,
}

/// A public key with its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    der: Vec<u8>,
}

impl PublicKey {
    /// Parses a `-----BEGIN PUBLIC KEY-----` PEM holding an ECDSA P-256 key.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let der = DerPublicKey::from_pem(pem).map_err(|e| e.to_string())?;
        // Refuse anything but P-256: the verifier would otherwise fail later, less clearly.
        use p256::pkcs8::DecodePublicKey;
        p256::PublicKey::from_public_key_der(der.as_bytes())
            .map_err(|_| "not an ECDSA P-256 public key".to_string())?;
        Ok(Self {
            der: der.as_bytes().to_vec(),
        })
    }

    /// Reads a public key PEM file.
    pub fn load(path: &Path) -> Result<Self, SkillError> {
        let text = std::fs::read_to_string(path).map_err(|e| SkillError::io(path, e))?;
        Self::from_pem(&text).map_err(|why| SkillError::InvalidKey {
            path: path.to_path_buf(),
            why: format!("{why} (expected a -----BEGIN PUBLIC KEY----- PEM, ECDSA P-256)"),
        })
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex(&Sha256::digest(&self.der)))
    }

    /// The PEM text.
    pub fn to_pem(&self) -> String {
        DerPublicKey::new(self.der.clone()).to_pem()
    }

    /// For the verifier.
    pub fn der(&self) -> DerPublicKey {
        DerPublicKey::new(self.der.clone())
    }
}

impl SecretSigningKey {
    /// A fresh random key (32 bytes from the kernel's CSPRNG).
    pub fn generate() -> Result<Self, SkillError> {
        let mut f =
            std::fs::File::open("/dev/urandom").map_err(|e| SkillError::io("/dev/urandom", e))?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        // A random 32-byte string is a valid scalar except with negligible probability;
        // retry rather than bias.
        for _ in 0..16 {
            f.read_exact(seed.as_mut())
                .map_err(|e| SkillError::io("/dev/urandom", e))?;
            if let Ok(key) = SigningKey::from_slice(seed.as_ref()) {
                return Ok(Self { key });
            }
        }
        Err(SkillError::io(
            "/dev/urandom",
            std::io::Error::other("could not draw a valid P-256 scalar"),
        ))
    }

    /// Reads a PKCS#8 PEM private key file; an encrypted key needs `passphrase`.
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, SkillError> {
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(path).map_err(|e| SkillError::io(path, e))?,
        );
        let bad = |why: &str| SkillError::InvalidKey {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let key = if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            let pass = passphrase.ok_or_else(|| {
                bad("the key is encrypted: set CHITIN_PASSPHRASE to its passphrase")
            })?;
            SigningKey::from_pkcs8_encrypted_pem(&text, pass)
                .map_err(|_| bad("wrong passphrase, or not an ECDSA P-256 PKCS#8 key"))?
        } else {
            SigningKey::from_pkcs8_pem(&text).map_err(|_| {
                bad(
                    "expected a PKCS#8 ECDSA P-256 key (-----BEGIN PRIVATE KEY----- or \
                     -----BEGIN ENCRYPTED PRIVATE KEY-----), as written by `chitin skills keygen`",
                )
            })?
        };
        Ok(Self { key })
    }

    /// The public half.
    pub fn public_key(&self) -> Result<PublicKey, SkillError> {
        let der =
            self.key
                .verifying_key()
                .to_public_key_der()
                .map_err(|e| SkillError::InvalidKey {
                    path: "<generated>".into(),
                    why: e.to_string(),
                })?;
        Ok(PublicKey {
            der: der.as_bytes().to_vec(),
        })
    }

    /// Writes the private key (0600, refusing to overwrite; encrypted when `passphrase` is
    /// given) and the public key next to it (`<path>.pub`, 0644).
    pub fn save(
        &self,
        path: &Path,
        passphrase: Option<&[u8]>,
    ) -> Result<std::path::PathBuf, SkillError> {
        let encoded = match passphrase {
            Some(p) => self
                .key
                .to_pkcs8_encrypted_pem(pkcs8::rand_core::OsRng, p, LineEnding::LF),
            None => self.key.to_pkcs8_pem(LineEnding::LF),
        };
        let pem = encoded.map_err(|e| SkillError::InvalidKey {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        let pub_path = {
            let mut s = path.as_os_str().to_os_string();
            s.push(".pub");
            std::path::PathBuf::from(s)
        };
        let public = self.public_key()?.to_pem();
        write_new(path, pem.as_bytes(), 0o600)?;
        if let Err(e) = write_new(&pub_path, public.as_bytes(), 0o644) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(pub_path)
    }

    /// ECDSA P-256 / SHA-256 signature over `msg`, ASN.1 DER encoded (Sigstore's encoding).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(msg);
        sig.to_der().as_bytes().to_vec()
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SkillError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| SkillError::io(path, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| SkillError::io(path, e))
}
