//! The library-level set-up the tool tests share (`tests/tools_browser.rs`,
//! `tests/tools_more.rs`): a private state dir with the gateway's pieces (policies, audit log,
//! secret store, vault, state store, gate with the secret redactor) on one manual clock; the
//! real sandbox (this build's `chitin` as launcher); an agent on a fake OpenAI-style model; and
//! helpers to run turns and read what the model was sent.
//!
//! Needs `mod lifecycle_support;` in the including test file (for the private home).
#![allow(dead_code, reason = "each test binary uses a part")]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use age::secrecy::SecretString;
use chitin::agent::{Agent, AgentParts, RunSummary, TurnRequest};
use chitin::approvals::{Approvals, DEFAULT_TTL_MS};
use chitin::clock::{Clock, ManualClock};
use chitin::config::agent::{AgentConfig, BudgetsConfig};
use chitin::config::providers::PricingConfig;
use chitin::config::sandbox::SandboxConfig;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::{CallContext, Gate, Origin};
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::providers::Router;
use chitin::providers::testing::{FakeServer, RecordingSleeper, StaticKeys};
use chitin::secrets::identity::FixedPassphrase;
use chitin::secrets::{SecretStore, SharedSecretStore};
use chitin::store::Store;
use chitin::tools::Sandbox;
use chitin::tools::invoke::{InvokeError, Invoked, invoke};
use chitin_audit::AuditLog;
use serde_json::{Value, json};

use super::lifecycle_support::home as support;

pub struct ToolEnv {
    pub _dirs: Vec<tempfile::TempDir>,
    pub home: PathBuf,
    /// The workspace the tools work in.
    pub ws: PathBuf,
    /// A directory outside the workspace (what the tools must not reach).
    pub outside: PathBuf,
    pub clock: ManualClock,
    pub audit: Arc<AuditLog>,
    pub gate: Gate,
    pub store: Arc<Store>,
    pub vault: Arc<chitin::vault::Vault>,
    pub secrets: SharedSecretStore,
    /// The redactor's longest pattern (the agent's redaction window).
    pub window: usize,
    /// The owners (`Group::"owners"`), the first being the one [`turn`] and [`call`] use by
    /// default in the tests.
    pub owners: Vec<String>,
}

impl ToolEnv {
    /// `owners` in `Group::"owners"`; `policies` writes the policy directory it is given;
    /// `secrets` sets what the tests need in the unlocked secret store.
    pub fn new(
        owners: &[&str],
        policies: impl FnOnce(&Path),
        secrets: impl FnOnce(&mut SecretStore),
    ) -> Self {
        // Not under /tmp: the sandbox gives every command a private /tmp.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let (h, w, o) = (
            tempfile::tempdir_in(base).unwrap(),
            tempfile::tempdir_in(base).unwrap(),
            tempfile::tempdir_in(base).unwrap(),
        );
        let home = support::private_home(h.path(), "home");
        let mut ents = vec![
            json!({"uid": {"type": "Chitin::Group", "id": "owners"}, "attrs": {}, "parents": []}),
        ];
        ents.extend(owners.iter().map(|u| {
            json!({"uid": {"type": "Chitin::User", "id": u}, "attrs": {}, "parents": [{"type": "Chitin::Group", "id": "owners"}]})
        }));
        support::write_private(
            &home.join("entities.json"),
            Value::Array(ents).to_string().as_bytes(),
        );
        let dir = h.path().join("policies");
        policies(&dir);
        let engine = PolicyEngine::load(EngineSpec {
            policy_dir: Some(dir),
            entity_files: vec![home.join("entities.json")],
            state_dir: Some(home.clone()),
        })
        .unwrap();
        let audit = Arc::new(AuditLog::open(&home, chitin_audit::AuditOptions::default()).unwrap());
        let clock = ManualClock::new(chitin::clock::SystemClock.now_ms());
        let mut store = SecretStore::open_with(
            &home,
            &SecretsConfig {
                backend: IdentityBackend::Passphrase,
                scrypt_work_factor: 16,
                ..SecretsConfig::default()
            },
            Box::new(FixedPassphrase(SecretString::from("tools-test-pass"))),
            Arc::new(clock.clone()),
        )
        .unwrap();
        secrets(&mut store);
        let redactor = store.redactor();
        let window = redactor.max_pattern_len();
        let vault = Arc::new(
            chitin::vault::Vault::from_store(&home, &mut store, Arc::new(clock.clone())).unwrap(),
        );
        let state = Arc::new(Store::open(&home.join("state.db")).unwrap());
        Self {
            ws: w.path().canonicalize().unwrap(),
            outside: o.path().canonicalize().unwrap(),
            gate: Gate::new(Arc::new(engine), Arc::clone(&audit))
                .with_redactor(Arc::new(move |s: &str| redactor.redact(s).into_owned())),
            audit,
            store: state,
            vault,
            secrets: SharedSecretStore::new(store),
            home,
            clock,
            window,
            owners: owners.iter().map(|u| (*u).to_string()).collect(),
            _dirs: vec![h, w, o],
        }
    }

    /// The real sandbox (this build's `chitin sandbox exec`), with the prompt-injection marks.
    pub fn sandbox(&self) -> Sandbox {
        let mut sb = Sandbox::current(self.home.clone(), None, SandboxConfig::default()).unwrap();
        sb.launcher = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
        sb.with_prompt_marks(chitin::tools::prompt_guard::PromptMarks::new(Arc::clone(
            &self.store,
        )))
    }

    /// A router with one provider, `fake` (OpenAI-style), at the fake model `s`.
    pub fn router(&self, s: &FakeServer, config: &AgentConfig) -> Router {
        let providers = vec![
            toml::from_str::<chitin::config::providers::ProviderConfig>(&format!(
                "name = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\nmax_attempts = 3\nbackoff_base_ms = 1\nbackoff_max_ms = 2\ntotal_timeout_ms = 5000\nfirst_byte_timeout_ms = 3000\nidle_timeout_ms = 3000",
                s.base_url()
            ))
            .unwrap(),
        ];
        Router::new(
            &providers,
            config,
            &PricingConfig::default(),
            Arc::new(StaticKeys::default()),
            Arc::new(self.clock.clone()),
        )
        .unwrap()
        .with_sleeper(Arc::new(RecordingSleeper::default()))
    }

    /// The agent on the fake model `s` (`fake/m1`), with `sandbox` as its tools.
    pub fn agent(&self, s: &FakeServer, sandbox: Sandbox) -> Agent {
        let config = AgentConfig {
            model: "fake/m1".into(),
            ..AgentConfig::default()
        };
        let router = self.router(s, &config);
        Agent::new(AgentParts {
            gate: self.gate.clone(),
            store: Arc::clone(&self.store),
            approvals: Approvals::new(
                Arc::clone(&self.store),
                self.gate.clone(),
                Arc::new(self.clock.clone()),
                DEFAULT_TTL_MS,
            ),
            sandbox,
            workspace: self.ws.clone(),
            router: Some(Arc::new(router)),
            sealer: Arc::clone(&self.vault) as Arc<dyn chitin::agent::Sealer>,
            clock: Arc::new(self.clock.clone()),
            config,
            budgets: BudgetsConfig::default(),
            owners: self.owners.clone(),
            skills: None,
            redaction_window: self.window,
        })
    }

    /// A model-originated call of `user` in `session`.
    pub fn call(&self, user: &str, session: &str, tainted: bool) -> CallContext {
        CallContext {
            user: user.into(),
            origin: Origin::Model,
            session: session.into(),
            workspace: self.ws.clone(),
            tainted,
        }
    }

    /// `invoke` on a blocking thread of the test's runtime (the tools that talk to the network
    /// need it).
    pub async fn invoke_bg(
        &self,
        sb: &Sandbox,
        c: &CallContext,
        tool: &str,
        args: Value,
    ) -> Result<Invoked, InvokeError> {
        let (g, sb, c, tool) = (self.gate.clone(), sb.clone(), c.clone(), tool.to_string());
        tokio::task::spawn_blocking(move || invoke(&g, &sb, &c, &tool, &args, None))
            .await
            .unwrap()
    }
}

/// A turn of `user` in `session` that waits for no approval.
pub fn turn(user: &str, session: &str, text: &str) -> TurnRequest {
    TurnRequest {
        session: session.into(),
        user: user.into(),
        channel: "test".into(),
        text: text.into(),
        approval_wait: Some(Duration::ZERO),
        origin: None,
    }
}

/// Submits the turn and waits (up to `secs`) for its summary.
pub async fn run(a: &Agent, t: TurnRequest, secs: u64) -> RunSummary {
    let id = a.submit(t).await.unwrap();
    a.wait(&id, Duration::from_secs(secs)).await.unwrap()
}

/// (tool, decision) of each call of the run.
pub fn decisions(s: &RunSummary) -> Vec<(String, String)> {
    s.tool_calls
        .iter()
        .map(|c| (c.tool.clone(), c.decision.clone()))
        .collect()
}

/// The body of the model request `i`, as text.
pub fn sent(s: &FakeServer, i: usize) -> String {
    s.requests()[i].body.to_string()
}

/// The tool names offered in the first model request.
pub fn offered(s: &FakeServer) -> Vec<String> {
    s.requests()[0].body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// The output of a call that ran with exit 0.
pub fn ran(r: Result<Invoked, InvokeError>) -> Value {
    match r {
        Ok(Invoked::Ran { result, .. }) => {
            assert_eq!(result.exit_code, Some(0), "{result:?}");
            result.output.unwrap()
        }
        other => panic!("expected a run, got {other:?}"),
    }
}
