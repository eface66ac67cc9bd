//! Replicas: each gateway on the database registers itself in `replicas` and heartbeats; a
//! replica whose heartbeat is older than the caller's staleness bound is considered dead (its
//! leases expire on their own). `/ready` and `chitin status` list them.

use crate::{Db, Result, params};

/// A gateway process on this database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Unique per process start (`<host>-<pid>-<random>`), the owner of its leases.
    pub id: String,
    pub host: String,
    pub started_ms: i64,
    pub heartbeat_ms: i64,
    /// The Chitin version it runs.
    pub version: String,
}

impl Db {
    /// Registers (or re-registers) a replica.
    pub fn replica_register(&self, r: &Replica) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO replicas (id, host, started_ms, heartbeat_ms, version)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET host = excluded.host,
                    started_ms = excluded.started_ms, heartbeat_ms = excluded.heartbeat_ms,
                    version = excluded.version",
                params![&r.id, &r.host, r.started_ms, r.heartbeat_ms, &r.version],
            )
        })
        .map(|_| ())
    }

    /// Records that the replica is alive at `now_ms`; `false` when its row is gone (pruned
    /// as dead: register again).
    pub fn replica_heartbeat(&self, id: &str, now_ms: i64) -> Result<bool> {
        let n = self.with(|c| {
            c.execute(
                "UPDATE replicas SET heartbeat_ms = ?2 WHERE id = ?1",
                params![id, now_ms],
            )
        })?;
        Ok(n > 0)
    }

    /// Removes the replica (a clean shutdown) and releases its leases, in one transaction.
    pub fn replica_deregister(&self, id: &str) -> Result<()> {
        if self.dialect() == crate::Dialect::Sqlite {
            // SQLite's leases live in this process's memory (`lease`).
            self.lease_release_all(id)?;
        }
        self.tx(|t| {
            t.execute(
                "UPDATE leases SET owner = NULL, expires_ms = 0 WHERE owner = ?1",
                params![id],
            )?;
            t.execute("DELETE FROM replicas WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// The replicas whose heartbeat is newer than `now_ms - stale_ms`, oldest first.
    pub fn replicas_live(&self, now_ms: i64, stale_ms: i64) -> Result<Vec<Replica>> {
        self.with(|c| {
            c.query_map(
                "SELECT id, host, started_ms, heartbeat_ms, version FROM replicas
                 WHERE heartbeat_ms > ?1 ORDER BY started_ms, id",
                params![now_ms.saturating_sub(stale_ms)],
                |r| {
                    Ok::<_, crate::Error>(Replica {
                        id: r.get(0)?,
                        host: r.get(1)?,
                        started_ms: r.get(2)?,
                        heartbeat_ms: r.get(3)?,
                        version: r.get(4)?,
                    })
                },
            )
        })
    }

    /// Deletes the rows of replicas silent since before `before_ms`; returns how many.
    pub fn replicas_prune(&self, before_ms: i64) -> Result<u64> {
        self.with(|c| {
            c.execute(
                "DELETE FROM replicas WHERE heartbeat_ms < ?1",
                params![before_ms],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::testing::TestPg;

    fn replica(id: &str, at: i64) -> Replica {
        Replica {
            id: id.into(),
            host: "h1".into(),
            started_ms: at,
            heartbeat_ms: at,
            version: "0.1.0".into(),
        }
    }

    fn lifecycle(a: &Db, b: &Db) {
        a.replica_register(&replica("r-a", 1_000)).unwrap();
        b.replica_register(&replica("r-b", 2_000)).unwrap();
        let live = a.replicas_live(10_000, 15_000).unwrap();
        assert_eq!(
            live.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r-a", "r-b"]
        );
        // r-a keeps beating, r-b falls silent.
        assert!(a.replica_heartbeat("r-a", 30_000).unwrap());
        let live = b.replicas_live(31_000, 15_000).unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, "r-a");
        assert_eq!(live[0].heartbeat_ms, 30_000);
        assert_eq!(a.replicas_prune(16_000).unwrap(), 1);
        assert!(!b.replica_heartbeat("r-b", 32_000).unwrap());
        // A clean shutdown releases the replica's leases at once.
        a.lease_acquire("channel:telegram", "r-a", 30_000, 10_000)
            .unwrap()
            .unwrap();
        a.replica_deregister("r-a").unwrap();
        assert!(a.replicas_live(30_001, 15_000).unwrap().is_empty());
        assert!(
            b.lease_acquire("channel:telegram", "r-b", 30_001, 10_000)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn replicas_register_heartbeat_and_drop_out_when_silent_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(&dir.path().join("state.db")).unwrap();
        lifecycle(&db, &db.clone());
    }

    #[test]
    fn replicas_on_two_postgres_handles_see_each_other() {
        let pg = TestPg::new().unwrap();
        lifecycle(&pg.db().unwrap(), &pg.db().unwrap());
    }
}
