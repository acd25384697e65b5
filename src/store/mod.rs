//! Where events are written and read back.
//!
//! [`EventStore`] is the seam between the shared logic and an engine. Above it sit
//! partitioning (the batcher), validation (ingest) and aggregation (query); below it an
//! adapter only turns partitions into engine writes and range scans into rows.
//!
//! Contract of every implementation:
//! - [`EventStore::write`] returns only once the events are durable, and stores each
//!   (device, event id) once: a duplicate id is skipped even if its `ts` differs.
//! - Events are ordered by (user, device, bucket, ts, id).

pub mod embedded;
pub mod latest;
pub mod scylla;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::{DeviceId, Event, UserId};
use crate::pipeline::batcher::PartitionBatch;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The engine cannot be reached or is overloaded; worth retrying.
    #[error("event store unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the request itself; retrying cannot help.
    #[error("event store refused the request: {0}")]
    Invalid(String),
    /// Data read back could not be decoded.
    #[error("event store returned undecodable data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Timeouts and overload are retried; invalid requests and bad data never are.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A position in a device's event order, used for paging newest-first listings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub ts_ms: i64,
    pub id: Uuid,
}

/// One device's events in `[from_ms, to_ms)`, newest first.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Only events strictly older than this position (the previous page's last event).
    pub before: Option<Position>,
    pub kind: Option<String>,
    pub limit: usize,
}

/// A projection of one device's events in `[from_ms, to_ms)`, oldest first: just what
/// aggregation needs, so that engines can skip decoding the rest.
#[derive(Debug, Clone)]
pub struct PointQuery {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Only events of this type.
    pub kind: Option<String>,
    /// Only events that carry this metric, with its value in [`Point::value`].
    pub metric: Option<String>,
    /// Fill [`Point::kind`].
    pub with_kind: bool,
}

/// One event, projected.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub ts_ms: i64,
    pub value: Option<f64>,
    pub kind: Option<String>,
}

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

/// Length of a rollup interval: engines that keep rollups keep one per minute.
pub const ROLLUP_MS: i64 = 60_000;

/// Per-minute summaries of one device in `[from_ms, to_ms)`; both ends are multiples
/// of [`ROLLUP_MS`].
#[derive(Debug, Clone)]
pub struct RollupQuery {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub from_ms: i64,
    pub to_ms: i64,
    /// Summaries of this metric's values; `None` counts all events.
    pub metric: Option<String>,
    /// Only events of this type.
    pub kind: Option<String>,
}

/// One minute of one event type.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub minute_ms: i64,
    pub kind: String,
    pub summary: Summary,
}

/// An event engine. See the module docs for the contract.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// The engine's name, as `/health` reports it.
    fn backend(&self) -> &'static str;

    /// Writes a flush durably. Returns, for each partition in order, how many of its
    /// events were new (not duplicates of stored ones or of earlier ones in the flush).
    async fn write(&self, partitions: Arc<Vec<PartitionBatch>>) -> Result<Vec<usize>, StoreError>;

    /// Lists events newest first, at most `limit`.
    async fn list(&self, query: ListQuery) -> Result<Vec<Event>, StoreError>;

    /// Scans a projection oldest first.
    async fn points(&self, query: PointQuery) -> Result<Vec<Point>, StoreError>;

    /// Per-minute summaries, oldest first, for engines that maintain them as they
    /// write (counting each event once, duplicates never). `Ok(None)` means the engine
    /// keeps none, and the caller scans points instead.
    async fn rollups(&self, query: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError>;

    /// The newest value of each metric of `device`, or of every device of `user`
    /// (`None`), in no particular order. Kept as events are written; an older event
    /// never replaces a newer value.
    async fn latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<latest::Latest>, StoreError>;

    /// A cheap round trip, for `/health`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Makes everything written durable and releases the engine.
    async fn close(&self) -> Result<(), StoreError>;
}

/// Shared handle to the configured store.
pub type SharedStore = Arc<dyn EventStore>;
