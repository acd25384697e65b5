//! `DELETE /v1/devices/{id}?purge=true`: deleting a device and its data.
//!
//! A plain delete keeps the device's events, rollups and latest values (they are no
//! longer served: every read resolves the device in the registry first, and fleet
//! reads count current devices only), so that a mistaken delete loses nothing that
//! cannot be exported by an operator. With `purge=true` they are removed from the
//! store and the device's live figures are forgotten, after the registry row is gone
//! (so that no new event is accepted for it meanwhile).
//!
//! A purge that failed half-way can be sent again: the store side is keyed by the
//! caller's user id, so it is run for the caller's own data even once the registry
//! row is gone, and it answers 404 only when nothing was left to remove.

use serde::Deserialize;
use utoipa::IntoParams;

use crate::http::error::ApiError;
use crate::http::AppState;
use crate::model::{DeviceId, UserId};

/// The query of `DELETE /v1/devices/{id}`.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct DeleteQuery {
    /// `true` also removes the device's events, rollups, latest values and live
    /// figures, in every backend. Default `false`: they are kept, no longer served.
    #[param(pattern = "^(true|false)$")]
    purge: Option<String>,
}

/// `purge=true|false`; absent is false.
///
/// # Errors
///
/// 400 naming `purge` for any other value.
pub(super) fn requested(params: &DeleteQuery) -> Result<bool, ApiError> {
    match params.purge.as_deref() {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(ApiError::field("purge", "must be true or false")),
    }
}

/// Removes the device's stored data and live figures; returns how many events were
/// removed.
///
/// # Errors
///
/// 503 if the store failed (the purge may be sent again).
pub(super) async fn purge(
    state: &AppState,
    user: UserId,
    device: DeviceId,
) -> Result<u64, ApiError> {
    let events = state.store.purge_device(user, device).await?;
    if let Err(e) = state.intake.live.forget_device(user, device).await {
        // The events are gone and the device is not served any more; what remains is
        // its share of the user's live total, which `iotpipe rebuild-live` recomputes.
        tracing::warn!(error = %e, %device, "purged a device but could not forget its live figures");
    }
    tracing::info!(%device, events, "purged a device");
    Ok(events)
}
