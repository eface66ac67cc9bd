//! Step results and `$step.path` references: what conditions and templates read.
//!
//! A step's result has Lobster's fields: `id`, `stdout`, `json` (stdout parsed as JSON when it
//! parses), `approved`, `approvedBy`, `initiatedBy`, `response`, `subject`, `skipped`, `error`,
//! `errorMessage`. A reference `$id.field.more.path` names the step, one of those fields, then
//! walks into `json`/`response`/`subject` by object key or array index (`$list.json.items.0`).
//! A path that leads nowhere is *undefined* (JavaScript's `undefined`, distinct from JSON
//! `null`): it renders as the empty string (`false` for `approved`/`skipped`) and is falsy in a
//! condition.

use std::collections::BTreeMap;

use serde_json::Value;

/// The fields of a step result, in the order of Lobster's `WorkflowStepResult`.
pub const RESULT_FIELDS: &[&str] = &[
    "id",
    "stdout",
    "json",
    "approved",
    "approvedBy",
    "initiatedBy",
    "response",
    "subject",
    "skipped",
    "error",
    "errorMessage",
];

/// Whether `c` may appear in a step id (and so in the `id` part of a reference).
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// Whether `c` may appear in a path segment of a reference.
pub fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A reference to a step result: `$step.field.path…`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepRef {
    /// The step id (or a `for_each` loop variable).
    pub step: String,
    /// The field (`stdout`, `json`, ...) followed by keys/indexes; never empty.
    pub path: Vec<String>,
}

impl StepRef {
    /// Reads a reference at the start of `s` (which starts with `$`), Lobster's grammar
    /// `\$[A-Za-z0-9_-]+\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*`. Returns it and its length in bytes.
    pub fn parse_prefix(s: &str) -> Option<(StepRef, usize)> {
        let rest = s.strip_prefix('$')?;
        let id_len = rest.find(|c: char| !is_id_char(c)).unwrap_or(rest.len());
        if id_len == 0 {
            return None;
        }
        let step = &rest[..id_len];
        let mut i = id_len;
        let mut path = Vec::new();
        while rest[i..].starts_with('.') {
            let seg = &rest[i + 1..];
            let len = seg.find(|c: char| !is_path_char(c)).unwrap_or(seg.len());
            if len == 0 {
                break;
            }
            path.push(seg[..len].to_string());
            i += 1 + len;
        }
        if path.is_empty() {
            return None;
        }
        Some((
            StepRef {
                step: step.to_string(),
                path,
            },
            1 + i,
        ))
    }

    /// A whole string that is exactly one reference (surrounding blanks ignored).
    pub fn parse_exact(s: &str) -> Option<StepRef> {
        let t = s.trim();
        match Self::parse_prefix(t) {
            Some((r, len)) if len == t.len() => Some(r),
            _ => None,
        }
    }

    /// The field the reference reads (`stdout`, `json`, ...).
    pub fn field(&self) -> &str {
        self.path.first().map_or("", String::as_str)
    }

    /// Whether an undefined value renders as `false` rather than the empty string (Lobster:
    /// exactly the paths `approved` and `skipped`).
    pub fn renders_false_when_undefined(&self) -> bool {
        self.path.len() == 1 && matches!(self.path[0].as_str(), "approved" | "skipped")
    }
}

impl std::fmt::Display for StepRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${}.{}", self.step, self.path.join("."))
    }
}

/// What a step produced. Every field is optional: a skipped step has only `skipped`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepResult {
    pub stdout: Option<String>,
    pub json: Option<Value>,
    pub approved: Option<bool>,
    pub approved_by: Option<String>,
    pub initiated_by: Option<String>,
    pub response: Option<Value>,
    pub subject: Option<Value>,
    pub skipped: Option<bool>,
    pub error: Option<bool>,
    pub error_message: Option<String>,
}

impl StepResult {
    /// The result of a step whose condition was false.
    pub fn skipped() -> Self {
        Self {
            skipped: Some(true),
            ..Self::default()
        }
    }

    /// The result of a command: its stdout and, when stdout parses as JSON, that value.
    pub fn from_stdout(stdout: String) -> Self {
        let json = serde_json::from_str(stdout.trim()).ok();
        Self {
            stdout: Some(stdout),
            json,
            ..Self::default()
        }
    }

    /// The result's value as JSON (Lobster's field names; absent fields left out).
    pub fn to_json(&self, id: &str) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), Value::String(id.into()));
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("stdout", self.stdout.clone().map(Value::String));
        put("json", self.json.clone());
        put("approved", self.approved.map(Value::Bool));
        put("approvedBy", self.approved_by.clone().map(Value::String));
        put("initiatedBy", self.initiated_by.clone().map(Value::String));
        put("response", self.response.clone());
        put("subject", self.subject.clone());
        put("skipped", self.skipped.map(Value::Bool));
        put("error", self.error.map(Value::Bool));
        put(
            "errorMessage",
            self.error_message.clone().map(Value::String),
        );
        Value::Object(m)
    }

    /// The value at `path` (field first), or `None` when it is undefined.
    pub fn get(&self, id: &str, path: &[String]) -> Option<Value> {
        let (field, rest) = path.split_first()?;
        let base = match field.as_str() {
            "id" => Value::String(id.to_string()),
            "stdout" => Value::String(self.stdout.clone()?),
            "json" => self.json.clone()?,
            "approved" => Value::Bool(self.approved?),
            "approvedBy" => Value::String(self.approved_by.clone()?),
            "initiatedBy" => Value::String(self.initiated_by.clone()?),
            "response" => self.response.clone()?,
            "subject" => self.subject.clone()?,
            "skipped" => Value::Bool(self.skipped?),
            "error" => Value::Bool(self.error?),
            "errorMessage" => Value::String(self.error_message.clone()?),
            _ => return None,
        };
        walk(&base, rest).cloned()
    }
}

/// Follows `path` into `value`: object keys, and array indexes written as decimal integers.
pub fn walk<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = value;
    for seg in path {
        cur = match cur {
            Value::Array(items) => {
                // JavaScript's `Number(seg)`: "01" is index 1 too.
                let i: usize = seg.parse().ok()?;
                items.get(i)?
            }
            Value::Object(m) => m.get(seg)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// A reference named a step that has no result yet (a workflow that passed validation can only
/// get here when a step before it did not run, e.g. after `on_error: skip_rest`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{reference}` refers to step `{step}`, which has no result (it has not run)")]
pub struct MissingResult {
    pub reference: String,
    pub step: String,
}

/// The results of the steps run so far, by step id (loop variables included inside a
/// `for_each` body).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    map: BTreeMap<String, StepResult>,
}

impl Results {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, id: impl Into<String>, result: StepResult) {
        self.map.insert(id.into(), result);
    }

    pub fn get(&self, id: &str) -> Option<&StepResult> {
        self.map.get(id)
    }

    /// The value a reference reads: `Ok(None)` when undefined, an error when its step has no
    /// result.
    pub fn lookup(&self, r: &StepRef) -> Result<Option<Value>, MissingResult> {
        let res = self.map.get(&r.step).ok_or_else(|| MissingResult {
            reference: r.to_string(),
            step: r.step.clone(),
        })?;
        Ok(res.get(&r.step, &r.path))
    }

    /// The results a `for_each` iteration sees: these plus the loop variables (Lobster: the
    /// item as `json` and, as `stdout`, itself when a string else its JSON text; the index as
    /// `json` and its decimal text).
    pub fn for_iteration(
        &self,
        item_var: &str,
        item: &Value,
        index_var: &str,
        index: usize,
    ) -> Self {
        let mut scoped = self.clone();
        let stdout = match item {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        scoped.insert(
            item_var,
            StepResult {
                stdout: Some(stdout),
                json: Some(item.clone()),
                ..StepResult::default()
            },
        );
        scoped.insert(
            index_var,
            StepResult {
                stdout: Some(index.to_string()),
                json: Some(Value::from(index)),
                ..StepResult::default()
            },
        );
        scoped
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;

    #[test]
    fn references_follow_lobsters_grammar() {
        let (r, len) = StepRef::parse_prefix("$build-1.json.items.0 rest").unwrap();
        assert_eq!(r.step, "build-1");
        assert_eq!(r.path, ["json", "items", "0"]);
        assert_eq!(len, "$build-1.json.items.0".len());
        assert_eq!(r.to_string(), "$build-1.json.items.0");
        assert!(StepRef::parse_prefix("$build").is_none());
        assert!(StepRef::parse_prefix("$.json").is_none());
        let (r, len) = StepRef::parse_prefix("$a.stdout.").unwrap();
        assert_eq!((r.path.len(), len), (1, 9));
        assert!(StepRef::parse_exact("  $a.json  ").is_some());
        assert!(StepRef::parse_exact("$a.json x").is_none());
    }

    #[test]
    fn lookups_walk_json_and_undefined_is_not_null() {
        let mut rs = Results::new();
        rs.insert(
            "a",
            StepResult::from_stdout(r#"{"items":[{"n":1}],"x":null}"#.into()),
        );
        let r = |s: &str| StepRef::parse_exact(s).unwrap();
        assert_eq!(rs.lookup(&r("$a.json.items.0.n")).unwrap(), Some(json!(1)));
        assert_eq!(rs.lookup(&r("$a.json.x")).unwrap(), Some(Value::Null));
        assert_eq!(rs.lookup(&r("$a.json.missing")).unwrap(), None);
        assert_eq!(rs.lookup(&r("$a.approved")).unwrap(), None);
        assert_eq!(rs.lookup(&r("$a.stdout.length")).unwrap(), None);
        assert!(rs.lookup(&r("$b.stdout")).is_err());
    }

    #[test]
    fn loop_variables_are_results_with_json_and_stdout() {
        let rs = Results::new().for_iteration("item", &json!({"k": "v"}), "index", 2);
        let r = |s: &str| StepRef::parse_exact(s).unwrap();
        assert_eq!(rs.lookup(&r("$item.json.k")).unwrap(), Some(json!("v")));
        assert_eq!(
            rs.lookup(&r("$item.stdout")).unwrap(),
            Some(json!(r#"{"k":"v"}"#))
        );
        assert_eq!(rs.lookup(&r("$index.json")).unwrap(), Some(json!(2)));
    }
}
