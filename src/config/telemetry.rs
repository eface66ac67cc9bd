//! The `[telemetry]` section of `chitin.toml`: OpenTelemetry traces over OTLP/HTTP.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::secret_ref::{SecretName, header_secret_parts, is_header_name};

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
# Headers sent with every export, e.g. the collector's credentials. A credential is never
# written here: "secret:NAME" or "<Scheme> secret:NAME" names a secret of the store, released
# at start by Cedar `secret.use` (principal Chitin::Gateway::"telemetry", host = the
# endpoint's host, which must be in the secret's audience: `chitin secrets set NAME
# --audience HOST`). Plain values only for headers that carry no credential (a tenant id).
# The standard OTEL_EXPORTER_OTLP_HEADERS variable is honoured too.
# headers = { Authorization = "Bearer secret:otlp_token", "X-Scope-OrgID" = "team-a" }
"#;

/// Headers the exporter sets itself.
const RESERVED_HEADERS: [&str; 6] = [
    "host",
    "content-type",
    "content-length",
    "content-encoding",
    "connection",
    "transfer-encoding",
];

/// Header names whose value is a credential: only a secret reference is accepted.
fn credential_header(lower: &str) -> bool {
    lower == "authorization"
        || lower == "proxy-authorization"
        || [
            "key",
            "token",
            "secret",
            "auth",
            "password",
            "cookie",
            "signature",
        ]
        .iter()
        .any(|w| lower.contains(w))
}

/// One configured export header: a plain value, or a secret to release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderValue {
    Plain(String),
    /// Sent as `prefix` followed by the secret's value.
    Secret {
        prefix: String,
        name: SecretName,
    },
}

/// The `[telemetry]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub otlp_endpoint: String,
    pub service_name: String,
    pub sample_ratio: f64,
    pub queue_size: usize,
    /// Export headers, name → `secret:NAME`, `<Scheme> secret:NAME` or a plain value.
    pub headers: BTreeMap<String, String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "chitin".into(),
            sample_ratio: 1.0,
            queue_size: 2048,
            headers: BTreeMap::new(),
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

    /// The endpoint's host (lower case), the audience a header secret must name.
    pub fn endpoint_host(&self) -> Option<String> {
        reqwest::Url::parse(self.otlp_endpoint.trim())
            .ok()?
            .host_str()
            .map(|h| {
                h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            })
    }

    /// The configured headers, parsed (after [`TelemetryConfig::validate`]).
    pub fn parsed_headers(&self) -> Result<Vec<(String, HeaderValue)>, String> {
        self.headers
            .iter()
            .map(|(k, v)| parse_header(k, v).map(|h| (k.clone(), h)))
            .collect()
    }

    pub fn validate(&self) -> Result<(), String> {
        self.parsed_headers()?;
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

fn parse_header(name: &str, value: &str) -> Result<HeaderValue, String> {
    let lower = name.to_ascii_lowercase();
    if !is_header_name(name) {
        return Err(format!(
            "[telemetry] headers: `{}` is not a header name",
            name.escape_default()
        ));
    }
    if RESERVED_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "[telemetry] headers: `{name}` is set by the exporter and cannot be configured"
        ));
    }
    if let Some((prefix, secret)) = header_secret_parts(value) {
        let name_ok = SecretName::parse(secret)
            .map_err(|_| format!("[telemetry] headers: `{name}` names an invalid secret"))?;
        return Ok(HeaderValue::Secret {
            prefix: prefix.to_string(),
            name: name_ok,
        });
    }
    // Never quote the value: it could be a mistyped credential.
    if credential_header(&lower) {
        return Err(format!(
            "[telemetry] headers: `{name}` carries a credential and must be \"secret:NAME\" or \"<Scheme> secret:NAME\" (e.g. \"Bearer secret:otlp_token\"); store it with `chitin secrets set NAME --audience <collector host>`"
        ));
    }
    if value.is_empty() || value.chars().any(char::is_control) || value.len() > 1024 {
        return Err(format!(
            "[telemetry] headers: `{name}` must be 1-1024 characters without control characters"
        ));
    }
    Ok(HeaderValue::Plain(value.to_string()))
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

    #[test]
    fn export_headers_take_secret_references_and_plain_values_only_where_no_credential_goes() {
        let c = parse(
            "[telemetry]\notlp_endpoint = \"http://Collector.Example:4318\"\nheaders = { Authorization = \"Bearer secret:otlp_token\", \"X-Scope-OrgID\" = \"team-a\", x-api-key = \"secret:k\" }\n",
        )
        .unwrap();
        assert_eq!(c.endpoint_host().as_deref(), Some("collector.example"));
        let h = c.parsed_headers().unwrap();
        assert_eq!(
            h,
            vec![
                (
                    "Authorization".to_string(),
                    HeaderValue::Secret {
                        prefix: "Bearer ".into(),
                        name: SecretName::parse("otlp_token").unwrap()
                    }
                ),
                (
                    "X-Scope-OrgID".to_string(),
                    HeaderValue::Plain("team-a".into())
                ),
                (
                    "x-api-key".to_string(),
                    HeaderValue::Secret {
                        prefix: String::new(),
                        name: SecretName::parse("k").unwrap()
                    }
                ),
            ]
        );
        for (line, want) in [
            (
                "headers = { Authorization = \"Bearer sk-CANARY\" }",
                "carries a credential",
            ),
            (
                "headers = { X-Api-Token = \"sk-CANARY\" }",
                "carries a credential",
            ),
            (
                "headers = { Content-Type = \"secret:x\" }",
                "set by the exporter",
            ),
            ("headers = { \"bad name\" = \"v\" }", "not a header name"),
            ("headers = { X-Tenant = \"\" }", "1-1024 characters"),
            (
                "headers = { Authorization = \"secret:\" }",
                "invalid secret",
            ),
        ] {
            let e = parse(&format!("[telemetry]\n{line}\n")).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
            assert!(!e.contains("CANARY"), "{e}");
        }
    }
}
