//! Payload → validated events. Every source (HTTP, MQTT) goes through here, so the
//! rules of the contract live in one place.
//!
//! Parsing runs twice only when it fails: the fast path is plain `serde_json`; a
//! payload it rejects is parsed again with [`serde_path_to_error`] to name the index
//! and the field in the answer.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use uuid::Uuid;

use crate::model::{self, Event};
use crate::store::retention::{Retention, Tier};

/// How many entries `metrics` and `attrs` may each hold.
pub const MAX_MAP_ENTRIES: usize = 64;
/// The largest attr value, in UTF-8 bytes.
pub const MAX_ATTR_BYTES: usize = 1024;

/// The framing of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One event object, or a JSON array of them.
    Json,
    /// One event object per line; blank lines are skipped.
    NdJson,
}

/// One decoded event and the `device_id` it named (gateway mode), if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub event: Event,
    pub device_id: Option<Uuid>,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// An event breaks a rule. Nothing of the payload may be stored.
    #[error("event {index}: {field}: {reason}")]
    Invalid {
        index: usize,
        field: String,
        reason: String,
        /// How many events the payload held, as far as it could be read.
        events: usize,
    },
    /// More events than the configured maximum.
    #[error("too many events: at most {limit} per request")]
    TooMany { limit: usize },
}

impl DecodeError {
    fn invalid(index: usize, field: impl Into<String>, reason: impl Into<String>) -> Self {
        DecodeError::Invalid {
            index,
            field: field.into(),
            reason: reason.into(),
            events: index + 1,
        }
    }

    /// How many events this error refuses (at least one).
    pub fn events(&self) -> usize {
        match self {
            DecodeError::Invalid { events, .. } => (*events).max(1),
            DecodeError::TooMany { limit } => limit + 1,
        }
    }
}

/// Decoding limits and the clock used to check `ts`.
#[derive(Debug, Clone, Copy)]
pub struct DecodeOptions {
    pub max_events: usize,
    /// Time of receipt; the default `ts`, and the reference for "not in the future".
    pub now_ms: i64,
    /// An event the raw tier has already expired is refused: it could never be read,
    /// and rollups must not be summed from partly expired data.
    pub retention: Retention,
}

/// Decodes and validates a whole payload. All or nothing: one bad event fails it.
///
/// # Errors
///
/// [`DecodeError::Invalid`] names the first bad event and field;
/// [`DecodeError::TooMany`] when the payload holds more than `max_events`.
pub fn decode(
    body: &[u8],
    format: Format,
    opts: DecodeOptions,
) -> Result<Vec<Decoded>, DecodeError> {
    let raw = match format {
        Format::Json => parse_json(body, opts.max_events)?,
        Format::NdJson => parse_ndjson(body, opts.max_events)?,
    };
    let total = raw.len();
    raw.into_iter()
        .enumerate()
        .map(|(index, raw)| raw.validate(index, &opts))
        .collect::<Result<_, _>>()
        .map_err(|mut e| {
            if let DecodeError::Invalid { events, .. } = &mut e {
                *events = total;
            }
            e
        })
}

fn parse_json(body: &[u8], max_events: usize) -> Result<Vec<RawEvent>, DecodeError> {
    let first = body.iter().copied().find(|b| !b.is_ascii_whitespace());
    match first {
        Some(b'[') => {
            let events: Vec<RawEvent> =
                serde_json::from_slice(body).map_err(|_| explain_array(body))?;
            if events.len() > max_events {
                return Err(DecodeError::TooMany { limit: max_events });
            }
            Ok(events)
        }
        Some(b'{') => {
            let event = serde_json::from_slice(body).map_err(|_| explain_single(body, 0))?;
            Ok(vec![event])
        }
        None => Err(DecodeError::invalid(0, "body", "the body is empty")),
        Some(_) => Err(DecodeError::invalid(
            0,
            "body",
            "expected an event object or a JSON array of events",
        )),
    }
}

fn parse_ndjson(body: &[u8], max_events: usize) -> Result<Vec<RawEvent>, DecodeError> {
    let mut events = Vec::new();
    for line in body.split(|&b| b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if events.len() == max_events {
            return Err(DecodeError::TooMany { limit: max_events });
        }
        let index = events.len();
        let event = serde_json::from_slice(line).map_err(|_| explain_single(line, index))?;
        events.push(event);
    }
    Ok(events)
}

/// Re-parses a failed array with path tracking to say where it failed.
fn explain_array(body: &[u8]) -> DecodeError {
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, Vec<RawEvent>>(de) {
        Ok(_) => DecodeError::invalid(0, "body", "malformed JSON"),
        Err(e) => {
            let mut segments = e.path().iter();
            let index = match segments.next() {
                Some(serde_path_to_error::Segment::Seq { index }) => *index,
                _ => 0,
            };
            let field = field_of(join_path(segments), e.inner());
            DecodeError::invalid(index, field, reason_of(e.inner()))
        }
    }
}

/// The field an error is about. serde reports a duplicated key at the object that
/// holds it, not at the key; name the key.
fn field_of(path: String, e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let Some(name) = msg
        .strip_prefix("duplicate field `")
        .and_then(|rest| rest.split('`').next())
    else {
        return path;
    };
    if path == "body" {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn explain_single(body: &[u8], index: usize) -> DecodeError {
    let de = &mut serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, RawEvent>(de) {
        Ok(_) => DecodeError::invalid(index, "body", "malformed JSON"),
        Err(e) => {
            let field = field_of(join_path(e.path().iter()), e.inner());
            DecodeError::invalid(index, field, reason_of(e.inner()))
        }
    }
}

fn join_path<'a>(segments: impl Iterator<Item = &'a serde_path_to_error::Segment>) -> String {
    use serde_path_to_error::Segment;
    let parts: Vec<String> = segments
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.clone()),
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    if parts.is_empty() {
        "body".to_owned()
    } else {
        parts.join(".")
    }
}

/// serde_json's message without its " at line L column C" tail, which means little to
/// a device author once the index and field are named.
fn reason_of(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    match msg.rfind(" at line ") {
        Some(cut) => msg[..cut].to_owned(),
        None => msg,
    }
}

/// An event as parsed, before the rules that serde cannot express are checked. Its
/// schema is the OpenAPI document's `IngestEvent`; what the schema states, `validate`
/// enforces (a null is the same as an absent field).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[schema(as = IngestEvent)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEvent {
    #[serde(rename = "type")]
    #[schema(value_type = String, required = true, pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    kind: Option<String>,
    /// A UUID; the same id again for the same device is a duplicate, stored once.
    /// Assigned by the server if absent.
    #[schema(value_type = Option<Uuid>)]
    id: Option<String>,
    /// The event's time. Default: the time of receipt. At most 5 minutes ahead.
    #[schema(schema_with = super::schema::ts)]
    ts: Option<RawTs>,
    /// At most 64 entries, name → finite number.
    #[schema(schema_with = super::schema::metrics)]
    metrics: Option<Entries<Metric>>,
    /// At most 64 entries, name → string of at most 1 KiB (UTF-8 bytes).
    #[schema(schema_with = super::schema::attrs)]
    attrs: Option<Entries<String>>,
    /// Gateway mode (a user key) only: the event's device, one of the user's.
    #[schema(value_type = Option<Uuid>)]
    device_id: Option<String>,
}

impl RawEvent {
    fn validate(self, index: usize, opts: &DecodeOptions) -> Result<Decoded, DecodeError> {
        let now_ms = opts.now_ms;
        let bad = |field: &str, reason: &str| DecodeError::invalid(index, field, reason);

        let kind = self.kind.ok_or_else(|| bad("type", "is required"))?;
        if !model::is_valid_name(&kind) {
            return Err(bad(
                "type",
                "must be 1 to 64 characters from A-Z a-z 0-9 _ . : -",
            ));
        }
        let ts_ms = match self.ts {
            None => now_ms,
            Some(RawTs::Ms(ms)) => ms,
            Some(RawTs::Text(s)) => model::parse_rfc3339_ms(&s)
                .ok_or_else(|| bad("ts", "must be an RFC 3339 instant or integer ms"))?,
        };
        if ts_ms > now_ms + model::MAX_FUTURE_MS {
            return Err(bad("ts", "is more than 5 minutes in the future"));
        }
        if ts_ms < model::MIN_TS_MS {
            return Err(bad("ts", "is before 2000-01-01T00:00:00Z"));
        }
        if opts.retention.is_expired(ts_ms, now_ms) {
            return Err(DecodeError::invalid(
                index,
                "ts",
                format!(
                    "is older than raw events are kept ({}); it would never be readable",
                    Tier::Raw.setting()
                ),
            ));
        }
        let (id, id_assigned) = match self.id {
            None => (model::assigned_id(ts_ms), true),
            Some(s) => (
                Uuid::parse_str(&s).map_err(|_| bad("id", "must be a UUID"))?,
                false,
            ),
        };
        let metrics = self.metrics.map(|m| m.0).unwrap_or_default();
        check_names(index, "metrics", metrics.iter().map(|(k, _)| k.as_str()))?;
        let attrs = self.attrs.map(|m| m.0).unwrap_or_default();
        check_names(index, "attrs", attrs.iter().map(|(k, _)| k.as_str()))?;
        if let Some((name, _)) = attrs.iter().find(|(_, v)| v.len() > MAX_ATTR_BYTES) {
            return Err(DecodeError::invalid(
                index,
                format!("attrs.{name}"),
                "is longer than 1 KiB (1024 UTF-8 bytes)",
            ));
        }
        let device_id = match self.device_id {
            None => None,
            Some(s) => Some(Uuid::parse_str(&s).map_err(|_| bad("device_id", "must be a UUID"))?),
        };
        Ok(Decoded {
            event: Event {
                id,
                id_assigned,
                ts_ms,
                kind,
                metrics: metrics.into_iter().map(|(k, v)| (k, v.0)).collect(),
                attrs,
            },
            device_id,
        })
    }
}

fn check_names<'a>(
    index: usize,
    map: &str,
    names: impl ExactSizeIterator<Item = &'a str>,
) -> Result<(), DecodeError> {
    if names.len() > MAX_MAP_ENTRIES {
        return Err(DecodeError::invalid(
            index,
            map,
            format!("has more than {MAX_MAP_ENTRIES} entries"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !model::is_valid_name(name) {
            return Err(DecodeError::invalid(
                index,
                format!("{map}.{name}"),
                "names must be 1 to 64 characters from A-Z a-z 0-9 _ . : -",
            ));
        }
        if !seen.insert(name) {
            return Err(DecodeError::invalid(
                index,
                format!("{map}.{name}"),
                "appears twice",
            ));
        }
    }
    Ok(())
}

/// `ts`: integer ms or an RFC 3339 string. A float is refused, not rounded.
#[derive(Debug)]
enum RawTs {
    Ms(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawTs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TsVisitor;
        impl Visitor<'_> for TsVisitor {
            type Value = RawTs;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 string or integer milliseconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawTs, E> {
                Ok(RawTs::Ms(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawTs, E> {
                i64::try_from(v)
                    .map(RawTs::Ms)
                    .map_err(|_| E::custom("is out of range"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawTs, E> {
                Err(E::custom("must be integer milliseconds, not a fraction"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTs, E> {
                Ok(RawTs::Text(v.to_owned()))
            }
        }
        d.deserialize_any(TsVisitor)
    }
}

/// A metric value: a finite JSON number.
#[derive(Debug)]
struct Metric(f64);

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MetricVisitor;
        impl Visitor<'_> for MetricVisitor {
            type Value = Metric;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a finite number")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Metric, E> {
                if v.is_finite() {
                    Ok(Metric(v))
                } else {
                    Err(E::custom("must be a finite number"))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Metric, E> {
                Ok(Metric(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Metric, E> {
                Ok(Metric(v as f64))
            }
        }
        d.deserialize_any(MetricVisitor)
    }
}

/// A JSON object kept as an ordered list of entries, so that order survives and the
/// entry count can be capped while parsing rather than after.
#[derive(Debug)]
struct Entries<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<V>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4).min(8));
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    if entries.len() == MAX_MAP_ENTRIES {
                        return Err(de::Error::custom(format!(
                            "has more than {MAX_MAP_ENTRIES} entries"
                        )));
                    }
                    entries.push((k, v));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(EntriesVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_795_000_000_000;

    fn opts() -> DecodeOptions {
        DecodeOptions {
            max_events: 10,
            now_ms: NOW,
            retention: Retention::default(),
        }
    }

    fn invalid(body: &str) -> (usize, String, String) {
        match decode(body.as_bytes(), Format::Json, opts()) {
            Err(DecodeError::Invalid {
                index,
                field,
                reason,
                ..
            }) => (index, field, reason),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_single_object_and_an_array_decode_alike() {
        let one = r#"{"type":"t","ts":1795000000000,"metrics":{"a":1.5},"attrs":{"fw":"1"}}"#;
        let a = decode(one.as_bytes(), Format::Json, opts()).unwrap();
        let b = decode(format!("[{one}]").as_bytes(), Format::Json, opts()).unwrap();
        assert_eq!(a[0].event.metrics, b[0].event.metrics);
        assert_eq!(a[0].event.metrics, vec![("a".to_owned(), 1.5)]);
        assert_eq!(a[0].event.attrs, vec![("fw".to_owned(), "1".to_owned())]);
        assert_eq!(a[0].event.ts_ms, 1_795_000_000_000);
    }

    #[test]
    fn missing_ts_defaults_to_receipt_and_missing_id_is_assigned() {
        let d = decode(br#"{"type":"t"}"#, Format::Json, opts()).unwrap();
        assert_eq!(d[0].event.ts_ms, NOW);
        assert!(!d[0].event.id.is_nil());
    }

    #[test]
    fn uuids_in_any_standard_spelling_are_equal() {
        let body = r#"[{"type":"t","id":"7D0C1B2A-0000-4000-8000-00000000000A"},
                      {"type":"t","id":"7d0c1b2a00004000800000000000000a"},
                      {"type":"t","id":"urn:uuid:7d0c1b2a-0000-4000-8000-00000000000a"}]"#;
        let d = decode(body.as_bytes(), Format::Json, opts()).unwrap();
        assert_eq!(d[0].event.id, d[1].event.id);
        assert_eq!(d[1].event.id, d[2].event.id);
    }

    #[test]
    fn an_unknown_top_level_field_is_named() {
        let (index, field, reason) = invalid(r#"[{"type":"t"},{"type":"t","color":"red"}]"#);
        assert_eq!(index, 1);
        assert_eq!(field, "color");
        assert!(reason.contains("unknown field"), "{reason}");
    }

    #[test]
    fn a_float_ts_is_refused() {
        let (index, field, _) = invalid(r#"{"type":"t","ts":1795000000000.5}"#);
        assert_eq!((index, field.as_str()), (0, "ts"));
    }

    #[test]
    fn ts_in_the_future_or_before_2000_is_refused() {
        let future = NOW + model::MAX_FUTURE_MS + 1;
        let (_, field, reason) = invalid(&format!(r#"{{"type":"t","ts":{future}}}"#));
        assert_eq!(field, "ts");
        assert!(reason.contains("future"));
        let (_, field, _) = invalid(r#"{"type":"t","ts":"1999-12-31T23:59:59.999Z"}"#);
        assert_eq!(field, "ts");
        let edge = NOW + model::MAX_FUTURE_MS;
        assert!(decode(
            format!(r#"{{"type":"t","ts":{edge}}}"#).as_bytes(),
            Format::Json,
            opts()
        )
        .is_ok());
    }

    #[test]
    fn a_metric_that_is_not_a_finite_number_is_named() {
        let (index, field, _) = invalid(r#"[{"type":"t","metrics":{"temp":"hot"}}]"#);
        assert_eq!((index, field.as_str()), (0, "metrics.temp"));
        let (_, field, _) = invalid(r#"[{"type":"t","metrics":{"temp":1e999}}]"#);
        assert_eq!(field, "metrics.temp");
    }

    #[test]
    fn type_is_required_and_checked() {
        let (_, field, reason) = invalid(r#"{"ts":1795000000000}"#);
        assert_eq!((field.as_str(), reason.as_str()), ("type", "is required"));
        let (_, field, _) = invalid(r#"{"type":"has space"}"#);
        assert_eq!(field, "type");
        let (_, field, _) = invalid(r#"{"type":7}"#);
        assert_eq!(field, "type");
    }

    #[test]
    fn attr_limits_count_utf8_bytes() {
        let ok = "é".repeat(512); // 1024 bytes
        let body = format!(r#"{{"type":"t","attrs":{{"a":"{ok}"}}}}"#);
        assert!(decode(body.as_bytes(), Format::Json, opts()).is_ok());
        let long = format!("{ok}x");
        let (_, field, _) = invalid(&format!(r#"{{"type":"t","attrs":{{"a":"{long}"}}}}"#));
        assert_eq!(field, "attrs.a");
    }

    #[test]
    fn metric_names_and_counts_are_checked() {
        let (_, field, _) = invalid(r#"{"type":"t","metrics":{"bad name":1}}"#);
        assert_eq!(field, "metrics.bad name");
        let many: Vec<String> = (0..65).map(|i| format!(r#""m{i}":1"#)).collect();
        let (_, field, _) = invalid(&format!(
            r#"{{"type":"t","metrics":{{{}}}}}"#,
            many.join(",")
        ));
        assert!(field.starts_with("metrics"), "{field}");
    }

    #[test]
    fn too_many_events_is_its_own_error() {
        let body = format!("[{}]", [r#"{"type":"t"}"#; 11].join(","));
        assert_eq!(
            decode(body.as_bytes(), Format::Json, opts()),
            Err(DecodeError::TooMany { limit: 10 })
        );
    }

    #[test]
    fn ndjson_skips_blank_lines_when_counting_the_index() {
        let body = "{\"type\":\"a\"}\n\n  \n{\"type\":\"b\"}\n{\"type\":\"c\",\"x\":1}\n";
        match decode(body.as_bytes(), Format::NdJson, opts()) {
            Err(DecodeError::Invalid { index, field, .. }) => {
                assert_eq!((index, field.as_str()), (2, "x"))
            }
            other => panic!("{other:?}"),
        }
        let ok = decode(
            b"{\"type\":\"a\"}\n\n{\"type\":\"b\"}",
            Format::NdJson,
            opts(),
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn malformed_json_is_a_400_naming_where() {
        let (index, _, _) = invalid(r#"[{"type":"a"},{"type":"b""#);
        assert_eq!(index, 1);
        let (_, field, _) = invalid("42");
        assert_eq!(field, "body");
    }

    #[test]
    fn a_duplicated_field_is_named() {
        let (_, field, reason) = invalid(r#"{"type":"t","type":"u"}"#);
        assert_eq!(field, "type", "{reason}");
        let (index, field, _) = invalid(r#"[{"type":"t"},{"type":"t","ts":1,"ts":2}]"#);
        assert_eq!((index, field.as_str()), (1, "ts"));
    }

    #[test]
    fn an_empty_array_is_fine() {
        assert!(decode(b"[]", Format::Json, opts()).unwrap().is_empty());
    }

    #[test]
    fn an_event_older_than_the_raw_tier_is_refused_naming_ts() {
        let opts = DecodeOptions {
            retention: Retention::new([Some(86_400_000), None, None, None]),
            ..opts()
        };
        let old = NOW - 86_400_000;
        match decode(
            format!(r#"{{"type":"t","ts":{old}}}"#).as_bytes(),
            Format::Json,
            opts,
        ) {
            Err(DecodeError::Invalid { field, reason, .. }) => {
                assert_eq!(field, "ts");
                assert!(reason.contains("retention.raw"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let fresh = format!(r#"{{"type":"t","ts":{}}}"#, old + 1);
        assert!(decode(fresh.as_bytes(), Format::Json, opts).is_ok());
    }
}
