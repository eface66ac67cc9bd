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
# Every credential is only a "secret:NAME" reference, released by Cedar `secret.use` for
# Chitin::Channel::"<name>" to the platform's API host (store it with `chitin secrets set NAME
# --audience HOST`). Keys common to every kind: name, kind, mode (where the kind has several),
# poll_timeout_secs, pairing_code_ttl_secs, max_send_attempts, stream_edit_ms,
# max_attachment_mb (documented under Telegram below). A key another kind uses is refused.
#
# [[channels]]
# name = "telegram"                     # required: 1-32 characters a-z 0-9 _ -, unique
# kind = "telegram"                     # required: telegram | slack | discord | whatsapp |
#                                       #   signal | matrix
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
#
# [[channels]]                          # Slack (a Slack app with a bot user)
# name = "slack"
# kind = "slack"
# bot_token = "secret:slack_bot"        # required: xoxb-...; --audience slack.com
# mode = "events"                       # "events" (Slack posts to /channels/<name>/events and
#                                       #   /channels/<name>/interactivity) or "socket" (Socket
#                                       #   Mode WebSocket; no public URL needed)
# signing_secret = "secret:slack_sign"  # required with mode = "events" (request signatures)
# app_token = "secret:slack_app"        # required with mode = "socket": xapp-...
# api_base = "https://slack.com/api"
#
# [[channels]]                          # Discord (a bot with the Message Content intent)
# name = "discord"
# kind = "discord"
# token = "secret:discord_bot"          # required; --audience discord.com
# api_base = "https://discord.com/api/v10"  # the gateway URL comes from GET /gateway/bot
#
# [[channels]]                          # WhatsApp Business Cloud API
# name = "whatsapp"
# kind = "whatsapp"
# access_token = "secret:wa_token"      # required; --audience graph.facebook.com
# app_secret = "secret:wa_app_secret"   # required: checks X-Hub-Signature-256 of webhooks
# verify_token = "secret:wa_verify"     # required: the webhook verification handshake
# phone_number_id = "123456789012345"   # required: the business number's id
# api_base = "https://graph.facebook.com/v26.0"
#                                       # webhook URL to configure: https://<gateway>/channels/<name>/webhook
#
# [[channels]]                          # Signal, through a signal-cli daemon you run
# name = "signal"
# kind = "signal"
# api_base = "http://127.0.0.1:8080"    # required: `signal-cli -a +49... daemon --http 127.0.0.1:8080`
#                                       #   (it has no authentication: keep it on loopback)
# account = "+4915112345678"            # required: the bot's number, registered with signal-cli
#
# [[channels]]                          # Matrix (unencrypted rooms; encrypted ones are refused)
# name = "matrix"
# kind = "matrix"
# homeserver = "https://matrix.example.org"  # required
# access_token = "secret:mx_token"      # required; --audience matrix.example.org
# user_id = "@chitin:example.org"       # required: the bot's account
"#;

/// The default API root of each platform.
pub const TELEGRAM_API_BASE: &str = "https://api.telegram.org";
pub const SLACK_API_BASE: &str = "https://slack.com/api";
pub const DISCORD_API_BASE: &str = "https://discord.com/api/v10";
pub const WHATSAPP_API_BASE: &str = "https://graph.facebook.com/v26.0";

/// Which platform a channel talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Telegram,
    Slack,
    Discord,
    Whatsapp,
    Signal,
    Matrix,
}

impl ChannelKind {
    /// As in `[[channels]] kind` and in Cedar identities (`telegram:<user id>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Telegram => "telegram",
            Self::Slack => "slack",
            Self::Discord => "discord",
            Self::Whatsapp => "whatsapp",
            Self::Signal => "signal",
            Self::Matrix => "matrix",
        }
    }

    /// The public API root, for the kinds that have one.
    fn default_api_base(self) -> Option<&'static str> {
        match self {
            Self::Telegram => Some(TELEGRAM_API_BASE),
            Self::Slack => Some(SLACK_API_BASE),
            Self::Discord => Some(DISCORD_API_BASE),
            Self::Whatsapp => Some(WHATSAPP_API_BASE),
            Self::Signal | Self::Matrix => None,
        }
    }

    /// The `mode` values this kind accepts; the first is the default.
    fn modes(self) -> &'static [ChannelMode] {
        match self {
            Self::Telegram => &[ChannelMode::Polling, ChannelMode::Webhook],
            Self::Slack => &[ChannelMode::Events, ChannelMode::Socket],
            Self::Whatsapp => &[ChannelMode::Webhook],
            Self::Discord | Self::Signal | Self::Matrix => &[ChannelMode::Polling],
        }
    }
}

/// How events reach the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelMode {
    /// The gateway asks or holds a connection (Telegram `getUpdates`, Discord's gateway
    /// socket, Matrix `/sync`, signal-cli's event stream).
    Polling,
    /// The platform posts to `/channels/<name>/webhook` (Telegram, WhatsApp).
    Webhook,
    /// Slack's Events API: Slack posts to `/channels/<name>/events` and `/interactivity`.
    Events,
    /// Slack's Socket Mode: a WebSocket opened with the app token.
    Socket,
}

impl ChannelMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Polling => "polling",
            Self::Webhook => "webhook",
            Self::Events => "events",
            Self::Socket => "socket",
        }
    }

    /// Events arrive as requests to the gateway (nothing to poll).
    pub fn is_push(self) -> bool {
        matches!(self, Self::Webhook | Self::Events)
    }
}

/// One `[[channels]]` table. Which keys a kind takes is checked by [`validate`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub kind: ChannelKind,
    /// Telegram's bot token, Discord's bot token.
    #[serde(default, deserialize_with = "token_field")]
    pub token: Option<CredentialField>,
    /// Slack: the bot token (`xoxb-`).
    #[serde(default, deserialize_with = "bot_token_field")]
    pub bot_token: Option<CredentialField>,
    /// Slack: the signing secret of the Events API and interactivity requests.
    #[serde(default, deserialize_with = "signing_secret_field")]
    pub signing_secret: Option<CredentialField>,
    /// Slack Socket Mode: the app-level token (`xapp-`).
    #[serde(default, deserialize_with = "app_token_field")]
    pub app_token: Option<CredentialField>,
    /// WhatsApp, Matrix: the access token.
    #[serde(default, deserialize_with = "access_token_field")]
    pub access_token: Option<CredentialField>,
    /// WhatsApp: the app secret (webhook signatures).
    #[serde(default, deserialize_with = "app_secret_field")]
    pub app_secret: Option<CredentialField>,
    /// WhatsApp: the verify token of the webhook handshake.
    #[serde(default, deserialize_with = "verify_token_field")]
    pub verify_token: Option<CredentialField>,
    /// WhatsApp: the business phone number's id.
    #[serde(default)]
    pub phone_number_id: Option<String>,
    /// Signal: the bot's number, as registered with signal-cli.
    #[serde(default)]
    pub account: Option<String>,
    /// Matrix: the homeserver's client API root (`https://matrix.example.org`).
    #[serde(default)]
    pub homeserver: Option<String>,
    /// Matrix: the bot's user id (`@bot:example.org`).
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub api_base: Option<String>,
    /// Unset: the kind's default (Telegram `polling`, Slack `events`, WhatsApp `webhook`).
    #[serde(default)]
    pub mode: Option<ChannelMode>,
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

/// A deserializer for an optional `secret:NAME` field of `[[channels]]`.
macro_rules! secret_field {
    ($name:ident, $field:literal) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CredentialField>, D::Error> {
            let s = zeroize::Zeroizing::new(String::deserialize(d)?);
            secret_only($field, &s)
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
    };
}
secret_field!(token_field, "channels.token");
secret_field!(bot_token_field, "channels.bot_token");
secret_field!(signing_secret_field, "channels.signing_secret");
secret_field!(app_token_field, "channels.app_token");
secret_field!(access_token_field, "channels.access_token");
secret_field!(app_secret_field, "channels.app_secret");
secret_field!(verify_token_field, "channels.verify_token");
secret_field!(webhook_secret_field, "channels.webhook_secret");

/// Whether `name` is a valid channel name: `[a-z0-9_-]{1,32}`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl ChannelConfig {
    /// The API root: `api_base` (Matrix: `homeserver`), or the platform's public one
    /// (empty for Signal without `api_base`, refused by [`validate`]).
    pub fn api_base_or_default(&self) -> &str {
        let set = match self.kind {
            ChannelKind::Matrix => self.homeserver.as_deref(),
            _ => self.api_base.as_deref(),
        };
        set.or_else(|| self.kind.default_api_base()).unwrap_or("")
    }

    /// The mode: as set, or the kind's default.
    pub fn mode(&self) -> ChannelMode {
        self.mode.unwrap_or(self.kind.modes()[0])
    }

    /// The credentials this channel uses, by config key (each a `secret:NAME`).
    pub fn credentials(&self) -> Vec<(&'static str, &CredentialField)> {
        [
            ("token", &self.token),
            ("bot_token", &self.bot_token),
            ("signing_secret", &self.signing_secret),
            ("app_token", &self.app_token),
            ("access_token", &self.access_token),
            ("app_secret", &self.app_secret),
            ("verify_token", &self.verify_token),
            ("webhook_secret", &self.webhook_secret),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
    }

    /// The parsed API root and its lower-case host (the `host` of the token's `secret.use`).
    pub fn parsed_api_base(&self) -> Result<(reqwest::Url, String), String> {
        let p = format!("[[channels]] `{}`", self.name);
        let key = if self.kind == ChannelKind::Matrix {
            "homeserver"
        } else {
            "api_base"
        };
        let url = reqwest::Url::parse(self.api_base_or_default())
            .map_err(|e| format!("{p}: {key} is not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{p}: {key} must not contain a user name or password"
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "{p}: {key} must not have a query (?) or fragment (#)"
            ));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{p}: {key} has no host"))?
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match url.scheme() {
            "https" => {}
            "http" if super::providers::is_loopback(&host) => {}
            // signal-cli's daemon has no TLS and no authentication: the adapter accepts it only
            // on this host or a private network.
            "http" if self.kind == ChannelKind::Signal => {}
            _ => {
                return Err(format!(
                    "{p}: {key} must start with https:// (http:// only for a loopback server): \
                     the credentials travel with every request"
                ));
            }
        }
        Ok((url, host))
    }
}

/// The keys each kind requires and the ones it accepts besides (every kind takes `name`,
/// `kind`, `mode` among its modes and the common limits).
fn check_keys(c: &ChannelConfig) -> Result<(), String> {
    let n = &c.name;
    let kind = c.kind.as_str();
    let present: Vec<(&str, bool)> = vec![
        ("token", c.token.is_some()),
        ("bot_token", c.bot_token.is_some()),
        ("signing_secret", c.signing_secret.is_some()),
        ("app_token", c.app_token.is_some()),
        ("access_token", c.access_token.is_some()),
        ("app_secret", c.app_secret.is_some()),
        ("verify_token", c.verify_token.is_some()),
        ("phone_number_id", c.phone_number_id.is_some()),
        ("account", c.account.is_some()),
        ("homeserver", c.homeserver.is_some()),
        ("user_id", c.user_id.is_some()),
        ("api_base", c.api_base.is_some()),
        ("webhook_secret", c.webhook_secret.is_some()),
        ("webhook_url", c.webhook_url.is_some()),
    ];
    let mode = c.mode();
    let (required, optional): (&[&str], &[&str]) = match c.kind {
        ChannelKind::Telegram => (&["token"], &["api_base", "webhook_secret", "webhook_url"]),
        ChannelKind::Slack if mode == ChannelMode::Socket => {
            (&["bot_token", "app_token"], &["api_base", "signing_secret"])
        }
        ChannelKind::Slack => (&["bot_token", "signing_secret"], &["api_base", "app_token"]),
        ChannelKind::Discord => (&["token"], &["api_base"]),
        ChannelKind::Whatsapp => (
            &[
                "access_token",
                "app_secret",
                "verify_token",
                "phone_number_id",
            ],
            &["api_base"],
        ),
        ChannelKind::Signal => (&["api_base", "account"], &[]),
        ChannelKind::Matrix => (&["homeserver", "access_token", "user_id"], &[]),
    };
    for (key, set) in &present {
        if *set && !required.contains(key) && !optional.contains(key) {
            return Err(format!(
                "[[channels]] `{n}`: `{key}` is not a key of kind = \"{kind}\" (it takes {})",
                required
                    .iter()
                    .chain(optional)
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for key in required {
        if !present.iter().any(|(k, set)| k == key && *set) {
            return Err(format!(
                "[[channels]] `{n}`: kind = \"{kind}\" needs `{key}`{}",
                if c.kind == ChannelKind::Slack {
                    format!(" with mode = \"{}\"", mode.as_str())
                } else {
                    String::new()
                }
            ));
        }
    }
    if let Some(m) = c.mode
        && !c.kind.modes().contains(&m)
    {
        return Err(format!(
            "[[channels]] `{n}`: mode = \"{}\" is not a mode of kind = \"{kind}\" (use {})",
            m.as_str(),
            c.kind
                .modes()
                .iter()
                .map(|m| format!("\"{}\"", m.as_str()))
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if let Some(a) = &c.account
        && !(a.starts_with('+') && a.len() > 4 && a[1..].bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "[[channels]] `{n}`: account must be the bot's number in international format (+4915...)"
        ));
    }
    if let Some(u) = &c.user_id {
        let ok = u.starts_with('@')
            && u.split_once(':')
                .is_some_and(|(l, d)| l.len() > 1 && !d.is_empty());
        if !ok {
            return Err(format!(
                "[[channels]] `{n}`: user_id must be a Matrix user id such as @bot:example.org"
            ));
        }
    }
    if let Some(p) = &c.phone_number_id
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "[[channels]] `{n}`: phone_number_id must be the numeric id of the business phone number"
        ));
    }
    Ok(())
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
        let n = &c.name;
        check_keys(c)?;
        c.parsed_api_base()?;
        if c.kind == ChannelKind::Telegram
            && c.mode() == ChannelMode::Webhook
            && c.webhook_secret.is_none()
        {
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
            if c.mode() != ChannelMode::Webhook {
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
        assert_eq!(ch.mode(), ChannelMode::Polling);
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
        assert_eq!(c.channels[0].mode(), ChannelMode::Webhook);
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
        assert!(
            e.contains("`token` is not a key of kind = \"slack\" (it takes `bot_token`, `signing_secret`, `api_base`, `app_token`)"),
            "{e}"
        );
        let e = parse("[[channels]]\nname = \"x\"\nkind = \"irc\"\n").unwrap_err();
        assert!(e.contains("irc"), "{e}");
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

    #[test]
    fn each_kind_takes_its_own_keys_and_mode() {
        let ok = |t: &str| parse(&format!("[[channels]]\nname = \"c\"\n{t}")).unwrap();
        let err = |t: &str| parse(&format!("[[channels]]\nname = \"c\"\n{t}")).unwrap_err();
        let c = ok("kind = \"slack\"\nbot_token = \"secret:b\"\nsigning_secret = \"secret:s\"\n");
        assert_eq!(c.channels[0].mode(), ChannelMode::Events);
        assert_eq!(c.channels[0].api_base_or_default(), SLACK_API_BASE);
        assert_eq!(c.channels[0].credentials().len(), 2);
        let c = ok(
            "kind = \"slack\"\nmode = \"socket\"\nbot_token = \"secret:b\"\napp_token = \"secret:a\"\n",
        );
        assert_eq!(c.channels[0].mode(), ChannelMode::Socket);
        assert!(
            err("kind = \"slack\"\nmode = \"socket\"\nbot_token = \"secret:b\"\n")
                .contains("kind = \"slack\" needs `app_token` with mode = \"socket\"")
        );
        assert!(
            err("kind = \"slack\"\nmode = \"polling\"\nbot_token = \"secret:b\"\nsigning_secret = \"secret:s\"\n")
                .contains("mode = \"polling\" is not a mode of kind = \"slack\" (use \"events\" or \"socket\")")
        );
        let c = ok("kind = \"discord\"\ntoken = \"secret:d\"\n");
        assert_eq!(c.channels[0].parsed_api_base().unwrap().1, "discord.com");
        let c = ok(
            "kind = \"whatsapp\"\naccess_token = \"secret:a\"\napp_secret = \"secret:s\"\nverify_token = \"secret:v\"\nphone_number_id = \"1234567890\"\n",
        );
        assert_eq!(c.channels[0].mode(), ChannelMode::Webhook);
        assert!(
            err("kind = \"whatsapp\"\naccess_token = \"secret:a\"\n")
                .contains("needs `app_secret`")
        );
        let c = ok(
            "kind = \"signal\"\napi_base = \"http://127.0.0.1:8080\"\naccount = \"+4915112345678\"\n",
        );
        assert_eq!(c.channels[0].parsed_api_base().unwrap().1, "127.0.0.1");
        assert!(
            err("kind = \"signal\"\napi_base = \"http://127.0.0.1:8080\"\naccount = \"015112345678\"\n")
                .contains("international format")
        );
        assert!(
            err("kind = \"signal\"\naccount = \"+4915112345678\"\n").contains("needs `api_base`")
        );
        let c = ok(
            "kind = \"matrix\"\nhomeserver = \"https://matrix.example.org\"\naccess_token = \"secret:m\"\nuser_id = \"@bot:example.org\"\n",
        );
        assert_eq!(
            c.channels[0].parsed_api_base().unwrap().1,
            "matrix.example.org"
        );
        assert!(
            err("kind = \"matrix\"\nhomeserver = \"http://matrix.example.org\"\naccess_token = \"secret:m\"\nuser_id = \"@bot:example.org\"\n")
                .contains("homeserver must start with https://")
        );
        assert!(
            err("kind = \"matrix\"\nhomeserver = \"https://m.example\"\naccess_token = \"secret:m\"\nuser_id = \"bot\"\n")
                .contains("user_id must be a Matrix user id")
        );
        // A credential of any kind is a `secret:NAME` reference only, never echoed.
        let e = err(
            "kind = \"matrix\"\nhomeserver = \"https://m.example\"\naccess_token = \"syt_CANARY\"\nuser_id = \"@b:m\"\n",
        );
        assert!(
            e.contains("channels.access_token") && !e.contains("CANARY"),
            "{e}"
        );
    }
}
