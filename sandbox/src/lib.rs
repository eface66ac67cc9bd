//! `chitin-sandbox`: the jailer. The only crate of Chitin allowed `unsafe` (each block with a
//! `// SAFETY:` comment); also the allocator settings of the gateway process ([`memory`]),
//! since they need a libc call.
//!
//! A sandboxed command runs as a tree of four processes:
//!
//! ```text
//! L  launcher (`chitin-sandbox-launch`, forked by its zygote or exec'd; `chitin sandbox exec`
//! │    from the CLI; host namespaces, single-threaded until it clones)
//! │    measures the workspace against its quota; as root, prepares the user binds as
//! │    detached mount trees (the workspace ID-mapped for the sandbox's host uid);
//! │    clone(NEWUSER|NEWNS|NEWPID|NEWNET|NEWIPC|NEWUTS); writes the child's uid/gid maps and
//! │    joins it to the per-run cgroup; waits with the timeout; relays egress; captures output
//! └─ P  PID 1 of the new PID namespace: brings up loopback, creates egress listeners,
//!    │  builds the mount view (tmpfs root, read-only binds, workspace, /tmp, /dev, /proc),
//!    │  pivot_root; then supervises: seccomp notifications, reaping, exit report
//!    └─ C  the command: setsid, stdio, (root launcher: drops root's groups and becomes the
//!          unprivileged host id, see `ids`), rlimits, no_new_privs, capabilities dropped,
//!          landlock, seccomp (listener handed to P), close-on-exec of every other fd, execve
//! ```
//!
//! When C exits, P exits, and the kernel kills everything left in the PID namespace
//! (daemons included). On a timeout L kills P, which has the same effect.
//! Nothing here depends on the gateway; the gateway reaches this code through the zygote
//! (`chitin-sandbox-launch --serve`, [`zygote`]: one single-threaded process that forks a
//! launcher per call), or by spawning `chitin-sandbox-launch` (or `chitin sandbox exec`) when
//! the zygote cannot be reached, because namespace setup needs a single-threaded process.

mod cgroup;
pub mod fs;
pub mod host;
pub mod ids;
mod launch;
pub mod launcher;
pub mod memory;
pub mod pidfd;
pub mod quota;
pub mod seccomp;
pub mod secret_env;
mod support;
mod sys;
pub mod zygote;

pub use ids::HostIds;
pub use launch::{
    Captured, CgroupMode, ETC_VIEW, Exit, Killed, Limits, NetDest, Outcome, Output, Spec,
    etc_view as launch_etc_view, run,
};
pub use quota::Quota;
pub use secret_env::SecretEnv;
pub use support::{MIN_LANDLOCK_ABI, Support, check};

/// The directories every sandboxed run may write besides its workspace and `--rw` paths: the
/// private tmpfs mounts of the mount plan (the landlock rules grant writes nowhere else). The
/// gateway treats a program found under one of them as one the agent could have written.
pub const SCRATCH_DIRS: &[&str] = &["/tmp", "/dev/shm"];

use std::path::PathBuf;

/// The longest single argument or environment string one `execve` accepts, its NUL included
/// (the kernel's `MAX_ARG_STRLEN`, 32 pages).
pub const MAX_ARG_STRLEN: usize = 32 * 4096;

/// The most bytes of argument and environment strings (NULs and pointers included) one
/// `execve` accepts: `sysconf(_SC_ARG_MAX)` (a quarter of the stack limit) within the kernel's
/// own bounds (at least 128 KiB, at most 6 MiB); beyond it `execve` fails with `E2BIG`.
pub fn exec_args_limit() -> usize {
    const FLOOR: usize = 128 * 1024;
    const CEILING: usize = 6 * 1024 * 1024;
    usize::try_from(sys::arg_max()).map_or(FLOOR, |n| n.clamp(FLOOR, CEILING))
}

/// Errors of the jailer. Each names the layer that failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The kernel cannot give full enforcement; nothing was run.
    #[error(
        "sandbox unavailable: missing {}; sandboxed tools refuse to run without full enforcement (run `chitin sandbox check`)",
        missing.join(", ")
    )]
    Unavailable { missing: Vec<String> },
    /// The request itself is invalid (bad path, bad destination, ...).
    #[error("invalid sandbox request: {0}")]
    Invalid(String),
    /// A confinement step failed; nothing was run.
    #[error("sandbox setup failed at {layer}: {source}")]
    Setup {
        layer: String,
        source: std::io::Error,
    },
    /// The program could not be executed inside the sandbox.
    #[error("cannot execute {program} in the sandbox: {source}")]
    Exec {
        program: String,
        source: std::io::Error,
    },
    /// `run` was called from a multithreaded process.
    #[error(
        "the sandbox launcher must run in a single-threaded process (spawn `chitin sandbox exec`); this process has {0} threads"
    )]
    MultiThreaded(usize),
    /// A path given to the sandbox does not exist or is not allowed.
    #[error("sandbox path {path}: {reason}")]
    Path { path: PathBuf, reason: String },
}
