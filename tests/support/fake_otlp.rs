//! A fake OpenTelemetry collector: an OTLP/HTTP receiver on 127.0.0.1 that accepts
//! `POST /v1/traces` with a protobuf `ExportTraceServiceRequest` (HTTP/1.1, keep-alive,
//! `Content-Length` bodies), decodes it and keeps every span and every raw body.
#![allow(dead_code, reason = "each test uses part of the fake")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// An attribute value as the collector received it.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    Other,
}

impl Attr {
    pub fn str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The OTLP `SpanKind` number (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    pub attributes: BTreeMap<String, Attr>,
    /// The resource's attributes (e.g. `service.name`).
    pub resource: BTreeMap<String, Attr>,
    /// The W3C trace ids of the span's links.
    pub links: Vec<String>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&Attr> {
        self.attributes.get(key)
    }
}

#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    bodies: Vec<Vec<u8>>,
    requests: usize,
    refused: Vec<String>,
    /// The headers of every request (names lower-cased).
    headers: Vec<BTreeMap<String, String>>,
    /// A header every export must carry (name lower-cased, value), else 401.
    required: Option<(String, String)>,
}

pub struct FakeCollector {
    pub port: u16,
    state: Arc<Mutex<Received>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, Attr> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => Attr::Str(s.clone()),
                Some(AnyValue::IntValue(i)) => Attr::Int(*i),
                Some(AnyValue::DoubleValue(d)) => Attr::Double(*d),
                Some(AnyValue::BoolValue(b)) => Attr::Bool(*b),
                _ => Attr::Other,
            };
            (kv.key.clone(), v)
        })
        .collect()
}

impl FakeCollector {
    /// Listens on 127.0.0.1 (a free port) and serves until the test process ends.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// A collector that answers 401 to an export without header `name: value` (as a collector
    /// behind an authenticating proxy does).
    pub fn start_requiring(name: &str, value: &str) -> Self {
        Self::start_with(Some((name.to_ascii_lowercase(), value.to_string())))
    }

    fn start_with(required: Option<(String, String)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(Received {
            required,
            ..Received::default()
        }));
        let st = Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let st = Arc::clone(&st);
                std::thread::spawn(move || serve(conn, &st));
            }
        });
        Self { port, state }
    }

    /// The base URL for `[telemetry] otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.state.lock().unwrap().spans.clone()
    }

    /// Every request body received, raw.
    pub fn bodies(&self) -> Vec<Vec<u8>> {
        self.state.lock().unwrap().bodies.clone()
    }

    /// How many HTTP requests arrived (any path).
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// The headers of every request received (names lower-cased).
    pub fn headers(&self) -> Vec<BTreeMap<String, String>> {
        self.state.lock().unwrap().headers.clone()
    }

    /// Requests that were not a well-formed OTLP/HTTP protobuf export, and why.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    /// Polls until `done` holds for the spans received so far (or panics after `within`).
    pub fn wait_for(&self, within: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + within;
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "the collector did not receive the expected spans; got: {:#?}",
                spans
                    .iter()
                    .map(|s| (&s.name, &s.attributes))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn serve(conn: TcpStream, st: &Mutex<Received>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let Ok(write_half) = conn.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let request_line = line.trim_end().to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let mut g = st.lock().unwrap();
        g.requests += 1;
        g.bodies.push(body.clone());
        g.headers.push(headers.clone());
        let unauthorized = g
            .required
            .as_ref()
            .is_some_and(|(k, v)| headers.get(k) != Some(v));
        let problem = if unauthorized {
            Some("401: the required header is missing or wrong".to_string())
        } else if request_line != "POST /v1/traces HTTP/1.1" {
            Some(format!("unexpected request line {request_line:?}"))
        } else if headers.get("content-type").map(String::as_str) != Some("application/x-protobuf")
        {
            Some(format!(
                "unexpected content-type {:?}",
                headers.get("content-type")
            ))
        } else {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(req) => {
                    for rs in &req.resource_spans {
                        let resource = rs
                            .resource
                            .as_ref()
                            .map(|r| attrs(&r.attributes))
                            .unwrap_or_default();
                        for ss in &rs.scope_spans {
                            for s in &ss.spans {
                                g.spans.push(Span {
                                    name: s.name.clone(),
                                    trace_id: hex(&s.trace_id),
                                    span_id: hex(&s.span_id),
                                    parent_span_id: hex(&s.parent_span_id),
                                    kind: s.kind,
                                    attributes: attrs(&s.attributes),
                                    resource: resource.clone(),
                                    links: s.links.iter().map(|l| hex(&l.trace_id)).collect(),
                                });
                            }
                        }
                    }
                    None
                }
                Err(e) => Some(format!("not an ExportTraceServiceRequest: {e}")),
            }
        };
        let status = if unauthorized {
            g.refused.push(problem.unwrap_or_default());
            "401 Unauthorized"
        } else if let Some(p) = problem {
            g.refused.push(p);
            "400 Bad Request"
        } else {
            "200 OK"
        };
        drop(g);
        // An empty ExportTraceServiceResponse: full success.
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        if out.write_all(head.as_bytes()).is_err() {
            return;
        }
    }
}
