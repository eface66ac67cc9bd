//! `chitin policy shadow-report`: what the shadow-mode policies would have changed, from the
//! audit log's shadow records (decision `shadow_allow`, `shadow_deny` or
//! `shadow_approval_required`, written by the gate next to each decision they would change).
//! Pure: the caller reads the records and passes them in.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// One shadow record of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowRecord {
    pub seq: i64,
    pub ts_ms: i64,
    pub actor: String,
    pub action: String,
    pub resource: String,
    /// The enforced outcome (`allow`, `deny`, `approval_required`).
    pub enforced: String,
    /// The outcome the shadow policies would have given.
    pub shadow: String,
    /// The shadow policies that would have changed it.
    pub policies: Vec<String>,
}

/// What one shadow policy would have changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowPolicyReport {
    pub policy: String,
    /// Decisions it would have changed.
    pub decisions: usize,
    /// By `"<enforced> -> <shadow>"`.
    pub changes: BTreeMap<String, usize>,
    /// By action.
    pub actions: BTreeMap<String, usize>,
    /// Distinct principals affected.
    pub principals: usize,
    pub first_seq: i64,
    pub last_seq: i64,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// The window's start (unix ms).
    pub since_ms: i64,
    /// Shadow records in the window.
    pub records: usize,
    /// One entry per shadow policy, most decisions first (then by id).
    pub policies: Vec<ShadowPolicyReport>,
}

/// The decision labels of shadow records, and the outcome each names.
pub const SHADOW_LABELS: &[(&str, &str)] = &[
    ("shadow_allow", "allow"),
    ("shadow_deny", "deny"),
    ("shadow_approval_required", "approval_required"),
];

/// The outcome a shadow record's decision label names (`shadow_deny` -> `deny`).
pub fn outcome_of_label(label: &str) -> Option<&'static str> {
    SHADOW_LABELS
        .iter()
        .find(|(l, _)| *l == label)
        .map(|(_, o)| *o)
}

/// Summarizes shadow records (those before `since_ms` are left out).
pub fn report(records: &[ShadowRecord], since_ms: i64) -> ShadowReport {
    let mut by: BTreeMap<String, (ShadowPolicyReport, BTreeSet<String>)> = BTreeMap::new();
    let mut count = 0;
    for r in records.iter().filter(|r| r.ts_ms >= since_ms) {
        count += 1;
        for id in &r.policies {
            let (entry, principals) = by.entry(id.clone()).or_insert_with(|| {
                (
                    ShadowPolicyReport {
                        policy: id.clone(),
                        decisions: 0,
                        changes: BTreeMap::new(),
                        actions: BTreeMap::new(),
                        principals: 0,
                        first_seq: r.seq,
                        last_seq: r.seq,
                        first_ts_ms: r.ts_ms,
                        last_ts_ms: r.ts_ms,
                    },
                    BTreeSet::new(),
                )
            });
            entry.decisions += 1;
            *entry
                .changes
                .entry(format!("{} -> {}", r.enforced, r.shadow))
                .or_insert(0) += 1;
            *entry.actions.entry(r.action.clone()).or_insert(0) += 1;
            principals.insert(r.actor.clone());
            entry.principals = principals.len();
            entry.first_seq = entry.first_seq.min(r.seq);
            entry.last_seq = entry.last_seq.max(r.seq);
            entry.first_ts_ms = entry.first_ts_ms.min(r.ts_ms);
            entry.last_ts_ms = entry.last_ts_ms.max(r.ts_ms);
        }
    }
    let mut policies: Vec<ShadowPolicyReport> = by.into_values().map(|(r, _)| r).collect();
    policies.sort_by(|a, b| {
        b.decisions
            .cmp(&a.decisions)
            .then_with(|| a.policy.cmp(&b.policy))
    });
    ShadowReport {
        since_ms,
        records: count,
        policies,
    }
}

/// Parses a window like `7d`, `24h`, `30m` or `90s` into milliseconds.
pub fn parse_window(s: &str) -> Option<i64> {
    let s = s.trim();
    let unit = s.chars().last()?;
    let n: i64 = s.get(..s.len() - unit.len_utf8())?.parse().ok()?;
    let ms = match unit {
        'd' => 86_400_000,
        'h' => 3_600_000,
        'm' => 60_000,
        's' => 1_000,
        'w' => 7 * 86_400_000,
        _ => return None,
    };
    if n < 0 {
        return None;
    }
    n.checked_mul(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        seq: i64,
        ts_ms: i64,
        actor: &str,
        enforced: &str,
        shadow: &str,
        ids: &[&str],
    ) -> ShadowRecord {
        ShadowRecord {
            seq,
            ts_ms,
            actor: actor.into(),
            action: "exec".into(),
            resource: "Chitin::Tool::\"exec\"".into(),
            enforced: enforced.into(),
            shadow: shadow.into(),
            policies: ids.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    #[test]
    fn windows_are_days_hours_minutes_seconds_or_weeks() {
        assert_eq!(parse_window("7d"), Some(7 * 86_400_000));
        assert_eq!(parse_window("24h"), Some(86_400_000));
        assert_eq!(parse_window("30m"), Some(1_800_000));
        assert_eq!(parse_window("90s"), Some(90_000));
        assert_eq!(parse_window("2w"), Some(14 * 86_400_000));
        for bad in ["", "d", "7", "7y", "-1d", "1.5d", "99999999999999999d"] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_report_counts_each_policy_once_per_decision_and_leaves_out_older_records() {
        let records = [
            rec(1, 100, "a", "allow", "deny", &["t:x"]),
            rec(5, 200, "a", "approval_required", "deny", &["t:x", "t:y"]),
            rec(9, 300, "b", "approval_required", "deny", &["t:x"]),
            rec(12, 400, "b", "allow", "approval_required", &["t:y"]),
        ];
        let r = report(&records, 150);
        assert_eq!(r.records, 3);
        assert_eq!(r.policies.len(), 2);
        let x = &r.policies[0];
        assert_eq!(x.policy, "t:x");
        assert_eq!(x.decisions, 2);
        assert_eq!(
            x.changes,
            BTreeMap::from([("approval_required -> deny".to_string(), 2)])
        );
        assert_eq!((x.principals, x.first_seq, x.last_seq), (2, 5, 9));
        assert_eq!((x.first_ts_ms, x.last_ts_ms), (200, 300));
        let y = &r.policies[1];
        assert_eq!(y.policy, "t:y");
        assert_eq!(y.decisions, 2);
        assert_eq!(y.changes.len(), 2);
        assert_eq!((y.first_seq, y.last_seq), (5, 12));
    }

    #[test]
    fn shadow_labels_name_the_outcome_they_would_give() {
        assert_eq!(outcome_of_label("shadow_deny"), Some("deny"));
        assert_eq!(outcome_of_label("shadow_allow"), Some("allow"));
        assert_eq!(
            outcome_of_label("shadow_approval_required"),
            Some("approval_required")
        );
        assert_eq!(outcome_of_label("deny"), None);
    }
}
