//! Turning Cedar diagnostics into `file:line:col: message` lines.

use std::fmt;

/// One problem in a policy or schema file, located for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.col, self.message
        )
    }
}

impl Diagnostic {
    /// A diagnostic at a byte offset of `text`.
    pub fn at_offset(file: &str, text: &str, offset: usize, message: impl Into<String>) -> Self {
        let (line, col) = line_col(text, offset);
        Self {
            file: file.to_string(),
            line,
            col,
            message: message.into(),
        }
    }

    /// Builds diagnostics from a miette diagnostic (Cedar's error types implement it):
    /// one per labelled span, or one at 1:1 when the error has no location.
    pub fn from_miette(file: &str, text: &str, d: &dyn miette::Diagnostic, out: &mut Vec<Self>) {
        let mut message = d.to_string();
        if let Some(help) = d.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        // One line per diagnostic: `file:line:col: message`.
        let message = message
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let offset = d.labels().and_then(|mut l| l.next()).map(|l| l.offset());
        out.push(match offset {
            Some(o) => Self::at_offset(file, text, o, message),
            None => Self {
                file: file.to_string(),
                line: 1,
                col: 1,
                message,
            },
        });
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before
        .get(line_start..)
        .map_or(1, |s| s.chars().count() + 1);
    (line, col)
}

/// Byte offsets of the top-level `permit`/`forbid` keywords of a policy file, in order, so a
/// whole-policy problem (a missing `@id`) can point at the policy's first line. Comments and
/// string literals are skipped; annotations before a policy belong to it, so the offset of the
/// first annotation is used when present.
pub fn policy_starts(text: &str) -> Vec<usize> {
    let bytes = text.as_bytes();
    let mut starts = Vec::new();
    let mut depth = 0i32;
    let mut pending_annotation: Option<usize> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'/' && bytes.get(i + 1) == Some(&b'/') {
            while i < bytes.len() && bytes[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'"' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        match c {
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            b'@' if depth == 0 && pending_annotation.is_none() => pending_annotation = Some(i),
            _ => {}
        }
        if depth == 0 && (c == b'p' || c == b'f') {
            let word_start =
                i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
            let rest = &bytes[i..];
            let is_kw = |kw: &[u8]| {
                rest.starts_with(kw)
                    && rest
                        .get(kw.len())
                        .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            };
            if word_start && (is_kw(b"permit") || is_kw(b"forbid")) {
                starts.push(pending_annotation.take().unwrap_or(i));
                i += 6;
                continue;
            }
        }
        if c == b';' && depth == 0 {
            pending_annotation = None;
        }
        i += 1;
    }
    starts
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
    fn offsets_become_one_based_lines_and_columns() {
        let t = "ab\ncde\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 4), (2, 2));
    }

    #[test]
    fn policy_starts_skip_comments_strings_and_bodies() {
        let t = "// permit in comment\n@id(\"a\")\npermit(principal, action, resource) when { \"forbid\" == \"x\" };\nforbid(principal, action, resource);\n";
        let s = policy_starts(t);
        assert_eq!(s.len(), 2);
        assert_eq!(line_col(t, s[0]), (2, 1));
        assert_eq!(line_col(t, s[1]), (4, 1));
    }
}
