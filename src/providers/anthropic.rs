//! The Anthropic Messages API: `POST {base}/v1/messages`.

use serde_json::{Map, Value, json};

use super::collect::Collector;
use super::sse::SseEvent;
use super::{ChatRequest, Message, StopReason};

/// The API version header value.
pub const API_VERSION: &str = "2023-06-01";

/// Why decoding stopped.
#[derive(Debug)]
pub enum DecodeError {
    /// The server sent something that is not the protocol.
    Protocol(String),
    /// The server reported an error in the stream.
    Upstream { kind: String, message: String },
}

/// The request body.
pub fn request_body(model: &str, req: &ChatRequest, stream: bool) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    let mut push = |role: &str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        // Consecutive messages of one role are merged (tool results + a user turn).
        if let Some(last) = messages.last_mut()
            && last.get("role").and_then(Value::as_str) == Some(role)
            && let Some(Value::Array(content)) = last.get_mut("content")
        {
            content.extend(blocks);
            return;
        }
        messages.push(json!({"role": role, "content": blocks}));
    };
    for m in &req.messages {
        match &**m {
            Message::User { text } => push("user", vec![json!({"type": "text", "text": text})]),
            Message::Assistant { text, tool_calls } => {
                let mut blocks = Vec::new();
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
                for c in tool_calls {
                    // A malformed call is replayed with empty input (its tool result says why).
                    let input = serde_json::from_str::<Value>(&c.arguments_json)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}));
                    blocks.push(
                        json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input}),
                    );
                }
                push("assistant", blocks);
            }
            Message::ToolResult {
                tool_use_id,
                content,
                is_error,
                images,
            } => {
                let content = if images.is_empty() {
                    json!(content)
                } else {
                    let mut parts = vec![json!({"type": "text", "text": content})];
                    parts.extend(images.iter().map(|i| {
                        json!({"type": "image", "source": {"type": "base64",
                               "media_type": i.media_type, "data": i.data_base64}})
                    }));
                    Value::Array(parts)
                };
                push(
                    "user",
                    vec![json!({
                        "type": "tool_result", "tool_use_id": tool_use_id,
                        "content": content, "is_error": is_error,
                    })],
                );
            }
        }
    }
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("max_tokens".into(), json!(req.max_tokens));
    if let Some(s) = &req.system {
        body.insert("system".into(), json!(s));
    }
    body.insert("messages".into(), Value::Array(messages));
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.input_schema}))
            .collect();
        body.insert("tools".into(), Value::Array(tools));
    }
    if let Some(t) = req.temperature {
        body.insert("temperature".into(), json!(t));
    }
    body.insert("stream".into(), json!(stream));
    Value::Object(body)
}

fn u(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// Input tokens including prompt-cache reads and writes (all of them are billed).
fn input_tokens(usage: &Value) -> Option<u64> {
    let base = u(usage, "input_tokens")?;
    Some(
        base.saturating_add(u(usage, "cache_creation_input_tokens").unwrap_or(0))
            .saturating_add(u(usage, "cache_read_input_tokens").unwrap_or(0)),
    )
}

fn upstream_error(v: &Value) -> DecodeError {
    let e = v.get("error").unwrap_or(v);
    DecodeError::Upstream {
        kind: e
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_string(),
        message: e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    }
}

/// The streaming decoder.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    /// `message_stop` was seen.
    pub finished: bool,
}

impl StreamDecoder {
    pub fn on_event(&mut self, ev: &SseEvent, col: &mut Collector<'_>) -> Result<(), DecodeError> {
        let v: Value = serde_json::from_str(&ev.data)
            .map_err(|e| DecodeError::Protocol(format!("an event is not JSON: {e}")))?;
        let ty = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(ev.event.as_str());
        let index = || {
            v.get("index")
                .and_then(Value::as_u64)
                .ok_or_else(|| DecodeError::Protocol(format!("`{ty}` without an index")))
        };
        match ty {
            "message_start" => {
                if let Some(usage) = v.get("message").and_then(|m| m.get("usage")) {
                    col.usage(input_tokens(usage), u(usage, "output_tokens"));
                }
            }
            "content_block_start" => {
                let i = index()?;
                let block = v.get("content_block").unwrap_or(&Value::Null);
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        col.text(block.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    Some("tool_use") => {
                        let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                        let id = block.get("id").and_then(Value::as_str);
                        col.call_start(i, id, name).map_err(DecodeError::Protocol)?;
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let i = index()?;
                let delta = v.get("delta").unwrap_or(&Value::Null);
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => {
                        col.text(delta.get("text").and_then(Value::as_str).unwrap_or(""));
                    }
                    Some("input_json_delta") => {
                        let part = delta
                            .get("partial_json")
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        col.call_delta(i, part).map_err(DecodeError::Protocol)?;
                    }
                    _ => {}
                }
            }
            "content_block_stop" => {
                let i = index()?;
                if col.has_call(i) {
                    col.call_done(i);
                }
            }
            "message_delta" => {
                if let Some(r) = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    col.stop(StopReason::from_anthropic(r));
                }
                if let Some(usage) = v.get("usage") {
                    col.usage(input_tokens(usage), u(usage, "output_tokens"));
                }
            }
            "message_stop" => self.finished = true,
            "error" => return Err(upstream_error(&v)),
            // ping, thinking blocks and future event types.
            _ => {}
        }
        Ok(())
    }
}

/// Decodes a whole (non-streaming) response.
pub fn decode_whole(body: &[u8], col: &mut Collector<'_>) -> Result<(), DecodeError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| DecodeError::Protocol(format!("the response is not JSON: {e}")))?;
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return Err(upstream_error(&v));
    }
    if let Some(usage) = v.get("usage") {
        col.usage(input_tokens(usage), u(usage, "output_tokens"));
    }
    let content = v
        .get("content")
        .and_then(Value::as_array)
        .ok_or_else(|| DecodeError::Protocol("the response has no `content` array".into()))?;
    for (i, block) in (0u64..).zip(content) {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => col.text(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => {
                let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                let id = block.get("id").and_then(Value::as_str);
                col.call_start(i, id, name).map_err(DecodeError::Protocol)?;
                let args = block.get("input").map(Value::to_string).unwrap_or_default();
                col.call_delta(i, &args).map_err(DecodeError::Protocol)?;
                col.call_done(i);
            }
            _ => {}
        }
    }
    if let Some(r) = v.get("stop_reason").and_then(Value::as_str) {
        col.stop(StopReason::from_anthropic(r));
    }
    Ok(())
}

/// The message of an error response body (`{"type":"error","error":{"type","message"}}`).
pub fn error_message(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let e = v.get("error")?;
    let ty = e.get("type").and_then(Value::as_str).unwrap_or("error");
    let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
    Some(format!("{ty}: {msg}"))
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
    use crate::providers::ToolCall;

    #[test]
    fn a_screenshot_is_sent_as_an_image_block_inside_its_tool_result() {
        let req = ChatRequest::new(
            vec![
                Message::user("look"),
                Message::Assistant {
                    text: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "browser".into(),
                        arguments_json: "{\"action\":\"screenshot\"}".into(),
                        malformed: None,
                    }],
                },
                Message::ToolResult {
                    tool_use_id: "c1".into(),
                    content: "<untrusted>note</untrusted>".into(),
                    is_error: false,
                    images: vec![crate::providers::ImagePart {
                        media_type: "image/png".into(),
                        data_base64: "iVBORw0KGgo=".into(),
                    }],
                },
            ],
            10,
        );
        let body = request_body("m", &req, false);
        assert_eq!(
            body["messages"][2]["content"][0]["content"],
            json!([
                {"type": "text", "text": "<untrusted>note</untrusted>"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
            ])
        );
        // The OpenAI chat format carries it in a user message after the tool messages.
        let body = crate::providers::openai::request_body("m", &req, false, "max_tokens");
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs[2]["role"], "tool");
        assert_eq!(msgs[3]["role"], "user");
        assert_eq!(
            msgs[3]["content"][1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
        );
    }

    #[test]
    fn a_malformed_call_is_replayed_with_empty_input_and_turns_of_one_role_are_merged() {
        let req = ChatRequest::new(
            vec![
                Message::user("go"),
                Message::Assistant {
                    text: String::new(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "exec".into(),
                        arguments_json: "{\"argv\": [".into(),
                        malformed: Some("not valid JSON".into()),
                    }],
                },
                Message::ToolResult {
                    tool_use_id: "c1".into(),
                    content: "malformed arguments, not run".into(),
                    is_error: true,
                    images: Vec::new(),
                },
                Message::user("try again"),
                Message::Assistant {
                    text: String::new(),
                    tool_calls: vec![],
                },
            ],
            10,
        );
        let body = request_body("m", &req, true);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "go"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "c1", "name": "exec", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "c1",
                     "content": "malformed arguments, not run", "is_error": true},
                    {"type": "text", "text": "try again"}]}
            ])
        );
        assert!(body.get("tools").is_none());
        assert!(body.get("system").is_none());
    }
}
