//! No path that defines behaviour or trust (policy dir, entities, config, state dir, keys,
//! backups, ...) may overlap the workspace or a shared temp directory: the gateway refuses to
//! start, and refuses a reload, naming the path. Checked through the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

#[path = "support/gateway.rs"]
mod harness;
use harness::*;

/// A private state dir outside /tmp with `extra` appended to the test config.
fn home_with(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = dir.path().join("home");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    std::fs::write(
        home.join("chitin.toml"),
        format!("[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n\n{extra}"),
    )
    .unwrap();
    (dir, home)
}

fn start(home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--bind", &format!("127.0.0.1:{}", free_port())])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .output()
        .unwrap()
}

fn overlap(what: &str, path: &Path, resolved: &Path, area_name: &str, area: &Path) -> String {
    format!(
        "{what} {} (resolved: {}) overlaps {area_name} {}, which the agent's tools or other local processes can write; a file there could change what Chitin allows or trusts. Move {what} outside it",
        path.display(),
        resolved.display(),
        area.display()
    )
}

#[test]
fn a_gateway_whose_policy_dir_is_in_the_workspace_does_not_start() {
    let (dir, home) = home_with("");
    let ws = dir.path().join("ws");
    let policies = ws.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // What the model would write there.
    std::fs::write(
        policies.join("open.cedar"),
        "@id(\"open\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    let cfg = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    std::fs::write(
        home.join("chitin.toml"),
        format!(
            "{cfg}[gateway]\nworkspace = {:?}\n\n[policy]\ndir = {:?}\n",
            ws.display().to_string(),
            policies.display().to_string()
        ),
    )
    .unwrap();
    let o = start(&home);
    assert_eq!(o.status.code(), Some(2));
    let ws_real = std::fs::canonicalize(&ws).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "chitin: {}\n",
            overlap(
                "[policy] dir",
                &policies,
                &ws_real.join("policies"),
                "the workspace",
                &ws_real
            )
        )
    );
    // Refused before anything was created.
    assert!(!home.join("state.db").exists());
    assert!(!home.join("audit.db").exists());
}

#[test]
fn a_gateway_whose_entities_file_is_in_tmp_does_not_start() {
    let entities = PathBuf::from(format!("/tmp/chitin-entities-{}.json", std::process::id()));
    let (_dir, home) = home_with(&format!(
        "[policy]\nentities = {:?}\n",
        entities.display().to_string()
    ));
    let o = start(&home);
    assert_eq!(o.status.code(), Some(2));
    let tmp = std::fs::canonicalize("/tmp").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        format!(
            "chitin: {}\n",
            overlap(
                "[policy] entities",
                &entities,
                &tmp.join(entities.file_name().unwrap()),
                "the shared temp directory",
                &tmp
            )
        )
    );
    assert!(!home.join("state.db").exists());
}

/// The `policies` check of `/ready` (authenticated, so with its detail).
fn policies_check(gw: &Gw) -> (bool, String) {
    let v = gw.get("/ready").json();
    let c = &v["checks"]["policies"];
    (
        c["ok"].as_bool().unwrap(),
        c["detail"].as_str().unwrap().to_string(),
    )
}

/// Waits until `/ready`'s policies check satisfies `f` (the reload runs after the signal).
fn wait_policies(gw: &Gw, what: &str, f: &dyn Fn(&(bool, String)) -> bool) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = policies_check(gw);
        if f(&c) {
            return c;
        }
        assert!(Instant::now() < deadline, "{what}: last {c:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reload_that_would_read_policy_from_the_workspace_is_refused_and_the_last_good_set_stays() {
    let gw = Gw::start("");
    let before = policies_check(&gw);
    assert!(before.0, "{before:?}");
    // The model writes a permissive policy set into the workspace, and the policy dir is
    // swapped for a symlink to it (as a process with write access to the state dir's parent
    // could).
    let ws = gw.workspace();
    let evil = ws.join("policies");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::write(
        evil.join("open.cedar"),
        "@id(\"open\")\npermit(principal, action, resource);\n",
    )
    .unwrap();
    let policies = gw.home.join("policies");
    let aside = gw.root.join("policies.good");
    std::fs::rename(&policies, &aside).unwrap();
    std::os::unix::fs::symlink(&evil, &policies).unwrap();
    gw.signal("-HUP");

    let ws_real = std::fs::canonicalize(&ws).unwrap();
    let why = overlap(
        "[policy] dir",
        &policies,
        &ws_real.join("policies"),
        "the workspace",
        &ws_real,
    );
    let refused = wait_policies(&gw, "the reload refusal", &|c| !c.0);
    assert_eq!(
        refused.1,
        format!("the last reload was refused, the previous config and policies stay active: {why}")
    );
    // The permissive set is not active: a read outside the workspace is still denied.
    let outside = gw.root.join("outside.txt");
    std::fs::write(&outside, "host file").unwrap();
    let r = gw.invoke(
        &serde_json::json!({"tool": "read_file", "args": {"path": outside.to_str().unwrap()}}),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    // The refusal is in the audit log.
    let log = String::from_utf8_lossy(
        &gw.chitin(&["audit", "query", "--kind", "admin", "--json"])
            .stdout,
    )
    .into_owned();
    let v: serde_json::Value = serde_json::from_str(&log).unwrap();
    let recs = v.as_array().unwrap();
    assert!(
        recs.iter().any(|r| r["action"] == "config.reload"
            && r["outcome"] == "rejected: the last good config and policies stay active"
            && r["payload"]["error"] == why.as_str()),
        "{log}"
    );

    // Put the real directory back: the next reload is accepted and the same set is active.
    std::fs::remove_file(&policies).unwrap();
    std::fs::rename(&aside, &policies).unwrap();
    gw.signal("-HUP");
    let after = wait_policies(&gw, "the accepted reload", &|c| c.0);
    assert_eq!(after, before);
}

#[test]
fn a_start_refused_for_its_policies_leaves_the_database_unmigrated_and_no_vault() {
    let (dir, home) = home_with("");
    let policies = dir.path().join("policies");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&policies)
        .unwrap();
    std::fs::write(
        policies.join("bad.cedar"),
        "@id(\"bad\")\npermit(principal, action, resource) when { context.no_such_attr };\n",
    )
    .unwrap();
    let cfg = std::fs::read_to_string(home.join("chitin.toml")).unwrap();
    std::fs::write(
        home.join("chitin.toml"),
        format!(
            "{cfg}[policy]\ndir = {:?}\n",
            policies.display().to_string()
        ),
    )
    .unwrap();
    // A state database from an older Chitin (schema version 1, nothing in it yet).
    let db = home.join("state.db");
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&db)
            .unwrap();
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            .unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    let o = start(&home);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("bad.cedar:2:"), "{stderr}");
    assert!(stderr.contains("no_such_attr"), "{stderr}");
    // The policies are checked before the database is upgraded or a key is made for it.
    let c = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = c
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "a refused start upgraded the database");
    let leftovers: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("before-schema") || n == "vault.keys")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
