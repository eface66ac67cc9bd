//! `chitin store copy --from sqlite --to postgres`: every table of a SQLite `state.db` into
//! an empty PostgreSQL database at the same schema version, in one PostgreSQL transaction
//! (all or nothing). The FTS5 memory index becomes its PostgreSQL form (migration 15).

use std::collections::HashMap;

use crate::{Conn, Db, Dialect, Error, Result, Ty, Value, params, quote_ident};

/// Rows read and written per statement.
const CHUNK: usize = 500;

/// Tables copied, with their row counts, in copy order.
pub type Copied = Vec<(String, i64)>;

/// How far a copy is: rows copied so far of all rows.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

fn pg_columns(d: &mut Conn<'_>, table: &str) -> Result<HashMap<String, Ty>> {
    let rows = d.query_all(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND table_name = ?1",
        params![table],
    )?;
    let mut out = HashMap::new();
    for r in rows {
        let name: String = r.get(0)?;
        let ty = match r.get::<String>(1)?.as_str() {
            "bigint" | "integer" | "smallint" => Ty::Int,
            "double precision" | "real" => Ty::Real,
            "bytea" => Ty::Blob,
            "boolean" => Ty::Bool,
            _ => Ty::Text,
        };
        out.insert(name, ty);
    }
    Ok(out)
}

fn convert(v: Value, ty: Ty, table: &str, column: &str) -> Result<Value> {
    Ok(match (v, ty) {
        (Value::Null(_), t) => Value::Null(t),
        #[allow(
            clippy::cast_precision_loss,
            reason = "an integral REAL, as SQLite stores it"
        )]
        (Value::Int(i), Ty::Real) => Value::Real(i as f64),
        (v, t) if v.ty() == t => v,
        (v, t) => {
            return Err(Error::Sql(format!(
                "{table}.{column}: {} in SQLite, {} in PostgreSQL",
                v.ty().name(),
                t.name()
            )));
        }
    })
}

fn insert_rows(
    d: &mut Conn<'_>,
    table: &str,
    columns: &[(String, Ty)],
    rows: Vec<Vec<Value>>,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let names = columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!("INSERT INTO {} ({names}) VALUES ", quote_ident(table));
    let mut n = 0;
    let mut params: Vec<Value> = Vec::with_capacity(rows.len() * columns.len());
    for (i, row) in rows.into_iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (j, v) in row.into_iter().enumerate() {
            if j > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push_str(&format!("?{n}"));
            params.push(v);
        }
        sql.push(')');
    }
    let refs: Vec<&dyn crate::ToValue> = params.iter().map(|v| v as &dyn crate::ToValue).collect();
    d.execute(&sql, &refs)?;
    Ok(())
}

/// Tables kept by the target's own triggers, not copied: `spend_daily` is rebuilt from the
/// copied `usage` rows (emptied with the rest first), and `transcript_changes` (the single
/// counter row of migration 19) is the target's own; a copy only appends messages, and a
/// gateway's history cache of the source database never reads the target.
const DERIVED: &[&str] = &["spend_daily", "transcript_changes"];

/// Copies every table of `src` (SQLite) into `dst` (PostgreSQL). `dst` is migrated first;
/// both must then be at this build's schema version. A target with rows is refused unless
/// `replace` (its rows are then deleted in the same transaction). `progress` hears
/// `(rows copied, rows in all)`.
pub fn sqlite_to_postgres(
    src: &Db,
    dst: &Db,
    replace: bool,
    progress: Progress<'_>,
) -> Result<Copied> {
    if src.dialect() != Dialect::Sqlite || dst.dialect() != Dialect::Postgres {
        return Err(Error::Config(
            "a copy goes from a SQLite database to a PostgreSQL one (--from sqlite --to postgres)"
                .into(),
        ));
    }
    dst.migrate()?;
    let (sv, dv, known) = (src.version()?, dst.version()?, crate::latest_version());
    if sv != known || dv != known {
        return Err(Error::Config(format!(
            "both databases must be at schema version {known} (source {sv}, target {dv}); run `chitin store migrate` on each"
        )));
    }
    let tables: Vec<String> = src
        .tables()?
        .into_iter()
        .filter(|t| !DERIVED.contains(&t.as_str()))
        .collect();
    let counts: Vec<(String, i64)> = src
        .row_counts()?
        .into_iter()
        .filter(|(t, _)| !DERIVED.contains(&t.as_str()))
        .collect();
    let total: i64 = counts.iter().map(|(_, n)| *n).sum();
    let total = u64::try_from(total).unwrap_or(0);
    let occupied: Vec<(String, i64)> = dst
        .row_counts()?
        .into_iter()
        .filter(|(t, n)| {
            *n > 0 && t != "schema_version" && !DERIVED.contains(&t.as_str()) && !is_audit(t)
        })
        .collect();
    if !occupied.is_empty() && !replace {
        let list = occupied
            .iter()
            .map(|(t, n)| format!("{t} ({n})"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::Config(format!(
            "the target {} already has rows: {list}; copying would mix two deployments. Copy into an empty database, or pass --replace to delete the target's rows first (in the same transaction)",
            dst.location()
        )));
    }
    let targets: Vec<String> = dst
        .tables()?
        .into_iter()
        .filter(|t| t != "schema_version" && t != "transcript_changes" && !is_audit(t))
        .collect();
    src.with(|s| {
        dst.tx(|d| {
            if !targets.is_empty() {
                let all = targets
                    .iter()
                    .map(|t| quote_ident(t))
                    .collect::<Vec<_>>()
                    .join(", ");
                d.execute_batch(&format!("TRUNCATE {all}"))?;
                // TRUNCATE fires no row trigger: the messages it removed move the counter.
                d.execute_batch("UPDATE transcript_changes SET n = n + 1 WHERE id = 1")?;
            }
            let mut done: u64 = 0;
            let mut copied = Vec::new();
            for table in &tables {
                let n = if table == "memory_fts" {
                    copy_memory_index(s, d, &mut done, total, progress)?
                } else {
                    copy_table(s, d, table, &mut done, total, progress)?
                };
                copied.push((table.clone(), n));
            }
            reset_identities(d)?;
            Ok(copied)
        })
    })
}

fn copy_table(
    s: &mut Conn<'_>,
    d: &mut Conn<'_>,
    table: &str,
    done: &mut u64,
    total: u64,
    progress: Progress<'_>,
) -> Result<i64> {
    let target = pg_columns(d, table)?;
    if target.is_empty() {
        return Err(Error::Sql(format!(
            "table {table} has no PostgreSQL counterpart"
        )));
    }
    let mut columns = Vec::new();
    for r in s.query_all(
        &format!("PRAGMA table_info({})", quote_ident(table)),
        params![],
    )? {
        let name: String = r.get(1)?;
        let ty = *target.get(&name).ok_or_else(|| {
            Error::Sql(format!(
                "column {table}.{name} has no PostgreSQL counterpart"
            ))
        })?;
        columns.push((name, ty));
    }
    let list = columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let per = columns.len().max(1);
    let chunk = CHUNK.min(30_000 / per).max(1);
    let select = format!(
        "SELECT rowid, {list} FROM {} WHERE rowid > ?1 ORDER BY rowid LIMIT {chunk}",
        quote_ident(table)
    );
    let mut last = i64::MIN;
    let mut n = 0i64;
    loop {
        let rows = s.query_all(&select, params![last])?;
        if rows.is_empty() {
            return Ok(n);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in rows {
            let mut vals = r.into_values();
            let rowid = vals.remove(0);
            if let Value::Int(i) = rowid {
                last = i;
            }
            let converted = vals
                .into_iter()
                .zip(&columns)
                .map(|(v, (c, t))| convert(v, *t, table, c))
                .collect::<Result<Vec<_>>>()?;
            batch.push(converted);
        }
        let k = batch.len();
        insert_rows(d, table, &columns, batch)?;
        n += i64::try_from(k).unwrap_or(0);
        *done += u64::try_from(k).unwrap_or(0);
        progress(*done, total);
    }
}

/// FTS5 `memory_fts(terms)` -> `memory_fts(rowid, length)` + `memory_terms(term, doc, tf)`.
fn copy_memory_index(
    s: &mut Conn<'_>,
    d: &mut Conn<'_>,
    done: &mut u64,
    total: u64,
    progress: Progress<'_>,
) -> Result<i64> {
    let mut last = i64::MIN;
    let mut n = 0i64;
    loop {
        let rows = s.query_all(
            &format!(
                "SELECT rowid, terms FROM memory_fts WHERE rowid > ?1 ORDER BY rowid LIMIT {CHUNK}"
            ),
            params![last],
        )?;
        if rows.is_empty() {
            return Ok(n);
        }
        let mut docs = Vec::new();
        let mut terms = Vec::new();
        for r in &rows {
            let id: i64 = r.get(0)?;
            let text: String = r.get(1)?;
            last = id;
            let mut tf: HashMap<&str, i64> = HashMap::new();
            let mut length = 0i64;
            for t in text.split_ascii_whitespace() {
                *tf.entry(t).or_default() += 1;
                length += 1;
            }
            docs.push(vec![Value::Int(id), Value::Int(length)]);
            let mut tf: Vec<_> = tf.into_iter().collect();
            tf.sort_unstable();
            for (t, c) in tf {
                terms.push(vec![
                    Value::Text(t.to_string()),
                    Value::Int(id),
                    Value::Int(c),
                ]);
            }
        }
        insert_rows(
            d,
            "memory_fts",
            &[("rowid".into(), Ty::Int), ("length".into(), Ty::Int)],
            docs,
        )?;
        let cols = [
            ("term".to_string(), Ty::Text),
            ("doc".to_string(), Ty::Int),
            ("tf".to_string(), Ty::Int),
        ];
        let mut terms = terms.into_iter().peekable();
        while terms.peek().is_some() {
            let part: Vec<_> = terms.by_ref().take(CHUNK * 4).collect();
            insert_rows(d, "memory_terms", &cols, part)?;
        }
        let k = rows.len();
        n += i64::try_from(k).unwrap_or(0);
        *done += u64::try_from(k).unwrap_or(0);
        progress(*done, total);
    }
}

/// Identity columns continue after the copied ids.
fn reset_identities(d: &mut Conn<'_>) -> Result<()> {
    let cols = d.query_all(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
         WHERE table_schema = current_schema() AND is_identity = 'YES'",
        params![],
    )?;
    for r in cols {
        let (t, c): (String, String) = (r.get(0)?, r.get(1)?);
        d.query_row(
            &format!(
                "SELECT setval(pg_get_serial_sequence(?1, ?2), COALESCE((SELECT MAX({c}) FROM {t}), 0) + 1, false)",
                c = quote_ident(&c),
                t = quote_ident(&t)
            ),
            params![t, c],
        )?;
    }
    Ok(())
}

/// The audit log's tables (`chitin_audit`, same database): append-only, copied by
/// `chitin_audit::copy_from_sqlite`, never truncated here.
fn is_audit(table: &str) -> bool {
    table.starts_with("audit_")
}
