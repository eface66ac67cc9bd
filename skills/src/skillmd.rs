//! `SKILL.md`: YAML front matter (`name`, `description`, optional `version`, `metadata`, ...)
//! between `---` lines, then Markdown instructions. Compatible with the AgentSkills/OpenClaw
//! layout: unknown top-level keys (`license`, `allowed-tools`, `homepage`, ...) are kept in
//! [`SkillMeta::extra`], requirements are read from `metadata.openclaw` or `metadata`.
//!
//! The front matter is at most 64 KiB; YAML aliases are refused (no alias expansion bombs).

use serde::Serialize;
use serde_json::{Map, Value};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::{Yaml, YamlLoader};

use crate::SkillError;

const MAX_FRONT_MATTER: usize = 64 * 1024;

/// What a skill needs from the host (informational: the gate and the sandbox decide).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Requirements {
    pub bins: Vec<String>,
    pub env: Vec<String>,
    pub os: Vec<String>,
}

/// The parsed front matter and the instructions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkillMeta {
    pub name: String,
    pub description: String,
    /// `version`, or `metadata.version`; `0.0.0` when absent.
    pub version: String,
    pub requires: Requirements,
    /// `metadata`, as JSON.
    pub metadata: Value,
    /// Other top-level keys, as JSON.
    pub extra: Map<String, Value>,
    /// The Markdown after the front matter: untrusted data for the model context.
    pub instructions: String,
}

fn bad(why: impl Into<String>) -> SkillError {
    SkillError::InvalidSkillMd(why.into())
}

/// Checks a skill name: 1 to 64 of `a-z`, `0-9` and `-`, not starting or ending with `-`,
/// no `--` (the AgentSkills rule; the name is also a directory name in the state dir).
pub fn check_name(name: &str) -> Result<(), SkillError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(bad(format!(
            "name {name:?} must be 1-64 characters of a-z, 0-9 and single hyphens"
        )))
    }
}

/// A version: `MAJOR.MINOR.PATCH` with an optional `-prerelease` of `[0-9A-Za-z.-]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    core: [u64; 3],
    pre: Option<String>,
}

impl Version {
    /// Parses `1.2.3` or `1.2.3-rc.1` (a leading `v` is refused: one spelling per version).
    pub fn parse(s: &str) -> Result<Self, SkillError> {
        let err = || bad(format!("version {s:?} must look like 1.2.3 or 1.2.3-rc.1"));
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (s, None),
        };
        let mut parts = core.split('.');
        let mut nums = [0u64; 3];
        for n in &mut nums {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty()
                || p.len() > 18
                || !p.bytes().all(|c| c.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(err());
            }
            *n = p.parse().map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        if let Some(p) = pre
            && (p.is_empty()
                || p.len() > 64
                || !p
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-'))
        {
            return Err(err());
        }
        Ok(Self {
            core: nums,
            pre: pre.map(str::to_string),
        })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    /// Semantic-version order: core numbers, then a pre-release sorts before the release;
    /// pre-releases compare identifier by identifier (numeric ones numerically).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        self.core
            .cmp(&other.core)
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => {
                    let mut ia = a.split('.');
                    let mut ib = b.split('.');
                    loop {
                        match (ia.next(), ib.next()) {
                            (None, None) => return Ordering::Equal,
                            (None, Some(_)) => return Ordering::Less,
                            (Some(_), None) => return Ordering::Greater,
                            (Some(x), Some(y)) => {
                                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                                    (Ok(m), Ok(n)) => m.cmp(&n),
                                    (Ok(_), Err(_)) => Ordering::Less,
                                    (Err(_), Ok(_)) => Ordering::Greater,
                                    (Err(_), Err(_)) => x.cmp(y),
                                };
                                if o != Ordering::Equal {
                                    return o;
                                }
                            }
                        }
                    }
                }
            })
    }
}

/// Splits `SKILL.md` into front matter and body.
fn split(text: &str) -> Result<(&str, &str), SkillError> {
    let rest = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
        .ok_or_else(|| bad("must start with a `---` line opening the YAML front matter"))?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']) == "---" {
            let fm = rest.get(..offset).unwrap_or("");
            let body = rest.get(offset + line.len()..).unwrap_or("");
            return Ok((fm, body));
        }
        offset += line.len();
        if offset > MAX_FRONT_MATTER {
            break;
        }
    }
    if offset > MAX_FRONT_MATTER {
        return Err(bad("the front matter is larger than 64 KiB"));
    }
    Err(bad("the front matter is not closed by a `---` line"))
}

fn to_json(y: &Yaml, depth: usize) -> Result<Value, SkillError> {
    if depth > 32 {
        return Err(bad("the front matter is nested deeper than 32 levels"));
    }
    Ok(match y {
        Yaml::Real(s) | Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        Yaml::Array(a) => Value::Array(
            a.iter()
                .map(|v| to_json(v, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Yaml::Hash(h) => {
            let mut m = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    _ => return Err(bad("a mapping key must be a scalar")),
                };
                if m.insert(key.clone(), to_json(v, depth + 1)?).is_some() {
                    return Err(bad(format!("duplicate key {key:?}")));
                }
            }
            Value::Object(m)
        }
        Yaml::Alias(_) => return Err(bad("YAML aliases are not allowed")),
        Yaml::BadValue => return Err(bad("a value could not be parsed")),
    })
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

/// Parses `SKILL.md`.
pub fn parse(text: &str) -> Result<SkillMeta, SkillError> {
    let (fm, body) = split(text)?;
    // Refuse aliases before loading: the loader expands them by copying (a YAML bomb).
    let mut parser = Parser::new_from_str(fm);
    loop {
        match parser.next_token() {
            Ok((Event::StreamEnd, _)) => break,
            Ok((Event::Alias(_), _)) => return Err(bad("YAML aliases are not allowed")),
            Ok(_) => {}
            Err(e) => return Err(bad(format!("front matter is not valid YAML: {e}"))),
        }
    }
    let docs = YamlLoader::load_from_str(fm)
        .map_err(|e| bad(format!("front matter is not valid YAML: {e}")))?;
    let [doc] = docs.as_slice() else {
        return Err(bad("the front matter must be one YAML mapping"));
    };
    let Value::Object(mut map) = to_json(doc, 0)? else {
        return Err(bad("the front matter must be a YAML mapping"));
    };
    let name = match map.remove("name") {
        Some(Value::String(s)) => s,
        _ => return Err(bad("`name` is required and must be a string")),
    };
    check_name(&name)?;
    let description = match map.remove("description") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.len() <= 1024 => s,
        _ => {
            return Err(bad(
                "`description` is required: a non-empty string of at most 1024 characters",
            ));
        }
    };
    let metadata = map.remove("metadata").unwrap_or(Value::Null);
    if !matches!(metadata, Value::Null | Value::Object(_)) {
        return Err(bad("`metadata` must be a mapping"));
    }
    let version_v = map
        .remove("version")
        .or_else(|| metadata.get("version").cloned());
    let version = match version_v {
        None => "0.0.0".to_string(),
        Some(Value::String(s)) => s,
        Some(_) => return Err(bad("`version` must be a string such as \"1.2.3\"")),
    };
    Version::parse(&version)?;
    // OpenClaw puts requirements under metadata.openclaw (or metadata.clawdbot); plain
    // AgentSkills/Chitin skills under metadata itself.
    let scope = ["openclaw", "clawdbot", "chitin"]
        .iter()
        .find_map(|k| metadata.get(k))
        .unwrap_or(&metadata);
    let req = scope.get("requires");
    let requires = Requirements {
        bins: string_list(req.and_then(|r| r.get("bins"))),
        env: string_list(req.and_then(|r| r.get("env"))),
        os: string_list(scope.get("os")),
    };
    Ok(SkillMeta {
        name,
        description,
        version,
        requires,
        metadata,
        extra: map,
        instructions: body.to_string(),
    })
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

    #[test]
    fn an_openclaw_style_skill_md_parses_with_its_requirements() {
        let text = "---\nname: weather\ndescription: \"Get the weather\"\nhomepage: https://x\nmetadata: {\"openclaw\": {\"requires\": {\"bins\": [\"curl\"], \"env\": [\"API_KEY\"]}, \"os\": [\"linux\"]}}\n---\n# Weather\nRun `curl`.\n";
        let m = parse(text).unwrap();
        assert_eq!(m.name, "weather");
        assert_eq!(m.version, "0.0.0");
        assert_eq!(m.requires.bins, vec!["curl"]);
        assert_eq!(m.requires.env, vec!["API_KEY"]);
        assert_eq!(m.requires.os, vec!["linux"]);
        assert!(m.extra.contains_key("homepage"));
        assert_eq!(m.instructions, "# Weather\nRun `curl`.\n");
    }

    #[test]
    fn a_version_in_metadata_is_used() {
        let m =
            parse("---\nname: a\ndescription: d\nmetadata:\n  version: \"1.2.3\"\n---\n").unwrap();
        assert_eq!(m.version, "1.2.3");
    }

    #[test]
    fn bad_front_matter_is_refused_with_a_reason() {
        for (text, want) in [
            ("no front matter", "must start"),
            ("---\nname: a\n", "not closed"),
            ("---\ndescription: d\n---\n", "`name` is required"),
            ("---\nname: Bad_Name\ndescription: d\n---\n", "name"),
            ("---\nname: a\n---\n", "`description` is required"),
            (
                "---\nname: a\ndescription: d\nversion: v1\n---\n",
                "version",
            ),
            ("---\nname: a\nname: b\ndescription: d\n---\n", "YAML"),
            (
                "---\nx: &a [1,2]\ny: [*a, *a]\nname: a\ndescription: d\n---\n",
                "aliases",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn versions_order_semantically() {
        let v = |s| Version::parse(s).unwrap();
        assert!(v("1.10.0") > v("1.9.9"));
        assert!(v("1.0.0") > v("1.0.0-rc.1"));
        assert!(v("1.0.0-rc.10") > v("1.0.0-rc.9"));
        assert!(v("2.0.0") == v("2.0.0"));
        for bad in ["1.0", "01.0.0", "1.0.0.0", "1.0.0-", "v1.0.0", "1.0.0-a b"] {
            assert!(Version::parse(bad).is_err(), "{bad}");
        }
    }
}
