//! A device's minutes summarized from its stored events: what a minute's rows are
//! recomputed from (`rollup.rs`), and what a pending or sparse minute is read as
//! (`sparse.rs`).

use std::collections::BTreeMap;
use std::ops::Range;

use futures::TryStreamExt;

use super::rows::{ms, MetricOut, SliceIn};
use super::Inner;
use crate::model::{bucket_start, DeviceId, UserId};
use crate::store::rollup::Stats;
use crate::store::{StoreError, ROLLUP_MS};

/// Summaries of one device's minute, by (metric, type); metric `""` counts every event.
pub(super) type MinuteSummaries = BTreeMap<(String, String), Stats>;

/// Due minutes of a device farther apart than this are read with separate slices:
/// a slice reads the minutes between them too, and a busy device's minutes hold
/// thousands of events.
const MAX_GAP: i64 = 4 * ROLLUP_MS;

/// Whether minute `b`, the next due minute of a device after `a`, is read with the
/// same events slice as `a`: it is in the same bucket (one partition), and close.
/// The fleet shape (a device per flush with one event a minute) needs one slice
/// per hour of a device instead of one per event.
pub(super) fn one_read(a: i64, b: i64, bucket_len: i64) -> bool {
    b - a <= MAX_GAP && bucket_start(a, bucket_len) == bucket_start(b, bucket_len)
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
    /// computed from its stored events with one slice per bucket they lie in.
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
        let mut bucket = bucket_start(from, len);
        // The run lies in one bucket unless buckets are shorter than a minute.
        while bucket < end {
            let slice = SliceIn {
                user_id: user,
                device_id: device,
                bucket: ms(bucket),
                from_ts: ms(from),
                to_ts: ms(end),
            };
            let _p = self.permit().await;
            let mut rows = self
                .rows::<MetricOut>(&self.cql.metric_slice, slice)
                .await?;
            while let Some(r) = rows.try_next().await? {
                // Events of minutes between the run's that are not due are skipped.
                if let Ok(i) = minutes.binary_search(&bucket_start(r.ts.0, ROLLUP_MS)) {
                    add_event(&mut out[i], r.kind, r.metrics.unwrap_or_default());
                }
            }
            bucket += len;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn a_read_covers_close_minutes_of_one_bucket_only() {
        let m = ROLLUP_MS;
        assert!(one_read(0, m, HOUR));
        assert!(one_read(0, MAX_GAP, HOUR), "a few minutes apart");
        assert!(!one_read(0, MAX_GAP + m, HOUR), "too far apart");
        assert!(!one_read(59 * m, 60 * m, HOUR), "another bucket");
        let due = [0, m, 2 * m, 9 * m, 59 * m, 60 * m];
        let runs = runs(&due, |a, b| one_read(*a, *b, HOUR));
        assert_eq!(runs, [0..3, 3..4, 4..5, 5..6], "runs of one read each");
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
