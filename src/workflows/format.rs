//! The workflow file format (Lobster-compatible) as typed values, and its loader.
//!
//! A file is YAML (`.lobster`, `.yaml`, `.yml`) or JSON (`.json`). The loader checks everything
//! that can be checked without running anything, and every error names `file:line:col` of the
//! offending node: unknown fields, wrong types, duplicate ids, a step with two kinds, a
//! condition that does not parse, a reference to a step that does not exist or does not run
//! earlier, a placeholder whose shell quoting cannot be guaranteed (see [`super::template`]).
//!
//! Where Lobster is lenient, this loader is strict, because a silently ignored field in an
//! automation is a bug waiting for its day: unknown fields are errors (Lobster ignores them),
//! `env` values must be strings (Lobster drops other values), ids are `[A-Za-z0-9_-]+` and
//! unique across the whole file including for_each sub-steps, and fields that would have no
//! effect on a step of a given kind (`retry` on an approval gate, `stdin` on a `for_each`) are
//! errors. A file Lobster runs correctly loads here unchanged.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value;

use super::condition::Condition;
use super::results::{RESULT_FIELDS, StepRef, is_id_char};
use super::source::{self, Key, Node, Pos, Style, Val};
use super::template::{Dialect, Names, RefTarget, Template, TemplateError, arg_env_name};

/// Largest workflow file accepted.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Largest `timeout_ms` (Lobster: a 32-bit signed timer).
pub const MAX_TIMEOUT_MS: u64 = 2_147_483_647;

/// The syntax of a workflow file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Yaml,
    Json,
}

impl FileFormat {
    /// `.lobster`, `.yaml`, `.yml` are YAML, `.json` is JSON (case ignored); anything else is
    /// not a workflow file.
    pub fn from_path(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "lobster" | "yaml" | "yml" => Some(Self::Yaml),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// A workflow file that cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("{file}: not a workflow file; name it *.lobster, *.yaml, *.yml or *.json")]
    Extension { file: String },
    #[error("{file}: the file is larger than {limit} bytes; a workflow file is small")]
    TooLarge { file: String, limit: usize },
    #[error("{file}:{}:{}: {message}", pos.line, pos.col)]
    Invalid {
        file: String,
        pos: Pos,
        message: String,
    },
}

/// A loaded workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    /// The file as named when loaded (used in messages).
    pub file: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Declared arguments, in file order.
    pub args: Vec<ArgSpec>,
    /// The workflow's `env`, applied to every step (arguments only, no step results).
    pub env: Vec<EnvVar>,
    /// The working directory of every step that does not set its own.
    pub cwd: Option<Template>,
    pub steps: Vec<Step>,
    pub cost_limit: Option<CostLimit>,
}

/// A declared argument.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgSpec {
    pub name: String,
    /// `None`: the argument must be given.
    pub default: Option<Value>,
    pub description: Option<String>,
    pub pos: Pos,
}

/// One `env` entry (`NAME: value`), its value a [`Dialect::Text`] template.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvVar {
    pub name: String,
    pub value: Template,
}

/// `cost_limit`: what happens when the LLM spend of a run passes `max_usd`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostLimit {
    pub max_usd: f64,
    pub action: CostAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostAction {
    /// Note it and go on (Lobster's default).
    Warn,
    /// Fail the run.
    Stop,
}

/// A top-level step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub id: String,
    pub pos: Pos,
    pub kind: StepKind,
    /// An approval gate that fires *after* the step's action ran (Lobster: a `run` or
    /// `pipeline` with `approval:` executes first, then asks). `None` for pure gates, whose
    /// gate is their [`StepKind`].
    pub approval: Option<Approval>,
    /// Step `env` (applied after the workflow's).
    pub env: Vec<EnvVar>,
    pub cwd: Option<Template>,
    pub stdin: Option<Stdin>,
    pub when: Option<Condition>,
    pub timeout_ms: Option<u32>,
    pub on_error: OnError,
    pub retry: Option<Retry>,
}

/// What a step does: exactly one of these.
#[derive(Debug, Clone, PartialEq)]
pub enum StepKind {
    /// `run:` / `command:` (the same thing): shell text.
    Shell(Template),
    /// `pipeline:`: a Lobster pipeline.
    Pipeline(Template),
    /// `workflow:` + `workflow_args:`: another workflow file.
    Workflow(SubWorkflow),
    Parallel(Parallel),
    ForEach(ForEach),
    /// A pure approval gate.
    Approval(Approval),
    /// A pure input gate.
    Input(InputRequest),
}

impl StepKind {
    /// The kind as Lobster's graph names it.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Shell(_) => "run",
            StepKind::Pipeline(_) => "pipeline",
            StepKind::Workflow(_) => "workflow",
            StepKind::Parallel(_) => "parallel",
            StepKind::ForEach(_) => "for_each",
            StepKind::Approval(_) => "approval",
            StepKind::Input(_) => "input",
        }
    }
}

/// A sub-workflow call.
#[derive(Debug, Clone, PartialEq)]
pub struct SubWorkflow {
    /// The file, relative to this workflow's directory unless absolute.
    pub path: Template,
    pub args: Vec<(String, ArgValue)>,
}

/// A `workflow_args` value: strings are templates, anything else passes as JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Text(Template),
    Json(Value),
}

/// `parallel:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Parallel {
    pub wait: Wait,
    pub timeout_ms: Option<u32>,
    pub branches: Vec<Branch>,
}

/// Whether a parallel step waits for every branch or the first to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    All,
    Any,
}

/// One branch of a parallel step: a command or pipeline, an approval gate after it, or a
/// pure approval gate (Chitin: Lobster has no gates in branches).
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub id: String,
    pub pos: Pos,
    /// `None`: a pure approval gate (then `approval` is set).
    pub action: Option<Action>,
    /// A gate that fires after the action (or is the branch).
    pub approval: Option<Approval>,
    pub env: Vec<EnvVar>,
    pub cwd: Option<Template>,
    pub stdin: Option<Stdin>,
}

/// What a branch or a for_each sub-step runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Shell(Template),
    Pipeline(Template),
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Shell(_) => "run",
            Action::Pipeline(_) => "pipeline",
        }
    }

    pub fn template(&self) -> &Template {
        match self {
            Action::Shell(t) | Action::Pipeline(t) => t,
        }
    }
}

/// `for_each:` over a list from an earlier step.
#[derive(Debug, Clone, PartialEq)]
pub struct ForEach {
    /// The reference giving the list (`$fetch.json.items`).
    pub items: StepRef,
    /// The loop variable's name (default `item`), read as `$item.json` / `$item.stdout`.
    pub item_var: String,
    /// The index variable's name (default `index`).
    pub index_var: String,
    /// Items per batch; `pause_ms` is waited between batches (default 1: between items).
    pub batch_size: Option<u32>,
    pub pause_ms: Option<u64>,
    pub steps: Vec<SubStep>,
}

/// A step of a for_each body: a command or pipeline, an approval gate after it, or a pure
/// approval gate asked once per item (Chitin: Lobster has no gates in loops).
#[derive(Debug, Clone, PartialEq)]
pub struct SubStep {
    pub id: String,
    pub pos: Pos,
    /// `None`: a pure approval gate (then `approval` is set).
    pub action: Option<Action>,
    /// A gate that fires after the action (or is the sub-step).
    pub approval: Option<Approval>,
    pub env: Vec<EnvVar>,
    pub cwd: Option<Template>,
    pub stdin: Option<Stdin>,
    pub when: Option<Condition>,
}

/// An approval gate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Approval {
    /// `None`: `Approve <step id>?`.
    pub prompt: Option<String>,
    /// Items to show; `None`: the step's JSON output (or stdin for a pure gate).
    pub items: Option<Vec<Value>>,
    pub preview: Option<String>,
    /// From the file; informational only (Chitin takes identities from authentication).
    pub initiated_by: Option<String>,
    pub required_approver: Option<String>,
    pub require_different_approver: bool,
    pub pos: Pos,
}

impl Approval {
    /// The prompt shown to the approver.
    pub fn prompt_for(&self, step_id: &str) -> String {
        self.prompt
            .clone()
            .unwrap_or_else(|| format!("Approve {step_id}?"))
    }
}

/// An input gate: pause until someone answers with JSON matching `response_schema`.
#[derive(Debug, Clone, PartialEq)]
pub struct InputRequest {
    pub prompt: String,
    /// A JSON Schema object (not validated as a schema yet).
    pub response_schema: Value,
    pub defaults: Option<Value>,
    pub pos: Pos,
}

/// A step's stdin.
#[derive(Debug, Clone, PartialEq)]
pub enum Stdin {
    /// Exactly one reference (`stdin: $fetch.json`): the value itself.
    Ref(StepRef),
    /// Any other string: a text template.
    Text(Template),
    /// A non-string value: passed as JSON.
    Json(Value),
}

/// What happens when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Fail the run (default).
    #[default]
    Stop,
    /// Record the error and go on with the next step.
    Continue,
    /// Record the error and skip every remaining step.
    SkipRest,
}

/// `retry:` (defaults as in Lobster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in total (default 1: no retry).
    pub max: u32,
    pub backoff: Backoff,
    /// Default 1000.
    pub delay_ms: u64,
    /// Default 30000.
    pub max_delay_ms: u64,
    /// ±10% randomization.
    pub jitter: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    Fixed,
    Exponential,
}

impl Workflow {
    /// Loads a workflow from its text; `file` names it in messages and its extension picks the
    /// syntax.
    pub fn parse(text: &str, file: &str) -> Result<Self, LoadError> {
        let format =
            FileFormat::from_path(Path::new(file)).ok_or_else(|| LoadError::Extension {
                file: file.to_string(),
            })?;
        Self::parse_as(text, file, format)
    }

    /// [`Workflow::parse`] with the syntax given.
    pub fn parse_as(text: &str, file: &str, format: FileFormat) -> Result<Self, LoadError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(LoadError::TooLarge {
                file: file.to_string(),
                limit: MAX_FILE_BYTES,
            });
        }
        let root = match format {
            FileFormat::Yaml => source::parse_yaml(text),
            FileFormat::Json => source::parse_json(text),
        }
        .map_err(|e| LoadError::Invalid {
            file: file.to_string(),
            pos: e.pos,
            message: e.message,
        })?;
        let mut loader = Loader {
            file,
            lines: text.lines().collect(),
            ids: HashMap::new(),
            args: Vec::new(),
        };
        loader.collect_ids(&root);
        loader.workflow(&root)
    }

    /// Every step id of the file with its position: steps, parallel branches, for_each
    /// sub-steps, in file order.
    pub fn all_ids(&self) -> Vec<(&str, Pos)> {
        let mut out = Vec::new();
        for s in &self.steps {
            out.push((s.id.as_str(), s.pos));
            match &s.kind {
                StepKind::Parallel(p) => {
                    out.extend(p.branches.iter().map(|b| (b.id.as_str(), b.pos)))
                }
                StepKind::ForEach(f) => out.extend(f.steps.iter().map(|b| (b.id.as_str(), b.pos))),
                _ => {}
            }
        }
        out
    }

    /// The declared argument names, in file order.
    pub fn arg_names(&self) -> Vec<String> {
        self.args.iter().map(|a| a.name.clone()).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The loader

/// Where an id is defined.
#[derive(Debug, Clone)]
enum Place {
    Top {
        index: usize,
    },
    Branch {
        top: usize,
        parent: String,
    },
    Sub {
        top: usize,
        parent: String,
        index: usize,
    },
}

#[derive(Debug, Clone)]
struct IdInfo {
    pos: Pos,
    place: Place,
}

/// Where a template or condition sits, which decides what it may refer to.
#[derive(Debug, Clone, Copy)]
enum At<'a> {
    /// The workflow's own `env` / `cwd`.
    Workflow,
    /// A top-level step's fields (also a for_each step's `for_each` and `when`).
    Top { index: usize, id: &'a str },
    /// A parallel branch.
    Branch { top: usize, id: &'a str },
    /// A for_each step's `env`/`cwd` (evaluated per item) or a sub-step.
    Loop {
        top: usize,
        /// The sub-step's index, or `None` for the loop's own `env`/`cwd`.
        sub: Option<usize>,
        id: &'a str,
        item_var: &'a str,
        index_var: &'a str,
    },
}

struct Loader<'a> {
    file: &'a str,
    lines: Vec<&'a str>,
    ids: HashMap<String, IdInfo>,
    args: Vec<String>,
}

struct Scope<'l, 'a> {
    loader: &'l Loader<'a>,
    at: At<'l>,
}

impl Names for Scope<'_, '_> {
    fn is_arg(&self, name: &str) -> bool {
        self.loader.args.iter().any(|a| a == name)
    }

    fn step(&self, id: &str) -> RefTarget {
        self.loader.target(self.at, id)
    }
}

/// The fields of a mapping, read by name; what is left over is an unknown field.
struct Fields<'n> {
    entries: &'n [(Key, Node)],
    taken: Vec<bool>,
}

impl<'n> Fields<'n> {
    fn take(&mut self, name: &str) -> Option<(&'n Key, &'n Node)> {
        let i = self.entries.iter().position(|(k, _)| k.name == name)?;
        self.taken[i] = true;
        self.entries.get(i).map(|(k, v)| (k, v))
    }

    fn node(&mut self, name: &str) -> Option<&'n Node> {
        self.take(name).map(|(_, v)| v)
    }

    fn leftover(&self) -> Option<&'n Key> {
        self.entries
            .iter()
            .zip(&self.taken)
            .find(|(_, t)| !**t)
            .map(|((k, _), _)| k)
    }
}

const TOP_FIELDS: &[&str] = &[
    "name",
    "description",
    "args",
    "env",
    "cwd",
    "steps",
    "cost_limit",
];
const STEP_FIELDS: &[&str] = &[
    "id",
    "run",
    "command",
    "pipeline",
    "workflow",
    "workflow_args",
    "parallel",
    "for_each",
    "item_var",
    "index_var",
    "batch_size",
    "pause_ms",
    "steps",
    "approval",
    "input",
    "env",
    "cwd",
    "stdin",
    "when",
    "condition",
    "timeout_ms",
    "on_error",
    "retry",
];
const BRANCH_FIELDS: &[&str] = &[
    "id", "run", "command", "pipeline", "approval", "env", "cwd", "stdin",
];
const SUB_FIELDS: &[&str] = &[
    "id",
    "run",
    "command",
    "pipeline",
    "approval",
    "env",
    "cwd",
    "stdin",
    "when",
    "condition",
];
const EXEC_KINDS: &[&str] = &[
    "run", "command", "pipeline", "workflow", "parallel", "for_each",
];
const KINDS_TEXT: &str =
    "run (or command), pipeline, workflow, parallel, for_each, or a gate (approval or input)";

type R<T> = Result<T, LoadError>;

impl<'a> Loader<'a> {
    fn err(&self, pos: Pos, message: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            file: self.file.to_string(),
            pos,
            message: message.into(),
        }
    }

    fn fields<'n>(&self, node: &'n Node, what: &str) -> R<Fields<'n>> {
        match &node.val {
            Val::Map(entries) => Ok(Fields {
                entries,
                taken: vec![false; entries.len()],
            }),
            _ => Err(self.err(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind_name()),
            )),
        }
    }

    fn unknown(&self, f: &Fields<'_>, what: &str, allowed: &[&str]) -> R<()> {
        match f.leftover() {
            Some(k) => Err(self.err(
                k.pos,
                format!(
                    "unknown field `{}` in {what}; allowed: {}",
                    k.name,
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn string<'n>(&self, node: &'n Node, what: &str) -> R<&'n str> {
        match &node.val {
            Val::String(s, _) => Ok(s),
            _ => Err(self.err(
                node.pos,
                format!("{what} must be a string, found {}", node.kind_name()),
            )),
        }
    }

    fn boolean(&self, node: &Node, what: &str) -> R<bool> {
        match &node.val {
            Val::Bool(b) => Ok(*b),
            _ => Err(self.err(
                node.pos,
                format!("{what} must be true or false, found {}", node.kind_name()),
            )),
        }
    }

    fn integer(&self, node: &Node, what: &str, min: u64, max: u64) -> R<u64> {
        let v = match &node.val {
            Val::Number(n) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= 9.0e15)
                    .map(|f| f as u64)
            }),
            _ => None,
        };
        match v {
            Some(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(self.err(
                node.pos,
                if matches!(node.val, Val::Number(_)) {
                    format!("{what} must be a whole number from {min} to {max}")
                } else {
                    format!(
                        "{what} must be a whole number from {min} to {max}, found {}",
                        node.kind_name()
                    )
                },
            )),
        }
    }

    /// The position of a character inside a string node, when the string appears verbatim in
    /// the source; else the node's position.
    fn locate(&self, node: &Node, char_offset: usize) -> Pos {
        let Val::String(text, style) = &node.val else {
            return node.pos;
        };
        let before: String = text.chars().take(char_offset).collect();
        let text_line = before.matches('\n').count();
        let col_in_line = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
        let this_line = text.split('\n').nth(text_line).unwrap_or("");
        let candidates: Vec<(usize, usize)> = match style {
            Style::Plain | Style::Quoted => {
                if text_line > 0 {
                    return node.pos;
                }
                let skip = usize::from(*style == Style::Quoted);
                vec![(node.pos.line as usize, node.pos.col as usize + skip)]
            }
            // yaml-rust2 marks a block scalar where its content starts; other parsers mark the
            // `|` line, so both are tried.
            Style::Block => [0, 1]
                .iter()
                .filter_map(|d| {
                    let line = node.pos.line as usize + d + text_line;
                    let src = self.lines.get(line.checked_sub(1)?)?;
                    Some((line, src.chars().take_while(|c| *c == ' ').count() + 1))
                })
                .collect(),
        };
        for (src_line, src_col) in candidates {
            let Some(src) = src_line.checked_sub(1).and_then(|l| self.lines.get(l)) else {
                continue;
            };
            let rest: String = src.chars().skip(src_col - 1).collect();
            if rest.starts_with(this_line) {
                return Pos::new(src_line, src_col + col_in_line);
            }
        }
        node.pos
    }

    // -- ids and scopes ---------------------------------------------------------------------

    /// Records every id (first definition wins; duplicates are reported in file order by the
    /// decoder).
    fn collect_ids(&mut self, root: &Node) {
        let get = |n: &'_ Node, key: &str| -> Option<Node> {
            match &n.val {
                Val::Map(e) => e
                    .iter()
                    .find(|(k, _)| k.name == key)
                    .map(|(_, v)| v.clone()),
                _ => None,
            }
        };
        let id_of = |n: &Node| -> Option<(String, Pos)> {
            match get(n, "id")?.val {
                Val::String(s, _) => Some((s, get(n, "id")?.pos)),
                _ => None,
            }
        };
        let Some(Node {
            val: Val::Seq(steps),
            ..
        }) = get(root, "steps")
        else {
            return;
        };
        for (index, step) in steps.iter().enumerate() {
            let Some((id, pos)) = id_of(step) else {
                continue;
            };
            self.ids.entry(id.clone()).or_insert(IdInfo {
                pos,
                place: Place::Top { index },
            });
            if let Some(Node {
                val: Val::Seq(branches),
                ..
            }) = get(step, "parallel").and_then(|p| get(&p, "branches"))
            {
                for b in &branches {
                    if let Some((bid, bpos)) = id_of(b) {
                        self.ids.entry(bid).or_insert(IdInfo {
                            pos: bpos,
                            place: Place::Branch {
                                top: index,
                                parent: id.clone(),
                            },
                        });
                    }
                }
            }
            if get(step, "for_each").is_some()
                && let Some(Node {
                    val: Val::Seq(subs),
                    ..
                }) = get(step, "steps")
            {
                for (k, s) in subs.iter().enumerate() {
                    if let Some((sid, spos)) = id_of(s) {
                        self.ids.entry(sid).or_insert(IdInfo {
                            pos: spos,
                            place: Place::Sub {
                                top: index,
                                parent: id.clone(),
                                index: k,
                            },
                        });
                    }
                }
            }
        }
    }

    /// Checks an id's spelling and that it is the first definition.
    fn check_id(&self, node: &Node, what: &str) -> R<String> {
        let id = match &node.val {
            Val::String(s, _) => s.clone(),
            _ => {
                return Err(self.err(
                    node.pos,
                    format!("{what} `id` must be a string, found {}", node.kind_name()),
                ));
            }
        };
        if id.is_empty() || !id.chars().all(is_id_char) {
            return Err(self.err(
                node.pos,
                format!(
                    "step id `{id}` may only contain letters, digits, `_` and `-` (it is referenced as `${id}.stdout`)"
                ),
            ));
        }
        if let Some(first) = self.ids.get(&id)
            && first.pos != node.pos
        {
            return Err(self.err(
                node.pos,
                format!(
                    "duplicate step id `{id}` (first used at line {}); ids must be unique across the file, including parallel branches and for_each sub-steps",
                    first.pos.line
                ),
            ));
        }
        Ok(id)
    }

    fn target(&self, at: At<'_>, id: &str) -> RefTarget {
        if let At::Loop {
            item_var,
            index_var,
            ..
        } = at
            && (id == item_var || id == index_var)
        {
            return RefTarget::Visible;
        }
        let Some(info) = self.ids.get(id) else {
            return RefTarget::NotAStep;
        };
        let me = match at {
            At::Workflow => {
                return RefTarget::NotVisible(
                    "the workflow's own `env` and `cwd` apply to every step, so they cannot use a step's result; set the value on the steps that need it".into(),
                );
            }
            At::Top { id, .. } | At::Branch { id, .. } | At::Loop { id, .. } => id,
        };
        if me == id {
            return RefTarget::NotVisible("a step cannot use its own result".into());
        }
        let later = || {
            RefTarget::NotVisible(format!(
                "step `{id}` does not run before this one (it is defined at line {})",
                info.pos.line
            ))
        };
        let top = match at {
            At::Workflow => 0,
            At::Top { index, .. } | At::Branch { top: index, .. } | At::Loop { top: index, .. } => {
                index
            }
        };
        match &info.place {
            Place::Top { index } => {
                if *index < top {
                    RefTarget::Visible
                } else {
                    later()
                }
            }
            Place::Branch { top: t, parent } => {
                if *t < top {
                    RefTarget::Visible
                } else if *t == top && matches!(at, At::Branch { .. }) {
                    RefTarget::NotVisible(format!(
                        "the branches of `{parent}` run at the same time, so one cannot use another's result"
                    ))
                } else {
                    later()
                }
            }
            Place::Sub {
                top: t,
                parent,
                index,
            } => match at {
                At::Loop {
                    top, sub: Some(k), ..
                } if top == *t => {
                    if *index < k {
                        RefTarget::Visible
                    } else {
                        later()
                    }
                }
                _ => RefTarget::NotVisible(format!(
                    "`{id}` is a sub-step of the for_each step `{parent}` and its result exists only inside that loop; after the loop use `${parent}.json`"
                )),
            },
        }
    }

    fn template(&self, node: &Node, what: &str, dialect: Dialect, at: At<'_>) -> R<Template> {
        let text = self.string(node, what)?;
        let scope = Scope { loader: self, at };
        Template::compile(text, dialect, &scope).map_err(|e: TemplateError| {
            let chars = text.get(..e.offset).map_or(0, |s| s.chars().count());
            self.err(self.locate(node, chars), format!("{what}: {}", e.message))
        })
    }

    fn condition(&self, node: &Node, what: &str, at: At<'_>) -> R<Option<Condition>> {
        let cond = match &node.val {
            Val::Null => return Ok(None),
            Val::Bool(b) => return Ok(Some(Condition::literal(*b))),
            Val::String(text, _) => Condition::parse(text).map_err(|e| {
                self.err(
                    self.locate(node, e.at.saturating_sub(1)),
                    format!("{what}: invalid condition: {e}"),
                )
            })?,
            _ => {
                return Err(self.err(
                    node.pos,
                    format!(
                        "{what}: a condition must be a string or true/false, found {}",
                        node.kind_name()
                    ),
                ));
            }
        };
        for (r, at_char) in cond.ref_positions() {
            self.check_ref(node, r, at_char, what, at)?;
        }
        Ok(Some(cond))
    }

    /// A reference outside shell text (condition, stdin, for_each): it must name a step.
    fn check_ref(&self, node: &Node, r: &StepRef, at_char: usize, what: &str, at: At<'_>) -> R<()> {
        let pos = self.locate(node, at_char);
        match self.target(at, &r.step) {
            RefTarget::Visible => {}
            RefTarget::NotAStep => {
                return Err(self.err(
                    pos,
                    format!(
                        "{what}: `{r}` refers to `{}`, but there is no step with that id",
                        r.step
                    ),
                ));
            }
            RefTarget::NotVisible(why) => {
                return Err(self.err(pos, format!("{what}: `{r}`: {why}")));
            }
        }
        if !RESULT_FIELDS.contains(&r.field()) {
            return Err(self.err(
                pos,
                format!(
                    "{what}: `{r}`: a step result has no field `{}`; use one of {}",
                    r.field(),
                    RESULT_FIELDS.join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn env(&self, node: &Node, what: &str, at: At<'_>) -> R<Vec<EnvVar>> {
        let Val::Map(entries) = &node.val else {
            return Err(self.err(
                node.pos,
                format!(
                    "{what} must be a mapping of NAME: value, found {}",
                    node.kind_name()
                ),
            ));
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let valid = k
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(self.err(
                    k.pos,
                    format!(
                        "{what}: `{}` is not an environment variable name (letters, digits and `_`, not starting with a digit)",
                        k.name
                    ),
                ));
            }
            if !matches!(v.val, Val::String(..)) {
                return Err(self.err(
                    v.pos,
                    format!(
                        "{what}: the value of `{}` must be a string, found {}; quote it",
                        k.name,
                        v.kind_name()
                    ),
                ));
            }
            out.push(EnvVar {
                name: k.name.clone(),
                value: self.template(v, &format!("{what} `{}`", k.name), Dialect::Text, at)?,
            });
        }
        Ok(out)
    }

    fn stdin(&self, node: &Node, what: &str, at: At<'_>) -> R<Option<Stdin>> {
        Ok(match &node.val {
            Val::Null => None,
            Val::String(s, _) => match StepRef::parse_exact(s) {
                Some(r) => {
                    let lead = s.chars().take_while(|c| c.is_whitespace()).count();
                    self.check_ref(node, &r, lead, what, at)?;
                    Some(Stdin::Ref(r))
                }
                None => Some(Stdin::Text(self.template(node, what, Dialect::Text, at)?)),
            },
            _ => Some(Stdin::Json(node.to_json())),
        })
    }

    // -- the file ---------------------------------------------------------------------------

    fn workflow(&mut self, root: &Node) -> R<Workflow> {
        let mut f = self.fields(root, "a workflow file")?;
        // Arguments first: templates anywhere may use them.
        let mut args = Vec::new();
        if let Some(node) = f.node("args") {
            args = self.args_spec(node)?;
            self.args = args.iter().map(|a: &ArgSpec| a.name.clone()).collect();
        }
        let this = &*self;
        let name = f
            .node("name")
            .map(|n| this.string(n, "`name`"))
            .transpose()?;
        let description = f
            .node("description")
            .map(|n| this.string(n, "`description`"))
            .transpose()?;
        let env = match f.node("env") {
            Some(n) => this.env(n, "workflow `env`", At::Workflow)?,
            None => Vec::new(),
        };
        let cwd = f
            .node("cwd")
            .map(|n| this.template(n, "workflow `cwd`", Dialect::Text, At::Workflow))
            .transpose()?;
        let cost_limit = f
            .node("cost_limit")
            .map(|n| this.cost_limit(n))
            .transpose()?;
        let steps_node = f.take("steps");
        this.unknown(&f, "the workflow", TOP_FIELDS)?;
        let Some((_, steps_node)) = steps_node else {
            return Err(this.err(
                root.pos,
                "the workflow has no `steps:`; add a list of steps",
            ));
        };
        let Val::Seq(items) = &steps_node.val else {
            return Err(this.err(
                steps_node.pos,
                format!(
                    "`steps` must be a list of steps, found {}",
                    steps_node.kind_name()
                ),
            ));
        };
        if items.is_empty() {
            return Err(this.err(steps_node.pos, "`steps` is empty; add at least one step"));
        }
        let steps = items
            .iter()
            .enumerate()
            .map(|(i, n)| this.step(n, i))
            .collect::<R<Vec<_>>>()?;
        Ok(Workflow {
            file: this.file.to_string(),
            name: name.map(str::to_string),
            description: description.map(str::to_string),
            args: args.clone(),
            env,
            cwd,
            steps,
            cost_limit,
        })
    }

    fn args_spec(&self, node: &Node) -> R<Vec<ArgSpec>> {
        let Val::Map(entries) = &node.val else {
            return Err(self.err(
                node.pos,
                format!(
                    "`args` must be a mapping of name: {{default, description}}, found {}",
                    node.kind_name()
                ),
            ));
        };
        let mut out: Vec<ArgSpec> = Vec::new();
        let mut env_names: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in entries {
            if k.name.is_empty() || !k.name.chars().all(is_id_char) {
                return Err(self.err(
                    k.pos,
                    format!(
                        "argument name `{}` may only contain letters, digits, `_` and `-` (it is used as `${{{}}}`)",
                        k.name, k.name
                    ),
                ));
            }
            if let Some(env) = arg_env_name(&k.name)
                && let Some(other) = env_names.insert(env.clone(), k.name.clone())
            {
                return Err(self.err(
                    k.pos,
                    format!(
                        "arguments `{other}` and `{}` would both be `{env}` in the environment; rename one",
                        k.name
                    ),
                ));
            }
            let what = format!("argument `{}`", k.name);
            let (default, description) = match &v.val {
                Val::Null => (None, None),
                Val::Map(_) => {
                    let mut f = self.fields(v, &what)?;
                    let default = f.node("default").map(Node::to_json);
                    let description = f
                        .node("description")
                        .map(|n| self.string(n, &format!("{what} `description`")))
                        .transpose()?
                        .map(str::to_string);
                    self.unknown(&f, &what, &["default", "description"])?;
                    (default, description)
                }
                _ => {
                    return Err(self.err(
                        v.pos,
                        format!(
                            "{what} must be a mapping such as {{default: ..., description: ...}}, found {}",
                            v.kind_name()
                        ),
                    ));
                }
            };
            out.push(ArgSpec {
                name: k.name.clone(),
                default,
                description,
                pos: k.pos,
            });
        }
        Ok(out)
    }

    fn cost_limit(&self, node: &Node) -> R<CostLimit> {
        let mut f = self.fields(node, "`cost_limit`")?;
        let Some(max) = f.node("max_usd") else {
            return Err(self.err(
                node.pos,
                "`cost_limit` needs `max_usd` (a number of US dollars)",
            ));
        };
        let max_usd = match &max.val {
            Val::Number(n) => n.as_f64().filter(|v| *v >= 0.0),
            _ => None,
        }
        .ok_or_else(|| {
            self.err(
                max.pos,
                format!(
                    "`cost_limit.max_usd` must be a number of US dollars, 0 or more, found {}",
                    max.kind_name()
                ),
            )
        })?;
        let action = match f.node("action") {
            None => CostAction::Warn,
            Some(n) => match self.string(n, "`cost_limit.action`")? {
                "warn" => CostAction::Warn,
                "stop" => CostAction::Stop,
                other => {
                    return Err(self.err(
                        n.pos,
                        format!("`cost_limit.action` must be `warn` or `stop`, not `{other}`"),
                    ));
                }
            },
        };
        self.unknown(&f, "`cost_limit`", &["max_usd", "action"])?;
        Ok(CostLimit { max_usd, action })
    }

    // -- steps ------------------------------------------------------------------------------

    fn step(&self, node: &Node, index: usize) -> R<Step> {
        let mut f = self.fields(node, "a step")?;
        let Some(id_node) = f.node("id") else {
            return Err(self.err(node.pos, "a step needs an `id`"));
        };
        let id = self.check_id(id_node, "a step's")?;
        let what = format!("step `{id}`");
        // Every field, in file order, so errors come in file order too.
        let mut present: Vec<(&Key, &Node)> = Vec::new();
        for name in STEP_FIELDS.iter().filter(|n| **n != "id") {
            if let Some(kv) = f.take(name) {
                present.push(kv);
            }
        }
        self.unknown(&f, &what, STEP_FIELDS)?;
        present.sort_by_key(|(k, _)| k.pos);
        let get = |name: &str| present.iter().find(|(k, _)| k.name == name).copied();

        // The kind.
        if let (Some((rk, _)), Some((ck, _))) = (get("run"), get("command")) {
            return Err(self.err(
                rk.pos.max(ck.pos),
                format!("{what} has both `run` and `command`; they mean the same, keep one"),
            ));
        }
        let kinds: Vec<(&Key, &Node)> = present
            .iter()
            .filter(|(k, _)| EXEC_KINDS.contains(&k.name.as_str()))
            .copied()
            .collect();
        if let [first, second, ..] = kinds.as_slice() {
            return Err(self.err(
                second.0.pos,
                format!(
                    "{what} has both `{}` (line {}) and `{}`; a step does exactly one of {KINDS_TEXT}",
                    first.0.name, first.0.pos.line, second.0.name
                ),
            ));
        }
        let approval_node = get("approval");
        let approval = match approval_node {
            Some((_, n)) => self.approval(n, &what)?,
            None => None,
        };
        let input_node = get("input");
        if let (Some((ak, _)), Some((ik, _))) = (approval_node, input_node)
            && approval.is_some()
        {
            return Err(self.err(
                ak.pos.max(ik.pos),
                format!("{what} has both `approval` and `input`; a gate is one or the other"),
            ));
        }
        if let (Some((ik, _)), Some((k, _))) = (input_node, kinds.first()) {
            return Err(self.err(
                ik.pos.max(k.pos),
                format!(
                    "{what} has both `{}` and `input`; an input step is a pure gate and runs nothing",
                    k.name
                ),
            ));
        }

        let at = At::Top { index, id: &id };
        let kind_key = kinds.first().map(|(k, _)| k.name.as_str());
        let kind = match (kind_key, kinds.first()) {
            (Some("run" | "command"), Some((k, n))) => StepKind::Shell(self.template(
                n,
                &format!("{what} `{}`", k.name),
                Dialect::Shell,
                at,
            )?),
            (Some("pipeline"), Some((_, n))) => StepKind::Pipeline(self.template(
                n,
                &format!("{what} `pipeline`"),
                Dialect::Pipeline,
                at,
            )?),
            (Some("workflow"), Some((_, n))) => {
                let path = self.template(n, &format!("{what} `workflow`"), Dialect::Text, at)?;
                if path.source.trim().is_empty() {
                    return Err(self.err(
                        n.pos,
                        format!("{what} `workflow` is empty; name a workflow file"),
                    ));
                }
                let args = match get("workflow_args") {
                    Some((_, a)) => self.workflow_args(a, &what, at)?,
                    None => Vec::new(),
                };
                StepKind::Workflow(SubWorkflow { path, args })
            }
            (Some("parallel"), Some((_, n))) => {
                StepKind::Parallel(self.parallel(n, &what, index, &id)?)
            }
            (Some("for_each"), Some((_, n))) => {
                StepKind::ForEach(self.for_each(n, &what, index, &id, &get)?)
            }
            _ => match (approval.clone(), input_node) {
                (_, Some((_, n))) => StepKind::Input(self.input(n, &what)?),
                (Some(a), None) => StepKind::Approval(a),
                (None, None) => {
                    return Err(self.err(
                        node.pos,
                        format!("{what} does nothing; give it one of {KINDS_TEXT}"),
                    ));
                }
            },
        };

        // Fields that only mean something for some kinds.
        let kind_name = match &kind {
            StepKind::Approval(_) => "an approval gate".to_string(),
            StepKind::Input(_) => "an input gate".to_string(),
            other => format!("a `{}` step", other.name()),
        };
        let allowed: &[&str] = match &kind {
            StepKind::Shell(_) | StepKind::Pipeline(_) => &[
                "run",
                "command",
                "pipeline",
                "approval",
                "env",
                "cwd",
                "stdin",
                "when",
                "condition",
                "timeout_ms",
                "on_error",
                "retry",
            ],
            StepKind::Workflow(_) => &[
                "workflow",
                "workflow_args",
                "approval",
                "env",
                "cwd",
                "when",
                "condition",
                "timeout_ms",
                "on_error",
                "retry",
            ],
            StepKind::Parallel(_) => &[
                "parallel",
                "approval",
                "env",
                "cwd",
                "when",
                "condition",
                "timeout_ms",
                "on_error",
                "retry",
            ],
            StepKind::ForEach(_) => &[
                "for_each",
                "item_var",
                "index_var",
                "batch_size",
                "pause_ms",
                "steps",
                "env",
                "cwd",
                "when",
                "condition",
            ],
            StepKind::Approval(_) => &["approval", "stdin", "when", "condition"],
            StepKind::Input(_) => &["input", "stdin", "when", "condition"],
        };
        if let Some((k, _)) = present
            .iter()
            .find(|(k, _)| !allowed.contains(&k.name.as_str()))
        {
            let hint = match k.name.as_str() {
                "workflow_args" => "; it belongs to a `workflow` step".to_string(),
                "item_var" | "index_var" | "batch_size" | "pause_ms" | "steps" => {
                    "; it belongs to a `for_each` step".to_string()
                }
                "approval" if matches!(kind, StepKind::ForEach(_)) => {
                    "; put the approval in a separate step after the loop".to_string()
                }
                _ => String::new(),
            };
            return Err(self.err(
                k.pos,
                format!("{what}: `{}` has no meaning on {kind_name}{hint}", k.name),
            ));
        }

        let (when, condition) = (get("when"), get("condition"));
        if let (Some((a, _)), Some((b, _))) = (when, condition) {
            return Err(self.err(
                a.pos.max(b.pos),
                format!("{what} has both `when` and `condition`; they mean the same, keep one"),
            ));
        }
        let when = match when.or(condition) {
            Some((_, n)) => self.condition(n, &what, at)?,
            None => None,
        };
        let env_at = match &kind {
            StepKind::ForEach(fe) => At::Loop {
                top: index,
                sub: None,
                id: &id,
                item_var: &fe.item_var,
                index_var: &fe.index_var,
            },
            _ => at,
        };
        let env = match get("env") {
            Some((_, n)) => self.env(n, &format!("{what} `env`"), env_at)?,
            None => Vec::new(),
        };
        let cwd = get("cwd")
            .map(|(_, n)| self.template(n, &format!("{what} `cwd`"), Dialect::Text, env_at))
            .transpose()?;
        let stdin = match get("stdin") {
            Some((_, n)) => self.stdin(n, &format!("{what} `stdin`"), at)?,
            None => None,
        };
        let timeout_ms = get("timeout_ms")
            .map(|(_, n)| self.integer(n, &format!("{what} `timeout_ms`"), 1, MAX_TIMEOUT_MS))
            .transpose()?
            .and_then(|v| u32::try_from(v).ok());
        let on_error = match get("on_error") {
            None => OnError::Stop,
            Some((_, n)) => match self.string(n, &format!("{what} `on_error`"))? {
                "stop" => OnError::Stop,
                "continue" => OnError::Continue,
                "skip_rest" => OnError::SkipRest,
                other => {
                    return Err(self.err(
                        n.pos,
                        format!("{what} `on_error` must be `stop`, `continue` or `skip_rest`, not `{other}`"),
                    ));
                }
            },
        };
        let retry = get("retry")
            .map(|(_, n)| self.retry(n, &what))
            .transpose()?;
        let approval = match &kind {
            StepKind::Approval(_) => None,
            _ => approval,
        };
        Ok(Step {
            id: id.clone(),
            pos: id_node.pos,
            kind,
            approval,
            env,
            cwd,
            stdin,
            when,
            timeout_ms,
            on_error,
            retry,
        })
    }

    fn workflow_args(&self, node: &Node, what: &str, at: At<'_>) -> R<Vec<(String, ArgValue)>> {
        let Val::Map(entries) = &node.val else {
            return Err(self.err(
                node.pos,
                format!(
                    "{what} `workflow_args` must be a mapping, found {}",
                    node.kind_name()
                ),
            ));
        };
        entries
            .iter()
            .map(|(k, v)| {
                let value = match &v.val {
                    Val::String(..) => ArgValue::Text(self.template(
                        v,
                        &format!("{what} `workflow_args.{}`", k.name),
                        Dialect::Text,
                        at,
                    )?),
                    _ => ArgValue::Json(v.to_json()),
                };
                Ok((k.name.clone(), value))
            })
            .collect()
    }

    fn approval(&self, node: &Node, what: &str) -> R<Option<Approval>> {
        let mut a = Approval {
            pos: node.pos,
            ..Approval::default()
        };
        match &node.val {
            Val::Bool(false) | Val::Null => return Ok(None),
            Val::Bool(true) => {}
            Val::String(s, _) if s == "required" => {}
            Val::String(s, _) if s.trim().is_empty() => {
                return Err(self.err(
                    node.pos,
                    format!("{what} `approval` is an empty prompt; write `approval: true` for the default prompt, or remove it"),
                ));
            }
            Val::String(s, _) => a.prompt = Some(s.clone()),
            Val::Map(_) => {
                let w = format!("{what} `approval`");
                let mut f = self.fields(node, &w)?;
                let mut pick = |snake: &str, camel: &str| -> R<Option<&Node>> {
                    match (f.take(snake), f.take(camel)) {
                        (Some(_), Some((k, _))) => Err(self.err(
                            k.pos,
                            format!(
                                "{w} has both `{snake}` and `{camel}`; they mean the same, keep one"
                            ),
                        )),
                        (Some((_, n)), None) | (None, Some((_, n))) => Ok(Some(n)),
                        (None, None) => Ok(None),
                    }
                };
                let initiated = pick("initiated_by", "initiatedBy")?;
                let required = pick("required_approver", "requiredApprover")?;
                let different = pick("require_different_approver", "requireDifferentApprover")?;
                let prompt = f.node("prompt");
                let items = f.node("items");
                let preview = f.node("preview");
                self.unknown(
                    &f,
                    &w,
                    &[
                        "prompt",
                        "items",
                        "preview",
                        "initiated_by",
                        "required_approver",
                        "require_different_approver",
                    ],
                )?;
                a.prompt = prompt
                    .map(|n| self.string(n, &format!("{w} `prompt`")))
                    .transpose()?
                    .map(str::to_string);
                a.preview = preview
                    .map(|n| self.string(n, &format!("{w} `preview`")))
                    .transpose()?
                    .map(str::to_string);
                a.items = match items {
                    None => None,
                    Some(n) => match n.to_json() {
                        Value::Array(v) => Some(v),
                        _ => {
                            return Err(self.err(
                                n.pos,
                                format!("{w} `items` must be a list, found {}", n.kind_name()),
                            ));
                        }
                    },
                };
                a.initiated_by = initiated
                    .map(|n| self.string(n, &format!("{w} `initiated_by`")))
                    .transpose()?
                    .map(str::to_string);
                a.required_approver = required
                    .map(|n| self.string(n, &format!("{w} `required_approver`")))
                    .transpose()?
                    .map(str::to_string);
                a.require_different_approver = different
                    .map(|n| self.boolean(n, &format!("{w} `require_different_approver`")))
                    .transpose()?
                    .unwrap_or(false);
            }
            _ => {
                return Err(self.err(
                    node.pos,
                    format!(
                        "{what} `approval` must be true, \"required\", a prompt, or a mapping {{prompt, items, preview, required_approver, require_different_approver}}, found {}",
                        node.kind_name()
                    ),
                ));
            }
        }
        Ok(Some(a))
    }

    fn input(&self, node: &Node, what: &str) -> R<InputRequest> {
        let w = format!("{what} `input`");
        let mut f = self.fields(node, &w)?;
        let prompt = f.node("prompt");
        let schema = f.node("responseSchema");
        let defaults = f.node("defaults").map(Node::to_json);
        self.unknown(&f, &w, &["prompt", "responseSchema", "defaults"])?;
        let Some(prompt) = prompt else {
            return Err(self.err(node.pos, format!("{w} needs a `prompt`")));
        };
        let prompt = self.string(prompt, &format!("{w} `prompt`"))?.to_string();
        let Some(schema) = schema else {
            return Err(self.err(
                node.pos,
                format!("{w} needs a `responseSchema` (a JSON Schema object)"),
            ));
        };
        if !matches!(schema.val, Val::Map(_)) {
            return Err(self.err(
                schema.pos,
                format!(
                    "{w} `responseSchema` must be a JSON Schema object, found {}",
                    schema.kind_name()
                ),
            ));
        }
        Ok(InputRequest {
            prompt,
            response_schema: schema.to_json(),
            defaults,
            pos: node.pos,
        })
    }

    fn retry(&self, node: &Node, what: &str) -> R<Retry> {
        let w = format!("{what} `retry`");
        let mut f = self.fields(node, &w)?;
        let mut r = Retry {
            max: 1,
            backoff: Backoff::Fixed,
            delay_ms: 1000,
            max_delay_ms: 30_000,
            jitter: false,
        };
        if let Some(n) = f.node("max") {
            r.max = u32::try_from(self.integer(n, &format!("{w} `max`"), 1, 1000)?).unwrap_or(1);
        }
        if let Some(n) = f.node("backoff") {
            r.backoff = match self.string(n, &format!("{w} `backoff`"))? {
                "fixed" => Backoff::Fixed,
                "exponential" => Backoff::Exponential,
                other => {
                    return Err(self.err(
                        n.pos,
                        format!("{w} `backoff` must be `fixed` or `exponential`, not `{other}`"),
                    ));
                }
            };
        }
        if let Some(n) = f.node("delay_ms") {
            r.delay_ms = self.integer(n, &format!("{w} `delay_ms`"), 0, MAX_TIMEOUT_MS)?;
        }
        if let Some(n) = f.node("max_delay_ms") {
            r.max_delay_ms = self.integer(n, &format!("{w} `max_delay_ms`"), 0, MAX_TIMEOUT_MS)?;
        }
        if let Some(n) = f.node("jitter") {
            r.jitter = self.boolean(n, &format!("{w} `jitter`"))?;
        }
        self.unknown(
            &f,
            &w,
            &["max", "backoff", "delay_ms", "max_delay_ms", "jitter"],
        )?;
        Ok(r)
    }

    fn action(&self, f: &mut Fields<'_>, what: &str, node: &Node, at: At<'_>) -> R<Action> {
        let run = f.take("run");
        let command = f.take("command");
        let pipeline = f.take("pipeline");
        let mut given: Vec<(&Key, &Node)> =
            [run, command, pipeline].into_iter().flatten().collect();
        given.sort_by_key(|(k, _)| k.pos);
        match given.as_slice() {
            [] => Err(self.err(node.pos, format!("{what} needs `run` (or `command`) or `pipeline`"))),
            [(k, n)] if k.name == "pipeline" => Ok(Action::Pipeline(self.template(
                n,
                &format!("{what} `pipeline`"),
                Dialect::Pipeline,
                at,
            )?)),
            [(k, n)] => Ok(Action::Shell(self.template(
                n,
                &format!("{what} `{}`", k.name),
                Dialect::Shell,
                at,
            )?)),
            [first, second, ..] => Err(self.err(
                second.0.pos,
                format!(
                    "{what} has both `{}` (line {}) and `{}`; it runs exactly one command or pipeline",
                    first.0.name, first.0.pos.line, second.0.name
                ),
            )),
        }
    }

    /// A branch's or sub-step's action and gate: a command or pipeline, optionally with
    /// `approval` after it, or only `approval`.
    fn action_or_gate(
        &self,
        f: &mut Fields<'_>,
        what: &str,
        node: &Node,
        at: At<'_>,
    ) -> R<(Option<Action>, Option<Approval>)> {
        let approval = match f.node("approval") {
            Some(n) => self.approval(n, what)?,
            None => None,
        };
        let has_action = ["run", "command", "pipeline"]
            .iter()
            .any(|k| f.entries.iter().any(|(key, _)| key.name == *k));
        if !has_action && approval.is_some() {
            return Ok((None, approval));
        }
        if !has_action {
            return Err(self.err(
                node.pos,
                format!("{what} needs `run` (or `command`), `pipeline` or `approval`"),
            ));
        }
        Ok((Some(self.action(f, what, node, at)?), approval))
    }

    fn parallel(&self, node: &Node, what: &str, index: usize, parent: &str) -> R<Parallel> {
        let w = format!("{what} `parallel`");
        let mut f = self.fields(node, &w)?;
        let wait = match f.node("wait") {
            None => Wait::All,
            Some(n) => match self.string(n, &format!("{w} `wait`"))? {
                "all" => Wait::All,
                "any" => Wait::Any,
                other => {
                    return Err(self.err(
                        n.pos,
                        format!("{w} `wait` must be `all` or `any`, not `{other}`"),
                    ));
                }
            },
        };
        let timeout_ms = f
            .node("timeout_ms")
            .map(|n| self.integer(n, &format!("{w} `timeout_ms`"), 1, MAX_TIMEOUT_MS))
            .transpose()?
            .and_then(|v| u32::try_from(v).ok());
        let branches = f.node("branches");
        self.unknown(&f, &w, &["wait", "timeout_ms", "branches"])?;
        let Some(Node {
            val: Val::Seq(items),
            pos,
        }) = branches
        else {
            return Err(self.err(
                branches.map_or(node.pos, |b| b.pos),
                format!("{w} needs `branches`: a list of branches, each with an `id` and `run` or `pipeline`"),
            ));
        };
        if items.is_empty() {
            return Err(self.err(*pos, format!("{w} `branches` is empty")));
        }
        let mut out = Vec::new();
        for b in items {
            let mut bf = self.fields(b, &format!("a branch of {what}"))?;
            let Some(id_node) = bf.node("id") else {
                return Err(self.err(b.pos, format!("a branch of {what} needs an `id`")));
            };
            let id = self.check_id(id_node, "a branch's")?;
            if id == parent {
                return Err(self.err(
                    id_node.pos,
                    format!("branch id `{id}` is the id of its own step; give it another"),
                ));
            }
            let bw = format!("branch `{id}` of {what}");
            let at = At::Branch {
                top: index,
                id: &id,
            };
            let (action, approval) = self.action_or_gate(&mut bf, &bw, b, at)?;
            let env = bf
                .node("env")
                .map(|n| self.env(n, &format!("{bw} `env`"), at))
                .transpose()?
                .unwrap_or_default();
            let cwd = bf
                .node("cwd")
                .map(|n| self.template(n, &format!("{bw} `cwd`"), Dialect::Text, at))
                .transpose()?;
            let stdin = match bf.node("stdin") {
                Some(n) => self.stdin(n, &format!("{bw} `stdin`"), at)?,
                None => None,
            };
            self.unknown(&bf, &bw, BRANCH_FIELDS)?;
            out.push(Branch {
                id: id.clone(),
                pos: id_node.pos,
                action,
                approval,
                env,
                cwd,
                stdin,
            });
        }
        Ok(Parallel {
            wait,
            timeout_ms,
            branches: out,
        })
    }

    fn for_each<'p>(
        &self,
        node: &Node,
        what: &str,
        index: usize,
        parent: &str,
        get: &dyn Fn(&str) -> Option<(&'p Key, &'p Node)>,
    ) -> R<ForEach> {
        let text = self.string(node, &format!("{what} `for_each`"))?;
        let Some(items) = StepRef::parse_exact(text) else {
            return Err(self.err(
                node.pos,
                format!("{what} `for_each` must be a step reference such as `$fetch.json` or `$fetch.json.items`"),
            ));
        };
        let lead = text.chars().take_while(|c| c.is_whitespace()).count();
        self.check_ref(
            node,
            &items,
            lead,
            &format!("{what} `for_each`"),
            At::Top { index, id: parent },
        )?;
        let var = |name: &str, default: &str| -> R<String> {
            match get(name) {
                None => Ok(default.to_string()),
                Some((_, n)) => {
                    let v = self.string(n, &format!("{what} `{name}`"))?;
                    if v.is_empty() || !v.chars().all(is_id_char) {
                        return Err(self.err(
                            n.pos,
                            format!(
                                "{what} `{name}` may only contain letters, digits, `_` and `-`"
                            ),
                        ));
                    }
                    if let Some(info) = self.ids.get(v) {
                        return Err(self.err(
                            n.pos,
                            format!(
                                "{what} `{name}` is `{v}`, which is also a step id (line {}); pick another name",
                                info.pos.line
                            ),
                        ));
                    }
                    Ok(v.to_string())
                }
            }
        };
        let item_var = var("item_var", "item")?;
        let index_var = var("index_var", "index")?;
        if item_var == index_var {
            let pos = get("index_var")
                .or(get("item_var"))
                .map_or(node.pos, |(k, _)| k.pos);
            return Err(self.err(
                pos,
                format!("{what}: `item_var` and `index_var` are both `{item_var}`"),
            ));
        }
        for (name, default) in [(&item_var, "item_var"), (&index_var, "index_var")] {
            if get(default).is_none()
                && let Some(info) = self.ids.get(name.as_str())
            {
                return Err(self.err(
                    info.pos,
                    format!(
                        "step id `{name}` is the default `{default}` of the for_each step `{parent}`; rename the step or set `{default}`"
                    ),
                ));
            }
        }
        let batch_size = get("batch_size")
            .map(|(_, n)| self.integer(n, &format!("{what} `batch_size`"), 1, u64::from(u32::MAX)))
            .transpose()?
            .and_then(|v| u32::try_from(v).ok());
        let pause_ms = get("pause_ms")
            .map(|(_, n)| self.integer(n, &format!("{what} `pause_ms`"), 0, MAX_TIMEOUT_MS))
            .transpose()?;
        let Some((_, steps_node)) = get("steps") else {
            return Err(self.err(
                node.pos,
                format!("{what} needs `steps`: the steps to run for each item"),
            ));
        };
        let Val::Seq(subs) = &steps_node.val else {
            return Err(self.err(
                steps_node.pos,
                format!(
                    "{what} `steps` must be a list, found {}",
                    steps_node.kind_name()
                ),
            ));
        };
        if subs.is_empty() {
            return Err(self.err(steps_node.pos, format!("{what} `steps` is empty")));
        }
        let mut steps = Vec::new();
        for (k, s) in subs.iter().enumerate() {
            let mut sf = self.fields(s, &format!("a sub-step of {what}"))?;
            let Some(id_node) = sf.node("id") else {
                return Err(self.err(s.pos, format!("a sub-step of {what} needs an `id`")));
            };
            let id = self.check_id(id_node, "a sub-step's")?;
            if id == item_var || id == index_var {
                return Err(self.err(
                    id_node.pos,
                    format!("sub-step id `{id}` is a loop variable of {what}; rename it"),
                ));
            }
            let sw = format!("sub-step `{id}` of {what}");
            let at = At::Loop {
                top: index,
                sub: Some(k),
                id: &id,
                item_var: &item_var,
                index_var: &index_var,
            };
            // Kinds a loop body cannot hold get a specific message.
            for bad in ["input", "workflow", "parallel", "for_each", "steps"] {
                if let Some((key, _)) = sf.take(bad) {
                    return Err(self.err(
                        key.pos,
                        format!("{sw}: a for_each body runs only commands, pipelines and approval gates, not `{bad}`; put it in a step before or after the loop"),
                    ));
                }
            }
            let (action, approval) = self.action_or_gate(&mut sf, &sw, s, at)?;
            let env = sf
                .node("env")
                .map(|n| self.env(n, &format!("{sw} `env`"), at))
                .transpose()?
                .unwrap_or_default();
            let cwd = sf
                .node("cwd")
                .map(|n| self.template(n, &format!("{sw} `cwd`"), Dialect::Text, at))
                .transpose()?;
            let stdin = match sf.node("stdin") {
                Some(n) => self.stdin(n, &format!("{sw} `stdin`"), at)?,
                None => None,
            };
            let when = sf.take("when");
            let condition = sf.take("condition");
            if let (Some((a, _)), Some((b, _))) = (when, condition) {
                return Err(self.err(
                    a.pos.max(b.pos),
                    format!("{sw} has both `when` and `condition`; they mean the same, keep one"),
                ));
            }
            let when = match when.or(condition) {
                Some((_, n)) => self.condition(n, &sw, at)?,
                None => None,
            };
            self.unknown(&sf, &sw, SUB_FIELDS)?;
            steps.push(SubStep {
                id: id.clone(),
                pos: id_node.pos,
                action,
                approval,
                env,
                cwd,
                stdin,
                when,
            });
        }
        Ok(ForEach {
            items,
            item_var,
            index_var,
            batch_size,
            pause_ms,
            steps,
        })
    }
}
