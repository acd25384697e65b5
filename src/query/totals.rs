//! Live totals recomputed from the event store: for every device with stored
//! events, how many it has and the time of its newest, with the same reads as an
//! aggregate (so every backend answers exactly, rollups pending or not).

use futures::stream::{self, StreamExt, TryStreamExt};

use super::{device_aggregate, AggregateFilter, Grid, Range, Scope};
use crate::live::LiveTotal;
use crate::model::{now_ms, DeviceId, UserId, MIN_TS_MS};
use crate::store::{EventStore, ListQuery, StoreError};

/// Windows of a year: a device's whole history is a few dozen of them, each read
/// from day rows in its middle.
const WINDOW_MS: i64 = 366 * 86_400_000;

/// Devices read at once.
const FANOUT: usize = 8;

/// Every stored device's totals; `progress` is called once per device done.
///
/// # Errors
///
/// The store failed, or cannot list its devices.
pub async fn live_totals(
    store: &dyn EventStore,
    bucket_len_ms: i64,
    progress: impl Fn() + Send + Sync,
) -> Result<Vec<LiveTotal>, StoreError> {
    let devices = store.stored_devices().await?;
    let range = Range::bounded(MIN_TS_MS, i64::MAX, now_ms());
    let progress = &progress;
    stream::iter(devices)
        .map(|(user_id, device_id)| async move {
            let counts =
                counts_per_window(store, bucket_len_ms, (user_id, device_id), WINDOW_MS).await?;
            let newest = store
                .list(ListQuery {
                    user_id,
                    device_id,
                    from_ms: range.from_ms,
                    to_ms: range.to_ms,
                    before: None,
                    kind: None,
                    limit: 1,
                })
                .await?;
            progress();
            Ok::<_, StoreError>(LiveTotal {
                user_id,
                device_id,
                events: counts.iter().map(|&(_, n)| n).sum(),
                last_seen_ms: newest.first().map(|e| e.ts_ms),
            })
        })
        .buffer_unordered(FANOUT)
        .try_collect()
        .await
}

/// One device's events per UTC day over its whole history (days without events
/// left out), through the aggregate path: what `iotpipe transfer` compares between
/// a source and its target.
///
/// # Errors
///
/// The store failed.
pub async fn day_counts(
    store: &dyn EventStore,
    bucket_len_ms: i64,
    user_id: UserId,
    device_id: DeviceId,
) -> Result<std::collections::BTreeMap<i64, u64>, StoreError> {
    Ok(
        counts_per_window(store, bucket_len_ms, (user_id, device_id), 86_400_000)
            .await?
            .into_iter()
            .collect(),
    )
}

/// A device's event counts per UTC window of `window_ms` over its whole history,
/// windows without events left out, through the aggregate path.
async fn counts_per_window(
    store: &dyn EventStore,
    bucket_len_ms: i64,
    (user_id, device_id): (UserId, DeviceId),
    window_ms: i64,
) -> Result<Vec<(i64, u64)>, StoreError> {
    let range = Range::bounded(MIN_TS_MS, i64::MAX, now_ms());
    let scope = Scope {
        store,
        user_id,
        bucket_len_ms,
    };
    let filter = AggregateFilter {
        metric: None,
        kind: None,
        sketches: false,
    };
    let grid = Grid::utc(range, window_ms);
    let windows = device_aggregate(scope, device_id, grid, range, filter).await?;
    Ok(windows
        .into_iter()
        .filter(|w| w.stats.count > 0)
        .map(|w| (w.start_ms, w.stats.count))
        .collect())
}
