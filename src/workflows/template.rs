//! Templates: `${arg}` and `$step.path` in workflow text, substituted without injection.
//!
//! Lobster splices values into command text raw (`run: echo ${msg}` with `msg = "; rm -rf ~"`
//! runs `rm`). Here a template is compiled once, when the file is loaded, into literal text and
//! placeholders, and the *quoting context* of every placeholder is worked out from the text
//! alone (it does not depend on any value). At run time each value is inserted as exactly one
//! correctly quoted word for that context and is never scanned again:
//!
//! | dialect | used for | placeholder outside quotes | inside `"..."` | inside `'...'` |
//! |---|---|---|---|---|
//! | [`Dialect::Shell`] (POSIX `sh`) | `run`/`command` | `'v'` | `"'v'"` (close, word, reopen) | `''v''` (close, word, reopen) |
//! | [`Dialect::Pipeline`] (Lobster pipeline words) | `pipeline` | `"v"` | `v` escaped | `'"v"'` |
//! | [`Dialect::Text`] | `env` values, `cwd`, `stdin`, `workflow`, `workflow_args` | the value as is (nothing parses it) | | |
//!
//! In shell text, `'v'` is the value with every `'` written `'\''`; a value can hold quotes,
//! newlines, `$()`, backticks, `;`, `*`: it stays one argument. In pipeline text, `\` and `"` are
//! escaped with `\`. A placeholder preceded by a backslash (`\${x}`) is literal text, as the
//! shell reads it. A placeholder in a shell comment is left as written (a comment never runs).
//!
//! Where the context cannot be known for sure, the template is refused when the file is loaded,
//! naming the placeholder and the reason: inside a here-document, inside backticks, inside a
//! `${var...}` expansion or `$(( ))`, and after constructs where shells disagree or a lexer
//! cannot follow (bash's `$'...'`, `case` inside `$(...)`, a `{` inside `${...}`, an unclosed
//! quote). The error says to use the environment instead: every argument is also in
//! `LOBSTER_ARG_<NAME>` and all of them in `LOBSTER_ARGS_JSON`.
//!
//! `${name}` is a placeholder only for a declared argument (`${HOME}` stays shell text), and
//! `$id.path` only when `id` is a step (`$HOME.bak` stays shell text); a step that exists but
//! is not earlier is an error. Values render as in Lobster: strings as they are, numbers and
//! booleans as text (integral numbers without a fraction), lists and objects as compact JSON,
//! `null` and undefined as the empty string (`false` for an undefined `approved`/`skipped`). A
//! value containing a NUL character is refused at render time (no argv or environment entry can
//! hold one).

use std::collections::BTreeMap;

use serde_json::Value;

use super::results::{MissingResult, Results, StepRef, is_id_char};

/// How a template's text is read, which decides how values are quoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// POSIX shell text run by `sh -c`.
    Shell,
    /// A Lobster pipeline (`cmd --flag value | cmd2 ...`).
    Pipeline,
    /// Text nobody parses (an environment value, a path, stdin).
    Text,
}

/// What a placeholder stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    Arg(String),
    Step(StepRef),
}

impl std::fmt::Display for Var {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Var::Arg(name) => write!(f, "${{{name}}}"),
            Var::Step(r) => write!(f, "{r}"),
        }
    }
}

/// The quoting context of a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    Unquoted,
    Double,
    Single,
    /// A shell comment: the placeholder is left as written.
    Comment,
    /// [`Dialect::Text`]: the value as is.
    Raw,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Slot { var: Var, ctx: Ctx, written: String },
}

/// A compiled template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// The text as written in the file.
    pub source: String,
    pub dialect: Dialect,
    parts: Vec<Part>,
}

/// How a `$id` seen in a template relates to the steps of the workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefTarget {
    /// A step (or loop variable) whose result exists when this template renders.
    Visible,
    /// A step of this workflow that is not earlier; the text says why.
    NotVisible(String),
    /// Not a step: the text is left as it is (shell variables such as `$HOME.bak`).
    NotAStep,
}

/// What a template may refer to, supplied by the loader.
pub trait Names {
    /// Whether `name` is a declared argument.
    fn is_arg(&self, name: &str) -> bool;
    /// What `$id` refers to at this point of the workflow.
    fn step(&self, id: &str) -> RefTarget;
}

/// A template that cannot be compiled. `offset` is the byte offset in the template text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
}

/// A template that cannot be rendered with the values at hand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("argument `{0}` has no value; pass it with --args-json or give it a default")]
    MissingArg(String),
    #[error(transparent)]
    MissingResult(#[from] MissingResult),
    #[error(
        "the value of `{0}` contains a NUL character, which no command line or environment can hold"
    )]
    Nul(String),
}

/// The values a template renders with.
#[derive(Debug, Clone, Copy)]
pub struct Vars<'a> {
    pub args: &'a BTreeMap<String, Value>,
    /// `None` at plan time: step references stay as written.
    pub results: Option<&'a Results>,
}

impl Template {
    /// Compiles `text`. Fails on a reference to a step that is not earlier, and in shell and
    /// pipeline text on a placeholder whose quoting context is not known for sure.
    pub fn compile(text: &str, dialect: Dialect, names: &dyn Names) -> Result<Self, TemplateError> {
        let mut find = |i: usize| find_placeholder(text, i, names);
        let slots = match dialect {
            Dialect::Shell => scan_shell(text, &mut find)?,
            Dialect::Pipeline => scan_pipeline(text, &mut find)?,
            Dialect::Text => scan_text(text, &mut find)?,
        };
        let mut parts = Vec::new();
        let mut at = 0;
        for s in slots {
            if s.start > at {
                parts.push(Part::Text(text[at..s.start].to_string()));
            }
            parts.push(Part::Slot {
                var: s.var,
                ctx: s.ctx,
                written: text[s.start..s.end].to_string(),
            });
            at = s.end;
        }
        if at < text.len() {
            parts.push(Part::Text(text[at..].to_string()));
        }
        Ok(Self {
            source: text.to_string(),
            dialect,
            parts,
        })
    }

    /// Every placeholder, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Slot { var, ctx, .. } if *ctx != Ctx::Comment => Some(var),
            _ => None,
        })
    }

    /// The step references among the placeholders.
    pub fn refs(&self) -> impl Iterator<Item = &StepRef> {
        self.vars().filter_map(|v| match v {
            Var::Step(r) => Some(r),
            Var::Arg(_) => None,
        })
    }

    /// Whether a render at plan time (no results) leaves step references as written.
    pub fn has_step_refs(&self) -> bool {
        self.refs().next().is_some()
    }

    /// The text with every placeholder replaced by its quoted value.
    pub fn render(&self, vars: Vars<'_>) -> Result<String, RenderError> {
        self.render_marked(vars).map(|(text, _)| text)
    }

    /// [`Template::render`], and where each inserted value lies in the result (byte ranges,
    /// the quoting inserted with it included), so that a reader of the text (a pipeline's
    /// tokenizer) can tell the words the file wrote from the words a value supplied.
    pub fn render_marked(
        &self,
        vars: Vars<'_>,
    ) -> Result<(String, Vec<std::ops::Range<usize>>), RenderError> {
        let mut marks = Vec::new();
        let mut out = String::with_capacity(self.source.len());
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Slot {
                    ctx: Ctx::Comment,
                    written,
                    ..
                } => out.push_str(written),
                Part::Slot { var, ctx, written } => {
                    let value = match var {
                        Var::Arg(name) => {
                            let v = vars
                                .args
                                .get(name)
                                .ok_or_else(|| RenderError::MissingArg(name.clone()))?;
                            render_value(Some(v))
                        }
                        Var::Step(r) => match vars.results {
                            None => {
                                out.push_str(written);
                                continue;
                            }
                            Some(rs) => {
                                let v = rs.lookup(r)?;
                                if v.is_none() && r.renders_false_when_undefined() {
                                    "false".to_string()
                                } else {
                                    render_value(v.as_ref())
                                }
                            }
                        },
                    };
                    if value.contains('\0') {
                        return Err(RenderError::Nul(var.to_string()));
                    }
                    let start = out.len();
                    insert(&mut out, &value, self.dialect, *ctx);
                    marks.push(start..out.len());
                }
            }
        }
        Ok((out, marks))
    }
}

/// A value as Lobster's `renderTemplateValue` writes it.
pub fn render_value(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => js_number_text(n),
        Some(other) => js_json(other),
    }
}

/// `JSON.stringify(v)`: compact, keys in their order, numbers as JavaScript writes them.
pub fn js_json(v: &Value) -> String {
    fn go(v: &Value, out: &mut String) {
        match v {
            Value::Number(n) => out.push_str(&js_number_text(n)),
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    go(item, out);
                }
                out.push(']');
            }
            Value::Object(m) => {
                out.push('{');
                for (i, (k, item)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push(':');
                    go(item, out);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    go(v, &mut out);
    out
}

/// A number as JavaScript's `String(n)` writes the common cases: integers without a fraction.
fn js_number_text(n: &serde_json::Number) -> String {
    if n.is_i64() || n.is_u64() {
        return n.to_string();
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e21 => format!("{f:.0}"),
        Some(f) => f.to_string(),
        None => n.to_string(),
    }
}

/// POSIX shell single quoting: `'` + the value with `'` as `'\''` + `'`.
pub fn shell_quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Lobster pipeline double-quoted content: `\` and `"` escaped.
fn pipeline_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn insert(out: &mut String, value: &str, dialect: Dialect, ctx: Ctx) {
    match (dialect, ctx) {
        (_, Ctx::Raw) | (Dialect::Text, _) => out.push_str(value),
        (_, Ctx::Comment) => {}
        (Dialect::Shell, Ctx::Unquoted) => out.push_str(&shell_quote(value)),
        (Dialect::Shell, Ctx::Double) => {
            out.push('"');
            out.push_str(&shell_quote(value));
            out.push('"');
        }
        (Dialect::Shell, Ctx::Single) => {
            out.push('\'');
            out.push_str(&shell_quote(value));
            out.push('\'');
        }
        (Dialect::Pipeline, Ctx::Unquoted) => {
            out.push('"');
            out.push_str(&pipeline_escape(value));
            out.push('"');
        }
        (Dialect::Pipeline, Ctx::Double) => out.push_str(&pipeline_escape(value)),
        (Dialect::Pipeline, Ctx::Single) => {
            out.push_str("'\"");
            out.push_str(&pipeline_escape(value));
            out.push_str("\"'");
        }
    }
}

/// The environment Lobster gives every step for the arguments: `LOBSTER_ARGS_JSON` (all of
/// them as a JSON object) and `LOBSTER_ARG_<NAME>` for each (the name uppercased, every run of
/// other characters than `A-Z0-9` made one `_`, leading/trailing `_` dropped; the value
/// rendered as in templates).
pub fn args_env(args: &BTreeMap<String, Value>, order: &[String]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut json = serde_json::Map::new();
    for name in order
        .iter()
        .chain(args.keys().filter(|k| !order.contains(k)))
    {
        if let Some(v) = args.get(name) {
            json.insert(name.clone(), v.clone());
            if let Some(key) = arg_env_name(name) {
                env.insert(key, render_value(Some(v)));
            }
        }
    }
    env.insert("LOBSTER_ARGS_JSON".into(), js_json(&Value::Object(json)));
    env
}

/// `LOBSTER_ARG_<NAME>` for an argument name, or `None` when nothing of it is left.
pub fn arg_env_name(name: &str) -> Option<String> {
    let mut out = String::new();
    let mut gap = false;
    for c in name.trim().chars() {
        let c = c.to_ascii_uppercase();
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            if gap && !out.is_empty() {
                out.push('_');
            }
            gap = false;
            out.push(c);
        } else {
            gap = true;
        }
    }
    (!out.is_empty()).then(|| format!("LOBSTER_ARG_{out}"))
}

// ---------------------------------------------------------------------------------------------
// Finding placeholders and their contexts

struct Slot {
    start: usize,
    end: usize,
    var: Var,
    ctx: Ctx,
}

type Finder<'a> = dyn FnMut(usize) -> Result<Option<(usize, Var)>, TemplateError> + 'a;

/// A placeholder starting at byte `i` (where `text[i] == '$'`): its end and what it is.
fn find_placeholder(
    text: &str,
    i: usize,
    names: &dyn Names,
) -> Result<Option<(usize, Var)>, TemplateError> {
    let rest = &text[i..];
    if let Some(inner) = rest.strip_prefix("${") {
        let len = inner.find(|c: char| !is_id_char(c)).unwrap_or(inner.len());
        if len > 0 && inner[len..].starts_with('}') && names.is_arg(&inner[..len]) {
            return Ok(Some((i + 3 + len, Var::Arg(inner[..len].to_string()))));
        }
        return Ok(None);
    }
    let Some((r, len)) = StepRef::parse_prefix(rest) else {
        return Ok(None);
    };
    match names.step(&r.step) {
        RefTarget::NotAStep => Ok(None),
        RefTarget::NotVisible(why) => Err(TemplateError {
            offset: i,
            message: format!("`{r}`: {why}"),
        }),
        RefTarget::Visible => {
            if !super::results::RESULT_FIELDS.contains(&r.field()) {
                return Err(TemplateError {
                    offset: i + 1 + r.step.len() + 1,
                    message: format!(
                        "`{r}`: a step result has no field `{}`; use one of {}",
                        r.field(),
                        super::results::RESULT_FIELDS.join(", ")
                    ),
                });
            }
            Ok(Some((i + len, Var::Step(r))))
        }
    }
}

fn scan_text(text: &str, find: &mut Finder<'_>) -> Result<Vec<Slot>, TemplateError> {
    let b = text.as_bytes();
    let mut slots = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$'
            && let Some((end, var)) = find(i)?
        {
            slots.push(Slot {
                start: i,
                end,
                var,
                ctx: Ctx::Raw,
            });
            i = end;
            continue;
        }
        i += 1;
    }
    Ok(slots)
}

fn unsupported(i: usize, var: &Var, reason: &str) -> TemplateError {
    let env_hint = match var {
        Var::Arg(name) => match arg_env_name(name) {
            Some(env) => format!("use \"${env}\" there instead"),
            None => "use $LOBSTER_ARGS_JSON there instead".into(),
        },
        Var::Step(_) => "pass the value on stdin or through a step `env` entry instead".into(),
    };
    TemplateError {
        offset: i,
        message: format!(
            "cannot substitute `{var}` {reason}: its quoting there cannot be guaranteed; {env_hint}"
        ),
    }
}

/// Lobster's pipeline tokenizer: `'...'` (no escapes we rely on), `"..."` with `\` escapes,
/// everything else literal.
fn scan_pipeline(text: &str, find: &mut Finder<'_>) -> Result<Vec<Slot>, TemplateError> {
    #[derive(PartialEq)]
    enum Q {
        No,
        Single,
        Double,
    }
    let b = text.as_bytes();
    let mut slots = Vec::new();
    let mut q = Q::No;
    let mut opaque: Option<&str> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'$'
            && let Some((end, var)) = find(i)?
        {
            if let Some(reason) = opaque {
                return Err(unsupported(i, &var, reason));
            }
            let ctx = match q {
                Q::No => Ctx::Unquoted,
                Q::Single => Ctx::Single,
                Q::Double => Ctx::Double,
            };
            slots.push(Slot {
                start: i,
                end,
                var,
                ctx,
            });
            i = end;
            continue;
        }
        if opaque.is_some() {
            i += 1;
            continue;
        }
        match (&q, c) {
            (Q::No, b'\'') => q = Q::Single,
            (Q::No, b'"') => q = Q::Double,
            (Q::Single, b'\\') => {
                opaque = Some(
                    "after a backslash inside single quotes (Lobster's pipeline splitter and tokenizer read it differently)",
                );
            }
            (Q::Single, b'\'') | (Q::Double, b'"') => q = Q::No,
            (Q::Double, b'\\') => i += 1,
            _ => {}
        }
        i += 1;
    }
    if q != Q::No
        && let Some(s) = slots.last()
    {
        return Err(unsupported(
            s.start,
            &s.var,
            "in a pipeline with an unclosed quote",
        ));
    }
    Ok(slots)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// Unquoted shell text at the top level.
    Top,
    /// Unquoted text inside `$( ... )`; `parens` counts `(` opened inside.
    Subst {
        parens: u32,
    },
    Double,
    Backtick,
    /// Inside `${ ... }` (not a plain `${name}`); `double` when the `${` was inside `"..."`.
    Param {
        double: bool,
    },
    /// Inside `$(( ... ))`.
    Arith {
        parens: u32,
    },
}

struct Heredoc {
    delim: Vec<u8>,
    strip_tabs: bool,
}

/// Follows POSIX `sh` quoting through `text` and records the context of every placeholder.
fn scan_shell(text: &str, find: &mut Finder<'_>) -> Result<Vec<Slot>, TemplateError> {
    let b = text.as_bytes();
    let mut slots: Vec<Slot> = Vec::new();
    let mut stack = vec![Frame::Top];
    let mut word_start = true;
    let mut heredocs: Vec<Heredoc> = Vec::new();
    let mut opaque: Option<&'static str> = None;
    let mut broken = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(reason) = opaque {
            if c == b'$'
                && let Some((_, var)) = find(i)?
            {
                return Err(unsupported(i, &var, reason));
            }
            i += 1;
            continue;
        }
        let frame = stack.last().copied().unwrap_or(Frame::Top);
        match frame {
            Frame::Top | Frame::Subst { .. } => match c {
                b'\\' => {
                    i += 2;
                    word_start = false;
                }
                b'\'' => {
                    let mut j = i + 1;
                    while j < b.len() && b[j] != b'\'' {
                        if b[j] == b'$'
                            && let Some((end, var)) = find(j)?
                        {
                            slots.push(Slot {
                                start: j,
                                end,
                                var,
                                ctx: Ctx::Single,
                            });
                            j = end;
                            continue;
                        }
                        j += 1;
                    }
                    if j >= b.len() {
                        broken = true;
                    }
                    i = j + 1;
                    word_start = false;
                }
                b'"' => {
                    stack.push(Frame::Double);
                    i += 1;
                    word_start = false;
                }
                b'`' => {
                    stack.push(Frame::Backtick);
                    i += 1;
                    word_start = false;
                }
                b'$' => {
                    i = dollar(
                        text,
                        i,
                        Ctx::Unquoted,
                        find,
                        &mut slots,
                        &mut stack,
                        &mut opaque,
                    )?;
                    word_start =
                        matches!(stack.last(), Some(Frame::Subst { .. })) && b[i - 1] == b'(';
                }
                b'#' if word_start => {
                    let mut j = i;
                    while j < b.len() && b[j] != b'\n' {
                        if b[j] == b'$'
                            && let Some((end, var)) = find(j)?
                        {
                            slots.push(Slot {
                                start: j,
                                end,
                                var,
                                ctx: Ctx::Comment,
                            });
                            j = end;
                            continue;
                        }
                        j += 1;
                    }
                    i = j;
                }
                b'\n' => {
                    i += 1;
                    word_start = true;
                    for h in std::mem::take(&mut heredocs) {
                        i = heredoc_body(b, i, &h, find)?;
                    }
                }
                b'<' if b.get(i + 1) == Some(&b'<') => {
                    if b.get(i + 2) == Some(&b'<') {
                        i += 3;
                        word_start = true;
                        continue;
                    }
                    match heredoc_operator(b, i + 2) {
                        Some((h, next)) => {
                            heredocs.push(h);
                            i = next;
                        }
                        None => {
                            opaque =
                                Some("after a here-document whose delimiter word cannot be read");
                            i += 2;
                        }
                    }
                    word_start = false;
                }
                b'(' => {
                    if let Some(Frame::Subst { parens }) = stack.last_mut() {
                        *parens += 1;
                    }
                    i += 1;
                    word_start = true;
                }
                b')' => {
                    // The `)` that ends `$(...)` continues the word it is part of (`$(a)#b`
                    // has no comment); any other `)` is an operator.
                    word_start = true;
                    match stack.last_mut() {
                        Some(Frame::Subst { parens: 0 }) => {
                            stack.pop();
                            word_start = false;
                        }
                        Some(Frame::Subst { parens }) => *parens -= 1,
                        _ => {}
                    }
                    i += 1;
                }
                b' ' | b'\t' | b';' | b'&' | b'|' | b'<' | b'>' => {
                    i += 1;
                    word_start = true;
                }
                _ => {
                    if word_start
                        && stack.iter().any(|f| matches!(f, Frame::Subst { .. }))
                        && b[i..].starts_with(b"case")
                        && b.get(i + 4)
                            .is_none_or(|d| !(d.is_ascii_alphanumeric() || *d == b'_'))
                    {
                        opaque = Some(
                            "after a `case` inside `$(...)` (its `)` patterns cannot be told from the end of the substitution)",
                        );
                    }
                    i += 1;
                    word_start = false;
                }
            },
            Frame::Double => match c {
                b'\\' => {
                    i += if matches!(b.get(i + 1), Some(b'$' | b'`' | b'"' | b'\\' | b'\n')) {
                        2
                    } else {
                        1
                    };
                }
                b'"' => {
                    stack.pop();
                    i += 1;
                }
                b'`' => {
                    stack.push(Frame::Backtick);
                    i += 1;
                }
                b'$' => {
                    i = dollar(
                        text,
                        i,
                        Ctx::Double,
                        find,
                        &mut slots,
                        &mut stack,
                        &mut opaque,
                    )?;
                    if matches!(stack.last(), Some(Frame::Subst { .. })) {
                        word_start = true;
                    }
                }
                _ => i += 1,
            },
            Frame::Backtick => match c {
                b'$' => {
                    if let Some((_, var)) = find(i)? {
                        return Err(unsupported(
                            i,
                            &var,
                            "inside backticks (write `$(...)` instead)",
                        ));
                    }
                    i += 1;
                }
                b'\\' => i += 2,
                b'`' => {
                    stack.pop();
                    i += 1;
                }
                _ => i += 1,
            },
            Frame::Param { double } => match c {
                b'$' => {
                    if let Some((_, var)) = find(i)? {
                        return Err(unsupported(i, &var, "inside a `${...}` expansion"));
                    }
                    i = dollar(
                        text,
                        i,
                        Ctx::Unquoted,
                        find,
                        &mut slots,
                        &mut stack,
                        &mut opaque,
                    )?;
                }
                b'\\' => i += 2,
                b'\'' if double => {
                    opaque = Some(
                        "after a single quote inside `${...}` inside double quotes (shells read it differently)",
                    );
                    i += 1;
                }
                b'\'' => {
                    let mut j = i + 1;
                    while j < b.len() && b[j] != b'\'' {
                        if b[j] == b'$'
                            && let Some((_, var)) = find(j)?
                        {
                            return Err(unsupported(j, &var, "inside a `${...}` expansion"));
                        }
                        j += 1;
                    }
                    if j >= b.len() {
                        broken = true;
                    }
                    i = j + 1;
                }
                b'"' => {
                    stack.push(Frame::Double);
                    i += 1;
                }
                b'`' => {
                    stack.push(Frame::Backtick);
                    i += 1;
                }
                b'{' => {
                    opaque = Some("after a `{` inside `${...}` (shells match braces differently)");
                    i += 1;
                }
                b'}' => {
                    stack.pop();
                    i += 1;
                }
                _ => i += 1,
            },
            Frame::Arith { parens } => match c {
                b'$' => {
                    if let Some((_, var)) = find(i)? {
                        return Err(unsupported(i, &var, "inside `$(( ))`"));
                    }
                    i = dollar(
                        text,
                        i,
                        Ctx::Unquoted,
                        find,
                        &mut slots,
                        &mut stack,
                        &mut opaque,
                    )?;
                }
                b'(' => {
                    if let Some(Frame::Arith { parens }) = stack.last_mut() {
                        *parens += 1;
                    }
                    i += 1;
                }
                b')' if parens == 0 => {
                    if b.get(i + 1) == Some(&b')') {
                        stack.pop();
                        i += 2;
                    } else {
                        opaque = Some("after a `$((` that is not arithmetic");
                        i += 1;
                    }
                }
                b')' => {
                    if let Some(Frame::Arith { parens }) = stack.last_mut() {
                        *parens -= 1;
                    }
                    i += 1;
                }
                b'\'' | b'"' | b'`' | b'\n' | b'#' | b';' | b'\\' => {
                    opaque = Some("after unusual text inside `$(( ))`");
                    i += 1;
                }
                _ => i += 1,
            },
        }
    }
    let clean = !broken && stack.len() == 1 && heredocs.is_empty();
    if opaque.is_none()
        && !clean
        && let Some(s) = slots.last()
    {
        return Err(unsupported(
            s.start,
            &s.var,
            "in a command with an unclosed quote, substitution or here-document",
        ));
    }
    Ok(slots)
}

/// Handles a `$` in unquoted or double-quoted text: a placeholder, the start of `$(`, `$((`,
/// `${`, or a plain `$`. Returns the index to continue at.
fn dollar(
    text: &str,
    i: usize,
    ctx: Ctx,
    find: &mut Finder<'_>,
    slots: &mut Vec<Slot>,
    stack: &mut Vec<Frame>,
    opaque: &mut Option<&'static str>,
) -> Result<usize, TemplateError> {
    let b = text.as_bytes();
    if let Some((end, var)) = find(i)? {
        slots.push(Slot {
            start: i,
            end,
            var,
            ctx,
        });
        return Ok(end);
    }
    Ok(match b.get(i + 1) {
        Some(b'(') if b.get(i + 2) == Some(&b'(') => {
            stack.push(Frame::Arith { parens: 0 });
            i + 3
        }
        Some(b'(') => {
            stack.push(Frame::Subst { parens: 0 });
            i + 2
        }
        Some(b'{') => match simple_param(b, i + 2) {
            Some(end) => end,
            None => {
                stack.push(Frame::Param {
                    double: ctx == Ctx::Double,
                });
                i + 2
            }
        },
        Some(b'\'') if ctx == Ctx::Unquoted => {
            *opaque = Some("after bash's `$'...'` quoting (POSIX sh reads it differently)");
            i + 1
        }
        _ => i + 1,
    })
}

/// `${name}`, `${10}`, `${#name}`, `${@}`...: a parameter with no nested word. Returns the index
/// after its `}`.
fn simple_param(b: &[u8], mut k: usize) -> Option<usize> {
    let name = |b: &[u8], k: usize| -> usize {
        let mut j = k;
        while b
            .get(j)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
        {
            j += 1;
        }
        j
    };
    if b.get(k) == Some(&b'#')
        && b.get(k + 1)
            .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
    {
        k += 1;
    }
    match b.get(k) {
        Some(c) if c.is_ascii_alphabetic() || *c == b'_' => k = name(b, k),
        Some(c) if c.is_ascii_digit() => {
            while b.get(k).is_some_and(u8::is_ascii_digit) {
                k += 1;
            }
        }
        Some(b'@' | b'*' | b'#' | b'?' | b'$' | b'!' | b'-') => k += 1,
        _ => return None,
    }
    (b.get(k) == Some(&b'}')).then_some(k + 1)
}

/// Reads the delimiter word after `<<` (or `<<-`). Returns the here-document and the index
/// after the word.
fn heredoc_operator(b: &[u8], mut j: usize) -> Option<(Heredoc, usize)> {
    let strip_tabs = b.get(j) == Some(&b'-');
    if strip_tabs {
        j += 1;
    }
    while matches!(b.get(j), Some(b' ' | b'\t')) {
        j += 1;
    }
    let mut delim = Vec::new();
    loop {
        match b.get(j) {
            None | Some(b' ' | b'\t' | b'\n' | b';' | b'&' | b'|' | b'(' | b')' | b'<' | b'>') => {
                break;
            }
            Some(b'\'') => {
                j += 1;
                while b.get(j)? != &b'\'' {
                    delim.push(b[j]);
                    j += 1;
                }
                j += 1;
            }
            Some(b'"') => {
                j += 1;
                loop {
                    match b.get(j)? {
                        b'"' => break,
                        b'\\' if matches!(b.get(j + 1), Some(b'\\' | b'"' | b'$' | b'`')) => {
                            delim.push(b[j + 1]);
                            j += 2;
                        }
                        b'$' | b'`' => return None,
                        c => {
                            delim.push(*c);
                            j += 1;
                        }
                    }
                }
                j += 1;
            }
            Some(b'\\') => {
                delim.push(*b.get(j + 1)?);
                j += 2;
            }
            Some(b'$' | b'`') => return None,
            Some(c) => {
                delim.push(*c);
                j += 1;
            }
        }
    }
    if delim.is_empty() {
        return None;
    }
    Some((Heredoc { delim, strip_tabs }, j))
}

/// Skips a here-document body starting at line start `i`; a placeholder inside is an error.
/// Returns the index after the delimiter line (or the end of the text).
fn heredoc_body(
    b: &[u8],
    mut i: usize,
    h: &Heredoc,
    find: &mut Finder<'_>,
) -> Result<usize, TemplateError> {
    while i < b.len() {
        let end = b[i..]
            .iter()
            .position(|c| *c == b'\n')
            .map_or(b.len(), |p| i + p);
        let mut line = &b[i..end];
        if h.strip_tabs {
            while line.first() == Some(&b'\t') {
                line = &line[1..];
            }
        }
        if line == h.delim.as_slice() {
            return Ok((end + 1).min(b.len()));
        }
        for (j, c) in b.iter().enumerate().take(end).skip(i) {
            if *c == b'$'
                && let Some((_, var)) = find(j)?
            {
                return Err(unsupported(j, &var, "inside a here-document"));
            }
        }
        i = end + 1;
    }
    Ok(b.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use serde_json::json;

    use super::*;
    use crate::workflows::results::StepResult;

    struct N;
    impl Names for N {
        fn is_arg(&self, name: &str) -> bool {
            matches!(name, "x" | "name" | "n")
        }
        fn step(&self, id: &str) -> RefTarget {
            match id {
                "a" => RefTarget::Visible,
                "later" => RefTarget::NotVisible("step `later` runs after this one".into()),
                _ => RefTarget::NotAStep,
            }
        }
    }

    fn args(v: Value) -> BTreeMap<String, Value> {
        v.as_object().unwrap().clone().into_iter().collect()
    }

    fn shell(text: &str, x: &str) -> String {
        let a = args(json!({ "x": x }));
        Template::compile(text, Dialect::Shell, &N)
            .unwrap()
            .render(Vars {
                args: &a,
                results: None,
            })
            .unwrap()
    }

    fn compile_err(text: &str) -> String {
        Template::compile(text, Dialect::Shell, &N)
            .unwrap_err()
            .message
    }

    /// Splits `text` the way `sh` would, by running it (the test's own shell, not the sandbox).
    fn argv_of(text: &str) -> Vec<String> {
        let script = format!("set -- {text}; for a in \"$@\"; do printf '%s\\0' \"$a\"; done");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let s = String::from_utf8(out.stdout).unwrap();
        let mut v: Vec<String> = s.split('\0').map(str::to_string).collect();
        v.pop();
        v
    }

    #[test]
    fn values_are_single_quoted_words_in_every_context() {
        assert_eq!(shell("echo ${x}", "a b"), "echo 'a b'");
        assert_eq!(
            shell("echo \"hi ${x}!\"", "it's"),
            "echo \"hi \"'it'\\''s'\"!\""
        );
        assert_eq!(shell("echo 'hi ${x}'", "v"), "echo 'hi ''v'''");
        assert_eq!(shell("echo \\${x}", "v"), "echo \\${x}");
        assert_eq!(shell("echo ${x} # ${x}", "v"), "echo 'v' # ${x}");
        assert_eq!(shell("echo ${HOME} ${x}", "v"), "echo ${HOME} 'v'");
        assert_eq!(shell("echo $(cat ${x})", "v"), "echo $(cat 'v')");
        assert_eq!(shell("echo \"$(cat ${x})\"", "v"), "echo \"$(cat 'v')\"");
        assert_eq!(shell("echo ${HOME:-/} ${x}", "v"), "echo ${HOME:-/} 'v'");
        assert_eq!(
            shell("cat <<EOF\nhello\nEOF\necho ${x}", "v"),
            "cat <<EOF\nhello\nEOF\necho 'v'"
        );
    }

    #[test]
    fn tricky_values_stay_one_argv_word() {
        let values = [
            "; touch /tmp/pwned #",
            "a b  c",
            "it's",
            "\"double\"",
            "line1\nline2",
            "$(id)",
            "`id`",
            "${HOME}",
            "*",
            "?[a]",
            "",
            "-n",
            "\\",
            "'",
            "'\\''",
            "&& echo bad || echo bad",
            "~",
            "a=b",
            "é日本",
        ];
        let templates = [
            ("${x}", 1),
            ("pre${x}post", 1),
            ("\"${x}\"", 1),
            ("\"in ${x} side\"", 1),
            ("'in ${x} side'", 1),
            ("${x} ${x}", 2),
            ("\"$(printf %s ${x})\"", 1),
        ];
        for v in values {
            for (t, words) in templates {
                let text = shell(t, v);
                let got = argv_of(&text);
                assert_eq!(got.len(), words, "{t} with {v:?} gave {text}: {got:?}");
                let expect = |w: &str| match t {
                    "pre${x}post" => format!("pre{w}post"),
                    "\"in ${x} side\"" | "'in ${x} side'" => format!("in {w} side"),
                    _ => w.to_string(),
                };
                for g in got {
                    assert_eq!(g, expect(v), "{t} with {v:?} gave {text}");
                }
            }
        }
    }

    #[test]
    fn placeholders_where_quoting_is_uncertain_are_refused() {
        let cases = [
            (
                "cat <<EOF\n${x}\nEOF",
                "cannot substitute `${x}` inside a here-document: its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo `cat ${x}`",
                "cannot substitute `${x}` inside backticks (write `$(...)` instead): its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo ${HOME:-${x}}",
                "cannot substitute `${x}` inside a `${...}` expansion: its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo $((${n} + 1))",
                "cannot substitute `${n}` inside `$(( ))`: its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_N\" there instead",
            ),
            (
                "echo $'a' ${x}",
                "cannot substitute `${x}` after bash's `$'...'` quoting (POSIX sh reads it differently): its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo $(case a in a) echo;; esac) ${x}",
                "cannot substitute `${x}` after a `case` inside `$(...)` (its `)` patterns cannot be told from the end of the substitution): its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo \"${x}",
                "cannot substitute `${x}` in a command with an unclosed quote, substitution or here-document: its quoting there cannot be guaranteed; use \"$LOBSTER_ARG_X\" there instead",
            ),
            (
                "echo $a.stdout `x",
                "cannot substitute `$a.stdout` in a command with an unclosed quote, substitution or here-document: its quoting there cannot be guaranteed; pass the value on stdin or through a step `env` entry instead",
            ),
            (
                "echo $later.stdout",
                "`$later.stdout`: step `later` runs after this one",
            ),
            (
                "echo $a.stdot",
                "`$a.stdot`: a step result has no field `stdot`; use one of id, stdout, json, approved, approvedBy, initiatedBy, response, subject, skipped, error, errorMessage",
            ),
        ];
        for (t, want) in cases {
            assert_eq!(compile_err(t), want, "{t}");
        }
        // The unclosed-backtick case is an error only because a placeholder precedes it.
        assert!(Template::compile("echo `x", Dialect::Shell, &N).is_ok());
    }

    #[test]
    fn words_comments_and_operators_are_told_apart_as_sh_does() {
        // `#` inside a word is not a comment; the quote after it opens a string.
        assert_eq!(
            shell("echo $(a)#' \n ${x} '", "v"),
            "echo $(a)#' \n ''v'' '"
        );
        assert_eq!(shell("echo a#b ${x}", "v"), "echo a#b 'v'");
        assert_eq!(shell("echo a #b ${x}", "v"), "echo a #b ${x}");
        assert_eq!(shell("echo $((1<<2)) ${x}", "v"), "echo $((1<<2)) 'v'");
        assert_eq!(
            shell("echo ${#} $# ${#HOME} ${x}", "v"),
            "echo ${#} $# ${#HOME} 'v'"
        );
        assert_eq!(
            shell("case $1 in a) echo ${x};; esac", "v"),
            "case $1 in a) echo 'v';; esac"
        );
        assert_eq!(
            shell("(cd / && echo ${x}) | cat", "v"),
            "(cd / && echo 'v') | cat"
        );
        assert_eq!(shell("echo $\"${x}\"", "v"), "echo $\"\"'v'\"\"");
        assert_eq!(
            shell("echo \"$(echo ')' \"${x}\")\"", "v"),
            "echo \"$(echo ')' \"\"'v'\"\")\""
        );
    }

    #[test]
    fn heredoc_bodies_are_skipped_to_their_delimiter() {
        assert_eq!(
            shell(
                "cat <<-'END' | tr a b\n\t$(not) ${HOME}\n\tEND\necho ${x}",
                "v"
            ),
            "cat <<-'END' | tr a b\n\t$(not) ${HOME}\n\tEND\necho 'v'"
        );
        assert!(compile_err("cat <<A <<B\nA\n${x}\nB\n").contains("here-document"));
    }

    #[test]
    fn step_references_render_from_results_or_stay_as_written_at_plan_time() {
        let t = Template::compile(
            "echo $a.json.n $a.approved $a.stdout $HOME.bak",
            Dialect::Shell,
            &N,
        )
        .unwrap();
        let empty = BTreeMap::new();
        assert_eq!(
            t.render(Vars {
                args: &empty,
                results: None
            })
            .unwrap(),
            "echo $a.json.n $a.approved $a.stdout $HOME.bak"
        );
        let mut rs = Results::new();
        rs.insert("a", StepResult::from_stdout("{\"n\": 2.0}".into()));
        assert_eq!(
            t.render(Vars {
                args: &empty,
                results: Some(&rs)
            })
            .unwrap(),
            "echo '2' 'false' '{\"n\": 2.0}' $HOME.bak"
        );
    }

    #[test]
    fn pipeline_values_are_one_pipeline_word() {
        let a = args(json!({ "x": "a \"b\" | c \\ d" }));
        let render = |t: &str| {
            Template::compile(t, Dialect::Pipeline, &N)
                .unwrap()
                .render(Vars {
                    args: &a,
                    results: None,
                })
                .unwrap()
        };
        assert_eq!(
            render("llm.invoke --prompt ${x}"),
            "llm.invoke --prompt \"a \\\"b\\\" | c \\\\ d\""
        );
        assert_eq!(
            render("llm.invoke --prompt \"Say ${x}\""),
            "llm.invoke --prompt \"Say a \\\"b\\\" | c \\\\ d\""
        );
        assert_eq!(
            render("x --p 'Say ${x}'"),
            "x --p 'Say '\"a \\\"b\\\" | c \\\\ d\"''"
        );
    }

    #[test]
    fn text_templates_substitute_values_as_they_are() {
        let a = args(json!({ "x": "; rm -rf ~", "n": 3 }));
        let t = Template::compile("${x}/${n}/${other}", Dialect::Text, &N).unwrap();
        assert_eq!(
            t.render(Vars {
                args: &a,
                results: None
            })
            .unwrap(),
            "; rm -rf ~/3/${other}"
        );
    }

    #[test]
    fn a_nul_character_in_a_value_is_refused() {
        let a = args(json!({ "x": "a\u{0}b" }));
        let t = Template::compile("echo ${x}", Dialect::Shell, &N).unwrap();
        assert_eq!(
            t.render(Vars {
                args: &a,
                results: None
            })
            .unwrap_err()
            .to_string(),
            "the value of `${x}` contains a NUL character, which no command line or environment can hold"
        );
    }

    #[test]
    fn argument_environment_names_follow_lobster() {
        assert_eq!(
            arg_env_name("my-arg.name").as_deref(),
            Some("LOBSTER_ARG_MY_ARG_NAME")
        );
        assert_eq!(arg_env_name("_x_").as_deref(), Some("LOBSTER_ARG_X"));
        assert_eq!(arg_env_name("--"), None);
        let a = args(json!({ "b": [1, 2], "a": 1.0 }));
        let env = args_env(&a, &["b".into(), "a".into()]);
        assert_eq!(env["LOBSTER_ARG_A"], "1");
        assert_eq!(env["LOBSTER_ARG_B"], "[1,2]");
        assert_eq!(env["LOBSTER_ARGS_JSON"], "{\"b\":[1,2],\"a\":1}");
    }
}
