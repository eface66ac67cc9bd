//! Stopping a tool that is running: a run that is cancelled or times out fires its
//! [`Cancel`], and the sandbox launcher of the call in progress is told to stop (SIGTERM: it
//! kills the whole sandbox, PID 1 of its namespace first, and still reports `killed:
//! cancelled`). A launcher that does not answer within [`KILL_GRACE`] is killed (its sandbox
//! then dies by PDEATHSIG). Signals go through a pidfd, so they can never hit a process that
//! reused the launcher's pid.

use std::process::{Child, Output};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How long a launcher asked to stop may take to kill its sandbox and report before it is
/// killed itself.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Why the tool was stopped, as its `killed` field and the audit's `killed_by` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The run was cancelled (`Agent::cancel`, WebSocket `agent.cancel`).
    Cancelled,
    /// The run passed `[agent] run_timeout_secs`.
    RunTimeout,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Cancelled => "cancelled",
            CancelReason::RunTimeout => "run-timeout",
        }
    }
}

#[derive(Default)]
struct State {
    reason: Option<CancelReason>,
}

/// A cancellation signal shared by a run and the tool calls it makes (cheap to clone).
#[derive(Clone, Default)]
pub struct Cancel(Arc<(Mutex<State>, Condvar)>);

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Cancel").field(&self.reason()).finish()
    }
}

impl Cancel {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires: a tool running now is stopped, later ones do not start. The first reason stays.
    pub fn cancel(&self, reason: CancelReason) {
        let (m, cv) = &*self.0;
        if let Ok(mut s) = m.lock() {
            s.reason.get_or_insert(reason);
        }
        cv.notify_all();
    }

    /// Why it fired, if it did.
    pub fn reason(&self) -> Option<CancelReason> {
        self.0.0.lock().ok().and_then(|s| s.reason)
    }

    /// Waits until it fires (`Some`) or `done` is set and [`Self::wake`] called (`None`).
    fn wait(&self, done: &Done) -> Option<CancelReason> {
        let (m, cv) = &*self.0;
        let mut s = m.lock().ok()?;
        loop {
            if let Some(r) = s.reason {
                return Some(r);
            }
            if done.is_set() {
                return None;
            }
            s = cv.wait(s).ok()?;
        }
    }

    fn wake(&self) {
        let (m, cv) = &*self.0;
        drop(m.lock());
        cv.notify_all();
    }
}

/// Set when the launcher has been reaped.
#[derive(Default)]
struct Done(Mutex<bool>, Condvar);

impl Done {
    fn is_set(&self) -> bool {
        self.0.lock().map_or(true, |d| *d)
    }

    fn set(&self) {
        if let Ok(mut d) = self.0.lock() {
            *d = true;
        }
        self.1.notify_all();
    }

    /// Waits up to `grace` for it to be set; whether it was.
    fn wait(&self, grace: Duration) -> bool {
        let Ok(d) = self.0.lock() else { return true };
        self.1
            .wait_timeout_while(d, grace, |d| !*d)
            .map_or(true, |(d, _)| *d)
    }
}

/// Like `Child::wait_with_output`, but when `cancel` fires meanwhile the child (a sandbox
/// launcher) is told to stop, and killed after [`KILL_GRACE`]. Returns the output and why it
/// was stopped, if it was.
pub fn wait_with_output(
    child: Child,
    cancel: Option<&Cancel>,
) -> std::io::Result<(Output, Option<CancelReason>)> {
    let Some(cancel) = cancel else {
        return child.wait_with_output().map(|o| (o, None));
    };
    // Opened before any wait: the child cannot be reaped (and its pid reused) before.
    let pidfd = chitin_sandbox::pidfd::Pidfd::open(child.id());
    let done = Arc::new(Done::default());
    let watchdog = {
        let (cancel, done) = (cancel.clone(), Arc::clone(&done));
        std::thread::spawn(move || {
            let reason = cancel.wait(&done)?;
            let Ok(p) = &pidfd else {
                tracing::warn!("cannot signal the sandbox launcher (no pidfd): it runs to its end");
                return Some(reason);
            };
            let _gone = p.terminate();
            // The launcher kills its sandbox and reports; if it does not, kill it.
            if !done.wait(KILL_GRACE) {
                let _gone = p.kill();
            }
            Some(reason)
        })
    };
    let out = child.wait_with_output();
    done.set();
    cancel.wake();
    let reason = watchdog.join().ok().flatten();
    out.map(|o| (o, reason))
}

/// [`wait_with_output`] for a launcher the zygote started: reads its stdout and stderr to
/// their ends, then waits for it; when `cancel` fires meanwhile the launcher is told to stop
/// (through the pidfd the zygote reported), and killed after [`KILL_GRACE`]. Returns stdout,
/// stderr and why it was stopped, if it was.
pub fn wait_launched(
    launched: &chitin_sandbox::zygote::Launched,
    mut stdout: std::io::PipeReader,
    mut stderr: std::io::PipeReader,
    cancel: Option<&Cancel>,
) -> std::io::Result<(Vec<u8>, Vec<u8>, Option<CancelReason>)> {
    use std::io::Read;
    let done = Done::default();
    std::thread::scope(|s| {
        let err = s.spawn(move || {
            let mut b = Vec::new();
            stderr.read_to_end(&mut b).map(|_| b)
        });
        let watchdog = cancel.map(|cancel| {
            let done = &done;
            s.spawn(move || {
                let reason = cancel.wait(done)?;
                let _gone = launched.pidfd.terminate();
                // The launcher kills its sandbox and reports; if it does not, kill it.
                if !done.wait(KILL_GRACE) {
                    let _gone = launched.pidfd.kill();
                }
                Some(reason)
            })
        });
        let mut out = Vec::new();
        let read = stdout.read_to_end(&mut out);
        let err = err
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("stderr reader panicked")));
        // The launcher's end (its output pipes close before it exits; this also reaps it in
        // the zygote). A zygote gone meanwhile took the launcher with it: what it printed is
        // all there is.
        let _status = launched.wait();
        done.set();
        if let Some(c) = cancel {
            c.wake();
        }
        let reason = watchdog.and_then(|w| w.join().ok().flatten());
        read?;
        Ok((out, err?, reason))
    })
}
