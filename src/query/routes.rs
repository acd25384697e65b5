//! The read endpoints (user key): events, aggregates, and live figures.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::export::{event_json, export_format, export_response, Export};
use super::fill::{fill, Fill};
use super::{AggregateFilter, Grid, GroupBy, Range, MAX_WINDOWS};
use crate::api::auth::Caller;
use crate::api::devices::owned_device;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::config::parse_duration_ms;
use crate::model::{format_ms, now_ms, parse_instant, MAX_FUTURE_MS, MIN_TS_MS};
use crate::store::{ListQuery, Position};

/// The largest page of events.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;

/// The most devices one grouped-by-device answer covers.
pub const MAX_GROUP_DEVICES: usize = 1_000;

type Params = Query<HashMap<String, String>>;

fn instant(params: &Params, name: &str) -> Result<Option<i64>, ApiError> {
    params
        .get(name)
        .map(|v| {
            parse_instant(v)
                .ok_or_else(|| ApiError::field(name, "must be an RFC 3339 instant or integer ms"))
        })
        .transpose()
}

fn required_range(params: &Params) -> Result<Range, ApiError> {
    let from = instant(params, "from")?.ok_or_else(|| ApiError::field("from", "is required"))?;
    let to = instant(params, "to")?.ok_or_else(|| ApiError::field("to", "is required"))?;
    if to <= from {
        return Err(ApiError::field("to", "must be after from"));
    }
    Ok(Range {
        from_ms: from,
        to_ms: to,
    })
}

fn window(params: &Params, range: Range) -> Result<i64, ApiError> {
    let raw = params
        .get("window")
        .ok_or_else(|| ApiError::field("window", "is required"))?;
    let window = parse_duration_ms(raw).ok_or_else(|| {
        ApiError::field(
            "window",
            "must be an integer followed by s, m, h or d, at least 1s",
        )
    })?;
    if range.window_count(window) > MAX_WINDOWS {
        return Err(ApiError::field(
            "window",
            format!("the range spans more than {MAX_WINDOWS} windows"),
        ));
    }
    Ok(window)
}

/// The windows of an aggregate: `from`, `to`, `window` and `tz`. The contract counts
/// windows over the range as asked (saturating, so that no range wraps the count);
/// what is read is clamped to when events can exist.
fn grid(params: &Params) -> Result<(i64, Grid, Range), ApiError> {
    let asked = required_range(params)?;
    let window_ms = window(params, asked)?;
    let range = Range::bounded(asked.from_ms, asked.to_ms, now_ms());
    let grid = match params.get("tz") {
        None => Grid::utc(range, window_ms),
        Some(name) => {
            let tz: chrono_tz::Tz = name.parse().map_err(|_| {
                ApiError::field(
                    "tz",
                    "is not a known time zone: use an IANA name such as Europe/Berlin",
                )
            })?;
            Grid::zoned(range, window_ms, tz)
                .map_err(|e| ApiError::field("window", e.to_string()))?
        }
    };
    Ok((window_ms, grid, range))
}

/// The most percentiles one query may ask for.
const MAX_PERCENTILES: usize = 10;

/// `percentiles=50,90,99.9`: each in (0, 100), with a metric. Returns the answer's
/// field names (`p50`, `p99.9`) and quantiles.
fn percentiles(params: &Params, with_metric: bool) -> Result<Vec<(String, f64)>, ApiError> {
    let Some(raw) = params.get("percentiles") else {
        return Ok(Vec::new());
    };
    if !with_metric {
        return Err(ApiError::field("percentiles", "needs a metric"));
    }
    let mut out = Vec::new();
    for part in raw.split(',') {
        let p: f64 = part
            .trim()
            .parse()
            .ok()
            .filter(|p: &f64| *p > 0.0 && *p < 100.0)
            .ok_or_else(|| {
                ApiError::field(
                    "percentiles",
                    "must be a comma-separated list of numbers strictly between 0 and 100",
                )
            })?;
        out.push((format!("p{p}"), p / 100.0));
    }
    if out.len() > MAX_PERCENTILES {
        return Err(ApiError::field(
            "percentiles",
            format!("at most {MAX_PERCENTILES} may be asked for"),
        ));
    }
    Ok(out)
}

fn kind(params: &Params) -> Result<Option<String>, ApiError> {
    match params.get("type") {
        None => Ok(None),
        Some(t) if crate::model::is_valid_name(t) => Ok(Some(t.clone())),
        Some(_) => Err(ApiError::field("type", "is not a valid event type")),
    }
}

fn encode_cursor(p: Position) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        p.ts_ms,
        p.id.simple()
    ))
}

fn decode_cursor(s: &str) -> Option<Position> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (ts, id) = text.split_once(':')?;
    Some(Position {
        ts_ms: ts.parse().ok()?,
        id: Uuid::parse_str(id).ok()?,
    })
}

fn scope(state: &AppState, user_id: crate::model::UserId) -> super::Scope<'_> {
    super::Scope {
        store: state.store.as_ref(),
        user_id,
        bucket_len_ms: state.bucket_len_ms,
    }
}

/// `GET /v1/devices/{id}/events`: a page of JSON, or the whole range streamed as
/// NDJSON or CSV (`format=` or `Accept`, see `export.rs`).
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    params: Params,
) -> Result<Response, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let from = instant(&params, "from")?.unwrap_or(MIN_TS_MS);
    let to = instant(&params, "to")?.unwrap_or_else(|| now_ms() + MAX_FUTURE_MS);
    let Range {
        from_ms: from,
        to_ms: to,
    } = Range::bounded(from, to, now_ms());
    if let Some(format) = export_format(&params, &headers)? {
        let export = Export {
            user_id: user,
            device_id: device,
            from_ms: from,
            to_ms: to,
            kind: kind(&params)?,
        };
        return Ok(export_response(state.store.clone(), export, format));
    }
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::field(
                    "limit",
                    "must be an integer from 1 to 10000",
                ))
            }
        },
    };
    let before = params
        .get("cursor")
        .map(|c| decode_cursor(c).ok_or_else(|| ApiError::field("cursor", "is not a valid cursor")))
        .transpose()?;
    let mut page = state
        .store
        .list(ListQuery {
            user_id: user,
            device_id: device,
            from_ms: from,
            to_ms: to,
            before,
            kind: kind(&params)?,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|e| encode_cursor(Position::of(e)))
    } else {
        None
    };
    let events: Vec<Value> = page.iter().map(event_json).collect();
    Ok(Json(json!({ "events": events, "next_cursor": next_cursor })).into_response())
}

/// `GET /v1/devices/{id}/aggregates`
pub async fn device_aggregates(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    params: Params,
) -> Result<Json<DeviceAggregateOut>, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let (window_ms, grid, range) = grid(&params)?;
    let metric = match params.get("metric") {
        None => None,
        Some(m) if crate::model::is_valid_name(m) => Some(m.clone()),
        Some(_) => return Err(ApiError::field("metric", "is not a valid metric name")),
    };
    let mode = match params.get("fill") {
        None => Fill::None,
        Some(f) => Fill::parse(f).ok_or_else(|| {
            ApiError::field("fill", "must be one of none, null, zero, previous, linear")
        })?,
    };
    let with_stats = metric.is_some();
    let percentiles = percentiles(&params, with_stats)?;
    let filter = AggregateFilter {
        metric,
        kind: kind(&params)?,
        sketches: !percentiles.is_empty(),
    };
    let carry_in = if mode.carries_in() && with_stats {
        super::aggregate::last_value_before(scope(&state, user), device, &filter, range.from_ms)
            .await?
    } else {
        None
    };
    let windows =
        super::device_aggregate(scope(&state, user), device, grid.clone(), range, filter).await?;
    let buckets = fill(&grid, windows, mode, carry_in)
        .into_iter()
        .map(|w| WindowOut {
            percentiles: Percentiles(
                percentiles
                    .iter()
                    .map(|(name, q)| {
                        let v = w.sketch.as_ref().and_then(|s| s.quantile(*q));
                        (name.clone(), v)
                    })
                    .collect(),
            ),
            start: format_ms(w.start_ms),
            start_ms: w.start_ms,
            count: w.count,
            stats: with_stats.then_some(StatsOut {
                min: w.stats.min,
                max: w.stats.max,
                avg: w.stats.avg,
                sum: w.stats.sum,
            }),
            filled: w.filled,
        })
        .collect();
    Ok(Json(DeviceAggregateOut {
        device_id: device,
        window_ms,
        buckets,
    }))
}

// Typed answers: a day of 1-minute windows is 1,440 buckets, and building them as
// `serde_json::Value` maps cost more than reading the rollups.

#[derive(Serialize)]
pub struct DeviceAggregateOut {
    device_id: Uuid,
    window_ms: i64,
    buckets: Vec<WindowOut>,
}

#[derive(Serialize)]
struct WindowOut {
    start: String,
    start_ms: i64,
    count: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    stats: Option<StatsOut>,
    /// Only on windows that `fill` added.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    filled: bool,
    /// `p50`, `p99.9`, ...: as asked, null where the window has no values.
    #[serde(flatten)]
    percentiles: Percentiles,
}

/// Named values in the order asked, serialized as fields of the window.
struct Percentiles(Vec<(String, Option<f64>)>);

impl Serialize for Percentiles {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, v) in &self.0 {
            map.serialize_entry(name, v)?;
        }
        map.end()
    }
}

/// Null where unknown: in windows that `fill` added.
#[derive(Serialize)]
struct StatsOut {
    min: Option<f64>,
    max: Option<f64>,
    avg: Option<f64>,
    sum: Option<f64>,
}

#[derive(Serialize)]
pub struct GroupedAggregateOut {
    window_ms: i64,
    buckets: Vec<GroupOut>,
    /// With group_by=device, where the next page of devices starts; absent on the
    /// last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_device: Option<Uuid>,
}

#[derive(Serialize)]
struct GroupOut {
    start: String,
    start_ms: i64,
    group: String,
    count: u64,
}

/// `GET /v1/aggregates`
pub async fn grouped_aggregates(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<GroupedAggregateOut>, ApiError> {
    let user = caller.user()?;
    let (window_ms, grid, range) = grid(&params)?;
    let group_by = match params.get("group_by").map(String::as_str) {
        None | Some("type") => GroupBy::Type,
        Some("device") => GroupBy::Device,
        Some(_) => return Err(ApiError::field("group_by", "must be type or device")),
    };
    let kind = kind(&params)?;
    // Only the user's current devices: a deleted device's events are never served.
    let mut devices: Vec<Uuid> = state
        .auth
        .registry()
        .devices(user)
        .await?
        .into_iter()
        .map(|d| d.id)
        .collect();
    // One group per device and window: past the cap, group_by=device is paged over
    // devices (in id order) so that an answer stays bounded.
    let mut next_after_device = None;
    if group_by == GroupBy::Device {
        let limit = match params.get("device_limit") {
            None if devices.len() > MAX_GROUP_DEVICES => {
                return Err(ApiError::field(
                    "group_by",
                    format!(
                        "device groups {} devices, more than {MAX_GROUP_DEVICES}: page with device_limit and after_device",
                        devices.len()
                    ),
                ))
            }
            None => MAX_GROUP_DEVICES,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_GROUP_DEVICES).contains(&n) => n,
                _ => {
                    return Err(ApiError::field(
                        "device_limit",
                        format!("must be an integer from 1 to {MAX_GROUP_DEVICES}"),
                    ))
                }
            },
        };
        let after = params
            .get("after_device")
            .map(|v| {
                Uuid::parse_str(v)
                    .map_err(|_| ApiError::field("after_device", "is not a device id"))
            })
            .transpose()?;
        devices.sort_unstable();
        devices.retain(|d| after.is_none_or(|a| *d > a));
        if devices.len() > limit {
            devices.truncate(limit);
            next_after_device = devices.last().copied();
        }
    }
    let counts =
        super::grouped_counts(scope(&state, user), &devices, grid, range, group_by, kind).await?;
    // Counts come sorted by window: each window's start is formatted once.
    let mut start = (i64::MIN, String::new());
    let buckets = counts
        .into_iter()
        .map(|c| GroupOut {
            start: {
                if start.0 != c.start_ms {
                    start = (c.start_ms, format_ms(c.start_ms));
                }
                start.1.clone()
            },
            start_ms: c.start_ms,
            group: c.group,
            count: c.count,
        })
        .collect();
    Ok(Json(GroupedAggregateOut {
        window_ms,
        buckets,
        next_after_device,
    }))
}

/// `GET /v1/devices/{id}/live`
pub async fn device_live(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let live = state.live.device(device, now_ms()).await;
    Ok(Json(json!(live)))
}

/// `GET /v1/live`
pub async fn user_live(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let user = caller.user()?;
    let live = state.live.user(user, now_ms()).await;
    Ok(Json(json!(live)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let p = Position {
            ts_ms: 1_795_000_000_123,
            id: Uuid::from_u128(42),
        };
        assert_eq!(decode_cursor(&encode_cursor(p)), Some(p));
        assert_eq!(decode_cursor("not a cursor"), None);
    }
}
