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
//!   `rollups_pending`, one row per (minute, flush); a recomputation that read after
//!   the flush's events deletes that flush's rows once its rollups are written.
//!   Aggregates read pending minutes from the events instead of the rollups, so an
//!   acknowledged event is in every aggregate at once; the rollups merely catch up.
//!   A writer that crashes leaves its rows behind, and the sweep recomputes them.
//!
//! Recomputation runs after the flush is acknowledged, in one background task per
//! store. A minute is recomputed once no flush has touched it for a second (at the
//! latest ten seconds after the first): a busy device's current minute is then read
//! about once, not once per flush, which would make a minute's cost grow with the
//! square of its events. Meanwhile queries read it from its events, at most a minute
//! of one device. The queue and the set of waiting minutes are bounded; past them
//! minutes simply stay pending for the sweep, exact all the while.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::statement::batch::{Batch, BatchType};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::errors::{corrupt, exec_error, pager_error, row_error};
use super::rows::{
    ms, MetricOut, PendingOut, PendingRangeIn, PendingRow, RollupIn, RollupOut, RollupSliceIn,
    SliceIn,
};
use super::Inner;
use crate::model::{assigned_id_ts, bucket_start, now_ms, DeviceId, UserId};
use crate::store::{Rollup, RollupQuery, StoreError, Summary, ROLLUP_MS};

/// A rollup partition holds one device's UTC day.
const DAY_MS: i64 = 86_400_000;

/// Pending rows waiting for the recomputer, at most (in submissions).
const QUEUE: usize = 4096;

/// A minute is recomputed once no flush has touched it for this long: a device's
/// current minute keeps receiving events until it ends, and reading it again after
/// every flush would cost a read of the whole minute per flush.
const QUIET: Duration = Duration::from_secs(1);

/// ...or once it has waited this long, whatever keeps writing to it.
const MAX_DELAY: Duration = Duration::from_secs(10);

/// How often the recomputer looks for minutes that are due.
const TICK: Duration = Duration::from_millis(250);

/// Minutes waiting in the recomputer, at most; past it, new ones are left to the
/// sweep (they stay pending, and exact).
const WAITING: usize = 200_000;

/// Pending rows per submission of the sweep.
const SWEEP_CHUNK: usize = 10_000;

/// Minutes recomputed at once.
const FANOUT: usize = 16;

/// Rollup rows per unlogged batch (all in one partition).
const BATCH_ROWS: usize = 64;

/// Summaries of one device's minute, by (metric, type); metric `""` counts every event.
type MinuteSummaries = BTreeMap<(String, String), Summary>;

pub(super) enum Job {
    Minutes(Vec<PendingRow>),
    /// Answered once every job queued before it is done.
    Settle(oneshot::Sender<()>),
}

/// The handle flushes submit their pending minutes to.
pub(super) struct Recomputer {
    tx: mpsc::Sender<Job>,
}

impl Recomputer {
    pub(super) fn new() -> (Self, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Hands over a flush's pending minutes. Never waits: with the queue full they
    /// stay pending (and exact, read from the events) until the sweep.
    pub(super) fn submit(&self, rows: Vec<PendingRow>) {
        if rows.is_empty() {
            return;
        }
        if self.tx.try_send(Job::Minutes(rows)).is_err() {
            tracing::warn!("rollup recomputation queue full; minutes left pending for the sweep");
        }
    }

    pub(super) async fn settle(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Settle(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the store's recomputer and its periodic sweep. Both hold the store weakly
/// and end with it.
pub(super) fn spawn(inner: &Arc<Inner>, jobs: mpsc::Receiver<Job>) {
    tokio::spawn(run(Arc::downgrade(inner), jobs));
    tokio::spawn(sweep_forever(
        Arc::downgrade(inner),
        inner.settings.rollup_sweep_after,
    ));
}

/// A minute waiting for recomputation: the flushes whose pending rows it will clear.
struct Waiting {
    flushes: Vec<Uuid>,
    first: Instant,
    last: Instant,
}

type MinuteKey = (UserId, DeviceId, i64);

async fn run(store: Weak<Inner>, mut jobs: mpsc::Receiver<Job>) {
    let mut waiting: HashMap<MinuteKey, Waiting> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let settle = tokio::select! {
            job = jobs.recv() => match job {
                None => return,
                Some(Job::Minutes(rows)) => {
                    let now = Instant::now();
                    for r in rows {
                        let key = (r.user_id, r.device_id, r.minute.0);
                        if let Some(w) = waiting.get_mut(&key) {
                            w.flushes.push(r.flush);
                            w.last = now;
                        } else if waiting.len() < WAITING {
                            waiting.insert(key, Waiting { flushes: vec![r.flush], first: now, last: now });
                        }
                    }
                    continue;
                }
                Some(Job::Settle(w)) => Some(w),
            },
            _ = tick.tick() => None,
        };
        let now = Instant::now();
        let due: Vec<MinuteKey> = waiting
            .iter()
            .filter(|(_, w)| {
                settle.is_some()
                    || now.duration_since(w.last) >= QUIET
                    || now.duration_since(w.first) >= MAX_DELAY
            })
            .map(|(k, _)| *k)
            .collect();
        if !due.is_empty() {
            let Some(inner) = store.upgrade() else { return };
            let round = due
                .into_iter()
                .filter_map(|k| waiting.remove(&k).map(|w| (k, w.flushes)))
                .collect();
            inner.recompute(round).await;
        }
        if let Some(w) = settle {
            let _ = w.send(());
        }
    }
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
    /// Submits every pending minute older than the sweep age; returns how many rows.
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
                // Flush ids are UUIDv7: their time is when the flush began.
                let started = assigned_id_ts(r.flush).unwrap_or(i64::MIN);
                futures::future::ready(started <= cutoff)
            })
            .try_collect()
            .await?;
        let n = rows.len();
        for chunk in rows.chunks(SWEEP_CHUNK) {
            // A sweep may wait for room: nothing is waiting on it.
            let _ = self.recomputer.tx.send(Job::Minutes(chunk.to_vec())).await;
        }
        if n > 0 {
            tracing::info!(rows = n, "rollup sweep: recomputing minutes left pending");
        }
        Ok(n)
    }

    /// One round: each minute is read and written once, then the pending rows it
    /// covers are deleted. A failed minute keeps its rows for the sweep.
    async fn recompute(&self, minutes: Vec<(MinuteKey, Vec<Uuid>)>) {
        stream::iter(minutes)
            .for_each_concurrent(FANOUT, |((user, device, minute), flushes)| async move {
                if let Err(e) = self.recompute_minute(user, device, minute, &flushes).await {
                    tracing::warn!(error = %e, %device, minute, "rollup recomputation failed; left pending");
                }
            })
            .await;
    }

    async fn recompute_minute(
        &self,
        user: UserId,
        device: DeviceId,
        minute: i64,
        flushes: &[Uuid],
    ) -> Result<(), StoreError> {
        // Read only after every flush in `flushes` has its events durable: they were
        // submitted after their writes returned.
        let summaries = self.summarize_minute(user, device, minute).await?;
        let day = bucket_start(minute, DAY_MS);
        let rows: Vec<RollupIn<'_>> = summaries
            .iter()
            .map(|((metric, kind), s)| RollupIn {
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
                writetime: s.count as i64,
            })
            .collect();
        for chunk in rows.chunks(BATCH_ROWS) {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in chunk {
                batch.append_statement(self.cql.insert_rollup.clone());
            }
            batch.set_is_idempotent(true);
            let _p = self.permit().await;
            self.session
                .batch(&batch, chunk)
                .await
                .map_err(exec_error)?;
        }
        for &flush in flushes {
            let key = PendingRow {
                user_id: user,
                device_id: device,
                minute: ms(minute),
                flush,
            };
            let _p = self.permit().await;
            self.session
                .execute_unpaged(&self.cql.delete_pending, key)
                .await
                .map_err(exec_error)?;
        }
        Ok(())
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
                    .or_insert(Summary::EMPTY)
                    .add(None);
                for (metric, v) in r.metrics.unwrap_or_default() {
                    out.entry((metric, kind.clone()))
                        .or_insert(Summary::EMPTY)
                        .add(Some(v));
                }
            }
            bucket += len;
        }
        Ok(out)
    }

    /// Per-minute summaries for a query: from the rollups, except for the minutes
    /// pending right now, which are computed from their events.
    pub(super) async fn rollups(&self, q: &RollupQuery) -> Result<Vec<Rollup>, StoreError> {
        if q.from_ms >= q.to_ms {
            return Ok(Vec::new());
        }
        let metric = q.metric.as_deref().unwrap_or("");
        // Pending minutes are read first: a minute not pending now has rollups that
        // hold every event acknowledged before now.
        let pending: BTreeSet<i64> = self
            .session
            .execute_iter(
                self.cql.select_pending.clone(),
                PendingRangeIn {
                    user_id: q.user_id,
                    device_id: q.device_id,
                    from_minute: ms(q.from_ms),
                    to_minute: ms(q.to_ms),
                },
            )
            .await
            .map_err(pager_error)?
            .rows_stream::<PendingOut>()
            .map_err(corrupt)?
            .map_ok(|r| r.minute.0)
            .map_err(row_error)
            .try_collect()
            .await?;
        let first_day = bucket_start(q.from_ms, DAY_MS);
        let days = (0..)
            .map(|i| first_day + i * DAY_MS)
            .take_while(|d| *d < q.to_ms);
        let per_day: Vec<Vec<Rollup>> = stream::iter(days)
            .map(|day| self.rollup_day(q, metric, day))
            .buffered(4)
            .try_collect()
            .await?;
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        let mut out: Vec<Rollup> = per_day
            .into_iter()
            .flatten()
            .filter(|r| !pending.contains(&r.minute_ms) && kind_ok(&r.kind))
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
        for (minute_ms, summaries) in computed {
            for ((m, kind), summary) in summaries {
                if m == metric && kind_ok(&kind) {
                    out.push(Rollup {
                        minute_ms,
                        kind,
                        summary,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.minute_ms, &a.kind).cmp(&(b.minute_ms, &b.kind)));
        Ok(out)
    }

    async fn rollup_day(
        &self,
        q: &RollupQuery,
        metric: &str,
        day: i64,
    ) -> Result<Vec<Rollup>, StoreError> {
        let slice = RollupSliceIn {
            user_id: q.user_id,
            device_id: q.device_id,
            day: ms(day),
            metric,
            from_minute: ms(q.from_ms.max(day)),
            to_minute: ms(q.to_ms.min(day + DAY_MS)),
        };
        self.session
            .execute_iter(self.cql.select_rollups.clone(), slice)
            .await
            .map_err(pager_error)?
            .rows_stream::<RollupOut>()
            .map_err(corrupt)?
            .map_ok(|r| Rollup {
                minute_ms: r.minute.0,
                kind: r.kind,
                summary: Summary {
                    count: r.count.max(0) as u64,
                    min: r.min,
                    max: r.max,
                    sum: r.sum,
                },
            })
            .map_err(row_error)
            .try_collect()
            .await
    }
}
