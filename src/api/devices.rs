//! `/v1/devices`: a user's devices.

use axum::extract::rejection::BytesRejection;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::http::auth::{Caller, DeviceIdParam};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{json_body, ApiQuery, AppState};
use crate::model::{format_ms, is_valid_name, now_ms};
use crate::registry::secrets::{self, SecretKind};
use crate::registry::Device;

/// The body of `POST /v1/devices`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewDevice {
    /// 1 to 128 bytes, no control characters.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    name: String,
    #[serde(rename = "type")]
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    kind: String,
}

/// A device as listed.
#[derive(Serialize, ToSchema)]
pub(super) struct DeviceOut {
    id: Uuid,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[schema(format = DateTime)]
    created_at: String,
}

impl From<&Device> for DeviceOut {
    fn from(d: &Device) -> Self {
        Self {
            id: d.id,
            name: d.name.clone(),
            kind: d.kind.clone(),
            created_at: format_ms(d.created_at_ms),
        }
    }
}

/// A new device, with its token: shown this once.
#[derive(Serialize, ToSchema)]
pub(super) struct CreatedDevice {
    #[serde(flatten)]
    device: DeviceOut,
    #[schema(pattern = "^ipd_")]
    token: String,
}

#[derive(Serialize, ToSchema)]
pub(super) struct DeviceList {
    devices: Vec<DeviceOut>,
}

#[utoipa::path(
    post,
    path = "/v1/devices",
    operation_id = "createDevice",
    tag = "registry",
    security(("userKey" = [])),
    request_body = NewDevice,
    responses(
        (status = 201, description = "Created", body = CreatedDevice),
        (status = 400, description = "A bad or unknown field, named in `field`", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CreatedDevice>), ApiError> {
    let user = caller.user()?;
    let new: NewDevice = json_body(body)?;
    if new.name.is_empty() || new.name.len() > 128 || new.name.chars().any(char::is_control) {
        return Err(ApiError::field(
            "name",
            "must be 1 to 128 bytes with no control characters",
        ));
    }
    if !is_valid_name(&new.kind) {
        return Err(ApiError::field(
            "type",
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . : -",
        ));
    }
    let token = secrets::generate(SecretKind::DeviceToken);
    let device = state
        .intake
        .auth
        .registry()
        .create_device(
            user,
            &new.name,
            &new.kind,
            &secrets::hash_hex(&token),
            now_ms(),
        )
        .await?;
    state.intake.auth.remember_device(device.id, user);
    Ok((
        StatusCode::CREATED,
        Json(CreatedDevice {
            device: DeviceOut::from(&device),
            token,
        }),
    ))
}

#[utoipa::path(
    get,
    path = "/v1/devices",
    operation_id = "listDevices",
    tag = "registry",
    security(("userKey" = [])),
    responses((status = 200, description = "The caller's devices", body = DeviceList))
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<DeviceList>, ApiError> {
    let user = caller.user()?;
    let devices = state.intake.auth.registry().devices(user).await?;
    let devices = devices.iter().map(DeviceOut::from).collect();
    Ok(Json(DeviceList { devices }))
}

#[utoipa::path(
    get,
    path = "/v1/devices/{id}",
    operation_id = "getDevice",
    tag = "registry",
    security(("userKey" = [])),
    params(DeviceIdParam),
    responses(
        (status = 200, description = "The device", body = DeviceOut),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub(super) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeviceOut>, ApiError> {
    let user = caller.user()?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    match state.intake.auth.registry().device(id).await? {
        Some(d) if d.user_id == user => Ok(Json(DeviceOut::from(&d))),
        _ => Err(ApiError::NotFound),
    }
}

#[utoipa::path(
    delete,
    path = "/v1/devices/{id}",
    operation_id = "deleteDevice",
    tag = "registry",
    security(("userKey" = [])),
    params(DeviceIdParam, super::purge::DeleteQuery),
    responses(
        (status = 204, description = "Deleted: its token is refused and its events are no longer served (with `purge=true`, removed)"),
        (status = 400, description = "`purge` is neither true nor false", body = ErrorBody),
        (status = 404, description = "No such device of the caller's", body = ErrorBody),
    )
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<super::purge::DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    let user = caller.user()?;
    let purge = super::purge::requested(&params)?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let deleted = match state.intake.auth.registry().delete_device(user, id).await? {
        Some(token_hash) => {
            state.intake.auth.device_deleted(id, &token_hash).await;
            true
        }
        None => false,
    };
    let purged = match purge {
        true => super::purge::purge(&state, user, id).await?,
        false => 0,
    };
    match deleted || purged > 0 {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::NotFound),
    }
}
