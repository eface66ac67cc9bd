//! `chitin status [--json]`: one screen on the installation — whether the gateway is up and
//! ready, whether the configured model's server can be reached, the channels, pending
//! approvals, the last backup and the audit head. Exit 0 when the gateway runs and is ready,
//! 1 otherwise (scripts can wait on it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::{CmdResult, Globals, Runtime};
use crate::clock::rfc3339;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of the screen.
    #[arg(long)]
    json: bool,
}

/// How long a probe (the gateway's `/ready`, the model server's port) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET path` on the gateway over plain HTTP/1.1 (the gateway listens on loopback unless TLS
/// is configured); `Ok((status, body))`.
fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    s.set_read_timeout(Some(PROBE_TIMEOUT))?;
    s.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let auth = bearer.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\r\n"
    )?;
    let mut raw = Vec::new();
    s.take(1 << 20).read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    // `/ready` answers with a fixed length (no chunking) from axum's Json.
    Ok((status, body.to_string()))
}

/// Whether a gateway holds the state dir's lock (one runs on it).
fn gateway_holds_lock(globals: &Globals) -> bool {
    matches!(
        crate::lifecycle::GatewayLock::acquire(&globals.home),
        Err(crate::lifecycle::LifecycleError::GatewayRunning { .. })
    )
}

/// The gateway: running (lock), answering, ready, and which readiness checks fail.
fn gateway_status(globals: &Globals, rt: &Runtime, token: Option<&str>) -> Value {
    let running = gateway_holds_lock(globals);
    // Where the running gateway said it listens (a --bind or --port may differ from the
    // config), else the configured address.
    let listening = rt
        .store
        .meta(crate::gateway::LISTENING_META)
        .ok()
        .flatten()
        .filter(|_| running);
    let (bind, url) = match listening.as_deref().and_then(|u| {
        let rest = u.split_once("://")?.1;
        Some((rest.parse::<SocketAddr>().ok()?, u.to_string()))
    }) {
        Some((addr, url)) => (Some(addr), Some(url)),
        None => {
            let bind = rt.config.gateway.bind_addr(None).ok();
            let scheme = if rt.config.gateway.tls() {
                "https"
            } else {
                "http"
            };
            (bind, bind.map(|b| format!("{scheme}://{b}")))
        }
    };
    let mut out = json!({"running": running, "url": url, "answering": false, "ready": false,
                         "failing": []});
    if !running {
        return out;
    }
    let Some(bind) = bind else { return out };
    if rt.config.gateway.tls() {
        // This probe speaks plain HTTP: with TLS it only says whether the port answers.
        out["answering"] = json!(TcpStream::connect_timeout(&bind, PROBE_TIMEOUT).is_ok());
        out["ready"] = Value::Null;
        return out;
    }
    match http_get(bind, "/ready", token) {
        Ok((status, body)) => {
            out["answering"] = json!(status != 0);
            out["ready"] = json!(status == 200);
            if let Ok(v) = serde_json::from_str::<Value>(&body)
                && let Some(checks) = v["checks"].as_object()
            {
                let failing: Vec<Value> = checks
                    .iter()
                    .filter(|(_, c)| c["ok"] == json!(false))
                    .map(|(name, c)| json!({"check": name, "detail": c["detail"]}))
                    .collect();
                out["failing"] = Value::Array(failing);
            }
        }
        Err(e) => out["error"] = json!(e.to_string()),
    }
    out
}

/// The configured model and whether its server's port answers (a TCP connect: no request is
/// sent and no key leaves the store).
fn model_status(rt: &Runtime) -> Value {
    let model = rt.config.agent.model.trim();
    if model.is_empty() {
        return json!({"model": null, "reachable": null,
                      "detail": "no model is configured (`chitin onboard`, or [agent] model and [[providers]] in chitin.toml)"});
    }
    let provider = model.split_once('/').map_or(model, |(p, _)| p);
    let Some(p) = rt.config.providers.iter().find(|p| p.name == provider) else {
        return json!({"model": model, "reachable": false,
                      "detail": format!("no [[providers]] named `{provider}`")});
    };
    let base = p.base_url_or_default();
    let target = reqwest::Url::parse(base).ok().and_then(|u| {
        let host = u.host_str()?.trim_matches(['[', ']']).to_string();
        Some((host, u.port_or_known_default()?))
    });
    let Some((host, port)) = target else {
        return json!({"model": model, "reachable": false,
                      "detail": format!("base_url {base} has no host and port")});
    };
    let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(e) => {
            return json!({"model": model, "base_url": base, "reachable": false,
                          "detail": format!("cannot resolve {host}: {e}")});
        }
    };
    let mut last = String::from("no address");
    for a in &addrs {
        match TcpStream::connect_timeout(a, PROBE_TIMEOUT) {
            Ok(_) => {
                return json!({"model": model, "base_url": base, "reachable": true,
                              "detail": format!("{a} accepts connections")});
            }
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    json!({"model": model, "base_url": base, "reachable": false, "detail": last})
}

fn channels_status(rt: &Runtime) -> Result<Value, super::BoxError> {
    let conn = rt.store.conn()?;
    let mut list = Vec::new();
    for c in &rt.config.channels {
        let (connected, error, reported): (Option<bool>, Option<String>, Option<i64>) = conn
            .query_row(
                "SELECT connected, last_error, updated_ms FROM channel_state WHERE channel = ?1",
                [&c.name],
                |r| {
                    Ok((
                        r.get::<_, Option<i64>>(0)?.map(|v| v != 0),
                        r.get(1)?,
                        r.get(2)?,
                    ))
                },
            )
            .unwrap_or((None, None, None));
        let fresh = reported.is_some_and(|t| {
            rt.clock.now_ms().saturating_sub(t) <= 2 * crate::channels::CONNECTION_REFRESH_MS
        });
        let state = match (connected, fresh) {
            (None, _) => "never started",
            (Some(_), false) => "not running",
            (Some(true), true) => "connected",
            (Some(false), true) => "not connected",
        };
        list.push(
            json!({"name": c.name, "kind": c.kind.as_str(), "state": state,
                         "error": if fresh { error } else { None }}),
        );
    }
    Ok(Value::Array(list))
}

fn pending_approvals(rt: &Runtime) -> Result<i64, super::BoxError> {
    let conn = rt.store.conn()?;
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM approvals WHERE status = 'pending' AND expires_ms > ?1",
        [rt.clock.now_ms()],
        |r| r.get(0),
    )?)
}

fn last_backup(rt: &Runtime) -> Result<Value, super::BoxError> {
    let last_ms = rt
        .store
        .meta(crate::lifecycle::schedule::BACKUP_LAST_RUN)?
        .and_then(|v| v.parse::<i64>().ok());
    Ok(json!({
        "scheduled": !rt.config.backup.dir.is_empty(),
        "dir": (!rt.config.backup.dir.is_empty()).then(|| rt.config.backup.dir.clone()),
        "last_at": last_ms.map(rfc3339),
    }))
}

fn audit_head(rt: &Runtime) -> Result<Value, super::BoxError> {
    let reader = rt.gate.audit().reader()?;
    Ok(match reader.head()? {
        Some((seq, hash)) => json!({"seq": seq, "hash": chitin_audit::to_hex(&hash)}),
        None => json!({"seq": 0, "hash": null}),
    })
}

pub fn run(args: StatusArgs, globals: &Globals) -> CmdResult {
    let rt = Runtime::open(globals)?;
    let token = crate::secrets::gateway_token::get(&rt.secrets.read())?;
    let gateway = gateway_status(globals, &rt, token.as_ref().map(|t| t.expose()));
    drop(token);
    let report = json!({
        "home": globals.home.display().to_string(),
        "gateway": gateway,
        "model": model_status(&rt),
        "channels": channels_status(&rt)?,
        "approvals_pending": pending_approvals(&rt)?,
        "backup": last_backup(&rt)?,
        "audit_head": audit_head(&rt)?,
        "version": super::VERSION,
    });
    rt.gate.audit().shutdown()?;
    let ok =
        report["gateway"]["running"] == json!(true) && report["gateway"]["ready"] != json!(false);
    if args.json {
        println!("{report}");
    } else {
        print_screen(&report);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_screen(r: &Value) {
    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
    let g = &r["gateway"];
    let gateway = if g["running"] != json!(true) {
        "not running (start it with `chitin gateway`)".to_string()
    } else if g["answering"] != json!(true) {
        format!(
            "running but not answering at {} ({})",
            s(&g["url"]),
            s(&g["error"])
        )
    } else if g["ready"] == json!(true) {
        format!("up and ready at {}", s(&g["url"]))
    } else if g["ready"].is_null() {
        format!("up at {} (TLS: readiness not probed)", s(&g["url"]))
    } else {
        let failing: Vec<String> = g["failing"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| match f["detail"].as_str() {
                        Some(d) => format!("{}: {d}", s(&f["check"])),
                        None => s(&f["check"]),
                    })
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "up at {} but NOT ready: {}",
            s(&g["url"]),
            failing.join("; ")
        )
    };
    let m = &r["model"];
    let model = match m["model"].as_str() {
        None => s(&m["detail"]),
        Some(name) if m["reachable"] == json!(true) => {
            format!("{name}: reachable ({})", s(&m["detail"]))
        }
        Some(name) => format!("{name}: NOT reachable ({})", s(&m["detail"])),
    };
    let channels: Vec<String> = r["channels"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let mut t =
                        format!("{} ({}): {}", s(&c["name"]), s(&c["kind"]), s(&c["state"]));
                    if let Some(e) = c["error"].as_str() {
                        t.push_str(&format!(" — {e}"));
                    }
                    t
                })
                .collect()
        })
        .unwrap_or_default();
    let b = &r["backup"];
    let backup = match (b["last_at"].as_str(), b["scheduled"] == json!(true)) {
        (Some(at), _) => format!("last at {at}"),
        (None, true) => "scheduled, none made yet".into(),
        (None, false) => {
            "none scheduled (set [backup] dir and recipient, or run `chitin backup create`)".into()
        }
    };
    let a = &r["audit_head"];
    println!("Chitin {} — {}", s(&r["version"]), s(&r["home"]));
    println!("  gateway    {gateway}");
    println!("  model      {model}");
    if channels.is_empty() {
        println!("  channels   none configured");
    } else {
        println!("  channels   {}", channels.join("; "));
    }
    println!("  approvals  {} pending", r["approvals_pending"]);
    println!("  backup     {backup}");
    println!(
        "  audit      head seq {}{}",
        a["seq"],
        a["hash"]
            .as_str()
            .map(|h| format!(" ({})", h.get(..16).unwrap_or(h)))
            .unwrap_or_default()
    );
}
