//! `/health` and `/metrics`: no authentication.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use tokio::time::Instant;
use utoipa::ToSchema;

use crate::http::AppState;

/// A health probe that takes longer than this counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /health`.
#[derive(Serialize, ToSchema)]
pub(super) struct Health {
    status: HealthStatus,
    components: Components,
}

/// `down` (503) when the store is unreachable; `degraded` when another component is.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum HealthStatus {
    Ok,
    Degraded,
    Down,
}

#[derive(Serialize, ToSchema)]
struct Components {
    store: Component,
    registry: Component,
    live: Component,
    mqtt: Component,
}

#[derive(Serialize, ToSchema)]
struct Component {
    backend: String,
    ok: bool,
    /// How long the probe took, in ms.
    latency_ms: f64,
}

async fn probe<E>(backend: &str, check: impl Future<Output = Result<(), E>>) -> (bool, Component) {
    let started = Instant::now();
    let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, check).await, Ok(Ok(())));
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    (
        ok,
        Component {
            backend: backend.to_owned(),
            ok,
            latency_ms,
        },
    )
}

#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "operations",
    responses(
        (status = 200, description = "`ok`, or `degraded` when a component other than the store fails", body = Health),
        (status = 503, description = "`down`: the store is unreachable", body = Health),
    )
)]
pub(super) async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let registry = state.intake.auth.registry();
    let ((store_ok, store), (registry_ok, registry), (live_ok, live)) = tokio::join!(
        probe(state.store.backend(), state.store.ping()),
        probe(registry.backend(), registry.ping()),
        probe(state.intake.live.backend(), state.intake.live.ping()),
    );
    let mqtt_ok = state.mqtt.is_ok();
    let mqtt = Component {
        backend: state.mqtt.backend.to_owned(),
        ok: mqtt_ok,
        latency_ms: 0.0,
    };
    let (status, code) = if !store_ok {
        (HealthStatus::Down, StatusCode::SERVICE_UNAVAILABLE)
    } else if !(registry_ok && live_ok && mqtt_ok) {
        (HealthStatus::Degraded, StatusCode::OK)
    } else {
        (HealthStatus::Ok, StatusCode::OK)
    };
    (
        code,
        Json(Health {
            status,
            components: Components {
                store,
                registry,
                live,
                mqtt,
            },
        }),
    )
}

#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"))
)]
pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        (state.intake.telemetry)
            .render(state.intake.pipeline.depth(), state.store.rollup_backlog()),
    )
}
