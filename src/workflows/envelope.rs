//! Lobster's tool envelope: the one JSON object `--json` prints.
//!
//! Success: `{"protocolVersion":1,"ok":true,"status":"ok"|"needs_approval"|"needs_input"|
//! "cancelled","output":[...],"requiresApproval":{...}|null,"requiresInput":{...}|null}`.
//! Failure: `{"protocolVersion":1,"ok":false,"error":{"type":"parse_error"|"runtime_error",
//! "message":"..."}}`, with exit code 2 for a parse error and 1 for a runtime error.

use serde_json::{Value, json};

/// The version of the envelope (Lobster's `protocolVersion`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NeedsApproval,
    NeedsInput,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NeedsApproval => "needs_approval",
            Status::NeedsInput => "needs_input",
            Status::Cancelled => "cancelled",
        }
    }
}

/// The kinds of failure Lobster distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the file cannot be understood (exit 2).
    Parse,
    /// Something failed while running (exit 1).
    Runtime,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Parse => "parse_error",
            ErrorKind::Runtime => "runtime_error",
        }
    }

    /// The process exit code Lobster uses.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Parse => 2,
            ErrorKind::Runtime => 1,
        }
    }
}

/// A success envelope.
pub fn success(
    status: Status,
    output: Vec<Value>,
    requires_approval: Option<Value>,
    requires_input: Option<Value>,
) -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "ok": true,
        "status": status.as_str(),
        "output": output,
        "requiresApproval": requires_approval,
        "requiresInput": requires_input,
    })
}

/// A failure envelope.
pub fn failure(kind: ErrorKind, message: &str) -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSION,
        "ok": false,
        "error": {"type": kind.as_str(), "message": message},
    })
}
