//! Several `chitin gateway` processes on one PostgreSQL database (issue #18), measured from
//! outside with a zero-latency fake OpenAI-compatible model on loopback:
//!
//! - chat turns/s and p50/p99 latency with 1, 2 and 3 replicas (a fresh database each),
//!   `clients` concurrent clients, each continuing its own session, either with every turn
//!   sent to the next replica (round robin: a session's turns hop between replicas) or with
//!   each client staying on one replica (a sticky load balancer);
//! - the audit records appended per second through PostgreSQL during that load (every replica
//!   appends to the one chain in the database; the audit crate's own bench measures the log
//!   alone: `cargo bench -p chitin-audit --features postgres --bench audit -- --postgres`);
//! - take-over: `kill -9` of the replica running a session's turn (the model holds the turn),
//!   then the session's next turn sent to a survivor: the time from the kill until that turn
//!   is answered, and until the killed turn's run is finished by a survivor, for `lease_ms`.
//!
//! `cargo bench --bench replicas` runs the full sizes (release). Without `--bench` (under
//! `cargo test --workspace --bench replicas`, debug) it does a short smoke run of every part.
//! PostgreSQL on 127.0.0.1:5432 (or `CHITIN_TEST_PG_URL`), as for the tests.

#[path = "support/stats.rs"]
mod stats;
use stats::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
use chitin_store::testing::TestPg;
use chitin_store::{Db, params};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PASS: &str = "bench-pass";

/// What every replica shares besides the database (see `docs/storage.md`): the secret store
/// with its identity (the vault's data keys are the database's).
const SHARED_FILES: [&str; 2] = ["secrets.age", "secrets.identity.age"];

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Replica {
    child: Option<Child>,
    port: u16,
}

impl Replica {
    fn pid(&self) -> String {
        self.child
            .as_ref()
            .map_or_else(String::new, |c| c.id().to_string())
    }

    /// `kill -9`, and reaps it.
    fn kill(&mut self) -> Result<(), BoxError> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// One deployment's replicas: their state dirs under `dir`, one database.
struct Deployment {
    replicas: Vec<Replica>,
    token: String,
    db: Db,
    _pg: TestPg,
    _dir: tempfile::TempDir,
}

fn write_private(path: &Path, text: &str) -> Result<(), BoxError> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(())
}

async fn start_one(home: &Path, client: &reqwest::Client) -> Result<Replica, BoxError> {
    let port = free_port()?;
    let child = Command::new(env!("CARGO_BIN_EXE_chitin"))
        .args(["gateway", "--bind", &format!("127.0.0.1:{port}")])
        .env("CHITIN_HOME", home)
        .env("CHITIN_PASSPHRASE", PASS)
        .env("CHITIN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let r = Replica {
        child: Some(child),
        port,
    };
    let url = format!("http://127.0.0.1:{port}/ready");
    let t = Instant::now();
    loop {
        if let Ok(resp) = client.get(&url).send().await
            && resp.status().is_success()
        {
            return Ok(r);
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err(format!("the gateway in {} did not become ready", home.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Deployment {
    /// `n` replicas with the same config and secret store on a fresh database.
    async fn start(
        n: usize,
        fake: &FakeServer,
        lease_ms: i64,
        client: &reqwest::Client,
    ) -> Result<Self, BoxError> {
        let pg = TestPg::new()?;
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
        let config = format!(
            "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n\n[gateway]\nworkspace = \"../ws\"\nauth_max_failures = 100000\n\n[agent]\nmodel = \"fake/m\"\nmax_concurrent_runs = 64\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\nlease_ms = {lease_ms}\n",
            fake.base_url(),
            pg.url()
        );
        let homes: Vec<PathBuf> = (0..n)
            .map(|i| -> Result<PathBuf, BoxError> {
                let home = dir.path().join(format!("r{i}")).join("home");
                std::fs::create_dir_all(&home)?;
                std::fs::set_permissions(
                    &home,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )?;
                write_private(&home.join("chitin.toml"), &config)?;
                Ok(home)
            })
            .collect::<Result<_, _>>()?;
        // The first creates the secret store, migrates the database and answers a turn (the
        // owner's data key); the others start from a copy of its store and keys.
        let mut replicas = vec![start_one(&homes[0], client).await?];
        let out = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["token", "show"])
            .env("CHITIN_HOME", &homes[0])
            .env("CHITIN_PASSPHRASE", PASS)
            .output()?;
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        chat(client, replicas[0].port, &token, "first").await?;
        for home in &homes[1..] {
            for f in SHARED_FILES {
                std::fs::copy(homes[0].join(f), home.join(f))?;
            }
        }
        let rest = futures_util::future::join_all(homes[1..].iter().map(|h| start_one(h, client)));
        for r in rest.await {
            replicas.push(r?);
        }
        let db = Db::postgres_unmigrated(&pg.config())?;
        Ok(Self {
            replicas,
            token,
            db,
            _pg: pg,
            _dir: dir,
        })
    }

    fn count(&self, sql: &str) -> Result<i64, BoxError> {
        Ok(self
            .db
            .with(|c| c.query_row(sql, params![])?.get::<i64>(0))?)
    }

    fn cpu(&self) -> f64 {
        self.replicas.iter().map(|r| cpu_seconds_of(&r.pid())).sum()
    }
}

async fn chat(
    client: &reqwest::Client,
    port: u16,
    token: &str,
    user: &str,
) -> Result<Duration, BoxError> {
    let t = Instant::now();
    let r = client
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .bearer_auth(token)
        .json(&serde_json::json!({"model": "chitin", "user": user,
                                  "messages": [{"role": "user", "content": "What is on my list today?"}]}))
        .send()
        .await?;
    if !r.status().is_success() {
        return Err(format!("status {}: {}", r.status(), r.text().await?).into());
    }
    let _ = r.bytes().await?;
    Ok(t.elapsed())
}

/// Turns/s and latency with `n` replicas: with `hop`, each client sends every turn of its
/// session to the next replica; without, client `k` stays on replica `k % n` (a sticky load
/// balancer).
async fn throughput(
    n: usize,
    hop: bool,
    clients: usize,
    per_client: usize,
    fake: &FakeServer,
    client: &reqwest::Client,
) -> Result<(), BoxError> {
    let d = Deployment::start(n, fake, 30_000, client).await?;
    let ports: Arc<Vec<u16>> = Arc::new(d.replicas.iter().map(|r| r.port).collect());
    let token = Arc::new(d.token.clone());
    // Warm-up: every replica answers a few turns.
    for (i, p) in ports.iter().enumerate() {
        for j in 0..3 {
            chat(client, *p, &token, &format!("warm{i}-{j}")).await?;
        }
    }
    let audit0 = d.count("SELECT COUNT(*) FROM audit_records")?;
    let cpu0 = d.cpu();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let (client, token, ports) = (client.clone(), Arc::clone(&token), Arc::clone(&ports));
        tasks.push(tokio::spawn(async move {
            let mut d = Vec::new();
            for j in 0..per_client {
                let port = ports[(k + if hop { j } else { 0 }) % ports.len()];
                d.push(chat(&client, port, &token, &format!("client{k}")).await?);
            }
            Ok::<_, BoxError>(d)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = t.elapsed();
    let cpu = d.cpu() - cpu0;
    let records = d.count("SELECT COUNT(*) FROM audit_records")? - audit0;
    all.sort();
    let turns = all.len();
    println!(
        "{n} replica(s), {}, {clients} clients x {per_client} turns: {turns} turns in {wall:.2?} = {:.1} turns/s, p50={:.2?} p99={:.2?}, audit {records} records = {:.0} appends/s ({:.1}/turn), gateways' cpu/turn={:.2} ms",
        if hop {
            "sessions hop"
        } else {
            "sessions sticky"
        },
        turns as f64 / wall.as_secs_f64(),
        pct(&all, 0.5),
        pct(&all, 0.99),
        records as f64 / wall.as_secs_f64(),
        records as f64 / turns.max(1) as f64,
        cpu * 1000.0 / turns.max(1) as f64,
    );
    Ok(())
}

/// Kill -9 of the replica running a session's turn; the session's next turn on a survivor.
async fn take_over(
    lease_ms: i64,
    fake: &FakeServer,
    client: &reqwest::Client,
) -> Result<(), BoxError> {
    let mut d = Deployment::start(2, fake, lease_ms, client).await?;
    let (p0, p1) = (d.replicas[0].port, d.replicas[1].port);
    let token = d.token.clone();
    chat(client, p0, &token, "taken").await?;
    // The next turn is held by the model on replica 0.
    fake.push(Step::Hang);
    let asked = fake.requests().len();
    let held = {
        let (client, token) = (client.clone(), token.clone());
        tokio::spawn(async move { chat(&client, p0, &token, "taken").await })
    };
    let t = Instant::now();
    while fake.requests().len() == asked {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the held turn never reached the model".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.replicas[0].kill()?;
    let killed = Instant::now();
    let _ = held.await?; // the connection to the dead replica fails
    chat(client, p1, &token, "taken").await?;
    let next_turn = killed.elapsed();
    // The killed turn's run, finished by the survivor.
    let unfinished = "SELECT COUNT(*) FROM runs WHERE session_key = 'api:taken' AND status NOT IN ('completed', 'failed', 'cancelled', 'timed_out', 'interrupted')";
    while d.count(unfinished)? > 0 {
        if killed.elapsed() > Duration::from_secs(300) {
            return Err("the killed replica's run was not taken over".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let adopted = killed.elapsed();
    let completed = d.count(
        "SELECT COUNT(*) FROM runs WHERE session_key = 'api:taken' AND status = 'completed'",
    )?;
    println!(
        "take-over with lease_ms = {lease_ms}: kill -9 -> the session's next turn answered by the survivor in {next_turn:.2?}; the killed turn's run finished by the survivor {adopted:.2?} after the kill ({completed} of 3 runs completed)"
    );
    Ok(())
}

async fn main_async(full: bool) -> Result<(), BoxError> {
    let (clients, per_client, leases) = if full {
        (24, 50, vec![3_000, 10_000])
    } else {
        (2, 2, vec![3_000])
    };
    let fake = FakeOpenAi::start(vec![]).await?;
    fake.set_fallback(Step::Reply(Reply::text([
        "Hello", ", ", "this ", "is ", "an ", "answer.",
    ])));
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()?;
    throughput(1, false, clients, per_client, &fake, &client).await?;
    for n in 2..=3 {
        for hop in [true, false] {
            throughput(n, hop, clients, per_client, &fake, &client).await?;
        }
    }
    for lease_ms in leases {
        take_over(lease_ms, &fake, &client).await?;
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let full = std::env::args().any(|a| a == "--bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(main_async(full))
}
