//! What `iotpipe transfer` checks before it writes anything: the target is another
//! set of backends than the source, reachable, and either empty or holding only a
//! part of this very source (an earlier run that was interrupted).
//!
//! "Part of this source" is decided by the data itself, with no marker to trust:
//! every user of the target registry must be a source user with the same id, name
//! and API-key hash (a random 256-bit secret's hash: another deployment's users
//! cannot match), every target device a source device with the same owner and token
//! hash, and every device with events on the target a device with events on the
//! source.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use super::{open_registry, open_store, OpsError};
use crate::config::Config;
use crate::model::{DeviceId, UserId};
use crate::registry::dump::RegistryDump;
use crate::registry::sqlite::SqliteRegistry;
use crate::registry::SharedRegistry;
use crate::store::SharedStore;
use crate::topology;

/// Both sides, opened and checked.
pub struct Sides {
    pub source: SharedStore,
    pub target: SharedStore,
    pub source_registry: SharedRegistry,
    pub target_registry: SharedRegistry,
    /// The source registry, as it will be loaded into the target.
    pub registry: RegistryDump,
    /// The source's devices with events.
    pub devices: Vec<(UserId, DeviceId)>,
}

fn refused(reason: String) -> OpsError {
    OpsError::Failed(format!(
        "the target is refused, nothing was written: {reason}"
    ))
}

/// Where a configuration keeps its events, for comparing two of them.
fn store_place(c: &Config) -> String {
    match &c.store.scylla_nodes {
        Some(nodes) => format!("cassandra {nodes} keyspace {}", c.store.keyspace),
        None => format!(
            "embedded {}",
            std::path::absolute(&c.data_dir)
                .unwrap_or_else(|_| c.data_dir.clone())
                .display()
        ),
    }
}

fn registry_place(c: &Config) -> String {
    let url = c
        .registry
        .url
        .clone()
        .unwrap_or_else(|| SqliteRegistry::default_url(&c.data_dir));
    match url.strip_prefix("sqlite://") {
        Some(path) => std::path::absolute(PathBuf::from(path))
            .map(|p| format!("sqlite://{}", p.display()))
            .unwrap_or(url),
        None => url,
    }
}

/// Opens both sides and checks the target.
///
/// # Errors
///
/// The target is the source, cannot be reached, or holds another deployment's data;
/// or the source cannot be opened.
pub async fn check_target(source: &Config, target: &Config) -> Result<Sides, OpsError> {
    if store_place(source) == store_place(target) {
        return Err(refused(format!(
            "it keeps its events where the source does ({})",
            store_place(source)
        )));
    }
    if registry_place(source) == registry_place(target) {
        return Err(refused(format!(
            "it uses the source's registry ({})",
            registry_place(source)
        )));
    }
    let source_store = open_store(source).await?;
    let source_registry = open_registry(source).await?;

    // The target's schema (registry tables, keyspace and tables), as `iotpipe
    // migrate` applies it; an unreachable backend fails here.
    topology::migrate(target)
        .await
        .map_err(|e| refused(format!("it cannot be reached or prepared: {e}")))?;
    let target_store = open_store(target)
        .await
        .map_err(|e| refused(format!("its event store: {e}")))?;
    let target_registry = open_registry(target)
        .await
        .map_err(|e| refused(format!("its registry: {e}")))?;

    let failed = |what: &str, e: &dyn std::fmt::Display| OpsError::Failed(format!("{what}: {e}"));
    let registry = source_registry
        .dump()
        .await
        .map_err(|e| failed("source registry", &e))?;
    let there = target_registry
        .dump()
        .await
        .map_err(|e| refused(format!("its registry cannot be read: {e}")))?;
    let users: HashMap<_, _> = registry.users.iter().map(|u| (u.id, u)).collect();
    for u in &there.users {
        if users.get(&u.id) != Some(&u) {
            return Err(refused(format!(
                "its registry holds user {:?} (id {}), who is not this source's: it belongs to \
                 another deployment",
                u.username, u.id
            )));
        }
    }
    let devices: HashMap<_, _> = registry.devices.iter().map(|d| (d.device.id, d)).collect();
    for d in &there.devices {
        if devices.get(&d.device.id) != Some(&d) {
            return Err(refused(format!(
                "its registry holds device {}, which is not this source's",
                d.device.id
            )));
        }
    }
    let stored = source_store
        .stored_devices()
        .await
        .map_err(|e| failed("source store", &e))?;
    let ours: HashSet<_> = stored.iter().copied().collect();
    let theirs = target_store
        .stored_devices()
        .await
        .map_err(|e| refused(format!("its event store cannot be read: {e}")))?;
    if let Some((user, device)) = theirs.iter().find(|d| !ours.contains(d)) {
        return Err(refused(format!(
            "its event store holds events of device {device} (user {user}), which has none \
             here: it belongs to another deployment"
        )));
    }
    Ok(Sides {
        source: source_store,
        target: target_store,
        source_registry,
        target_registry,
        registry,
        devices: stored,
    })
}
