//! Types shared by every stage of the pipeline, and the rules for instants.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

/// A registry user id.
pub type UserId = i64;

/// A device id. Devices are identified by UUID everywhere.
pub type DeviceId = Uuid;

/// The earliest accepted event time: 2000-01-01T00:00:00Z.
pub const MIN_TS_MS: i64 = 946_684_800_000;

/// How far in the future an event's `ts` may be.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;

/// How far past now a read looks. Wider than [`MAX_FUTURE_MS`], so that no accepted
/// event is missed by a range that ends at "now": the queries, the purge of a device
/// and the transfer between stores all read up to now plus this.
pub const QUERY_AHEAD_MS: i64 = 86_400_000;

/// One validated event, as a device sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: Uuid,
    /// The server generated `id` (the device sent none). Such an id cannot have been
    /// stored before, so the store may skip its duplicate lookup.
    pub id_assigned: bool,
    pub ts_ms: i64,
    /// The event's `type` (a Rust keyword, hence the name).
    pub kind: String,
    pub metrics: Vec<(String, f64)>,
    pub attrs: Vec<(String, String)>,
}

/// An event with its owner, as it travels through the pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub user_id: UserId,
    pub device_id: DeviceId,
    /// Time of receipt, used by the live figures.
    pub received_ms: i64,
    pub event: Event,
}

/// The store partition an event belongs to: user, device and time bucket.
///
/// This is the partition key of the `cql/` schema, and the batcher groups by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub user_id: UserId,
    pub device_id: DeviceId,
    /// Start of the time bucket, in ms since the epoch.
    pub bucket_ms: i64,
}

impl PartitionKey {
    /// The partition of `record` for buckets of `bucket_len_ms`.
    pub fn of(record: &Record, bucket_len_ms: i64) -> Self {
        Self {
            user_id: record.user_id,
            device_id: record.device_id,
            bucket_ms: bucket_start(record.event.ts_ms, bucket_len_ms),
        }
    }
}

/// The events of one partition in a flush, in arrival order: what the batcher hands
/// the store, so both sides share it from here.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionBatch {
    pub key: PartitionKey,
    pub records: Vec<Record>,
}

/// The start of the bucket (or window) of length `len_ms` that holds `ts_ms`.
/// Buckets are aligned at multiples of their length since the Unix epoch.
pub fn bucket_start(ts_ms: i64, len_ms: i64) -> i64 {
    ts_ms.div_euclid(len_ms) * len_ms
}

/// The buckets of length `len_ms` that `[from_ms, to_ms)` touches, in order, each as
/// (its start, the part of the range in it).
pub fn buckets_in(from_ms: i64, to_ms: i64, len_ms: i64) -> impl Iterator<Item = (i64, i64, i64)> {
    let first = bucket_start(from_ms, len_ms);
    (0..)
        .map(move |i| first + i * len_ms)
        .take_while(move |s| *s < to_ms)
        .map(move |s| (s, from_ms.max(s), to_ms.min(s + len_ms)))
        .filter(|(_, lo, hi)| lo < hi)
}

/// An id for an event that came without one: a UUIDv7 whose time field is the event's
/// own `ts`, with 74 random bits. Embedding the `ts` lets a store find the event from
/// its id alone (see [`assigned_id_ts`]), so it needs no duplicate-index entry for it.
pub fn assigned_id(ts_ms: i64) -> Uuid {
    let random: [u8; 10] = rand::random();
    uuid::Builder::from_unix_timestamp_millis(ts_ms.max(0) as u64, &random).into_uuid()
}

/// The `ts` an id from [`assigned_id`] was made for: the time field of a UUIDv7.
/// `None` for other versions.
pub fn assigned_id_ts(id: Uuid) -> Option<i64> {
    if id.get_version_num() != 7 {
        return None;
    }
    let b = id.as_bytes();
    Some(i64::from_be_bytes([
        0, 0, b[0], b[1], b[2], b[3], b[4], b[5],
    ]))
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Formats an instant as the contract wants it: `YYYY-MM-DDTHH:MM:SS.sssZ`.
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 instant, truncated to whole milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Parses an instant given as RFC 3339 or as integer ms (query parameters).
pub fn parse_instant(s: &str) -> Option<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    parse_rfc3339_ms(s)
}

/// How many entries an event's `metrics` and `attrs` may each hold.
pub const MAX_MAP_ENTRIES: usize = 64;
/// The largest attr value, in UTF-8 bytes.
pub const MAX_ATTR_BYTES: usize = 1024;

/// [`is_valid_name`] as a regular expression, for the OpenAPI document.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,64}$";

/// True if `name` is 1 to 64 characters from `A-Z a-z 0-9 _ . : -`.
///
/// Event types, metric names and attr names all follow this rule.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_at_epoch_multiples_including_before_epoch() {
        assert_eq!(bucket_start(0, 1000), 0);
        assert_eq!(bucket_start(999, 1000), 0);
        assert_eq!(bucket_start(1000, 1000), 1000);
        assert_eq!(bucket_start(-1, 1000), -1000);
    }

    #[test]
    fn a_range_touches_each_bucket_once() {
        let parts: Vec<_> = buckets_in(10, 250, 100).collect();
        assert_eq!(parts, [(0, 10, 100), (100, 100, 200), (200, 200, 250)]);
        assert_eq!(buckets_in(100, 200, 100).count(), 1);
        assert_eq!(buckets_in(5, 5, 100).count(), 0);
    }

    #[test]
    fn instants_format_with_millis_and_z() {
        assert_eq!(format_ms(1_795_000_000_123), "2026-11-18T11:06:40.123Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_sub_millisecond_digits_are_truncated() {
        let a = parse_rfc3339_ms("2026-11-21T10:00:00.123999Z").unwrap();
        let b = parse_rfc3339_ms("2026-11-21T10:00:00.123Z").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_rfc3339_ms("2026-11-21T11:00:00.123+01:00"), Some(b));
    }

    #[test]
    fn assigned_ids_carry_the_event_ts() {
        let ts = 1_795_000_000_123;
        let a = assigned_id(ts);
        assert_eq!(assigned_id_ts(a), Some(ts));
        assert_ne!(a, assigned_id(ts));
        assert_eq!(assigned_id_ts(Uuid::new_v4()), None);
    }

    #[test]
    fn names_follow_the_character_rule() {
        assert!(is_valid_name("temp_1.a:b-c"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("has space"));
        assert!(!is_valid_name("é"));
        assert!(is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name(&"a".repeat(65)));
    }
}
