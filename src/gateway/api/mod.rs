//! The Control UI's JSON API under `/api/v1/` (issue #17), documented in `docs/protocol.md`.
//!
//! Invariants:
//! - Every endpoint learns who asks from ONE function, [`principal`] (today: the gateway
//!   token, whose principal is the configured owner); nothing is decided for "the token".
//! - Every endpoint is decided by Cedar through the gate (so every decision is audited) before
//!   anything is read or changed: `session.read` (per session, and per owner for lists),
//!   `approval.grant` (through `approvals`), `audit.read` / `audit.export`, `usage.read`,
//!   `policy.read`, `pairing.approve`, `health.read`. A refusal is 403 with the determining
//!   policies' ids; no credential is 401.
//! - Blocking work (SQLite, the audit log, decryption) runs on blocking threads.
//! - Answers are data: the pages render every text with `textContent`.

mod audit;
mod pages;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts as ReqParts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{App, Client};
use crate::approvals::{ApprovalError, ApprovalRef};
use crate::clock::rfc3339;
use crate::gate::{GateError, Verdict};
use crate::policy::{Action, Outcome, PolicyRequest};

/// Errors of the API, each answered with a status and `{"error": {"code", "message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("policy denied `{action}` for {principal}; ask an owner to change the policies")]
    Denied {
        action: Action,
        principal: String,
        policies: Vec<String>,
    },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("the audit log is unavailable, so nothing can be decided: {0}")]
    Unavailable(String),
    #[error("{0}")]
    NotConfigured(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code) = match &self {
            Self::Denied {
                action, policies, ..
            } => {
                return (
                    StatusCode::FORBIDDEN,
                    axum::Json(json!({"error": {
                        "code": "policy_denied",
                        "message": message,
                        "action": action.as_str(),
                        "policies": policies,
                    }})),
                )
                    .into_response();
            }
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable"),
            Self::NotConfigured(_) => (StatusCode::NOT_FOUND, "not_configured"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        super::error_body(status, code, &message)
    }
}

impl From<GateError> for ApiError {
    fn from(e: GateError) -> Self {
        match e {
            GateError::AuditUnavailable(m) => Self::Unavailable(m),
            GateError::InvalidRequest(m) => Self::BadRequest(m),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<crate::agent::transcripts::TranscriptError> for ApiError {
    fn from(e: crate::agent::transcripts::TranscriptError) -> Self {
        use crate::agent::transcripts::TranscriptError as T;
        match e {
            T::NoSession(k) => {
                Self::NotFound(format!("no session `{}`", crate::approvals::visible(&k)))
            }
            T::NoRun(r) => Self::NotFound(format!("no run `{}`", crate::approvals::visible(&r))),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<chitin_audit::AuditError> for ApiError {
    fn from(e: chitin_audit::AuditError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<crate::accounts::AccountsError> for ApiError {
    fn from(e: crate::accounts::AccountsError) -> Self {
        use crate::accounts::AccountsError as A;
        let msg = e.to_string();
        match e {
            A::Denied {
                action,
                principal,
                policies,
            } => Self::Denied {
                action,
                principal,
                policies,
            },
            A::UnknownDevice(_) | A::UnknownUser(_) | A::UnknownToken(_) => Self::NotFound(msg),
            A::DeviceState { .. } => Self::Conflict(msg),
            A::InvalidUser(_) | A::InvalidGroup(_) | A::InvalidName | A::InvalidExpiry(_) => {
                Self::BadRequest(msg)
            }
            A::DefinedInFile(_) => Self::Conflict(msg),
            A::Audit(m) | A::Gate(GateError::AuditUnavailable(m)) => Self::Unavailable(m),
            _ => Self::Internal(msg),
        }
    }
}

impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        let msg = e.to_string();
        match e {
            ApprovalError::ApproverRefused {
                approver,
                policy_ids,
                ..
            } => Self::Denied {
                action: Action::ApprovalGrant,
                principal: user_uid(&approver),
                policies: policy_ids,
            },
            ApprovalError::WrongApprover { .. } => Self::Denied {
                action: Action::ApprovalGrant,
                principal: msg,
                policies: Vec::new(),
            },
            ApprovalError::NotFound(_) | ApprovalError::UnknownId(_) => Self::NotFound(msg),
            ApprovalError::NotPending { .. }
            | ApprovalError::Expired(_)
            | ApprovalError::AmbiguousCode(..)
            | ApprovalError::NotApproved => Self::Conflict(msg),
            ApprovalError::Audit(m) | ApprovalError::Gate(GateError::AuditUnavailable(m)) => {
                Self::Unavailable(m)
            }
            _ => Self::Internal(msg),
        }
    }
}

/// The authenticated user a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The Cedar `User` id.
    pub user: String,
    /// Everything authentication established (groups, how it authenticated).
    pub authed: super::auth::AuthedUser,
}

/// THE way the API learns who asks (one function, so a new authentication path changes only
/// this): the gateway's authentication (`login::authenticate`): the gateway token (the
/// owner), a per-user API token (its user), a browser session cookie (with `X-CSRF-Token` on
/// any method but GET/HEAD/OPTIONS; an unapproved device is 403 `device_pending`) or a
/// trusted identity proxy's signed token (reads only). A missing, malformed or wrong
/// credential is 401 (or 429 past the failure allowance), counted and audited as every failed
/// authentication is.
pub(super) async fn principal(
    app: &Arc<App>,
    method: &axum::http::Method,
    headers: &HeaderMap,
    client: IpAddr,
) -> Result<Principal, Box<Response>> {
    let authed = super::login::authenticate(app, client, method, headers).await?;
    Ok(Principal {
        user: authed.id().to_string(),
        authed,
    })
}

/// The extractor every endpoint takes: the request's [`Principal`], or the refusal.
pub(super) struct Caller(pub Principal);

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut ReqParts, app: &Arc<App>) -> Result<Self, Response> {
        let client = parts
            .extensions
            .get::<Client>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0);
        principal(app, &parts.method, &parts.headers, client)
            .await
            .map(Caller)
            .map_err(|r| *r)
    }
}

/// `Chitin::User::"<id>"`, quoted as the gate quotes principals.
fn user_uid(id: &str) -> String {
    format!("Chitin::User::{}", Value::String(id.to_string()))
}

/// Decides `req` through the gate (recorded); `Err(Denied)` with the determining policies
/// unless Cedar allows it.
fn decide(app: &App, action: Action, req: &PolicyRequest) -> Result<(), ApiError> {
    match app.gate.check(req)? {
        Verdict::Allowed(..) => Ok(()),
        other => Err(ApiError::Denied {
            action,
            principal: req.principal.to_string(),
            policies: other.decision().policies.clone(),
        }),
    }
}

/// An administrative action on `Chitin::Gateway::"gateway"` for `p`.
fn admin(app: &App, p: &Principal, action: Action) -> Result<(), ApiError> {
    let req = crate::gate::admin_request(&p.user, action, serde_json::Map::new())?;
    decide(app, action, &req)
}

/// The `session.read` request of session `key` (`*`: the list of `owner`'s sessions) for `p`.
fn session_read(
    p: &Principal,
    key: &str,
    owner: &str,
    channel: &str,
) -> Result<PolicyRequest, ApiError> {
    PolicyRequest::from_json(&json!({
        "principal": user_uid(&p.user),
        "action": "Chitin::Action::\"session.read\"",
        "resource": format!("Chitin::Session::{}", Value::String(key.to_string())),
        "context": {
            "origin": "control",
            "session": "",
            "approved": false,
            "tainted": false,
            "op": if key == "*" { "list" } else { "read" },
            "owner": {"__entity": {"type": "Chitin::User", "id": owner}},
            "channel": channel,
        },
    }))
    .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// `session.read` of session `key` for `p` (one decision, recorded).
fn may_read_session(
    app: &App,
    p: &Principal,
    key: &str,
    owner: &str,
    channel: &str,
) -> Result<(), ApiError> {
    decide(
        app,
        Action::SessionRead,
        &session_read(p, key, owner, channel)?,
    )
}

/// The owners whose sessions `p` may read, and how many others there were: one
/// `session.read` decision per owner on `Chitin::Session::"*"`, `p`'s own first (a refusal
/// there refuses the whole list), all recorded as ONE audit record for the request
/// ([`crate::gate::Gate::check_listing`]).
fn readable_owners<'a>(
    app: &App,
    p: &Principal,
    owners: impl Iterator<Item = &'a str>,
) -> Result<(BTreeSet<String>, usize), ApiError> {
    let others: Vec<&str> = owners
        .filter(|o| *o != p.user)
        .collect::<BTreeSet<&str>>()
        .into_iter()
        .collect();
    let mut reqs = vec![session_read(p, "*", &p.user, "*")?];
    for o in &others {
        reqs.push(session_read(p, "*", o, "*")?);
    }
    let decisions = app.gate.check_listing(&reqs)?;
    let mut verdicts = decisions.iter().map(|d| d.decision == Outcome::Allow);
    if verdicts.next() != Some(true) {
        return Err(ApiError::Denied {
            action: Action::SessionRead,
            principal: user_uid(&p.user),
            policies: decisions
                .first()
                .map(|d| d.policies.clone())
                .unwrap_or_default(),
        });
    }
    let mut ok = BTreeSet::from([p.user.clone()]);
    let mut hidden = 0;
    for (owner, allowed) in others.iter().zip(verdicts) {
        if allowed {
            ok.insert((*owner).to_string());
        } else {
            hidden += 1;
        }
    }
    Ok((ok, hidden))
}

/// Runs `f` on a blocking thread and answers its JSON (200) or its error.
async fn blocking(
    app: Arc<App>,
    f: impl FnOnce(&App) -> Result<Value, ApiError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(move || f(&app)).await {
        Ok(Ok(v)) => axum::Json(v).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::Internal(format!("the request's task failed: {e}")).into_response(),
    }
}

/// Query parameters, refusing any that the endpoint does not know (a typo is an error, not a
/// silently ignored filter).
fn params(q: HashMap<String, String>, known: &[&str]) -> Result<HashMap<String, String>, ApiError> {
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown query parameter `{}`; this endpoint takes {}",
            crate::approvals::visible(k),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(q)
}

/// A JSON body (at most `[gateway] max_body_kib`), as a value.
fn body_json(app: &App, body: &Bytes) -> Result<Value, ApiError> {
    let max = super::read(&app.settings).max_body;
    if body.len() > max {
        return Err(ApiError::BadRequest(format!(
            "the request body is larger than {} KiB ([gateway] max_body_kib)",
            max / 1024
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("not valid JSON: {e}")))
}

/// When this API was set up (the gateway's start), unix ms.
static STARTED_MS: OnceLock<i64> = OnceLock::new();

/// `/api/v1/*` and the Control UI's page (`/control`).
pub(super) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let _ = STARTED_MS.set(app.clock.now_ms());
    Router::new()
        .route("/api/v1/sessions", get(sessions))
        .route("/api/v1/sessions/{key}", get(session))
        .route("/api/v1/approvals", get(approvals))
        .route("/api/v1/approvals/{id}", get(approval))
        .route("/api/v1/approvals/{id}/resolve", post(resolve_approval))
        .route("/api/v1/audit", get(audit::query))
        .route("/api/v1/audit/verify", get(audit::verify))
        .route("/api/v1/audit/export", get(audit::export))
        .route("/api/v1/audit/{seq}", get(audit::record))
        .route("/api/v1/usage", get(usage))
        .route("/api/v1/policy", get(audit::policies))
        .route("/api/v1/policy/explain", post(audit::explain))
        .route("/api/v1/policy/shadow", get(audit::shadow))
        .route("/api/v1/pairing", get(pairing))
        .route("/api/v1/pairing/{code}/resolve", post(resolve_pairing))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}/resolve", post(resolve_device))
        .route("/api/v1/health", get(health))
        .merge(pages::routes())
}

// ---- sessions ------------------------------------------------------------------------------

fn transcripts(app: &App) -> Result<crate::agent::Transcripts, ApiError> {
    app.agent
        .as_ref()
        .map(|a| a.transcripts().clone())
        .ok_or_else(|| ApiError::NotConfigured("the agent is not running in this gateway".into()))
}

fn session_json(s: &crate::agent::transcripts::SessionRow, spend: f64) -> Value {
    json!({
        "key": s.key, "user": s.user, "channel": s.channel,
        "created_at": rfc3339(s.created_ms), "last_activity": rfc3339(s.updated_ms),
        "tainted": s.tainted, "messages": s.messages, "runs": s.runs, "spend_usd": spend,
    })
}

/// Sessions per page unless `limit` says otherwise, and at most.
const SESSIONS_PAGE: usize = 50;
const SESSIONS_MAX_PAGE: usize = 500;

/// The position after session `s` in the list's order (most recent activity first, then
/// key), as the opaque `cursor` of the next page.
fn session_cursor(s: &crate::agent::transcripts::SessionRow) -> String {
    crate::accounts::b64url(format!("{}:{}", s.updated_ms, s.key).as_bytes())
}

fn parse_cursor(c: &str) -> Result<(i64, String), ApiError> {
    use base64::Engine;
    let bad = || {
        ApiError::BadRequest(
            "`cursor` must be the `next` of an earlier answer of this endpoint".into(),
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, key) = text.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, key.to_string()))
}

/// `GET /api/v1/sessions[?user=U][&limit=N][&cursor=C]`: the sessions the caller may read,
/// most recent activity first, `limit` (default 50, at most 500) per page; `next` (or
/// `null` at the end) is the `cursor` of the following page. One audit record per request.
async fn sessions(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    blocking(app, move |app| {
        let q = params(q, &["user", "limit", "cursor"])?;
        let limit = match q.get("limit") {
            None => SESSIONS_PAGE,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=SESSIONS_MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "`limit` must be between 1 and {SESSIONS_MAX_PAGE}"
                    ))
                })?,
        };
        let after = q.get("cursor").map(|c| parse_cursor(c)).transpose()?;
        let t = transcripts(app)?;
        let all = t.sessions(q.get("user").map(String::as_str))?;
        let (owners, hidden) = readable_owners(app, &p, all.iter().map(|s| s.user.as_str()))?;
        // The store's order: updated_ms descending, then key ascending.
        let mut visible = all
            .iter()
            .filter(|s| owners.contains(&s.user))
            .filter(|s| {
                after.as_ref().is_none_or(|(ms, key)| {
                    s.updated_ms < *ms || (s.updated_ms == *ms && s.key.as_str() > key.as_str())
                })
            })
            .peekable();
        let page: Vec<_> = visible.by_ref().take(limit).collect();
        let next = match (visible.peek(), page.last()) {
            (Some(_), Some(last)) => Some(session_cursor(last)),
            _ => None,
        };
        let spend = crate::agent::usage::spend_by_session(&app.store)?;
        let list: Vec<Value> = page
            .iter()
            .map(|s| session_json(s, spend.get(&s.key).copied().unwrap_or(0.0)))
            .collect();
        Ok(json!({"sessions": list, "hidden_owners": hidden, "next": next}))
    })
    .await
}

/// `GET /api/v1/sessions/{key}`: one session's transcript (decrypted), its runs with their
/// tool calls and decisions, and the approvals opened in it.
async fn session(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(key): Path<String>,
) -> Response {
    blocking(app, move |app| {
        let t = transcripts(app)?;
        let s = t.session(&key)?;
        may_read_session(app, &p, &s.key, &s.user, &s.channel)?;
        let msgs = t.messages_after(&key, 0)?;
        let runs = t.session_runs(&key)?;
        let spend = crate::agent::usage::spend_by_session(&app.store)?;
        let messages: Vec<Value> = msgs
            .iter()
            .map(|e| {
                json!({"seq": e.seq, "run_id": e.run_id, "at": rfc3339(e.created_ms),
                       "message": e.message})
            })
            .collect();
        let runs: Vec<Value> = runs.iter().map(|r| run_json(r, &msgs)).collect();
        let approvals: Vec<Value> = app
            .approvals
            .list(true)?
            .iter()
            .filter(|a| a.session == key && a.requester == s.user)
            .map(|a| a.to_json(false))
            .collect();
        Ok(json!({
            "session": session_json(&s, spend.get(&s.key).copied().unwrap_or(0.0)),
            "messages": messages, "runs": runs, "approvals": approvals,
        }))
    })
    .await
}

/// A run with its task, cost, tokens and its tool calls (what the model asked, what the gate
/// decided, the outcome).
fn run_json(
    r: &crate::agent::transcripts::RunRow,
    msgs: &[crate::agent::transcripts::Entry],
) -> Value {
    use crate::agent::Stored;
    let mine = msgs
        .iter()
        .filter(|e| e.run_id.as_deref() == Some(r.id.as_str()));
    let mut calls: Vec<Value> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for e in mine {
        match &e.message {
            Stored::Assistant { tool_calls, .. } => {
                for c in tool_calls {
                    index.insert(c.id.clone(), calls.len());
                    calls.push(json!({
                        "id": c.id, "tool": c.name, "arguments": c.arguments_json,
                        "malformed": c.malformed, "at": rfc3339(e.created_ms),
                        "decision": Value::Null, "outcome": Value::Null,
                    }));
                }
            }
            Stored::Tool(t) => {
                let crate::agent::StoredTool {
                    tool_use_id,
                    tool,
                    decision,
                    outcome,
                    is_error,
                    ..
                } = &**t;
                let slot = match index.get(tool_use_id) {
                    Some(i) => *i,
                    None => {
                        calls.push(json!({"id": tool_use_id, "tool": tool}));
                        calls.len() - 1
                    }
                };
                if let Some(Value::Object(m)) = calls.get_mut(slot) {
                    m.insert("decision".into(), json!(decision));
                    m.insert("outcome".into(), json!(outcome));
                    m.insert("is_error".into(), json!(is_error));
                }
            }
            Stored::User { .. } => {}
        }
    }
    json!({
        "id": r.id, "status": r.status,
        "task": crate::agent::usage::Task::of_origin(r.origin.as_deref()),
        "origin": r.origin, "created_at": rfc3339(r.created_ms),
        "finished_at": r.finished_ms.map(rfc3339), "steps": r.steps, "model": r.model,
        "input_tokens": r.input_tokens, "output_tokens": r.output_tokens,
        "cost_usd": r.cost_usd, "approval_id": r.approval_id, "error": r.error,
        "tool_calls": calls,
    })
}

// ---- approvals -----------------------------------------------------------------------------

/// `GET /api/v1/approvals?status=pending|all`: approvals of the sessions the caller may read
/// (`session.read` per requester), newest first, large values abbreviated.
async fn approvals(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    blocking(app, move |app| {
        let q = params(q, &["status"])?;
        let all = match q.get("status").map(String::as_str) {
            None | Some("pending") => false,
            Some("all") => true,
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "status must be `pending` or `all`, not `{}`",
                    crate::approvals::visible(other)
                )));
            }
        };
        let list = app.approvals.list(all)?;
        let (owners, hidden) = readable_owners(app, &p, list.iter().map(|a| a.requester.as_str()))?;
        let out: Vec<Value> = list
            .iter()
            .filter(|a| owners.contains(&a.requester))
            .map(|a| a.to_json(false))
            .collect();
        Ok(json!({"approvals": out, "hidden_owners": hidden}))
    })
    .await
}

fn approval_id(id: &str) -> Result<String, ApiError> {
    match ApprovalRef::parse(id) {
        ApprovalRef::Id(i) => Ok(i),
        ApprovalRef::Code(_) => Err(ApiError::BadRequest(
            "an approval is named by its id (32 hex digits) here; `GET /api/v1/approvals` lists them"
                .into(),
        )),
    }
}

/// `GET /api/v1/approvals/{id}`: everything the approval binds, every value in full.
async fn approval(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(id): Path<String>,
) -> Response {
    blocking(app, move |app| {
        let id = approval_id(&id)?;
        let a = app.approvals.get(&id)?;
        may_read_session(app, &p, &a.session, &a.requester, "*")?;
        let mut v = a.to_json(true);
        if let Value::Object(m) = &mut v {
            m.insert("arguments".into(), a.args.clone());
            m.insert("required_approver".into(), json!(a.required_approver));
            m.insert("distinct_from".into(), json!(a.distinct_from));
        }
        Ok(json!({ "approval": v }))
    })
    .await
}

/// `POST /api/v1/approvals/{id}/resolve` `{"decision": "approve"|"deny"}`: the same path as
/// every other place (Cedar `approval.grant`, audited, single use).
async fn resolve_approval(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    blocking(app, move |app| {
        let id = approval_id(&id)?;
        let grant = decision_of(&body_json(app, &body)?, &["decision"])?;
        let a = app.approvals.resolve_ref(&ApprovalRef::Id(id), &p.user, grant)?;
        tracing::info!(approval = %a.id, granted = grant, by = %p.user, "approval resolved from the control API");
        let mut v = a.to_json(false);
        if let Value::Object(m) = &mut v {
            m.insert("granted".into(), json!(grant));
        }
        Ok(json!({ "approval": v }))
    })
    .await
}

/// `{"decision": "approve"|"deny", ...}` with only the `known` keys.
fn decision_of(v: &Value, known: &[&str]) -> Result<bool, ApiError> {
    let m = v
        .as_object()
        .ok_or_else(|| ApiError::BadRequest("the body must be a JSON object".into()))?;
    if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(ApiError::BadRequest(format!(
            "unknown field `{}`; expected {}",
            crate::approvals::visible(k),
            known.join(", ")
        )));
    }
    match m.get("decision").and_then(Value::as_str) {
        Some("approve") => Ok(true),
        Some("deny") => Ok(false),
        _ => Err(ApiError::BadRequest(
            "`decision` must be \"approve\" or \"deny\"".into(),
        )),
    }
}

// ---- usage ---------------------------------------------------------------------------------

/// `GET /api/v1/usage?by=user|model|session|day|tool|task&since=D`.
async fn usage(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    blocking(app, move |app| {
        let q = params(q, &["by", "since"])?;
        let by = match q.get("by") {
            None => crate::agent::usage::UsageBy::User,
            Some(b) => crate::agent::usage::UsageBy::parse(b).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "by must be {}",
                    crate::agent::usage::UsageBy::NAMES
                ))
            })?,
        };
        let now = app.clock.now_ms();
        let since = match q.get("since") {
            None => None,
            Some(s) => Some(
                crate::agent::usage::parse_since(s, now)
                    .ok_or_else(|| ApiError::BadRequest(crate::agent::usage::SINCE_HELP.into()))?,
            ),
        };
        admin(app, &p, Action::UsageRead)?;
        let budgets = super::read(&app.config).budgets;
        let r = crate::agent::usage::report(&app.store, by, since, now, &budgets)?;
        Ok(crate::agent::usage::report_json(&r))
    })
    .await
}

// ---- pairing and channels ------------------------------------------------------------------

/// `GET /api/v1/pairing`: open pairing requests, each channel's connection state and the
/// browsers (devices) of the Control UI with their status (`pairing.approve`, decided once).
async fn pairing(State(app): State<Arc<App>>, Caller(p): Caller) -> Response {
    blocking(app, move |app| {
        let devices = device_list(app, &p)?;
        let Some(engine) = app.ws.pairing_engine() else {
            return Ok(json!({"requests": [], "channels": [], "devices": devices}));
        };
        let requests = engine
            .pairing_list()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let names: Vec<String> = super::read(&app.config)
            .channels
            .iter()
            .map(|c| c.name.clone())
            .collect();
        let mut channels = Vec::new();
        for n in &names {
            let s = engine
                .status(n)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            channels.push(json!({
                "channel": s.channel, "kind": s.kind, "connected": s.connected,
                "connection_error": s.connection_error,
                "connected_since": s.connected_since_ms.map(rfc3339),
                "reported_at": s.reported_ms.map(rfc3339),
                "last_event_at": s.last_event_ms.map(rfc3339),
                "pending_pairings": s.pending_pairings, "queued": s.queued,
                "failed": s.failed, "dead": s.dead, "lag_ms": s.lag_ms,
            }));
        }
        Ok(json!({"requests": requests, "channels": channels, "devices": devices}))
    })
    .await
}

fn device_json(d: &crate::accounts::DeviceInfo) -> Value {
    json!({
        "id": d.id, "user": d.user, "status": d.status, "client": d.client,
        "user_agent": d.user_agent, "created_at": rfc3339(d.created_ms),
        "decided_at": d.decided_ms.map(rfc3339), "decided_by": d.decided_by,
    })
}

/// Every device, pending ones first, then newest first (`pairing.approve`, decided by
/// `accounts` for the caller).
fn device_list(app: &App, p: &Principal) -> Result<Vec<Value>, ApiError> {
    let mut list = app.accounts.list_devices(&p.user)?;
    list.sort_by(|a, b| {
        (b.status == "pending")
            .cmp(&(a.status == "pending"))
            .then(b.created_ms.cmp(&a.created_ms))
            .then(a.id.cmp(&b.id))
    });
    Ok(list.iter().map(device_json).collect())
}

/// `GET /api/v1/devices`: the browsers registered for the Control UI (`pairing.approve`).
async fn devices(State(app): State<Arc<App>>, Caller(p): Caller) -> Response {
    blocking(app, move |app| {
        Ok(json!({"devices": device_list(app, &p)?}))
    })
    .await
}

/// `POST /api/v1/devices/{id}/resolve` `{"decision": "approve"|"deny"}`: approves a pending
/// device, or denies it (a pending or an approved device is revoked, and its sessions end).
/// The same path as `chitin devices approve|revoke` and the chat command (Cedar
/// `pairing.approve`, audited before it commits).
async fn resolve_device(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    blocking(app, move |app| {
        let approve = decision_of(&body_json(app, &body)?, &["decision"])?;
        let d = app.accounts.decide_device(&p.user, &id, approve)?;
        tracing::info!(device = %d.id, approved = approve, by = %p.user, "device decided from the control API");
        Ok(json!({ "device": device_json(&d) }))
    })
    .await
}

/// `POST /api/v1/pairing/{code}/resolve` `{"decision": "approve"|"deny", "user"?: U}`.
async fn resolve_pairing(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(code): Path<String>,
    body: Bytes,
) -> Response {
    blocking(app, move |app| {
        let v = body_json(app, &body)?;
        let approve = decision_of(&v, &["decision", "user"])?;
        let target = match v.get("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) if approve && !u.trim().is_empty() => Some(u.clone()),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "`user` is a user id, and only for decision \"approve\"".into(),
                ));
            }
        };
        admin(app, &p, Action::PairingApprove)?;
        let engine = app.ws.pairing_engine().ok_or_else(|| {
            ApiError::NotConfigured("no chat channels are configured ([[channels]])".into())
        })?;
        let r = if approve {
            let target = target.unwrap_or_else(|| p.user.clone());
            engine.pairing_approve(&code, &p.user, &target)
        } else {
            engine.pairing_deny(&code, &p.user)
        };
        match r {
            Ok(req) => Ok(json!({ "request": req })),
            Err(e) => {
                use crate::channels::ChannelsError as C;
                let msg = e.to_string();
                Err(match e {
                    C::PairingNotFound(_) => ApiError::NotFound(msg),
                    C::UnknownUser(_) => ApiError::BadRequest(msg),
                    C::PairingExpired(_) | C::PairingNotPending { .. } => ApiError::Conflict(msg),
                    C::PairingRefused { .. } => ApiError::Denied {
                        action: Action::PairingApprove,
                        principal: user_uid(&p.user),
                        policies: Vec::new(),
                    },
                    _ => ApiError::Internal(msg),
                })
            }
        }
    })
    .await
}

// ---- health --------------------------------------------------------------------------------

/// `GET /api/v1/health`: the `/ready` checks with details, version, uptime, the sandbox, and
/// the backup and retention schedules (`health.read`).
async fn health(State(app): State<Arc<App>>, Caller(p): Caller) -> Response {
    blocking(app, move |app| {
        admin(app, &p, Action::HealthRead)?;
        let list = super::checks(app);
        let ready = list
            .iter()
            .filter(|(name, _)| *name != super::CHANNELS_CHECK)
            .all(|(_, (ok, _))| *ok);
        let mut checks = BTreeMap::new();
        for (name, (ok, detail)) in list {
            checks.insert(
                name,
                json!({"ok": ok, "detail": super::logging::redact(&app.redactor, &detail)}),
            );
        }
        let now = app.clock.now_ms();
        let started = STARTED_MS.get().copied().unwrap_or(now);
        let cfg = super::read(&app.config);
        let meta = |k: &str| -> Option<i64> {
            app.store
                .meta(k)
                .ok()
                .flatten()
                .and_then(|v| v.parse().ok())
        };
        let retention_last = meta("retention.last_run_ms");
        let interval_ms = i64::try_from(cfg.retention.interval_minutes)
            .unwrap_or(i64::MAX)
            .saturating_mul(60_000);
        let lag = (interval_ms > 0).then(|| {
            now.saturating_sub(retention_last.unwrap_or(0))
                .saturating_sub(interval_ms)
                .max(0)
        });
        let backup_last = meta("backup.last_run_ms");
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": rfc3339(started),
            "uptime_secs": now.saturating_sub(started).max(0) / 1000,
            "ready": ready,
            "checks": checks,
            "sandbox": {"enforced": app.sandbox_check.0, "detail": app.sandbox_check.1},
            "retention": {
                "interval_minutes": cfg.retention.interval_minutes,
                "last_run": retention_last.map(rfc3339),
                "lag_ms": lag,
            },
            "backup": {
                "configured": !cfg.backup.dir.is_empty(),
                "interval_hours": cfg.backup.interval_hours,
                "last_run": backup_last.map(rfc3339),
            },
        }))
    })
    .await
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
    fn a_resolve_body_takes_exactly_a_known_decision() {
        assert!(decision_of(&json!({"decision": "approve"}), &["decision"]).unwrap());
        assert!(!decision_of(&json!({"decision": "deny"}), &["decision"]).unwrap());
        for bad in [
            json!({"decision": "Approve"}),
            json!({"decision": true}),
            json!({}),
            json!({"decision": "approve", "approved": true}),
            json!(["approve"]),
        ] {
            assert!(
                matches!(
                    decision_of(&bad, &["decision"]),
                    Err(ApiError::BadRequest(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_unknown_query_parameter_is_refused_not_ignored() {
        let q = HashMap::from([("acter".to_string(), "x".to_string())]);
        let Err(ApiError::BadRequest(m)) = params(q, &["actor"]) else {
            panic!("accepted an unknown parameter");
        };
        assert!(m.contains("`acter`") && m.contains("actor"), "{m}");
        let ok = HashMap::from([("actor".to_string(), "x".to_string())]);
        assert!(params(ok, &["actor"]).is_ok());
    }

    #[test]
    fn an_approval_is_named_by_its_id_never_by_a_code() {
        assert_eq!(
            approval_id("0123456789ABCDEF0123456789abcdef").unwrap(),
            "0123456789abcdef0123456789abcdef"
        );
        assert!(matches!(
            approval_id("K7QX2M"),
            Err(ApiError::BadRequest(_))
        ));
    }

    #[test]
    fn a_refusal_is_403_with_the_action_and_the_policy_ids() {
        let r = ApiError::Denied {
            action: Action::SessionRead,
            principal: user_uid("bob"),
            policies: vec!["p1".into(), "p2".into()],
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(r.into_body(), 1 << 16))
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "policy_denied");
        assert_eq!(v["error"]["action"], "session.read");
        assert_eq!(v["error"]["policies"], json!(["p1", "p2"]));
        assert_eq!(
            v["error"]["message"],
            "policy denied `session.read` for Chitin::User::\"bob\"; ask an owner to change the policies"
        );
    }
}
