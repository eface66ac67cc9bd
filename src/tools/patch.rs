//! `apply_patch`: a unified diff over several workspace files, in the file-write class.
//!
//! Invariants:
//! - A patch cannot write where `write_file` may not: every path it touches (created,
//!   modified or deleted) is decided by Cedar as a `write_file` of that path (the same
//!   request, located by the gate the same way), all bound to the whole patch. One denied path
//!   refuses the whole patch; one path needing approval makes the whole patch need one
//!   approval, which shows every path and every line (`Gate::check_calls`).
//! - Applied atomically inside the sandbox (the file helper): every hunk of every file is
//!   checked against the current content before anything is written; the new files are
//!   staged beside their targets, then swapped in with `renameat2` (`RENAME_EXCHANGE` /
//!   `RENAME_NOREPLACE`), and a failure part way swaps back what was done: all files or none.
//! - Parsing is pure and strict: renames, copies, binary patches and mode changes are refused
//!   with a sentence saying so; a hunk whose counts do not match its lines is an error.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::gated::{self, Gated};
use super::invoke::{InvokeError, Invoked};
use super::{Sandbox, ToolError, ToolResult, Workspace, helper, prompt_guard};
use crate::approvals::Approvals;
use crate::gate::{Authorized, CallContext, Gate, StepContext, ToolInput};
use crate::policy::Tool;

/// The largest patch accepted.
pub const MAX_PATCH_BYTES: usize = 1024 * 1024;
/// The most files one patch may touch.
pub const MAX_FILES: usize = 200;

/// What the model is told.
pub const DESCRIPTION: &str = "Apply a unified diff (as `diff -u` or `git diff` print it) to files in the workspace: several files at once, all or none. Paths are relative to the workspace (a/ and b/ prefixes are removed). Use /dev/null as the old path to create a file and as the new path to delete one.";

/// The JSON schema of the arguments.
pub fn input_schema() -> Value {
    json!({"type": "object", "additionalProperties": false, "required": ["patch"], "properties": {
        "patch": {"type": "string", "description": "the unified diff"}
    }})
}

/// `apply_patch` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPatchArgs {
    pub patch: String,
}

/// What a patch does to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileOp {
    Create,
    Modify,
    Delete,
}

impl FileOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Modify => "modify",
            Self::Delete => "delete",
        }
    }
}

/// One line of a hunk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Line {
    /// ` ` in both.
    Context(String),
    /// `-` only in the old file.
    Remove(String),
    /// `+` only in the new file.
    Add(String),
}

/// One hunk: where it starts in the old file (1-based; 0 for an empty file) and its lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hunk {
    pub old_start: usize,
    pub lines: Vec<Line>,
    /// `\ No newline at end of file` after the old side's last line.
    #[serde(default)]
    pub old_no_newline: bool,
    /// ... after the new side's last line.
    #[serde(default)]
    pub new_no_newline: bool,
}

/// The changes to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePatch {
    /// Workspace-relative path (prefix `a/` / `b/` removed).
    pub path: String,
    pub op: FileOp,
    pub hunks: Vec<Hunk>,
}

/// Errors of parsing and applying a patch: sentences for the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    #[error("patch line {line}: {message}")]
    Parse { line: usize, message: String },
    #[error("{path}: hunk {hunk} does not apply: {message}")]
    Apply {
        path: String,
        hunk: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn strip_prefix(p: &str) -> String {
    let p = p.split('\t').next().unwrap_or(p).trim_end();
    let p = p
        .strip_prefix('"')
        .and_then(|q| q.strip_suffix('"'))
        .unwrap_or(p);
    for pre in ["a/", "b/"] {
        if let Some(rest) = p.strip_prefix(pre) {
            return rest.to_string();
        }
    }
    p.to_string()
}

/// `@@ -a[,b] +c[,d] @@` → (a, b, c, d).
fn hunk_header(h: &str) -> Option<(usize, usize, usize, usize)> {
    let rest = h.strip_prefix("@@ -")?;
    let end = rest.find(" @@")?;
    let mut parts = rest[..end].split(" +");
    let range = |s: &str| -> Option<(usize, usize)> {
        match s.split_once(',') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => Some((s.parse().ok()?, 1)),
        }
    };
    let (a, b) = range(parts.next()?)?;
    let (c, d) = range(parts.next()?)?;
    if parts.next().is_some() {
        return None;
    }
    Some((a, b, c, d))
}

/// Parses a unified diff strictly.
pub fn parse(text: &str) -> Result<Vec<FilePatch>, PatchError> {
    let lines: Vec<&str> = text.split('\n').collect();
    let n = if text.ends_with('\n') {
        lines.len() - 1
    } else {
        lines.len()
    };
    let perr = |line: usize, m: &str| PatchError::Parse {
        line: line + 1,
        message: m.to_string(),
    };
    let mut files: Vec<FilePatch> = Vec::new();
    let mut i = 0;
    while i < n {
        let l = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
        if l.starts_with("rename from")
            || l.starts_with("rename to")
            || l.starts_with("copy from")
            || l.starts_with("copy to")
        {
            return Err(perr(
                i,
                "renames and copies are not supported; delete the old file and create the new one",
            ));
        }
        if l.starts_with("GIT binary patch") || l.starts_with("Binary files ") {
            return Err(perr(i, "binary patches are not supported"));
        }
        if l.starts_with("old mode") || l.starts_with("new mode") {
            return Err(perr(i, "mode changes are not supported"));
        }
        if !l.starts_with("--- ") {
            // `diff --git`, `index`, `new file mode`, `deleted file mode`, comments.
            i += 1;
            continue;
        }
        let old = strip_prefix(&l[4..]);
        let Some(next) = lines.get(i + 1).filter(|_| i + 1 < n) else {
            return Err(perr(i, "`---` line without a `+++` line after it"));
        };
        let next = next.strip_suffix('\r').unwrap_or(next);
        let Some(new) = next.strip_prefix("+++ ") else {
            return Err(perr(i + 1, "expected a `+++` line"));
        };
        let new = strip_prefix(new);
        let (path, op) = match (old.as_str(), new.as_str()) {
            ("/dev/null", "/dev/null") => {
                return Err(perr(i, "both sides are /dev/null"));
            }
            ("/dev/null", p) => (p.to_string(), FileOp::Create),
            (p, "/dev/null") => (p.to_string(), FileOp::Delete),
            (o, p) if o == p => (p.to_string(), FileOp::Modify),
            _ => {
                return Err(perr(
                    i,
                    "the old and new paths differ (a rename); delete the old file and create the new one",
                ));
            }
        };
        if path.is_empty() {
            return Err(perr(i, "empty path"));
        }
        i += 2;
        let mut hunks = Vec::new();
        while i < n {
            let l = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
            if !l.starts_with("@@ ") {
                break;
            }
            let (a, b, _c, d) = hunk_header(l).ok_or_else(|| perr(i, "malformed hunk header"))?;
            i += 1;
            let mut hunk = Hunk {
                old_start: a,
                lines: Vec::new(),
                old_no_newline: false,
                new_no_newline: false,
            };
            let (mut seen_old, mut seen_new) = (0usize, 0usize);
            while (seen_old < b || seen_new < d) && i < n {
                let l = lines[i].strip_suffix('\r').unwrap_or(lines[i]);
                let (tag, body) = match l.chars().next() {
                    Some(c) => (c, &l[c.len_utf8()..]),
                    // An empty line in a hunk is an empty context line (some tools strip the
                    // trailing space).
                    None => (' ', ""),
                };
                match tag {
                    ' ' => {
                        hunk.lines.push(Line::Context(body.into()));
                        seen_old += 1;
                        seen_new += 1;
                    }
                    '-' => {
                        hunk.lines.push(Line::Remove(body.into()));
                        seen_old += 1;
                    }
                    '+' => {
                        hunk.lines.push(Line::Add(body.into()));
                        seen_new += 1;
                    }
                    '\\' => {}
                    _ => return Err(perr(i, "unexpected line inside a hunk")),
                }
                i += 1;
                if let Some(nl) = lines.get(i).filter(|_| i < n)
                    && nl.starts_with("\\ ")
                {
                    match hunk.lines.last() {
                        Some(Line::Remove(_)) => hunk.old_no_newline = true,
                        Some(Line::Add(_)) => hunk.new_no_newline = true,
                        _ => {
                            hunk.old_no_newline = true;
                            hunk.new_no_newline = true;
                        }
                    }
                    i += 1;
                }
            }
            if seen_old != b || seen_new != d {
                return Err(perr(
                    i.saturating_sub(1),
                    "the hunk has fewer lines than its header says",
                ));
            }
            hunks.push(hunk);
        }
        if hunks.is_empty() && op != FileOp::Create {
            return Err(perr(i.saturating_sub(1), "a file section without hunks"));
        }
        if files.iter().any(|f| f.path == path) {
            return Err(perr(
                i.saturating_sub(1),
                "a file appears twice in the patch",
            ));
        }
        files.push(FilePatch { path, op, hunks });
    }
    if files.is_empty() {
        return Err(PatchError::Invalid(
            "no file changes found: the patch needs `--- a/PATH` / `+++ b/PATH` lines and `@@` hunks".into(),
        ));
    }
    if files.len() > MAX_FILES {
        return Err(PatchError::Invalid(format!(
            "the patch touches {} files; at most {MAX_FILES}",
            files.len()
        )));
    }
    Ok(files)
}

/// Applies one file's hunks to its current text (`None`: the file does not exist). Returns
/// the new text (`None` for a deleted file). Pure: used inside the sandbox helper.
pub fn apply_file(fp: &FilePatch, current: Option<&str>) -> Result<Option<String>, PatchError> {
    let fail = |hunk: usize, m: &str| PatchError::Apply {
        path: fp.path.clone(),
        hunk,
        message: m.to_string(),
    };
    let text = match (fp.op, current) {
        (FileOp::Create, Some(_)) => {
            return Err(fail(0, "the file to create exists already"));
        }
        (FileOp::Create, None) => "",
        (_, None) => return Err(fail(0, "the file does not exist")),
        (_, Some(t)) => t,
    };
    let mut old: Vec<&str> = text.split('\n').collect();
    let mut trailing_newline = text.ends_with('\n');
    if trailing_newline || text.is_empty() {
        old.pop();
    }
    if text.is_empty() {
        trailing_newline = true;
    }
    let mut out: Vec<String> = Vec::new();
    let mut pos = 0usize;
    let mut new_trailing = trailing_newline;
    for (k, h) in fp.hunks.iter().enumerate() {
        let want: Vec<&str> = h
            .lines
            .iter()
            .filter_map(|l| match l {
                Line::Context(s) | Line::Remove(s) => Some(s.as_str()),
                Line::Add(_) => None,
            })
            .collect();
        let expected = h.old_start.saturating_sub(1).max(pos);
        let matches_at =
            |at: usize| at + want.len() <= old.len() && old[at..at + want.len()] == want[..];
        // The header's position first, then the nearest position after the previous hunk.
        let at = if matches_at(expected) {
            Some(expected)
        } else {
            (pos..=old.len().saturating_sub(want.len()))
                .filter(|a| matches_at(*a))
                .min_by_key(|a| a.abs_diff(expected))
        };
        let Some(at) = at else {
            return Err(fail(
                k + 1,
                "its context and removed lines are not in the file (it changed since the diff was made?)",
            ));
        };
        out.extend(old[pos..at].iter().map(|s| (*s).to_string()));
        for l in &h.lines {
            match l {
                Line::Context(s) | Line::Add(s) => out.push(s.clone()),
                Line::Remove(_) => {}
            }
        }
        pos = at + want.len();
        if pos == old.len() {
            if h.old_no_newline && trailing_newline {
                return Err(fail(
                    k + 1,
                    "it says the file has no newline at its end, but it has",
                ));
            }
            new_trailing = !h.new_no_newline;
        }
    }
    out.extend(old[pos..].iter().map(|s| (*s).to_string()));
    if fp.op == FileOp::Delete {
        if !out.is_empty() {
            return Err(fail(
                fp.hunks.len(),
                "deleting a file needs every one of its lines removed",
            ));
        }
        return Ok(None);
    }
    let mut s = out.join("\n");
    if !out.is_empty() && new_trailing {
        s.push('\n');
    }
    Ok(Some(s))
}

/// Applies the patch an `Authorized` covers, inside the sandbox (the file helper).
pub fn apply_patch(
    auth: &Authorized,
    sb: &Sandbox,
    ws: &Workspace,
    args: &ApplyPatchArgs,
) -> Result<ToolResult, ToolError> {
    super::require(auth, Tool::ApplyPatch, args)?;
    let mut files = parse(&args.patch).map_err(|e| ToolError::InvalidArgs(e.to_string()))?;
    for f in &mut files {
        f.path = ws.resolve(&f.path)?.rel;
    }
    let (v, report) = sb.helper(
        Tool::ApplyPatch.as_str(),
        ws,
        &helper::Request::Patch {
            files,
            max_bytes: sb.config_section.max_file_bytes,
        },
    )?;
    Ok(super::result_from(&report, Some(v)))
}

/// Runs one `apply_patch` call (the tool path of [`super::invoke::invoke`]).
pub fn invoke(
    gate: &Gate,
    sandbox: &Sandbox,
    call: &CallContext,
    step: Option<&StepContext>,
    args: &Value,
    approvals: Option<&Approvals>,
) -> Result<Invoked, InvokeError> {
    let tool = Tool::ApplyPatch;
    let parsed: ApplyPatchArgs = gated::parse(gate, call, tool, args)?;
    if parsed.patch.len() > MAX_PATCH_BYTES {
        let e = gated::invalid(
            tool,
            format!("the patch is larger than {MAX_PATCH_BYTES} bytes"),
        );
        return Err(gated::refused(gate, call, tool, e, args));
    }
    let files = match parse(&parsed.patch) {
        Ok(f) => f,
        Err(e) => {
            return Err(gated::refused(
                gate,
                call,
                tool,
                gated::invalid(tool, e.to_string()),
                args,
            ));
        }
    };
    let norm = serde_json::to_value(&parsed).map_err(|e| gated::invalid(tool, e.to_string()))?;
    // Each path as `write_file` would see it: located by the gate, same request.
    let mut reqs = Vec::with_capacity(files.len());
    for f in &files {
        let input = ToolInput::WriteFile {
            path: f.path.clone(),
        };
        match gate.tool_request_for(call, step, &input) {
            Ok(r) => reqs.push(r),
            Err(e) => {
                let err = InvokeError::Gate(e);
                return Err(gated::refused(gate, call, tool, err, args));
            }
        }
    }
    let paths: Vec<Value> = files
        .iter()
        .zip(&reqs)
        .map(|(f, r)| {
            json!({"path": f.path, "op": f.op.as_str(),
                   "resolved": r.context.get("path").cloned().unwrap_or(Value::Null)})
        })
        .collect();
    let mut shown = norm.clone();
    if let Value::Object(m) = &mut shown {
        m.insert("files".into(), Value::Array(paths));
    }
    let go = match gated::decide(gate, approvals, &reqs, &norm, shown)? {
        Gated::Go(g) => g,
        Gated::Done(i) => return Ok(i),
    };
    let ws = Workspace::new(&call.workspace)?;
    let sb = sandbox.clone().for_call(call);
    let started = std::time::Instant::now();
    let actor = gated::actor(call);
    let watch = prompt_guard::Watch {
        call,
        actor: &actor,
        tool: tool.as_str(),
        approved: go.approval.is_some(),
        target: None,
    };
    let (run, watched) = match prompt_guard::Guard::before(sb.prompt_marks(), ws.root(), watch) {
        Ok(guard) => {
            let run = apply_patch(&go.auth, &sb, &ws, &parsed);
            let watched = guard.after(gate.audit(), run.is_ok()).map(|_| ());
            (run, watched)
        }
        Err(e) => (Err(ToolError::from(e)), Ok(())),
    };
    let mut argv = vec![tool.as_str().to_string()];
    argv.extend(
        files
            .iter()
            .map(|f| format!("{}:{}", f.op.as_str(), f.path)),
    );
    let run = match watched {
        Ok(()) => run,
        Err(w) => {
            // It ran, but the prompt files it changed could not be recorded as untrusted.
            return match run {
                Ok(mut r) => {
                    r.redact_with(|s| gate.redact(s));
                    Err(InvokeError::RanUnaudited {
                        tool: tool.as_str().into(),
                        audit: gate.redact(&w),
                        result: Box::new(r),
                        decision: Box::new(go.decision),
                    })
                }
                Err(e) => Err(e.into()),
            };
        }
    };
    gated::finish(gate, call, tool, &argv, started, run, go)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;

    const TWO: &str = "diff --git a/src/a.txt b/src/a.txt\n--- a/src/a.txt\n+++ b/src/a.txt\n@@ -1,3 +1,3 @@\n one\n-two\n+TWO\n three\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1,2 @@\n+hello\n+world\n";

    #[test]
    fn a_patch_over_two_files_parses_into_a_modify_and_a_create() {
        let f = parse(TWO).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].path.as_str(), f[0].op), ("src/a.txt", FileOp::Modify));
        assert_eq!((f[1].path.as_str(), f[1].op), ("new.txt", FileOp::Create));
        assert_eq!(
            apply_file(&f[0], Some("one\ntwo\nthree\n"))
                .unwrap()
                .unwrap(),
            "one\nTWO\nthree\n"
        );
        assert_eq!(apply_file(&f[1], None).unwrap().unwrap(), "hello\nworld\n");
    }

    #[test]
    fn a_hunk_that_does_not_match_the_file_is_refused_with_its_number() {
        let f = parse(TWO).unwrap();
        let e = apply_file(&f[0], Some("one\nzwei\nthree\n")).unwrap_err();
        assert!(matches!(e, PatchError::Apply { hunk: 1, .. }), "{e}");
        let e = apply_file(&f[1], Some("exists")).unwrap_err();
        assert!(e.to_string().contains("exists already"), "{e}");
    }

    #[test]
    fn a_hunk_moved_by_earlier_edits_applies_at_its_nearest_match() {
        let p = "--- a/f\n+++ b/f\n@@ -2,2 +2,2 @@\n c\n-d\n+D\n";
        let f = parse(p).unwrap();
        assert_eq!(
            apply_file(&f[0], Some("x\ny\na\nb\nc\nd\ne\n"))
                .unwrap()
                .unwrap(),
            "x\ny\na\nb\nc\nD\ne\n"
        );
    }

    #[test]
    fn deleting_needs_every_line_and_no_newline_markers_are_kept() {
        let f = parse("--- a/f\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-a\n-b\n").unwrap();
        assert_eq!(f[0].op, FileOp::Delete);
        assert_eq!(apply_file(&f[0], Some("a\nb\n")).unwrap(), None);
        assert!(apply_file(&f[0], Some("a\nb\nc\n")).is_err());
        let f = parse("--- a/f\n+++ b/f\n@@ -1 +1 @@\n-a\n\\ No newline at end of file\n+b\n\\ No newline at end of file\n").unwrap();
        assert_eq!(apply_file(&f[0], Some("a")).unwrap().unwrap(), "b");
    }

    #[test]
    fn renames_binary_patches_and_short_hunks_are_refused() {
        for (p, want) in [
            (
                "diff --git a/x b/y\nrename from x\nrename to y\n",
                "renames",
            ),
            ("--- a/x\n+++ b/y\n@@ -1 +1 @@\n-a\n+b\n", "rename"),
            ("Binary files a/x and b/x differ\n", "binary"),
            ("--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n a\n", "fewer lines"),
            ("just text\n", "no file changes"),
            (
                "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n",
                "twice",
            ),
        ] {
            let e = parse(p).unwrap_err().to_string();
            assert!(e.contains(want), "{p:?}: {e}");
        }
    }
}
