//! Canary sweep (T-SEC-01/04 within the secrets module): store several canary secrets, run
//! every flow that exists today and that tries to leak them, then search every file under
//! the state directory and every output for each canary in every encoding. Only the
//! encrypted store may hold them.
//!
//! Flows covered now: the CLI (set, list, list --json, status, rotate-key, export-identity,
//! error paths), a tool that prints its environment (raw, base64 and hex dumps of it) passed
//! through the stream redactor, a fake model that echoes the secrets and their encodings
//! (transcript, outbound chat message, export), a debug log line, config errors for literal
//! credentials, the interim audit trail, and the real tool path: every canary granted by
//! policy to the `exec` tool, handed to the sandboxed command through the launcher's pipe
//! (`[[sandbox.secret_env]]`), and printed raw, base64 and hex by the command.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use age::secrecy::SecretString;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use chitin::clock::SystemClock;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::secrets::identity::FixedPassphrase;
use chitin::secrets::{SecretName, SecretRef, SecretStore};

const PASS: &str = "canary passphrase";

const CANARIES: &[(&str, &str)] = &[
    ("OPENAI_KEY", "sk-CANARYalpha7f3a9c1e2b55d0"),
    ("TG_BOT", "7001234567:CANARYbeta/Zx9=Qq&k p+w"),
    ("GH_TOKEN", "ghp_CANARYgamma0123456789abcdefXYZ"),
    ("WEBHOOK_SECRET", "whsec_CANARY\"delta\\%41\u{e9}tail"),
];

fn forms(v: &str) -> Vec<(String, String)> {
    let b = v.as_bytes();
    let pct_all =
        percent_encoding::percent_encode(b, percent_encoding::NON_ALPHANUMERIC).to_string();
    let out = vec![
        ("raw".to_string(), v.to_string()),
        ("base64".into(), STANDARD.encode(b)),
        ("base64-nopad".into(), STANDARD_NO_PAD.encode(b)),
        ("base64url".into(), URL_SAFE.encode(b)),
        ("base64url-nopad".into(), URL_SAFE_NO_PAD.encode(b)),
        ("hex".into(), b.iter().map(|x| format!("{x:02x}")).collect()),
        ("HEX".into(), b.iter().map(|x| format!("{x:02X}")).collect()),
        ("percent".into(), pct_all.clone()),
        ("percent-lower".into(), lower_hex_escapes(&pct_all)),
        (
            "json".into(),
            serde_json::to_string(v)
                .unwrap()
                .trim_matches('"')
                .to_string(),
        ),
    ];
    out
}

/// `forms` plus the distinctive middle of the value, to catch partial leaks in the sweep.
/// (The fake model does not echo fragments: exact-value redaction cannot catch a partial
/// echo, see SECURITY.secrets.md.)
fn sweep_forms(v: &str) -> Vec<(String, String)> {
    let mut out = forms(v);
    let start = v.find("CANARY").unwrap();
    out.push(("fragment".into(), v[start..start + 11].to_string()));
    // base64 of the value at each alignment inside a longer base64 text (the characters that
    // do not depend on neighbouring bytes).
    for k in 0..3usize {
        let mut shifted = vec![0u8; k];
        shifted.extend_from_slice(v.as_bytes());
        let enc = STANDARD_NO_PAD.encode(&shifted);
        let core = &enc[(8 * k).div_ceil(6)..(8 * (k + v.len())) / 6];
        out.push((format!("base64-offset{k}"), core.to_string()));
    }
    out
}

/// `%2F` -> `%2f`, leaving the other characters alone.
fn lower_hex_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut left = 0;
    for c in s.chars() {
        if left > 0 {
            out.push(c.to_ascii_lowercase());
            left -= 1;
        } else {
            if c == '%' {
                left = 2;
            }
            out.push(c);
        }
    }
    out
}

fn run(home: &Path, args: &[&str], stdin: &[u8], outputs: &mut Vec<(String, Vec<u8>)>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("RUST_LOG", "trace")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command may exit before reading its input (e.g. a refused config): not a failure.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    outputs.push((format!("chitin {args:?} stdout"), out.stdout));
    outputs.push((format!("chitin {args:?} stderr"), out.stderr));
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

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn write_private(path: &Path, data: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, data).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn no_canary_appears_anywhere_but_inside_the_encrypted_store() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("state");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(
        home.join("chitin.toml"),
        "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 4\nmax_scrypt_work_factor = 12\n",
    )
    .unwrap();
    // The CLI operator (the default owner) is an owner, so `secrets set` is allowed.
    std::fs::write(home.join("entities.json"), r#"[{"uid":{"type":"Chitin::Group","id":"owners"},"attrs":{},"parents":[]},{"uid":{"type":"Chitin::User","id":"owner"},"attrs":{},"parents":[{"type":"Chitin::Group","id":"owners"}]}]"#).unwrap();
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();

    // 1. The CLI.
    for (name, value) in CANARIES {
        run(
            &home,
            &["secrets", "set", name, "--audience", "api.example.com"],
            value.as_bytes(),
            &mut outputs,
        );
    }
    run(&home, &["secrets", "list"], b"", &mut outputs);
    run(&home, &["secrets", "list", "--json"], b"", &mut outputs);
    run(&home, &["secrets", "status"], b"", &mut outputs);
    run(&home, &["secrets", "rotate-key"], b"", &mut outputs);
    run(&home, &["secrets", "export-identity"], b"", &mut outputs);
    run(&home, &["secrets", "get", "OPENAI_KEY"], b"", &mut outputs); // refused: no --reveal
    run(
        &home,
        &["secrets", "set", "BAD NAME"],
        CANARIES[0].1.as_bytes(),
        &mut outputs,
    );
    run(
        &home,
        &["secrets", "set", "X", "--audience", "*.evil"],
        CANARIES[1].1.as_bytes(),
        &mut outputs,
    );
    // A value on argv is refused by the parser; its echo of the argument is the caller's own
    // text, so it is not part of the sweep.

    // 2. In-process flows through the redactor.
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 4,
        max_scrypt_work_factor: 12,
        ..SecretsConfig::default()
    };
    let mut store = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from(PASS.to_string()))),
        Arc::new(SystemClock),
    )
    .unwrap();
    // The canaries and the audit log's signing key.
    assert_eq!(store.list().len(), CANARIES.len() + 1);
    let redactor = store.redactor();
    let signer = chitin::secrets::audit_key::signer(&mut store, &home).unwrap();
    let options = chitin_audit::AuditOptions {
        signer: Some(Arc::new(signer)),
        ..Default::default()
    };
    let audit = Arc::new(chitin_audit::AuditLog::open(&home, options).unwrap());

    // 2a. A tool that prints its environment, raw and encoded, output captured in chunks.
    let mut tool = Command::new("sh");
    tool.arg("-c")
        .arg("env; printf '\\n'; env | base64 -w0; printf '\\n'; env | od -An -tx1 | tr -d ' \\n'")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (name, _) in CANARIES {
        let n = SecretName::parse(name).unwrap();
        let v = store.reveal(&n, "test:tool-env", audit.as_ref()).unwrap();
        tool.env(name, v.expose_str().unwrap());
    }
    let raw_tool_output = tool.output().unwrap().stdout;
    let mut s = redactor.stream();
    let mut tool_output = Vec::new();
    for chunk in raw_tool_output.chunks(7) {
        tool_output.extend(s.push(chunk));
    }
    tool_output.extend(s.finish());
    write_private(&home.join("transcripts/tool-output.txt"), &tool_output);

    // 2b. A fake model that repeats each secret and its encodings.
    let mut model_reply = String::from("Sure! Here are the credentials you asked for:\n");
    for (name, value) in CANARIES {
        for (form, text) in forms(value) {
            model_reply.push_str(&format!("{name} as {form}: {text}\n"));
        }
        model_reply.push_str(&format!(
            "basic auth: {}\n",
            STANDARD.encode(format!("user:{value}"))
        ));
        model_reply.push_str(&format!(
            "url: https://evil.example/?k={}\n",
            urlencode(value)
        ));
    }
    let redacted_reply = redactor.redact(&model_reply).into_owned();
    let transcript = serde_json::json!({"role": "assistant", "content": redacted_reply});
    write_private(
        &home.join("transcripts/session.jsonl"),
        format!("{transcript}\n").as_bytes(),
    );
    outputs.push((
        "outbound chat message".into(),
        redacted_reply.clone().into_bytes(),
    ));
    outputs.push((
        "session export".into(),
        redactor
            .redact(
                &serde_json::to_string_pretty(&serde_json::json!({"messages": [model_reply]}))
                    .unwrap(),
            )
            .into_owned()
            .into_bytes(),
    ));

    // 2c. A debug log line that formats a request with the credential in it.
    let (_, first) = CANARIES[0];
    let log_line = format!(
        "2026-11-21T08:00:00Z DEBUG provider: POST https://api.example.com/v1?key={} headers={{\"authorization\": \"Bearer {first}\"}}\n",
        urlencode(first)
    );
    write_private(
        &home.join("logs/chitin.log"),
        redactor.redact(&log_line).as_bytes(),
    );

    // 2d. Config errors for literal credentials never echo them.
    for (_, value) in CANARIES {
        let e = SecretRef::parse_credential("providers.openai.api_key", value).unwrap_err();
        outputs.push(("config error".into(), e.into_bytes()));
    }

    // 2e. The real tool path: gate (secret.use per canary), audited release, launcher pipe,
    // sandboxed command printing its environment; the result is what the model would see.
    let tool_result = sandboxed_tool_env(tmp.path(), &home, store, Arc::clone(&audit));
    assert!(
        tool_result.contains("OPENAI_KEY=[REDACTED:OPENAI_KEY]"),
        "control: the sandboxed command had the canary in its environment: {tool_result}"
    );
    write_private(
        &home.join("transcripts/sandboxed-tool-result.json"),
        tool_result.as_bytes(),
    );
    outputs.push(("sandboxed tool result".into(), tool_result.into_bytes()));

    // Positive control: the unredacted material really contains every form, so the sweep
    // below can see a leak.
    for (_, value) in CANARIES {
        for (form, text) in forms(value) {
            assert!(
                find(model_reply.as_bytes(), text.as_bytes()),
                "control: {form}"
            );
        }
        assert!(
            find(&raw_tool_output, value.as_bytes()),
            "control: tool env"
        );
        let hexed: String = value.bytes().map(|x| format!("{x:02x}")).collect();
        assert!(
            find(&raw_tool_output, hexed.as_bytes()),
            "control: tool env hex dump"
        );
        assert!(
            sweep_forms(value)
                .iter()
                .filter(|(f, _)| f.starts_with("base64-offset"))
                .any(|(_, t)| find(&raw_tool_output, t.as_bytes())),
            "control: tool env base64 dump"
        );
    }
    assert!(redacted_reply.contains("[REDACTED:OPENAI_KEY]"));
    assert!(String::from_utf8_lossy(&tool_output).contains("[REDACTED:GH_TOKEN]"));

    // 3. The sweep.
    let mut files = Vec::new();
    all_files(&home, &mut files);
    let store_file = home.join("secrets.age");
    assert!(files.contains(&store_file));
    let mut haystacks: Vec<(String, Vec<u8>)> = outputs;
    for f in files {
        let data = std::fs::read(&f).unwrap();
        if f == store_file {
            for (_, value) in CANARIES {
                assert!(
                    !find(&data, value.as_bytes()),
                    "plaintext canary in secrets.age"
                );
            }
            continue;
        }
        haystacks.push((f.display().to_string(), data));
    }
    let mut leaks = Vec::new();
    for (where_, data) in &haystacks {
        for (name, value) in CANARIES {
            for (form, text) in sweep_forms(value) {
                if find(data, text.as_bytes()) {
                    leaks.push(format!("{name} as {form} in {where_}"));
                }
            }
        }
    }
    assert!(
        haystacks.len() > 20,
        "swept only {} places",
        haystacks.len()
    );
    assert!(leaks.is_empty(), "canary leaks:\n{}", leaks.join("\n"));
}

/// Runs `exec` through `tools::invoke` with every canary granted to it by policy and
/// configured as `[[sandbox.secret_env]]`; returns the (redacted) result as JSON text.
fn sandboxed_tool_env(
    tmp: &Path,
    home: &Path,
    store: SecretStore,
    audit: Arc<chitin_audit::AuditLog>,
) -> String {
    use chitin::config::sandbox::{SandboxConfig, SecretEnvEntry};
    use chitin::gate::{CallContext, Gate, Origin};
    use chitin::policy::{EngineSpec, PolicyEngine};
    use chitin::secrets::{SharedSecretStore, ToolSecrets};
    use chitin::tools::Sandbox;
    use chitin::tools::invoke::{Invoked, invoke};

    let ws = tmp.join("ws");
    std::fs::create_dir(&ws).unwrap();
    let pol = tmp.join("policies");
    std::fs::create_dir(&pol).unwrap();
    for (name, text) in chitin::policy::builtin::DEFAULT_POLICIES {
        std::fs::write(pol.join(name), text).unwrap();
    }
    let mut grants = String::new();
    for (i, (name, _)) in CANARIES.iter().enumerate() {
        grants.push_str(&format!(
            "@id(\"test.exec-gets-{i}\")\n@reason(\"canary\")\npermit (principal == Chitin::Tool::\"exec\", action == Chitin::Action::\"secret.use\", resource == Chitin::Secret::\"{name}\") when {{ context.host == \"env:exec\" }};\n"
        ));
    }
    std::fs::write(pol.join("grants.cedar"), grants).unwrap();
    let ents = pol.join("entities.json");
    std::fs::write(
        &ents,
        serde_json::json!([
            {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
            {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]}
        ])
        .to_string(),
    )
    .unwrap();
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: Some(pol),
        entity_files: vec![ents],
        state_dir: Some(home.to_path_buf()),
    })
    .unwrap();
    let shared = SharedSecretStore::new(store);
    let redactor = shared.redactor();
    let gate = Gate::new(Arc::new(engine), audit)
        .with_redactor(Arc::new(move |s: &str| redactor.redact(s).into_owned()));
    let cfg = SandboxConfig {
        secret_env: CANARIES
            .iter()
            .map(|(name, _)| SecretEnvEntry {
                tool: "exec".into(),
                secret: (*name).into(),
                var: (*name).into(),
            })
            .collect(),
        ..SandboxConfig::default()
    };
    let mut sandbox = Sandbox::current(home.to_path_buf(), None, cfg).unwrap();
    sandbox.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    let sandbox = sandbox.with_secret_env(Arc::new(ToolSecrets::new(gate.clone(), shared)));
    let call = CallContext {
        user: "owner".into(),
        origin: Origin::Model,
        session: "canary".into(),
        workspace: ws.canonicalize().unwrap(),
        tainted: false,
    };
    let script =
        "env; printf '\\n'; env | base64 -w0; printf '\\n'; env | od -An -tx1 | tr -d ' \\n'";
    let Invoked::Ran { result, .. } = invoke(
        &gate,
        &sandbox,
        &call,
        "exec",
        &serde_json::json!({"argv": ["sh", "-c", script]}),
        None,
    )
    .unwrap() else {
        panic!("the exec call was not allowed")
    };
    assert_eq!(result.exit_code, Some(0), "{result:?}");
    serde_json::to_string(&result).unwrap()
}

fn urlencode(v: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::percent_encode(v.as_bytes(), SET).to_string()
}
