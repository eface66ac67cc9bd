//! The PostgreSQL backend: a deadpool of tokio-postgres connections (TLS through rustls) on
//! the store's own small runtime. Synchronous callers talk to a session task over channels:
//! the caller's thread waits on a `std::sync::mpsc` receiver, never `block_on` inside a
//! runtime, so a caller may itself run on a tokio runtime thread.

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::sync::mpsc as tmpsc;
use tokio_postgres::types::{IsNull, ToSql, Type};

use crate::config::{PgConfig, TlsMode};
use crate::error::{Error, Result};
use crate::value::{Row, Ty, Value};

/// Serializes schema migrations of every replica on one database (`pg_advisory_xact_lock`).
const MIGRATION_LOCK: i64 = 0x6368_6974_696e_0001;

pub(crate) struct PgDb {
    pub(crate) location: String,
    pool: Pool,
    /// For the dedicated connections of notification listeners (`LISTEN` needs a connection
    /// of its own, outside the pool).
    pub(crate) connect_cfg: Box<tokio_postgres::Config>,
    pub(crate) tls: Option<Box<rustls::ClientConfig>>,
    /// Taken (and shut down in the background) on drop: a runtime dropped inside another
    /// runtime's thread would panic.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for PgDb {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn pg_type(t: Ty) -> Type {
    match t {
        Ty::Int => Type::INT8,
        Ty::Real => Type::FLOAT8,
        Ty::Text => Type::TEXT,
        Ty::Blob => Type::BYTEA,
        Ty::Bool => Type::BOOL,
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Self::Null(_) => Ok(IsNull::Yes),
            Self::Int(i) => i.to_sql(ty, out),
            Self::Real(r) => r.to_sql(ty, out),
            Self::Text(s) => s.as_str().to_sql(ty, out),
            Self::Blob(b) => b.as_slice().to_sql(ty, out),
            Self::Bool(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_ty: &Type) -> bool {
        // The statement is prepared with the types of the values themselves.
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        if !self.is_null_or(ty) {
            return Err(format!("parameter of type {ty} given {:?}", self.ty()).into());
        }
        self.to_sql(ty, out)
    }
}

impl Value {
    fn is_null_or(&self, ty: &Type) -> bool {
        matches!(self, Self::Null(_)) || *ty == pg_type(self.ty())
    }
}

fn cells(row: &tokio_postgres::Row, loc: &str) -> Result<Row> {
    let e = |err: tokio_postgres::Error| Error::pg(loc, &err);
    let mut values = Vec::with_capacity(row.len());
    for (i, col) in row.columns().iter().enumerate() {
        let t = col.type_();
        let v = if *t == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Int), Value::Int)
        } else if *t == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Int), |v| Value::Int(i64::from(v)))
        } else if *t == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Int), |v| Value::Int(i64::from(v)))
        } else if *t == Type::FLOAT8 {
            row.try_get::<_, Option<f64>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Real), Value::Real)
        } else if *t == Type::FLOAT4 {
            row.try_get::<_, Option<f32>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Real), |v| Value::Real(f64::from(v)))
        } else if *t == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Bool), Value::Bool)
        } else if *t == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Blob), Value::Blob)
        } else if [
            Type::TEXT,
            Type::VARCHAR,
            Type::BPCHAR,
            Type::NAME,
            Type::UNKNOWN,
        ]
        .contains(t)
        {
            row.try_get::<_, Option<String>>(i)
                .map_err(e)?
                .map_or(Value::Null(Ty::Text), Value::Text)
        } else {
            return Err(Error::UnportableType {
                column: col.name().to_string(),
                ty: t.name().to_string(),
            });
        };
        values.push(v);
    }
    Ok(Row::new(values))
}

/// What a session is asked to do.
pub(crate) enum Op {
    Execute(String, Vec<Value>),
    Query(String, Vec<Value>, Option<usize>),
    Batch(String),
    Commit,
}

pub(crate) enum Reply {
    Ready,
    Count(u64),
    Rows(Vec<Row>),
    Done,
}

/// The caller's side of one session (a pooled connection, in a transaction or not).
pub(crate) struct Session {
    ops: tmpsc::UnboundedSender<Op>,
    replies: std::sync::mpsc::Receiver<Result<Reply>>,
}

impl Session {
    pub(crate) fn call(&mut self, op: Op) -> Result<Reply> {
        let gone = || Error::Internal("the PostgreSQL session ended".into());
        self.ops.send(op).map_err(|_| gone())?;
        self.replies.recv().map_err(|_| gone())?
    }
}

async fn run_op(client: &Object, loc: &str, op: Op) -> Result<Reply> {
    let e = |err: tokio_postgres::Error| Error::pg(loc, &err);
    match op {
        Op::Execute(sql, params) => {
            let types: Vec<Type> = params.iter().map(|v| pg_type(v.ty())).collect();
            let st = client.prepare_typed_cached(&sql, &types).await.map_err(e)?;
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            Ok(Reply::Count(client.execute(&st, &refs).await.map_err(e)?))
        }
        Op::Query(sql, params, limit) => {
            let types: Vec<Type> = params.iter().map(|v| pg_type(v.ty())).collect();
            let st = client.prepare_typed_cached(&sql, &types).await.map_err(e)?;
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            let rows = client.query(&st, &refs).await.map_err(e)?;
            let take = limit.unwrap_or(usize::MAX);
            Ok(Reply::Rows(
                rows.iter()
                    .take(take)
                    .map(|r| cells(r, loc))
                    .collect::<Result<_>>()?,
            ))
        }
        Op::Batch(sql) => {
            client.batch_execute(&sql).await.map_err(e)?;
            Ok(Reply::Done)
        }
        Op::Commit => {
            client.batch_execute("COMMIT").await.map_err(e)?;
            Ok(Reply::Done)
        }
    }
}

async fn session_task(
    pool: Pool,
    loc: String,
    in_tx: bool,
    mut ops: tmpsc::UnboundedReceiver<Op>,
    replies: std::sync::mpsc::Sender<Result<Reply>>,
) {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(err) => {
            let _ = replies.send(Err(Error::Connect {
                location: loc.clone(),
                message: pool_error(&err),
            }));
            return;
        }
    };
    if in_tx && let Err(err) = client.batch_execute("BEGIN").await {
        let _ = replies.send(Err(Error::pg(&loc, &err)));
        return;
    }
    if replies.send(Ok(Reply::Ready)).is_err() {
        if in_tx {
            finish(client, false).await;
        }
        return;
    }
    let mut open = in_tx;
    while let Some(op) = ops.recv().await {
        let commit = matches!(op, Op::Commit);
        let r = run_op(&client, &loc, op).await;
        if commit {
            // A failed COMMIT ends the transaction too (PostgreSQL rolls it back).
            open = false;
        }
        if replies.send(r).is_err() {
            break;
        }
    }
    finish(client, open).await;
}

/// Returns the connection to the pool; an open transaction is rolled back first, and a
/// connection that cannot roll back is dropped rather than reused.
async fn finish(client: Object, open: bool) {
    if open && client.batch_execute("ROLLBACK").await.is_err() {
        drop(Object::take(client));
    }
}

fn pool_error(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(b) => {
            let mut m = b.to_string();
            let mut src = std::error::Error::source(b);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        }
        other => other.to_string(),
    }
}

impl PgDb {
    pub(crate) fn connect(cfg: &PgConfig) -> Result<Self> {
        let (pg, location) = cfg.tokio_config()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chitin-store-pg")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the store's runtime: {e}")))?;
        let mgr_cfg = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let connect_cfg = pg.clone();
        let tls = match cfg.tls_mode()? {
            TlsMode::Disable => None,
            mode => Some(crate::config::rustls_config(mode, cfg.ca_file.as_deref())?),
        };
        let mgr = match &tls {
            None => Manager::from_config(pg, tokio_postgres::NoTls, mgr_cfg),
            Some(t) => Manager::from_config(
                pg,
                tokio_postgres_rustls::MakeRustlsConnect::new(t.clone()),
                mgr_cfg,
            ),
        };
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size.max(1))
            .build()
            .map_err(|e| Error::Config(format!("connection pool: {e}")))?;
        let db = Self {
            location,
            pool,
            connect_cfg: Box::new(connect_cfg),
            tls: tls.map(Box::new),
            rt: Some(rt),
        };
        // Connect now, so a wrong address, password or certificate is reported at open.
        let mut s = db.session(false)?;
        s.call(Op::Batch("SELECT 1".into()))?;
        Ok(db)
    }

    /// The store's runtime.
    pub(crate) fn runtime(&self) -> Result<&tokio::runtime::Runtime> {
        self.rt
            .as_ref()
            .ok_or_else(|| Error::Internal("the store's runtime stopped".into()))
    }

    pub(crate) fn session(&self, in_tx: bool) -> Result<Session> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| Error::Internal("the store's runtime stopped".into()))?;
        let (ops_tx, ops_rx) = tmpsc::unbounded_channel();
        let (rep_tx, rep_rx) = std::sync::mpsc::channel();
        rt.spawn(session_task(
            self.pool.clone(),
            self.location.clone(),
            in_tx,
            ops_rx,
            rep_tx,
        ));
        let s = Session {
            ops: ops_tx,
            replies: rep_rx,
        };
        match s.replies.recv() {
            Ok(Ok(Reply::Ready)) => Ok(s),
            Ok(Err(e)) => Err(e),
            _ => Err(Error::Internal(
                "the PostgreSQL session did not start".into(),
            )),
        }
    }

    /// The schema version, or 0 before the first migration.
    pub(crate) fn version(&self) -> Result<i64> {
        let mut s = self.session(false)?;
        let rows = match s.call(Op::Query(
            "SELECT version FROM schema_version WHERE id = 1".into(),
            vec![],
            Some(1),
        )) {
            Ok(Reply::Rows(r)) => r,
            // No table yet: a fresh database.
            Err(Error::Postgres { code: Some(c), .. }) if c == "42P01" => return Ok(0),
            Err(e) => return Err(e),
            Ok(_) => return Err(Error::Internal("unexpected reply".into())),
        };
        match rows.first() {
            Some(r) => r.get::<i64>(0),
            None => Ok(0),
        }
    }

    /// Applies the pending migrations, each in its own transaction under an advisory lock
    /// (replicas starting together migrate once). Refuses a newer schema before writing.
    pub(crate) fn migrate(&self) -> Result<usize> {
        let known = crate::latest_version();
        let mut applied = 0;
        // Bootstrap the version row (nothing is written to a database that has it).
        let mut s = self.session(true)?;
        s.call(Op::Batch(format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS schema_version (
                id       BIGINT PRIMARY KEY CHECK (id = 1),
                version  BIGINT NOT NULL
             );
             INSERT INTO schema_version (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;"
        )))?;
        s.call(Op::Commit)?;
        drop(s);
        loop {
            let mut s = self.session(true)?;
            s.call(Op::Batch(format!(
                "SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"
            )))?;
            let found = match s.call(Op::Query(
                "SELECT version FROM schema_version WHERE id = 1 FOR UPDATE".into(),
                vec![],
                Some(1),
            ))? {
                Reply::Rows(r) => match r.first() {
                    Some(r) => r.get::<i64>(0)?,
                    None => 0,
                },
                _ => return Err(Error::Internal("unexpected reply".into())),
            };
            crate::sqlite::refuse_newer(&self.location, found)?;
            if found >= known {
                return Ok(applied);
            }
            let idx = usize::try_from(found).unwrap_or(0);
            let Some(text) = crate::migrations::POSTGRES.get(idx) else {
                return Ok(applied);
            };
            s.call(Op::Batch((*text).to_string()))?;
            s.call(Op::Execute(
                "UPDATE schema_version SET version = $1 WHERE id = 1".into(),
                vec![Value::Int(found + 1)],
            ))?;
            s.call(Op::Commit)?;
            applied += 1;
        }
    }
}
