//! Encrypted backups of the state directory.
//!
//! A backup is an age file (X25519, to the operator's `[backup] recipient`) holding a tar:
//! `MANIFEST.json` (every member's path, size and SHA-256), `MANIFEST.sig` (the manifest's
//! Ed25519 signature by the deployment's audit key, [`chitin_audit::ManifestSignature`]) then
//! `state/<path>` for each file of the state directory.
//!
//! **Trust:** the recipient is public, so anyone can encrypt a tar to it; what makes a backup
//! ours is the signature. [`check`] accepts a backup only when its manifest is signed by the
//! trusted audit key (the state dir's current `audit.pub`, or an explicit `--trust-key FILE` for
//! disaster recovery onto a new machine), it carries its audit log, that log verifies with the
//! same key, and its `audit.pub` is that key. [`restore`] takes only a [`Verified`] backup. The databases are consistent snapshots (`VACUUM INTO`), the audit
//! checkpoint file is cut to the snapshot's last record, so a restored log passes
//! `chitin audit verify`.
//!
//! **Data keys:** `vault.keys` (the per-subject data keys, sealed under the vault master key in
//! `secrets.age`) is in the backup, read after the database snapshot so every key a snapshot
//! row was sealed with is there, and encrypted with everything else to the backup recipient:
//! a backup restored onto a new machine brings the conversations back. A restore where a
//! `vault.keys` already exists keeps that one (it has the tombstones of later erasures), and
//! every erasure recorded after the backup was taken is applied again to what the backup
//! brought back (`erase::reapply_after_restore`) before the restore is committed. Never in a
//! backup: lock files. See `docs/parts/SECURITY.lifecycle.md` for what this means for old
//! backup files.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use age::secrecy::ExposeSecret as _;
use chitin_audit::AuditLog;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{GATEWAY_LOCK, GatewayLock, LifecycleError, io_err};
use crate::secrets::format::{DecryptKeys, decrypt_all, encrypt_to_recipients};
use crate::store::Store;
use crate::vault::{VAULT_FILE, VAULT_LOCK};

/// The manifest member (first in the tar).
pub const MANIFEST: &str = "MANIFEST.json";
/// The manifest's signature (second in the tar).
pub const MANIFEST_SIG: &str = "MANIFEST.sig";
/// The backup format version (2: signed manifests).
pub const VERSION: u32 = 2;
const FORMAT: &str = "chitin-backup";
/// Files of the state directory a backup never carries (top level).
pub const EXCLUDED: &[&str] = &[
    VAULT_LOCK,
    GATEWAY_LOCK,
    crate::secrets::store::LOCK_FILE,
    "state.db-wal",
    "state.db-shm",
    "audit.db-wal",
    "audit.db-shm",
];
/// File name prefix and suffix of scheduled backups.
pub const SCHEDULED_PREFIX: &str = "chitin-backup-";
pub const SCHEDULED_SUFFIX: &str = ".age";

/// One member of a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `MANIFEST.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_ms: i64,
    /// The audit snapshot's last record (0 = empty log).
    pub audit_last_seq: i64,
    pub members: Vec<Member>,
    /// What was deliberately left out.
    pub excluded: Vec<String>,
}

/// What `verify` established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub created_ms: i64,
    pub members: usize,
    pub bytes: u64,
    /// `chitin audit verify`'s ok line for the backed-up log.
    pub audit: String,
    /// The state database's schema version.
    pub state_version: i64,
}

/// A temporary private directory, removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path, tag: &str) -> Result<Self, LifecycleError> {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| LifecycleError::Backup(e.to_string()))?;
        let p = parent.join(format!(".{tag}-{}", chitin_audit::to_hex(&r)));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&p)
            .map_err(io_err(&p, "create directory"))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private scratch directory (0700) under a parent, removed with its contents when dropped.
pub struct Scratch(TempDir);

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.0.0
    }
}

/// Makes a [`Scratch`] directory `.<tag>-<random>` under `parent`.
pub fn scratch_dir(parent: &Path, tag: &str) -> Result<Scratch, LifecycleError> {
    TempDir::new(parent, tag).map(Scratch)
}

/// Writes a new private (0600) file, fsynced; never replaces an existing one.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), LifecycleError> {
    write_new(path, bytes)
}

fn sha_hex(b: &[u8]) -> String {
    chitin_audit::to_hex(&chitin_audit::sha256(b))
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, LifecycleError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(io_err(path, "read"))
}

/// Files of `home` that go into a backup (relative paths), without the live databases and
/// checkpoint file (those are snapshotted).
fn walk(
    home: &Path,
    rel: &Path,
    skip_top: &BTreeSet<&str>,
    out: &mut Vec<PathBuf>,
) -> Result<(), LifecycleError> {
    let dir = home.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io_err(&dir, "list"))?
        .collect::<Result<_, _>>()
        .map_err(io_err(&dir, "list"))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || (rel.as_os_str().is_empty() && skip_top.contains(name)) {
            continue;
        }
        let ft = e.file_type().map_err(io_err(&e.path(), "inspect"))?;
        let r = rel.join(name);
        if ft.is_dir() {
            walk(home, &r, skip_top, out)?;
        } else if ft.is_file() {
            out.push(r);
        }
    }
    Ok(())
}

/// The checkpoint lines covering at most `last_seq` (the prefix of the file).
fn cut_checkpoints(text: &str, last_seq: i64) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let seq = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_i64));
        match seq {
            Some(s) if s <= last_seq => {
                out.push_str(line);
                out.push('\n');
            }
            _ => break,
        }
    }
    out
}

/// Builds the backup plaintext (the tar) of `home`.
fn build(
    home: &Path,
    store: &Store,
    audit: &AuditLog,
    now_ms: i64,
) -> Result<(Zeroizing<Vec<u8>>, Manifest), LifecycleError> {
    // Sign the head first, so the snapshot is covered by a checkpoint.
    audit.checkpoint_now()?;
    let tmp = TempDir::new(home, "backup")?;
    let state_snap = tmp.0.join("state.db");
    snapshot_state(store, &state_snap)?;
    let audit_snap = tmp.0.join("audit.db");
    // On PostgreSQL the chain is in the database's audit tables: copied, up to its head, into
    // the same `audit.db` and `audit.checkpoints` members a SQLite deployment's backup has.
    let pg_cps = tmp.0.join(chitin_audit::CHECKPOINT_FILE);
    let audit_last_seq = if audit.backend() == "postgres" {
        audit.reader()?.copy_to_sqlite(&audit_snap, &pg_cps)?
    } else {
        let c = rusqlite::Connection::open_with_flags(
            &audit.paths().db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        c.busy_timeout(std::time::Duration::from_secs(10))?;
        c.execute("VACUUM INTO ?1", [audit_snap.to_string_lossy().as_ref()])?;
        let s = rusqlite::Connection::open(&audit_snap)?;
        s.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
            r.get::<_, i64>(0)
        })?
    };
    let cps_path = if audit.backend() == "postgres" {
        pg_cps
    } else {
        home.join(chitin_audit::CHECKPOINT_FILE)
    };
    let cps = match std::fs::read_to_string(&cps_path) {
        Ok(t) => cut_checkpoints(&t, audit_last_seq),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&cps_path, "read")(e)),
    };
    let mut skip: BTreeSet<&str> = EXCLUDED.iter().copied().collect();
    skip.extend([
        "state.db",
        chitin_audit::DB_FILE,
        chitin_audit::CHECKPOINT_FILE,
    ]);
    // On PostgreSQL the data keys are the database's (shared by every replica), read after
    // the snapshot like the file: a `vault.keys` left in this directory is not the key set.
    let db_keys = match store.db().dialect() {
        crate::store::Dialect::Postgres => {
            skip.insert(VAULT_FILE);
            Some(crate::vault::sealed_keys_in(store.db())?)
        }
        crate::store::Dialect::Sqlite => None,
    };
    let mut rels = Vec::new();
    walk(home, Path::new(""), &skip, &mut rels)?;
    let mut members: Vec<(String, Zeroizing<Vec<u8>>)> = vec![
        ("state.db".into(), read(&state_snap)?),
        (chitin_audit::DB_FILE.into(), read(&audit_snap)?),
        (
            chitin_audit::CHECKPOINT_FILE.into(),
            Zeroizing::new(cps.into_bytes()),
        ),
    ];
    for r in rels {
        let bytes = read(&home.join(&r))?;
        members.push((r.to_string_lossy().into_owned(), bytes));
    }
    if let Some(Some(keys)) = db_keys {
        members.push((VAULT_FILE.into(), Zeroizing::new(keys)));
    }
    drop(tmp);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        created_ms: now_ms,
        audit_last_seq,
        members: members
            .iter()
            .map(|(p, b)| Member {
                path: p.clone(),
                size: u64::try_from(b.len()).unwrap_or(u64::MAX),
                sha256: sha_hex(b),
            })
            .collect(),
        excluded: EXCLUDED.iter().map(|s| (*s).to_string()).collect(),
    };
    let mtime = u64::try_from(now_ms / 1000).unwrap_or(0);
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| -> Result<(), std::io::Error> {
        let mut h = tar::Header::new_ustar();
        h.set_size(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        h.set_mode(0o600);
        h.set_mtime(mtime);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes)
    };
    let m =
        serde_json::to_vec_pretty(&manifest).map_err(|e| LifecycleError::Backup(e.to_string()))?;
    let sig = serde_json::to_vec(&audit.sign_backup_manifest(&m)?)
        .map_err(|e| LifecycleError::Backup(e.to_string()))?;
    let werr = |e: std::io::Error| LifecycleError::Backup(format!("cannot build the backup: {e}"));
    add(MANIFEST, &m).map_err(werr)?;
    add(MANIFEST_SIG, &sig).map_err(werr)?;
    for (p, b) in &members {
        add(&format!("state/{p}"), b).map_err(werr)?;
    }
    let plain = Zeroizing::new(tar.into_inner().map_err(werr)?);
    Ok((plain, manifest))
}

/// Writes a consistent snapshot of the state store to the new SQLite file `out`: SQLite with
/// `VACUUM INTO`; PostgreSQL copied table by table inside one `REPEATABLE READ, READ ONLY`
/// transaction (`chitin_store::copy::postgres_to_sqlite`), so a backup of a PostgreSQL
/// deployment carries the same `state.db` member as any other and restores onto either
/// backend.
pub fn snapshot_state(store: &Store, out: &Path) -> Result<(), LifecycleError> {
    match store.db().dialect() {
        crate::store::Dialect::Sqlite => {
            let c = store
                .db()
                .sqlite_connection()
                .ok_or_else(|| LifecycleError::Backup("no SQLite connection".into()))??;
            c.execute("VACUUM INTO ?1", [out.to_string_lossy().as_ref()])?;
        }
        crate::store::Dialect::Postgres => {
            chitin_store::copy::postgres_to_sqlite(store.db(), out)?;
        }
    }
    Ok(())
}

/// Writes the backup's `state.db` to `dir/state.db` (a new 0600 file), for a restore onto
/// PostgreSQL: the erasures made since the backup are applied to it there
/// ([`super::erase::reapply_after_restore`] on a store opened on it), then
/// [`restore_into_postgres`] copies it into the database.
pub fn stage_state(verified: &Verified, dir: &Path) -> Result<PathBuf, LifecycleError> {
    let b = verified
        .opened
        .members
        .get("state.db")
        .ok_or_else(|| LifecycleError::Backup("the backup holds no state.db".into()))?;
    let path = dir.join("state.db");
    write_new(&path, b)?;
    Ok(path)
}

/// Replaces every row of the PostgreSQL `target` with the rows of the (staged, migrated)
/// SQLite `state`, in one PostgreSQL transaction: all of it or, on any error, none of it.
/// Returns the tables copied with their row counts.
pub fn restore_into_postgres(
    state: &Store,
    target: &crate::store::Db,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<chitin_store::copy::Copied, LifecycleError> {
    Ok(chitin_store::copy::sqlite_to_postgres(
        state.db(),
        target,
        true,
        progress,
    )?)
}

/// The restore's rule for the data keys on PostgreSQL (as for `vault.keys` in a state
/// directory): where the database already holds keys they are kept (they have the tombstones
/// of the erasures made since the backup); a database without any gets the backup's. Returns
/// whether the backup's keys were installed.
pub fn restore_keys_into_db(
    verified: &Verified,
    target: &crate::store::Db,
) -> Result<bool, LifecycleError> {
    let Some(keys) = verified.opened.members.get(VAULT_FILE) else {
        return Ok(false);
    };
    if crate::vault::sealed_keys_in(target)?.is_some() {
        return Ok(false);
    }
    crate::vault::install_sealed_keys(target, keys)?;
    Ok(true)
}

/// Parses the configured recipient, or says how to make one.
pub fn recipient(text: &str) -> Result<age::x25519::Recipient, LifecycleError> {
    if text.is_empty() {
        return Err(LifecycleError::Backup(
            "no backup recipient configured: run `chitin backup keygen --out backup-identity.txt` \
             on the machine that will keep backups readable (keep that file OFF this host), then \
             put the printed public key in chitin.toml as [backup] recipient = \"age1...\""
                .into(),
        ));
    }
    text.parse().map_err(|_| {
        LifecycleError::Backup(
            "[backup] recipient is not an age X25519 public key (age1...)".into(),
        )
    })
}

/// Creates a backup of `home` at `out` (a new 0600 file), encrypted to `recipient`. Audited
/// (`admin`/`backup.create`) before the snapshot is taken.
pub fn create(
    home: &Path,
    store: &Store,
    audit: &AuditLog,
    recipient_text: &str,
    out: &Path,
    now_ms: i64,
) -> Result<Manifest, LifecycleError> {
    let rcpt = recipient(recipient_text)?;
    // Recorded before the snapshot, so the backup's own log holds the record.
    audit.append(chitin_audit::RecordInput::admin(
        "backup",
        "backup.create",
        out.display().to_string(),
        serde_json::json!({ "created_ms": now_ms }),
    ))?;
    let (plain, manifest) = build(home, store, audit, now_ms)?;
    let sealed = encrypt_to_recipients(&plain, &[rcpt]).map_err(LifecycleError::Backup)?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&sealed).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        // Never replace an existing file.
        std::fs::hard_link(&tmp, out).map_err(io_err(out, "create"))?;
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map(|()| manifest)
}

/// Reads an age identity file (`AGE-SECRET-KEY-1...` lines; `#` comments).
pub fn load_identity(path: &Path) -> Result<age::x25519::Identity, LifecycleError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io_err(path, "read"))?);
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .and_then(|l| l.parse::<age::x25519::Identity>().ok())
        .ok_or_else(|| {
            LifecycleError::Backup(format!(
                "{} holds no age X25519 identity (AGE-SECRET-KEY-1...)",
                path.display()
            ))
        })
}

/// Makes a backup identity: writes `out` (new, 0600) and returns the public key.
pub fn keygen(out: &Path, now_ms: i64) -> Result<String, LifecycleError> {
    let id = age::x25519::Identity::generate();
    let public = id.to_public().to_string();
    let text = Zeroizing::new(format!(
        "# created: {}\n# public key: {public}\n{}\n",
        crate::clock::rfc3339(now_ms),
        id.to_string().expose_secret()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_err(out, "create"))?;
    f.write_all(text.as_bytes()).map_err(io_err(out, "write"))?;
    f.sync_all().map_err(io_err(out, "fsync"))?;
    Ok(public)
}

/// A decrypted, digest-checked backup (not yet trusted: see [`check`]).
pub struct Opened {
    pub manifest: Manifest,
    /// The manifest's exact bytes (what the signature covers).
    manifest_bytes: Vec<u8>,
    signature: chitin_audit::ManifestSignature,
    /// path → bytes, exactly the manifest's members.
    pub members: BTreeMap<String, Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("manifest", &self.manifest)
            .finish_non_exhaustive()
    }
}

fn safe_rel(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Decrypts `file` with `identity` and checks every member against the manifest (all present,
/// none extra, sizes and SHA-256 equal, safe relative paths).
pub fn open(file: &Path, identity: &age::x25519::Identity) -> Result<Opened, LifecycleError> {
    let sealed = std::fs::read(file).map_err(io_err(file, "read"))?;
    let keys = DecryptKeys::new(0).with_x25519(identity.clone());
    let plain = decrypt_all(&sealed, &keys).map_err(|e| {
        LifecycleError::Backup(format!(
            "{} cannot be decrypted with this identity: {e:?}",
            file.display()
        ))
    })?;
    let bad = |why: String| LifecycleError::Backup(format!("{}: {why}", file.display()));
    let mut a = tar::Archive::new(&plain[..]);
    let mut manifest: Option<(Manifest, Vec<u8>)> = None;
    let mut signature: Option<chitin_audit::ManifestSignature> = None;
    let mut members = BTreeMap::new();
    for e in a.entries().map_err(|e| bad(e.to_string()))? {
        let mut e = e.map_err(|e| bad(e.to_string()))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            return Err(bad("a member is not a regular file".into()));
        }
        let name = e
            .path()
            .map_err(|e| bad(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let mut data = Zeroizing::new(Vec::new());
        std::io::Read::read_to_end(&mut e, &mut data).map_err(|e| bad(e.to_string()))?;
        if manifest.is_none() {
            if name != MANIFEST {
                return Err(bad("the manifest is not the first member".into()));
            }
            let m: Manifest = serde_json::from_slice(&data)
                .map_err(|e| bad(format!("malformed manifest: {e}")))?;
            if m.format != FORMAT || !(1..=VERSION).contains(&m.version) {
                return Err(bad("not a Chitin backup (format/version)".into()));
            }
            manifest = Some((m, data.to_vec()));
            continue;
        }
        if signature.is_none() {
            if name != MANIFEST_SIG {
                return Err(bad(UNSIGNED.into()));
            }
            signature = Some(
                serde_json::from_slice(&data)
                    .map_err(|e| bad(format!("malformed manifest signature: {e}")))?,
            );
            continue;
        }
        let rel = name
            .strip_prefix("state/")
            .filter(|r| safe_rel(r))
            .ok_or_else(|| bad(format!("unexpected member {name:?}")))?;
        if members.insert(rel.to_string(), data).is_some() {
            return Err(bad(format!("member {rel} appears twice")));
        }
    }
    let (manifest, manifest_bytes) = manifest.ok_or_else(|| bad("empty archive".into()))?;
    let signature = signature.ok_or_else(|| bad(UNSIGNED.into()))?;
    let listed: BTreeSet<&str> = manifest.members.iter().map(|m| m.path.as_str()).collect();
    for m in &manifest.members {
        let data = members
            .get(&m.path)
            .ok_or_else(|| bad(format!("member {} is missing", m.path)))?;
        if u64::try_from(data.len()).ok() != Some(m.size) || sha_hex(data) != m.sha256 {
            return Err(bad(format!("member {} does not match its digest", m.path)));
        }
    }
    if let Some(extra) = members.keys().find(|k| !listed.contains(k.as_str())) {
        return Err(bad(format!("member {extra} is not in the manifest")));
    }
    Ok(Opened {
        manifest,
        manifest_bytes,
        signature,
        members,
    })
}

/// Why an unsigned backup (or one made before backups were signed) is refused.
const UNSIGNED: &str = "the manifest is not signed by an audit key (no MANIFEST.sig after MANIFEST.json); \
     an unsigned backup is never trusted";

fn write_new(path: &Path, bytes: &[u8]) -> Result<(), LifecycleError> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err(parent, "create directory"))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path, "create"))?;
    f.write_all(bytes).map_err(io_err(path, "write"))?;
    f.sync_all().map_err(io_err(path, "fsync"))
}

/// A backup that passed [`check`]: signed by the trusted audit key, with an audit log that
/// verifies under it. Only this can be restored.
#[derive(Debug)]
pub struct Verified {
    opened: Opened,
    pub report: VerifyReport,
}

impl Verified {
    /// The backup's members and manifest.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }
}

/// Checks an opened backup beyond digests, in this order: the manifest's signature verifies
/// with `trusted` (the deployment's audit key); the backup carries its audit log (`audit.db`,
/// `audit.checkpoints`, `audit.pub`) and its `audit.pub` is `trusted`; the state database opens
/// and passes `integrity_check`; the audit log verifies (chain and checkpoints) with `trusted`.
pub fn check(
    opened: Opened,
    trusted: &chitin_audit::PublicKey,
) -> Result<Verified, LifecycleError> {
    let bad = |why: String| LifecycleError::Backup(format!("backup check failed: {why}"));
    match opened.signature.verify(trusted, &opened.manifest_bytes) {
        Ok(()) => {}
        Err(chitin_audit::CheckpointProblem::WrongKey) => {
            return Err(bad(format!(
                "the manifest is signed by key {}, not by the trusted audit key {} (this \
                 deployment's audit.pub, or --trust-key FILE); nothing from it is trusted",
                opened.signature.key_id,
                trusted.id_hex()
            )));
        }
        Err(chitin_audit::CheckpointProblem::BadSignature) => {
            return Err(bad(format!(
                "the manifest signature does not verify with the trusted audit key {}; the \
                 backup was altered or forged",
                trusted.id_hex()
            )));
        }
    }
    let missing: Vec<&str> = [
        chitin_audit::DB_FILE,
        chitin_audit::CHECKPOINT_FILE,
        chitin_audit::PUB_FILE,
    ]
    .into_iter()
    .filter(|n| !opened.members.contains_key(*n))
    .collect();
    if !missing.is_empty() {
        return Err(bad(format!(
            "the backup holds no audit log (missing: {}); a backup without its audit log is never restored",
            missing.join(", ")
        )));
    }
    let tmp = TempDir::new(&std::env::temp_dir(), "chitin-backup-verify")?;
    for name in [
        "state.db",
        chitin_audit::DB_FILE,
        chitin_audit::CHECKPOINT_FILE,
        chitin_audit::PUB_FILE,
    ] {
        if let Some(b) = opened.members.get(name) {
            write_new(&tmp.0.join(name), b)?;
        }
    }
    let backed_up_key = chitin_audit::PublicKey::load(&tmp.0.join(chitin_audit::PUB_FILE))
        .map_err(|e| bad(format!("audit.pub: {e}")))?;
    if backed_up_key != *trusted {
        return Err(bad(format!(
            "the backup's audit.pub is key {}, not the trusted audit key {}",
            backed_up_key.id_hex(),
            trusted.id_hex()
        )));
    }
    let db = tmp.0.join("state.db");
    if !db.exists() {
        return Err(bad("state.db is missing".into()));
    }
    let state = (|| -> Result<(String, i64), rusqlite::Error> {
        let conn = rusqlite::Connection::open(&db)?;
        let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok((ok, version))
    })();
    let state_version = match state {
        Ok((ok, v)) if ok == "ok" => v,
        Ok((problem, _)) => return Err(bad(format!("state.db: {problem}"))),
        Err(e) => return Err(bad(format!("state.db does not open: {e}"))),
    };
    let verdict = chitin_audit::Verifier::new(*trusted)
        .verify_db(
            &tmp.0.join(chitin_audit::DB_FILE),
            Some(&tmp.0.join(chitin_audit::CHECKPOINT_FILE)),
        )
        .map_err(|e| bad(e.to_string()))?;
    let audit = match verdict {
        Ok(r) => r.ok_line(),
        Err(t) => return Err(bad(format!("audit log: {t}"))),
    };
    let report = VerifyReport {
        created_ms: opened.manifest.created_ms,
        members: opened.members.len(),
        bytes: opened
            .members
            .values()
            .map(|b| u64::try_from(b.len()).unwrap_or(0))
            .sum(),
        audit,
        state_version,
    };
    Ok(Verified { opened, report })
}

/// What a restore would do to one file of the state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The file does not exist: it is created.
    Add { size: u64 },
    /// The file exists with other content: it is replaced.
    Replace { old_size: u64, new_size: u64 },
    /// The file already holds exactly this content.
    Same,
}

/// The members a restore onto a PostgreSQL store does not write into the state directory:
/// `state.db` goes into the database ([`restore_into_postgres`]); the audit log (`audit.db`,
/// `audit.checkpoints`) stays in the archive, for offline verification only: the database's
/// own audit chain is kept, never replaced or merged, and records the restore.
pub const NOT_RESTORED_ON_POSTGRES: &[&str] = &[
    "state.db",
    chitin_audit::DB_FILE,
    chitin_audit::CHECKPOINT_FILE,
    VAULT_FILE,
];

/// What restoring `verified` into `home` would change, file by file (relative path, change),
/// in path order, leaving out the members named in `except` (see
/// [`NOT_RESTORED_ON_POSTGRES`]). Files of `home` that are not in the backup are left as they
/// are.
pub fn plan(verified: &Verified, home: &Path, except: &[&str]) -> Vec<(String, Change)> {
    let keep_live_keys = home.join(VAULT_FILE).exists();
    verified
        .opened
        .members
        .iter()
        .filter(|(p, _)| !(keep_live_keys && p.as_str() == VAULT_FILE))
        .filter(|(p, _)| !except.contains(&p.as_str()))
        .map(|(p, b)| {
            let new_size = u64::try_from(b.len()).unwrap_or(u64::MAX);
            let change = match std::fs::read(home.join(p)) {
                Ok(cur) if cur == b[..] => Change::Same,
                Ok(cur) => Change::Replace {
                    old_size: u64::try_from(cur.len()).unwrap_or(u64::MAX),
                    new_size,
                },
                Err(_) => Change::Add { size: new_size },
            };
            (p.clone(), change)
        })
        .collect()
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Files replaced or added.
    pub replaced: usize,
    /// Where the live audit log was moved before the backup's replaced it (with its
    /// checkpoints, WAL and a copy of `audit.pub`, so it still verifies on its own): a restore
    /// never erases audit history recorded after the backup.
    pub audit_archive: Option<PathBuf>,
    /// Whether the backup's data keys (`vault.keys`) were installed: on a machine without
    /// one (a new machine). Where a `vault.keys` exists it is kept: it holds every key the
    /// backup's rows were sealed with that has not been destroyed since, and the tombstones
    /// of the erasures made since.
    pub data_keys_restored: bool,
}

/// The live audit log's files a restore moves into the archive (never deletes).
const AUDIT_FILES: &[&str] = &[
    "audit.db",
    "audit.db-wal",
    "audit.db-shm",
    "audit.checkpoints",
];

/// A restore whose files are in place but not yet committed: until [`Restoring::commit`],
/// dropping it (an error in a later step, such as erasing again what the backup brought
/// back) puts every file back as it was, so a restore that fails part-way leaves nothing
/// half-written. Holds the gateway lock throughout.
#[derive(Debug)]
pub struct Restoring {
    home: PathBuf,
    /// `<home>/.restore-<random>/`: `new/` the staged members, `old/` what they replaced.
    work: Option<TempDir>,
    /// Each file put in place, and where the file it replaced was moved (None: it was new).
    placed: Vec<(PathBuf, Option<PathBuf>)>,
    /// The live audit log's archive dir and the files moved into it.
    archived: Option<(PathBuf, Vec<&'static str>)>,
    restored: Restored,
    _lock: GatewayLock,
}

impl std::fmt::Debug for TempDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TempDir").field(&self.0).finish()
    }
}

impl Restoring {
    /// What was restored (so far).
    pub fn restored(&self) -> &Restored {
        &self.restored
    }

    /// Keeps the restore: the replaced files are deleted.
    pub fn commit(mut self) -> Restored {
        self.placed.clear();
        self.archived = None;
        drop(self.work.take());
        if let Ok(d) = std::fs::File::open(&self.home) {
            let _ = d.sync_all();
        }
        self.restored.clone()
    }

    /// Puts every replaced file back, newest change first, and the live audit log back from
    /// its archive. Best effort per file (a failure is reported, the others still go back).
    fn rollback(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        while let Some((dest, old)) = self.placed.pop() {
            let r = match &old {
                Some(old) => std::fs::rename(old, &dest),
                None => std::fs::remove_file(&dest),
            };
            if let Err(e) = r {
                problems.push(format!("{}: {e}", dest.display()));
            }
        }
        if let Some((dir, files)) = self.archived.take() {
            for f in files {
                if let Err(e) = std::fs::rename(dir.join(f), self.home.join(f)) {
                    problems.push(format!("{f}: {e}"));
                }
            }
            let _ = std::fs::remove_file(dir.join(chitin_audit::PUB_FILE));
            let _ = std::fs::remove_dir(&dir);
            if let Some(base) = dir.parent() {
                let _ = std::fs::remove_dir(base);
            }
        }
        if let Ok(d) = std::fs::File::open(&self.home) {
            let _ = d.sync_all();
        }
        problems
    }
}

impl Drop for Restoring {
    fn drop(&mut self) {
        if self.placed.is_empty() && self.archived.is_none() {
            return;
        }
        let problems = self.rollback();
        if problems.is_empty() {
            eprintln!(
                "chitin: the restore did not complete; every file of {} was put back as it was",
                self.home.display()
            );
        } else {
            // Kept (not deleted with the work dir) so nothing is lost.
            if let Some(w) = self.work.take() {
                let kept = w.0.clone();
                std::mem::forget(w);
                eprintln!(
                    "chitin: the restore did not complete and {} file(s) could not be put back ({}); \
                     the replaced files are kept in {}",
                    problems.len(),
                    problems.join("; "),
                    kept.display()
                );
            }
        }
    }
}

/// Restores a verified backup into `home`: the state database, audit log, secret store and
/// config files are replaced by the backup's; the backup's data keys only where `home` has
/// none (see [`Restored::data_keys_restored`]). The live audit log is first moved, whole, into
/// `audit-archive/restore-<unix ms>/` (with a copy of `audit.pub`), so the records made after
/// the backup are kept and still verify. Every member is written to a staging directory first
/// and each replaced file is moved aside, so any failure puts everything back. Refused while a
/// gateway holds the state dir. The caller finishes with [`Restoring::commit`].
pub fn restore(verified: &Verified, home: &Path) -> Result<Restoring, LifecycleError> {
    restore_with_progress(verified, home, &mut |_, _| {})
}

/// [`restore`], calling `progress(done, total)` after each file is staged and placed.
pub fn restore_with_progress(
    verified: &Verified,
    home: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restoring, LifecycleError> {
    restore_files(verified, home, &[], progress)
}

/// [`restore_with_progress`] leaving out the members named in `except` (with a PostgreSQL
/// store, `state.db` goes into the database instead: [`restore_into_postgres`]).
pub fn restore_files(
    verified: &Verified,
    home: &Path,
    except: &[&str],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restoring, LifecycleError> {
    let opened = &verified.opened;
    let lock = GatewayLock::acquire(home)?;
    let work = TempDir::new(home, "restore")?;
    let (new_dir, old_dir) = (work.0.join("new"), work.0.join("old"));
    let keep_live_keys = home.join(VAULT_FILE).exists();
    let members: Vec<(&String, &Zeroizing<Vec<u8>>)> = opened
        .members
        .iter()
        .filter(|(p, _)| !(keep_live_keys && p.as_str() == VAULT_FILE))
        .filter(|(p, _)| !except.contains(&p.as_str()))
        .collect();
    let total = u64::try_from(members.len() * 2).unwrap_or(u64::MAX);
    let mut done = 0u64;
    for (p, b) in &members {
        write_new(&new_dir.join(p), b)?;
        done += 1;
        progress(done, total);
    }
    let mut r = Restoring {
        home: home.to_path_buf(),
        work: Some(work),
        placed: Vec::new(),
        archived: None,
        restored: Restored {
            replaced: 0,
            audit_archive: None,
            data_keys_restored: !keep_live_keys
                && !except.contains(&VAULT_FILE)
                && opened.members.contains_key(VAULT_FILE),
        },
        _lock: lock,
    };
    // The live database's WAL goes aside with it (it may hold committed transactions).
    let state_wal: &[&str] = if except.contains(&"state.db") {
        &[]
    } else {
        &["state.db-wal", "state.db-shm"]
    };
    for f in state_wal {
        let from = home.join(f);
        let to = old_dir.join(f);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&old_dir)
            .map_err(io_err(&old_dir, "create directory"))?;
        match std::fs::rename(&from, &to) {
            Ok(()) => r.placed.push((from, Some(to))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&from, "move aside")(e)),
        }
    }
    // A restore that leaves the audit log out (PostgreSQL: the database's chain is kept)
    // leaves the live one where it is.
    if !except.contains(&chitin_audit::DB_FILE) {
        r.archived = archive_audit(home)?;
    }
    r.restored.audit_archive = r.archived.as_ref().map(|(d, _)| d.clone());
    for (p, b) in &members {
        let dest = home.join(p);
        done += 1;
        if std::fs::read(&dest).is_ok_and(|cur| cur == b[..]) {
            progress(done, total);
            continue;
        }
        if let Some(parent) = dest.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io_err(parent, "create directory"))?;
        }
        let aside = old_dir.join(p);
        let moved = match std::fs::symlink_metadata(&dest) {
            Ok(_) => {
                if let Some(parent) = aside.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)
                        .map_err(io_err(parent, "create directory"))?;
                }
                std::fs::rename(&dest, &aside).map_err(io_err(&dest, "move aside"))?;
                Some(aside)
            }
            Err(_) => None,
        };
        r.placed.push((dest.clone(), moved));
        let src = new_dir.join(p);
        if let Err(e) = std::fs::rename(&src, &dest) {
            // Nothing was put at `dest`: only the file moved aside goes back.
            if let Some((d, Some(old))) = r.placed.pop() {
                let _ = std::fs::rename(old, d);
            }
            return Err(io_err(&dest, "replace")(e));
        }
        r.restored.replaced += 1;
        progress(done, total);
    }
    if let Ok(d) = std::fs::File::open(home) {
        let _ = d.sync_all();
    }
    Ok(r)
}

/// Moves the live audit log's files into a new `audit-archive/restore-<unix ms>/` (0700) and
/// copies `audit.pub` beside them. `None` when there was no audit log.
fn archive_audit(home: &Path) -> Result<Option<(PathBuf, Vec<&'static str>)>, LifecycleError> {
    if !home.join("audit.db").exists() {
        return Ok(None);
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let base = home.join("audit-archive");
    let mut dir = base.join(format!("restore-{stamp}"));
    let mut k = 1;
    while dir.exists() {
        dir = base.join(format!("restore-{stamp}-{k}"));
        k += 1;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir, "create directory"))?;
    let mut moved = Vec::new();
    for f in AUDIT_FILES {
        let from = home.join(f);
        match std::fs::rename(&from, dir.join(f)) {
            Ok(()) => moved.push(*f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                // Put back what already moved: the live log stays whole in one place.
                for m in moved {
                    let _ = std::fs::rename(dir.join(m), home.join(m));
                }
                let _ = std::fs::remove_dir(&dir);
                return Err(io_err(&from, "move into the audit archive")(e));
            }
        }
    }
    let public = home.join(chitin_audit::PUB_FILE);
    if public.exists() {
        let bytes = std::fs::read(&public).map_err(io_err(&public, "read"))?;
        write_new(&dir.join(chitin_audit::PUB_FILE), &bytes)?;
    }
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(Some((dir, moved)))
}

/// Where scheduled backups are staged for upload when `[backup] target` is set without a
/// `[backup] dir` (inside the state dir; dot-names are never backed up). The staged file is
/// removed after the upload.
pub const OFFSITE_STAGING: &str = ".offsite-staging";

/// Scheduled backup (the gateway calls this every `[backup] interval_hours`): writes
/// `dir/chitin-backup-<unix ms>.age` and deletes all but the `keep` newest such files.
/// With only `[backup] target` set, the file is written to `<home>/.offsite-staging/` (kept
/// there until uploaded). `Ok(None)` when neither `[backup] dir` nor `target` is configured.
pub fn scheduled(
    home: &Path,
    store: &Store,
    audit: &AuditLog,
    cfg: &crate::config::backup::BackupConfig,
    now_ms: i64,
) -> Result<Option<PathBuf>, LifecycleError> {
    let dir = if !cfg.dir.is_empty() {
        PathBuf::from(&cfg.dir)
    } else if !cfg.target.is_empty() {
        home.join(OFFSITE_STAGING)
    } else {
        return Ok(None);
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir, "create directory"))?;
    let out = dir.join(format!("{SCHEDULED_PREFIX}{now_ms:013}{SCHEDULED_SUFFIX}"));
    create(home, store, audit, &cfg.recipient, &out, now_ms)?;
    prune(&dir, cfg.keep.max(1))?;
    Ok(Some(out))
}

/// Deletes all but the `keep` newest scheduled backups in `dir`; returns what it deleted.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, LifecycleError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err(dir, "list"))?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| {
            n.strip_prefix(SCHEDULED_PREFIX)
                .and_then(|r| r.strip_suffix(SCHEDULED_SUFFIX))
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    let mut gone = Vec::new();
    for n in names.into_iter().take(excess) {
        let p = dir.join(n);
        std::fs::remove_file(&p).map_err(io_err(&p, "remove"))?;
        gone.push(p);
    }
    Ok(gone)
}
