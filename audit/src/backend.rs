//! What the writer thread needs from a storage backend: SQLite ([`crate::store`]) or
//! PostgreSQL (`crate::pg`, feature `postgres`).
//!
//! The writer computes the chain; the backend only serializes, reads and stores. Every append
//! goes through [`WriterStore::commit`]: one transaction that first takes the backend's write
//! lock (SQLite `BEGIN IMMEDIATE`; PostgreSQL the `audit_head` row `FOR UPDATE`), then reads
//! the head, so `prev_hash` always links the true predecessor even when other writers (other
//! processes, other gateways) append to the same log.

use crate::AuditError;
use crate::checkpoint::Checkpoint;
use crate::record::Record;
use crate::store::AuditReader;

/// The last record `(seq, hash)`, or `None` for the empty log.
pub(crate) type Head = Option<(i64, Vec<u8>)>;

/// Builds the rows of one batch from the head read under the write lock.
pub(crate) type BuildRows<'a> = dyn FnMut(Head) -> Result<Vec<Record>, AuditError> + 'a;

/// A payload removal (retention, erasure), committed with the record that documents it.
pub(crate) struct Removal<'a> {
    pub seq: i64,
    pub now: i64,
    pub reason: &'a str,
    pub digest: &'a [u8],
}

impl Removal<'_> {
    pub(crate) fn changed_error(&self) -> AuditError {
        AuditError::InvalidInput(format!(
            "record {} changed while its payload was being removed; retry",
            self.seq
        ))
    }
}

/// The stored facts about a record a payload removal needs: digest, payload, kind, action.
pub(crate) type PayloadFacts = (Vec<u8>, Option<String>, String, String);

/// Storage for the writer thread. Connections are opened lazily and dropped by [`reset`]
/// after a failure (the next call reconnects and re-reads everything it needs).
///
/// [`reset`]: WriterStore::reset
pub(crate) trait WriterStore: Send {
    /// One transaction: take the write lock, apply `removal` (exactly one row must change),
    /// read the head, insert the rows `build` returns, commit (durably) — or change nothing.
    fn commit(
        &mut self,
        removal: Option<&Removal<'_>>,
        build: &mut BuildRows<'_>,
    ) -> Result<(), AuditError>;

    /// The last committed record.
    fn head(&mut self) -> Result<Head, AuditError>;

    /// Digest, payload, kind and action of record `seq`.
    fn payload_facts(&mut self, seq: i64) -> Result<Option<PayloadFacts>, AuditError>;

    /// The checkpoint with the highest seq (the anchor a new checkpoint must extend).
    fn last_checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError>;

    /// `(highest checkpointed seq, time of the newest checkpoint)`, from any writer.
    fn checkpoint_marks(&mut self) -> Result<Option<(i64, i64)>, AuditError>;

    /// Stores a signed checkpoint.
    fn insert_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), AuditError>;

    /// A reader on its own connection.
    fn reader(&self) -> Result<AuditReader, AuditError>;

    /// Whether other writers may append to the same log (then checkpoint bookkeeping is
    /// re-read from the database before a new one is signed).
    fn shared(&self) -> bool;

    /// Whether the connection must stay on the writer's own thread. The PostgreSQL client is
    /// synchronous over its own tokio runtime, which cannot run on a thread that drives
    /// another runtime's tasks (an appending caller may be one): every write then goes
    /// through the background thread.
    fn own_thread(&self) -> bool {
        false
    }

    /// Drops the connection after a failure.
    fn reset(&mut self);
}
