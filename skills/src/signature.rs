//! Signatures: a Sigstore bundle (`skill.sigstore.json`) whose DSSE envelope carries an
//! in-toto statement. The statement's subject is the skill's manifest digest; its predicate
//! (`https://chitin.dev/skill-manifest/v1`) holds the skill name, version and the canonical
//! manifest text (so a tampered directory is reported file by file).
//!
//! Two modes, decided by the bundle's verification material:
//! - **keyless**: a Fulcio certificate + Rekor evidence, verified offline by `sigstore-verify`
//!   against a trusted root shipped with Chitin; the certificate's SAN (subject) and OIDC issuer
//!   are returned and matched exactly against the trust list.
//! - **public key**: the bundle names a key (`publicKey.hint` = fingerprint); the key must be
//!   in the trust list. With transparency-log evidence the bundle is verified by
//!   `sigstore-verify` (managed-key policy); without it (offline signing, `chitin skills sign`)
//!   the DSSE signature is checked as a detached signature and `transparency` is false.
//!
//! Nothing is fetched from the network.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sigstore_verify::crypto::{SigningScheme, verify_signature, verify_signature_prehashed};
use sigstore_verify::trust_root::{SIGSTORE_PRODUCTION_TRUSTED_ROOT, TrustedRoot};
use sigstore_verify::types::bundle::VerificationMaterialContent;
use sigstore_verify::types::{
    Artifact, Bundle, HashAlgorithm, Sha256Hash, SignatureContent, Statement,
};
use sigstore_verify::{PublicKeyVerificationPolicy, VerificationPolicy, Verifier};

use crate::keys::{PublicKey, SecretSigningKey};
use crate::manifest::{Manifest, hex};
use crate::skillmd::{self, SkillMeta};
use crate::{BUNDLE_FILE, Limits, SKILL_MD, SkillError};

/// The in-toto predicate type of a skill manifest.
pub const PREDICATE_TYPE: &str = "https://chitin.dev/skill-manifest/v1";
/// DSSE payload type of an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
const MAX_BUNDLE: u64 = 4 * 1024 * 1024;

/// The trusted root keyless bundles are verified against (Fulcio CAs, Rekor keys, CT logs,
/// timestamp authorities). Build once; verification is offline.
pub struct TrustRoot {
    verifier: Verifier,
}

impl std::fmt::Debug for TrustRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrustRoot")
    }
}

impl TrustRoot {
    /// The Sigstore public-good production root embedded in `sigstore-verify`.
    pub fn production() -> Result<Self, SkillError> {
        Self::from_json(SIGSTORE_PRODUCTION_TRUSTED_ROOT)
    }

    /// A `trusted_root.json` text.
    pub fn from_json(json: &str) -> Result<Self, SkillError> {
        let root =
            TrustedRoot::from_json(json).map_err(|e| SkillError::TrustedRoot(e.to_string()))?;
        let verifier = Verifier::new(&root).map_err(|e| SkillError::TrustedRoot(e.to_string()))?;
        Ok(Self { verifier })
    }

    /// A `trusted_root.json` file.
    pub fn from_file(path: &Path) -> Result<Self, SkillError> {
        let text = std::fs::read_to_string(path).map_err(|e| SkillError::io(path, e))?;
        Self::from_json(&text)
    }
}

/// One entry of the operator's trust list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustedSigner {
    /// An operator key (public-key mode).
    Key { name: String, key: PublicKey },
    /// A keyless identity: certificate SAN and OIDC issuer, matched exactly.
    Keyless {
        name: String,
        issuer: String,
        subject: String,
    },
}

impl TrustedSigner {
    /// The entry's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Key { name, .. } | Self::Keyless { name, .. } => name,
        }
    }
}

/// Who signed, as established by verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signer {
    Key { fingerprint: String },
    Keyless { issuer: String, subject: String },
}

impl Signer {
    /// The `Skill.signer` attribute: the subject, or the key fingerprint.
    pub fn signer_attr(&self) -> &str {
        match self {
            Self::Key { fingerprint } => fingerprint,
            Self::Keyless { subject, .. } => subject,
        }
    }

    /// The `Skill.issuer` attribute: the OIDC issuer, `""` for key mode.
    pub fn issuer_attr(&self) -> &str {
        match self {
            Self::Key { .. } => "",
            Self::Keyless { issuer, .. } => issuer,
        }
    }
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key { fingerprint } => write!(f, "key {fingerprint}"),
            Self::Keyless { issuer, subject } => write!(f, "issuer={issuer} subject={subject}"),
        }
    }
}

/// A signature that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub signer: Signer,
    /// The name of the trust-list entry the signer matches, if any (policy decides what an
    /// untrusted but valid signature may do; the default policy refuses it).
    pub trusted_as: Option<String>,
    /// The signature is in a transparency log whose inclusion was verified.
    pub transparency: bool,
    /// The Rekor log index, when logged.
    pub log_index: Option<i64>,
}

fn invalid(why: impl std::fmt::Display) -> SkillError {
    SkillError::SignatureInvalid(why.to_string())
}

fn artifact_sha256(artifact: &Artifact<'_>) -> Option<[u8; 32]> {
    match artifact {
        Artifact::Blob(b) => Some(Sha256::digest(b).into()),
        Artifact::Digest(d) if d.algorithm() == HashAlgorithm::Sha2256 => {
            d.as_bytes().try_into().ok()
        }
        _ => None,
    }
}

fn key_matches_hint(key: &PublicKey, hint: &str) -> bool {
    let fp = key.fingerprint();
    let raw: [u8; 32] = Sha256::digest(key.der().as_bytes()).into();
    hint == fp || hint == B64.encode(raw)
}

/// Verifies `bundle` for `artifact` (bytes or SHA-256 digest): the one verification path
/// behind `chitin skills` and the sigstore-conformance test.
///
/// Errors: [`SkillError::SignatureInvalid`] (malformed, bad signature, bad log evidence,
/// artifact mismatch) or [`SkillError::UntrustedSigner`] (a public-key bundle whose key is not
/// in `trust`: it cannot be checked at all). A valid keyless signature from an identity not in
/// `trust` is `Ok` with `trusted_as: None`.
pub fn verify_bundle<'a>(
    root: &TrustRoot,
    artifact: impl Into<Artifact<'a>>,
    bundle: &Bundle,
    trust: &[TrustedSigner],
) -> Result<Verified, SkillError> {
    let artifact = artifact.into();
    let log_index: Option<i64> = bundle
        .verification_material
        .tlog_entries
        .first()
        .map(|e| e.log_index.as_i64());
    match &bundle.verification_material.content {
        VerificationMaterialContent::PublicKey(id) => {
            let keys: Vec<(&str, &PublicKey)> = trust
                .iter()
                .filter_map(|t| match t {
                    TrustedSigner::Key { name, key } => Some((name.as_str(), key)),
                    TrustedSigner::Keyless { .. } => None,
                })
                .collect();
            // The hint says which key; try that one first, then the others (other tools
            // spell hints differently).
            let mut ordered: Vec<(&str, &PublicKey)> = keys
                .iter()
                .copied()
                .filter(|(_, k)| key_matches_hint(k, &id.hint))
                .collect();
            let hinted = !ordered.is_empty();
            ordered.extend(
                keys.iter()
                    .copied()
                    .filter(|(_, k)| !key_matches_hint(k, &id.hint)),
            );
            let logged = !bundle.verification_material.tlog_entries.is_empty()
                || !bundle
                    .verification_material
                    .timestamp_verification_data
                    .rfc3161_timestamps
                    .is_empty();
            let mut last_err = None;
            for (name, key) in ordered {
                let r = if logged {
                    let policy = PublicKeyVerificationPolicy::new(key.der());
                    root.verifier
                        .verify(artifact.clone(), bundle, &policy)
                        .map(|v| v.tlog_verified())
                        .map_err(invalid)
                } else {
                    verify_detached(&artifact, bundle, key).map(|()| false)
                };
                match r {
                    Ok(transparency) => {
                        return Ok(Verified {
                            signer: Signer::Key {
                                fingerprint: key.fingerprint(),
                            },
                            trusted_as: Some(name.to_string()),
                            transparency,
                            log_index: if logged { log_index } else { None },
                        });
                    }
                    Err(e) => last_err = Some(e),
                }
            }
            match last_err {
                Some(e) if hinted => Err(e),
                _ => Err(SkillError::UntrustedSigner(format!(
                    "key {}",
                    if id.hint.is_empty() {
                        "(no hint)"
                    } else {
                        &id.hint
                    }
                ))),
            }
        }
        _ => {
            let policy = VerificationPolicy::any_identity();
            let r = root
                .verifier
                .verify(artifact, bundle, &policy)
                .map_err(invalid)?;
            if !r.certificate_verified() {
                return Err(invalid("the signing certificate was not verified"));
            }
            let subject = r
                .identity()
                .map(|i| i.as_str().to_string())
                .ok_or_else(|| invalid("the certificate has no subject alternative name"))?;
            let issuer = r
                .issuer()
                .map(str::to_string)
                .ok_or_else(|| invalid("the certificate has no OIDC issuer"))?;
            let trusted_as = trust.iter().find_map(|t| match t {
                TrustedSigner::Keyless {
                    name,
                    issuer: i,
                    subject: s,
                } if *i == issuer && *s == subject => Some(name.clone()),
                _ => None,
            });
            Ok(Verified {
                signer: Signer::Keyless { issuer, subject },
                trusted_as,
                transparency: r.tlog_verified(),
                log_index,
            })
        }
    }
}

/// A public-key bundle without log evidence: the signature is checked as a detached
/// signature, and the artifact is bound to it (DSSE: a statement subject; message signature:
/// the signed digest).
fn verify_detached(
    artifact: &Artifact<'_>,
    bundle: &Bundle,
    key: &PublicKey,
) -> Result<(), SkillError> {
    let digest = artifact_sha256(artifact).ok_or_else(|| invalid("need a SHA-256 artifact"))?;
    match &bundle.content {
        SignatureContent::DsseEnvelope(env) => {
            verify_signature(
                &key.der(),
                &env.pae(),
                &env.signature.sig,
                SigningScheme::EcdsaP256Sha256,
            )
            .map_err(|e| invalid(format!("the signature does not verify: {e}")))?;
            if env.payload_type != PAYLOAD_TYPE {
                return Err(invalid(format!(
                    "unsupported DSSE payload type {:?}",
                    env.payload_type
                )));
            }
            let st: Statement = serde_json::from_slice(env.payload.as_bytes())
                .map_err(|e| invalid(format!("the in-toto statement does not parse: {e}")))?;
            if !st.matches_sha256(&Sha256Hash::new(digest)) {
                return Err(invalid("the signed statement does not cover this manifest"));
            }
            Ok(())
        }
        SignatureContent::MessageSignature(ms) => {
            if let Some(md) = &ms.message_digest
                && (md.algorithm != HashAlgorithm::Sha2256 || md.digest.as_bytes() != digest)
            {
                return Err(invalid("the signed digest does not match the artifact"));
            }
            let r = match artifact {
                Artifact::Blob(b) => {
                    verify_signature(&key.der(), b, &ms.signature, SigningScheme::EcdsaP256Sha256)
                }
                _ => verify_signature_prehashed(
                    &key.der(),
                    &digest,
                    &ms.signature,
                    SigningScheme::EcdsaP256Sha256,
                ),
            };
            r.map_err(|e| invalid(format!("the signature does not verify: {e}")))
        }
        _ => Err(invalid("unsupported bundle content")),
    }
}

/// What the signature says about the skill (parsed from the DSSE payload; authentic only
/// after [`verify_bundle`] succeeded on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    pub name: String,
    pub version: String,
    pub manifest: Manifest,
}

/// Parses the skill statement out of a bundle (no signature check).
pub fn signed_manifest(bundle: &Bundle) -> Result<SignedManifest, SkillError> {
    let SignatureContent::DsseEnvelope(env) = &bundle.content else {
        return Err(invalid(
            "a skill bundle must carry a DSSE envelope with the skill manifest statement",
        ));
    };
    if env.payload_type != PAYLOAD_TYPE {
        return Err(invalid(format!(
            "unsupported DSSE payload type {:?}",
            env.payload_type
        )));
    }
    parse_statement(env.payload.as_bytes())
}

/// Parses an in-toto statement with a skill-manifest predicate.
pub fn parse_statement(payload: &[u8]) -> Result<SignedManifest, SkillError> {
    let st: Value = serde_json::from_slice(payload)
        .map_err(|e| invalid(format!("the statement is not JSON: {e}")))?;
    if st.get("predicateType").and_then(Value::as_str) != Some(PREDICATE_TYPE) {
        return Err(invalid(format!(
            "the statement's predicateType is not {PREDICATE_TYPE}"
        )));
    }
    let pred = st
        .get("predicate")
        .ok_or_else(|| invalid("the statement has no predicate"))?;
    let field = |k: &str| -> Result<String, SkillError> {
        pred.get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("the predicate has no string `{k}`")))
    };
    let manifest = Manifest::parse(&field("manifest")?).map_err(invalid)?;
    let name = field("name")?;
    skillmd::check_name(&name).map_err(invalid)?;
    let version = field("version")?;
    skillmd::Version::parse(&version).map_err(invalid)?;
    Ok(SignedManifest {
        name,
        version,
        manifest,
    })
}

/// The in-toto statement for a skill.
pub fn statement(meta: &SkillMeta, manifest: &Manifest) -> Value {
    json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": meta.name, "digest": {"sha256": hex(&manifest.digest())}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "name": meta.name,
            "version": meta.version,
            "manifest": manifest.canonical(),
        }
    })
}

/// A skill whose signature, manifest and SKILL.md all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedSkill {
    pub meta: SkillMeta,
    pub manifest: Manifest,
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    pub verified: Verified,
}

fn read_bundle(dir: &Path) -> Result<Bundle, SkillError> {
    let path = dir.join(BUNDLE_FILE);
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SkillError::Unsigned),
        Err(e) => return Err(SkillError::io(&path, e)),
    };
    if !meta.file_type().is_file() {
        return Err(SkillError::UnsafeFile {
            path: BUNDLE_FILE.into(),
            why: "not a regular file".into(),
        });
    }
    if meta.len() > MAX_BUNDLE {
        return Err(invalid("the bundle is larger than 4 MiB"));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| SkillError::io(&path, e))?;
    parse_bundle(&text)
}

/// Parses a Sigstore bundle (JSON, v0.1 to v0.3).
pub fn parse_bundle(text: &str) -> Result<Bundle, SkillError> {
    Bundle::from_json(text).map_err(|e| invalid(format!("the bundle does not parse: {e}")))
}

/// Verifies a skill directory: the bundle's signature (against `root` and `trust`), then every
/// file against the signed manifest, then `SKILL.md`.
pub fn verify_skill_dir(
    dir: &Path,
    root: &TrustRoot,
    trust: &[TrustedSigner],
    limits: &Limits,
) -> Result<VerifiedSkill, SkillError> {
    let bundle = read_bundle(dir)?;
    let signed = signed_manifest(&bundle)?;
    let canonical = signed.manifest.canonical();
    let verified = verify_bundle(root, canonical.as_bytes(), &bundle, trust)?;
    let actual = Manifest::from_dir(dir, limits)?;
    if let Some(t) = signed.manifest.diff(&actual) {
        return Err(t.into());
    }
    let text = std::fs::read_to_string(dir.join(SKILL_MD))
        .map_err(|_| SkillError::InvalidSkillMd(format!("{SKILL_MD} is missing or not UTF-8")))?;
    let meta = skillmd::parse(&text)?;
    if meta.name != signed.name || meta.version != signed.version {
        return Err(invalid(format!(
            "the signature is for {} {}, but {SKILL_MD} says {} {}",
            signed.name, signed.version, meta.name, meta.version
        )));
    }
    Ok(VerifiedSkill {
        meta,
        digest: actual.digest_string(),
        manifest: actual,
        verified,
    })
}

/// Signs a skill directory with an operator key (public-key mode, no transparency log):
/// writes `DIR/skill.sigstore.json` (replacing an old one atomically) and returns the
/// verified-to-be-parseable metadata and the manifest digest.
pub fn sign_skill_dir(
    dir: &Path,
    key: &SecretSigningKey,
    limits: &Limits,
) -> Result<(SkillMeta, String), SkillError> {
    let text = std::fs::read_to_string(dir.join(SKILL_MD))
        .map_err(|_| SkillError::InvalidSkillMd(format!("{SKILL_MD} is missing or not UTF-8")))?;
    let meta = skillmd::parse(&text)?;
    let manifest = Manifest::from_dir(dir, limits)?;
    let payload = serde_json::to_vec(&statement(&meta, &manifest))
        .map_err(|e| invalid(format!("cannot encode the statement: {e}")))?;
    let pae = sigstore_verify::types::pae(PAYLOAD_TYPE, &payload);
    let sig = key.sign(&pae);
    let fp = key.public_key()?.fingerprint();
    let bundle = json!({
        "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
        "verificationMaterial": {"publicKey": {"hint": fp}, "tlogEntries": []},
        "dsseEnvelope": {
            "payload": B64.encode(&payload),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": B64.encode(&sig), "keyid": fp}],
        }
    });
    let mut out = serde_json::to_string_pretty(&bundle)
        .map_err(|e| invalid(format!("cannot encode the bundle: {e}")))?;
    out.push('\n');
    let path = dir.join(BUNDLE_FILE);
    let tmp = dir.join(format!(".{BUNDLE_FILE}.tmp"));
    std::fs::write(&tmp, out.as_bytes()).map_err(|e| SkillError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SkillError::io(&path, e)
    })?;
    Ok((meta, manifest.digest_string()))
}
