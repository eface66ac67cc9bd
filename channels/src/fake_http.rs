//! The scaffolding the fake servers share (feature `fake`): a listener on a free port of
//! 127.0.0.1, the accept loop with one task per connection (HTTP/1.1 on hyper, or a raw TCP
//! stream for the WebSocket fakes), stopped when the fake is dropped; the answer helpers; and
//! the queues of scripted failures, which may close a connection instead of answering.
//!
//! What a platform answers (its error bodies, its status codes, its routes) stays in its fake.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use reqwest::Url;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The body of a fake's answers (whole, chunked or streamed).
pub(crate) type Body = BoxBody<Bytes, Infallible>;
/// One answer.
pub(crate) type Reply = Response<Body>;
/// An answer, or the connection closed without one.
pub(crate) type Answered = Result<Reply, DropConnection>;

/// The connection is to be closed without an answer.
#[derive(Debug)]
pub(crate) struct DropConnection;

impl fmt::Display for DropConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("scripted connection drop")
    }
}

impl std::error::Error for DropConnection {}

/// The fake's state, even if a handler panicked while holding it.
pub(crate) fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---- Listening ----

/// A listener on a free port of 127.0.0.1, before it serves.
pub(crate) struct Listener {
    listener: TcpListener,
    /// Its address.
    pub(crate) addr: SocketAddr,
    /// `http://<address><path>`: the root a client is configured with.
    pub(crate) url: Url,
}

/// Binds a free port of 127.0.0.1; `path` completes the [`Listener::url`].
pub(crate) async fn bind(path: &str) -> std::io::Result<Listener> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = Url::parse(&format!("http://{addr}{path}"))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(Listener {
        listener,
        addr,
        url,
    })
}

impl Listener {
    /// Serves HTTP/1.1 on every connection, each in its own task: every request is answered
    /// by `handle(state, changes, request)` (an [`Answered::Err`] closes the connection
    /// without an answer).
    pub(crate) fn serve<S, H, F>(self, state: S, handle: H) -> Server<S>
    where
        S: Send + 'static,
        H: Fn(Arc<Mutex<S>>, watch::Sender<u64>, Request<Incoming>) -> F
            + Clone
            + Send
            + Sync
            + 'static,
        F: Future<Output = Answered> + Send + 'static,
    {
        let state = Arc::new(Mutex::new(state));
        let (changes, _) = watch::channel(0u64);
        let mut server = Server {
            addr: self.addr,
            url: self.url.clone(),
            state,
            changes,
            tasks: Vec::new(),
        };
        server.accept(self, move |state, changes, sock| {
            let handle = handle.clone();
            async move {
                let svc = service_fn(move |req| handle(Arc::clone(&state), changes.clone(), req));
                // An error here is a dropped connection (scripted or the client's).
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            }
        });
        server
    }
}

/// A running fake server: its address and URL, its state (behind a mutex) and a counter of
/// changes to wait on. Its accept loops stop when it is dropped.
pub(crate) struct Server<S> {
    addr: SocketAddr,
    url: Url,
    state: Arc<Mutex<S>>,
    changes: watch::Sender<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl<S> Drop for Server<S> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<S: Send + 'static> Server<S> {
    /// Also hands every connection `listener` accepts to `serve(state, changes, stream)`, each
    /// in its own task (a WebSocket endpoint).
    pub(crate) fn accept<V, F>(&mut self, listener: Listener, serve: V)
    where
        V: Fn(Arc<Mutex<S>>, watch::Sender<u64>, TcpStream) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let (state, changes) = (Arc::clone(&self.state), self.changes.clone());
        self.tasks.push(tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(Arc::clone(&state), changes.clone(), sock));
            }
        }));
    }
}

impl<S> Server<S> {
    /// The address of the first listener.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The first listener's URL (see [`Listener::url`]).
    pub(crate) fn url(&self) -> Url {
        self.url.clone()
    }

    /// The state, even if a handler panicked while holding it.
    pub(crate) fn lock(&self) -> MutexGuard<'_, S> {
        lock(&self.state)
    }

    /// The counter of changes (a waiter subscribes to it).
    pub(crate) fn changes(&self) -> &watch::Sender<u64> {
        &self.changes
    }

    /// Counts a change: wakes whoever waits for one.
    pub(crate) fn notify(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// `Debug` output for the fake `name`: its address only.
    pub(crate) fn debug(&self, name: &str, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

// ---- Requests ----

/// The whole body of a request; a failure to read it closes the connection.
pub(crate) async fn body(req: Request<Incoming>) -> Result<Bytes, DropConnection> {
    match req.into_body().collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(_) => Err(DropConnection),
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(String::from)
}

// ---- Answers ----

/// The status `code`, or `fallback` when it is not one.
pub(crate) fn status(code: u16, fallback: StatusCode) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(fallback)
}

/// A body of these bytes (its length announced).
pub(crate) fn whole(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// An answer with this status, content type and body.
pub(crate) fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut resp = empty(status);
    *resp.body_mut() = whole(body);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(CONTENT_TYPE, v);
    }
    resp
}

/// A JSON answer (`application/json`).
pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Reply {
    respond(status, "application/json", body.to_string())
}

/// An answer without a body or a content type.
pub(crate) fn empty(status: StatusCode) -> Reply {
    let mut resp = Response::new(whole(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Sets the header `name` (lower case) to `value`, if it is a header value.
pub(crate) fn set_header(resp: &mut Reply, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

// ---- Scripted failures ----

/// What the next calls of each kind (a method, an endpoint) do instead of succeeding, in order.
pub(crate) struct Script<K, F>(HashMap<K, VecDeque<F>>);

impl<K, F> Default for Script<K, F> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<K: Eq + Hash, F: Clone> Script<K, F> {
    /// The next `times` calls of `key` do `what` (after the ones scripted before).
    pub(crate) fn push(&mut self, key: K, times: usize, what: F) {
        self.0
            .entry(key)
            .or_default()
            .extend(std::iter::repeat_n(what, times));
    }

    /// What this call of `key` does, if something was scripted.
    pub(crate) fn next<Q>(&mut self, key: &Q) -> Option<F>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.0.get_mut(key).and_then(VecDeque::pop_front)
    }
}

/// A scripted failure that may close the connection instead of answering.
pub(crate) trait Failing {
    /// [`Dropping`] when the failure closes the connection, `None` when it is an answer.
    fn dropping(&self) -> Option<Dropping>;
}

/// Implements [`Failing`] for a fake's `Failure` enum whose variants `Drop` (closed before the
/// request is handled) and `DropAfterHandling` (closed after) close the connection; every other
/// variant is an answer.
macro_rules! failing_by_drop_variants {
    ($failure:ty) => {
        impl $crate::fake_http::Failing for $failure {
            fn dropping(&self) -> Option<$crate::fake_http::Dropping> {
                match self {
                    Self::Drop => Some($crate::fake_http::Dropping::Before),
                    Self::DropAfterHandling => Some($crate::fake_http::Dropping::AfterHandling),
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use failing_by_drop_variants;

/// How a scripted failure closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropping {
    /// After the request was read, before it is handled.
    Before,
    /// After it was handled (a message is delivered): the sender cannot know it was.
    AfterHandling,
}

/// The answer to a request `failure` was scripted for (if any): the connection closed before
/// or after `handle` runs, or the failure's answer (`fail`), or else `handle`'s.
pub(crate) async fn scripted<F, Fut>(
    failure: Option<F>,
    fail: impl FnOnce(&F) -> Reply,
    handle: impl FnOnce() -> Fut,
) -> Answered
where
    F: Failing,
    Fut: Future<Output = Reply>,
{
    let Some(f) = failure else {
        return Ok(handle().await);
    };
    match f.dropping() {
        None => Ok(fail(&f)),
        Some(Dropping::Before) => Err(DropConnection),
        Some(Dropping::AfterHandling) => {
            let _ = handle().await;
            Err(DropConnection)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    enum Failure {
        Answer(u16),
        Drop,
        DropAfterHandling,
    }

    failing_by_drop_variants!(Failure);

    #[test]
    fn scripted_failures_come_in_order_per_key_and_then_run_out() {
        let mut script: Script<String, Failure> = Script::default();
        script.push("send".into(), 2, Failure::Answer(500));
        script.push("send".into(), 1, Failure::Drop);
        assert_eq!(script.next("typing"), None);
        assert_eq!(script.next("send"), Some(Failure::Answer(500)));
        assert_eq!(script.next("send"), Some(Failure::Answer(500)));
        assert_eq!(script.next("send"), Some(Failure::Drop));
        assert_eq!(script.next("send"), None);
    }

    #[tokio::test]
    async fn a_drop_after_handling_runs_the_handler_and_a_drop_before_does_not() {
        let ran = std::cell::Cell::new(0);
        let handle = || async {
            ran.set(ran.get() + 1);
            empty(StatusCode::OK)
        };
        let fail = |f: &Failure| match f {
            Failure::Answer(code) => empty(status(*code, StatusCode::BAD_REQUEST)),
            _ => empty(StatusCode::INTERNAL_SERVER_ERROR),
        };
        let before = scripted(Some(Failure::Drop), fail, handle).await;
        assert!(before.is_err());
        assert_eq!(ran.get(), 0);
        let after = scripted(Some(Failure::DropAfterHandling), fail, handle).await;
        assert!(after.is_err());
        assert_eq!(ran.get(), 1);
        let answered = scripted(Some(Failure::Answer(503)), fail, handle).await;
        assert_eq!(
            answered.map(|r| r.status()).ok(),
            Some(StatusCode::SERVICE_UNAVAILABLE)
        );
        assert_eq!(ran.get(), 1);
        let normal = scripted(None::<Failure>, fail, handle).await;
        assert_eq!(normal.map(|r| r.status()).ok(), Some(StatusCode::OK));
        assert_eq!(ran.get(), 2);
    }
}
