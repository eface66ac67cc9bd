//! `chitin users add USER [--group GROUP]... | list [--json] | remove USER`,
//! `chitin tokens issue --user USER [--expires DURATION] [--name NAME] | list [--json] | revoke ID`
//! and `chitin devices list [--json] | approve ID | revoke ID`.
//!
//! Each is decided by Cedar for the CLI operator (`[cli] operator`, default the owner):
//! `user.manage`, `token.manage`, `pairing.approve`; a refusal prints `refused: ...` and exits
//! 1. A running gateway sees the change at its next request (it watches `state.db`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;

use super::{CmdResult, Globals, Runtime};
use crate::accounts::{Accounts, AccountsError};

#[derive(Debug, Subcommand)]
pub enum UsersCmd {
    /// Add a user (a Cedar `User` entity in the managed store), or replace its groups.
    Add {
        #[arg(value_name = "USER")]
        user: String,
        /// A group the user is in (`owners`, or any group your policies name); repeatable.
        #[arg(long = "group", value_name = "GROUP")]
        groups: Vec<String>,
    },
    /// Every user: from the entity files and the managed store, with groups and live tokens.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a managed user; its API tokens, browser sessions and devices end with it.
    Remove {
        #[arg(value_name = "USER")]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Issue an API token for a user; the token is printed once, alone on the last line.
    Issue {
        #[arg(long, value_name = "USER")]
        user: String,
        /// How long it is valid: 30d, 12h, 90m, 1d12h (default: until revoked).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// A label to recognize it by in `chitin tokens list`.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Every API token (id, user, name, expiry, last use; never the token).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token by its id: it stops working at once.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DevicesCmd {
    /// Browsers that signed in from an address that is not loopback: pending, approved, revoked.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending device: its sessions start working.
    Approve {
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Revoke a device: its sessions end and it cannot sign in again as it is.
    Revoke {
        #[arg(value_name = "ID")]
        id: String,
    },
}

fn open(globals: &Globals) -> Result<(Runtime, Accounts), super::BoxError> {
    let rt = Runtime::open(globals)?;
    let acc = Accounts::new(
        Arc::clone(&rt.store),
        rt.gate.clone(),
        Arc::clone(&rt.clock),
    );
    acc.sync()?;
    Ok((rt, acc))
}

/// A Cedar refusal is exit 1 with `refused: ...`; other errors are exit 2.
fn decided<T>(r: Result<T, AccountsError>) -> Result<Result<T, ExitCode>, super::BoxError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e @ AccountsError::Denied { .. }) => {
            println!("refused: {e}");
            Ok(Err(ExitCode::from(1)))
        }
        Err(e) => Err(e.into()),
    }
}

fn when(ms: Option<i64>) -> String {
    ms.map_or_else(|| "never".to_string(), crate::clock::rfc3339)
}

pub fn run_users(cmd: UsersCmd, globals: &Globals) -> CmdResult {
    let (rt, acc) = open(globals)?;
    let operator = rt.config.operator().to_string();
    match cmd {
        UsersCmd::Add { user, groups } => {
            let u = match decided(acc.add_user(&operator, &user, &groups))? {
                Ok(u) => u,
                Err(code) => return Ok(code),
            };
            println!(
                "added user {} (groups: {})",
                u.user.escape_default(),
                if u.groups.is_empty() {
                    "none".to_string()
                } else {
                    u.groups.join(", ").escape_default().to_string()
                }
            );
        }
        UsersCmd::List { json } => {
            let list = match decided(acc.list_users(&operator))? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no users; add one with `chitin users add USER --group owners`");
            } else {
                for u in &list {
                    println!(
                        "{}  groups: {}  source: {}  tokens: {}  sessions: {}",
                        u.user.escape_default(),
                        u.groups.join(",").escape_default(),
                        u.source,
                        u.tokens,
                        u.sessions
                    );
                }
            }
        }
        UsersCmd::Remove { user } => {
            let r = match decided(acc.remove_user(&operator, &user))? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
            println!(
                "removed user {} ({} API tokens revoked, {} sessions ended, {} devices removed)",
                r.user.escape_default(),
                r.tokens,
                r.sessions,
                r.devices
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_tokens(cmd: TokensCmd, globals: &Globals) -> CmdResult {
    let (rt, acc) = open(globals)?;
    let operator = rt.config.operator().to_string();
    match cmd {
        TokensCmd::Issue {
            user,
            expires,
            name,
        } => {
            let ms = match expires.as_deref() {
                None => None,
                Some(d) => Some(
                    crate::config::schedule::parse_duration_ms(d)
                        .map_err(|e| format!("--expires: {e}"))?,
                ),
            };
            let (info, token) = match decided(acc.issue_token(
                &operator,
                &user,
                ms,
                name.as_deref().unwrap_or(""),
            ))? {
                Ok(t) => t,
                Err(code) => return Ok(code),
            };
            println!(
                "issued API token {} for {} (name {}, expires {}); it is shown only now:",
                info.id,
                info.user.escape_default(),
                info.name.escape_default(),
                when(info.expires_ms)
            );
            println!("{}", token.expose());
        }
        TokensCmd::List { json } => {
            let list = match decided(acc.list_tokens(&operator))? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no API tokens; issue one with `chitin tokens issue --user USER`");
            } else {
                for t in &list {
                    println!(
                        "{}  user: {}  name: {}  expires: {}{}  last used: {}",
                        t.id,
                        t.user.escape_default(),
                        t.name.escape_default(),
                        when(t.expires_ms),
                        if t.expired { " (expired)" } else { "" },
                        when(t.last_used_ms)
                    );
                }
            }
        }
        TokensCmd::Revoke { id } => {
            let user = match decided(acc.revoke_token(&operator, &id))? {
                Ok(u) => u,
                Err(code) => return Ok(code),
            };
            println!(
                "revoked API token {} (user {})",
                id.escape_default(),
                user.escape_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_devices(cmd: DevicesCmd, globals: &Globals) -> CmdResult {
    let (rt, acc) = open(globals)?;
    let operator = rt.config.operator().to_string();
    match cmd {
        DevicesCmd::List { json } => {
            let list = match decided(acc.list_devices(&operator))? {
                Ok(l) => l,
                Err(code) => return Ok(code),
            };
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no devices");
            } else {
                for d in &list {
                    println!(
                        "{}  {}  user: {}  from: {}  since: {}  browser: {}",
                        d.id,
                        d.status,
                        d.user.escape_default(),
                        d.client,
                        crate::clock::rfc3339(d.created_ms),
                        d.user_agent.escape_default()
                    );
                }
            }
        }
        DevicesCmd::Approve { id } => {
            let d = match decided(acc.decide_device(&operator, &id, true))? {
                Ok(d) => d,
                Err(code) => return Ok(code),
            };
            println!(
                "approved device {} of {} (from {})",
                d.id,
                d.user.escape_default(),
                d.client
            );
        }
        DevicesCmd::Revoke { id } => {
            let d = match decided(acc.decide_device(&operator, &id, false))? {
                Ok(d) => d,
                Err(code) => return Ok(code),
            };
            println!(
                "revoked device {} of {}; its sessions ended",
                d.id,
                d.user.escape_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
