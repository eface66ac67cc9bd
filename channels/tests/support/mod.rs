//! Helpers the adapter tests share (`mod support;` in each): reading an event as the kind it
//! must be, building chats, messages and buttons to send, a loopback port nobody listens on,
//! and collecting every text an adapter shows to check that no credential is among them.
#![allow(
    dead_code,
    reason = "every test binary compiles this module and uses only some of its helpers"
)]
#![allow(clippy::panic, reason = "tests")]

use std::fmt::{Debug, Display};
use std::net::SocketAddr;

use chitin_channels::{
    Button, ButtonPress, ChatKind, ChatRef, Event, Inbound, Message, OutMessage,
};

/// The event's message; fails on any other event.
pub fn message(ev: &Inbound) -> &Message {
    match &ev.event {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The event's button press; fails on any other event.
pub fn press(ev: &Inbound) -> &ButtonPress {
    match &ev.event {
        Event::Button(p) => p,
        other => panic!("expected a button press, got {other:?}"),
    }
}

/// Why the event was ignored; fails on any other event.
pub fn ignored(ev: &Inbound) -> &str {
    match &ev.event {
        Event::Ignored { what } => what,
        other => panic!("expected an ignored event, got {other:?}"),
    }
}

/// A conversation without a thread.
pub fn chat(id: &str, kind: ChatKind) -> ChatRef {
    ChatRef {
        id: id.into(),
        kind,
        thread: None,
    }
}

/// A plain text to send to `chat`, without a reply or buttons.
pub fn text_to(chat: &ChatRef, text: &str, delivery_id: &str) -> OutMessage {
    OutMessage {
        chat: chat.clone(),
        text: text.into(),
        reply_to: None,
        buttons: vec![],
        delivery_id: delivery_id.into(),
    }
}

/// An approval's two buttons, Approve and Deny, with this data.
pub fn approve_deny(approve: &str, deny: &str) -> Vec<Button> {
    vec![
        Button {
            label: "Approve".into(),
            data: approve.into(),
        },
        Button {
            label: "Deny".into(),
            data: deny.into(),
        },
    ]
}

/// A loopback address nobody listens on.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    l.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

/// Every text an adapter showed (errors as `Display` and `Debug`, values as `Debug`), to check
/// that no credential is among them.
#[derive(Debug, Default)]
pub struct Shown(Vec<String>);

impl Shown {
    /// An error's `Display` and `Debug` texts.
    pub fn error(&mut self, e: &(impl Display + Debug)) {
        self.0.push(e.to_string());
        self.0.push(format!("{e:?}"));
    }

    /// A value's `Debug` text.
    pub fn debug(&mut self, value: &impl Debug) {
        self.0.push(format!("{value:?}"));
    }

    /// A text as it is.
    pub fn text(&mut self, text: impl Display) {
        self.0.push(text.to_string());
    }

    /// Fails, naming the text, when a text contains one of `secrets`.
    pub fn assert_hides(&self, secrets: &[&str]) {
        for text in &self.0 {
            for secret in secrets {
                assert!(!text.contains(secret), "credential leaked: {text}");
            }
        }
    }

    /// Fails unless some text contains `part` (e.g. where a credential was scrubbed).
    pub fn assert_some_contains(&self, part: &str) {
        assert!(self.0.iter().any(|t| t.contains(part)), "{:#?}", self.0);
    }
}
