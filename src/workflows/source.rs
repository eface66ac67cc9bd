//! The syntax layer: a workflow file's text (YAML or JSON) as a tree of [`Node`]s that remember
//! where they start, so every later error can name `file:line:col`.
//!
//! YAML is read with `yaml-rust2`'s event parser (already in the tree for `chitin-skills`), with
//! the YAML 1.2 core schema that Lobster's `yaml` package uses: `true`/`false`/`null`/`~`,
//! integers and floats resolve from plain scalars, everything quoted is a string. Anchors and
//! aliases work (bounded, see [`MAX_NODES`]); merge keys (`<<`) are YAML 1.1 and are an ordinary
//! key here (and so an unknown field). JSON is read by a small strict RFC 8259 parser of our own
//! so that JSON files get positions for every node too, not only for syntax errors.
//!
//! Limits protect the parser from hostile files (a workflow may be written by a model): at most
//! [`MAX_DEPTH`] levels of nesting and [`MAX_NODES`] nodes after alias expansion. Duplicate
//! mapping keys are errors in both formats.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Deepest nesting of sequences and mappings accepted.
pub const MAX_DEPTH: usize = 64;
/// Most nodes a file may expand to (aliases count every time they are used).
pub const MAX_NODES: usize = 100_000;

/// A position in the source: 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl Pos {
    pub fn new(line: usize, col: usize) -> Self {
        Self {
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col).unwrap_or(u32::MAX),
        }
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// How a string scalar was written; conditions use it to point inside the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A plain YAML scalar (content starts at the node's position).
    Plain,
    /// Quoted (YAML single/double quotes, every JSON string): content starts one column later.
    Quoted,
    /// A YAML block scalar (`|`, `>`): content starts on a later line.
    Block,
}

/// A value of the file with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub val: Val,
}

/// The value of a [`Node`]: the JSON data model.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String, Style),
    Seq(Vec<Node>),
    /// Keys in file order (duplicates are rejected while parsing).
    Map(Vec<(Key, Node)>),
}

/// A mapping key (always a string: scalar keys are taken as their text).
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub pos: Pos,
}

/// A syntax error at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

impl Node {
    /// What kind of value this is, for "expected X, found Y" messages.
    pub fn kind_name(&self) -> &'static str {
        match &self.val {
            Val::Null => "null",
            Val::Bool(_) => "a boolean",
            Val::Number(_) => "a number",
            Val::String(..) => "a string",
            Val::Seq(_) => "a list",
            Val::Map(_) => "a mapping",
        }
    }

    /// The node as plain JSON (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.val {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Number(n) => Value::Number(n.clone()),
            Val::String(s, _) => Value::String(s.clone()),
            Val::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Val::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// YAML

/// Parses one YAML document into a [`Node`] tree.
pub fn parse_yaml(text: &str) -> Result<Node, SyntaxError> {
    let mut builder = YamlBuilder::default();
    let mut parser = Parser::new_from_str(text);
    let loaded = parser.load(&mut builder, true);
    if let Some(e) = builder.error {
        return Err(e);
    }
    loaded.map_err(|e| SyntaxError {
        pos: pos_of(*e.marker()),
        message: format!("invalid YAML: {}", e.info()),
    })?;
    match builder.docs.len() {
        0 => Err(SyntaxError {
            pos: Pos::new(1, 1),
            message: "the file is empty; a workflow needs at least `steps:`".into(),
        }),
        1 => builder.docs.pop().ok_or_else(|| SyntaxError {
            pos: Pos::new(1, 1),
            message: "the file is empty".into(),
        }),
        _ => Err(SyntaxError {
            pos: builder.second_doc.unwrap_or(Pos::new(1, 1)),
            message:
                "the file holds more than one YAML document (`---`); a workflow file holds one"
                    .into(),
        }),
    }
}

fn pos_of(m: Marker) -> Pos {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Pos::new(m.line(), m.col() + 1)
}

/// A container being built: its node so far and, for mappings, the pending key.
enum Open {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        key: Option<Key>,
    },
}

#[derive(Default)]
struct YamlBuilder {
    stack: Vec<Open>,
    docs: Vec<Node>,
    anchors: std::collections::HashMap<usize, Node>,
    nodes: usize,
    error: Option<SyntaxError>,
    second_doc: Option<Pos>,
}

impl MarkedEventReceiver for YamlBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.event(ev, pos_of(mark)) {
            self.error = Some(e);
        }
    }
}

impl YamlBuilder {
    fn event(&mut self, ev: Event, pos: Pos) -> Result<(), SyntaxError> {
        match ev {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => Ok(()),
            Event::DocumentStart => {
                if !self.docs.is_empty() && self.second_doc.is_none() {
                    self.second_doc = Some(pos);
                }
                Ok(())
            }
            Event::Alias(id) => {
                let node = self.anchors.get(&id).cloned().ok_or_else(|| SyntaxError {
                    pos,
                    message: "alias to an unknown anchor".into(),
                })?;
                self.count(count_nodes(&node), pos)?;
                self.finish(node, pos)
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, pos)?;
                let val = scalar(text, style, tag.as_ref(), pos)?;
                let node = Node { pos, val };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.finish(node, pos)
            }
            Event::SequenceStart(anchor, ref tag) | Event::MappingStart(anchor, ref tag) => {
                if let Some(t) = tag {
                    return Err(SyntaxError {
                        pos,
                        message: format!(
                            "unsupported YAML tag `{}{}` on a collection",
                            t.handle, t.suffix
                        ),
                    });
                }
                self.count(1, pos)?;
                if self.stack.len() >= MAX_DEPTH {
                    return Err(SyntaxError {
                        pos,
                        message: format!("nested deeper than {MAX_DEPTH} levels"),
                    });
                }
                self.stack.push(if matches!(ev, Event::SequenceStart(..)) {
                    Open::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Open::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    }
                });
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Seq { pos, anchor, items }) => (
                        Node {
                            pos,
                            val: Val::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Open::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            // A block mapping's event comes after its first key is read; the
                            // key is where the mapping starts for a reader.
                            pos: entries.first().map_or(pos, |(k, _)| k.pos.min(pos)),
                            val: Val::Map(entries),
                        },
                        anchor,
                    ),
                    None => {
                        return Err(SyntaxError {
                            pos,
                            message: "unbalanced YAML structure".into(),
                        });
                    }
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.finish(node, pos)
            }
        }
    }

    fn count(&mut self, n: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                pos,
                message: format!(
                    "the file expands to more than {MAX_NODES} values (aliases count each time they are used)"
                ),
            });
        }
        Ok(())
    }

    /// Puts a finished node into its parent (or makes it the document).
    fn finish(&mut self, node: Node, pos: Pos) -> Result<(), SyntaxError> {
        match self.stack.last_mut() {
            None => {
                self.docs.push(node);
                Ok(())
            }
            Some(Open::Seq { items, .. }) => {
                items.push(node);
                Ok(())
            }
            Some(Open::Map { entries, key, .. }) => match key.take() {
                None => {
                    let name = match node.val {
                        Val::String(s, _) => s,
                        Val::Null => String::new(),
                        Val::Bool(b) => b.to_string(),
                        Val::Number(n) => n.to_string(),
                        Val::Seq(_) | Val::Map(_) => {
                            return Err(SyntaxError {
                                pos,
                                message:
                                    "a mapping key must be a plain name, not a list or mapping"
                                        .into(),
                            });
                        }
                    };
                    if entries.iter().any(|(k, _)| k.name == name) {
                        return Err(SyntaxError {
                            pos: node.pos,
                            message: format!("duplicate key `{name}`"),
                        });
                    }
                    *key = Some(Key {
                        name,
                        pos: node.pos,
                    });
                    Ok(())
                }
                Some(k) => {
                    entries.push((k, node));
                    Ok(())
                }
            },
        }
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.val {
        Val::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        Val::Map(entries) => {
            1 + entries
                .iter()
                .map(|(_, v)| 1 + count_nodes(v))
                .sum::<usize>()
        }
        _ => 1,
    }
}

/// Resolves a scalar with the YAML 1.2 core schema.
fn scalar(
    text: String,
    style: TScalarStyle,
    tag: Option<&Tag>,
    pos: Pos,
) -> Result<Val, SyntaxError> {
    let text_style = match style {
        TScalarStyle::Plain => Style::Plain,
        TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => Style::Quoted,
        TScalarStyle::Literal | TScalarStyle::Folded => Style::Block,
    };
    if let Some(t) = tag {
        let bad = || SyntaxError {
            pos,
            message: format!("the value does not match its tag `!!{}`", t.suffix),
        };
        if t.handle != "tag:yaml.org,2002:" {
            return Err(SyntaxError {
                pos,
                message: format!("unsupported YAML tag `{}{}`", t.handle, t.suffix),
            });
        }
        return match t.suffix.as_str() {
            "str" => Ok(Val::String(text, text_style)),
            "null" => match text.as_str() {
                "" | "~" | "null" | "Null" | "NULL" => Ok(Val::Null),
                _ => Err(bad()),
            },
            "bool" => core_bool(&text).map(Val::Bool).ok_or_else(bad),
            "int" => core_int(&text).map(Val::Number).ok_or_else(bad),
            "float" => core_float(&text, pos)?.map(Val::Number).ok_or_else(bad),
            other => Err(SyntaxError {
                pos,
                message: format!("unsupported YAML tag `!!{other}`"),
            }),
        };
    }
    if style != TScalarStyle::Plain {
        return Ok(Val::String(text, text_style));
    }
    if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL") {
        return Ok(Val::Null);
    }
    if let Some(b) = core_bool(&text) {
        return Ok(Val::Bool(b));
    }
    if let Some(n) = core_int(&text) {
        return Ok(Val::Number(n));
    }
    if let Some(n) = core_float(&text, pos)? {
        return Ok(Val::Number(n));
    }
    Ok(Val::String(text, Style::Plain))
}

fn core_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// `[-+]?[0-9]+`, `0o[0-7]+`, `0x[0-9a-fA-F]+` (YAML 1.2 core schema).
fn core_int(s: &str) -> Option<serde_json::Number> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() {
        return None;
    }
    if digits.bytes().all(|b| b.is_ascii_digit()) {
        let v: i128 = digits.parse().ok()?;
        let v = if neg { -v } else { v };
        return i64::try_from(v)
            .map(serde_json::Number::from)
            .ok()
            .or_else(|| u64::try_from(v).ok().map(serde_json::Number::from));
    }
    if neg || s.starts_with('+') {
        return None;
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8)
            .ok()
            .map(serde_json::Number::from);
    }
    if let Some(hex) = s.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16)
            .ok()
            .map(serde_json::Number::from);
    }
    None
}

/// `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`; `.inf`/`.nan` are refused (JSON has
/// no such numbers).
fn core_float(s: &str, pos: Pos) -> Result<Option<serde_json::Number>, SyntaxError> {
    let body = s.trim_start_matches(['-', '+']);
    if matches!(body, ".inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN")
        && s.len() - body.len() <= 1
    {
        return Err(SyntaxError {
            pos,
            message: "infinity and NaN are not supported; quote the value if it is text".into(),
        });
    }
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'-' | b'+')));
    let int_start = i;
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let f = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        frac_digits = i - f;
    }
    if int_digits == 0 && frac_digits == 0 {
        return Ok(None);
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let e = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == e {
            return Ok(None);
        }
    }
    if i != b.len() {
        return Ok(None);
    }
    Ok(s.parse::<f64>().ok().and_then(serde_json::Number::from_f64))
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Parses a JSON document (RFC 8259, strict: no comments, no trailing commas) into a [`Node`]
/// tree with positions.
pub fn parse_json(text: &str) -> Result<Node, SyntaxError> {
    let mut p = JsonParser {
        chars: text.chars().collect(),
        i: 0,
        line: 1,
        col: 1,
        nodes: 0,
    };
    if p.chars.first() == Some(&'\u{feff}') {
        p.i = 1;
    }
    p.ws();
    let node = p.value(0)?;
    p.ws();
    if p.i < p.chars.len() {
        return Err(p.err("unexpected text after the JSON value"));
    }
    Ok(node)
}

struct JsonParser {
    chars: Vec<char>,
    i: usize,
    line: usize,
    col: usize,
    nodes: usize,
}

impl JsonParser {
    fn pos(&self) -> Pos {
        Pos::new(self.line, self.col)
    }

    fn err(&self, message: &str) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            message: format!("invalid JSON: {message}"),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.i).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += 1;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\n' | '\r')) {
            self.bump();
        }
    }

    fn expect_word(&mut self, word: &str) -> Result<(), SyntaxError> {
        for w in word.chars() {
            if self.peek() != Some(w) {
                return Err(self.err("expected a value"));
            }
            self.bump();
        }
        Ok(())
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(self.err(&format!("more than {MAX_NODES} values")));
        }
        let pos = self.pos();
        let val = match self.peek() {
            Some('{') => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(&format!("nested deeper than {MAX_DEPTH} levels")));
                }
                self.bump();
                let mut entries: Vec<(Key, Node)> = Vec::new();
                self.ws();
                if self.peek() == Some('}') {
                    self.bump();
                } else {
                    loop {
                        self.ws();
                        let kpos = self.pos();
                        if self.peek() != Some('"') {
                            return Err(self.err("expected a string key"));
                        }
                        let name = self.string()?;
                        if entries.iter().any(|(k, _)| k.name == name) {
                            return Err(SyntaxError {
                                pos: kpos,
                                message: format!("duplicate key `{name}`"),
                            });
                        }
                        self.ws();
                        if self.bump() != Some(':') {
                            return Err(self.err("expected `:` after the key"));
                        }
                        self.ws();
                        let v = self.value(depth + 1)?;
                        entries.push((Key { name, pos: kpos }, v));
                        self.ws();
                        match self.bump() {
                            Some(',') => continue,
                            Some('}') => break,
                            _ => return Err(self.err("expected `,` or `}`")),
                        }
                    }
                }
                Val::Map(entries)
            }
            Some('[') => {
                if depth >= MAX_DEPTH {
                    return Err(self.err(&format!("nested deeper than {MAX_DEPTH} levels")));
                }
                self.bump();
                let mut items = Vec::new();
                self.ws();
                if self.peek() == Some(']') {
                    self.bump();
                } else {
                    loop {
                        self.ws();
                        items.push(self.value(depth + 1)?);
                        self.ws();
                        match self.bump() {
                            Some(',') => continue,
                            Some(']') => break,
                            _ => return Err(self.err("expected `,` or `]`")),
                        }
                    }
                }
                Val::Seq(items)
            }
            Some('"') => Val::String(self.string()?, Style::Quoted),
            Some('t') => {
                self.expect_word("true")?;
                Val::Bool(true)
            }
            Some('f') => {
                self.expect_word("false")?;
                Val::Bool(false)
            }
            Some('n') => {
                self.expect_word("null")?;
                Val::Null
            }
            Some('-' | '0'..='9') => Val::Number(self.number()?),
            Some(_) => return Err(self.err("expected a value")),
            None => return Err(self.err("unexpected end of file")),
        };
        Ok(Node { pos, val })
    }

    fn number(&mut self) -> Result<serde_json::Number, SyntaxError> {
        let start = self.i;
        let err = |p: &Self| p.err("malformed number");
        if self.peek() == Some('-') {
            self.bump();
        }
        match self.peek() {
            Some('0') => {
                self.bump();
            }
            Some('1'..='9') => {
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.bump();
                }
            }
            _ => return Err(err(self)),
        }
        if self.peek() == Some('.') {
            self.bump();
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(err(self));
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.bump();
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(err(self));
            }
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.bump();
            }
        }
        let text: String = self.chars[start..self.i].iter().collect();
        serde_json::from_str::<serde_json::Number>(&text).map_err(|_| err(self))
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        self.bump(); // the opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.bump() else {
                return Err(self.err("unterminated string"));
            };
            match c {
                '"' => return Ok(out),
                '\\' => match self.bump() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('/') => out.push('/'),
                    Some('b') => out.push('\u{8}'),
                    Some('f') => out.push('\u{c}'),
                    Some('n') => out.push('\n'),
                    Some('r') => out.push('\r'),
                    Some('t') => out.push('\t'),
                    Some('u') => {
                        let hi = self.hex4()?;
                        let c = if (0xD800..0xDC00).contains(&hi) {
                            if self.bump() != Some('\\') || self.bump() != Some('u') {
                                return Err(self.err("unpaired surrogate in \\u escape"));
                            }
                            let lo = self.hex4()?;
                            if !(0xDC00..0xE000).contains(&lo) {
                                return Err(self.err("unpaired surrogate in \\u escape"));
                            }
                            char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
                        } else {
                            char::from_u32(hi)
                        };
                        out.push(c.ok_or_else(|| self.err("unpaired surrogate in \\u escape"))?);
                    }
                    _ => return Err(self.err("unknown escape in string")),
                },
                c if u32::from(c) < 0x20 => {
                    return Err(self.err("control character in string (escape it)"));
                }
                c => out.push(c),
            }
        }
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut v = 0;
        for _ in 0..4 {
            let d = self
                .bump()
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| self.err("malformed \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests")]
    use super::*;

    fn map_keys(n: &Node) -> Vec<(String, Pos)> {
        match &n.val {
            Val::Map(e) => e.iter().map(|(k, v)| (k.name.clone(), v.pos)).collect(),
            _ => panic!("not a map"),
        }
    }

    #[test]
    fn yaml_nodes_carry_one_based_lines_and_columns() {
        let n = parse_yaml("name: x\nsteps:\n  - id: a\n    run: echo\n").unwrap();
        let keys = map_keys(&n);
        assert_eq!(keys[0], ("name".into(), Pos::new(1, 7)));
        assert_eq!(keys[1].0, "steps");
        let Val::Map(e) = &n.val else { panic!() };
        let Val::Seq(steps) = &e[1].1.val else {
            panic!()
        };
        assert_eq!(steps[0].pos, Pos::new(3, 5));
        let Val::Map(s) = &steps[0].val else { panic!() };
        assert_eq!(s[1].0.pos, Pos::new(4, 5));
    }

    #[test]
    fn yaml_scalars_follow_the_core_schema() {
        let n = parse_yaml("[true, False, null, ~, 12, -3, 0x10, 1.5, yes, '12', 1e3]").unwrap();
        assert_eq!(
            n.to_json(),
            serde_json::json!([
                true, false, null, null, 12, -3, 16, 1.5, "yes", "12", 1000.0
            ])
        );
    }

    #[test]
    fn yaml_duplicate_keys_are_errors_at_the_second_key() {
        let e = parse_yaml("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos, Pos::new(3, 1));
        assert_eq!(e.message, "duplicate key `a`");
    }

    #[test]
    fn yaml_aliases_expand_but_a_bomb_is_refused() {
        let n = parse_yaml("a: &x [1, 2]\nb: *x\n").unwrap();
        assert_eq!(n.to_json(), serde_json::json!({"a": [1, 2], "b": [1, 2]}));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let e = parse_yaml(&bomb).unwrap_err();
        assert!(e.message.contains("more than"), "{e:?}");
    }

    #[test]
    fn yaml_with_two_documents_is_refused() {
        let e = parse_yaml("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.message.contains("more than one YAML document"), "{e:?}");
    }

    #[test]
    fn yaml_nesting_is_bounded() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(parse_yaml(&deep).is_err());
    }

    #[test]
    fn json_nodes_carry_positions_and_strict_syntax() {
        let n =
            parse_json("{\n  \"a\": [1, \"x\\u00e9\\ud83d\\ude00\"],\n  \"b\": null\n}").unwrap();
        assert_eq!(
            n.to_json(),
            serde_json::json!({"a": [1, "xé😀"], "b": null})
        );
        let keys = map_keys(&n);
        assert_eq!(keys[0].1, Pos::new(2, 8));
        assert_eq!(keys[1].1, Pos::new(3, 8));
        let e = parse_json("{\"a\": 1,}").unwrap_err();
        assert_eq!(e.pos, Pos::new(1, 9));
        let e = parse_json("{\"a\": 1, \"a\": 2}").unwrap_err();
        assert_eq!(e.message, "duplicate key `a`");
        assert_eq!(e.pos, Pos::new(1, 10));
        assert!(parse_json("[01]").is_err());
        assert!(parse_json("[\"\\ud800\"]").is_err());
        assert!(parse_json(&"[".repeat(100)).is_err());
    }
}
