//! The audit and policy endpoints of the API: query (paged), one record, chain verification,
//! export (`audit.read` / `audit.export`); the policies, explain and the shadow report
//! (`policy.read`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chitin_audit::{AuditReader, Record, RecordInput};
use serde_json::{Value, json};

use super::{ApiError, App, Caller, admin, blocking, body_json, params};
use crate::clock::{parse_rfc3339, rfc3339};
use crate::policy::{Action, PolicyRequest};

/// Records read per step while paging backwards.
const CHUNK: i64 = 512;
/// Most records examined for one page (the answer says where to continue).
const MAX_SCAN: usize = 100_000;
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

fn record_json(r: &Record, detail: bool) -> Value {
    let mut v = json!({
        "seq": r.seq,
        "time": rfc3339(r.ts_ms),
        "kind": r.kind,
        "actor": r.actor,
        "action": r.action,
        "resource": r.resource,
        "decision": r.decision,
        "policies": r.policy_ids(),
        "outcome": r.outcome,
        "payload": r.payload_json(),
        "payload_removed": r.removed_reason.as_ref().map(|why| json!({
            "at": r.removed_at_ms.map(rfc3339),
            "reason": why,
        })),
        "hash": chitin_audit::to_hex(&r.hash),
    });
    if detail && let Value::Object(m) = &mut v {
        m.insert(
            "prev_hash".into(),
            json!(chitin_audit::to_hex(&r.prev_hash)),
        );
        m.insert(
            "payload_digest".into(),
            json!(chitin_audit::to_hex(&r.payload_digest)),
        );
    }
    v
}

fn time_param(q: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => parse_rfc3339(v).map(Some).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "`{name}` must be an RFC 3339 time (e.g. 2026-11-21T08:00:00Z)"
            ))
        }),
    }
}

fn reader(app: &App) -> Result<AuditReader, ApiError> {
    Ok(app.gate.audit().reader()?)
}

/// `GET /api/v1/audit?actor=&action=&decision=&outcome=&kind=&since=&until=&before=&limit=`:
/// the newest matching records first, `limit` (default 50, at most 500) per page;
/// `next_before` continues the query.
pub(super) async fn query(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    blocking(app, move |app| {
        let q = params(
            q,
            &[
                "actor", "action", "decision", "outcome", "kind", "since", "until", "before",
                "limit",
            ],
        )?;
        let since = time_param(&q, "since")?;
        let until = time_param(&q, "until")?;
        let limit = match q.get("limit") {
            None => DEFAULT_LIMIT,
            Some(l) => l
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!("`limit` must be between 1 and {MAX_LIMIT}"))
                })?,
        };
        let before = match q.get("before") {
            None => None,
            Some(b) => Some(b.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::BadRequest("`before` must be a record sequence number".into())
            })?),
        };
        let get = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
        let (actor, action, decision, outcome, kind) = (
            get("actor"),
            get("action"),
            get("decision"),
            get("outcome"),
            get("kind"),
        );
        admin(app, &p, Action::AuditRead)?;
        let reader = reader(app)?;
        let Some((head, _)) = reader.head()? else {
            return Ok(json!({"records": [], "next_before": null}));
        };
        let low = match since {
            None => 1,
            Some(_) => match reader.seq_bounds(since, None)? {
                Some((first, _)) => first,
                None => return Ok(json!({"records": [], "next_before": null})),
            },
        };
        let matches = |r: &Record| {
            actor.as_ref().is_none_or(|a| &r.actor == a)
                && action.as_ref().is_none_or(|a| &r.action == a)
                && decision.as_ref().is_none_or(|d| &r.decision == d)
                && outcome
                    .as_ref()
                    .is_none_or(|o| r.outcome.contains(o.as_str()))
                && kind.as_ref().is_none_or(|k| &r.kind == k)
                && since.is_none_or(|s| r.ts_ms >= s)
                && until.is_none_or(|u| r.ts_ms <= u)
        };
        let mut hi = before.map_or(head, |b| b - 1).min(head);
        let (mut out, mut scanned, mut next) = (Vec::new(), 0usize, None);
        'scan: while hi >= low {
            let lo = (hi - CHUNK + 1).max(low);
            for r in reader.range(lo, hi)?.iter().rev() {
                scanned += 1;
                if matches(r) {
                    out.push(record_json(r, false));
                    if out.len() == limit {
                        next = (r.seq > low).then_some(r.seq);
                        break 'scan;
                    }
                }
                if scanned >= MAX_SCAN {
                    next = (r.seq > low).then_some(r.seq);
                    break 'scan;
                }
            }
            hi = lo - 1;
        }
        Ok(json!({"records": out, "next_before": next, "scanned": scanned}))
    })
    .await
}

/// `GET /api/v1/audit/{seq}`: one record with its chain fields.
pub(super) async fn record(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Path(seq): Path<String>,
) -> Response {
    blocking(app, move |app| {
        let seq: i64 = seq.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            ApiError::BadRequest("a record is named by its sequence number".into())
        })?;
        admin(app, &p, Action::AuditRead)?;
        let r = reader(app)?
            .range(seq, seq)?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::NotFound(format!("no audit record {seq}")))?;
        Ok(json!({"record": record_json(&r, true)}))
    })
    .await
}

/// `GET /api/v1/audit/verify`: the whole chain and every checkpoint signature verified now
/// (as `chitin audit verify`), and the last checkpoint.
pub(super) async fn verify(State(app): State<Arc<App>>, Caller(p): Caller) -> Response {
    blocking(app, move |app| {
        admin(app, &p, Action::AuditRead)?;
        let last = reader(app)?.checkpoints()?.into_iter().last().map(|c| {
            json!({"seq": c.seq, "head": c.head, "time": rfc3339(c.time_ms), "key_id": c.key_id})
        });
        // Whichever backend the log is on (PostgreSQL: this gateway's checkpoint file as witness).
        let verdict = app.gate.audit().verify()?;
        Ok(match verdict {
            Ok(r) => json!({
                "ok": true, "summary": r.ok_line(), "records": r.records,
                "head": chitin_audit::to_hex(&r.head), "last_checkpoint": last,
                "uncovered": r.uncovered,
            }),
            Err(t) => json!({
                "ok": false, "summary": t.to_string(), "first_bad_seq": t.seq,
                "last_checkpoint": last,
            }),
        })
    })
    .await
}

/// `GET /api/v1/audit/export?since=&until=&format=jsonl|csv`: the records and the checkpoints
/// that cover them (JSONL verifies offline with `chitin audit verify --export`), as a
/// download. The export itself is recorded and a checkpoint written first.
pub(super) async fn export(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let done = tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, &str), ApiError> {
        let q = params(q, &["since", "until", "format"])?;
        let since = time_param(&q, "since")?;
        let until = time_param(&q, "until")?;
        let (format, ext) = match q.get("format").map(String::as_str) {
            None | Some("jsonl") => (chitin_audit::export::Format::Jsonl, "jsonl"),
            Some("csv") => (chitin_audit::export::Format::Csv, "csv"),
            Some(_) => {
                return Err(ApiError::BadRequest(
                    "`format` must be `jsonl` or `csv`".into(),
                ));
            }
        };
        admin(&app, &p, Action::AuditExport)?;
        let log = app.gate.audit();
        log.append(RecordInput::admin(
            super::user_uid(&p.user),
            "audit.export",
            "audit",
            json!({"since_ms": since, "until_ms": until, "format": ext, "via": "api"}),
        ))
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        log.checkpoint_now()
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let reader = log.reader()?;
        let mut out = Vec::new();
        chitin_audit::export::write_export(
            &reader,
            Some(&log.paths().checkpoints),
            since,
            until,
            format,
            app.clock.now_ms(),
            &mut out,
        )?;
        Ok((out, ext))
    })
    .await;
    match done {
        Ok(Ok((body, ext))) => {
            let ctype = if ext == "csv" {
                "text/csv; charset=utf-8"
            } else {
                "application/jsonl"
            };
            let mut resp = ([(header::CONTENT_TYPE, ctype)], body).into_response();
            if let Ok(v) =
                HeaderValue::from_str(&format!("attachment; filename=\"chitin-audit.{ext}\""))
            {
                resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
            }
            resp
        }
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

// ---- policy --------------------------------------------------------------------------------

/// `GET /api/v1/policy`: the active set (enforced and shadow policies with their `@reason`s
/// and text), where it came from, validation warnings, and the last reload's error.
pub(super) async fn policies(State(app): State<Arc<App>>, Caller(p): Caller) -> Response {
    blocking(app, move |app| {
        admin(app, &p, Action::PolicyRead)?;
        let engine = app.gate.engine();
        let active = engine.active();
        let c = &active.compiled;
        let warnings: Vec<String> = c.warnings().iter().map(ToString::to_string).collect();
        Ok(json!({
            "source": active.source,
            "files": c.files(),
            "enforced": c.enforced_count(),
            "shadow": c.shadow_count(),
            "policies": c.listing(),
            "warnings": warnings,
            "last_reload_error": engine.last_error(),
            "reload_refused": super::super::read(&app.reload_refused),
        }))
    })
    .await
}

/// `POST /api/v1/policy/explain` with a policy request (`{"principal", "action",
/// "resource", "context"}`, entity references in Cedar syntax): [`policy::explain`], the
/// same code and the same JSON as `chitin policy explain --json` (the decision against the
/// active set, the determining and shadow policies with their `@reason`s, evaluation errors,
/// the derived context and, for a request that is not allowed, the single context changes
/// that would allow it). Nothing is enforced or recorded as a decision (the `policy.read`
/// check is).
///
/// [`policy::explain`]: crate::policy::explain::explain
pub(super) async fn explain(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    body: Bytes,
) -> Response {
    blocking(app, move |app| {
        let v = body_json(app, &body)?;
        let req = PolicyRequest::from_json(&v).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        admin(app, &p, Action::PolicyRead)?;
        let x = crate::policy::explain::explain(
            app.gate.engine(),
            &req,
            &crate::policy::explain::ExplainOptions::default(),
        )
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        serde_json::to_value(&x).map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
}

/// `GET /api/v1/policy/shadow?days=N` (default 7, at most 90): decisions where shadow
/// policies would have decided differently, from the audit log, per policy and the latest.
pub(super) async fn shadow(
    State(app): State<Arc<App>>,
    Caller(p): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    blocking(app, move |app| {
        let q = params(q, &["days"])?;
        let days: i64 = match q.get("days") {
            None => 7,
            Some(d) => d
                .parse()
                .ok()
                .filter(|d| (1..=90).contains(d))
                .ok_or_else(|| ApiError::BadRequest("`days` must be between 1 and 90".into()))?,
        };
        admin(app, &p, Action::PolicyRead)?;
        let since = app.clock.now_ms().saturating_sub(days * 86_400_000);
        let recs = reader(app)?.query(&chitin_audit::Query {
            kind: Some("decision".into()),
            since_ms: Some(since),
            ..Default::default()
        })?;
        let mut per: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut latest = Vec::new();
        for r in recs.iter().rev() {
            let would_deny = r.decision == "shadow_deny";
            if !would_deny && r.decision != "shadow_allow" {
                continue;
            }
            for id in r.policy_ids() {
                let e = per.entry(id).or_default();
                if would_deny {
                    e.0 += 1;
                } else {
                    e.1 += 1;
                }
            }
            if latest.len() < 100 {
                latest.push(record_json(r, false));
            }
        }
        let policies: Vec<Value> = per
            .into_iter()
            .map(|(id, (deny, allow))| json!({"id": id, "would_deny": deny, "would_allow": allow}))
            .collect();
        Ok(json!({"days": days, "policies": policies, "latest": latest}))
    })
    .await
}
