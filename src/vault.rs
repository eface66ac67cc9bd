//! Per-subject data keys and sealing (crypto-shredding).
//!
//! Every piece of personal content Chitin stores (transcript messages, tool outputs,
//! attachments, session summaries) is sealed with a key that belongs to one data subject: a
//! Cedar entity reference of type `Chitin::User` or `Chitin::Identity`. Destroying that key
//! ([`Vault::destroy`]) makes every copy of the subject's content unreadable, wherever the
//! ciphertext still lies (free pages, WAL frames, old backups).
//!
//! Design:
//! - Sealed format: `"CV1" ‖ key id (16) ‖ nonce (24) ‖ XChaCha20-Poly1305(ciphertext ‖ tag)`
//!   with associated data `"chitin-vault-v1\0" ‖ subject ‖ "\0" ‖ key id`, so a sealed blob
//!   moved to another subject's row does not open.
//! - Data keys live in `vault.keys` in the state directory, itself sealed with XChaCha20-Poly1305
//!   under the vault master key; the master key lives in the secret store under the reserved
//!   name `chitin.vault-key` (never released or revealed).
//! - **Backups carry `vault.keys`** (sealed under the master key, inside the archive encrypted
//!   to the backup recipient), so a restore onto a new machine brings content back. A restore
//!   where a `vault.keys` exists keeps it and erases again every subject erased since the backup
//!   (see `docs/parts/SECURITY.lifecycle.md` for what this means for old backup files).
//! - A destroyed key leaves a tombstone (its random id and the time, not the subject), so
//!   [`Vault::open`] reports [`VaultError::Erased`] and a restore can purge rows sealed with
//!   erased keys.
//! - Keys are cached in memory (zeroized on drop). Each call compares the file's identity
//!   (inode, size, mtime) with the cached one and reloads after another process (the CLI's
//!   `data erase`) changed it; every write re-reads the file under `vault.lock`, so a process
//!   with a stale cache never resurrects a destroyed key.
//! - **On PostgreSQL** (several gateways, [`Vault::for_db`]) the same sealed bytes live in the
//!   one row of the table `vault_keys` (migration 24) instead of the file, shared by every
//!   replica (same secret store, same master key). A write is one transaction that locks the
//!   row (`FOR UPDATE`; inserted empty first if missing, so two replicas creating keys at once
//!   serialize), re-reads it, changes it, writes it with `version + 1` and sends
//!   `pg_notify('chitin_vault', version)`. The cache is reloaded without a round trip on the
//!   hot path: when a key id or subject is not in the cache (a key another replica created),
//!   when a notification says the version moved, and, as the fallback for lost notifications
//!   (a listener gap), on the first call [`DB_RELOAD_EVERY`] after the last load. **Bound:** a
//!   key destroyed on another replica stops opening here on the first call after its
//!   notification arrives (normally milliseconds after the erasure commits), and in any case
//!   on every call made [`DB_RELOAD_EVERY`] or more after it.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::clock::{Clock, SystemClock};
use crate::config::secrets::SecretsConfig;
use crate::secrets::{SecretName, SecretStore, SecretValue, SecretsError, fsutil};

/// The sealed data-key file in the state directory (in backups; see the module docs).
pub const VAULT_FILE: &str = "vault.keys";
/// Writers of `vault.keys` serialize on an exclusive lock of this file.
pub const VAULT_LOCK: &str = "vault.lock";
/// The reserved secret holding the master key (64 hex digits).
pub const VAULT_KEY_SECRET: &str = "chitin.vault-key";
/// The notification channel on which a replica announces a new version of `vault_keys`.
pub const VAULT_CHANNEL: &str = "chitin_vault";
/// On PostgreSQL, the longest a cached key set is used without re-reading `vault_keys` when
/// notifications were lost (see the module docs).
pub const DB_RELOAD_EVERY: Duration = Duration::from_secs(3);

const SEAL_MAGIC: &[u8; 3] = b"CV1";
const FILE_MAGIC: &[u8; 4] = b"CVK1";
const ID_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = SEAL_MAGIC.len() + ID_LEN + NONCE_LEN;
const SEAL_AD: &[u8] = b"chitin-vault-v1\0";
const FILE_AD: &[u8] = b"chitin-vault-keys-v1";
const MAX_SUBJECT_ID: usize = 256;

/// Errors of the vault. Messages never carry content or key material.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("the data of {subject} was erased (its key was destroyed); it cannot be read")]
    Erased { subject: String },
    #[error(
        "invalid subject `{0}`: expected a Cedar entity reference such as \
         Chitin::User::\"alice\" or Chitin::Identity::\"telegram:12345\""
    )]
    InvalidSubject(String),
    #[error("sealed data is malformed or not made by the vault: {0}")]
    Malformed(&'static str),
    #[error(
        "sealed data for {subject} does not open: it was sealed for another subject or changed"
    )]
    Tampered { subject: String },
    #[error(
        "no data key for {subject} matches the sealed data; was vault.keys replaced or restored \
         from elsewhere?"
    )]
    UnknownKey { subject: String },
    #[error(
        "{path} cannot be decrypted with the vault key in the secret store ({reason}); restore the \
         matching secrets.age, or move {path} away (sealed content becomes unreadable)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} exists but the secret store has no `{VAULT_KEY_SECRET}`; restore the secret store \
         that holds it, or move {path} away (sealed content becomes unreadable)"
    )]
    MasterKeyMissing { path: PathBuf },
    #[error(
        "the database {location} holds the deployment's data keys (table vault_keys) but this \
         secret store has no `{VAULT_KEY_SECRET}`: every gateway of a deployment needs the same \
         secret store identity (copy secrets.age and its identity from a running replica)"
    )]
    MasterKeyMissingInDb { location: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
    #[error("vault lock poisoned by a panic in another thread; restart the gateway")]
    Poisoned,
    #[error(
        "the vault's data keys in the database (table vault_keys) cannot be read or written: \
         {0}; check that PostgreSQL answers and the [store] settings"
    )]
    Store(#[from] chitin_store::Error),
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> VaultError + 'a {
    move |source| VaultError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The kind of a data subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SubjectKind {
    User,
    Identity,
}

/// A data subject: `Chitin::User::"<id>"` or `Chitin::Identity::"<id>"`, parsed strictly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subject {
    pub kind: SubjectKind,
    pub id: String,
}

impl Subject {
    /// Parses a subject. Strict: exactly `Chitin::User::"ID"` or `Chitin::Identity::"ID"`, no
    /// whitespace, `ID` of 1..=256 characters without quotes, backslashes, control or
    /// bidirectional-formatting characters (so the text is its own canonical form).
    pub fn parse(text: &str) -> Result<Self, VaultError> {
        let bad = || VaultError::InvalidSubject(printable(text));
        let (kind, rest) = if let Some(r) = text.strip_prefix("Chitin::User::\"") {
            (SubjectKind::User, r)
        } else if let Some(r) = text.strip_prefix("Chitin::Identity::\"") {
            (SubjectKind::Identity, r)
        } else {
            return Err(bad());
        };
        let id = rest.strip_suffix('"').ok_or_else(bad)?;
        if id.is_empty()
            || id.chars().count() > MAX_SUBJECT_ID
            || id.chars().any(|c| {
                c == '"'
                    || c == '\\'
                    || c.is_control()
                    || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            })
        {
            return Err(bad());
        }
        Ok(Self {
            kind,
            id: id.to_owned(),
        })
    }

    /// `sha256:<hex>` of the subject (domain-separated): names a subject in records that must
    /// not carry it (erasure receipts, tombstones). Guessable ids can be confirmed by hashing
    /// candidates; it is a pseudonym, not a secret.
    pub fn digest(&self) -> String {
        subject_digest_of(&self.to_string())
    }

    /// The user id when this is a `Chitin::User`.
    pub fn user_id(&self) -> Option<&str> {
        (self.kind == SubjectKind::User).then_some(self.id.as_str())
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.kind {
            SubjectKind::User => "User",
            SubjectKind::Identity => "Identity",
        };
        write!(f, "Chitin::{t}::\"{}\"", self.id)
    }
}

fn subject_digest_of(subject: &str) -> String {
    let mut data = b"chitin-subject-v1\0".to_vec();
    data.extend_from_slice(subject.as_bytes());
    format!(
        "sha256:{}",
        chitin_audit::to_hex(&chitin_audit::sha256(&data))
    )
}

/// Escapes control characters so an error message cannot forge terminal output.
fn printable(text: &str) -> String {
    text.chars()
        .take(300)
        .flat_map(char::escape_debug)
        .collect()
}

/// The random id of a data key (public: it appears in sealed data and tombstones).
pub type KeyId = [u8; ID_LEN];

struct DataKey {
    id: KeyId,
    key: Zeroizing<[u8; 32]>,
    created_ms: i64,
}

/// The identity of `vault.keys` as last read (inode, size, mtime): a change means another
/// process wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_ns: i64,
}

#[derive(Clone)]
struct Tombstone {
    erased_ms: i64,
    subject_digest: Option<String>,
}

#[derive(Default)]
struct Keys {
    stamp: Option<Stamp>,
    /// The `vault_keys` row's version as last read (database backing).
    version: i64,
    by_subject: BTreeMap<String, DataKey>,
    /// Tombstones: destroyed key id → (when, digest of the subject).
    erased: BTreeMap<KeyId, Tombstone>,
}

/// Where the sealed key set lives.
enum Backing {
    /// `vault.keys` in the state directory (SQLite deployments: one gateway).
    File,
    /// The row of `vault_keys` in the shared database (PostgreSQL: several gateways).
    Db(DbBacking),
}

struct DbBacking {
    db: chitin_store::Db,
    watch: Mutex<Watch>,
    /// [`DB_RELOAD_EVERY`] (longer in the tests that must see the notification work alone).
    reload_every: Duration,
}

/// What tells a database-backed vault that its cache may be stale.
struct Watch {
    /// On [`VAULT_CHANNEL`]; `None` when it could not be opened (the fallback reload holds).
    listener: Option<chitin_store::Listener>,
    loaded_at: Option<Instant>,
}

/// The vault: seals and opens content per subject. `Send + Sync`; share it in an `Arc`.
pub struct Vault {
    path: PathBuf,
    lock_path: PathBuf,
    backing: Backing,
    master: Zeroizing<[u8; 32]>,
    clock: Arc<dyn Clock>,
    keys: RwLock<Keys>,
    /// Moves whenever this handle learns of a destroyed key (its own `destroy`, or a reload
    /// after another process destroyed one): caches of opened content start over.
    erasures: AtomicU64,
    /// Called after a key is destroyed: with the subject when this handle destroyed it, with
    /// `None` when a reload showed another process destroyed one.
    erase_hooks: Mutex<Vec<Weak<EraseHook>>>,
}

/// What [`Vault::on_erase`] calls: `Some(subject)` for a key this handle destroyed, `None`
/// when another process destroyed one (which subject is not known here).
pub type EraseHook = dyn Fn(Option<&str>) + Send + Sync;

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backing {
            Backing::File => f.debug_struct("Vault").field("path", &self.path).finish(),
            Backing::Db(b) => f
                .debug_struct("Vault")
                .field("db", &b.db.location())
                .finish(),
        }
    }
}

impl Vault {
    /// Opens the vault of the state directory `home`, unlocking the secret store with the
    /// configured protection (`CHITIN_PASSPHRASE`, prompt or keyring cache). Creates the master
    /// key in the store on first use.
    pub fn unlock(home: &Path, cfg: &SecretsConfig) -> Result<Self, VaultError> {
        let mut store = SecretStore::open(home, cfg)?;
        Self::from_store(home, &mut store, Arc::new(SystemClock))
    }

    /// [`Vault::unlock`] with a secret store the caller already unlocked (the gateway and the
    /// CLI's `Runtime` hold one) and an explicit clock.
    pub fn from_store(
        home: &Path,
        store: &mut SecretStore,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, VaultError> {
        let path = home.join(VAULT_FILE);
        let exists = fsutil::exists(&path);
        let master = master_key(store, exists, &path)?;
        let vault = Self::with_backing(home, master, clock, Backing::File);
        vault.refresh()?;
        Ok(vault)
    }

    /// The vault of a deployment whose state store is `db`: on PostgreSQL the key set is the
    /// shared `vault_keys` row (every replica sees every key and every erasure), on SQLite
    /// the file `vault.keys` of `home` ([`Vault::from_store`]).
    pub fn for_db(
        home: &Path,
        db: &chitin_store::Db,
        store: &mut SecretStore,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, VaultError> {
        if db.dialect() == chitin_store::Dialect::Sqlite {
            return Self::from_store(home, store, clock);
        }
        let exists = !read_row(db)?.0.is_empty();
        let master = master_key(store, exists, &db_label(db)).map_err(|e| match e {
            VaultError::MasterKeyMissing { .. } => VaultError::MasterKeyMissingInDb {
                location: db.location().to_string(),
            },
            e => e,
        })?;
        let vault = Self::with_backing(home, master, clock, Backing::Db(db_backing(db)?));
        vault.refresh()?;
        if !exists && fsutil::exists(&vault.path) {
            tracing::warn!(
                file = %vault.path.display(),
                "the database holds no data keys but this state directory has a vault.keys: \
                 content sealed with those keys does not open here; move the deployment with \
                 `chitin store copy --from sqlite --to postgres`, which copies them"
            );
        }
        Ok(vault)
    }

    fn with_backing(
        home: &Path,
        master: Zeroizing<[u8; 32]>,
        clock: Arc<dyn Clock>,
        backing: Backing,
    ) -> Self {
        Self {
            lock_path: home.join(VAULT_LOCK),
            path: home.join(VAULT_FILE),
            backing,
            master,
            clock,
            keys: RwLock::new(Keys::default()),
            erasures: AtomicU64::new(0),
            erase_hooks: Mutex::new(Vec::new()),
        }
    }

    /// The data-key file (on PostgreSQL the keys are in the database: see
    /// [`Vault::sealed_keys`]).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the keys live in the database (PostgreSQL) rather than in `vault.keys`.
    pub fn in_db(&self) -> bool {
        matches!(self.backing, Backing::Db(_))
    }

    /// The sealed key set as it is stored now (the bytes of `vault.keys`), `None` when no
    /// key was ever made: what a backup carries as its `vault.keys` member.
    pub fn sealed_keys(&self) -> Result<Option<Vec<u8>>, VaultError> {
        match &self.backing {
            Backing::File => Ok(fsutil::read_private(&self.path)?.map(|b| b.to_vec())),
            Backing::Db(b) => sealed_keys_in(&b.db),
        }
    }

    /// Seals `plaintext` for `subject` (a Cedar entity reference), creating the subject's key on
    /// first use. A fresh random nonce every time.
    pub fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
        let subject = Subject::parse(subject)?.to_string();
        self.refresh()?;
        {
            let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
            if let Some(k) = keys.by_subject.get(&subject) {
                return seal_with(k, &subject, plaintext);
            }
        }
        self.modify(|keys, now| {
            if !keys.by_subject.contains_key(&subject) {
                let mut key = Zeroizing::new([0u8; 32]);
                random(&mut key[..])?;
                let mut id = [0u8; ID_LEN];
                random(&mut id)?;
                keys.by_subject.insert(
                    subject.clone(),
                    DataKey {
                        id,
                        key,
                        created_ms: now,
                    },
                );
                return Ok(true);
            }
            Ok(false)
        })?;
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        let k = keys
            .by_subject
            .get(&subject)
            .ok_or_else(|| VaultError::UnknownKey {
                subject: subject.clone(),
            })?;
        seal_with(k, &subject, plaintext)
    }

    /// Opens what [`Vault::seal`] sealed for `subject`. [`VaultError::Erased`] when the key was
    /// destroyed; [`VaultError::Tampered`] when the blob was changed or sealed for another
    /// subject.
    pub fn open(&self, subject: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let subject = Subject::parse(subject)?.to_string();
        let (id, nonce, ct) = split(sealed)?;
        self.refresh()?;
        if self.in_db() && !self.knows(&id)? {
            // A key another replica created (or destroyed) since the cache was loaded.
            self.reload()?;
        }
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        let Some(k) = keys.by_subject.get(&subject).filter(|k| k.id == id) else {
            if keys.erased.contains_key(&id) {
                return Err(VaultError::Erased { subject });
            }
            if keys.by_subject.values().any(|k| k.id == id) {
                return Err(VaultError::Tampered { subject });
            }
            return Err(VaultError::UnknownKey { subject });
        };
        let cipher = XChaCha20Poly1305::new((&*k.key).into());
        let ad = associated_data(&subject, &id);
        cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &ad })
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Tampered { subject })
    }

    /// Destroys `subject`'s data key (crypto-shredding): every blob sealed with it becomes
    /// unreadable, here and in every backup. Returns whether a key existed. Idempotent.
    pub fn destroy(&self, subject: &str) -> Result<bool, VaultError> {
        let subject = Subject::parse(subject)?.to_string();
        let destroyed = self.modify(|keys, now| match keys.by_subject.remove(&subject) {
            Some(k) => {
                keys.erased.insert(
                    k.id,
                    Tombstone {
                        erased_ms: now,
                        subject_digest: Some(subject_digest_of(&subject)),
                    },
                );
                Ok(true)
            }
            None => Ok(false),
        })?;
        if destroyed {
            self.erasures.fetch_add(1, Ordering::SeqCst);
            self.fire_erase_hooks(Some(&subject));
        }
        Ok(destroyed)
    }

    /// A number that changes whenever a data key is destroyed (here or, noticed by a reload,
    /// in another process): what a cache of opened content compares before it serves.
    pub fn erasure_epoch(&self) -> Result<u64, VaultError> {
        self.refresh()?;
        Ok(self.erasures.load(Ordering::SeqCst))
    }

    /// Calls `hook` after every key destruction from now on (while `hook` lives): a cache of
    /// opened content drops the subject's plaintext at once.
    pub fn on_erase(&self, hook: Weak<EraseHook>) {
        if let Ok(mut hooks) = self.erase_hooks.lock() {
            hooks.retain(|h| h.strong_count() > 0);
            hooks.push(hook);
        }
    }

    fn fire_erase_hooks(&self, subject: Option<&str>) {
        let live: Vec<Arc<EraseHook>> = match self.erase_hooks.lock() {
            Ok(hooks) => hooks.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        for h in live {
            h(subject);
        }
    }

    /// Whether `loaded` carries a tombstone the cached keys do not (another process
    /// destroyed a key since this handle last read the file).
    fn foreign_erasure(&self, loaded: &Keys) -> Result<bool, VaultError> {
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(loaded.erased.keys().any(|id| !keys.erased.contains_key(id)))
    }

    /// Replaces the cached keys; `foreign` (see [`Self::foreign_erasure`]) moves the erasure
    /// epoch and tells the hooks.
    fn replace_keys(&self, new: Keys, foreign: bool) -> Result<(), VaultError> {
        *self.keys.write().map_err(|_| VaultError::Poisoned)? = new;
        if foreign {
            self.erasures.fetch_add(1, Ordering::SeqCst);
            self.fire_erase_hooks(None);
        }
        Ok(())
    }

    /// Whether the cache holds the key `id` (live or destroyed).
    fn knows(&self, id: &KeyId) -> Result<bool, VaultError> {
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(keys.erased.contains_key(id) || keys.by_subject.values().any(|k| &k.id == id))
    }

    /// [`Self::refresh`], and on the database backing a reload whatever the cache says (for
    /// the calls off the hot path that must see every other replica's last write).
    fn refresh_now(&self) -> Result<(), VaultError> {
        if self.in_db() {
            self.reload()
        } else {
            self.refresh()
        }
    }

    /// Whether `subject` currently has a data key.
    pub fn has_key(&self, subject: &str) -> Result<bool, VaultError> {
        let subject = Subject::parse(subject)?.to_string();
        self.refresh_now()?;
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(keys.by_subject.contains_key(&subject))
    }

    /// Whether `sealed` was sealed with a key that has since been destroyed (used after a
    /// restore to purge rows of erased subjects).
    pub fn is_erased_blob(&self, sealed: &[u8]) -> Result<bool, VaultError> {
        let (id, _, _) = split(sealed)?;
        self.refresh()?;
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(keys.erased.contains_key(&id))
    }

    /// The ids of the data keys that exist now (ids are public; for canary sweeps and audits).
    pub fn live_key_ids(&self) -> Result<Vec<KeyId>, VaultError> {
        self.refresh_now()?;
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(keys.by_subject.values().map(|k| k.id).collect())
    }

    /// Erasures made after `since_ms`: `(subject digest, erased_ms)` (used after a restore to
    /// erase again what an older backup brought back).
    pub fn erasures_since(&self, since_ms: i64) -> Result<Vec<(String, i64)>, VaultError> {
        self.refresh_now()?;
        let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
        Ok(keys
            .erased
            .values()
            .filter(|t| t.erased_ms > since_ms)
            .filter_map(|t| t.subject_digest.clone().map(|d| (d, t.erased_ms)))
            .collect())
    }

    /// The key id inside a sealed blob.
    pub fn key_id_of(sealed: &[u8]) -> Result<KeyId, VaultError> {
        split(sealed).map(|(id, _, _)| id)
    }

    /// Reloads the key set if another process (or replica) changed it since this handle last
    /// read it: the file's identity, or on the database backing the notifications and the
    /// fallback period (see the module docs).
    fn refresh(&self) -> Result<(), VaultError> {
        let Backing::Db(b) = &self.backing else {
            return self.refresh_file();
        };
        let cached = self.keys.read().map_err(|_| VaultError::Poisoned)?.version;
        let stale = {
            let mut w = b.watch.lock().map_err(|_| VaultError::Poisoned)?;
            let mut stale = w.loaded_at.is_none_or(|t| t.elapsed() >= b.reload_every);
            if let Some(l) = w.listener.as_mut() {
                while let Some(n) = l.try_recv() {
                    match n {
                        chitin_store::Notice::Notification(n) => {
                            // Our own writes come back too: only a newer version counts.
                            if n.payload.parse::<i64>().is_ok_and(|v| v > cached) {
                                stale = true;
                            }
                        }
                        chitin_store::Notice::Gap => stale = true,
                    }
                }
            }
            stale
        };
        if stale { self.reload() } else { Ok(()) }
    }

    /// Reads the `vault_keys` row and replaces the cache (database backing).
    fn reload(&self) -> Result<(), VaultError> {
        let Backing::Db(b) = &self.backing else {
            return self.refresh_file();
        };
        let started = Instant::now();
        let (bytes, version) = read_row(&b.db)?;
        let mut loaded = self.decode(&bytes)?;
        loaded.version = version;
        let foreign = self.foreign_erasure(&loaded)?;
        self.replace_keys(loaded, foreign)?;
        b.watch.lock().map_err(|_| VaultError::Poisoned)?.loaded_at = Some(started);
        Ok(())
    }

    /// Reloads `vault.keys` if another process changed it since this handle last read it.
    fn refresh_file(&self) -> Result<(), VaultError> {
        let now = stamp(&self.path)?;
        {
            let keys = self.keys.read().map_err(|_| VaultError::Poisoned)?;
            if keys.stamp == now {
                return Ok(());
            }
        }
        let loaded = self.load()?;
        let foreign = self.foreign_erasure(&loaded)?;
        self.replace_keys(loaded, foreign)
    }

    /// Read-modify-write under `vault.lock`: re-reads the file, applies `change`, writes the file
    /// atomically if `change` says it changed something, and replaces the cache.
    fn modify(
        &self,
        change: impl FnOnce(&mut Keys, i64) -> Result<bool, VaultError>,
    ) -> Result<bool, VaultError> {
        if let Backing::Db(b) = &self.backing {
            return self.modify_db(b, change);
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.lock_path)
            .map_err(io(&self.lock_path, "open"))?;
        lock.lock().map_err(io(&self.lock_path, "lock"))?;
        let mut keys = self.load()?;
        let foreign = self.foreign_erasure(&keys)?;
        let out = change(&mut keys, self.clock.now_ms())?;
        if out {
            let bytes = self.encode(&keys)?;
            fsutil::write_atomic(&self.path, &bytes)?;
            keys.stamp = stamp(&self.path)?;
        }
        drop(lock);
        self.replace_keys(keys, foreign)?;
        Ok(out)
    }

    /// The database backing's read-modify-write: one transaction holding the row's lock
    /// from the read to the write, which also sends the new version on [`VAULT_CHANNEL`]
    /// (delivered when it commits).
    fn modify_db(
        &self,
        b: &DbBacking,
        change: impl FnOnce(&mut Keys, i64) -> Result<bool, VaultError>,
    ) -> Result<bool, VaultError> {
        let started = Instant::now();
        let now = self.clock.now_ms();
        let (keys, foreign, out) = b.db.tx(|c| -> Result<_, VaultError> {
            c.execute(
                "INSERT INTO vault_keys (id, sealed, version) VALUES (1, ?1, 0)
                 ON CONFLICT (id) DO NOTHING",
                chitin_store::params![Vec::<u8>::new()],
            )?;
            let sql = match c.dialect() {
                chitin_store::Dialect::Postgres => {
                    "SELECT sealed, version FROM vault_keys WHERE id = 1 FOR UPDATE"
                }
                chitin_store::Dialect::Sqlite => {
                    "SELECT sealed, version FROM vault_keys WHERE id = 1"
                }
            };
            let row = c.query_row(sql, chitin_store::params![])?;
            let bytes: Vec<u8> = row.get(0)?;
            let version: i64 = row.get(1)?;
            let mut keys = self.decode(&bytes)?;
            keys.version = version;
            let foreign = self.foreign_erasure(&keys)?;
            let out = change(&mut keys, now)?;
            if out {
                let sealed = self.encode(&keys)?;
                keys.version = version + 1;
                c.execute(
                    "UPDATE vault_keys SET sealed = ?1, version = ?2 WHERE id = 1",
                    chitin_store::params![sealed, keys.version],
                )?;
                if c.dialect() == chitin_store::Dialect::Postgres {
                    c.execute(
                        "SELECT pg_notify(?1, ?2)",
                        chitin_store::params![VAULT_CHANNEL, keys.version.to_string()],
                    )?;
                }
            }
            Ok((keys, foreign, out))
        })?;
        if out && b.db.dialect() == chitin_store::Dialect::Sqlite {
            b.db.notify(VAULT_CHANNEL, &keys.version.to_string())?;
        }
        self.replace_keys(keys, foreign)?;
        b.watch.lock().map_err(|_| VaultError::Poisoned)?.loaded_at = Some(started);
        Ok(out)
    }

    fn load(&self) -> Result<Keys, VaultError> {
        let before = stamp(&self.path)?;
        let Some(bytes) = fsutil::read_private(&self.path)? else {
            return Ok(Keys::default());
        };
        let mut keys = self.decode(&bytes)?;
        keys.stamp = before;
        Ok(keys)
    }

    /// Where the key set lives, for messages.
    fn location(&self) -> PathBuf {
        match &self.backing {
            Backing::File => self.path.clone(),
            Backing::Db(b) => db_label(&b.db),
        }
    }

    /// The key set of sealed bytes (empty: no keys).
    fn decode(&self, bytes: &[u8]) -> Result<Keys, VaultError> {
        if bytes.is_empty() && self.in_db() {
            return Ok(Keys::default());
        }
        let corrupt = |reason: &str| VaultError::Corrupt {
            path: self.location(),
            reason: reason.into(),
        };
        let body = bytes
            .strip_prefix(&FILE_MAGIC[..])
            .ok_or_else(|| corrupt("not a vault key file"))?;
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(corrupt("truncated"));
        }
        let (nonce, ct) = body.split_at(NONCE_LEN);
        let cipher = XChaCha20Poly1305::new((&*self.master).into());
        let plain = Zeroizing::new(
            cipher
                .decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: FILE_AD,
                    },
                )
                .map_err(|_| corrupt("authentication failed"))?,
        );
        let raw: RawFile<'_> =
            serde_json::from_slice(&plain).map_err(|_| corrupt("malformed contents"))?;
        if raw.version != 1 {
            return Err(corrupt("unknown version"));
        }
        let mut keys = Keys::default();
        for e in raw.keys {
            let id = decode_id(e.id).ok_or_else(|| corrupt("bad key id"))?;
            let key = decode_key(e.key).ok_or_else(|| corrupt("bad key"))?;
            Subject::parse(&e.subject).map_err(|_| corrupt("bad subject"))?;
            keys.by_subject.insert(
                e.subject,
                DataKey {
                    id,
                    key,
                    created_ms: e.created_ms,
                },
            );
        }
        for t in raw.erased {
            let id = decode_id(&t.id).ok_or_else(|| corrupt("bad tombstone"))?;
            keys.erased.insert(
                id,
                Tombstone {
                    erased_ms: t.erased_ms,
                    subject_digest: t.subject_digest,
                },
            );
        }
        Ok(keys)
    }

    fn encode(&self, keys: &Keys) -> Result<Vec<u8>, VaultError> {
        let hexes: Vec<(String, Zeroizing<String>)> = keys
            .by_subject
            .values()
            .map(|k| {
                (
                    chitin_audit::to_hex(&k.id),
                    Zeroizing::new(chitin_audit::to_hex(&k.key[..])),
                )
            })
            .collect();
        let file = RawFileOut {
            version: 1,
            keys: keys
                .by_subject
                .iter()
                .zip(&hexes)
                .map(|((subject, k), (id, key))| RawKeyOut {
                    subject,
                    id,
                    key: key.as_str(),
                    created_ms: k.created_ms,
                })
                .collect(),
            erased: keys
                .erased
                .iter()
                .map(|(id, t)| RawTombstone {
                    id: chitin_audit::to_hex(id),
                    erased_ms: t.erased_ms,
                    subject_digest: t.subject_digest.clone(),
                })
                .collect(),
        };
        // Reserved up front so the buffer holding key material is never reallocated (a
        // reallocation would leave an unzeroized copy behind).
        let mut plain = Zeroizing::new(Vec::with_capacity(
            64 + keys.by_subject.len() * (MAX_SUBJECT_ID * 6 + 256) + keys.erased.len() * 256,
        ));
        serde_json::to_writer(&mut *plain, &file).map_err(|e| VaultError::Corrupt {
            path: self.location(),
            reason: e.to_string(),
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let cipher = XChaCha20Poly1305::new((&*self.master).into());
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: FILE_AD,
                },
            )
            .map_err(|_| VaultError::Random("encryption failed".into()))?;
        let mut out = Vec::with_capacity(FILE_MAGIC.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(FILE_MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }
}

/// The master key from the secret store, created there on first use; refused when it is
/// missing but sealed keys exist (`exists`, at `path`).
fn master_key(
    store: &mut SecretStore,
    exists: bool,
    path: &Path,
) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    let name = SecretName::parse(VAULT_KEY_SECRET).map_err(SecretsError::InvalidName)?;
    match store.internal_value(&name) {
        Some(v) => master_of(v),
        None if exists => Err(VaultError::MasterKeyMissing {
            path: path.to_path_buf(),
        }),
        None => {
            let mut k = Zeroizing::new([0u8; 32]);
            random(&mut k[..])?;
            let hex = Zeroizing::new(chitin_audit::to_hex(&k[..]));
            store.set(&name, SecretValue::from_str_copy(&hex), &[])?;
            Ok(k)
        }
    }
}

/// How messages name the database's key set.
fn db_label(db: &chitin_store::Db) -> PathBuf {
    PathBuf::from(format!("the table vault_keys of {}", db.location()))
}

fn db_backing(db: &chitin_store::Db) -> Result<DbBacking, VaultError> {
    let listener = match db.listen(&[VAULT_CHANNEL]) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "the vault cannot listen for other replicas' key changes; it re-reads them every few seconds instead");
            None
        }
    };
    Ok(DbBacking {
        db: db.clone(),
        watch: Mutex::new(Watch {
            listener,
            loaded_at: None,
        }),
        reload_every: DB_RELOAD_EVERY,
    })
}

/// The `vault_keys` row: its sealed bytes (empty: no keys yet) and version (0: no row).
fn read_row(db: &chitin_store::Db) -> Result<(Vec<u8>, i64), VaultError> {
    let row = db.with(|c| {
        c.query_opt(
            "SELECT sealed, version FROM vault_keys WHERE id = 1",
            chitin_store::params![],
        )
    })?;
    match row {
        Some(r) => Ok((r.get(0)?, r.get(1)?)),
        None => Ok((Vec::new(), 0)),
    }
}

/// The sealed key set held by the database `db` (the bytes a `vault.keys` file would hold),
/// `None` when it holds none: what a backup of a PostgreSQL deployment carries as its
/// `vault.keys` member.
pub fn sealed_keys_in(db: &chitin_store::Db) -> Result<Option<Vec<u8>>, VaultError> {
    let (bytes, _) = read_row(db)?;
    Ok((!bytes.is_empty()).then_some(bytes))
}

/// Writes `sealed` (the bytes of a `vault.keys` file, sealed under the same master key) as
/// the key set of the database `db`, replacing what it holds, and tells every replica. For
/// `chitin store copy` (moving a deployment's keys into PostgreSQL) and a restore onto a
/// database without keys.
pub fn install_sealed_keys(db: &chitin_store::Db, sealed: &[u8]) -> Result<(), VaultError> {
    if !sealed.starts_with(FILE_MAGIC) {
        return Err(VaultError::Corrupt {
            path: PathBuf::from(VAULT_FILE),
            reason: "not a vault key file".into(),
        });
    }
    let version = db.tx(|c| -> Result<i64, VaultError> {
        let version: i64 = c
            .query_row(
                "INSERT INTO vault_keys (id, sealed, version) VALUES (1, ?1, 1)
                 ON CONFLICT (id) DO UPDATE SET sealed = excluded.sealed,
                   version = vault_keys.version + 1
                 RETURNING version",
                chitin_store::params![sealed.to_vec()],
            )?
            .get(0)?;
        if c.dialect() == chitin_store::Dialect::Postgres {
            c.execute(
                "SELECT pg_notify(?1, ?2)",
                chitin_store::params![VAULT_CHANNEL, version.to_string()],
            )?;
        }
        Ok(version)
    })?;
    if db.dialect() == chitin_store::Dialect::Sqlite {
        db.notify(VAULT_CHANNEL, &version.to_string())?;
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile<'a> {
    version: u32,
    #[serde(borrow)]
    keys: Vec<RawKey<'a>>,
    erased: Vec<RawTombstone>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey<'a> {
    subject: String,
    #[serde(borrow)]
    id: &'a str,
    /// Borrowed from the zeroizing plaintext, never copied into a `String`.
    #[serde(borrow)]
    key: &'a str,
    created_ms: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTombstone {
    id: String,
    erased_ms: i64,
    /// [`Subject::digest`] of the erased subject (not the subject itself).
    #[serde(default)]
    subject_digest: Option<String>,
}

#[derive(Serialize)]
struct RawFileOut<'a> {
    version: u32,
    keys: Vec<RawKeyOut<'a>>,
    erased: Vec<RawTombstone>,
}

#[derive(Serialize)]
struct RawKeyOut<'a> {
    subject: &'a str,
    id: &'a str,
    key: &'a str,
    created_ms: i64,
}

fn stamp(path: &Path) -> Result<Option<Stamp>, VaultError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, "inspect")(e)),
    }
}

fn random(buf: &mut [u8]) -> Result<(), VaultError> {
    getrandom::fill(buf).map_err(|e| VaultError::Random(e.to_string()))
}

fn associated_data(subject: &str, id: &KeyId) -> Vec<u8> {
    let mut ad = Vec::with_capacity(SEAL_AD.len() + subject.len() + 1 + ID_LEN);
    ad.extend_from_slice(SEAL_AD);
    ad.extend_from_slice(subject.as_bytes());
    ad.push(0);
    ad.extend_from_slice(id);
    ad
}

fn seal_with(k: &DataKey, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, VaultError> {
    let mut nonce = [0u8; NONCE_LEN];
    random(&mut nonce)?;
    let cipher = XChaCha20Poly1305::new((&*k.key).into());
    let ad = associated_data(subject, &k.id);
    let ct = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .map_err(|_| VaultError::Random("encryption failed".into()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
    out.extend_from_slice(SEAL_MAGIC);
    out.extend_from_slice(&k.id);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

fn split(sealed: &[u8]) -> Result<(KeyId, &[u8], &[u8]), VaultError> {
    if sealed.len() < HEADER_LEN + TAG_LEN {
        return Err(VaultError::Malformed("too short"));
    }
    let (magic, rest) = sealed.split_at(SEAL_MAGIC.len());
    if magic != SEAL_MAGIC {
        return Err(VaultError::Malformed("wrong magic"));
    }
    let (id, rest) = rest.split_at(ID_LEN);
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let mut key_id = [0u8; ID_LEN];
    key_id.copy_from_slice(id);
    Ok((key_id, nonce, ct))
}

fn master_of(v: &SecretValue) -> Result<Zeroizing<[u8; 32]>, VaultError> {
    decode_key(v.expose_str().unwrap_or("")).ok_or_else(|| {
        VaultError::Secrets(SecretsError::InvalidValue {
            name: VAULT_KEY_SECRET.into(),
            reason: "is not 64 hex digits; restore the store from a backup".into(),
        })
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn decode_into(text: &str, out: &mut [u8]) -> Option<()> {
    let bytes = text.as_bytes();
    if bytes.len() != out.len() * 2 {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(bytes.chunks(2)) {
        let hi = hex_digit(*pair.first()?)?;
        let lo = hex_digit(*pair.get(1)?)?;
        *o = (hi << 4) | lo;
    }
    Some(())
}

fn decode_key(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let mut k = Zeroizing::new([0u8; 32]);
    match decode_into(text, &mut k[..]) {
        Some(()) => Some(k),
        None => {
            k.zeroize();
            None
        }
    }
}

fn decode_id(text: &str) -> Option<KeyId> {
    let mut id = [0u8; ID_LEN];
    decode_into(text, &mut id).map(|()| id)
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

    const ALICE: &str = "Chitin::User::\"alice\"";
    const BOB: &str = "Chitin::Identity::\"telegram:12345\"";

    fn vault_in(dir: &Path) -> Vault {
        let master = Zeroizing::new([7u8; 32]);
        Vault {
            path: dir.join(VAULT_FILE),
            lock_path: dir.join(VAULT_LOCK),
            backing: Backing::File,
            master,
            clock: Arc::new(crate::clock::ManualClock::new(1_000)),
            keys: RwLock::new(Keys::default()),
            erasures: AtomicU64::new(0),
            erase_hooks: Mutex::new(Vec::new()),
        }
    }

    /// A replica's vault on the shared database, with the test master key. `reload_every`:
    /// how long a cache lives without a notification.
    fn replica(dir: &Path, db: &chitin_store::Db, reload_every: Duration) -> Vault {
        let mut b = db_backing(db).unwrap();
        b.reload_every = reload_every;
        let mut v = vault_in(dir);
        v.backing = Backing::Db(b);
        v.refresh().unwrap();
        v
    }

    const NEVER: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_key_created_by_one_replica_opens_data_on_another() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = replica(h1.path(), &pg.db().unwrap(), NEVER);
        let two = replica(h2.path(), &pg.db().unwrap(), NEVER);
        // The second replica loaded the (empty) key set before the key existed.
        assert!(!two.knows(&[0u8; ID_LEN]).unwrap());
        let s = one.seal(ALICE, b"from replica one").unwrap();
        assert_eq!(&two.open(ALICE, &s).unwrap()[..], b"from replica one");
        let back = two.seal(ALICE, b"and back").unwrap();
        assert_eq!(
            Vault::key_id_of(&back).unwrap(),
            Vault::key_id_of(&s).unwrap()
        );
        assert_eq!(&one.open(ALICE, &back).unwrap()[..], b"and back");
        // Nothing was written to either state directory.
        assert!(!h1.path().join(VAULT_FILE).exists());
        assert!(!h2.path().join(VAULT_FILE).exists());
        let sealed = one.sealed_keys().unwrap().unwrap();
        assert!(sealed.starts_with(FILE_MAGIC));
        assert!(!sealed.windows(5).any(|w| w == b"alice"));
    }

    #[test]
    fn an_erasure_on_one_replica_stops_the_other_from_opening_the_subjects_data() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = replica(h1.path(), &pg.db().unwrap(), NEVER);
        // Only the notification can tell this replica: its fallback reload never comes.
        let two = replica(h2.path(), &pg.db().unwrap(), NEVER);
        let s = one.seal(ALICE, b"to be erased").unwrap();
        let kept = one.seal(BOB, b"kept").unwrap();
        assert_eq!(&two.open(ALICE, &s).unwrap()[..], b"to be erased");
        let heard: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
        let h = Arc::clone(&heard);
        let hook: Arc<EraseHook> = Arc::new(move |s: Option<&str>| {
            h.lock().unwrap().push(s.map(str::to_owned));
        });
        two.on_erase(Arc::downgrade(&hook));
        let epoch = two.erasure_epoch().unwrap();
        assert!(one.destroy(ALICE).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match two.open(ALICE, &s) {
                Err(VaultError::Erased { .. }) => break,
                Ok(_) => assert!(
                    Instant::now() < deadline,
                    "the erasure did not reach the other replica within 60 s"
                ),
                Err(e) => panic!("unexpected: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(*heard.lock().unwrap(), vec![None]);
        assert_eq!(two.erasure_epoch().unwrap(), epoch + 1);
        assert_eq!(&two.open(BOB, &kept).unwrap()[..], b"kept");
        // A write by the replica that did not erase keeps the tombstone.
        two.seal("Chitin::User::\"carol\"", b"c").unwrap();
        let three = replica(
            tempfile::tempdir().unwrap().path(),
            &pg.db().unwrap(),
            NEVER,
        );
        assert!(matches!(
            three.open(ALICE, &s),
            Err(VaultError::Erased { .. })
        ));
        assert!(!three.has_key(ALICE).unwrap());
    }

    #[test]
    fn a_replica_that_missed_the_notification_sees_the_erasure_after_its_reload_period() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = replica(h1.path(), &pg.db().unwrap(), NEVER);
        let mut two = replica(h2.path(), &pg.db().unwrap(), Duration::from_millis(200));
        if let Backing::Db(b) = &mut two.backing {
            b.watch.get_mut().unwrap().listener = None;
        }
        let s = one.seal(ALICE, b"x").unwrap();
        assert_eq!(&two.open(ALICE, &s).unwrap()[..], b"x");
        one.destroy(ALICE).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while two.open(ALICE, &s).is_ok() {
            assert!(Instant::now() < deadline, "no reload within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(matches!(
            two.open(ALICE, &s),
            Err(VaultError::Erased { .. })
        ));
    }

    #[test]
    fn two_replicas_creating_a_subjects_key_at_once_make_one_key() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = replica(h1.path(), &pg.db().unwrap(), NEVER);
        let two = replica(h2.path(), &pg.db().unwrap(), NEVER);
        let subjects: Vec<String> = (0..16).map(|i| format!("Chitin::User::\"u{i}\"")).collect();
        let barrier = std::sync::Barrier::new(2);
        let run = |v: &Vault| {
            barrier.wait();
            subjects
                .iter()
                .map(|s| v.seal(s, s.as_bytes()).unwrap())
                .collect::<Vec<_>>()
        };
        let run = &run;
        let (a, b) = std::thread::scope(|sc| {
            let a = sc.spawn(|| run(&one));
            let b = sc.spawn(|| run(&two));
            (a.join().unwrap(), b.join().unwrap())
        });
        for ((s, x), y) in subjects.iter().zip(&a).zip(&b) {
            assert_eq!(
                Vault::key_id_of(x).unwrap(),
                Vault::key_id_of(y).unwrap(),
                "{s}"
            );
            assert_eq!(&one.open(s, y).unwrap()[..], s.as_bytes());
            assert_eq!(&two.open(s, x).unwrap()[..], s.as_bytes());
        }
        assert_eq!(one.live_key_ids().unwrap().len(), subjects.len());
        assert_eq!(two.live_key_ids().unwrap().len(), subjects.len());
    }

    #[test]
    fn installed_file_bytes_become_the_shared_key_set() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let d = tempfile::tempdir().unwrap();
        let file = vault_in(d.path());
        let s = file.seal(ALICE, b"old transcript").unwrap();
        let bytes = std::fs::read(d.path().join(VAULT_FILE)).unwrap();
        let db = pg.db().unwrap();
        let live = replica(tempfile::tempdir().unwrap().path(), &db, NEVER);
        install_sealed_keys(&db, &bytes).unwrap();
        assert_eq!(&live.open(ALICE, &s).unwrap()[..], b"old transcript");
        assert_eq!(live.sealed_keys().unwrap().unwrap(), bytes);
        assert!(matches!(
            install_sealed_keys(&db, b"not keys"),
            Err(VaultError::Corrupt { .. })
        ));
    }

    fn secret_store(home: &Path) -> SecretStore {
        let cfg = SecretsConfig {
            backend: crate::config::secrets::IdentityBackend::Passphrase,
            scrypt_work_factor: 4,
            max_scrypt_work_factor: 10,
            ..SecretsConfig::default()
        };
        SecretStore::open_with(
            home,
            &cfg,
            Box::new(crate::secrets::identity::FixedPassphrase(
                age::secrecy::SecretString::from("pw".to_string()),
            )),
            Arc::new(crate::clock::ManualClock::new(1_000)),
        )
        .unwrap()
    }

    #[test]
    fn a_replica_without_the_deployments_master_key_is_refused_once_the_database_has_keys() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        let db = pg.db().unwrap();
        let (h1, h2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let clock: Arc<dyn Clock> = Arc::new(crate::clock::ManualClock::new(1_000));
        let mut secrets = secret_store(h1.path());
        let one = Vault::for_db(h1.path(), &db, &mut secrets, Arc::clone(&clock)).unwrap();
        assert!(one.in_db());
        let s = one.seal(ALICE, b"shared").unwrap();
        // The same secret store (as every replica has): the keys open.
        let again = Vault::for_db(h2.path(), &db, &mut secrets, Arc::clone(&clock)).unwrap();
        assert_eq!(&again.open(ALICE, &s).unwrap()[..], b"shared");
        // Another secret store: refused, nothing replaced.
        let before = one.sealed_keys().unwrap();
        let e = Vault::for_db(h2.path(), &db, &mut secret_store(h2.path()), clock).unwrap_err();
        assert!(
            matches!(&e, VaultError::MasterKeyMissingInDb { location } if location == db.location()),
            "{e}"
        );
        assert_eq!(one.sealed_keys().unwrap(), before);
    }

    #[test]
    fn the_vault_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Vault>();
    }

    #[test]
    fn sealed_content_opens_for_its_subject_only() {
        let d = tempfile::tempdir().unwrap();
        let v = vault_in(d.path());
        let s = v.seal(ALICE, b"hello canary").unwrap();
        assert!(!s.windows(6).any(|w| w == b"canary"));
        assert_eq!(&v.open(ALICE, &s).unwrap()[..], b"hello canary");
        v.seal(BOB, b"x").unwrap();
        assert!(matches!(v.open(BOB, &s), Err(VaultError::Tampered { .. })));
    }

    #[test]
    fn two_seals_of_the_same_text_differ() {
        let d = tempfile::tempdir().unwrap();
        let v = vault_in(d.path());
        assert_ne!(
            v.seal(ALICE, b"same").unwrap(),
            v.seal(ALICE, b"same").unwrap()
        );
    }

    #[test]
    fn each_kind_of_tamper_fails() {
        let d = tempfile::tempdir().unwrap();
        let v = vault_in(d.path());
        let s = v.seal(ALICE, b"some content here").unwrap();
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            let e = v.open(ALICE, &t).unwrap_err();
            assert!(
                matches!(
                    e,
                    VaultError::Tampered { .. }
                        | VaultError::Malformed(_)
                        | VaultError::UnknownKey { .. }
                ),
                "byte {i}: {e}"
            );
        }
        assert!(matches!(
            v.open(ALICE, &s[..s.len() - 1]),
            Err(VaultError::Tampered { .. })
        ));
        assert!(matches!(
            v.open(ALICE, &s[..10]),
            Err(VaultError::Malformed("too short"))
        ));
    }

    #[test]
    fn a_destroyed_key_makes_old_blobs_erased_and_a_new_key_is_made_on_next_seal() {
        let d = tempfile::tempdir().unwrap();
        let v = vault_in(d.path());
        let s = v.seal(ALICE, b"before").unwrap();
        assert!(v.destroy(ALICE).unwrap());
        assert!(!v.destroy(ALICE).unwrap());
        assert!(matches!(v.open(ALICE, &s), Err(VaultError::Erased { .. })));
        assert!(v.is_erased_blob(&s).unwrap());
        let s2 = v.seal(ALICE, b"after").unwrap();
        assert_eq!(&v.open(ALICE, &s2).unwrap()[..], b"after");
        assert!(matches!(v.open(ALICE, &s), Err(VaultError::Erased { .. })));
    }

    #[test]
    fn a_second_handle_sees_a_destroy_made_by_the_first_and_never_resurrects_the_key() {
        let d = tempfile::tempdir().unwrap();
        let gateway = vault_in(d.path());
        let cli = vault_in(d.path());
        let s = gateway.seal(ALICE, b"msg").unwrap();
        gateway.seal(BOB, b"msg").unwrap();
        assert_eq!(&cli.open(ALICE, &s).unwrap()[..], b"msg");
        assert!(cli.destroy(ALICE).unwrap());
        // The gateway's cached key is dropped on its next call.
        assert!(matches!(
            gateway.open(ALICE, &s),
            Err(VaultError::Erased { .. })
        ));
        // A write by the gateway for another subject keeps the tombstone.
        gateway.seal("Chitin::User::\"carol\"", b"c").unwrap();
        let third = vault_in(d.path());
        assert!(matches!(
            third.open(ALICE, &s),
            Err(VaultError::Erased { .. })
        ));
        assert!(third.has_key(BOB).unwrap());
    }

    #[test]
    fn the_key_file_is_private_sealed_and_holds_no_subject_content() {
        let d = tempfile::tempdir().unwrap();
        let v = vault_in(d.path());
        v.seal(ALICE, b"secret text").unwrap();
        let bytes = std::fs::read(d.path().join(VAULT_FILE)).unwrap();
        assert!(!bytes.windows(5).any(|w| w == b"alice"));
        let mode = std::fs::metadata(d.path().join(VAULT_FILE))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let mut other = vault_in(d.path());
        other.master = Zeroizing::new([8u8; 32]);
        assert!(matches!(
            other.has_key(ALICE),
            Err(VaultError::Corrupt { .. })
        ));
    }

    #[test]
    fn subjects_are_parsed_strictly() {
        for ok in [ALICE, BOB, "Chitin::User::\"a b\""] {
            assert_eq!(Subject::parse(ok).unwrap().to_string(), ok);
        }
        for bad in [
            "alice",
            "User::\"alice\"",
            "Chitin::Group::\"owners\"",
            "Chitin::User::\"\"",
            "Chitin::User::\"a\"b\"",
            "Chitin::User::\"a\\\"\"",
            "Chitin::User::\"a\nb\"",
            "Chitin::User::\"a\u{202e}b\"",
            " Chitin::User::\"alice\"",
            "Chitin::User::\"alice\" ",
            "Chitin::User::alice",
        ] {
            assert!(Subject::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("Chitin::User::\"{}\"", "a".repeat(257));
        assert!(Subject::parse(&long).is_err());
    }
}
