//! Per-minute rollups in the wide-column store, exact without coordination.
//!
//! A rollup row can be wrong in three ways: a duplicate or a redelivered event counted
//! twice; two writers (two instances, each with part of one device's minute, as `$share`
//! delivers it) overwriting each other's read-modify-write; a writer that crashed after
//! its events and before their rollup. Counter columns cannot hold min and max, and
//! lightweight transactions cost a Paxos round per row. Instead:
//!
//! - **Recomputed, not incremented.** A minute's rows are always computed from that
//!   minute's stored events (one slice of one partition), so they count what is
//!   stored, once, however often an event was sent.
//! - **The larger count wins.** Each row is written `USING TIMESTAMP <its count>`.
//!   The events of a minute only ever grow, and each recomputation reads after its own
//!   writer's events are durable, so the sets of events two recomputations saw are
//!   nested (single-partition reads and writes are linearizable at the configured
//!   consistency: a quorum, or one replica). The one with more events is the newer
//!   truth, and Cassandra's last-write-wins keeps exactly it, whatever order the two
//!   writes arrive in; equal counts mean equal sets. The recomputation that read last
//!   saw every event, so the row that wins is exact.
//! - **Pending minutes.** Before writing its events a flush marks their minutes in
//!   `pending_minutes` (or joins its instance's mark of them, `pending.rs`); a
//!   recomputation that read after every joined flush's events deletes the mark once
//!   its rollups are written.
//!   Aggregates read pending minutes from the events instead of the rollups, so an
//!   acknowledged event is in every aggregate at once; the rollups merely catch up.
//!   A writer that crashes leaves its rows behind, and the sweep recomputes them.
//!
//! Recomputation runs after the flush is acknowledged, in one background task per
//! store. A minute is recomputed once no flush has touched it for a second (at the
//! latest thirty seconds after the first): a busy device's current minute is then read
//! about once, not once per flush, which would make a minute's cost grow with the
//! square of its events. Meanwhile queries read it from its events, at most a minute
//! of one device.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use uuid::Uuid;

use super::errors::{corrupt, pager_error, row_error};
use super::levels::rollup_of;
use super::pending::{marker_row, MinuteKey, Pending, DAY_MS};
use super::rows::{ms, MetricOut, PendingRow, RollupIn, RollupOut, RollupSliceIn, SliceIn};
use super::Inner;
use crate::model::{assigned_id_ts, bucket_start, now_ms, DeviceId, UserId};
use crate::store::retention::Tier;
use crate::store::rollup::Stats;
use crate::store::{Level, Rollup, RollupQuery, Sketch, StoreError, ROLLUP_MS};

/// How often the recomputer looks for marks that are due.
const TICK: Duration = Duration::from_millis(250);

/// Minutes recomputed at once.
const FANOUT: usize = 16;

/// Summaries of one device's minute, by (metric, type); metric `""` counts every event.
type MinuteSummaries = BTreeMap<(String, String), Stats>;

/// This instance's marks, and the lock that makes recomputation rounds one at a time.
#[derive(Default)]
pub(super) struct Recomputer {
    pub(super) pending: Pending,
    round: tokio::sync::Mutex<()>,
}

/// Starts the store's recomputer and its periodic sweep. Both hold the store weakly
/// and end with it.
pub(super) fn spawn(inner: &Arc<Inner>) {
    let store = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = store.upgrade() else { return };
            inner.round(false).await;
        }
    });
    tokio::spawn(sweep_forever(
        Arc::downgrade(inner),
        inner.settings.rollup_sweep_after,
    ));
}

/// Recomputes, at start-up and then periodically, the minutes whose writer left them
/// pending for longer than `after`.
async fn sweep_forever(store: Weak<Inner>, after: Duration) {
    let mut tick =
        tokio::time::interval(after.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        tick.tick().await;
        let Some(inner) = store.upgrade() else { return };
        if let Err(e) = inner.sweep().await {
            tracing::warn!(error = %e, "rollup sweep failed; retrying at the next tick");
        }
    }
}

impl Inner {
    /// One recomputation round over this instance's due marks (with `all`, every mark
    /// no flush is writing into: `settle`).
    pub(super) async fn round(&self, all: bool) {
        let _one_at_a_time = self.recomputer.round.lock().await;
        let due = self
            .recomputer
            .pending
            .take_due(std::time::Instant::now(), all);
        if !due.is_empty() {
            self.recompute(due.into_iter().map(|(k, m)| (k, vec![m])).collect())
                .await;
        }
    }

    /// Recomputes every marked minute older than the sweep age that is not one of
    /// this instance's own marks in progress; returns how many marker rows it found.
    pub(super) async fn sweep(&self) -> Result<usize, StoreError> {
        let cutoff = now_ms() - self.settings.rollup_sweep_after.as_millis() as i64;
        let rows: Vec<PendingRow> = self
            .session
            .execute_iter(self.cql.scan_pending.clone(), ())
            .await
            .map_err(pager_error)?
            .rows_stream::<PendingRow>()
            .map_err(corrupt)?
            .map_err(row_error)
            .try_filter(|r| {
                // Markers are UUIDv7: their time is when the mark was made.
                let made = assigned_id_ts(r.flush).unwrap_or(i64::MIN);
                let own = self
                    .recomputer
                    .pending
                    .holds((r.user_id, r.device_id, r.minute.0), r.flush);
                futures::future::ready(made <= cutoff && !own)
            })
            .try_collect()
            .await?;
        let n = rows.len();
        if n > 0 {
            tracing::info!(rows = n, "rollup sweep: recomputing minutes left pending");
            let mut minutes: HashMap<MinuteKey, Vec<Uuid>> = HashMap::new();
            for r in rows {
                minutes
                    .entry((r.user_id, r.device_id, r.minute.0))
                    .or_default()
                    .push(r.flush);
            }
            let _one_at_a_time = self.recomputer.round.lock().await;
            self.recompute(minutes.into_iter().collect()).await;
        }
        // After the minutes: an hour row goes once no minute inside is pending.
        Ok(n + self.sweep_hours(cutoff).await?)
    }

    /// One round: each minute is read and written once, then its hour and day are
    /// summed again (`levels.rs`), then the pending rows it covers are deleted. A
    /// minute that failed at any level keeps its rows for the sweep.
    async fn recompute(&self, minutes: Vec<(MinuteKey, Vec<Uuid>)>) {
        let markers: Vec<(MinuteKey, Uuid)> = minutes
            .iter()
            .flat_map(|(k, ms)| ms.iter().map(move |m| (*k, *m)))
            .collect();
        let done: Vec<(MinuteKey, Vec<Uuid>, BTreeSet<String>)> = stream::iter(minutes)
            .map(|(key, flushes)| async move {
                match self.recompute_minute(key).await {
                    Ok(metrics) => Some((key, flushes, metrics)),
                    Err(e) => {
                        let (_, device, minute) = key;
                        tracing::warn!(error = %e, %device, minute, "rollup recomputation failed; left pending");
                        None
                    }
                }
            })
            .buffer_unordered(FANOUT)
            .filter_map(futures::future::ready)
            .collect()
            .await;
        let levels: Vec<(MinuteKey, BTreeSet<String>)> =
            done.iter().map(|(k, _, m)| (*k, m.clone())).collect();
        let mut failed = self.recompute_levels(&levels).await;
        // Minutes that failed before their levels.
        let recomputed: HashSet<MinuteKey> = done.iter().map(|(k, _, _)| *k).collect();
        failed.extend(
            markers
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !recomputed.contains(k)),
        );
        // Deleted per device in unlogged batches, like they were written.
        let mut deletes: Vec<PendingRow> = done
            .into_iter()
            .filter(|(k, _, _)| !failed.contains(k))
            .flat_map(|(key, flushes, _)| flushes.into_iter().map(move |m| marker_row(key, m)))
            .collect();
        deletes.sort_unstable_by_key(|m| (m.user_id, m.device_id));
        let per_device =
            deletes.chunk_by(|a, b| (a.user_id, a.device_id) == (b.user_id, b.device_id));
        stream::iter(per_device)
            .for_each_concurrent(FANOUT, |rows| async move {
                if let Err(e) = self.write_rows(&self.cql.delete_pending, rows).await {
                    tracing::warn!(error = %e, "pending markers not deleted; the sweep will");
                }
            })
            .await;
        // Hours whose every minute is now recomputed at every level (`fleet.rs`).
        let hours = (self.recomputer.pending).finish(
            markers
                .into_iter()
                .map(|(k, m)| (k, m, !failed.contains(&k))),
        );
        self.delete_hour_markers(hours).await;
    }

    /// Writes one minute's rows from its events; returns the metrics it carries
    /// (`""`, counting every event, always among them).
    async fn recompute_minute(&self, key: MinuteKey) -> Result<BTreeSet<String>, StoreError> {
        let (user, device, minute) = key;
        // Read only after every flush whose marker this clears has its events
        // durable: they were submitted after their writes returned.
        let summaries = self.summarize_minute(user, device, minute).await?;
        let day = bucket_start(minute, DAY_MS);
        let tier = Tier::Rollup(Level::Minute);
        let ttl = self.settings.retention.ttl(tier, minute, now_ms()).cql();
        let rows: Vec<RollupIn<'_>> = summaries
            .iter()
            .map(|((metric, kind), Stats { summary: s, sketch })| RollupIn {
                user_id: user,
                device_id: device,
                day: ms(day),
                metric,
                minute: ms(minute),
                kind,
                count: s.count as i64,
                min: s.min,
                max: s.max,
                sum: s.sum,
                sketch: sketch.as_ref().map(Sketch::to_bytes),
                writetime: s.count as i64,
                ttl,
            })
            .collect();
        self.write_rows(&self.cql.insert_rollup, &rows).await?;
        let mut metrics: BTreeSet<String> = summaries.into_keys().map(|(m, _)| m).collect();
        metrics.insert(String::new());
        Ok(metrics)
    }

    /// Summaries of one device's minute, computed from its stored events.
    async fn summarize_minute(
        &self,
        user: UserId,
        device: DeviceId,
        minute: i64,
    ) -> Result<MinuteSummaries, StoreError> {
        let len = self.settings.bucket_len_ms;
        let end = minute + ROLLUP_MS;
        let mut out = MinuteSummaries::new();
        let mut bucket = bucket_start(minute, len);
        // A minute lies in one bucket unless buckets are shorter than a minute.
        while bucket < end {
            let slice = SliceIn {
                user_id: user,
                device_id: device,
                bucket: ms(bucket),
                from_ts: ms(minute),
                to_ts: ms(end),
            };
            let _p = self.permit().await;
            let mut rows = self
                .session
                .execute_iter(self.cql.metric_slice.clone(), slice)
                .await
                .map_err(pager_error)?
                .rows_stream::<MetricOut>()
                .map_err(corrupt)?;
            while let Some(r) = rows.try_next().await.map_err(row_error)? {
                let kind = r.kind;
                out.entry((String::new(), kind.clone()))
                    .or_default()
                    .add(None);
                for (metric, v) in r.metrics.unwrap_or_default() {
                    out.entry((metric, kind.clone())).or_default().add(Some(v));
                }
            }
            bucket += len;
        }
        Ok(out)
    }

    /// Summaries for a query at any level. Minutes come from their rows, except the
    /// minutes pending right now, which are computed from their events; hours and
    /// days, see `levels.rs`.
    pub(super) async fn rollups(&self, q: &RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError> {
        if q.from_ms >= q.to_ms {
            return Ok(Some(Vec::new()));
        }
        if q.level != Level::Minute {
            return self.coarse_rollups(q).await.map(Some);
        }
        let metric = q.metric.as_deref().unwrap_or("");
        // Pending first: a minute not pending then has rows that hold every event
        // acknowledged before.
        let pending = self
            .pending_minutes(q.user_id, q.device_id, q.from_ms, q.to_ms)
            .await?;
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        let mut out: Vec<Rollup> = self
            .minute_rows(q.user_id, q.device_id, metric, q.from_ms, q.to_ms)
            .await?
            .into_iter()
            .filter(|r| !pending.contains(&r.start_ms) && kind_ok(&r.kind))
            .collect();
        let computed: Vec<(i64, MinuteSummaries)> = stream::iter(pending)
            .map(|minute| async move {
                let s = self
                    .summarize_minute(q.user_id, q.device_id, minute)
                    .await?;
                Ok::<_, StoreError>((minute, s))
            })
            .buffered(4)
            .try_collect()
            .await?;
        for (start_ms, summaries) in computed {
            for ((m, kind), s) in summaries {
                if m == metric && kind_ok(&kind) {
                    out.push(Rollup {
                        start_ms,
                        kind,
                        summary: s.summary,
                        sketch: s.sketch,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.start_ms, &a.kind).cmp(&(b.start_ms, &b.kind)));
        Ok(Some(out))
    }

    /// One device's minute rows of one metric in `[from, to)`, as written: one slice
    /// per UTC day.
    pub(super) async fn minute_rows(
        &self,
        user: UserId,
        device: DeviceId,
        metric: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let first_day = bucket_start(from, DAY_MS);
        let days = (0..)
            .map(|i| first_day + i * DAY_MS)
            .take_while(|d| *d < to);
        let parts: Vec<Vec<Rollup>> = stream::iter(days)
            .map(|day| async move {
                let slice = RollupSliceIn {
                    user_id: user,
                    device_id: device,
                    day: ms(day),
                    metric,
                    from_minute: ms(from.max(day)),
                    to_minute: ms(to.min(day + DAY_MS)),
                };
                self.session
                    .execute_iter(self.cql.select_rollups.clone(), slice)
                    .await
                    .map_err(pager_error)?
                    .rows_stream::<RollupOut>()
                    .map_err(corrupt)?
                    .map_err(row_error)
                    .and_then(|r| {
                        futures::future::ready(rollup_of(
                            r.minute.0,
                            r.kind,
                            (r.count, r.min, r.max, r.sum),
                            r.sketch,
                        ))
                    })
                    .try_collect::<Vec<_>>()
                    .await
            })
            .buffered(4)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }
}
