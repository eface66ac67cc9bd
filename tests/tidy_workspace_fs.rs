//! Tidy rule: the gateway process touches workspace files only through `src/wsfs.rs`
//! (directory descriptors, `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, checks on the open
//! descriptor) or inside the sandbox helper (`src/tools/helper.rs`).
//!
//! What is checked, over every `src/**/*.rs` outside `#[cfg(test)]` modules (comments
//! ignored):
//! 1. A filesystem operation by path ([`PATH_OPS`]: `std::fs` and `tokio::fs` calls,
//!    `OpenOptions`, `DirBuilder`, the `Path` methods that touch the disk, ...) may appear only
//!    where [`ALLOWED`] says, each entry with the reason that code never sees a workspace
//!    path. Entries are whole files or single functions.
//! 2. The modules that handle workspace paths ([`WORKSPACE_FACING`]: the agent, the tools, the
//!    gate, the HTTP gateway) may get function entries only, never a whole-file one, and may
//!    not import `std::fs`/`tokio::fs` items or call `rustix` directly (only through
//!    `crate::wsfs`).
//! 3. Every entry of [`ALLOWED`] is still needed (a stale entry fails), so the list stays the
//!    exact set of exceptions.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};

/// Filesystem operations that take a path.
const PATH_OPS: &[&str] = &[
    "fs::read(",
    "fs::read_to_string(",
    "fs::write(",
    "File::open(",
    "File::create(",
    "File::create_new(",
    "OpenOptions",
    "DirBuilder",
    "fs::create_dir",
    "fs::remove_",
    "fs::set_permissions(",
    "fs::metadata(",
    "fs::symlink_metadata(",
    "fs::canonicalize(",
    "fs::read_dir(",
    "fs::rename(",
    "fs::copy(",
    "fs::hard_link(",
    "fs::read_link(",
    "fs::soft_link(",
    "fs::exists(",
    "fs::symlink(",
    "fs::chown(",
    "fs::lchown(",
    "fs::chroot(",
    "fs::open_dir(",
    "tokio::fs::",
    ".canonicalize()",
    ".exists()",
    ".try_exists()",
    ".read_dir()",
    ".read_link()",
    ".symlink_metadata()",
    ".is_file()",
    ".is_dir()",
    ".is_symlink()",
];

/// Extra patterns for the modules that handle workspace paths: no importing path functions
/// under another name, no direct `rustix` (only through `crate::wsfs`).
const WORKSPACE_EXTRA: &[&str] = &["use std::fs", "use tokio::fs", "rustix::"];

/// Modules that handle workspace paths (prefixes of `src/`-relative paths).
const WORKSPACE_FACING: &[&str] = &[
    "src/agent/",
    "src/tools/",
    "src/gate.rs",
    "src/gateway/",
    "src/approvals.rs",
    "src/workflow_runner/",
];

/// `(file, Some(function) | None for the whole file, reason)`.
const ALLOWED: &[(&str, Option<&str>, &str)] = &[
    (
        "src/tools/browser/mod.rs",
        Some("system_paths"),
        "looks whether the configured Chromium binary and the system font and Chromium settings directories (/etc/fonts, /etc/chromium.d) exist; operator-configured system paths, never a workspace path",
    ),
    (
        "src/wsfs.rs",
        None,
        "the one gateway module that touches workspace files; by name only the operator's workspace root (and /proc/self/fd to read back a descriptor's path)",
    ),
    (
        "src/tools/helper.rs",
        None,
        "`chitin __fs-helper` runs inside the sandbox, not in the gateway; it reopens only its own descriptors through /proc/self/fd",
    ),
    (
        "src/tools/mod.rs",
        Some("small_binary"),
        "whether the small launcher or file-helper binary is installed next to the `chitin` binary (a host path fixed at start, never a workspace path)",
    ),
    (
        "src/gate.rs",
        Some("canonical_existing"),
        "canonicalizes the configured workspace root and host paths outside the workspace (system programs found on the tool PATH, or a program path that `wsfs::locate` found to lead outside); paths inside the workspace go through `wsfs::locate`",
    ),
    (
        "src/gate.rs",
        Some("resolve_program"),
        "looks a bare program name up in the system directories of the tool PATH (`/usr/bin`, ...), never in the workspace; a program path with `/` goes through `wsfs::locate`",
    ),
    (
        "src/workflow_runner/mod.rs",
        Some("process_start"),
        "reads /proc/<pid>/stat (a kernel file, never a workspace path) to tell whether the process that ran a workflow is still alive",
    ),
    (
        "src/gateway/mod.rs",
        Some("fingerprint"),
        "watches the config file, policy dir and entity files (item 7 refuses any overlap with the workspace)",
    ),
    (
        "src/gateway/mod.rs",
        Some("checks"),
        "/ready looks at the state dir's secrets file",
    ),
    (
        "src/skills_host.rs",
        None,
        "the skills store and trust list under the state dir; staging into the workspace is in agent/skills.rs through wsfs",
    ),
    (
        "src/state.rs",
        None,
        "the state dir (CHITIN_HOME), never inside the workspace",
    ),
    ("src/vault.rs", None, "the vault files in the state dir"),
    ("src/config/mod.rs", None, "reads the config file"),
    (
        "src/policy/mod.rs",
        None,
        "reads the policy dir and entity files",
    ),
    (
        "src/policy/vectors.rs",
        None,
        "reads policy test vector files",
    ),
    (
        "src/secrets/audit_key.rs",
        None,
        "the audit key files in the state dir",
    ),
    (
        "src/secrets/doctor.rs",
        None,
        "inspects the state dir's secret files",
    ),
    (
        "src/secrets/fsutil.rs",
        None,
        "private files in the state dir",
    ),
    (
        "src/secrets/identity.rs",
        None,
        "the identity file in the state dir",
    ),
    (
        "src/secrets/store.rs",
        None,
        "the secrets store lock in the state dir",
    ),
    ("src/cli/audit.rs", None, "operator CLI: audit export files"),
    (
        "src/cli/mod.rs",
        Some("audit_not_moved"),
        "looks whether the state directory's audit.db exists before a PostgreSQL audit log is opened; a state-dir path, never a workspace path",
    ),
    (
        "src/cli/mod.rs",
        Some("create"),
        "creates a private 0700 scratch directory in the state directory (the throwaway audit log of a database-credential decision); never a workspace path",
    ),
    (
        "src/cli/mod.rs",
        Some("drop"),
        "removes that private scratch directory of the state directory; never a workspace path",
    ),
    (
        "src/cli/mod.rs",
        Some("sandbox_for"),
        "operator CLI: whether the config file exists (passed to the sandbox launcher)",
    ),
    (
        "src/cli/workflow.rs",
        None,
        "operator CLI: reads the workflow file the operator names (size-capped); the gateway will load workflows from the workspace through wsfs",
    ),
    (
        "src/cli/service.rs",
        None,
        "operator CLI: the systemd unit file it writes, reads and removes in the unit directory (and the state dir and workspace root it names in the unit); never a file inside the workspace",
    ),
    (
        "src/security/checks.rs",
        None,
        "security audit and doctor: metadata of the state dir, the config and policy paths and the configured workspace root (whether it exists, modes, owners); never opens a file inside the workspace",
    ),
    (
        "src/security/mod.rs",
        Some("apply"),
        "doctor --fix: clears permission bits or creates 0700 directories of the state dir and policy paths, never following a symlink; never a workspace file",
    ),
    (
        "src/security/marks.rs",
        None,
        "whether state.db exists in the state dir before recording or reading a success mark",
    ),
    (
        "src/lifecycle/offsite.rs",
        Some("upload"),
        "reads the backup file the schedule just wrote in the backup dir or the staging dir under the state dir",
    ),
    (
        "src/lifecycle/s3.rs",
        Some("put_multipart"),
        "reads the backup file being uploaded (the backup dir or the staging dir under the state dir), one part at its offset",
    ),
    (
        "src/lifecycle/schedule.rs",
        Some("tick_with"),
        "removes the staged off-site backup under the state dir once it is uploaded",
    ),
    (
        "src/cli/gateway.rs",
        None,
        "operator CLI at start: creates the configured workspace root itself (before any sandboxed run) and checks the state dir",
    ),
    (
        "src/cli/init.rs",
        None,
        "operator CLI: writes the initial config and policy dir",
    ),
    (
        "src/cli/backup.rs",
        None,
        "operator CLI: the backup file and the trusted key file the operator names",
    ),
    (
        "src/config/paths.rs",
        None,
        "resolves the configured trust paths and the configured workspace root (names only, never a file inside the workspace) to check they do not overlap",
    ),
    (
        "src/cli/policy.rs",
        None,
        "operator CLI: policy dir and vectors",
    ),
    (
        "src/cli/secrets.rs",
        None,
        "operator CLI: secrets benchmark files",
    ),
    ("src/lifecycle/backup.rs", None, "backups of the state dir"),
    (
        "src/cli/store.rs",
        Some("run"),
        "`chitin store copy`: whether state.db exists in the state dir",
    ),
    (
        "src/cli/onboard.rs",
        None,
        "operator CLI: reads and rewrites the config file",
    ),
    (
        "src/lifecycle/export.rs",
        None,
        "the operator's export archive",
    ),
    (
        "src/lifecycle/mod.rs",
        None,
        "the lifecycle lock in the state dir",
    ),
];

/// A line-level finding: file, enclosing function, line number, pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hit {
    file: String,
    function: Option<String>,
    line: usize,
    pattern: &'static str,
    text: String,
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The lines of `src` outside `#[cfg(test)] mod ... { }` blocks, numbered from 1.
fn non_test_lines(src: &str) -> Vec<(usize, &str)> {
    let lines: Vec<&str> = src.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let next_is_mod = lines.get(i + 1).is_some_and(|l| {
            let t = l.trim_start();
            let t = t
                .strip_prefix("pub(crate) ")
                .or_else(|| t.strip_prefix("pub "))
                .unwrap_or(t);
            t.starts_with("mod ") && t.trim_end().ends_with('{')
        });
        if lines[i].trim() == "#[cfg(test)]" && next_is_mod {
            let mut depth: i64 = 0;
            let mut j = i + 1;
            while j < lines.len() {
                depth += lines[j].matches('{').count() as i64;
                depth -= lines[j].matches('}').count() as i64;
                j += 1;
                if depth <= 0 {
                    break;
                }
            }
            i = j;
            continue;
        }
        out.push((i + 1, lines[i]));
        i += 1;
    }
    out
}

/// The name after the last `fn ` on a line, if any.
fn fn_name(line: &str) -> Option<String> {
    let code = line.split("//").next().unwrap_or("");
    let at = code.find("fn ")?;
    if at > 0 {
        let before = code.as_bytes()[at - 1];
        if before.is_ascii_alphanumeric() || before == b'_' {
            return None;
        }
    }
    let name: String = code[at + 3..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}

fn is_workspace_facing(rel: &str) -> bool {
    WORKSPACE_FACING.iter().any(|p| rel.starts_with(p))
}

fn scan(root: &Path) -> Vec<Hit> {
    let mut files = Vec::new();
    rs_files(&root.join("src"), &mut files);
    files.sort();
    let mut hits = Vec::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&f).unwrap();
        let mut function: Option<String> = None;
        for (n, line) in non_test_lines(&src) {
            if let Some(name) = fn_name(line) {
                function = Some(name);
            }
            let code = line.split("//").next().unwrap_or("");
            let extra: &[&'static str] =
                if is_workspace_facing(&rel) && rel != "src/tools/helper.rs" {
                    WORKSPACE_EXTRA
                } else {
                    &[]
                };
            for p in PATH_OPS.iter().chain(extra) {
                if code.contains(p) {
                    hits.push(Hit {
                        file: rel.clone(),
                        function: function.clone(),
                        line: n,
                        pattern: p,
                        text: line.trim().to_string(),
                    });
                }
            }
        }
    }
    hits
}

fn allowed(h: &Hit) -> bool {
    ALLOWED.iter().any(|(file, func, _)| {
        *file == h.file
            && match func {
                None => true,
                Some(f) => h.function.as_deref() == Some(*f),
            }
    })
}

/// The tree to check: this repository, or `CHITIN_TIDY_ROOT` (to run the rule against
/// another checkout, e.g. the code before the rule existed).
fn root() -> PathBuf {
    std::env::var_os("CHITIN_TIDY_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn the_gateway_touches_workspace_files_only_through_wsfs() {
    let bad: Vec<String> = scan(&root())
        .into_iter()
        .filter(|h| !allowed(h))
        .map(|h| {
            format!(
                "{}:{} (fn {}): `{}` in `{}`",
                h.file,
                h.line,
                h.function.as_deref().unwrap_or("-"),
                h.pattern,
                h.text
            )
        })
        .collect();
    assert!(
        bad.is_empty(),
        "filesystem operations by path outside src/wsfs.rs: open workspace files through \
         crate::wsfs (directory descriptors), or, for a module that never sees a workspace \
         path, add it to ALLOWED in tests/tidy_workspace_fs.rs with the reason:\n{}",
        bad.join("\n")
    );
}

#[test]
fn modules_that_handle_workspace_paths_get_no_whole_file_exception() {
    let whole: Vec<&str> = ALLOWED
        .iter()
        .filter(|(f, func, _)| {
            func.is_none() && is_workspace_facing(f) && *f != "src/tools/helper.rs"
        })
        .map(|(f, _, _)| *f)
        .collect();
    assert!(whole.is_empty(), "{whole:?}");
    assert!(ALLOWED.iter().all(|(_, _, why)| why.len() > 10));
}

#[test]
fn every_exception_is_still_needed() {
    let hits = scan(&root());
    let stale: Vec<String> = ALLOWED
        .iter()
        .filter(|(file, func, _)| {
            !hits.iter().any(|h| {
                h.file == *file
                    && match func {
                        None => true,
                        Some(f) => h.function.as_deref() == Some(*f),
                    }
            })
        })
        .map(|(f, func, _)| format!("{f} {func:?}"))
        .collect();
    assert!(
        stale.is_empty(),
        "remove these entries from ALLOWED: {stale:?}"
    );
}

#[test]
fn the_scanner_sees_test_modules_as_tests_and_finds_functions() {
    let src = "fn a() {\n    std::fs::read(\"x\");\n}\n#[cfg(test)]\nmod tests {\n    fn t() { std::fs::write(\"y\", \"\"); }\n}\nfn b() {}\n";
    let lines = non_test_lines(src);
    assert_eq!(
        lines.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        vec![1, 2, 3, 8]
    );
    assert_eq!(
        fn_name("pub fn canonical_existing(p: &str)"),
        Some("canonical_existing".into())
    );
    assert_eq!(fn_name("let f = dfn x;"), None);
}
