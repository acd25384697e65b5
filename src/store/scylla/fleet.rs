//! Fleet reads in the wide-column store: the event counts of every device of a user
//! per hour or day, in one partition of `fleet_by_type` per day (or 28 days), for
//! grouped aggregates (`group_by=device` or `type`) that would otherwise read each
//! device's rows.
//!
//! - **Written beside the count rows.** Each time a device's hour or day is summed
//!   again (`levels.rs`), its count rows (metric `""`) are also written here, one
//!   map cell per (type, device, interval), with the same count as write time: they
//!   are exact the same way. A row holds a type and device, not an interval, because
//!   Cassandra reads a few wide rows much faster than many narrow ones.
//! - **Totals for `group_by=device`.** Type `""` holds each device's count over all
//!   its types, written from the same sums (so it grows as they do, and is exact the
//!   same way). Rows are clustered by type first, so a read by device takes the one
//!   slice of totals, a read of one type that type's slice: Cassandra's cost is per
//!   cell read, and a fleet with two types costs half.
//! - **Pending days say which rows may lag.** A device's fleet row misses an
//!   acknowledged event while a minute of that hour is pending. Every day mark
//!   (`pending.rs`: the hour marks of a device's day opened together) has a row in
//!   `pending_by_user`, written before the events and deleted once every minute under
//!   it is recomputed at every level; that table is partitioned by user, so one slice
//!   names every (device, day) that may lag. A read takes every interval of those
//!   days from the device's own rows instead (`coarse_rollups`, down to the events of
//!   its pending minutes: one read per device), and the rest from the fleet rows.
//! - **Pending first.** As for one device: the markers are read before the rows, so an
//!   interval without a marker then has rows that hold everything acknowledged before.
//! - **The sweep** deletes the `pending_by_user` rows older than
//!   `store.rollup_sweep_after_secs` that no instance holds once their device has no
//!   pending minute in that day (after it has recomputed the marks a crashed writer
//!   left, deleting their rows in `pending_by_device`).

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt, TryStreamExt};
use uuid::Uuid;

use super::errors::{corrupt, pager_error, row_error};
use super::levels::ByType;
use super::pending::{device_row, hour_row, Ended, HourKey, DAY_MS, HOUR_MS, HOUR_SLAB_MS};
use super::rows::{
    ms, FleetIn, FleetOut, FleetPartitionIn, FleetTypeIn, PendingHourOut, PendingHourRangeIn,
    PendingHourRow, PendingRow,
};
use super::Inner;
use crate::model::{bucket_start, buckets_in, DeviceId, UserId};
use crate::store::{FleetCount, FleetQuery, Level, RollupQuery, StoreError};

/// Fleet rows of hours are partitioned by UTC day (24 rows per device and type), of
/// days by 28 days.
pub(super) fn fleet_slab_ms(level: Level) -> i64 {
    match level {
        Level::Day => 28 * DAY_MS,
        _ => DAY_MS,
    }
}

/// Partitions read at once.
const SLICES: usize = 4;

/// Lagging devices read from their own rows at once.
const STALE_FANOUT: usize = 16;

/// The type of the rows of `fleet_by_type` that hold each device's total over its
/// types; no event has it (a type has 1 to 64 characters).
const ALL_TYPES: &str = "";

/// The cell of `fleet_by_type` that holds a device's count of one type in the interval
/// of `level` starting at `start`.
fn fleet_cell(
    (user, device): (UserId, DeviceId),
    level: Level,
    start: i64,
    kind: &str,
    count: u64,
    ttl: i32,
) -> FleetIn<'_> {
    let slab = bucket_start(start, fleet_slab_ms(level));
    FleetIn {
        writetime: count as i64,
        ttl,
        // At most 27: a partition holds 24 hours or 28 days.
        index: ((start - slab) / level.ms()) as i32,
        count: count as i64,
        user_id: user,
        level: i32::from(level.tag()),
        slab: ms(slab),
        device_id: device,
        kind,
    }
}

impl Inner {
    /// The fleet rows of one device's hours or days (`start`, its sums by type and
    /// the rows' TTL), all in one fleet partition: its count rows, by type, and their
    /// total.
    pub(super) async fn write_fleet(
        &self,
        (user, device): (UserId, DeviceId),
        level: Level,
        intervals: &[(i64, ByType, i32)],
    ) -> Result<(), StoreError> {
        let rows: Vec<FleetIn<'_>> = intervals
            .iter()
            .flat_map(|(start, sums, ttl)| {
                let total = sums.values().map(|s| s.summary.count).sum();
                let by_type = sums
                    .iter()
                    .map(|(kind, s)| (kind.as_str(), s.summary.count));
                by_type
                    .chain([(ALL_TYPES, total)])
                    .map(move |(kind, count)| {
                        fleet_cell((user, device), level, *start, kind, count, *ttl)
                    })
            })
            .collect();
        self.write_rows(&self.cql.insert_fleet, &rows).await
    }

    /// Deletes the rows of ended marks: of hour marks whose minutes are all
    /// recomputed in `pending_by_device` per device, of day marks whose hours all
    /// ended in `pending_by_user` per user and slab.
    pub(super) async fn delete_marks(&self, ended: Ended) {
        let Ended {
            hours: mut marks,
            days,
        } = ended;
        marks.sort_unstable();
        let by_device: Vec<PendingRow> = marks.iter().map(|(k, m)| device_row(*k, *m)).collect();
        let by_user: Vec<PendingHourRow> = days.iter().map(|(k, m)| hour_row(*k, *m)).collect();
        futures::future::join(
            self.delete_grouped(&self.cql.delete_pending, &by_device, |r| {
                (r.user_id, r.device_id)
            }),
            self.delete_user_rows(by_user),
        )
        .await;
    }

    /// Deletes rows of `pending_by_user`, per partition.
    async fn delete_user_rows(&self, mut rows: Vec<PendingHourRow>) {
        rows.sort_unstable_by_key(|r| (r.user_id, r.slab.0));
        self.delete_grouped(&self.cql.delete_pending_hour, &rows, |r| {
            (r.user_id, r.slab.0)
        })
        .await;
    }

    /// Deletes `rows` (grouped by `partition`, adjacent) in unlogged batches, one
    /// partition each. A failure leaves the rows for the sweep.
    async fn delete_grouped<T, K>(
        &self,
        statement: &scylla::statement::prepared::PreparedStatement,
        rows: &[T],
        partition: impl Fn(&T) -> K,
    ) where
        T: scylla::serialize::row::SerializeRow + Sync,
        K: PartialEq,
    {
        let groups = rows.chunk_by(|a, b| partition(a) == partition(b));
        stream::iter(groups)
            .for_each_concurrent(SLICES, |rows| async move {
                if let Err(e) = self.write_rows(statement, rows).await {
                    tracing::warn!(error = %e, "pending marks not deleted; the sweep will");
                }
            })
            .await;
    }

    /// Deletes the rows by user made before `cutoff` that this instance does not hold
    /// and whose day has no pending minute left; returns how many old ones it found.
    pub(super) async fn sweep_hours(&self, cutoff: i64) -> Result<usize, StoreError> {
        // A mark that old is closed to new minutes (`pending.rs`), so the minutes it
        // covers are all marked by now.
        let old: Vec<PendingHourRow> = self
            .old_marks(
                &self.cql.scan_pending_hours,
                cutoff,
                |r: &PendingHourRow| {
                    let key = (r.user_id, r.device_id, r.hour.0);
                    (r.flush, self.recomputer.pending.holds_day(key, r.flush))
                },
            )
            .await?;
        let n = old.len();
        let done: Vec<PendingHourRow> = stream::iter(old)
            .map(|r| async move {
                // A row covers its whole day (`pending.rs`).
                let day = bucket_start(r.hour.0, DAY_MS);
                let pending = self
                    .pending_minutes(r.user_id, r.device_id, day, day + DAY_MS)
                    .await?;
                Ok::<_, StoreError>(pending.is_empty().then_some(r))
            })
            .buffer_unordered(STALE_FANOUT)
            .try_filter_map(|r| futures::future::ready(Ok(r)))
            .try_collect()
            .await?;
        if !done.is_empty() {
            tracing::info!(
                rows = done.len(),
                "rollup sweep: deleting rows by user left behind"
            );
        }
        self.delete_user_rows(done).await;
        Ok(n)
    }

    /// The (device, day) pairs of a user whose rows by user say a minute of that day
    /// may be pending, for the days that meet `[from, to)`.
    async fn pending_days(
        &self,
        user: UserId,
        from: i64,
        to: i64,
    ) -> Result<Vec<(DeviceId, i64)>, StoreError> {
        // A day mark's row is at its day's start, before `from` when the range starts
        // within the day; a slab holds whole days.
        let first_day = bucket_start(from, DAY_MS);
        let parts: Vec<Vec<(DeviceId, i64)>> =
            stream::iter(buckets_in(first_day, to, HOUR_SLAB_MS))
                .map(|(slab, lo, hi)| async move {
                    let slice = PendingHourRangeIn {
                        user_id: user,
                        slab: ms(slab),
                        from_hour: ms(lo),
                        to_hour: ms(hi),
                    };
                    self.rows::<PendingHourOut>(&self.cql.select_pending_hours, slice)
                        .await?
                        .map_ok(|r| (r.device_id, bucket_start(r.hour.0, DAY_MS)))
                        .try_collect()
                        .await
                })
                .buffered(SLICES)
                .try_collect()
                .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// The fleet rows of a user at one level in `[from, to)`, as written: the slice
    /// of each partition the range touches that the query needs (one type, the
    /// totals, or every type), with its cells outside the range left out.
    async fn fleet_rows(&self, q: &FleetQuery) -> Result<Vec<FleetCount>, StoreError> {
        let len = q.level.ms();
        let one_type = match (&q.kind, q.by_type) {
            (Some(kind), _) => Some(kind.as_str()),
            (None, false) => Some(ALL_TYPES),
            (None, true) => None,
        };
        let parts: Vec<Vec<FleetCount>> =
            stream::iter(buckets_in(q.from_ms, q.to_ms, fleet_slab_ms(q.level)))
                .map(|(slab, lo, hi)| async move {
                    let (user_id, level, slab_ts) = (q.user_id, i32::from(q.level.tag()), ms(slab));
                    let mut rows = match one_type {
                        Some(kind) => {
                            let slice = FleetTypeIn {
                                user_id,
                                level,
                                slab: slab_ts,
                                kind,
                            };
                            self.rows::<FleetOut>(&self.cql.select_fleet_type, slice)
                                .await?
                        }
                        None => {
                            let partition = FleetPartitionIn {
                                user_id,
                                level,
                                slab: slab_ts,
                            };
                            self.rows::<FleetOut>(&self.cql.select_fleet_types, partition)
                                .await?
                        }
                    };
                    let mut out = Vec::new();
                    while let Some(row) = rows.try_next().await? {
                        let FleetOut {
                            device_id,
                            kind,
                            counts,
                        } = row;
                        for (index, count) in counts.into_iter().flatten() {
                            let start_ms = slab + i64::from(index) * len;
                            if (lo..hi).contains(&start_ms) {
                                out.push(FleetCount {
                                    start_ms,
                                    device_id,
                                    kind: kind.clone(),
                                    count: count.max(0) as u64,
                                });
                            }
                        }
                    }
                    Ok::<_, StoreError>(out)
                })
                .buffered(SLICES)
                .try_collect()
                .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// Counts of every device of a user at one level: the fleet rows, except the
    /// intervals with a pending minute, which come from the device's own rows.
    pub(super) async fn fleet_counts(
        &self,
        q: &FleetQuery,
    ) -> Result<Option<Vec<FleetCount>>, StoreError> {
        if q.level == Level::Minute {
            return Ok(None);
        }
        if q.from_ms >= q.to_ms {
            return Ok(Some(Vec::new()));
        }
        let len = q.level.ms();
        // Every interval of a pending day lags (an hour or the day itself).
        let stale: BTreeSet<(DeviceId, i64)> = self
            .pending_days(q.user_id, q.from_ms, q.to_ms)
            .await?
            .into_iter()
            .flat_map(|(device, day)| {
                buckets_in(day, day + DAY_MS, len).map(move |(start, _, _)| (device, start))
            })
            .filter(|(_, start)| (q.from_ms..q.to_ms).contains(start))
            .collect();
        let mut out: Vec<FleetCount> = self
            .fleet_rows(q)
            .await?
            .into_iter()
            .filter(|r| !stale.contains(&(r.device_id, r.start_ms)))
            .collect();
        // One read per lagging device, over the span of its lagging intervals: after a
        // backfill every interval of every device may lag at once.
        let mut spans: BTreeMap<DeviceId, (i64, i64)> = BTreeMap::new();
        for (device, start) in &stale {
            let span = spans.entry(*device).or_insert((*start, *start));
            span.1 = span.1.max(*start);
        }
        let stale = &stale;
        let lagging: Vec<Vec<FleetCount>> = stream::iter(spans)
            .map(|(device, (first, last))| async move {
                let part = RollupQuery {
                    user_id: q.user_id,
                    device_id: device,
                    level: q.level,
                    from_ms: first,
                    to_ms: last + len,
                    metric: None,
                    kind: q.kind.clone(),
                };
                let rows = self.coarse_rollups(&part).await?;
                Ok::<_, StoreError>(
                    rows.into_iter()
                        .filter(|r| stale.contains(&(device, r.start_ms)))
                        .map(|r| FleetCount {
                            start_ms: r.start_ms,
                            device_id: device,
                            kind: r.kind,
                            count: r.summary.count,
                        })
                        .collect(),
                )
            })
            .buffer_unordered(STALE_FANOUT)
            .try_collect()
            .await?;
        out.extend(lagging.into_iter().flatten());
        Ok(Some(out))
    }
}

/// Fills `fleet_by_type`, `pending_by_device` and `pending_by_user` in a keyspace
/// written before them (`iotpipe migrate`): a fleet cell for every count row of
/// `rollups_coarse` and for each interval's total, and a mark for every row of the
/// older `pending_minutes` (the sweep recomputes and deletes it). Rewrites rather
/// than adds, so a build cut short is simply done again (at worst with a mark twice).
pub(super) async fn build(
    session: &scylla::client::session::Session,
    settings: &super::ScyllaSettings,
) -> Result<(), StoreError> {
    use super::errors::{exec_error, prepare_error};
    use super::pending::minute_offset;
    use super::rows::PendingAddIn;
    use super::statements::Cql;
    use crate::store::retention::Tier;
    use scylla::value::CqlTimestamp;

    const FANOUT: usize = 32;
    let ks = &settings.keyspace;
    let prepare = |cql: String| async move {
        let mut p = session.prepare(cql).await.map_err(prepare_error)?;
        p.set_is_idempotent(true);
        Ok::<_, StoreError>(p)
    };
    let insert_fleet = prepare(Cql::insert_fleet(ks)).await?;
    let insert_hour = prepare(Cql::insert_pending_hour(ks)).await?;
    type CountRow = (i64, Uuid, i32, String, CqlTimestamp, String, i64);
    let counts = session
        .query_iter(
            format!("SELECT user_id, device_id, level, metric, start, type, count FROM {ks}.rollups_coarse"),
            (),
        )
        .await
        .map_err(pager_error)?
        .rows_stream::<CountRow>()
        .map_err(corrupt)?
        .map_err(row_error)
        .try_filter(|r| futures::future::ready(r.3.is_empty()));
    let now = crate::model::now_ms();
    let write = |(user_id, device_id): (UserId, DeviceId),
                 level: i32,
                 start: i64,
                 kind: String,
                 count: i64| {
        let insert_fleet = &insert_fleet;
        async move {
            let level = match level {
                1 => Level::Hour,
                2 => Level::Day,
                other => return Err(StoreError::Corrupt(format!("rollup level {other}"))),
            };
            let ttl = (settings.retention)
                .ttl(Tier::Rollup(level), start, now)
                .cql();
            let count = count.max(0) as u64;
            let row = fleet_cell((user_id, device_id), level, start, &kind, count, ttl);
            session
                .execute_unpaged(insert_fleet, row)
                .await
                .map_err(exec_error)?;
            Ok::<_, StoreError>(())
        }
    };
    // A partition's count rows come in clustering order, so the types of one interval
    // are adjacent: each run's total is written as it ends, without holding the
    // keyspace's intervals in memory.
    type Interval = (UserId, DeviceId, i32, i64);
    let total = |((user, device, level, start), n): (Interval, i64)| {
        write((user, device), level, start, ALL_TYPES.to_owned(), n)
    };
    let mut counts = std::pin::pin!(counts);
    let mut writes = stream::FuturesUnordered::new();
    let mut run: Option<(Interval, i64)> = None;
    while let Some((user_id, device_id, level, _, start, kind, count)) = counts.try_next().await? {
        let key = (user_id, device_id, level, start.0);
        if let Some(ended) = run.take_if(|(k, _)| *k != key) {
            writes.push(total(ended));
        }
        run.get_or_insert((key, 0)).1 += count;
        writes.push(write((user_id, device_id), level, start.0, kind, count));
        while writes.len() >= FANOUT {
            writes.try_next().await?;
        }
    }
    if let Some(ended) = run {
        writes.push(total(ended));
    }
    while writes.try_next().await?.is_some() {}
    // Marks of the table before `pending_by_device` (one row per minute), if the
    // keyspace has it: each becomes a mark of its own, which the sweep recomputes.
    let old_marks = super::schema::answers_rows(
        session,
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? \
         AND table_name = 'pending_minutes'",
        (ks.as_str(),),
    )
    .await?;
    if !old_marks {
        return Ok(());
    }
    let add = prepare(Cql::insert_pending(ks)).await?;
    // Rows of one old flush in one hour become one mark with that flush id: its time
    // is when the minutes were marked, so the sweep sees them as old as they are, and
    // a build done again rewrites the same rows. Old marks live for seconds, so there
    // are few of them.
    let mut marks: BTreeMap<(HourKey, Uuid), Vec<i32>> = BTreeMap::new();
    let mut rows = session
        .query_iter(
            format!("SELECT user_id, device_id, minute, flush FROM {ks}.pending_minutes"),
            (),
        )
        .await
        .map_err(pager_error)?
        .rows_stream::<(i64, Uuid, CqlTimestamp, Uuid)>()
        .map_err(corrupt)?
        .map_err(row_error);
    while let Some((user, device, minute, flush)) = rows.try_next().await? {
        let key = (user, device, bucket_start(minute.0, HOUR_MS));
        (marks.entry((key, flush)).or_default()).push(minute_offset(minute.0));
    }
    stream::iter(marks)
        .map(|((key, flush), minutes)| {
            let (insert_hour, add) = (&insert_hour, &add);
            async move {
                let row = device_row(key, flush);
                let minutes = PendingAddIn {
                    minutes,
                    user_id: row.user_id,
                    device_id: row.device_id,
                    hour: row.hour,
                    flush: row.flush,
                };
                session
                    .execute_unpaged(add, minutes)
                    .await
                    .map_err(exec_error)?;
                session
                    .execute_unpaged(insert_hour, hour_row(key, flush))
                    .await
                    .map_err(exec_error)?;
                Ok::<_, StoreError>(())
            }
        })
        .buffer_unordered(FANOUT)
        .try_collect::<()>()
        .await
}
