//! Skills on the gateway side: install, lockfile, trust list, re-verification at start-up and
//! before each use, and the Cedar requests (`skill.install`, `skill.load`) that decide.
//!
//! State (all under `$CHITIN_HOME/skills/`, 0700):
//! - `trust.json` (0600): the operator's trusted signers, changed only through
//!   [`SkillsHost::trust_add`] / [`SkillsHost::trust_remove`] (the `chitin skills trust`
//!   commands). The state dir is off limits to every tool (`guard.state-dir-off-limits`), so
//!   neither a skill nor the model can edit it. The project key is trusted on top when
//!   `skills.trust_project_key` is set.
//! - `lock.json` (0600): name → version, digest, signer of each installed skill.
//! - `store/<name>/<digest hex>/`: the verified copy, files 0444 and directories 0555.
//!
//! Invariants:
//! - Nothing is installed or loaded without a verified signature over every file, a Cedar
//!   allow for the `Skill` entity built from that verification, and an audit record.
//! - The copy in the store is verified again after copying (the source could change between
//!   verification and copy), and must have the digest that was decided on.
//! - A skill whose files changed on disk is refused at load and reported by
//!   [`SkillsHost::verify_installed`] (which the gateway's `/ready` uses).
//! - A skill's instructions are untrusted data: [`LoadedSkill::instructions`] must enter the
//!   model context marked as such and taint the session; scripts a skill runs go through the
//!   gate and the sandbox like any other tool call (a signature grants no capability).

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chitin_audit::{Kind, RecordInput};
use chitin_skills::signature::Signer;
use chitin_skills::{
    BUNDLE_FILE, Limits, PublicKey, SkillError, SkillMeta, TrustRoot, TrustedSigner, VerifiedSkill,
    Version, archive, verify_skill_dir,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::config::skills::SkillsConfig;
use crate::gate::{Gate, GateError, Verdict};
use crate::policy::PolicyRequest;
use crate::state::{StateError, write_atomic};

/// The Chitin project's skill-signing public key (the private key is kept offline).
pub const PROJECT_KEY_PEM: &str = include_str!("../skills/keys/chitin-project.pub");
/// The trust-list name of the project key.
pub const PROJECT_KEY_NAME: &str = "chitin-project";

/// Errors of the skills host. `Display` is the one-line reason `chitin skills` prints.
#[derive(Debug, thiserror::Error)]
pub enum SkillsError {
    /// The skill itself was refused (unsigned, signature invalid, file changed, ...).
    #[error(transparent)]
    Skill(#[from] SkillError),
    /// The signature is valid but the signer is not trusted, and policy refused it.
    #[error("untrusted signer: {0}")]
    UntrustedSigner(String),
    /// Cedar denied (the ids of the determining policies).
    #[error("policy denied: {}", if .0.is_empty() { "no policy permits it".to_string() } else { .0.join(", ") })]
    PolicyDenied(Vec<String>),
    /// An older version than the locked one, or the same version with other content.
    #[error("rollback: {0}")]
    Rollback(String),
    /// The installed copy no longer matches the lockfile.
    #[error("digest changed: {name} is locked at {locked}, the store has {found}")]
    DigestChanged {
        name: String,
        locked: String,
        found: String,
    },
    #[error("not installed: {0}")]
    NotInstalled(String),
    #[error("trust: {0}")]
    Trust(String),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("skills state {path} is corrupt: {message}; fix or remove the file")]
    Corrupt { path: PathBuf, message: String },
}

fn io(path: &Path, source: std::io::Error) -> SkillsError {
    SkillsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One installed skill in `lock.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockEntry {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// Certificate subject, or key fingerprint.
    pub signer: String,
    /// OIDC issuer, `""` in key mode.
    pub issuer: String,
    pub transparency: bool,
    pub installed_at_ms: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Lockfile {
    skills: BTreeMap<String, LockEntry>,
}

/// One trusted signer in `trust.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum TrustEntry {
    Key {
        name: String,
        fingerprint: String,
        public_key: String,
    },
    Keyless {
        name: String,
        issuer: String,
        subject: String,
    },
}

impl TrustEntry {
    pub fn name(&self) -> &str {
        match self {
            Self::Key { name, .. } | Self::Keyless { name, .. } => name,
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrustFile {
    signers: Vec<TrustEntry>,
}

/// A successful install.
#[derive(Debug, Clone)]
pub struct Installed {
    pub entry: LockEntry,
    /// Replaced a newer version (only with `force`).
    pub rolled_back: bool,
    /// The Rekor log index of a transparency-logged signature.
    pub log_index: Option<i64>,
}

/// A skill ready for use: verified against the lockfile and allowed by `skill.load`.
#[derive(Debug, Clone)]
pub struct LoadedSkill {
    pub entry: LockEntry,
    pub meta: SkillMeta,
    /// The read-only verified copy.
    pub dir: PathBuf,
}

impl LoadedSkill {
    /// The Markdown instructions. UNTRUSTED DATA: put them into the model context only as
    /// untrusted content, and mark the session tainted.
    pub fn instructions(&self) -> &str {
        &self.meta.instructions
    }

    /// Every file of the verified copy in the skills store (never the workspace), as
    /// `(relative path, content)` sorted by path; a symlink or special file is refused.
    pub fn files(&self) -> Result<Vec<(PathBuf, Vec<u8>)>, SkillsError> {
        fn walk(
            dir: &Path,
            rel: &Path,
            out: &mut Vec<(PathBuf, Vec<u8>)>,
        ) -> Result<(), SkillsError> {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| io(dir, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| io(dir, e))?;
            entries.sort_by_key(std::fs::DirEntry::file_name);
            for e in entries {
                let (p, r) = (e.path(), rel.join(e.file_name()));
                let meta = std::fs::symlink_metadata(&p).map_err(|e| io(&p, e))?;
                if meta.is_dir() {
                    walk(&p, &r, out)?;
                } else if meta.is_file() {
                    out.push((r, std::fs::read(&p).map_err(|e| io(&p, e))?));
                } else {
                    return Err(SkillError::FileChanged(r.to_string_lossy().into_owned()).into());
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        walk(&self.dir, Path::new(""), &mut out)?;
        Ok(out)
    }
}

/// The result of re-verifying one installed skill.
#[derive(Debug, Clone, Serialize)]
pub struct SkillStatus {
    pub name: String,
    pub version: String,
    pub digest: String,
    /// `None` when it verified; else the one-line reason.
    pub error: Option<String>,
}

/// Install, verify, load and remove skills; manage the trust list.
#[derive(Debug)]
pub struct SkillsHost {
    dir: PathBuf,
    config: SkillsConfig,
    root: TrustRoot,
    limits: Limits,
}

impl SkillsHost {
    /// Opens (creating `skills/` 0700 when missing) the skills state under `home`.
    pub fn open(home: &Path, config: &SkillsConfig) -> Result<Self, SkillsError> {
        let dir = home.join("skills");
        for d in [dir.clone(), dir.join("store")] {
            if !d.exists() {
                std::fs::create_dir_all(&d).map_err(|e| io(&d, e))?;
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))
                    .map_err(|e| io(&d, e))?;
            }
        }
        let root = if config.trusted_root.is_empty() {
            TrustRoot::production()?
        } else {
            TrustRoot::from_file(Path::new(&config.trusted_root))?
        };
        Ok(Self {
            dir,
            config: config.clone(),
            root,
            limits: config.limits(),
        })
    }

    /// An exclusive lock on the skills state for one read-modify-write (install, remove,
    /// trust changes): concurrent `chitin skills` runs and the gateway never lose an update.
    fn exclusive(&self) -> Result<std::fs::File, SkillsError> {
        let p = self.dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| io(&p, e))?;
        f.lock().map_err(|e| io(&p, e))?;
        Ok(f)
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("lock.json")
    }

    fn trust_path(&self) -> PathBuf {
        self.dir.join("trust.json")
    }

    fn read_json<T: Default + for<'de> Deserialize<'de>>(
        &self,
        path: &Path,
    ) -> Result<T, SkillsError> {
        match std::fs::read_to_string(path) {
            Ok(t) => serde_json::from_str(&t).map_err(|e| SkillsError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(io(path, e)),
        }
    }

    fn write_json<T: Serialize>(&self, path: &Path, v: &T) -> Result<(), SkillsError> {
        let mut text = serde_json::to_string_pretty(v).map_err(|e| SkillsError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        Ok(())
    }

    /// Reads `lock.json`; names and digests are checked, since they become paths in the store.
    fn lockfile(&self) -> Result<Lockfile, SkillsError> {
        let lock: Lockfile = self.read_json(&self.lock_path())?;
        for (k, e) in &lock.skills {
            let hexd = e.digest.strip_prefix("sha256:").unwrap_or("");
            let digest_ok = hexd.len() == 64
                && hexd
                    .bytes()
                    .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
            if k != &e.name || chitin_skills::skillmd::check_name(k).is_err() || !digest_ok {
                return Err(SkillsError::Corrupt {
                    path: self.lock_path(),
                    message: format!("entry {k:?} has an invalid name or digest"),
                });
            }
        }
        Ok(lock)
    }

    /// The installed skills, by name.
    pub fn installed(&self) -> Result<Vec<LockEntry>, SkillsError> {
        Ok(self.lockfile()?.skills.into_values().collect())
    }

    /// The operator's trust entries (without the project key).
    pub fn trust_entries(&self) -> Result<Vec<TrustEntry>, SkillsError> {
        Ok(self.read_json::<TrustFile>(&self.trust_path())?.signers)
    }

    /// The effective trust list: the project key (if configured) and the operator's entries.
    pub fn trusted_signers(&self) -> Result<Vec<TrustedSigner>, SkillsError> {
        let mut out = Vec::new();
        if self.config.trust_project_key {
            let key = PublicKey::from_pem(PROJECT_KEY_PEM)
                .map_err(|e| SkillsError::Trust(format!("built-in project key: {e}")))?;
            out.push(TrustedSigner::Key {
                name: PROJECT_KEY_NAME.into(),
                key,
            });
        }
        for e in self.trust_entries()? {
            out.push(match e {
                TrustEntry::Key {
                    name, public_key, ..
                } => TrustedSigner::Key {
                    key: PublicKey::from_pem(&public_key).map_err(|why| SkillsError::Corrupt {
                        path: self.trust_path(),
                        message: format!("key {name}: {why}"),
                    })?,
                    name,
                },
                TrustEntry::Keyless {
                    name,
                    issuer,
                    subject,
                } => TrustedSigner::Keyless {
                    name,
                    issuer,
                    subject,
                },
            });
        }
        Ok(out)
    }

    /// Adds a trusted signer (names are unique; `chitin-project` is reserved). Audited.
    /// `principal` must be allowed `config.write` on the gateway (owners, by default).
    pub fn trust_add(
        &self,
        gate: &Gate,
        principal: &str,
        entry: TrustEntry,
    ) -> Result<(), SkillsError> {
        let actor = &user_uid(principal);
        let name = entry.name().to_string();
        let _guard = self.exclusive()?;
        let result = (|| {
            admin_check(gate, principal)?;
            chitin_skills::skillmd::check_name(&name).map_err(|_| {
                SkillsError::Trust(format!(
                    "name {name:?} must be 1-64 characters of a-z, 0-9 and single hyphens"
                ))
            })?;
            if name == PROJECT_KEY_NAME {
                return Err(SkillsError::Trust(format!(
                    "{PROJECT_KEY_NAME} is reserved"
                )));
            }
            if let TrustEntry::Keyless {
                issuer, subject, ..
            } = &entry
                && (issuer.is_empty() || subject.is_empty())
            {
                return Err(SkillsError::Trust(
                    "a keyless identity needs both --issuer and --subject (matched exactly)".into(),
                ));
            }
            let mut file: TrustFile = self.read_json(&self.trust_path())?;
            if file.signers.iter().any(|e| e.name() == name) {
                return Err(SkillsError::Trust(format!(
                    "{name} is already trusted; remove it first"
                )));
            }
            file.signers.push(entry.clone());
            self.write_json(&self.trust_path(), &file)
        })();
        let payload = serde_json::to_value(&entry).unwrap_or(Value::Null);
        audit_admin(gate, actor, "skills.trust.add", &name, payload, &result)?;
        result
    }

    /// Removes a trusted signer. Audited.
    /// `principal` must be allowed `config.write` on the gateway (owners, by default).
    pub fn trust_remove(
        &self,
        gate: &Gate,
        principal: &str,
        name: &str,
    ) -> Result<(), SkillsError> {
        let actor = &user_uid(principal);
        let _guard = self.exclusive()?;
        let result = (|| {
            admin_check(gate, principal)?;
            if name == PROJECT_KEY_NAME {
                return Err(SkillsError::Trust(format!(
                    "{PROJECT_KEY_NAME} is trusted by configuration: set skills.trust_project_key = false"
                )));
            }
            let mut file: TrustFile = self.read_json(&self.trust_path())?;
            let before = file.signers.len();
            file.signers.retain(|e| e.name() != name);
            if file.signers.len() == before {
                return Err(SkillsError::Trust(format!(
                    "no trusted signer named {name}"
                )));
            }
            self.write_json(&self.trust_path(), &file)
        })();
        audit_admin(
            gate,
            actor,
            "skills.trust.remove",
            name,
            Value::Null,
            &result,
        )?;
        result
    }

    /// Verifies and installs a skill directory or `.tar.gz`/`.zip` archive for `principal`
    /// (a Cedar `User` id). Refusals are audited and returned with their reason.
    pub fn install(
        &self,
        gate: &Gate,
        principal: &str,
        src: &Path,
        force: bool,
        now_ms: i64,
    ) -> Result<Installed, SkillsError> {
        let _guard = self.exclusive()?;
        let staging_root = self.dir.join(format!(".staging-{}", std::process::id()));
        let result = self.install_inner(gate, principal, src, force, now_ms, &staging_root);
        remove_tree(&staging_root);
        let resource = match &result {
            Ok(i) => i.entry.name.clone(),
            Err(_) => src.display().to_string(),
        };
        let (outcome, payload) = match &result {
            Ok(i) => (
                if i.rolled_back {
                    "installed (forced rollback)".to_string()
                } else {
                    "installed".to_string()
                },
                json!({
                    "entry": i.entry,
                    "log_index": i.log_index,
                    "forced": force,
                    "source": src.display().to_string(),
                }),
            ),
            Err(e) => (
                format!("refused: {e}"),
                json!({"forced": force, "source": src.display().to_string()}),
            ),
        };
        gate.audit()
            .append(
                RecordInput::new(Kind::Skill, user_uid(principal), "skill.install", resource)
                    .with_outcome(outcome)
                    .with_payload(payload),
            )
            .map_err(|e| GateError::AuditUnavailable(e.to_string()))?;
        result
    }

    fn install_inner(
        &self,
        gate: &Gate,
        principal: &str,
        src: &Path,
        force: bool,
        now_ms: i64,
        staging_root: &Path,
    ) -> Result<Installed, SkillsError> {
        remove_tree(staging_root);
        std::fs::create_dir(staging_root).map_err(|e| io(staging_root, e))?;
        let meta = std::fs::symlink_metadata(src).map_err(|e| io(src, e))?;
        let source_dir = if meta.is_dir() {
            src.to_path_buf()
        } else if meta.is_file() {
            let unpacked = staging_root.join("unpacked");
            std::fs::create_dir(&unpacked).map_err(|e| io(&unpacked, e))?;
            archive::unpack(src, &unpacked, &self.limits)?
        } else {
            return Err(SkillError::UnsafeFile {
                path: src.display().to_string(),
                why: "not a directory or an archive file".into(),
            }
            .into());
        };
        let trust = self.trusted_signers()?;
        let verified = verify_skill_dir(&source_dir, &self.root, &trust, &self.limits)?;
        let name = verified.meta.name.clone();
        let lock = self.lockfile()?;
        let mut older = false;
        if let Some(old) = lock.skills.get(&name) {
            let new_v = Version::parse(&verified.meta.version)?;
            let old_v = Version::parse(&old.version)?;
            if new_v < old_v || (new_v == old_v && old.digest != verified.digest) {
                older = true;
                if !force {
                    return Err(SkillsError::Rollback(if new_v < old_v {
                        format!(
                            "{name} {} is older than the installed {} (use --force to roll back)",
                            verified.meta.version, old.version
                        )
                    } else {
                        format!(
                            "{name} {} is already installed with another digest ({}); a new release needs a new version (or --force)",
                            old.version, old.digest
                        )
                    }));
                }
            }
        }
        self.decide(gate, principal, "skill.install", &verified, Some(older))?;
        // Copy, then verify the copy: the source may have changed since it was verified.
        let hexd = verified.digest.trim_start_matches("sha256:").to_string();
        let copy = staging_root.join("copy");
        copy_verified(&source_dir, &copy, &verified)?;
        let again = verify_skill_dir(&copy, &self.root, &trust, &self.limits)?;
        if again.digest != verified.digest {
            return Err(SkillsError::DigestChanged {
                name,
                locked: verified.digest,
                found: again.digest,
            });
        }
        let final_parent = self.dir.join("store").join(&name);
        std::fs::create_dir_all(&final_parent).map_err(|e| io(&final_parent, e))?;
        std::fs::set_permissions(&final_parent, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io(&final_parent, e))?;
        let final_dir = final_parent.join(&hexd);
        if final_dir.exists() {
            remove_tree(&final_dir);
        }
        make_read_only(&copy)?;
        std::fs::rename(&copy, &final_dir).map_err(|e| io(&final_dir, e))?;
        let entry = LockEntry {
            name: name.clone(),
            version: verified.meta.version.clone(),
            digest: verified.digest.clone(),
            signer: verified.verified.signer.signer_attr().to_string(),
            issuer: verified.verified.signer.issuer_attr().to_string(),
            transparency: verified.verified.transparency,
            installed_at_ms: now_ms,
        };
        let mut lock = lock;
        let previous = lock.skills.insert(name.clone(), entry.clone());
        self.write_json(&self.lock_path(), &lock)?;
        if let Some(prev) = previous
            && prev.digest != entry.digest
        {
            remove_tree(&final_parent.join(prev.digest.trim_start_matches("sha256:")));
        }
        Ok(Installed {
            entry,
            rolled_back: older,
            log_index: verified.verified.log_index,
        })
    }

    /// Asks Cedar about `action` for the `Skill` entity built from `verified`.
    fn decide(
        &self,
        gate: &Gate,
        principal: &str,
        action: &str,
        verified: &VerifiedSkill,
        older: Option<bool>,
    ) -> Result<(), SkillsError> {
        let v = &verified.verified;
        let trusted = v.trusted_as.is_some();
        let entity = json!({
            "uid": {"type": "Chitin::Skill", "id": verified.meta.name},
            "attrs": {
                "name": verified.meta.name,
                "version": verified.meta.version,
                "digest": verified.digest,
                "signer": v.signer.signer_attr(),
                "issuer": v.signer.issuer_attr(),
                "verified": true,
                "transparency": v.transparency,
            },
            "parents": []
        });
        let mut context = Map::new();
        context.insert("trusted_signer".into(), Value::Bool(trusted));
        if let Some(o) = older {
            context.insert("older_than_installed".into(), Value::Bool(o));
        }
        let req = PolicyRequest {
            principal: uid("User", principal)?,
            action: uid("Action", action)?,
            resource: uid("Skill", &verified.meta.name)?,
            context,
        };
        match gate.check_with_entities(&req, &[entity])? {
            Verdict::Allowed(..) => Ok(()),
            Verdict::Denied(d) | Verdict::ApprovalRequired { decision: d, .. } => {
                if trusted {
                    Err(SkillsError::PolicyDenied(d.policies))
                } else {
                    Err(SkillsError::UntrustedSigner(signer_text(&v.signer)))
                }
            }
        }
    }

    fn store_dir(&self, e: &LockEntry) -> PathBuf {
        self.dir
            .join("store")
            .join(&e.name)
            .join(e.digest.trim_start_matches("sha256:"))
    }

    /// Re-verifies one installed skill against its lock entry (signature, every file, digest,
    /// version).
    fn reverify(
        &self,
        e: &LockEntry,
        trust: &[TrustedSigner],
    ) -> Result<VerifiedSkill, SkillsError> {
        let dir = self.store_dir(e);
        if !dir.is_dir() {
            return Err(SkillError::FileMissing(dir.display().to_string()).into());
        }
        let v = verify_skill_dir(&dir, &self.root, trust, &self.limits)?;
        if v.digest != e.digest || v.meta.version != e.version || v.meta.name != e.name {
            return Err(SkillsError::DigestChanged {
                name: e.name.clone(),
                locked: e.digest.clone(),
                found: v.digest,
            });
        }
        Ok(v)
    }

    /// Re-verifies installed skills (all, or one by name) against the lockfile. Each failure
    /// is audited (`skill.verify`). Used by `chitin skills verify` and at gateway start-up
    /// (`/ready` reports the failures).
    pub fn verify_installed(
        &self,
        gate: &Gate,
        actor: &str,
        name: Option<&str>,
    ) -> Result<Vec<SkillStatus>, SkillsError> {
        let lock = self.lockfile()?;
        if let Some(n) = name
            && !lock.skills.contains_key(n)
        {
            return Err(SkillsError::NotInstalled(n.to_string()));
        }
        let trust = self.trusted_signers()?;
        let mut out = Vec::new();
        for e in lock
            .skills
            .values()
            .filter(|e| name.is_none_or(|n| n == e.name))
        {
            let error = self.reverify(e, &trust).err().map(|x| x.to_string());
            gate.audit()
                .append(
                    RecordInput::new(Kind::Skill, actor, "skill.verify", &e.name)
                        .with_outcome(match &error {
                            None => "ok".to_string(),
                            Some(r) => format!("refused: {r}"),
                        })
                        .with_payload(json!({"version": e.version, "digest": e.digest})),
                )
                .map_err(|x| GateError::AuditUnavailable(x.to_string()))?;
            out.push(SkillStatus {
                name: e.name.clone(),
                version: e.version.clone(),
                digest: e.digest.clone(),
                error,
            });
        }
        Ok(out)
    }

    /// Before each use: re-verifies the installed skill against the lockfile and asks Cedar
    /// `skill.load` for `principal`. A refusal is audited (the decision itself is recorded by
    /// the gate).
    pub fn load(
        &self,
        gate: &Gate,
        principal: &str,
        name: &str,
    ) -> Result<LoadedSkill, SkillsError> {
        let result = (|| {
            let lock = self.lockfile()?;
            let e = lock
                .skills
                .get(name)
                .cloned()
                .ok_or_else(|| SkillsError::NotInstalled(name.to_string()))?;
            let trust = self.trusted_signers()?;
            let v = self.reverify(&e, &trust)?;
            self.decide(gate, principal, "skill.load", &v, None)?;
            Ok(LoadedSkill {
                dir: self.store_dir(&e),
                entry: e,
                meta: v.meta,
            })
        })();
        if let Err(err) = &result {
            gate.audit()
                .append(
                    RecordInput::new(Kind::Skill, user_uid(principal), "skill.load", name)
                        .with_outcome(format!("refused: {err}")),
                )
                .map_err(|x| GateError::AuditUnavailable(x.to_string()))?;
        }
        result
    }

    /// Removes an installed skill (store copy and lock entry). Audited.
    /// `principal` must be allowed `config.write` on the gateway (owners, by default).
    pub fn remove(
        &self,
        gate: &Gate,
        principal: &str,
        name: &str,
    ) -> Result<LockEntry, SkillsError> {
        let actor = &user_uid(principal);
        let _guard = self.exclusive()?;
        let result = (|| {
            admin_check(gate, principal)?;
            let mut lock = self.lockfile()?;
            let e = lock
                .skills
                .remove(name)
                .ok_or_else(|| SkillsError::NotInstalled(name.to_string()))?;
            self.write_json(&self.lock_path(), &lock)?;
            remove_tree(&self.dir.join("store").join(name));
            Ok(e)
        })();
        let payload = match &result {
            Ok(e) => json!({"version": e.version, "digest": e.digest}),
            Err(_) => Value::Null,
        };
        gate.audit()
            .append(
                RecordInput::new(Kind::Skill, actor, "skill.remove", name)
                    .with_outcome(match &result {
                        Ok(_) => "removed".to_string(),
                        Err(e) => format!("refused: {e}"),
                    })
                    .with_payload(payload),
            )
            .map_err(|x| GateError::AuditUnavailable(x.to_string()))?;
        result
    }
}

/// Trust changes and removals are configuration changes: Cedar `config.write` on the gateway.
fn admin_check(gate: &Gate, principal: &str) -> Result<(), SkillsError> {
    let req =
        crate::gate::admin_request(principal, crate::policy::Action::ConfigWrite, Map::new())?;
    match gate.check(&req)? {
        Verdict::Allowed(..) => Ok(()),
        Verdict::Denied(d) | Verdict::ApprovalRequired { decision: d, .. } => {
            Err(SkillsError::PolicyDenied(d.policies))
        }
    }
}

fn audit_admin(
    gate: &Gate,
    actor: &str,
    action: &str,
    resource: &str,
    payload: Value,
    result: &Result<(), SkillsError>,
) -> Result<(), SkillsError> {
    gate.audit()
        .append(
            RecordInput::admin(actor, action, resource, payload).with_outcome(match result {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("refused: {e}"),
            }),
        )
        .map_err(|e| GateError::AuditUnavailable(e.to_string()))?;
    Ok(())
}

fn signer_text(s: &Signer) -> String {
    s.to_string()
}

/// `Chitin::User::"<id>"`, as the audit actor.
pub fn user_uid(id: &str) -> String {
    format!("Chitin::User::{id:?}")
}

fn uid(ty: &str, id: &str) -> Result<cedar_policy::EntityUid, SkillsError> {
    let tn = cedar_policy::EntityTypeName::from_str(&format!("Chitin::{ty}"))
        .map_err(|e| GateError::InvalidRequest(e.to_string()))?;
    Ok(cedar_policy::EntityUid::from_type_name_and_id(
        tn,
        cedar_policy::EntityId::new(id),
    ))
}

use std::str::FromStr;

/// Copies exactly the files of the verified manifest (and the bundle) into `dest`.
fn copy_verified(src: &Path, dest: &Path, v: &VerifiedSkill) -> Result<(), SkillsError> {
    std::fs::create_dir(dest).map_err(|e| io(dest, e))?;
    let mut files: Vec<String> = v.manifest.entries().map(|e| e.path).collect();
    files.push(BUNDLE_FILE.to_string());
    for rel in files {
        let from = src.join(&rel);
        let to = dest.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        // Refuse to follow a symlink swapped in after verification.
        let meta = std::fs::symlink_metadata(&from).map_err(|e| io(&from, e))?;
        if !meta.is_file() {
            return Err(SkillError::FileChanged(rel).into());
        }
        std::fs::copy(&from, &to).map_err(|e| io(&to, e))?;
    }
    Ok(())
}

fn make_read_only(dir: &Path) -> Result<(), SkillsError> {
    for e in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let p = e.map_err(|e| io(dir, e))?.path();
        let meta = std::fs::symlink_metadata(&p).map_err(|e| io(&p, e))?;
        if meta.is_dir() {
            make_read_only(&p)?;
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444))
                .map_err(|e| io(&p, e))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).map_err(|e| io(dir, e))
}

/// Removes a tree made read-only by [`make_read_only`] (best effort).
fn remove_tree(dir: &Path) {
    fn writable(p: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(p)
            && meta.is_dir()
        {
            let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700));
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    writable(&e.path());
                }
            }
        }
    }
    if dir.exists() {
        writable(dir);
        let _ = std::fs::remove_dir_all(dir);
    }
}
