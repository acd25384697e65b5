//! The HTTP plumbing every handler stands on: the shared state, the extractors
//! ([`auth`]), the one mapping of errors to answers ([`error`]) and the accept loop
//! ([`serve`]). It knows no route: the handlers and the router are in [`crate::api`],
//! above it, so that the read and ingest code can use this floor without an import
//! circle.

pub mod auth;
pub mod error;
pub mod serve;

use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::ingest::mqtt::MqttStatus;
use crate::ingest::Intake;
use crate::store::SharedStore;
use error::ApiError;

/// Limits applied to incoming requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    /// How long an ingest body may take to arrive.
    pub body_timeout: std::time::Duration,
}

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// Authentication, live figures, the pipeline and the counters, shared with MQTT.
    pub intake: Intake,
    pub store: SharedStore,
    pub limits: RequestLimits,
    /// Ingest requests being read or processed; bounds the memory held by bodies.
    pub ingest_slots: Arc<Semaphore>,
    pub bucket_len_ms: i64,
    pub mqtt: MqttStatus,
}

/// A query string parsed into `T`, refusing with the contract's 400 (naming the field)
/// where axum's `Query` would answer in plain text. The parameter structs keep every
/// value as a string, so this fails only on a repeated parameter.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Query::try_from_uri(&parts.uri)
            .map(|Query(q)| ApiQuery(q))
            .map_err(|e| {
                let reason = e.body_text();
                // serde names the field in backquotes ("duplicate field `from`").
                let field = reason
                    .split('`')
                    .nth(1)
                    .filter(|f| !f.is_empty())
                    .unwrap_or("query")
                    .to_owned();
                let reason = reason
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&reason)
                    .to_owned();
                ApiError::field(&field, reason)
            })
    }
}

/// Turns a body-reading failure into the contract's answer.
pub fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge("the request body is larger than the limit".to_owned())
    } else {
        ApiError::field("body", rejection.body_text())
    }
}

/// Parses a small JSON body (registry endpoints), naming the bad field.
///
/// # Errors
///
/// 400 naming the field, or 413 if the body was too large.
pub fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(body_error)?;
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let reason = e.inner().to_string();
        let reason = reason
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_owned();
        let path = e.path().to_string();
        // serde reports a missing field at its parent; name the field itself.
        let missing = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'));
        let field = match (missing, path.as_str()) {
            (Some(name), _) => name.to_owned(),
            (None, ".") => "body".to_owned(),
            (None, _) => path,
        };
        ApiError::field(&field, reason)
    })
}
