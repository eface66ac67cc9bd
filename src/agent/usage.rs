//! Spend and tokens, grouped: what `chitin usage` and `GET /api/v1/usage` report, from the
//! `usage` table (one row per model call, with the task that caused it) and the `[budgets]`.
//!
//! Invariants:
//! - Both readers call [`report`]: the CLI and the API cannot disagree.
//! - Only ids, times, models, tools, token counts and costs are read; no content.

use serde::Serialize;

use crate::store::{Dialect, Store, StoreError, params};

/// What caused a model call (stored in `usage.task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A turn from the web chat, the WebSocket, the OpenAI-compatible API or `chitin agent`.
    Chat,
    /// A message from a chat channel (`[[channels]]`).
    Channel,
    /// A cron job's prompt.
    Cron,
    /// An inbound webhook (`[[hooks]]`).
    Webhook,
    /// An `llm.invoke` step of a workflow run.
    Workflow,
}

impl Task {
    pub const ALL: &'static [Self] = &[
        Self::Chat,
        Self::Channel,
        Self::Cron,
        Self::Webhook,
        Self::Workflow,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Channel => "channel",
            Self::Cron => "cron",
            Self::Webhook => "webhook",
            Self::Workflow => "workflow",
        }
    }

    /// The task of an agent run from its `runs.origin` (`channel:<name>:<row>`,
    /// `cron:<job>:<slot>`, `hook:<name>:<delivery>`; none for a chat turn).
    pub fn of_origin(origin: Option<&str>) -> Self {
        match origin {
            Some(o) if o.starts_with("channel:") => Self::Channel,
            Some(o) if o.starts_with("cron:") => Self::Cron,
            Some(o) if o.starts_with("hook:") => Self::Webhook,
            _ => Self::Chat,
        }
    }

    /// The task of a model call: its agent run's origin, or (a call outside any agent run)
    /// a workflow's `llm.invoke`.
    pub fn of_call(run_origin: Option<Option<&str>>) -> Self {
        match run_origin {
            Some(origin) => Self::of_origin(origin),
            None => Self::Workflow,
        }
    }
}

/// How usage is grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageBy {
    User,
    Model,
    Session,
    /// The UTC day (`YYYY-MM-DD`).
    Day,
    /// The tool whose result the call answered (`null`: the first call of a turn).
    Tool,
    /// What caused the call ([`Task`]).
    Task,
}

impl UsageBy {
    pub const NAMES: &'static str = "user, model, session, day, tool or task";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "user" => Self::User,
            "model" => Self::Model,
            "session" => Self::Session,
            "day" => Self::Day,
            "tool" => Self::Tool,
            "task" => Self::Task,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Model => "model",
            Self::Session => "session",
            Self::Day => "day",
            Self::Tool => "tool",
            Self::Task => "task",
        }
    }

    /// The SQL expression of the group key (constant text, never user input).
    const fn column(self) -> &'static str {
        match self {
            Self::User => "user_id",
            Self::Model => "model",
            Self::Session => "session_key",
            Self::Day => "strftime('%Y-%m-%d', at_ms / 1000, 'unixepoch')",
            Self::Tool => "tool",
            Self::Task => "COALESCE(task, 'chat')",
        }
    }

    /// [`Self::column`] on PostgreSQL (the day of a unix-ms time, UTC).
    const fn pg_column(self) -> &'static str {
        match self {
            Self::Day => "to_char(to_timestamp(at_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            other => other.column(),
        }
    }
}

/// One group's totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageGroup {
    /// The user, model, session, day, tool or task (`None`: no tool).
    pub key: Option<String>,
    /// Model calls.
    pub calls: i64,
    /// Distinct runs (agent runs and workflow runs).
    pub runs: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// USD of the priced calls.
    pub cost_usd: f64,
    /// Calls of models without a `[pricing]` entry (their cost is unknown, not zero).
    pub unpriced_calls: i64,
}

/// A user's spend today against their daily budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Budget {
    pub user: String,
    pub spent_today_usd: f64,
    /// `None`: no limit (`[budgets]`).
    pub daily_limit_usd: Option<f64>,
}

/// The answer of [`report`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    pub by: UsageBy,
    /// Only calls at or after this time (unix ms).
    pub since_ms: Option<i64>,
    /// Most expensive first.
    pub groups: Vec<UsageGroup>,
    pub total: UsageGroup,
    /// Every user with calls today (UTC), and every user with a configured budget.
    pub budgets: Vec<Budget>,
}

const DAY_MS: i64 = 86_400_000;

/// Usage since `since_ms`, grouped `by`; budgets as of `now_ms`.
pub fn report(
    store: &Store,
    by: UsageBy,
    since_ms: Option<i64>,
    now_ms: i64,
    budgets: &crate::config::agent::BudgetsConfig,
) -> Result<UsageReport, StoreError> {
    let totals = "COUNT(*), COUNT(DISTINCT run_id), CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), \
                  CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT), COALESCE(SUM(cost_usd), 0.0), \
                  CAST(COALESCE(SUM(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT)";
    let group = |r: &chitin_store::Row, first: usize| -> Result<UsageGroup, StoreError> {
        Ok(UsageGroup {
            key: if first == 0 { None } else { r.get(0)? },
            calls: r.get(first)?,
            runs: r.get(first + 1)?,
            input_tokens: r.get(first + 2)?,
            output_tokens: r.get(first + 3)?,
            cost_usd: r.get(first + 4)?,
            unpriced_calls: r.get(first + 5)?,
        })
    };
    let key = match store.db().dialect() {
        Dialect::Sqlite => by.column(),
        Dialect::Postgres => by.pg_column(),
    };
    let start = now_ms.div_euclid(DAY_MS) * DAY_MS;
    // One transaction: the groups, the total and the budgets read the same rows.
    let (mut groups, total, mut spent) = store.db().tx(|c| {
        let groups: Vec<UsageGroup> = c.query_map(
            &format!(
                "SELECT {key} AS k, {totals} FROM usage WHERE (?1 IS NULL OR at_ms >= ?1) \
                 GROUP BY k ORDER BY 6 DESC, 2 DESC, k"
            ),
            params![since_ms],
            |r| group(r, 1),
        )?;
        let total = group(
            &c.query_row(
                &format!("SELECT {totals} FROM usage WHERE (?1 IS NULL OR at_ms >= ?1)"),
                params![since_ms],
            )?,
            0,
        )?;
        let spent: std::collections::BTreeMap<String, f64> = c
            .query_map(
                "SELECT user_id, COALESCE(SUM(cost_usd), 0.0) FROM usage \
                 WHERE at_ms >= ?1 AND at_ms < ?2 GROUP BY user_id",
                params![start, start + DAY_MS],
                |r| Ok::<_, StoreError>((r.get::<String>(0)?, r.get::<f64>(1)?)),
            )?
            .into_iter()
            .collect();
        Ok::<_, StoreError>((groups, total, spent))
    })?;
    groups.sort_by(|a, b| {
        b.cost_usd
            .total_cmp(&a.cost_usd)
            .then(b.calls.cmp(&a.calls))
            .then(a.key.cmp(&b.key))
    });
    for u in budgets.users.keys() {
        spent.entry(u.clone()).or_insert(0.0);
    }
    let budgets = spent
        .into_iter()
        .map(|(user, spent_today_usd)| Budget {
            daily_limit_usd: budgets.daily_limit_usd(&user),
            user,
            spent_today_usd,
        })
        .collect();
    Ok(UsageReport {
        by,
        since_ms,
        groups,
        total,
        budgets,
    })
}

/// Spend per session key (USD of priced calls), for session lists.
pub fn spend_by_session(
    store: &Store,
) -> Result<std::collections::HashMap<String, f64>, StoreError> {
    store.db().with(|c| {
        Ok(c.query_map(
            "SELECT session_key, COALESCE(SUM(cost_usd), 0.0) FROM usage GROUP BY session_key",
            params![],
            |r| Ok::<_, StoreError>((r.get::<String>(0)?, r.get::<f64>(1)?)),
        )?
        .into_iter()
        .collect())
    })
}

/// What `--since` / `since=` accept.
pub const SINCE_HELP: &str = "since must be a number of days or hours back (`7d`, `12h`), a date (`2026-11-21`, UTC) or an RFC 3339 time (`2026-11-21T08:00:00Z`)";

/// `7d`, `12h`, `2026-11-21` (UTC midnight) or an RFC 3339 time, as unix ms.
pub fn parse_since(s: &str, now_ms: i64) -> Option<i64> {
    let s = s.trim();
    let back = |n: &str, unit: i64| -> Option<i64> {
        let n: i64 = n.parse().ok().filter(|n| *n >= 0)?;
        Some(now_ms.saturating_sub(n.checked_mul(unit)?))
    };
    if let Some(n) = s.strip_suffix('d') {
        return back(n, DAY_MS);
    }
    if let Some(n) = s.strip_suffix('h') {
        return back(n, 3_600_000);
    }
    if s.len() == 10 {
        return crate::clock::parse_rfc3339(&format!("{s}T00:00:00Z"));
    }
    crate::clock::parse_rfc3339(s)
}

/// The wire form of a report (`GET /api/v1/usage`, `chitin usage --json`).
pub fn report_json(r: &UsageReport) -> serde_json::Value {
    serde_json::json!({
        "by": r.by,
        "since": r.since_ms.map(crate::clock::rfc3339),
        "groups": r.groups,
        "total": r.total,
        "budgets": r.budgets,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_runs_origin_names_the_task_that_caused_its_model_calls() {
        assert_eq!(Task::of_call(Some(None)), Task::Chat);
        assert_eq!(Task::of_call(Some(Some("channel:tg:42"))), Task::Channel);
        assert_eq!(Task::of_call(Some(Some("cron:daily:1700"))), Task::Cron);
        assert_eq!(Task::of_call(Some(Some("hook:gh:abc"))), Task::Webhook);
        assert_eq!(Task::of_call(None), Task::Workflow);
    }

    /// Stores content as it is (the tests read no content).
    struct Plain;

    impl crate::agent::Sealer for Plain {
        fn seal(&self, _: &str, p: &[u8]) -> Result<Vec<u8>, String> {
            Ok(p.to_vec())
        }
        fn open(&self, _: &str, s: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
            Ok(zeroize::Zeroizing::new(s.to_vec()))
        }
    }

    #[test]
    fn each_model_call_is_recorded_with_its_task_and_reported_by_task_user_model_and_day() {
        let dir = tempfile::tempdir().unwrap();
        calls_are_reported(std::sync::Arc::new(
            Store::open(&dir.path().join("state.db")).unwrap(),
        ));
    }

    #[test]
    fn each_model_call_is_recorded_and_reported_the_same_on_postgres() {
        let pg = chitin_store::testing::TestPg::new().unwrap();
        calls_are_reported(std::sync::Arc::new(Store::from_db(pg.db().unwrap())));
    }

    fn calls_are_reported(store: std::sync::Arc<Store>) {
        use crate::agent::transcripts::UsageRow;
        let t = crate::agent::Transcripts::new(
            std::sync::Arc::clone(&store),
            std::sync::Arc::new(Plain),
        );
        let now = 3 * DAY_MS + 1000;
        let turns = [
            ("r-chat", "web-1", "alice", None),
            ("r-chan", "channel:tg:dm:1", "alice", Some("channel:tg:7")),
            ("r-cron", "cron:daily", "bob", Some("cron:daily:100")),
            ("r-hook", "hook:gh", "bob", Some("hook:gh:d1")),
        ];
        for (run, session, user, origin) in turns {
            let m = crate::agent::Stored::User {
                text: "hi".into(),
                from: user.into(),
                untrusted: false,
            };
            t.begin_turn(session, user, "test", run, origin, &m, false, now)
                .unwrap();
        }
        let call = |run: &str, session: &str, user: &str, model: &str, cost: Option<f64>| {
            t.record_usage(&UsageRow {
                at_ms: now,
                user,
                session,
                run_id: run,
                model,
                tool: None,
                input_tokens: 100,
                output_tokens: 10,
                cost_usd: cost,
            })
            .unwrap();
        };
        call("r-chat", "web-1", "alice", "p/a", Some(1.0));
        call("r-chat", "web-1", "alice", "p/a", Some(1.0));
        call("r-chan", "channel:tg:dm:1", "alice", "p/a", Some(0.5));
        call("r-cron", "cron:daily", "bob", "p/b", Some(0.25));
        call("r-hook", "hook:gh", "bob", "p/b", None);
        // A workflow's `llm.invoke`: its run is a workflow run, not an agent run.
        call("wf-1", "wf-session", "bob", "p/b", Some(0.125));
        let budgets = crate::config::agent::BudgetsConfig {
            daily_usd_per_user: 5.0,
            ..Default::default()
        };
        let by_task = report(&store, UsageBy::Task, None, now, &budgets).unwrap();
        let keys: Vec<(Option<&str>, i64, f64)> = by_task
            .groups
            .iter()
            .map(|g| (g.key.as_deref(), g.calls, g.cost_usd))
            .collect();
        assert_eq!(
            keys,
            vec![
                (Some("chat"), 2, 2.0),
                (Some("channel"), 1, 0.5),
                (Some("cron"), 1, 0.25),
                (Some("workflow"), 1, 0.125),
                (Some("webhook"), 1, 0.0),
            ]
        );
        assert_eq!(by_task.groups[4].unpriced_calls, 1);
        assert_eq!(by_task.total.calls, 6);
        assert_eq!(by_task.total.runs, 5);
        assert_eq!(by_task.total.cost_usd, 2.875);
        let by_user = report(&store, UsageBy::User, None, now, &budgets).unwrap();
        assert_eq!(by_user.groups[0].key.as_deref(), Some("alice"));
        assert_eq!(by_user.groups[0].cost_usd, 2.5);
        assert_eq!(
            by_user.budgets,
            vec![
                Budget {
                    user: "alice".into(),
                    spent_today_usd: 2.5,
                    daily_limit_usd: Some(5.0)
                },
                Budget {
                    user: "bob".into(),
                    spent_today_usd: 0.375,
                    daily_limit_usd: Some(5.0)
                },
            ]
        );
        let by_day = report(&store, UsageBy::Day, None, now, &budgets).unwrap();
        assert_eq!(by_day.groups[0].key.as_deref(), Some("1970-01-04"));
        // Nothing since tomorrow.
        let later = report(&store, UsageBy::Model, Some(now + DAY_MS), now, &budgets).unwrap();
        assert!(later.groups.is_empty());
        assert_eq!(later.total.calls, 0);
        let spend = spend_by_session(&store).unwrap();
        assert_eq!(spend["web-1"], 2.0);
        // The run rows carry their origin, so a run's task is known too.
        assert_eq!(
            Task::of_origin(t.run("r-cron").unwrap().origin.as_deref()),
            Task::Cron
        );
    }

    #[test]
    fn since_takes_days_hours_dates_and_times() {
        let now = 10 * DAY_MS;
        assert_eq!(parse_since("7d", now), Some(3 * DAY_MS));
        assert_eq!(parse_since("12h", now), Some(now - 12 * 3_600_000));
        assert_eq!(parse_since("1970-01-02", now), Some(DAY_MS));
        assert_eq!(
            parse_since("1970-01-02T00:00:01Z", now),
            Some(DAY_MS + 1000)
        );
        assert_eq!(parse_since("-1d", now), None);
        assert_eq!(parse_since("soon", now), None);
    }

    #[test]
    fn only_the_documented_groupings_parse() {
        for by in ["user", "model", "session", "day", "tool", "task"] {
            assert_eq!(UsageBy::parse(by).unwrap().as_str(), by);
        }
        assert_eq!(UsageBy::parse("user_id; DROP TABLE usage"), None);
    }
}
