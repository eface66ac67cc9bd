//! `chitin secrets ...` checked from outside: the CLI contract, tamper and permission
//! refusals (T-SEC-05, T-SEC-07), and interoperability with the standard `age` tool.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const PASS: &str = "correct horse battery staple";

struct Home {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

const OWNER_ENTITIES: &str = r#"[{"uid":{"type":"Chitin::Group","id":"owners"},"attrs":{},"parents":[]},{"uid":{"type":"Chitin::User","id":"owner"},"attrs":{},"parents":[{"type":"Chitin::Group","id":"owners"}]}]"#;

impl Home {
    fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(path.join("chitin.toml"), config).unwrap();
        // The CLI operator (the default owner) is an owner: set, rm and reveal are decided
        // by the policies for it.
        std::fs::write(path.join("entities.json"), OWNER_ENTITIES).unwrap();
        Self { _dir: dir, path }
    }

    fn passphrase() -> Self {
        Self::new(
            "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 4\nmax_scrypt_work_factor = 12\n",
        )
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn run_with(&self, args: &[&str], stdin: &[u8], pass: Option<&str>) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_chitin"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CHITIN_HOME", &self.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = pass {
            cmd.env("CHITIN_PASSPHRASE", p);
        }
        let mut child = cmd.spawn().unwrap();
        // A command may exit before reading its input (a refusal): not a failure.
        let _ = child.stdin.take().unwrap().write_all(stdin);
        child.wait_with_output().unwrap()
    }

    fn run(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.run_with(args, stdin, Some(PASS))
    }

    fn ok(&self, args: &[&str], stdin: &[u8]) -> Output {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "chitin {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn failed_with(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    assert!(
        stderr(o).contains(needle),
        "expected `{needle}` in: {}",
        stderr(o)
    );
}

#[test]
fn set_list_get_and_rm_work_and_list_never_shows_a_value() {
    let h = Home::passphrase();
    let set = h.ok(
        &["secrets", "set", "OPENAI", "--audience", "api.openai.com"],
        b"sk-value-0000111122223333\n",
    );
    assert!(stderr(&set).contains("stored secret `OPENAI`"));
    assert!(stderr(&set).contains("identity protected by: passphrase"));
    h.ok(
        &[
            "secrets",
            "set",
            "TG_BOT",
            "--audience",
            "api.telegram.org",
            "--audience",
            "core.telegram.org",
        ],
        b"123456:tg-token-abcdefgh",
    );
    let list = h.ok(&["secrets", "list"], b"");
    let text = stdout(&list);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.contains("OPENAI") && text.contains("api.openai.com"),
        "{text}"
    );
    assert!(text.contains("TG_BOT") && text.contains("api.telegram.org,core.telegram.org"));
    assert!(!text.contains("sk-value") && !text.contains("tg-token"));
    let json = stdout(&h.ok(&["secrets", "list", "--json"], b""));
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(first["name"], "OPENAI");
    assert!(first["created"].as_str().unwrap().ends_with('Z'));
    assert!(first["updated"].is_string());

    let got = h.ok(&["secrets", "get", "OPENAI", "--reveal"], b"");
    assert_eq!(stdout(&got), "sk-value-0000111122223333\n");

    h.ok(&["secrets", "rm", "OPENAI"], b"");
    let list = stdout(&h.ok(&["secrets", "list"], b""));
    assert!(!list.contains("OPENAI") && list.contains("TG_BOT"));
    failed_with(
        &h.run(&["secrets", "rm", "OPENAI"], b""),
        "no secret named `OPENAI`",
    );
}

#[test]
fn get_without_reveal_is_refused_and_a_reveal_is_audited_without_the_value() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"value-to-reveal-123");
    let o = h.run(&["secrets", "get", "K"], b"");
    failed_with(&o, "without --reveal");
    assert!(!stdout(&o).contains("value-to-reveal"));
    h.ok(&["secrets", "get", "K", "--reveal"], b"");
    // The reveal is in the hash-chained audit log, with the name and who, never the value.
    let reader = chitin_audit::AuditReader::open(&h.file("audit.db")).unwrap();
    let recs = reader.query(&chitin_audit::Query::default()).unwrap();
    // The operator's reveal was decided (and recorded) first, then the reveal itself.
    assert!(recs.iter().any(|r| r.action == "secret.reveal"
        && r.kind.as_str() == "decision"
        && r.decision == "allow"
        && r.actor == "Chitin::User::\"owner\""));
    let reveal = recs
        .iter()
        .find(|r| r.action == "secret.reveal" && r.kind.as_str() == "secret_use")
        .expect("a reveal record");
    assert_eq!(reveal.kind.as_str(), "secret_use");
    assert_eq!(reveal.resource, "Chitin::Secret::\"K\"");
    assert!(reveal.actor.starts_with("cli:uid="));
    assert!(recs.iter().any(|r| r.action == "secrets.set"));
    let db = std::fs::read(h.file("audit.db")).unwrap();
    assert!(!db.windows(15).any(|w| w == b"value-to-reveal"));
    let o = h.run(&["audit", "verify"], b"");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn a_value_on_the_command_line_is_refused() {
    let h = Home::passphrase();
    let o = h.run(&["secrets", "set", "K", "sk-on-argv-12345678"], b"");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("unexpected argument"), "{}", stderr(&o));
    assert!(!h.file("secrets.age").exists());
}

#[test]
fn a_short_value_and_a_bad_audience_are_refused_without_writing() {
    let h = Home::passphrase();
    failed_with(
        &h.run(&["secrets", "set", "K"], b"short"),
        "at least 8 bytes",
    );
    failed_with(
        &h.run(
            &["secrets", "set", "K", "--audience", "*.example.com"],
            b"long-enough-value",
        ),
        "wildcards are not allowed",
    );
    assert!(!h.file("secrets.age").exists());
}

#[test]
fn files_are_private_and_permissions_wider_than_0600_are_refused() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"perm-test-value-1");
    for f in ["secrets.age", "secrets.identity.age"] {
        let mode = std::fs::metadata(h.file(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    for (f, mode) in [
        ("secrets.age", 0o644),
        ("secrets.age", 0o602),
        ("secrets.identity.age", 0o640),
    ] {
        std::fs::set_permissions(h.file(f), std::fs::Permissions::from_mode(mode)).unwrap();
        let o = h.run(&["secrets", "list"], b"");
        // Readable by others: the store's own check. Writable by others: the state-dir check,
        // which stops every command first. Both name the file, its mode and the fix.
        if mode & 0o022 == 0 {
            failed_with(&o, &format!("has mode {mode:04o}"));
        } else {
            failed_with(&o, &format!("is a world-writable file (mode {mode:04o})"));
        }
        failed_with(&o, &format!("chmod 600 {}", h.file(f).display()));
        std::fs::set_permissions(h.file(f), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    h.ok(&["secrets", "list"], b"");
}

#[test]
fn a_symlinked_store_is_refused() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"symlink-test-value");
    std::fs::rename(h.file("secrets.age"), h.file("real.age")).unwrap();
    std::os::unix::fs::symlink(h.file("real.age"), h.file("secrets.age")).unwrap();
    failed_with(&h.run(&["secrets", "list"], b""), "is a symbolic link");
}

fn assert_untouched_after_refusal(h: &Home, damaged: &[u8], needle: &str) {
    std::fs::write(h.file("secrets.age"), damaged).unwrap();
    failed_with(&h.run(&["secrets", "list"], b""), needle);
    failed_with(
        &h.run(&["secrets", "set", "NEW"], b"new-value-12345678"),
        needle,
    );
    failed_with(&h.run(&["secrets", "rotate-key"], b""), needle);
    assert_eq!(
        std::fs::read(h.file("secrets.age")).unwrap(),
        damaged,
        "store was rewritten"
    );
}

#[test]
fn a_truncated_or_tampered_store_is_reported_and_never_overwritten() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"tamper-test-value-1");
    let good = std::fs::read(h.file("secrets.age")).unwrap();
    let header_end = good.windows(4).position(|w| w == b"\n---").unwrap();

    // Truncated in the payload.
    assert_untouched_after_refusal(
        &h,
        &good[..good.len() - 10],
        "encrypted payload is damaged or truncated",
    );
    // Truncated inside the header.
    assert_untouched_after_refusal(&h, &good[..header_end / 2], "invalid age header");
    // A flipped bit in the recipient stanza body: the file key cannot be unwrapped.
    let mut stanza = good.clone();
    // (age adds a random "grease" stanza, so find the X25519 one)
    let x = good.windows(10).position(|w| w == b"-> X25519 ").unwrap();
    let body_start = x + good[x..].iter().position(|b| *b == b'\n').unwrap() + 1;
    let pos = body_start + 10;
    stanza[pos] = if stanza[pos] == b'A' { b'B' } else { b'A' };
    // (indistinguishable from a file for another recipient, and reported as such)
    assert_untouched_after_refusal(&h, &stanza, "not encrypted to this identity");
    // A flipped bit in the header MAC.
    let mut mac = good.clone();
    let mac_pos = header_end + 6;
    mac[mac_pos] = if mac[mac_pos] == b'A' { b'B' } else { b'A' };
    assert_untouched_after_refusal(&h, &mac, "header MAC mismatch");
    // A flipped bit in the payload.
    let mut payload = good.clone();
    let last = payload.len() - 1;
    payload[last] ^= 0x80;
    assert_untouched_after_refusal(&h, &payload, "encrypted payload is damaged or truncated");
    // Garbage.
    assert_untouched_after_refusal(&h, b"not an age file at all", "cannot be decrypted");
    // Empty file.
    assert_untouched_after_refusal(&h, b"", "cannot be decrypted");

    std::fs::write(h.file("secrets.age"), &good).unwrap();
    h.ok(&["secrets", "list"], b"");
}

#[test]
fn a_store_encrypted_to_another_identity_is_refused() {
    let a = Home::passphrase();
    let b = Home::passphrase();
    a.ok(&["secrets", "set", "K"], b"identity-a-value-1");
    b.ok(&["secrets", "set", "K"], b"identity-b-value-1");
    let foreign = std::fs::read(b.file("secrets.age")).unwrap();
    assert_untouched_after_refusal(&a, &foreign, "not encrypted to this identity");
}

#[test]
fn a_wrong_passphrase_is_a_clear_error_and_changes_nothing() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"passphrase-test-1");
    let before = std::fs::read(h.file("secrets.age")).unwrap();
    let o = h.run_with(
        &["secrets", "set", "K2"],
        b"another-value-123",
        Some("wrong"),
    );
    failed_with(&o, "wrong passphrase for");
    failed_with(&o, "secrets.identity.age");
    assert_eq!(std::fs::read(h.file("secrets.age")).unwrap(), before);
}

#[test]
fn a_missing_identity_for_an_existing_store_says_how_to_restore_it() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "K"], b"missing-id-value-1");
    std::fs::remove_file(h.file("secrets.identity.age")).unwrap();
    failed_with(
        &h.run(&["secrets", "list"], b""),
        "chitin secrets import-identity",
    );
}

#[test]
fn a_plaintext_identity_file_needs_an_explicit_opt_in() {
    let no = Home::new("[secrets]\nbackend = \"file\"\n");
    failed_with(
        &no.run(&["secrets", "list"], b""),
        "allow_plaintext_identity = true",
    );

    let yes = Home::new("[secrets]\nbackend = \"file\"\nallow_plaintext_identity = true\n");
    let o = yes.run_with(&["secrets", "set", "K"], b"plaintext-id-value", None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("UNENCRYPTED identity file"),
        "{}",
        stderr(&o)
    );
    let mode = std::fs::metadata(yes.file("secrets.identity"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let status = stdout(&yes.ok(&["secrets", "status"], b""));
    assert!(status.contains("backend: file"), "{status}");

    // Switching to the passphrase backend with a plaintext identity lying around is refused.
    std::fs::write(
        yes.file("chitin.toml"),
        "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 4\n",
    )
    .unwrap();
    failed_with(
        &yes.run(&["secrets", "list"], b""),
        "found a plaintext identity",
    );
}

#[test]
fn status_says_what_protects_the_identity() {
    let h = Home::passphrase();
    let before = stdout(&h.ok(&["secrets", "status"], b""));
    assert!(before.contains("identity: none yet"), "{before}");
    h.ok(&["secrets", "set", "K"], b"status-value-12345");
    let after = stdout(&h.ok(&["secrets", "status"], b""));
    assert!(after.contains("backend: passphrase"), "{after}");
    // K and the audit log's signing key.
    assert!(after.contains("secrets: 2"), "{after}");
    assert!(after.contains("secrets.identity.age"), "{after}");
}

fn age_tool() -> &'static str {
    assert!(
        Command::new("age").arg("--version").output().is_ok(),
        "the interoperability tests need the standard `age` tool: apt-get install age \
         (scripts/test.sh does this)"
    );
    "age"
}

fn age_decrypt(identity_file: &Path, store: &Path) -> Output {
    Command::new(age_tool())
        .arg("-d")
        .arg("-i")
        .arg(identity_file)
        .arg(store)
        .output()
        .unwrap()
}

#[test]
fn a_store_written_by_chitin_decrypts_with_the_standard_age_tool() {
    use base64::Engine as _;
    let h = Home::passphrase();
    h.ok(
        &["secrets", "set", "OPENAI", "--audience", "api.openai.com"],
        b"sk-interop-value-42",
    );
    let exported = h.ok(&["secrets", "export-identity"], b"");
    assert!(
        stderr(&exported).contains("PRIVATE KEY"),
        "{}",
        stderr(&exported)
    );
    let dir = tempfile::tempdir().unwrap();
    let id = dir.path().join("id.txt");
    std::fs::write(&id, &exported.stdout).unwrap();
    std::fs::set_permissions(&id, std::fs::Permissions::from_mode(0o600)).unwrap();

    let out = age_decrypt(&id, &h.file("secrets.age"));
    assert!(out.status.success(), "age -d: {}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["version"], 1);
    let entry = &doc["secrets"][0];
    assert_eq!(entry["name"], "OPENAI");
    assert_eq!(entry["audience"][0], "api.openai.com");
    let value = base64::engine::general_purpose::STANDARD
        .decode(entry["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(value, b"sk-interop-value-42");

    // After rotate-key the old identity no longer opens the store; the new one does.
    h.ok(&["secrets", "rotate-key"], b"");
    let old = age_decrypt(&id, &h.file("secrets.age"));
    assert!(!old.status.success());
    std::fs::write(&id, h.ok(&["secrets", "export-identity"], b"").stdout).unwrap();
    assert!(age_decrypt(&id, &h.file("secrets.age")).status.success());
    assert_eq!(
        stdout(&h.ok(&["secrets", "get", "OPENAI", "--reveal"], b"")),
        "sk-interop-value-42\n"
    );
}

#[test]
fn an_exported_identity_restores_the_store_on_a_new_machine_and_a_wrong_one_is_refused() {
    let a = Home::passphrase();
    a.ok(
        &["secrets", "set", "K", "--audience", "x.example"],
        b"restore-value-1234",
    );
    let exported = a.ok(&["secrets", "export-identity"], b"").stdout;

    let b = Home::passphrase();
    std::fs::copy(a.file("secrets.age"), b.file("secrets.age")).unwrap();
    failed_with(&b.run(&["secrets", "list"], b""), "import-identity");

    // A different identity does not open the store: refused, nothing written.
    let c = Home::passphrase();
    c.ok(&["secrets", "set", "Z"], b"other-identity-val");
    let wrong = c.ok(&["secrets", "export-identity"], b"").stdout;
    failed_with(
        &b.run(&["secrets", "import-identity"], &wrong),
        "not encrypted to this identity",
    );
    assert!(!b.file("secrets.identity.age").exists());

    let imported = b.ok(&["secrets", "import-identity"], &exported);
    assert!(stderr(&imported).contains("WARNING"));
    // K and the audit log's signing key, which lives in the same store.
    assert!(
        stderr(&imported).contains("2 secrets readable"),
        "{}",
        stderr(&imported)
    );
    assert_eq!(
        stdout(&b.ok(&["secrets", "get", "K", "--reveal"], b"")),
        "restore-value-1234\n"
    );
}

#[test]
fn a_process_killed_while_writing_never_leaves_a_half_written_store() {
    let h = Home::passphrase();
    h.ok(&["secrets", "set", "BASE"], b"base-value-123456");
    let big = vec![b'x'; 60 * 1024];
    for round in 0..25u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["secrets", "set", &format!("K{round}")])
            .env_clear()
            .env("CHITIN_HOME", &h.path)
            .env("CHITIN_PASSPHRASE", PASS)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(&big);
        drop(stdin);
        // Kill at a different moment each round (0-12 ms into the write).
        std::thread::sleep(std::time::Duration::from_micros(round * 500));
        let _ = child.kill();
        let _ = child.wait();
        let list = h.run(&["secrets", "list"], b"");
        assert!(
            list.status.success(),
            "round {round}: store unreadable after a kill: {}",
            stderr(&list)
        );
        assert!(stdout(&list).contains("BASE"));
    }
}
