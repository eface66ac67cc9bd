//! `POST /v1/chat/completions`: OpenAI-compatible, running the full agent loop.
//!
//! Invariants: the principal is the token's user (never a field of the request); the `user`
//! field only picks the session (`api:<user>`), and only the last user message is new input —
//! earlier messages in the request are not trusted as history (the session's stored
//! transcript is the history).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{App, error_body, read};
use crate::agent::{AgentError, TurnRequest, valid_session};

#[derive(Debug, Deserialize)]
struct Body_ {
    model: String,
    messages: Vec<Msg>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    n: Option<u64>,
}

/// The request fields the gateway honours.
const HONOURED: [&str; 5] = ["model", "messages", "stream", "user", "n"];

/// Fields OpenAI clients commonly send that are accepted and ignored: the gateway's agent
/// decides sampling, limits and tools (client-defined `tools` are not offered to the model).
const IGNORED: [&str; 20] = [
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "metadata",
    "store",
    "reasoning_effort",
    "service_tier",
];

/// The first field of the request that is neither honoured nor knowingly ignored.
fn unknown_field(body: &Value) -> Option<String> {
    body.as_object()?
        .keys()
        .find(|k| !HONOURED.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()))
        .cloned()
}

#[derive(Debug, Deserialize)]
struct Msg {
    role: String,
    #[serde(default)]
    content: Value,
}

fn text_of(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let t: Vec<&str> = parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect();
            (!t.is_empty()).then(|| t.join("\n"))
        }
        _ => None,
    }
}

/// The session for a `user` field: `api:<user>` when it is a valid key, else a digest of it.
pub fn session_for(user: Option<&str>, owner: &str) -> String {
    let u = user.filter(|u| !u.is_empty()).unwrap_or(owner);
    let plain = format!("api:{u}");
    if valid_session(&plain) {
        return plain;
    }
    let d = chitin_audit::to_hex(&sha2_digest(u.as_bytes()));
    format!("api:{}", &d[..32])
}

fn sha2_digest(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

fn bad(code: &str, m: &str) -> Response {
    error_body(StatusCode::BAD_REQUEST, code, m)
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    axum::Extension(who): axum::Extension<super::auth::AuthedUser>,
    req: Request<Body>,
) -> Response {
    let max = read(&app.settings).max_body;
    let Ok(bytes) = axum::body::to_bytes(req.into_body(), max).await else {
        return bad(
            "body_too_large",
            "the request body is larger than [gateway] max_body_kib",
        );
    };
    let raw: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return bad(
                "invalid_request",
                &format!("expected an OpenAI chat completion request: {e}"),
            );
        }
    };
    if let Some(field) = unknown_field(&raw) {
        let field = field
            .chars()
            .take(64)
            .collect::<String>()
            .escape_debug()
            .to_string();
        let msg = format!(
            "unknown field `{field}`; accepted: {}; accepted and ignored: {}",
            HONOURED.join(", "),
            IGNORED.join(", ")
        );
        return bad(
            "invalid_request",
            &super::logging::redact(&app.redactor, &msg),
        );
    }
    let body: Body_ = match serde_json::from_value(raw) {
        Ok(b) => b,
        Err(e) => {
            return bad(
                "invalid_request",
                &format!("expected an OpenAI chat completion request: {e}"),
            );
        }
    };
    if body.n.is_some_and(|n| n != 1) {
        return bad(
            "invalid_request",
            "n must be 1: the agent gives one answer per request",
        );
    }
    if body.model != "chitin" && !body.model.starts_with("chitin:") {
        return bad(
            "model_not_found",
            "model must be \"chitin\" or \"chitin:<agent>\" (the gateway's agent decides which provider model answers)",
        );
    }
    let Some(text) = body
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| text_of(&m.content))
    else {
        return bad(
            "invalid_request",
            "messages must contain a user message with text content",
        );
    };
    let Some(agent) = app.agent.clone() else {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_configured",
            "the agent is not available",
        );
    };
    // The owner names its sessions freely (`user`); anyone else's sessions are theirs alone.
    let session = if who.id() == app.owner {
        session_for(body.user.as_deref(), &app.owner)
    } else {
        let label = body.user.as_deref().unwrap_or("");
        session_for(Some(&format!("{}:{label}", who.id())), who.id())
    };
    let mut events = agent.subscribe();
    let run_id = match agent
        .submit(TurnRequest {
            session: session.clone(),
            user: who.id().to_string(),
            channel: "api".into(),
            text,
            approval_wait: None,
            origin: None,
        })
        .await
    {
        Ok(id) => id,
        Err(
            e @ (AgentError::InvalidMessage
            | AgentError::InvalidSession(_)
            | AgentError::InvalidUser),
        ) => {
            return bad("invalid_request", &e.to_string());
        }
        Err(e) => {
            return error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &e.to_string(),
            );
        }
    };
    let created = app.clock.now_ms() / 1000;
    let id = format!("chatcmpl-{}", run_id.trim_start_matches("run_"));
    let model = body.model.clone();
    if !body.stream {
        let s = match agent.wait(&run_id, Duration::from_secs(24 * 3600)).await {
            Ok(s) => s,
            Err(e) => {
                return error_body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    &e.to_string(),
                );
            }
        };
        if s.status != "completed" {
            return error_body(
                StatusCode::BAD_GATEWAY,
                "run_failed",
                &format!(
                    "the run ended {}: {}",
                    s.status,
                    s.error.unwrap_or_default()
                ),
            );
        }
        let u = &s.usage;
        return (
            StatusCode::OK,
            axum::Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": s.reply.unwrap_or_default()},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": u.input_tokens, "completion_tokens": u.output_tokens,
                          "total_tokens": u.input_tokens + u.output_tokens},
                "chitin": {"run_id": run_id, "session": session, "tool_calls": s.tool_calls},
            })),
        )
            .into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        if tx
            .send(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ))
            .await
            .is_err()
        {
            return;
        }
        loop {
            let e = match events.recv().await {
                Ok(e) => e,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            };
            if e.payload["run_id"].as_str() != Some(run_id.as_str()) {
                continue;
            }
            match e.event {
                "assistant.delta" => {
                    let t = e.payload["text"].as_str().unwrap_or_default();
                    if tx
                        .send(chunk(json!({"content": t}), Value::Null))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                "run.finished" => {
                    let status = e.payload["status"].as_str().unwrap_or("failed").to_string();
                    let last = if status == "completed" {
                        chunk(json!({}), json!("stop"))
                    } else {
                        format!(
                            "data: {}\n\n",
                            json!({"error": {"message": format!("the run ended {status}: {}", e.payload["error"].as_str().unwrap_or("")),
                                             "type": "run_failed"}})
                        )
                    };
                    let _ = tx.send(last).await;
                    let _ = tx.send("data: [DONE]\n\n".into()).await;
                    return;
                }
                _ => {}
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| {
            (
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(s)),
                rx,
            )
        })
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| error_body(StatusCode::INTERNAL_SERVER_ERROR, "internal", "response"))
}

/// The one model OpenAI clients see: the gateway's agent (which provider model answers is
/// the gateway's `[agent] model`, never the client's choice).
fn model_object(app: &App, id: &str) -> Value {
    let cfg = read(&app.config);
    json!({
        "id": id,
        "object": "model",
        "created": app.started_ms / 1000,
        "owned_by": "chitin",
        "chitin": {"agent_model": cfg.agent.model, "fallbacks": cfg.agent.fallbacks},
    })
}

/// `GET /v1/models`: the models `POST /v1/chat/completions` accepts (OpenAI's list format).
pub async fn models(State(app): State<Arc<App>>) -> Response {
    (
        StatusCode::OK,
        axum::Json(json!({"object": "list", "data": [model_object(&app, "chitin")]})),
    )
        .into_response()
}

/// `GET /v1/models/<id>`: one model (`chitin`), or OpenAI's `model_not_found`.
pub async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if id == "chitin" {
        return (StatusCode::OK, axum::Json(model_object(&app, "chitin"))).into_response();
    }
    error_body(
        StatusCode::NOT_FOUND,
        "model_not_found",
        "the only model is \"chitin\" (the gateway's agent decides which provider model answers)",
    )
}
