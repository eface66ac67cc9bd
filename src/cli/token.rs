//! `chitin token show | rotate`: the gateway's bearer token (kept in the secret store).

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{CmdResult, Globals};
use crate::secrets::gateway_token::{self, GATEWAY_TOKEN_SECRET};

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Print the gateway token (created if there is none yet).
    Show,
    /// Replace the gateway token; a running gateway takes the new one on SIGHUP or restart.
    Rotate,
}

fn who() -> String {
    match crate::secrets::fsutil::effective_uid() {
        Ok(uid) => format!("cli:uid={uid}"),
        Err(_) => "cli".to_string(),
    }
}

pub fn run(cmd: TokenCmd, globals: &Globals) -> CmdResult {
    let config = globals.load_config()?;
    crate::state::Home::create(&globals.home)?;
    let mut store = crate::secrets::SecretStore::open(&globals.home, &config.secrets)?;
    let gate = super::admin_gate(globals, &config, &mut store)?;
    let audit = std::sync::Arc::clone(gate.audit());
    let action = match cmd {
        TokenCmd::Show => crate::policy::Action::TokenShow,
        TokenCmd::Rotate => crate::policy::Action::TokenRotate,
    };
    if let Some(refused) = super::operator_may(&gate, &config, action)? {
        audit.shutdown().map_err(|e| e.to_string())?;
        return Ok(refused);
    }
    let resource = format!("secret:{GATEWAY_TOKEN_SECRET}");
    // The record first: an action that cannot be audited does not happen.
    let record = |action: &str| {
        audit
            .append(chitin_audit::RecordInput::admin(
                who(),
                action,
                resource.clone(),
                json!({}),
            ))
            .map_err(|e| format!("audit record could not be written ({e}); nothing done"))
    };
    match cmd {
        TokenCmd::Show => {
            let token = match gateway_token::get(&store)? {
                Some(t) => {
                    record("gateway.token.show")?;
                    t
                }
                None => {
                    record("gateway.token.create")?;
                    gateway_token::ensure(&mut store)?.0
                }
            };
            println!("{}", token.expose());
        }
        TokenCmd::Rotate => {
            record("gateway.token.rotate")?;
            gateway_token::rotate(&mut store)?;
            eprintln!(
                "rotated the gateway token; send SIGHUP to a running gateway (or restart it), then `chitin token show`"
            );
        }
    }
    audit.shutdown().map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}
