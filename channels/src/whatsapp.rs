//! WhatsApp, over Meta's WhatsApp Business Cloud API (the Graph API: `<api_base>/<id>/...`,
//! JSON bodies, `Authorization: Bearer <access token>`).
//!
//! A thin typed client over reqwest: rustls, no redirects, no proxy, bounded answers.
//!
//! - **Credentials.** The access token travels only in the `Authorization` header (never in a
//!   URL); the app secret only keys the webhook signature; the verify token is only compared.
//!   All three are zeroized on drop, shown as `<redacted>` by `Debug`, and scrubbed from every
//!   error text. Plain `http://` is accepted for `api_base` only on a loopback address (tests).
//! - **Receiving: webhooks only.** Meta posts notifications to `POST /channels/<name>/webhook`;
//!   [`Platform::poll`] has nothing to fetch and only waits (the gateway runs a webhook channel
//!   without polling). Set it up in the Meta app dashboard (WhatsApp → Configuration): callback
//!   URL `https://<gateway>/channels/<name>/webhook`, verify token = this channel's
//!   `verify_token`, then subscribe the `messages` field. Meta first sends the verification
//!   handshake (`GET ...?hub.mode=subscribe&hub.verify_token=...&hub.challenge=...`), answered
//!   with the challenge when the token matches (constant time). Every notification carries
//!   `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, raw body)>`, checked in constant
//!   time over the exact bytes before anything is parsed. The signature has no timestamp, so a
//!   captured notification can be replayed: its events keep their ids (`w:<wamid>`), so the
//!   engine drops the copies.
//! - **Conversations.** A Cloud API number talks 1:1: every message is a DM whose chat id is
//!   the sender's `wa_id`, and it always addresses the bot. Notifications for another phone
//!   number of the same app (`metadata.phone_number_id`) produce no events. Message types:
//!   `text`; `image`, `video`, `audio` (voice notes too), `document`, `sticker` as attachments
//!   (the media id is the file reference; the caption is the text); `interactive`
//!   `button_reply` and template quick-reply `button` as [`Event::Button`] (data = the button id
//!   or payload, message id = the bot's message that carried it, `context.id`); `reaction` as
//!   [`Event::Button`] with data `react:<emoji>` on the reacted message (the same contract as
//!   Signal's reactions, see [`crate::signal`]; a removed reaction is ignored); everything else
//!   [`Event::Ignored`].
//! - **Delivery statuses.** `statuses[]` (sent, delivered, read, failed) become
//!   [`Event::Status`] (id `ws:<wamid>:<status>`; a failed one carries the classified error,
//!   e.g. the 24-hour window), which the engine records on the outbox row; other statuses are
//!   [`Event::Ignored`]. [`WhatsApp::parse_statuses`] gives them in full. Errors outside a message (`value.errors[]`) produce no events.
//! - **Sending.** Plain text (`type: text`, `preview_url: false`: no link preview, and WhatsApp
//!   interprets no markup in a text it is sent this way other than its own `*bold*` `_italic_`
//!   styling, which carries no links or mentions), replies with `context.message_id`. Buttons
//!   (at most [`MAX_BUTTONS`]) go as an interactive reply-buttons message, whose body holds at
//!   most [`MAX_INTERACTIVE_BODY`] characters while a text message holds [`MAX_TEXT`]: a
//!   longer text with buttons is sent as text messages followed by an interactive message with
//!   the last piece and the buttons (the engine's [`Sent::message_id`] is then the interactive
//!   one, which button presses refer to). If a piece fails, a retry of the same
//!   [`OutMessage::delivery_id`] resumes after the pieces already delivered (in memory: a
//!   restart in between may repeat them). Button titles are cut to [`MAX_BUTTON_TITLE`]
//!   characters.
//! - **The 24-hour window.** WhatsApp delivers a free-form message only within 24 hours of the
//!   user's last message to the business. Outside it the send is refused with error 131047
//!   ("re-engagement message"), usually not in the send's answer but in a `failed` status
//!   notification; both map to [`SendError::Permanent`] with a message that says so
//!   ([`StatusError::send_error`]). Reaching a user after the window needs a *template
//!   message*: create one in WhatsApp Manager (Account tools → Message templates, category
//!   "Utility"), wait for Meta's approval, and send it with `type: template`. This adapter does
//!   not send templates yet; until the user writes again, replies and notifications to them
//!   fail permanently.
//! - **No edits, no typing.** WhatsApp cannot edit a sent message: [`Platform::edit`] answers
//!   [`SendError::Permanent`], so the engine sends the final text of a streamed answer as a new
//!   message. The typing indicator needs the id of the user's message being answered (and marks
//!   it read), which [`Platform::typing`] is not given: it is a no-op. Button presses need no
//!   answer: [`Platform::answer_button`] is a no-op.
//! - **Attachments.** `GET <api_base>/<media id>` gives a short-lived download URL, fetched with
//!   the bearer token only when its host is Meta's (`lookaside.fbsbx.com`, `*.fbcdn.net`) or the
//!   API root's own, over https (or the API root's own scheme), bounded by the size limit.

#[cfg(feature = "fake")]
pub mod fake;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::http;
use crate::text::{check_button, check_sendable, split, truncate, utf16_len};
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ButtonPress, ChannelError, ChatKind, ChatRef,
    ConfigError, DeliveryReport, DeliveryState, Event, Inbound, Limits, Message, OutMessage,
    Platform, Polled, SendError, Sender, Sent, WebhookBody, WebhookParsed, WebhookRequest,
};

/// The public Graph API root, with the API version this adapter was written against.
pub const DEFAULT_API_BASE: &str = "https://graph.facebook.com/v26.0";
/// Longest text message body, in characters (counted here in UTF-16 code units, which is
/// never fewer).
pub const MAX_TEXT: usize = 4096;
/// Longest body of an interactive (buttons) message.
pub const MAX_INTERACTIVE_BODY: usize = 1024;
/// Most reply buttons on one interactive message.
pub const MAX_BUTTONS: usize = 3;
/// Longest button title; longer labels are cut.
pub const MAX_BUTTON_TITLE: usize = 20;
/// Longest button id (the button's data), in bytes.
pub const MAX_BUTTON_ID: usize = 256;
/// The header carrying the webhook signature.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";
/// Largest webhook body accepted (Meta batches notifications; its payloads stay below 3 MB).
pub const MAX_WEBHOOK_BODY: usize = 3 * 1024 * 1024;
/// What [`Platform::poll`] waits before answering nothing (WhatsApp has no polling).
pub const IDLE_POLL: Duration = Duration::from_secs(300);
/// The data prefix of a reaction mapped to a button press (`react:👍`), as for Signal.
pub use crate::signal::REACTION_PREFIX;
/// Error code: more than 24 hours since the user last wrote (re-engagement message).
pub const ERROR_REENGAGEMENT: i64 = 131_047;
/// Largest Graph API JSON answer read.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Meta's media hosts (besides the API root's own): a leading `.` stands for its subdomains.
const MEDIA_HOSTS: [&str; 2] = ["lookaside.fbsbx.com", ".fbcdn.net"];
/// Longest accepted `hub.challenge` (Meta sends a number).
const MAX_CHALLENGE: usize = 128;
/// Multi-part sends remembered for resumption (oldest forgotten beyond this).
const MAX_PARTIAL_SENDS: usize = 256;

/// The message of a send refused for the 24-hour customer service window.
pub const WINDOW_CLOSED: &str = "WhatsApp error 131047: more than 24 hours have passed since \
    this user last wrote to the bot, so WhatsApp's 24-hour customer service window is closed \
    and it refuses free-form messages; they are delivered again once the user writes. To \
    notify users outside the window, a template message must be configured: create and get \
    approved a template in WhatsApp Manager (Message templates) and send it instead.";

/// One WhatsApp channel's settings, credentials already released by the gateway.
pub struct WhatsAppConfig {
    /// The Graph API root with its version (default [`DEFAULT_API_BASE`]); `https`, or `http`
    /// on loopback only.
    pub api_base: Url,
    /// The business phone number's id (not the number itself), from the app dashboard.
    pub phone_number_id: String,
    /// A (system user) access token with `whatsapp_business_messaging`.
    pub access_token: Zeroizing<String>,
    /// The Meta app's secret: keys the webhook signature.
    pub app_secret: Zeroizing<String>,
    /// The token Meta echoes in the verification handshake (chosen by the operator).
    pub verify_token: Zeroizing<String>,
}

impl WhatsAppConfig {
    /// The public API with these credentials.
    pub fn new(
        phone_number_id: impl Into<String>,
        access_token: Zeroizing<String>,
        app_secret: Zeroizing<String>,
        verify_token: Zeroizing<String>,
    ) -> Result<Self, ConfigError> {
        let api_base = Url::parse(DEFAULT_API_BASE)
            .map_err(|e| ConfigError::Invalid(format!("the default API root: {e}")))?;
        Ok(Self {
            api_base,
            phone_number_id: phone_number_id.into(),
            access_token,
            app_secret,
            verify_token,
        })
    }
}

impl fmt::Debug for WhatsAppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WhatsAppConfig")
            .field("api_base", &self.api_base.as_str())
            .field("phone_number_id", &self.phone_number_id)
            .field("access_token", &"<redacted>")
            .field("app_secret", &"<redacted>")
            .field("verify_token", &"<redacted>")
            .finish()
    }
}

/// A multi-part send in progress (see the module docs).
struct Partial {
    /// The text and button data it was planned from: a retry with other content starts over.
    key: String,
    /// Pieces delivered so far.
    done: usize,
    last_id: Option<String>,
}

/// The WhatsApp adapter. Build it with [`WhatsApp::new`].
pub struct WhatsApp {
    /// The API root without a trailing `/`.
    base: String,
    base_url: Url,
    phone_number_id: String,
    access_token: Zeroizing<String>,
    app_secret: Zeroizing<String>,
    verify_token: Zeroizing<String>,
    http: reqwest::Client,
    partial: Mutex<HashMap<String, Partial>>,
}

impl fmt::Debug for WhatsApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WhatsApp")
            .field("api_base", &self.base)
            .field("phone_number_id", &self.phone_number_id)
            .field("access_token", &"<redacted>")
            .field("app_secret", &"<redacted>")
            .field("verify_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why a Graph API call failed (internal; mapped to [`SendError`] or [`ChannelError`]).
type CallError = http::CallError<ApiError>;

/// The platform's error answer.
#[derive(Debug)]
struct ApiError {
    status: u16,
    code: Option<i64>,
    /// `message` and `error_data.details`, credentials removed.
    text: String,
    transient: bool,
    retry_after: Option<u64>,
}

#[derive(Deserialize)]
struct GraphErrorBody {
    error: GraphError,
}

#[derive(Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    code: Option<i64>,
    error_data: Option<GraphErrorData>,
    #[serde(default)]
    is_transient: bool,
}

#[derive(Deserialize)]
struct GraphErrorData {
    details: Option<String>,
}

impl WhatsApp {
    /// Checks the configuration and builds the HTTP client; sends nothing.
    pub fn new(cfg: WhatsAppConfig) -> Result<Self, ConfigError> {
        http::check_api_root(&cfg.api_base, "api_base", "the access token")?;
        let id = &cfg.phone_number_id;
        if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::Invalid(format!(
                "`phone_number_id` {id:?} is not a phone number id (digits, from the app \
                 dashboard's WhatsApp → API Setup; not the phone number itself)"
            )));
        }
        let token_ok =
            !cfg.access_token.is_empty() && cfg.access_token.bytes().all(|b| b.is_ascii_graphic());
        if !token_ok {
            // Never echo the value: it may be a real credential pasted in the wrong place.
            return Err(ConfigError::Invalid(
                "the WhatsApp access token is empty or has spaces or non-ASCII characters; set \
                 it again with `chitin secrets set`"
                    .into(),
            ));
        }
        if cfg.app_secret.is_empty() {
            return Err(ConfigError::Invalid(
                "the WhatsApp app secret is empty: webhook signatures cannot be checked; set it \
                 with `chitin secrets set` (App settings → Basic → App secret)"
                    .into(),
            ));
        }
        if cfg.verify_token.is_empty() {
            return Err(ConfigError::Invalid(
                "the WhatsApp verify token is empty; choose one and enter the same in the app \
                 dashboard's webhook configuration"
                    .into(),
            ));
        }
        // No redirects: one would carry the bearer token elsewhere.
        let http = http::client(http::USER_AGENT)?;
        Ok(Self {
            base: cfg.api_base.as_str().trim_end_matches('/').to_owned(),
            base_url: cfg.api_base,
            phone_number_id: cfg.phone_number_id,
            access_token: cfg.access_token,
            app_secret: cfg.app_secret,
            verify_token: cfg.verify_token,
            http,
            partial: Mutex::new(HashMap::new()),
        })
    }

    /// The delivery statuses (`statuses[]`) of a webhook notification for this phone number,
    /// in order: what became of the bot's messages. Call it only on a body that
    /// [`Platform::webhook`] accepted (it checks no signature). A `failed` status carries the
    /// platform's error; [`StatusError::send_error`] says what the outbox should record (a
    /// 131047 names the 24-hour window). Statuses it cannot read are skipped.
    pub fn parse_statuses(&self, body: &[u8]) -> Result<Vec<DeliveryStatus>, ChannelError> {
        let mut out = Vec::new();
        for value in self.change_values(body)? {
            for s in value.statuses {
                if let Ok(s) = WaStatus::deserialize(&s) {
                    out.push(s.into_status());
                }
            }
        }
        Ok(out)
    }

    /// The `value`s of the `messages` changes for this phone number.
    fn change_values(&self, body: &[u8]) -> Result<Vec<ChangeValue>, ChannelError> {
        if body.len() > MAX_WEBHOOK_BODY {
            return Err(ChannelError::BadWebhook(format!(
                "the body is larger than {MAX_WEBHOOK_BODY} bytes"
            )));
        }
        let note: Notification = serde_json::from_slice(body)
            .map_err(|e| ChannelError::BadWebhook(format!("the body is not JSON: {e}")))?;
        let Some(entries) = note.entry else {
            return Err(ChannelError::BadWebhook(
                "the body is not a WhatsApp notification (no `entry`)".into(),
            ));
        };
        if note
            .object
            .as_deref()
            .is_some_and(|o| o != "whatsapp_business_account")
        {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for change in entries.into_iter().flat_map(|e| e.changes) {
            if change.field.as_deref() != Some("messages") {
                continue;
            }
            let Some(value) = change.value else { continue };
            let Ok(value) = ChangeValue::deserialize(&value) else {
                continue;
            };
            let ours = value
                .metadata
                .as_ref()
                .and_then(|m| m.phone_number_id.as_deref())
                == Some(self.phone_number_id.as_str());
            if ours {
                out.push(value);
            }
        }
        Ok(out)
    }

    /// The credentials every text leaving this adapter is scrubbed of.
    fn secrets(&self) -> [&str; 3] {
        [
            self.access_token.as_str(),
            self.app_secret.as_str(),
            self.verify_token.as_str(),
        ]
    }

    /// `Authorization: Bearer <access token>`, marked sensitive.
    fn bearer(&self) -> Option<HeaderValue> {
        http::auth_header("Bearer", &self.access_token)
    }

    /// One Graph API call to `<base>/<path>` (JSON body for POST); the JSON answer on success.
    async fn call(&self, what: &str, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let url = format!("{}/{path}", self.base);
        let req = match body {
            Some(b) => self.http.post(&url).json(b),
            None => self.http.get(&url),
        };
        // The token was checked to be visible ASCII, so this cannot fail.
        let Some(bearer) = self.bearer() else {
            return Err(CallError::BadAnswer(
                "the access token is not a valid header value".into(),
            ));
        };
        let mut resp = req
            .header(AUTHORIZATION, bearer)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| CallError::network(what, e, true, &self.secrets()))?;
        let status = resp.status().as_u16();
        let retry_after = http::retry_after_secs(resp.headers());
        let body = http::read_answer(what, &mut resp, MAX_ANSWER_BYTES, &self.secrets()).await?;
        if (200..300).contains(&status) {
            return serde_json::from_slice::<Value>(&body).map_err(|_| {
                CallError::BadAnswer(format!(
                    "{what}: HTTP {status} with a body that is not JSON"
                ))
            });
        }
        Err(match serde_json::from_slice::<GraphErrorBody>(&body) {
            Ok(GraphErrorBody { error }) => {
                let mut text = if error.message.is_empty() {
                    format!("HTTP {status}")
                } else {
                    error.message
                };
                if let Some(details) = error.error_data.and_then(|d| d.details)
                    && !details.is_empty()
                    && !text.contains(&details)
                {
                    text.push_str(": ");
                    text.push_str(&details);
                }
                CallError::Api(ApiError {
                    status,
                    code: error.code,
                    text: http::redact(format!("{what}: {text}"), &self.secrets()),
                    transient: error.is_transient,
                    retry_after,
                })
            }
            Err(_) => CallError::Api(ApiError {
                status,
                code: None,
                text: format!("{what}: HTTP {status} without a Graph API error"),
                transient: false,
                retry_after,
            }),
        })
    }

    /// Posts one message object to `/<phone_number_id>/messages`; its wamid.
    async fn post_message(&self, message: &Value) -> Result<String, SendError> {
        let path = format!("{}/messages", self.phone_number_id);
        let answer = self
            .call("send", &path, Some(message))
            .await
            .map_err(send_error)?;
        match answer
            .get("messages")
            .and_then(|m| m.get(0))
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
        {
            Some(id) => Ok(id.to_owned()),
            None => Err(SendError::Transient {
                message: "send: the answer has no message id".into(),
                maybe_delivered: true,
            }),
        }
    }

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        let to = recipient(&msg.chat)?;
        check_text(&msg.text)?;
        let pieces = plan(&msg.text, &msg.buttons)?;
        let count = pieces.len();
        let key = partial_key(msg);
        let (start, mut last_id) = if count > 1 {
            let partial = self.partial.lock().unwrap_or_else(PoisonError::into_inner);
            match partial.get(&msg.delivery_id) {
                Some(p) if p.key == key && p.done < count => (p.done, p.last_id.clone()),
                _ => (0, None),
            }
        } else {
            (0, None)
        };
        for (i, piece) in pieces.iter().enumerate().skip(start) {
            let mut body = json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": to,
            });
            match piece {
                Piece::Text(text) => {
                    body["type"] = "text".into();
                    body["text"] = json!({ "body": text, "preview_url": false });
                }
                Piece::Buttons(text, buttons) => {
                    body["type"] = "interactive".into();
                    body["interactive"] = json!({
                        "type": "button",
                        "body": { "text": text },
                        "action": { "buttons": buttons },
                    });
                }
            }
            if i == 0
                && let Some(reply_to) = &msg.reply_to
            {
                body["context"] = json!({ "message_id": reply_to });
            }
            let id = self.post_message(&body).await?;
            last_id = Some(id.clone());
            if count > 1 {
                let mut partial = self.partial.lock().unwrap_or_else(PoisonError::into_inner);
                if i + 1 == count {
                    partial.remove(&msg.delivery_id);
                } else {
                    if partial.len() >= MAX_PARTIAL_SENDS && !partial.contains_key(&msg.delivery_id)
                    {
                        partial.clear();
                    }
                    partial.insert(
                        msg.delivery_id.clone(),
                        Partial {
                            key: key.clone(),
                            done: i + 1,
                            last_id: Some(id),
                        },
                    );
                }
            }
        }
        match last_id {
            Some(message_id) => Ok(Sent { message_id }),
            None => Err(SendError::Permanent("nothing to send".into())),
        }
    }

    /// `GET /<media id>` for the download URL, then the download, bounded by `max_bytes`.
    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        http::check_size(a.size, max_bytes)?;
        let id = &a.file_ref;
        if id.is_empty()
            || id.len() > 128
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(ChannelError::Protocol(
                "the attachment reference is not a WhatsApp media id".into(),
            ));
        }
        let path = format!("{id}?phone_number_id={}", self.phone_number_id);
        let media = self
            .call("media", &path, None)
            .await
            .map_err(channel_error)?;
        let size = match media.get("file_size") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse::<u64>().ok(),
            _ => None,
        };
        http::check_size(size, max_bytes)?;
        let Some(url) = media.get("url").and_then(Value::as_str) else {
            return Err(ChannelError::Protocol(
                "media: the answer has no download url".into(),
            ));
        };
        let url = Url::parse(url)
            .map_err(|_| ChannelError::Protocol("media: the download url is not a URL".into()))?;
        // Meta's media hosts over https, or the API root's own origin.
        if !http::may_download(&url, &self.base_url, &MEDIA_HOSTS) {
            return Err(ChannelError::Protocol(format!(
                "media: the download url's host {:?} is not one of Meta's; not fetched",
                url.host_str().unwrap_or_default()
            )));
        }
        let Some(bearer) = self.bearer() else {
            return Err(ChannelError::Protocol(
                "the access token is not a valid header value".into(),
            ));
        };
        let req = self
            .http
            .get(url)
            .header(AUTHORIZATION, bearer)
            .timeout(REQUEST_TIMEOUT * 4);
        http::download(req, "media download", max_bytes, &self.secrets(), |_| None).await
    }

    fn handshake(&self, query: &str) -> Result<WebhookParsed, ChannelError> {
        let refuse = |why: &str| Err(ChannelError::WebhookRefused(why.to_owned()));
        let mut mode = None;
        let mut token = None;
        let mut challenge = None;
        let Ok(mut parsed) = Url::parse("https://handshake.invalid/") else {
            return refuse("the verification request could not be read");
        };
        parsed.set_query(Some(query));
        for (k, v) in parsed.query_pairs() {
            let slot = match k.as_ref() {
                "hub.mode" => &mut mode,
                "hub.verify_token" => &mut token,
                "hub.challenge" => &mut challenge,
                _ => continue,
            };
            if slot.is_some() {
                return refuse("a verification parameter is repeated");
            }
            *slot = Some(Zeroizing::new(v.into_owned()));
        }
        if mode.as_deref().map(String::as_str) != Some("subscribe") {
            return refuse("the verification request's hub.mode is not `subscribe`");
        }
        let Some(token) = token else {
            return refuse("the verification request has no hub.verify_token");
        };
        // Constant time in the content (a length mismatch is decided at once).
        if !bool::from(token.as_bytes().ct_eq(self.verify_token.as_bytes())) {
            return refuse("the verification request's hub.verify_token is wrong");
        }
        let Some(challenge) = challenge else {
            return refuse("the verification request has no hub.challenge");
        };
        let sane = !challenge.is_empty()
            && challenge.len() <= MAX_CHALLENGE
            && challenge
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !sane {
            return refuse("the verification request's hub.challenge is not a plain token");
        }
        Ok(WebhookParsed {
            events: Vec::new(),
            reply: Some(WebhookBody {
                content_type: "text/plain",
                body: challenge.as_bytes().to_vec(),
            }),
        })
    }

    fn check_signature(&self, req: &WebhookRequest<'_>) -> Result<(), ChannelError> {
        let refuse = |why: &str| Err(ChannelError::WebhookRefused(why.to_owned()));
        let mut given = req.header_values(SIGNATURE_HEADER);
        let (first, second) = (given.next(), given.next());
        let Some(value) = first else {
            return refuse("the X-Hub-Signature-256 header is missing");
        };
        if second.is_some() {
            return refuse("more than one X-Hub-Signature-256 header");
        }
        let Some(sig) = value
            .trim()
            .strip_prefix("sha256=")
            .and_then(|hex| decode_hex(hex.trim()))
            .filter(|s| s.len() == 32)
        else {
            return refuse("the X-Hub-Signature-256 header is not sha256=<64 hex digits>");
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(self.app_secret.as_bytes()) else {
            return refuse("the app secret cannot key HMAC-SHA256");
        };
        mac.update(req.body);
        // `verify_slice` compares in constant time.
        if mac.verify_slice(&sig).is_err() {
            return refuse("the X-Hub-Signature-256 signature is wrong");
        }
        Ok(())
    }

    fn notification(&self, req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        if req.body.len() > MAX_WEBHOOK_BODY {
            return Err(ChannelError::BadWebhook(format!(
                "the body is larger than {MAX_WEBHOOK_BODY} bytes"
            )));
        }
        self.check_signature(req)?;
        let mut events = Vec::new();
        for value in self.change_values(req.body)? {
            let names: HashMap<&str, &str> = value
                .contacts
                .iter()
                .filter_map(|c| Some((c.wa_id.as_deref()?, c.profile.as_ref()?.name.as_deref()?)))
                .collect();
            for m in &value.messages {
                let Some(id) = m.get("id").and_then(Value::as_str) else {
                    continue;
                };
                let event = match WaMessage::deserialize(m) {
                    Ok(msg) => msg.into_event(&names),
                    Err(_) => Event::Ignored {
                        what: "a message this adapter cannot read".into(),
                    },
                };
                events.push(Inbound {
                    event_id: format!("w:{id}"),
                    event,
                });
            }
            for s in &value.statuses {
                let Ok(s) = WaStatus::deserialize(s) else {
                    continue;
                };
                let event_id = format!("ws:{}:{}", s.id, s.status);
                let status = s.into_status();
                let state = match status.status.as_str() {
                    "sent" => Some(DeliveryState::Sent),
                    "delivered" => Some(DeliveryState::Delivered),
                    "read" => Some(DeliveryState::Read),
                    "failed" => {
                        Some(DeliveryState::Failed(status.error.as_ref().map_or_else(
                            || "failed".to_string(),
                            |e| e.send_error().to_string(),
                        )))
                    }
                    _ => None,
                };
                let event = match state {
                    Some(state) => Event::Status(DeliveryReport {
                        message_id: status.wamid,
                        state,
                    }),
                    None => Event::Ignored {
                        what: status.status,
                    },
                };
                events.push(Inbound { event_id, event });
            }
        }
        Ok(WebhookParsed {
            events,
            reply: None,
        })
    }
}

impl Platform for WhatsApp {
    fn kind(&self) -> &'static str {
        "whatsapp"
    }

    /// Texts up to [`MAX_TEXT`]; a text with buttons longer than [`MAX_INTERACTIVE_BODY`] is
    /// sent in pieces by [`Platform::send`] itself.
    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: MAX_BUTTON_ID,
        }
    }

    /// `GET /<phone_number_id>`: checks the token and the number; the bot is the number.
    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            let path = format!(
                "{}?fields=id,display_phone_number,verified_name",
                self.phone_number_id
            );
            let info = match self.call("phone number", &path, None).await {
                Ok(v) => v,
                Err(CallError::Api(ApiError {
                    code: Some(100),
                    text,
                    ..
                })) => {
                    return Err(ChannelError::Unauthorized(format!(
                        "{text} (check `phone_number_id`)"
                    )));
                }
                Err(e) => return Err(channel_error(e)),
            };
            let display = info
                .get("display_phone_number")
                .and_then(Value::as_str)
                .map(|d| d.chars().filter(char::is_ascii_digit).collect::<String>())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| self.phone_number_id.clone());
            Ok(BotInfo {
                id: self.phone_number_id.clone(),
                username: display,
            })
        })
    }

    /// WhatsApp has no polling: waits [`IDLE_POLL`] and answers no events (notifications
    /// arrive on the webhook; the gateway does not poll a webhook channel).
    fn poll<'a>(&'a self, _cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(async move {
            tokio::time::sleep(IDLE_POLL).await;
            Ok(Polled {
                events: Vec::new(),
                cursor: None,
            })
        })
    }

    fn webhook(&self, req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        match (req.method, req.route) {
            ("GET", "webhook") => self.handshake(req.query),
            ("POST", "webhook") => self.notification(req),
            _ => Err(ChannelError::NoSuchRoute),
        }
    }

    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>> {
        Box::pin(self.send_inner(msg))
    }

    /// WhatsApp cannot edit a message: always [`SendError::Permanent`], so the engine sends
    /// the new text as a new message.
    fn edit<'a>(
        &'a self,
        _chat: &'a ChatRef,
        _message_id: &'a str,
        _text: &'a str,
        _buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async {
            Err(SendError::Permanent(
                "WhatsApp cannot edit messages: send the new text as a new message".into(),
            ))
        })
    }

    /// Nothing to answer on WhatsApp.
    fn answer_button<'a>(
        &'a self,
        _callback_id: &'a str,
        _text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }

    /// A no-op (the indicator needs the id of the message being answered).
    fn typing<'a>(&'a self, _chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }

    fn fetch_attachment<'a>(
        &'a self,
        attachment: &'a Attachment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(self.fetch_inner(attachment, max_bytes))
    }
}

/// What became of a message the bot sent (a `statuses[]` item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryStatus {
    /// The message id ([`Sent::message_id`]).
    pub wamid: String,
    /// `sent`, `delivered`, `read` or `failed` (other values passed through).
    pub status: String,
    /// The recipient's `wa_id`.
    pub recipient: String,
    /// Unix seconds, as WhatsApp gives it.
    pub timestamp: Option<u64>,
    /// Why a `failed` message failed (the first error WhatsApp gives).
    pub error: Option<StatusError>,
}

/// The error of a failed delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusError {
    pub code: i64,
    /// WhatsApp's title (e.g. `Re-engagement message`).
    pub title: String,
    pub details: Option<String>,
}

impl StatusError {
    /// What to record for the failed message: the same classification as a refused send
    /// (131047 names the 24-hour window; rate limits are [`SendError::RateLimited`]; WhatsApp's
    /// own temporary failures [`SendError::Transient`], not delivered).
    pub fn send_error(&self) -> SendError {
        let mut text = format!("delivery failed: {}", self.title);
        if let Some(d) = self.details.as_deref().filter(|d| !d.is_empty()) {
            text.push_str(": ");
            text.push_str(d);
        }
        classify(0, Some(self.code), text, false, None, false)
    }
}

// ---- Sending helpers ----

enum Piece {
    Text(String),
    Buttons(String, Vec<Value>),
}

/// The messages one [`OutMessage`] becomes: one text, one interactive message, or text pieces
/// followed by an interactive message when the text is too long for an interactive body.
fn plan(text: &str, buttons: &[Button]) -> Result<Vec<Piece>, SendError> {
    if buttons.is_empty() {
        return Ok(vec![Piece::Text(text.to_owned())]);
    }
    let buttons = reply_buttons(buttons)?;
    if utf16_len(text) <= MAX_INTERACTIVE_BODY {
        return Ok(vec![Piece::Buttons(text.to_owned(), buttons)]);
    }
    let mut parts: Vec<String> = split(text, MAX_INTERACTIVE_BODY)
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .collect();
    let Some(last) = parts.pop() else {
        return Err(SendError::Permanent("the message text is empty".into()));
    };
    // The text pieces need not be as short as the interactive body: regroup them.
    let head: String = parts.concat();
    let mut pieces: Vec<Piece> = split(&head, MAX_TEXT)
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .map(Piece::Text)
        .collect();
    pieces.push(Piece::Buttons(last, buttons));
    Ok(pieces)
}

fn reply_buttons(buttons: &[Button]) -> Result<Vec<Value>, SendError> {
    if buttons.len() > MAX_BUTTONS {
        return Err(SendError::Permanent(format!(
            "{} buttons: WhatsApp shows at most {MAX_BUTTONS} reply buttons",
            buttons.len()
        )));
    }
    let mut out = Vec::with_capacity(buttons.len());
    for (i, b) in buttons.iter().enumerate() {
        check_button(b, MAX_BUTTON_ID, "WhatsApp")?;
        let label = b.label.trim();
        if buttons.iter().take(i).any(|o| o.data == b.data) {
            return Err(SendError::Permanent(
                "two buttons have the same data (WhatsApp needs unique button ids)".into(),
            ));
        }
        out.push(json!({
            "type": "reply",
            "reply": { "id": b.data, "title": truncate(label, MAX_BUTTON_TITLE) },
        }));
    }
    Ok(out)
}

fn partial_key(msg: &OutMessage) -> String {
    let mut key = msg.text.clone();
    for b in &msg.buttons {
        key.push('\0');
        key.push_str(&b.data);
    }
    key
}

fn recipient(chat: &ChatRef) -> Result<&str, SendError> {
    if chat.kind != ChatKind::Dm {
        return Err(SendError::Permanent(
            "WhatsApp (Cloud API) has only 1:1 chats; this is a group".into(),
        ));
    }
    let id = chat.id.as_str();
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+._-".contains(&b));
    if ok {
        Ok(id)
    } else {
        Err(SendError::Permanent(format!(
            "{id:?} is not a WhatsApp user id"
        )))
    }
}

/// A text WhatsApp would refuse, refused here without a request.
fn check_text(text: &str) -> Result<(), SendError> {
    check_sendable(text, MAX_TEXT, Some("WhatsApp"), "WhatsApp's")
}

/// How long to wait after a rate-limit error (Graph API errors carry no `retry_after`).
fn default_retry_after(code: Option<i64>) -> u64 {
    match code {
        // One message every 6 s to the same user.
        Some(131_056) => 6,
        // Cloud API throughput (messages per second).
        Some(130_429) => 5,
        // App, account and spam limits are counted over longer periods.
        Some(4 | 80_007 | 131_048) => 60,
        _ => 5,
    }
}

fn is_rate_limit(status: u16, code: Option<i64>) -> bool {
    status == 429 || matches!(code, Some(4 | 80_007 | 130_429 | 131_048 | 131_056))
}

/// The classification of a Graph API (or delivery) error. `status` 0: from a status webhook.
/// `in_flight`: the request reached the platform (a temporary failure may have delivered).
fn classify(
    status: u16,
    code: Option<i64>,
    text: String,
    transient: bool,
    retry_after: Option<u64>,
    in_flight: bool,
) -> SendError {
    if code == Some(ERROR_REENGAGEMENT) {
        return SendError::Permanent(format!("{WINDOW_CLOSED} ({text})"));
    }
    if is_rate_limit(status, code) {
        return SendError::RateLimited {
            retry_after: Duration::from_secs(retry_after.unwrap_or(default_retry_after(code))),
        };
    }
    if status == 401 || matches!(code, Some(0 | 190)) {
        return SendError::Permanent(format!(
            "{text}: the access token was refused (expired or revoked?); set a new one with \
             `chitin secrets set`"
        ));
    }
    // Graph's "unknown" and "service" errors and WhatsApp's own temporary failures.
    if status >= 500 || transient || matches!(code, Some(1 | 2 | 131_000 | 131_016)) {
        return SendError::Transient {
            message: text,
            maybe_delivered: in_flight,
        };
    }
    SendError::Permanent(match code {
        Some(c) => format!("{text} (WhatsApp error {c})"),
        None => text,
    })
}

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|api| {
        let ApiError {
            status,
            code,
            text,
            transient,
            retry_after,
        } = api;
        classify(status, code, text, transient, retry_after, true)
    })
}

fn channel_error(e: CallError) -> ChannelError {
    e.into_channel_error(|api| match api {
        ApiError {
            status,
            code,
            retry_after,
            ..
        } if is_rate_limit(status, code) => ChannelError::RateLimited {
            retry_after: Duration::from_secs(retry_after.unwrap_or(default_retry_after(code))),
        },
        ApiError {
            status,
            code,
            text,
            transient,
            ..
        } => {
            if status >= 500 || transient || matches!(code, Some(1 | 2)) {
                ChannelError::Transient(text)
            } else if matches!(status, 401 | 403) || matches!(code, Some(0 | 10 | 190 | 200..=299))
            {
                ChannelError::Unauthorized(text)
            } else {
                ChannelError::Protocol(text)
            }
        }
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| match pair {
            [hi, lo] => Some((val(*hi)? << 4) | val(*lo)?),
            _ => None,
        })
        .collect()
}

/// Lower-case hex (for the fake's and tests' signatures).
pub fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// The `X-Hub-Signature-256` value Meta computes for `body` with `app_secret`.
pub fn signature(app_secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    match Hmac::<Sha256>::new_from_slice(app_secret) {
        Ok(mut mac) => {
            mac.update(body);
            format!("sha256={}", encode_hex(&mac.finalize().into_bytes()))
        }
        Err(_) => String::new(),
    }
}

// ---- The notification wire format (only the fields used) ----

#[derive(Deserialize)]
struct Notification {
    object: Option<String>,
    entry: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    field: Option<String>,
    value: Option<Value>,
}

#[derive(Deserialize)]
struct ChangeValue {
    metadata: Option<Metadata>,
    #[serde(default)]
    contacts: Vec<Contact>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    statuses: Vec<Value>,
}

#[derive(Deserialize)]
struct Metadata {
    phone_number_id: Option<String>,
}

#[derive(Deserialize)]
struct Contact {
    wa_id: Option<String>,
    profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Profile {
    name: Option<String>,
}

#[derive(Deserialize)]
struct WaMessage {
    from: Option<String>,
    id: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    context: Option<WaContext>,
    text: Option<WaText>,
    interactive: Option<WaInteractive>,
    button: Option<WaQuickReply>,
    reaction: Option<WaReaction>,
    image: Option<WaMedia>,
    video: Option<WaMedia>,
    audio: Option<WaMedia>,
    document: Option<WaMedia>,
    sticker: Option<WaMedia>,
    /// Set on messages of a WhatsApp group (Groups API), which this adapter does not handle.
    group_id: Option<Value>,
}

#[derive(Deserialize)]
struct WaContext {
    id: Option<String>,
}

#[derive(Deserialize)]
struct WaText {
    #[serde(default)]
    body: String,
}

#[derive(Deserialize)]
struct WaInteractive {
    #[serde(rename = "type")]
    kind: Option<String>,
    button_reply: Option<WaReply>,
}

#[derive(Deserialize)]
struct WaReply {
    id: String,
}

#[derive(Deserialize)]
struct WaQuickReply {
    payload: Option<String>,
}

#[derive(Deserialize)]
struct WaReaction {
    message_id: Option<String>,
    emoji: Option<String>,
}

#[derive(Deserialize)]
struct WaMedia {
    id: String,
    mime_type: Option<String>,
    caption: Option<String>,
    filename: Option<String>,
}

#[derive(Deserialize)]
struct WaStatus {
    id: String,
    status: String,
    #[serde(default)]
    recipient_id: String,
    timestamp: Option<Value>,
    #[serde(default)]
    errors: Vec<WaError>,
}

#[derive(Deserialize)]
struct WaError {
    code: i64,
    #[serde(default)]
    title: String,
    message: Option<String>,
    error_data: Option<GraphErrorData>,
}

impl WaStatus {
    fn into_status(self) -> DeliveryStatus {
        let timestamp = match &self.timestamp {
            Some(Value::String(s)) => s.parse().ok(),
            Some(Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        let error = self.errors.into_iter().next().map(|e| StatusError {
            code: e.code,
            title: if e.title.is_empty() {
                e.message.unwrap_or_default()
            } else {
                e.title
            },
            details: e.error_data.and_then(|d| d.details),
        });
        DeliveryStatus {
            wamid: self.id,
            status: self.status,
            recipient: self.recipient_id,
            timestamp,
            error,
        }
    }
}

impl WaMessage {
    fn into_event(self, names: &HashMap<&str, &str>) -> Event {
        let ignored = |what: String| Event::Ignored { what };
        let kind = self.kind.clone().unwrap_or_default();
        if self.group_id.is_some() {
            return ignored("a group message (this adapter handles 1:1 chats only)".into());
        }
        let Some(from) = self.from.clone().filter(|f| !f.is_empty()) else {
            return ignored("a message without a sender".into());
        };
        let chat = ChatRef {
            id: from.clone(),
            kind: ChatKind::Dm,
            thread: None,
        };
        let display = names
            .get(from.as_str())
            .filter(|n| !n.trim().is_empty())
            .map_or_else(|| from.clone(), |n| (*n).to_owned());
        let sender = Sender {
            id: from,
            display,
            is_bot: false,
        };
        let context_id = self.context.as_ref().and_then(|c| c.id.clone());
        match kind.as_str() {
            "text" => {
                let text = self.text.map(|t| t.body).unwrap_or_default();
                if text.is_empty() {
                    return ignored("an empty text message".into());
                }
                Event::Message(Message {
                    chat,
                    message_id: self.id,
                    sender,
                    text,
                    mentioned: true,
                    reply_to: context_id,
                    attachments: Vec::new(),
                })
            }
            "interactive" => {
                let Some(i) = self.interactive else {
                    return ignored("an interactive message without its content".into());
                };
                match (i.kind.as_deref(), i.button_reply, context_id) {
                    (Some("button_reply"), Some(reply), Some(message_id)) => {
                        Event::Button(ButtonPress {
                            callback_id: self.id,
                            chat,
                            message_id,
                            sender,
                            data: reply.id,
                        })
                    }
                    (Some("button_reply"), _, _) => {
                        ignored("a button reply without the message it answers".into())
                    }
                    (other, _, _) => ignored(format!(
                        "an interactive {} reply",
                        other.unwrap_or("unknown")
                    )),
                }
            }
            "button" => match (self.button.and_then(|b| b.payload), context_id) {
                (Some(data), Some(message_id)) if !data.is_empty() => Event::Button(ButtonPress {
                    callback_id: self.id,
                    chat,
                    message_id,
                    sender,
                    data,
                }),
                _ => ignored("a quick reply without a payload".into()),
            },
            "reaction" => {
                let Some(r) = self.reaction else {
                    return ignored("a reaction without its content".into());
                };
                match (r.emoji.filter(|e| !e.is_empty()), r.message_id) {
                    (Some(emoji), Some(message_id)) => Event::Button(ButtonPress {
                        callback_id: self.id,
                        chat,
                        message_id,
                        sender,
                        data: format!("{REACTION_PREFIX}{emoji}"),
                    }),
                    (None, _) => ignored("a reaction removed".into()),
                    (_, None) => ignored("a reaction without its message".into()),
                }
            }
            "image" | "video" | "audio" | "voice" | "document" | "sticker" => {
                let media = match kind.as_str() {
                    "image" => self.image,
                    "video" => self.video,
                    "document" => self.document,
                    "sticker" => self.sticker,
                    _ => self.audio,
                };
                let Some(media) = media else {
                    return ignored(format!("a {kind} message without its media"));
                };
                Event::Message(Message {
                    chat,
                    message_id: self.id,
                    sender,
                    text: media.caption.clone().unwrap_or_default(),
                    mentioned: true,
                    reply_to: context_id,
                    attachments: vec![Attachment {
                        file_ref: media.id,
                        name: media.filename,
                        mime: media.mime_type,
                        size: None,
                    }],
                })
            }
            "" => ignored("a message without a type".into()),
            other => ignored(format!("a message of type {other}")),
        }
    }
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

    fn cfg(base: &str) -> WhatsAppConfig {
        let mut c = WhatsAppConfig::new(
            "106540352242922",
            Zeroizing::new("EAAGtokenvalue".into()),
            Zeroizing::new("appsecretvalue".into()),
            Zeroizing::new("verifytokenvalue".into()),
        )
        .unwrap();
        c.api_base = Url::parse(base).unwrap();
        c
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_accepted_on_it() {
        let err = WhatsApp::new(cfg("http://graph.example.org/v26.0")).unwrap_err();
        assert!(err.to_string().contains("plain http"), "{err}");
        WhatsApp::new(cfg("http://127.0.0.1:9/v26.0")).unwrap();
        WhatsApp::new(cfg(DEFAULT_API_BASE)).unwrap();
    }

    #[test]
    fn a_phone_number_instead_of_its_id_is_refused() {
        let mut c = cfg(DEFAULT_API_BASE);
        c.phone_number_id = "+1 555 0100".into();
        let err = WhatsApp::new(c).unwrap_err();
        assert!(err.to_string().contains("not a phone number id"), "{err}");
    }

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        assert_eq!(decode_hex("00ff7A"), Some(vec![0, 255, 122]));
        assert_eq!(encode_hex(&[0, 255, 122]), "00ff7a");
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex("é1"), None);
    }

    #[test]
    fn the_signature_matches_meta_s_documented_construction() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), RFC 4231 style
        // reference value.
        assert_eq!(
            signature(b"key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn a_long_text_with_buttons_becomes_text_pieces_then_an_interactive_message() {
        let buttons = vec![
            Button {
                label: "Approve".into(),
                data: "a:1".into(),
            },
            Button {
                label: "Deny".into(),
                data: "d:1".into(),
            },
        ];
        let text = "word ".repeat(1000);
        let pieces = plan(&text, &buttons).unwrap();
        let mut rebuilt = String::new();
        for (i, p) in pieces.iter().enumerate() {
            match p {
                Piece::Text(t) => {
                    assert!(i + 1 < pieces.len());
                    assert!(utf16_len(t) <= MAX_TEXT);
                    rebuilt.push_str(t);
                }
                Piece::Buttons(t, b) => {
                    assert_eq!(i + 1, pieces.len());
                    assert!(utf16_len(t) <= MAX_INTERACTIVE_BODY);
                    assert_eq!(b.len(), 2);
                    rebuilt.push_str(t);
                }
            }
        }
        assert_eq!(rebuilt, text);
        assert_eq!(
            pieces.len(),
            2,
            "5000 characters: one text, one interactive"
        );
    }
}
