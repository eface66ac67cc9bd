//! Schedules of cron jobs and the heartbeat: cron expressions (5 fields, or 6 with seconds
//! first) evaluated in an IANA time zone, and fixed intervals (`every = "15m"`).
//!
//! Pure: every function takes the instant it reasons about; nothing here reads the clock.
//!
//! Semantics (documented in the config template):
//! - Fields: `[second] minute hour day-of-month month day-of-week`; each a `*`, a number, a
//!   range `a-b`, a step `*/n`, `a-b/n` or `a/n`, or a comma list of these. Months and days
//!   may be written as names (`JAN`, `MON`); day-of-week 0 and 7 are Sunday. `?` means `*` in
//!   the two day fields. `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly`, `@yearly`
//!   (`@annually`) are the usual shorthands.
//! - As in Vixie cron, when both day fields are restricted a day matches if either matches;
//!   when one of them starts with `*` both must match.
//! - Daylight saving time: a time in a skipped hour runs at the first instant after the gap;
//!   a time in a repeated hour runs once (at its first occurrence).
//! - `every` ticks are aligned to the Unix epoch (`every = "15m"` fires at :00, :15, :30 and
//!   :45 UTC), so they do not drift across restarts.

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;

/// The longest interval `every` accepts (a year and a day).
const MAX_EVERY_MS: i64 = 366 * 24 * 3_600_000;
/// How far ahead a cron expression is searched for its next time (28 years: every
/// day-of-week/date combination repeats within that, so an expression that matches nothing in
/// that span never matches, e.g. `0 0 30 2 *`).
const SEARCH_DAYS: u32 = 28 * 366;

/// A parsed schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression in a time zone.
    Cron {
        expr: CronExpr,
        tz: TimeZone,
        /// As written (for display).
        text: String,
        tz_name: String,
    },
    /// A fixed interval in milliseconds, aligned to the epoch.
    Every { ms: i64, text: String },
}

impl Schedule {
    /// A cron expression evaluated in `timezone` (an IANA name such as `Europe/Berlin`, or
    /// `UTC`).
    pub fn cron(expr: &str, timezone: &str) -> Result<Self, String> {
        let parsed = CronExpr::parse(expr)?;
        let tz = time_zone(timezone)?;
        Ok(Self::Cron {
            expr: parsed,
            tz,
            text: expr.trim().to_string(),
            tz_name: timezone.to_string(),
        })
    }

    /// A fixed interval such as `15m`, `1h30m`, `30s` or `1d`.
    pub fn every(text: &str) -> Result<Self, String> {
        let ms = parse_duration_ms(text)?;
        if ms < 1000 {
            return Err(format!(
                "`every = \"{}\"` is shorter than a second",
                text.escape_default()
            ));
        }
        if ms > MAX_EVERY_MS {
            return Err(format!(
                "`every = \"{}\"` is longer than 366 days; use a cron `schedule`",
                text.escape_default()
            ));
        }
        Ok(Self::Every {
            ms,
            text: text.trim().to_string(),
        })
    }

    /// The first time strictly after `after_ms` (milliseconds since the epoch), if any.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Self::Every { ms, .. } => after_ms
                .div_euclid(*ms)
                .checked_add(1)
                .and_then(|n| n.checked_mul(*ms)),
            Self::Cron { expr, tz, .. } => expr.next_after(tz, after_ms),
        }
    }

    /// The latest time in `(after_ms, now_ms]`, if the schedule has one.
    pub fn latest_between(&self, after_ms: i64, now_ms: i64) -> Option<i64> {
        if now_ms <= after_ms {
            return None;
        }
        match self {
            Self::Every { ms, .. } => {
                let latest = now_ms.div_euclid(*ms).checked_mul(*ms)?;
                (latest > after_ms).then_some(latest)
            }
            Self::Cron { .. } => {
                // Look back over growing windows (an hour, a day, a month, a year, the whole
                // span): the first window with a time in it holds the latest one, and walking
                // forward through it stays short (a sparse schedule has few times in a big
                // window, a dense one is found in a small window).
                const WINDOWS: [i64; 4] = [3_600_000, 86_400_000, 32 * 86_400_000, MAX_EVERY_MS];
                let mut starts: Vec<i64> = WINDOWS
                    .iter()
                    .map(|w| now_ms.saturating_sub(*w).max(after_ms))
                    .collect();
                starts.push(after_ms);
                starts.dedup();
                for start in starts {
                    let mut t = self.next_after(start)?;
                    if t > now_ms {
                        continue;
                    }
                    while let Some(n) = self.next_after(t).filter(|n| *n <= now_ms) {
                        t = n;
                    }
                    return Some(t);
                }
                None
            }
        }
    }

    /// The schedule as configured: `every 15m` or `0 7 * * 1-5 (Europe/Berlin)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Every { text, .. } => format!("every {text}"),
            Self::Cron { text, tz_name, .. } => format!("{text} ({tz_name})"),
        }
    }
}

/// Looks up an IANA time zone in the system's time zone database.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    if name == "UTC" || name.is_empty() {
        return Ok(TimeZone::UTC);
    }
    TimeZone::get(name).map_err(|_| {
        format!(
            "unknown time zone `{}`: use an IANA name such as `Europe/Berlin` or `UTC` (the system's time zone database, package tzdata, must have it)",
            name.escape_default()
        )
    })
}

/// Parses a duration: one or more `<number><unit>` with units `s`, `m`, `h`, `d`
/// (`90s`, `15m`, `1h30m`, `2d`). A bare `0` is zero.
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "invalid duration `{}`: write a number and a unit (s, m, h, d), e.g. \"15m\" or \"1h30m\"",
            text.escape_default()
        )
    };
    if t == "0" {
        return Ok(0);
    }
    if t.is_empty() {
        return Err(bad());
    }
    let mut total: i64 = 0;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: i64 = match c {
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        if digits.is_empty() || digits.len() > 9 {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A parsed cron expression: the allowed values of each field as bit sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CronExpr {
    seconds: u64,
    minutes: u64,
    hours: u64,
    /// Days of the month, bit 1..=31.
    days: u64,
    /// Months, bit 1..=12.
    months: u64,
    /// Days of the week, bit 0 (Sunday) ..= 6.
    weekdays: u64,
    /// The day-of-month field starts with `*` or `?`.
    days_any: bool,
    /// The day-of-week field starts with `*` or `?`.
    weekdays_any: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const WEEKDAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

/// One field's rules: its name for errors, its bounds, and its value names.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// The first name stands for this value.
    names_from: u32,
}

const SECOND: Field = Field {
    name: "second",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
    names_from: 0,
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
    names_from: 0,
};
const DAY: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
    names_from: 0,
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &MONTHS,
    names_from: 1,
};
const WEEKDAY: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &WEEKDAYS,
    names_from: 0,
};

impl Field {
    fn value(&self, s: &str, expr: &str) -> Result<u32, String> {
        let lower = s.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(self.names_from + u32::try_from(i).unwrap_or(0));
        }
        let v: u32 = s
            .parse()
            .ok()
            .filter(|_| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                format!(
                    "invalid cron expression `{}`: `{}` is not a {} value",
                    expr.escape_default(),
                    s.escape_default(),
                    self.name
                )
            })?;
        if v < self.min || v > self.max {
            return Err(format!(
                "invalid cron expression `{}`: {} {v} is out of range {}-{}",
                expr.escape_default(),
                self.name,
                self.min,
                self.max
            ));
        }
        Ok(v)
    }

    /// The bit set of one field's text.
    fn parse(&self, text: &str, expr: &str) -> Result<u64, String> {
        let bad = |why: &str| {
            format!(
                "invalid cron expression `{}`: {} field `{}`: {why}",
                expr.escape_default(),
                self.name,
                text.escape_default()
            )
        };
        let mut bits = 0u64;
        for item in text.split(',') {
            if item.is_empty() {
                return Err(bad("an empty list item"));
            }
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let n: u32 = s
                        .parse()
                        .ok()
                        .filter(|n| *n >= 1 && s.len() <= 2)
                        .ok_or_else(|| bad("the step after `/` must be a number from 1"))?;
                    (r, Some(n))
                }
                None => (item, None),
            };
            // `?` reaches here only in the day fields (refused elsewhere before).
            let (lo, hi) = if range == "*" || range == "?" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                let (a, b) = (self.value(a, expr)?, self.value(b, expr)?);
                if a > b {
                    return Err(bad("a range must go from low to high"));
                }
                (a, b)
            } else {
                let v = self.value(range, expr)?;
                // `a/n` runs from `a` to the end of the field.
                (v, if step.is_some() { self.max } else { v })
            };
            let step = step.unwrap_or(1);
            let mut v = lo;
            while v <= hi {
                bits |= 1u64 << v;
                v += step;
            }
        }
        Ok(bits)
    }
}

impl CronExpr {
    /// Parses 5 fields (`minute hour day-of-month month day-of-week`), 6 fields (a second
    /// first) or a shorthand (`@daily`, ...).
    pub fn parse(expr: &str) -> Result<Self, String> {
        let trimmed = expr.trim();
        let expanded = match trimmed.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *",
            "@monthly" => "0 0 1 * *",
            "@weekly" => "0 0 * * 0",
            "@daily" | "@midnight" => "0 0 * * *",
            "@hourly" => "0 * * * *",
            s if s.starts_with('@') => {
                return Err(format!(
                    "invalid cron expression `{}`: unknown shorthand (use @hourly, @daily, @weekly, @monthly or @yearly)",
                    expr.escape_default()
                ));
            }
            _ => trimmed,
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let (sec, rest) = match fields.len() {
            5 => ("0", &fields[..]),
            6 => (fields[0], &fields[1..]),
            n => {
                return Err(format!(
                    "invalid cron expression `{}`: {n} fields; write 5 (minute hour day-of-month month day-of-week) or 6 (with seconds first)",
                    expr.escape_default()
                ));
            }
        };
        let [minute, hour, day, month, weekday] = [rest[0], rest[1], rest[2], rest[3], rest[4]];
        let any = |f: &str| f.starts_with('*') || f.starts_with('?');
        if sec.contains('?') || minute.contains('?') || hour.contains('?') || month.contains('?') {
            return Err(format!(
                "invalid cron expression `{}`: `?` is only allowed in the day fields",
                expr.escape_default()
            ));
        }
        let mut weekdays = WEEKDAY.parse(weekday, expr)?;
        // 7 is Sunday too.
        if weekdays & (1 << 7) != 0 {
            weekdays = (weekdays & !(1 << 7)) | 1;
        }
        Ok(Self {
            seconds: SECOND.parse(sec, expr)?,
            minutes: MINUTE.parse(minute, expr)?,
            hours: HOUR.parse(hour, expr)?,
            days: DAY.parse(day, expr)?,
            months: MONTH.parse(month, expr)?,
            weekdays,
            days_any: any(day),
            weekdays_any: any(weekday),
        })
    }

    fn has(bits: u64, v: i8) -> bool {
        u32::try_from(v).is_ok_and(|v| v < 64 && bits & (1u64 << v) != 0)
    }

    fn day_matches(&self, d: Date) -> bool {
        let dom = Self::has(self.days, d.day());
        let dow = Self::has(self.weekdays, d.weekday().to_sunday_zero_offset());
        if self.days_any || self.weekdays_any {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first instant strictly after `after_ms` whose wall-clock time in `tz` matches.
    pub fn next_after(&self, tz: &TimeZone, after_ms: i64) -> Option<i64> {
        let ts = jiff::Timestamp::from_millisecond(after_ms).ok()?;
        let start = tz.to_datetime(ts);
        let mut day = start.date();
        for _ in 0..SEARCH_DAYS {
            if !Self::has(self.months, day.month()) {
                day = day.last_of_month().tomorrow().ok()?;
                continue;
            }
            if self.day_matches(day) {
                let first_day = day == start.date();
                for h in 0..24i8 {
                    if !Self::has(self.hours, h) || (first_day && h < start.hour()) {
                        continue;
                    }
                    for m in 0..60i8 {
                        if !Self::has(self.minutes, m)
                            || (first_day && h == start.hour() && m < start.minute())
                        {
                            continue;
                        }
                        for s in 0..60i8 {
                            if !Self::has(self.seconds, s) {
                                continue;
                            }
                            let civil = DateTime::from_parts(day, jiff::civil::time(h, m, s, 0));
                            if civil <= start {
                                continue;
                            }
                            let Ok(at) = tz.to_ambiguous_timestamp(civil).compatible() else {
                                continue;
                            };
                            let ms = at.as_millisecond();
                            if ms > after_ms {
                                return Some(ms);
                            }
                        }
                    }
                }
            }
            day = day.tomorrow().ok()?;
        }
        None
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

    fn at(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn rfc3339(ms: i64) -> String {
        jiff::Timestamp::from_millisecond(ms).unwrap().to_string()
    }

    fn next(expr: &str, tz: &str, after: &str) -> String {
        let s = Schedule::cron(expr, tz).unwrap();
        rfc3339(s.next_after(at(after)).unwrap())
    }

    #[test]
    fn five_field_expressions_fire_on_the_minute_in_their_time_zone() {
        assert_eq!(
            next("0 7 * * 1-5", "UTC", "2026-03-06T07:00:00Z"),
            "2026-03-09T07:00:00Z"
        );
        assert_eq!(
            next("*/15 * * * *", "UTC", "2026-03-06T07:01:30.5Z"),
            "2026-03-06T07:15:00Z"
        );
        // 07:00 in Berlin is 06:00 UTC in winter and 05:00 UTC in summer.
        assert_eq!(
            next("0 7 * * *", "Europe/Berlin", "2026-01-10T12:00:00Z"),
            "2026-01-11T06:00:00Z"
        );
        assert_eq!(
            next("0 7 * * *", "Europe/Berlin", "2026-07-10T12:00:00Z"),
            "2026-07-11T05:00:00Z"
        );
    }

    #[test]
    fn six_fields_put_seconds_first() {
        assert_eq!(
            next("*/20 * * * * *", "UTC", "2026-03-06T07:00:00Z"),
            "2026-03-06T07:00:20Z"
        );
        assert_eq!(
            next("30 0 12 * * *", "UTC", "2026-03-06T12:00:30Z"),
            "2026-03-07T12:00:30Z"
        );
    }

    #[test]
    fn names_lists_ranges_steps_and_shorthands_parse() {
        assert_eq!(
            next("0 9 * JAN,jul MON", "UTC", "2026-02-01T00:00:00Z"),
            "2026-07-06T09:00:00Z"
        );
        assert_eq!(
            next("5-10/5 1 * * *", "UTC", "2026-03-06T01:05:00Z"),
            "2026-03-06T01:10:00Z"
        );
        assert_eq!(
            next("@monthly", "UTC", "2026-03-06T00:00:00Z"),
            "2026-04-01T00:00:00Z"
        );
        assert_eq!(
            next("0 0 * * 7", "UTC", "2026-03-06T00:00:00Z"),
            "2026-03-08T00:00:00Z",
            "7 is Sunday"
        );
        assert_eq!(
            next("0 0 29 2 *", "UTC", "2026-03-06T00:00:00Z"),
            "2028-02-29T00:00:00Z"
        );
    }

    #[test]
    fn both_day_fields_restricted_match_either_and_a_star_makes_both_count() {
        // The 13th or any Friday.
        assert_eq!(
            next("0 0 13 * 5", "UTC", "2026-03-06T00:00:00Z"),
            "2026-03-13T00:00:00Z"
        );
        assert_eq!(
            next("0 0 20 * 5", "UTC", "2026-03-06T00:00:00Z"),
            "2026-03-13T00:00:00Z"
        );
        // `*/2` in the day field: only odd days that are also Fridays.
        assert_eq!(
            next("0 0 */2 * 5", "UTC", "2026-03-06T00:00:00Z"),
            "2026-03-13T00:00:00Z"
        );
    }

    #[test]
    fn a_time_in_the_skipped_hour_runs_after_the_gap_and_a_repeated_hour_runs_once() {
        // Berlin skips 02:00-03:00 on 2026-03-29 (01:00 UTC): 02:30 runs at 03:30 CEST.
        assert_eq!(
            next("30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z"),
            "2026-03-29T01:30:00Z"
        );
        // 2026-10-25 repeats 02:00-03:00: 02:30 runs at its first occurrence only.
        let s = Schedule::cron("30 2 * * *", "Europe/Berlin").unwrap();
        let first = s.next_after(at("2026-10-24T12:00:00Z")).unwrap();
        assert_eq!(rfc3339(first), "2026-10-25T00:30:00Z");
        assert_eq!(
            rfc3339(s.next_after(first).unwrap()),
            "2026-10-26T01:30:00Z"
        );
    }

    #[test]
    fn invalid_expressions_are_refused_with_the_reason() {
        let err = |e: &str| CronExpr::parse(e).unwrap_err();
        assert!(err("* * * *").contains("4 fields"), "{}", err("* * * *"));
        assert!(err("60 * * * *").contains("minute 60 is out of range 0-59"));
        assert!(err("* 24 * * *").contains("hour 24 is out of range 0-23"));
        assert!(err("* * 0 * *").contains("day-of-month 0 is out of range 1-31"));
        assert!(err("* * * 13 *").contains("month 13 is out of range 1-12"));
        assert!(err("* * * * 8").contains("day-of-week 8 is out of range 0-7"));
        assert!(err("* * * * MOO").contains("`MOO` is not a day-of-week value"));
        assert!(err("*/0 * * * *").contains("step"));
        assert!(err("5-1 * * * *").contains("low to high"));
        assert!(err("1,,2 * * * *").contains("empty list item"));
        assert!(err("? * * * *").contains("only allowed in the day fields"));
        assert!(err("@often").contains("unknown shorthand"));
        assert!(
            Schedule::cron("* * * * *", "Mars/Olympus")
                .unwrap_err()
                .contains("unknown time zone `Mars/Olympus`")
        );
    }

    #[test]
    fn an_expression_that_never_matches_has_no_next_time() {
        let s = Schedule::cron("0 0 30 2 *", "UTC").unwrap();
        assert_eq!(s.next_after(at("2026-01-01T00:00:00Z")), None);
    }

    #[test]
    fn every_is_aligned_to_the_epoch_and_parses_compound_durations() {
        let s = Schedule::every("15m").unwrap();
        assert_eq!(
            rfc3339(s.next_after(at("2026-03-06T07:01:00Z")).unwrap()),
            "2026-03-06T07:15:00Z"
        );
        assert_eq!(
            rfc3339(s.next_after(at("2026-03-06T07:15:00Z")).unwrap()),
            "2026-03-06T07:30:00Z"
        );
        assert_eq!(parse_duration_ms("1h30m").unwrap(), 5_400_000);
        assert_eq!(parse_duration_ms("2d").unwrap(), 172_800_000);
        assert_eq!(parse_duration_ms("0").unwrap(), 0);
        for bad in ["", "15", "m", "1.5h", "1w", "-1m", "1 m"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
        assert!(Schedule::every("0s").unwrap_err().contains("shorter"));
        assert!(Schedule::every("400d").unwrap_err().contains("366 days"));
    }

    #[test]
    fn the_latest_time_in_a_span_is_found_for_dense_and_sparse_schedules() {
        let every = Schedule::every("1m").unwrap();
        let (a, now) = (at("2026-03-01T00:00:30Z"), at("2026-03-06T07:01:30Z"));
        assert_eq!(
            rfc3339(every.latest_between(a, now).unwrap()),
            "2026-03-06T07:01:00Z"
        );
        assert_eq!(every.latest_between(now, now), None);
        let dense = Schedule::cron("* * * * *", "UTC").unwrap();
        assert_eq!(
            rfc3339(dense.latest_between(a, now).unwrap()),
            "2026-03-06T07:01:00Z"
        );
        let sparse = Schedule::cron("0 9 1 * *", "UTC").unwrap();
        assert_eq!(
            rfc3339(
                sparse
                    .latest_between(at("2025-01-01T00:00:00Z"), now)
                    .unwrap()
            ),
            "2026-03-01T09:00:00Z"
        );
        assert_eq!(sparse.latest_between(at("2026-03-01T09:00:00Z"), now), None);
    }
}
