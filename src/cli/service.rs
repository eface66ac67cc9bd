//! `chitin service install [--user] | status | uninstall`: the gateway as a hardened systemd
//! service.
//!
//! The unit confines the gateway (read-only system, private /tmp, only the state directory,
//! the workspace and the backup directory writable, a system call allow-list, a memory cap)
//! while leaving the sandbox what it needs to confine tools itself: user, PID, network, mount,
//! IPC and UTS namespaces (`RestrictNamespaces` allows exactly those), the mount API, seccomp
//! and landlock system calls, and a `/proc` without over-mounts (so no `ProtectKernelTunables`,
//! `ProtectKernelLogs`, `ProcSubset`: the kernel refuses a fresh `/proc` in a user namespace
//! when parts of the existing one are covered). The passphrase reaches the gateway as the
//! systemd credential `chitin-passphrase` (`LoadCredential=`), never through the unit text or
//! an environment variable.
//!
//! The unit directory is `--unit-dir DIR`, else `$CHITIN_SYSTEMD_UNIT_DIR`, else
//! `/etc/systemd/system` (system) or `$XDG_CONFIG_HOME/systemd/user` (`--user`). With an
//! explicit directory, systemctl is not run: the commands to run are printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};

/// The unit's file name.
pub const UNIT_NAME: &str = "chitin.service";
/// The first line of every unit this command writes (it only replaces or removes those).
pub const MARKER: &str = "# Written by `chitin service install`";

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Write (and, unless --unit-dir is given, enable and start) the systemd unit.
    Install {
        /// A user service (systemctl --user) instead of a system service
        #[arg(long)]
        user: bool,
        /// Where to write chitin.service [default: $CHITIN_SYSTEMD_UNIT_DIR, else the
        /// system or user unit directory]; with it, systemctl is not run
        #[arg(long, value_name = "DIR")]
        unit_dir: Option<PathBuf>,
        /// The file systemd loads as the credential `chitin-passphrase` [default:
        /// /etc/chitin/passphrase, or ~/.config/chitin/passphrase with --user]; make it 0600
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// No passphrase credential ([secrets] backend = "file" needs none)
        #[arg(long, conflicts_with = "passphrase_file")]
        no_passphrase: bool,
        /// MemoryMax= of the service (gateway and every sandboxed tool together)
        #[arg(long, value_name = "SIZE", default_value = "2G")]
        memory_max: String,
        /// User= of a system service [default: the user running this command, if not root]
        #[arg(long, value_name = "USER")]
        run_as: Option<String>,
        /// Replace a chitin.service that this command did not write
        #[arg(long)]
        force: bool,
    },
    /// Show the unit file and what systemd says about it.
    Status {
        #[arg(long)]
        user: bool,
        #[arg(long, value_name = "DIR")]
        unit_dir: Option<PathBuf>,
    },
    /// Stop, disable and remove the unit (only one this command wrote).
    Uninstall {
        #[arg(long)]
        user: bool,
        #[arg(long, value_name = "DIR")]
        unit_dir: Option<PathBuf>,
    },
}

/// Errors of `chitin service`.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "{path} exists and was not written by `chitin service install`; move it away or pass --force"
    )]
    Foreign { path: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("`systemctl {args}` failed: {why}")]
    Systemctl { args: String, why: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ServiceError + use<> {
    let path = path.to_path_buf();
    move |source| ServiceError::Io { what, path, source }
}

/// Everything a unit is made from.
#[derive(Debug, Clone)]
pub struct UnitSpec {
    pub user_unit: bool,
    pub executable: PathBuf,
    pub home: PathBuf,
    /// `--config` given to every command (only when not the default in the home).
    pub config: Option<PathBuf>,
    /// ReadWritePaths= (the state dir first).
    pub writable: Vec<PathBuf>,
    pub passphrase_file: Option<PathBuf>,
    pub memory_max: String,
    pub run_as: Option<String>,
}

/// Quotes a path for a unit file (systemd's C-style quoting; `%` doubled).
fn unit_quote(p: &Path) -> String {
    let s = p.display().to_string().replace('%', "%%");
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

fn under_home_dirs(p: &Path) -> bool {
    ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| p.starts_with(h))
}

/// The unit text.
pub fn render(spec: &UnitSpec) -> String {
    use std::fmt::Write as _;
    let mut u = String::new();
    let _ = writeln!(
        u,
        "{MARKER}. Re-run it to update; `chitin service uninstall` removes it."
    );
    let _ = writeln!(u, "[Unit]");
    let _ = writeln!(u, "Description=Chitin policy gateway for AI agents");
    let _ = writeln!(u, "Documentation=man:systemd.exec(5)");
    if !spec.user_unit {
        let _ = writeln!(u, "Wants=network-online.target");
        let _ = writeln!(u, "After=network-online.target");
    }
    let _ = writeln!(u);
    let _ = writeln!(u, "[Service]");
    let _ = writeln!(u, "Type=simple");
    let mut exec = format!("{} gateway", unit_quote(&spec.executable));
    if let Some(c) = &spec.config {
        exec = format!(
            "{} --config {} gateway",
            unit_quote(&spec.executable),
            unit_quote(c)
        );
    }
    let _ = writeln!(u, "ExecStart={exec}");
    let _ = writeln!(u, "ExecReload=/bin/kill -HUP $MAINPID");
    let _ = writeln!(u, "Environment=CHITIN_HOME={}", unit_quote(&spec.home));
    if let Some(user) = &spec.run_as {
        let _ = writeln!(u, "User={user}");
    }
    if let Some(p) = &spec.passphrase_file {
        let _ = writeln!(
            u,
            "# The secret store's passphrase, readable only by this service in $CREDENTIALS_DIRECTORY."
        );
        let _ = writeln!(
            u,
            "LoadCredential={}:{}",
            crate::secrets::identity::CREDENTIAL_NAME,
            unit_quote(p)
        );
    }
    let _ = writeln!(u, "Restart=on-failure");
    let _ = writeln!(u, "RestartSec=5s");
    let _ = writeln!(u, "TimeoutStopSec=30s");
    let _ = writeln!(u);
    let _ = writeln!(
        u,
        "# Hardening. The sandbox confines each tool run itself and needs user, PID, network,"
    );
    let _ = writeln!(
        u,
        "# mount, IPC and UTS namespaces, the mount API, seccomp and landlock: all allowed below."
    );
    let _ = writeln!(
        u,
        "# /proc must stay without over-mounts (no ProtectKernelTunables/ProtectKernelLogs/ProcSubset):"
    );
    let _ = writeln!(
        u,
        "# the kernel refuses a fresh /proc in a user namespace when parts of /proc are covered."
    );
    let _ = writeln!(u, "NoNewPrivileges=yes");
    let _ = writeln!(u, "ProtectSystem=strict");
    // ReadWritePaths= can open paths under a read-only /home, not under an inaccessible one.
    let needs_home = std::iter::once(&spec.executable)
        .chain(std::iter::once(&spec.home))
        .chain(spec.writable.iter())
        .chain(spec.config.iter())
        .any(|p| under_home_dirs(p));
    let _ = writeln!(
        u,
        "ProtectHome={}",
        if needs_home { "read-only" } else { "yes" }
    );
    let rw: Vec<String> = spec.writable.iter().map(|p| unit_quote(p)).collect();
    let _ = writeln!(u, "ReadWritePaths={}", rw.join(" "));
    let _ = writeln!(u, "PrivateTmp=yes");
    let _ = writeln!(u, "UMask=0077");
    let _ = writeln!(u, "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6");
    let _ = writeln!(u, "RestrictNamespaces=user pid net mnt ipc uts");
    let _ = writeln!(u, "SystemCallArchitectures=native");
    let _ = writeln!(
        u,
        "SystemCallFilter=@system-service @mount seccomp landlock_create_ruleset landlock_add_rule landlock_restrict_self sethostname"
    );
    let _ = writeln!(u, "SystemCallErrorNumber=EPERM");
    let _ = writeln!(u, "LockPersonality=yes");
    let _ = writeln!(u, "RestrictRealtime=yes");
    let _ = writeln!(u, "RestrictSUIDSGID=yes");
    let _ = writeln!(u, "ProtectKernelModules=yes");
    let _ = writeln!(u, "ProtectControlGroups=yes");
    let _ = writeln!(u, "ProtectClock=yes");
    let _ = writeln!(u, "MemoryMax={}", spec.memory_max);
    let _ = writeln!(u, "TasksMax=4096");
    let _ = writeln!(u);
    let _ = writeln!(u, "[Install]");
    let _ = writeln!(
        u,
        "WantedBy={}",
        if spec.user_unit {
            "default.target"
        } else {
            "multi-user.target"
        }
    );
    u
}

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn user_config_dir() -> Result<PathBuf, ServiceError> {
    env_dir("XDG_CONFIG_HOME")
        .or_else(|| env_dir("HOME").map(|h| h.join(".config")))
        .ok_or_else(|| {
            ServiceError::Invalid("neither XDG_CONFIG_HOME nor HOME is set; pass --unit-dir".into())
        })
}

/// The unit directory and whether it was chosen explicitly (then systemctl is not run).
fn unit_dir(user: bool, given: Option<PathBuf>) -> Result<(PathBuf, bool), ServiceError> {
    if let Some(d) = given.or_else(|| env_dir("CHITIN_SYSTEMD_UNIT_DIR")) {
        return Ok((d, true));
    }
    if user {
        Ok((user_config_dir()?.join("systemd/user"), false))
    } else {
        Ok((PathBuf::from("/etc/systemd/system"), false))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        }
    })
}

fn systemctl(user: bool, args: &[&str]) -> Result<String, ServiceError> {
    let mut cmd = std::process::Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    let out = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| ServiceError::Systemctl {
            args: args.join(" "),
            why: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(text)
    } else {
        Err(ServiceError::Systemctl {
            args: args.join(" "),
            why: format!("{} {}", text, String::from_utf8_lossy(&out.stderr).trim())
                .trim()
                .to_string(),
        })
    }
}

fn ours(path: &Path) -> Result<Option<bool>, ServiceError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t.starts_with(MARKER))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path)(e)),
    }
}

fn write_unit(path: &Path, text: &str) -> Result<(), ServiceError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let tmp = dir.join(format!(".{UNIT_NAME}.tmp-{}", std::process::id()));
    let result = (|| {
        // A unit holds no secret; systemd (and `systemctl status` for others) read it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io("write", path)(e)
    })
}

pub fn run(cmd: ServiceCmd, globals: &Globals) -> CmdResult {
    match cmd {
        ServiceCmd::Install {
            user,
            unit_dir: dir,
            passphrase_file,
            no_passphrase,
            memory_max,
            run_as,
            force,
        } => install(
            globals,
            user,
            dir,
            passphrase_file,
            no_passphrase,
            &memory_max,
            run_as,
            force,
        ),
        ServiceCmd::Status {
            user,
            unit_dir: dir,
        } => status(user, dir),
        ServiceCmd::Uninstall {
            user,
            unit_dir: dir,
        } => uninstall(user, dir),
    }
}

#[expect(clippy::too_many_arguments, reason = "one per command-line flag")]
fn install(
    globals: &Globals,
    user: bool,
    dir: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    no_passphrase: bool,
    memory_max: &str,
    run_as: Option<String>,
    force: bool,
) -> CmdResult {
    let config = globals.load_config()?;
    crate::state::Home::open(&globals.home)?;
    if memory_max.is_empty()
        || !memory_max
            .bytes()
            .all(|b| b.is_ascii_digit() || b"KMGTkmgt%.".contains(&b))
        || memory_max.eq_ignore_ascii_case("infinity")
    {
        return Err(ServiceError::Invalid(format!(
            "--memory-max {memory_max:?} is not a size such as 2G, 512M or 50%"
        ))
        .into());
    }
    if let Some(u) = &run_as
        && (u.is_empty()
            || !u
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)))
    {
        return Err(ServiceError::Invalid(format!("--run-as {u:?} is not a user name")).into());
    }
    let home = absolute(&globals.home);
    let workspace = absolute(&config.workspace_dir(&globals.home));
    let mut writable = vec![home.clone(), workspace.clone()];
    if !config.backup.dir.is_empty() {
        writable.push(absolute(Path::new(&config.backup.dir)));
    }
    writable.dedup();
    // PrivateTmp=yes gives the service its own /tmp and /var/tmp: state there would vanish.
    if let Some(p) = writable
        .iter()
        .find(|p| p.starts_with("/tmp") || p.starts_with("/var/tmp"))
    {
        return Err(ServiceError::Invalid(format!(
            "{} is under /tmp or /var/tmp, which the service cannot see (PrivateTmp=yes gives it \
             its own); move the state directory, the workspace and the backup directory elsewhere \
             (e.g. /var/lib/chitin, or ~/.chitin for --user)",
            p.display()
        ))
        .into());
    }
    let executable = std::env::current_exe().map(|p| absolute(&p)).map_err(|e| {
        ServiceError::Invalid(format!("cannot tell where the chitin binary is: {e}"))
    })?;
    let passphrase_file = if no_passphrase
        || (passphrase_file.is_none()
            && config.secrets.backend == crate::config::secrets::IdentityBackend::File)
    {
        None
    } else {
        Some(match passphrase_file {
            Some(p) => absolute(&p),
            None if user => user_config_dir()?.join("chitin/passphrase"),
            None => PathBuf::from("/etc/chitin/passphrase"),
        })
    };
    let run_as = if user {
        None
    } else {
        run_as.or_else(|| {
            std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty() && u != "root")
        })
    };
    let spec = UnitSpec {
        user_unit: user,
        executable,
        home: home.clone(),
        config: globals
            .config_explicit
            .then(|| absolute(&globals.config_path)),
        writable,
        passphrase_file: passphrase_file.clone(),
        memory_max: memory_max.to_string(),
        run_as,
    };
    let (dir, explicit) = unit_dir(user, dir)?;
    let path = dir.join(UNIT_NAME);
    if ours(&path)? == Some(false) && !force {
        return Err(ServiceError::Foreign { path }.into());
    }
    write_unit(&path, &render(&spec))?;
    println!("wrote {}", path.display());
    if !user && spec.run_as.is_none() {
        println!(
            "note: the service runs as root (no User=); to run it as an unprivileged user, give that user the state directory and pass --run-as USER"
        );
    }
    if let Some(p) = &passphrase_file {
        match std::fs::metadata(p) {
            Ok(m) => {
                use std::os::unix::fs::PermissionsExt;
                let mode = m.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    println!(
                        "warning: {} has mode {mode:04o}; run `chmod 600 {}`",
                        p.display(),
                        p.display()
                    );
                }
            }
            Err(_) => println!(
                "the passphrase credential {} does not exist yet; create it (0600) before starting:\n  install -d -m 700 {}\n  (umask 077; cat > {})   # type the passphrase, then Ctrl-D",
                p.display(),
                p.parent()
                    .map_or_else(String::new, |d| d.display().to_string()),
                p.display()
            ),
        }
    }
    let ctl = if user {
        "systemctl --user"
    } else {
        "systemctl"
    };
    if explicit {
        println!(
            "not enabled (unit directory given); to use it:\n  {ctl} daemon-reload\n  {ctl} enable --now {UNIT_NAME}"
        );
        return Ok(ExitCode::SUCCESS);
    }
    systemctl(user, &["daemon-reload"])?;
    systemctl(user, &["enable", "--now", UNIT_NAME])?;
    println!("enabled and started {UNIT_NAME}; `chitin service status` shows it");
    Ok(ExitCode::SUCCESS)
}

fn status(user: bool, dir: Option<PathBuf>) -> CmdResult {
    let (dir, explicit) = unit_dir(user, dir)?;
    let path = dir.join(UNIT_NAME);
    match ours(&path)? {
        None => {
            println!(
                "not installed: {} does not exist (`chitin service install{}`)",
                path.display(),
                if user { " --user" } else { "" }
            );
            return Ok(ExitCode::from(1));
        }
        Some(false) => println!("{} exists but was not written by chitin", path.display()),
        Some(true) => println!("unit: {}", path.display()),
    }
    let text = std::fs::read_to_string(&path).map_err(io("read", &path))?;
    for l in text.lines() {
        if [
            "ExecStart=",
            "Environment=",
            "User=",
            "LoadCredential=",
            "ReadWritePaths=",
            "MemoryMax=",
        ]
        .iter()
        .any(|k| l.starts_with(k))
        {
            println!("  {l}");
        }
    }
    if explicit {
        println!("systemd: not asked (unit directory given)");
        return Ok(ExitCode::SUCCESS);
    }
    let enabled = systemctl(user, &["is-enabled", UNIT_NAME]).unwrap_or_else(|e| e.to_string());
    let active = systemctl(user, &["is-active", UNIT_NAME]);
    println!("enabled: {enabled}");
    match &active {
        Ok(a) => println!("active: {a}"),
        Err(e) => println!("active: no ({e})"),
    }
    if let Ok(s) = systemctl(
        user,
        &[
            "show",
            UNIT_NAME,
            "-p",
            "MainPID,NRestarts,ActiveEnterTimestamp,Result",
        ],
    ) {
        for l in s.lines() {
            println!("  {l}");
        }
    }
    Ok(if active.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn uninstall(user: bool, dir: Option<PathBuf>) -> CmdResult {
    let (dir, explicit) = unit_dir(user, dir)?;
    let path = dir.join(UNIT_NAME);
    match ours(&path)? {
        None => {
            println!("not installed: {} does not exist", path.display());
            return Ok(ExitCode::SUCCESS);
        }
        Some(false) => return Err(ServiceError::Foreign { path }.into()),
        Some(true) => {}
    }
    if !explicit {
        // A unit that is not running is not an error here.
        let _ = systemctl(user, &["disable", "--now", UNIT_NAME]);
    }
    std::fs::remove_file(&path).map_err(io("remove", &path))?;
    println!("removed {}", path.display());
    if !explicit {
        systemctl(user, &["daemon-reload"])?;
    }
    Ok(ExitCode::SUCCESS)
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

    fn spec(home: &str) -> UnitSpec {
        UnitSpec {
            user_unit: false,
            executable: PathBuf::from("/usr/local/bin/chitin"),
            home: PathBuf::from(home),
            config: None,
            writable: vec![PathBuf::from(home), PathBuf::from("/srv/chitin work")],
            passphrase_file: Some(PathBuf::from("/etc/chitin/passphrase")),
            memory_max: "2G".into(),
            run_as: Some("chitin".into()),
        }
    }

    #[test]
    fn protect_home_is_read_only_only_when_something_lives_under_home() {
        let u = render(&spec("/var/lib/chitin"));
        assert!(u.contains("\nProtectHome=yes\n"), "{u}");
        assert!(
            u.contains("\nReadWritePaths=/var/lib/chitin \"/srv/chitin work\"\n"),
            "{u}"
        );
        let u = render(&spec("/home/a/.chitin"));
        assert!(u.contains("\nProtectHome=read-only\n"), "{u}");
    }

    #[test]
    fn the_passphrase_is_a_credential_never_an_environment_variable() {
        let u = render(&spec("/var/lib/chitin"));
        assert!(u.contains("\nLoadCredential=chitin-passphrase:/etc/chitin/passphrase\n"));
        assert!(!u.contains("CHITIN_PASSPHRASE"));
        assert!(u.starts_with(MARKER));
    }
}
