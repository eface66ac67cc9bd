//! The gateway as a child process for tests: the real `chitin gateway` binary on a free
//! loopback port with its own state dir, driven over HTTP/1.1 by a few lines over
//! `std::net::TcpStream` (`Connection: close`, read to EOF).
#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const PASS: &str = "gateway-test-passphrase";

pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn http(port: u16, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    exchange(&mut s, port, method, target, headers, body).unwrap()
}

/// HTTPS with the test certificate as the only trust anchor (a rustls client, aws-lc-rs).
pub fn https(
    tls: &Arc<rustls::ClientConfig>,
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let conn = rustls::ClientConnection::new(Arc::clone(tls), "localhost".try_into().unwrap())
        .map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    exchange(&mut s, port, method, target, headers, body)
}

pub fn tls_client() -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let cert = CertificateDer::from_pem_file(fixture("gateway-test.crt")).unwrap();
    roots.add(cert).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn exchange(
    s: &mut (impl Read + Write),
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    s.write_all(body)?;
    s.flush()?;
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        // A TLS peer that closes without close_notify: keep what arrived.
        if e.kind() != std::io::ErrorKind::UnexpectedEof || raw.is_empty() {
            return Err(e);
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("incomplete response: {text:?}")))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        loop {
            let (size, after) = rest.split_once("\r\n").unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// A loopback port for a process the test starts (a gateway), free when this returns.
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a port from
/// `bind(127.0.0.1:0)` is in that range, and between this check and the gateway's own bind any
/// socket another test opens meanwhile (a fake server's bind to port 0, and above all the
/// local end of a client's `connect`, thousands of which the suite makes) can be handed the
/// same port, so the gateway fails to start with "Address already in use" (seen in CI). Below
/// the range only an explicit bind takes a port; each call walks on from a per-process random
/// start, so tests in one run and concurrent runs do not pick the same port.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let Some(span) = ephemeral_low.checked_sub(LOW).filter(|s| *s >= 1_000) else {
        // No room below the ephemeral range on this machine: the kernel's choice.
        return std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    };
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let port = LOW + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = u16::try_from(port).unwrap();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{ephemeral_low}");
}

pub struct Gw {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub home: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub token: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// More environment for the gateway process (set before [`Gw::spawn`]).
    pub env: Vec<(String, String)>,
}

impl Gw {
    pub fn start(extra_config: &str) -> Self {
        Self::start_with(extra_config, false)
    }

    pub fn start_tls(extra_config: &str) -> Self {
        let cfg = format!(
            "tls_cert = {:?}\ntls_key = {:?}\n{extra_config}",
            fixture("gateway-test.crt"),
            fixture("gateway-test.key")
        );
        Self::start_with(&cfg, true)
    }

    pub fn start_with(extra_config: &str, tls: bool) -> Self {
        Self::start_custom(free_port(), extra_config, tls, |_| {})
    }

    /// [`Self::start_with`] on a chosen port (for config that names the gateway's own
    /// address), with `prepare` run on the state dir before the gateway starts (e.g. to write
    /// `entities.json`).
    pub fn start_custom(
        port: u16,
        extra_config: &str,
        tls: bool,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        // Not under /tmp: the gateway refuses a state dir in a directory every local process
        // can write.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let root = dir.path().to_path_buf();
        let home = root.join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::write(
            home.join("chitin.toml"),
            format!(
                "[secrets]\nbackend = \"passphrase\"\nscrypt_work_factor = 16\n\n[gateway]\n{extra_config}\n"
            ),
        )
        .unwrap();
        prepare(&home);
        let mut gw = Self {
            _dir: dir,
            root,
            home,
            port,
            child: None,
            token: String::new(),
            tls: tls.then(tls_client),
            env: Vec::new(),
        };
        gw.spawn();
        gw
    }

    /// Starts the gateway process (again, after it exited) on the same state dir and port, and
    /// waits for `/health`.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("gateway.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(["gateway", "--bind", &format!("127.0.0.1:{}", self.port)])
            .env("CHITIN_HOME", &self.home)
            .env("CHITIN_PASSPHRASE", PASS)
            .env("CHITIN_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let gw = self;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = gw.try_req("GET", "/health", &[], b"")
                && r.status == 200
                && r.body == "ok"
            {
                break;
            }
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited during start: {status}; its log:\n{}",
                    std::fs::read_to_string(gw.root.join("gateway.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "gateway did not answer /health");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = gw.chitin(&["token", "show"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        gw.token = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert_eq!(gw.token.len(), 64);
    }

    pub fn chitin(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_chitin"))
            .args(args)
            .env("CHITIN_HOME", &self.home)
            .env("CHITIN_PASSPHRASE", PASS)
            .output()
            .unwrap()
    }

    pub fn workspace(&self) -> PathBuf {
        self.root.join("chitin-workspace")
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    pub fn try_req(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        match &self.tls {
            Some(tls) => https(tls, self.port, method, target, headers, body),
            None => {
                let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                exchange(&mut s, self.port, method, target, headers, body)
            }
        }
    }

    pub fn get(&self, path: &str) -> Resp {
        self.try_req("GET", path, &[("Authorization", &self.bearer())], b"")
            .unwrap()
    }

    pub fn invoke(&self, body: &Value) -> Resp {
        self.try_req(
            "POST",
            "/tools/invoke",
            &[
                ("Authorization", &self.bearer()),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .unwrap()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
