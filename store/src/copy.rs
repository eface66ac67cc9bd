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

/// Tables no copy reads or writes: `vault_keys` (the vault's sealed data keys on PostgreSQL)
/// follows its own rules: `chitin store copy` fills it from the state directory's
/// `vault.keys`, a backup carries it as its `vault.keys` member, and a restore keeps the keys
/// already there (they hold the tombstones of later erasures).
pub const UNCOPIED: &[&str] = &["vault_keys"];

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
        .filter(|t| !DERIVED.contains(&t.as_str()) && !UNCOPIED.contains(&t.as_str()))
        .collect();
    let counts: Vec<(String, i64)> = src
        .row_counts()?
        .into_iter()
        .filter(|(t, _)| !DERIVED.contains(&t.as_str()) && !UNCOPIED.contains(&t.as_str()))
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
        .filter(|t| {
            t != "schema_version"
                && t != "transcript_changes"
                && !UNCOPIED.contains(&t.as_str())
                && !is_audit(t)
        })
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

/// The declared type of each column of a SQLite table, in table order.
fn sqlite_columns(d: &mut Conn<'_>, table: &str) -> Result<Vec<(String, String)>> {
    d.query_all(
        &format!("PRAGMA table_info({})", quote_ident(table)),
        params![],
    )?
    .iter()
    .map(|r| {
        Ok((
            r.get::<String>(1)?,
            r.get::<String>(2)?.to_ascii_uppercase(),
        ))
    })
    .collect()
}

/// A PostgreSQL value for a SQLite column of declared type `decl` (STRICT tables take only
/// their own type).
fn to_sqlite(v: Value, decl: &str, table: &str, column: &str) -> Result<Value> {
    Ok(match (v, decl) {
        (Value::Bool(b), _) => Value::Int(i64::from(b)),
        #[allow(
            clippy::cast_precision_loss,
            reason = "an integer into a REAL column, as SQLite would store it"
        )]
        (Value::Int(i), "REAL") => Value::Real(i as f64),
        (v @ Value::Real(_), "INTEGER") => {
            return Err(Error::Sql(format!(
                "{table}.{column}: {} in PostgreSQL, INTEGER in SQLite",
                v.ty().name()
            )));
        }
        (v, _) => v,
    })
}

/// Copies every table of `src` (PostgreSQL) into a new SQLite database at `dst` (created and
/// migrated here; the file must not exist): the reverse of [`sqlite_to_postgres`], for backups
/// of a PostgreSQL deployment. The whole source is read in **one** `REPEATABLE READ, READ
/// ONLY` transaction, so the copy is one consistent snapshot while replicas keep writing;
/// the target is written in one SQLite transaction. The PostgreSQL memory index
/// (`memory_fts` + `memory_terms`) becomes the FTS5 table again (each term repeated by its
/// count: the same BM25 statistics). `spend_daily` and `transcript_changes` are rebuilt by the
/// target's own triggers, as in [`sqlite_to_postgres`].
pub fn postgres_to_sqlite(src: &Db, dst: &std::path::Path) -> Result<Copied> {
    if src.dialect() != Dialect::Postgres {
        return Err(Error::Config(
            "a snapshot copy goes from a PostgreSQL database to a new SQLite file".into(),
        ));
    }
    let (sv, known) = (src.version()?, crate::latest_version());
    if sv != known {
        return Err(Error::Config(format!(
            "the database must be at schema version {known} (it is at {sv}); run `chitin store migrate`"
        )));
    }
    if dst.exists() {
        return Err(Error::Config(format!(
            "{} already exists; a snapshot is written to a new file",
            dst.display()
        )));
    }
    let target = Db::sqlite(dst)?;
    src.tx(|s| {
        s.execute_batch("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
        let tables: Vec<String> = s
            .query_all(
                "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename",
                params![],
            )?
            .iter()
            .map(|r| r.get::<String>(0))
            .collect::<Result<_>>()?;
        let copied = target.tx(|d| {
            // Checked when the copy commits: tables are copied in name order.
            d.execute_batch("PRAGMA defer_foreign_keys = ON")?;
            let mut copied = Vec::new();
            for table in tables.iter().filter(|t| {
                !DERIVED.contains(&t.as_str())
                    && !UNCOPIED.contains(&t.as_str())
                    && *t != "schema_version"
                    && *t != "memory_terms"
                    && !is_audit(t)
            }) {
                d.execute_batch(&format!("DELETE FROM {}", quote_ident(table)))?;
                let n = if table == "memory_fts" {
                    snapshot_memory_index(s, d)?
                } else {
                    snapshot_table(s, d, table)?
                };
                copied.push((table.clone(), n));
            }
            Ok::<_, Error>(copied)
        })?;
        // One self-contained file (no WAL beside it) for the archive.
        target.with(|d| d.query_all("PRAGMA journal_mode = DELETE", params![]))?;
        Ok(copied)
    })
}

fn snapshot_table(s: &mut Conn<'_>, d: &mut Conn<'_>, table: &str) -> Result<i64> {
    let columns = sqlite_columns(d, table)?;
    if columns.is_empty() {
        return Err(Error::Sql(format!(
            "table {table} has no SQLite counterpart"
        )));
    }
    let source = pg_columns(s, table)?;
    if let Some(c) = source
        .keys()
        .find(|c| !columns.iter().any(|(n, _)| n == *c))
    {
        return Err(Error::Sql(format!(
            "column {table}.{c} has no SQLite counterpart"
        )));
    }
    let list = columns
        .iter()
        .map(|(c, _)| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let chunk = CHUNK.min(30_000 / columns.len().max(1)).max(1);
    // Pages by physical row position: stable inside the snapshot, a TID range scan.
    let select = format!(
        "SELECT CAST(ctid AS TEXT), {list} FROM {} WHERE ctid > CAST(?1 AS tid) ORDER BY ctid LIMIT {chunk}",
        quote_ident(table)
    );
    let typed: Vec<(String, Ty)> = columns.iter().map(|(c, _)| (c.clone(), Ty::Text)).collect();
    let mut last = String::from("(0,0)");
    let mut n = 0i64;
    loop {
        let rows = s.query_all(&select, params![last])?;
        if rows.is_empty() {
            return Ok(n);
        }
        let mut batch = Vec::with_capacity(rows.len());
        for r in rows {
            let mut vals = r.into_values();
            if let Value::Text(t) = vals.remove(0) {
                last = t;
            }
            batch.push(
                vals.into_iter()
                    .zip(&columns)
                    .map(|(v, (c, decl))| to_sqlite(v, decl, table, c))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        n += i64::try_from(batch.len()).unwrap_or(0);
        insert_rows(d, table, &typed, batch)?;
    }
}

/// `memory_fts(rowid, length)` + `memory_terms(term, doc, tf)` -> FTS5 `memory_fts(terms)`.
fn snapshot_memory_index(s: &mut Conn<'_>, d: &mut Conn<'_>) -> Result<i64> {
    let mut last = i64::MIN;
    let mut n = 0i64;
    loop {
        let docs: Vec<i64> = s
            .query_all(
                &format!(
                    "SELECT rowid FROM memory_fts WHERE rowid > ?1 ORDER BY rowid LIMIT {CHUNK}"
                ),
                params![last],
            )?
            .iter()
            .map(|r| r.get::<i64>(0))
            .collect::<Result<_>>()?;
        let (Some(first), Some(end)) = (docs.first().copied(), docs.last().copied()) else {
            return Ok(n);
        };
        let mut text: HashMap<i64, String> = HashMap::new();
        for r in s.query_all(
            "SELECT doc, term, tf FROM memory_terms WHERE doc >= ?1 AND doc <= ?2 ORDER BY doc, term",
            params![first, end],
        )? {
            let (doc, term, tf): (i64, String, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let t = text.entry(doc).or_default();
            for _ in 0..tf {
                if !t.is_empty() {
                    t.push(' ');
                }
                t.push_str(&term);
            }
        }
        for doc in &docs {
            d.execute(
                "INSERT INTO memory_fts (rowid, terms) VALUES (?1, ?2)",
                params![*doc, text.remove(doc).unwrap_or_default()],
            )?;
        }
        n += i64::try_from(docs.len()).unwrap_or(0);
        last = end;
    }
}

/// The audit log's tables (`chitin_audit`, same database): append-only, copied by
/// `chitin_audit::copy_from_sqlite`, never truncated here.
fn is_audit(table: &str) -> bool {
    table.starts_with("audit_")
}
