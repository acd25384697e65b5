//! Empty windows: left out (`fill=none`, the default), or filled so that a chart gets
//! one point per window.
//!
//! - `null`: the window is listed with a count of 0 and null statistics.
//! - `zero`: count 0 and statistics 0.
//! - `previous`: count 0, and min, max and avg carry the avg of the last window
//!   before it that had values; before the first such window, the last value stored
//!   before the range (looked back up to a year), so the first windows are not empty.
//! - `linear`: count 0, and min, max and avg are interpolated in time between the
//!   windows around it (window starts; the value carried in counts as a point at its
//!   own time). Windows after the last one with values stay null: there is nothing to
//!   interpolate towards.
//!
//! Filled windows say so (`filled: true`), and their `sum` is null: a carried or
//! interpolated level is not a total. Without a metric only counts exist, so every
//! mode but `none` lists the empty windows with a count of 0.

use super::windows::{Grid, Window};
use crate::store::Sketch;

/// How empty windows are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum Fill {
    None,
    Null,
    Zero,
    Previous,
    Linear,
}

impl Fill {
    pub fn parse(s: &str) -> Option<Fill> {
        Some(match s {
            "none" => Fill::None,
            "null" => Fill::Null,
            "zero" => Fill::Zero,
            "previous" => Fill::Previous,
            "linear" => Fill::Linear,
            _ => return None,
        })
    }

    /// Whether this mode needs the last value before the range.
    pub fn carries_in(self) -> bool {
        matches!(self, Fill::Previous | Fill::Linear)
    }
}

/// Statistics of a window, any of which may be unknown.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stats {
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub avg: Option<f64>,
    pub sum: Option<f64>,
}

impl Stats {
    fn level(v: Option<f64>) -> Stats {
        Stats {
            min: v,
            max: v,
            avg: v,
            sum: None,
        }
    }
}

/// One window as answered.
#[derive(Debug, Clone)]
pub struct Filled {
    pub start_ms: i64,
    pub count: u64,
    pub stats: Stats,
    pub filled: bool,
    /// The window's sketch, if asked for (never on filled windows).
    pub sketch: Option<Sketch>,
}

/// The answer for every window of `grid` (every non-empty one, for `Fill::None`).
/// `carry_in` is the last (ts, value) before the range, for `previous` and `linear`.
pub fn fill(
    grid: &Grid,
    windows: Vec<Window>,
    mode: Fill,
    carry_in: Option<(i64, f64)>,
) -> Vec<Filled> {
    let real = |w: Window| Filled {
        sketch: w.sketch,
        start_ms: w.start_ms,
        count: w.stats.count,
        stats: if w.stats.min.is_finite() {
            Stats {
                min: Some(w.stats.min),
                max: Some(w.stats.max),
                avg: Some(w.stats.avg()),
                sum: Some(w.stats.sum),
            }
        } else {
            Stats::default()
        },
        filled: false,
    };
    if mode == Fill::None {
        return windows.into_iter().map(real).collect();
    }
    let mut out = Vec::with_capacity(grid.len());
    let mut next = windows.into_iter().peekable();
    for i in 0..grid.len() {
        let start_ms = grid.window(i).0;
        match next.next_if(|w| w.start_ms == start_ms) {
            Some(w) => out.push(real(w)),
            None => out.push(Filled {
                sketch: None,
                start_ms,
                count: 0,
                stats: match mode {
                    Fill::Zero => Stats {
                        min: Some(0.0),
                        max: Some(0.0),
                        avg: Some(0.0),
                        sum: Some(0.0),
                    },
                    _ => Stats::default(),
                },
                filled: true,
            }),
        }
    }
    match mode {
        Fill::Previous => carry_previous(&mut out, carry_in),
        Fill::Linear => interpolate(&mut out, carry_in),
        _ => {}
    }
    out
}

fn carry_previous(out: &mut [Filled], carry_in: Option<(i64, f64)>) {
    let mut last = carry_in.map(|(_, v)| v);
    for w in out {
        if w.filled {
            w.stats = Stats::level(last);
        } else if w.stats.avg.is_some() {
            last = w.stats.avg;
        }
    }
}

fn interpolate(out: &mut [Filled], carry_in: Option<(i64, f64)>) {
    let mut before = carry_in;
    let mut i = 0;
    while i < out.len() {
        if !out[i].filled {
            if let Some(avg) = out[i].stats.avg {
                before = Some((out[i].start_ms, avg));
            }
            i += 1;
            continue;
        }
        // A run of filled windows, up to the next window with values.
        let run_end = (i..out.len())
            .find(|&j| !out[j].filled && out[j].stats.avg.is_some())
            .unwrap_or(out.len());
        let after = out
            .get(run_end)
            .and_then(|w| w.stats.avg.map(|v| (w.start_ms, v)));
        for w in &mut out[i..run_end] {
            if !w.filled {
                continue;
            }
            let v = match (before, after) {
                (Some((t0, v0)), Some((t1, v1))) if t1 > t0 => {
                    Some(v0 + (v1 - v0) * (w.start_ms - t0) as f64 / (t1 - t0) as f64)
                }
                _ => None,
            };
            w.stats = Stats::level(v);
        }
        i = run_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Range;
    use crate::store::Summary;

    fn grid() -> Grid {
        Grid::utc(
            Range {
                from_ms: 0,
                to_ms: 5_000,
            },
            1000,
        )
    }

    fn w(start_ms: i64, v: f64) -> Window {
        let mut stats = Summary::EMPTY;
        stats.add(Some(v));
        Window {
            start_ms,
            stats,
            sketch: None,
        }
    }

    fn avgs(out: &[Filled]) -> Vec<Option<f64>> {
        out.iter().map(|f| f.stats.avg).collect()
    }

    #[test]
    fn every_mode_fills_as_documented() {
        let windows = vec![w(1000, 10.0), w(3000, 20.0)];
        let none = fill(&grid(), windows.clone(), Fill::None, None);
        assert_eq!(none.len(), 2);
        let null = fill(&grid(), windows.clone(), Fill::Null, None);
        assert_eq!(avgs(&null), [None, Some(10.0), None, Some(20.0), None]);
        assert_eq!(null[0].count, 0);
        assert!(null[0].filled && !null[1].filled);
        let zero = fill(&grid(), windows.clone(), Fill::Zero, None);
        assert_eq!(
            avgs(&zero),
            [Some(0.0), Some(10.0), Some(0.0), Some(20.0), Some(0.0)]
        );
        let prev = fill(&grid(), windows.clone(), Fill::Previous, Some((-500, 4.0)));
        assert_eq!(
            avgs(&prev),
            [Some(4.0), Some(10.0), Some(10.0), Some(20.0), Some(20.0)]
        );
        assert_eq!(prev[2].stats.sum, None);
        let lin = fill(&grid(), windows, Fill::Linear, Some((-1000, 0.0)));
        assert_eq!(
            avgs(&lin),
            [Some(5.0), Some(10.0), Some(15.0), Some(20.0), None]
        );
    }

    #[test]
    fn nothing_to_carry_in_leaves_the_first_windows_null() {
        let out = fill(&grid(), vec![w(2000, 1.0)], Fill::Previous, None);
        assert_eq!(avgs(&out), [None, None, Some(1.0), Some(1.0), Some(1.0)]);
        let out = fill(&grid(), vec![w(2000, 1.0)], Fill::Linear, None);
        assert_eq!(avgs(&out), [None, None, Some(1.0), None, None]);
    }
}
