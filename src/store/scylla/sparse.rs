//! Sparse minutes: a minute of at most [`SPARSE_EVENTS`] events keeps no rows in
//! `rollups`; its events are its rollup.
//!
//! Why: a fleet device sends about once a minute, so a minute row holds one event
//! and costs more than the event (a row per metric and type, written and then read
//! back to sum the hour). Those rows were two thirds of what a fleet's ingest cost
//! the node. Reading such a minute from its events costs what reading its rows did:
//! one slice of the device's partition per hour.
//!
//! How a reader tells a sparse minute from an empty one: by the rows of metric `""`
//! (every event counted), written for every minute that is not sparse. A minute
//! without one is read from its events, which finds nothing when it is empty. An
//! hour is then summed from its minutes, each taken from one source only, its rows
//! or its events; both only ever hold a subset of the stored events, so the exactness
//! argument of `levels.rs` (the larger count wins) is unchanged.
//!
//! Only while events outlive minute rows ([`Retention::events_outlive`]): with raw
//! events kept for less time than minute rows, every minute gets its rows.
//!
//! [`Retention::events_outlive`]: crate::store::retention::Retention::events_outlive

use std::collections::{BTreeSet, HashMap, HashSet};

use futures::stream::{self, StreamExt, TryStreamExt};

use super::minutes::{one_read, runs, MinuteSummaries};
use super::pending::{HourKey, DAY_MS, HOUR_MS};
use super::rows::{ms, RollupOut, RollupSliceIn};
use super::Inner;
use crate::model::{bucket_start, buckets_in, DeviceId, UserId};
use crate::store::{Level, Rollup, StoreError, ROLLUP_MS};

/// The most events a minute may hold and keep no rows.
pub(super) const SPARSE_EVENTS: u64 = 2;

/// Whether a minute with these summaries keeps no rows.
pub(super) fn is_sparse(summaries: &MinuteSummaries) -> bool {
    let events: u64 = (summaries.iter())
        .filter(|((metric, _), _)| metric.is_empty())
        .map(|(_, s)| s.summary.count)
        .sum();
    events <= SPARSE_EVENTS
}

/// Hours of a device read whole from their events in the minutes phase of a round,
/// every minute of them sparse: by (user, device, hour), the hour's summaries by
/// (metric, type).
pub(super) type WholeHours = HashMap<HourKey, MinuteSummaries>;

/// The hours that a read of the due minutes `due` (ascending, one slice: see
/// `one_read`) covers whole: their first and last minute are due, so every minute
/// between is in the slice.
pub(super) fn whole_hours(due: &[i64]) -> Vec<i64> {
    let (Some(&first), Some(&last)) = (due.first(), due.last()) else {
        return Vec::new();
    };
    let start = bucket_start(first + HOUR_MS - 1, HOUR_MS);
    (0..)
        .map(|i| start + i * HOUR_MS)
        .take_while(|h| h + HOUR_MS - ROLLUP_MS <= last)
        .collect()
}

/// The summaries of an hour from those of its sixty minutes, read at once, if every
/// minute is sparse: then no minute of it has rows, and the hour is summed from this
/// one read instead of reading its events again.
///
/// Why this is exact: the read is a subset of the hour's stored events, like any
/// other way an hour is summed, and the round of the flush that was durable last
/// reads after all the others, so one read holds every event. And it needs no rows:
/// an hour is summed from rows only if some minute of it has them, and whoever wrote
/// those rows saw that minute hold more than [`SPARSE_EVENTS`] events, so it summed
/// the hour from rows itself, after writing them (the argument of `levels.rs`).
pub(super) fn hour_of_sparse_minutes(minutes: &[&MinuteSummaries]) -> Option<MinuteSummaries> {
    if !minutes.iter().all(|m| is_sparse(m)) {
        return None;
    }
    let mut sums = MinuteSummaries::new();
    for minute in minutes {
        for (key, stats) in *minute {
            sums.entry(key.clone()).or_default().merge(stats);
        }
    }
    Some(sums)
}

impl Inner {
    /// Whether minutes of few events may be kept as just their events.
    pub(super) fn keeps_sparse_minutes(&self) -> bool {
        self.settings.retention.events_outlive(Level::Minute)
    }

    /// One device's minutes of each of `metrics` in `[from, to)` for which `wanted`
    /// holds, by type, in no particular order: the rows of those that have them, and
    /// for the others (sparse, or in `from_events`: pending, their rows maybe behind)
    /// the summaries of their events, read once for every metric.
    pub(super) async fn minutes(
        &self,
        (user, device): (UserId, DeviceId),
        metrics: &[&str],
        (from, to): (i64, i64),
        from_events: &BTreeSet<i64>,
        wanted: impl Fn(i64) -> bool,
    ) -> Result<Vec<Vec<Rollup>>, StoreError> {
        // The rows of `""` tell which minutes have rows at all: read last.
        let mut read: Vec<&str> = metrics.iter().copied().filter(|m| !m.is_empty()).collect();
        read.push("");
        let rows = read
            .iter()
            .map(|metric| self.minute_rows(user, device, metric, from, to));
        let mut rows = futures::future::try_join_all(rows).await?;
        let counted: HashSet<i64> = rows[read.len() - 1].iter().map(|r| r.start_ms).collect();
        let mut out: Vec<Vec<Rollup>> = metrics
            .iter()
            .map(|metric| {
                let i = read.iter().position(|m| m == metric).expect("read");
                (std::mem::take(&mut rows[i]).into_iter())
                    .filter(|r| wanted(r.start_ms) && !from_events.contains(&r.start_ms))
                    .collect()
            })
            .collect();
        let event_minutes: Vec<i64> = buckets_in(from, to, ROLLUP_MS)
            .map(|(m, _, _)| m)
            .filter(|m| wanted(*m) && (from_events.contains(m) || !counted.contains(m)))
            .collect();
        let runs = runs(&event_minutes, |a, b| one_read(*a, *b));
        let summaries: Vec<Vec<MinuteSummaries>> = stream::iter(runs)
            .map(|run| self.summarize_minutes(user, device, &event_minutes[run]))
            .buffered(4)
            .try_collect()
            .await?;
        for (&start_ms, by_metric) in event_minutes.iter().zip(summaries.into_iter().flatten()) {
            for ((metric, kind), s) in by_metric {
                if let Some(i) = metrics.iter().position(|m| *m == metric) {
                    out[i].push(Rollup {
                        start_ms,
                        kind,
                        summary: s.summary,
                        sketch: s.sketch,
                    });
                }
            }
        }
        Ok(out)
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
        let parts: Vec<Vec<Rollup>> = stream::iter(buckets_in(from, to, DAY_MS))
            .map(|(day, lo, hi)| async move {
                let slice = RollupSliceIn {
                    user_id: user,
                    device_id: device,
                    day: ms(day),
                    metric,
                    from_minute: ms(lo),
                    to_minute: ms(hi),
                };
                self.rollup_rows::<RollupOut>(&self.cql.select_rollups, slice)
                    .await
            })
            .buffered(4)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_covers_the_hours_between_its_first_and_last_minute() {
        let (h, m) = (10 * HOUR_MS, ROLLUP_MS);
        assert_eq!(whole_hours(&[h, h + 59 * m]), [h]);
        assert_eq!(whole_hours(&[h + m, h + 2 * HOUR_MS]), [h + HOUR_MS]);
        assert!(
            whole_hours(&[h, h + 58 * m]).is_empty(),
            "its last minute is missing"
        );
        assert!(whole_hours(&[]).is_empty());
    }

    #[test]
    fn an_hour_is_summed_from_its_minutes_only_if_every_one_is_sparse() {
        let minute = |events: u64| {
            let mut s = MinuteSummaries::new();
            let stats = s.entry((String::new(), "t".into())).or_default();
            (0..events).for_each(|_| stats.add(None));
            s
        };
        let sparse: Vec<MinuteSummaries> = (0..60).map(|i| minute(i % 3)).collect();
        let hour = hour_of_sparse_minutes(&sparse.iter().collect::<Vec<_>>());
        let count = hour.expect("all sparse")[&(String::new(), "t".into())]
            .summary
            .count;
        assert_eq!(count, (0..60).map(|i| i % 3).sum::<u64>());
        let mut one_dense = sparse.clone();
        one_dense[7] = minute(SPARSE_EVENTS + 1);
        assert!(hour_of_sparse_minutes(&one_dense.iter().collect::<Vec<_>>()).is_none());
    }
}
