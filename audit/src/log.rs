//! The writer: one thread owns the database connection, batches pending appends into one
//! transaction (group commit) and answers each caller only after the commit is durable.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::checkpoint::{Checkpoint, CheckpointSigner, KeySigner, ManifestSignature, PublicKey};
use crate::record::{
    GENESIS_HASH, HashInput, Kind, RecordInput, canonical_json, compute_hash, field_check,
    from_hex, sha256, to_hex,
};
use crate::store::{self, CHECKPOINT_FILE, DB_FILE, INSERT_SQL, KEY_FILE, PUB_FILE, db_err};
use crate::{AuditError, fsutil};

/// A source of wall-clock time in unix milliseconds. Any `Fn() -> i64` works, so the gateway
/// can pass `move || clock.now_ms()`.
pub trait AuditClock: Send + Sync {
    fn now_ms(&self) -> i64;
}

impl<F: Fn() -> i64 + Send + Sync> AuditClock for F {
    fn now_ms(&self) -> i64 {
        self()
    }
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl AuditClock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// Called with every new checkpoint (route it into the gateway's log).
pub type CheckpointSink = Arc<dyn Fn(&Checkpoint) + Send + Sync>;

/// How the log is opened.
#[derive(Clone)]
pub struct AuditOptions {
    /// Write a checkpoint at least every this many records (0 = only on time / demand).
    pub checkpoint_every_records: u64,
    /// Write a checkpoint every this many ms, also when idle (0 = never on time).
    pub checkpoint_every_ms: i64,
    /// Most appends committed in one transaction.
    pub max_batch: usize,
    /// How long a write waits for a lock held by another process before it fails.
    pub lock_timeout: Duration,
    /// Refuse to grow the database beyond this size (writes then fail closed).
    pub max_db_bytes: Option<u64>,
    /// The time source.
    pub clock: Arc<dyn AuditClock>,
    /// The checkpoint signer; `None` = `audit.key` in the state directory (0600, created once).
    pub signer: Option<Arc<dyn CheckpointSigner>>,
    /// Receives every checkpoint (e.g. to log it through tracing).
    pub on_checkpoint: Option<CheckpointSink>,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            checkpoint_every_records: 1000,
            checkpoint_every_ms: 60_000,
            max_batch: 1024,
            lock_timeout: Duration::from_secs(2),
            max_db_bytes: None,
            clock: Arc::new(SystemClock),
            signer: None,
            on_checkpoint: None,
        }
    }
}

/// Where the log's files live.
#[derive(Debug, Clone)]
pub struct AuditPaths {
    pub dir: PathBuf,
    pub db: PathBuf,
    pub checkpoints: PathBuf,
    pub key: PathBuf,
    pub public_key: PathBuf,
}

impl AuditPaths {
    /// The standard file names inside the state directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
            db: dir.join(DB_FILE),
            checkpoints: dir.join(CHECKPOINT_FILE),
            key: dir.join(KEY_FILE),
            public_key: dir.join(PUB_FILE),
        }
    }
}

/// Proof that a record is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: i64,
    pub hash: [u8; 32],
    pub ts_ms: i64,
}

/// What `/ready` reports for the audit sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditHealth {
    Ok,
    /// The last write (or checkpoint) failed; audited actions are refused until a write
    /// succeeds again.
    Failed {
        reason: String,
        since_ms: i64,
    },
}

impl AuditHealth {
    pub fn is_ok(&self) -> bool {
        matches!(self, AuditHealth::Ok)
    }
}

/// A record prepared in the caller's thread (canonical JSON and payload digest are computed
/// there, so the writer thread only chains and inserts).
struct Prepared {
    kind: Kind,
    actor: String,
    action: String,
    resource: String,
    decision: String,
    policies: String,
    outcome: String,
    payload: String,
    digest: [u8; 32],
}

impl Prepared {
    fn new(input: RecordInput) -> Result<Self, AuditError> {
        let payload = canonical_json(&input.payload)?;
        let policies = canonical_json(&input.policies)?;
        let digest = sha256(payload.as_bytes());
        Ok(Self {
            kind: input.kind,
            actor: input.actor,
            action: input.action,
            resource: input.resource,
            decision: input.decision,
            policies,
            outcome: input.outcome,
            payload,
            digest,
        })
    }
}

type Reply<T> = SyncSender<Result<T, AuditError>>;

enum Msg {
    Append(Prepared, Reply<Receipt>),
    Checkpoint(Reply<Checkpoint>),
    RemovePayload {
        seq: i64,
        reason: String,
        actor: String,
        reply: Reply<Receipt>,
    },
    Shutdown(Reply<Option<Checkpoint>>),
}

/// A pending append: wait for it to become durable.
pub struct PendingReceipt(Receiver<Result<Receipt, AuditError>>);

impl PendingReceipt {
    /// Blocks until the record is durable (or failed).
    pub fn wait(self) -> Result<Receipt, AuditError> {
        self.0.recv().unwrap_or(Err(AuditError::Closed))
    }
}

struct Shared {
    write_error: Mutex<Option<(String, i64)>>,
    checkpoint_error: Mutex<Option<(String, i64)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The tamper-evident audit log. Cheap to share (`Arc<AuditLog>`); every method is blocking and
/// safe to call from many threads (from tokio, use `spawn_blocking`).
pub struct AuditLog {
    tx: Mutex<Option<Sender<Msg>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    paths: AuditPaths,
    public_key: PublicKey,
    signer: Arc<dyn CheckpointSigner>,
}

impl AuditLog {
    /// Opens (creating if needed) the log in the state directory `dir`: `audit.db`,
    /// `audit.checkpoints`, `audit.key` (unless a signer is given) and `audit.pub`.
    /// Files are 0600, the directory 0700.
    pub fn open(dir: &Path, options: AuditOptions) -> Result<Self, AuditError> {
        fsutil::ensure_dir(dir)?;
        let paths = AuditPaths::in_dir(dir);
        let signer: Arc<dyn CheckpointSigner> = match &options.signer {
            Some(s) => s.clone(),
            None => {
                if !paths.key.exists() && paths.public_key.exists() {
                    // Never mint a new key for an existing log: its checkpoints would no longer
                    // verify under the published key.
                    return Err(AuditError::KeyFile {
                        path: paths.key.clone(),
                        reason: format!("is missing but {} exists", paths.public_key.display()),
                    });
                }
                Arc::new(KeySigner::load_or_create(&paths.key)?)
            }
        };
        let public_key = signer.public_key();
        match std::fs::read_to_string(&paths.public_key) {
            Ok(text) => {
                let existing = PublicKey::parse(&text)?;
                if existing != public_key {
                    return Err(AuditError::KeyFile {
                        path: paths.public_key.clone(),
                        reason: format!(
                            "holds key {} but the signing key is {}; the signing key was replaced",
                            existing.id_hex(),
                            public_key.id_hex()
                        ),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fsutil::write_private(&paths.public_key, &public_key.to_text())?;
            }
            Err(e) => {
                return Err(AuditError::Io {
                    what: format!("read {}", paths.public_key.display()),
                    source: e,
                });
            }
        }
        let conn = store::open_writer(&paths.db, options.lock_timeout, options.max_db_bytes)?;
        let cp_file = fsutil::open_append_private(&paths.checkpoints)?;
        let last_cp: Option<(i64, i64)> = conn
            .query_row(
                "SELECT seq, time_ms FROM checkpoints ORDER BY seq DESC, rowid DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err(&paths.db))?;
        let now = options.clock.now_ms();
        let shared = Arc::new(Shared {
            write_error: Mutex::new(None),
            checkpoint_error: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel();
        let mut writer = Writer {
            conn: Some(conn),
            db_path: paths.db.clone(),
            cp_file,
            signer: Arc::clone(&signer),
            opts: options,
            shared: shared.clone(),
            last_cp_seq: last_cp.map_or(0, |c| c.0),
            last_cp_time: last_cp.map_or(now, |c| c.1),
            head_seq: 0,
            outage: None,
        };
        writer.refresh_head();
        let thread = std::thread::Builder::new()
            .name("chitin-audit-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| AuditError::Io {
                what: "start the audit writer thread".into(),
                source: e,
            })?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
            paths,
            public_key,
            signer,
        })
    }

    /// Signs a backup manifest with this log's key (see [`ManifestSignature`]), so a restore
    /// can check that the backup was made by this deployment.
    pub fn sign_backup_manifest(&self, manifest: &[u8]) -> Result<ManifestSignature, AuditError> {
        ManifestSignature::sign(self.signer.as_ref(), manifest)
    }

    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(msg).map_err(|_| AuditError::Closed),
            None => Err(AuditError::Closed),
        }
    }

    /// Queues a record; the returned handle resolves once it is durable. Lets one thread keep
    /// several appends in flight (they share a commit).
    pub fn submit(&self, input: RecordInput) -> Result<PendingReceipt, AuditError> {
        let prepared = Prepared::new(input)?;
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.send(Msg::Append(prepared, rtx))?;
        Ok(PendingReceipt(rrx))
    }

    /// Appends a record and returns once it is durable. An error means the record was NOT
    /// written: the caller must not perform the action (fail closed).
    pub fn append(&self, input: RecordInput) -> Result<Receipt, AuditError> {
        self.submit(input)?.wait()
    }

    /// Records `input`, and runs `action` only if the record is durable.
    pub fn audited<T>(
        &self,
        input: RecordInput,
        action: impl FnOnce(&Receipt) -> T,
    ) -> Result<T, AuditError> {
        let receipt = self.append(input)?;
        Ok(action(&receipt))
    }

    /// Writes a signed checkpoint of the current head now.
    pub fn checkpoint_now(&self) -> Result<Checkpoint, AuditError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.send(Msg::Checkpoint(rtx))?;
        rrx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// Retention/erasure: removes the payload of record `seq`. The record keeps its digest (so
    /// the chain still verifies) and says when and why; the removal itself is appended as a
    /// `retention` record (`payload_removed`) so it cannot pass for a silent edit.
    pub fn remove_payload(
        &self,
        seq: i64,
        reason: &str,
        actor: &str,
    ) -> Result<Receipt, AuditError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        self.send(Msg::RemovePayload {
            seq,
            reason: reason.into(),
            actor: actor.into(),
            reply: rtx,
        })?;
        rrx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// For `/ready`: `Ok`, or `Failed` with the reason while writes fail.
    pub fn health(&self) -> AuditHealth {
        let stopped = lock(&self.thread)
            .as_ref()
            .is_none_or(JoinHandle::is_finished);
        if stopped {
            return AuditHealth::Failed {
                reason: "the audit writer is not running".into(),
                since_ms: 0,
            };
        }
        let w = lock(&self.shared.write_error).clone();
        let c = lock(&self.shared.checkpoint_error).clone();
        match w.or(c) {
            None => AuditHealth::Ok,
            Some((reason, since_ms)) => AuditHealth::Failed { reason, since_ms },
        }
    }

    /// The file locations.
    pub fn paths(&self) -> &AuditPaths {
        &self.paths
    }

    /// The key that verifies this log's checkpoints.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// A read-only view (its own connection).
    pub fn reader(&self) -> Result<store::AuditReader, AuditError> {
        store::AuditReader::open(&self.paths.db)
    }

    /// Stops the writer after a final checkpoint of any uncovered records (gateway shutdown).
    pub fn shutdown(&self) -> Result<Option<Checkpoint>, AuditError> {
        let (rtx, rrx) = mpsc::sync_channel(1);
        let sent = self.send(Msg::Shutdown(rtx));
        let result = match sent {
            Ok(()) => rrx.recv().unwrap_or(Err(AuditError::Closed)),
            Err(e) => Err(e),
        };
        lock(&self.tx).take();
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        result
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Writer {
    conn: Option<Connection>,
    db_path: PathBuf,
    cp_file: std::fs::File,
    signer: Arc<dyn CheckpointSigner>,
    opts: AuditOptions,
    shared: Arc<Shared>,
    last_cp_seq: i64,
    last_cp_time: i64,
    head_seq: i64,
    /// `(since_ms, reason)` of a write outage not yet noted in the log.
    outage: Option<(i64, String)>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let timeout = self.time_to_checkpoint();
            let first = match rx.recv_timeout(timeout) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.maybe_checkpoint();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.final_checkpoint();
                    return;
                }
            };
            let mut appends = Vec::new();
            let mut controls = Vec::new();
            let mut next = Some(first);
            while let Some(m) = next.take() {
                match m {
                    Msg::Append(p, r) => appends.push((p, r)),
                    other => controls.push(other),
                }
                if appends.len() < self.opts.max_batch.max(1)
                    && controls.is_empty()
                    && let Ok(m) = rx.try_recv()
                {
                    next = Some(m);
                }
            }
            if !appends.is_empty() {
                self.commit_batch(appends);
                self.maybe_checkpoint();
            }
            for c in controls {
                match c {
                    Msg::Append(..) => {}
                    Msg::Checkpoint(reply) => {
                        let _ = reply.send(self.write_checkpoint());
                    }
                    Msg::RemovePayload {
                        seq,
                        reason,
                        actor,
                        reply,
                    } => {
                        let r = self.remove_payload(seq, &reason, &actor);
                        let _ = reply.send(r);
                        self.maybe_checkpoint();
                    }
                    Msg::Shutdown(reply) => {
                        let _ = reply.send(self.final_checkpoint());
                        return;
                    }
                }
            }
        }
    }

    fn now(&self) -> i64 {
        self.opts.clock.now_ms()
    }

    fn time_to_checkpoint(&self) -> Duration {
        if self.opts.checkpoint_every_ms <= 0 {
            return Duration::from_secs(3600);
        }
        let due = self
            .last_cp_time
            .saturating_add(self.opts.checkpoint_every_ms);
        // Re-check at least every 250 ms of real time: the clock is injected and may jump.
        let wait = due.saturating_sub(self.now()).clamp(1, 250);
        Duration::from_millis(u64::try_from(wait).unwrap_or(1))
    }

    fn conn(&mut self) -> Result<&mut Connection, AuditError> {
        if self.conn.is_none() {
            self.conn = Some(store::open_writer(
                &self.db_path,
                self.opts.lock_timeout,
                self.opts.max_db_bytes,
            )?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| AuditError::Internal("no connection".into()))
    }

    fn refresh_head(&mut self) {
        if let Some(c) = &self.conn
            && let Ok(h) = store::read_head(c, &self.db_path)
        {
            self.head_seq = h.map_or(0, |h| h.0);
        }
    }

    fn fail_write(&mut self, e: &AuditError) {
        // Drop the connection: the next batch reopens it and re-reads the head.
        self.conn = None;
        let now = self.now();
        let reason = e.to_string();
        *lock(&self.shared.write_error) = Some((reason.clone(), now));
        if self.outage.is_none() {
            self.outage = Some((now, reason));
        }
    }

    fn commit_batch(&mut self, appends: Vec<(Prepared, Reply<Receipt>)>) {
        let (prepared, replies): (Vec<Prepared>, Vec<Reply<Receipt>>) = appends.into_iter().unzip();
        match self.try_commit(&prepared) {
            Ok(receipts) => {
                *lock(&self.shared.write_error) = None;
                self.outage = None;
                for (reply, receipt) in replies.into_iter().zip(receipts) {
                    let _ = reply.send(Ok(receipt));
                }
            }
            Err(e) => {
                self.fail_write(&e);
                let msg = e.to_string();
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Unavailable(msg.clone())));
                }
            }
        }
    }

    fn try_commit(&mut self, batch: &[Prepared]) -> Result<Vec<Receipt>, AuditError> {
        let now = self.now();
        self.try_commit_with(batch, now, |_| Ok(()))
    }

    /// One transaction: `before` (inside the write lock), then the outage note if one is due,
    /// then `batch`. Nothing is acknowledged unless the commit (fsync) succeeded.
    fn try_commit_with(
        &mut self,
        batch: &[Prepared],
        now: i64,
        before: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<(), AuditError>,
    ) -> Result<Vec<Receipt>, AuditError> {
        let outage = self.outage.clone();
        let db_path = self.db_path.clone();
        let e = db_err(&db_path);
        let conn = self.conn()?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&e)?;
        before(&tx)?;
        // Re-read the head inside the write lock: another process (the CLI) may have appended.
        let head = store::read_head(&tx, &db_path)?;
        let (mut seq, mut prev) = match head {
            Some((s, h)) => (
                s,
                <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
                    AuditError::Unavailable(format!(
                        "the head record {s} has a malformed hash; run `chitin audit verify`"
                    ))
                })?,
            ),
            None => (0, GENESIS_HASH),
        };
        let mut receipts = Vec::with_capacity(batch.len());
        {
            let mut st = tx.prepare_cached(INSERT_SQL).map_err(&e)?;
            let note;
            let mut items: Vec<&Prepared> = Vec::with_capacity(batch.len() + 1);
            if let Some((since, reason)) = outage {
                note = Prepared::new(RecordInput {
                    outcome: "recovered".into(),
                    payload: serde_json::json!({
                        "since_ms": since, "recovered_ms": now, "reason": reason,
                    }),
                    ..RecordInput::new(Kind::System, "gateway", "audit.outage", "audit")
                })?;
                items.push(&note);
            }
            items.extend(batch.iter());
            for (i, p) in items.iter().enumerate() {
                seq += 1;
                let kind = p.kind.as_str();
                let hash = compute_hash(&HashInput {
                    seq,
                    ts_ms: now,
                    kind,
                    actor: &p.actor,
                    action: &p.action,
                    resource: &p.resource,
                    decision: &p.decision,
                    policies: &p.policies,
                    outcome: &p.outcome,
                    payload_digest: &p.digest,
                    prev_hash: &prev,
                });
                let check = field_check(
                    now,
                    [
                        kind,
                        &p.actor,
                        &p.action,
                        &p.resource,
                        &p.decision,
                        &p.policies,
                        &p.outcome,
                    ],
                );
                st.execute(params![
                    seq,
                    now,
                    kind,
                    p.actor,
                    p.action,
                    p.resource,
                    p.decision,
                    p.policies,
                    p.outcome,
                    &p.digest[..],
                    p.payload,
                    &check[..],
                    &prev[..],
                    &hash[..],
                ])
                .map_err(&e)?;
                prev = hash;
                let is_note = i == 0 && items.len() > batch.len();
                if !is_note {
                    receipts.push(Receipt {
                        seq,
                        hash,
                        ts_ms: now,
                    });
                }
            }
        }
        tx.commit().map_err(&e)?;
        self.head_seq = seq;
        Ok(receipts)
    }

    fn remove_payload(
        &mut self,
        target: i64,
        reason: &str,
        actor: &str,
    ) -> Result<Receipt, AuditError> {
        if reason.trim().is_empty() {
            return Err(AuditError::InvalidInput(
                "a payload removal needs a reason".into(),
            ));
        }
        let now = self.now();
        let db_path = self.db_path.clone();
        let e = db_err(&db_path);
        let row: Option<(Vec<u8>, Option<String>, String, String)> = {
            let conn = match self.conn() {
                Ok(c) => c,
                Err(err) => {
                    self.fail_write(&err);
                    return Err(AuditError::Unavailable(err.to_string()));
                }
            };
            conn.query_row(
                "SELECT payload_digest, payload, kind, action FROM records WHERE seq = ?1",
                params![target],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(&e)?
        };
        let (digest, payload, kind, action) = row.ok_or(AuditError::NoSuchRecord(target))?;
        if payload.is_none() {
            return Err(AuditError::InvalidInput(format!(
                "the payload of record {target} was already removed"
            )));
        }
        if kind == Kind::Retention.as_str() && action == "payload_removed" {
            return Err(AuditError::InvalidInput(format!(
                "record {target} documents a payload removal; its payload must stay"
            )));
        }
        // The removal and the retention record that documents it commit together.
        let note = Prepared::new(RecordInput {
            payload: serde_json::json!({
                "seq": target,
                "payload_digest": to_hex(&digest),
                "reason": reason,
                "removed_at_ms": now,
            }),
            ..RecordInput::new(
                Kind::Retention,
                actor,
                "payload_removed",
                format!("audit:{target}"),
            )
        })?;
        let reason_owned = reason.to_string();
        let result = self.try_commit_with(std::slice::from_ref(&note), now, |tx| {
            let changed = tx
                .execute(
                    "UPDATE records SET payload = NULL, removed_at_ms = ?1, removed_reason = ?2 \
                     WHERE seq = ?3 AND payload IS NOT NULL AND payload_digest = ?4",
                    params![now, reason_owned, target, digest],
                )
                .map_err(&e)?;
            if changed == 1 {
                Ok(())
            } else {
                Err(AuditError::InvalidInput(format!(
                    "record {target} changed while its payload was being removed; retry"
                )))
            }
        });
        match result {
            Ok(mut r) => {
                *lock(&self.shared.write_error) = None;
                self.outage = None;
                r.pop()
                    .ok_or_else(|| AuditError::Internal("no receipt".into()))
            }
            Err(err @ AuditError::InvalidInput(_)) => {
                self.conn = None;
                Err(err)
            }
            Err(err) => {
                self.fail_write(&err);
                Err(AuditError::Unavailable(err.to_string()))
            }
        }
    }

    /// Every N records, and every T seconds even when idle (a heartbeat: the same head with a
    /// new time shows the log was alive and had not grown).
    fn maybe_checkpoint(&mut self) {
        let uncovered = self.head_seq.saturating_sub(self.last_cp_seq);
        let by_count = uncovered > 0
            && self.opts.checkpoint_every_records > 0
            && u64::try_from(uncovered).unwrap_or(0) >= self.opts.checkpoint_every_records;
        let by_time = self.opts.checkpoint_every_ms > 0
            && self.now().saturating_sub(self.last_cp_time) >= self.opts.checkpoint_every_ms;
        if by_count || by_time {
            let _ = self.write_checkpoint();
        }
    }

    fn final_checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        self.refresh_head();
        if self.head_seq > self.last_cp_seq {
            self.write_checkpoint().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Signs the current head, appends it to the checkpoint file (fsynced), then stores it in
    /// the database and hands it to the sink.
    fn write_checkpoint(&mut self) -> Result<Checkpoint, AuditError> {
        let result = self.try_checkpoint();
        match &result {
            Ok(_) => *lock(&self.shared.checkpoint_error) = None,
            Err(e) => {
                let now = self.now();
                let mut slot = lock(&self.shared.checkpoint_error);
                let since = slot.as_ref().map_or(now, |s| s.1);
                *slot = Some((format!("checkpoint failed: {e}"), since));
                drop(slot);
                self.conn = None;
                // Retry on time no sooner than one interval later (count-based retries happen
                // after every batch).
                self.last_cp_time = now;
            }
        }
        result
    }

    fn try_checkpoint(&mut self) -> Result<Checkpoint, AuditError> {
        let now = self.now();
        let db_path = self.db_path.clone();
        let conn = self.conn()?;
        let (seq, head) = match store::read_head(conn, &db_path)? {
            Some((s, h)) => (
                s,
                <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
                    AuditError::Internal(format!("record {s} has a malformed hash"))
                })?,
            ),
            None => (0, GENESIS_HASH),
        };
        // Never sign a tail that does not extend the last signed head.
        let anchor: Option<(i64, String)> = conn
            .query_row(
                "SELECT seq, head FROM checkpoints ORDER BY seq DESC, rowid DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db_err(&db_path))?;
        if let Some((a_seq, a_head)) = anchor {
            if seq < a_seq {
                return Err(AuditError::Unavailable(format!(
                    "refusing to sign: the database ends at record {seq} but checkpoint {a_seq} \
                     exists (truncated); run `chitin audit verify`"
                )));
            }
            let a_hash = from_hex(&a_head)
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or_else(|| {
                    AuditError::Unavailable(format!(
                        "refusing to sign: checkpoint {a_seq} in the database is malformed; run \
                         `chitin audit verify`"
                    ))
                })?;
            let reader = store::AuditReader::open(&db_path)?;
            if let Err(t) = crate::verify::check_tail(&reader, a_seq, a_hash)? {
                return Err(AuditError::Unavailable(format!(
                    "refusing to sign a checkpoint over a tampered log ({t}); run `chitin audit verify`"
                )));
            }
        }
        let cp = Checkpoint::sign(self.signer.as_ref(), seq, &head, now)?;
        let mut line = cp.to_line()?;
        line.push('\n');
        self.cp_file
            .write_all(line.as_bytes())
            .and_then(|()| self.cp_file.sync_data())
            .map_err(|e| AuditError::Io {
                what: "append to the checkpoint file".into(),
                source: e,
            })?;
        let conn = self.conn()?;
        conn.execute(
            "INSERT INTO checkpoints (seq, head, time_ms, key_id, sig) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![cp.seq, cp.head, cp.time_ms, cp.key_id, cp.sig],
        )
        .map_err(db_err(&db_path))?;
        self.last_cp_seq = seq;
        self.last_cp_time = now;
        self.head_seq = self.head_seq.max(seq);
        if let Some(sink) = &self.opts.on_checkpoint {
            sink(&cp);
        }
        Ok(cp)
    }
}
