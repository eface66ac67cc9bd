//! Telegram, over the Bot API (`<api_base>/bot<token>/<method>`, JSON bodies).
//!
//! A thin typed client over reqwest: rustls, no redirects (a redirect would carry the token,
//! which is in the URL path, to wherever it points), no proxy, bounded answers.
//!
//! - **Token.** It is part of every request's URL path, so it is kept out of everything else:
//!   request errors are taken `without_url()`, every error text is scrubbed of it, `Debug`
//!   shows `<redacted>`, and nothing here logs. Plain `http://` is accepted for `api_base`
//!   only on a loopback address (tests, a local Bot API server), so the token never crosses a
//!   network in clear.
//! - **Receiving.** Long polling with `getUpdates` (`offset` = the cursor, so a poll
//!   acknowledges what the previous one returned, never what it returns itself), or webhook
//!   requests checked against `X-Telegram-Bot-Api-Secret-Token` in constant time. Updates map
//!   to [`Event`]s; anything else (channel posts, member updates, service messages, messages
//!   sent on behalf of a chat, updates this adapter cannot read) becomes [`Event::Ignored`] so
//!   the engine acknowledges it and the queue never stalls on it.
//! - **Sending.** Plain text: no `parse_mode`, so nothing in the model's text is interpreted as
//!   markup (no forged links, mentions or formatting), and link previews are off (Telegram's
//!   servers would otherwise fetch any URL the model writes). Approvals use an inline
//!   keyboard; button presses arrive as `callback_query`.

#[cfg(feature = "fake")]
pub mod fake;

use std::fmt;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::http;
use crate::text::{check_button, check_sendable, truncate};
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ButtonPress, ChannelError, ChatKind, ChatRef,
    ConfigError, Event, Inbound, Limits, Message, OutMessage, Platform, Polled, SendError, Sender,
    Sent, WebhookParsed, WebhookRequest,
};

/// The public Bot API root.
pub const DEFAULT_API_BASE: &str = "https://api.telegram.org";
/// Longest message text, in UTF-16 code units.
pub const MAX_TEXT: usize = 4096;
/// Longest `callback_data` of a button, in bytes.
pub const MAX_BUTTON_DATA: usize = 64;
/// Longest text of a callback answer (`answerCallbackQuery`), in UTF-16 code units.
pub const MAX_CALLBACK_ANSWER: usize = 200;
/// The header Telegram sends the webhook secret in.
pub const SECRET_HEADER: &str = "X-Telegram-Bot-Api-Secret-Token";
/// Largest webhook body accepted (one update).
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;
/// Largest Bot API answer read (100 updates are far below it).
const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
/// Timeout of a request other than a long poll.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How much longer than its `timeout` a long poll may take before it counts as failed.
const POLL_GRACE: Duration = Duration::from_secs(15);
/// The wait when a 429 carries no `retry_after`.
const DEFAULT_RETRY_AFTER_SECS: u64 = 5;

/// How updates arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TelegramMode {
    /// `getUpdates` long polling ([`Platform::poll`]); `connect` deletes any webhook.
    Polling,
    /// Telegram posts updates to the gateway ([`Platform::webhook`]); register the URL
    /// with [`Telegram::set_webhook`].
    Webhook,
}

/// One Telegram channel's settings, credentials already released by the gateway.
pub struct TelegramConfig {
    /// The Bot API root (default [`DEFAULT_API_BASE`]); `https`, or `http` on loopback only.
    pub api_base: Url,
    /// The bot token (`123456:ABC…`).
    pub token: Zeroizing<String>,
    pub mode: TelegramMode,
    /// Required in webhook mode: Telegram's `secret_token` (1–256 of `A-Z a-z 0-9 _ -`).
    pub webhook_secret: Option<Zeroizing<String>>,
    /// The long poll's `timeout` (seconds the platform holds a poll open when idle).
    pub poll_timeout_secs: u32,
    /// `allowed_updates` for `getUpdates` and `setWebhook`.
    pub allowed_updates: Vec<String>,
}

impl TelegramConfig {
    /// Polling against the public API with a 30 s poll and the update kinds Chitin handles.
    pub fn new(token: Zeroizing<String>) -> Result<Self, ConfigError> {
        let api_base = Url::parse(DEFAULT_API_BASE)
            .map_err(|e| ConfigError::Invalid(format!("the default API root: {e}")))?;
        Ok(Self {
            api_base,
            token,
            mode: TelegramMode::Polling,
            webhook_secret: None,
            poll_timeout_secs: 30,
            allowed_updates: default_allowed_updates(),
        })
    }
}

/// `message`, `edited_message`, `callback_query`.
pub fn default_allowed_updates() -> Vec<String> {
    ["message", "edited_message", "callback_query"]
        .map(String::from)
        .to_vec()
}

impl fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelegramConfig")
            .field("api_base", &self.api_base.as_str())
            .field("token", &"<redacted>")
            .field("mode", &self.mode)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("poll_timeout_secs", &self.poll_timeout_secs)
            .field("allowed_updates", &self.allowed_updates)
            .finish()
    }
}

#[derive(Debug, Clone)]
struct Bot {
    id: i64,
    username: String,
}

/// The Telegram adapter. Build it with [`Telegram::new`], then `connect` before anything else
/// (mentions and replies to the bot are recognized from the account `connect` learns).
pub struct Telegram {
    /// The API root without a trailing `/`.
    base: String,
    token: Zeroizing<String>,
    mode: TelegramMode,
    webhook_secret: Option<Zeroizing<String>>,
    poll_timeout_secs: u32,
    allowed_updates: Vec<String>,
    http: reqwest::Client,
    bot: RwLock<Option<Bot>>,
}

impl fmt::Debug for Telegram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telegram")
            .field("api_base", &self.base)
            .field("token", &"<redacted>")
            .field("mode", &self.mode)
            .field("poll_timeout_secs", &self.poll_timeout_secs)
            .field("bot", &self.bot_snapshot().map(|b| b.username))
            .finish_non_exhaustive()
    }
}

/// Why a Bot API call failed (internal; mapped to [`SendError`] or [`ChannelError`]).
type CallError = http::CallError<ApiError>;

/// The platform's error answer.
#[derive(Debug)]
struct ApiError {
    code: u16,
    description: String,
    retry_after: Option<u64>,
    migrate_to: Option<i64>,
}

#[derive(Deserialize)]
struct ApiAnswer {
    ok: bool,
    result: Option<Value>,
    error_code: Option<u16>,
    description: Option<String>,
    #[serde(default)]
    parameters: ApiParameters,
}

#[derive(Deserialize, Default)]
struct ApiParameters {
    retry_after: Option<u64>,
    migrate_to_chat_id: Option<i64>,
}

impl Telegram {
    /// Checks the configuration and builds the HTTP client; sends nothing.
    pub fn new(cfg: TelegramConfig) -> Result<Self, ConfigError> {
        check_token(&cfg.token)?;
        http::check_api_root(&cfg.api_base, "api_base", "the token")?;
        if let Some(secret) = &cfg.webhook_secret {
            check_webhook_secret(secret)?;
        } else if cfg.mode == TelegramMode::Webhook {
            return Err(ConfigError::Invalid(
                "webhook mode needs `webhook_secret = \"secret:NAME\"` (1-256 of A-Z a-z 0-9 _ -)"
                    .into(),
            ));
        }
        // No redirects: one would carry the token (in the path) elsewhere.
        let http = http::client(http::USER_AGENT)?;
        Ok(Self {
            base: cfg.api_base.as_str().trim_end_matches('/').to_owned(),
            token: cfg.token,
            mode: cfg.mode,
            webhook_secret: cfg.webhook_secret,
            poll_timeout_secs: cfg.poll_timeout_secs,
            allowed_updates: cfg.allowed_updates,
            http,
            bot: RwLock::new(None),
        })
    }

    /// Registers `url` as the bot's webhook (`setWebhook` with the secret and
    /// `allowed_updates`; pending updates are kept). Webhook mode only.
    pub async fn set_webhook(&self, url: &Url) -> Result<(), ChannelError> {
        let Some(secret) = &self.webhook_secret else {
            return Err(ChannelError::Protocol(
                "set_webhook: this channel has no webhook secret".into(),
            ));
        };
        if self.mode != TelegramMode::Webhook {
            return Err(ChannelError::Protocol(
                "set_webhook: this channel is in polling mode".into(),
            ));
        }
        let params = json!({
            "url": url.as_str(),
            "secret_token": secret.as_str(),
            "allowed_updates": self.allowed_updates,
            "drop_pending_updates": false,
        });
        self.call("setWebhook", &params, REQUEST_TIMEOUT)
            .await
            .map(drop)
            .map_err(channel_error)
    }

    /// Removes the webhook (`deleteWebhook`, pending updates kept).
    pub async fn delete_webhook(&self) -> Result<(), ChannelError> {
        let params = json!({ "drop_pending_updates": false });
        self.call("deleteWebhook", &params, REQUEST_TIMEOUT)
            .await
            .map(drop)
            .map_err(channel_error)
    }

    fn bot_snapshot(&self) -> Option<Bot> {
        self.bot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn get_me(&self) -> Result<Bot, ChannelError> {
        let me = self
            .call("getMe", &json!({}), REQUEST_TIMEOUT)
            .await
            .map_err(channel_error)?;
        let id = me.get("id").and_then(Value::as_i64);
        let username = me.get("username").and_then(Value::as_str);
        let (Some(id), Some(username)) = (id, username) else {
            return Err(ChannelError::Protocol(
                "getMe answered without the bot's id and username".into(),
            ));
        };
        let bot = Bot {
            id,
            username: username.to_owned(),
        };
        *self.bot.write().unwrap_or_else(PoisonError::into_inner) = Some(bot.clone());
        Ok(bot)
    }

    /// The credential every text leaving this adapter is scrubbed of.
    fn secrets(&self) -> [&str; 1] {
        [self.token.as_str()]
    }

    /// One Bot API call: POST JSON to `<base>/bot<token>/<method>`; the `result` on success.
    async fn call(
        &self,
        method: &str,
        params: &Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let url = Zeroizing::new(format!("{}/bot{}/{method}", self.base, self.token.as_str()));
        let mut resp = self
            .http
            .post(url.as_str())
            .timeout(timeout)
            .json(params)
            .send()
            .await
            .map_err(|e| CallError::network(method, e, true, &self.secrets()))?;
        let status = resp.status().as_u16();
        let header_retry = http::retry_after_secs(resp.headers());
        let body = http::read_answer(method, &mut resp, MAX_ANSWER_BYTES, &self.secrets()).await?;
        let success = (200..300).contains(&status);
        match serde_json::from_slice::<ApiAnswer>(&body) {
            Ok(answer) if answer.ok && success => answer.result.ok_or_else(|| {
                CallError::BadAnswer(format!("{method}: the answer has no `result`"))
            }),
            Ok(answer) => Err(CallError::Api(ApiError {
                code: if success {
                    answer.error_code.unwrap_or(500)
                } else {
                    status
                },
                description: http::redact(
                    answer
                        .description
                        .unwrap_or_else(|| format!("HTTP {status}")),
                    &self.secrets(),
                ),
                retry_after: answer.parameters.retry_after.or(header_retry),
                migrate_to: answer.parameters.migrate_to_chat_id,
            })),
            Err(_) if success => Err(CallError::BadAnswer(format!(
                "{method}: HTTP {status} with a body that is not a Bot API answer"
            ))),
            Err(_) => Err(CallError::Api(ApiError {
                code: status,
                description: format!("{method}: HTTP {status} without a Bot API answer"),
                retry_after: header_retry,
                migrate_to: None,
            })),
        }
    }

    /// Maps one update (its `update_id` already read) to an event.
    fn map_update(&self, update_id: i64, update: &Value, bot: Option<&Bot>) -> Inbound {
        let event = match Update::deserialize(update) {
            Ok(u) => u.into_event(bot),
            Err(_) => Event::Ignored {
                what: "an update this adapter cannot read".into(),
            },
        };
        Inbound {
            event_id: format!("u:{update_id}"),
            event,
        }
    }

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        check_text(&msg.text)?;
        let mut params = json!({
            "chat_id": chat_id(&msg.chat.id),
            "text": msg.text,
            "link_preview_options": { "is_disabled": true },
        });
        if let Some(thread) = thread_id(&msg.chat)? {
            params["message_thread_id"] = thread.into();
        }
        if let Some(reply_to) = &msg.reply_to {
            params["reply_parameters"] = json!({
                "message_id": message_id(reply_to)?,
                "allow_sending_without_reply": true,
            });
        }
        if !msg.buttons.is_empty() {
            params["reply_markup"] = keyboard(&msg.buttons)?;
        }
        let result = self
            .call("sendMessage", &params, REQUEST_TIMEOUT)
            .await
            .map_err(send_error)?;
        match result.get("message_id").and_then(Value::as_i64) {
            Some(id) => Ok(Sent {
                message_id: id.to_string(),
            }),
            None => Err(SendError::Transient {
                message: "sendMessage: the answer has no message_id".into(),
                maybe_delivered: true,
            }),
        }
    }

    /// `getFile`, then the download from `<base>/file/bot<token>/<file_path>`, bounded by
    /// `max_bytes` (the announced size is checked first, the bytes read as they come).
    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        http::check_size(a.size, max_bytes)?;
        let file = self
            .call(
                "getFile",
                &json!({ "file_id": a.file_ref }),
                REQUEST_TIMEOUT,
            )
            .await
            .map_err(channel_error)?;
        http::check_size(file.get("file_size").and_then(Value::as_u64), max_bytes)?;
        let Some(path) = file.get("file_path").and_then(Value::as_str) else {
            return Err(ChannelError::Protocol(
                "getFile answered without a file_path (the file may be larger than 20 MB)".into(),
            ));
        };
        if path.is_empty()
            || path.contains("..")
            || path.starts_with('/')
            || !path
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
        {
            return Err(ChannelError::Protocol(
                "getFile answered a file_path this adapter does not fetch".into(),
            ));
        }
        let url = Zeroizing::new(format!(
            "{}/file/bot{}/{path}",
            self.base,
            self.token.as_str()
        ));
        let req = self.http.get(url.as_str()).timeout(REQUEST_TIMEOUT * 4);
        http::download(req, "file download", max_bytes, &self.secrets(), |_| None).await
    }

    async fn edit_inner(
        &self,
        chat: &ChatRef,
        id: &str,
        text: &str,
        buttons: Option<&[Button]>,
    ) -> Result<(), SendError> {
        check_text(text)?;
        let params = json!({
            "chat_id": chat_id(&chat.id),
            "message_id": message_id(id)?,
            "text": text,
            "link_preview_options": { "is_disabled": true },
            // An empty keyboard removes the buttons.
            "reply_markup": keyboard(buttons.unwrap_or(&[]))?,
        });
        match self.call("editMessageText", &params, REQUEST_TIMEOUT).await {
            Ok(_) => Ok(()),
            // Same text and buttons as now: the message already shows what was asked.
            Err(CallError::Api(ApiError {
                code: 400,
                description,
                ..
            })) if description.contains("message is not modified") => Ok(()),
            Err(e) => Err(send_error(e)),
        }
    }
}

impl Platform for Telegram {
    fn kind(&self) -> &'static str {
        "telegram"
    }

    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: MAX_BUTTON_DATA,
        }
    }

    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            let bot = self.get_me().await?;
            if self.mode == TelegramMode::Polling {
                // getUpdates refuses to run while a webhook is set.
                self.delete_webhook().await?;
            }
            Ok(BotInfo {
                id: bot.id.to_string(),
                username: bot.username,
            })
        })
    }

    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(async move {
            if self.mode == TelegramMode::Webhook {
                return Err(ChannelError::Protocol(
                    "this channel is in webhook mode: its events arrive on the webhook".into(),
                ));
            }
            let offset = match cursor {
                Some(c) => Some(c.parse::<i64>().map_err(|_| {
                    ChannelError::Protocol(format!("the cursor {c:?} is not a getUpdates offset"))
                })?),
                None => None,
            };
            let bot = match self.bot_snapshot() {
                Some(b) => b,
                None => self.get_me().await?,
            };
            let mut params = json!({
                "timeout": self.poll_timeout_secs,
                "allowed_updates": self.allowed_updates,
                "limit": 100,
            });
            if let Some(offset) = offset {
                params["offset"] = offset.into();
            }
            let timeout = Duration::from_secs(self.poll_timeout_secs.into()) + POLL_GRACE;
            let result = self
                .call("getUpdates", &params, timeout)
                .await
                .map_err(channel_error)?;
            let Some(updates) = result.as_array() else {
                return Err(ChannelError::Protocol(
                    "getUpdates did not answer a list".into(),
                ));
            };
            let mut events = Vec::with_capacity(updates.len());
            let mut next = offset;
            for update in updates {
                let Some(id) = update.get("update_id").and_then(Value::as_i64) else {
                    return Err(ChannelError::Protocol(
                        "getUpdates answered an update without update_id".into(),
                    ));
                };
                next = Some(next.map_or(id + 1, |n| n.max(id + 1)));
                events.push(self.map_update(id, update, Some(&bot)));
            }
            let cursor = if events.is_empty() {
                None
            } else {
                next.map(|n| n.to_string())
            };
            Ok(Polled { events, cursor })
        })
    }

    fn webhook(&self, req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        if req.route != "webhook" || req.method != "POST" {
            return Err(ChannelError::NoSuchRoute);
        }
        let refuse = |why: &str| Err(ChannelError::WebhookRefused(why.to_owned()));
        if self.mode != TelegramMode::Webhook {
            return refuse("this channel is in polling mode: it takes no webhook requests");
        }
        let Some(expected) = &self.webhook_secret else {
            return refuse("this channel has no webhook secret");
        };
        let mut given = req.header_values(SECRET_HEADER);
        let (first, second) = (given.next(), given.next());
        let Some(value) = first else {
            return refuse("the X-Telegram-Bot-Api-Secret-Token header is missing");
        };
        if second.is_some() {
            return refuse("more than one X-Telegram-Bot-Api-Secret-Token header");
        }
        // Constant time in the content (a length mismatch is decided at once).
        if !bool::from(value.as_bytes().ct_eq(expected.as_bytes())) {
            return refuse("the X-Telegram-Bot-Api-Secret-Token header is wrong");
        }
        let body = req.body;
        if body.len() > MAX_WEBHOOK_BODY {
            return Err(ChannelError::BadWebhook(format!(
                "the body is larger than {MAX_WEBHOOK_BODY} bytes"
            )));
        }
        let update: Value = serde_json::from_slice(body)
            .map_err(|e| ChannelError::BadWebhook(format!("the body is not JSON: {e}")))?;
        let Some(id) = update.get("update_id").and_then(Value::as_i64) else {
            return Err(ChannelError::BadWebhook(
                "the body is not an update (no update_id)".into(),
            ));
        };
        let bot = self.bot_snapshot();
        Ok(WebhookParsed {
            events: vec![self.map_update(id, &update, bot.as_ref())],
            reply: None,
        })
    }

    fn fetch_attachment<'a>(
        &'a self,
        attachment: &'a Attachment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(self.fetch_inner(attachment, max_bytes))
    }

    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>> {
        Box::pin(self.send_inner(msg))
    }

    fn edit<'a>(
        &'a self,
        chat: &'a ChatRef,
        message_id: &'a str,
        text: &'a str,
        buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.edit_inner(chat, message_id, text, buttons))
    }

    fn answer_button<'a>(
        &'a self,
        callback_id: &'a str,
        text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let mut params = json!({ "callback_query_id": callback_id });
            if !text.is_empty() {
                params["text"] = truncate(text, MAX_CALLBACK_ANSWER).into();
            }
            self.call("answerCallbackQuery", &params, REQUEST_TIMEOUT)
                .await
                .map(drop)
                .map_err(send_error)
        })
    }

    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let mut params = json!({ "chat_id": chat_id(&chat.id), "action": "typing" });
            if let Some(thread) = thread_id(chat)? {
                params["message_thread_id"] = thread.into();
            }
            self.call("sendChatAction", &params, REQUEST_TIMEOUT)
                .await
                .map(drop)
                .map_err(send_error)
        })
    }
}

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|api| match api {
        ApiError {
            code: 429,
            retry_after,
            ..
        } => SendError::RateLimited {
            retry_after: Duration::from_secs(retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECS)),
        },
        // The platform received the request; whether it acted on it is unknown.
        ApiError {
            code: 500..,
            description,
            ..
        } => SendError::Transient {
            message: description,
            maybe_delivered: true,
        },
        ApiError {
            code: 401 | 404,
            description,
            ..
        } => SendError::Permanent(format!(
            "{description}: the bot's token was refused; check it (`chitin secrets set`) and `api_base`"
        )),
        ApiError {
            description,
            migrate_to: Some(to),
            ..
        } => SendError::Permanent(format!(
            "{description}: the group became the supergroup {to}; its conversation continues there"
        )),
        ApiError { description, .. } => SendError::Permanent(description),
    })
}

fn channel_error(e: CallError) -> ChannelError {
    e.into_channel_error(|api| match api {
        ApiError {
            code: 429,
            retry_after,
            ..
        } => ChannelError::RateLimited {
            retry_after: Duration::from_secs(retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECS)),
        },
        ApiError {
            code: 500..,
            description,
            ..
        } => ChannelError::Transient(description),
        ApiError {
            code: 401 | 403 | 404,
            description,
            ..
        } => ChannelError::Unauthorized(description),
        ApiError {
            code: 409,
            description,
            ..
        } => ChannelError::Transient(format!(
            "{description} (another process polls this bot, or a webhook is set)"
        )),
        ApiError { description, .. } => ChannelError::Protocol(description),
    })
}

fn check_token(token: &str) -> Result<(), ConfigError> {
    let ok = token.split_once(':').is_some_and(|(id, rest)| {
        !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_digit())
            && !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    });
    if ok {
        Ok(())
    } else {
        // Never echo the value: it may be a real credential pasted in the wrong place.
        Err(ConfigError::Invalid(
            "the bot token is not of the form <digits>:<letters, digits, _ or -> (as BotFather \
             gives it); set it again with `chitin secrets set`"
                .into(),
        ))
    }
}

fn check_webhook_secret(secret: &str) -> Result<(), ConfigError> {
    let ok = (1..=256).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(
            "the webhook secret must be 1-256 of A-Z a-z 0-9 _ - (Telegram's secret_token)".into(),
        ))
    }
}

/// A text Telegram would refuse, refused here without a request.
fn check_text(text: &str) -> Result<(), SendError> {
    check_sendable(text, MAX_TEXT, Some("Telegram"), "Telegram's")
}

fn chat_id(id: &str) -> Value {
    match id.parse::<i64>() {
        Ok(n) => n.into(),
        // `@channelusername`
        Err(_) => id.into(),
    }
}

fn message_id(id: &str) -> Result<i64, SendError> {
    id.parse::<i64>()
        .map_err(|_| SendError::Permanent(format!("{id:?} is not a Telegram message id")))
}

fn thread_id(chat: &ChatRef) -> Result<Option<i64>, SendError> {
    chat.thread
        .as_deref()
        .map(|t| {
            t.parse::<i64>()
                .map_err(|_| SendError::Permanent(format!("{t:?} is not a Telegram topic id")))
        })
        .transpose()
}

/// One row of callback buttons.
fn keyboard(buttons: &[Button]) -> Result<Value, SendError> {
    let mut row = Vec::with_capacity(buttons.len());
    for b in buttons {
        check_button(b, MAX_BUTTON_DATA, "Telegram")?;
        row.push(json!({ "text": b.label, "callback_data": b.data }));
    }
    let rows: Vec<Value> = if row.is_empty() {
        vec![]
    } else {
        vec![Value::Array(row)]
    };
    Ok(json!({ "inline_keyboard": rows }))
}

// ---- The update wire format (only the fields used) ----

#[derive(Deserialize)]
struct Update {
    message: Option<TgMessage>,
    edited_message: Option<TgMessage>,
    callback_query: Option<CallbackQuery>,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

#[derive(Deserialize)]
struct TgMessage {
    message_id: i64,
    from: Option<TgUser>,
    sender_chat: Option<Value>,
    chat: TgChat,
    message_thread_id: Option<i64>,
    #[serde(default)]
    is_topic_message: bool,
    text: Option<String>,
    caption: Option<String>,
    #[serde(default)]
    entities: Vec<Entity>,
    #[serde(default)]
    caption_entities: Vec<Entity>,
    reply_to_message: Option<Box<RepliedTo>>,
    photo: Option<Vec<TgFile>>,
    document: Option<TgFile>,
    video: Option<TgFile>,
    audio: Option<TgFile>,
    voice: Option<TgFile>,
    video_note: Option<TgFile>,
    animation: Option<TgFile>,
    sticker: Option<TgFile>,
}

#[derive(Deserialize)]
struct RepliedTo {
    message_id: i64,
    from: Option<TgUser>,
    /// Set on a topic's first message: every message in a topic "replies" to it implicitly.
    forum_topic_created: Option<Value>,
}

#[derive(Deserialize)]
struct TgUser {
    id: i64,
    #[serde(default)]
    is_bot: bool,
    #[serde(default)]
    first_name: String,
    last_name: Option<String>,
    username: Option<String>,
}

#[derive(Deserialize)]
struct TgChat {
    id: i64,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Entity {
    #[serde(rename = "type")]
    kind: String,
    /// In UTF-16 code units.
    offset: usize,
    length: usize,
    user: Option<TgUser>,
}

#[derive(Deserialize)]
struct TgFile {
    file_id: String,
    file_name: Option<String>,
    mime_type: Option<String>,
    file_size: Option<u64>,
}

#[derive(Deserialize)]
struct CallbackQuery {
    id: String,
    from: TgUser,
    message: Option<CallbackMessage>,
    data: Option<String>,
}

#[derive(Deserialize)]
struct CallbackMessage {
    message_id: i64,
    chat: TgChat,
    message_thread_id: Option<i64>,
    #[serde(default)]
    is_topic_message: bool,
}

impl Update {
    fn into_event(self, bot: Option<&Bot>) -> Event {
        let ignored = |what: String| Event::Ignored { what };
        if let Some(m) = self.message {
            return m.into_message(bot).map_or_else(ignored, Event::Message);
        }
        if let Some(m) = self.edited_message {
            return m.into_message(bot).map_or_else(ignored, Event::Edited);
        }
        if let Some(q) = self.callback_query {
            return q.into_press().map_or_else(ignored, Event::Button);
        }
        let kind = self
            .other
            .keys()
            .find(|k| k.as_str() != "update_id")
            .map_or("an empty update", String::as_str);
        ignored(kind.to_owned())
    }
}

fn chat_kind(kind: &str) -> Result<ChatKind, String> {
    match kind {
        "private" => Ok(ChatKind::Dm),
        "group" | "supergroup" => Ok(ChatKind::Group),
        other => Err(format!("a message in a {other} chat")),
    }
}

fn thread(is_topic: bool, thread_id: Option<i64>) -> Option<String> {
    if is_topic {
        thread_id.map(|t| t.to_string())
    } else {
        None
    }
}

impl TgUser {
    fn sender(&self) -> Sender {
        let mut display = self.first_name.clone();
        if let Some(last) = &self.last_name {
            if !display.is_empty() {
                display.push(' ');
            }
            display.push_str(last);
        }
        if display.trim().is_empty() {
            display = self.username.clone().unwrap_or_else(|| self.id.to_string());
        }
        Sender {
            id: self.id.to_string(),
            display,
            is_bot: self.is_bot,
        }
    }
}

impl TgFile {
    fn attachment(&self, mime: Option<&str>) -> Attachment {
        Attachment {
            file_ref: self.file_id.clone(),
            name: self.file_name.clone(),
            mime: self.mime_type.clone().or_else(|| mime.map(String::from)),
            size: self.file_size,
        }
    }
}

impl TgMessage {
    fn attachments(&self) -> Vec<Attachment> {
        let mut out: Vec<Attachment> = Vec::new();
        // The largest size of a photo is the last one.
        if let Some(largest) = self.photo.as_ref().and_then(|sizes| sizes.last()) {
            out.push(largest.attachment(Some("image/jpeg")));
        }
        let files = [
            (&self.animation, None),
            (&self.document, None),
            (&self.video, None),
            (&self.audio, None),
            (&self.voice, Some("audio/ogg")),
            (&self.video_note, Some("video/mp4")),
            (&self.sticker, None),
        ];
        for (file, mime) in files {
            if let Some(f) = file {
                // An animation comes with the same file as `document` too.
                if !out.iter().any(|a| a.file_ref == f.file_id) {
                    out.push(f.attachment(mime));
                }
            }
        }
        out
    }

    fn into_message(self, bot: Option<&Bot>) -> Result<Message, String> {
        let kind = chat_kind(&self.chat.kind)?;
        if self.sender_chat.is_some() {
            // Anonymous group admins and linked channels all share one user id: admitting it
            // would admit every one of them.
            return Err("a message sent on behalf of a chat (anonymous admin or channel)".into());
        }
        let Some(from) = &self.from else {
            return Err("a message without a sender".into());
        };
        let attachments = self.attachments();
        let (text, entities) = match (self.text, self.caption) {
            (Some(t), _) => (t, self.entities),
            (None, Some(c)) => (c, self.caption_entities),
            (None, None) => (String::new(), Vec::new()),
        };
        if text.is_empty() && attachments.is_empty() {
            return Err("a service message or content Chitin does not handle".into());
        }
        let reply = self
            .reply_to_message
            .filter(|r| r.forum_topic_created.is_none());
        let reply_to_bot = match (bot, &reply) {
            (Some(bot), Some(r)) => r.from.as_ref().is_some_and(|f| f.id == bot.id),
            _ => false,
        };
        let mentioned = reply_to_bot || addressed(&text, &entities, kind, bot);
        Ok(Message {
            chat: ChatRef {
                id: self.chat.id.to_string(),
                kind,
                thread: thread(self.is_topic_message, self.message_thread_id),
            },
            message_id: self.message_id.to_string(),
            sender: from.sender(),
            text,
            mentioned,
            reply_to: reply.map(|r| r.message_id.to_string()),
            attachments,
        })
    }
}

/// The text addresses the bot: an `@botname` mention, a `/cmd@botname` command, any command
/// in a DM, or a text mention of the bot's account. Only the platform's entities count (a
/// `@botname` inside a code span or a longer name is not a mention).
fn addressed(text: &str, entities: &[Entity], kind: ChatKind, bot: Option<&Bot>) -> bool {
    let units: Vec<u16> = text.encode_utf16().collect();
    entities.iter().any(|e| {
        let Some(slice) = units.get(e.offset..e.offset.saturating_add(e.length)) else {
            return false;
        };
        let s = String::from_utf16_lossy(slice);
        let is_bot = |name: &str| bot.is_some_and(|b| name.eq_ignore_ascii_case(&b.username));
        match e.kind.as_str() {
            "mention" => s.strip_prefix('@').is_some_and(is_bot),
            "bot_command" => match s.split_once('@') {
                Some((_, name)) => is_bot(name),
                None => kind == ChatKind::Dm,
            },
            "text_mention" => bot.is_some_and(|b| e.user.as_ref().is_some_and(|u| u.id == b.id)),
            _ => false,
        }
    })
}

impl CallbackQuery {
    fn into_press(self) -> Result<ButtonPress, String> {
        let Some(msg) = self.message else {
            return Err("a button under an inline-mode message".into());
        };
        let Some(data) = self.data else {
            return Err("a game button".into());
        };
        let kind = chat_kind(&msg.chat.kind)?;
        Ok(ButtonPress {
            callback_id: self.id,
            chat: ChatRef {
                id: msg.chat.id.to_string(),
                kind,
                thread: thread(msg.is_topic_message, msg.message_thread_id),
            },
            message_id: msg.message_id.to_string(),
            sender: self.from.sender(),
            data,
        })
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

    fn cfg(base: &str, token: &str) -> TelegramConfig {
        let mut c = TelegramConfig::new(Zeroizing::new(token.into())).unwrap();
        c.api_base = Url::parse(base).unwrap();
        c
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_accepted_on_it() {
        let err = Telegram::new(cfg("http://api.example.org", "1:abc")).unwrap_err();
        assert!(
            err.to_string()
                .contains("plain http on a non-loopback host"),
            "{err}"
        );
        Telegram::new(cfg("http://127.0.0.1:9", "1:abc")).unwrap();
        Telegram::new(cfg("http://[::1]:9", "1:abc")).unwrap();
        Telegram::new(cfg("https://api.telegram.org", "1:abc")).unwrap();
    }

    #[test]
    fn a_malformed_token_is_refused_without_echoing_it() {
        let err = Telegram::new(cfg("https://api.telegram.org", "12:ab/../cd")).unwrap_err();
        assert!(!err.to_string().contains("ab/../cd"), "{err}");
        assert!(err.to_string().contains("not of the form"), "{err}");
    }

    #[test]
    fn webhook_mode_without_a_secret_is_refused() {
        let mut c = cfg("https://api.telegram.org", "1:abc");
        c.mode = TelegramMode::Webhook;
        let err = Telegram::new(c).unwrap_err();
        assert!(err.to_string().contains("webhook mode needs"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_token_and_secret() {
        let mut c = cfg("https://api.telegram.org", "777:SECRETTOKENVALUE");
        c.webhook_secret = Some(Zeroizing::new("WEBHOOKSECRET".into()));
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRETTOKENVALUE") && !shown.contains("WEBHOOKSECRET"));
        let tg = Telegram::new(c).unwrap();
        let shown = format!("{tg:?}");
        assert!(!shown.contains("SECRETTOKENVALUE") && !shown.contains("WEBHOOKSECRET"));
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn mentions_count_only_as_entities_naming_this_bot() {
        let bot = Bot {
            id: 42,
            username: "chitin_bot".into(),
        };
        let ent = |kind: &str, offset, length| Entity {
            kind: kind.into(),
            offset,
            length,
            user: None,
        };
        // "😀 @Chitin_Bot hi": the emoji is 2 UTF-16 units, so the mention starts at 3.
        let text = "😀 @Chitin_Bot hi";
        assert!(addressed(
            text,
            &[ent("mention", 3, 11)],
            ChatKind::Group,
            Some(&bot)
        ));
        assert!(!addressed(
            "@chitin_botx",
            &[ent("mention", 0, 12)],
            ChatKind::Group,
            Some(&bot)
        ));
        assert!(!addressed(
            "`@chitin_bot`",
            &[ent("code", 0, 13)],
            ChatKind::Group,
            Some(&bot)
        ));
        assert!(addressed(
            "/help@chitin_bot",
            &[ent("bot_command", 0, 16)],
            ChatKind::Group,
            Some(&bot)
        ));
        assert!(!addressed(
            "/help",
            &[ent("bot_command", 0, 5)],
            ChatKind::Group,
            Some(&bot)
        ));
        assert!(addressed(
            "/help",
            &[ent("bot_command", 0, 5)],
            ChatKind::Dm,
            Some(&bot)
        ));
        assert!(!addressed(
            "/help@other_bot",
            &[ent("bot_command", 0, 15)],
            ChatKind::Dm,
            Some(&bot)
        ));
        // An entity past the end of the text is ignored, not a panic.
        assert!(!addressed(
            "hi",
            &[ent("mention", 1, 50)],
            ChatKind::Group,
            Some(&bot)
        ));
    }
}
