//! Payload → validated events. Every source (HTTP, MQTT) goes through here, so the
//! rules of the contract live in one place.
//!
//! Parsing runs twice only when it fails: the fast path is plain `serde_json`; a
//! payload it rejects is parsed again with [`serde_path_to_error`] to name the index
//! and the field in the answer.

use uuid::Uuid;

use crate::model::Event;
use crate::store::retention::Retention;

mod event;
#[cfg(test)]
mod tests;

pub(crate) use event::RawEvent;

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
    pub(super) fn invalid(
        index: usize,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
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
