//! How an aggregate is read: which parts of the range come from which rollup level,
//! and which from the raw events. One plan for every store; the stores only answer
//! the reads.
//!
//! Each window (clipped to the range) is cut into the coarsest whole rollup intervals
//! that fit inside it: days in the middle, then hours, then minutes towards its edges,
//! and raw events for the ragged ends. Every interval lies inside one window, so each
//! event is counted once, in its window. Neighbouring pieces of the same level are
//! then joined, so a day of hour windows is one read of 24 hour rows, not 24 reads.

use super::windows::Grid;
use super::Range;
use crate::model::bucket_start;
use crate::store::Level;

/// Where a piece of the range is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Raw,
    Rollup(Level),
}

/// A piece of the range and where to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub source: Source,
    pub range: Range,
}

/// The plan for `range` over `grid`, in time order.
pub fn plan(grid: &Grid, range: Range) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for i in 0..grid.len() {
        let (start, end) = grid.window(i);
        let (a, b) = (start.max(range.from_ms), end.min(range.to_ms));
        if a < b {
            cut(a, b, &Level::COARSEST_FIRST, &mut out);
        }
    }
    out
}

/// The pieces of `[from_ms, to_ms)` at `levels` (coarsest first) and below, for a
/// store that answered no rows at a coarser level: the range is aligned to that level,
/// so to every finer one.
pub fn refine(range: Range, levels: &[Level]) -> Vec<Segment> {
    let mut out = Vec::new();
    cut(range.from_ms, range.to_ms, levels, &mut out);
    out
}

fn cut(a: i64, b: i64, levels: &[Level], out: &mut Vec<Segment>) {
    let Some((&level, finer)) = levels.split_first() else {
        push(out, Source::Raw, a, b);
        return;
    };
    let len = level.ms();
    let s = -bucket_start(-a, len); // rounded up
    let e = bucket_start(b, len);
    if s >= e {
        cut(a, b, finer, out);
        return;
    }
    if a < s {
        cut(a, s, finer, out);
    }
    push(out, Source::Rollup(level), s, e);
    if e < b {
        cut(e, b, finer, out);
    }
}

/// Appends a piece, joining it to the last one when they meet and share a source.
fn push(out: &mut Vec<Segment>, source: Source, from_ms: i64, to_ms: i64) {
    if let Some(last) = out.last_mut() {
        if last.source == source && last.range.to_ms == from_ms {
            last.range.to_ms = to_ms;
            return;
        }
    }
    out.push(Segment {
        source,
        range: Range { from_ms, to_ms },
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 60_000;
    const H: i64 = 3_600_000;
    const D: i64 = 86_400_000;

    fn r(from_ms: i64, to_ms: i64) -> Range {
        Range { from_ms, to_ms }
    }

    fn seg(source: Source, from_ms: i64, to_ms: i64) -> Segment {
        Segment {
            source,
            range: r(from_ms, to_ms),
        }
    }

    #[test]
    fn aligned_hour_windows_read_one_run_of_hour_rows() {
        let range = r(10 * D, 11 * D);
        let p = plan(&Grid::utc(range, H), range);
        assert_eq!(p, vec![seg(Source::Rollup(Level::Hour), 10 * D, 11 * D)]);
        let p = plan(&Grid::utc(range, D), range);
        assert_eq!(p, vec![seg(Source::Rollup(Level::Day), 10 * D, 11 * D)]);
    }

    #[test]
    fn ragged_edges_step_down_through_the_levels_to_raw() {
        let from = 10 * D - 2 * H - 3 * M - 500;
        let to = 12 * D + H + 2 * M + 7;
        let range = r(from, to);
        let p = plan(&Grid::utc(range, D), range);
        assert_eq!(
            p,
            vec![
                seg(Source::Raw, from, 10 * D - 2 * H - 3 * M),
                seg(
                    Source::Rollup(Level::Minute),
                    10 * D - 2 * H - 3 * M,
                    10 * D - 2 * H
                ),
                seg(Source::Rollup(Level::Hour), 10 * D - 2 * H, 10 * D),
                seg(Source::Rollup(Level::Day), 10 * D, 12 * D),
                seg(Source::Rollup(Level::Hour), 12 * D, 12 * D + H),
                seg(
                    Source::Rollup(Level::Minute),
                    12 * D + H,
                    12 * D + H + 2 * M
                ),
                seg(Source::Raw, 12 * D + H + 2 * M, to),
            ]
        );
    }

    #[test]
    fn windows_shorter_than_a_minute_are_read_raw() {
        let range = r(0, 5 * M);
        let p = plan(&Grid::utc(range, 30_000), range);
        assert_eq!(p, vec![seg(Source::Raw, 0, 5 * M)]);
        // 90 s windows: whole minutes inside, raw halves between.
        let p = plan(&Grid::utc(r(0, 3 * M), 90_000), r(0, 3 * M));
        assert_eq!(
            p,
            vec![
                seg(Source::Rollup(Level::Minute), 0, M),
                seg(Source::Raw, M, 2 * M),
                seg(Source::Rollup(Level::Minute), 2 * M, 3 * M),
            ]
        );
    }

    #[test]
    fn a_zoned_day_is_made_of_hours_when_midnight_is_not_utc() {
        let tz: chrono_tz::Tz = "Europe/Berlin".parse().unwrap();
        // 2026-01-10 and 11, local: 23:00 UTC to 23:00 UTC.
        let from = 20_463 * D - H;
        let range = r(from, from + 2 * D);
        let p = plan(&Grid::zoned(range, D, tz).unwrap(), range);
        // A Berlin day never holds a whole UTC day: all hours, in one run.
        assert_eq!(
            p,
            vec![seg(Source::Rollup(Level::Hour), from, from + 2 * D)]
        );
        // Kathmandu hours start at :15, so its days are made of minutes.
        let tz: chrono_tz::Tz = "Asia/Kathmandu".parse().unwrap();
        let p = plan(&Grid::zoned(range, H, tz).unwrap(), range);
        assert!(p
            .iter()
            .all(|s| s.source == Source::Rollup(Level::Minute) || s.source == Source::Raw));
    }

    proptest::proptest! {
        /// The plan covers the range exactly, in order, and no rollup piece
        /// straddles a window boundary.
        #[test]
        fn plans_tile_the_range_and_respect_windows(
            from in 0i64..40 * D,
            span in 1i64..40 * D,
            window in proptest::sample::select(vec![1_000, 30_000, M, 90_000, 5 * M, H, 2 * H, D, 7 * D]),
        ) {
            let range = r(from, from + span);
            if range.window_count(window) > 20_000 {
                return Ok(());
            }
            let grid = Grid::utc(range, window);
            let p = plan(&grid, range);
            let mut at = range.from_ms;
            for s in &p {
                proptest::prop_assert_eq!(s.range.from_ms, at);
                proptest::prop_assert!(s.range.to_ms > s.range.from_ms);
                at = s.range.to_ms;
                if let Source::Rollup(level) = s.source {
                    proptest::prop_assert_eq!(s.range.from_ms % level.ms(), 0);
                    proptest::prop_assert_eq!(s.range.to_ms % level.ms(), 0);
                    let mut t = s.range.from_ms;
                    while t < s.range.to_ms {
                        proptest::prop_assert_eq!(grid.slot(t), grid.slot(t + level.ms() - 1));
                        t += level.ms();
                    }
                }
            }
            proptest::prop_assert_eq!(at, range.to_ms);
        }
    }
}
