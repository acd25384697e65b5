//! Streaming exports of one device's events, as NDJSON or CSV.
//!
//! Shared by `GET /v1/devices/{id}/events?format=…` and `iotpipe export`. The range is
//! read page by page through [`EventStore::list`] (newest first, the order of the paged
//! JSON listing) and each page is encoded into one chunk before the next is read, so
//! memory stays at one page whatever the range: a month of a 1 Hz device is 2.6
//! million events, far more than any answer should hold.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use serde_json::{json, Value};

use super::params::EventsQuery;
use crate::http::error::ApiError;
use crate::model::{format_ms, DeviceId, Event, UserId};
use crate::store::{EventStore, ListQuery, Position, SharedStore, StoreError};

/// Events read per store call. Large enough that a call's round trip is paid rarely,
/// small enough that a page (and its encoding) stays well under a few MB.
pub const PAGE_EVENTS: usize = 1_000;

/// An export encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line, the same object as the paged listing's events.
    Ndjson,
    /// RFC 4180: `id,ts,type,metrics,attrs`, with metrics and attrs as JSON objects
    /// (their names differ from event to event, and a header known in advance would
    /// need a second pass over the range).
    Csv,
}

impl Format {
    /// `ndjson` (or `jsonl`) and `csv`; `None` for anything else.
    pub fn parse(s: &str) -> Option<Format> {
        match s.to_ascii_lowercase().as_str() {
            "ndjson" | "jsonl" => Some(Format::Ndjson),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    /// The streaming format an `Accept` header asks for, if any. Anything else
    /// (`application/json`, `*/*`, none) keeps the paged JSON answer.
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept
            .split(',')
            .find_map(|part| match part.split(';').next().unwrap_or("").trim() {
                "application/x-ndjson" | "application/ndjson" | "application/jsonl" => {
                    Some(Format::Ndjson)
                }
                "text/csv" => Some(Format::Csv),
                _ => None,
            })
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }
}

/// What to export: one device's events in `[from_ms, to_ms)`, of one type or all.
#[derive(Debug, Clone)]
pub struct Export {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub from_ms: i64,
    pub to_ms: i64,
    pub kind: Option<String>,
}

/// An event as the API shows it.
pub fn event_json(e: &Event) -> Value {
    let metrics: serde_json::Map<String, Value> = e
        .metrics
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let attrs: serde_json::Map<String, Value> =
        e.attrs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    json!({
        "id": e.id,
        "ts": format_ms(e.ts_ms),
        "type": e.kind,
        "metrics": metrics,
        "attrs": attrs,
    })
}

/// Appends `field` quoted as RFC 4180 asks when it holds a separator, a quote or a
/// line break.
fn csv_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

const CSV_HEADER: &str = "id,ts,type,metrics,attrs\r\n";

fn encode(format: Format, events: &[Event], out: &mut String) {
    for e in events {
        let v = event_json(e);
        match format {
            Format::Ndjson => {
                out.push_str(&v.to_string());
                out.push('\n');
            }
            Format::Csv => {
                out.push_str(&e.id.to_string());
                out.push(',');
                out.push_str(&format_ms(e.ts_ms));
                out.push(',');
                csv_field(out, &e.kind);
                out.push(',');
                csv_field(out, &v["metrics"].to_string());
                out.push(',');
                csv_field(out, &v["attrs"].to_string());
                out.push_str("\r\n");
            }
        }
    }
}

struct Cursor {
    before: Option<Position>,
    first: bool,
    done: bool,
}

/// The export as a stream of chunks, one per page of events (the CSV header rides
/// with the first). A store error ends the stream with that error: an HTTP answer is
/// then cut short (no final chunk), which clients see as a failed download rather
/// than a complete file.
pub fn stream<S: EventStore + ?Sized>(
    store: Arc<S>,
    export: Export,
    format: Format,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
    pages(store, export, format).map_ok(|(chunk, _)| chunk)
}

/// As [`stream`], with the number of events in each chunk (for progress reports).
pub fn pages<S: EventStore + ?Sized>(
    store: Arc<S>,
    export: Export,
    format: Format,
) -> impl Stream<Item = Result<(Bytes, usize), StoreError>> + Send + 'static {
    let start = Cursor {
        before: None,
        first: true,
        done: false,
    };
    futures::stream::try_unfold(start, move |cursor| {
        let store = store.clone();
        let export = export.clone();
        async move {
            if cursor.done {
                return Ok(None);
            }
            let page = store
                .list(ListQuery {
                    user_id: export.user_id,
                    device_id: export.device_id,
                    from_ms: export.from_ms,
                    to_ms: export.to_ms,
                    before: cursor.before,
                    kind: export.kind.clone(),
                    limit: PAGE_EVENTS,
                })
                .await?;
            let mut out = String::new();
            if cursor.first && format == Format::Csv {
                out.push_str(CSV_HEADER);
            }
            encode(format, &page, &mut out);
            let next = Cursor {
                before: page.last().map(Position::of),
                first: false,
                // A short page is the last one.
                done: page.len() < PAGE_EVENTS,
            };
            Ok(Some(((Bytes::from(out), page.len()), next)))
        }
    })
}

/// The streaming format a request asks for: `format=` wins over `Accept`; `None`
/// keeps the paged JSON answer.
///
/// # Errors
///
/// 400 naming `format` for an unknown one, and naming `cursor` or `limit` when they
/// come with a streaming format (a stream holds the whole range; silently ignoring
/// them would hand back more than was asked for).
pub fn export_format(
    params: &EventsQuery,
    headers: &HeaderMap,
) -> Result<Option<Format>, ApiError> {
    // Exactly as documented (lower case), so that the schema's pattern and the
    // server agree on what is malformed.
    let format = match params.format.as_deref() {
        Some("json") => None,
        Some(f @ ("ndjson" | "jsonl" | "csv")) => Format::parse(f),
        Some(_) => {
            return Err(ApiError::field(
                "format",
                "must be one of json, ndjson, jsonl, csv",
            ))
        }
        None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::from_accept),
    };
    if format.is_some() {
        for (name, given) in [
            ("cursor", params.cursor.is_some()),
            ("limit", params.limit.is_some()),
        ] {
            if given {
                return Err(ApiError::field(
                    name,
                    "does not apply to an NDJSON or CSV export, which streams the whole range",
                ));
            }
        }
    }
    Ok(format)
}

/// The export as a streamed HTTP answer (chunked, constant memory).
pub fn export_response(store: SharedStore, export: Export, format: Format) -> Response {
    let body = Body::from_stream(stream(store, export, format));
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_pick_a_streaming_format_or_none() {
        assert_eq!(
            Format::from_accept("text/csv;q=0.9, */*"),
            Some(Format::Csv)
        );
        assert_eq!(
            Format::from_accept("application/x-ndjson"),
            Some(Format::Ndjson)
        );
        assert_eq!(Format::from_accept("application/json"), None);
        assert_eq!(Format::from_accept("*/*"), None);
        assert_eq!(Format::parse("CSV"), Some(Format::Csv));
        assert_eq!(Format::parse("json"), None);
    }

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        let mut s = String::new();
        csv_field(&mut s, "plain");
        s.push(',');
        csv_field(&mut s, r#"{"a":"x,y"}"#);
        assert_eq!(s, r#"plain,"{""a"":""x,y""}""#);
    }
}
