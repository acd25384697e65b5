//! Reads: windowed aggregates and event listings, computed above the store trait so
//! that every backend shares the same semantics.
//!
//! - Windows start at multiples of the window length since the epoch, in UTC.
//! - The range is half-open, `[from, to)`; empty windows are left out.
//! - Scans fan out in parallel over chunks of the range that follow partition
//!   (bucket) boundaries, and the partial results are merged in time order.
//! - When the window is a whole number of minutes, the whole minutes of the range are
//!   read from the store's per-minute rollups (if it keeps them) and only the ragged
//!   edges are scanned event by event: each minute then falls in exactly one window.

pub mod latest;
pub mod routes;

use std::collections::BTreeMap;

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::model::{bucket_start, DeviceId, UserId, MIN_TS_MS};
use crate::store::{EventStore, Point, PointQuery, RollupQuery, StoreError, Summary, ROLLUP_MS};

/// Most windows one query may span.
pub const MAX_WINDOWS: i64 = 10_000;

/// How many chunks a device scan is split into, at most.
const SCAN_CHUNKS: i64 = 8;

/// How many scans run at once for one query.
const SCAN_CONCURRENCY: usize = 8;

/// A half-open time range `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
}

/// How far past now a query reads: no event is newer than now + 5 minutes.
pub const QUERY_AHEAD_MS: i64 = 86_400_000;

impl Range {
    /// `[from, to)` from a client, clamped to the instants events can have (2000-01-01
    /// to now + 1 day): what lies outside holds nothing, and every computation on the
    /// range then stays far from i64's limits.
    pub fn bounded(from_ms: i64, to_ms: i64, now_ms: i64) -> Range {
        let hi = now_ms.saturating_add(QUERY_AHEAD_MS).max(MIN_TS_MS);
        let from_ms = from_ms.clamp(MIN_TS_MS, hi);
        let to_ms = to_ms.clamp(MIN_TS_MS, hi).max(from_ms);
        Range { from_ms, to_ms }
    }

    pub fn is_empty(&self) -> bool {
        self.to_ms <= self.from_ms
    }

    /// `ceil((to - from) / window)`, the contract's window count; saturating, so that
    /// no range or window can wrap it below the limit.
    pub fn window_count(&self, window_ms: i64) -> i64 {
        if window_ms <= 0 {
            return i64::MAX;
        }
        let span = self.to_ms.saturating_sub(self.from_ms).max(0);
        span / window_ms + i64::from(span % window_ms != 0)
    }

    /// Splits the range into at most `n` consecutive chunks whose inner edges fall on
    /// bucket boundaries, so that no partition is scanned by two chunks.
    pub fn chunks(&self, bucket_len_ms: i64, n: i64) -> Vec<Range> {
        if self.is_empty() {
            return Vec::new();
        }
        let first = bucket_start(self.from_ms, bucket_len_ms);
        let last = bucket_start(self.to_ms - 1, bucket_len_ms);
        let buckets = (last - first) / bucket_len_ms + 1;
        let n = n.max(1);
        let per_chunk = (buckets + n - 1) / n;
        let mut out = Vec::new();
        let mut from = self.from_ms;
        let mut edge = first;
        while from < self.to_ms {
            edge += per_chunk * bucket_len_ms;
            let to = edge.min(self.to_ms);
            // Each chunk ends past its start (edge > from: the first edge is a whole
            // bucket past the bucket holding `from`), so the loop always advances.
            debug_assert!(to > from);
            out.push(Range {
                from_ms: from,
                to_ms: to,
            });
            from = to;
        }
        out
    }
}

/// One non-empty window of a device aggregate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    pub start_ms: i64,
    pub stats: Summary,
}

/// Accumulates points into aligned windows, indexed directly: a query spans at most
/// [`MAX_WINDOWS`] (+1 for alignment) windows, so a flat vector beats a map.
#[derive(Debug)]
pub struct Windows {
    origin_ms: i64,
    window_ms: i64,
    stats: Vec<Summary>,
}

impl Windows {
    pub fn new(range: Range, window_ms: i64) -> Self {
        let origin_ms = bucket_start(range.from_ms, window_ms);
        let n = if range.is_empty() {
            0
        } else {
            let last = bucket_start(range.to_ms - 1, window_ms);
            usize::try_from((last - origin_ms) / window_ms + 1).unwrap_or(0)
        };
        Self {
            origin_ms,
            window_ms,
            stats: vec![Summary::EMPTY; n],
        }
    }

    pub fn add(&mut self, ts_ms: i64, value: Option<f64>) {
        if let Some(s) = self.slot(ts_ms) {
            s.add(value);
        }
    }

    /// Merges a summary of events that all fall in the window holding `ts_ms`.
    pub fn merge(&mut self, ts_ms: i64, summary: &Summary) {
        if let Some(s) = self.slot(ts_ms) {
            s.merge(summary);
        }
    }

    fn slot(&mut self, ts_ms: i64) -> Option<&mut Summary> {
        let i = (ts_ms - self.origin_ms).div_euclid(self.window_ms);
        usize::try_from(i).ok().and_then(|i| self.stats.get_mut(i))
    }

    /// The non-empty windows, in ascending order.
    pub fn finish(self) -> Vec<Window> {
        let (origin, w) = (self.origin_ms, self.window_ms);
        self.stats
            .into_iter()
            .enumerate()
            .filter(|(_, s)| s.count > 0)
            .map(|(i, stats)| Window {
                start_ms: origin + i as i64 * w,
                stats,
            })
            .collect()
    }
}

/// Scans one device's points over a range, in parallel chunks, in time order.
async fn device_points(
    store: &dyn EventStore,
    template: PointQuery,
    range: Range,
    bucket_len_ms: i64,
) -> Result<Vec<Vec<Point>>, StoreError> {
    let queries = range
        .chunks(bucket_len_ms, SCAN_CHUNKS)
        .into_iter()
        .map(|chunk| PointQuery {
            from_ms: chunk.from_ms,
            to_ms: chunk.to_ms,
            ..template.clone()
        });
    stream::iter(queries)
        .map(|q| store.points(q))
        .buffered(SCAN_CONCURRENCY)
        .try_collect()
        .await
}

/// How a range is read: event by event at the ragged edges, from rollups in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub raw: Vec<Range>,
    pub rollup: Option<Range>,
}

impl Plan {
    pub fn new(range: Range, window_ms: i64) -> Plan {
        let all_raw = Plan {
            raw: vec![range],
            rollup: None,
        };
        if window_ms % ROLLUP_MS != 0 {
            return all_raw;
        }
        let m0 = -bucket_start(-range.from_ms, ROLLUP_MS); // rounded up
        let m1 = bucket_start(range.to_ms, ROLLUP_MS);
        if m0 >= m1 {
            return all_raw;
        }
        let mut raw = Vec::new();
        if range.from_ms < m0 {
            raw.push(Range {
                from_ms: range.from_ms,
                to_ms: m0,
            });
        }
        if m1 < range.to_ms {
            raw.push(Range {
                from_ms: m1,
                to_ms: range.to_ms,
            });
        }
        Plan {
            raw,
            rollup: Some(Range {
                from_ms: m0,
                to_ms: m1,
            }),
        }
    }
}

/// Reads the rollups of the plan's middle part. If the store keeps none, that part is
/// moved to the raw ranges instead.
async fn read_rollups(
    store: &dyn EventStore,
    plan: &mut Plan,
    query: impl FnOnce(Range) -> RollupQuery,
) -> Result<Vec<crate::store::Rollup>, StoreError> {
    let Some(middle) = plan.rollup.take() else {
        return Ok(Vec::new());
    };
    match store.rollups(query(middle)).await? {
        Some(rows) => Ok(rows),
        None => {
            plan.raw.push(middle);
            Ok(Vec::new())
        }
    }
}

/// Whose data a query reads, and from where.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub store: &'a dyn EventStore,
    pub user_id: UserId,
    /// The store's partition bucket length, for splitting scans.
    pub bucket_len_ms: i64,
}

/// Filters for an aggregate.
#[derive(Debug, Clone, Default)]
pub struct AggregateFilter {
    pub metric: Option<String>,
    pub kind: Option<String>,
}

/// The windows of one device. With a metric, only events carrying it are counted and
/// its statistics are filled.
///
/// # Errors
///
/// A store failure.
pub async fn device_aggregate(
    store: Scope<'_>,
    device_id: DeviceId,
    range: Range,
    window_ms: i64,
    filter: AggregateFilter,
) -> Result<Vec<Window>, StoreError> {
    let Scope {
        store,
        user_id,
        bucket_len_ms,
    } = store;
    let mut windows = Windows::new(range, window_ms);
    let mut plan = Plan::new(range, window_ms);
    let rollups = read_rollups(store, &mut plan, |middle| RollupQuery {
        user_id,
        device_id,
        from_ms: middle.from_ms,
        to_ms: middle.to_ms,
        metric: filter.metric.clone(),
        kind: filter.kind.clone(),
    })
    .await?;
    for r in &rollups {
        windows.merge(r.minute_ms, &r.summary);
    }
    for part in plan.raw {
        let template = PointQuery {
            user_id,
            device_id,
            from_ms: part.from_ms,
            to_ms: part.to_ms,
            kind: filter.kind.clone(),
            metric: filter.metric.clone(),
            with_kind: false,
        };
        for chunk in device_points(store, template, part, bucket_len_ms).await? {
            for p in chunk {
                windows.add(p.ts_ms, p.value);
            }
        }
    }
    Ok(windows.finish())
}

/// What grouped aggregates group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Type,
    Device,
}

/// One (window, group) count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCount {
    pub start_ms: i64,
    pub group: String,
    pub count: u64,
}

/// Counts per window and group over several devices, sorted by window then group.
///
/// # Errors
///
/// A store failure.
pub async fn grouped_counts(
    store: Scope<'_>,
    devices: &[DeviceId],
    range: Range,
    window_ms: i64,
    group_by: GroupBy,
    kind: Option<String>,
) -> Result<Vec<GroupCount>, StoreError> {
    let Scope {
        store,
        user_id,
        bucket_len_ms,
    } = store;
    let per_device = stream::iter(devices.iter().copied())
        .map(|device_id| {
            let kind = kind.clone();
            async move {
                let mut plan = Plan::new(range, window_ms);
                let rollups = read_rollups(store, &mut plan, |middle| RollupQuery {
                    user_id,
                    device_id,
                    from_ms: middle.from_ms,
                    to_ms: middle.to_ms,
                    metric: None,
                    kind: kind.clone(),
                })
                .await?;
                let mut points = Vec::new();
                for part in plan.raw {
                    let template = PointQuery {
                        user_id,
                        device_id,
                        from_ms: part.from_ms,
                        to_ms: part.to_ms,
                        kind: kind.clone(),
                        metric: None,
                        with_kind: group_by == GroupBy::Type,
                    };
                    points.extend(device_points(store, template, part, bucket_len_ms).await?);
                }
                Ok::<_, StoreError>((device_id, rollups, points))
            }
        })
        .buffer_unordered(SCAN_CONCURRENCY / 2);
    let mut counts: BTreeMap<(i64, String), u64> = BTreeMap::new();
    let mut per_device = std::pin::pin!(per_device);
    while let Some((device_id, rollups, points)) = per_device.try_next().await? {
        let device_group = device_id.to_string();
        let group_of = |kind: Option<String>| match group_by {
            GroupBy::Device => device_group.clone(),
            GroupBy::Type => kind.unwrap_or_default(),
        };
        for r in rollups {
            let start = bucket_start(r.minute_ms, window_ms);
            *counts.entry((start, group_of(Some(r.kind)))).or_default() += r.summary.count;
        }
        for p in points.into_iter().flatten() {
            let start = bucket_start(p.ts_ms, window_ms);
            *counts.entry((start, group_of(p.kind))).or_default() += 1;
        }
    }
    Ok(counts
        .into_iter()
        .map(|((start_ms, group), count)| GroupCount {
            start_ms,
            group,
            count,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_count_rounds_up() {
        let r = Range {
            from_ms: 0,
            to_ms: 10_001,
        };
        assert_eq!(r.window_count(1000), 11);
        assert_eq!(
            Range {
                from_ms: 0,
                to_ms: 10_000
            }
            .window_count(1000),
            10
        );
    }

    #[test]
    fn chunks_cover_the_range_exactly_and_meet_on_bucket_edges() {
        let r = Range {
            from_ms: 1_500,
            to_ms: 25_250,
        };
        let chunks = r.chunks(1000, 8);
        assert!(chunks.len() <= 8);
        assert_eq!(chunks.first().unwrap().from_ms, 1_500);
        assert_eq!(chunks.last().unwrap().to_ms, 25_250);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].to_ms, pair[1].from_ms);
            assert_eq!(pair[0].to_ms % 1000, 0);
        }
        let one = Range {
            from_ms: 5,
            to_ms: 6,
        }
        .chunks(1000, 8);
        assert_eq!(
            one,
            vec![Range {
                from_ms: 5,
                to_ms: 6
            }]
        );
    }

    #[test]
    fn whole_minutes_go_to_rollups_and_ragged_edges_are_scanned() {
        let r = Range {
            from_ms: 90_000,
            to_ms: 400_500,
        };
        let p = Plan::new(r, 120_000);
        assert_eq!(
            p.rollup,
            Some(Range {
                from_ms: 120_000,
                to_ms: 360_000
            })
        );
        assert_eq!(
            p.raw,
            vec![
                Range {
                    from_ms: 90_000,
                    to_ms: 120_000
                },
                Range {
                    from_ms: 360_000,
                    to_ms: 400_500
                }
            ]
        );
        // Aligned ends: no raw part at all.
        let p = Plan::new(
            Range {
                from_ms: -60_000,
                to_ms: 60_000,
            },
            60_000,
        );
        assert_eq!(p.raw, vec![]);
        // Windows that are not whole minutes, or ranges inside one minute: all raw.
        assert_eq!(Plan::new(r, 90_000).rollup, None);
        assert_eq!(
            Plan::new(
                Range {
                    from_ms: 1,
                    to_ms: 59_000
                },
                60_000
            )
            .rollup,
            None
        );
    }

    #[test]
    fn windows_are_aligned_and_empty_ones_left_out() {
        let mut w = Windows::new(
            Range {
                from_ms: 1_500,
                to_ms: 10_000,
            },
            1000,
        );
        w.add(1_500, Some(2.0));
        w.add(1_999, Some(4.0));
        w.add(5_000, None);
        let out = w.finish();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].start_ms, 1_000);
        assert_eq!(out[0].stats.count, 2);
        assert_eq!((out[0].stats.min, out[0].stats.max), (2.0, 4.0));
        assert_eq!(out[0].stats.avg(), 3.0);
        assert_eq!(out[1].start_ms, 5_000);
    }

    proptest::proptest! {
        /// Whatever a client sends (any i64 for from, to, window and bucket), the range
        /// arithmetic neither overflows nor loops, and allocates within the limit.
        #[test]
        fn client_controlled_values_never_overflow_or_loop(
            from in proptest::num::i64::ANY,
            to in proptest::num::i64::ANY,
            window in 1..=i64::MAX,
            bucket in 1..=i64::MAX,
            n in proptest::num::i64::ANY,
        ) {
            let now = 1_800_000_000_000;
            let r = Range::bounded(from, to, now);
            proptest::prop_assert!(r.from_ms >= MIN_TS_MS && r.to_ms <= now + QUERY_AHEAD_MS);
            proptest::prop_assert!(r.from_ms <= r.to_ms);
            let count = r.window_count(window);
            proptest::prop_assert!(count >= 0);
            if count <= MAX_WINDOWS {
                let w = Windows::new(r, window);
                proptest::prop_assert!(w.stats.len() as i64 <= MAX_WINDOWS + 1);
            }
            let chunks = r.chunks(bucket, n.clamp(1, SCAN_CHUNKS));
            proptest::prop_assert!(chunks.len() as i64 <= SCAN_CHUNKS);
            let mut at = r.from_ms;
            for c in &chunks {
                proptest::prop_assert_eq!(c.from_ms, at);
                proptest::prop_assert!(c.to_ms > c.from_ms);
                at = c.to_ms;
            }
            if !r.is_empty() {
                proptest::prop_assert_eq!(at, r.to_ms);
            }
            let _ = Plan::new(r, window);
        }
    }
}
