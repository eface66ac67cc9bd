//! A handle on one child process that can signal it without the pid-reuse race: the gateway
//! uses it to stop a running `chitin sandbox exec` launcher when a run is cancelled.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::sys;

/// A pidfd (Linux >= 5.3) for one process.
#[derive(Debug)]
pub struct Pidfd(OwnedFd);

impl Pidfd {
    /// Opens a pidfd for `pid`. Call it for an unreaped child of this process (e.g. right
    /// after `spawn`, before any `wait`): the pid cannot be reused before that.
    pub fn open(pid: u32) -> io::Result<Self> {
        let pid =
            libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        let fd = sys::pidfd_open(pid)?;
        // SAFETY: pidfd_open just returned this fd and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A pidfd received from elsewhere (the zygote's report of a launcher it started).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// Sends SIGTERM (a launcher then kills its sandbox and reports `killed: cancelled`).
    pub fn terminate(&self) -> io::Result<()> {
        sys::pidfd_send_signal(self.0.as_raw_fd(), libc::SIGTERM)
    }

    /// Sends SIGKILL (a launcher's sandbox then dies by PDEATHSIG).
    pub fn kill(&self) -> io::Result<()> {
        sys::pidfd_send_signal(self.0.as_raw_fd(), libc::SIGKILL)
    }
}
