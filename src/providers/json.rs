//! JSON strings written fast: the request to the model carries the whole conversation (each
//! message is written once and copied into later requests, `SharedMessage`, but every new one
//! and every system prompt is escaped here). `serde_json` looks at one byte at a time;
//! [`write_str`] looks at eight (a run with nothing to escape is copied at once) and writes the
//! same bytes `serde_json` would (tested against it).

/// Appends `s` as a JSON string (with its quotes), escaped exactly as `serde_json` does: `"`
/// and `\` with a backslash, `\b \t \n \f \r` by name, other control characters as `\u00xx`
/// (lowercase hex), everything else (DEL and non-ASCII included) as it is.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        // A word with nothing to escape is skipped whole; a flagged one (or the tail) is
        // looked at byte by byte.
        let end = match bytes.get(i..i + 8) {
            Some(chunk) => {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                if !needs_escape(u64::from_le_bytes(word)) {
                    i += 8;
                    continue;
                }
                i + 8
            }
            None => bytes.len(),
        };
        while i < end {
            let b = bytes[i];
            if let Some(esc) = escape(b) {
                out.extend_from_slice(&bytes[start..i]);
                match esc {
                    Escape::Short(c) => out.extend_from_slice(&[b'\\', c]),
                    Escape::Unicode => {
                        const HEX: &[u8; 16] = b"0123456789abcdef";
                        out.extend_from_slice(&[
                            b'\\',
                            b'u',
                            b'0',
                            b'0',
                            HEX[usize::from(b >> 4)],
                            HEX[usize::from(b & 0xf)],
                        ]);
                    }
                }
                start = i + 1;
            }
            i += 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Appends `[a,b,...]`, each item written by `write`.
pub fn write_array<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut write: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write(out, item);
    }
    out.push(b']');
}

/// Appends `,"key":value`, the value written by `serde_json`.
pub fn write_entry<T: serde::Serialize + ?Sized>(
    out: &mut Vec<u8>,
    key: &str,
    value: &T,
) -> Result<(), serde_json::Error> {
    out.push(b',');
    write_str(out, key);
    out.push(b':');
    serde_json::to_writer(&mut *out, value)
}

/// Bytes of text a message carries (to size the buffer its JSON is written into once).
pub fn message_len(m: &super::Message) -> usize {
    use super::Message;
    match m {
        Message::User { text } => text.len(),
        Message::Assistant { text, tool_calls } => {
            text.len()
                + tool_calls
                    .iter()
                    .map(|c| c.id.len() + c.name.len() + c.arguments_json.len() + 64)
                    .sum::<usize>()
        }
        Message::ToolResult {
            tool_use_id,
            content,
            images,
            ..
        } => {
            tool_use_id.len()
                + content.len()
                + images
                    .iter()
                    .map(|i| i.data_base64.len() + i.media_type.len() + 64)
                    .sum::<usize>()
        }
    }
}

/// A first size for a request's body, from the message count alone (reading every message's
/// length would be one more pass over a long conversation; a larger body grows the buffer by
/// doubling, a few copies in all).
pub fn body_capacity(req: &super::ChatRequest) -> usize {
    1024 + req.system.as_ref().map_or(0, String::len) + 96 * req.messages.len()
}

enum Escape {
    /// `\` and this character.
    Short(u8),
    /// `\u00xx`.
    Unicode,
}

fn escape(b: u8) -> Option<Escape> {
    Some(match b {
        b'"' => Escape::Short(b'"'),
        b'\\' => Escape::Short(b'\\'),
        0x08 => Escape::Short(b'b'),
        b'\t' => Escape::Short(b't'),
        b'\n' => Escape::Short(b'n'),
        0x0c => Escape::Short(b'f'),
        b'\r' => Escape::Short(b'r'),
        0..0x20 => Escape::Unicode,
        _ => return None,
    })
}

/// Whether any of the eight bytes is a control character, `"` or `\` (may say yes for a
/// word that has none: the caller then looks byte by byte; never says no for one that has).
fn needs_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte below 0x20: subtracting 0x20 borrows into its high bit (exact for bytes below
    // 0x80, the only ones that can be below 0x20).
    let low = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    low | has_zero(w ^ (ONES * u64::from(b'"'))) | has_zero(w ^ (ONES * u64::from(b'\\'))) != 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn ours(s: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_string_is_written_as_serde_json_writes_it() {
        let mut cases: Vec<String> = vec![
            String::new(),
            "What is on my list today?".into(),
            "a\"b\\c/d".into(),
            "line one\nline two\r\n\ttab \u{8}\u{c}".into(),
            "\u{0}\u{1}\u{1f}\u{7f} é ü 日本語 🦀".into(),
            "x".repeat(1000) + "\"" + &"y".repeat(7),
        ];
        // Every byte value below 0x80 at every position of a word, and every pair.
        for b in 0u8..0x80 {
            for pos in 0..9 {
                let mut s = "abcdefghijklmnop".to_string();
                s.insert(pos, char::from(b));
                cases.push(s);
            }
            for c in 0u8..0x80 {
                cases.push(format!("{}{}", char::from(b), char::from(c)));
            }
        }
        // Pseudo-random strings mixing plain text, escapes and multi-byte characters.
        let alphabet: Vec<char> = "ab \"\\\n\t\u{0}\u{1b}é🦀/\u{7f}".chars().collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut s = String::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push(alphabet[usize::try_from(x % alphabet.len() as u64).unwrap()]);
            }
            cases.push(s);
        }
        for s in &cases {
            assert_eq!(ours(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn the_word_check_never_misses_a_byte_to_escape() {
        for b in 0u8..=0xff {
            for pos in 0..8 {
                let mut w = [b'a'; 8];
                w[pos] = b;
                let must = b < 0x20 || b == b'"' || b == b'\\';
                if must {
                    assert!(needs_escape(u64::from_le_bytes(w)), "{b:#x} at {pos}");
                }
            }
        }
        assert!(!needs_escape(u64::from_le_bytes(*b"plain te")));
    }

    #[test]
    fn the_word_check_agrees_with_a_byte_by_byte_check_on_a_million_random_words() {
        // Bytes drawn mostly from around the edges: controls, space, `!`, `"`, `\`, high bytes.
        let edges: Vec<u8> = (0u8..0x20)
            .chain([
                0x20, 0x21, 0x22, 0x23, 0x5b, 0x5c, 0x5d, 0x7f, 0x80, 0x9f, 0xc3, 0xff,
            ])
            .collect();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut flagged = 0;
        for _ in 0..1_000_000 {
            let mut w = [0u8; 8];
            for b in &mut w {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = if x.is_multiple_of(4) {
                    edges[usize::try_from((x >> 8) % edges.len() as u64).unwrap()]
                } else {
                    b'a' + u8::try_from((x >> 8) % 26).unwrap()
                };
            }
            if w.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\') {
                flagged += 1;
                assert!(needs_escape(u64::from_le_bytes(w)), "{w:?}");
            }
        }
        assert!(flagged > 100_000, "{flagged}");
    }
}
