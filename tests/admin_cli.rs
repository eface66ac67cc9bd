//! Administrative commands are decided by Cedar for the CLI's configured operator, and
//! backups are trusted only when signed by the deployment's audit key. Checked from outside
//! through the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

const PASS: &str = "admin-cli-test-passphrase";
const ALICE: &str = "Chitin::User::\"alice\"";

struct H {
    _t: tempfile::TempDir,
    home: PathBuf,
    parent: PathBuf,
}

fn setup() -> H {
    let t = tempfile::tempdir().unwrap();
    let home = support::private_home(t.path(), "state");
    support::write_owner_entities(&home);
    let parent = t.path().to_path_buf();
    H {
        _t: t,
        home,
        parent,
    }
}

fn run(home: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("USER", "tester")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    run(home, args, b"")
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(home: &Path, args: &[&str]) -> Output {
    let o = chitin(home, args);
    assert!(o.status.success(), "{args:?}: {}", out(&o));
    o
}

/// The config: test secrets settings, the backup keys, and `[cli] operator` when given.
fn configure(h: &H, operator: Option<&str>, recipient: &str, identity: &Path) {
    let mut cfg = format!(
        "{}\n[backup]\nrecipient = \"{recipient}\"\nidentity = {:?}\n",
        support::TEST_SECRETS_CONFIG,
        identity.display().to_string()
    );
    if let Some(op) = operator {
        cfg.push_str(&format!("\n[cli]\noperator = \"{op}\"\n"));
    }
    std::fs::write(h.home.join("chitin.toml"), cfg).unwrap();
}

/// A backup identity and its recipient.
fn backup_keys(h: &H) -> (PathBuf, String) {
    let id = h.parent.join("backup-id.txt");
    let o = ok(
        &h.home,
        &["backup", "keygen", "--out", id.to_str().unwrap()],
    );
    (id, stdout(&o).trim().to_string())
}

fn refusal(action: &str, user: &str) -> String {
    format!(
        "refused: policy denied `{action}` for Chitin::User::\"{user}\" (determining policies: [])\n"
    )
}

/// The decision records for `actor`: (action, decision) in log order.
fn decisions(home: &Path, actor: &str) -> Vec<(String, String)> {
    let o = ok(
        home,
        &[
            "audit", "query", "--kind", "decision", "--actor", actor, "--json",
        ],
    );
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_string(),
                r["decision"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn an_operator_who_is_not_an_owner_is_refused_every_admin_action_and_each_refusal_is_audited() {
    let h = setup();
    let (id, recipient) = backup_keys(&h);
    configure(&h, None, &recipient, &id);
    let o = run(&h.home, &["secrets", "set", "K"], b"admin-secret-value-1");
    assert!(o.status.success(), "{}", out(&o));
    let backup = h.parent.join("b.age");
    ok(
        &h.home,
        &["backup", "create", "--out", backup.to_str().unwrap()],
    );
    // After the backup: a restore would bring back the store without K2.
    let o = run(&h.home, &["secrets", "set", "K2"], b"admin-secret-value-2");
    assert!(o.status.success(), "{}", out(&o));

    configure(&h, Some("mallory"), &recipient, &id);
    let b = backup.to_str().unwrap();
    let cases: [(&str, Vec<&str>); 10] = [
        ("token.show", vec!["token", "show"]),
        ("secret.reveal", vec!["secrets", "get", "K", "--reveal"]),
        ("secret.reveal", vec!["secrets", "export-identity"]),
        ("secret.set", vec!["secrets", "rotate-key"]),
        ("backup.restore", vec!["backup", "restore", b, "--yes"]),
        ("retention.run", vec!["retention", "run"]),
        ("audit.export", vec!["audit", "export"]),
        ("data.erase", vec!["data", "erase", "--subject", ALICE]),
        ("data.export", vec!["sessions", "list"]),
        ("data.export", vec!["sessions", "show", "s1"]),
    ];
    for (action, args) in &cases {
        let o = chitin(&h.home, args);
        assert_eq!(o.status.code(), Some(1), "{action}: {}", out(&o));
        assert_eq!(stdout(&o), refusal(action, "mallory"), "{action}");
        assert!(!out(&o).contains("admin-secret-value"), "{}", out(&o));
        assert!(!out(&o).contains("AGE-SECRET-KEY"), "{}", out(&o));
    }

    configure(&h, None, &recipient, &id);
    let denied: Vec<(String, String)> = cases
        .iter()
        .map(|(a, _)| ((*a).to_string(), "deny".to_string()))
        .collect();
    assert_eq!(decisions(&h.home, "Chitin::User::\"mallory\""), denied);
    // Nothing was restored: the secret set after the backup is still there.
    assert!(stdout(&ok(&h.home, &["secrets", "list"])).contains("K2"));

    // The owner (the default operator) may do each of them.
    let token = stdout(&ok(&h.home, &["token", "show"]));
    assert_eq!(token.trim().len(), 64);
    let value = stdout(&ok(&h.home, &["secrets", "get", "K", "--reveal"]));
    assert_eq!(value.trim(), "admin-secret-value-1");
    assert!(stdout(&ok(&h.home, &["secrets", "export-identity"])).contains("AGE-SECRET-KEY"));
    ok(&h.home, &["sessions", "list"]);
    ok(&h.home, &["retention", "run"]);
    ok(&h.home, &["audit", "export"]);
    let o = ok(&h.home, &["data", "erase", "--subject", ALICE]);
    assert!(
        stdout(&o).contains("erased Chitin::User::\"alice\""),
        "{}",
        out(&o)
    );
    let o = ok(&h.home, &["backup", "restore", b, "--yes"]);
    assert!(stdout(&o).contains("restored "), "{}", out(&o));
    assert!(!stdout(&ok(&h.home, &["secrets", "list"])).contains("K2"));
}

#[test]
fn audit_append_writes_only_operator_marked_admin_and_system_records() {
    let h = setup();
    let append = |kind: &str| {
        chitin(
            &h.home,
            &[
                "audit",
                "append",
                "--kind",
                kind,
                "--actor",
                "gateway",
                "--action",
                "exec",
                "--resource",
                "Chitin::Tool::\"exec\"",
                "--payload",
                "{\"n\":1}",
            ],
        )
    };
    // A forged decision or tool run: refused before anything is opened or written.
    for kind in ["decision", "tool_run"] {
        let o = append(kind);
        assert_eq!(o.status.code(), Some(1), "{}", out(&o));
        assert_eq!(
            stdout(&o),
            format!(
                "refused: `chitin audit append` writes only admin and system records, not `{kind}`; decision and tool_run records come from the gate and the sandbox only\n"
            )
        );
    }
    assert!(!h.home.join("audit.db").exists(), "nothing was written");

    let o = append("system");
    assert!(o.status.success(), "{}", out(&o));
    let o = ok(&h.home, &["audit", "query", "--kind", "system", "--json"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v[0]["outcome"], "operator-written");
    assert_eq!(
        v[0]["payload"],
        json!({"operator_written": true, "written_by": "Chitin::User::\"owner\"", "payload": {"n": 1}})
    );

    // An operator who is not an owner may not append at all.
    std::fs::write(
        h.home.join("chitin.toml"),
        format!(
            "{}\n[cli]\noperator = \"mallory\"\n",
            support::TEST_SECRETS_CONFIG
        ),
    )
    .unwrap();
    let o = append("admin");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert_eq!(stdout(&o), refusal("audit.append", "mallory"));
}

/// What an attacker holding only the public recipient builds: the container laid out as
/// `chitin backup create` does, with a permissive policy and no audit log; unsigned or signed
/// with the attacker's own Ed25519 key.
fn forge(h: &H, recipient: &str, signer: Option<&chitin_audit::KeySigner>) -> PathBuf {
    let members: Vec<(String, Vec<u8>)> = vec![
        (
            "policies/evil.cedar".into(),
            b"@id(\"evil\")\npermit(principal, action, resource);\n".to_vec(),
        ),
        ("entities.json".into(), b"[]".to_vec()),
    ];
    let manifest = json!({
        "format": "chitin-backup",
        "version": 2,
        "created_ms": 1_767_225_600_000_i64,
        "audit_last_seq": 0,
        "members": members.iter().map(|(p, d)| json!({
            "path": p,
            "size": d.len(),
            "sha256": chitin_audit::to_hex(&chitin_audit::sha256(d)),
        })).collect::<Vec<_>>(),
        "excluded": [],
    });
    let m = serde_json::to_vec_pretty(&manifest).unwrap();
    let mut entries = vec![("MANIFEST.json".to_string(), m.clone())];
    if let Some(s) = signer {
        let sig = chitin_audit::ManifestSignature::sign(s, &m).unwrap();
        entries.push(("MANIFEST.sig".into(), serde_json::to_vec(&sig).unwrap()));
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
    let rcpt: age::x25519::Recipient = recipient.parse().unwrap();
    let sealed =
        chitin::secrets::format::encrypt_to_recipients(&t.into_inner().unwrap(), &[rcpt]).unwrap();
    let out = h.parent.join(if signer.is_some() {
        "forged-signed.age"
    } else {
        "forged.age"
    });
    std::fs::write(&out, sealed).unwrap();
    out
}

#[test]
fn a_backup_forged_with_only_the_recipient_is_refused_by_verify_and_restore_and_nothing_is_written()
{
    let h = setup();
    let (id, recipient) = backup_keys(&h);
    configure(&h, None, &recipient, &id);
    ok(&h.home, &["token", "show"]);
    let ours = chitin_audit::PublicKey::load(&h.home.join("audit.pub")).unwrap();
    let attacker = chitin_audit::KeySigner::from_seed(&[7u8; 32]);
    let unsigned = forge(&h, &recipient, None);
    let signed = forge(&h, &recipient, Some(&attacker));
    let reasons = [
        (
            &unsigned,
            format!(
                "{}: the manifest is not signed by an audit key (no MANIFEST.sig after MANIFEST.json); an unsigned backup is never trusted",
                unsigned.display()
            ),
        ),
        (
            &signed,
            format!(
                "backup check failed: the manifest is signed by key {}, not by the trusted audit key {} (this deployment's audit.pub, or --trust-key FILE); nothing from it is trusted",
                chitin_audit::CheckpointSigner::public_key(&attacker).id_hex(),
                ours.id_hex()
            ),
        ),
    ];
    for (file, why) in &reasons {
        let f = file.to_str().unwrap();
        let o = chitin(&h.home, &["backup", "verify", f]);
        assert_eq!(o.status.code(), Some(1), "{}", out(&o));
        assert_eq!(stdout(&o), format!("bad backup: {why}\n"));
        let o = chitin(&h.home, &["backup", "restore", f, "--yes"]);
        assert_eq!(o.status.code(), Some(1), "{}", out(&o));
        assert_eq!(
            stdout(&o),
            format!("bad backup: {why}; nothing was restored\n")
        );
        assert!(!h.home.join("policies/evil.cedar").exists());
        assert_ne!(
            std::fs::read(h.home.join("entities.json")).unwrap(),
            b"[]".to_vec()
        );
    }
}

#[test]
fn a_restore_shows_what_it_replaces_and_needs_a_confirmation_and_a_new_machine_needs_the_trusted_key()
 {
    let h = setup();
    let (id, recipient) = backup_keys(&h);
    configure(&h, None, &recipient, &id);
    let backup = h.parent.join("b.age");
    ok(
        &h.home,
        &["backup", "create", "--out", backup.to_str().unwrap()],
    );
    let b = backup.to_str().unwrap();
    ok(&h.home, &["retention", "run"]);

    // Not a terminal and no --yes: the listing, then a refusal; nothing restored.
    let o = chitin(&h.home, &["backup", "restore", b]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let text = stdout(&o);
    assert!(
        text.starts_with(&format!("restoring {b} into {} would:\n", h.home.display())),
        "{text}"
    );
    assert!(text.contains("  replace audit.db ("), "{text}");
    assert!(text.ends_with(
        "refused: the restore was not confirmed; run it on a terminal and type yes, or pass --yes; nothing was restored\n"
    ), "{text}");

    // A new machine (no audit.pub yet): verify names --trust-key; with the old audit.pub it
    // passes, with another deployment's key it does not.
    let fresh = support::private_home(&h.parent, "fresh");
    let o = chitin(
        &fresh,
        &["backup", "verify", b, "--identity", id.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "bad backup: no audit key to check the backup against: {} does not exist; on a new machine pass --trust-key FILE (the audit.pub of the deployment that made the backup)\n",
            fresh.join("audit.pub").display()
        )
    );
    let trusted = h.home.join("audit.pub");
    let o = chitin(
        &fresh,
        &[
            "backup",
            "verify",
            b,
            "--identity",
            id.to_str().unwrap(),
            "--trust-key",
            trusted.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    assert!(stdout(&o).starts_with("ok: "), "{}", out(&o));
}
