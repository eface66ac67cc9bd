//! The secret store: `secrets.age` in the state directory, an age file encrypted to one X25519
//! recipient, holding JSON `{"version":1,"secrets":[{name, audience, created_ms, updated_ms,
//! value (base64)}]}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use age::secrecy::SecretString;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::clock::{Clock, SystemClock};
use crate::config::secrets::SecretsConfig;
use crate::gate::Authorized;

use super::format::{self, DecryptFailure, DecryptKeys};
use super::identity::{self, EnvOrPrompt, KeyringCache, PassphraseSource, Protection};
use super::{Redactor, STORE_FILE, SecretAudit, SecretName, SecretValue, SecretsError, fsutil};

/// The Cedar action a release must be authorized for.
pub const SECRET_USE_ACTION: &str = "secret.use";

/// What `list` shows about a secret (never its value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: SecretName,
    /// Hosts the value may be sent to.
    pub audience: Vec<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

struct Entry {
    value: SecretValue,
    audience: Vec<String>,
    created_ms: i64,
    updated_ms: i64,
}

/// The opened, decrypted store.
pub struct SecretStore {
    home: PathBuf,
    path: PathBuf,
    cfg: SecretsConfig,
    clock: Arc<dyn Clock>,
    source: Box<dyn PassphraseSource>,
    identity: Option<age::x25519::Identity>,
    protection: Protection,
    passphrase: Option<SecretString>,
    cache: Option<KeyringCache>,
    entries: BTreeMap<SecretName, Entry>,
    /// SHA-256 of `secrets.age` as last read or written by this handle (None: no file).
    on_disk: Option<[u8; 32]>,
}

/// The lock file that serializes writers (`flock`-style, released when dropped).
pub const LOCK_FILE: &str = "secrets.lock";

fn digest(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore<'a> {
    version: u32,
    #[serde(borrow)]
    secrets: Vec<RawEntry<'a>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry<'a> {
    name: String,
    audience: Vec<String>,
    created_ms: i64,
    updated_ms: i64,
    /// base64 without escapes, so serde borrows it from the (zeroizing) plaintext buffer.
    #[serde(borrow)]
    value: &'a str,
}

impl SecretStore {
    /// Opens the store in `home` with the passphrase from `CHITIN_PASSPHRASE` or a prompt.
    /// A missing store is an empty store (created by the first [`SecretStore::set`]).
    pub fn open(home: &Path, cfg: &SecretsConfig) -> Result<Self, SecretsError> {
        Self::open_with(home, cfg, Box::new(EnvOrPrompt), Arc::new(SystemClock))
    }

    /// [`SecretStore::open`] with an explicit passphrase source and clock.
    pub fn open_with(
        home: &Path,
        cfg: &SecretsConfig,
        source: Box<dyn PassphraseSource>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SecretsError> {
        cfg.validate().map_err(SecretsError::Config)?;
        let path = home.join(STORE_FILE);
        let sealed = fsutil::read_private(&path)?;
        let loaded = identity::load(
            home,
            cfg,
            source.as_ref(),
            sealed.as_ref().map(|b| (path.as_path(), &b[..])),
        )?;
        let entries = match (&sealed, &loaded.identity) {
            (Some(bytes), Some(id)) => decrypt_store(&path, bytes, id, cfg)?,
            (Some(_), None) => {
                return Err(SecretsError::IdentityMissing {
                    store: path.clone(),
                    expected: home.to_path_buf(),
                });
            }
            (None, _) => BTreeMap::new(),
        };
        Ok(Self {
            home: home.to_path_buf(),
            path,
            cfg: cfg.clone(),
            clock,
            source,
            identity: loaded.identity,
            protection: loaded.protection,
            passphrase: loaded.passphrase,
            cache: loaded.cache,
            entries,
            on_disk: sealed.as_ref().map(|b| digest(b)),
        })
    }

    /// Replaces the identity with `identity_text` (an age identity file's text), after
    /// checking that it decrypts the existing store. Protects it with the configured backend.
    /// Nothing changes if the identity does not fit the store.
    pub fn import_identity(
        home: &Path,
        cfg: &SecretsConfig,
        identity_text: &str,
        source: Box<dyn PassphraseSource>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SecretsError> {
        cfg.validate().map_err(SecretsError::Config)?;
        let id = identity::parse_identity_text(identity_text).map_err(|reason| {
            SecretsError::IdentityCorrupt {
                path: PathBuf::from("<stdin>"),
                reason,
            }
        })?;
        let path = home.join(STORE_FILE);
        fsutil::ensure_dir(home)?;
        let _guard = lock_writers(home)?;
        let sealed = fsutil::read_private(&path)?;
        let entries = match &sealed {
            Some(bytes) => decrypt_store(&path, bytes, &id, cfg)?,
            None => BTreeMap::new(),
        };
        let cache = match cfg.backend {
            crate::config::secrets::IdentityBackend::Auto => KeyringCache::open(home).ok(),
            crate::config::secrets::IdentityBackend::Keyring => {
                Some(KeyringCache::open(home).map_err(SecretsError::KeyringUnavailable)?)
            }
            _ => None,
        };
        let passphrase = identity::store(
            home,
            cfg,
            &id,
            clock.now_ms(),
            None,
            cache.as_ref(),
            source.as_ref(),
        )?;
        let paths = identity::IdentityPaths::new(home);
        let protection = match (&cfg.backend, &cache) {
            (crate::config::secrets::IdentityBackend::File, _) => Protection::PlaintextFile {
                identity_file: paths.plaintext,
            },
            (_, Some(_)) => Protection::Keyring {
                identity_file: paths.encrypted,
            },
            (_, None) => Protection::Passphrase {
                identity_file: paths.encrypted,
                keyring_note: None,
            },
        };
        Ok(Self {
            home: home.to_path_buf(),
            path,
            cfg: cfg.clone(),
            clock,
            source,
            identity: Some(id),
            protection,
            passphrase,
            cache,
            entries,
            on_disk: sealed.as_ref().map(|b| digest(b)),
        })
    }

    /// What protects the identity (the CLI prints this).
    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// Drops the unlocked identity from the kernel keyring cache (the next process needs the
    /// passphrase again). The durable passphrase-encrypted file is untouched. Also what a
    /// reboot does.
    pub fn forget_cached_identity(&self) {
        if let Some(c) = &self.cache {
            c.clear();
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an identity exists (false before the first `set`).
    pub fn is_initialized(&self) -> bool {
        self.identity.is_some()
    }

    /// Names, audiences and times, sorted by name. Never values.
    pub fn list(&self) -> Vec<SecretInfo> {
        self.entries
            .iter()
            .map(|(name, e)| SecretInfo {
                name: name.clone(),
                audience: e.audience.clone(),
                created_ms: e.created_ms,
                updated_ms: e.updated_ms,
            })
            .collect()
    }

    /// A value for Chitin's own use inside the process (the audit signing key). Never handed
    /// to tools, providers or the model: those go through [`Self::release`] and the gate.
    pub(crate) fn internal_value(&self, name: &SecretName) -> Option<&SecretValue> {
        self.entries.get(name).map(|e| &e.value)
    }

    pub(super) fn list_entry_audience(&self, name: &SecretName) -> Option<&[String]> {
        self.entries.get(name).map(|e| e.audience.as_slice())
    }

    /// Whether a secret exists.
    pub fn contains(&self, name: &SecretName) -> bool {
        self.entries.contains_key(name)
    }

    /// Checks what [`Self::set`] would refuse (value length, audience) without writing
    /// anything, so a caller can refuse before it records or changes anything else.
    pub fn check_set(
        &self,
        name: &SecretName,
        value: &SecretValue,
        audience: &[String],
    ) -> Result<(), SecretsError> {
        value
            .check_len()
            .map_err(|reason| SecretsError::InvalidValue {
                name: name.to_string(),
                reason,
            })?;
        normalize_audience(audience).map(|_| ())
    }

    /// Stores (or replaces) a secret and writes the store. `audience`: hosts the value may be
    /// sent to; empty keeps the audience of an existing secret.
    pub fn set(
        &mut self,
        name: &SecretName,
        value: SecretValue,
        audience: &[String],
    ) -> Result<(), SecretsError> {
        value
            .check_len()
            .map_err(|reason| SecretsError::InvalidValue {
                name: name.to_string(),
                reason,
            })?;
        let audience = normalize_audience(audience)?;
        let _guard = self.begin_write()?;
        self.ensure_identity()?;
        let now = self.clock.now_ms();
        let previous = self.entries.remove(name);
        let (created_ms, audience) = match &previous {
            Some(p) if audience.is_empty() => (p.created_ms, p.audience.clone()),
            Some(p) => (p.created_ms, audience),
            None => (now, audience),
        };
        self.entries.insert(
            name.clone(),
            Entry {
                value,
                audience,
                created_ms,
                updated_ms: now,
            },
        );
        if let Err(e) = self.write_locked() {
            // Keep memory equal to disk.
            self.entries.remove(name);
            if let Some(p) = previous {
                self.entries.insert(name.clone(), p);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Removes a secret and writes the store.
    pub fn remove(&mut self, name: &SecretName) -> Result<(), SecretsError> {
        if !self.entries.contains_key(name) {
            return Err(SecretsError::NotFound(name.to_string()));
        }
        let _guard = self.begin_write()?;
        let Some(old) = self.entries.remove(name) else {
            return Err(SecretsError::NotFound(name.to_string()));
        };
        if let Err(e) = self.write_locked() {
            self.entries.insert(name.clone(), old);
            return Err(e);
        }
        Ok(())
    }

    /// Generates a new identity and re-encrypts the store to it. Crash-safe: the store is
    /// first written for both identities, then the new identity replaces the old one, then
    /// the store is written for the new identity only.
    pub fn rotate_key(&mut self) -> Result<(), SecretsError> {
        let Some(old) = self.identity.clone() else {
            return Err(SecretsError::NotFound(
                "(no store yet: nothing to rotate)".into(),
            ));
        };
        let _guard = self.begin_write()?;
        let new = age::x25519::Identity::generate();
        let plain = self.serialize();
        let both = format::encrypt_to_recipients(&plain, &[old.to_public(), new.to_public()])
            .map_err(SecretsError::Encrypt)?;
        self.commit(&both)?;
        let pass = identity::store(
            &self.home,
            &self.cfg,
            &new,
            self.clock.now_ms(),
            self.passphrase.clone(),
            self.cache.as_ref(),
            self.source.as_ref(),
        )?;
        self.passphrase = pass;
        self.identity = Some(new);
        self.write_locked()
    }

    /// The identity in age identity-file format, for `export-identity` (backups).
    pub fn export_identity(&self) -> Result<Zeroizing<String>, SecretsError> {
        let id = self.identity.as_ref().ok_or_else(|| {
            SecretsError::NotFound("(no identity yet: set a secret first)".into())
        })?;
        Ok(identity::identity_text(id, self.clock.now_ms()))
    }

    /// A redactor for every current secret value.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(self.entries.iter().map(|(n, e)| (n, &e.value)))
    }

    /// The longest pattern a [`SecretStore::redactor`] would hold (a stream's hold-back
    /// window), without building one.
    pub fn redaction_window(&self) -> usize {
        Redactor::window_for(self.entries.iter().map(|(n, e)| (n, &e.value)))
    }

    /// Releases a secret for a request to `host`. Needs the gate's proof that `secret.use`
    /// on exactly `Chitin::Secret::"NAME"` was allowed, `host` must be in the secret's
    /// audience, and the audit record must be written first; otherwise nothing is released.
    pub fn release(
        &self,
        authz: &Authorized,
        host: &str,
        audit: &dyn SecretAudit,
    ) -> Result<&SecretValue, SecretsError> {
        let (name, entry) = self.authorized_entry(authz)?;
        let host_n = normalize_host(host);
        if !entry.audience.contains(&host_n) {
            return Err(SecretsError::ReleaseRefused {
                name: name.to_string(),
                reason: format!(
                    "host `{}` is not in its audience [{}]; add it with `chitin secrets set {name} --audience HOST`",
                    host.escape_default(),
                    entry.audience.join(", ")
                ),
            });
        }
        audit
            .record_release(name, &entry.audience, authz.principal(), &host_n)
            .map_err(|reason| SecretsError::AuditFailed {
                name: name.to_string(),
                reason,
            })?;
        Ok(&entry.value)
    }

    /// Releases a secret into a tool's environment. The gate must have allowed `secret.use`
    /// with the tool as principal (`Chitin::Tool::"NAME"`) and this exact secret as resource;
    /// the audit record (host `env:<tool>`) is written first.
    pub fn release_to_tool_env(
        &self,
        authz: &Authorized,
        audit: &dyn SecretAudit,
    ) -> Result<(&SecretName, &SecretValue), SecretsError> {
        let (name, entry) = self.authorized_entry(authz)?;
        let Some(tool) = authz
            .principal()
            .strip_prefix("Chitin::Tool::\"")
            .and_then(|t| t.strip_suffix('"'))
        else {
            return Err(SecretsError::ReleaseRefused {
                name: name.to_string(),
                reason: format!(
                    "principal `{}` is not a tool",
                    authz.principal().escape_default()
                ),
            });
        };
        audit
            .record_release(
                name,
                &entry.audience,
                authz.principal(),
                &format!("env:{tool}"),
            )
            .map_err(|reason| SecretsError::AuditFailed {
                name: name.to_string(),
                reason,
            })?;
        Ok((name, &entry.value))
    }

    /// Returns a value for the operator (`chitin secrets get NAME --reveal`), after recording
    /// the reveal.
    pub fn reveal(
        &self,
        name: &SecretName,
        who: &str,
        audit: &dyn SecretAudit,
    ) -> Result<&SecretValue, SecretsError> {
        if super::audit_key::is_reserved(name) {
            return Err(SecretsError::ReleaseRefused {
                name: name.to_string(),
                reason: "reserved for Chitin and never printed; back up the whole store with `chitin secrets export-identity` and secrets.age".into(),
            });
        }
        let (name, entry) = self
            .entries
            .get_key_value(name)
            .ok_or_else(|| SecretsError::NotFound(name.to_string()))?;
        audit
            .record_reveal(name, who)
            .map_err(|reason| SecretsError::AuditFailed {
                name: name.to_string(),
                reason,
            })?;
        Ok(&entry.value)
    }

    fn authorized_entry(&self, authz: &Authorized) -> Result<(&SecretName, &Entry), SecretsError> {
        let resource = authz.resource();
        let refuse = |reason: String| SecretsError::ReleaseRefused {
            name: resource.escape_default().to_string(),
            reason,
        };
        let action = authz.action();
        if action != crate::policy::Action::SecretUse {
            return Err(refuse(format!(
                "the authorization is for action `{action}`, not `{SECRET_USE_ACTION}`"
            )));
        }
        let name = resource
            .strip_prefix("Chitin::Secret::\"")
            .and_then(|r| r.strip_suffix('"'))
            .ok_or_else(|| refuse("the authorized resource is not a Chitin::Secret".into()))
            .and_then(|n| SecretName::parse(n).map_err(refuse))?;
        if super::audit_key::is_reserved(&name) {
            // Chitin's own keys (the audit signing key, ...) are never released, whatever a
            // policy says: a tool holding the audit key could forge signed checkpoints.
            return Err(refuse(format!(
                "`{name}` is reserved for Chitin and is never released"
            )));
        }
        self.entries
            .get_key_value(&name)
            .ok_or_else(|| SecretsError::NotFound(name.to_string()))
    }

    fn ensure_identity(&mut self) -> Result<(), SecretsError> {
        if self.identity.is_some() {
            return Ok(());
        }
        // Another process may have created the identity since this handle was opened;
        // writing a second one would orphan its store.
        let paths = identity::IdentityPaths::new(&self.home);
        if fsutil::exists(&paths.encrypted) || fsutil::exists(&paths.plaintext) {
            return Err(SecretsError::ConcurrentModification {
                path: self.path.clone(),
            });
        }
        let id = age::x25519::Identity::generate();
        let pass = identity::store(
            &self.home,
            &self.cfg,
            &id,
            self.clock.now_ms(),
            self.passphrase.clone(),
            self.cache.as_ref(),
            self.source.as_ref(),
        )?;
        self.passphrase = pass;
        self.identity = Some(id);
        Ok(())
    }

    fn serialize(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        let need: usize = 64
            + self
                .entries
                .iter()
                .map(|(n, e)| {
                    160 + n.as_str().len()
                        + e.audience.iter().map(|a| a.len() + 3).sum::<usize>()
                        + e.value.len().div_ceil(3) * 4
                })
                .sum::<usize>();
        format::reserve_zeroizing(&mut out, need);
        out.extend_from_slice(b"{\"version\":1,\"secrets\":[");
        for (i, (name, e)) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Names and audiences are validated to need no JSON escaping.
            let head = format!(
                "{{\"name\":\"{}\",\"audience\":[{}],\"created_ms\":{},\"updated_ms\":{},\"value\":\"",
                name.as_str(),
                e.audience
                    .iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(","),
                e.created_ms,
                e.updated_ms
            );
            out.extend_from_slice(head.as_bytes());
            let mut b64 = Zeroizing::new(String::with_capacity(e.value.len().div_ceil(3) * 4));
            STANDARD.encode_string(e.value.expose(), &mut b64);
            format::reserve_zeroizing(&mut out, b64.len() + 2);
            out.extend_from_slice(b64.as_bytes());
            out.extend_from_slice(b"\"}");
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// Takes the writer lock and checks that nobody changed the store since this handle
    /// read it (optimistic concurrency: no lost updates between two `chitin` processes).
    fn begin_write(&self) -> Result<std::fs::File, SecretsError> {
        fsutil::ensure_dir(&self.home)?;
        let guard = lock_writers(&self.home)?;
        let now = fsutil::read_private(&self.path)?.map(|b| digest(&b));
        if now != self.on_disk {
            return Err(SecretsError::ConcurrentModification {
                path: self.path.clone(),
            });
        }
        Ok(guard)
    }

    /// Writes new store bytes (caller holds the lock).
    fn commit(&mut self, sealed: &[u8]) -> Result<(), SecretsError> {
        fsutil::write_atomic(&self.path, sealed)?;
        self.on_disk = Some(digest(sealed));
        Ok(())
    }

    /// Encrypts the current entries to the current identity and commits (lock held).
    fn write_locked(&mut self) -> Result<(), SecretsError> {
        let Some(id) = &self.identity else {
            return Err(SecretsError::Encrypt("no identity".into()));
        };
        let plain = self.serialize();
        let sealed = format::encrypt_to_recipients(&plain, &[id.to_public()])
            .map_err(SecretsError::Encrypt)?;
        self.commit(&sealed)
    }
}

/// Opens `secrets.lock` (0600, no symlinks) and takes an exclusive lock on it; the lock is
/// released when the returned file is dropped.
fn lock_writers(home: &Path) -> Result<std::fs::File, SecretsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = home.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| SecretsError::io(&path, "open", e))?;
    f.lock().map_err(|e| SecretsError::io(&path, "lock", e))?;
    Ok(f)
}

fn decrypt_store(
    path: &Path,
    sealed: &[u8],
    id: &age::x25519::Identity,
    cfg: &SecretsConfig,
) -> Result<BTreeMap<SecretName, Entry>, SecretsError> {
    let keys = DecryptKeys::new(cfg.max_scrypt_work_factor).with_x25519(id.clone());
    let plain = match format::decrypt_all(sealed, &keys) {
        Ok(p) => p,
        Err(DecryptFailure::NoMatch) => {
            return Err(SecretsError::WrongIdentity {
                path: path.to_path_buf(),
            });
        }
        Err(e) => {
            return Err(SecretsError::StoreCorrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let corrupt = |reason: String| SecretsError::StoreCorrupt {
        path: path.to_path_buf(),
        reason,
    };
    let raw: RawStore<'_> = serde_json::from_slice(&plain)
        .map_err(|e| corrupt(format!("contents are not a Chitin secret store ({e})")))?;
    if raw.version != 1 {
        return Err(corrupt(format!(
            "store format version {} is not supported by this chitin",
            raw.version
        )));
    }
    let mut entries = BTreeMap::new();
    for r in raw.secrets {
        let name = SecretName::parse(&r.name).map_err(corrupt)?;
        let mut buf = Zeroizing::new(vec![0u8; r.value.len().div_ceil(4) * 3]);
        let n = STANDARD
            .decode_slice(r.value, &mut buf[..])
            .map_err(|_| corrupt(format!("value of `{name}` is not valid base64")))?;
        let mut exact = Vec::with_capacity(n);
        exact.extend_from_slice(buf.get(..n).unwrap_or_default());
        let audience = normalize_audience(&r.audience).map_err(|e| corrupt(e.to_string()))?;
        entries.insert(
            name,
            Entry {
                value: SecretValue::from_bytes(exact),
                audience,
                created_ms: r.created_ms,
                updated_ms: r.updated_ms,
            },
        );
    }
    Ok(entries)
}

fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Validates and normalizes audience hosts: DNS names or IP literals, no wildcards, no
/// ports or paths.
pub fn normalize_audience(hosts: &[String]) -> Result<Vec<String>, SecretsError> {
    let mut out: Vec<String> = Vec::new();
    for h in hosts {
        let n = normalize_host(h.trim());
        let bad = |reason: &str| SecretsError::InvalidAudience {
            host: h.escape_default().to_string(),
            reason: reason.into(),
        };
        if n.is_empty() || n.len() > 253 {
            return Err(bad("must be 1-253 characters"));
        }
        let ipv6 = n
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .is_some_and(|inner| inner.parse::<std::net::Ipv6Addr>().is_ok());
        if !ipv6 {
            if n.contains('*') {
                return Err(bad("wildcards are not allowed; list each host"));
            }
            if n.contains(':') || n.contains('/') {
                return Err(bad("give a host name only, without scheme, port or path"));
            }
            let ok = n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
                && !n.starts_with(['.', '-'])
                && !n.contains("..");
            if !ok {
                return Err(bad(
                    "use letters, digits, dots and hyphens (a DNS name or IPv4 address)",
                ));
            }
        }
        if !out.contains(&n) {
            out.push(n);
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
    use crate::clock::ManualClock;
    use crate::secrets::identity::FixedPassphrase;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Rec {
        log: RefCell<Vec<String>>,
        fail: bool,
    }
    impl SecretAudit for Rec {
        fn record_release(
            &self,
            name: &SecretName,
            audience: &[String],
            who: &str,
            host: &str,
        ) -> Result<(), String> {
            if self.fail {
                return Err("disk full".into());
            }
            self.log.borrow_mut().push(format!(
                "release {name} [{}] {who} {host}",
                audience.join(",")
            ));
            Ok(())
        }
        fn record_reveal(&self, name: &SecretName, who: &str) -> Result<(), String> {
            if self.fail {
                return Err("disk full".into());
            }
            self.log.borrow_mut().push(format!("reveal {name} {who}"));
            Ok(())
        }
        fn record_change(&self, op: &str, _: Option<&SecretName>, _: &str) -> Result<(), String> {
            self.log.borrow_mut().push(op.into());
            Ok(())
        }
    }

    fn cfg() -> SecretsConfig {
        SecretsConfig {
            backend: crate::config::secrets::IdentityBackend::Passphrase,
            scrypt_work_factor: 4,
            max_scrypt_work_factor: 10,
            ..SecretsConfig::default()
        }
    }

    fn open(home: &Path) -> SecretStore {
        SecretStore::open_with(
            home,
            &cfg(),
            Box::new(FixedPassphrase(SecretString::from("pw".to_string()))),
            Arc::new(ManualClock::new(1_000)),
        )
        .unwrap()
    }

    fn n(s: &str) -> SecretName {
        SecretName::parse(s).unwrap()
    }

    fn with_secret() -> (tempfile::TempDir, SecretStore) {
        let d = tempfile::tempdir().unwrap();
        let mut s = open(d.path());
        s.set(
            &n("OPENAI"),
            SecretValue::from_str_copy("sk-canary-123456"),
            &["API.openai.com.".to_string()],
        )
        .unwrap();
        (d, s)
    }

    #[test]
    fn a_release_to_an_audience_host_with_the_right_authorization_is_audited_first() {
        let (_d, s) = with_secret();
        let a = Authorized::for_test(
            "Chitin::Provider::\"openai\"",
            "secret.use",
            "Chitin::Secret::\"OPENAI\"",
        );
        let rec = Rec::default();
        let v = s.release(&a, "api.openai.com", &rec).unwrap();
        assert_eq!(v.expose(), b"sk-canary-123456");
        assert_eq!(
            rec.log.borrow().as_slice(),
            ["release OPENAI [api.openai.com] Chitin::Provider::\"openai\" api.openai.com"]
        );
    }

    #[test]
    fn a_reserved_secret_is_never_released_whatever_the_authorization_says() {
        let (d, mut s) = with_secret();
        crate::secrets::audit_key::signer(&mut s, d.path()).unwrap();
        let a = Authorized::for_test(
            "Chitin::Tool::\"exec\"",
            "secret.use",
            "Chitin::Secret::\"chitin.audit-signing-key\"",
        );
        let rec = Rec::default();
        let e = s.release_to_tool_env(&a, &rec).err().unwrap();
        assert!(
            e.to_string()
                .contains("is reserved for Chitin and is never released"),
            "{e}"
        );
        let e = s.release(&a, "api.openai.com", &rec).err().unwrap();
        assert!(matches!(e, SecretsError::ReleaseRefused { .. }), "{e}");
        assert!(
            rec.log.borrow().is_empty(),
            "nothing released, nothing recorded"
        );
    }

    #[test]
    fn a_release_to_a_host_outside_the_audience_is_refused() {
        let (_d, s) = with_secret();
        let a = Authorized::for_test("p", "secret.use", "Chitin::Secret::\"OPENAI\"");
        let rec = Rec::default();
        let e = s.release(&a, "evil.example", &rec).err().unwrap();
        assert!(matches!(e, SecretsError::ReleaseRefused { .. }), "{e}");
        assert!(e.to_string().contains("evil.example"));
        assert!(rec.log.borrow().is_empty());
    }

    #[test]
    fn an_authorization_for_another_action_or_secret_releases_nothing() {
        let (_d, s) = with_secret();
        let rec = Rec::default();
        let wrong_action = Authorized::for_test("p", "exec", "Chitin::Secret::\"OPENAI\"");
        assert!(matches!(
            s.release(&wrong_action, "api.openai.com", &rec),
            Err(SecretsError::ReleaseRefused { .. })
        ));
        let wrong_res = Authorized::for_test("p", "secret.use", "Chitin::Tool::\"OPENAI\"");
        assert!(matches!(
            s.release(&wrong_res, "api.openai.com", &rec),
            Err(SecretsError::ReleaseRefused { .. })
        ));
        let other = Authorized::for_test("p", "secret.use", "Chitin::Secret::\"OTHER\"");
        assert!(matches!(
            s.release(&other, "api.openai.com", &rec),
            Err(SecretsError::NotFound(_))
        ));
        assert!(rec.log.borrow().is_empty());
    }

    #[test]
    fn a_failing_audit_hook_blocks_the_release_and_the_reveal() {
        let (_d, s) = with_secret();
        let a = Authorized::for_test("p", "secret.use", "Chitin::Secret::\"OPENAI\"");
        let rec = Rec {
            fail: true,
            ..Rec::default()
        };
        assert!(matches!(
            s.release(&a, "api.openai.com", &rec),
            Err(SecretsError::AuditFailed { .. })
        ));
        assert!(matches!(
            s.reveal(&n("OPENAI"), "cli", &rec),
            Err(SecretsError::AuditFailed { .. })
        ));
    }

    #[test]
    fn a_tool_gets_a_secret_in_its_environment_only_as_the_authorized_principal() {
        let (_d, s) = with_secret();
        let rec = Rec::default();
        let a = Authorized::for_test(
            "Chitin::Tool::\"gh\"",
            "secret.use",
            "Chitin::Secret::\"OPENAI\"",
        );
        let (name, v) = s.release_to_tool_env(&a, &rec).unwrap();
        assert_eq!(name.as_str(), "OPENAI");
        assert_eq!(v.expose(), b"sk-canary-123456");
        assert!(rec.log.borrow()[0].ends_with("env:gh"));
        let user = Authorized::for_test(
            "Chitin::User::\"alice\"",
            "secret.use",
            "Chitin::Secret::\"OPENAI\"",
        );
        assert!(matches!(
            s.release_to_tool_env(&user, &rec),
            Err(SecretsError::ReleaseRefused { .. })
        ));
    }

    #[test]
    fn a_tool_that_prints_its_environment_shows_the_model_only_redacted_output() {
        let (_d, s) = with_secret();
        let rec = Rec::default();
        let a = Authorized::for_test(
            "Chitin::Tool::\"printenv\"",
            "secret.use",
            "Chitin::Secret::\"OPENAI\"",
        );
        let (name, v) = s.release_to_tool_env(&a, &rec).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg("env; env | base64 -w0; echo; env | od -An -tx1 | tr -d ' \\n'")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env(name.as_str(), v.expose_str().unwrap())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("sk-canary-123456"));
        let shown = s.redactor().redact_bytes(&out.stdout).into_owned();
        let shown = String::from_utf8(shown).unwrap();
        assert!(shown.contains("OPENAI=[REDACTED:OPENAI]"), "{shown}");
        assert!(
            s.redactor().find_leak(shown.as_bytes()).is_none(),
            "{shown}"
        );
    }

    #[test]
    fn rotation_keeps_every_secret_and_changes_the_identity() {
        let (d, mut s) = with_secret();
        let before = s.export_identity().unwrap();
        s.rotate_key().unwrap();
        let after = s.export_identity().unwrap();
        assert_ne!(before.lines().last(), after.lines().last());
        let s2 = open(d.path());
        assert_eq!(s2.list().len(), 1);
        let rec = Rec::default();
        assert_eq!(
            s2.reveal(&n("OPENAI"), "t", &rec).unwrap().expose(),
            b"sk-canary-123456"
        );
    }

    #[test]
    fn a_second_writer_with_a_stale_view_is_refused_instead_of_losing_an_update() {
        let d = tempfile::tempdir().unwrap();
        let mut a = open(d.path());
        let mut b = open(d.path());
        a.set(&n("A"), SecretValue::from_str_copy("value-from-a-1"), &[])
            .unwrap();
        // b opened before a created the identity and the store.
        let e = b
            .set(&n("B"), SecretValue::from_str_copy("value-from-b-1"), &[])
            .unwrap_err();
        assert!(
            matches!(e, SecretsError::ConcurrentModification { .. }),
            "{e}"
        );
        let mut b = open(d.path());
        b.set(&n("B"), SecretValue::from_str_copy("value-from-b-1"), &[])
            .unwrap();
        let e = a.remove(&n("A")).unwrap_err();
        assert!(
            matches!(e, SecretsError::ConcurrentModification { .. }),
            "{e}"
        );
        let names: Vec<_> = open(d.path()).list().into_iter().map(|i| i.name).collect();
        assert_eq!(names, [n("A"), n("B")]);
    }

    #[test]
    fn wildcard_and_url_audiences_are_refused() {
        for bad in ["*.example.com", "https://x.com", "x.com:443", "a b", ""] {
            assert!(normalize_audience(&[bad.to_string()]).is_err(), "{bad}");
        }
        assert_eq!(
            normalize_audience(&["Api.X.com.".into(), "10.0.0.1".into(), "[::1]".into()]).unwrap(),
            ["api.x.com", "10.0.0.1", "[::1]"]
        );
    }
}
