//! Every error answer, mapped to HTTP in one place. Bodies are JSON
//! `{"error": "<reason>", ...}`; internal details go to the log, not to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::ingest::decode::DecodeError;
use crate::live::{LimitKind, Limited};
use crate::pipeline::{AckError, SubmitError};
use crate::registry::RegistryError;
use crate::store::StoreError;

#[derive(Debug)]
pub enum ApiError {
    /// Missing, unknown, or the wrong kind of secret.
    Unauthorized,
    /// The thing does not exist, or is not the caller's: the two look the same.
    NotFound,
    /// A bad request. Validation errors name the event index and the field.
    Invalid {
        message: String,
        index: Option<usize>,
        field: Option<String>,
    },
    Conflict(String),
    TooLarge(String),
    RateLimited(Limited),
    /// The store, registry or pipeline cannot take the request now.
    Unavailable(String),
    /// The request body did not arrive in time.
    Timeout(String),
    /// A known path asked with a method it does not serve.
    MethodNotAllowed,
}

/// The body of every error answer. `IntoResponse` below builds only this, and the
/// OpenAPI document's `Error` schema is derived from it, so the two cannot differ.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    pub error: String,
    /// Ingest only: the 0-based index of the first bad event.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = u64)]
    pub index: Option<usize>,
    /// The bad query parameter, body field or event field (`metrics.temp`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = String)]
    pub field: Option<String>,
    /// 429 only: the budget in debt.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = LimitKind)]
    pub limit: Option<LimitKind>,
}

impl ErrorBody {
    fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            index: None,
            field: None,
            limit: None,
        }
    }
}

impl ApiError {
    /// A bad query parameter or body field, without an event index.
    pub fn field(field: &str, reason: impl std::fmt::Display) -> Self {
        ApiError::Invalid {
            message: format!("{field}: {reason}"),
            index: None,
            field: Some(field.to_owned()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// Whole seconds for `Retry-After`, never zero.
fn retry_after_secs(ms: f64) -> u64 {
    ((ms / 1000.0).ceil() as u64).max(1)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut retry_after = None;
        let body = match self {
            ApiError::Unauthorized => ErrorBody::new("missing or invalid bearer secret"),
            ApiError::NotFound => ErrorBody::new("not found"),
            ApiError::MethodNotAllowed => ErrorBody::new("method not allowed on this path"),
            ApiError::Invalid {
                message,
                index,
                field,
            } => ErrorBody {
                index,
                field,
                ..ErrorBody::new(message)
            },
            ApiError::Conflict(m) | ApiError::TooLarge(m) | ApiError::Timeout(m) => {
                ErrorBody::new(m)
            }
            ApiError::RateLimited(Limited {
                limit,
                retry_after_ms,
            }) => {
                retry_after = Some(retry_after_secs(retry_after_ms));
                let error = match limit {
                    LimitKind::Device => "rate limit exceeded: the device's events per second",
                    LimitKind::User => "rate limit exceeded: the user's events per second",
                    LimitKind::Login => "too many failed logins from this address; retry later",
                };
                ErrorBody {
                    limit: Some(limit),
                    ..ErrorBody::new(error)
                }
            }
            ApiError::Unavailable(m) => {
                retry_after = Some(1);
                ErrorBody::new(m)
            }
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Conflict(what) => ApiError::Conflict(format!("{what} is already taken")),
            other => {
                tracing::warn!(error = %other, "registry call failed");
                ApiError::Unavailable("the registry is unavailable; try again".to_owned())
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "event store call failed");
        ApiError::Unavailable("the event store is unavailable; try again".to_owned())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        ApiError::Unavailable(match e {
            SubmitError::Full => "the ingest pipeline is full; try again shortly".to_owned(),
            SubmitError::Closed => "the server is shutting down".to_owned(),
        })
    }
}

impl From<AckError> for ApiError {
    fn from(e: AckError) -> Self {
        tracing::warn!(error = %e, "events were not stored");
        ApiError::Unavailable(
            "the events could not be stored; nothing was kept, try again".to_owned(),
        )
    }
}

/// The one mapping of a refused payload: the same words `/metrics` and the live
/// `last_error` get.
impl From<DecodeError> for ApiError {
    fn from(e: DecodeError) -> Self {
        let message = e.to_string();
        match e {
            DecodeError::TooMany { .. } => ApiError::TooLarge(message),
            DecodeError::Invalid { index, field, .. } => ApiError::Invalid {
                message,
                index: Some(index),
                field: Some(field),
            },
        }
    }
}

impl From<Limited> for ApiError {
    fn from(l: Limited) -> Self {
        ApiError::RateLimited(l)
    }
}
