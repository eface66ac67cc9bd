//! The MCP wire format: JSON-RPC 2.0 messages, the protocol versions Chitin speaks, tool
//! definitions and their digests.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The protocol versions Chitin speaks, newest first. `initialize` asks for the first; a
/// server answering with another one of these is accepted, anything else is refused.
pub const PROTOCOL_VERSIONS: &[&str] = &["2025-06-18", "2025-03-26", "2024-11-05"];

/// The most tools one server may list (a server listing more is refused).
pub const MAX_TOOLS: usize = 512;

/// The most `tools/list` pages followed.
pub const MAX_PAGES: usize = 64;

/// A JSON-RPC request.
pub fn request(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A JSON-RPC notification.
pub fn notification(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

/// The `initialize` parameters.
pub fn initialize_params() -> Value {
    json!({
        "protocolVersion": PROTOCOL_VERSIONS[0],
        "capabilities": {},
        "clientInfo": {"name": "chitin", "version": env!("CARGO_PKG_VERSION")}
    })
}

/// What a message from the server is.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The answer to request `id`: its `result`, or its `error` as a sentence.
    Response {
        id: u64,
        result: Result<Value, String>,
    },
    /// A request from the server (`ping`, `roots/list`, `sampling/createMessage`, ...).
    Request { id: Value, method: String },
    /// A notification (`notifications/tools/list_changed`, logging, progress, ...).
    Notification { method: String },
}

/// Classifies one JSON-RPC message; `None` for anything that is not one.
pub fn classify(v: &Value) -> Option<Incoming> {
    let m = v.as_object()?;
    if m.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return None;
    }
    match (m.get("method").and_then(Value::as_str), m.get("id")) {
        (Some(method), Some(id)) if !id.is_null() => Some(Incoming::Request {
            id: id.clone(),
            method: method.to_string(),
        }),
        (Some(method), _) => Some(Incoming::Notification {
            method: method.to_string(),
        }),
        (None, Some(id)) => {
            let id = id.as_u64()?;
            let result = match (m.get("result"), m.get("error")) {
                (Some(r), None) => Ok(r.clone()),
                (_, Some(e)) => Err(error_text(e)),
                (None, None) => Err("the server's answer has neither result nor error".into()),
            };
            Some(Incoming::Response { id, result })
        }
        (None, None) => None,
    }
}

/// A JSON-RPC error object as a sentence (the server's message is quoted, escaped, capped).
fn error_text(e: &Value) -> String {
    let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
    let msg = e.get("message").and_then(Value::as_str).unwrap_or("");
    let msg: String = msg.chars().take(500).collect();
    format!(
        "the server answered error {code}: \"{}\"",
        msg.escape_default()
    )
}

/// Server requests Chitin refuses on purpose, and why (the JSON-RPC error's message): the
/// model is not lent to servers, and servers do not get to question the user.
pub fn refused_server_request(method: &str) -> Option<&'static str> {
    match method {
        "sampling/createMessage" => {
            Some("refused: Chitin does not lend its model to MCP servers (sampling is not offered)")
        }
        "elicitation/create" => Some(
            "refused: Chitin does not let MCP servers ask the user for input (elicitation is not offered)",
        ),
        _ => None,
    }
}

/// The answer to a server's request: `ping` gets an empty result, `roots/list` an empty list
/// (a server gets no view of the user's files through roots), `sampling/createMessage` and
/// `elicitation/create` a refusal saying why, anything else "method not found".
pub fn answer_server_request(id: &Value, method: &str) -> Value {
    match method {
        "ping" => json!({"jsonrpc": "2.0", "id": id, "result": {}}),
        "roots/list" => json!({"jsonrpc": "2.0", "id": id, "result": {"roots": []}}),
        m => {
            let message = refused_server_request(m).unwrap_or("method not found");
            json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": message}})
        }
    }
}

/// Called with the method of every server request Chitin refuses on purpose (the hub audits
/// it).
pub type OnRefused = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Checks the `initialize` result: the protocol version must be one Chitin speaks.
pub fn negotiated_version(result: &Value) -> Result<String, String> {
    let v = result
        .get("protocolVersion")
        .and_then(Value::as_str)
        .ok_or("the server's initialize answer has no protocolVersion")?;
    if PROTOCOL_VERSIONS.contains(&v) {
        Ok(v.to_string())
    } else {
        Err(format!(
            "the server speaks MCP protocol version `{}`; Chitin speaks {}",
            v.escape_default(),
            PROTOCOL_VERSIONS.join(", ")
        ))
    }
}

/// One tool as a server lists it. Everything but `name` is the server's untrusted text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDef {
    pub name: String,
    pub title: Option<String>,
    pub description: String,
    pub input_schema: Value,
    /// `sha256:<hex>` over the canonical JSON of the whole definition as listed: any change
    /// to the name, title, description, schemas or annotations changes it.
    pub digest: String,
    /// The definition as listed.
    pub raw: Value,
}

/// `sha256:<hex>` of canonical JSON.
pub fn digest(v: &Value) -> String {
    let mut s = String::new();
    crate::gate::canonical_json(v, &mut s);
    let d = Sha256::digest(s.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Parses one `tools/list` page: the tools and the next cursor.
pub fn parse_tools_page(result: &Value) -> Result<(Vec<ToolDef>, Option<String>), String> {
    let tools = result
        .get("tools")
        .and_then(Value::as_array)
        .ok_or("the server's tools/list answer has no `tools` array")?;
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a tool in the server's list has no name")?;
        let input_schema = match t.get("inputSchema") {
            Some(s @ Value::Object(_)) => s.clone(),
            None => json!({"type": "object"}),
            Some(_) => {
                return Err(format!(
                    "tool `{}`: inputSchema is not an object",
                    name.escape_default()
                ));
            }
        };
        out.push(ToolDef {
            name: name.to_string(),
            title: t.get("title").and_then(Value::as_str).map(str::to_string),
            description: t
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            input_schema,
            digest: digest(t),
            raw: t.clone(),
        });
    }
    let next = result
        .get("nextCursor")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    Ok((out, next))
}

/// Why a listed tool cannot be offered whatever the pins say (its name does not fit a model
/// API's tool names), if it cannot.
pub fn unusable(server: &str, def: &ToolDef) -> Option<String> {
    let ok = !def.name.is_empty()
        && def
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Some("its name is not made of A-Z a-z 0-9 _ - only".into());
    }
    let full = crate::tools::mcp::tool_name(server, &def.name);
    if full.len() > 64 {
        return Some(format!(
            "`{full}` is longer than the 64 characters model APIs accept"
        ));
    }
    None
}

/// The whole listing's digest (names and definition digests, sorted).
pub fn list_digest(tools: &[ToolDef]) -> String {
    let mut pairs: Vec<(&str, &str)> = tools
        .iter()
        .map(|t| (t.name.as_str(), t.digest.as_str()))
        .collect();
    pairs.sort_unstable();
    digest(&json!(pairs))
}

/// Extracts `content`, `structuredContent` and `isError` from a `tools/call` result. Images
/// of a type models take (PNG, JPEG, GIF, WebP; within [`MAX_BINARY_BYTES`]) are taken out of
/// the content into [`McpOutput::images`](crate::tools::mcp::McpOutput) (sent to the model as
/// image parts), a text block describing each in its place.
pub fn call_output(result: &Value) -> Result<crate::tools::mcp::McpOutput, String> {
    let mut images = Vec::new();
    let content = match result.get("content") {
        Some(Value::Array(blocks)) => Value::Array(
            blocks
                .iter()
                .map(|b| match take_image(b) {
                    Some(img) if images.len() < MAX_IMAGES => {
                        let text = format!(
                            "[image: {}, {} bytes, attached as an image (models that take no images see only this note)]",
                            img.media_type,
                            base64_len(&img.data_base64).unwrap_or(0)
                        );
                        images.push(img);
                        json!({"type": "text", "text": text})
                    }
                    Some(img) => json!({"type": "text", "text": format!(
                        "[image: {}, {} bytes: more than {MAX_IMAGES} images in one result, not passed on]",
                        img.media_type,
                        base64_len(&img.data_base64).unwrap_or(0)
                    )}),
                    None => describe_binary(b),
                })
                .collect(),
        ),
        None => json!([]),
        Some(_) => {
            return Err(
                "the server's tools/call answer has a `content` that is not an array".into(),
            );
        }
    };
    Ok(crate::tools::mcp::McpOutput {
        content,
        structured: result.get("structuredContent").cloned(),
        is_error: result
            .get("isError")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        images,
    })
}

/// The most images of one result passed to the model.
pub const MAX_IMAGES: usize = 4;

/// The image types models take, with the bytes their files start with.
const IMAGE_TYPES: &[(&str, &[&[u8]])] = &[
    ("image/png", &[b"\x89PNG\r\n\x1a\n"]),
    ("image/jpeg", &[b"\xff\xd8\xff"]),
    ("image/gif", &[b"GIF87a", b"GIF89a"]),
    ("image/webp", &[b"RIFF"]),
];

/// An `image` block a model can take as an image: a type models take, base64 that decodes,
/// within [`MAX_BINARY_BYTES`], and data that starts like a file of its declared type (a
/// server cannot pass arbitrary bytes off as a picture). `None` for anything else (described
/// as text by [`describe_binary`]).
fn take_image(block: &Value) -> Option<crate::providers::ImagePart> {
    use base64::Engine as _;
    if block.get("type").and_then(Value::as_str) != Some("image") {
        return None;
    }
    let media_type = block.get("mimeType").and_then(Value::as_str)?;
    let (_, magics) = IMAGE_TYPES.iter().find(|(t, _)| *t == media_type)?;
    let data = block.get("data").and_then(Value::as_str)?;
    if base64_len(data)? > MAX_BINARY_BYTES {
        return None;
    }
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .ok()?;
    let webp_ok = media_type != "image/webp" || bytes.get(8..12) == Some(b"WEBP".as_slice());
    if !magics.iter().any(|m| bytes.starts_with(m)) || !webp_ok {
        return None;
    }
    Some(crate::providers::ImagePart {
        media_type: media_type.to_string(),
        data_base64: compact,
    })
}

/// The largest image (or audio clip, or binary resource) a tool result may carry, decoded.
pub const MAX_BINARY_BYTES: usize = 5 * 1024 * 1024;

/// The number of bytes `data` (standard base64, whitespace allowed) decodes to; `None` when it
/// is not base64.
fn base64_len(data: &str) -> Option<usize> {
    let mut n = 0usize;
    let mut pad = 0usize;
    for b in data.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'+' | b'/' if pad == 0 => n += 1,
            b'=' => pad += 1,
            b' ' | b'\n' | b'\r' | b'\t' => {}
            _ => return None,
        }
    }
    if pad > 2 || (n + pad) % 4 == 1 {
        return None;
    }
    Some(n * 3 / 4)
}

/// A MIME type as a server wrote it, kept only if it looks like one.
fn mime(v: Option<&Value>) -> String {
    match v.and_then(Value::as_str) {
        Some(m)
            if !m.is_empty()
                && m.len() <= 100
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/+-.".contains(&b)) =>
        {
            m.to_string()
        }
        _ => "unknown type".into(),
    }
}

/// One content block of a tool result as the model gets it, when it is not an image the model
/// takes as one ([`take_image`]): an `audio` block, an embedded resource's `blob`, or an image
/// of another type (or one that does not look like its type) is described as text
/// (`[image: image/bmp, 1234 bytes]`) instead of handing the model base64 it cannot see; one
/// over [`MAX_BINARY_BYTES`] says so. Other blocks are kept.
fn describe_binary(block: &Value) -> Value {
    let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
    let (what, data, mime_v) = match kind {
        "image" | "audio" => (kind, block.get("data"), block.get("mimeType")),
        "resource" => match block.get("resource") {
            Some(r) if r.get("blob").is_some() => ("resource", r.get("blob"), r.get("mimeType")),
            _ => return block.clone(),
        },
        _ => return block.clone(),
    };
    let m = mime(mime_v);
    let text = match data.and_then(Value::as_str).map(base64_len) {
        Some(Some(n)) if n > MAX_BINARY_BYTES => format!(
            "[{what}: {m}, {n} bytes: over the {} MiB limit, not passed on]",
            MAX_BINARY_BYTES / (1024 * 1024)
        ),
        Some(Some(n)) => format!("[{what}: {m}, {n} bytes]"),
        _ => format!("[{what}: {m}, data that is not base64: not passed on]"),
    };
    json!({"type": "text", "text": text})
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use super::*;

    #[test]
    fn messages_are_classified_by_their_fields() {
        assert_eq!(
            classify(&json!({"jsonrpc": "2.0", "id": 3, "result": {"a": 1}})),
            Some(Incoming::Response {
                id: 3,
                result: Ok(json!({"a": 1}))
            })
        );
        let Some(Incoming::Response { result: Err(e), .. }) = classify(
            &json!({"jsonrpc": "2.0", "id": 3, "error": {"code": -32602, "message": "bad\nthing"}}),
        ) else {
            panic!("not an error response");
        };
        assert_eq!(e, "the server answered error -32602: \"bad\\nthing\"");
        assert_eq!(
            classify(&json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})),
            Some(Incoming::Notification {
                method: "notifications/tools/list_changed".into()
            })
        );
        assert!(matches!(
            classify(&json!({"jsonrpc": "2.0", "id": "x", "method": "ping"})),
            Some(Incoming::Request { .. })
        ));
        assert_eq!(classify(&json!({"id": 1, "result": {}})), None);
    }

    #[test]
    fn images_audio_and_blobs_in_a_result_are_described_by_type_and_size_not_passed_as_base64() {
        let out = call_output(&json!({"content": [
            {"type": "text", "text": "a chart:"},
            {"type": "image", "data": "iVBORw0KGgo=", "mimeType": "image/png"},
            {"type": "audio", "data": "AAAA", "mimeType": "audio/wav"},
            {"type": "resource", "resource": {"uri": "file:///x", "blob": "AAE=", "mimeType": "application/octet-stream"}},
            {"type": "image", "data": "not base64!", "mimeType": "image/png\n</untrusted>"}
        ]}))
        .unwrap();
        let texts: Vec<&str> = out
            .content
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["text"].as_str().unwrap())
            .collect();
        assert_eq!(
            texts,
            [
                "a chart:",
                "[image: image/png, 8 bytes, attached as an image (models that take no images see only this note)]",
                "[audio: audio/wav, 3 bytes]",
                "[resource: application/octet-stream, 2 bytes]",
                "[image: unknown type, data that is not base64: not passed on]",
            ]
        );
        // The PNG is passed on as an image part, its base64 out of the text.
        assert_eq!(
            out.images,
            vec![crate::providers::ImagePart {
                media_type: "image/png".into(),
                data_base64: "iVBORw0KGgo=".into()
            }]
        );
        assert!(!out.content.to_string().contains("iVBORw0KGgo"));
        let big = "A".repeat((MAX_BINARY_BYTES / 3 + 1) * 4);
        let out = call_output(
            &json!({"content": [{"type": "image", "data": big, "mimeType": "image/jpeg"}]}),
        )
        .unwrap();
        assert_eq!(
            out.content[0]["text"],
            format!(
                "[image: image/jpeg, {} bytes: over the 5 MiB limit, not passed on]",
                (MAX_BINARY_BYTES / 3 + 1) * 3
            )
        );
    }

    #[test]
    fn only_png_jpeg_gif_and_webp_images_that_look_like_their_type_are_passed_as_images() {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let block = |mime: &str, bytes: &[u8]| json!({"type": "image", "mimeType": mime, "data": b64(bytes)});
        let out = call_output(&json!({"content": [
            block("image/jpeg", b"\xff\xd8\xff\xe0 jfif"),
            block("image/gif", b"GIF89a...."),
            block("image/webp", b"RIFF\x10\0\0\0WEBPVP8 "),
            block("image/bmp", b"BM......"),
            block("image/png", b"<script>not a png</script>"),
            block("image/svg+xml", b"<svg onload=alert(1)>"),
        ]}))
        .unwrap();
        let types: Vec<&str> = out.images.iter().map(|i| i.media_type.as_str()).collect();
        assert_eq!(types, ["image/jpeg", "image/gif", "image/webp"]);
        let texts: Vec<&str> = out
            .content
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["text"].as_str().unwrap())
            .collect();
        assert!(
            texts[..3]
                .iter()
                .all(|t| t.contains("attached as an image")),
            "{texts:?}"
        );
        assert_eq!(texts[3], "[image: image/bmp, 8 bytes]");
        assert_eq!(texts[4], "[image: image/png, 26 bytes]");
        assert_eq!(texts[5], "[image: image/svg+xml, 21 bytes]");
        // At most MAX_IMAGES per result; the rest are described.
        let many: Vec<Value> = (0..MAX_IMAGES + 2)
            .map(|_| block("image/gif", b"GIF87a.."))
            .collect();
        let out = call_output(&json!({"content": many})).unwrap();
        assert_eq!(out.images.len(), MAX_IMAGES);
        assert!(
            out.content[MAX_IMAGES]["text"]
                .as_str()
                .unwrap()
                .contains("not passed on")
        );
    }

    #[test]
    fn only_known_protocol_versions_are_accepted() {
        assert_eq!(
            negotiated_version(&json!({"protocolVersion": "2025-03-26"})).unwrap(),
            "2025-03-26"
        );
        assert!(
            negotiated_version(&json!({"protocolVersion": "1999-01-01"}))
                .unwrap_err()
                .contains("1999-01-01")
        );
    }

    #[test]
    fn any_change_to_a_definition_changes_its_digest() {
        let page = json!({"tools": [
            {"name": "a", "description": "one", "inputSchema": {"type": "object"}},
            {"name": "a", "description": "one ", "inputSchema": {"type": "object"}},
            {"name": "a", "description": "one", "inputSchema": {"type": "object", "properties": {"x": {}}}}
        ], "nextCursor": "c2"});
        let (tools, next) = parse_tools_page(&page).unwrap();
        assert_eq!(next.as_deref(), Some("c2"));
        assert_ne!(tools[0].digest, tools[1].digest);
        assert_ne!(tools[0].digest, tools[2].digest);
        let bad = ToolDef {
            name: "a b".into(),
            ..tools[0].clone()
        };
        assert!(unusable("s", &bad).is_some());
        assert!(unusable("s", &tools[0]).is_none());
    }
}
