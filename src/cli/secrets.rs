//! `chitin secrets ...`: manage the encrypted secret store.
//!
//! Values are read from stdin (never from argv). Every reveal, change and identity export is
//! recorded through [`crate::secrets::SecretAudit`] before it happens.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use zeroize::Zeroizing;

use super::{CmdResult, Globals};
use crate::clock::{SystemClock, rfc3339};
use crate::secrets::identity::EnvOrPrompt;
use crate::secrets::{FileSecretAudit, SecretAudit, SecretName, SecretStore, SecretValue};

#[derive(Debug, Subcommand)]
pub enum SecretsCmd {
    /// Store a secret; the value is read from stdin (hidden prompt on a terminal).
    Set {
        /// Secret name (A-Z a-z 0-9 _ . -, starting with a letter).
        name: String,
        /// A host the value may be sent to (repeatable). Omitted: keep the current audience.
        #[arg(long = "audience", value_name = "HOST")]
        audience: Vec<String>,
    },
    /// List names, audiences and created/updated times (never values).
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a secret's value (needs --reveal; the reveal is audited).
    Get {
        name: String,
        /// Really print the value.
        #[arg(long)]
        reveal: bool,
    },
    /// Delete a secret.
    Rm { name: String },
    /// Re-encrypt the store to a newly generated identity.
    RotateKey,
    /// Replace the identity with one read from stdin (restore from a backup).
    ImportIdentity,
    /// Print the identity (private key) for an offline backup.
    ExportIdentity,
    /// Show where the store is and what protects its identity.
    Status,
}

fn who() -> String {
    match crate::secrets::fsutil::effective_uid() {
        Ok(uid) => format!("cli:uid={uid}"),
        Err(_) => "cli".to_string(),
    }
}

fn parse_name(s: &str) -> Result<SecretName, crate::secrets::SecretsError> {
    SecretName::parse(s).map_err(crate::secrets::SecretsError::InvalidName)
}

pub fn run(cmd: SecretsCmd, globals: &Globals) -> CmdResult {
    let cfg = globals.load_config()?.secrets;
    let home = &globals.home;
    let audit = FileSecretAudit::new(home, Arc::new(SystemClock));
    let open = || SecretStore::open(home, &cfg);
    let mut err = std::io::stderr().lock();
    match cmd {
        SecretsCmd::Set { name, audience } => {
            let name = parse_name(&name)?;
            let mut store = open()?;
            let value = read_value(&name)?;
            audit
                .record_change("set", Some(&name), &who())
                .map_err(|e| format!("audit record could not be written ({e}); nothing changed"))?;
            store.set(&name, value, &audience)?;
            let info = store
                .list()
                .into_iter()
                .find(|i| i.name == name)
                .map(|i| i.audience.join(","))
                .unwrap_or_default();
            writeln!(
                err,
                "chitin: stored secret `{name}` (audience: {})",
                none_dash(&info)
            )?;
            writeln!(err, "chitin: identity protected by: {}", store.protection())?;
        }
        SecretsCmd::List { json } => {
            let store = open()?;
            let mut out = std::io::stdout().lock();
            let items = store.list();
            if json {
                for i in &items {
                    let line = serde_json::json!({
                        "name": i.name.as_str(),
                        "audience": i.audience,
                        "created": rfc3339(i.created_ms),
                        "updated": rfc3339(i.updated_ms),
                    });
                    writeln!(out, "{line}")?;
                }
            } else if !items.is_empty() {
                let w = items
                    .iter()
                    .map(|i| i.name.as_str().len())
                    .max()
                    .unwrap_or(4)
                    .max(4);
                let aud: Vec<String> = items
                    .iter()
                    .map(|i| none_dash(&i.audience.join(",")))
                    .collect();
                let aw = aud.iter().map(String::len).max().unwrap_or(8).max(8);
                writeln!(
                    out,
                    "{:<w$}  {:<aw$}  {:<24}  UPDATED",
                    "NAME", "AUDIENCE", "CREATED"
                )?;
                for (i, a) in items.iter().zip(aud) {
                    writeln!(
                        out,
                        "{:<w$}  {:<aw$}  {:<24}  {}",
                        i.name.as_str(),
                        a,
                        rfc3339(i.created_ms),
                        rfc3339(i.updated_ms)
                    )?;
                }
            } else {
                writeln!(err, "chitin: no secrets stored")?;
            }
            writeln!(err, "chitin: identity protected by: {}", store.protection())?;
        }
        SecretsCmd::Get { name, reveal } => {
            let name = parse_name(&name)?;
            if !reveal {
                return Err(format!(
                    "refusing to print the value of `{name}` without --reveal (the reveal is audited)"
                )
                .into());
            }
            let store = open()?;
            let value = store.reveal(&name, &who(), &audit)?;
            let mut out = std::io::stdout().lock();
            out.write_all(value.expose())?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        SecretsCmd::Rm { name } => {
            let name = parse_name(&name)?;
            let mut store = open()?;
            if !store.contains(&name) {
                return Err(crate::secrets::SecretsError::NotFound(name.to_string()).into());
            }
            audit
                .record_change("rm", Some(&name), &who())
                .map_err(|e| format!("audit record could not be written ({e}); nothing changed"))?;
            store.remove(&name)?;
            writeln!(err, "chitin: removed secret `{name}`")?;
        }
        SecretsCmd::RotateKey => {
            let mut store = open()?;
            audit
                .record_change("rotate-key", None, &who())
                .map_err(|e| format!("audit record could not be written ({e}); nothing changed"))?;
            store.rotate_key()?;
            writeln!(
                err,
                "chitin: re-encrypted {} to a new identity ({} secrets); old identity backups no longer open it",
                store.path().display(),
                store.list().len()
            )?;
            writeln!(err, "chitin: identity protected by: {}", store.protection())?;
        }
        SecretsCmd::ImportIdentity => {
            writeln!(
                err,
                "chitin: WARNING: this replaces the identity that protects {}; reading the new \
                 identity from stdin",
                home.join(crate::secrets::STORE_FILE).display()
            )?;
            let mut text = Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| format!("cannot read the identity from stdin: {e}"))?;
            audit
                .record_change("import-identity", None, &who())
                .map_err(|e| format!("audit record could not be written ({e}); nothing changed"))?;
            let store = SecretStore::import_identity(
                home,
                &cfg,
                &text,
                Box::new(EnvOrPrompt),
                Arc::new(SystemClock),
            )?;
            writeln!(
                err,
                "chitin: identity imported ({} secrets readable)",
                store.list().len()
            )?;
            writeln!(err, "chitin: identity protected by: {}", store.protection())?;
        }
        SecretsCmd::ExportIdentity => {
            let store = open()?;
            audit
                .record_change("export-identity", None, &who())
                .map_err(|e| {
                    format!("audit record could not be written ({e}); nothing exported")
                })?;
            let text = store.export_identity()?;
            writeln!(
                err,
                "chitin: WARNING: the text below is the PRIVATE KEY of your secret store. Anyone \
                 with it and {} can read every secret. Keep it offline (a password manager or \
                 paper); never paste it into chat, email, an issue or a repository.",
                store.path().display()
            )?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        SecretsCmd::Status => {
            let store = open()?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "store: {}", store.path().display())?;
            writeln!(out, "secrets: {}", store.list().len())?;
            writeln!(out, "backend: {}", store.protection().backend())?;
            if store.is_initialized() {
                writeln!(out, "identity: {}", store.protection())?;
            } else {
                writeln!(
                    out,
                    "identity: none yet (the first `chitin secrets set` creates it); it will be protected by: {}",
                    store.protection()
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn none_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// Reads the value: a hidden prompt when stdin is a terminal, else all of stdin.
fn read_value(name: &SecretName) -> Result<SecretValue, Box<dyn std::error::Error + Send + Sync>> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let v = rpassword::prompt_password(format!("Value for {name} (input hidden): "))
            .map_err(|e| format!("cannot read the value: {e}"))?;
        return Ok(SecretValue::from_bytes(v.into_bytes()));
    }
    SecretValue::read_from(&mut stdin.lock())
        .map_err(|e| format!("cannot read the value from stdin: {e}").into())
}
