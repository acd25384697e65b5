//! The windows of an aggregate, in UTC or aligned to a time zone's local midnight.
//!
//! - **UTC** (the default): windows start at multiples of their length since the epoch.
//! - **A time zone** (`tz=Europe/Berlin`): windows of whole days start at local
//!   midnights, counted in local days since 1970-01-01, so a day window is a local
//!   calendar day of 23, 24 or 25 hours. Windows that divide a day start at each
//!   local midnight and run in absolute time from there: a day with a DST change has
//!   23 or 25 one-hour windows, and the last window of a day is cut at the next
//!   midnight when the day is not a multiple of the window. Zones with :30 or :45
//!   offsets get hours that start at :30 or :45 UTC.
//!
//! Windows are only boundaries: they are composed from UTC rollups at query time
//! (`plan.rs`), never stored per zone.

use chrono::{Duration, LocalResult, NaiveDate, TimeZone};
use chrono_tz::Tz;

use super::Range;
use crate::model::bucket_start;
use crate::store::{Sketch, Summary};

const DAY_MS: i64 = 86_400_000;

/// The window boundaries over a range: window `i` is `[bounds[i], bounds[i + 1])`.
/// The first window holds `range.from_ms`, the last `range.to_ms - 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid {
    bounds: Vec<i64>,
    /// The window length when every window has it (UTC), for arithmetic lookups.
    uniform: Option<i64>,
}

/// Why a time-zone grid cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("with a time zone, the window must divide a day or be a whole number of days")]
pub struct UnalignedWindow;

impl Grid {
    /// UTC windows of `window_ms`.
    pub fn utc(range: Range, window_ms: i64) -> Grid {
        let mut bounds = Vec::new();
        if !range.is_empty() {
            let mut at = bucket_start(range.from_ms, window_ms);
            bounds.push(at);
            while at < range.to_ms {
                at += window_ms;
                bounds.push(at);
            }
        }
        Grid {
            bounds,
            uniform: Some(window_ms),
        }
    }

    /// Windows of `window_ms` aligned to local midnight in `tz` (see the module docs).
    ///
    /// # Errors
    ///
    /// A window that neither divides a day nor is a whole number of days.
    pub fn zoned(range: Range, window_ms: i64, tz: Tz) -> Result<Grid, UnalignedWindow> {
        let whole_days = window_ms % DAY_MS == 0;
        if !whole_days && DAY_MS % window_ms != 0 {
            return Err(UnalignedWindow);
        }
        let mut bounds = Vec::new();
        if range.is_empty() {
            return Ok(Grid {
                bounds,
                uniform: None,
            });
        }
        let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("a valid date");
        let first = local_date(tz, range.from_ms);
        if whole_days {
            let k = window_ms / DAY_MS;
            let n = (first - epoch).num_days();
            let mut date = epoch + Duration::days(n.div_euclid(k) * k);
            loop {
                let at = local_midnight(tz, date);
                push_bound(&mut bounds, at, range.from_ms);
                if at >= range.to_ms {
                    break;
                }
                date += Duration::days(k);
            }
        } else {
            let mut date = first;
            'days: loop {
                let (start, end) = (
                    local_midnight(tz, date),
                    local_midnight(tz, date + Duration::days(1)),
                );
                let mut at = start;
                while at < end {
                    push_bound(&mut bounds, at, range.from_ms);
                    if at >= range.to_ms {
                        break 'days;
                    }
                    at += window_ms;
                }
                date += Duration::days(1);
            }
        }
        Ok(Grid {
            bounds,
            uniform: None,
        })
    }

    /// How many windows.
    pub fn len(&self) -> usize {
        self.bounds.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Window `i`, as `[start, end)`.
    pub fn window(&self, i: usize) -> (i64, i64) {
        (self.bounds[i], self.bounds[i + 1])
    }

    /// The window holding `ts_ms`, if any.
    pub fn slot(&self, ts_ms: i64) -> Option<usize> {
        let first = *self.bounds.first()?;
        let i = match self.uniform {
            Some(len) => usize::try_from((ts_ms - first).div_euclid(len)).ok()?,
            None => self
                .bounds
                .partition_point(|&b| b <= ts_ms)
                .checked_sub(1)?,
        };
        (i < self.len()).then_some(i)
    }
}

/// Appends a boundary, keeping only the last one at or before `from` as the first.
fn push_bound(bounds: &mut Vec<i64>, at: i64, from_ms: i64) {
    if bounds.len() == 1 && at <= from_ms {
        bounds[0] = at;
    } else {
        bounds.push(at);
    }
}

fn local_date(tz: Tz, ts_ms: i64) -> NaiveDate {
    tz.timestamp_millis_opt(ts_ms)
        .single()
        .map(|t| t.date_naive())
        .unwrap_or_default()
}

/// The first instant of a local date. Where midnight falls in a DST gap (some zones
/// change at 00:00) the day starts at the first local time that exists.
fn local_midnight(tz: Tz, date: NaiveDate) -> i64 {
    let mut t = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    loop {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(x) => return x.timestamp_millis(),
            LocalResult::Ambiguous(earliest, _) => return earliest.timestamp_millis(),
            // Transitions happen on quarter hours.
            LocalResult::None => t += Duration::minutes(15),
        }
    }
}

/// One non-empty window of a device aggregate.
#[derive(Debug, Clone)]
pub struct Window {
    pub start_ms: i64,
    pub stats: Summary,
    /// The sketch of the metric's values, when percentiles were asked for.
    pub sketch: Option<Sketch>,
}

/// Accumulates summaries (and, if asked, sketches) into the windows of a grid.
#[derive(Debug)]
pub struct Windows {
    grid: Grid,
    stats: Vec<Summary>,
    sketches: Option<Vec<Option<Sketch>>>,
}

impl Windows {
    pub fn new(grid: Grid) -> Self {
        let stats = vec![Summary::EMPTY; grid.len()];
        Self {
            grid,
            stats,
            sketches: None,
        }
    }

    /// Windows that also merge sketches.
    pub fn with_sketches(grid: Grid) -> Self {
        let mut w = Windows::new(grid);
        w.sketches = Some(vec![None; w.stats.len()]);
        w
    }

    /// Merges a sketch of values that all fall in the window holding `ts_ms`.
    pub fn merge_sketch(&mut self, ts_ms: i64, sketch: &Sketch) {
        if let (Some(i), Some(sketches)) = (self.grid.slot(ts_ms), self.sketches.as_mut()) {
            match &mut sketches[i] {
                Some(s) => s.merge(sketch),
                slot => *slot = Some(sketch.clone()),
            }
        }
    }

    pub fn add(&mut self, ts_ms: i64, value: Option<f64>) {
        if let Some(i) = self.grid.slot(ts_ms) {
            self.stats[i].add(value);
        }
    }

    /// Merges a summary of events that all fall in the window holding `ts_ms`.
    pub fn merge(&mut self, ts_ms: i64, summary: &Summary) {
        if let Some(i) = self.grid.slot(ts_ms) {
            self.stats[i].merge(summary);
        }
    }

    /// The non-empty windows, in ascending order.
    pub fn finish(self) -> Vec<Window> {
        let grid = self.grid;
        let mut sketches = self.sketches;
        self.stats
            .into_iter()
            .enumerate()
            .filter(|(_, s)| s.count > 0)
            .map(|(i, stats)| Window {
                start_ms: grid.window(i).0,
                stats,
                sketch: sketches.as_mut().and_then(|s| s[i].take()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    fn range(from: &str, to: &str) -> Range {
        Range {
            from_ms: at(from),
            to_ms: at(to),
        }
    }

    #[test]
    fn utc_windows_start_at_multiples_of_their_length() {
        let g = Grid::utc(
            Range {
                from_ms: 1_500,
                to_ms: 10_000,
            },
            1000,
        );
        assert_eq!(g.len(), 9);
        assert_eq!(g.window(0), (1_000, 2_000));
        assert_eq!(g.slot(9_999), Some(8));
        assert_eq!(g.slot(10_000), None);
        assert_eq!(g.slot(999), None);
    }

    #[test]
    fn berlin_days_follow_dst_with_23_and_25_hour_days() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // Spring forward on 2026-03-29, fall back on 2026-10-25.
        let g = Grid::zoned(
            range("2026-03-28T12:00:00Z", "2026-03-30T12:00:00Z"),
            DAY_MS,
            tz,
        )
        .unwrap();
        assert_eq!(g.bounds[0], at("2026-03-27T23:00:00Z"));
        assert_eq!(g.bounds[1], at("2026-03-28T23:00:00Z"));
        assert_eq!(g.bounds[2], at("2026-03-29T22:00:00Z"), "a 23-hour day");
        let g = Grid::zoned(
            range("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
            3_600_000,
            tz,
        )
        .unwrap();
        assert_eq!(g.bounds[0], at("2026-10-24T22:00:00Z"));
        let day: Vec<_> = (0..g.len()).map(|i| g.window(i)).collect();
        assert_eq!(day.last().unwrap().1, at("2026-10-25T23:00:00Z"));
        assert_eq!(day.len(), 25, "a 25-hour day has 25 hour windows");
    }

    #[test]
    fn half_and_quarter_hour_zones_start_hours_off_the_utc_hour() {
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let g = Grid::zoned(
            range("2026-06-01T00:00:00Z", "2026-06-01T03:00:00Z"),
            3_600_000,
            kolkata,
        )
        .unwrap();
        assert_eq!(g.bounds[0], at("2026-05-31T23:30:00Z"));
        let kathmandu: Tz = "Asia/Kathmandu".parse().unwrap();
        let g = Grid::zoned(
            range("2026-06-01T00:00:00Z", "2026-06-02T00:00:00Z"),
            DAY_MS,
            kathmandu,
        )
        .unwrap();
        assert_eq!(g.bounds[0], at("2026-05-31T18:15:00Z"));
        assert_eq!(g.bounds[1], at("2026-06-01T18:15:00Z"));
    }

    #[test]
    fn windows_that_do_not_divide_a_day_are_refused_with_a_zone() {
        let tz: Tz = "UTC".parse().unwrap();
        let r = range("2026-06-01T00:00:00Z", "2026-06-02T00:00:00Z");
        assert_eq!(Grid::zoned(r, 7 * 3_600_000, tz), Err(UnalignedWindow));
        assert!(Grid::zoned(r, 2 * DAY_MS, tz).is_ok());
        // UTC as a zone gives the UTC grid.
        assert_eq!(
            Grid::zoned(r, 3_600_000, tz).unwrap().bounds,
            Grid::utc(r, 3_600_000).bounds
        );
    }
}
