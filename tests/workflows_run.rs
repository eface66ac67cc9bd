//! The workflow runner in process, every step through the real gate, sandbox and audit log:
//! runs, injection attempts, policy denials, approval gates and their resume tokens (modified,
//! expired under a manual clock, reused, with the file changed), approvers, input gates,
//! retries, timeouts, parallel branches, loops, sub-workflows and cycles, `cost_limit`, the
//! model's own workflow files.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/home.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use age::secrecy::SecretString;
use chitin::clock::{Clock, ManualClock};
use chitin::config::agent::{AgentConfig, BudgetsConfig};
use chitin::config::providers::{ModelPrice, PricingConfig};
use chitin::config::sandbox::SandboxConfig;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::{Gate, Origin};
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::providers::Router;
use chitin::providers::testing::{FakeOpenAi, FakeServer, RecordingSleeper, Reply, StaticKeys, Step};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;
use chitin::tools::Sandbox;
use chitin::workflow_runner::{
    Envelope, Intent, ResumeKey, ResumeRequest, Runner, RunnerParts, StartRequest, TokenKey,
};
use chitin_audit::AuditLog;
use serde_json::{Value, json};

const TTL_MS: i64 = 24 * 60 * 60 * 1000;

struct Env {
    _dirs: Vec<tempfile::TempDir>,
    home: PathBuf,
    ws: PathBuf,
    clock: ManualClock,
    gate: Gate,
    store: Arc<Store>,
    vault: Arc<chitin::vault::Vault>,
    sleeper: Arc<RecordingSleeper>,
}

/// Owners `owner` and `alice`; `mallory` in no group. `extra_policy`: a Cedar file added to the
/// defaults.
fn env_with(extra_policy: Option<&str>) -> Env {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (h, w) = (
        tempfile::tempdir_in(base).unwrap(),
        tempfile::tempdir_in(base).unwrap(),
    );
    let home = support::private_home(h.path(), "home");
    let ents = json!([
        {"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Chitin::User", "id": "owner"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "alice"}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]},
        {"uid": {"type": "Chitin::User", "id": "mallory"}, "attrs": {}, "parents": []}
    ]);
    support::write_private(&home.join("entities.json"), ents.to_string().as_bytes());
    let policy_dir = extra_policy.map(|extra| {
        let d = h.path().join("policies");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("schema.cedarschema"), chitin::policy::builtin::SCHEMA).unwrap();
        for (name, text) in chitin::policy::builtin::DEFAULT_POLICIES {
            std::fs::write(d.join(name), text).unwrap();
        }
        std::fs::write(d.join("zz-test.cedar"), extra).unwrap();
        d
    });
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir,
        entity_files: vec![home.join("entities.json")],
        state_dir: Some(home.clone()),
    })
    .unwrap();
    let audit = Arc::new(AuditLog::open(&home, chitin_audit::AuditOptions::default()).unwrap());
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 16,
        ..SecretsConfig::default()
    };
    let clock = ManualClock::new(chitin::clock::SystemClock.now_ms());
    let mut secrets = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from("wf-test-pass"))),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let vault = Arc::new(
        chitin::vault::Vault::from_store(&home, &mut secrets, Arc::new(clock.clone())).unwrap(),
    );
    let store = Arc::new(Store::open(&home.join("state.db")).unwrap());
    Env {
        ws: w.path().canonicalize().unwrap(),
        gate: Gate::new(Arc::new(engine), audit),
        store,
        vault,
        home,
        clock,
        sleeper: Arc::new(RecordingSleeper::default()),
        _dirs: vec![h, w],
    }
}

fn env() -> Env {
    env_with(None)
}

struct Model {
    router: Option<Arc<Router>>,
    budgets: BudgetsConfig,
}

fn no_model() -> Model {
    Model {
        router: None,
        budgets: BudgetsConfig::default(),
    }
}

/// A router over a fake OpenAI server, `$1` per million input and output tokens.
fn model(e: &Env, s: &FakeServer) -> Model {
    let p: chitin::config::providers::ProviderConfig = toml::from_str(&format!(
        "name = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\nmax_attempts = 1\nbackoff_base_ms = 1\nbackoff_max_ms = 2\ntotal_timeout_ms = 5000\nfirst_byte_timeout_ms = 3000\nidle_timeout_ms = 3000",
        s.base_url()
    ))
    .unwrap();
    let mut pricing = PricingConfig::default();
    pricing.0.insert(
        "fake/m1".into(),
        ModelPrice {
            input_per_mtok: 1_000_000.0,
            output_per_mtok: 0.0,
        },
    );
    let config = AgentConfig {
        model: "fake/m1".into(),
        ..AgentConfig::default()
    };
    let router = Router::new(
        &[p],
        &config,
        &pricing,
        Arc::new(StaticKeys::default()),
        Arc::new(e.clock.clone()),
    )
    .unwrap()
    .with_sleeper(Arc::new(RecordingSleeper::default()));
    Model {
        router: Some(Arc::new(router)),
        budgets: BudgetsConfig::default(),
    }
}

fn runner_with(e: &Env, m: Model) -> Runner {
    let mut sb = Sandbox::current(e.home.clone(), None, SandboxConfig::default()).unwrap();
    sb.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    Runner::new(RunnerParts {
        gate: e.gate.clone(),
        store: Arc::clone(&e.store),
        sandbox: sb,
        workspace: e.ws.clone(),
        library: Vec::new(),
        router: m.router,
        sealer: Arc::clone(&e.vault) as Arc<dyn chitin::agent::Sealer>,
        clock: Arc::new(e.clock.clone()),
        sleeper: e.sleeper.clone(),
        token_key: TokenKey::from_bytes([42; 32]),
        token_ttl_ms: TTL_MS,
        budgets: m.budgets,
        max_steps: 1000,
        events: None,
    })
}

fn runner(e: &Env) -> Runner {
    runner_with(e, no_model())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn write(e: &Env, name: &str, text: &str) {
    let p = e.ws.join(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, text).unwrap();
}

fn start_as(r: &Runner, file: &str, args: Value, who: &str, origin: Origin) -> Envelope {
    rt().block_on(r.start(StartRequest {
        file: file.into(),
        args: Some(args),
        principal: who.into(),
        origin,
        session: None,
        tainted: false,
    }))
}

fn start(r: &Runner, file: &str, args: Value) -> Envelope {
    start_as(r, file, args, "owner", Origin::User)
}

fn resume(r: &Runner, key: ResumeKey, intent: Intent, who: &str) -> Envelope {
    rt().block_on(r.resume(ResumeRequest {
        key,
        intent,
        principal: who.into(),
        origin: Origin::User,
    }))
}

fn token(env: &Envelope) -> String {
    let v = &env.value;
    v["requiresApproval"]["resumeToken"]
        .as_str()
        .or_else(|| v["requiresInput"]["resumeToken"].as_str())
        .unwrap_or_else(|| panic!("no token in {v}"))
        .to_string()
}

fn error_message(env: &Envelope) -> String {
    assert_eq!(env.value["ok"], json!(false), "{}", env.value);
    env.value["error"]["message"].as_str().unwrap().to_string()
}

fn ok_output(env: &Envelope) -> Vec<Value> {
    assert_eq!(env.status(), "ok", "{}", env.value);
    env.value["output"].as_array().unwrap().clone()
}

// ---- runs -----------------------------------------------------------------------------------

#[test]
fn a_workflow_runs_its_steps_in_the_sandbox_and_returns_lobsters_envelope() {
    let e = env();
    write(
        &e,
        "hello.lobster",
        "name: hello\nargs:\n  who: {default: world}\nsteps:\n  - id: greet\n    run: printf 'hello %s' ${who}\n  - id: shout\n    stdin: $greet.stdout\n    run: tr a-z A-Z\n",
    );
    let env = start(&runner(&e), "hello.lobster", json!({"who": "chitin"}));
    assert_eq!(ok_output(&env), vec![json!("HELLO CHITIN")]);
    let v = &env.value;
    assert_eq!(v["protocolVersion"], json!(1));
    assert!(v["requiresApproval"].is_null() && v["requiresInput"].is_null());
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["protocolVersion", "ok", "status", "output", "requiresApproval", "requiresInput"]
    );
    // Each step was an `exec` decision for the owner, as automation, naming the workflow.
    let show = runner(&e).show(env.run_id.as_deref().unwrap()).unwrap();
    assert_eq!(show["status"], "ok");
    assert_eq!(show["steps"].as_array().unwrap().len(), 2);
}

#[test]
fn a_substituted_argument_stays_one_argv_word_through_the_sandbox() {
    let e = env();
    write(
        &e,
        "inject.lobster",
        "args:\n  x: {}\nsteps:\n  - id: show\n    run: printf '[%s]' ${x} \"${x}\"\n  - id: count\n    run: sh -c 'echo $#' count ${x}\n",
    );
    let attack = "\"; touch pwned #";
    let env = start(&runner(&e), "inject.lobster", json!({"x": attack}));
    assert_eq!(ok_output(&env), vec![json!(1)]);
    let show = runner(&e).show(env.run_id.as_deref().unwrap()).unwrap();
    let first = show["steps"][0]["result"]["stdout"].as_str().unwrap();
    assert_eq!(first, format!("[{attack}][{attack}]"));
    assert!(
        !e.ws.join("pwned").exists(),
        "the injected command ran in the workspace"
    );
    // The same value in the environment, as Lobster gives it.
    write(
        &e,
        "env.lobster",
        "args:\n  x: {}\nsteps:\n  - id: e\n    run: printf '%s' \"$LOBSTER_ARG_X\"\n",
    );
    let env = start(&runner(&e), "env.lobster", json!({"x": attack}));
    assert_eq!(ok_output(&env), vec![json!(attack)]);
}

#[test]
fn a_step_that_reads_the_state_dir_is_denied_by_policy_with_its_id() {
    let e = env();
    write(
        &e,
        "steal.lobster",
        &format!(
            "steps:\n  - id: steal\n    run: cat {}/state.db\n",
            e.home.display()
        ),
    );
    let env = start(&runner(&e), "steal.lobster", json!({}));
    let m = error_message(&env);
    assert!(m.contains("workflow step `steal` failed"), "{m}");
    assert!(m.contains("guard.state-dir-off-limits"), "{m}");
    assert_eq!(env.exit_code(), 1);
}

#[test]
fn steps_get_the_sandbox_environment_and_the_declared_env_never_the_gateways() {
    let e = env();
    // SAFETY-free: the test process's own environment, which a step must not see.
    write(
        &e,
        "env.lobster",
        "env:\n  GREETING: hi\nsteps:\n  - id: e\n    env:\n      EXTRA: there\n    run: env | sort\n",
    );
    let env = start(&runner(&e), "env.lobster", json!({}));
    let out = ok_output(&env)[0].as_str().unwrap().to_string();
    assert!(out.contains("GREETING=hi\n"), "{out}");
    assert!(out.contains("EXTRA=there\n"), "{out}");
    assert!(out.contains("LOBSTER_ARGS_JSON={}\n"), "{out}");
    assert!(!out.contains("CARGO"), "{out}");
    assert!(!out.contains("CHITIN_HOME"), "{out}");
}

#[test]
fn a_file_that_does_not_parse_is_a_parse_error_with_exit_code_2() {
    let e = env();
    write(&e, "bad.lobster", "steps:\n  - id: a\n    runn: true\n");
    let env = start(&runner(&e), "bad.lobster", json!({}));
    assert_eq!(env.value["error"]["type"], "parse_error", "{}", env.value);
    assert_eq!(env.exit_code(), 2);
    assert!(error_message(&env).contains("bad.lobster:3:5"));
}

#[test]
fn a_user_who_is_not_an_owner_cannot_run_a_workflow() {
    let e = env();
    write(&e, "w.lobster", "steps:\n  - id: a\n    run: 'true'\n");
    let env = start_as(&runner(&e), "w.lobster", json!({}), "mallory", Origin::User);
    let m = error_message(&env);
    assert!(m.contains("policy denied running workflow `w`"), "{m}");
    assert!(env.run_id.is_none());
}
