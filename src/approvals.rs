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
use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{Clock, rfc3339};
use crate::gate::{Gate, GateError, Verdict};
use crate::policy::PolicyRequest;
use crate::store::{Store, StoreError, params};

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
    #[error("no approval with id {0}; `chitin approvals list --all` shows them all")]
    UnknownId(String),
    #[error(
        "{0} open approvals have code {1}; resolve by id instead (`chitin approvals list --json` shows the ids)"
    )]
    AmbiguousCode(usize, String),
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
        /// The determining policies' ids (what `policies` lists).
        policy_ids: Vec<String>,
    },
    #[error("no granted, unexpired approval covers this request")]
    NotApproved,
    #[error("{approver} may not resolve approval {code}: {why}")]
    WrongApprover {
        approver: String,
        code: String,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error("audit log unavailable, nothing changed: {0}")]
    Audit(String),
    #[error(transparent)]
    Db(#[from] chitin_store::Error),
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
    /// The exact action in plain words: every argument, large ones abbreviated.
    pub summary: String,
    /// The normalized arguments the approval is bound to (secrets redacted).
    pub args: Value,
    /// Every argument as a person sees it, built from `args` on first use (an agent polling
    /// an approval does not escape and hash a large stdin every time); see
    /// [`Approval::presentation`].
    #[serde(skip)]
    presentation: std::sync::OnceLock<Presentation>,
    pub request_digest: String,
    pub status: String,
    pub created_at: String,
    pub expires_at: String,
    pub resolved_by: Option<String>,
    /// Only this user may resolve it (a workflow gate's `required_approver`).
    pub required_approver: Option<String>,
    /// Anyone but this user may grant it (`require_different_approver`: the run's owner).
    pub distinct_from: Option<String>,
}

/// A granted approval for one exact request, just redeemed (marked used, once), with the
/// gate's proof of it ([`crate::gate::Redeemed`]). Only [`Approvals::redeem`] makes one; the
/// gate accepts `approved = true` only with its proof, and only when the digest is the digest
/// of the call being decided.
#[derive(Debug)]
pub struct Redeemed {
    proof: crate::gate::Redeemed,
    approval: Approval,
}

impl Redeemed {
    /// The request digest the approval was bound to.
    pub fn digest(&self) -> &[u8; 32] {
        self.proof.digest()
    }
    /// What the gate takes as proof of the redemption.
    pub fn proof(&self) -> &crate::gate::Redeemed {
        &self.proof
    }
    /// The approval, now `used`.
    pub fn approval(&self) -> &Approval {
        &self.approval
    }
}

/// Who may resolve an approval, beyond what Cedar's `approval.grant` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Constraints {
    /// Only this user may grant or deny it.
    pub required_approver: Option<String>,
    /// This user may not grant it (they may still deny it).
    pub distinct_from: Option<String>,
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
    chitin_audit::to_hex(b)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], ApprovalError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| ApprovalError::Random(e.to_string()))?;
    Ok(b)
}

/// The action in plain words: every argument the approval binds, large values abbreviated
/// (size, SHA-256, head and tail). Same as `Presentation::of(tool, args).summary()`.
pub fn describe(tool: &str, args: &Value) -> String {
    Presentation::of(tool, args).summary()
}

// ---- what a person sees: the approval presentation -----------------------------------------

/// Text values longer than this (bytes) are abbreviated (size, SHA-256, head and tail) in
/// summaries, events and lists; `chitin approvals show` and the web page show them whole.
pub const ABBREVIATE_ABOVE: usize = 512;
/// How many characters of the head and of the tail an abbreviated value shows.
pub const HEAD_TAIL_CHARS: usize = 96;

/// What kind of JSON leaf a field is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    Text,
    Number,
    Boolean,
    Null,
    EmptyList,
    EmptyObject,
}

/// One leaf of the normalized arguments an approval is bound to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Field {
    /// Where it is in the arguments, as a JSON pointer (`/argv/0`, `/stdin`).
    pub path: String,
    /// The name people read (`argv[0]`, `stdin`, `headers.accept`), escaped.
    pub label: String,
    pub kind: FieldKind,
    /// The whole value, escaped ([`exact`]): text without quotes, anything else as JSON.
    pub value: String,
    /// Size of the value in bytes (UTF-8, before escaping).
    pub bytes: usize,
    /// SHA-256 (hex) of those bytes.
    pub sha256: String,
    /// The first and last [`HEAD_TAIL_CHARS`] characters, escaped (text only).
    head: String,
    tail: String,
}

impl Field {
    fn new(path: String, label: String, v: &Value) -> Self {
        use sha2::Digest as _;
        let (kind, raw) = match v {
            Value::String(s) => (FieldKind::Text, s.clone()),
            Value::Number(n) => (FieldKind::Number, n.to_string()),
            Value::Bool(b) => (FieldKind::Boolean, b.to_string()),
            Value::Null => (FieldKind::Null, "null".to_string()),
            Value::Array(_) => (FieldKind::EmptyList, "[]".to_string()),
            Value::Object(_) => (FieldKind::EmptyObject, "{}".to_string()),
        };
        let n = raw.chars().count();
        let head: String = raw.chars().take(HEAD_TAIL_CHARS).collect();
        let tail: String = raw
            .chars()
            .skip(n.saturating_sub(HEAD_TAIL_CHARS))
            .collect();
        Self {
            path,
            label,
            kind,
            value: exact(&raw),
            bytes: raw.len(),
            sha256: hex(&sha2::Sha256::digest(raw.as_bytes())),
            head: exact(&head),
            tail: exact(&tail),
        }
    }

    /// Whether the value is shown abbreviated outside the full views.
    pub fn is_large(&self) -> bool {
        self.bytes > ABBREVIATE_ABOVE
    }

    /// The value as a summary shows it: text quoted (or abbreviated when large), anything
    /// else as JSON.
    pub fn short(&self) -> String {
        match self.kind {
            FieldKind::Text if self.is_large() => format!(
                "{} bytes, sha256 {}, \"{}\" … \"{}\"",
                self.bytes,
                self.sha256,
                self.head.replace('"', "\\\""),
                self.tail.replace('"', "\\\"")
            ),
            FieldKind::Text => format!("\"{}\"", self.value.replace('"', "\\\"")),
            _ => self.value.clone(),
        }
    }

    /// A bare word when the value is short plain text (`notes.md`, `example.com:443`),
    /// otherwise [`Field::short`].
    fn word(&self) -> String {
        if self.kind == FieldKind::Text
            && !self.value.is_empty()
            && !self.is_large()
            && self
                .value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%~".contains(c))
        {
            self.value.clone()
        } else {
            self.short()
        }
    }

    /// The wire form: `{path, label, kind, bytes, sha256, complete, value}` when the value is
    /// small or `full`, else `{..., complete: false, head, tail}` (the full text through
    /// `approvals.show` / `chitin approvals show`).
    pub fn to_json(&self, full: bool) -> Value {
        let mut o = json!({
            "path": self.path, "label": self.label, "kind": self.kind,
            "bytes": self.bytes, "sha256": self.sha256,
        });
        if let Value::Object(m) = &mut o {
            if full || !self.is_large() {
                m.insert("complete".into(), json!(true));
                m.insert("value".into(), json!(self.value));
            } else {
                m.insert("complete".into(), json!(false));
                m.insert("head".into(), json!(self.head));
                m.insert("tail".into(), json!(self.tail));
            }
        }
        o
    }
}

/// Everything an approval binds, as a person sees it: one [`Field`] for every leaf of the
/// normalized arguments the request digest covers (`gate::request_digest_with`), built once,
/// from those arguments, for every place an approval is shown (summary, WebSocket event, web
/// page, CLI, `/tools/invoke`). Nothing can be bound without being shown: the fields are the
/// arguments, leaf for leaf.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Presentation {
    pub tool: String,
    pub fields: Vec<Field>,
}

/// The arguments shown first, in this order, per tool (the rest follow in key order).
fn preferred(tool: &str) -> &'static [&'static str] {
    match tool {
        "exec" => &["argv", "cwd", "network", "env", "stdin", "timeout_secs"],
        "write_file" => &["path", "create_dirs", "content"],
        "edit_file" => &["path", "replace_all", "old_string", "new_string"],
        "web_fetch" => &["method", "url", "headers", "body"],
        "send_message" => &["channel", "target"],
        "workflow" => &[
            "workflow",
            "step",
            "prompt",
            "items",
            "preview",
            "file",
            "file_sha256",
            "run",
        ],
        _ => &["path"],
    }
}

/// `~` and `/` escaped as in a JSON pointer.
fn pointer_token(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

fn walk(v: &Value, path: &str, label: &str, out: &mut Vec<Field>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                let l = if label.is_empty() {
                    exact(k)
                } else {
                    format!("{label}.{}", exact(k))
                };
                walk(x, &format!("{path}/{}", pointer_token(k)), &l, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for (i, x) in a.iter().enumerate() {
                walk(x, &format!("{path}/{i}"), &format!("{label}[{i}]"), out);
            }
        }
        leaf => out.push(Field::new(
            path.to_string(),
            if label.is_empty() {
                "arguments".into()
            } else {
                label.to_string()
            },
            leaf,
        )),
    }
}

impl Presentation {
    /// The presentation of a call of `tool` with these (normalized) arguments.
    pub fn of(tool: &str, args: &Value) -> Self {
        let mut fields = Vec::new();
        match args {
            Value::Object(m) if !m.is_empty() => {
                let first = preferred(tool);
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort_by_key(|k| {
                    (
                        first.iter().position(|p| p == k).unwrap_or(first.len()),
                        k.as_str(),
                    )
                });
                for k in keys {
                    if let Some(v) = m.get(k) {
                        walk(v, &format!("/{}", pointer_token(k)), &exact(k), &mut fields);
                    }
                }
            }
            other => walk(other, "", "", &mut fields),
        }
        Self {
            tool: tool.to_string(),
            fields,
        }
    }

    fn at(&self, path: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.path == path)
    }

    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a Field> + 'a {
        self.fields.iter().filter(move |f| {
            f.path == prefix
                || f.path
                    .strip_prefix(prefix)
                    .is_some_and(|r| r.starts_with('/'))
        })
    }

    /// One line: what the call does, then every other argument (`; label: value`), large
    /// values abbreviated. Only nulls and `false` flags are left out (they change nothing).
    pub fn summary(&self) -> String {
        let mut used: Vec<&str> = Vec::new();
        let mut word = |p: &'static str| -> String {
            match self.at(p) {
                Some(f) if f.kind == FieldKind::Text => {
                    used.push(p);
                    f.word()
                }
                _ => String::new(),
            }
        };
        let mut out = match self.tool.as_str() {
            "exec" => String::new(),
            "write_file" => format!("write {}", word("/path")),
            "edit_file" => format!("edit {}", word("/path")),
            "read_file" => format!("read {}", word("/path")),
            "list_dir" => format!("list {}", word("/path")),
            "send_message" => {
                let t = word("/target");
                format!("send a message to {t} on {}", word("/channel"))
            }
            "web_fetch" => {
                let m = word("/method");
                format!("{m} {}", word("/url"))
            }
            "workflow" => {
                let w = word("/workflow");
                match word("/step") {
                    s if s.is_empty() => format!("run workflow {w}"),
                    s => format!("workflow {w}, step {s}"),
                }
            }
            other => exact(other),
        };
        if self.tool == "exec" {
            let argv: Vec<&Field> = self.under("/argv").collect();
            let words: Vec<String> = argv
                .iter()
                .map(|f| match f.kind {
                    FieldKind::Text if f.is_large() => format!("⟨{}⟩", f.short()),
                    FieldKind::Text => shell_word_exact(&f.value),
                    _ => f.value.clone(),
                })
                .collect();
            used.extend(argv.iter().map(|f| f.path.as_str()));
            out = format!("run `{}`", words.join(" "));
            if let Some(f) = self.at("/cwd").filter(|f| f.kind == FieldKind::Text) {
                out.push_str(&format!(" in {}", f.word()));
                used.push("/cwd");
            }
            let net: Vec<&Field> = self
                .under("/network")
                .filter(|f| f.kind == FieldKind::Text)
                .collect();
            if !net.is_empty() {
                let hosts: Vec<String> = net.iter().map(|f| f.word()).collect();
                out.push_str(&format!(" with network access to {}", hosts.join(", ")));
                used.extend(net.iter().map(|f| f.path.as_str()));
            }
        }
        for f in &self.fields {
            if used.contains(&f.path.as_str())
                || f.kind == FieldKind::Null
                || (f.kind == FieldKind::Boolean && f.value == "false")
            {
                continue;
            }
            out.push_str(&format!("; {}: {}", f.label, f.short()));
        }
        out
    }

    /// Every field in full, one per line (text split after each newline, every line marked
    /// `  | ` so no value can pass for another field), for `chitin approvals show`.
    pub fn render_full(&self) -> String {
        let mut out = String::new();
        for f in &self.fields {
            match f.kind {
                FieldKind::Text => {
                    out.push_str(&format!(
                        "{} ({} bytes, sha256 {}):\n",
                        f.label, f.bytes, f.sha256
                    ));
                    for line in escaped_lines(&f.value) {
                        out.push_str("  | ");
                        out.push_str(line);
                        out.push('\n');
                    }
                }
                _ => out.push_str(&format!("{}: {}\n", f.label, f.value)),
            }
        }
        out
    }

    /// The fields' wire forms (see [`Field::to_json`]).
    pub fn to_json(&self, full: bool) -> Value {
        Value::Array(self.fields.iter().map(|f| f.to_json(full)).collect())
    }
}

/// An [`exact`]-escaped text cut after each escaped newline (`\n`, not a literal `\\n`).
fn escaped_lines(escaped: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut it = escaped.char_indices();
    while let Some((_, c)) = it.next() {
        if c == '\\'
            && let Some((j, n)) = it.next()
            && n == 'n'
        {
            lines.push(&escaped[start..j + 1]);
            start = j + 1;
        }
    }
    if start < escaped.len() || lines.is_empty() {
        lines.push(&escaped[start..]);
    }
    lines
}

/// A shell word of an already [`exact`]-escaped text.
fn shell_word_exact(escaped: &str) -> String {
    if !escaped.is_empty()
        && escaped
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        escaped.to_string()
    } else if escaped.contains('\\') {
        // Bash's $'...' quoting: the escapes read as what they stand for.
        format!("$'{}'", escaped.replace('\'', "\\'"))
    } else {
        format!("'{}'", escaped.replace('\'', "'\\''"))
    }
}

/// [`visible`], and a backslash doubled, so that two different texts never look the same
/// (a literal `\n` shows as `\\n`, a newline as `\n`).
pub fn exact(s: &str) -> String {
    visible(&s.replace('\\', "\\\\"))
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

const COLUMNS: &str = "id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms, resolved_by, required_approver, distinct_from";

/// The stored (redacted) arguments; text that is not JSON is shown as it is.
fn shown_args(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

impl Approval {
    /// Every argument it binds, as a person sees it (built from `args`, once).
    pub fn presentation(&self) -> &Presentation {
        self.presentation
            .get_or_init(|| Presentation::of(&self.tool, &self.args))
    }

    /// The wire form of an approval (WebSocket `approval.requested` and `approvals.list`,
    /// `/tools/invoke`, `chitin approvals list --json`): `{id, code, status, expires_at, tool,
    /// summary, requester, session, request_digest, fields}`, each field abbreviated when
    /// large unless `full` (`approvals.show`, `chitin approvals show`).
    pub fn to_json(&self, full: bool) -> Value {
        json!({
            "id": self.id, "code": self.code, "status": self.status,
            "created_at": self.created_at, "expires_at": self.expires_at,
            "tool": self.tool, "summary": self.summary, "requester": self.requester,
            "session": self.session, "request_digest": self.request_digest,
            "resolved_by": self.resolved_by,
            "fields": self.presentation().to_json(full),
        })
    }

    /// Everything, in full and escaped, for a person at a terminal.
    pub fn render_full(&self) -> String {
        let v = visible;
        format!(
            "approval {} (code {})\nstatus: {}\ntool: {}\nrequested by: {}\nsession: {}\ncreated: {}\nexpires: {}\nrequest digest: {}\n{}summary: {}\n\narguments:\n{}",
            v(&self.id),
            v(&self.code),
            v(&self.status),
            v(&self.tool),
            v(&self.requester),
            v(&self.session),
            self.created_at,
            self.expires_at,
            self.request_digest,
            self.resolved_by
                .as_deref()
                .map(|b| format!("resolved by: {}\n", v(b)))
                .unwrap_or_default(),
            self.summary,
            self.presentation().render_full()
        )
    }
}

/// Which approval a person means: an id (32 hex digits) or a code (6 letters and digits).
/// The two cannot be confused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalRef {
    Id(String),
    Code(String),
}

impl ApprovalRef {
    /// The code or id.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Id(s) | Self::Code(s) => s,
        }
    }

    /// Reads a code or an id as a person typed it.
    pub fn parse(s: &str) -> Self {
        let t = s.trim();
        if t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            Self::Id(t.to_ascii_lowercase())
        } else {
            Self::Code(t.to_ascii_uppercase())
        }
    }
}

fn row(r: &chitin_store::Row) -> Result<Approval, ApprovalError> {
    let args: String = r.get(6)?;
    let digest: Vec<u8> = r.get(7)?;
    let tool: String = r.get(4)?;
    let args = shown_args(&args);
    Ok(Approval {
        id: r.get(0)?,
        code: r.get(1)?,
        requester: r.get(2)?,
        session: r.get(3)?,
        presentation: std::sync::OnceLock::new(),
        tool,
        summary: r.get(5)?,
        args,
        request_digest: hex(&digest),
        status: r.get(8)?,
        created_at: rfc3339(r.get(9)?),
        expires_at: rfc3339(r.get(10)?),
        resolved_by: r.get(11)?,
        required_approver: r.get(12)?,
        distinct_from: r.get(13)?,
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
        self.request_constrained(
            requester,
            session,
            tool,
            args,
            request_digest,
            &Constraints::default(),
        )
    }

    /// [`Approvals::request`] with limits on who may resolve it (a workflow approval gate's
    /// `required_approver` and `require_different_approver`), checked by
    /// [`Approvals::resolve_ref`] after Cedar's `approval.grant`.
    pub fn request_constrained(
        &self,
        requester: &str,
        session: &str,
        tool: &str,
        args: &Value,
        request_digest: [u8; 32],
        limits: &Constraints,
    ) -> Result<Approval, ApprovalError> {
        let now = self.clock.now_ms();
        let id = hex(&random_bytes::<16>()?);
        // What is shown is built from exactly the arguments stored (secrets redacted).
        let args_text = self.gate.redact(&args.to_string());
        let summary = Presentation::of(tool, &shown_args(&args_text)).summary();
        let expires = now.saturating_add(self.ttl_ms);
        self.store.db().tx(|tx| {
            // A fresh code that no open approval uses.
            let mut code = String::new();
            for _ in 0..16 {
                let r = random_bytes::<CODE_LEN>()?;
                let candidate: String = r
                    .iter()
                    .map(|b| char::from(CODE_ALPHABET[usize::from(*b) % CODE_ALPHABET.len()]))
                    .collect();
                let taken = tx.query_opt(
                    "SELECT id FROM approvals WHERE code = ?1 AND status IN ('pending', 'granted')",
                    params![candidate],
                )?;
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
                "INSERT INTO approvals (id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms, required_approver, distinct_from)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10, ?11, ?12)",
                params![id, code, requester, session, tool, summary, args_text, request_digest, now, expires,
                        limits.required_approver, limits.distinct_from],
            )?;
            // The record first: if it cannot be written, the request does not exist.
            self.audit(
                RecordInput::new(Kind::Approval, user_uid(requester), "approval.request", format!("Chitin::Tool::{}", Value::String(tool.into())))
                    .with_outcome("pending")
                    .with_payload(json!({"id": id, "code": code, "session": session, "summary": summary,
                                         "request_digest": hex(&request_digest), "expires_at": rfc3339(expires)})),
            )
        })?;
        self.by_id(&id)
    }

    /// One approval by id (after expiring the ones that are due).
    pub fn get(&self, id: &str) -> Result<Approval, ApprovalError> {
        self.expire_due()?;
        self.by_id(id)
    }

    fn by_id(&self, id: &str) -> Result<Approval, ApprovalError> {
        self.store
            .db()
            .with(|c| {
                c.query_opt(
                    &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                    params![id],
                )
            })?
            .map(|r| row(&r))
            .transpose()?
            .ok_or_else(|| ApprovalError::UnknownId(visible(id)))
    }

    /// The approval a code or id names (after expiring the ones that are due). An id names
    /// exactly that approval. A code names the open approval with that code (codes are unique
    /// among open approvals; two would be refused as ambiguous), else the newest one that
    /// had it (so the answer can say it is already resolved).
    pub fn find(&self, key: &ApprovalRef) -> Result<Approval, ApprovalError> {
        self.expire_due()?;
        match key {
            ApprovalRef::Id(id) => self.by_id(id),
            ApprovalRef::Code(code) => self.store.db().with(|c| {
                let mut open: Vec<Approval> = c.query_map(
                    &format!(
                        "SELECT {COLUMNS} FROM approvals WHERE code = ?1 AND status IN ('pending', 'granted') ORDER BY created_ms DESC"
                    ),
                    params![code],
                    row,
                )?;
                if open.len() > 1 {
                    return Err(ApprovalError::AmbiguousCode(open.len(), visible(code)));
                }
                if let Some(a) = open.pop() {
                    return Ok(a);
                }
                c.query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM approvals WHERE code = ?1 ORDER BY created_ms DESC LIMIT 1"
                    ),
                    params![code],
                )?
                .map(|r| row(&r))
                .transpose()?
                .ok_or_else(|| ApprovalError::NotFound(visible(code)))
            }),
        }
    }

    /// The approval still open for exactly this request, if any: waiting for a person
    /// (`pending`) or granted and not yet redeemed (`granted`). A run that comes back to a call
    /// after a restart finds its approval either way, whether the person answered before or
    /// after the run looked (redemption stays single-use and bound to the digest).
    pub fn open_for(&self, request_digest: &[u8; 32]) -> Result<Option<Approval>, ApprovalError> {
        self.expire_due()?;
        self.store
            .db()
            .with(|c| {
                c.query_opt(
                    &format!(
                        "SELECT {COLUMNS} FROM approvals WHERE request_digest = ?1 AND status IN ('pending', 'granted') ORDER BY created_ms DESC LIMIT 1"
                    ),
                    params![request_digest],
                )
            })?
            .map(|r| row(&r))
            .transpose()
    }

    /// Marks every open approval whose time is up as expired (and records it).
    pub fn expire_due(&self) -> Result<usize, ApprovalError> {
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            // Exactly the rows this statement expired (another replica may expire some at
            // the same time: each is recorded by the one that changed it).
            let due: Vec<(String, String)> = tx.query_map(
                "UPDATE approvals SET status = 'expired', resolved_ms = ?1
                 WHERE status IN ('pending', 'granted') AND expires_ms <= ?1 RETURNING id, code",
                params![now],
                |r| Ok::<_, ApprovalError>((r.get(0)?, r.get(1)?)),
            )?;
            if due.is_empty() {
                return Ok(0);
            }
            self.audit(
                RecordInput::new(Kind::Approval, "gateway", "approval.expire", "approvals")
                    .with_outcome("expired")
                    .with_payload(json!({"approvals": due.iter().map(|(id, code)| json!({"id": id, "code": code})).collect::<Vec<_>>()})),
            )?;
            Ok(due.len())
        })
    }

    /// Expires those of `ids` still open (pending, or granted and not redeemed) because the
    /// run `run_id` that asked for them no longer waits (`why`); records it. Returns how many.
    pub fn expire_ids(
        &self,
        ids: &[String],
        run_id: &str,
        why: &str,
    ) -> Result<usize, ApprovalError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            let mut done: Vec<(String, String)> = Vec::new();
            for id in ids {
                let code = tx.query_opt(
                    "UPDATE approvals SET status = 'expired', resolved_ms = ?1
                     WHERE id = ?2 AND status IN ('pending', 'granted') RETURNING code",
                    params![now, id],
                )?;
                if let Some(code) = code {
                    done.push((id.clone(), code.get(0)?));
                }
            }
            if done.is_empty() {
                return Ok(0);
            }
            self.audit(
                RecordInput::new(Kind::Approval, "gateway", "approval.expire", "approvals")
                    .with_outcome("expired")
                    .with_payload(json!({"approvals": done.iter().map(|(id, code)| json!({"id": id, "code": code})).collect::<Vec<_>>(),
                                         "run_id": run_id, "reason": why})),
            )?;
            Ok(done.len())
        })
    }

    /// Approvals, newest first: the open ones, or all with `all`.
    pub fn list(&self, all: bool) -> Result<Vec<Approval>, ApprovalError> {
        self.expire_due()?;
        let filter = if all { "" } else { "WHERE status = 'pending'" };
        self.store.db().with(|c| {
            c.query_map(
                &format!("SELECT {COLUMNS} FROM approvals {filter} ORDER BY created_ms DESC"),
                params![],
                row,
            )
        })
    }

    /// Grants or denies the pending approval named by `code_or_id` (see [`ApprovalRef`],
    /// [`Approvals::find`]) on behalf of `approver` (a user id): exactly that approval, never
    /// another with the same code. Cedar decides whether the approver may (`approval.grant`).
    pub fn resolve(
        &self,
        code_or_id: &str,
        approver: &str,
        grant: bool,
    ) -> Result<Approval, ApprovalError> {
        self.resolve_ref(&ApprovalRef::parse(code_or_id), approver, grant)
    }

    /// [`Approvals::resolve`] of the approval `key` names.
    pub fn resolve_ref(
        &self,
        key: &ApprovalRef,
        approver: &str,
        grant: bool,
    ) -> Result<Approval, ApprovalError> {
        let a = self.find(key)?;
        let code = a.code.clone();
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
        if let Some(who) = &a.required_approver
            && who != approver
        {
            return Err(ApprovalError::WrongApprover {
                approver: visible(approver),
                code,
                why: format!("only {} may resolve it (required_approver)", visible(who)),
            });
        }
        if grant
            && let Some(who) = &a.distinct_from
            && who == approver
        {
            return Err(ApprovalError::WrongApprover {
                approver: visible(approver),
                code,
                why: "it asks for a different approver than the one who started the run (require_different_approver)".into(),
            });
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
                    policy_ids: d.policies.clone(),
                });
            }
        }
        let now = self.clock.now_ms();
        let status = if grant { "granted" } else { "denied" };
        self.store.db().tx(|tx| {
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
            ))
        })?;
        self.by_id(&a.id)
    }

    /// Redeems the granted approval bound to `request_digest`, once. Returns it, or
    /// `NotApproved` when none is granted, unexpired and unused for exactly this request.
    pub fn redeem(&self, request_digest: &[u8; 32]) -> Result<Redeemed, ApprovalError> {
        self.expire_due()?;
        let now = self.clock.now_ms();
        let approval = self.store.db().tx(|tx| {
            // `status = 'granted'` again on the outer row: under PostgreSQL's read committed,
            // a second replica redeeming at the same instant waits for the first and then
            // re-checks only the outer WHERE, which must refuse the row the first one used.
            let id: Option<String> = tx
                .query_opt(
                    "UPDATE approvals SET status = 'used', used_ms = ?1
                     WHERE id = (SELECT id FROM approvals WHERE request_digest = ?2 AND status = 'granted' AND expires_ms > ?1
                                 ORDER BY created_ms LIMIT 1)
                       AND status = 'granted'
                     RETURNING id",
                    params![now, request_digest],
                )?
                .map(|r| r.get(0))
                .transpose()?;
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
            let r = tx.query_row(
                &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
                params![id],
            )?;
            row(&r)
        })?;
        Ok(Redeemed {
            proof: crate::gate::Redeemed::after_redemption(*request_digest),
            approval,
        })
    }
}
