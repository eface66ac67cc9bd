//! `chitin pairing list [--json] | approve CODE [--user USER] | deny CODE | revoke IDENTITY` and
//! `chitin channels list [--json] | status [--json]`.
//!
//! Pairing decisions are made by the channel engine as Cedar `pairing.approve` for the CLI
//! operator (`[cli] operator`, default the owner); a running gateway sees an approval at its
//! next batch of events (it re-reads the managed entity store in `state.db`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;
use serde_json::json;

use super::{CmdResult, Globals, Runtime};
use crate::channels::{ChannelSettings, ChannelsError, Engine, PairingRequest};

#[derive(Debug, Subcommand)]
pub enum PairingCmd {
    /// Open pairing requests (code, channel, identity, expiry).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Pair the identity that got this code with a user (default: the owner).
    Approve {
        #[arg(value_name = "CODE")]
        code: String,
        /// The user the identity acts as [default: [gateway] owner].
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// Refuse this pairing request.
    Deny {
        #[arg(value_name = "CODE")]
        code: String,
    },
    /// Unpair an identity (`telegram:12345`): its messages are no longer admitted.
    Revoke {
        #[arg(value_name = "IDENTITY")]
        identity: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChannelsCmd {
    /// The configured channels (name, kind, API root, mode).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Each channel's durable state: cursor, last event, events, outbox by status, dead letters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

/// The channel engine on the configured store (PostgreSQL when `[store] backend =
/// "postgres"`: the one the gateways share).
fn engine(globals: &Globals, rt: &Runtime) -> Result<Engine, super::BoxError> {
    let store = super::backup::configured_store(rt)?;
    let vault = crate::vault::Vault::for_db(
        &globals.home,
        store.db(),
        &mut rt.secrets.write(),
        Arc::clone(&rt.clock),
    )?;
    Ok(Engine::new(
        store,
        rt.gate.clone(),
        Arc::clone(&rt.clock),
        Arc::new(vault),
        rt.config
            .channels
            .iter()
            .map(ChannelSettings::from_config)
            .collect(),
    ))
}

fn line(p: &PairingRequest) -> String {
    format!(
        "{}  {}  {}  expires {}",
        p.code,
        p.channel.escape_default(),
        p.identity.escape_default(),
        p.expires_at
    )
}

/// A refusal by Cedar is exit 1 with `refused: ...`; other errors are exit 2.
fn decided<T>(r: Result<T, ChannelsError>) -> Result<Result<T, ExitCode>, super::BoxError> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e @ ChannelsError::PairingRefused { .. }) => {
            println!("refused: {e}");
            Ok(Err(ExitCode::from(1)))
        }
        Err(e) => Err(e.into()),
    }
}

pub fn run_pairing(cmd: PairingCmd, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    let engine = engine(globals, &rt)?;
    let operator = rt.config.operator().to_string();
    match cmd {
        PairingCmd::List { json } => {
            let list = engine.pairing_list()?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no open pairing requests");
            } else {
                for p in &list {
                    println!("{}", line(p));
                }
            }
        }
        PairingCmd::Approve { code, user } => {
            let target = user.unwrap_or_else(|| rt.config.gateway.owner.clone());
            let p = match decided(engine.pairing_approve(&code, &operator, &target))? {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            println!(
                "paired {} ({}) with user {}",
                p.identity.escape_default(),
                p.channel.escape_default(),
                target.escape_default()
            );
        }
        PairingCmd::Deny { code } => {
            let p = match decided(engine.pairing_deny(&code, &operator))? {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            println!(
                "denied pairing {} for {}",
                p.code,
                p.identity.escape_default()
            );
        }
        PairingCmd::Revoke { identity } => {
            if let Err(code) = decided(engine.pairing_revoke(&identity, &operator))? {
                return Ok(code);
            }
            println!("unpaired {}", identity.escape_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_channels(cmd: ChannelsCmd, globals: &Globals) -> CmdResult {
    match cmd {
        ChannelsCmd::List { json } => {
            let config = globals.load_config()?;
            let list: Vec<serde_json::Value> = config
                .channels
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "kind": c.kind.as_str(),
                        "api_base": c.api_base_or_default(),
                        "mode": c.mode().as_str(),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no channels configured ([[channels]] in chitin.toml)");
            } else {
                for c in &list {
                    println!(
                        "{}  {}  {}  {}",
                        c["name"].as_str().unwrap_or_default(),
                        c["kind"].as_str().unwrap_or_default(),
                        c["mode"].as_str().unwrap_or_default(),
                        c["api_base"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        ChannelsCmd::Status { json } => {
            let rt = Runtime::open(globals)?;
            let engine = engine(globals, &rt)?;
            let mut all = Vec::new();
            for c in &rt.config.channels {
                all.push(engine.status(&c.name)?);
            }
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else if all.is_empty() {
                println!("no channels configured ([[channels]] in chitin.toml)");
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
                for s in &all {
                    let ago = |ms: i64| format!("{}s ago", now.saturating_sub(ms).max(0) / 1000);
                    let stale = s.reported_ms.is_none_or(|t| {
                        now.saturating_sub(t) > 2 * crate::channels::CONNECTION_REFRESH_MS
                    });
                    let connection = match (s.connected, &s.connection_error) {
                        (None, _) => "never started".to_string(),
                        _ if stale => format!(
                            "not running (last report {})",
                            s.reported_ms.map(ago).unwrap_or_default()
                        ),
                        (Some(true), _) => format!(
                            "connected since {}",
                            s.connected_since_ms.map(ago).unwrap_or_default()
                        ),
                        (Some(false), Some(e)) => format!("cannot connect: {e}"),
                        (Some(false), None) => "not connected".to_string(),
                    };
                    let owner = s
                        .owner
                        .as_deref()
                        .map(|o| format!("  owned by replica {o}"))
                        .unwrap_or_default();
                    println!(
                        "{} ({})  {connection}{owner}  last event {}  lag {} ms  retrying {}",
                        s.channel,
                        s.kind,
                        s.last_event_ms.map(ago).unwrap_or_else(|| "never".into()),
                        s.lag_ms,
                        s.retrying
                    );
                    println!(
                        "  events {} (not admitted {})  outbox: queued {} sending {} sent {} failed {} dead {}  pending pairings {}",
                        s.events,
                        s.denied,
                        s.queued,
                        s.sending,
                        s.sent,
                        s.failed,
                        s.dead,
                        s.pending_pairings
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
