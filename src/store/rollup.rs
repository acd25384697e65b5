//! Rollups: summaries of events per interval, kept by the stores as events are
//! written, at three levels (minute, hour, day; all UTC-aligned) so that a query reads
//! the coarsest rows that fit its windows (`query::plan` decides which).
//!
//! The levels nest: an hour is exactly its sixty minutes and a day its twenty-four
//! hours, so a window can be composed of rows of several levels and each event counted
//! once.

use crate::model::{DeviceId, UserId};

/// Count, min, max and sum of a set of values. Counting without values (events
/// without a metric) leaves min, max and sum untouched.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
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

    pub fn from_tag(tag: u8) -> Option<Level> {
        [Level::Minute, Level::Hour, Level::Day]
            .into_iter()
            .find(|l| l.tag() == tag)
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
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub start_ms: i64,
    pub kind: String,
    pub summary: Summary,
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
}

/// One (interval, device, type) count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetCount {
    pub start_ms: i64,
    pub device_id: DeviceId,
    pub kind: String,
    pub count: u64,
}
