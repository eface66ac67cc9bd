//! The agent across replicas (issue #18): the leases a run holds, and the relay of run events
//! between replicas.
//!
//! - A run holds `run:<id>` from its submission (or adoption) to its end: a replica adopts an
//!   unfinished run only by taking that lease, so a run has one driver; when the replica
//!   driving it dies, the lease expires and another takes it over and resumes the run the
//!   way a restart does (a call that was running is reported `interrupted`, never re-run).
//! - While it executes, a run also holds `session:<key>`: two replicas never run one session
//!   at once (the in-process serial lane still orders the runs of one replica).
//! - Both are renewed every third of their time to live; a run whose lease is lost (taken
//!   over after this replica stalled) stops at once, writing nothing more. On PostgreSQL its
//!   transcript and status writes also hold the leases in their own transaction
//!   (`transcripts::Fence`), so a write between the take-over and the next renewal check is
//!   refused and ends the run there.
//! - Run events are published on the database channel [`EVENTS_CHANNEL`] and replayed into
//!   the local event stream of every other replica, so a WebSocket on replica A sees the
//!   deltas, tool events and approval requests of a run on replica B.
//!
//! Lease time is wall-clock time (`SystemClock`) unless a test gives a clock: it measures
//! whether processes are alive, not the agent's (possibly simulated) time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitin_store::Lease;
use serde_json::{Value, json};

use super::{AgentError, AgentEvent, Inner, blocking};
use crate::clock::{Clock, SystemClock};

/// How long a run's leases last without renewal: a dead replica's runs are taken over this
/// long after its last renewal.
pub const RUN_LEASE_MS: i64 = 30_000;

/// The database channel of run events.
pub const EVENTS_CHANNEL: &str = "chitin_agent_events";

/// How often a run waiting for its session's lease looks again.
pub(super) const LEASE_POLL: Duration = Duration::from_millis(200);

/// Who holds this agent's leases, for how long, by which clock.
#[derive(Clone)]
pub struct LeaseSettings {
    /// The replica id (`cluster::Replica::id`), or a per-process id outside the gateway.
    pub owner: String,
    pub ttl_ms: i64,
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for LeaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseSettings")
            .field("owner", &self.owner)
            .field("ttl_ms", &self.ttl_ms)
            .finish_non_exhaustive()
    }
}

impl LeaseSettings {
    /// A per-process owner, [`RUN_LEASE_MS`], the system clock.
    pub(super) fn local() -> Self {
        let mut b = [0u8; 6];
        let _ = getrandom::fill(&mut b);
        Self {
            owner: format!(
                "local-{}-{}",
                std::process::id(),
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            ),
            ttl_ms: RUN_LEASE_MS,
            clock: Arc::new(SystemClock),
        }
    }
}

/// The leases a run holds (renewed together).
pub(super) type Held = Arc<Mutex<Vec<Lease>>>;

impl Inner {
    pub(super) fn leases(&self) -> LeaseSettings {
        match self.lease_settings.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Takes the lease `name` for this agent (`None` while someone else holds it).
pub(super) async fn acquire(inner: &Arc<Inner>, name: String) -> Result<Option<Lease>, AgentError> {
    let s = inner.leases();
    let db = inner.p.store.db().clone();
    let take = move || db.lease_acquire(&name, &s.owner, s.clock.now_ms(), s.ttl_ms);
    // Leases kept in this process (SQLite) are a map under a lock: no trip to a blocking
    // thread (two context switches each way) for them.
    let got = if inner.p.store.db().leases_in_process() {
        take()
    } else {
        blocking(take).await?
    };
    got.map_err(|e| AgentError::Task(format!("lease: {e}")))
}

/// Gives the leases back (a run that ended).
pub(super) async fn release(inner: &Arc<Inner>, held: &Held) {
    let leases: Vec<Lease> = held
        .lock()
        .map(|mut v| std::mem::take(&mut *v))
        .unwrap_or_default();
    if leases.is_empty() {
        return;
    }
    let db = inner.p.store.db().clone();
    let give = move || {
        for l in &leases {
            db.lease_release(l)?;
        }
        Ok::<_, chitin_store::Error>(())
    };
    let r = if inner.p.store.db().leases_in_process() {
        Ok(give())
    } else {
        blocking(give).await
    };
    if let Err(e) | Ok(Err(e)) = r
        .map_err(|e| e.to_string())
        .map(|r| r.map_err(|e| e.to_string()))
    {
        tracing::warn!(error = %e, "cannot release a run's leases; they expire on their own");
    }
}

/// Renews `held` every third of the time to live until aborted; sets `lost` and returns
/// when one of them was lost.
pub(super) async fn renew(inner: Arc<Inner>, held: Held, lost: tokio::sync::watch::Sender<bool>) {
    loop {
        let s = inner.leases();
        let every = Duration::from_millis(u64::try_from(s.ttl_ms / 3).unwrap_or(1_000).max(20));
        tokio::time::sleep(every).await;
        let mine: Vec<Lease> = held.lock().map(|v| v.clone()).unwrap_or_default();
        let db = inner.p.store.db().clone();
        let r = blocking(move || {
            let mut out = Vec::new();
            for mut l in mine {
                match db.lease_renew(&mut l, s.clock.now_ms(), s.ttl_ms) {
                    Ok(()) => out.push(Ok(l)),
                    Err(e @ chitin_store::Error::LeaseLost { .. }) => out.push(Err((true, e))),
                    Err(e) => out.push(Err((false, e))),
                }
            }
            out
        })
        .await;
        let Ok(results) = r else { continue };
        for res in results {
            match res {
                Ok(l) => {
                    if let Ok(mut v) = held.lock()
                        && let Some(h) = v
                            .iter_mut()
                            .find(|h| h.name == l.name && h.fence == l.fence)
                    {
                        h.expires_ms = l.expires_ms;
                    }
                }
                Err((true, e)) => {
                    tracing::error!(error = %e, "a run lost its lease; it stops here");
                    let _ = lost.send(true);
                    return;
                }
                // The database is unreachable: try again; a lease that expires meanwhile is
                // reported lost at the next renewal.
                Err((false, e)) => tracing::warn!(error = %e, "cannot renew a run's lease"),
            }
        }
    }
}

/// The event names a replica accepts from another (`AgentEvent::event` is `&'static str`).
const EVENTS: &[&str] = &[
    "run.started",
    "run.waiting",
    "assistant.delta",
    "tool.start",
    "tool.end",
    "approval.requested",
    "approval.resolved",
    "run.finished",
];

/// The notification text of `e` sent by `from`: the event itself, or, when it is longer than
/// a notification may be, its run and name only (`"oversized": true`; the receiver reads a
/// finished run's summary from the database).
pub(super) fn encode(from: &str, e: &AgentEvent) -> String {
    let full = json!({"from": from, "user": e.user, "session": e.session, "event": e.event,
                      "payload": e.payload})
    .to_string();
    if full.len() <= chitin_store::notify::MAX_PAYLOAD {
        return full;
    }
    json!({"from": from, "user": e.user, "session": e.session, "event": e.event,
           "run_id": e.payload.get("run_id"), "oversized": true})
    .to_string()
}

/// What a relayed notification says: `None` for this replica's own events, unknown events
/// and unreadable text.
pub(super) fn decode(me: &str, text: &str) -> Option<(AgentEvent, bool)> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v["from"].as_str()? == me {
        return None;
    }
    let name = v["event"].as_str()?;
    let event = EVENTS.iter().find(|e| **e == name)?;
    let oversized = v["oversized"] == json!(true);
    let payload = if oversized {
        json!({"run_id": v["run_id"], "session": v["session"], "truncated": true})
    } else {
        v["payload"].clone()
    };
    Some((
        AgentEvent {
            user: v["user"].as_str()?.to_string(),
            session: v["session"].as_str()?.to_string(),
            event,
            payload,
        },
        oversized,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn ev(payload: Value) -> AgentEvent {
        AgentEvent {
            user: "alice".into(),
            session: "s1".into(),
            event: "assistant.delta",
            payload,
        }
    }

    #[test]
    fn a_relayed_event_reads_back_on_another_replica_but_not_on_its_own() {
        let e = ev(json!({"run_id": "run_1", "text": "hel"}));
        let t = encode("ra", &e);
        let (back, oversized) = decode("rb", &t).unwrap();
        assert!(!oversized);
        assert_eq!(back.event, "assistant.delta");
        assert_eq!(back.user, "alice");
        assert_eq!(back.payload, e.payload);
        assert!(decode("ra", &t).is_none());
        // Unknown event names and junk are dropped.
        assert!(
            decode(
                "rb",
                r#"{"from":"ra","event":"x.y","user":"a","session":"s"}"#
            )
            .is_none()
        );
        assert!(decode("rb", "not json").is_none());
    }

    #[test]
    fn an_event_too_long_for_a_notification_is_relayed_as_its_run_only() {
        let e = ev(json!({"run_id": "run_1", "text": "x".repeat(10_000)}));
        let t = encode("ra", &e);
        assert!(t.len() <= chitin_store::notify::MAX_PAYLOAD);
        let (back, oversized) = decode("rb", &t).unwrap();
        assert!(oversized);
        assert_eq!(back.payload["run_id"], "run_1");
        assert_eq!(back.payload["truncated"], true);
    }
}
