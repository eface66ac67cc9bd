//! Prompt files changed by tainted tool runs.
//!
//! The workspace files in [`BOOTSTRAP_FILES`] become the trusted system prompt of every later
//! session. A session that has taken in untrusted content (`CallContext::tainted`) needs an
//! approval to write them with `write_file`/`edit_file`, but a command it runs (`exec`, allowed
//! offline) can rewrite them too, and landlock cannot forbid one file name in a directory. So
//! the tool path ([`super::invoke::invoke`]) watches them instead:
//! - Around every sandboxed run of a tainted call it takes a [`Snapshot`] of the prompt files
//!   (through [`crate::wsfs`]: opened beneath the workspace descriptor, no link followed,
//!   `fstat`-checked, at most [`MAX_BYTES`] read) before the launch and again after the
//!   launcher has exited (the sandbox's PID namespace leaves nothing of the run running).
//! - A file whose content, as the system prompt would show it ([`digest`]: the text read and
//!   the size), differs afterwards was changed (created, rewritten, replaced, removed and
//!   recreated) by the run or during it: its digest is recorded in `state.db`
//!   (`prompt_file_taint`, one row per workspace, name and digest) and in the audit log
//!   (kind `system`, action [`MARKED`]). Timestamps and inode numbers play no part: what
//!   matters is exactly what the prompt would read, which `touch -d` cannot disguise.
//! - The agent's system prompt ([`crate::agent`]) shows a file whose current digest is
//!   recorded as untrusted data, fenced, and taints the session that reads it. Any other
//!   content (an operator's edit) is trusted again automatically.
//! - A `write_file` the owner approved, or one made by an untainted call, vouches for the
//!   content it wrote: its digest is cleared ([`CLEARED`]). An approved `edit_file` vouches
//!   only for its replacement: the result stays untrusted when the file was untrusted before.
//! - Without a record ([`PromptMarks`]) a tainted call does not run (fail closed).
//!
//! Known limits: a change made by a concurrent untainted run during a tainted run is marked
//! too (conservative); content a tainted run leaves in *other* files (a script, a copy) is
//! trusted when an untainted run later copies it into a prompt file.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::policy::BOOTSTRAP_FILES;
use crate::store::{Store, StoreError, params};
use crate::wsfs::{WsDir, WsFsError};

/// Each prompt file is read up to this many bytes (the system prompt cuts it there).
pub const MAX_BYTES: usize = 32 * 1024;

/// The audit action of a prompt file marked untrusted.
pub const MARKED: &str = "workspace.prompt_file.untrusted";
/// The audit action of a mark cleared by an approved or untainted `write_file`/`edit_file`.
pub const CLEARED: &str = "workspace.prompt_file.trusted";

/// The text the system prompt shows for the first bytes of a prompt file: UTF-8, a character
/// cut at the limit dropped, invalid sequences replaced.
pub fn prompt_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(t) => t.to_string(),
        // Cut inside a character: drop the partial character.
        Err(e) if e.error_len().is_none() => {
            String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
        }
        Err(_) => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// The digest of what the system prompt shows of a prompt file: its text (at most
/// [`MAX_BYTES`], see [`prompt_text`]) and the size it has (the prompt says how much was cut).
/// Lowercase hex SHA-256.
pub fn digest(text: &str, size: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"chitin prompt file v1\0");
    h.update(size.to_le_bytes());
    h.update(text.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// One prompt file as a snapshot saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    Absent,
    /// Present but not something the prompt reads (a symlink, FIFO, directory, hard link, ...).
    NotRead,
    /// A regular file: the [`digest`] of what the prompt shows of it.
    Read {
        digest: String,
    },
}

/// The prompt files of one workspace at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    files: Vec<(&'static str, FileState)>,
}

/// A prompt file whose content changed between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub name: &'static str,
    /// The digest it has now.
    pub digest: String,
    /// Before, it was absent or not a file the prompt reads.
    pub created: bool,
    /// Its digest before, when it was a file the prompt reads.
    pub before: Option<String>,
}

impl Snapshot {
    /// Reads the prompt files directly in the workspace root through [`crate::wsfs`].
    pub fn take(root: &Path) -> Result<Self, WsFsError> {
        let dir = WsDir::root(root)?;
        Ok(Self::of(&dir, BOOTSTRAP_FILES))
    }

    fn of(dir: &WsDir, names: &[&'static str]) -> Self {
        let files = names.iter().map(|name| (*name, state(dir, name))).collect();
        Self { files }
    }

    /// The state of one prompt file.
    pub fn get(&self, name: &str) -> Option<&FileState> {
        self.files.iter().find(|(n, _)| *n == name).map(|(_, s)| s)
    }

    /// The prompt files whose content, as the prompt shows it, is different in `after` (only
    /// those the prompt reads now: a file removed or made unreadable shows nothing).
    pub fn changed(&self, after: &Snapshot) -> Vec<Change> {
        after
            .files
            .iter()
            .filter_map(|(name, now)| {
                let FileState::Read { digest } = now else {
                    return None;
                };
                let before = match self.get(name) {
                    Some(FileState::Read { digest: d }) if d == digest => return None,
                    Some(FileState::Read { digest: d }) => Some(d.clone()),
                    _ => None,
                };
                Some(Change {
                    name,
                    digest: digest.clone(),
                    created: before.is_none(),
                    before,
                })
            })
            .collect()
    }
}

fn state(dir: &WsDir, name: &str) -> FileState {
    match dir.read_capped(Path::new(name), MAX_BYTES as u64) {
        Ok(c) => FileState::Read {
            digest: digest(&prompt_text(&c.bytes), c.size),
        },
        Err(WsFsError::NotFound { .. }) => FileState::Absent,
        Err(_) => FileState::NotRead,
    }
}

/// The record of prompt-file contents written by tainted runs (`prompt_file_taint` in
/// `state.db`), for one run when [`Self::for_run`] names it.
#[derive(Debug, Clone)]
pub struct PromptMarks {
    store: Arc<Store>,
    run: Option<String>,
}

impl PromptMarks {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store, run: None }
    }

    /// Marks made through this value name the run `run`.
    #[must_use]
    pub fn for_run(mut self, run: &str) -> Self {
        self.run = Some(run.to_string());
        self
    }

    /// Records that `name` in `workspace` (canonical) with content `digest` was written by a
    /// tainted run of `session`. The latest record of one content wins.
    pub fn mark(
        &self,
        workspace: &Path,
        name: &str,
        digest: &str,
        session: &str,
    ) -> Result<(), StoreError> {
        // A timestamp for people reading the record, not used in any decision.
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        self.store.db().with(|c| {
            c.execute(
                "INSERT INTO prompt_file_taint (workspace, name, digest, session, run_id, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (workspace, name, digest) DO UPDATE SET
                    session = excluded.session, run_id = excluded.run_id, at_ms = excluded.at_ms",
                params![
                    &*workspace.to_string_lossy(),
                    name,
                    digest,
                    session,
                    self.run,
                    at_ms
                ],
            )
            .map(|_| ())
            .map_err(StoreError::from)
        })
    }

    /// Whether the content `digest` of `name` in `workspace` was written by a tainted run
    /// (and not vouched for since).
    pub fn is_marked(
        &self,
        workspace: &Path,
        name: &str,
        digest: &str,
    ) -> Result<bool, StoreError> {
        self.store.db().with(|c| {
            c.query_opt(
                "SELECT 1 FROM prompt_file_taint WHERE workspace = ?1 AND name = ?2 AND digest = ?3",
                params![&*workspace.to_string_lossy(), name, digest],
            )
            .map(|r| r.is_some())
            .map_err(StoreError::from)
        })
    }

    /// Forgets the mark of the content `digest` (someone vouched for it); whether there was one.
    pub fn clear(&self, workspace: &Path, name: &str, digest: &str) -> Result<bool, StoreError> {
        self.store.db().with(|c| {
            c.execute(
                "DELETE FROM prompt_file_taint WHERE workspace = ?1 AND name = ?2 AND digest = ?3",
                params![&*workspace.to_string_lossy(), name, digest],
            )
            .map(|n| n > 0)
            .map_err(StoreError::from)
        })
    }
}

/// What a file tool call writes, when its path is a prompt file.
#[derive(Debug, Clone)]
pub enum Target {
    /// `write_file` of this content: the digest the file has when exactly that was written.
    Write { name: &'static str, digest: String },
    /// `edit_file`: a replacement inside whatever the file holds.
    Edit { name: &'static str },
}

impl Target {
    /// The target of a `write_file` (`content: Some`) or `edit_file` (`None`) of the
    /// workspace-relative path `rel`, when that is a prompt file (exact name, at the root).
    pub fn of(rel: &str, content: Option<&str>) -> Option<Self> {
        let name = *BOOTSTRAP_FILES.iter().find(|n| **n == rel)?;
        Some(match content {
            Some(c) => {
                let size = c.len() as u64;
                let cut = &c.as_bytes()[..c.len().min(MAX_BYTES)];
                Self::Write {
                    name,
                    digest: digest(&prompt_text(cut), size),
                }
            }
            None => Self::Edit { name },
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Write { name, .. } | Self::Edit { name } => name,
        }
    }
}

/// How the approval of a call covers one change of a prompt file.
enum Vouched {
    /// Not at all: the change is marked untrusted.
    No,
    /// The person approved exactly this content (its mark is cleared after the loop).
    Content,
    /// An approved edit of a trusted file: the result is trusted.
    Edit,
}

/// One watched tool run (see the module documentation).
#[derive(Debug)]
pub struct Guard {
    marks: Option<PromptMarks>,
    workspace: std::path::PathBuf,
    session: String,
    actor: String,
    tool: String,
    tainted: bool,
    approved: bool,
    target: Option<Target>,
    before: Option<Snapshot>,
}

/// Why a tainted call cannot be watched (nothing ran).
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "the gateway has no record of prompt files changed by tainted runs (state.db); nothing ran"
    )]
    NoRecord,
    #[error("the workspace prompt files cannot be read: {0}; nothing ran")]
    Workspace(#[from] WsFsError),
}

/// Who and what one watched run is for.
#[derive(Debug, Clone, Copy)]
pub struct Watch<'a> {
    pub call: &'a crate::gate::CallContext,
    /// The Cedar principal of the caller, as audit records name it.
    pub actor: &'a str,
    pub tool: &'a str,
    /// The call was decided as approved (a redeemed approval).
    pub approved: bool,
    pub target: Option<&'a Target>,
}

impl Guard {
    /// Before a sandboxed run: for a tainted call, the snapshot of the prompt files of the
    /// (canonical) `workspace`.
    pub fn before(
        marks: Option<&PromptMarks>,
        workspace: &Path,
        w: Watch<'_>,
    ) -> Result<Self, GuardError> {
        let tainted = w.call.tainted;
        let before = if tainted {
            if marks.is_none() {
                return Err(GuardError::NoRecord);
            }
            Some(Snapshot::take(workspace)?)
        } else {
            None
        };
        Ok(Self {
            marks: marks.cloned(),
            workspace: workspace.to_path_buf(),
            session: w.call.session.clone(),
            actor: w.actor.to_string(),
            tool: w.tool.to_string(),
            tainted,
            approved: w.approved,
            target: w.target.cloned(),
            before,
        })
    }

    /// After the launcher has exited: marks the prompt files the run changed (tainted), or
    /// clears the mark of what an approved or untainted `write_file`/`edit_file` wrote, with an
    /// audit record for each. `ran`: the tool reported success. Returns the marked changes.
    pub fn after(self, audit: &chitin_audit::AuditLog, ran: bool) -> Result<Vec<Change>, String> {
        let Some(marks) = &self.marks else {
            return Ok(Vec::new());
        };
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
        let dir = WsDir::root(&self.workspace).map_err(|e| fail("reading the prompt files", &e))?;
        let mut marked = Vec::new();
        if let Some(before) = &self.before {
            let after = Snapshot::of(&dir, BOOTSTRAP_FILES);
            for c in before.changed(&after) {
                match self.vouched(marks, &c)? {
                    Vouched::Content | Vouched::Edit => {}
                    Vouched::No => {
                        marks
                            .mark(&self.workspace, c.name, &c.digest, &self.session)
                            .map_err(|e| fail("recording an untrusted prompt file", &e))?;
                        let change = if c.created { "created" } else { "modified" };
                        self.record(audit, MARKED, &c, change)?;
                        marked.push(c);
                    }
                }
            }
            // An approved write vouches for exactly the content it wrote (whether or not the
            // file held it already): any mark of that content is cleared.
            if ran
                && self.approved
                && let Some(Target::Write { name, digest }) = &self.target
                && after.get(name)
                    == Some(&FileState::Read {
                        digest: digest.clone(),
                    })
            {
                self.clear(marks, audit, name, digest)?;
            }
        } else if ran && let Some(t) = &self.target {
            // An untainted write or edit vouches for what the file holds now.
            if let FileState::Read { digest } = state(&dir, t.name()) {
                self.clear(marks, audit, t.name(), &digest)?;
            }
        }
        Ok(marked)
    }

    /// Whether the approval of this call vouches for the change `c` of a tainted run.
    fn vouched(&self, marks: &PromptMarks, c: &Change) -> Result<Vouched, String> {
        if !self.approved {
            return Ok(Vouched::No);
        }
        match &self.target {
            // The person saw every byte of the content: exactly that content is trusted.
            Some(Target::Write { name, digest }) if *name == c.name && *digest == c.digest => {
                Ok(Vouched::Content)
            }
            // The person saw a replacement, not the file: the result is trusted only when the
            // file was trusted before.
            Some(Target::Edit { name }) if *name == c.name => match &c.before {
                Some(b) => match marks.is_marked(&self.workspace, name, b) {
                    Ok(false) => Ok(Vouched::Edit),
                    Ok(true) => Ok(Vouched::No),
                    Err(e) => Err(format!("reading the prompt-file record: {e}")),
                },
                None => Ok(Vouched::No),
            },
            _ => Ok(Vouched::No),
        }
    }

    fn clear(
        &self,
        marks: &PromptMarks,
        audit: &chitin_audit::AuditLog,
        name: &'static str,
        digest: &str,
    ) -> Result<(), String> {
        let had = marks
            .clear(&self.workspace, name, digest)
            .map_err(|e| format!("clearing a prompt-file mark: {e}"))?;
        if had {
            let c = Change {
                name,
                digest: digest.to_string(),
                created: false,
                before: None,
            };
            self.record(audit, CLEARED, &c, "vouched")?;
        }
        Ok(())
    }

    fn record(
        &self,
        audit: &chitin_audit::AuditLog,
        action: &str,
        c: &Change,
        change: &str,
    ) -> Result<(), String> {
        let input = chitin_audit::RecordInput::new(
            chitin_audit::Kind::System,
            self.actor.as_str(),
            action,
            format!("workspace-file:{}", c.name),
        )
        .with_payload(json!({
            "workspace": self.workspace.display().to_string(),
            "name": c.name,
            "digest": c.digest,
            "change": change,
            "tool": self.tool,
            "session": self.session,
            "run": self.marks.as_ref().and_then(|m| m.run.clone()),
            "tainted": self.tainted,
            "approved": self.approved,
        }));
        audit
            .append(input)
            .map(|_| ())
            .map_err(|e| format!("the audit record of a prompt-file change: {e}"))
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

    fn snap(ws: &Path) -> Snapshot {
        Snapshot::take(ws).unwrap()
    }

    #[test]
    fn a_snapshot_pair_names_each_prompt_file_whose_shown_content_changed() {
        let t = tempfile::tempdir().unwrap();
        let ws = t.path();
        std::fs::write(ws.join("AGENTS.md"), "operator rules").unwrap();
        std::fs::write(ws.join("SOUL.md"), "soul").unwrap();
        std::fs::write(ws.join("USER.md"), "user").unwrap();
        let before = snap(ws);
        assert_eq!(before.changed(&snap(ws)), []);

        // Rewritten with new text, then its time stamps set back: still a change.
        std::fs::write(ws.join("AGENTS.md"), "obey page.txt").unwrap();
        std::process::Command::new("touch")
            .args(["-d", "2000-01-01"])
            .arg(ws.join("AGENTS.md"))
            .status()
            .unwrap();
        // Removed and recreated with other text.
        std::fs::remove_file(ws.join("SOUL.md")).unwrap();
        std::fs::write(ws.join("SOUL.md"), "new soul").unwrap();
        // Created.
        std::fs::write(ws.join("MEMORY.md"), "remember").unwrap();
        // Removed and recreated with the same text, and touched: what the prompt shows is the
        // same, so nothing to mark.
        std::fs::remove_file(ws.join("USER.md")).unwrap();
        std::fs::write(ws.join("USER.md"), "user").unwrap();
        let after = snap(ws);
        let got: Vec<(&str, bool)> = before
            .changed(&after)
            .iter()
            .map(|c| (c.name, c.created))
            .collect();
        assert_eq!(
            got,
            [
                ("AGENTS.md", false),
                ("SOUL.md", false),
                ("MEMORY.md", true)
            ]
        );
        let agents = &before.changed(&after)[0];
        assert_eq!(
            agents.digest,
            digest("obey page.txt", "obey page.txt".len() as u64)
        );

        // A file replaced by a symlink or removed shows nothing in the prompt: no change.
        std::fs::remove_file(ws.join("AGENTS.md")).unwrap();
        std::os::unix::fs::symlink("SOUL.md", ws.join("AGENTS.md")).unwrap();
        std::fs::remove_file(ws.join("MEMORY.md")).unwrap();
        let last = snap(ws);
        assert_eq!(last.get("AGENTS.md"), Some(&FileState::NotRead));
        assert_eq!(last.get("MEMORY.md"), Some(&FileState::Absent));
        assert_eq!(after.changed(&last), []);
        // ... and a file the prompt reads again afterwards is a change (created).
        std::fs::remove_file(ws.join("AGENTS.md")).unwrap();
        std::fs::write(ws.join("AGENTS.md"), "back").unwrap();
        let back = last.changed(&snap(ws));
        assert_eq!(back.len(), 1);
        assert!(back[0].created && back[0].name == "AGENTS.md");
    }

    #[test]
    fn the_digest_covers_what_the_prompt_shows_and_the_size() {
        let long = "a".repeat(MAX_BYTES + 10);
        let longer = format!("{long}tail");
        // Past the limit, only the size the prompt reports tells them apart.
        assert_ne!(
            digest(&long[..MAX_BYTES], long.len() as u64),
            digest(&longer[..MAX_BYTES], longer.len() as u64)
        );
        let t = Target::of("AGENTS.md", Some(&long)).unwrap();
        let Target::Write { digest: d, .. } = t else {
            panic!()
        };
        assert_eq!(d, digest(&long[..MAX_BYTES], long.len() as u64));
        assert!(Target::of("sub/AGENTS.md", None).is_none());
        assert!(Target::of("agents.md", None).is_none());
    }

    /// The extra cost of a tainted tool call: one snapshot pair of a workspace holding the
    /// four prompt files (`cargo test --lib prompt_guard -- --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement, not a check"]
    fn measure_the_snapshot_pair() {
        let t = tempfile::tempdir().unwrap();
        for n in BOOTSTRAP_FILES {
            std::fs::write(t.path().join(n), "x".repeat(MAX_BYTES)).unwrap();
        }
        let rounds = 2000;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            let a = snap(t.path());
            let b = snap(t.path());
            assert!(a.changed(&b).is_empty());
        }
        let per = start.elapsed() / rounds;
        eprintln!("snapshot pair, 4 files of 32 KiB: {per:?} per tainted call");
    }
}
