//! The in-process core several benches build the same way: a private home with the owner in
//! `Group::"owners"`, the policy engine on the default policies, the audit log, the secret
//! store (passphrase backend, cheap scrypt), the vault and `state.db`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use age::secrecy::SecretString;
use chitin::clock::SystemClock;
use chitin::config::secrets::{IdentityBackend, SecretsConfig};
use chitin::gate::Gate;
use chitin::policy::{EngineSpec, PolicyEngine};
use chitin::secrets::SecretStore;
use chitin::secrets::identity::FixedPassphrase;
use chitin::store::Store;
use chitin_audit::AuditLog;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Core {
    /// The home's and the workspace's temporary directories (removed on drop).
    pub dirs: Vec<tempfile::TempDir>,
    pub home: PathBuf,
    /// The workspace, canonical.
    pub ws: PathBuf,
    pub gate: Gate,
    pub vault: chitin::vault::Vault,
    pub store: Arc<Store>,
}

/// Builds the core under `base` (not a temp dir: the sandbox refuses workspaces there).
pub fn core(base: &Path) -> Result<Core, BoxError> {
    let (h, w) = (tempfile::tempdir_in(base)?, tempfile::tempdir_in(base)?);
    let home = h.path().join("home");
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let ents = home.join("entities.json");
    std::fs::write(
        &ents,
        r#"[{"uid":{"type":"Chitin::Group","id":"owners"},"attrs":{},"parents":[]},
            {"uid":{"type":"Chitin::User","id":"owner"},"attrs":{},"parents":[{"type":"Chitin::Group","id":"owners"}]}]"#,
    )?;
    let engine = PolicyEngine::load(EngineSpec {
        policy_dir: None,
        entity_files: vec![ents],
        state_dir: Some(home.clone()),
    })?;
    let audit = Arc::new(AuditLog::open(
        &home,
        chitin_audit::AuditOptions::default(),
    )?);
    let gate = Gate::new(Arc::new(engine), audit);
    let cfg = SecretsConfig {
        backend: IdentityBackend::Passphrase,
        scrypt_work_factor: 10,
        ..SecretsConfig::default()
    };
    let mut secrets = SecretStore::open_with(
        &home,
        &cfg,
        Box::new(FixedPassphrase(SecretString::from("bench"))),
        Arc::new(SystemClock),
    )?;
    let vault = chitin::vault::Vault::from_store(&home, &mut secrets, Arc::new(SystemClock))?;
    let store = Arc::new(Store::open(&home.join("state.db"))?);
    let ws = w.path().canonicalize()?;
    Ok(Core {
        dirs: vec![h, w],
        home,
        ws,
        gate,
        vault,
        store,
    })
}
