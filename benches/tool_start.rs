//! `POST /tools/invoke` of `list_dir` and `exec` through the real gateway binary (issue #21:
//! `list_dir` p50 ≤ 3 ms): the gate (Cedar), the audit record, and the listing (read by the
//! gateway through directory descriptors; through a symlink, by the in-sandbox file helper,
//! which costs a sandbox start) or the sandboxed program, end to end over loopback HTTP.
//!
//! Two gateways run side by side on copies of one state: one with `chitin-sandbox-launch`
//! next to its `chitin` binary (the small launcher, forked by the zygote), one started from a
//! copy of `chitin` alone (so it falls back to `chitin sandbox exec`, the launcher before issue
//! #21). Requests alternate between them, so machine load hits both alike.
//!
//! `cargo bench --bench tool_start [-- RUNS]` (default 200 per variant). Under
//! `cargo test --all-targets` (no `--bench`) it does a 3-request smoke run.

#[path = "support/stats.rs"]
mod stats;
use stats::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Gateway {
    child: Child,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start(bin: &Path, home: &Path, client: &reqwest::Client) -> Result<Gateway, BoxError> {
    let port = free_port()?;
    let child = Command::new(bin)
        .args(["gateway", "--bind", &format!("127.0.0.1:{port}")])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "bench-pass")
        .env("CHITIN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let gw = Gateway { child, port };
    let t = Instant::now();
    let url = format!("http://127.0.0.1:{port}/ready");
    loop {
        if let Ok(r) = client.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(gw);
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the gateway did not become ready".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn token(bin: &Path, home: &Path) -> Result<String, BoxError> {
    let out = Command::new(bin)
        .args(["token", "show"])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", "bench-pass")
        .output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

async fn invoke(
    client: &reqwest::Client,
    gw: &Gateway,
    token: &str,
    body: &serde_json::Value,
) -> Result<Duration, BoxError> {
    let t = Instant::now();
    let r = client
        .post(format!("http://127.0.0.1:{}/tools/invoke", gw.port))
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = r.status();
    let text = r.text().await?;
    let d = t.elapsed();
    if !status.is_success() || text.contains("\"error\"") {
        return Err(format!("status {status}: {text}").into());
    }
    Ok(d)
}

fn line(name: &str, mut d: Vec<Duration>) -> Duration {
    d.sort();
    let p50 = pct(&d, 0.5);
    println!(
        "{name:<58} n={:<5} p50={:>8.2?} p99={:>8.2?}",
        d.len(),
        p50,
        pct(&d, 0.99)
    );
    p50
}

fn setup_home(base: &Path, name: &str) -> Result<PathBuf, BoxError> {
    let home = base.join(name);
    std::fs::create_dir(&home)?;
    std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let ws = base.join(format!("{name}-ws"));
    std::fs::create_dir(&ws)?;
    for i in 0..20 {
        std::fs::write(ws.join(format!("note{i}.md")), format!("note {i}\n"))?;
    }
    // A path through a symlink is listed by the sandboxed helper, not by the gateway.
    std::os::unix::fs::symlink(".", ws.join("via-link"))?;
    let cfg = home.join("chitin.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nworkspace = \"../{name}-ws\"\nauth_max_failures = 100000\n\n[sandbox]\ncgroup = \"off\"\n"
        ),
    )?;
    std::fs::set_permissions(&cfg, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(home)
}

async fn main_async(runs: usize) -> Result<(), BoxError> {
    let chitin = PathBuf::from(env!("CARGO_BIN_EXE_chitin"));
    let small = chitin.with_file_name("chitin-sandbox-launch");
    if !small.is_file() {
        return Err(format!(
            "{} is missing (cargo builds it with chitin)",
            small.display()
        )
        .into());
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    // The fallback gateway: a copy of `chitin` with no launcher next to it.
    let alone = dir.path().join("bin");
    std::fs::create_dir(&alone)?;
    let old_bin = alone.join("chitin");
    std::fs::copy(&chitin, &old_bin)?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let new_home = setup_home(dir.path(), "new")?;
    let old_home = setup_home(dir.path(), "old")?;
    let new_gw = start(&chitin, &new_home, &client).await?;
    let old_gw = start(&old_bin, &old_home, &client).await?;
    let new_tok = token(&chitin, &new_home)?;
    let old_tok = token(&old_bin, &old_home)?;
    let list = serde_json::json!({"tool": "list_dir", "args": {"path": "."}});
    let linked = serde_json::json!({"tool": "list_dir", "args": {"path": "via-link"}});
    let exec = serde_json::json!({"tool": "exec", "args": {"argv": ["/bin/true"]}});
    for _ in 0..5 {
        invoke(&client, &new_gw, &new_tok, &list).await?;
        invoke(&client, &new_gw, &new_tok, &linked).await?;
    }
    let (mut nl, mut ol, mut ne, mut oe) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        nl.push(invoke(&client, &new_gw, &new_tok, &list).await?);
        ol.push(invoke(&client, &new_gw, &new_tok, &linked).await?);
        ne.push(invoke(&client, &new_gw, &new_tok, &exec).await?);
        oe.push(invoke(&client, &old_gw, &old_tok, &exec).await?);
    }
    println!("POST /tools/invoke, {runs} interleaved requests per variant (cgroup = off)");
    line("list_dir, read by the gateway (descriptors)", nl);
    line("list_dir through a symlink (sandboxed helper, zygote)", ol);
    line("exec /bin/true, chitin-sandbox-launch", ne);
    line(
        "exec /bin/true, chitin sandbox exec (fallback, before #21)",
        oe,
    );
    drop(new_gw);
    drop(old_gw);
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let benching = args.iter().any(|a| a == "--bench");
    let runs: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(if benching { 200 } else { 3 });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(main_async(runs)) {
        eprintln!("tool_start: {e}");
        std::process::exit(1);
    }
}
