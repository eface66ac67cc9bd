//! Structured JSON logs on stderr, every line passed through the secrets redactor.

use std::io::Write;
use std::sync::{Arc, RwLock};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

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

/// Installs the JSON subscriber (filter from `CHITIN_LOG`, default `info`). A second call is a
/// no-op.
pub fn init(redactor: SharedRedactor) {
    let filter = EnvFilter::try_from_env("CHITIN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(RedactingMakeWriter(redactor))
        .try_init();
}
