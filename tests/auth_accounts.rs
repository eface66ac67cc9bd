//! The accounts store on a manual clock, on both backends (SQLite and PostgreSQL): session
//! idle and absolute timeouts, user removal ending sessions, managed users as Cedar
//! principals in their groups, single sign-on never overriding the operator's groups, token
//! expiry; and, with two replicas on one database, what one decides is what the other sees
//! (users, device approvals, token revocations) and what may happen once happens once (a
//! device decision, a revocation, a login state).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/oidc.rs"]
mod oidc;
#[path = "support/home.rs"]
mod support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use age::secrecy::SecretString;
use chitin::accounts::jwt::LoginError;
use chitin::accounts::oidc::Oidc;
use chitin::accounts::{Accounts, AccountsError, Source};
use chitin::clock::{Clock, ManualClock};
use chitin::config::auth::OidcConfig;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;
use chitin_store::Dialect;
use chitin_store::testing::TestPg;

struct Env {
    _t: tempfile::TempDir,
    home: PathBuf,
    pg: Option<TestPg>,
    audit: Arc<chitin_audit::AuditLog>,
    clock: ManualClock,
    acc: Accounts,
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn on_sqlite() {
                super::$name(chitin_store::Dialect::Sqlite)
            }
            #[test]
            fn on_postgres() {
                super::$name(chitin_store::Dialect::Postgres)
            }
        }
    )*};
}

fn env(d: Dialect) -> Env {
    let t = tempfile::tempdir().unwrap();
    let home: PathBuf = support::private_home(t.path(), "home");
    support::write_owner_entities(&home);
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 16,
        ..SecretsConfig::default()
    };
    let mut store = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from(
            "accounts-test".to_string(),
        ))),
        Arc::new(chitin::clock::SystemClock),
    )
    .unwrap();
    let signer = chitin::secrets::audit_key::signer(&mut store, &home).unwrap();
    let audit = Arc::new(
        chitin_audit::AuditLog::open(
            &home,
            chitin_audit::AuditOptions {
                signer: Some(Arc::new(signer)),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let pg = (d == Dialect::Postgres).then(|| TestPg::new().unwrap());
    let clock = ManualClock::new(1_700_000_000_000);
    let acc = replica(&home, pg.as_ref(), &audit, &clock);
    Env {
        _t: t,
        home,
        pg,
        audit,
        clock,
        acc,
    }
}

/// A gateway on the deployment's database: its own connection (pool), its own policy
/// engine, the deployment's audit log and clock.
fn replica(
    home: &std::path::Path,
    pg: Option<&TestPg>,
    audit: &Arc<chitin_audit::AuditLog>,
    clock: &ManualClock,
) -> Accounts {
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.to_path_buf()),
    })
    .unwrap();
    let gate = Gate::new(Arc::new(engine), Arc::clone(audit));
    let db = match pg {
        Some(pg) => Store::from_db(pg.db().unwrap()),
        None => Store::open(&home.join("state.db")).unwrap(),
    };
    let acc = Accounts::new(Arc::new(db), gate, Arc::new(clock.clone()));
    acc.sync().unwrap();
    acc
}

impl Env {
    /// Another gateway on the same database.
    fn replica(&self) -> Accounts {
        replica(&self.home, self.pg.as_ref(), &self.audit, &self.clock)
    }
}

on_both_backends!(
    a_session_ends_after_its_idle_time_and_after_its_absolute_lifetime_whatever_the_use,
    removing_a_user_ends_its_sessions_and_tokens_and_its_groups_leave_the_policy_engine,
    single_sign_on_provisions_users_with_the_idps_groups_but_never_overrides_the_operators,
    a_token_stops_working_when_its_expiry_passes_on_the_clock,
    a_user_added_on_one_replica_is_a_principal_on_the_other_after_its_next_refresh,
    a_device_decided_on_one_replica_is_seen_by_the_other_and_decided_once_when_both_race,
    a_token_revoked_on_one_replica_is_refused_by_the_other_and_revoked_once_when_both_race,
    a_login_state_is_used_once_even_when_two_replicas_finish_it_at_once_and_its_nonce_is_not_taken_again,
);

const MIN: i64 = 60_000;

fn a_session_ends_after_its_idle_time_and_after_its_absolute_lifetime_whatever_the_use(d: Dialect) {
    let e = env(d);
    e.acc
        .add_user("owner", "alice", &["owners".into()])
        .unwrap();
    let s = e
        .acc
        .create_session("alice", "oidc", None, "127.0.0.1", 60 * MIN)
        .unwrap();
    // Used every 9 minutes with a 10-minute idle limit: alive until the absolute end.
    for _ in 0..6 {
        e.clock.advance(9 * MIN);
        let live = e.acc.session(s.cookie(), 10 * MIN).unwrap();
        assert_eq!(live.unwrap().user, "alice");
    }
    e.clock.advance(7 * MIN); // 61 minutes after the start
    assert_eq!(e.acc.session(s.cookie(), 10 * MIN).unwrap(), None);

    let s = e
        .acc
        .create_session("alice", "oidc", None, "127.0.0.1", 60 * MIN)
        .unwrap();
    e.clock.advance(11 * MIN);
    assert_eq!(e.acc.session(s.cookie(), 10 * MIN).unwrap(), None, "idle");
    // Gone for good, even with a generous idle limit afterwards.
    assert_eq!(e.acc.session(s.cookie(), 600 * MIN).unwrap(), None);

    // A cookie with the right id and a wrong secret is nothing.
    let s = e
        .acc
        .create_session("alice", "oidc", None, "127.0.0.1", 60 * MIN)
        .unwrap();
    let forged = format!("{}.{}", s.id, "A".repeat(43));
    assert_eq!(e.acc.session(&forged, 10 * MIN).unwrap(), None);
    assert!(e.acc.session(s.cookie(), 10 * MIN).unwrap().is_some());
}

fn removing_a_user_ends_its_sessions_and_tokens_and_its_groups_leave_the_policy_engine(d: Dialect) {
    let e = env(d);
    e.acc
        .add_user("owner", "alice", &["owners".into(), "staff".into()])
        .unwrap();
    assert_eq!(e.acc.groups_of("alice"), vec!["owners", "staff"]);
    let s = e
        .acc
        .create_session("alice", "oidc", None, "127.0.0.1", 60 * MIN)
        .unwrap();
    let (_, tok) = e.acc.issue_token("owner", "alice", None, "ci").unwrap();
    assert!(
        e.acc
            .verify_token(tok.expose().as_bytes())
            .unwrap()
            .is_some()
    );
    let r = e.acc.remove_user("owner", "alice").unwrap();
    assert_eq!((r.tokens, r.sessions), (1, 1));
    assert_eq!(e.acc.session(s.cookie(), 10 * MIN).unwrap(), None);
    assert_eq!(e.acc.verify_token(tok.expose().as_bytes()).unwrap(), None);
    assert!(e.acc.groups_of("alice").is_empty());
    // Users of entities.json are the file's.
    assert!(matches!(
        e.acc.remove_user("owner", "owner"),
        Err(AccountsError::DefinedInFile(_))
    ));
    // mallory (no group) may not manage users.
    match e.acc.add_user("mallory", "eve", &["owners".into()]) {
        Err(AccountsError::Denied { action, .. }) => {
            assert_eq!(action, chitin::policy::Action::UserManage)
        }
        other => panic!("{other:?}"),
    }
}

fn single_sign_on_provisions_users_with_the_idps_groups_but_never_overrides_the_operators(
    d: Dialect,
) {
    let e = env(d);
    assert!(
        e.acc
            .provision("dave", &["staff".into()], Source::Oidc)
            .unwrap()
    );
    assert_eq!(e.acc.groups_of("dave"), vec!["staff"]);
    // The IdP changes the groups: they follow.
    assert!(
        e.acc
            .provision("dave", &["owners".into()], Source::Oidc)
            .unwrap()
    );
    assert_eq!(e.acc.groups_of("dave"), vec!["owners"]);
    // A user the operator added keeps the operator's groups.
    e.acc.add_user("owner", "erin", &[]).unwrap();
    assert!(
        !e.acc
            .provision("erin", &["owners".into()], Source::Oidc)
            .unwrap()
    );
    assert!(e.acc.groups_of("erin").is_empty());
    // So does a user of entities.json.
    assert!(
        !e.acc
            .provision("mallory", &["owners".into()], Source::Oidc)
            .unwrap()
    );
    assert!(e.acc.groups_of("mallory").is_empty());
}

fn a_token_stops_working_when_its_expiry_passes_on_the_clock(d: Dialect) {
    let e = env(d);
    e.acc.add_user("owner", "ci", &[]).unwrap();
    let (info, tok) = e.acc.issue_token("owner", "ci", Some(5 * MIN), "").unwrap();
    assert_eq!(info.name, "api");
    assert_eq!(info.expires_ms, Some(e.clock.now_ms() + 5 * MIN));
    assert!(
        e.acc
            .verify_token(tok.expose().as_bytes())
            .unwrap()
            .is_some()
    );
    e.clock.advance(5 * MIN);
    assert_eq!(e.acc.verify_token(tok.expose().as_bytes()).unwrap(), None);
    let listed = e.acc.list_tokens("owner").unwrap();
    assert!(listed[0].expired);
    // Tokens of other shapes never match.
    for bad in [
        "",
        "cht_",
        "cht_zzzz",
        &tok.expose()[..30],
        "0".repeat(64).as_str(),
    ] {
        assert_eq!(e.acc.verify_token(bad.as_bytes()).unwrap(), None, "{bad}");
    }
}

fn a_user_added_on_one_replica_is_a_principal_on_the_other_after_its_next_refresh(d: Dialect) {
    let e = env(d);
    let b = e.replica();
    e.acc.add_user("owner", "alice", &["staff".into()]).unwrap();
    b.refresh().unwrap();
    assert_eq!(b.groups_of("alice"), vec!["staff"]);
    assert!(b.user_known("alice").unwrap());
    // Nothing changed since: a refresh keeps what is installed.
    b.refresh().unwrap();
    assert_eq!(b.groups_of("alice"), vec!["staff"]);
    e.acc.remove_user("owner", "alice").unwrap();
    b.refresh().unwrap();
    assert!(b.groups_of("alice").is_empty());
    // The removal's tombstone holds on the other replica too.
    assert!(matches!(
        b.provision("alice", &["owners".into()], Source::Oidc),
        Err(AccountsError::Removed(_))
    ));
}

fn a_device_decided_on_one_replica_is_seen_by_the_other_and_decided_once_when_both_race(
    d: Dialect,
) {
    let e = env(d);
    let b = e.replica();
    e.acc.add_user("owner", "alice", &[]).unwrap();
    let dev = e.acc.new_device("alice", "203.0.113.7", "Firefox").unwrap();
    assert_eq!(dev.info.status, "pending");
    // An owner approves it through the other replica: this one sees it approved.
    let approved = b.decide_device("owner", &dev.info.id, true).unwrap();
    assert_eq!(approved.status, "approved");
    let seen = e.acc.device(dev.cookie()).unwrap().unwrap();
    assert_eq!(seen.status, "approved");
    assert_eq!(seen.decided_by.as_deref(), Some("Chitin::User::\"owner\""));
    // A session on this replica, bound to the device, ends when the other revokes it.
    let s = e
        .acc
        .create_session("alice", "oidc", Some(&dev.info.id), "203.0.113.7", 60 * MIN)
        .unwrap();
    assert!(e.acc.session(s.cookie(), 10 * MIN).unwrap().is_some());
    b.decide_device("owner", &dev.info.id, false).unwrap();
    assert_eq!(e.acc.session(s.cookie(), 10 * MIN).unwrap(), None);
    assert_eq!(
        e.acc.device_by_id(&dev.info.id).unwrap().unwrap().status,
        "revoked"
    );
    // Both replicas approve a new device at the same moment: one decision, the other is told.
    for _ in 0..5 {
        let dev = e.acc.new_device("alice", "203.0.113.8", "Chrome").unwrap();
        let gate = Barrier::new(2);
        let results: Vec<Result<_, AccountsError>> = std::thread::scope(|sc| {
            let hs: Vec<_> = [&e.acc, &b]
                .into_iter()
                .map(|r| {
                    let (gate, id) = (&gate, dev.info.id.clone());
                    sc.spawn(move || {
                        gate.wait();
                        r.decide_device("owner", &id, true)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        for r in results {
            match r {
                Ok(info) => assert_eq!(info.status, "approved"),
                Err(AccountsError::DeviceState { status, wanted, .. }) => {
                    assert_eq!((status.as_str(), wanted), ("approved", "approved"));
                }
                Err(other) => panic!("{other}"),
            }
        }
    }
}

fn a_token_revoked_on_one_replica_is_refused_by_the_other_and_revoked_once_when_both_race(
    d: Dialect,
) {
    let e = env(d);
    let b = e.replica();
    e.acc.add_user("owner", "ci", &[]).unwrap();
    let (info, tok) = e.acc.issue_token("owner", "ci", None, "deploy").unwrap();
    assert_eq!(
        b.verify_token(tok.expose().as_bytes()).unwrap(),
        Some((info.id.clone(), "ci".to_string()))
    );
    assert_eq!(b.revoke_token("owner", &info.id).unwrap(), "ci");
    assert_eq!(e.acc.verify_token(tok.expose().as_bytes()).unwrap(), None);
    assert!(matches!(
        e.acc.revoke_token("owner", &info.id),
        Err(AccountsError::UnknownToken(_))
    ));
    for _ in 0..5 {
        let (info, tok) = e.acc.issue_token("owner", "ci", None, "race").unwrap();
        let gate = Barrier::new(2);
        let results: Vec<Result<String, AccountsError>> = std::thread::scope(|sc| {
            let hs: Vec<_> = [&e.acc, &b]
                .into_iter()
                .map(|r| {
                    let (gate, id) = (&gate, info.id.clone());
                    sc.spawn(move || {
                        gate.wait();
                        r.revoke_token("owner", &id)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let ok: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(ok, vec!["ci"], "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(AccountsError::UnknownToken(_)))),
            "{results:?}"
        );
        assert_eq!(b.verify_token(tok.expose().as_bytes()).unwrap(), None);
    }
    // Each revocation is recorded once: one record per token revoked.
    let revoked = e
        .audit
        .reader()
        .unwrap()
        .query(&chitin_audit::Query::default())
        .unwrap()
        .iter()
        .filter(|r| r.action == "token.revoke")
        .count();
    assert_eq!(revoked, 6);
}

/// The authorization endpoint of the fake issuer, as a browser would follow it: the
/// `(state, code)` it sends back to the redirect URI.
fn authorize(idp: &oidc::FakeIssuer, url: &str) -> (String, String) {
    let u = reqwest::Url::parse(url).unwrap();
    let target = format!("{}?{}", u.path(), u.query().unwrap_or_default());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", idp.port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
        idp.port
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 302"), "{resp}");
    let location = resp
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap();
    let back = reqwest::Url::parse(&location).unwrap();
    let get = |k: &str| {
        back.query_pairs()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.to_string())
            .unwrap()
    };
    (get("state"), get("code"))
}

fn a_login_state_is_used_once_even_when_two_replicas_finish_it_at_once_and_its_nonce_is_not_taken_again(
    d: Dialect,
) {
    let e = env(d);
    // The fake issuer signs with the real time: the gateways' clock is set to it.
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    e.clock
        .advance(i64::try_from(real).unwrap() - e.clock.now_ms());
    let idp = oidc::FakeIssuer::start();
    let cfg = OidcConfig {
        issuer: idp.issuer(),
        client_id: oidc::CLIENT_ID.into(),
        redirect_uri: "http://127.0.0.1:9/auth/callback".into(),
        ..OidcConfig::default()
    };
    let rp = [
        Oidc::new(cfg.clone(), e.acc.clone(), None).unwrap(),
        Oidc::new(cfg, e.replica(), None).unwrap(),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for round in 0..3 {
        let binding = format!("browser-{round}");
        let url = rt.block_on(rp[round % 2].begin(&binding)).unwrap();
        let (state, code) = authorize(&idp, &url);
        let gate = Barrier::new(2);
        let results: Vec<Result<_, LoginError>> = std::thread::scope(|sc| {
            let hs: Vec<_> = rp
                .iter()
                .map(|r| {
                    let (gate, state, code, binding) = (&gate, &state, &code, &binding);
                    sc.spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .unwrap();
                        gate.wait();
                        rt.block_on(r.finish(state, code, binding))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let users: Vec<_> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|l| l.user.clone()))
            .collect();
        assert_eq!(users, vec!["alice@example.com"], "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(LoginError::StateUnknown))),
            "{results:?}"
        );
    }
    // The nonce of a finished login, carried by a new login's ID token on the other
    // replica: a replay.
    let used = idp.issued_nonces().last().unwrap().clone();
    idp.set(|b| b.nonce = Some(used));
    let url = rt.block_on(rp[1].begin("browser-replay")).unwrap();
    let (state, code) = authorize(&idp, &url);
    assert!(matches!(
        rt.block_on(rp[0].finish(&state, &code, "browser-replay")),
        Err(LoginError::NonceReplayed)
    ));
}
