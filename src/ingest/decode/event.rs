//! One event's wire form and the rules serde cannot state: names, the time window,
//! the id, attr sizes. The payload framing around it (one event, an array, NDJSON)
//! and the naming of the bad field are in the parent module.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use uuid::Uuid;

use super::{DecodeError, DecodeOptions, Decoded};
use crate::model::{self, Event, MAX_ATTR_BYTES, MAX_MAP_ENTRIES};
use crate::store::retention::Tier;

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
    id: Option<UuidText>,
    /// The event's time. Default: the time of receipt. At most 5 minutes ahead.
    #[schema(schema_with = crate::ingest::schema::ts)]
    ts: Option<RawTs>,
    /// At most 64 entries, name → finite number.
    #[schema(schema_with = crate::ingest::schema::metrics)]
    metrics: Option<Entries<Metric>>,
    /// At most 64 entries, name → string of at most 1 KiB (UTF-8 bytes).
    #[schema(schema_with = crate::ingest::schema::attrs)]
    attrs: Option<Entries<String>>,
    /// Gateway mode (a user key) only: the event's device, one of the user's.
    #[schema(value_type = Option<Uuid>)]
    device_id: Option<UuidText>,
}

impl RawEvent {
    pub(super) fn validate(
        self,
        index: usize,
        opts: &DecodeOptions,
    ) -> Result<Decoded, DecodeError> {
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
            Some(text) => (
                text.uuid().ok_or_else(|| bad("id", "must be a UUID"))?,
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
            Some(text) => Some(
                text.uuid()
                    .ok_or_else(|| bad("device_id", "must be a UUID"))?,
            ),
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

/// A UUID field, parsed where it is read rather than copied into a `String` first (a
/// gateway's events each carry a `device_id`). A string that is not a UUID is kept
/// as such, so that `validate` refuses it naming the event and the field, as for the
/// other rules.
#[derive(Debug, Clone, Copy)]
struct UuidText(Option<Uuid>);

impl UuidText {
    fn uuid(self) -> Option<Uuid> {
        self.0
    }
}

impl<'de> Deserialize<'de> for UuidText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct UuidVisitor;
        impl Visitor<'_> for UuidVisitor {
            type Value = UuidText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a UUID string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<UuidText, E> {
                Ok(UuidText(Uuid::parse_str(v).ok()))
            }
        }
        d.deserialize_str(UuidVisitor)
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
