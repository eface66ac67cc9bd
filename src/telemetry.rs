//! OpenTelemetry traces over OTLP/HTTP (protobuf): `[telemetry] otlp_endpoint`.
//!
//! The gateway instruments with `tracing` spans (`request`, `ws.request`, `channel.receive`,
//! `channel.message`, `cron.fire`, `outbox.deliver`, `agent.turn`, `model.call`,
//! `gate.decision`, `tool.run`); [`install`] bridges them to OpenTelemetry with
//! `tracing-opentelemetry` and exports them with `opentelemetry-otlp`.
//!
//! Invariants:
//! - Off unless `otlp_endpoint` is set: then no OpenTelemetry layer exists at all.
//! - A finished span is handed to a bounded queue with `try_send`: never a wait, never an
//!   error on the path of a turn. A full queue drops the span and counts it; the export runs
//!   batched on its own thread (with its own runtime), so a slow or dead collector never
//!   slows or fails anything else. Spans of a failed export are dropped and counted too
//!   (`chitin_otlp_spans_dropped_total{reason}`).
//! - Only spans of this crate are exported, and no log event (events could carry text the
//!   log redactor would have removed); span fields are chosen at their call sites and never
//!   hold tool arguments, message text or secret values.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter as _};
use tokio::sync::mpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::telemetry::TelemetryConfig;

/// Most spans in one export request.
const MAX_BATCH: usize = 512;
/// How long a started batch waits for more spans before it is sent.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// The deadline of one export request (retries included).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the gateway's shutdown waits for the last spans to be sent.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// Errors of setting up the exporter.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "[telemetry] otlp_endpoint: the OTLP exporter could not be set up ({0}); fix the URL or set otlp_endpoint = \"\" to turn tracing off"
    )]
    Exporter(String),
    #[error("[telemetry]: the export thread could not be started ({0})")]
    Thread(String),
}

static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);

/// What the exporter did so far (process-wide), for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCounts {
    /// Spans dropped because the queue was full (the collector is slower than the gateway).
    pub dropped_queue_full: u64,
    /// Spans dropped because their export failed (collector down, refused, timed out).
    pub dropped_export_failed: u64,
    /// Spans the collector accepted.
    pub exported: u64,
}

/// The process-wide export counters.
pub fn counts() -> ExportCounts {
    ExportCounts {
        dropped_queue_full: DROPPED_QUEUE_FULL.load(Ordering::Relaxed),
        dropped_export_failed: DROPPED_EXPORT_FAILED.load(Ordering::Relaxed),
        exported: EXPORTED.load(Ordering::Relaxed),
    }
}

/// Hands finished spans to the export thread without ever waiting.
#[derive(Debug)]
struct QueueProcessor {
    tx: Mutex<Option<mpsc::Sender<SpanData>>>,
}

impl opentelemetry_sdk::trace::SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        let sent = match self.tx.lock() {
            Ok(g) => g.as_ref().map(|tx| tx.try_send(span).is_ok()),
            Err(p) => p.into_inner().as_ref().map(|tx| tx.try_send(span).is_ok()),
        };
        if sent != Some(true) {
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // Closing the queue lets the export thread send what it holds and stop.
        match self.tx.lock() {
            Ok(mut g) => drop(g.take()),
            Err(p) => drop(p.into_inner().take()),
        }
        Ok(())
    }
}

/// The exporter: spans are recorded and queued from [`install`] on, and sent once
/// [`Telemetry::start`] has the export headers (released from the secret store after the
/// gate exists). Keep it until the gateway stops, then [`Telemetry::shutdown`] (or drop it)
/// to send the last spans.
pub struct Telemetry {
    provider: SdkTracerProvider,
    /// The queue and the exporter's settings until [`Telemetry::start`].
    pending: Option<Pending>,
    thread: Option<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<()>)>,
}

struct Pending {
    rx: mpsc::Receiver<SpanData>,
    url: String,
    resource: opentelemetry_sdk::Resource,
}

impl Telemetry {
    /// Starts sending the queued and future spans, with `headers` on every export request
    /// (the configured ones, secret values already released; `OTEL_EXPORTER_OTLP_HEADERS` is
    /// added by the exporter). Once only: a second call does nothing.
    pub fn start(
        &mut self,
        headers: Vec<(String, zeroize::Zeroizing<String>)>,
    ) -> Result<(), TelemetryError> {
        let Some(Pending { rx, url, resource }) = self.pending.take() else {
            return Ok(());
        };
        // Our own client: no proxy from the environment, no redirects, a deadline.
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        // The exporter keeps its headers as plain strings for the life of the process.
        let headers: std::collections::HashMap<String, String> = headers
            .into_iter()
            .map(|(k, v)| (k, v.as_str().to_string()))
            .collect();
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(headers)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        exporter.set_resource(&resource);
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("chitin-otlp".into())
            .spawn(move || {
                export_loop(exporter, rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| TelemetryError::Thread(e.to_string()))?;
        self.thread = Some((thread, done));
        Ok(())
    }

    /// Sends what is queued (waiting at most a few seconds) and stops the export thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.provider.shutdown();
        // Never started (the gateway stopped during start-up): the queued spans go nowhere.
        if let Some(p) = self.pending.take() {
            let mut rx = p.rx;
            rx.close();
            while rx.try_recv().is_ok() {
                DROPPED_EXPORT_FAILED.fetch_add(1, Ordering::Relaxed);
            }
        }
        let Some((thread, done)) = self.thread.take() else {
            return;
        };
        // A thread still sending after the wait is left to the process's exit.
        if done.recv_timeout(SHUTDOWN_WAIT).is_ok() {
            let _ = thread.join();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The OpenTelemetry layer for the subscriber and its exporter, or `None` when
/// `otlp_endpoint` is empty. Only this crate's spans reach the layer (no events).
pub fn install<S>(
    config: &TelemetryConfig,
) -> Result<Option<(BoxedLayer<S>, Telemetry)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let Some(url) = config.traces_url() else {
        return Ok(None);
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let (tx, rx) = mpsc::channel::<SpanData>(config.queue_size.max(1));
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor {
            tx: Mutex::new(Some(tx)),
        })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(resource.clone())
        .build();
    let tracer = provider.tracer("chitin");
    let only_our_spans = tracing_subscriber::filter::filter_fn(|m| {
        m.is_span() && m.target().starts_with("chitin") && *m.level() <= tracing::Level::INFO
    });
    use tracing_subscriber::Layer as _;
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_filter(only_our_spans)
        .boxed();
    Ok(Some((
        layer,
        Telemetry {
            provider,
            pending: Some(Pending { rx, url, resource }),
            thread: None,
        },
    )))
}

/// A boxed subscriber layer.
pub type BoxedLayer<S> = Box<dyn tracing_subscriber::Layer<S> + Send + Sync + 'static>;

/// Collects spans into batches and exports them, on the export thread's own runtime, until
/// the queue is closed and empty.
fn export_loop(exporter: opentelemetry_otlp::SpanExporter, mut rx: mpsc::Receiver<SpanData>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "the OTLP export thread has no runtime; spans are dropped");
            while let Some(_span) = rx.blocking_recv() {
                DROPPED_EXPORT_FAILED.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let exporter = Arc::new(exporter);
    rt.block_on(async move {
        let mut warned = false;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + BATCH_DELAY;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(s)) => batch.push(s),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = u64::try_from(batch.len()).unwrap_or(u64::MAX);
            let sent = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await;
            match sent {
                Ok(Ok(())) => {
                    EXPORTED.fetch_add(n, Ordering::Relaxed);
                    if warned {
                        tracing::info!("OTLP export works again");
                        warned = false;
                    }
                }
                Ok(Err(e)) => {
                    DROPPED_EXPORT_FAILED.fetch_add(n, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(error = %e, spans = n, "OTLP export failed; spans are dropped and counted in chitin_otlp_spans_dropped_total until it works again");
                        warned = true;
                    }
                }
                Err(_) => {
                    DROPPED_EXPORT_FAILED.fetch_add(n, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(spans = n, "OTLP export timed out; spans are dropped and counted in chitin_otlp_spans_dropped_total until it works again");
                        warned = true;
                    }
                }
            }
        }
    });
}

/// The trace id and span id (hex) of the current span, when it is recorded (sampled).
pub fn current_ids() -> Option<(String, String)> {
    let span = tracing::Span::current();
    if span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled())
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Links `span` (new, not entered yet) to the current span: a message's own trace pointing at
/// the poll or webhook request that brought it in. Nothing when tracing is off.
pub fn link_to_current(span: &tracing::Span) {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// Continues the trace of a W3C `traceparent` header (`00-<trace id>-<parent id>-<flags>`) in
/// `span`, which must be new (not entered yet). Only for headers of trusted callers: the
/// caller decides that. A malformed header is ignored.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    let Some(sc) = parse_traceparent(traceparent) else {
        return;
    };
    let cx = opentelemetry::Context::new().with_remote_span_context(sc);
    let _ = span.set_parent(cx);
}

fn parse_traceparent(v: &str) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    let mut parts = v.trim().split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    // Version 00 has exactly four fields; a later version may add fields after them.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(parent).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
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
    fn a_well_formed_traceparent_is_read_and_a_malformed_one_ignored() {
        let sc =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn with_no_endpoint_nothing_is_installed() {
        let r = install::<tracing_subscriber::Registry>(&TelemetryConfig::default()).unwrap();
        assert!(r.is_none());
    }
}
