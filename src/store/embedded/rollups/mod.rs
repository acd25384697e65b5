//! Rollups in the embedded store: every level kept in the same atomic batch as the
//! events, by read-modify-write under the write mutex, so they are exact at once.
//!
//! Three keyspaces (values in postcard):
//! - `minutes`: the minutes of a device, one row per hour. Key = user (8) | device
//!   (16) | metric length (1) | metric | hour (8) | type, value = [`Minutes`]. Metric
//!   "" counts all events.
//! - `rollups_coarse`: hours and days of a device. Key = user | device | level (1) |
//!   metric length | metric | start (8) | type, value = the [`Summary`] and, for a
//!   metric, the [`Sketch`] of its values.
//! - `fleet_counts`: hours and days of every device of a user, counts only, time
//!   first. Key = user | level | start | device | type. A grouped query over a fleet
//!   reads one slice of it instead of one slice per device.
//!
//! Directories from before these keep minute rows (one per minute, a bare `Summary`)
//! in `rollups`; they are converted once, when opened.
//!
//! A flush first sums its new events per minute, then derives hours, days and fleet
//! rows from those minute sums: the coarser rows cost one map entry per distinct row,
//! not per event.

use rustc_hash::FxHashMap as HashMap;

use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};

mod rows;

use super::{corrupt, engine, ordered, unordered, Inner, CACHE_ROWS};
use crate::model::{bucket_start, now_ms, DeviceId, Record, UserId};
use crate::store::retention::Tier;
use crate::store::{
    FleetCount, FleetQuery, Level, Rollup, RollupQuery, Sketch, StoreError, Summary,
};
use rows::{
    coarse_key, decode_row, encode, fleet_key, minute_of_hour, minutes_key, parse_minute_key,
    Minutes, Row, Value,
};

/// Present in data directories whose hour, day and fleet rows are complete; older
/// ones get them built from their minute rows once, when opened.
pub(super) const LEVELS_META_KEY: &str = "rollup_levels";

/// The rollup keyspaces.
pub(super) struct RollupKeyspaces {
    /// Minute rows of directories from before `minutes`: read once, by
    /// [`Inner::build_levels`].
    pub(super) old_minute: Keyspace,
    pub(super) minute: Keyspace,
    pub(super) coarse: Keyspace,
    pub(super) fleet: Keyspace,
}

/// The latest value of recently written rows, per keyspace: most flushes touch the
/// rows the previous flush touched, and reading them back from the engine would cost
/// a memtable search each. Values are exactly what was written, so a cache is never
/// stale; it is dropped whole when it reaches its bound.
#[derive(Default)]
pub(super) struct Caches {
    // Rows as written, encoded: a sketch takes a kilobyte decoded and a tenth of
    // that encoded, and a hit is decoded again only to be merged.
    minute: HashMap<Vec<u8>, Vec<u8>>,
    coarse: HashMap<Vec<u8>, Vec<u8>>,
    fleet: HashMap<Vec<u8>, Vec<u8>>,
    /// Per device, the newest minute that may have rows (that of its newest stored
    /// event): a minute past it has none, so its rows are written without reading
    /// them first. A fleet whose devices send one event a minute creates new minute
    /// rows with nearly every event, and those reads were most of its write cost.
    newest_minute: HashMap<(UserId, DeviceId), i64>,
}

/// The key of an hour of one device's minutes: (user, device, metric, hour, type),
/// borrowed from the flush's records.
type HourKey<'a> = (UserId, DeviceId, &'a str, i64, &'a str);

/// A flush's new events summed per (user, device, metric, hour, type): the minutes of
/// the hour, and the sketch of its values. Keyed by borrowed parts; the byte keys are
/// built once per row. Every coarser row is derived from these hours, so an event
/// costs one map entry per metric, whatever the flush's shape (a fleet flush holds
/// thousands of distinct minutes, a dense one a few).
#[derive(Default)]
pub(super) struct MinuteSums<'a> {
    hours: HashMap<HourKey<'a>, HourSums>,
}

#[derive(Default)]
struct HourSums {
    minutes: Minutes,
    /// Sketches are kept from the hour up: a sketch costs a kilobyte in memory, and
    /// a minute often holds one value. Percentiles of minute windows read events.
    sketch: Option<Sketch>,
}

impl<'a> MinuteSums<'a> {
    pub(super) fn add(&mut self, r: &'a Record) {
        let e = &r.event;
        let hour = bucket_start(e.ts_ms, Level::Hour.ms());
        let minute = minute_of_hour(bucket_start(e.ts_ms, Level::Minute.ms()));
        let mut count = Summary::EMPTY;
        count.add(None);
        self.hours
            .entry((r.user_id, r.device_id, "", hour, &e.kind))
            .or_default()
            .minutes
            .add(minute, &count);
        for (name, v) in &e.metrics {
            let mut one = Summary::EMPTY;
            one.add(Some(*v));
            let h = self
                .hours
                .entry((r.user_id, r.device_id, name, hour, &e.kind))
                .or_default();
            h.minutes.add(minute, &one);
            h.sketch.get_or_insert_with(Sketch::default).add(*v);
        }
    }

    /// The newest minute of each device in the flush.
    fn newest_minutes(&self) -> HashMap<(UserId, DeviceId), i64> {
        let mut newest: HashMap<(UserId, DeviceId), i64> = HashMap::default();
        for (&(user, device, _, hour, _), h) in &self.hours {
            let last = h.minutes.0.last().map_or(0, |m| i64::from(m.0));
            let minute = hour + last * Level::Minute.ms();
            let m = newest.entry((user, device)).or_insert(minute);
            *m = (*m).max(minute);
        }
        newest
    }
}

/// A row's key and value, as written.
type Encoded = (Vec<u8>, Vec<u8>);

/// Rows staged in a batch, to enter the caches once the batch is committed.
#[derive(Default)]
pub(super) struct Staged {
    minute: Vec<Encoded>,
    coarse: Vec<Encoded>,
    fleet: Vec<Encoded>,
    newest_minute: Vec<((UserId, DeviceId), i64)>,
}

impl Staged {
    pub(super) fn commit(self, caches: &mut Caches) {
        caches.minute.extend(self.minute);
        caches.coarse.extend(self.coarse);
        caches.fleet.extend(self.fleet);
        if caches.newest_minute.len() + self.newest_minute.len() > CACHE_ROWS {
            caches.newest_minute.clear();
        }
        for (device, minute) in self.newest_minute {
            let m = caches.newest_minute.entry(device).or_insert(minute);
            *m = (*m).max(minute);
        }
    }
}

/// Rows derived from a flush's minute sums: (key, row, known to be new).
struct Derived {
    minutes: Vec<(Vec<u8>, Minutes, bool)>,
    coarse: Vec<(Vec<u8>, Row, bool)>,
    fleet: Vec<(Vec<u8>, Row, bool)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Which {
    Coarse,
    Fleet,
}

/// Whether a device's row of `level` starting at `start` cannot exist yet: it starts
/// after the level's interval holding the device's newest stored minute (`newest`;
/// `i64::MIN` when the device has no stored event and so no row).
fn is_new(newest: Option<&i64>, level: Level, start: i64) -> bool {
    newest.is_some_and(|&n| n == i64::MIN || start > bucket_start(n, level.ms()))
}

fn derive(sums: MinuteSums<'_>, newest_minute: &HashMap<(UserId, DeviceId), i64>) -> Derived {
    let mut minutes = Vec::with_capacity(sums.hours.len());
    let mut coarse = Vec::with_capacity(sums.hours.len() + 16);
    let mut fleet = Vec::new();
    // Days are summed under borrowed keys first: many hours fall in one of them.
    let mut days: HashMap<HourKey<'_>, Row> = HashMap::default();
    for ((user, device, metric, hour, kind), h) in sums.hours {
        let mut summary = Summary::EMPTY;
        for (_, s) in &h.minutes.0 {
            summary.merge(s);
        }
        let row = Row {
            summary,
            sketch: h.sketch,
        };
        let day = bucket_start(hour, Level::Day.ms());
        days.entry((user, device, metric, day, kind))
            .or_default()
            .merge(&row);
        // Each hour key is unique in the flush, and so is each of its rows. A fleet
        // device's flush mostly starts new hours: those rows are written without
        // reading them first.
        let new = is_new(newest_minute.get(&(user, device)), Level::Hour, hour);
        if metric.is_empty() {
            let count = Row {
                summary,
                sketch: None,
            };
            fleet.push((fleet_key(user, Level::Hour, hour, device, kind), count, new));
        }
        coarse.push((
            coarse_key(user, device, Level::Hour, metric, hour, kind),
            row,
            new,
        ));
        minutes.push((
            minutes_key(user, device, metric, hour, kind),
            h.minutes,
            new,
        ));
    }
    for ((user, device, metric, day, kind), row) in days {
        let new = is_new(newest_minute.get(&(user, device)), Level::Day, day);
        if metric.is_empty() {
            let count = Row {
                summary: row.summary,
                sketch: None,
            };
            fleet.push((fleet_key(user, Level::Day, day, device, kind), count, new));
        }
        coarse.push((
            coarse_key(user, device, Level::Day, metric, day, kind),
            row,
            new,
        ));
    }
    Derived {
        minutes,
        coarse,
        fleet,
    }
}

/// Adds rows to a keyspace in `batch`: each merged with its cached or stored value
/// unless known to be new. Returns the encoded rows, for the cache.
fn stage<T: Value>(
    keyspace: &Keyspace,
    cache: &mut HashMap<Vec<u8>, Vec<u8>>,
    mut rows: Vec<(Vec<u8>, T, bool)>,
    batch: &mut WriteBatch,
) -> Result<Vec<Encoded>, StoreError> {
    if cache.len() + rows.len() > CACHE_ROWS {
        cache.clear();
    }
    // In key order, like the events: neighbours inserted one after another keep the
    // memtable's search paths in cache.
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::with_capacity(rows.len());
    for (key, mut row, new) in rows {
        match cache.get(&key) {
            Some(cached) => row.merge(&T::decode(cached)?),
            None if new => {}
            None => {
                if let Some(bytes) = keyspace.get(&key).map_err(engine)? {
                    row.merge(&T::decode(&bytes)?);
                }
            }
        }
        let value = row.encode()?;
        batch.insert(keyspace, key.clone(), value.clone());
        out.push((key, value));
    }
    Ok(out)
}

impl Inner {
    /// Adds a flush's minute sums to every level's stored rows, in `batch`. Called
    /// under the write mutex.
    pub(super) fn stage_rollups(
        &self,
        caches: &mut Caches,
        sums: MinuteSums<'_>,
        batch: &mut WriteBatch,
    ) -> Result<Staged, StoreError> {
        let mut staged = Staged::default();
        // The newest minute of each device in the flush, as stored before it (read
        // once per device, then kept), and after it.
        let flush_newest = sums.newest_minutes();
        for &device in flush_newest.keys() {
            if let std::collections::hash_map::Entry::Vacant(e) = caches.newest_minute.entry(device)
            {
                match self.newest_event_minute(device.0, device.1)? {
                    Some(minute) => {
                        e.insert(minute);
                    }
                    // No stored event: no row either, unless raw events expire before
                    // their rollups, which may then outlive every event of a device.
                    None if self.retention.keep_ms(Tier::Raw).is_none() => {
                        e.insert(i64::MIN);
                    }
                    None => {}
                }
            }
        }
        staged.newest_minute = flush_newest.into_iter().collect();
        let derived = derive(sums, &caches.newest_minute);
        let r = &self.rollups;
        staged.minute = stage(&r.minute, &mut caches.minute, derived.minutes, batch)?;
        staged.coarse = stage(&r.coarse, &mut caches.coarse, derived.coarse, batch)?;
        staged.fleet = stage(&r.fleet, &mut caches.fleet, derived.fleet, batch)?;
        Ok(staged)
    }

    /// The minute of a device's newest stored event: no rollup row of the device is
    /// newer (rows are only written with their events).
    fn newest_event_minute(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Option<i64>, StoreError> {
        let mut prefix = ordered(user).to_vec();
        prefix.extend_from_slice(device.as_bytes());
        match self.events.prefix(&prefix).next_back() {
            None => Ok(None),
            Some(item) => {
                let key = item.key().map_err(engine)?;
                let (ts, _) = super::decode_key_tail(&key)?;
                Ok(Some(bucket_start(ts, Level::Minute.ms())))
            }
        }
    }

    pub(super) fn read_rollups(&self, q: &RollupQuery) -> Result<Vec<Rollup>, StoreError> {
        let from_ms = self
            .retention
            .clip(Tier::Rollup(q.level), q.from_ms, now_ms());
        let q = &RollupQuery {
            from_ms,
            ..q.clone()
        };
        if q.level == Level::Minute {
            return self.read_minutes(q);
        }
        let metric = q.metric.as_deref().unwrap_or("");
        let lo = coarse_key(q.user_id, q.device_id, q.level, metric, q.from_ms, "");
        let hi = coarse_key(q.user_id, q.device_id, q.level, metric, q.to_ms, "");
        // The start sits right before the type, at the same offset in every key of
        // the slice.
        let at = lo.len() - 8;
        let mut out = Vec::new();
        for item in self.rollups.coarse.range(lo..hi) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let start_ms = unordered(key[at..at + 8].try_into().map_err(corrupt)?);
            let kind = std::str::from_utf8(&key[at + 8..]).map_err(corrupt)?;
            if q.kind.as_deref().is_some_and(|k| k != kind) {
                continue;
            }
            let row = decode_row(&value)?;
            out.push(Rollup {
                start_ms,
                kind: kind.to_owned(),
                summary: row.summary,
                sketch: row.sketch,
            });
        }
        Ok(out)
    }

    fn read_minutes(&self, q: &RollupQuery) -> Result<Vec<Rollup>, StoreError> {
        let metric = q.metric.as_deref().unwrap_or("");
        let first_hour = bucket_start(q.from_ms, Level::Hour.ms());
        let lo = minutes_key(q.user_id, q.device_id, metric, first_hour, "");
        let hi = minutes_key(q.user_id, q.device_id, metric, q.to_ms, "");
        let at = lo.len() - 8;
        let mut out = Vec::new();
        for item in self.rollups.minute.range(lo..hi) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let hour = unordered(key[at..at + 8].try_into().map_err(corrupt)?);
            let kind = std::str::from_utf8(&key[at + 8..]).map_err(corrupt)?;
            if q.kind.as_deref().is_some_and(|k| k != kind) {
                continue;
            }
            for (m, summary) in Minutes::decode(&value)?.0 {
                let start_ms = hour + i64::from(m) * Level::Minute.ms();
                if (q.from_ms..q.to_ms).contains(&start_ms) {
                    out.push(Rollup {
                        start_ms,
                        kind: kind.to_owned(),
                        summary,
                        sketch: None,
                    });
                }
            }
        }
        out.sort_by(|a, b| (a.start_ms, &a.kind).cmp(&(b.start_ms, &b.kind)));
        Ok(out)
    }

    pub(super) fn read_fleet(&self, q: &FleetQuery) -> Result<Option<Vec<FleetCount>>, StoreError> {
        if q.level == Level::Minute {
            return Ok(None);
        }
        let from_ms = self
            .retention
            .clip(Tier::Rollup(q.level), q.from_ms, now_ms());
        let lo = fleet_key(q.user_id, q.level, from_ms, DeviceId::nil(), "");
        let hi = fleet_key(q.user_id, q.level, q.to_ms, DeviceId::nil(), "");
        let mut out = Vec::new();
        for item in self.rollups.fleet.range(lo..hi) {
            let (key, value) = item.into_inner().map_err(engine)?;
            let kind = std::str::from_utf8(&key[33..]).map_err(corrupt)?;
            if q.kind.as_deref().is_some_and(|k| k != kind) {
                continue;
            }
            let summary = decode_row(&value)?.summary;
            out.push(FleetCount {
                start_ms: unordered(key[9..17].try_into().map_err(corrupt)?),
                device_id: DeviceId::from_slice(&key[17..33]).map_err(corrupt)?,
                kind: kind.to_owned(),
                count: summary.count,
            });
        }
        Ok(Some(out))
    }

    /// Builds the hour-packed minutes and the hour, day and fleet rows of a data
    /// directory written before they existed, from its minute rows. Overwrites
    /// rather than adds, so that a build cut short by a crash is simply done again at
    /// the next start.
    pub(super) fn build_levels(&self) -> Result<(), StoreError> {
        const BATCH_ROWS: usize = 10_000;
        let mut derived: HashMap<(Which, Vec<u8>), Row> = HashMap::default();
        let mut packed: HashMap<Vec<u8>, Minutes> = HashMap::default();
        let mut prefix: Vec<u8> = Vec::new();
        let flush = |derived: &mut HashMap<(Which, Vec<u8>), Row>,
                     packed: &mut HashMap<Vec<u8>, Minutes>| {
            let mut batch = self.db.batch();
            for (key, m) in packed.drain() {
                batch.insert(&self.rollups.minute, key, m.encode()?);
            }
            for ((which, key), s) in derived.drain() {
                let keyspace = match which {
                    Which::Fleet => &self.rollups.fleet,
                    _ => &self.rollups.coarse,
                };
                batch.insert(keyspace, key, encode(&s)?);
            }
            batch.commit().map_err(engine)
        };
        for item in self.rollups.old_minute.iter() {
            let (key, value) = item.into_inner().map_err(engine)?;
            let (user, device, metric, minute, kind) = parse_minute_key(&key)?;
            // Rows of one (user, device, metric) are contiguous: once past them, their
            // hours and days are complete and can be written.
            let this_prefix = &key[..25 + metric.len()];
            if this_prefix != prefix.as_slice() {
                if derived.len() + packed.len() >= BATCH_ROWS {
                    flush(&mut derived, &mut packed)?;
                }
                prefix = this_prefix.to_vec();
            }
            let s = decode_row(&value)?;
            let hour = bucket_start(minute, Level::Hour.ms());
            packed
                .entry(minutes_key(user, device, metric, hour, kind))
                .or_default()
                .add(minute_of_hour(minute), &s.summary);
            for level in [Level::Hour, Level::Day] {
                let at = bucket_start(minute, level.ms());
                derived
                    .entry((
                        Which::Coarse,
                        coarse_key(user, device, level, metric, at, kind),
                    ))
                    .or_default()
                    .merge(&s);
                if metric.is_empty() {
                    derived
                        .entry((Which::Fleet, fleet_key(user, level, at, device, kind)))
                        .or_default()
                        .merge(&s);
                }
            }
        }
        flush(&mut derived, &mut packed)
    }
}

#[cfg(test)]
mod tests;
