//! Who is asking: the bearer-secret extractor, and the check that a device in a path
//! is the caller's.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use super::error::ApiError;
use super::AppState;
use crate::live::{LimitKind, Limited};
use crate::model::UserId;
use crate::registry::auth::Principal;
use crate::telemetry::Source;
use uuid::Uuid;

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy)]
pub struct Caller(pub Principal);

impl Caller {
    /// The user, if the caller used a user key. Any other kind of secret is a 401.
    ///
    /// # Errors
    ///
    /// [`ApiError::Unauthorized`] for the admin token or a device token.
    pub fn user(self) -> Result<UserId, ApiError> {
        match self.0 {
            Principal::User(id) => Ok(id),
            _ => Err(ApiError::Unauthorized),
        }
    }

    /// # Errors
    ///
    /// [`ApiError::Unauthorized`] unless the caller used the admin token.
    pub fn admin(self) -> Result<(), ApiError> {
        match self.0 {
            Principal::Admin => Ok(()),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// Resolves the `Authorization: Bearer` header of a request from `peer`.
///
/// # Errors
///
/// 401 for a missing or unknown secret; 429 after too many failures from `peer`; 503
/// if the registry is needed and down.
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    peer: IpAddr,
) -> Result<Principal, ApiError> {
    if let Some(wait) = state.intake.auth.login_wait(peer, None) {
        state.intake.telemetry.login_throttled(Source::Http);
        return Err(ApiError::RateLimited(Limited {
            limit: LimitKind::Login,
            retry_after_ms: wait.as_secs_f64() * 1000.0,
        }));
    }
    let found = resolve(state, headers).await;
    if matches!(found, Err(ApiError::Unauthorized)) {
        state.intake.auth.login_failed(peer, None, "http");
        state.intake.telemetry.login_failed(Source::Http);
    }
    found
}

async fn resolve(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1).
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, secret)| secret)
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .ok_or(ApiError::Unauthorized)?;
    state
        .intake
        .auth
        .authenticate(secret)
        .await?
        .ok_or(ApiError::Unauthorized)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, &parts.headers, peer(parts))
            .await
            .map(Caller)
    }
}

/// The caller's address, as an extractor that never fails.
pub struct Peer(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(peer(parts)))
    }
}

/// The caller's address; unspecified when the router is served without it.
pub fn peer(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

/// `{id}` in the device routes. Any string is routed; one that is not a UUID, or not
/// one of the caller's devices, is a 404.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
// Only described: the handlers take the raw string, so that a malformed id is a 404.
#[allow(dead_code)]
pub struct DeviceIdParam {
    /// The device's id.
    id: Uuid,
}

/// Resolves `{id}` to a device of `user`. Anything else, a malformed id included, is
/// the same 404, so that nobody can probe for other users' devices.
///
/// # Errors
///
/// 404, or 503 if the registry is down.
pub async fn owned_device(state: &AppState, user: UserId, id: &str) -> Result<Uuid, ApiError> {
    let id = Uuid::parse_str(id).map_err(|_| ApiError::NotFound)?;
    match state.intake.auth.device_owner(id).await? {
        Some(owner) if owner == user => Ok(id),
        _ => Err(ApiError::NotFound),
    }
}
