//! Per-minute rollups in the wide-column store, exact without coordination.
//!
//! A rollup row can be wrong in three ways: a duplicate or a redelivered event counted
//! twice; two writers (two instances, each with part of one device's minute, as `$share`
//! delivers it) overwriting each other's read-modify-write; a writer that crashed after
//! its events and before their rollup. Counter columns cannot hold min and max, and
//! lightweight transactions cost a Paxos round per row. Instead:
//!
//! - **Recomputed, not incremented.** A minute's rows are always computed from that
//!   minute's stored events (one slice of one partition, which may hold a run of the
//!   device's due minutes of that bucket, split into minutes as it is read), so they
//!   count what is stored, once, however often an event was sent.
//! - **The larger count wins.** Each row is written `USING TIMESTAMP <its count>`.
//!   The events of a minute only ever grow, and each recomputation reads after its own
//!   writer's events are durable, so the sets of events two recomputations saw are
//!   nested (single-partition reads and writes are linearizable at the configured
//!   consistency: a quorum, or one replica). The one with more events is the newer
//!   truth, and Cassandra's last-write-wins keeps exactly it, whatever order the two
//!   writes arrive in; equal counts mean equal sets. The recomputation that read last
//!   saw every event, so the row that wins is exact.
//! - **Pending minutes.** Before writing its events a flush marks their minutes in
//!   `pending_by_device` (or joins its instance's mark of them, `pending.rs`); a
//!   recomputation that read after every joined flush's events deletes the mark once
//!   the rollups of every minute in it are written.
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

use std::collections::{BTreeSet, HashSet};

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};

use super::paged::Row;
use scylla::statement::prepared::PreparedStatement;

use super::minutes::MinuteSummaries;
use super::minutes::{one_read, runs};
use super::pending::{Ended, MinuteKey, Pending, DAY_MS};
use super::rows::{ms, sketch_column, PendingScan, RollupIn};
use super::sparse::{hour_of_sparse_minutes, is_sparse, whole_hours, WholeHours};
use super::Inner;
use crate::model::{assigned_id_ts, bucket_start, now_ms};
use crate::store::retention::Tier;
use crate::store::{Level, Rollup, RollupQuery, StoreError, ROLLUP_MS};

/// Minutes taken for recomputation at a time (see `Inner::round`).
const PASS_MINUTES: usize = 40_000;

/// How often the recomputer looks for marks that are due.
const TICK: Duration = Duration::from_millis(250);

/// Minutes recomputed at once.
const FANOUT: usize = 16;

/// A recomputed minute and the metrics it carries.
type MinuteMetrics = (MinuteKey, BTreeSet<String>);

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
    /// no flush is writing into: `settle`), in passes of at most [`PASS_MINUTES`];
    /// after each, the rows of the hour marks whose every minute is done are deleted.
    ///
    /// Why passes: a taken minute counts in the backlog until its pass ends, and past
    /// `store.rollup_backlog_max` writes are refused. One pass over a fleet's whole
    /// backlog held it at its peak for as long as the pass ran, longer than the
    /// pipeline retries a write, so a burst got 503s that the recomputer was already
    /// working off; passes let the backlog fall as they go.
    ///
    /// A pass's marks are deleted while the next pass runs: they only cover minutes
    /// already recomputed at every level, and waiting for them left the node idle
    /// between passes.
    pub(super) async fn round(&self, all: bool) {
        let _one_at_a_time = self.recomputer.round.lock().await;
        let mut deleting = Ended::default();
        loop {
            let due =
                (self.recomputer.pending).take_due(std::time::Instant::now(), all, PASS_MINUTES);
            let full = due.len() >= PASS_MINUTES;
            let pass = async {
                if due.is_empty() {
                    return Ended::default();
                }
                let ok = self.recompute(due.iter().map(|(k, _)| *k).collect()).await;
                let results = due.into_iter().map(|(k, m)| (k, m, ok.contains(&k)));
                self.recomputer.pending.finish(results)
            };
            let previous = self.delete_marks(std::mem::take(&mut deleting));
            (deleting, ()) = futures::future::join(pass, previous).await;
            // A pass under the limit took every mark due when it began.
            if !full {
                self.delete_marks(deleting).await;
                return;
            }
        }
    }

    /// Recomputes the minutes of every mark older than the sweep age that is not one
    /// of this instance's own in progress, and deletes the marks whose minutes all
    /// succeeded; returns how many old marks it found.
    pub(super) async fn sweep(&self) -> Result<usize, StoreError> {
        let cutoff = now_ms() - self.settings.rollup_sweep_after.as_millis() as i64;
        let rows: Vec<PendingScan> = self
            .old_marks(&self.cql.scan_pending, cutoff, |r: &PendingScan| {
                let key = (r.user_id, r.device_id, r.hour.0);
                (r.flush, self.recomputer.pending.holds_hour(key, r.flush))
            })
            .await?;
        let n = rows.len();
        if n > 0 {
            tracing::info!(rows = n, "rollup sweep: recomputing minutes left pending");
            let minutes_of = |r: &PendingScan| -> Vec<MinuteKey> {
                let offsets = r.minutes.as_deref().unwrap_or_default();
                (offsets.iter())
                    .map(|m| (r.user_id, r.device_id, r.hour.0 + i64::from(*m) * ROLLUP_MS))
                    .collect()
            };
            let minutes: Vec<MinuteKey> = rows.iter().flat_map(minutes_of).collect();
            let _one_at_a_time = self.recomputer.round.lock().await;
            let ok = self.recompute(minutes).await;
            let hours = rows
                .iter()
                .filter(|r| minutes_of(r).iter().all(|k| ok.contains(k)))
                .map(|r| ((r.user_id, r.device_id, r.hour.0), r.flush))
                .collect();
            // Their rows by user are the day's: `sweep_hours` deletes them once the
            // day has no pending minute.
            self.delete_marks(Ended {
                hours,
                days: Vec::new(),
            })
            .await;
        }
        // After the marks: a user row left without its device row goes too.
        Ok(n + self.sweep_hours(cutoff).await?)
    }

    /// The rows of a mark table (`scan`) made before `cutoff` that this instance
    /// does not hold, `mark` naming each row's mark and whether this instance holds it.
    pub(super) async fn old_marks<T: Row>(
        &self,
        scan: &PreparedStatement,
        cutoff: i64,
        mark: impl Fn(&T) -> (uuid::Uuid, bool),
    ) -> Result<Vec<T>, StoreError> {
        self.rows::<T>(scan, ())
            .await?
            .try_filter(|r| {
                // Marks are UUIDv7: their time is when the mark was made.
                let (marker, own) = mark(r);
                let made = assigned_id_ts(marker).unwrap_or(i64::MIN);
                futures::future::ready(made <= cutoff && !own)
            })
            .try_collect()
            .await
    }

    /// One round: the minutes are read and written once, a run of a device's minutes
    /// at a time (`one_read`), then their hours and days are summed again (`levels.rs`).
    /// Returns the minutes recomputed at every level; the others keep their marks for
    /// the sweep.
    async fn recompute(&self, mut minutes: Vec<MinuteKey>) -> HashSet<MinuteKey> {
        // A minute can be due twice in one round (an old mark closed to new flushes
        // and the newer one): it is read once.
        minutes.sort_unstable();
        minutes.dedup();
        let runs = runs(&minutes, |a, b| {
            (a.0, a.1) == (b.0, b.1) && one_read(a.2, b.2)
        });
        let minutes = &minutes;
        let done: Vec<(Vec<MinuteMetrics>, WholeHours)> = stream::iter(runs)
            .map(|run| async move {
                let keys = &minutes[run];
                let (user, device, first) = keys[0];
                match self.recompute_minutes(keys).await {
                    Ok((metrics, whole)) => (keys.iter().copied().zip(metrics).collect(), whole),
                    Err(e) => {
                        tracing::warn!(error = %e, %user, %device, first, n = keys.len(), "rollup recomputation failed; left pending");
                        Default::default()
                    }
                }
            })
            .buffer_unordered(FANOUT)
            .collect()
            .await;
        let mut levels: Vec<MinuteMetrics> = Vec::new();
        let mut whole = WholeHours::new();
        for (minutes, hours) in done {
            levels.extend(minutes);
            whole.extend(hours);
        }
        let failed = self.recompute_levels(&levels, &whole).await;
        levels
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| !failed.contains(k))
            .collect()
    }

    /// Writes the rows of a run of one device's minutes (ascending, one read: see
    /// `one_read`) from their events; returns, for each minute, the metrics it carries
    /// (`""`, counting every event, always among them), and the hours of sparse
    /// minutes the read covered whole (`sparse.rs`).
    async fn recompute_minutes(
        &self,
        keys: &[MinuteKey],
    ) -> Result<(Vec<BTreeSet<String>>, WholeHours), StoreError> {
        let (user, device, _) = keys[0];
        let due: Vec<i64> = keys.iter().map(|k| k.2).collect();
        let keeps_sparse = self.keeps_sparse_minutes();
        let whole = if keeps_sparse {
            whole_hours(&due)
        } else {
            Vec::new()
        };
        // The minutes of the hours the read covers whole are summarized too.
        let mut minutes: Vec<i64> = (whole.iter())
            .flat_map(|h| (0..60).map(move |i| h + i * ROLLUP_MS))
            .chain(due.iter().copied())
            .collect();
        minutes.sort_unstable();
        minutes.dedup();
        // Read only after every flush whose marker this clears has its events
        // durable: they were submitted after their writes returned.
        let summaries = self.summarize_minutes(user, device, &minutes).await?;
        let of = |minute: i64| {
            let i = minutes.binary_search(&minute).expect("summarized");
            &summaries[i]
        };
        let now = now_ms();
        let tier = Tier::Rollup(Level::Minute);
        let rows: Vec<RollupIn<'_>> = due
            .iter()
            .map(|minute| (*minute, of(*minute)))
            .filter(|(_, by_metric)| !(keeps_sparse && is_sparse(by_metric)))
            .flat_map(|(minute, by_metric)| {
                let day = ms(bucket_start(minute, DAY_MS));
                let ttl = self.settings.retention.ttl(tier, minute, now).cql();
                by_metric
                    .iter()
                    .map(move |((metric, kind), stats)| RollupIn {
                        user_id: user,
                        device_id: device,
                        day,
                        metric,
                        minute: ms(minute),
                        kind,
                        count: stats.summary.count as i64,
                        min: stats.summary.min,
                        max: stats.summary.max,
                        sum: stats.summary.sum,
                        sketch: sketch_column(stats),
                        writetime: stats.summary.count as i64,
                        ttl,
                    })
            })
            .collect();
        // A partition of `rollups` is a device's day: its rows go in shared batches
        // (a fleet device has one event a minute, and a write per minute was most of
        // the cost of its rollups).
        for day in rows.chunk_by(|a, b| a.day == b.day) {
            self.write_rows(&self.cql.insert_rollup, day).await?;
        }
        let metrics = (due.iter())
            .map(|minute| {
                let mut metrics: BTreeSet<String> =
                    of(*minute).keys().map(|(m, _)| m.clone()).collect();
                metrics.insert(String::new());
                metrics
            })
            .collect();
        let hours = (whole.into_iter())
            .filter_map(|h| {
                let hour: Vec<&MinuteSummaries> = (0..60).map(|i| of(h + i * ROLLUP_MS)).collect();
                hour_of_sparse_minutes(&hour).map(|sums| ((user, device, h), sums))
            })
            .collect();
        Ok((metrics, hours))
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
        // acknowledged before, or none (`sparse.rs`).
        let pending = self
            .pending_minutes(q.user_id, q.device_id, q.from_ms, q.to_ms)
            .await?;
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        let range = (q.from_ms, q.to_ms);
        let device = (q.user_id, q.device_id);
        let metrics = &[metric];
        let minutes = self.minutes(device, metrics, range, &pending, |_| true);
        let mut out: Vec<Rollup> = (minutes.await?.into_iter().flatten())
            .filter(|r| kind_ok(&r.kind))
            .collect();
        out.sort_by(|a, b| (a.start_ms, &a.kind).cmp(&(b.start_ms, &b.kind)));
        Ok(Some(out))
    }
}
