//! Off-site backups through the real binary against a fake S3 store on loopback that checks
//! every SigV4 signature: the gateway's scheduled backup is uploaded (encrypted), remote
//! retention deletes by count and age (only scheduled backups under the prefix), the newest
//! remote backup is test-restored and recorded, `chitin backup list` and `fetch` work, and
//! wrong credentials or a secret without the endpoint in its audience are refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/fake_s3.rs"]
mod fake_s3;
#[path = "support/gateway.rs"]
mod gateway;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fake_s3::FakeS3;
use gateway::{Gw, PASS};

const BUCKET: &str = "chitin-backups";

fn chitin_stdin(gw: &Gw, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env("CHITIN_HOME", &gw.home)
        .env("CHITIN_PASSPHRASE", PASS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

struct Setup {
    gw: Gw,
    s3: FakeS3,
    identity: std::path::PathBuf,
}

/// A stopped gateway home with a backup identity, the two store credentials as secrets (with
/// `audience`) and `[backup]` pointing at a fake store.
fn setup(secret_value: &str, audience: &str, extra: &str) -> Setup {
    let mut gw = Gw::start("");
    gw.signal("-TERM");
    gw.wait_exit();
    let s3 = FakeS3::start(BUCKET);
    let identity = gw.root.join("backup-id.txt");
    let recipient = ok(&gw.chitin(&["backup", "keygen", "--out", identity.to_str().unwrap()]));
    ok(&chitin_stdin(
        &gw,
        &["secrets", "set", "s3-id", "--audience", audience],
        fake_s3::ACCESS_KEY,
    ));
    ok(&chitin_stdin(
        &gw,
        &["secrets", "set", "s3-secret", "--audience", audience],
        secret_value,
    ));
    let cfg = gw.home.join("chitin.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "\n[backup]\nrecipient = {:?}\nidentity = {:?}\ntarget = \"s3://{BUCKET}/site-a\"\nendpoint = {:?}\nregion = {:?}\npath_style = true\naccess_key_id = \"secret:s3-id\"\nsecret_access_key = \"secret:s3-secret\"\n{extra}\n",
        recipient.trim(),
        identity.to_str().unwrap(),
        s3.endpoint(),
        fake_s3::REGION,
    ));
    std::fs::write(&cfg, text).unwrap();
    Setup { gw, s3, identity }
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn wait_for_log(gw: &Gw, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        assert!(
            !log.contains("off-site backup upload failed")
                && !log.contains("off-site backup round failed")
                && !log.contains("test-restore failed"),
            "{log}"
        );
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_gateway_uploads_its_scheduled_backup_prunes_old_ones_and_test_restores_the_newest() {
    let mut s = setup(
        fake_s3::SECRET_KEY,
        "127.0.0.1",
        "remote_keep = 2\nremote_max_age_days = 30\ntest_restore_hours = 24",
    );
    // Listings come one key per page: the client must follow continuation tokens.
    s.s3.state.lock().unwrap().max_keys = 1;
    let now = now_ms();
    let ancient = "site-a/chitin-backup-0000000001000.age".to_string();
    let hour_old = format!("site-a/chitin-backup-{:013}.age", now - 3_600_000);
    let two_hours_old = format!("site-a/chitin-backup-{:013}.age", now - 7_200_000);
    for k in [
        ancient.as_str(),
        hour_old.as_str(),
        two_hours_old.as_str(),
        "site-a/notes.txt",
        "other/chitin-backup-0000000002000.age",
    ] {
        s.s3.put(BUCKET, k, b"not ours to judge");
    }

    s.gw.spawn();
    wait_for_log(&s.gw, "off-site backup test-restore passed");
    s.gw.signal("-TERM");
    s.gw.wait_exit();

    let keys = s.s3.keys(BUCKET);
    let uploaded: Vec<&String> = keys
        .iter()
        .filter(|k| {
            k.starts_with("site-a/chitin-backup-") && **k != hour_old && **k != two_hours_old
        })
        .collect();
    assert_eq!(uploaded.len(), 1, "{keys:?}");
    let uploaded = uploaded[0].clone();
    // Retention: the 30-day-old one by age, the two-hour-old one by count (keep 2); the
    // unrelated object and the other prefix are untouched.
    let mut expected = vec![
        "other/chitin-backup-0000000002000.age".to_string(),
        hour_old.clone(),
        uploaded.clone(),
        "site-a/notes.txt".to_string(),
    ];
    expected.sort();
    assert_eq!(keys, expected);
    // What left the host is an age file, never the plaintext tar.
    let body = s.s3.object(BUCKET, &uploaded).unwrap();
    assert!(body.starts_with(b"age-encryption.org/v1\n"));
    assert!(!body.windows(13).any(|w| w == b"MANIFEST.json"));
    // Nothing staged stays in the state dir ([backup] dir is not set).
    let staged = s.gw.home.join(".offsite-staging");
    assert_eq!(std::fs::read_dir(&staged).unwrap().count(), 0);
    // Every request the fake accepted carried a valid signature; none was refused.
    for m in ["PUT", "GET", "DELETE"] {
        assert!(
            s.s3.statuses(m).iter().all(|st| *st == 200 || *st == 204),
            "{m}: {:?}",
            s.s3.statuses(m)
        );
    }
    assert_eq!(s.s3.statuses("DELETE").len(), 2);

    let list: serde_json::Value =
        serde_json::from_str(&ok(&s.gw.chitin(&["backup", "list", "--json"]))).unwrap();
    let names: Vec<&str> = list["remote"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let uploaded_name = uploaded.strip_prefix("site-a/").unwrap();
    assert_eq!(
        names,
        vec![hour_old.strip_prefix("site-a/").unwrap(), uploaded_name]
    );
    assert_eq!(list["local"], serde_json::json!([]));
    assert_eq!(list["last_upload_key"], uploaded.as_str());
    assert!(list["test_restore_last_ok_ms"].as_i64().unwrap() >= now);
    assert!(list["test_restore_last_error"].is_null());
    let text = ok(&s.gw.chitin(&["backup", "list"]));
    assert!(text.contains(&format!("remote  {uploaded_name}")), "{text}");
    assert!(text.contains("last successful test-restore: 20"), "{text}");

    // fetch downloads exactly the object; the download verifies.
    let out = s.gw.root.join("fetched.age");
    ok(&s.gw.chitin(&[
        "backup",
        "fetch",
        uploaded_name,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), body);
    let v = ok(&s.gw.chitin(&[
        "backup",
        "verify",
        out.to_str().unwrap(),
        "--identity",
        s.identity.to_str().unwrap(),
    ]));
    assert!(v.starts_with("ok: "), "{v}");
    // An existing file is never overwritten; an unknown name is refused.
    let again = s.gw.chitin(&[
        "backup",
        "fetch",
        uploaded_name,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!again.status.success());
    let missing = s.gw.chitin(&[
        "backup",
        "fetch",
        "chitin-backup-0000000000001.age",
        "--out",
        s.gw.root.join("x.age").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&missing.stdout)
            .contains("refused: no remote backup named \"chitin-backup-0000000000001.age\"")
    );
}

#[test]
fn a_wrong_secret_key_is_refused_by_the_store_signature_check() {
    let s = setup("not-the-secret-key", "127.0.0.1", "");
    let out = s.gw.chitin(&["backup", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HTTP 403 Forbidden (SignatureDoesNotMatch)"),
        "{err}"
    );
    assert_eq!(s.s3.statuses("GET"), vec![403]);
    assert!(!err.contains("not-the-secret-key"), "{err}");
}

#[test]
fn credentials_without_the_endpoint_in_their_audience_are_never_released() {
    let s = setup(fake_s3::SECRET_KEY, "s3.example.com", "");
    let out = s.gw.chitin(&["backup", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "policy denied: secret.use by Chitin::Gateway::\"backup\" on secret s3-id for host 127.0.0.1"
        ),
        "{err}"
    );
    // Nothing was sent to the store.
    assert!(s.s3.state.lock().unwrap().log.is_empty());
}

#[test]
fn a_newest_remote_backup_that_does_not_decrypt_fails_its_test_restore_and_is_recorded() {
    let mut s = setup(fake_s3::SECRET_KEY, "127.0.0.1", "test_restore_hours = 24");
    // Someone with write access to the bucket planted a "newer" backup.
    let forged = format!("site-a/chitin-backup-{:013}.age", now_ms() + 3_600_000);
    s.s3.put(
        BUCKET,
        &forged,
        b"age-encryption.org/v1\n-> X25519 forged\n",
    );
    s.gw.spawn();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(s.gw.root.join("gateway.log")).unwrap_or_default();
        if log.contains("off-site backup test-restore failed") {
            assert!(log.contains("off-site backup uploaded"), "{log}");
            assert!(!log.contains("test-restore passed"), "{log}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no test-restore failure in:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.gw.signal("-TERM");
    s.gw.wait_exit();
    let list: serde_json::Value =
        serde_json::from_str(&ok(&s.gw.chitin(&["backup", "list", "--json"]))).unwrap();
    assert!(list["test_restore_last_ok_ms"].is_null(), "{list}");
    let e = list["test_restore_last_error"].as_str().unwrap();
    assert!(e.contains("cannot be decrypted with this identity"), "{e}");
    let text = ok(&s.gw.chitin(&["backup", "list"]));
    assert!(
        text.contains("last successful test-restore: never"),
        "{text}"
    );
    assert!(text.contains("last test-restore error: "), "{text}");
}

/// The requests the fake received whose method is `method` and whose target contains `needle`.
fn requests(s3: &FakeS3, method: &str, needle: &str) -> Vec<(String, u16)> {
    s3.state
        .lock()
        .unwrap()
        .log
        .iter()
        .filter(|(m, t, _)| m == method && t.contains(needle))
        .map(|(_, t, st)| (t.clone(), *st))
        .collect()
}

/// The gateway's log once it contains `needle`.
fn log_with(gw: &Gw, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(gw.root.join("gateway.log")).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_backup_above_the_multipart_threshold_is_uploaded_in_parts_and_test_restores() {
    let mut s = setup(
        fake_s3::SECRET_KEY,
        "127.0.0.1",
        "test_restore_hours = 24\nmultipart_threshold_bytes = 4096\nmultipart_part_bytes = 4096",
    );
    // S3 refuses parts under 5 MiB; this store accepts the test's 4 KiB parts (the last may
    // be smaller), and still checks each part's ETag and order on completion.
    s.s3.state.lock().unwrap().min_part_size = 4096;
    s.gw.spawn();
    wait_for_log(&s.gw, "off-site backup test-restore passed");
    s.gw.signal("-TERM");
    s.gw.wait_exit();

    let keys: Vec<String> =
        s.s3.keys(BUCKET)
            .into_iter()
            .filter(|k| k.starts_with("site-a/chitin-backup-"))
            .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let body = s.s3.object(BUCKET, &keys[0]).unwrap();
    assert!(body.len() > 2 * 4096, "a backup of {} bytes", body.len());
    assert!(body.starts_with(b"age-encryption.org/v1\n"));
    let path = format!("/{BUCKET}/{}", keys[0]);
    // One CreateMultipartUpload, one UploadPart per 4 KiB, one CompleteMultipartUpload; never a
    // single PUT of the whole object.
    let created = requests(&s.s3, "POST", "?uploads");
    assert_eq!(created, vec![(format!("{path}?uploads="), 200)]);
    let parts = requests(&s.s3, "PUT", "partNumber=");
    assert_eq!(parts.len(), body.len().div_ceil(4096), "{parts:?}");
    for (i, (t, st)) in parts.iter().enumerate() {
        assert!(
            t.starts_with(&format!("{path}?partNumber={}&uploadId=upload-1-", i + 1)),
            "{t}"
        );
        assert_eq!(*st, 200);
    }
    assert!(
        requests(&s.s3, "PUT", "")
            .iter()
            .all(|(t, _)| t.contains("partNumber="))
    );
    let completed = requests(&s.s3, "POST", "?uploadId=");
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].1, 200);
    assert!(s.s3.state.lock().unwrap().uploads.is_empty());
    // What the test-restore checked is the assembled object; `fetch` gives it back whole.
    let out = s.gw.root.join("fetched.age");
    let name = keys[0].strip_prefix("site-a/").unwrap();
    ok(&s
        .gw
        .chitin(&["backup", "fetch", name, "--out", out.to_str().unwrap()]));
    assert_eq!(std::fs::read(&out).unwrap(), body);
    let v = ok(&s.gw.chitin(&[
        "backup",
        "verify",
        out.to_str().unwrap(),
        "--identity",
        s.identity.to_str().unwrap(),
    ]));
    assert!(v.starts_with("ok: "), "{v}");
}

#[test]
fn a_multipart_upload_that_fails_part_way_is_aborted_and_the_failure_is_recorded() {
    let mut s = setup(
        fake_s3::SECRET_KEY,
        "127.0.0.1",
        "test_restore_hours = 0\nmultipart_threshold_bytes = 4096\nmultipart_part_bytes = 4096",
    );
    {
        let mut st = s.s3.state.lock().unwrap();
        st.min_part_size = 4096;
        st.fail_part = Some(2);
    }
    s.gw.spawn();
    let log = log_with(&s.gw, "off-site backup upload failed");
    assert!(
        log.contains("S3 PUT site-a/chitin-backup-")
            && log.contains("HTTP 500 Internal Server Error (InternalError)"),
        "{log}"
    );
    assert!(log.contains("(the multipart upload was aborted)"), "{log}");
    s.gw.signal("-TERM");
    s.gw.wait_exit();
    // Part 1 was stored, part 2 refused, then the upload was aborted: no object, no parts left.
    let parts = requests(&s.s3, "PUT", "partNumber=");
    assert_eq!(
        parts.iter().map(|(_, st)| *st).collect::<Vec<_>>(),
        vec![200, 500],
        "{parts:?}"
    );
    let aborted = requests(&s.s3, "DELETE", "?uploadId=upload-1-");
    assert_eq!(aborted.len(), 1, "{aborted:?}");
    assert_eq!(aborted[0].1, 204);
    assert!(requests(&s.s3, "POST", "?uploadId=").is_empty());
    assert!(s.s3.state.lock().unwrap().uploads.is_empty());
    assert!(
        !s.s3
            .keys(BUCKET)
            .iter()
            .any(|k| k.starts_with("site-a/chitin-backup-")),
        "{:?}",
        s.s3.keys(BUCKET)
    );
    // The failure is recorded where `chitin backup list` and the security audit see it.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&s.gw.chitin(&["backup", "list", "--json"]))).unwrap();
    assert!(list["last_upload_key"].is_null(), "{list}");
    let audit = s.gw.chitin(&["security", "audit", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&audit.stdout).unwrap();
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "lifecycle.offsite_upload_failed")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert_eq!(f["severity"], "high");
    assert!(
        f["observed"]
            .as_str()
            .unwrap()
            .ends_with("(the multipart upload was aborted); no upload ever succeeded"),
        "{f}"
    );
}
