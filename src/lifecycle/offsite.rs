//! Off-site backups (`[backup] target = "s3://bucket/prefix"`): each scheduled backup (an age
//! file, encrypted to `[backup] recipient` before it leaves the host) is uploaded to an
//! S3-compatible store, old remote backups are deleted (`remote_keep`, `remote_max_age_days`),
//! and the newest remote backup is periodically test-restored into a scratch directory
//! (downloaded, decrypted with `[backup] identity`, signature, digests, database and audit chain
//! checked; the live state is never touched). When each last succeeded is kept in the store's
//! `meta` table ([`Status`]).
//!
//! **Credentials** are `secret:NAME` (or `env:VAR`) references. A stored secret is released
//! only through the gate: `secret.use` by `Chitin::Gateway::"backup"` on the secret, with
//! `context.host` the endpoint's host name, which must be in the secret's audience.

use std::path::Path;

use serde_json::{Map, json};
use zeroize::Zeroizing;

use super::s3::{Client, Credentials, Object, Target, endpoint_url};
use super::{LifecycleError, backup};
use crate::config::backup::BackupConfig;
use crate::config::secret_ref::SecretRef;

/// The principal that uses the off-site credentials: `Chitin::Gateway::"backup"`.
pub const PRINCIPAL: &str = "Chitin::Gateway::\"backup\"";

/// Keys of the store's `meta` table where each off-site step records its last outcome
/// (read by [`status`] and by `chitin security audit`).
pub(crate) const LAST_UPLOAD: &str = "backup.offsite.last_upload_ms";
pub(crate) const LAST_UPLOAD_KEY: &str = "backup.offsite.last_upload_key";
pub(crate) const LAST_ERROR: &str = "backup.offsite.last_error";
pub(crate) const TEST_RESTORE_ATTEMPT: &str = "backup.test_restore.last_attempt_ms";
pub(crate) const TEST_RESTORE_OK: &str = "backup.test_restore.last_ok_ms";
pub(crate) const TEST_RESTORE_ERROR: &str = "backup.test_restore.last_error";

fn err(why: impl Into<String>) -> LifecycleError {
    LifecycleError::Backup(why.into())
}

/// Runs `f` to completion from blocking code: on the current runtime's handle (from
/// `spawn_blocking`), else on a new current-thread runtime (the CLI).
pub fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, LifecycleError> {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => Ok(h.block_on(f)),
        Err(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(f))
            .map_err(|e| err(format!("cannot start the I/O runtime: {e}"))),
    }
}

/// The host name the credentials are released for (the endpoint's, without port).
pub fn credential_host(cfg: &BackupConfig) -> Result<String, LifecycleError> {
    let url = endpoint_url(&cfg.endpoint, &cfg.region).map_err(err)?;
    Ok(url
        .host_str()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase())
}

/// Releases one credential: `env:VAR` from the environment, `secret:NAME` through the gate
/// and the secret store (audience = the endpoint host).
fn credential(
    field: &str,
    text: &str,
    host: &str,
    gate: &crate::gate::Gate,
    secrets: &crate::secrets::SharedSecretStore,
) -> Result<Zeroizing<String>, LifecycleError> {
    let r = SecretRef::parse_credential(field, text).map_err(err)?;
    let name = match r {
        SecretRef::Env(var) => {
            return std::env::var(&var)
                .map(|v| Zeroizing::new(v.trim().to_string()))
                .map_err(|_| {
                    err(format!(
                        "{field}: the environment variable {var} is not set"
                    ))
                });
        }
        SecretRef::Secret(name) => name,
    };
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let uid = |s: String| {
        s.parse::<cedar_policy::EntityUid>()
            .map_err(|e| err(format!("invalid entity: {e}")))
    };
    let mut context = Map::new();
    context.insert("host".into(), json!(host));
    let req = crate::policy::PolicyRequest {
        principal: uid(PRINCIPAL.to_string())?,
        action: crate::policy::Action::SecretUse.uid(),
        resource: uid(format!("Chitin::Secret::{}", q(name.as_str())))?,
        context,
    };
    let extra: Vec<serde_json::Value> = secrets.cedar_entity(&name).into_iter().collect();
    let refused = |why: &str| {
        err(format!(
            "{why}: secret.use by {PRINCIPAL} on secret {n} for host {host} ({field}); store it with `chitin secrets set {n} --audience {host}`",
            n = name.as_str()
        ))
    };
    let authz = match gate.check_with_entities(&req, &extra)? {
        crate::gate::Verdict::Allowed(a, _) => a,
        crate::gate::Verdict::Denied(_) => return Err(refused("policy denied")),
        crate::gate::Verdict::ApprovalRequired { .. } => {
            return Err(refused(
                "policy asks for an approval, which a scheduled backup cannot wait for",
            ));
        }
    };
    let value = secrets
        .release(&authz, host, gate.audit().as_ref())
        .map_err(|e| err(e.to_string()))?;
    let text = value
        .expose_str()
        .ok_or_else(|| err(format!("secret {} is not UTF-8 text", name.as_str())))?;
    Ok(Zeroizing::new(text.trim().to_string()))
}

/// The S3 client for `cfg`, its credentials released through the gate. `Ok(None)` when no
/// `[backup] target` is configured.
pub fn client(
    cfg: &BackupConfig,
    gate: &crate::gate::Gate,
    secrets: &crate::secrets::SharedSecretStore,
) -> Result<Option<Client>, LifecycleError> {
    if cfg.target.is_empty() {
        return Ok(None);
    }
    let target = Target::parse(&cfg.target).map_err(err)?;
    let endpoint = endpoint_url(&cfg.endpoint, &cfg.region).map_err(err)?;
    let host = credential_host(cfg)?;
    let creds = Credentials {
        access_key_id: credential(
            "[backup] access_key_id",
            &cfg.access_key_id,
            &host,
            gate,
            secrets,
        )?,
        secret_access_key: credential(
            "[backup] secret_access_key",
            &cfg.secret_access_key,
            &host,
            gate,
            secrets,
        )?,
    };
    Client::new(endpoint, &cfg.region, cfg.path_style, target, creds).map(Some)
}

/// A scheduled backup in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The file name (the key without the prefix).
    pub name: String,
    pub key: String,
    pub created_ms: i64,
    pub size: u64,
}

/// The scheduled backups among `objects` (names `chitin-backup-<ms>.age` directly under the
/// prefix), oldest first.
pub fn backups(target: &Target, objects: &[Object]) -> Vec<Remote> {
    let prefix = target.list_prefix();
    let mut out: Vec<Remote> = objects
        .iter()
        .filter_map(|o| {
            let name = o.key.strip_prefix(&prefix)?;
            let ms = name
                .strip_prefix(backup::SCHEDULED_PREFIX)?
                .strip_suffix(backup::SCHEDULED_SUFFIX)?;
            if ms.is_empty() || !ms.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(Remote {
                name: name.to_string(),
                key: o.key.clone(),
                created_ms: ms.parse().ok()?,
                size: o.size,
            })
        })
        .collect();
    out.sort_by(|a, b| (a.created_ms, &a.name).cmp(&(b.created_ms, &b.name)));
    out
}

/// Uploads the backup file `file` under its file name: one `PUT` up to
/// `[backup] multipart_threshold_bytes`, a multipart upload (aborted on failure) above.
pub fn upload(
    client: &Client,
    cfg: &BackupConfig,
    file: &Path,
    now_ms: i64,
) -> Result<String, LifecycleError> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| err(format!("{} has no file name", file.display())))?;
    let key = client.target().key(name);
    let size = std::fs::metadata(file)
        .map_err(super::io_err(file, "read"))?
        .len();
    if size > cfg.multipart_threshold_bytes {
        block_on(client.put_multipart(&key, file, size, cfg.multipart_part_bytes, now_ms))??;
    } else {
        let bytes = std::fs::read(file).map_err(super::io_err(file, "read"))?;
        block_on(client.put(&key, bytes, now_ms))??;
    }
    Ok(key)
}

/// Deletes remote scheduled backups beyond the newest `remote_keep` and those older than
/// `remote_max_age_days`; the newest is always kept. Returns the deleted keys.
pub fn prune(
    client: &Client,
    cfg: &BackupConfig,
    now_ms: i64,
) -> Result<Vec<String>, LifecycleError> {
    let all = backups(client.target(), &block_on(client.list(now_ms))??);
    let n = all.len();
    let keep = cfg.remote_keep.max(1);
    let max_age_ms = i64::try_from(cfg.remote_max_age_days)
        .unwrap_or(i64::MAX)
        .saturating_mul(86_400_000);
    let mut gone = Vec::new();
    for (i, r) in all.iter().enumerate() {
        let newest = i + 1 == n;
        let beyond_keep = n - i > keep;
        let too_old = max_age_ms > 0 && now_ms.saturating_sub(r.created_ms) > max_age_ms;
        if !newest && (beyond_keep || too_old) {
            block_on(client.delete(&r.key, now_ms))??;
            gone.push(r.key.clone());
        }
    }
    Ok(gone)
}

/// Downloads the newest remote backup and checks it fully in a scratch directory under
/// `scratch_parent` (removed afterwards): decrypt with `identity`, digests, the manifest
/// signature by `trusted`, the state database and the audit chain. Returns the key checked.
pub fn test_restore(
    client: &Client,
    identity: &Path,
    trusted: &chitin_audit::PublicKey,
    scratch_parent: &Path,
    now_ms: i64,
) -> Result<(String, backup::VerifyReport), LifecycleError> {
    let all = backups(client.target(), &block_on(client.list(now_ms))??);
    let newest = all
        .last()
        .ok_or_else(|| err("test-restore: the store holds no backup yet"))?;
    let bytes = block_on(client.get(&newest.key, now_ms))??;
    let scratch = backup::scratch_dir(scratch_parent, "test-restore")?;
    let file = scratch.path().join(&newest.name);
    backup::write_private(&file, &bytes)?;
    let id = backup::load_identity(identity)?;
    let verified = backup::check(backup::open(&file, &id)?, trusted)?;
    Ok((newest.key.clone(), verified.report.clone()))
}

/// When the off-site steps last ran, from the store's `meta` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub last_upload_ms: Option<i64>,
    pub last_upload_key: Option<String>,
    pub last_error: Option<String>,
    pub test_restore_attempt_ms: Option<i64>,
    pub test_restore_ok_ms: Option<i64>,
    pub test_restore_error: Option<String>,
}

/// Reads the off-site status.
pub fn status(store: &crate::store::Store) -> Result<Status, LifecycleError> {
    let num = |k: &str| -> Result<Option<i64>, LifecycleError> {
        Ok(store.meta(k)?.and_then(|v| v.parse().ok()))
    };
    let text = |k: &str| -> Result<Option<String>, LifecycleError> {
        Ok(store.meta(k)?.filter(|v| !v.is_empty()))
    };
    Ok(Status {
        last_upload_ms: num(LAST_UPLOAD)?,
        last_upload_key: text(LAST_UPLOAD_KEY)?,
        last_error: text(LAST_ERROR)?,
        test_restore_attempt_ms: num(TEST_RESTORE_ATTEMPT)?,
        test_restore_ok_ms: num(TEST_RESTORE_OK)?,
        test_restore_error: text(TEST_RESTORE_ERROR)?,
    })
}

/// Whether a test-restore is due now: `test_restore_hours` > 0, an identity configured, and
/// the last attempt at least that long ago.
pub fn test_restore_due(lc: &super::Lifecycle, cfg: &BackupConfig) -> Result<bool, LifecycleError> {
    let every = i64::try_from(cfg.test_restore_hours)
        .unwrap_or(i64::MAX)
        .saturating_mul(3_600_000);
    let last: Option<i64> = lc
        .store
        .meta(TEST_RESTORE_ATTEMPT)?
        .and_then(|v| v.parse().ok());
    let now = lc.clock.now_ms();
    Ok(
        every > 0
            && !cfg.identity.is_empty()
            && last.is_none_or(|l| now.saturating_sub(l) >= every),
    )
}

/// What one off-site round did.
#[derive(Debug, Default)]
pub struct Report {
    /// The key uploaded, or why the upload (or the retention after it) failed.
    pub upload: Option<Result<String, String>>,
    /// Remote backups deleted by retention.
    pub pruned: Vec<String>,
    /// The key test-restored, or why the test-restore failed.
    pub test_restore: Option<Result<String, String>>,
}

/// The off-site round of a scheduler tick: uploads `made` (the backup just written, if any),
/// applies remote retention, and test-restores the newest remote backup when due. Every
/// outcome is recorded in `meta`.
pub fn round(
    lc: &super::Lifecycle,
    cfg: &BackupConfig,
    client: &Client,
    made: Option<&Path>,
) -> Result<Report, LifecycleError> {
    let store = &lc.store;
    let now = lc.clock.now_ms();
    let mut report = Report::default();
    if let Some(file) = made {
        let up = upload(client, cfg, file, now).and_then(|key| {
            let pruned = prune(client, cfg, now)?;
            Ok((key, pruned))
        });
        match up {
            Ok((key, pruned)) => {
                store.set_meta(LAST_UPLOAD, &now.to_string())?;
                store.set_meta(LAST_UPLOAD_KEY, &key)?;
                store.set_meta(LAST_ERROR, "")?;
                report.pruned = pruned;
                report.upload = Some(Ok(key));
            }
            Err(e) => {
                store.set_meta(LAST_ERROR, &e.to_string())?;
                report.upload = Some(Err(e.to_string()));
            }
        }
    }
    if test_restore_due(lc, cfg)? {
        store.set_meta(TEST_RESTORE_ATTEMPT, &now.to_string())?;
        let tested = test_restore(
            client,
            Path::new(&cfg.identity),
            &lc.audit.public_key(),
            &lc.home,
            now,
        );
        match tested {
            Ok((key, _)) => {
                store.set_meta(TEST_RESTORE_OK, &now.to_string())?;
                store.set_meta(TEST_RESTORE_ERROR, "")?;
                report.test_restore = Some(Ok(key));
            }
            Err(e) => {
                store.set_meta(TEST_RESTORE_ERROR, &e.to_string())?;
                report.test_restore = Some(Err(e.to_string()));
            }
        }
    }
    Ok(report)
}
