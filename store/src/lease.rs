//! Leases: a named right to do something (run a session, own a polling channel) held by one
//! owner until it expires, kept in the `leases` table so that every replica on the database
//! agrees on who holds it.
//!
//! - [`Db::lease_acquire`] inserts the lease, or takes over an expired or released one, in one
//!   statement (`INSERT .. ON CONFLICT DO UPDATE .. WHERE`): of two replicas racing, exactly one
//!   gets it. A live lease is refused to everyone, its own owner included (two holders in one
//!   process are two holders too).
//! - Every take-over increases the lease's **fencing token** ([`Lease::fence`]); the row is kept
//!   on release so the token never goes back. A write that must only happen while the lease is
//!   held checks it in its own transaction with [`Conn::hold_lease`] (on PostgreSQL the row is
//!   locked `FOR SHARE` until that transaction ends, so a take-over waits for it).
//! - [`Db::lease_renew`] extends it, only for its owner with the same token, and fails with
//!   [`Error::LeaseLost`] once it expired or was taken over: the holder must then stop.
//!
//! Time is the caller's clock (`now_ms`, milliseconds since the epoch), the same for every
//! statement; replicas need clocks kept in step (NTP), and a lease's time to live must be much
//! longer than their skew.
//!
//! On SQLite one gateway owns the file (the gateway lock), so leases coordinate only the
//! handles of one process: they are kept in memory, shared by every handle of the same file
//! ([`MemLeases`]), with the same rules and tokens. A run takes and gives back two leases per
//! turn: as table rows each was a durable commit (an fsync) on the turn's path (issue #21).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::{Backend, Conn, ConnInner, Db, Dialect, Error, Result, params};

/// The leases of one SQLite file, in this process (every handle of the file shares them).
#[derive(Default)]
pub(crate) struct MemLeases {
    table: Mutex<MemTable>,
}

#[derive(Default)]
struct MemTable {
    rows: BTreeMap<String, LeaseInfo>,
    /// The last fencing token handed out, for any name: a token is never given twice, so
    /// a released row can be forgotten without a later holder of its name getting an old one.
    fence: i64,
    /// Released rows, oldest first (forgotten beyond [`KEEP_RELEASED`]).
    released: VecDeque<String>,
}

/// How many released leases are remembered (a run takes a lease of its own, `run:<id>`, so the
/// rows would otherwise grow with every turn).
const KEEP_RELEASED: usize = 1024;

impl std::fmt::Debug for MemLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemLeases").finish_non_exhaustive()
    }
}

/// The lease tables of the SQLite files open in this process, by canonical path.
fn registry() -> &'static Mutex<HashMap<String, Weak<MemLeases>>> {
    static TABLES: OnceLock<Mutex<HashMap<String, Weak<MemLeases>>>> = OnceLock::new();
    TABLES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The lease table of the SQLite file at `path`, shared with the other handles of it.
pub(crate) fn mem_leases(path: &std::path::Path) -> Arc<MemLeases> {
    let key = std::fs::canonicalize(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string();
    let mut map = match registry().lock() {
        Ok(m) => m,
        Err(p) => p.into_inner(),
    };
    if let Some(t) = map.get(&key).and_then(Weak::upgrade) {
        return t;
    }
    map.retain(|_, w| w.strong_count() > 0);
    let t = Arc::new(MemLeases::default());
    map.insert(key, Arc::downgrade(&t));
    t
}

impl MemTable {
    fn released(&mut self, name: &str) {
        self.released.push_back(name.to_string());
        while self.released.len() > KEEP_RELEASED {
            if let Some(old) = self.released.pop_front()
                && self.rows.get(&old).is_some_and(|r| r.owner.is_none())
            {
                self.rows.remove(&old);
            }
        }
    }
}

impl MemLeases {
    fn table(&self) -> std::sync::MutexGuard<'_, MemTable> {
        match self.table.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn acquire(&self, name: &str, owner: &str, now_ms: i64, until: i64) -> Option<i64> {
        let mut t = self.table();
        if t.rows.get(name).is_some_and(|r| r.expires_ms > now_ms) {
            return None;
        }
        t.fence += 1;
        let fence = t.fence;
        t.rows.insert(
            name.to_string(),
            LeaseInfo {
                name: name.to_string(),
                owner: Some(owner.to_string()),
                expires_ms: until,
                fence,
            },
        );
        Some(fence)
    }

    fn holds(&self, lease: &Lease, now_ms: i64) -> bool {
        self.table().rows.get(&lease.name).is_some_and(|r| {
            r.owner.as_deref() == Some(lease.owner.as_str())
                && r.fence == lease.fence
                && r.expires_ms > now_ms
        })
    }

    fn renew(&self, lease: &Lease, now_ms: i64, until: i64) -> bool {
        let mut t = self.table();
        match t.rows.get_mut(&lease.name) {
            Some(r)
                if r.owner.as_deref() == Some(lease.owner.as_str())
                    && r.fence == lease.fence
                    && r.expires_ms > now_ms =>
            {
                r.expires_ms = until;
                true
            }
            _ => false,
        }
    }

    fn release(&self, lease: &Lease) -> bool {
        let mut t = self.table();
        match t.rows.get_mut(&lease.name) {
            Some(r)
                if r.owner.as_deref() == Some(lease.owner.as_str()) && r.fence == lease.fence =>
            {
                r.owner = None;
                r.expires_ms = 0;
                t.released(&lease.name);
                true
            }
            _ => false,
        }
    }

    fn release_where(&self, pick: impl Fn(&LeaseInfo) -> bool) -> u64 {
        let mut t = self.table();
        let names: Vec<String> = t
            .rows
            .values()
            .filter(|r| r.owner.is_some() && pick(r))
            .map(|r| r.name.clone())
            .collect();
        for n in &names {
            if let Some(r) = t.rows.get_mut(n) {
                r.owner = None;
                r.expires_ms = 0;
            }
            t.released(n);
        }
        u64::try_from(names.len()).unwrap_or(u64::MAX)
    }

    fn list(&self, pick: impl Fn(&LeaseInfo) -> bool) -> Vec<LeaseInfo> {
        self.table()
            .rows
            .values()
            .filter(|r| pick(r))
            .cloned()
            .collect()
    }
}

/// A lease held by this caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub owner: String,
    /// Grows on every take-over: a holder with a smaller one lost the lease.
    pub fence: i64,
    pub expires_ms: i64,
}

/// A row of `leases` as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    pub name: String,
    /// `None` once released.
    pub owner: Option<String>,
    pub expires_ms: i64,
    pub fence: i64,
}

fn expiry(name: &str, now_ms: i64, ttl_ms: i64) -> Result<i64> {
    if ttl_ms <= 0 {
        return Err(Error::Lease(format!(
            "lease `{name}`: the time to live must be positive (got {ttl_ms} ms)"
        )));
    }
    now_ms
        .checked_add(ttl_ms)
        .ok_or_else(|| Error::Lease(format!("lease `{name}`: the expiry overflows")))
}

fn check_names(name: &str, owner: &str) -> Result<()> {
    if name.is_empty() || owner.is_empty() {
        return Err(Error::Lease(
            "a lease needs a name and an owner (both non-empty)".into(),
        ));
    }
    Ok(())
}

impl Db {
    /// Takes the lease `name` for `owner` until `now_ms + ttl_ms`: `Some` when it was free,
    /// expired or released; `None` while it is held (by anyone, this owner too).
    pub fn lease_acquire(
        &self,
        name: &str,
        owner: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<Lease>> {
        check_names(name, owner)?;
        let until = expiry(name, now_ms, ttl_ms)?;
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s
                .leases
                .acquire(name, owner, now_ms, until)
                .map(|fence| Lease {
                    name: name.to_string(),
                    owner: owner.to_string(),
                    fence,
                    expires_ms: until,
                }));
        }
        let row = self.with(|c| {
            c.query_opt(
                "INSERT INTO leases (name, owner, expires_ms, fence) VALUES (?1, ?2, ?3, 1)
                 ON CONFLICT (name) DO UPDATE SET
                    fence = leases.fence + 1,
                    owner = excluded.owner,
                    expires_ms = excluded.expires_ms
                 WHERE leases.expires_ms <= ?4
                 RETURNING fence",
                params![name, owner, until, now_ms],
            )
        })?;
        row.map(|r| {
            Ok(Lease {
                name: name.to_string(),
                owner: owner.to_string(),
                fence: r.get(0)?,
                expires_ms: until,
            })
        })
        .transpose()
    }

    /// Extends a held lease to `now_ms + ttl_ms`. [`Error::LeaseLost`] when it expired, was
    /// released or was taken over (the holder must stop what the lease protects).
    pub fn lease_renew(&self, lease: &mut Lease, now_ms: i64, ttl_ms: i64) -> Result<()> {
        let until = expiry(&lease.name, now_ms, ttl_ms)?;
        if let Backend::Sqlite(s) = &*self.inner {
            if !s.leases.renew(lease, now_ms, until) {
                return Err(lost(lease));
            }
            lease.expires_ms = until;
            return Ok(());
        }
        let n = self.with(|c| {
            c.execute(
                "UPDATE leases SET expires_ms = ?4
                 WHERE name = ?1 AND owner = ?2 AND fence = ?3 AND expires_ms > ?5",
                params![&lease.name, &lease.owner, lease.fence, until, now_ms],
            )
        })?;
        if n == 0 {
            return Err(lost(lease));
        }
        lease.expires_ms = until;
        Ok(())
    }

    /// Gives the lease up (kept as a row without owner, so its token keeps growing). `false`
    /// when it was no longer this holder's.
    pub fn lease_release(&self, lease: &Lease) -> Result<bool> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s.leases.release(lease));
        }
        let n = self.with(|c| {
            c.execute(
                "UPDATE leases SET owner = NULL, expires_ms = 0
                 WHERE name = ?1 AND owner = ?2 AND fence = ?3",
                params![&lease.name, &lease.owner, lease.fence],
            )
        })?;
        Ok(n > 0)
    }

    /// Releases every lease of `owner` (a replica shutting down); returns how many.
    pub fn lease_release_all(&self, owner: &str) -> Result<u64> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s
                .leases
                .release_where(|r| r.owner.as_deref() == Some(owner)));
        }
        self.with(|c| {
            c.execute(
                "UPDATE leases SET owner = NULL, expires_ms = 0 WHERE owner = ?1",
                params![owner],
            )
        })
    }

    /// Releases every lease (a single gateway on SQLite starting: the process before it,
    /// proven gone by the gateway lock, held them); returns how many were held.
    pub fn leases_clear(&self) -> Result<u64> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s.leases.release_where(|_| true));
        }
        self.with(|c| {
            c.execute(
                "UPDATE leases SET owner = NULL, expires_ms = 0 WHERE owner IS NOT NULL",
                params![],
            )
        })
    }

    /// The lease's row, held or not (`None` when it was never taken).
    pub fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s.leases.list(|r| r.name == name).pop());
        }
        self.with(|c| {
            c.query_opt(
                "SELECT name, owner, expires_ms, fence FROM leases WHERE name = ?1",
                params![name],
            )?
            .map(|r| info(&r))
            .transpose()
        })
    }

    /// The leases `owner` holds at `now_ms`, by name.
    pub fn leases_of(&self, owner: &str, now_ms: i64) -> Result<Vec<LeaseInfo>> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s
                .leases
                .list(|r| r.owner.as_deref() == Some(owner) && r.expires_ms > now_ms));
        }
        self.with(|c| {
            c.query_map(
                "SELECT name, owner, expires_ms, fence FROM leases
                 WHERE owner = ?1 AND expires_ms > ?2 ORDER BY name",
                params![owner, now_ms],
                info,
            )
        })
    }

    /// The leases held at `now_ms` whose name starts with `prefix`, by name.
    pub fn leases_held(&self, prefix: &str, now_ms: i64) -> Result<Vec<LeaseInfo>> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s.leases.list(|r| {
                r.name.starts_with(prefix) && r.owner.is_some() && r.expires_ms > now_ms
            }));
        }
        self.with(|c| {
            c.query_map(
                "SELECT name, owner, expires_ms, fence FROM leases
                 WHERE substr(name, 1, length(?1)) = ?1 AND owner IS NOT NULL AND expires_ms > ?2
                 ORDER BY name",
                params![prefix, now_ms],
                info,
            )
        })
    }

    /// The expired leases (with an owner that stopped renewing) whose name starts with
    /// `prefix`: work a dead replica left, for another to take over.
    pub fn leases_expired(&self, prefix: &str, now_ms: i64) -> Result<Vec<LeaseInfo>> {
        if let Backend::Sqlite(s) = &*self.inner {
            return Ok(s.leases.list(|r| {
                r.name.starts_with(prefix) && r.owner.is_some() && r.expires_ms <= now_ms
            }));
        }
        self.with(|c| {
            c.query_map(
                "SELECT name, owner, expires_ms, fence FROM leases
                 WHERE substr(name, 1, length(?1)) = ?1 AND owner IS NOT NULL AND expires_ms <= ?2
                 ORDER BY name",
                params![prefix, now_ms],
                info,
            )
        })
    }
}

fn info(r: &crate::Row) -> Result<LeaseInfo> {
    Ok(LeaseInfo {
        name: r.get(0)?,
        owner: r.get(1)?,
        expires_ms: r.get(2)?,
        fence: r.get(3)?,
    })
}

fn lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        name: lease.name.clone(),
        fence: lease.fence,
    }
}

impl Conn<'_> {
    /// Inside a transaction: fails with [`Error::LeaseLost`] unless `lease` is still held at
    /// `now_ms` with its token. On PostgreSQL the row stays locked (`FOR SHARE`) until the
    /// transaction ends, so no take-over can commit in between; SQLite has one writer.
    pub fn hold_lease(&mut self, lease: &Lease, now_ms: i64) -> Result<()> {
        if let ConnInner::Sqlite(_, _, leases, _) = &self.inner {
            return if leases.holds(lease, now_ms) {
                Ok(())
            } else {
                Err(lost(lease))
            };
        }
        debug_assert_eq!(self.dialect(), Dialect::Postgres);
        let sql = "SELECT fence FROM leases
                 WHERE name = ?1 AND owner = ?2 AND fence = ?3 AND expires_ms > ?4 FOR SHARE";
        match self.query_opt(sql, params![&lease.name, &lease.owner, lease.fence, now_ms])? {
            Some(_) => Ok(()),
            None => Err(lost(lease)),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
    use super::*;
    use crate::testing::TestPg;

    fn sqlite() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::sqlite(&dir.path().join("state.db")).unwrap();
        (dir, db)
    }

    fn one_owner_at_a_time(db: &Db) {
        let a = db
            .lease_acquire("session:s1", "a", 1_000, 500)
            .unwrap()
            .unwrap();
        assert_eq!(a.fence, 1);
        assert_eq!(a.expires_ms, 1_500);
        // Nobody takes a live lease, not even its owner a second time.
        assert!(
            db.lease_acquire("session:s1", "b", 1_200, 500)
                .unwrap()
                .is_none()
        );
        assert!(
            db.lease_acquire("session:s1", "a", 1_300, 500)
                .unwrap()
                .is_none()
        );
        let mut again = a.clone();
        db.lease_renew(&mut again, 1_300, 500).unwrap();
        assert_eq!(again.expires_ms, 1_800);
        // Expired: taken over, with a bigger token; the old holder can neither renew nor
        // release it, nor pass `hold_lease`.
        let b = db
            .lease_acquire("session:s1", "b", 1_800, 500)
            .unwrap()
            .unwrap();
        assert_eq!(b.fence, 2);
        let mut old = again.clone();
        let e = db.lease_renew(&mut old, 1_850, 500).unwrap_err();
        assert!(
            matches!(&e, Error::LeaseLost { name, fence: 1 } if name == "session:s1"),
            "{e}"
        );
        assert!(!db.lease_release(&old).unwrap());
        let e = db.tx(|t| t.hold_lease(&old, 1_850)).unwrap_err();
        assert!(matches!(e, Error::LeaseLost { .. }), "{e}");
        db.tx(|t| t.hold_lease(&b, 1_850)).unwrap();
        // The holder renews; renewing after expiry fails even when nobody took it.
        let mut b = b;
        db.lease_renew(&mut b, 2_000, 500).unwrap();
        assert_eq!(b.expires_ms, 2_500);
        assert!(
            db.lease_acquire("session:s1", "a", 2_400, 500)
                .unwrap()
                .is_none()
        );
        let mut late = b.clone();
        assert!(matches!(
            db.lease_renew(&mut late, 2_500, 500).unwrap_err(),
            Error::LeaseLost { .. }
        ));
        // Released: free at once for anyone, and the token still grows.
        assert!(db.lease_release(&b).unwrap());
        let info = db.lease_info("session:s1").unwrap().unwrap();
        assert_eq!(info.owner, None);
        let a2 = db
            .lease_acquire("session:s1", "a", 2_100, 500)
            .unwrap()
            .unwrap();
        assert_eq!(a2.fence, 3);
        assert_eq!(db.leases_of("a", 2_100).unwrap().len(), 1);
        assert!(db.leases_of("b", 2_100).unwrap().is_empty());
        assert_eq!(db.leases_held("session:", 2_100).unwrap().len(), 1);
        assert!(db.leases_held("channel:", 2_100).unwrap().is_empty());
        assert!(db.leases_expired("session:", 2_100).unwrap().is_empty());
        assert_eq!(db.leases_expired("session:", 2_600).unwrap().len(), 1);
        assert_eq!(db.lease_release_all("a").unwrap(), 1);
        db.lease_acquire("channel:x", "c", 2_100, 500)
            .unwrap()
            .unwrap();
        assert_eq!(db.leases_clear().unwrap(), 1);
        assert!(db.leases_held("", 2_100).unwrap().is_empty());
        assert!(db.leases_of("a", 2_100).unwrap().is_empty());
        // Bad input is refused before anything is written.
        let e = db.lease_acquire("x", "a", 0, 0).unwrap_err().to_string();
        assert!(e.contains("time to live must be positive"), "{e}");
        assert!(db.lease_acquire("", "a", 0, 10).is_err());
        assert!(db.lease_info("x").unwrap().is_none());
    }

    #[test]
    fn sqlite_forgets_old_released_leases_but_never_repeats_a_token() {
        let (_d, db) = sqlite();
        let first = db.lease_acquire("session:s", "a", 0, 10).unwrap().unwrap();
        assert!(db.lease_release(&first).unwrap());
        // A run takes and gives back a lease of its own each turn: the table stays bounded.
        for i in 0..3 * KEEP_RELEASED {
            let l = db
                .lease_acquire(&format!("run:{i}"), "a", 0, 10)
                .unwrap()
                .unwrap();
            assert!(db.lease_release(&l).unwrap());
        }
        match &*db.inner {
            Backend::Sqlite(s) => assert!(s.leases.table().rows.len() <= KEEP_RELEASED + 1),
            Backend::Postgres(_) => unreachable!("a SQLite test"),
        }
        // The forgotten name's next token is still bigger than any it had.
        assert!(db.lease_info("session:s").unwrap().is_none());
        let again = db.lease_acquire("session:s", "a", 0, 10).unwrap().unwrap();
        assert!(again.fence > first.fence);
        // A stale holder of the first token does not hold the new lease.
        assert!(db.tx(|t| t.hold_lease(&first, 1)).is_err());
        db.tx(|t| t.hold_lease(&again, 1)).unwrap();
    }

    #[test]
    fn a_lease_has_one_owner_until_it_expires_and_its_token_grows_on_sqlite() {
        let (_d, db) = sqlite();
        one_owner_at_a_time(&db);
    }

    #[test]
    fn a_lease_has_one_owner_until_it_expires_and_its_token_grows_on_postgres() {
        let pg = TestPg::new().unwrap();
        let db = pg.db().unwrap();
        one_owner_at_a_time(&db);
    }

    #[test]
    fn two_postgres_handles_racing_for_a_lease_never_both_get_it() {
        let pg = TestPg::new().unwrap();
        let dbs = [pg.db().unwrap(), pg.db().unwrap()];
        let mut last_fence = 0;
        for round in 0..40i64 {
            // Every round starts after the previous holder's lease expired.
            let now = 10_000 + round * 1_000;
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let db = dbs[i % 2].clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        db.lease_acquire("channel:telegram", &format!("r{i}"), now, 500)
                            .unwrap()
                    })
                })
                .collect();
            let won: Vec<Lease> = handles
                .into_iter()
                .filter_map(|h| h.join().unwrap())
                .collect();
            assert_eq!(won.len(), 1, "round {round}: {won:?}");
            assert!(won[0].fence > last_fence, "round {round}: {won:?}");
            last_fence = won[0].fence;
            let info = dbs[0].lease_info("channel:telegram").unwrap().unwrap();
            assert_eq!(info.owner.as_deref(), Some(won[0].owner.as_str()));
        }
    }

    #[test]
    fn a_take_over_on_postgres_waits_for_a_transaction_that_holds_the_lease() {
        let pg = TestPg::new().unwrap();
        let (a, b) = (pg.db().unwrap(), pg.db().unwrap());
        let held = a
            .lease_acquire("session:s", "a", 1_000, 500)
            .unwrap()
            .unwrap();
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let a = a.clone();
            let held = held.clone();
            std::thread::spawn(move || {
                a.tx(|t| {
                    t.hold_lease(&held, 1_400)?;
                    entered_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    t.execute(
                        "INSERT INTO meta (key, value) VALUES ('fenced', 'a')",
                        params![],
                    )?;
                    Ok::<_, Error>(())
                })
            })
        };
        entered_rx.recv().unwrap();
        // The take-over (its clock past the expiry) blocks on the row lock until the
        // holder's transaction ends; then it wins with a bigger token.
        let taker = {
            let b = b.clone();
            std::thread::spawn(move || b.lease_acquire("session:s", "b", 2_000, 500).unwrap())
        };
        // The taker is seen waiting on the row lock while the holder's transaction is open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let waiting: i64 = a
                .with(|c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        params![],
                    )?
                    .get(0)
                })
                .unwrap();
            if waiting == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the take-over never waited"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!taker.is_finished());
        go_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
        let won = taker.join().unwrap().unwrap();
        assert_eq!(won.fence, 2);
        let e = a.tx(|t| t.hold_lease(&held, 2_100)).unwrap_err();
        assert!(matches!(e, Error::LeaseLost { .. }));
    }
}
