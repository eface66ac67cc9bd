//! Exact-value redaction and leak detection.
//!
//! A [`Redactor`] is built from the current secret values. It replaces each value, and each
//! encoded form of it, with `[REDACTED:NAME]`:
//! - the raw bytes, and the JSON-string-escaped form when escaping changes it;
//! - base64 (standard and URL-safe alphabets, with and without padding), and the part of the
//!   base64 text that is fixed whatever bytes come before or after the value (so
//!   `base64("prefix" + SECRET + "suffix")` is caught too);
//! - hex, lower and upper case;
//! - percent-encoding (every non-alphanumeric byte escaped, and RFC 3986 unreserved
//!   characters left as is), upper and lower case hex digits.
//!
//! Matching is multi-pattern Aho-Corasick, leftmost-longest, over exact values: no entropy
//! guessing, no false positives beyond text that really equals an encoding of a secret.

use std::borrow::Cow;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use zeroize::Zeroizing;

use super::{SecretName, SecretValue};

/// RFC 3986 unreserved characters stay, everything else is escaped (`encodeURIComponent`-like).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Shortest encoded fragment used as a pattern; shorter fragments would match ordinary text.
const MIN_PATTERN: usize = 6;

/// Replaces secret values (and their encodings) with `[REDACTED:NAME]`.
///
/// The automaton holds the patterns in memory for as long as the redactor lives; it is not
/// zeroized (aho-corasick owns that memory).
pub struct Redactor {
    ac: Option<AhoCorasick>,
    /// For each pattern, the replacement text `[REDACTED:NAME]`.
    replacement: Vec<String>,
    max_len: usize,
}

impl Redactor {
    /// A redactor that knows no secrets (passes text through).
    pub fn empty() -> Self {
        Self {
            ac: None,
            replacement: Vec::new(),
            max_len: 0,
        }
    }

    /// Builds the patterns for every `(name, value)`.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a SecretName, &'a SecretValue)>) -> Self {
        let (patterns, replacement) = patterns(secrets);
        if patterns.is_empty() {
            return Self::empty();
        }
        let max_len = patterns.iter().map(|p| p.len()).max().unwrap_or(0);
        let ac = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|p| p.as_slice()))
            .ok();
        Self {
            ac,
            replacement,
            max_len,
        }
    }

    /// What [`Redactor::max_pattern_len`] of a redactor for these secrets would be, without
    /// building its automaton (a stream's hold-back window; the automaton takes a millisecond
    /// or more to build).
    pub fn window_for<'a>(
        secrets: impl IntoIterator<Item = (&'a SecretName, &'a SecretValue)>,
    ) -> usize {
        patterns(secrets)
            .0
            .iter()
            .map(|p| p.len())
            .max()
            .unwrap_or(0)
    }

    /// Whether this redactor knows any secret.
    pub fn is_empty(&self) -> bool {
        self.ac.is_none()
    }

    /// Length of the longest pattern (a streaming caller must hold back `max_len - 1` bytes).
    pub fn max_pattern_len(&self) -> usize {
        self.max_len
    }

    /// Redacts text.
    pub fn redact<'t>(&self, text: &'t str) -> Cow<'t, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            Cow::Owned(bytes) => match String::from_utf8(bytes) {
                Ok(s) => Cow::Owned(s),
                Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
            },
        }
    }

    /// Redacts bytes (tool output, HTTP bodies).
    pub fn redact_bytes<'t>(&self, data: &'t [u8]) -> Cow<'t, [u8]> {
        let Some(ac) = &self.ac else {
            return Cow::Borrowed(data);
        };
        let mut out: Option<Vec<u8>> = None;
        let mut last = 0;
        for m in ac.find_iter(data) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(data.len()));
            o.extend_from_slice(data.get(last..m.start()).unwrap_or_default());
            let tag = self
                .replacement
                .get(m.pattern().as_usize())
                .map_or("[REDACTED]", String::as_str);
            o.extend_from_slice(tag.as_bytes());
            last = m.end();
        }
        match out {
            None => Cow::Borrowed(data),
            Some(mut o) => {
                o.extend_from_slice(data.get(last..).unwrap_or_default());
                Cow::Owned(o)
            }
        }
    }

    /// Leak detection: the name of the first secret found in `data` (any encoding), if any.
    /// Use it to refuse an outbound request or message instead of rewriting it.
    pub fn find_leak(&self, data: &[u8]) -> Option<&str> {
        let m = self.ac.as_ref()?.find(data)?;
        let tag = self.replacement.get(m.pattern().as_usize())?;
        tag.strip_prefix("[REDACTED:")?.strip_suffix(']')
    }

    /// A redactor for output that arrives in chunks (a pipe, a socket).
    pub fn stream(&self) -> StreamRedactor<'_> {
        StreamRedactor {
            redactor: self,
            carry: Vec::new(),
        }
    }
}

/// Chunked redaction: a secret split across two chunks is still caught. Holds back at most
/// `max_pattern_len - 1` bytes between calls; call [`StreamRedactor::finish`] at the end.
pub struct StreamRedactor<'r> {
    redactor: &'r Redactor,
    carry: Vec<u8>,
}

impl StreamRedactor<'_> {
    /// Feeds a chunk; returns the redacted bytes that are final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        let Some(ac) = &self.redactor.ac else {
            return chunk.to_vec();
        };
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(chunk);
        let hold = self.redactor.max_len.saturating_sub(1);
        // Matches starting before `safe` have at least `max_len` bytes after their start, so
        // the leftmost-longest choice there cannot change with more input.
        let safe = buf.len().saturating_sub(hold);
        let mut out = Vec::with_capacity(buf.len());
        let mut last = 0;
        for m in ac.find_iter(&buf) {
            if m.start() >= safe {
                break;
            }
            out.extend_from_slice(buf.get(last..m.start()).unwrap_or_default());
            let tag = self
                .redactor
                .replacement
                .get(m.pattern().as_usize())
                .map_or("[REDACTED]", String::as_str);
            out.extend_from_slice(tag.as_bytes());
            last = m.end();
        }
        let emit_to = safe.max(last);
        out.extend_from_slice(buf.get(last..emit_to).unwrap_or_default());
        self.carry = buf.get(emit_to..).unwrap_or_default().to_vec();
        zeroize::Zeroize::zeroize(&mut buf);
        out
    }

    /// Flushes what was held back.
    pub fn finish(mut self) -> Vec<u8> {
        let carry = std::mem::take(&mut self.carry);
        self.redactor.redact_bytes(&carry).into_owned()
    }
}

/// The patterns (every encoding of every value, deduplicated) and, for each, its replacement.
fn patterns<'a>(
    secrets: impl IntoIterator<Item = (&'a SecretName, &'a SecretValue)>,
) -> (Vec<Zeroizing<Vec<u8>>>, Vec<String>) {
    let mut patterns: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    let mut replacement = Vec::new();
    let mut seen = std::collections::HashSet::<Vec<u8>>::new();
    for (name, value) in secrets {
        let tag = format!("[REDACTED:{name}]");
        for p in encodings(value.expose()) {
            // Looked up before a copy is made: a copy `insert` rejected would be freed unwiped.
            if p.len() >= MIN_PATTERN.min(value.len()).max(1) && !seen.contains(p.as_slice()) {
                seen.insert(p.to_vec());
                patterns.push(p);
                replacement.push(tag.clone());
            }
        }
    }
    // `seen` holds copies of the patterns; wipe them.
    let leftover: Vec<Vec<u8>> = seen.into_iter().collect();
    for mut v in leftover {
        zeroize::Zeroize::zeroize(&mut v);
    }
    (patterns, replacement)
}

/// Every encoded form of `v` that the redactor matches.
fn encodings(v: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    let mut push = |b: Vec<u8>| out.push(Zeroizing::new(b));
    if v.is_empty() {
        return out;
    }
    push(v.to_vec());
    if let Ok(s) = std::str::from_utf8(v)
        && let Ok(json) = serde_json::to_string(s)
    {
        let inner = json
            .strip_prefix('"')
            .and_then(|j| j.strip_suffix('"'))
            .unwrap_or_default();
        if inner.as_bytes() != v {
            push(inner.as_bytes().to_vec());
        }
        let mut json = json;
        zeroize::Zeroize::zeroize(&mut json);
    }
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        push(engine.encode(v).into_bytes());
    }
    // The base64 characters that depend only on the value's bytes, for each of the three
    // alignments the value can have inside a longer base64 text.
    for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        for k in 0..3usize {
            let mut shifted = Zeroizing::new(vec![0u8; k]);
            shifted.extend_from_slice(v);
            let enc = Zeroizing::new(engine.encode(&shifted[..]).into_bytes());
            let start = (8 * k).div_ceil(6);
            let end = (8 * (k + v.len())) / 6;
            if let Some(core) = enc.get(start..end)
                && core.len() >= MIN_PATTERN
            {
                push(core.to_vec());
            }
        }
    }
    let lower: String = v.iter().map(|b| format!("{b:02x}")).collect();
    push(lower.to_ascii_uppercase().into_bytes());
    push(lower.into_bytes());
    for set in [NON_ALPHANUMERIC, COMPONENT] {
        let pct = percent_encoding::percent_encode(v, set).to_string();
        if pct.as_bytes() != v {
            push(lower_percent(&pct).into_bytes());
            push(pct.into_bytes());
        }
    }
    out
}

/// `%2F` → `%2f`.
fn lower_percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut hex_left = 0;
    for c in s.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

pub use crate::gate::redact_json_strings;

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests"
    )]
    use super::*;

    fn r(pairs: &[(&str, &str)]) -> (Vec<SecretName>, Vec<SecretValue>) {
        (
            pairs
                .iter()
                .map(|(n, _)| SecretName::parse(n).unwrap())
                .collect(),
            pairs
                .iter()
                .map(|(_, v)| SecretValue::from_str_copy(v))
                .collect(),
        )
    }

    #[test]
    fn every_encoding_of_a_secret_is_redacted() {
        let secret = "s3cr3t/Tok+en?=&x y";
        let (n, v) = r(&[("TOKEN", secret)]);
        let red = Redactor::new(n.iter().zip(v.iter()));
        let b = secret.as_bytes();
        let forms = vec![
            secret.to_string(),
            STANDARD.encode(b),
            STANDARD_NO_PAD.encode(b),
            URL_SAFE.encode(b),
            URL_SAFE_NO_PAD.encode(b),
            b.iter().map(|x| format!("{x:02x}")).collect::<String>(),
            b.iter().map(|x| format!("{x:02X}")).collect::<String>(),
            percent_encoding::percent_encode(b, NON_ALPHANUMERIC).to_string(),
            percent_encoding::percent_encode(b, COMPONENT).to_string(),
            lower_percent(&percent_encoding::percent_encode(b, NON_ALPHANUMERIC).to_string()),
            STANDARD.encode(format!("key={secret}&more")),
            STANDARD.encode(format!("ab{secret}")),
            URL_SAFE_NO_PAD.encode(format!("a{secret}zz")),
        ];
        for f in forms {
            let text = format!("before {f} after");
            let out = red.redact(&text);
            assert!(out.contains("[REDACTED:TOKEN]"), "{f} -> {out}");
            assert!(!out.contains(&f), "{f} survived: {out}");
            assert_eq!(red.find_leak(text.as_bytes()), Some("TOKEN"));
        }
    }

    #[test]
    fn the_window_without_an_automaton_is_the_redactors_longest_pattern() {
        let mut windows = Vec::new();
        for pairs in [
            vec![],
            vec![("A", "abc")],
            vec![("A", "abcdefgh12345"), ("B", "s3cr3t/Tok+en?=&x y")],
            vec![("A", "short"), ("B", &*"é".repeat(40))],
        ] {
            let (n, v) = r(&pairs);
            let red = Redactor::new(n.iter().zip(v.iter()));
            let window = Redactor::window_for(n.iter().zip(v.iter()));
            assert_eq!(window, red.max_pattern_len(), "{pairs:?}");
            // At least the longest value: its raw form is one of the patterns.
            assert!(
                pairs.is_empty() || window >= pairs.iter().map(|(_, v)| v.len()).max().unwrap()
            );
            windows.push(window);
        }
        // The longest encodings, counted by hand: no secret, none; "abc" as hex (6); 19
        // bytes as hex (38); 80 non-ASCII bytes each percent-encoded as `%XX` (240).
        assert_eq!(windows, [0, 6, 38, 240]);
    }

    #[test]
    fn text_without_secrets_is_returned_unchanged_and_borrowed() {
        let (n, v) = r(&[("A", "abcdefgh12345")]);
        let red = Redactor::new(n.iter().zip(v.iter()));
        assert!(matches!(red.redact("nothing here"), Cow::Borrowed(_)));
        assert_eq!(red.find_leak(b"nothing here"), None);
    }

    #[test]
    fn a_secret_split_across_chunks_is_redacted_by_the_stream_helper() {
        let (n, v) = r(&[("K", "canary-0123456789")]);
        let red = Redactor::new(n.iter().zip(v.iter()));
        let input = b"xx canary-0123456789 yy canary-0123456789";
        for split in 1..input.len() {
            let mut s = red.stream();
            let mut out = s.push(&input[..split]);
            out.extend(s.push(&input[split..]));
            out.extend(s.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "xx [REDACTED:K] yy [REDACTED:K]",
                "split at {split}"
            );
        }
    }
}
