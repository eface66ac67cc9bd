//! `chitin status [--json]`: one screen on the installation — whether the gateway is up and
//! ready, whether the configured model's provider answers an HTTP request (its model list,
//! with the key released through the gate), the channels, pending
//! approvals, the last backup and the audit head. Exit 0 when the gateway runs and is ready,
//! 1 otherwise (scripts can wait on it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};

use super::{CmdResult, Globals, Runtime};
use crate::clock::rfc3339;
use crate::store::params;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of the screen.
    #[arg(long)]
    json: bool,
}

/// How long a probe (the gateway's `/ready`, the provider's model list) may take.
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

/// The URL of the provider's model list: an HTTP request every provider answers cheaply
/// (no tokens are spent) and that proves both that an HTTP server answers and whether it
/// accepts the key.
fn models_url(p: &crate::config::providers::ProviderConfig) -> Result<reqwest::Url, String> {
    let (url, _) = p.parsed_base_url()?;
    let base = url.as_str().trim_end_matches('/');
    let path = match p.kind {
        crate::config::providers::ProviderKind::Anthropic => "/v1/models",
        crate::config::providers::ProviderKind::Openai => "/models",
    };
    reqwest::Url::parse(&format!("{base}{path}")).map_err(|e| e.to_string())
}

/// The configured model and whether its provider answers: `GET` of the provider's model list
/// (`{base_url}/models` for OpenAI-compatible servers, `{base_url}/v1/models` for Anthropic)
/// with the API key, which is released only through the gate (`secret.use` by
/// `Chitin::Provider::"<name>"` for the base URL's host, audited) exactly as for a chat. The
/// answer says whether an HTTP server is there (`reachable`), whether it took the key
/// (`key_accepted`: `null` when no key is configured or the server does not serve a list) and
/// whether it lists the model.
fn model_status(rt: &Runtime) -> Value {
    let model = rt.config.agent.model.trim();
    if model.is_empty() {
        return json!({"model": null, "reachable": null,
                      "detail": "no model is configured (`chitin onboard`, or [agent] model and [[providers]] in chitin.toml)"});
    }
    let (provider, model_id) = model.split_once('/').unwrap_or((model, ""));
    let Some(p) = rt.config.providers.iter().find(|p| p.name == provider) else {
        return json!({"model": model, "reachable": false,
                      "detail": format!("no [[providers]] named `{provider}`")});
    };
    let base = p.base_url_or_default().to_string();
    let fail = |detail: String| json!({"model": model, "base_url": base, "reachable": false, "detail": detail});
    let url = match models_url(p) {
        Ok(u) => u,
        Err(e) => return fail(e),
    };
    let host = url
        .host_str()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    // The key, through the gate like the agent's (a refusal is reported, not an error).
    let key = match p.api_key.as_ref().map(|k| &k.0) {
        None => None,
        Some(secret) => {
            let env: crate::providers::keys::EnvFn = std::sync::Arc::new(|var: &str| {
                std::env::var(var)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| crate::secrets::SecretValue::from_str_copy(&v))
            });
            let keys =
                crate::providers::GateKeySource::from_store(rt.gate.clone(), rt.secrets.clone())
                    .with_env(env);
            let req = crate::providers::KeyRequest {
                provider: &p.name,
                secret,
                host: &host,
            };
            match crate::providers::KeySource::key_for(&keys, &req) {
                Ok(k) => Some(k),
                Err(e) => {
                    return json!({"model": model, "base_url": base, "reachable": null,
                                  "key_accepted": null,
                                  "detail": format!("not probed: the API key was not released ({e})")});
                }
            }
        }
    };
    crate::providers::init_tls();
    let probe = async {
        let client = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let mut req = client.get(url.clone());
        if let Some(k) = &key {
            let k = String::from_utf8_lossy(k.expose()).into_owned();
            let k = zeroize::Zeroizing::new(k);
            req = match p.kind {
                crate::config::providers::ProviderKind::Anthropic => req
                    .header("x-api-key", k.as_str())
                    .header("anthropic-version", "2023-06-01"),
                crate::config::providers::ProviderKind::Openai => req.bearer_auth(k.as_str()),
            };
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        Ok::<_, reqwest::Error>((status, body))
    };
    let rt_io = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(format!("cannot start the I/O runtime: {e}")),
    };
    let (status, body) = match rt_io.block_on(probe) {
        Ok(r) => r,
        Err(e) => {
            // reqwest's message has the cause chain ("connection refused", "invalid HTTP").
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why.push_str(&format!(": {s}"));
                src = s.source();
            }
            return fail(format!("GET {url}: {why}"));
        }
    };
    let code = status.as_u16();
    let listed: Option<bool> = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        let ids = v["data"].as_array()?;
        Some(ids.iter().any(|m| m["id"].as_str() == Some(model_id)))
    });
    let (key_accepted, detail) = match code {
        200..=299 => (
            key.as_ref().map(|_| true),
            match listed {
                Some(true) => format!("GET {url}: HTTP {code}, the model is listed"),
                Some(false) => {
                    format!("GET {url}: HTTP {code}, but `{model_id}` is not in the list")
                }
                None => format!("GET {url}: HTTP {code}"),
            },
        ),
        401 | 403 => (
            Some(false),
            format!(
                "GET {url}: HTTP {code}: the server refused the API key (store the right one with `chitin secrets set`)"
            ),
        ),
        _ => (
            None,
            format!("GET {url}: HTTP {code} (an HTTP server answers; it does not list models)"),
        ),
    };
    json!({"model": model, "base_url": base, "reachable": true, "http_status": code,
           "key_accepted": key_accepted, "model_listed": listed, "detail": detail})
}

fn channels_status(rt: &Runtime) -> Result<Value, super::BoxError> {
    let mut list = Vec::new();
    for c in &rt.config.channels {
        let (connected, error, reported): (Option<bool>, Option<String>, Option<i64>) = rt
            .store
            .db()
            .with(|conn| -> Result<_, chitin_store::Error> {
                let Some(r) = conn.query_opt(
                    "SELECT connected, last_error, updated_ms FROM channel_state WHERE channel = ?1",
                    params![c.name],
                )?
                else {
                    return Ok((None, None, None));
                };
                Ok((
                    r.get::<Option<i64>>(0)?.map(|v| v != 0),
                    r.get(1)?,
                    r.get(2)?,
                ))
            })
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
    let now = rt.clock.now_ms();
    Ok(rt.store.db().with(|c| {
        c.query_row(
            "SELECT COUNT(*) FROM approvals WHERE status = 'pending' AND expires_ms > ?1",
            params![now],
        )?
        .get::<i64>(0)
    })?)
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

/// The live gateway replicas on this store (`replicas` heartbeat rows) and the leases each
/// holds (issue #18); one on SQLite.
fn replicas_status(rt: &Runtime) -> Result<Value, super::BoxError> {
    Ok(Value::Array(crate::cluster::live_replicas(
        rt.store.db(),
        rt.clock.now_ms(),
    )?))
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
        "replicas": replicas_status(&rt)?,
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
        Some(name) if m["reachable"] == json!(true) && m["key_accepted"] == json!(false) => {
            format!(
                "{name}: reachable but the key is REFUSED ({})",
                s(&m["detail"])
            )
        }
        Some(name) if m["reachable"] == json!(true) => {
            format!("{name}: reachable ({})", s(&m["detail"]))
        }
        Some(name) if m["reachable"].is_null() => {
            format!("{name}: not probed ({})", s(&m["detail"]))
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
    if let Some(list) = r["replicas"].as_array() {
        println!("  replicas   {}", crate::cluster::describe(list, None));
    }
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
