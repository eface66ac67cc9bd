//! A scripted `chitin_channels::Platform` for in-process engine tests: `send` answers with the
//! next scripted result (default: accepted, with message ids 1000, 1001, ...) and records every
//! message it was asked to send. Nothing listens anywhere; the wire-level fake Telegram server
//! lives with the adapter.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "tests"
)]

use std::collections::VecDeque;
use std::sync::Mutex;

use chitin_channels::{
    BotInfo, BoxFuture, Button, ChannelError, ChatRef, Limits, OutMessage, Platform, Polled,
    SendError, Sent,
};

#[derive(Default)]
pub struct ScriptedPlatform {
    script: Mutex<VecDeque<Result<Sent, SendError>>>,
    sent: Mutex<Vec<OutMessage>>,
    next_id: Mutex<u64>,
    edit_script: Mutex<VecDeque<SendError>>,
    /// (chat, message id, text) of every edit asked for.
    edits: Mutex<Vec<(ChatRef, String, String)>>,
}

impl ScriptedPlatform {
    pub fn new() -> Self {
        Self {
            next_id: Mutex::new(1000),
            ..Self::default()
        }
    }

    /// The next `send` answers with this error.
    pub fn fail_next(&self, e: SendError) {
        self.script.lock().unwrap().push_back(Err(e));
    }

    /// The next `edit` answers with this error.
    pub fn fail_next_edit(&self, e: SendError) {
        self.edit_script.lock().unwrap().push_back(e);
    }

    /// Every edit asked for: (chat, message id, text), in order (failed ones included).
    pub fn edits(&self) -> Vec<(ChatRef, String, String)> {
        self.edits.lock().unwrap().clone()
    }

    /// Every message `send` was called with, in order (failed attempts included).
    pub fn sends(&self) -> Vec<OutMessage> {
        self.sent.lock().unwrap().clone()
    }
}

impl Platform for ScriptedPlatform {
    fn kind(&self) -> &'static str {
        "telegram"
    }
    fn limits(&self) -> Limits {
        Limits {
            max_text_chars: 4096,
            max_button_data: 64,
        }
    }
    fn connect(&self) -> BoxFuture<'_, Result<BotInfo, ChannelError>> {
        Box::pin(async {
            Ok(BotInfo {
                id: "42".into(),
                username: "chitin_bot".into(),
            })
        })
    }
    fn poll<'a>(&'a self, _cursor: Option<&'a str>) -> BoxFuture<'a, Result<Polled, ChannelError>> {
        Box::pin(async {
            Ok(Polled {
                events: Vec::new(),
                cursor: None,
            })
        })
    }
    fn webhook(
        &self,
        _req: &chitin_channels::WebhookRequest<'_>,
    ) -> Result<chitin_channels::WebhookParsed, ChannelError> {
        Err(ChannelError::WebhookRefused("scripted platform".into()))
    }
    fn send<'a>(&'a self, msg: &'a OutMessage) -> BoxFuture<'a, Result<Sent, SendError>> {
        self.sent.lock().unwrap().push(msg.clone());
        let scripted = self.script.lock().unwrap().pop_front();
        let result = scripted.unwrap_or_else(|| {
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            Ok(Sent {
                message_id: n.to_string(),
            })
        });
        Box::pin(async move { result })
    }
    fn edit<'a>(
        &'a self,
        chat: &'a ChatRef,
        message_id: &'a str,
        text: &'a str,
        _buttons: Option<&'a [Button]>,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        self.edits
            .lock()
            .unwrap()
            .push((chat.clone(), message_id.to_string(), text.to_string()));
        let r = self.edit_script.lock().unwrap().pop_front();
        Box::pin(async move { r.map_or(Ok(()), Err) })
    }
    fn answer_button<'a>(
        &'a self,
        _callback_id: &'a str,
        _text: &'a str,
    ) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }
    fn typing<'a>(&'a self, _chat: &'a ChatRef) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }
}
