//! `chitin usage [--by user|model|session|day|tool|task] [--since D] [--json]`: spend and
//! tokens from the same data and the same function as `GET /api/v1/usage`
//! (`agent::usage::report`), decided as `usage.read` for the CLI operator.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;

use super::{CmdResult, Globals, Runtime};
use crate::agent::usage::{self, UsageBy};

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// Group by user, model, session, day (UTC), tool or task (chat, channel, cron, webhook,
    /// workflow)
    #[arg(long, value_name = "KEY", default_value = "user")]
    by: String,
    /// Only model calls since then: days or hours back (7d, 12h), a date (2026-11-21, UTC) or
    /// an RFC 3339 time
    #[arg(long, value_name = "D")]
    since: Option<String>,
    /// Print JSON (the API's answer) instead of a table
    #[arg(long)]
    json: bool,
}

pub fn run(args: UsageArgs, globals: &Globals) -> CmdResult {
    let Some(by) = UsageBy::parse(&args.by) else {
        return Err(format!("--by must be {}", UsageBy::NAMES).into());
    };
    let rt = Runtime::open(globals)?;
    let now = rt.clock.now_ms();
    let since = match &args.since {
        None => None,
        Some(s) => Some(
            usage::parse_since(s, now)
                .ok_or_else(|| usage::SINCE_HELP.replace("since", "--since"))?,
        ),
    };
    if let Some(refused) =
        super::operator_may(&rt.gate, &rt.config, crate::policy::Action::UsageRead)?
    {
        return Ok(refused);
    }
    let r = usage::report(&rt.store, by, since, now, &rt.config.budgets)?;
    // Written with errors checked: `chitin usage | head` ends quietly (a closed pipe is
    // a BrokenPipe error, which `cli::main` turns into a quiet exit).
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", usage::report_json(&r))?;
        return Ok(ExitCode::SUCCESS);
    }
    let v = crate::approvals::visible;
    writeln!(
        out,
        "{:<32} {:>12} {:>7} {:>6} {:>12} {:>12}",
        by.as_str(),
        "cost_usd",
        "calls",
        "runs",
        "input_tok",
        "output_tok"
    )?;
    for g in &r.groups {
        writeln!(
            out,
            "{:<32} {:>12.4} {:>7} {:>6} {:>12} {:>12}{}",
            v(g.key.as_deref().unwrap_or("(none)")),
            g.cost_usd,
            g.calls,
            g.runs,
            g.input_tokens,
            g.output_tokens,
            if g.unpriced_calls > 0 {
                format!("  ({} unpriced)", g.unpriced_calls)
            } else {
                String::new()
            }
        )?;
    }
    let t = &r.total;
    writeln!(
        out,
        "{:<32} {:>12.4} {:>7} {:>6} {:>12} {:>12}",
        "total", t.cost_usd, t.calls, t.runs, t.input_tokens, t.output_tokens
    )?;
    for b in &r.budgets {
        writeln!(
            out,
            "budget {}: {:.4} USD spent today (UTC){}",
            v(&b.user),
            b.spent_today_usd,
            b.daily_limit_usd
                .map_or_else(|| ", no limit".to_string(), |l| format!(" of {l:.4}"))
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
