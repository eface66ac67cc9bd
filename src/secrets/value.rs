//! Secret-bearing types: a validated [`SecretName`] and the zeroizing [`SecretValue`].

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Shortest secret value accepted: exact-value redaction of a shorter value would erase
/// ordinary text (and a value that short is not a credential).
pub const MIN_SECRET_LEN: usize = 8;
/// Longest secret value accepted (64 KiB).
pub const MAX_SECRET_LEN: usize = 64 * 1024;

pub use crate::config::secret_ref::SecretName;

/// A secret value. Zeroized on drop; no `Debug`, `Display`, `Clone` or `Serialize`, so it
/// cannot reach a log line or a config dump by accident. Read it with [`SecretValue::expose`].
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretValue(Vec<u8>);

impl SecretValue {
    /// Takes ownership of the bytes (they are wiped when the value is dropped).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// Copies a string into a new value.
    pub fn from_str_copy(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }

    /// Reads a value from `input` (stdin for `chitin secrets set`): everything up to EOF,
    /// without one trailing newline (`\n` or `\r\n`), so `echo TOKEN | chitin secrets set` works.
    pub fn read_from(input: &mut dyn std::io::Read) -> std::io::Result<Self> {
        let mut buf = Zeroizing::new(Vec::with_capacity(4096));
        let mut chunk = Zeroizing::new([0u8; 4096]);
        loop {
            let n = input.read(&mut chunk[..])?;
            if n == 0 {
                break;
            }
            let Some(part) = chunk.get(..n) else { break };
            if buf.len() + n > MAX_SECRET_LEN + 2 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the value is longer than {MAX_SECRET_LEN} bytes"),
                ));
            }
            // Reserve ahead so `extend` never reallocates (a reallocation would leave an
            // unwiped copy behind).
            if buf.capacity() < buf.len() + n {
                let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + n) * 2));
                bigger.extend_from_slice(&buf);
                buf = bigger;
            }
            buf.extend_from_slice(part);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        let mut exact = Vec::with_capacity(buf.len());
        exact.extend_from_slice(&buf);
        Ok(Self(exact))
    }

    /// The raw bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as text, if it is UTF-8 (HTTP headers, environment variables).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks the length limits; the message never contains the value.
    pub fn check_len(&self) -> Result<(), String> {
        if self.0.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the value is {} bytes; secrets must be at least {MIN_SECRET_LEN} bytes so they \
                 can be redacted reliably",
                self.0.len()
            ));
        }
        if self.0.len() > MAX_SECRET_LEN {
            return Err(format!("the value is longer than {MAX_SECRET_LEN} bytes"));
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
    fn names_are_validated() {
        assert!(SecretName::parse("OPENAI_API_KEY").is_ok());
        assert!(SecretName::parse("bot.token-2").is_ok());
        for bad in ["", "1abc", "a b", "a\"b", "a/b", &"a".repeat(65)] {
            assert!(SecretName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_trailing_newline_is_stripped_from_stdin() {
        let v = SecretValue::read_from(&mut &b"tok-123456\r\n"[..]).unwrap();
        assert_eq!(v.expose(), b"tok-123456");
        let v = SecretValue::read_from(&mut &b"tok-123456\n\n"[..]).unwrap();
        assert_eq!(v.expose(), b"tok-123456\n");
    }

    #[test]
    fn short_values_are_refused_without_echoing_them() {
        let v = SecretValue::from_str_copy("abc");
        let e = v.check_len().unwrap_err();
        assert!(!e.contains("abc"));
    }
}
