//! Checking an `input` gate's answer against its `responseSchema`.
//!
//! Lobster validates with Ajv (full JSON Schema). Chitin checks the subset workflow files use:
//! `type` (one or a list of `object`, `array`, `string`, `number`, `integer`, `boolean`,
//! `null`), `properties`, `required`, `additionalProperties` (a boolean or a schema), `items`,
//! `enum`, `const`, `minLength`, `maxLength`, `minimum`, `maximum`, `exclusiveMinimum`,
//! `exclusiveMaximum`, `minItems`, `maxItems`; annotations (`title`, `description`,
//! `default`, `examples`, `$schema`, `$id`, `$comment`, `format`) are ignored. A schema that
//! uses any other keyword is not guessed at: the answer is refused with the keyword's name,
//! so a check that cannot be made never passes silently.

use serde_json::{Map, Value};

const CHECKED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "enum",
    "const",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minItems",
    "maxItems",
];
const IGNORED: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "format",
];

/// Checks `value` against `schema`; the first problem found, as `path: what`.
pub fn check(schema: &Value, value: &Value) -> Result<(), String> {
    walk(schema, value, "response")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
        other => type_name(v) == other,
    }
}

fn num(s: &Map<String, Value>, k: &str) -> Option<f64> {
    s.get(k).and_then(Value::as_f64)
}

fn walk(schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    let s = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err(format!("{at}: no value is allowed here")),
        Value::Object(s) => s,
        _ => {
            return Err(format!(
                "{at}: the responseSchema here is not a schema object"
            ));
        }
    };
    if let Some(k) = s
        .keys()
        .find(|k| !CHECKED.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()))
    {
        return Err(format!(
            "{at}: the responseSchema uses `{k}`, which Chitin does not check; the answer is refused rather than accepted unchecked"
        ));
    }
    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(x) => vec![x.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !types.iter().any(|t| has_type(v, t)) {
            return Err(format!(
                "{at}: expected {}, got {}",
                types.join(" or "),
                type_name(v)
            ));
        }
    }
    if let Some(Value::Array(options)) = s.get("enum")
        && !options.contains(v)
    {
        return Err(format!(
            "{at}: must be one of {}",
            Value::Array(options.clone())
        ));
    }
    if let Some(c) = s.get("const")
        && c != v
    {
        return Err(format!("{at}: must be {c}"));
    }
    match v {
        Value::String(text) => {
            let n = text.chars().count() as f64;
            if num(s, "minLength").is_some_and(|m| n < m) {
                return Err(format!("{at}: shorter than minLength"));
            }
            if num(s, "maxLength").is_some_and(|m| n > m) {
                return Err(format!("{at}: longer than maxLength"));
            }
        }
        Value::Number(x) => {
            let x = x.as_f64().unwrap_or(f64::NAN);
            let bad = [
                ("minimum", num(s, "minimum").is_some_and(|m| x < m)),
                ("maximum", num(s, "maximum").is_some_and(|m| x > m)),
                (
                    "exclusiveMinimum",
                    num(s, "exclusiveMinimum").is_some_and(|m| x <= m),
                ),
                (
                    "exclusiveMaximum",
                    num(s, "exclusiveMaximum").is_some_and(|m| x >= m),
                ),
            ];
            if let Some((k, _)) = bad.iter().find(|(_, b)| *b) {
                return Err(format!("{at}: outside {k}"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as f64;
            if num(s, "minItems").is_some_and(|m| n < m) {
                return Err(format!("{at}: fewer items than minItems"));
            }
            if num(s, "maxItems").is_some_and(|m| n > m) {
                return Err(format!("{at}: more items than maxItems"));
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::Object(m) => {
            if let Some(Value::Array(req)) = s.get("required") {
                for r in req.iter().filter_map(Value::as_str) {
                    if !m.contains_key(r) {
                        return Err(format!("{at}: `{r}` is required"));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (k, x) in m {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => walk(ps, x, &format!("{at}.{k}"))?,
                    None => match s.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: `{k}` is not allowed"));
                        }
                        Some(extra @ Value::Object(_)) => {
                            walk(extra, x, &format!("{at}.{k}"))?;
                        }
                        _ => {}
                    },
                }
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;

    fn label_schema() -> Value {
        json!({"type": "object", "properties": {"label": {"type": "string", "enum": ["bug", "ci", "infra"]}}, "required": ["label"]})
    }

    #[test]
    fn an_answer_matching_the_schema_passes() {
        assert!(check(&label_schema(), &json!({"label": "ci"})).is_ok());
        assert!(check(&json!({"type": "integer", "minimum": 1}), &json!(3)).is_ok());
    }

    #[test]
    fn a_wrong_type_value_or_missing_field_is_refused_with_its_path() {
        let e = check(&label_schema(), &json!({"label": "rm -rf"})).unwrap_err();
        assert!(e.starts_with("response.label: must be one of"), "{e}");
        let e = check(&label_schema(), &json!({})).unwrap_err();
        assert_eq!(e, "response: `label` is required");
        let e = check(&label_schema(), &json!("ci")).unwrap_err();
        assert_eq!(e, "response: expected object, got string");
        let e = check(
            &json!({"type": "object", "additionalProperties": false}),
            &json!({"x": 1}),
        )
        .unwrap_err();
        assert_eq!(e, "response: `x` is not allowed");
    }

    #[test]
    fn a_keyword_chitin_does_not_check_refuses_the_answer() {
        let e = check(
            &json!({"type": "string", "pattern": "^[a-z]+$"}),
            &json!("abc"),
        )
        .unwrap_err();
        assert!(e.contains("`pattern`, which Chitin does not check"), "{e}");
    }
}
