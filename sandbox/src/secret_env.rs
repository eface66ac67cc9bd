//! Secret environment variables for a sandboxed command, and how they travel from the gateway
//! to the launcher without argv and without the launcher's own environment.
//!
//! API Boundary (the hand-off): the gateway writes [`SecretEnv::to_wire`] into a pipe whose
//! read end the launcher inherits under the same fd number N >= 3 ([`pass_to_child`]; flag
//! `chitin sandbox exec --env-fd N`); the launcher reads it to EOF with
//! [`SecretEnv::read_from_fd`] before anything else and closes it. The values then exist only in wiped-on-drop buffers of the launcher and in the
//! environment block of the sandboxed command (its `execve` envp), never in a cmdline or in
//! the launcher's `/proc/PID/environ`.
//!
//! Wire format (little endian): `b"CHSENV1\n"`, then per variable `u32 key_len`, key bytes,
//! `u32 value_len`, value bytes. At most [`MAX_VARS`] variables, values at most
//! [`MAX_VALUE_BYTES`] bytes, no NUL bytes, keys `[A-Za-z_][A-Za-z0-9_]*`, none of
//! [`FIXED_ENV_KEYS`], no key twice.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::{SandboxError, sys};

/// Variables the sandbox sets itself; a secret may not replace them.
pub const FIXED_ENV_KEYS: &[&str] = &[
    "PATH", "HOME", "LANG", "TERM", "USER", "LOGNAME", "TMPDIR", "PWD",
];
/// Most secret variables per run.
pub const MAX_VARS: usize = 64;
/// Longest value (64 KiB, the secret store's limit).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 128;
const MAGIC: &[u8] = b"CHSENV1\n";
const MAX_WIRE_BYTES: usize = MAGIC.len() + MAX_VARS * (8 + MAX_KEY_BYTES + MAX_VALUE_BYTES);

/// Whether `k` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most
/// [`MAX_KEY_BYTES`] bytes.
pub fn valid_env_key(k: &str) -> bool {
    let mut it = k.bytes();
    k.len() <= MAX_KEY_BYTES
        && matches!(it.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && it.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Bytes that are overwritten with zeros when dropped.
pub struct WipedBytes(Vec<u8>);

impl WipedBytes {
    /// Takes ownership of `v` (wiped on drop).
    pub fn new(v: Vec<u8>) -> Self {
        Self(v)
    }
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
    /// Empty, with room for `n` bytes (so pushes up to `n` do not reallocate).
    fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// Appends without ever leaving an unwiped copy behind: grows by copying into a new,
    /// larger buffer and wiping the old one.
    fn extend(&mut self, more: &[u8]) {
        if self.0.capacity() - self.0.len() < more.len() {
            let mut bigger = Vec::with_capacity((self.0.len() + more.len()).max(64) * 2);
            bigger.extend_from_slice(&self.0);
            let mut old = std::mem::replace(&mut self.0, bigger);
            sys::wipe(&mut old);
        }
        self.0.extend_from_slice(more);
    }
}

impl Drop for WipedBytes {
    fn drop(&mut self) {
        sys::wipe(&mut self.0);
    }
}

/// Secret environment variables for one run: names are public, values are wiped on drop and
/// never printed (`Debug` shows the names only).
#[derive(Default)]
pub struct SecretEnv {
    vars: Vec<(String, WipedBytes)>,
}

impl Clone for SecretEnv {
    fn clone(&self) -> Self {
        Self {
            vars: self
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), WipedBytes(v.0.clone())))
                .collect(),
        }
    }
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretEnv")
            .field("names", &self.names().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> SandboxError {
    SandboxError::Invalid(format!("secret environment: {}", msg.into()))
}

impl SecretEnv {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a variable (the value is moved in and wiped on drop). Refuses invalid or reserved
    /// names, a name given twice, NUL bytes and oversized values; the message never contains
    /// the value.
    pub fn push(&mut self, key: &str, value: Vec<u8>) -> Result<(), SandboxError> {
        let value = WipedBytes(value);
        if !valid_env_key(key) {
            return Err(invalid(format!(
                "variable name `{}` must match [A-Za-z_][A-Za-z0-9_]* (at most {MAX_KEY_BYTES} bytes)",
                key.escape_default()
            )));
        }
        if FIXED_ENV_KEYS.contains(&key) {
            return Err(invalid(format!(
                "`{key}` is set by the sandbox itself and cannot carry a secret"
            )));
        }
        if self.vars.iter().any(|(k, _)| k == key) {
            return Err(invalid(format!("`{key}` is given twice")));
        }
        if self.vars.len() >= MAX_VARS {
            return Err(invalid(format!("more than {MAX_VARS} variables")));
        }
        if value.0.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!(
                "the value of `{key}` is longer than {MAX_VALUE_BYTES} bytes"
            )));
        }
        if value.0.contains(&0) {
            return Err(invalid(format!(
                "the value of `{key}` contains a NUL byte, which an environment cannot carry"
            )));
        }
        self.vars.push((key.to_string(), value));
        Ok(())
    }

    /// The variable names, in insertion order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.vars.iter().map(|(k, _)| k.as_str())
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// `(name, value)` pairs, for building the command's environment block.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// The wire encoding (see the module docs), in a wiped-on-drop buffer.
    pub fn to_wire(&self) -> WipedBytes {
        let need = MAGIC.len()
            + self
                .vars
                .iter()
                .map(|(k, v)| 8 + k.len() + v.0.len())
                .sum::<usize>();
        let mut out = WipedBytes::with_capacity(need);
        out.extend(MAGIC);
        for (k, v) in &self.vars {
            let kl = u32::try_from(k.len()).unwrap_or(u32::MAX);
            let vl = u32::try_from(v.0.len()).unwrap_or(u32::MAX);
            out.extend(&kl.to_le_bytes());
            out.extend(k.as_bytes());
            out.extend(&vl.to_le_bytes());
            out.extend(v.as_slice());
        }
        out
    }

    /// Parses the wire encoding; every rule of [`SecretEnv::push`] applies.
    pub fn from_wire(bytes: &[u8]) -> Result<Self, SandboxError> {
        let rest = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| invalid("the hand-off does not start with the expected header"))?;
        let mut env = Self::new();
        let mut rest = rest;
        let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>, SandboxError> {
            let (head, tail) = rest
                .split_at_checked(n)
                .ok_or_else(|| invalid("the hand-off is truncated"))?;
            *rest = tail;
            Ok(head.to_vec())
        };
        let len = |rest: &mut &[u8]| -> Result<usize, SandboxError> {
            let b = take(rest, 4)?;
            let arr: [u8; 4] = b
                .as_slice()
                .try_into()
                .map_err(|_| invalid("the hand-off is truncated"))?;
            usize::try_from(u32::from_le_bytes(arr)).map_err(|_| invalid("length too large"))
        };
        while !rest.is_empty() {
            let kl = len(&mut rest)?;
            if kl > MAX_KEY_BYTES {
                return Err(invalid("a variable name is too long"));
            }
            let key = String::from_utf8(take(&mut rest, kl)?)
                .map_err(|_| invalid("a variable name is not UTF-8"))?;
            let vl = len(&mut rest)?;
            if vl > MAX_VALUE_BYTES {
                return Err(invalid(format!(
                    "the value of `{}` is longer than {MAX_VALUE_BYTES} bytes",
                    key.escape_default()
                )));
            }
            let value = take(&mut rest, vl)?;
            env.push(&key, value)?;
        }
        Ok(env)
    }

    /// Launcher side: adopts the inherited fd `fd` (must be >= 3 and a pipe), reads it to EOF
    /// into a wiped buffer, closes it and parses the variables.
    pub fn read_from_fd(fd: RawFd) -> Result<Self, SandboxError> {
        if fd < 3 {
            return Err(invalid(format!(
                "--env-fd must be 3 or higher (got {fd}); stdin/stdout/stderr cannot carry it"
            )));
        }
        let owned: OwnedFd = sys::adopt_inherited_fd(fd)
            .map_err(|e| invalid(format!("fd {fd} is not open: {e}")))?;
        let raw = owned.as_raw_fd();
        // Never passed on, whatever happens next.
        sys::set_cloexec(raw).map_err(|e| invalid(format!("fd {fd}: {e}")))?;
        let kind = sys::fd_file_type(raw).map_err(|e| invalid(format!("fd {fd}: {e}")))?;
        if kind != libc::S_IFIFO {
            return Err(invalid(format!("fd {fd} is not a pipe")));
        }
        let bytes = read_all_wiped(raw, MAX_WIRE_BYTES)
            .map_err(|e| invalid(format!("reading fd {fd}: {e}")))?;
        drop(owned);
        Self::from_wire(bytes.as_slice())
    }
}

fn read_all_wiped(fd: RawFd, max: usize) -> io::Result<WipedBytes> {
    let mut out = WipedBytes::with_capacity(64 * 1024);
    let mut chunk = WipedBytes(vec![0u8; 16 * 1024]);
    loop {
        let n = sys::read(fd, &mut chunk.0)?;
        if n == 0 {
            return Ok(out);
        }
        if out.0.len() + n > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {max} bytes"),
            ));
        }
        out.extend(chunk.0.get(..n).unwrap_or_default());
    }
}

/// Gateway side: a pipe whose read end the child `cmd` spawns inherits (and only that child:
/// the parent's copies stay close-on-exec). Returns the writer, the read end and its fd number
/// in the child (>= 3; give it as `--env-fd`). Write [`SecretEnv::to_wire`] into the writer
/// after `spawn`, then drop it; drop the read end right after `spawn`, so a dead launcher
/// gives `EPIPE` instead of a blocked writer.
pub fn pass_to_child(
    cmd: &mut std::process::Command,
) -> io::Result<(io::PipeWriter, OwnedFd, RawFd)> {
    let (r, w) = io::pipe()?;
    let mut r: OwnedFd = r.into();
    if r.as_raw_fd() < 3 {
        // A daemon running with stdio closed: keep the pipe off the child's stdio numbers.
        r = sys::dup_cloexec_at_least(r.as_raw_fd(), 3)?;
    }
    let fd = r.as_raw_fd();
    sys::inherit_fd(cmd, fd);
    Ok((w, r, fd))
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

    fn sample() -> SecretEnv {
        let mut e = SecretEnv::new();
        e.push("GITHUB_TOKEN", b"ghp_value-123".to_vec()).unwrap();
        e.push("_X2", b"a=b c\n\xff".to_vec()).unwrap();
        e
    }

    #[test]
    fn the_wire_format_round_trips() {
        let e = sample();
        let back = SecretEnv::from_wire(e.to_wire().as_slice()).unwrap();
        let got: Vec<(String, Vec<u8>)> = back
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        assert_eq!(
            got,
            [
                ("GITHUB_TOKEN".to_string(), b"ghp_value-123".to_vec()),
                ("_X2".to_string(), b"a=b c\n\xff".to_vec())
            ]
        );
    }

    #[test]
    fn debug_output_names_the_variables_but_never_the_values() {
        let s = format!("{:?}", sample());
        assert!(s.contains("GITHUB_TOKEN"), "{s}");
        assert!(!s.contains("ghp_value"), "{s}");
    }

    #[test]
    fn reserved_invalid_duplicate_and_nul_variables_are_refused() {
        let mut e = SecretEnv::new();
        for (k, v, want) in [
            ("PATH", b"x".to_vec(), "set by the sandbox itself"),
            ("HOME", b"x".to_vec(), "set by the sandbox itself"),
            ("1BAD", b"x".to_vec(), "must match"),
            ("A-B", b"x".to_vec(), "must match"),
            ("K", b"a\0b-secret".to_vec(), "NUL byte"),
        ] {
            let err = e.push(k, v).unwrap_err().to_string();
            assert!(err.contains(want), "{k}: {err}");
            assert!(!err.contains("secret\""), "{err}");
        }
        e.push("K", b"v".to_vec()).unwrap();
        assert!(
            e.push("K", b"w".to_vec())
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let big = vec![b'a'; MAX_VALUE_BYTES + 1];
        assert!(
            e.push("BIG", big)
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
    }

    #[test]
    fn truncated_or_foreign_wire_data_is_refused() {
        let wire = sample().to_wire();
        let bytes = wire.as_slice();
        for cut in [0, 3, MAGIC.len() + 2, bytes.len() - 1] {
            assert!(SecretEnv::from_wire(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(SecretEnv::from_wire(b"GITHUB_TOKEN=x").is_err());
        // A forged entry that names PATH is refused on the launcher side too.
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&4u32.to_le_bytes());
        forged.extend_from_slice(b"PATH");
        forged.extend_from_slice(&1u32.to_le_bytes());
        forged.extend_from_slice(b"/");
        let e = SecretEnv::from_wire(&forged).unwrap_err().to_string();
        assert!(e.contains("set by the sandbox itself"), "{e}");
    }

    #[test]
    fn a_wiped_buffer_is_zero_after_wiping() {
        let mut v = b"secret-bytes".to_vec();
        sys::wipe(&mut v);
        assert!(v.iter().all(|&b| b == 0));
    }

    #[test]
    fn the_read_end_reaches_the_child_under_its_number_and_only_there() {
        let mut cmd = std::process::Command::new("sh");
        cmd.stdout(std::process::Stdio::piped());
        let (mut w, r, fd) = pass_to_child(&mut cmd).unwrap();
        assert!(fd >= 3);
        cmd.args(["-c", &format!("cat <&{fd}")]);
        let child = cmd.spawn().unwrap();
        // The parent's copy stays close-on-exec: concurrent spawns do not inherit it.
        let flags = sys::fd_flags(r.as_raw_fd()).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        drop(r);
        std::io::Write::write_all(&mut w, b"through-the-pipe").unwrap();
        drop(w);
        let out = child.wait_with_output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.starts_with("through-the-pipe"), "{s}");
    }
}
