//! The tools a model may call: `exec`, `read_file`, `write_file`, `edit_file`, `list_dir`.
//!
//! Architecture Invariant: no tool touches the filesystem or runs a program in the gateway
//! process. Every tool runs through the single-threaded launcher (landlock, seccomp,
//! namespaces, limits): forked by the zygote `chitin-sandbox-launch --serve`, else exec'd as
//! `chitin-sandbox-launch` (or `chitin sandbox exec`); the file tools run `chitin-fs-helper`
//! (or the hidden `chitin __fs-helper`) inside it.
//! Before that, the gate locates the path beneath the workspace descriptor (`wsfs::locate`)
//! and asks Cedar; the tool accepts it only through [`Workspace::resolve`] (lexical checks,
//! then an `openat2(RESOLVE_BENEATH)` walk); the helper enforces the workspace boundary again
//! inside the sandbox, and landlock enforces it a third time in the kernel.
//!
//! Every entry point takes an [`Authorized`]: proof that the gate allowed this call.

pub mod browser;
pub mod cancel;
pub mod cron;
pub mod fetch;
mod gated;
pub mod helper;
pub mod invoke;
pub mod mcp;
pub mod memory;
pub mod message;
pub mod patch;
pub mod prompt_guard;
pub mod search;
pub mod sessions;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use chitin_sandbox::{Exit, Killed, NetDest, Outcome};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::gate::Authorized;
use crate::policy::{Action, Tool};
use crate::secrets::ToolSecrets;

/// Errors of the tools. Messages say what was refused and why.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("invalid tool arguments: {0}")]
    InvalidArgs(String),
    #[error("path `{path}` refused: {reason}")]
    Path { path: String, reason: String },
    #[error("path `{path}` refused: a symlink on it leaves the workspace")]
    SymlinkEscape { path: String },
    #[error(
        "path `{path}` refused: the file has {links} hard links, so other names for it may be outside the workspace"
    )]
    Hardlink { path: String, links: u64 },
    #[error("{path}: {message}")]
    File {
        path: String,
        kind: String,
        message: String,
    },
    #[error("edit_file {path}: old_string not found")]
    EditNoMatch { path: String },
    #[error("edit_file {path}: old_string occurs {count} times; make it unique or set replace_all")]
    EditAmbiguous { path: String, count: usize },
    #[error("sandbox unavailable, tool refused: {0}")]
    SandboxUnavailable(String),
    #[error("sandbox failed: {0}")]
    Sandbox(String),
    #[error("cannot start the sandbox launcher {launcher}: {source}")]
    Launcher {
        launcher: PathBuf,
        source: std::io::Error,
    },
    #[error("the authorization is for `{got}`, not for `{want}`")]
    WrongAction { want: Action, got: Action },
    #[error(
        "the authorization does not cover these `{tool}` arguments; ask the gate for this exact call"
    )]
    ArgsNotAuthorized { tool: &'static str },
    /// The secrets this tool asks for could not be decided or released; nothing ran.
    #[error(transparent)]
    SecretEnv(#[from] crate::secrets::tool_env::ToolSecretsError),
    /// The run was cancelled (or timed out) before the tool started; nothing ran.
    #[error("the run was {0} before this tool started; nothing ran")]
    Cancelled(&'static str),
    /// An MCP server failed the call (crashed, timed out, answered too much, broke the
    /// protocol); the server is started again at the next call.
    #[error("{0}")]
    Mcp(String),
    /// A tainted call whose changes to the prompt files could not be watched; nothing ran.
    #[error(transparent)]
    PromptGuard(#[from] prompt_guard::GuardError),
}

// ---- strict argument types (what the model sends) --------------------------------------------

/// `exec`: a program and its arguments. Never a shell string: `sh -c` is an explicit argv the
/// policy sees.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecArgs {
    #[serde(deserialize_with = "argv_within_exec_limits")]
    pub argv: Vec<String>,
    /// Working directory relative to the workspace.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Text given on stdin.
    #[serde(default)]
    pub stdin: Option<String>,
    /// A shorter timeout than the configured one (never longer).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Network destinations the command needs, as `HOST:PORT` (none by default). Asking for
    /// any makes the call a network exec in policy (`context.network`), which by default needs
    /// approval; only these destinations are reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network: Vec<String>,
    /// Environment variables set for the command on top of the sandbox's minimal environment
    /// (a workflow step's declared `env` and `LOBSTER_ARG_*`); never the gateway's own. The
    /// gate's digest covers them, so an approval shows and binds every one.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "valid_env"
    )]
    pub env: BTreeMap<String, String>,
}

/// The most variables one `exec` may set (`env`).
pub const MAX_EXEC_ENV: usize = 256;

/// `env`: names `[A-Za-z_][A-Za-z0-9_]*`, no NUL in a value, at most [`MAX_EXEC_ENV`].
fn valid_env<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let env = BTreeMap::<String, String>::deserialize(d)?;
    if env.len() > MAX_EXEC_ENV {
        return Err(serde::de::Error::custom(format!(
            "env has {} variables; at most {MAX_EXEC_ENV}",
            env.len()
        )));
    }
    for (k, v) in &env {
        if !chitin_sandbox::secret_env::valid_env_key(k) {
            return Err(serde::de::Error::custom(format!(
                "env: `{k}` is not a variable name ([A-Za-z_][A-Za-z0-9_]*)"
            )));
        }
        if v.contains('\0') {
            return Err(serde::de::Error::custom(format!(
                "env: the value of `{k}` contains a NUL byte"
            )));
        }
    }
    Ok(env)
}

/// Room kept for what the sandbox launcher adds to one exec (its flags, paths, environment).
const EXEC_OVERHEAD: usize = 64 * 1024;

/// `argv`, refused when the kernel could not exec it (`E2BIG`): checked while parsing, so a
/// command that is too large is an invalid argument before anything is decided, not a failed
/// launch.
fn argv_within_exec_limits<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    let argv = Vec::<String>::deserialize(d)?;
    check_exec_size(&argv).map_err(serde::de::Error::custom)?;
    Ok(argv)
}

/// Whether one `execve` can carry `argv`: each argument under the kernel's per-string limit,
/// all of them (with their NULs and pointers, and room for the launcher's own) within
/// [`chitin_sandbox::exec_args_limit`].
pub fn check_exec_size(argv: &[String]) -> Result<(), String> {
    let per_arg = chitin_sandbox::MAX_ARG_STRLEN - 1;
    if let Some((i, a)) = argv.iter().enumerate().find(|(_, a)| a.len() > per_arg) {
        return Err(format!(
            "argv[{i}] is {} bytes; one argument may be at most {per_arg} bytes (the kernel's limit); pass large data on stdin or in a workspace file",
            a.len()
        ));
    }
    let total: usize = argv
        .iter()
        .map(|a| a.len() + 1 + std::mem::size_of::<usize>())
        .sum();
    let limit = chitin_sandbox::exec_args_limit().saturating_sub(EXEC_OVERHEAD);
    if total > limit {
        return Err(format!(
            "argv is {total} bytes; one exec can carry at most {limit} bytes of arguments here (the kernel's limit, a quarter of the stack size limit, less the sandbox's own); pass large data on stdin or in a workspace file"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    pub path: String,
    pub content: String,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

/// Exact-string replacement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EditFileArgs {
    pub path: String,
    pub old_string: String,
    pub new_string: String,
    /// Replace every occurrence (otherwise `old_string` must occur exactly once).
    #[serde(default)]
    pub replace_all: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListDirArgs {
    #[serde(default = "dot")]
    pub path: String,
}

fn dot() -> String {
    ".".into()
}

/// Parses a model's tool arguments strictly: unknown fields (`{"approved": true}`), wrong
/// types and missing fields are errors.
pub fn parse_args<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, ToolError> {
    T::deserialize(value).map_err(|e| ToolError::InvalidArgs(e.to_string()))
}

// ---- results ---------------------------------------------------------------------------------

/// What a tool call returns to the agent loop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolResult {
    /// Exit code, when the process exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    pub signal: Option<i32>,
    /// Which limit or filter killed it (`timeout`, `memory`, `cpu`, `file-size`,
    /// `seccomp:<syscall>`).
    pub killed: Option<String>,
    /// Captured stdout (capped; a truncation marker line ends a capped stream).
    pub stdout: String,
    pub stderr: String,
    pub truncated: bool,
    pub duration_ms: u64,
    /// Structured result of a file tool (content, entries, bytes written, replacements).
    pub output: Option<serde_json::Value>,
}

impl ToolResult {
    /// Applies a redactor (the secrets component's) to every text the model will see:
    /// stdout, stderr and the string values of the structured output.
    pub fn redact_with(&mut self, redact: impl Fn(&str) -> String) {
        self.stdout = redact(&self.stdout);
        self.stderr = redact(&self.stderr);
        if let Some(o) = &mut self.output {
            crate::secrets::redact::redact_json_strings(o, &redact);
        }
    }
}

/// The launcher's JSON report on the tool path (`chitin sandbox exec --capture-json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchReport {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub killed: Option<String>,
    pub duration_ms: u64,
    pub stdout: String,
    pub stderr: String,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub cgroup: bool,
    pub error: Option<LaunchError>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchError {
    /// `unavailable`, `invalid`, `setup` or `exec`.
    pub kind: String,
    pub message: String,
}

impl LaunchReport {
    pub fn from_outcome(o: &Outcome) -> Self {
        let (exit_code, signal) = match o.exit {
            Exit::Code(c) => (Some(c), None),
            Exit::Signal(s) => (None, Some(s)),
        };
        Self {
            exit_code,
            signal,
            killed: o.killed.as_ref().map(Killed::to_string),
            duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
            stdout: String::from_utf8_lossy(&o.stdout.bytes).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr.bytes).into_owned(),
            stdout_dropped: o.stdout.dropped,
            stderr_dropped: o.stderr.dropped,
            cgroup: o.cgroup,
            error: None,
        }
    }

    pub fn error(kind: &str, message: &str) -> Self {
        Self {
            exit_code: None,
            signal: None,
            killed: None,
            duration_ms: 0,
            stdout: String::new(),
            stderr: String::new(),
            stdout_dropped: 0,
            stderr_dropped: 0,
            cgroup: false,
            error: Some(LaunchError {
                kind: kind.into(),
                message: message.into(),
            }),
        }
    }

    /// The launcher's exit status for this report.
    pub fn status(&self) -> i32 {
        if let Some(e) = &self.error {
            return match e.kind.as_str() {
                "exec" => 127,
                _ => 125,
            };
        }
        if self.killed.as_deref() == Some("timeout") {
            return 124;
        }
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 125,
        }
    }
}

fn with_marker(mut s: String, dropped: u64) -> String {
    if dropped > 0 {
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!(
            "[chitin: output truncated: {dropped} more bytes dropped]\n"
        ));
    }
    s
}

// ---- the workspace and path canonicalization (gate side) -------------------------------------

/// A session's workspace: a canonical, existing directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workspace {
    root: PathBuf,
}

/// A path inside the workspace, as the gate shows it to Cedar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsPath {
    /// Normalized path relative to the workspace (`.` for the root).
    pub rel: String,
    /// Canonical absolute path on the host (symlinks inside the workspace resolved).
    pub abs: PathBuf,
}

impl Workspace {
    pub fn new(root: impl AsRef<Path>) -> Result<Self, ToolError> {
        let r = root.as_ref();
        let root = crate::wsfs::canonical_root(r).map_err(|e| ToolError::Path {
            path: r.display().to_string(),
            reason: format!("workspace cannot be used: {e}"),
        })?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Lexical validation of a model-supplied path; returns the normalized relative path.
    pub fn lexical(&self, user: &str) -> Result<PathBuf, ToolError> {
        let refuse = |reason: &str| ToolError::Path {
            path: user.to_string(),
            reason: reason.to_string(),
        };
        if user.is_empty() {
            return Err(refuse("empty path"));
        }
        if user.contains('\0') {
            return Err(refuse("NUL byte in path"));
        }
        if user.len() > 4096 {
            return Err(refuse("path longer than 4096 bytes"));
        }
        let lower = user.to_ascii_lowercase();
        for enc in ["%2f", "%2e", "%5c", "%00"] {
            if lower.contains(enc) {
                return Err(refuse(
                    "percent-encoded '.', '/', '\\' or NUL is not accepted in paths",
                ));
            }
        }
        let p = Path::new(user);
        let rel = if p.is_absolute() {
            p.strip_prefix(&self.root)
                .map_err(|_| refuse("absolute path outside the workspace"))?
        } else {
            p
        };
        let mut out = PathBuf::new();
        for c in rel.components() {
            match c {
                Component::Normal(x) => out.push(x),
                Component::CurDir => {}
                Component::ParentDir => {
                    return Err(refuse("parent-directory components (..) are not accepted"));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(refuse("absolute path outside the workspace"));
                }
            }
        }
        Ok(out)
    }

    /// Canonicalizes a model-supplied path for the gate (before Cedar): lexical checks, then
    /// an `openat2(RESOLVE_BENEATH)` walk from the workspace root, so symlinks that leave the
    /// workspace are refused. A missing final component is allowed (a file to create).
    pub fn resolve(&self, user: &str) -> Result<WsPath, ToolError> {
        use crate::wsfs::WsFsError;
        let rel = self.lexical(user)?;
        let abs = match crate::wsfs::resolve(&self.root, &rel) {
            Ok(r) => r.abs,
            Err(WsFsError::Escapes { .. }) => {
                return Err(ToolError::SymlinkEscape { path: user.into() });
            }
            Err(WsFsError::Symlink { .. }) => {
                return Err(ToolError::Path {
                    path: user.to_string(),
                    reason: "too many symlinks or a /proc magic link".into(),
                });
            }
            Err(e) => {
                return Err(ToolError::Path {
                    path: user.to_string(),
                    reason: e.to_string(),
                });
            }
        };
        if !abs.starts_with(&self.root) {
            return Err(ToolError::SymlinkEscape { path: user.into() });
        }
        let rel_s = rel.to_string_lossy().into_owned();
        Ok(WsPath {
            rel: if rel_s.is_empty() { ".".into() } else { rel_s },
            abs,
        })
    }
}

// ---- running through the sandbox -------------------------------------------------------------

/// One launcher invocation.
#[derive(Clone, Copy)]
struct LaunchRequest<'a> {
    /// The tool being run (whose `[[sandbox.secret_env]]` entries apply).
    tool: &'a str,
    /// The program `exec` runs (`secret.use` context `command`, `command_path`,
    /// `command_writable`).
    program: Option<&'a crate::gate::ProgramLocation>,
    argv: &'a [String],
    cwd: Option<&'a Path>,
    stdin: Option<&'a [u8]>,
    timeout_secs: Option<u64>,
    cap: usize,
    extra_ro: &'a [&'a Path],
    /// `--env KEY=VALUE` for the command (exec's `env`).
    env: &'a BTreeMap<String, String>,
}

/// How tools reach the sandbox: the launcher binary and the limits from `[sandbox]`.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// The `chitin` binary (`std::env::current_exe()` in the gateway).
    pub launcher: PathBuf,
    /// `CHITIN_HOME` given to the launcher (the state dir it keeps out of every sandbox).
    pub home: PathBuf,
    /// The config file the launcher reads (for limits not passed as flags).
    pub config: Option<PathBuf>,
    pub config_section: crate::config::sandbox::SandboxConfig,
    /// Egress destinations granted by policy for this call (empty: no network).
    pub net: Vec<NetDest>,
    /// Where tool-environment secrets come from (None: no tool gets any secret).
    secret_env: Option<Arc<ToolSecrets>>,
    /// The call this run is for (`secret.use` context `user`, `session`, `tainted`).
    call: Option<crate::gate::CallContext>,
    /// Stops the launcher of a call in progress when the run is cancelled or times out.
    cancel: Option<cancel::Cancel>,
    /// Where the prompt files a tainted run changes are recorded (without it, tainted calls
    /// do not run).
    prompt_marks: Option<prompt_guard::PromptMarks>,
    /// Where `send_message` delivers (only when chat channels are configured).
    messenger: Option<std::sync::Arc<dyn message::Messenger>>,
    /// Where the `cron` tool keeps jobs (only in the gateway).
    cron: Option<std::sync::Arc<dyn cron::CronJobs>>,
    /// The runtime parts of `web_search`, `memory_*` and `sessions_*` (each tool is offered
    /// and runs only where its part is attached).
    extras: Extras,
    /// The configured MCP servers (`mcp__<server>__<tool>` tools), if any.
    mcp: Option<std::sync::Arc<dyn mcp::McpTools>>,
    /// The persistent launcher of the small launcher (started on the first call, shared by
    /// every clone of this sandbox), see [`chitin_sandbox::zygote`].
    zygote: Zygotes,
}

/// The zygote of the small launcher in use (replaced when [`Sandbox::launcher`] changes).
#[derive(Debug, Clone, Default)]
pub struct Zygotes(Arc<std::sync::Mutex<Option<Arc<chitin_sandbox::zygote::Zygote>>>>);

impl Zygotes {
    /// The zygote of `small` (made, not yet started, when there is none for it).
    fn for_launcher(&self, small: &Path) -> Option<Arc<chitin_sandbox::zygote::Zygote>> {
        let mut z = self.0.lock().ok()?;
        match z.as_ref() {
            Some(have) if have.launcher() == small => {}
            _ => *z = Some(Arc::new(chitin_sandbox::zygote::Zygote::new(small))),
        }
        z.clone()
    }

    /// The running zygote's pid, if any.
    pub fn pid(&self) -> Option<u32> {
        self.0.lock().ok()?.as_ref()?.pid()
    }
}

/// The runtime parts some tools need (see [`Sandbox::with_web_search`],
/// [`Sandbox::with_memory`], [`Sandbox::with_sessions`]).
#[derive(Debug, Clone, Default)]
pub struct Extras {
    web_search: Option<Arc<search::WebSearch>>,
    memory: Option<Arc<memory::MemoryIndex>>,
    sessions: Option<Arc<dyn sessions::SessionStore>>,
    browser: Option<Arc<browser::Browsers>>,
}

impl Sandbox {
    /// A sandbox runner using the current executable.
    pub fn current(
        home: PathBuf,
        config: Option<PathBuf>,
        config_section: crate::config::sandbox::SandboxConfig,
    ) -> Result<Self, ToolError> {
        let launcher = std::env::current_exe().map_err(|source| ToolError::Launcher {
            launcher: PathBuf::from("/proc/self/exe"),
            source,
        })?;
        Ok(Self {
            launcher,
            home,
            config,
            config_section,
            net: Vec::new(),
            secret_env: None,
            call: None,
            cancel: None,
            prompt_marks: None,
            messenger: None,
            cron: None,
            extras: Extras::default(),
            mcp: None,
            zygote: Zygotes::default(),
        })
    }

    /// The zygote shared by this sandbox's clones (tests kill it to check the fallback).
    pub fn zygotes(&self) -> &Zygotes {
        &self.zygote
    }

    /// Lets `web_search` query the configured backend.
    #[must_use]
    pub fn with_web_search(mut self, w: Arc<search::WebSearch>) -> Self {
        self.extras.web_search = Some(w);
        self
    }

    /// The configured search backend, if any.
    pub fn web_search(&self) -> Option<&Arc<search::WebSearch>> {
        self.extras.web_search.as_ref()
    }

    /// Lets `memory_search` / `memory_get` use the per-user memory index.
    #[must_use]
    pub fn with_memory(mut self, m: Arc<memory::MemoryIndex>) -> Self {
        self.extras.memory = Some(m);
        self
    }

    /// The memory index, if attached.
    pub fn memory(&self) -> Option<&Arc<memory::MemoryIndex>> {
        self.extras.memory.as_ref()
    }

    /// Lets `sessions_*` read the user's sessions and post into them.
    #[must_use]
    pub fn with_sessions(mut self, s: Arc<dyn sessions::SessionStore>) -> Self {
        self.extras.sessions = Some(s);
        self
    }

    /// Lets the `browser` tool drive a sandboxed Chromium (one per session).
    #[must_use]
    pub fn with_browser(mut self, b: Arc<browser::Browsers>) -> Self {
        self.extras.browser = Some(b);
        self
    }

    /// The browsers, if the tool is available here.
    pub fn browser(&self) -> Option<&Arc<browser::Browsers>> {
        self.extras.browser.as_ref()
    }

    /// The session store, if attached.
    pub fn sessions(&self) -> Option<&Arc<dyn sessions::SessionStore>> {
        self.extras.sessions.as_ref()
    }

    /// Tools run through this sandbox are stopped (the whole sandbox killed) when `cancel`
    /// fires, and do not start after it fired.
    #[must_use]
    pub fn with_cancel(mut self, cancel: cancel::Cancel) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Lets tools receive the secrets they ask for in `config_section.secret_env`, each one
    /// only when the gate allows `secret.use` for that tool and secret at that run. Without
    /// this, no tool gets any secret.
    #[must_use]
    pub fn with_secret_env(mut self, secrets: Arc<ToolSecrets>) -> Self {
        self.secret_env = Some(secrets);
        self
    }

    /// This sandbox for one call: the user, session and taint its tool secrets are decided
    /// for (without it, a tool's `secret.use` request has none of them, and the default
    /// policies release nothing).
    #[must_use]
    pub fn for_call(mut self, call: &crate::gate::CallContext) -> Self {
        self.call = Some(call.clone());
        self
    }

    /// Records the prompt files that tainted runs through this sandbox change
    /// ([`prompt_guard`]); a tainted call does not run without it.
    #[must_use]
    pub fn with_messenger(mut self, m: std::sync::Arc<dyn message::Messenger>) -> Self {
        self.messenger = Some(m);
        self
    }

    /// Where `send_message` delivers, if chat channels are configured.
    pub fn messenger(&self) -> Option<&std::sync::Arc<dyn message::Messenger>> {
        self.messenger.as_ref()
    }

    /// Lets the `cron` tool add, list and remove jobs in the gateway's automation store.
    #[must_use]
    pub fn with_cron(mut self, jobs: std::sync::Arc<dyn cron::CronJobs>) -> Self {
        self.cron = Some(jobs);
        self
    }

    /// Lets the agent call the tools of the configured MCP servers.
    #[must_use]
    pub fn with_mcp(mut self, hub: std::sync::Arc<dyn mcp::McpTools>) -> Self {
        self.mcp = Some(hub);
        self
    }

    /// The configured MCP servers, if any.
    pub fn mcp(&self) -> Option<&std::sync::Arc<dyn mcp::McpTools>> {
        self.mcp.as_ref()
    }

    /// Where the `cron` tool keeps jobs, if anywhere.
    pub fn cron_jobs(&self) -> Option<&std::sync::Arc<dyn cron::CronJobs>> {
        self.cron.as_ref()
    }

    /// Attaches the record of prompt files changed by tainted runs.
    pub fn with_prompt_marks(mut self, marks: prompt_guard::PromptMarks) -> Self {
        self.prompt_marks = Some(marks);
        self
    }

    /// The record of prompt files changed by tainted runs, if attached.
    pub fn prompt_marks(&self) -> Option<&prompt_guard::PromptMarks> {
        self.prompt_marks.as_ref()
    }

    /// Whether tool-environment secrets are enabled ([`Self::with_secret_env`]).
    pub fn has_secret_env(&self) -> bool {
        self.secret_env.is_some()
    }

    /// Decides and releases the secrets `tool` asks for (none without
    /// [`Self::with_secret_env`] or without entries for it).
    fn secret_env_for(
        &self,
        tool: &str,
        program: Option<&crate::gate::ProgramLocation>,
    ) -> Result<chitin_sandbox::SecretEnv, ToolError> {
        let wanted = self.config_section.secret_env_for(tool).next().is_some();
        match &self.secret_env {
            Some(ts) if wanted => Ok(ts
                .release(
                    tool,
                    self.call.as_ref(),
                    program,
                    &self.config_section.secret_env,
                )?
                .env),
            _ => Ok(chitin_sandbox::SecretEnv::new()),
        }
    }

    fn launch(&self, ws: &Workspace, req: &LaunchRequest<'_>) -> Result<LaunchReport, ToolError> {
        let LaunchRequest {
            tool,
            program,
            stdin,
            timeout_secs,
            cap,
            ..
        } = *req;
        let cfg = &self.config_section;
        let timeout = timeout_secs
            .map_or(cfg.timeout_secs, |t| t.min(cfg.timeout_secs))
            .max(1);
        if let Some(r) = self.cancel.as_ref().and_then(cancel::Cancel::reason) {
            return Err(ToolError::Cancelled(match r {
                cancel::CancelReason::Cancelled => "cancelled",
                cancel::CancelReason::RunTimeout => "stopped by its timeout",
            }));
        }
        // Decided before anything is spawned: a failed decision means nothing runs.
        let secret_env = self.secret_env_for(tool, program)?;
        let small = self.small_launcher();
        if let Some(small) = &small
            && let Some(z) = self.zygote.for_launcher(small)
        {
            match self.launch_zygote(&z, ws, req, timeout, &secret_env) {
                Ok(r) => return r,
                // Nothing was started: exec the launcher as before (the next call starts a new
                // zygote).
                Err(e) => tracing::debug!("sandbox zygote unavailable, exec'ing the launcher: {e}"),
            }
        }
        let launcher = small.clone().unwrap_or_else(|| self.launcher.clone());
        let mut cmd = Command::new(&launcher);
        cmd.env_clear();
        if small.is_some() {
            // Every setting as a flag: the small launcher reads no configuration.
            cmd.args(self.small_args(ws, cap, timeout));
        } else {
            cmd.env("CHITIN_HOME", &self.home);
            if let Some(c) = &self.config {
                cmd.arg("--config").arg(c);
            }
            cmd.args(["sandbox", "exec", "--workspace"]).arg(ws.root());
            cmd.arg("--timeout").arg(timeout.to_string());
            cmd.arg("--memory").arg(cfg.memory_mb.to_string());
            cmd.arg("--max-procs").arg(cfg.max_procs.to_string());
            cmd.arg("--capture-json").arg(cap.to_string());
        }
        let launch_err = |source| ToolError::Launcher {
            launcher: launcher.clone(),
            source,
        };
        // Secret values travel on an inherited pipe, never in argv or the environment.
        let env_pipe = if secret_env.is_empty() {
            None
        } else {
            let (w, r, fd) =
                chitin_sandbox::secret_env::pass_to_child(&mut cmd).map_err(launch_err)?;
            cmd.arg("--env-fd").arg(fd.to_string());
            Some((w, r))
        };
        cmd.args(self.request_args(req));
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(launch_err)?;
        if let Some((mut w, read_end)) = env_pipe {
            // Only the launcher holds the read end now: if it dies, the write fails (EPIPE).
            drop(read_end);
            let wire = secret_env.to_wire();
            drop(secret_env);
            // A thread, so a launcher that stops reading cannot block the caller.
            std::thread::spawn(move || {
                let _ = w.write_all(wire.as_slice());
                drop(wire);
            });
        }
        if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
            let data = data.to_vec();
            // A separate thread so a command that does not read stdin cannot deadlock us.
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let (out, stopped) =
            cancel::wait_with_output(child, self.cancel.as_ref()).map_err(launch_err)?;
        self.read_report(&out.stdout, &out.stderr, stopped)
    }

    /// The small launcher's flags for the settings of `[sandbox]` (up to `--env-fd`).
    fn small_args(&self, ws: &Workspace, cap: usize, timeout: u64) -> Vec<std::ffi::OsString> {
        let cfg = &self.config_section;
        let limits = cfg.limits();
        let mut a: Vec<std::ffi::OsString> = Vec::with_capacity(32);
        a.extend(["--workspace".into(), ws.root().into()]);
        a.extend(["--state-dir".into(), self.home.clone().into()]);
        a.extend(["--capture".into(), cap.to_string().into()]);
        for (flag, value) in [
            ("--timeout", timeout),
            ("--memory", cfg.memory_mb),
            ("--max-procs", cfg.max_procs),
            ("--cpu", limits.cpu_secs),
            ("--file-size", limits.file_size_mb),
            ("--open-files", limits.open_files),
            ("--tmp-size", limits.tmp_size_mb),
            ("--quota-bytes", limits.workspace.bytes),
            ("--quota-inodes", limits.workspace.inodes),
        ] {
            a.extend([flag.into(), value.to_string().into()]);
        }
        a.extend([
            "--cgroup".into(),
            match cfg.cgroup {
                crate::config::sandbox::CgroupSetting::Auto => "auto",
                crate::config::sandbox::CgroupSetting::Required => "required",
                crate::config::sandbox::CgroupSetting::Off => "off",
            }
            .into(),
        ]);
        a.extend(["--subid-user".into(), cfg.subid_user.clone().into()]);
        a
    }

    /// The launcher flags of one request (after `--env-fd`): network, extra paths,
    /// environment, working directory and the command.
    fn request_args(&self, req: &LaunchRequest<'_>) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        for n in &self.net {
            a.extend(["--net".into(), n.to_string().into()]);
        }
        for p in req.extra_ro {
            a.extend(["--ro".into(), p.as_os_str().to_owned()]);
        }
        for (k, v) in req.env {
            a.extend(["--env".into(), format!("{k}={v}").into()]);
        }
        if let Some(c) = req.cwd {
            a.extend(["--cwd".into(), c.as_os_str().to_owned()]);
        }
        a.push("--".into());
        a.extend(req.argv.iter().map(Into::into));
        a
    }

    /// [`Self::launch`] through the zygote: the same launcher flags, the launcher forked by
    /// the zygote instead of exec'd. `Err` when the zygote could not take the request (nothing
    /// was started; the caller execs the launcher).
    fn launch_zygote(
        &self,
        z: &chitin_sandbox::zygote::Zygote,
        ws: &Workspace,
        req: &LaunchRequest<'_>,
        timeout: u64,
        secret_env: &chitin_sandbox::SecretEnv,
    ) -> Result<Result<LaunchReport, ToolError>, chitin_sandbox::zygote::SpawnError> {
        use chitin_sandbox::zygote::{ENV_FD, SpawnError, Stdio3};
        let gone = SpawnError::Gone;
        let mut args = self.small_args(ws, req.cap, timeout);
        // Secret values travel on a pipe, never in argv or the environment.
        let env_pipe = if secret_env.is_empty() {
            None
        } else {
            let (r, w) = std::io::pipe().map_err(gone)?;
            args.extend(["--env-fd".into(), ENV_FD.to_string().into()]);
            Some((r, w))
        };
        args.extend(self.request_args(req));
        let (stdin_r, stdin_w) = if req.stdin.is_some() {
            let (r, w) = std::io::pipe().map_err(gone)?;
            (std::os::fd::OwnedFd::from(r), Some(w))
        } else {
            // No input: a pipe whose write end is closed at once (reads see end of file, as
            // from /dev/null, without opening a path from the gateway).
            let (r, w) = std::io::pipe().map_err(gone)?;
            drop(w);
            (std::os::fd::OwnedFd::from(r), None)
        };
        let (out_r, out_w) = std::io::pipe().map_err(gone)?;
        let (err_r, err_w) = std::io::pipe().map_err(gone)?;
        let (env_r, env_w) = match env_pipe {
            Some((r, w)) => (Some(std::os::fd::OwnedFd::from(r)), Some(w)),
            None => (None, None),
        };
        let launched = z.spawn(
            &args,
            Stdio3 {
                stdin: stdin_r,
                stdout: out_w.into(),
                stderr: err_w.into(),
            },
            env_r,
        );
        let launched = match launched {
            Ok(l) => l,
            Err(e @ SpawnError::Gone(_)) => return Err(e),
            Err(e @ SpawnError::Failed(_)) => return Ok(Err(ToolError::Sandbox(e.to_string()))),
        };
        if let Some(mut w) = env_w {
            let wire = secret_env.to_wire();
            // A thread, so a launcher that stops reading cannot block the caller.
            std::thread::spawn(move || {
                let _ = w.write_all(wire.as_slice());
                drop(wire);
            });
        }
        if let (Some(data), Some(mut w)) = (req.stdin, stdin_w) {
            let data = data.to_vec();
            // A separate thread so a command that does not read stdin cannot deadlock us.
            std::thread::spawn(move || {
                let _ = w.write_all(&data);
            });
        }
        let launch_err = |source| ToolError::Launcher {
            launcher: z.launcher().to_path_buf(),
            source,
        };
        Ok(
            cancel::wait_launched(&launched, out_r, err_r, self.cancel.as_ref())
                .map_err(launch_err)
                .and_then(|(stdout, stderr, stopped)| self.read_report(&stdout, &stderr, stopped)),
        )
    }

    /// The launcher's JSON report, as the tools read it.
    fn read_report(
        &self,
        stdout: &[u8],
        stderr: &[u8],
        stopped: Option<cancel::CancelReason>,
    ) -> Result<LaunchReport, ToolError> {
        let mut report: LaunchReport = match (serde_json::from_slice(stdout), stopped) {
            (Ok(r), _) => r,
            // The launcher was killed after the grace period: its sandbox died with it
            // (PDEATHSIG), what the command did until then is not known.
            (Err(_), Some(_)) => LaunchReport {
                exit_code: None,
                signal: Some(9),
                killed: Some("cancelled".into()),
                duration_ms: 0,
                stdout: String::new(),
                stderr: String::new(),
                stdout_dropped: 0,
                stderr_dropped: 0,
                cgroup: false,
                error: None,
            },
            (Err(e), None) => {
                return Err(ToolError::Sandbox(format!(
                    "launcher gave no report ({e}); stderr: {}",
                    String::from_utf8_lossy(stderr).trim()
                )));
            }
        };
        if let (Some(r), Some("cancelled")) = (stopped, report.killed.as_deref()) {
            report.killed = Some(r.as_str().into());
        }
        if let Some(err) = &report.error {
            return Err(match err.kind.as_str() {
                "unavailable" => ToolError::SandboxUnavailable(err.message.clone()),
                "invalid" => ToolError::InvalidArgs(err.message.clone()),
                _ => ToolError::Sandbox(err.message.clone()),
            });
        }
        Ok(report)
    }

    /// The small launcher `chitin-sandbox-launch` next to [`Self::launcher`], when it is
    /// installed there: tool calls then skip exec'ing the whole `chitin` binary as the launcher
    /// (`chitin sandbox exec`, which stays the fallback; both confine alike: same `Spec`, same
    /// `chitin_sandbox::run`). Looked up at each call (one `stat` of a host path that is never
    /// in the workspace), so the tests' and benches' own `launcher` paths find theirs.
    pub fn small_launcher(&self) -> Option<PathBuf> {
        self.small_binary(chitin_sandbox::launcher::BINARY)
    }

    /// `name` next to [`Self::launcher`], when it is installed there.
    fn small_binary(&self, name: &str) -> Option<PathBuf> {
        let small = self.launcher.with_file_name(name);
        small.is_file().then_some(small)
    }

    /// Runs the in-sandbox file helper with one request and returns its JSON answer.
    fn helper(
        &self,
        tool: &str,
        ws: &Workspace,
        request: &helper::Request,
    ) -> Result<(serde_json::Value, LaunchReport), ToolError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ToolError::InvalidArgs(format!("cannot encode request: {e}")))?;
        let cap = self
            .config_section
            .max_file_bytes
            .saturating_mul(7)
            .saturating_add(65536);
        // The small helper binary when it is installed next to `chitin`, else the same code
        // as `chitin __fs-helper`.
        let small = self.small_binary(helper::BINARY);
        let program = small.clone().unwrap_or_else(|| self.launcher.clone());
        let mut argv = vec![program.to_string_lossy().into_owned()];
        if small.is_none() {
            argv.push(helper::HELPER_ARG.to_string());
        }
        let report = self.launch(
            ws,
            &LaunchRequest {
                tool,
                program: None,
                argv: &argv,
                cwd: None,
                stdin: Some(&body),
                timeout_secs: None,
                cap,
                extra_ro: &[&program],
                env: &BTreeMap::new(),
            },
        )?;
        if report
            .killed
            .as_deref()
            .is_some_and(|k| k == "cancelled" || k == "run-timeout")
        {
            // Stopped by a cancelled run: whether the file changed is not known.
            return Ok((serde_json::Value::Null, report));
        }
        let answer: helper::Answer = serde_json::from_str(report.stdout.trim()).map_err(|e| {
            ToolError::Sandbox(format!(
                "file helper gave no answer ({e}); killed: {:?}; stderr: {}",
                report.killed,
                report.stderr.trim()
            ))
        })?;
        match answer {
            helper::Answer::Ok(v) => Ok((v, report)),
            helper::Answer::Err {
                kind,
                message,
                links,
                count,
            } => {
                let path = request.path().to_string();
                Err(match kind.as_str() {
                    "symlink_escape" => ToolError::SymlinkEscape { path },
                    "hardlink" => ToolError::Hardlink {
                        path,
                        links: links.unwrap_or(2),
                    },
                    "no_match" => ToolError::EditNoMatch { path },
                    "ambiguous" => ToolError::EditAmbiguous {
                        path,
                        count: count.unwrap_or(2),
                    },
                    _ => ToolError::File {
                        path,
                        kind,
                        message,
                    },
                })
            }
        }
    }
}

/// An `Authorized` is for one action and one exact set of arguments: anything else is refused.
fn require<A: Serialize>(auth: &Authorized, want: Tool, args: &A) -> Result<(), ToolError> {
    if auth.action() != want.action() {
        return Err(ToolError::WrongAction {
            want: want.action(),
            got: auth.action(),
        });
    }
    let value = serde_json::to_value(args).map_err(|e| ToolError::InvalidArgs(e.to_string()))?;
    if !auth.covers_args(&value) {
        return Err(ToolError::ArgsNotAuthorized {
            tool: want.as_str(),
        });
    }
    Ok(())
}

fn result_from(report: &LaunchReport, output: Option<serde_json::Value>) -> ToolResult {
    ToolResult {
        exit_code: report.exit_code,
        signal: report.signal,
        killed: report.killed.clone(),
        stdout: with_marker(report.stdout.clone(), report.stdout_dropped),
        stderr: with_marker(report.stderr.clone(), report.stderr_dropped),
        truncated: report.stdout_dropped > 0 || report.stderr_dropped > 0,
        duration_ms: report.duration_ms,
        output,
    }
}

/// `exec`: runs `argv` in the sandbox.
pub fn exec(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &ExecArgs,
) -> Result<ToolResult, ToolError> {
    require(auth, Tool::Exec, args)?;
    if args.argv.is_empty() || args.argv.first().is_some_and(String::is_empty) {
        return Err(ToolError::InvalidArgs("argv must name a program".into()));
    }
    if args.argv.iter().any(|a| a.contains('\0')) {
        return Err(ToolError::InvalidArgs("NUL byte in argv".into()));
    }
    let cwd = match &args.cwd {
        Some(c) => Some(ws.resolve(c)?.abs),
        None => None,
    };
    // The program as the gate named it to Cedar: PATH lookup, symlinks resolved, and whether
    // the agent could have put it (or a link to it) there.
    let program = args.argv.first().and_then(|p| {
        crate::gate::program_location(p, cwd.as_deref().unwrap_or(ws.root()), ws.root()).ok()
    });
    let report = sb.launch(
        ws,
        &LaunchRequest {
            tool: "exec",
            program: program.as_ref(),
            argv: &args.argv,
            cwd: cwd.as_deref(),
            stdin: args.stdin.as_deref().map(str::as_bytes),
            timeout_secs: args.timeout_secs,
            cap: sb.config_section.output_cap_bytes,
            extra_ro: &[],
            env: &args.env,
        },
    )?;
    Ok(result_from(&report, None))
}

/// `read_file`: the text of one file inside the workspace.
pub fn read_file(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &ReadFileArgs,
) -> Result<ToolResult, ToolError> {
    require(auth, Tool::ReadFile, args)?;
    let p = ws.resolve(&args.path)?;
    let (v, report) = sb.helper(
        "read_file",
        ws,
        &helper::Request::Read {
            path: p.rel,
            max_bytes: sb.config_section.max_file_bytes,
        },
    )?;
    Ok(result_from(&report, Some(v)))
}

/// `write_file`: replaces (atomically) or creates one file inside the workspace.
pub fn write_file(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &WriteFileArgs,
) -> Result<ToolResult, ToolError> {
    require(auth, Tool::WriteFile, args)?;
    let p = ws.resolve(&args.path)?;
    let (v, report) = sb.helper(
        "write_file",
        ws,
        &helper::Request::Write {
            path: p.rel,
            content: args.content.clone(),
            create_dirs: args.create_dirs,
        },
    )?;
    Ok(result_from(&report, Some(v)))
}

/// `edit_file`: exact-string replacement in one file.
pub fn edit_file(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &EditFileArgs,
) -> Result<ToolResult, ToolError> {
    require(auth, Tool::EditFile, args)?;
    if args.old_string.is_empty() {
        return Err(ToolError::InvalidArgs(
            "old_string must not be empty".into(),
        ));
    }
    let p = ws.resolve(&args.path)?;
    let (v, report) = sb.helper(
        "edit_file",
        ws,
        &helper::Request::Edit {
            path: p.rel,
            old_string: args.old_string.clone(),
            new_string: args.new_string.clone(),
            replace_all: args.replace_all,
            max_bytes: sb.config_section.max_file_bytes,
        },
    )?;
    Ok(result_from(&report, Some(v)))
}

/// `list_dir`: the entries of one directory inside the workspace.
pub fn list_dir(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &ListDirArgs,
) -> Result<ToolResult, ToolError> {
    require(auth, Tool::ListDir, args)?;
    let p = ws.resolve(&args.path)?;
    let started = std::time::Instant::now();
    // A listing only reads names and `fstatat`s them, so the gateway does it itself through
    // descriptors (`wsfs`: beneath the root, no symlink followed) instead of starting a
    // sandbox. Anything else (a symlink on the way, a missing path, not a directory) goes to
    // the in-sandbox helper as before, which follows links inside the workspace and words
    // each refusal.
    if let Ok(v) = list_in_gateway(ws.root(), &p.rel) {
        return Ok(gated::output(started, v));
    }
    let (v, report) = sb.helper("list_dir", ws, &helper::Request::List { path: p.rel })?;
    Ok(result_from(&report, Some(v)))
}

/// `list_dir`'s answer, read by the gateway through directory descriptors: the same entries,
/// order and fields as the file helper's (`helper::list`).
fn list_in_gateway(root: &Path, rel: &str) -> Result<serde_json::Value, crate::wsfs::WsFsError> {
    let dir = crate::wsfs::WsDir::root(root)?;
    let listing = dir.list(Path::new(rel), helper::MAX_ENTRIES)?;
    let mut entries: Vec<serde_json::Value> = listing
        .entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "name": e.name.to_string_lossy(),
                "kind": e.kind.as_str(),
                "size": e.size,
            })
        })
        .collect();
    entries.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Ok(serde_json::json!({"path": rel, "entries": entries, "truncated": listing.more}))
}

/// The Cedar context a tool call carries (what the gate passes to the policy engine).
pub fn cedar_context(ws: &Workspace, path: Option<&WsPath>) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    m.insert("workspace", ws.root().display().to_string());
    if let Some(p) = path {
        m.insert("path", p.abs.display().to_string());
        m.insert("rel_path", p.rel.clone());
    }
    m
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
    use serde_json::json;

    #[test]
    fn an_approved_flag_injected_into_exec_arguments_is_rejected() {
        let e = parse_args::<ExecArgs>(&json!({"argv": ["ls"], "approved": true})).unwrap_err();
        assert!(e.to_string().contains("unknown field `approved`"), "{e}");
    }

    #[test]
    fn a_shell_string_instead_of_argv_is_rejected() {
        let e = parse_args::<ExecArgs>(&json!({"argv": "rm -rf /"})).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
        assert!(parse_args::<ExecArgs>(&json!({"command": "ls"})).is_err());
    }

    #[test]
    fn each_file_tool_rejects_unknown_fields() {
        assert!(
            parse_args::<ReadFileArgs>(&json!({"path": "a", "follow_symlinks": true})).is_err()
        );
        assert!(
            parse_args::<WriteFileArgs>(&json!({"path": "a", "content": "", "mode": 4095}))
                .is_err()
        );
        assert!(
            parse_args::<EditFileArgs>(
                &json!({"path": "a", "old_string": "x", "new_string": "y", "sudo": true})
            )
            .is_err()
        );
        assert!(parse_args::<ListDirArgs>(&json!({"path": ".", "recursive": true})).is_err());
        assert_eq!(
            parse_args::<ListDirArgs>(&json!({})).unwrap().path,
            ".".to_string()
        );
    }

    fn ws() -> (tempfile::TempDir, Workspace) {
        let d = tempfile::tempdir().unwrap();
        let w = Workspace::new(d.path()).unwrap();
        (d, w)
    }

    #[test]
    fn traversal_and_encoded_paths_are_rejected_before_the_sandbox() {
        let (_d, w) = ws();
        for bad in [
            "../../etc/passwd",
            "a/../../etc/passwd",
            "/etc/passwd",
            "..%2f..%2fetc%2fpasswd",
            "%2e%2e/x",
            "a\0b",
            "",
        ] {
            let e = w.resolve(bad).unwrap_err();
            assert!(matches!(e, ToolError::Path { .. }), "{bad}: {e}");
        }
        let inside = format!("{}/../x", w.root().display());
        assert!(w.resolve(&inside).is_err());
    }

    #[test]
    fn a_symlink_leaving_the_workspace_is_refused_by_the_gate() {
        let (_d, w) = ws();
        std::os::unix::fs::symlink("/etc", w.root().join("etc")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/hostname", w.root().join("h")).unwrap();
        for p in ["etc/hostname", "h", "etc"] {
            let e = w.resolve(p).unwrap_err();
            assert!(matches!(e, ToolError::SymlinkEscape { .. }), "{p}: {e}");
        }
    }

    #[test]
    fn paths_inside_the_workspace_resolve_canonically() {
        let (_d, w) = ws();
        std::fs::create_dir(w.root().join("src")).unwrap();
        std::fs::write(w.root().join("src/a.txt"), "x").unwrap();
        std::os::unix::fs::symlink("src", w.root().join("link")).unwrap();
        let p = w.resolve("link/a.txt").unwrap();
        assert_eq!(p.abs, w.root().join("src/a.txt"));
        let abs = format!("{}/src/./a.txt", w.root().display());
        assert_eq!(w.resolve(&abs).unwrap().rel, "src/a.txt");
        let new = w.resolve("src/new.txt").unwrap();
        assert_eq!(new.abs, w.root().join("src/new.txt"));
        assert_eq!(w.resolve(".").unwrap().rel, ".");
    }

    #[test]
    fn tools_refuse_an_authorization_for_another_action() {
        let (_d, w) = ws();
        let auth = Authorized::for_test(
            "Chitin::User::\"a\"",
            "read_file",
            "Chitin::Tool::\"read_file\"",
        );
        let sb = Sandbox {
            launcher: "/nonexistent/chitin".into(),
            home: "/nonexistent".into(),
            config: None,
            config_section: Default::default(),
            net: Vec::new(),
            secret_env: None,
            call: None,
            cancel: None,
            prompt_marks: None,
            messenger: None,
            cron: None,
            extras: Extras::default(),
            mcp: None,
            zygote: Zygotes::default(),
        };
        let e = exec(
            &auth,
            &sb,
            &w,
            &ExecArgs {
                argv: vec!["true".into()],
                cwd: None,
                stdin: None,
                timeout_secs: None,
                network: Vec::new(),
                env: BTreeMap::new(),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                ToolError::WrongAction {
                    want: Action::Exec,
                    got: Action::ReadFile
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_missing_launcher_is_a_clear_error() {
        let (_d, w) = ws();
        let auth = Authorized::for_test("u", "exec", "t");
        let sb = Sandbox {
            launcher: "/nonexistent/chitin".into(),
            home: "/nonexistent".into(),
            config: None,
            config_section: Default::default(),
            net: Vec::new(),
            secret_env: None,
            call: None,
            cancel: None,
            prompt_marks: None,
            messenger: None,
            cron: None,
            extras: Extras::default(),
            mcp: None,
            zygote: Zygotes::default(),
        };
        let args = ExecArgs {
            argv: vec!["true".into()],
            cwd: None,
            stdin: None,
            timeout_secs: None,
            network: Vec::new(),
            env: BTreeMap::new(),
        };
        let e = exec(&auth, &sb, &w, &args).unwrap_err();
        assert!(matches!(e, ToolError::Launcher { .. }), "{e}");
    }

    #[test]
    fn redaction_reaches_stdout_stderr_and_structured_output() {
        let mut r = ToolResult {
            exit_code: Some(0),
            signal: None,
            killed: None,
            stdout: "token=s3cr3t".into(),
            stderr: "s3cr3t".into(),
            truncated: false,
            duration_ms: 1,
            output: Some(
                serde_json::json!({"content": "a s3cr3t b", "entries": [{"name": "s3cr3t"}]}),
            ),
        };
        r.redact_with(|s| s.replace("s3cr3t", "[REDACTED]"));
        assert_eq!(r.stdout, "token=[REDACTED]");
        assert_eq!(r.stderr, "[REDACTED]");
        assert!(!r.output.unwrap().to_string().contains("s3cr3t"));
    }

    #[test]
    fn truncated_output_carries_a_visible_marker() {
        let s = with_marker("abc".into(), 10);
        assert_eq!(
            s,
            "abc\n[chitin: output truncated: 10 more bytes dropped]\n"
        );
        assert_eq!(with_marker("abc".into(), 0), "abc");
    }

    // ---- the real tool path: tool function -> launcher -> sandbox (-> file helper) ----------

    /// The `chitin` binary cargo built next to this test executable (`cargo test` builds it
    /// for the integration tests).
    fn launcher() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        let bin = exe.parent().unwrap().parent().unwrap().join("chitin");
        assert!(
            bin.exists(),
            "{} is missing: run `cargo test` (which builds the binary), not only `--lib`",
            bin.display()
        );
        bin
    }

    fn real() -> (tempfile::TempDir, tempfile::TempDir, Workspace, Sandbox) {
        let base = concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp");
        std::fs::create_dir_all(base).unwrap();
        let home = tempfile::tempdir_in(base).unwrap();
        let d = tempfile::tempdir_in(base).unwrap();
        let w = Workspace::new(d.path()).unwrap();
        let sb = Sandbox {
            launcher: launcher(),
            home: home.path().to_path_buf(),
            config: None,
            config_section: crate::config::sandbox::SandboxConfig {
                output_cap_bytes: 1000,
                max_file_bytes: 4096,
                ..Default::default()
            },
            net: Vec::new(),
            secret_env: None,
            call: None,
            cancel: None,
            prompt_marks: None,
            messenger: None,
            cron: None,
            extras: Extras::default(),
            mcp: None,
            zygote: Zygotes::default(),
        };
        (home, d, w, sb)
    }

    fn auth(action: &str) -> Authorized {
        Authorized::for_test("Chitin::User::\"t\"", action, "Chitin::Tool::\"t\"")
    }

    fn exec_args(argv: &[&str]) -> ExecArgs {
        ExecArgs {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            cwd: None,
            stdin: None,
            timeout_secs: None,
            network: Vec::new(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn exec_runs_confined_and_reports_status_output_and_duration() {
        let (_h, _d, w, sb) = real();
        let mut a = exec_args(&[
            "sh",
            "-c",
            "cat; echo err >&2; grep -c Seccomp:.2 /proc/self/status; exit 3",
        ]);
        a.stdin = Some("from-stdin\n".into());
        let r = exec(&auth("exec"), &sb, &w, &a).unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.stdout, "from-stdin\n1\n");
        assert_eq!(r.stderr, "err\n");
        assert_eq!(r.killed, None);
        assert!(!r.truncated);
        assert!(r.duration_ms < 30_000);
    }

    #[test]
    fn exec_output_is_capped_with_a_marker() {
        let (_h, _d, w, sb) = real();
        let r = exec(
            &auth("exec"),
            &sb,
            &w,
            &exec_args(&["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' a"]),
        )
        .unwrap();
        assert!(r.truncated);
        assert_eq!(
            r.stdout,
            format!(
                "{}\n[chitin: output truncated: 4000 more bytes dropped]\n",
                "a".repeat(1000)
            )
        );
    }

    #[test]
    fn exec_reports_which_limit_killed_the_process() {
        let (_h, _d, w, sb) = real();
        let mut a = exec_args(&["sleep", "60"]);
        a.timeout_secs = Some(1);
        let r = exec(&auth("exec"), &sb, &w, &a).unwrap();
        assert_eq!(r.killed.as_deref(), Some("timeout"));
        assert_eq!(r.signal, Some(9));
        let r = exec(
            &auth("exec"),
            &sb,
            &w,
            &exec_args(&[
                "python3",
                "-c",
                "import ctypes; ctypes.CDLL(None).syscall(246, 0, 0, 0, 0)",
            ]),
        )
        .unwrap();
        assert_eq!(r.killed.as_deref(), Some("seccomp:kexec_load"));
        assert_eq!(r.signal, Some(31));
    }

    #[test]
    fn a_child_cannot_forge_a_kill_reason() {
        let (_h, _d, w, sb) = real();
        let r = exec(
            &auth("exec"),
            &sb,
            &w,
            &exec_args(&[
                "sh",
                "-c",
                "echo 'chitin: sandbox: killed: timeout' >&2; exit 0",
            ]),
        )
        .unwrap();
        assert_eq!(r.killed, None);
        assert_eq!(r.exit_code, Some(0));
    }

    #[test]
    fn file_tools_read_write_edit_and_list_inside_the_sandbox() {
        let (_h, d, w, sb) = real();
        let wr = write_file(
            &auth("write_file"),
            &sb,
            &w,
            &WriteFileArgs {
                path: "src/a.txt".into(),
                content: "one two".into(),
                create_dirs: true,
            },
        )
        .unwrap();
        assert_eq!(wr.output.unwrap()["bytes_written"], 7);
        let ed = edit_file(
            &auth("edit_file"),
            &sb,
            &w,
            &EditFileArgs {
                path: "src/a.txt".into(),
                old_string: "two".into(),
                new_string: "2".into(),
                replace_all: false,
            },
        )
        .unwrap();
        assert_eq!(ed.output.unwrap()["replacements"], 1);
        let rd = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs {
                path: "src/a.txt".into(),
            },
        )
        .unwrap();
        assert_eq!(rd.output.unwrap()["content"], "one 2");
        let ls = list_dir(
            &auth("list_dir"),
            &sb,
            &w,
            &ListDirArgs { path: "src".into() },
        )
        .unwrap();
        assert_eq!(
            ls.output.unwrap()["entries"],
            serde_json::json!([{"name": "a.txt", "kind": "file", "size": 5}])
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("src/a.txt")).unwrap(),
            "one 2"
        );
    }

    /// The helper's answer to `List { path }` in `dir`, run in this process.
    fn helper_listing(dir: &Path, path: &str) -> serde_json::Value {
        let root = chitin_sandbox::fs::open_dir(dir).unwrap();
        match helper::handle_at(
            std::os::fd::AsFd::as_fd(&root),
            &helper::Request::List { path: path.into() },
        ) {
            helper::Answer::Ok(v) => v,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_listing_read_through_descriptors_is_the_file_helpers_listing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("b.txt"), "hello").unwrap();
        std::fs::write(p.join("empty"), "").unwrap();
        std::fs::create_dir(p.join("sub")).unwrap();
        std::fs::write(p.join("sub/inner"), "12345678").unwrap();
        std::fs::hard_link(p.join("b.txt"), p.join("hard")).unwrap();
        std::os::unix::fs::symlink("/etc", p.join("out")).unwrap();
        std::os::unix::fs::symlink("sub", p.join("in")).unwrap();
        std::os::unix::fs::symlink("missing", p.join("dangling")).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(p.join("fifo"))
            .status()
            .unwrap();
        assert!(made.success());
        std::fs::write(p.join("n\u{e9}e \"q\""), "x").unwrap();
        let w = Workspace::new(p).unwrap();
        for rel in [".", "sub"] {
            let ours = list_in_gateway(w.root(), rel).unwrap();
            assert_eq!(ours, helper_listing(w.root(), rel), "{rel}");
        }
        let top = list_in_gateway(w.root(), ".").unwrap();
        let kinds: Vec<(String, String)> = top["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().into(),
                    e["kind"].as_str().unwrap().into(),
                )
            })
            .collect();
        let want = [
            ("b.txt", "file"),
            ("dangling", "symlink"),
            ("empty", "file"),
            ("fifo", "other"),
            ("hard", "file"),
            ("in", "symlink"),
            ("n\u{e9}e \"q\"", "file"),
            ("out", "symlink"),
            ("sub", "dir"),
        ];
        assert_eq!(
            kinds,
            want.iter()
                .map(|(n, k)| (n.to_string(), k.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(top["truncated"], false);
        assert_eq!(top["path"], ".");
        // A symlink on the way is not followed here: the call goes to the helper.
        assert!(matches!(
            list_in_gateway(w.root(), "in"),
            Err(crate::wsfs::WsFsError::Symlink { .. })
        ));
        assert!(list_in_gateway(w.root(), "b.txt").is_err());
        assert!(list_in_gateway(w.root(), "nothing").is_err());
    }

    #[test]
    fn a_directory_over_the_entry_limit_is_cut_where_the_helper_cuts_it() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..=helper::MAX_ENTRIES {
            std::fs::write(d.path().join(format!("f{i}")), "").unwrap();
        }
        let w = Workspace::new(d.path()).unwrap();
        let ours = list_in_gateway(w.root(), ".").unwrap();
        assert_eq!(ours["truncated"], true);
        assert_eq!(
            ours["entries"].as_array().unwrap().len(),
            helper::MAX_ENTRIES
        );
        assert_eq!(ours, helper_listing(w.root(), "."));
    }

    #[test]
    fn list_dir_through_a_symlink_inside_the_workspace_is_listed_by_the_sandboxed_helper() {
        let (_h, d, w, sb) = real();
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::fs::write(d.path().join("real/x"), "abc").unwrap();
        std::os::unix::fs::symlink("real", d.path().join("l")).unwrap();
        let direct = list_dir(
            &auth("list_dir"),
            &sb,
            &w,
            &ListDirArgs {
                path: "real".into(),
            },
        )
        .unwrap();
        let linked = list_dir(
            &auth("list_dir"),
            &sb,
            &w,
            &ListDirArgs { path: "l".into() },
        )
        .unwrap();
        let want = serde_json::json!([{"name": "x", "kind": "file", "size": 3}]);
        assert_eq!(direct.output.unwrap()["entries"], want);
        assert_eq!(linked.output.unwrap()["entries"], want);
        // The gateway read the first itself; the second ran the helper in a sandbox, whose
        // answer is on its stdout.
        assert_eq!(direct.stdout, "");
        assert!(linked.stdout.contains("\"ok\""), "{}", linked.stdout);
    }

    #[test]
    fn file_tools_refuse_links_that_leave_the_workspace() {
        let (_h, d, w, sb) = real();
        let outside =
            tempfile::NamedTempFile::new_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target/tmp"))
                .unwrap();
        std::fs::write(outside.path(), "outside-canary").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("sym")).unwrap();
        std::fs::hard_link(outside.path(), d.path().join("hard")).unwrap();
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs { path: "sym".into() },
        )
        .unwrap_err();
        assert!(matches!(e, ToolError::SymlinkEscape { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "path `sym` refused: a symlink on it leaves the workspace"
        );
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs {
                path: "hard".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, ToolError::Hardlink { links: 2, .. }), "{e}");
        let e = write_file(
            &auth("write_file"),
            &sb,
            &w,
            &WriteFileArgs {
                path: "hard".into(),
                content: "x".into(),
                create_dirs: false,
            },
        )
        .unwrap_err();
        assert!(matches!(e, ToolError::Hardlink { .. }), "{e}");
        let e = edit_file(
            &auth("edit_file"),
            &sb,
            &w,
            &EditFileArgs {
                path: "hard".into(),
                old_string: "outside".into(),
                new_string: "x".into(),
                replace_all: false,
            },
        )
        .unwrap_err();
        assert!(matches!(e, ToolError::Hardlink { .. }), "{e}");
        assert_eq!(
            std::fs::read_to_string(outside.path()).unwrap(),
            "outside-canary"
        );
        // Traversal is refused before anything runs.
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs {
                path: "../../etc/passwd".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(e, ToolError::Path { .. }), "{e}");
    }

    #[test]
    fn file_tools_report_size_text_and_edit_errors_clearly() {
        let (_h, d, w, sb) = real();
        std::fs::write(d.path().join("big"), vec![b'a'; 5000]).unwrap();
        std::fs::write(d.path().join("bin"), [0xff, 0xfe, 0x00]).unwrap();
        std::fs::write(d.path().join("t"), "x x").unwrap();
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs { path: "big".into() },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("more than the 4096-byte limit"),
            "{e}"
        );
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs { path: "bin".into() },
        )
        .unwrap_err();
        assert!(e.to_string().contains("not valid UTF-8"), "{e}");
        let e = edit_file(
            &auth("edit_file"),
            &sb,
            &w,
            &EditFileArgs {
                path: "t".into(),
                old_string: "x".into(),
                new_string: "y".into(),
                replace_all: false,
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, ToolError::EditAmbiguous { count: 2, .. }),
            "{e}"
        );
        let e = read_file(
            &auth("read_file"),
            &sb,
            &w,
            &ReadFileArgs {
                path: "nope".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
