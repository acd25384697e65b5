//! The production event store, on ScyllaDB or Cassandra. Schema: `cql/schema.cql`.
//!
//! A thin adapter: partitioning (the batcher), validation (ingest) and aggregation and
//! range chunking (query) stay above [`EventStore`] and are shared with, and tested
//! on, the embedded store. This module only turns partitions into CQL writes and
//! ranges into CQL reads. Its files: `settings`, `schema`, `statements` (every CQL
//! text), `rows` (every bound or read row type), `write`, `read`, `rollup`,
//! `minutes`, `sparse`, `levels` and `pending` (exact rollups), `fleet` (a user's
//! counts in one read), `purge` (removing a device), `devices` (listing them) and
//! `index_check`: rare, so they prepare their own statements; `errors`.
//!
//! Writes, per flush:
//! 1. Duplicates within the flush are dropped; the others are looked up in
//!    `event_ids` (read-before-write, in parallel).
//! 2. The minutes the new events fall in are marked pending: one row per device and
//!    hour in `pending_by_device` holds their offsets, and a twin row in the user's
//!    `pending_by_user` partition tells fleet reads that the hour may lag.
//! 3. The new events are written partition by partition, in unlogged batches that
//!    each hold one partition and stay under `store.batch_max_bytes`, together with
//!    the partition's row in the `buckets` index.
//! 4. Only then are their ids written to `event_ids`. If the flush fails before this
//!    step, a retry finds the ids absent and rewrites the same rows (same primary key,
//!    so the rewrite is idempotent) instead of skipping events that were never stored.
//! 5. The flush returns (the sources are acknowledged); the recomputer (`rollup.rs`)
//!    rewrites the minutes' rollups once they are quiet.
//!
//! Why read-before-write and not a lightweight transaction (`IF NOT EXISTS`) per id:
//! an LWT is a Paxos round (four round trips, and contention handling) per event,
//! several times the cost of the write itself, paid by every event to catch rare
//! retransmissions. The read is a single-partition lookup that bloom filters answer
//! cheaply for new ids. What it gives up: two flushes (on one instance or several)
//! writing the same id at the same moment can both see it absent. With the same `ts`
//! (the contract's expected duplicate: a device retrying) both write the same row, so
//! it is still stored once, and the rollups, recomputed from the stored rows, count it
//! once; only the live counters may count it twice. With a different `ts` both copies
//! would be kept. See `docs/production.md`.
//!
//! Every statement is prepared, and marked idempotent so the driver may retry it.
//! Requests are bounded by a semaphore (`store.write_concurrency`); timeouts and
//! overload map to [`StoreError::Unavailable`] (the pipeline writer retries them),
//! refused requests to [`StoreError::Invalid`] (never retried).

mod devices;
mod errors;
mod fleet;
mod index_check;
mod levels;
mod minutes;
mod paged;
mod pending;
mod purge;
mod read;
mod rollup;
mod rows;
mod schema;
mod settings;
mod sparse;
mod statements;
#[cfg(test)]
mod tests;
mod write;

use std::sync::Arc;

use async_trait::async_trait;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::DefaultPolicy;
use tokio::sync::Semaphore;

pub use schema::{schema_statements, SCHEMA};
pub use settings::{parse_consistency, ScyllaSettings};

use super::latest::Latest;
use super::{
    EventStore, FleetCount, FleetQuery, ListQuery, Point, PointQuery, Rollup, RollupQuery,
    StoreError,
};
use crate::model::PartitionBatch;
use crate::model::{DeviceId, Event, UserId};
use errors::{exec_error, session_error};
use rollup::Recomputer;
use schema::{add_missing_columns, check_bucket_len, check_fleet, check_levels};
use statements::Prepared;

/// The ScyllaDB store. Cheap to clone.
#[derive(Clone)]
pub struct ScyllaStore {
    inner: Arc<Inner>,
}

struct Inner {
    session: Session,
    cql: Prepared,
    settings: ScyllaSettings,
    permits: Semaphore,
    /// This instance's pending minutes and their recomputation.
    recomputer: Recomputer,
}

async fn session(settings: &ScyllaSettings) -> Result<Session, StoreError> {
    let mut policy = DefaultPolicy::builder().token_aware(true);
    if let Some(dc) = &settings.local_datacenter {
        policy = policy.prefer_datacenter(dc.clone());
    }
    let profile = ExecutionProfile::builder()
        .consistency(settings.consistency)
        .request_timeout(Some(settings.request_timeout))
        .load_balancing_policy(policy.build())
        .build();
    SessionBuilder::new()
        .known_nodes(&settings.nodes)
        .connection_timeout(settings.request_timeout)
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .map_err(session_error)
}

impl ScyllaStore {
    /// Waits until every rollup recomputation handed over so far is done (or has
    /// failed and been left to the sweep). For tests, and for `close`.
    pub async fn settle(&self) {
        self.inner.round(true).await;
    }

    /// Recomputes the pending minutes older than `store.rollup_sweep_after_secs` now,
    /// as the periodic sweep does, and waits for them.
    ///
    /// # Errors
    ///
    /// The scan of pending minutes failed.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.inner.sweep().await
    }

    /// Creates the keyspace and tables (`iotpipe migrate`) and records the bucket
    /// length.
    ///
    /// # Errors
    ///
    /// The cluster cannot be reached, refuses a statement, or already holds data
    /// written with another bucket length.
    pub async fn migrate(settings: &ScyllaSettings) -> Result<(), StoreError> {
        let session = session(settings).await?;
        // The tiers' default TTLs are set again on every migrate: `CREATE TABLE IF NOT
        // EXISTS` leaves an existing table's as it was.
        let statements = schema_statements(settings)
            .into_iter()
            .chain(schema::tier_ttl_statements(settings));
        for statement in statements {
            // DDL is not prepared (it has no values); everything else is.
            session
                .query_unpaged(statement, ())
                .await
                .map_err(exec_error)?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        add_missing_columns(&session, settings).await?;
        session
            .await_schema_agreement()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        check_bucket_len(&session, settings, true).await?;
        check_levels(&session, settings, true).await?;
        check_fleet(&session, settings, true).await
    }

    /// Connects and prepares every statement.
    ///
    /// # Errors
    ///
    /// The cluster cannot be reached, the schema is missing (run `iotpipe migrate`),
    /// or the keyspace was created with another bucket length.
    pub async fn connect(settings: ScyllaSettings) -> Result<Self, StoreError> {
        let session = session(&settings).await?;
        check_bucket_len(&session, &settings, false).await?;
        check_levels(&session, &settings, false).await?;
        check_fleet(&session, &settings, false).await?;
        let cql = Prepared::new(&session, &settings.keyspace, settings.page_size).await?;
        let inner = Arc::new(Inner {
            session,
            cql,
            permits: Semaphore::new(settings.write_concurrency),
            settings,
            recomputer: Recomputer::default(),
        });
        rollup::spawn(&inner);
        Ok(Self { inner })
    }
}

#[async_trait]
impl EventStore for ScyllaStore {
    fn backend(&self) -> &'static str {
        "scylla"
    }

    async fn write(&self, partitions: Arc<Vec<PartitionBatch>>) -> Result<Vec<usize>, StoreError> {
        self.inner.write(&partitions).await
    }

    async fn list(&self, query: ListQuery) -> Result<Vec<Event>, StoreError> {
        self.inner.list(&query).await
    }

    async fn points(&self, query: PointQuery) -> Result<Vec<Point>, StoreError> {
        self.inner.points(&query).await
    }

    async fn rollups(&self, query: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError> {
        self.inner.rollups(&query).await
    }

    async fn fleet_counts(&self, query: FleetQuery) -> Result<Option<Vec<FleetCount>>, StoreError> {
        self.inner.fleet_counts(&query).await
    }

    async fn latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<Latest>, StoreError> {
        self.inner.latest(user, device).await
    }

    async fn purge_device(&self, user: UserId, device: DeviceId) -> Result<u64, StoreError> {
        self.inner.purge_device(user, device).await
    }

    async fn stored_devices(&self) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        self.inner.stored_devices().await
    }

    async fn check_index(&self, repair: bool) -> Result<super::IndexReport, StoreError> {
        self.inner.check_index(repair).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .session
            .execute_unpaged(&self.inner.cql.ping, ())
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    fn rollup_backlog(&self) -> usize {
        self.inner.recomputer.pending.backlog()
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every write was acknowledged by the cluster at the configured consistency
        // before it returned. What is left is recomputing the rollups of the last
        // flushes; minutes not done here stay pending, and a sweep does them later.
        self.settle().await;
        Ok(())
    }
}
