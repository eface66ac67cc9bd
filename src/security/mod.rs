//! `chitin security audit` and `chitin doctor`: every check an operator (or a security team
//! approving a deployment) runs against an installation, with stable finding ids.
//!
//! Invariants:
//! - A finding never carries a secret value: only names, paths, modes, counts and times.
//! - Checks only look (read-only SQLite connections, `stat`, the policy engine); the one thing
//!   the audit writes is the time of a successful deep check (`marks`).
//! - A repair (`doctor --fix`) only ever clears permission bits or creates a missing
//!   directory 0700: it never widens anything, never deletes, never chowns.

mod checks;
pub mod marks;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Config;
use crate::policy::EngineSpec;

/// How bad a finding is. Exit codes: nothing above `low` → 0, `medium`/`high` → 1,
/// `critical` → 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Critical => "critical",
        }
    }

    pub const ALL: [Severity; 5] = [
        Self::Critical,
        Self::High,
        Self::Medium,
        Self::Low,
        Self::Info,
    ];
}

/// The check categories, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Exposure,
    Files,
    Secrets,
    Sandbox,
    Policy,
    Skills,
    Channels,
    Approvals,
    Audit,
    Lifecycle,
    Providers,
    Updates,
}

impl Category {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exposure => "exposure",
            Self::Files => "files",
            Self::Secrets => "secrets",
            Self::Sandbox => "sandbox",
            Self::Policy => "policy",
            Self::Skills => "skills",
            Self::Channels => "channels",
            Self::Approvals => "approvals",
            Self::Audit => "audit",
            Self::Lifecycle => "lifecycle",
            Self::Providers => "providers",
            Self::Updates => "updates",
        }
    }
}

/// What `doctor --fix` may do about a finding. Both kinds only narrow access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Clear these permission bits of `path` (`chmod go-rwx` style); never sets a bit.
    ClearMode { path: PathBuf, clear: u32 },
    /// Create the missing directory `path` with mode 0700.
    CreateDir { path: PathBuf },
}

impl Repair {
    /// The shell command that does the same, for the `fix` text.
    pub fn command(&self) -> String {
        match self {
            Self::ClearMode { path, clear } => {
                format!("chmod {} {}", symbolic_clear(*clear), shell_path(path))
            }
            Self::CreateDir { path } => format!("mkdir -m 700 -p {}", shell_path(path)),
        }
    }

    /// Applies the repair. Returns what was done.
    pub fn apply(&self) -> Result<String, String> {
        match self {
            Self::ClearMode { path, clear } => {
                // symlink_metadata: a symlink is never followed to change its target's mode.
                let meta = std::fs::symlink_metadata(path)
                    .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
                if meta.file_type().is_symlink() {
                    return Err(format!(
                        "{} is a symbolic link; not changed (fix the file it points to by hand)",
                        path.display()
                    ));
                }
                let old = meta.permissions().mode() & 0o7777;
                let new = old & !clear;
                if new == old {
                    return Ok(format!("{} already {new:04o}", path.display()));
                }
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(new))
                    .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
                Ok(format!("{}: mode {old:04o} -> {new:04o}", path.display()))
            }
            Self::CreateDir { path } => {
                use std::os::unix::fs::DirBuilderExt;
                if path.exists() {
                    return Ok(format!("{} exists", path.display()));
                }
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
                Ok(format!("created {} (mode 0700)", path.display()))
            }
        }
    }
}

fn symbolic_clear(clear: u32) -> String {
    let mut out = Vec::new();
    for (who, shift) in [("g", 3), ("o", 0)] {
        let bits = (clear >> shift) & 0o7;
        if bits == 0 {
            continue;
        }
        let mut s = String::from(who);
        s.push('-');
        if bits & 4 != 0 {
            s.push('r');
        }
        if bits & 2 != 0 {
            s.push('w');
        }
        if bits & 1 != 0 {
            s.push('x');
        }
        out.push(s);
    }
    if clear & 0o7000 != 0 {
        out.push("ug-s".into());
    }
    out.join(",")
}

/// A path quoted for a shell when it needs it.
pub fn shell_path(p: &Path) -> String {
    let s = p.display().to_string();
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+:@".contains(&b))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Stable id, `<category>.<what>` (documented in docs/operations.md).
    pub id: String,
    pub severity: Severity,
    pub category: Category,
    /// One line: what is wrong.
    pub title: String,
    /// What was observed (paths, modes, counts, times; never a secret value).
    pub observed: String,
    /// The exact fix.
    pub fix: String,
    /// Whether `chitin doctor --fix` repairs it.
    pub repairable: bool,
    #[serde(skip)]
    pub repair: Option<Repair>,
}

impl Finding {
    pub fn new(
        category: Category,
        id: &str,
        severity: Severity,
        title: impl Into<String>,
        observed: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            id: id.to_string(),
            severity,
            category,
            title: title.into(),
            observed: observed.into(),
            fix: fix.into(),
            repairable: false,
            repair: None,
        }
    }

    /// Attaches a repair (its command becomes the fix when `fix` is empty).
    #[must_use]
    pub fn with_repair(mut self, repair: Repair) -> Self {
        if self.fix.is_empty() {
            self.fix = repair.command();
        }
        self.repairable = true;
        self.repair = Some(repair);
        self
    }
}

/// What one category looked at (printed when there is nothing to report, and in `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Checked {
    pub category: Category,
    pub checks: Vec<String>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub checked: Vec<Checked>,
}

impl Report {
    /// The highest severity found.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// 0 (nothing above low), 1 (medium or high), 2 (critical).
    pub fn exit_code(&self) -> u8 {
        match self.worst() {
            Some(Severity::Critical) => 2,
            Some(Severity::High | Severity::Medium) => 1,
            _ => 0,
        }
    }

    /// Counts by severity, worst first.
    pub fn counts(&self) -> Vec<(Severity, usize)> {
        Severity::ALL
            .iter()
            .map(|s| {
                (
                    *s,
                    self.findings.iter().filter(|f| f.severity == *s).count(),
                )
            })
            .collect()
    }

    /// The JSON document of `--json`.
    pub fn to_json(&self) -> serde_json::Value {
        let summary: serde_json::Map<String, serde_json::Value> = self
            .counts()
            .into_iter()
            .map(|(s, n)| (s.as_str().to_string(), serde_json::Value::from(n)))
            .collect();
        serde_json::json!({
            "findings": self.findings,
            "summary": summary,
            "exit_code": self.exit_code(),
            "checked": self.checked,
        })
    }

    /// The human-readable text.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(out, "[{}] {}: {}", f.severity.as_str(), f.id, f.title);
            let _ = writeln!(out, "    observed: {}", f.observed);
            let _ = writeln!(out, "    fix: {}", f.fix);
        }
        let total: usize = self.checked.iter().map(|c| c.checks.len()).sum();
        if self.findings.is_empty() {
            let _ = writeln!(
                out,
                "ok: no findings in {total} checks over {} categories:",
                self.checked.len()
            );
            for c in &self.checked {
                let _ = writeln!(out, "  {:<10} {}", c.category.as_str(), c.checks.join("; "));
            }
        } else {
            let counts: Vec<String> = self
                .counts()
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .map(|(s, n)| format!("{n} {}", s.as_str()))
                .collect();
            let _ = writeln!(
                out,
                "{} finding(s): {} ({total} checks over {} categories)",
                self.findings.len(),
                counts.join(", "),
                self.checked.len()
            );
        }
        out
    }
}

/// Everything the checks need, assembled by the command line.
pub struct Context {
    /// The state directory.
    pub home: PathBuf,
    /// The configuration file (it may not exist: defaults).
    pub config_path: PathBuf,
    /// The configuration, or why it could not be loaded.
    pub config: Result<Config, String>,
    /// The policy engine spec in force, or why it could not be worked out (`None` when the
    /// configuration could not be loaded).
    pub policy: Option<Result<EngineSpec, String>>,
    /// Now (unix ms).
    pub now_ms: i64,
    /// Verify the whole audit chain (doctor and `--deep`).
    pub verify_chain: bool,
    /// Test-decrypt the newest backup (`--deep`).
    pub test_backup: bool,
    /// The backup identity for the test-decrypt (default: `[backup] identity`).
    pub backup_identity: Option<PathBuf>,
    /// The running binary (for its age).
    pub executable: Option<PathBuf>,
    /// Open the secret store to inspect names, audiences and times (never values).
    pub open_secrets: bool,
}

/// Runs every check.
pub fn run(ctx: &Context) -> Report {
    let mut r = checks::Run::new(ctx);
    r.all();
    let mut report = r.finish();
    report.findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.category.cmp(&b.category))
    });
    report
}

/// Applies every repair of `report`. Returns (what was done, what failed).
pub fn repair(report: &Report) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    // Directories are created before modes are narrowed; parents' modes after children's.
    let mut repairs: Vec<&Repair> = report
        .findings
        .iter()
        .filter_map(|f| f.repair.as_ref())
        .collect();
    repairs.sort_by_key(|r| match r {
        Repair::CreateDir { .. } => (0, 0),
        Repair::ClearMode { path, .. } => (1, usize::MAX - path.components().count()),
    });
    repairs.dedup();
    for r in repairs {
        match r.apply() {
            Ok(s) => done.push(s),
            Err(e) => failed.push(e),
        }
    }
    (done, failed)
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
    fn a_repair_only_clears_bits_and_names_the_chmod() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        let r = Repair::ClearMode {
            path: f.clone(),
            clear: 0o077,
        };
        assert_eq!(r.command(), format!("chmod g-rwx,o-rwx {}", f.display()));
        r.apply().unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A file that is already narrower stays as it is: nothing is ever widened.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
        r.apply().unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o400);
    }

    #[test]
    fn exit_codes_follow_the_worst_severity() {
        let mut r = Report {
            findings: Vec::new(),
            checked: Vec::new(),
        };
        assert_eq!(r.exit_code(), 0);
        for (s, code) in [
            (Severity::Info, 0),
            (Severity::Low, 0),
            (Severity::Medium, 1),
            (Severity::High, 1),
            (Severity::Critical, 2),
        ] {
            r.findings = vec![Finding::new(Category::Files, "x.y", s, "t", "o", "f")];
            assert_eq!(r.exit_code(), code, "{s:?}");
        }
    }

    #[test]
    fn paths_with_spaces_are_quoted_for_the_shell() {
        assert_eq!(shell_path(Path::new("/a/b.c")), "/a/b.c");
        assert_eq!(shell_path(Path::new("/a b/it's")), "'/a b/it'\\''s'");
    }
}
