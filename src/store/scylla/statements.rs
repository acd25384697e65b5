//! Every CQL statement the store runs, and their prepared forms.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use super::errors::prepare_error;
use crate::store::StoreError;

/// Every statement the store prepares, by role. Keyspace-qualified.
pub(super) struct Cql;

impl Cql {
    pub(super) fn insert_event(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.events (user_id, device_id, bucket, ts, event_id, type, metrics, \
             attrs, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ?"
        )
    }
    pub(super) fn insert_bucket(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.buckets (user_id, device_id, bucket) VALUES (?, ?, ?) USING TTL ?"
        )
    }
    pub(super) fn insert_id(ks: &str) -> String {
        format!("INSERT INTO {ks}.event_ids (device_id, event_id, ts) VALUES (?, ?, ?) USING TTL ?")
    }
    pub(super) fn select_event_key(ks: &str) -> String {
        format!(
            "SELECT ts FROM {ks}.events WHERE user_id = ? AND device_id = ? AND bucket = ? \
             AND ts = ? AND event_id = ?"
        )
    }
    pub(super) fn select_id(ks: &str) -> String {
        format!("SELECT ts FROM {ks}.event_ids WHERE device_id = ? AND event_id = ?")
    }
    // Statements with a range use named markers throughout (never mixed with `?`),
    // named after their column where they have one.
    pub(super) fn select_buckets(ks: &str) -> String {
        format!(
            "SELECT bucket FROM {ks}.buckets WHERE user_id = :user_id AND device_id = :device_id \
             AND bucket >= :lo AND bucket <= :hi"
        )
    }
    pub(super) fn list_slice(ks: &str) -> String {
        format!(
            "SELECT ts, event_id, type, metrics, attrs FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND ts >= :from_ts AND ts < :to_ts ORDER BY ts DESC, event_id DESC"
        )
    }
    /// Only an upper bound: CQL does not allow a single-column relation on `ts` beside
    /// the tuple relation, so the lower bound `from` is applied while reading (the
    /// rows come newest first, so reading stops at the first older one).
    pub(super) fn list_before(ks: &str) -> String {
        format!(
            "SELECT ts, event_id, type, metrics, attrs FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND (ts, event_id) < (:before_ts, :before_id) ORDER BY ts DESC, event_id DESC"
        )
    }
    /// One device's events in `[from_ts, to_ts)`, in one request over the buckets
    /// that range lies in (one partition each).
    pub(super) fn metric_slice(ks: &str) -> String {
        format!(
            "SELECT ts, type, metrics FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket IN :buckets \
             AND ts >= :from_ts AND ts < :to_ts"
        )
    }
    pub(super) fn count_slice(ks: &str) -> String {
        format!(
            "SELECT ts, type FROM {ks}.events \
             WHERE user_id = :user_id AND device_id = :device_id AND bucket = :bucket \
             AND ts >= :from_ts AND ts < :to_ts"
        )
    }
    pub(super) fn select_meta(ks: &str) -> String {
        format!("SELECT value FROM {ks}.meta WHERE name = ?")
    }
    pub(super) fn insert_meta(ks: &str) -> String {
        format!("INSERT INTO {ks}.meta (name, value) VALUES (?, ?)")
    }
    pub(super) fn ping() -> String {
        "SELECT key FROM system.local WHERE key = 'local'".to_owned()
    }
    /// A rollup row is written with its own count as its write time, so that of two
    /// writers the one that saw more of the minute's events wins: see `rollup.rs`.
    pub(super) fn insert_rollup(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.rollups (user_id, device_id, day, metric, minute, type, count, \
             min, max, sum, sketch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             USING TIMESTAMP ? AND TTL ?"
        )
    }
    pub(super) fn select_rollups(ks: &str) -> String {
        format!(
            "SELECT minute, type, count, min, max, sum, sketch FROM {ks}.rollups \
             WHERE user_id = :user_id AND device_id = :device_id AND day = :day \
             AND metric = :metric AND minute >= :from_minute AND minute < :to_minute"
        )
    }
    /// Written with its count as its write time, like the minutes. Every row that
    /// belongs to a retention tier binds its TTL, from the row's own time
    /// (`store::retention`).
    pub(super) fn insert_coarse(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.rollups_coarse (user_id, device_id, level, slab, metric, start, \
             type, count, min, max, sum, sketch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             USING TIMESTAMP ? AND TTL ?"
        )
    }
    pub(super) fn select_coarse(ks: &str) -> String {
        format!(
            "SELECT start, type, count, min, max, sum, sketch FROM {ks}.rollups_coarse \
             WHERE user_id = :user_id AND device_id = :device_id AND level = :level \
             AND slab = :slab AND metric = :metric AND start >= :from_start \
             AND start < :to_start"
        )
    }
    /// Adds minutes to a mark's row: set elements, so concurrent additions merge.
    pub(super) fn insert_pending(ks: &str) -> String {
        format!(
            "UPDATE {ks}.pending_by_device SET minutes = minutes + :minutes \
             WHERE user_id = :user_id AND device_id = :device_id AND hour = :hour \
             AND flush = :flush"
        )
    }
    pub(super) fn delete_pending(ks: &str) -> String {
        format!(
            "DELETE FROM {ks}.pending_by_device WHERE user_id = ? AND device_id = ? \
             AND hour = ? AND flush = ?"
        )
    }
    pub(super) fn select_pending(ks: &str) -> String {
        format!(
            "SELECT hour, minutes FROM {ks}.pending_by_device \
             WHERE user_id = :user_id AND device_id = :device_id \
             AND hour >= :from_hour AND hour < :to_hour"
        )
    }
    /// One cell of a fleet row, written beside a count row of `rollups_coarse` with
    /// the same write time.
    pub(super) fn insert_fleet(ks: &str) -> String {
        format!(
            "UPDATE {ks}.fleet_by_type USING TIMESTAMP ? AND TTL ? SET counts[?] = ? \
             WHERE user_id = ? AND level = ? AND slab = ? AND device_id = ? AND type = ?"
        )
    }
    /// The rows of one type of a fleet partition (type '': every device's total): its
    /// rows are devices, not intervals, so a part of it is cut from the cells.
    pub(super) fn select_fleet_type(ks: &str) -> String {
        format!(
            "SELECT device_id, type, counts FROM {ks}.fleet_by_type \
             WHERE user_id = ? AND level = ? AND slab = ? AND type = ?"
        )
    }
    /// The rows of every type of a fleet partition, without the totals.
    pub(super) fn select_fleet_types(ks: &str) -> String {
        format!(
            "SELECT device_id, type, counts FROM {ks}.fleet_by_type \
             WHERE user_id = ? AND level = ? AND slab = ? AND type > ''"
        )
    }
    pub(super) fn insert_pending_hour(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.pending_by_user (user_id, slab, hour, device_id, flush) \
             VALUES (?, ?, ?, ?, ?)"
        )
    }
    pub(super) fn delete_pending_hour(ks: &str) -> String {
        format!(
            "DELETE FROM {ks}.pending_by_user WHERE user_id = ? AND slab = ? AND hour = ? \
             AND device_id = ? AND flush = ?"
        )
    }
    pub(super) fn select_pending_hours(ks: &str) -> String {
        format!(
            "SELECT hour, device_id FROM {ks}.pending_by_user \
             WHERE user_id = :user_id AND slab = :slab \
             AND hour >= :from_hour AND hour < :to_hour"
        )
    }
    /// Every pending hour of the keyspace: the sweep after a crash.
    pub(super) fn scan_pending_hours(ks: &str) -> String {
        format!("SELECT user_id, slab, hour, device_id, flush FROM {ks}.pending_by_user")
    }
    /// Written `USING TIMESTAMP` the event's ts in microseconds: see `cql/schema.cql`.
    pub(super) fn insert_latest(ks: &str) -> String {
        format!(
            "INSERT INTO {ks}.latest (user_id, device_id, metric, ts, value) \
             VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
    }
    pub(super) fn select_latest(ks: &str) -> String {
        format!("SELECT device_id, metric, ts, value FROM {ks}.latest WHERE user_id = ?")
    }
    pub(super) fn select_device_latest(ks: &str) -> String {
        format!(
            "SELECT device_id, metric, ts, value FROM {ks}.latest \
             WHERE user_id = ? AND device_id = ?"
        )
    }
    /// Every pending mark of the keyspace: the sweep after a crash.
    pub(super) fn scan_pending(ks: &str) -> String {
        format!("SELECT user_id, device_id, hour, flush, minutes FROM {ks}.pending_by_device")
    }
}

pub(super) struct Prepared {
    pub(super) insert_event: PreparedStatement,
    pub(super) insert_bucket: PreparedStatement,
    pub(super) insert_id: PreparedStatement,
    pub(super) select_id: PreparedStatement,
    pub(super) select_event_key: PreparedStatement,
    pub(super) select_buckets: PreparedStatement,
    pub(super) list_slice: PreparedStatement,
    pub(super) list_before: PreparedStatement,
    pub(super) metric_slice: PreparedStatement,
    pub(super) count_slice: PreparedStatement,
    pub(super) ping: PreparedStatement,
    pub(super) insert_rollup: PreparedStatement,
    pub(super) select_rollups: PreparedStatement,
    pub(super) insert_coarse: PreparedStatement,
    pub(super) select_coarse: PreparedStatement,
    pub(super) insert_pending: PreparedStatement,
    pub(super) delete_pending: PreparedStatement,
    pub(super) select_pending: PreparedStatement,
    pub(super) scan_pending: PreparedStatement,
    pub(super) insert_fleet: PreparedStatement,
    pub(super) select_fleet_type: PreparedStatement,
    pub(super) select_fleet_types: PreparedStatement,
    pub(super) insert_pending_hour: PreparedStatement,
    pub(super) delete_pending_hour: PreparedStatement,
    pub(super) select_pending_hours: PreparedStatement,
    pub(super) scan_pending_hours: PreparedStatement,
    pub(super) insert_latest: PreparedStatement,
    pub(super) select_latest: PreparedStatement,
    pub(super) select_device_latest: PreparedStatement,
}

impl Prepared {
    /// Prepares every statement for keyspace `ks`.
    pub(super) async fn new(session: &Session, ks: &str, page: i32) -> Result<Self, StoreError> {
        let prepare = |cql: String| async move {
            let mut p = session.prepare(cql).await.map_err(prepare_error)?;
            // Every statement is idempotent: inserts rewrite the same primary key, and
            // a rollup's write time is its count.
            p.set_is_idempotent(true);
            p.set_page_size(page);
            Ok::<_, StoreError>(p)
        };
        Ok(Self {
            insert_event: prepare(Cql::insert_event(ks)).await?,
            insert_bucket: prepare(Cql::insert_bucket(ks)).await?,
            insert_id: prepare(Cql::insert_id(ks)).await?,
            select_id: prepare(Cql::select_id(ks)).await?,
            select_event_key: prepare(Cql::select_event_key(ks)).await?,
            select_buckets: prepare(Cql::select_buckets(ks)).await?,
            list_slice: prepare(Cql::list_slice(ks)).await?,
            list_before: prepare(Cql::list_before(ks)).await?,
            metric_slice: prepare(Cql::metric_slice(ks)).await?,
            count_slice: prepare(Cql::count_slice(ks)).await?,
            ping: prepare(Cql::ping()).await?,
            insert_rollup: prepare(Cql::insert_rollup(ks)).await?,
            select_rollups: prepare(Cql::select_rollups(ks)).await?,
            insert_coarse: prepare(Cql::insert_coarse(ks)).await?,
            select_coarse: prepare(Cql::select_coarse(ks)).await?,
            insert_pending: prepare(Cql::insert_pending(ks)).await?,
            delete_pending: prepare(Cql::delete_pending(ks)).await?,
            select_pending: prepare(Cql::select_pending(ks)).await?,
            scan_pending: prepare(Cql::scan_pending(ks)).await?,
            insert_fleet: prepare(Cql::insert_fleet(ks)).await?,
            select_fleet_type: prepare(Cql::select_fleet_type(ks)).await?,
            select_fleet_types: prepare(Cql::select_fleet_types(ks)).await?,
            insert_pending_hour: prepare(Cql::insert_pending_hour(ks)).await?,
            delete_pending_hour: prepare(Cql::delete_pending_hour(ks)).await?,
            select_pending_hours: prepare(Cql::select_pending_hours(ks)).await?,
            scan_pending_hours: prepare(Cql::scan_pending_hours(ks)).await?,
            insert_latest: prepare(Cql::insert_latest(ks)).await?,
            select_latest: prepare(Cql::select_latest(ks)).await?,
            select_device_latest: prepare(Cql::select_device_latest(ks)).await?,
        })
    }
}
