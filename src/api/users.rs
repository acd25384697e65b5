//! `POST /v1/users` (admin), and `POST /v1/users/{id}/rotate-key` (the user, or admin).

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::http::auth::Caller;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{json_body, AppState};
use crate::model::{format_ms, now_ms};
use crate::registry::auth::Principal;
use crate::registry::secrets::{self, SecretKind};

/// The body of `POST /v1/users`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.-]{1,64}$")]
    username: String,
    /// An address: something before and after an `@`, no whitespace.
    #[schema(max_length = 254, pattern = "^[^@\\s]+@[^\\s]+$")]
    email: String,
}

/// A new user, with its API key: shown this once.
#[derive(Serialize, ToSchema)]
pub(super) struct CreatedUser {
    id: i64,
    username: String,
    email: String,
    #[schema(pattern = "^ipk_")]
    api_key: String,
    #[schema(format = DateTime)]
    created_at: String,
}

/// A user's new API key, shown this once; the old one is refused from now on.
#[derive(Serialize, ToSchema)]
pub(super) struct RotatedKey {
    id: i64,
    #[schema(pattern = "^ipk_")]
    api_key: String,
}

#[utoipa::path(
    post,
    path = "/v1/users",
    operation_id = "createUser",
    tag = "registry",
    security(("adminToken" = [])),
    request_body = NewUser,
    responses(
        (status = 201, description = "Created", body = CreatedUser),
        (status = 400, description = "A bad or unknown field, named in `field`", body = ErrorBody),
        (status = 409, description = "The username is taken", body = ErrorBody),
        (status = 413, description = "The body is larger than the limit", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    caller.admin()?;
    let new: NewUser = json_body(body)?;
    let username_ok = (1..=64).contains(&new.username.len())
        && new
            .username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !username_ok {
        return Err(ApiError::field(
            "username",
            "must be 1 to 64 characters from A-Z a-z 0-9 _ . -",
        ));
    }
    let email_ok = new.email.len() <= 254
        && new
            .email
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !new.email.chars().any(char::is_whitespace);
    if !email_ok {
        return Err(ApiError::field("email", "must be an email address"));
    }
    let api_key = secrets::generate(SecretKind::UserKey);
    let user = state
        .intake
        .auth
        .registry()
        .create_user(
            &new.username,
            &new.email,
            &secrets::hash_hex(&api_key),
            now_ms(),
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            id: user.id,
            username: user.username,
            email: user.email,
            api_key,
            created_at: format_ms(user.created_at_ms),
        }),
    ))
}

/// Gives the user a new API key and revokes the old one: here at once, on every other
/// instance through the deletion broadcast. The new key is shown once.
#[utoipa::path(
    post,
    path = "/v1/users/{id}/rotate-key",
    operation_id = "rotateUserKey",
    tag = "registry",
    security(("adminToken" = []), ("userKey" = [])),
    params(("id" = i64, Path, description = "The user's id")),
    responses(
        (status = 200, description = "The new key", body = RotatedKey),
        (status = 404, description = "No such user, or another user's id", body = ErrorBody),
    )
)]
pub(super) async fn rotate_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<RotatedKey>, ApiError> {
    let user: i64 = id.parse().map_err(|_| ApiError::NotFound)?;
    // A user rotates its own key only; another user's id looks like a missing one.
    match caller.0 {
        Principal::Admin => {}
        Principal::User(me) if me == user => {}
        Principal::User(_) => return Err(ApiError::NotFound),
        Principal::Device { .. } => return Err(ApiError::Unauthorized),
    }
    let api_key = secrets::generate(SecretKind::UserKey);
    let old = state
        .intake
        .auth
        .registry()
        .rotate_user_key(user, &secrets::hash_hex(&api_key))
        .await?
        .ok_or(ApiError::NotFound)?;
    state.intake.auth.secret_revoked(&old).await;
    Ok(Json(RotatedKey { id: user, api_key }))
}
