//! Discord's gateway: one WebSocket session (v10, JSON, no compression) run by a background
//! task the adapter owns, which fills the buffer [`Discord::poll`](super::Discord) reads.
//!
//! The cycle (Discord's "Connection Lifecycle"): `GET /gateway/bot` gives the URL (and the
//! session start limit); the socket opens with `?v=10&encoding=json`; Hello (op 10) gives the
//! heartbeat interval; the first Heartbeat (op 1, the last `s` or `null`) goes after
//! `interval × jitter` (jitter in [0, 1)), the next ones every interval; every Heartbeat must
//! be acknowledged (op 11) before the next is due, or the connection is a zombie: it is closed
//! (code 4000, never 1000/1001, which would end the session) and resumed. Identify (op 2,
//! with [`INTENTS`]) starts a session; READY gives `session_id`, `resume_gateway_url` and
//! the bot's user. After any loss (a dropped socket, Reconnect op 7, a zombie, a resumable
//! close code) the task reconnects to `resume_gateway_url` and sends Resume (op 6, token,
//! `session_id`, last `seq`): Discord replays the dispatches after `seq`, then RESUMED.
//! Invalid Session (op 9) with `d: true` is resumed; with `d: false` the session is gone:
//! after a random 1–5 s wait the task identifies afresh. Close codes 4004 (token), 4010–4014
//! (shard, version, intents) end the task with an error [`poll`](super::Discord) reports; the
//! next poll starts it again (after the engine's pause), so a fixed setting needs no restart.
//!
//! Connection failures back off exponentially (1 s doubling to 60 s, with jitter); a
//! connection that had been ready is resumed at once (after a backoff when the previous one
//! was lost less than 5 s before). After three failed attempts on
//! `resume_gateway_url` the resume goes to the main gateway URL (Discord allows it); the
//! session is given up only when Discord says so (op 9 or close codes 4007/4009).
//!
//! **Backpressure.** At most [`MAX_BUFFERED`] events wait for a poll. When the buffer fills,
//! the task closes the connection without ending the session and waits until polls have
//! drained half of it, then resumes from the last event it buffered: Discord replays the rest
//! (within the few minutes a session outlives its connection).
//!
//! **Intents.** `GUILDS` (1<<0: `GUILD_CREATE`, channel and thread events: which channels are
//! threads, and the bot's managed role), `GUILD_MESSAGES` (1<<9), `DIRECT_MESSAGES` (1<<12),
//! and, unless turned off, the privileged `MESSAGE_CONTENT` (1<<15: the text of guild
//! messages that do not mention the bot). Without it Discord still sends the text of DMs and
//! of messages that mention or reply to the bot.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, Url};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use zeroize::Zeroizing;

use super::rest::{ApiError, CallError, Rest, Route};
use super::wire::{self, Bot, ChannelInfo, GuildCreate, Item, Payload, Ready, ThreadListSync};
use crate::ChannelError;
use crate::http::{host_ip, is_loopback};

/// `GUILDS`: guild, channel and thread events.
pub const INTENT_GUILDS: u64 = 1 << 0;
/// `GUILD_MESSAGES`: messages in guild channels and threads.
pub const INTENT_GUILD_MESSAGES: u64 = 1 << 9;
/// `DIRECT_MESSAGES`: messages in DMs.
pub const INTENT_DIRECT_MESSAGES: u64 = 1 << 12;
/// `MESSAGE_CONTENT` (privileged: enable it on the bot's page of the Developer Portal).
pub const INTENT_MESSAGE_CONTENT: u64 = 1 << 15;
/// The intents identified with (37377), `MESSAGE_CONTENT` included.
pub const INTENTS: u64 =
    INTENT_GUILDS | INTENT_GUILD_MESSAGES | INTENT_DIRECT_MESSAGES | INTENT_MESSAGE_CONTENT;

/// Events buffered for polls before the task pauses the connection.
pub const MAX_BUFFERED: usize = 5000;
/// Channels remembered as thread or not (cleared when full: it is only a cache).
const MAX_CHANNELS: usize = 100_000;
/// Interactions remembered as deferred (their tokens live 15 minutes).
const DEFERRED_TTL: Duration = Duration::from_secs(15 * 60);
const MAX_DEFERRED: usize = 10_000;
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A session lost again within this long of the previous loss is resumed after a backoff.
const QUICK_LOSS: Duration = Duration::from_secs(5);
/// Failed attempts on `resume_gateway_url` before resuming on the main gateway URL.
const RESUME_URL_ATTEMPTS: u32 = 3;
/// Largest gateway message read (a big guild's `GUILD_CREATE` is a few MiB).
const MAX_WS_MESSAGE: usize = 32 * 1024 * 1024;
/// Interaction callback type `DEFERRED_UPDATE_MESSAGE`.
const DEFERRED_UPDATE: u64 = 6;

/// A gateway session that can be resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SessionInfo {
    pub id: String,
    pub resume_url: String,
}

#[derive(Debug, Clone)]
pub(super) struct Session {
    pub info: Arc<SessionInfo>,
    /// The last `s` received.
    pub seq: u64,
}

/// One buffered event and where it is in its session.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub session: Arc<SessionInfo>,
    pub seq: u64,
    pub item: Item,
}

/// What the task and the polls share.
#[derive(Debug, Default)]
pub(super) struct State {
    pub buffer: VecDeque<Pending>,
    pub session: Option<Session>,
    pub bot: Option<Bot>,
    /// A session is open (READY or RESUMED seen, not lost since).
    pub connected: bool,
    /// Why the last connection attempt failed, while it is not connected.
    pub last_error: Option<String>,
    /// The task ended with this error; the next poll reports it and starts the task again.
    pub fatal: Option<ChannelError>,
    /// Channel id → its parent when it is a thread, `None` when it is not.
    pub channels: HashMap<String, Option<String>>,
    /// The bot's managed role in each guild it is in.
    pub bot_roles: HashSet<String>,
    /// Interactions this adapter acknowledged (deferred) itself, with when.
    pub deferred: HashMap<String, Instant>,
}

impl State {
    pub(super) fn remember_channel(&mut self, id: String, parent: Option<String>) {
        if self.channels.len() >= MAX_CHANNELS {
            self.channels.clear();
        }
        self.channels.insert(id, parent);
    }

    fn remember_deferred(&mut self, id: String) {
        let now = Instant::now();
        if self.deferred.len() >= MAX_DEFERRED {
            self.deferred
                .retain(|_, at| now.duration_since(*at) < DEFERRED_TTL);
        }
        if self.deferred.len() < MAX_DEFERRED {
            self.deferred.insert(id, now);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    /// Polls wait on it: events arrived or the task's state changed.
    pub wake: Notify,
    /// The task waits on it when the buffer is full: a poll drained events.
    pub drained: Notify,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the task needs.
pub(super) struct Ctx {
    pub shared: Arc<Shared>,
    pub rest: Arc<Rest>,
    pub token: Zeroizing<String>,
    pub intents: u64,
    pub tls: Arc<ClientConfig>,
}

/// How one connection ended.
enum End {
    /// Reconnect and resume (dropped socket, op 7, zombie, resumable close code).
    Reconnect { was_ready: bool, why: String },
    /// Invalid Session (op 9) or a close code that ends the session.
    Invalid { resumable: bool },
    /// The connection could not be opened or set up.
    Failed(String),
    /// Wait before trying again (the session start limit is spent).
    Wait(Duration, String),
    /// The buffer is full: resume once polls drained it.
    Full,
    /// The task stops: the credentials or settings cannot work.
    Fatal(ChannelError),
}

/// Runs the gateway session until a fatal error (or until the adapter is dropped, which
/// aborts the task: the socket is dropped without a close frame, so the session can still be
/// resumed by the next process with the cursor).
pub(super) async fn run(ctx: Ctx) {
    let mut failures: u32 = 0;
    let mut delay = Duration::ZERO;
    let mut last_loss: Option<Instant> = None;
    loop {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let end = connect_once(&ctx, failures).await;
        if matches!(end, End::Full) {
            ctx.shared.lock().connected = false;
            wait_drained(&ctx.shared).await;
            failures = 0;
            delay = Duration::ZERO;
            continue;
        }
        let stop = {
            let mut st = ctx.shared.lock();
            st.connected = false;
            match end {
                End::Fatal(e) => {
                    st.fatal = Some(e);
                    st.last_error = None;
                    true
                }
                // A session that was open is resumed at once, unless the previous one was
                // lost moments ago too (no tight loop against a gateway that drops us).
                End::Reconnect {
                    was_ready: true, ..
                } if last_loss.is_none_or(|t| t.elapsed() >= QUICK_LOSS) => {
                    last_loss = Some(Instant::now());
                    failures = 0;
                    delay = Duration::ZERO;
                    false
                }
                End::Reconnect { why, .. } | End::Failed(why) => {
                    last_loss = Some(Instant::now());
                    st.last_error = Some(why);
                    failures = failures.saturating_add(1);
                    delay = backoff(failures);
                    false
                }
                End::Full => false,
                End::Invalid { resumable } => {
                    if !resumable {
                        st.session = None;
                    }
                    failures = 0;
                    // Discord: wait a random 1-5 s before identifying again.
                    delay = Duration::from_millis(1000 + (random_fraction() * 4000.0) as u64);
                    false
                }
                End::Wait(d, why) => {
                    st.last_error = Some(why);
                    delay = d;
                    false
                }
            }
        };
        ctx.shared.wake.notify_waiters();
        if stop {
            return;
        }
    }
}

/// Waits until polls have taken at least half of a full buffer.
async fn wait_drained(shared: &Shared) {
    loop {
        let drained = shared.drained.notified();
        tokio::pin!(drained);
        drained.as_mut().enable();
        if shared.lock().buffer.len() <= MAX_BUFFERED / 2 {
            return;
        }
        drained.await;
    }
}

fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(MAX_BACKOFF);
    base.mul_f64(0.5 + random_fraction() / 2.0)
}

/// A number in [0, 1) for jitter (not for anything secret).
pub(super) fn random_fraction() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The Get Gateway Bot answer (only the fields used).
#[derive(Deserialize)]
struct GatewayBot {
    url: String,
    session_start_limit: Option<StartLimit>,
}

#[derive(Deserialize)]
struct StartLimit {
    remaining: u64,
    reset_after: u64,
}

impl Ctx {
    /// The main gateway URL, from `GET /gateway/bot`; when identifying, also checks that the
    /// session start limit is not spent.
    async fn gateway_url(&self, identifying: bool) -> Result<Url, End> {
        let route = Route {
            method: Method::GET,
            path: "/gateway/bot".into(),
            key: "GET /gateway/bot",
            major: String::new(),
            auth: true,
            global: true,
            secret: None,
        };
        let answer = match self.rest.call(&route, None).await {
            Ok(v) => v,
            Err(CallError::Api(ApiError::Status {
                status: 401 | 403,
                message,
                ..
            })) => return Err(End::Fatal(ChannelError::Unauthorized(message))),
            Err(CallError::Api(ApiError::RateLimited { retry_after })) => {
                return Err(End::Wait(
                    retry_after,
                    "GET /gateway/bot: rate limited".into(),
                ));
            }
            Err(CallError::Network { message, .. } | CallError::BadAnswer(message)) => {
                return Err(End::Failed(message));
            }
            Err(CallError::Api(ApiError::Status { message, .. })) => {
                return Err(End::Failed(message));
            }
        };
        let gw = GatewayBot::deserialize(&answer)
            .map_err(|_| End::Failed("GET /gateway/bot: the answer has no `url`".into()))?;
        if identifying
            && let Some(limit) = gw.session_start_limit
            && limit.remaining == 0
        {
            return Err(End::Wait(
                Duration::from_millis(limit.reset_after.max(1000)),
                format!(
                    "the bot's daily session start limit is spent; the gateway identifies again \
                     in {} s",
                    limit.reset_after / 1000
                ),
            ));
        }
        gateway_ws_url(&gw.url).map_err(End::Failed)
    }

    fn identify(&self) -> Zeroizing<String> {
        // Built by hand so the token is only ever in zeroized buffers here (it is checked to
        // be URL-safe text, so it needs no JSON escaping).
        Zeroizing::new(format!(
            r#"{{"op":2,"d":{{"token":"{}","intents":{},"properties":{{"os":"{}","browser":"chitin","device":"chitin"}}}}}}"#,
            self.token.as_str(),
            self.intents,
            std::env::consts::OS,
        ))
    }

    fn resume(&self, session_id: &str, seq: u64) -> Zeroizing<String> {
        let session_id = Value::from(session_id).to_string();
        Zeroizing::new(format!(
            r#"{{"op":6,"d":{{"token":"{}","session_id":{session_id},"seq":{seq}}}}}"#,
            self.token.as_str(),
        ))
    }

    /// Handles one dispatch (op 0): the session, the caches, the buffer. Returns true when
    /// the connection is ready (READY or RESUMED) and whether the buffer is now full.
    fn dispatch(&self, p: Payload, url: &Url) -> (bool, bool) {
        let t = p.t.unwrap_or_default();
        let mut st = self.shared.lock();
        let mut ready = false;
        if t == "READY" {
            let Ok(r) = Ready::deserialize(&p.d) else {
                return (false, false);
            };
            // A resume URL that is not a gateway URL this adapter accepts: resume on the one
            // this connection used.
            let resume_url = r
                .resume_gateway_url
                .as_deref()
                .and_then(|u| gateway_ws_url(u).ok())
                .unwrap_or_else(|| url.clone());
            st.session = Some(Session {
                info: Arc::new(SessionInfo {
                    id: r.session_id,
                    resume_url: resume_url.to_string(),
                }),
                seq: p.s.unwrap_or(0),
            });
            st.bot = Some(Bot {
                id: r.user.id,
                username: r.user.username,
            });
            ready = true;
        } else if let (Some(s), Some(session)) = (p.s, st.session.as_mut()) {
            session.seq = s;
        }
        if t == "RESUMED" {
            ready = true;
        }
        if ready {
            st.connected = true;
            st.last_error = None;
        }
        let mut new = None;
        match t.as_str() {
            "GUILD_CREATE" => {
                if let Ok(g) = GuildCreate::deserialize(&p.d) {
                    for c in g.channels.iter().chain(&g.threads) {
                        let parent = c.thread_parent();
                        st.remember_channel(c.id.clone(), parent);
                    }
                    let bot_id = st.bot.as_ref().map(|b| b.id.clone());
                    for role in g.roles {
                        let ours = role
                            .tags
                            .and_then(|t| t.bot_id)
                            .is_some_and(|b| Some(b) == bot_id);
                        if ours {
                            st.bot_roles.insert(role.id);
                        }
                    }
                }
            }
            "CHANNEL_CREATE" | "CHANNEL_UPDATE" | "THREAD_CREATE" | "THREAD_UPDATE" => {
                if let Ok(c) = ChannelInfo::deserialize(&p.d) {
                    let parent = c.thread_parent();
                    st.remember_channel(c.id, parent);
                }
            }
            "THREAD_LIST_SYNC" => {
                if let Ok(sync) = ThreadListSync::deserialize(&p.d) {
                    for c in sync.threads {
                        let parent = c.thread_parent();
                        st.remember_channel(c.id, parent);
                    }
                }
            }
            "MESSAGE_CREATE" | "MESSAGE_UPDATE" => {
                new =
                    wire::message_item(&p.d, t == "MESSAGE_UPDATE", st.bot.as_ref(), &st.bot_roles);
            }
            "INTERACTION_CREATE" => {
                if let Some(press) = wire::interaction_item(&p.d) {
                    if let Some(Some(parent)) = &press.item.parent {
                        st.remember_channel(press.item.channel_id.clone(), Some(parent.clone()));
                    }
                    tokio::spawn(defer(
                        Arc::clone(&self.rest),
                        Arc::clone(&self.shared),
                        press.interaction_id,
                        Zeroizing::new(press.token),
                    ));
                    new = Some(press.item);
                }
            }
            _ => {}
        }
        let mut full = false;
        if let (Some(item), Some(s), Some(session)) = (new, p.s, st.session.as_ref()) {
            let session = Arc::clone(&session.info);
            st.buffer.push_back(Pending {
                session,
                seq: s,
                item,
            });
            full = st.buffer.len() >= MAX_BUFFERED;
            drop(st);
            self.shared.wake.notify_waiters();
        }
        (ready, full)
    }
}

/// Acknowledges a button press at once (`DEFERRED_UPDATE_MESSAGE`: no loading state, the
/// message unchanged), so Discord's 3-second deadline does not depend on how fast the engine
/// commits and decides it; [`Platform::answer_button`](crate::Platform::answer_button) then
/// answers with an ephemeral followup. A failure is not an error: `answer_button` answers
/// the interaction itself then.
async fn defer(rest: Arc<Rest>, shared: Arc<Shared>, id: String, token: Zeroizing<String>) {
    let route = Route {
        method: Method::POST,
        path: format!("/interactions/{id}/{}/callback", token.as_str()),
        key: "POST /interactions/{}/{}/callback",
        major: id.clone(),
        auth: false,
        global: false,
        secret: Some(token),
    };
    let body = serde_json::json!({ "type": DEFERRED_UPDATE });
    if rest.call(&route, Some(&body)).await.is_ok() {
        shared.lock().remember_deferred(id);
    }
}

/// One connection: open, Hello, Identify or Resume, then events and heartbeats until it ends.
async fn connect_once(ctx: &Ctx, failures: u32) -> End {
    let resume = ctx
        .shared
        .lock()
        .session
        .as_ref()
        .map(|s| (Arc::clone(&s.info), s.seq));
    let url = match &resume {
        Some((info, _)) if failures < RESUME_URL_ATTEMPTS => match gateway_ws_url(&info.resume_url)
        {
            Ok(u) => u,
            Err(_) => match ctx.gateway_url(false).await {
                Ok(u) => u,
                Err(end) => return end,
            },
        },
        Some(_) => match ctx.gateway_url(false).await {
            Ok(u) => u,
            Err(end) => return end,
        },
        None => match ctx.gateway_url(true).await {
            Ok(u) => u,
            Err(end) => return end,
        },
    };
    let mut ws = match tokio::time::timeout(OPEN_TIMEOUT, open(&url, &ctx.tls)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return End::Failed(e),
        Err(_) => return End::Failed("the gateway did not answer the connection in time".into()),
    };
    let interval = match tokio::time::timeout(HELLO_TIMEOUT, hello(&mut ws)).await {
        Ok(Ok(i)) => i,
        Ok(Err(end)) => return end,
        Err(_) => {
            close(&mut ws).await;
            return End::Failed("the gateway sent no Hello in time".into());
        }
    };
    let first = match &resume {
        Some((info, seq)) => ctx.resume(&info.id, *seq),
        None => ctx.identify(),
    };
    if let Err(e) = ws.send(WsMessage::text(first.as_str())).await {
        return End::Failed(format!(
            "gateway: sending {}: {e}",
            if resume.is_some() {
                "Resume"
            } else {
                "Identify"
            }
        ));
    }
    drop(first);
    let mut ready = false;
    let mut acked = true;
    let mut next_beat = Instant::now() + interval.mul_f64(random_fraction());
    loop {
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    None => return lost(ready, "the gateway closed the connection".into()),
                    Some(Err(e)) => return lost(ready, format!("gateway connection: {e}")),
                    Some(Ok(WsMessage::Text(t))) => t,
                    Some(Ok(WsMessage::Close(frame))) => return closed(frame, ready),
                    Some(Ok(WsMessage::Binary(_))) => {
                        close(&mut ws).await;
                        return End::Failed(
                            "the gateway sent a binary frame (this adapter asks for JSON)".into(),
                        );
                    }
                    Some(Ok(_)) => continue,
                };
                let Ok(p) = serde_json::from_str::<Payload>(&text) else {
                    continue;
                };
                match p.op {
                    0 => {
                        let (now_ready, full) = ctx.dispatch(p, &url);
                        ready |= now_ready;
                        if full {
                            close(&mut ws).await;
                            return End::Full;
                        }
                    }
                    // Discord asks for a heartbeat now.
                    1 => {
                        if let Err(e) = heartbeat(ctx, &mut ws).await {
                            return lost(ready, e);
                        }
                    }
                    7 => {
                        close(&mut ws).await;
                        return End::Reconnect { was_ready: ready, why: "the gateway asked to reconnect".into() };
                    }
                    9 => {
                        close(&mut ws).await;
                        return End::Invalid { resumable: p.d.as_bool().unwrap_or(false) };
                    }
                    11 => acked = true,
                    _ => {}
                }
            }
            () = tokio::time::sleep_until(next_beat) => {
                if !acked {
                    // A zombie connection: no ACK since the last heartbeat.
                    close(&mut ws).await;
                    return End::Reconnect {
                        was_ready: ready,
                        why: "the gateway did not acknowledge a heartbeat".into(),
                    };
                }
                if let Err(e) = heartbeat(ctx, &mut ws).await {
                    return lost(ready, e);
                }
                acked = false;
                next_beat = Instant::now() + interval;
            }
        }
    }
}

type Ws = WebSocketStream<Boxed>;

async fn heartbeat(ctx: &Ctx, ws: &mut Ws) -> Result<(), String> {
    let seq = ctx.shared.lock().session.as_ref().map(|s| s.seq);
    let d = seq.map_or_else(|| "null".to_owned(), |s| s.to_string());
    ws.send(WsMessage::text(format!(r#"{{"op":1,"d":{d}}}"#)))
        .await
        .map_err(|e| format!("gateway: sending a heartbeat: {e}"))
}

/// Reads Hello (op 10) and its interval.
async fn hello(ws: &mut Ws) -> Result<Duration, End> {
    loop {
        match ws.next().await {
            None => return Err(End::Failed("the gateway closed before Hello".into())),
            Some(Err(e)) => return Err(End::Failed(format!("gateway connection: {e}"))),
            Some(Ok(WsMessage::Close(frame))) => return Err(closed(frame, false)),
            Some(Ok(WsMessage::Text(t))) => {
                let p: Payload = serde_json::from_str(&t)
                    .map_err(|_| End::Failed("the gateway's Hello is not JSON".into()))?;
                if p.op != 10 {
                    continue;
                }
                let ms =
                    p.d.get("heartbeat_interval")
                        .and_then(Value::as_u64)
                        .filter(|ms| (1..=600_000).contains(ms))
                        .ok_or_else(|| End::Failed("Hello without a heartbeat_interval".into()))?;
                return Ok(Duration::from_millis(ms));
            }
            Some(Ok(_)) => {}
        }
    }
}

fn lost(was_ready: bool, why: String) -> End {
    End::Reconnect { was_ready, why }
}

/// What a close frame from Discord means.
fn closed(frame: Option<CloseFrame>, was_ready: bool) -> End {
    let Some(frame) = frame else {
        return lost(was_ready, "the gateway closed the connection".into());
    };
    let code = u16::from(frame.code);
    let reason = frame.reason.to_string();
    let refused = |what: &str| {
        End::Fatal(ChannelError::Unauthorized(format!(
            "the gateway closed the connection with {code} ({what})"
        )))
    };
    match code {
        4004 => refused("authentication failed: the bot token is wrong or was reset"),
        4014 => refused(
            "disallowed intents: enable the Message Content intent on the bot's page of the \
             Discord Developer Portal, or turn `message_content` off",
        ),
        4010..=4013 => End::Fatal(ChannelError::Protocol(format!(
            "the gateway closed the connection with {code} ({reason}): sharding, API version \
             or intents this adapter cannot change"
        ))),
        4003 | 4007 | 4009 => End::Invalid { resumable: false },
        _ => lost(
            was_ready,
            format!("the gateway closed the connection with {code} ({reason})"),
        ),
    }
}

/// Closes without ending the session (code 4000; 1000 and 1001 would end it), briefly.
async fn close(ws: &mut Ws) {
    let frame = CloseFrame {
        code: 4000.into(),
        reason: "reconnecting".into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(Some(frame))).await;
}

/// A gateway URL this adapter connects to: `wss://` on Discord's gateway domain
/// (`discord.gg` and its subdomains: the bot token is sent there, and only there), or `ws://`
/// on a loopback address (tests), without credentials, with `v=10&encoding=json` as its query.
pub(super) fn gateway_ws_url(url: &str) -> Result<Url, String> {
    let mut u = Url::parse(url).map_err(|_| "the gateway URL is not a URL".to_owned())?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err("the gateway URL has credentials".into());
    }
    let discord = u.host_str().is_some_and(|h| {
        let h = h.trim_end_matches('.').to_ascii_lowercase();
        h == "discord.gg" || h.ends_with(".discord.gg")
    });
    match u.scheme() {
        "wss" if discord || is_loopback(&u) => {}
        "wss" => {
            return Err(format!(
                "the gateway URL {} is not on discord.gg: the bot token is sent only to Discord's gateway",
                u.host_str().unwrap_or_default()
            ));
        }
        "ws" if is_loopback(&u) => {}
        _ => {
            return Err(format!(
                "the gateway URL {} is not wss:// (plain ws:// only on loopback)",
                u.as_str()
            ));
        }
    }
    if u.host_str().is_none() {
        return Err("the gateway URL has no host".into());
    }
    u.set_query(Some("v=10&encoding=json"));
    u.set_fragment(None);
    Ok(u)
}

/// A byte stream the WebSocket runs over (TCP, or TLS over TCP).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Keeps `dyn Io` usable where tungstenite wants a sized stream.
struct Boxed(Box<dyn Io>);

impl AsyncRead for Boxed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Boxed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

/// Opens the WebSocket: TCP (no proxy), TLS for `wss` (rustls, the platform's roots), then
/// the client handshake.
async fn open(url: &Url, tls: &Arc<ClientConfig>) -> Result<Ws, String> {
    let host = url.host_str().ok_or("the gateway URL has no host")?;
    let port = url
        .port_or_known_default()
        .ok_or("the gateway URL has no port")?;
    let (connect_host, server_name): (String, ServerName<'static>) = match host_ip(host) {
        Some(ip) => (ip.to_string(), ServerName::IpAddress(ip.into())),
        None => (
            host.to_owned(),
            ServerName::try_from(host.to_owned())
                .map_err(|_| format!("bad gateway host {host:?}"))?,
        ),
    };
    let tcp = TcpStream::connect((connect_host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to the gateway {}: {e}", host_label(url)))?;
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn Io> = if url.scheme() == "wss" {
        let tls = TlsConnector::from(Arc::clone(tls))
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with the gateway {}: {e}", host_label(url)))?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), Boxed(stream), Some(config))
            .await
            .map_err(|e| format!("the gateway {} refused the WebSocket: {e}", host_label(url)))?;
    Ok(ws)
}

/// The gateway's host and port, for error texts (a gateway URL carries no secret).
fn host_label(url: &Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::gateway_ws_url;

    #[test]
    fn the_token_goes_only_to_discords_gateway_domain_or_loopback() {
        for ok in [
            "wss://gateway.discord.gg",
            "wss://gateway-us-east1-b.discord.gg/",
            "ws://127.0.0.1:4000/gw",
            "wss://[::1]:9/",
        ] {
            let u = gateway_ws_url(ok).unwrap();
            assert_eq!(u.query(), Some("v=10&encoding=json"), "{ok}");
        }
        for bad in [
            "wss://evil.example/",
            "wss://discord.gg.evil.example/",
            "wss://notdiscord.gg/",
            "ws://gateway.discord.gg/",
            "wss://user:pw@gateway.discord.gg/",
            "https://gateway.discord.gg/",
        ] {
            assert!(gateway_ws_url(bad).is_err(), "{bad}");
        }
    }
}
