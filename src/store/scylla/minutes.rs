//! A device's minutes summarized from its stored events: what a minute's rows are
//! recomputed from (`rollup.rs`), and what a pending or sparse minute is read as
//! (`sparse.rs`).

use std::collections::BTreeMap;
use std::ops::Range;

use futures::TryStreamExt;
use scylla::value::CqlTimestamp;

use super::pending::DAY_MS;
use super::rows::{ms, MetricOut, SlicesIn};
use super::Inner;
use crate::model::{bucket_start, buckets_in, DeviceId, UserId};
use crate::store::rollup::Stats;
use crate::store::{StoreError, ROLLUP_MS};

/// Summaries of one device's minute, by (metric, type); metric `""` counts every event.
pub(super) type MinuteSummaries = BTreeMap<(String, String), Stats>;

/// Due minutes of a device farther apart than this are read with separate slices:
/// a slice reads the minutes between them too, and a busy device's minutes hold
/// thousands of events.
const MAX_GAP: i64 = 4 * ROLLUP_MS;

/// Buckets read in one request at most: a day of hours. Only buckets shorter than an
/// hour make a day's run need more.
const MAX_BUCKETS: usize = 24;

/// Whether minute `b`, the next due minute of a device after `a`, is read with the
/// same request as `a`: it is close, and in the same UTC day (a read spans at most a
/// day of buckets, one partition each).
///
/// The fleet shape (a device per flush with one event a minute, a day at a time)
/// then needs one read per device and day. One read per event was most of the cost
/// of its rollups, and later one per hour (a bucket) still made it cost the node
/// about half again as much as a dense device's stream.
pub(super) fn one_read(a: i64, b: i64) -> bool {
    b - a <= MAX_GAP && bucket_start(a, DAY_MS) == bucket_start(b, DAY_MS)
}

/// The index ranges of `items`' runs of neighbours that `same` puts together, like
/// `chunk_by`; ranges, not slices, so that the futures made from them own them.
pub(super) fn runs<T>(items: &[T], same: impl Fn(&T, &T) -> bool) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=items.len() {
        if i == items.len() || !same(&items[i - 1], &items[i]) {
            out.push(start..i);
            start = i;
        }
    }
    out
}

/// Counts one event in its minute's summaries. The keys are moved into the lookup
/// and back out, so that an event allocates only for a (metric, type) its minute has
/// not seen yet.
pub(super) fn add_event(out: &mut MinuteSummaries, kind: String, metrics: BTreeMap<String, f64>) {
    let mut key = (String::new(), kind);
    match out.get_mut(&key) {
        Some(s) => s.add(None),
        None => out.entry(key.clone()).or_default().add(None),
    }
    for (metric, v) in metrics {
        key.0 = metric;
        match out.get_mut(&key) {
            Some(s) => s.add(Some(v)),
            None => out.entry(key.clone()).or_default().add(Some(v)),
        }
    }
}

impl Inner {
    /// Summaries of some of one device's minutes (ascending; see `one_read`),
    /// computed from its stored events with one request over the buckets they lie
    /// in.
    pub(super) async fn summarize_minutes(
        &self,
        user: UserId,
        device: DeviceId,
        minutes: &[i64],
    ) -> Result<Vec<MinuteSummaries>, StoreError> {
        let mut out: Vec<MinuteSummaries> =
            minutes.iter().map(|_| MinuteSummaries::new()).collect();
        let (Some(&from), Some(&last)) = (minutes.first(), minutes.last()) else {
            return Ok(out);
        };
        let len = self.settings.bucket_len_ms;
        let end = last + ROLLUP_MS;
        let buckets: Vec<CqlTimestamp> =
            buckets_in(from, end, len).map(|(b, _, _)| ms(b)).collect();
        for buckets in buckets.chunks(MAX_BUCKETS) {
            let slice = SlicesIn {
                user_id: user,
                device_id: device,
                buckets: buckets.to_vec(),
                from_ts: ms(from),
                to_ts: ms(end),
            };
            let _p = self.permit().await;
            let mut rows = (self.rows::<MetricOut>(&self.cql.metric_slice, slice)).await?;
            while let Some(r) = rows.try_next().await? {
                // Events of minutes between the run's that are not due are skipped.
                if let Ok(i) = minutes.binary_search(&bucket_start(r.ts.0, ROLLUP_MS)) {
                    add_event(&mut out[i], r.kind, r.metrics.unwrap_or_default());
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_covers_close_minutes_of_one_day_only() {
        let m = ROLLUP_MS;
        assert!(one_read(0, m));
        assert!(one_read(0, MAX_GAP), "a few minutes apart");
        assert!(!one_read(0, MAX_GAP + m), "too far apart");
        assert!(one_read(59 * m, 60 * m), "another bucket, the same day");
        assert!(!one_read(DAY_MS - m, DAY_MS), "another day");
        let due = [0, m, 2 * m, 9 * m, 59 * m, 60 * m, DAY_MS];
        let runs = runs(&due, |a, b| one_read(*a, *b));
        assert_eq!(runs, [0..3, 3..4, 4..6, 6..7], "runs of one read each");
        assert!(super::runs(&[] as &[i64], |_, _| true).is_empty());
    }

    #[test]
    fn events_are_counted_by_metric_and_type() {
        let mut out = MinuteSummaries::new();
        let metrics = |v: &[(&str, f64)]| v.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        add_event(&mut out, "a".into(), metrics(&[("t", 1.0), ("h", 5.0)]));
        add_event(&mut out, "a".into(), metrics(&[("t", 3.0)]));
        add_event(&mut out, "b".into(), BTreeMap::new());
        let got: Vec<((&str, &str), u64, f64)> = out
            .iter()
            .map(|((m, k), s)| ((m.as_str(), k.as_str()), s.summary.count, s.summary.sum))
            .collect();
        assert_eq!(
            got,
            [
                (("", "a"), 2, 0.0),
                (("", "b"), 1, 0.0),
                (("h", "a"), 1, 5.0),
                (("t", "a"), 2, 4.0),
            ]
        );
    }
}
