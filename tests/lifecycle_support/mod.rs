//! Shared set-up for the lifecycle tests: a private state dir with the same pieces the gateway
//! holds (secret store → audit key and vault master key, audit log, state store, vault, gate),
//! all on one injected clock, and helpers that insert the agent's rows the way the agent loop
//! writes them (content sealed with the vault).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    reason = "tests"
)]

#[path = "../support/home.rs"]
pub mod home;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use age::secrecy::SecretString;
use chitin::clock::{Clock, ManualClock};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::lifecycle::Lifecycle;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;
use chitin::store::{Dialect, params};
use chitin::vault::Vault;
use chitin_store::testing::TestPg;
use serde_json::{Value, json};

pub const PASS: &str = "lifecycle-test-pass";
pub const DAY: i64 = 86_400_000;
/// 2026-01-01T00:00:00Z.
pub const T0: i64 = 1_767_225_600_000;

pub struct H {
    /// The store's PostgreSQL database (dropped after everything else), for `harness_on`.
    pub pg: Option<TestPg>,
    pub _t: tempfile::TempDir,
    pub home: PathBuf,
    pub clock: ManualClock,
    pub lc: Lifecycle,
    pub gate: Gate,
}

pub fn secrets_config() -> SecretsConfig {
    SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 16,
        ..SecretsConfig::default()
    }
}

pub fn open_store(home: &Path) -> SecretStore {
    SecretStore::open_with(
        home,
        &secrets_config(),
        Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap()
}

pub fn harness() -> H {
    harness_on(Dialect::Sqlite)
}

/// [`harness`] with the state store on `d` (a fresh PostgreSQL database for `Postgres`).
pub fn harness_on(d: Dialect) -> H {
    let t = tempfile::tempdir().unwrap();
    let home = home::private_home(t.path(), "home");
    let ents = json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []}
    ]);
    home::write_private(&home.join("entities.json"), ents.to_string().as_bytes());
    let clock = ManualClock::new(T0);
    let pg = (d == Dialect::Postgres).then(|| TestPg::new().unwrap());
    open_on(t, home, clock, pg)
}

/// A store on the PostgreSQL database of `h` (another replica's), or on its state.db.
pub fn second_store(h: &H) -> Arc<Store> {
    match &h.pg {
        Some(pg) => Arc::new(Store::postgres(&pg.config()).unwrap()),
        None => Arc::new(Store::open(&h.home.join("state.db")).unwrap()),
    }
}

/// Opens every piece on an existing home (as after a restart or restore).
pub fn open_at(t: tempfile::TempDir, home: PathBuf, clock: ManualClock) -> H {
    open_on(t, home, clock, None)
}

/// [`harness_on`] PostgreSQL with the audit log in that database too (its `audit_*` tables),
/// as a gateway whose `[store]` is PostgreSQL keeps it.
pub fn harness_with_postgres_audit() -> H {
    let t = tempfile::tempdir().unwrap();
    let home = home::private_home(t.path(), "home");
    let clock = ManualClock::new(T0);
    open_with(t, home, clock, Some(TestPg::new().unwrap()), true)
}

/// [`open_at`] with the store on `pg` when given.
pub fn open_on(t: tempfile::TempDir, home: PathBuf, clock: ManualClock, pg: Option<TestPg>) -> H {
    open_with(t, home, clock, pg, false)
}

/// [`open_on`]; with `pg_audit`, the audit log is in `pg`'s database too.
fn open_with(
    t: tempfile::TempDir,
    home: PathBuf,
    clock: ManualClock,
    pg: Option<TestPg>,
    pg_audit: bool,
) -> H {
    let mut secrets = open_store(&home);
    let signer = chitin::secrets::audit_key::signer(&mut secrets, &home).unwrap();
    let c = clock.clone();
    let options = chitin_audit::AuditOptions {
        signer: Some(Arc::new(signer)),
        clock: Arc::new(move || c.now_ms()),
        ..Default::default()
    };
    let audit = Arc::new(match pg.as_ref().filter(|_| pg_audit) {
        Some(pg) => chitin_audit::AuditLog::open_postgres(
            &home,
            &chitin_audit::PgConfig::from_url(&format!("{}?sslmode=disable", pg.url())).unwrap(),
            options,
        )
        .unwrap(),
        None => chitin_audit::AuditLog::open(&home, options).unwrap(),
    });
    let store = Arc::new(match &pg {
        Some(pg) => Store::postgres(&pg.config()).unwrap(),
        None => Store::open(&home.join("state.db")).unwrap(),
    });
    // As the gateway and the CLI open it: on PostgreSQL the data keys are the database's.
    let vault = Vault::for_db(
        &home,
        store.db(),
        &mut secrets,
        Arc::new(clock.clone()) as Arc<dyn Clock>,
    )
    .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let gate = Gate::new(Arc::new(engine), Arc::clone(&audit));
    let lc = Lifecycle {
        home: home.clone(),
        store,
        audit,
        vault: Arc::new(vault),
        clock: Arc::new(clock.clone()),
    };
    H {
        pg,
        _t: t,
        home,
        clock,
        lc,
        gate,
    }
}

pub fn user(id: &str) -> String {
    format!("Chitin::User::\"{id}\"")
}

pub fn session(h: &H, key: &str, subject: &str, user_id: &str, at: i64, summary: Option<&str>) {
    let sealed = summary.map(|s| {
        h.lc.vault
            .seal(subject, json!({"summary": s}).to_string().as_bytes())
            .unwrap()
    });
    exec(
        h,
        "INSERT INTO sessions (key, user_id, subject, channel, created_ms, updated_ms, summary)
         VALUES (?1, ?2, ?3, 'web', ?4, ?4, ?5)",
        params![key, user_id, subject, at, sealed],
    );
}

/// Inserts a message the way the agent does: `body = vault.seal(subject, JSON)`.
#[allow(clippy::too_many_arguments, reason = "one column each")]
pub fn message(
    h: &H,
    session: &str,
    subject: &str,
    seq: i64,
    role: &str,
    class: &str,
    at: i64,
    text: &str,
) -> i64 {
    let body = json!({"role": role, "content": text}).to_string();
    let sealed = h.lc.vault.seal(subject, body.as_bytes()).unwrap();
    h.lc.store
        .db()
        .with(|c| {
            c.query_row(
                "INSERT INTO messages (session_key, run_id, subject, seq, role, class, created_ms, size, body)
                 VALUES (?1, NULL, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING id",
                params![session, subject, seq, role, class, at, i64::try_from(body.len()).unwrap(), sealed],
            )?
            .get::<i64>(0)
        })
        .unwrap()
}

pub fn run_row(h: &H, id: &str, session: &str, subject: &str, user_id: &str, at: i64) {
    exec(
        h,
        "INSERT INTO runs (id, session_key, user_id, subject, status, created_ms, updated_ms, finished_ms, model)
         VALUES (?1, ?2, ?3, ?4, 'completed', ?5, ?5, ?5, 'fake/model')",
        params![id, session, user_id, subject, at],
    );
}

pub fn usage_row(h: &H, subject: &str, user_id: &str, session: &str, run: &str, at: i64) {
    exec(
        h,
        "INSERT INTO usage (at_ms, user_id, subject, session_key, run_id, model, input_tokens, output_tokens, cost_usd)
         VALUES (?1, ?2, ?3, ?4, ?5, 'fake/model', 10, 20, 0.01)",
        params![at, user_id, subject, session, run],
    );
}

#[allow(clippy::too_many_arguments, reason = "one column each")]
pub fn approval(
    h: &H,
    id: &str,
    requester: &str,
    resolved_by: Option<&str>,
    status: &str,
    at: i64,
    summary: &str,
) {
    exec(
        h,
        "INSERT INTO approvals (id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms, resolved_by, resolved_ms)
         VALUES (?1, ?1, ?2, 's', 'exec', ?3, '{}', ?9, ?4, ?5, ?6, ?7, ?8)",
        params![id, requester, summary, status, at, at + 600_000, resolved_by, resolved_by.map(|_| at + 1000), vec![0u8]],
    );
}

/// Appends an audit record at the clock's time (as the gate/tools do).
pub fn audit_record(h: &H, actor: &str, action: &str, resource: &str, payload: Value) -> i64 {
    h.lc.audit
        .append(chitin_audit::RecordInput::admin(
            actor, action, resource, payload,
        ))
        .unwrap()
        .seq
}

pub fn count(h: &H, sql: &str) -> i64 {
    h.lc.store
        .db()
        .with(|c| c.query_row(sql, params![])?.get::<i64>(0))
        .unwrap()
}

/// Runs one statement on the harness's store (either backend).
pub fn exec(h: &H, sql: &str, p: &[&dyn chitin_store::ToValue]) -> u64 {
    h.lc.store.db().with(|c| c.execute(sql, p)).unwrap()
}

/// `chitin audit verify` on the state dir.
pub fn audit_verifies(home: &Path) -> String {
    let key = chitin_audit::PublicKey::load(&home.join(chitin_audit::PUB_FILE)).unwrap();
    match chitin_audit::Verifier::new(key)
        .verify_db(
            &home.join(chitin_audit::DB_FILE),
            Some(&home.join(chitin_audit::CHECKPOINT_FILE)),
        )
        .unwrap()
    {
        Ok(r) => r.ok_line(),
        Err(t) => panic!("audit does not verify: {t}"),
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
