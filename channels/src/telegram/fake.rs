//! A fake Telegram Bot API server on 127.0.0.1 for tests, speaking the real wire format
//! (`POST /bot<token>/<method>` with a JSON body, answers `{"ok":true,"result":…}` or
//! `{"ok":false,"error_code":…,"description":…,"parameters":…}`).
//!
//! The test drives it: it pushes updates into a queue ([`FakeTelegram::push_message`] and
//! friends, with builders for private, group and forum-topic messages, mentions, replies,
//! media, edits and button presses), reads what the bot did ([`FakeTelegram::sent`],
//! [`FakeTelegram::edits`], [`FakeTelegram::answers`], [`FakeTelegram::calls`]) and scripts
//! failures of the next calls of a method ([`FakeTelegram::fail_next`]).
//!
//! Behaviour that matches the real API:
//! - a wrong token is `401 Unauthorized`, an unknown method `404 Not Found`;
//! - `getUpdates` drops every update whose id is below `offset` (acknowledged) and returns
//!   the rest, oldest first; without `offset` it returns every unacknowledged update again;
//!   with a `timeout` it waits until an update is pushed (it answers at once when one is, so
//!   tests never wait the timeout out); it answers 409 while a webhook is set, and a
//!   `getUpdates` still waiting when another one arrives ends with 409 "Conflict: terminated
//!   by other getUpdates request" (two bot instances polling: [`FakeTelegram::conflicts`]);
//! - `sendMessage` needs a chat the fake has seen (a pushed message, or [`FakeTelegram::add_chat`]),
//!   refuses empty and over-long (4096 UTF-16 units) texts and button data over 64 bytes,
//!   assigns increasing message ids and keeps the message so it can be edited, replied to and
//!   carry buttons;
//! - `editMessageText` of an unknown message is "message to edit not found"; with the same
//!   text and buttons it is "message is not modified";
//! - `answerCallbackQuery` accepts each pushed button press's id once.
//!
//! - `getFile` of a file the test stored ([`FakeTelegram::put_file`]) answers its `file_path`
//!   and `file_size` (no `file_path` over 20 MB, as the real API), and
//!   `GET /file/bot<token>/<file_path>` serves its bytes; an unknown `file_id` is
//!   "wrong file_id or the file is temporarily unavailable".
//!
//! An API root with a path (`http://127.0.0.1:<port>/<label>`) is accepted: the label is
//! recorded with each call ([`Call::via`]), so a test tells apart the processes sharing one
//! bot (each configured with its own label).
//!
//! Not modelled: `allowed_updates` filtering, form-encoded or multipart bodies, uploads.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use reqwest::Url;
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::fake_http::{self, Answered, Reply, Script, Server, lock};
use crate::text::utf16_len;

/// The token [`FakeTelegram::start`] accepts.
pub const TOKEN: &str = "7000000001:AAFakeTokenForTestsOnly_0123456789ab";

/// A user (or the bot) as Telegram describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    pub id: i64,
    pub first_name: String,
    pub username: Option<String>,
    pub is_bot: bool,
}

impl FakeUser {
    pub fn new(id: i64, first_name: &str) -> Self {
        Self {
            id,
            first_name: first_name.into(),
            username: None,
            is_bot: false,
        }
    }

    pub fn with_username(mut self, username: &str) -> Self {
        self.username = Some(username.into());
        self
    }

    /// The default bot: `@chitin_test_bot`, id 7000000001.
    pub fn bot() -> Self {
        Self {
            id: 7_000_000_001,
            first_name: "Chitin".into(),
            username: Some("chitin_test_bot".into()),
            is_bot: true,
        }
    }

    pub fn json(&self) -> Value {
        let mut v = json!({ "id": self.id, "is_bot": self.is_bot, "first_name": self.first_name });
        if let Some(u) = &self.username {
            v["username"] = u.as_str().into();
        }
        v
    }
}

/// A chat's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatType {
    Private,
    Group,
    Supergroup,
    Channel,
}

/// A chat as Telegram describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeChat {
    pub id: i64,
    pub kind: ChatType,
    pub title: Option<String>,
    pub is_forum: bool,
}

impl FakeChat {
    /// The private chat with `user` (its id is the user's id, as on Telegram).
    pub fn private(user: &FakeUser) -> Self {
        Self {
            id: user.id,
            kind: ChatType::Private,
            title: None,
            is_forum: false,
        }
    }

    /// A basic group (ids of groups are negative).
    pub fn group(id: i64, title: &str) -> Self {
        Self {
            id,
            kind: ChatType::Group,
            title: Some(title.into()),
            is_forum: false,
        }
    }

    pub fn supergroup(id: i64, title: &str) -> Self {
        Self {
            kind: ChatType::Supergroup,
            ..Self::group(id, title)
        }
    }

    /// A supergroup with topics.
    pub fn forum(id: i64, title: &str) -> Self {
        Self {
            is_forum: true,
            ..Self::supergroup(id, title)
        }
    }

    pub fn channel(id: i64, title: &str) -> Self {
        Self {
            kind: ChatType::Channel,
            ..Self::group(id, title)
        }
    }

    pub fn json(&self) -> Value {
        let kind = match self.kind {
            ChatType::Private => "private",
            ChatType::Group => "group",
            ChatType::Supergroup => "supergroup",
            ChatType::Channel => "channel",
        };
        let mut v = json!({ "id": self.id, "type": kind });
        if let Some(t) = &self.title {
            v["title"] = t.as_str().into();
        }
        if self.is_forum {
            v["is_forum"] = true.into();
        }
        v
    }
}

/// A user's message to push (ids are assigned when it is pushed). Entities (`mention`,
/// `bot_command`) are derived from the text the way Telegram derives them.
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    chat: FakeChat,
    from: Option<FakeUser>,
    text: Option<String>,
    caption: Option<String>,
    reply_to: Option<Value>,
    topic: Option<i64>,
    extra: Map<String, Value>,
}

impl MessageBuilder {
    /// A text message from `from` in `chat`.
    pub fn text(chat: &FakeChat, from: &FakeUser, text: &str) -> Self {
        Self {
            chat: chat.clone(),
            from: Some(from.clone()),
            text: Some(text.into()),
            caption: None,
            reply_to: None,
            topic: None,
            extra: Map::new(),
        }
    }

    /// A photo (two sizes; the larger is `file_id`) with an optional caption.
    pub fn photo(chat: &FakeChat, from: &FakeUser, file_id: &str, caption: Option<&str>) -> Self {
        let mut b = Self::text(chat, from, "");
        b.text = None;
        b.caption = caption.map(String::from);
        b.extra.insert(
            "photo".into(),
            json!([
                { "file_id": format!("{file_id}-small"), "file_unique_id": "s", "width": 90, "height": 90, "file_size": 1000 },
                { "file_id": file_id, "file_unique_id": "l", "width": 1280, "height": 960, "file_size": 120_000 },
            ]),
        );
        b
    }

    /// A document with an optional caption.
    pub fn document(
        chat: &FakeChat,
        from: &FakeUser,
        file_id: &str,
        file_name: &str,
        mime: &str,
        size: u64,
        caption: Option<&str>,
    ) -> Self {
        let mut b = Self::text(chat, from, "");
        b.text = None;
        b.caption = caption.map(String::from);
        b.extra.insert(
            "document".into(),
            json!({ "file_id": file_id, "file_unique_id": "d", "file_name": file_name, "mime_type": mime, "file_size": size }),
        );
        b
    }

    /// A reply to `message` (a pushed message, or one the bot sent: [`FakeTelegram::sent`]'s
    /// `message`).
    pub fn reply_to(mut self, message: &Value) -> Self {
        self.reply_to = Some(message.clone());
        self
    }

    /// Posted in the forum topic `thread_id` (whose first message the bot created, as when
    /// the bot opened the topic).
    pub fn in_topic(mut self, thread_id: i64) -> Self {
        self.topic = Some(thread_id);
        self
    }

    /// Sent on behalf of a chat (an anonymous group admin, or a linked channel).
    pub fn on_behalf_of(mut self, chat: &FakeChat) -> Self {
        self.extra.insert("sender_chat".into(), chat.json());
        self
    }

    /// Without a `from` field.
    pub fn without_sender(mut self) -> Self {
        self.from = None;
        self
    }

    /// Any other field of the message.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    fn build(self, message_id: i64, bot: &FakeUser) -> Value {
        let mut m = Map::new();
        m.insert("message_id".into(), message_id.into());
        if let Some(from) = &self.from {
            m.insert("from".into(), from.json());
        }
        m.insert("chat".into(), self.chat.json());
        m.insert("date".into(), now().into());
        if let Some(t) = &self.text {
            m.insert("text".into(), t.as_str().into());
            let e = entities(t);
            if !e.is_empty() {
                m.insert("entities".into(), e.into());
            }
        }
        if let Some(c) = &self.caption {
            m.insert("caption".into(), c.as_str().into());
            let e = entities(c);
            if !e.is_empty() {
                m.insert("caption_entities".into(), e.into());
            }
        }
        if let Some(thread) = self.topic {
            m.insert("message_thread_id".into(), thread.into());
            m.insert("is_topic_message".into(), true.into());
        }
        match (self.reply_to, self.topic) {
            (Some(r), _) => {
                m.insert("reply_to_message".into(), r);
            }
            // Every message in a topic replies, implicitly, to the topic's first message.
            (None, Some(thread)) => {
                m.insert(
                    "reply_to_message".into(),
                    json!({
                        "message_id": thread,
                        "from": bot.json(),
                        "chat": self.chat.json(),
                        "date": now(),
                        "message_thread_id": thread,
                        "forum_topic_created": { "name": "Topic", "icon_color": 7_322_096 },
                    }),
                );
            }
            (None, None) => {}
        }
        m.extend(self.extra);
        Value::Object(m)
    }
}

/// Entities Telegram derives from a text: `@name` mentions and `/command[@bot]` commands
/// (offsets and lengths in UTF-16 code units).
pub fn entities(text: &str) -> Vec<Value> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut offset = 0usize;
    let mut i = 0;
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while i < chars.len() {
        let c = chars[i];
        let starts_word = i == 0 || !word(chars[i - 1]) && chars[i - 1] != '@';
        if (c == '@' || c == '/') && starts_word {
            let mut j = i + 1;
            while j < chars.len() && word(chars[j]) {
                j += 1;
            }
            if c == '/' && j > i + 1 && j < chars.len() && chars[j] == '@' {
                let mut k = j + 1;
                while k < chars.len() && word(chars[k]) {
                    k += 1;
                }
                if k > j + 1 {
                    j = k;
                }
            }
            if j > i + 1 {
                let length: usize = chars[i..j].iter().map(|c| c.len_utf16()).sum();
                let kind = if c == '@' { "mention" } else { "bot_command" };
                out.push(json!({ "type": kind, "offset": offset, "length": length }));
                offset += length;
                i = j;
                continue;
            }
        }
        offset += c.len_utf16();
        i += 1;
    }
    out
}

/// A failure of the next call(s) of a method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 429 with `parameters.retry_after` (seconds).
    RateLimited { retry_after: u64 },
    /// 500 `Internal Server Error` (Bot API JSON).
    ServerError,
    /// 502 with an HTML body, as a front proxy answers.
    BadGateway,
    /// 400 with this description (e.g. `Bad Request: chat not found`).
    BadRequest(String),
    /// 403 with this description (e.g. `Forbidden: bot was blocked by the user`).
    Forbidden(String),
    /// The connection is closed after the request was read, before it is handled.
    Drop,
    /// The request is handled (a message is delivered), then the connection is closed
    /// without an answer: the sender cannot know it was delivered.
    DropAfterHandling,
}

/// A message the bot sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SentMessage {
    pub chat_id: i64,
    pub message_id: i64,
    pub text: String,
    /// `parse_mode` if the bot set one (Chitin never does).
    pub parse_mode: Option<String>,
    pub reply_to: Option<i64>,
    pub thread: Option<i64>,
    /// The inline keyboard's buttons, row by row flattened: (label, callback data).
    pub buttons: Vec<(String, String)>,
    /// The message as the fake answered it (reply to it with [`MessageBuilder::reply_to`]).
    pub message: Value,
    /// The request's parameters as received.
    pub params: Value,
}

/// An `editMessageText` that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    pub chat_id: i64,
    pub message_id: i64,
    pub text: String,
    /// The new buttons; `None` when the request had no `reply_markup`.
    pub buttons: Option<Vec<(String, String)>>,
    pub params: Value,
}

/// An `answerCallbackQuery` that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub callback_id: String,
    pub text: Option<String>,
}

/// A `sendChatAction` that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatAction {
    pub chat_id: i64,
    pub action: String,
    pub thread: Option<i64>,
}

/// One request with the right token (failed or not).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The method as in the path (e.g. `getUpdates`).
    pub method: String,
    pub params: Value,
    /// The first path segment before `/bot<token>/`, when the API root has one.
    pub via: Option<String>,
}

/// The registered webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub secret_token: Option<String>,
    pub params: Value,
}

/// A pushed message (or edit).
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub update_id: i64,
    pub message_id: i64,
    /// The message object of the update.
    pub message: Value,
    /// The whole update (e.g. to post it to a webhook).
    pub update: Value,
}

/// A pushed button press.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedPress {
    pub update_id: i64,
    pub callback_id: String,
    pub update: Value,
}

struct State {
    token: String,
    bot: FakeUser,
    next_update_id: i64,
    next_message_id: i64,
    next_callback: u64,
    /// Unacknowledged updates, oldest first.
    queue: VecDeque<Value>,
    chats: HashMap<i64, Value>,
    /// The bot's messages by (chat, message id), as they are now.
    bot_messages: HashMap<(i64, i64), Value>,
    /// Every message id in each chat (for replies).
    known: HashSet<(i64, i64)>,
    open_callbacks: HashSet<String>,
    sent: Vec<SentMessage>,
    edits: Vec<Edit>,
    answers: Vec<Answer>,
    actions: Vec<ChatAction>,
    calls: Vec<Call>,
    /// Scripted failures by method, lower case.
    failures: Script<String, Failure>,
    webhook: Option<Webhook>,
    /// Stored files by `file_id`: (`file_path`, bytes).
    files: HashMap<String, (String, Vec<u8>)>,
    /// Counts `getUpdates` requests: a waiting one whose number is no longer the latest was
    /// overtaken by another and ends with 409.
    polls: u64,
    /// `getUpdates` requests ended by a newer one (409).
    conflicts: usize,
    /// `file_path`s downloaded, in order.
    downloads: Vec<String>,
}

impl State {
    fn enqueue(&mut self, kind: &str, body: Value) -> (i64, Value) {
        let id = self.next_update_id;
        self.next_update_id += 1;
        let mut update = Map::new();
        update.insert("update_id".into(), id.into());
        update.insert(kind.into(), body);
        let update = Value::Object(update);
        self.queue.push_back(update.clone());
        (id, update)
    }

    fn message_id(&mut self) -> i64 {
        let id = self.next_message_id;
        self.next_message_id += 1;
        id
    }
}

/// The running fake. Stops accepting connections when dropped.
pub struct FakeTelegram {
    /// The state; its changes are pushed updates (a waiting `getUpdates` answers).
    server: Server<State>,
}

impl fmt::Debug for FakeTelegram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.server.debug("FakeTelegram", f)
    }
}

impl FakeTelegram {
    /// Starts a fake for [`TOKEN`] and the bot [`FakeUser::bot`].
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(TOKEN, FakeUser::bot()).await
    }

    /// Starts a fake for `token` and `bot` on a free port of 127.0.0.1.
    pub async fn start_with(token: &str, bot: FakeUser) -> std::io::Result<Self> {
        let listener = fake_http::bind("/").await?;
        let state = State {
            token: token.into(),
            bot,
            next_update_id: 500_000_001,
            next_message_id: 100,
            next_callback: 4_242_000_001,
            queue: VecDeque::new(),
            chats: HashMap::new(),
            bot_messages: HashMap::new(),
            known: HashSet::new(),
            open_callbacks: HashSet::new(),
            sent: Vec::new(),
            edits: Vec::new(),
            answers: Vec::new(),
            actions: Vec::new(),
            calls: Vec::new(),
            failures: Script::default(),
            webhook: None,
            files: HashMap::new(),
            downloads: Vec::new(),
            polls: 0,
            conflicts: 0,
        };
        Ok(Self {
            server: listener.serve(state, handle),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.server.lock()
    }

    /// The API root to configure (`http://127.0.0.1:<port>/`).
    pub fn api_base(&self) -> Url {
        self.server.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// The bot's account.
    pub fn bot(&self) -> FakeUser {
        self.lock().bot.clone()
    }

    /// Makes a chat known (a pushed message does it too).
    /// Stores a file the bot can fetch with `getFile` (as if a user had sent it).
    pub fn put_file(&self, file_id: &str, file_path: &str, bytes: Vec<u8>) {
        self.lock()
            .files
            .insert(file_id.into(), (file_path.into(), bytes));
    }

    /// The `file_path`s the bot downloaded, in order.
    pub fn downloads(&self) -> Vec<String> {
        self.lock().downloads.clone()
    }

    pub fn add_chat(&self, chat: &FakeChat) {
        self.lock().chats.insert(chat.id, chat.json());
    }

    /// Queues a `message` update; returns its ids.
    pub fn push_message(&self, m: MessageBuilder) -> Pushed {
        self.push_message_as("message", m)
    }

    /// Queues a `message` update twice in a row with the same `update_id` (a redelivery the
    /// receiver must recognize); returns its ids.
    pub fn push_message_twice(&self, m: MessageBuilder) -> Pushed {
        let pushed = {
            let mut st = self.lock();
            let message_id = st.message_id();
            st.chats.insert(m.chat.id, m.chat.json());
            st.known.insert((m.chat.id, message_id));
            let message = m.build(message_id, &st.bot);
            let (update_id, update) = st.enqueue("message", message.clone());
            st.queue.push_back(update.clone());
            Pushed {
                update_id,
                message_id,
                message,
                update,
            }
        };
        self.notify();
        pushed
    }

    /// Queues a message as another update kind (`channel_post`, …).
    pub fn push_message_as(&self, kind: &str, m: MessageBuilder) -> Pushed {
        let pushed = {
            let mut st = self.lock();
            let message_id = st.message_id();
            st.chats.insert(m.chat.id, m.chat.json());
            st.known.insert((m.chat.id, message_id));
            let message = m.build(message_id, &st.bot);
            let (update_id, update) = st.enqueue(kind, message.clone());
            Pushed {
                update_id,
                message_id,
                message,
                update,
            }
        };
        self.notify();
        pushed
    }

    /// Builds a `message` update with fresh ids without queueing it (a webhook body).
    pub fn webhook_update(&self, m: MessageBuilder) -> Pushed {
        let mut st = self.lock();
        let message_id = st.message_id();
        st.chats.insert(m.chat.id, m.chat.json());
        let message = m.build(message_id, &st.bot);
        let update_id = st.next_update_id;
        st.next_update_id += 1;
        let update = json!({ "update_id": update_id, "message": message });
        Pushed {
            update_id,
            message_id,
            message,
            update,
        }
    }

    /// Queues an `edited_message` update: `original` (a pushed message) with a new text.
    pub fn push_edit(&self, original: &Value, new_text: &str) -> Pushed {
        let mut message = original.clone();
        message["text"] = new_text.into();
        message["entities"] = entities(new_text).into();
        message["edit_date"] = now().into();
        let message_id = message["message_id"].as_i64().unwrap_or_default();
        let (update_id, update) = self.lock().enqueue("edited_message", message.clone());
        self.notify();
        Pushed {
            update_id,
            message_id,
            message,
            update,
        }
    }

    /// Queues a `callback_query`: `from` pressed a button with `data` under the bot's message
    /// `message_id` in `chat_id`.
    pub fn push_callback(
        &self,
        from: &FakeUser,
        chat_id: i64,
        message_id: i64,
        data: &str,
    ) -> PushedPress {
        let pressed = {
            let mut st = self.lock();
            let message = st
                .bot_messages
                .get(&(chat_id, message_id))
                .cloned()
                .unwrap_or_else(|| {
                    // An inaccessible message (date 0), as Telegram sends for old ones.
                    let chat = st
                        .chats
                        .get(&chat_id)
                        .cloned()
                        .unwrap_or_else(|| json!({ "id": chat_id, "type": "private" }));
                    json!({ "chat": chat, "message_id": message_id, "date": 0 })
                });
            let callback_id = st.next_callback.to_string();
            st.next_callback += 1;
            st.open_callbacks.insert(callback_id.clone());
            let query = json!({
                "id": callback_id,
                "from": from.json(),
                "message": message,
                "chat_instance": "-1234567890",
                "data": data,
            });
            let (update_id, update) = st.enqueue("callback_query", query);
            PushedPress {
                update_id,
                callback_id,
                update,
            }
        };
        self.notify();
        pressed
    }

    /// Queues an update of any kind with this body (`my_chat_member`, `poll`, …).
    pub fn push_update(&self, kind: &str, body: Value) -> i64 {
        let (id, _) = self.lock().enqueue(kind, body);
        self.notify();
        id
    }

    /// Updates not yet acknowledged by a `getUpdates` offset.
    pub fn pending(&self) -> usize {
        self.lock().queue.len()
    }

    /// Every message the bot sent, in order.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.lock().sent.clone()
    }

    pub fn edits(&self) -> Vec<Edit> {
        self.lock().edits.clone()
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.lock().answers.clone()
    }

    pub fn chat_actions(&self) -> Vec<ChatAction> {
        self.lock().actions.clone()
    }

    /// Every request that carried the right token, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How many `getUpdates` were ended with 409 because another one arrived while they
    /// waited (two pollers of one bot).
    pub fn conflicts(&self) -> usize {
        self.lock().conflicts
    }

    /// The labels ([`Call::via`]) of the calls of `method`, in order (`""` without one).
    pub fn vias_of(&self, method: &str) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .map(|c| c.via.clone().unwrap_or_default())
            .collect()
    }

    /// The parameters of every call of `method`.
    pub fn calls_of(&self, method: &str) -> Vec<Value> {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .map(|c| c.params.clone())
            .collect()
    }

    pub fn webhook(&self) -> Option<Webhook> {
        self.lock().webhook.clone()
    }

    /// The bot's message as it is now (after edits).
    pub fn bot_message(&self, chat_id: i64, message_id: i64) -> Option<Value> {
        self.lock()
            .bot_messages
            .get(&(chat_id, message_id))
            .cloned()
    }

    /// The next `times` calls of `method` fail with `failure` (after earlier scripted ones).
    pub fn fail_next(&self, method: &str, times: usize, failure: Failure) {
        self.lock()
            .failures
            .push(method.to_ascii_lowercase(), times, failure);
    }

    fn notify(&self) {
        self.server.notify();
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fake_http::failing_by_drop_variants!(Failure);

fn error(code: u16, description: &str) -> Reply {
    fake_http::json(
        fake_http::status(code, StatusCode::BAD_REQUEST),
        &json!({ "ok": false, "error_code": code, "description": description }),
    )
}

fn ok(result: Value) -> Reply {
    fake_http::json(StatusCode::OK, &json!({ "ok": true, "result": result }))
}

fn failure_response(f: &Failure) -> Reply {
    match f {
        Failure::RateLimited { retry_after } => fake_http::json(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({
                "ok": false,
                "error_code": 429,
                "description": format!("Too Many Requests: retry after {retry_after}"),
                "parameters": { "retry_after": retry_after },
            }),
        ),
        Failure::ServerError => error(500, "Internal Server Error"),
        Failure::BadGateway => fake_http::respond(
            StatusCode::BAD_GATEWAY,
            "text/html",
            "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>",
        ),
        Failure::BadRequest(d) => error(400, d),
        Failure::Forbidden(d) => error(403, d),
        // Not reached: drops are handled before.
        Failure::Drop | Failure::DropAfterHandling => error(500, "Internal Server Error"),
    }
}

async fn handle(
    state: Arc<Mutex<State>>,
    pushed: watch::Sender<u64>,
    req: Request<Incoming>,
) -> Answered {
    let full = req.uri().path().to_owned();
    // An API root with a path: `/<label>/bot<token>/<method>` (or `/<label>/file/bot...`).
    let (via, path) = match full.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((label, rest))
            if !label.is_empty() && !label.starts_with("bot") && label != "file" =>
        {
            (Some(label.to_owned()), format!("/{rest}"))
        }
        _ => (None, full),
    };
    if let Some(rest) = path.strip_prefix("/file/bot") {
        let mut st = lock(&state);
        let Some((token, file_path)) = rest.split_once('/') else {
            return Ok(error(404, "Not Found"));
        };
        if token != st.token {
            return Ok(error(401, "Unauthorized"));
        }
        let found = st
            .files
            .values()
            .find(|(p, _)| p == file_path)
            .map(|(_, bytes)| bytes.clone());
        return Ok(match found {
            Some(bytes) => {
                st.downloads.push(file_path.to_owned());
                fake_http::respond(StatusCode::OK, "application/octet-stream", bytes)
            }
            None => error(404, "Not Found"),
        });
    }
    let body = fake_http::body(req).await?;
    let Some((token, method)) = path
        .strip_prefix("/bot")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Ok(error(404, "Not Found"));
    };
    let method = method.to_owned();
    let params: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Ok(error(400, "Bad Request: can't parse JSON object")),
        }
    };
    let failure = {
        let mut st = lock(&state);
        if token != st.token {
            return Ok(error(401, "Unauthorized"));
        }
        st.calls.push(Call {
            method: method.clone(),
            params: params.clone(),
            via,
        });
        st.failures.next(method.to_ascii_lowercase().as_str())
    };
    fake_http::scripted(failure, failure_response, || {
        dispatch(&state, &pushed, &method, &params)
    })
    .await
}

async fn dispatch(
    state: &Arc<Mutex<State>>,
    pushed: &watch::Sender<u64>,
    method: &str,
    params: &Value,
) -> Reply {
    if method.eq_ignore_ascii_case("getUpdates") {
        return get_updates(state, pushed, params).await;
    }
    let mut st = lock(state);
    match method.to_ascii_lowercase().as_str() {
        "getme" => {
            let mut me = st.bot.json();
            me["can_join_groups"] = true.into();
            me["can_read_all_group_messages"] = false.into();
            me["supports_inline_queries"] = false.into();
            ok(me)
        }
        "sendmessage" => send_message(&mut st, params),
        "editmessagetext" => edit_message(&mut st, params),
        "getfile" => {
            let id = params["file_id"].as_str().unwrap_or_default();
            match st.files.get(id) {
                Some((path, bytes)) => {
                    let size = bytes.len();
                    let mut file =
                        json!({ "file_id": id, "file_unique_id": "u", "file_size": size });
                    // The Bot API gives no download path for files over 20 MB.
                    if size <= 20 * 1024 * 1024 {
                        file["file_path"] = path.as_str().into();
                    }
                    ok(file)
                }
                None => error(
                    400,
                    "Bad Request: wrong file_id or the file is temporarily unavailable",
                ),
            }
        }
        "answercallbackquery" => {
            let Some(id) = params["callback_query_id"].as_str() else {
                return error(
                    400,
                    "Bad Request: parameter \"callback_query_id\" is required",
                );
            };
            if !st.open_callbacks.remove(id) {
                return error(
                    400,
                    "Bad Request: query is too old and response timeout expired or query ID is invalid",
                );
            }
            st.answers.push(Answer {
                callback_id: id.into(),
                text: params["text"].as_str().map(String::from),
            });
            ok(true.into())
        }
        "sendchataction" => {
            let Some(chat_id) = params["chat_id"].as_i64() else {
                return error(400, "Bad Request: chat not found");
            };
            if !st.chats.contains_key(&chat_id) {
                return error(400, "Bad Request: chat not found");
            }
            st.actions.push(ChatAction {
                chat_id,
                action: params["action"].as_str().unwrap_or_default().into(),
                thread: params["message_thread_id"].as_i64(),
            });
            ok(true.into())
        }
        "setwebhook" => {
            let url = params["url"].as_str().unwrap_or_default();
            if url.is_empty() {
                st.webhook = None;
            } else {
                st.webhook = Some(Webhook {
                    url: url.into(),
                    secret_token: params["secret_token"].as_str().map(String::from),
                    params: params.clone(),
                });
            }
            ok(true.into())
        }
        "deletewebhook" => {
            st.webhook = None;
            if params["drop_pending_updates"].as_bool() == Some(true) {
                st.queue.clear();
            }
            ok(true.into())
        }
        _ => error(404, "Not Found"),
    }
}

async fn get_updates(
    state: &Arc<Mutex<State>>,
    pushed: &watch::Sender<u64>,
    params: &Value,
) -> Reply {
    let offset = params["offset"].as_i64();
    let limit = params["limit"]
        .as_u64()
        .map_or(100, |l| l.clamp(1, 100) as usize);
    let timeout = Duration::from_secs(params["timeout"].as_u64().unwrap_or(0));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut rx = pushed.subscribe();
    // This request overtakes any still waiting (they end with 409 when they wake).
    let me = {
        let mut st = lock(state);
        st.polls += 1;
        st.polls
    };
    pushed.send_modify(|n| *n += 1);
    loop {
        rx.borrow_and_update();
        {
            let mut st = lock(state);
            if st.polls != me {
                st.conflicts += 1;
                return error(
                    409,
                    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running",
                );
            }
            if st.webhook.is_some() {
                return error(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first",
                );
            }
            if let Some(offset) = offset {
                st.queue
                    .retain(|u| u["update_id"].as_i64().is_some_and(|id| id >= offset));
            }
            if !st.queue.is_empty() {
                let batch: Vec<Value> = st.queue.iter().take(limit).cloned().collect();
                return ok(batch.into());
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return ok(json!([]));
        }
    }
}

fn buttons_of(markup: &Value) -> Vec<(String, String)> {
    markup["inline_keyboard"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .map(|b| {
            (
                b["text"].as_str().unwrap_or_default().to_owned(),
                b["callback_data"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A reply markup Telegram would refuse.
fn bad_markup(markup: &Value) -> Option<Reply> {
    if markup.is_null() {
        return None;
    }
    if !markup["inline_keyboard"].is_array() {
        return Some(error(
            400,
            "Bad Request: can't parse reply keyboard markup JSON object",
        ));
    }
    for (label, data) in buttons_of(markup) {
        if label.is_empty() {
            return Some(error(
                400,
                "Bad Request: text buttons are unallowed in the inline keyboard",
            ));
        }
        if data.is_empty() || data.len() > 64 {
            return Some(error(400, "Bad Request: BUTTON_DATA_INVALID"));
        }
    }
    None
}

fn bad_text(text: Option<&str>) -> Option<Reply> {
    match text {
        None => Some(error(400, "Bad Request: message text is empty")),
        Some(t) if t.trim().is_empty() => Some(error(400, "Bad Request: message text is empty")),
        Some(t) if utf16_len(t) > 4096 => Some(error(400, "Bad Request: message is too long")),
        Some(_) => None,
    }
}

fn send_message(st: &mut State, params: &Value) -> Reply {
    let Some(chat_id) = params["chat_id"].as_i64() else {
        return error(400, "Bad Request: chat not found");
    };
    let Some(chat) = st.chats.get(&chat_id).cloned() else {
        return error(400, "Bad Request: chat not found");
    };
    let text = params["text"].as_str();
    if let Some(bad) = bad_text(text).or_else(|| bad_markup(&params["reply_markup"])) {
        return bad;
    }
    let text = text.unwrap_or_default();
    let reply_to = params["reply_parameters"]["message_id"]
        .as_i64()
        .or_else(|| params["reply_to_message_id"].as_i64());
    if let Some(r) = reply_to {
        let allow = params["reply_parameters"]["allow_sending_without_reply"].as_bool()
            == Some(true)
            || params["allow_sending_without_reply"].as_bool() == Some(true);
        if !st.known.contains(&(chat_id, r)) && !allow {
            return error(400, "Bad Request: message to be replied not found");
        }
    }
    let thread = params["message_thread_id"].as_i64();
    let message_id = st.message_id();
    let mut message = json!({
        "message_id": message_id,
        "from": st.bot.json(),
        "chat": chat,
        "date": now(),
        "text": text,
    });
    if let Some(t) = thread {
        message["message_thread_id"] = t.into();
        message["is_topic_message"] = true.into();
    }
    if !params["reply_markup"].is_null() {
        message["reply_markup"] = params["reply_markup"].clone();
    }
    st.known.insert((chat_id, message_id));
    st.bot_messages
        .insert((chat_id, message_id), message.clone());
    st.sent.push(SentMessage {
        chat_id,
        message_id,
        text: text.into(),
        parse_mode: params["parse_mode"].as_str().map(String::from),
        reply_to,
        thread,
        buttons: buttons_of(&params["reply_markup"]),
        message: message.clone(),
        params: params.clone(),
    });
    ok(message)
}

fn edit_message(st: &mut State, params: &Value) -> Reply {
    let (Some(chat_id), Some(message_id)) =
        (params["chat_id"].as_i64(), params["message_id"].as_i64())
    else {
        return error(400, "Bad Request: message to edit not found");
    };
    let text = params["text"].as_str();
    if let Some(bad) = bad_text(text).or_else(|| bad_markup(&params["reply_markup"])) {
        return bad;
    }
    let text = text.unwrap_or_default();
    let Some(current) = st.bot_messages.get_mut(&(chat_id, message_id)) else {
        return error(400, "Bad Request: message to edit not found");
    };
    let new_buttons = buttons_of(&params["reply_markup"]);
    if current["text"].as_str() == Some(text) && buttons_of(&current["reply_markup"]) == new_buttons
    {
        return error(
            400,
            "Bad Request: message is not modified: specified new message content and reply \
             markup are exactly the same as a current content and reply markup of the message",
        );
    }
    current["text"] = text.into();
    current["edit_date"] = now().into();
    if new_buttons.is_empty() {
        if let Some(m) = current.as_object_mut() {
            m.remove("reply_markup");
        }
    } else {
        current["reply_markup"] = params["reply_markup"].clone();
    }
    let answer = current.clone();
    st.edits.push(Edit {
        chat_id,
        message_id,
        text: text.into(),
        buttons: (!params["reply_markup"].is_null()).then_some(new_buttons),
        params: params.clone(),
    });
    ok(answer)
}
