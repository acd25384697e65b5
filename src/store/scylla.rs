//! The production event store, on ScyllaDB or Cassandra. Schema: `cql/schema.cql`.
//!
//! A thin adapter: partitioning (the batcher), validation (ingest) and aggregation and
//! range chunking (query) stay above [`EventStore`] and are shared with, and tested
//! on, the embedded store. This file only turns partitions into CQL writes and bucket
//! ranges into CQL reads.
//!
//! Writes, per flush:
//! 1. Duplicates within the flush are dropped; the others are looked up in
//!    `event_ids` (read-before-write, in parallel).
//! 2. The new events are written partition by partition, in unlogged batches that
//!    each hold one partition and stay under `store.batch_max_bytes`, together with
//!    the partition's row in the `buckets` index.
//! 3. Only then are their ids written to `event_ids`. If the flush fails before this
//!    step, a retry finds the ids absent and rewrites the same rows (same primary key,
//!    so the rewrite is idempotent) instead of skipping events that were never stored.
//!
//! Why read-before-write and not a lightweight transaction (`IF NOT EXISTS`) per id:
//! an LWT is a Paxos round (four round trips, and contention handling) per event,
//! several times the cost of the write itself, paid by every event to catch rare
//! retransmissions. The read is a single-partition lookup that bloom filters answer
//! cheaply for new ids. What it gives up: two flushes (on one instance or several)
//! writing the same id at the same moment can both see it absent. With the same `ts` (the contract's expected
//! duplicate: a device retrying) both write the same row, so it is still stored once;
//! only the live counters may count it twice. With a different `ts` both copies would
//! be kept. See `docs/production.md`.
//!
//! Every statement is prepared, and marked idempotent so the driver may retry it.
//! Requests are bounded by a semaphore (`store.write_concurrency`); timeouts and
//! overload map to [`StoreError::Unavailable`] (the pipeline writer retries them),
//! refused requests to [`StoreError::Invalid`] (never retried).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    DbError, ExecutionError, NewSessionError, NextPageError, NextRowError, PagerExecutionError,
    PrepareError, RequestAttemptError, RequestError,
};
use scylla::frame::types::Consistency;
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use scylla::{DeserializeRow, SerializeRow};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{EventStore, ListQuery, Point, PointQuery, Rollup, RollupQuery, StoreError};
use crate::config::StoreConfig;
use crate::model::{bucket_start, DeviceId, Event, Record, UserId};
use crate::pipeline::batcher::PartitionBatch;

/// The schema, with `{keyspace}`, `{replication}` and `{ttl}` to fill in.
pub const SCHEMA: &str = include_str!("../../cql/schema.cql");

const BUCKET_META: &str = "bucket_len_ms";

/// Buckets of one device scanned at once by one read.
const READ_FANOUT: usize = 4;

/// The settings the store needs, resolved from [`StoreConfig`].
#[derive(Debug, Clone)]
pub struct ScyllaSettings {
    pub nodes: Vec<String>,
    pub keyspace: String,
    pub replication: String,
    pub consistency: Consistency,
    pub ttl_secs: u64,
    pub batch_max_bytes: usize,
    pub write_concurrency: usize,
    pub request_timeout: Duration,
    pub page_size: i32,
    pub local_datacenter: Option<String>,
    pub bucket_len_ms: i64,
}

impl ScyllaSettings {
    /// Resolves and checks the `[store]` settings.
    ///
    /// # Errors
    ///
    /// [`StoreError::Invalid`] for no nodes, a keyspace name that is not a plain CQL
    /// identifier, or an unknown consistency.
    pub fn from_config(config: &StoreConfig, bucket_len_ms: i64) -> Result<Self, StoreError> {
        let nodes: Vec<String> = config
            .scylla_nodes
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect();
        if nodes.is_empty() {
            return Err(StoreError::Invalid(
                "IOTPIPE_SCYLLA_NODES lists no node".into(),
            ));
        }
        // The keyspace is spliced into statements, so it must be a plain identifier.
        let ks = &config.keyspace;
        let ks_ok = (1..=48).contains(&ks.len())
            && ks.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && ks.as_bytes()[0].is_ascii_alphabetic();
        if !ks_ok {
            return Err(StoreError::Invalid(format!(
                "store.keyspace = {ks:?}: expected 1 to 48 letters, digits or _, starting with a letter"
            )));
        }
        Ok(Self {
            nodes,
            keyspace: ks.to_ascii_lowercase(),
            replication: config.replication.clone(),
            consistency: parse_consistency(&config.consistency)?,
            ttl_secs: config.ttl_secs,
            batch_max_bytes: config.batch_max_bytes,
            write_concurrency: config.write_concurrency,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            page_size: config.page_size.max(1),
            local_datacenter: config.local_datacenter.clone(),
            bucket_len_ms,
        })
    }
}

/// Parses a consistency level name, such as `LOCAL_QUORUM`.
///
/// # Errors
///
/// [`StoreError::Invalid`] for an unknown name.
pub fn parse_consistency(name: &str) -> Result<Consistency, StoreError> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "ANY" => Consistency::Any,
        "ONE" => Consistency::One,
        "TWO" => Consistency::Two,
        "THREE" => Consistency::Three,
        "QUORUM" => Consistency::Quorum,
        "ALL" => Consistency::All,
        "LOCAL_QUORUM" => Consistency::LocalQuorum,
        "EACH_QUORUM" => Consistency::EachQuorum,
        "LOCAL_ONE" => Consistency::LocalOne,
        other => {
            return Err(StoreError::Invalid(format!(
                "store.consistency = {other:?} is not a consistency level"
            )))
        }
    })
}

/// The schema statements for `settings`, in order.
pub fn schema_statements(settings: &ScyllaSettings) -> Vec<String> {
    let filled = SCHEMA
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("{keyspace}", &settings.keyspace)
        .replace("{replication}", &settings.replication)
        .replace("{ttl}", &settings.ttl_secs.to_string());
    filled
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

// Row types: every value bound to a statement or read from one. Their names follow the
// columns (and named bind markers); the unit tests check them against cql/schema.cql.

/// A row of `events`, as written.
#[derive(Debug, SerializeRow)]
struct EventIn<'a> {
    user_id: i64,
    device_id: Uuid,
    bucket: CqlTimestamp,
    ts: CqlTimestamp,
    event_id: Uuid,
    #[scylla(rename = "type")]
    kind: &'a str,
    metrics: BTreeMap<&'a str, f64>,
    attrs: BTreeMap<&'a str, &'a str>,
    received: CqlTimestamp,
}

/// A row of `events`, as listed.
#[derive(Debug, DeserializeRow)]
struct EventOut {
    ts: CqlTimestamp,
    event_id: Uuid,
    #[scylla(rename = "type")]
    kind: String,
    metrics: Option<BTreeMap<String, f64>>,
    attrs: Option<BTreeMap<String, String>>,
}

/// A projection of `events` for aggregates with a metric.
#[derive(Debug, DeserializeRow)]
struct MetricOut {
    ts: CqlTimestamp,
    #[scylla(rename = "type")]
    kind: String,
    metrics: Option<BTreeMap<String, f64>>,
}

/// A projection of `events` for counts.
#[derive(Debug, DeserializeRow)]
struct CountOut {
    ts: CqlTimestamp,
    #[scylla(rename = "type")]
    kind: String,
}

/// One partition's slice `[from_ts, to_ts)`.
#[derive(Debug, SerializeRow)]
struct SliceIn {
    user_id: i64,
    device_id: Uuid,
    bucket: CqlTimestamp,
    from_ts: CqlTimestamp,
    to_ts: CqlTimestamp,
}

/// One partition's rows strictly before a position.
#[derive(Debug, SerializeRow)]
struct SliceBeforeIn {
    user_id: i64,
    device_id: Uuid,
    bucket: CqlTimestamp,
    before_ts: CqlTimestamp,
    before_id: Uuid,
}

#[derive(Debug, SerializeRow)]
struct IdKeyIn {
    device_id: Uuid,
    event_id: Uuid,
}

#[derive(Debug, SerializeRow)]
struct IdIn {
    device_id: Uuid,
    event_id: Uuid,
    ts: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
struct IdOut {
    #[allow(dead_code)] // Read for the type check; its presence is what matters.
    ts: CqlTimestamp,
}

#[derive(Debug, SerializeRow)]
struct BucketIn {
    user_id: i64,
    device_id: Uuid,
    bucket: CqlTimestamp,
}

#[derive(Debug, SerializeRow)]
struct BucketRangeIn {
    user_id: i64,
    device_id: Uuid,
    lo: CqlTimestamp,
    hi: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
struct BucketOut {
    bucket: CqlTimestamp,
}

#[derive(Debug, SerializeRow)]
struct MetaKeyIn<'a> {
    name: &'a str,
}

#[derive(Debug, SerializeRow)]
struct MetaIn<'a> {
    name: &'a str,
    value: i64,
}

#[derive(Debug, DeserializeRow)]
struct MetaOut {
    value: i64,
}

/// Every statement the store prepares, by role. Keyspace-qualified.
struct Cql;

impl Cql {
    fn insert_event(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.events (user_id, device_id, bucket, ts, event_id, type, metrics, \
             attrs, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
    }
    fn insert_bucket(ks: &str) -> String {
        format!("INSERT INTO {ks}.buckets (user_id, device_id, bucket) VALUES (?, ?, ?)")
    }
    fn insert_id(ks: &str) -> String {
        format!("INSERT INTO {ks}.event_ids (device_id, event_id, ts) VALUES (?, ?, ?)")
    }
    fn select_id(ks: &str) -> String {
        format!("SELECT ts FROM {ks}.event_ids WHERE device_id = ? AND event_id = ?")
    }
    // Statements with a range use named markers throughout (never mixed with `?`),
    // named after their column where they have one.
    fn select_buckets(ks: &str) -> String {
        format!(
            "SELECT bucket FROM {ks}.buckets WHERE user_id = :user_id AND device_id = :device_id \
             AND bucket >= :lo AND bucket <= :hi"
        )
    }
    fn list_slice(ks: &str) -> String {
        format!(
            "SELECT ts, event_id, type, metrics, attrs FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND ts >= :from_ts AND ts < :to_ts ORDER BY ts DESC, event_id DESC"
        )
    }
    /// Only an upper bound: CQL does not allow a single-column relation on `ts` beside
    /// the tuple relation, so the lower bound `from` is applied while reading (the
    /// rows come newest first, so reading stops at the first older one).
    fn list_before(ks: &str) -> String {
        format!(
            "SELECT ts, event_id, type, metrics, attrs FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND (ts, event_id) < (:before_ts, :before_id) ORDER BY ts DESC, event_id DESC"
        )
    }
    fn metric_slice(ks: &str) -> String {
        format!(
            "SELECT ts, type, metrics FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND ts >= :from_ts AND ts < :to_ts"
        )
    }
    fn count_slice(ks: &str) -> String {
        format!(
            "SELECT ts, type FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND ts >= :from_ts AND ts < :to_ts"
        )
    }
    fn select_meta(ks: &str) -> String {
        format!("SELECT value FROM {ks}.meta WHERE name = ?")
    }
    fn insert_meta(ks: &str) -> String {
        format!("INSERT INTO {ks}.meta (name, value) VALUES (?, ?)")
    }
    fn ping() -> String {
        "SELECT key FROM system.local WHERE key = 'local'".to_owned()
    }
}

struct Prepared {
    insert_event: PreparedStatement,
    insert_bucket: PreparedStatement,
    insert_id: PreparedStatement,
    select_id: PreparedStatement,
    select_buckets: PreparedStatement,
    list_slice: PreparedStatement,
    list_before: PreparedStatement,
    metric_slice: PreparedStatement,
    count_slice: PreparedStatement,
    ping: PreparedStatement,
}

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
    /// Creates the keyspace and tables (`iotpipe migrate`) and records the bucket
    /// length.
    ///
    /// # Errors
    ///
    /// The cluster cannot be reached, refuses a statement, or already holds data
    /// written with another bucket length.
    pub async fn migrate(settings: &ScyllaSettings) -> Result<(), StoreError> {
        let session = session(settings).await?;
        for statement in schema_statements(settings) {
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
        check_bucket_len(&session, settings, true).await
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
        let ks = settings.keyspace.as_str();
        let page = settings.page_size;
        let prepare = |cql: String| {
            let session = &session;
            async move {
                let mut p = session.prepare(cql).await.map_err(prepare_error)?;
                // Every statement is idempotent: inserts rewrite the same primary key.
                p.set_is_idempotent(true);
                p.set_page_size(page);
                Ok::<_, StoreError>(p)
            }
        };
        let cql = Prepared {
            insert_event: prepare(Cql::insert_event(ks)).await?,
            insert_bucket: prepare(Cql::insert_bucket(ks)).await?,
            insert_id: prepare(Cql::insert_id(ks)).await?,
            select_id: prepare(Cql::select_id(ks)).await?,
            select_buckets: prepare(Cql::select_buckets(ks)).await?,
            list_slice: prepare(Cql::list_slice(ks)).await?,
            list_before: prepare(Cql::list_before(ks)).await?,
            metric_slice: prepare(Cql::metric_slice(ks)).await?,
            count_slice: prepare(Cql::count_slice(ks)).await?,
            ping: prepare(Cql::ping()).await?,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                session,
                cql,
                permits: Semaphore::new(settings.write_concurrency),
                settings,
            }),
        })
    }
}

/// Checks (and with `record`, records) the bucket length of the keyspace.
async fn check_bucket_len(
    session: &Session,
    settings: &ScyllaSettings,
    record: bool,
) -> Result<(), StoreError> {
    let ks = &settings.keyspace;
    let select =
        session
            .prepare(Cql::select_meta(ks))
            .await
            .map_err(|e| match prepare_error(e) {
                StoreError::Invalid(m) => StoreError::Invalid(format!(
                    "{m}; has `iotpipe migrate` been run for keyspace {ks}?"
                )),
                other => other,
            })?;
    let stored = session
        .execute_unpaged(&select, MetaKeyIn { name: BUCKET_META })
        .await
        .map_err(exec_error)?
        .into_rows_result()
        .map_err(corrupt)?
        .maybe_first_row::<MetaOut>()
        .map_err(corrupt)?;
    match stored {
        Some(m) if m.value != settings.bucket_len_ms => Err(StoreError::Invalid(format!(
            "keyspace {ks} was created with a bucket of {} ms, not {} ms; set the bucket back \
             or use a new keyspace",
            m.value, settings.bucket_len_ms
        ))),
        Some(_) => Ok(()),
        None if record => {
            let insert = session
                .prepare(Cql::insert_meta(ks))
                .await
                .map_err(prepare_error)?;
            let row = MetaIn {
                name: BUCKET_META,
                value: settings.bucket_len_ms,
            };
            session
                .execute_unpaged(&insert, row)
                .await
                .map_err(exec_error)?;
            Ok(())
        }
        None => Err(StoreError::Invalid(format!(
            "keyspace {ks} has no recorded bucket length; run `iotpipe migrate`"
        ))),
    }
}

fn ms(v: i64) -> CqlTimestamp {
    CqlTimestamp(v)
}

/// An upper estimate of a row's bound values, in bytes, for batch sizing.
fn row_bytes(e: &Event) -> usize {
    // Fixed columns (ids, instants) and each value's 4-byte length prefix.
    let fixed = 8 + 16 + 8 + 8 + 16 + 8 + 9 * 4;
    let metrics: usize = e.metrics.iter().map(|(k, _)| 4 + k.len() + 4 + 8).sum();
    let attrs: usize = e.attrs.iter().map(|(k, v)| 4 + k.len() + 4 + v.len()).sum();
    fixed + e.kind.len() + 4 + metrics + 4 + attrs
}

/// Splits a partition's records into runs whose estimated size stays under `max`
/// (a single larger record gets a run of its own).
fn split_by_bytes<'a>(records: &[&'a Record], max: usize) -> Vec<Vec<&'a Record>> {
    let mut out = Vec::new();
    let mut current: Vec<&Record> = Vec::new();
    let mut size = 0;
    for r in records {
        let n = row_bytes(&r.event);
        if !current.is_empty() && size + n > max {
            out.push(std::mem::take(&mut current));
            size = 0;
        }
        size += n;
        current.push(r);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn event_row(r: &Record, bucket_len_ms: i64) -> EventIn<'_> {
    EventIn {
        user_id: r.user_id,
        device_id: r.device_id,
        bucket: ms(bucket_start(r.event.ts_ms, bucket_len_ms)),
        ts: ms(r.event.ts_ms),
        event_id: r.event.id,
        kind: &r.event.kind,
        metrics: r
            .event
            .metrics
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect(),
        attrs: r
            .event
            .attrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        received: ms(r.received_ms),
    }
}

impl Inner {
    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    async fn is_known(&self, r: &Record) -> Result<bool, StoreError> {
        let _p = self.permit().await;
        let key = IdKeyIn {
            device_id: r.device_id,
            event_id: r.event.id,
        };
        let rows = self
            .session
            .execute_unpaged(&self.cql.select_id, key)
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(corrupt)?;
        Ok(rows.maybe_first_row::<IdOut>().map_err(corrupt)?.is_some())
    }

    async fn write_run(&self, run: &[&Record]) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let len = self.settings.bucket_len_ms;
        if let [one] = run {
            self.session
                .execute_unpaged(&self.cql.insert_event, event_row(one, len))
                .await
                .map_err(exec_error)?;
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in run {
            batch.append_statement(self.cql.insert_event.clone());
        }
        batch.set_is_idempotent(true);
        let rows: Vec<EventIn<'_>> = run.iter().map(|r| event_row(r, len)).collect();
        self.session.batch(&batch, rows).await.map_err(exec_error)?;
        Ok(())
    }

    async fn write_bucket(&self, p: &PartitionBatch) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let row = BucketIn {
            user_id: p.key.user_id,
            device_id: p.key.device_id,
            bucket: ms(p.key.bucket_ms),
        };
        self.session
            .execute_unpaged(&self.cql.insert_bucket, row)
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn write_id(&self, r: &Record) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let row = IdIn {
            device_id: r.device_id,
            event_id: r.event.id,
            ts: ms(r.event.ts_ms),
        };
        self.session
            .execute_unpaged(&self.cql.insert_id, row)
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn write(&self, partitions: &[PartitionBatch]) -> Result<Vec<usize>, StoreError> {
        // 1. Drop duplicates within the flush, then look the rest up.
        let mut in_flush = HashSet::new();
        let candidates: Vec<Vec<&Record>> = partitions
            .iter()
            .map(|p| {
                p.records
                    .iter()
                    .filter(|r| in_flush.insert((r.device_id, r.event.id)))
                    .collect()
            })
            .collect();
        // The semaphore bounds how many of these lookups are in flight.
        let lookups = candidates.iter().flatten().map(|r| self.is_known(r));
        let known = futures::future::try_join_all(lookups).await?;
        let mut known = known.into_iter();
        let fresh: Vec<Vec<&Record>> = candidates
            .iter()
            .map(|rs| {
                rs.iter()
                    .copied()
                    .filter(|_| !known.next().unwrap_or(false))
                    .collect()
            })
            .collect();

        // 2. Events, and the bucket index, partition by partition.
        let max = self.settings.batch_max_bytes;
        let mut writes = Vec::new();
        for (p, rs) in partitions.iter().zip(&fresh) {
            if rs.is_empty() {
                continue;
            }
            for run in split_by_bytes(rs, max) {
                writes.push(futures::future::Either::Left(async move {
                    self.write_run(&run).await
                }));
            }
            writes.push(futures::future::Either::Right(self.write_bucket(p)));
        }
        futures::future::try_join_all(writes).await?;

        // 3. Only now the ids: see the module docs.
        futures::future::try_join_all(fresh.iter().flatten().map(|r| self.write_id(r))).await?;
        Ok(fresh.iter().map(Vec::len).collect())
    }

    /// The buckets of a device that hold events in `[from_ms, to_ms)`, newest first.
    async fn buckets(
        &self,
        user: UserId,
        device: DeviceId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let len = self.settings.bucket_len_ms;
        let range = BucketRangeIn {
            user_id: user,
            device_id: device,
            lo: ms(bucket_start(from_ms, len)),
            hi: ms(bucket_start(to_ms - 1, len)),
        };
        self.session
            .execute_iter(self.cql.select_buckets.clone(), range)
            .await
            .map_err(pager_error)?
            .rows_stream::<BucketOut>()
            .map_err(corrupt)?
            .map_ok(|b| b.bucket.0)
            .map_err(row_error)
            .try_collect()
            .await
    }

    /// Up to `limit` events of one bucket, newest first.
    async fn list_bucket(&self, q: &ListQuery, bucket: i64) -> Result<Vec<Event>, StoreError> {
        let pager = match q.before.filter(|p| p.ts_ms < q.to_ms) {
            Some(p) => {
                let v = SliceBeforeIn {
                    user_id: q.user_id,
                    device_id: q.device_id,
                    bucket: ms(bucket),
                    before_ts: ms(p.ts_ms),
                    before_id: p.id,
                };
                self.session
                    .execute_iter(self.cql.list_before.clone(), v)
                    .await
            }
            None => {
                let v = SliceIn {
                    user_id: q.user_id,
                    device_id: q.device_id,
                    bucket: ms(bucket),
                    from_ts: ms(q.from_ms),
                    to_ts: ms(q.to_ms),
                };
                self.session
                    .execute_iter(self.cql.list_slice.clone(), v)
                    .await
            }
        };
        let rows = pager
            .map_err(pager_error)?
            .rows_stream::<EventOut>()
            .map_err(corrupt)?;
        rows.map_err(row_error)
            // Newest first: the first row older than `from` ends the bucket's slice.
            .try_take_while(|r| futures::future::ready(Ok(r.ts.0 >= q.from_ms)))
            .try_filter(|r| futures::future::ready(q.kind.as_deref().is_none_or(|k| k == r.kind)))
            .take(q.limit)
            .map_ok(|r| Event {
                id: r.event_id,
                id_assigned: false,
                ts_ms: r.ts.0,
                kind: r.kind,
                metrics: r.metrics.unwrap_or_default().into_iter().collect(),
                attrs: r.attrs.unwrap_or_default().into_iter().collect(),
            })
            .try_collect()
            .await
    }

    async fn list(&self, q: &ListQuery) -> Result<Vec<Event>, StoreError> {
        let hi = match q.before {
            Some(p) if p.ts_ms < q.to_ms => p.ts_ms + 1,
            _ => q.to_ms,
        };
        let buckets = self.buckets(q.user_id, q.device_id, q.from_ms, hi).await?;
        let mut out = Vec::with_capacity(q.limit.min(1024));
        let mut pages = stream::iter(buckets)
            .map(|b| self.list_bucket(q, b))
            .buffered(READ_FANOUT);
        while let Some(page) = pages.try_next().await? {
            out.extend(page.into_iter().take(q.limit - out.len()));
            if out.len() == q.limit {
                break;
            }
        }
        Ok(out)
    }

    async fn points_bucket(&self, q: &PointQuery, bucket: i64) -> Result<Vec<Point>, StoreError> {
        let slice = SliceIn {
            user_id: q.user_id,
            device_id: q.device_id,
            bucket: ms(bucket),
            from_ts: ms(q.from_ms),
            to_ts: ms(q.to_ms),
        };
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        match &q.metric {
            Some(metric) => {
                let pager = self
                    .session
                    .execute_iter(self.cql.metric_slice.clone(), slice)
                    .await
                    .map_err(pager_error)?;
                let mut rows = pager.rows_stream::<MetricOut>().map_err(corrupt)?;
                let mut out = Vec::new();
                while let Some(r) = rows.try_next().await.map_err(row_error)? {
                    let value = r.metrics.as_ref().and_then(|m| m.get(metric).copied());
                    if let (true, Some(v)) = (kind_ok(&r.kind), value) {
                        out.push(Point {
                            ts_ms: r.ts.0,
                            value: Some(v),
                            kind: q.with_kind.then_some(r.kind),
                        });
                    }
                }
                Ok(out)
            }
            None => {
                let pager = self
                    .session
                    .execute_iter(self.cql.count_slice.clone(), slice)
                    .await
                    .map_err(pager_error)?;
                let mut rows = pager.rows_stream::<CountOut>().map_err(corrupt)?;
                let mut out = Vec::new();
                while let Some(r) = rows.try_next().await.map_err(row_error)? {
                    if kind_ok(&r.kind) {
                        out.push(Point {
                            ts_ms: r.ts.0,
                            value: None,
                            kind: q.with_kind.then_some(r.kind),
                        });
                    }
                }
                Ok(out)
            }
        }
    }

    async fn points(&self, q: &PointQuery) -> Result<Vec<Point>, StoreError> {
        let mut buckets = self
            .buckets(q.user_id, q.device_id, q.from_ms, q.to_ms)
            .await?;
        buckets.reverse();
        let parts: Vec<Vec<Point>> = stream::iter(buckets)
            .map(|b| self.points_bucket(q, b))
            .buffered(READ_FANOUT)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
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

    /// No rollup table yet: aggregates scan the events' partitions in parallel.
    async fn rollups(&self, _query: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError> {
        Ok(None)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner
            .session
            .execute_unpaged(&self.inner.cql.ping, ())
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn close(&self) -> Result<(), StoreError> {
        // Every write was acknowledged by the cluster at the configured consistency
        // before it returned; there is nothing to flush.
        Ok(())
    }
}

// Error mapping: what the database refused is Invalid (never retried); everything
// else (timeouts, overload, unavailable replicas, broken connections) is Unavailable.

fn db_error(e: &DbError) -> bool {
    matches!(
        e,
        DbError::SyntaxError
            | DbError::Invalid
            | DbError::AlreadyExists { .. }
            | DbError::FunctionFailure { .. }
            | DbError::AuthenticationError
            | DbError::Unauthorized
            | DbError::ConfigError
    )
}

fn exec_error(e: ExecutionError) -> StoreError {
    let invalid = match &e {
        ExecutionError::BadQuery(_) => true,
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => db_error(db),
        ExecutionError::LastAttemptError(RequestAttemptError::SerializationError(_)) => true,
        ExecutionError::PrepareError(p) => prepare_is_invalid(p),
        _ => false,
    };
    classify(invalid, e)
}

fn prepare_error(e: PrepareError) -> StoreError {
    classify(prepare_is_invalid(&e), e)
}

/// A statement the server refused to prepare is invalid; anything else may pass on
/// a retry.
fn prepare_is_invalid(e: &PrepareError) -> bool {
    matches!(
        e,
        PrepareError::AllAttemptsFailed {
            first_attempt: RequestAttemptError::DbError(db, _)
        } if db_error(db)
    )
}

/// Invalid requests are never retried; everything else is.
fn classify(invalid: bool, e: impl std::fmt::Display) -> StoreError {
    if invalid {
        StoreError::Invalid(e.to_string())
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

fn request_error(e: RequestError) -> StoreError {
    exec_error(e.into_execution_error())
}

fn page_error(e: NextPageError) -> StoreError {
    match e {
        NextPageError::RequestFailure(r) => request_error(r),
        other => StoreError::Corrupt(other.to_string()),
    }
}

fn pager_error(e: PagerExecutionError) -> StoreError {
    match e {
        PagerExecutionError::PrepareError(p) => prepare_error(p),
        PagerExecutionError::SerializationError(s) => StoreError::Invalid(s.to_string()),
        PagerExecutionError::NextPageError(n) => page_error(n),
        other => StoreError::Unavailable(other.to_string()),
    }
}

fn row_error(e: NextRowError) -> StoreError {
    match e {
        NextRowError::NextPageError(n) => page_error(n),
        other => StoreError::Corrupt(other.to_string()),
    }
}

fn session_error(e: NewSessionError) -> StoreError {
    StoreError::Unavailable(format!("cannot connect to ScyllaDB: {e}"))
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Offline checks: every statement's bind markers and result columns are derived from
/// `cql/schema.cql` (parsed here), and every Rust row type is checked against them with
/// the driver's own serialization and deserialization type checks, as a prepared
/// statement's metadata would drive them against a live server.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use scylla::deserialize::row::DeserializeRow;
    use scylla::frame::response::result::{
        CollectionType, ColumnSpec, ColumnType, NativeType, TableSpec,
    };
    use scylla::serialize::row::{RowSerializationContext, SerializeRow};
    use scylla::serialize::writers::RowWriter;

    use super::*;
    use crate::model::PartitionKey;

    const KS: &str = "ks";

    /// Table → column → type, parsed from the schema file.
    fn schema() -> HashMap<String, HashMap<String, ColumnType<'static>>> {
        let settings = ScyllaSettings {
            nodes: vec![],
            keyspace: KS.into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: Consistency::One,
            ttl_secs: 0,
            batch_max_bytes: 5120,
            write_concurrency: 1,
            request_timeout: Duration::from_secs(1),
            page_size: 100,
            local_datacenter: None,
            bucket_len_ms: 3_600_000,
        };
        let mut tables = HashMap::new();
        for stmt in schema_statements(&settings) {
            let Some(rest) = stmt.strip_prefix(&format!("CREATE TABLE IF NOT EXISTS {KS}.")) else {
                continue;
            };
            let (name, rest) = rest.split_once('(').expect("a column list");
            let body = &rest[..closing_paren(rest)];
            let mut columns = HashMap::new();
            for def in split_top_level(body) {
                let def = def.trim();
                if def.starts_with("PRIMARY KEY") {
                    continue;
                }
                let def = def.trim_end_matches("PRIMARY KEY").trim();
                let (col, typ) = def.split_once(char::is_whitespace).expect("name and type");
                columns.insert(col.to_owned(), parse_type(typ.trim()));
            }
            tables.insert(name.trim().to_owned(), columns);
        }
        tables
    }

    /// Index of the `)` that closes a list whose `(` was just consumed.
    fn closing_paren(s: &str) -> usize {
        let mut depth = 0;
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => return i,
                ')' => depth -= 1,
                _ => {}
            }
        }
        panic!("unbalanced parentheses in {s}")
    }

    /// Splits on commas outside `<>` and `()`.
    fn split_top_level(s: &str) -> Vec<&str> {
        let (mut depth, mut start, mut out) = (0, 0, Vec::new());
        for (i, c) in s.char_indices() {
            match c {
                '<' | '(' => depth += 1,
                '>' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(&s[start..]);
        out
    }

    fn parse_type(s: &str) -> ColumnType<'static> {
        let s = s.trim();
        let inner = |prefix: &str| s.strip_prefix(prefix).and_then(|r| r.strip_suffix('>'));
        if let Some(t) = inner("frozen<") {
            return match parse_type(t) {
                ColumnType::Collection { typ, .. } => ColumnType::Collection { frozen: true, typ },
                other => other,
            };
        }
        if let Some(t) = inner("map<") {
            let kv = split_top_level(t);
            let typ = CollectionType::Map(Box::new(parse_type(kv[0])), Box::new(parse_type(kv[1])));
            return ColumnType::Collection { frozen: false, typ };
        }
        if let Some(t) = inner("set<") {
            let typ = CollectionType::Set(Box::new(parse_type(t)));
            return ColumnType::Collection { frozen: false, typ };
        }
        if let Some(t) = inner("list<") {
            let typ = CollectionType::List(Box::new(parse_type(t)));
            return ColumnType::Collection { frozen: false, typ };
        }
        ColumnType::Native(match s {
            "bigint" => NativeType::BigInt,
            "int" => NativeType::Int,
            "uuid" => NativeType::Uuid,
            "timeuuid" => NativeType::Timeuuid,
            "timestamp" => NativeType::Timestamp,
            "text" | "varchar" => NativeType::Text,
            "ascii" => NativeType::Ascii,
            "double" => NativeType::Double,
            "float" => NativeType::Float,
            "boolean" => NativeType::Boolean,
            "blob" => NativeType::Blob,
            other => panic!("type {other} is not known to this test; add it"),
        })
    }

    fn tokens(cql: &str) -> Vec<String> {
        let mut out = Vec::new();
        let chars: Vec<char> = cql.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let word =
                |j: usize| chars[j].is_ascii_alphanumeric() || chars[j] == '_' || chars[j] == '.';
            if c.is_whitespace() {
                i += 1;
            } else if c == ':' || word(i) {
                let start = i;
                i += 1;
                while i < chars.len() && word(i) {
                    i += 1;
                }
                out.push(chars[start..i].iter().collect());
            } else if c == '\'' {
                let start = i;
                i += 1;
                while chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(chars[start..i].iter().collect());
            } else if (c == '>' || c == '<') && chars.get(i + 1) == Some(&'=') {
                out.push(format!("{c}="));
                i += 2;
            } else {
                out.push(c.to_string());
                i += 1;
            }
        }
        out
    }

    fn is_marker(t: &str) -> bool {
        t == "?" || t.starts_with(':')
    }

    fn is_op(t: &str) -> bool {
        matches!(t, "=" | "<" | ">" | "<=" | ">=")
    }

    /// The bind-marker specs and result-column specs of a statement, from the schema.
    fn specs(cql: &str) -> (Vec<ColumnSpec<'static>>, Vec<ColumnSpec<'static>>) {
        let schema = schema();
        let t = tokens(cql);
        let table_of = |tok: &str| {
            tok.strip_prefix(&format!("{KS}."))
                .expect("qualified")
                .to_owned()
        };
        let pos = |word: &str| t.iter().position(|x| x.eq_ignore_ascii_case(word));
        let table = match t[0].to_ascii_uppercase().as_str() {
            "INSERT" => table_of(&t[2]),
            "SELECT" => table_of(&t[pos("FROM").unwrap() + 1]),
            other => panic!("unexpected statement {other}"),
        };
        let cols = schema
            .get(&table)
            .unwrap_or_else(|| panic!("table {table} is not in cql/schema.cql"));
        let spec = |name: &str, col: &str| {
            let typ = cols
                .get(col)
                .unwrap_or_else(|| panic!("column {table}.{col} is not in cql/schema.cql"))
                .clone();
            ColumnSpec::owned(
                name.to_owned(),
                typ,
                TableSpec::owned(KS.into(), table.clone()),
            )
        };
        let marker_name = |m: &str, col: &str| m.strip_prefix(':').unwrap_or(col).to_owned();
        let mut binds = Vec::new();
        let mut results = Vec::new();
        if t[0].eq_ignore_ascii_case("INSERT") {
            let values = pos("VALUES").unwrap();
            let columns: Vec<&String> = t[4..values - 1].iter().filter(|x| *x != ",").collect();
            let markers: Vec<&String> = t[values + 2..].iter().filter(|x| is_marker(x)).collect();
            assert_eq!(columns.len(), markers.len(), "{cql}");
            for (c, m) in columns.iter().zip(markers) {
                binds.push(spec(&marker_name(m, c), c));
            }
        } else {
            let from = pos("FROM").unwrap();
            for c in t[1..from].iter().filter(|x| *x != ",") {
                results.push(spec(c, c));
            }
            let end = pos("ORDER").or(pos("LIMIT")).unwrap_or(t.len());
            let mut i = pos("WHERE").map_or(end, |w| w + 1);
            while i < end {
                if t[i] == "(" {
                    let close = i + t[i..].iter().position(|x| x == ")").unwrap();
                    let columns: Vec<&String> =
                        t[i + 1..close].iter().filter(|x| *x != ",").collect();
                    assert!(is_op(&t[close + 1]) && t[close + 2] == "(", "{cql}");
                    let mclose = close + 2 + t[close + 2..].iter().position(|x| x == ")").unwrap();
                    let markers: Vec<&String> =
                        t[close + 3..mclose].iter().filter(|x| *x != ",").collect();
                    assert_eq!(columns.len(), markers.len(), "{cql}");
                    for (c, m) in columns.iter().zip(markers) {
                        if is_marker(m) {
                            binds.push(spec(&marker_name(m, c), c));
                        }
                    }
                    i = mclose + 1;
                } else if i + 2 < end && is_op(&t[i + 1]) && is_marker(&t[i + 2]) {
                    binds.push(spec(&marker_name(&t[i + 2], &t[i]), &t[i]));
                    i += 3;
                } else {
                    i += 1;
                }
            }
        }
        (binds, results)
    }

    fn check_bind<T: SerializeRow>(cql: &str, row: &T) -> Result<usize, String> {
        let (binds, _) = specs(cql);
        let ctx = RowSerializationContext::from_specs(&binds);
        let mut buf = Vec::new();
        row.serialize(&ctx, &mut RowWriter::new(&mut buf))
            .map_err(|e| format!("{cql}: {e}"))?;
        Ok(buf.len())
    }

    fn check_read<T: for<'f, 'm> DeserializeRow<'f, 'm>>(cql: &str) -> Result<(), String> {
        let (_, results) = specs(cql);
        assert!(!results.is_empty(), "{cql} reads no column");
        T::type_check(&results).map_err(|e| format!("{cql}: {e}"))
    }

    fn record() -> Record {
        Record {
            user_id: 7,
            device_id: Uuid::from_u128(1),
            received_ms: 1_800_000_000_500,
            event: Event {
                id: Uuid::from_u128(2),
                id_assigned: false,
                ts_ms: 1_800_000_000_000,
                kind: "telemetry".into(),
                metrics: vec![("battery".into(), 0.9), ("temp".into(), 21.5)],
                attrs: vec![("fw".into(), "1.4.2".into())],
            },
        }
    }

    #[test]
    fn the_schema_parses_into_the_four_tables() {
        let s = schema();
        let mut names: Vec<_> = s.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["buckets", "event_ids", "events", "meta"]);
        assert_eq!(s["events"]["ts"], ColumnType::Native(NativeType::Timestamp));
        assert!(matches!(
            s["events"]["metrics"],
            ColumnType::Collection {
                frozen: true,
                typ: CollectionType::Map(..)
            }
        ));
    }

    #[test]
    fn every_bound_row_type_serializes_against_the_schema() {
        let r = record();
        let t = ms(1);
        let (d, e) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let checks = [
            check_bind(&Cql::insert_event(KS), &event_row(&r, 3_600_000)),
            check_bind(
                &Cql::insert_bucket(KS),
                &BucketIn {
                    user_id: 1,
                    device_id: d,
                    bucket: t,
                },
            ),
            check_bind(
                &Cql::insert_id(KS),
                &IdIn {
                    device_id: d,
                    event_id: e,
                    ts: t,
                },
            ),
            check_bind(
                &Cql::select_id(KS),
                &IdKeyIn {
                    device_id: d,
                    event_id: e,
                },
            ),
            check_bind(
                &Cql::select_buckets(KS),
                &BucketRangeIn {
                    user_id: 1,
                    device_id: d,
                    lo: t,
                    hi: t,
                },
            ),
            check_bind(
                &Cql::list_slice(KS),
                &SliceIn {
                    user_id: 1,
                    device_id: d,
                    bucket: t,
                    from_ts: t,
                    to_ts: t,
                },
            ),
            check_bind(
                &Cql::list_before(KS),
                &SliceBeforeIn {
                    user_id: 1,
                    device_id: d,
                    bucket: t,
                    before_ts: t,
                    before_id: e,
                },
            ),
            check_bind(
                &Cql::metric_slice(KS),
                &SliceIn {
                    user_id: 1,
                    device_id: d,
                    bucket: t,
                    from_ts: t,
                    to_ts: t,
                },
            ),
            check_bind(
                &Cql::count_slice(KS),
                &SliceIn {
                    user_id: 1,
                    device_id: d,
                    bucket: t,
                    from_ts: t,
                    to_ts: t,
                },
            ),
            check_bind(&Cql::select_meta(KS), &MetaKeyIn { name: BUCKET_META }),
            check_bind(
                &Cql::insert_meta(KS),
                &MetaIn {
                    name: BUCKET_META,
                    value: 1,
                },
            ),
        ];
        for c in checks {
            c.unwrap();
        }
    }

    #[test]
    fn every_read_row_type_type_checks_against_the_schema() {
        check_read::<IdOut>(&Cql::select_id(KS)).unwrap();
        check_read::<BucketOut>(&Cql::select_buckets(KS)).unwrap();
        check_read::<EventOut>(&Cql::list_slice(KS)).unwrap();
        check_read::<EventOut>(&Cql::list_before(KS)).unwrap();
        check_read::<MetricOut>(&Cql::metric_slice(KS)).unwrap();
        check_read::<CountOut>(&Cql::count_slice(KS)).unwrap();
        check_read::<MetaOut>(&Cql::select_meta(KS)).unwrap();
    }

    #[test]
    fn the_checks_catch_a_row_type_that_does_not_match_the_schema() {
        // user_id is a bigint: an i32 must be refused.
        #[derive(SerializeRow)]
        struct NarrowUser {
            user_id: i32,
            device_id: Uuid,
            bucket: CqlTimestamp,
        }
        let wrong = NarrowUser {
            user_id: 1,
            device_id: Uuid::nil(),
            bucket: ms(0),
        };
        assert!(check_bind(&Cql::insert_bucket(KS), &wrong).is_err());
        // A bind marker name the statement does not have.
        #[derive(SerializeRow)]
        struct Misnamed {
            user_id: i64,
            device_id: Uuid,
            low: CqlTimestamp,
            hi: CqlTimestamp,
        }
        let wrong = Misnamed {
            user_id: 1,
            device_id: Uuid::nil(),
            low: ms(0),
            hi: ms(0),
        };
        assert!(check_bind(&Cql::select_buckets(KS), &wrong).is_err());
        // ts is a timestamp, not text; metrics a map of doubles, not of text.
        #[derive(DeserializeRow)]
        #[allow(dead_code)]
        struct TextTs {
            ts: String,
        }
        assert!(check_read::<TextTs>(&Cql::select_id(KS)).is_err());
        #[derive(DeserializeRow)]
        #[allow(dead_code)]
        struct TextMetrics {
            ts: CqlTimestamp,
            #[scylla(rename = "type")]
            kind: String,
            metrics: Option<BTreeMap<String, String>>,
        }
        assert!(check_read::<TextMetrics>(&Cql::metric_slice(KS)).is_err());
    }

    #[test]
    fn the_size_estimate_bounds_the_serialized_row() {
        let mut r = record();
        r.event.attrs.push(("note".into(), "é".repeat(500)));
        let actual = check_bind(&Cql::insert_event(KS), &event_row(&r, 3_600_000)).unwrap();
        assert!(
            actual <= row_bytes(&r.event),
            "{actual} > {}",
            row_bytes(&r.event)
        );
    }

    #[test]
    fn partitions_split_into_batches_under_the_byte_limit_in_order() {
        let records: Vec<Record> = (0..100)
            .map(|i| {
                let mut r = record();
                r.event.id = Uuid::from_u128(i);
                if i == 50 {
                    r.event.attrs.push(("big".into(), "x".repeat(1000)));
                    for j in 0..10 {
                        r.event.attrs.push((format!("a{j}"), "y".repeat(1000)));
                    }
                }
                r
            })
            .collect();
        let refs: Vec<&Record> = records.iter().collect();
        let runs = split_by_bytes(&refs, 5 * 1024);
        assert!(runs.len() > 1);
        let flat: Vec<Uuid> = runs.iter().flatten().map(|r| r.event.id).collect();
        assert_eq!(flat, records.iter().map(|r| r.event.id).collect::<Vec<_>>());
        for run in &runs {
            let size: usize = run.iter().map(|r| row_bytes(&r.event)).sum();
            assert!(
                size <= 5 * 1024 || run.len() == 1,
                "a run of {} bytes",
                size
            );
        }
        // Every run stays within one partition: the batcher hands one partition at a
        // time, and the rows' partition key is the batch key.
        let key = PartitionKey::of(&records[0], 3_600_000);
        assert!(records
            .iter()
            .all(|r| PartitionKey::of(r, 3_600_000) == key));
    }

    #[test]
    fn settings_are_checked() {
        let mut c = StoreConfig::default();
        assert!(ScyllaSettings::from_config(&c, 1000).is_err(), "no nodes");
        c.scylla_nodes = Some("10.0.0.1:9042, 10.0.0.2:9042".into());
        let s = ScyllaSettings::from_config(&c, 1000).unwrap();
        assert_eq!(s.nodes, ["10.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(s.consistency, Consistency::LocalQuorum);
        c.keyspace = "x; DROP TABLE y".into();
        assert!(ScyllaSettings::from_config(&c, 1000).is_err());
        c.keyspace = "iotpipe".into();
        c.consistency = "MOST".into();
        assert!(ScyllaSettings::from_config(&c, 1000).is_err());
    }

    #[test]
    fn the_schema_is_filled_from_the_settings() {
        let mut c = StoreConfig {
            scylla_nodes: Some("n:9042".into()),
            keyspace: "metrics_prod".into(),
            ttl_secs: 86_400,
            ..StoreConfig::default()
        };
        c.replication = "{'class': 'NetworkTopologyStrategy', 'dc1': 3}".into();
        let stmts = schema_statements(&ScyllaSettings::from_config(&c, 1000).unwrap());
        assert_eq!(stmts.len(), 5);
        assert!(stmts[0].starts_with("CREATE KEYSPACE IF NOT EXISTS metrics_prod"));
        assert!(stmts[0].ends_with("replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"));
        assert!(stmts.iter().skip(1).all(|s| s.contains("metrics_prod.")));
        assert!(stmts[1].contains("TimeWindowCompactionStrategy"));
        assert!(stmts[1].contains("default_time_to_live = 86400"));
        for placeholder in ["{keyspace}", "{replication}", "{ttl}"] {
            assert!(
                stmts.iter().all(|s| !s.contains(placeholder)),
                "{placeholder} left"
            );
        }
    }
}
