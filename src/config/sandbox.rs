//! The `[sandbox]` section of `chitin.toml`.

use serde::Deserialize;

/// Documentation and defaults for the `[sandbox]` section, written by `chitin init`.
pub const TEMPLATE: &str = r#"
[sandbox]
# Limits for every sandboxed tool run (`exec` and the file tools) and for
# `chitin sandbox exec` when a flag is not given. The sandbox never runs without full kernel
# enforcement (landlock, seccomp, user/pid/net/mount namespaces): there is no setting to
# weaken it. Check the host with `chitin sandbox check`.
# Wall-clock limit in seconds; the whole process tree is killed when it passes.
timeout_secs = 30
# Memory in MiB (per-run cgroup when the host allows one; RLIMIT_AS backstop).
memory_mb = 512
# Processes and threads (cgroup pids.max and RLIMIT_NPROC).
max_procs = 64
# CPU seconds (RLIMIT_CPU).
cpu_secs = 30
# Largest file a sandboxed command may write, in MiB (RLIMIT_FSIZE).
file_size_mb = 256
# Open files per process (RLIMIT_NOFILE).
open_files = 256
# Per-run cgroup for memory and process limits: "auto" (use one when the host allows it,
# else rlimits + the sandbox's pid_max only), "required" (refuse to run without one) or
# "off" (rlimits + pid_max only; saves the cgroup migration, the largest spawn cost on
# cgroup v1 hosts). Only a cgroup lets a memory kill be reported as `memory`.
cgroup = "auto"
# Size of the private /tmp (and /dev/shm) in MiB.
tmp_size_mb = 64
# Bytes of stdout and of stderr kept in a tool result; the rest is dropped with a visible
# truncation marker.
output_cap_bytes = 65536
# Largest file read_file returns / edit_file accepts, in bytes.
max_file_bytes = 1048576
# Workspace quota: disk space in MiB (allocated blocks, as `du`) and inodes (files,
# directories, links), 0 = no limit. Measured before every sandboxed run. A run that starts
# at or over the quota can delete and shrink files but not grow any (writes fail with "File
# too large"); a run that starts under it cannot grow one file past what is left. Several
# files written in one run can still pass it together: the next run is then limited.
workspace_quota_mb = 1024
workspace_quota_inodes = 100000
# Only when the gateway runs as root: sandboxed tools never run as host root. They run as
# the first uid/gid of this user's ranges in /etc/subuid and /etc/subgid (add e.g.
# `chitin:200000:65536` to both to reserve ids for Chitin), else as nobody/nogroup (65534).
# The workspace is ID-mapped for that uid (it owns the workspace's files inside the sandbox;
# on disk they stay owned by root). An unprivileged gateway's tools run as its own uid.
subid_user = "chitin"
# Secrets a tool asks for in its environment (default: none). For each entry, at every run
# of `tool`, the gate decides Cedar `secret.use` with principal Chitin::Tool::"<tool>",
# resource Chitin::Secret::"<secret>" and context { host: "env:<tool>", user, session,
# tainted } (for exec also `command_path`, the program's real path after the PATH lookup and
# symlinks, `command_writable` and `command`, its basename). Only allowed secrets are set (as
# `var`); a denied one is simply absent (the denial is audited). No default policy grants any
# secret to a tool: add a permit naming the tool, the secret and the program by its path,
#   when { context.host == "env:exec" && context has command_path &&
#          context.command_path == "/usr/bin/git" }
# (not by `command == "git"`: the model can write its own `./git`). A program in the
# workspace, /tmp, /var/tmp or /dev/shm (or run through a link there) never gets a secret,
# and the default policies release none in a session that has read untrusted content.
# Values reach the sandboxed command through a pipe, never through argv or the launcher's
# environment; tool output showing them is redacted to [REDACTED:<secret>].
# `tool`: exec, read_file, write_file, edit_file or list_dir. `secret`: a name in the store
# (`chitin secrets list`; `chitin.*` names are reserved). `var`: [A-Za-z_][A-Za-z0-9_]*,
# not one the sandbox sets itself (PATH, HOME, LANG, TERM, USER, LOGNAME, TMPDIR, PWD).
# [[sandbox.secret_env]]
# tool = "exec"
# secret = "github_token"
# var = "GITHUB_TOKEN"
"#;

/// One `[[sandbox.secret_env]]` entry: a secret that `tool` asks for in its environment as
/// `var`. Asking is not getting: the gate decides `secret.use` at every run.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretEnvEntry {
    pub tool: String,
    pub secret: String,
    pub var: String,
}

/// `sandbox.cgroup`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupSetting {
    #[default]
    Auto,
    Required,
    Off,
}

impl CgroupSetting {
    pub fn mode(self) -> chitin_sandbox::CgroupMode {
        match self {
            CgroupSetting::Auto => chitin_sandbox::CgroupMode::Auto,
            CgroupSetting::Required => chitin_sandbox::CgroupMode::Required,
            CgroupSetting::Off => chitin_sandbox::CgroupMode::Off,
        }
    }
}

/// The `[sandbox]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxConfig {
    pub timeout_secs: u64,
    pub memory_mb: u64,
    pub max_procs: u64,
    pub cpu_secs: u64,
    pub file_size_mb: u64,
    pub open_files: u64,
    pub tmp_size_mb: u64,
    pub cgroup: CgroupSetting,
    pub output_cap_bytes: usize,
    pub max_file_bytes: usize,
    pub workspace_quota_mb: u64,
    pub workspace_quota_inodes: u64,
    pub subid_user: String,
    pub secret_env: Vec<SecretEnvEntry>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 30,
            memory_mb: 512,
            max_procs: 64,
            cpu_secs: 30,
            file_size_mb: 256,
            open_files: 256,
            tmp_size_mb: 64,
            cgroup: CgroupSetting::Auto,
            output_cap_bytes: 65536,
            max_file_bytes: 1 << 20,
            workspace_quota_mb: 1024,
            workspace_quota_inodes: 100_000,
            subid_user: chitin_sandbox::ids::DEFAULT_SUBID_USER.into(),
            secret_env: Vec::new(),
        }
    }
}

impl SandboxConfig {
    /// Checks `secret_env`: known tool, valid secret name (not reserved), valid variable name
    /// that the sandbox does not set itself, no variable twice for one tool. Messages name
    /// the entry and what to change.
    pub fn validate(&self) -> Result<(), String> {
        let u = &self.subid_user;
        if u.is_empty()
            || u.len() > 32
            || !u
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!(
                "sandbox.subid_user `{}` is not a user name; use letters, digits, '_', '-', '.' \
                 (at most 32 bytes), e.g. \"chitin\"",
                u.escape_default()
            ));
        }
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for (i, e) in self.secret_env.iter().enumerate() {
            let at = format!("[[sandbox.secret_env]] entry {}", i + 1);
            if !crate::policy::TOOLS.contains(&e.tool.as_str()) {
                return Err(format!(
                    "{at}: tool `{}` is not a tool; use one of {}",
                    e.tool.escape_default(),
                    crate::policy::TOOLS.join(", ")
                ));
            }
            let name = super::secret_ref::SecretName::parse(&e.secret)
                .map_err(|m| format!("{at}: {m}"))?;
            if name.is_reserved() {
                return Err(format!(
                    "{at}: secret `{name}` is reserved for Chitin and is never released"
                ));
            }
            if !chitin_sandbox::secret_env::valid_env_key(&e.var) {
                return Err(format!(
                    "{at}: var `{}` is not a valid environment variable name; use \
                     [A-Za-z_][A-Za-z0-9_]* (at most {} bytes)",
                    e.var.escape_default(),
                    chitin_sandbox::secret_env::MAX_KEY_BYTES
                ));
            }
            if chitin_sandbox::secret_env::FIXED_ENV_KEYS.contains(&e.var.as_str()) {
                return Err(format!(
                    "{at}: var `{}` is set by the sandbox itself; choose another name",
                    e.var
                ));
            }
            if seen.contains(&(e.tool.as_str(), e.var.as_str())) {
                return Err(format!(
                    "{at}: var `{}` is already given for tool `{}`",
                    e.var, e.tool
                ));
            }
            seen.push((e.tool.as_str(), e.var.as_str()));
        }
        Ok(())
    }

    /// The `secret_env` entries of one tool.
    pub fn secret_env_for<'a>(&'a self, tool: &'a str) -> impl Iterator<Item = &'a SecretEnvEntry> {
        self.secret_env.iter().filter(move |e| e.tool == tool)
    }

    /// The limits a sandboxed run gets from this section.
    pub fn limits(&self) -> chitin_sandbox::Limits {
        chitin_sandbox::Limits {
            timeout: std::time::Duration::from_secs(self.timeout_secs.max(1)),
            memory_mb: self.memory_mb.max(16),
            max_procs: self.max_procs.max(1),
            cpu_secs: self.cpu_secs.max(1),
            file_size_mb: self.file_size_mb,
            open_files: self.open_files.max(16),
            tmp_size_mb: self.tmp_size_mb.max(1),
            workspace: chitin_sandbox::Quota {
                bytes: self.workspace_quota_mb.saturating_mul(1 << 20),
                inodes: self.workspace_quota_inodes,
            },
        }
    }
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

    #[test]
    fn the_template_parses_to_the_defaults() {
        let cfg: toml::Table = toml::from_str(TEMPLATE).unwrap();
        let section: SandboxConfig = cfg["sandbox"].clone().try_into().unwrap();
        assert_eq!(section, SandboxConfig::default());
    }

    #[test]
    fn the_whole_default_config_carries_the_sandbox_defaults() {
        let cfg = crate::config::Config::parse(
            &crate::config::default_toml(),
            std::path::Path::new("chitin.toml"),
        )
        .unwrap();
        assert_eq!(cfg.sandbox, SandboxConfig::default());
        assert_eq!(cfg.sandbox.limits(), chitin_sandbox::Limits::default());
    }

    #[test]
    fn the_cgroup_setting_accepts_only_its_three_values() {
        let c: SandboxConfig = toml::from_str("cgroup = \"off\"").unwrap();
        assert_eq!(c.cgroup, CgroupSetting::Off);
        let r: Result<SandboxConfig, _> = toml::from_str("cgroup = \"maybe\"");
        assert!(r.is_err());
    }

    #[test]
    fn secret_env_entries_parse_and_validate() {
        let c: SandboxConfig = toml::from_str(
            "[[secret_env]]\ntool = \"exec\"\nsecret = \"github_token\"\nvar = \"GITHUB_TOKEN\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.secret_env_for("exec").count(), 1);
        assert_eq!(c.secret_env_for("read_file").count(), 0);
        let full = crate::config::Config::parse(
            &format!(
                "{}\n[[sandbox.secret_env]]\ntool = \"exec\"\nsecret = \"gh\"\nvar = \"GH\"\n",
                crate::config::default_toml()
            ),
            std::path::Path::new("chitin.toml"),
        );
        assert!(full.is_ok(), "{full:?}");
    }

    #[test]
    fn bad_secret_env_entries_are_refused_with_what_to_change() {
        for (tool, secret, var, want) in [
            ("shell", "gh", "GH", "is not a tool"),
            ("exec", "1gh", "GH", "invalid secret name"),
            ("exec", "chitin.audit-signing-key", "K", "reserved"),
            (
                "exec",
                "gh",
                "GH-TOKEN",
                "not a valid environment variable name",
            ),
            ("exec", "gh", "", "not a valid environment variable name"),
            ("exec", "gh", "PATH", "set by the sandbox itself"),
            ("exec", "gh", "HOME", "set by the sandbox itself"),
            (
                "exec",
                "gh",
                "LD_PRELOAD=x",
                "not a valid environment variable name",
            ),
        ] {
            let c = SandboxConfig {
                secret_env: vec![SecretEnvEntry {
                    tool: tool.into(),
                    secret: secret.into(),
                    var: var.into(),
                }],
                ..SandboxConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "{tool} {secret} {var}: {e}");
            assert!(e.contains("entry 1"), "{e}");
        }
        let e = |v: &str| SecretEnvEntry {
            tool: "exec".into(),
            secret: "gh".into(),
            var: v.into(),
        };
        let twice = SandboxConfig {
            secret_env: vec![e("GH"), e("GH")],
            ..SandboxConfig::default()
        };
        assert!(twice.validate().unwrap_err().contains("already given"));
        let r: Result<SandboxConfig, _> = toml::from_str(
            "[[secret_env]]\ntool = \"exec\"\nsecret = \"gh\"\nvar = \"GH\"\nvalue = \"x\"\n",
        );
        assert!(r.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn a_bad_secret_env_entry_makes_the_whole_config_invalid() {
        let r = crate::config::Config::parse(
            "[[sandbox.secret_env]]\ntool = \"exec\"\nsecret = \"gh\"\nvar = \"PATH\"\n",
            std::path::Path::new("chitin.toml"),
        );
        assert!(
            r.unwrap_err()
                .to_string()
                .contains("set by the sandbox itself")
        );
    }

    #[test]
    fn a_subid_user_that_is_not_a_user_name_is_refused() {
        for bad in ["", "root:0:1", "a b", "x\ny"] {
            let c = SandboxConfig {
                subid_user: bad.into(),
                ..SandboxConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert!(e.contains("sandbox.subid_user"), "{bad:?}: {e}");
        }
        let c: SandboxConfig =
            toml::from_str("subid_user = \"agents\"\nworkspace_quota_mb = 0\n").unwrap();
        c.validate().unwrap();
        assert!(c.limits().workspace.bytes == 0 && c.limits().workspace.inodes == 100_000);
    }

    #[test]
    fn an_unknown_sandbox_key_is_rejected() {
        let r: Result<SandboxConfig, _> = toml::from_str("allow_unsandboxed = true");
        assert!(r.unwrap_err().to_string().contains("unknown field"));
    }
}
