//! GDPR export (Art. 15/20) of one subject: one tar archive with everything held about them,
//! decrypted, plus what an outsider needs to check the audit records in it. Secrets are never
//! included: the secret store, the vault and keys are not read for export, only the subject's
//! own content is opened with their data key.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::store::params;
use chitin_audit::{Checkpoint, PublicKey, Record, RecordInput};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Lifecycle, LifecycleError, concerns, io_err};
use crate::vault::{Subject, VaultError};

/// The top directory inside the archive.
pub const ROOT: &str = "chitin-export";

/// How many items of each kind the export holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExportCounts {
    pub sessions: u64,
    pub messages: u64,
    pub runs: u64,
    pub usage: u64,
    pub approvals: u64,
    pub audit_records: u64,
    /// Items whose content could not be opened (their key was destroyed).
    pub unreadable: u64,
}

const README: &str = "# Personal data export (Chitin)

This archive holds everything this Chitin installation stores about one data subject (see
subject.json), as of `exported_at`. Times are milliseconds since 1970-01-01 UTC. Each `.jsonl`
file holds one JSON object per line.

| file | what |
|---|---|
| README.md | this description |
| subject.json | the subject (a Cedar entity reference), the export time and the number of items in each file |
| sessions.jsonl | conversations: key, channel, created/updated times, whether the session saw untrusted content (`tainted`), and the decrypted running summary |
| messages.jsonl | every stored message of the subject's conversations, decrypted: the subject's own messages (`role` user), the agent's replies (`assistant`) and tool results (`tool`); `class` is transcript, tool_output or attachment |
| runs.jsonl | each agent run: status, times, model, token counts, cost, error |
| usage.jsonl | model usage records (tokens, cost) attributed to the subject |
| approvals.jsonl | approval requests the subject made (`role: requester`, with the summary of the action) and approvals the subject granted or denied for someone else (`role: approver`; the other person's details are left out) |
| holds.json | a legal hold on the subject's data, if there is one |
| audit/records.jsonl | the audit records that concern the subject (the subject is the actor or the resource, or is named as requester/user in the payload), exactly as stored, with their hashes |
| audit/chain.jsonl | `{seq, prev_hash, hash}` of every record from the first record above up to the signed checkpoint that covers the last one (other people's records appear only as hashes) |
| audit/checkpoints.jsonl | the signed checkpoints (Ed25519) covering that range |
| audit/audit.pub | the public key that verifies the checkpoints (compare it with one obtained from the operator independently) |

## Checking the audit records

For each line of audit/records.jsonl: SHA-256 of `payload` equals `payload_digest` (unless the
payload was removed: `removed_at_ms`/`removed_reason` say when and why); the record hash
recomputed from its fields (`chitin-audit-record-v1` encoding, see Chitin's ARCHITECTURE.md)
equals `hash`; in audit/chain.jsonl every `prev_hash` equals the previous line's `hash`; and the
`head` of a checkpoint whose signature verifies with audit/audit.pub equals the chain's `hash` at
the checkpoint's `seq`. Records between the subject's records belong to other people and are
represented by their hashes only, so the links between them are stated, not recomputed: full
verification of the whole log is done by the operator (`chitin audit verify`) or an auditor.

Secrets (API keys, tokens, passwords) are never part of an export.
";

fn opened(lc: &Lifecycle, subject: &str, blob: &[u8], counts: &mut ExportCounts) -> Value {
    match lc.vault.open(subject, blob) {
        Ok(plain) => match serde_json::from_slice::<Value>(&plain) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(&plain).into_owned()),
        },
        Err(VaultError::Erased { .. }) => {
            counts.unreadable += 1;
            json!({"unreadable": "erased"})
        }
        Err(e) => {
            counts.unreadable += 1;
            json!({"unreadable": e.to_string()})
        }
    }
}

fn jsonl(rows: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        out.extend_from_slice(r.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn n(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Builds the archive's files (name → bytes) for `subject`.
pub fn collect(
    lc: &Lifecycle,
    subject: &Subject,
) -> Result<(BTreeMap<String, Vec<u8>>, ExportCounts), LifecycleError> {
    let s = subject.to_string();
    let user = subject.user_id().unwrap_or("");
    let is_user = subject.user_id().is_some();
    let mut counts = ExportCounts::default();
    let mut files = BTreeMap::new();
    let (sessions, messages, runs, usage, approvals, holds) = lc.store.db().with(|conn| {
        let mut sessions = Vec::new();
        for r in conn.query_all(
            "SELECT key, user_id, channel, created_ms, updated_ms, tainted, summary, summary_seq
             FROM sessions WHERE subject = ?1 ORDER BY created_ms, key",
            params![s],
        )? {
            let summary: Option<Vec<u8>> = r.get(6)?;
            sessions.push(json!({
                "key": r.get::<String>(0)?,
                "user_id": r.get::<String>(1)?,
                "channel": r.get::<String>(2)?,
                "created_ms": r.get::<i64>(3)?,
                "updated_ms": r.get::<i64>(4)?,
                "tainted": r.get::<i64>(5)? != 0,
                "summary": summary.map(|b| opened(lc, &s, &b, &mut counts)),
                "summary_seq": r.get::<i64>(7)?,
            }));
        }
        let mut messages = Vec::new();
        for r in conn.query_all(
            "SELECT id, session_key, run_id, seq, role, class, created_ms, size, body
             FROM messages WHERE subject = ?1 ORDER BY session_key, seq",
            params![s],
        )? {
            let body: Vec<u8> = r.get(8)?;
            messages.push(json!({
                "id": r.get::<i64>(0)?,
                "session_key": r.get::<String>(1)?,
                "run_id": r.get::<Option<String>>(2)?,
                "seq": r.get::<i64>(3)?,
                "role": r.get::<String>(4)?,
                "class": r.get::<String>(5)?,
                "created_ms": r.get::<i64>(6)?,
                "size": r.get::<i64>(7)?,
                "body": opened(lc, &s, &body, &mut counts),
            }));
        }
        let mut runs = Vec::new();
        for r in conn.query_all(
            "SELECT id, session_key, user_id, status, created_ms, updated_ms, finished_ms, steps,
                    model, input_tokens, output_tokens, cost_usd, approval_id, error
             FROM runs WHERE subject = ?1 ORDER BY created_ms, id",
            params![s],
        )? {
            runs.push(json!({
                "id": r.get::<String>(0)?,
                "session_key": r.get::<String>(1)?,
                "user_id": r.get::<String>(2)?,
                "status": r.get::<String>(3)?,
                "created_ms": r.get::<i64>(4)?,
                "updated_ms": r.get::<i64>(5)?,
                "finished_ms": r.get::<Option<i64>>(6)?,
                "steps": r.get::<i64>(7)?,
                "model": r.get::<Option<String>>(8)?,
                "input_tokens": r.get::<i64>(9)?,
                "output_tokens": r.get::<i64>(10)?,
                "cost_usd": r.get::<f64>(11)?,
                "approval_id": r.get::<Option<String>>(12)?,
                "error": r.get::<Option<String>>(13)?,
            }));
        }
        let mut usage = Vec::new();
        for r in conn.query_all(
            "SELECT id, at_ms, user_id, session_key, run_id, model, tool, input_tokens,
                    output_tokens, cost_usd
             FROM usage WHERE subject = ?1 ORDER BY at_ms, id",
            params![s],
        )? {
            usage.push(json!({
                "id": r.get::<i64>(0)?,
                "at_ms": r.get::<i64>(1)?,
                "user_id": r.get::<String>(2)?,
                "session_key": r.get::<String>(3)?,
                "run_id": r.get::<String>(4)?,
                "model": r.get::<String>(5)?,
                "tool": r.get::<Option<String>>(6)?,
                "input_tokens": r.get::<i64>(7)?,
                "output_tokens": r.get::<i64>(8)?,
                "cost_usd": r.get::<Option<f64>>(9)?,
            }));
        }
        let mut approvals = Vec::new();
        for r in conn.query_all(
            "SELECT id, requester, session, tool, summary, args_json, status, created_ms,
                    expires_ms, resolved_by, resolved_ms, used_ms
             FROM approvals WHERE ?2 AND (requester = ?1 OR resolved_by = ?1)
             ORDER BY created_ms, id",
            params![user, is_user],
        )? {
            let requester: String = r.get(1)?;
            let resolved_by: Option<String> = r.get(9)?;
            if requester == user {
                let args: String = r.get(5)?;
                approvals.push(json!({
                    "role": "requester",
                    "id": r.get::<String>(0)?,
                    "session": r.get::<String>(2)?,
                    "tool": r.get::<String>(3)?,
                    "summary": r.get::<String>(4)?,
                    "args": serde_json::from_str::<Value>(&args).unwrap_or(Value::String(args)),
                    "status": r.get::<String>(6)?,
                    "created_ms": r.get::<i64>(7)?,
                    "expires_ms": r.get::<i64>(8)?,
                    "resolved_by_you": resolved_by.as_deref() == Some(user),
                    "resolved_ms": r.get::<Option<i64>>(10)?,
                    "used_ms": r.get::<Option<i64>>(11)?,
                }));
            } else {
                approvals.push(json!({
                    "role": "approver",
                    "id": r.get::<String>(0)?,
                    "tool": r.get::<String>(3)?,
                    "status": r.get::<String>(6)?,
                    "resolved_ms": r.get::<Option<i64>>(10)?,
                }));
            }
        }
        let holds: Option<Value> = super::retention::hold_of_conn(conn, &s)?
            .map(|h| json!({"reason": h.reason, "created_ms": h.created_ms}));
        Ok::<_, LifecycleError>((sessions, messages, runs, usage, approvals, holds))
    })?;
    counts.sessions = n(sessions.len());
    counts.messages = n(messages.len());
    counts.runs = n(runs.len());
    counts.usage = n(usage.len());
    counts.approvals = n(approvals.len());
    files.insert("sessions.jsonl".into(), jsonl(&sessions));
    files.insert("messages.jsonl".into(), jsonl(&messages));
    files.insert("runs.jsonl".into(), jsonl(&runs));
    files.insert("usage.jsonl".into(), jsonl(&usage));
    files.insert("approvals.jsonl".into(), jsonl(&approvals));
    if let Some(h) = holds {
        files.insert("holds.json".into(), h.to_string().into_bytes());
    }

    // Audit: the subject's records, the chain links up to a covering checkpoint, the key.
    lc.audit.checkpoint_now()?;
    let reader = lc.audit.reader()?;
    let mut records: Vec<Record> = Vec::new();
    reader.for_each_from(1, |r| {
        if concerns(&r, subject) {
            records.push(r);
        }
        true
    })?;
    let checkpoints: Vec<Checkpoint> = reader.checkpoints()?;
    let mut chain = Vec::new();
    let mut cps = Vec::new();
    if let (Some(first), Some(last)) = (records.first(), records.last()) {
        let cover = checkpoints
            .iter()
            .filter(|c| c.seq >= last.seq)
            .map(|c| c.seq)
            .min()
            .unwrap_or(last.seq);
        reader.for_each_from(first.seq, |r| {
            if r.seq > cover {
                return false;
            }
            chain.push(json!({
                "seq": r.seq,
                "prev_hash": chitin_audit::to_hex(&r.prev_hash),
                "hash": chitin_audit::to_hex(&r.hash),
            }));
            true
        })?;
        cps = checkpoints
            .iter()
            .filter(|c| c.seq >= first.seq && c.seq <= cover)
            .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
            .collect();
    }
    counts.audit_records = n(records.len());
    let recs: Vec<Value> = records
        .iter()
        .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
        .collect();
    files.insert("audit/records.jsonl".into(), jsonl(&recs));
    files.insert("audit/chain.jsonl".into(), jsonl(&chain));
    files.insert("audit/checkpoints.jsonl".into(), jsonl(&cps));
    files.insert(
        "audit/audit.pub".into(),
        format!("{}\n", lc.audit.public_key().to_text()).into_bytes(),
    );
    files.insert(
        "subject.json".into(),
        json!({
            "subject": s,
            "exported_at_ms": lc.clock.now_ms(),
            "exported_at": crate::clock::rfc3339(lc.clock.now_ms()),
            "counts": counts,
        })
        .to_string()
        .into_bytes(),
    );
    files.insert("README.md".into(), README.as_bytes().to_vec());
    Ok((files, counts))
}

/// Writes `files` as an uncompressed tar under [`ROOT`]/.
pub fn to_tar(files: &BTreeMap<String, Vec<u8>>, mtime_s: u64) -> Result<Vec<u8>, std::io::Error> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        h.set_mode(0o600);
        h.set_mtime(mtime_s);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, format!("{ROOT}/{name}"), &bytes[..])?;
    }
    b.into_inner()
}

/// Exports `subject` to a new file `out` (0600; an existing file is refused). The caller has
/// asked Cedar (`data.export`). Audited before the file is written.
pub fn export(
    lc: &Lifecycle,
    subject: &Subject,
    out: &Path,
    actor: &str,
) -> Result<ExportCounts, LifecycleError> {
    let (files, counts) = collect(lc, subject)?;
    let bytes = to_tar(&files, u64::try_from(lc.clock.now_ms() / 1000).unwrap_or(0))
        .map_err(io_err(out, "build"))?;
    // The file first (an existing one is refused before anything is recorded), then the
    // record, then the content: no record, no personal data written.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(io_err(out, "create"))?;
    let recorded = lc.audit.append(
        RecordInput::admin(
            actor,
            "data.export",
            subject.to_string(),
            json!({ "counts": counts }),
        )
        .with_outcome("ok"),
    );
    let written = recorded.map_err(LifecycleError::from).and_then(|_| {
        f.write_all(&bytes).map_err(io_err(out, "write"))?;
        f.sync_all().map_err(io_err(out, "fsync"))
    });
    if let Err(e) = written {
        drop(f);
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(counts)
}

/// Reads an export archive back into name → bytes (names without the [`ROOT`]/ prefix).
pub fn read_tar(bytes: &[u8]) -> Result<BTreeMap<String, Vec<u8>>, std::io::Error> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(bytes);
    for e in a.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data)?;
        let name = name
            .strip_prefix(&format!("{ROOT}/"))
            .map(str::to_owned)
            .unwrap_or(name);
        out.insert(name, data);
    }
    Ok(out)
}

/// Checks the audit part of an export the way its README describes. `Ok(n)`: `n` records
/// checked; `Err(reason)` names the first problem.
pub fn verify_audit_part(files: &BTreeMap<String, Vec<u8>>) -> Result<usize, String> {
    let get = |name: &str| {
        files
            .get(name)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or(format!("{name} is missing"))
    };
    let key = PublicKey::parse(get("audit/audit.pub")?.trim()).map_err(|e| e.to_string())?;
    let records: Vec<Record> = get("audit/records.jsonl")?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("audit/records.jsonl: {e}"))?;
    #[derive(serde::Deserialize)]
    struct Link {
        seq: i64,
        prev_hash: String,
        hash: String,
    }
    let chain: Vec<Link> = get("audit/chain.jsonl")?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("audit/chain.jsonl: {e}"))?;
    let cps: Vec<Checkpoint> = get("audit/checkpoints.jsonl")?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("audit/checkpoints.jsonl: {e}"))?;
    for w in chain.windows(2) {
        if let [a, b] = w
            && (b.seq != a.seq + 1 || b.prev_hash != a.hash)
        {
            return Err(format!("chain broken at seq {}", b.seq));
        }
    }
    for r in &records {
        if let Some(p) = &r.payload
            && chitin_audit::sha256(p.as_bytes()).as_slice() != r.payload_digest.as_slice()
        {
            return Err(format!(
                "record {}: payload does not match its digest",
                r.seq
            ));
        }
        if r.compute_hash().as_slice() != r.hash.as_slice() {
            return Err(format!("record {}: hash does not match its fields", r.seq));
        }
        let link = chain
            .iter()
            .find(|l| l.seq == r.seq)
            .ok_or(format!("record {} is not in the chain", r.seq))?;
        if link.hash != chitin_audit::to_hex(&r.hash)
            || link.prev_hash != chitin_audit::to_hex(&r.prev_hash)
        {
            return Err(format!("record {}: differs from the chain", r.seq));
        }
    }
    if let Some(last) = chain.last() {
        let ok = cps
            .iter()
            .any(|c| c.seq == last.seq && c.head == last.hash && c.verify(&key).is_ok());
        if !ok {
            return Err(format!(
                "no checkpoint signed by audit/audit.pub covers seq {}",
                last.seq
            ));
        }
    }
    Ok(records.len())
}
