//! `iotpipe transfer --to <settings file>`: the registry and every event from the
//! configured backends to the ones of another settings file (embedded to MySQL +
//! Cassandra, or back).
//!
//! Order, and why:
//! 1. Both sides are opened, and the target is checked before anything is written
//!    (`transfer_target.rs`): reachable, and empty or holding only a part of this
//!    very source (an earlier, interrupted run). Its schema is applied first, as
//!    `iotpipe migrate` would; that writes no data.
//! 2. The events, device by device, through the target store's own write path, so
//!    its duplicate index and rollups (every level) are built as for ingest. Each
//!    event keeps its id, so writing it twice stores it once: a device whose copy
//!    was cut short is copied again whole, and a device whose day counts already
//!    match is skipped. That is what makes the command resumable without a state
//!    file. Throughput is capped (`--max-events-per-sec`) so that a live source keeps
//!    serving.
//! 3. Every device's events per UTC day are compared between source and target
//!    through the aggregate path (rollups where the store has them).
//! 4. Only then the registry, in one transaction: until it is there nobody can
//!    authenticate against the target, so an interrupted transfer never leaves a
//!    target that looks complete. Then the target's Redis live totals, if it has
//!    Redis.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::transfer_target::{check_target, Sides};
use super::{progress, OpsError};
use crate::config::Config;
use crate::model::{now_ms, DeviceId, PartitionBatch, Record, UserId, MIN_TS_MS, QUERY_AHEAD_MS};
use crate::query::totals::{day_counts, live_totals};
use crate::store::retention::{Retention, Tier};
use crate::store::{ListQuery, Position, SharedStore};

const DAY_MS: i64 = 86_400_000;

/// Events read from the source per page.
const PAGE_EVENTS: usize = 1_000;

#[derive(Debug, Clone)]
pub struct TransferArgs {
    pub to: PathBuf,
    /// 0: no cap.
    pub max_events_per_sec: u64,
}

/// What a finished transfer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferSummary {
    pub users: u64,
    pub devices: u64,
    /// Devices whose events were already all on the target.
    pub skipped: u64,
    pub events_copied: u64,
    pub events_verified: u64,
}

fn failed(what: &str, e: impl std::fmt::Display) -> OpsError {
    OpsError::Failed(format!("{what}: {e}"))
}

/// Runs the transfer.
///
/// # Errors
///
/// An unreachable or foreign target (before anything is written), a backend
/// failing, or counts that differ at the end (the registry is then not copied).
pub async fn run(config: &Config, args: &TransferArgs) -> Result<TransferSummary, OpsError> {
    let started = Instant::now();
    let target_config = Config::load(Some(&args.to), |_| None)
        .map_err(|e| failed(&format!("--to {}", args.to.display()), e))?;
    let sides = check_target(config, &target_config).await?;
    let Sides {
        source,
        target,
        source_registry,
        target_registry,
        registry,
        devices,
    } = sides;
    let bucket_src = config.pipeline.bucket_len_ms;
    let bucket_dst = target_config.pipeline.bucket_len_ms;

    // 2. The events.
    let mut summary = TransferSummary::default();
    // Only raw events are copied: with a raw retention tier, days whose events have
    // expired at the source (its rollups may keep them) are not compared.
    let first_day = match Retention::from_config(config).first_visible(Tier::Raw, now_ms()) {
        Some(first) => (first + DAY_MS - 1).div_euclid(DAY_MS) * DAY_MS,
        None => i64::MIN,
    };
    let day_counts = |store: &'_ SharedStore, bucket: i64, user: UserId, device: DeviceId| {
        let store = store.clone();
        async move {
            let mut days = day_counts(store.as_ref(), bucket, user, device).await?;
            days.retain(|day, _| *day >= first_day);
            Ok::<_, crate::store::StoreError>(days)
        }
    };
    let mut expected: BTreeMap<(UserId, DeviceId), BTreeMap<i64, u64>> = BTreeMap::new();
    for &(user, device) in &devices {
        let counts = day_counts(&source, bucket_src, user, device)
            .await
            .map_err(|e| failed("source store", e))?;
        expected.insert((user, device), counts);
    }
    let total: u64 = expected.values().flat_map(|d| d.values()).sum();
    let bar = progress::bar(Some(total), "events");
    let throttle = Throttle::new(args.max_events_per_sec);
    for (&(user, device), want) in &expected {
        let have = day_counts(&target, bucket_dst, user, device)
            .await
            .map_err(|e| failed("target store", e))?;
        let events: u64 = want.values().sum();
        if &have == want {
            summary.skipped += 1;
            bar.inc(events);
            continue;
        }
        let mut before: Option<Position> = None;
        loop {
            let page = source
                .list(ListQuery {
                    user_id: user,
                    device_id: device,
                    from_ms: MIN_TS_MS,
                    to_ms: now_ms() + QUERY_AHEAD_MS,
                    before,
                    kind: None,
                    limit: PAGE_EVENTS,
                })
                .await
                .map_err(|e| failed("source store", e))?;
            let n = page.len();
            before = page.last().map(Position::of);
            let mut partitions: BTreeMap<i64, PartitionBatch> = BTreeMap::new();
            for mut event in page {
                // Every id is checked against the target's index: a second copy of an
                // event is then a duplicate, never a second row or count.
                event.id_assigned = false;
                let record = Record {
                    user_id: user,
                    device_id: device,
                    // The read API keeps no receipt time; live figures are rebuilt.
                    received_ms: event.ts_ms,
                    event,
                };
                let key = crate::model::PartitionKey::of(&record, bucket_dst);
                partitions
                    .entry(key.bucket_ms)
                    .or_insert_with(|| PartitionBatch {
                        key,
                        records: Vec::new(),
                    })
                    .records
                    .push(record);
            }
            if !partitions.is_empty() {
                let batches = Arc::new(partitions.into_values().collect::<Vec<_>>());
                target
                    .write(batches)
                    .await
                    .map_err(|e| failed("target store", e))?;
            }
            summary.events_copied += n as u64;
            bar.inc(n as u64);
            throttle.wait(summary.events_copied).await;
            if n < PAGE_EVENTS {
                break;
            }
        }
    }
    bar.finish_and_clear();

    // 3. Verify.
    for (&(user, device), want) in &expected {
        let have = day_counts(&target, bucket_dst, user, device)
            .await
            .map_err(|e| failed("target store", e))?;
        if &have != want {
            let (w, h): (u64, u64) = (want.values().sum(), have.values().sum());
            return Err(OpsError::Failed(format!(
                "device {device}: the source holds {w} events, the target {h} (or other days); \
                 the registry was not copied, so the target is not usable: run the transfer again"
            )));
        }
        summary.events_verified += want.values().sum::<u64>();
    }
    summary.devices = expected.len() as u64;

    // 4. The registry, then live totals.
    target_registry
        .load(&registry)
        .await
        .map_err(|e| failed("target registry", e))?;
    let loaded = target_registry
        .dump()
        .await
        .map_err(|e| failed("target registry", e))?;
    if loaded != registry {
        return Err(OpsError::Failed(
            "the target registry differs from the source's after loading it".to_owned(),
        ));
    }
    summary.users = registry.users.len() as u64;
    if target_config.live.redis_url.is_some() {
        let (live, _) = crate::topology::open_live(&target_config)?;
        let totals = live_totals(target.as_ref(), bucket_dst, || {})
            .await
            .map_err(|e| failed("target store", e))?;
        live.set_totals(&totals)
            .await
            .map_err(|e| failed("target live backend", e))?;
    }
    // Closing the target waits for its rollup recomputations (Cassandra).
    target
        .close()
        .await
        .map_err(|e| failed("target store", e))?;
    let _ = source.close().await;
    drop(source_registry);
    eprintln!(
        "transfer complete: {} users, {} registry devices, {} devices with events ({} already \
         there), {} events copied, {} verified per device and day, in {:.1}s",
        summary.users,
        registry.devices.len(),
        summary.devices,
        summary.skipped,
        summary.events_copied,
        summary.events_verified,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

/// Keeps the copy under a rate, averaged since the start.
struct Throttle {
    per_sec: u64,
    started: Instant,
}

impl Throttle {
    fn new(per_sec: u64) -> Self {
        Self {
            per_sec,
            started: Instant::now(),
        }
    }

    async fn wait(&self, done: u64) {
        if self.per_sec == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done as f64 / self.per_sec as f64);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            tokio::time::sleep(ahead).await;
        }
    }
}
