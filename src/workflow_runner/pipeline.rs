//! Lobster pipelines: `stage --flag value ... | stage ...`, items flowing between stages as
//! JSON values.
//!
//! The text is split and tokenized as Lobster's `parser.ts` does (stages on `|` outside
//! quotes; `'...'`, `"..."` with `\"`, `\\`, `\$`, `` \` `` escapes, bare words), with one
//! difference that closes an injection: every character of a token is known to come either
//! from the file or from a substituted value (`${arg}`, `$step.path`; see
//! `Template::render_marked`). A token that does not *start* with two literal dashes is never
//! a flag, so a value such as `--delete` stays a value; a flag's name never comes from a
//! value; and [`Word::substituted`] tells a stage (`exec --shell`) that a value is inside.
//!
//! The pure stages of Lobster's standard library are here ([`run_pure`]): `json`, `where`,
//! `pick`, `head`, `sort`, `dedupe`, `map`, `template`. The stages with effects (`exec`,
//! `llm.invoke`, `chitin.invoke`) run in the engine, each through the gate.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;

use serde_json::{Map, Value, json};

use crate::workflows::template::{js_json, render_value};

/// One word of a stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    pub text: String,
    /// Some character of it came from a substituted value.
    pub substituted: bool,
}

/// A flag's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flag {
    /// `--name` alone.
    On,
    Value(Word),
}

/// One stage: its name, positional words and flags (in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    pub name: String,
    pub positional: Vec<Word>,
    pub flags: Vec<(String, Flag)>,
}

impl Stage {
    /// The value of `--name`, if given with one.
    pub fn flag(&self, name: &str) -> Option<&Word> {
        self.flags.iter().rev().find_map(|(k, v)| match v {
            Flag::Value(w) if k == name => Some(w),
            _ => None,
        })
    }

    /// Whether `--name` was given (alone or with a value).
    pub fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(k, _)| k == name)
    }

    /// Refuses flags other than `known`.
    pub fn only_flags(&self, known: &[&str]) -> Result<(), String> {
        match self
            .flags
            .iter()
            .find(|(k, _)| !known.contains(&k.as_str()))
        {
            Some((k, _)) => Err(format!(
                "pipeline stage `{}` does not take --{k}{}",
                self.name,
                if known.is_empty() {
                    String::new()
                } else {
                    format!(" (it takes --{})", known.join(", --"))
                }
            )),
            None => Ok(()),
        }
    }
}

/// A character of the rendered text and whether a substituted value supplied it.
#[derive(Clone, Copy)]
struct Ch {
    c: char,
    sub: bool,
}

fn chars(text: &str, marks: &[Range<usize>]) -> Vec<Ch> {
    text.char_indices()
        .map(|(i, c)| Ch {
            c,
            sub: marks.iter().any(|m| m.contains(&i)),
        })
        .collect()
}

/// Stages split on `|` outside quotes (Lobster's `splitPipes`).
fn split_pipes(input: &[Ch]) -> Result<Vec<Vec<Ch>>, String> {
    let mut parts = Vec::new();
    let mut cur: Vec<Ch> = Vec::new();
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < input.len() {
        let ch = input[i];
        if let Some(q) = quote {
            if ch.c == '\\'
                && let Some(n) = input.get(i + 1)
            {
                cur.push(ch);
                cur.push(*n);
                i += 2;
                continue;
            }
            cur.push(ch);
            if ch.c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if ch.c == '"' || ch.c == '\'' {
            quote = Some(ch.c);
            cur.push(ch);
        } else if ch.c == '|' {
            parts.push(trim(std::mem::take(&mut cur)));
        } else {
            cur.push(ch);
        }
        i += 1;
    }
    if quote.is_some() {
        return Err("the pipeline has an unclosed quote".into());
    }
    let last = trim(cur);
    if !last.is_empty() {
        parts.push(last);
    }
    Ok(parts)
}

fn trim(mut v: Vec<Ch>) -> Vec<Ch> {
    while v.last().is_some_and(|c| c.c.is_whitespace()) {
        v.pop();
    }
    let start = v
        .iter()
        .position(|c| !c.c.is_whitespace())
        .unwrap_or(v.len());
    v.drain(..start);
    v
}

/// One token: its characters (quotes removed, escapes applied).
type Token = Vec<Ch>;

/// Lobster's `tokenizeCommand`.
fn tokenize(input: &[Ch]) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut cur: Token = Vec::new();
    let mut started = false;
    let mut quote: Option<char> = None;
    let mut i = 0;
    let ws = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r');
    while i < input.len() {
        let ch = input[i];
        match quote {
            Some('\'') => {
                if ch.c == '\\' && input.get(i + 1).is_some_and(|n| n.c == '\'') {
                    cur.push(input[i + 1]);
                    i += 2;
                    continue;
                }
                if ch.c == '\'' {
                    quote = None;
                } else {
                    cur.push(ch);
                }
            }
            Some(_) => {
                if ch.c == '\\' {
                    match input.get(i + 1) {
                        Some(n) if matches!(n.c, '"' | '\\' | '$' | '`') => {
                            cur.push(*n);
                            i += 2;
                            continue;
                        }
                        Some(n) if n.c == '\n' => {
                            i += 2;
                            continue;
                        }
                        _ => cur.push(ch),
                    }
                } else if ch.c == '"' {
                    quote = None;
                } else {
                    cur.push(ch);
                }
            }
            None => {
                if ch.c == '"' || ch.c == '\'' {
                    quote = Some(ch.c);
                    started = true;
                } else if ws(ch.c) {
                    if started || !cur.is_empty() {
                        tokens.push(std::mem::take(&mut cur));
                    }
                    started = false;
                } else {
                    cur.push(ch);
                    started = true;
                }
            }
        }
        i += 1;
    }
    if quote.is_some() {
        return Err("the pipeline has an unclosed quote".into());
    }
    if started || !cur.is_empty() {
        tokens.push(cur);
    }
    // Lobster drops empty tokens ("" alone is nothing).
    Ok(tokens.into_iter().filter(|t| !t.is_empty()).collect())
}

fn word(t: &[Ch]) -> Word {
    Word {
        text: t.iter().map(|c| c.c).collect(),
        substituted: t.iter().any(|c| c.sub),
    }
}

fn is_flag(t: &[Ch]) -> bool {
    t.len() >= 2 && t[..2].iter().all(|c| c.c == '-' && !c.sub)
}

/// Parses rendered pipeline text; `marks` are the byte ranges substituted values occupy.
/// `exec` stops reading flags at its first positional word (what follows is the command's own
/// argv, `-x` and `--y` included).
pub fn parse(text: &str, marks: &[Range<usize>]) -> Result<Vec<Stage>, String> {
    let all = chars(text, marks);
    let stages = split_pipes(&all)?;
    if stages.is_empty() {
        return Err("the pipeline is empty".into());
    }
    let mut out = Vec::new();
    for s in stages {
        let tokens = tokenize(&s)?;
        let Some((name, rest)) = tokens.split_first() else {
            return Err("a pipeline stage is empty".into());
        };
        let name_w = word(name);
        if name_w.substituted {
            return Err(format!(
                "the pipeline stage name `{}` comes from a substituted value; a stage must be named in the file",
                name_w.text
            ));
        }
        let exec_like = name_w.text == "exec";
        // Flags that never take a value (Lobster's parser would read `exec --json gh pr list`
        // as `--json gh`).
        let switches: &[&str] = match name_w.text.as_str() {
            "exec" => &["json"],
            "sort" => &["desc"],
            "chitin.invoke" => &["each"],
            _ => &[],
        };
        let mut positional = Vec::new();
        let mut flags = Vec::new();
        let mut i = 0;
        while i < rest.len() {
            let t = &rest[i];
            if is_flag(t) && (!exec_like || positional.is_empty()) {
                let body = &t[2..];
                let (key, value): (&[Ch], Option<&[Ch]>) =
                    match body.iter().position(|c| c.c == '=') {
                        Some(eq) => (&body[..eq], Some(&body[eq + 1..])),
                        None => (body, None),
                    };
                let key_w = word(key);
                if key_w.substituted || key_w.text.is_empty() {
                    return Err(format!(
                        "stage `{}`: a flag name must be written in the file, not come from a substituted value",
                        name_w.text
                    ));
                }
                let v = match value {
                    Some(v) => Flag::Value(word(v)),
                    None if switches.contains(&key_w.text.as_str()) => Flag::On,
                    None => match rest.get(i + 1) {
                        // A following literal `--x` is the next flag; a value that starts
                        // with `--` is still a value.
                        Some(n) if !is_flag(n) => {
                            i += 1;
                            Flag::Value(word(n))
                        }
                        _ => Flag::On,
                    },
                };
                flags.push((key_w.text, v));
            } else {
                positional.push(word(t));
            }
            i += 1;
        }
        out.push(Stage {
            name: name_w.text,
            positional,
            flags,
        });
    }
    Ok(out)
}

/// The pure stages this runner implements.
pub const PURE: &[&str] = &[
    "json", "where", "pick", "head", "sort", "dedupe", "map", "template",
];
/// The stages with effects, each decided by the gate.
pub const EFFECTFUL: &[&str] = &["exec", "llm.invoke", "chitin.invoke"];
/// The stages that wait for a person: the run pauses there and continues after them.
pub const GATES: &[&str] = &["approve", "ask"];
/// The stages over the workflow's own state (`state.db`, sealed, per owner and workflow).
pub const STATE: &[&str] = &["state.get", "state.set", "diff.last"];

/// What a pure stage produced: items for the next stage, and text it rendered (`json`).
pub struct PureOut {
    pub items: Vec<Value>,
    pub rendered: Option<String>,
}

/// Runs a pure stage over `items`.
pub fn run_pure(stage: &Stage, items: Vec<Value>) -> Result<PureOut, String> {
    let done = |v: Vec<Value>| PureOut {
        items: v,
        rendered: None,
    };
    match stage.name.as_str() {
        "json" => {
            stage.only_flags(&[])?;
            let text = serde_json::to_string_pretty(&Value::Array(items))
                .map_err(|e| format!("json: {e}"))?;
            Ok(PureOut {
                items: Vec::new(),
                rendered: Some(format!("{text}\n")),
            })
        }
        "where" => {
            stage.only_flags(&[])?;
            let expr = stage
                .positional
                .first()
                .ok_or("where needs an expression such as field=value")?;
            let (path, op, value) = predicate(&expr.text)?;
            Ok(done(
                items
                    .into_iter()
                    .filter(|it| compare(get_path(it, &path).as_ref(), op, &value))
                    .collect(),
            ))
        }
        "pick" => {
            stage.only_flags(&[])?;
            let spec = stage
                .positional
                .first()
                .ok_or("pick needs a comma-separated list of fields")?;
            let fields: Vec<&str> = spec
                .text
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .collect();
            Ok(done(
                items
                    .into_iter()
                    .map(|it| match &it {
                        Value::Object(m) => Value::Object(
                            fields
                                .iter()
                                .filter_map(|f| m.get(*f).map(|v| ((*f).to_string(), v.clone())))
                                .collect(),
                        ),
                        _ => it,
                    })
                    .collect(),
            ))
        }
        "head" => {
            stage.only_flags(&["n"])?;
            let n = match stage.flag("n") {
                None => 10,
                Some(w) => w
                    .text
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| "head --n must be a non-negative number".to_string())?,
            };
            Ok(done(items.into_iter().take(n).collect()))
        }
        "sort" => {
            stage.only_flags(&["key", "desc"])?;
            let key = stage.flag("key").map(|w| w.text.clone());
            let desc = stage.has("desc");
            let mut v: Vec<(usize, Value)> = items.into_iter().enumerate().collect();
            v.sort_by(|(ia, a), (ib, b)| {
                let (ka, kb) = match &key {
                    Some(k) => (get_path(a, k), get_path(b, k)),
                    None => (Some(a.clone()), Some(b.clone())),
                };
                let c = sort_cmp(ka.as_ref(), kb.as_ref());
                let c = if desc { c.reverse() } else { c };
                c.then(ia.cmp(ib))
            });
            Ok(done(v.into_iter().map(|(_, x)| x).collect()))
        }
        "dedupe" => {
            stage.only_flags(&["key"])?;
            let key = stage.flag("key").map(|w| w.text.clone());
            let mut seen = HashSet::new();
            Ok(done(
                items
                    .into_iter()
                    .filter(|it| {
                        let id = match &key {
                            Some(k) => get_path(it, k),
                            None => Some(it.clone()),
                        };
                        seen.insert(id.map_or_else(|| "undefined".to_string(), |v| js_json(&v)))
                    })
                    .collect(),
            ))
        }
        "map" => {
            stage.only_flags(&["wrap", "unwrap"])?;
            let wrap = stage.flag("wrap").map(|w| w.text.clone());
            let unwrap = stage.flag("unwrap").map(|w| w.text.clone());
            if wrap.is_some() && unwrap.is_some() {
                return Err("map cannot use both --wrap and --unwrap".into());
            }
            let assignments: Vec<(String, String)> = stage
                .positional
                .iter()
                .filter_map(|w| {
                    let (k, v) = w.text.split_once('=')?;
                    let k = k.trim();
                    (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
                })
                .collect();
            let mut out = Vec::new();
            for it in items {
                if let Some(u) = &unwrap {
                    match it.get(u) {
                        Some(v) => out.push(v.clone()),
                        // JavaScript's `undefined` passes through a stream as nothing useful;
                        // JSON has no undefined: null.
                        None => out.push(Value::Null),
                    }
                    continue;
                }
                let mut cur = match &wrap {
                    Some(w) => json!({ w.clone(): it.clone() }),
                    None => it.clone(),
                };
                if !assignments.is_empty() {
                    if !cur.is_object() {
                        cur = json!({ "value": cur });
                    }
                    if let Value::Object(m) = &mut cur {
                        for (k, v) in &assignments {
                            m.insert(k.clone(), Value::String(render_braces(v, &it)?));
                        }
                    }
                }
                out.push(cur);
            }
            Ok(done(out))
        }
        "template" => {
            stage.only_flags(&["text"])?;
            let text = match (stage.flag("text"), stage.positional.first()) {
                (Some(t), _) | (None, Some(t)) => t.text.clone(),
                (None, None) => {
                    return Err("template needs --text \"... {{field}} ...\"".into());
                }
            };
            let mut out = Vec::new();
            for it in &items {
                out.push(Value::String(render_braces(&text, it)?));
            }
            Ok(done(out))
        }
        other => Err(format!("`{other}` is not a pure stage")),
    }
}

/// `{{path}}` / `{{.}}` in `tpl` with values of `item` (strings as they are, other values as
/// JSON, missing as nothing), with Lobster's filters: `{{title | upper}}`,
/// `{{body | truncate 40}}`, `{{tags | join ", "}}`, `{{n | default "none"}}`. The filters are
/// Lobster's: upper, lower, trim, truncate N (default 80, `...` appended), replace "from" "to",
/// split SEP (default ","), first, last, length, join SEP (default ", "), json (indented),
/// string, default VALUE, round N, date FORMAT (`YYYY MM DD HH mm ss`, UTC; a number is epoch
/// milliseconds, a string RFC 3339). An unknown filter is an error naming it.
fn render_braces(tpl: &str, item: &Value) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = tpl;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let expr = after[..end].trim();
        let chain = split_filter_chain(expr);
        let path = chain.first().map_or("", String::as_str);
        let mut v = if path == "." || path == "this" {
            Some(item.clone())
        } else {
            get_path(item, path)
        };
        for f in chain.iter().skip(1) {
            v = apply_filter(v, f)?;
        }
        out.push_str(&render_value(v.as_ref()));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `path | f a | g` split on `|` outside quotes (Lobster's `splitFilterChain`).
fn split_filter_chain(expr: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = expr.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                cur.push(c);
                while let Some(d) = chars.next() {
                    cur.push(d);
                    if d == '\\' {
                        if let Some(e) = chars.next() {
                            cur.push(e);
                        }
                    } else if d == c {
                        break;
                    }
                }
            }
            '|' => parts.push(std::mem::take(&mut cur).trim().to_string()),
            _ => cur.push(c),
        }
    }
    parts.push(cur.trim().to_string());
    parts
}

/// `name arg "quoted arg"` (Lobster's `parseFilterExpression`).
fn filter_words(expr: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = expr.trim().chars().peekable();
    while let Some(&c) = chars.peek() {
        if c == ' ' {
            chars.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' || c == '\'' {
            chars.next();
            while let Some(d) = chars.next() {
                if d == '\\' {
                    if let Some(e) = chars.next() {
                        w.push(e);
                    }
                } else if d == c {
                    break;
                } else {
                    w.push(d);
                }
            }
        } else {
            while let Some(&d) = chars.peek() {
                if d == ' ' {
                    break;
                }
                w.push(d);
                chars.next();
            }
        }
        words.push(w);
    }
    words
}

/// A value as a filter reads text (`String(v ?? "")`; objects and lists as JSON).
fn text_of(v: Option<&Value>) -> String {
    render_value(v)
}

/// Applies one filter expression.
fn apply_filter(v: Option<Value>, expr: &str) -> Result<Option<Value>, String> {
    let words = filter_words(expr);
    let name = words.first().map_or("", String::as_str);
    let arg = |i: usize| words.get(i).map(String::as_str);
    let s = |t: String| Some(Value::String(t));
    Ok(match name {
        "upper" => s(text_of(v.as_ref()).to_uppercase()),
        "lower" => s(text_of(v.as_ref()).to_lowercase()),
        "trim" => s(text_of(v.as_ref()).trim().to_string()),
        "truncate" => {
            let t = text_of(v.as_ref());
            let n = arg(1).and_then(|a| a.parse::<usize>().ok()).unwrap_or(80);
            if t.chars().count() > n {
                s(format!("{}...", t.chars().take(n).collect::<String>()))
            } else {
                s(t)
            }
        }
        "replace" => s(text_of(v.as_ref()).replace(arg(1).unwrap_or(""), arg(2).unwrap_or(""))),
        "split" => {
            let t = text_of(v.as_ref());
            let sep = arg(1).unwrap_or(",");
            let parts: Vec<Value> = if sep.is_empty() {
                t.chars().map(|c| Value::String(c.to_string())).collect()
            } else {
                t.split(sep).map(|p| Value::String(p.to_string())).collect()
            };
            Some(Value::Array(parts))
        }
        "first" => match v {
            Some(Value::Array(a)) => a.into_iter().next(),
            other => other,
        },
        "last" => match v {
            Some(Value::Array(a)) => a.into_iter().last(),
            other => other,
        },
        "length" => Some(Value::from(match &v {
            Some(Value::Array(a)) => a.len(),
            Some(Value::String(t)) => t.encode_utf16().count(),
            _ => 0,
        })),
        "join" => match v {
            Some(Value::Array(a)) => s(a
                .iter()
                .map(|x| text_of(Some(x)))
                .collect::<Vec<_>>()
                .join(arg(1).unwrap_or(", "))),
            other => s(text_of(other.as_ref())),
        },
        "json" => s(
            serde_json::to_string_pretty(&v.unwrap_or(Value::Null)).map_err(|e| e.to_string())?
        ),
        "string" => s(text_of(v.as_ref())),
        "default" => match v {
            None | Some(Value::Null) => arg(1).map(|d| Value::String(d.to_string())),
            Some(Value::String(t)) if t.is_empty() => arg(1).map(|d| Value::String(d.to_string())),
            other => other,
        },
        "round" => {
            let n = match &v {
                Some(Value::Number(n)) => n.as_f64(),
                Some(Value::String(t)) => t.trim().parse::<f64>().ok(),
                _ => None,
            };
            match n {
                Some(x) if x.is_finite() => {
                    let dec = arg(1)
                        .and_then(|a| a.parse::<i32>().ok())
                        .unwrap_or(0)
                        .clamp(0, 15);
                    let f = 10f64.powi(dec);
                    let r = (x * f).round() / f;
                    Some(serde_json::Number::from_f64(r).map_or(Value::Null, Value::Number)).map(
                        |n| match n.as_f64() {
                            Some(x) if x.fract() == 0.0 && x.abs() < 9e15 => {
                                #[expect(
                                    clippy::cast_possible_truncation,
                                    reason = "checked whole and small"
                                )]
                                let i = x as i64;
                                Value::from(i)
                            }
                            _ => n,
                        },
                    )
                }
                _ => v,
            }
        }
        "date" => {
            let ms = match &v {
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(t))
                    if !t.trim().is_empty() && t.trim().bytes().all(|b| b.is_ascii_digit()) =>
                {
                    t.trim().parse::<i64>().ok()
                }
                Some(Value::String(t)) => crate::clock::parse_rfc3339(t.trim()),
                _ => None,
            };
            match ms {
                None => s(text_of(v.as_ref())),
                Some(ms) => match arg(1) {
                    // JavaScript's toISOString(): milliseconds, `Z`.
                    None => s(format!(
                        "{}.{:03}Z",
                        format_date(ms, "YYYY-MM-DDTHH:mm:ss"),
                        ms.rem_euclid(1000)
                    )),
                    Some(fmt) => s(format_date(ms, fmt)),
                },
            }
        }
        "" => return Err("an empty template filter (`{{x | }}`)".into()),
        other => {
            return Err(format!(
                "unknown template filter `{other}`; the filters are upper, lower, trim, truncate, replace, split, first, last, length, join, json, string, default, round, date"
            ));
        }
    })
}

/// Lobster's date format: the first `YYYY`, `MM`, `DD`, `HH`, `mm`, `ss` replaced (UTC).
fn format_date(ms: i64, fmt: &str) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) else {
        return ms.to_string();
    };
    fmt.replacen("YYYY", &t.year().to_string(), 1)
        .replacen("MM", &format!("{:02}", u8::from(t.month())), 1)
        .replacen("DD", &format!("{:02}", t.day()), 1)
        .replacen("HH", &format!("{:02}", t.hour()), 1)
        .replacen("mm", &format!("{:02}", t.minute()), 1)
        .replacen("ss", &format!("{:02}", t.second()), 1)
}

/// A dot path into a value (`a.b.0`).
fn get_path(v: &Value, path: &str) -> Option<Value> {
    let mut cur = v;
    for p in path.split('.').filter(|p| !p.is_empty()) {
        cur = match cur {
            Value::Object(m) => m.get(p)?,
            Value::Array(a) => a.get(p.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur.clone())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

/// `field=value`, `a.b!=x`, `n>=3` (Lobster's `where`: the value `true`, `false`, `null` or a
/// number is typed, anything else a string).
fn predicate(expr: &str) -> Result<(String, Op, Value), String> {
    let bad = || format!("where: `{expr}` is not an expression such as field=value or n>=3");
    let path_len = expr
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
        .ok_or_else(bad)?;
    if path_len == 0 {
        return Err(bad());
    }
    let path = expr[..path_len].to_string();
    let rest = expr[path_len..].trim_start();
    let (op, len) = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("=", Op::Eq),
        ("<", Op::Lt),
        (">", Op::Gt),
    ]
    .iter()
    .find(|(s, _)| rest.starts_with(s))
    .map(|(s, o)| (*o, s.len()))
    .ok_or_else(bad)?;
    let raw = rest[len..].trim_start();
    if raw.is_empty() {
        return Err(bad());
    }
    let value = match raw {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        "null" => Value::Null,
        n => match crate::workflows::condition::js_number(n) {
            Some(f) if !n.trim().is_empty() => json!(f),
            _ => Value::String(n.to_string()),
        },
    };
    Ok((path, op, value))
}

/// JavaScript's `Number(v)` for the values a `where` compares.
fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::Null => Some(0.0),
        Value::String(s) => crate::workflows::condition::js_number(s),
        _ => None,
    }
}

/// Lobster's comparison (JavaScript's loose `==` and relational operators, for JSON values;
/// an undefined left side equals only `null`).
fn compare(left: Option<&Value>, op: Op, right: &Value) -> bool {
    let loose_eq = || match (left, right) {
        (None, Value::Null) | (Some(Value::Null), Value::Null) => true,
        (None, _) | (Some(Value::Null), _) | (_, Value::Null) => false,
        (Some(Value::String(a)), Value::String(b)) => a == b,
        (Some(a @ (Value::Array(_) | Value::Object(_))), b) => js_json(a) == render_value(Some(b)),
        (Some(a), b) => match (as_number(a), as_number(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        },
    };
    match op {
        Op::Eq => loose_eq(),
        Op::Ne => !loose_eq(),
        _ => {
            let Some(l) = left else { return false };
            let ord = match (l, right) {
                (Value::String(a), Value::String(b)) => Some(a.cmp(b)),
                _ => match (as_number(l), as_number(right)) {
                    (Some(x), Some(y)) => x.partial_cmp(&y),
                    _ => None,
                },
            };
            match (ord, op) {
                (Some(o), Op::Lt) => o.is_lt(),
                (Some(o), Op::Le) => o.is_le(),
                (Some(o), Op::Gt) => o.is_gt(),
                (Some(o), Op::Ge) => o.is_ge(),
                _ => false,
            }
        }
    }
}

/// Lobster's `sort` order: undefined and null last, numbers by value, anything else by its
/// text.
fn sort_cmp(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let unset = |v: Option<&Value>| v.is_none_or(Value::is_null);
    match (unset(a), unset(b)) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        _ => render_value(a).cmp(&render_value(b)),
    }
}

/// Items for a pipeline's input (Lobster: a list gives its elements, `null` nothing, anything
/// else one item).
pub fn input_items(v: Option<Value>) -> Vec<Value> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => vec![other],
    }
}

/// A pipeline's stdout from its items (Lobster's `serializePipelineItemsToStdout`).
pub fn items_stdout(items: &[Value]) -> String {
    if items.is_empty() {
        return String::new();
    }
    if items.iter().all(Value::is_string) {
        return items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n");
    }
    if let [one] = items {
        return render_value(Some(one));
    }
    js_json(&Value::Array(items.to_vec()))
}

/// A JSON object of flags, for messages.
pub fn describe(stage: &Stage) -> Value {
    let mut m = Map::new();
    let flags: BTreeMap<&str, Value> = stage
        .flags
        .iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                match v {
                    Flag::On => Value::Bool(true),
                    Flag::Value(w) => Value::String(w.text.clone()),
                },
            )
        })
        .collect();
    m.insert("stage".into(), json!(stage.name));
    m.insert("flags".into(), json!(flags));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::single_range_in_vec_init,
        reason = "tests; a one-range list of marks is what a one-placeholder render gives"
    )]
    use super::*;

    fn p(text: &str) -> Vec<Stage> {
        parse(text, &[]).unwrap()
    }

    #[test]
    fn stages_split_on_pipes_outside_quotes_and_flags_take_values() {
        let s = p(r#"exec --json gh pr list | where state="open | closed" | head --n 3"#);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "exec");
        assert!(s[0].has("json"));
        assert_eq!(s[0].positional[0].text, "gh");
        assert_eq!(s[1].positional[0].text, "state=open | closed");
        assert_eq!(s[2].flag("n").unwrap().text, "3");
    }

    #[test]
    fn exec_stops_reading_flags_at_the_command() {
        let s = p("exec --stdin json jq -r --arg x .a");
        assert_eq!(s[0].flag("stdin").unwrap().text, "json");
        let argv: Vec<&str> = s[0].positional.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(argv, ["jq", "-r", "--arg", "x", ".a"]);
    }

    #[test]
    fn a_substituted_value_is_never_a_flag_or_a_flag_name() {
        // What `pipeline: head ${n}` renders when n = "--n=100000": a quoted value.
        let text = r#"head "--n=100000""#;
        let start = text.find('"').unwrap();
        let s = parse(text, &[start..text.len()]).unwrap();
        assert!(s[0].flags.is_empty());
        assert_eq!(s[0].positional[0].text, "--n=100000");
        assert!(s[0].positional[0].substituted);
        // A value after a literal flag stays that flag's value even when it starts with --.
        let text = r#"llm.invoke --prompt "--ignore previous""#;
        let start = text.find('"').unwrap();
        let s = parse(text, &[start..text.len()]).unwrap();
        assert_eq!(s[0].flag("prompt").unwrap().text, "--ignore previous");
        assert!(s[0].flag("prompt").unwrap().substituted);
        // A flag name cannot come from a value.
        let text = r#"--"x""#;
        let full = format!("head {text}");
        let e = parse(&full, &[7..full.len()]).unwrap_err();
        assert!(e.contains("flag name"), "{e}");
    }

    #[test]
    fn the_pure_stages_behave_as_lobsters() {
        let items = vec![
            json!({"id": 2, "n": "b", "ok": true}),
            json!({"id": 1, "n": "a", "ok": false}),
            json!({"id": 2, "n": "c", "ok": true}),
        ];
        let run = |t: &str| run_pure(&p(t)[0], items.clone()).unwrap().items;
        assert_eq!(run("where ok=true").len(), 2);
        assert_eq!(run("where id>=2").len(), 2);
        assert_eq!(run("pick id")[1], json!({"id": 1}));
        assert_eq!(run("head --n 1").len(), 1);
        assert_eq!(run("sort --key id")[0]["n"], "a");
        assert_eq!(run("sort --key n --desc")[0]["n"], "c");
        assert_eq!(run("dedupe --key id").len(), 2);
        assert_eq!(
            run("map --unwrap n"),
            vec![json!("b"), json!("a"), json!("c")]
        );
        assert_eq!(run("map tag={{n}}-{{id}}")[0]["tag"], "b-2");
        assert_eq!(run("template --text \"#{{id}} {{n}}\"")[0], "#2 b");
        let j = run_pure(&p("json")[0], items.clone()).unwrap();
        assert!(j.items.is_empty());
        assert!(j.rendered.unwrap().starts_with("[\n"));
        assert_eq!(run("template --text \"{{n | upper}}\"")[0], "B");
    }

    #[test]
    fn template_filters_behave_as_lobsters() {
        let item = json!({
            "title": "  Fix the Build  ", "tags": ["ci", "infra"], "n": 2.456, "empty": "",
            "when": 1_767_225_600_000_i64, "iso": "2026-01-01T00:00:00Z", "csv": "a;b;c",
            "body": "abcdefghij", "obj": {"k": 1},
        });
        let r = |tpl: &str| render_braces(tpl, &item).unwrap();
        assert_eq!(r("{{title | trim | upper}}"), "FIX THE BUILD");
        assert_eq!(r("{{title | lower | trim}}"), "fix the build");
        assert_eq!(r("{{tags | join}}"), "ci, infra");
        assert_eq!(r("{{tags | join \" + \"}}"), "ci + infra");
        assert_eq!(
            r("{{tags | first}}/{{tags | last}}/{{tags | length}}"),
            "ci/infra/2"
        );
        assert_eq!(r("{{body | truncate 4}}"), "abcd...");
        assert_eq!(r("{{body | truncate}}"), "abcdefghij");
        assert_eq!(r("{{body | replace 'cd' '-'}}"), "ab-efghij");
        assert_eq!(r("{{csv | split ; | last}}"), "c");
        assert_eq!(
            r("{{missing | default \"none\"}}|{{empty | default x}}"),
            "none|x"
        );
        assert_eq!(r("{{n | round 1}}|{{n | round}}"), "2.5|2");
        assert_eq!(r("{{when | date YYYY-MM-DD}}"), "2026-01-01");
        assert_eq!(r("{{iso | date \"DD.MM.YYYY HH:mm\"}}"), "01.01.2026 00:00");
        assert_eq!(r("{{when | date}}"), "2026-01-01T00:00:00.000Z");
        assert_eq!(r("{{obj | json}}"), "{\n  \"k\": 1\n}");
        assert_eq!(r("{{n | string}}"), "2.456");
        assert_eq!(r("{{title | length}}"), "17");
        let e = render_braces("{{title | shout}}", &item).unwrap_err();
        assert!(e.contains("unknown template filter `shout`"), "{e}");
    }
}
