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

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
    let files = match stage(&loaded.dir, workspace, &loaded.entry.name) {
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

/// Copies the verified skill tree into `workspace/.skills/<name>` (replacing an older copy),
/// refusing symlinks anywhere on the way.
fn stage(src: &Path, workspace: &Path, name: &str) -> Result<Vec<String>, String> {
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
    let ws = std::fs::canonicalize(workspace).map_err(|e| e.to_string())?;
    let root = ws.join(STAGE_DIR);
    match std::fs::symlink_metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{STAGE_DIR} in the workspace is not a directory")),
        Err(_) => std::fs::create_dir(&root).map_err(|e| e.to_string())?,
    }
    let dest = root.join(name);
    if let Ok(m) = std::fs::symlink_metadata(&dest) {
        if m.is_dir() {
            make_writable(&dest);
            std::fs::remove_dir_all(&dest).map_err(|e| e.to_string())?;
        } else {
            std::fs::remove_file(&dest).map_err(|e| e.to_string())?;
        }
    }
    let mut files = Vec::new();
    copy_tree(src, &dest, Path::new(""), &mut files)?;
    files.sort();
    Ok(files)
}

fn copy_tree(src: &Path, dest: &Path, rel: &Path, files: &mut Vec<String>) -> Result<(), String> {
    std::fs::create_dir(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut entries: Vec<_> = std::fs::read_dir(src)
        .map_err(|e| e.to_string())?
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name();
        let meta = std::fs::symlink_metadata(e.path()).map_err(|e| e.to_string())?;
        let r = rel.join(&name);
        if meta.is_dir() {
            copy_tree(&e.path(), &dest.join(&name), &r, files)?;
        } else if meta.is_file() {
            let bytes = std::fs::read(e.path()).map_err(|e| e.to_string())?;
            let to = dest.join(&name);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(|e| format!("{}: {e}", to.display()))?;
            std::io::Write::write_all(&mut f, &bytes).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o444))
                .map_err(|e| e.to_string())?;
            files.push(r.to_string_lossy().into_owned());
        } else {
            return Err(format!("{} is neither a file nor a directory", r.display()));
        }
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| e.to_string())
}

/// Best effort: lets an older staged copy be removed (directories were made read-only).
fn make_writable(dir: &Path) {
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = std::fs::symlink_metadata(e.path())
                && m.is_dir()
            {
                make_writable(&e.path());
            }
        }
    }
}
