//! Operations commands of the `iotpipe` binary (export, and the others of
//! `docs/operations.md`): each reads the same settings as `serve`, opens the
//! configured backends itself, reports progress on stderr and ends with a summary.
//!
//! They sit above every other module (they use the store, the registry, the query
//! encoders and the topology's openers) and nothing below imports them.

pub mod export;
pub mod progress;

use crate::config::Config;
use crate::registry::SharedRegistry;
use crate::store::SharedStore;
use crate::topology::{self, StartError};

/// Why an operations command failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(
        "the data directory {0} is in use by a running server; stop it first, or read \
         through its HTTP API"
    )]
    InUse(String),
    #[error("{0}")]
    Failed(String),
}

/// The configured event store, opened by a command. The embedded store can be opened
/// by one process only (fjall locks its directory), so a running server is named as
/// the reason instead of the engine's bare "Locked".
///
/// # Errors
///
/// The directory is in use, or the store cannot be opened.
pub async fn open_store(config: &Config) -> Result<SharedStore, OpsError> {
    match topology::open_store(config).await {
        Ok(store) => Ok(store),
        Err(StartError::Store(e))
            if config.store.scylla_nodes.is_none() && e.to_string().contains("Locked") =>
        {
            Err(OpsError::InUse(config.data_dir.display().to_string()))
        }
        Err(e) => Err(e.into()),
    }
}

/// The configured registry.
///
/// # Errors
///
/// It cannot be reached or migrated.
pub async fn open_registry(config: &Config) -> Result<SharedRegistry, OpsError> {
    Ok(topology::open_registry(config).await?)
}
