//! The persistent launcher ("zygote"): `chitin-sandbox-launch --serve`, started once by the
//! gateway, forks one launcher per tool call instead of the gateway exec'ing
//! `chitin-sandbox-launch` for each (the dynamic loader's start-up of a new program is most of
//! a launch's fixed cost).
//!
//! The zygote is single-threaded and does nothing but fork: it never parses a request. The
//! gateway sends, on the control socket (its stdin, `SOCK_SEQPACKET`), one message per call
//! carrying fds only: a reply socket, a memfd holding the launcher's argv (NUL-terminated
//! arguments), the command's stdin, stdout and stderr, and optionally the secret hand-off pipe.
//! The forked child makes those its fds 0, 1, 2 (and 3 for the secrets, named by the argv's
//! `--env-fd 3`), closes every other fd, reads its argv and runs exactly what a fresh
//! `chitin-sandbox-launch` with that argv runs ([`crate::launcher::main_with`]), then exits
//! with its status. The zygote answers on the reply socket with the child's pid and pidfd
//! (the gateway cancels through it), and once the child has ended, with its wait status.
//!
//! The zygote dies with the gateway (`PR_SET_PDEATHSIG`) and exits when its control socket
//! reaches EOF; each child dies with the zygote, and each sandbox with its launcher, so
//! nothing outlives the gateway. When the zygote is gone, [`Zygote::spawn`] says so before
//! anything was started ([`SpawnError::Gone`]): the gateway then execs the launcher as before,
//! and the next call starts a new zygote.

use std::ffi::OsString;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Mutex;

use crate::pidfd::Pidfd;
use crate::sys;

/// The flag that makes `chitin-sandbox-launch` the zygote.
pub const SERVE_FLAG: &str = "--serve";

/// The fd number under which a child receives the secret hand-off pipe (`--env-fd 3`).
pub const ENV_FD: RawFd = 3;

/// Request flag: a secret hand-off pipe is attached.
const WITH_ENV: u32 = 1;

/// Most bytes of argv a request may carry (the kernel's own exec limit is below this).
const MAX_ARGS_BYTES: u64 = 16 << 20;

// ---- the zygote --------------------------------------------------------------------------------

/// One child in progress: its pid, pidfd and the reply socket of its request.
struct Running {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    reply: OwnedFd,
}

/// Runs the zygote on the control socket at fd 0 until it reaches EOF (or the gateway dies).
pub fn serve() -> ExitCode {
    // Die with the gateway; if it is already gone, the control socket reads EOF below.
    if sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).is_err() {
        return ExitCode::from(125);
    }
    let me = sys::getpid();
    let ctl: RawFd = 0;
    let mut running: Vec<Running> = Vec::new();
    loop {
        let mut fds = vec![ctl];
        fds.extend(running.iter().map(|r| r.pidfd.as_raw_fd()));
        let Ok(rev) = sys::poll_in(&fds, -1) else {
            return ExitCode::from(125);
        };
        // Ended children first: their answers do not wait behind new requests. Highest index
        // first, so removing one does not move the others still to be looked at.
        let ended: Vec<usize> = (0..running.len())
            .filter(|i| rev.get(i + 1).is_some_and(|r| *r != 0))
            .collect();
        for i in ended.into_iter().rev() {
            let r = running.swap_remove(i);
            // The pidfd is readable: the child has exited, this does not block.
            let status = sys::wait4(r.pid, 0).map_or(-1, |(_, s, _)| s);
            let _ = sys::send_tagged(
                r.reply.as_raw_fd(),
                u32::from_ne_bytes(status.to_ne_bytes()),
                &[],
            );
        }
        if rev.first().is_some_and(|r| *r != 0) {
            match sys::recv_tagged(ctl, 6) {
                Ok(Some((flags, fds))) => {
                    if let Some(r) = start(me, flags, fds) {
                        running.push(r);
                    }
                }
                // The gateway closed the control socket (or it broke): the children die with
                // us.
                Ok(None) | Err(_) => return ExitCode::SUCCESS,
            }
        }
    }
}

/// Forks the child of one request; `None` when the request is malformed or the fork fails
/// (the reply socket then closes without an answer).
fn start(zygote: libc::pid_t, flags: u32, fds: Vec<OwnedFd>) -> Option<Running> {
    let with_env = flags & WITH_ENV != 0;
    if fds.len() != if with_env { 6 } else { 5 } {
        return None;
    }
    let pid = sys::fork().ok()?;
    if pid == 0 {
        child(zygote, &fds, with_env);
    }
    let mut fds = fds.into_iter();
    let reply = fds.next()?;
    // The rest (argv, stdio, secrets) are the child's now: closed here when `fds` drops, so the
    // gateway sees EOF on the command's output once the child and its sandbox are done.
    drop(fds);
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => own(fd),
        Err(_) => {
            sys::kill(pid, libc::SIGKILL);
            let _ = sys::wait4(pid, 0);
            return None;
        }
    };
    let tag = u32::try_from(pid).unwrap_or(0);
    if sys::send_tagged(reply.as_raw_fd(), tag, &[pidfd.as_raw_fd()]).is_err() {
        // The gateway gave up on the request: the run must not go on unseen.
        sys::kill(pid, libc::SIGKILL);
    }
    Some(Running { pid, pidfd, reply })
}

fn own(fd: RawFd) -> OwnedFd {
    sys::own(fd)
}

/// The forked child: takes the request's fds as its stdio, reads its argv and runs the
/// launcher. Never returns.
fn child(zygote: libc::pid_t, fds: &[OwnedFd], with_env: bool) -> ! {
    // Die with the zygote; if it died before this, leave.
    if sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).is_err()
        || sys::getppid() != zygote
    {
        sys::exit_now(125);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let args = match raw.get(1).map(|fd| read_args(*fd)) {
        Some(Ok(a)) => a,
        _ => sys::exit_now(125),
    };
    // Out of the way of 0-3 first (the received fds may have any numbers), then in place.
    let mut high = Vec::new();
    for fd in raw.iter().skip(2) {
        match sys::dup_cloexec_at_least(*fd, 16) {
            Ok(h) => high.push(h),
            Err(_) => sys::exit_now(125),
        }
    }
    for (i, h) in high.iter().enumerate() {
        let to = RawFd::try_from(i).unwrap_or(RawFd::MAX);
        if sys::dup2(h.as_raw_fd(), to).is_err() {
            sys::exit_now(125);
        }
    }
    let keep = if with_env { 4 } else { 3 };
    // Exactly the fds a fresh launcher has: stdio and the secret pipe (the zygote's control
    // socket, other requests' reply sockets and pidfds are closed).
    if sys::close_from(keep).is_err() {
        sys::exit_now(125);
    }
    std::mem::forget(high);
    let code = crate::launcher::status_with(args.into_iter());
    let _ = io::stdout().flush();
    sys::exit_now(i32::from(code))
}

/// Reads the NUL-terminated arguments from the request's memfd.
fn read_args(fd: RawFd) -> io::Result<Vec<OsString>> {
    let dup = sys::dup_cloexec_at_least(fd, 0)?;
    let mut f = std::fs::File::from(dup);
    f.seek(io::SeekFrom::Start(0))?;
    let mut buf = Vec::new();
    f.take(MAX_ARGS_BYTES).read_to_end(&mut buf)?;
    if buf.last().is_some_and(|b| *b != 0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    buf.pop();
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    Ok(buf
        .split(|b| *b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect())
}

// ---- the gateway's side --------------------------------------------------------------------

/// Why [`Zygote::spawn`] did not start the launcher.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The zygote is gone (or could not be started); nothing was started. Exec the launcher
    /// instead; the next call starts a new zygote.
    #[error("the sandbox zygote is not running: {0}")]
    Gone(io::Error),
    /// The request may have reached the zygote, but no launcher was reported started: the
    /// call failed (it is not retried, as it may have started).
    #[error("the sandbox zygote did not start the launcher: {0}")]
    Failed(io::Error),
}

struct Server {
    ctl: OwnedFd,
    pid: u32,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing the control socket ends the zygote (and its children with it); its keeper
        // thread reaps it.
        sys::shutdown(self.ctl.as_raw_fd());
    }
}

/// The gateway's handle on its zygote (started on first use, restarted after it died).
pub struct Zygote {
    launcher: PathBuf,
    server: Mutex<Option<Server>>,
}

impl std::fmt::Debug for Zygote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zygote")
            .field("launcher", &self.launcher)
            .finish_non_exhaustive()
    }
}

/// What a launched call's stdio is.
pub struct Stdio3 {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// A launcher started by the zygote.
#[derive(Debug)]
pub struct Launched {
    pub pid: u32,
    /// Signals exactly this launcher (cancel: SIGTERM, then SIGKILL).
    pub pidfd: Pidfd,
    reply: OwnedFd,
}

impl Launched {
    /// Waits for the launcher to end; its wait status (as `waitpid` reports it).
    pub fn wait(&self) -> io::Result<i32> {
        match sys::recv_tagged(self.reply.as_raw_fd(), 0)? {
            Some((status, _)) => Ok(i32::from_ne_bytes(status.to_ne_bytes())),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the sandbox zygote ended before the launcher",
            )),
        }
    }
}

impl Zygote {
    /// A handle for the zygote of `launcher` (the `chitin-sandbox-launch` binary); nothing is
    /// started until the first [`Self::spawn`].
    pub fn new(launcher: impl Into<PathBuf>) -> Self {
        Self {
            launcher: launcher.into(),
            server: Mutex::new(None),
        }
    }

    /// The launcher binary.
    pub fn launcher(&self) -> &Path {
        &self.launcher
    }

    /// The zygote's pid, if one was started (it may have died since).
    pub fn pid(&self) -> Option<u32> {
        self.server
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.pid))
    }

    /// Starts the zygote from a thread of its own that lives as long as the zygote and reaps
    /// it: `PR_SET_PDEATHSIG` fires when the *thread* that started a process ends, and the
    /// caller's thread (a pool thread of the gateway) may end any time.
    fn start_server(&self) -> io::Result<Server> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        let ours = own(ours);
        let theirs = own(theirs);
        let launcher = self.launcher.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sandbox-zygote".into())
            .spawn(move || {
                let started = Command::new(&launcher)
                    .arg(SERVE_FLAG)
                    .env_clear()
                    .stdin(Stdio::from(theirs))
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn();
                match started {
                    Ok(mut child) => {
                        let _ = tx.send(Ok(child.id()));
                        let _ = child.wait();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let pid = rx
            .recv()
            .map_err(|_| io::Error::other("the zygote's thread ended"))??;
        Ok(Server { ctl: ours, pid })
    }

    /// Starts the launcher with `args` (its arguments after the program name; with a secret
    /// pipe `env`, they must name it as `--env-fd 3`) on the given stdio. Thread-safe.
    pub fn spawn(
        &self,
        args: &[OsString],
        stdio: Stdio3,
        env: Option<OwnedFd>,
    ) -> Result<Launched, SpawnError> {
        let argv = sys::memfd(c"chitin-launch-argv").map_err(SpawnError::Gone)?;
        {
            let mut f = std::fs::File::from(argv.try_clone().map_err(SpawnError::Gone)?);
            let mut buf = Vec::new();
            for a in args {
                buf.extend_from_slice(a.as_bytes());
                buf.push(0);
            }
            f.write_all(&buf).map_err(SpawnError::Gone)?;
        }
        let (reply_ours, reply_theirs) = sys::seqpacket_pair().map_err(SpawnError::Gone)?;
        let reply_ours = own(reply_ours);
        let reply_theirs = own(reply_theirs);
        let mut fds = vec![
            reply_theirs.as_raw_fd(),
            argv.as_raw_fd(),
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ];
        if let Some(e) = &env {
            fds.push(e.as_raw_fd());
        }
        let flags = if env.is_some() { WITH_ENV } else { 0 };
        {
            let mut guard = self
                .server
                .lock()
                .map_err(|_| SpawnError::Gone(io::Error::other("zygote lock poisoned")))?;
            if guard.is_none() {
                *guard = Some(self.start_server().map_err(SpawnError::Gone)?);
            }
            let sent = match guard.as_ref() {
                Some(s) => sys::send_tagged(s.ctl.as_raw_fd(), flags, &fds),
                None => Err(io::Error::from_raw_os_error(libc::EPIPE)),
            };
            if let Err(e) = sent {
                // The zygote is gone (killed, crashed): reap it; the next call starts another.
                *guard = None;
                return Err(SpawnError::Gone(e));
            }
        }
        // Only the zygote and its child hold these now.
        drop((reply_theirs, argv, stdio, env));
        match sys::recv_tagged(reply_ours.as_raw_fd(), 1) {
            Ok(Some((pid, mut fds))) if fds.len() == 1 => {
                let pidfd = Pidfd::from_owned(fds.remove(0));
                Ok(Launched {
                    pid,
                    pidfd,
                    reply: reply_ours,
                })
            }
            Ok(_) => Err(SpawnError::Failed(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no launcher started",
            ))),
            Err(e) => Err(SpawnError::Failed(e)),
        }
    }
}
