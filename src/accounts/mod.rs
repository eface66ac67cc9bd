//! Operator accounts (issue #17): people as Cedar `User` entities in groups, their API tokens,
//! browser sessions, paired devices and single sign-on.
//!
//! - **Users** live in `entities.json` (the operator's file) or in the managed store
//!   (`account_users` in `state.db`: `chitin users add`, and users provisioned by single
//!   sign-on). Managed users are installed into the policy engine next to the paired
//!   identities ([`crate::policy::PolicyEngine::set_managed_users`]); a user defined in the
//!   entity files is never redefined here.
//! - **API tokens** (`cht_<id>_<secret>`) are shown once; only SHA-256 of the secret part is
//!   kept, so a token is never recoverable from `state.db`. They are 256-bit random values, so
//!   a fast hash is enough (there is nothing to brute-force).
//! - **Browser sessions** are server-side rows (SHA-256 of the cookie secret, a CSRF token,
//!   idle and absolute expiry); logout and user removal delete them.
//! - **Devices**: a browser that signs in from an address that is not loopback gets a device
//!   cookie and waits as `pending` until an owner approves it (Cedar `pairing.approve`).
//!
//! Every change is decided by Cedar for the acting user (`user.manage`, `token.manage`,
//! `pairing.approve`) and recorded in the audit log before it is committed.

pub mod jwt;
pub mod oidc;

use std::sync::{Arc, Mutex};

use chitin_audit::RecordInput;
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::gate::{Gate, GateError, Verdict};
use crate::policy::Action;
use crate::store::{Dialect, Store, params};

/// Errors of the accounts component.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("policy denied `{action}` for {principal} (determining policies: [{}])", policies.join(", "))]
    Denied {
        action: Action,
        principal: String,
        policies: Vec<String>,
    },
    #[error(
        "invalid user id `{0}`: use 1-128 printable characters without surrounding spaces (e.g. an email address)"
    )]
    InvalidUser(String),
    #[error("invalid group `{0}`: use 1-128 printable characters without surrounding spaces")]
    InvalidGroup(String),
    #[error("user `{0}` is defined in the entity files (entities.json); change or remove it there")]
    DefinedInFile(String),
    #[error("no user `{0}`; add it with `chitin users add {0}` (or define it in entities.json)")]
    UnknownUser(String),
    #[error(
        "user `{0}` was removed by an operator; an owner lets them in again with `chitin users add {0}`"
    )]
    Removed(String),
    #[error("no API token with id `{0}`; `chitin tokens list` shows the ids")]
    UnknownToken(String),
    #[error("no device `{0}`; `chitin devices list` shows the ids")]
    UnknownDevice(String),
    #[error("device `{id}` is {status}; only a pending or approved device can be {wanted}")]
    DeviceState {
        id: String,
        status: String,
        wanted: &'static str,
    },
    #[error("invalid token name: use 1-64 printable characters")]
    InvalidName,
    #[error("{0}")]
    InvalidExpiry(String),
    #[error(
        "the policy engine refused the managed users: {0}; fix the entity files or remove the user"
    )]
    Entities(String),
    #[error("audit record could not be written ({0}); nothing done")]
    Audit(String),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Db(#[from] chitin_store::Error),
    #[error("the system random generator failed: {0}")]
    Random(String),
}

/// Where a managed user came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `chitin users add` (its groups are the operator's; single sign-on never changes them).
    Cli,
    /// Provisioned at an OpenID Connect login (groups from the ID token).
    Oidc,
    /// Provisioned from a trusted identity proxy's token.
    Proxy,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cli => "cli",
            Self::Oidc => "oidc",
            Self::Proxy => "proxy",
        }
    }
}

/// One user as `chitin users list` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserInfo {
    pub user: String,
    pub groups: Vec<String>,
    /// `entities.json`, `cli`, `oidc` or `proxy`.
    pub source: String,
    pub tokens: u64,
    pub sessions: u64,
}

/// What removing a user ended.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Removed {
    pub user: String,
    pub tokens: usize,
    pub sessions: usize,
    pub devices: usize,
}

/// One API token as listed (never its secret or hash).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub name: String,
    pub created_by: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub last_used_ms: Option<i64>,
    pub expired: bool,
}

/// A freshly issued token: shown once, wiped on drop, no `Debug`.
pub struct IssuedToken(zeroize::Zeroizing<String>);

impl IssuedToken {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A new browser session: the cookie value (wiped on drop) and its CSRF token.
pub struct NewSession {
    pub id: String,
    cookie: zeroize::Zeroizing<String>,
    pub csrf: String,
    pub expires_ms: i64,
}

impl NewSession {
    pub fn cookie(&self) -> &str {
        &self.cookie
    }
}

/// A live browser session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub user: String,
    pub method: String,
    pub csrf: String,
    pub device: Option<String>,
    pub expires_ms: i64,
}

/// A device (browser) as listed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: String,
    pub user: String,
    /// `pending`, `approved` or `revoked`.
    pub status: String,
    pub client: String,
    pub user_agent: String,
    pub created_ms: i64,
    pub decided_ms: Option<i64>,
    pub decided_by: Option<String>,
}

/// A new device: its row and the cookie that identifies the browser (wiped on drop).
pub struct NewDevice {
    pub info: DeviceInfo,
    cookie: zeroize::Zeroizing<String>,
}

impl NewDevice {
    pub fn cookie(&self) -> &str {
        &self.cookie
    }
}

/// The prefix of per-user API tokens (the gateway token is 64 hex digits, so they never
/// collide).
pub const TOKEN_PREFIX: &str = "cht_";
const ID_HEX: usize = 16;

pub(crate) fn hex(b: &[u8]) -> String {
    chitin_audit::to_hex(b)
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], AccountsError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| AccountsError::Random(e.to_string()))?;
    Ok(b)
}

pub(crate) fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `<id>.<secret>` / `cht_<id>_<secret>`: a 16-hex id and the secret.
fn split_credential(s: &str, sep: char) -> Option<(&str, &str)> {
    let id = s.get(..ID_HEX)?;
    let rest = s.get(ID_HEX..)?;
    let secret = rest.strip_prefix(sep)?;
    (id.bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && !secret.is_empty())
    .then_some((id, secret))
}

/// Checks a user id: 1-128 printable characters, no surrounding spaces.
pub fn valid_user(user: &str) -> Result<(), AccountsError> {
    if user.is_empty()
        || user.chars().count() > 128
        || user.trim() != user
        || user.chars().any(char::is_control)
    {
        return Err(AccountsError::InvalidUser(
            user.chars()
                .take(64)
                .collect::<String>()
                .escape_default()
                .to_string(),
        ));
    }
    Ok(())
}

fn valid_group(group: &str) -> Result<(), AccountsError> {
    if group.is_empty()
        || group.chars().count() > 128
        || group.trim() != group
        || group.chars().any(char::is_control)
    {
        return Err(AccountsError::InvalidGroup(
            group
                .chars()
                .take(64)
                .collect::<String>()
                .escape_default()
                .to_string(),
        ));
    }
    Ok(())
}

fn user_entity(user: &str, groups: &[String]) -> Value {
    json!({
        "uid": {"type": "Chitin::User", "id": user},
        "attrs": {},
        "parents": groups.iter().map(|g| json!({"type": "Chitin::Group", "id": g})).collect::<Vec<_>>(),
    })
}

/// The principal of a user as the audit log names it.
pub fn principal(user: &str) -> String {
    format!("Chitin::User::{}", Value::String(user.to_string()))
}

/// Operator accounts over `state.db`, decided by the gate's policies.
#[derive(Clone)]
pub struct Accounts {
    store: Arc<Store>,
    gate: Gate,
    clock: Arc<dyn Clock>,
    /// The version of the managed users when they were last installed (see
    /// [`Accounts::refresh`]).
    seen: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts").finish_non_exhaustive()
    }
}

type Row = (String, Vec<String>, String);
/// user, hash, expires, last used.
type TokenRow = (String, Vec<u8>, Option<i64>, Option<i64>);
/// hash, user, method, csrf, device, last seen, expires.
type SessionRow = (Vec<u8>, String, String, String, Option<String>, i64, i64);

impl Accounts {
    pub fn new(store: Arc<Store>, gate: Gate, clock: Arc<dyn Clock>) -> Self {
        Self {
            store,
            gate,
            clock,
            seen: Arc::new(Mutex::new(None)),
        }
    }

    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Decides an administrative action for `actor` (the gate records the decision).
    pub fn decide(&self, actor: &str, action: Action) -> Result<(), AccountsError> {
        let req = crate::gate::admin_request(actor, action, serde_json::Map::new())?;
        match self.gate.check(&req)? {
            Verdict::Allowed(..) => Ok(()),
            Verdict::Denied(d) | Verdict::ApprovalRequired { decision: d, .. } => {
                Err(AccountsError::Denied {
                    action,
                    principal: principal(actor),
                    policies: d.policies,
                })
            }
        }
    }

    /// Appends an audit record; an action that cannot be recorded does not happen.
    pub fn audit(&self, record: RecordInput) -> Result<(), AccountsError> {
        self.gate
            .audit()
            .append(record)
            .map(|_| ())
            .map_err(|e| AccountsError::Audit(e.to_string()))
    }

    fn admin_record(actor: &str, action: &str, resource: &str, payload: Value) -> RecordInput {
        RecordInput::admin(principal(actor), action, resource, payload)
    }

    // ---- users ---------------------------------------------------------------------------

    fn rows(&self) -> Result<Vec<Row>, AccountsError> {
        user_rows(&self.store)
    }

    fn entities_of(rows: &[Row]) -> Vec<Value> {
        rows.iter().map(|(u, g, _)| user_entity(u, g)).collect()
    }

    /// Installs the managed users into the policy engine (at start, after every change, and
    /// whenever another process changed `state.db`: see [`Self::refresh`]).
    pub fn sync(&self) -> Result<usize, AccountsError> {
        let version = self.data_version()?;
        let rows = self.rows()?;
        self.gate
            .engine()
            .set_managed_users(Self::entities_of(&rows))
            .map_err(|e| AccountsError::Entities(e.to_string()))?;
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(version);
        }
        Ok(rows.len())
    }

    /// A value that changes whenever the managed users change, whoever changed them. SQLite:
    /// `PRAGMA data_version` (another connection committed). PostgreSQL: a digest of the rows
    /// themselves (another replica's change is seen on the next look; equal rows mean an
    /// equal installed set).
    fn data_version(&self) -> Result<String, AccountsError> {
        Ok(self.store.db().with(|c| match c.dialect() {
            Dialect::Sqlite => c
                .query_row("PRAGMA data_version", params![])?
                .get::<i64>(0)
                .map(|v| v.to_string()),
            Dialect::Postgres => c
                .query_row(
                    "SELECT md5(COALESCE(string_agg(user_id || chr(31) || groups || chr(31) || source, chr(30) ORDER BY user_id), ''))
                     FROM account_users",
                    params![],
                )?
                .get::<String>(0),
        })?)
    }

    /// Re-installs the managed users when another process (the CLI) or another replica
    /// changed them since the last look. Cheap when nothing changed (one statement).
    pub fn refresh(&self) -> Result<(), AccountsError> {
        let now = self.data_version()?;
        let seen = self.seen.lock().ok().and_then(|s| s.clone());
        if seen.as_ref() != Some(&now) {
            self.sync()?;
        }
        Ok(())
    }

    /// Whether `user` is known: in the entity files or the managed store.
    pub fn user_known(&self, user: &str) -> Result<bool, AccountsError> {
        if self.gate.engine().user_in_entity_files(user) {
            return Ok(true);
        }
        Ok(self
            .store
            .db()
            .with(|c| {
                c.query_opt(
                    "SELECT 1 FROM account_users WHERE user_id = ?1",
                    params![user],
                )
            })?
            .is_some())
    }

    /// The groups Cedar sees `user` in (from the active entity store).
    pub fn groups_of(&self, user: &str) -> Vec<String> {
        self.gate.engine().groups_of(user)
    }

    fn put_user(
        &self,
        user: &str,
        groups: &[String],
        source: Source,
        by: &str,
    ) -> Result<(), AccountsError> {
        let mut rows = self.rows()?;
        rows.retain(|(u, _, _)| u != user);
        rows.push((user.to_string(), groups.to_vec(), source.as_str().into()));
        // Checked against the active set first: nothing is written that would not build.
        self.gate
            .engine()
            .check_managed_users(&Self::entities_of(&rows))
            .map_err(|e| AccountsError::Entities(e.to_string()))?;
        let now = self.clock.now_ms();
        self.store.db().tx(|tx| {
            if source == Source::Cli {
                // An operator adding the user lifts a removal.
                tx.execute(
                    "DELETE FROM account_removed WHERE user_hash = ?1",
                    params![sha256(user.as_bytes())],
                )?;
            }
            tx.execute(
                "INSERT INTO account_users (user_id, groups, source, added_by, added_ms, updated_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5)
                 ON CONFLICT(user_id) DO UPDATE SET groups = ?2, source = ?3, updated_ms = ?5",
                params![
                    user,
                    serde_json::to_string(groups).unwrap_or_else(|_| "[]".into()),
                    source.as_str(),
                    by,
                    now
                ],
            )?;
            Ok::<_, AccountsError>(())
        })?;
        self.sync()?;
        Ok(())
    }

    /// Whether an operator removed `user` (and nobody added them again since).
    pub fn removed(&self, user: &str) -> Result<bool, AccountsError> {
        Ok(self
            .store
            .db()
            .with(|c| {
                c.query_opt(
                    "SELECT 1 FROM account_removed WHERE user_hash = ?1",
                    params![sha256(user.as_bytes())],
                )
            })?
            .is_some())
    }

    /// `chitin users add USER [--group G]...`: adds the user (or replaces its groups).
    pub fn add_user(
        &self,
        actor: &str,
        user: &str,
        groups: &[String],
    ) -> Result<UserInfo, AccountsError> {
        valid_user(user)?;
        for g in groups {
            valid_group(g)?;
        }
        let mut groups = groups.to_vec();
        groups.sort();
        groups.dedup();
        self.decide(actor, Action::UserManage)?;
        if self.gate.engine().user_in_entity_files(user) {
            return Err(AccountsError::DefinedInFile(user.into()));
        }
        let re_enabled = self.removed(user)?;
        self.audit(Self::admin_record(
            actor,
            "user.add",
            &principal(user),
            json!({"user": user, "groups": groups, "re_enabled": re_enabled}),
        ))?;
        self.put_user(user, &groups, Source::Cli, &principal(actor))?;
        Ok(UserInfo {
            user: user.into(),
            groups,
            source: Source::Cli.as_str().into(),
            tokens: 0,
            sessions: 0,
        })
    }

    /// A user signed in through single sign-on: provisioned (or its groups refreshed) unless
    /// the operator defined it (entity files or `chitin users add`), whose groups stay.
    /// Returns whether the IdP's groups were applied. A user an operator removed is refused
    /// ([`AccountsError::Removed`]) until `chitin users add` lets them in again.
    pub fn provision(
        &self,
        user: &str,
        groups: &[String],
        source: Source,
    ) -> Result<bool, AccountsError> {
        valid_user(user)?;
        let mut groups: Vec<String> = groups
            .iter()
            .filter(|g| valid_group(g).is_ok())
            .cloned()
            .collect();
        groups.sort();
        groups.dedup();
        if self.gate.engine().user_in_entity_files(user) {
            return Ok(false);
        }
        if self.removed(user)? {
            return Err(AccountsError::Removed(user.to_string()));
        }
        let existing = self.rows()?.into_iter().find(|(u, _, _)| u == user);
        if let Some((_, old, src)) = &existing {
            if src == Source::Cli.as_str() {
                return Ok(false);
            }
            if *old == groups && src == source.as_str() {
                return Ok(true);
            }
        }
        self.audit(
            RecordInput::admin(
                source.as_str(),
                "user.provision",
                principal(user),
                json!({"user": user, "groups": groups}),
            )
            .with_outcome(if existing.is_some() {
                "updated"
            } else {
                "created"
            }),
        )?;
        self.put_user(user, &groups, source, source.as_str())?;
        Ok(true)
    }

    /// `chitin users list`: the managed users and the users of the entity files.
    pub fn list_users(&self, actor: &str) -> Result<Vec<UserInfo>, AccountsError> {
        self.decide(actor, Action::UserManage)?;
        let mut out: Vec<UserInfo> = Vec::new();
        for u in self.gate.engine().entity_file_users() {
            out.push(UserInfo {
                groups: self.groups_of(&u),
                user: u,
                source: "entities.json".into(),
                tokens: 0,
                sessions: 0,
            });
        }
        for (u, g, src) in self.rows()? {
            out.push(UserInfo {
                user: u,
                groups: g,
                source: src,
                tokens: 0,
                sessions: 0,
            });
        }
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            for info in &mut out {
                info.tokens = c
                    .query_row(
                        "SELECT count(*) FROM api_tokens WHERE user_id = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
                        params![info.user, now],
                    )?
                    .get::<i64>(0)?
                    .try_into()
                    .unwrap_or(0);
                info.sessions = c
                    .query_row(
                        "SELECT count(*) FROM web_sessions WHERE user_id = ?1 AND expires_ms > ?2",
                        params![info.user, now],
                    )?
                    .get::<i64>(0)?
                    .try_into()
                    .unwrap_or(0);
            }
            Ok::<_, AccountsError>(())
        })?;
        out.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(out)
    }

    /// `chitin users remove USER`: removes a managed user and ends everything it holds (API
    /// tokens, browser sessions, devices) in one transaction, leaving a tombstone (SHA-256 of
    /// the id) so single sign-on does not create the user again (`chitin users add` lifts it).
    /// A user of the entity files is refused (edit the file).
    pub fn remove_user(&self, actor: &str, user: &str) -> Result<Removed, AccountsError> {
        valid_user(user)?;
        self.decide(actor, Action::UserManage)?;
        let in_file = self.gate.engine().user_in_entity_files(user);
        let managed = self.rows()?.iter().any(|(u, _, _)| u == user);
        if !in_file && !managed {
            return Err(AccountsError::UnknownUser(user.into()));
        }
        if in_file {
            return Err(AccountsError::DefinedInFile(user.into()));
        }
        self.audit(Self::admin_record(
            actor,
            "user.remove",
            &principal(user),
            json!({"user": user}),
        ))?;
        let now = self.clock.now_ms();
        let removed = self.store.db().tx(|tx| {
            let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            let tokens = tx.execute("DELETE FROM api_tokens WHERE user_id = ?1", params![user])?;
            let sessions =
                tx.execute("DELETE FROM web_sessions WHERE user_id = ?1", params![user])?;
            let devices = tx.execute("DELETE FROM devices WHERE user_id = ?1", params![user])?;
            tx.execute(
                "DELETE FROM account_users WHERE user_id = ?1",
                params![user],
            )?;
            tx.execute(
                "INSERT INTO account_removed (user_hash, removed_ms) VALUES (?1, ?2)
                 ON CONFLICT(user_hash) DO UPDATE SET removed_ms = excluded.removed_ms",
                params![sha256(user.as_bytes()), now],
            )?;
            Ok::<_, AccountsError>(Removed {
                user: user.into(),
                tokens: count(tokens),
                sessions: count(sessions),
                devices: count(devices),
            })
        })?;
        self.sync()?;
        Ok(removed)
    }

    // ---- API tokens ----------------------------------------------------------------------

    /// `chitin tokens issue --user U [--expires D] [--name N]`: the token, shown once.
    pub fn issue_token(
        &self,
        actor: &str,
        user: &str,
        expires_in_ms: Option<i64>,
        name: &str,
    ) -> Result<(TokenInfo, IssuedToken), AccountsError> {
        valid_user(user)?;
        if name.chars().count() > 64 || name.chars().any(char::is_control) {
            return Err(AccountsError::InvalidName);
        }
        if let Some(ms) = expires_in_ms
            && ms <= 0
        {
            return Err(AccountsError::InvalidExpiry(
                "--expires must be a positive duration such as 30d, 12h or 90m".into(),
            ));
        }
        self.decide(actor, Action::TokenManage)?;
        if !self.user_known(user)? {
            return Err(AccountsError::UnknownUser(user.into()));
        }
        let id = hex(&random::<8>()?);
        let secret = b64url(&random::<32>()?);
        let token = IssuedToken(zeroize::Zeroizing::new(format!(
            "{TOKEN_PREFIX}{id}_{secret}"
        )));
        let hash = sha256(secret.as_bytes());
        let now = self.clock.now_ms();
        let expires_ms = expires_in_ms.map(|d| now.saturating_add(d));
        let name = if name.is_empty() { "api" } else { name };
        self.audit(Self::admin_record(
            actor,
            "token.issue",
            &format!("token:{id}"),
            json!({"id": id, "user": user, "name": name, "expires_ms": expires_ms}),
        ))?;
        self.store.db().with(|c| {
            c.execute(
                "INSERT INTO api_tokens (id, user_id, name, hash, created_by, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![id, user, name, hash, principal(actor), now, expires_ms],
            )
        })?;
        Ok((
            TokenInfo {
                id,
                user: user.into(),
                name: name.into(),
                created_by: principal(actor),
                created_ms: now,
                expires_ms,
                last_used_ms: None,
                expired: false,
            },
            token,
        ))
    }

    /// `chitin tokens list`.
    pub fn list_tokens(&self, actor: &str) -> Result<Vec<TokenInfo>, AccountsError> {
        self.decide(actor, Action::TokenManage)?;
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            c.query_map(
                "SELECT id, user_id, name, created_by, created_ms, expires_ms, last_used_ms
                 FROM api_tokens ORDER BY created_ms, id",
                params![],
                |r| {
                    let expires_ms: Option<i64> = r.get(5)?;
                    Ok::<_, AccountsError>(TokenInfo {
                        id: r.get(0)?,
                        user: r.get(1)?,
                        name: r.get(2)?,
                        created_by: r.get(3)?,
                        created_ms: r.get(4)?,
                        expires_ms,
                        last_used_ms: r.get(6)?,
                        expired: expires_ms.is_some_and(|e| e <= now),
                    })
                },
            )
        })
    }

    /// `chitin tokens revoke ID`. The token is deleted and the revocation recorded in one
    /// transaction, so two replicas revoking it at once record it once (the other is told
    /// the token is unknown).
    pub fn revoke_token(&self, actor: &str, id: &str) -> Result<String, AccountsError> {
        self.decide(actor, Action::TokenManage)?;
        self.store.db().tx(|tx| {
            let user: Option<String> = tx
                .query_opt(
                    "DELETE FROM api_tokens WHERE id = ?1 RETURNING user_id",
                    params![id],
                )?
                .map(|r| r.get(0))
                .transpose()?;
            let Some(user) = user else {
                return Err(AccountsError::UnknownToken(
                    id.chars()
                        .take(64)
                        .collect::<String>()
                        .escape_default()
                        .to_string(),
                ));
            };
            self.audit(Self::admin_record(
                actor,
                "token.revoke",
                &format!("token:{id}"),
                json!({"id": id, "user": user}),
            ))?;
            Ok(user)
        })
    }

    /// The user a presented API token acts for: `Some((token id, user))` when the token
    /// exists, matches (constant time) and has not expired.
    pub fn verify_token(
        &self,
        presented: &[u8],
    ) -> Result<Option<(String, String)>, AccountsError> {
        let Ok(text) = std::str::from_utf8(presented) else {
            return Ok(None);
        };
        let Some(rest) = text.strip_prefix(TOKEN_PREFIX) else {
            return Ok(None);
        };
        let Some((id, secret)) = split_credential(rest, '_') else {
            return Ok(None);
        };
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            let row: Option<TokenRow> = c
                .query_opt(
                    "SELECT user_id, hash, expires_ms, last_used_ms FROM api_tokens WHERE id = ?1",
                    params![id],
                )?
                .map(|r| -> Result<TokenRow, chitin_store::Error> {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .transpose()?;
            let Some((user, hash, expires, last_used)) = row else {
                return Ok(None);
            };
            if !ct_eq(&sha256(secret.as_bytes()), &hash) || expires.is_some_and(|e| e <= now) {
                return Ok(None);
            }
            if last_used.is_none_or(|t| now.saturating_sub(t) > 60_000) {
                c.execute(
                    "UPDATE api_tokens SET last_used_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            Ok::<_, AccountsError>(Some((id.to_string(), user)))
        })
    }

    // ---- browser sessions ----------------------------------------------------------------

    /// Starts a browser session for `user` (after a login), bound to `device` when given.
    pub fn create_session(
        &self,
        user: &str,
        method: &str,
        device: Option<&str>,
        client: &str,
        max_ms: i64,
    ) -> Result<NewSession, AccountsError> {
        let id = hex(&random::<8>()?);
        let secret = b64url(&random::<32>()?);
        let csrf = b64url(&random::<24>()?);
        let now = self.clock.now_ms();
        let expires_ms = now.saturating_add(max_ms);
        let groups = serde_json::to_string(&self.groups_of(user)).unwrap_or_else(|_| "[]".into());
        self.audit(RecordInput::admin(
            principal(user),
            "session.start",
            format!("session:{id}"),
            json!({"method": method, "device": device, "client": client, "expires_ms": expires_ms}),
        ))?;
        self.store.db().tx(|c| {
            // Sessions past their absolute end are never presented again: dropped here.
            c.execute(
                "DELETE FROM web_sessions WHERE expires_ms <= ?1",
                params![now],
            )?;
            c.execute(
                "INSERT INTO web_sessions (id, hash, user_id, groups, method, csrf, device_id, client, created_ms, last_seen_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9, ?10)",
                params![id, sha256(secret.as_bytes()), user, groups, method, csrf, device, client, now, expires_ms],
            )
        })?;
        Ok(NewSession {
            cookie: zeroize::Zeroizing::new(format!("{id}.{secret}")),
            id,
            csrf,
            expires_ms,
        })
    }

    /// The live session a cookie names: it must match, be within its absolute expiry and have
    /// been used within `idle_ms`. An idle or expired session is deleted.
    pub fn session(
        &self,
        cookie: &str,
        idle_ms: i64,
    ) -> Result<Option<SessionInfo>, AccountsError> {
        let Some((id, secret)) = split_credential(cookie, '.') else {
            return Ok(None);
        };
        let now = self.clock.now_ms();
        self.store.db().with(|c| {
            let row: Option<SessionRow> = c
                .query_opt(
                    "SELECT hash, user_id, method, csrf, device_id, last_seen_ms, expires_ms FROM web_sessions WHERE id = ?1",
                    params![id],
                )?
                .map(|r| -> Result<SessionRow, chitin_store::Error> {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
                })
                .transpose()?;
            let Some((hash, user, method, csrf, device, last_seen, expires_ms)) = row else {
                return Ok(None);
            };
            if !ct_eq(&sha256(secret.as_bytes()), &hash) {
                return Ok(None);
            }
            if expires_ms <= now || now.saturating_sub(last_seen) > idle_ms {
                c.execute("DELETE FROM web_sessions WHERE id = ?1", params![id])?;
                return Ok(None);
            }
            if now.saturating_sub(last_seen) > 15_000 {
                c.execute(
                    "UPDATE web_sessions SET last_seen_ms = ?2 WHERE id = ?1",
                    params![id, now],
                )?;
            }
            Ok::<_, AccountsError>(Some(SessionInfo {
                id: id.to_string(),
                user,
                method,
                csrf,
                device,
                expires_ms,
            }))
        })
    }

    /// Ends a session (logout). Returns whether there was one.
    pub fn end_session(&self, id: &str, user: &str) -> Result<bool, AccountsError> {
        self.audit(RecordInput::admin(
            principal(user),
            "session.end",
            format!("session:{id}"),
            json!({"reason": "logout"}),
        ))?;
        Ok(self
            .store
            .db()
            .with(|c| c.execute("DELETE FROM web_sessions WHERE id = ?1", params![id]))?
            > 0)
    }

    // ---- devices -------------------------------------------------------------------------

    /// The device a device cookie names (matching secret), whatever its status.
    pub fn device(&self, cookie: &str) -> Result<Option<DeviceInfo>, AccountsError> {
        let Some((id, secret)) = split_credential(cookie, '.') else {
            return Ok(None);
        };
        let hash: Option<Vec<u8>> = self.store.db().with(|c| {
            c.query_opt("SELECT hash FROM devices WHERE id = ?1", params![id])?
                .map(|r| r.get(0))
                .transpose()
        })?;
        match hash {
            Some(h) if ct_eq(&sha256(secret.as_bytes()), &h) => self.device_by_id(id),
            _ => Ok(None),
        }
    }

    /// A device by id.
    pub fn device_by_id(&self, id: &str) -> Result<Option<DeviceInfo>, AccountsError> {
        self.store.db().with(|c| {
            c.query_opt(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"),
                params![id],
            )?
            .map(|r| device_row(&r))
            .transpose()
        })
    }

    /// Registers a new browser for `user` as a pending device.
    pub fn new_device(
        &self,
        user: &str,
        client: &str,
        user_agent: &str,
    ) -> Result<NewDevice, AccountsError> {
        let id = hex(&random::<8>()?);
        let secret = b64url(&random::<32>()?);
        let now = self.clock.now_ms();
        let ua: String = user_agent
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        self.audit(
            RecordInput::admin(
                principal(user),
                "device.request",
                format!("device:{id}"),
                json!({"client": client, "user_agent": ua}),
            )
            .with_outcome("pending"),
        )?;
        self.store.db().with(|c| {
            c.execute(
                "INSERT INTO devices (id, hash, user_id, status, client, user_agent, created_ms)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6)",
                params![id, sha256(secret.as_bytes()), user, client, ua, now],
            )
        })?;
        Ok(NewDevice {
            info: DeviceInfo {
                id: id.clone(),
                user: user.into(),
                status: "pending".into(),
                client: client.into(),
                user_agent: ua,
                created_ms: now,
                decided_ms: None,
                decided_by: None,
            },
            cookie: zeroize::Zeroizing::new(format!("{id}.{secret}")),
        })
    }

    /// `chitin devices list` (decided as `pairing.approve`).
    pub fn list_devices(&self, actor: &str) -> Result<Vec<DeviceInfo>, AccountsError> {
        self.decide(actor, Action::PairingApprove)?;
        self.store.db().with(|c| {
            c.query_map(
                &format!("SELECT {DEVICE_COLUMNS} FROM devices ORDER BY created_ms, id"),
                params![],
                device_row,
            )
        })
    }

    /// `chitin devices approve ID` / `revoke ID` (Cedar `pairing.approve`). Revoking also
    /// ends the device's sessions.
    pub fn decide_device(
        &self,
        actor: &str,
        id: &str,
        approve: bool,
    ) -> Result<DeviceInfo, AccountsError> {
        self.decide(actor, Action::PairingApprove)?;
        let Some(dev) = self.device_by_id(id)? else {
            return Err(AccountsError::UnknownDevice(
                id.chars()
                    .take(64)
                    .collect::<String>()
                    .escape_default()
                    .to_string(),
            ));
        };
        let wanted = if approve { "approved" } else { "revoked" };
        if dev.status == "revoked" || (approve && dev.status == "approved") {
            return Err(AccountsError::DeviceState {
                id: dev.id,
                status: dev.status,
                wanted,
            });
        }
        let now = self.clock.now_ms();
        // The decision is a claim on the status read above: when another replica decided the
        // device meanwhile, nothing is written or recorded and the caller is told its status.
        let claimed = self.store.db().tx(|tx| {
            let changed = tx.execute(
                "UPDATE devices SET status = ?2, decided_ms = ?3, decided_by = ?4 WHERE id = ?1 AND status = ?5",
                params![id, wanted, now, principal(actor), dev.status],
            )?;
            if changed != 1 {
                return Ok(false);
            }
            if !approve {
                tx.execute(
                    "DELETE FROM web_sessions WHERE device_id = ?1",
                    params![id],
                )?;
            }
            self.audit(
                Self::admin_record(
                    actor,
                    if approve {
                        "device.approve"
                    } else {
                        "device.revoke"
                    },
                    &format!("device:{id}"),
                    json!({"user": dev.user, "client": dev.client, "user_agent": dev.user_agent}),
                )
                .with_outcome(wanted),
            )?;
            Ok::<_, AccountsError>(true)
        })?;
        if !claimed {
            let status = self
                .device_by_id(id)?
                .map_or_else(|| "gone".to_string(), |d| d.status);
            return Err(AccountsError::DeviceState {
                id: id.to_string(),
                status,
                wanted,
            });
        }
        self.device_by_id(id)?
            .ok_or_else(|| AccountsError::UnknownDevice(id.to_string()))
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }
}

const DEVICE_COLUMNS: &str =
    "id, user_id, status, client, user_agent, created_ms, decided_ms, decided_by";

fn device_row(r: &chitin_store::Row) -> Result<DeviceInfo, AccountsError> {
    Ok(DeviceInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        status: r.get(2)?,
        client: r.get(3)?,
        user_agent: r.get(4)?,
        created_ms: r.get(5)?,
        decided_ms: r.get(6)?,
        decided_by: r.get(7)?,
    })
}

/// Installs the managed users of `home`'s `state.db` (if there is one) into `engine`, for
/// commands that decide with the policy engine without opening accounts themselves.
pub fn install_users(
    engine: &crate::policy::PolicyEngine,
    store: &Store,
) -> Result<usize, AccountsError> {
    let rows = user_rows(store)?;
    engine
        .set_managed_users(Accounts::entities_of(&rows))
        .map_err(|e| AccountsError::Entities(e.to_string()))?;
    Ok(rows.len())
}

/// The managed users, by id.
fn user_rows(store: &Store) -> Result<Vec<Row>, AccountsError> {
    store.db().with(|c| {
        c.query_map(
            "SELECT user_id, groups, source FROM account_users ORDER BY user_id",
            params![],
            |r| {
                let groups: String = r.get(1)?;
                Ok::<_, AccountsError>((
                    r.get::<String>(0)?,
                    serde_json::from_str::<Vec<String>>(&groups).unwrap_or_default(),
                    r.get::<String>(2)?,
                ))
            },
        )
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
    fn credentials_split_only_at_a_sixteen_hex_id() {
        assert_eq!(
            split_credential("0123456789abcdef_se_cret", '_'),
            Some(("0123456789abcdef", "se_cret"))
        );
        assert_eq!(split_credential("0123456789abcdeX_secret", '_'), None);
        assert_eq!(split_credential("0123456789ABCDEF_secret", '_'), None);
        assert_eq!(split_credential("0123456789abcdef_", '_'), None);
        assert_eq!(split_credential("short", '.'), None);
        assert_eq!(
            split_credential("0123456789abcdef.x", '.'),
            Some(("0123456789abcdef", "x"))
        );
    }

    #[test]
    fn user_ids_are_checked() {
        assert!(valid_user("alice@example.com").is_ok());
        assert!(valid_user(" alice").is_err());
        assert!(valid_user("").is_err());
        assert!(valid_user("a\nb").is_err());
        assert!(valid_user(&"x".repeat(129)).is_err());
    }
}
