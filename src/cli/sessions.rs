//! `chitin sessions list [--json]`, `chitin sessions show KEY [--json]`.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::{CmdResult, Globals, Runtime};
use crate::agent::{Stored, Transcripts};
use crate::clock::rfc3339;

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// Sessions, most recently active first.
    List {
        #[arg(long)]
        json: bool,
        /// Only this user's sessions.
        #[arg(long, value_name = "USER")]
        user: Option<String>,
    },
    /// One session's transcript (decrypted), with its runs' tool calls and decisions.
    Show {
        key: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SessionsCmd, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    // Listing and showing sessions opens every user's transcripts: decided as `data.export`
    // for the CLI operator, before anything is decrypted.
    if let Some(refused) =
        super::operator_may(&rt.gate, &rt.config, crate::policy::Action::DataExport)?
    {
        return Ok(refused);
    }
    let vault = crate::vault::Vault::for_db(
        &globals.home,
        rt.store.db(),
        &mut rt.secrets.write(),
        std::sync::Arc::clone(&rt.clock),
    )?;
    let t = Transcripts::new(std::sync::Arc::clone(&rt.store), std::sync::Arc::new(vault));
    let v = crate::approvals::visible;
    // Written with errors checked: `chitin sessions ... | head` ends quietly.
    let mut out = std::io::stdout().lock();
    match cmd {
        SessionsCmd::List { json, user } => {
            let list = t.sessions(user.as_deref())?;
            if json {
                writeln!(out, "{}", serde_json::to_string(&list)?)?;
            } else if list.is_empty() {
                writeln!(out, "no sessions")?;
            } else {
                for s in &list {
                    writeln!(
                        out,
                        "{}  user={}  channel={}  messages={}  runs={}  updated {}{}",
                        v(&s.key),
                        v(&s.user),
                        v(&s.channel),
                        s.messages,
                        s.runs,
                        rfc3339(s.updated_ms),
                        if s.tainted { "  tainted" } else { "" }
                    )?;
                }
            }
        }
        SessionsCmd::Show { key, json } => {
            let s = t.session(&key)?;
            let msgs = t.messages_after(&key, 0)?;
            if json {
                let m: Vec<_> = msgs
                    .iter()
                    .map(|e| json!({"seq": e.seq, "run_id": e.run_id, "at": rfc3339(e.created_ms), "message": e.message}))
                    .collect();
                writeln!(out, "{}", json!({"session": s, "messages": m}))?;
                return Ok(ExitCode::SUCCESS);
            }
            writeln!(
                out,
                "session {}  user={}  channel={}  created {}{}",
                v(&s.key),
                v(&s.user),
                v(&s.channel),
                rfc3339(s.created_ms),
                if s.tainted { "  tainted" } else { "" }
            )?;
            for e in &msgs {
                let at = rfc3339(e.created_ms);
                match &e.message {
                    Stored::User { text, from, .. } => {
                        writeln!(out, "[{at}] {}: {}", v(from), v(text))?
                    }
                    Stored::Assistant { text, tool_calls } => {
                        if !text.is_empty() {
                            writeln!(out, "[{at}] assistant: {}", v(text))?;
                        }
                        for c in tool_calls {
                            writeln!(
                                out,
                                "[{at}] assistant calls {}({})",
                                v(&c.name),
                                v(&c.arguments_json)
                            )?;
                        }
                    }
                    Stored::Tool(t) => {
                        writeln!(
                            out,
                            "[{at}] tool {}: decision={} outcome={}",
                            v(&t.tool),
                            v(&t.decision),
                            v(&t.outcome)
                        )?;
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
