//! Skills in the agent loop: the `use_skill` tool.
//!
//! Invariants:
//! - Every use re-verifies the installed skill against its lockfile digest and asks Cedar
//!   `skill.load` (`SkillsHost::load`); a changed or untrusted skill is refused and audited.
//! - A skill's instructions reach the model only fenced as untrusted data, and using a skill
//!   taints the session.
//! - A skill gets no power of its own: its files are staged read-only in the workspace
//!   (`.skills/<name>/`), where running a script is an ordinary `exec` call through the gate
//!   and the sandbox.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

use super::context::fence;
use crate::gate::Gate;
use crate::providers::ToolSpec;
use crate::skills_host::{LockEntry, SkillsHost};

/// The tool name.
pub const USE_SKILL: &str = "use_skill";
/// Where skills are staged inside the workspace.
pub const STAGE_DIR: &str = ".skills";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UseSkillArgs {
    name: String,
}

/// The tool schema, naming the installed skills.
pub fn spec(installed: &[LockEntry]) -> ToolSpec {
    let names: Vec<&str> = installed.iter().map(|e| e.name.as_str()).collect();
    ToolSpec {
        name: USE_SKILL.into(),
        description: "Load an installed skill: returns its instructions (as untrusted data) and stages its files read-only in the workspace under .skills/<name>/, where scripts can be run with exec.".into(),
        input_schema: json!({"type": "object", "additionalProperties": false, "required": ["name"],
                             "properties": {"name": {"type": "string", "enum": names}}}),
    }
}

/// The catalog for the system prompt (names and versions only; descriptions are the
/// publisher's words and stay out of the trusted prompt).
pub fn catalog(installed: &[LockEntry]) -> String {
    let list: Vec<String> = installed
        .iter()
        .map(|e| format!("{} {}", e.name, e.version))
        .collect();
    format!(
        "Installed skills (load one with the use_skill tool before following it): {}.",
        list.join(", ")
    )
}

/// What a use of a skill produced.
pub enum Used {
    /// The content for the model (fenced).
    Loaded { content: String, outcome: String },
    /// Refused (re-verification or policy); the reason.
    Refused(String),
    /// The arguments were not `{"name": ...}`.
    Invalid(String),
}

/// Loads a skill for `user` and stages its files in `workspace`.
pub fn use_skill(
    host: &SkillsHost,
    gate: &Gate,
    user: &str,
    workspace: &Path,
    args: &Value,
) -> Used {
    let a: UseSkillArgs = match UseSkillArgs::deserialize(args) {
        Ok(a) => a,
        Err(e) => return Used::Invalid(format!("use_skill: {e}")),
    };
    let loaded = match host.load(gate, user, &a.name) {
        Ok(l) => l,
        Err(e) => return Used::Refused(e.to_string()),
    };
    let files = match loaded
        .files()
        .map_err(|e| e.to_string())
        .and_then(|f| stage(workspace, &loaded.entry.name, &f))
    {
        Ok(f) => f,
        Err(e) => return Used::Refused(format!("the skill could not be staged: {e}")),
    };
    let body = format!(
        "Skill {} {} (signed by {}), files staged read-only at {STAGE_DIR}/{}/: {}\n\n{}",
        loaded.entry.name,
        loaded.entry.version,
        loaded.entry.signer,
        loaded.entry.name,
        files.join(", "),
        loaded.instructions()
    );
    Used::Loaded {
        content: fence(&format!("skill:{}", loaded.entry.name), &gate.redact(&body)),
        outcome: format!("loaded {} {}", loaded.entry.name, loaded.entry.digest),
    }
}

/// Stages a skill's files (`(relative path, content)`, from the verified store copy) in
/// `workspace/.skills/<name>`, replacing an older copy; returns the staged paths. Everything
/// goes through [`crate::wsfs`]: `.skills` and every directory under it are opened without
/// following links (a swapped-in symlink is refused, or removed as a link, never followed),
/// the old copy is removed through directory descriptors, files are created `O_EXCL` and
/// made read-only with `fchmod` on their own descriptors.
pub fn stage(
    workspace: &Path,
    name: &str,
    files: &[(PathBuf, Vec<u8>)],
) -> Result<Vec<String>, String> {
    use crate::wsfs::{WsDir, WsFsError};
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        return Err(format!(
            "skill name `{}` cannot be a directory name",
            name.escape_default()
        ));
    }
    let e = |e: WsFsError| e.to_string();
    let root = WsDir::root(workspace).map_err(e)?;
    let stage_dir = root.ensure_dir(OsStr::new(STAGE_DIR), 0o755).map_err(e)?;
    match stage_dir.remove_tree(OsStr::new(name)) {
        Ok(()) | Err(WsFsError::NotFound { .. }) => {}
        Err(err) => return Err(err.to_string()),
    }
    let dest = stage_dir.ensure_dir(OsStr::new(name), 0o755).map_err(e)?;
    // Directories made along the way, by relative path; made read-only once all is written.
    let mut dirs: BTreeMap<PathBuf, WsDir> = BTreeMap::new();
    let mut staged = Vec::new();
    for (rel, bytes) in files {
        let mut parts: Vec<&OsStr> = Vec::new();
        for c in rel.components() {
            match c {
                Component::Normal(p) => parts.push(p),
                _ => return Err(format!("{} is not a plain relative path", rel.display())),
            }
        }
        let Some((file, parents)) = parts.split_last() else {
            return Err("an empty file name".into());
        };
        let mut at = PathBuf::new();
        for p in parents {
            let next = at.join(p);
            if !dirs.contains_key(&next) {
                let parent = dirs.get(&at).unwrap_or(&dest);
                let d = parent.ensure_dir(p, 0o755).map_err(e)?;
                dirs.insert(next.clone(), d);
            }
            at = next;
        }
        dirs.get(&at)
            .unwrap_or(&dest)
            .create_file(file, bytes, 0o444)
            .map_err(e)?;
        staged.push(rel.to_string_lossy().into_owned());
    }
    for d in dirs.values().chain(std::iter::once(&dest)) {
        d.chmod(0o555).map_err(e)?;
    }
    staged.sort();
    Ok(staged)
}
