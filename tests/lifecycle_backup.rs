//! Encrypted backups: consistent snapshot, verify (signature, digests, database, audit chain),
//! restore that passes `chitin audit verify`, each kind of tamper and forgery refused, the
//! gateway lock, scheduled rotation, the data keys included (a restore onto a new machine
//! brings conversations back), and a restore that fails part-way putting everything back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

mod lifecycle_support;

use std::path::{Path, PathBuf};

use chitin::lifecycle::{GatewayLock, LifecycleError, backup};
use lifecycle_support::*;
use serde_json::json;

struct B {
    h: H,
    id_file: PathBuf,
    recipient: String,
}

fn setup() -> B {
    let h = harness();
    let alice = user("alice");
    session(&h, "s-a", &alice, "alice", T0, Some("sum"));
    message(&h, "s-a", &alice, 1, "user", "transcript", T0, "hello");
    for i in 0..5 {
        audit_record(&h, &alice, "message.receive", "web", json!({ "i": i }));
    }
    let id_file = h.home.parent().unwrap().join("backup-id.txt");
    let recipient = backup::keygen(&id_file, T0).unwrap();
    B {
        h,
        id_file,
        recipient,
    }
}

fn create(b: &B, name: &str) -> PathBuf {
    let out = b.h.home.parent().unwrap().join(name);
    backup::create(
        &b.h.home,
        &b.h.lc.store,
        &b.h.lc.audit,
        &b.recipient,
        &out,
        T0,
    )
    .unwrap();
    out
}

#[test]
fn a_backup_verifies_and_a_restored_state_passes_audit_verify() {
    let b = setup();
    let file = create(&b, "b.age");
    let id = backup::load_identity(&b.id_file).unwrap();
    let opened = backup::open(&file, &id).unwrap();
    let verified = backup::check(opened, &b.h.lc.audit.public_key()).unwrap();
    let (opened, report) = (verified.opened(), &verified.report);
    assert!(report.audit.starts_with("ok: "), "{}", report.audit);
    assert_eq!(report.state_version, chitin::store::Store::latest_version());
    assert!(opened.members.contains_key("secrets.age"));
    assert!(opened.members.contains_key("audit.pub"));
    assert!(opened.members.contains_key("chitin.toml"));

    // Life goes on after the backup: more records, a deleted message.
    let alice = user("alice");
    for i in 0..3 {
        audit_record(&b.h, &alice, "message.send", "web", json!({ "later": i }));
    }
    b.h.lc
        .store
        .conn()
        .unwrap()
        .execute("DELETE FROM messages", [])
        .unwrap();
    let home = b.h.home.clone();
    let clock = b.h.clock.clone();
    let H { _t, lc, gate, .. } = b.h;
    lc.audit.shutdown().unwrap();
    drop((lc, gate));

    let restored = backup::restore(&verified, &home).unwrap().commit();
    assert!(restored.replaced >= 3, "{restored:?}");
    assert!(!restored.data_keys_restored, "the live vault.keys is kept");
    let line = audit_verifies(&home);
    assert!(line.starts_with("ok: "), "{line}");
    // The history recorded after the backup is not erased: the live log was archived whole
    // and still verifies on its own, with the three later records in it.
    let archive = restored.audit_archive.clone().unwrap();
    assert!(
        archive.starts_with(home.join("audit-archive")),
        "{archive:?}"
    );
    let archived = audit_verifies(&archive);
    assert!(archived.starts_with("ok: "), "{archived}");
    let later: i64 = rusqlite::Connection::open_with_flags(
        archive.join("audit.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row(
        "SELECT COUNT(*) FROM records WHERE action = 'message.send'",
        [],
        |r| r.get(0),
    )
    .unwrap();
    assert!(later >= 3, "{later}");
    let h = open_at(_t, home, clock);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 1);
    let body: Vec<u8> =
        h.lc.store
            .conn()
            .unwrap()
            .query_row("SELECT body FROM messages", [], |r| r.get(0))
            .unwrap();
    assert!(
        contains(&h.lc.vault.open(&alice, &body).unwrap(), b"hello"),
        "the live vault opens restored rows"
    );
    // The restored log accepts new records and still verifies.
    audit_record(&h, &alice, "message.receive", "web", json!({}));
    h.lc.audit.checkpoint_now().unwrap();
    audit_verifies(&h.home);
}

#[test]
fn the_data_keys_are_in_a_backup_and_lock_files_never_are() {
    let b = setup();
    assert!(b.h.home.join("vault.keys").exists());
    let file = create(&b, "b.age");
    let opened = backup::open(&file, &backup::load_identity(&b.id_file).unwrap()).unwrap();
    assert_eq!(
        opened.members["vault.keys"][..],
        std::fs::read(b.h.home.join("vault.keys")).unwrap()[..]
    );
    for name in [
        "vault.lock",
        "secrets.lock",
        "gateway.lock",
        "state.db-wal",
        "audit.db-wal",
    ] {
        assert!(
            !opened.members.contains_key(name),
            "{name} is in the backup"
        );
    }
    assert!(!opened.manifest.excluded.contains(&"vault.keys".to_string()));
}

/// Copies `from`'s backup into a fresh state dir on "another machine" (nothing but the
/// directory) and opens it there.
fn restore_elsewhere(b: &B, file: &Path) -> (H, backup::Restored) {
    let t = tempfile::tempdir().unwrap();
    let home = home::private_home(t.path(), "home");
    let opened = backup::open(file, &backup::load_identity(&b.id_file).unwrap()).unwrap();
    // Disaster recovery: the old machine's audit key is trusted explicitly (--trust-key).
    let verified = backup::check(opened, &b.h.lc.audit.public_key()).unwrap();
    let restored = backup::restore(&verified, &home).unwrap().commit();
    let h = open_at(t, home, b.h.clock.clone());
    (h, restored)
}

#[test]
fn a_backup_restored_onto_a_new_machine_brings_the_conversations_back() {
    let b = setup();
    let file = create(&b, "b.age");
    let (h, restored) = restore_elsewhere(&b, &file);
    assert!(restored.data_keys_restored, "{restored:?}");
    assert!(restored.audit_archive.is_none());
    let alice = user("alice");
    let body: Vec<u8> =
        h.lc.store
            .conn()
            .unwrap()
            .query_row("SELECT body FROM messages", [], |r| r.get(0))
            .unwrap();
    assert!(
        contains(&h.lc.vault.open(&alice, &body).unwrap(), b"hello"),
        "the restored data keys open the restored conversation"
    );
    assert!(audit_verifies(&h.home).starts_with("ok: "));
}

#[test]
fn a_restore_that_fails_part_way_puts_every_file_back() {
    let b = setup();
    // A nested file that sorts after every other member: the last one the restore writes.
    std::fs::create_dir(b.h.home.join("zz")).unwrap();
    home::write_private(&b.h.home.join("zz/notes.txt"), b"notes");
    let file = create(&b, "b.age");
    let opened = backup::open(&file, &backup::load_identity(&b.id_file).unwrap()).unwrap();
    let verified = backup::check(opened, &b.h.lc.audit.public_key()).unwrap();
    // Life goes on: the live state and log differ from the backup's.
    let alice = user("alice");
    audit_record(&b.h, &alice, "message.send", "web", json!({"later": 1}));
    b.h.lc
        .store
        .conn()
        .unwrap()
        .execute("DELETE FROM messages", [])
        .unwrap();
    let home = b.h.home.clone();
    let clock = b.h.clock.clone();
    let H { _t, lc, gate, .. } = b.h;
    lc.audit.checkpoint_now().unwrap();
    lc.audit.shutdown().unwrap();
    drop((lc, gate));
    // The last member the restore writes cannot be put in place: a file stands where the
    // backup has a directory, so the restore fails after the others were replaced.
    assert_eq!(
        verified.opened().members.keys().last().unwrap(),
        "zz/notes.txt"
    );
    let blocker = home.join("zz");
    std::fs::remove_dir_all(&blocker).unwrap();
    home::write_private(&blocker, b"in the way");
    let snapshot = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<(PathBuf, Vec<u8>)> = files_under(dir)
            .into_iter()
            .filter(|p| !p.starts_with(dir.join("gateway.lock")))
            .map(|p| {
                let bytes = std::fs::read(&p).unwrap_or_default();
                (p, bytes)
            })
            .collect();
        v.sort();
        v
    };
    let before = snapshot(&home);
    let e = backup::restore(&verified, &home).unwrap_err();
    assert!(e.to_string().contains("zz"), "{e}");
    assert_eq!(snapshot(&home), before, "every file is as it was");
    assert!(!home.join("audit-archive").exists());
    // The live state is intact: the later record is in the log, the messages still gone.
    assert!(audit_verifies(&home).starts_with("ok: "));
    let h = open_at(_t, home, clock);
    assert_eq!(
        count(&h, "SELECT COUNT(*) FROM messages"),
        0,
        "nothing of the backup was left behind"
    );
}

#[test]
fn a_restore_dropped_before_commit_puts_every_file_back() {
    let b = setup();
    let file = create(&b, "b.age");
    let opened = backup::open(&file, &backup::load_identity(&b.id_file).unwrap()).unwrap();
    let verified = backup::check(opened, &b.h.lc.audit.public_key()).unwrap();
    b.h.lc
        .store
        .conn()
        .unwrap()
        .execute("DELETE FROM messages", [])
        .unwrap();
    let home = b.h.home.clone();
    let clock = b.h.clock.clone();
    let H { _t, lc, gate, .. } = b.h;
    lc.audit.checkpoint_now().unwrap();
    lc.audit.shutdown().unwrap();
    drop((lc, gate));
    let restoring = backup::restore(&verified, &home).unwrap();
    assert!(restoring.restored().replaced >= 3);
    assert!(home.join("audit-archive").exists());
    // A later step failed (say, erasing again): the restore is dropped, not committed.
    drop(restoring);
    assert!(!home.join("audit-archive").exists());
    assert!(audit_verifies(&home).starts_with("ok: "));
    let h = open_at(_t, home, clock);
    assert_eq!(count(&h, "SELECT COUNT(*) FROM messages"), 0);
}

/// Decrypts, lets `f` change the tar members (path → bytes, manifest first), re-encrypts to
/// the same recipient: what an attacker who knows the public recipient can do.
type Members = Vec<(String, Vec<u8>)>;

fn reforge(b: &B, file: &Path, f: &dyn Fn(&mut Members)) -> PathBuf {
    let id = backup::load_identity(&b.id_file).unwrap();
    let sealed = std::fs::read(file).unwrap();
    let keys = chitin::secrets::format::DecryptKeys::new(0).with_x25519(id);
    let plain = chitin::secrets::format::decrypt_all(&sealed, &keys).unwrap();
    let mut members = Vec::new();
    let mut a = tar::Archive::new(&plain[..]);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        members.push((name, data));
    }
    f(&mut members);
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in &members {
        let mut hd = tar::Header::new_gnu();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o600);
        hd.set_entry_type(tar::EntryType::Regular);
        hd.set_path(name).unwrap_or_else(|_| {
            // Names tar refuses to set (e.g. with ..) are written raw.
            let raw = &mut hd.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
        });
        hd.set_cksum();
        t.append(&hd, &data[..]).unwrap();
    }
    let plain = t.into_inner().unwrap();
    let rcpt: age::x25519::Recipient = b.recipient.parse().unwrap();
    let out = file.with_extension(format!("forged{}", rand_suffix()));
    std::fs::write(
        &out,
        chitin::secrets::format::encrypt_to_recipients(&plain, &[rcpt]).unwrap(),
    )
    .unwrap();
    out
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

fn refusal(b: &B, file: &Path) -> String {
    let id = backup::load_identity(&b.id_file).unwrap();
    match backup::open(file, &id).and_then(|o| backup::check(o, &b.h.lc.audit.public_key())) {
        Ok(_) => panic!("{} was accepted", file.display()),
        Err(LifecycleError::Backup(why)) => why,
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

fn manifest_fix(members: &mut [(String, Vec<u8>)], path: &str) {
    let data = members
        .iter()
        .find(|(n, _)| n == &format!("state/{path}"))
        .unwrap()
        .1
        .clone();
    let (_, m) = &mut members[0];
    let mut v: serde_json::Value = serde_json::from_slice(m).unwrap();
    for e in v["members"].as_array_mut().unwrap() {
        if e["path"] == path {
            e["sha256"] = json!(chitin_audit::to_hex(&chitin_audit::sha256(&data)));
            e["size"] = json!(data.len());
        }
    }
    *m = serde_json::to_vec(&v).unwrap();
}

/// Re-signs the (changed) manifest with `signer`, as someone holding that key could.
fn resign(members: &mut [(String, Vec<u8>)], signer: &chitin_audit::KeySigner) {
    let sig = chitin_audit::ManifestSignature::sign(signer, &members[0].1).unwrap();
    assert_eq!(members[1].0, "MANIFEST.sig");
    members[1].1 = serde_json::to_vec(&sig).unwrap();
}

/// The deployment's own audit key (what an insider with the passphrase holds).
fn own_signer(b: &B) -> chitin_audit::KeySigner {
    let mut store = open_store(&b.h.home);
    chitin::secrets::audit_key::signer(&mut store, &b.h.home).unwrap()
}

#[test]
fn each_kind_of_backup_tamper_is_refused_with_its_reason() {
    let b = setup();
    let file = create(&b, "b.age");

    // Wrong identity.
    let other = b.h.home.parent().unwrap().join("other-id.txt");
    backup::keygen(&other, T0).unwrap();
    let e = backup::open(&file, &backup::load_identity(&other).unwrap()).unwrap_err();
    assert!(e.to_string().contains("cannot be decrypted"), "{e}");

    // A flipped byte in the ciphertext.
    let mut bytes = std::fs::read(&file).unwrap();
    let i = bytes.len() - 40;
    bytes[i] ^= 1;
    let flipped = file.with_extension("flipped");
    std::fs::write(&flipped, &bytes).unwrap();
    assert!(refusal(&b, &flipped).contains("cannot be decrypted"));

    // Truncated.
    let truncated = file.with_extension("trunc");
    std::fs::write(&truncated, &std::fs::read(&file).unwrap()[..200]).unwrap();
    assert!(refusal(&b, &truncated).contains("cannot be decrypted"));

    // A changed manifest without a new signature: the signature catches it.
    let f2 = reforge(&b, &file, &|m| {
        let mut v: serde_json::Value = serde_json::from_slice(&m[0].1).unwrap();
        v["created_ms"] = json!(1);
        m[0].1 = serde_json::to_vec(&v).unwrap();
    });
    assert!(
        refusal(&b, &f2).starts_with(
            "backup check failed: the manifest signature does not verify with the trusted audit key"
        ),
        "{}",
        refusal(&b, &f2)
    );

    // A member changed after the manifest was written.
    let f = reforge(&b, &file, &|m| {
        let s = m
            .iter_mut()
            .find(|(n, _)| n == "state/secrets.age")
            .unwrap();
        s.1[50] ^= 1;
    });
    assert!(refusal(&b, &f).contains("member secrets.age does not match its digest"));

    // A member removed.
    let f = reforge(&b, &file, &|m| m.retain(|(n, _)| n != "state/audit.pub"));
    assert!(refusal(&b, &f).contains("member audit.pub is missing"));

    // A member added.
    let f = reforge(&b, &file, &|m| {
        m.push((
            "state/policies/evil.cedar".into(),
            b"permit(principal,action,resource);".to_vec(),
        ))
    });
    assert!(refusal(&b, &f).contains("policies/evil.cedar is not in the manifest"));

    // A member escaping the state dir.
    let f = reforge(&b, &file, &|m| {
        m.push(("state/../../etc/cron.d/x".into(), b"x".to_vec()))
    });
    assert!(refusal(&b, &f).contains("unexpected member"));

    // The manifest moved away from the front.
    let f = reforge(&b, &file, &|m| m.rotate_left(1));
    assert!(refusal(&b, &f).contains("manifest is not the first member"));

    // The audit log edited and the manifest digest recomputed and re-signed (with the
    // deployment's own key): the chain catches it.
    let signer = own_signer(&b);
    let f = reforge(&b, &file, &|m| {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("audit.db");
        let e = m.iter_mut().find(|(n, _)| n == "state/audit.db").unwrap();
        std::fs::write(&db, &e.1).unwrap();
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("DROP TRIGGER records_only_payload_removal; UPDATE records SET actor = 'forged' WHERE seq = 2;").unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
        drop(c);
        e.1 = std::fs::read(&db).unwrap();
        manifest_fix(m, "audit.db");
        resign(m, &signer);
    });
    let why = refusal(&b, &f);
    assert!(
        why.contains("audit log: tampered: first bad record 2"),
        "{why}"
    );

    // The state database replaced with garbage and the manifest recomputed.
    let f = reforge(&b, &file, &|m| {
        let e = m.iter_mut().find(|(n, _)| n == "state/state.db").unwrap();
        e.1 = b"not a database at all, just bytes".repeat(200);
        manifest_fix(m, "state.db");
        resign(m, &signer);
    });
    assert!(refusal(&b, &f).contains("backup check failed"));
}

#[test]
fn a_restore_is_refused_while_a_gateway_holds_the_state_dir() {
    let b = setup();
    let file = create(&b, "b.age");
    let opened = backup::open(&file, &backup::load_identity(&b.id_file).unwrap()).unwrap();
    let verified = backup::check(opened, &b.h.lc.audit.public_key()).unwrap();
    let gateway = GatewayLock::acquire(&b.h.home).unwrap();
    let e = backup::restore(&verified, &b.h.home).unwrap_err();
    assert!(matches!(e, LifecycleError::GatewayRunning { .. }), "{e}");
    assert!(e.to_string().contains("stop it before restoring"), "{e}");
    // A second gateway cannot start either.
    assert!(GatewayLock::acquire(&b.h.home).is_err());
    drop(gateway);
}

#[test]
fn scheduled_backups_go_to_the_configured_dir_and_keep_the_newest_n() {
    let b = setup();
    let dir = b.h.home.parent().unwrap().join("backups");
    let cfg = chitin::config::backup::BackupConfig {
        recipient: b.recipient.clone(),
        dir: dir.to_string_lossy().into_owned(),
        keep: 2,
        ..Default::default()
    };
    let mut made = Vec::new();
    for i in 0..4 {
        made.push(
            backup::scheduled(
                &b.h.home,
                &b.h.lc.store,
                &b.h.lc.audit,
                &cfg,
                T0 + i * 3_600_000,
            )
            .unwrap()
            .unwrap(),
        );
    }
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    left.sort();
    assert_eq!(left, made[2..].to_vec());
    let none = chitin::config::backup::BackupConfig::default();
    assert!(
        backup::scheduled(&b.h.home, &b.h.lc.store, &b.h.lc.audit, &none, T0)
            .unwrap()
            .is_none()
    );
}

#[test]
fn without_a_recipient_a_backup_is_refused_with_how_to_make_one() {
    let b = setup();
    let out = b.h.home.parent().unwrap().join("x.age");
    let e = backup::create(&b.h.home, &b.h.lc.store, &b.h.lc.audit, "", &out, T0).unwrap_err();
    assert!(e.to_string().contains("chitin backup keygen"), "{e}");
    assert!(!out.exists());
    // An existing file is never overwritten.
    let f = create(&b, "once.age");
    let e = backup::create(
        &b.h.home,
        &b.h.lc.store,
        &b.h.lc.audit,
        &b.recipient,
        &f,
        T0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("File exists"), "{e}");
}

/// What an attacker holding only the public recipient can build: the container exactly as
/// `backup::create` lays it out (manifest, signature, members), with a permissive policy and
/// no audit log.
fn forge(b: &B, signature: Option<&chitin_audit::KeySigner>) -> PathBuf {
    let evil = b"permit(principal, action, resource);".to_vec();
    let state_db = std::fs::read(b.h.home.join("state.db")).unwrap();
    let members: Vec<(String, Vec<u8>)> = vec![
        ("state.db".into(), state_db),
        ("policies/evil.cedar".into(), evil),
    ];
    let manifest = json!({
        "format": "chitin-backup",
        "version": backup::VERSION,
        "created_ms": T0,
        "audit_last_seq": 0,
        "members": members.iter().map(|(p, d)| json!({
            "path": p,
            "size": d.len(),
            "sha256": chitin_audit::to_hex(&chitin_audit::sha256(d)),
        })).collect::<Vec<_>>(),
        "excluded": [],
    });
    let m = serde_json::to_vec_pretty(&manifest).unwrap();
    let mut entries = vec![(backup::MANIFEST.to_string(), m.clone())];
    if let Some(signer) = signature {
        let sig = chitin_audit::ManifestSignature::sign(signer, &m).unwrap();
        entries.push((
            backup::MANIFEST_SIG.into(),
            serde_json::to_vec(&sig).unwrap(),
        ));
    }
    entries.extend(members.into_iter().map(|(p, d)| (format!("state/{p}"), d)));
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in &entries {
        let mut hd = tar::Header::new_ustar();
        hd.set_size(data.len() as u64);
        hd.set_mode(0o600);
        hd.set_entry_type(tar::EntryType::Regular);
        t.append_data(&mut hd, name, &data[..]).unwrap();
    }
    let rcpt: age::x25519::Recipient = b.recipient.parse().unwrap();
    let out =
        b.h.home
            .parent()
            .unwrap()
            .join(format!("forged-{}.age", rand_suffix()));
    let sealed =
        chitin::secrets::format::encrypt_to_recipients(&t.into_inner().unwrap(), &[rcpt]).unwrap();
    std::fs::write(&out, sealed).unwrap();
    out
}

#[test]
fn a_backup_forged_with_only_the_recipient_is_refused_unsigned_or_signed_with_another_key() {
    let b = setup();
    let unsigned = forge(&b, None);
    assert_eq!(
        refusal(&b, &unsigned),
        format!(
            "{}: the manifest is not signed by an audit key (no MANIFEST.sig after MANIFEST.json); an unsigned backup is never trusted",
            unsigned.display()
        )
    );
    let attacker = chitin_audit::KeySigner::from_seed(&[7u8; 32]);
    let signed = forge(&b, Some(&attacker));
    assert_eq!(
        refusal(&b, &signed),
        format!(
            "backup check failed: the manifest is signed by key {}, not by the trusted audit key {} (this deployment's audit.pub, or --trust-key FILE); nothing from it is trusted",
            chitin_audit::CheckpointSigner::public_key(&attacker).id_hex(),
            b.h.lc.audit.public_key().id_hex()
        )
    );
}

#[test]
fn a_signed_backup_without_its_audit_log_is_refused() {
    let b = setup();
    // Even the deployment's own key does not make a backup without its audit log restorable.
    let signed = forge(&b, Some(&own_signer(&b)));
    assert_eq!(
        refusal(&b, &signed),
        "backup check failed: the backup holds no audit log (missing: audit.db, audit.checkpoints, audit.pub); a backup without its audit log is never restored"
    );
}

#[test]
fn a_backup_verifies_with_an_explicit_trusted_key_and_not_with_another() {
    let b = setup();
    let file = create(&b, "b.age");
    let id = backup::load_identity(&b.id_file).unwrap();
    // The key as a new machine would get it: the old deployment's audit.pub text.
    let text = std::fs::read_to_string(b.h.home.join("audit.pub")).unwrap();
    let key = chitin_audit::PublicKey::parse(&text).unwrap();
    assert!(backup::check(backup::open(&file, &id).unwrap(), &key).is_ok());
    let other =
        chitin_audit::CheckpointSigner::public_key(&chitin_audit::KeySigner::from_seed(&[9u8; 32]));
    let e = backup::check(backup::open(&file, &id).unwrap(), &other).unwrap_err();
    assert!(
        e.to_string().contains("not by the trusted audit key"),
        "{e}"
    );
}

// ---- PostgreSQL -----------------------------------------------------------------------------

/// The index's keys sealed with the vault, as the agent does.
struct VaultSealing(std::sync::Arc<chitin::vault::Vault>);

impl chitin::tools::memory::Sealing for VaultSealing {
    fn seal(&self, subject: &str, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        self.0.seal(subject, plaintext).map_err(|e| e.to_string())
    }
    fn open(&self, subject: &str, sealed: &[u8]) -> Result<zeroize::Zeroizing<Vec<u8>>, String> {
        self.0.open(subject, sealed).map_err(|e| e.to_string())
    }
}

fn memory(
    h: &H,
    store: std::sync::Arc<chitin::store::Store>,
) -> chitin::tools::memory::MemoryIndex {
    chitin::tools::memory::MemoryIndex::new(
        store,
        std::sync::Arc::new(VaultSealing(std::sync::Arc::clone(&h.lc.vault))),
    )
}

/// A deployment on PostgreSQL with rows in most of what a backup carries: sessions,
/// messages (and their memory index), runs, usage (and the spend kept from it), approvals,
/// a legal hold.
fn setup_pg() -> (B, PathBuf) {
    let h = harness_on(chitin::store::Dialect::Postgres);
    let alice = user("alice");
    let bob = user("bob");
    session(&h, "s-a", &alice, "alice", T0, Some("sum"));
    session(&h, "s-b", &bob, "bob", T0, None);
    for (i, text) in ["hello pineapple", "the garden is green", "pineapple garden"]
        .iter()
        .enumerate()
    {
        let seq = i64::try_from(i).unwrap() + 1;
        let body = json!({"role": "user", "text": text}).to_string();
        let sealed = h.lc.vault.seal(&alice, body.as_bytes()).unwrap();
        exec(
            &h,
            "INSERT INTO messages (session_key, run_id, subject, seq, role, class, created_ms, size, body)
             VALUES ('s-a', NULL, ?1, ?2, 'user', 'transcript', ?3, ?4, ?5)",
            chitin::store::params![alice, seq, T0 + seq, i64::try_from(body.len()).unwrap(), sealed],
        );
    }
    message(&h, "s-b", &bob, 1, "user", "transcript", T0, "bob here");
    run_row(&h, "r-a", "s-a", &alice, "alice", T0);
    usage_row(&h, &alice, "alice", "s-a", "r-a", T0);
    approval(
        &h,
        "ap-a",
        "alice",
        Some("owner"),
        "used",
        T0,
        "alice asked",
    );
    chitin::lifecycle::retention::hold(
        &h.lc,
        &chitin::vault::Subject::parse(&bob).unwrap(),
        "case 7",
        "op",
    )
    .unwrap();
    for i in 0..3 {
        audit_record(&h, &alice, "message.receive", "web", json!({ "i": i }));
    }
    let ws = h.home.parent().unwrap().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    std::fs::write(ws.join("MEMORY.md"), "pineapple notes\n").unwrap();
    let hits = memory(&h, std::sync::Arc::clone(&h.lc.store))
        .search("alice", &ws, "pineapple", 10)
        .unwrap();
    assert_eq!(hits.len(), 3, "control: {hits:?}");
    let id_file = h.home.parent().unwrap().join("backup-id.txt");
    let recipient = backup::keygen(&id_file, T0).unwrap();
    (
        B {
            h,
            id_file,
            recipient,
        },
        ws,
    )
}

/// Every row of every table, as text, sorted (the backend's own bookkeeping and the
/// backend-specific form of the memory index left out).
fn rows_of(db: &chitin::store::Db) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    for t in db.tables().unwrap() {
        if [
            "schema_version",
            "memory_terms",
            "memory_fts",
            "transcript_changes",
            // The data keys on PostgreSQL: a backup carries them as its vault.keys member.
            "vault_keys",
        ]
        .contains(&t.as_str())
        {
            continue;
        }
        // By column name: a table SQLite rebuilt may order its columns differently.
        let mut cols: Vec<String> = db
            .with(|c| match c.dialect() {
                chitin::store::Dialect::Sqlite => c
                    .query_all(&format!("PRAGMA table_info({t})"), chitin::store::params![])?
                    .iter()
                    .map(|r| r.get::<String>(1))
                    .collect::<Result<Vec<_>, _>>(),
                chitin::store::Dialect::Postgres => c
                    .query_all(
                        "SELECT column_name::text FROM information_schema.columns
                         WHERE table_schema = current_schema() AND table_name = ?1",
                        chitin::store::params![t],
                    )?
                    .iter()
                    .map(|r| r.get::<String>(0))
                    .collect::<Result<Vec<_>, _>>(),
            })
            .unwrap();
        cols.sort();
        let mut rows: Vec<String> = db
            .with(|c| {
                c.query_all(
                    &format!(
                        "SELECT {} FROM {t}",
                        cols.iter()
                            .map(|c| format!("\"{c}\""))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    chitin::store::params![],
                )
            })
            .unwrap()
            .into_iter()
            .map(|r| {
                r.into_values()
                    .into_iter()
                    .map(|v| match v {
                        chitin_store::Value::Null(_) => "NULL".to_string(),
                        v => format!("{v:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .collect();
        rows.sort();
        out.insert(t, rows);
    }
    out
}

fn verified_backup(b: &B, name: &str) -> backup::Verified {
    let file = create(b, name);
    let id = backup::load_identity(&b.id_file).unwrap();
    backup::check(
        backup::open(&file, &id).unwrap(),
        &b.h.lc.audit.public_key(),
    )
    .unwrap()
}

#[test]
fn a_backup_of_a_postgres_store_restores_onto_a_fresh_postgres_database_with_the_same_rows() {
    let (b, ws) = setup_pg();
    let verified = verified_backup(&b, "pg.age");
    assert_eq!(
        verified.report.state_version,
        chitin::store::Store::latest_version()
    );
    let source = rows_of(b.h.lc.store.db());
    assert_eq!(source["messages"].len(), 4);
    assert_eq!(source["holds"].len(), 1);
    assert_eq!(source["spend_daily"].len(), 1);
    assert_eq!(
        source["memory_docs"].len(),
        4,
        "{:?}",
        source["memory_docs"]
    );

    let fresh = chitin_store::testing::TestPg::new().unwrap();
    let target = fresh.db().unwrap();
    let stage = backup::scratch_dir(b.h.home.parent().unwrap(), "stage").unwrap();
    let staged = backup::stage_state(&verified, stage.path()).unwrap();
    let state = chitin::store::Store::open(&staged).unwrap();
    let copied = backup::restore_into_postgres(&state, &target, &mut |_, _| {}).unwrap();
    assert!(
        copied.iter().any(|(t, n)| t == "messages" && *n == 4),
        "{copied:?}"
    );
    assert_eq!(rows_of(&target), source);
    // The data keys come from the database (the harness's vault is the database's) as the
    // vault.keys member, and go into a database without keys; one with keys keeps its own.
    let keys = chitin::vault::sealed_keys_in(b.h.lc.store.db())
        .unwrap()
        .unwrap();
    assert!(!b.h.home.join("vault.keys").exists());
    assert_eq!(verified.opened().members["vault.keys"][..], keys[..]);
    assert!(backup::restore_keys_into_db(&verified, &target).unwrap());
    assert_eq!(
        chitin::vault::sealed_keys_in(&target).unwrap(),
        Some(keys.clone())
    );
    b.h.lc.vault.seal(&user("carol"), b"a new key").unwrap();
    let newer = chitin::vault::sealed_keys_in(b.h.lc.store.db())
        .unwrap()
        .unwrap();
    chitin::vault::install_sealed_keys(&target, &newer).unwrap();
    assert!(!backup::restore_keys_into_db(&verified, &target).unwrap());
    assert_eq!(chitin::vault::sealed_keys_in(&target).unwrap(), Some(newer));
    // The memory index came through: the same hits with the same scores, no re-indexing.
    let restored = std::sync::Arc::new(chitin::store::Store::from_db(target.clone()));
    let before = memory(&b.h, std::sync::Arc::clone(&b.h.lc.store))
        .search("alice", &ws, "pineapple garden", 10)
        .unwrap();
    let after = memory(&b.h, restored)
        .search("alice", &ws, "pineapple garden", 10)
        .unwrap();
    assert_eq!(before, after);
    assert_eq!(
        count(&b.h, "SELECT COUNT(*) FROM memory_terms"),
        target
            .with(|c| c
                .query_row(
                    "SELECT COUNT(*) FROM memory_terms",
                    chitin::store::params![]
                )?
                .get::<i64>(0))
            .unwrap()
    );

    // A second restore replaces what the first brought (all of it, in one transaction).
    exec(
        &b.h,
        "DELETE FROM messages WHERE session_key = 's-b'",
        chitin::store::params![],
    );
    backup::restore_into_postgres(&state, &target, &mut |_, _| {}).unwrap();
    assert_eq!(rows_of(&target), source);
}

#[test]
fn a_backup_of_a_postgres_store_restores_onto_sqlite_with_the_same_rows() {
    let (b, _ws) = setup_pg();
    let verified = verified_backup(&b, "pg.age");
    let source = rows_of(b.h.lc.store.db());
    let t = tempfile::tempdir().unwrap();
    let home = home::private_home(t.path(), "restored");
    let restored = backup::restore(&verified, &home).unwrap().commit();
    assert!(restored.replaced >= 3, "{restored:?}");
    // The database's data keys became the new machine's vault.keys.
    assert!(restored.data_keys_restored);
    assert_eq!(
        std::fs::read(home.join("vault.keys")).unwrap(),
        chitin::vault::sealed_keys_in(b.h.lc.store.db())
            .unwrap()
            .unwrap()
    );
    assert!(audit_verifies(&home).starts_with("ok: "));
    let store = chitin::store::Store::open(&home.join("state.db")).unwrap();
    assert_eq!(rows_of(store.db()), source);
    // FTS5 holds the copied index: Alice's three messages are found by their terms.
    assert_eq!(
        store
            .db()
            .with(|c| c
                .query_row("SELECT COUNT(*) FROM memory_fts", chitin::store::params![])?
                .get::<i64>(0))
            .unwrap(),
        4
    );
}

/// A deployment whose audit log is in PostgreSQL too: the backup carries that chain as the
/// `audit.db` and `audit.checkpoints` members a SQLite deployment's backup has, which verify
/// offline with the deployment's key (what `chitin-audit-verify --db` runs) and hold every
/// record up to the backup, the backup's own record included; a restore onto SQLite brings it.
#[test]
fn a_backup_of_a_postgres_deployment_carries_its_audit_chain_which_verifies_offline() {
    let h = harness_with_postgres_audit();
    assert_eq!(h.lc.audit.backend(), "postgres");
    let alice = user("alice");
    session(&h, "s-a", &alice, "alice", T0, None);
    let mut last = 0;
    for i in 0..4 {
        last = audit_record(&h, &alice, "message.receive", "web", json!({ "i": i }));
    }
    let id_file = h.home.parent().unwrap().join("backup-id.txt");
    let recipient = backup::keygen(&id_file, T0).unwrap();
    let b = B {
        h,
        id_file,
        recipient,
    };
    let verified = verified_backup(&b, "pg-audit.age");
    // `backup.create` is recorded before the snapshot: the chain goes one past the records.
    assert_eq!(verified.opened().manifest.audit_last_seq, last + 1);
    let members = &verified.opened().members;
    let t = tempfile::tempdir().unwrap();
    for m in [chitin_audit::DB_FILE, chitin_audit::CHECKPOINT_FILE] {
        std::fs::write(t.path().join(m), &members[m][..]).unwrap();
    }
    let report = chitin_audit::Verifier::new(b.h.lc.audit.public_key())
        .verify_db(
            &t.path().join(chitin_audit::DB_FILE),
            Some(&t.path().join(chitin_audit::CHECKPOINT_FILE)),
        )
        .unwrap()
        .unwrap();
    assert_eq!(report.last_seq, Some(last + 1));
    let copied = chitin_audit::AuditReader::open(&t.path().join(chitin_audit::DB_FILE))
        .unwrap()
        .range(1, last + 1)
        .unwrap();
    let live = b.h.lc.audit.reader().unwrap().range(1, last + 1).unwrap();
    assert_eq!(copied, live);
    assert_eq!(copied.last().unwrap().action, "backup.create");
    // Restored onto SQLite, the state directory's audit log is that chain.
    let r = tempfile::tempdir().unwrap();
    let home = home::private_home(r.path(), "restored");
    backup::restore(&verified, &home).unwrap().commit();
    assert_eq!(
        audit_verifies(&home),
        report.ok_line(),
        "the restored log is the backed-up chain"
    );
}
