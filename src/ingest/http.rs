//! `POST /v1/ingest`: the HTTP source.
//!
//! The answer is sent only once the pipeline reports the events durable, so a 200
//! means stored. Every refusal is counted in `/metrics` and, where the device is
//! known, in its live `rejected_total` and `last_error`.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use super::decode::{self, DecodeError, DecodeOptions, Format, RawEvent};
use super::{count_rejected, Rejection};
use crate::api::auth::{authenticate, Peer};
use crate::api::error::{ApiError, ErrorBody};
use crate::api::{body_error, AppState};
use crate::model::{now_ms, DeviceId, Record, UserId};
use crate::registry::auth::Principal;
use crate::telemetry::{Reason, Source};

/// Sheds ingest requests beyond `http.max_inflight_requests` with 503 before their
/// bodies are read, so that request bodies never pile up in memory.
pub async fn limit_inflight(
    State(state): State<AppState>,
    Peer(peer): Peer,
    req: Request,
    next: Next,
) -> Response {
    // Authenticated before a slot is taken: strangers cannot hold the slots.
    if let Err(e) = authenticate(&state, req.headers(), peer).await {
        let reason = match e {
            ApiError::Unauthorized => Reason::Unauthorized,
            ApiError::RateLimited(_) => Reason::RateLimited,
            _ => Reason::Overloaded,
        };
        state.telemetry.rejected(Source::Http, reason, 1);
        return e.into_response();
    }
    let Ok(_slot) = state.ingest_slots.clone().try_acquire_owned() else {
        state
            .telemetry
            .rejected(Source::Http, Reason::Overloaded, 1);
        return ApiError::Unavailable("too many ingest requests in flight; try again".into())
            .into_response();
    };
    // The body is read here, under a deadline, so that a client that sends it slowly
    // (or not at all) gets 408 and frees its slot instead of holding it.
    let (parts, body) = req.into_parts();
    let limit = state.limits.max_body_bytes;
    let bytes =
        match tokio::time::timeout(state.limits.body_timeout, axum::body::to_bytes(body, limit))
            .await
        {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                if !too_large {
                    // The client went away mid-body; nobody is left to answer.
                    return ApiError::field("body", "could not be read").into_response();
                }
                state.telemetry.rejected(Source::Http, Reason::TooLarge, 1);
                return ApiError::TooLarge("the request body is larger than the limit".into())
                    .into_response();
            }
            Err(_) => {
                state.telemetry.rejected(Source::Http, Reason::Invalid, 1);
                return ApiError::Timeout("the request body did not arrive in time".into())
                    .into_response();
            }
        };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Who the events are charged to once known, for rejection accounting.
struct Rejector<'a> {
    state: &'a AppState,
    device: Option<(UserId, DeviceId)>,
}

impl Rejector<'_> {
    async fn reject(&self, error: ApiError, reason: Reason, events: usize) -> ApiError {
        let message = match &error {
            ApiError::Invalid { message, .. } => message.clone(),
            other => format!("{} ({})", reason.as_str(), other.status()),
        };
        let r = Rejection::new(reason, events as u64, message);
        let live = self.state.live.as_ref();
        count_rejected(&self.state.telemetry, live, Source::Http, self.device, &r).await;
        error
    }
}

/// The answer to a stored request.
#[derive(Serialize, ToSchema)]
pub struct Accepted {
    /// Events now durable, duplicates included.
    accepted: usize,
}

/// A JSON ingest body: one event, or an array of up to 10,000 (configurable). Only
/// described: [`decode`] reads the body itself, to name the bad event and field.
#[derive(serde::Deserialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)]
pub(crate) enum IngestBody {
    One(RawEvent),
    Many(Vec<RawEvent>),
}

#[utoipa::path(
    post,
    path = "/v1/ingest",
    operation_id = "ingest",
    tag = "ingest",
    security(("deviceToken" = []), ("userKey" = [])),
    request_body(
        description = "One event, a JSON array of events, or NDJSON (one event per line; blank lines are skipped). A missing Content-Type is read as JSON.",
        content(
            (IngestBody = "application/json"),
            (String = "application/x-ndjson"),
        ),
    ),
    responses(
        (status = 200, description = "Every event is durable", body = Accepted),
        (status = 400, description = "The first bad event: its 0-based `index` and the `field`; nothing of the request is stored", body = ErrorBody),
        (status = 404, description = "Gateway mode: a `device_id` that is not one of the user's", body = ErrorBody),
        (status = 408, description = "The body did not arrive in time", body = ErrorBody),
        (status = 413, description = "More than 10,000 events, or a body over 1 MiB (both configurable)", body = ErrorBody),
    )
)]
pub async fn ingest(
    State(state): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, ApiError> {
    let received_ms = now_ms();
    let mut rejector = Rejector {
        state: &state,
        device: None,
    };
    let principal = match authenticate(&state, &headers, peer).await {
        Ok(p @ (Principal::Device { .. } | Principal::User(_))) => p,
        Ok(Principal::Admin) => {
            return Err(rejector
                .reject(ApiError::Unauthorized, Reason::Unauthorized, 1)
                .await)
        }
        Err(e) => {
            let reason = match e {
                ApiError::Unauthorized => Reason::Unauthorized,
                ApiError::RateLimited(_) => Reason::RateLimited,
                _ => Reason::Overloaded,
            };
            return Err(rejector.reject(e, reason, 1).await);
        }
    };
    if let Principal::Device { id, user_id } = principal {
        rejector.device = Some((user_id, id));
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let err = body_error(e);
            let reason = match err {
                ApiError::TooLarge(_) => Reason::TooLarge,
                _ => Reason::Invalid,
            };
            return Err(rejector.reject(err, reason, 1).await);
        }
    };
    let format = match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) if ct.trim_start().starts_with("application/x-ndjson") => Format::NdJson,
        _ => Format::Json,
    };
    let opts = DecodeOptions {
        max_events: state.limits.max_events,
        now_ms: received_ms,
        retention: state.limits.retention,
    };
    let decoded = match decode::decode(&body, format, opts) {
        Ok(d) => d,
        Err(e) => {
            let events = e.events();
            let (err, reason) = match e {
                DecodeError::TooMany { limit } => (
                    ApiError::TooLarge(format!("too many events: at most {limit} per request")),
                    Reason::TooLarge,
                ),
                DecodeError::Invalid {
                    index,
                    field,
                    reason,
                    ..
                } => (
                    ApiError::Invalid {
                        message: format!("event {index}: {field}: {reason}"),
                        index: Some(index),
                        field: Some(field),
                    },
                    Reason::Invalid,
                ),
            };
            return Err(rejector.reject(err, reason, events).await);
        }
    };
    let accepted = decoded.len();
    if accepted == 0 {
        return Ok(Json(Accepted { accepted: 0 }));
    }

    // Resolve the owner of every event.
    let mut records = Vec::with_capacity(accepted);
    let mut per_device: HashMap<DeviceId, (UserId, u64)> = HashMap::new();
    match principal {
        Principal::Device { id, user_id } => {
            if let Some(index) = decoded.iter().position(|d| d.device_id.is_some()) {
                let err = ApiError::Invalid {
                    message: format!(
                        "event {index}: device_id: is only allowed with a user key (gateway mode)"
                    ),
                    index: Some(index),
                    field: Some("device_id".into()),
                };
                return Err(rejector.reject(err, Reason::Invalid, accepted).await);
            }
            per_device.insert(id, (user_id, accepted as u64));
            records.extend(decoded.into_iter().map(|d| Record {
                user_id,
                device_id: id,
                received_ms,
                event: d.event,
            }));
        }
        Principal::User(user_id) => {
            for (index, d) in decoded.iter().enumerate() {
                let Some(device) = d.device_id else {
                    let err = ApiError::Invalid {
                        message: format!(
                            "event {index}: device_id: is required with a user key (gateway mode)"
                        ),
                        index: Some(index),
                        field: Some("device_id".into()),
                    };
                    return Err(rejector.reject(err, Reason::Invalid, accepted).await);
                };
                per_device.entry(device).or_insert((user_id, 0)).1 += 1;
            }
            for device in per_device.keys() {
                if state.auth.device_owner(*device).await? != Some(user_id) {
                    return Err(rejector
                        .reject(ApiError::NotFound, Reason::UnknownDevice, accepted)
                        .await);
                }
            }
            records.extend(decoded.into_iter().map(|d| Record {
                user_id,
                device_id: d.device_id.unwrap_or_default(),
                received_ms,
                event: d.event,
            }));
        }
        Principal::Admin => unreachable!("refused above"),
    }

    for (device, (user, n)) in &per_device {
        if let Err(limited) = state.live.admit(*user, *device, *n, received_ms).await {
            let r = Rejector {
                state: &state,
                device: Some((*user, *device)),
            };
            return Err(r
                .reject(limited.into(), Reason::RateLimited, accepted)
                .await);
        }
    }

    let ack = match state.pipeline.try_submit(records) {
        Ok(ack) => ack,
        Err(e) => {
            return Err(rejector
                .reject(e.into(), Reason::Overloaded, accepted)
                .await)
        }
    };
    ack.durable().await?;
    state.telemetry.ingested(Source::Http, accepted as u64);
    Ok(Json(Accepted { accepted }))
}
