//! The HTTP API: router, shared state, authentication and error mapping.
//!
//! Routes live next to what they serve: ingest in [`crate::ingest::http`], reads in
//! [`crate::query::routes`], the registry in [`users`] and [`devices`], and the
//! unauthenticated operations endpoints in [`ops`].

pub mod auth;
pub mod dashboard;
pub mod devices;
pub mod error;
pub mod openapi;
pub mod ops;
mod purge;
pub mod serve;
mod snapshot;
pub mod users;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, post, MethodRouter};
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

/// One route: a method and a path, and what serves them.
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    serve: fn(&AppState) -> MethodRouter<AppState>,
}

impl Route {
    fn new(
        method: Method,
        path: &'static str,
        serve: fn(&AppState) -> MethodRouter<AppState>,
    ) -> Self {
        Self {
            method,
            path,
            serve,
        }
    }
}

/// Every route of the API. [`router`] serves these and nothing else, and
/// `tests/openapi_contract.rs` checks that `/openapi.json` describes exactly these, so a
/// route added here without its `#[utoipa::path]` fails the suite. Each entry's
/// `MethodRouter` must serve its one method only; the same test asks each over HTTP.
pub fn routes() -> Vec<Route> {
    use crate::ingest::http as ingest;
    use crate::query::{latest, routes as queries};
    vec![
        Route::new(Method::POST, "/v1/users", |_| post(users::create)),
        Route::new(Method::POST, "/v1/users/{id}/rotate-key", |_| {
            post(users::rotate_key)
        }),
        Route::new(Method::POST, "/v1/devices", |_| post(devices::create)),
        Route::new(Method::GET, "/v1/devices", |_| get(devices::list)),
        Route::new(Method::GET, "/v1/devices/{id}", |_| get(devices::show)),
        Route::new(Method::DELETE, "/v1/devices/{id}", |_| {
            delete(devices::delete)
        }),
        Route::new(Method::POST, "/v1/ingest", |state| {
            post(ingest::ingest).route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                ingest::limit_inflight,
            ))
        }),
        Route::new(Method::GET, "/v1/devices/{id}/events", |_| {
            get(queries::events)
        }),
        Route::new(Method::GET, "/v1/devices/{id}/aggregates", |_| {
            get(queries::device_aggregates)
        }),
        Route::new(Method::GET, "/v1/aggregates", |_| {
            get(queries::grouped_aggregates)
        }),
        Route::new(Method::GET, "/v1/devices/{id}/live", |_| {
            get(queries::device_live)
        }),
        Route::new(Method::GET, "/v1/live", |_| get(queries::user_live)),
        Route::new(Method::GET, "/v1/devices/{id}/latest", |_| {
            get(latest::device)
        }),
        Route::new(Method::GET, "/v1/latest", |_| get(latest::fleet)),
        Route::new(Method::POST, "/v1/admin/snapshot", |_| {
            post(snapshot::snapshot)
        }),
        Route::new(Method::GET, "/health", |_| get(ops::health)),
        Route::new(Method::GET, "/metrics", |_| get(ops::metrics)),
        Route::new(Method::GET, "/openapi.json", |_| get(openapi::document)),
        Route::new(Method::GET, "/", |_| get(dashboard::index)),
        Route::new(Method::GET, "/assets/{file}", |_| get(dashboard::asset)),
    ]
}

/// The whole API: [`routes`], and the JSON error answers for everything else.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    // Routes come only from the table, which the contract test holds to the document.
    // Two entries on one path merge into one method router.
    let mut router = Router::new();
    for route in routes() {
        router = router.route(route.path, (route.serve)(&state));
    }
    router
        // After the routes: it applies to those already added. Axum keeps the `Allow`
        // header; the body becomes the documented error shape instead of empty.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
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
