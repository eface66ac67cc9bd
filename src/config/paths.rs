//! Paths that define behaviour or trust never overlap a path the agent's tools can write.
//!
//! Trust paths: the state directory (with the audit log, its public key and checkpoints, the
//! secret store, the skills store and trust list), the config file, `[policy] dir` and
//! `entities`, `[gateway] tls_cert` and `tls_key`, `[backup] dir` and `identity`, `[skills]
//! trusted_root`. Writable areas: the workspace and the temp directories (`/tmp`, `/var/tmp`,
//! `/dev/shm`, writable by every local process). "Overlap" means either contains the other,
//! compared on resolved paths: symlinks of the existing part of a path are followed (a
//! dangling symlink by its target), so a symlink into the workspace counts as the workspace.
//! The gateway refuses to start, and refuses a reload, while any pair overlaps.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

/// The temp directories every local process can write.
pub const SHARED_WRITABLE: &[&str] = &["/tmp", "/var/tmp", "/dev/shm"];

/// `configured` as the gateway uses it: absolute as is, else relative to `home`.
fn in_home(home: &Path, configured: &str) -> PathBuf {
    let p = Path::new(configured);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        home.join(p)
    }
}

/// The paths that define behaviour or trust, each with the name used in messages.
pub fn trust_paths(config: &Config, home: &Path, config_path: &Path) -> Vec<(String, PathBuf)> {
    let mut out = vec![
        ("the state directory".to_string(), home.to_path_buf()),
        ("the config file".to_string(), config_path.to_path_buf()),
        (
            "[policy] dir".to_string(),
            in_home(home, &config.policy.dir),
        ),
        (
            "[policy] entities".to_string(),
            in_home(home, &config.policy.entities),
        ),
        ("the skills store".to_string(), home.join("skills")),
        (
            "the skills trust list".to_string(),
            home.join("skills").join("trust.json"),
        ),
        (
            "the audit public key".to_string(),
            home.join(chitin_audit::PUB_FILE),
        ),
        (
            "the audit log".to_string(),
            home.join(chitin_audit::DB_FILE),
        ),
        (
            "the audit checkpoints".to_string(),
            home.join(chitin_audit::CHECKPOINT_FILE),
        ),
    ];
    // Each entry of the policy directory too: a file or subdirectory there that is a symlink
    // into the workspace is as writable as the workspace.
    let policy_dir = in_home(home, &config.policy.dir);
    let mut entries = Vec::new();
    walk(&policy_dir, 8, &mut entries);
    out.extend(
        entries
            .into_iter()
            .map(|p| ("a file of [policy] dir".to_string(), p)),
    );
    let mut optional = |what: &str, value: &str, base: Option<&Path>| {
        if !value.is_empty() {
            let p = match base {
                Some(h) => in_home(h, value),
                None => PathBuf::from(value),
            };
            out.push((what.to_string(), p));
        }
    };
    optional("[gateway] tls_cert", &config.gateway.tls_cert, Some(home));
    optional("[gateway] tls_key", &config.gateway.tls_key, Some(home));
    optional("[backup] dir", &config.backup.dir, None);
    optional("[backup] identity", &config.backup.identity, None);
    optional("[skills] trusted_root", &config.skills.trusted_root, None);
    out
}

/// Most entries of the policy directory looked at (a larger directory is not walked further).
const MAX_ENTRIES: usize = 10_000;

/// Every entry below `dir` (not following symlinked directories), at most `depth` levels.
fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if out.len() >= MAX_ENTRIES {
            return;
        }
        let p = e.path();
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        out.push(p.clone());
        if is_dir && depth > 0 {
            walk(&p, depth - 1, out);
        }
    }
}

/// The areas the agent's tools (or any local process) can write, with their names.
pub fn writable_areas(config: &Config, home: &Path) -> Vec<(String, PathBuf)> {
    let mut out = vec![("the workspace".to_string(), config.workspace_dir(home))];
    out.extend(
        SHARED_WRITABLE
            .iter()
            .map(|d| ("the shared temp directory".to_string(), PathBuf::from(d))),
    );
    out
}

/// `p` made absolute with every symlink of its existing part resolved; the part that does not
/// exist yet is appended as written. A dangling symlink is followed to its target.
pub fn resolved(p: &Path) -> PathBuf {
    resolve_depth(p, 0)
}

fn resolve_depth(p: &Path, depth: u32) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.clone();
    let mut rest: Vec<std::ffi::OsString> = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(&existing) {
            return rest.iter().rev().fold(c, |acc, r| acc.join(r));
        }
        if depth < 40
            && let Ok(target) = std::fs::read_link(&existing)
        {
            let parent = existing.parent().unwrap_or_else(|| Path::new("/"));
            let followed = rest
                .iter()
                .rev()
                .fold(parent.join(target), |acc, r| acc.join(r));
            return resolve_depth(&followed, depth + 1);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Refuses a configuration in which a trust path and a writable area overlap (either contains
/// the other, on resolved paths). The error names both.
pub fn check_separation(
    config: &Config,
    home: &Path,
    config_path: &Path,
) -> Result<(), ConfigError> {
    check_separation_also(config, home, config_path, None)
}

/// [`check_separation`], with one more workspace to keep apart: on a reload, the workspace the
/// running gateway's tools use (a changed workspace only takes effect at restart, so the new
/// trust paths must stay out of both).
pub fn check_separation_also(
    config: &Config,
    home: &Path,
    config_path: &Path,
    running_workspace: Option<&Path>,
) -> Result<(), ConfigError> {
    let mut all = writable_areas(config, home);
    if let Some(w) = running_workspace {
        all.push((
            "the running gateway's workspace".to_string(),
            w.to_path_buf(),
        ));
    }
    let areas: Vec<(String, PathBuf)> = all
        .into_iter()
        .map(|(n, p)| {
            let r = resolved(&p);
            (n, r)
        })
        .collect();
    for (what, path) in trust_paths(config, home, config_path) {
        let r = resolved(&path);
        for (area_name, area) in &areas {
            if r.starts_with(area) || area.starts_with(&r) {
                return Err(ConfigError::Overlap {
                    what,
                    path,
                    resolved: r,
                    area_name: area_name.clone(),
                    area: area.clone(),
                });
            }
        }
    }
    Ok(())
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
    fn a_reload_keeps_trust_paths_out_of_the_running_workspace_too() {
        // Paths that do not exist resolve as written (and are outside every temp dir).
        let base = Path::new("/nonexistent-chitin-reload-test");
        let home = base.join("home");
        let running = base.join("ws-running");
        let next = base.join("ws-next");
        // The new config moves the workspace (effective at restart) and puts the policy dir
        // into the workspace the running gateway's tools still write.
        let text = format!(
            "[agent]\nworkspace = {:?}\n[policy]\ndir = {:?}\n",
            next,
            running.join("policies")
        );
        let c = crate::config::Config::parse(&text, Path::new("chitin.toml")).unwrap();
        check_separation(&c, &home, &home.join("chitin.toml")).unwrap();
        let e = check_separation_also(&c, &home, &home.join("chitin.toml"), Some(&running))
            .unwrap_err();
        assert!(
            e.to_string().contains("the running gateway's workspace"),
            "{e}"
        );
    }

    #[test]
    fn a_symlink_into_the_workspace_resolves_to_the_workspace_even_when_dangling() {
        let t = tempfile::tempdir().unwrap();
        let ws = t.path().join("ws");
        std::fs::create_dir(&ws).unwrap();
        let link = t.path().join("policies");
        std::os::unix::fs::symlink(ws.join("not-yet"), &link).unwrap();
        let ws = std::fs::canonicalize(&ws).unwrap();
        assert_eq!(resolved(&link), ws.join("not-yet"));
        assert_eq!(resolved(&link.join("a.cedar")), ws.join("not-yet/a.cedar"));
    }

    #[test]
    fn a_policy_file_symlinked_into_the_workspace_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        let ws = t.path().join("ws");
        std::fs::create_dir_all(home.join("policies")).unwrap();
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::write(
            ws.join("open.cedar"),
            "permit(principal, action, resource);",
        )
        .unwrap();
        std::os::unix::fs::symlink(ws.join("open.cedar"), home.join("policies/open.cedar"))
            .unwrap();
        let text = format!("[gateway]\nworkspace = {:?}\n", ws.display().to_string());
        let c = Config::parse(&text, Path::new("c")).unwrap();
        // The home itself is under /tmp here: compare only against the workspace.
        let areas = writable_areas(&c, &home);
        assert_eq!(areas[0].0, "the workspace");
        let ws_real = resolved(&areas[0].1);
        let bad: Vec<String> = trust_paths(&c, &home, &home.join("chitin.toml"))
            .into_iter()
            .filter(|(_, p)| resolved(p).starts_with(&ws_real))
            .map(|(w, _)| w)
            .collect();
        assert_eq!(bad, vec!["a file of [policy] dir".to_string()]);
    }

    #[test]
    fn a_policy_dir_inside_the_workspace_is_refused_naming_both_paths() {
        // Paths that do not exist resolve as written.
        let base = Path::new("/nonexistent-chitin-paths-test");
        let home = base.join("home");
        let ws = base.join("ws");
        let text = format!(
            "[gateway]\nworkspace = {:?}\n[policy]\ndir = {:?}\n",
            ws.display().to_string(),
            ws.join("policies").display().to_string()
        );
        let c = Config::parse(&text, Path::new("c")).unwrap();
        let e = check_separation(&c, &home, &home.join("chitin.toml")).unwrap_err();
        let m = e.to_string();
        assert!(m.starts_with("[policy] dir "), "{m}");
        assert!(m.contains("overlaps the workspace"), "{m}");
        let ok = Config::parse(
            &format!("[gateway]\nworkspace = {:?}\n", ws.display().to_string()),
            Path::new("c"),
        )
        .unwrap();
        check_separation(&ok, &home, &home.join("chitin.toml")).unwrap();
    }
}
