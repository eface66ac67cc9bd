//! This gateway as one replica of a deployment (issue #18): its registration and heartbeat in
//! the `replicas` table, the id that owns its leases (`chitin_store::lease`), and the list of
//! live replicas with what each holds, shown by `/ready` and `chitin status`.
//!
//! A replica is live while its heartbeat is younger than [`STALE_MS`]; one that stops beating
//! (killed) drops out of the list, and its leases expire on their own for another replica to
//! take over. A clean stop deregisters and releases its leases at once.

use std::sync::Arc;
use std::time::Duration;

use chitin_store::{Db, Replica as Row};
use serde_json::{Value, json};

use crate::clock::Clock;
use crate::store::StoreError;

/// How often a replica records that it is alive.
pub const HEARTBEAT_MS: i64 = 5_000;
/// A replica silent for longer is not listed as live (three missed heartbeats).
pub const STALE_MS: i64 = 3 * HEARTBEAT_MS;
/// Rows of replicas silent for longer are deleted by the others' heartbeats.
pub const PRUNE_MS: i64 = 24 * 3_600_000;

/// The SQL condition "the replica named in column `col` is not live": none is named, or no
/// replica row has a heartbeat newer than the parameter `?{n}` (bind `now - STALE_MS`; on
/// SQLite, where one gateway owns the file, callers that must not judge liveness bind
/// `i64::MAX`, which makes every replica not live). Recovery on PostgreSQL takes over only
/// such work, with this condition in its conditional UPDATE (issue #18).
pub fn not_live_sql(col: &str, n: usize) -> String {
    format!(
        "({col} IS NULL OR {col} NOT IN (SELECT r.id FROM replicas r WHERE r.heartbeat_ms > ?{n}))"
    )
}

/// The replica id a component records on the work it claims (cron firings, webhook
/// deliveries): empty until the gateway registered as a replica.
#[derive(Debug, Default)]
pub struct ReplicaSlot(std::sync::RwLock<Option<String>>);

impl ReplicaSlot {
    /// Records `id` (this gateway's [`Replica::id`]) for the work claimed from now on.
    pub fn set(&self, id: &str) {
        match self.0.write() {
            Ok(mut r) => *r = Some(id.to_string()),
            Err(p) => *p.into_inner() = Some(id.to_string()),
        }
    }

    /// The recorded id, if any.
    pub fn get(&self) -> Option<String> {
        match self.0.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// This process's registration.
pub struct Replica {
    db: Db,
    clock: Arc<dyn Clock>,
    row: Row,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("id", &self.row.id).finish()
    }
}

/// The machine's name (`uname`), or `unknown`.
pub fn host_name() -> String {
    let u = rustix::system::uname();
    let n = u.nodename().to_string_lossy().into_owned();
    if n.is_empty() { "unknown".into() } else { n }
}

/// `<host>-<pid>-<8 hex>`: unique per process start, so a restarted gateway never inherits
/// the leases of the process it replaces.
fn new_id(host: &str) -> Result<String, StoreError> {
    let mut r = [0u8; 4];
    getrandom::fill(&mut r)
        .map_err(|e| StoreError::Db(chitin_store::Error::Internal(e.to_string())))?;
    let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    Ok(format!("{host}-{}-{hex}", std::process::id()))
}

impl Replica {
    /// Registers this process as a replica on `db`.
    pub fn join(db: Db, clock: Arc<dyn Clock>) -> Result<Arc<Self>, StoreError> {
        let host = host_name();
        let now = clock.now_ms();
        let row = Row {
            id: new_id(&host)?,
            host,
            started_ms: now,
            heartbeat_ms: now,
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        db.replica_register(&row)?;
        Ok(Arc::new(Self { db, clock, row }))
    }

    /// The id that owns this replica's leases.
    pub fn id(&self) -> &str {
        &self.row.id
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Records a heartbeat (registering again when another replica pruned the row) and
    /// prunes rows of replicas silent for a day.
    pub fn beat(&self) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        if !self.db.replica_heartbeat(&self.row.id, now)? {
            let mut row = self.row.clone();
            row.heartbeat_ms = now;
            self.db.replica_register(&row)?;
        }
        self.db.replicas_prune(now.saturating_sub(PRUNE_MS))?;
        Ok(())
    }

    /// Removes the registration and releases this replica's leases (a clean stop).
    pub fn leave(&self) -> Result<(), StoreError> {
        self.db.replica_deregister(&self.row.id)?;
        Ok(())
    }

    /// Heartbeats every [`HEARTBEAT_MS`] until `stop` turns true, then leaves.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let period = Duration::from_millis(u64::try_from(HEARTBEAT_MS).unwrap_or(5_000));
        loop {
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            let me = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || me.beat()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "replica heartbeat failed"),
                Err(e) => tracing::warn!(error = %e, "replica heartbeat task failed"),
            }
        }
        let me = Arc::clone(&self);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.leave()).await {
            tracing::warn!(error = %e, "could not deregister this replica");
        }
    }
}

/// The live replicas (heartbeat within [`STALE_MS`] of `now_ms`) with the leases each holds,
/// oldest first: `[{id, host, version, started_ms, heartbeat_ms, leases: [name]}]`.
pub fn live_replicas(db: &Db, now_ms: i64) -> Result<Vec<Value>, StoreError> {
    let mut out = Vec::new();
    for r in db.replicas_live(now_ms, STALE_MS)? {
        let leases: Vec<String> = db
            .leases_of(&r.id, now_ms)?
            .into_iter()
            .map(|l| l.name)
            .collect();
        out.push(json!({
            "id": r.id,
            "host": r.host,
            "version": r.version,
            "started_ms": r.started_ms,
            "heartbeat_ms": r.heartbeat_ms,
            "leases": leases,
        }));
    }
    Ok(out)
}

/// One line per replica for `/ready`'s detail and `chitin status`.
pub fn describe(replicas: &[Value], me: Option<&str>) -> String {
    if replicas.is_empty() {
        return "no live replica registered".into();
    }
    let list: Vec<String> = replicas
        .iter()
        .map(|r| {
            let id = r["id"].as_str().unwrap_or_default();
            let leases: Vec<&str> = r["leases"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let held = if leases.is_empty() {
                "no leases".to_string()
            } else if Some(id) == me {
                format!("leases: {}", leases.join(", "))
            } else {
                format!("{} leases", leases.len())
            };
            let this = if Some(id) == me { ", this one" } else { "" };
            format!(
                "{id} on {} ({held}{this})",
                r["host"].as_str().unwrap_or_default()
            )
        })
        .collect();
    format!("{} live: {}", replicas.len(), list.join(", "))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn a_replica_joins_beats_lists_its_leases_and_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(&dir.path().join("state.db")).unwrap();
        let clock = ManualClock::new(1_000_000);
        let me = Replica::join(db.clone(), Arc::new(clock.clone())).unwrap();
        assert!(me.id().contains(&format!("-{}-", std::process::id())));
        db.lease_acquire("session:s1", me.id(), 1_000_000, 30_000)
            .unwrap()
            .unwrap();
        let live = live_replicas(&db, 1_000_000).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0]["id"], me.id());
        assert_eq!(live[0]["leases"], json!(["session:s1"]));
        assert_eq!(
            describe(&live, Some(me.id())),
            format!(
                "1 live: {} on {} (leases: session:s1, this one)",
                me.id(),
                live[0]["host"].as_str().unwrap()
            )
        );
        // Silent past the bound: not live; a beat brings it back, even once pruned.
        clock.advance(STALE_MS + 1);
        assert!(live_replicas(&db, clock.now_ms()).unwrap().is_empty());
        db.replicas_prune(clock.now_ms()).unwrap();
        me.beat().unwrap();
        assert_eq!(live_replicas(&db, clock.now_ms()).unwrap().len(), 1);
        me.leave().unwrap();
        assert!(live_replicas(&db, clock.now_ms()).unwrap().is_empty());
        assert!(db.leases_of(me.id(), clock.now_ms()).unwrap().is_empty());
    }
}
