//! `chitin approvals list | show CODE|ID | approve CODE|ID | deny CODE|ID`.

use std::process::ExitCode;

use clap::Subcommand;

use super::{CmdResult, Globals};
use crate::approvals::Approval;

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// Open approval requests (all of them with --all).
    List {
        #[arg(long)]
        json: bool,
        #[arg(long)]
        all: bool,
    },
    /// Everything one approval binds, every argument in full and escaped (control and bidi
    /// characters made visible).
    Show {
        /// The approval's code or id (an id names exactly one approval).
        #[arg(value_name = "CODE|ID")]
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Grant the approval with this code or id (single use, for exactly the request it names).
    Approve {
        #[arg(value_name = "CODE|ID")]
        code: String,
    },
    /// Deny the approval with this code or id; the action is refused.
    Deny {
        #[arg(value_name = "CODE|ID")]
        code: String,
    },
}

/// One approval per line; every field a requester chose is escaped so no control or bidi
/// character can rewrite what the operator sees. The summary names every argument (large
/// ones abbreviated); `chitin approvals show` prints them whole.
fn line(a: &Approval) -> String {
    let v = crate::approvals::visible;
    format!(
        "{}  {:<8}  expires {}  {}: {}  (requested by {}; id {})",
        a.code,
        a.status,
        a.expires_at,
        v(&a.tool),
        v(&a.summary),
        v(&a.requester),
        v(&a.id)
    )
}

pub fn run(cmd: ApprovalsCmd, globals: &Globals) -> CmdResult {
    let rt = super::Runtime::open(globals)?;
    let approvals = rt.approvals();
    match cmd {
        ApprovalsCmd::List { json, all } => {
            let list = approvals.list(all)?;
            if json {
                let list: Vec<serde_json::Value> = list.iter().map(|a| a.to_json(false)).collect();
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no {}approvals", if all { "" } else { "open " });
            } else {
                for a in &list {
                    println!("{}", line(a));
                }
            }
        }
        ApprovalsCmd::Show { key, json } => {
            let a = approvals.find(&crate::approvals::ApprovalRef::parse(&key))?;
            if json {
                println!("{}", serde_json::to_string(&a.to_json(true))?);
            } else {
                print!("{}", a.render_full());
            }
        }
        // The approver is the CLI operator (`[cli] operator`, default the owner); Cedar decides
        // whether they may (`approval.grant`). There is no `--as`.
        ApprovalsCmd::Approve { code } => {
            let a = approvals.resolve(&code, rt.config.operator(), true)?;
            println!(
                "approved {}: {}: {}",
                a.code,
                crate::approvals::visible(&a.tool),
                crate::approvals::visible(&a.summary)
            );
        }
        ApprovalsCmd::Deny { code } => {
            let a = approvals.resolve(&code, rt.config.operator(), false)?;
            println!(
                "denied {}: {}: {}",
                a.code,
                crate::approvals::visible(&a.tool),
                crate::approvals::visible(&a.summary)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
