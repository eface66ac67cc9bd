//! Helpers shared by the benchmarks: percentiles and process CPU time.
#![allow(dead_code, reason = "each benchmark uses a different part")]

use std::time::Duration;

/// The `p` percentile (0.0–1.0) of sorted durations (zero when empty).
pub fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let last = sorted.len() - 1;
    let i = ((last as f64) * p).round() as usize;
    sorted.get(i.min(last)).copied().unwrap_or_default()
}

/// CPU time (user + system, all threads) of process `pid` (`"self"` for this one) in seconds,
/// from `/proc/PID/stat`.
pub fn cpu_seconds_of(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // rest starts at field 3 (index 0), so field n is index n - 3; 100 ticks per second.
    (ticks(11) + ticks(12)) / 100.0
}

/// This process's CPU time in seconds.
pub fn cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// On-CPU time of every live thread of this process in seconds, from
/// `/proc/self/task/*/schedstat` (nanoseconds, unlike the 10 ms ticks of `/proc/PID/stat`;
/// threads that exited are not counted, so measure across windows where none exit).
pub fn cpu_seconds_fine() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in dir.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}
