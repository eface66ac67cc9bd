//! Structured JSON logs on stderr, every line passed through the secrets redactor.

use std::io::Write;
use std::sync::{Arc, RwLock};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::telemetry::TelemetryConfig;
use crate::telemetry::{Telemetry, TelemetryError};

use crate::secrets::redact::Redactor;

/// The redactor shared by the gate, the logs and the responses; replaced on SIGHUP.
pub type SharedRedactor = Arc<RwLock<Redactor>>;

/// Redacts `text` with the current redactor (a poisoned lock still redacts).
pub fn redact(r: &SharedRedactor, text: &str) -> String {
    match r.read() {
        Ok(g) => g.redact(text).into_owned(),
        Err(p) => p.into_inner().redact(text).into_owned(),
    }
}

/// Makes one writer per log event.
#[derive(Clone)]
pub struct RedactingMakeWriter(pub SharedRedactor);

/// Writes one formatted event, redacted, to stderr.
pub struct RedactingWriter(SharedRedactor);

impl Write for RedactingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let clean = redact(&self.0, &text);
        std::io::stderr().lock().write_all(clean.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for RedactingMakeWriter {
    type Writer = RedactingWriter;
    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(Arc::clone(&self.0))
    }
}

/// Adds `"trace_id"` and `"span_id"` to a JSON log line written inside a recorded span (only
/// while OpenTelemetry tracing is on), so a log line leads to its trace.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    F: FormatEvent<S, N>,
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace, span)) = crate::telemetry::current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace}\",\"span_id\":\"{span}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

/// Installs the JSON subscriber (filter from `CHITIN_LOG`, default `info`) and, when
/// `[telemetry] otlp_endpoint` is set, the OpenTelemetry exporter (keep the returned
/// [`Telemetry`] until the gateway stops). A second call installs nothing.
pub fn init(
    redactor: SharedRedactor,
    telemetry: &TelemetryConfig,
) -> Result<Option<Telemetry>, TelemetryError> {
    let filter = EnvFilter::try_from_env("CHITIN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(RedactingMakeWriter(redactor))
        .map_event_format(WithTraceIds)
        .with_filter(filter)
        .boxed();
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![fmt];
    let exporter = match crate::telemetry::install::<Registry>(telemetry)? {
        Some((layer, t)) => {
            layers.push(layer);
            Some(t)
        }
        None => None,
    };
    match tracing_subscriber::registry().with(layers).try_init() {
        Ok(()) => Ok(exporter),
        // Already installed (tests): this exporter would never see a span.
        Err(_) => Ok(None),
    }
}
