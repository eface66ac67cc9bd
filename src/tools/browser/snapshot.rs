//! The accessibility-tree outline of a page (`Accessibility.getFullAXTree`): one line per
//! meaningful node, indented by depth, each with a ref (`e<backend node id>`) that `click`
//! and `type` accept. Refs are stable while the node lives in the page.

use std::collections::{HashMap, HashSet};

use serde_json::Value;

/// Roles that carry no meaning of their own (their children are shown in their place).
const SKIPPED: &[&str] = &[
    "none",
    "generic",
    "InlineTextBox",
    "LineBreak",
    "StaticText",
    "presentation",
    "ignored",
];

/// Lines kept in one outline.
pub const MAX_LINES: usize = 1500;
/// Characters of a name kept.
const MAX_NAME: usize = 200;

/// An outline and the backend node ids its refs name.
#[derive(Debug, Default)]
pub struct Outline {
    pub text: String,
    pub refs: HashSet<i64>,
    pub truncated: bool,
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k)
        .and_then(|x| x.get("value"))
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn quoted(t: &str) -> String {
    let one: String = t.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut: String = one.chars().take(MAX_NAME).collect();
    let more = if one.chars().count() > MAX_NAME {
        "…"
    } else {
        ""
    };
    format!("{:?}", format!("{cut}{more}"))
}

/// The ref of a backend node id.
pub fn ref_of(backend: i64) -> String {
    format!("e{backend}")
}

/// The backend node id of a ref (`e12` → 12).
pub fn backend_of(r: &str) -> Option<i64> {
    r.strip_prefix('e')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse().ok())
}

/// Builds the outline of `Accessibility.getFullAXTree`'s `nodes`.
pub fn outline(nodes: &[Value]) -> Outline {
    let by_id: HashMap<&str, &Value> = nodes
        .iter()
        .filter_map(|n| n.get("nodeId").and_then(Value::as_str).map(|id| (id, n)))
        .collect();
    let mut out = Outline::default();
    let Some(root) = nodes
        .iter()
        .find(|n| n.get("parentId").is_none())
        .or_else(|| nodes.first())
    else {
        return out;
    };
    // Depth-first, iteratively (a hostile page can nest deeply).
    let mut stack: Vec<(&Value, usize)> = vec![(root, 0)];
    let mut lines = 0usize;
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some((n, depth)) = stack.pop() {
        if let Some(id) = n.get("nodeId").and_then(Value::as_str)
            && !seen.insert(id)
        {
            continue;
        }
        let ignored = n.get("ignored").and_then(Value::as_bool).unwrap_or(false);
        let role = s(n, "role");
        let name = s(n, "name");
        let shown = !ignored && !SKIPPED.contains(&role) && !role.is_empty();
        let child_depth = if shown { depth + 1 } else { depth };
        if shown {
            if lines >= MAX_LINES {
                out.truncated = true;
                break;
            }
            lines += 1;
            let mut line = format!("{}- {role}", "  ".repeat(depth.min(40)));
            if !name.is_empty() {
                line.push(' ');
                line.push_str(&quoted(name));
            }
            let value = s(n, "value");
            if !value.is_empty() {
                line.push_str(&format!(" value={}", quoted(value)));
            }
            if let Some(props) = n.get("properties").and_then(Value::as_array) {
                for p in props {
                    let pname = p.get("name").and_then(Value::as_str).unwrap_or("");
                    let pv = p.get("value").and_then(|v| v.get("value"));
                    match (pname, pv) {
                        ("checked", Some(v))
                            if v.as_str() == Some("true") || v == &Value::Bool(true) =>
                        {
                            line.push_str(" [checked]");
                        }
                        ("disabled", Some(Value::Bool(true))) => line.push_str(" [disabled]"),
                        ("level", Some(v)) if v.is_number() => {
                            line.push_str(&format!(" [level={v}]"));
                        }
                        _ => {}
                    }
                }
            }
            if let Some(b) = n.get("backendDOMNodeId").and_then(Value::as_i64) {
                out.refs.insert(b);
                line.push_str(&format!(" [ref={}]", ref_of(b)));
            }
            out.text.push_str(&line);
            out.text.push('\n');
        }
        if let Some(kids) = n.get("childIds").and_then(Value::as_array) {
            for k in kids.iter().rev() {
                if let Some(c) = k.as_str().and_then(|id| by_id.get(id)) {
                    stack.push((c, child_depth));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_outline_names_roles_and_refs_and_skips_generic_containers() {
        let nodes = vec![
            json!({"nodeId": "1", "role": {"value": "RootWebArea"}, "name": {"value": "Shop"}, "childIds": ["2"], "backendDOMNodeId": 1}),
            json!({"nodeId": "2", "parentId": "1", "role": {"value": "generic"}, "childIds": ["3", "4", "5"], "backendDOMNodeId": 7}),
            json!({"nodeId": "3", "parentId": "2", "role": {"value": "link"}, "name": {"value": "Next  page"}, "backendDOMNodeId": 12}),
            json!({"nodeId": "4", "parentId": "2", "role": {"value": "textbox"}, "name": {"value": "Query"}, "value": {"value": "abc"}, "backendDOMNodeId": 13}),
            json!({"nodeId": "5", "parentId": "2", "ignored": true, "role": {"value": "button"}, "backendDOMNodeId": 14}),
        ];
        let o = outline(&nodes);
        assert_eq!(
            o.text,
            "- RootWebArea \"Shop\" [ref=e1]\n  - link \"Next page\" [ref=e12]\n  - textbox \"Query\" value=\"abc\" [ref=e13]\n"
        );
        assert!(o.refs.contains(&12) && o.refs.contains(&13) && !o.refs.contains(&14));
        assert_eq!(backend_of("e12"), Some(12));
        assert_eq!(backend_of("e"), None);
        assert_eq!(backend_of("x12"), None);
        assert_eq!(backend_of("e1x"), None);
    }
}
