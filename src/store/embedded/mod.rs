//! The embedded event store, on fjall (an LSM-tree engine).
//!
//! Why fjall: the write path is an append to a journal plus a memtable insert, so a
//! flush of thousands of events costs one `fsync` (group commit); keys are kept sorted,
//! so a device's range scan is sequential. See `docs/architecture.md` for the
//! measurements behind the choice.
//!
//! Layout, in three keyspaces:
//! - `events`: key = user (8) | device (16) | bucket (8) | ts (8) | event id (16), all
//!   big-endian with the sign bit flipped so byte order is numeric order; value = the
//!   rest of the event, in postcard.
//! - `ids`: key = event id reversed (16) | device (16), value = ts (8). The duplicate
//!   index for ids devices chose: the contract makes an id a duplicate whatever its
//!   `ts`, so the `events` key alone cannot detect it.
//! - `timed_ids`: the same, for UUIDv7 ids, which carry a time. Ids the server
//!   assigned carry their event's `ts` (`model::assigned_id`), so their `events` key
//!   is their index, and so do device-chosen UUIDv7 ids whose time is their event's
//!   `ts`: neither costs an index entry. Only a UUIDv7 stored with another `ts` gets a
//!   row here. A UUIDv7 is therefore looked up in `events` and in this keyspace, which
//!   stays small, never in the large `ids` (see `docs/performance.md`).
//! - `rollups`, `rollups_coarse`, `fleet_counts`: summaries at every level, kept in
//!   the same atomic batch as the events (see `rollups/`).
//! - `meta`: the bucket length this data directory was created with.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

mod backup;
mod devices;
mod index_check;
mod latest;
mod purge;
mod retention;
mod rollups;

use super::latest::Latest;
use super::retention::{Retention, Tier};
use super::{
    EventStore, FleetCount, FleetQuery, IndexReport, ListQuery, Point, PointQuery, Position,
    Rollup, RollupQuery, StoreError,
};
use crate::model::PartitionBatch;
use crate::model::{assigned_id_ts, bucket_start, now_ms, DeviceId, Event, Record, UserId};
pub use backup::KeyCounts;
use rollups::{Caches, MinuteSums, RollupKeyspaces, LEVELS_META_KEY};

const KEY_LEN: usize = 8 + 16 + 8 + 8 + 16;
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;
/// The smaller keyspaces (indexes, rollups, latest values) fill far more slowly than
/// `events`; smaller memtables keep their share of memory small.
const SMALL_MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;
/// Rows kept in each write cache (rollups, latest values), at most.
const CACHE_ROWS: usize = 30_000;
const BUCKET_META_KEY: &str = "bucket_len_ms";
/// Present in data directories whose UUIDv7 index rows are all in `timed_ids`; older
/// ones may hold some in `ids` too.
const TIMED_IDS_META_KEY: &str = "timed_ids";

/// The embedded store. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    events: Keyspace,
    ids: Keyspace,
    timed_ids: Keyspace,
    /// UUIDv7 index rows may also be in `ids` (a directory from before `timed_ids`).
    timed_in_ids: bool,
    rollups: RollupKeyspaces,
    /// The newest value per (user, device, metric): see `latest.rs`.
    latest: Keyspace,
    bucket_len_ms: i64,
    /// What reads may still see, and what the sweep deletes (`retention.rs`).
    retention: Retention,
    // A std mutex, held only around the check-then-insert of duplicate ids and the
    // read-modify-write of rollups, never across an await or an fsync: two flushes
    // carrying the same id must not both see it absent, nor both update a rollup
    // from the same old value.
    dedup: std::sync::Mutex<WriteState>,
}

/// State kept between writes, under the write mutex.
#[derive(Default)]
struct WriteState {
    /// Recently written rollup rows (see `rollups/`).
    rollups: Caches,
    /// The latest value of recently written `latest` rows, for the same reason.
    latest: HashMap<Vec<u8>, (i64, f64)>,
}

/// The part of an event that is not in its key.
#[derive(Serialize, Deserialize)]
struct StoredValue<'a> {
    #[serde(borrow)]
    kind: &'a str,
    #[serde(borrow)]
    metrics: Vec<(&'a str, f64)>,
    #[serde(borrow)]
    attrs: Vec<(&'a str, &'a str)>,
    received_ms: i64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    ///
    /// Fails if the engine cannot open the directory, or if the directory was created
    /// with another bucket length (the key layout depends on it).
    pub fn open(dir: &Path, bucket_len_ms: i64) -> Result<Self, StoreError> {
        Self::open_with(dir, bucket_len_ms, Retention::default())
    }

    /// As [`EmbeddedStore::open`], with retention tiers: expired rows are hidden from
    /// reads and deleted by [`EventStore::expire`].
    ///
    /// # Errors
    ///
    /// As [`EmbeddedStore::open`].
    pub fn open_with(
        dir: &Path,
        bucket_len_ms: i64,
        retention: Retention,
    ) -> Result<Self, StoreError> {
        // Memory: memtables are bounded per keyspace and the block cache is fixed, so
        // RSS stays flat at full ingest speed; smaller memtables also keep range scans
        // off the (slower to iterate) skiplist.
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            // fjall's default two workers. With two, worker 0 hands compaction
            // requests back to the queue to stay free for flushes and spins doing so
            // while the other compacts (10-15% of the CPU in a profile under load);
            // one worker made no difference to ingest on an idle machine but let
            // sealed memtables wait behind compactions: 387 MB peak RSS against 292
            // (docs/performance.md).
            .open()
            .map_err(engine)?;
        let memtable = || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(MEMTABLE_BYTES)
                .compaction_strategy(Arc::new(
                    // Sixteen level-0 tables before they are merged down, not four: a
                    // fleet's flushes each span every device's key range, so every
                    // merge rewrites most of level 1, and a quarter as many merges
                    // cut that work. Over 4.3M fleet events (3,000 devices), server
                    // CPU fell from 16.6 s at eight to 14.6 s, and the fleet rate
                    // from 65% of the dense rate to 74%. Reads that miss (duplicate
                    // lookups) pass more tables, but their bloom filters answer.
                    fjall::compaction::Leveled::default().with_l0_threshold(16),
                ))
        };
        let small = || KeyspaceCreateOptions::default().max_memtable_size(SMALL_MEMTABLE_BYTES);
        let events = db.keyspace("events", memtable).map_err(engine)?;
        let ids = db.keyspace("ids", memtable).map_err(engine)?;
        let timed_ids = db.keyspace("timed_ids", small).map_err(engine)?;
        let rollups = RollupKeyspaces {
            old_minute: db.keyspace("rollups", small).map_err(engine)?,
            minute: db.keyspace("minutes", small).map_err(engine)?,
            coarse: db.keyspace("rollups_coarse", small).map_err(engine)?,
            fleet: db.keyspace("fleet_counts", small).map_err(engine)?,
        };
        let latest = db.keyspace("latest", small).map_err(engine)?;
        let meta = db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .map_err(engine)?;
        let timed_in_ids = match meta.get(BUCKET_META_KEY).map_err(engine)? {
            Some(v) => {
                let stored = i64::from_be_bytes(v.as_ref().try_into().map_err(corrupt)?);
                if stored != bucket_len_ms {
                    return Err(StoreError::Invalid(format!(
                        "{} was created with a bucket of {stored} ms, not {bucket_len_ms} ms; \
                         set the bucket back or use a new data directory",
                        dir.display()
                    )));
                }
                !meta.contains_key(TIMED_IDS_META_KEY).map_err(engine)?
            }
            None => {
                meta.insert(BUCKET_META_KEY, bucket_len_ms.to_be_bytes())
                    .map_err(engine)?;
                meta.insert(TIMED_IDS_META_KEY, [1]).map_err(engine)?;
                meta.insert(LEVELS_META_KEY, [1]).map_err(engine)?;
                db.persist(PersistMode::SyncAll).map_err(engine)?;
                false
            }
        };
        let build_levels = !meta.contains_key(LEVELS_META_KEY).map_err(engine)?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                events,
                ids,
                timed_ids,
                timed_in_ids,
                rollups,
                latest,
                bucket_len_ms,
                retention,
                dedup: std::sync::Mutex::new(WriteState::default()),
            }),
        };
        if build_levels {
            tracing::info!(dir = %dir.display(), "building hour, day and fleet rollups from minute rollups (once)");
            store.inner.build_levels()?;
            meta.insert(LEVELS_META_KEY, [1]).map_err(engine)?;
            store
                .inner
                .db
                .persist(PersistMode::SyncAll)
                .map_err(engine)?;
        }
        Ok(store)
    }

    /// Runs blocking engine work off the async threads.
    async fn blocking<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&Inner) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }
}

impl Inner {
    fn write(&self, partitions: &[PartitionBatch]) -> Result<Vec<usize>, StoreError> {
        let records: Vec<&Record> = partitions.iter().flat_map(|p| &p.records).collect();
        let mut counts = Vec::with_capacity(partitions.len());
        let mut batch = self.db.batch();
        {
            let mut state = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            let fresh = self.fresh(&records)?;
            // Rows are inserted in key order: the memtable is a skiplist, and inserting
            // neighbours one after another keeps its search paths in cache. Random ids
            // inserted in arrival order cost several times more.
            let mut event_rows = Vec::with_capacity(records.len());
            // (in `timed_ids`, key, value): sorted, each keyspace's rows in key order.
            let mut id_rows = Vec::new();
            let mut sums = MinuteSums::default();
            let mut fresh = fresh.iter();
            let mut new_records = Vec::new();
            for p in partitions {
                let mut new = 0;
                for (r, &fresh) in p.records.iter().zip(fresh.by_ref()) {
                    if !fresh {
                        continue;
                    }
                    new_records.push(r);
                    let e = &r.event;
                    // An id with its event's ts in it is found through its `events`
                    // key: no index row.
                    let id_ts = assigned_id_ts(e.id);
                    if !e.id_assigned && id_ts != Some(e.ts_ms) {
                        let key = id_key(r.device_id, e.id);
                        id_rows.push((id_ts.is_some(), key, ordered(e.ts_ms)));
                    }
                    let key = event_key(r.user_id, r.device_id, self.bucket_len_ms, e.ts_ms, e.id);
                    event_rows.push((key, encode_value(e, r.received_ms)?));
                    sums.add(r);
                    new += 1;
                }
                counts.push(new);
            }
            event_rows.sort_unstable_by_key(|row| row.0);
            for (key, value) in event_rows {
                batch.insert(&self.events, key, value);
            }
            id_rows.sort_unstable();
            for (timed, key, value) in id_rows {
                let index = if timed { &self.timed_ids } else { &self.ids };
                batch.insert(index, key, value);
            }
            let staged = self.stage_rollups(&mut state.rollups, sums, &mut batch)?;
            let latest = self.newer_latest(&mut state, new_records, &mut batch)?;
            batch.commit().map_err(engine)?;
            // Only what was committed enters the caches.
            staged.commit(&mut state.rollups);
            state.latest.extend(latest);
        }
        // Group commit: one fsync for the whole flush, outside the lock so that a
        // concurrent flush can append meanwhile and share the next sync.
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        Ok(counts)
    }

    /// Which records of a flush are new, in flush order: not a duplicate of a stored
    /// event, nor of an earlier record of the same flush. Called under the write
    /// mutex, so that no other flush stores one of these ids meanwhile.
    fn fresh(&self, records: &[&Record]) -> Result<Vec<bool>, StoreError> {
        let mut fresh = Vec::with_capacity(records.len());
        let mut in_flush = HashSet::default();
        let mut lookups = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let e = &r.event;
            // A server-assigned id is new by construction and needs no index entry: its
            // ts is in the id (`model::assigned_id`). Only ids a device chose can
            // repeat; such an id is a duplicate if the index has it, or if it is an
            // assigned id read back and sent again.
            if e.id_assigned {
                fresh.push(true);
                continue;
            }
            let key = id_key(r.device_id, e.id);
            let first = in_flush.insert(key);
            if first {
                lookups.push((key, i));
            }
            fresh.push(first);
        }
        // Looked up in key order, for the same reason rows are inserted in key order.
        lookups.sort_unstable();
        for (key, i) in lookups {
            if self.known_id(records[i], key)? {
                fresh[i] = false;
            }
        }
        Ok(fresh)
    }

    /// Is this device-chosen id already stored?
    fn known_id(&self, r: &Record, id_key: [u8; 32]) -> Result<bool, StoreError> {
        let Some(ts) = assigned_id_ts(r.event.id) else {
            return self.ids.contains_key(id_key).map_err(engine);
        };
        let key = event_key(r.user_id, r.device_id, self.bucket_len_ms, ts, r.event.id);
        Ok(self.events.contains_key(key).map_err(engine)?
            || self.timed_ids.contains_key(id_key).map_err(engine)?
            || (self.timed_in_ids && self.ids.contains_key(id_key).map_err(engine)?))
    }

    fn list(&self, q: &ListQuery) -> Result<Vec<Event>, StoreError> {
        let from_ms = self.retention.clip(Tier::Raw, q.from_ms, now_ms());
        let lo = event_key(
            q.user_id,
            q.device_id,
            self.bucket_len_ms,
            from_ms,
            Uuid::nil(),
        );
        let mut hi = event_key(
            q.user_id,
            q.device_id,
            self.bucket_len_ms,
            q.to_ms,
            Uuid::nil(),
        );
        if let Some(p) = q.before {
            if p.ts_ms < q.to_ms {
                hi = event_key(q.user_id, q.device_id, self.bucket_len_ms, p.ts_ms, p.id);
            }
        }
        let mut out = Vec::with_capacity(q.limit.min(1024));
        if lo >= hi {
            return Ok(out);
        }
        for item in self.events.range(lo..hi).rev() {
            if out.len() == q.limit {
                break;
            }
            let (key, value) = item.into_inner().map_err(engine)?;
            let v: StoredValue<'_> = postcard::from_bytes(&value).map_err(corrupt)?;
            if q.kind.as_deref().is_some_and(|k| k != v.kind) {
                continue;
            }
            let (ts_ms, id) = decode_key_tail(&key)?;
            out.push(Event {
                id,
                id_assigned: false,
                ts_ms,
                kind: v.kind.to_owned(),
                metrics: v.metrics.iter().map(|&(k, x)| (k.to_owned(), x)).collect(),
                attrs: v
                    .attrs
                    .iter()
                    .map(|&(k, x)| (k.to_owned(), x.to_owned()))
                    .collect(),
            });
        }
        Ok(out)
    }

    fn points(&self, q: &PointQuery) -> Result<Vec<Point>, StoreError> {
        let from_ms = self.retention.clip(Tier::Raw, q.from_ms, now_ms());
        let lo = event_key(
            q.user_id,
            q.device_id,
            self.bucket_len_ms,
            from_ms,
            Uuid::nil(),
        );
        let hi = event_key(
            q.user_id,
            q.device_id,
            self.bucket_len_ms,
            q.to_ms,
            Uuid::nil(),
        );
        let mut out = Vec::new();
        if lo >= hi {
            return Ok(out);
        }
        for item in self.events.range(lo..hi) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let v: StoredValue<'_> = postcard::from_bytes(&value).map_err(corrupt)?;
            if q.kind.as_deref().is_some_and(|k| k != v.kind) {
                continue;
            }
            let value = match &q.metric {
                None => None,
                Some(m) => match v.metrics.iter().find(|(k, _)| k == m) {
                    Some(&(_, x)) => Some(x),
                    None => continue,
                },
            };
            let (ts_ms, _) = decode_key_tail(&key)?;
            out.push(Point {
                ts_ms,
                value,
                kind: q.with_kind.then(|| v.kind.to_owned()),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl EventStore for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn write(&self, partitions: Arc<Vec<PartitionBatch>>) -> Result<Vec<usize>, StoreError> {
        self.blocking(move |inner| inner.write(&partitions)).await
    }

    async fn list(&self, query: ListQuery) -> Result<Vec<Event>, StoreError> {
        self.blocking(move |inner| inner.list(&query)).await
    }

    async fn points(&self, query: PointQuery) -> Result<Vec<Point>, StoreError> {
        self.blocking(move |inner| inner.points(&query)).await
    }

    async fn rollups(&self, query: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError> {
        self.blocking(move |inner| inner.read_rollups(&query).map(Some))
            .await
    }

    async fn fleet_counts(&self, query: FleetQuery) -> Result<Option<Vec<FleetCount>>, StoreError> {
        self.blocking(move |inner| inner.read_fleet(&query)).await
    }

    async fn latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<Latest>, StoreError> {
        self.blocking(move |inner| inner.read_latest(user, device))
            .await
    }

    async fn purge_device(&self, user: UserId, device: DeviceId) -> Result<u64, StoreError> {
        self.blocking(move |inner| inner.purge_device(user, device))
            .await
    }

    async fn stored_devices(&self) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        self.blocking(|inner| inner.stored_devices()).await
    }

    async fn check_index(&self, repair: bool) -> Result<IndexReport, StoreError> {
        self.blocking(move |inner| inner.check_index(repair)).await
    }

    async fn snapshot_into(&self, target: PathBuf) -> Result<KeyCounts, StoreError> {
        let store = self.clone();
        self.blocking(move |_| store.copy_to(&target)).await
    }

    async fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.blocking(move |inner| inner.expire(now_ms)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.blocking(|inner| {
            inner.events.first_key_value();
            Ok(())
        })
        .await
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.blocking(|inner| inner.db.persist(PersistMode::SyncAll).map_err(engine))
            .await
    }
}

/// Flips the sign bit so that big-endian byte order is numeric order.
fn ordered(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn unordered(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ (1 << 63)) as i64
}

fn event_key(
    user: UserId,
    device: DeviceId,
    bucket_len_ms: i64,
    ts_ms: i64,
    id: Uuid,
) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0..8].copy_from_slice(&ordered(user));
    k[8..24].copy_from_slice(device.as_bytes());
    k[24..32].copy_from_slice(&ordered(bucket_start(ts_ms, bucket_len_ms)));
    k[32..40].copy_from_slice(&ordered(ts_ms));
    k[40..56].copy_from_slice(id.as_bytes());
    k
}

fn decode_key_tail(key: &[u8]) -> Result<(i64, Uuid), StoreError> {
    if key.len() != KEY_LEN {
        return Err(StoreError::Corrupt(format!(
            "event key of {} bytes",
            key.len()
        )));
    }
    let ts = unordered(key[32..40].try_into().map_err(corrupt)?);
    let id = Uuid::from_slice(&key[40..56]).map_err(corrupt)?;
    Ok((ts, id))
}

/// The duplicate index key: the event id's bytes reversed, then the device. Order does
/// not matter here, so the key starts with the id's random tail (v4 and v7 alike):
/// memtable comparisons then settle on the first bytes instead of running a long
/// memcmp over a shared prefix.
fn id_key(device: DeviceId, id: Uuid) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (dst, src) in k[..16].iter_mut().zip(id.as_bytes().iter().rev()) {
        *dst = *src;
    }
    k[16..].copy_from_slice(device.as_bytes());
    k
}

fn encode_value(event: &Event, received_ms: i64) -> Result<Vec<u8>, StoreError> {
    /// [`StoredValue`] as written: the same fields, so the same postcard bytes
    /// (`String` and `&str` encode alike), but borrowed from the event, so that no
    /// vector is built per event.
    #[derive(Serialize)]
    struct Written<'a> {
        kind: &'a str,
        metrics: &'a [(String, f64)],
        attrs: &'a [(String, String)],
        received_ms: i64,
    }
    let value = Written {
        kind: &event.kind,
        metrics: &event.metrics,
        attrs: &event.attrs,
        received_ms,
    };
    postcard::to_allocvec(&value).map_err(|e| StoreError::Invalid(e.to_string()))
}

fn engine(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Position {
    /// The position of `event`.
    pub fn of(event: &Event) -> Self {
        Position {
            ts_ms: event.ts_ms,
            id: event.id,
        }
    }
}

#[cfg(test)]
mod tests;
