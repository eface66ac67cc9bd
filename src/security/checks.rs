//! The checks, one method per category. Each adds findings and says what it looked at.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::marks::{self, Mark};
use super::{Category, Checked, Context, Finding, Repair, Report, Severity};
use crate::clock::rfc3339;
use crate::config::Config;
use crate::config::secret_ref::{CredentialField, SecretRef};
use crate::policy::{self, PolicyEngine, PolicyInput, PolicyRequest};
use crate::secrets::SecretInfo;

const DAY_MS: i64 = 86_400_000;
/// A gateway token older than this should be rotated.
const TOKEN_MAX_AGE_DAYS: i64 = 90;
/// Stored secrets older than this and never released are reported.
const UNUSED_SECRET_DAYS: i64 = 30;
/// The audit chain and the backups should be checked at least this often.
const VERIFY_MAX_AGE_DAYS: i64 = 30;
/// A backup older than this (or twice the schedule, if longer) is stale.
const BACKUP_MAX_AGE_DAYS: i64 = 7;
/// A binary older than this is reported (low), and twice this (medium).
const BINARY_MAX_AGE_DAYS: i64 = 90;
/// Records past the last signed checkpoint for longer than this are reported.
const CHECKPOINT_MAX_AGE_MS: i64 = DAY_MS;
/// An approval that stays open longer than this is a long expiry.
const APPROVAL_MAX_LIFETIME_MS: i64 = DAY_MS;
/// At most this many paths are named one by one per walk (the rest are counted).
const MAX_PATH_FINDINGS: usize = 50;

/// The secret files the secrets check judges (mode, owner, symlink).
const SECRET_FILES: [&str; 3] = [
    crate::secrets::STORE_FILE,
    crate::secrets::IDENTITY_ENCRYPTED_FILE,
    crate::secrets::IDENTITY_PLAINTEXT_FILE,
];

/// An API token without expiry: id, user, name, issued, last used.
type TokenRow = (String, String, String, i64, Option<i64>);

fn days(ms: i64) -> i64 {
    ms / DAY_MS
}

fn ago(now: i64, then: i64) -> String {
    format!(
        "{} ({} days ago)",
        rfc3339(then),
        days(now.saturating_sub(then))
    )
}

fn ro(path: &Path) -> Option<rusqlite::Connection> {
    if !path.exists() {
        return None;
    }
    rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()
}

/// The state of one run.
pub(super) struct Run<'a> {
    ctx: &'a Context,
    findings: Vec<Finding>,
    checked: BTreeMap<Category, Vec<String>>,
    uid: Option<u32>,
    /// The secret store's listing (names, audiences, times), when it could be opened.
    secrets: Option<Vec<SecretInfo>>,
    audit_db: Option<rusqlite::Connection>,
    state_db: Option<rusqlite::Connection>,
    engine: Option<PolicyEngine>,
}

impl<'a> Run<'a> {
    pub(super) fn new(ctx: &'a Context) -> Self {
        Self {
            ctx,
            findings: Vec::new(),
            checked: BTreeMap::new(),
            uid: crate::secrets::fsutil::effective_uid().ok(),
            secrets: None,
            audit_db: ro(&ctx.home.join(chitin_audit::DB_FILE)),
            state_db: ro(&ctx.home.join("state.db")),
            engine: None,
        }
    }

    pub(super) fn finish(self) -> Report {
        Report {
            findings: self.findings,
            checked: self
                .checked
                .into_iter()
                .map(|(category, checks)| Checked { category, checks })
                .collect(),
        }
    }

    fn add(&mut self, f: Finding) {
        self.findings.push(f);
    }

    fn saw(&mut self, c: Category, what: impl Into<String>) {
        self.checked.entry(c).or_default().push(what.into());
    }

    fn home(&self) -> &Path {
        &self.ctx.home
    }

    fn now(&self) -> i64 {
        self.ctx.now_ms
    }

    pub(super) fn all(&mut self) {
        let config = match &self.ctx.config {
            Ok(c) => Some(c.clone()),
            Err(e) => {
                self.add(Finding::new(
                    Category::Files,
                    "config.invalid",
                    Severity::Critical,
                    "The configuration cannot be loaded",
                    e.clone(),
                    "edit chitin.toml as the message says; every key is documented in the file `chitin init` writes",
                ));
                None
            }
        };
        if let Some(c) = &config
            && self.ctx.open_secrets
        {
            self.open_secrets(c);
        }
        self.files(config.as_ref());
        if let Some(c) = &config {
            self.exposure(c);
            self.secrets(c);
        }
        self.sandbox(config.as_ref());
        self.policy();
        if let Some(c) = &config {
            self.skills(c);
            self.channels(c);
        }
        self.approvals();
        self.audit(config.as_ref());
        if let Some(c) = &config {
            self.lifecycle(c);
            self.providers(c);
        }
        self.updates();
    }

    fn open_secrets(&mut self, c: &Config) {
        if !self.home().join(crate::secrets::STORE_FILE).exists() {
            self.secrets = Some(Vec::new());
            return;
        }
        match crate::secrets::SecretStore::open(self.home(), &c.secrets) {
            Ok(s) => self.secrets = Some(s.list()),
            Err(e) => self.add(Finding::new(
                Category::Secrets,
                "secrets.not_inspected",
                Severity::Info,
                "The secret store could not be unlocked, so its names, audiences and ages were not checked",
                e.to_string(),
                "set CHITIN_PASSPHRASE (or run on a terminal) and run the audit again",
            )),
        }
    }

    fn secret(&self, name: &str) -> Option<&SecretInfo> {
        self.secrets
            .as_ref()?
            .iter()
            .find(|s| s.name.as_str() == name)
    }

    // ---- exposure ---------------------------------------------------------------------------

    fn exposure(&mut self, c: &Config) {
        let g = &c.gateway;
        if let Ok(addr) = g.bind_addr(None) {
            let ip = addr.ip();
            let loopback = ip.is_loopback();
            if !loopback && !g.tls() {
                self.add(Finding::new(
                    Category::Exposure,
                    "exposure.public_bind_without_tls",
                    Severity::High,
                    "The gateway is set to listen beyond loopback without TLS",
                    format!("[gateway] bind = \"{addr}\" with tls_cert and tls_key unset (the gateway refuses to start like this)"),
                    "set [gateway] tls_cert and tls_key, or bind = \"127.0.0.1:PORT\" behind a TLS-terminating reverse proxy listed in [gateway] trusted_proxies",
                ));
            } else if ip.is_unspecified() {
                self.add(Finding::new(
                    Category::Exposure,
                    "exposure.all_interfaces",
                    Severity::Low,
                    "The gateway listens on every network interface",
                    format!("[gateway] bind = \"{addr}\""),
                    "bind to the one address clients use (e.g. the LAN or VPN address), or to 127.0.0.1 behind a reverse proxy",
                ));
            }
            self.saw(
                Category::Exposure,
                format!(
                    "bind {addr} ({}), TLS {}",
                    if loopback { "loopback" } else { "network" },
                    if g.tls() { "on" } else { "off" }
                ),
            );
            if !loopback {
                for p in &g.trusted_proxies {
                    let Ok(pip) = p.parse::<std::net::IpAddr>() else {
                        continue;
                    };
                    if pip.is_unspecified() || !pip.is_loopback() {
                        self.add(Finding::new(
                            Category::Exposure,
                            "exposure.remote_trusted_proxy",
                            if pip.is_unspecified() { Severity::High } else { Severity::Medium },
                            "X-Forwarded-For is believed from a non-loopback address",
                            format!("[gateway] trusted_proxies contains {p} while the gateway listens on {addr}"),
                            "run the reverse proxy on the same host and list only 127.0.0.1 / ::1, or make sure nothing but the proxy can send from that address",
                        ));
                    }
                }
            }
        }
        self.saw(
            Category::Exposure,
            format!("{} trusted proxies", g.trusted_proxies.len()),
        );
        if g.tls() {
            for (key, what) in [(&g.tls_key, "tls_key"), (&g.tls_cert, "tls_cert")] {
                let p = resolve(self.home(), key);
                match std::fs::metadata(&p) {
                    Err(e) => self.add(Finding::new(
                        Category::Exposure,
                        "exposure.tls_file_missing",
                        Severity::High,
                        "A configured TLS file cannot be read",
                        format!("[gateway] {what} = {}: {e}", p.display()),
                        format!(
                            "put the PEM file at {} or fix [gateway] {what}",
                            p.display()
                        ),
                    )),
                    Ok(m) if what == "tls_key" && m.permissions().mode() & 0o077 != 0 => {
                        let mode = m.permissions().mode() & 0o7777;
                        self.add(
                            Finding::new(
                                Category::Exposure,
                                "exposure.tls_key_readable",
                                Severity::High,
                                "The TLS private key is readable by other users",
                                format!("{} has mode {mode:04o}", p.display()),
                                "",
                            )
                            .with_repair(Repair::ClearMode {
                                path: p.clone(),
                                clear: 0o077,
                            }),
                        );
                    }
                    Ok(_) => {}
                }
            }
        }
        if let Ok(origins) = g.origins() {
            for o in origins {
                let host = o.strip_prefix("http://").map(|h| {
                    let h = h.rsplit_once(':').map_or(h, |(a, b)| {
                        if b.bytes().all(|c| c.is_ascii_digit()) {
                            a
                        } else {
                            h
                        }
                    });
                    h.to_string()
                });
                if let Some(h) = host
                    && !crate::config::providers::is_loopback(&h)
                {
                    self.add(Finding::new(
                        Category::Exposure,
                        "exposure.plain_http_origin",
                        Severity::Medium,
                        "A browser origin over plain http may open the WebSocket",
                        format!("[gateway] allowed_origins contains {o}"),
                        format!("serve that page over https and allow https://{h} instead"),
                    ));
                }
            }
            self.saw(
                Category::Exposure,
                format!("{} extra allowed origins", g.allowed_origins.len()),
            );
        }
        let token = crate::secrets::gateway_token::GATEWAY_TOKEN_SECRET;
        if let Some(info) = self.secret(token).cloned() {
            let rotations = self.count_audit("action = 'gateway.token.rotate'", &[]);
            let rotated = rotations > 0 || info.updated_ms > info.created_ms;
            let age = self.now().saturating_sub(info.updated_ms);
            if days(age) > TOKEN_MAX_AGE_DAYS {
                self.add(Finding::new(
                    Category::Exposure,
                    "exposure.token_old",
                    Severity::Medium,
                    format!("The gateway token is older than {TOKEN_MAX_AGE_DAYS} days"),
                    if rotated {
                        format!("last rotated {}", ago(self.now(), info.updated_ms))
                    } else {
                        format!("created {}, never rotated", ago(self.now(), info.created_ms))
                    },
                    "`chitin token rotate`, then SIGHUP the gateway and give clients the new token (`chitin token show`)",
                ));
            }
            self.saw(
                Category::Exposure,
                format!(
                    "gateway token {} days old, {}",
                    days(age),
                    if rotated {
                        "rotated before"
                    } else {
                        "never rotated"
                    }
                ),
            );
        }
        self.api_tokens();
    }

    /// Per-user API tokens (`chitin tokens issue`) that never expire: one leaked token works
    /// until someone notices and revokes it.
    fn api_tokens(&mut self) {
        let Some(db) = &self.state_db else { return };
        let rows: Result<Vec<TokenRow>, _> = db
            .prepare(
                "SELECT id, user_id, name, created_ms, last_used_ms FROM api_tokens
                 WHERE expires_ms IS NULL ORDER BY created_ms, id",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            });
        // No `api_tokens` table yet (a state dir older than accounts): nothing to judge.
        let Ok(rows) = rows else { return };
        let total: i64 = db
            .query_row("SELECT count(*) FROM api_tokens", [], |r| r.get(0))
            .unwrap_or(0);
        self.saw(
            Category::Exposure,
            format!("{total} per-user API tokens, {} without expiry", rows.len()),
        );
        if rows.is_empty() {
            return;
        }
        const NAMED: usize = 10;
        let now = self.now();
        let mut named: Vec<String> = rows
            .iter()
            .take(NAMED)
            .map(|(id, user, name, created, used)| {
                format!(
                    "{id} (user {user}{}, issued {}, {})",
                    if name.is_empty() {
                        String::new()
                    } else {
                        format!(", name {name:?}")
                    },
                    ago(now, *created),
                    match used {
                        Some(t) => format!("last used {}", ago(now, *t)),
                        None => "never used".to_string(),
                    }
                )
            })
            .collect();
        if rows.len() > NAMED {
            named.push(format!("and {} more", rows.len() - NAMED));
        }
        self.add(Finding::new(
            Category::Exposure,
            "exposure.token_no_expiry",
            Severity::Medium,
            "Per-user API tokens never expire",
            format!(
                "{} API token(s) without expiry: {}",
                rows.len(),
                named.join("; ")
            ),
            "issue a replacement with an expiry (`chitin tokens issue --user USER --expires 90d`), switch the client to it, then `chitin tokens revoke ID` for each token named",
        ));
    }

    // ---- files ------------------------------------------------------------------------------

    fn files(&mut self, config: Option<&Config>) {
        let home = self.home().to_path_buf();
        let meta = match std::fs::symlink_metadata(&home) {
            Ok(m) => m,
            Err(e) => {
                self.add(Finding::new(
                    Category::Files,
                    "files.state_dir_missing",
                    Severity::High,
                    "The state directory cannot be read",
                    format!("{}: {e}", home.display()),
                    "run `chitin init` (or point CHITIN_HOME at the state directory)",
                ));
                return;
            }
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            self.add(
                Finding::new(
                    Category::Files,
                    "files.state_dir_writable",
                    Severity::Critical,
                    "The state directory is writable by other users (every command refuses to run)",
                    format!("{} has mode {mode:04o}", home.display()),
                    "",
                )
                .with_repair(Repair::ClearMode {
                    path: home.clone(),
                    clear: 0o077,
                }),
            );
        } else if mode & 0o077 != 0 {
            self.add(
                Finding::new(
                    Category::Files,
                    "files.state_dir_readable",
                    Severity::High,
                    "The state directory is open to other users",
                    format!("{} has mode {mode:04o} (expected 0700)", home.display()),
                    "",
                )
                .with_repair(Repair::ClearMode {
                    path: home.clone(),
                    clear: 0o077,
                }),
            );
        }
        self.owner(&meta, &home, "files.state_owner");
        let mut seen = 0usize;
        let mut extra = 0usize;
        let mut n = 0usize;
        self.walk(&home, &home, 6, &mut n, &mut seen, &mut extra);
        if extra > 0 {
            self.add(Finding::new(
                Category::Files,
                "files.more_paths",
                Severity::Medium,
                "More paths under the state directory have problems than are listed",
                format!("{extra} more paths"),
                format!("chmod -R go-rwx {}", super::shell_path(&home)),
            ));
        }
        self.saw(
            Category::Files,
            format!("modes and owners of {n} entries under {}", home.display()),
        );
        // Policy-bearing paths outside the state directory.
        let mut bearing: Vec<(String, PathBuf)> =
            vec![("the config file".into(), self.ctx.config_path.clone())];
        if let Some(Ok(spec)) = &self.ctx.policy {
            if let Some(d) = &spec.policy_dir {
                bearing.push(("the policy directory".into(), d.clone()));
                let mut files = Vec::new();
                collect(d, &mut files, 8);
                for f in files {
                    bearing.push(("a policy file".into(), f));
                }
            }
            for e in &spec.entity_files {
                bearing.push(("an entity file".into(), e.clone()));
            }
        }
        let mut looked = 0;
        for (what, p) in &bearing {
            if p.starts_with(&home) {
                continue;
            }
            let Ok(m) = std::fs::metadata(p) else {
                continue;
            };
            looked += 1;
            let mut targets = vec![(p.clone(), m)];
            if let Some(parent) = p.parent().filter(|x| !x.as_os_str().is_empty())
                && let Ok(pm) = std::fs::metadata(parent)
            {
                targets.push((parent.to_path_buf(), pm));
            }
            for (t, tm) in targets {
                let mode = tm.permissions().mode() & 0o7777;
                // A sticky world-writable directory (/tmp) still lets others create files there.
                if mode & 0o022 != 0 {
                    self.add(
                        Finding::new(
                            Category::Files,
                            "files.policy_path_writable",
                            Severity::Critical,
                            format!(
                                "{what} can be changed by other users (Chitin refuses to load it)"
                            ),
                            format!("{} has mode {mode:04o}", t.display()),
                            "",
                        )
                        .with_repair(Repair::ClearMode {
                            path: t.clone(),
                            clear: 0o022,
                        }),
                    );
                }
                if let Some(uid) = self.uid
                    && tm.uid() != uid
                    && tm.uid() != 0
                {
                    self.add(Finding::new(
                        Category::Files,
                        "files.policy_path_owner",
                        Severity::High,
                        format!(
                            "{what} belongs to another user, who can change what Chitin allows"
                        ),
                        format!(
                            "{} is owned by uid {} (Chitin runs as uid {uid})",
                            t.display(),
                            tm.uid()
                        ),
                        format!(
                            "chown {uid} {} (or move it somewhere only you and root can write)",
                            super::shell_path(&t)
                        ),
                    ));
                }
            }
        }
        self.saw(
            Category::Files,
            format!("{looked} policy-bearing paths outside the state directory"),
        );
        let Some(c) = config else { return };
        // The workspace must not overlap anything that decides what Chitin allows.
        let ws = c.workspace_dir(&home);
        let wsn = canonical(&ws);
        let mut protected: Vec<(String, PathBuf)> =
            vec![("the state directory".into(), home.clone())];
        protected.extend(bearing.iter().cloned());
        if !c.backup.dir.is_empty() {
            protected.push(("the backup directory".into(), PathBuf::from(&c.backup.dir)));
        }
        if !c.backup.identity.is_empty() {
            protected.push((
                "the backup identity".into(),
                PathBuf::from(&c.backup.identity),
            ));
        }
        if c.gateway.tls() {
            protected.push(("the TLS key".into(), resolve(&home, &c.gateway.tls_key)));
        }
        let mut overlaps = BTreeSet::new();
        for (what, p) in &protected {
            let pn = canonical(p);
            if pn.starts_with(&wsn) || wsn.starts_with(&pn) {
                overlaps.insert(format!("{what} ({})", p.display()));
            }
        }
        if !overlaps.is_empty() {
            self.add(Finding::new(
                Category::Files,
                "files.workspace_overlap",
                Severity::Critical,
                "The agent workspace overlaps a protected path: tools could rewrite what Chitin trusts",
                format!(
                    "workspace {} overlaps {}",
                    ws.display(),
                    overlaps.into_iter().collect::<Vec<_>>().join(", ")
                ),
                "set [agent] workspace (or [gateway] workspace) to a directory outside the state directory, the policies, the config and the backups",
            ));
        }
        if !ws.exists() {
            self.add(
                Finding::new(
                    Category::Files,
                    "files.workspace_missing",
                    Severity::Info,
                    "The agent workspace does not exist yet (the gateway creates it at start)",
                    format!("{} is missing", ws.display()),
                    "",
                )
                .with_repair(Repair::CreateDir { path: ws.clone() }),
            );
        }
        self.saw(
            Category::Files,
            format!(
                "workspace {} against {} protected paths",
                ws.display(),
                protected.len()
            ),
        );
    }

    fn owner(&mut self, meta: &std::fs::Metadata, path: &Path, id: &str) {
        if let Some(uid) = self.uid
            && meta.uid() != uid
        {
            self.add(Finding::new(
                Category::Files,
                id,
                Severity::High,
                "A file in the state directory belongs to another user",
                format!(
                    "{} is owned by uid {} (Chitin runs as uid {uid})",
                    path.display(),
                    meta.uid()
                ),
                format!(
                    "chown {uid} {} if it is really yours; otherwise find out who put it there",
                    super::shell_path(path)
                ),
            ));
        }
    }

    fn walk(
        &mut self,
        root: &Path,
        dir: &Path,
        depth: usize,
        n: &mut usize,
        seen: &mut usize,
        extra: &mut usize,
    ) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            *n += 1;
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            let top = rel.components().count() == 1;
            let name = e.file_name().to_string_lossy().into_owned();
            // The agent's workspace is not Chitin's state (see `state::check_tree`).
            if top && (name == "workspace" || name == "workspaces") {
                continue;
            }
            // Installed skills are read-only verified copies (0444/0555) inside skills/.
            let skill_copy = rel.starts_with("skills/store");
            if meta.file_type().is_symlink() {
                self.limited(seen, extra, Finding::new(
                    Category::Files,
                    "files.state_symlink",
                    Severity::Medium,
                    "A symbolic link inside the state directory (Chitin never creates one): writes through it land elsewhere",
                    format!("{} -> {}", path.display(), std::fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_default()),
                    format!("replace {} with the file it points to, or remove it", super::shell_path(&path)),
                ));
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            let is_secret_file = top && SECRET_FILES.contains(&name.as_str());
            if mode & 0o022 != 0 {
                self.limited(
                    seen,
                    extra,
                    Finding::new(
                        if is_secret_file {
                            Category::Secrets
                        } else {
                            Category::Files
                        },
                        if is_secret_file {
                            "secrets.file_permissions"
                        } else {
                            "files.state_writable"
                        },
                        Severity::Critical,
                        "A file or directory in the state directory is writable by other users",
                        format!("{} has mode {mode:04o}", path.display()),
                        "",
                    )
                    .with_repair(Repair::ClearMode {
                        path: path.clone(),
                        clear: if skill_copy { 0o022 } else { 0o077 },
                    }),
                );
            } else if mode & 0o077 != 0 && !skill_copy {
                self.limited(
                    seen,
                    extra,
                    Finding::new(
                        if is_secret_file {
                            Category::Secrets
                        } else {
                            Category::Files
                        },
                        if is_secret_file {
                            "secrets.file_permissions"
                        } else {
                            "files.state_readable"
                        },
                        if is_secret_file {
                            Severity::Critical
                        } else {
                            Severity::Medium
                        },
                        "A file or directory in the state directory is readable by other users",
                        format!(
                            "{} has mode {mode:04o} (expected {})",
                            path.display(),
                            if meta.is_dir() { "0700" } else { "0600" }
                        ),
                        "",
                    )
                    .with_repair(Repair::ClearMode {
                        path: path.clone(),
                        clear: 0o077,
                    }),
                );
            }
            if !is_secret_file {
                // The secrets check reports the owner of its own files.
                if let Some(uid) = self.uid
                    && meta.uid() != uid
                {
                    let f = Finding::new(
                        Category::Files,
                        "files.state_owner",
                        Severity::High,
                        "A file in the state directory belongs to another user",
                        format!(
                            "{} is owned by uid {} (Chitin runs as uid {uid})",
                            path.display(),
                            meta.uid()
                        ),
                        format!(
                            "chown {uid} {} if it is really yours; otherwise find out who put it there",
                            super::shell_path(&path)
                        ),
                    );
                    self.limited(seen, extra, f);
                }
            }
            if meta.is_dir() && depth > 0 {
                self.walk(root, &path, depth - 1, n, seen, extra);
            }
        }
    }

    fn limited(&mut self, seen: &mut usize, extra: &mut usize, f: Finding) {
        if *seen < MAX_PATH_FINDINGS {
            *seen += 1;
            self.add(f);
        } else {
            *extra += 1;
        }
    }

    // ---- secrets ----------------------------------------------------------------------------

    fn secrets(&mut self, c: &Config) {
        for f in crate::secrets::doctor::findings(self.home(), &c.secrets) {
            // Modes are judged (with a repair) by the files walk.
            if f.id == "secrets.file_permissions" {
                continue;
            }
            let severity = match f.severity {
                crate::secrets::doctor::Severity::Info => Severity::Info,
                crate::secrets::doctor::Severity::Warn => Severity::Medium,
                crate::secrets::doctor::Severity::Critical => Severity::Critical,
            };
            let title = match f.id {
                "secrets.identity_plaintext" => "The secret store's identity is stored unencrypted",
                "secrets.identity_missing" => "The secret store has no identity to open it",
                "secrets.weak_scrypt" => "The passphrase protection is weak",
                "secrets.file_symlink" => "A secret file is a symbolic link",
                "secrets.file_owner" => "A secret file belongs to another user",
                "secrets.stale_temp_file" => {
                    "A temporary file of an interrupted write is left over"
                }
                "secrets.config_invalid" => "The [secrets] configuration is invalid",
                _ => "Secret store problem",
            };
            self.add(Finding::new(
                Category::Secrets,
                f.id,
                severity,
                title,
                f.message,
                f.fix,
            ));
        }
        self.saw(
            Category::Secrets,
            "secret files: mode, owner, symlinks, plaintext identity, scrypt work factor",
        );
        // Credentials referenced by the config.
        let refs = credential_refs(c);
        let mut env_refs = 0;
        for (field, r) in &refs {
            match r {
                SecretRef::Env(var) => {
                    env_refs += 1;
                    self.add(Finding::new(
                        Category::Secrets,
                        "secrets.env_reference",
                        Severity::Low,
                        "A credential is taken from the environment, outside the encrypted store (no audience, no audited release)",
                        format!("{field} = \"env:{var}\""),
                        format!("`chitin secrets set NAME --audience HOST` (value on stdin), then write {field} = \"secret:NAME\""),
                    ));
                }
                SecretRef::Secret(name) => {
                    if let Some(list) = &self.secrets
                        && !list.iter().any(|s| s.name.as_str() == name.as_str())
                    {
                        self.add(Finding::new(
                            Category::Secrets,
                            "secrets.reference_missing",
                            Severity::High,
                            "The config names a secret that is not in the store",
                            format!("{field} = \"secret:{name}\", and `{name}` is not stored"),
                            format!("`chitin secrets set {name}` (value on stdin), or fix {field}"),
                        ));
                    }
                }
            }
        }
        self.saw(
            Category::Secrets,
            format!(
                "{} credential references in the config ({env_refs} env:)",
                refs.len()
            ),
        );
        let Some(list) = self.secrets.clone() else {
            return;
        };
        let used = self.secret_releases();
        let mut user_secrets = 0;
        for s in &list {
            let name = s.name.as_str();
            if crate::secrets::audit_key::is_reserved(&s.name) {
                continue;
            }
            user_secrets += 1;
            let tool_env = c.sandbox.secret_env.iter().any(|e| e.secret == name);
            let verify_only = refs.iter().any(|(f, r)| {
                matches!(r, SecretRef::Secret(n) if n.as_str() == name)
                    && (f.contains("webhook_secret")
                        || f.contains("signing_secret")
                        || f.contains("verify_token")
                        || f.contains("app_secret")
                        || f.starts_with("[[hooks]]"))
            });
            if s.audience.is_empty() && !tool_env && !verify_only {
                self.add(Finding::new(
                    Category::Secrets,
                    "secrets.no_audience",
                    Severity::Low,
                    "A secret has no audience: no host may receive it, so whatever is meant to use it will be refused",
                    format!("`{name}` has an empty audience"),
                    format!("`chitin secrets set {name} --audience HOST` with the one host it is for (or remove it: `chitin secrets rm {name}`)"),
                ));
            }
            let age = self.now().saturating_sub(s.created_ms);
            if days(age) > UNUSED_SECRET_DAYS && !used.contains(name) && !verify_only {
                self.add(Finding::new(
                    Category::Secrets,
                    "secrets.never_used",
                    Severity::Low,
                    format!("A secret was never released in {} days", days(age)),
                    format!(
                        "`{name}`, created {}, has no release in the audit log",
                        ago(self.now(), s.created_ms)
                    ),
                    format!("remove it if nothing needs it: `chitin secrets rm {name}`"),
                ));
            }
        }
        self.saw(
            Category::Secrets,
            format!("{user_secrets} stored secrets: audience, use"),
        );
    }

    /// Names of secrets released at least once (`secret.use` records).
    fn secret_releases(&self) -> BTreeSet<String> {
        let Some(db) = &self.audit_db else {
            return BTreeSet::new();
        };
        let Ok(mut st) = db.prepare(
            "SELECT DISTINCT resource FROM records WHERE kind = 'secret_use' AND action = 'secret.use'",
        ) else {
            return BTreeSet::new();
        };
        st.query_map([], |r| r.get::<_, String>(0))
            .map(|rows| {
                rows.flatten()
                    .filter_map(|r| {
                        let q = r.strip_prefix("Chitin::Secret::")?;
                        serde_json::from_str::<String>(q).ok()
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn count_audit(&self, cond: &str, params: &[&dyn rusqlite::ToSql]) -> i64 {
        let Some(db) = &self.audit_db else { return 0 };
        db.query_row(
            &format!("SELECT count(*) FROM records WHERE {cond}"),
            params,
            |r| r.get(0),
        )
        .unwrap_or(0)
    }

    // ---- sandbox ----------------------------------------------------------------------------

    fn sandbox(&mut self, config: Option<&Config>) {
        let s = chitin_sandbox::check();
        if !s.enforced() {
            self.add(Finding::new(
                Category::Sandbox,
                "sandbox.not_enforced",
                Severity::Critical,
                "The kernel cannot fully confine tools: shell and file tools will refuse to run",
                format!("missing: {}", s.missing.join(", ")),
                "run on Linux with landlock (ABI >= 4), seccomp and unprivileged user namespaces enabled; in a container see docs/operations.md (container section)",
            ));
        }
        self.saw(
            Category::Sandbox,
            format!(
                "kernel: landlock ABI {}, seccomp {}, user/pid/net/mount namespaces {}",
                s.landlock_abi,
                yes(s.seccomp),
                yes(s.user_ns && s.pid_ns && s.net_ns && s.other_ns)
            ),
        );
        let Some(c) = config else { return };
        let cg = cgroup_available();
        use crate::config::sandbox::CgroupSetting;
        match c.sandbox.cgroup {
            CgroupSetting::Off => self.add(Finding::new(
                Category::Sandbox,
                "sandbox.cgroup_off",
                Severity::Medium,
                "Per-run cgroups are off: memory and process limits rest on rlimits alone",
                "[sandbox] cgroup = \"off\"",
                "set [sandbox] cgroup = \"auto\" (or \"required\" where cgroups are delegated)",
            )),
            CgroupSetting::Required if cg.is_none() => self.add(Finding::new(
                Category::Sandbox,
                "sandbox.cgroup_unavailable",
                Severity::High,
                "Cgroups are required but none can be created here: every tool run will be refused",
                "[sandbox] cgroup = \"required\"; no delegated cgroup v2 (memory, pids) or v1 hierarchy is writable",
                "delegate a cgroup to Chitin (systemd: run it as a service, see `chitin service install`), or set [sandbox] cgroup = \"auto\"",
            )),
            CgroupSetting::Auto if cg.is_none() => self.add(Finding::new(
                Category::Sandbox,
                "sandbox.cgroup_unavailable",
                Severity::Low,
                "No per-run cgroup can be created: memory and process limits fall back to rlimits",
                "[sandbox] cgroup = \"auto\"; no delegated cgroup v2 (memory, pids) or v1 hierarchy is writable",
                "delegate a cgroup v2 subtree with the memory and pids controllers to the user running Chitin",
            )),
            _ => {}
        }
        self.saw(
            Category::Sandbox,
            format!(
                "cgroup mode {:?}: {}",
                c.sandbox.cgroup,
                cg.unwrap_or_else(|| "none writable".into())
            ),
        );
        self.saw(
            Category::Sandbox,
            "network: each run has its own network namespace; egress only through the relay to policy-granted HOST:PORT",
        );
        self.browser(c);
    }

    /// The `browser` tool: offered only where Chromium is installed.
    fn browser(&mut self, c: &Config) {
        let b = &c.tools.browser;
        if !b.enabled {
            self.saw(
                Category::Sandbox,
                "browser tool: disabled ([tools.browser] enabled = false)",
            );
            return;
        }
        match crate::tools::browser::unavailable(b) {
            Some(why) => self.add(Finding::new(
                Category::Sandbox,
                "tools.browser_unavailable",
                Severity::Low,
                "The browser tool is not offered: Chromium is not installed",
                why,
                "install Chromium (`apt-get install -y chromium`) or point [tools.browser] chromium at it; set [tools.browser] enabled = false to silence this",
            )),
            None => self.saw(
                Category::Sandbox,
                format!(
                    "browser tool: {} in the sandbox, network only through the gateway's egress proxy",
                    b.chromium
                ),
            ),
        }
    }

    // ---- policy -----------------------------------------------------------------------------

    fn policy(&mut self) {
        let spec = match &self.ctx.policy {
            None => return,
            Some(Ok(s)) => s.clone(),
            Some(Err(e)) => {
                self.add(Finding::new(
                    Category::Policy,
                    "policy.invalid",
                    Severity::Critical,
                    "The policy directory cannot be used",
                    e.clone(),
                    "fix the path in [policy] dir, or run `chitin init` to install the default policies",
                ));
                return;
            }
        };
        let input = match &spec.policy_dir {
            Some(d) => PolicyInput::from_dir(d),
            None => {
                self.add(Finding::new(
                    Category::Policy,
                    "policy.builtin",
                    Severity::Info,
                    "No policy directory: the built-in default policies are in force",
                    "[policy] dir does not exist",
                    "run `chitin init` to install editable copies",
                ));
                Ok(PolicyInput::embedded())
            }
        };
        let input = match input {
            Ok(i) => i,
            Err(e) => {
                self.add(Finding::new(
                    Category::Policy,
                    "policy.invalid",
                    Severity::Critical,
                    "The policies cannot be read",
                    e.to_string(),
                    "run `chitin policy validate` and fix what it names",
                ));
                return;
            }
        };
        let compiled = match policy::compile(&input) {
            Ok(c) => c,
            Err(e) => {
                self.add(Finding::new(
                    Category::Policy,
                    "policy.invalid",
                    Severity::Critical,
                    "The policies do not compile: the gateway refuses to start",
                    e.to_string(),
                    "run `chitin policy validate` and fix each file:line:col",
                ));
                return;
            }
        };
        if compiled.shadow_count() > 0 {
            self.add(Finding::new(
                Category::Policy,
                "policy.shadow",
                Severity::Info,
                "Some policies are in shadow mode (reported, not enforced)",
                format!("{} shadow policies", compiled.shadow_count()),
                "remove @mode(\"shadow\") once the trial is over",
            ));
        }
        for w in compiled.warnings() {
            self.add(Finding::new(
                Category::Policy,
                "policy.validator_warning",
                Severity::Low,
                "The Cedar validator warns about a policy",
                w.to_string(),
                "change the policy as the warning says (`chitin policy validate` shows it)",
            ));
        }
        match PolicyEngine::load(spec) {
            Ok(e) => {
                self.policy_lint(&e, &compiled);
                self.engine = Some(e);
            }
            Err(e) => self.add(Finding::new(
                Category::Policy,
                "policy.invalid",
                Severity::Critical,
                "The policies or entities cannot be loaded",
                e.to_string(),
                "run `chitin policy validate` and fix what it names (entities.json included)",
            )),
        }
    }

    /// The findings of `chitin policy lint` (`policy::lint`) on the active set, as audit
    /// findings: `policy.permit_all`, `policy.unconstrained_permit` and
    /// `policy.missing_reason` keep their ids; every other lint check is
    /// `policy.lint.<check id>` with the lint's severity, observation and fix.
    fn policy_lint(&mut self, engine: &PolicyEngine, compiled: &policy::Compiled) {
        let report = policy::lint::lint_engine(engine);
        for f in &report.findings {
            let id = match f.id.as_str() {
                "permit-allows-everything" => "policy.permit_all".to_string(),
                "permit-unconstrained-principal" | "permit-unconstrained-action" => {
                    "policy.unconstrained_permit".to_string()
                }
                "policy-missing-reason" => "policy.missing_reason".to_string(),
                other => format!("policy.lint.{other}"),
            };
            self.add(Finding::new(
                Category::Policy,
                &id,
                audit_severity(f.severity),
                f.title.clone(),
                format!("{}: policy `{}`: {}", f.location, f.policy, f.observed),
                f.fix.clone(),
            ));
        }
        self.saw(
            Category::Policy,
            format!(
                "{} enforced policies in {} files compile; `chitin policy lint` checks ({} findings, {} left out by @lint_allow)",
                compiled.enforced_count(),
                compiled.files().len(),
                report.findings.len(),
                report.suppressed
            ),
        );
    }

    /// Decides a probe request with extra entities: `Some(true)` when it would be allowed.
    fn probe(
        &self,
        principal: &str,
        action: policy::Action,
        resource: &str,
        context: Value,
        extra: &[Value],
    ) -> Option<bool> {
        let engine = self.engine.as_ref()?;
        let uid = |s: &str| s.parse::<cedar_policy::EntityUid>().ok();
        let Value::Object(ctx) = context else {
            return None;
        };
        let req = PolicyRequest::new(uid(principal)?, action, uid(resource)?, ctx);
        engine
            .decide_with_entities(&req, extra)
            .ok()
            .map(|d| d.decision == policy::Outcome::Allow)
    }

    // ---- skills -----------------------------------------------------------------------------

    fn skills(&mut self, c: &Config) {
        let dir = self.home().join("skills");
        let read = |name: &str| -> Result<Value, String> {
            let p = dir.join(name);
            match std::fs::read_to_string(&p) {
                Ok(t) => serde_json::from_str(&t).map_err(|e| format!("{}: {e}", p.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
                Err(e) => Err(format!("{}: {e}", p.display())),
            }
        };
        let (lock, trust) = match (read("lock.json"), read("trust.json")) {
            (Ok(l), Ok(t)) => (l, t),
            (Err(e), _) | (_, Err(e)) => {
                self.add(Finding::new(
                    Category::Skills,
                    "skills.state_corrupt",
                    Severity::High,
                    "The skills state cannot be read: no skill can be verified or loaded",
                    e,
                    "restore skills/ from a backup, or remove the file and reinstall the skills",
                ));
                return;
            }
        };
        let installed: Vec<crate::skills_host::LockEntry> = lock
            .get("skills")
            .and_then(Value::as_object)
            .map(|m| {
                m.values()
                    .filter_map(|v| serde_json::from_value(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        let entries: Vec<crate::skills_host::TrustEntry> = trust
            .get("signers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| serde_json::from_value(v.clone()).ok())
                    .collect()
            })
            .unwrap_or_default();
        let project_fp =
            chitin_skills::keys::PublicKey::from_pem(crate::skills_host::PROJECT_KEY_PEM)
                .map(|k| k.fingerprint())
                .ok();
        let trusted = |e: &crate::skills_host::LockEntry| -> bool {
            if e.issuer.is_empty() {
                (c.skills.trust_project_key && project_fp.as_deref() == Some(e.signer.as_str()))
                    || entries.iter().any(|t| matches!(t, crate::skills_host::TrustEntry::Key { fingerprint, .. } if *fingerprint == e.signer))
            } else {
                entries.iter().any(|t| matches!(t, crate::skills_host::TrustEntry::Keyless { issuer, subject, .. } if *issuer == e.issuer && *subject == e.signer))
            }
        };
        for e in &installed {
            if !trusted(e) {
                self.add(Finding::new(
                    Category::Skills,
                    "skills.untrusted_signer",
                    Severity::High,
                    "An installed skill's signer is no longer in the trust list (it will be refused at load)",
                    format!("`{}` {} signed by {}{}", e.name, e.version, e.signer, if e.issuer.is_empty() { String::new() } else { format!(" ({})", e.issuer) }),
                    format!("remove it (`chitin skills remove {}`) or, if the signer is trusted after all, `chitin skills trust add` it again", e.name),
                ));
            }
            let last_ok: Option<i64> = self.audit_db.as_ref().and_then(|db| {
                db.query_row(
                    "SELECT max(ts_ms) FROM records WHERE kind = 'skill' AND action = 'skill.verify' AND resource = ?1 AND outcome = 'ok'",
                    [&e.name],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .ok()
                .flatten()
            });
            let since = last_ok.unwrap_or(e.installed_at_ms);
            if days(self.now().saturating_sub(since)) > VERIFY_MAX_AGE_DAYS {
                self.add(Finding::new(
                    Category::Skills,
                    "skills.not_reverified",
                    Severity::Low,
                    format!("An installed skill was not re-verified in {VERIFY_MAX_AGE_DAYS} days"),
                    match last_ok {
                        Some(t) => format!("`{}` last verified {}", e.name, ago(self.now(), t)),
                        None => format!(
                            "`{}` never re-verified since its install {}",
                            e.name,
                            ago(self.now(), e.installed_at_ms)
                        ),
                    },
                    format!(
                        "`chitin skills verify {}` (the gateway also re-verifies at start)",
                        e.name
                    ),
                ));
            }
        }
        let mut keys = 0;
        for t in &entries {
            if let crate::skills_host::TrustEntry::Key {
                name, fingerprint, ..
            } = t
            {
                keys += 1;
                self.add(Finding::new(
                    Category::Skills,
                    "skills.key_signer",
                    Severity::Low,
                    "A skill signer is trusted by public key instead of a keyless identity (a stolen key signs until someone notices)",
                    format!("trust entry `{name}` is key {fingerprint}"),
                    "prefer keyless signing (an OIDC identity and the transparency log): `chitin skills trust add --issuer URL --subject ID`, then `chitin skills trust remove` the key",
                ));
            }
            let used = installed.iter().any(|e| match t {
                crate::skills_host::TrustEntry::Key { fingerprint, .. } => {
                    e.issuer.is_empty() && *fingerprint == e.signer
                }
                crate::skills_host::TrustEntry::Keyless {
                    issuer, subject, ..
                } => *issuer == e.issuer && *subject == e.signer,
            });
            if !used {
                self.add(Finding::new(
                    Category::Skills,
                    "skills.unused_signer",
                    Severity::Info,
                    "A trusted signer signs no installed skill",
                    format!("trust entry `{}`", t.name()),
                    format!(
                        "`chitin skills trust remove {}` unless you expect skills from it",
                        t.name()
                    ),
                ));
            }
        }
        self.saw(
            Category::Skills,
            format!(
                "{} installed skills, {} trust entries ({keys} keys), project key {}",
                installed.len(),
                entries.len(),
                if c.skills.trust_project_key {
                    "trusted"
                } else {
                    "not trusted"
                }
            ),
        );
    }

    // ---- channels ---------------------------------------------------------------------------

    fn channels(&mut self, c: &Config) {
        let has = !c.channels.is_empty();
        let conv = |kind: &str| {
            json!({"uid": {"type": "Chitin::Conversation", "id": format!("chitin-audit-probe:{kind}")},
                   "attrs": {"channel": "chitin-audit-probe", "kind": kind}, "parents": []})
        };
        let unpaired = json!({"uid": {"type": "Chitin::Identity", "id": "chitin-audit-probe:unpaired"},
                              "attrs": {"channel": "chitin-audit-probe"}, "parents": []});
        let dm = self.probe(
            "Chitin::Identity::\"chitin-audit-probe:unpaired\"",
            policy::Action::MessageReceive,
            "Chitin::Conversation::\"chitin-audit-probe:dm\"",
            json!({"paired": false, "mentioned": true}),
            &[unpaired, conv("dm")],
        );
        if dm == Some(true) {
            self.add(Finding::new(
                Category::Channels,
                "channels.dm_open_to_unpaired",
                if has { Severity::Critical } else { Severity::High },
                "Direct messages from identities nobody paired are admitted",
                "Cedar allows message.receive from an unpaired identity in a DM (context.paired = false)",
                "restore the default `admission.unpaired-get-nothing` forbid: forbid (principal, action == Chitin::Action::\"message.receive\", resource) unless { context.paired };",
            ));
        }
        let owner = crate::skills_host::user_uid(&c.gateway.owner);
        let paired = json!({"uid": {"type": "Chitin::Identity", "id": "chitin-audit-probe:paired"},
                            "attrs": {"channel": "chitin-audit-probe"},
                            "parents": [{"type": "Chitin::User", "id": c.gateway.owner}]});
        let group = self.probe(
            "Chitin::Identity::\"chitin-audit-probe:paired\"",
            policy::Action::MessageReceive,
            "Chitin::Conversation::\"chitin-audit-probe:group\"",
            json!({"paired": true, "mentioned": false}),
            &[paired, conv("group")],
        );
        if group == Some(true) {
            self.add(Finding::new(
                Category::Channels,
                "channels.group_without_mention",
                Severity::Medium,
                "In group chats the agent answers messages that do not mention it",
                format!("Cedar allows message.receive in a group conversation without a mention (probed as a paired identity of {owner})"),
                "restore the default `admission.groups-need-mention` forbid: forbid (principal, action == Chitin::Action::\"message.receive\", resource) when { resource.kind == \"group\" && !context.mentioned };",
            ));
        }
        self.saw(
            Category::Channels,
            format!(
                "{} channels; policy probes: unpaired DM {}, group without mention {}",
                c.channels.len(),
                probe_text(dm),
                probe_text(group)
            ),
        );
        let push = c.channels.iter().filter(|ch| ch.mode().is_push()).count();
        self.saw(
            Category::Channels,
            format!(
                "{push} webhook channels, each with a secret or signature (required at config load)"
            ),
        );
        let dead: Vec<(String, i64)> = self
            .state_db
            .as_ref()
            .and_then(|db| {
                let mut st = db
                    .prepare("SELECT channel, count(*) FROM channel_outbox WHERE status = 'dead' GROUP BY channel ORDER BY channel")
                    .ok()?;
                let rows = st
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .ok()?;
                Some(rows.flatten().collect())
            })
            .unwrap_or_default();
        for (ch, n) in &dead {
            self.add(Finding::new(
                Category::Channels,
                "channels.dead_letters",
                Severity::Medium,
                "Messages could not be delivered and will not be retried",
                format!("channel `{ch}`: {n} dead letters in the outbox"),
                "`chitin channels status` shows the channel's state; fix the cause (revoked token, blocked bot, deleted chat); dead letters are kept until [retention] chat expires them",
            ));
        }
        self.saw(
            Category::Channels,
            format!("dead letters: {}", dead.iter().map(|(_, n)| n).sum::<i64>()),
        );
    }

    // ---- approvals --------------------------------------------------------------------------

    fn approvals(&mut self) {
        let Some(db) = &self.state_db else {
            self.saw(Category::Approvals, "no state database yet");
            return;
        };
        let q = |sql: &str, p: &[&dyn rusqlite::ToSql]| -> i64 {
            db.query_row(sql, p, |r| r.get(0)).unwrap_or(0)
        };
        let now = self.now();
        let long = q(
            "SELECT count(*) FROM approvals WHERE status IN ('pending', 'granted') AND expires_ms > ?1 AND expires_ms - created_ms > ?2",
            &[&now, &APPROVAL_MAX_LIFETIME_MS],
        );
        let pending = q(
            "SELECT count(*) FROM approvals WHERE status = 'pending' AND expires_ms > ?1",
            &[&now],
        );
        let since = now.saturating_sub(90 * DAY_MS);
        let self_granted = q(
            "SELECT count(*) FROM approvals WHERE status IN ('granted', 'used') AND resolved_ms > ?1 \
             AND (resolved_by = requester OR resolved_by = 'Chitin::User::\"' || requester || '\"')",
            &[&since],
        );
        if long > 0 {
            self.add(Finding::new(
                Category::Approvals,
                "approvals.long_expiry",
                Severity::Medium,
                "Open approvals stay valid for more than a day",
                format!("{long} open approvals live longer than {} hours", APPROVAL_MAX_LIFETIME_MS / 3_600_000),
                "deny them (`chitin approvals deny ID`) and keep approval lifetimes short (minutes): an old approval binds a request made in another context",
            ));
        }
        if self_granted > 0 {
            self.add(Finding::new(
                Category::Approvals,
                "approvals.self_granted",
                Severity::Low,
                "Approvals were granted by the user who requested them (no second person looked)",
                format!("{self_granted} approvals in the last 90 days were granted by their requester"),
                "where a second person must approve, add: forbid (principal, action == Chitin::Action::\"approval.grant\", resource) when { principal == context.requester };",
            ));
        }
        self.saw(
            Category::Approvals,
            format!(
                "{pending} pending; lifetime of open approvals; approvals granted by their requester (90 days): {self_granted}"
            ),
        );
    }

    // ---- audit ------------------------------------------------------------------------------

    fn audit(&mut self, config: Option<&Config>) {
        let home = self.home().to_path_buf();
        let db = home.join(chitin_audit::DB_FILE);
        let key = home.join(chitin_audit::PUB_FILE);
        let cps = home.join(chitin_audit::CHECKPOINT_FILE);
        // With the store on PostgreSQL the log is there (one chain for every gateway): a local
        // audit.db is at most the one copied in by `chitin store copy`, and this state dir's
        // checkpoint file also witnesses the PostgreSQL checkpoints, so checking the two
        // together would raise a false alarm.
        let on_postgres =
            config.is_some_and(|c| c.store.backend == crate::config::store::Backend::Postgres);
        if on_postgres {
            self.saw(
                Category::Audit,
                "the log is in PostgreSQL ([store] backend = \"postgres\"): `chitin audit verify` verifies it there; the checks of a local audit.db are skipped".to_string(),
            );
        }
        if !on_postgres && !db.exists() && (key.exists() || cps.exists()) {
            self.add(Finding::new(
                Category::Audit,
                "audit.missing",
                Severity::Critical,
                "The audit database is gone although its key and checkpoints exist",
                format!("{} does not exist", db.display()),
                "restore audit.db from a backup; `chitin audit verify --export FILE` checks an earlier export",
            ));
        }
        let records: i64 = self
            .audit_db
            .as_ref()
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM records", [], |r| r.get(0))
                    .ok()
            })
            .unwrap_or(0);
        if on_postgres {
        } else if self.ctx.verify_chain && db.exists() && key.exists() {
            let verdict = chitin_audit::PublicKey::load(&key)
                .map_err(|e| e.to_string())
                .and_then(|k| {
                    chitin_audit::Verifier::new(k)
                        .verify_db(&db, Some(&cps))
                        .map_err(|e| e.to_string())
                });
            match verdict {
                Ok(Ok(s)) => {
                    self.saw(Category::Audit, format!("chain verified: {}", s.ok_line()));
                    if let Err(e) = marks::record(&home, Mark::AuditVerified, self.now()) {
                        self.saw(Category::Audit, format!("(could not record the verification: {e})"));
                    }
                }
                Ok(Err(tamper)) => self.add(Finding::new(
                    Category::Audit,
                    "audit.tampered",
                    Severity::Critical,
                    "The audit log fails verification",
                    tamper.to_string(),
                    "run `chitin audit verify` for the first bad record; restore from a backup and keep the damaged copy for investigation",
                )),
                Err(e) => self.add(Finding::new(
                    Category::Audit,
                    "audit.unverifiable",
                    Severity::Critical,
                    "The audit log cannot be verified",
                    e,
                    "run `chitin audit verify` and fix what it names",
                )),
            }
        } else if records > 0 {
            match marks::last(&home, Mark::AuditVerified) {
                None => self.add(Finding::new(
                    Category::Audit,
                    "audit.never_verified",
                    Severity::Low,
                    "The audit chain was never verified",
                    format!("{records} records, no successful `chitin audit verify` recorded"),
                    "`chitin audit verify` (or `chitin security audit --deep`), regularly (e.g. weekly from cron)",
                )),
                Some(t) if days(self.now().saturating_sub(t)) > VERIFY_MAX_AGE_DAYS => {
                    self.add(Finding::new(
                        Category::Audit,
                        "audit.verify_stale",
                        Severity::Low,
                        format!("The audit chain was not verified in {VERIFY_MAX_AGE_DAYS} days"),
                        format!("last successful verify {}", ago(self.now(), t)),
                        "`chitin audit verify` (or `chitin security audit --deep`), regularly (e.g. weekly from cron)",
                    ));
                }
                Some(t) => self.saw(Category::Audit, format!("last verified {}", rfc3339(t))),
            }
        }
        // Records past the last signed checkpoint.
        if let Some(c) = &self.audit_db {
            let last_seq: i64 = c
                .query_row("SELECT coalesce(max(seq), 0) FROM records", [], |r| {
                    r.get(0)
                })
                .unwrap_or(0);
            let cp: Option<(i64, i64)> = c
                .query_row(
                    "SELECT seq, time_ms FROM checkpoints ORDER BY seq DESC, time_ms DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .ok();
            let cp_seq = cp.map_or(0, |x| x.0);
            if last_seq > cp_seq {
                let oldest_uncovered: i64 = c
                    .query_row(
                        "SELECT ts_ms FROM records WHERE seq = ?1",
                        [cp_seq + 1],
                        |r| r.get(0),
                    )
                    .unwrap_or(self.now());
                if self.now().saturating_sub(oldest_uncovered) > CHECKPOINT_MAX_AGE_MS {
                    self.add(Finding::new(
                        Category::Audit,
                        "audit.checkpoint_stale",
                        Severity::Medium,
                        "Audit records older than a day are not covered by a signed checkpoint (they could be rewritten unnoticed)",
                        format!(
                            "{} records after the last checkpoint{}; the oldest from {}",
                            last_seq - cp_seq,
                            cp.map(|(s, t)| format!(" (seq {s}, {})", rfc3339(t))).unwrap_or_default(),
                            rfc3339(oldest_uncovered)
                        ),
                        "`chitin audit checkpoint` (a running gateway writes one every [audit] checkpoint_interval_secs)",
                    ));
                }
            }
            self.saw(
                Category::Audit,
                format!(
                    "{last_seq} records, last checkpoint at seq {cp_seq}{}",
                    cp.map(|(_, t)| format!(" ({})", rfc3339(t)))
                        .unwrap_or_default()
                ),
            );
        }
        // Disk space where the audit log is written.
        if let Ok(st) = rustix::fs::statvfs(&home) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let total = st.f_blocks.saturating_mul(st.f_frsize).max(1);
            let pct = free.saturating_mul(100) / total;
            let mib = free / (1024 * 1024);
            let min_mib = config.map_or(2048, |c| c.audit.min_free_disk_mb);
            let sev = disk_severity(free, min_mib);
            if let Some(severity) = sev {
                self.add(Finding::new(
                    Category::Audit,
                    "audit.disk_low",
                    severity,
                    "Little disk space is left where the audit log is written (a full disk stops every audited action)",
                    format!("{mib} MiB free ({pct}%) on the filesystem of {}", home.display()),
                    "free space or move the state directory to a larger filesystem; set [audit] max_db_mb and [retention] audit_payloads to bound the log",
                ));
            }
            self.saw(Category::Audit, format!("disk: {mib} MiB free ({pct}%)"));
        }
        if let Some(c) = config
            && c.audit.max_db_mb > 0
            && let Ok(m) = std::fs::metadata(&db)
        {
            let used = m.len() / (1024 * 1024);
            if used.saturating_mul(100) >= c.audit.max_db_mb.saturating_mul(80) {
                self.add(Finding::new(
                    Category::Audit,
                    "audit.db_near_limit",
                    Severity::High,
                    "audit.db is close to [audit] max_db_mb: at the limit every audited action is refused",
                    format!("{used} MiB of {} MiB", c.audit.max_db_mb),
                    "raise [audit] max_db_mb, or shorten [retention] audit_payloads and run `chitin retention run`",
                ));
            }
        }
    }

    // ---- lifecycle --------------------------------------------------------------------------

    fn lifecycle(&mut self, c: &Config) {
        for (id, severity, message, fix) in crate::lifecycle::findings(c) {
            let sev = match severity {
                "critical" => Severity::Critical,
                "warn" => Severity::Medium,
                _ => Severity::Info,
            };
            self.add(Finding::new(
                Category::Lifecycle,
                &id,
                sev,
                "A class of personal data is kept forever",
                message,
                fix,
            ));
        }
        let home = self.home().to_path_buf();
        if c.retention.interval_minutes == 0 {
            let last = marks::read_ms(&home, "retention.last_run_ms");
            if last.is_none_or(|t| days(self.now().saturating_sub(t)) > BACKUP_MAX_AGE_DAYS) {
                self.add(Finding::new(
                    Category::Lifecycle,
                    "lifecycle.retention_not_scheduled",
                    Severity::Low,
                    "Retention is not scheduled and has not run recently: expired data is kept",
                    match last {
                        Some(t) => format!("[retention] interval_minutes = 0; last run {}", ago(self.now(), t)),
                        None => "[retention] interval_minutes = 0; retention never ran".into(),
                    },
                    "set [retention] interval_minutes = 60 (the gateway runs it), or run `chitin retention run` from cron",
                ));
            }
        }
        self.saw(
            Category::Lifecycle,
            format!("retention every {} minutes", c.retention.interval_minutes),
        );
        if c.backup.recipient.is_empty() {
            self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.backup_not_configured",
                Severity::Low,
                "No backup recipient is configured: no encrypted backup can be made",
                "[backup] recipient is empty",
                "`chitin backup keygen --out backup-identity.txt` (keep the file off this host), set [backup] recipient and [backup] dir",
            ));
            self.saw(Category::Lifecycle, "backups: not configured");
            return;
        }
        // The newest backup: scheduled files, the schedule's mark, manual `backup create`.
        let mut newest: Option<(i64, String)> = None;
        let mut consider = |t: i64, what: String| {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, what));
            }
        };
        let mut newest_file: Option<PathBuf> = None;
        if !c.backup.dir.is_empty() {
            let dir = PathBuf::from(&c.backup.dir);
            if let Ok(rd) = std::fs::read_dir(&dir) {
                let mut names: Vec<String> = rd
                    .flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter(|n| n.starts_with(crate::lifecycle::backup::SCHEDULED_PREFIX))
                    .collect();
                names.sort();
                if let Some(n) = names.last() {
                    let p = dir.join(n);
                    let t = n
                        .trim_start_matches(crate::lifecycle::backup::SCHEDULED_PREFIX)
                        .split('.')
                        .next()
                        .and_then(|d| d.parse::<i64>().ok())
                        .or_else(|| mtime_ms(&p))
                        .unwrap_or(0);
                    consider(t, p.display().to_string());
                    newest_file = Some(p);
                }
            }
        }
        if let Some(t) = marks::read_ms(&home, marks::SCHEDULED_BACKUP_KEY) {
            consider(t, "scheduled backup".into());
        }
        if let Some(t) = marks::last(&home, Mark::BackupCreated) {
            consider(t, "`chitin backup create`".into());
        }
        let max_age_days = BACKUP_MAX_AGE_DAYS
            .max(i64::try_from(c.backup.interval_hours.saturating_mul(2) / 24).unwrap_or(i64::MAX));
        match &newest {
            None => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.no_recent_backup",
                Severity::Medium,
                "No backup was ever made",
                if c.backup.dir.is_empty() {
                    "[backup] dir is empty (no scheduled backups) and no `chitin backup create` is recorded".to_string()
                } else {
                    format!("no backup in {} and no backup recorded", c.backup.dir)
                },
                "set [backup] dir (the gateway then backs up every [backup] interval_hours), or run `chitin backup create --out FILE` from cron",
            )),
            Some((t, what)) if days(self.now().saturating_sub(*t)) > max_age_days => {
                self.add(Finding::new(
                    Category::Lifecycle,
                    "lifecycle.no_recent_backup",
                    Severity::Medium,
                    format!("No backup in the last {max_age_days} days"),
                    format!("newest backup: {what}, {}", ago(self.now(), *t)),
                    "check that the gateway runs and [backup] dir is writable (its log names a failed backup), or run `chitin backup create --out FILE`",
                ));
            }
            Some((t, what)) => self.saw(
                Category::Lifecycle,
                format!("newest backup {} ({what})", rfc3339(*t)),
            ),
        }
        let tested = marks::last(&home, Mark::BackupVerified);
        if newest.is_some() {
            match tested {
                None if !self.ctx.test_backup => self.add(Finding::new(
                    Category::Lifecycle,
                    "lifecycle.backup_never_tested",
                    Severity::Medium,
                    "Backups were never test-restored (an untested backup may not restore)",
                    "no successful `chitin backup verify` recorded",
                    "`chitin backup verify FILE --identity ID` (a full decrypt and check in a scratch directory), or `chitin security audit --deep --identity ID`",
                )),
                Some(t) if !self.ctx.test_backup && days(self.now().saturating_sub(t)) > VERIFY_MAX_AGE_DAYS => {
                    self.add(Finding::new(
                        Category::Lifecycle,
                        "lifecycle.backup_test_stale",
                        Severity::Low,
                        format!("No backup was test-restored in {VERIFY_MAX_AGE_DAYS} days"),
                        format!("last successful test restore {}", ago(self.now(), t)),
                        "`chitin backup verify FILE --identity ID`, or `chitin security audit --deep --identity ID`",
                    ));
                }
                _ => {}
            }
        }
        if !c.backup.identity.is_empty() && Path::new(&c.backup.identity).exists() {
            self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.backup_identity_on_host",
                Severity::Low,
                "The backup identity is kept on the host it protects: whoever takes the host can read every backup",
                format!("[backup] identity = {} exists on this machine", c.backup.identity),
                "move the identity off this host and pass it only when verifying or restoring (--identity FILE)",
            ));
        }
        if !c.backup.target.is_empty() {
            self.offsite(c);
        }
        if self.ctx.test_backup {
            self.test_backup(c, newest_file.as_deref());
        }
    }

    fn meta(&self, key: &str) -> Option<String> {
        self.state_db
            .as_ref()?
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, String>(0)
            })
            .ok()
            .filter(|v| !v.is_empty())
    }

    /// Off-site backups (`[backup] target`): what the gateway recorded of its last upload and
    /// test-restore (the store's `meta` table, written by `lifecycle::offsite::round`).
    fn offsite(&mut self, c: &Config) {
        use crate::lifecycle::offsite as o;
        let now = self.now();
        let target = c.backup.target.clone();
        let ms = |v: Option<String>| v.and_then(|v| v.parse::<i64>().ok());
        let last_upload = ms(self.meta(o::LAST_UPLOAD));
        let last_error = self.meta(o::LAST_ERROR);
        let restore_ok = ms(self.meta(o::TEST_RESTORE_OK));
        let restore_attempt = ms(self.meta(o::TEST_RESTORE_ATTEMPT));
        let restore_error = self.meta(o::TEST_RESTORE_ERROR);
        // Every scheduled backup is uploaded: two missed schedules (at least a week) is stale.
        let max_age_days = BACKUP_MAX_AGE_DAYS
            .max(i64::try_from(c.backup.interval_hours.saturating_mul(2) / 24).unwrap_or(i64::MAX));
        if let Some(e) = &last_error {
            self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.offsite_upload_failed",
                Severity::High,
                "The last off-site backup upload failed",
                format!(
                    "upload to {target} failed: {e}{}",
                    match last_upload {
                        Some(t) => format!("; last successful upload {}", ago(now, t)),
                        None => "; no upload ever succeeded".into(),
                    }
                ),
                "fix what the error names ([backup] endpoint, region, path_style, the credentials and their audience), then check with `chitin backup list`; the next scheduled backup uploads again",
            ));
        }
        match last_upload {
            None if last_error.is_none() => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.offsite_upload_stale",
                Severity::Medium,
                "No backup was ever uploaded off-site",
                format!("[backup] target = {target}; no upload recorded"),
                "run the gateway with [backup] dir or target set (it backs up and uploads every [backup] interval_hours) and check its log for `off-site backup`",
            )),
            Some(t) if days(now.saturating_sub(t)) > max_age_days => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.offsite_upload_stale",
                Severity::Medium,
                format!("No backup was uploaded off-site in the last {max_age_days} days"),
                format!(
                    "last upload to {target} {} ([backup] interval_hours = {})",
                    ago(now, t),
                    c.backup.interval_hours
                ),
                "check that the gateway runs and its log for `off-site backup`; `chitin backup list` shows what the store holds",
            )),
            _ => {}
        }
        let every_days = i64::try_from(c.backup.test_restore_hours.saturating_mul(2) / 24)
            .unwrap_or(i64::MAX)
            .max(VERIFY_MAX_AGE_DAYS);
        let auto = c.backup.test_restore_hours > 0 && !c.backup.identity.is_empty();
        let enable = "set [backup] identity (on the host that test-restores) and test_restore_hours = 24; or fetch the newest with `chitin backup fetch NAME --out FILE` and check it with `chitin backup verify FILE --identity ID`";
        match (restore_ok, &restore_error) {
            (_, Some(e)) => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.offsite_test_restore_failed",
                Severity::High,
                "The last test-restore of the newest off-site backup failed",
                format!(
                    "test-restore {}: {e}{}",
                    restore_attempt.map(|t| ago(now, t)).unwrap_or_default(),
                    match restore_ok {
                        Some(t) => format!("; last one that passed {}", ago(now, t)),
                        None => "; none ever passed".into(),
                    }
                ),
                "fetch the newest backup (`chitin backup list`, `chitin backup fetch NAME --out FILE`) and run `chitin backup verify FILE --identity ID` to see why; if it is damaged, make a new backup now",
            )),
            (None, None) => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.offsite_never_test_restored",
                Severity::Medium,
                "The off-site backups were never test-restored",
                if auto {
                    format!("[backup] target = {target}; no test-restore recorded yet")
                } else {
                    format!(
                        "[backup] target = {target}; automatic test-restores are off ([backup] test_restore_hours = {}, identity {})",
                        c.backup.test_restore_hours,
                        if c.backup.identity.is_empty() { "not set" } else { "set" }
                    )
                },
                if auto {
                    "let the gateway run until its first test-restore (its log says `off-site backup test-restore passed`)"
                } else {
                    enable
                },
            )),
            (Some(t), None) if days(now.saturating_sub(t)) > every_days => {
                self.add(Finding::new(
                    Category::Lifecycle,
                    "lifecycle.offsite_test_restore_stale",
                    Severity::Low,
                    format!("No off-site backup was test-restored in {every_days} days"),
                    format!("last successful test-restore {}", ago(now, t)),
                    if auto {
                        "check that the gateway runs; its log names a failed test-restore"
                    } else {
                        enable
                    },
                ));
            }
            _ => {}
        }
        self.saw(
            Category::Lifecycle,
            format!(
                "off-site {target}: last upload {}, last test-restore {}",
                last_upload.map_or("never".into(), rfc3339),
                restore_ok.map_or("never".into(), rfc3339)
            ),
        );
    }

    fn test_backup(&mut self, c: &Config, newest: Option<&Path>) {
        let Some(file) = newest else {
            self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.backup_test_skipped",
                Severity::Info,
                "No backup file to test-decrypt",
                if c.backup.dir.is_empty() {
                    "[backup] dir is empty".to_string()
                } else {
                    format!("no {}* file in {}", crate::lifecycle::backup::SCHEDULED_PREFIX, c.backup.dir)
                },
                "set [backup] dir, or check a manual backup with `chitin backup verify FILE --identity ID`",
            ));
            return;
        };
        let identity =
            self.ctx.backup_identity.clone().or_else(|| {
                (!c.backup.identity.is_empty()).then(|| PathBuf::from(&c.backup.identity))
            });
        let Some(identity) = identity else {
            self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.backup_test_skipped",
                Severity::Info,
                "The newest backup was not test-decrypted: no identity on this machine",
                format!(
                    "{} (no --identity, [backup] identity empty)",
                    file.display()
                ),
                "`chitin security audit --deep --identity FILE` with the backup identity",
            ));
            return;
        };
        let result = (|| {
            let key = chitin_audit::PublicKey::load(&self.home().join(chitin_audit::PUB_FILE))
                .map_err(|e| e.to_string())?;
            let id =
                crate::lifecycle::backup::load_identity(&identity).map_err(|e| e.to_string())?;
            let opened = crate::lifecycle::backup::open(file, &id).map_err(|e| e.to_string())?;
            crate::lifecycle::backup::check(opened, &key).map_err(|e| e.to_string())
        })();
        match result {
            Ok(v) => {
                self.saw(
                    Category::Lifecycle,
                    format!(
                        "test-decrypted {}: {} files, audit {}",
                        file.display(),
                        v.report.members,
                        v.report.audit
                    ),
                );
                if let Err(e) = marks::record(self.home(), Mark::BackupVerified, self.now()) {
                    self.saw(Category::Lifecycle, format!("(could not record the test restore: {e})"));
                }
            }
            Err(e) => self.add(Finding::new(
                Category::Lifecycle,
                "lifecycle.backup_unreadable",
                Severity::Critical,
                "The newest backup does not decrypt and check",
                format!("{}: {e}", file.display()),
                "make a new backup now (`chitin backup create --out FILE`) and find out why this one is bad (wrong recipient, truncated upload, disk error)",
            )),
        }
    }

    // ---- providers --------------------------------------------------------------------------

    fn providers(&mut self, c: &Config) {
        for p in &c.providers {
            let host = p.parsed_base_url().map(|(_, h)| h).unwrap_or_default();
            match p.api_key.as_ref().map(|k| &k.0) {
                Some(SecretRef::Env(var)) => self.add(Finding::new(
                    Category::Providers,
                    "providers.key_without_audience",
                    Severity::Medium,
                    "A provider key comes from the environment: no audience binds it to the provider's host",
                    format!("[[providers]] `{}` api_key = \"env:{var}\"", p.name),
                    format!("`chitin secrets set {0}_key --audience {host}` (value on stdin), then api_key = \"secret:{0}_key\"", p.name),
                )),
                Some(SecretRef::Secret(name)) => {
                    if let Some(info) = self.secret(name.as_str())
                        && !info.audience.iter().any(|a| a == &host)
                    {
                        self.add(Finding::new(
                            Category::Providers,
                            "providers.key_without_audience",
                            Severity::Medium,
                            "A provider key's audience does not name the provider's host (every model call is refused)",
                            format!(
                                "[[providers]] `{}` sends `{name}` to {host}; its audience is [{}]",
                                p.name,
                                info.audience.join(", ")
                            ),
                            format!("`chitin secrets set {name} --audience {host}` (value on stdin)"),
                        ));
                    }
                }
                None => {}
            }
        }
        if !c.providers.is_empty() {
            let limited =
                c.budgets.daily_usd_per_user > 0.0 || c.budgets.users.values().any(|v| *v > 0.0);
            if !limited {
                self.add(Finding::new(
                    Category::Providers,
                    "providers.no_budget",
                    Severity::Medium,
                    "No spending limit: a runaway or hijacked agent can spend without bound",
                    "[budgets] daily_usd_per_user = 0 and no per-user budget",
                    "set [budgets] daily_usd_per_user (e.g. 5.0) and a [pricing] entry for every model",
                ));
            } else {
                for m in c.agent.model_chain() {
                    if c.pricing.get(&m).is_none() {
                        self.add(Finding::new(
                            Category::Providers,
                            "providers.model_unpriced",
                            Severity::Low,
                            "A model has no price, so its spend does not count against the budget",
                            format!("model `{m}` has no [pricing] entry"),
                            format!(
                                "add [pricing.\"{m}\"] input_per_mtok = ..., output_per_mtok = ..."
                            ),
                        ));
                    }
                }
            }
        }
        self.saw(
            Category::Providers,
            format!(
                "{} providers: key references and audiences; budget {}",
                c.providers.len(),
                if c.budgets.daily_usd_per_user > 0.0 {
                    format!("{} USD/user/day", c.budgets.daily_usd_per_user)
                } else {
                    "none".into()
                }
            ),
        );
    }

    // ---- updates ----------------------------------------------------------------------------

    fn updates(&mut self) {
        let Some(exe) = &self.ctx.executable else {
            return;
        };
        let Some(t) = mtime_ms(exe) else { return };
        let age = days(self.now().saturating_sub(t));
        let sev = if age > 2 * BINARY_MAX_AGE_DAYS {
            Some(Severity::Medium)
        } else if age > BINARY_MAX_AGE_DAYS {
            Some(Severity::Low)
        } else {
            None
        };
        if let Some(severity) = sev {
            self.add(Finding::new(
                Category::Updates,
                "updates.binary_old",
                severity,
                format!("The chitin binary is older than {BINARY_MAX_AGE_DAYS} days: security fixes since then are missing"),
                format!("{} ({} {}) was built or installed {}", exe.display(), env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"), ago(self.now(), t)),
                "update to the current release (rebuild from an updated checkout: `cargo install --path .`), then restart the gateway (`chitin service status`)",
            ));
        }
        self.saw(
            Category::Updates,
            format!("binary {} {} days old", env!("CARGO_PKG_VERSION"), age),
        );
    }
}

/// How bad `free` bytes left is for the audit log, against `[audit] min_free_disk_mb`: an
/// absolute amount, since the log grows by kilobytes per turn (a percentage would cry wolf on
/// large disks). Below a quarter of it high, below it medium; 0 never reports.
fn disk_severity(free: u64, min_mib: u64) -> Option<Severity> {
    let min = min_mib.saturating_mul(1024 * 1024);
    if free < min / 4 {
        Some(Severity::High)
    } else if free < min {
        Some(Severity::Medium)
    } else {
        None
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

fn probe_text(p: Option<bool>) -> &'static str {
    match p {
        Some(true) => "ADMITTED",
        Some(false) => "refused",
        None => "not probed",
    }
}

fn resolve(home: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        home.join(p)
    }
}

/// The canonical path when it exists, else the normalized text.
fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .ok()
        .or_else(|| policy::normalize(p))
        .unwrap_or_else(|| p.to_path_buf())
}

fn mtime_ms(p: &Path) -> Option<i64> {
    let m = std::fs::metadata(p).ok()?.modified().ok()?;
    let d = m.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(d.as_millis()).ok()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if depth > 0 {
                collect(&p, out, depth - 1);
            }
        } else if p
            .extension()
            .is_some_and(|x| x == "cedar" || x == "cedarschema")
        {
            out.push(p);
        }
    }
}

/// Every credential reference in the config, with the key that holds it.
fn credential_refs(c: &Config) -> Vec<(String, SecretRef)> {
    let mut out = Vec::new();
    let mut push = |field: String, f: &CredentialField| out.push((field, f.0.clone()));
    for p in &c.providers {
        if let Some(k) = &p.api_key {
            push(format!("[[providers]] `{}` api_key", p.name), k);
        }
    }
    for ch in &c.channels {
        for (k, v) in ch.credentials() {
            push(format!("[[channels]] `{}` {k}", ch.name), v);
        }
    }
    for h in &c.hooks {
        push(format!("[[hooks]] `{}` secret", h.name), &h.secret);
    }
    out
}

/// Whether a per-run cgroup can be made here, read-only: a cgroup v2 parent whose
/// `cgroup.subtree_control` delegates memory and pids and is writable, or writable v1
/// memory and pids hierarchies. `None` when neither.
fn cgroup_available() -> Option<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<(String, String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?.to_string();
            let mut r = right.split(' ');
            let t = r.next()?.to_string();
            let _ = r.next();
            Some((mp, t, r.next().unwrap_or("").to_string()))
        })
        .collect();
    let writable = |p: &Path| rustix::fs::access(p, rustix::fs::Access::WRITE_OK).is_ok();
    for l in own.lines() {
        let mut it = l.splitn(3, ':');
        let (_, ctrl, path) = (it.next(), it.next().unwrap_or(""), it.next().unwrap_or(""));
        if ctrl.is_empty() {
            for (mp, t, _) in &mounts {
                if t != "cgroup2" {
                    continue;
                }
                let dir = Path::new(mp).join(path.trim_start_matches('/'));
                let ctl =
                    std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                if ctl.contains("memory") && ctl.contains("pids") && writable(&dir) {
                    return Some(format!("cgroup v2 at {}", dir.display()));
                }
            }
        }
    }
    let v1 = |want: &str| -> Option<PathBuf> {
        let path = own.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let _ = it.next();
            let c = it.next()?;
            c.split(',')
                .any(|x| x == want)
                .then(|| it.next().unwrap_or("").to_string())
        })?;
        let (mp, _, _) = mounts
            .iter()
            .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == want))?;
        let d = Path::new(mp).join(path.trim_start_matches('/'));
        writable(&d).then_some(d)
    };
    match (v1("memory"), v1("pids")) {
        (Some(m), Some(_)) => Some(format!("cgroup v1 at {}", m.display())),
        _ => None,
    }
}

/// The audit's severity of a `chitin policy lint` finding (the same five levels).
fn audit_severity(s: policy::lint::Severity) -> Severity {
    match s {
        policy::lint::Severity::Info => Severity::Info,
        policy::lint::Severity::Low => Severity::Low,
        policy::lint::Severity::Medium => Severity::Medium,
        policy::lint::Severity::High => Severity::High,
        policy::lint::Severity::Critical => Severity::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_space_is_judged_by_what_is_left_not_by_the_percentage_of_a_large_disk() {
        const GIB: u64 = 1024 * 1024 * 1024;
        assert_eq!(disk_severity(14 * GIB, 2048), None);
        assert_eq!(disk_severity(GIB, 2048), Some(Severity::Medium));
        assert_eq!(disk_severity(GIB / 4, 2048), Some(Severity::High));
        assert_eq!(disk_severity(0, 0), None, "0 turns the check off");
    }
}
