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
"#;

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
        }
    }
}

impl SandboxConfig {
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
    fn an_unknown_sandbox_key_is_rejected() {
        let r: Result<SandboxConfig, _> = toml::from_str("allow_unsandboxed = true");
        assert!(r.unwrap_err().to_string().contains("unknown field"));
    }
}
