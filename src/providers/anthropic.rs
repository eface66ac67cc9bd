//! The Anthropic Messages API: `POST {base}/v1/messages`.

#[cfg(test)]
use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use super::collect::Collector;
use super::json;
use super::sse::SseEvent;
use std::sync::Arc;

use super::{ChatRequest, Message, StopReason, Wire};

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

/// The request body as JSON, written straight from the request (no JSON tree is built): a
/// message the session's requests share is written once and copied
/// ([`SharedMessage`](super::SharedMessage)), a new one escaped eight bytes at a time
/// ([`super::json`]); the bytes are those `serde_json` wrote for the same request (tested
/// against it).
pub fn request_body(
    model: &str,
    req: &ChatRequest,
    stream: bool,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(json::body_capacity(req));
    out.extend_from_slice(b"{\"model\":");
    json::write_str(&mut out, model);
    json::write_entry(&mut out, "max_tokens", &req.max_tokens)?;
    if let Some(system) = req.system.as_deref() {
        out.extend_from_slice(b",\"system\":");
        json::write_str(&mut out, system);
    }
    out.extend_from_slice(b",\"messages\":[");
    // Consecutive messages of one role are one message (tool results and a user turn): each
    // message's blocks are written once (the later requests of the session copy them) and
    // joined under their role here; a message without blocks is left out.
    let mut open: Option<&str> = None;
    for m in &req.messages {
        // Held by this request alone: written here, never again; otherwise written once per
        // message (the later requests of the session copy it).
        let alone = Arc::strong_count(m) == 1;
        let fresh = if alone {
            blocks_of(m.message())
        } else {
            Vec::new()
        };
        let kept: &[u8] = if alone { &[] } else { m.json(Wire::Anthropic) };
        if fresh.is_empty() && kept.is_empty() {
            continue;
        }
        let role = role_of(m.message());
        if open == Some(role) {
            out.push(b',');
        } else {
            if open.is_some() {
                out.extend_from_slice(b"]},");
            }
            out.extend_from_slice(b"{\"role\":");
            json::write_str(&mut out, role);
            out.extend_from_slice(b",\"content\":[");
            open = Some(role);
        }
        if alone {
            write_blocks(&fresh, &mut out);
        } else {
            out.extend_from_slice(kept);
        }
    }
    if open.is_some() {
        out.extend_from_slice(b"]}");
    }
    out.push(b']');
    if !req.tools.is_empty() {
        json::write_entry(&mut out, "tools", &tools(req))?;
    }
    if let Some(t) = req.temperature {
        json::write_entry(&mut out, "temperature", &t)?;
    }
    out.extend_from_slice(if stream {
        b",\"stream\":true}"
    } else {
        b",\"stream\":false}"
    });
    Ok(out)
}

fn tools(req: &ChatRequest) -> Vec<Tool<'_>> {
    req.tools
        .iter()
        .map(|t| Tool {
            name: &t.name,
            description: &t.description,
            input_schema: &t.input_schema,
        })
        .collect()
}

/// The body as `serde_json` wrote it before [`request_body`] wrote it itself: the reference
/// the tests hold it to.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
pub(super) fn reference_body(model: &str, req: &ChatRequest, stream: bool) -> Vec<u8> {
    serde_json::to_vec(&Body {
        model,
        max_tokens: req.max_tokens,
        system: req.system.as_deref(),
        messages: messages(req),
        tools: tools(req),
        temperature: req.temperature,
        stream,
    })
    .unwrap()
}

#[cfg(test)]
#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    messages: Vec<Msg<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    stream: bool,
}

#[derive(serde::Serialize)]
struct Tool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a Value,
}

/// A message of the request (the tests' reference form; the body is written from each
/// message's blocks, [`request_body`]).
#[cfg(test)]
#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(tag = "type", rename_all = "snake_case"))]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Input<'a>,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: ResultContent<'a>,
        is_error: bool,
    },
}

/// A tool call's arguments: the model's JSON object as it produced it, or `{}` for a
/// malformed call (its tool result says why).
#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(untagged))]
enum Input<'a> {
    Object(&'a RawValue),
    Empty(Empty),
}

#[cfg_attr(test, derive(Serialize))]
struct Empty {}

#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(untagged))]
enum ResultContent<'a> {
    Text(&'a str),
    Parts(Vec<ResultPart<'a>>),
}

#[cfg_attr(test, derive(Serialize))]
#[cfg_attr(test, serde(tag = "type", rename_all = "snake_case"))]
enum ResultPart<'a> {
    Text { text: &'a str },
    Image { source: ImageSource<'a> },
}

#[cfg_attr(test, derive(Serialize))]
struct ImageSource<'a> {
    r#type: &'static str,
    media_type: &'a str,
    data: &'a str,
}

/// One message's content blocks (what [`SharedMessage`](super::SharedMessage) keeps for it;
/// nothing for a message without blocks).
pub(super) fn write_message(m: &Message, out: &mut Vec<u8>) {
    write_blocks(&blocks_of(m), out);
}

/// Content blocks as JSON, comma-separated (without the list's brackets), as `serde_json`
/// writes the derived form.
fn write_blocks(blocks: &[Block<'_>], out: &mut Vec<u8>) {
    for (i, b) in blocks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }

        match b {
            Block::Text { text } => {
                out.extend_from_slice(b"{\"type\":\"text\",\"text\":");
                json::write_str(out, text);
            }
            Block::ToolUse { id, name, input } => {
                out.extend_from_slice(b"{\"type\":\"tool_use\",\"id\":");
                json::write_str(out, id);
                out.extend_from_slice(b",\"name\":");
                json::write_str(out, name);
                out.extend_from_slice(b",\"input\":");
                match input {
                    // Valid JSON (parsed as such), written as the model produced it.
                    Input::Object(raw) => out.extend_from_slice(raw.get().as_bytes()),
                    Input::Empty(Empty {}) => out.extend_from_slice(b"{}"),
                }
            }
            Block::ToolResult {
                tool_use_id,
                content,
                is_error,
            } => {
                out.extend_from_slice(b"{\"type\":\"tool_result\",\"tool_use_id\":");
                json::write_str(out, tool_use_id);
                out.extend_from_slice(b",\"content\":");
                match content {
                    ResultContent::Text(t) => json::write_str(out, t),
                    ResultContent::Parts(parts) => json::write_array(out, parts, |out, p| {
                        match p {
                            ResultPart::Text { text } => {
                                out.extend_from_slice(b"{\"type\":\"text\",\"text\":");
                                json::write_str(out, text);
                            }
                            ResultPart::Image { source } => {
                                out.extend_from_slice(b"{\"type\":\"image\",\"source\":{\"type\":");
                                json::write_str(out, source.r#type);
                                out.extend_from_slice(b",\"media_type\":");
                                json::write_str(out, source.media_type);
                                out.extend_from_slice(b",\"data\":");
                                json::write_str(out, source.data);
                                out.push(b'}');
                            }
                        }
                        out.push(b'}');
                    }),
                }
                out.extend_from_slice(if *is_error {
                    b",\"is_error\":true"
                } else {
                    b",\"is_error\":false"
                });
            }
        }
        out.push(b'}');
    }
}

/// The request's messages as a list (the form `serde_json` serialized before
/// [`request_body`] wrote each message's blocks once: the tests' reference); consecutive
/// messages of one role are merged (tool results and a user turn), a message with nothing
/// to say is left out.
#[cfg(test)]
fn messages(req: &ChatRequest) -> Vec<Msg<'_>> {
    let mut out: Vec<Msg<'_>> = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let (role, blocks) = (role_of(m.message()), blocks_of(m.message()));
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => out.push(Msg {
                role,
                content: blocks,
            }),
        }
    }
    out
}

/// The role a message is sent under (a tool result is the user's).
fn role_of(m: &Message) -> &'static str {
    match m {
        Message::Assistant { .. } => "assistant",
        Message::User { .. } | Message::ToolResult { .. } => "user",
    }
}

/// A message's content blocks (none for an assistant message with neither text nor calls).
/// Depends on the message alone, so they are written once per message.
fn blocks_of(m: &Message) -> Vec<Block<'_>> {
    match m {
        Message::User { text } => vec![Block::Text { text }],
        Message::Assistant { text, tool_calls } => {
            let mut blocks = Vec::with_capacity(tool_calls.len() + 1);
            if !text.is_empty() {
                blocks.push(Block::Text { text });
            }
            for c in tool_calls {
                // A malformed call is replayed with empty input (its tool result says why).
                let input = serde_json::from_str::<&RawValue>(&c.arguments_json)
                    .ok()
                    .filter(|v| v.get().starts_with('{'))
                    .map_or(Input::Empty(Empty {}), Input::Object);
                blocks.push(Block::ToolUse {
                    id: &c.id,
                    name: &c.name,
                    input,
                });
            }
            blocks
        }
        Message::ToolResult {
            tool_use_id,
            content,
            is_error,
            images,
        } => {
            let content = if images.is_empty() {
                ResultContent::Text(content)
            } else {
                let mut parts = vec![ResultPart::Text { text: content }];
                parts.extend(images.iter().map(|i| ResultPart::Image {
                    source: ImageSource {
                        r#type: "base64",
                        media_type: &i.media_type,
                        data: &i.data_base64,
                    },
                }));
                ResultContent::Parts(parts)
            };
            vec![Block::ToolResult {
                tool_use_id,
                content,
                is_error: *is_error,
            }]
        }
    }
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
    use serde_json::json;

    #[test]
    fn the_body_is_byte_for_byte_what_serde_json_wrote_for_every_kind_of_message() {
        use crate::providers::{ImagePart, ToolSpec};
        use std::sync::Arc;
        let odd = "quote \" backslash \\ newline \n tab \t nul \u{0} esc \u{1b} del \u{7f} é 🦀";
        let call = |id: &str, args: &str| ToolCall {
            id: id.into(),
            name: "exec".into(),
            arguments_json: args.into(),
            malformed: None,
        };
        let image = ImagePart {
            media_type: "image/png".into(),
            data_base64: "iVBORw0KGgo=".into(),
        };
        let messages = vec![
            Message::user(odd),
            Message::user("a second user message, merged into the first"),
            Message::Assistant {
                text: String::new(),
                tool_calls: vec![
                    call("c1", r#"{"argv": ["ls", "-l"], "n": 1.5e3}"#),
                    call("c\"2", "not json"),
                    call("c3", "[1, 2]"),
                ],
            },
            Message::ToolResult {
                tool_use_id: "c1".into(),
                content: format!("out: {odd}"),
                is_error: false,
                images: vec![image],
            },
            Message::ToolResult {
                tool_use_id: "c\"2".into(),
                content: "boom".into(),
                is_error: true,
                images: Vec::new(),
            },
            Message::Assistant {
                text: odd.into(),
                tool_calls: vec![call("c4", "{}")],
            },
            Message::Assistant {
                text: String::new(),
                tool_calls: Vec::new(),
            },
            Message::user(""),
        ];
        let mut req = ChatRequest::new(messages, 321);
        for (system, tools, temperature) in [
            (None, false, None),
            (Some(odd.to_string()), true, Some(0.7_f32)),
        ] {
            req.system = system;
            req.temperature = temperature;
            req.tools = if tools {
                vec![Arc::new(ToolSpec {
                    name: "exec".into(),
                    description: odd.into(),
                    input_schema: json!({"type": "object"}),
                })]
            } else {
                Vec::new()
            };
            for stream in [true, false] {
                assert_eq!(
                    String::from_utf8(request_body("claude-\"x", &req, stream).unwrap()).unwrap(),
                    String::from_utf8(reference_body("claude-\"x", &req, stream)).unwrap()
                );
            }
        }
        let empty = ChatRequest::new(Vec::new(), 1);
        assert_eq!(
            request_body("m", &empty, false).unwrap(),
            reference_body("m", &empty, false)
        );
    }

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
        let body: Value = serde_json::from_slice(&request_body("m", &req, false).unwrap()).unwrap();
        assert_eq!(
            body["messages"][2]["content"][0]["content"],
            json!([
                {"type": "text", "text": "<untrusted>note</untrusted>"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
            ])
        );
        // The OpenAI chat format carries it in a user message after the tool messages.
        let body: Value = serde_json::from_slice(
            &crate::providers::openai::request_body("m", &req, false, "max_tokens").unwrap(),
        )
        .unwrap();
        let msgs = body["messages"].as_array().unwrap();
        assert_eq!(msgs[2]["role"], "tool");
        assert_eq!(msgs[3]["role"], "user");
        assert_eq!(
            msgs[3]["content"][1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
        );
    }

    #[test]
    fn the_whole_request_body_is_the_messages_format_and_tool_input_is_the_models_json() {
        let mut req = ChatRequest::new(
            vec![
                Message::user("run it"),
                Message::Assistant {
                    text: "Running.".into(),
                    tool_calls: vec![ToolCall {
                        id: "c1".into(),
                        name: "exec".into(),
                        arguments_json: r#" {"argv": ["ls", "-l"], "cwd": null} "#.into(),
                        malformed: None,
                    }],
                },
                Message::ToolResult {
                    tool_use_id: "c1".into(),
                    content: "a.txt".into(),
                    is_error: false,
                    images: Vec::new(),
                },
            ],
            42,
        );
        req.system = Some("be brief".into());
        req.temperature = Some(0.25);
        req.tools = vec![std::sync::Arc::new(crate::providers::ToolSpec {
            name: "exec".into(),
            description: "run".into(),
            input_schema: json!({"type": "object"}),
        })];
        let body: Value = serde_json::from_slice(&request_body("m1", &req, true).unwrap()).unwrap();
        assert_eq!(
            body,
            json!({
                "model": "m1",
                "max_tokens": 42,
                "system": "be brief",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "run it"}]},
                    {"role": "assistant", "content": [
                        {"type": "text", "text": "Running."},
                        {"type": "tool_use", "id": "c1", "name": "exec",
                         "input": {"argv": ["ls", "-l"], "cwd": null}}]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": "c1", "content": "a.txt",
                         "is_error": false}]}
                ],
                "tools": [{"name": "exec", "description": "run", "input_schema": {"type": "object"}}],
                "temperature": 0.25,
                "stream": true
            })
        );
        // Arguments that are JSON but not an object go back as `{}`.
        let mut odd = req.clone();
        odd.messages[1] = crate::providers::SharedMessage::arc(Message::Assistant {
            text: String::new(),
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "exec".into(),
                arguments_json: "[1, 2]".into(),
                malformed: Some("not an object".into()),
            }],
        });
        let body: Value =
            serde_json::from_slice(&request_body("m1", &odd, false).unwrap()).unwrap();
        assert_eq!(body["messages"][1]["content"][0]["input"], json!({}));
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
        let body: Value = serde_json::from_slice(&request_body("m", &req, true).unwrap()).unwrap();
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
