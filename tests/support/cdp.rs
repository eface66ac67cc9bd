//! A headless Chromium driven over the DevTools protocol (a WebSocket to the browser;
//! `Runtime.evaluate` to type, click and read the DOM), for the browser tests of the pages.
//! Screenshots of failures go to `target/browser-artifacts/`.
//!
//! Needs Debian's `chromium` (`apt-get install -y chromium`; `scripts/test.sh` installs it).
//! Without it a test FAILS, saying so: it never passes silently.
#![allow(
    dead_code,
    reason = "each test file uses a different part of the support code"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const PATIENCE: Duration = Duration::from_secs(30);

pub fn chromium() -> PathBuf {
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

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    pub endpoint: String,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn launch() -> Browser {
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
pub struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next: u64,
    session: Option<String>,
}

impl Cdp {
    pub async fn connect(endpoint: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(endpoint).await.unwrap();
        Self {
            ws,
            next: 0,
            session: None,
        }
    }

    pub async fn call(&mut self, method: &str, params: Value) -> Value {
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
    pub async fn eval(&mut self, expr: &str) -> Value {
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
    pub async fn wait_for(&mut self, expr: &str, what: &str) -> Value {
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

impl Cdp {
    /// Opens `url` in a new tab (this client then talks to it) and waits until it is loaded.
    pub async fn open(&mut self, url: &str) {
        self.session = None;
        let target = self
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = self
            .call(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        self.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        self.call("Runtime.enable", json!({})).await;
        self.call("Page.enable", json!({})).await;
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page")
            .await;
    }

    /// Saves a PNG of the current page as `target/browser-artifacts/<name>.png`.
    pub async fn screenshot(&mut self, name: &str) -> Option<PathBuf> {
        use base64::Engine as _;
        let shot = self
            .call_lenient("Page.captureScreenshot", json!({"format": "png"}))
            .await?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str()?)
            .ok()?;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
        std::fs::create_dir_all(&dir).ok()?;
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, data).ok()?;
        Some(path)
    }

    /// [`Cdp::call`] that answers `None` instead of failing (for failure reports).
    async fn call_lenient(&mut self, method: &str, params: Value) -> Option<Value> {
        self.next += 1;
        let id = self.next;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.ok()?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next()).await.ok()?;
            let Some(Ok(Message::Text(t))) = m else {
                continue;
            };
            let v: Value = serde_json::from_str(&t).ok()?;
            if v["id"] == id {
                return v.get("result").cloned();
            }
        }
    }
}

/// A JavaScript string literal of `s`.
pub fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}
