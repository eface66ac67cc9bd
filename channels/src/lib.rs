//! Chat platform adapters for Chitin, and the small contract every one of them implements.
//!
//! This crate knows chat platforms and nothing of the gateway: no policy, no storage, no agent.
//! An adapter turns a platform's wire protocol into [`Inbound`] events and sends what the
//! gateway's channel engine asks it to send. Everything else (admission by Cedar, pairing,
//! durable ingress and outbox, sessions, approvals) is the engine's, so adding a platform never
//! touches the engine.
//!
//! Delivery contract (what the engine relies on):
//! - [`Platform::poll`] returns the events after a resume point (`cursor`) and the cursor that
//!   follows them. Nothing is acknowledged to the platform by `poll` itself: the engine commits
//!   the events and the new cursor in one transaction, and only the *next* `poll` with that
//!   cursor acknowledges them (Telegram: `getUpdates` with `offset`). A crash between the two
//!   redelivers the events; their [`Inbound::event_id`] is unique per channel, so the engine
//!   drops the duplicates.
//! - [`Platform::webhook`] checks a webhook request's signature or secret (constant time) and
//!   parses its events without acknowledging anything; the engine commits them and only then
//!   answers 200 (with the adapter's [`WebhookParsed::reply`] body, if any: a Slack
//!   `url_verification` challenge, a WhatsApp `hub.challenge`). The gateway serves
//!   `GET`/`POST /channels/<name>/<route>` and hands every such request to the channel's
//!   adapter, which answers [`ChannelError::NoSuchRoute`] for routes it does not have.
//! - [`Platform::send`] returns the platform's message id on success, or a [`SendError`] that
//!   says whether to retry (and after how long) or give up.
//! - Credentials are handed to an adapter already released by the gateway (Cedar `secret.use`
//!   for `Chitin::Channel::"<name>"`); adapters keep them zeroized and out of every error,
//!   log line and `Debug` output.
#![forbid(unsafe_code)]

pub mod discord;
#[cfg(feature = "fake")]
mod fake_http;
mod http;
pub mod matrix;
pub mod signal;
pub mod slack;
pub mod telegram;
pub mod text;
pub mod whatsapp;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A future an adapter returns (adapters are used as `dyn Platform`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Direct message or group conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ChatKind {
    Dm,
    Group,
}

impl ChatKind {
    /// `dm` or `group` (the Cedar `Conversation` entity's `kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dm => "dm",
            Self::Group => "group",
        }
    }
}

/// A conversation on the platform, and the thread inside it (Telegram forum topic), if any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChatRef {
    /// The platform's chat id, as text.
    pub id: String,
    pub kind: ChatKind,
    /// A separate thread of the chat (a separate session), e.g. a forum topic id.
    pub thread: Option<String>,
}

/// Who sent an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    /// The platform's user id, as text (the Cedar `Identity` is `<kind>:<id>`).
    pub id: String,
    /// A display name (untrusted text: shown escaped, never used to decide anything).
    pub display: String,
    pub is_bot: bool,
}

/// A file attached to a message (fetched by the engine only when the message is admitted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The platform's file reference (Telegram `file_id`).
    pub file_ref: String,
    /// The file name the sender gave, if any (untrusted).
    pub name: Option<String>,
    pub mime: Option<String>,
    pub size: Option<u64>,
}

/// A text message (or a media message's caption).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub chat: ChatRef,
    /// The platform's message id, as text.
    pub message_id: String,
    pub sender: Sender,
    /// The text, or the caption of a media message; empty when there is none.
    pub text: String,
    /// The bot was addressed: mentioned by its username, a reply to one of its messages, or a
    /// command addressed to it (`/cmd@botname`, or any command in a DM).
    pub mentioned: bool,
    /// The id of the message this one replies to, if any.
    pub reply_to: Option<String>,
    pub attachments: Vec<Attachment>,
}

/// A button of a message the bot sent was pressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ButtonPress {
    /// What to answer (Telegram `callback_query.id`).
    pub callback_id: String,
    pub chat: ChatRef,
    /// The bot's message that carries the button.
    pub message_id: String,
    pub sender: Sender,
    /// The button's data, as the engine set it (untrusted: anyone can send any data).
    pub data: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    /// An edit of an earlier message: not a new turn (the engine records and ignores it).
    Edited(Message),
    Button(ButtonPress),
    /// The bot was invited into a conversation (a Matrix room invite): the engine decides
    /// the inviter (Cedar `message.receive`) and joins ([`Platform::join`]) only when
    /// admitted.
    Invited {
        chat: ChatRef,
        sender: Sender,
    },
    /// The platform reports what became of a message the bot sent (WhatsApp status
    /// callbacks): the engine records it on the outbox row with that platform message id.
    Status(DeliveryReport),
    /// An update of a kind Chitin does not handle; acknowledged and ignored.
    Ignored {
        what: String,
    },
}

/// What became of a message the bot sent, as the platform reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// The platform's id of the bot's message ([`Sent::message_id`]).
    pub message_id: String,
    pub state: DeliveryState,
}

/// A sent message's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Accepted by the platform's servers.
    Sent,
    /// On the recipient's device.
    Delivered,
    Read,
    /// The platform gave up on it (e.g. outside WhatsApp's 24-hour window), and why.
    Failed(String),
}

/// One inbound event with its channel-unique id (the deduplication key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// Unique per channel and stable across redeliveries (Telegram: `u:<update_id>`).
    pub event_id: String,
    pub event: Event,
}

/// What one poll returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Polled {
    pub events: Vec<Inbound>,
    /// The resume point after these events; the engine stores it with them and passes it to
    /// the next poll (which acknowledges them to the platform). `None`: unchanged.
    pub cursor: Option<String>,
}

/// A button under a message the bot sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Button {
    pub label: String,
    /// Returned in [`ButtonPress::data`] (at most [`Limits::max_button_data`] bytes).
    pub data: String,
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub chat: ChatRef,
    /// Plain text: adapters send it so that no markup in it is interpreted.
    pub text: String,
    /// Reply to this message id, if any.
    pub reply_to: Option<String>,
    /// One row of buttons (approvals: Approve / Deny).
    pub buttons: Vec<Button>,
    /// Unique per outbox row and the same on every retry of it: a platform that deduplicates
    /// sends by a client key (Matrix `txnId`, Discord `nonce`) gets this one, so a retried
    /// send cannot post twice.
    pub delivery_id: String,
}

/// A message the platform accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub message_id: String,
}

/// The bot's own account on the platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BotInfo {
    pub id: String,
    /// The name users mention (`@name` on Telegram), without the `@`.
    pub username: String,
}

/// The platform's limits the engine must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest text of one message, in UTF-16 code units (Telegram: 4096; an emoji such as
    /// 😀 counts 2). Measure and split with [`text::utf16_len`] and [`text::split`].
    pub max_text_chars: usize,
    /// Longest button data, in bytes (Telegram: 64).
    pub max_button_data: usize,
}

/// Why a send failed, and what the engine should do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The platform asked to wait (HTTP 429 with `retry_after`): retry after that long.
    #[error("rate limited by the platform: retry after {} s", .retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// Network error, timeout or 5xx: retry with backoff. The send may or may not have reached
    /// the platform (`maybe_delivered`): true when the request was sent and no answer came.
    #[error("temporary failure: {message}")]
    Transient {
        message: String,
        maybe_delivered: bool,
    },
    /// The platform refused the request (4xx other than 429): retrying cannot help.
    #[error("refused by the platform: {0}")]
    Permanent(String),
}

/// Errors receiving events or setting up an adapter. Messages never contain a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The platform refused our credentials (401/403/404 on the API root).
    #[error(
        "the platform refused the bot's credentials: {0}; check the token (`chitin secrets set`) and `api_base`"
    )]
    Unauthorized(String),
    #[error("rate limited by the platform: retry after {} s", .retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// Network error, timeout or 5xx: poll again after a pause.
    #[error("temporary failure talking to the platform: {0}")]
    Transient(String),
    /// The platform sent something this adapter cannot read.
    #[error("unexpected answer from the platform: {0}")]
    Protocol(String),
    /// A webhook request without the right secret (answer 401, audit it).
    #[error("webhook request refused: {0}")]
    WebhookRefused(String),
    /// A webhook body that is not a valid update (answer 400).
    #[error("invalid webhook body: {0}")]
    BadWebhook(String),
    /// A webhook route or method this adapter does not serve (answer 404).
    #[error("no such webhook route")]
    NoSuchRoute,
    /// An attachment larger than the limit (it is not fetched).
    #[error("the file is larger than the limit of {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },
    /// This platform cannot do that (e.g. fetch attachments).
    #[error("not supported by this platform: {0}")]
    Unsupported(&'static str),
}

/// A request to one of a channel's webhook routes, `<method> /channels/<name>/<route>`.
#[derive(Debug, Clone, Copy)]
pub struct WebhookRequest<'a> {
    /// `GET` or `POST`.
    pub method: &'a str,
    /// The last path segment: `webhook` (Telegram, WhatsApp), `events`, `interactivity`
    /// (Slack), ...
    pub route: &'a str,
    /// The raw query string, without the `?` (empty when there is none).
    pub query: &'a str,
    pub headers: &'a [(String, String)],
    /// The raw body (signatures are computed over these exact bytes).
    pub body: &'a [u8],
}

impl WebhookRequest<'_> {
    /// The values of the header `name` (case-insensitive).
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The header `name` when it is present exactly once.
    pub fn single_header<'s>(&'s self, name: &'s str) -> Option<&'s str> {
        let mut it = self.header_values(name);
        let first = it.next()?;
        it.next().is_none().then_some(first)
    }
}

/// What an adapter made of a webhook request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WebhookParsed {
    /// The events to commit (before the answer is sent).
    pub events: Vec<Inbound>,
    /// The body of the 200 answer, if the platform expects one (`None`: the gateway's usual
    /// `{"ok":true}`).
    pub reply: Option<WebhookBody>,
}

/// The body of a webhook answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookBody {
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// An adapter's configuration cannot work (found when it is built, before any request).
/// Messages never contain a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("channel configuration: {0}")]
    Invalid(String),
}

/// A chat platform. One value per configured channel; used as `Arc<dyn Platform>`.
pub trait Platform: Send + Sync + 'static {
    /// The platform's kind, as in `[[channels]] kind` (e.g. `telegram`).
    fn kind(&self) -> &'static str;
    /// The platform's limits.
    fn limits(&self) -> Limits;
    /// Checks the credentials and learns the bot's own account (Telegram `getMe`).
    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>>;
    /// Waits (long poll, bounded by the adapter's poll timeout) for events after `cursor`.
    fn poll<'a>(&'a self, cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>>;
    /// Checks a webhook request (its secret or signature, in constant time) and parses its
    /// events; acknowledges nothing (the gateway answers after committing them).
    fn webhook(&self, req: &WebhookRequest<'_>) -> Result<WebhookParsed, ChannelError>;
    /// Sends one message (its text at most [`Limits::max_text_chars`]).
    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>>;
    /// Replaces the text (and buttons: `None` removes them) of a message the bot sent.
    fn edit<'a>(
        &'a self,
        chat: &'a ChatRef,
        message_id: &'a str,
        text: &'a str,
        buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>>;
    /// Answers a button press (the platform stops showing it as pending).
    fn answer_button<'a>(
        &'a self,
        callback_id: &'a str,
        text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>>;
    /// Shows "typing…" in the chat for a few seconds.
    fn typing<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>>;
    /// Drops what the adapter keeps open between polls (a Discord gateway session, a Slack
    /// Socket Mode socket) and the events it read but no poll returned: the channel moved to
    /// another process, which reads them from the platform again (nothing was acknowledged).
    /// A later [`Platform::poll`] connects again from the cursor it is given. Long-polling
    /// adapters keep nothing open: a dropped poll is the whole connection.
    fn disconnect(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Whether messages can carry buttons ([`OutMessage::buttons`]); without them, people
    /// answer approval prompts with `/approve CODE` and `/deny CODE`.
    fn has_buttons(&self) -> bool {
        true
    }
    /// Accepts an invitation into `chat` (see [`Event::Invited`]).
    fn join<'a>(&'a self, chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        let _ = chat;
        Box::pin(async {
            Err(SendError::Permanent(
                "this platform has no invitations".into(),
            ))
        })
    }
    /// True when the platform deduplicates a retried send by [`OutMessage::delivery_id`]
    /// (Matrix `txnId`): the engine may then resend a message whose send was interrupted
    /// (crash, timeout) instead of marking it "may have been delivered".
    fn sends_are_idempotent(&self) -> bool {
        false
    }
    /// Downloads an attachment of an admitted message, refusing (without reading it all) one
    /// larger than `max_bytes`.
    fn fetch_attachment<'a>(
        &'a self,
        attachment: &'a Attachment,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, ChannelError>> {
        let _ = (attachment, max_bytes);
        Box::pin(async { Err(ChannelError::Unsupported("fetching attachments")) })
    }
}
