//! `/health` and `/metrics`: no authentication.

use std::future::Future;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::AppState;

/// A health probe that takes longer than this counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn probe<E>(backend: &str, check: impl Future<Output = Result<(), E>>) -> (bool, Value) {
    let started = Instant::now();
    let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, check).await, Ok(Ok(())));
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    (
        ok,
        json!({ "backend": backend, "ok": ok, "latency_ms": latency_ms }),
    )
}

pub(super) async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let registry = state.auth.registry();
    let ((store_ok, store), (registry_ok, registry), (live_ok, live)) = tokio::join!(
        probe(state.store.backend(), state.store.ping()),
        probe(registry.backend(), registry.ping()),
        probe(state.live.backend(), state.live.ping()),
    );
    let mqtt_ok = state.mqtt.is_ok();
    let mqtt = json!({ "backend": state.mqtt.backend, "ok": mqtt_ok, "latency_ms": 0.0 });
    let (status, code) = if !store_ok {
        ("down", StatusCode::SERVICE_UNAVAILABLE)
    } else if !(registry_ok && live_ok && mqtt_ok) {
        ("degraded", StatusCode::OK)
    } else {
        ("ok", StatusCode::OK)
    };
    (
        code,
        Json(json!({
            "status": status,
            "components": { "store": store, "registry": registry, "live": live, "mqtt": mqtt },
        })),
    )
}

pub(super) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.telemetry.render(state.pipeline.depth()),
    )
}
