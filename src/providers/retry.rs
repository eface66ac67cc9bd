//! Retry timing: exponential backoff with jitter, `retry-after` (seconds or HTTP date), and
//! an injectable [`Sleeper`] so tests neither wait nor depend on timing.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::time::Duration;

/// How often and how long to retry one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries per model, including the first.
    pub max_attempts: u32,
    /// First backoff; doubled on every further retry.
    pub base_ms: u64,
    /// Largest backoff.
    pub max_ms: u64,
    /// Largest wait a server's `retry-after` can impose.
    pub retry_after_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_ms: 500,
            max_ms: 20_000,
            retry_after_max_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (1 = the wait after the first failure). A
    /// server's `retry-after` wins (capped at `retry_after_max_ms`); otherwise
    /// `base * 2^(attempt-1)`, capped at `max_ms`, times a random factor in [0.5, 1].
    pub fn delay(&self, attempt: u32, retry_after_ms: Option<u64>) -> Duration {
        if let Some(ms) = retry_after_ms {
            return Duration::from_millis(ms.min(self.retry_after_max_ms));
        }
        let exp = self
            .base_ms
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(32))
            .min(self.max_ms);
        // Jitter: 50..=100 % of the exponential delay.
        let half = exp / 2;
        let jitter = if half == 0 {
            0
        } else {
            random_u64() % (half + 1)
        };
        Duration::from_millis(exp - half + jitter)
    }
}

/// A random number from the standard library's per-process hash keys (no extra crate;
/// jitter needs no cryptographic quality).
fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish()
}

/// Parses a `retry-after` header: delay-seconds, or an HTTP date (IMF-fixdate, e.g.
/// `Wed, 21 Oct 2026 07:28:00 GMT`) relative to `now_ms`. A date in the past means 0.
pub fn parse_retry_after(value: &str, now_ms: i64) -> Option<u64> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(secs.saturating_mul(1000));
    }
    if let Ok(secs) = v.parse::<f64>() {
        // Negative, NaN and absurdly large values are refused.
        let d = Duration::try_from_secs_f64(secs).ok()?;
        return Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    }
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(v, &fmt).ok()?.assume_utc();
    let at_ms = i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()?;
    Some(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0))
}

/// Waits between retries. Tests inject one that records the waits and returns at once.
pub trait Sleeper: Send + Sync {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The real sleeper (`tokio::time::sleep`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioSleeper;

impl Sleeper for TokioSleeper {
    fn sleep(&self, d: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(tokio::time::sleep(d))
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
    fn retry_after_in_seconds_and_as_an_http_date_are_understood() {
        assert_eq!(parse_retry_after("2", 0), Some(2000));
        assert_eq!(parse_retry_after(" 0.5 ", 0), Some(500));
        // 2026-10-21T07:28:00Z = 1792567680 s.
        let at = 1_792_567_680_000;
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", at - 3000),
            Some(3000)
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2026 07:28:00 GMT", at + 5000),
            Some(0)
        );
        assert_eq!(parse_retry_after("soon", 0), None);
        assert_eq!(parse_retry_after("-3", 0), None);
    }

    #[test]
    fn backoff_grows_exponentially_within_its_jitter_band_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_ms: 100,
            max_ms: 1000,
            retry_after_max_ms: 5000,
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None).as_millis();
            let d3 = p.delay(3, None).as_millis();
            let d9 = p.delay(9, None).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            assert!((200..=400).contains(&d3), "{d3}");
            assert!((500..=1000).contains(&d9), "{d9}");
        }
    }

    #[test]
    fn a_servers_retry_after_wins_but_is_capped() {
        let p = RetryPolicy {
            retry_after_max_ms: 5000,
            ..RetryPolicy::default()
        };
        assert_eq!(p.delay(1, Some(2000)), Duration::from_millis(2000));
        assert_eq!(p.delay(1, Some(3_600_000)), Duration::from_millis(5000));
    }
}
