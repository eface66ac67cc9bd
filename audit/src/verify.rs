//! Offline verification of a database (cross-checked with the checkpoint file) or an export.
//!
//! The pass is streaming (constant memory for a database). When a record fails, a diagnosis
//! step looks at the neighbourhood to name the reason: which field was modified, a missing,
//! reordered or inserted record, a chain that no longer matches a signed checkpoint, a bad
//! signature, a wrong key, a tail truncated behind a checkpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::AuditError;
use crate::checkpoint::{Checkpoint, CheckpointProblem, PublicKey, parse_checkpoint_lines};
use crate::export::{self, ExportHeader};
use crate::record::{GENESIS_HASH, Record, first_mismatched_field, sha256, to_hex};
use crate::store::AuditReader;

/// Longest checkpoint interval the single-insertion search examines (it is quadratic).
const MAX_INSERTION_SEARCH: i64 = 1024;

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    pub head: [u8; 32],
    pub last_checkpoint: Option<i64>,
    /// Records after the last checkpoint (protected by the chain only, not yet by a signature).
    pub uncovered: u64,
}

impl VerifyReport {
    /// `ok: N records, head <hex>, last checkpoint <seq>` (the CLI contract).
    pub fn ok_line(&self) -> String {
        format!(
            "ok: {} records, head {}, last checkpoint {}",
            self.records,
            to_hex(&self.head),
            // 0 = no checkpoint yet (a checkpoint at seq 0 covers the empty log).
            self.last_checkpoint.unwrap_or(0)
        )
    }
}

/// The first bad record and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tamper {
    pub seq: i64,
    pub reason: TamperReason,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tampered: first bad record {}: {}",
            self.seq, self.reason
        )
    }
}

/// Why verification failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TamperReason {
    /// A field of the record was changed (named).
    ModifiedField(String),
    MissingRecord,
    Reordered(String),
    /// A record that is not covered by a valid checkpoint.
    Inserted(String),
    /// Records rewritten after the last checkpoint that still matches.
    Rewritten(String),
    BadCheckpointSignature {
        checkpoint: i64,
    },
    WrongKey {
        checkpoint: i64,
        signed_by: String,
        expected: String,
    },
    TailTruncated {
        checkpoint: i64,
        last: Option<i64>,
    },
    /// The database has no records but checkpoints say it had.
    Emptied {
        checkpoint: i64,
    },
    /// The checkpoint file and the database disagree.
    CheckpointFile(String),
    /// A payload was removed without the retention record that documents it.
    UndocumentedRemoval,
    /// An export line that cannot be read.
    Malformed(String),
    /// SQLite reports the database file itself as damaged.
    Corrupt(String),
}

impl fmt::Display for TamperReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ModifiedField(name) => write!(f, "modified field {name}"),
            Self::MissingRecord => f.write_str("missing record"),
            Self::Reordered(d) => write!(f, "reordered ({d})"),
            Self::Inserted(d) => write!(f, "inserted ({d})"),
            Self::Rewritten(d) => write!(f, "inserted or rewritten records ({d})"),
            Self::BadCheckpointSignature { checkpoint } => {
                write!(f, "bad checkpoint signature (checkpoint at seq {checkpoint})")
            }
            Self::WrongKey {
                checkpoint,
                signed_by,
                expected,
            } => write!(
                f,
                "wrong key (checkpoint at seq {checkpoint} is signed by key {signed_by}, the public key given is {expected})"
            ),
            Self::TailTruncated { checkpoint, last } => write!(
                f,
                "tail truncated behind a checkpoint (checkpoint {checkpoint} covers records up to {checkpoint}, the log ends at {})",
                last.map_or_else(|| "nothing".to_string(), |l| l.to_string())
            ),
            Self::Emptied { checkpoint } => write!(
                f,
                "database emptied or rewritten (checkpoint {checkpoint} covers {checkpoint} records, the database has none)"
            ),
            Self::CheckpointFile(d) => write!(f, "checkpoint file does not match the database ({d})"),
            Self::UndocumentedRemoval => f.write_str(
                "modified field payload (payload removed without the retention record that documents it)",
            ),
            Self::Malformed(d) => write!(f, "malformed export ({d})"),
            Self::Corrupt(d) => write!(f, "database file is damaged ({d})"),
        }
    }
}

/// The outcome of a verification: a report, or the first bad record.
pub type Verdict = Result<VerifyReport, Tamper>;

/// Verifies logs against one public key.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: PublicKey,
}

/// Records in stream order, re-readable from a position (for diagnosis).
trait Source {
    /// Calls `f` with each record from stream position `pos`; `seq_hint` is the stored seq of
    /// the record at `pos` (databases are ordered by seq). Stops when `f` returns false.
    fn each_from(
        &self,
        pos: usize,
        seq_hint: i64,
        f: &mut dyn FnMut(&Record) -> bool,
    ) -> Result<(), AuditError>;
}

struct DbSource<'a>(&'a AuditReader);

impl Source for DbSource<'_> {
    fn each_from(
        &self,
        pos: usize,
        seq_hint: i64,
        f: &mut dyn FnMut(&Record) -> bool,
    ) -> Result<(), AuditError> {
        if pos != 0 {
            // Diagnosis re-reads: short, on this connection.
            return self.0.for_each_from(seq_hint, |r| f(&r));
        }
        // The main pass: a second connection decodes rows on another thread while this one
        // hashes (the two halves cost about the same).
        let reader = self.0.reopen()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Record>>(8);
        std::thread::scope(|scope| {
            let producer = scope.spawn(move || -> Result<(), AuditError> {
                let mut batch = Vec::with_capacity(BATCH);
                let mut stopped = false;
                reader.for_each_from(seq_hint, |r| {
                    batch.push(r);
                    if batch.len() >= BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if tx.send(full).is_err() {
                            stopped = true;
                            return false;
                        }
                    }
                    true
                })?;
                if !stopped && !batch.is_empty() {
                    let _ = tx.send(batch);
                }
                Ok(())
            });
            'outer: for batch in rx.iter() {
                for r in &batch {
                    if !f(r) {
                        break 'outer;
                    }
                }
            }
            drop(rx);
            producer.join().unwrap_or_else(|_| {
                Err(AuditError::Internal(
                    "verifier reader thread panicked".into(),
                ))
            })
        })
    }
}

/// Records per hand-over between the reader thread and the verifier.
const BATCH: usize = 512;

struct VecSource<'a>(&'a [Record]);

impl Source for VecSource<'_> {
    fn each_from(
        &self,
        pos: usize,
        _seq_hint: i64,
        f: &mut dyn FnMut(&Record) -> bool,
    ) -> Result<(), AuditError> {
        for r in self.0.iter().skip(pos) {
            if !f(r) {
                break;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A whole database: starts at seq 1 from the genesis hash; every removal must be documented.
    Database,
    /// An export: a segment anchored at its first record; every record must be covered by a
    /// signed checkpoint inside the export.
    Export,
}

fn as32(v: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(v).ok()
}

fn payload_ok(r: &Record) -> bool {
    match &r.payload {
        Some(t) => {
            r.removed_at_ms.is_none()
                && r.removed_reason.is_none()
                && sha256(t.as_bytes())[..] == r.payload_digest[..]
        }
        None => r.removed_at_ms.is_some() && r.removed_reason.is_some(),
    }
}

/// The fast path: everything about `r` is as expected at position `e` after `p`.
fn record_ok(r: &Record, e: i64, p: &[u8; 32]) -> bool {
    r.seq == e
        && r.prev_hash[..] == p[..]
        && r.hash.len() == 32
        && payload_ok(r)
        && r.compute_hash()[..] == r.hash[..]
        && first_mismatched_field(r).is_none()
}

struct Failure {
    pos: usize,
    record: Record,
    expected: i64,
    prev: [u8; 32],
    prev_prev: [u8; 32],
}

struct PassOk {
    count: u64,
    first: Option<i64>,
    last: Option<i64>,
    head: [u8; 32],
}

impl Verifier {
    pub fn new(key: PublicKey) -> Self {
        Self { key }
    }

    /// Verifies the database `db`, cross-checked against `checkpoint_file` (pass the state
    /// dir's `audit.checkpoints`; `None` only when it is really not available).
    pub fn verify_db(
        &self,
        db: &Path,
        checkpoint_file: Option<&Path>,
    ) -> Result<Verdict, AuditError> {
        let reader = AuditReader::open(db)?;
        let files: Vec<&Path> = checkpoint_file.into_iter().collect();
        self.verify_reader(&reader, &files)
    }

    /// Verifies a PostgreSQL-backed log, cross-checked against the checkpoint files of the
    /// writers that signed it (each gateway's `audit.checkpoints`; pass those you have). Every
    /// checkpoint in a file counts as signed evidence: rows deleted or rewritten in the database
    /// after it was signed are reported exactly as in a SQLite log.
    #[cfg(feature = "postgres")]
    pub fn verify_postgres(
        &self,
        config: &crate::pg::PgConfig,
        checkpoint_files: &[&Path],
    ) -> Result<Verdict, AuditError> {
        let reader = AuditReader::open_postgres(config)?;
        self.verify_reader(&reader, checkpoint_files)
    }

    /// Verifies the log `reader` reads. A SQLite log has one checkpoint file, which must hold
    /// every checkpoint of the database; a shared (PostgreSQL) log has one per writer, each
    /// holding that writer's checkpoints.
    pub fn verify_reader(
        &self,
        reader: &AuditReader,
        checkpoint_files: &[&Path],
    ) -> Result<Verdict, AuditError> {
        let db_cps = match reader.checkpoints() {
            Ok(c) => c,
            Err(e) => {
                return match corrupt(&e) {
                    Some(reason) => Ok(Err(Tamper { seq: 1, reason })),
                    None => Err(e),
                };
            }
        };
        let single_file = reader.is_sqlite() && checkpoint_files.len() == 1;
        let mut problems: Vec<Tamper> = Vec::new();
        let mut all: Vec<Checkpoint> = db_cps.clone();
        for path in checkpoint_files {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let file_cps = match parse_checkpoint_lines(&text) {
                        Ok(c) => c,
                        Err(line) => {
                            // Keep what parsed before the bad line.
                            let good: String =
                                text.lines().take(line - 1).collect::<Vec<_>>().join("\n");
                            let cps = parse_checkpoint_lines(&good).unwrap_or_default();
                            let seq = cps
                                .iter()
                                .map(|c| c.seq)
                                .max()
                                .unwrap_or(0)
                                .saturating_add(1);
                            problems.push(Tamper {
                                seq,
                                reason: TamperReason::CheckpointFile(format!(
                                    "line {line} of {} is not a checkpoint",
                                    path.display()
                                )),
                            });
                            cps
                        }
                    };
                    if single_file {
                        for c in &db_cps {
                            if !file_cps.contains(c) {
                                problems.push(Tamper {
                                    seq: c.seq,
                                    reason: TamperReason::CheckpointFile(format!(
                                        "checkpoint {} is in the database but not in {}",
                                        c.seq,
                                        path.display()
                                    )),
                                });
                            }
                        }
                    }
                    all.extend(file_cps);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && single_file => {
                    if let Some(first) = db_cps.iter().map(|c| c.seq).min() {
                        problems.push(Tamper {
                            seq: first,
                            reason: TamperReason::CheckpointFile(format!(
                                "{} is missing but the database has signed checkpoints",
                                path.display()
                            )),
                        });
                    }
                }
                Err(e) => {
                    return Err(AuditError::Io {
                        what: format!("read checkpoint file {}", path.display()),
                        source: e,
                    });
                }
            }
        }
        let (cps, cp_problem) = self.check_checkpoints(&all);
        problems.extend(cp_problem);
        let pass = self.run_pass(&DbSource(reader), &cps, Mode::Database, None, None)?;
        Ok(earliest(pass, problems, &cps))
    }

    /// Verifies a JSONL export file.
    pub fn verify_export(&self, path: &Path) -> Result<Verdict, AuditError> {
        let bytes = std::fs::read(path).map_err(|e| AuditError::Io {
            what: format!("read export {}", path.display()),
            source: e,
        })?;
        if bytes.starts_with(export::CSV_HEADER.as_bytes()) {
            return Err(AuditError::InvalidInput(format!(
                "{} is a csv export; csv is for reading only and cannot be verified. \
                 Verify the jsonl export instead (`chitin audit export --format jsonl`)",
                path.display()
            )));
        }
        Ok(self.verify_export_bytes(&bytes))
    }

    /// Verifies a JSONL export held in memory. Never panics; anything unreadable is a tamper.
    pub fn verify_export_bytes(&self, bytes: &[u8]) -> Verdict {
        let parsed = match export::parse_jsonl(bytes) {
            Ok(p) => p,
            Err((seq, msg)) => {
                return Err(Tamper {
                    seq,
                    reason: TamperReason::Malformed(msg),
                });
            }
        };
        self.verify_parts(&parsed.header, &parsed.records, &parsed.checkpoints)
    }

    /// Verifies records and checkpoints given in memory, as an export (segment) would be.
    pub fn verify_parts(
        &self,
        header: &ExportHeader,
        records: &[Record],
        checkpoints: &[Checkpoint],
    ) -> Verdict {
        let (cps, problem) = self.check_checkpoints(checkpoints);
        let cover = checkpoints.iter().map(|c| c.seq).max();
        let pass = match self.run_pass(&VecSource(records), &cps, Mode::Export, Some(header), cover)
        {
            Ok(p) => p,
            Err(e) => Err(Tamper {
                seq: header.first_seq,
                reason: TamperReason::Malformed(e.to_string()),
            }),
        };
        earliest(pass, problem.into_iter().collect(), &cps)
    }

    /// Verifies database-style rows (a whole log from seq 1) held in memory.
    pub fn verify_rows(&self, records: &[Record], checkpoints: &[Checkpoint]) -> Verdict {
        let (cps, problem) = self.check_checkpoints(checkpoints);
        let pass = match self.run_pass(&VecSource(records), &cps, Mode::Database, None, None) {
            Ok(p) => p,
            Err(e) => Err(Tamper {
                seq: 1,
                reason: TamperReason::Malformed(e.to_string()),
            }),
        };
        earliest(pass, problem.into_iter().collect(), &cps)
    }

    /// Checks every signature. Returns the heads of the valid checkpoints by seq, and the
    /// earliest problem.
    fn check_checkpoints(&self, all: &[Checkpoint]) -> (BTreeMap<i64, [u8; 32]>, Option<Tamper>) {
        let mut good: BTreeMap<i64, [u8; 32]> = BTreeMap::new();
        let mut problem: Option<Tamper> = None;
        let mut note = |t: Tamper| {
            if problem.as_ref().is_none_or(|p| t.seq < p.seq) {
                problem = Some(t);
            }
        };
        for c in all {
            match c.verify(&self.key) {
                Ok(()) => {
                    let Some(head) = c.head_bytes() else {
                        continue;
                    };
                    if let Some(existing) = good.get(&c.seq) {
                        if *existing != head {
                            note(Tamper {
                                seq: c.seq,
                                reason: TamperReason::CheckpointFile(format!(
                                    "two validly signed checkpoints at seq {} disagree",
                                    c.seq
                                )),
                            });
                        }
                    } else {
                        good.insert(c.seq, head);
                    }
                }
                Err(CheckpointProblem::WrongKey) => note(Tamper {
                    seq: c.seq.max(0),
                    reason: TamperReason::WrongKey {
                        checkpoint: c.seq,
                        signed_by: c.key_id.chars().take(16).collect(),
                        expected: self.key.id_hex(),
                    },
                }),
                Err(CheckpointProblem::BadSignature) => note(Tamper {
                    seq: c.seq.max(0),
                    reason: TamperReason::BadCheckpointSignature { checkpoint: c.seq },
                }),
            }
        }
        (good, problem)
    }

    fn run_pass(
        &self,
        src: &dyn Source,
        cps: &BTreeMap<i64, [u8; 32]>,
        mode: Mode,
        header: Option<&ExportHeader>,
        signed_cover: Option<i64>,
    ) -> Result<Result<PassOk, Tamper>, AuditError> {
        // The anchor: the last point known to be good (a matching checkpoint, or the start).
        let mut anchor_seq: i64 = 0;
        let mut anchor_hash = GENESIS_HASH;
        let mut anchor_pos: usize = 0;
        let mut anchor_hint: i64 = i64::MIN;

        let mut expected: Option<i64> = match mode {
            Mode::Database => Some(1),
            Mode::Export => header.map(|h| h.first_seq),
        };
        let mut prev = GENESIS_HASH;
        let mut prev_prev = GENESIS_HASH;
        let mut count: u64 = 0;
        let mut first: Option<i64> = None;
        let mut last: Option<i64> = None;
        let mut pending: BTreeMap<i64, (Option<i64>, Option<String>)> = BTreeMap::new();
        let mut failure: Option<Failure> = None;
        let mut early: Option<Tamper> = None;
        let mut started = false;

        let walked = src.each_from(0, i64::MIN, &mut |r: &Record| {
            let pos = usize::try_from(count).unwrap_or(usize::MAX);
            if !started {
                started = true;
                if mode == Mode::Export {
                    // A segment: anchored at its first record's predecessor.
                    let e = expected.unwrap_or(r.seq);
                    expected = Some(e);
                    if e > 1
                        && let Some(p) = as32(&r.prev_hash)
                    {
                        prev = p;
                        prev_prev = p;
                    }
                    anchor_seq = e.saturating_sub(1);
                    anchor_hash = prev;
                }
            }
            let e = expected.unwrap_or(1);
            if !record_ok(r, e, &prev) {
                failure = Some(Failure {
                    pos,
                    record: r.clone(),
                    expected: e,
                    prev,
                    prev_prev,
                });
                return false;
            }
            let hash = as32(&r.hash).unwrap_or(GENESIS_HASH);
            if let Some(head) = cps.get(&e) {
                if *head != hash {
                    early = Some(rewritten_at(
                        src,
                        anchor_seq,
                        anchor_hash,
                        anchor_pos,
                        anchor_hint,
                        e,
                        head,
                    ));
                    return false;
                }
                anchor_seq = e;
                anchor_hash = hash;
                anchor_pos = pos + 1;
                anchor_hint = e.saturating_add(1);
            }
            if r.payload.is_none() {
                pending.insert(e, (r.removed_at_ms, r.removed_reason.clone()));
            }
            if r.kind == "retention"
                && r.action == "payload_removed"
                && let Some(v) = r.payload_json()
                && let Some(target) = v.get("seq").and_then(serde_json::Value::as_i64)
                && let Some((at, why)) = pending.remove(&target)
            {
                let want_at = v.get("removed_at_ms").and_then(serde_json::Value::as_i64);
                let want_why = v.get("reason").and_then(serde_json::Value::as_str);
                let field = if at != want_at {
                    Some("removed_at_ms")
                } else if why.as_deref() != want_why {
                    Some("removed_reason")
                } else {
                    None
                };
                if let Some(field) = field {
                    early = Some(Tamper {
                        seq: target,
                        reason: TamperReason::ModifiedField(field.into()),
                    });
                    return false;
                }
            }
            first.get_or_insert(e);
            last = Some(e);
            prev_prev = prev;
            prev = hash;
            count += 1;
            expected = Some(e.saturating_add(1));
            true
        });
        if let Err(err) = walked {
            return match corrupt(&err) {
                Some(reason) => Ok(Err(Tamper {
                    seq: expected.unwrap_or(1),
                    reason,
                })),
                None => Err(err),
            };
        }

        if let Some(t) = early {
            return Ok(Err(t));
        }
        if let Some(f) = failure {
            return Ok(Err(diagnose(src, &f, cps)?));
        }
        let c_max = cps.keys().next_back().copied();
        if let Some(c) = c_max {
            let end = last.unwrap_or(expected.unwrap_or(1).saturating_sub(1));
            if c > end {
                let seq = end.saturating_add(1);
                return Ok(Err(Tamper {
                    seq,
                    reason: if count == 0 && mode == Mode::Database {
                        TamperReason::Emptied { checkpoint: c }
                    } else {
                        TamperReason::TailTruncated {
                            checkpoint: c,
                            last,
                        }
                    },
                }));
            }
        }
        if mode == Mode::Export {
            if let Some(h) = header
                && let Some(l) = last
                && h.last_seq > l
            {
                return Ok(Err(Tamper {
                    seq: l.saturating_add(1),
                    reason: TamperReason::TailTruncated {
                        checkpoint: h.last_seq,
                        last,
                    },
                }));
            }
            // Coverage counts every checkpoint present; one with a bad signature or another
            // key is reported as such, not as an uncovered tail.
            let cover = c_max.max(signed_cover);
            if let Some(l) = last
                && cover.is_none_or(|c| c < l)
            {
                let seq = c_max.map_or(first.unwrap_or(1), |c| {
                    c.saturating_add(1).max(first.unwrap_or(1))
                });
                return Ok(Err(Tamper {
                    seq,
                    reason: TamperReason::Inserted(format!(
                        "record {seq} is not covered by a valid checkpoint in the export"
                    )),
                }));
            }
        }
        if mode == Mode::Database
            && let Some((&seq, _)) = pending.iter().next()
        {
            return Ok(Err(Tamper {
                seq,
                reason: TamperReason::UndocumentedRemoval,
            }));
        }
        Ok(Ok(PassOk {
            count,
            first,
            last,
            head: prev,
        }))
    }
}

/// The report, or the earliest of the pass failure and the checkpoint problems (a checkpoint
/// problem wins a tie).
fn earliest(
    pass: Result<PassOk, Tamper>,
    problems: Vec<Tamper>,
    cps: &BTreeMap<i64, [u8; 32]>,
) -> Verdict {
    let worst = problems.into_iter().min_by_key(|t| t.seq);
    match (pass, worst) {
        (Err(t), Some(w)) => Err(if w.seq <= t.seq { w } else { t }),
        (Err(t), None) => Err(t),
        (Ok(_), Some(w)) => Err(w),
        (Ok(p), None) => {
            let last_cp = p
                .last
                .and_then(|l| cps.range(..=l).next_back().map(|(s, _)| *s));
            let uncovered = match (p.last, last_cp) {
                (Some(l), Some(c)) => u64::try_from(l.saturating_sub(c)).unwrap_or(0),
                (Some(_), None) => p.count,
                _ => 0,
            };
            Ok(VerifyReport {
                records: p.count,
                first_seq: p.first,
                last_seq: p.last,
                head: p.head,
                last_checkpoint: last_cp.or_else(|| cps.keys().next_back().copied()),
                uncovered,
            })
        }
    }
}

/// Checks that the records with `seq > anchor_seq` extend the chain from `anchor_hash` (the
/// writer runs this before it signs a new checkpoint, so it never signs a tampered tail).
pub(crate) fn check_tail(
    reader: &AuditReader,
    anchor_seq: i64,
    anchor_hash: [u8; 32],
) -> Result<Result<i64, Tamper>, AuditError> {
    let mut e = anchor_seq.saturating_add(1);
    let mut prev = anchor_hash;
    let mut prev_prev = anchor_hash;
    let mut window: Vec<Record> = Vec::new();
    let mut failed: Option<(i64, [u8; 32], [u8; 32])> = None;
    reader.for_each_from(e, |r| {
        if failed.is_some() {
            window.push(r);
            return false;
        }
        if record_ok(&r, e, &prev) {
            prev_prev = prev;
            prev = as32(&r.hash).unwrap_or(GENESIS_HASH);
            e = e.saturating_add(1);
            true
        } else {
            failed = Some((e, prev, prev_prev));
            window.push(r);
            true
        }
    })?;
    let Some((expected, prev, prev_prev)) = failed else {
        return Ok(Ok(e.saturating_sub(1)));
    };
    let Some(record) = window.first().cloned() else {
        return Ok(Ok(e.saturating_sub(1)));
    };
    let f = Failure {
        pos: 0,
        record,
        expected,
        prev,
        prev_prev,
    };
    Ok(Err(diagnose(&VecSource(&window), &f, &BTreeMap::new())?))
}

/// A database error that means the file itself was altered (not an I/O problem).
fn corrupt(e: &AuditError) -> Option<TamperReason> {
    match e {
        AuditError::Database { message, .. }
            if message.contains("malformed")
                || message.contains("not a database")
                || message.contains("corrupt") =>
        {
            Some(TamperReason::Corrupt(message.clone()))
        }
        _ => None,
    }
}

/// Names what is wrong with the record that failed the fast check.
fn diagnose(
    src: &dyn Source,
    f: &Failure,
    cps: &BTreeMap<i64, [u8; 32]>,
) -> Result<Tamper, AuditError> {
    let r = &f.record;
    let e = f.expected;
    let p = f.prev;
    let own = r.compute_hash();
    let self_ok = r.hash.len() == 32 && own[..] == r.hash[..];
    let at = |reason: TamperReason| Tamper { seq: e, reason };
    let field = |name: &str| at(TamperReason::ModifiedField(name.into()));

    if r.seq != e {
        if r.compute_hash_with(e, &p)[..] == r.hash[..] {
            return Ok(field("seq"));
        }
        if r.hash[..] == p[..] {
            return Ok(at(TamperReason::Reordered(format!(
                "record {} appears again after record {}",
                r.seq,
                e.saturating_sub(1)
            ))));
        }
        if r.seq == e.saturating_sub(1) && self_ok && r.prev_hash[..] == f.prev_prev[..] {
            return Ok(Tamper {
                seq: r.seq,
                reason: TamperReason::Inserted(format!(
                    "two records claim seq {}; one was forged",
                    r.seq
                )),
            });
        }
        // Is the real record `e` somewhere later?
        let mut found: Option<i64> = None;
        src.each_from(f.pos + 1, r.seq.saturating_add(1), &mut |x: &Record| {
            if x.hash.len() == 32 && x.compute_hash_with(e, &p)[..] == x.hash[..] {
                found = Some(x.seq);
                return false;
            }
            true
        })?;
        return Ok(match found {
            Some(s) if s == e => at(TamperReason::Reordered(format!(
                "record {e} appears after record {}",
                r.seq
            ))),
            Some(_) => field("seq"),
            None if r.seq < e => at(TamperReason::Reordered(format!(
                "record {} appears again after record {}",
                r.seq,
                e.saturating_sub(1)
            ))),
            None => at(TamperReason::MissingRecord),
        });
    }

    for (name, len) in [
        ("payload_digest", r.payload_digest.len()),
        ("prev_hash", r.prev_hash.len()),
        ("hash", r.hash.len()),
    ] {
        if len != 32 {
            return Ok(field(name));
        }
    }
    if let Some(text) = &r.payload {
        if r.removed_at_ms.is_some() {
            return Ok(field("removed_at_ms"));
        }
        if r.removed_reason.is_some() {
            return Ok(field("removed_reason"));
        }
        let real = sha256(text.as_bytes());
        if real[..] != r.payload_digest[..] {
            if self_ok {
                return Ok(field("payload"));
            }
            let mut fixed = r.clone();
            fixed.payload_digest = real.to_vec();
            if fixed.compute_hash()[..] == r.hash[..] {
                return Ok(field("payload_digest"));
            }
            return Ok(field("payload"));
        }
    } else if r.removed_at_ms.is_none() {
        return Ok(field("removed_at_ms"));
    } else if r.removed_reason.is_none() {
        return Ok(field("removed_reason"));
    }
    if let Some(name) = first_mismatched_field(r) {
        return Ok(field(if self_ok { "field_check" } else { name }));
    }
    if r.prev_hash[..] != p[..] {
        if r.compute_hash_with(e, &p)[..] == r.hash[..] {
            return Ok(field("prev_hash"));
        }
        // Is it another record's content? Its predecessor (by prev_hash) says which.
        let mut candidates = vec![e.saturating_add(1), e.saturating_sub(1)];
        if r.prev_hash[..] == GENESIS_HASH[..] {
            candidates.push(1);
        } else {
            src.each_from(0, i64::MIN, &mut |x: &Record| {
                if x.hash[..] == r.prev_hash[..] {
                    candidates.push(x.seq.saturating_add(1));
                    return false;
                }
                true
            })?;
        }
        for s in candidates {
            if s != e && r.compute_hash_with(s, &r.prev_hash)[..] == r.hash[..] {
                return Ok(at(TamperReason::Reordered(format!(
                    "the record stored at seq {e} is record {s}"
                ))));
            }
        }
        if self_ok {
            return Ok(at(TamperReason::Inserted(format!(
                "record {e} has a valid hash but does not chain to record {}",
                e.saturating_sub(1)
            ))));
        }
        return Ok(field("prev_hash"));
    }
    // Same seq, same prev, fields match their checks, but the hash differs: either the stored
    // hash was edited, or a field was edited together with its field check.
    let mut next_prev: Option<Vec<u8>> = None;
    src.each_from(f.pos + 1, e.saturating_add(1), &mut |x: &Record| {
        next_prev = Some(x.prev_hash.clone());
        false
    })?;
    if next_prev.as_deref() == Some(&own[..]) || cps.get(&e) == Some(&own) {
        return Ok(field("hash"));
    }
    Ok(field(
        "hash (or a header field rewritten together with its field_check)",
    ))
}

/// The chain reached checkpoint `c` with a head other than the signed one: the records after
/// the anchor (the last good checkpoint) were rewritten. If removing exactly one record makes
/// the chain match, that record was inserted.
fn rewritten_at(
    src: &dyn Source,
    anchor_seq: i64,
    anchor_hash: [u8; 32],
    anchor_pos: usize,
    anchor_hint: i64,
    c: i64,
    signed: &[u8; 32],
) -> Tamper {
    let n = c.saturating_sub(anchor_seq);
    if n <= MAX_INSERTION_SEARCH {
        let mut recs: Vec<Record> = Vec::new();
        let want = usize::try_from(n.saturating_add(1)).unwrap_or(0);
        let _ = src.each_from(anchor_pos, anchor_hint, &mut |x: &Record| {
            recs.push(x.clone());
            recs.len() < want
        });
        if recs.len() == want {
            for skip in 0..recs.len() {
                let mut prev = anchor_hash;
                let mut seq = anchor_seq;
                for (i, rec) in recs.iter().enumerate() {
                    if i == skip {
                        continue;
                    }
                    seq = seq.saturating_add(1);
                    prev = rec.compute_hash_with(seq, &prev);
                    if seq == c {
                        break;
                    }
                }
                if seq == c && prev == *signed {
                    let bad = anchor_seq
                        .saturating_add(1)
                        .saturating_add(i64::try_from(skip).unwrap_or(0));
                    return Tamper {
                        seq: bad,
                        reason: TamperReason::Inserted(format!(
                            "record {bad} is not covered by a valid checkpoint: without it the chain matches signed checkpoint {c}"
                        )),
                    };
                }
            }
        }
    }
    Tamper {
        seq: anchor_seq.saturating_add(1),
        reason: TamperReason::Rewritten(format!(
            "records {}..{c} do not match signed checkpoint {c}",
            anchor_seq.saturating_add(1)
        )),
    }
}
