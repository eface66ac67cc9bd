//! The age file format: the one decrypt path used by the store, the identity file and the
//! conformance test, and the encrypt helpers.
//!
//! Decryption never releases unauthenticated plaintext: age's STREAM reader only returns a
//! chunk after its Poly1305 tag verified, and [`decrypt_into`] hands the caller only what
//! was released before a failure (the store then throws it away).

use std::io::Read;

use age::secrecy::SecretString;
use zeroize::Zeroizing;

/// What went wrong decrypting an age file, in the classes of the age test kit
/// (`C2SP/CCTV age`): the store turns them into user-facing errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecryptFailure {
    /// The ASCII armor is malformed.
    Armor(String),
    /// The header does not parse (or asks for more scrypt work than allowed).
    Header(String),
    /// The header parsed but none of the keys could unwrap a stanza.
    NoMatch,
    /// A key unwrapped the file key but the header MAC is wrong (tampered header).
    Hmac,
    /// The header is fine but the encrypted payload is damaged or truncated.
    Payload(String),
    /// A passphrase-encrypted file needs a higher scrypt work factor than allowed.
    ExcessiveWork { required: u8, max: u8 },
    /// A passphrase stanza did not decrypt: the passphrase is wrong (or the stanza damaged).
    WrongPassphrase,
}

impl DecryptFailure {
    /// The age test-kit class name (`header failure`, `no match`, ...).
    pub fn class(&self) -> &'static str {
        match self {
            Self::Armor(_) => "armor failure",
            Self::Header(_) | Self::ExcessiveWork { .. } => "header failure",
            Self::NoMatch | Self::WrongPassphrase => "no match",
            Self::Hmac => "HMAC failure",
            Self::Payload(_) => "payload failure",
        }
    }
}

impl std::fmt::Display for DecryptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Armor(m) => write!(f, "malformed ASCII armor ({m})"),
            Self::Header(m) => write!(f, "invalid age header ({m})"),
            Self::NoMatch => f.write_str("the file is not encrypted to this identity"),
            Self::Hmac => f.write_str("header MAC mismatch: the header was modified"),
            Self::Payload(m) => write!(f, "encrypted payload is damaged or truncated ({m})"),
            Self::ExcessiveWork { required, max } => write!(
                f,
                "the file asks for scrypt work factor {required}, above the allowed maximum {max} \
                 ([secrets] max_scrypt_work_factor)"
            ),
            Self::WrongPassphrase => f.write_str("wrong passphrase"),
        }
    }
}

/// The keys to try when decrypting.
pub struct DecryptKeys {
    x25519: Vec<age::x25519::Identity>,
    passphrases: Vec<SecretString>,
    max_work_factor: u8,
}

impl DecryptKeys {
    /// No keys yet; `max_work_factor` bounds scrypt work (dependencies.md pitfall 17).
    pub fn new(max_work_factor: u8) -> Self {
        Self {
            x25519: Vec::new(),
            passphrases: Vec::new(),
            max_work_factor,
        }
    }

    pub fn with_x25519(mut self, id: age::x25519::Identity) -> Self {
        self.x25519.push(id);
        self
    }

    pub fn with_passphrase(mut self, passphrase: SecretString) -> Self {
        self.passphrases.push(passphrase);
        self
    }

    fn scrypt_identities(&self) -> Vec<age::scrypt::Identity> {
        self.passphrases
            .iter()
            .map(|p| {
                let mut id = age::scrypt::Identity::new(p.clone());
                id.set_max_work_factor(self.max_work_factor);
                id
            })
            .collect()
    }
}

fn is_armor_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<age::armor::ArmoredReadError>())
}

fn header_failure(e: age::DecryptError, max: u8) -> DecryptFailure {
    match e {
        age::DecryptError::InvalidMac => DecryptFailure::Hmac,
        age::DecryptError::NoMatchingKeys => DecryptFailure::NoMatch,
        age::DecryptError::ExcessiveWork { required, .. } => {
            DecryptFailure::ExcessiveWork { required, max }
        }
        age::DecryptError::Io(io) if is_armor_error(&io) => DecryptFailure::Armor(io.to_string()),
        age::DecryptError::Io(io) => DecryptFailure::Header(io.to_string()),
        age::DecryptError::UnknownFormat => {
            DecryptFailure::Header("unknown age format version".into())
        }
        age::DecryptError::InvalidHeader => DecryptFailure::Header("malformed header".into()),
        age::DecryptError::DecryptionFailed | age::DecryptError::KeyDecryptionFailed => {
            DecryptFailure::Header("a recipient stanza is malformed".into())
        }
        // Plugins are not built; any other (future) error is still a failure.
        other => DecryptFailure::Header(other.to_string()),
    }
}

/// Decrypts `input` with `keys`, appending released plaintext to `out`.
///
/// On error, `out` holds exactly the plaintext that was authenticated before the failure
/// (possibly none); callers that need all-or-nothing must discard it.
pub fn decrypt_into(
    input: &[u8],
    keys: &DecryptKeys,
    out: &mut Zeroizing<Vec<u8>>,
) -> Result<(), DecryptFailure> {
    let max = keys.max_work_factor;
    let binary = dearmor(input)?;
    check_stanza_bodies(&binary)?;
    let decryptor =
        age::Decryptor::new_buffered(&binary[..]).map_err(|e| header_failure(e, max))?;
    let passphrase_only = decryptor.is_scrypt();
    let scrypt_ids = keys.scrypt_identities();
    let ids: Vec<&dyn age::Identity> = keys
        .x25519
        .iter()
        .map(|i| i as &dyn age::Identity)
        .chain(scrypt_ids.iter().map(|i| i as &dyn age::Identity))
        .collect();
    let mut stream = match decryptor.decrypt(ids.into_iter()) {
        Ok(s) => s,
        Err(age::DecryptError::DecryptionFailed) if passphrase_only => {
            return Err(DecryptFailure::WrongPassphrase);
        }
        Err(age::DecryptError::NoMatchingKeys)
            if passphrase_only && !keys.passphrases.is_empty() =>
        {
            return Err(DecryptFailure::WrongPassphrase);
        }
        Err(e) => return Err(header_failure(e, max)),
    };
    let mut chunk = Zeroizing::new(vec![0u8; 64 * 1024]);
    loop {
        match stream.read(&mut chunk[..]) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                let Some(part) = chunk.get(..n) else {
                    return Err(DecryptFailure::Payload("reader overran its buffer".into()));
                };
                reserve_zeroizing(out, n);
                out.extend_from_slice(part);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_armor_error(&e) => return Err(DecryptFailure::Armor(e.to_string())),
            Err(e) => return Err(DecryptFailure::Payload(e.to_string())),
        }
    }
}

const ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
const BINARY_INTRO: &[u8] = b"age-encryption.org/";

fn is_ws(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Returns the binary age file: `input` itself, or the decoded ASCII armor. Whitespace
/// around an armored file is allowed (age spec); anything else that looks like armor but is
/// not exactly the age armor is an armor failure.
fn dearmor(input: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, DecryptFailure> {
    if input.starts_with(BINARY_INTRO) {
        return Ok(std::borrow::Cow::Borrowed(input));
    }
    let start = input.iter().position(|b| !is_ws(b)).unwrap_or(input.len());
    let end = input
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |e| e + 1);
    let trimmed = input.get(start..end.max(start)).unwrap_or_default();
    if !trimmed.starts_with(ARMOR_BEGIN) {
        let looks_armored = input
            .split(|b| *b == b'\n')
            .any(|line| line.starts_with(b"-----"));
        return if looks_armored {
            Err(DecryptFailure::Armor(
                "no `-----BEGIN AGE ENCRYPTED FILE-----` line at the start".into(),
            ))
        } else {
            Ok(std::borrow::Cow::Borrowed(input))
        };
    }
    // Keep the final line break after the END line: the armor grammar wants it.
    let with_eol = match input.get(end..) {
        Some(rest) if rest.starts_with(b"\r\n") => end + 2,
        Some(rest) if rest.starts_with(b"\n") => end + 1,
        _ => end,
    };
    let armored = input.get(start..with_eol).unwrap_or_default();
    let mut reader = age::armor::ArmoredReader::new(armored);
    let mut binary = Vec::with_capacity(armored.len());
    match reader.read_to_end(&mut binary) {
        Ok(_) => Ok(std::borrow::Cow::Owned(binary)),
        Err(e) => Err(DecryptFailure::Armor(e.to_string())),
    }
}

/// The age header grammar: every recipient stanza ends with a body line shorter than 64
/// columns (possibly empty). The age crate accepts a missing final line; Chitin refuses it,
/// as the spec and the reference implementation do.
fn check_stanza_bodies(binary: &[u8]) -> Result<(), DecryptFailure> {
    if !binary.starts_with(b"age-encryption.org/v1\n") {
        return Ok(()); // age reports the version / format error
    }
    let mut in_stanza = false;
    let mut body_done = true;
    for line in binary.split(|b| *b == b'\n').skip(1) {
        if line.starts_with(b"---") {
            break;
        }
        if line.starts_with(b"-> ") || line == b"->" {
            if in_stanza && !body_done {
                return Err(DecryptFailure::Header(
                    "a recipient stanza does not end with a short body line".into(),
                ));
            }
            in_stanza = true;
            body_done = false;
            continue;
        }
        if in_stanza && !body_done {
            body_done = line.len() < 64;
        }
    }
    if in_stanza && !body_done {
        return Err(DecryptFailure::Header(
            "a recipient stanza does not end with a short body line".into(),
        ));
    }
    Ok(())
}

/// Grows `buf` so `extra` more bytes fit without a reallocation that would leave an unwiped
/// copy of its contents behind.
pub(crate) fn reserve_zeroizing(buf: &mut Zeroizing<Vec<u8>>, extra: usize) {
    if buf.capacity() - buf.len() >= extra {
        return;
    }
    let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + extra).max(1024) * 2));
    bigger.extend_from_slice(buf);
    *buf = bigger;
}

/// Decrypts all of `input` or nothing.
pub fn decrypt_all(input: &[u8], keys: &DecryptKeys) -> Result<Zeroizing<Vec<u8>>, DecryptFailure> {
    let mut out = Zeroizing::new(Vec::new());
    decrypt_into(input, keys, &mut out)?;
    Ok(out)
}

/// Encrypts `plaintext` to X25519 recipients (binary age format, what `age -d` reads).
pub fn encrypt_to_recipients(
    plaintext: &[u8],
    recipients: &[age::x25519::Recipient],
) -> Result<Vec<u8>, String> {
    let enc = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(plaintext.len() + 256);
    let mut w = enc.wrap_output(&mut out).map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut w, plaintext).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

/// Encrypts `plaintext` with a passphrase (age scrypt, `log_n` work), ASCII-armored.
pub fn encrypt_with_passphrase(
    plaintext: &[u8],
    passphrase: SecretString,
    log_n: u8,
) -> Result<Vec<u8>, String> {
    let log_n = log_n.clamp(1, 63);
    let mut rcpt = age::scrypt::Recipient::new(passphrase);
    rcpt.set_work_factor(log_n);
    let enc = age::Encryptor::with_recipients(std::iter::once(&rcpt as &dyn age::Recipient))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)
        .map_err(|e| e.to_string())?;
    let mut w = enc.wrap_output(armor).map_err(|e| e.to_string())?;
    std::io::Write::write_all(&mut w, plaintext).map_err(|e| e.to_string())?;
    w.finish()
        .and_then(|armor| armor.finish())
        .map_err(|e| e.to_string())?;
    Ok(out)
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
    fn a_round_trip_through_x25519_works_and_a_bit_flip_fails_closed() {
        let id = age::x25519::Identity::generate();
        let ct = encrypt_to_recipients(b"hello store", &[id.to_public()]).unwrap();
        let keys = DecryptKeys::new(16).with_x25519(id);
        assert_eq!(&decrypt_all(&ct, &keys).unwrap()[..], b"hello store");
        let mut bad = ct.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            decrypt_all(&bad, &keys),
            Err(DecryptFailure::Payload(_))
        ));
        let other = DecryptKeys::new(16).with_x25519(age::x25519::Identity::generate());
        assert_eq!(
            decrypt_all(&ct, &other).unwrap_err(),
            DecryptFailure::NoMatch
        );
    }

    #[test]
    fn a_wrong_passphrase_and_excessive_work_are_told_apart() {
        let ct =
            encrypt_with_passphrase(b"id", SecretString::from("right".to_string()), 10).unwrap();
        let ok = DecryptKeys::new(12).with_passphrase(SecretString::from("right".to_string()));
        assert_eq!(&decrypt_all(&ct, &ok).unwrap()[..], b"id");
        let wrong = DecryptKeys::new(12).with_passphrase(SecretString::from("wrong".to_string()));
        assert_eq!(
            decrypt_all(&ct, &wrong).unwrap_err(),
            DecryptFailure::WrongPassphrase
        );
        let low = DecryptKeys::new(8).with_passphrase(SecretString::from("right".to_string()));
        assert!(matches!(
            decrypt_all(&ct, &low).unwrap_err(),
            DecryptFailure::ExcessiveWork {
                required: 10,
                max: 8
            }
        ));
    }
}
