//! Cost of a call from the `[pricing]` table, and a user's spend today from recorded usage
//! (the gateway persists the records; this is the arithmetic).

use crate::config::providers::PricingConfig;

use super::Usage;

/// USD for `usage` on `model` (`provider/model`), or `None` when the model has no price.
pub fn cost_usd(pricing: &PricingConfig, model: &str, usage: Usage) -> Option<f64> {
    let p = pricing.get(model)?;
    // u64 -> f64 loses precision only above 2^53 tokens.
    let (i, o) = (usage.input_tokens as f64, usage.output_tokens as f64);
    Some((i * p.input_per_mtok + o * p.output_per_mtok) / 1_000_000.0)
}

/// One priced call, as the gateway records it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub user: String,
    /// When the call finished, unix ms (from [`crate::clock::Clock`]).
    pub at_ms: i64,
    pub model: String,
    pub usage: Usage,
    /// `None` when the model had no price (not counted against the budget).
    pub cost_usd: Option<f64>,
}

impl UsageRecord {
    /// The record of one answered call, for the gateway to persist.
    pub fn from_response(user: &str, at_ms: i64, resp: &super::ChatResponse) -> Self {
        Self {
            user: user.into(),
            at_ms,
            model: resp.model.clone(),
            usage: resp.usage,
            cost_usd: resp.cost_usd,
        }
    }
}

const DAY_MS: i64 = 86_400_000;

/// What `user` spent on the UTC day containing `now_ms`.
pub fn spend_today_usd(records: &[UsageRecord], user: &str, now_ms: i64) -> f64 {
    let day = now_ms.div_euclid(DAY_MS);
    records
        .iter()
        .filter(|r| r.user == user && r.at_ms.div_euclid(DAY_MS) == day)
        .filter_map(|r| r.cost_usd)
        .sum()
}

/// Whether `user` may start another call today under `[budgets]`: `Ok(remaining)` (infinite
/// when unlimited) or `Err` with a message for the user.
pub fn check_budget(
    budgets: &crate::config::agent::BudgetsConfig,
    records: &[UsageRecord],
    user: &str,
    now_ms: i64,
) -> Result<f64, String> {
    let Some(limit) = budgets.daily_limit_usd(user) else {
        return Ok(f64::INFINITY);
    };
    let spent = spend_today_usd(records, user, now_ms);
    if spent >= limit {
        Err(format!(
            "the daily model budget of {limit:.2} USD is used up ({spent:.2} USD spent today, UTC); \
             it resets at 00:00 UTC"
        ))
    } else {
        Ok(limit - spent)
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
    use crate::config::agent::BudgetsConfig;
    use crate::config::providers::ModelPrice;

    fn rec(user: &str, at_ms: i64, cost: Option<f64>) -> UsageRecord {
        UsageRecord {
            user: user.into(),
            at_ms,
            model: "a/m".into(),
            usage: Usage::default(),
            cost_usd: cost,
        }
    }

    #[test]
    fn cost_is_tokens_times_the_price_per_million() {
        let mut p = PricingConfig::default();
        p.0.insert(
            "anthropic/claude-sonnet-4-5".into(),
            ModelPrice {
                input_per_mtok: 3.0,
                output_per_mtok: 15.0,
            },
        );
        let u = Usage {
            input_tokens: 2_000_000,
            output_tokens: 100_000,
        };
        let c = cost_usd(&p, "anthropic/claude-sonnet-4-5", u).unwrap();
        assert!((c - 7.5).abs() < 1e-9, "{c}");
        assert_eq!(cost_usd(&p, "local/llama3.1", u), None);
    }

    #[test]
    fn spend_today_counts_only_this_users_calls_of_this_utc_day() {
        let day = 20_000 * DAY_MS;
        let records = vec![
            rec("alice", day + 10, Some(1.0)),
            rec("alice", day + DAY_MS - 1, Some(0.5)),
            rec("alice", day - 1, Some(100.0)),
            rec("alice", day + DAY_MS, Some(100.0)),
            rec("bob", day + 5, Some(100.0)),
            rec("alice", day + 7, None),
        ];
        let s = spend_today_usd(&records, "alice", day + 1000);
        assert!((s - 1.5).abs() < 1e-9, "{s}");
    }

    #[test]
    fn a_user_over_the_daily_budget_is_refused_and_others_are_not() {
        let mut b = BudgetsConfig {
            daily_usd_per_user: 2.0,
            ..BudgetsConfig::default()
        };
        b.users.insert("vip".into(), 0.0);
        let now = 20_000 * DAY_MS + 5;
        let records = vec![rec("alice", now, Some(2.5)), rec("vip", now, Some(50.0))];
        let e = check_budget(&b, &records, "alice", now).unwrap_err();
        assert!(e.contains("2.00 USD"), "{e}");
        let left = check_budget(&b, &records, "bob", now).unwrap();
        assert!((left - 2.0).abs() < 1e-9);
        assert!(
            check_budget(&b, &records, "vip", now)
                .unwrap()
                .is_infinite()
        );
    }
}
