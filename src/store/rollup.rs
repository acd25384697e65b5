//! Rollups: summaries of events per interval, kept by the stores as events are
//! written, at three levels (minute, hour, day; all UTC-aligned) so that a query reads
//! the coarsest rows that fit its windows (`query::plan` decides which).
//!
//! The levels nest: an hour is exactly its sixty minutes and a day its twenty-four
//! hours, so a window can be composed of rows of several levels and each event counted
//! once.

use sketches_ddsketch::{Config, DDSketch};

use crate::model::{DeviceId, UserId};
use crate::store::StoreError;

/// Count, min, max and sum of a set of values. Counting without values (events
/// without a metric) leaves min, max and sum untouched.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
}

impl Default for Summary {
    fn default() -> Self {
        Summary::EMPTY
    }
}

impl Summary {
    pub const EMPTY: Summary = Summary {
        count: 0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sum: 0.0,
    };

    pub fn add(&mut self, value: Option<f64>) {
        self.count += 1;
        if let Some(v) = value {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
            self.sum += v;
        }
    }

    pub fn merge(&mut self, other: &Summary) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
    }

    pub fn avg(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// The relative error of a percentile read from a [`Sketch`]: the value returned for
/// a rank is within 1% of the exact value at that rank.
pub const SKETCH_RELATIVE_ERROR: f64 = 0.01;

/// A mergeable quantile sketch of a metric's values (DDSketch): kept beside each hour
/// and day row of a metric, so that percentiles of long windows are merged from rows
/// like the other figures. Minute rows need not keep one (a sketch costs about a
/// kilobyte in memory, and a minute often holds a single value): the query layer
/// reads the events of minute pieces instead. Values whose magnitude is below 1e-9
/// count as zero.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Sketch(DDSketch);

impl Sketch {
    pub fn new() -> Self {
        // 2,048 bins per sign hold values over a ratio of e^80 without collapsing.
        Sketch(DDSketch::new(Config::new(
            SKETCH_RELATIVE_ERROR,
            2_048,
            1e-9,
        )))
    }

    pub fn of(value: f64) -> Self {
        let mut s = Sketch::new();
        s.add(value);
        s
    }

    pub fn add(&mut self, value: f64) {
        self.0.add(value);
    }

    pub fn merge(&mut self, other: &Sketch) {
        // Every sketch is made by `new`, with one configuration, so merging cannot
        // fail.
        let _ = self.0.merge(&other.0);
    }

    pub fn count(&self) -> usize {
        self.0.count()
    }

    /// The value at rank `floor(q * (n - 1))` of the sorted values, within
    /// [`SKETCH_RELATIVE_ERROR`]; `None` when empty. `q` is in `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.0.quantile(q).ok().flatten()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a sketch always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("sketch: {e}")))
    }
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::new()
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sketch({} values)", self.count())
    }
}

/// A summary and, for a metric, the sketch of its values: what a rollup row holds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub summary: Summary,
    pub sketch: Option<Sketch>,
}

impl Stats {
    /// Counts an event; with a value, also adds it to the sketch.
    pub fn add(&mut self, value: Option<f64>) {
        self.summary.add(value);
        if let Some(v) = value {
            self.sketch.get_or_insert_with(Sketch::new).add(v);
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        self.summary.merge(&other.summary);
        match (self.sketch.as_mut(), other.sketch.as_ref()) {
            (Some(a), Some(b)) => a.merge(b),
            (None, Some(b)) => self.sketch = Some(b.clone()),
            _ => {}
        }
    }
}

/// A rollup level. Every level's intervals start at multiples of its length since the
/// epoch, in UTC; local-time windows are composed of them at query time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Minute,
    Hour,
    Day,
}

impl Level {
    /// Coarsest first: the order in which a planner tries them.
    pub const COARSEST_FIRST: [Level; 3] = [Level::Day, Level::Hour, Level::Minute];

    /// The interval length in milliseconds.
    pub const fn ms(self) -> i64 {
        match self {
            Level::Minute => 60_000,
            Level::Hour => 3_600_000,
            Level::Day => 86_400_000,
        }
    }

    /// A stable one-byte tag, for keys and columns.
    pub const fn tag(self) -> u8 {
        match self {
            Level::Minute => 0,
            Level::Hour => 1,
            Level::Day => 2,
        }
    }
}

/// Length of the finest rollup interval.
pub const ROLLUP_MS: i64 = Level::Minute.ms();

/// One device's summaries at one level in `[from_ms, to_ms)`; both ends are multiples
/// of the level's length.
#[derive(Debug, Clone)]
pub struct RollupQuery {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub level: Level,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Summaries of this metric's values; `None` counts all events.
    pub metric: Option<String>,
    /// Only events of this type.
    pub kind: Option<String>,
}

/// One interval of one event type.
#[derive(Debug, Clone)]
pub struct Rollup {
    pub start_ms: i64,
    pub kind: String,
    pub summary: Summary,
    /// The metric's values, for rows of a metric (none for counts of all events, nor
    /// for rows written before sketches were kept).
    pub sketch: Option<Sketch>,
}

/// The event counts of all of a user's devices at one level in `[from_ms, to_ms)`;
/// both ends are multiples of the level's length.
#[derive(Debug, Clone)]
pub struct FleetQuery {
    pub user_id: UserId,
    pub level: Level,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Only events of this type.
    pub kind: Option<String>,
    /// Whether the counts must keep types apart. Without, a store may answer each
    /// device's total over its types (with `kind` empty), which is all `group_by=device`
    /// needs and may be cheaper to read.
    pub by_type: bool,
}

/// One (interval, device, type) count; with a query that needs no types, possibly the
/// device's total over them, of type "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCount {
    pub start_ms: i64,
    pub device_id: DeviceId,
    pub kind: String,
    pub count: u64,
}
