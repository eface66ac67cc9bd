//! `chitin cron list|add|remove|run`: output, exit codes and Cedar `cron.manage`; and a job
//! run on request by a running gateway's scheduler.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, Step};
use harness::{Gw, PASS};
use serde_json::Value;

fn chitin(home: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A state dir after `chitin init` with one configured job.
fn home() -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let h = t.path().join("home");
    std::fs::DirBuilder::new().mode(0o700).create(&h).unwrap();
    let cfg = h.join("chitin.toml");
    std::fs::write(
        &cfg,
        "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n\n[[cron]]\nname = \"from-config\"\nevery = \"1h\"\nprompt = \"hourly\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = chitin(&h, &["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (t, h)
}

#[test]
fn cron_add_list_remove_and_run_keep_their_output_and_exit_codes() {
    let (_t, h) = home();
    let o = chitin(
        &h,
        &[
            "cron",
            "add",
            "brief",
            "--schedule",
            "0 7 * * 1-5",
            "--timezone",
            "Europe/Berlin",
            "--prompt",
            "Summarise my mail",
            "--missed",
            "run_once",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = stdout(&o);
    assert!(
        line.starts_with("added: brief (runs as owner; 0 7 * * 1-5 (Europe/Berlin); next run "),
        "{line}"
    );
    let o = chitin(&h, &["cron", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = list.iter().map(|j| j["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["brief", "from-config"]);
    assert_eq!(list[0]["source"], "cli");
    assert_eq!(list[0]["user"], "owner");
    assert_eq!(list[0]["missed"], "run_once");
    assert_eq!(list[0]["prompt"], "Summarise my mail");
    assert_eq!(list[0]["session"], "cron:brief");
    assert!(list[0]["next_run"].as_str().unwrap().ends_with(":00:00Z"));
    assert_eq!(list[1]["source"], "config");
    assert_eq!(list[1]["schedule"], "every 1h");
    let o = chitin(&h, &["cron", "list"]);
    let text = stdout(&o);
    assert!(
        text.contains("brief  0 7 * * 1-5 (Europe/Berlin)  prompt  as owner  next "),
        "{text}"
    );
    assert!(text.contains("never ran  [cli]"), "{text}");
    // The name is taken; a job from chitin.toml cannot be removed here; unknown names.
    let o = chitin(
        &h,
        &["cron", "add", "brief", "--every", "5m", "--prompt", "x"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o).trim(),
        "refused: a cron job named `brief` exists already; remove it first or pick another name"
    );
    let o = chitin(&h, &["cron", "remove", "from-config"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("is defined in chitin.toml"),
        "{}",
        stdout(&o)
    );
    let o = chitin(&h, &["cron", "run", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("no cron job named `nope`"),
        "{}",
        stdout(&o)
    );
    // Invalid jobs are refused with the reason.
    let o = chitin(
        &h,
        &[
            "cron",
            "add",
            "bad",
            "--schedule",
            "61 * * * *",
            "--prompt",
            "x",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("minute 61 is out of range 0-59"),
        "{}",
        stdout(&o)
    );
    // A run request is queued for the gateway.
    let o = chitin(&h, &["cron", "run", "brief"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout(&o).starts_with("queued: brief runs at the gateway's next look"),
        "{}",
        stdout(&o)
    );
    let o = chitin(&h, &["cron", "remove", "brief"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o).trim(), "removed: brief");
    let o = chitin(&h, &["cron", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.len(), 1);
}

#[test]
fn cron_add_for_another_user_is_refused_by_cedar_and_recorded() {
    let (_t, h) = home();
    let o = chitin(
        &h,
        &[
            "cron", "add", "theirs", "--every", "1h", "--prompt", "x", "--user", "mallory",
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o).trim(),
        "refused: policy denied `cron.manage` (add `theirs`, runs as `mallory`) for Chitin::User::\"owner\" (determining policies: [])"
    );
    let o = chitin(&h, &["cron", "list", "--json"]);
    let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(list.iter().all(|j| j["name"] != "theirs"));
    let o = chitin(&h, &["audit", "query", "--kind", "decision", "--json"]);
    let records: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "cron.manage" && r["decision"] == "deny"),
        "{records:?}"
    );
}

#[test]
fn a_running_gateway_runs_a_job_on_request_and_records_its_end() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(vec![])).unwrap();
    s.set_fallback(Step::text("Nightly summary done."));
    let gw = Gw::start(&format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n[[cron]]\nname = \"nightly\"\nschedule = \"0 3 1 1 *\"\nprompt = \"Summarise the night\"\n",
        s.base_url()
    ));
    let o = gw.chitin(&["cron", "run", "nightly"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let o = gw.chitin(&["cron", "list", "--json"]);
        let list: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        if list[0]["last"]["status"] == "completed" {
            assert_eq!(list[0]["last"]["kind"], "manual");
            assert!(
                list[0]["last"]["result"]
                    .as_str()
                    .unwrap()
                    .ends_with("answer kept in the session"),
                "{list:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the run was not recorded: {list:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.requests().len(), 1);
    assert!(
        s.requests()[0]
            .body
            .to_string()
            .contains("Summarise the night")
    );
}
