//! `iotpipe rebuild-live`: live totals recomputed from the event store into the
//! configured live backend, after Redis lost them (or was replaced).
//!
//! In-process live figures belong to the server process: a command cannot reach
//! them, and the server recomputes them itself at every start-up (`topology.rs`).
//! So this command is for Redis, and says so otherwise.

use std::time::Instant;

use super::{open_store, progress, OpsError};
use crate::config::Config;
use crate::query::totals::live_totals;
use crate::topology;

/// What was rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildSummary {
    pub devices: u64,
    pub users: u64,
    pub events: u64,
}

/// Runs the rebuild.
///
/// # Errors
///
/// No Redis configured, a store that cannot be opened (an embedded one held by a
/// running server), or a backend failing.
pub async fn run(config: &Config) -> Result<RebuildSummary, OpsError> {
    if config.live.redis_url.is_none() {
        return Err(OpsError::Failed(
            "live figures are kept in the server process here (IOTPIPE_REDIS_URL is not \
             set): the server recomputes them from the store at every start-up, so restart \
             it instead"
                .to_owned(),
        ));
    }
    let started = Instant::now();
    let store = open_store(config).await?;
    let (live, _) = topology::open_live(config)?;
    let devices = store
        .stored_devices()
        .await
        .map_err(|e| OpsError::Failed(format!("event store: {e}")))?;
    let bar = progress::bar(Some(devices.len() as u64), "devices");
    let totals = live_totals(store.as_ref(), config.pipeline.bucket_len_ms, || bar.inc(1)).await;
    bar.finish_and_clear();
    let _ = store.close().await;
    let totals = totals.map_err(|e| OpsError::Failed(format!("event store: {e}")))?;
    live.set_totals(&totals)
        .await
        .map_err(|e| OpsError::Failed(format!("live backend: {e}")))?;
    let users: std::collections::HashSet<_> = totals.iter().map(|t| t.user_id).collect();
    let summary = RebuildSummary {
        devices: totals.len() as u64,
        users: users.len() as u64,
        events: totals.iter().map(|t| t.events).sum(),
    };
    eprintln!(
        "rebuilt the live totals of {} devices of {} users ({} events) in {:.1}s",
        summary.devices,
        summary.users,
        summary.events,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}
