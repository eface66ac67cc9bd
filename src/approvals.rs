//! Approvals for high-risk actions: a request the gate answered `approval_required` waits for
//! a person.
//!
//! Invariants:
//! - An approval is bound to the request digest of one exact call (`gate::request_digest_with`)
//!   and is redeemed at most once (an atomic `granted -> used` update).
//! - It expires (default 10 minutes); an expired approval can be neither granted nor redeemed.
//! - Whoever grants or denies is checked by Cedar (`approval.grant`, principal the approver,
//!   resource the tool, context `requester`); the gate audits that decision.
//! - Every step (request, grant, denial, redemption, expiry) is in the audit log; a step whose
//!   record cannot be written does not happen.
//! - Pending approvals live in `state.db`, so they survive a restart.

use std::sync::Arc;

use chitin_audit::{Kind, RecordInput};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{Clock, rfc3339};
use crate::gate::{Gate, GateError, Verdict};
use crate::policy::PolicyRequest;
use crate::store::{Store, StoreError};

/// How long an approval request stays open unless configured otherwise.
pub const DEFAULT_TTL_MS: i64 = 10 * 60 * 1000;

/// Letters and digits that cannot be confused with each other when read aloud or typed.
const CODE_ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
const CODE_LEN: usize = 6;

/// Errors of the approval workflow.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no approval with code {0}; `chitin approvals list` shows the open ones")]
    NotFound(String),
    #[error("approval {code} is already {status}")]
    NotPending { code: String, status: String },
    #[error("approval {0} has expired; the action was refused and must be asked for again")]
    Expired(String),
    #[error(
        "{approver} may not resolve approvals for {tool} (policy decision: {decision}{policies})"
    )]
    ApproverRefused {
        approver: String,
        tool: String,
        decision: String,
        policies: String,
    },
    #[error("no granted, unexpired approval covers this request")]
    NotApproved,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("audit log unavailable, nothing changed: {0}")]
    Audit(String),
    #[error("approval store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("no randomness from the OS for an approval id: {0}")]
    Random(String),
}

/// One approval request, as listed and as returned to callers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Approval {
    pub id: String,
    pub code: String,
    pub requester: String,
    pub session: String,
    pub tool: String,
    /// The exact action in plain words.
    pub summary: String,
    pub args: Value,
    pub request_digest: String,
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub resolved_by: Option<String>,
}

/// Proof that a granted approval for one exact request was just redeemed (marked used, once).
/// Only [`Approvals::redeem`] makes one; the gate accepts `approved = true` only with it, and
/// only when its digest is the digest of the call being decided.
#[derive(Debug)]
pub struct Redeemed {
    digest: [u8; 32],
    approval: Approval,
}

impl Redeemed {
    /// The request digest the approval was bound to.
    pub fn digest(&self) -> &[u8; 32] {
        &self.digest
    }
    /// The approval, now `used`.
    pub fn approval(&self) -> &Approval {
        &self.approval
    }
}

/// The approval workflow over the state database.
#[derive(Clone)]
pub struct Approvals {
    store: Arc<Store>,
    gate: Gate,
    clock: Arc<dyn Clock>,
    ttl_ms: i64,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

/// `Chitin::User::"<id>"`, quoted exactly as the gate quotes principals, so `chitin audit query
/// --actor` finds every step of an approval.
fn user_uid(id: &str) -> String {
    format!("Chitin::User::{}", Value::String(id.to_string()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ApprovalError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ApprovalError::Random(e.to_string()))?;
    Ok(b)
}

/// The action in plain words: tool, arguments, paths and hosts, nothing elided that matters.
pub fn describe(tool: &str, args: &Value) -> String {
    let s = |k: &str| visible(args.get(k).and_then(Value::as_str).unwrap_or(""));
    match tool {
        "exec" => {
            let argv: Vec<String> = args
                .get("argv")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_str().map_or_else(|| x.to_string(), shell_word))
                        .collect()
                })
                .unwrap_or_default();
            let mut out = format!("run `{}`", argv.join(" "));
            if !s("cwd").is_empty() {
                out.push_str(&format!(" in {}", s("cwd")));
            }
            if let Some(net) = args
                .get("network")
                .and_then(Value::as_array)
                .filter(|n| !n.is_empty())
            {
                let hosts: Vec<String> =
                    net.iter().filter_map(Value::as_str).map(visible).collect();
                out.push_str(&format!(" with network access to {}", hosts.join(", ")));
            }
            out
        }
        "write_file" => format!(
            "write {} bytes to {}",
            args.get("content")
                .and_then(Value::as_str)
                .map_or(0, str::len),
            s("path")
        ),
        "edit_file" => format!(
            "edit {}: replace {:?} with {:?}",
            s("path"),
            s("old_string"),
            s("new_string")
        ),
        "read_file" => format!("read {}", s("path")),
        "list_dir" => format!("list {}", s("path")),
        "send_message" => format!("send a message to {} on {}", s("target"), s("channel")),
        "web_fetch" => format!("{} {}", s("method"), s("url")),
        other => visible(&format!("{other} {args}")),
    }
}

fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else if s.chars().any(is_deceptive) {
        // Bash's $'...' quoting with every control/format character escaped.
        format!("$'{}'", visible(s).replace('\'', "\\'"))
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Characters that can make a summary show something other than what it says: C0/C1
/// controls (carriage return, escape sequences), DEL, and Unicode format characters
/// (bidi overrides and isolates, zero-width characters).
fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

/// `s` with every deceptive character written as an escape (`\r`, `\x1b`, `\u{202e}`), so a
/// person approving an action reads exactly what will run.
pub fn visible(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_deceptive(c) && u32::from(c) < 0x100 => {
                out.push_str(&format!("\\x{:02x}", u32::from(c)))
            }
            c if is_deceptive(c) => out.push_str(&format!("\\u{{{:04x}}}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

const COLUMNS: &str = "id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms, resolved_by";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Approval> {
    let args: String = r.get(6)?;
    let digest: Vec<u8> = r.get(7)?;
    Ok(Approval {
        id: r.get(0)?,
        code: r.get(1)?,
        requester: r.get(2)?,
        session: r.get(3)?,
        tool: r.get(4)?,
        summary: r.get(5)?,
        args: serde_json::from_str(&args).unwrap_or(Value::Null),
        request_digest: hex(&digest),
        status: r.get(8)?,
        created_at: rfc3339(r.get(9)?),
        expires_at: rfc3339(r.get(10)?),
        resolved_by: r.get(11)?,
    })
}

impl Approvals {
    pub fn new(store: Arc<Store>, gate: Gate, clock: Arc<dyn Clock>, ttl_ms: i64) -> Self {
        Self {
            store,
            gate,
            clock,
            ttl_ms: ttl_ms.max(1),
        }
    }

    fn audit(&self, input: RecordInput) -> Result<(), ApprovalError> {
        self.gate
            .audit()
            .append(input)
            .map(|_| ())
            .map_err(|e| ApprovalError::Audit(e.to_string()))
    }

    /// Opens an approval request for a call the gate answered `approval_required`.
    pub fn request(
        &self,
        requester: &str,
        session: &str,
        tool: &str,
        args: &Value,
        request_digest: [u8; 32],
    ) -> Result<Approval, ApprovalError> {
        let now = self.clock.now_ms();
        let id = hex(&random_bytes::<16>()?);
        let summary = self.gate.redact(&describe(tool, args));
        let args_text = self.gate.redact(&args.to_string());
        let expires = now.saturating_add(self.ttl_ms);
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        // A fresh code that no open approval uses.
        let mut code = String::new();
        for _ in 0..16 {
            let r = random_bytes::<CODE_LEN>()?;
            let candidate: String = r
                .iter()
                .map(|b| char::from(CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()]))
                .collect();
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM approvals WHERE code = ?1 AND status IN ('pending', 'granted')",
                    [&candidate],
                    |r| r.get(0),
                )
                .optional()?;
            if taken.is_none() {
                code = candidate;
                break;
            }
        }
        if code.is_empty() {
            return Err(ApprovalError::Random(
                "could not find a free approval code".into(),
            ));
        }
        tx.execute(
            "INSERT INTO approvals (id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10)",
            params![id, code, requester, session, tool, summary, args_text, request_digest.to_vec(), now, expires],
        )?;
        // The record first: if it cannot be written, the request does not exist.
        self.audit(
            RecordInput::new(Kind::Approval, user_uid(requester), "approval.request", format!("Chitin::Tool::{}", Value::String(tool.into())))
                .with_outcome("pending")
                .with_payload(json!({"id": id, "code": code, "session": session, "summary": summary,
                                     "request_digest": hex(&request_digest), "expires_at": rfc3339(expires)})),
        )?;
        tx.commit()?;
        drop(conn);
        self.by_code(&code)
    }

    /// One approval by id (after expiring the ones that are due).
    pub fn get(&self, id: &str) -> Result<Approval, ApprovalError> {
        self.expire_due()?;
        let conn = self.store.conn()?;
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
            [id],
            row,
        )
        .optional()?
        .ok_or_else(|| ApprovalError::NotFound(id.into()))
    }

    fn by_code(&self, code: &str) -> Result<Approval, ApprovalError> {
        let conn = self.store.conn()?;
        conn.query_row(
            &format!(
                "SELECT {COLUMNS} FROM approvals WHERE code = ?1 ORDER BY created_ms DESC LIMIT 1"
            ),
            [code],
            row,
        )
        .optional()?
        .ok_or_else(|| ApprovalError::NotFound(code.into()))
    }

    /// The approval still waiting for a person for exactly this request, if any.
    pub fn open_for(&self, request_digest: &[u8; 32]) -> Result<Option<Approval>, ApprovalError> {
        self.expire_due()?;
        let conn = self.store.conn()?;
        Ok(conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM approvals WHERE request_digest = ?1 AND status = 'pending' ORDER BY created_ms DESC LIMIT 1"
                ),
                [request_digest.to_vec()],
                row,
            )
            .optional()?)
    }

    /// Marks every open approval whose time is up as expired (and records it).
    pub fn expire_due(&self) -> Result<usize, ApprovalError> {
        let now = self.clock.now_ms();
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        let due: Vec<(String, String)> = {
            let mut st = tx.prepare(
                "SELECT id, code FROM approvals WHERE status IN ('pending', 'granted') AND expires_ms <= ?1",
            )?;
            let rows = st.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        if due.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "UPDATE approvals SET status = 'expired', resolved_ms = ?1 WHERE status IN ('pending', 'granted') AND expires_ms <= ?1",
            [now],
        )?;
        self.audit(
            RecordInput::new(Kind::Approval, "gateway", "approval.expire", "approvals")
                .with_outcome("expired")
                .with_payload(json!({"approvals": due.iter().map(|(id, code)| json!({"id": id, "code": code})).collect::<Vec<_>>()})),
        )?;
        tx.commit()?;
        Ok(due.len())
    }

    /// Approvals, newest first: the open ones, or all with `all`.
    pub fn list(&self, all: bool) -> Result<Vec<Approval>, ApprovalError> {
        self.expire_due()?;
        let conn = self.store.conn()?;
        let filter = if all { "" } else { "WHERE status = 'pending'" };
        let mut st = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM approvals {filter} ORDER BY created_ms DESC"
        ))?;
        let rows = st.query_map([], row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Grants or denies the pending approval `code` on behalf of `approver` (a user id). Cedar
    /// decides whether the approver may (`approval.grant`).
    pub fn resolve(
        &self,
        code: &str,
        approver: &str,
        grant: bool,
    ) -> Result<Approval, ApprovalError> {
        self.expire_due()?;
        let code = code.trim().to_ascii_uppercase();
        let a = self.by_code(&code)?;
        match a.status.as_str() {
            "pending" => {}
            "expired" => return Err(ApprovalError::Expired(code)),
            other => {
                return Err(ApprovalError::NotPending {
                    code,
                    status: other.into(),
                });
            }
        }
        let req = PolicyRequest::from_json(&json!({
            "principal": user_uid(approver),
            "action": "Chitin::Action::\"approval.grant\"",
            "resource": format!("Chitin::Tool::{}", Value::String(a.tool.clone())),
            "context": {"requester": {"__entity": {"type": "Chitin::User", "id": a.requester}}},
        }))
        .map_err(GateError::from)?;
        match self.gate.check(&req)? {
            Verdict::Allowed(..) => {}
            other => {
                let d = other.decision();
                return Err(ApprovalError::ApproverRefused {
                    approver: approver.into(),
                    tool: a.tool.clone(),
                    decision: d.decision.as_str().into(),
                    policies: if d.policies.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.policies.join(", "))
                    },
                });
            }
        }
        let now = self.clock.now_ms();
        let status = if grant { "granted" } else { "denied" };
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE approvals SET status = ?1, resolved_by = ?2, resolved_ms = ?3 WHERE id = ?4 AND status = 'pending' AND expires_ms > ?3",
            params![status, approver, now, a.id],
        )?;
        if changed != 1 {
            return Err(ApprovalError::NotPending {
                code,
                status: "resolved by someone else or expired".into(),
            });
        }
        self.audit(RecordInput::approval(
            user_uid(approver),
            format!("approval:{}", a.id),
            grant,
            json!({"code": a.code, "tool": a.tool, "summary": a.summary, "requester": a.requester,
                   "request_digest": a.request_digest}),
        ))?;
        tx.commit()?;
        drop(conn);
        self.by_code(&code)
    }

    /// Redeems the granted approval bound to `request_digest`, once. Returns it, or
    /// `NotApproved` when none is granted, unexpired and unused for exactly this request.
    pub fn redeem(&self, request_digest: &[u8; 32]) -> Result<Redeemed, ApprovalError> {
        self.expire_due()?;
        let now = self.clock.now_ms();
        let mut conn = self.store.conn()?;
        let tx = conn.transaction()?;
        let id: Option<String> = tx
            .query_row(
                "UPDATE approvals SET status = 'used', used_ms = ?1
                 WHERE id = (SELECT id FROM approvals WHERE request_digest = ?2 AND status = 'granted' AND expires_ms > ?1
                             ORDER BY created_ms LIMIT 1)
                 RETURNING id",
                params![now, request_digest.to_vec()],
                |r| r.get(0),
            )
            .optional()?;
        let Some(id) = id else {
            return Err(ApprovalError::NotApproved);
        };
        self.audit(
            RecordInput::new(
                Kind::Approval,
                "gateway",
                "approval.redeem",
                format!("approval:{id}"),
            )
            .with_outcome("used")
            .with_payload(json!({"request_digest": hex(request_digest)})),
        )?;
        tx.commit()?;
        let approval = conn.query_row(
            &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
            [&id],
            row,
        )?;
        Ok(Redeemed {
            digest: *request_digest,
            approval,
        })
    }
}
