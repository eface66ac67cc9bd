//! The real `chitin gateway` on PostgreSQL (`[store] backend = "postgres"`): every module
//! ported, the state and the audit log in one database. A chat turn with a tool call runs,
//! its transcript, run and usage rows and its audit records are in PostgreSQL (not in
//! `state.db` / `audit.db`), `chitin audit verify` verifies the PostgreSQL chain, and a second
//! gateway process on the same database continues the same session and the same chain.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;

use chitin::providers::testing::{FakeOpenAi, FakeServer, Step};
use chitin_store::testing::TestPg;
use chitin_store::{Db, params};
use harness::Gw;
use serde_json::{Value, json};

fn fake(steps: Vec<Step>) -> (tokio::runtime::Runtime, FakeServer) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(FakeOpenAi::start(steps)).unwrap();
    (rt, s)
}

fn config(model_url: &str, pg: &TestPg) -> String {
    format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{model_url}\"\n\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n",
        pg.url()
    )
}

fn chat(gw: &Gw, session: &str, text: &str) -> Value {
    let r = gw
        .try_req(
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", &gw.bearer()),
                ("Content-Type", "application/json"),
            ],
            json!({"model": "chitin", "user": session, "messages": [{"role": "user", "content": text}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn count(db: &Db, sql: &str) -> i64 {
    db.with(|c| c.query_row(sql, params![])?.get::<i64>(0))
        .unwrap()
}

#[test]
fn the_gateway_runs_on_postgres_with_its_state_and_audit_chain_in_the_database() {
    let pg = TestPg::new().unwrap();
    let call = json!({"argv": ["echo", "from-postgres"]}).to_string();
    let (_rt, model) = fake(vec![
        Step::tool_call("c1", "exec", &call),
        Step::text("done"),
        Step::text("second answer"),
    ]);
    let mut gw = Gw::start(&config(&model.base_url(), &pg));
    let ready = gw.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.body);

    let answer = chat(&gw, "pg-1", "run the echo please");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "done",
        "{answer}"
    );

    // The turn's rows are in PostgreSQL.
    let db = Db::postgres_unmigrated(&pg.config()).unwrap();
    assert_eq!(db.version().unwrap(), chitin_store::latest_version());
    assert!(count(&db, "SELECT COUNT(*) FROM messages") >= 4);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM runs WHERE status = 'completed'"),
        1
    );
    assert_eq!(count(&db, "SELECT COUNT(*) FROM usage"), 2);
    // ... and so are its audit records: the exec decision among them.
    let decisions = count(
        &db,
        "SELECT COUNT(*) FROM audit_records WHERE action = 'exec' AND decision = 'allow'",
    );
    assert_eq!(decisions, 1);

    // A second gateway process on the same database (same state dir: the first stops) goes on
    // with the same session and the same chain.
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    gw.spawn();
    let answer = chat(&gw, "pg-1", "and again");
    assert_eq!(
        answer["choices"][0]["message"]["content"], "second answer",
        "{answer}"
    );
    // The second turn's request carried the first turn's history from PostgreSQL.
    let last = model.requests().last().unwrap().body.to_string();
    assert!(last.contains("from-postgres"), "{last}");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());

    // The command line works on the deployment's database too: the session is listed and its
    // transcript (sealed in PostgreSQL) opens.
    let list = gw.chitin(&["sessions", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.status.success() && listed.contains("pg-1"),
        "{listed}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let key = listed
        .split_whitespace()
        .find(|w| w.contains("pg-1"))
        .unwrap()
        .to_string();
    let show = gw.chitin(&["sessions", "show", &key]);
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(
        show.status.success() && shown.contains("second answer"),
        "{shown}{}",
        String::from_utf8_lossy(&show.stderr)
    );

    // The PostgreSQL chain verifies; the SQLite files hold no turn.
    let v = gw.chitin(&["audit", "verify"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(
        v.status.success() && out.starts_with("ok: "),
        "{out}{}",
        String::from_utf8_lossy(&v.stderr)
    );
    let records = count(&db, "SELECT COUNT(*) FROM audit_records");
    assert!(out.starts_with(&format!("ok: {records} records")), "{out}");
    if gw.home.join("state.db").exists() {
        let c = rusqlite::Connection::open(gw.home.join("state.db")).unwrap();
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap_or(0);
        assert_eq!(n, 0, "no message went to state.db");
    }
}

/// A deployment moved to PostgreSQL with `chitin store copy` keeps reading its old
/// transcripts: the copy puts the state directory's `vault.keys` into the database, and the
/// gateway on PostgreSQL opens them from there (the file moved away to prove it).
#[test]
fn after_store_copy_a_gateway_on_postgres_opens_the_transcripts_sealed_before_the_move() {
    let pg = TestPg::new().unwrap();
    let (_rt, model) = fake(vec![
        Step::text("noted the kumquat"),
        Step::text("it was a kumquat"),
    ]);
    let sqlite = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
        model.base_url()
    );
    let mut gw = Gw::start(&sqlite);
    let answer = chat(&gw, "moved-1", "remember the word kumquat-7f3a");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "noted the kumquat"
    );
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());

    let path = gw.home.join("chitin.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!(
            "{text}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\n",
            pg.url()
        ),
    )
    .unwrap();
    let copy = gw.chitin(&["store", "copy", "--from", "sqlite", "--to", "postgres"]);
    let out = String::from_utf8_lossy(&copy.stdout);
    assert!(
        copy.status.success() && out.contains("copied the data keys of"),
        "{out}{}",
        String::from_utf8_lossy(&copy.stderr)
    );
    std::fs::rename(
        gw.home.join("vault.keys"),
        gw.root.join("vault.keys.moved-away"),
    )
    .unwrap();

    gw.spawn();
    let answer = chat(&gw, "moved-1", "which word was it?");
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "it was a kumquat"
    );
    // The second turn's history was opened from PostgreSQL with the database's keys.
    let last = model.requests().last().unwrap().body.to_string();
    assert!(last.contains("kumquat-7f3a"), "{last}");
    assert!(last.contains("noted the kumquat"), "{last}");
    gw.signal("-TERM");
    assert!(gw.wait_exit().success());
    assert!(
        !gw.home.join("vault.keys").exists(),
        "no file key set was made"
    );
    let db = Db::postgres_unmigrated(&pg.config()).unwrap();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM vault_keys"), 1);
}
