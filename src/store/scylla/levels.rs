//! Hours and days in the wide-column store, exact without coordination, like the
//! minutes (`rollup.rs`).
//!
//! - **Summed from the finer level, not incremented.** Once a minute's rows are
//!   written, its hour is summed again from that hour's minute rows, then its day
//!   from that day's hour rows, for the metrics the minute carries (an hour row of a
//!   metric depends only on that metric's minute rows).
//! - **The larger count wins**, as for minutes: each row is written `USING TIMESTAMP`
//!   its count. Every recomputation writes its own minute before it reads the hour's
//!   minutes, so of two concurrent ones the one that reads last sees both minutes as
//!   written; finer rows only grow, so it has the larger count, and its row wins
//!   whatever order the writes arrive in. The same holds one level up.
//! - **Pending minutes make their hour and day pending too.** A minute's mark is
//!   deleted only after its hour and day are written, so a query reads an hour or a
//!   day from its row only when no minute inside is pending, and otherwise sums it
//!   from the finer levels (down to the events of the pending minutes). One slice of
//!   the device's `pending_by_device` partition tells which.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

use super::errors::exec_error;
use super::minutes::MinuteSummaries;
use super::pending::{MinuteKey, DAY_MS, HOUR_MS};
use super::rows::{
    ms, sketch_column, CoarseIn, CoarseOut, CoarseSliceIn, PendingOut, PendingRangeIn,
};
use super::sparse::WholeHours;
use super::Inner;
use crate::model::{bucket_start, buckets_in, now_ms, DeviceId, UserId};
use crate::store::retention::Tier;
use crate::store::rollup::Stats;
use crate::store::{Level, Rollup, RollupQuery, StoreError};

/// Hour rows are partitioned by 28 days (672 hours of a metric), day rows by 3,640
/// days: both multiples of a day, so a day's hours lie in one partition.
pub(super) fn slab_ms(level: Level) -> i64 {
    match level {
        Level::Day => 3_640 * DAY_MS,
        _ => 28 * DAY_MS,
    }
}

/// Intervals recomputed at once.
const FANOUT: usize = 16;

/// Coarse rows per unlogged batch (all in one partition).
const BATCH_ROWS: usize = 64;

/// Summaries by type.
pub(super) type ByType = BTreeMap<String, Stats>;

/// One metric's summaries of an hour read whole (`sparse.rs`), by type.
fn of_metric(hour: &MinuteSummaries, metric: &str) -> ByType {
    (hour.iter())
        .filter(|((m, _), _)| m == metric)
        .map(|((_, kind), stats)| (kind.clone(), stats.clone()))
        .collect()
}

/// Sums rows by type.
fn by_type(rows: Vec<Rollup>) -> ByType {
    let mut sums = ByType::new();
    for r in rows {
        sums.entry(r.kind).or_default().merge(&Stats {
            summary: r.summary,
            sketch: r.sketch,
        });
    }
    sums
}

impl Inner {
    /// Recomputes the hours, then the days, of freshly recomputed minutes, for the
    /// metrics each carries. Returns the minutes whose hour or day failed: their
    /// markers must stay for the sweep.
    ///
    /// The due hours of one device and day are recomputed together, every metric at
    /// once: one slice of the finer rows per metric, one of the sparse minutes'
    /// events (`sparse.rs`), one batch of hour rows, one of fleet rows. A fleet device
    /// sending once a minute makes every hour of its day due at once, and one request
    /// per hour was most of the cost of catching up.
    pub(super) async fn recompute_levels(
        &self,
        minutes: &[(MinuteKey, BTreeSet<String>)],
        whole: &WholeHours,
    ) -> HashSet<MinuteKey> {
        let mut failed = HashSet::new();
        for level in [Level::Hour, Level::Day] {
            // Hours are grouped by day (one partition of minute rows, of hour rows
            // and of fleet rows); days one at a time (a device's days are few).
            let group_ms = match level {
                Level::Hour => DAY_MS,
                _ => level.ms(),
            };
            // (user, device, group) -> the metrics of its due minutes, and by interval
            // start the minutes that wait on it.
            type Due = (BTreeSet<String>, BTreeMap<i64, Vec<MinuteKey>>);
            let mut work = BTreeMap::<(UserId, DeviceId, i64), Due>::new();
            for (key, metrics) in minutes {
                let (user, device, minute) = *key;
                let (all, due) = work
                    .entry((user, device, bucket_start(minute, group_ms)))
                    .or_default();
                all.extend(metrics.iter().cloned());
                (due.entry(bucket_start(minute, level.ms())).or_default()).push(*key);
            }
            let results: Vec<_> = stream::iter(work)
                .map(|((user, device, _), (metrics, due))| async move {
                    let starts: Vec<i64> = due.keys().copied().collect();
                    let device = (user, device);
                    let r =
                        (self.recompute_intervals(device, level, &starts, &metrics, whole)).await;
                    (r, due)
                })
                .buffer_unordered(FANOUT)
                .collect()
                .await;
            for (r, due) in results {
                if let Err(e) = r {
                    tracing::warn!(error = %e, ?level, "rollup recomputation failed; left pending");
                    failed.extend(due.into_values().flatten());
                }
            }
        }
        failed
    }

    /// Sums the intervals of `level` starting at `starts` (ascending, all in one
    /// partition of the level's rows and of the fleet rows) from the finer level, for
    /// each of `metrics`, and writes them. Hours in `whole` are taken from there.
    async fn recompute_intervals(
        &self,
        (user, device): (UserId, DeviceId),
        level: Level,
        starts: &[i64],
        metrics: &BTreeSet<String>,
        whole: &WholeHours,
    ) -> Result<(), StoreError> {
        let (Some(&first), Some(&last)) = (starts.first(), starts.last()) else {
            return Ok(());
        };
        let to = last + level.ms();
        let metrics: Vec<&str> = metrics.iter().map(String::as_str).collect();
        // An hour, not a day that starts with it.
        let read_whole = |start: i64| match level {
            Level::Hour => whole.get(&(user, device, start)),
            _ => None,
        };
        let finer: Vec<Vec<Rollup>> = match level {
            Level::Day => {
                let hours = metrics
                    .iter()
                    .map(|m| self.stored_rows(user, device, Level::Hour, m, first, to));
                futures::future::try_join_all(hours).await?
            }
            _ => {
                // Only the due hours' minutes: a sparse one is read from its events.
                let due: HashSet<i64> = (starts.iter().copied())
                    .filter(|h| read_whole(*h).is_none())
                    .collect();
                let wanted = |m| due.contains(&bucket_start(m, level.ms()));
                let none = BTreeSet::new();
                if due.is_empty() {
                    vec![Vec::new(); metrics.len()]
                } else {
                    (self.minutes((user, device), &metrics, (first, to), &none, wanted)).await?
                }
            }
        };
        let now = now_ms();
        let ttl = |start: i64| {
            (self.settings.retention)
                .ttl(Tier::Rollup(level), start, now)
                .cql()
        };
        let sums: Vec<Vec<(i64, ByType, i32)>> = (metrics.iter().zip(finer))
            .map(|(metric, rows)| {
                let mut by_interval: BTreeMap<i64, Vec<Rollup>> = BTreeMap::new();
                for row in rows {
                    let start = bucket_start(row.start_ms, level.ms());
                    by_interval.entry(start).or_default().push(row);
                }
                // Rows between two due intervals were read too; only the due ones are
                // summed.
                (starts.iter())
                    .map(|&start| {
                        let sums = match read_whole(start) {
                            Some(hour) => of_metric(hour, metric),
                            None => by_type(by_interval.remove(&start).unwrap_or_default()),
                        };
                        (start, sums, ttl(start))
                    })
                    .collect()
            })
            .collect();
        let rows: Vec<CoarseIn<'_>> = metrics
            .iter()
            .zip(&sums)
            .flat_map(|(metric, sums)| sums.iter().map(move |s| (*metric, s)))
            .flat_map(|(metric, (start, sums, ttl))| {
                let slab = ms(bucket_start(*start, slab_ms(level)));
                sums.iter().map(move |(kind, stats)| CoarseIn {
                    user_id: user,
                    device_id: device,
                    level: i32::from(level.tag()),
                    slab,
                    metric,
                    start: ms(*start),
                    kind,
                    count: stats.summary.count as i64,
                    min: stats.summary.min,
                    max: stats.summary.max,
                    sum: stats.summary.sum,
                    sketch: sketch_column(stats),
                    writetime: stats.summary.count as i64,
                    ttl: *ttl,
                })
            })
            .collect();
        let coarse = self.write_rows(&self.cql.insert_coarse, &rows);
        // Counts also go to the user's fleet rows (`fleet.rs`).
        match metrics.iter().position(|m| m.is_empty()) {
            Some(i) => {
                let fleet = self.write_fleet((user, device), level, &sums[i]);
                futures::future::try_join(coarse, fleet).await?;
                Ok(())
            }
            None => coarse.await,
        }
    }

    /// Writes rows of one partition with one statement, in unlogged batches of at
    /// most [`BATCH_ROWS`]. Every statement batched here is idempotent (a rollup's
    /// write time is its count; markers are inserted or deleted by their whole key),
    /// so a batch may be retried.
    pub(super) async fn write_rows<T: SerializeRow>(
        &self,
        statement: &PreparedStatement,
        rows: &[T],
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(BATCH_ROWS) {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in chunk {
                batch.append_statement(statement.clone());
            }
            batch.set_is_idempotent(true);
            let _p = self.permit().await;
            self.session
                .batch(&batch, chunk)
                .await
                .map_err(exec_error)?;
        }
        Ok(())
    }

    /// Writes `rows` with one statement in unlogged batches per partition (`partition`
    /// names a row's; rows of one partition must be adjacent), the partitions
    /// concurrently.
    pub(super) async fn write_grouped<T: SerializeRow, K: PartialEq>(
        &self,
        statement: &PreparedStatement,
        rows: &[T],
        partition: impl Fn(&T) -> K,
    ) -> Result<(), StoreError> {
        let groups = rows.chunk_by(|a, b| partition(a) == partition(b));
        futures::future::try_join_all(groups.map(|rows| self.write_rows(statement, rows))).await?;
        Ok(())
    }

    /// One device's stored hour or day rows of one metric in `[from, to)`, as
    /// written, whether or not they are complete (minutes: `Inner::minutes`).
    pub(super) async fn stored_rows(
        &self,
        user: UserId,
        device: DeviceId,
        level: Level,
        metric: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let parts: Vec<Vec<Rollup>> = stream::iter(buckets_in(from, to, slab_ms(level)))
            .map(|(slab, lo, hi)| async move {
                let slice = CoarseSliceIn {
                    user_id: user,
                    device_id: device,
                    level: i32::from(level.tag()),
                    slab: ms(slab),
                    metric,
                    from_start: ms(lo),
                    to_start: ms(hi),
                };
                self.rollup_rows::<CoarseOut>(&self.cql.select_coarse, slice)
                    .await
            })
            .buffered(4)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// The pending minutes of a device in `[from, to)`: one slice of its partition
    /// (the marks of the hours that overlap the range).
    pub(super) async fn pending_minutes(
        &self,
        user: UserId,
        device: DeviceId,
        from: i64,
        to: i64,
    ) -> Result<BTreeSet<i64>, StoreError> {
        let range = PendingRangeIn {
            user_id: user,
            device_id: device,
            from_hour: ms(bucket_start(from, HOUR_MS)),
            to_hour: ms(to),
        };
        let marks: Vec<PendingOut> = self.all_rows(&self.cql.select_pending, range).await?;
        Ok(marks
            .into_iter()
            .flat_map(|m| {
                let hour = m.hour.0;
                m.minutes
                    .unwrap_or_default()
                    .into_iter()
                    .map(move |offset| hour + i64::from(offset) * Level::Minute.ms())
            })
            .filter(|minute| (from..to).contains(minute))
            .collect())
    }

    /// Hours or days for a query: from their rows, except those holding a pending
    /// minute, which are summed from the finer levels.
    pub(super) async fn coarse_rollups(&self, q: &RollupQuery) -> Result<Vec<Rollup>, StoreError> {
        let len = q.level.ms();
        // Pending first: an interval with no pending minute now has rows that hold
        // every event acknowledged before (its markers went only after its rows).
        let stale: BTreeSet<i64> = self
            .pending_minutes(q.user_id, q.device_id, q.from_ms, q.to_ms)
            .await?
            .into_iter()
            .map(|m| bucket_start(m, len))
            .collect();
        let metric = q.metric.as_deref().unwrap_or("");
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        let mut out: Vec<Rollup> = self
            .stored_rows(q.user_id, q.device_id, q.level, metric, q.from_ms, q.to_ms)
            .await?
            .into_iter()
            .filter(|r| !stale.contains(&r.start_ms) && kind_ok(&r.kind))
            .collect();
        let finer = match q.level {
            Level::Day => Level::Hour,
            _ => Level::Minute,
        };
        for start in stale {
            let part = RollupQuery {
                level: finer,
                from_ms: start,
                to_ms: start + len,
                ..q.clone()
            };
            let rows = Box::pin(self.rollups(&part)).await?.unwrap_or_default();
            out.extend(by_type(rows).into_iter().map(|(kind, s)| Rollup {
                start_ms: start,
                kind,
                summary: s.summary,
                sketch: s.sketch,
            }));
        }
        out.sort_by(|a, b| (a.start_ms, &a.kind).cmp(&(b.start_ms, &b.kind)));
        Ok(out)
    }
}
