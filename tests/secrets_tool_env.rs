//! Secrets in a tool's environment (issue #5): a tool gets a secret only when a policy grants
//! that exact secret to that tool, the value travels to the jailed process without argv and
//! without the launcher's environment, and whatever the tool prints of it reaches the model
//! (and the audit log) redacted. Every flow runs the real gate, store, launcher and sandbox.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::secrecy::SecretString;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chitin::clock::SystemClock;
use chitin::config::sandbox::{SandboxConfig, SecretEnvEntry};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::{CallContext, Gate, Origin, ProgramLocation, writable_program_refusal};
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::identity::FixedPassphrase;
use chitin::secrets::tool_env::ToolSecretsError;
use chitin::secrets::{SecretName, SecretStore, SecretValue, SharedSecretStore, ToolSecrets};
use chitin::tools::invoke::{InvokeError, Invoked, invoke};
use chitin::tools::{Sandbox, ToolError, ToolResult};
use chitin_audit::{AuditLog, Query, Record};
use chitin_sandbox::SecretEnv;
use serde_json::{Value, json};
use sha2::Digest as _;

/// Characters that make every encoding differ from the raw value.
const GH: &str = "ghp_CANARYenv/0123+abc=&XYZ~9";
const OTHER: &str = "otr_CANARYnotgranted-5555";
const GIT: &str = "git_CANARYmodelwritten-7777";
const BYPATH: &str = "pth_CANARYbypath-4242";

const GRANT: &str = r#"
@id("test.exec-gets-github-token")
@reason("The test grants exactly github_token to the exec tool's environment.")
permit (
  principal == Chitin::Tool::"exec",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"github_token"
)
when { context.host == "env:exec" };

@id("test.only-printenv-gets-other-token")
@reason("A grant limited to one program: other commands run by exec do not get it.")
permit (
  principal == Chitin::Tool::"exec",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"other_token"
)
when { context.host == "env:exec" && context has command && context.command == "printenv" };

@id("test.git-by-name")
@reason("The grant by program name the attack is about: any program called `git`.")
permit (
  principal == Chitin::Tool::"exec",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"git_token"
)
when { context.host == "env:exec" && context has command && context.command == "git" };

@id("test.printenv-by-path")
@reason("A grant by the program's real path, as the documentation recommends.")
permit (
  principal == Chitin::Tool::"exec",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"path_token"
)
when {
  context.host == "env:exec" && context has command_path &&
  context.command_path == "/usr/bin/printenv"
};

@id("test.exec-gets-missing-token")
@reason("Granted, but never stored: the tool must refuse to run.")
permit (
  principal == Chitin::Tool::"exec",
  action == Chitin::Action::"secret.use",
  resource == Chitin::Secret::"missing_token"
)
when { context.host == "env:exec" };
"#;

struct Env {
    _dirs: Vec<tempfile::TempDir>,
    gate: Gate,
    /// With tool-environment secrets enabled.
    sandbox: Sandbox,
    /// The same config, without `with_secret_env`.
    plain: Sandbox,
    call: CallContext,
    home: PathBuf,
    ws: PathBuf,
    shared: SharedSecretStore,
}

fn entry(secret: &str, var: &str) -> SecretEnvEntry {
    SecretEnvEntry {
        tool: "exec".into(),
        secret: secret.into(),
        var: var.into(),
    }
}

fn secrets_cfg() -> SecretsConfig {
    SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 4,
        max_scrypt_work_factor: 12,
        ..SecretsConfig::default()
    }
}

fn env_with(entries: Vec<SecretEnvEntry>) -> Env {
    // Not under /tmp: the sandbox gives every command a private /tmp.
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (h, w, p) = (
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
    );
    let home = h.path().join("state");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&home)
        .unwrap();
    let mut store = SecretStore::open_with(
        &home,
        &secrets_cfg(),
        Box::new(FixedPassphrase(SecretString::from("pw".to_string()))),
        Arc::new(SystemClock),
    )
    .unwrap();
    for (name, value) in [
        ("github_token", GH),
        ("other_token", OTHER),
        ("git_token", GIT),
        ("path_token", BYPATH),
    ] {
        store
            .set(
                &SecretName::parse(name).unwrap(),
                SecretValue::from_str_copy(value),
                &["api.github.com".into()],
            )
            .unwrap();
    }
    let shared = SharedSecretStore::new(store);

    let pol = p.path().to_path_buf();
    for (name, text) in chitin::policy::builtin::DEFAULT_POLICIES {
        std::fs::write(pol.join(name), text).unwrap();
    }
    std::fs::write(pol.join("grant.cedar"), GRANT).unwrap();
    let ents = pol.join("entities.json");
    std::fs::write(
        &ents,
        json!([
            {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}
        ])
        .to_string(),
    )
    .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: Some(pol),
        entity_files: vec![ents],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let audit = Arc::new(AuditLog::open(&home, chitin_audit::AuditOptions::default()).unwrap());
    let redactor = shared.redactor();
    let gate = Gate::new(Arc::new(engine), audit)
        .with_redactor(Arc::new(move |s: &str| redactor.redact(s).into_owned()));
    let cfg = SandboxConfig {
        secret_env: entries,
        ..SandboxConfig::default()
    };
    cfg.validate().unwrap();
    let mut plain = Sandbox::current(home.clone(), None, cfg).unwrap();
    plain.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    let sandbox = plain
        .clone()
        .with_secret_env(Arc::new(ToolSecrets::new(gate.clone(), shared.clone())))
        .with_prompt_marks(chitin::tools::prompt_guard::PromptMarks::new(Arc::new(
            chitin::store::Store::open(&home.join("state.db")).unwrap(),
        )));
    let ws = w.path().canonicalize().unwrap();
    let call = CallContext {
        user: "owner".into(),
        origin: Origin::Model,
        session: "s1".into(),
        workspace: ws.clone(),
        tainted: false,
    };
    Env {
        _dirs: vec![h, w, p],
        gate,
        sandbox,
        plain,
        call,
        home,
        ws,
        shared,
    }
}

fn env() -> Env {
    env_with(vec![
        entry("github_token", "GITHUB_TOKEN"),
        entry("other_token", "OTHER_TOKEN"),
    ])
}

fn ran(r: Result<Invoked, InvokeError>) -> ToolResult {
    match r.unwrap() {
        Invoked::Ran { result, .. } => result,
        other => panic!("expected the command to run, got {other:?}"),
    }
}

fn exec(e: &Env, sb: &Sandbox, script: &str) -> ToolResult {
    ran(invoke(
        &e.gate,
        sb,
        &e.call,
        "exec",
        &json!({"argv": ["sh", "-c", script]}),
        None,
    ))
}

fn records(e: &Env) -> Vec<Record> {
    e.gate
        .audit()
        .reader()
        .unwrap()
        .query(&Query::default())
        .unwrap()
}

fn sha256_hex(v: &str) -> String {
    sha2::Sha256::digest(v.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A shell test that exits 0 only when `$VAR` holds exactly `value` (compared by digest, so
/// the value itself is never in argv).
fn holds(var: &str, value: &str) -> String {
    format!(
        "test \"$(printf %s \"${var}\" | sha256sum | cut -c1-64)\" = {}",
        sha256_hex(value)
    )
}

/// The value and the encodings a tool might print it in.
fn forms(v: &str) -> Vec<(&'static str, String)> {
    let pct: String =
        percent_encoding::percent_encode(v.as_bytes(), percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    vec![
        ("raw", v.to_string()),
        ("base64", STANDARD.encode(v)),
        ("base64url", URL_SAFE_NO_PAD.encode(v)),
        ("hex", v.bytes().map(|b| format!("{b:02x}")).collect()),
        ("percent", pct),
    ]
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_no_form(where_: &str, data: &[u8], value: &str) {
    for (form, text) in forms(value) {
        assert!(
            !find(data, text.as_bytes()),
            "{form} form of the secret found in {where_}"
        );
    }
}

#[test]
fn a_tool_granted_a_secret_sees_it_and_its_printed_environment_is_redacted() {
    let e = env();
    let script = format!(
        "{} || exit 3; env; printf '%s' \"$GITHUB_TOKEN\" | base64 -w0; echo; \
         printf '%s' \"$GITHUB_TOKEN\" | od -An -tx1 -v | tr -d ' \\n'; echo; \
         python3 -c 'import os,urllib.parse; print(urllib.parse.quote(os.environ[\"GITHUB_TOKEN\"], safe=\"\"))'",
        holds("GITHUB_TOKEN", GH)
    );
    let r = exec(&e, &e.sandbox, &script);
    assert_eq!(
        r.exit_code,
        Some(0),
        "the value in the sandbox differs: {r:?}"
    );
    assert!(
        r.stdout.contains("GITHUB_TOKEN=[REDACTED:github_token]"),
        "{}",
        r.stdout
    );
    // base64, hex and percent-encoded lines each became the marker.
    assert!(
        r.stdout.matches("[REDACTED:github_token]").count() >= 4,
        "{}",
        r.stdout
    );
    assert_no_form("the tool result", r.stdout.as_bytes(), GH);
    assert_no_form("the tool result", r.stderr.as_bytes(), GH);

    // The release is audited with name, audience and who; never the value.
    let recs = records(&e);
    let release = recs
        .iter()
        .find(|r| r.kind == "secret_use" && r.resource == "Chitin::Secret::\"github_token\"")
        .expect("a secret_use record for the release");
    assert_eq!(release.actor, "Chitin::Tool::\"exec\"");
    let payload = release.payload_json().unwrap();
    assert_eq!(payload["host"], "env:exec");
    assert_eq!(payload["audience"], json!(["api.github.com"]));
    let allow = recs
        .iter()
        .find(|r| {
            r.kind == "decision"
                && r.action == "secret.use"
                && r.resource == "Chitin::Secret::\"github_token\""
        })
        .expect("the gate's decision");
    assert_eq!(allow.decision, "allow");
    assert_eq!(allow.policy_ids(), ["test.exec-gets-github-token"]);
    for r in &recs {
        let text = r.payload.clone().unwrap_or_default();
        assert_no_form(&format!("audit record {}", r.seq), text.as_bytes(), GH);
    }
}

#[test]
fn without_a_grant_the_variable_is_absent_and_the_denial_is_audited() {
    let e = env();
    let r = exec(
        &e,
        &e.sandbox,
        "test -z \"${OTHER_TOKEN+set}\" || exit 3; env",
    );
    assert_eq!(r.exit_code, Some(0), "OTHER_TOKEN is set: {r:?}");
    assert!(!r.stdout.contains("OTHER_TOKEN"), "{}", r.stdout);
    let recs = records(&e);
    let denial = recs
        .iter()
        .find(|r| {
            r.kind == "decision"
                && r.action == "secret.use"
                && r.resource == "Chitin::Secret::\"other_token\""
        })
        .expect("the denial is recorded");
    assert_eq!(
        (denial.decision.as_str(), denial.actor.as_str()),
        ("deny", "Chitin::Tool::\"exec\"")
    );
    assert_eq!(
        denial.payload_json().unwrap()["context"]["host"],
        "env:exec"
    );
    assert!(
        !recs
            .iter()
            .any(|r| r.kind == "secret_use" && r.resource.contains("other_token")),
        "a denied secret is never released"
    );
}

#[test]
fn a_grant_limited_to_one_program_reaches_only_that_program() {
    let e = env();
    let r = ran(invoke(
        &e.gate,
        &e.sandbox,
        &e.call,
        "exec",
        &json!({"argv": ["printenv", "OTHER_TOKEN"]}),
        None,
    ));
    assert_eq!(r.exit_code, Some(0), "printenv did not get it: {r:?}");
    assert_eq!(r.stdout, "[REDACTED:other_token]\n");
    let decisions: Vec<(String, Value)> = records(&e)
        .iter()
        .filter(|r| {
            r.kind == "decision" && r.action == "secret.use" && r.resource.contains("other_token")
        })
        .map(|r| {
            (
                r.decision.clone(),
                r.payload_json().unwrap()["context"].clone(),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [(
            "allow".to_string(),
            json!({"host": "env:exec", "command": "printenv",
                   "command_path": "/usr/bin/printenv", "command_writable": false,
                   "user": "owner", "session": "s1", "tainted": false})
        )]
    );
    // The same exec tool running another program does not get it.
    let r = exec(&e, &e.sandbox, "test -z \"${OTHER_TOKEN+set}\"");
    assert_eq!(r.exit_code, Some(0), "sh got OTHER_TOKEN: {r:?}");
}

#[test]
fn with_the_audit_log_unavailable_nothing_is_decided_or_released() {
    let e = env();
    let secrets = ToolSecrets::new(e.gate.clone(), e.shared.clone());
    let entries = e.plain.config_section.secret_env.clone();
    // Another process holds the audit database's write lock: no record can be written.
    let other = rusqlite::Connection::open(e.home.join("audit.db")).unwrap();
    other.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let dash = ProgramLocation {
        path: "/usr/bin/dash".into(),
        command: "dash".into(),
        writable: false,
    };
    let err = secrets
        .release("exec", Some(&e.call), Some(&dash), &entries)
        .unwrap_err();
    assert!(
        matches!(err, ToolSecretsError::Decision { ref name, .. } if name == "github_token"),
        "{err:?}"
    );
    assert!(err.to_string().contains("audit log unavailable"), "{err}");
    other.execute_batch("ROLLBACK").unwrap();
    assert!(
        !records(&e).iter().any(|r| r.kind == "secret_use"),
        "nothing was released"
    );
}

#[test]
fn a_sandbox_without_secret_env_gives_no_tool_any_secret_and_decides_nothing() {
    let e = env();
    let r = exec(
        &e,
        &e.plain,
        "test -z \"${GITHUB_TOKEN+set}${OTHER_TOKEN+set}\"",
    );
    assert_eq!(r.exit_code, Some(0), "{r:?}");
    assert!(
        !records(&e).iter().any(|r| r.action == "secret.use"),
        "no secret.use decision without with_secret_env"
    );
}

#[test]
fn a_granted_secret_that_is_not_in_the_store_stops_the_tool_with_what_to_do() {
    let e = env_with(vec![
        entry("github_token", "GITHUB_TOKEN"),
        entry("missing_token", "MISSING"),
    ]);
    let err = invoke(
        &e.gate,
        &e.sandbox,
        &e.call,
        "exec",
        &json!({"argv": ["touch", "ran"]}),
        None,
    )
    .unwrap_err();
    let InvokeError::Tool(ToolError::SecretEnv(inner)) = &err else {
        panic!("expected a secret-env refusal, got {err:?}")
    };
    let msg = inner.to_string();
    assert!(msg.contains("`missing_token`"), "{msg}");
    assert!(msg.contains("chitin secrets list"), "{msg}");
    assert!(!e.ws.join("ran").exists(), "nothing ran");
}

#[test]
fn the_value_is_never_in_the_launchers_cmdline_or_environ_nor_under_the_state_dir() {
    let e = Arc::new(env());
    let ws = e.ws.clone();
    let e2 = Arc::clone(&e);
    let script = format!("{} || exit 3; sleep 3", holds("GITHUB_TOKEN", GH));
    let runner = std::thread::spawn(move || exec(&e2, &e2.sandbox, &script));

    // While the command sleeps, read every launcher-image process of this run (the launcher
    // and the sandbox's init, which shares its image) from /proc.
    let marker = {
        // Both launchers (`chitin-sandbox-launch`, `chitin sandbox exec`) name the workspace so.
        let mut m = b"--workspace\0".to_vec();
        m.extend_from_slice(ws.as_os_str().as_encoded_bytes());
        m
    };
    // A launcher the zygote forked (`chitin_sandbox::zygote`) keeps the zygote's command line
    // (`chitin-sandbox-launch --serve`) and its empty environment; its argv came in a memfd.
    let serving = b"chitin-sandbox-launch\0--serve\0";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while seen.is_empty() && Instant::now() < deadline {
        let zygote = e.sandbox.zygotes().pid();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let forked = cmdline.ends_with(serving);
            if !find(&cmdline, &marker) && !forked {
                continue;
            }
            let Ok(environ) = std::fs::read(p.path().join("environ")) else {
                continue;
            };
            assert_no_form("the launcher's cmdline", &cmdline, GH);
            assert_no_form("the launcher's environ", &environ, GH);
            if forked {
                assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
                // This run's launcher: a child of this sandbox's zygote.
                let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split(' ').nth(1))
                    .and_then(|x| x.parse::<u32>().ok());
                if ppid.is_some() && ppid == zygote {
                    seen.push(p.file_name());
                }
                continue;
            }
            assert!(find(&cmdline, b"--env-fd\0"), "the hand-off flag is used");
            if find(&cmdline, b"chitin-sandbox-launch\0") {
                // The small launcher reads no configuration: its environment is empty.
                assert!(environ.is_empty(), "{}", String::from_utf8_lossy(&environ));
            } else {
                assert!(find(&environ, b"CHITIN_HOME="), "environ was really read");
            }
            seen.push(p.file_name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!seen.is_empty(), "the launcher was never seen in /proc");
    let r = runner.join().unwrap();
    assert_eq!(
        r.exit_code,
        Some(0),
        "the command did not get the value: {r:?}"
    );

    // Every file under the state dir but the encrypted store.
    let mut files = Vec::new();
    all_files(&e.home, &mut files);
    assert!(files.iter().any(|f| f.ends_with("audit.db")), "{files:?}");
    for f in files {
        if f.ends_with("secrets.age") {
            continue;
        }
        assert_no_form(&f.display().to_string(), &std::fs::read(&f).unwrap(), GH);
    }
}

fn all_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            all_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

// ---- issue #13 item 4: secrets granted by program name, model-written programs ----------------

fn run(e: &Env, call: &CallContext, argv: &[&str]) -> ToolResult {
    ran(invoke(
        &e.gate,
        &e.sandbox,
        call,
        "exec",
        &json!({ "argv": argv }),
        None,
    ))
}

/// The gate's record of the last `secret.use` decision for `secret` (every exec run decides
/// each entry, the set-up commands' runs included).
fn secret_decision(e: &Env, secret: &str) -> Record {
    let resource = format!("Chitin::Secret::\"{secret}\"");
    records(e)
        .into_iter()
        .rev()
        .find(|r| r.kind == "decision" && r.action == "secret.use" && r.resource == resource)
        .expect("a secret.use decision")
}

fn assert_nowhere(e: &Env, value: &str, outputs: &[(&str, &[u8])]) {
    for (name, data) in outputs {
        assert_no_form(name, data, value);
    }
    for r in records(e) {
        let text = r.payload.clone().unwrap_or_default();
        assert_no_form(&format!("audit record {}", r.seq), text.as_bytes(), value);
        assert_no_form(
            &format!("audit outcome {}", r.seq),
            r.outcome.as_bytes(),
            value,
        );
    }
    assert!(
        !records(e).iter().any(|r| r.kind == "secret_use"),
        "nothing was released"
    );
}

#[test]
fn a_model_written_git_in_the_workspace_does_not_get_the_secret_granted_to_git() {
    let e = env_with(vec![entry("git_token", "GIT_TOKEN")]);
    // The model writes its own `git` into the workspace and makes it executable, with the
    // tools a model has; the policy grants `git_token` to any program called `git`.
    let script =
        "#!/bin/sh\nprintenv GIT_TOKEN > leak\nenv > env.txt\necho \"ran:${GIT_TOKEN+set}\"\n";
    ran(invoke(
        &e.gate,
        &e.sandbox,
        &e.call,
        "write_file",
        &json!({"path": "git", "content": script}),
        None,
    ));
    assert_eq!(run(&e, &e.call, &["chmod", "+x", "git"]).exit_code, Some(0));
    let r = run(&e, &e.call, &["./git", "push"]);
    // It ran, without the variable.
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (Some(0), "ran:\n"),
        "{r:?}"
    );
    let leak = std::fs::read(e.ws.join("leak")).unwrap();
    assert!(leak.is_empty(), "the workspace program got the secret");
    let env_txt = std::fs::read(e.ws.join("env.txt")).unwrap();
    assert!(!find(&env_txt, b"GIT_TOKEN"));
    // The exact refusal, recorded by the gate before any policy was asked.
    let rec = secret_decision(&e, "git_token");
    let program = e.ws.join("git").display().to_string();
    assert_eq!(rec.decision, "deny");
    assert_eq!(
        rec.outcome,
        format!(
            "refused: {}",
            writable_program_refusal("git_token", &program)
        )
    );
    assert_eq!(
        rec.outcome,
        format!(
            "refused: secret `git_token` withheld from `{program}`: the program is in, or was \
             named through, a place the agent can write (the workspace, /tmp, /var/tmp, \
             /dev/shm); tool secrets go only to programs in system directories, run by name \
             or by their real path"
        )
    );
    assert!(rec.policy_ids().is_empty(), "{:?}", rec.policy_ids());
    let ctx = rec.payload_json().unwrap();
    assert_eq!(ctx["command"], "git");
    assert_eq!(ctx["command_path"], json!(program));
    assert_eq!(ctx["command_writable"], true);
    assert_nowhere(
        &e,
        GIT,
        &[
            ("stdout", r.stdout.as_bytes()),
            ("stderr", r.stderr.as_bytes()),
            ("leak", &leak),
            ("env.txt", &env_txt),
        ],
    );
}

#[test]
fn a_workspace_link_to_a_system_program_is_named_through_the_workspace_and_gets_no_secret() {
    // `./printenv -> /usr/bin/printenv`: the bytes are the real printenv's today, but the link
    // lies where the agent can write and could point elsewhere by the time the sandbox execs
    // it, so it counts as writable whether the grant is by name or by path.
    let e = env_with(vec![
        entry("other_token", "OTHER_TOKEN"),
        entry("path_token", "PATH_TOKEN"),
    ]);
    let ln = run(&e, &e.call, &["ln", "-s", "/usr/bin/printenv", "printenv"]);
    assert_eq!(ln.exit_code, Some(0), "{ln:?}");
    for var in ["OTHER_TOKEN", "PATH_TOKEN"] {
        let r = run(&e, &e.call, &["./printenv", var]);
        assert_eq!((r.exit_code, r.stdout.as_str()), (Some(1), ""), "{r:?}");
    }
    for secret in ["other_token", "path_token"] {
        let rec = secret_decision(&e, secret);
        assert_eq!(rec.decision, "deny");
        assert_eq!(
            rec.outcome,
            format!(
                "refused: {}",
                writable_program_refusal(secret, "/usr/bin/printenv")
            )
        );
        let ctx = rec.payload_json().unwrap();
        assert_eq!(ctx["command_path"], "/usr/bin/printenv");
        assert_eq!(ctx["command_writable"], true);
    }
    assert_nowhere(&e, OTHER, &[]);
    assert_nowhere(&e, BYPATH, &[]);
}

#[test]
fn a_grant_by_path_reaches_the_system_program_run_by_name_or_by_its_path() {
    let e = env_with(vec![entry("path_token", "PATH_TOKEN")]);
    for argv0 in ["printenv", "/usr/bin/printenv"] {
        let r = run(&e, &e.call, &[argv0, "PATH_TOKEN"]);
        assert_eq!(
            (r.exit_code, r.stdout.as_str()),
            (Some(0), "[REDACTED:path_token]\n"),
            "{argv0}: {r:?}"
        );
    }
    let allows: Vec<(String, Vec<String>, Value)> = records(&e)
        .iter()
        .filter(|r| r.kind == "decision" && r.action == "secret.use")
        .map(|r| {
            (
                r.decision.clone(),
                r.policy_ids(),
                r.payload_json().unwrap()["context"].clone(),
            )
        })
        .collect();
    let want = (
        "allow".to_string(),
        vec!["test.printenv-by-path".to_string()],
        json!({"host": "env:exec", "command": "printenv", "command_path": "/usr/bin/printenv",
               "command_writable": false, "user": "owner", "session": "s1", "tainted": false}),
    );
    assert_eq!(allows, [want.clone(), want]);
}

#[test]
fn a_tainted_session_gets_no_tool_secret_even_for_a_granted_system_program() {
    let e = env_with(vec![entry("path_token", "PATH_TOKEN")]);
    let tainted = CallContext {
        tainted: true,
        ..e.call.clone()
    };
    let r = run(&e, &tainted, &["printenv", "PATH_TOKEN"]);
    assert_eq!((r.exit_code, r.stdout.as_str()), (Some(1), ""), "{r:?}");
    let rec = secret_decision(&e, "path_token");
    assert_eq!(rec.decision, "deny");
    assert_eq!(rec.policy_ids(), ["secrets.tools-none-in-tainted-sessions"]);
    assert_eq!(rec.payload_json().unwrap()["context"]["tainted"], true);
    assert_nowhere(&e, BYPATH, &[("stdout", r.stdout.as_bytes())]);
}

#[test]
fn no_caller_can_get_a_tool_secret_released_to_a_program_in_a_temp_dir() {
    // Straight to the release API with a program location that claims not to be writable:
    // the gate looks at the path itself, whatever the caller and the policies say (the test
    // policy grants `github_token` to every exec run).
    let e = env();
    let secrets = ToolSecrets::new(e.gate.clone(), e.shared.clone());
    let entries = vec![entry("github_token", "GITHUB_TOKEN")];
    for dir in ["/tmp/x", "/var/tmp", "/dev/shm/y"] {
        let liar = ProgramLocation {
            path: Path::new(dir).join("git"),
            command: "git".into(),
            writable: false,
        };
        let out = secrets
            .release("exec", Some(&e.call), Some(&liar), &entries)
            .unwrap();
        assert!(out.env.is_empty() && out.granted.is_empty(), "{dir}");
        assert_eq!(out.denied.len(), 1);
    }
    // And without a program at all, exec gets nothing either.
    let out = secrets
        .release("exec", Some(&e.call), None, &entries)
        .unwrap();
    assert!(out.granted.is_empty());
    let outcomes: Vec<String> = records(&e)
        .into_iter()
        .filter(|r| r.action == "secret.use")
        .map(|r| r.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            format!("refused: {}", writable_program_refusal("github_token", "/tmp/x/git")),
            format!("refused: {}", writable_program_refusal("github_token", "/var/tmp/git")),
            format!("refused: {}", writable_program_refusal("github_token", "/dev/shm/y/git")),
            "refused: secret `github_token` withheld: the program exec runs could not be resolved to a path".to_string(),
        ]
    );
    assert!(!records(&e).iter().any(|r| r.kind == "secret_use"));
}

// ---- the launcher's hand-off, attacked directly -----------------------------------------------

/// Runs `chitin sandbox exec --capture-json --env-fd FD -- argv`. With `wire`, FD is a pipe
/// the launcher inherits (as the gateway passes it) and `wire` is written into it; without,
/// `fd` is passed as given.
fn launch(fd: &str, wire: Option<&[u8]>, argv: &[&str]) -> (i32, Value) {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let home = tempfile::tempdir_in(base).unwrap();
    let ws = tempfile::tempdir_in(base).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chitin"));
    cmd.env_clear()
        .env("CHITIN_HOME", home.path())
        .args(["sandbox", "exec", "--workspace"])
        .arg(ws.path())
        .args(["--capture-json", "4096", "--env-fd"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let pipe = match wire {
        Some(_) => {
            let (w, r, n) = chitin_sandbox::secret_env::pass_to_child(&mut cmd).unwrap();
            cmd.arg(n.to_string());
            Some((w, r))
        }
        None => {
            cmd.arg(fd);
            None
        }
    };
    cmd.arg("--").args(argv);
    let child = cmd.spawn().unwrap();
    if let (Some((mut w, r)), Some(bytes)) = (pipe, wire) {
        drop(r);
        let _ = w.write_all(bytes);
    }
    let out = child.wait_with_output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

#[test]
fn the_launcher_puts_handed_off_values_only_into_the_commands_environment() {
    let mut env = SecretEnv::new();
    env.push("K", b"value-through-the-pipe".to_vec()).unwrap();
    let (code, report) = launch(
        "-",
        Some(env.to_wire().as_slice()),
        &[
            "sh",
            "-c",
            "printf '%s|' \"$K\"; ls /proc/self/fd | tr '\\n' ' '",
        ],
    );
    assert_eq!(code, 0, "{report}");
    // The value is in the environment, and the command holds only stdio (3 is the directory
    // `ls` opens itself): the hand-off pipe is not inherited.
    assert_eq!(
        report["stdout"], "value-through-the-pipe|0 1 2 3 ",
        "{report}"
    );
}

#[test]
fn a_hand_off_that_names_a_sandbox_variable_is_refused_and_nothing_runs() {
    let mut forged = b"CHSENV1\n".to_vec();
    let (k, v) = ("PATH", "/workspace/evil");
    forged.extend_from_slice(&u32::try_from(k.len()).unwrap().to_le_bytes());
    forged.extend_from_slice(k.as_bytes());
    forged.extend_from_slice(&u32::try_from(v.len()).unwrap().to_le_bytes());
    forged.extend_from_slice(v.as_bytes());
    let (code, report) = launch("-", Some(&forged), &["sh", "-c", "echo ran"]);
    assert_eq!(code, 125, "{report}");
    assert_eq!(report["error"]["kind"], "invalid", "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`PATH` is set by the sandbox itself"),
        "{report}"
    );
    assert_eq!(report["stdout"], "", "nothing ran");
}

#[test]
fn a_truncated_hand_off_is_refused() {
    let mut env = SecretEnv::new();
    env.push("K", b"value-that-gets-cut".to_vec()).unwrap();
    let wire = env.to_wire();
    let cut = &wire.as_slice()[..wire.as_slice().len() - 3];
    let (code, report) = launch("-", Some(cut), &["true"]);
    assert_eq!(code, 125, "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("truncated"),
        "{report}"
    );
}

#[test]
fn an_env_fd_that_is_stdio_or_not_open_or_not_a_pipe_is_refused() {
    let (code, report) = launch("0", None, &["true"]);
    assert_eq!(code, 125);
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--env-fd must be 3 or higher"),
        "{report}"
    );
    let (code, report) = launch("97", None, &["true"]);
    assert_eq!(code, 125);
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fd 97 is not open"),
        "{report}"
    );
    // A regular file on fd 3 (e.g. a planted file instead of the gateway's pipe).
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir_in(base).unwrap();
    let file = dir.path().join("wire");
    std::fs::write(&file, SecretEnv::new().to_wire().as_slice()).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" sandbox exec --workspace \"$1\" --capture-json 100 --env-fd 3 -- true 3<\"$2\"")
        .arg(env!("CARGO_BIN_EXE_chitin"))
        .arg(dir.path())
        .arg(&file)
        .env_clear()
        .env("CHITIN_HOME", dir.path().join("home"))
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(125), "{report}");
    assert!(
        report["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fd 3 is not a pipe"),
        "{report}"
    );
}
