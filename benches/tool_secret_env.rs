//! Cost of tool-environment secrets on the tool path (`cargo bench --bench tool_secret_env
//! [-- RUNS]`, default 100 runs per variant, interleaved).
//!
//! Each run is a whole `tools::invoke` of `exec /bin/true` (strict parse, gate decision and
//! audit record, sandbox launch, tool_run record), with:
//! 1. no secret env (`Sandbox` without `with_secret_env`);
//! 2. one `[[sandbox.secret_env]]` entry, granted (decision + audited release + pipe hand-off);
//! 3. four entries, all granted;
//! 4. one entry, denied (decision only; nothing handed off).
//!
//! Every gate decision and every release is an audit record committed with
//! `synchronous = FULL` (fsync), which dominates the extra cost. Method and results:
//! docs/parts/BENCHMARKS.secretenv.md. Under `cargo test` (no `--bench`) it runs 2 rounds.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use age::secrecy::SecretString;
use chitin::clock::SystemClock;
use chitin::config::sandbox::{SandboxConfig, SecretEnvEntry};
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::{CallContext, Gate, Origin};
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::identity::FixedPassphrase;
use chitin::secrets::{SecretName, SecretStore, SecretValue, SharedSecretStore, ToolSecrets};
use chitin::tools::Sandbox;
use chitin::tools::invoke::{Invoked, invoke};
use serde_json::json;

const NAMES: &[&str] = &["s0", "s1", "s2", "s3", "denied"];

fn entries(names: &[&str]) -> Vec<SecretEnvEntry> {
    names
        .iter()
        .map(|n| SecretEnvEntry {
            tool: "exec".into(),
            secret: (*n).into(),
            var: format!("V_{n}"),
        })
        .collect()
}

fn stats(name: &str, v: &mut [Duration]) -> f64 {
    v.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let med = ms(v[v.len() / 2]);
    let p99 = ms(v[(v.len() * 99 / 100).min(v.len() - 1)]);
    println!(
        "{name:<44} median {med:8.3} ms   p99 {p99:8.3} ms   (n={})",
        v.len()
    );
    med
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let runs: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if benching { 100 } else { 2 });
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (h, w, p) = (
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
    );
    let home = h.path().to_path_buf();
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 4,
        max_scrypt_work_factor: 12,
        ..SecretsConfig::default()
    };
    let mut store = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from("pw".to_string()))),
        Arc::new(SystemClock),
    )
    .unwrap();
    for n in NAMES {
        store
            .set(
                &SecretName::parse(n).unwrap(),
                SecretValue::from_str_copy(&format!("bench-secret-value-{n}-0123456789")),
                &[],
            )
            .unwrap();
    }
    let shared = SharedSecretStore::new(store);
    let pol = p.path().to_path_buf();
    for (name, text) in chitin::policy::builtin::DEFAULT_POLICIES {
        std::fs::write(pol.join(name), text).unwrap();
    }
    std::fs::write(
        pol.join("grant.cedar"),
        r#"@id("bench.exec-gets-s")
@reason("benchmark")
permit (principal == Chitin::Tool::"exec", action == Chitin::Action::"secret.use", resource)
when { context.host == "env:exec" && resource != Chitin::Secret::"denied" };
"#,
    )
    .unwrap();
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
    let audit = Arc::new(
        chitin_audit::AuditLog::open(&home, chitin_audit::AuditOptions::default()).unwrap(),
    );
    let redactor = shared.redactor();
    let gate = Gate::new(Arc::new(engine), audit)
        .with_redactor(Arc::new(move |s: &str| redactor.redact(s).into_owned()));
    let secrets = Arc::new(ToolSecrets::new(gate.clone(), shared));
    let sandbox = |names: &[&str]| {
        let cfg = SandboxConfig {
            secret_env: entries(names),
            cgroup: chitin::config::sandbox::CgroupSetting::Off,
            ..SandboxConfig::default()
        };
        let mut sb = Sandbox::current(home.clone(), None, cfg).unwrap();
        sb.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
        sb.with_secret_env(Arc::clone(&secrets))
    };
    let mut plain = Sandbox::current(
        home.clone(),
        None,
        SandboxConfig {
            cgroup: chitin::config::sandbox::CgroupSetting::Off,
            ..SandboxConfig::default()
        },
    )
    .unwrap();
    plain.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    let variants: Vec<(&str, Sandbox)> = vec![
        ("no secret env", plain),
        ("1 secret, granted", sandbox(&["s0"])),
        ("4 secrets, granted", sandbox(&["s0", "s1", "s2", "s3"])),
        ("1 secret, denied", sandbox(&["denied"])),
    ];
    let call = CallContext {
        user: "owner".into(),
        origin: Origin::Model,
        session: "bench".into(),
        workspace: w.path().canonicalize().unwrap(),
        tainted: false,
    };
    let args = json!({"argv": ["/bin/true"]});
    let once = |sb: &Sandbox| {
        let t = Instant::now();
        match invoke(&gate, sb, &call, "exec", &args, None) {
            Ok(Invoked::Ran { result, .. }) if result.exit_code == Some(0) => t.elapsed(),
            other => panic!("benchmark call failed: {other:?}"),
        }
    };
    for (_, sb) in &variants {
        for _ in 0..3 {
            once(sb);
        }
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for _ in 0..runs {
        for (i, (_, sb)) in variants.iter().enumerate() {
            times[i].push(once(sb));
        }
    }
    println!("tool path `exec /bin/true` (cgroup off), {runs} interleaved runs per variant");
    let mut base_med = 0.0;
    for (i, (name, _)) in variants.iter().enumerate() {
        let med = stats(name, &mut times[i]);
        if i == 0 {
            base_med = med;
        } else {
            println!("{:<44} extra median {:8.3} ms", "", med - base_med);
        }
    }
}
