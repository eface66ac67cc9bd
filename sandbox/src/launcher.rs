//! `chitin-sandbox-launch`: the small launcher binary of the tool path.
//!
//! The gateway starts one launcher per tool call (namespace setup needs a single-threaded
//! process, see the crate docs). Exec'ing the 33 MB `chitin` binary for that (`chitin sandbox
//! exec`) cost ~1.5 ms per call in the dynamic loader and clap alone; this binary only links
//! the jailer. It takes every setting as a flag (the gateway's `[sandbox]` section, read once
//! at start), reads no configuration file and no environment, always captures the command's
//! output and prints one JSON report on stdout (the fields of the gateway's `LaunchReport`).
//! What it runs is confined exactly as `chitin sandbox exec` confines it: both build a
//! [`Spec`] and call [`crate::run`], and both keep the state directory out of the view with
//! [`forbidden`].
//!
//! ```text
//! chitin-sandbox-launch --workspace DIR --state-dir DIR --capture BYTES
//!     [--timeout SECS] [--memory MB] [--max-procs N] [--cpu SECS] [--file-size MB]
//!     [--open-files N] [--tmp-size MB] [--quota-bytes N] [--quota-inodes N]
//!     [--cgroup auto|required|off] [--subid-user NAME] [--ro PATH]... [--rw PATH]...
//!     [--net HOST:PORT]... [--env KEY=VALUE]... [--cwd DIR] [--env-fd FD]
//!     -- PROGRAM [ARG]...
//! ```
//!
//! Limits not given are [`Limits::default`]'s (the gateway always gives all of them).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::{CgroupMode, Exit, Limits, NetDest, Outcome, Output, SandboxError, SecretEnv, Spec};

/// The launcher's file name; the gateway looks for it next to the `chitin` binary.
pub const BINARY: &str = "chitin-sandbox-launch";

/// Paths no sandbox may see: the state directory `home` (except, when the workspace lives in
/// `<home>/workspaces/`, that one workspace: then every other entry of the state directory
/// and every sibling workspace).
pub fn forbidden(home: &Path, workspace: &Path) -> Vec<PathBuf> {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    let ws = std::fs::canonicalize(workspace).unwrap_or_else(|_| workspace.to_path_buf());
    let workspaces = home.join("workspaces");
    if ws.starts_with(&workspaces) && ws != workspaces {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&home)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| *p != workspaces)
                    .collect()
            })
            .unwrap_or_default();
        // Sibling workspaces.
        if let Ok(d) = std::fs::read_dir(&workspaces) {
            out.extend(
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| !ws.starts_with(p)),
            );
        }
        out
    } else {
        vec![home]
    }
}

/// The parsed command line.
#[derive(Debug, Default)]
struct Args {
    workspace: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    capture: Option<usize>,
    limits: Limits,
    cgroup: CgroupMode,
    subid_user: Option<String>,
    ro: Vec<PathBuf>,
    rw: Vec<PathBuf>,
    net: Vec<NetDest>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    env_fd: Option<i32>,
    argv: Vec<String>,
}

fn invalid(m: impl Into<String>) -> SandboxError {
    SandboxError::Invalid(m.into())
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, SandboxError> {
    v.parse()
        .map_err(|_| invalid(format!("{flag} {v}: expected a number")))
}

fn utf8(flag: &str, v: OsString) -> Result<String, SandboxError> {
    v.into_string()
        .map_err(|_| invalid(format!("{flag}: not valid UTF-8")))
}

fn parse(mut it: impl Iterator<Item = OsString>) -> Result<Args, SandboxError> {
    let mut a = Args::default();
    while let Some(flag) = it.next() {
        let flag = utf8("option", flag)?;
        if flag == "--" {
            a.argv = it.map(|x| utf8("PROGRAM", x)).collect::<Result<_, _>>()?;
            break;
        }
        let value = it
            .next()
            .ok_or_else(|| invalid(format!("{flag} needs a value")))?;
        let path = || PathBuf::from(value.clone());
        let text = || utf8(&flag, value.clone());
        let l = &mut a.limits;
        match flag.as_str() {
            "--workspace" => a.workspace = Some(path()),
            "--state-dir" => a.state_dir = Some(path()),
            "--capture" => a.capture = Some(number(&flag, &text()?)?),
            "--timeout" => l.timeout = Duration::from_secs(number::<u64>(&flag, &text()?)?.max(1)),
            "--memory" => l.memory_mb = number::<u64>(&flag, &text()?)?.max(16),
            "--max-procs" => l.max_procs = number::<u64>(&flag, &text()?)?.max(1),
            "--cpu" => l.cpu_secs = number::<u64>(&flag, &text()?)?.max(1),
            "--file-size" => l.file_size_mb = number(&flag, &text()?)?,
            "--open-files" => l.open_files = number::<u64>(&flag, &text()?)?.max(16),
            "--tmp-size" => l.tmp_size_mb = number::<u64>(&flag, &text()?)?.max(1),
            "--quota-bytes" => l.workspace.bytes = number(&flag, &text()?)?,
            "--quota-inodes" => l.workspace.inodes = number(&flag, &text()?)?,
            "--cgroup" => {
                a.cgroup = match text()?.as_str() {
                    "auto" => CgroupMode::Auto,
                    "required" => CgroupMode::Required,
                    "off" => CgroupMode::Off,
                    other => {
                        return Err(invalid(format!(
                            "--cgroup {other}: expected auto, required or off"
                        )));
                    }
                }
            }
            "--subid-user" => a.subid_user = Some(text()?),
            "--ro" => a.ro.push(path()),
            "--rw" => a.rw.push(path()),
            "--net" => a.net.push(text()?.parse()?),
            "--env" => {
                let e = text()?;
                let (k, v) = e
                    .split_once('=')
                    .ok_or_else(|| invalid(format!("--env {e}: expected KEY=VALUE")))?;
                a.env.push((k.to_string(), v.to_string()));
            }
            "--cwd" => a.cwd = Some(path()),
            "--env-fd" => a.env_fd = Some(number(&flag, &text()?)?),
            other => return Err(invalid(format!("unknown option {other}"))),
        }
    }
    Ok(a)
}

fn spec(a: Args, secret_env: SecretEnv) -> Result<(Spec, usize), SandboxError> {
    let workspace = a
        .workspace
        .ok_or_else(|| invalid("--workspace is required"))?;
    let state_dir = a
        .state_dir
        .ok_or_else(|| invalid("--state-dir is required"))?;
    let cap = a.capture.ok_or_else(|| invalid("--capture is required"))?;
    if a.argv.is_empty() {
        return Err(invalid("no program given (after --)"));
    }
    let mut spec = Spec::new(workspace, a.argv);
    spec.forbidden = forbidden(&state_dir, &spec.workspace);
    spec.ro = a.ro;
    spec.rw = a.rw;
    spec.net = a.net;
    spec.limits = a.limits;
    spec.env = a.env;
    spec.secret_env = secret_env;
    spec.cwd = a.cwd;
    spec.cgroup = a.cgroup;
    if let Some(u) = a.subid_user {
        spec.subid_user = u;
    }
    spec.output = Output::Capture { cap };
    Ok((spec, cap))
}

/// `unavailable`, `invalid`, `setup` or `exec` (the report's `error.kind`).
pub fn error_kind(e: &SandboxError) -> &'static str {
    match e {
        SandboxError::Unavailable { .. } => "unavailable",
        SandboxError::Invalid(_) | SandboxError::Path { .. } => "invalid",
        SandboxError::Setup { .. } | SandboxError::MultiThreaded(_) => "setup",
        SandboxError::Exec { .. } => "exec",
    }
}

/// A JSON string literal (RFC 8259 escaping; the text is valid UTF-8 already).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_opt<T: std::fmt::Display>(out: &mut String, v: Option<T>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
}

/// The report of a run as one JSON object, with exactly the fields of the gateway's
/// `LaunchReport` (which refuses unknown fields), and the exit status the launcher ends with
/// (as `chitin sandbox exec --capture-json`: 125 setup, 127 exec failure, 124 timeout, else
/// the command's code or 128 + signal).
pub fn report_json(result: &Result<Outcome, SandboxError>) -> (String, i32) {
    let mut out = String::with_capacity(256);
    match result {
        Ok(o) => {
            let (code, signal) = match o.exit {
                Exit::Code(c) => (Some(c), None),
                Exit::Signal(s) => (None, Some(s)),
            };
            out.push_str("{\"exit_code\":");
            json_opt(&mut out, code);
            out.push_str(",\"signal\":");
            json_opt(&mut out, signal);
            out.push_str(",\"killed\":");
            match &o.killed {
                Some(k) => json_str(&mut out, &k.to_string()),
                None => out.push_str("null"),
            }
            let _ = write!(
                out,
                ",\"duration_ms\":{}",
                u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX)
            );
            out.push_str(",\"stdout\":");
            json_str(&mut out, &String::from_utf8_lossy(&o.stdout.bytes));
            out.push_str(",\"stderr\":");
            json_str(&mut out, &String::from_utf8_lossy(&o.stderr.bytes));
            let _ = write!(
                out,
                ",\"stdout_dropped\":{},\"stderr_dropped\":{},\"cgroup\":{},\"error\":null}}",
                o.stdout.dropped, o.stderr.dropped, o.cgroup
            );
            let status = if o.killed == Some(crate::Killed::Timeout) {
                124
            } else {
                o.exit.status()
            };
            (out, status)
        }
        Err(e) => {
            let kind = error_kind(e);
            out.push_str(
                "{\"exit_code\":null,\"signal\":null,\"killed\":null,\"duration_ms\":0,\
                 \"stdout\":\"\",\"stderr\":\"\",\"stdout_dropped\":0,\"stderr_dropped\":0,\
                 \"cgroup\":false,\"error\":{\"kind\":",
            );
            json_str(&mut out, kind);
            out.push_str(",\"message\":");
            json_str(&mut out, &e.to_string());
            out.push_str("}}");
            (out, if kind == "exec" { 127 } else { 125 })
        }
    }
}

/// Entry point of `chitin-sandbox-launch` (arguments after the program name).
pub fn main_with(args: impl Iterator<Item = OsString>) -> ExitCode {
    ExitCode::from(status_with(args))
}

/// [`main_with`], returning the exit status (what a child of the zygote exits with).
pub fn status_with(args: impl Iterator<Item = OsString>) -> u8 {
    let result = parse(args).and_then(|a| {
        // The secret hand-off is read to EOF and closed before anything else.
        let secret_env = match a.env_fd {
            Some(fd) => SecretEnv::read_from_fd(fd)?,
            None => SecretEnv::new(),
        };
        let (spec, _) = spec(a, secret_env)?;
        crate::run(&spec)
    });
    let (json, status) = report_json(&result);
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{json}");
    let _ = stdout.flush();
    u8::try_from(status.clamp(0, 255)).unwrap_or(1)
}

/// Entry point of the `chitin-sandbox-launch` binary: `--serve` alone makes it the zygote
/// ([`crate::zygote`]), anything else is one launch.
pub fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == crate::zygote::SERVE_FLAG) {
        if std::env::args_os().len() != 2 {
            eprintln!(
                "chitin-sandbox-launch: {} takes no other argument",
                crate::zygote::SERVE_FLAG
            );
            return ExitCode::from(125);
        }
        return crate::zygote::serve();
    }
    main_with(args)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use super::*;

    fn args(list: &[&str]) -> Result<Args, SandboxError> {
        parse(list.iter().map(|s| OsString::from(*s)))
    }

    #[test]
    fn every_flag_of_the_launcher_reaches_the_spec() {
        let a = args(&[
            "--workspace",
            "/w",
            "--state-dir",
            "/s",
            "--capture",
            "100",
            "--timeout",
            "7",
            "--memory",
            "300",
            "--max-procs",
            "9",
            "--cpu",
            "5",
            "--file-size",
            "3",
            "--open-files",
            "40",
            "--tmp-size",
            "8",
            "--quota-bytes",
            "1000",
            "--quota-inodes",
            "20",
            "--cgroup",
            "off",
            "--subid-user",
            "svc",
            "--ro",
            "/r",
            "--rw",
            "/x",
            "--net",
            "example.com:443",
            "--env",
            "A=b=c",
            "--cwd",
            "/w/d",
            "--",
            "ls",
            "-l",
        ])
        .unwrap();
        let (s, cap) = spec(a, SecretEnv::new()).unwrap();
        assert_eq!(cap, 100);
        assert_eq!(s.output, Output::Capture { cap: 100 });
        assert_eq!(s.workspace, PathBuf::from("/w"));
        assert_eq!(s.forbidden, vec![PathBuf::from("/s")]);
        let l = &s.limits;
        assert_eq!(
            (
                l.timeout,
                l.memory_mb,
                l.max_procs,
                l.cpu_secs,
                l.file_size_mb
            ),
            (Duration::from_secs(7), 300, 9, 5, 3)
        );
        assert_eq!((l.open_files, l.tmp_size_mb), (40, 8));
        assert_eq!((l.workspace.bytes, l.workspace.inodes), (1000, 20));
        assert_eq!(s.cgroup, CgroupMode::Off);
        assert_eq!(s.subid_user, "svc");
        assert_eq!(
            (s.ro.clone(), s.rw.clone()),
            (vec!["/r".into()], vec!["/x".into()])
        );
        assert_eq!(s.net[0].to_string(), "example.com:443");
        assert_eq!(s.env, vec![("A".to_string(), "b=c".to_string())]);
        assert_eq!(s.cwd, Some(PathBuf::from("/w/d")));
        assert_eq!(s.argv, vec!["ls".to_string(), "-l".to_string()]);
    }

    #[test]
    fn the_launcher_refuses_what_it_does_not_know_and_what_is_missing() {
        let e = args(&["--workspace", "/w", "--shell", "x"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid sandbox request: unknown option --shell"
        );
        let e = args(&["--cgroup", "maybe"]).unwrap_err();
        assert!(
            e.to_string().contains("expected auto, required or off"),
            "{e}"
        );
        let e = args(&["--timeout"]).unwrap_err();
        assert!(e.to_string().contains("--timeout needs a value"), "{e}");
        let e = args(&["--net", "10.0.0.1:80"]).unwrap_err();
        assert!(e.to_string().contains("IP-literal"), "{e}");
        let no_state = args(&["--workspace", "/w", "--capture", "1", "--", "ls"]).unwrap();
        let e = spec(no_state, SecretEnv::new()).unwrap_err();
        assert!(e.to_string().contains("--state-dir is required"), "{e}");
        let no_program = args(&[
            "--workspace",
            "/w",
            "--state-dir",
            "/s",
            "--capture",
            "1",
            "--",
        ])
        .unwrap();
        let e = spec(no_program, SecretEnv::new()).unwrap_err();
        assert!(e.to_string().contains("no program given"), "{e}");
    }

    #[test]
    fn the_state_dir_is_hidden_whole_unless_the_workspace_lives_in_its_workspaces() {
        let home = std::env::temp_dir().join(format!("chitin-fb-{}", std::process::id()));
        let ws = home.join("workspaces").join("a");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(home.join("workspaces").join("b")).unwrap();
        std::fs::write(home.join("secrets.age"), b"x").unwrap();
        let home_c = std::fs::canonicalize(&home).unwrap();
        let mut f = forbidden(&home, &ws);
        f.sort();
        assert_eq!(
            f,
            vec![
                home_c.join("secrets.age"),
                home_c.join("workspaces").join("b")
            ]
        );
        assert_eq!(forbidden(&home, Path::new("/srv/elsewhere")), vec![home_c]);
        std::fs::remove_dir_all(&home).unwrap();
    }
}
