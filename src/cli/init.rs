//! `chitin init`: creates the state directory, a documented default config, the default
//! policies and entities, and the store. Idempotent; never overwrites an operator's edits.

use std::process::ExitCode;

use super::{CmdResult, Globals};
use crate::policy::{self, builtin};
use crate::state::Home;
use crate::store::Store;

/// The owner of a fresh install: `User::"owner"` in `Group::"owners"`.
const DEFAULT_ENTITIES: &str = r#"[
  {
    "uid": { "type": "Chitin::Group", "id": "owners" },
    "attrs": {},
    "parents": []
  },
  {
    "uid": { "type": "Chitin::User", "id": "owner" },
    "attrs": {},
    "parents": [{ "type": "Chitin::Group", "id": "owners" }]
  }
]
"#;

pub fn run(globals: &Globals) -> CmdResult {
    init(globals, true)
}

/// `chitin init` without the secret store: the gateway's first start, which opens the store
/// itself right after (one passphrase prompt, not two).
pub fn run_files(globals: &Globals) -> CmdResult {
    init(globals, false)
}

fn init(globals: &Globals, with_secrets: bool) -> CmdResult {
    let home = Home::create(&globals.home)?;
    let report = |what: &str, path: &std::path::Path, created: bool| {
        println!(
            "{} {what} {}",
            if created { "created" } else { "kept   " },
            path.display()
        );
    };

    // The config file (it may live outside the state dir with --config).
    let created = write_config_if_absent(globals)?;
    report("config  ", &globals.config_path, created);
    let config = globals.load_config()?;

    // Default policies: installed only when the policy directory does not exist yet, so a
    // removed or edited default is never brought back.
    let policy_dir = super::policy::resolve_in_home(&home, &config.policy.dir);
    if policy_dir.exists() {
        report("policies", &policy_dir, false);
    } else {
        let home_for_dir = Home::create(&policy_dir)?; // creates it 0700 and checks it
        for (name, text) in builtin::DEFAULT_POLICIES {
            home_for_dir.write_if_absent(name, text.as_bytes())?;
        }
        report("policies", &policy_dir, true);
    }

    let entities = super::policy::resolve_in_home(&home, &config.policy.entities);
    let created = if entities.starts_with(home.root()) {
        let rel = entities.strip_prefix(home.root()).unwrap_or(&entities);
        home.write_if_absent(rel, DEFAULT_ENTITIES.as_bytes())?
    } else {
        false
    };
    report("entities", &entities, created);

    let db = home.path("state.db");
    let existed = db.exists();
    let store = Store::open(&db)?;
    report("store   ", &db, !existed);
    if store.meta("created_at")?.is_none() {
        store.set_meta(
            "created_at",
            &crate::clock::rfc3339(crate::clock::Clock::now_ms(&crate::clock::SystemClock)),
        )?;
    }

    // The installed policies must validate: init never leaves a set the gateway would refuse.
    let input = policy::PolicyInput::from_dir(&policy_dir)?;
    match policy::compile(&input) {
        Ok(c) => println!(
            "policies valid: {} enforced, {} shadow, {} files",
            c.enforced_count(),
            c.shadow_count(),
            c.files().len()
        ),
        Err(e) => {
            eprintln!("chitin: {e}");
            return Ok(ExitCode::from(1));
        }
    }
    // What the gateway would create on its first start, so that `chitin token show`, the
    // audit commands and backups work right after `init`: the encrypted secret store (it asks
    // for a passphrase, or reads CHITIN_PASSPHRASE), the gateway token, the audit log with its
    // checkpoint key, the data-key vault's master key and the workflow resume-token key.
    drop(store);
    if with_secrets {
        match secret_material(globals, &config, &home) {
            Ok(()) => {}
            // No passphrase can be had (no CHITIN_PASSPHRASE, no terminal): nothing of the
            // secret store was written; the rest of the set-up stands. Said exactly, with how
            // to finish it.
            Err(e)
                if matches!(
                    e.downcast_ref::<crate::secrets::SecretsError>(),
                    Some(crate::secrets::SecretsError::PassphraseUnavailable(_))
                ) =>
            {
                eprintln!(
                    "chitin: the secret store and the gateway token were not created ({e}); run `chitin init` again with CHITIN_PASSPHRASE set or on a terminal (the gateway's first start and `chitin token show` also create them)"
                );
                println!("skipped secrets  (no passphrase)");
            }
            Err(e) => return Err(e),
        }
    }
    home.check_permissions()?;
    println!("Chitin is initialised in {}", home.root().display());
    Ok(ExitCode::SUCCESS)
}

/// Creates (or keeps) the secret store and the keys in it, and the audit log, reporting each.
fn secret_material(
    globals: &Globals,
    config: &crate::config::Config,
    home: &Home,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    use crate::secrets::gateway_token;
    let mut secrets = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let (_token, created) = gateway_token::ensure(&mut secrets)?;
    let audit = super::open_audit_with(globals, config, &mut secrets)?;
    if created {
        audit
            .append(chitin_audit::RecordInput::admin(
                "cli:init",
                "gateway.token.create",
                format!("secret:{}", gateway_token::GATEWAY_TOKEN_SECRET),
                serde_json::json!({}),
            ))
            .map_err(|e| format!("audit record could not be written: {e}"))?;
    }
    drop(crate::vault::Vault::from_store(
        &globals.home,
        &mut secrets,
        std::sync::Arc::new(crate::clock::SystemClock),
    )?);
    drop(crate::workflow_runner::TokenKey::from_store(&mut secrets)?);
    audit.shutdown().map_err(|e| e.to_string())?;
    let store_path = secrets.path().to_path_buf();
    println!(
        "{} secrets  {}",
        if created { "created" } else { "kept   " },
        store_path.display()
    );
    println!(
        "{} token    (`chitin token show` prints it)",
        if created { "created" } else { "kept   " }
    );
    println!("ready    audit    {}", home.path("audit.db").display());
    Ok(())
}

fn write_config_if_absent(
    globals: &Globals,
) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&globals.config_path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => {
            return Err(format!("cannot create {}: {e}", globals.config_path.display()).into());
        }
    };
    f.write_all(crate::config::default_toml().as_bytes())?;
    f.sync_all()?;
    Ok(true)
}
