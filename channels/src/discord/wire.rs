//! Discord's gateway payloads (only the fields used) and their mapping to [`Event`]s.
//!
//! Decided here:
//! - **Who counts.** Messages by bots (this one included) and webhooks, and system messages
//!   (joins, pins, thread-created notices: any `type` but 0 `DEFAULT` and 19 `REPLY`) are
//!   dropped, not returned as [`Event::Ignored`]: there is nothing to acknowledge on Discord,
//!   and a busy server's other bots would only fill the engine's event table.
//! - **Mentions.** The bot is addressed by a mention of its user (`mentions`), of its managed
//!   role (`mention_roles`, learned from `GUILD_CREATE`; people often pick the role when they
//!   type `@Bot`), by a reply to one of its messages (`referenced_message.author`), or by any
//!   DM. `@everyone` / `@here` do not count.
//! - **Edits.** `MESSAGE_UPDATE` with an `edited_timestamp` is an [`Event::Edited`] with the id
//!   `e:<message id>:<edited_timestamp>`; one without (Discord adding a link preview) is
//!   dropped.
//! - **Buttons.** A component interaction (type 3) on a button (component type 2) is an
//!   [`Event::Button`]; its `callback_id` is `<interaction id>:<application id>:<token>`
//!   (the token answers the press: keep it out of logs). Other interactions are dropped (this
//!   adapter registers no commands).

use serde::Deserialize;
use serde_json::Value;

use crate::{Attachment, ButtonPress, ChatKind, ChatRef, Event, Message, Sender};

/// Message `type`s that are people talking: `DEFAULT` and `REPLY`.
const MESSAGE_DEFAULT: u64 = 0;
const MESSAGE_REPLY: u64 = 19;
/// Interaction type `MESSAGE_COMPONENT`, component type `BUTTON`.
const INTERACTION_COMPONENT: u64 = 3;
const COMPONENT_BUTTON: u64 = 2;
/// Channel types of threads: announcement, public, private.
pub(super) const THREAD_TYPES: [u64; 3] = [10, 11, 12];

/// The bot's own account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Bot {
    pub id: String,
    pub username: String,
}

/// One event waiting to be polled; its chat is resolved at poll time (a guild channel may be
/// a thread, whose parent this adapter may have to look up).
#[derive(Debug, Clone)]
pub(super) struct Item {
    pub event_id: String,
    /// The event with a placeholder chat (the channel itself).
    pub event: Event,
    /// The channel the event happened in.
    pub channel_id: String,
    /// `None`: a DM.
    pub guild_id: Option<String>,
    /// What the payload itself says of the channel: `Some(Some(parent))` a thread of
    /// `parent`, `Some(None)` not a thread, `None` unknown.
    pub parent: Option<Option<String>>,
}

impl Item {
    /// The event with its chat set.
    pub(super) fn with_chat(&self, chat: ChatRef) -> Event {
        let mut event = self.event.clone();
        match &mut event {
            Event::Message(m) | Event::Edited(m) => m.chat = chat,
            Event::Button(b) => b.chat = chat,
            Event::Invited { chat: c, .. } => *c = chat,
            Event::Ignored { .. } | Event::Status(_) => {}
        }
        event
    }
}

/// A gateway payload: `{op, d, s, t}`.
#[derive(Debug, Deserialize)]
pub(super) struct Payload {
    pub op: u64,
    #[serde(default)]
    pub d: Value,
    pub s: Option<u64>,
    pub t: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Ready {
    pub session_id: String,
    pub resume_gateway_url: Option<String>,
    pub user: User,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct User {
    pub id: String,
    #[serde(default)]
    pub username: String,
    pub global_name: Option<String>,
    #[serde(default)]
    pub bot: bool,
}

/// A channel as `GUILD_CREATE`, `CHANNEL_*` and `THREAD_*` describe it.
#[derive(Debug, Deserialize)]
pub(super) struct ChannelInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Option<u64>,
    pub parent_id: Option<String>,
}

impl ChannelInfo {
    /// `Some(parent)` for a thread, `None` for any other channel.
    pub(super) fn thread_parent(&self) -> Option<String> {
        match self.kind {
            Some(k) if THREAD_TYPES.contains(&k) => self.parent_id.clone(),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct GuildCreate {
    #[serde(default)]
    pub channels: Vec<ChannelInfo>,
    #[serde(default)]
    pub threads: Vec<ChannelInfo>,
    #[serde(default)]
    pub roles: Vec<Role>,
}

#[derive(Debug, Deserialize)]
pub(super) struct ThreadListSync {
    #[serde(default)]
    pub threads: Vec<ChannelInfo>,
}

#[derive(Debug, Deserialize)]
pub(super) struct Role {
    pub id: String,
    pub tags: Option<RoleTags>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RoleTags {
    pub bot_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Member {
    nick: Option<String>,
    user: Option<User>,
}

#[derive(Debug, Deserialize)]
struct DAttachment {
    url: String,
    filename: Option<String>,
    content_type: Option<String>,
    size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Reference {
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Referenced {
    author: Option<User>,
}

#[derive(Debug, Deserialize)]
struct DMessage {
    id: String,
    channel_id: String,
    guild_id: Option<String>,
    author: User,
    member: Option<Member>,
    #[serde(default)]
    content: String,
    edited_timestamp: Option<String>,
    #[serde(default)]
    mentions: Vec<User>,
    #[serde(default)]
    mention_roles: Vec<String>,
    #[serde(default)]
    attachments: Vec<DAttachment>,
    #[serde(rename = "type", default)]
    kind: u64,
    webhook_id: Option<String>,
    message_reference: Option<Reference>,
    referenced_message: Option<Box<Referenced>>,
}

#[derive(Debug, Deserialize)]
struct Interaction {
    id: String,
    application_id: String,
    #[serde(rename = "type")]
    kind: u64,
    token: String,
    data: Option<ComponentData>,
    guild_id: Option<String>,
    channel: Option<ChannelInfo>,
    channel_id: Option<String>,
    member: Option<Member>,
    user: Option<User>,
    message: Option<InteractionMessage>,
}

#[derive(Debug, Deserialize)]
struct ComponentData {
    custom_id: Option<String>,
    component_type: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct InteractionMessage {
    id: String,
}

fn display(user: &User, member: Option<&Member>) -> String {
    let nick = member.and_then(|m| m.nick.as_deref());
    let name = nick
        .or(user.global_name.as_deref())
        .filter(|n| !n.trim().is_empty())
        .unwrap_or(&user.username);
    if name.trim().is_empty() {
        user.id.clone()
    } else {
        name.to_owned()
    }
}

fn sender(user: &User, member: Option<&Member>) -> Sender {
    Sender {
        id: user.id.clone(),
        display: display(user, member),
        is_bot: user.bot,
    }
}

/// A snowflake: 1–20 ASCII digits (every id this adapter puts in a URL path is checked).
pub(super) fn is_snowflake(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Maps a `MESSAGE_CREATE` (or, with `edited`, a `MESSAGE_UPDATE`) payload; `None` for what
/// is dropped (see the module doc).
pub(super) fn message_item(
    d: &Value,
    edited: bool,
    bot: Option<&Bot>,
    bot_roles: &std::collections::HashSet<String>,
) -> Option<Item> {
    let m = DMessage::deserialize(d).ok()?;
    if m.author.bot || m.webhook_id.is_some() {
        return None;
    }
    if bot.is_some_and(|b| b.id == m.author.id) {
        return None;
    }
    if m.kind != MESSAGE_DEFAULT && m.kind != MESSAGE_REPLY {
        return None;
    }
    if !is_snowflake(&m.id) || !is_snowflake(&m.channel_id) {
        return None;
    }
    let event_id = if edited {
        format!("e:{}:{}", m.id, m.edited_timestamp.as_deref()?)
    } else {
        format!("m:{}", m.id)
    };
    let attachments: Vec<Attachment> = m
        .attachments
        .iter()
        .map(|a| Attachment {
            file_ref: a.url.clone(),
            name: a.filename.clone(),
            mime: a.content_type.clone(),
            size: a.size,
        })
        .collect();
    if m.content.trim().is_empty() && attachments.is_empty() {
        // Stickers, polls, forwards, embeds only: nothing Chitin reads.
        return None;
    }
    let dm = m.guild_id.is_none();
    let reply_to_bot = m.kind == MESSAGE_REPLY
        && bot.is_some_and(|b| {
            m.referenced_message
                .as_ref()
                .and_then(|r| r.author.as_ref())
                .is_some_and(|a| a.id == b.id)
        });
    let mentioned = dm
        || reply_to_bot
        || bot.is_some_and(|b| m.mentions.iter().any(|u| u.id == b.id))
        || m.mention_roles.iter().any(|r| bot_roles.contains(r));
    let reply_to = if m.kind == MESSAGE_REPLY {
        m.message_reference.and_then(|r| r.message_id)
    } else {
        None
    };
    let message = Message {
        chat: placeholder(&m.channel_id, dm),
        message_id: m.id,
        sender: sender(&m.author, m.member.as_ref()),
        text: m.content,
        mentioned,
        reply_to,
        attachments,
    };
    Some(Item {
        event_id,
        event: if edited {
            Event::Edited(message)
        } else {
            Event::Message(message)
        },
        channel_id: m.channel_id,
        guild_id: m.guild_id,
        parent: None,
    })
}

/// What an `INTERACTION_CREATE` is: a button press, and what answers it.
pub(super) struct Press {
    pub item: Item,
    pub interaction_id: String,
    pub token: String,
}

/// Maps an `INTERACTION_CREATE` payload; `None` for anything but a button press.
pub(super) fn interaction_item(d: &Value) -> Option<Press> {
    let i = Interaction::deserialize(d).ok()?;
    if i.kind != INTERACTION_COMPONENT {
        return None;
    }
    let data = i.data?;
    if data.component_type != Some(COMPONENT_BUTTON) {
        return None;
    }
    let user = i
        .member
        .as_ref()
        .and_then(|m| m.user.as_ref())
        .or(i.user.as_ref())?;
    if user.bot {
        return None;
    }
    let channel_id = i.channel.as_ref().map(|c| c.id.clone()).or(i.channel_id)?;
    let message = i.message?;
    if !is_snowflake(&i.id)
        || !is_snowflake(&i.application_id)
        || !is_snowflake(&channel_id)
        || !is_snowflake(&message.id)
        || !is_interaction_token(&i.token)
    {
        return None;
    }
    let parent = i
        .channel
        .as_ref()
        .and_then(|c| c.kind.map(|_| c.thread_parent()));
    let dm = i.guild_id.is_none();
    let press = ButtonPress {
        callback_id: format!("{}:{}:{}", i.id, i.application_id, i.token),
        chat: placeholder(&channel_id, dm),
        message_id: message.id,
        sender: sender(user, i.member.as_ref()),
        data: data.custom_id.unwrap_or_default(),
    };
    Some(Press {
        item: Item {
            event_id: format!("i:{}", i.id),
            event: Event::Button(press),
            channel_id,
            guild_id: i.guild_id,
            parent,
        },
        interaction_id: i.id,
        token: i.token,
    })
}

/// An interaction token: what Discord issues is URL-safe text (checked before it goes into a
/// URL path).
pub(super) fn is_interaction_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 1024
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn placeholder(channel_id: &str, dm: bool) -> ChatRef {
    ChatRef {
        id: channel_id.to_owned(),
        kind: if dm { ChatKind::Dm } else { ChatKind::Group },
        thread: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use std::collections::HashSet;

    use serde_json::json;

    use super::*;

    fn bot() -> Bot {
        Bot {
            id: "900".into(),
            username: "chitin".into(),
        }
    }

    fn msg(extra: Value) -> Value {
        let mut m = json!({
            "id": "111", "channel_id": "222", "guild_id": "333", "type": 0,
            "author": { "id": "444", "username": "alice" },
            "content": "hello", "mentions": [], "mention_roles": [], "attachments": [],
            "edited_timestamp": null,
        });
        for (k, v) in extra.as_object().unwrap() {
            m[k] = v.clone();
        }
        m
    }

    fn mentioned(extra: Value, roles: &HashSet<String>) -> Option<bool> {
        message_item(&msg(extra), false, Some(&bot()), roles).map(|i| match i.event {
            Event::Message(m) => m.mentioned,
            other => panic!("{other:?}"),
        })
    }

    #[test]
    fn the_bot_is_addressed_by_its_user_its_role_a_reply_or_a_dm_but_not_by_everyone() {
        let roles: HashSet<String> = ["555".to_owned()].into();
        assert_eq!(mentioned(json!({}), &roles), Some(false));
        assert_eq!(
            mentioned(
                json!({ "mentions": [{ "id": "900", "username": "chitin" }] }),
                &roles
            ),
            Some(true)
        );
        assert_eq!(
            mentioned(json!({ "mention_roles": ["555"] }), &roles),
            Some(true)
        );
        assert_eq!(
            mentioned(json!({ "mention_roles": ["556"] }), &roles),
            Some(false)
        );
        assert_eq!(
            mentioned(
                json!({ "mention_everyone": true, "content": "@everyone" }),
                &roles
            ),
            Some(false)
        );
        let reply = json!({
            "type": 19,
            "message_reference": { "message_id": "100" },
            "referenced_message": { "author": { "id": "900", "username": "chitin", "bot": true } },
        });
        assert_eq!(mentioned(reply, &roles), Some(true));
        // A reply to someone else is not addressed to the bot.
        let other = json!({
            "type": 19,
            "message_reference": { "message_id": "100" },
            "referenced_message": { "author": { "id": "777", "username": "bob" } },
        });
        assert_eq!(mentioned(other, &roles), Some(false));
        let dm = json!({ "guild_id": null });
        assert_eq!(mentioned(dm, &roles), Some(true));
    }

    #[test]
    fn bots_webhooks_system_messages_and_empty_messages_are_dropped() {
        let roles = HashSet::new();
        let none = |extra: Value| message_item(&msg(extra), false, Some(&bot()), &roles).is_none();
        assert!(none(
            json!({ "author": { "id": "900", "username": "chitin" } })
        ));
        assert!(none(
            json!({ "author": { "id": "901", "username": "x", "bot": true } })
        ));
        assert!(none(json!({ "webhook_id": "1" })));
        assert!(none(json!({ "type": 7 })));
        assert!(none(json!({ "content": "  " })));
        assert!(none(json!({ "id": "../x" })));
        assert!(!none(json!({})));
    }

    #[test]
    fn an_update_without_an_edit_time_is_dropped_and_an_edit_has_a_stable_id() {
        let roles = HashSet::new();
        assert!(message_item(&msg(json!({})), true, Some(&bot()), &roles).is_none());
        let edited = msg(json!({ "edited_timestamp": "2024-01-01T00:00:00+00:00" }));
        let item = message_item(&edited, true, Some(&bot()), &roles).unwrap();
        assert_eq!(item.event_id, "e:111:2024-01-01T00:00:00+00:00");
        assert!(matches!(item.event, Event::Edited(_)));
    }

    #[test]
    fn the_display_name_prefers_the_nickname_then_the_global_name() {
        let u = User {
            id: "1".into(),
            username: "alice_1".into(),
            global_name: Some("Alice".into()),
            bot: false,
        };
        assert_eq!(display(&u, None), "Alice");
        let m = Member {
            nick: Some("Al".into()),
            user: None,
        };
        assert_eq!(display(&u, Some(&m)), "Al");
    }
}
