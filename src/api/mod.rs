//! The HTTP API: the route table and its handlers. The plumbing they share (state,
//! authentication, error mapping, the accept loop) is one floor down, in
//! [`crate::http`].
//!
//! Handlers live here or next to what they serve: reads in [`crate::query::routes`]
//! and [`crate::query::latest`], ingest in [`ingest`], the registry in [`users`] and
//! [`devices`], and the unauthenticated operations endpoints in [`ops`].

pub mod dashboard;
pub mod devices;
pub mod ingest;
pub mod openapi;
pub mod ops;
mod purge;
mod snapshot;
pub mod users;

use axum::extract::DefaultBodyLimit;
use axum::http::Method;
use axum::routing::{delete, get, post, MethodRouter};
use axum::Router;

use crate::http::error::ApiError;
use crate::http::AppState;

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
