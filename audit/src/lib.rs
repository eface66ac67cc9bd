//! Chitin's tamper-evident audit log.
//!
//! - [`AuditLog`]: the writer (hash chain, group commit in SQLite WAL with `synchronous=FULL`,
//!   signed checkpoints every N records / T seconds and on shutdown, fail closed).
//! - [`Verifier`]: offline verification of a database (cross-checked with the checkpoint file)
//!   or of a JSONL export, with the first bad record and the reason.
//! - [`export`]: JSONL (self-verifying) and CSV (for reading) exports.
//! - Feature `postgres`: the same log in PostgreSQL, one chain shared by several gateways
//!   (`AuditLog::open_postgres`, `AuditReader::open_postgres`, `Verifier::verify_postgres`,
//!   `copy_from_sqlite`).
//!
//! This crate depends on nothing of the gateway, so an auditor can build and run
//! `chitin-audit-verify` alone.

mod backend;
mod checkpoint;
mod error;
pub mod export;
mod fsutil;
mod log;
#[cfg(feature = "postgres")]
mod pg;
mod record;
mod store;
mod verify;

pub use checkpoint::{
    Checkpoint, CheckpointProblem, CheckpointSigner, KeySigner, ManifestSignature, PublicKey,
    key_id, new_seed, parse_checkpoint_lines, read_key_file_seed,
};
pub use error::AuditError;
pub use log::{
    AuditClock, AuditHealth, AuditLog, AuditOptions, AuditPaths, CheckpointSink, PendingReceipt,
    Receipt, SystemClock,
};
#[cfg(feature = "postgres")]
pub use pg::{CopySummary, PgConfig, PgTls, copy_from_sqlite};
pub use record::{
    CHECKED_FIELDS, GENESIS_HASH, GateDecision, Kind, Record, RecordInput, ToolRun, canonical_json,
    from_hex, sha256, to_hex,
};
pub use store::{AuditReader, CHECKPOINT_FILE, DB_FILE, KEY_FILE, PUB_FILE, Query};
pub use verify::{Tamper, TamperReason, Verdict, Verifier, VerifyReport};
