//! `send_message`: the agent sends a text to a chat conversation. Decided by Cedar
//! `send_message` (context `channel`, `target`, `same_conversation` derived by the gate,
//! `tainted`); an allowed call is queued in the channels' durable outbox (kind
//! `send_message`) through a [`Messenger`] the gateway attaches to the sandbox. Without one
//! (no channels configured) the tool is not offered and refuses to run.

use serde::{Deserialize, Serialize};

use super::{Sandbox, ToolError, ToolResult};
use crate::gate::Authorized;
use crate::policy::Tool;

/// `send_message` arguments.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessageArgs {
    /// The channel's name (`[[channels]] name`).
    pub channel: String,
    /// The conversation: a session key (`channel:<name>:<dm|group>:<chat id>`) or
    /// `<kind>:<dm|group>:<chat id>`.
    pub target: String,
    pub text: String,
}

/// Where `send_message` delivers (the gateway's channel outbox).
pub trait Messenger: Send + Sync + std::fmt::Debug {
    /// Queues `text` for conversation `target` of `channel` (durably, before returning);
    /// returns a short receipt for the model. The error is a sentence for the model.
    fn send(&self, channel: &str, target: &str, text: &str) -> Result<String, String>;
    /// [`Self::send`], queued once per `key` (e.g. `automation:<run>`): sending again under the
    /// same key (a retry after a restart) adds nothing.
    fn send_once(
        &self,
        channel: &str,
        target: &str,
        text: &str,
        key: &str,
    ) -> Result<String, String> {
        let _ = key;
        self.send(channel, target, text)
    }
}

/// Queues the message an `Authorized` covers.
pub fn send_message(
    auth: &Authorized,
    sb: &Sandbox,
    args: &SendMessageArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::SendMessage, args)?;
    let Some(m) = sb.messenger() else {
        return Err(ToolError::InvalidArgs(
            "send_message: no chat channels are configured ([[channels]] in chitin.toml)".into(),
        ));
    };
    let started = std::time::Instant::now();
    let receipt = m
        .send(&args.channel, &args.target, &args.text)
        .map_err(|e| ToolError::InvalidArgs(format!("send_message: {e}")))?;
    Ok(super::gated::output(
        started,
        serde_json::json!({ "queued": receipt }),
    ))
}
