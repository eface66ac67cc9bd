//! Button presses the platform delivered (stored by the ingress with status `new`), read back
//! in order for the approval flow, which decides them (whose identity may press) and marks
//! them done.

use crate::store::params;
use chitin_channels::ChatRef;

use super::{ChannelsError, Engine, parse_chat_kind};

/// A stored button press not handled yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPress {
    pub row_id: i64,
    pub chat: ChatRef,
    /// The platform user who pressed (not yet an identity: `<kind>:` is added by the caller).
    pub sender_id: String,
    /// The bot's message that carries the button.
    pub message_id: String,
    pub callback_id: String,
    /// Untrusted: anyone can send any data.
    pub data: String,
}

impl Engine {
    /// The presses of `channel` not handled yet, oldest first.
    pub fn pending_presses(&self, channel: &str) -> Result<Vec<PendingPress>, ChannelsError> {
        self.store.db().with(|c| {
            c.query_map(
                "SELECT id, chat_id, chat_kind, thread, sender_id, message_id, callback_id, button_data
                 FROM channel_events WHERE channel = ?1 AND event_kind = 'button' AND status = 'new'
                 ORDER BY id LIMIT 64",
                params![channel],
                |r| {
                    Ok::<_, ChannelsError>(PendingPress {
                        row_id: r.get(0)?,
                        chat: ChatRef {
                            id: r.get::<Option<String>>(1)?.unwrap_or_default(),
                            kind: parse_chat_kind(&r.get::<Option<String>>(2)?.unwrap_or_default()),
                            thread: r.get(3)?,
                        },
                        sender_id: r.get::<Option<String>>(4)?.unwrap_or_default(),
                        message_id: r.get::<Option<String>>(5)?.unwrap_or_default(),
                        callback_id: r.get::<Option<String>>(6)?.unwrap_or_default(),
                        data: r.get::<Option<String>>(7)?.unwrap_or_default(),
                    })
                },
            )
        })
    }

    /// Marks a press handled (it is not decided again after a restart).
    pub fn mark_press_done(&self, row_id: i64) -> Result<(), ChannelsError> {
        let now = self.now_ms();
        self.store.db().with(|c| {
            c.execute(
                "UPDATE channel_events SET status = 'done', updated_ms = ?2 WHERE id = ?1 AND event_kind = 'button'",
                params![row_id, now],
            )
        })?;
        Ok(())
    }

    /// The approval whose prompt is the bot's message `message_id` in `chat` (a reaction on
    /// it answers the approval, on platforms without buttons).
    pub fn approval_of_message(
        &self,
        channel: &str,
        chat: &ChatRef,
        message_id: &str,
    ) -> Result<Option<String>, ChannelsError> {
        let key: Option<Option<String>> = self.store.db().with(|c| {
            c.query_opt(
                "SELECT dedup_key FROM channel_outbox
                 WHERE channel = ?1 AND chat_id = ?2 AND platform_message_id = ?3 AND kind = 'approval'
                 ORDER BY id DESC LIMIT 1",
                params![channel, chat.id, message_id],
            )?
            .map(|r| r.get(0))
            .transpose()
        })?;
        Ok(key.flatten().and_then(|k| {
            k.strip_prefix("approval:")
                .and_then(|rest| rest.split_once('#'))
                .map(|(id, _)| id.to_string())
        }))
    }
}
