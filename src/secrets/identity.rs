//! Protection of the age identity that encrypts the store.
//!
//! Durable copy: always a file in the state directory, either passphrase-encrypted
//! (`secrets.identity.age`, age scrypt, armored; this is what `passphrase`, `keyring` and
//! `auto` use) or, only with an explicit opt-in, plaintext (`secrets.identity`, 0600).
//!
//! The kernel keyring (keyutils, through the `keyring` crate) is used as a *cache* of the
//! unlocked identity, never as the only copy: kernel keys vanish at reboot and the persistent
//! keyring expires after a few idle days, so a keyring-only identity would silently make the
//! store unreadable. With the cache, later commands need no passphrase until the cache is
//! lost; then the passphrase unlocks the file and refills it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use sha2::Digest;
use zeroize::Zeroizing;

use crate::config::secrets::{IdentityBackend, SecretsConfig};

use super::format::{self, DecryptFailure, DecryptKeys};
use super::{IDENTITY_ENCRYPTED_FILE, IDENTITY_PLAINTEXT_FILE, SecretsError, fsutil};

/// Supplies passphrases (environment, a prompt, or a fixed value for embedding and tests).
pub trait PassphraseSource: Send + Sync {
    /// `new`: the passphrase is being chosen (an interactive source asks twice).
    fn passphrase(&self, what: &Path, new: bool) -> Result<SecretString, SecretsError>;
}

/// `CHITIN_PASSPHRASE`, else the systemd credential `chitin-passphrase`, else a prompt on
/// the terminal (`/dev/tty`, no echo).
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvOrPrompt;

/// The environment variable read by [`EnvOrPrompt`].
pub const PASSPHRASE_ENV: &str = "CHITIN_PASSPHRASE";

impl PassphraseSource for EnvOrPrompt {
    fn passphrase(&self, what: &Path, new: bool) -> Result<SecretString, SecretsError> {
        if let Some(v) = std::env::var_os(PASSPHRASE_ENV) {
            let v = v.into_string().map_err(|_| {
                SecretsError::PassphraseUnavailable(format!("{PASSPHRASE_ENV} is not UTF-8"))
            })?;
            if v.is_empty() {
                return Err(SecretsError::PassphraseUnavailable(format!(
                    "{PASSPHRASE_ENV} is set but empty"
                )));
            }
            return Ok(SecretString::from(v));
        }
        if let Some(p) = systemd_credential()? {
            return Ok(p);
        }
        let prompt = if new {
            format!("New passphrase for {}: ", what.display())
        } else {
            format!("Passphrase for {}: ", what.display())
        };
        let no_tty = |e: std::io::Error| {
            SecretsError::PassphraseUnavailable(format!(
                "no terminal to prompt on ({e}); set {PASSPHRASE_ENV}, or use [secrets] \
                 backend = \"file\" with allow_plaintext_identity = true"
            ))
        };
        let first = Zeroizing::new(rpassword::prompt_password(prompt).map_err(no_tty)?);
        if first.is_empty() {
            return Err(SecretsError::PassphraseUnavailable(
                "an empty passphrase is not allowed".into(),
            ));
        }
        if new {
            let again = Zeroizing::new(
                rpassword::prompt_password("Repeat the passphrase: ").map_err(no_tty)?,
            );
            if *again != *first {
                return Err(SecretsError::PassphraseUnavailable(
                    "the two passphrases differ".into(),
                ));
            }
        }
        Ok(SecretString::from(first.to_string()))
    }
}

/// The systemd credential holding the passphrase (`LoadCredential=chitin-passphrase:FILE`
/// in the unit `chitin service install` writes): systemd puts the file in
/// `$CREDENTIALS_DIRECTORY`, readable only by the service, so the passphrase is never in the
/// unit or the environment. One trailing newline is removed.
pub const CREDENTIAL_NAME: &str = "chitin-passphrase";

fn systemd_credential() -> Result<Option<SecretString>, SecretsError> {
    let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|d| !d.is_empty()) else {
        return Ok(None);
    };
    let path = Path::new(&dir).join(CREDENTIAL_NAME);
    let bytes = match std::fs::read(&path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SecretsError::PassphraseUnavailable(format!(
                "cannot read the systemd credential {}: {e}",
                path.display()
            )));
        }
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        SecretsError::PassphraseUnavailable(format!(
            "the systemd credential {} is not UTF-8",
            path.display()
        ))
    })?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.is_empty() {
        return Err(SecretsError::PassphraseUnavailable(format!(
            "the systemd credential {} is empty",
            path.display()
        )));
    }
    Ok(Some(SecretString::from(text.to_string())))
}

/// A fixed passphrase (for an embedding program that got it elsewhere, and for tests).
pub struct FixedPassphrase(pub SecretString);

impl PassphraseSource for FixedPassphrase {
    fn passphrase(&self, _what: &Path, _new: bool) -> Result<SecretString, SecretsError> {
        Ok(self.0.clone())
    }
}

/// What protects the identity right now. `Display` gives the sentence the CLI prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// Unlocked copy cached in the kernel keyring; durable copy passphrase-encrypted.
    Keyring { identity_file: PathBuf },
    /// Passphrase-encrypted file; `keyring_note` says why the keyring cache is not used.
    Passphrase {
        identity_file: PathBuf,
        keyring_note: Option<String>,
    },
    /// Plaintext file (explicitly allowed).
    PlaintextFile { identity_file: PathBuf },
}

impl Protection {
    /// Whether the identity sits unencrypted on disk (`chitin doctor` flags it).
    pub fn is_plaintext(&self) -> bool {
        matches!(self, Self::PlaintextFile { .. })
    }
    /// Short backend name: `keyring`, `passphrase` or `file`.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Keyring { .. } => "keyring",
            Self::Passphrase { .. } => "passphrase",
            Self::PlaintextFile { .. } => "file",
        }
    }
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Keyring { identity_file } => write!(
                f,
                "kernel keyring (keyutils) cache of the identity, backed by the \
                 passphrase-encrypted file {}; after a reboot or keyring expiry the passphrase \
                 unlocks the file again",
                identity_file.display()
            ),
            Self::Passphrase {
                identity_file,
                keyring_note,
            } => {
                write!(
                    f,
                    "passphrase (age scrypt) on the identity file {}",
                    identity_file.display()
                )?;
                if let Some(n) = keyring_note {
                    write!(f, "; kernel keyring not used: {n}")?;
                }
                Ok(())
            }
            Self::PlaintextFile { identity_file } => write!(
                f,
                "UNENCRYPTED identity file {} (allow_plaintext_identity = true); anyone who can \
                 read it can read every secret",
                identity_file.display()
            ),
        }
    }
}

/// The kernel-keyring cache of one state directory's identity.
pub(crate) struct KeyringCache {
    entry: keyring::Entry,
}

const KEYRING_SERVICE: &str = "chitin-secrets";

impl KeyringCache {
    /// Opens the cache entry for `home`, after making sure this process has a session keyring
    /// (keyring 3 fails without one: dependencies.md pitfall 4), and probes that a key can be
    /// stored and read back.
    pub(crate) fn open(home: &Path) -> Result<Self, String> {
        use linux_keyutils::{KeyRing, KeyRingIdentifier};
        KeyRing::from_special_id(KeyRingIdentifier::Session, true)
            .map_err(|e| format!("no session keyring: {e:?}"))?;
        let canon = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
        let digest = sha2::Sha256::digest(canon.as_os_str().as_encoded_bytes());
        let tag: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        let probe = keyring::Entry::new(KEYRING_SERVICE, &format!("probe:{tag}"))
            .map_err(|e| e.to_string())?;
        probe
            .set_password("probe")
            .map_err(|e| format!("cannot store a key: {e}"))?;
        let back = probe
            .get_password()
            .map_err(|e| format!("cannot read a key back: {e}"))?;
        let _ = probe.delete_credential();
        if back != "probe" {
            return Err("a stored key read back differently".into());
        }
        let entry = keyring::Entry::new(KEYRING_SERVICE, &format!("identity:{tag}"))
            .map_err(|e| e.to_string())?;
        Ok(Self { entry })
    }

    pub(crate) fn get(&self) -> Option<Zeroizing<String>> {
        self.entry.get_password().ok().map(Zeroizing::new)
    }

    pub(crate) fn put(&self, identity: &str) -> Result<(), String> {
        self.entry.set_password(identity).map_err(|e| e.to_string())
    }

    pub(crate) fn clear(&self) {
        let _ = self.entry.delete_credential();
    }
}

/// The files and keyring cache for one state directory.
pub(crate) struct IdentityPaths {
    pub encrypted: PathBuf,
    pub plaintext: PathBuf,
}

impl IdentityPaths {
    pub(crate) fn new(home: &Path) -> Self {
        Self {
            encrypted: home.join(IDENTITY_ENCRYPTED_FILE),
            plaintext: home.join(IDENTITY_PLAINTEXT_FILE),
        }
    }
}

/// Result of loading: the identity (None if the store was never initialized), how it is
/// protected, the passphrase if one was asked for, and the keyring cache if in use.
pub(crate) struct Loaded {
    pub identity: Option<age::x25519::Identity>,
    pub protection: Protection,
    pub passphrase: Option<SecretString>,
    pub cache: Option<KeyringCache>,
}

/// Parses an age identity file's text (comments, then `AGE-SECRET-KEY-1...`).
pub fn parse_identity_text(text: &str) -> Result<age::x25519::Identity, String> {
    let mut found = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if found.is_some() {
            return Err("more than one identity in the file".into());
        }
        found = Some(
            age::x25519::Identity::from_str(line)
                .map_err(|_| "not an age X25519 identity (AGE-SECRET-KEY-1...)".to_string())?,
        );
    }
    found.ok_or_else(|| "no identity in the file".to_string())
}

/// The identity in age identity-file format (what `age -d -i FILE` reads).
pub fn identity_text(id: &age::x25519::Identity, created_ms: i64) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(200));
    s.push_str("# created: ");
    s.push_str(&crate::clock::rfc3339(created_ms));
    s.push_str("\n# public key: ");
    s.push_str(&id.to_public().to_string());
    s.push('\n');
    s.push_str(id.to_string().expose_secret());
    s.push('\n');
    s
}

fn keyring_for(
    home: &Path,
    cfg: &SecretsConfig,
) -> Result<(Option<KeyringCache>, Option<String>), SecretsError> {
    match cfg.backend {
        IdentityBackend::File | IdentityBackend::Passphrase => Ok((None, None)),
        IdentityBackend::Auto => match KeyringCache::open(home) {
            Ok(c) => Ok((Some(c), None)),
            Err(note) => Ok((None, Some(note))),
        },
        IdentityBackend::Keyring => KeyringCache::open(home)
            .map(|c| (Some(c), None))
            .map_err(SecretsError::KeyringUnavailable),
    }
}

fn protection_for(
    paths: &IdentityPaths,
    cfg: &SecretsConfig,
    cache: bool,
    note: Option<String>,
) -> Protection {
    if cfg.backend == IdentityBackend::File {
        Protection::PlaintextFile {
            identity_file: paths.plaintext.clone(),
        }
    } else if cache {
        Protection::Keyring {
            identity_file: paths.encrypted.clone(),
        }
    } else {
        Protection::Passphrase {
            identity_file: paths.encrypted.clone(),
            keyring_note: note,
        }
    }
}

/// Loads the identity. `store` is the encrypted store if it exists (used to check that a
/// keyring-cached identity still matches it).
pub(crate) fn load(
    home: &Path,
    cfg: &SecretsConfig,
    src: &dyn PassphraseSource,
    store: Option<(&Path, &[u8])>,
) -> Result<Loaded, SecretsError> {
    cfg.validate().map_err(SecretsError::Config)?;
    let paths = IdentityPaths::new(home);
    let missing = |expected: &Path| match store {
        Some((p, _)) => Err(SecretsError::IdentityMissing {
            store: p.to_path_buf(),
            expected: expected.to_path_buf(),
        }),
        None => Ok(()),
    };

    if cfg.backend == IdentityBackend::File {
        let protection = protection_for(&paths, cfg, false, None);
        let Some(text) = fsutil::read_private(&paths.plaintext)? else {
            missing(&paths.plaintext)?;
            return Ok(Loaded {
                identity: None,
                protection,
                passphrase: None,
                cache: None,
            });
        };
        let text = std::str::from_utf8(&text).map_err(|_| SecretsError::IdentityCorrupt {
            path: paths.plaintext.clone(),
            reason: "not UTF-8 text".into(),
        })?;
        let id = parse_identity_text(text).map_err(|reason| SecretsError::IdentityCorrupt {
            path: paths.plaintext.clone(),
            reason,
        })?;
        return Ok(Loaded {
            identity: Some(id),
            protection,
            passphrase: None,
            cache: None,
        });
    }

    if fsutil::exists(&paths.plaintext) {
        return Err(SecretsError::UnexpectedPlaintextIdentity {
            path: paths.plaintext.clone(),
            backend: cfg.backend.as_str(),
        });
    }
    let (cache, note) = keyring_for(home, cfg)?;
    let protection = protection_for(&paths, cfg, cache.is_some(), note);
    let Some(sealed) = fsutil::read_private(&paths.encrypted)? else {
        missing(&paths.encrypted)?;
        if let Some(c) = &cache {
            c.clear();
        }
        return Ok(Loaded {
            identity: None,
            protection,
            passphrase: None,
            cache,
        });
    };

    if let Some(c) = &cache
        && let Some(text) = c.get()
    {
        if let Ok(id) = parse_identity_text(&text) {
            let matches = match store {
                None => true,
                Some((_, bytes)) => !matches!(
                    format::decrypt_all(
                        bytes,
                        &DecryptKeys::new(cfg.max_scrypt_work_factor).with_x25519(id.clone())
                    ),
                    Err(DecryptFailure::NoMatch)
                ),
            };
            if matches {
                return Ok(Loaded {
                    identity: Some(id),
                    protection,
                    passphrase: None,
                    cache,
                });
            }
        }
        // Stale or damaged cache entry: drop it and unlock the file.
        c.clear();
    }

    let pass = src.passphrase(&paths.encrypted, false)?;
    let keys = DecryptKeys::new(cfg.max_scrypt_work_factor).with_passphrase(pass.clone());
    let text = match format::decrypt_all(&sealed, &keys) {
        Ok(t) => t,
        Err(DecryptFailure::WrongPassphrase) => {
            return Err(SecretsError::WrongPassphrase {
                path: paths.encrypted.clone(),
            });
        }
        Err(e) => {
            return Err(SecretsError::IdentityCorrupt {
                path: paths.encrypted.clone(),
                reason: e.to_string(),
            });
        }
    };
    let text = std::str::from_utf8(&text).map_err(|_| SecretsError::IdentityCorrupt {
        path: paths.encrypted.clone(),
        reason: "decrypted identity is not text".into(),
    })?;
    let id = parse_identity_text(text).map_err(|reason| SecretsError::IdentityCorrupt {
        path: paths.encrypted.clone(),
        reason,
    })?;
    if let Some(c) = &cache {
        let _ = c.put(id.to_string().expose_secret());
    }
    Ok(Loaded {
        identity: Some(id),
        protection,
        passphrase: Some(pass),
        cache,
    })
}

/// Writes `id` under the configured protection (atomically), asking for a new passphrase if
/// none is known yet, and refreshes the keyring cache. Returns the passphrase used.
pub(crate) fn store(
    home: &Path,
    cfg: &SecretsConfig,
    id: &age::x25519::Identity,
    now_ms: i64,
    passphrase: Option<SecretString>,
    cache: Option<&KeyringCache>,
    src: &dyn PassphraseSource,
) -> Result<Option<SecretString>, SecretsError> {
    let paths = IdentityPaths::new(home);
    fsutil::ensure_dir(home)?;
    let text = identity_text(id, now_ms);
    if cfg.backend == IdentityBackend::File {
        fsutil::write_atomic(&paths.plaintext, text.as_bytes())?;
        return Ok(None);
    }
    let pass = match passphrase {
        Some(p) => p,
        None => src.passphrase(&paths.encrypted, true)?,
    };
    let sealed =
        format::encrypt_with_passphrase(text.as_bytes(), pass.clone(), cfg.scrypt_work_factor)
            .map_err(SecretsError::Encrypt)?;
    fsutil::write_atomic(&paths.encrypted, &sealed)?;
    if let Some(c) = cache {
        let _ = c.put(id.to_string().expose_secret());
    }
    Ok(Some(pass))
}
