//! `iotpipe check [--repair]`: do the registry, the event store and the live figures
//! agree? Four looks, each reported with a count and a few examples:
//!
//! 1. Devices with stored events and no registry row (deleted without a purge, or
//!    events that landed after a purge), and events filed under another user than
//!    the registry's owner. Repair: the first are purged (store and live figures);
//!    the second are only reported (which side is wrong needs a person).
//! 2. Rollups that differ from their raw events, at every level, over sampled UTC
//!    days of every device (its newest day, and random days of the month before).
//!    Only intervals that ended ten minutes ago are compared, so rollups a cluster
//!    is still recomputing are not counted. Reported only: a wrong rollup row means
//!    a bug or a damaged directory, and the store's own recomputation is the repair.
//! 3. Live totals (Redis) that differ from the stored events. Repair: the totals are
//!    set from the store (as `rebuild-live`). In-process figures live in the server
//!    and are recomputed at its start-up, so there is nothing to compare from here.
//! 4. Duplicate-index rows whose event is not stored. Repair: removed.
//!
//! Devices registered without events are normal (a new device) and not reported.
//! The command exits non-zero when it found anything, repaired or not.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use rand::Rng;

use super::{open_registry, open_store, progress, OpsError};
use crate::config::Config;
use crate::live::LiveTotal;
use crate::model::{bucket_start, now_ms, DeviceId, UserId};
use crate::query::totals::live_totals;
use crate::store::retention::{Retention, Tier};
use crate::store::{EventStore, Level, ListQuery, PointQuery, RollupQuery, MAX_EXAMPLES};
use crate::topology;

const DAY_MS: i64 = 86_400_000;
/// Intervals younger than this are not compared: a cluster may still be
/// recomputing their rollups.
const SETTLE_MS: i64 = 10 * 60_000;
/// How far back the random sampled days go from a device's newest.
const SAMPLE_SPAN_DAYS: i64 = 30;

#[derive(Debug, Clone)]
pub struct CheckArgs {
    pub repair: bool,
    /// UTC days compared per device (its newest, then random earlier ones).
    pub sample_days: usize,
}

/// One kind of disagreement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finding {
    pub what: &'static str,
    pub count: u64,
    pub examples: Vec<String>,
    /// Whether `--repair` fixed them.
    pub repaired: bool,
}

impl Finding {
    fn new(what: &'static str) -> Self {
        Self {
            what,
            ..Self::default()
        }
    }

    fn add(&mut self, example: impl FnOnce() -> String) {
        self.count += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(example());
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> OpsError {
    OpsError::Failed(format!("{what}: {e}"))
}

/// Runs every check; prints the report. Returns the findings, or an error naming
/// how many disagreements were found.
///
/// # Errors
///
/// A backend failed, or a disagreement was found.
pub async fn run(config: &Config, args: &CheckArgs) -> Result<Vec<Finding>, OpsError> {
    let started = Instant::now();
    let store = open_store(config).await?;
    let registry = open_registry(config).await?;
    let live = match config.live.redis_url {
        Some(_) => Some(topology::open_live(config)?.0),
        None => None,
    };
    let devices = store
        .stored_devices()
        .await
        .map_err(|e| failed("event store", e))?;
    let retention = Retention::from_config(config);
    let bar = progress::bar(Some(devices.len() as u64 * 2), "device checks");

    let mut unregistered = Finding::new("devices with stored events and no registry row");
    let mut misfiled = Finding::new("devices whose events are filed under another user");
    let mut rollups = Finding::new("rollups that differ from their events (sampled days)");
    for &(user, device) in &devices {
        match registry
            .device(device)
            .await
            .map_err(|e| failed("registry", e))?
        {
            None => unregistered.add(|| format!("{device} (user {user})")),
            Some(d) if d.user_id != user => misfiled.add(|| {
                format!(
                    "{device}: events under user {user}, registered to user {}",
                    d.user_id
                )
            }),
            Some(_) => {}
        }
        compare_rollups(
            store.as_ref(),
            retention,
            (user, device),
            args.sample_days,
            &mut rollups,
        )
        .await
        .map_err(|e| failed("event store", e))?;
        bar.inc(1);
    }
    if args.repair && unregistered.count > 0 {
        for &(user, device) in &devices {
            if registry
                .device(device)
                .await
                .map_err(|e| failed("registry", e))?
                .is_none()
            {
                store
                    .purge_device(user, device)
                    .await
                    .map_err(|e| failed("purging", e))?;
                if let Some(live) = &live {
                    live.forget_device(user, device)
                        .await
                        .map_err(|e| failed("live backend", e))?;
                }
            }
        }
        unregistered.repaired = true;
    }

    let mut live_totals_finding = Finding::new("live totals that differ from the stored events");
    if let Some(live) = &live {
        let totals = live_totals(store.as_ref(), config.pipeline.bucket_len_ms, || bar.inc(1))
            .await
            .map_err(|e| failed("event store", e))?;
        compare_live(live.as_ref(), &totals, &mut live_totals_finding).await;
        if args.repair && live_totals_finding.count > 0 {
            live.set_totals(&totals)
                .await
                .map_err(|e| failed("live backend", e))?;
            live_totals_finding.repaired = true;
        }
    }
    bar.finish_and_clear();

    let index = store
        .check_index(args.repair)
        .await
        .map_err(|e| failed("event store", e))?;
    let orphans = Finding {
        what: "duplicate-index rows without their event",
        count: index.orphans,
        examples: index.examples,
        repaired: args.repair && index.orphans > 0,
    };
    let _ = store.close().await;

    let findings = vec![
        unregistered,
        misfiled,
        rollups,
        live_totals_finding,
        orphans,
    ];
    for f in &findings {
        match f.count {
            0 => eprintln!("ok    {}", f.what),
            n => eprintln!(
                "FOUND {}: {n}{} (e.g. {})",
                f.what,
                if f.repaired { ", repaired" } else { "" },
                f.examples.join("; ")
            ),
        }
    }
    if live.is_none() {
        eprintln!(
            "note  live figures are in process (no IOTPIPE_REDIS_URL): the server recomputes \
             them at start-up; not compared"
        );
    }
    let found: u64 = findings.iter().map(|f| f.count).sum();
    eprintln!(
        "checked {} devices and {} index rows in {:.1}s: {found} disagreements",
        devices.len(),
        index.rows,
        started.elapsed().as_secs_f64()
    );
    match found {
        0 => Ok(findings),
        n => Err(OpsError::Failed(format!(
            "check found {n} disagreements{}",
            if args.repair {
                " (repaired where possible; run it again)"
            } else {
                ""
            }
        ))),
    }
}

/// Compares a device's rollups with its raw events over sampled days.
async fn compare_rollups(
    store: &dyn EventStore,
    retention: Retention,
    (user, device): (UserId, DeviceId),
    sample_days: usize,
    finding: &mut Finding,
) -> Result<(), crate::store::StoreError> {
    let newest = store
        .list(ListQuery {
            user_id: user,
            device_id: device,
            from_ms: crate::model::MIN_TS_MS,
            to_ms: now_ms() + DAY_MS,
            before: None,
            kind: None,
            limit: 1,
        })
        .await?;
    let Some(newest) = newest.first() else {
        return Ok(());
    };
    let newest_day = bucket_start(newest.ts_ms, DAY_MS);
    let mut days = vec![newest_day];
    let mut rng = rand::rng();
    while days.len() < sample_days.max(1) {
        let day = newest_day - rng.random_range(1..=SAMPLE_SPAN_DAYS) * DAY_MS;
        if !days.contains(&day) {
            days.push(day);
        }
        if days.len() as i64 > SAMPLE_SPAN_DAYS {
            break;
        }
    }
    let now = now_ms();
    let cutoff = now - SETTLE_MS;
    // With retention tiers, raw events and each level expire at their own age: only
    // what both sides still show is compared.
    let raw_from = retention.first_visible(Tier::Raw, now).unwrap_or(i64::MIN);
    for day in days {
        let to = (day + DAY_MS).min(cutoff);
        if to <= day {
            continue;
        }
        let points = store
            .points(PointQuery {
                user_id: user,
                device_id: device,
                from_ms: day,
                to_ms: to,
                kind: None,
                metric: None,
                with_kind: false,
            })
            .await?;
        for level in [Level::Minute, Level::Hour, Level::Day] {
            // Whole intervals of the level only, still visible at both tiers.
            let end = bucket_start(to, level.ms());
            let visible = raw_from
                .max(
                    retention
                        .first_visible(Tier::Rollup(level), now)
                        .unwrap_or(i64::MIN),
                )
                .max(day);
            let start = match bucket_start(visible, level.ms()) {
                s if s < visible => s + level.ms(),
                s => s,
            };
            if end <= start {
                continue;
            }
            let mut raw: BTreeMap<i64, u64> = BTreeMap::new();
            for p in points.iter().filter(|p| (start..end).contains(&p.ts_ms)) {
                *raw.entry(bucket_start(p.ts_ms, level.ms())).or_default() += 1;
            }
            let rows = store
                .rollups(RollupQuery {
                    user_id: user,
                    device_id: device,
                    level,
                    from_ms: start,
                    to_ms: end,
                    metric: None,
                    kind: None,
                })
                .await?;
            let Some(rows) = rows else { continue };
            let mut kept: BTreeMap<i64, u64> = BTreeMap::new();
            for r in rows {
                *kept.entry(r.start_ms).or_default() += r.summary.count;
            }
            kept.retain(|_, n| *n > 0);
            for start in raw
                .keys()
                .chain(kept.keys())
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
            {
                let (e, k) = (
                    raw.get(&start).copied().unwrap_or(0),
                    kept.get(&start).copied().unwrap_or(0),
                );
                if e != k {
                    finding.add(|| {
                        format!(
                            "{device} {level:?} {}: rollups count {k}, events {e}",
                            crate::model::format_ms(start)
                        )
                    });
                }
            }
        }
    }
    Ok(())
}

/// Compares live device and user totals with the recomputed ones.
async fn compare_live(live: &dyn crate::live::Live, totals: &[LiveTotal], finding: &mut Finding) {
    let now = now_ms();
    let mut users: HashMap<UserId, u64> = HashMap::new();
    for t in totals {
        *users.entry(t.user_id).or_default() += t.events;
        let shown = live.device(t.device_id, now).await.events_total;
        if shown != t.events {
            finding.add(|| format!("device {}: live {shown}, stored {}", t.device_id, t.events));
        }
    }
    for (user, events) in users {
        let shown = live.user(user, now).await.events_total;
        if shown != events {
            finding.add(|| format!("user {user}: live {shown}, stored {events}"));
        }
    }
}
