//! For `web_fetch` tests: a page served from 127.0.0.1, and a policy directory that lets owners
//! fetch it (the default `guard.no-private-fetch` forbids every loopback address, and a test has
//! no other address to serve from).
#![allow(dead_code, reason = "each test binary uses a part")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::mpsc;

/// The forbid the test policy directory leaves out.
pub const PRIVATE_FETCH_GUARD: &str = "@id(\"guard.no-private-fetch\")";

/// Writes the built-in schema and default policies into `dir`, without the
/// `guard.no-private-fetch` forbid, plus `extra` as `zz-extra.cedar` when given.
pub fn policies_allowing_loopback_fetch(dir: &Path, extra: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("schema.cedarschema"),
        chitin::policy::builtin::SCHEMA,
    )
    .unwrap();
    for (name, text) in chitin::policy::builtin::DEFAULT_POLICIES {
        let text = match text.find(PRIVATE_FETCH_GUARD) {
            Some(start) => {
                let end = start + text[start..].find("};").expect("the guard ends with `};`") + 2;
                format!("{}{}", &text[..start], &text[end..])
            }
            None => (*text).to_string(),
        };
        std::fs::write(dir.join(name), text).unwrap();
    }
    if let Some(e) = extra {
        std::fs::write(dir.join("zz-extra.cedar"), e).unwrap();
    }
}

/// A request the page server received: the request line and the body.
#[derive(Debug, Clone)]
pub struct Seen {
    pub line: String,
    pub body: String,
}

/// Serves `body` as `text/plain` to every request on 127.0.0.1; returns the port and a
/// receiver of the requests seen.
pub fn serve_page(body: &'static str) -> (u16, mpsc::Receiver<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut b = vec![0; len];
            let _ = r.read_exact(&mut b);
            let _ = tx.send(Seen {
                line: line.trim().to_string(),
                body: String::from_utf8_lossy(&b).into_owned(),
            });
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, rx)
}
