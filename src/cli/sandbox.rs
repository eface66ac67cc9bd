//! `chitin sandbox check` and `chitin sandbox exec`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chitin_sandbox::{Exit, NetDest, Output, SandboxError, SecretEnv, Spec};
use clap::{Args, Subcommand};

use super::{CmdResult, Globals};
use crate::tools::LaunchReport;

#[derive(Debug, Subcommand)]
pub enum SandboxCmd {
    /// Print what the kernel can enforce as JSON; exit 0 only with full enforcement.
    Check,
    /// Run PROGRAM confined (landlock, seccomp, namespaces, limits).
    Exec(Box<ExecArgs>),
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The read-write workspace (working directory and $HOME).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Extra read-only path (repeatable).
    #[arg(long, value_name = "PATH")]
    ro: Vec<PathBuf>,
    /// Extra read-write path (repeatable).
    #[arg(long, value_name = "PATH")]
    rw: Vec<PathBuf>,
    /// `none` (default) or an allowed HOST:PORT destination (repeatable).
    #[arg(long, value_name = "none|HOST:PORT")]
    net: Vec<String>,
    /// Wall-clock limit in seconds [default: sandbox.timeout_secs].
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Memory limit in MiB [default: sandbox.memory_mb].
    #[arg(long, value_name = "MB")]
    memory: Option<u64>,
    /// Process limit [default: sandbox.max_procs].
    #[arg(long, value_name = "N")]
    max_procs: Option<u64>,
    /// CPU seconds per process [default: sandbox.cpu_secs] (the browser's long-lived
    /// processes).
    #[arg(long, value_name = "SECS", hide = true)]
    cpu: Option<u64>,
    /// Size of the private /tmp and /dev/shm in MiB [default: sandbox.tmp_size_mb] (the
    /// browser's profile and shared memory).
    #[arg(long, value_name = "MB", hide = true)]
    tmp_size: Option<u64>,
    /// Allow the command Unix sockets of its own (Chromium's process singleton); abstract
    /// sockets stay inside the sandbox's network namespace.
    #[arg(long, hide = true)]
    unix_sockets: bool,
    /// Address-space limit in MiB instead of one derived from --memory (Chromium reserves
    /// tens of GiB it never uses; its memory is then bounded by the cgroup alone).
    #[arg(long, value_name = "MB", hide = true)]
    address_space: Option<u64>,
    /// Extra environment variable (repeatable); nothing else is inherited.
    #[arg(long, value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Capture output (each stream capped at BYTES) and print one JSON report (tool path).
    #[arg(long, value_name = "BYTES", hide = true)]
    capture_json: Option<usize>,
    /// Working directory inside the workspace (tool path).
    #[arg(long, value_name = "DIR", hide = true)]
    cwd: Option<PathBuf>,
    /// Read secret environment variables from this inherited pipe fd (tool path; the values
    /// never appear in argv or in the launcher's own environment).
    #[arg(long, value_name = "FD", hide = true)]
    env_fd: Option<i32>,
    /// The program and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    command: Vec<String>,
}

pub fn run(cmd: SandboxCmd, globals: &Globals) -> CmdResult {
    match cmd {
        SandboxCmd::Check => Ok(check(globals)),
        SandboxCmd::Exec(args) => exec(*args, globals),
    }
}

fn check(globals: &Globals) -> ExitCode {
    let s = chitin_sandbox::check();
    // The identity a tool run would get (the config's subid_user; the default without one).
    let subid_user = globals
        .load_config()
        .map(|c| c.sandbox.subid_user)
        .unwrap_or_else(|_| chitin_sandbox::ids::DEFAULT_SUBID_USER.into());
    let ids = chitin_sandbox::ids::current(&subid_user);
    let mut missing = s.missing.clone();
    if let Ok(v) = std::env::var("CHITIN_SANDBOX_SIMULATE_MISSING") {
        missing.extend(
            v.split(',')
                .filter(|x| !x.is_empty())
                .map(|x| format!("{x} (simulated)")),
        );
    }
    let enforced = missing.is_empty();
    let json = serde_json::json!({
        "landlock_abi": s.landlock_abi,
        "seccomp": s.seccomp,
        "user_ns": s.user_ns,
        "pid_ns": s.pid_ns,
        "net_ns": s.net_ns,
        "enforced": enforced,
        "missing": missing,
        "identity": {
            "launcher_euid": ids.launcher_euid,
            "sandbox_uid": 1000,
            "host_uid": ids.uid,
            "host_gid": ids.gid,
            "workspace": if ids.remapped() { "id-mapped (on-disk owner root appears as the sandbox user)" } else { "bind (the launcher's own files)" },
            "summary": ids.to_string(),
        },
        "etc": {
            "mode": "allow-list (world-readable entries only; passwd, group, hosts, hostname, resolv.conf are the sandbox's own)",
            "entries": chitin_sandbox::launch_etc_view()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>(),
        },
        "unix_sockets": "socket(AF_UNIX) refused (EAFNOSUPPORT); socketpair allowed",
    });
    println!("{json}");
    ExitCode::from(if enforced { 0 } else { 1 })
}

/// Paths no sandbox may see (the same rule as the small launcher's).
fn forbidden(globals: &Globals, workspace: &std::path::Path) -> Vec<PathBuf> {
    chitin_sandbox::launcher::forbidden(&globals.home, workspace)
}

fn build_spec(
    args: &ExecArgs,
    globals: &Globals,
) -> Result<Spec, Box<dyn std::error::Error + Send + Sync>> {
    let cfg = globals.load_config()?.sandbox;
    let mut limits = cfg.limits();
    if let Some(t) = args.timeout {
        limits.timeout = Duration::from_secs(t.max(1));
    }
    if let Some(m) = args.memory {
        limits.memory_mb = m.max(16);
    }
    if let Some(p) = args.max_procs {
        limits.max_procs = p.max(1);
    }
    if let Some(c) = args.cpu {
        limits.cpu_secs = c.max(1);
    }
    if let Some(t) = args.tmp_size {
        limits.tmp_size_mb = t.max(1);
    }
    let mut net = Vec::new();
    let mut none = false;
    for n in &args.net {
        if n == "none" {
            none = true;
        } else {
            net.push(n.parse::<NetDest>()?);
        }
    }
    if none && !net.is_empty() {
        return Err("--net none cannot be combined with HOST:PORT destinations".into());
    }
    let mut env = Vec::new();
    for e in &args.env {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| format!("--env {e}: expected KEY=VALUE"))?;
        env.push((k.to_string(), v.to_string()));
    }
    let mut spec = Spec::new(args.workspace.clone(), args.command.clone());
    spec.ro = args.ro.clone();
    spec.rw = args.rw.clone();
    spec.net = net;
    spec.limits = limits;
    spec.env = env;
    spec.cwd = args.cwd.clone();
    spec.forbidden = forbidden(globals, &args.workspace);
    spec.cgroup = cfg.cgroup.mode();
    spec.subid_user = cfg.subid_user.clone();
    spec.unix_sockets = args.unix_sockets;
    spec.address_space_mb = args.address_space;
    spec.output = match args.capture_json {
        Some(cap) => Output::Capture { cap },
        None => Output::Inherit,
    };
    Ok(spec)
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

fn exec(args: ExecArgs, globals: &Globals) -> CmdResult {
    let capture = args.capture_json.is_some();
    // The secret hand-off is read to EOF and closed before anything else (config, paths).
    let secret_env = match args.env_fd.map(SecretEnv::read_from_fd).transpose() {
        Ok(e) => e.unwrap_or_default(),
        Err(e) if capture => {
            print_report(&LaunchReport::error("invalid", &e.to_string()));
            return Ok(ExitCode::from(125));
        }
        Err(e) => return Err(e.into()),
    };
    let spec = match build_spec(&args, globals) {
        Ok(mut s) => {
            s.secret_env = secret_env;
            s
        }
        Err(e) if capture => {
            print_report(&LaunchReport::error("invalid", &e.to_string()));
            return Ok(ExitCode::from(125));
        }
        Err(e) => return Err(e),
    };
    let result = chitin_sandbox::run(&spec);
    if capture {
        let report = match &result {
            Ok(o) => LaunchReport::from_outcome(o),
            Err(e) => LaunchReport::error(error_kind(e), &e.to_string()),
        };
        print_report(&report);
        return Ok(exit_code(report.status()));
    }
    match result {
        Ok(o) => {
            if let Some(k) = &o.killed {
                eprintln!("chitin: sandbox: killed: {k}");
            }
            let code = match (&o.killed, o.exit) {
                (Some(chitin_sandbox::Killed::Timeout), _) => 124,
                (_, Exit::Code(c)) => c,
                (_, Exit::Signal(s)) => 128 + s,
            };
            Ok(exit_code(code))
        }
        Err(e) => {
            eprintln!("chitin: sandbox: {e}");
            Ok(ExitCode::from(launch_failure_code(&e)))
        }
    }
}

fn error_kind(e: &SandboxError) -> &'static str {
    chitin_sandbox::launcher::error_kind(e)
}

/// 125: the sandbox could not be set up; 126/127: the program could not be run (as `env`).
fn launch_failure_code(e: &SandboxError) -> u8 {
    match e {
        SandboxError::Exec { source, .. } if source.kind() == std::io::ErrorKind::NotFound => 127,
        SandboxError::Exec { .. } => 126,
        _ => 125,
    }
}

fn print_report(r: &LaunchReport) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, r);
    let _ = writeln!(out);
    let _ = out.flush();
}
