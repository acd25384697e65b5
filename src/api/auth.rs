//! The bearer-secret extractor.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};

use super::error::ApiError;
use super::AppState;
use crate::model::UserId;
use crate::registry::auth::Principal;

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

/// Resolves the `Authorization: Bearer` header.
///
/// # Errors
///
/// 401 for a missing or unknown secret; 503 if the registry is needed and down.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let secret = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .ok_or(ApiError::Unauthorized)?;
    state
        .auth
        .authenticate(secret)
        .await?
        .ok_or(ApiError::Unauthorized)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(state, &parts.headers).await.map(Caller)
    }
}
