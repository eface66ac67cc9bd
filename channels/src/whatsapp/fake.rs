//! A fake WhatsApp Cloud API (Graph API) on 127.0.0.1 for tests, speaking the real wire format
//! (`Authorization: Bearer <token>`, JSON bodies, Graph errors
//! `{"error":{"message","type","code","error_data":{"details"},"fbtrace_id"}}`), and builders
//! of the webhook notifications Meta would post, signed with the app secret.
//!
//! Served (under any `/vNN.N` version prefix, as [`FakeWhatsApp::api_base`] gives it):
//! - `GET /<phone number id>?fields=...`: the business number (`id`, `display_phone_number`,
//!   `verified_name`); an unknown id is Graph error 100;
//! - `POST /<phone number id>/messages`: `text` and `interactive` (`button`) messages, checked
//!   as WhatsApp checks them (`messaging_product`, body lengths 4096 / 1024, 1-3 reply buttons,
//!   titles of at most 20 characters, ids of at most 256 and unique), answered
//!   `{"messaging_product","contacts":[{"input","wa_id"}],"messages":[{"id":"wamid..."}]}`.
//!   A message to a user whose 24-hour window is closed is accepted (as the real API does) but
//!   not delivered: its `failed` status with error 131047 is waiting in
//!   [`FakeWhatsApp::status_notification`];
//! - `GET /<media id>?phone_number_id=...`: `{url, mime_type, sha256, file_size, id}` of a file
//!   stored with [`FakeWhatsApp::put_media`], whose `url` (`/media-download/...` on this
//!   server) serves the bytes to the same bearer token.
//!
//! A wrong or missing token is `401` with Graph error 190. Failures of the next calls are
//! scripted with [`FakeWhatsApp::fail_next`] (`"send"`, `"phone"`, `"media"`, `"download"`).
//!
//! Notifications: [`FakeWhatsApp::notification`] builds a `messages` notification from
//! [`Incoming`] messages (fresh wamids, contacts, metadata for this number; it opens each
//! sender's 24-hour window), [`Notification::headers`] signs it. [`handshake_query`] builds the
//! verification request's query.
//!
//! Not modelled: templates, media upload, read receipts, typing indicators, message statuses
//! other than the ones the test builds.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use hyper::body::Incoming as HyperBody;
use hyper::header::AUTHORIZATION;
use hyper::{Request, StatusCode};
use reqwest::Url;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{SIGNATURE_HEADER, encode_hex, signature};
use crate::fake_http::{self, Answered, Reply, Script, Server, lock};

/// The business phone number's id the fake serves.
pub const PHONE_NUMBER_ID: &str = "106540352242922";
/// Its display number.
pub const DISPLAY_NUMBER: &str = "+1 555-078-3881";
/// The WhatsApp Business Account id in notifications.
pub const WABA_ID: &str = "102290129340398";
/// The access token the fake accepts.
pub const ACCESS_TOKEN: &str = "EAAFakeAccessTokenForTestsOnly0123456789ZZ";
/// The app secret notifications are signed with.
pub const APP_SECRET: &str = "fake-app-secret-0123456789abcdef";
/// The verify token of the handshake.
pub const VERIFY_TOKEN: &str = "fake-verify-token-42";

/// A WhatsApp user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub wa_id: String,
    pub name: String,
}

impl FakeUser {
    pub fn new(wa_id: &str, name: &str) -> Self {
        Self {
            wa_id: wa_id.into(),
            name: name.into(),
        }
    }
}

/// A message from a user, to put in a notification.
#[derive(Debug, Clone)]
pub struct Incoming {
    from: FakeUser,
    kind: String,
    content: Value,
    context: Option<String>,
}

impl Incoming {
    /// A `text` message.
    pub fn text(from: &FakeUser, body: &str) -> Self {
        Self::of_type(from, "text", json!({ "body": body }))
    }

    /// An `image` with an optional caption.
    pub fn image(from: &FakeUser, media_id: &str, caption: Option<&str>) -> Self {
        let mut media = json!({ "id": media_id, "mime_type": "image/jpeg", "sha256": "aGFzaA==" });
        if let Some(c) = caption {
            media["caption"] = c.into();
        }
        Self::of_type(from, "image", media)
    }

    /// A `document` with its file name and an optional caption.
    pub fn document(
        from: &FakeUser,
        media_id: &str,
        filename: &str,
        mime: &str,
        caption: Option<&str>,
    ) -> Self {
        let mut media = json!({ "id": media_id, "mime_type": mime, "sha256": "aGFzaA==", "filename": filename });
        if let Some(c) = caption {
            media["caption"] = c.into();
        }
        Self::of_type(from, "document", media)
    }

    /// An `audio` message (a voice note when `voice`).
    pub fn audio(from: &FakeUser, media_id: &str, voice: bool) -> Self {
        Self::of_type(
            from,
            "audio",
            json!({ "id": media_id, "mime_type": "audio/ogg; codecs=opus", "sha256": "aGFzaA==", "voice": voice }),
        )
    }

    /// A press of the reply button `id` under the bot's message `message_wamid`.
    pub fn button_reply(from: &FakeUser, message_wamid: &str, id: &str, title: &str) -> Self {
        Self::of_type(
            from,
            "interactive",
            json!({ "type": "button_reply", "button_reply": { "id": id, "title": title } }),
        )
        .reply_to(message_wamid)
    }

    /// A template quick-reply button press.
    pub fn quick_reply(from: &FakeUser, message_wamid: &str, payload: &str, text: &str) -> Self {
        Self::of_type(from, "button", json!({ "payload": payload, "text": text }))
            .reply_to(message_wamid)
    }

    /// A reaction to `message_wamid` (an empty emoji removes it).
    pub fn reaction(from: &FakeUser, message_wamid: &str, emoji: &str) -> Self {
        let mut r = json!({ "message_id": message_wamid });
        if !emoji.is_empty() {
            r["emoji"] = emoji.into();
        }
        Self::of_type(from, "reaction", r)
    }

    /// Any type with its content object (`location`, `contacts`, `unsupported`, ...).
    pub fn of_type(from: &FakeUser, kind: &str, content: Value) -> Self {
        Self {
            from: from.clone(),
            kind: kind.into(),
            content,
            context: None,
        }
    }

    /// A reply to `wamid` (`context`).
    pub fn reply_to(mut self, wamid: &str) -> Self {
        self.context = Some(wamid.into());
        self
    }

    fn build(&self, wamid: &str) -> Value {
        let mut m = json!({
            "from": self.from.wa_id,
            "id": wamid,
            "timestamp": now().to_string(),
            "type": self.kind,
        });
        m[self.kind.as_str()] = self.content.clone();
        if let Some(c) = &self.context {
            m["context"] = json!({ "from": PHONE_DISPLAY_DIGITS, "id": c });
        }
        m
    }
}

const PHONE_DISPLAY_DIGITS: &str = "15550783881";

/// A notification body ready to post, and the wamids of its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub body: Vec<u8>,
    pub wamids: Vec<String>,
}

impl Notification {
    /// The headers Meta sends with it (signed with [`APP_SECRET`]).
    pub fn headers(&self) -> Vec<(String, String)> {
        self.headers_signed_with(APP_SECRET)
    }

    pub fn headers_signed_with(&self, app_secret: &str) -> Vec<(String, String)> {
        vec![
            ("content-type".into(), "application/json".into()),
            (
                SIGNATURE_HEADER.to_ascii_lowercase(),
                signature(app_secret.as_bytes(), &self.body),
            ),
        ]
    }
}

/// The body of a `messages` notification for `phone_number_id`.
pub fn notification_json(
    phone_number_id: &str,
    contacts: &[FakeUser],
    messages: Vec<Value>,
    statuses: Vec<Value>,
) -> Value {
    let mut value = json!({
        "messaging_product": "whatsapp",
        "metadata": { "display_phone_number": PHONE_DISPLAY_DIGITS, "phone_number_id": phone_number_id },
    });
    if !contacts.is_empty() {
        value["contacts"] = contacts
            .iter()
            .map(|u| json!({ "profile": { "name": u.name }, "wa_id": u.wa_id }))
            .collect();
    }
    if !messages.is_empty() {
        value["messages"] = messages.into();
    }
    if !statuses.is_empty() {
        value["statuses"] = statuses.into();
    }
    json!({
        "object": "whatsapp_business_account",
        "entry": [ { "id": WABA_ID, "changes": [ { "value": value, "field": "messages" } ] } ],
    })
}

/// A `statuses[]` item (with an error when `error_code` is set).
pub fn status_json(wamid: &str, recipient: &str, status: &str, error_code: Option<i64>) -> Value {
    let mut s = json!({
        "id": wamid,
        "status": status,
        "timestamp": now().to_string(),
        "recipient_id": recipient,
    });
    if let Some(code) = error_code {
        let (title, details) = match code {
            131_047 => (
                "Re-engagement message",
                "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
            ),
            131_026 => ("Message undeliverable", "Unable to deliver message."),
            _ => ("Error", "Something went wrong."),
        };
        s["errors"] = json!([{
            "code": code,
            "title": title,
            "message": title,
            "error_data": { "details": details },
            "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
        }]);
    }
    s
}

/// The query of a verification request (`hub.mode`, `hub.verify_token`, `hub.challenge`).
pub fn handshake_query(mode: &str, verify_token: &str, challenge: &str) -> String {
    let mut url = match Url::parse("https://example.invalid/") {
        Ok(u) => u,
        Err(_) => return String::new(),
    };
    url.query_pairs_mut()
        .append_pair("hub.mode", mode)
        .append_pair("hub.challenge", challenge)
        .append_pair("hub.verify_token", verify_token);
    url.query().unwrap_or_default().to_owned()
}

/// A failure of the next call(s) of a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A Graph API error answer.
    Graph {
        http: u16,
        code: i64,
        message: String,
        details: String,
        is_transient: bool,
    },
    /// 502 with an HTML body, as a front proxy answers.
    BadGateway,
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is accepted), then the connection is closed without
    /// an answer.
    DropAfterHandling,
}

impl Failure {
    fn graph(http: u16, code: i64, message: &str, details: &str) -> Self {
        Self::Graph {
            http,
            code,
            message: message.into(),
            details: details.into(),
            is_transient: false,
        }
    }

    /// 131047, answered synchronously (the real API usually reports it in a status).
    pub fn reengagement() -> Self {
        Self::graph(
            400,
            131_047,
            "(#131047) Re-engagement message",
            "Message failed to send because more than 24 hours have passed since the customer last replied to this number.",
        )
    }

    /// 130429: Cloud API throughput reached.
    pub fn throughput() -> Self {
        Self::graph(
            400,
            130_429,
            "(#130429) Rate limit hit",
            "Message failed to send because there were too many messages sent from this phone number in a short period of time",
        )
    }

    /// 131056: too many messages to the same user.
    pub fn pair_rate_limit() -> Self {
        Self::graph(
            400,
            131_056,
            "(#131056) (Business Account, Consumer Account) pair rate limit hit",
            "Message failed to send because there were too many messages sent from this phone number to the same phone number in a short period of time",
        )
    }

    /// HTTP 429, code 4: the app's call limit.
    pub fn too_many_calls() -> Self {
        Self::graph(429, 4, "(#4) Application request limit reached", "")
    }

    /// 401, code 190: the token expired.
    pub fn expired_token() -> Self {
        Self::graph(
            401,
            190,
            "Error validating access token: Session has expired.",
            "",
        )
    }

    /// 500, code 1 (transient).
    pub fn server_error() -> Self {
        Self::Graph {
            http: 500,
            code: 1,
            message: "An unknown error has occurred.".into(),
            details: String::new(),
            is_transient: true,
        }
    }
}

/// A message the bot sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub wamid: String,
    pub to: String,
    /// `text` or `interactive`.
    pub kind: String,
    /// The text body, or the interactive body text.
    pub text: String,
    /// `text.preview_url` as sent.
    pub preview_url: Option<bool>,
    /// The reply buttons: (id, title).
    pub buttons: Vec<(String, String)>,
    /// `context.message_id`.
    pub context: Option<String>,
    /// False when the user's 24-hour window was closed (a failed status is waiting).
    pub delivered: bool,
    pub params: Value,
}

/// One request with the right token (failed or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `phone`, `send`, `media` or `download`.
    pub method: String,
    /// The path and query, without the version prefix.
    pub path: String,
    pub params: Value,
}

struct Media {
    mime: String,
    bytes: Vec<u8>,
    url: Option<String>,
}

#[derive(Default)]
struct State {
    next_wamid: u64,
    windows: HashSet<String>,
    sent: Vec<SentMessage>,
    calls: Vec<Call>,
    /// Scripted outcomes of the next calls per method (`None`: handled normally).
    failures: Script<String, Option<Failure>>,
    media: HashMap<String, Media>,
    downloads: Vec<String>,
    /// Failed statuses waiting to be posted (wamid → recipient).
    failed: Vec<(String, String)>,
}

impl State {
    fn wamid(&mut self) -> String {
        let n = self.next_wamid;
        self.next_wamid += 1;
        format!("wamid.HBgLMTU1NTAxMDAFAKE{n:08}")
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeWhatsApp {
    server: Server<State>,
}

impl fmt::Debug for FakeWhatsApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.server.debug("FakeWhatsApp", f)
    }
}

impl FakeWhatsApp {
    /// Starts a fake on a free port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Self> {
        let listener = fake_http::bind("/v26.0").await?;
        let addr = listener.addr;
        let state = State {
            next_wamid: 1,
            ..State::default()
        };
        let server = listener.serve(state, move |state, _, req| handle(state, addr, req));
        Ok(Self { server })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    /// The API root to configure (`http://127.0.0.1:<port>/v26.0`).
    pub fn api_base(&self) -> Url {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// A `messages` notification for this number with these messages (fresh wamids); opens
    /// each sender's 24-hour window.
    pub fn notification(&self, messages: &[Incoming]) -> Notification {
        self.notification_for(PHONE_NUMBER_ID, messages)
    }

    /// The same for another phone number id of the app.
    pub fn notification_for(&self, phone_number_id: &str, messages: &[Incoming]) -> Notification {
        let mut st = self.lock();
        let mut contacts: Vec<FakeUser> = Vec::new();
        let mut wamids = Vec::new();
        let mut built = Vec::new();
        for m in messages {
            let wamid = st.wamid();
            st.windows.insert(m.from.wa_id.clone());
            if !contacts.contains(&m.from) {
                contacts.push(m.from.clone());
            }
            built.push(m.build(&wamid));
            wamids.push(wamid);
        }
        let body = notification_json(phone_number_id, &contacts, built, Vec::new());
        Notification {
            body: body.to_string().into_bytes(),
            wamids,
        }
    }

    /// A notification with these `statuses[]` items ([`status_json`]).
    pub fn statuses_notification(&self, statuses: Vec<Value>) -> Notification {
        let body = notification_json(PHONE_NUMBER_ID, &[], Vec::new(), statuses);
        Notification {
            body: body.to_string().into_bytes(),
            wamids: Vec::new(),
        }
    }

    /// The `failed` (131047) statuses of messages sent outside a closed window, as one
    /// notification; `None` when there are none. Taken: the next call has only newer ones.
    pub fn status_notification(&self) -> Option<Notification> {
        let failed = std::mem::take(&mut self.lock().failed);
        if failed.is_empty() {
            return None;
        }
        let statuses = failed
            .iter()
            .map(|(wamid, to)| status_json(wamid, to, "failed", Some(131_047)))
            .collect();
        Some(self.statuses_notification(statuses))
    }

    /// Opens a user's 24-hour window (a notification from them does it too).
    pub fn open_window(&self, wa_id: &str) {
        self.lock().windows.insert(wa_id.into());
    }

    /// Closes a user's window (24 hours passed).
    pub fn close_window(&self, wa_id: &str) {
        self.lock().windows.remove(wa_id);
    }

    /// Stores a media file the bot can fetch by `media_id`.
    pub fn put_media(&self, media_id: &str, mime: &str, bytes: Vec<u8>) {
        self.lock().media.insert(
            media_id.into(),
            Media {
                mime: mime.into(),
                bytes,
                url: None,
            },
        );
    }

    /// Makes `GET /<media_id>` answer this download URL instead of the fake's own.
    pub fn set_media_url(&self, media_id: &str, url: &str) {
        if let Some(m) = self.lock().media.get_mut(media_id) {
            m.url = Some(url.into());
        }
    }

    /// The media ids downloaded, in order.
    pub fn downloads(&self) -> Vec<String> {
        self.lock().downloads.clone()
    }

    /// Every message the bot sent, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.lock().sent.clone()
    }

    /// Every request that carried the right token, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The next `times` calls of `method` (`send`, `phone`, `media`, `download`) fail (after
    /// the ones scripted before).
    pub fn fail_next(&self, method: &str, times: usize, failure: Failure) {
        self.lock()
            .failures
            .push(method.into(), times, Some(failure));
    }

    /// The next `times` calls of `method` are handled normally before the failures scripted
    /// after this (e.g. the second piece of a message fails: `pass_next(1)`, `fail_next(1)`).
    pub fn pass_next(&self, method: &str, times: usize) {
        self.lock().failures.push(method.into(), times, None);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fake_http::failing_by_drop_variants!(Failure);

fn respond(status: u16, body: &Value) -> Reply {
    fake_http::json(fake_http::status(status, StatusCode::BAD_REQUEST), body)
}

fn graph_error(http: u16, code: i64, message: &str, details: &str, is_transient: bool) -> Reply {
    let mut error = json!({
        "message": message,
        "type": "OAuthException",
        "code": code,
        "fbtrace_id": "AFakeTraceId0123",
    });
    if !details.is_empty() {
        error["error_data"] = json!({ "messaging_product": "whatsapp", "details": details });
    }
    if is_transient {
        error["is_transient"] = true.into();
    }
    respond(http, &json!({ "error": error }))
}

fn invalid(details: &str) -> Reply {
    graph_error(
        400,
        131_009,
        "(#131009) Parameter value is not valid",
        details,
        false,
    )
}

fn failure_response(f: &Failure) -> Reply {
    match f {
        Failure::Graph {
            http,
            code,
            message,
            details,
            is_transient,
        } => graph_error(*http, *code, message, details, *is_transient),
        Failure::BadGateway => fake_http::respond(
            StatusCode::BAD_GATEWAY,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head></html>",
        ),
        Failure::Drop | Failure::DropAfterHandling => graph_error(500, 1, "unreachable", "", true),
    }
}

async fn handle(state: Arc<Mutex<State>>, addr: SocketAddr, req: Request<HyperBody>) -> Answered {
    let authorized = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {ACCESS_TOKEN}").as_str());
    let http_method = req.method().as_str().to_owned();
    let full_path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body = fake_http::body(req).await?;
    if !authorized {
        return Ok(graph_error(
            401,
            190,
            "Invalid OAuth access token - Cannot parse access token",
            "",
            false,
        ));
    }
    // `/v26.0/<rest>`, or `/media-download/<id>` (no version).
    let segments: Vec<&str> = full_path.trim_start_matches('/').split('/').collect();
    let (method, rest): (&str, Vec<&str>) = match segments.as_slice() {
        ["media-download", id] => ("download", vec![*id]),
        [v, rest @ ..] if v.starts_with('v') => {
            let m = match (http_method.as_str(), rest) {
                ("GET", [id]) if *id == PHONE_NUMBER_ID => "phone",
                ("POST", [id, "messages"]) if *id == PHONE_NUMBER_ID => "send",
                ("GET", [_]) => "media",
                _ => "unknown",
            };
            (m, rest.to_vec())
        }
        _ => ("unknown", Vec::new()),
    };
    let params: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(_) => return Ok(graph_error(400, 100, "(#100) Invalid JSON", "", false)),
        }
    };
    let failure = {
        let mut st = lock(&state);
        st.calls.push(Call {
            method: method.into(),
            path: format!("/{}{}", rest.join("/"), query_suffix(&query)),
            params: params.clone(),
        });
        st.failures.next(method).flatten()
    };
    fake_http::scripted(failure, failure_response, || async {
        dispatch(&state, addr, method, &rest, &params)
    })
    .await
}

fn query_suffix(query: &str) -> String {
    if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    }
}

fn dispatch(
    state: &Arc<Mutex<State>>,
    addr: SocketAddr,
    method: &str,
    rest: &[&str],
    params: &Value,
) -> Reply {
    let mut st = lock(state);
    match method {
        "phone" => respond(
            200,
            &json!({
                "verified_name": "Chitin Test",
                "display_phone_number": DISPLAY_NUMBER,
                "id": PHONE_NUMBER_ID,
            }),
        ),
        "send" => send(&mut st, params),
        "media" => {
            let id = rest.first().copied().unwrap_or_default();
            match st.media.get(id) {
                Some(m) => {
                    let url = m.url.clone().unwrap_or_else(|| {
                        format!("http://{addr}/media-download/{id}?ext=1700000000&hash=ATuFake")
                    });
                    respond(
                        200,
                        &json!({
                            "messaging_product": "whatsapp",
                            "url": url,
                            "mime_type": m.mime,
                            "sha256": encode_hex(&Sha256::digest(&m.bytes)),
                            // The real API sometimes gives the size as a string.
                            "file_size": m.bytes.len().to_string(),
                            "id": id,
                        }),
                    )
                }
                None => unknown_object(id),
            }
        }
        "download" => {
            let id = rest.first().copied().unwrap_or_default();
            match st.media.get(id).map(|m| m.bytes.clone()) {
                Some(bytes) => {
                    st.downloads.push(id.into());
                    fake_http::respond(StatusCode::OK, "application/octet-stream", bytes)
                }
                None => fake_http::respond(StatusCode::NOT_FOUND, "text/plain", "Not Found"),
            }
        }
        _ => unknown_object(rest.first().copied().unwrap_or_default()),
    }
}

fn unknown_object(id: &str) -> Reply {
    graph_error(
        400,
        100,
        &format!(
            "Unsupported get request. Object with ID '{id}' does not exist, cannot be loaded due to missing permissions, or does not support this operation."
        ),
        "",
        false,
    )
}

fn send(st: &mut State, params: &Value) -> Reply {
    if params["messaging_product"].as_str() != Some("whatsapp") {
        return graph_error(
            400,
            100,
            "(#100) The parameter messaging_product is required.",
            "",
            false,
        );
    }
    let Some(to) = params["to"].as_str().filter(|t| !t.is_empty()) else {
        return graph_error(400, 100, "(#100) The parameter to is required.", "", false);
    };
    let kind = params["type"].as_str().unwrap_or("text");
    let (text, buttons, preview_url) = match kind {
        "text" => {
            let body = params["text"]["body"].as_str().unwrap_or_default();
            if body.trim().is_empty() {
                return graph_error(
                    400,
                    100,
                    "(#100) The parameter text['body'] is required.",
                    "",
                    false,
                );
            }
            if body.chars().count() > 4096 {
                return graph_error(
                    400,
                    100,
                    "(#100) Param text['body'] must be at most 4096 characters long.",
                    "",
                    false,
                );
            }
            (
                body.to_owned(),
                Vec::new(),
                params["text"]["preview_url"].as_bool(),
            )
        }
        "interactive" => {
            let i = &params["interactive"];
            if i["type"].as_str() != Some("button") {
                return invalid("interactive.type must be one of {button, list, ...}");
            }
            let body = i["body"]["text"].as_str().unwrap_or_default();
            if body.trim().is_empty() || body.chars().count() > 1024 {
                return invalid("interactive.body.text must be 1-1024 characters long");
            }
            let list = i["action"]["buttons"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if list.is_empty() || list.len() > 3 {
                return invalid("interactive.action.buttons must have 1-3 buttons");
            }
            let mut buttons: Vec<(String, String)> = Vec::new();
            for b in &list {
                let id = b["reply"]["id"].as_str().unwrap_or_default();
                let title = b["reply"]["title"].as_str().unwrap_or_default();
                if b["type"].as_str() != Some("reply") {
                    return invalid("button type must be reply");
                }
                if id.is_empty() || id.len() > 256 {
                    return invalid("button id must be 1-256 characters long");
                }
                if title.trim().is_empty() || title.chars().count() > 20 {
                    return invalid("button title must be 1-20 characters long");
                }
                if buttons.iter().any(|(i, _)| i == id) {
                    return invalid("button ids must be unique");
                }
                buttons.push((id.into(), title.into()));
            }
            (body.to_owned(), buttons, None)
        }
        other => {
            return graph_error(
                400,
                131_051,
                "(#131051) Unsupported message type",
                &format!("message type {other} is not supported by this fake"),
                false,
            );
        }
    };
    let wamid = st.wamid();
    let delivered = st.windows.contains(to);
    if !delivered {
        st.failed.push((wamid.clone(), to.to_owned()));
    }
    st.sent.push(SentMessage {
        wamid: wamid.clone(),
        to: to.into(),
        kind: kind.into(),
        text,
        preview_url,
        buttons,
        context: params["context"]["message_id"].as_str().map(String::from),
        delivered,
        params: params.clone(),
    });
    respond(
        200,
        &json!({
            "messaging_product": "whatsapp",
            "contacts": [ { "input": to, "wa_id": to } ],
            "messages": [ { "id": wamid } ],
        }),
    )
}
