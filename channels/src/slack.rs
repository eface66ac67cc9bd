//! Slack, over the Web API (`POST <api_base>/<method>`, JSON bodies, `Authorization: Bearer`),
//! the Events API (signed HTTP requests the gateway hands to [`Platform::webhook`]) or Socket
//! Mode (a WebSocket this adapter opens, read by [`Platform::poll`]).
//!
//! - **Credentials.** The bot token (`xoxb-`), the app-level token (`xapp-`, Socket Mode) and
//!   the signing secret (Events API) travel only in the `Authorization` header (marked
//!   sensitive) or into the HMAC; they are never in a URL, so no error text or log line can
//!   carry them. `Debug` shows `<redacted>`, every error text is scrubbed of them anyway, the
//!   HTTP client follows no redirect and uses no proxy, and plain `http://` is accepted for
//!   `api_base` only on a loopback address (tests).
//! - **Events API** (`SlackMode::Events`). Two routes: `POST events` (JSON event callbacks) and
//!   `POST interactivity` (`payload=<json>`, form-encoded). Both must carry exactly one
//!   `X-Slack-Request-Timestamp` within [`MAX_CLOCK_SKEW_SECS`] of the adapter's clock
//!   ([`SlackConfig::clock`]) and exactly one `X-Slack-Signature` equal to `v0=` + hex
//!   HMAC-SHA256(signing secret, `v0:<timestamp>:<raw body>`), compared in constant time;
//!   anything else is [`ChannelError::WebhookRefused`] with the reason. A `url_verification`
//!   request is answered with its `challenge` as `text/plain` ([`WebhookParsed::reply`]).
//!   Slack retries a request that was not answered in 3 s with `X-Slack-Retry-Num`; a retry is
//!   the same event with the same ids, so the engine's deduplication drops it.
//! - **Socket Mode** (`SlackMode::Socket`): see the `socket` module. `apps.connections.open`
//!   with the app token gives a single-use `wss://` URL; envelopes are acknowledged
//!   (`{"envelope_id": …}`) by the *next* poll, the ids travelling in the cursor, so nothing is
//!   acknowledged before the engine committed it, and Slack redelivers what was not.
//! - **Event ids** (the engine's deduplication key). A new message is `m:<channel>:<ts>`, from
//!   a `message` event *and* from an `app_mention` event: Slack sends both for one message that
//!   mentions the bot in a channel where the app also receives every message, each with its own
//!   `event_id`; keying them by the message makes the engine keep whichever arrives first and
//!   drop the other, while an app subscribed to `app_mention` only still receives mentions.
//!   Edits and events Chitin ignores are `e:<event_id>`, button presses
//!   `a:<user>:<action_ts>`, other interactive payloads `i:<sha-256 prefix of the payload>`,
//!   Socket Mode envelopes with nothing to map `s:<envelope_id>`. All are stable across
//!   Slack's retries and redeliveries.
//! - **Conversations.** `channel_type` `im` is a DM; `channel`, `group` (private channel) and
//!   `mpim` (group DM) are groups (without `channel_type`, as in `app_mention` and
//!   interactivity payloads, a channel id starting with `D` is a DM). **Threads are sessions:**
//!   a reply in a thread has `ChatRef.thread = thread_ts`; a top-level message in a group
//!   starts a thread keyed by its own `ts` (the answer goes under it, and the replies there
//!   continue that session), so unrelated questions in one channel do not share a session; a
//!   top-level DM message has no thread (the DM is one session), a reply in a DM thread is that
//!   thread's session. [`OutMessage::reply_to`] is not used: Slack replies are thread replies,
//!   and [`ChatRef::thread`] already says which thread.
//! - **Mentions.** A message is addressed to the bot when it is in a DM, when its raw text
//!   contains `<@BOTUSERID>` (or `<@BOTUSERID|name>`), when it came as an `app_mention`, or when
//!   it replies in a thread whose parent the bot wrote (`parent_user_id`). The bot's user id is
//!   learnt by `connect` (`auth.test`) or, before that, from the event's `authorizations`.
//!   Messages with a `bot_id` (other bots, the bot itself) are ignored; `message_changed` is an
//!   [`Event::Edited`]; `file_share` and `thread_broadcast` are messages; every other subtype
//!   (joins, deletions, channel topic changes, …) is [`Event::Ignored`]. Incoming text has
//!   Slack's three entities (`&amp;`, `&lt;`, `&gt;`) decoded after the mention check, so the
//!   agent reads what the user typed; `<@U…>`, `<#C…>` and `<https://…|label>` stay as Slack
//!   wrote them.
//! - **Sending: escaping.** The model's text is sent with `&`, `<` and `>` replaced by `&amp;`,
//!   `&lt;` and `&gt;` ([`escape`]), the only characters Slack interprets as control sequences:
//!   model text therefore cannot form a link with a misleading label, a user mention
//!   (`<@U…>`), a channel link or a broadcast (`<!channel>`, `<!here>`, `<!everyone>`). `parse`
//!   is `none` and `link_names` false, so a bare `@channel` or `@name` is not turned into a
//!   mention either; link unfurling is off (Slack's servers would otherwise fetch any URL the
//!   model writes). Slack still renders `*bold*`, `_italic_` and code spans (cosmetic only) and
//!   turns bare URLs into links, as every client does. With buttons, the text goes in `section`
//!   blocks (`mrkdwn`, `verbatim: true`, escaped the same way, split at Slack's 3000 characters
//!   per block) followed by one `actions` block of buttons whose `value` is [`Button::data`];
//!   the top-level `text` stays as the notification fallback.
//! - **Limits.** [`MAX_TEXT`] = 4000 UTF-16 units: Slack truncates a message's `text` beyond
//!   40,000 characters and recommends at most 4000; escaping can grow the text up to five
//!   times (`&` → `&amp;`), and 4000 × 5 stays under 40,000, so nothing is ever truncated.
//!   [`MAX_BUTTON_DATA`] = 2000 bytes (a button's `value` holds at most 2000 characters; bytes
//!   are never fewer than characters). Button labels are cut at 75 characters.
//! - **Buttons.** A press (`block_actions`) is [`Event::Button`] with the message's `ts` as
//!   `message_id` and a `callback_id` of `<channel> <user>[ <thread_ts>]`: [`Platform::answer_button`]
//!   shows its text to the presser alone with `chat.postEphemeral` (in the thread, if any).
//!   The payload's `response_url` is never called (it is a URL chosen by whoever sent the
//!   payload; the ephemeral message needs none).
//! - **Typing.** Slack's Web API has no typing indicator for bots (the RTM `typing` message is
//!   gone with RTM), so [`Platform::typing`] is a no-op that succeeds.
//! - **Files.** A message's files become [`Attachment`]s whose `file_ref` is
//!   `<file id> <url_private_download>`; [`Platform::fetch_attachment`] downloads that URL with
//!   the bot token only when it is on `https://files.slack.com` or on the `api_base` host
//!   (tests), never following a redirect, and refuses more than `max_bytes`. Files without a
//!   download URL (Slack Connect files that need `files.info`) are left out.

#[cfg(feature = "fake")]
pub mod fake;
mod socket;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::http;
use crate::text::{check_button, check_sendable, split, truncate, utf16_len};
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ButtonPress, ChannelError, ChatKind, ChatRef,
    ConfigError, Event, Inbound, Limits, Message, OutMessage, Platform, Polled, SendError, Sender,
    Sent, WebhookBody, WebhookParsed, WebhookRequest,
};

/// The public Web API root.
pub const DEFAULT_API_BASE: &str = "https://slack.com/api";
/// Longest message text, in UTF-16 code units (see the module documentation).
pub const MAX_TEXT: usize = 4000;
/// Longest button `value`, in bytes.
pub const MAX_BUTTON_DATA: usize = 2000;
/// Longest text of one `section` block, in characters (Slack: 3000).
pub const MAX_SECTION_TEXT: usize = 3000;
/// Longest button label, in characters (Slack: 75).
pub const MAX_BUTTON_LABEL: usize = 75;
/// Most buttons in one `actions` block (Slack: 25).
pub const MAX_BUTTONS: usize = 25;
/// The header with the request signature.
pub const SIGNATURE_HEADER: &str = "X-Slack-Signature";
/// The header with the request's Unix time, in seconds.
pub const TIMESTAMP_HEADER: &str = "X-Slack-Request-Timestamp";
/// A signed request whose timestamp is further than this from the adapter's clock is refused
/// (Slack's recommendation: 5 minutes), so a captured request cannot be replayed later.
pub const MAX_CLOCK_SKEW_SECS: i64 = 300;
/// Largest webhook body accepted (one event or one interaction).
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;
/// The only host attachments are downloaded from (besides the `api_base` host).
pub const FILES_HOST: &str = "files.slack.com";
/// Largest Web API answer read.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Timeout of one Web API request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The wait when a 429 carries no `Retry-After` (Slack's limits are per minute).
const DEFAULT_RETRY_AFTER_SECS: u64 = 30;

/// Wall-clock time in milliseconds since the Unix epoch. The gateway passes its own clock
/// (`Arc::new(move || clock.now_ms())`); tests pass a fixed one.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
}

/// How events arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlackMode {
    /// Slack posts signed requests to the gateway (`/channels/<name>/events` and
    /// `/channels/<name>/interactivity`, set as the app's Request URLs); needs the signing
    /// secret.
    Events,
    /// The adapter opens a WebSocket (no public URL needed); needs the app-level token.
    Socket,
}

/// One Slack channel's settings, credentials already released by the gateway.
pub struct SlackConfig {
    /// The Web API root (default [`DEFAULT_API_BASE`]); `https`, or `http` on loopback only.
    pub api_base: Url,
    /// The bot token (`xoxb-…`).
    pub bot_token: Zeroizing<String>,
    /// The app's signing secret: required in [`SlackMode::Events`].
    pub signing_secret: Option<Zeroizing<String>>,
    /// An app-level token (`xapp-…`, scope `connections:write`): required in
    /// [`SlackMode::Socket`].
    pub app_token: Option<Zeroizing<String>>,
    pub mode: SlackMode,
    /// How long a Socket Mode poll waits for an envelope when idle.
    pub poll_timeout: Duration,
    /// The clock signed requests' timestamps are checked against.
    pub clock: Clock,
}

impl SlackConfig {
    /// Events API mode against the public API.
    pub fn events(
        bot_token: Zeroizing<String>,
        signing_secret: Zeroizing<String>,
    ) -> Result<Self, ConfigError> {
        Self::with_mode(bot_token, SlackMode::Events, Some(signing_secret), None)
    }

    /// Socket Mode against the public API, with a 30 s poll.
    pub fn socket(
        bot_token: Zeroizing<String>,
        app_token: Zeroizing<String>,
    ) -> Result<Self, ConfigError> {
        Self::with_mode(bot_token, SlackMode::Socket, None, Some(app_token))
    }

    fn with_mode(
        bot_token: Zeroizing<String>,
        mode: SlackMode,
        signing_secret: Option<Zeroizing<String>>,
        app_token: Option<Zeroizing<String>>,
    ) -> Result<Self, ConfigError> {
        let api_base = Url::parse(DEFAULT_API_BASE)
            .map_err(|e| ConfigError::Invalid(format!("the default API root: {e}")))?;
        Ok(Self {
            api_base,
            bot_token,
            signing_secret,
            app_token,
            mode,
            poll_timeout: Duration::from_secs(30),
            clock: system_clock(),
        })
    }
}

impl fmt::Debug for SlackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackConfig")
            .field("api_base", &self.api_base.as_str())
            .field("bot_token", &"<redacted>")
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("app_token", &self.app_token.as_ref().map(|_| "<redacted>"))
            .field("mode", &self.mode)
            .field("poll_timeout", &self.poll_timeout)
            .finish_non_exhaustive()
    }
}

/// The bot's own account.
#[derive(Debug, Clone)]
struct Bot {
    user_id: String,
    username: String,
}

/// Which token a Web API call carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Bot,
    App,
}

/// The Slack adapter. Build it with [`Slack::new`], then `connect` (mentions are recognized
/// from the bot account `connect` learns).
pub struct Slack {
    /// The API root without a trailing `/`.
    base: String,
    /// The API root as configured (attachments may be fetched from its origin).
    api_base: Url,
    bot_token: Zeroizing<String>,
    signing_secret: Option<Zeroizing<String>>,
    app_token: Option<Zeroizing<String>>,
    mode: SlackMode,
    poll_timeout: Duration,
    clock: Clock,
    http: reqwest::Client,
    /// TLS for the Socket Mode WebSocket (Socket Mode only).
    tls: Option<Arc<rustls::ClientConfig>>,
    bot: RwLock<Option<Bot>>,
    socket: tokio::sync::Mutex<socket::SocketState>,
}

impl fmt::Debug for Slack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slack")
            .field("api_base", &self.base)
            .field("bot_token", &"<redacted>")
            .field(
                "signing_secret",
                &self.signing_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("app_token", &self.app_token.as_ref().map(|_| "<redacted>"))
            .field("mode", &self.mode)
            .field("bot", &self.bot_snapshot().map(|b| b.username))
            .finish_non_exhaustive()
    }
}

/// Why a Web API call failed (internal; mapped to [`SendError`] or [`ChannelError`]).
type CallError = http::CallError<ApiError>;

/// An error answer: `{"ok":false,"error":…}` (any status) or a non-2xx status.
#[derive(Debug)]
struct ApiError {
    status: u16,
    /// `<method>: <error code>`.
    error: String,
    /// The bare error code (`channel_not_found`), empty when the body had none.
    code: String,
    retry_after: Option<u64>,
}

/// Error codes that mean the token is not accepted for this call.
const AUTH_ERRORS: &[&str] = &[
    "not_authed",
    "invalid_auth",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "not_allowed_token_type",
    "missing_scope",
    "no_permission",
    "ekm_access_denied",
];

/// Error codes that mean "try again later" (the request may have had an effect).
const TRANSIENT_ERRORS: &[&str] = &[
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
];

impl Slack {
    /// Checks the configuration and builds the HTTP client; sends nothing.
    pub fn new(cfg: SlackConfig) -> Result<Self, ConfigError> {
        check_token(&cfg.bot_token, "xoxb-", "bot token")?;
        http::check_api_root(&cfg.api_base, "api_base", "the tokens")?;
        if let Some(app) = &cfg.app_token {
            check_token(app, "xapp-", "app-level token")?;
        }
        if let Some(secret) = &cfg.signing_secret {
            check_signing_secret(secret)?;
        }
        let tls = match cfg.mode {
            SlackMode::Events => {
                if cfg.signing_secret.is_none() {
                    return Err(ConfigError::Invalid(
                        "Events API mode needs `signing_secret = \"secret:NAME\"` (the app's \
                         Signing Secret, on its Basic Information page)"
                            .into(),
                    ));
                }
                None
            }
            SlackMode::Socket => {
                if cfg.app_token.is_none() {
                    return Err(ConfigError::Invalid(
                        "Socket Mode needs `app_token = \"secret:NAME\"` (an app-level token \
                         xapp-… with the connections:write scope)"
                            .into(),
                    ));
                }
                Some(socket::tls_config()?)
            }
        };
        // No redirects: one would carry the Authorization header's token elsewhere (or to a
        // login page instead of a file).
        let http = http::client(http::USER_AGENT)?;
        Ok(Self {
            base: cfg.api_base.as_str().trim_end_matches('/').to_owned(),
            api_base: cfg.api_base,
            bot_token: cfg.bot_token,
            signing_secret: cfg.signing_secret,
            app_token: cfg.app_token,
            mode: cfg.mode,
            poll_timeout: cfg.poll_timeout,
            clock: cfg.clock,
            http,
            tls,
            bot: RwLock::new(None),
            socket: tokio::sync::Mutex::new(socket::SocketState::default()),
        })
    }

    fn bot_snapshot(&self) -> Option<Bot> {
        self.bot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `auth.test`: the bot's user id and name.
    async fn auth_test(&self) -> Result<Bot, ChannelError> {
        let me = self
            .call("auth.test", Token::Bot, &json!({}))
            .await
            .map_err(channel_error)?;
        let user_id = me.get("user_id").and_then(Value::as_str);
        let username = me.get("user").and_then(Value::as_str);
        let (Some(user_id), Some(username)) = (user_id, username) else {
            return Err(ChannelError::Protocol(
                "auth.test answered without the bot's user_id and user".into(),
            ));
        };
        let bot = Bot {
            user_id: user_id.to_owned(),
            username: username.to_owned(),
        };
        *self.bot.write().unwrap_or_else(PoisonError::into_inner) = Some(bot.clone());
        Ok(bot)
    }

    /// The credentials every text leaving this adapter is scrubbed of (empty: not set).
    fn secrets(&self) -> [&str; 3] {
        [
            self.bot_token.as_str(),
            self.app_token.as_ref().map_or("", |s| s.as_str()),
            self.signing_secret.as_ref().map_or("", |s| s.as_str()),
        ]
    }

    /// Removes every credential from a text that is about to leave this adapter.
    fn redact(&self, text: String) -> String {
        http::redact(text, &self.secrets())
    }

    fn bearer(&self, token: Token) -> Result<HeaderValue, CallError> {
        let secret = match token {
            Token::Bot => Some(&self.bot_token),
            Token::App => self.app_token.as_ref(),
        };
        let Some(secret) = secret else {
            return Err(CallError::BadAnswer(
                "this channel has no app-level token".into(),
            ));
        };
        // The token was checked to be visible ASCII, so this cannot fail.
        http::auth_header("Bearer", secret)
            .ok_or_else(|| CallError::BadAnswer("the token is not a valid header value".into()))
    }

    /// One Web API call: POST JSON to `<base>/<method>`; the whole answer on `"ok": true`.
    async fn call(&self, method: &str, token: Token, params: &Value) -> Result<Value, CallError> {
        let url = format!("{}/{method}", self.base);
        let body = serde_json::to_vec(params)
            .map_err(|e| CallError::BadAnswer(format!("{method}: the request: {e}")))?;
        let mut resp = self
            .http
            .post(url)
            .timeout(REQUEST_TIMEOUT)
            .header(AUTHORIZATION, self.bearer(token)?)
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(body)
            .send()
            .await
            .map_err(|e| CallError::network(method, e, true, &self.secrets()))?;
        let status = resp.status().as_u16();
        let retry_after = http::retry_after_secs(resp.headers());
        let body = http::read_answer(method, &mut resp, MAX_ANSWER_BYTES, &self.secrets()).await?;
        let success = (200..300).contains(&status);
        let answer: Option<Value> = serde_json::from_slice(&body).ok();
        let ok = answer
            .as_ref()
            .and_then(|a| a.get("ok"))
            .and_then(Value::as_bool);
        match (ok, answer) {
            (Some(true), Some(answer)) if success => Ok(answer),
            (Some(_), Some(answer)) => {
                let code = answer
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let error = if code.is_empty() {
                    format!("{method}: HTTP {status}")
                } else {
                    format!("{method}: {code}")
                };
                Err(CallError::Api(ApiError {
                    status,
                    error: self.redact(error),
                    code: self.redact(code),
                    retry_after,
                }))
            }
            _ if success => Err(CallError::BadAnswer(format!(
                "{method}: HTTP {status} with a body that is not a Web API answer"
            ))),
            _ => Err(CallError::Api(ApiError {
                status,
                error: format!("{method}: HTTP {status} without a Web API answer"),
                code: String::new(),
                retry_after,
            })),
        }
    }

    // ---- Receiving ----

    /// The bot's user id: the one `connect` learnt, else the event's authorization.
    fn me(&self, authorized: Option<String>) -> Me {
        match self.bot_snapshot() {
            Some(b) => Me {
                user_id: Some(b.user_id),
            },
            None => Me {
                user_id: authorized,
            },
        }
    }

    /// An Events API body (`event_callback`, `url_verification`, `app_rate_limited`): the
    /// events to commit and the answer. `fallback_id`: the event id when the body has nothing
    /// to map (a Socket Mode envelope id).
    fn parse_callback(
        &self,
        body: &Value,
        fallback_id: Option<&str>,
    ) -> Result<WebhookParsed, ChannelError> {
        let kind = body.get("type").and_then(Value::as_str).unwrap_or_default();
        let ignored = |what: String| match fallback_id {
            Some(id) => WebhookParsed {
                events: vec![Inbound {
                    event_id: format!("s:{id}"),
                    event: Event::Ignored { what },
                }],
                reply: None,
            },
            None => WebhookParsed::default(),
        };
        match kind {
            "url_verification" => {
                let Some(challenge) = body.get("challenge").and_then(Value::as_str) else {
                    return Err(ChannelError::BadWebhook(
                        "a url_verification request without a challenge".into(),
                    ));
                };
                Ok(WebhookParsed {
                    events: vec![],
                    reply: Some(WebhookBody {
                        content_type: "text/plain",
                        body: challenge.as_bytes().to_vec(),
                    }),
                })
            }
            "event_callback" => {
                let Some(event_id) = body.get("event_id").and_then(Value::as_str) else {
                    return Err(ChannelError::BadWebhook(
                        "an event_callback without event_id".into(),
                    ));
                };
                let Some(event) = body.get("event") else {
                    return Err(ChannelError::BadWebhook(
                        "an event_callback without event".into(),
                    ));
                };
                let authorized = body
                    .get("authorizations")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .filter(|a| a.get("is_bot").and_then(Value::as_bool) == Some(true))
                    .and_then(|a| a.get("user_id"))
                    .and_then(Value::as_str)
                    .map(String::from);
                let me = self.me(authorized);
                Ok(WebhookParsed {
                    events: vec![map_event(event_id, event, &me)],
                    reply: None,
                })
            }
            // Slack stopped delivering for a minute; nothing to commit.
            "app_rate_limited" => Ok(ignored("app_rate_limited".into())),
            "" => Err(ChannelError::BadWebhook(
                "the body is not an Events API request (no type)".into(),
            )),
            other => Ok(ignored(format!("an Events API request of type {other}"))),
        }
    }

    /// Checks the request's timestamp and signature.
    fn verify(&self, req: &WebhookRequest<'_>) -> Result<(), ChannelError> {
        let refuse = |why: &str| Err(ChannelError::WebhookRefused(why.to_owned()));
        let Some(secret) = &self.signing_secret else {
            return refuse("this channel has no signing secret");
        };
        let one = |name: &'static str| -> Result<&str, ChannelError> {
            let mut values = req.header_values(name);
            match (values.next(), values.next()) {
                (None, _) => Err(ChannelError::WebhookRefused(format!(
                    "the {name} header is missing"
                ))),
                (Some(_), Some(_)) => Err(ChannelError::WebhookRefused(format!(
                    "more than one {name} header"
                ))),
                (Some(v), None) => Ok(v),
            }
        };
        let timestamp = one(TIMESTAMP_HEADER)?;
        let signature = one(SIGNATURE_HEADER)?;
        let ts =
            (1..=12).contains(&timestamp.len()) && timestamp.bytes().all(|b| b.is_ascii_digit());
        let Some(ts) = ts.then(|| timestamp.parse::<i64>().ok()).flatten() else {
            return refuse("the X-Slack-Request-Timestamp header is not a Unix time");
        };
        let now = (self.clock)().div_euclid(1000);
        if (now - ts).abs() > MAX_CLOCK_SKEW_SECS {
            return refuse(
                "the X-Slack-Request-Timestamp is more than 5 minutes from the gateway's clock \
                 (a replayed or delayed request, or a wrong clock)",
            );
        }
        let expected = Zeroizing::new(sign(secret, timestamp, req.body));
        // Constant time in the content (a length mismatch is decided at once).
        if !bool::from(signature.as_bytes().ct_eq(expected.as_bytes())) {
            return refuse(
                "the X-Slack-Signature header does not match the body (wrong signing secret, or \
                 an altered request)",
            );
        }
        Ok(())
    }

    /// An interactivity payload (already JSON). `fallback_id`: the Socket Mode envelope id.
    fn parse_interaction(&self, payload: &Value, raw: &[u8], fallback_id: Option<&str>) -> Inbound {
        let other_id = || match fallback_id {
            Some(id) => format!("s:{id}"),
            None => {
                let digest = Sha256::digest(raw);
                format!("i:{}", hex(&digest[..16]))
            }
        };
        let kind = payload
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("an interaction without a type");
        if kind != "block_actions" {
            return Inbound {
                event_id: other_id(),
                event: Event::Ignored {
                    what: format!("an interaction of type {kind}"),
                },
            };
        }
        match BlockActions::deserialize(payload) {
            Ok(b) => match b.into_press() {
                Ok((event_id, press)) => Inbound {
                    event_id,
                    event: Event::Button(press),
                },
                Err(what) => Inbound {
                    event_id: other_id(),
                    event: Event::Ignored { what },
                },
            },
            Err(_) => Inbound {
                event_id: other_id(),
                event: Event::Ignored {
                    what: "a block_actions payload this adapter cannot read".into(),
                },
            },
        }
    }

    // ---- Sending ----

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        check_text(&msg.text)?;
        let channel = channel_id(&msg.chat.id)?;
        let mut params = json!({
            "channel": channel,
            "text": escape(&msg.text),
            "parse": "none",
            "link_names": false,
            "unfurl_links": false,
            "unfurl_media": false,
        });
        if let Some(thread) = &msg.chat.thread {
            params["thread_ts"] = message_ts(thread)?.into();
        }
        if !msg.buttons.is_empty() {
            params["blocks"] = blocks(&msg.text, &msg.buttons)?;
        }
        let answer = self
            .call("chat.postMessage", Token::Bot, &params)
            .await
            .map_err(send_error)?;
        match answer.get("ts").and_then(Value::as_str) {
            Some(ts) => Ok(Sent {
                message_id: ts.to_owned(),
            }),
            None => Err(SendError::Transient {
                message: "chat.postMessage: the answer has no ts".into(),
                maybe_delivered: true,
            }),
        }
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
            "channel": channel_id(&chat.id)?,
            "ts": message_ts(id)?,
            "text": escape(text),
            "parse": "none",
            "link_names": false,
            // An empty list removes the previous blocks (and their buttons).
            "blocks": match buttons {
                Some(b) if !b.is_empty() => blocks(text, b)?,
                _ => json!([]),
            },
        });
        self.call("chat.update", Token::Bot, &params)
            .await
            .map(drop)
            .map_err(send_error)
    }

    async fn answer_inner(&self, callback_id: &str, text: &str) -> Result<(), SendError> {
        let mut parts = callback_id.split(' ');
        let (Some(channel), Some(user), thread, None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SendError::Permanent(format!(
                "{callback_id:?} is not a Slack button callback id (<channel> <user>[ <thread_ts>])"
            )));
        };
        let channel = channel_id(channel)?;
        let user = user_id(user)?;
        if text.trim().is_empty() {
            // Slack needs no answer to a press beyond the HTTP 200 / envelope ack.
            return Ok(());
        }
        let mut params = json!({
            "channel": channel,
            "user": user,
            "text": escape(truncate(text, MAX_TEXT)),
            "parse": "none",
            "link_names": false,
        });
        if let Some(t) = thread {
            params["thread_ts"] = message_ts(t)?.into();
        }
        self.call("chat.postEphemeral", Token::Bot, &params)
            .await
            .map(drop)
            .map_err(send_error)
    }

    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        http::check_size(a.size, max_bytes)?;
        let Some((_, url)) = a.file_ref.split_once(' ') else {
            return Err(ChannelError::Protocol(
                "this Slack file has no download URL (not fetched)".into(),
            ));
        };
        let url = Url::parse(url).map_err(|_| {
            ChannelError::Protocol("the Slack file's download URL is not a URL".into())
        })?;
        // The URL receives the bot token: `https://files.slack.com`, or the `api_base` origin
        // (the fake in tests, where it is loopback).
        if !http::may_download(&url, &self.api_base, &[FILES_HOST]) {
            return Err(ChannelError::Protocol(format!(
                "the Slack file's download URL is not on https://{FILES_HOST}: not fetched"
            )));
        }
        let auth = self
            .bearer(Token::Bot)
            .map_err(|_| ChannelError::Protocol("the bot token is not a header value".into()))?;
        let req = self
            .http
            .get(url)
            .timeout(REQUEST_TIMEOUT * 4)
            .header(AUTHORIZATION, auth);
        let hint = |status| {
            (300..=399).contains(&status).then_some(
                "a redirect, not followed: the bot may lack the files:read scope or access to \
                 the file",
            )
        };
        http::download(req, "file download", max_bytes, &self.secrets(), hint).await
    }
}

impl Platform for Slack {
    fn kind(&self) -> &'static str {
        "slack"
    }

    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: MAX_BUTTON_DATA,
        }
    }

    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            let bot = self.auth_test().await?;
            if self.mode == SlackMode::Socket {
                // Checks the app-level token too, and has the connection ready for `poll`.
                self.ensure_socket().await?;
            }
            Ok(BotInfo {
                id: bot.user_id,
                username: bot.username,
            })
        })
    }

    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(self.socket_poll(cursor))
    }

    fn disconnect(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.socket_close())
    }

    fn webhook(&self, req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        let route = match (req.method, req.route) {
            ("POST", r @ ("events" | "interactivity")) => r,
            _ => return Err(ChannelError::NoSuchRoute),
        };
        if self.mode != SlackMode::Events {
            return Err(ChannelError::WebhookRefused(
                "this channel is in Socket Mode: it takes no webhook requests".into(),
            ));
        }
        if req.body.len() > MAX_WEBHOOK_BODY {
            return Err(ChannelError::BadWebhook(format!(
                "the body is larger than {MAX_WEBHOOK_BODY} bytes"
            )));
        }
        self.verify(req)?;
        if route == "events" {
            let body: Value = serde_json::from_slice(req.body)
                .map_err(|e| ChannelError::BadWebhook(format!("the body is not JSON: {e}")))?;
            return self.parse_callback(&body, None);
        }
        let mut payloads = form_urlencoded::parse(req.body)
            .filter(|(k, _)| k == "payload")
            .map(|(_, v)| v);
        let (Some(payload), None) = (payloads.next(), payloads.next()) else {
            return Err(ChannelError::BadWebhook(
                "the body has no single `payload` field".into(),
            ));
        };
        let value: Value = serde_json::from_str(&payload)
            .map_err(|e| ChannelError::BadWebhook(format!("the payload is not JSON: {e}")))?;
        Ok(WebhookParsed {
            events: vec![self.parse_interaction(&value, payload.as_bytes(), None)],
            reply: None,
        })
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
        Box::pin(self.answer_inner(callback_id, text))
    }

    /// Slack's Web API has no typing indicator for bots: nothing to do.
    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        let _ = chat;
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

/// `v0=` + hex HMAC-SHA256(`secret`, `v0:<timestamp>:<body>`): Slack's request signature.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(b"v0:");
    mac.update(timestamp.as_bytes());
    mac.update(b":");
    mac.update(body);
    format!("v0={}", hex(&mac.finalize().into_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Escapes the three characters Slack interprets (`&`, `<`, `>`), so that text cannot form a
/// link, a mention or a broadcast (`<!channel>`); Slack shows the text as written.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// Decodes Slack's three entities in received text (one pass: `&amp;lt;` is `&lt;`).
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let (decoded, len) = if tail.starts_with("&amp;") {
            ('&', 5)
        } else if tail.starts_with("&lt;") {
            ('<', 4)
        } else if tail.starts_with("&gt;") {
            ('>', 4)
        } else {
            ('&', 1)
        };
        out.push(decoded);
        rest = &tail[len..];
    }
    out.push_str(rest);
    out
}

/// The `section` blocks of `text` (escaped, each within [`MAX_SECTION_TEXT`]) and one
/// `actions` block with the buttons.
fn blocks(text: &str, buttons: &[Button]) -> Result<Value, SendError> {
    if buttons.len() > MAX_BUTTONS {
        return Err(SendError::Permanent(format!(
            "{} buttons; Slack takes at most {MAX_BUTTONS} in one message",
            buttons.len()
        )));
    }
    let mut elements = Vec::with_capacity(buttons.len());
    for (i, b) in buttons.iter().enumerate() {
        check_button(b, MAX_BUTTON_DATA, "Slack")?;
        elements.push(json!({
            "type": "button",
            "action_id": format!("chitin_{i}"),
            "text": { "type": "plain_text", "text": truncate(&b.label, MAX_BUTTON_LABEL), "emoji": true },
            "value": b.data,
        }));
    }
    let mut out = Vec::new();
    for piece in split(text, MAX_SECTION_TEXT) {
        let escaped = escape(&piece);
        let pieces = if utf16_len(&escaped) <= MAX_SECTION_TEXT {
            vec![escaped]
        } else {
            // Escaping grows a character to at most 5.
            split(&piece, MAX_SECTION_TEXT / 5)
                .iter()
                .map(|p| escape(p))
                .collect()
        };
        for p in pieces.into_iter().filter(|p| !p.trim().is_empty()) {
            out.push(json!({
                "type": "section",
                "text": { "type": "mrkdwn", "text": p, "verbatim": true },
            }));
        }
    }
    out.push(json!({ "type": "actions", "block_id": "chitin_buttons", "elements": elements }));
    Ok(Value::Array(out))
}

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|api| match api {
        ApiError {
            status,
            code,
            retry_after,
            ..
        } if status == 429 || code == "ratelimited" || code == "rate_limited" => {
            SendError::RateLimited {
                retry_after: Duration::from_secs(retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECS)),
            }
        }
        // The platform received the request; whether it acted on it is unknown.
        ApiError { status, error, .. } if status >= 500 => SendError::Transient {
            message: error,
            maybe_delivered: true,
        },
        ApiError { error, code, .. } if TRANSIENT_ERRORS.contains(&code.as_str()) => {
            SendError::Transient {
                message: error,
                maybe_delivered: true,
            }
        }
        ApiError { error, code, .. } if AUTH_ERRORS.contains(&code.as_str()) => {
            SendError::Permanent(format!(
                "{error}: the bot token was refused or lacks a scope; check it (`chitin secrets \
                 set`), the app's scopes and `api_base`"
            ))
        }
        ApiError {
            status: 401 | 403 | 404,
            error,
            ..
        } => SendError::Permanent(format!(
            "{error}: check the bot token (`chitin secrets set`) and `api_base`"
        )),
        ApiError { error, .. } => SendError::Permanent(error),
    })
}

fn channel_error(e: CallError) -> ChannelError {
    e.into_channel_error(|api| match api {
        ApiError {
            status,
            code,
            retry_after,
            ..
        } if status == 429 || code == "ratelimited" || code == "rate_limited" => {
            ChannelError::RateLimited {
                retry_after: Duration::from_secs(retry_after.unwrap_or(DEFAULT_RETRY_AFTER_SECS)),
            }
        }
        ApiError { status, error, .. } if status >= 500 => ChannelError::Transient(error),
        ApiError { error, code, .. } if TRANSIENT_ERRORS.contains(&code.as_str()) => {
            ChannelError::Transient(error)
        }
        ApiError { error, code, .. } if AUTH_ERRORS.contains(&code.as_str()) => {
            ChannelError::Unauthorized(error)
        }
        ApiError {
            status: 401 | 403 | 404,
            error,
            ..
        } => ChannelError::Unauthorized(error),
        ApiError { error, .. } => ChannelError::Protocol(error),
    })
}

fn check_token(token: &str, prefix: &str, what: &str) -> Result<(), ConfigError> {
    let ok = token.strip_prefix(prefix).is_some_and(|rest| {
        !rest.is_empty()
            && rest.len() <= 512
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if ok {
        Ok(())
    } else {
        // Never echo the value: it may be a real credential pasted in the wrong place.
        Err(ConfigError::Invalid(format!(
            "the {what} is not of the form {prefix}<letters, digits or -> (as Slack shows it in \
             the app's settings); set it again with `chitin secrets set`"
        )))
    }
}

fn check_signing_secret(secret: &str) -> Result<(), ConfigError> {
    if (1..=256).contains(&secret.len()) && secret.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ConfigError::Invalid(
            "the signing secret must be 1-256 visible ASCII characters (the app's Signing \
             Secret, on its Basic Information page)"
                .into(),
        ))
    }
}

/// A text Slack would refuse or truncate, refused here without a request.
fn check_text(text: &str) -> Result<(), SendError> {
    check_sendable(text, MAX_TEXT, Some("Slack"), "the Slack adapter's")
}

/// A Slack id (`C…`, `D…`, `G…`, `U…`, `W…`): letters and digits only.
fn slack_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn channel_id(id: &str) -> Result<&str, SendError> {
    if slack_id(id) {
        Ok(id)
    } else {
        Err(SendError::Permanent(format!(
            "{id:?} is not a Slack conversation id"
        )))
    }
}

fn user_id(id: &str) -> Result<&str, SendError> {
    if slack_id(id) {
        Ok(id)
    } else {
        Err(SendError::Permanent(format!(
            "{id:?} is not a Slack user id"
        )))
    }
}

/// A message timestamp (`1712345678.000100`), Slack's message id.
fn is_ts(ts: &str) -> bool {
    ts.split_once('.').is_some_and(|(s, f)| {
        (1..=20).contains(&s.len())
            && (1..=20).contains(&f.len())
            && s.bytes().all(|b| b.is_ascii_digit())
            && f.bytes().all(|b| b.is_ascii_digit())
    })
}

fn message_ts(ts: &str) -> Result<&str, SendError> {
    if is_ts(ts) {
        Ok(ts)
    } else {
        Err(SendError::Permanent(format!(
            "{ts:?} is not a Slack message ts"
        )))
    }
}

// ---- The event wire format (only the fields used) ----

/// Who the bot is, for mentions and for ignoring its own messages.
struct Me {
    user_id: Option<String>,
}

#[derive(Deserialize)]
struct SlackMsg {
    user: Option<String>,
    bot_id: Option<String>,
    text: Option<String>,
    ts: Option<String>,
    thread_ts: Option<String>,
    parent_user_id: Option<String>,
    #[serde(default)]
    files: Vec<SlackFile>,
    user_profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Profile {
    display_name: Option<String>,
    real_name: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct SlackFile {
    id: Option<String>,
    name: Option<String>,
    mimetype: Option<String>,
    size: Option<u64>,
    url_private_download: Option<String>,
}

/// The subtypes that are ordinary messages.
fn is_plain(subtype: Option<&str>) -> bool {
    matches!(subtype, None | Some("file_share" | "thread_broadcast"))
}

/// DM or group, from `channel_type` or else the channel id.
fn chat_kind(channel_type: Option<&str>, channel: &str) -> Result<ChatKind, String> {
    match channel_type {
        Some("im") => Ok(ChatKind::Dm),
        Some("channel" | "group" | "mpim") => Ok(ChatKind::Group),
        Some(other) => Err(format!("a message in a {other} conversation")),
        None if channel.starts_with('D') => Ok(ChatKind::Dm),
        None => Ok(ChatKind::Group),
    }
}

/// The session thread of a message and the message it replies to (see the module docs).
fn thread_of(
    kind: ChatKind,
    ts: &str,
    thread_ts: Option<&str>,
) -> (Option<String>, Option<String>) {
    match thread_ts {
        Some(t) if t != ts => (Some(t.to_owned()), Some(t.to_owned())),
        _ => match kind {
            ChatKind::Group => (Some(ts.to_owned()), None),
            ChatKind::Dm => (None, None),
        },
    }
}

/// The raw text mentions `user` (`<@U123>` or `<@U123|name>`).
fn mentions(raw: &str, user: &str) -> bool {
    raw.match_indices("<@").any(|(i, _)| {
        raw.get(i + 2..)
            .and_then(|rest| rest.strip_prefix(user))
            .is_some_and(|after| after.starts_with('>') || after.starts_with('|'))
    })
}

impl SlackMsg {
    fn sender(&self, user: &str) -> Sender {
        let display = self
            .user_profile
            .as_ref()
            .and_then(|p| {
                [&p.display_name, &p.real_name, &p.name]
                    .into_iter()
                    .flatten()
                    .find(|n| !n.trim().is_empty())
                    .cloned()
            })
            .unwrap_or_else(|| user.to_owned());
        Sender {
            id: user.to_owned(),
            display,
            is_bot: false,
        }
    }

    fn attachments(&self) -> Vec<Attachment> {
        self.files
            .iter()
            .filter_map(|f| {
                let id = f.id.as_deref().filter(|id| slack_id(id))?;
                let url = f
                    .url_private_download
                    .as_deref()
                    .filter(|u| !u.contains(char::is_whitespace))?;
                Some(Attachment {
                    file_ref: format!("{id} {url}"),
                    name: f.name.clone(),
                    mime: f.mimetype.clone(),
                    size: f.size,
                })
            })
            .collect()
    }

    fn into_message(
        self,
        channel: &str,
        channel_type: Option<&str>,
        me: &Me,
        app_mention: bool,
    ) -> Result<Message, String> {
        if !slack_id(channel) {
            return Err("a message without a valid channel".into());
        }
        if self.bot_id.is_some() {
            return Err("a message from a bot or an app".into());
        }
        let Some(user) = self.user.as_deref().filter(|u| slack_id(u)) else {
            return Err("a message without a user".into());
        };
        if me.user_id.as_deref() == Some(user) {
            return Err("the bot's own message".into());
        }
        let Some(ts) = self.ts.as_deref().filter(|t| is_ts(t)) else {
            return Err("a message without a valid ts".into());
        };
        let kind = chat_kind(channel_type, channel)?;
        let raw = self.text.as_deref().unwrap_or_default();
        let attachments = self.attachments();
        if raw.trim().is_empty() && attachments.is_empty() {
            return Err("a message without text or files".into());
        }
        let thread_ts = self.thread_ts.as_deref().filter(|t| is_ts(t));
        let (thread, reply_to) = thread_of(kind, ts, thread_ts);
        let reply_to_bot = thread_ts.is_some_and(|t| t != ts)
            && me.user_id.is_some()
            && self.parent_user_id.as_deref() == me.user_id.as_deref();
        let mentioned = kind == ChatKind::Dm
            || app_mention
            || reply_to_bot
            || me.user_id.as_deref().is_some_and(|u| mentions(raw, u));
        Ok(Message {
            chat: ChatRef {
                id: channel.to_owned(),
                kind,
                thread,
            },
            message_id: ts.to_owned(),
            sender: self.sender(user),
            text: unescape(raw),
            mentioned,
            reply_to,
            attachments,
        })
    }
}

/// Maps one `event` of an `event_callback`.
fn map_event(event_id: &str, event: &Value, me: &Me) -> Inbound {
    let by_event = format!("e:{event_id}");
    let ignored = |id: String, what: String| Inbound {
        event_id: id,
        event: Event::Ignored { what },
    };
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let channel = event
        .get("channel")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let channel_type = event.get("channel_type").and_then(Value::as_str);
    let subtype = event.get("subtype").and_then(Value::as_str);
    match kind {
        "message" | "app_mention" if is_plain(subtype) => {
            let Ok(m) = SlackMsg::deserialize(event) else {
                return ignored(by_event, "a message this adapter cannot read".into());
            };
            let key = m.ts.as_deref().map(|ts| format!("m:{channel}:{ts}"));
            match m.into_message(channel, channel_type, me, kind == "app_mention") {
                Ok(msg) => Inbound {
                    event_id: key.unwrap_or(by_event),
                    event: Event::Message(msg),
                },
                Err(what) => ignored(by_event, what),
            }
        }
        "message" if subtype == Some("message_changed") => {
            let inner = event.get("message").unwrap_or(&Value::Null);
            let inner_subtype = inner.get("subtype").and_then(Value::as_str);
            if !is_plain(inner_subtype) {
                return ignored(
                    by_event,
                    "an edit of a message Chitin does not handle".into(),
                );
            }
            match SlackMsg::deserialize(inner) {
                Ok(m) => match m.into_message(channel, channel_type, me, false) {
                    Ok(msg) => Inbound {
                        event_id: by_event,
                        event: Event::Edited(msg),
                    },
                    Err(what) => ignored(by_event, format!("an edit: {what}")),
                },
                Err(_) => ignored(by_event, "an edit this adapter cannot read".into()),
            }
        }
        "message" => ignored(
            by_event,
            format!("a message of subtype {}", subtype.unwrap_or_default()),
        ),
        "" => ignored(by_event, "an event without a type".into()),
        other => ignored(by_event, format!("a {other} event")),
    }
}

#[derive(Deserialize)]
struct BlockActions {
    user: ActionUser,
    container: Option<Container>,
    channel: Option<IdOnly>,
    message: Option<ActionMessage>,
    #[serde(default)]
    actions: Vec<Action>,
}

#[derive(Deserialize)]
struct ActionUser {
    id: String,
    username: Option<String>,
    name: Option<String>,
}

#[derive(Deserialize)]
struct Container {
    message_ts: Option<String>,
    channel_id: Option<String>,
    thread_ts: Option<String>,
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

#[derive(Deserialize)]
struct ActionMessage {
    ts: Option<String>,
    thread_ts: Option<String>,
}

#[derive(Deserialize)]
struct Action {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
    action_ts: Option<String>,
}

impl BlockActions {
    /// The press and its event id.
    fn into_press(self) -> Result<(String, ButtonPress), String> {
        let Some(action) = self.actions.into_iter().next() else {
            return Err("a block_actions payload without actions".into());
        };
        if action.kind.as_deref() != Some("button") {
            return Err(format!(
                "a {} action",
                action.kind.as_deref().unwrap_or("typeless")
            ));
        }
        let Some(data) = action.value else {
            return Err("a button without a value".into());
        };
        let container = self.container.as_ref();
        let channel = container
            .and_then(|c| c.channel_id.clone())
            .or_else(|| self.channel.map(|c| c.id))
            .filter(|c| slack_id(c));
        let Some(channel) = channel else {
            return Err("a button press outside a conversation".into());
        };
        let ts = self
            .message
            .as_ref()
            .and_then(|m| m.ts.clone())
            .or_else(|| container.and_then(|c| c.message_ts.clone()))
            .filter(|t| is_ts(t));
        let Some(ts) = ts else {
            return Err("a button press without the message's ts".into());
        };
        let thread_ts = self
            .message
            .as_ref()
            .and_then(|m| m.thread_ts.clone())
            .or_else(|| container.and_then(|c| c.thread_ts.clone()))
            .filter(|t| is_ts(t));
        if !slack_id(&self.user.id) {
            return Err("a button press without a valid user".into());
        }
        let Some(action_ts) = action.action_ts.filter(|t| is_ts(t)) else {
            return Err("a button press without action_ts".into());
        };
        let kind = chat_kind(None, &channel)?;
        let (thread, _) = thread_of(kind, &ts, thread_ts.as_deref());
        let mut callback_id = format!("{channel} {}", self.user.id);
        if let Some(t) = &thread_ts {
            callback_id.push(' ');
            callback_id.push_str(t);
        }
        let display = [&self.user.name, &self.user.username]
            .into_iter()
            .flatten()
            .find(|n| !n.trim().is_empty())
            .cloned()
            .unwrap_or_else(|| self.user.id.clone());
        Ok((
            format!("a:{}:{action_ts}", self.user.id),
            ButtonPress {
                callback_id,
                chat: ChatRef {
                    id: channel,
                    kind,
                    thread,
                },
                message_id: ts,
                sender: Sender {
                    id: self.user.id,
                    display,
                    is_bot: false,
                },
                data,
            },
        ))
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

    fn cfg(base: &str) -> SlackConfig {
        let mut c = SlackConfig::events(
            Zeroizing::new("xoxb-1-2-abc".into()),
            Zeroizing::new("8f742231b10e8888abcd99yyyzzz85a5".into()),
        )
        .unwrap();
        c.api_base = Url::parse(base).unwrap();
        c
    }

    #[test]
    fn plain_http_is_refused_off_loopback_and_accepted_on_it() {
        let err = Slack::new(cfg("http://slack.example.org/api")).unwrap_err();
        assert!(
            err.to_string()
                .contains("plain http on a non-loopback host"),
            "{err}"
        );
        Slack::new(cfg("http://127.0.0.1:9/api")).unwrap();
        Slack::new(cfg("http://[::1]:9/api")).unwrap();
        Slack::new(cfg("https://slack.com/api")).unwrap();
    }

    #[test]
    fn each_mode_needs_its_credential_and_tokens_have_their_prefix() {
        let mut c = cfg("https://slack.com/api");
        c.signing_secret = None;
        let err = Slack::new(c).unwrap_err();
        assert!(
            err.to_string()
                .contains("Events API mode needs `signing_secret"),
            "{err}"
        );

        let mut c = cfg("https://slack.com/api");
        c.mode = SlackMode::Socket;
        let err = Slack::new(c).unwrap_err();
        assert!(
            err.to_string().contains("Socket Mode needs `app_token"),
            "{err}"
        );

        let mut c = cfg("https://slack.com/api");
        c.bot_token = Zeroizing::new("xoxp-user-token-SECRETVALUE".into());
        let err = Slack::new(c).unwrap_err().to_string();
        assert!(
            err.contains("the bot token is not of the form xoxb-"),
            "{err}"
        );
        assert!(!err.contains("SECRETVALUE"), "{err}");

        let mut c = cfg("https://slack.com/api");
        c.app_token = Some(Zeroizing::new("xoxb-not-an-app-token".into()));
        let err = Slack::new(c).unwrap_err().to_string();
        assert!(
            err.contains("the app-level token is not of the form xapp-"),
            "{err}"
        );
    }

    #[test]
    fn the_signature_is_slacks_documented_example() {
        // The example of Slack's "Verifying requests from Slack" page.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        assert_eq!(
            sign("8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn escaping_neutralizes_control_sequences_and_unescaping_inverts_it() {
        let text = "hi <!channel> <@U123> <https://evil.example|bank> & ok > 1";
        let e = escape(text);
        assert_eq!(
            e,
            "hi &lt;!channel&gt; &lt;@U123&gt; &lt;https://evil.example|bank&gt; &amp; ok &gt; 1"
        );
        assert!(!e.contains('<') && !e.contains('>'));
        assert_eq!(unescape(&e), text);
        assert_eq!(unescape("&amp;lt; &x; &"), "&lt; &x; &");
    }

    #[test]
    fn mentions_match_the_exact_user_id_only() {
        assert!(mentions("hey <@U0BOT> hi", "U0BOT"));
        assert!(mentions("<@U0BOT|chitin> hi", "U0BOT"));
        assert!(!mentions("hey <@U0BOTX> hi", "U0BOT"));
        assert!(!mentions("hey @U0BOT hi", "U0BOT"));
        assert!(!mentions("hey &lt;@U0BOT&gt;", "U0BOT"));
        assert!(!mentions("<@", "U0BOT"));
    }

    #[test]
    fn long_text_with_buttons_is_split_into_sections_within_slacks_limit() {
        let text = "<&>".repeat(1300); // 3900 characters, 3900 * 13/3 escaped
        let b = blocks(
            &text,
            &[Button {
                label: "Approve".into(),
                data: "a:1".into(),
            }],
        )
        .unwrap();
        let blocks = b.as_array().unwrap();
        let sections: Vec<&str> = blocks
            .iter()
            .filter(|b| b["type"] == "section")
            .map(|b| b["text"]["text"].as_str().unwrap())
            .collect();
        assert!(sections.len() > 1);
        for s in &sections {
            assert!(utf16_len(s) <= MAX_SECTION_TEXT, "{}", utf16_len(s));
        }
        assert_eq!(unescape(&sections.concat()), text);
        assert_eq!(blocks.last().unwrap()["type"], "actions");
    }
}
