//! The WebSocket control plane (`/ws`), driven by a real WebSocket client.
//!
//! Most tests run the WebSocket router in-process on a random loopback port with the scripted
//! backend (`gateway::backend::testing::ScriptedBackend`) and a token authenticator; the last
//! ones start the real `chitin gateway` binary to check the wiring (its token, its limiter,
//! its origins, no backend configured).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

#[path = "support/gateway.rs"]
mod harness;

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitin::gateway::auth::{AuthFailure, LimitConfig, Limiter};
use chitin::gateway::backend::testing::{Call, ScriptedBackend, Step};
use chitin::gateway::backend::{BackendEvent, ChatBackend, EventKind};
use chitin::gateway::metrics::Metrics;
use chitin::gateway::ws::{TokenAuth, Ws, WsAuth, WsSettings};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const TOKEN: &str = "test-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(10);

fn limits(max_failures: u32) -> LimitConfig {
    LimitConfig {
        max_failures,
        window: Duration::from_secs(60),
        lockout: Duration::from_secs(300),
    }
}

/// Two users with their own tokens (the per-user mapping the trait allows).
struct TwoUsers {
    tokens: HashMap<&'static str, &'static str>,
    limiter: Mutex<Limiter>,
}

impl WsAuth for TwoUsers {
    fn user_for(&self, token: &[u8]) -> Option<String> {
        self.tokens
            .iter()
            .find(|(t, _)| t.as_bytes() == token)
            .map(|(_, u)| (*u).to_string())
    }
    fn failed(&self, client: IpAddr, why: AuthFailure) -> Option<Duration> {
        self.limiter
            .lock()
            .unwrap()
            .fail(client, why, Instant::now(), limits(100))
            .throttled
    }
}

struct Server {
    port: u16,
    backend: Arc<ScriptedBackend>,
    auth: Arc<TokenAuth>,
    metrics: Arc<Metrics>,
}

async fn serve(ws: Arc<Ws>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    ws.set_local_addr(addr);
    let app = chitin::gateway::ws::routes::<()>(ws);
    tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .into_future(),
    );
    addr.port()
}

async fn start_with(script: Vec<Step>, settings: WsSettings, max_failures: u32) -> Server {
    let backend = ScriptedBackend::new(script);
    let auth = Arc::new(TokenAuth::new(
        TOKEN.as_bytes(),
        "owner",
        limits(max_failures),
    ));
    let metrics = Arc::new(Metrics::default());
    let dynb: Arc<dyn ChatBackend> = backend.clone();
    let ws = Arc::new(Ws::new(
        Some(dynb),
        auth.clone(),
        Arc::clone(&metrics),
        settings,
    ));
    let port = serve(ws).await;
    Server {
        port,
        backend,
        auth,
        metrics,
    }
}

async fn start(script: Vec<Step>) -> Server {
    start_with(script, WsSettings::default(), 5).await
}

fn deltas(parts: &[&str]) -> Vec<Step> {
    parts
        .iter()
        .map(|p| Step::Delta((*p).to_string()))
        .collect()
}

type Stream = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Client {
    ws: Stream,
    events: VecDeque<Value>,
    next: u64,
}

async fn open(port: u16, path: &str, origin: Option<&str>) -> Result<Client, tungstenite::Error> {
    let mut req = format!("ws://127.0.0.1:{port}{path}")
        .into_client_request()
        .unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(Client {
        ws,
        events: VecDeque::new(),
        next: 100,
    })
}

/// The HTTP status an upgrade attempt was refused with.
async fn refused_status(port: u16, path: &str, origin: Option<&str>) -> (u16, Value) {
    match open(port, path, origin).await {
        Ok(_) => panic!("the upgrade was accepted"),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            (
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or(Value::Null),
            )
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

impl Client {
    async fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s.to_string())).await.unwrap();
    }

    async fn send(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next text frame (pings and pongs skipped); `None` when the server closed.
    async fn next_frame(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("no frame from the server in time");
            match m {
                Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// The close code the server sends next (text frames before it are returned too).
    async fn close_code(&mut self) -> (Vec<Value>, Option<u16>) {
        let mut frames = Vec::new();
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the server did not close in time");
            match m {
                Some(Ok(Message::Text(t))) => frames.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(c))) => {
                    return (frames, c.map(|c| u16::from(c.code)));
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => return (frames, None),
            }
        }
    }

    /// Sends a request and returns its response; events received meanwhile are kept.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = format!("r{}", self.next);
        self.send(&json!({"type": "req", "id": id, "method": method, "params": params}))
            .await;
        self.response(&json!(id)).await
    }

    async fn response(&mut self, id: &Value) -> Value {
        loop {
            let f = self.next_frame().await.expect("closed before the response");
            match f["type"].as_str() {
                Some("res") if &f["id"] == id => return f,
                Some("event") => self.events.push_back(f),
                _ => panic!("unexpected frame {f}"),
            }
        }
    }

    /// The next event named `name` (earlier events are kept in order, skipped ones dropped).
    async fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i).unwrap();
        }
        loop {
            let f = self.next_frame().await.expect("closed before the event");
            if f["type"] == "event" {
                if f["event"] == name {
                    return f;
                }
                self.events.push_back(f);
            } else {
                panic!("unexpected frame {f}");
            }
        }
    }

    async fn connect(port: u16, token: &str) -> Client {
        let mut c = open(port, "/ws", None).await.unwrap();
        let r = c.call("connect", json!({"token": token})).await;
        assert_eq!(r["ok"], true, "{r}");
        c
    }
}

fn error_code(r: &Value) -> &str {
    assert_eq!(r["type"], "res", "{r}");
    assert_eq!(r["ok"], false, "{r}");
    r["error"]["code"].as_str().unwrap()
}

#[tokio::test]
async fn a_connect_with_the_token_is_answered_with_the_user_methods_and_limits() {
    let s = start(vec![]).await;
    let mut c = open(s.port, "/ws", None).await.unwrap();
    let r = c.call("connect", json!({"token": TOKEN})).await;
    assert_eq!(r["ok"], true);
    assert_eq!(r["id"], "r101");
    let p = &r["payload"];
    assert_eq!(p["user"], "owner");
    assert_eq!(p["protocol"], 1);
    assert_eq!(p["agent"], true);
    assert_eq!(p["limits"]["max_frame_bytes"], 256 * 1024);
    assert!(
        p["methods"]
            .as_array()
            .unwrap()
            .contains(&json!("approvals.resolve"))
    );
    assert!(p["events"].as_array().unwrap().contains(&json!("tool.end")));
    let h = c.call("health", json!({})).await;
    assert_eq!(h["payload"]["ok"], true);
    assert_eq!(h["payload"]["backend"]["backend"], "scripted");
    assert!(s.auth.failures().is_empty());
}

#[tokio::test]
async fn a_missing_token_gets_an_error_the_connection_is_closed_and_it_counts_as_a_failure() {
    let s = start(vec![]).await;
    let mut c = open(s.port, "/ws", None).await.unwrap();
    c.send(&json!({"type": "req", "id": 1, "method": "connect", "params": {}}))
        .await;
    let (frames, code) = c.close_code().await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["id"], 1);
    assert_eq!(error_code(&frames[0]), "unauthorized");
    assert_eq!(code, Some(1008));
    assert_eq!(s.auth.failures().len(), 1);
    assert_eq!(s.auth.failures()[0].1, AuthFailure::Missing);
}

#[tokio::test]
async fn a_wrong_token_gets_an_error_the_connection_is_closed_and_it_counts_as_a_failure() {
    let s = start(vec![]).await;
    let mut c = open(s.port, "/ws", None).await.unwrap();
    c.send(&json!({"type": "req", "id": "x", "method": "connect", "params": {"token": "not-the-token"}}))
        .await;
    let (frames, code) = c.close_code().await;
    assert_eq!(error_code(&frames[0]), "unauthorized");
    assert_eq!(
        frames[0]["error"]["message"],
        "the token is not the gateway token"
    );
    assert_eq!(code, Some(1008));
    assert_eq!(
        s.auth.failures(),
        vec![("127.0.0.1".parse().unwrap(), AuthFailure::Wrong)]
    );
    // A token one character short or with a suffix is as wrong.
    for t in [&TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x")] {
        let mut c = open(s.port, "/ws", None).await.unwrap();
        let r = c.call("connect", json!({"token": t})).await;
        assert_eq!(error_code(&r), "unauthorized");
    }
}

#[tokio::test]
async fn any_method_before_connect_is_refused_and_the_connection_closed() {
    let s = start(vec![]).await;
    for first in [
        json!({"type": "req", "id": 1, "method": "health"}).to_string(),
        json!({"type": "req", "id": 1, "method": "approvals.resolve", "params": {"code": "ABC", "decision": "approve"}}).to_string(),
        "{not json".to_string(),
    ] {
        let mut c = open(s.port, "/ws", None).await.unwrap();
        c.send_text(&first).await;
        let (frames, code) = c.close_code().await;
        assert_eq!(error_code(&frames[0]), "unauthorized", "{first}");
        assert_eq!(code, Some(1008));
    }
    assert!(s.backend.calls().is_empty(), "the backend was reached");
    assert_eq!(s.auth.failures().len(), 3);
}

#[tokio::test]
async fn no_connect_within_the_timeout_closes_the_connection_as_a_failed_authentication() {
    let s = start_with(
        vec![],
        WsSettings {
            connect_timeout: Duration::from_millis(300),
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let mut c = open(s.port, "/ws", None).await.unwrap();
    let (frames, code) = c.close_code().await;
    assert_eq!(error_code(&frames[0]), "unauthorized");
    assert_eq!(code, Some(1008));
    assert_eq!(s.auth.failures()[0].1, AuthFailure::Missing);
}

#[tokio::test]
async fn a_token_in_the_query_string_is_refused_before_the_upgrade_even_the_right_one() {
    let s = start(vec![]).await;
    for q in [
        format!("/ws?token={TOKEN}"),
        format!("/ws?access_token={TOKEN}"),
        format!("/ws?a=1&%74oken={TOKEN}"),
    ] {
        let (status, body) = refused_status(s.port, &q, None).await;
        assert_eq!(status, 401, "{q}");
        assert_eq!(body["error"]["code"], "unauthorized");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("never accepted in the URL")
        );
    }
    assert!(
        s.auth
            .failures()
            .iter()
            .all(|(_, w)| *w == AuthFailure::QueryToken)
    );
    assert_eq!(s.auth.failures().len(), 3);
}

#[tokio::test]
async fn a_foreign_origin_is_refused_with_403_before_the_upgrade() {
    let s = start_with(
        vec![],
        WsSettings {
            allowed_origins: vec!["https://chat.example.com".into()],
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let port = s.port;
    for bad in [
        "http://evil.example".to_string(),
        format!("http://127.0.0.1:{}", port + 1),
        format!("http://localhost.evil.example:{port}"),
        "null".to_string(),
    ] {
        let (status, body) = refused_status(port, "/ws", Some(&bad)).await;
        assert_eq!(status, 403, "{bad}");
        assert_eq!(body["error"]["code"], "origin_refused");
    }
    for good in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        "https://chat.example.com".to_string(),
    ] {
        let mut c = open(port, "/ws", Some(&good)).await.unwrap();
        let r = c.call("connect", json!({"token": TOKEN})).await;
        assert_eq!(r["ok"], true, "{good}");
    }
    // Not a browser: no Origin at all.
    Client::connect(port, TOKEN).await;
    assert!(
        s.metrics
            .render(None)
            .contains("chitin_ws_connections_total{outcome=\"refused_origin\"} 4")
    );
}

#[tokio::test]
async fn repeated_failed_connects_are_throttled_but_the_right_token_still_connects() {
    let s = start_with(vec![], WsSettings::default(), 3).await;
    let mut codes = Vec::new();
    for _ in 0..5 {
        let mut c = open(s.port, "/ws", None).await.unwrap();
        let r = c.call("connect", json!({"token": "wrong"})).await;
        codes.push(error_code(&r).to_string());
    }
    assert_eq!(
        codes,
        [
            "unauthorized",
            "unauthorized",
            "unauthorized",
            "rate_limited",
            "rate_limited"
        ]
    );
    // The upgrade itself carries no credential: never refused for earlier failures.
    let mut c = open(s.port, "/ws", None).await.unwrap();
    let r = c.call("connect", json!({"token": TOKEN})).await;
    assert_eq!(r["ok"], true, "{r}");
    // A connection opened before the failures authenticates too.
    let s2 = start_with(vec![], WsSettings::default(), 2).await;
    let mut early = open(s2.port, "/ws", None).await.unwrap();
    for _ in 0..3 {
        let mut c = open(s2.port, "/ws", None).await.unwrap();
        c.call("connect", json!({"token": "wrong"})).await;
    }
    let r = early.call("connect", json!({"token": TOKEN})).await;
    assert_eq!(r["ok"], true, "{r}");
}

const ORIGIN_REFUSED: &str = "this page's origin may not open the gateway's WebSocket; open the web chat from the gateway's own address or add the origin to [gateway] allowed_origins";

#[tokio::test]
async fn a_foreign_origin_is_refused_before_the_query_token_and_counts_as_nothing() {
    let s = start_with(vec![], WsSettings::default(), 1).await;
    for path in [
        format!("/ws?token={TOKEN}"),
        "/ws?token=wrong".into(),
        "/ws".into(),
    ] {
        let (status, body) = refused_status(s.port, &path, Some("http://evil.example")).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(
            body,
            json!({"error": {"code": "origin_refused", "message": ORIGIN_REFUSED}})
        );
    }
    assert!(s.auth.failures().is_empty(), "{:?}", s.auth.failures());
    let mut c = open(s.port, "/ws", None).await.unwrap();
    let r = c.call("connect", json!({"token": TOKEN})).await;
    assert_eq!(r["ok"], true, "{r}");
}

#[tokio::test]
async fn malformed_frames_unknown_methods_bad_params_and_binary_get_errors_and_the_connection_keeps_working()
 {
    let s = start(vec![]).await;
    let mut c = Client::connect(s.port, TOKEN).await;
    let cases: Vec<(String, Value, &str)> = vec![
        ("{not json".into(), Value::Null, "invalid_frame"),
        ("[1,2]".into(), Value::Null, "invalid_frame"),
        (r#"{"type":"req","method":"health"}"#.into(), Value::Null, "invalid_frame"),
        (r#"{"type":"event","id":5,"method":"health"}"#.into(), json!(5), "invalid_frame"),
        (r#"{"type":"req","id":6,"method":"nope"}"#.into(), json!(6), "unknown_method"),
        (r#"{"type":"req","id":7,"method":"agent","params":{}}"#.into(), json!(7), "invalid_params"),
        (r#"{"type":"req","id":8,"method":"agent","params":{"message":"hi","approved":true}}"#.into(), json!(8), "invalid_params"),
        (r#"{"type":"req","id":9,"method":"agent","params":{"message":"  "}}"#.into(), json!(9), "invalid_params"),
        (r#"{"type":"req","id":10,"method":"agent.wait","params":{"run_id":7}}"#.into(), json!(10), "invalid_params"),
        (r#"{"type":"req","id":11,"method":"chat.history","params":{"session":"../etc"}}"#.into(), json!(11), "invalid_params"),
        (r#"{"type":"req","id":12,"method":"approvals.resolve","params":{"code":"A","decision":"maybe"}}"#.into(), json!(12), "invalid_params"),
        (r#"{"type":"req","id":13,"method":"connect","params":{"token":"x"}}"#.into(), json!(13), "invalid_request"),
        (r#"{"type":"req","id":14,"method":"health","params":"x"}"#.into(), json!(14), "invalid_params"),
    ];
    for (frame, id, code) in &cases {
        c.send_text(frame).await;
        let r = c.next_frame().await.expect("the connection was closed");
        assert_eq!(&r["id"], id, "{frame}: {r}");
        assert_eq!(error_code(&r), *code, "{frame}: {r}");
    }
    c.ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let r = c.next_frame().await.unwrap();
    assert_eq!(error_code(&r), "binary_not_supported");
    // Still working.
    let h = c.call("health", json!({})).await;
    assert_eq!(h["ok"], true);
    // Nothing invalid reached the backend.
    assert!(s.backend.calls().is_empty(), "{:?}", s.backend.calls());
    let m = s.metrics.render(None);
    assert!(
        m.contains("chitin_ws_errors_total{code=\"invalid_params\"} 7"),
        "{m}"
    );
    assert!(m.contains("chitin_ws_errors_total{code=\"binary_not_supported\"} 1"));
}

#[tokio::test]
async fn an_oversized_frame_gets_frame_too_large_and_one_far_over_the_limit_closes_with_1009() {
    let s = start_with(
        vec![],
        WsSettings {
            max_message: 64 * 1024,
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    let big = json!({"type": "req", "id": 1, "method": "agent", "params": {"message": "a".repeat(100 * 1024)}});
    c.send(&big).await;
    let r = c.next_frame().await.unwrap();
    assert_eq!(error_code(&r), "frame_too_large");
    assert!(r["error"]["message"].as_str().unwrap().contains("65536"));
    let h = c.call("health", json!({})).await;
    assert_eq!(h["ok"], true, "the connection kept working");
    assert!(s.backend.calls().is_empty());
    // Over 4x the limit the codec refuses to buffer it.
    let huge = "x".repeat(300 * 1024);
    let _ = c.ws.send(Message::text(huge)).await;
    // The rest of the message is still in flight, so the close frame may not get through
    // before the TCP connection ends; either way the connection is over.
    let (frames, code) = c.close_code().await;
    assert!(frames.is_empty(), "{frames:?}");
    assert!(matches!(code, Some(1009) | None), "{code:?}");
    assert!(
        s.metrics
            .render(None)
            .contains("chitin_ws_errors_total{code=\"frame_too_large\"} 2")
    );
}

#[tokio::test]
async fn agent_returns_a_run_id_at_once_and_agent_wait_returns_the_result() {
    let mut script = deltas(&["Hel", "lo"]);
    script.insert(0, Step::Sleep(Duration::from_millis(600)));
    let s = start(script).await;
    let mut c = Client::connect(s.port, TOKEN).await;
    let r = c
        .call("agent", json!({"message": "hi", "session": "s1"}))
        .await;
    assert_eq!(r["ok"], true);
    // The run id came back before the run did anything (the script starts with a pause).
    assert!(c.events.is_empty(), "{:?}", c.events);
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    assert_eq!(r["payload"]["session"], "s1");
    // Still running: a short wait times out.
    let w = c
        .call("agent.wait", json!({"run_id": run_id, "timeout_ms": 50}))
        .await;
    assert_eq!(error_code(&w), "timeout");
    let w = c.call("agent.wait", json!({"run_id": run_id})).await;
    assert_eq!(w["ok"], true, "{w}");
    assert_eq!(
        w["payload"],
        json!({"run_id": run_id, "session": "s1", "status": "completed", "reply": "Hello"})
    );
    let w = c.call("agent.wait", json!({"run_id": "run-999"})).await;
    assert_eq!(error_code(&w), "not_found");
    assert_eq!(
        s.backend.calls()[0],
        Call::StartRun {
            user: "owner".into(),
            session: Some("s1".into()),
            text: "hi".into()
        }
    );
}

#[tokio::test]
async fn a_run_streams_its_events_in_order_with_seq_increasing_by_one() {
    let s = start(vec![
        Step::Delta("The ".into()),
        Step::Tool {
            tool: "read_file".into(),
            args: json!({"path": "notes.md"}),
            decision: "allow".into(),
        },
        Step::Delta("answer".into()),
        Step::Tool {
            tool: "exec".into(),
            args: json!({"command": "rm", "args": ["-rf", "/"]}),
            decision: "deny".into(),
        },
    ])
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    let r = c.call("chat.send", json!({"text": "go"})).await;
    let run_id = r["payload"]["run_id"].clone();
    let session = r["payload"]["session"].clone();
    c.event("run.finished").await;
    let all: Vec<Value> = c.events.drain(..).collect();
    let names: Vec<&str> = all.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "run.started",
            "assistant.delta",
            "tool.start",
            "tool.end",
            "assistant.delta",
            "tool.start",
            "tool.end"
        ]
    );
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["seq"], json!(i as u64 + 1), "{e}");
        assert_eq!(e["payload"]["run_id"], run_id);
        assert_eq!(e["payload"]["session"], session);
    }
    assert_eq!(all[3]["payload"]["decision"], "allow");
    assert_eq!(all[3]["payload"]["tool"], "read_file");
    assert_eq!(all[6]["payload"]["decision"], "deny");
    assert_eq!(all[6]["payload"]["policies"], json!(["scripted.deny"]));
    // The next event continues the sequence.
    let r = c
        .call("chat.send", json!({"text": "again", "session": session}))
        .await;
    assert_eq!(r["ok"], true);
    let e = c.event("run.started").await;
    assert_eq!(e["seq"], 9, "run.finished was 8");
}

#[tokio::test]
async fn events_reach_only_the_connections_of_their_user() {
    let backend = ScriptedBackend::new(deltas(&["secret ", "reply"]));
    let auth = Arc::new(TwoUsers {
        tokens: HashMap::from([("alice-token", "alice"), ("bob-token", "bob")]),
        limiter: Mutex::new(Limiter::default()),
    });
    let dynb: Arc<dyn ChatBackend> = backend.clone();
    let ws = Arc::new(Ws::new(
        Some(dynb),
        auth,
        Arc::new(Metrics::default()),
        WsSettings::default(),
    ));
    let port = serve(ws).await;
    let mut alice = Client::connect(port, "alice-token").await;
    let mut bob = Client::connect(port, "bob-token").await;
    let mut alice2 = Client::connect(port, "alice-token").await;
    let r = alice.call("agent", json!({"message": "hi"})).await;
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    let fin = alice.event("run.finished").await;
    assert_eq!(fin["payload"]["reply"], "secret reply");
    // Alice's second connection sees her run too.
    let fin2 = alice2.event("run.finished").await;
    assert_eq!(fin2["payload"]["run_id"], run_id.as_str());
    // Bob: the first event he gets is his own marker, published after Alice's whole run.
    backend.publish(BackendEvent {
        user: "bob".into(),
        session: "b".into(),
        event: EventKind::RunStarted,
        payload: json!({"run_id": "bob-run", "session": "b"}),
    });
    let e = bob.event("run.started").await;
    assert_eq!(e["payload"]["run_id"], "bob-run");
    assert_eq!(e["seq"], 1, "bob received other events first");
    assert!(bob.events.is_empty(), "{:?}", bob.events);
    // Bob cannot wait on Alice's run, see her history or resolve for her.
    let w = bob
        .call("agent.wait", json!({"run_id": run_id, "timeout_ms": 100}))
        .await;
    assert_eq!(error_code(&w), "not_found");
    let sess = r["payload"]["session"].as_str().unwrap();
    let h = bob.call("chat.history", json!({"session": sess})).await;
    assert_eq!(error_code(&h), "not_found");
    let h = alice.call("chat.history", json!({"session": sess})).await;
    assert_eq!(h["payload"]["messages"][1]["text"], "secret reply");
}

#[tokio::test]
async fn an_approval_is_listed_and_resolved_over_the_websocket_and_the_run_continues() {
    let s = start(vec![
        Step::Delta("checking ".into()),
        Step::Approval {
            tool: "exec".into(),
            summary: "run `rm ./tmp/a` in the workspace".into(),
        },
        Step::Tool {
            tool: "exec".into(),
            args: json!({"command": "rm", "args": ["./tmp/a"]}),
            decision: "allow".into(),
        },
        Step::Delta("done".into()),
    ])
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    let r = c
        .call("agent", json!({"message": "clean up", "session": "s"}))
        .await;
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    let req = c.event("approval.requested").await;
    let a = &req["payload"]["approval"];
    assert_eq!(req["payload"]["run_id"], run_id.as_str());
    assert_eq!(a["tool"], "exec");
    assert_eq!(a["summary"], "run `rm ./tmp/a` in the workspace");
    let code = a["code"].as_str().unwrap().to_string();
    let id = a["id"].as_str().unwrap().to_string();
    let list = c.call("approvals.list", json!({})).await;
    assert_eq!(list["payload"]["approvals"][0]["code"], code.as_str());
    let res = c
        .call(
            "approvals.resolve",
            json!({"code": code, "decision": "approve"}),
        )
        .await;
    assert_eq!(res["ok"], true, "{res}");
    assert_eq!(
        res["payload"],
        json!({"approval_id": id, "code": code, "granted": true, "by": "owner"})
    );
    let ev = c.event("approval.resolved").await;
    assert_eq!(ev["payload"]["granted"], true);
    let end = c.event("tool.end").await;
    assert_eq!(end["payload"]["decision"], "allow");
    let fin = c.event("run.finished").await;
    assert_eq!(fin["payload"]["status"], "completed");
    assert_eq!(fin["payload"]["reply"], "checking done");
    assert!(s.backend.calls().contains(&Call::Resolve {
        user: "owner".into(),
        code_or_id: code.clone(),
        grant: true
    }));
    // Resolving it again is a conflict; by id works as the key.
    let again = c
        .call("approvals.resolve", json!({"id": id, "decision": "deny"}))
        .await;
    assert_eq!(error_code(&again), "conflict");
    let list = c.call("approvals.list", json!({})).await;
    assert_eq!(list["payload"]["approvals"], json!([]));
}

#[tokio::test]
async fn a_denied_approval_ends_the_run_as_failed() {
    let s = start(vec![Step::Approval {
        tool: "exec".into(),
        summary: "x".into(),
    }])
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    c.call("agent", json!({"message": "m"})).await;
    let req = c.event("approval.requested").await;
    let id = req["payload"]["approval"]["id"].clone();
    let r = c
        .call("approvals.resolve", json!({"id": id, "decision": "deny"}))
        .await;
    assert_eq!(r["payload"]["granted"], false);
    let fin = c.event("run.finished").await;
    assert_eq!(fin["payload"]["status"], "failed");
    assert_eq!(fin["payload"]["error"], "the approval was denied");
}

#[tokio::test]
async fn history_and_sessions_come_from_the_backend_for_the_connected_user() {
    let s = start(deltas(&["one"])).await;
    let mut c = Client::connect(s.port, TOKEN).await;
    c.call("chat.send", json!({"text": "first", "session": "main"}))
        .await;
    c.event("run.finished").await;
    let h = c
        .call("chat.history", json!({"session": "main", "limit": 1}))
        .await;
    assert_eq!(
        h["payload"]["messages"],
        json!([{"role": "assistant", "text": "one", "run_id": "run-1"}])
    );
    let l = c.call("sessions.list", json!({})).await;
    assert_eq!(l["payload"]["sessions"], json!([{"session": "main"}]));
    assert!(s.backend.calls().contains(&Call::History {
        user: "owner".into(),
        session: "main".into(),
        limit: 1
    }));
}

#[tokio::test]
async fn without_a_backend_chat_methods_answer_not_configured_and_health_still_works() {
    let auth = Arc::new(TokenAuth::new(TOKEN.as_bytes(), "owner", limits(5)));
    let ws = Arc::new(Ws::new(
        None,
        auth,
        Arc::new(Metrics::default()),
        WsSettings::default(),
    ));
    let port = serve(ws).await;
    let mut c = open(port, "/ws", None).await.unwrap();
    let r = c.call("connect", json!({"token": TOKEN})).await;
    assert_eq!(r["payload"]["agent"], false);
    for (m, p) in [
        ("agent", json!({"message": "hi"})),
        ("chat.send", json!({"text": "hi"})),
        ("agent.wait", json!({"run_id": "r"})),
        ("sessions.list", json!({})),
        ("approvals.list", json!({})),
    ] {
        let r = c.call(m, p).await;
        assert_eq!(error_code(&r), "not_configured", "{m}");
        assert!(
            r["error"]["message"]
                .as_str()
                .unwrap()
                .contains("[agent] model")
        );
    }
    let h = c.call("health", json!({})).await;
    assert_eq!(h["payload"]["ok"], true);
    assert_eq!(h["payload"]["agent"], false);
}

#[tokio::test]
async fn the_server_pings_and_counts_connections_and_frames() {
    let s = start_with(
        vec![],
        WsSettings {
            ping_interval: Duration::from_millis(200),
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    // A client that keeps reading answers the pings (tungstenite replies with pongs) and
    // stays open well past 3 intervals.
    let mut pings = 0;
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(50), c.ws.next()).await {
            match m {
                Some(Ok(Message::Ping(_))) => pings += 1,
                Some(Ok(_)) => {}
                other => panic!("closed: {other:?}"),
            }
        }
    }
    assert!(pings >= 3, "{pings} pings");
    let h = c.call("health", json!({})).await;
    assert_eq!(h["ok"], true);
    assert_eq!(h["payload"]["connections"], 1);
    let m = s.metrics.render(None);
    assert!(
        m.contains("chitin_ws_connections_total{outcome=\"authenticated\"} 1"),
        "{m}"
    );
    assert!(m.contains("chitin_ws_connections_open 1"), "{m}");
    assert!(
        m.contains("chitin_ws_frames_total{direction=\"in\"} 2"),
        "{m}"
    );
    c.ws.close(None).await.unwrap();
    drop(c);
    let deadline = Instant::now() + WAIT;
    while !s
        .metrics
        .render(None)
        .contains("chitin_ws_connections_open 0")
    {
        assert!(Instant::now() < deadline, "the open gauge did not go down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_answers_no_pings_for_three_intervals_is_closed_with_1001() {
    let s = start_with(
        vec![],
        WsSettings {
            ping_interval: Duration::from_millis(100),
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let mut c = Client::connect(s.port, TOKEN).await;
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (_, code) = c.close_code().await;
    assert_eq!(code, Some(1001));
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_with_503() {
    let s = start_with(
        vec![],
        WsSettings {
            max_connections: 2,
            ..WsSettings::default()
        },
        5,
    )
    .await;
    let _a = Client::connect(s.port, TOKEN).await;
    let _b = Client::connect(s.port, TOKEN).await;
    let (status, body) = refused_status(s.port, "/ws", None).await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "too_many_connections");
}

#[tokio::test]
async fn the_chat_page_is_served_with_a_strict_content_security_policy() {
    let s = start(vec![]).await;
    let resp = raw_get(s.port, "/").await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap();
    assert!(csp.contains("default-src 'self'"));
    assert!(csp.contains("script-src 'self';"));
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"));
    assert!(csp.contains(&format!("connect-src 'self' ws://127.0.0.1:{}", s.port)));
    assert!(csp.contains("frame-ancestors 'none'"));
    assert!(head.contains("x-content-type-options: nosniff"));
    assert!(body.contains("id=\"token\"") && body.contains("id=\"send\""));
    let js = raw_get(s.port, "/app.js").await;
    assert!(
        js.to_ascii_lowercase()
            .contains("content-type: text/javascript")
    );
    assert!(js.contains("sessionStorage"));
    // The pairing list: built with textContent only, never markup from the server.
    assert!(body.contains("id=\"pairings\""));
    assert!(js.contains("pairing.list") && js.contains("pairing.resolve"));
    assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML"));
}

async fn raw_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}

// ---- the real binary ----

/// The real gateway binary on a free port (the shared harness of `tests/support/gateway.rs`).
mod real {
    pub use super::harness::fixture;

    pub fn start(extra: &str) -> super::harness::Gw {
        super::harness::Gw::start_with(extra, extra.contains("tls_cert"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_gateway_serves_the_websocket_with_its_own_token_origins_and_limiter() {
    let gw = tokio::task::spawn_blocking(|| {
        real::start("auth_max_failures = 3\nallowed_origins = [\"https://chat.example.com\"]")
    })
    .await
    .unwrap();
    let port = gw.port;
    // Its token, its owner; no agent configured yet.
    let mut c = open(port, "/ws", Some(&format!("http://localhost:{port}")))
        .await
        .unwrap();
    let r = c.call("connect", json!({"token": gw.token})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"]["user"], "owner");
    assert_eq!(r["payload"]["agent"], false);
    // Without a model the agent still answers, with how to configure one.
    let r = c.call("chat.send", json!({"text": "hello"})).await;
    assert_eq!(r["ok"], true, "{r}");
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    let r = c.call("agent.wait", json!({"run_id": run_id})).await;
    assert_eq!(r["payload"]["status"], "completed", "{r}");
    assert!(
        r["payload"]["reply"]
            .as_str()
            .unwrap()
            .contains("No model is configured"),
        "{r}"
    );
    // Foreign origin, query token.
    let (status, _) = refused_status(port, "/ws", Some("http://evil.example")).await;
    assert_eq!(status, 403);
    assert!(
        open(port, "/ws", Some("https://chat.example.com"))
            .await
            .is_ok(),
        "a configured origin is allowed"
    );
    // The page is there.
    assert!(raw_get(port, "/").await.contains("content-security-policy"));
    // Failed connects count in the gateway's own limiter (shared with HTTP).
    let q = format!("/ws?token={}", gw.token);
    let (status, _) = refused_status(port, &q, None).await;
    assert_eq!(status, 401);
    for _ in 0..2 {
        let mut c = open(port, "/ws", None).await.unwrap();
        let r = c.call("connect", json!({"token": "0".repeat(64)})).await;
        assert_eq!(error_code(&r), "unauthorized");
    }
    let mut c2 = open(port, "/ws", None).await.unwrap();
    let r = c2.call("connect", json!({"token": "0".repeat(64)})).await;
    assert_eq!(error_code(&r), "rate_limited");
    // The right token is never refused for failures.
    let mut c3 = open(port, "/ws", None).await.unwrap();
    let r = c3.call("connect", json!({"token": gw.token})).await;
    assert_eq!(r["ok"], true, "{r}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_websockets_and_failed_connects_never_refuse_the_right_token() {
    let gw = tokio::task::spawn_blocking(|| real::start("auth_max_failures = 3"))
        .await
        .unwrap();
    let port = gw.port;
    // Another site's page opening WebSockets, even with the right token in the URL: the
    // origin refusal (not 401), and nothing counted.
    for i in 0..20 {
        let path = match i % 3 {
            0 => "/ws".to_string(),
            1 => "/ws?token=0000".to_string(),
            _ => format!("/ws?token={}", gw.token),
        };
        let (status, body) = refused_status(port, &path, Some("http://evil.example")).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(
            body,
            json!({"error": {"code": "origin_refused", "message": ORIGIN_REFUSED}})
        );
    }
    let mut c = open(port, "/ws", Some(&format!("http://127.0.0.1:{port}")))
        .await
        .unwrap();
    let r = c.call("connect", json!({"token": gw.token})).await;
    assert_eq!(r["ok"], true, "{r}");
    // Failed connects from loopback: unauthorized, then rate_limited...
    let mut codes = Vec::new();
    for _ in 0..6 {
        let mut c = open(port, "/ws", None).await.unwrap();
        let r = c.call("connect", json!({"token": "0".repeat(64)})).await;
        codes.push(error_code(&r).to_string());
    }
    assert_eq!(codes[..3], ["unauthorized"; 3]);
    assert_eq!(codes[3..], ["rate_limited"; 3]);
    // ...and the right token still connects at once, from the page's origin and without one.
    for origin in [Some(format!("http://localhost:{port}")), None] {
        let mut c = open(port, "/ws", origin.as_deref()).await.unwrap();
        let r = c.call("connect", json!({"token": gw.token})).await;
        assert_eq!(r["ok"], true, "{origin:?}: {r}");
    }
}

async fn raw_post(port: u16, path: &str, token: &str, body: &Value) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_gateway_resolves_a_tools_invoke_approval_over_the_websocket() {
    let gw = tokio::task::spawn_blocking(|| real::start(""))
        .await
        .unwrap();
    let port = gw.port;
    let call = json!({"tool": "exec", "args": {"argv": ["/bin/echo", "ws-approved"], "network": ["127.0.0.1:9"]}, "session": "s-ws"});
    let mut c = Client::connect(port, &gw.token).await;
    let (status, v) = raw_post(port, "/tools/invoke", &gw.token, &call).await;
    assert_eq!(status, 202, "{v}");
    let code = v["approval"]["code"].as_str().unwrap().to_string();
    let id = v["approval"]["id"].as_str().unwrap().to_string();
    // Announced live to the owner's connections.
    let ev = c.event("approval.requested").await;
    assert_eq!(ev["seq"], 1);
    assert_eq!(ev["payload"]["run_id"], Value::Null);
    assert_eq!(ev["payload"]["session"], "s-ws");
    assert_eq!(ev["payload"]["approval"]["code"], code.as_str());
    assert_eq!(ev["payload"]["approval"]["id"], id.as_str());

    let l = c.call("approvals.list", json!({})).await;
    let list = l["payload"]["approvals"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{l}");
    assert_eq!(list[0]["code"], code.as_str());
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["tool"], "exec");
    assert_eq!(list[0]["session"], "s-ws");
    assert!(
        list[0]["summary"].as_str().unwrap().contains("ws-approved"),
        "{l}"
    );
    // An unknown code is not found; then the real one, as the owner (Cedar approval.grant).
    let r = c
        .call(
            "approvals.resolve",
            json!({"code": "ZZZZZZ", "decision": "approve"}),
        )
        .await;
    assert_eq!(error_code(&r), "not_found");
    let r = c
        .call(
            "approvals.resolve",
            json!({"code": code, "decision": "approve"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["payload"],
        json!({"approval_id": id, "code": code, "granted": true, "by": "owner"})
    );
    let ev = c.event("approval.resolved").await;
    assert_eq!(ev["payload"]["code"], code.as_str());
    assert_eq!(ev["seq"], 2);
    // Not pending any more.
    let r = c
        .call("approvals.resolve", json!({"id": id, "decision": "deny"}))
        .await;
    assert_eq!(error_code(&r), "conflict", "{r}");
    let l = c.call("approvals.list", json!({})).await;
    assert_eq!(l["payload"]["approvals"], json!([]));
    // The same call now runs, once.
    let (status, v) = raw_post(port, "/tools/invoke", &gw.token, &call).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["result"]["stdout"]
            .as_str()
            .unwrap()
            .contains("ws-approved")
    );
    assert_eq!(v["approval"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_invoke_approval_shows_its_stdin_in_the_response_the_event_the_list_and_show() {
    let gw = tokio::task::spawn_blocking(|| real::start(""))
        .await
        .unwrap();
    let port = gw.port;
    let mut c = Client::connect(port, &gw.token).await;
    let call = |stdin: &str| {
        json!({"tool": "exec", "session": "s-stdin", "args": {
            "argv": ["python3", "-"], "network": ["127.0.0.1:9"], "stdin": stdin}})
    };
    // Two calls that differ only in stdin: two approvals that do not look alike.
    let (status, small) = raw_post(port, "/tools/invoke", &gw.token, &call("print(1)")).await;
    assert_eq!(status, 202, "{small}");
    let big = format!("HEAD-{}-MIDDLE-{}-TAIL", "a".repeat(4000), "z".repeat(4000));
    let (status, large) = raw_post(port, "/tools/invoke", &gw.token, &call(&big)).await;
    assert_eq!(status, 202, "{large}");
    // The arguments, then what the gate resolved (the canonical cwd and the program's path).
    let small_summary = small["approval"]["summary"].as_str().unwrap();
    assert!(
        small_summary.starts_with(
            "run `python3 -` with network access to 127.0.0.1:9; stdin: \"print(1)\"; resolved.cwd: \""
        ) && small_summary.contains("; resolved.command_path: \"/usr/bin/python3"),
        "{small_summary}"
    );
    let summary = large["approval"]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(
            "run `python3 -` with network access to 127.0.0.1:9; stdin: 8018 bytes, sha256 "
        ) && summary.contains("\"HEAD-aaa")
            && summary.contains("zzz-TAIL\"; resolved.cwd: "),
        "{summary}"
    );
    assert!(!summary.contains("MIDDLE"));
    let stdin_field = |a: &Value| {
        a["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == "/stdin")
            .cloned()
            .unwrap()
    };
    assert_eq!(stdin_field(&small["approval"])["value"], "print(1)");
    let f = stdin_field(&large["approval"]);
    assert_eq!((&f["complete"], &f["bytes"]), (&json!(false), &json!(8018)));
    // The events carry the same presentation.
    let ev = c.event("approval.requested").await;
    assert_eq!(
        ev["payload"]["approval"]["summary"],
        small["approval"]["summary"]
    );
    assert_eq!(stdin_field(&ev["payload"]["approval"])["value"], "print(1)");
    let ev = c.event("approval.requested").await;
    assert_eq!(
        ev["payload"]["approval"]["fields"],
        large["approval"]["fields"]
    );
    // approvals.show gives the whole text of every field.
    let id = large["approval"]["id"].as_str().unwrap();
    let r = c.call("approvals.show", json!({"id": id})).await;
    assert_eq!(r["ok"], true, "{r}");
    let f = stdin_field(&r["payload"]["approval"]);
    assert_eq!((&f["complete"], &f["value"]), (&json!(true), &json!(big)));
    let r = c
        .call("approvals.show", json!({"id": "0".repeat(32)}))
        .await;
    assert_eq!(error_code(&r), "not_found", "{r}");
    let l = c.call("approvals.list", json!({})).await;
    let summaries: Vec<&str> = l["payload"]["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["summary"].as_str().unwrap())
        .collect();
    assert_eq!(summaries.len(), 2, "{l}");
    assert_ne!(summaries[0], summaries[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_websocket_works_as_wss_from_the_https_origin() {
    use rustls::pki_types::pem::PemObject;
    let cfg = format!(
        "tls_cert = {:?}\ntls_key = {:?}",
        real::fixture("gateway-test.crt"),
        real::fixture("gateway-test.key")
    );
    let gw = tokio::task::spawn_blocking(move || real::start(&cfg))
        .await
        .unwrap();
    let port = gw.port;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            rustls::pki_types::CertificateDer::from_pem_file(real::fixture("gateway-test.crt"))
                .unwrap(),
        )
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let open_wss = |origin: &'static str| {
        let tls = Arc::clone(&tls);
        async move {
            let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect("localhost".try_into().unwrap(), tcp)
                .await
                .unwrap();
            let mut req = format!("wss://localhost:{port}/ws")
                .into_client_request()
                .unwrap();
            let o = origin.replace("PORT", &port.to_string());
            req.headers_mut().insert("Origin", o.parse().unwrap());
            tokio_tungstenite::client_async(req, stream).await
        }
    };
    let (mut ws, _) = open_wss("https://localhost:PORT").await.unwrap();
    let connect =
        json!({"type": "req", "id": 1, "method": "connect", "params": {"token": gw.token}});
    ws.send(Message::text(connect.to_string())).await.unwrap();
    let r = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"]["user"], "owner");
    match open_wss("https://evil.example").await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("a foreign origin was not refused: {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_of_the_real_agent_streams_over_the_websocket_and_can_be_cancelled() {
    use chitin::providers::testing::{FakeOpenAi, Reply, Step as ModelStep};
    let fake = FakeOpenAi::start(vec![
        ModelStep::Reply(Reply::text(["Hel", "lo"])),
        ModelStep::Hang,
    ])
    .await
    .unwrap();
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
        fake.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || real::start(&cfg))
        .await
        .unwrap();
    let mut c = open(gw.port, "/ws", None).await.unwrap();
    let r = c.call("connect", json!({"token": gw.token})).await;
    assert_eq!(r["payload"]["agent"], true, "{r}");
    // A streamed reply from the real agent loop.
    let r = c
        .call("chat.send", json!({"text": "hi", "session": "ws:test"}))
        .await;
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    let r = c.call("agent.wait", json!({"run_id": run_id})).await;
    assert_eq!(r["payload"]["status"], "completed", "{r}");
    assert_eq!(r["payload"]["reply"], "Hello");
    let r = c.call("chat.history", json!({"session": "ws:test"})).await;
    let texts: Vec<&str> = r["payload"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["hi", "Hello"]);
    // A run whose model hangs is cancelled.
    let r = c
        .call("agent", json!({"message": "hang", "session": "ws:test"}))
        .await;
    let run_id = r["payload"]["run_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests().len() < 2 {
        assert!(Instant::now() < deadline, "the model was never asked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = c.call("agent.cancel", json!({"run_id": run_id})).await;
    assert_eq!(r["payload"]["cancelled"], true, "{r}");
    let r = c.call("agent.wait", json!({"run_id": run_id})).await;
    assert_eq!(r["payload"]["status"], "cancelled", "{r}");
    // Another user's run (or a made-up one) is not found.
    let r = c
        .call(
            "agent.cancel",
            json!({"run_id": "run_000000000000000000000000"}),
        )
        .await;
    assert_eq!(error_code(&r), "not_found");
}

// ---- pairing over the WebSocket (real gateway, a Telegram channel on the fake Bot API) ----

mod pairing {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use chitin::providers::testing::{FakeOpenAi, FakeServer, Reply, Step};
    use chitin_channels::telegram::fake::{
        FakeChat, FakeTelegram, FakeUser, MessageBuilder, TOKEN,
    };

    use super::*;

    pub struct Setup {
        pub _rt: tokio::runtime::Runtime,
        pub tg: FakeTelegram,
        pub _model: FakeServer,
        pub gw: super::harness::Gw,
        pub code: String,
    }

    /// A gateway whose `[gateway] owner` (the WebSocket's user) is `owner` and whose CLI acts
    /// as `owner`, with the `tg` channel, and one open pairing request (Alice, 4242, wrote to the bot in a DM and got her code).
    pub fn gateway_with_a_pending_pairing(owner: &str) -> Setup {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let tg = rt.block_on(FakeTelegram::start()).unwrap();
        let model = rt
            .block_on(FakeOpenAi::start(vec![Step::Reply(Reply::text(["hi"]))]))
            .unwrap();
        let cfg = format!(
            "owner = \"{owner}\"\n\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n\n\
             [[channels]]\nname = \"tg\"\nkind = \"telegram\"\ntoken = \"secret:tg_token\"\napi_base = \"http://{}\"\nmode = \"polling\"\n\n\
             [cli]\noperator = \"owner\"\n",
            model.base_url(),
            tg.addr()
        );
        let mut gw = super::harness::Gw::start(&cfg);
        gw.signal("-TERM");
        assert!(gw.wait_exit().success());
        let mut child = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["secrets", "set", "tg_token", "--audience", "127.0.0.1"])
            .env("CHITIN_HOME", &gw.home)
            .env("CHITIN_PASSPHRASE", super::harness::PASS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(TOKEN.as_bytes())
            .unwrap();
        assert!(child.wait_with_output().unwrap().status.success());
        gw.spawn();
        let alice = FakeUser::new(4242, "Alice");
        let dm = FakeChat::private(&alice);
        tg.push_message(MessageBuilder::text(&dm, &alice, "hello bot"));
        let deadline = Instant::now() + Duration::from_secs(90);
        let code = loop {
            let out = gw.chitin(&["pairing", "list", "--json"]);
            let list: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if let Some(c) = list[0]["code"].as_str() {
                break c.to_string();
            }
            assert!(Instant::now() < deadline, "no pairing request");
            std::thread::sleep(Duration::from_millis(50));
        };
        Setup {
            _rt: rt,
            tg,
            _model: model,
            gw,
            code,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_lists_and_approves_a_pairing_over_the_websocket() {
    use chitin_channels::telegram::fake::{FakeChat, FakeUser, MessageBuilder};
    let s = tokio::task::spawn_blocking(|| pairing::gateway_with_a_pending_pairing("owner"))
        .await
        .unwrap();
    let mut c = Client::connect(s.gw.port, &s.gw.token).await;
    let r = c.call("pairing.list", json!({})).await;
    assert_eq!(r["ok"], true, "{r}");
    let reqs = r["payload"]["requests"].as_array().unwrap();
    assert_eq!(reqs.len(), 1, "{r}");
    assert_eq!(reqs[0]["code"], s.code.as_str());
    assert_eq!(reqs[0]["identity"], "telegram:4242");
    assert_eq!(reqs[0]["channel"], "tg");
    // A bad decision is refused before anything is decided.
    let r = c
        .call(
            "pairing.resolve",
            json!({"code": s.code, "decision": "maybe"}),
        )
        .await;
    assert_eq!(error_code(&r), "invalid_params", "{r}");
    let r = c
        .call(
            "pairing.resolve",
            json!({"code": s.code, "decision": "approve"}),
        )
        .await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"]["request"]["identity"], "telegram:4242");
    assert_eq!(r["payload"]["request"]["user"], "owner");
    // Single use: the same code again is a conflict, and nothing is open any more.
    let r = c
        .call(
            "pairing.resolve",
            json!({"code": s.code, "decision": "deny"}),
        )
        .await;
    assert_eq!(error_code(&r), "conflict", "{r}");
    let r = c.call("pairing.list", json!({})).await;
    assert_eq!(r["payload"]["requests"], json!([]), "{r}");
    // Paired: Alice's next DM reaches the model and its answer is sent to her.
    tokio::task::spawn_blocking(move || {
        let alice = FakeUser::new(4242, "Alice");
        let dm = FakeChat::private(&alice);
        s.tg.push_message(MessageBuilder::text(&dm, &alice, "am I in?"));
        let deadline = Instant::now() + Duration::from_secs(90);
        while !s
            .tg
            .sent()
            .iter()
            .any(|m| m.chat_id == dm.id && m.text == "hi")
        {
            assert!(Instant::now() < deadline, "no answer after the pairing");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(s);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_cedar_does_not_permit_can_neither_list_nor_approve_pairings_over_the_websocket() {
    let s = tokio::task::spawn_blocking(|| pairing::gateway_with_a_pending_pairing("mallory"))
        .await
        .unwrap();
    let mut c = Client::connect(s.gw.port, &s.gw.token).await;
    let r = c.call("pairing.list", json!({})).await;
    assert_eq!(error_code(&r), "forbidden", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("mallory may not decide pairings (policy decision: deny"),
        "{r}"
    );
    let r = c
        .call(
            "pairing.resolve",
            json!({"code": s.code, "decision": "approve", "user": "mallory"}),
        )
        .await;
    assert_eq!(error_code(&r), "forbidden", "{r}");
    // Still open: the CLI (operator `owner`) sees the request unchanged.
    let out = s.gw.chitin(&["pairing", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["code"], s.code.as_str());
    assert_eq!(list[0]["status"], "pending");
    tokio::task::spawn_blocking(move || drop(s)).await.unwrap();
}
