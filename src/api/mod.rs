//! The HTTP API: router, shared state, authentication and error mapping.
//!
//! Routes live next to what they serve: ingest in [`crate::ingest::http`], reads in
//! [`crate::query::routes`], the registry in [`users`] and [`devices`], and the
//! unauthenticated operations endpoints in [`ops`].

pub mod auth;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod ops;
mod purge;
pub mod serve;
mod snapshot;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;

use crate::live::SharedLive;
use crate::pipeline::Pipeline;
use crate::registry::auth::SharedAuth;
use crate::store::SharedStore;
use crate::telemetry::Telemetry;
use error::ApiError;

/// Whether an MQTT source is running, for `/health`.
#[derive(Clone)]
pub struct MqttStatus {
    pub backend: &'static str,
    ok: Arc<AtomicBool>,
}

impl MqttStatus {
    pub fn new(backend: &'static str, ok: bool) -> Self {
        Self {
            backend,
            ok: Arc::new(AtomicBool::new(ok)),
        }
    }

    pub fn set_ok(&self, ok: bool) {
        self.ok.store(ok, Ordering::Relaxed);
    }

    pub fn is_ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }
}

/// Limits applied to incoming requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_body_bytes: usize,
    pub max_events: usize,
    /// How long an ingest body may take to arrive.
    pub body_timeout: std::time::Duration,
    /// Events the raw tier has already expired are refused.
    pub retention: crate::store::retention::Retention,
}

/// Everything a handler may need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub auth: SharedAuth,
    pub store: SharedStore,
    pub live: SharedLive,
    pub pipeline: Pipeline,
    pub telemetry: Telemetry,
    pub limits: RequestLimits,
    /// Ingest requests being read or processed; bounds the memory held by bodies.
    pub ingest_slots: Arc<Semaphore>,
    pub bucket_len_ms: i64,
    pub mqtt: MqttStatus,
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/users", post(users::create))
        .route("/v1/users/{id}/rotate-key", post(users::rotate_key))
        .route("/v1/devices", post(devices::create).get(devices::list))
        .route(
            "/v1/devices/{id}",
            get(devices::show).delete(devices::delete),
        )
        .route(
            "/v1/ingest",
            post(crate::ingest::http::ingest).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                crate::ingest::http::limit_inflight,
            )),
        )
        .route("/v1/devices/{id}/events", get(crate::query::routes::events))
        .route(
            "/v1/devices/{id}/aggregates",
            get(crate::query::routes::device_aggregates),
        )
        .route(
            "/v1/aggregates",
            get(crate::query::routes::grouped_aggregates),
        )
        .route(
            "/v1/devices/{id}/live",
            get(crate::query::routes::device_live),
        )
        .route("/v1/live", get(crate::query::routes::user_live))
        .route("/v1/devices/{id}/latest", get(crate::query::latest::device))
        .route("/v1/latest", get(crate::query::latest::fleet))
        .route("/v1/admin/snapshot", post(snapshot::snapshot))
        .route("/health", get(ops::health))
        .route("/metrics", get(ops::metrics))
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
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
