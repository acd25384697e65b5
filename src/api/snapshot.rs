//! `POST /v1/admin/snapshot` (admin token): the event store's half of `iotpipe
//! backup` for a running embedded server.
//!
//! Why through the server: fjall lets one process open a data directory, and a copy
//! of its files taken from outside while it writes is not consistent. The server
//! holds the store, so it takes the snapshot (see `store/embedded/backup.rs`) and
//! writes the copy into a directory on its own host, named by the caller; the
//! command then adds the registry and the manifest. The body is `{"dir": "/abs/path"}`
//! (new or empty); the answer, once the copy is synced, `{"keyspaces": {name: keys}}`.

use std::path::PathBuf;

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::http::auth::Caller;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::{json_body, AppState};
use crate::store::StoreError;

/// Where the server writes the copy.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SnapshotRequest {
    /// An absolute path on the server's host, new or empty.
    #[schema(value_type = String)]
    dir: PathBuf,
}

#[utoipa::path(
    post,
    path = "/v1/admin/snapshot",
    operation_id = "snapshotStore",
    tag = "operations",
    security(("adminToken" = [])),
    request_body = SnapshotRequest,
    responses(
        (status = 200, description = "The copy is synced: keys copied per keyspace", body = Object),
        (status = 400, description = "A bad body, or a directory that is relative or not empty, or a store that cannot (Cassandra)", body = ErrorBody),
    )
)]
pub(super) async fn snapshot(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    caller.admin()?;
    let req: SnapshotRequest = json_body(body)?;
    if !req.dir.is_absolute() {
        return Err(ApiError::field("dir", "must be an absolute path"));
    }
    tracing::info!(dir = %req.dir.display(), "taking a snapshot of the event store");
    match state.store.snapshot_into(req.dir).await {
        Ok(keyspaces) => Ok(Json(json!({ "keyspaces": keyspaces }))),
        // Refusals (a non-empty directory, a store that cannot) are the caller's to fix.
        Err(StoreError::Invalid(reason)) => Err(ApiError::field("dir", reason)),
        Err(e) => Err(e.into()),
    }
}
