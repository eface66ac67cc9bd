//! Splitting long replies at the platform's limit.
//!
//! Stand-in until `chitin_channels::text::split` (built with the Telegram adapter) exists:
//! the integrator switches [`split`] to call it. Same contract: parts of at most `max_chars`
//! characters, cut at the last paragraph break, else line break, else space before the limit,
//! else hard at the limit; nothing is lost except the break characters at a cut.

/// `text` in parts of at most `max_chars` characters (at least 1), in order. An empty text is
/// one empty part.
pub fn split(text: &str, max_chars: usize) -> Vec<String> {
    let max = max_chars.max(1);
    let mut out = Vec::new();
    let mut rest = text;
    loop {
        if rest.chars().count() <= max {
            out.push(rest.to_string());
            return out;
        }
        // Byte offset just past `max` characters.
        let limit = rest.char_indices().nth(max).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..limit];
        let (cut, skip) = if let Some(i) = window.rfind("\n\n").filter(|i| *i > 0) {
            (i, 2)
        } else if let Some(i) = window.rfind('\n').filter(|i| *i > 0) {
            (i, 1)
        } else if let Some(i) = window.rfind(' ').filter(|i| *i > 0) {
            (i, 1)
        } else {
            (limit, 0)
        };
        out.push(rest[..cut].to_string());
        rest = &rest[cut + skip..];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_ten_thousand_character_answer_is_cut_on_paragraphs_within_the_limit() {
        let para = "word ".repeat(199) + "word";
        let text = vec![para.clone(); 10].join("\n\n");
        assert!(text.chars().count() > 10_000);
        let parts = split(&text, 4096);
        assert!(parts.iter().all(|p| p.chars().count() <= 4096));
        assert_eq!(parts.join("\n\n"), text);
        assert_eq!(parts.len(), 3);
    }

    #[test]
    fn text_without_breaks_is_cut_hard_and_multibyte_text_stays_whole() {
        let text = "é".repeat(10);
        let parts = split(&text, 4);
        assert_eq!(parts, ["éééé", "éééé", "éé"]);
        assert_eq!(split("", 5), [""]);
    }
}
