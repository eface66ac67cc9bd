//! The writer: the caller that appends holds the database connection while it commits every
//! record queued so far in one transaction (group commit: records queued while a commit
//! flushes go together in the next), and a caller is answered only after the commit holding
//! its record is durable. A background thread commits records submitted without a waiting
//! caller and writes the time-based checkpoints; on PostgreSQL it keeps the connection and
//! does every write (the synchronous client cannot run on a thread driving async tasks).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{Removal, WriterStore};
use crate::checkpoint::{Checkpoint, CheckpointSigner, KeySigner, ManifestSignature, PublicKey};
use crate::record::Record;
use crate::record::{
    GENESIS_HASH, HashInput, Kind, RecordInput, canonical_json, compute_hash, field_check,
    from_hex, sha256, to_hex,
};
use crate::store::{self, CHECKPOINT_FILE, DB_FILE, KEY_FILE, PUB_FILE, SqliteStore};
use crate::verify::{Verdict, Verifier};
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

/// A record waiting for its commit and the caller waiting for its receipt.
type Queued = (Prepared, Reply<Receipt>);

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

/// Work for the background thread: commit what is queued, or run a job on the writer.
enum Wake {
    Commit,
    Run(Box<dyn FnOnce(&Core) + Send>),
}

/// What the callers and the background thread share. Whoever holds `writer` commits every
/// queued record (its own among them) in one transaction, so a caller that appends does its
/// own commit instead of handing the record to another thread and waiting to be woken: the
/// records queued while one commit flushes go together in the next (group commit), and the
/// chain's order is the order of the commits.
struct Core {
    /// Records waiting for a commit, in submission order.
    queue: Mutex<Vec<Queued>>,
    /// The connection and the chain's state; `None` once the log is shut down.
    writer: Mutex<Option<Writer>>,
    /// The store's connection stays on the background thread
    /// ([`WriterStore::own_thread`]): callers hand everything to it.
    own_thread: bool,
}

impl Core {
    /// Commits every queued record (as the holder of the writer), then a checkpoint if one is
    /// due. After a shutdown the queued callers are answered `Closed` (their replies dropped).
    fn lead(&self) {
        let mut writer = lock(&self.writer);
        match writer.as_mut() {
            Some(w) => self.commit_queued(w),
            None => lock(&self.queue).clear(),
        }
    }

    fn commit_queued(&self, w: &mut Writer) {
        loop {
            let batch: Vec<Queued> = {
                let mut queue = lock(&self.queue);
                let n = queue.len().min(w.opts.max_batch.max(1));
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            w.commit_batch(batch);
            w.maybe_checkpoint();
        }
    }

    /// Runs `f` on the writer after committing what is queued (a control request sees every
    /// record submitted before it).
    fn with_writer<T>(
        &self,
        f: impl FnOnce(&mut Writer) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let mut writer = lock(&self.writer);
        match writer.as_mut() {
            Some(w) => {
                self.commit_queued(w);
                f(w)
            }
            None => Err(AuditError::Closed),
        }
    }

    /// Commits what is queued, writes the final checkpoint of any uncovered records and
    /// closes the writer (later appends are refused `Closed`).
    fn close(&self) -> Result<Option<Checkpoint>, AuditError> {
        let mut writer = lock(&self.writer);
        let result = match writer.as_mut() {
            Some(w) => {
                self.commit_queued(w);
                w.final_checkpoint()
            }
            None => Err(AuditError::Closed),
        };
        *writer = None;
        lock(&self.queue).clear();
        result
    }

    /// The background thread: commits records [`AuditLog::submit`]ted without a caller
    /// waiting on them (every record, and every control request, when the connection must
    /// stay on this thread), and writes the time-based checkpoints (a heartbeat while idle).
    fn background(&self, wake: &Receiver<Wake>) {
        loop {
            let timeout = match lock(&self.writer).as_ref() {
                Some(w) => w.time_to_checkpoint(),
                None => return,
            };
            match wake.recv_timeout(timeout) {
                Ok(first) => {
                    let mut jobs = Vec::new();
                    let mut next = Some(first);
                    while let Some(m) = next.take() {
                        if let Wake::Run(job) = m {
                            jobs.push(job);
                        }
                        next = wake.try_recv().ok();
                    }
                    self.lead();
                    for job in jobs {
                        job(self);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.with_writer(|w| {
                        w.maybe_checkpoint();
                        Ok(())
                    });
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The tamper-evident audit log. Cheap to share (`Arc<AuditLog>`); every method is blocking and
/// safe to call from many threads (from tokio, use `spawn_blocking`).
pub struct AuditLog {
    core: Arc<Core>,
    shared: Arc<Shared>,
    /// Wakes the background thread (a submitted record, or a job on a writer that stays on
    /// it); taken at shutdown (the thread then stops).
    wake: Mutex<Option<Sender<Wake>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    paths: AuditPaths,
    location: Location,
    public_key: PublicKey,
    signer: Arc<dyn CheckpointSigner>,
}

/// Where the records live.
enum Location {
    Sqlite,
    #[cfg(feature = "postgres")]
    Postgres(Arc<crate::pg::PgConfig>),
}

/// The state directory: created 0700; the signer (given, or `audit.key`, created once); the
/// published `audit.pub`, which must match the signer.
fn prepare_dir(
    dir: &Path,
    options: &AuditOptions,
) -> Result<(AuditPaths, Arc<dyn CheckpointSigner>), AuditError> {
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
    Ok((paths, signer))
}

impl AuditLog {
    /// Opens (creating if needed) the log in the state directory `dir`: `audit.db`,
    /// `audit.checkpoints`, `audit.key` (unless a signer is given) and `audit.pub`.
    /// Files are 0600, the directory 0700.
    pub fn open(dir: &Path, options: AuditOptions) -> Result<Self, AuditError> {
        let (paths, signer) = prepare_dir(dir, &options)?;
        let store = SqliteStore::open(&paths.db, options.lock_timeout, options.max_db_bytes)?;
        Self::start(paths, signer, Box::new(store), Location::Sqlite, options)
    }

    /// Opens (creating its tables if needed) the log in PostgreSQL. Several `AuditLog`s — in
    /// several processes, on several hosts — may append to the same database: appends are
    /// serialized in the database, so they form one chain. `dir` is this writer's state
    /// directory: `audit.pub`, `audit.key` (unless a signer is given) and `audit.checkpoints`,
    /// where this writer keeps a copy of every checkpoint it signs (a witness outside the
    /// database). The database remembers the deployment's public key: a writer with another
    /// key is refused.
    #[cfg(feature = "postgres")]
    pub fn open_postgres(
        dir: &Path,
        config: &crate::pg::PgConfig,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        let (paths, signer) = prepare_dir(dir, &options)?;
        let store = crate::pg::PgStore::open(config, &signer.public_key())?;
        Self::start(
            paths,
            signer,
            Box::new(store),
            Location::Postgres(Arc::new(config.clone())),
            options,
        )
    }

    fn start(
        paths: AuditPaths,
        signer: Arc<dyn CheckpointSigner>,
        mut store: Box<dyn WriterStore>,
        location: Location,
        options: AuditOptions,
    ) -> Result<Self, AuditError> {
        let public_key = signer.public_key();
        let cp_file = fsutil::open_append_private(&paths.checkpoints)?;
        let last_cp = store.checkpoint_marks()?;
        let now = options.clock.now_ms();
        let shared = Arc::new(Shared {
            write_error: Mutex::new(None),
            checkpoint_error: Mutex::new(None),
        });
        let mut writer = Writer {
            store,
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
        let core = Arc::new(Core {
            queue: Mutex::new(Vec::new()),
            own_thread: writer.store.own_thread(),
            writer: Mutex::new(Some(writer)),
        });
        let (wake, woken) = mpsc::channel();
        let thread = {
            let core = Arc::clone(&core);
            std::thread::Builder::new()
                .name("chitin-audit-writer".into())
                .spawn(move || core.background(&woken))
                .map_err(|e| AuditError::Io {
                    what: "start the audit writer thread".into(),
                    source: e,
                })?
        };
        Ok(Self {
            core,
            shared,
            wake: Mutex::new(Some(wake)),
            thread: Mutex::new(Some(thread)),
            paths,
            location,
            public_key,
            signer,
        })
    }

    /// Signs a backup manifest with this log's key (see [`ManifestSignature`]), so a restore
    /// can check that the backup was made by this deployment.
    pub fn sign_backup_manifest(&self, manifest: &[u8]) -> Result<ManifestSignature, AuditError> {
        ManifestSignature::sign(self.signer.as_ref(), manifest)
    }

    /// The record as it will be chained; refused here (and nothing queued) when it cannot be
    /// stored.
    fn prepare(&self, input: RecordInput) -> Result<Prepared, AuditError> {
        let prepared = Prepared::new(input)?;
        #[cfg(feature = "postgres")]
        if matches!(self.location, Location::Postgres(_)) {
            // PostgreSQL text cannot hold NUL: refuse this record alone rather than fail the
            // whole group commit it would join.
            for (name, v) in [
                ("actor", &prepared.actor),
                ("action", &prepared.action),
                ("resource", &prepared.resource),
                ("decision", &prepared.decision),
                ("outcome", &prepared.outcome),
            ] {
                if v.contains('\0') {
                    return Err(AuditError::InvalidInput(format!(
                        "the record's {name} contains a NUL character, which the PostgreSQL \
                         audit log cannot store; the action was not performed"
                    )));
                }
            }
        }
        Ok(prepared)
    }

    /// Queues a record; the returned handle resolves once it is durable. Lets one thread keep
    /// several appends in flight (they share a commit, made by the background thread).
    pub fn submit(&self, input: RecordInput) -> Result<PendingReceipt, AuditError> {
        let prepared = self.prepare(input)?;
        let (rtx, rrx) = mpsc::sync_channel(1);
        // Queued and signalled under the wake lock: a shutdown either sees the record in the
        // queue (and commits it) or comes first (and the record is refused, not queued).
        let wake = lock(&self.wake);
        let Some(sender) = wake.as_ref() else {
            return Err(AuditError::Closed);
        };
        lock(&self.core.queue).push((prepared, rtx));
        if sender.send(Wake::Commit).is_err() {
            // The background thread is gone (it stops only when the log closes, or if it
            // panicked): never leave the record waiting for it. Commit it here, or, when the
            // connection lives on that thread, answer every queued caller `Closed`.
            drop(wake);
            if self.core.own_thread {
                lock(&self.core.queue).clear();
            } else {
                self.core.lead();
            }
        }
        Ok(PendingReceipt(rrx))
    }

    /// Appends a record and returns once it is durable. An error means the record was NOT
    /// written: the caller must not perform the action (fail closed). The caller commits
    /// itself (with every record queued behind the commit before it), on its own thread —
    /// unless the connection stays on the background thread, which then commits it.
    pub fn append(&self, input: RecordInput) -> Result<Receipt, AuditError> {
        if self.core.own_thread {
            return self.submit(input)?.wait();
        }
        let prepared = self.prepare(input)?;
        let (rtx, rrx) = mpsc::sync_channel(1);
        lock(&self.core.queue).push((prepared, rtx));
        self.core.lead();
        rrx.recv().unwrap_or(Err(AuditError::Closed))
    }

    /// Runs `f` with the writer: on this thread, or on the background thread when the
    /// connection stays there.
    fn on_writer<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Core) -> Result<T, AuditError> + Send + 'static,
    ) -> Result<T, AuditError> {
        if !self.core.own_thread {
            return f(&self.core);
        }
        let (rtx, rrx) = mpsc::sync_channel(1);
        {
            let wake = lock(&self.wake);
            let Some(sender) = wake.as_ref() else {
                return Err(AuditError::Closed);
            };
            sender
                .send(Wake::Run(Box::new(move |core| {
                    let _ = rtx.send(f(core));
                })))
                .map_err(|_| AuditError::Closed)?;
        }
        rrx.recv().unwrap_or(Err(AuditError::Closed))
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
        self.on_writer(|core| core.with_writer(Writer::write_checkpoint))
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
        let (reason, actor) = (reason.to_string(), actor.to_string());
        self.on_writer(move |core| {
            core.with_writer(|w| {
                let r = w.remove_payload(seq, &reason, &actor);
                w.maybe_checkpoint();
                r
            })
        })
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

    /// The file locations. On PostgreSQL `db` is not used (the records are in the database):
    /// read through [`reader`](Self::reader) and verify with [`verify`](Self::verify).
    pub fn paths(&self) -> &AuditPaths {
        &self.paths
    }

    /// The key that verifies this log's checkpoints.
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    /// A read-only view (its own connection).
    pub fn reader(&self) -> Result<store::AuditReader, AuditError> {
        match &self.location {
            Location::Sqlite => store::AuditReader::open(&self.paths.db),
            #[cfg(feature = "postgres")]
            Location::Postgres(config) => store::AuditReader::open_postgres(config),
        }
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match &self.location {
            Location::Sqlite => "sqlite",
            #[cfg(feature = "postgres")]
            Location::Postgres(_) => "postgres",
        }
    }

    /// Verifies the whole log now with this log's public key: the database, cross-checked with
    /// the checkpoint file in the state directory (`chitin audit verify`).
    pub fn verify(&self) -> Result<Verdict, AuditError> {
        let verifier = Verifier::new(self.public_key);
        match &self.location {
            Location::Sqlite => verifier.verify_db(&self.paths.db, Some(&self.paths.checkpoints)),
            #[cfg(feature = "postgres")]
            Location::Postgres(config) => {
                verifier.verify_postgres(config, &[self.paths.checkpoints.as_path()])
            }
        }
    }

    /// Stops the writer after committing what is queued and a final checkpoint of any
    /// uncovered records (gateway shutdown). Later appends are refused (`Closed`).
    pub fn shutdown(&self) -> Result<Option<Checkpoint>, AuditError> {
        let result = self.on_writer(Core::close);
        // No more submissions; the background thread stops when its channel closes.
        lock(&self.wake).take();
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
    store: Box<dyn WriterStore>,
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

    fn refresh_head(&mut self) {
        if let Ok(h) = self.store.head() {
            self.head_seq = h.map_or(0, |h| h.0);
        }
    }

    fn fail_write(&mut self, e: &AuditError) {
        // Drop the connection: the next batch reopens it and re-reads the head.
        self.store.reset();
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
        self.try_commit_with(batch, now, None)
    }

    /// One transaction: the write lock, `removal` if any, then the outage note if one is due,
    /// then `batch`, each chained to the head read under the lock. Nothing is acknowledged
    /// unless the commit (fsync) succeeded.
    fn try_commit_with(
        &mut self,
        batch: &[Prepared],
        now: i64,
        removal: Option<&Removal<'_>>,
    ) -> Result<Vec<Receipt>, AuditError> {
        let outage = self.outage.clone();
        let mut receipts: Vec<Receipt> = Vec::with_capacity(batch.len());
        let mut last_seq = 0;
        self.store
            .commit(removal, &mut |head: crate::backend::Head| {
                receipts.clear();
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
                let note = match &outage {
                    Some((since, reason)) => Some(Prepared::new(RecordInput {
                        outcome: "recovered".into(),
                        payload: serde_json::json!({
                            "since_ms": since, "recovered_ms": now, "reason": reason,
                        }),
                        ..RecordInput::new(Kind::System, "gateway", "audit.outage", "audit")
                    })?),
                    None => None,
                };
                let mut rows = Vec::with_capacity(batch.len() + 1);
                for (i, p) in note.iter().chain(batch.iter()).enumerate() {
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
                    rows.push(Record {
                        seq,
                        ts_ms: now,
                        kind: kind.to_string(),
                        actor: p.actor.clone(),
                        action: p.action.clone(),
                        resource: p.resource.clone(),
                        decision: p.decision.clone(),
                        policies: p.policies.clone(),
                        outcome: p.outcome.clone(),
                        payload_digest: p.digest.to_vec(),
                        payload: Some(p.payload.clone()),
                        removed_at_ms: None,
                        removed_reason: None,
                        field_check: check.to_vec(),
                        prev_hash: prev.to_vec(),
                        hash: hash.to_vec(),
                    });
                    prev = hash;
                    let is_note = i == 0 && note.is_some();
                    if !is_note {
                        receipts.push(Receipt {
                            seq,
                            hash,
                            ts_ms: now,
                        });
                    }
                }
                last_seq = seq;
                Ok(rows)
            })?;
        self.head_seq = self.head_seq.max(last_seq);
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
        let facts = match self.store.payload_facts(target) {
            Ok(f) => f,
            Err(err) => {
                self.fail_write(&err);
                return Err(AuditError::Unavailable(err.to_string()));
            }
        };
        let (digest, payload, kind, action) = facts.ok_or(AuditError::NoSuchRecord(target))?;
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
        let removal = Removal {
            seq: target,
            now,
            reason,
            digest: &digest,
        };
        let result = self.try_commit_with(std::slice::from_ref(&note), now, Some(&removal));
        match result {
            Ok(mut r) => {
                *lock(&self.shared.write_error) = None;
                self.outage = None;
                r.pop()
                    .ok_or_else(|| AuditError::Internal("no receipt".into()))
            }
            Err(err @ AuditError::InvalidInput(_)) => {
                self.store.reset();
                Err(err)
            }
            Err(err) => {
                self.fail_write(&err);
                Err(AuditError::Unavailable(err.to_string()))
            }
        }
    }

    fn checkpoint_due(&self) -> bool {
        let uncovered = self.head_seq.saturating_sub(self.last_cp_seq);
        let by_count = uncovered > 0
            && self.opts.checkpoint_every_records > 0
            && u64::try_from(uncovered).unwrap_or(0) >= self.opts.checkpoint_every_records;
        let by_time = self.opts.checkpoint_every_ms > 0
            && self.now().saturating_sub(self.last_cp_time) >= self.opts.checkpoint_every_ms;
        by_count || by_time
    }

    /// Every N records, and every T seconds even when idle (a heartbeat: the same head with a
    /// new time shows the log was alive and had not grown). When several writers share the log,
    /// a checkpoint another writer just signed counts: one heartbeat per interval, not one per
    /// writer.
    fn maybe_checkpoint(&mut self) {
        if !self.checkpoint_due() {
            return;
        }
        if self.store.shared()
            && let Ok(Some((seq, time))) = self.store.checkpoint_marks()
        {
            self.last_cp_seq = self.last_cp_seq.max(seq);
            self.last_cp_time = self.last_cp_time.max(time);
            if !self.checkpoint_due() {
                return;
            }
        }
        let _ = self.write_checkpoint();
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
                self.store.reset();
                // Retry on time no sooner than one interval later (count-based retries happen
                // after every batch).
                self.last_cp_time = now;
            }
        }
        result
    }

    fn try_checkpoint(&mut self) -> Result<Checkpoint, AuditError> {
        let now = self.now();
        let (seq, head) = match self.store.head()? {
            Some((s, h)) => (
                s,
                <[u8; 32]>::try_from(h.as_slice()).map_err(|_| {
                    AuditError::Internal(format!("record {s} has a malformed hash"))
                })?,
            ),
            None => (0, GENESIS_HASH),
        };
        // Never sign a tail that does not extend the last signed head.
        if let Some(anchor) = self.store.last_checkpoint()? {
            let a_seq = anchor.seq;
            if seq < a_seq {
                return Err(AuditError::Unavailable(format!(
                    "refusing to sign: the database ends at record {seq} but checkpoint {a_seq} \
                     exists (truncated); run `chitin audit verify`"
                )));
            }
            let a_hash = from_hex(&anchor.head)
                .and_then(|v| <[u8; 32]>::try_from(v.as_slice()).ok())
                .ok_or_else(|| {
                    AuditError::Unavailable(format!(
                        "refusing to sign: checkpoint {a_seq} in the database is malformed; run \
                         `chitin audit verify`"
                    ))
                })?;
            let reader = self.store.reader()?;
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
        self.store.insert_checkpoint(&cp)?;
        self.last_cp_seq = self.last_cp_seq.max(seq);
        self.last_cp_time = now;
        self.head_seq = self.head_seq.max(seq);
        if let Some(sink) = &self.opts.on_checkpoint {
            sink(&cp);
        }
        Ok(cp)
    }
}
