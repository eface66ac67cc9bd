//! `chitin security audit` and `chitin doctor` through the real binary: each seeded
//! misconfiguration produces its finding id with its severity, the exit code follows the worst
//! finding (0 nothing above low, 1 medium/high, 2 critical), the JSON has its documented
//! shape, `doctor --fix` repairs the permission findings without widening anything, and
//! `--deep` verifies the chain and test-decrypts the newest backup.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const PASS: &str = "security-audit-test-passphrase";

fn run(bin: &Path, home: &Path, args: &[&str], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(bin)
        .args(args)
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("USER", "tester")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().unwrap()
}

fn chitin(home: &Path, args: &[&str]) -> Output {
    run(Path::new(env!("CARGO_BIN_EXE_chitin")), home, args, "")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// A state dir made by `chitin init`, with a cheap passphrase and its workspace created.
struct Home {
    _t: tempfile::TempDir,
    root: PathBuf,
    home: PathBuf,
}

impl Home {
    fn new() -> Self {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        let home = root.join("home");
        let o = chitin(&home, &["init"]);
        assert!(o.status.success(), "{}", text(&o));
        let h = Self { _t: t, root, home };
        h.set("secrets", "backend", "\"passphrase\"");
        h.set("secrets", "scrypt_work_factor", "16");
        // The free space of the test machine's disk is not the test's to control: off here,
        // judged against a known threshold by its own case.
        h.set("audit", "min_free_disk_mb", "0");
        std::fs::create_dir_all(h.root.join("chitin-workspace")).unwrap();
        chmod(&h.root.join("chitin-workspace"), 0o700);
        h
    }

    fn config(&self) -> PathBuf {
        self.home.join("chitin.toml")
    }

    /// Sets `key` of `[section]` (the first `key = ` line after the section header).
    fn set(&self, section: &str, key: &str, value: &str) {
        let text = std::fs::read_to_string(self.config()).unwrap();
        let mut in_section = false;
        let mut done = false;
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with('[') {
                    in_section = l.trim() == format!("[{section}]");
                }
                if in_section && !done && l.starts_with(&format!("{key} = ")) {
                    done = true;
                    format!("{key} = {value}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        assert!(done, "no `{key}` in [{section}]");
        std::fs::write(self.config(), lines.join("\n") + "\n").unwrap();
    }

    fn append(&self, extra: &str) {
        let mut text = std::fs::read_to_string(self.config()).unwrap();
        text.push('\n');
        text.push_str(extra);
        std::fs::write(self.config(), text).unwrap();
    }

    fn policy(&self, name: &str, text: &str) {
        let p = self.home.join("policies").join(name);
        std::fs::write(&p, text).unwrap();
        chmod(&p, 0o600);
    }

    fn audit(&self, args: &[&str]) -> (Option<i32>, Value) {
        let mut a = vec!["security", "audit", "--json"];
        a.extend_from_slice(args);
        let o = chitin(&self.home, &a);
        let v: Value =
            serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("not JSON: {}", text(&o)));
        (o.status.code(), v)
    }
}

fn findings(v: &Value) -> Vec<(String, String)> {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["id"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn has(v: &Value, id: &str, severity: &str) -> bool {
    findings(v).iter().any(|(i, s)| i == id && s == severity)
}

fn assert_finding(v: &Value, id: &str, severity: &str) {
    assert!(
        has(v, id, severity),
        "expected {severity}:{id} in {:?}",
        findings(v)
    );
}

fn worst_code(v: &Value) -> i32 {
    let f = findings(v);
    if f.iter().any(|(_, s)| s == "critical") {
        2
    } else if f.iter().any(|(_, s)| s == "high" || s == "medium") {
        1
    } else {
        0
    }
}

#[test]
fn a_fresh_install_has_nothing_above_low_and_the_json_has_its_documented_shape() {
    let h = Home::new();
    let (code, v) = h.audit(&[]);
    assert_eq!(code, Some(0), "{v:#}");
    let allowed = ["critical", "high", "medium", "low", "info"];
    for f in v["findings"].as_array().unwrap() {
        let obj = f.as_object().unwrap();
        for k in ["id", "severity", "category", "title", "observed", "fix"] {
            let s = obj[k].as_str().unwrap_or_else(|| panic!("{k} in {f}"));
            assert!(!s.is_empty(), "{k} empty in {f}");
        }
        assert!(allowed.contains(&f["severity"].as_str().unwrap()), "{f}");
        assert!(f["repairable"].is_boolean(), "{f}");
        assert!(
            ["low", "info"].contains(&f["severity"].as_str().unwrap()),
            "a fresh install: {f}"
        );
    }
    for s in allowed {
        assert!(v["summary"][s].is_u64(), "summary.{s}: {v}");
    }
    assert_eq!(v["exit_code"], 0);
    let categories: Vec<&str> = v["checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["category"].as_str().unwrap())
        .collect();
    for c in [
        "exposure",
        "files",
        "secrets",
        "sandbox",
        "policy",
        "channels",
        "approvals",
        "lifecycle",
        "providers",
        "updates",
    ] {
        assert!(categories.contains(&c), "{c} not checked: {categories:?}");
    }
}

/// One seeded misconfiguration and the finding it must produce.
struct Case {
    name: &'static str,
    seed: fn(&Home),
    id: &'static str,
    severity: &'static str,
}

#[test]
fn each_seeded_misconfiguration_produces_its_finding_id_and_exit_code() {
    let cases = [
        Case {
            name: "state dir 0755",
            seed: |h| chmod(&h.home, 0o755),
            id: "files.state_dir_readable",
            severity: "high",
        },
        Case {
            name: "state dir 0777",
            seed: |h| chmod(&h.home, 0o777),
            id: "files.state_dir_writable",
            severity: "critical",
        },
        Case {
            name: "entities.json 0644",
            seed: |h| chmod(&h.home.join("entities.json"), 0o644),
            id: "files.state_readable",
            severity: "medium",
        },
        Case {
            name: "a policy file writable by the group",
            seed: |h| chmod(&h.home.join("policies/tools.cedar"), 0o664),
            id: "files.state_writable",
            severity: "critical",
        },
        Case {
            name: "a symlink in the state dir",
            seed: |h| std::os::unix::fs::symlink("/etc/hostname", h.home.join("link")).unwrap(),
            id: "files.state_symlink",
            severity: "medium",
        },
        Case {
            name: "workspace inside the state dir",
            seed: |h| {
                let ws = h.home.join("ws");
                h.set(
                    "gateway",
                    "workspace",
                    &format!("{:?}", ws.display().to_string()),
                );
            },
            id: "files.workspace_overlap",
            severity: "critical",
        },
        Case {
            name: "public bind without TLS",
            seed: |h| h.set("gateway", "bind", "\"0.0.0.0:18789\""),
            id: "exposure.public_bind_without_tls",
            severity: "high",
        },
        Case {
            name: "a TLS key readable by others",
            seed: |h| {
                for f in ["cert.pem", "key.pem"] {
                    std::fs::write(h.root.join(f), "x").unwrap();
                    chmod(&h.root.join(f), 0o644);
                }
                let p = |f: &str| format!("{:?}", h.root.join(f).display().to_string());
                h.set("gateway", "tls_cert", &p("cert.pem"));
                h.set("gateway", "tls_key", &p("key.pem"));
            },
            id: "exposure.tls_key_readable",
            severity: "high",
        },
        Case {
            name: "a remote trusted proxy on a network bind",
            seed: |h| {
                for f in ["cert.pem", "key.pem"] {
                    std::fs::write(h.root.join(f), "x").unwrap();
                    chmod(&h.root.join(f), 0o600);
                }
                let p = |f: &str| format!("{:?}", h.root.join(f).display().to_string());
                h.set("gateway", "tls_cert", &p("cert.pem"));
                h.set("gateway", "tls_key", &p("key.pem"));
                h.set("gateway", "bind", "\"0.0.0.0:18789\"");
                h.set("gateway", "trusted_proxies", "[\"10.0.0.5\"]");
            },
            id: "exposure.remote_trusted_proxy",
            severity: "medium",
        },
        Case {
            name: "listening on every interface",
            seed: |h| {
                for f in ["cert.pem", "key.pem"] {
                    std::fs::write(h.root.join(f), "x").unwrap();
                    chmod(&h.root.join(f), 0o600);
                }
                let p = |f: &str| format!("{:?}", h.root.join(f).display().to_string());
                h.set("gateway", "tls_cert", &p("cert.pem"));
                h.set("gateway", "tls_key", &p("key.pem"));
                h.set("gateway", "bind", "\"0.0.0.0:18789\"");
            },
            id: "exposure.all_interfaces",
            severity: "low",
        },
        Case {
            name: "audit records not covered by a checkpoint for days",
            seed: |h| {
                append_records(h, 2);
                let c = rusqlite::Connection::open(h.home.join("audit.db")).unwrap();
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
                c.execute("DELETE FROM checkpoints", []).unwrap();
                c.execute("UPDATE records SET ts_ms = ts_ms - 3 * 86400000", [])
                    .unwrap();
            },
            id: "audit.checkpoint_stale",
            severity: "medium",
        },
        Case {
            name: "a plain-http browser origin",
            seed: |h| {
                h.set(
                    "gateway",
                    "allowed_origins",
                    "[\"http://chat.example.com\"]",
                )
            },
            id: "exposure.plain_http_origin",
            severity: "medium",
        },
        Case {
            name: "the store's identity converted to a plaintext file",
            seed: |h| {
                // What an operator does to drop the passphrase: export the identity, keep it
                // as the plaintext identity file, and switch the backend to `file`.
                let o = chitin(&h.home, &["secrets", "export-identity"]);
                assert!(o.status.success(), "{}", text(&o));
                assert!(o.stdout.starts_with(b"# created: "), "{}", text(&o));
                let plain = h.home.join("secrets.identity");
                std::fs::write(&plain, &o.stdout).unwrap();
                chmod(&plain, 0o600);
                std::fs::remove_file(h.home.join("secrets.identity.age")).unwrap();
                h.set("secrets", "backend", "\"file\"");
                h.set("secrets", "allow_plaintext_identity", "true");
                // The store still opens with the plaintext identity.
                let o = chitin(&h.home, &["secrets", "list"]);
                assert!(o.status.success(), "{}", text(&o));
            },
            id: "secrets.identity_plaintext",
            severity: "medium",
        },
        Case {
            name: "a permit-everything policy",
            seed: |h| {
                h.policy(
                    "wide.cedar",
                    "@id(\"wide\")\n@reason(\"testing\")\npermit (principal, action, resource);\n",
                );
            },
            id: "policy.permit_all",
            severity: "critical",
        },
        Case {
            name: "a permit for any principal",
            seed: |h| {
                h.policy(
                    "any.cedar",
                    "@id(\"any\")\n@reason(\"testing\")\npermit (principal, action == Chitin::Action::\"read_file\", resource);\n",
                );
            },
            id: "policy.unconstrained_permit",
            severity: "high",
        },
        Case {
            name: "a policy without @reason",
            seed: |h| {
                h.policy(
                    "noreason.cedar",
                    "@id(\"noreason\")\nforbid (principal, action == Chitin::Action::\"web_fetch\", resource) when { context.method == \"DELETE\" };\n",
                );
            },
            id: "policy.missing_reason",
            severity: "low",
        },
        Case {
            name: "an invalid policy file",
            seed: |h| h.policy("broken.cedar", "permit (principal, action, resource);\n"),
            id: "policy.invalid",
            severity: "critical",
        },
        Case {
            name: "unpaired senders admitted",
            seed: |h| {
                h.policy(
                    "admission.cedar",
                    "@id(\"admission.everyone\")\n@reason(\"testing\")\npermit (principal is Chitin::Identity, action == Chitin::Action::\"message.receive\", resource);\n",
                );
            },
            id: "channels.dm_open_to_unpaired",
            severity: "high",
        },
        Case {
            name: "groups without mention gating",
            seed: |h| {
                let p = h.home.join("policies/admission.cedar");
                let t = std::fs::read_to_string(&p).unwrap();
                let cut = t.find("@id(\"admission.groups-need-mention\")").unwrap();
                h.policy("admission.cedar", &t[..cut]);
            },
            id: "channels.group_without_mention",
            severity: "medium",
        },
        Case {
            name: "less disk space than [audit] min_free_disk_mb",
            seed: |h| h.set("audit", "min_free_disk_mb", "1000000000000"),
            id: "audit.disk_low",
            severity: "high",
        },
        Case {
            name: "cgroups off",
            seed: |h| h.set("sandbox", "cgroup", "\"off\""),
            id: "sandbox.cgroup_off",
            severity: "medium",
        },
        Case {
            name: "retention never scheduled",
            seed: |h| h.set("retention", "interval_minutes", "0"),
            id: "lifecycle.retention_not_scheduled",
            severity: "low",
        },
        Case {
            name: "no backup recipient",
            seed: |_| {},
            id: "lifecycle.backup_not_configured",
            severity: "low",
        },
        Case {
            name: "backups configured but none made",
            seed: |h| {
                let o = chitin(
                    &h.home,
                    &[
                        "backup",
                        "keygen",
                        "--out",
                        h.root.join("bk.txt").to_str().unwrap(),
                    ],
                );
                let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
                h.set("backup", "recipient", &format!("{recipient:?}"));
                h.set(
                    "backup",
                    "dir",
                    &format!("{:?}", h.root.join("backups").display().to_string()),
                );
            },
            id: "lifecycle.no_recent_backup",
            severity: "medium",
        },
        Case {
            name: "the backup identity on the host",
            seed: |h| {
                let o = chitin(
                    &h.home,
                    &[
                        "backup",
                        "keygen",
                        "--out",
                        h.root.join("bk.txt").to_str().unwrap(),
                    ],
                );
                let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
                h.set("backup", "recipient", &format!("{recipient:?}"));
                h.set(
                    "backup",
                    "identity",
                    &format!("{:?}", h.root.join("bk.txt").display().to_string()),
                );
            },
            id: "lifecycle.backup_identity_on_host",
            severity: "low",
        },
        Case {
            name: "a provider key from the environment and no budget",
            seed: |h| {
                h.append("[[providers]]\nname = \"remote\"\nkind = \"openai\"\napi_key = \"env:REMOTE_KEY\"\n");
            },
            id: "providers.key_without_audience",
            severity: "medium",
        },
        Case {
            name: "providers without a budget",
            seed: |h| {
                h.append("[[providers]]\nname = \"remote\"\nkind = \"openai\"\napi_key = \"env:REMOTE_KEY\"\n");
            },
            id: "providers.no_budget",
            severity: "medium",
        },
        Case {
            name: "an env: credential",
            seed: |h| {
                h.append("[[providers]]\nname = \"remote\"\nkind = \"openai\"\napi_key = \"env:REMOTE_KEY\"\n");
            },
            id: "secrets.env_reference",
            severity: "low",
        },
        Case {
            name: "a referenced secret that is not stored",
            seed: |h| {
                h.append("[[providers]]\nname = \"remote\"\nkind = \"openai\"\napi_key = \"secret:remote_key\"\n");
            },
            id: "secrets.reference_missing",
            severity: "high",
        },
        Case {
            name: "a secret without an audience",
            seed: |h| {
                let o = run(
                    Path::new(env!("CARGO_BIN_EXE_chitin")),
                    &h.home,
                    &["secrets", "set", "loose"],
                    "value-one-long",
                );
                assert!(o.status.success(), "{}", text(&o));
            },
            id: "secrets.no_audience",
            severity: "low",
        },
        Case {
            name: "an installed skill whose signer is no longer trusted, and a key signer",
            seed: |h| {
                let d = h.home.join("skills");
                std::fs::create_dir_all(&d).unwrap();
                chmod(&d, 0o700);
                std::fs::write(d.join("lock.json"), format!(
                    "{{\"skills\": {{\"notes\": {{\"name\": \"notes\", \"version\": \"1.0.0\", \"digest\": \"sha256:{}\", \"signer\": \"SHA256:gone\", \"issuer\": \"\", \"transparency\": false, \"installed_at_ms\": 1}}}}}}",
                    "a".repeat(64)
                )).unwrap();
                std::fs::write(d.join("trust.json"), "{\"signers\": [{\"kind\": \"key\", \"name\": \"alice\", \"fingerprint\": \"SHA256:alice\", \"public_key\": \"x\"}]}").unwrap();
                chmod(&d.join("lock.json"), 0o600);
                chmod(&d.join("trust.json"), 0o600);
            },
            id: "skills.untrusted_signer",
            severity: "high",
        },
        Case {
            name: "an installed skill never re-verified",
            seed: |h| {
                let d = h.home.join("skills");
                std::fs::create_dir_all(&d).unwrap();
                chmod(&d, 0o700);
                std::fs::write(d.join("lock.json"), format!(
                    "{{\"skills\": {{\"notes\": {{\"name\": \"notes\", \"version\": \"1.0.0\", \"digest\": \"sha256:{}\", \"signer\": \"SHA256:gone\", \"issuer\": \"\", \"transparency\": false, \"installed_at_ms\": 1}}}}}}",
                    "a".repeat(64)
                )).unwrap();
                chmod(&d.join("lock.json"), 0o600);
            },
            id: "skills.not_reverified",
            severity: "low",
        },
        Case {
            name: "a key signer in the trust list",
            seed: |h| {
                let d = h.home.join("skills");
                std::fs::create_dir_all(&d).unwrap();
                chmod(&d, 0o700);
                std::fs::write(d.join("trust.json"), "{\"signers\": [{\"kind\": \"key\", \"name\": \"alice\", \"fingerprint\": \"SHA256:alice\", \"public_key\": \"x\"}]}").unwrap();
                chmod(&d.join("trust.json"), 0o600);
            },
            id: "skills.key_signer",
            severity: "low",
        },
        Case {
            name: "the browser tool pointed at a Chromium that is not installed",
            seed: |h| h.append("[tools.browser]\nchromium = \"/nonexistent/chromium\"\n"),
            id: "tools.browser_unavailable",
            severity: "low",
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let h = Home::new();
        (c.seed)(&h);
        let (code, v) = h.audit(&[]);
        if !has(&v, c.id, c.severity) {
            failures.push(format!(
                "{}: expected {}:{} in {:?}",
                c.name,
                c.severity,
                c.id,
                findings(&v)
            ));
            continue;
        }
        if code != Some(worst_code(&v)) {
            failures.push(format!("{}: exit {code:?} for {:?}", c.name, findings(&v)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn state_db(h: &Home) -> rusqlite::Connection {
    rusqlite::Connection::open(h.home.join("state.db")).unwrap()
}

#[test]
fn approvals_with_a_long_expiry_or_granted_by_their_requester_are_reported() {
    let h = Home::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = state_db(&h);
    let insert = "INSERT INTO approvals (id, code, requester, session, tool, summary, args_json, request_digest, status, created_ms, expires_ms, resolved_by, resolved_ms) VALUES (?1, ?2, 'owner', 's', 'exec', 'x', '{}', x'00', ?3, ?4, ?5, ?6, ?7)";
    db.execute(
        insert,
        rusqlite::params![
            "a1",
            "111111",
            "pending",
            now,
            now + 3 * 86_400_000,
            None::<String>,
            None::<i64>
        ],
    )
    .unwrap();
    db.execute(
        insert,
        rusqlite::params![
            "a2",
            "222222",
            "used",
            now - 1000,
            now + 600_000,
            Some("owner"),
            Some(now - 500)
        ],
    )
    .unwrap();
    drop(db);
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "approvals.long_expiry", "medium");
    assert_finding(&v, "approvals.self_granted", "low");
    assert_eq!(code, Some(1));
}

#[test]
fn dead_letters_in_the_outbox_are_reported_per_channel() {
    let h = Home::new();
    let db = state_db(&h);
    db.execute(
        "INSERT INTO channel_outbox (channel, chat_id, chat_kind, text, kind, status, next_attempt_ms, created_ms, updated_ms) VALUES ('tg', '1', 'dm', 'x', 'reply', 'dead', 0, 0, 0)",
        [],
    )
    .unwrap();
    drop(db);
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "channels.dead_letters", "medium");
    let f = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == "channels.dead_letters")
        .unwrap();
    assert!(
        f["observed"].as_str().unwrap().contains("`tg`: 1 dead"),
        "{f}"
    );
    assert_eq!(code, Some(1));
}

#[test]
fn an_old_binary_is_reported_by_its_age() {
    let h = Home::new();
    let bin = h.root.join("chitin-old");
    std::fs::copy(env!("CARGO_BIN_EXE_chitin"), &bin).unwrap();
    chmod(&bin, 0o755);
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(200 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&bin)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let o = run(&bin, &h.home, &["security", "audit", "--json"], "");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_finding(&v, "updates.binary_old", "medium");
    assert_eq!(o.status.code(), Some(1));
    // The current binary is not old.
    let (_, v) = h.audit(&[]);
    assert!(!findings(&v).iter().any(|(i, _)| i == "updates.binary_old"));
}

fn append_records(h: &Home, n: usize) {
    for i in 0..n {
        let o = chitin(
            &h.home,
            &[
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
            ],
        );
        assert!(o.status.success(), "{}", text(&o));
    }
}

#[test]
fn a_tampered_audit_log_is_found_by_deep_and_by_doctor_and_a_verify_is_remembered() {
    let h = Home::new();
    append_records(&h, 3);
    assert!(chitin(&h.home, &["audit", "checkpoint"]).status.success());
    // Not verified yet: the plain audit says so (low) without reading the whole chain.
    let (_, v) = h.audit(&[]);
    assert_finding(&v, "audit.never_verified", "low");
    // `chitin audit verify` is remembered.
    assert!(chitin(&h.home, &["audit", "verify"]).status.success());
    let (code, v) = h.audit(&[]);
    assert!(
        !findings(&v).iter().any(|(i, _)| i.starts_with("audit.")),
        "{v:#}"
    );
    assert_eq!(code, Some(0), "{v:#}");

    let c = rusqlite::Connection::open(h.home.join("audit.db")).unwrap();
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
    let (code, v) = h.audit(&["--deep"]);
    assert_finding(&v, "audit.tampered", "critical");
    assert_eq!(code, Some(2));
    let o = chitin(&h.home, &["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_finding(&v, "audit.tampered", "critical");
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn with_the_store_on_postgres_the_local_audit_database_raises_no_false_alarm() {
    let h = Home::new();
    append_records(&h, 1);
    // The same local state as a deleted audit.db ...
    std::fs::remove_file(h.home.join("audit.db")).unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(h.home.join(format!("audit.db{ext}")));
    }
    // ... but the log lives in PostgreSQL now: not a finding, and said so.
    h.set("store", "backend", "\"postgres\"");
    h.set(
        "store",
        "url",
        "\"postgres://chitin@db.internal:5432/chitin\"",
    );
    let (_, v) = h.audit(&["--deep"]);
    for id in ["audit.missing", "audit.tampered", "audit.unverifiable"] {
        assert!(!has(&v, id, "critical"), "{id}: {v}");
    }
    assert!(v.to_string().contains("the log is in PostgreSQL"), "{v}");
}

#[test]
fn a_deleted_audit_database_is_critical() {
    let h = Home::new();
    append_records(&h, 1);
    std::fs::remove_file(h.home.join("audit.db")).unwrap();
    for ext in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(h.home.join(format!("audit.db{ext}")));
    }
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "audit.missing", "critical");
    assert_eq!(code, Some(2));
}

#[test]
fn doctor_fix_repairs_the_permission_findings_and_never_widens_anything() {
    let h = Home::new();
    chmod(&h.home, 0o755);
    chmod(&h.home.join("entities.json"), 0o644);
    chmod(&h.home.join("policies"), 0o775);
    chmod(&h.home.join("policies/tools.cedar"), 0o666);
    // Narrower than the rule: must stay as it is.
    chmod(&h.home.join("policies/agent.cedar"), 0o400);
    std::fs::remove_dir(h.root.join("chitin-workspace")).unwrap();

    let o = chitin(&h.home, &["doctor"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("can be repaired with `chitin doctor --fix`"),
        "{}",
        text(&o)
    );

    let o = chitin(&h.home, &["doctor", "--fix"]);
    let out = text(&o);
    assert!(out.contains("fixed: "), "{out}");
    assert_eq!(mode(&h.home), 0o700, "{out}");
    assert_eq!(mode(&h.home.join("entities.json")), 0o600);
    assert_eq!(mode(&h.home.join("policies")), 0o700);
    assert_eq!(mode(&h.home.join("policies/tools.cedar")), 0o600);
    assert_eq!(mode(&h.home.join("policies/agent.cedar")), 0o400);
    assert_eq!(mode(&h.root.join("chitin-workspace")), 0o700);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let (_, v) = h.audit(&[]);
    assert!(
        !findings(&v).iter().any(|(i, _)| i.starts_with("files.")),
        "{:?}",
        findings(&v)
    );
}

#[test]
fn doctor_fix_narrows_a_policy_directory_outside_the_state_dir() {
    let h = Home::new();
    let dir = h.root.join("site-policies");
    std::fs::create_dir(&dir).unwrap();
    for e in std::fs::read_dir(h.home.join("policies")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    chmod(&dir, 0o777);
    h.set("policy", "dir", &format!("{:?}", dir.display().to_string()));
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "files.policy_path_writable", "critical");
    assert_eq!(code, Some(2));
    let o = chitin(&h.home, &["doctor", "--fix"]);
    assert!(text(&o).contains("fixed: "), "{}", text(&o));
    // Only the bits that let others write are cleared.
    assert_eq!(mode(&dir), 0o755);
    let (_, v) = h.audit(&[]);
    assert!(!has(&v, "files.policy_path_writable", "critical"), "{v:#}");
}

/// A state dir with a backup recipient, a backup dir, a backup made under the scheduled name
/// and the identity kept outside (passed with --identity).
fn with_backup(h: &Home) -> (PathBuf, PathBuf) {
    let id = h.root.join("offsite-identity.txt");
    let o = chitin(
        &h.home,
        &["backup", "keygen", "--out", id.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
    h.set("backup", "recipient", &format!("{recipient:?}"));
    let dir = h.root.join("backups");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o700);
    h.set("backup", "dir", &format!("{:?}", dir.display().to_string()));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let file = dir.join(format!("chitin-backup-{now:013}.age"));
    let o = chitin(
        &h.home,
        &["backup", "create", "--out", file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    (id, file)
}

#[test]
fn deep_test_decrypts_the_newest_backup_and_remembers_it() {
    let h = Home::new();
    let (id, file) = with_backup(&h);
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "lifecycle.backup_never_tested", "medium");
    assert!(
        !findings(&v)
            .iter()
            .any(|(i, _)| i == "lifecycle.no_recent_backup"),
        "{v:#}"
    );
    assert_eq!(code, Some(1));

    let (code, v) = h.audit(&["--deep", "--identity", id.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{v:#}");
    let checked = v["checked"].to_string();
    assert!(checked.contains("test-decrypted"), "{checked}");
    assert!(checked.contains("chain verified"), "{checked}");
    // Remembered: the plain audit no longer asks for a test restore or a verify.
    let (code, v) = h.audit(&[]);
    assert!(
        !findings(&v)
            .iter()
            .any(|(i, _)| i == "lifecycle.backup_never_tested" || i == "audit.never_verified"),
        "{v:#}"
    );
    assert_eq!(code, Some(0), "{v:#}");

    // A damaged newest backup is critical.
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let (code, v) = h.audit(&["--deep", "--identity", id.to_str().unwrap()]);
    assert_finding(&v, "lifecycle.backup_unreadable", "critical");
    assert_eq!(code, Some(2));
}

#[test]
fn with_nothing_to_report_doctor_says_what_it_checked() {
    let h = Home::new();
    let (id, file) = with_backup(&h);
    let o = chitin(
        &h.home,
        &[
            "backup",
            "verify",
            file.to_str().unwrap(),
            "--identity",
            id.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = chitin(&h.home, &["doctor"]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.starts_with("ok: no findings in "), "{out}");
    for what in [
        "exposure",
        "files",
        "sandbox",
        "policy",
        "channels",
        "approvals",
        "audit",
        "lifecycle",
        "providers",
        "updates",
        "landlock ABI",
        "newest backup",
    ] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
}

#[test]
fn the_secret_store_is_opened_only_to_read_names_and_never_prints_values() {
    let h = Home::new();
    let canary = "sk-live-CANARY-7f3a9c";
    let o = run(
        Path::new(env!("CARGO_BIN_EXE_chitin")),
        &h.home,
        &["secrets", "set", "canary"],
        canary,
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = chitin(&h.home, &["security", "audit", "--json", "--deep"]);
    let out = text(&o);
    assert!(out.contains("`canary` has an empty audience"), "{out}");
    assert!(!out.contains("CANARY"), "{out}");
    // Without the passphrase the audit still runs and says what it could not check.
    let o = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["security", "audit", "--json"])
        .env("CHITIN_HOME", &h.home)
        .env_remove("CHITIN_PASSPHRASE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| panic!("{}", text(&o)));
    assert_finding(&v, "secrets.not_inspected", "info");
}

#[test]
fn the_passphrase_can_come_from_a_systemd_credential() {
    let h = Home::new();
    let o = run(
        Path::new(env!("CARGO_BIN_EXE_chitin")),
        &h.home,
        &["secrets", "set", "k", "--audience", "example.com"],
        "value-three-long",
    );
    assert!(o.status.success(), "{}", text(&o));
    let creds = h.root.join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("chitin-passphrase"), format!("{PASS}\n")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["secrets", "list"])
        .env("CHITIN_HOME", &h.home)
        .env_remove("CHITIN_PASSPHRASE")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains('k'),
        "{}",
        text(&o)
    );
    std::fs::write(creds.join("chitin-passphrase"), "wrong\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["secrets", "list"])
        .env("CHITIN_HOME", &h.home)
        .env_remove("CHITIN_PASSPHRASE")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong passphrase"), "{}", text(&o));
}

#[test]
fn every_finding_id_the_code_can_emit_is_documented() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let categories = [
        "config",
        "exposure",
        "files",
        "secrets",
        "sandbox",
        "policy",
        "skills",
        "channels",
        "approvals",
        "audit",
        "lifecycle",
        "providers",
        "updates",
    ];
    let mut ids = std::collections::BTreeSet::new();
    for f in ["src/security/checks.rs", "src/secrets/doctor.rs"] {
        let text = std::fs::read_to_string(root.join(f)).unwrap();
        for part in text.split('"').skip(1).step_by(2) {
            let Some((cat, rest)) = part.split_once('.') else {
                continue;
            };
            if categories.contains(&cat)
                && !rest.is_empty()
                && rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                ids.insert(part.to_string());
            }
        }
    }
    assert!(ids.len() > 50, "the scan found too few ids: {ids:?}");
    let missing: Vec<_> = ids
        .iter()
        .filter(|id| !doc.contains(&format!("`{id}`")))
        .collect();
    assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
}

#[test]
fn the_gateway_token_age_and_rotation_are_checked() {
    let h = Home::new();
    let show = chitin(&h.home, &["token", "show"]);
    assert!(show.status.success(), "{}", text(&show));
    let (_, v) = h.audit(&[]);
    let checked = v["checked"].to_string();
    assert!(
        checked.contains("gateway token 0 days old, never rotated"),
        "{checked}"
    );
    assert!(!checked.contains(&String::from_utf8_lossy(&show.stdout).trim().to_string()));
    let o = chitin(&h.home, &["token", "rotate"]);
    assert!(o.status.success(), "{}", text(&o));
    let (_, v) = h.audit(&[]);
    let checked = v["checked"].to_string();
    assert!(
        checked.contains("gateway token 0 days old, rotated before"),
        "{checked}"
    );
}

fn observed<'a>(v: &'a Value, id: &str) -> &'a str {
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {v:#}"))["observed"]
        .as_str()
        .unwrap()
}

fn issue_token(h: &Home, args: &[&str]) -> String {
    let mut a = vec!["tokens", "issue", "--user", "alice"];
    a.extend_from_slice(args);
    let o = chitin(&h.home, &a);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    let token = out.lines().last().unwrap();
    assert!(token.starts_with("cht_"), "{out}");
    token[4..20].to_string()
}

#[test]
fn per_user_api_tokens_without_expiry_are_named_and_revoking_them_clears_the_finding() {
    let h = Home::new();
    let o = chitin(&h.home, &["users", "add", "alice"]);
    assert!(o.status.success(), "{}", text(&o));
    let expiring = issue_token(&h, &["--expires", "30d", "--name", "laptop"]);
    let (code, v) = h.audit(&[]);
    assert!(
        !findings(&v)
            .iter()
            .any(|(i, _)| i == "exposure.token_no_expiry"),
        "a token with an expiry is fine: {v:#}"
    );
    assert_eq!(code, Some(0), "{v:#}");

    let forever = issue_token(&h, &["--name", "ci"]);
    let (code, v) = h.audit(&[]);
    assert_finding(&v, "exposure.token_no_expiry", "medium");
    assert_eq!(code, Some(1));
    let seen = observed(&v, "exposure.token_no_expiry");
    assert!(
        seen.starts_with(&format!(
            "1 API token(s) without expiry: {forever} (user alice, name \"ci\", issued "
        )),
        "{seen}"
    );
    assert!(seen.ends_with("never used)"), "{seen}");
    assert!(!seen.contains(&expiring), "{seen}");

    let o = chitin(&h.home, &["tokens", "revoke", &forever]);
    assert!(o.status.success(), "{}", text(&o));
    let (code, v) = h.audit(&[]);
    assert!(
        !findings(&v)
            .iter()
            .any(|(i, _)| i == "exposure.token_no_expiry"),
        "{v:#}"
    );
    assert_eq!(code, Some(0), "{v:#}");
}

/// A home whose `[backup]` uploads to an S3 target (never contacted by the audit).
fn offsite_home(extra: &[(&str, &str)]) -> Home {
    let h = Home::new();
    let o = chitin(
        &h.home,
        &[
            "backup",
            "keygen",
            "--out",
            h.root.join("bk.txt").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let recipient = String::from_utf8_lossy(&o.stdout).trim().to_string();
    h.set("backup", "recipient", &format!("{recipient:?}"));
    h.set("backup", "target", "\"s3://chitin-backups/site\"");
    h.set("backup", "endpoint", "\"http://127.0.0.1:9\"");
    h.set("backup", "access_key_id", "\"env:S3_ID\"");
    h.set("backup", "secret_access_key", "\"env:S3_SECRET\"");
    for (k, v) in extra {
        h.set("backup", k, v);
    }
    h
}

fn set_meta(h: &Home, pairs: &[(&str, String)]) {
    let db = state_db(h);
    for (k, v) in pairs {
        db.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            rusqlite::params![k, v],
        )
        .unwrap();
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The off-site findings, by id (the report orders findings by severity).
fn offsite_ids(v: &Value) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = findings(v)
        .into_iter()
        .filter(|(i, _)| i.starts_with("lifecycle.offsite_"))
        .collect();
    f.sort();
    f
}

#[test]
fn off_site_backups_never_uploaded_failed_stale_or_never_test_restored_are_reported() {
    let day = 86_400_000;
    let pair = |id: &str, s: &str| (id.to_string(), s.to_string());

    // Configured, but the gateway never uploaded nor test-restored anything.
    let h = offsite_home(&[]);
    let (code, v) = h.audit(&[]);
    assert_eq!(
        offsite_ids(&v),
        vec![
            pair("lifecycle.offsite_never_test_restored", "medium"),
            pair("lifecycle.offsite_upload_stale", "medium"),
        ]
    );
    assert_eq!(
        observed(&v, "lifecycle.offsite_never_test_restored"),
        "[backup] target = s3://chitin-backups/site; automatic test-restores are off ([backup] test_restore_hours = 24, identity not set)"
    );
    assert_eq!(code, Some(worst_code(&v)));

    // The last upload failed (an earlier one passed, ten days ago: stale too); the last
    // test-restore failed.
    let now = now_ms();
    set_meta(
        &h,
        &[
            ("backup.offsite.last_upload_ms", (now - 10 * day).to_string()),
            (
                "backup.offsite.last_error",
                "S3 PUT site/chitin-backup-1.age failed: HTTP 403 Forbidden (SignatureDoesNotMatch)".to_string(),
            ),
            ("backup.test_restore.last_attempt_ms", (now - day).to_string()),
            ("backup.test_restore.last_ok_ms", (now - 40 * day).to_string()),
            (
                "backup.test_restore.last_error",
                "the backup does not decrypt with this identity".to_string(),
            ),
        ],
    );
    let (code, v) = h.audit(&[]);
    assert_eq!(
        offsite_ids(&v),
        vec![
            pair("lifecycle.offsite_test_restore_failed", "high"),
            pair("lifecycle.offsite_upload_failed", "high"),
            pair("lifecycle.offsite_upload_stale", "medium"),
        ]
    );
    let failed = observed(&v, "lifecycle.offsite_upload_failed");
    assert!(
        failed.starts_with("upload to s3://chitin-backups/site failed: S3 PUT site/chitin-backup-1.age failed: HTTP 403 Forbidden (SignatureDoesNotMatch); last successful upload "),
        "{failed}"
    );
    assert!(failed.ends_with("(10 days ago)"), "{failed}");
    assert!(
        observed(&v, "lifecycle.offsite_test_restore_failed")
            .contains("the backup does not decrypt with this identity; last one that passed "),
        "{v:#}"
    );
    assert_eq!(code, Some(1));

    // Uploads work again; the last passing test-restore is 40 days old.
    set_meta(
        &h,
        &[
            ("backup.offsite.last_upload_ms", (now - day).to_string()),
            ("backup.offsite.last_error", String::new()),
            ("backup.test_restore.last_error", String::new()),
        ],
    );
    let (_, v) = h.audit(&[]);
    assert_eq!(
        offsite_ids(&v),
        vec![pair("lifecycle.offsite_test_restore_stale", "low")]
    );

    // All recent: nothing off-site is reported.
    set_meta(
        &h,
        &[("backup.test_restore.last_ok_ms", (now - day).to_string())],
    );
    let (_, v) = h.audit(&[]);
    assert_eq!(offsite_ids(&v), vec![]);
}
