//! The manifest of a backup: written last, so that a directory without one is a
//! backup that was interrupted (or is still being written), never one that looks
//! complete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::OpsError;

pub const MANIFEST: &str = "MANIFEST.json";
/// The layout this build writes and reads.
pub const FORMAT: u32 = 1;
/// Where a backup keeps each part, under its directory.
pub const EVENTS_DIR: &str = "events";
pub const REGISTRY_FILE: &str = "registry.db";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Keys per event-store keyspace.
pub type KeyCounts = BTreeMap<String, u64>;

/// What a complete backup holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub iotpipe_version: String,
    /// When the event store's snapshot was asked for: every event acknowledged
    /// before this instant is in the backup.
    pub snapshot_started: String,
    pub finished: String,
    /// The store's key layout depends on it; a restore needs the same setting.
    pub bucket_len_ms: i64,
    /// Keys per event-store keyspace (`events` holds one key per event).
    pub keyspaces: KeyCounts,
    pub admin_token: bool,
}

impl Manifest {
    pub fn events(&self) -> u64 {
        self.keyspaces.get("events").copied().unwrap_or(0)
    }
}

fn io(what: &Path, e: std::io::Error) -> OpsError {
    OpsError::Failed(format!("{}: {e}", what.display()))
}

/// Writes the manifest durably and atomically: a temporary file, synced, renamed
/// over, and the directory synced, so that it is either absent or whole.
///
/// # Errors
///
/// The file could not be written.
pub fn write(dir: &Path, manifest: &Manifest) -> Result<(), OpsError> {
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let text = serde_json::to_string_pretty(manifest)
        .map_err(|e| OpsError::Failed(format!("encoding the manifest: {e}")))?;
    let mut file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    file.write_all(text.as_bytes()).map_err(|e| io(&tmp, e))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, dir.join(MANIFEST)).map_err(|e| io(dir, e))?;
    sync_dir(dir)
}

/// Makes a directory's entries (new files, renames) durable.
///
/// # Errors
///
/// The directory could not be synced.
pub fn sync_dir(dir: &Path) -> Result<(), OpsError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Reads the manifest of a complete backup.
///
/// # Errors
///
/// There is none (the backup is incomplete), or it is not one this build reads.
pub fn read(dir: &Path) -> Result<Manifest, OpsError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(OpsError::Failed(format!(
                "{} has no {MANIFEST}: it is not a complete backup (interrupted, or still \
                 being written)",
                dir.display()
            )))
        }
        Err(e) => return Err(io(&path, e)),
    };
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| OpsError::Failed(format!("{}: {e}", path.display())))?;
    if manifest.format != FORMAT {
        return Err(OpsError::Failed(format!(
            "{}: backup format {} (this build reads {FORMAT})",
            path.display(),
            manifest.format
        )));
    }
    Ok(manifest)
}
