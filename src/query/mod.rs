//! Reads: windowed aggregates and event listings, computed above the store trait so
//! that every backend shares the same semantics.
//!
//! - Windows are UTC-aligned, or aligned to a time zone's local midnight
//!   (`windows.rs`). The range is half-open, `[from, to)`.
//! - A plan (`plan.rs`) reads each window from the coarsest rollups that fit inside it
//!   (day, hour, minute) and the ragged edges from raw events; a store that keeps no
//!   rollups at some level is read at the finer ones, down to raw events.
//! - Grouped aggregates read the stores' fleet rows, one row per device per window,
//!   where they keep them (`aggregate.rs`), and sum them per window and group
//!   (`groups.rs`).
//! - Raw scans fan out in parallel over chunks of the range that follow partition
//!   (bucket) boundaries.
//! - Empty windows are left out, or filled as asked (`fill.rs`).

pub mod aggregate;
pub mod export;
pub mod fill;
mod groups;
pub mod latest;
pub mod params;
pub mod plan;
pub mod routes;
pub mod totals;
pub mod windows;

pub use aggregate::{device_aggregate, fleet_pieces, grouped_counts, AggregateFilter, FleetPieces};
pub use groups::{GroupBy, GroupCount};
pub use windows::{Grid, Window, Windows};

use crate::model::{bucket_start, UserId, MIN_TS_MS, QUERY_AHEAD_MS};
use crate::store::EventStore;

/// Most windows one query may span.
pub const MAX_WINDOWS: i64 = 10_000;

/// A half-open time range `[from_ms, to_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
}

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

/// Whose data a query reads, and from where.
#[derive(Clone, Copy)]
pub struct Scope<'a> {
    pub store: &'a dyn EventStore,
    pub user_id: UserId,
    /// The store's partition bucket length, for splitting scans.
    pub bucket_len_ms: i64,
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
                proptest::prop_assert!(Grid::utc(r, window).len() as i64 <= MAX_WINDOWS + 1);
            }
            let chunks = r.chunks(bucket, n.clamp(1, 8));
            proptest::prop_assert!(chunks.len() as i64 <= 8);
            let mut at = r.from_ms;
            for c in &chunks {
                proptest::prop_assert_eq!(c.from_ms, at);
                proptest::prop_assert!(c.to_ms > c.from_ms);
                at = c.to_ms;
            }
            if !r.is_empty() {
                proptest::prop_assert_eq!(at, r.to_ms);
            }
        }
    }
}
