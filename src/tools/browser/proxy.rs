//! The browser's egress: an HTTP proxy of the gateway on 127.0.0.1, the only destination
//! the browser's sandbox can reach (through the sandbox's egress relay). Every connection
//! Chromium makes (documents, subresources, WebSockets) arrives here as `CONNECT host:port`
//! or an absolute-form `http://` request, and is let through only when:
//! - its host and port are ones a Cedar-allowed navigation of this browser named; it then
//!   goes to exactly the addresses that decision judged (no second DNS answer), or
//! - its host resolves (through the gate's resolver) to public addresses only, or it is a
//!   public IP literal; it then goes to exactly those addresses.
//!
//! Anything else (a private, loopback or link-local address nobody's navigation allowed, a
//! name that does not resolve, another scheme) is answered `403` and noted in the refusals
//! the next tool result reports. Plain-HTTP requests are forwarded one per connection
//! (`Connection: close` both ways), so a connection approved for one host never carries a
//! request for another.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitin_sandbox::host::{Host, parse_host};

use crate::net::{Resolver, is_public};

/// The longest request or response head read.
const MAX_HEAD: usize = 32 * 1024;
/// Connections relayed at once.
const MAX_CONNS: usize = 128;
/// Refusals kept until the next tool result reports them.
const MAX_REFUSALS: usize = 50;

type Allowed = HashMap<(String, u16), Vec<IpAddr>>;

#[derive(Default)]
struct Shared {
    /// `(host, port)` of allowed navigations, and the addresses each decision judged.
    allowed: Mutex<Allowed>,
    refusals: Mutex<Vec<String>>,
    stop: AtomicBool,
    active: AtomicUsize,
}

/// The proxy of one browser.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Listens on 127.0.0.1 (a free port) and serves until dropped.
    pub fn start(resolver: Arc<dyn Resolver>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let shared: Arc<Shared> = Arc::default();
        let sh = Arc::clone(&shared);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                if sh.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNS {
                    sh.active.fetch_sub(1, Ordering::SeqCst);
                    continue;
                }
                let sh = Arc::clone(&sh);
                let resolver = Arc::clone(&resolver);
                std::thread::spawn(move || {
                    serve(conn, &sh, resolver.as_ref());
                    sh.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { port, shared })
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Lets connections to `host:port` go to `addrs` (what an allowed navigation judged).
    pub fn allow(&self, host: &str, port: u16, addrs: &[IpAddr]) {
        if let Ok(mut a) = self.shared.allowed.lock() {
            a.insert((host.to_ascii_lowercase(), port), addrs.to_vec());
        }
    }

    /// The refusals since the last call.
    pub fn take_refusals(&self) -> Vec<String> {
        self.shared
            .refusals
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], self.port)),
            Duration::from_secs(1),
        );
    }
}

fn refuse(sh: &Shared, mut client: TcpStream, why: &str) {
    if let Ok(mut r) = sh.refusals.lock()
        && r.len() < MAX_REFUSALS
    {
        r.push(why.to_string());
    }
    let body = format!("blocked by chitin: {why}\n");
    let _ = client.write_all(
        format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads until the end of a head (`\r\n\r\n`); returns the head and any bytes after it.
fn read_head(s: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
    }
}

/// Where a connection to `host:port` may go, or why not.
fn destination(
    sh: &Shared,
    resolver: &dyn Resolver,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, String> {
    let parsed = parse_host(host).map_err(|e| format!("{host}: invalid host: {e}"))?;
    let key = (parsed.to_string(), port);
    if let Some(addrs) = sh.allowed.lock().ok().and_then(|a| a.get(&key).cloned()) {
        return Ok(addrs
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect());
    }
    let addrs = match parsed {
        Host::Ip(ip) => vec![ip],
        Host::Name(n) => resolver.resolve(&n, port)?,
    };
    if addrs.is_empty() {
        return Err(format!("{host}: resolves to no address"));
    }
    if let Some(p) = addrs.iter().find(|ip| !is_public(**ip)) {
        return Err(format!(
            "{host}:{port}: {p} is not a public address, and no allowed navigation named this host"
        ));
    }
    Ok(addrs
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

fn connect(addrs: &[SocketAddr]) -> Option<TcpStream> {
    addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(15)).ok())
}

/// `host` and `port` of an authority (`host:port`, `[v6]:port`).
fn authority(a: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (h, tail) = rest.split_once(']')?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if tail.is_empty() => default_port,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((a.to_string(), default_port)),
    }
}

/// Copies both ways until either side ends.
fn splice(client: TcpStream, upstream: TcpStream) {
    let (Ok(mut c_r), Ok(mut u_r)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let (mut c_w, mut u_w) = (client, upstream);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_r, &mut u_w);
        let _ = u_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut u_r, &mut c_w);
    let _ = c_w.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// The head with the hop-by-hop connection headers replaced by `Connection: close`; for a
/// request, the first line becomes `first`.
fn rewrite_head(head: &str, first: Option<&str>) -> String {
    let mut lines = head.split("\r\n");
    let line0 = lines.next().unwrap_or_default();
    let mut out = String::from(first.unwrap_or(line0));
    out.push_str("\r\n");
    for l in lines {
        if l.is_empty() {
            continue;
        }
        let name = l
            .split(':')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if matches!(
            name.as_str(),
            "connection" | "proxy-connection" | "keep-alive" | "proxy-authorization"
        ) {
            continue;
        }
        out.push_str(l);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

fn serve(mut client: TcpStream, sh: &Shared, resolver: &dyn Resolver) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    let Some((head, rest)) = read_head(&mut client) else {
        return;
    };
    let head = String::from_utf8_lossy(&head).into_owned();
    let line0 = head.split("\r\n").next().unwrap_or_default().to_string();
    let mut parts = line0.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return refuse(sh, client, "a malformed request");
    };
    let _ = client.set_read_timeout(None);
    if method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = authority(target, 443) else {
            return refuse(sh, client, &format!("CONNECT {target}: not host:port"));
        };
        let addrs = match destination(sh, resolver, &host, port) {
            Ok(a) => a,
            Err(why) => return refuse(sh, client, &why),
        };
        let Some(mut upstream) = connect(&addrs) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n");
            return;
        };
        if client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .is_err()
            || (!rest.is_empty() && upstream.write_all(&rest).is_err())
        {
            return;
        }
        return splice(client, upstream);
    }
    let Some(after) = target.strip_prefix("http://") else {
        return refuse(
            sh,
            client,
            &format!("{method} {target}: only http:// requests and CONNECT are relayed"),
        );
    };
    let (auth, path) = match after.find(['/', '?']) {
        Some(i) => (
            after.get(..i).unwrap_or_default(),
            after.get(i..).unwrap_or("/"),
        ),
        None => (after, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if auth.contains('@') {
        return refuse(sh, client, "credentials in a proxied URL");
    }
    let Some((host, port)) = authority(auth, 80) else {
        return refuse(sh, client, &format!("{target}: no host"));
    };
    let addrs = match destination(sh, resolver, &host, port) {
        Ok(a) => a,
        Err(why) => return refuse(sh, client, &why),
    };
    let Some(mut upstream) = connect(&addrs) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n");
        return;
    };
    let request = rewrite_head(&head, Some(&format!("{method} {path} {version}")));
    if upstream.write_all(request.as_bytes()).is_err()
        || (!rest.is_empty() && upstream.write_all(&rest).is_err())
    {
        return;
    }
    // The body (if any) goes up; the answer's head gets `Connection: close`.
    let (Ok(mut c_r), Ok(mut u_w)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_r, &mut u_w);
    });
    let Some((rhead, rrest)) = read_head(&mut upstream) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let rhead = rewrite_head(&String::from_utf8_lossy(&rhead), None);
    if client.write_all(rhead.as_bytes()).is_err() || client.write_all(&rrest).is_err() {
        return;
    }
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn authorities_with_and_without_ports_and_brackets_are_split() {
        assert_eq!(
            authority("a.example:8443", 443),
            Some(("a.example".into(), 8443))
        );
        assert_eq!(authority("a.example", 80), Some(("a.example".into(), 80)));
        assert_eq!(authority("[::1]:9", 80), Some(("::1".into(), 9)));
        assert_eq!(authority("[::1]", 80), Some(("::1".into(), 80)));
        assert_eq!(authority("a:b", 80), None);
    }

    #[test]
    fn forwarded_heads_lose_hop_by_hop_headers_and_close_the_connection() {
        let h = "GET http://a/x HTTP/1.1\r\nHost: a\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nAccept: */*";
        let out = rewrite_head(h, Some("GET /x HTTP/1.1"));
        assert_eq!(
            out,
            "GET /x HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    struct NoDns;
    impl Resolver for NoDns {
        fn resolve(&self, host: &str, _port: u16) -> Result<Vec<IpAddr>, String> {
            match host {
                "public.example" => Ok(vec!["93.184.216.34".parse().unwrap()]),
                "inside.example" => Ok(vec!["10.0.0.7".parse().unwrap()]),
                _ => Err(format!("cannot resolve `{host}`")),
            }
        }
    }

    #[test]
    fn only_public_addresses_or_allowed_navigations_are_reachable() {
        let sh = Shared::default();
        assert!(destination(&sh, &NoDns, "public.example", 443).is_ok());
        let e = destination(&sh, &NoDns, "inside.example", 80).unwrap_err();
        assert!(e.contains("10.0.0.7 is not a public address"), "{e}");
        assert!(destination(&sh, &NoDns, "127.0.0.1", 8080).is_err());
        assert!(destination(&sh, &NoDns, "169.254.169.254", 80).is_err());
        assert!(destination(&sh, &NoDns, "2130706433", 80).is_err());
        sh.allowed.lock().unwrap().insert(
            ("127.0.0.1".into(), 8080),
            vec!["127.0.0.1".parse().unwrap()],
        );
        assert_eq!(
            destination(&sh, &NoDns, "127.0.0.1", 8080).unwrap(),
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        // Another port of the same host was not allowed.
        assert!(destination(&sh, &NoDns, "127.0.0.1", 8081).is_err());
    }
}
