//! Step conditions (`when:` / `condition:`), Lobster's grammar and semantics.
//!
//! Grammar, loosest binding first:
//!
//! ```text
//! or      := and ("||" and)*
//! and     := compare ("&&" compare)*
//! compare := unary [("==" | "!=" | "<" | "<=" | ">" | ">=") unary_rhs]   (not chained)
//! unary   := "!" unary | primary
//! primary := "(" or ")" | $step.path | "string" | 'string' | number | true | false | null
//! ```
//!
//! `unary_rhs` is `unary` that also accepts a bare word (`$ci.json.status == failure` compares
//! with the string `"failure"`). Numbers are `-?digits(.digits)?`; strings take `\x` as `x`.
//! `a == b == c` is an error (add parentheses).
//!
//! Semantics (JavaScript's, as in Lobster):
//! - **Truthiness** (the result of a condition, and the operands of `!`, `&&`, `||`): `false`,
//!   `null`, an undefined reference, `0` and `""` are false; every other value is true,
//!   including `"false"`, `"0"`, `[]` and `{}`.
//! - **`==` / `!=`** are strict: no type coercion (`1 == "1"` is false, `true == "true"` is
//!   false); numbers compare by value (`1 == 1.0`); lists and objects compare deeply (key order
//!   ignored); an undefined reference equals nothing but another undefined one, not even
//!   `null`.
//! - **`<` `<=` `>` `>=`** are numeric only: each side must be a number or a string that reads
//!   as one (`" 42 "`, `"1e3"`, `"0x1f"`); otherwise the comparison is false (never an error).
//!   Booleans and `null` are never numbers here.
//! - Both sides of `&&` / `||` are evaluated (Lobster evaluates while it parses), so a reference
//!   to a step without a result is an error even where the other side decides.
//! - A step whose condition is false is recorded as `{skipped: true}`.

use serde_json::Value;

use super::results::{MissingResult, Results, StepRef, is_id_char};

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The text as written (`true`/`false` for a YAML boolean).
    pub source: String,
    pub expr: Expr,
    /// Every reference with its 0-based character offset in `source`.
    refs: Vec<(StepRef, usize)>,
}

/// The syntax tree of a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Bool(bool),
    Null,
    Number(f64),
    String(String),
    /// A bare word on the right of a comparison: a string.
    Word(String),
    Ref(StepRef),
    Not(Box<Expr>),
    Compare(CmpOp, Box<Expr>, Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A condition that does not parse. `at` is the 1-based character position in the condition
/// text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at character {at} of the condition)")]
pub struct ConditionSyntaxError {
    pub at: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LParen,
    RParen,
    And,
    Or,
    Not,
    Cmp(CmpOp),
    Ref(StepRef),
    String(String),
    Number(f64),
    Bool(bool),
    Null,
    Word(String),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::And => "`&&`".into(),
            Tok::Or => "`||`".into(),
            Tok::Not => "`!`".into(),
            Tok::Cmp(op) => format!("`{}`", op.as_str()),
            Tok::Ref(r) => format!("`{r}`"),
            Tok::String(_) => "a string".into(),
            Tok::Number(_) => "a number".into(),
            Tok::Bool(b) => format!("`{b}`"),
            Tok::Null => "`null`".into(),
            Tok::Word(w) => format!("`{w}`"),
        }
    }
}

impl Condition {
    /// A condition written as a YAML/JSON boolean.
    pub fn literal(value: bool) -> Self {
        Self {
            source: value.to_string(),
            expr: Expr::Bool(value),
            refs: Vec::new(),
        }
    }

    /// Parses a condition string.
    pub fn parse(text: &str) -> Result<Self, ConditionSyntaxError> {
        let toks = tokenize(text)?;
        if toks.is_empty() {
            return Err(ConditionSyntaxError {
                at: 1,
                message: "the condition is empty; write `true`, `false` or an expression".into(),
            });
        }
        let mut p = ExprParser {
            toks: &toks,
            i: 0,
            end: text.chars().count() + 1,
        };
        let expr = p.or()?;
        if let Some((tok, at)) = p.toks.get(p.i) {
            let hint = if matches!(tok, Tok::Cmp(_)) {
                "; comparisons cannot be chained, add parentheses and `&&`"
            } else {
                ""
            };
            return Err(ConditionSyntaxError {
                at: *at,
                message: format!(
                    "unexpected {} after a complete condition{hint}",
                    tok.describe()
                ),
            });
        }
        let refs = toks
            .iter()
            .filter_map(|(t, at)| match t {
                Tok::Ref(r) => Some((r.clone(), at - 1)),
                _ => None,
            })
            .collect();
        Ok(Self {
            source: text.to_string(),
            expr,
            refs,
        })
    }

    /// Every reference with its 0-based character offset in the condition text.
    pub fn ref_positions(&self) -> impl Iterator<Item = (&StepRef, usize)> {
        self.refs.iter().map(|(r, at)| (r, *at))
    }

    /// Every step reference in the condition, in order.
    pub fn refs(&self) -> Vec<&StepRef> {
        fn go<'a>(e: &'a Expr, out: &mut Vec<&'a StepRef>) {
            match e {
                Expr::Ref(r) => out.push(r),
                Expr::Not(a) => go(a, out),
                Expr::Compare(_, a, b) | Expr::And(a, b) | Expr::Or(a, b) => {
                    go(a, out);
                    go(b, out);
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        go(&self.expr, &mut out);
        out
    }

    /// Evaluates the condition over the results so far.
    pub fn evaluate(&self, results: &Results) -> Result<bool, MissingResult> {
        Ok(truthy(&eval(&self.expr, results)?))
    }
}

/// A value during evaluation: JSON, or JavaScript's `undefined`.
type V = Option<Value>;

fn eval(e: &Expr, rs: &Results) -> Result<V, MissingResult> {
    Ok(match e {
        Expr::Bool(b) => Some(Value::Bool(*b)),
        Expr::Null => Some(Value::Null),
        Expr::Number(n) => {
            Some(serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number))
        }
        Expr::String(s) | Expr::Word(s) => Some(Value::String(s.clone())),
        Expr::Ref(r) => rs.lookup(r)?,
        Expr::Not(a) => Some(Value::Bool(!truthy(&eval(a, rs)?))),
        Expr::And(a, b) => {
            let (a, b) = (eval(a, rs)?, eval(b, rs)?);
            Some(Value::Bool(truthy(&a) && truthy(&b)))
        }
        Expr::Or(a, b) => {
            let (a, b) = (eval(a, rs)?, eval(b, rs)?);
            Some(Value::Bool(truthy(&a) || truthy(&b)))
        }
        Expr::Compare(op, a, b) => {
            let (a, b) = (eval(a, rs)?, eval(b, rs)?);
            Some(Value::Bool(compare(*op, &a, &b)))
        }
    })
}

/// JavaScript's `Boolean(v)` on a JSON value (or undefined).
pub fn truthy(v: &V) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(_) | Value::Object(_)) => true,
    }
}

fn compare(op: CmpOp, a: &V, b: &V) -> bool {
    match op {
        CmpOp::Eq => strict_eq(a, b),
        CmpOp::Ne => !strict_eq(a, b),
        _ => {
            let (Some(x), Some(y)) = (numeric(a), numeric(b)) else {
                return false;
            };
            match op {
                CmpOp::Lt => x < y,
                CmpOp::Le => x <= y,
                CmpOp::Gt => x > y,
                _ => x >= y,
            }
        }
    }
}

/// `Object.is` for primitives, `util.isDeepStrictEqual` for lists and objects.
fn strict_eq(a: &V, b: &V) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(x), Some(y)) => json_eq(x, y),
        _ => false,
    }
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Lobster's `isStrictlyNumeric` + `Number(v)`: a number, or a string that JavaScript reads as
/// one (not blank).
fn numeric(v: &V) -> Option<f64> {
    match v {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => js_number(s),
        _ => None,
    }
}

/// JavaScript's `Number(string)` for a non-blank string: surrounding whitespace ignored;
/// decimal with optional sign, fraction and exponent; `Infinity`; `0x`/`0o`/`0b` integers.
pub fn js_number(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    for (prefix, radix) in [
        ("0x", 16),
        ("0X", 16),
        ("0o", 8),
        ("0O", 8),
        ("0b", 2),
        ("0B", 2),
    ] {
        if let Some(digits) = t.strip_prefix(prefix) {
            if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
                return None;
            }
            // Precision beyond 2^53 is lost, as in JavaScript.
            let mut v = 0f64;
            for c in digits.chars() {
                v = v * f64::from(radix) + f64::from(c.to_digit(radix)?);
            }
            return Some(v);
        }
    }
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    if unsigned == "Infinity" {
        return Some(if t.starts_with('-') {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        });
    }
    // Only digits, one dot, an exponent: Rust's parser would also take "inf" and "nan".
    let ok = unsigned
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'))
        && unsigned.chars().any(|c| c.is_ascii_digit());
    if !ok {
        return None;
    }
    t.parse::<f64>().ok()
}

fn tokenize(text: &str) -> Result<Vec<(Tok, usize)>, ConditionSyntaxError> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut k = 0;
    let err = |k: usize, message: String| ConditionSyntaxError { at: k + 1, message };
    while k < chars.len() {
        let (byte, c) = chars[k];
        let rest = &text[byte..];
        let at = k + 1;
        if c.is_whitespace() {
            k += 1;
            continue;
        }
        let two = |s: &str| rest.starts_with(s);
        let (tok, len) = if c == '(' {
            (Tok::LParen, 1)
        } else if c == ')' {
            (Tok::RParen, 1)
        } else if two("&&") {
            (Tok::And, 2)
        } else if two("||") {
            (Tok::Or, 2)
        } else if two("==") {
            (Tok::Cmp(CmpOp::Eq), 2)
        } else if two("!=") {
            (Tok::Cmp(CmpOp::Ne), 2)
        } else if two("<=") {
            (Tok::Cmp(CmpOp::Le), 2)
        } else if two(">=") {
            (Tok::Cmp(CmpOp::Ge), 2)
        } else if c == '<' {
            (Tok::Cmp(CmpOp::Lt), 1)
        } else if c == '>' {
            (Tok::Cmp(CmpOp::Gt), 1)
        } else if c == '!' {
            (Tok::Not, 1)
        } else if c == '$' {
            let Some((r, bytes)) = StepRef::parse_prefix(rest) else {
                let id: String = rest[1..].chars().take_while(|c| is_id_char(*c)).collect();
                let message = if id.is_empty() {
                    "`$` must start a step reference such as `$build.stdout`".to_string()
                } else {
                    format!("`${id}` needs a field, as in `${id}.stdout` or `${id}.json`")
                };
                return Err(err(k, message));
            };
            (Tok::Ref(r), rest[..bytes].chars().count())
        } else if c == '"' || c == '\'' {
            let mut value = String::new();
            let mut j = k + 1;
            loop {
                let Some(&(_, d)) = chars.get(j) else {
                    return Err(err(k, format!("unterminated string (no closing {c})")));
                };
                if d == '\\' {
                    if let Some(&(_, e)) = chars.get(j + 1) {
                        value.push(e);
                        j += 2;
                        continue;
                    }
                    return Err(err(k, format!("unterminated string (no closing {c})")));
                }
                if d == c {
                    break;
                }
                value.push(d);
                j += 1;
            }
            (Tok::String(value), j + 1 - k)
        } else if c.is_ascii_digit()
            || (c == '-' && rest[1..].starts_with(|d: char| d.is_ascii_digit()))
        {
            let mut j = k + 1;
            while chars.get(j).is_some_and(|(_, d)| d.is_ascii_digit()) {
                j += 1;
            }
            if chars.get(j).is_some_and(|(_, d)| *d == '.')
                && chars.get(j + 1).is_some_and(|(_, d)| d.is_ascii_digit())
            {
                j += 2;
                while chars.get(j).is_some_and(|(_, d)| d.is_ascii_digit()) {
                    j += 1;
                }
            }
            let end = chars.get(j).map_or(text.len(), |(b, _)| *b);
            let n: f64 = text[byte..end]
                .parse()
                .map_err(|_| err(k, "malformed number".into()))?;
            (Tok::Number(n), j - k)
        } else if c.is_ascii_alphabetic() || c == '_' {
            let word: String = rest
                .chars()
                .take_while(|d| d.is_ascii_alphanumeric() || *d == '_' || *d == '-')
                .collect();
            let len = word.chars().count();
            let tok = match word.as_str() {
                "true" => Tok::Bool(true),
                "false" => Tok::Bool(false),
                "null" => Tok::Null,
                _ => Tok::Word(word),
            };
            (tok, len)
        } else {
            let hint = match c {
                '&' => "; use `&&`",
                '|' => "; use `||`",
                '=' => "; use `==`",
                _ => "",
            };
            return Err(err(k, format!("unexpected character `{c}`{hint}")));
        };
        out.push((tok, at));
        k += len;
    }
    Ok(out)
}

struct ExprParser<'a> {
    toks: &'a [(Tok, usize)],
    i: usize,
    /// The position just past the text (for "unexpected end" errors).
    end: usize,
}

impl ExprParser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|(t, _)| t)
    }

    fn at(&self) -> usize {
        self.toks.get(self.i).map_or(self.end, |(_, a)| *a)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, ConditionSyntaxError> {
        let mut left = self.and()?;
        while self.eat(&Tok::Or) {
            let right = self.and()?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ConditionSyntaxError> {
        let mut left = self.compare()?;
        while self.eat(&Tok::And) {
            let right = self.compare()?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn compare(&mut self) -> Result<Expr, ConditionSyntaxError> {
        let left = self.unary(false)?;
        if let Some(Tok::Cmp(op)) = self.peek() {
            let op = *op;
            self.i += 1;
            let right = self.unary(true)?;
            return Ok(Expr::Compare(op, Box::new(left), Box::new(right)));
        }
        Ok(left)
    }

    fn unary(&mut self, rhs: bool) -> Result<Expr, ConditionSyntaxError> {
        if self.eat(&Tok::Not) {
            return Ok(Expr::Not(Box::new(self.unary(rhs)?)));
        }
        self.primary(rhs)
    }

    fn primary(&mut self, rhs: bool) -> Result<Expr, ConditionSyntaxError> {
        let at = self.at();
        let Some((tok, _)) = self.toks.get(self.i) else {
            return Err(ConditionSyntaxError {
                at,
                message: "expected a value, found the end of the condition".into(),
            });
        };
        self.i += 1;
        Ok(match tok {
            Tok::LParen => {
                let e = self.or()?;
                if !self.eat(&Tok::RParen) {
                    let found = self
                        .peek()
                        .map_or_else(|| "the end of the condition".to_string(), Tok::describe);
                    return Err(ConditionSyntaxError {
                        at: self.at(),
                        message: format!("expected `)`, found {found}"),
                    });
                }
                e
            }
            Tok::Ref(r) => Expr::Ref(r.clone()),
            Tok::String(s) => Expr::String(s.clone()),
            Tok::Number(n) => Expr::Number(*n),
            Tok::Bool(b) => Expr::Bool(*b),
            Tok::Null => Expr::Null,
            Tok::Word(w) if rhs => Expr::Word(w.clone()),
            Tok::Word(w) => {
                return Err(ConditionSyntaxError {
                    at,
                    message: format!(
                        "bare word `{w}`: quote text (\"{w}\") or reference a step (`${w}.stdout`); bare words are only read as text on the right of a comparison"
                    ),
                });
            }
            other => {
                return Err(ConditionSyntaxError {
                    at,
                    message: format!("expected a value, found {}", other.describe()),
                });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use serde_json::json;

    use super::*;
    use crate::workflows::results::StepResult;

    fn results() -> Results {
        let mut rs = Results::new();
        rs.insert(
            "build",
            StepResult::from_stdout(
                json!({"status": "failed", "count": 3, "ratio": 0.5, "tags": ["a", "b"],
                       "empty": "", "zero": 0, "nil": null, "num_text": " 42 ", "obj": {"x": 1, "y": 2}})
                .to_string(),
            ),
        );
        rs.insert(
            "check",
            StepResult {
                approved: Some(true),
                ..StepResult::default()
            },
        );
        rs.insert("skip", StepResult::skipped());
        rs
    }

    fn eval(s: &str) -> bool {
        Condition::parse(s).unwrap().evaluate(&results()).unwrap()
    }

    #[test]
    fn the_evaluation_table_matches_lobster() {
        let table: &[(&str, bool)] = &[
            ("true", true),
            ("false", false),
            ("null", false),
            ("$check.approved", true),
            ("!$check.approved", false),
            ("$skip.skipped", true),
            ("$build.skipped", false),
            ("$build.json.status == \"failed\"", true),
            ("$build.json.status == 'failed'", true),
            ("$build.json.status == failed", true),
            ("$build.json.status != \"failed\"", false),
            ("$build.json.count == 3", true),
            ("$build.json.count == 3.0", true),
            ("$build.json.count == \"3\"", false),
            ("$build.json.count > 2 && $build.json.count <= 3", true),
            ("$build.json.count < -1", false),
            ("$build.json.ratio >= 0.5", true),
            ("$build.json.num_text > 41", true),
            ("$build.json.status > 1", false),
            ("$build.json.nil < 1", false),
            ("$check.approved > 0", false),
            ("$build.json.empty", false),
            ("$build.json.zero", false),
            ("$build.json.tags", true),
            ("$build.json.tags == $build.json.tags", true),
            ("$build.json.obj == $build.json.obj", true),
            ("$build.json.nil == null", true),
            ("$build.json.missing == null", false),
            ("$build.json.missing == $build.json.other", true),
            ("$build.json.missing", false),
            ("!$build.json.missing", true),
            ("$build.json.tags.1 == \"b\"", true),
            ("false || $check.approved", true),
            ("true && false || true", true),
            ("true && (false || false)", false),
            ("!($build.json.count == 3) || $skip.skipped", true),
            ("!$build.json.count == false", true),
            ("\"false\"", true),
            ("\"0\"", true),
            ("0", false),
            ("'it\\'s' == \"it's\"", true),
        ];
        for (cond, want) in table {
            assert_eq!(eval(cond), *want, "{cond}");
        }
    }

    #[test]
    fn a_reference_to_a_step_without_a_result_is_an_error_on_either_side() {
        let c = Condition::parse("true || $later.approved").unwrap();
        let e = c.evaluate(&results()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`$later.approved` refers to step `later`, which has no result (it has not run)"
        );
    }

    #[test]
    fn syntax_errors_name_the_character() {
        let cases: &[(&str, &str)] = &[
            (
                "",
                "the condition is empty; write `true`, `false` or an expression (at character 1 of the condition)",
            ),
            (
                "$a.x ==",
                "expected a value, found the end of the condition (at character 8 of the condition)",
            ),
            (
                "$a.x == 1 == 2",
                "unexpected `==` after a complete condition; comparisons cannot be chained, add parentheses and `&&` (at character 11 of the condition)",
            ),
            (
                "($a.x",
                "expected `)`, found the end of the condition (at character 6 of the condition)",
            ),
            (
                "$a == 1",
                "`$a` needs a field, as in `$a.stdout` or `$a.json` (at character 1 of the condition)",
            ),
            (
                "$a.x = 1",
                "unexpected character `=`; use `==` (at character 6 of the condition)",
            ),
            (
                "$a.x & $b.y",
                "unexpected character `&`; use `&&` (at character 6 of the condition)",
            ),
            (
                "ok == $a.x",
                "bare word `ok`: quote text (\"ok\") or reference a step (`$ok.stdout`); bare words are only read as text on the right of a comparison (at character 1 of the condition)",
            ),
            (
                "'abc",
                "unterminated string (no closing ') (at character 1 of the condition)",
            ),
            (
                "&& true",
                "expected a value, found `&&` (at character 1 of the condition)",
            ),
            (
                "é == 1",
                "unexpected character `é` (at character 1 of the condition)",
            ),
        ];
        for (cond, want) in cases {
            let e = Condition::parse(cond).unwrap_err();
            assert_eq!(e.to_string(), *want, "{cond}");
        }
    }

    #[test]
    fn javascript_number_reading_accepts_what_number_accepts() {
        assert_eq!(js_number(" 42 "), Some(42.0));
        assert_eq!(js_number("1e3"), Some(1000.0));
        assert_eq!(js_number("-2.5"), Some(-2.5));
        assert_eq!(js_number(".5"), Some(0.5));
        assert_eq!(js_number("0x1f"), Some(31.0));
        assert_eq!(js_number("Infinity"), Some(f64::INFINITY));
        for bad in ["", " ", "inf", "nan", "1_000", "0x", "1e", "12abc", "--1"] {
            assert_eq!(js_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn refs_lists_every_reference() {
        let c = Condition::parse("$a.x == $b.y || !($c.approved)").unwrap();
        let ids: Vec<&str> = c.refs().iter().map(|r| r.step.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }
}
