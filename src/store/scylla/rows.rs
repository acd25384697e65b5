//! Row types: every value bound to a statement or read from one. Their names follow
//! the columns (and named bind markers); the unit tests check them against
//! `cql/schema.cql`.

use std::collections::{BTreeMap, HashMap};

use scylla::value::{CqlTimestamp, MaybeUnset};
use scylla::{DeserializeRow, SerializeRow};
use uuid::Uuid;

use crate::model::{bucket_start, Event, Record};
use crate::store::rollup::Stats;
use crate::store::{Rollup, Sketch, StoreError, Summary};

/// A row of `events`, as written.
#[derive(Debug, SerializeRow)]
pub(super) struct EventIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub bucket: CqlTimestamp,
    pub ts: CqlTimestamp,
    pub event_id: Uuid,
    #[scylla(rename = "type")]
    pub kind: &'a str,
    pub metrics: BTreeMap<&'a str, f64>,
    pub attrs: BTreeMap<&'a str, &'a str>,
    pub received: CqlTimestamp,
    #[scylla(rename = "[ttl]")]
    pub ttl: i32,
}

/// A row of `events`, as listed.
#[derive(Debug, DeserializeRow)]
pub(super) struct EventOut {
    pub ts: CqlTimestamp,
    pub event_id: Uuid,
    #[scylla(rename = "type")]
    pub kind: String,
    pub metrics: Option<BTreeMap<String, f64>>,
    pub attrs: Option<BTreeMap<String, String>>,
}

/// A projection of `events` for aggregates with a metric.
#[derive(Debug, DeserializeRow)]
pub(super) struct MetricOut {
    pub ts: CqlTimestamp,
    #[scylla(rename = "type")]
    pub kind: String,
    pub metrics: Option<BTreeMap<String, f64>>,
}

/// A projection of `events` for counts.
#[derive(Debug, DeserializeRow)]
pub(super) struct CountOut {
    pub ts: CqlTimestamp,
    #[scylla(rename = "type")]
    pub kind: String,
}

/// One partition's slice `[from_ts, to_ts)`.
#[derive(Debug, SerializeRow)]
pub(super) struct SliceIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub bucket: CqlTimestamp,
    pub from_ts: CqlTimestamp,
    pub to_ts: CqlTimestamp,
}

/// One device's rows in `[from_ts, to_ts)` of several partitions (`bucket IN`).
#[derive(Debug, SerializeRow)]
pub(super) struct SlicesIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub buckets: Vec<CqlTimestamp>,
    pub from_ts: CqlTimestamp,
    pub to_ts: CqlTimestamp,
}

/// One partition's rows strictly before a position.
#[derive(Debug, SerializeRow)]
pub(super) struct SliceBeforeIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub bucket: CqlTimestamp,
    pub before_ts: CqlTimestamp,
    pub before_id: Uuid,
}

#[derive(Debug, SerializeRow)]
pub(super) struct IdKeyIn {
    pub device_id: Uuid,
    pub event_id: Uuid,
}

#[derive(Debug, SerializeRow)]
pub(super) struct IdIn {
    pub device_id: Uuid,
    pub event_id: Uuid,
    pub ts: CqlTimestamp,
    #[scylla(rename = "[ttl]")]
    pub ttl: i32,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct IdOut {
    #[allow(dead_code)] // Read for the type check; its presence is what matters.
    pub ts: CqlTimestamp,
}

#[derive(Debug, SerializeRow)]
pub(super) struct BucketIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub bucket: CqlTimestamp,
    #[scylla(rename = "[ttl]")]
    pub ttl: i32,
}

#[derive(Debug, SerializeRow)]
pub(super) struct BucketRangeIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub lo: CqlTimestamp,
    pub hi: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct BucketOut {
    pub bucket: CqlTimestamp,
}

#[derive(Debug, SerializeRow)]
pub(super) struct MetaKeyIn<'a> {
    pub name: &'a str,
}

#[derive(Debug, SerializeRow)]
pub(super) struct MetaIn<'a> {
    pub name: &'a str,
    pub value: i64,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct MetaOut {
    pub value: i64,
}

pub(super) fn ms(v: i64) -> CqlTimestamp {
    CqlTimestamp(v)
}

/// An upper estimate of a row's bound values, in bytes, for batch sizing.
pub(super) fn row_bytes(e: &Event) -> usize {
    // Fixed columns (ids, instants, the TTL) and each value's 4-byte length prefix.
    let fixed = 8 + 16 + 8 + 8 + 16 + 8 + 4 + 10 * 4;
    let metrics: usize = e.metrics.iter().map(|(k, _)| 4 + k.len() + 4 + 8).sum();
    let attrs: usize = e.attrs.iter().map(|(k, v)| 4 + k.len() + 4 + v.len()).sum();
    fixed + e.kind.len() + 4 + metrics + 4 + attrs
}

/// Splits a partition's records into runs whose estimated size stays under `max`
/// (a single larger record gets a run of its own).
pub(super) fn split_by_bytes<'a>(records: &[&'a Record], max: usize) -> Vec<Vec<&'a Record>> {
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

/// The row of `r`, expiring `ttl` seconds after it is written (0: never).
pub(super) fn event_row(r: &Record, bucket_len_ms: i64, ttl: i32) -> EventIn<'_> {
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
        ttl,
    }
}

/// A row of `rollups`, as written; `writetime` is its count (see `rollup.rs`).
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct RollupIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub day: CqlTimestamp,
    pub metric: &'a str,
    pub minute: CqlTimestamp,
    pub kind: &'a str,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sketch: MaybeUnset<Vec<u8>>,
    pub writetime: i64,
    pub ttl: i32,
}

/// One device's rollups of one metric and day, for minutes in `[from, to)`.
#[derive(Debug, SerializeRow)]
pub(super) struct RollupSliceIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub day: CqlTimestamp,
    pub metric: &'a str,
    pub from_minute: CqlTimestamp,
    pub to_minute: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct RollupOut {
    pub minute: CqlTimestamp,
    #[scylla(rename = "type")]
    pub kind: String,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sketch: Option<Vec<u8>>,
}

/// The key of a row of `pending_by_device`: one mark of one device's hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, SerializeRow)]
pub(super) struct PendingRow {
    pub user_id: i64,
    pub device_id: Uuid,
    pub hour: CqlTimestamp,
    pub flush: Uuid,
}

/// Minutes (offsets in the hour) added to a row of `pending_by_device`.
#[derive(Debug, SerializeRow)]
pub(super) struct PendingAddIn {
    pub minutes: Vec<i32>,
    pub user_id: i64,
    pub device_id: Uuid,
    pub hour: CqlTimestamp,
    pub flush: Uuid,
}

/// A row of `pending_by_device`, scanned whole (the sweep).
#[derive(Debug, DeserializeRow)]
pub(super) struct PendingScan {
    pub user_id: i64,
    pub device_id: Uuid,
    pub hour: CqlTimestamp,
    pub flush: Uuid,
    pub minutes: Option<Vec<i32>>,
}

/// One device's pending marks whose hour is in `[from, to)`.
#[derive(Debug, SerializeRow)]
pub(super) struct PendingRangeIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub from_hour: CqlTimestamp,
    pub to_hour: CqlTimestamp,
}

/// A row of `rollups_coarse`, as written; `writetime` is its count.
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct CoarseIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub level: i32,
    pub slab: CqlTimestamp,
    pub metric: &'a str,
    pub start: CqlTimestamp,
    pub kind: &'a str,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sketch: MaybeUnset<Vec<u8>>,
    pub writetime: i64,
    pub ttl: i32,
}

/// One device's hours or days of one metric in one slab, for starts in `[from, to)`.
#[derive(Debug, SerializeRow)]
pub(super) struct CoarseSliceIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub level: i32,
    pub slab: CqlTimestamp,
    pub metric: &'a str,
    pub from_start: CqlTimestamp,
    pub to_start: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct CoarseOut {
    pub start: CqlTimestamp,
    #[scylla(rename = "type")]
    pub kind: String,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub sketch: Option<Vec<u8>>,
}

/// A stored summary row (`rollups` or `rollups_coarse`), read as a [`Rollup`].
pub(super) trait SummaryRow {
    fn into_rollup(self) -> Result<Rollup, StoreError>;
}

impl SummaryRow for RollupOut {
    fn into_rollup(self) -> Result<Rollup, StoreError> {
        let figures = (self.count, self.min, self.max, self.sum);
        rollup_of(self.minute.0, self.kind, figures, self.sketch)
    }
}

impl SummaryRow for CoarseOut {
    fn into_rollup(self) -> Result<Rollup, StoreError> {
        let figures = (self.count, self.min, self.max, self.sum);
        rollup_of(self.start.0, self.kind, figures, self.sketch)
    }
}

/// A metric's values are known exactly from its min and max when it has at most this
/// many.
const VALUES_IN_MIN_MAX: u64 = 2;

/// The `sketch` column of a summary row, as written. A row of one or two values
/// stores none: [`rollup_of`] rebuilds it from min and max. Most rows of a fleet hold
/// one value a minute, and the serialized sketch (its first chunk of bins, over a
/// hundred bytes) was most of their size. Left unset, not null: a null is a tombstone
/// cell, which reads then step over.
pub(super) fn sketch_column(stats: &Stats) -> MaybeUnset<Vec<u8>> {
    match &stats.sketch {
        Some(s) if stats.summary.count > VALUES_IN_MIN_MAX => MaybeUnset::Set(s.to_bytes()),
        _ => MaybeUnset::Unset,
    }
}

/// A rollup from a stored row's columns.
fn rollup_of(
    start_ms: i64,
    kind: String,
    (count, min, max, sum): (i64, f64, f64, f64),
    sketch: Option<Vec<u8>>,
) -> Result<Rollup, StoreError> {
    let summary = Summary {
        count: count.max(0) as u64,
        min,
        max,
        sum,
    };
    // A finite min: a metric's row, not the row counting events (`""`). With at most
    // two values any stored sketch is ignored: being unset, not overwritten, an older
    // one may remain.
    let sketch = if min.is_finite() && summary.count <= VALUES_IN_MIN_MAX {
        let mut s = Sketch::of(min);
        if summary.count == 2 {
            s.add(max);
        }
        Some(s)
    } else {
        sketch.as_deref().map(Sketch::from_bytes).transpose()?
    };
    Ok(Rollup {
        start_ms,
        kind,
        summary,
        sketch,
    })
}

#[derive(Debug, DeserializeRow)]
pub(super) struct PendingOut {
    pub hour: CqlTimestamp,
    pub minutes: Option<Vec<i32>>,
}

/// One cell of `fleet_by_type`, as written; `writetime` is its count, `index` the
/// interval's place in its partition.
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct FleetIn<'a> {
    pub writetime: i64,
    pub ttl: i32,
    pub index: i32,
    pub count: i64,
    pub user_id: i64,
    pub level: i32,
    pub slab: CqlTimestamp,
    pub device_id: Uuid,
    pub kind: &'a str,
}

/// One partition of `fleet_by_type`.
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct FleetPartitionIn {
    pub user_id: i64,
    pub level: i32,
    pub slab: CqlTimestamp,
}

/// The rows of one type (or '', the totals) of a partition of `fleet_by_type`.
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct FleetTypeIn<'a> {
    pub user_id: i64,
    pub level: i32,
    pub slab: CqlTimestamp,
    pub kind: &'a str,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct FleetOut {
    pub device_id: Uuid,
    #[scylla(rename = "type")]
    pub kind: String,
    /// None once every cell has expired or been deleted.
    pub counts: Option<HashMap<i32, i64>>,
}

/// A row of `pending_by_user`, written, deleted and scanned whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, SerializeRow, DeserializeRow)]
pub(super) struct PendingHourRow {
    pub user_id: i64,
    pub slab: CqlTimestamp,
    pub hour: CqlTimestamp,
    pub device_id: Uuid,
    pub flush: Uuid,
}

/// One partition of `pending_by_user` in `[from_hour, to_hour)`.
#[derive(Debug, SerializeRow)]
pub(super) struct PendingHourRangeIn {
    pub user_id: i64,
    pub slab: CqlTimestamp,
    pub from_hour: CqlTimestamp,
    pub to_hour: CqlTimestamp,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct PendingHourOut {
    pub hour: CqlTimestamp,
    pub device_id: Uuid,
}

/// The whole primary key of one `events` row.
#[derive(Debug, SerializeRow)]
pub(super) struct EventKeyIn {
    pub user_id: i64,
    pub device_id: Uuid,
    pub bucket: CqlTimestamp,
    pub ts: CqlTimestamp,
    pub event_id: Uuid,
}

/// A row of `latest`, as written; `writetime` is its ts in microseconds.
#[derive(Debug, SerializeRow)]
#[scylla(flavor = "enforce_order", skip_name_checks)]
pub(super) struct LatestIn<'a> {
    pub user_id: i64,
    pub device_id: Uuid,
    pub metric: &'a str,
    pub ts: CqlTimestamp,
    pub value: f64,
    pub writetime: i64,
}

#[derive(Debug, DeserializeRow)]
pub(super) struct LatestOut {
    pub device_id: Uuid,
    pub metric: String,
    pub ts: CqlTimestamp,
    pub value: f64,
}
