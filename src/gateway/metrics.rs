//! Prometheus counters, written out by hand in the text exposition format (version 0.0.4).
//!
//! Every counter is incremented on the code path it names; nothing is sampled or guessed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A counter family with one label.
#[derive(Default)]
struct Family(Mutex<BTreeMap<String, u64>>);

impl Family {
    fn inc(&self, label: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(label.to_string()).or_insert(0) += 1;
        }
    }
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// The gateway's counters.
#[derive(Default)]
pub struct Metrics {
    /// `route\u{0}status` → count.
    requests: Family,
    tool_calls: Family,
    approvals: Family,
    sandbox_kills: Family,
    sandbox_refusals: Family,
    auth_failures: Family,
    policy_reloads: Family,
    checkpoints: AtomicU64,
    ws_connections: Family,
    ws_frames: Family,
    ws_errors: Family,
    ws_open: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// Escapes a label value (`\`, `"` and newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        self.requests.inc(&format!("{route}\u{0}{status}"));
    }
    /// `allow`, `deny`, `approval_required`, `invalid`, `error`.
    pub fn tool_call(&self, decision: &str) {
        self.tool_calls.inc(decision);
    }
    /// `requested`, `redeemed`.
    pub fn approval(&self, event: &str) {
        self.approvals.inc(event);
    }
    /// Which limit killed a sandboxed run (`timeout`, `memory`, `seccomp:<syscall>`, ...).
    pub fn sandbox_kill(&self, reason: &str) {
        self.sandbox_kills.inc(reason);
    }
    /// A tool call refused because the sandbox cannot confine it here (by tool).
    pub fn sandbox_refusal(&self, tool: &str) {
        self.sandbox_refusals.inc(tool);
    }
    /// `missing`, `malformed`, `wrong`, `query_token`, `rate_limited`.
    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.inc(reason);
    }
    /// `ok`, `rejected`.
    pub fn policy_reload(&self, outcome: &str) {
        self.policy_reloads.inc(outcome);
    }
    pub fn checkpoint(&self) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
    /// WebSocket connection outcomes: `upgraded`, `authenticated`, `auth_failed`,
    /// `refused_origin`, `refused_capacity`.
    pub fn ws_connection(&self, outcome: &str) {
        self.ws_connections.inc(outcome);
    }
    /// WebSocket messages by direction (`in`, `out`).
    pub fn ws_frame(&self, direction: &str) {
        self.ws_frames.inc(direction);
    }
    /// WebSocket error responses by error code.
    pub fn ws_error(&self, code: &str) {
        self.ws_errors.inc(code);
    }
    /// A WebSocket connection opened (`true`) or closed (`false`).
    pub fn ws_open(&self, opened: bool) {
        if opened {
            self.ws_open.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self
                .ws_open
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// The exposition text. `audit_appends` is the number of records appended to the audit
    /// chain since the gateway started (head sequence now minus at start).
    pub fn render(&self, audit_appends: Option<u64>) -> String {
        self.render_with(audit_appends, &BTreeMap::new())
    }

    /// [`Self::render`], with the agent's sandbox refusals (by tool) added to the gateway's.
    pub fn render_with(
        &self,
        audit_appends: Option<u64>,
        agent_refusals: &BTreeMap<String, u64>,
    ) -> String {
        let mut refusals = self.sandbox_refusals.snapshot();
        for (k, v) in agent_refusals {
            *refusals.entry(k.clone()).or_insert(0) += v;
        }
        let mut out = String::new();
        let mut family = |name: &str, help: &str, label: &str, values: BTreeMap<String, u64>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            for (k, v) in values {
                let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {v}", esc(&k));
            }
        };
        family(
            "chitin_tool_calls_total",
            "Tool calls by gate decision (invalid: refused before a decision).",
            "decision",
            self.tool_calls.snapshot(),
        );
        family(
            "chitin_approvals_total",
            "Approval requests opened and approvals redeemed through the gateway.",
            "event",
            self.approvals.snapshot(),
        );
        family(
            "chitin_sandbox_kills_total",
            "Sandboxed runs killed by a limit or filter, by reason.",
            "reason",
            self.sandbox_kills.snapshot(),
        );
        family(
            "chitin_sandbox_refusals_total",
            "Tool calls refused because the sandbox cannot enforce its layers here, by tool.",
            "tool",
            refusals,
        );
        family(
            "chitin_auth_failures_total",
            "Refused authentications by reason.",
            "reason",
            self.auth_failures.snapshot(),
        );
        family(
            "chitin_policy_reloads_total",
            "Policy reloads (SIGHUP) by outcome.",
            "outcome",
            self.policy_reloads.snapshot(),
        );
        family(
            "chitin_ws_connections_total",
            "WebSocket connection attempts by outcome.",
            "outcome",
            self.ws_connections.snapshot(),
        );
        family(
            "chitin_ws_frames_total",
            "WebSocket messages by direction.",
            "direction",
            self.ws_frames.snapshot(),
        );
        family(
            "chitin_ws_errors_total",
            "WebSocket error responses by error code.",
            "code",
            self.ws_errors.snapshot(),
        );
        let _ = writeln!(
            out,
            "# HELP chitin_ws_connections_open WebSocket connections open now."
        );
        let _ = writeln!(out, "# TYPE chitin_ws_connections_open gauge");
        let _ = writeln!(
            out,
            "chitin_ws_connections_open {}",
            self.ws_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP chitin_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE chitin_http_requests_total counter");
        for (k, v) in self.requests.snapshot() {
            let (route, status) = k.split_once('\u{0}').unwrap_or((&k, ""));
            let _ = writeln!(
                out,
                "chitin_http_requests_total{{route=\"{}\",status=\"{}\"}} {v}",
                esc(route),
                esc(status)
            );
        }
        let _ = writeln!(
            out,
            "# HELP chitin_audit_checkpoints_total Signed audit checkpoints written since start."
        );
        let _ = writeln!(out, "# TYPE chitin_audit_checkpoints_total counter");
        let _ = writeln!(
            out,
            "chitin_audit_checkpoints_total {}",
            self.checkpoints.load(Ordering::Relaxed)
        );
        if let Some(n) = audit_appends {
            let _ = writeln!(
                out,
                "# HELP chitin_audit_appends_total Records appended to the audit chain since the gateway started."
            );
            let _ = writeln!(out, "# TYPE chitin_audit_appends_total counter");
            let _ = writeln!(out, "chitin_audit_appends_total {n}");
        }
        out
    }
}

/// The OTLP exporter's counters (`[telemetry]`; all zero while tracing is off).
pub fn render_telemetry(c: crate::telemetry::ExportCounts) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP chitin_otlp_spans_dropped_total Trace spans not delivered to the OTLP collector, by reason (queue_full: the collector is slower than the gateway; export_failed: it refused, timed out or is down)."
    );
    let _ = writeln!(out, "# TYPE chitin_otlp_spans_dropped_total counter");
    let _ = writeln!(
        out,
        "chitin_otlp_spans_dropped_total{{reason=\"queue_full\"}} {}",
        c.dropped_queue_full
    );
    let _ = writeln!(
        out,
        "chitin_otlp_spans_dropped_total{{reason=\"export_failed\"}} {}",
        c.dropped_export_failed
    );
    let _ = writeln!(
        out,
        "# HELP chitin_otlp_spans_exported_total Trace spans the OTLP collector accepted."
    );
    let _ = writeln!(out, "# TYPE chitin_otlp_spans_exported_total counter");
    let _ = writeln!(out, "chitin_otlp_spans_exported_total {}", c.exported);
    out
}

/// The audit sink's state and the approval backlog, read at scrape time: `audit_ok` is the
/// audit log's health (a failed sink refuses every audited action), `since_ms` when it
/// failed; `pending` the approvals waiting for a person (`None` when the store cannot be read).
pub fn render_state(audit_ok: bool, since_ms: Option<i64>, pending: Option<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP chitin_audit_sink_up 1 while audit records can be written; 0 while the audit log refuses appends (every audited action is refused)."
    );
    let _ = writeln!(out, "# TYPE chitin_audit_sink_up gauge");
    let _ = writeln!(out, "chitin_audit_sink_up {}", u8::from(audit_ok));
    if let Some(ms) = since_ms {
        let _ = writeln!(
            out,
            "# HELP chitin_audit_sink_failed_since_timestamp_seconds When the audit log started refusing appends."
        );
        let _ = writeln!(
            out,
            "# TYPE chitin_audit_sink_failed_since_timestamp_seconds gauge"
        );
        #[expect(clippy::cast_precision_loss, reason = "a timestamp in seconds")]
        let secs = ms as f64 / 1000.0;
        let _ = writeln!(
            out,
            "chitin_audit_sink_failed_since_timestamp_seconds {secs:.3}"
        );
    }
    if let Some(n) = pending {
        let _ = writeln!(
            out,
            "# HELP chitin_approvals_pending Approval requests waiting for a person (not expired)."
        );
        let _ = writeln!(out, "# TYPE chitin_approvals_pending gauge");
        let _ = writeln!(out, "chitin_approvals_pending {n}");
    }
    out
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
    fn counters_render_in_prometheus_text_format_with_escaped_labels() {
        let m = Metrics::default();
        m.request("/tools/invoke", 200);
        m.request("/tools/invoke", 200);
        m.tool_call("deny");
        m.sandbox_kill("seccomp:\"ptrace\"");
        let text = m.render(Some(7));
        assert!(
            text.contains("chitin_http_requests_total{route=\"/tools/invoke\",status=\"200\"} 2")
        );
        assert!(text.contains("chitin_tool_calls_total{decision=\"deny\"} 1"));
        assert!(text.contains("chitin_sandbox_kills_total{reason=\"seccomp:\\\"ptrace\\\"\"} 1"));
        assert!(text.contains("chitin_audit_appends_total 7"));
        assert!(text.contains("# TYPE chitin_auth_failures_total counter"));
        m.sandbox_refusal("exec");
        assert!(
            m.render(None)
                .contains("chitin_sandbox_refusals_total{tool=\"exec\"} 1")
        );
        let agent = BTreeMap::from([("exec".to_string(), 2), ("read_file".to_string(), 1)]);
        let text = m.render_with(None, &agent);
        assert!(text.contains("chitin_sandbox_refusals_total{tool=\"exec\"} 3"));
        assert!(text.contains("chitin_sandbox_refusals_total{tool=\"read_file\"} 1"));
        let s = render_state(false, Some(1_500), Some(3));
        assert!(s.contains("chitin_audit_sink_up 0\n"));
        assert!(s.contains("chitin_audit_sink_failed_since_timestamp_seconds 1.500\n"));
        assert!(s.contains("chitin_approvals_pending 3\n"));
    }
}
