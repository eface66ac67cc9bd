//! The command-line contract of issue #9: `chitin retention`, `chitin data`, `chitin backup`,
//! run as the operator would, ending with `chitin audit verify` on a restored state dir.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use std::path::Path;
use std::process::{Command, Output};

use lifecycle_support::*;

fn chitin(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("USER", "tester")
        .args(args)
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

const ALICE: &str = "Chitin::User::\"alice\"";

#[test]
fn the_lifecycle_commands_work_end_to_end_and_a_restored_state_verifies() {
    let h = harness();
    // The CLI runs on the real clock.
    let now = chitin::clock::Clock::now_ms(&chitin::clock::SystemClock);
    h.clock.set(now);
    session(&h, "s-a", ALICE, "alice", now, Some("sum"));
    message(
        &h,
        "s-a",
        ALICE,
        1,
        "user",
        "transcript",
        now,
        "cli canary 4242",
    );
    let home = h.home.clone();
    let parent = home.parent().unwrap().to_path_buf();
    let H { _t, lc, gate, .. } = h;
    lc.audit.shutdown().unwrap();
    drop((lc, gate));

    // keygen → config → create → verify.
    let id = parent.join("backup-id.txt");
    let o = chitin(&home, &["backup", "keygen", "--out", id.to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(recipient.starts_with("age1"), "{recipient}");
    let o = chitin(
        &home,
        &["backup", "create", "--out", "/nonexistent-dir/x.age"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        out(&o).contains("no backup recipient configured"),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("chitin backup keygen"), "{}", out(&o));
    let cfg = format!(
        "{}\n[backup]\nrecipient = \"{recipient}\"\n",
        home::TEST_SECRETS_CONFIG
    );
    std::fs::write(home.join("chitin.toml"), cfg).unwrap();
    let file = parent.join("b.age");
    let o = chitin(
        &home,
        &["backup", "create", "--out", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("(the data keys included)"), "{}", out(&o));
    let o = chitin(
        &home,
        &[
            "backup",
            "verify",
            file.to_str().unwrap(),
            "--identity",
            id.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("ok: "),
        "{}",
        out(&o)
    );
    let o = chitin(&home, &["backup", "verify", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("--identity"), "{}", out(&o));

    // Retention and holds.
    let o = chitin(&home, &["retention", "run", "--dry-run"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("transcripts: would delete 0"),
        "{}",
        out(&o)
    );
    let o = chitin(
        &home,
        &[
            "retention",
            "hold",
            "--subject",
            ALICE,
            "--reason",
            "case 7",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("held: Chitin::User::\"alice\""),
        "{}",
        out(&o)
    );
    let o = chitin(&home, &["retention", "holds"]);
    assert!(out(&o).contains("reason: case 7"), "{}", out(&o));

    // Strict subjects; policy; holds block erasure.
    let o = chitin(&home, &["data", "erase", "--subject", "alice"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("invalid subject"), "{}", out(&o));
    // The CLI decides for its configured operator ([cli] operator); `--as` no longer exists.
    let o = chitin(
        &home,
        &["data", "erase", "--subject", ALICE, "--as", "mallory"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        out(&o).contains("unexpected argument '--as'"),
        "{}",
        out(&o)
    );
    let owner_cfg = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    std::fs::write(
        home.join("chitin.toml"),
        format!("{owner_cfg}\n[cli]\noperator = \"mallory\"\n"),
    )
    .unwrap();
    let o = chitin(&home, &["data", "erase", "--subject", ALICE]);
    std::fs::write(home.join("chitin.toml"), &owner_cfg).unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains("refused: policy denied `data.erase`"),
        "{}",
        out(&o)
    );
    let o = chitin(&home, &["data", "erase", "--subject", ALICE]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("under legal hold"), "{}", out(&o));
    let o = chitin(&home, &["retention", "release", "--subject", ALICE]);
    assert!(out(&o).contains("released"), "{}", out(&o));

    // Export, then erase (dry run first).
    let export = parent.join("alice.tar");
    let o = chitin(
        &home,
        &[
            "data",
            "export",
            "--subject",
            ALICE,
            "--out",
            export.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("1 sessions, 1 messages"), "{}", out(&o));
    assert!(contains(
        &std::fs::read(&export).unwrap(),
        b"cli canary 4242"
    ));
    let o = chitin(&home, &["data", "erase", "--subject", ALICE, "--dry-run"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains("would erase Chitin::User::\"alice\""),
        "{}",
        out(&o)
    );
    assert!(out(&o).contains("messages: 1"), "{}", out(&o));
    let o = chitin(&home, &["data", "erase", "--subject", ALICE]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("data key: destroyed"), "{}", out(&o));
    assert!(
        out(&o).contains("erasure receipt: audit seq"),
        "{}",
        out(&o)
    );
    let o = chitin(&home, &["audit", "verify"]);
    assert!(o.status.success(), "{}", out(&o));

    // Restore the backup taken before the erase: Alice's rows come back sealed with a
    // destroyed key and are purged; the restored log verifies.
    let o = chitin(
        &home,
        &[
            "backup",
            "restore",
            file.to_str().unwrap(),
            "--identity",
            id.to_str().unwrap(),
            "--yes",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(out(&o).contains("replace state.db ("), "{}", out(&o));
    assert!(out(&o).contains("erased again 1 subject(s)"), "{}", out(&o));
    let o = chitin(&home, &["audit", "verify"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("ok: "),
        "{}",
        out(&o)
    );

    // `chitin security audit` notes a class kept forever.
    let cfg = format!(
        "{}\n[retention]\ntranscripts = \"forever\"\n",
        home::TEST_SECRETS_CONFIG
    );
    std::fs::write(home.join("chitin.toml"), cfg).unwrap();
    let o = chitin(&home, &["security", "audit", "--json"]);
    assert!(
        out(&o).contains("retention.forever.transcripts"),
        "{}",
        out(&o)
    );
    drop(_t);
}

/// `chitin backup create` and `chitin backup restore` with `[store] backend = "postgres"`:
/// the backup holds the database's rows, and a restore puts them back into the database.
#[test]
fn backup_create_and_restore_work_through_the_binary_on_a_postgres_store() {
    let h = harness_on(chitin::store::Dialect::Postgres);
    let now = chitin::clock::Clock::now_ms(&chitin::clock::SystemClock);
    h.clock.set(now);
    session(&h, "s-a", ALICE, "alice", now, Some("sum"));
    message(
        &h,
        "s-a",
        ALICE,
        1,
        "user",
        "transcript",
        now,
        "pg canary 5151",
    );
    let pg = h.pg.as_ref().unwrap().config();
    let url = h.pg.as_ref().unwrap().url().to_string();
    let home = h.home.clone();
    let parent = home.parent().unwrap().to_path_buf();
    let H {
        _t,
        lc,
        gate,
        pg: test_pg,
        ..
    } = h;
    lc.audit.shutdown().unwrap();
    drop((lc, gate));

    let id = parent.join("backup-id.txt");
    let o = chitin(&home, &["backup", "keygen", "--out", id.to_str().unwrap()]);
    assert!(o.status.success(), "{}", out(&o));
    let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let cfg = format!(
        "{}\n[backup]\nrecipient = \"{recipient}\"\nidentity = \"{}\"\n\n[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n",
        home::TEST_SECRETS_CONFIG,
        id.display()
    );
    std::fs::write(home.join("chitin.toml"), cfg).unwrap();
    let file = parent.join("pg.age");
    let o = chitin(
        &home,
        &["backup", "create", "--out", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", out(&o));
    // The archive's state.db is the PostgreSQL database's snapshot.
    let opened = chitin::lifecycle::backup::open(
        &file,
        &chitin::lifecycle::backup::load_identity(&id).unwrap(),
    )
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("state.db"), &opened.members["state.db"][..]).unwrap();
    let snap = chitin::store::Db::sqlite_unmigrated(&t.path().join("state.db")).unwrap();
    let n = |db: &chitin::store::Db| {
        db.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FROM messages WHERE session_key = 's-a'",
                chitin::store::params![],
            )?
            .get::<i64>(0)
        })
        .unwrap()
    };
    assert_eq!(n(&snap), 1);
    // Its audit.db is the database's audit chain up to the backup, which verifies offline
    // (what `chitin-audit-verify --db --checkpoints --pubkey` runs) and ends with the backup.
    for m in [chitin_audit::DB_FILE, chitin_audit::CHECKPOINT_FILE] {
        std::fs::write(t.path().join(m), &opened.members[m][..]).unwrap();
    }
    let key = chitin_audit::PublicKey::load(&home.join(chitin_audit::PUB_FILE)).unwrap();
    let report = chitin_audit::Verifier::new(key)
        .verify_db(
            &t.path().join(chitin_audit::DB_FILE),
            Some(&t.path().join(chitin_audit::CHECKPOINT_FILE)),
        )
        .unwrap()
        .unwrap();
    let last = report.last_seq.unwrap();
    assert_eq!(last, opened.manifest.audit_last_seq);
    let copied = chitin_audit::AuditReader::open(&t.path().join(chitin_audit::DB_FILE))
        .unwrap()
        .range(last, last)
        .unwrap();
    assert_eq!(copied[0].action, "backup.create");
    let shared = chitin_audit::AuditReader::open_postgres(
        &chitin_audit::PgConfig::from_url(&format!("{url}?sslmode=disable")).unwrap(),
    )
    .unwrap();
    assert_eq!(shared.range(last, last).unwrap(), copied);
    // Its data keys are the database's (no vault.keys in the state directory).
    let db_keys = |db: &chitin::store::Db| chitin::vault::sealed_keys_in(db).unwrap();
    let keys = db_keys(&chitin::store::Db::postgres(&pg).unwrap()).unwrap();
    assert!(!home.join("vault.keys").exists());
    assert_eq!(opened.members["vault.keys"][..], keys[..]);

    // The rows are lost; the restore brings them back into the database.
    let db = chitin::store::Db::postgres(&pg).unwrap();
    db.with(|c| c.execute("DELETE FROM messages", chitin::store::params![]))
        .unwrap();
    assert_eq!(n(&db), 0);
    let o = chitin(
        &home,
        &["backup", "restore", file.to_str().unwrap(), "--yes"],
    );
    assert!(o.status.success(), "{}", out(&o));
    let text = out(&o);
    assert!(text.contains("rows into postgres://"), "{text}");
    // The plan names the database, not a state.db file, and keeps the database's audit chain.
    assert!(
        text.contains("copy    the backup's state.db into the PostgreSQL database postgres"),
        "{text}"
    );
    assert!(
        text.contains("keep    the database's audit chain"),
        "{text}"
    );
    for m in ["state.db", "audit.db", "audit.checkpoints"] {
        assert!(
            !text.contains(&format!("add     {m} ")) && !text.contains(&format!("replace {m} ")),
            "{text}"
        );
    }
    assert_eq!(n(&db), 1);
    // The restore is recorded in the database's chain, after what the backup carried.
    let mut restores = Vec::new();
    shared
        .for_each_from(last + 1, |r| {
            if r.action == "backup.restore" {
                restores.push((r.kind.clone(), r.decision.clone()));
            }
            true
        })
        .unwrap();
    // The operator's Cedar decision, then the restore itself.
    assert_eq!(
        restores,
        [
            ("decision".to_string(), "allow".to_string()),
            ("admin".to_string(), String::new())
        ]
    );
    assert!(
        text.contains("the data keys already here (in the database) were kept"),
        "{text}"
    );
    assert_eq!(db_keys(&db), Some(keys));
    assert!(!home.join("vault.keys").exists());
    // Nothing of it was put in the state directory as a SQLite file.
    assert!(
        !home.join("state.db").exists() || {
            let s = chitin::store::Db::sqlite_unmigrated(&home.join("state.db")).unwrap();
            n(&s) == 0
        }
    );
    let o = chitin(&home, &["audit", "verify"]);
    assert!(o.status.success(), "{}", out(&o));

    // `chitin data erase` runs on the database: the rows go, and the key is destroyed in the
    // key set every gateway reads.
    let vault = |db: &chitin::store::Db| {
        chitin::vault::Vault::for_db(
            &home,
            db,
            &mut open_store(&home),
            std::sync::Arc::new(chitin::clock::SystemClock),
        )
        .unwrap()
    };
    assert!(vault(&db).has_key(ALICE).unwrap());
    let o = chitin(&home, &["data", "erase", "--subject", ALICE]);
    assert!(o.status.success(), "{}", out(&o));
    assert_eq!(n(&db), 0);
    assert!(!vault(&db).has_key(ALICE).unwrap());
    assert_eq!(vault(&db).erasures_since(0).unwrap().len(), 1);
    assert!(!home.join("vault.keys").exists());
    drop(test_pg);
}
