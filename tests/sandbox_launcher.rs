//! The small launcher `chitin-sandbox-launch` (the tool path's launcher, issue #21) run as the
//! gateway runs it: its JSON report is exactly the gateway's `LaunchReport` (parsed with
//! `deny_unknown_fields`), the command runs confined, and what it refuses it refuses with the
//! report's error and exit 125.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::path::Path;
use std::process::Command;

use chitin::tools::LaunchReport;

fn launcher() -> Command {
    let bin = Path::new(env!("CARGO_BIN_EXE_chitin")).with_file_name("chitin-sandbox-launch");
    assert_eq!(bin, Path::new(env!("CARGO_BIN_EXE_chitin-sandbox-launch")));
    let mut c = Command::new(bin);
    c.env_clear();
    c
}

fn run(c: &mut Command) -> (i32, LaunchReport) {
    let out = c.output().unwrap();
    let report: LaunchReport = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not a LaunchReport ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

fn base(home: &Path, ws: &Path) -> Command {
    let mut c = launcher();
    c.arg("--workspace")
        .arg(ws)
        .arg("--state-dir")
        .arg(home)
        .args(["--capture", "4096", "--cgroup", "off", "--timeout", "20"]);
    c
}

#[test]
fn the_small_launcher_runs_a_command_confined_and_reports_it_as_the_gateway_reads_it() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let home = tempfile::tempdir_in(tmp).unwrap();
    let ws = tempfile::tempdir_in(tmp).unwrap();
    std::fs::write(home.path().join("secrets.age"), b"state").unwrap();
    let script = format!(
        "printf 'quote\" backslash\\\\ tab\\t bell\\a \\303\\251\\n'; printf 'err\\n' >&2; \
         echo hi > out.txt; id -u; cat {}/secrets.age 2>/dev/null || echo no-state; exit 3",
        home.path().display()
    );
    let (code, r) = run(base(home.path(), ws.path())
        .args(["--env", "GREETING=hello"])
        .args(["--", "/bin/sh", "-c", &script]));
    assert_eq!(code, 3, "{r:?}");
    assert_eq!(r.exit_code, Some(3));
    assert_eq!(r.error, None);
    assert_eq!(
        r.stdout, "quote\" backslash\\ tab\t bell\u{7} é\n1000\nno-state\n",
        "{r:?}"
    );
    assert_eq!(r.stderr, "err\n");
    assert!(!r.cgroup);
    // The workspace is writable, the state directory does not exist in the view.
    assert_eq!(
        std::fs::read_to_string(ws.path().join("out.txt")).unwrap(),
        "hi\n"
    );
}

#[test]
fn the_small_launcher_reports_what_killed_the_command() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let home = tempfile::tempdir_in(tmp).unwrap();
    let ws = tempfile::tempdir_in(tmp).unwrap();
    let (code, r) =
        run(base(home.path(), ws.path())
            .args(["--timeout", "1"])
            .args(["--", "/bin/sleep", "30"]));
    assert_eq!((code, r.killed.as_deref()), (124, Some("timeout")), "{r:?}");
}

#[test]
fn the_small_launcher_refuses_a_workspace_inside_the_state_dir_and_unknown_flags() {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let home = tempfile::tempdir_in(tmp).unwrap();
    let inside = home.path().join("inner");
    std::fs::create_dir(&inside).unwrap();
    let (code, r) = run(base(home.path(), &inside).args(["--", "/bin/true"]));
    assert_eq!(code, 125);
    let e = r.error.unwrap();
    assert_eq!(e.kind, "invalid");
    assert!(
        e.message.contains("which sandboxes may never see"),
        "{}",
        e.message
    );

    let (code, r) = run(launcher().args(["--shell", "sh", "--", "/bin/true"]));
    assert_eq!(code, 125);
    assert_eq!(
        r.error.unwrap().message,
        "invalid sandbox request: unknown option --shell"
    );

    let ws = tempfile::tempdir_in(tmp).unwrap();
    let (code, r) = run(base(home.path(), ws.path()).args(["--", "/nonexistent/prog"]));
    assert_eq!((code, r.error.unwrap().kind.as_str()), (127, "exec"));
}
