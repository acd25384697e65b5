//! `GET /v1/devices/{id}/latest` and `GET /v1/latest`: the newest value of each metric,
//! as the stores keep it (`store::latest`), so answered without scanning events.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::auth::{owned_device, Caller, DeviceIdParam};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{ApiQuery, AppState};
use crate::model::{format_ms, DeviceId};
use crate::store::latest::Latest;

/// One metric's newest value.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = LatestValue)]
pub struct Value {
    pub value: f64,
    #[schema(format = DateTime)]
    pub ts: String,
    pub ts_ms: i64,
}

/// A device's newest values.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceLatest {
    #[schema(value_type = uuid::Uuid)]
    pub device_id: DeviceId,
    /// Only in the fleet form.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub name: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub kind: Option<String>,
    /// By metric name, sorted.
    pub metrics: BTreeMap<String, Value>,
}

/// Every current device of the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetLatest {
    pub devices: Vec<DeviceLatest>,
}

/// The query of `GET /v1/latest`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FleetQuery {
    /// Only devices of this type.
    #[serde(rename = "type")]
    #[param(min_length = 1, max_length = 64)]
    kind: Option<String>,
}

fn by_device(rows: Vec<Latest>) -> HashMap<DeviceId, BTreeMap<String, Value>> {
    let mut out: HashMap<DeviceId, BTreeMap<String, Value>> = HashMap::new();
    for r in rows {
        out.entry(r.device_id).or_default().insert(
            r.metric,
            Value {
                value: r.value,
                ts: format_ms(r.ts_ms),
                ts_ms: r.ts_ms,
            },
        );
    }
    out
}

/// `GET /v1/devices/{id}/latest`
#[utoipa::path(
    get,
    path = "/v1/devices/{id}/latest",
    operation_id = "deviceLatest",
    tag = "queries",
    security(("userKey" = [])),
    params(DeviceIdParam),
    responses(
        (status = 200, description = "The newest value of each metric the device sent", body = DeviceLatest),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub async fn device(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceLatest>, ApiError> {
    let user = caller.user()?;
    let device = owned_device(&state, user, &id).await?;
    let rows = state.store.latest(user, Some(device)).await?;
    Ok(Json(DeviceLatest {
        device_id: device,
        name: None,
        kind: None,
        metrics: by_device(rows).remove(&device).unwrap_or_default(),
    }))
}

/// `GET /v1/latest?type=`: every current device of the caller (of that device type),
/// in the registry's order, with the newest value of each of its metrics.
#[utoipa::path(
    get,
    path = "/v1/latest",
    operation_id = "fleetLatest",
    tag = "queries",
    security(("userKey" = [])),
    params(FleetQuery),
    responses(
        (status = 200, description = "Every current device of the caller, with its newest values", body = FleetLatest),
        (status = 400, description = "A bad parameter, named in `field`", body = ErrorBody),
    )
)]
pub async fn fleet(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(params): ApiQuery<FleetQuery>,
) -> Result<Json<FleetLatest>, ApiError> {
    let user = caller.user()?;
    let kind = params.kind.as_ref();
    if kind.is_some_and(|k| k.is_empty() || k.len() > 64) {
        return Err(ApiError::field("type", "must be 1 to 64 characters"));
    }
    // The registry decides which devices exist: a deleted device's values are never
    // served, though the store may still hold them.
    let devices = state.intake.auth.registry().devices(user).await?;
    let mut values = by_device(state.store.latest(user, None).await?);
    let devices = devices
        .into_iter()
        .filter(|d| kind.is_none_or(|k| *k == d.kind))
        .map(|d| DeviceLatest {
            device_id: d.id,
            metrics: values.remove(&d.id).unwrap_or_default(),
            name: Some(d.name),
            kind: Some(d.kind),
        })
        .collect();
    Ok(Json(FleetLatest { devices }))
}
