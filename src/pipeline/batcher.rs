//! Groups records by store partition and closes a batch on size or age.
//!
//! The batcher is plain data with no I/O and no clock of its own: the caller passes
//! the time in. That keeps it easy to property-test; the async loop that drives it is
//! in `pipeline::run_batcher`.
//!
//! Design: a submission (one HTTP request, one MQTT message) is never split across
//! flushes. The whole submission lands in one store write, so a request is stored
//! entirely or not at all, and acknowledging it needs no cross-flush bookkeeping. A
//! flush therefore holds at most `max_events` events, unless a single submission is
//! larger on its own.

use std::collections::HashMap;

use tokio::time::{Duration, Instant};

use crate::model::{PartitionBatch, PartitionKey, Record};

/// A closed batch: what one store write receives, plus one token per submission
/// (the acknowledgement handles, in the pipeline).
#[derive(Debug)]
pub struct Flush<T> {
    pub partitions: Vec<PartitionBatch>,
    pub tokens: Vec<T>,
    pub events: usize,
}

/// Groups submissions into flushes.
#[derive(Debug)]
pub struct Batcher<T> {
    max_events: usize,
    max_age: Duration,
    bucket_len_ms: i64,
    partitions: HashMap<PartitionKey, Vec<Record>>,
    tokens: Vec<T>,
    events: usize,
    opened: Option<Instant>,
}

impl<T> Batcher<T> {
    /// # Panics
    ///
    /// Panics if `max_events` or `bucket_len_ms` is zero.
    pub fn new(max_events: usize, max_age: Duration, bucket_len_ms: i64) -> Self {
        assert!(max_events > 0 && bucket_len_ms > 0);
        Self {
            max_events,
            max_age,
            bucket_len_ms,
            partitions: HashMap::new(),
            tokens: Vec::new(),
            events: 0,
            opened: None,
        }
    }

    /// Adds one submission. Returns a flush when the batch reached its size bound.
    pub fn push(&mut self, records: Vec<Record>, token: T, now: Instant) -> Option<Flush<T>> {
        if self.opened.is_none() {
            self.opened = Some(now);
        }
        self.events += records.len();
        for record in records {
            let key = PartitionKey::of(&record, self.bucket_len_ms);
            self.partitions.entry(key).or_default().push(record);
        }
        self.tokens.push(token);
        if self.events >= self.max_events {
            self.take()
        } else {
            None
        }
    }

    /// When the open batch must be flushed by age, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.max_age)
    }

    /// Closes the open batch, if any.
    pub fn take(&mut self) -> Option<Flush<T>> {
        self.opened.take()?;
        let mut partitions: Vec<PartitionBatch> = self
            .partitions
            .drain()
            .map(|(key, records)| PartitionBatch { key, records })
            .collect();
        // A stable order keeps store writes sequential in key space.
        partitions.sort_unstable_by_key(|p| p.key);
        Some(Flush {
            partitions,
            tokens: std::mem::take(&mut self.tokens),
            events: std::mem::replace(&mut self.events, 0),
        })
    }

    /// Events waiting in the open batch.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.opened.is_none()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;
    use crate::model::Event;

    const BUCKET: i64 = 3_600_000;

    fn record(device: u8, ts_ms: i64, seq: u32) -> Record {
        Record {
            user_id: i64::from(device % 3),
            device_id: Uuid::from_bytes([device; 16]),
            received_ms: 0,
            event: Event {
                id: Uuid::from_u128(u128::from(seq)),
                id_assigned: false,
                ts_ms,
                kind: "t".into(),
                metrics: vec![],
                attrs: vec![],
            },
        }
    }

    fn submissions() -> impl Strategy<Value = Vec<Vec<(u8, i64)>>> {
        let rec = (0u8..5, 0i64..4 * BUCKET);
        prop::collection::vec(prop::collection::vec(rec, 0..40), 0..60)
    }

    proptest! {
        /// Never loses, duplicates, reorders within a partition, or cross-partitions,
        /// and never exceeds the size bound except with one oversized submission.
        #[test]
        fn flushes_keep_every_record_once_in_its_own_partition(
            subs in submissions(),
            max_events in 1usize..100,
        ) {
            let mut batcher = Batcher::new(max_events, Duration::from_millis(5), BUCKET);
            let now = Instant::now();
            let mut seq = 0u32;
            let mut sent = Vec::new();
            let mut flushes = Vec::new();
            for (i, sub) in subs.iter().enumerate() {
                let records: Vec<Record> = sub.iter().map(|&(d, ts)| {
                    seq += 1;
                    record(d, ts, seq)
                }).collect();
                sent.extend(records.iter().cloned());
                if let Some(f) = batcher.push(records, (i, sub.len()), now) {
                    flushes.push(f);
                }
            }
            flushes.extend(batcher.take());
            prop_assert!(batcher.is_empty());

            let mut seen = Vec::new();
            for f in &flushes {
                let total: usize = f.partitions.iter().map(|p| p.records.len()).sum();
                prop_assert_eq!(total, f.events);
                let token_total: usize = f.tokens.iter().map(|t| t.1).sum();
                prop_assert_eq!(token_total, f.events);
                prop_assert!(f.events <= max_events || f.tokens.len() == 1 ||
                    f.events - f.tokens.last().unwrap().1 < max_events);
                for p in &f.partitions {
                    for r in &p.records {
                        prop_assert_eq!(PartitionKey::of(r, BUCKET), p.key);
                    }
                    // Arrival order is kept within a partition.
                    let seqs: Vec<u128> = p.records.iter().map(|r| r.event.id.as_u128()).collect();
                    let mut sorted = seqs.clone();
                    sorted.sort();
                    prop_assert_eq!(&seqs, &sorted);
                    seen.extend(p.records.iter().cloned());
                }
            }
            sent.sort_by_key(|r| r.event.id);
            seen.sort_by_key(|r| r.event.id);
            prop_assert_eq!(sent, seen);
        }
    }

    #[test]
    fn the_deadline_is_the_age_of_the_oldest_submission() {
        let mut b = Batcher::new(100, Duration::from_millis(5), BUCKET);
        assert_eq!(b.deadline(), None);
        let t0 = Instant::now();
        assert!(b.push(vec![record(1, 0, 1)], (), t0).is_none());
        b.push(vec![record(1, 0, 2)], (), t0 + Duration::from_millis(3));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(5)));
        let f = b.take().unwrap();
        assert_eq!(f.events, 2);
        assert_eq!(b.deadline(), None);
        assert!(b.take().is_none());
    }

    #[test]
    fn a_submission_reaching_the_size_bound_flushes_at_once() {
        let mut b = Batcher::new(3, Duration::from_secs(60), BUCKET);
        let t0 = Instant::now();
        assert!(b
            .push(vec![record(1, 0, 1), record(2, 0, 2)], (), t0)
            .is_none());
        let f = b.push(vec![record(1, 0, 3)], (), t0).unwrap();
        assert_eq!(f.events, 3);
        assert_eq!(f.partitions.len(), 2);
    }
}
