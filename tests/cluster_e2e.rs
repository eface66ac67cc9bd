//! Three real `chitin gateway` processes on one PostgreSQL database (issue #18), end to end:
//!
//! - a session's turns spread over the three replicas continue one session;
//! - a WebSocket on replica A watches a run executing on replica B; the run's approval is
//!   granted through replica C; the run finishes on B and A sees `run.finished`;
//! - `kill -9` of the replica running a turn (a tool call holds it): a survivor takes the run
//!   over once its lease (`[store] lease_ms = 3000`) expired, reports the call `interrupted`
//!   (never re-run) and finishes the turn: nothing lost, nothing done twice;
//! - afterwards the shared audit chain verifies with `chitin audit verify` and the offline
//!   `chitin-audit-verify --postgres URL --pubkey FILE`;
//! - a cron job fires once per slot across the three replicas;
//! - `chitin store copy --from sqlite --to postgres` of a used SQLite deployment, continued by
//!   a gateway on PostgreSQL, its chain verified.
//!
//! What the replicas share besides the database: the same `chitin.toml` (and so the same
//! default policies and entities) and the same secret store (`secrets.age` and its identity,
//! unlocked by the same passphrase): the gateway token, the audit signing key (the chain in
//! the database is claimed by one key; a replica with another is refused) and the vault's
//! master key are in it. The vault's per-subject data keys are in the database (migration 24):
//! [`Cluster::start`] lets the first replica answer a turn first (which creates the owner's
//! data key, in the database), then copies only its secret store into the other replicas'
//! state directories, as an operator deploys them: the others have no `vault.keys` and open
//! the owner's transcripts with the key the first one made.
//!
//! Kill -9 of the replica owning a polling channel is a case of its own (channel ownership
//! leases): add it as one more `#[test]` on [`Cluster`].
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use chitin_store::testing::TestPg;
use chitin_store::{Db, params};
use futures_util::{SinkExt, StreamExt};
use harness::{Gw, Resp, free_port};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// `[store] lease_ms` of the replicas: a dead replica's run is taken over seconds later.
const LEASE_MS: i64 = 3_000;
/// How long a test waits for something the gateways do on their own (generous: a loaded
/// 2-core machine runs debug builds of three gateways).
const WAIT: Duration = Duration::from_secs(180);

/// The files every replica must share: the secret store with its identity (the data keys are
/// the database's).
const SHARED_FILES: [&str; 2] = ["secrets.age", "secrets.identity.age"];

/// The `[gateway]` keys and the tables after it of every replica's `chitin.toml` (the harness
/// writes `[secrets]` and the `[gateway]` header): the fake model, and the store in `pg`.
fn config(model_url: &str, pg: Option<&TestPg>, more: &str) -> String {
    let store = pg.map_or(String::new(), |pg| {
        format!(
            "\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\nlease_ms = {LEASE_MS}\n",
            pg.url()
        )
    });
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{model_url}\"\n{store}{more}"
    )
}

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

/// Copies the secret store of the state dir `from` into `to` (before a replica starts there).
fn share_deployment_files(from: &Path, to: &Path) {
    for f in SHARED_FILES {
        std::fs::copy(from.join(f), to.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
}

/// Replicas on one database. Fields drop in order: the gateways stop before the database goes.
struct Cluster {
    gws: Vec<Gw>,
    db: Db,
    pg: TestPg,
}

impl Cluster {
    /// `n` gateways with the same config and the same secret store: the first creates the
    /// store (and migrates the database) and runs `first_turns` (at least one turn: the
    /// owner's data key), the others start together from a copy of its store and keys.
    fn start(n: usize, pg: TestPg, cfg: &str, first_turns: impl FnOnce(&Gw)) -> Self {
        let first = Gw::start(cfg);
        first_turns(&first);
        let from = first.home.clone();
        let others: Vec<Gw> = std::thread::scope(|s| {
            let started: Vec<_> = (1..n)
                .map(|_| {
                    let from = &from;
                    s.spawn(move || {
                        Gw::start_custom(free_port(), cfg, false, |home| {
                            share_deployment_files(from, home)
                        })
                    })
                })
                .collect();
            started.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut gws = vec![first];
        gws.extend(others);
        // One deployment: one gateway token, one audit key.
        for gw in &gws[1..] {
            assert_eq!(gw.token, gws[0].token);
            assert_eq!(
                std::fs::read_to_string(gw.home.join("audit.pub")).unwrap(),
                std::fs::read_to_string(gws[0].home.join("audit.pub")).unwrap()
            );
        }
        let db = Db::postgres_unmigrated(&pg.config()).unwrap();
        let c = Self { gws, db, pg };
        assert_eq!(c.count("SELECT COUNT(*) FROM replicas"), n as i64);
        c
    }

    fn count(&self, sql: &str) -> i64 {
        self.db
            .with(|c| c.query_row(sql, params![])?.get::<i64>(0))
            .unwrap()
    }

    /// The replica id (`<host>-<pid>-<hex>`) of gateway `i`.
    fn replica_id(&self, i: usize) -> String {
        let pid = self.gws[i].child.as_ref().unwrap().id();
        let pattern = format!("%-{pid}-%");
        self.db
            .with(|c| {
                c.query_row("SELECT id FROM replicas WHERE id LIKE ?1", params![pattern])?
                    .get::<String>(0)
            })
            .unwrap()
    }

    /// The owner of the lease `name` (None: released or never taken).
    fn lease_owner(&self, name: &str) -> Option<String> {
        self.db
            .with(|c| {
                c.query_opt("SELECT owner FROM leases WHERE name = ?1", params![name])?
                    .map(|r| r.get::<Option<String>>(0))
                    .transpose()
                    .map(Option::flatten)
            })
            .unwrap()
    }

    /// Waits until `sql` counts `want`.
    fn wait_count(&self, sql: &str, want: i64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.count(sql);
            if n == want {
                return;
            }
            assert!(Instant::now() < deadline, "{sql}: {n}, expected {want}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `POST /v1/chat/completions` to the gateway on `port` for the session of `user`.
fn chat_on(port: u16, token: &str, user: &str, text: &str) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(WAIT))?;
    let body =
        json!({"model": "chitin", "user": user, "messages": [{"role": "user", "content": text}]});
    harness::exchange(
        &mut s,
        port,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// A chat turn that must succeed: its answer.
fn chat(gw: &Gw, user: &str, text: &str) -> Value {
    let r = chat_on(gw.port, &gw.token, user, text).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn answer(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap()
}

/// `GET /api/v1/sessions/{key}` on `gw`.
fn session(gw: &Gw, key: &str) -> Value {
    let r = gw.get(&format!("/api/v1/sessions/{key}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// The session's messages as `(role, text or tool decision)`.
fn transcript(s: &Value) -> Vec<(String, String)> {
    s["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let m = &m["message"];
            let role = m["role"].as_str().unwrap().to_string();
            let what = if role == "tool" {
                m["decision"].as_str().unwrap_or_default().to_string()
            } else {
                m["text"].as_str().unwrap_or_default().to_string()
            };
            (role, what)
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| ((*a).to_string(), (*b).to_string()))
        .collect()
}

/// A WebSocket client of one replica, connected with the gateway token (the owner's events).
struct Watcher {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl Watcher {
    async fn open(gw: &Gw) -> Self {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", gw.port))
                .await
                .unwrap();
        let hello =
            json!({"type": "req", "id": 1, "method": "connect", "params": {"token": gw.token}});
        ws.send(Message::text(hello.to_string())).await.unwrap();
        let mut w = Self { ws };
        let res = w.frame().await;
        assert_eq!(res["ok"], true, "{res}");
        w
    }

    async fn frame(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame in time");
            match m {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("the WebSocket ended: {other:?}"),
            }
        }
    }

    /// The events of run `run_id` (every run's when `None`) up to and including the first
    /// named `until`.
    async fn events_until(&mut self, run_id: Option<&str>, until: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let f = self.frame().await;
            if f["type"] != "event" {
                continue;
            }
            if run_id.is_some_and(|id| f["payload"]["run_id"] != id) {
                continue;
            }
            let last = f["event"] == until;
            seen.push(f);
            if last {
                return seen;
            }
        }
    }
}

fn names(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

fn ok_stdout(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `chitin-audit-verify` next to `chitin` (the workspace build has it, with its `postgres`
/// feature).
fn offline_verifier() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_chitin")).with_file_name("chitin-audit-verify");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo build --workspace --bins` builds it",
        bin.display()
    );
    bin
}

/// The head hash of an `ok: N records, head H, ...` line.
fn head(line: &str) -> String {
    line.split("head ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .to_string()
}

/// Both verifiers on the chain in `pg`, with every replica's checkpoint file: they agree on
/// the head, and the chain holds every record in the database.
fn verify_chain(gws: &[Gw], db: &Db, pg: &TestPg) {
    let records = db
        .with(|c| {
            c.query_row("SELECT COUNT(*) FROM audit_records", params![])?
                .get::<i64>(0)
        })
        .unwrap();
    let chitin_says = ok_stdout(&gws[0].chitin(&["audit", "verify"]));
    assert!(
        chitin_says.starts_with(&format!("ok: {records} records")),
        "{chitin_says}"
    );
    let mut cmd = Command::new(offline_verifier());
    cmd.args(["--postgres", &format!("{}?sslmode=disable", pg.url())])
        .arg("--pubkey")
        .arg(gws[0].home.join("audit.pub"));
    for gw in gws {
        let cps = gw.home.join("audit.checkpoints");
        if cps.exists() {
            cmd.arg("--checkpoints").arg(cps);
        }
    }
    let offline = ok_stdout(&cmd.output().unwrap());
    assert!(
        offline.starts_with(&format!("ok: {records} records")),
        "{offline}"
    );
    assert_eq!(
        head(&offline),
        head(&chitin_says),
        "{offline} / {chitin_says}"
    );
}

/// (a) One session's turns, each on another replica: every replica continues it from the
/// database.
/// Turn 0 of (a), on the first replica before the others start.
fn a_first_turn(gw: &Gw) {
    let a = chat(gw, "spread", "turn 0 via replica 0");
    assert_eq!(answer(&a), "answer 0", "{a}");
}

fn a_session_spread_over_the_replicas(c: &Cluster, model: &FakeServer) {
    for (i, gw) in c.gws.iter().enumerate().skip(1) {
        let a = chat(gw, "spread", &format!("turn {i} via replica {i}"));
        assert_eq!(answer(&a), format!("answer {i}"), "{a}");
    }
    // The last turn's model request carried the earlier turns, written by the other replicas.
    let last = model.requests().last().unwrap().body.to_string();
    for t in [
        "turn 0 via replica 0",
        "answer 0",
        "turn 1 via replica 1",
        "answer 1",
    ] {
        assert!(last.contains(t), "{t} missing from {last}");
    }
    let want = pairs(&[
        ("user", "turn 0 via replica 0"),
        ("assistant", "answer 0"),
        ("user", "turn 1 via replica 1"),
        ("assistant", "answer 1"),
        ("user", "turn 2 via replica 2"),
        ("assistant", "answer 2"),
    ]);
    for gw in &c.gws {
        let s = session(gw, "api:spread");
        assert_eq!(transcript(&s), want, "{s}");
        let statuses: Vec<&str> = s["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["completed"; 3], "{s}");
    }
}

/// (b) A WebSocket on A watches a run on B; its approval is granted through C.
fn b_watched_on_a_run_on_b_approved_on_c(
    c: &Cluster,
    rt: &tokio::runtime::Runtime,
    watch: &mut Watcher,
    model: &FakeServer,
) {
    let (b, cc) = (&c.gws[1], &c.gws[2]);
    let (port, token) = (b.port, b.token.clone());
    let turn =
        std::thread::spawn(move || chat_on(port, &token, "watched", "echo it once it is approved"));
    let seen = rt.block_on(watch.events_until(None, "approval.requested"));
    let requested = seen.last().unwrap()["payload"].clone();
    let run_id = requested["run_id"].as_str().unwrap().to_string();
    assert_eq!(requested["session"], "api:watched", "{requested}");
    assert_eq!(requested["approval"]["tool"], "exec", "{requested}");
    let of_run: Vec<&Value> = seen
        .iter()
        .filter(|e| e["payload"]["run_id"] == run_id.as_str())
        .collect();
    assert_eq!(of_run[0]["event"], "run.started", "{seen:?}");
    // The run is B's: B holds its lease while it waits.
    assert_eq!(
        c.lease_owner(&format!("run:{run_id}")),
        Some(c.replica_id(1))
    );

    // Granted through C's Control API.
    let approval_id = requested["approval"]["id"].as_str().unwrap();
    let r = cc
        .try_req(
            "POST",
            &format!("/api/v1/approvals/{approval_id}/resolve"),
            &[
                ("Authorization", &cc.bearer()),
                ("Content-Type", "application/json"),
            ],
            br#"{"decision": "approve"}"#,
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["approval"]["status"], "granted", "{}", r.body);

    // A sees the rest of the run B finishes.
    let rest = rt.block_on(watch.events_until(Some(&run_id), "run.finished"));
    let kinds = names(&rest);
    assert!(kinds.contains(&"approval.resolved"), "{kinds:?}");
    let end = rest.iter().find(|e| e["event"] == "tool.end").unwrap();
    assert_eq!(end["payload"]["tool"], "exec", "{end}");
    assert_eq!(end["payload"]["decision"], "allow", "{end}");
    let finished = &rest.last().unwrap()["payload"];
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(finished["reply"], "echoed after the approval", "{finished}");

    // B answered its client; the command ran once, with its output in the model's request.
    let r = turn.join().unwrap().unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(answer(&r.json()), "echoed after the approval");
    assert_eq!(r.json()["chitin"]["run_id"], run_id.as_str());
    let last = model.requests().last().unwrap().body.to_string();
    assert!(last.contains("approved-on-c"), "{last}");
}

/// (c) `kill -9` of C while a tool call of its turn runs: a survivor takes the run over.
fn c_a_killed_replicas_turn_is_finished_by_a_survivor(
    c: &mut Cluster,
    rt: &tokio::runtime::Runtime,
    watch: &mut Watcher,
    model: &FakeServer,
) {
    let exec_allowed =
        "SELECT COUNT(*) FROM audit_records WHERE action = 'exec' AND decision = 'allow'";
    let allowed_before = c.count(exec_allowed);
    let requests_before = model.requests().len();
    let (port, token) = (c.gws[2].port, c.gws[2].token.clone());
    let turn = std::thread::spawn(move || chat_on(port, &token, "killed", "start the long job"));
    let seen = rt.block_on(watch.events_until(None, "tool.start"));
    let started = &seen.last().unwrap()["payload"];
    assert_eq!(started["session"], "api:killed", "{started}");
    let run_id = started["run_id"].as_str().unwrap().to_string();
    // The call was allowed and C runs it (its lease): now kill C.
    c.wait_count(exec_allowed, allowed_before + 1);
    assert_eq!(
        c.lease_owner(&format!("run:{run_id}")),
        Some(c.replica_id(2))
    );
    c.gws[2].signal("-KILL");
    let status = c.gws[2].wait_exit();
    assert!(!status.success());
    // C's client lost its connection without an answer.
    let lost = turn.join().unwrap();
    assert!(lost.is_err(), "{:?}", lost.map(|r| r.body));

    // A survivor takes the run over after the lease and finishes it; A's WebSocket sees it.
    let rest = rt.block_on(watch.events_until(Some(&run_id), "run.finished"));
    let finished = &rest.last().unwrap()["payload"];
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(
        finished["reply"], "resumed after the interruption",
        "{finished}"
    );
    let adopters: Vec<usize> = (0..2)
        .filter(|&i| {
            std::fs::read_to_string(c.gws[i].root.join("gateway.log"))
                .unwrap()
                .lines()
                .any(|l| l.contains("taking over an unfinished run") && l.contains(&run_id))
        })
        .collect();
    assert_eq!(adopters.len(), 1, "taken over by exactly one survivor");

    // Nothing twice: the command was not started again, the model was asked once more (with
    // the call reported interrupted).
    assert_eq!(c.count(exec_allowed), allowed_before + 1);
    let requests = model.requests();
    assert_eq!(requests.len(), requests_before + 2);
    let resumed = requests.last().unwrap().body.to_string();
    assert!(resumed.contains("interrupted"), "{resumed}");
    // Nothing lost: the user's message, the call, its interruption and the answer, read on
    // both survivors.
    let want = pairs(&[
        ("user", "start the long job"),
        ("assistant", ""),
        ("tool", "interrupted"),
        ("assistant", "resumed after the interruption"),
    ]);
    for gw in &c.gws[..2] {
        let s = session(gw, "api:killed");
        assert_eq!(transcript(&s), want, "{s}");
        let run = &s["runs"][0];
        assert_eq!(run["status"], "completed", "{s}");
        assert_eq!(run["tool_calls"][0]["decision"], "interrupted", "{s}");
    }
    // The session goes on on A with all of it.
    let a = chat(&c.gws[0], "killed", "are you still there");
    assert_eq!(answer(&a), "still here", "{a}");
    let last = model.requests().last().unwrap().body.to_string();
    for t in ["start the long job", "resumed after the interruption"] {
        assert!(last.contains(t), "{t} missing from {last}");
    }
}

#[test]
fn three_replicas_share_a_session_watch_and_approve_across_replicas_and_finish_a_killed_replicas_turn()
 {
    let echo = json!({"argv": ["/bin/echo", "approved-on-c"], "network": ["127.0.0.1:9"]});
    let long = json!({"argv": ["sleep", "120"]});
    let (rt, model) = fake(vec![
        // (a)
        Step::text("answer 0"),
        Step::text("answer 1"),
        Step::text("answer 2"),
        // (b)
        Step::tool_call("call-b", "exec", &echo.to_string()),
        Step::text("echoed after the approval"),
        // (c)
        Step::tool_call("call-c", "exec", &long.to_string()),
        Step::text("resumed after the interruption"),
        Step::text("still here"),
    ]);
    let pg = TestPg::new().unwrap();
    let cfg = config(&model.base_url(), Some(&pg), "");
    let mut c = Cluster::start(3, pg, &cfg, a_first_turn);

    a_session_spread_over_the_replicas(&c, &model);
    let mut watch = rt.block_on(Watcher::open(&c.gws[0]));
    b_watched_on_a_run_on_b_approved_on_c(&c, &rt, &mut watch, &model);
    c_a_killed_replicas_turn_is_finished_by_a_survivor(&mut c, &rt, &mut watch, &model);
    drop(watch);

    // (d) The survivors stop; the chain all three wrote verifies.
    for gw in &mut c.gws[..2] {
        gw.signal("-TERM");
        assert!(gw.wait_exit().success());
    }
    verify_chain(&c.gws, &c.db, &c.pg);
}

#[test]
fn a_cron_job_fires_once_per_slot_across_three_replicas() {
    let (_rt, model) = fake(vec![]);
    model.set_fallback(Step::text("tick done"));
    let pg = TestPg::new().unwrap();
    let cron = "\n[[cron]]\nname = \"tick\"\nevery = \"10s\"\nprompt = \"cron-e2e-tick\"\n";
    let cfg = config(&model.base_url(), Some(&pg), cron);
    let mut c = Cluster::start(3, pg, &cfg, |gw| {
        assert_eq!(answer(&chat(gw, "first", "hello")), "tick done");
    });
    let completed = "SELECT COUNT(*) FROM cron_firings WHERE job = 'tick' AND status = 'completed'";
    let busy = "SELECT COUNT(*) FROM cron_firings WHERE job = 'tick' AND status <> 'completed'";
    let asked = |m: &FakeServer| {
        m.requests()
            .iter()
            .filter(|r| r.body.to_string().contains("cron-e2e-tick"))
            .count() as i64
    };
    // Three slots fired; stop the replicas between two slots (in the first half of the 10 s
    // period, every firing finished), so no firing is cut short.
    let deadline = Instant::now() + WAIT;
    loop {
        let done = c.count(completed);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        if done >= 3 && c.count(busy) == 0 && asked(&model) == done && now_ms % 10_000 < 5_000 {
            break;
        }
        assert!(Instant::now() < deadline, "three firings did not complete");
        std::thread::sleep(Duration::from_millis(100));
    }
    for gw in &c.gws {
        gw.signal("-TERM");
    }
    for gw in &mut c.gws {
        assert!(gw.wait_exit().success());
    }
    // Every slot fired once: one firing row, one run, one model request each.
    let firings = c.count("SELECT COUNT(*) FROM cron_firings WHERE job = 'tick'");
    assert_eq!(c.count(completed), firings);
    assert_eq!(
        c.count("SELECT COUNT(DISTINCT run_id) FROM cron_firings WHERE job = 'tick'"),
        firings
    );
    assert_eq!(
        c.count(
            "SELECT COUNT(*) FROM runs WHERE session_key = 'cron:tick' AND status = 'completed'"
        ),
        firings
    );
    assert_eq!(
        c.count("SELECT COUNT(*) FROM runs WHERE session_key = 'cron:tick'"),
        firings
    );
    assert_eq!(asked(&model), firings);
    // The n-th turn of the job's session carries the n prompts so far: no turn was asked twice.
    let mut seen: Vec<usize> = model
        .requests()
        .iter()
        .map(|r| r.body.to_string().matches("cron-e2e-tick").count())
        .filter(|&n| n > 0)
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (1..=firings as usize).collect::<Vec<_>>());
    // The slots are 10 s apart on the epoch grid.
    let ticks: Vec<i64> =
        c.db.with(|x| {
            x.query_all(
                "SELECT tick_ms FROM cron_firings WHERE job = 'tick' ORDER BY tick_ms",
                params![],
            )?
            .iter()
            .map(|r| r.get::<i64>(0))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
    assert!(ticks.iter().all(|t| t % 10_000 == 0), "{ticks:?}");
    verify_chain(&c.gws, &c.db, &c.pg);
}

#[test]
fn a_used_sqlite_deployment_is_copied_to_postgres_and_continued_there() {
    let call = json!({"argv": ["/bin/echo", "said-on-sqlite"]});
    let (_rt, model) = fake(vec![
        Step::tool_call("c1", "exec", &call.to_string()),
        Step::text("first answer"),
        Step::text("second answer"),
        Step::text("answer on postgres"),
    ]);
    let mut gw = Gw::start(&config(&model.base_url(), None, ""));
    assert_eq!(answer(&chat(&gw, "moved", "run the echo")), "first answer");
    assert_eq!(answer(&chat(&gw, "moved", "and again")), "second answer");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    let sqlite_chain = ok_stdout(&gw.chitin(&["audit", "verify"]));
    assert!(sqlite_chain.starts_with("ok: "), "{sqlite_chain}");
    let sqlite = chitin_audit::AuditReader::open(&gw.home.join("audit.db")).unwrap();
    let (sqlite_records, _) = sqlite.head().unwrap().unwrap();

    // The same deployment, pointed at PostgreSQL: copied, then started there.
    let pg = TestPg::new().unwrap();
    std::fs::write(
        gw.home.join("chitin.toml"),
        format!(
            "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n\n[gateway]\n{}\n",
            config(&model.base_url(), Some(&pg), "")
        ),
    )
    .unwrap();
    let out = ok_stdout(&gw.chitin(&["store", "copy", "--from", "sqlite", "--to", "postgres"]));
    assert!(out.contains("copied the audit log:"), "{out}");
    gw.spawn();
    let a = chat(&gw, "moved", "still the same session?");
    assert_eq!(answer(&a), "answer on postgres", "{a}");
    let last = model.requests().last().unwrap().body.to_string();
    for t in [
        "said-on-sqlite",
        "first answer",
        "and again",
        "second answer",
    ] {
        assert!(last.contains(t), "{t} missing from {last}");
    }
    let s = session(&gw, "api:moved");
    assert_eq!(s["runs"].as_array().unwrap().len(), 3, "{s}");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());

    // The copied chain, continued on PostgreSQL, verifies; its start is the SQLite chain's.
    let db = Db::postgres_unmigrated(&pg.config()).unwrap();
    verify_chain(std::slice::from_ref(&gw), &db, &pg);
    let moved = sqlite.range(1, sqlite_records).unwrap();
    let cfg = chitin_audit::PgConfig::from_url(&format!("{}?sslmode=disable", pg.url())).unwrap();
    let shared = chitin_audit::AuditReader::open_postgres(&cfg).unwrap();
    assert_eq!(shared.range(1, sqlite_records).unwrap(), moved);
    assert!(shared.head().unwrap().unwrap().0 > sqlite_records);
}
