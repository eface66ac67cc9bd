//! `chitin service install|status|uninstall` with the unit directory overridden: the unit has
//! every hardening directive issue #19 names, leaves the sandbox the namespaces it needs,
//! takes the passphrase as a credential, and passes `systemd-analyze verify` where that
//! program exists.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn chitin(home: &Path, args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chitin"));
    c.args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "service-test-passphrase")
        .env("USER", "chitin-svc")
        .env_remove("CHITIN_SYSTEMD_UNIT_DIR");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A state dir outside /tmp (the unit refuses paths that PrivateTmp would hide).
fn setup() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let home = t.path().join("home");
    let o = chitin(&home, &["init"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    (t, home)
}

fn directives(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn value<'a>(d: &'a [(String, String)], key: &str) -> &'a str {
    d.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

/// `systemd-analyze verify` on the unit, or a printed reason why it was not run.
fn analyze(unit: &Path, user: bool) {
    let Ok(o) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("systemd-analyze is not installed: the unit was checked statically only");
        return;
    };
    if !o.status.success() {
        println!("systemd-analyze does not run here: the unit was checked statically only");
        return;
    }
    let mut c = Command::new("systemd-analyze");
    if user {
        c.arg("--user");
    }
    let o = c.args(["verify", "--man=no"]).arg(unit).output().unwrap();
    let out = text(&o);
    if user && !o.status.success() && out.contains("Failed to initialize manager") {
        // No user manager here (no XDG_RUNTIME_DIR): the directives are the same in the
        // system manager's parser, so verify it there.
        println!(
            "no user manager for systemd-analyze --user ({}); verifying as a system unit",
            out.trim()
        );
        return analyze(unit, false);
    }
    assert!(o.status.success(), "systemd-analyze verify: {out}");
    // Warnings about the unit's own lines are defects too (unknown keys, bad values).
    let unit_name = unit.display().to_string();
    for l in out.lines() {
        assert!(!l.contains(&unit_name), "systemd-analyze: {l}");
    }
}

#[test]
fn a_system_unit_has_the_hardening_and_leaves_the_sandbox_its_namespaces() {
    let (t, home) = setup();
    let units = t.path().join("units");
    let cred = t.path().join("passphrase");
    let o = chitin(
        &home,
        &[
            "service",
            "install",
            "--unit-dir",
            units.to_str().unwrap(),
            "--passphrase-file",
            cred.to_str().unwrap(),
            "--memory-max",
            "1536M",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("not enabled (unit directory given)"),
        "{}",
        text(&o)
    );
    let path = units.join("chitin.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    let d = directives(&unit);
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("LockPersonality", "yes"),
        ("Restart", "on-failure"),
        ("MemoryMax", "1536M"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("User", "chitin-svc"),
        ("WantedBy", "multi-user.target"),
    ] {
        assert_eq!(value(&d, k), v, "{k}");
    }
    // ProtectHome: the state dir is not under /home here, so it is fully hidden.
    let home_abs = std::fs::canonicalize(&home).unwrap();
    let protect = value(&d, "ProtectHome");
    if home_abs.starts_with("/home") || home_abs.starts_with("/root") {
        assert_eq!(protect, "read-only");
    } else {
        assert_eq!(protect, "yes");
    }
    let rw = value(&d, "ReadWritePaths");
    assert!(rw.starts_with(&home_abs.display().to_string()), "{rw}");
    let ws = t.path().join("chitin-workspace");
    assert!(
        rw.contains(&format!(
            " {}",
            std::fs::canonicalize(t.path())
                .unwrap()
                .join("chitin-workspace")
                .display()
        )) || rw.contains(&ws.display().to_string()),
        "{rw}"
    );
    // The sandbox's namespaces and system calls stay available.
    let ns: Vec<&str> = value(&d, "RestrictNamespaces").split(' ').collect();
    for n in ["user", "pid", "net", "mnt", "ipc", "uts"] {
        assert!(ns.contains(&n), "RestrictNamespaces lacks {n}");
    }
    let sc = value(&d, "SystemCallFilter");
    for s in [
        "@system-service",
        "@mount",
        "seccomp",
        "landlock_create_ruleset",
        "landlock_restrict_self",
    ] {
        assert!(sc.split(' ').any(|x| x == s), "SystemCallFilter lacks {s}");
    }
    for banned in [
        "ProtectKernelTunables",
        "ProtectKernelLogs",
        "ProcSubset",
        "PrivateUsers",
    ] {
        assert!(
            !d.iter().any(|(k, _)| k == banned),
            "{banned} would break the sandbox"
        );
    }
    // The passphrase: a credential, never an environment variable in the unit.
    assert_eq!(
        value(&d, "LoadCredential"),
        format!("chitin-passphrase:{}", cred.display())
    );
    assert!(!unit.contains("CHITIN_PASSPHRASE"));
    assert!(!unit.contains("service-test-passphrase"));
    assert_eq!(
        value(&d, "Environment"),
        format!("CHITIN_HOME={}", home_abs.display())
    );
    assert!(value(&d, "ExecStart").ends_with(" gateway"));
    analyze(&path, false);

    // status reads it back; uninstall removes it.
    let o = chitin(
        &home,
        &["service", "status", "--unit-dir", units.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("LoadCredential=chitin-passphrase:"),
        "{}",
        text(&o)
    );
    let o = chitin(
        &home,
        &[
            "service",
            "uninstall",
            "--unit-dir",
            units.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(!path.exists());
    let o = chitin(
        &home,
        &["service", "status", "--unit-dir", units.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not installed"), "{}", text(&o));
}

#[test]
fn a_user_unit_goes_to_the_directory_from_the_environment_and_verifies() {
    let (t, home) = setup();
    let units = t.path().join("user-units");
    let o = chitin(
        &home,
        &["service", "install", "--user", "--no-passphrase"],
        &[("CHITIN_SYSTEMD_UNIT_DIR", &units)],
    );
    assert!(o.status.success(), "{}", text(&o));
    let path = units.join("chitin.service");
    let unit = std::fs::read_to_string(&path).unwrap();
    let d = directives(&unit);
    assert_eq!(value(&d, "WantedBy"), "default.target");
    assert!(
        !d.iter().any(|(k, _)| k == "User"),
        "a user unit runs as its user"
    );
    assert!(
        !d.iter().any(|(k, _)| k == "LoadCredential"),
        "--no-passphrase"
    );
    assert!(
        text(&o).contains("systemctl --user enable --now chitin.service"),
        "{}",
        text(&o)
    );
    analyze(&path, true);
}

#[test]
fn a_unit_chitin_did_not_write_is_never_replaced_or_removed_without_force() {
    let (t, home) = setup();
    let units = t.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let path = units.join("chitin.service");
    std::fs::write(&path, "[Service]\nExecStart=/bin/true\n").unwrap();
    let dir = units.to_str().unwrap();
    let o = chitin(&home, &["service", "install", "--unit-dir", dir], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("was not written by `chitin service install`"),
        "{}",
        text(&o)
    );
    let o = chitin(&home, &["service", "uninstall", "--unit-dir", dir], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "[Service]\nExecStart=/bin/true\n"
    );
    let o = chitin(
        &home,
        &["service", "install", "--unit-dir", dir, "--force"],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("# Written by `chitin service install`")
    );
}

#[test]
fn a_state_dir_under_tmp_or_a_bad_memory_limit_is_refused() {
    let t = tempfile::tempdir_in("/tmp").unwrap();
    let home = t.path().join("home");
    assert!(chitin(&home, &["init"], &[]).status.success());
    let units = t.path().join("units");
    let o = chitin(
        &home,
        &["service", "install", "--unit-dir", units.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("PrivateTmp=yes"), "{}", text(&o));
    assert!(!units.join("chitin.service").exists());

    let (t, home) = setup();
    let units = t.path().join("units");
    let o = chitin(
        &home,
        &[
            "service",
            "install",
            "--unit-dir",
            units.to_str().unwrap(),
            "--memory-max",
            "lots",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--memory-max"), "{}", text(&o));
    assert!(!units.join("chitin.service").exists());
}
