//! Discord, over the gateway WebSocket (events) and the HTTP API v10 (everything else).
//!
//! - **Token.** A bot token (`Authorization: Bot <token>`): sent only in that header (built
//!   once, marked sensitive) and in the gateway's Identify / Resume payloads, never in a URL.
//!   Request errors are taken without their URL (interaction tokens are in paths), every error
//!   text is scrubbed of the bot token and the interaction token, `Debug` shows `<redacted>`,
//!   and nothing here logs. Plain `http://` / `ws://` only on a loopback address (tests).
//! - **Receiving.** The gateway session runs in a background task the adapter owns (see
//!   `discord/gateway.rs` for the protocol: heartbeats, zombie detection, resume,
//!   reconnect, invalid sessions, intents). It starts with the first [`Platform::poll`] (which
//!   gets the engine's cursor) and buffers `MESSAGE_CREATE`, `MESSAGE_UPDATE` and button
//!   `INTERACTION_CREATE` events; `poll` returns them in order, waiting up to the poll timeout
//!   when there are none. Mapping rules are in `discord/wire.rs`.
//! - **Cursor** `<seq>:<session id>:<resume gateway URL>`: the session and sequence number of
//!   the last event returned. Discord has no acknowledgement; events are at most once per
//!   connection and a resumed session replays what followed `seq`. Within one process a poll
//!   with a cursor drops the buffered events up to it, and a poll with an older cursor (a
//!   commit that failed) gets them again. After a *restart of the gateway process* the first
//!   poll's cursor is resumed: when the session is still valid (Discord keeps it a few minutes
//!   after its connection drops; the adapter never closes with 1000/1001, which would end it)
//!   Discord replays every dispatch after the cursor, including those the old process
//!   received but the engine had not committed. When it is not (down too long, or Discord
//!   says Invalid Session) the adapter identifies afresh, and **messages sent while it was
//!   down are not delivered: Discord does not replay them to a new session** (reading channel
//!   history to catch up is not done). Event ids (`m:<message id>`, `e:<message id>:<edited
//!   timestamp>`, `i:<interaction id>`) are stable across replays, so the engine drops
//!   duplicates. A cursor this adapter cannot read is ignored (a fresh identify).
//! - **Chats.** A DM (no `guild_id`) is [`ChatKind::Dm`] with the DM channel's id. A guild
//!   text channel is a [`ChatKind::Group`] with the channel's id. A thread (channel types 10,
//!   11, 12: threads, forum posts) is its **parent channel** as the chat with
//!   [`ChatRef::thread`] = the thread's id, so admitting a channel admits its threads and each
//!   thread is its own session (as Telegram forum topics). Which channels are threads comes
//!   from the gateway (`GUILD_CREATE`, `THREAD_*`, an interaction's `channel`) or else from
//!   `GET /channels/{id}` once per channel (cached). Sends to a thread go to the thread id.
//! - **Sending.** `POST /channels/{id}/messages` with the text escaped (Discord has no plain
//!   text mode: `\` precedes every markdown character, so `**bold**`, `[label](url)`,
//!   headings, lists, spoilers, code and `<@id>` / `<#id>` / `<t:…>` show as typed; URLs are
//!   left as they are so they stay links), `allowed_mentions: {"parse": []}` and
//!   `replied_user: false` (nothing in the text can ping anyone), `SUPPRESS_EMBEDS` (Discord
//!   would otherwise fetch every URL the model writes), `message_reference` with
//!   `fail_if_not_exists: false` for replies, and `nonce` (derived from
//!   [`OutMessage::delivery_id`], at most 25 characters) with `enforce_nonce: true`: Discord
//!   then answers a retried create within a few minutes with the message it already made
//!   instead of posting twice. That window is short and undocumented in length, so
//!   [`Platform::sends_are_idempotent`] stays false. Buttons are one action row of buttons
//!   (`custom_id` = [`Button::data`], style danger for data starting with `d:` (Chitin's
//!   Deny), primary otherwise).
//! - **Buttons pressed** are acknowledged by the gateway task at once (interaction callback
//!   type 6, so Discord's 3-second deadline does not depend on the engine);
//!   [`Platform::answer_button`] then posts the answer as an ephemeral followup (only the
//!   presser sees it), or answers the interaction itself (type 4, ephemeral) when the
//!   acknowledgement had failed.
//! - **Length.** Discord limits a message to 2000 characters counted as Unicode code points
//!   (its API counts with Python's `len`). Escaping at most doubles a text, so
//!   [`Limits::max_text_chars`] is [`MAX_TEXT`] = 1000 UTF-16 units (never more code points):
//!   every text within it fits once escaped. A longer text is sent when its escaped form
//!   fits.
//! - **Rate limits** per bucket and global, see `discord/rest.rs`.

mod gateway;
mod rest;
mod wire;

#[cfg(feature = "fake")]
pub mod fake;

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use reqwest::{Method, Url};
use rustls_platform_verifier::BuilderVerifierExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::crypto::CryptoProvider;
use zeroize::Zeroizing;

use self::gateway::{Ctx, Pending, Session, SessionInfo, Shared, gateway_ws_url};
pub use self::gateway::{
    INTENT_DIRECT_MESSAGES, INTENT_GUILD_MESSAGES, INTENT_GUILDS, INTENT_MESSAGE_CONTENT, INTENTS,
    MAX_BUFFERED,
};
use self::rest::{ApiError, CallError, REQUEST_TIMEOUT, Rest, Route};
use self::wire::{Bot, ChannelInfo, Item, is_interaction_token, is_snowflake};
use crate::http;
use crate::text::check_button;
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ChannelError, ChatKind, ChatRef, ConfigError, Inbound,
    Limits, OutMessage, Platform, Polled, SendError, Sent, WebhookParsed, WebhookRequest,
};

/// The public API root (v10).
pub const DEFAULT_API_BASE: &str = "https://discord.com/api/v10";
/// Longest text [`Limits::max_text_chars`] promises, in UTF-16 code units: half of Discord's
/// 2000, so the escaped text always fits.
pub const MAX_TEXT: usize = 1000;
/// Discord's limit of a message's `content`, in code points.
pub const MAX_CONTENT: usize = 2000;
/// Longest `custom_id` of a button (characters; [`Limits::max_button_data`] counts bytes,
/// which is never fewer).
pub const MAX_BUTTON_DATA: usize = 100;
/// Longest button label (characters).
pub const MAX_BUTTON_LABEL: usize = 80;
/// Buttons in one action row.
pub const MAX_BUTTONS: usize = 5;
/// The hosts attachments are fetched from (besides the API root's own host).
pub const CDN_HOSTS: [&str; 2] = ["cdn.discordapp.com", "media.discordapp.net"];
/// Events one poll returns at most.
const MAX_BATCH: usize = 100;
/// Message flags: `SUPPRESS_EMBEDS` (no link previews) and `EPHEMERAL`.
const FLAG_SUPPRESS_EMBEDS: u64 = 1 << 2;
const FLAG_EPHEMERAL: u64 = 1 << 6;
/// Interaction callback `CHANNEL_MESSAGE_WITH_SOURCE` and `DEFERRED_UPDATE_MESSAGE`.
const CALLBACK_MESSAGE: u64 = 4;
const CALLBACK_DEFERRED_UPDATE: u64 = 6;
/// Discord's JSON error code "Interaction has already been acknowledged".
const ALREADY_ACKNOWLEDGED: u64 = 40060;
/// Longest `nonce`.
const MAX_NONCE: usize = 25;
/// Discord asks bots for this form of User-Agent.
const USER_AGENT: &str = concat!(
    "DiscordBot (https://github.com/chitin, ",
    env!("CARGO_PKG_VERSION"),
    ")"
);

/// One Discord channel's settings, credentials already released by the gateway.
pub struct DiscordConfig {
    /// The HTTP API root (default [`DEFAULT_API_BASE`]); `https`, or `http` on loopback only.
    pub api_base: Url,
    /// The bot token (Developer Portal → the application → Bot → Token), without `Bot `.
    pub token: Zeroizing<String>,
    /// How long a poll waits for events when there are none.
    pub poll_timeout_secs: u32,
    /// Identify with the privileged `MESSAGE_CONTENT` intent (default true): the text of
    /// every guild message. Off, the bot reads only DMs and messages that mention or reply to
    /// it (enough for a bot that answers when addressed), and needs no approval in the
    /// Developer Portal.
    pub message_content: bool,
}

impl DiscordConfig {
    /// The public API, a 30 s poll, with `MESSAGE_CONTENT`.
    pub fn new(token: Zeroizing<String>) -> Result<Self, ConfigError> {
        let api_base = Url::parse(DEFAULT_API_BASE)
            .map_err(|e| ConfigError::Invalid(format!("the default API root: {e}")))?;
        Ok(Self {
            api_base,
            token,
            poll_timeout_secs: 30,
            message_content: true,
        })
    }
}

impl fmt::Debug for DiscordConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordConfig")
            .field("api_base", &self.api_base.as_str())
            .field("token", &"<redacted>")
            .field("poll_timeout_secs", &self.poll_timeout_secs)
            .field("message_content", &self.message_content)
            .finish()
    }
}

#[derive(Default)]
struct TaskSlot {
    handle: Option<JoinHandle<()>>,
    /// The task was started once (only the first start resumes from the engine's cursor).
    started: bool,
}

/// The Discord adapter. Build it with [`Discord::new`]; `connect` checks the token and learns
/// the bot's account, the first `poll` starts the gateway session.
pub struct Discord {
    /// The API root as configured (attachments may be fetched from its origin).
    api_base: Url,
    rest: Arc<Rest>,
    shared: Arc<Shared>,
    token: Zeroizing<String>,
    intents: u64,
    tls: Arc<ClientConfig>,
    poll_timeout: Duration,
    task: Mutex<TaskSlot>,
}

impl fmt::Debug for Discord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bot = self.shared.lock().bot.as_ref().map(|b| b.username.clone());
        f.debug_struct("Discord")
            .field("api_base", &self.rest.base())
            .field("token", &"<redacted>")
            .field("intents", &self.intents)
            .field("bot", &bot)
            .finish_non_exhaustive()
    }
}

impl Drop for Discord {
    fn drop(&mut self) {
        // The socket is dropped without a close frame: the session stays resumable.
        if let Some(h) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .handle
            .take()
        {
            h.abort();
        }
    }
}

/// The resume point a cursor carries.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    seq: u64,
    session_id: String,
    resume_url: String,
}

impl Cursor {
    fn parse(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, ':');
        let seq = parts.next()?.parse::<u64>().ok()?;
        let session_id = parts.next()?;
        let resume_url = parts.next()?;
        let id_ok = (1..=128).contains(&session_id.len())
            && session_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return None;
        }
        let resume_url = gateway_ws_url(resume_url).ok()?;
        Some(Self {
            seq,
            session_id: session_id.to_owned(),
            resume_url: resume_url.to_string(),
        })
    }

    fn of(p: &Pending) -> String {
        format!("{}:{}:{}", p.seq, p.session.id, p.session.resume_url)
    }
}

impl Discord {
    /// Checks the configuration and builds the HTTP client and TLS settings; sends nothing.
    pub fn new(cfg: DiscordConfig) -> Result<Self, ConfigError> {
        check_token(&cfg.token)?;
        http::check_api_root(&cfg.api_base, "api_base", "the token")?;
        // No redirects: one could carry the Authorization header's token elsewhere.
        let http = http::client(USER_AGENT)?;
        let base = cfg.api_base.as_str().trim_end_matches('/').to_owned();
        let rest = Rest::new(base, cfg.token.clone(), http).map_err(ConfigError::Invalid)?;
        let mut intents = INTENTS;
        if !cfg.message_content {
            intents &= !INTENT_MESSAGE_CONTENT;
        }
        Ok(Self {
            api_base: cfg.api_base,
            rest: Arc::new(rest),
            shared: Arc::new(Shared::default()),
            token: cfg.token,
            intents,
            tls: tls_config()?,
            poll_timeout: Duration::from_secs(cfg.poll_timeout_secs.into()),
            task: Mutex::new(TaskSlot::default()),
        })
    }

    /// The intents the gateway session identifies with.
    pub fn intents(&self) -> u64 {
        self.intents
    }

    /// Starts the gateway session now instead of at the first poll, resuming the session
    /// `cursor` names (a cursor [`Platform::poll`] returned) when there is one; learns the
    /// bot's account first if `connect` did not. Does nothing while the session runs.
    pub async fn start(&self, cursor: Option<&str>) -> Result<(), ChannelError> {
        let cursor = cursor.and_then(Cursor::parse);
        if self.bot().is_none() {
            self.fetch_me().await?;
        }
        self.ensure_running(cursor.as_ref())
    }

    /// Stops the gateway task (the socket is dropped) and forgets its session and the events
    /// no poll returned: the next poll starts again, resuming the cursor's session.
    pub fn stop_session(&self) {
        let mut slot = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = slot.handle.take() {
            h.abort();
        }
        slot.started = false;
        let mut st = self.shared.lock();
        st.session = None;
        st.buffer.clear();
        st.connected = false;
        st.fatal = None;
        drop(st);
        // A task waiting for room in a full buffer is gone; nothing else waits on it.
        self.shared.drained.notify_waiters();
    }

    /// True while a gateway session is open (READY or RESUMED seen and not lost since).
    pub fn gateway_connected(&self) -> bool {
        self.shared.lock().connected
    }

    fn bot(&self) -> Option<Bot> {
        self.shared.lock().bot.clone()
    }

    /// `GET /users/@me`: the bot's account.
    async fn fetch_me(&self) -> Result<Bot, ChannelError> {
        let me = self
            .rest
            .call(
                &route(Method::GET, "/users/@me".into(), "GET /users/@me", ""),
                None,
            )
            .await
            .map_err(channel_error)?;
        let id = me
            .get("id")
            .and_then(Value::as_str)
            .filter(|i| is_snowflake(i));
        let username = me.get("username").and_then(Value::as_str);
        let (Some(id), Some(username)) = (id, username) else {
            return Err(ChannelError::Protocol(
                "GET /users/@me answered without the bot's id and username".into(),
            ));
        };
        let bot = Bot {
            id: id.to_owned(),
            username: username.to_owned(),
        };
        self.shared.lock().bot = Some(bot.clone());
        Ok(bot)
    }

    /// Starts the gateway task if it is not running; reports (once) why it stopped.
    fn ensure_running(&self, cursor: Option<&Cursor>) -> Result<(), ChannelError> {
        let mut slot = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.handle.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        if let Some(e) = self.shared.lock().fatal.take() {
            // Reported once; the next poll (after the engine's pause) starts it again.
            slot.handle = None;
            return Err(e);
        }
        if !slot.started
            && let Some(c) = cursor
        {
            let mut st = self.shared.lock();
            if st.session.is_none() {
                st.session = Some(Session {
                    info: Arc::new(SessionInfo {
                        id: c.session_id.clone(),
                        resume_url: c.resume_url.clone(),
                    }),
                    seq: c.seq,
                });
            }
        }
        slot.started = true;
        let ctx = Ctx {
            shared: Arc::clone(&self.shared),
            rest: Arc::clone(&self.rest),
            token: self.token.clone(),
            intents: self.intents,
            tls: Arc::clone(&self.tls),
        };
        slot.handle = Some(tokio::spawn(gateway::run(ctx)));
        Ok(())
    }

    /// Drops the buffered events up to and including the cursor's (the engine committed
    /// them).
    fn acknowledge(&self, cursor: Option<&Cursor>) {
        let Some(c) = cursor else {
            return;
        };
        let mut st = self.shared.lock();
        let pos = st
            .buffer
            .iter()
            .position(|p| p.seq == c.seq && p.session.id == c.session_id);
        if let Some(pos) = pos {
            st.buffer.drain(..=pos);
            drop(st);
            self.shared.drained.notify_waiters();
        }
    }

    /// The chat of a buffered event (looking up whether a guild channel is a thread).
    async fn resolve(&self, item: &Item) -> Result<ChatRef, ChannelError> {
        if item.guild_id.is_none() {
            return Ok(ChatRef {
                id: item.channel_id.clone(),
                kind: ChatKind::Dm,
                thread: None,
            });
        }
        let known = item
            .parent
            .clone()
            .or_else(|| self.shared.lock().channels.get(&item.channel_id).cloned());
        let parent = match known {
            Some(p) => p,
            None => self.lookup_parent(&item.channel_id).await?,
        };
        Ok(match parent {
            Some(parent) => ChatRef {
                id: parent,
                kind: ChatKind::Group,
                thread: Some(item.channel_id.clone()),
            },
            None => ChatRef {
                id: item.channel_id.clone(),
                kind: ChatKind::Group,
                thread: None,
            },
        })
    }

    /// `GET /channels/{id}`: the parent of a thread, `None` for another channel (or one the
    /// bot cannot read: then it is its own chat).
    async fn lookup_parent(&self, channel_id: &str) -> Result<Option<String>, ChannelError> {
        let r = route(
            Method::GET,
            format!("/channels/{channel_id}"),
            "GET /channels/{}",
            channel_id,
        );
        let parent = match self.rest.call(&r, None).await {
            Ok(v) => ChannelInfo::deserialize(&v)
                .ok()
                .and_then(|c| c.thread_parent())
                .filter(|p| is_snowflake(p)),
            Err(CallError::Api(ApiError::Status {
                status: 403 | 404, ..
            })) => None,
            Err(e) => return Err(channel_error(e)),
        };
        self.shared
            .lock()
            .remember_channel(channel_id.to_owned(), parent.clone());
        Ok(parent)
    }

    async fn poll_inner(&self, cursor: Option<&str>) -> Result<Polled, ChannelError> {
        self.start(cursor).await?;
        let cursor = cursor.and_then(Cursor::parse);
        self.acknowledge(cursor.as_ref());
        let deadline = tokio::time::Instant::now() + self.poll_timeout;
        loop {
            let woken = self.shared.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if !st.buffer.is_empty() {
                    break;
                }
                if let Some(e) = st.fatal.take() {
                    return Err(e);
                }
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                break;
            }
        }
        let batch: Vec<Pending> = self
            .shared
            .lock()
            .buffer
            .iter()
            .take(MAX_BATCH)
            .cloned()
            .collect();
        let mut events = Vec::with_capacity(batch.len());
        let mut last = None;
        for p in &batch {
            match self.resolve(&p.item).await {
                Ok(chat) => {
                    events.push(Inbound {
                        event_id: p.item.event_id.clone(),
                        event: p.item.with_chat(chat),
                    });
                    last = Some(p);
                }
                // The rest waits for the next poll.
                Err(_) if !events.is_empty() => break,
                Err(e) => return Err(e),
            }
        }
        if events.is_empty() {
            let st = self.shared.lock();
            if !st.connected
                && let Some(why) = &st.last_error
            {
                return Err(ChannelError::Transient(format!(
                    "the gateway is reconnecting: {why}"
                )));
            }
        }
        Ok(Polled {
            events,
            cursor: last.map(Cursor::of),
        })
    }

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        let channel = target(&msg.chat)?;
        let mut body = message_body(&msg.text)?;
        let nonce = nonce(&msg.delivery_id);
        if !nonce.is_empty() {
            body["nonce"] = nonce.into();
            body["enforce_nonce"] = true.into();
        }
        if let Some(reply_to) = &msg.reply_to {
            body["message_reference"] = json!({
                "message_id": snowflake(reply_to, "message")?,
                "fail_if_not_exists": false,
            });
        }
        if !msg.buttons.is_empty() {
            body["components"] = components(&msg.buttons)?;
        }
        let r = route(
            Method::POST,
            format!("/channels/{channel}/messages"),
            "POST /channels/{}/messages",
            channel,
        );
        let answer = self.rest.call(&r, Some(&body)).await.map_err(send_error)?;
        match answer.get("id").and_then(Value::as_str) {
            Some(id) => Ok(Sent {
                message_id: id.to_owned(),
            }),
            None => Err(SendError::Transient {
                message: "create message: the answer has no id".into(),
                maybe_delivered: true,
            }),
        }
    }

    async fn edit_inner(
        &self,
        chat: &ChatRef,
        message_id: &str,
        text: &str,
        buttons: Option<&[Button]>,
    ) -> Result<(), SendError> {
        let channel = target(chat)?;
        let message_id = snowflake(message_id, "message")?;
        let mut body = message_body(text)?;
        // An empty list removes the buttons.
        body["components"] = components(buttons.unwrap_or(&[]))?;
        let r = route(
            Method::PATCH,
            format!("/channels/{channel}/messages/{message_id}"),
            "PATCH /channels/{}/messages/{}",
            channel,
        );
        self.rest
            .call(&r, Some(&body))
            .await
            .map(drop)
            .map_err(send_error)
    }

    async fn answer_inner(&self, callback_id: &str, text: &str) -> Result<(), SendError> {
        let Some((id, app, token)) = parse_callback(callback_id) else {
            return Err(SendError::Permanent(
                "the button press's callback id is not <interaction id>:<application id>:<token>"
                    .into(),
            ));
        };
        let content = (!text.trim().is_empty()).then(|| {
            let escaped = escape_markdown(text);
            truncate_chars(&escaped, MAX_CONTENT).to_owned()
        });
        let deferred = self.shared.lock().deferred.contains_key(id);
        if !deferred {
            let body = match &content {
                Some(c) => json!({
                    "type": CALLBACK_MESSAGE,
                    "data": {
                        "content": c,
                        "flags": FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS,
                        "allowed_mentions": { "parse": [] },
                    },
                }),
                None => json!({ "type": CALLBACK_DEFERRED_UPDATE }),
            };
            let r = Route {
                method: Method::POST,
                path: format!("/interactions/{id}/{token}/callback"),
                key: "POST /interactions/{}/{}/callback",
                major: id.to_owned(),
                auth: false,
                global: false,
                secret: Some(Zeroizing::new(token.to_owned())),
            };
            match self.rest.call(&r, Some(&body)).await {
                Ok(_) => return Ok(()),
                // The gateway task's acknowledgement got there first: follow up instead.
                Err(CallError::Api(ApiError::Status {
                    code: Some(ALREADY_ACKNOWLEDGED),
                    ..
                })) => {}
                Err(e) => return Err(send_error(e)),
            }
        }
        let Some(content) = content else {
            return Ok(());
        };
        let body = json!({
            "content": content,
            "flags": FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS,
            "allowed_mentions": { "parse": [] },
        });
        let r = Route {
            method: Method::POST,
            path: format!("/webhooks/{app}/{token}"),
            key: "POST /webhooks/{}/{}",
            major: format!("{app}/{id}"),
            auth: false,
            global: false,
            secret: Some(Zeroizing::new(token.to_owned())),
        };
        self.rest
            .call(&r, Some(&body))
            .await
            .map(drop)
            .map_err(send_error)
    }

    /// Downloads an attachment from Discord's CDN (or the API root's own host), bounded by
    /// `max_bytes` (the announced size first, then the bytes as they come). No credential is
    /// sent: attachment URLs are signed.
    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        http::check_size(a.size, max_bytes)?;
        let url = Url::parse(&a.file_ref)
            .map_err(|_| ChannelError::Protocol("the attachment's URL is not a URL".into()))?;
        // `https` on Discord's CDN hosts, or the API root's own origin (a local proxy, the
        // fake in tests).
        if !http::may_download(&url, &self.api_base, &CDN_HOSTS) {
            return Err(ChannelError::Protocol(format!(
                "the attachment is not on Discord's CDN ({}): not fetched",
                url.host_str().unwrap_or("no host")
            )));
        }
        let req = self
            .rest
            .http()
            .get(url.as_str())
            .timeout(REQUEST_TIMEOUT * 4);
        let hint = |_| Some("attachment links expire after a day");
        let secrets = self.rest.secrets(None);
        http::download(req, "attachment download", max_bytes, &secrets, hint).await
    }
}

impl Platform for Discord {
    fn kind(&self) -> &'static str {
        "discord"
    }

    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: MAX_BUTTON_DATA,
        }
    }

    /// Checks the token (`GET /users/@me`, `GET /gateway/bot`) and learns the bot's account.
    /// The gateway session starts with the first poll (which has the engine's cursor).
    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            let bot = self.fetch_me().await?;
            let r = route(Method::GET, "/gateway/bot".into(), "GET /gateway/bot", "");
            self.rest.call(&r, None).await.map_err(channel_error)?;
            Ok(BotInfo {
                id: bot.id,
                username: bot.username,
            })
        })
    }

    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(self.poll_inner(cursor))
    }

    fn disconnect(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.stop_session() })
    }

    /// Discord's events come over the gateway: this adapter serves no webhook route.
    fn webhook(&self, _req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        Err(ChannelError::NoSuchRoute)
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

    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let channel = target(chat)?;
            let r = route(
                Method::POST,
                format!("/channels/{channel}/typing"),
                "POST /channels/{}/typing",
                channel,
            );
            self.rest.call(&r, None).await.map(drop).map_err(send_error)
        })
    }

    fn fetch_attachment<'a>(
        &'a self,
        attachment: &'a Attachment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        Box::pin(self.fetch_inner(attachment, max_bytes))
    }
}

/// A bot-authenticated route counted against the global limit.
fn route(method: Method, path: String, key: &'static str, major: &str) -> Route {
    Route {
        method,
        path,
        key,
        major: major.to_owned(),
        auth: true,
        global: true,
        secret: None,
    }
}

/// The channel a chat's messages go to: the thread when there is one.
fn target(chat: &ChatRef) -> Result<&str, SendError> {
    let id = chat.thread.as_deref().unwrap_or(&chat.id);
    snowflake(id, "channel")
}

fn snowflake<'a>(id: &'a str, what: &str) -> Result<&'a str, SendError> {
    if is_snowflake(id) {
        Ok(id)
    } else {
        Err(SendError::Permanent(format!(
            "{id:?} is not a Discord {what} id"
        )))
    }
}

/// `<interaction id>:<application id>:<token>`.
fn parse_callback(callback_id: &str) -> Option<(&str, &str, &str)> {
    let mut parts = callback_id.splitn(3, ':');
    let (id, app, token) = (parts.next()?, parts.next()?, parts.next()?);
    (is_snowflake(id) && is_snowflake(app) && is_interaction_token(token))
        .then_some((id, app, token))
}

/// The JSON of a message's text: escaped, checked against Discord's limit, no mentions, no
/// link previews.
fn message_body(text: &str) -> Result<Value, SendError> {
    if text.trim().is_empty() {
        return Err(SendError::Permanent(
            "the message text is empty (Discord refuses empty messages)".into(),
        ));
    }
    let content = escape_markdown(text);
    let n = content.chars().count();
    if n > MAX_CONTENT {
        return Err(SendError::Permanent(format!(
            "the text is {n} characters once escaped, over Discord's {MAX_CONTENT}: split it \
             at {MAX_TEXT} UTF-16 units with `chitin_channels::text::split`"
        )));
    }
    Ok(json!({
        "content": content,
        "allowed_mentions": { "parse": [], "replied_user": false },
        "flags": FLAG_SUPPRESS_EMBEDS,
    }))
}

/// One action row of buttons.
fn components(buttons: &[Button]) -> Result<Value, SendError> {
    if buttons.is_empty() {
        return Ok(json!([]));
    }
    if buttons.len() > MAX_BUTTONS {
        return Err(SendError::Permanent(format!(
            "{} buttons; Discord takes at most {MAX_BUTTONS} in a row",
            buttons.len()
        )));
    }
    let mut row = Vec::with_capacity(buttons.len());
    for (i, b) in buttons.iter().enumerate() {
        let label_len = b.label.chars().count();
        if b.label.trim().is_empty() || label_len > MAX_BUTTON_LABEL {
            return Err(SendError::Permanent(format!(
                "a button's label is {label_len} characters; Discord takes 1-{MAX_BUTTON_LABEL}"
            )));
        }
        check_button(b, MAX_BUTTON_DATA, "Discord")?;
        if buttons[..i].iter().any(|o| o.data == b.data) {
            return Err(SendError::Permanent(
                "two buttons have the same data (Discord needs distinct custom_ids)".into(),
            ));
        }
        let style = if b.data.starts_with("d:") { 4 } else { 1 };
        row.push(json!({ "type": 2, "style": style, "label": b.label, "custom_id": b.data }));
    }
    Ok(json!([{ "type": 1, "components": row }]))
}

/// A `nonce` for a delivery id: the id itself when it is short URL-safe text (Chitin's
/// `chitin-<channel>-<row>` usually is), else `c-` and its 64-bit FNV-1a hash in hex.
/// Empty for an empty id (no nonce is sent).
fn nonce(delivery_id: &str) -> String {
    if delivery_id.is_empty() {
        return String::new();
    }
    let plain = delivery_id.len() <= MAX_NONCE
        && delivery_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        return delivery_id.to_owned();
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in delivery_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("c-{h:016x}")
}

/// Escapes Discord markdown so a text shows exactly as written: a `\` before every
/// character that can start markup (`\ * _ ~ ` | < > [ ] @ #` anywhere, and at the start of a
/// line `-`, `+` and the `.` of `1.`). URLs (`http://` or `https://` up to whitespace or `<`)
/// are copied unchanged so they stay working links (Discord reads a URL before any markup in
/// it). The result is at most twice as long.
pub fn escape_markdown(text: &str) -> String {
    const ALWAYS: &[char] = &['\\', '*', '_', '~', '`', '|', '<', '>', '[', ']', '@', '#'];
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    let mut line_start = true;
    let mut prev: Option<char> = None;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let word_start = prev.is_none_or(|p| !p.is_alphanumeric());
        if word_start && let Some(url_len) = url_at(rest) {
            out.push_str(&rest[..url_len]);
            prev = rest[..url_len].chars().last();
            rest = &rest[url_len..];
            line_start = false;
            continue;
        }
        let mut escape = ALWAYS.contains(&c);
        if line_start && (c == '-' || c == '+') {
            escape = true;
        }
        if line_start && c.is_ascii_digit() {
            // `1.` / `12.` starting a line is an ordered list: escape its dot.
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if rest[digits..].starts_with('.') {
                out.push_str(&rest[..digits]);
                out.push_str("\\.");
                rest = &rest[digits + 1..];
                prev = Some('.');
                line_start = false;
                continue;
            }
        }
        if escape {
            out.push('\\');
        }
        out.push(c);
        line_start = c == '\n' || (line_start && (c == ' ' || c == '\t'));
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The length in bytes of the URL `s` starts with, if it does.
fn url_at(s: &str) -> Option<usize> {
    let lower = |p: &str| {
        s.get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p))
    };
    let scheme = if lower("https://") {
        8
    } else if lower("http://") {
        7
    } else {
        return None;
    };
    let len = s
        .char_indices()
        .find(|(_, c)| c.is_whitespace() || *c == '<')
        .map_or(s.len(), |(i, _)| i);
    (len > scheme).then_some(len)
}

/// The first `n` code points of `s`.
fn truncate_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|api| match api {
        ApiError::RateLimited { retry_after } => SendError::RateLimited { retry_after },
        // The platform received the request; whether it acted on it is unknown.
        ApiError::Status {
            status: 500..,
            message,
            ..
        } => SendError::Transient {
            message,
            maybe_delivered: true,
        },
        ApiError::Status {
            status: 401,
            message,
            ..
        } => SendError::Permanent(format!(
            "{message}: the bot's token was refused; check it (`chitin secrets set`) and `api_base`"
        )),
        ApiError::Status {
            status: 403,
            message,
            ..
        } => SendError::Permanent(format!(
            "{message}: the bot lacks a permission in this channel (View Channel, Send \
             Messages, Send Messages in Threads) or cannot message this user"
        )),
        ApiError::Status { message, .. } => SendError::Permanent(message),
    })
}

fn channel_error(e: CallError) -> ChannelError {
    e.into_channel_error(|api| match api {
        ApiError::RateLimited { retry_after } => ChannelError::RateLimited { retry_after },
        ApiError::Status {
            status: 500..,
            message,
            ..
        } => ChannelError::Transient(message),
        ApiError::Status {
            status: 401 | 403,
            message,
            ..
        } => ChannelError::Unauthorized(message),
        ApiError::Status { message, .. } => ChannelError::Protocol(message),
    })
}

/// The TLS settings of the gateway's `wss` connection: rustls with the process's crypto
/// provider (aws-lc-rs unless another was installed) and the platform's certificate roots,
/// as reqwest uses for the HTTP API.
fn tls_config() -> Result<Arc<ClientConfig>, ConfigError> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider()));
    let cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::Invalid(format!("gateway TLS: {e}")))?
        .with_platform_verifier()
        .map_err(|e| ConfigError::Invalid(format!("gateway TLS certificate roots: {e}")))?
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn check_token(token: &str) -> Result<(), ConfigError> {
    if token.starts_with("Bot ") || token.starts_with("Bearer ") {
        return Err(ConfigError::Invalid(
            "the Discord bot token must be given without the `Bot ` prefix; set it again with \
             `chitin secrets set`"
                .into(),
        ));
    }
    let ok = (20..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        // Never echo the value: it may be a real credential pasted in the wrong place.
        Err(ConfigError::Invalid(
            "the Discord bot token is not of the form the Developer Portal gives (letters, \
             digits, `.`, `_`, `-`); set it again with `chitin secrets set`"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::text::utf16_len;

    fn cfg(base: &str, token: &str) -> DiscordConfig {
        let mut c = DiscordConfig::new(Zeroizing::new(token.into())).unwrap();
        c.api_base = Url::parse(base).unwrap();
        c
    }

    const TOKEN: &str = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GAbCdE.secret_token-value";

    #[test]
    fn plain_http_is_refused_off_loopback_and_accepted_on_it() {
        let err = Discord::new(cfg("http://discord.example", TOKEN)).unwrap_err();
        assert!(err.to_string().contains("plain http"), "{err}");
        Discord::new(cfg("http://127.0.0.1:9/api/v10", TOKEN)).unwrap();
        Discord::new(cfg("http://[::1]:9", TOKEN)).unwrap();
        Discord::new(cfg(DEFAULT_API_BASE, TOKEN)).unwrap();
    }

    #[test]
    fn a_malformed_or_prefixed_token_is_refused_without_echoing_it() {
        let err =
            Discord::new(cfg(DEFAULT_API_BASE, "Bot MTIzNDU2Nzg5MDEyMzQ1Njc4.x.y")).unwrap_err();
        assert!(
            err.to_string().contains("without the `Bot ` prefix"),
            "{err}"
        );
        let err = Discord::new(cfg(DEFAULT_API_BASE, "abc def/../ghi jkl mno pqr")).unwrap_err();
        assert!(!err.to_string().contains("ghi"), "{err}");
    }

    #[test]
    fn debug_output_hides_the_token() {
        let c = cfg(DEFAULT_API_BASE, TOKEN);
        assert!(!format!("{c:?}").contains("secret_token"));
        let d = Discord::new(c).unwrap();
        let shown = format!("{d:?}");
        assert!(
            !shown.contains("secret_token") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn markdown_mentions_and_markup_are_escaped_and_urls_left_alone() {
        assert_eq!(escape_markdown("**bold** _it_"), r"\*\*bold\*\* \_it\_");
        assert_eq!(
            escape_markdown("[click](https://evil.example/a_b)"),
            r"\[click\](https://evil.example/a_b)"
        );
        assert_eq!(escape_markdown("@everyone <@123>"), r"\@everyone \<\@123\>");
        assert_eq!(
            escape_markdown("# Title\n- item\n  1. one\nx-y 2.5"),
            "\\# Title\n\\- item\n  1\\. one\nx-y 2.5"
        );
        assert_eq!(
            escape_markdown("```rust\nfn```"),
            "\\`\\`\\`rust\nfn\\`\\`\\`"
        );
        assert_eq!(
            escape_markdown("||spoiler|| ~~x~~ > q"),
            r"\|\|spoiler\|\| \~\~x\~\~ \> q"
        );
        assert_eq!(
            escape_markdown("see https://x.example/*a*_b_ ok"),
            "see https://x.example/*a*_b_ ok"
        );
        assert_eq!(escape_markdown("xhttps://a_b"), r"xhttps://a\_b");
        assert_eq!(escape_markdown("😀 é"), "😀 é");
    }

    #[test]
    fn every_text_within_the_limit_fits_discord_once_escaped() {
        let worst = "*".repeat(MAX_TEXT);
        assert_eq!(utf16_len(&worst), MAX_TEXT);
        assert_eq!(escape_markdown(&worst).chars().count(), 2 * MAX_TEXT);
        assert!(message_body(&worst).is_ok());
        assert!(message_body(&"*".repeat(MAX_TEXT + 1)).is_err());
        // Code points: 1000 emoji are 2000 UTF-16 units, over the promise, but fit Discord.
        assert!(message_body(&"😀".repeat(2000)).is_ok());
    }

    #[test]
    fn nonces_are_the_delivery_id_or_a_short_hash_of_it() {
        assert_eq!(nonce("chitin-discord-42"), "chitin-discord-42");
        let long = nonce("chitin-a-very-long-channel-name-4242");
        assert_eq!(long.len(), 18);
        assert_eq!(long, nonce("chitin-a-very-long-channel-name-4242"));
        assert_ne!(long, nonce("chitin-a-very-long-channel-name-4243"));
        assert_eq!(nonce(""), "");
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_ignored() {
        let c = Cursor::parse("42:abc_DEF-1:wss://gateway-us-east1-b.discord.gg").unwrap();
        assert_eq!(c.seq, 42);
        assert_eq!(c.session_id, "abc_DEF-1");
        assert_eq!(
            c.resume_url,
            "wss://gateway-us-east1-b.discord.gg/?v=10&encoding=json"
        );
        assert!(Cursor::parse("x:abc:wss://g.example").is_none());
        assert!(Cursor::parse("1:a b:wss://g.example").is_none());
        assert!(
            Cursor::parse("1:abc:ws://g.example").is_none(),
            "plain ws off loopback"
        );
        assert!(Cursor::parse("1:abc:ws://127.0.0.1:5/resume").is_some());
        assert!(Cursor::parse("12345").is_none());
    }

    #[test]
    fn ids_in_paths_must_be_snowflakes() {
        let chat = ChatRef {
            id: "../../users/@me".into(),
            kind: ChatKind::Group,
            thread: None,
        };
        assert!(matches!(target(&chat), Err(SendError::Permanent(_))));
        assert!(parse_callback("1:2:tok/../x").is_none());
        assert_eq!(parse_callback("1:2:aW50:x"), None);
        assert_eq!(
            parse_callback("1:2:aW50.x-y_z"),
            Some(("1", "2", "aW50.x-y_z"))
        );
    }
}
