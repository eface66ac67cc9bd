//! The `[[channels]]` tables of `chitin.toml`: chat platforms the agent is reachable on.
//!
//! Only parsing and validation live here; the engine (`crate::channels`) and the adapters
//! (`chitin-channels`) use the values.

use serde::{Deserialize, Deserializer};

use super::secret_ref::{CredentialField, SecretRef};

/// Documentation and defaults for `[[channels]]`, written by `chitin init`.
pub const TEMPLATE: &str = r#"
# Chat channels. Add one [[channels]] table per bot account. People who write to the bot are
# admitted by Cedar (`message.receive`); an unknown person writing in a direct message gets a
# pairing code, which an owner approves with `chitin pairing approve CODE`.
#
# [[channels]]
# name = "telegram"                     # required: 1-32 characters a-z 0-9 _ -, unique
# kind = "telegram"                     # required: the platform ("telegram")
# token = "secret:telegram_bot"         # required: the bot token, only as "secret:NAME"; store
#                                       #   it with `chitin secrets set telegram_bot --audience
#                                       #   api.telegram.org` (released by Cedar `secret.use`
#                                       #   for Chitin::Channel::"<name>", only to that host)
# api_base = "https://api.telegram.org" # the platform's API root (tests and self-hosted Bot API
#                                       #   servers override it); https, or http for loopback
# mode = "polling"                      # "polling" (getUpdates) or "webhook" (the platform
#                                       #   POSTs to /channels/<name>/webhook on the gateway)
# webhook_secret = "secret:tg_webhook"  # required in webhook mode: the shared secret the
#                                       #   platform sends in every webhook request (store it
#                                       #   with the same --audience as the token: it is released
#                                       #   by Cedar `secret.use` for the API host)
# webhook_url = "https://bot.example.com/channels/telegram/webhook"
#                                       # webhook mode: registered with the platform at start
#                                       #   (setWebhook); https (http only for loopback); unset:
#                                       #   register it yourself
# poll_timeout_secs = 30                # long-poll wait per request, 1-300
# pairing_code_ttl_secs = 3600          # a pairing code expires after this long, 60-86400
# max_send_attempts = 8                 # tries per outgoing message (network errors, 5xx) before
#                                       #   it becomes a dead letter, 1-100; rate limits (429)
#                                       #   wait as the platform says and do not count
# stream_edit_ms = 1000                 # a streamed answer is shown as one message edited at
#                                       #   most this often (ms, 500-60000) while the model
#                                       #   writes, then finalized; 0: send the answer when done
# max_attachment_mb = 20                # files sent with an admitted message are saved in the
#                                       #   workspace under inbox/<channel>/ up to this size
#                                       #   (MB, 0-100; 0: never saved); never executed
"#;

/// The default API root of each platform.
pub const TELEGRAM_API_BASE: &str = "https://api.telegram.org";

/// Which platform a channel talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Telegram,
}

impl ChannelKind {
    /// As in `[[channels]] kind` and in Cedar identities (`telegram:<user id>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Telegram => "telegram",
        }
    }
}

/// How events reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// The gateway asks (Telegram `getUpdates`).
    #[default]
    Polling,
    /// The platform posts to `/channels/<name>/webhook`.
    Webhook,
}

/// One `[[channels]]` table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub kind: ChannelKind,
    #[serde(deserialize_with = "token_field")]
    pub token: CredentialField,
    #[serde(default)]
    pub api_base: Option<String>,
    #[serde(default)]
    pub mode: ChannelMode,
    #[serde(default, deserialize_with = "webhook_secret_field")]
    pub webhook_secret: Option<CredentialField>,
    /// Webhook mode: the public URL of this gateway's `/channels/<name>/webhook`, registered
    /// with the platform at start (`setWebhook`); unset: registered by the operator.
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default = "d_poll")]
    pub poll_timeout_secs: u64,
    #[serde(default = "d_pairing_ttl")]
    pub pairing_code_ttl_secs: u64,
    #[serde(default = "d_attempts")]
    pub max_send_attempts: u32,
    /// Streamed answers: the interval between edits of the one message that shows them, in
    /// ms (0: no streaming; the answer is sent when complete).
    #[serde(default = "d_stream_edit")]
    pub stream_edit_ms: u64,
    /// The largest attachment saved to the workspace inbox, in MB (0: none saved).
    #[serde(default = "d_attachment_mb")]
    pub max_attachment_mb: u64,
}

fn d_poll() -> u64 {
    30
}
fn d_pairing_ttl() -> u64 {
    3600
}
fn d_attempts() -> u32 {
    8
}
fn d_stream_edit() -> u64 {
    1000
}
fn d_attachment_mb() -> u64 {
    20
}

/// A channel credential: only `secret:NAME` (it must go through Cedar `secret.use` for the
/// channel), never a literal and never `env:VAR`; the value is never echoed.
fn secret_only(field: &str, value: &str) -> Result<CredentialField, String> {
    match SecretRef::parse_credential(field, value)? {
        r @ SecretRef::Secret(_) => Ok(CredentialField(r)),
        SecretRef::Env(_) => Err(format!(
            "config field `{field}` must be \"secret:NAME\": channel credentials are released \
             only from the secret store, through Cedar `secret.use` (store it with `chitin \
             secrets set NAME --audience HOST`)"
        )),
    }
}

fn token_field<'de, D: Deserializer<'de>>(d: D) -> Result<CredentialField, D::Error> {
    let s = zeroize::Zeroizing::new(String::deserialize(d)?);
    secret_only("channels.token", &s).map_err(serde::de::Error::custom)
}

fn webhook_secret_field<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<CredentialField>, D::Error> {
    let s = zeroize::Zeroizing::new(String::deserialize(d)?);
    secret_only("channels.webhook_secret", &s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Whether `name` is a valid channel name: `[a-z0-9_-]{1,32}`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl ChannelConfig {
    /// The API root: `api_base`, or the platform's public one.
    pub fn api_base_or_default(&self) -> &str {
        match (&self.api_base, self.kind) {
            (Some(u), _) => u,
            (None, ChannelKind::Telegram) => TELEGRAM_API_BASE,
        }
    }

    /// The parsed API root and its lower-case host (the `host` of the token's `secret.use`).
    pub fn parsed_api_base(&self) -> Result<(reqwest::Url, String), String> {
        let p = format!("[[channels]] `{}`", self.name);
        let url = reqwest::Url::parse(self.api_base_or_default())
            .map_err(|e| format!("{p}: api_base is not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{p}: api_base must not contain a user name or password"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{p}: api_base must not have a query (?) or fragment (#)"
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{p}: api_base has no host"))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match url.scheme() {
            "https" => {}
            "http" if super::providers::is_loopback(&host) => {}
            _ => {
                return Err(format!(
                    "{p}: api_base must start with https:// (http:// only for a loopback server): \
                     the bot token travels in the URL"
                ));
            }
        }
        Ok((url, host))
    }
}

/// Checks every `[[channels]]` table: names, API roots, mode and limits.
pub fn validate(channels: &[ChannelConfig]) -> Result<(), String> {
    let mut names = std::collections::BTreeSet::new();
    for c in channels {
        if !valid_name(&c.name) {
            return Err(format!(
                "[[channels]] name `{}` is invalid: use 1-32 characters a-z 0-9 _ -",
                c.name.escape_default()
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(format!(
                "[[channels]] name `{}` is used twice; names must be unique",
                c.name
            ));
        }
        c.parsed_api_base()?;
        let n = &c.name;
        if c.mode == ChannelMode::Webhook && c.webhook_secret.is_none() {
            return Err(format!(
                "[[channels]] `{n}`: mode = \"webhook\" needs webhook_secret = \"secret:NAME\" \
                 (store a long random value with `chitin secrets set NAME`)"
            ));
        }
        if let Some(u) = &c.webhook_url {
            let url = reqwest::Url::parse(u)
                .map_err(|e| format!("[[channels]] `{n}`: webhook_url is not a URL ({e})"))?;
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            let loopback = super::providers::is_loopback(&host);
            if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                return Err(format!(
                    "[[channels]] `{n}`: webhook_url must start with https:// (http:// only for loopback)"
                ));
            }
            if c.mode != ChannelMode::Webhook {
                return Err(format!(
                    "[[channels]] `{n}`: webhook_url is only for mode = \"webhook\""
                ));
            }
        }
        if !(1..=300).contains(&c.poll_timeout_secs) {
            return Err(format!(
                "[[channels]] `{n}`: poll_timeout_secs must be 1..=300 (default 30)"
            ));
        }
        if !(60..=86_400).contains(&c.pairing_code_ttl_secs) {
            return Err(format!(
                "[[channels]] `{n}`: pairing_code_ttl_secs must be 60..=86400 (default 3600)"
            ));
        }
        if !(1..=100).contains(&c.max_send_attempts) {
            return Err(format!(
                "[[channels]] `{n}`: max_send_attempts must be 1..=100 (default 8)"
            ));
        }
        if c.stream_edit_ms != 0 && !(500..=60_000).contains(&c.stream_edit_ms) {
            return Err(format!(
                "[[channels]] `{n}`: stream_edit_ms must be 0 (no streaming) or 500..=60000 (default 1000): platforms limit how often a message may be edited"
            ));
        }
        if c.max_attachment_mb > 100 {
            return Err(format!(
                "[[channels]] `{n}`: max_attachment_mb must be 0..=100 (default 20)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use std::path::Path;

    use super::super::Config;
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_minimal_channel_takes_the_documented_defaults() {
        let c = parse(
            "[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:telegram_bot\"\n",
        )
        .unwrap();
        let ch = &c.channels[0];
        assert_eq!(ch.mode, ChannelMode::Polling);
        assert_eq!(ch.api_base_or_default(), TELEGRAM_API_BASE);
        assert_eq!(ch.parsed_api_base().unwrap().1, "api.telegram.org");
        assert_eq!(
            (
                ch.poll_timeout_secs,
                ch.pairing_code_ttl_secs,
                ch.max_send_attempts,
                ch.stream_edit_ms,
                ch.max_attachment_mb
            ),
            (30, 3600, 8, 1000, 20)
        );
    }

    #[test]
    fn a_literal_or_environment_token_is_refused_without_echoing_it() {
        let e = parse(
            "[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"123456:AAE-CANARY\"\n",
        )
        .unwrap_err();
        assert!(e.contains("channels.token") && !e.contains("CANARY"), "{e}");
        let e =
            parse("[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"env:TG_TOKEN\"\n")
                .unwrap_err();
        assert!(e.contains("through Cedar `secret.use`"), "{e}");
    }

    #[test]
    fn webhook_mode_needs_a_webhook_secret() {
        let e = parse("[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:t\"\nmode = \"webhook\"\n")
            .unwrap_err();
        assert!(e.contains("needs webhook_secret"), "{e}");
        let c = parse("[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:t\"\nmode = \"webhook\"\nwebhook_secret = \"secret:w\"\n")
            .unwrap();
        assert_eq!(c.channels[0].mode, ChannelMode::Webhook);
    }

    #[test]
    fn names_are_unique_and_well_formed_and_keys_are_known() {
        let one = "[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:t\"\n";
        let e = parse(&format!("{one}{one}")).unwrap_err();
        assert!(e.contains("used twice"), "{e}");
        let e = parse("[[channels]]\nname = \"TG\"\nkind = \"telegram\"\ntoken = \"secret:t\"\n")
            .unwrap_err();
        assert!(e.contains("is invalid"), "{e}");
        let e = parse(&format!("{one}tokn = \"x\"\n")).unwrap_err();
        assert!(e.contains("tokn"), "{e}");
        let e = parse("[[channels]]\nname = \"tg\"\nkind = \"slack\"\ntoken = \"secret:t\"\n")
            .unwrap_err();
        assert!(e.contains("slack") || e.contains("variant"), "{e}");
    }

    #[test]
    fn the_api_base_must_be_https_except_on_loopback() {
        let base = "[[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:t\"\n";
        let e = parse(&format!("{base}api_base = \"http://bot.example\"\n")).unwrap_err();
        assert!(e.contains("https://"), "{e}");
        let c = parse(&format!("{base}api_base = \"http://127.0.0.1:8081\"\n")).unwrap();
        assert_eq!(c.channels[0].parsed_api_base().unwrap().1, "127.0.0.1");
        let e = parse(&format!("{base}pairing_code_ttl_secs = 5\n")).unwrap_err();
        assert!(e.contains("pairing_code_ttl_secs"), "{e}");
        let e = parse(&format!("{base}max_send_attempts = 0\n")).unwrap_err();
        assert!(e.contains("max_send_attempts"), "{e}");
    }
}
