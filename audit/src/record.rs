//! Audit records: what is stored, and how each record's hash is computed.
//!
//! # Hash encoding (API boundary: changing it invalidates every existing log)
//!
//! ```text
//! hash = SHA-256( "chitin-audit-record-v1\0"
//!               || u64be(seq) || i64be(ts_ms)
//!               || lp(kind) || lp(actor) || lp(action) || lp(resource)
//!               || lp(decision) || lp(policies) || lp(outcome)
//!               || payload_digest[32] || prev_hash[32] )
//! lp(x)          = u32be(len(x)) || x          (UTF-8 bytes; unambiguous)
//! policies       = RFC 8785 JSON array of policy ids, e.g. ["deny-net","base"]
//! payload_digest = SHA-256(payload), payload = RFC 8785 canonical JSON text
//! prev_hash      = hash of record seq-1; 32 zero bytes for seq 1
//! ```
//!
//! The chain covers the payload *digest*, not the payload: retention can later remove a payload
//! ([`crate::AuditLog::remove_payload`]) and the chain still verifies.
//!
//! `field_check` is a diagnostic column: eight FNV-1a-32 values, one per header field (ts, kind,
//! actor, action, resource, decision, policies, outcome). It is not a security control (anyone
//! can recompute it) but lets the verifier name *which* field of a record was modified. The
//! verifier also checks it against the fields, so editing it alone is detected too.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AuditError;

/// Domain separation for record hashes.
const RECORD_DOMAIN: &[u8] = b"chitin-audit-record-v1\0";

/// The hash that seq 1 chains to.
pub const GENESIS_HASH: [u8; 32] = [0u8; 32];

/// The header fields covered by `field_check`, in order.
pub const CHECKED_FIELDS: [&str; 8] = [
    "ts", "kind", "actor", "action", "resource", "decision", "policies", "outcome",
];

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A gate decision (allow, deny, approval_required, shadow outcomes).
    Decision,
    /// A sandboxed tool run (argv, limits, exit, which limit killed it).
    ToolRun,
    /// A human approval or rejection of a high-risk action.
    Approval,
    /// A chat message in or out.
    Message,
    /// An operator action (config change, policy reload, audit commands, ...).
    Admin,
    /// A secret was released to a tool (never its value).
    SecretUse,
    /// Skill install, update, removal, verification.
    Skill,
    /// Retention and erasure (including payload removal from this log).
    Retention,
    /// The gateway itself: start, stop, audit outage recovered, ...
    System,
}

impl Kind {
    /// Every kind, in documentation order.
    pub const ALL: [Kind; 9] = [
        Kind::Decision,
        Kind::ToolRun,
        Kind::Approval,
        Kind::Message,
        Kind::Admin,
        Kind::SecretUse,
        Kind::Skill,
        Kind::Retention,
        Kind::System,
    ];

    /// The stored name, e.g. `tool_run`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Decision => "decision",
            Kind::ToolRun => "tool_run",
            Kind::Approval => "approval",
            Kind::Message => "message",
            Kind::Admin => "admin",
            Kind::SecretUse => "secret_use",
            Kind::Skill => "skill",
            Kind::Retention => "retention",
            Kind::System => "system",
        }
    }
}

impl Kind {
    /// Whether an operator may write a record of this kind by hand (`chitin audit append`):
    /// only `admin` and `system`. Decisions, tool runs and the other kinds are written by the
    /// components that do the thing, so a hand-written record can never pass for one.
    pub fn operator_writable(self) -> bool {
        matches!(self, Kind::Admin | Kind::System)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = AuditError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| AuditError::InvalidInput(format!(
                "unknown record kind {s:?}; use one of decision, tool_run, approval, message, admin, secret_use, skill, retention, system"
            )))
    }
}

/// The outcome of a gate decision, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateDecision {
    Allow,
    Deny,
    ApprovalRequired,
    /// Shadow mode: the policy would have allowed; enforcement was off.
    ShadowAllow,
    /// Shadow mode: the policy would have denied; enforcement was off.
    ShadowDeny,
    /// Shadow mode: the policy would have asked for approval; enforcement was off.
    ShadowApprovalRequired,
}

impl GateDecision {
    /// The stored name, e.g. `approval_required`.
    pub fn as_str(self) -> &'static str {
        match self {
            GateDecision::Allow => "allow",
            GateDecision::Deny => "deny",
            GateDecision::ApprovalRequired => "approval_required",
            GateDecision::ShadowAllow => "shadow_allow",
            GateDecision::ShadowDeny => "shadow_deny",
            GateDecision::ShadowApprovalRequired => "shadow_approval_required",
        }
    }
}

/// What a caller asks to record. Time, sequence number and hashes are assigned by the log.
///
/// The payload must already be redacted: secret values never enter it.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordInput {
    pub kind: Kind,
    /// Who: `Chitin::User::"alice"`, `operator:root`, `gateway`, ...
    pub actor: String,
    /// What: the Cedar action id, `exec`, `policy.reload`, ...
    pub action: String,
    /// On what: `Chitin::Tool::"exec"`, a path, a channel, ...
    pub resource: String,
    /// `allow`, `deny`, `approval_required`, `shadow_allow`, `shadow_deny`,
    /// `shadow_approval_required`, or empty.
    pub decision: String,
    /// The ids of the policies that determined the decision.
    pub policies: Vec<String>,
    /// How it ended: `ok`, `refused`, `exit 0`, `killed: cpu`, an error text, ...
    pub outcome: String,
    /// Redacted details (JSON). Stored as RFC 8785 canonical JSON.
    pub payload: serde_json::Value,
}

impl RecordInput {
    /// A record with no decision, no policies, outcome `ok` and a `null` payload.
    pub fn new(
        kind: Kind,
        actor: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            actor: actor.into(),
            action: action.into(),
            resource: resource.into(),
            decision: String::new(),
            policies: Vec::new(),
            outcome: "ok".into(),
            payload: serde_json::Value::Null,
        }
    }

    /// A gate decision: `kind = decision`, outcome = the decision.
    pub fn gate_decision(
        actor: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
        decision: GateDecision,
        policies: Vec<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            decision: decision.as_str().into(),
            policies,
            outcome: decision.as_str().into(),
            payload,
            ..Self::new(Kind::Decision, actor, action, resource)
        }
    }

    /// A sandboxed tool run. The payload carries argv, limits, exit and the limit that killed it.
    pub fn tool_run(actor: impl Into<String>, tool: impl Into<String>, run: &ToolRun) -> Self {
        let outcome = match (&run.killed_by, run.exit_code, run.signal) {
            (Some(limit), _, _) => format!("killed: {limit}"),
            (None, Some(code), _) => format!("exit {code}"),
            (None, None, Some(sig)) => format!("signal {sig}"),
            (None, None, None) => "not started".into(),
        };
        let payload = serde_json::json!({
            "argv": run.argv,
            "limits": run.limits,
            "exit_code": run.exit_code,
            "signal": run.signal,
            "killed_by": run.killed_by,
            "duration_ms": run.duration_ms,
        });
        Self {
            outcome,
            payload,
            ..Self::new(Kind::ToolRun, actor, "tool.run", tool)
        }
    }

    /// A record an operator wrote by hand (`chitin audit append`), marked as such: outcome
    /// `operator-written`, and the payload wrapped as
    /// `{"operator_written": true, "written_by": <by>, "payload": <payload>}`. Callers must
    /// refuse kinds that are not [`Kind::operator_writable`].
    pub fn operator_written(
        kind: Kind,
        by: &str,
        actor: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            outcome: "operator-written".into(),
            payload: serde_json::json!({
                "operator_written": true,
                "written_by": by,
                "payload": payload,
            }),
            ..Self::new(kind, actor, action, resource)
        }
    }

    /// An operator action (`policy.reload`, `config.change`, `audit.export`, ...).
    pub fn admin(
        actor: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            payload,
            ..Self::new(Kind::Admin, actor, action, resource)
        }
    }

    /// A human approval decision on a pending high-risk action (`approved` or `rejected`).
    pub fn approval(
        approver: impl Into<String>,
        request: impl Into<String>,
        approved: bool,
        payload: serde_json::Value,
    ) -> Self {
        let verdict = if approved { "approved" } else { "rejected" };
        Self {
            outcome: verdict.into(),
            payload,
            ..Self::new(Kind::Approval, approver, "approval", request)
        }
    }

    /// A secret released to a tool. Only the secret's *name* is recorded, never its value.
    pub fn secret_use(
        actor: impl Into<String>,
        secret_name: impl Into<String>,
        tool: impl Into<String>,
    ) -> Self {
        Self {
            payload: serde_json::json!({ "tool": tool.into() }),
            ..Self::new(Kind::SecretUse, actor, "secret.use", secret_name)
        }
    }

    /// Sets the outcome.
    #[must_use]
    pub fn with_outcome(mut self, outcome: impl Into<String>) -> Self {
        self.outcome = outcome.into();
        self
    }

    /// Sets the payload.
    #[must_use]
    pub fn with_payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets decision and policies.
    #[must_use]
    pub fn with_decision(mut self, decision: GateDecision, policies: Vec<String>) -> Self {
        self.decision = decision.as_str().into();
        self.policies = policies;
        self
    }
}

/// The facts of one sandboxed tool run, for [`RecordInput::tool_run`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolRun {
    /// The argv as run (already redacted).
    pub argv: Vec<String>,
    /// The limits applied (cpu, memory, wall time, pids, ...), as JSON.
    pub limits: serde_json::Value,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// The limit that killed the run (`cpu`, `wall`, `memory`, ...), if one did.
    pub killed_by: Option<String>,
    pub duration_ms: u64,
}

/// One stored record, exactly as read back (tolerant of tampered contents: hashes are byte
/// vectors of any length, text is whatever the column held).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub decision: String,
    /// RFC 8785 JSON array of policy ids (as hashed).
    pub policies: String,
    pub outcome: String,
    #[serde(with = "hex_bytes")]
    pub payload_digest: Vec<u8>,
    /// Canonical JSON text, or `None` after retention removed it.
    pub payload: Option<String>,
    /// When the payload was removed (unix ms), if it was.
    pub removed_at_ms: Option<i64>,
    /// Why the payload was removed, if it was.
    pub removed_reason: Option<String>,
    #[serde(with = "hex_bytes")]
    pub field_check: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub prev_hash: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub hash: Vec<u8>,
}

impl Record {
    /// The policy ids (empty if the stored text is not a JSON array of strings).
    pub fn policy_ids(&self) -> Vec<String> {
        serde_json::from_str(&self.policies).unwrap_or_default()
    }

    /// The payload as JSON, if present and parseable.
    pub fn payload_json(&self) -> Option<serde_json::Value> {
        self.payload
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
    }

    /// The hash this record's fields produce with the given seq and previous hash (the stored
    /// `payload_digest` is used as is).
    pub fn compute_hash_with(&self, seq: i64, prev_hash: &[u8]) -> [u8; 32] {
        compute_hash(&HashInput {
            seq,
            ts_ms: self.ts_ms,
            kind: &self.kind,
            actor: &self.actor,
            action: &self.action,
            resource: &self.resource,
            decision: &self.decision,
            policies: &self.policies,
            outcome: &self.outcome,
            payload_digest: &self.payload_digest,
            prev_hash,
        })
    }

    /// The hash of this record as stored.
    pub fn compute_hash(&self) -> [u8; 32] {
        self.compute_hash_with(self.seq, &self.prev_hash)
    }

    /// `field_check` computed from the stored fields.
    pub fn compute_field_check(&self) -> [u8; 32] {
        field_check(
            self.ts_ms,
            [
                &self.kind,
                &self.actor,
                &self.action,
                &self.resource,
                &self.decision,
                &self.policies,
                &self.outcome,
            ],
        )
    }
}

/// The fields that go into a record hash.
pub(crate) struct HashInput<'a> {
    pub seq: i64,
    pub ts_ms: i64,
    pub kind: &'a str,
    pub actor: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    pub decision: &'a str,
    pub policies: &'a str,
    pub outcome: &'a str,
    pub payload_digest: &'a [u8],
    pub prev_hash: &'a [u8],
}

fn lp(h: &mut Sha256, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    h.update(len.to_be_bytes());
    h.update(s.as_bytes());
}

pub(crate) fn compute_hash(i: &HashInput<'_>) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(i.seq.to_be_bytes());
    h.update(i.ts_ms.to_be_bytes());
    for s in [
        i.kind, i.actor, i.action, i.resource, i.decision, i.policies, i.outcome,
    ] {
        lp(&mut h, s);
    }
    h.update(i.payload_digest);
    h.update(i.prev_hash);
    h.finalize().into()
}

/// SHA-256 of a byte string.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn fnv1a32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

pub(crate) fn field_check(ts_ms: i64, texts: [&str; 7]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut values = [0u32; 8];
    values[0] = fnv1a32(&ts_ms.to_be_bytes());
    for (v, t) in values.iter_mut().skip(1).zip(texts) {
        *v = fnv1a32(t.as_bytes());
    }
    for (chunk, v) in out.chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&v.to_be_bytes());
    }
    out
}

/// The first header field whose `field_check` entry does not match, if any. `Some("field_check")`
/// when the column itself has the wrong length.
pub(crate) fn first_mismatched_field(r: &Record) -> Option<&'static str> {
    if r.field_check.len() != 32 {
        return Some("field_check");
    }
    let want = r.compute_field_check();
    for (i, name) in CHECKED_FIELDS.iter().enumerate() {
        let range = i * 4..i * 4 + 4;
        if want.get(range.clone()) != r.field_check.get(range) {
            return Some(name);
        }
    }
    None
}

/// Canonical (RFC 8785) JSON text of a value.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<String, AuditError> {
    serde_json_canonicalizer::to_string(value).map_err(|e| {
        AuditError::InvalidInput(format!(
            "payload is not representable as canonical JSON: {e}"
        ))
    })
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Parses lower-case hex (the only form written, so every stored hash has one spelling).
/// `None` on odd length, upper case or a non-hex character.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| match p {
            [hi, lo] => Some((val(*hi)? << 4) | val(*lo)?),
            _ => None,
        })
        .collect()
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        super::from_hex(&s).ok_or_else(|| serde::de::Error::custom("invalid hex"))
    }
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
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(to_hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(from_hex("00ABff"), None);
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
    }

    #[test]
    fn a_single_byte_change_in_any_field_changes_its_field_check() {
        let base = field_check(5, ["a", "b", "c", "d", "e", "f", "g"]);
        let other = field_check(5, ["a", "b", "c", "d", "e", "f", "h"]);
        assert_eq!(base[..28], other[..28]);
        assert_ne!(base[28..], other[28..]);
    }

    #[test]
    fn length_prefixes_make_the_encoding_unambiguous() {
        let d = [0u8; 32];
        let a = compute_hash(&HashInput {
            seq: 1,
            ts_ms: 0,
            kind: "ab",
            actor: "c",
            action: "",
            resource: "",
            decision: "",
            policies: "[]",
            outcome: "",
            payload_digest: &d,
            prev_hash: &d,
        });
        let b = compute_hash(&HashInput {
            seq: 1,
            ts_ms: 0,
            kind: "a",
            actor: "bc",
            action: "",
            resource: "",
            decision: "",
            policies: "[]",
            outcome: "",
            payload_digest: &d,
            prev_hash: &d,
        });
        assert_ne!(a, b);
    }
}
