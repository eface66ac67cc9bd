//! Socket Mode: the adapter's WebSocket to Slack, read by [`Platform::poll`](crate::Platform).
//!
//! - **Connection.** `apps.connections.open` with the app-level token answers a single-use
//!   `wss://` URL (a ticket); the adapter connects (TLS from tokio-rustls with the aws-lc-rs
//!   provider and the platform's certificate verifier, as reqwest; plain `ws://` only to a
//!   loopback address, for the fake), waits for `hello`, then reads envelopes. A `disconnect`
//!   envelope (`warning`, `refresh_requested`, `link_disabled`), a closed or failed socket, or
//!   two minutes without any frame (Slack pings far more often; a half-open connection would
//!   otherwise hang forever) drops the connection, and the adapter opens a new one at once
//!   (in the same poll when it has nothing to return yet).
//! - **Acknowledgement after commit.** A poll returns the envelopes it read as events, and as
//!   cursor their `envelope_id`s joined by `,`. Nothing is acknowledged then: the engine
//!   commits the events with the cursor, and the *next* poll, given that cursor, sends
//!   `{"envelope_id": …}` for each before reading on. Slack redelivers an envelope that was not
//!   acknowledged (after its timeout, and on a new connection), with the same payload, so a
//!   redelivery maps to the same event id and the engine drops it. Because the ids live in the
//!   committed cursor, a gateway restarted after a commit still acknowledges them on its first
//!   poll. The adapter remembers the last ids it acknowledged, so the same cursor given again
//!   (a poll that returned nothing leaves the cursor unchanged) is not acknowledged twice,
//!   unless Slack delivers the envelope again (the acknowledgement was lost with a dying
//!   connection): then it is acknowledged again.
//! - **Every envelope is one event**, so every envelope's id reaches the cursor:
//!   `events_api` maps as an Events API request, `interactive` as an interactivity payload,
//!   anything else (`slash_commands`, an `events_api` with nothing to map) is
//!   [`Event::Ignored`] with the event id `s:<envelope_id>`.
//! - **Cancellation.** Envelopes read from the socket are kept in the adapter until a poll
//!   returns them, so a poll dropped halfway (shutdown, a `select!`) loses nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{Slack, SlackMode, Token, channel_error};
use crate::http::{CONNECT_TIMEOUT, is_loopback_host};
use crate::{ChannelError, ConfigError, Event, Inbound, Polled};

/// Largest envelope read (a message event with many files, a big interaction).
const MAX_ENVELOPE: usize = 4 * 1024 * 1024;
/// Most envelopes one poll returns.
const MAX_BATCH: usize = 100;
/// A connection without any frame for this long is considered dead.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// How many envelope ids acknowledged recently are remembered.
const ACKED_MEMORY: usize = 4096;
/// New connections one poll may open before it gives up for now.
const MAX_RECONNECTS_PER_POLL: usize = 3;

/// A byte stream the WebSocket runs on (TLS, or plain TCP to loopback).
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Ws = WebSocketStream<Box<dyn Io>>;

struct Conn {
    ws: Ws,
    last_frame: Instant,
}

/// The Socket Mode connection and what it read, behind the adapter's async mutex.
#[derive(Default)]
pub(super) struct SocketState {
    conn: Option<Conn>,
    /// Envelopes read and not yet returned by a poll: (envelope id, event).
    buffered: Vec<(String, Inbound)>,
    /// Envelope ids acknowledged recently, oldest first.
    acked: VecDeque<String>,
}

/// The TLS client configuration of the WebSocket: aws-lc-rs, the platform verifier.
pub(super) fn tls_config() -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| ConfigError::Invalid(format!("TLS for Socket Mode: {e}")))?
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What one text frame was.
#[expect(
    clippy::large_enum_variant,
    reason = "one frame at a time, moved once into the buffer"
)]
enum Frame {
    Hello,
    Disconnect,
    Envelope(String, Inbound),
    /// Something without an envelope id (nothing to acknowledge).
    Other,
}

/// The envelope ids of a cursor.
fn cursor_ids(cursor: Option<&str>) -> Result<Vec<String>, ChannelError> {
    let Some(c) = cursor.filter(|c| !c.is_empty()) else {
        return Ok(Vec::new());
    };
    c.split(',')
        .map(|id| {
            if valid_envelope_id(id) {
                Ok(id.to_owned())
            } else {
                Err(ChannelError::Protocol(format!(
                    "the cursor {c:?} is not a list of Socket Mode envelope ids"
                )))
            }
        })
        .collect()
}

fn valid_envelope_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Slack {
    /// Opens a connection if there is none (`connect` in Socket Mode).
    pub(super) async fn ensure_socket(&self) -> Result<(), ChannelError> {
        let mut st = self.socket.lock().await;
        if st.conn.is_none() {
            let conn = self.open_socket(&mut st).await?;
            st.conn = Some(conn);
        }
        Ok(())
    }

    /// `apps.connections.open`, the WebSocket handshake, and `hello`.
    async fn open_socket(&self, st: &mut SocketState) -> Result<Conn, ChannelError> {
        let answer = self
            .call("apps.connections.open", Token::App, &json!({}))
            .await
            .map_err(channel_error)?;
        let Some(url) = answer.get("url").and_then(Value::as_str) else {
            return Err(ChannelError::Protocol(
                "apps.connections.open answered without a url".into(),
            ));
        };
        // The URL holds a connection ticket: it stays out of every error text.
        let url = Url::parse(url).map_err(|_| {
            ChannelError::Protocol("apps.connections.open answered a malformed url".into())
        })?;
        let host = url
            .host_str()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match url.scheme() {
            "wss" => true,
            "ws" if is_loopback_host(&host) => false,
            _ => {
                return Err(ChannelError::Protocol(
                    "apps.connections.open answered a url that is neither wss:// nor a \
                     loopback ws:// (not connected)"
                        .into(),
                ));
            }
        };
        let Some(port) = url.port_or_known_default() else {
            return Err(ChannelError::Protocol(
                "apps.connections.open answered a url without a port".into(),
            ));
        };
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            ChannelError::Transient(self.redact(format!("Socket Mode: {what}: {e}")))
        };
        let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|e| failed("connecting", &e))?
            .map_err(|e| failed("connecting", &e))?;
        let stream: Box<dyn Io> = if tls {
            let Some(config) = &self.tls else {
                return Err(ChannelError::Protocol(
                    "Socket Mode without a TLS configuration".into(),
                ));
            };
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
                ChannelError::Protocol("apps.connections.open answered a bad host name".into())
            })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            let tls = timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|e| failed("TLS", &e))?
                .map_err(|e| failed("TLS", &e))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_ENVELOPE))
            .max_frame_size(Some(MAX_ENVELOPE));
        let (mut ws, _) = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(config)),
        )
        .await
        .map_err(|e| failed("WebSocket handshake", &e))?
        .map_err(|e| failed("WebSocket handshake", &e))?;
        // Slack says `hello` first; envelopes before it (none expected) are kept.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        loop {
            let frame = match timeout_at(deadline, ws.next()).await {
                Err(_) => {
                    return Err(ChannelError::Transient(
                        "Socket Mode: no hello within 10 s of connecting".into(),
                    ));
                }
                Ok(None) => {
                    return Err(ChannelError::Transient(
                        "Socket Mode: the connection closed before hello".into(),
                    ));
                }
                Ok(Some(Err(e))) => return Err(failed("before hello", &e)),
                Ok(Some(Ok(frame))) => frame,
            };
            match frame {
                WsMessage::Text(text) => match self.read_frame(text.as_bytes()) {
                    Frame::Hello => break,
                    Frame::Disconnect => {
                        return Err(ChannelError::Transient(
                            "Socket Mode: Slack asked to reconnect before hello".into(),
                        ));
                    }
                    Frame::Envelope(id, event) => {
                        st.acked.retain(|a| *a != id);
                        st.buffered.push((id, event));
                    }
                    Frame::Other => {}
                },
                WsMessage::Close(_) => {
                    return Err(ChannelError::Transient(
                        "Socket Mode: the connection closed before hello".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(Conn {
            ws,
            last_frame: Instant::now(),
        })
    }

    /// Parses one text frame.
    fn read_frame(&self, text: &[u8]) -> Frame {
        let Ok(v) = serde_json::from_slice::<Value>(text) else {
            return Frame::Other;
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "hello" => return Frame::Hello,
            "disconnect" => return Frame::Disconnect,
            _ => {}
        }
        let Some(id) = v
            .get("envelope_id")
            .and_then(Value::as_str)
            .filter(|id| valid_envelope_id(id))
        else {
            return Frame::Other;
        };
        let payload = v.get("payload").unwrap_or(&Value::Null);
        let ignored = |what: String| Inbound {
            event_id: format!("s:{id}"),
            event: Event::Ignored { what },
        };
        let event =
            match kind {
                "events_api" => match self.parse_callback(payload, Some(id)) {
                    Ok(parsed) => parsed.events.into_iter().next().unwrap_or_else(|| {
                        ignored("an events_api envelope without an event".into())
                    }),
                    Err(e) => ignored(format!("an events_api envelope: {e}")),
                },
                "interactive" => {
                    let raw = serde_json::to_vec(payload).unwrap_or_default();
                    self.parse_interaction(payload, &raw, Some(id))
                }
                "slash_commands" => ignored("a slash command".into()),
                other => ignored(format!("a Socket Mode envelope of type {other}")),
            };
        Frame::Envelope(id.to_owned(), event)
    }

    /// Sends `{"envelope_id": …}` for each id not acknowledged yet. A failure drops the
    /// connection (Slack redelivers what was not acknowledged; the engine drops duplicates).
    async fn acknowledge(&self, st: &mut SocketState, ids: &[String]) {
        for id in ids {
            if st.acked.contains(id) {
                continue;
            }
            let Some(conn) = st.conn.as_mut() else {
                return;
            };
            let ack = json!({ "envelope_id": id }).to_string();
            if conn.ws.send(WsMessage::text(ack)).await.is_err() {
                st.conn = None;
                return;
            }
            if st.acked.len() >= ACKED_MEMORY {
                st.acked.pop_front();
            }
            st.acked.push_back(id.clone());
        }
    }

    /// Acknowledges the cursor's envelopes, then waits (up to the poll timeout) for envelopes.
    /// Drops the Socket Mode connection and the envelopes read but not returned (never
    /// acknowledged: Slack delivers them again on another connection).
    pub(super) async fn socket_close(&self) {
        let mut st = self.socket.lock().await;
        st.conn = None;
        st.buffered.clear();
    }

    pub(super) async fn socket_poll(&self, cursor: Option<&str>) -> Result<Polled, ChannelError> {
        if self.mode != SlackMode::Socket {
            return Err(ChannelError::Protocol(
                "this channel is in Events API mode: its events arrive on the webhook".into(),
            ));
        }
        let to_ack = cursor_ids(cursor)?;
        if self.bot_snapshot().is_none() {
            self.auth_test().await?;
        }
        let mut st = self.socket.lock().await;
        let deadline = Instant::now() + self.poll_timeout;
        let mut reconnects = 0;
        let mut acks_pending = !to_ack.is_empty();
        loop {
            if st.conn.is_none() {
                if reconnects >= MAX_RECONNECTS_PER_POLL {
                    if st.buffered.is_empty() {
                        // Slack keeps closing new connections (`link_disabled`, an outage):
                        // an error makes the engine back off instead of polling at once.
                        return Err(ChannelError::Transient(format!(
                            "Socket Mode: the connection closed {reconnects} times in one poll"
                        )));
                    }
                    break;
                }
                reconnects += 1;
                match self.open_socket(&mut st).await {
                    Ok(conn) => st.conn = Some(conn),
                    Err(e) if st.buffered.is_empty() => return Err(e),
                    // Return what was read; the next poll reconnects.
                    Err(_) => break,
                }
            }
            if acks_pending {
                self.acknowledge(&mut st, &to_ack).await;
                if st.conn.is_none() {
                    // The acks did not get through: Slack redelivers; try a new connection.
                    continue;
                }
                acks_pending = false;
            }
            if !st.buffered.is_empty() {
                // Take what is already there without waiting, then return.
                self.drain_ready(&mut st);
                break;
            }
            let Some(conn) = st.conn.as_mut() else {
                continue;
            };
            let idle_deadline = conn.last_frame + IDLE_LIMIT;
            let until = deadline.min(idle_deadline);
            match timeout_at(until, conn.ws.next()).await {
                Err(_) if until == idle_deadline && idle_deadline < deadline => {
                    st.conn = None;
                }
                Err(_) => break,
                Ok(next) => self.take_frame(&mut st, next),
            }
        }
        let events: Vec<(String, Inbound)> = st.buffered.drain(..).collect();
        let cursor = (!events.is_empty()).then(|| {
            events
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        });
        Ok(Polled {
            events: events.into_iter().map(|(_, e)| e).collect(),
            cursor,
        })
    }

    /// Reads the frames already received, without waiting, up to [`MAX_BATCH`] envelopes.
    fn drain_ready(&self, st: &mut SocketState) {
        while st.buffered.len() < MAX_BATCH {
            let Some(conn) = st.conn.as_mut() else {
                return;
            };
            match conn.ws.next().now_or_never() {
                None => return,
                Some(next) => self.take_frame(st, next),
            }
        }
    }

    /// Handles one item of the WebSocket stream.
    fn take_frame(
        &self,
        st: &mut SocketState,
        next: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>,
    ) {
        let frame = match next {
            Some(Ok(frame)) => frame,
            // Closed or failed: drop it; the loop opens a new one.
            None | Some(Err(_)) => {
                st.conn = None;
                return;
            }
        };
        if let Some(conn) = st.conn.as_mut() {
            conn.last_frame = Instant::now();
        }
        match frame {
            WsMessage::Text(text) => match self.read_frame(text.as_bytes()) {
                Frame::Disconnect => st.conn = None,
                Frame::Envelope(id, event) => {
                    // Delivered again: an earlier acknowledgement was lost (written to a
                    // connection that was already dying), so the cursor's must be sent again.
                    st.acked.retain(|a| *a != id);
                    st.buffered.push((id, event));
                }
                Frame::Hello | Frame::Other => {}
            },
            WsMessage::Close(_) => st.conn = None,
            // Pings are answered by tungstenite itself.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    #[test]
    fn a_cursor_is_a_list_of_envelope_ids_and_nothing_else() {
        assert_eq!(cursor_ids(None).unwrap(), Vec::<String>::new());
        assert_eq!(cursor_ids(Some("")).unwrap(), Vec::<String>::new());
        assert_eq!(
            cursor_ids(Some("a-1,b_2")).unwrap(),
            vec!["a-1".to_string(), "b_2".to_string()]
        );
        assert!(cursor_ids(Some("a,,b")).is_err());
        assert!(cursor_ids(Some("a\"}")).is_err());
    }
}
