//! Signal, through a `signal-cli` daemon's HTTP interface: JSON-RPC 2.0 requests to
//! `POST <api_base>/api/v1/rpc` and incoming messages from the server-sent events stream
//! `GET <api_base>/api/v1/events`.
//!
//! Run the daemon for the bot's own number (a dedicated one: with the operator's personal
//! number linked, every contact's message would reach the bot):
//!
//! ```text
//! signal-cli -a +15550001111 daemon --http 127.0.0.1:8080 --receive-mode=on-connection
//! ```
//!
//! - **No authentication.** The daemon's HTTP interface has none: whoever reaches it reads and
//!   sends as the bot. It must listen on this host (loopback) or a private network only, so
//!   `api_base` is refused unless its host is a loopback or private address, `localhost`, a
//!   name without dots (a container's service name) or a `.internal`/`.local`/`.lan`/
//!   `.home.arpa` name. There is no credential to keep.
//! - **Receiving.** A background task (started by `connect` or the first `poll`) holds the
//!   event stream, reconnecting at once after a drop that followed data and with backoff
//!   (0.5 s doubling to 30 s) after failures; it buffers the envelopes in memory (at most
//!   [`MAX_BUFFERED`]; beyond that it stops reading, so the daemon holds the rest). `poll`
//!   returns the buffered envelopes after its cursor (`<instance>:<sequence>`; a cursor of an
//!   earlier process is ignored) and drops the ones the cursor acknowledges, as Telegram's
//!   `getUpdates` does; it waits up to `poll_timeout_secs` when there are none, and fails
//!   [`ChannelError::Transient`] while the daemon cannot be reached.
//! - **What a restart can lose.** signal-cli acknowledges each message to the Signal server as
//!   soon as it has received it and written it to the stream; nothing here can acknowledge
//!   later. Envelopes streamed to this process but not yet committed by the engine when it
//!   stops (in this buffer, or in flight on the socket) are lost. With `--receive-mode
//!   on-connection` signal-cli receives only while a stream is open, so messages sent while
//!   the gateway is down wait on the Signal server; with the default `on-start` the daemon
//!   receives them with nobody listening and they are lost too. Event ids are
//!   `s:<sender>:<timestamp>` (Signal's message id is its sender and sent timestamp), so an
//!   envelope delivered twice (a reconnect, a second stream) is deduplicated by the engine.
//! - **Mapping.** `dataMessage` → [`Event::Message`]: `groupInfo.groupId` makes it a group
//!   conversation (chat id = the group id), otherwise a DM (chat id = the sender). The sender
//!   is its ACI (`sourceUuid`) when signal-cli knows it (phone numbers may be hidden), else its
//!   number. In a group the bot is addressed by a mention of its number or ACI, or by a quote
//!   of one of its messages; a DM always addresses it. Mentions appear in the text as
//!   `@<number or ACI>` (signal-cli gives a placeholder character). Attachments:
//!   `attachments[]` (signal-cli has already downloaded them), fetched through the daemon's
//!   `getAttachment`. `editMessage` → [`Event::Edited`] of the original timestamp. Typing
//!   indicators, receipts, sync messages (the account's other devices), calls, stories, group
//!   updates, deletions, stickers, the bot's own messages and envelopes signal-cli could not
//!   decrypt → [`Event::Ignored`].
//! - **Reactions as buttons.** Signal has no buttons: an approval prompt arrives as text only
//!   (the engine's prompt says to reply `/approve CODE` or `/deny CODE`, or to react). A
//!   reaction to one of **the bot's** messages becomes [`Event::Button`] with
//!   `data = "react:<emoji>"` ([`REACTION_PREFIX`]), `message_id` = the reacted message's
//!   sent timestamp (the [`Sent::message_id`] its send returned: a sent message's id *is* its
//!   timestamp), `callback_id` = the reaction's own event id, `chat` and `sender` as for a
//!   message. [`reaction_verdict`] reads 👍 as approve and 👎 as deny (any skin tone). A
//!   removed reaction, and a reaction to another member's message, is ignored. Deciding is the
//!   engine's: the reacting member must be allowed to approve, exactly as for a button press.
//! - **Sending.** `send` with `recipient` or `groupId` and the plain text (signal-cli applies
//!   no markup; styles would need explicit ranges), `quoteTimestamp` + `quoteAuthor` for a
//!   reply. Signal quotes by (author, timestamp) while the engine keeps only the id: the
//!   authors of messages seen since start are remembered; for an unknown one a DM quotes the
//!   other party, a group sends without the quote. Buttons are not sent. [`Platform::edit`]
//!   sends with `editTimestamp` (the original's timestamp; Signal apps show edits of the last
//!   24 hours and may stop applying after many edits of one message). Texts over 2000 bytes
//!   are carried by signal-cli as a long-text attachment, which the apps show in full.
//! - **Errors.** JSON-RPC errors: `-5` (rate limit) → [`SendError::RateLimited`] after the
//!   largest `retryAfterSeconds` signal-cli reports (60 s if none; a captcha challenge may be
//!   needed: `signal-cli submitRateLimitChallenge`); `-4` (a recipient's safety number
//!   changed) and `-1` (user errors: unregistered recipient, unknown group, ...) →
//!   [`SendError::Permanent`], except that a send whose every recipient failed with a network
//!   failure is [`SendError::Transient`] and not delivered; `-3` and `-32603` (I/O and
//!   internal errors) → transient, maybe delivered; other codes → permanent. HTTP and network
//!   failures → transient.

#[cfg(feature = "fake")]
pub mod fake;

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine as _;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::http;
use crate::text::check_sendable;
use crate::{
    Attachment, BotInfo, BoxFuture, Button, ButtonPress, ChannelError, ChatKind, ChatRef,
    ConfigError, Event, Inbound, Limits, Message, OutMessage, Platform, Polled, SendError, Sender,
    Sent, WebhookParsed, WebhookRequest,
};

/// The data prefix of a reaction mapped to a button press (`react:👍`); WhatsApp's reactions
/// use the same.
pub const REACTION_PREFIX: &str = "react:";
/// Longest text sent in one message, in UTF-16 code units (see the module docs).
pub const MAX_TEXT: usize = 2000;
/// Envelopes buffered before the stream reader waits for `poll` to acknowledge some.
pub const MAX_BUFFERED: usize = 1000;
/// Events one `poll` returns at most.
const MAX_BATCH: usize = 100;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// signal-cli sends a keep-alive every 15 s: a stream silent this long is dead.
const STREAM_IDLE: Duration = Duration::from_secs(60);
/// Largest JSON-RPC answer read (attachments have their own bound).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// Largest server-sent event (one envelope).
const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;
/// The wait after a rate limit without `retryAfterSeconds`.
const DEFAULT_RETRY_AFTER_SECS: u64 = 60;
/// Message authors remembered for quotes.
const MAX_AUTHORS: usize = 4096;

/// What a reaction press means for an approval: `Some(true)` for 👍, `Some(false)` for 👎
/// (in any skin tone, with or without the emoji presentation selector), `None` for anything
/// else (including data that is not a reaction).
pub fn reaction_verdict(data: &str) -> Option<bool> {
    let emoji: String = data
        .strip_prefix(REACTION_PREFIX)?
        .chars()
        .filter(|c| !matches!(c, '\u{FE0F}' | '\u{1F3FB}'..='\u{1F3FF}'))
        .collect();
    match emoji.as_str() {
        "\u{1F44D}" => Some(true),
        "\u{1F44E}" => Some(false),
        _ => None,
    }
}

/// One Signal channel's settings.
#[derive(Debug, Clone)]
pub struct SignalConfig {
    /// The daemon's HTTP root (`http://127.0.0.1:8080`): loopback or private only.
    pub api_base: Url,
    /// The bot's number, as registered in signal-cli (`+15550001111`).
    pub account: String,
    /// How long `poll` waits for an envelope.
    pub poll_timeout_secs: u32,
}

impl SignalConfig {
    /// `account` on the daemon at `api_base`, polls of 30 s.
    pub fn new(api_base: Url, account: impl Into<String>) -> Self {
        Self {
            api_base,
            account: account.into(),
            poll_timeout_secs: 30,
        }
    }
}

/// The state of the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Connecting,
    Connected,
    Down(String),
}

struct InboxState {
    next_seq: u64,
    /// Envelopes not acknowledged yet, with their sequence numbers, oldest first.
    buffered: VecDeque<(u64, Value)>,
    link: Link,
}

/// The buffer shared by the stream reader and `poll`.
struct Inbox {
    /// Distinguishes this process's cursors from an earlier one's.
    instance: String,
    state: Mutex<InboxState>,
    /// Bumped on every change (an envelope, an acknowledgement, the link).
    changed: watch::Sender<u64>,
}

impl Inbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn set_link(&self, link: Link) {
        let changed = {
            let mut st = self.lock();
            let changed = st.link != link;
            st.link = link;
            changed
        };
        if changed {
            self.bump();
        }
    }

    /// Buffers an envelope, waiting while the buffer is full.
    async fn push(&self, envelope: Value) {
        let mut rx = self.changed.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let mut st = self.lock();
                if st.buffered.len() < MAX_BUFFERED {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.buffered.push_back((seq, envelope));
                    break;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
        self.bump();
    }
}

/// Authors of recent messages by (chat, timestamp), for quotes.
#[derive(Default)]
struct Authors {
    by_message: HashMap<(String, u64), String>,
    order: VecDeque<(String, u64)>,
}

impl Authors {
    fn remember(&mut self, chat: &str, timestamp: u64, author: &str) {
        let key = (chat.to_owned(), timestamp);
        if self
            .by_message
            .insert(key.clone(), author.to_owned())
            .is_none()
        {
            self.order.push_back(key);
            while self.order.len() > MAX_AUTHORS {
                if let Some(old) = self.order.pop_front() {
                    self.by_message.remove(&old);
                }
            }
        }
    }
}

/// The Signal adapter. Build it with [`Signal::new`].
pub struct Signal {
    /// The daemon's root without a trailing `/`.
    base: String,
    account: String,
    poll_timeout: Duration,
    http: reqwest::Client,
    next_id: AtomicU64,
    inbox: Arc<Inbox>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// The bot's ACI, learned by `connect` (mentions and quotes may name it instead of the
    /// number).
    own_uuid: RwLock<Option<String>>,
    authors: Mutex<Authors>,
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signal")
            .field("api_base", &self.base)
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

impl Drop for Signal {
    fn drop(&mut self) {
        if let Some(task) = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// Why a daemon call failed (internal; mapped to [`SendError`] or [`ChannelError`]).
type CallError = http::CallError<DaemonError>;

/// The daemon's error answer.
#[derive(Debug)]
enum DaemonError {
    /// An HTTP status other than 200.
    Http { status: u16, message: String },
    /// A JSON-RPC error object.
    Rpc {
        code: i64,
        message: String,
        data: Value,
    },
}

impl Signal {
    /// Checks the configuration and builds the HTTP client; sends nothing and starts nothing.
    pub fn new(cfg: SignalConfig) -> Result<Self, ConfigError> {
        check_api_base(&cfg.api_base)?;
        let account = &cfg.account;
        let digits = account.strip_prefix('+').unwrap_or_default();
        if !(6..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ConfigError::Invalid(format!(
                "`account` {account:?} is not a phone number in international form \
                 (+<country code><number>, as registered in signal-cli)"
            )));
        }
        let http = http::client(http::USER_AGENT)?;
        let instance = format!("{:016x}", RandomState::new().build_hasher().finish());
        let (changed, _) = watch::channel(0u64);
        Ok(Self {
            base: cfg.api_base.as_str().trim_end_matches('/').to_owned(),
            account: cfg.account,
            poll_timeout: Duration::from_secs(cfg.poll_timeout_secs.into()),
            http,
            next_id: AtomicU64::new(1),
            inbox: Arc::new(Inbox {
                instance,
                state: Mutex::new(InboxState {
                    next_seq: 1,
                    buffered: VecDeque::new(),
                    link: Link::Connecting,
                }),
                changed,
            }),
            reader: Mutex::new(None),
            own_uuid: RwLock::new(None),
            authors: Mutex::new(Authors::default()),
        })
    }

    /// Starts the event stream reader if it is not running.
    fn ensure_reader(&self) {
        let mut reader = self.reader.lock().unwrap_or_else(PoisonError::into_inner);
        if reader.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let mut url = format!("{}/api/v1/events", self.base);
        if let Ok(mut u) = Url::parse(&url) {
            u.query_pairs_mut().append_pair("account", &self.account);
            url = u.to_string();
        }
        *reader = Some(tokio::spawn(read_events(
            self.http.clone(),
            url,
            Arc::clone(&self.inbox),
        )));
    }

    fn own_uuid(&self) -> Option<String> {
        self.own_uuid
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The bot's own number or ACI.
    fn is_bot(&self, id: Option<&str>) -> bool {
        let Some(id) = id else { return false };
        id == self.account || self.own_uuid().is_some_and(|u| id.eq_ignore_ascii_case(&u))
    }

    /// One JSON-RPC call; its `result`. `max` bounds the answer's size.
    async fn rpc_limited(
        &self,
        method: &str,
        mut params: Map<String, Value>,
        timeout: Duration,
        max: usize,
    ) -> Result<Value, CallError> {
        params.insert("account".into(), self.account.clone().into());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": id });
        let url = format!("{}/api/v1/rpc", self.base);
        // The daemon has no credential: there is nothing to scrub.
        let mut resp = self
            .http
            .post(&url)
            .timeout(timeout)
            .json(&request)
            .send()
            .await
            .map_err(|e| CallError::network(method, e, true, &[]))?;
        let status = resp.status().as_u16();
        let body = http::read_answer(method, &mut resp, max, &[]).await?;
        if status != 200 {
            return Err(CallError::Api(DaemonError::Http {
                status,
                message: format!("{method}: {}", http_hint(status)),
            }));
        }
        let answer: Value = serde_json::from_slice(&body)
            .map_err(|_| CallError::BadAnswer(format!("{method}: the answer is not JSON-RPC")))?;
        if let Some(error) = answer.get("error").filter(|e| !e.is_null()) {
            return Err(CallError::Api(DaemonError::Rpc {
                code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: format!(
                    "{method}: {}",
                    error
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("an error without a message")
                ),
                data: error.get("data").cloned().unwrap_or(Value::Null),
            }));
        }
        if answer.get("id").and_then(Value::as_u64) != Some(id) {
            return Err(CallError::BadAnswer(format!(
                "{method}: the answer is for another request"
            )));
        }
        Ok(answer.get("result").cloned().unwrap_or(Value::Null))
    }

    async fn rpc(&self, method: &str, params: Map<String, Value>) -> Result<Value, CallError> {
        self.rpc_limited(method, params, REQUEST_TIMEOUT, MAX_ANSWER_BYTES)
            .await
    }

    fn remember_author(&self, chat: &str, timestamp: u64, author: &str) {
        self.authors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remember(chat, timestamp, author);
    }

    /// The author to quote for a reply to `timestamp` in `chat` (see the module docs).
    fn quote_author(&self, chat: &ChatRef, timestamp: u64) -> Option<String> {
        let known = self
            .authors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_message
            .get(&(chat.id.clone(), timestamp))
            .cloned();
        match (known, chat.kind) {
            (Some(a), _) => Some(a),
            (None, ChatKind::Dm) => Some(chat.id.clone()),
            (None, ChatKind::Group) => None,
        }
    }

    async fn send_inner(&self, msg: &OutMessage) -> Result<Sent, SendError> {
        check_text(&msg.text)?;
        let mut params = target(&msg.chat)?;
        params.insert("message".into(), msg.text.clone().into());
        if let Some(ts) = msg.reply_to.as_deref().and_then(|r| r.parse::<u64>().ok())
            && let Some(author) = self.quote_author(&msg.chat, ts)
        {
            params.insert("quoteTimestamp".into(), ts.into());
            params.insert("quoteAuthor".into(), author.into());
        }
        let result = self.rpc("send", params).await.map_err(send_error)?;
        let Some(ts) = result.get("timestamp").and_then(Value::as_u64) else {
            return Err(SendError::Transient {
                message: "send: the answer has no timestamp".into(),
                maybe_delivered: true,
            });
        };
        self.remember_author(&msg.chat.id, ts, &self.account);
        Ok(Sent {
            message_id: ts.to_string(),
        })
    }

    async fn edit_inner(&self, chat: &ChatRef, id: &str, text: &str) -> Result<(), SendError> {
        check_text(text)?;
        let ts = id
            .parse::<u64>()
            .map_err(|_| SendError::Permanent(format!("{id:?} is not a Signal message id")))?;
        let mut params = target(chat)?;
        params.insert("message".into(), text.into());
        params.insert("editTimestamp".into(), ts.into());
        self.rpc("send", params).await.map(drop).map_err(send_error)
    }

    async fn fetch_inner(&self, a: &Attachment, max_bytes: u64) -> Result<Vec<u8>, ChannelError> {
        let too_large = || ChannelError::TooLarge { max_bytes };
        http::check_size(a.size, max_bytes)?;
        let mut parts = a.file_ref.splitn(3, '|');
        let (Some(id), Some(kind), Some(chat)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(ChannelError::Protocol(
                "the attachment reference is not a Signal attachment".into(),
            ));
        };
        let id_ok = !id.is_empty()
            && id.len() <= 256
            && !id.starts_with('.')
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(ChannelError::Protocol(
                "the attachment reference is not a Signal attachment id".into(),
            ));
        }
        let mut params = Map::new();
        params.insert("id".into(), id.into());
        match kind {
            "group" => params.insert("groupId".into(), chat.into()),
            _ => params.insert("recipient".into(), chat.into()),
        };
        // Base64 is 4/3 of the bytes, plus the JSON around it.
        let max = usize::try_from(max_bytes)
            .unwrap_or(usize::MAX)
            .saturating_mul(4)
            / 3
            + 4096;
        let result = match self
            .rpc_limited("getAttachment", params, REQUEST_TIMEOUT * 4, max)
            .await
        {
            Ok(r) => r,
            Err(CallError::BadAnswer(m)) if m.contains("larger than") => return Err(too_large()),
            Err(e) => return Err(channel_error(e)),
        };
        let Some(data) = result.get("data").and_then(Value::as_str) else {
            return Err(ChannelError::Protocol(
                "getAttachment: the answer has no data".into(),
            ));
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|_| ChannelError::Protocol("getAttachment: the data is not base64".into()))?;
        http::check_size(
            Some(u64::try_from(bytes.len()).unwrap_or(u64::MAX)),
            max_bytes,
        )?;
        Ok(bytes)
    }

    /// Maps one streamed notification to an event.
    fn map_notification(&self, raw: &Value) -> Inbound {
        // The stream's data is `{"account","envelope"[,"exception"]}`; the JSON-RPC framing of
        // the socket interface (`{"method":"receive","params":{...}}`, with `result` inside
        // for a subscription) is accepted too.
        let mut obj = raw;
        if let Some(p) = obj.get("params") {
            obj = p;
            if let Some(r) = obj.get("result") {
                obj = r;
            }
        }
        let fallback_id = || {
            let digest = Sha256::digest(raw.to_string().as_bytes());
            let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
            format!("s:raw:{hex}")
        };
        let ignored = |event_id: String, what: &str| Inbound {
            event_id,
            event: Event::Ignored { what: what.into() },
        };
        if obj
            .get("account")
            .and_then(Value::as_str)
            .is_some_and(|a| a != self.account)
        {
            return ignored(fallback_id(), "an envelope for another account");
        }
        let Some(env) = obj
            .get("envelope")
            .and_then(|e| Envelope::deserialize(e).ok())
        else {
            return ignored(fallback_id(), "a notification this adapter cannot read");
        };
        let sender = env
            .source_uuid
            .clone()
            .or_else(|| env.source_number.clone())
            .or_else(|| env.source.clone())
            .filter(|s| !s.is_empty());
        let (Some(sender_id), Some(ts)) = (sender, env.timestamp) else {
            return ignored(fallback_id(), "an envelope without a sender or timestamp");
        };
        let id = format!("s:{sender_id}:{ts}");
        let id_of = |kind: &str| format!("{id}:{kind}");
        let from_bot = self.is_bot(Some(&sender_id))
            || self.is_bot(env.source_number.as_deref())
            || self.is_bot(env.source.as_deref());
        if from_bot {
            return ignored(id_of("own"), "a message from the bot's own account");
        }
        let sender = Sender {
            display: env
                .source_name
                .clone()
                .filter(|n| !n.trim().is_empty())
                .or_else(|| env.source_number.clone())
                .unwrap_or_else(|| sender_id.clone()),
            id: sender_id.clone(),
            is_bot: false,
        };
        if let Some(data) = env.data_message {
            let event = self.map_data(data, ts, sender);
            return Inbound {
                event_id: id,
                event,
            };
        }
        if let Some(edit) = env.edit_message {
            let event = match (edit.target_sent_timestamp, edit.data_message) {
                (Some(target), Some(data)) => match self.map_text(data, target, sender) {
                    Ok(m) => Event::Edited(m),
                    Err(what) => Event::Ignored { what },
                },
                _ => Event::Ignored {
                    what: "an edit without its message".into(),
                },
            };
            return Inbound {
                event_id: id_of("edit"),
                event,
            };
        }
        let (kind, what) = if env.typing_message.is_some() {
            ("typing", "typing")
        } else if env.receipt_message.is_some() {
            ("receipt", "a receipt")
        } else if env.sync_message.is_some() {
            (
                "sync",
                "a sync message from another device of the bot's account",
            )
        } else if env.call_message.is_some() {
            ("call", "a call")
        } else if env.story_message.is_some() {
            ("story", "a story")
        } else if obj.get("exception").is_some() {
            ("error", "an envelope signal-cli could not decrypt or read")
        } else {
            ("other", "an envelope without content")
        };
        ignored(id_of(kind), what)
    }

    /// A data message: a reaction press, a message, or ignored.
    fn map_data(&self, data: DataMessage, ts: u64, sender: Sender) -> Event {
        if let Some(r) = data.reaction {
            let chat = chat_of(data.group_info.as_ref(), &sender);
            let Some(chat) = chat else {
                return Event::Ignored {
                    what: "a group update".into(),
                };
            };
            let on_bot = self.is_bot(r.target_author_uuid.as_deref())
                || self.is_bot(r.target_author_number.as_deref())
                || self.is_bot(r.target_author.as_deref());
            return match (r.is_remove, on_bot, r.emoji, r.target_sent_timestamp) {
                (true, _, _, _) => Event::Ignored {
                    what: "a reaction removed".into(),
                },
                (false, false, _, _) => Event::Ignored {
                    what: "a reaction to another member's message".into(),
                },
                (false, true, Some(emoji), Some(target)) if !emoji.is_empty() => {
                    Event::Button(ButtonPress {
                        callback_id: format!("s:{}:{ts}", sender.id),
                        chat,
                        message_id: target.to_string(),
                        sender,
                        data: format!("{REACTION_PREFIX}{emoji}"),
                    })
                }
                _ => Event::Ignored {
                    what: "a reaction without its emoji or message".into(),
                },
            };
        }
        match self.map_text(data, ts, sender) {
            Ok(m) => {
                self.remember_author(&m.chat.id, ts, &m.sender.id);
                Event::Message(m)
            }
            Err(what) => Event::Ignored { what },
        }
    }

    /// The message of a data message (new or the new version of an edited one).
    fn map_text(
        &self,
        data: DataMessage,
        message_ts: u64,
        sender: Sender,
    ) -> Result<Message, String> {
        if data.is_expiration_update == Some(true) {
            return Err("a disappearing-messages timer change".into());
        }
        let Some(chat) = chat_of(data.group_info.as_ref(), &sender) else {
            return Err("a group update".into());
        };
        let attachments: Vec<Attachment> = data
            .attachments
            .unwrap_or_default()
            .into_iter()
            .filter_map(|a| {
                let id = a.id?;
                let (kind, chat_id) = match chat.kind {
                    ChatKind::Group => ("group", chat.id.as_str()),
                    ChatKind::Dm => ("dm", sender.id.as_str()),
                };
                Some(Attachment {
                    file_ref: format!("{id}|{kind}|{chat_id}"),
                    name: a.filename,
                    mime: a.content_type,
                    size: a.size,
                })
            })
            .collect();
        let mentions = data.mentions.unwrap_or_default();
        let text = with_mentions(data.message.unwrap_or_default(), &mentions);
        if text.is_empty() && attachments.is_empty() {
            return Err(if data.remote_delete.is_some() {
                "a message deletion".into()
            } else if data.sticker.is_some() {
                "a sticker".into()
            } else {
                "a message without text or attachments".into()
            });
        }
        let quote_of_bot = data.quote.as_ref().is_some_and(|q| {
            self.is_bot(q.author_uuid.as_deref())
                || self.is_bot(q.author_number.as_deref())
                || self.is_bot(q.author.as_deref())
        });
        let mention_of_bot = mentions
            .iter()
            .any(|m| self.is_bot(m.uuid.as_deref()) || self.is_bot(m.number.as_deref()));
        let mentioned = chat.kind == ChatKind::Dm || quote_of_bot || mention_of_bot;
        Ok(Message {
            chat,
            message_id: message_ts.to_string(),
            sender,
            text,
            mentioned,
            reply_to: data.quote.and_then(|q| q.id).map(|id| id.to_string()),
            attachments,
        })
    }
}

impl Platform for Signal {
    fn kind(&self) -> &'static str {
        "signal"
    }

    /// Signal messages have no buttons: approvals are answered with `/approve CODE` or a 👍 /
    /// 👎 reaction on the prompt.
    fn has_buttons(&self) -> bool {
        false
    }

    /// [`MAX_TEXT`]; buttons are not sent, so their data is not limited by Signal.
    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: MAX_TEXT,
            max_button_data: 256,
        }
    }

    /// Checks that the daemon answers (`version`), learns the bot's ACI (`getUserStatus`, best
    /// effort) and starts the event stream.
    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async move {
            self.rpc("version", Map::new())
                .await
                .map_err(channel_error)?;
            let mut params = Map::new();
            params.insert("recipient".into(), json!([self.account]));
            if let Ok(status) = self.rpc("getUserStatus", params).await {
                let uuid = status
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|s| s.get("number").and_then(Value::as_str) == Some(&self.account))
                    .and_then(|s| s.get("uuid"))
                    .and_then(Value::as_str)
                    .filter(|u| !u.is_empty());
                if let Some(uuid) = uuid {
                    *self
                        .own_uuid
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Some(uuid.to_owned());
                }
            }
            self.ensure_reader();
            Ok(BotInfo {
                id: self.own_uuid().unwrap_or_else(|| self.account.clone()),
                username: self.account.clone(),
            })
        })
    }

    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(async move {
            self.ensure_reader();
            let inbox = &self.inbox;
            let acked = cursor
                .and_then(|c| c.split_once(':'))
                .filter(|(instance, _)| *instance == inbox.instance)
                .and_then(|(_, seq)| seq.parse::<u64>().ok());
            let mut rx = inbox.changed.subscribe();
            if let Some(upto) = acked {
                let dropped = {
                    let mut st = inbox.lock();
                    let before = st.buffered.len();
                    while st.buffered.front().is_some_and(|(seq, _)| *seq <= upto) {
                        st.buffered.pop_front();
                    }
                    before != st.buffered.len()
                };
                if dropped {
                    inbox.bump();
                }
            }
            let deadline = tokio::time::Instant::now() + self.poll_timeout;
            loop {
                rx.borrow_and_update();
                let batch: Vec<(u64, Value)> = {
                    let st = inbox.lock();
                    if st.buffered.is_empty() {
                        if let Link::Down(reason) = &st.link {
                            return Err(ChannelError::Transient(reason.clone()));
                        }
                        Vec::new()
                    } else {
                        st.buffered.iter().take(MAX_BATCH).cloned().collect()
                    }
                };
                if let Some((last, _)) = batch.last() {
                    let cursor = format!("{}:{last}", inbox.instance);
                    let events = batch
                        .iter()
                        .map(|(_, raw)| self.map_notification(raw))
                        .collect();
                    return Ok(Polled {
                        events,
                        cursor: Some(cursor),
                    });
                }
                if tokio::time::timeout_at(deadline, rx.changed())
                    .await
                    .is_err()
                {
                    return Ok(Polled {
                        events: Vec::new(),
                        cursor: None,
                    });
                }
            }
        })
    }

    /// Signal has no webhooks.
    fn webhook(&self, _req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError> {
        Err(ChannelError::NoSuchRoute)
    }

    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>> {
        Box::pin(self.send_inner(msg))
    }

    /// Sends the new text with `editTimestamp` (buttons do not exist on Signal).
    fn edit<'a>(
        &'a self,
        chat: &'a ChatRef,
        message_id: &'a str,
        text: &'a str,
        _buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(self.edit_inner(chat, message_id, text))
    }

    /// Nothing to answer on Signal (a reaction needs no acknowledgement).
    fn answer_button<'a>(
        &'a self,
        _callback_id: &'a str,
        _text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }

    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let params = target(chat)?;
            self.rpc("sendTyping", params)
                .await
                .map(drop)
                .map_err(send_error)
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

// ---- The event stream ----

/// Holds the event stream open for the adapter's lifetime (see the module docs).
async fn read_events(http: reqwest::Client, url: String, inbox: Arc<Inbox>) {
    let mut failures: u32 = 0;
    loop {
        match stream_once(&http, &url, &inbox).await {
            Ok(()) => {
                // The stream ended after data: reconnect at once.
                failures = 0;
                inbox.set_link(Link::Connecting);
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                inbox.set_link(Link::Down(reason));
                let backoff = Duration::from_millis(500)
                    .saturating_mul(1u32 << failures.saturating_sub(1).min(6))
                    .min(Duration::from_secs(30));
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// One connection of the stream: `Ok` when it ended after delivering data (or a keep-alive),
/// `Err(reason)` otherwise.
async fn stream_once(http: &reqwest::Client, url: &str, inbox: &Inbox) -> Result<(), String> {
    let what = "the signal-cli event stream";
    let mut resp = http
        .get(url)
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| http::failure_text(what, e, &[]))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(format!("{what}: {}", http_hint(status)));
    }
    inbox.set_link(Link::Connected);
    let mut parser = SseParser::default();
    let mut got_data = false;
    loop {
        let chunk = match tokio::time::timeout(STREAM_IDLE, resp.chunk()).await {
            Err(_) => {
                return Err(format!(
                    "{what}: nothing for {} s (not even a keep-alive)",
                    STREAM_IDLE.as_secs()
                ));
            }
            Ok(Err(e)) if got_data => {
                let _ = e;
                return Ok(());
            }
            Ok(Err(e)) => return Err(http::failure_text(what, e, &[])),
            Ok(Ok(None)) if got_data => return Ok(()),
            Ok(Ok(None)) => return Err(format!("{what}: the daemon closed the stream")),
            Ok(Ok(Some(c))) => c,
        };
        got_data = true;
        let events = parser.push(&chunk).map_err(|e| format!("{what}: {e}"))?;
        for (event, data) in events {
            if !matches!(event.as_deref(), None | Some("receive") | Some("message")) {
                continue;
            }
            if let Ok(value) = serde_json::from_str::<Value>(&data) {
                inbox.push(value).await;
            }
        }
    }
}

/// A server-sent events parser (the WHATWG format: `field:value` lines, events ended by an
/// empty line, `:` comments).
#[derive(Default)]
struct SseParser {
    line: Vec<u8>,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// Feeds bytes; the complete events (type, data) they end.
    fn push(&mut self, bytes: &[u8]) -> Result<Vec<(Option<String>, String)>, String> {
        let mut out = Vec::new();
        for &b in bytes {
            if b != b'\n' {
                self.line.push(b);
                if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
                    return Err(format!("an event is larger than {MAX_EVENT_BYTES} bytes"));
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() {
                if self.has_data {
                    out.push((self.event.take(), std::mem::take(&mut self.data)));
                }
                self.event = None;
                self.data.clear();
                self.has_data = false;
                continue;
            }
            let Ok(line) = String::from_utf8(line) else {
                continue;
            };
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_str(), ""),
            };
            match field {
                "data" => {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                    self.has_data = true;
                }
                "event" => self.event = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(out)
    }
}

// ---- Helpers ----

fn http_hint(status: u16) -> String {
    match status {
        404 => "HTTP 404: is `api_base` the root of a daemon started with `--http`?".into(),
        421 => "HTTP 421: the daemon accepts only the host name it listens on; use that \
                address in `api_base`"
            .into(),
        400 => "HTTP 400: the daemon does not know this account (multi-account mode)".into(),
        other => format!("HTTP {other}"),
    }
}

/// `recipient` or `groupId` for a conversation.
fn target(chat: &ChatRef) -> Result<Map<String, Value>, SendError> {
    let id = chat.id.as_str();
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=_-.:".contains(&b));
    if !ok {
        return Err(SendError::Permanent(format!(
            "{id:?} is not a Signal recipient or group id"
        )));
    }
    let mut params = Map::new();
    match chat.kind {
        ChatKind::Dm => params.insert("recipient".into(), json!([id])),
        ChatKind::Group => params.insert("groupId".into(), id.into()),
    };
    Ok(params)
}

fn chat_of(group: Option<&GroupInfo>, sender: &Sender) -> Option<ChatRef> {
    match group {
        Some(g) => {
            if g.kind.as_deref() == Some("UPDATE") {
                return None;
            }
            Some(ChatRef {
                id: g.group_id.clone()?,
                kind: ChatKind::Group,
                thread: None,
            })
        }
        None => Some(ChatRef {
            id: sender.id.clone(),
            kind: ChatKind::Dm,
            thread: None,
        }),
    }
}

/// Replaces each mention's placeholder (its UTF-16 range) with `@<number or ACI>`; the text
/// unchanged if a range does not fit it.
fn with_mentions(text: String, mentions: &[Mention]) -> String {
    if mentions.is_empty() {
        return text;
    }
    // Byte offset of each UTF-16 offset that falls on a character boundary.
    let mut offsets = HashMap::new();
    let mut units = 0usize;
    for (i, c) in text.char_indices() {
        offsets.insert(units, i);
        units += c.len_utf16();
    }
    offsets.insert(units, text.len());
    let mut ranges: Vec<(usize, usize, String)> = Vec::new();
    for m in mentions {
        let (Some(start), Some(len)) = (m.start, m.length) else {
            return text;
        };
        let (Some(&from), Some(&to)) = (offsets.get(&start), offsets.get(&(start + len))) else {
            return text;
        };
        let who = m
            .number
            .clone()
            .or_else(|| m.uuid.clone())
            .or_else(|| m.name.clone())
            .unwrap_or_default();
        ranges.push((from, to, format!("@{who}")));
    }
    ranges.sort_by_key(|r| std::cmp::Reverse(r.0));
    let mut out = text;
    let mut limit = out.len();
    for (from, to, who) in ranges {
        if to > limit || from > to {
            continue;
        }
        out.replace_range(from..to, &who);
        limit = from;
    }
    out
}

/// A text signal-cli would refuse (or Chitin should not send), refused without a request.
fn check_text(text: &str) -> Result<(), SendError> {
    check_sendable(text, MAX_TEXT, Some("Signal"), "this adapter's")
}

/// The per-recipient results signal-cli attaches to a failed send.
fn result_types(data: &Value) -> Vec<(String, Option<u64>)> {
    data.get("response")
        .and_then(|r| r.get("results"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                r.get("retryAfterSeconds").and_then(Value::as_u64),
            )
        })
        .collect()
}

fn retry_after(data: &Value) -> Duration {
    let secs = result_types(data)
        .iter()
        .filter_map(|(_, r)| *r)
        .max()
        .unwrap_or(DEFAULT_RETRY_AFTER_SECS);
    Duration::from_secs(secs.max(1))
}

fn send_error(e: CallError) -> SendError {
    e.into_send_error(|daemon| match daemon {
        DaemonError::Http { status, message } => {
            if status >= 500 {
                SendError::Transient {
                    message,
                    maybe_delivered: true,
                }
            } else {
                SendError::Permanent(message)
            }
        }
        DaemonError::Rpc {
            code,
            message,
            data,
        } => match code {
            -5 => SendError::RateLimited {
                retry_after: retry_after(&data),
            },
            -4 => SendError::Permanent(format!(
                "{message}: a recipient's safety number changed; verify it and trust the new \
                 key (`signal-cli -a <account> trust ...`)"
            )),
            -1 => {
                let types = result_types(&data);
                let all = |t: &str| !types.is_empty() && types.iter().all(|(k, _)| k == t);
                if all("NETWORK_FAILURE") {
                    SendError::Transient {
                        message,
                        maybe_delivered: false,
                    }
                } else if types.iter().any(|(k, _)| k == "RATE_LIMIT_FAILURE") {
                    SendError::RateLimited {
                        retry_after: retry_after(&data),
                    }
                } else if all("UNREGISTERED_FAILURE") {
                    SendError::Permanent(format!("{message}: the recipient is not on Signal"))
                } else {
                    SendError::Permanent(message)
                }
            }
            -3 | -32603 => SendError::Transient {
                message,
                maybe_delivered: true,
            },
            -32601 => SendError::Permanent(format!(
                "{message}: this signal-cli does not have the method; upgrade it"
            )),
            _ => SendError::Permanent(message),
        },
    })
}

fn channel_error(e: CallError) -> ChannelError {
    e.into_channel_error(|daemon| match daemon {
        DaemonError::Http { status, message } if status >= 500 => ChannelError::Transient(message),
        DaemonError::Http { message, .. } => ChannelError::Protocol(message),
        DaemonError::Rpc { code: -5, data, .. } => ChannelError::RateLimited {
            retry_after: retry_after(&data),
        },
        DaemonError::Rpc {
            code: -3 | -32603,
            message,
            ..
        } => ChannelError::Transient(message),
        DaemonError::Rpc {
            code: -32602,
            message,
            ..
        } if message.contains("account") => ChannelError::Unauthorized(format!(
            "{message}: the daemon does not have this account; register or link it in \
             signal-cli"
        )),
        DaemonError::Rpc { message, .. } => ChannelError::Protocol(message),
    })
}

fn check_api_base(url: &Url) -> Result<(), ConfigError> {
    http::check_root_parts(url, "api_base")?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::Invalid(format!(
            "`api_base` has the scheme {:?}: use http (on this host) or https",
            url.scheme()
        )));
    }
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let private = match http::host_ip(&host) {
        Some(IpAddr::V4(ip)) => ip.is_loopback() || ip.is_private(),
        Some(IpAddr::V6(ip)) => ip.is_loopback() || ip.is_unique_local(),
        None => {
            host == "localhost"
                || (!host.is_empty() && !host.contains('.'))
                || [".internal", ".local", ".lan", ".home.arpa"]
                    .iter()
                    .any(|s| host.ends_with(s))
        }
    };
    if private {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "`api_base` {url} is not on this host or a private network: the signal-cli daemon \
             has no authentication, so anyone who reaches it reads and sends as the bot; run \
             it on 127.0.0.1 (or a private address) and point `api_base` there"
        )))
    }
}

// ---- The envelope wire format (only the fields used) ----

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    source: Option<String>,
    source_number: Option<String>,
    source_uuid: Option<String>,
    source_name: Option<String>,
    timestamp: Option<u64>,
    data_message: Option<DataMessage>,
    edit_message: Option<EditMessage>,
    sync_message: Option<Value>,
    typing_message: Option<Value>,
    receipt_message: Option<Value>,
    call_message: Option<Value>,
    story_message: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DataMessage {
    message: Option<String>,
    mentions: Option<Vec<Mention>>,
    attachments: Option<Vec<SigAttachment>>,
    quote: Option<Quote>,
    reaction: Option<Reaction>,
    group_info: Option<GroupInfo>,
    remote_delete: Option<Value>,
    sticker: Option<Value>,
    is_expiration_update: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EditMessage {
    target_sent_timestamp: Option<u64>,
    data_message: Option<DataMessage>,
}

#[derive(Deserialize)]
struct Mention {
    name: Option<String>,
    number: Option<String>,
    uuid: Option<String>,
    start: Option<usize>,
    length: Option<usize>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Quote {
    id: Option<u64>,
    author: Option<String>,
    author_number: Option<String>,
    author_uuid: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reaction {
    emoji: Option<String>,
    target_author: Option<String>,
    target_author_number: Option<String>,
    target_author_uuid: Option<String>,
    target_sent_timestamp: Option<u64>,
    #[serde(default)]
    is_remove: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupInfo {
    group_id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SigAttachment {
    content_type: Option<String>,
    filename: Option<String>,
    id: Option<String>,
    size: Option<u64>,
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

    fn base(url: &str) -> Result<Signal, ConfigError> {
        Signal::new(SignalConfig::new(Url::parse(url).unwrap(), "+15550001111"))
    }

    #[test]
    fn api_base_must_be_on_this_host_or_a_private_network() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://[::1]:8080/",
            "http://localhost:8080",
            "http://10.1.2.3:8080",
            "http://192.168.1.20:8080",
            "http://172.20.0.5:8080",
            "http://[fd00::5]:8080",
            "http://signal-cli:8080",
            "http://signal.internal:8080",
            "https://signal.home.arpa",
        ] {
            base(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "http://203.0.113.5:8080",
            "https://signal.example.org",
            "http://8.8.8.8",
            "ftp://127.0.0.1",
            "http://user:pw@127.0.0.1:8080",
        ] {
            assert!(base(bad).is_err(), "{bad}");
        }
        let err = base("https://signal.example.org").err().unwrap();
        assert!(err.to_string().contains("no authentication"), "{err}");
    }

    #[test]
    fn the_account_must_be_an_international_number() {
        for bad in ["15550001111", "+1 555 0001111", "+12", "bot"] {
            let r = Signal::new(SignalConfig::new(
                Url::parse("http://127.0.0.1:8080").unwrap(),
                bad,
            ));
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn reactions_read_as_approve_or_deny_in_any_skin_tone() {
        assert_eq!(reaction_verdict("react:👍"), Some(true));
        assert_eq!(reaction_verdict("react:👍🏽"), Some(true));
        assert_eq!(reaction_verdict("react:👎🏿"), Some(false));
        assert_eq!(reaction_verdict("react:👎\u{FE0F}"), Some(false));
        assert_eq!(reaction_verdict("react:❤️"), None);
        assert_eq!(reaction_verdict("react:👍👎"), None);
        assert_eq!(reaction_verdict("a:01J9"), None);
        assert_eq!(reaction_verdict("👍"), None);
    }

    #[test]
    fn the_event_stream_parser_follows_the_sse_format_across_chunk_boundaries() {
        let mut p = SseParser::default();
        let mut events = Vec::new();
        let stream = ":\n\nevent:receive\ndata:{\"a\":1}\n\nevent: receive\r\ndata: {\"b\":\r\ndata: 2}\r\n\r\ndata\n\n:keep-alive\n";
        for chunk in stream.as_bytes().chunks(3) {
            events.extend(p.push(chunk).unwrap());
        }
        assert_eq!(
            events,
            [
                (Some("receive".into()), "{\"a\":1}".into()),
                (Some("receive".into()), "{\"b\":\n2}".into()),
                (None, String::new()),
            ]
        );
        // An event that never ends is refused past the limit.
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big).is_err());
    }

    #[test]
    fn mention_placeholders_become_the_mentioned_account() {
        let m = |start, length, number: &str| Mention {
            name: None,
            number: Some(number.into()),
            uuid: None,
            start: Some(start),
            length: Some(length),
        };
        // "😀" is 2 UTF-16 units: the placeholder after it starts at 3.
        let text = "😀 \u{FFFC} and \u{FFFC}!".to_string();
        assert_eq!(
            with_mentions(text, &[m(3, 1, "+1555"), m(9, 1, "+1666")]),
            "😀 @+1555 and @+1666!"
        );
        // A range that does not fit leaves the text alone (no panic).
        assert_eq!(with_mentions("hi".into(), &[m(1, 9, "+1")]), "hi");
    }
}
