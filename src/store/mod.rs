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
pub mod retention;
pub mod rollup;
pub mod scylla;

use std::sync::Arc;

use async_trait::async_trait;
use uuid::Uuid;

use crate::model::PartitionBatch;
use crate::model::{DeviceId, Event, UserId};
pub use rollup::{
    FleetCount, FleetQuery, Level, Rollup, RollupQuery, Sketch, Summary, ROLLUP_MS,
    SKETCH_RELATIVE_ERROR,
};

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

/// Duplicate-index rows whose event is not stored (`iotpipe check`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexReport {
    /// Index rows read.
    pub rows: u64,
    /// Rows with no stored event (removed when repairing).
    pub orphans: u64,
    /// A few of them, as `device/event id`.
    pub examples: Vec<String>,
}

/// Examples kept per finding.
pub const MAX_EXAMPLES: usize = 5;

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

    /// One level's summaries of one device, oldest first, for engines that maintain
    /// them as they write (counting each event once, duplicates never, late events in
    /// every level at once). `Ok(None)` means the engine keeps none at that level, and
    /// the caller reads a finer one or scans points instead.
    async fn rollups(&self, query: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError>;

    /// Event counts of every device of a user at one level, in one read: what grouped
    /// aggregates need, one row per (window, device, type), in no particular order
    /// (a fleet has tens of thousands, and callers sum them). `Ok(None)` means the
    /// engine keeps none, and the caller reads each device's rollups instead.
    async fn fleet_counts(&self, query: FleetQuery) -> Result<Option<Vec<FleetCount>>, StoreError>;

    /// The newest value of each metric of `device`, or of every device of `user`
    /// (`None`), in no particular order. Kept as events are written; an older event
    /// never replaces a newer value.
    async fn latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<latest::Latest>, StoreError>;

    /// Removes every trace of one device: its events, their duplicate-index rows,
    /// its rollups at every level (fleet rows included) and its latest values. Returns
    /// how many events were removed. Idempotent, so an interrupted purge is run again.
    /// The default refuses: an engine that keeps data must say how it removes it.
    async fn purge_device(&self, user: UserId, device: DeviceId) -> Result<u64, StoreError> {
        let _ = (user, device);
        Err(StoreError::Invalid(format!(
            "the {} store cannot purge a device",
            self.backend()
        )))
    }

    /// Copies the store as of now into the directory `target` (new or empty) while
    /// it keeps serving; returns the keys copied per keyspace. Only an engine whose
    /// data is a local directory can; the default refuses, naming the backend (a
    /// cluster is backed up with its own tools: `docs/operations.md`).
    async fn snapshot_into(
        &self,
        target: std::path::PathBuf,
    ) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let _ = target;
        Err(StoreError::Invalid(format!(
            "the {} store is backed up with its own tools (docs/operations.md)",
            self.backend()
        )))
    }

    /// Every (user, device) with stored events, deleted devices included, in no
    /// particular order: what operations (live totals, checks) walk. The default
    /// refuses, naming the backend.
    async fn stored_devices(&self) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        Err(StoreError::Invalid(format!(
            "the {} store cannot list its devices",
            self.backend()
        )))
    }

    /// Reads the whole duplicate index and finds the rows whose event is not stored
    /// (left by a crash between the two, or by a purge cut short); with `repair`,
    /// removes them. The default refuses, naming the backend.
    async fn check_index(&self, repair: bool) -> Result<IndexReport, StoreError> {
        let _ = repair;
        Err(StoreError::Invalid(format!(
            "the {} store cannot check its index",
            self.backend()
        )))
    }

    /// A cheap round trip, for `/health`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Minutes this instance has written events into and not yet recomputed into its
    /// rollups, for engines that recompute them in the background (the `/metrics`
    /// gauge `iotpipe_rollup_backlog`). Aggregates are exact meanwhile.
    fn rollup_backlog(&self) -> usize {
        0
    }

    /// Deletes what the retention tiers expired by `now_ms` (see `retention.rs`) and
    /// returns how many rows went. Reads hide expired rows already; this gives the
    /// space back. Stores that expire rows themselves (by TTL) do nothing.
    async fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
        let _ = now_ms;
        Ok(0)
    }

    /// Makes everything written durable and releases the engine.
    async fn close(&self) -> Result<(), StoreError>;
}

/// Shared handle to the configured store.
pub type SharedStore = Arc<dyn EventStore>;
