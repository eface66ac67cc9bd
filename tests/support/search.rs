//! Fakes of the two `web_search` backends on 127.0.0.1, answering with their real JSON:
//! SearXNG (`GET /search?q=...&format=json`) and the Brave Search API
//! (`GET /res/v1/web/search?q=...&count=N` with `X-Subscription-Token`). Each records the
//! requests it saw (request line and headers).
#![allow(dead_code, reason = "each test binary uses a part")]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

/// A request a fake saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// `GET /search?q=... HTTP/1.1`
    pub line: String,
    /// Header lines, as sent (`Name: value`).
    pub headers: Vec<String>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// The decoded value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<String> {
        let target = self.line.split(' ').nth(1)?;
        let url = url_of(target);
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

fn url_of(target: &str) -> reqwest::Url {
    reqwest::Url::parse(&format!("http://fake{target}")).unwrap()
}

/// A running fake backend.
pub struct FakeSearch {
    pub port: u16,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

impl FakeSearch {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Searxng,
    Brave,
}

/// Starts a fake backend. Its results echo the query: result `i` has url
/// `https://result<i>.example/<query words joined by ->`, title `Result <i> for <query>`, and
/// a snippet that also carries `injection` (text a page could put there).
/// Brave answers 401 unless `X-Subscription-Token` equals `key`.
pub fn start(kind: Kind, key: Option<&'static str>, injection: &'static str) -> FakeSearch {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                    break;
                }
                headers.push(h.trim().to_string());
            }
            let req = SeenRequest {
                line: line.trim().to_string(),
                headers,
            };
            s2.lock().unwrap().push(req.clone());
            let target = req.line.split(' ').nth(1).unwrap_or("/").to_string();
            let url = url_of(&target);
            let q = req.param("q").unwrap_or_default();
            let slug = q.split_whitespace().collect::<Vec<_>>().join("-");
            let (status, body) = match kind {
                Kind::Searxng if url.path() != "/search" => (404, "{}".to_string()),
                Kind::Searxng if req.param("format").as_deref() != Some("json") => {
                    // SearXNG answers 403 for a format that is not enabled.
                    (403, "Forbidden".to_string())
                }
                Kind::Searxng => (
                    200,
                    serde_json::json!({
                        "query": q,
                        "number_of_results": 0,
                        "results": (1..=3).map(|i| serde_json::json!({
                            "url": format!("https://result{i}.example/{slug}"),
                            "title": format!("Result {i} for {q}"),
                            "content": format!("snippet {i}. {injection}"),
                            "engine": "duckduckgo",
                            "parsed_url": ["https", format!("result{i}.example"), format!("/{slug}"), "", "", ""],
                            "template": "default.html",
                            "engines": ["duckduckgo"],
                            "positions": [i],
                            "score": 1.0,
                            "category": "general"
                        })).collect::<Vec<_>>(),
                        "answers": [],
                        "corrections": [],
                        "infoboxes": [],
                        "suggestions": [],
                        "unresponsive_engines": []
                    })
                    .to_string(),
                ),
                Kind::Brave if url.path() != "/res/v1/web/search" => (404, "{}".to_string()),
                Kind::Brave if req.header("x-subscription-token").as_deref() != key => (
                    401,
                    serde_json::json!({"type": "ErrorResponse", "error": {"id": "x", "status": 401,
                        "code": "SUBSCRIPTION_TOKEN_INVALID", "detail": "The provided subscription token is invalid."}, "time": 0})
                    .to_string(),
                ),
                Kind::Brave => {
                    let n: usize = req.param("count").and_then(|c| c.parse().ok()).unwrap_or(20);
                    (200, serde_json::json!({
                        "type": "search",
                        "query": {"original": q, "show_strict_warning": false, "is_navigational": false,
                                  "spellcheck_off": true, "country": "us", "bad_results": false,
                                  "should_fallback": false, "postal_code": "", "city": "", "header_country": "",
                                  "more_results_available": true, "state": ""},
                        "mixed": {"type": "mixed", "main": [], "top": [], "side": []},
                        "web": {"type": "search", "family_friendly": true,
                            "results": (1..=n.min(10)).map(|i| serde_json::json!({
                                "title": format!("Result {i} for {q}"),
                                "url": format!("https://result{i}.example/{slug}"),
                                "is_source_local": false, "is_source_both": false,
                                "description": format!("<strong>snippet {i}</strong>. {injection}"),
                                "page_age": "2026-01-01T00:00:00", "profile": {"name": "Example"},
                                "language": "en", "family_friendly": true, "type": "search_result",
                                "subtype": "generic", "is_live": false,
                                "meta_url": {"scheme": "https", "netloc": format!("result{i}.example"),
                                             "hostname": format!("result{i}.example"), "path": format!("› {slug}")}
                            })).collect::<Vec<_>>()}
                    })
                    .to_string())
                }
            };
            let (ok, ctype) = if status == 200 {
                ("OK", "application/json")
            } else {
                ("Error", "application/json")
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status} {ok}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    FakeSearch { port, seen }
}
