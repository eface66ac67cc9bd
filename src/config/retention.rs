//! The `[retention]` section of `chitin.toml`: how long each class of personal data is kept.

use serde::Deserialize;

/// Documentation and defaults for the `[retention]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[retention]
# How long each class of data is kept before `chitin retention run` (and the gateway's
# schedule) deletes it for real: rows removed, SQLite secure_delete, VACUUM and a WAL
# checkpoint so free pages and the WAL keep no copy. Durations: "<n>d" (days), "<n>h" (hours),
# "<n>m" (minutes) or "forever" (never deleted; `chitin security audit` notes it).
# Subjects under legal hold (`chitin retention hold --subject S`) are never deleted.
# Conversation messages (user and assistant turns), session summaries, and finished runs.
transcripts = "90d"
# Tool results stored in transcripts.
tool_output = "30d"
# Files and attachments stored in transcripts.
attachments = "30d"
# Payloads of audit records (the records and their digests stay, so `chitin audit verify`
# still passes).
audit_payloads = "365d"
# Resolved or expired approval requests.
approvals = "365d"
# Chat channels: received events (their sealed text and the deduplication keys), sent or
# undeliverable outbox messages (their text is stored to send it), decided pairing requests.
chat = "30d"
# Workflow runs that ended (ok, failed, cancelled, interrupted), with their step results, their
# sub-workflow runs and their used or cancelled pauses. A paused run (its pause pending) is
# never deleted. The values workflows keep with `state.set` are not a retention class: they
# stay until the workflow or the user's erasure removes them.
workflows = "90d"
# Automation records: cron firings that ended (the latest of each job is kept, for
# `chitin cron list`) and webhook deliveries that ended. A delivery id is deduplicated for as
# long as it is kept; a delivery acknowledged but not yet started is never deleted.
automation = "30d"
# How often the gateway runs retention, in minutes (0 = only `chitin retention run`).
interval_minutes = 60
"#;

/// A retention period: a number of milliseconds, or forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Forever,
    Ms(i64),
}

impl Period {
    /// Parses `"90d"`, `"12h"`, `"30m"` or `"forever"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "forever" {
            return Ok(Self::Forever);
        }
        let bad = || {
            format!(
                "`{}` is not a duration; use e.g. \"90d\", \"12h\", \"30m\" or \"forever\"",
                text.escape_debug()
            )
        };
        let unit = text.chars().last().ok_or_else(bad)?;
        let n: i64 = text
            .get(..text.len().saturating_sub(1))
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)?;
        let unit_ms: i64 = match unit {
            'd' => 86_400_000,
            'h' => 3_600_000,
            'm' => 60_000,
            _ => return Err(bad()),
        };
        n.checked_mul(unit_ms).map(Self::Ms).ok_or_else(bad)
    }

    /// The cutoff: data created before it is expired (`None` = keep forever).
    pub fn cutoff(self, now_ms: i64) -> Option<i64> {
        match self {
            Self::Forever => None,
            Self::Ms(ms) => Some(now_ms.saturating_sub(ms)),
        }
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The `[retention]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    pub transcripts: Period,
    pub tool_output: Period,
    pub attachments: Period,
    pub audit_payloads: Period,
    pub approvals: Period,
    pub chat: Period,
    pub workflows: Period,
    pub automation: Period,
    pub interval_minutes: u64,
}

const DAY: i64 = 86_400_000;

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            transcripts: Period::Ms(90 * DAY),
            tool_output: Period::Ms(30 * DAY),
            attachments: Period::Ms(30 * DAY),
            audit_payloads: Period::Ms(365 * DAY),
            approvals: Period::Ms(365 * DAY),
            chat: Period::Ms(30 * DAY),
            workflows: Period::Ms(90 * DAY),
            automation: Period::Ms(30 * DAY),
            interval_minutes: 60,
        }
    }
}

impl RetentionConfig {
    /// `(class, period)` for every class, in a fixed order.
    pub fn classes(&self) -> [(&'static str, Period); 8] {
        [
            ("transcripts", self.transcripts),
            ("tool_output", self.tool_output),
            ("attachments", self.attachments),
            ("audit_payloads", self.audit_payloads),
            ("approvals", self.approvals),
            ("chat", self.chat),
            ("workflows", self.workflows),
            ("automation", self.automation),
        ]
    }
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

    #[test]
    fn the_template_parses_to_the_defaults() {
        #[derive(Deserialize)]
        struct W {
            retention: RetentionConfig,
        }
        let w: W = toml::from_str(TEMPLATE).unwrap();
        assert_eq!(w.retention, RetentionConfig::default());
    }

    #[test]
    fn durations_parse_strictly() {
        assert_eq!(Period::parse("90d").unwrap(), Period::Ms(90 * DAY));
        assert_eq!(Period::parse("12h").unwrap(), Period::Ms(12 * 3_600_000));
        assert_eq!(Period::parse("5m").unwrap(), Period::Ms(300_000));
        assert_eq!(Period::parse("forever").unwrap(), Period::Forever);
        for bad in [
            "",
            "d",
            "90",
            "-1d",
            "1.5d",
            "90 d",
            "90D",
            "Forever",
            "1w",
            "99999999999999999d",
        ] {
            assert!(Period::parse(bad).is_err(), "{bad:?}");
        }
    }
}
