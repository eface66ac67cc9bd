//! Exports.
//!
//! - **jsonl** (verifiable): a header line, the records of a contiguous seq range, then the
//!   signed checkpoints inside that range. The range is extended forward to the first
//!   checkpoint at or after the last selected record, so every exported record is covered by a
//!   signature and the export verifies offline with only the public key.
//! - **csv** (for reading only): one row per record; it cannot be verified (it drops the
//!   checkpoints and the field checks).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::AuditError;
use crate::checkpoint::{Checkpoint, parse_checkpoint_lines};
use crate::record::{Record, to_hex};
use crate::store::AuditReader;

/// The `format` value of an export header.
pub const FORMAT: &str = "chitin-audit-export";

/// The first line of a CSV export.
pub const CSV_HEADER: &str = "seq,time,kind,actor,action,resource,decision,policies,outcome,\
payload_digest,payload,removed_at,removed_reason,prev_hash,hash";

/// The first line of a JSONL export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportHeader {
    pub format: String,
    pub version: u32,
    /// First exported seq (0 for an empty export).
    pub first_seq: i64,
    /// Last exported seq (the covering checkpoint).
    pub last_seq: i64,
    /// The id of the key that signed the checkpoints.
    pub key_id: String,
    pub exported_at_ms: i64,
}

/// A parsed JSONL export.
#[derive(Debug, Clone)]
pub struct ParsedExport {
    pub header: ExportHeader,
    pub records: Vec<Record>,
    pub checkpoints: Vec<Checkpoint>,
}

/// Export output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// What was exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub records: u64,
    pub first_seq: Option<i64>,
    pub last_seq: Option<i64>,
    pub checkpoints: u64,
}

/// All checkpoints known for a database: its table plus the checkpoint file, deduplicated,
/// ordered by seq.
pub fn known_checkpoints(
    reader: &AuditReader,
    checkpoint_file: Option<&Path>,
) -> Result<Vec<Checkpoint>, AuditError> {
    let mut all = reader.checkpoints()?;
    if let Some(path) = checkpoint_file
        && let Ok(text) = std::fs::read_to_string(path)
    {
        let parsed = parse_checkpoint_lines(&text).map_err(|line| {
            AuditError::InvalidInput(format!(
                "line {line} of {} is not a checkpoint; run `chitin audit verify`",
                path.display()
            ))
        })?;
        all.extend(parsed);
    }
    let mut by_key: BTreeMap<(i64, String), Checkpoint> = BTreeMap::new();
    for c in all {
        by_key.insert((c.seq, c.sig.clone()), c);
    }
    Ok(by_key.into_values().collect())
}

/// Writes an export of the records with `since_ms <= ts <= until_ms` (see the module docs for
/// how the range is chosen).
pub fn write_export(
    reader: &AuditReader,
    checkpoint_file: Option<&Path>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    format: Format,
    now_ms: i64,
    out: &mut dyn Write,
) -> Result<ExportSummary, AuditError> {
    let io = |e: std::io::Error| AuditError::Io {
        what: "write the export".into(),
        source: e,
    };
    let cps = known_checkpoints(reader, checkpoint_file)?;
    let bounds = reader.seq_bounds(since_ms, until_ms)?;
    let range = match (format, bounds) {
        (_, None) => None,
        (Format::Csv, Some(b)) => Some(b),
        (Format::Jsonl, Some((first, last))) => {
            let cover = cps.iter().map(|c| c.seq).filter(|s| *s >= last).min();
            match cover {
                Some(c) => Some((first, c)),
                None => {
                    return Err(AuditError::InvalidInput(format!(
                        "record {last} is not covered by a checkpoint yet, so the export could not be \
                         verified; run `chitin audit checkpoint` first"
                    )));
                }
            }
        }
    };
    let key_id = cps.first().map(|c| c.key_id.clone()).unwrap_or_default();
    let mut summary = ExportSummary {
        records: 0,
        first_seq: range.map(|r| r.0),
        last_seq: range.map(|r| r.1),
        checkpoints: 0,
    };
    match format {
        Format::Jsonl => {
            let header = ExportHeader {
                format: FORMAT.into(),
                version: 1,
                first_seq: range.map_or(0, |r| r.0),
                last_seq: range.map_or(0, |r| r.1),
                key_id,
                exported_at_ms: now_ms,
            };
            let mut line =
                serde_json::to_value(&header).map_err(|e| AuditError::Internal(e.to_string()))?;
            if let Some(o) = line.as_object_mut() {
                o.insert("type".into(), FORMAT.into());
            }
            writeln!(out, "{line}").map_err(io)?;
            if let Some((first, last)) = range {
                let mut err = None;
                reader.for_each_from(first, |r| {
                    if r.seq > last {
                        return false;
                    }
                    match typed_line("record", &r).and_then(|l| writeln!(out, "{l}").map_err(io)) {
                        Ok(()) => {
                            summary.records += 1;
                            true
                        }
                        Err(e) => {
                            err = Some(e);
                            false
                        }
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
                for c in cps.iter().filter(|c| c.seq >= first && c.seq <= last) {
                    writeln!(out, "{}", typed_line("checkpoint", c)?).map_err(io)?;
                    summary.checkpoints += 1;
                }
            }
        }
        Format::Csv => {
            writeln!(out, "{CSV_HEADER}").map_err(io)?;
            if let Some((first, last)) = range {
                let mut err = None;
                reader.for_each_from(first, |r| {
                    if r.seq > last {
                        return false;
                    }
                    match writeln!(out, "{}", csv_row(&r)) {
                        Ok(()) => {
                            summary.records += 1;
                            true
                        }
                        Err(e) => {
                            err = Some(io(e));
                            false
                        }
                    }
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
            }
        }
    }
    out.flush().map_err(io)?;
    Ok(summary)
}

fn typed_line<T: Serialize>(kind: &str, v: &T) -> Result<String, AuditError> {
    let mut value = serde_json::to_value(v).map_err(|e| AuditError::Internal(e.to_string()))?;
    if let Some(o) = value.as_object_mut() {
        o.insert("type".into(), kind.into());
    }
    Ok(value.to_string())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_row(r: &Record) -> String {
    let fields = [
        r.seq.to_string(),
        rfc3339_ms(r.ts_ms),
        r.kind.clone(),
        r.actor.clone(),
        r.action.clone(),
        r.resource.clone(),
        r.decision.clone(),
        r.policy_ids().join(" "),
        r.outcome.clone(),
        to_hex(&r.payload_digest),
        r.payload.clone().unwrap_or_default(),
        r.removed_at_ms.map(rfc3339_ms).unwrap_or_default(),
        r.removed_reason.clone().unwrap_or_default(),
        to_hex(&r.prev_hash),
        to_hex(&r.hash),
    ];
    fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a JSONL export. On failure returns the seq of the first record that could not be
/// read (the one after the last good record line) and a message.
pub fn parse_jsonl(bytes: &[u8]) -> Result<ParsedExport, (i64, String)> {
    let mut header: Option<ExportHeader> = None;
    let mut records: Vec<Record> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let next_seq = records
            .last()
            .map(|r| r.seq.saturating_add(1))
            .or(header.as_ref().map(|h| h.first_seq))
            .unwrap_or(1);
        let bad = |what: &str| (next_seq, format!("line {n} {what}"));
        // Fast path: most lines are records; deserialize them directly.
        if header.is_some()
            && let Ok(line) = serde_json::from_slice::<RecordLine>(raw)
            && line.kind == "record"
        {
            records.push(line.into_record());
            continue;
        }
        let mut value: serde_json::Value =
            serde_json::from_slice(raw).map_err(|_| bad("is not JSON"))?;
        let kind = value
            .as_object_mut()
            .and_then(|o| o.remove("type"))
            .and_then(|t| t.as_str().map(str::to_string))
            .ok_or_else(|| bad("has no \"type\""))?;
        match (header.is_some(), kind.as_str()) {
            (false, FORMAT) => {
                header = Some(
                    serde_json::from_value(value)
                        .map_err(|_| bad("is not a valid export header"))?,
                );
            }
            (false, _) => {
                return Err((
                    1,
                    "not a chitin audit export: the first line must be the jsonl export header \
                     (csv exports cannot be verified)"
                        .into(),
                ));
            }
            (true, "record") => records
                .push(serde_json::from_value(value).map_err(|_| bad("is not a valid record"))?),
            (true, "checkpoint") => checkpoints
                .push(serde_json::from_value(value).map_err(|_| bad("is not a valid checkpoint"))?),
            (true, _) => return Err(bad("has an unknown type")),
        }
    }
    let header = header.ok_or((1, "empty file: not a chitin audit export".to_string()))?;
    if header.format != FORMAT || header.version != 1 {
        return Err((
            header.first_seq,
            format!(
                "unsupported export format {} v{}",
                header.format, header.version
            ),
        ));
    }
    Ok(ParsedExport {
        header,
        records,
        checkpoints,
    })
}

/// A record line read in one pass (same fields as [`Record`] plus `type`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    #[serde(rename = "type")]
    kind: String,
    seq: i64,
    ts_ms: i64,
    #[serde(rename = "kind")]
    record_kind: String,
    actor: String,
    action: String,
    resource: String,
    decision: String,
    policies: String,
    outcome: String,
    #[serde(with = "crate::record::hex_bytes")]
    payload_digest: Vec<u8>,
    payload: Option<String>,
    removed_at_ms: Option<i64>,
    removed_reason: Option<String>,
    #[serde(with = "crate::record::hex_bytes")]
    field_check: Vec<u8>,
    #[serde(with = "crate::record::hex_bytes")]
    prev_hash: Vec<u8>,
    #[serde(with = "crate::record::hex_bytes")]
    hash: Vec<u8>,
}

impl RecordLine {
    fn into_record(self) -> Record {
        Record {
            seq: self.seq,
            ts_ms: self.ts_ms,
            kind: self.record_kind,
            actor: self.actor,
            action: self.action,
            resource: self.resource,
            decision: self.decision,
            policies: self.policies,
            outcome: self.outcome,
            payload_digest: self.payload_digest,
            payload: self.payload,
            removed_at_ms: self.removed_at_ms,
            removed_reason: self.removed_reason,
            field_check: self.field_check,
            prev_hash: self.prev_hash,
            hash: self.hash,
        }
    }
}

/// Formats unix milliseconds as RFC 3339 UTC, e.g. `2026-11-21T08:19:46.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
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

    #[test]
    fn timestamps_format_as_rfc3339_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_767_586_123), "2026-11-27T08:19:46.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn csv_fields_with_commas_and_quotes_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
