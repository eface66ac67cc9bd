//! The stdio transport: the server runs inside the sandbox (`chitin sandbox exec` with the
//! server's stdin and stdout as the pipes), and messages are newline-delimited JSON-RPC.
//!
//! One reader thread takes every line the server writes: answers go to the caller waiting
//! for that id, server requests are answered (`ping`, an empty `roots/list`; sampling and
//! elicitation refused and reported to the hub, which audits them),
//! `notifications/tools/list_changed` is noted, anything else is ignored. A line longer than the cap, or the server's exit, ends the
//! connection: every waiting call gets an error, and the hub starts the server again at the
//! next use. stderr is drained (its last 4 KiB kept for error messages).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio as ProcStdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::McpError;
use super::wire;
use crate::tools::cancel::Cancel;

/// How much of the server's stderr is kept.
const STDERR_TAIL: usize = 4096;

type Reply = mpsc::Sender<Result<Value, String>>;

struct Shared {
    server: String,
    pending: Mutex<HashMap<u64, Reply>>,
    dead: Mutex<Option<String>>,
    list_changed: AtomicBool,
    stderr_tail: Mutex<Vec<u8>>,
    stdin: Mutex<Option<ChildStdin>>,
    on_refused: wire::OnRefused,
}

impl Shared {
    /// Ends the connection: records why (the first reason wins) and fails every waiting call.
    fn die(&self, why: String) {
        if let Ok(mut d) = self.dead.lock()
            && d.is_none()
        {
            *d = Some(why.clone());
        }
        if let Ok(mut s) = self.stdin.lock() {
            s.take();
        }
        let waiting: Vec<Reply> = match self.pending.lock() {
            Ok(mut p) => p.drain().map(|(_, r)| r).collect(),
            Err(_) => Vec::new(),
        };
        for r in waiting {
            let _ = r.send(Err(why.clone()));
        }
    }

    fn dead_reason(&self) -> Option<String> {
        self.dead.lock().ok().and_then(|d| d.clone())
    }

    fn stderr(&self) -> String {
        let tail = self
            .stderr_tail
            .lock()
            .map(|t| t.clone())
            .unwrap_or_default();
        let s = String::from_utf8_lossy(&tail);
        let s = s.trim();
        if s.is_empty() {
            String::new()
        } else {
            format!("; its last output on stderr: \"{}\"", s.escape_default())
        }
    }

    fn write(&self, msg: &Value) -> Result<(), String> {
        let mut line = msg.to_string();
        line.push('\n');
        let mut guard = self
            .stdin
            .lock()
            .map_err(|_| "the connection's lock was poisoned".to_string())?;
        let Some(w) = guard.as_mut() else {
            return Err(self
                .dead_reason()
                .unwrap_or_else(|| "the server's input is closed".into()));
        };
        w.write_all(line.as_bytes())
            .and_then(|()| w.flush())
            .map_err(|e| format!("cannot write to the server: {e}"))
    }
}

/// A running stdio server.
pub struct StdioConn {
    shared: Arc<Shared>,
    child: Mutex<Option<Child>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for StdioConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioConn")
            .field("server", &self.shared.server)
            .finish_non_exhaustive()
    }
}

/// Reads one line of at most `cap` bytes (without the newline); `Ok(None)` at EOF,
/// `Err(None)` for a longer line.
fn read_line<R: BufRead>(r: &mut R, cap: usize) -> Result<Option<Vec<u8>>, Option<std::io::Error>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf().map_err(Some)?;
        if buf.is_empty() {
            return Ok((!line.is_empty()).then_some(line));
        }
        if let Some(i) = buf.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(buf.get(..i).unwrap_or_default());
            r.consume(i + 1);
            if line.len() > cap {
                return Err(None);
            }
            return Ok(Some(line));
        }
        let n = buf.len();
        line.extend_from_slice(buf);
        r.consume(n);
        if line.len() > cap {
            return Err(None);
        }
    }
}

impl StdioConn {
    /// Spawns `cmd` (the sandbox launcher; its stdio is set here), hands it `secret_wire` on
    /// the pipe `pass` set up, and starts the reader threads. `line_cap`: the longest message
    /// accepted.
    pub fn spawn(
        server: &str,
        mut cmd: Command,
        secret: Option<(
            std::io::PipeWriter,
            std::os::fd::OwnedFd,
            chitin_sandbox::SecretEnv,
        )>,
        line_cap: usize,
        on_refused: wire::OnRefused,
    ) -> Result<Self, McpError> {
        cmd.stdin(ProcStdio::piped())
            .stdout(ProcStdio::piped())
            .stderr(ProcStdio::piped());
        let mut child = cmd.spawn().map_err(|e| McpError::Start {
            server: server.to_string(),
            reason: format!("cannot start the sandbox launcher: {e}"),
        })?;
        if let Some((mut w, read_end, env)) = secret {
            drop(read_end);
            let wire = env.to_wire();
            drop(env);
            std::thread::spawn(move || {
                let _ = w.write_all(wire.as_slice());
                drop(wire);
            });
        }
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(McpError::Start {
                server: server.to_string(),
                reason: "the launcher's pipes were not set up".into(),
            });
        };
        let shared = Arc::new(Shared {
            server: server.to_string(),
            pending: Mutex::new(HashMap::new()),
            dead: Mutex::new(None),
            list_changed: AtomicBool::new(false),
            stderr_tail: Mutex::new(Vec::new()),
            stdin: Mutex::new(Some(stdin)),
            on_refused,
        });
        let (stderr_done, stderr_closed) = mpsc::channel::<()>();
        {
            let sh = Arc::clone(&shared);
            std::thread::spawn(move || {
                let _done = stderr_done;
                let mut r = stderr;
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut t) = sh.stderr_tail.lock() {
                        t.extend_from_slice(buf.get(..n).unwrap_or_default());
                        let over = t.len().saturating_sub(STDERR_TAIL);
                        t.drain(..over);
                    }
                }
            });
        }
        {
            let sh = Arc::clone(&shared);
            std::thread::spawn(move || reader(&sh, stdout, line_cap, &stderr_closed));
        }
        Ok(Self {
            shared,
            child: Mutex::new(Some(child)),
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether the connection still works.
    pub fn alive(&self) -> bool {
        self.shared.dead_reason().is_none()
    }

    /// Whether the server said its tool list changed since the last call (and clears it).
    pub fn take_list_changed(&self) -> bool {
        self.shared.list_changed.swap(false, Ordering::SeqCst)
    }

    /// Sends a notification.
    pub fn notify(&self, method: &str, params: Value) -> Result<(), McpError> {
        self.shared
            .write(&wire::notification(method, params))
            .map_err(|reason| self.gone(reason))
    }

    fn gone(&self, reason: String) -> McpError {
        McpError::Exited {
            server: self.shared.server.clone(),
            reason: format!("{reason}{}", self.shared.stderr()),
        }
    }

    /// Sends a request and waits for its answer for at most `timeout` (or until `cancel`
    /// fires). A timed-out request is cancelled with `notifications/cancelled`.
    pub fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
        cancel: Option<&Cancel>,
    ) -> Result<Value, McpError> {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel();
        if let Some(why) = self.shared.dead_reason() {
            return Err(self.gone(why));
        }
        if let Ok(mut p) = self.shared.pending.lock() {
            p.insert(id, tx);
        }
        if let Err(e) = self.shared.write(&wire::request(id, method, params)) {
            self.forget(id);
            return Err(self.gone(e));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.forget(id);
                let _ = self.notify(
                    "notifications/cancelled",
                    serde_json::json!({"requestId": id, "reason": "timed out"}),
                );
                return Err(McpError::Timeout {
                    server: self.shared.server.clone(),
                    secs: timeout.as_secs(),
                });
            }
            match rx.recv_timeout(left.min(Duration::from_millis(200))) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    return Err(if self.alive() {
                        McpError::Server {
                            server: self.shared.server.clone(),
                            message: e,
                        }
                    } else {
                        self.gone(e)
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if cancel.and_then(Cancel::reason).is_some() {
                        self.forget(id);
                        let _ = self.notify(
                            "notifications/cancelled",
                            serde_json::json!({"requestId": id, "reason": "the run was stopped"}),
                        );
                        return Err(McpError::Cancelled {
                            server: self.shared.server.clone(),
                        });
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let why = self
                        .shared
                        .dead_reason()
                        .unwrap_or_else(|| "the connection ended".into());
                    return Err(self.gone(why));
                }
            }
        }
    }

    fn forget(&self, id: u64) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.remove(&id);
        }
    }

    /// Stops the server: its sandbox is killed with the launcher (PDEATHSIG).
    pub fn stop(&self, why: &str) {
        self.shared.die(why.to_string());
        let child = self.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for StdioConn {
    fn drop(&mut self) {
        self.stop("the connection was closed");
    }
}

fn reader(
    sh: &Shared,
    stdout: std::process::ChildStdout,
    cap: usize,
    stderr_closed: &mpsc::Receiver<()>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, stdout);
    loop {
        let line = match read_line(&mut r, cap) {
            Ok(Some(l)) => l,
            Ok(None) => {
                // stdout and stderr close together (when the launcher exits); the stderr
                // tail is part of the error, so wait (briefly) for its last bytes.
                let _ = stderr_closed.recv_timeout(Duration::from_secs(10));
                sh.die("the server exited".into());
                return;
            }
            Err(None) => {
                sh.die(format!(
                    "the server sent a message larger than {cap} bytes (max_result_kib), so it was stopped"
                ));
                return;
            }
            Err(Some(e)) => {
                sh.die(format!("cannot read from the server: {e}"));
                return;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(msg) = serde_json::from_slice::<Value>(&line) else {
            // Not JSON-RPC (a server printing logs to stdout): ignored.
            continue;
        };
        match wire::classify(&msg) {
            Some(wire::Incoming::Response { id, result }) => {
                let waiting = sh.pending.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(tx) = waiting {
                    let _ = tx.send(result);
                }
            }
            Some(wire::Incoming::Request { id, method }) => {
                let _ = sh.write(&wire::answer_server_request(&id, &method));
                if wire::refused_server_request(&method).is_some() {
                    (sh.on_refused)(&method);
                }
            }
            Some(wire::Incoming::Notification { method })
                if method == "notifications/tools/list_changed" =>
            {
                sh.list_changed.store(true, Ordering::SeqCst);
            }
            Some(wire::Incoming::Notification { .. }) | None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn lines_longer_than_the_cap_are_refused_and_the_rest_is_read_whole() {
        let data = b"short\n0123456789abcdef\nlast".to_vec();
        let mut r = BufReader::with_capacity(4, &data[..]);
        assert_eq!(read_line(&mut r, 10).unwrap().unwrap(), b"short");
        assert!(matches!(read_line(&mut r, 10), Err(None)));
        let mut r = BufReader::with_capacity(4, &data[..]);
        read_line(&mut r, 100).unwrap();
        assert_eq!(
            read_line(&mut r, 100).unwrap().unwrap(),
            b"0123456789abcdef"
        );
        assert_eq!(read_line(&mut r, 100).unwrap().unwrap(), b"last");
        assert_eq!(read_line(&mut r, 100).unwrap(), None);
    }
}
