//! What the gateway runs on a schedule: retention every `[retention] interval_minutes` and a
//! backup to `[backup] dir` every `[backup] interval_hours`. The last run of each is kept in the
//! store's `meta` table, so a restart does not reset the schedule and a readiness check can
//! report a lag ([`retention_lag_ms`]). With several gateways on one database, each retention
//! tick is claimed in the database ([`retention::claim`]) and runs on one of them.

use std::path::PathBuf;

use super::retention::{self, RetentionReport};
use super::{Lifecycle, LifecycleError, backup, offsite};
use crate::config::Config;

/// `meta` key: when the last scheduled backup was made (unix ms).
pub const BACKUP_LAST_RUN: &str = "backup.last_run_ms";

/// What one [`tick`] did. Each part is independent: a failing backup does not stop retention.
#[derive(Debug, Default)]
pub struct TickReport {
    pub retention: Option<Result<RetentionReport, String>>,
    pub backup: Option<Result<PathBuf, String>>,
    /// The off-site round (`[backup] target`): upload, remote retention, test-restore.
    pub offsite: Option<Result<offsite::Report, String>>,
}

/// What the off-site round needs to release the store's credentials: the gate and the secrets.
pub type Offsite<'a> = (&'a crate::gate::Gate, &'a crate::secrets::SharedSecretStore);

fn due(last: Option<i64>, interval_ms: i64, now: i64) -> bool {
    interval_ms > 0 && last.is_none_or(|l| now.saturating_sub(l) >= interval_ms)
}

/// Runs whatever is due now. Blocking (SQLite, fsync, age): call it from
/// `tokio::task::spawn_blocking`, e.g. once a minute.
pub fn tick(lc: &Lifecycle, config: &Config) -> TickReport {
    tick_with(lc, config, None)
}

/// [`tick`], with the off-site round when `[backup] target` is set (`offsite` gives the gate
/// and secrets the credentials are released through; without them the round reports an
/// error).
pub fn tick_with(lc: &Lifecycle, config: &Config, offsite: Option<Offsite<'_>>) -> TickReport {
    let now = lc.clock.now_ms();
    let mut out = TickReport::default();
    let minutes = i64::try_from(config.retention.interval_minutes).unwrap_or(i64::MAX);
    let last = retention::last_run_ms(lc).ok().flatten();
    let interval = minutes.saturating_mul(60_000);
    // Once per tick deployment-wide: of several gateways on one database, the one whose
    // claim succeeds runs it.
    if due(last, interval, now) && retention::claim(lc, interval, now).unwrap_or(false) {
        out.retention = Some(
            retention::run(lc, &config.retention, "retention:schedule", false)
                .map_err(|e| e.to_string()),
        );
    }
    let hours = i64::try_from(config.backup.interval_hours).unwrap_or(i64::MAX);
    let last_backup = lc
        .store
        .meta(BACKUP_LAST_RUN)
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok());
    let wanted = !config.backup.dir.is_empty() || !config.backup.target.is_empty();
    let mut made = None;
    if wanted && due(last_backup, hours.saturating_mul(3_600_000), now) {
        let made_now = backup::scheduled(&lc.home, &lc.store, &lc.audit, &config.backup, now)
            .and_then(|p| {
                lc.store
                    .set_meta(BACKUP_LAST_RUN, &now.to_string())
                    .map_err(LifecycleError::from)?;
                Ok(p)
            });
        out.backup = match made_now {
            Ok(Some(p)) => {
                made = Some(p.clone());
                Some(Ok(p))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e.to_string())),
        };
    }
    let round_due =
        made.is_some() || offsite::test_restore_due(lc, &config.backup).unwrap_or(false);
    if !config.backup.target.is_empty() && round_due {
        let round = offsite_round(lc, config, offsite, made.as_deref());
        // A backup staged only for upload does not stay on this host once it is uploaded.
        if config.backup.dir.is_empty()
            && let Some(p) = &made
            && matches!(&round, Ok(r) if matches!(r.upload, Some(Ok(_))))
        {
            let _ = std::fs::remove_file(p);
        }
        out.offsite = Some(round);
    }
    out
}

fn offsite_round(
    lc: &Lifecycle,
    config: &Config,
    offsite: Option<Offsite<'_>>,
    made: Option<&std::path::Path>,
) -> Result<offsite::Report, String> {
    let (gate, secrets) = offsite.ok_or(
        "[backup] target is set but this scheduler has no gate to release the credentials",
    )?;
    let client = offsite::client(&config.backup, gate, secrets)
        .map_err(|e| e.to_string())?
        .ok_or("[backup] target is empty")?;
    offsite::round(lc, &config.backup, &client, made).map_err(|e| e.to_string())
}

/// How far retention is behind its schedule (0 when on time; `None` when it is off). For
/// `/ready`: a purge job that silently stopped (Rocket.Chat #12862) shows up here.
pub fn retention_lag_ms(lc: &Lifecycle, config: &Config) -> Option<i64> {
    let interval = i64::try_from(config.retention.interval_minutes)
        .unwrap_or(i64::MAX)
        .saturating_mul(60_000);
    if interval == 0 {
        return None;
    }
    let now = lc.clock.now_ms();
    let last = retention::last_run_ms(lc).ok().flatten().unwrap_or(0);
    Some(now.saturating_sub(last).saturating_sub(interval).max(0))
}
