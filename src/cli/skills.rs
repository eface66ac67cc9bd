//! `chitin skills`: sign, install, verify, trust, list and remove signed skills.
//!
//! Contract (checked from outside):
//! - `sign DIR --key KEYFILE` writes `DIR/skill.sigstore.json` (public-key mode) and prints
//!   `signed NAME VERSION DIGEST key=FINGERPRINT`.
//! - `keygen --out KEYFILE` writes KEYFILE (PKCS#8 PEM, 0600; encrypted with
//!   `CHITIN_PASSPHRASE` when set) and KEYFILE.pub (SPKI PEM) and
//!   prints `wrote KEYFILE KEYFILE.pub fingerprint=sha256:<hex>`.
//! - `install PATH` prints `installed NAME VERSION DIGEST signer=SIGNER` and exits 0, or prints
//!   a one-line reason (`unsigned`, `signature invalid: ...`, `file changed: PATH`,
//!   `extra file: PATH`, `untrusted signer: ...`, `policy denied: ids`, `rollback: ...`,
//!   `unsafe archive entry: ...`) and exits 1.
//! - `verify [NAME]` prints `ok NAME VERSION DIGEST` per skill, or `NAME: <reason>`; exit 1
//!   if any failed.
//! - `trust add --key PUBKEY.pem [--name NAME]` / `trust add --issuer URL --subject ID --name
//!   NAME`, `trust list`, `trust remove NAME`.
//! - `list [--json]`, `remove NAME`.
//!
//! Other errors (no state dir, unreadable config, audit log unavailable) exit 2.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chitin_skills::{PublicKey, SecretSigningKey, sign_skill_dir};
use clap::Subcommand;

use super::{CmdResult, Globals};
use crate::clock::{Clock, SystemClock};
use crate::gate::Gate;
use crate::skills_host::{
    PROJECT_KEY_NAME, PROJECT_KEY_PEM, SkillsError, SkillsHost, TrustEntry, user_uid,
};
use crate::state::Home;

#[derive(Debug, Subcommand)]
pub enum SkillsCmd {
    /// Sign a skill directory with an operator key: writes DIR/skill.sigstore.json.
    Sign {
        dir: PathBuf,
        /// PKCS#8 PEM ECDSA P-256 private key (from `chitin skills keygen`)
        #[arg(long, value_name = "KEYFILE")]
        key: PathBuf,
    },
    /// Create a signing key pair: KEYFILE (private, 0600) and KEYFILE.pub.
    Keygen {
        #[arg(long, value_name = "KEYFILE")]
        out: PathBuf,
    },
    /// Verify a skill (directory or .tar.gz/.zip), ask the policy, install it.
    Install {
        path: PathBuf,
        /// Install an older version than the locked one (rollback), or the same version with
        /// other content. Audited.
        #[arg(long)]
        force: bool,
    },
    /// Re-verify installed skills against the lockfile.
    Verify { name: Option<String> },
    /// Manage the trusted signers the default policy consults.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// List installed skills.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove an installed skill.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum TrustCmd {
    /// Trust a public key (--key) or a keyless identity (--issuer and --subject).
    Add {
        #[arg(long, value_name = "PUBKEY.pem", conflicts_with_all = ["issuer", "subject"])]
        key: Option<PathBuf>,
        /// Name of the entry [default for keys: the file name without extension]
        #[arg(long)]
        name: Option<String>,
        /// OIDC issuer URL (keyless), matched exactly
        #[arg(long, requires = "subject")]
        issuer: Option<String>,
        /// Certificate subject (SAN: email or URI) (keyless), matched exactly
        #[arg(long, requires = "issuer")]
        subject: Option<String>,
    },
    /// List trusted signers.
    List,
    /// Remove a trusted signer.
    Remove { name: String },
}

struct Ctx {
    host: SkillsHost,
    gate: Gate,
    /// The user the command line acts as ([cli] operator, default the gateway owner): there
    /// is no `--as`, so the command line cannot decide as someone else.
    operator: String,
}

fn open(globals: &Globals) -> Result<Ctx, Box<dyn std::error::Error + Send + Sync>> {
    let home = Home::open(&globals.home)?;
    // The same gate the gateway uses: policies, the audit log (key from the secret store)
    // and the secrets redactor.
    let rt = super::Runtime::open(globals)?;
    let host = SkillsHost::open(home.root(), &rt.config.skills)?;
    Ok(Ctx {
        host,
        gate: rt.gate,
        operator: rt.config.operator().to_string(),
    })
}

/// A refusal: the one-line reason on stdout, exit 1. Infrastructure errors go to `main`
/// (exit 2).
fn refusal(e: SkillsError) -> CmdResult {
    match e {
        SkillsError::Gate(g) => Err(g.into()),
        SkillsError::State(s) => Err(s.into()),
        SkillsError::Corrupt { .. } => Err(e.into()),
        other => {
            println!("{other}");
            Ok(ExitCode::from(1))
        }
    }
}

pub fn run(cmd: SkillsCmd, globals: &Globals) -> CmdResult {
    match cmd {
        SkillsCmd::Keygen { out } => {
            let key = SecretSigningKey::generate()?;
            let pass = passphrase();
            let pub_path = key.save(&out, pass.as_ref().map(|p| p.as_bytes()))?;
            println!(
                "wrote {} {} fingerprint={}",
                out.display(),
                pub_path.display(),
                key.public_key()?.fingerprint()
            );
            Ok(ExitCode::SUCCESS)
        }
        SkillsCmd::Sign { dir, key } => {
            let config = globals.load_config()?;
            let pass = passphrase();
            let key = SecretSigningKey::load(&key, pass.as_ref().map(|p| p.as_bytes()))?;
            match sign_skill_dir(&dir, &key, &config.skills.limits()) {
                Ok((meta, digest)) => {
                    println!(
                        "signed {} {} {digest} key={}",
                        meta.name,
                        meta.version,
                        key.public_key()?.fingerprint()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    println!("{e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        SkillsCmd::Install { path, force } => {
            let c = open(globals)?;
            match c
                .host
                .install(&c.gate, &c.operator, &path, force, SystemClock.now_ms())
            {
                Ok(i) => {
                    let e = &i.entry;
                    let signer = if e.issuer.is_empty() {
                        e.signer.clone()
                    } else {
                        format!("{} issuer={}", e.signer, e.issuer)
                    };
                    if i.rolled_back {
                        eprintln!("chitin: forced rollback of {} (audited)", e.name);
                    }
                    println!(
                        "installed {} {} {} signer={signer}",
                        e.name, e.version, e.digest
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refusal(e),
            }
        }
        SkillsCmd::Verify { name } => {
            let c = open(globals)?;
            let statuses =
                match c
                    .host
                    .verify_installed(&c.gate, &user_uid(&c.operator), name.as_deref())
                {
                    Ok(s) => s,
                    Err(e) => return refusal(e),
                };
            let mut failed = false;
            for s in &statuses {
                match &s.error {
                    None => println!("ok {} {} {}", s.name, s.version, s.digest),
                    Some(r) => {
                        failed = true;
                        println!("{}: {r}", s.name);
                    }
                }
            }
            if statuses.is_empty() {
                println!("no skills installed");
            }
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        SkillsCmd::List { json } => {
            let config = globals.load_config()?;
            let home = Home::open(&globals.home)?;
            let host = SkillsHost::open(home.root(), &config.skills)?;
            let installed = host.installed()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&installed)?);
            } else if installed.is_empty() {
                println!("no skills installed");
            } else {
                for e in installed {
                    println!("{} {} {} signer={}", e.name, e.version, e.digest, e.signer);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SkillsCmd::Remove { name } => {
            let c = open(globals)?;
            match c.host.remove(&c.gate, &c.operator, &name) {
                Ok(e) => {
                    println!("removed {} {} {}", e.name, e.version, e.digest);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refusal(e),
            }
        }
        SkillsCmd::Trust(t) => trust(t, globals),
    }
}

/// `CHITIN_PASSPHRASE`, when set and non-empty: encrypts keys written by `keygen`, decrypts
/// encrypted keys for `sign`.
fn passphrase() -> Option<zeroize::Zeroizing<String>> {
    std::env::var("CHITIN_PASSPHRASE")
        .ok()
        .filter(|p| !p.is_empty())
        .map(zeroize::Zeroizing::new)
}

fn default_key_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .trim_end_matches(".pub")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect::<String>()
        .trim_matches('-')
        .to_string()
}

fn trust(cmd: TrustCmd, globals: &Globals) -> CmdResult {
    match cmd {
        TrustCmd::Add {
            key,
            name,
            issuer,
            subject,
        } => {
            let entry = match (key, issuer, subject) {
                (Some(k), None, None) => {
                    let pk = PublicKey::load(&k)?;
                    TrustEntry::Key {
                        name: name.unwrap_or_else(|| default_key_name(&k)),
                        fingerprint: pk.fingerprint(),
                        public_key: pk.to_pem(),
                    }
                }
                (None, Some(issuer), Some(subject)) => TrustEntry::Keyless {
                    name: name.ok_or("a keyless trust entry needs --name")?,
                    issuer,
                    subject,
                },
                _ => {
                    return Err("give --key PUBKEY.pem, or --issuer URL --subject ID".into());
                }
            };
            let c = open(globals)?;
            let shown = match &entry {
                TrustEntry::Key {
                    name, fingerprint, ..
                } => format!("trusted {name} key {fingerprint}"),
                TrustEntry::Keyless {
                    name,
                    issuer,
                    subject,
                } => format!("trusted {name} issuer={issuer} subject={subject}"),
            };
            match c.host.trust_add(&c.gate, &c.operator, entry) {
                Ok(()) => {
                    println!("{shown}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refusal(e),
            }
        }
        TrustCmd::List => {
            let config = globals.load_config()?;
            let home = Home::open(&globals.home)?;
            let host = SkillsHost::open(home.root(), &config.skills)?;
            if config.skills.trust_project_key {
                let pk = PublicKey::from_pem(PROJECT_KEY_PEM)?;
                println!("{PROJECT_KEY_NAME} key {} (built in)", pk.fingerprint());
            }
            for e in host.trust_entries()? {
                match e {
                    TrustEntry::Key {
                        name, fingerprint, ..
                    } => println!("{name} key {fingerprint}"),
                    TrustEntry::Keyless {
                        name,
                        issuer,
                        subject,
                    } => println!("{name} keyless issuer={issuer} subject={subject}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TrustCmd::Remove { name } => {
            let c = open(globals)?;
            match c.host.trust_remove(&c.gate, &c.operator, &name) {
                Ok(()) => {
                    println!("removed {name}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => refusal(e),
            }
        }
    }
}
