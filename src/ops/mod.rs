//! Operations commands of the `iotpipe` binary (export, and the others of
//! `docs/operations.md`): each reads the same settings as `serve`, opens the
//! configured backends itself, reports progress on stderr and ends with a summary.
//!
//! They sit above every other module (they use the store, the registry, the query
//! encoders and the topology's openers) and nothing below imports them.

pub mod backup;
pub mod check;
pub mod export;
pub mod manifest;
pub mod progress;
pub mod rebuild_live;
pub mod restore;
pub mod transfer;
pub mod transfer_target;

use std::path::PathBuf;

use crate::config::Config;
use crate::registry::sqlite::SqliteRegistry;
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

/// Refuses a command that works on the embedded backends only.
///
/// # Errors
///
/// A cluster store is configured.
pub fn embedded_only(config: &Config, command: &str) -> Result<(), OpsError> {
    if config.store.scylla_nodes.is_some() {
        return Err(OpsError::Failed(format!(
            "`iotpipe {command}` is for the embedded store, and IOTPIPE_SCYLLA_NODES is set; \
             docs/operations.md gives the procedure for Cassandra/ScyllaDB and MySQL"
        )));
    }
    Ok(())
}

/// The file of the SQLite registry these settings use.
///
/// # Errors
///
/// The registry is not SQLite.
pub fn sqlite_registry(config: &Config) -> Result<PathBuf, OpsError> {
    let url = config
        .registry
        .url
        .clone()
        .unwrap_or_else(|| SqliteRegistry::default_url(&config.data_dir));
    url.strip_prefix("sqlite://")
        .map(|p| PathBuf::from(p.split('?').next().unwrap_or(p)))
        .ok_or_else(|| {
            OpsError::Failed(format!(
                "IOTPIPE_REGISTRY_URL is not a SQLite file ({url}); back up MySQL with \
                 mysqldump (docs/operations.md)"
            ))
        })
}
