//! The web chat page in a real browser: headless Chromium driven over the DevTools protocol
//! (a WebSocket to the browser; `Runtime.evaluate` to type, click and read the DOM), against
//! the WebSocket router in-process with the scripted backend.
//!
//! Needs Debian's `chromium` (`apt-get install -y chromium`; `scripts/test.sh` installs it).
//! Without it this test FAILS, saying so: it never passes silently.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests"
)]

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin::gateway::auth::LimitConfig;
use chitin::gateway::backend::ChatBackend;
use chitin::gateway::backend::testing::{Call, ScriptedBackend, Step};
use chitin::gateway::metrics::Metrics;
use chitin::gateway::ws::{TokenAuth, Ws, WsSettings};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[path = "support/gateway.rs"]
mod harness;

const TOKEN: &str = "browser-test-token-0123456789";
const PATIENCE: Duration = Duration::from_secs(30);

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHITIN_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "headless Chromium is needed for the web chat test and was not found in PATH: install it with `apt-get install -y chromium` (scripts/test.sh does this) or point CHITIN_CHROMIUM at the binary"
    );
}

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    endpoint: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch() -> Browser {
    let bin = chromium();
    let profile = tempfile::tempdir().unwrap();
    let child = Command::new(&bin)
        .args([
            "--headless=new",
            // Tests run as root, where Chromium's own sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e}; install Chromium with `apt-get install -y chromium`",
                bin.display()
            )
        });
    let mut b = Browser {
        child,
        endpoint: String::new(),
        _profile: profile,
    };
    let file = b._profile.path().join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(ep) = read_port_file(&file) {
            b.endpoint = ep;
            return b;
        }
        if let Some(status) = b.child.try_wait().unwrap() {
            panic!("chromium exited during start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "chromium wrote no DevToolsActivePort"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ws://127.0.0.1:PORT/devtools/browser/ID` from the file Chromium writes.
fn read_port_file(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut lines = text.lines();
    let port: u16 = lines.next()?.trim().parse().ok()?;
    let path = lines.next()?.trim();
    (!path.is_empty()).then(|| format!("ws://127.0.0.1:{port}{path}"))
}

/// A minimal DevTools protocol client (flattened target sessions).
struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    async fn connect(endpoint: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(endpoint).await.unwrap();
        Self {
            ws,
            next: 0,
            session: None,
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"));
            let Some(Ok(Message::Text(t))) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value (promises awaited).
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy; returns its value.
    async fn wait_for(&mut self, expr: &str, what: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.eval(expr).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve(backend: Arc<ScriptedBackend>) -> u16 {
    let auth = Arc::new(TokenAuth::new(
        TOKEN.as_bytes(),
        "owner",
        LimitConfig {
            max_failures: 5,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
        },
    ));
    let dynb: Arc<dyn ChatBackend> = backend;
    let ws = Arc::new(Ws::new(
        Some(dynb),
        auth,
        Arc::new(Metrics::default()),
        WsSettings::default(),
    ));
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

/// The conversation as shown, top to bottom, without system notes: `user:<text>`,
/// `assistant:<text>` (one per text segment), `tool:<name>`.
const SEQUENCE: &str = "Array.from(document.getElementById('messages').children).filter(e => !e.classList.contains('system')).map(e => e.classList.contains('tool') ? 'tool:' + e.querySelector('.tool-name').textContent : (e.classList.contains('user') ? 'user:' : 'assistant:') + (e.querySelector('.text') ? e.querySelector('.text').textContent : e.textContent))";

fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_chat_streams_a_reply_shows_tool_decisions_and_approves_an_action() {
    let hostile = "<img src=x id=pwn onerror=\"document.title='pwned'\">";
    let backend = ScriptedBackend::new(vec![
        Step::Delta("Hello".into()),
        Step::Sleep(Duration::from_millis(30)),
        Step::Delta(", ".into()),
        Step::Delta(hostile.into()),
        Step::Delta(" world.".into()),
        Step::Tool {
            tool: "read_file".into(),
            args: json!({"path": "notes.md"}),
            decision: "allow".into(),
        },
        Step::Tool {
            tool: "write_file".into(),
            args: json!({"path": "/etc/passwd", "content": "x"}),
            decision: "deny".into(),
        },
        Step::Approval {
            tool: "exec".into(),
            summary: "run `rm ./tmp/a` in the workspace".into(),
        },
        Step::Tool {
            tool: "exec".into(),
            args: json!({"command": "rm", "args": ["./tmp/a"]}),
            decision: "allow".into(),
        },
        Step::Delta(" Done.".into()),
    ]);
    let port = serve(Arc::clone(&backend)).await;
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    new_tab(&mut cdp, port).await;

    // Token in, connect.
    cdp.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('connect').click(); true",
        js(TOKEN)
    ))
    .await;
    let status = cdp
        .wait_for(
            "document.getElementById('status').dataset.state === 'connected' && document.getElementById('status').textContent",
            "connected",
        )
        .await;
    assert_eq!(status, "connected as owner");
    // The token is kept in sessionStorage only, and the input was cleared.
    let storage = cdp
        .eval("[sessionStorage.getItem('chitin.token'), localStorage.length, document.getElementById('token').value]")
        .await;
    assert_eq!(storage, json!([TOKEN, 0, ""]));

    // Send a message.
    cdp.eval(
        "document.getElementById('input').value = 'tidy up the workspace'; document.getElementById('send').click(); true",
    )
    .await;
    // The reply streams in from several deltas; the run then waits for the approval, so this
    // text can only have come from the deltas (run.finished has not been sent).
    cdp.wait_for(
        "!!document.querySelector('.approval button.approve')",
        "the pending approval",
    )
    .await;
    let shown = cdp
        .eval("document.querySelector('.msg.assistant .text').textContent")
        .await;
    assert_eq!(shown, format!("Hello, {hostile} world."));
    let user_msg = cdp
        .eval("document.querySelector('.msg.user').textContent")
        .await;
    assert_eq!(user_msg, "tidy up the workspace");
    // Server text is text: no element was created from it, no handler ran.
    let injected = cdp
        .eval("[document.getElementById('pwn') === null, document.querySelectorAll('img').length, document.title]")
        .await;
    assert_eq!(injected, json!([true, 0, "Chitin"]));
    // Each tool call with its decision.
    let tools = cdp
        .eval("Array.from(document.querySelectorAll('.tool')).map(t => [t.querySelector('.tool-name').textContent, t.dataset.decision, t.querySelector('.tool-decision').textContent])")
        .await;
    assert_eq!(
        tools,
        json!([
            ["read_file", "allow", "allow"],
            ["write_file", "deny", "deny"]
        ])
    );
    let approval = cdp
        .eval("(() => { const a = document.querySelector('.approval'); return [a.querySelector('.summary').textContent, a.querySelector('.code').textContent, a.dataset.id]; })()")
        .await;
    assert_eq!(approval[0], "run `rm ./tmp/a` in the workspace");
    let code = approval[1].as_str().unwrap().to_string();
    let approval_id = approval[2].as_str().unwrap().to_string();
    // Not resolved until someone clicks.
    assert!(
        !backend
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Resolve { .. }))
    );

    // Approve.
    cdp.eval("document.querySelector('.approval button.approve').click(); true")
        .await;
    let deadline = Instant::now() + PATIENCE;
    while !backend
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Resolve { .. }))
    {
        assert!(Instant::now() < deadline, "the backend got no resolve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resolve = backend
        .calls()
        .into_iter()
        .find(|c| matches!(c, Call::Resolve { .. }))
        .unwrap();
    assert_eq!(
        resolve,
        Call::Resolve {
            user: "owner".into(),
            code_or_id: approval_id,
            grant: true
        }
    );
    // The run goes on and finishes; the approval leaves the list.
    cdp.wait_for(
        "document.querySelector('.msg.assistant').dataset.status === 'completed'",
        "the run to finish",
    )
    .await;
    let end = cdp
        .eval("[document.querySelectorAll('.approval').length, document.querySelectorAll('.tool[data-decision=\"allow\"]').length, document.getElementById('no-approvals').hidden]")
        .await;
    assert_eq!(end, json!([0, 2, false]));
    // Each tool card stands where it happened: the text after the calls is below them.
    assert_eq!(
        cdp.eval(SEQUENCE).await,
        json!([
            "user:tidy up the workspace",
            format!("assistant:Hello, {hostile} world."),
            "tool:read_file",
            "tool:write_file",
            "tool:exec",
            "assistant: Done."
        ])
    );
    let note = cdp
        .eval("Array.from(document.querySelectorAll('.msg.system')).map(m => m.textContent).join('|')")
        .await;
    assert_eq!(note, format!("Approval {code} approved by owner."));
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_in_the_page_is_refused_and_not_kept() {
    let backend = ScriptedBackend::new(vec![]);
    let port = serve(backend).await;
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    new_tab(&mut cdp, port).await;
    cdp.eval("document.getElementById('token').value = 'wrong'; document.getElementById('connect').click(); true")
        .await;
    cdp.wait_for(
        "document.getElementById('status').dataset.state === 'error'",
        "the refusal",
    )
    .await;
    let r = cdp
        .eval("[document.getElementById('error').textContent, sessionStorage.getItem('chitin.token'), document.getElementById('send').disabled]")
        .await;
    assert_eq!(
        r,
        json!([
            "the token is not the gateway token — paste the current token (`chitin token show`).",
            null,
            true
        ])
    );
    // Refused is refused: the page does not retry by itself.
    assert_eq!(
        cdp.eval("[document.getElementById('status').textContent, document.getElementById('status').dataset.state]")
            .await,
        json!(["refused", "error"])
    );
    drop(browser);
}

/// Opens the gateway's page on `port` in a new tab and waits until it is loaded.
async fn new_tab(cdp: &mut Cdp, port: u16) {
    let target = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}))
        .await;
    let attached = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await;
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    cdp.call("Runtime.enable", json!({})).await;
    cdp.call("Page.enable", json!({})).await;
    cdp.call(
        "Page.navigate",
        json!({"url": format!("http://127.0.0.1:{port}/")}),
    )
    .await;
    cdp.wait_for(
        "document.readyState === 'complete' && !!document.getElementById('connect')",
        "the page",
    )
    .await;
}

/// Opens the page of a gateway on `port` in a new tab and connects with `token`.
async fn open_page(cdp: &mut Cdp, port: u16, token: &str) {
    new_tab(cdp, port).await;
    cdp.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('connect').click(); true",
        js(token)
    ))
    .await;
    cdp.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "connected",
    )
    .await;
}

/// End to end: the real gateway binary, its agent loop, a fake OpenAI-compatible model on
/// loopback, the sandbox, and a person approving in the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_gateway_streams_the_agents_reply_and_runs_a_call_after_approval_in_the_page() {
    use chitin::providers::testing::{FakeOpenAi, Reply, Step as ModelStep};
    // What the call binds includes a stdin too large to show inline, with a bidi override.
    let stdin = format!(
        "BEGIN\u{202e}{}MIDDLE-MARKER{}END",
        "y".repeat(3000),
        "z".repeat(3000)
    );
    let call =
        json!({"argv": ["touch", "browser-marker"], "network": ["127.0.0.1:9"], "stdin": stdin})
            .to_string();
    let fake = FakeOpenAi::start(vec![
        ModelStep::Reply(
            Reply::text(["Creating ", "the ", "marker."]).tool_call("c1", "exec", &call, 2),
        ),
        ModelStep::Reply(Reply::text([" All ", "done."])),
    ])
    .await
    .unwrap();
    let cfg = format!(
        "\n[agent]\nmodel = \"fake/m1\"\n\n[[providers]]\nname = \"fake\"\nkind = \"openai\"\nbase_url = \"{}\"\n",
        fake.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || harness::Gw::start(&cfg))
        .await
        .unwrap();
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    open_page(&mut cdp, gw.port, &gw.token).await;
    cdp.eval(
        "document.getElementById('input').value = 'make a marker file'; document.getElementById('send').click(); true",
    )
    .await;
    cdp.wait_for(
        "!!document.querySelector('.approval button.approve')",
        "the pending approval",
    )
    .await;
    let summary = cdp
        .eval("document.querySelector('.approval .summary').textContent")
        .await;
    assert!(
        summary.as_str().unwrap().contains("127.0.0.1:9"),
        "{summary}"
    );
    // Every bound argument is on the page, labelled; the large stdin abbreviated (size,
    // sha256, head and tail), escaped, with its full text one click away.
    let fields = cdp
        .eval(
            "Array.from(document.querySelectorAll('.approval .fields dt')).map(d => d.textContent)",
        )
        .await;
    assert_eq!(
        fields,
        json!([
            "argv[0]",
            "argv[1]",
            "cwd",
            "network[0]",
            "stdin",
            "timeout_secs",
            "resolved.cwd",
            "resolved.command_path"
        ])
    );
    let shown = cdp
        .eval("(() => { const v = document.querySelectorAll('.approval .field-value'); const m = document.querySelectorAll('.approval .field-meta'); return [v[4].textContent, m[4].textContent, v[4].dataset.complete]; })()")
        .await;
    let (text, meta) = (shown[0].as_str().unwrap(), shown[1].as_str().unwrap());
    assert!(
        text.starts_with("BEGIN\\u{202e}yyy") && text.ends_with("zzzEND"),
        "{text}"
    );
    assert!(!text.contains("MIDDLE-MARKER") && !text.contains('\u{202e}'));
    assert!(
        meta.starts_with("6024 bytes, sha256 ") && meta.ends_with("(abbreviated)"),
        "{meta}"
    );
    assert_eq!(shown[2], "false");
    cdp.eval("document.querySelector('.approval button.show-full').click(); true")
        .await;
    cdp.wait_for(
        "document.querySelectorAll('.approval .field-value')[4].dataset.complete === 'true'",
        "the full text",
    )
    .await;
    let full = cdp
        .eval("document.querySelectorAll('.approval .field-value')[4].textContent")
        .await;
    assert_eq!(full, json!(chitin::approvals::exact(&stdin)));
    assert!(!gw.workspace().join("browser-marker").exists());
    cdp.eval("document.querySelector('.approval button.approve').click(); true")
        .await;
    cdp.wait_for(
        "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').dataset.status === 'completed'",
        "the run to finish",
    )
    .await;
    let end = cdp
        .eval("Array.from(document.querySelectorAll('.tool')).map(t => t.dataset.decision)")
        .await;
    assert_eq!(end, json!(["allow"]), "{end}");
    assert_eq!(
        cdp.eval(SEQUENCE).await,
        json!([
            "user:make a marker file",
            "assistant:Creating the marker.",
            "tool:exec",
            "assistant: All done."
        ])
    );
    assert!(gw.workspace().join("browser-marker").exists());
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_too_many_wrong_tokens_the_page_says_this_address_is_locked_out() {
    let backend = ScriptedBackend::new(vec![]);
    let port = serve(backend).await;
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    new_tab(&mut cdp, port).await;
    // The server allows 5 failures a minute; past that, attempts are refused as rate limited.
    let mut last = Value::Null;
    for _ in 0..8 {
        cdp.eval("document.getElementById('status').dataset.state = 'x'; document.getElementById('token').value = 'wrong'; document.getElementById('connect').click(); true")
            .await;
        last = cdp
            .wait_for(
                "document.getElementById('status').dataset.state === 'error' && document.getElementById('status').textContent",
                "the refusal",
            )
            .await;
        if last == "locked out" {
            break;
        }
        assert_eq!(last, "refused");
    }
    assert_eq!(last, "locked out");
    let text = cdp
        .eval("document.getElementById('error').textContent")
        .await;
    assert!(
        text.as_str()
            .unwrap()
            .starts_with("Locked out: too many failed token attempts"),
        "{text}"
    );
    drop(browser);
}

/// The real gateway stops (SIGTERM) and starts again on the same port: the page says why it
/// lost the connection and reconnects by itself, with nothing typed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_why_it_disconnected_and_reconnects_by_itself_after_a_gateway_restart() {
    let mut gw = tokio::task::spawn_blocking(|| harness::Gw::start(""))
        .await
        .unwrap();
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    open_page(&mut cdp, gw.port, &gw.token).await;
    gw.signal("-TERM");
    let mut gw = tokio::task::spawn_blocking(move || {
        gw.wait_exit();
        gw
    })
    .await
    .unwrap();
    let said = cdp
        .wait_for(
            "document.getElementById('status').dataset.state === 'reconnecting' && document.getElementById('error').textContent",
            "the disconnect reason",
        )
        .await;
    let said = said.as_str().unwrap();
    assert!(
        said.starts_with("Disconnected: the gateway restarted or is stopping")
            || said.starts_with("Disconnected: the connection to the gateway was lost"),
        "{said}"
    );
    assert!(said.contains("Reconnecting by itself"), "{said}");
    let gw = tokio::task::spawn_blocking(move || {
        gw.spawn();
        gw
    })
    .await
    .unwrap();
    let status = cdp
        .wait_for(
            "document.getElementById('status').dataset.state === 'connected' && document.getElementById('status').textContent",
            "the reconnection",
        )
        .await;
    assert_eq!(status, "connected as owner");
    assert_eq!(
        cdp.eval("[document.getElementById('error').textContent.startsWith('Disconnected'), document.getElementById('send').disabled, Array.from(document.querySelectorAll('.msg.system')).map(m => m.textContent)]")
            .await,
        json!([false, false, ["Reconnected."]])
    );
    drop(gw);
    drop(browser);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_works_at_phone_width() {
    let backend = ScriptedBackend::new(vec![Step::Delta(
        "a reply that is long enough to wrap on a phone screen".into(),
    )]);
    let port = serve(backend).await;
    let browser = tokio::task::spawn_blocking(launch).await.unwrap();
    let mut cdp = Cdp::connect(&browser.endpoint).await;
    new_tab(&mut cdp, port).await;
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 375, "height": 740, "deviceScaleFactor": 2, "mobile": true}),
    )
    .await;
    cdp.wait_for("window.innerWidth === 375", "the phone viewport")
        .await;
    cdp.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('connect').click(); true",
        js(TOKEN)
    ))
    .await;
    cdp.wait_for(
        "document.getElementById('status').dataset.state === 'connected'",
        "connected",
    )
    .await;
    cdp.eval("document.getElementById('input').value = 'hi'; document.getElementById('send').click(); true")
        .await;
    cdp.wait_for("!!document.querySelector('.msg.assistant')", "the reply")
        .await;
    // Nothing scrolls sideways; the chat takes the whole width, the side panel goes below it;
    // the message box and the send button are on screen.
    let m = cdp
        .eval("(() => { const r = (id) => document.getElementById(id).getBoundingClientRect(); const w = window.innerWidth; return [document.documentElement.scrollWidth <= w, r('chat').width >= 0.9 * w, document.querySelector('aside').getBoundingClientRect().top >= r('chat').bottom, r('send').right <= w, r('input').width >= 0.5 * w, r('token').right <= w]; })()")
        .await;
    assert_eq!(m, json!([true, true, true, true, true, true]), "{m}");
    drop(browser);
}
