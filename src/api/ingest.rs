//! `POST /v1/ingest`: the HTTP source. It maps HTTP to the shared
//! [`crate::ingest::Intake`] and back: the body and its content type in, the status
//! code out.
//!
//! The answer is sent only once the pipeline reports the events durable, so a 200
//! means stored. Every refusal is counted in `/metrics` and, where the device is
//! known, in its live `rejected_total` and `last_error`.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::auth::{authenticate, Peer};
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{body_error, AppState};
use crate::ingest::decode::{DecodeError, Format, RawEvent};
use crate::ingest::{Intake, Rejection, Unowned};
use crate::model::{now_ms, DeviceId, UserId};
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
        state
            .intake
            .telemetry
            .rejected(Source::Http, auth_reason(&e), 1);
        return e.into_response();
    }
    let Ok(_slot) = state.ingest_slots.clone().try_acquire_owned() else {
        state
            .intake
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
                state
                    .intake
                    .telemetry
                    .rejected(Source::Http, Reason::TooLarge, 1);
                return ApiError::TooLarge("the request body is larger than the limit".into())
                    .into_response();
            }
            Err(_) => {
                state
                    .intake
                    .telemetry
                    .rejected(Source::Http, Reason::Invalid, 1);
                return ApiError::Timeout("the request body did not arrive in time".into())
                    .into_response();
            }
        };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Who the events are charged to once known, for rejection accounting.
struct Rejector<'a> {
    intake: &'a Intake,
    device: Option<(UserId, DeviceId)>,
}

impl Rejector<'_> {
    async fn reject(&self, error: ApiError, reason: Reason, events: usize) -> ApiError {
        let message = match &error {
            ApiError::Invalid { message, .. } => message.clone(),
            other => format!("{} ({})", reason.as_str(), other.status()),
        };
        let r = Rejection::new(reason, events as u64, message);
        self.intake.reject(Source::Http, self.device, &r).await;
        error
    }
}

/// A failed authentication, as counted.
fn auth_reason(e: &ApiError) -> Reason {
    match e {
        ApiError::Unauthorized => Reason::Unauthorized,
        ApiError::RateLimited(_) => Reason::RateLimited,
        _ => Reason::Overloaded,
    }
}

/// Events that cannot be charged to the caller, in the words of a bearer secret.
/// No reason: not the caller's fault, so answered but not counted as a refusal.
fn unowned(e: Unowned, events: usize) -> (ApiError, Option<Reason>) {
    let gateway = |index, reason: &str| DecodeError::Invalid {
        index,
        field: "device_id".into(),
        reason: reason.into(),
        events,
    };
    match e {
        Unowned::DeviceIdNotAllowed { index } => (
            gateway(index, "is only allowed with a user key (gateway mode)").into(),
            Some(Reason::Invalid),
        ),
        Unowned::DeviceIdRequired { index } => (
            gateway(index, "is required with a user key (gateway mode)").into(),
            Some(Reason::Invalid),
        ),
        Unowned::NotOwned => (ApiError::NotFound, Some(Reason::UnknownDevice)),
        Unowned::Registry(e) => (e.into(), None),
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
    let intake = &state.intake;
    let mut rejector = Rejector {
        intake,
        device: None,
    };
    let principal = match authenticate(&state, &headers, peer).await {
        Ok(Principal::Admin) => Err(ApiError::Unauthorized),
        other => other,
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => {
            let reason = auth_reason(&e);
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
    let decoded = match intake.decode(&body, format, received_ms) {
        Ok(d) => d,
        Err(e) => {
            let (events, reason) = (e.events(), e.reason());
            return Err(rejector.reject(e.into(), reason, events).await);
        }
    };
    let accepted = decoded.len();
    if accepted == 0 {
        return Ok(Json(Accepted { accepted: 0 }));
    }
    let records = match intake.records(principal, decoded, received_ms).await {
        Ok(records) => records,
        Err(e) => {
            return Err(match unowned(e, accepted) {
                (err, Some(reason)) => rejector.reject(err, reason, accepted).await,
                (err, None) => err,
            })
        }
    };
    if let Err((device, limited)) = intake.admit(&records, received_ms).await {
        let r = Rejector {
            intake,
            device: Some(device),
        };
        return Err(r
            .reject(limited.into(), Reason::RateLimited, accepted)
            .await);
    }
    let ack = match intake.pipeline.try_submit(records) {
        Ok(ack) => ack,
        Err(e) => {
            return Err(rejector
                .reject(e.into(), Reason::Overloaded, accepted)
                .await)
        }
    };
    intake.stored(Source::Http, ack, accepted as u64).await?;
    Ok(Json(Accepted { accepted }))
}
