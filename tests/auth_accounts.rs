//! The accounts store on a manual clock: session idle and absolute timeouts, user removal
//! ending sessions, managed users as Cedar principals in their groups, single sign-on never
//! overriding the operator's groups, token expiry.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::path::PathBuf;
use std::sync::Arc;

use age::secrecy::SecretString;
use chitin::accounts::{Accounts, AccountsError, Source};
use chitin::clock::{Clock, ManualClock};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;

struct Env {
    _t: tempfile::TempDir,
    clock: ManualClock,
    acc: Accounts,
}

fn env() -> Env {
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
    let audit = chitin_audit::AuditLog::open(
        &home,
        chitin_audit::AuditOptions {
            signer: Some(Arc::new(signer)),
            ..Default::default()
        },
    )
    .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let gate = Gate::new(Arc::new(engine), Arc::new(audit));
    let db = Arc::new(Store::open(&home.join("state.db")).unwrap());
    let clock = ManualClock::new(1_700_000_000_000);
    let acc = Accounts::new(db, gate, Arc::new(clock.clone()));
    acc.sync().unwrap();
    Env { _t: t, clock, acc }
}

const MIN: i64 = 60_000;

#[test]
fn a_session_ends_after_its_idle_time_and_after_its_absolute_lifetime_whatever_the_use() {
    let e = env();
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

#[test]
fn removing_a_user_ends_its_sessions_and_tokens_and_its_groups_leave_the_policy_engine() {
    let e = env();
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

#[test]
fn single_sign_on_provisions_users_with_the_idps_groups_but_never_overrides_the_operators() {
    let e = env();
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

#[test]
fn a_token_stops_working_when_its_expiry_passes_on_the_clock() {
    let e = env();
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
