//! The portable SQL text: numbered `?N` placeholders, rewritten to `$N` for PostgreSQL.
//! String literals, quoted identifiers and comments are left alone.

use crate::error::{Error, Result};

/// The backend a statement runs on, for the few places SQL must differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// Checks `sql` against the placeholder rules (only `?N`, N from 1) and returns it for
/// `dialect` with the highest placeholder number.
pub fn rewrite(sql: &str, dialect: Dialect) -> Result<(String, usize)> {
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len() + 8);
    let mut max = 0usize;
    let mut i = 0;
    let mut copied = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        // A doubled quote is an escaped quote.
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'?' => {
                let start = i;
                i += 1;
                let digits = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: usize = sql[digits..i].parse().map_err(|_| {
                    Error::Sql(format!(
                        "placeholder `?` without a number at byte {start}: write `?1`, `?2`, ..."
                    ))
                })?;
                if n == 0 || n > 65_535 {
                    return Err(Error::Sql(format!(
                        "placeholder `?{n}` at byte {start}: numbers run from 1"
                    )));
                }
                max = max.max(n);
                if dialect == Dialect::Postgres {
                    out.push_str(&sql[copied..start]);
                    out.push('$');
                    out.push_str(&sql[digits..i]);
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[copied.min(sql.len())..]);
    Ok((out, max))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn numbered_placeholders_become_dollar_placeholders_for_postgres_only() {
        let sql = "SELECT a FROM t WHERE b = ?1 AND c IN (?2, ?12) AND d = ?1";
        assert_eq!(
            rewrite(sql, Dialect::Postgres).unwrap(),
            (
                "SELECT a FROM t WHERE b = $1 AND c IN ($2, $12) AND d = $1".into(),
                12
            )
        );
        assert_eq!(rewrite(sql, Dialect::Sqlite).unwrap(), (sql.into(), 12));
    }

    #[test]
    fn question_marks_in_literals_identifiers_and_comments_are_left_alone() {
        let sql = "SELECT '?1 it''s ?2', \"we?ird\" -- ?3\n FROM t /* ?4 */ WHERE x = ?1";
        let (pg, max) = rewrite(sql, Dialect::Postgres).unwrap();
        assert_eq!(
            pg,
            "SELECT '?1 it''s ?2', \"we?ird\" -- ?3\n FROM t /* ?4 */ WHERE x = $1"
        );
        assert_eq!(max, 1);
    }

    #[test]
    fn an_unnumbered_or_zero_placeholder_is_refused_on_both_backends() {
        for d in [Dialect::Sqlite, Dialect::Postgres] {
            let e = rewrite("SELECT ? FROM t", d).unwrap_err().to_string();
            assert!(e.contains("without a number"), "{e}");
            let e = rewrite("SELECT ?0", d).unwrap_err().to_string();
            assert!(e.contains("numbers run from 1"), "{e}");
        }
    }
}
