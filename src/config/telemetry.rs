//! The `[telemetry]` section of `chitin.toml`: OpenTelemetry traces over OTLP/HTTP.

use serde::Deserialize;

/// Documentation and defaults for the `[telemetry]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[telemetry]
# OpenTelemetry traces over OTLP/HTTP (protobuf), e.g. "http://127.0.0.1:4318" (an
# OpenTelemetry Collector, Jaeger, Tempo...). Spans are posted to <otlp_endpoint>/v1/traces.
# "" = off: no span is recorded or sent. One trace per inbound HTTP request, WebSocket chat
# turn, channel message, cron firing and outbox delivery; spans carry names, ids, models,
# token counts, costs, actions, decisions, policy ids, exit codes and durations, never tool
# arguments, message text or secret values. Read at start (a change needs a restart).
otlp_endpoint = ""
# The `service.name` resource attribute of every span.
service_name = "chitin"
# The share of new traces that are recorded (0.0 to 1.0); a trace continued from a trusted
# proxy's `traceparent` follows the caller's sampling decision.
sample_ratio = 1.0
# Most finished spans waiting for export. Export runs on its own thread, batched; when the
# collector is slow or down, spans beyond this are dropped (never a slower turn) and counted in
# the metric chitin_otlp_spans_dropped_total.
queue_size = 2048
"#;

/// The `[telemetry]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp_endpoint: String,
    pub service_name: String,
    pub sample_ratio: f64,
    pub queue_size: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "chitin".into(),
            sample_ratio: 1.0,
            queue_size: 2048,
        }
    }
}

impl TelemetryConfig {
    /// Whether traces are exported.
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.trim().is_empty()
    }

    /// The URL spans are posted to: `<otlp_endpoint>/v1/traces` (None when off).
    pub fn traces_url(&self) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        Some(format!(
            "{}/v1/traces",
            self.otlp_endpoint.trim().trim_end_matches('/')
        ))
    }

    pub fn validate(&self) -> Result<(), String> {
        let e = self.otlp_endpoint.trim();
        if !e.is_empty() {
            // Never quote the value: a mistyped line could hold a credential.
            let url = reqwest::Url::parse(e).map_err(|_| {
                "[telemetry] otlp_endpoint must be an http:// or https:// URL such as \"http://127.0.0.1:4318\" (\"\" = off)".to_string()
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err("[telemetry] otlp_endpoint must be an http:// or https:// URL with a host, such as \"http://127.0.0.1:4318\"".into());
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(
                    "[telemetry] otlp_endpoint must not carry a user name or password".into(),
                );
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err("[telemetry] otlp_endpoint is the collector's base URL without a query or fragment (spans go to <otlp_endpoint>/v1/traces)".into());
            }
            if url.path().trim_end_matches('/').ends_with("/v1/traces") {
                return Err("[telemetry] otlp_endpoint is the collector's base URL: leave out /v1/traces, it is added".into());
            }
        }
        let n = &self.service_name;
        if n.trim().is_empty() || n.trim() != n || n.len() > 128 || n.chars().any(char::is_control)
        {
            return Err("[telemetry] service_name must be 1-128 characters without surrounding spaces or control characters".into());
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err("[telemetry] sample_ratio must be between 0.0 and 1.0".into());
        }
        if self.queue_size == 0 || self.queue_size > 1_000_000 {
            return Err("[telemetry] queue_size must be between 1 and 1000000".into());
        }
        Ok(())
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

    #[derive(Debug, Deserialize)]
    struct Wrap {
        telemetry: TelemetryConfig,
    }

    fn parse(text: &str) -> Result<TelemetryConfig, String> {
        let w: Wrap = toml::from_str(text).map_err(|e| e.to_string())?;
        w.telemetry.validate()?;
        Ok(w.telemetry)
    }

    #[test]
    fn the_template_parses_to_the_defaults_and_telemetry_is_off() {
        let c = parse(TEMPLATE).unwrap();
        assert_eq!(c, TelemetryConfig::default());
        assert!(!c.enabled());
        assert_eq!(c.traces_url(), None);
    }

    #[test]
    fn spans_are_posted_to_v1_traces_under_the_endpoint() {
        let c = parse("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318/\"\n").unwrap();
        assert_eq!(
            c.traces_url().as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        let c = parse("[telemetry]\notlp_endpoint = \"https://otel.example/base\"\n").unwrap();
        assert_eq!(
            c.traces_url().as_deref(),
            Some("https://otel.example/base/v1/traces")
        );
    }

    #[test]
    fn a_bad_endpoint_is_refused_without_quoting_it() {
        for bad in [
            "127.0.0.1:4318",
            "ftp://h/",
            "http://u:sk-CANARY@h:4318",
            "http://h:4318/?k=sk-CANARY",
            "http://h:4318/v1/traces",
        ] {
            let e = parse(&format!("[telemetry]\notlp_endpoint = \"{bad}\"\n")).unwrap_err();
            assert!(e.contains("[telemetry] otlp_endpoint"), "{e}");
            assert!(!e.contains("CANARY"), "{e}");
        }
    }

    #[test]
    fn the_sample_ratio_queue_size_and_service_name_are_checked() {
        let e = parse("[telemetry]\nsample_ratio = 1.5\n").unwrap_err();
        assert!(e.contains("sample_ratio"), "{e}");
        let e = parse("[telemetry]\nqueue_size = 0\n").unwrap_err();
        assert!(e.contains("queue_size"), "{e}");
        let e = parse("[telemetry]\nservice_name = \"\"\n").unwrap_err();
        assert!(e.contains("service_name"), "{e}");
        let e = parse("[telemetry]\nendpoint = \"x\"\n").unwrap_err();
        assert!(e.contains("endpoint"), "{e}");
    }
}
