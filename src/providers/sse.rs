//! A minimal Server-Sent Events decoder (the subset model APIs use): `event:` and `data:`
//! fields, multi-line data, comments, `\n` / `\r\n` / `\r` line ends, events ended by a blank
//! line. Bytes are buffered until a whole line is there, so UTF-8 split across chunks is fine.

/// One event: its `event:` name (empty when absent) and its `data:` lines joined by `\n`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Incremental decoder.
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    event: String,
    data: String,
    has_data: bool,
}

/// Longest line accepted (a model's single SSE line is far shorter).
pub const MAX_LINE: usize = 4 * 1024 * 1024;

impl SseDecoder {
    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < self.buf.len() {
            let b = self.buf.get(i).copied().unwrap_or(0);
            if b == b'\n' || b == b'\r' {
                // A lone '\r' at the end of the buffer may be followed by '\n' in the next chunk.
                if b == b'\r' && i + 1 == self.buf.len() {
                    break;
                }
                let line = self.buf.get(start..i).unwrap_or_default().to_vec();
                self.line(&line, &mut out)?;
                if b == b'\r' && self.buf.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                start = i + 1;
            }
            i += 1;
        }
        self.buf.drain(..start.min(self.buf.len()));
        if self.buf.len() > MAX_LINE {
            return Err(format!("an SSE line is longer than {MAX_LINE} bytes"));
        }
        Ok(out)
    }

    /// Ends the input: a last event without its blank line is still delivered.
    pub fn finish(&mut self) -> Result<Vec<SseEvent>, String> {
        let mut out = Vec::new();
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, &mut out)?;
        }
        self.line(b"", &mut out)?;
        Ok(out)
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), String> {
        if line.is_empty() {
            if self.has_data {
                out.push(SseEvent {
                    event: std::mem::take(&mut self.event),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| "an SSE line is not UTF-8".to_string())?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.event = value.to_string(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
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

    #[test]
    fn events_split_at_any_byte_are_reassembled() {
        let text = "event: a\r\ndata: {\"x\":\"é\"}\r\n\r\n: comment\ndata: 1\ndata: 2\n\n";
        for split in 0..text.len() {
            let (a, b) = text.as_bytes().split_at(split);
            let mut d = SseDecoder::default();
            let mut ev = d.feed(a).unwrap();
            ev.extend(d.feed(b).unwrap());
            ev.extend(d.finish().unwrap());
            assert_eq!(
                ev,
                vec![
                    SseEvent {
                        event: "a".into(),
                        data: "{\"x\":\"é\"}".into()
                    },
                    SseEvent {
                        event: String::new(),
                        data: "1\n2".into()
                    }
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn a_last_event_without_its_blank_line_is_delivered_at_the_end() {
        let mut d = SseDecoder::default();
        assert!(d.feed(b"data: [DONE]").unwrap().is_empty());
        assert_eq!(d.finish().unwrap().len(), 1);
    }

    #[test]
    fn invalid_utf8_is_an_error_not_a_panic() {
        let mut d = SseDecoder::default();
        assert!(d.feed(b"data: \xff\xfe\n\n").is_err());
    }
}
