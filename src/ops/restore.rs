//! `iotpipe restore <dir>`: a complete backup into an empty data directory.
//!
//! Everything is copied into a staging directory beside the data directory, checked
//! there (the store opens with these settings and holds the keys the manifest
//! counts; the registry passes SQLite's integrity check), and only then renamed into
//! place. An interrupted restore therefore leaves the staging directory (removed by
//! the next attempt), never a data directory that looks restored.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::manifest::{self, Manifest, ADMIN_TOKEN_FILE, EVENTS_DIR, REGISTRY_FILE};
use super::{embedded_only, progress, sqlite_registry, OpsError};
use crate::config::Config;
use crate::store::embedded::EmbeddedStore;
use crate::store::EventStore;

fn failed(what: &Path, e: impl std::fmt::Display) -> OpsError {
    OpsError::Failed(format!("{}: {e}", what.display()))
}

fn is_empty_or_absent(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut d) => d.next().is_none(),
        Err(_) => !path.exists(),
    }
}

/// Copies a directory tree, syncing every file; returns the bytes copied.
fn copy_tree(from: &Path, to: &Path, bar: &indicatif::ProgressBar) -> Result<u64, OpsError> {
    std::fs::create_dir_all(to).map_err(|e| failed(to, e))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).map_err(|e| failed(from, e))? {
        let entry = entry.map_err(|e| failed(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| failed(&src, e))?.is_dir() {
            bytes += copy_tree(&src, &dst, bar)?;
        } else {
            let n = std::fs::copy(&src, &dst).map_err(|e| failed(&src, e))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| failed(&dst, e))?;
            bar.inc(n);
            bytes += n;
        }
    }
    manifest::sync_dir(to)?;
    Ok(bytes)
}

fn tree_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => tree_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// Runs the restore; returns the backup's manifest.
///
/// # Errors
///
/// Production backends configured, an incomplete backup, a data directory (or
/// registry file) that is not empty, other settings than the backup's, or a copy
/// that does not verify.
pub async fn run(config: &Config, backup: &Path) -> Result<Manifest, OpsError> {
    embedded_only(config, "restore")?;
    let registry = sqlite_registry(config)?;
    let started = Instant::now();
    let manifest = manifest::read(backup)?;
    let data_dir =
        std::path::absolute(&config.data_dir).map_err(|e| failed(&config.data_dir, e))?;
    if !is_empty_or_absent(&data_dir) {
        return Err(OpsError::Failed(format!(
            "IOTPIPE_DATA_DIR={} is not empty; a restore goes into an empty data directory \
             only (move the old one away first)",
            data_dir.display()
        )));
    }
    if manifest.bucket_len_ms != config.pipeline.bucket_len_ms {
        return Err(OpsError::Failed(format!(
            "the backup was taken with a bucket of {} ms and these settings use {} ms; set \
             store.bucket back in the settings file",
            manifest.bucket_len_ms, config.pipeline.bucket_len_ms
        )));
    }
    // The registry goes with the data directory when it lives inside it (the
    // default); a file configured elsewhere must not exist yet either.
    let registry_inside = registry.starts_with(&data_dir);
    if !registry_inside && registry.exists() {
        return Err(OpsError::Failed(format!(
            "IOTPIPE_REGISTRY_URL names {}, which exists; a restore does not overwrite it",
            registry.display()
        )));
    }

    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    let staging = data_dir.with_file_name(format!(".{name}.restoring"));
    if staging.exists() {
        // What an interrupted restore left: never served from, so removed.
        std::fs::remove_dir_all(&staging).map_err(|e| failed(&staging, e))?;
    }
    let bar = progress::bar(Some(tree_bytes(backup)), "bytes");
    let mut bytes = copy_tree(&backup.join(EVENTS_DIR), &staging.join(EVENTS_DIR), &bar)?;
    let registry_copy = match registry_inside {
        true => staging.join(
            registry
                .strip_prefix(&data_dir)
                .unwrap_or(Path::new(REGISTRY_FILE)),
        ),
        false => registry.clone(),
    };
    if let Some(parent) = registry_copy.parent() {
        std::fs::create_dir_all(parent).map_err(|e| failed(parent, e))?;
    }
    let src = backup.join(REGISTRY_FILE);
    bytes += std::fs::copy(&src, &registry_copy).map_err(|e| failed(&src, e))?;
    std::fs::File::open(&registry_copy)
        .and_then(|f| f.sync_all())
        .map_err(|e| failed(&registry_copy, e))?;
    if manifest.admin_token {
        let src = backup.join(ADMIN_TOKEN_FILE);
        bytes +=
            std::fs::copy(&src, staging.join(ADMIN_TOKEN_FILE)).map_err(|e| failed(&src, e))?;
    }
    bar.finish_and_clear();

    verify(config, &manifest, &staging, &registry_copy).await?;

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // As `serve` creates it: it holds every event and the hashed secrets.
        let _ = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700));
    }
    if data_dir.exists() {
        std::fs::remove_dir(&data_dir).map_err(|e| failed(&data_dir, e))?;
    }
    std::fs::rename(&staging, &data_dir).map_err(|e| failed(&data_dir, e))?;
    if let Some(parent) = data_dir.parent() {
        manifest::sync_dir(parent)?;
    }
    eprintln!(
        "restore complete: {} events and the registry from {} (taken {}) into {} ({} bytes, {:.1}s)",
        manifest.events(),
        backup.display(),
        manifest.snapshot_started,
        data_dir.display(),
        bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

/// The copy opens with these settings and holds what the manifest counts.
async fn verify(
    config: &Config,
    manifest: &Manifest,
    staging: &Path,
    registry: &PathBuf,
) -> Result<(), OpsError> {
    let events = staging.join(EVENTS_DIR);
    let store = EmbeddedStore::open(&events, config.pipeline.bucket_len_ms)
        .map_err(|e| failed(&events, e))?;
    let counts = store.key_counts().map_err(|e| failed(&events, e))?;
    store.close().await.map_err(|e| failed(&events, e))?;
    drop(store);
    for (name, want) in &manifest.keyspaces {
        let got = counts.get(name).copied().unwrap_or(0);
        if got != *want {
            return Err(OpsError::Failed(format!(
                "the restored keyspace {name} holds {got} keys, the backup {want}: not restored"
            )));
        }
    }
    let mut conn = SqliteConnectOptions::new()
        .filename(registry)
        .create_if_missing(false)
        .connect()
        .await
        .map_err(|e| failed(registry, e))?;
    let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| failed(registry, e))?;
    conn.close().await.ok();
    if check != "ok" {
        return Err(failed(registry, format!("integrity check: {check}")));
    }
    Ok(())
}
