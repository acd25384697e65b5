//! The rollup rows' encodings and keys: what the write path stores and the reads
//! parse, kept apart from both.

use super::super::{corrupt, ordered, unordered};
use crate::model::{bucket_start, DeviceId, UserId};
use crate::store::rollup::Stats;
use crate::store::{Level, StoreError, Summary};

/// A stored rollup row.
pub(super) type Row = Stats;

/// Reads a row; directories from before sketches hold a bare `Summary`.
pub(super) fn decode_row(bytes: &[u8]) -> Result<Row, StoreError> {
    postcard::from_bytes(bytes).or_else(|_| {
        let summary = postcard::from_bytes(bytes).map_err(corrupt)?;
        Ok(Row {
            summary,
            sketch: None,
        })
    })
}

/// One hour of minute summaries (of one device, metric and type), sparse and in
/// minute order: `(minute of the hour, summary)`. One row per hour rather than per
/// minute: a fleet whose devices send an event a minute would otherwise write a new
/// row with nearly every event, and those writes were most of its ingest cost.
#[derive(Debug, Clone, Default)]
pub(super) struct Minutes(pub(super) Vec<(u8, Summary)>);

/// How a minute's summary is stored. A sparse device's minute mostly holds one event,
/// and a count row ("" metric) never holds values: storing the four figures of each
/// would make these rows most of the bytes a fleet writes (26 bytes a minute, against
/// 3 for a count and 10 for one value). Lossless: anything else is stored whole.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) enum Packed {
    /// Events without values: min, max and sum are those of [`Summary::EMPTY`].
    Count(u64),
    /// One value.
    One(f64),
    Full(Summary),
}

impl Packed {
    fn of(s: &Summary) -> Packed {
        let e = Summary::EMPTY;
        let same = |a: f64, b: f64| a.to_bits() == b.to_bits();
        if same(s.min, e.min) && same(s.max, e.max) && same(s.sum, e.sum) {
            Packed::Count(s.count)
        } else if s.count == 1 && same(s.min, s.max) && same(s.min, s.sum) {
            Packed::One(s.sum)
        } else {
            Packed::Full(*s)
        }
    }

    fn unpack(self) -> Summary {
        match self {
            Packed::Count(count) => Summary {
                count,
                ..Summary::EMPTY
            },
            Packed::One(v) => Summary {
                count: 1,
                min: v,
                max: v,
                sum: v,
            },
            Packed::Full(s) => s,
        }
    }
}

/// The first byte of a [`Minutes`] row in the packed encoding. Rows written before it
/// start with their entry count, a varint of at most 60, so they never start with it.
pub(super) const PACKED_MINUTES: u8 = 0xFE;

impl Minutes {
    pub(super) fn add(&mut self, minute: u8, s: &Summary) {
        // Events mostly come in time order: the common case appends.
        match self.0.last_mut() {
            Some(last) if last.0 == minute => return last.1.merge(s),
            Some(last) if last.0 < minute => return self.0.push((minute, *s)),
            None => return self.0.push((minute, *s)),
            _ => {}
        }
        match self.0.binary_search_by_key(&minute, |e| e.0) {
            Ok(i) => self.0[i].1.merge(s),
            Err(i) => self.0.insert(i, (minute, *s)),
        }
    }
}

/// What a rollup keyspace holds: rows that merge, and their encoding.
pub(super) trait Value: Default {
    fn merge(&mut self, other: &Self);
    fn encode(&self) -> Result<Vec<u8>, StoreError>;
    fn decode(bytes: &[u8]) -> Result<Self, StoreError>;
}

impl Value for Row {
    fn merge(&mut self, other: &Self) {
        Stats::merge(self, other);
    }
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        encode(self)
    }
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        decode_row(bytes)
    }
}

impl Value for Minutes {
    fn merge(&mut self, other: &Self) {
        for (m, s) in &other.0 {
            self.add(*m, s);
        }
    }
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let packed: Vec<(u8, Packed)> = self.0.iter().map(|(m, s)| (*m, Packed::of(s))).collect();
        let mut out = Vec::with_capacity(1 + 4 * packed.len());
        out.push(PACKED_MINUTES);
        postcard::to_extend(&packed, out).map_err(|e| StoreError::Invalid(e.to_string()))
    }
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.split_first() {
            Some((&PACKED_MINUTES, rest)) => {
                let packed: Vec<(u8, Packed)> = postcard::from_bytes(rest).map_err(corrupt)?;
                Ok(Minutes(
                    packed.into_iter().map(|(m, p)| (m, p.unpack())).collect(),
                ))
            }
            _ => postcard::from_bytes(bytes).map(Minutes).map_err(corrupt),
        }
    }
}

pub(super) fn encode(row: &Row) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(row).map_err(|e| StoreError::Invalid(e.to_string()))
}

pub(super) fn push_metric(k: &mut Vec<u8>, metric: &str) {
    // Names are at most 64 bytes (validated at ingest), so one length byte suffices
    // and keeps "temp" from being a prefix of "temperature".
    k.push(metric.len() as u8);
    k.extend_from_slice(metric.as_bytes());
}

pub(super) fn minute_key(
    user: UserId,
    device: DeviceId,
    metric: &str,
    start: i64,
    kind: &str,
) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 16 + 1 + metric.len() + 8 + kind.len());
    k.extend_from_slice(&ordered(user));
    k.extend_from_slice(device.as_bytes());
    push_metric(&mut k, metric);
    k.extend_from_slice(&ordered(start));
    k.extend_from_slice(kind.as_bytes());
    k
}

/// The key of an hour of minutes: laid out as a minute row's, with the hour.
pub(super) fn minutes_key(
    user: UserId,
    device: DeviceId,
    metric: &str,
    hour: i64,
    kind: &str,
) -> Vec<u8> {
    minute_key(user, device, metric, hour, kind)
}

pub(super) fn coarse_key(
    user: UserId,
    device: DeviceId,
    level: Level,
    metric: &str,
    start: i64,
    kind: &str,
) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 16 + 2 + metric.len() + 8 + kind.len());
    k.extend_from_slice(&ordered(user));
    k.extend_from_slice(device.as_bytes());
    k.push(level.tag());
    push_metric(&mut k, metric);
    k.extend_from_slice(&ordered(start));
    k.extend_from_slice(kind.as_bytes());
    k
}

pub(super) fn fleet_key(
    user: UserId,
    level: Level,
    start: i64,
    device: DeviceId,
    kind: &str,
) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 1 + 8 + 16 + kind.len());
    k.extend_from_slice(&ordered(user));
    k.push(level.tag());
    k.extend_from_slice(&ordered(start));
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(kind.as_bytes());
    k
}

pub(super) fn parse_minute_key(
    key: &[u8],
) -> Result<(UserId, DeviceId, &str, i64, &str), StoreError> {
    let bad = || StoreError::Corrupt(format!("rollup key of {} bytes", key.len()));
    let len = usize::from(*key.get(24).ok_or_else(bad)?);
    if key.len() < 25 + len + 8 {
        return Err(bad());
    }
    let user = unordered(key[..8].try_into().map_err(corrupt)?);
    let device = DeviceId::from_slice(&key[8..24]).map_err(corrupt)?;
    let metric = std::str::from_utf8(&key[25..25 + len]).map_err(corrupt)?;
    let at = 25 + len;
    let minute = unordered(key[at..at + 8].try_into().map_err(corrupt)?);
    let kind = std::str::from_utf8(&key[at + 8..]).map_err(corrupt)?;
    Ok((user, device, metric, minute, kind))
}

pub(super) fn minute_of_hour(minute_ms: i64) -> u8 {
    ((minute_ms - bucket_start(minute_ms, Level::Hour.ms())) / Level::Minute.ms()) as u8
}
