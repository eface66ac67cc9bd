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
use crate::secrets::{SecretAudit, SecretName, SecretStore, SecretValue};

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
    /// Measure redaction throughput and store latency (BENCHMARKS.secrets.md).
    #[command(hide = true)]
    Bench {
        /// Number of secrets in the store / redactor.
        #[arg(long, default_value_t = 64)]
        secrets: usize,
        /// Size of the text to redact, in KiB.
        #[arg(long, default_value_t = 1024)]
        kib: usize,
    },
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
    if let SecretsCmd::Bench { secrets, kib } = cmd {
        return bench(secrets, kib);
    }
    let cfg = globals.load_config()?.secrets;
    let home = &globals.home;
    let config = globals.load_config()?;
    // Like every command that touches the state dir: refuse group/world-writable state.
    crate::state::Home::open_if_exists(home)?;
    let open = || SecretStore::open(home, &cfg);
    // The audit log's signing key lives in this store, so the log is opened with the store the
    // command already unlocked, and only by commands that record something.
    let audit_with = |store: &mut SecretStore| super::open_audit_with(globals, &config, store);
    // set, rm and reveal are decided for the CLI operator ([cli] operator) before anything is
    // read or changed; the decision is recorded.
    let decided = |store: &mut SecretStore,
                   action: crate::policy::Action|
     -> Result<
        Result<Arc<chitin_audit::AuditLog>, ExitCode>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let gate = super::admin_gate(globals, &config, store)?;
        let audit = Arc::clone(gate.audit());
        match super::operator_may(&gate, &config, action)? {
            None => Ok(Ok(audit)),
            Some(refused) => {
                audit.shutdown()?;
                Ok(Err(refused))
            }
        }
    };
    let reserved = |name: &SecretName| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if crate::secrets::audit_key::is_reserved(name) {
            return Err(format!("`{name}` is reserved for Chitin (names starting with `chitin.`); choose another name").into());
        }
        Ok(())
    };
    let mut err = std::io::stderr().lock();
    match cmd {
        SecretsCmd::Set { name, audience } => {
            let name = parse_name(&name)?;
            reserved(&name)?;
            let mut store = open()?;
            // Input is checked first: a bad value or audience is refused without writing.
            let value = read_value(&name)?;
            store.check_set(&name, &value, &audience)?;
            let audit = match decided(&mut store, crate::policy::Action::SecretSet)? {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
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
            let mut store = open()?;
            let audit = match decided(&mut store, crate::policy::Action::SecretReveal)? {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
            let value = store.reveal(&name, &who(), &*audit)?;
            let mut out = std::io::stdout().lock();
            out.write_all(value.expose())?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        SecretsCmd::Rm { name } => {
            let name = parse_name(&name)?;
            reserved(&name)?;
            let mut store = open()?;
            let audit = match decided(&mut store, crate::policy::Action::SecretRemove)? {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
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
            // Re-encrypting the whole store changes it: decided like setting a secret.
            let mut store = open()?;
            let audit = match decided(&mut store, crate::policy::Action::SecretSet)? {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
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
            // The audit key is inside the store this identity unlocks, so the record follows
            // the import.
            let mut store = SecretStore::import_identity(
                home,
                &cfg,
                &text,
                Box::new(EnvOrPrompt),
                Arc::new(SystemClock),
            )?;
            audit_with(&mut store)?
                .record_change("import-identity", None, &who())
                .map_err(|e| {
                    format!("identity imported, but the audit record could not be written: {e}")
                })?;
            writeln!(
                err,
                "chitin: identity imported ({} secrets readable)",
                store.list().len()
            )?;
            writeln!(err, "chitin: identity protected by: {}", store.protection())?;
        }
        SecretsCmd::ExportIdentity => {
            // The identity opens every secret: decided like revealing one (at least).
            let mut store = open()?;
            let audit = match decided(&mut store, crate::policy::Action::SecretReveal)? {
                Ok(a) => a,
                Err(refused) => return Ok(refused),
            };
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
        SecretsCmd::Bench { .. } => {}
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

/// `chitin secrets bench`: redactor build time and throughput, store set/open latency
/// (X25519 path, plaintext identity so scrypt is not measured), scrypt unlock at the default
/// work factor.
fn bench(count: usize, kib: usize) -> CmdResult {
    use std::time::Instant;

    use crate::config::secrets::{IdentityBackend, SecretsConfig};
    use crate::secrets::identity::FixedPassphrase;

    let dir = std::env::temp_dir().join(format!("chitin-secrets-bench-{}", std::process::id()));
    crate::secrets::fsutil::ensure_dir(&dir)?;
    let result = (|| -> CmdResult {
        let cfg = SecretsConfig {
            backend: IdentityBackend::File,
            allow_plaintext_identity: true,
            ..SecretsConfig::default()
        };
        let clock: Arc<dyn crate::clock::Clock> = Arc::new(SystemClock);
        let pass = || {
            Box::new(FixedPassphrase(age::secrecy::SecretString::from(
                "bench".to_string(),
            )))
        };
        let mut store = SecretStore::open_with(&dir, &cfg, pass(), clock.clone())?;
        let mut set_ms = Vec::new();
        for i in 0..count {
            let name = SecretName::parse(&format!("S{i}")).map_err(|e| e.to_string())?;
            let value =
                SecretValue::from_bytes(format!("sk-bench-{i:04}-{:032x}", i * 7919).into_bytes());
            let t = Instant::now();
            store.set(&name, value, &["api.example.com".to_string()])?;
            set_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let t = Instant::now();
        let reopened = SecretStore::open_with(&dir, &cfg, pass(), clock.clone())?;
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let redactor = reopened.redactor();
        let build_ms = t.elapsed().as_secs_f64() * 1e3;

        // Text with one secret every ~4 KiB, the rest ordinary log text.
        let mut text = String::with_capacity(kib * 1024 + 128);
        let mut i = 0usize;
        while text.len() < kib * 1024 {
            text.push_str("2026-11-21T08:00:00Z INFO agent: tool call finished in 12 ms, 4096 bytes of output; nothing to see here. ");
            if i.is_multiple_of(40) {
                text.push_str(&format!(
                    "sk-bench-{:04}-{:032x} ",
                    (i / 40) % count.max(1),
                    ((i / 40) % count.max(1)) * 7919
                ));
            }
            i += 1;
        }
        let rounds = 5;
        let t = Instant::now();
        let mut redacted_len = 0;
        for _ in 0..rounds {
            redacted_len = redactor.redact(&text).len();
        }
        let secs = t.elapsed().as_secs_f64() / f64::from(rounds);
        let clean = "x".repeat(kib * 1024);
        let t = Instant::now();
        for _ in 0..rounds {
            let _ = redactor.redact(&clean);
        }
        let clean_secs = t.elapsed().as_secs_f64() / f64::from(rounds);

        let t = Instant::now();
        let sealed = crate::secrets::format::encrypt_with_passphrase(
            b"AGE-SECRET-KEY-1BENCH",
            age::secrecy::SecretString::from("bench".to_string()),
            cfg.scrypt_work_factor,
        )?;
        let wrap_ms = t.elapsed().as_secs_f64() * 1e3;
        let keys = crate::secrets::format::DecryptKeys::new(cfg.max_scrypt_work_factor)
            .with_passphrase(age::secrecy::SecretString::from("bench".to_string()));
        let t = Instant::now();
        crate::secrets::format::decrypt_all(&sealed, &keys).map_err(|e| e.to_string())?;
        let unwrap_ms = t.elapsed().as_secs_f64() * 1e3;

        set_ms.sort_by(f64::total_cmp);
        let median = set_ms.get(set_ms.len() / 2).copied().unwrap_or(0.0);
        let mb = (kib as f64) / 1024.0;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "secrets: {count}, store file: {} bytes",
            std::fs::metadata(reopened.path())?.len()
        )?;
        writeln!(
            out,
            "set (encrypt + fsync + rename), median of {count}: {median:.2} ms"
        )?;
        writeln!(
            out,
            "open (read + decrypt + parse {count} secrets): {open_ms:.2} ms"
        )?;
        writeln!(
            out,
            "redactor build ({count} secrets, all encodings): {build_ms:.2} ms, longest pattern {} bytes",
            redactor.max_pattern_len()
        )?;
        writeln!(
            out,
            "redact {kib} KiB with secrets: {:.1} MB/s (output {redacted_len} bytes)",
            mb / secs
        )?;
        writeln!(
            out,
            "redact {kib} KiB without secrets: {:.1} MB/s",
            mb / clean_secs
        )?;
        writeln!(
            out,
            "scrypt identity wrap / unwrap at log_n = {}: {wrap_ms:.0} ms / {unwrap_ms:.0} ms",
            cfg.scrypt_work_factor
        )?;
        Ok(ExitCode::SUCCESS)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
