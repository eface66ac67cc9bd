//! The DevTools protocol over Chromium's `--remote-debugging-pipe`: JSON messages, each ended
//! by a NUL byte, Chromium reading commands on its fd 3 and writing answers and events on its
//! fd 4. Chromium runs inside the sandbox launcher, whose stdin and stdout become fds 3 and 4
//! (see [`super::launch_argv`]), so the gateway speaks CDP over the launcher's pipes: no port
//! is opened anywhere.
//!
//! One reader thread splits the stream into messages (each capped) and hands them, in order,
//! to whoever drives the browser ([`Conn::next`]); the driver handles events (a paused
//! request is decided by Cedar) while it waits for the answer to its own command. The
//! connection ends at EOF, at an over-long message, or when the process is stopped.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The longest message accepted from Chromium (a full-page PNG screenshot is the largest).
pub const MAX_MESSAGE_BYTES: usize = 48 * 1024 * 1024;
/// How much of Chromium's stderr is kept for error messages.
const STDERR_TAIL: usize = 4096;

/// One message from Chromium.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// The answer to command `id`: its `result`, or the protocol's error message.
    Answer {
        id: u64,
        result: Result<Value, String>,
    },
    /// An event, with the flat-mode session it belongs to (none: the browser target).
    Event {
        method: String,
        params: Value,
        session: Option<String>,
    },
}

/// Why the connection cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnError {
    /// Chromium went away (or broke the protocol); the text says why.
    Closed(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A running browser: the launcher process and its pipes.
pub struct Conn {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<Result<Incoming, String>>,
    next_id: u64,
    dead: Option<String>,
    stderr_tail: Arc<Mutex<Vec<u8>>>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("next_id", &self.next_id)
            .field("dead", &self.dead)
            .finish_non_exhaustive()
    }
}

fn parse(raw: &[u8]) -> Result<Incoming, String> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| format!("not JSON: {e}"))?;
    if let Some(id) = v.get("id").and_then(Value::as_u64) {
        let result = match v.get("error") {
            Some(e) => Err(e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("error")
                .to_string()),
            None => Ok(v.get("result").cloned().unwrap_or(Value::Null)),
        };
        return Ok(Incoming::Answer { id, result });
    }
    let method = v
        .get("method")
        .and_then(Value::as_str)
        .ok_or("a message with neither id nor method")?
        .to_string();
    Ok(Incoming::Event {
        method,
        params: v.get("params").cloned().unwrap_or(Value::Null),
        session: v
            .get("sessionId")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

impl Conn {
    /// Spawns `cmd` (the sandbox launcher running Chromium) with piped stdio and starts the
    /// reader threads.
    pub fn spawn(mut cmd: Command) -> Result<Self, String> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the sandbox launcher: {e}"))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the launcher's pipes were not set up".into());
        };
        let stderr_tail: Arc<Mutex<Vec<u8>>> = Arc::default();
        {
            let tail = Arc::clone(&stderr_tail);
            std::thread::spawn(move || {
                let mut r = stderr;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut t) = tail.lock() {
                        t.extend_from_slice(buf.get(..n).unwrap_or_default());
                        let over = t.len().saturating_sub(STDERR_TAIL);
                        t.drain(..over);
                    }
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::with_capacity(64 * 1024, stdout);
            let mut msg = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match r.read(&mut buf) {
                    Ok(0) => {
                        let _ = tx.send(Err("the browser closed its DevTools pipe".into()));
                        return;
                    }
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(format!("reading from the browser: {e}")));
                        return;
                    }
                };
                let mut chunk = buf.get(..n).unwrap_or_default();
                while let Some(i) = chunk.iter().position(|b| *b == 0) {
                    msg.extend_from_slice(chunk.get(..i).unwrap_or_default());
                    chunk = chunk.get(i + 1..).unwrap_or_default();
                    let m = parse(&msg);
                    msg.clear();
                    if tx.send(m).is_err() {
                        return;
                    }
                }
                msg.extend_from_slice(chunk);
                if msg.len() > MAX_MESSAGE_BYTES {
                    let _ = tx.send(Err(format!(
                        "the browser sent a message longer than {MAX_MESSAGE_BYTES} bytes"
                    )));
                    return;
                }
            }
        });
        Ok(Self {
            child: Some(child),
            stdin: Some(stdin),
            rx,
            next_id: 0,
            dead: None,
            stderr_tail,
        })
    }

    /// The last lines Chromium wrote on stderr, for error messages.
    pub fn stderr(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        String::from_utf8_lossy(&tail).trim().to_string()
    }

    /// Why the connection ended, if it did.
    pub fn dead(&self) -> Option<&str> {
        self.dead.as_deref()
    }

    fn die(&mut self, why: String) -> ConnError {
        if self.dead.is_none() {
            self.dead = Some(why);
        }
        self.stdin = None;
        ConnError::Closed(self.dead.clone().unwrap_or_default())
    }

    /// Sends a command (to `session`, or the browser target); returns its id.
    pub fn send(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<u64, ConnError> {
        if let Some(d) = &self.dead {
            return Err(ConnError::Closed(d.clone()));
        }
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let (Some(s), Value::Object(m)) = (session, &mut msg) {
            m.insert("sessionId".into(), json!(s));
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        let Some(w) = self.stdin.as_mut() else {
            return Err(self.die("the browser's input is closed".into()));
        };
        if let Err(e) = w.write_all(&bytes).and_then(|()| w.flush()) {
            return Err(self.die(format!("cannot write to the browser: {e}")));
        }
        Ok(id)
    }

    /// The next message, waiting until `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Result<Incoming, ConnError> {
        if let Some(d) = &self.dead {
            return Err(ConnError::Closed(d.clone()));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(why)) => Err(self.die(why)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ConnError::Timeout),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(self.die("the browser's reader stopped".into()))
            }
        }
    }

    /// Stops the browser: kills the launcher (its sandbox, and every process in it, dies with
    /// it) and reaps it.
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.dead.is_none() {
            self.dead = Some("the browser was closed".into());
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a single protocol command may take when the caller gives no other bound.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use super::*;

    #[test]
    fn answers_errors_and_events_are_told_apart() {
        match parse(br#"{"id":3,"result":{"a":1}}"#).unwrap() {
            Incoming::Answer { id, result } => {
                assert_eq!(id, 3);
                assert_eq!(result.unwrap(), json!({"a": 1}));
            }
            other => panic!("{other:?}"),
        }
        match parse(br#"{"id":4,"error":{"code":-32000,"message":"No node"}}"#).unwrap() {
            Incoming::Answer { result, .. } => assert_eq!(result.unwrap_err(), "No node"),
            other => panic!("{other:?}"),
        }
        match parse(
            br#"{"method":"Fetch.requestPaused","params":{"requestId":"r"},"sessionId":"S"}"#,
        )
        .unwrap()
        {
            Incoming::Event {
                method, session, ..
            } => {
                assert_eq!(method, "Fetch.requestPaused");
                assert_eq!(session.as_deref(), Some("S"));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(b"{}").is_err());
        assert!(parse(b"nope").is_err());
    }
}
