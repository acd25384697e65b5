//! The read endpoints (user key): events, aggregates, and live figures.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::export::{export_format, export_response, Export};
use super::fill::{fill, Fill};
use super::params::{
    grid, instant, kind, percentiles, DeviceAggregatesQuery, EventsQuery, GroupedAggregatesQuery,
};
use super::{AggregateFilter, GroupBy, Range};
use crate::http::auth::{owned_device, Caller, DeviceIdParam};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{ApiQuery, AppState};
use crate::live::{DeviceLive, UserLive};
use crate::model::{format_ms, now_ms, Event, MAX_FUTURE_MS, MIN_TS_MS};
use crate::store::{ListQuery, Position};

/// The largest page of events.
const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;

/// The most devices one grouped-by-device answer covers.
pub const MAX_GROUP_DEVICES: usize = 1_000;

/// A page of `GET /v1/devices/{id}/events`, newest first.
#[derive(Serialize, ToSchema)]
pub struct EventsPage {
    events: Vec<EventOut>,
    /// Pass back as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// A stored event.
#[derive(Serialize, ToSchema)]
pub struct EventOut {
    id: Uuid,
    #[schema(format = DateTime)]
    ts: String,
    #[serde(rename = "type")]
    kind: String,
    metrics: BTreeMap<String, f64>,
    attrs: BTreeMap<String, String>,
}

impl From<&Event> for EventOut {
    fn from(e: &Event) -> Self {
        Self {
            id: e.id,
            ts: format_ms(e.ts_ms),
            kind: e.kind.clone(),
            metrics: e.metrics.iter().cloned().collect(),
            attrs: e.attrs.iter().cloned().collect(),
        }
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

/// `GET /v1/devices/{id}/events`
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/events",
    operation_id = "listEvents",
    tag = "queries",
    security(("userKey" = [])),
    params(DeviceIdParam, EventsQuery),
    responses(
        (status = 200, description = "A page of events, newest first (JSON); or, with \
            `format=ndjson|csv` or such an `Accept`, the whole range streamed newest first: \
            one event per line, or CSV with a header row",
            content(
                (EventsPage = "application/json"),
                (String = "application/x-ndjson"),
                (String = "text/csv"),
            )
        ),
        (status = 400, description = "A bad parameter, named in `field`", body = ErrorBody),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let from = instant(params.from.as_ref(), "from")?.unwrap_or(MIN_TS_MS);
    let to = instant(params.to.as_ref(), "to")?.unwrap_or_else(|| now_ms() + MAX_FUTURE_MS);
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
            kind: kind(params.kind.as_ref())?,
        };
        return Ok(export_response(state.store.clone(), export, format));
    }
    let limit = match &params.limit {
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
        .cursor
        .as_deref()
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
            kind: kind(params.kind.as_ref())?,
            limit: limit + 1,
        })
        .await?;
    let next_cursor = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|e| encode_cursor(Position::of(e)))
    } else {
        None
    };
    let events = page.iter().map(EventOut::from).collect();
    Ok(Json(EventsPage {
        events,
        next_cursor,
    })
    .into_response())
}

/// `GET /v1/devices/{id}/aggregates`
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/aggregates",
    operation_id = "deviceAggregates",
    tag = "queries",
    security(("userKey" = [])),
    params(DeviceIdParam, DeviceAggregatesQuery),
    responses(
        (status = 200, description = "The device's windows, in ascending order", body = DeviceAggregateOut),
        (status = 400, description = "A bad parameter, named in `field`", body = ErrorBody),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub async fn device_aggregates(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<DeviceAggregatesQuery>,
) -> Result<Json<DeviceAggregateOut>, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let (window_ms, grid, range) = grid(
        params.from.as_ref(),
        params.to.as_ref(),
        params.window.as_ref(),
        params.tz.as_ref(),
    )?;
    let metric = match &params.metric {
        None => None,
        Some(m) if crate::model::is_valid_name(m) => Some(m.clone()),
        Some(_) => return Err(ApiError::field("metric", "is not a valid metric name")),
    };
    let mode = match &params.fill {
        None => Fill::None,
        Some(f) => Fill::parse(f).ok_or_else(|| {
            ApiError::field("fill", "must be one of none, null, zero, previous, linear")
        })?,
    };
    let with_stats = metric.is_some();
    let percentiles = percentiles(params.percentiles.as_ref(), with_stats)?;
    let filter = AggregateFilter {
        metric,
        kind: kind(params.kind.as_ref())?,
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

/// `GET /v1/devices/{id}/aggregates`.
#[derive(Serialize, ToSchema)]
pub struct DeviceAggregateOut {
    device_id: Uuid,
    window_ms: i64,
    buckets: Vec<WindowOut>,
}

/// One window. `min`, `max`, `avg` and `sum` only with a `metric`; `p50`, ... only
/// as `percentiles` asks.
#[derive(Serialize, ToSchema)]
struct WindowOut {
    #[schema(format = DateTime)]
    start: String,
    start_ms: i64,
    count: u64,
    // Absent, never null: flattened, `None` adds no field.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = StatsOut)]
    stats: Option<StatsOut>,
    /// Only on windows that `fill` added.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    #[schema(required = false)]
    filled: bool,
    /// `p50`, `p99.9`, ...: as asked, null where the window has no values.
    #[serde(flatten)]
    percentiles: Percentiles,
}

/// Named values in the order asked, serialized as fields of the window.
struct Percentiles(Vec<(String, Option<f64>)>);

// Its schema by hand, as its `Serialize` is: fields named `p` and the percentile, each a
// number or null. These fields sit beside the window's own (flattened), so only the
// names of that form are constrained: `patternProperties`, a JSON Schema keyword that
// utoipa has no builder for, goes in through the extension map (which it serializes
// as given).
impl utoipa::PartialSchema for Percentiles {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let by_name = Extensions::from_iter([(
            "patternProperties",
            serde_json::json!({ "^p[0-9]+(\\.[0-9]+)?$": { "type": ["number", "null"] } }),
        )]);
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("`p50`, `p99.9`, ...: the percentiles asked for"))
            .extensions(Some(by_name))
            .build()
            .into()
    }
}

impl ToSchema for Percentiles {}

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
#[derive(Serialize, ToSchema)]
struct StatsOut {
    min: Option<f64>,
    max: Option<f64>,
    avg: Option<f64>,
    sum: Option<f64>,
}

/// `GET /v1/aggregates`.
#[derive(Serialize, ToSchema)]
pub struct GroupedAggregateOut {
    window_ms: i64,
    buckets: Vec<GroupOut>,
    /// With group_by=device, where the next page of devices starts; absent on the
    /// last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_after_device: Option<Uuid>,
}

/// One window's count for one group (a device type, or a device id).
#[derive(Serialize, ToSchema)]
struct GroupOut {
    #[schema(format = DateTime)]
    start: String,
    start_ms: i64,
    group: String,
    count: u64,
}

/// `GET /v1/aggregates`
#[utoipa::path(
    get,
    path = "/v1/aggregates",
    operation_id = "groupedAggregates",
    tag = "queries",
    security(("userKey" = [])),
    params(GroupedAggregatesQuery),
    responses(
        (status = 200, description = "Counts per window and group, sorted by `start_ms` then `group`", body = GroupedAggregateOut),
        (status = 400, description = "A bad parameter, named in `field`", body = ErrorBody),
    )
)]
pub async fn grouped_aggregates(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<GroupedAggregatesQuery>,
) -> Result<Json<GroupedAggregateOut>, ApiError> {
    let user = caller.user()?;
    let (window_ms, grid, range) = grid(
        params.from.as_ref(),
        params.to.as_ref(),
        params.window.as_ref(),
        params.tz.as_ref(),
    )?;
    let group_by = match params.group_by.as_deref() {
        None | Some("type") => GroupBy::Type,
        Some("device") => GroupBy::Device,
        Some(_) => return Err(ApiError::field("group_by", "must be type or device")),
    };
    let kind = kind(params.kind.as_ref())?;
    // Checked whatever `group_by` says: a malformed value is refused, never ignored.
    let device_limit = match &params.device_limit {
        None => None,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_GROUP_DEVICES).contains(&n) => Some(n),
            _ => {
                return Err(ApiError::field(
                    "device_limit",
                    format!("must be an integer from 1 to {MAX_GROUP_DEVICES}"),
                ))
            }
        },
    };
    let after = params
        .after_device
        .as_deref()
        .map(|v| {
            Uuid::parse_str(v).map_err(|_| ApiError::field("after_device", "is not a device id"))
        })
        .transpose()?;
    // Only the user's current devices: a deleted device's events are never served.
    // Listed while the store reads the fleet's rows, which need no device list.
    let registry = state.intake.auth.registry();
    let (devices, fleet) = tokio::join!(
        registry.devices(user),
        super::fleet_pieces(scope(&state, user), &grid, range, group_by, kind.clone()),
    );
    let mut devices: Vec<Uuid> = devices?.into_iter().map(|d| d.id).collect();
    let fleet = fleet?;
    // One group per device and window: past the cap, group_by=device is paged over
    // devices (in id order) so that an answer stays bounded.
    let mut next_after_device = None;
    if group_by == GroupBy::Device {
        if device_limit.is_none() && devices.len() > MAX_GROUP_DEVICES {
            return Err(ApiError::field(
                "group_by",
                format!(
                    "device groups {} devices, more than {MAX_GROUP_DEVICES}: page with device_limit and after_device",
                    devices.len()
                ),
            ));
        }
        let limit = device_limit.unwrap_or(MAX_GROUP_DEVICES);
        devices.sort_unstable();
        devices.retain(|d| after.is_none_or(|a| *d > a));
        if devices.len() > limit {
            devices.truncate(limit);
            next_after_device = devices.last().copied();
        }
    }
    let counts =
        super::grouped_counts(scope(&state, user), &devices, grid, group_by, kind, fleet).await?;
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
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/live",
    operation_id = "deviceLive",
    tag = "queries",
    security(("userKey" = [])),
    params(DeviceIdParam),
    responses(
        (status = 200, description = "The device's live figures (time of receipt)", body = DeviceLive),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub async fn device_live(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceLive>, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    Ok(Json(state.intake.live.device(device, now_ms()).await))
}

/// `GET /v1/live`
#[utoipa::path(
    get,
    path = "/v1/live",
    operation_id = "userLive",
    tag = "queries",
    security(("userKey" = [])),
    responses((status = 200, description = "The caller's live figures", body = UserLive))
)]
pub async fn user_live(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<UserLive>, ApiError> {
    let user = caller.user()?;
    Ok(Json(state.intake.live.user(user, now_ms()).await))
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
