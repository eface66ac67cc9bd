//! `chitin doctor` / `chitin security audit` find what is wrong with an installation.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn chitin(home: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "doctor-test-passphrase")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command may exit before reading its input: not a failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

/// The findings above `low` (a fresh install has low/info notes, e.g. no backup configured).
fn findings(home: &Path) -> (Option<i32>, Vec<Value>) {
    let o = chitin(home, &["security", "audit", "--json", "--deep"], "");
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&o.stdout)));
    let above_low = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !matches!(f["severity"].as_str(), Some("low" | "info")))
        .cloned()
        .collect();
    (o.status.code(), above_low)
}

fn ids(f: &[Value]) -> Vec<String> {
    f.iter()
        .map(|x| {
            format!(
                "{}:{}",
                x["severity"].as_str().unwrap(),
                x["id"].as_str().unwrap()
            )
        })
        .collect()
}

fn fresh() -> (tempfile::TempDir, std::path::PathBuf) {
    fresh_with(&|_| None)
}

/// A state dir set up by `chitin init` (which creates the secret store too) from the
/// documented template with test settings, `edit` changing lines before init runs.
fn fresh_with(edit: &dyn Fn(&str) -> Option<String>) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::DirBuilderExt;
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    let cfg: Vec<String> = chitin::config::default_toml()
        .lines()
        .map(|l| match (edit(l), l) {
            (Some(x), _) => x,
            (None, l) if l.starts_with("scrypt_work_factor = ") => {
                "scrypt_work_factor = 16".to_string()
            }
            (None, "backend = \"auto\"") => "backend = \"passphrase\"".to_string(),
            // The test machine's free disk space is not the test's to control.
            (None, l) if l.starts_with("min_free_disk_mb = ") => "min_free_disk_mb = 0".to_string(),
            (None, l) => l.to_string(),
        })
        .collect();
    std::fs::write(home.join("chitin.toml"), cfg.join("\n")).unwrap();
    std::fs::set_permissions(
        home.join("chitin.toml"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    assert!(chitin(&home, &["init"], "").status.success());
    (t, home)
}

#[test]
fn a_fresh_install_has_no_finding_above_low() {
    let (_t, home) = fresh();
    let o = chitin(&home, &["doctor"], "");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let (code, f) = findings(&home);
    assert_eq!(code, Some(0));
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn a_plaintext_identity_is_flagged() {
    let (_t, home) = fresh_with(&|l| {
        if l == "backend = \"auto\"" {
            Some("backend = \"file\"".to_string())
        } else if l.starts_with("allow_plaintext_identity = ") {
            Some("allow_plaintext_identity = true".to_string())
        } else {
            None
        }
    });
    assert!(
        chitin(&home, &["secrets", "set", "K"], "doctor-canary-value-1")
            .status
            .success()
    );
    let (code, f) = findings(&home);
    assert_eq!(code, Some(1), "medium: exit 1");
    assert_eq!(ids(&f), vec!["medium:secrets.identity_plaintext"]);
}

#[test]
fn an_invalid_policy_file_is_critical() {
    let (_t, home) = fresh();
    std::fs::write(
        home.join("policies/broken.cedar"),
        "permit (principal, action, resource);\n",
    )
    .unwrap();
    std::fs::set_permissions(
        home.join("policies/broken.cedar"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let (code, f) = findings(&home);
    assert_eq!(code, Some(2));
    assert_eq!(ids(&f), vec!["critical:policy.invalid"]);
    assert!(
        f[0]["observed"]
            .as_str()
            .unwrap()
            .contains("broken.cedar:1:1"),
        "{}",
        f[0]["observed"]
    );
}

#[test]
fn a_tampered_audit_log_is_critical() {
    let (_t, home) = fresh();
    for i in 0..3 {
        let args = [
            "audit",
            "append",
            "--kind",
            "admin",
            "--actor",
            "op",
            "--action",
            "x",
            "--resource",
            &format!("r{i}"),
        ];
        assert!(chitin(&home, &args, "").status.success());
    }
    assert!(chitin(&home, &["audit", "checkpoint"], "").status.success());
    let c = rusqlite::Connection::open(home.join("audit.db")).unwrap();
    // Triggers keep the table append-only; an attacker with the file drops them first.
    let triggers: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in triggers {
        c.execute_batch(&format!("DROP TRIGGER {t}")).unwrap();
    }
    c.execute("UPDATE records SET resource = 'forged' WHERE seq = 2", [])
        .unwrap();
    drop(c);
    let (code, f) = findings(&home);
    assert_eq!(code, Some(2));
    assert_eq!(ids(&f), vec!["critical:audit.tampered"]);
}

#[test]
fn a_deleted_audit_database_is_critical() {
    let (_t, home) = fresh();
    let args = [
        "audit",
        "append",
        "--kind",
        "admin",
        "--actor",
        "op",
        "--action",
        "x",
        "--resource",
        "r",
    ];
    assert!(chitin(&home, &args, "").status.success());
    std::fs::remove_file(home.join("audit.db")).unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(home.join(format!("audit.db{ext}")));
    }
    let (code, f) = findings(&home);
    assert_eq!(code, Some(2));
    assert_eq!(ids(&f), vec!["critical:audit.missing"]);
}
