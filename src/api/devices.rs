//! `/v1/devices`: a user's devices.

use axum::extract::rejection::BytesRejection;
use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::Caller;
use super::error::ApiError;
use super::{json_body, AppState};
use crate::model::{format_ms, is_valid_name, now_ms, UserId};
use crate::registry::secrets::{self, SecretKind};
use crate::registry::Device;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

fn device_json(d: &Device) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "type": d.kind,
        "created_at": format_ms(d.created_at_ms),
    })
}

/// Resolves `{id}` to a device of `user`. Anything else, a malformed id included, is
/// the same 404, so that nobody can probe for other users' devices.
///
/// # Errors
///
/// 404, or 503 if the registry is down.
pub async fn owned_device(state: &AppState, user: UserId, id: &str) -> Result<Uuid, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    match state.auth.device_owner(id).await? {
        Some(owner) if owner == user => Ok(id),
        _ => Err(ApiError::NotFound),
    }
}

pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
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
    state.auth.remember_device(device.id, user);
    let mut body = device_json(&device);
    body["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(body)))
}

pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Value>, ApiError> {
    let user = caller.user()?;
    let devices = state.auth.registry().devices(user).await?;
    let devices: Vec<Value> = devices.iter().map(device_json).collect();
    Ok(Json(json!({ "devices": devices })))
}

pub(super) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = caller.user()?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    match state.auth.registry().device(id).await? {
        Some(d) if d.user_id == user => Ok(Json(device_json(&d))),
        _ => Err(ApiError::NotFound),
    }
}

pub(super) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<StatusCode, ApiError> {
    let user = caller.user()?;
    let purge = super::purge::requested(&params)?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let deleted = match state.auth.registry().delete_device(user, id).await? {
        Some(token_hash) => {
            state.auth.device_deleted(id, &token_hash).await;
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
