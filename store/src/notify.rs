//! Notifications between replicas: [`Db::notify`] sends a short text on a named channel to
//! every [`Listener`] of that channel on the same database.
//!
//! - PostgreSQL: `pg_notify` / `LISTEN`. Each listener has a dedicated connection (outside the
//!   pool) on the store's runtime. When that connection drops, the listener reconnects (with a
//!   backoff) and, once it listens again, delivers [`Notice::Gap`]: notifications sent during
//!   the gap are lost, so the subscriber re-reads the state it follows from the database.
//! - SQLite (one gateway): an in-process broadcast shared by every handle of the same file.
//!
//! Delivery is at most once and only to listeners present when the notification is sent (a
//! notification sent inside a PostgreSQL transaction is delivered when it commits). A listener
//! that falls more than [`BUFFER`] notifications behind also gets a [`Notice::Gap`]. Use one
//! listener per process and fan the notices out in it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

use crate::{Db, Error, Result, params};

/// Notifications a listener holds before it reports a [`Notice::Gap`].
pub const BUFFER: usize = 1024;

/// The longest payload (PostgreSQL's limit is 8000 bytes; the same on both backends).
pub const MAX_PAYLOAD: usize = 7_999;

/// A notification: its channel and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub channel: String,
    pub payload: String,
}

/// What a listener receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Notification(Notification),
    /// Notifications may have been lost (the connection dropped and was re-established, or
    /// the listener fell behind): re-read the state from the database.
    Gap,
}

/// Channel names: 1 to 63 characters of `a-z`, `0-9`, `_` (a PostgreSQL identifier).
fn check_channel(channel: &str) -> Result<()> {
    let ok = !channel.is_empty()
        && channel.len() <= 63
        && channel
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Notify(format!(
            "channel name `{}` must be 1 to 63 characters of a-z, 0-9 and _",
            channel.chars().take(80).collect::<String>()
        )))
    }
}

type Bus = broadcast::Sender<Notification>;

/// The in-process buses of SQLite databases, by file (held by their listeners).
fn buses() -> &'static Mutex<HashMap<String, Weak<Bus>>> {
    static BUSES: OnceLock<Mutex<HashMap<String, Weak<Bus>>>> = OnceLock::new();
    BUSES.get_or_init(|| Mutex::new(HashMap::new()))
}

fn bus_key(path: &std::path::Path) -> String {
    std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

fn bus(path: &std::path::Path, create: bool) -> Result<Option<Arc<Bus>>> {
    let key = bus_key(path);
    let mut map = buses()
        .lock()
        .map_err(|_| Error::Internal("the notification registry is poisoned".into()))?;
    if let Some(b) = map.get(&key).and_then(Weak::upgrade) {
        return Ok(Some(b));
    }
    if !create {
        return Ok(None);
    }
    map.retain(|_, w| w.strong_count() > 0);
    let b = Arc::new(broadcast::channel(BUFFER).0);
    map.insert(key, Arc::downgrade(&b));
    Ok(Some(b))
}

enum Inner {
    Local {
        rx: broadcast::Receiver<Notification>,
        channels: Vec<String>,
        _bus: Arc<Bus>,
    },
    Postgres {
        rx: mpsc::Receiver<Notice>,
        /// Dropped with the listener: stops its task and closes its connection.
        _stop: oneshot::Sender<()>,
    },
}

/// Receives the notifications of the channels it was created for ([`Db::listen`]).
pub struct Listener {
    inner: Inner,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").finish_non_exhaustive()
    }
}

impl Listener {
    /// The next notice; `None` once the listener stopped for good (its database was dropped).
    pub async fn recv(&mut self) -> Option<Notice> {
        match &mut self.inner {
            Inner::Local { rx, channels, .. } => loop {
                match rx.recv().await {
                    Ok(n) if channels.contains(&n.channel) => {
                        return Some(Notice::Notification(n));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => return Some(Notice::Gap),
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            },
            Inner::Postgres { rx, .. } => rx.recv().await,
        }
    }

    /// The next notice if one is waiting (never blocks).
    pub fn try_recv(&mut self) -> Option<Notice> {
        match &mut self.inner {
            Inner::Local { rx, channels, .. } => loop {
                match rx.try_recv() {
                    Ok(n) if channels.contains(&n.channel) => {
                        return Some(Notice::Notification(n));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::TryRecvError::Lagged(_)) => return Some(Notice::Gap),
                    Err(_) => return None,
                }
            },
            Inner::Postgres { rx, .. } => rx.try_recv().ok(),
        }
    }
}

impl Db {
    /// Sends `payload` (at most [`MAX_PAYLOAD`] bytes) on `channel` to the listeners of every
    /// replica on this database.
    pub fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        check_channel(channel)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Notify(format!(
                "the payload on `{channel}` has {} bytes, more than {MAX_PAYLOAD}: send an id and let the listener read the rest from the database",
                payload.len()
            )));
        }
        match &*self.inner {
            crate::Backend::Sqlite(s) => {
                if let Some(b) = bus(&s.path, false)? {
                    // No receiver: nobody listens, nothing to deliver.
                    let _ = b.send(Notification {
                        channel: channel.to_string(),
                        payload: payload.to_string(),
                    });
                }
                Ok(())
            }
            crate::Backend::Postgres(_) => self
                .with(|c| c.execute("SELECT pg_notify(?1, ?2)", params![channel, payload]))
                .map(|_| ()),
        }
    }

    /// Listens to `channels`. On PostgreSQL this opens a dedicated connection (an error here
    /// means it could not); later drops are reconnected and reported as [`Notice::Gap`].
    pub fn listen(&self, channels: &[&str]) -> Result<Listener> {
        if channels.is_empty() {
            return Err(Error::Notify("listen to at least one channel".into()));
        }
        for c in channels {
            check_channel(c)?;
        }
        let channels: Vec<String> = channels.iter().map(|c| (*c).to_string()).collect();
        match &*self.inner {
            crate::Backend::Sqlite(s) => {
                let b = bus(&s.path, true)?
                    .ok_or_else(|| Error::Internal("no notification bus".into()))?;
                Ok(Listener {
                    inner: Inner::Local {
                        rx: b.subscribe(),
                        channels,
                        _bus: b,
                    },
                })
            }
            crate::Backend::Postgres(p) => {
                let (tx, rx) = mpsc::channel(BUFFER);
                let (stop_tx, stop_rx) = oneshot::channel();
                let (ready_tx, ready_rx) = std::sync::mpsc::channel();
                p.runtime()?.spawn(pg_listen(
                    PgTarget {
                        cfg: (*p.connect_cfg).clone(),
                        tls: p.tls.as_deref().cloned(),
                        location: p.location.clone(),
                    },
                    channels,
                    tx,
                    stop_rx,
                    ready_tx,
                ));
                match ready_rx.recv() {
                    Ok(Ok(())) => Ok(Listener {
                        inner: Inner::Postgres { rx, _stop: stop_tx },
                    }),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(Error::Internal("the listener did not start".into())),
                }
            }
        }
    }
}

struct PgTarget {
    cfg: tokio_postgres::Config,
    tls: Option<rustls::ClientConfig>,
    location: String,
}

/// Drives a listening connection: forwards its notifications until it ends.
fn drive<S, T>(mut conn: tokio_postgres::Connection<S, T>) -> mpsc::UnboundedReceiver<Notification>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                    let sent = tx.send(Notification {
                        channel: n.channel().to_string(),
                        payload: n.payload().to_string(),
                    });
                    if sent.is_err() {
                        break;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
    });
    rx
}

async fn open(
    t: &PgTarget,
    channels: &[String],
) -> Result<(
    tokio_postgres::Client,
    mpsc::UnboundedReceiver<Notification>,
)> {
    let e = |err: tokio_postgres::Error| Error::Connect {
        location: t.location.clone(),
        message: {
            let mut m = err.to_string();
            let mut src = std::error::Error::source(&err);
            while let Some(s) = src {
                m.push_str(&format!(": {s}"));
                src = s.source();
            }
            m
        },
    };
    let (client, notes) = match &t.tls {
        None => {
            let (c, conn) = t.cfg.connect(tokio_postgres::NoTls).await.map_err(e)?;
            (c, drive(conn))
        }
        Some(tls) => {
            let (c, conn) = t
                .cfg
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone()))
                .await
                .map_err(e)?;
            (c, drive(conn))
        }
    };
    let sql: String = channels
        .iter()
        .map(|c| format!("LISTEN {};", crate::quote_ident(c)))
        .collect();
    client
        .batch_execute(&sql)
        .await
        .map_err(|err| Error::pg(&t.location, &err))?;
    Ok((client, notes))
}

/// Sends `n` unless the subscriber is behind; then the next notice it gets is a gap.
fn deliver(tx: &mpsc::Sender<Notice>, behind: &mut bool, n: Notice) -> bool {
    if *behind {
        match tx.try_send(Notice::Gap) {
            Ok(()) => *behind = false,
            Err(mpsc::error::TrySendError::Full(_)) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
        if n == Notice::Gap {
            return true;
        }
    }
    match tx.try_send(n) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            *behind = true;
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

async fn pg_listen(
    target: PgTarget,
    channels: Vec<String>,
    tx: mpsc::Sender<Notice>,
    mut stop: oneshot::Receiver<()>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    let mut behind = false;
    loop {
        let (client, mut notes) = match open(&target, &channels).await {
            Ok(c) => c,
            Err(e) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(Err(e));
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        match ready.take() {
            Some(r) => {
                if r.send(Ok(())).is_err() {
                    return;
                }
            }
            // Listening again: what was sent while disconnected is lost.
            None => {
                if !deliver(&tx, &mut behind, Notice::Gap) {
                    return;
                }
            }
        }
        backoff = Duration::from_millis(50);
        loop {
            tokio::select! {
                n = notes.recv() => match n {
                    Some(n) => {
                        if !deliver(&tx, &mut behind, Notice::Notification(n)) {
                            return;
                        }
                    }
                    // The connection ended: reconnect.
                    None => break,
                },
                _ = &mut stop => return,
            }
        }
        drop(client);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::testing::TestPg;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn next(l: &mut Listener) -> Notice {
        tokio::time::timeout(Duration::from_secs(30), l.recv())
            .await
            .expect("a notice within 30 s")
            .expect("the listener is open")
    }

    fn note(channel: &str, payload: &str) -> Notice {
        Notice::Notification(Notification {
            channel: channel.into(),
            payload: payload.into(),
        })
    }

    #[test]
    fn a_notify_through_one_postgres_handle_reaches_the_listener_of_another() {
        let pg = TestPg::new().unwrap();
        let (a, b) = (pg.db().unwrap(), pg.db().unwrap());
        let mut l = b.listen(&["chitin_events", "chitin_approvals"]).unwrap();
        a.notify("chitin_other", "not for b").unwrap();
        a.notify("chitin_events", "run r1: delta").unwrap();
        a.notify("chitin_approvals", "granted ap1").unwrap();
        rt().block_on(async {
            assert_eq!(next(&mut l).await, note("chitin_events", "run r1: delta"));
            assert_eq!(next(&mut l).await, note("chitin_approvals", "granted ap1"));
        });
        assert_eq!(l.try_recv(), None);
        // Inside a transaction: delivered at commit, not at all on rollback.
        let _ = a.tx(|t| {
            t.execute(
                "SELECT pg_notify('chitin_events', 'rolled back')",
                params![],
            )?;
            Err::<(), _>(Error::NoRow)
        });
        a.tx(|t| t.execute("SELECT pg_notify('chitin_events', 'committed')", params![]))
            .unwrap();
        rt().block_on(async {
            assert_eq!(next(&mut l).await, note("chitin_events", "committed"));
        });
    }

    #[test]
    fn a_postgres_listener_reconnects_reports_the_gap_and_keeps_receiving() {
        let pg = TestPg::new().unwrap();
        let (a, b) = (pg.db().unwrap(), pg.db().unwrap());
        let mut l = b.listen(&["chitin_events"]).unwrap();
        // Kill the listener's connection from the server side.
        let killed: i64 = a
            .with(|c| {
                c.query_row(
                    "SELECT CAST(COUNT(pg_terminate_backend(pid)) AS BIGINT) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()
                       AND query LIKE 'LISTEN%'",
                    params![],
                )?
                .get(0)
            })
            .unwrap();
        assert_eq!(killed, 1);
        rt().block_on(async {
            assert_eq!(next(&mut l).await, Notice::Gap);
        });
        a.notify("chitin_events", "after the gap").unwrap();
        rt().block_on(async {
            assert_eq!(next(&mut l).await, note("chitin_events", "after the gap"));
        });
    }

    #[test]
    fn sqlite_handles_of_one_file_share_notifications_in_process() {
        let dir = tempfile::tempdir().unwrap();
        let a = Db::sqlite(&dir.path().join("state.db")).unwrap();
        let b = Db::sqlite(&dir.path().join("state.db")).unwrap();
        let other = Db::sqlite(&dir.path().join("other.db")).unwrap();
        let mut l = b.listen(&["chitin_events"]).unwrap();
        let mut lo = other.listen(&["chitin_events"]).unwrap();
        a.notify("chitin_approvals", "not listened to").unwrap();
        a.notify("chitin_events", "hello").unwrap();
        rt().block_on(async {
            assert_eq!(next(&mut l).await, note("chitin_events", "hello"));
        });
        assert_eq!(lo.try_recv(), None);
        // A listener that falls behind is told to re-read.
        for i in 0..(BUFFER + 10) {
            a.notify("chitin_events", &i.to_string()).unwrap();
        }
        assert_eq!(l.try_recv(), Some(Notice::Gap));
    }

    #[test]
    fn bad_channel_names_and_oversized_payloads_are_refused_on_both_backends() {
        let dir = tempfile::tempdir().unwrap();
        let pg = TestPg::new().unwrap();
        for db in [
            Db::sqlite(&dir.path().join("state.db")).unwrap(),
            pg.db().unwrap(),
        ] {
            let e = db.notify("Bad-Name", "x").unwrap_err().to_string();
            assert!(e.contains("a-z, 0-9 and _"), "{e}");
            let e = db
                .notify("chitin_events", &"x".repeat(MAX_PAYLOAD + 1))
                .unwrap_err()
                .to_string();
            assert!(e.contains("more than 7999"), "{e}");
            assert!(db.listen(&[]).is_err());
            assert!(db.listen(&["x; DROP TABLE meta"]).is_err());
            db.notify("chitin_events", &"x".repeat(MAX_PAYLOAD))
                .unwrap();
        }
    }
}
