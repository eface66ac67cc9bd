//! PostgreSQL storage (feature `postgres`): one audit chain shared by several gateways.
//!
//! - Tables `audit_records`, `audit_checkpoints` (append-only: triggers refuse updates,
//!   deletes and truncation, except retention's payload removal), `audit_head` (one row: the
//!   last record, locked `FOR UPDATE` by every append transaction, so appends from every
//!   writer are serialized and `prev_hash` always links the true predecessor) and `audit_meta`
//!   (schema version, the deployment's public key).
//! - Group commit is kept: the writer thread inserts a whole batch with one `UNNEST` insert in
//!   one transaction; `synchronous_commit` is forced `on` for the session, so a commit returns
//!   only once the WAL is flushed.
//! - The hash chain, the record encoding and the checkpoints are the SQLite ones: readers,
//!   [`crate::Verifier`] and exports work unchanged, and an export from PostgreSQL is the same
//!   format byte for byte.
//! - A database administrator can rewrite rows (and drop the triggers); the chain and the
//!   signed checkpoints (also kept in each writer's `audit.checkpoints`) detect it.

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use postgres::types::{ToSql, Type};
use postgres::{Client, IsolationLevel, NoTls, Row, Statement};
use zeroize::Zeroizing;

use crate::AuditError;
use crate::backend::{BuildRows, Head, PayloadFacts, Removal, WriterStore};
use crate::checkpoint::{Checkpoint, PublicKey};
use crate::record::{GENESIS_HASH, Record};
use crate::store::{AuditReader, Query};

/// The newest table layout this build knows.
const SCHEMA_VERSION: i64 = 1;

/// `pg_advisory_xact_lock` key that serializes schema creation ("chitinAu").
const SCHEMA_LOCK: i64 = 0x6368_6974_696e_4175;

const SCHEMA_V1: &str = r"
CREATE TABLE audit_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE audit_records (
    seq            BIGINT PRIMARY KEY,
    ts_ms          BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    actor          TEXT NOT NULL,
    action         TEXT NOT NULL,
    resource       TEXT NOT NULL,
    decision       TEXT NOT NULL,
    policies       TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    payload_digest BYTEA NOT NULL,
    payload        TEXT,
    removed_at_ms  BIGINT,
    removed_reason TEXT,
    field_check    BYTEA NOT NULL,
    prev_hash      BYTEA NOT NULL,
    hash           BYTEA NOT NULL
);
CREATE TABLE audit_checkpoints (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    seq     BIGINT NOT NULL,
    head    TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    key_id  TEXT NOT NULL,
    sig     TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_seq ON audit_checkpoints (seq);
CREATE TABLE audit_head (
    id   SMALLINT PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash BYTEA NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
    VALUES (1, 0, '\x0000000000000000000000000000000000000000000000000000000000000000');
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'audit_records' THEN
        IF OLD.payload IS NOT NULL AND NEW.payload IS NULL
           AND NEW.removed_at_ms IS NOT NULL AND NEW.removed_reason IS NOT NULL
           AND NEW.seq = OLD.seq AND NEW.ts_ms = OLD.ts_ms AND NEW.kind = OLD.kind
           AND NEW.actor = OLD.actor AND NEW.action = OLD.action
           AND NEW.resource = OLD.resource AND NEW.decision = OLD.decision
           AND NEW.policies = OLD.policies AND NEW.outcome = OLD.outcome
           AND NEW.payload_digest = OLD.payload_digest AND NEW.field_check = OLD.field_check
           AND NEW.prev_hash = OLD.prev_hash AND NEW.hash = OLD.hash THEN
            RETURN NEW;
        END IF;
    END IF;
    IF TG_TABLE_NAME = 'audit_checkpoints' THEN
        RAISE EXCEPTION 'checkpoints are append-only';
    END IF;
    RAISE EXCEPTION 'the audit log is append-only (only retention may remove a payload)';
END $$;
CREATE TRIGGER audit_records_append_only BEFORE UPDATE OR DELETE ON audit_records
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_records_no_truncate BEFORE TRUNCATE ON audit_records
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
";

const COLUMNS: &str = "seq, ts_ms, kind, actor, action, resource, decision, policies, outcome, \
    payload_digest, payload, removed_at_ms, removed_reason, field_check, prev_hash, hash";

const INSERT_BATCH: &str = "INSERT INTO audit_records (seq, ts_ms, kind, actor, action, \
    resource, decision, policies, outcome, payload_digest, payload, field_check, prev_hash, hash) \
    SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], \
    $7::text[], $8::text[], $9::text[], $10::bytea[], $11::text[], $12::bytea[], $13::bytea[], \
    $14::bytea[])";

const LOCK_HEAD: &str = "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE";
const LAST_RECORD: &str = "SELECT seq, hash FROM audit_records ORDER BY seq DESC LIMIT 1";
const UPDATE_HEAD: &str = "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1";

/// How the connection to PostgreSQL is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// Plain TCP or a Unix socket (`sslmode=disable`): only for a database on the same host
    /// or a network you trust.
    Disable,
    /// TLS without checking the server's certificate (`sslmode=require`): stops passive
    /// eavesdropping, not an active man in the middle.
    Require,
    /// TLS, the certificate checked against `ca_file` (PEM) or the system's roots, and the
    /// host name checked (`sslmode=verify-full`, also `verify-ca`). The default.
    VerifyFull { ca_file: Option<PathBuf> },
}

/// Where the PostgreSQL audit log lives. Holds a password: no `Debug`, zeroized on drop; the
/// [`target`](Self::target) names it without the password.
#[derive(Clone)]
pub struct PgConfig {
    /// The URL without `sslmode` / `sslrootcert` (those are in `tls`).
    url: Zeroizing<String>,
    password: Option<Zeroizing<String>>,
    tls: PgTls,
    target: String,
    target_path: PathBuf,
    connect_timeout: Duration,
}

impl PgConfig {
    /// Parses `postgres://user[:password]@host[:port]/dbname[?params]`. `sslmode` may be
    /// `disable`, `require`, `verify-ca` or `verify-full` (the default; `sslrootcert=FILE`
    /// names the CA). `prefer` and `allow` are refused: they fall back to plain text silently.
    pub fn from_url(url: &str) -> Result<Self, AuditError> {
        let bad = |why: String| AuditError::InvalidInput(format!("PostgreSQL URL: {why}"));
        let url = url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(bad(
                "expected postgres://user@host:port/dbname (key=value strings are not supported)"
                    .into(),
            ));
        }
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut sslmode: Option<String> = None;
        let mut rootcert: Option<PathBuf> = None;
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "sslmode" => sslmode = Some(percent_decode(v)),
                "sslrootcert" => rootcert = Some(PathBuf::from(percent_decode(v))),
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let tls = match sslmode.as_deref() {
            None | Some("verify-full" | "verify-ca") => PgTls::VerifyFull { ca_file: rootcert },
            Some("require") if rootcert.is_some() => PgTls::VerifyFull { ca_file: rootcert },
            Some("require") => PgTls::Require,
            Some("disable") => PgTls::Disable,
            Some(m @ ("prefer" | "allow")) => {
                return Err(bad(format!(
                    "sslmode={m} silently falls back to plain text; use disable (same host), \
                     require or verify-full"
                )));
            }
            Some(other) => {
                return Err(bad(format!(
                    "unknown sslmode {other:?}; use disable, require, verify-ca or verify-full"
                )));
            }
        };
        let parsed = postgres::Config::from_str(&rebuilt).map_err(|e| bad(pg_message(&e)))?;
        let host = parsed
            .get_hosts()
            .first()
            .map(|h| match h {
                postgres::config::Host::Tcp(name) => name.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = parsed.get_ports().first().copied().unwrap_or(5432);
        let user = parsed.get_user().unwrap_or("");
        let db = parsed.get_dbname().unwrap_or(user);
        let target = format!("postgresql://{user}@{host}:{port}/{db}");
        Ok(Self {
            url: Zeroizing::new(rebuilt),
            password: None,
            tls,
            target_path: PathBuf::from(&target),
            target,
            connect_timeout: Duration::from_secs(10),
        })
    }

    /// Uses `password` (e.g. from the secret store) instead of one in the URL.
    #[must_use]
    pub fn with_password(mut self, password: Zeroizing<String>) -> Self {
        self.password = Some(password);
        self
    }

    /// Overrides the TLS mode given in the URL.
    #[must_use]
    pub fn with_tls(mut self, tls: PgTls) -> Self {
        self.tls = tls;
        self
    }

    /// How long a connection attempt may take (default 10 s).
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The TLS mode.
    pub fn tls(&self) -> &PgTls {
        &self.tls
    }

    /// `postgresql://user@host:port/dbname` (never the password).
    pub fn target(&self) -> &str {
        &self.target
    }

    fn err(&self) -> impl Fn(postgres::Error) -> AuditError + '_ {
        move |e| AuditError::Postgres {
            target: self.target.clone(),
            message: pg_message(&e),
        }
    }

    /// A new connection with `synchronous_commit = on` (a commit returns once it is durable).
    pub(crate) fn connect(&self) -> Result<Client, AuditError> {
        let bad = |message: String| AuditError::Postgres {
            target: self.target.clone(),
            message,
        };
        let mut cfg = postgres::Config::from_str(&self.url).map_err(self.err())?;
        if let Some(p) = &self.password {
            cfg.password(p.as_bytes());
        }
        cfg.connect_timeout(self.connect_timeout);
        if cfg.get_application_name().is_none() {
            cfg.application_name("chitin-audit");
        }
        let connected = match &self.tls {
            PgTls::Disable => {
                cfg.ssl_mode(postgres::config::SslMode::Disable);
                cfg.connect(NoTls)
            }
            tls => {
                cfg.ssl_mode(postgres::config::SslMode::Require);
                let config = tls_config(tls).map_err(bad)?;
                cfg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(config))
            }
        };
        let mut client = connected.map_err(|e| {
            bad(format!(
                "cannot connect ({}); check the URL, that the server is up and the TLS mode \
                 (sslmode)",
                pg_message(&e)
            ))
        })?;
        client
            .batch_execute("SET synchronous_commit TO on")
            .map_err(self.err())?;
        Ok(client)
    }
}

/// The error and its causes (`postgres::Error` alone only says "db error").
fn pg_message(e: &postgres::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%'
            && let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2)))
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tls_config(tls: &PgTls) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    match tls {
        PgTls::Disable => Err("TLS is disabled".into()),
        PgTls::Require => Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
            .with_no_client_auth()),
        PgTls::VerifyFull { ca_file } => {
            let mut roots = rustls::RootCertStore::empty();
            match ca_file {
                Some(path) => {
                    let certs = CertificateDer::pem_file_iter(path)
                        .map_err(|e| format!("read CA file {}: {e}", path.display()))?;
                    for cert in certs {
                        let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                        roots
                            .add(cert)
                            .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                    }
                }
                None => {
                    for cert in rustls_native_certs::load_native_certs().certs {
                        // A system root rustls cannot parse is skipped, not fatal.
                        let _ = roots.add(cert);
                    }
                }
            }
            if roots.is_empty() {
                return Err("sslmode=verify-full but no CA certificate was found; give \
                     sslrootcert=FILE (PEM) or install the system CA certificates"
                    .into());
            }
            Ok(builder.with_root_certificates(roots).with_no_client_auth())
        }
    }
}

/// `sslmode=require`: any certificate is accepted (the handshake signature is still checked).
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The table layout version, or 0 when there are no audit tables yet.
fn schema_version(
    client: &mut impl postgres::GenericClient,
    config: &PgConfig,
) -> Result<i64, AuditError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('audit_meta') IS NOT NULL", &[])
        .and_then(|r| r.try_get(0))
        .map_err(config.err())?;
    if !exists {
        return Ok(0);
    }
    let v: Option<String> = client
        .query_opt(
            "SELECT value FROM audit_meta WHERE name = 'schema_version'",
            &[],
        )
        .and_then(|r| r.map(|r| r.try_get(0)).transpose())
        .map_err(config.err())?;
    let v = v.and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
    if v > SCHEMA_VERSION {
        return Err(AuditError::Postgres {
            target: config.target.clone(),
            message: format!(
                "the audit tables were written by a newer Chitin (layout {v}, this build knows up \
                 to {SCHEMA_VERSION}); upgrade Chitin"
            ),
        });
    }
    Ok(v)
}

/// Creates the tables once (serialized: several writers may start together).
fn ensure_schema(client: &mut Client, config: &PgConfig) -> Result<(), AuditError> {
    let mut tx = client.transaction().map_err(config.err())?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .map_err(config.err())?;
    if schema_version(&mut tx, config)? < 1 {
        tx.batch_execute(SCHEMA_V1).map_err(config.err())?;
        tx.execute(
            "INSERT INTO audit_meta (name, value) VALUES ('schema_version', $1)",
            &[&SCHEMA_VERSION.to_string()],
        )
        .map_err(config.err())?;
    }
    tx.commit().map_err(config.err())
}

/// Records the deployment's public key on first use; refuses a writer with another key.
fn claim_key(
    client: &mut impl postgres::GenericClient,
    config: &PgConfig,
    key: &PublicKey,
) -> Result<(), AuditError> {
    let text = key.to_text().trim().to_string();
    client
        .execute(
            "INSERT INTO audit_meta (name, value) VALUES ('public_key', $1) \
             ON CONFLICT (name) DO NOTHING",
            &[&text],
        )
        .map_err(config.err())?;
    let stored: String = client
        .query_one(
            "SELECT value FROM audit_meta WHERE name = 'public_key'",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(config.err())?;
    if stored != text {
        let theirs = PublicKey::parse(&stored).map_or_else(|_| "?".into(), |k| k.id_hex());
        return Err(AuditError::KeyFile {
            path: config.target_path.clone(),
            reason: format!(
                "this audit log is signed by key {theirs} but this gateway's audit key is {}; \
                 every gateway of a deployment needs the same audit key (see docs/audit-postgres.md)",
                key.id_hex()
            ),
        });
    }
    Ok(())
}

/// A column of a tampered row with an unexpected NULL reads as empty (the verifier rejects the
/// record); a column whose type was altered is reported as a damaged log.
fn col<'a, T: postgres::types::FromSql<'a>>(
    row: &'a Row,
    i: usize,
    config: &PgConfig,
) -> Result<Option<T>, AuditError> {
    row.try_get::<_, Option<T>>(i)
        .map_err(|e| AuditError::Postgres {
            target: config.target.clone(),
            message: format!(
                "altered schema: column {} of the audit tables has an unexpected type ({})",
                row.columns().get(i).map_or("?", |c| c.name()),
                pg_message(&e)
            ),
        })
}

fn row_to_record(row: &Row, config: &PgConfig) -> Result<Record, AuditError> {
    Ok(Record {
        seq: col(row, 0, config)?.unwrap_or(i64::MIN),
        ts_ms: col(row, 1, config)?.unwrap_or(i64::MIN),
        kind: col(row, 2, config)?.unwrap_or_default(),
        actor: col(row, 3, config)?.unwrap_or_default(),
        action: col(row, 4, config)?.unwrap_or_default(),
        resource: col(row, 5, config)?.unwrap_or_default(),
        decision: col(row, 6, config)?.unwrap_or_default(),
        policies: col(row, 7, config)?.unwrap_or_default(),
        outcome: col(row, 8, config)?.unwrap_or_default(),
        payload_digest: col(row, 9, config)?.unwrap_or_default(),
        payload: col(row, 10, config)?,
        removed_at_ms: col(row, 11, config)?,
        removed_reason: col(row, 12, config)?,
        field_check: col(row, 13, config)?.unwrap_or_default(),
        prev_hash: col(row, 14, config)?.unwrap_or_default(),
        hash: col(row, 15, config)?.unwrap_or_default(),
    })
}

fn row_to_checkpoint(row: &Row, config: &PgConfig) -> Result<Checkpoint, AuditError> {
    Ok(Checkpoint {
        seq: col(row, 0, config)?.unwrap_or(i64::MIN),
        head: col(row, 1, config)?.unwrap_or_default(),
        time_ms: col(row, 2, config)?.unwrap_or(i64::MIN),
        key_id: col(row, 3, config)?.unwrap_or_default(),
        sig: col(row, 4, config)?.unwrap_or_default(),
    })
}

fn head_of(row: Option<Row>, config: &PgConfig) -> Result<Head, AuditError> {
    match row {
        None => Ok(None),
        Some(r) => Ok(Some((
            col(&r, 0, config)?.unwrap_or(i64::MIN),
            col(&r, 1, config)?.unwrap_or_default(),
        ))),
    }
}

/// Statements prepared once per connection.
struct Prepared {
    insert: Statement,
    lock_head: Statement,
    last: Statement,
    update_head: Statement,
}

/// The PostgreSQL side of the writer.
pub(crate) struct PgStore {
    config: PgConfig,
    conn: Option<(Client, Prepared)>,
}

impl PgStore {
    /// Connects, creates the tables if needed and claims (or checks) the deployment's key.
    pub(crate) fn open(config: &PgConfig, key: &PublicKey) -> Result<Self, AuditError> {
        let mut client = config.connect()?;
        ensure_schema(&mut client, config)?;
        claim_key(&mut client, config, key)?;
        let prepared = prepare(&mut client, config)?;
        Ok(Self {
            config: config.clone(),
            conn: Some((client, prepared)),
        })
    }

    fn conn(&mut self) -> Result<(&mut Client, &Prepared), AuditError> {
        if self.conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            let mut client = self.config.connect()?;
            if schema_version(&mut client, &self.config)? < 1 {
                return Err(AuditError::Postgres {
                    target: self.config.target.clone(),
                    message: "the audit tables are gone; run `chitin audit verify`".into(),
                });
            }
            let prepared = prepare(&mut client, &self.config)?;
            self.conn = Some((client, prepared));
        }
        match &mut self.conn {
            Some((c, p)) => Ok((c, p)),
            None => Err(AuditError::Internal("no connection".into())),
        }
    }
}

fn prepare(client: &mut Client, config: &PgConfig) -> Result<Prepared, AuditError> {
    Ok(Prepared {
        insert: client.prepare(INSERT_BATCH).map_err(config.err())?,
        lock_head: client.prepare(LOCK_HEAD).map_err(config.err())?,
        last: client.prepare(LAST_RECORD).map_err(config.err())?,
        update_head: client.prepare(UPDATE_HEAD).map_err(config.err())?,
    })
}

impl WriterStore for PgStore {
    fn commit(
        &mut self,
        removal: Option<&Removal<'_>>,
        build: &mut BuildRows<'_>,
    ) -> Result<(), AuditError> {
        let config = self.config.clone();
        let e = config.err();
        let (client, st) = self.conn()?;
        let mut tx = client.transaction().map_err(&e)?;
        // The write lock: every writer of the deployment queues here.
        let locked = tx.query_one(&st.lock_head, &[]).map_err(&e)?;
        let head_seq: i64 = col(&locked, 0, &config)?.unwrap_or(i64::MIN);
        let head_hash: Vec<u8> = col(&locked, 1, &config)?.unwrap_or_default();
        if let Some(r) = removal {
            let changed = tx
                .execute(
                    "UPDATE audit_records SET payload = NULL, removed_at_ms = $1, \
                     removed_reason = $2 \
                     WHERE seq = $3 AND payload IS NOT NULL AND payload_digest = $4",
                    &[&r.now, &r.reason, &r.seq, &r.digest],
                )
                .map_err(&e)?;
            if changed != 1 {
                return Err(r.changed_error());
            }
        }
        let head = head_of(tx.query_opt(&st.last, &[]).map_err(&e)?, &config)?;
        let agrees = match &head {
            None => head_seq == 0 && head_hash[..] == GENESIS_HASH[..],
            Some((s, h)) => *s == head_seq && *h == head_hash,
        };
        if !agrees {
            return Err(AuditError::Postgres {
                target: config.target.clone(),
                message: format!(
                    "the audit tables disagree: the head row says record {head_seq} but the \
                     records end at {}; they were changed outside Chitin, so nothing more is \
                     appended. Run `chitin audit verify`",
                    head.as_ref().map_or(0, |h| h.0)
                ),
            });
        }
        let rows = build(head)?;
        if let Some(last) = rows.last() {
            let n = rows.len();
            let mut seq = Vec::with_capacity(n);
            let mut ts = Vec::with_capacity(n);
            let mut text: [Vec<&str>; 7] = Default::default();
            let mut digest = Vec::with_capacity(n);
            let mut payload = Vec::with_capacity(n);
            let mut check = Vec::with_capacity(n);
            let mut prev = Vec::with_capacity(n);
            let mut hash = Vec::with_capacity(n);
            for r in &rows {
                seq.push(r.seq);
                ts.push(r.ts_ms);
                for (col, v) in text.iter_mut().zip([
                    &r.kind,
                    &r.actor,
                    &r.action,
                    &r.resource,
                    &r.decision,
                    &r.policies,
                    &r.outcome,
                ]) {
                    col.push(v.as_str());
                }
                digest.push(r.payload_digest.as_slice());
                payload.push(r.payload.as_deref());
                check.push(r.field_check.as_slice());
                prev.push(r.prev_hash.as_slice());
                hash.push(r.hash.as_slice());
            }
            let [kind, actor, action, resource, decision, policies, outcome] = &text;
            tx.execute(
                &st.insert,
                &[
                    &seq, &ts, kind, actor, action, resource, decision, policies, outcome, &digest,
                    &payload, &check, &prev, &hash,
                ],
            )
            .map_err(&e)?;
            tx.execute(&st.update_head, &[&last.seq, &last.hash])
                .map_err(&e)?;
        }
        tx.commit().map_err(&e)
    }

    fn head(&mut self) -> Result<Head, AuditError> {
        let config = self.config.clone();
        let (client, st) = self.conn()?;
        head_of(
            client.query_opt(&st.last, &[]).map_err(config.err())?,
            &config,
        )
    }

    fn payload_facts(&mut self, seq: i64) -> Result<Option<PayloadFacts>, AuditError> {
        let config = self.config.clone();
        let (client, _) = self.conn()?;
        let row = client
            .query_opt(
                "SELECT payload_digest, payload, kind, action FROM audit_records WHERE seq = $1",
                &[&seq],
            )
            .map_err(config.err())?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                col(&r, 0, &config)?.unwrap_or_default(),
                col(&r, 1, &config)?,
                col(&r, 2, &config)?.unwrap_or_default(),
                col(&r, 3, &config)?.unwrap_or_default(),
            ))),
        }
    }

    fn last_checkpoint(&mut self) -> Result<Option<Checkpoint>, AuditError> {
        let config = self.config.clone();
        let (client, _) = self.conn()?;
        client
            .query_opt(
                "SELECT seq, head, time_ms, key_id, sig FROM audit_checkpoints \
                 ORDER BY seq DESC, id DESC LIMIT 1",
                &[],
            )
            .map_err(config.err())?
            .map(|r| row_to_checkpoint(&r, &config))
            .transpose()
    }

    fn checkpoint_marks(&mut self) -> Result<Option<(i64, i64)>, AuditError> {
        let config = self.config.clone();
        let (client, _) = self.conn()?;
        let row = client
            .query_one(
                "SELECT (SELECT seq FROM audit_checkpoints ORDER BY seq DESC LIMIT 1), \
                 (SELECT time_ms FROM audit_checkpoints ORDER BY id DESC LIMIT 1)",
                &[],
            )
            .map_err(config.err())?;
        let seq: Option<i64> = col(&row, 0, &config)?;
        let time: Option<i64> = col(&row, 1, &config)?;
        Ok(seq.zip(time))
    }

    fn insert_checkpoint(&mut self, cp: &Checkpoint) -> Result<(), AuditError> {
        let config = self.config.clone();
        let (client, _) = self.conn()?;
        insert_checkpoint(client, &config, cp)
    }

    fn reader(&self) -> Result<AuditReader, AuditError> {
        AuditReader::open_postgres(&self.config)
    }

    fn shared(&self) -> bool {
        true
    }

    fn own_thread(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.conn = None;
    }
}

fn insert_checkpoint(
    client: &mut impl postgres::GenericClient,
    config: &PgConfig,
    cp: &Checkpoint,
) -> Result<(), AuditError> {
    client
        .execute(
            "INSERT INTO audit_checkpoints (seq, head, time_ms, key_id, sig) \
             VALUES ($1, $2, $3, $4, $5)",
            &[&cp.seq, &cp.head, &cp.time_ms, &cp.key_id, &cp.sig],
        )
        .map_err(config.err())?;
    Ok(())
}

/// Read-only access to the PostgreSQL log. Each call reads one consistent snapshot.
pub(crate) struct PgReader {
    config: PgConfig,
    client: Mutex<Client>,
}

/// Rows fetched per round trip while streaming.
const FETCH: i32 = 2048;

impl PgReader {
    pub(crate) fn open(config: &PgConfig) -> Result<Self, AuditError> {
        let mut client = config.connect()?;
        if schema_version(&mut client, config)? < 1 {
            return Err(AuditError::Postgres {
                target: config.target.clone(),
                message: "no audit log in this database (no audit tables): a gateway creates \
                          them when it first opens the log"
                    .into(),
            });
        }
        Ok(Self {
            config: config.clone(),
            client: Mutex::new(client),
        })
    }

    pub(crate) fn reopen(&self) -> Result<Self, AuditError> {
        Self::open(&self.config)
    }

    pub(crate) fn target_path(&self) -> &Path {
        &self.config.target_path
    }

    fn client(&self) -> std::sync::MutexGuard<'_, Client> {
        self.client.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn records(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Record>, AuditError> {
        let rows = self
            .client()
            .query(sql, params)
            .map_err(self.config.err())?;
        rows.iter()
            .map(|r| row_to_record(r, &self.config))
            .collect()
    }

    pub(crate) fn query(&self, q: &Query) -> Result<Vec<Record>, AuditError> {
        let limit = q.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        self.records(
            &format!(
                "SELECT * FROM (SELECT {COLUMNS} FROM audit_records \
                 WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR actor = $2) \
                 AND ($3::int8 IS NULL OR ts_ms >= $3) AND ($4::int8 IS NULL OR ts_ms <= $4) \
                 ORDER BY seq DESC LIMIT $5) AS recent ORDER BY seq"
            ),
            &[&q.kind, &q.actor, &q.since_ms, &q.until_ms, &limit],
        )
    }

    pub(crate) fn range(&self, from: i64, to: i64) -> Result<Vec<Record>, AuditError> {
        self.records(
            &format!(
                "SELECT {COLUMNS} FROM audit_records WHERE seq >= $1 AND seq <= $2 ORDER BY seq"
            ),
            &[&from, &to],
        )
    }

    /// Streams through a portal in one read-only snapshot: constant memory, and stopping early
    /// reads nothing more.
    pub(crate) fn for_each_from(
        &self,
        from: i64,
        f: &mut dyn FnMut(Record) -> bool,
    ) -> Result<(), AuditError> {
        let e = self.config.err();
        let mut client = self.client();
        let mut tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(&e)?;
        let portal = tx
            .bind(
                format!("SELECT {COLUMNS} FROM audit_records WHERE seq >= $1 ORDER BY seq")
                    .as_str(),
                &[&from],
            )
            .map_err(&e)?;
        loop {
            let rows = tx.query_portal(&portal, FETCH).map_err(&e)?;
            if rows.is_empty() {
                break;
            }
            for row in &rows {
                if !f(row_to_record(row, &self.config)?) {
                    return tx.commit().map_err(&e);
                }
            }
        }
        tx.commit().map_err(&e)
    }

    pub(crate) fn seq_bounds(
        &self,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<Option<(i64, i64)>, AuditError> {
        let row = self
            .client()
            .query_one(
                "SELECT (SELECT MIN(seq) FROM audit_records WHERE $1::int8 IS NULL OR ts_ms >= $1), \
                 (SELECT MAX(seq) FROM audit_records WHERE $2::int8 IS NULL OR ts_ms <= $2)",
                &[&since_ms, &until_ms],
            )
            .map_err(self.config.err())?;
        let first: Option<i64> = col(&row, 0, &self.config)?;
        let last: Option<i64> = col(&row, 1, &self.config)?;
        Ok(match (first, last) {
            (Some(a), Some(b)) if a <= b => Some((a, b)),
            _ => None,
        })
    }

    pub(crate) fn checkpoints(&self) -> Result<Vec<Checkpoint>, AuditError> {
        let rows = self
            .client()
            .query(
                "SELECT seq, head, time_ms, key_id, sig FROM audit_checkpoints ORDER BY id",
                &[],
            )
            .map_err(self.config.err())?;
        rows.iter()
            .map(|r| row_to_checkpoint(r, &self.config))
            .collect()
    }

    pub(crate) fn head(&self) -> Result<Head, AuditError> {
        let row = self
            .client()
            .query_opt(LAST_RECORD, &[])
            .map_err(self.config.err())?;
        head_of(row, &self.config)
    }
}

/// What [`copy_from_sqlite`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopySummary {
    pub records: u64,
    pub checkpoints: u64,
    /// The last record copied (0 for an empty log).
    pub head_seq: i64,
}

/// Copies a SQLite audit log (`audit.db` and its `audit.checkpoints`) into an empty
/// PostgreSQL log, in one transaction: every record as stored (seq, time, hashes, removed
/// payloads) and every checkpoint (the database's and the file's), so the copied chain verifies
/// with the same public key. The source must verify first (a damaged log is not carried over),
/// and a target that already has records or checkpoints is refused (two chains cannot merge).
pub fn copy_from_sqlite(
    db: &Path,
    checkpoint_file: Option<&Path>,
    key: &PublicKey,
    to: &PgConfig,
) -> Result<CopySummary, AuditError> {
    let report = crate::Verifier::new(*key)
        .verify_db(db, checkpoint_file)?
        .map_err(|t| {
            AuditError::InvalidInput(format!(
                "the SQLite audit log {} does not verify ({t}); copying it would carry the \
                 damage into PostgreSQL. Run `chitin audit verify` first",
                db.display()
            ))
        })?;
    let reader = AuditReader::open(db)?;
    let checkpoints = crate::export::known_checkpoints(&reader, checkpoint_file)?;
    let e = to.err();
    let mut client = to.connect()?;
    ensure_schema(&mut client, to)?;
    let mut tx = client.transaction().map_err(&e)?;
    tx.query_one(LOCK_HEAD, &[]).map_err(&e)?;
    claim_key(&mut tx, to, key)?;
    let row = tx
        .query_one(
            "SELECT (SELECT count(*) FROM audit_records), (SELECT count(*) FROM audit_checkpoints)",
            &[],
        )
        .map_err(&e)?;
    let (have_records, have_cps): (i64, i64) = (
        col(&row, 0, to)?.unwrap_or(0),
        col(&row, 1, to)?.unwrap_or(0),
    );
    if have_records > 0 || have_cps > 0 {
        return Err(AuditError::InvalidInput(format!(
            "{} already holds an audit log ({have_records} records, {have_cps} checkpoints); \
             a copy goes into an empty database only (two chains cannot be merged)",
            to.target
        )));
    }
    let types = [
        Type::INT8,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::BYTEA,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::BYTEA,
        Type::BYTEA,
        Type::BYTEA,
    ];
    let sink = tx
        .copy_in(format!("COPY audit_records ({COLUMNS}) FROM STDIN (FORMAT binary)").as_str())
        .map_err(&e)?;
    let mut writer = postgres::binary_copy::BinaryCopyInWriter::new(sink, &types);
    let mut failed: Option<AuditError> = None;
    let mut records: u64 = 0;
    reader.for_each_from(i64::MIN, |r| {
        let values: [&(dyn ToSql + Sync); 16] = [
            &r.seq,
            &r.ts_ms,
            &r.kind,
            &r.actor,
            &r.action,
            &r.resource,
            &r.decision,
            &r.policies,
            &r.outcome,
            &r.payload_digest,
            &r.payload,
            &r.removed_at_ms,
            &r.removed_reason,
            &r.field_check,
            &r.prev_hash,
            &r.hash,
        ];
        match writer.write(&values) {
            Ok(()) => {
                records += 1;
                true
            }
            Err(err) => {
                failed = Some(AuditError::Postgres {
                    target: to.target.clone(),
                    message: format!("copy record {}: {}", r.seq, pg_message(&err)),
                });
                false
            }
        }
    })?;
    if let Some(err) = failed {
        return Err(err);
    }
    writer.finish().map_err(&e)?;
    let mut copied_cps: u64 = 0;
    for cp in &checkpoints {
        insert_checkpoint(&mut tx, to, cp)?;
        copied_cps += 1;
    }
    let head_seq = report.last_seq.unwrap_or(0);
    tx.execute(UPDATE_HEAD, &[&head_seq, &report.head.to_vec()])
        .map_err(&e)?;
    tx.commit().map_err(&e)?;
    Ok(CopySummary {
        records,
        checkpoints: copied_cps,
        head_seq,
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
    fn a_url_names_its_target_without_the_password_and_takes_the_tls_mode_out() {
        let c =
            PgConfig::from_url("postgres://alice:s3cret@db.example:6543/chitin?sslmode=require")
                .unwrap();
        assert_eq!(c.target(), "postgresql://alice@db.example:6543/chitin");
        assert_eq!(c.tls(), &PgTls::Require);
        assert!(!c.url.contains("sslmode"));
        let c = PgConfig::from_url("postgresql://bob@127.0.0.1/test").unwrap();
        assert_eq!(c.tls(), &PgTls::VerifyFull { ca_file: None });
        let c = PgConfig::from_url(
            "postgres://bob@h/d?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            c.tls(),
            &PgTls::VerifyFull {
                ca_file: Some(PathBuf::from("/etc/ca.pem"))
            }
        );
        assert!(c.url.ends_with("?connect_timeout=3"));
    }

    #[test]
    fn a_tls_mode_that_falls_back_to_plain_text_is_refused() {
        for mode in ["prefer", "allow"] {
            let err = PgConfig::from_url(&format!("postgres://u@h/d?sslmode={mode}"))
                .err()
                .unwrap()
                .to_string();
            assert!(err.contains("silently falls back to plain text"), "{err}");
        }
        let err = PgConfig::from_url("host=h user=u")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("expected postgres://"), "{err}");
    }
}
