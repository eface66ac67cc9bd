//! Text helpers shared by the adapters: measuring and splitting a long answer into messages,
//! and refusing a text or a button the platform would refuse before any request is made.
//!
//! **Unit.** Lengths here are counted in UTF-16 code units, the unit Telegram counts its 4096
//! limit in (an emoji outside the Basic Multilingual Plane such as 😀 is 2 units; `é` is 1).
//! A text within `n` UTF-16 units is also within `n` Unicode characters, so the same count is
//! safe for a platform that limits characters. [`crate::Limits::max_text_chars`] is in this
//! unit.
//!
//! **No escaping.** Adapters send the model's text as plain text (Telegram: `sendMessage`
//! without `parse_mode`), so the platform interprets no markup in it: `*bold*`, `<b>`,
//! `[label](https://…)` arrive as those characters, and model output cannot forge a link, a
//! mention or formatting. Hence this module has no escaping helper; one is needed only if an
//! adapter ever sends markup, and then every piece of untrusted text must go through it.
//! Slack is such a platform (its message text always interprets `<…>` control sequences):
//! [`crate::slack::escape`] escapes `&`, `<` and `>` in everything the Slack adapter sends.

use crate::{Button, SendError};

/// The length of `s` in UTF-16 code units (the unit of [`crate::Limits::max_text_chars`]).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Splits `text` into pieces of at most `max_units` UTF-16 code units each, preferring to cut
/// after a paragraph break (`\n\n`), then after a line break, then after a space, and only
/// then inside a word (never inside a character, so never between the two halves of a
/// surrogate pair, and not just before a combining mark, variation selector, skin-tone
/// modifier or zero-width joiner, nor just after a joiner).
///
/// The pieces concatenate to exactly `text` (the separator stays at the end of the piece it
/// ends). A text that fits is returned as one piece; an empty text gives no piece. A piece
/// is whitespace only when the text has a run of whitespace longer than `max_units`: callers
/// skip pieces for which `piece.trim().is_empty()` (platforms refuse empty messages).
/// `max_units` below 2 cannot hold every character: a character that does not fit is then
/// emitted alone.
pub fn split(text: &str, max_units: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let window = window_end(rest, max_units);
        if window == rest.len() {
            pieces.push(rest.to_owned());
            break;
        }
        let cut = cut_point(rest, window);
        let (piece, tail) = rest.split_at(cut);
        pieces.push(piece.to_owned());
        rest = tail;
    }
    pieces
}

/// The first `max_units` UTF-16 units of `s`, cut down to whole characters, as `s[..n]`
/// (at least one character, so splitting always progresses).
pub fn truncate(s: &str, max_units: usize) -> &str {
    &s[..window_end(s, max_units)]
}

/// The byte index where the longest prefix of `s` within `max_units` ends; at least one
/// whole character when `s` is not empty.
fn window_end(s: &str, max_units: usize) -> usize {
    let mut units = 0;
    for (i, c) in s.char_indices() {
        units += c.len_utf16();
        if units > max_units {
            return if i == 0 { c.len_utf8() } else { i };
        }
    }
    s.len()
}

/// Where to cut `s`, given that `s[..window]` is the longest prefix that fits.
fn cut_point(s: &str, window: usize) -> usize {
    let head = &s[..window];
    let not_blank = |cut: usize| cut > 0 && !s[..cut].trim().is_empty();
    // A paragraph break: cut after the blank line(s).
    if let Some(i) = head.rfind("\n\n") {
        let cut = i + 2;
        if not_blank(cut) {
            return cut;
        }
    }
    if let Some(i) = head.rfind('\n') {
        let cut = i + 1;
        if not_blank(cut) {
            return cut;
        }
    }
    if let Some((i, c)) = head.char_indices().rev().find(|(_, c)| c.is_whitespace()) {
        let cut = i + c.len_utf8();
        if not_blank(cut) {
            return cut;
        }
    }
    // Inside a word: step back over characters that belong to the next one.
    let mut cut = window;
    while cut > 0 && !good_hard_cut(s, cut) {
        cut = prev_boundary(s, cut);
    }
    if cut == 0 { window } else { cut }
}

fn prev_boundary(s: &str, i: usize) -> usize {
    s[..i].char_indices().next_back().map_or(0, |(j, _)| j)
}

/// A cut at `i` does not separate a character from a mark or joiner that belongs with it.
fn good_hard_cut(s: &str, i: usize) -> bool {
    let next = s[i..].chars().next();
    let prev = s[..i].chars().next_back();
    let joins_previous = next.is_some_and(|c| {
        matches!(c,
            '\u{200D}'                      // zero-width joiner
            | '\u{FE00}'..='\u{FE0F}'       // variation selectors
            | '\u{0300}'..='\u{036F}'       // combining diacritical marks
            | '\u{1AB0}'..='\u{1AFF}'
            | '\u{1DC0}'..='\u{1DFF}'
            | '\u{20D0}'..='\u{20FF}'
            | '\u{FE20}'..='\u{FE2F}'
            | '\u{1F3FB}'..='\u{1F3FF}'     // skin-tone modifiers
            | '\u{E0020}'..='\u{E007F}'     // tag characters (flag sequences)
        )
    });
    let joins_next = prev == Some('\u{200D}');
    !joins_previous && !joins_next
}

/// Refuses, before any request, a text to send that is empty (white space only) or longer than
/// `max` UTF-16 units. `refused_by` names the platform that refuses empty messages (`None`: the
/// adapter does); `limit` says whose limit `max` is ("Telegram's", "this adapter's").
pub(crate) fn check_sendable(
    text: &str,
    max: usize,
    refused_by: Option<&str>,
    limit: &str,
) -> Result<(), SendError> {
    if text.trim().is_empty() {
        return Err(SendError::Permanent(match refused_by {
            Some(platform) => {
                format!("the message text is empty ({platform} refuses empty messages)")
            }
            None => "the message text is empty".into(),
        }));
    }
    let len = utf16_len(text);
    if len > max {
        return Err(SendError::Permanent(format!(
            "the text is {len} UTF-16 units, over {limit} {max}: split it with \
             `chitin_channels::text::split`"
        )));
    }
    Ok(())
}

/// Refuses, before any request, a button `platform` would refuse: an empty label, or data that
/// is empty or longer than `max_data` bytes.
pub(crate) fn check_button(b: &Button, max_data: usize, platform: &str) -> Result<(), SendError> {
    if b.label.trim().is_empty() {
        return Err(SendError::Permanent("a button has an empty label".into()));
    }
    if b.data.is_empty() || b.data.len() > max_data {
        return Err(SendError::Permanent(format!(
            "a button's data is {} bytes; {platform} takes 1-{max_data}",
            b.data.len()
        )));
    }
    Ok(())
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
    fn a_text_to_send_must_be_non_empty_and_within_the_limit() {
        assert!(check_sendable("hi", 2, Some("X"), "X's").is_ok());
        assert!(check_sendable("😀", 2, Some("X"), "X's").is_ok());
        assert_eq!(
            check_sendable(" \n", 10, Some("X"), "X's"),
            Err(SendError::Permanent(
                "the message text is empty (X refuses empty messages)".into()
            ))
        );
        assert_eq!(
            check_sendable("", 10, None, "X's"),
            Err(SendError::Permanent("the message text is empty".into()))
        );
        assert_eq!(
            check_sendable("😀!", 2, None, "this adapter's"),
            Err(SendError::Permanent(
                "the text is 3 UTF-16 units, over this adapter's 2: split it with \
                 `chitin_channels::text::split`"
                    .into()
            ))
        );
    }

    #[test]
    fn a_button_needs_a_label_and_data_within_the_limit() {
        let b = |label: &str, data: &str| Button {
            label: label.into(),
            data: data.into(),
        };
        assert!(check_button(&b("Approve", "a:1"), 3, "X").is_ok());
        assert_eq!(
            check_button(&b(" ", "a:1"), 3, "X"),
            Err(SendError::Permanent("a button has an empty label".into()))
        );
        for data in ["", "a:12"] {
            assert_eq!(
                check_button(&b("Approve", data), 3, "X"),
                Err(SendError::Permanent(format!(
                    "a button's data is {} bytes; X takes 1-3",
                    data.len()
                )))
            );
        }
    }

    fn check(text: &str, max: usize) -> Vec<String> {
        let pieces = split(text, max);
        assert_eq!(pieces.concat(), text, "pieces must concatenate to the text");
        for p in &pieces {
            assert!(
                utf16_len(p) <= max,
                "piece of {} units > {max}",
                utf16_len(p)
            );
            assert!(!p.is_empty());
        }
        pieces
    }

    #[test]
    fn a_text_that_fits_is_one_piece_and_empty_text_is_none() {
        assert_eq!(split("hello", 4096), vec!["hello".to_owned()]);
        assert_eq!(split("", 4096), Vec::<String>::new());
        assert_eq!(split("abcd", 4), vec!["abcd".to_owned()]);
    }

    #[test]
    fn emoji_count_as_two_units_like_telegram_counts_them() {
        assert_eq!(utf16_len("😀"), 2);
        assert_eq!(utf16_len("é"), 1);
        assert_eq!(utf16_len("a😀b"), 4);
        // 4096 emoji are 8192 units: two full messages of 2048 emoji each.
        let text = "😀".repeat(4096);
        let pieces = check(&text, 4096);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].chars().count(), 2048);
    }

    #[test]
    fn an_odd_limit_never_cuts_a_surrogate_pair() {
        let text = "😀".repeat(10);
        let pieces = check(&text, 5);
        // 5 units hold two emoji (4 units); the third would need units 5 and 6.
        assert_eq!(pieces.len(), 5);
        assert!(pieces.iter().all(|p| p == "😀😀"));
    }

    #[test]
    fn paragraphs_are_preferred_over_lines_and_words() {
        let text = "first paragraph line one\nline two\n\nsecond paragraph is here";
        let pieces = check(text, 40);
        assert_eq!(pieces[0], "first paragraph line one\nline two\n\n");
        assert_eq!(pieces[1], "second paragraph is here");
    }

    #[test]
    fn lines_are_preferred_over_words() {
        let text = "alpha beta gamma\ndelta epsilon zeta eta";
        let pieces = check(text, 25);
        assert_eq!(pieces[0], "alpha beta gamma\n");
        assert_eq!(pieces[1], "delta epsilon zeta eta");
    }

    #[test]
    fn words_are_kept_whole_when_there_is_no_line_break() {
        let text = "one two three four five six seven";
        let pieces = check(text, 10);
        assert_eq!(
            pieces,
            vec!["one two ", "three ", "four five ", "six seven"]
        );
    }

    #[test]
    fn a_word_longer_than_the_limit_is_cut_at_a_character_boundary() {
        let text = format!("x {}", "é".repeat(25));
        let pieces = check(&text, 10);
        assert_eq!(pieces[0], "x ");
        assert_eq!(pieces[1], "é".repeat(10));
    }

    #[test]
    fn a_hard_cut_does_not_separate_an_emoji_from_its_modifier_or_joiner() {
        // 👍🏽 is U+1F44D U+1F3FD (4 units); 👩‍💻 is U+1F469 U+200D U+1F4BB (5 units).
        let thumbs = "👍🏽".repeat(3);
        for p in check(&thumbs, 6) {
            assert!(
                !p.starts_with('\u{1F3FD}'),
                "modifier split from its emoji: {p:?}"
            );
        }
        let coder = "👩‍💻".repeat(3);
        for p in check(&coder, 7) {
            assert!(
                !p.starts_with('\u{200D}') && !p.ends_with('\u{200D}'),
                "{p:?}"
            );
        }
    }

    #[test]
    fn a_leading_paragraph_break_never_makes_a_blank_piece() {
        let text = format!("\n\n{}", "word ".repeat(10));
        let pieces = check(&text, 12);
        assert!(pieces.iter().all(|p| !p.trim().is_empty()), "{pieces:?}");
    }

    #[test]
    fn a_ten_thousand_character_answer_splits_into_telegram_sized_pieces() {
        let mut text = String::new();
        let mut n = 0;
        while text.chars().count() < 10_000 {
            n += 1;
            text.push_str(&format!("Paragraph {n}: "));
            for w in 0..(n % 7 + 5) {
                text.push_str(&format!("word{w} café 😀 "));
            }
            text.push_str(if n % 3 == 0 { "\n\n" } else { "\n" });
        }
        let text: String = text.chars().take(10_000).collect();
        assert_eq!(text.chars().count(), 10_000);
        let pieces = check(&text, 4096);
        assert!(pieces.len() >= 3, "{} pieces", pieces.len());
        // Every cut but the last falls on a line break (the text has one at least every
        // ~150 characters).
        for p in &pieces[..pieces.len() - 1] {
            assert!(
                p.ends_with('\n'),
                "cut inside a line: …{:?}",
                &p[p.len() - 20..]
            );
        }
    }

    #[test]
    fn truncate_keeps_whole_characters() {
        assert_eq!(truncate("a😀b", 2), "a");
        assert_eq!(truncate("a😀b", 3), "a😀");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
