//! Confining and running one command (see the crate docs for the process tree).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, NetPort, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use crate::cgroup::Cgroup;
use crate::support::MIN_LANDLOCK_ABI;
use crate::{SandboxError, seccomp, sys};

/// Inside the sandbox the command runs as this uid/gid, mapped to the launcher's euid/egid
/// when the launcher is unprivileged, and to an unprivileged host id when it is root (see
/// [`crate::ids`]). A non-zero uid means `execve` never grants capabilities.
pub const SANDBOX_UID: u32 = 1000;

/// Concurrent egress connections relayed for one sandbox.
const MAX_RELAYS: usize = 64;

/// `pid_max` inside the sandbox's PID namespace (the kernel's minimum is 301).
pub const PID_MAX: u32 = 301;

/// Resource limits of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Wall clock; the whole process tree is killed when it passes.
    pub timeout: Duration,
    /// Memory (cgroup `memory.max` when available; `RLIMIT_AS` is 4x this as a backstop, or
    /// exactly this when no cgroup can be made).
    pub memory_mb: u64,
    /// Processes/threads (cgroup `pids.max` and `RLIMIT_NPROC`).
    pub max_procs: u64,
    /// CPU seconds (`RLIMIT_CPU`: SIGXCPU, then SIGKILL one second later).
    pub cpu_secs: u64,
    /// Largest file the command may write (`RLIMIT_FSIZE`).
    pub file_size_mb: u64,
    /// Open files (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Size of the private `/tmp` (tmpfs).
    pub tmp_size_mb: u64,
    /// The workspace quota, checked before each run (see [`crate::quota`]): a run that starts
    /// at or over it cannot grow any file (`RLIMIT_FSIZE` 0); a run that starts under it
    /// cannot grow one file past what is left.
    pub workspace: crate::Quota,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            memory_mb: 512,
            max_procs: 64,
            cpu_secs: 30,
            file_size_mb: 256,
            open_files: 256,
            tmp_size_mb: 64,
            workspace: crate::Quota {
                bytes: 1024 << 20,
                inodes: 100_000,
            },
        }
    }
}

/// Whether memory and process limits use a per-run cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupMode {
    /// Use one when the host lets us create it; otherwise rlimits and pid_max only (the
    /// outcome's `cgroup` says which).
    #[default]
    Auto,
    /// Refuse to run without one.
    Required,
    /// Never (rlimits and pid_max only; saves the cgroup migration cost).
    Off,
}

/// A named egress destination `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDest {
    pub host: String,
    pub port: u16,
}

impl FromStr for NetDest {
    type Err = SandboxError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| SandboxError::Invalid(format!("network destination `{s}`: {why}"));
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be 1-65535"))?;
        // The one host parser (also used for web_fetch URLs): integer, hex, octal and
        // abbreviated IPv4 forms are IP literals, never names a resolver might read as one.
        let host = match crate::host::parse_host(host) {
            Ok(crate::host::Host::Name(n)) => n,
            Ok(crate::host::Host::Ip(std::net::IpAddr::V4(ip))) if ip.is_loopback() => {
                ip.to_string()
            }
            Ok(crate::host::Host::Ip(_)) => {
                return Err(bad(
                    "IP-literal destinations must be loopback IPv4 (integer, hex, octal and short forms such as 2130706433 or 127.1 count as IP literals); name the host instead (the name is pinned in the sandbox's /etc/hosts)",
                ));
            }
            Err(e) => return Err(bad(&e.to_string())),
        };
        Ok(Self { host, port })
    }
}

impl fmt::Display for NetDest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Where the command's stdout/stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The launcher's own stdout/stderr (pass-through).
    Inherit,
    /// Captured by the launcher, keeping at most `cap` bytes of each stream.
    Capture { cap: usize },
}

/// One sandboxed run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The read-write workspace (also the working directory and `$HOME`).
    pub workspace: PathBuf,
    /// Extra read-only paths (bound at the same path).
    pub ro: Vec<PathBuf>,
    /// Extra read-write paths (bound at the same path).
    pub rw: Vec<PathBuf>,
    /// Named egress destinations; empty means no network at all.
    pub net: Vec<NetDest>,
    pub limits: Limits,
    /// Extra environment variables (on top of the fixed allowlist).
    pub env: Vec<(String, String)>,
    /// Secret environment variables (released by policy; wiped on drop, never printed).
    pub secret_env: crate::SecretEnv,
    /// The program and its arguments (never a shell string).
    pub argv: Vec<String>,
    /// Working directory (must be inside the workspace); default: the workspace.
    pub cwd: Option<PathBuf>,
    pub output: Output,
    /// Paths no bound path may be inside of or contain (the Chitin state dir, other sessions).
    pub forbidden: Vec<PathBuf>,
    pub cgroup: CgroupMode,
    /// For a root launcher: the user whose `/etc/subuid`/`/etc/subgid` range gives the
    /// sandbox its host ids (else `nobody`); see [`crate::ids`].
    pub subid_user: String,
    /// Allow `socket(AF_UNIX)` (see [`crate::seccomp::program`]); off by default.
    pub unix_sockets: bool,
    /// `RLIMIT_AS` in MiB instead of the one derived from `memory_mb`: for a program that
    /// reserves far more address space than it uses (Chromium's V8 and Oilpan cages); its
    /// memory is then bounded by the cgroup's `memory.max` only.
    pub address_space_mb: Option<u64>,
}

impl Spec {
    /// A spec with default limits, no network and pass-through output.
    pub fn new(workspace: impl Into<PathBuf>, argv: Vec<String>) -> Self {
        Self {
            workspace: workspace.into(),
            ro: Vec::new(),
            rw: Vec::new(),
            net: Vec::new(),
            limits: Limits::default(),
            env: Vec::new(),
            secret_env: crate::SecretEnv::new(),
            argv,
            cwd: None,
            output: Output::Inherit,
            forbidden: Vec::new(),
            cgroup: CgroupMode::Auto,
            subid_user: crate::ids::DEFAULT_SUBID_USER.into(),
            unix_sockets: false,
            address_space_mb: None,
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// Shell-style status: the code, or 128 + signal.
    pub fn status(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Which limit (or filter) killed the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Killed {
    Timeout,
    Memory,
    Cpu,
    FileSize,
    /// A seccomp kill-class syscall (by name), or `abi` for a foreign-ABI syscall.
    Seccomp(String),
    /// The launcher was asked to stop (SIGTERM or SIGINT: a cancelled run) and killed the
    /// whole sandbox before reporting.
    Cancelled,
}

impl fmt::Display for Killed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Killed::Timeout => f.write_str("timeout"),
            Killed::Memory => f.write_str("memory"),
            Killed::Cpu => f.write_str("cpu"),
            Killed::FileSize => f.write_str("file-size"),
            Killed::Seccomp(s) => write!(f, "seccomp:{s}"),
            Killed::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Captured output of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captured {
    pub bytes: Vec<u8>,
    /// Bytes dropped after the cap.
    pub dropped: u64,
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub exit: Exit,
    pub killed: Option<Killed>,
    pub duration: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
    /// Whether a per-run cgroup enforced memory and pids (otherwise rlimits only).
    pub cgroup: bool,
}

// ---- status records from P/C to L: 16 bytes, atomic pipe writes ----------------------------

const REC_EXIT: u32 = 2;
const REC_SIGNAL: u32 = 3;
const REC_SECCOMP: u32 = 4;
const REC_CPU_USEC: u32 = 5;
const REC_SETUP: u32 = 6;
const REC_EXEC: u32 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
enum Stage {
    Cgroup = 1,
    Namespaces,
    IdMap,
    Loopback,
    Egress,
    Mount,
    Pivot,
    ForkCommand,
    Setsid,
    Stdio,
    Rlimits,
    Chdir,
    NoNewPrivs,
    Capabilities,
    Landlock,
    Seccomp,
    Handoff,
    Identity,
}

const STAGES: &[(Stage, &str)] = &[
    (Stage::Cgroup, "cgroup"),
    (
        Stage::Namespaces,
        "namespaces (unshare user/pid/net/mount/ipc/uts)",
    ),
    (Stage::IdMap, "uid/gid map"),
    (Stage::Loopback, "loopback interface"),
    (Stage::Egress, "egress listener"),
    (Stage::Mount, "mount view"),
    (Stage::Pivot, "pivot_root"),
    (Stage::ForkCommand, "fork of the command"),
    (Stage::Setsid, "setsid"),
    (Stage::Stdio, "stdio"),
    (Stage::Rlimits, "rlimits"),
    (Stage::Chdir, "working directory"),
    (Stage::NoNewPrivs, "no_new_privs"),
    (Stage::Capabilities, "capability drop"),
    (Stage::Landlock, "landlock"),
    (Stage::Seccomp, "seccomp"),
    (Stage::Handoff, "seccomp listener handoff"),
    (
        Stage::Identity,
        "sandbox uid/gid (setgroups, setresgid, setresuid)",
    ),
];

fn stage_name(code: i64, mounts: &[MountOp]) -> String {
    let stage = code & 0xffff;
    let index = code >> 16;
    let name = STAGES
        .iter()
        .find(|(s, _)| *s as i64 == stage)
        .map_or("unknown stage", |(_, n)| *n);
    if stage == Stage::Mount as i64
        && let Some(op) = usize::try_from(index).ok().and_then(|i| mounts.get(i))
    {
        return format!("{name} ({op})");
    }
    name.to_string()
}

fn record(fd: RawFd, kind: u32, a: i32, b: i64) {
    let mut buf = [0u8; 16];
    buf[..4].copy_from_slice(&kind.to_le_bytes());
    buf[4..8].copy_from_slice(&a.to_le_bytes());
    buf[8..].copy_from_slice(&b.to_le_bytes());
    let _ = sys::write_all(fd, &buf);
}

/// Reports a failed setup step to the launcher and leaves.
fn fail(fd: RawFd, stage: Stage, index: usize, e: &io::Error) -> ! {
    let idx = i64::try_from(index).unwrap_or(0);
    record(fd, REC_SETUP, sys::errno_of(e), (idx << 16) | stage as i64);
    sys::exit_now(125)
}

// ---- the mount plan --------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum MountOp {
    /// Bind `src` (host path) at `dst`; read-only or read-write.
    Bind {
        src: PathBuf,
        dst: PathBuf,
        rw: bool,
    },
    /// Bind a device node from the host's /dev.
    Dev {
        src: PathBuf,
        dst: PathBuf,
    },
    Symlink {
        target: PathBuf,
        dst: PathBuf,
    },
    Tmpfs {
        dst: PathBuf,
        mode: u32,
        size_mb: u64,
    },
    Proc {
        dst: PathBuf,
    },
    File {
        dst: PathBuf,
        contents: String,
    },
    /// Hide a /proc file the kernel shows to our (host) uid: bind /dev/null over it.
    Mask {
        dst: PathBuf,
    },
    /// Copy a small host file into the (read-only after setup) root: cheaper than a bind.
    Copy {
        src: PathBuf,
        dst: PathBuf,
    },
    /// A user bind prepared by a root launcher as a detached mount tree (`open_tree`), made
    /// read-only or ID-mapped there, and attached by P with `move_mount`: P (an unprivileged
    /// host uid's namespace) never resolves the host path itself.
    Attach {
        src: PathBuf,
        dst: PathBuf,
        rw: bool,
        dir: bool,
        /// The tree's fd (set by the launcher before the clone; -1 until then).
        fd: RawFd,
    },
}

impl fmt::Display for MountOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountOp::Bind { src, dst, rw } => write!(
                f,
                "bind {} -> {} {}",
                src.display(),
                dst.display(),
                if *rw { "rw" } else { "ro" }
            ),
            MountOp::Dev { src, .. } => write!(f, "device {}", src.display()),
            MountOp::Symlink { target, dst } => {
                write!(f, "symlink {} -> {}", dst.display(), target.display())
            }
            MountOp::Tmpfs { dst, .. } => write!(f, "tmpfs {}", dst.display()),
            MountOp::Proc { dst } => write!(f, "proc {}", dst.display()),
            MountOp::File { dst, .. } => write!(f, "file {}", dst.display()),
            MountOp::Copy { src, .. } => write!(f, "copy {}", src.display()),
            MountOp::Mask { dst } => write!(f, "mask {}", dst.display()),
            MountOp::Attach { src, dst, rw, .. } => write!(
                f,
                "attach {} -> {} {}",
                src.display(),
                dst.display(),
                if *rw { "rw, id-mapped" } else { "ro" }
            ),
        }
    }
}

const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
];
/// The read-only view of the host's `/etc`: only these entries (an allow-list; `name*` means
/// every entry starting with `name`), and of those only what any host user may read anyway
/// (world-readable files, world-readable and -searchable directories). `passwd`, `group`,
/// `hosts`, `hostname` and `resolv.conf` are the sandbox's own. Never shown: `shadow`,
/// `gshadow`, `sudoers*`, `ssl/private`, `ssh/`, `environment`, `profile.d`, package-manager
/// and service configuration (credentials live there).
pub const ETC_VIEW: &[&str] = &[
    // dynamic linker, name service, network
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "protocols",
    "services",
    "networks",
    // many /usr/bin programs are symlinks through /etc/alternatives
    "alternatives",
    // TLS trust (certificates only, never ssl/private)
    "ssl/certs",
    "ssl/openssl.cnf",
    "ca-certificates",
    "ca-certificates.conf",
    // time, locale, system identity
    "localtime",
    "timezone",
    "locale.alias",
    "locale.conf",
    "default/locale",
    "os-release",
    "lsb-release",
    "debian_version",
    "mtab",
    "shells",
    // programs' system-wide defaults
    "bash.bashrc",
    "profile",
    "inputrc",
    "mime.types",
    "magic",
    "magic.mime",
    "gitconfig",
    "perl",
    "python3*",
];
// Not masked because other layers already close them: `kcore` and `kmsg` need capabilities
// the sandbox lacks, `kallsyms` shows zeros without CAP_SYSLOG, `sysrq-trigger` and `sys/*` are
// on the read-only proc mount.
const MASKED_PROC: &[&str] = &[
    "keys",
    "key-users",
    "timer_list",
    "sched_debug",
    "latency_stats",
];
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

fn is_within(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir)
}

/// The forbidden paths as [`checked_path`] compares them: canonical where they resolve.
fn canonical_forbidden(forbidden: &[PathBuf]) -> Vec<PathBuf> {
    forbidden
        .iter()
        .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
        .collect()
}

/// Canonicalizes a user-given path and checks it against the forbidden list (canonicalized
/// by [`canonical_forbidden`], once per run rather than once per checked path).
fn checked_path(p: &Path, forbidden: &[PathBuf], what: &str) -> Result<PathBuf, SandboxError> {
    if !p.is_absolute() {
        return Err(SandboxError::Path {
            path: p.to_path_buf(),
            reason: format!("{what} must be an absolute path"),
        });
    }
    let c = std::fs::canonicalize(p).map_err(|e| SandboxError::Path {
        path: p.to_path_buf(),
        reason: format!("{what} cannot be resolved: {e}"),
    })?;
    if c == Path::new("/") {
        return Err(SandboxError::Path {
            path: p.to_path_buf(),
            reason: format!("{what} may not be the root directory"),
        });
    }
    for top in ["/proc", "/sys", "/dev"] {
        if is_within(&c, Path::new(top)) {
            return Err(SandboxError::Path {
                path: p.to_path_buf(),
                reason: format!("{what} may not be under {top}"),
            });
        }
    }
    for f in forbidden {
        if is_within(&c, f) || is_within(f, &c) {
            return Err(SandboxError::Path {
                path: p.to_path_buf(),
                reason: format!(
                    "{what} overlaps {} which sandboxes may never see",
                    f.display()
                ),
            });
        }
    }
    Ok(c)
}

/// Everything prepared before the first fork.
struct Plan {
    mounts: Vec<MountOp>,
    workspace: PathBuf,
    cwd: CString,
    ro: Vec<PathBuf>,
    rw: Vec<PathBuf>,
    net: Vec<(NetDest, [u8; 4])>,
    argv: Vec<CString>,
    env: Vec<CString>,
    /// `KEY=value` entries of the secret environment (wiped when the plan is dropped or
    /// when the launcher no longer needs them).
    secret_env: SecretCStrings,
    path_dirs: Vec<PathBuf>,
    bpf: &'static [libc::sock_filter],
    abi: ABI,
    /// The host ids of the command.
    ids: crate::HostIds,
    /// `RLIMIT_FSIZE` of the command in bytes (the per-file limit, lowered to what the
    /// workspace quota has left; 0 when the run starts over quota).
    fsize: u64,
}

fn cstring(b: &[u8], what: &str) -> Result<CString, SandboxError> {
    CString::new(b).map_err(|_| SandboxError::Invalid(format!("{what} contains a NUL byte")))
}

fn valid_env_key(k: &str) -> bool {
    let mut it = k.bytes();
    matches!(it.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && it.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `KEY=value` C strings holding secrets: wiped on drop (and by [`SecretCStrings::wipe`]).
#[derive(Default)]
struct SecretCStrings(Vec<CString>);

impl SecretCStrings {
    fn build(env: &crate::SecretEnv) -> Result<Self, SandboxError> {
        let mut out = Self(Vec::with_capacity(env.len()));
        for (k, v) in env.iter() {
            let mut b = Vec::with_capacity(k.len() + 1 + v.len() + 1);
            b.extend_from_slice(k.as_bytes());
            b.push(b'=');
            b.extend_from_slice(v);
            match CString::new(b) {
                Ok(c) => out.0.push(c),
                Err(e) => {
                    let mut b = e.into_vec();
                    sys::wipe(&mut b);
                    return Err(SandboxError::Invalid(format!(
                        "secret environment value of `{k}` contains a NUL byte"
                    )));
                }
            }
        }
        Ok(out)
    }

    fn wipe(&mut self) {
        for c in self.0.drain(..) {
            let mut b = c.into_bytes_with_nul();
            sys::wipe(&mut b);
        }
    }
}

impl Drop for SecretCStrings {
    fn drop(&mut self) {
        self.wipe();
    }
}

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";

fn abi_from(n: i32) -> ABI {
    match n {
        i32::MIN..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        _ => ABI::V7,
    }
}

impl Plan {
    fn new(spec: &Spec, abi: i32, ids: crate::HostIds) -> Result<Self, SandboxError> {
        if spec.argv.is_empty() {
            return Err(SandboxError::Invalid("no program given".into()));
        }
        let forbidden = canonical_forbidden(&spec.forbidden);
        let workspace = checked_path(&spec.workspace, &forbidden, "workspace")?;
        if !workspace.is_dir() {
            return Err(SandboxError::Path {
                path: workspace,
                reason: "workspace is not a directory".into(),
            });
        }
        let ro = spec
            .ro
            .iter()
            .map(|p| checked_path(p, &forbidden, "--ro path"))
            .collect::<Result<Vec<_>, _>>()?;
        let rw = spec
            .rw
            .iter()
            .map(|p| checked_path(p, &forbidden, "--rw path"))
            .collect::<Result<Vec<_>, _>>()?;
        let cwd = match &spec.cwd {
            None => workspace.clone(),
            Some(c) => {
                let c = checked_path(c, &forbidden, "working directory")?;
                if !is_within(&c, &workspace) {
                    return Err(SandboxError::Path {
                        path: c,
                        reason: "working directory must be inside the workspace".into(),
                    });
                }
                c
            }
        };

        // Network: each named host gets its own loopback address inside the sandbox.
        if spec.net.len() > 200 {
            return Err(SandboxError::Invalid(
                "too many network destinations".into(),
            ));
        }
        let mut host_addr: BTreeMap<String, [u8; 4]> = BTreeMap::new();
        let mut net = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for d in &spec.net {
            let addr = if d.host == "localhost" {
                [127, 0, 0, 1]
            } else if let Ok(ip) = d.host.parse::<Ipv4Addr>() {
                ip.octets()
            } else {
                let next = u8::try_from(10 + host_addr.len()).unwrap_or(250);
                *host_addr.entry(d.host.clone()).or_insert([127, 0, 0, next])
            };
            if !seen.insert((addr, d.port)) {
                continue;
            }
            net.push((d.clone(), addr));
        }

        // Environment: a fixed allowlist plus explicit entries.
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), workspace.to_string_lossy().into_owned());
        env.insert("LANG".into(), "C.UTF-8".into());
        env.insert("TERM".into(), "dumb".into());
        env.insert("USER".into(), "sandbox".into());
        env.insert("LOGNAME".into(), "sandbox".into());
        env.insert("TMPDIR".into(), "/tmp".into());
        env.insert("PWD".into(), cwd.to_string_lossy().into_owned());
        for (k, v) in &spec.env {
            if !valid_env_key(k) {
                return Err(SandboxError::Invalid(format!(
                    "environment key `{k}` must match [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
            env.insert(k.clone(), v.clone());
        }
        for k in spec.secret_env.names() {
            if env.contains_key(k) || crate::secret_env::FIXED_ENV_KEYS.contains(&k) {
                return Err(SandboxError::Invalid(format!(
                    "secret environment variable `{k}` would replace a variable the sandbox \
                     or --env sets"
                )));
            }
        }
        let secret_env = SecretCStrings::build(&spec.secret_env)?;
        let path_dirs = env
            .get("PATH")
            .map(|p| {
                p.split(':')
                    .filter(|d| d.starts_with('/'))
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let env = env
            .iter()
            .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "environment value"))
            .collect::<Result<Vec<_>, _>>()?;
        let argv = spec
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes(), "argument"))
            .collect::<Result<Vec<_>, _>>()?;

        let mounts = mount_plan(
            &workspace,
            &ro,
            &rw,
            &net,
            spec.limits.tmp_size_mb,
            ids.remapped(),
        )?;
        let bpf = seccomp::filter(spec.unix_sockets);
        Ok(Self {
            mounts,
            cwd: cstring(cwd.as_os_str().as_bytes(), "working directory")?,
            workspace,
            ro,
            rw,
            net,
            argv,
            env,
            secret_env,
            path_dirs,
            bpf,
            abi: abi_from(abi),
            ids,
            fsize: spec.limits.file_size_mb.saturating_mul(1 << 20),
        })
    }

    /// A root launcher's half of the user binds: each becomes a detached mount tree, private,
    /// nosuid and nodev; read-only ones read-only; the workspace and `--rw` paths ID-mapped
    /// through a user namespace mapping host uid/gid 0 (the owner of what the root gateway
    /// creates) to the sandbox's host ids. Inside, the command (that host id) then owns the
    /// workspace's files; what it creates is stored as owned by root, as the gateway's own
    /// files are. Nothing on disk changes owner or mode.
    fn open_trees(&mut self) -> Result<(), SandboxError> {
        if !self
            .mounts
            .iter()
            .any(|m| matches!(m, MountOp::Attach { .. }))
        {
            return Ok(());
        }
        let userns =
            idmap_userns(self.ids.uid, self.ids.gid).map_err(|source| SandboxError::Setup {
                layer: "ID-mapping user namespace for the workspace".into(),
                source,
            })?;
        let mut result = Ok(());
        for op in &mut self.mounts {
            let MountOp::Attach { src, rw, fd, .. } = op else {
                continue;
            };
            let opened = sys::open_tree_clone(&c(src)).and_then(|t| {
                let base = sys::MOUNT_ATTR_NOSUID | sys::MOUNT_ATTR_NODEV;
                let set = if *rw {
                    sys::mount_setattr_tree(t, base | sys::MOUNT_ATTR_IDMAP, Some(userns))
                } else {
                    sys::mount_setattr_tree(t, base | sys::MOUNT_ATTR_RDONLY, None)
                };
                match set {
                    Ok(()) => Ok(t),
                    Err(e) => {
                        sys::close(t);
                        Err(e)
                    }
                }
            });
            match opened {
                Ok(t) => *fd = t,
                Err(source) => {
                    let hint = if *rw {
                        "; the gateway runs as root, so the workspace must be ID-mapped for the \
                         sandbox's unprivileged uid: put it on a filesystem that supports \
                         ID-mapped mounts (ext4, xfs, btrfs, tmpfs on Linux >= 6.3) or run the \
                         gateway as an unprivileged user"
                    } else {
                        ""
                    };
                    result = Err(SandboxError::Path {
                        path: src.clone(),
                        reason: format!("cannot prepare the bind mount: {source}{hint}"),
                    });
                    break;
                }
            }
        }
        sys::close(userns);
        if result.is_err() {
            self.close_trees();
        }
        result
    }

    /// Closes the launcher's (or P's) copies of the detached trees.
    fn close_trees(&mut self) {
        for op in &mut self.mounts {
            if let MountOp::Attach { fd, .. } = op
                && *fd >= 0
            {
                sys::close(*fd);
                *fd = -1;
            }
        }
    }
}

/// A user namespace whose only mapping is uid 0 -> `uid` and gid 0 -> `gid` (host ids), used
/// as the idmapping of the workspace mount: on-disk owner 0 appears as `uid`, and files `uid`
/// creates are stored as owned by 0. Made by a short-lived child that waits on a pipe; the
/// namespace lives on through the returned fd.
fn idmap_userns(uid: u32, gid: u32) -> io::Result<RawFd> {
    let (r, w) = sys::pipe()?;
    let pid = match sys::clone_fork(libc::CLONE_NEWUSER) {
        Ok(p) => p,
        Err(e) => {
            sys::close(r);
            sys::close(w);
            return Err(e);
        }
    };
    if pid == 0 {
        sys::close(w);
        let mut b = [0u8; 1];
        let _ = sys::read(r, &mut b);
        sys::exit_now(0);
    }
    sys::close(r);
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let made = std::fs::write(dir.join("uid_map"), format!("0 {uid} 1"))
        .and_then(|()| std::fs::write(dir.join("setgroups"), "deny"))
        .and_then(|()| std::fs::write(dir.join("gid_map"), format!("0 {gid} 1")))
        .and_then(|()| {
            use std::os::fd::IntoRawFd;
            std::fs::File::open(dir.join("ns/user")).map(IntoRawFd::into_raw_fd)
        });
    sys::close(w);
    let _ = sys::wait4(pid, 0);
    made
}

fn mount_plan(
    workspace: &Path,
    ro: &[PathBuf],
    rw: &[PathBuf],
    net: &[(NetDest, [u8; 4])],
    tmp_size_mb: u64,
    attach: bool,
) -> Result<Vec<MountOp>, SandboxError> {
    let mut ops = Vec::new();
    for d in SYSTEM_DIRS {
        let p = Path::new(d);
        match std::fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(p).map_err(|e| SandboxError::Path {
                    path: p.to_path_buf(),
                    reason: e.to_string(),
                })?;
                ops.push(MountOp::Symlink {
                    target,
                    dst: p.to_path_buf(),
                });
            }
            Ok(m) if m.is_dir() => ops.push(MountOp::Bind {
                src: p.to_path_buf(),
                dst: p.to_path_buf(),
                rw: false,
            }),
            _ => {}
        }
    }
    if !Path::new("/usr").is_dir() {
        return Err(SandboxError::Path {
            path: "/usr".into(),
            reason: "the system directory /usr is missing".into(),
        });
    }
    // One `lstat` per entry: the metadata `etc_entries` judged the entry by decides its op.
    for (p, m) in etc_entries() {
        if m.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&p) {
                ops.push(MountOp::Symlink { target, dst: p });
            }
        } else if world_readable(&m) && m.is_file() && m.len() <= 256 * 1024 {
            ops.push(MountOp::Copy {
                src: p.clone(),
                dst: p,
            });
        } else if world_readable(&m) && (m.is_file() || m.is_dir()) {
            ops.push(MountOp::Bind {
                src: p.clone(),
                dst: p,
                rw: false,
            });
        }
    }
    let ws = workspace.to_string_lossy();
    ops.push(MountOp::File {
        dst: "/etc/passwd".into(),
        contents: format!(
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\nsandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:sandbox:{ws}:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    });
    ops.push(MountOp::File {
        dst: "/etc/group".into(),
        contents: format!("root:x:0:\nsandbox:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"),
    });
    let mut hosts = String::from("127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n");
    for (d, a) in net {
        if d.host.parse::<Ipv4Addr>().is_err() && d.host != "localhost" {
            hosts.push_str(&format!("{}.{}.{}.{} {}\n", a[0], a[1], a[2], a[3], d.host));
        }
    }
    ops.push(MountOp::File {
        dst: "/etc/hosts".into(),
        contents: hosts,
    });
    ops.push(MountOp::File {
        dst: "/etc/hostname".into(),
        contents: "sandbox\n".into(),
    });
    ops.push(MountOp::File {
        dst: "/etc/resolv.conf".into(),
        contents: "# no DNS inside the sandbox: allowed hosts are pinned in /etc/hosts\n".into(),
    });
    ops.push(MountOp::Tmpfs {
        dst: "/dev".into(),
        mode: 0o755,
        size_mb: 1,
    });
    for d in DEVICES {
        let p = Path::new("/dev").join(d);
        if p.exists() {
            ops.push(MountOp::Dev {
                src: p.clone(),
                dst: p,
            });
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ops.push(MountOp::Symlink {
            target: target.into(),
            dst: Path::new("/dev").join(name),
        });
    }
    ops.push(MountOp::Tmpfs {
        dst: "/dev/shm".into(),
        mode: 0o1777,
        size_mb: tmp_size_mb,
    });
    ops.push(MountOp::Proc {
        dst: "/proc".into(),
    });
    // As Docker's masked paths: files that list host-wide state by uid (keyring names of the
    // host user), kernel memory and timing side channels.
    for f in MASKED_PROC {
        ops.push(MountOp::Mask {
            dst: Path::new("/proc").join(f),
        });
    }
    ops.push(MountOp::Tmpfs {
        dst: "/tmp".into(),
        mode: 0o1777,
        size_mb: tmp_size_mb,
    });
    // User binds, parents before children.
    let mut user: Vec<(PathBuf, bool)> = ro.iter().map(|p| (p.clone(), false)).collect();
    user.extend(rw.iter().map(|p| (p.clone(), true)));
    user.push((workspace.to_path_buf(), true));
    user.sort_by_key(|(p, _)| p.components().count());
    for (p, rw) in user {
        if attach {
            ops.push(MountOp::Attach {
                dir: p.is_dir(),
                src: p.clone(),
                dst: p,
                rw,
                fd: -1,
            });
        } else {
            ops.push(MountOp::Bind {
                src: p.clone(),
                dst: p,
                rw,
            });
        }
    }
    Ok(ops)
}

/// The host paths of the `/etc` view: [`ETC_VIEW`] with globs expanded, only entries that
/// exist and are symlinks or world-readable, sorted.
pub fn etc_view() -> Vec<PathBuf> {
    etc_entries().into_iter().map(|(p, _)| p).collect()
}

/// [`etc_view`] with each entry's `symlink_metadata`, taken once.
fn etc_entries() -> Vec<(PathBuf, std::fs::Metadata)> {
    let etc = Path::new("/etc");
    let mut out = Vec::new();
    for e in ETC_VIEW {
        if let Some(prefix) = e.strip_suffix('*') {
            if let Ok(d) = std::fs::read_dir(etc) {
                out.extend(
                    d.filter_map(Result::ok)
                        .filter(|x| x.file_name().as_bytes().starts_with(prefix.as_bytes()))
                        .map(|x| x.path()),
                );
            }
        } else {
            out.push(etc.join(e));
        }
    }
    out.sort();
    out.dedup();
    out.into_iter()
        .filter_map(|p| {
            let m = std::fs::symlink_metadata(&p).ok()?;
            (m.file_type().is_symlink() || world_readable(&m)).then_some((p, m))
        })
        .collect()
}

/// Whether any host user may read this (files: o+r; directories: o+rx). Symlinks are judged
/// where they lead, inside the view.
fn world_readable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = m.permissions().mode();
    if m.is_dir() {
        mode & 0o005 == 0o005
    } else {
        mode & 0o004 != 0
    }
}

// ---- the launcher (L) ------------------------------------------------------------------------

/// Measures the workspace against its quota and lowers the command's file-size limit: to 0
/// when the run starts at or over the quota (files can only shrink or be deleted in this run;
/// the returned notice says so), else to what is left of the byte quota.
fn apply_quota(plan: &mut Plan, quota: &crate::Quota) -> Result<Option<String>, SandboxError> {
    if quota.is_unlimited() {
        return Ok(None);
    }
    let usage = crate::quota::measure(&plan.workspace, quota).map_err(|e| SandboxError::Path {
        path: e.path,
        reason: format!(
            "cannot measure the workspace for its quota ({}); nothing ran: make every \
             directory of the workspace readable and searchable by the gateway's user",
            e.source
        ),
    })?;
    if quota.exceeded_by(&usage) {
        plan.fsize = 0;
        return Ok(Some(format!(
            "the workspace is over its quota ({} of at most {} bytes and {} inodes): no file \
             can grow in this run (writes fail with \"File too large\"); delete files to get \
             under the quota",
            usage, quota.bytes, quota.inodes
        )));
    }
    if let Some(left) = quota.bytes_left(&usage) {
        plan.fsize = plan.fsize.min(left);
    }
    Ok(None)
}

fn simulated_missing() -> Vec<String> {
    // Test hook that can only make the sandbox refuse (never weaker): names layers to treat as
    // missing, e.g. CHITIN_SANDBOX_SIMULATE_MISSING=landlock.
    std::env::var("CHITIN_SANDBOX_SIMULATE_MISSING")
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| format!("{s} (simulated)"))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `spec` confined. Must be called from a single-threaded process (the
/// `chitin sandbox exec` launcher); the gateway spawns that launcher instead of calling this.
pub fn run(spec: &Spec) -> Result<Outcome, SandboxError> {
    let threads = sys::thread_count();
    if threads != 1 {
        return Err(SandboxError::MultiThreaded(threads));
    }
    let mut missing = simulated_missing();
    let abi = sys::landlock_abi();
    if abi < MIN_LANDLOCK_ABI {
        missing.push(format!("landlock (ABI {abi}, need >= {MIN_LANDLOCK_ABI})"));
    }
    if !cfg!(target_arch = "x86_64") {
        missing.push("seccomp (only the x86_64 profile exists)".into());
    }
    if !missing.is_empty() {
        return Err(SandboxError::Unavailable { missing });
    }
    let ids = crate::ids::current(&spec.subid_user);
    let mut plan = Plan::new(spec, abi, ids)?;
    let notice = apply_quota(&mut plan, &spec.limits.workspace)?;
    if let (Some(n), Output::Inherit) = (&notice, spec.output) {
        eprintln!("chitin: {n}");
    }
    plan.open_trees()?;
    let setup = |layer: &str| {
        let layer = layer.to_string();
        move |source| SandboxError::Setup { layer, source }
    };

    let (st_r, st_w) = sys::pipe().map_err(setup("status pipe"))?;
    let capture = match spec.output {
        Output::Inherit => None,
        Output::Capture { cap } => Some((
            sys::pipe().map_err(setup("output pipe"))?,
            sys::pipe().map_err(setup("output pipe"))?,
            cap,
        )),
    };
    let egress = if plan.net.is_empty() {
        None
    } else {
        Some(sys::seqpacket_pair().map_err(setup("egress socket"))?)
    };
    let name = format!("chitin-sbx-{}", sys::getpid());
    let mem_bytes = spec.limits.memory_mb.saturating_mul(1 << 20);
    let cgroup = match spec.cgroup {
        CgroupMode::Off => None,
        CgroupMode::Auto => Cgroup::create(&name, mem_bytes, spec.limits.max_procs),
        CgroupMode::Required => Some(
            Cgroup::create(&name, mem_bytes, spec.limits.max_procs).ok_or_else(|| {
                SandboxError::Unavailable {
                    missing: vec![
                        "cgroup (sandbox.cgroup = \"required\", but no writable memory+pids cgroup)"
                            .into(),
                    ],
                }
            })?,
        ),
    };
    let start = Instant::now();

    let ctx = ChildCtx {
        st_w,
        st_r,
        capture: capture.map(|((_, ow), (_, ew), _)| (ow, ew)),
        egress: egress.map(|(_, c)| c),
        cgroup: cgroup.as_ref().map(|c| c.procs.clone()).unwrap_or_default(),
    };
    let (sync_r, sync_w) = sys::pipe().map_err(setup("sync pipe"))?;
    // SIGTERM/SIGINT (a cancelled run) are taken on a signalfd from here on, so the launcher
    // kills the whole sandbox and still reports, instead of dying with the sandbox left to
    // PDEATHSIG and its cgroup left behind. Blocked before `clone`: P inherits the mask (it
    // ignores them anyway as PID 1), C resets it before exec.
    let stop_fd = sys::stop_signal_fd().map_err(setup("signal mask"))?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    let pid_p =
        sys::clone_fork(flags).map_err(setup("namespaces (clone user/pid/net/mount/ipc/uts)"))?;
    if pid_p == 0 {
        sys::close(sync_w);
        sys::close(stop_fd);
        init(&plan, spec, &ctx, sync_r);
    }
    sys::close(sync_r);
    // The child has its own copy; the launcher no longer needs the secret values, nor the
    // mount trees.
    plan.secret_env.wipe();
    plan.close_trees();
    if let Err(e) = parent_setup(pid_p, &ctx, &plan.ids, sync_w) {
        sys::kill(pid_p, libc::SIGKILL);
        let _ = sys::wait4(pid_p, 0);
        sys::close(sync_w);
        sys::close(stop_fd);
        // P may have failed first (the sync pipe then breaks): its report names the step.
        sys::close(st_w);
        let mut buf = [0u8; 16];
        while let Ok(16) = sys::read(st_r, &mut buf) {
            let kind = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let a = i32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let mut b8 = [0u8; 8];
            b8.copy_from_slice(&buf[8..]);
            if kind == REC_SETUP {
                sys::close(st_r);
                return Err(SandboxError::Setup {
                    layer: stage_name(i64::from_le_bytes(b8), &plan.mounts),
                    source: io::Error::from_raw_os_error(a),
                });
            }
        }
        sys::close(st_r);
        return Err(e);
    }
    // sync_w stays open until P is reaped: P learns from its hang-up that the launcher is
    // gone.

    // Launcher side: one thread waits for P, the deadline and a stop request, and reads the
    // status records and the captured output as they come (no reader threads to start, join
    // and switch to on every run).
    sys::close(st_w);
    let mut pipes = Collector::new(st_r);
    if let Some(((or, ow), (er, ew), cap)) = capture {
        sys::close(ow);
        sys::close(ew);
        pipes.capture(or, er, cap);
    }
    let listeners: Arc<Mutex<Vec<RawFd>>> = Arc::default();
    if let Some((l, c)) = egress {
        sys::close(c);
        let dests: Vec<NetDest> = plan.net.iter().map(|(d, _)| d.clone()).collect();
        let listeners = Arc::clone(&listeners);
        std::thread::spawn(move || egress_broker(l, dests, listeners));
    }

    // Wait for P, with the wall-clock timeout.
    let mut timed_out = false;
    // pidfd_open (Linux >= 5.3) lets us sleep until P exits; without it, poll with WNOHANG.
    let pidfd = sys::pidfd_open(pid_p).ok();
    // A timeout too large for the clock means "a century", never a panic.
    let deadline = start
        .checked_add(spec.limits.timeout)
        .unwrap_or_else(|| start + Duration::from_secs(100 * 365 * 24 * 3600));
    let mut reaped: Option<i32> = None;
    let mut cancelled = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            timed_out = true;
            break;
        }
        let mut ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        if pidfd.is_none() {
            ms = ms.min(5);
        }
        let mut fds = vec![pidfd.unwrap_or(-1), stop_fd];
        fds.extend(pipes.fds());
        let ready = match sys::poll_in(&fds, ms) {
            Ok(r) => {
                pipes.pump(r.get(2..).unwrap_or_default());
                // P's end wins over a stop request that came at the same time.
                let done = pidfd.is_some() && r.first().is_some_and(|x| *x != 0);
                cancelled = !done && r.get(1).is_some_and(|x| *x != 0);
                done
            }
            Err(_) => false,
        };
        let ready = ready
            || (pidfd.is_none()
                && match sys::wait4(pid_p, libc::WNOHANG) {
                    Ok((p, s, _)) if p == pid_p => {
                        reaped = Some(s);
                        true
                    }
                    _ => false,
                });
        if ready || cancelled {
            break;
        }
    }
    sys::close(stop_fd);
    if timed_out || (cancelled && reaped.is_none()) {
        // P is PID 1 of the sandbox: its death kills every process in the namespace, and
        // P is reaped (below) only once all of them are gone.
        sys::kill(pid_p, libc::SIGKILL);
    }
    let p_status = match reaped {
        Some(s) => Some(s),
        None => sys::wait4(pid_p, 0).map(|(_, s, _)| s).ok(),
    };
    let duration = start.elapsed();
    sys::close(sync_w);
    if let Some(fd) = pidfd {
        sys::close(fd);
    }
    // Everything that could write to the pipes is gone with the namespace: read to the end.
    pipes.finish();
    for fd in listeners.lock().map(|l| l.clone()).unwrap_or_default() {
        // Wake the accept threads; the sandbox is gone.
        sys::shutdown(fd);
    }
    let Collector {
        records,
        stdout,
        stderr,
        ..
    } = pipes;
    let mut stderr = stderr;
    if let Some(n) = &notice {
        // The command's reader (the model, through the tool result) learns why writes fail.
        let mut b = format!("chitin: {n}\n").into_bytes();
        b.append(&mut stderr.bytes);
        stderr.bytes = b;
    }

    for &(kind, a, b) in &records {
        match kind {
            REC_SETUP => {
                return Err(SandboxError::Setup {
                    layer: stage_name(b, &plan.mounts),
                    source: io::Error::from_raw_os_error(a),
                });
            }
            REC_EXEC => {
                return Err(SandboxError::Exec {
                    program: spec.argv.first().cloned().unwrap_or_default(),
                    source: io::Error::from_raw_os_error(a),
                });
            }
            _ => {}
        }
    }
    let exit = records.iter().rev().find_map(|&(k, a, _)| match k {
        REC_EXIT => Some(Exit::Code(a)),
        REC_SIGNAL => Some(Exit::Signal(a)),
        _ => None,
    });
    let seccomp_kill = records.iter().find_map(|&(k, _, b)| {
        (k == REC_SECCOMP)
            .then(|| seccomp::syscall_name(b).map_or_else(|| format!("nr{b}"), str::to_string))
    });
    let cpu_usec = records
        .iter()
        .find_map(|&(k, _, b)| (k == REC_CPU_USEC).then_some(b))
        .unwrap_or(0);
    let exit = match (exit, timed_out || cancelled) {
        (Some(e), _) => e,
        (None, true) => Exit::Signal(libc::SIGKILL),
        (None, false) => {
            let detail = match p_status {
                Some(s) if libc::WIFSIGNALED(s) => format!("signal {}", libc::WTERMSIG(s)),
                Some(s) => format!("status {}", libc::WEXITSTATUS(s)),
                None => "unknown".into(),
            };
            return Err(SandboxError::Setup {
                layer: format!("sandbox init (ended with {detail} before reporting)"),
                source: io::Error::from_raw_os_error(libc::ECHILD),
            });
        }
    };
    let oom = cgroup.as_ref().map_or(0, Cgroup::oom_kills);
    let cpu_limit_usec =
        i64::try_from(spec.limits.cpu_secs.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
    let killed = if timed_out {
        Some(Killed::Timeout)
    } else if cancelled {
        Some(Killed::Cancelled)
    } else if let Some(name) = seccomp_kill {
        Some(Killed::Seccomp(name))
    } else {
        match exit {
            Exit::Signal(libc::SIGKILL) if oom > 0 => Some(Killed::Memory),
            Exit::Signal(libc::SIGXCPU) => Some(Killed::Cpu),
            Exit::Signal(libc::SIGKILL) if cpu_usec >= cpu_limit_usec => Some(Killed::Cpu),
            Exit::Signal(libc::SIGXFSZ) => Some(Killed::FileSize),
            Exit::Signal(libc::SIGSYS) => Some(Killed::Seccomp("abi".into())),
            _ => None,
        }
    };
    let exit = match &killed {
        Some(Killed::Seccomp(_)) => Exit::Signal(libc::SIGSYS),
        _ => exit,
    };
    Ok(Outcome {
        exit,
        killed,
        duration,
        stdout,
        stderr,
        cgroup: cgroup.is_some(),
    })
}

/// The launcher's ends of the status pipe and the output pipes, read as they become
/// readable: 16-byte status records, and each output stream kept up to its cap (the rest
/// counted as dropped).
struct Collector {
    /// (fd, stream): 0 status, 1 stdout, 2 stderr; closed ones are removed.
    open: Vec<(RawFd, u8)>,
    status: Vec<u8>,
    records: Vec<(u32, i32, i64)>,
    stdout: Captured,
    stderr: Captured,
    cap: usize,
    buf: Vec<u8>,
}

impl Collector {
    fn new(status: RawFd) -> Self {
        Self {
            open: vec![(status, 0)],
            status: Vec::new(),
            records: Vec::new(),
            stdout: Captured::default(),
            stderr: Captured::default(),
            cap: 0,
            buf: vec![0u8; 65536],
        }
    }

    fn capture(&mut self, out: RawFd, err: RawFd, cap: usize) {
        self.open.push((out, 1));
        self.open.push((err, 2));
        self.cap = cap;
    }

    fn fds(&self) -> Vec<RawFd> {
        self.open.iter().map(|(fd, _)| *fd).collect()
    }

    /// One read from each pipe `revents` (in [`Self::fds`] order) says is readable or closed.
    fn pump(&mut self, revents: &[libc::c_short]) {
        let ready: Vec<(RawFd, u8)> = self
            .open
            .iter()
            .zip(revents)
            .filter(|(_, r)| **r != 0)
            .map(|(x, _)| *x)
            .collect();
        for (fd, stream) in ready {
            self.read_once(fd, stream);
        }
    }

    fn read_once(&mut self, fd: RawFd, stream: u8) {
        let n = match sys::read(fd, &mut self.buf) {
            Ok(n) if n > 0 => n,
            _ => {
                sys::close(fd);
                self.open.retain(|(f, _)| *f != fd);
                return;
            }
        };
        let chunk = self.buf.get(..n).unwrap_or_default();
        match stream {
            0 => {
                self.status.extend_from_slice(chunk);
                while self.status.len() >= 16 {
                    let rec: Vec<u8> = self.status.drain(..16).collect();
                    let kind = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
                    let a = i32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
                    let mut b8 = [0u8; 8];
                    b8.copy_from_slice(&rec[8..]);
                    self.records.push((kind, a, i64::from_le_bytes(b8)));
                }
            }
            s => {
                let out = if s == 1 {
                    &mut self.stdout
                } else {
                    &mut self.stderr
                };
                let room = self.cap.saturating_sub(out.bytes.len());
                let keep = room.min(n);
                out.bytes
                    .extend_from_slice(chunk.get(..keep).unwrap_or_default());
                out.dropped += u64::try_from(n - keep).unwrap_or(0);
            }
        }
    }

    /// Reads every pipe to its end (the writers are gone).
    fn finish(&mut self) {
        while !self.open.is_empty() {
            let fds = self.fds();
            match sys::poll_in(&fds, -1) {
                Ok(r) => self.pump(&r),
                Err(_) => {
                    for (fd, _) in self.open.drain(..) {
                        sys::close(fd);
                    }
                }
            }
        }
    }
}

/// Receives the listening sockets the sandbox init created inside its network namespace and
/// relays each accepted connection to the one destination that listener stands for.
fn egress_broker(sock: RawFd, dests: Vec<NetDest>, listeners: Arc<Mutex<Vec<RawFd>>>) {
    let active = Arc::new(AtomicUsize::new(0));
    while let Ok(Some((idx, Some(fd)))) = sys::recv_fd(sock) {
        let Some(dest) = usize::try_from(idx)
            .ok()
            .and_then(|i| dests.get(i))
            .cloned()
        else {
            sys::close(fd);
            continue;
        };
        if let Ok(mut l) = listeners.lock() {
            l.push(fd);
        }
        // SAFETY: fd is a listening TCP socket we just received over SCM_RIGHTS and now own
        // exclusively (nothing else closes it).
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        let active = Arc::clone(&active);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(inside) = conn else { break };
                // Bounded: a sandbox cannot make the launcher spawn threads without limit.
                if active.fetch_add(1, Ordering::SeqCst) >= MAX_RELAYS {
                    active.fetch_sub(1, Ordering::SeqCst);
                    continue; // dropping `inside` resets the connection
                }
                let dest = dest.clone();
                let active = Arc::clone(&active);
                std::thread::spawn(move || {
                    relay(inside, &dest);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
    }
    sys::close(sock);
}

fn relay(inside: TcpStream, dest: &NetDest) {
    let Ok(outside) = TcpStream::connect((dest.host.as_str(), dest.port)) else {
        return; // dropping `inside` resets the sandbox's connection
    };
    let (Ok(mut in_r), Ok(mut out_r)) = (inside.try_clone(), outside.try_clone()) else {
        return;
    };
    let (mut in_w, mut out_w) = (inside, outside);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut in_r, &mut out_w);
        let _ = out_w.shutdown(std::net::Shutdown::Write);
    });
    let _ = io::copy(&mut out_r, &mut in_w);
    let _ = in_w.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

// ---- shared by L and P ---------------------------------------------------------------------

struct ChildCtx {
    st_w: RawFd,
    st_r: RawFd,
    capture: Option<(RawFd, RawFd)>,
    egress: Option<RawFd>,
    cgroup: Vec<PathBuf>,
}

/// Sync bytes L sends P on the setup pipe.
const SYNC_MAPPED: u8 = 1;
const SYNC_CGROUP: u8 = 2;

/// L's half of the setup, after `clone`: uid/gid maps, then the cgroup join (the slow part on
/// cgroup v1, which P overlaps with building the view). Each step is acknowledged to P on the
/// sync pipe; P forks the command only after the cgroup step.
fn parent_setup(
    pid_p: libc::pid_t,
    ctx: &ChildCtx,
    ids: &crate::HostIds,
    sync_w: RawFd,
) -> Result<(), SandboxError> {
    let setup = |layer: &str| {
        let layer = layer.to_string();
        move |source| SandboxError::Setup { layer, source }
    };
    let proc_dir = PathBuf::from(format!("/proc/{pid_p}"));
    // An unprivileged launcher may map only itself, and must deny setgroups to map its gid.
    // A root launcher maps the sandbox to another host id; P still runs as host root (unmapped
    // inside) until the command drops to SANDBOX_UID, and setgroups stays allowed so that
    // the command can first drop root's supplementary groups.
    if !ids.remapped() {
        std::fs::write(proc_dir.join("setgroups"), "deny").map_err(setup("uid/gid map"))?;
    }
    std::fs::write(
        proc_dir.join("uid_map"),
        format!("{SANDBOX_UID} {} 1", ids.uid),
    )
    .map_err(setup("uid/gid map"))?;
    std::fs::write(
        proc_dir.join("gid_map"),
        format!("{SANDBOX_UID} {} 1", ids.gid),
    )
    .map_err(setup("uid/gid map"))?;
    sys::write_all(sync_w, &[SYNC_MAPPED]).map_err(setup("sandbox init"))?;
    let me = pid_p.to_string();
    for procs in &ctx.cgroup {
        std::fs::write(procs, &me).map_err(setup("cgroup"))?;
    }
    sys::write_all(sync_w, &[SYNC_CGROUP]).map_err(setup("sandbox init"))?;
    Ok(())
}

/// Waits for one sync byte from L; anything else (L gone, setup failed) ends P.
fn await_sync(sync_r: RawFd, want: u8) {
    let mut b = [0u8; 1];
    match sys::read(sync_r, &mut b) {
        Ok(1) if b[0] == want => {}
        _ => sys::exit_now(125),
    }
}

// ---- P: PID 1 of the sandbox -----------------------------------------------------------------

fn init(plan: &Plan, spec: &Spec, ctx: &ChildCtx, sync_r: RawFd) -> ! {
    let st = ctx.st_w;
    sys::close(ctx.st_r);
    // Die with the launcher. If it is already gone, the sync pipe reads EOF just below.
    if sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).is_err() {
        sys::exit_now(125);
    }
    // Files can be created only once our uid is mapped.
    await_sync(sync_r, SYNC_MAPPED);
    // A root launcher mapped SANDBOX_UID to an unprivileged host id and left us host root
    // (unmapped here): drop root's supplementary groups (kept across clone) and become that
    // id before anything else. The capabilities in this namespace stay (no uid 0 is mapped,
    // so no setuid fixup applies) until the command drops them; the host paths read while
    // building the view are then read as that unprivileged id.
    if plan.ids.remapped()
        && let Err(e) =
            sys::setgroups_none().and_then(|()| sys::become_ids(SANDBOX_UID, SANDBOX_UID))
    {
        fail(st, Stage::Identity, 0, &e);
    }
    if plan.ids.remapped() {
        // The credential change cleared the parent-death signal: set it again, then make
        // sure the launcher did not die before that (it holds the sync pipe's write end
        // until it has reaped us, so a hang-up means it is gone).
        if sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong).is_err() {
            sys::exit_now(125);
        }
        match sys::poll_in(&[sync_r], 0) {
            Ok(r) if r.first().is_some_and(|x| x & libc::POLLHUP == 0) => {}
            _ => sys::exit_now(125),
        }
    }
    // Not dumpable: /proc/1/* of the init stays closed to the command.
    let _ = sys::prctl(libc::PR_SET_DUMPABLE, 0);
    let _ = sys::sethostname(b"sandbox");
    if let Err(e) = sys::loopback_up() {
        fail(st, Stage::Loopback, 0, &e);
    }
    if let Some(sock) = ctx.egress {
        for (i, (d, addr)) in plan.net.iter().enumerate() {
            let fd = match sys::tcp_listen(*addr, d.port) {
                Ok(fd) => fd,
                Err(e) => fail(st, Stage::Egress, i, &e),
            };
            let tag = u32::try_from(i).unwrap_or(u32::MAX);
            if let Err(e) = sys::send_fds(sock, tag, &[fd]) {
                fail(st, Stage::Egress, i, &e);
            }
            sys::close(fd);
        }
        sys::close(sock);
    }
    // Per-PID-namespace pid_max (Linux >= 6.14): at most ~300 tasks can exist in the sandbox
    // whatever the uid, a cap that holds even where RLIMIT_NPROC does not (uid 0) and no
    // cgroup can be made. Older kernels lack the per-namespace knob: the write fails and the
    // cgroup / RLIMIT_NPROC layers remain.
    let _ = std::fs::write("/proc/sys/kernel/pid_max", PID_MAX.to_string());
    build_view(plan, spec, st);
    // The command must be born inside the cgroup.
    await_sync(sync_r, SYNC_CGROUP);
    sys::close(sync_r);

    let sigfd = match sys::sigchld_fd() {
        Ok(fd) => fd,
        Err(e) => fail(st, Stage::ForkCommand, 0, &e),
    };
    let (notify_p, notify_c) = match sys::seqpacket_pair() {
        Ok(p) => p,
        Err(e) => fail(st, Stage::ForkCommand, 0, &e),
    };
    let pid_c = match sys::fork() {
        Ok(p) => p,
        Err(e) => fail(st, Stage::ForkCommand, 0, &e),
    };
    if pid_c == 0 {
        sys::close(notify_p);
        sys::close(sigfd);
        command(plan, spec, ctx, notify_c);
    }
    sys::close(notify_c);
    if let Some((o, e)) = ctx.capture {
        sys::close(o);
        sys::close(e);
    }
    let listener = match sys::recv_fd(notify_p) {
        Ok(Some((_, Some(fd)))) => Some(fd),
        _ => None,
    };
    sys::close(notify_p);
    supervise(st, sigfd, listener, pid_c)
}

fn supervise(st: RawFd, sigfd: RawFd, mut listener: Option<RawFd>, pid_c: libc::pid_t) -> ! {
    let mut killed_all = false;
    loop {
        let mut fds = vec![sigfd];
        if let Some(l) = listener {
            fds.push(l);
        }
        let Ok(rev) = sys::poll_in(&fds, -1) else {
            sys::exit_now(125);
        };
        if let (Some(l), Some(&r)) = (listener, rev.get(1)) {
            if r & libc::POLLIN != 0 {
                if let Ok(n) = sys::seccomp_notif_recv(l) {
                    if !killed_all {
                        record(st, REC_SECCOMP, 0, i64::from(n.data.nr));
                        killed_all = true;
                    }
                    // Everything in the namespace dies; the call itself never runs.
                    sys::kill(-1, libc::SIGKILL);
                    sys::seccomp_notif_deny(l, n.id, libc::EPERM);
                }
            } else if r & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                sys::close(l);
                listener = None;
            }
        }
        if rev.first().is_some_and(|r| *r != 0) {
            let mut drainbuf = [0u8; 128];
            while sys::read(sigfd, &mut drainbuf).is_ok_and(|n| n > 0) {}
        }
        loop {
            match sys::wait4(-1, libc::WNOHANG) {
                Ok((0, _, _)) | Err(_) => break,
                Ok((pid, status, ru)) if pid == pid_c => {
                    let usec = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
                    record(st, REC_CPU_USEC, 0, usec(ru.ru_utime) + usec(ru.ru_stime));
                    if libc::WIFSIGNALED(status) {
                        record(st, REC_SIGNAL, libc::WTERMSIG(status), 0);
                    } else {
                        record(st, REC_EXIT, libc::WEXITSTATUS(status), 0);
                    }
                    // Leaving as PID 1 makes the kernel kill everything left in the namespace.
                    sys::exit_now(0);
                }
                Ok(_) => {}
            }
        }
    }
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

fn mkdir_p(p: &Path) -> io::Result<()> {
    std::fs::create_dir_all(p)
}

/// The directories of the view under construction (under [`NEW`]) that are known to exist,
/// and whether each is *fresh*: every entry in it was made by the view builder, so a name it
/// has not made there does not exist. Lets the builder create exactly the missing
/// directories, parents first, without a failing `mkdir` (`EEXIST`) or a `stat` per path
/// (`create_dir_all` tries `mkdir` on every path first). A directory whose contents come from
/// elsewhere (a bind, `/proc`) is not fresh: there, existence is checked as before.
struct Dirs {
    known: BTreeMap<PathBuf, bool>,
}

impl Dirs {
    /// The new root, a fresh tmpfs.
    fn new() -> Self {
        Self {
            known: BTreeMap::from([(PathBuf::from(NEW), true)]),
        }
    }

    /// Makes `d` a directory, as `create_dir_all` would (the same result and the same
    /// errors), creating only what is missing.
    fn ensure(&mut self, d: &Path) -> io::Result<()> {
        if self.known.contains_key(d) {
            return Ok(());
        }
        let parent_fresh = match d.parent() {
            Some(p) => {
                self.ensure(p)?;
                self.known.get(p).copied().unwrap_or(false)
            }
            None => return Ok(()),
        };
        if parent_fresh {
            match std::fs::create_dir(d) {
                Ok(()) => {
                    self.known.insert(d.to_path_buf(), true);
                }
                // A file or symlink the builder made there (never the case in the plan).
                Err(_) if d.is_dir() => {
                    self.known.insert(d.to_path_buf(), false);
                }
                Err(e) => return Err(e),
            }
        } else if d.is_dir() {
            self.known.insert(d.to_path_buf(), false);
        } else {
            std::fs::create_dir(d)?;
            self.known.insert(d.to_path_buf(), true);
        }
        Ok(())
    }

    /// The parent of `d` (a file or symlink to be made) as a directory.
    fn parent(&mut self, d: &Path) -> io::Result<()> {
        match d.parent() {
            Some(p) => self.ensure(p),
            None => Ok(()),
        }
    }

    /// Something was mounted on the directory `d`: what was known below it is hidden, and its
    /// entries are now the mount's (`fresh` for a new tmpfs).
    fn mounted(&mut self, d: &Path, fresh: bool) {
        self.known.retain(|k, _| k == d || !k.starts_with(d));
        self.known.insert(d.to_path_buf(), fresh);
    }
}

/// Copies a small host file into the view: the same result as `std::fs::copy` (contents and
/// the exact mode bits of the source, which must be a regular file) without its
/// `copy_file_range` attempt, which fails on every run between two filesystems (the host's
/// and the view's tmpfs) before it falls back to `sendfile`. The destination is new.
fn copy_file(src: &Path, dst: &Path) -> io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut from = std::fs::File::open(src)?;
    let meta = from.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the source path is neither a regular file nor a symlink to a regular file",
        ));
    }
    // Plain reads into a buffer one byte larger than the file (`read_to_end` would `statx`
    // and `lseek` again for its size hint): a file of the size `fstat` gave is read in one
    // `read` and its end seen by a second.
    let mut buf = vec![0u8; usize::try_from(meta.len()).unwrap_or(0).saturating_add(1)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            // The file grew since `fstat`: read on (what ends up in the view is what a read
            // to the end gives, as with `std::fs::copy`).
            buf.resize(len.saturating_mul(2), 0);
        }
        match from.read(buf.get_mut(len..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    let perm = meta.permissions();
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(perm.mode())
        .open(dst)?;
    to.write_all(&buf)?;
    // The exact mode whatever the umask, as `std::fs::copy` sets it.
    to.set_permissions(perm)
}

const OLD: &str = "/.old";
const NEW: &str = "/.new";

fn under(root: &str, p: &Path) -> PathBuf {
    let rel: PathBuf = p
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .collect();
    Path::new(root).join(rel)
}

/// Remounts a bind mount read-only (or just nosuid/nodev), keeping the flags the kernel locks.
fn remount(dst: &CStr, ro: bool, dev: bool) -> io::Result<()> {
    let f = sys::mount_flags(dst)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    if !dev {
        flags |= libc::MS_NODEV;
    }
    if ro {
        flags |= libc::MS_RDONLY;
    }
    for (st, ms) in [
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
        (libc::ST_RDONLY, libc::MS_RDONLY),
    ] {
        if f & st != 0 {
            flags |= ms;
        }
    }
    sys::mount(None, dst, None, flags, None)
}

/// Builds the sandbox's filesystem view and pivots into it.
fn build_view(plan: &Plan, spec: &Spec, st: RawFd) {
    let m = |i: usize, r: io::Result<()>| {
        if let Err(e) = r {
            fail(st, Stage::Mount, i, &e);
        }
    };
    let root = c(Path::new("/"));
    m(
        0,
        sys::mount(None, &root, None, libc::MS_REC | libc::MS_PRIVATE, None),
    );
    // Staging: a tmpfs on /tmp (private to this namespace), pivoted into so the host root is
    // reachable at /.old while the new root is assembled at /.new.
    let stage = c(Path::new("/tmp"));
    let tmpfs = c(Path::new("tmpfs"));
    m(
        0,
        sys::mount(
            Some(&tmpfs),
            &stage,
            Some(&tmpfs),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&c(Path::new("mode=0755,size=1m"))),
        ),
    );
    m(0, mkdir_p(Path::new("/tmp/.old")));
    m(0, mkdir_p(Path::new("/tmp/.new")));
    if let Err(e) = sys::pivot_root(&stage, &c(Path::new("/tmp/.old"))) {
        fail(st, Stage::Pivot, 0, &e);
    }
    m(0, sys::chdir(&root));
    let newroot = c(Path::new(NEW));
    m(
        0,
        sys::mount(
            Some(&tmpfs),
            &newroot,
            Some(&tmpfs),
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&c(Path::new("mode=0755,size=4m,nr_inodes=4096"))),
        ),
    );
    let mut dirs = Dirs::new();
    for (i, op) in plan.mounts.iter().enumerate() {
        m(i, apply(op, spec, &mut dirs));
        if let MountOp::Attach { fd, .. } = op {
            sys::close(*fd);
        }
    }
    let _ = &plan.workspace;
    // The root itself becomes read-only.
    m(
        plan.mounts.len(),
        sys::mount(
            None,
            &newroot,
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        ),
    );
    if let Err(e) = sys::chdir(&newroot)
        .and_then(|()| {
            let dot = c(Path::new("."));
            sys::pivot_root(&dot, &dot)
        })
        .and_then(|()| sys::umount_detach(&c(Path::new("."))))
        .and_then(|()| sys::chdir(&root))
    {
        fail(st, Stage::Pivot, 1, &e);
    }
}

fn apply(op: &MountOp, spec: &Spec, dirs: &mut Dirs) -> io::Result<()> {
    match op {
        MountOp::Bind { src, dst, rw } => {
            let s = under(OLD, src);
            let d = under(NEW, dst);
            let dir = std::fs::metadata(&s)?.is_dir();
            if dir {
                dirs.ensure(&d)?;
            } else {
                dirs.parent(&d)?;
                if !d.exists() {
                    std::fs::write(&d, b"")?;
                }
            }
            let dc = c(&d);
            sys::mount(Some(&c(&s)), &dc, None, libc::MS_BIND | libc::MS_REC, None)?;
            if dir {
                dirs.mounted(&d, false);
            }
            remount(&dc, !rw, false)
        }
        MountOp::Dev { src, dst } => {
            let s = under(OLD, src);
            let d = under(NEW, dst);
            std::fs::write(&d, b"")?;
            // The bind keeps the host devtmpfs mount's flags (nosuid, noexec); no remount.
            sys::mount(Some(&c(&s)), &c(&d), None, libc::MS_BIND, None)
        }
        MountOp::Symlink { target, dst } => {
            let d = under(NEW, dst);
            dirs.parent(&d)?;
            std::os::unix::fs::symlink(target, d)
        }
        MountOp::Tmpfs { dst, mode, size_mb } => {
            let d = under(NEW, dst);
            dirs.ensure(&d)?;
            let t = c(Path::new("tmpfs"));
            let data = c(Path::new(&format!("mode={mode:o},size={size_mb}m")));
            let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
            if dst != Path::new("/tmp") {
                flags |= libc::MS_NOEXEC;
            }
            sys::mount(Some(&t), &c(&d), Some(&t), flags, Some(&data))?;
            dirs.mounted(&d, true);
            Ok(())
        }
        MountOp::Proc { dst } => {
            let d = under(NEW, dst);
            dirs.ensure(&d)?;
            let p = c(Path::new("proc"));
            sys::mount(
                Some(&p),
                &c(&d),
                Some(&p),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                None,
            )?;
            dirs.mounted(&d, false);
            Ok(())
        }
        MountOp::Mask { dst } => {
            let d = under(NEW, dst);
            if !d.exists() {
                return Ok(());
            }
            let dc = c(&d);
            sys::mount(
                Some(&c(&under(NEW, Path::new("/dev/null")))),
                &dc,
                None,
                libc::MS_BIND,
                None,
            )?;
            remount(&dc, true, true)
        }
        MountOp::Attach { dst, dir, fd, .. } => {
            let d = under(NEW, dst);
            if *dir {
                dirs.ensure(&d)?;
            } else {
                dirs.parent(&d)?;
                if !d.exists() {
                    std::fs::write(&d, b"")?;
                }
            }
            sys::move_mount_to(*fd, &c(&d))?;
            if *dir {
                dirs.mounted(&d, false);
            }
            Ok(())
        }
        MountOp::Copy { src, dst } => {
            let d = under(NEW, dst);
            dirs.parent(&d)?;
            copy_file(&under(OLD, src), &d)
        }
        MountOp::File { dst, contents } => {
            let d = under(NEW, dst);
            dirs.parent(&d)?;
            let _ = spec;
            std::fs::write(d, contents)
        }
    }
}

// ---- C: the command --------------------------------------------------------------------------

fn command(plan: &Plan, spec: &Spec, ctx: &ChildCtx, notify: RawFd) -> ! {
    let st = ctx.st_w;
    sys::reset_signals();
    if let Err(e) = sys::setsid() {
        fail(st, Stage::Setsid, 0, &e);
    }
    if let Some((o, e)) = ctx.capture
        && let Err(err) = sys::dup2(o, 1).and_then(|()| sys::dup2(e, 2))
    {
        fail(st, Stage::Stdio, 0, &err);
    }
    if plan.fsize == 0 {
        // Over quota: a write fails with EFBIG ("File too large") instead of killing.
        sys::ignore_sigxfsz();
    }
    let l = &spec.limits;
    let mb = |x: u64| x.saturating_mul(1 << 20);
    let as_limit = match spec.address_space_mb {
        Some(a) => mb(a),
        None if ctx.cgroup.is_empty() => mb(l.memory_mb),
        None => mb(l.memory_mb).saturating_mul(4),
    };
    let limits = [
        (libc::RLIMIT_AS, as_limit, as_limit),
        (libc::RLIMIT_NPROC, l.max_procs, l.max_procs),
        (libc::RLIMIT_FSIZE, plan.fsize, plan.fsize),
        (libc::RLIMIT_CPU, l.cpu_secs, l.cpu_secs.saturating_add(1)),
        (libc::RLIMIT_NOFILE, l.open_files, l.open_files),
        (libc::RLIMIT_CORE, 0, 0),
    ];
    for (i, (res, soft, hard)) in limits.into_iter().enumerate() {
        if let Err(e) = sys::setrlimit(res, soft, hard) {
            fail(st, Stage::Rlimits, i, &e);
        }
    }
    if let Err(e) = sys::chdir(&plan.cwd) {
        fail(st, Stage::Chdir, 0, &e);
    }
    if let Err(e) = sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1) {
        fail(st, Stage::NoNewPrivs, 0, &e);
    }
    if let Err(e) = drop_capabilities() {
        fail(st, Stage::Capabilities, 0, &e);
    }
    if let Err(e) = landlock(plan) {
        fail(st, Stage::Landlock, 0, &e);
    }
    match sys::seccomp_with_listener(plan.bpf) {
        Ok(listener) => {
            if let Err(e) = sys::send_fds(notify, 0, &[listener]) {
                fail(st, Stage::Handoff, 0, &e);
            }
            sys::close(listener);
        }
        Err(e) => fail(st, Stage::Seccomp, 0, &e),
    }
    sys::close(notify);
    if let Err(e) = sys::cloexec_from(3) {
        fail(st, Stage::Stdio, 1, &e);
    }
    let err = exec(plan);
    record(st, REC_EXEC, sys::errno_of(&err), 0);
    sys::exit_now(127)
}

fn drop_capabilities() -> io::Result<()> {
    // Lock the root-privilege rules (uid 0 never regains capabilities; no ambient raises).
    let secbits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    sys::prctl(
        libc::PR_SET_SECUREBITS,
        libc::c_ulong::try_from(secbits).unwrap_or(0),
    )?;
    for cap in 0..64 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    sys::prctl(
        libc::PR_CAP_AMBIENT,
        libc::c_ulong::try_from(libc::PR_CAP_AMBIENT_CLEAR_ALL).unwrap_or(0),
    )?;
    sys::capset_zero()
}

fn landlock(plan: &Plan) -> io::Result<()> {
    let abi = plan.abi;
    let to_io = |e: landlock::RulesetError| io::Error::other(e.to_string());
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let read_noexec = read & !AccessFs::Execute;
    let dev_rw = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate;
    let mut rules: Vec<(PathBuf, landlock::BitFlags<AccessFs>)> = vec![
        ("/".into(), landlock::BitFlags::from(AccessFs::ReadDir)),
        ("/usr".into(), read),
        ("/etc".into(), read_noexec),
        ("/proc".into(), read_noexec),
        ("/dev/null".into(), dev_rw),
        ("/dev/zero".into(), dev_rw),
        ("/dev/full".into(), dev_rw),
        ("/dev/random".into(), AccessFs::ReadFile.into()),
        ("/dev/urandom".into(), AccessFs::ReadFile.into()),
        ("/dev/shm".into(), all & !AccessFs::Execute),
        ("/tmp".into(), all),
        (plan.workspace.clone(), all),
    ];
    for d in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
        if Path::new(d).is_dir() {
            rules.push((d.into(), read));
        }
    }
    rules.extend(plan.ro.iter().map(|p| (p.clone(), read)));
    rules.extend(plan.rw.iter().map(|p| (p.clone(), all)));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(all)
        .map_err(to_io)?;
    if abi >= ABI::V4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(to_io)?;
    }
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi)).map_err(to_io)?;
    }
    let mut created = ruleset.create().map_err(to_io)?;
    for (path, access) in rules {
        // Every path was created by the mount plan; a missing one is a bug, not a skip.
        let fd =
            PathFd::new(&path).map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
        // Directory-only rights on a file are an error for the kernel: keep file rights.
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(to_io)?;
    }
    if abi >= ABI::V4 {
        for (d, _) in &plan.net {
            created = created
                .add_rule(NetPort::new(d.port, AccessNet::ConnectTcp))
                .map_err(to_io)?;
        }
    }
    let status = created.restrict_self().map_err(to_io)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(io::Error::other(format!(
            "landlock not fully enforced ({:?})",
            status.ruleset
        )));
    }
    Ok(())
}

fn exec(plan: &Plan) -> io::Error {
    let Some(prog) = plan.argv.first() else {
        return io::Error::from_raw_os_error(libc::ENOENT);
    };
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = plan
        .env
        .iter()
        .chain(plan.secret_env.0.iter())
        .map(|a| a.as_ptr())
        .collect();
    envp.push(std::ptr::null());
    let bytes = prog.as_bytes();
    if bytes.contains(&b'/') {
        return sys::execve(prog, &argv, &envp);
    }
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    for dir in &plan.path_dirs {
        let cand = dir.join(OsStr::from_bytes(bytes));
        let cc = c(&cand);
        if !sys::executable(&cc) {
            continue;
        }
        last = sys::execve(&cc, &argv, &envp);
    }
    last
}

#[cfg(test)]
mod scratch_tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use super::*;

    #[test]
    fn every_writable_mount_but_the_workspace_is_a_scratch_dir() {
        let ws = Path::new("/srv/ws");
        // Both ways user paths are mounted: bound (unprivileged launcher) and attached as
        // prepared, possibly ID-mapped trees (root launcher).
        let mut ops = mount_plan(ws, &[], &[], &[], 1, false).unwrap();
        ops.extend(mount_plan(ws, &[], &[], &[], 1, true).unwrap());
        let mut writable = Vec::new();
        for op in &ops {
            match op {
                MountOp::Bind { dst, rw: true, .. } | MountOp::Attach { dst, rw: true, .. }
                    if dst != ws =>
                {
                    writable.push(dst.clone());
                }
                MountOp::Tmpfs { dst, mode, .. } if mode & 0o002 != 0 => {
                    writable.push(dst.clone());
                }
                _ => {}
            }
        }
        assert!(!writable.is_empty());
        for d in &writable {
            assert!(
                crate::SCRATCH_DIRS.iter().any(|s| Path::new(s) == d),
                "{} is writable in the sandbox but not in SCRATCH_DIRS",
                d.display()
            );
        }
    }
}
