//! `iotpipe backup <dir>`: a consistent copy of an embedded deployment, taken while
//! it serves and ingests.
//!
//! Order, and why:
//! 1. The event store: a fjall snapshot, taken by the running server through `POST
//!    /v1/admin/snapshot` (only the process holding the directory can read it
//!    consistently), or by this command when no server holds the directory.
//! 2. The registry, after the events: a device created meanwhile is then only in the
//!    registry (a device without events, which is normal), never only in the events.
//!    SQLite's `VACUUM INTO` writes a consistent copy through its own locking, beside
//!    the running server.
//! 3. The admin token, so that the restored server answers to the same one.
//! 4. The manifest, last (see `manifest.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};

use super::manifest::{self, Manifest, ADMIN_TOKEN_FILE, EVENTS_DIR, FORMAT, REGISTRY_FILE};
use super::{embedded_only, open_store, progress, sqlite_registry, OpsError};
use crate::config::Config;
use crate::model::{format_ms, now_ms};

#[derive(Debug, Clone)]
pub struct BackupArgs {
    pub dir: PathBuf,
    /// The running server's base URL; default: from `http.addr`.
    pub server: Option<String>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> OpsError {
    OpsError::Failed(format!("{what}: {e}"))
}

/// Runs the backup; returns its manifest.
///
/// # Errors
///
/// Production backends configured, a target that is not empty, no embedded store
/// in the data directory, or any step failing (the manifest is then not written).
pub async fn run(config: &Config, args: &BackupArgs) -> Result<Manifest, OpsError> {
    embedded_only(config, "backup")?;
    let registry = sqlite_registry(config)?;
    let dir = std::path::absolute(&args.dir).map_err(|e| failed("<dir>", e))?;
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(OpsError::Failed(format!(
            "<dir>: {} is not empty; a backup goes into a new directory",
            dir.display()
        )));
    }
    if !config.data_dir.join(EVENTS_DIR).is_dir() {
        return Err(OpsError::Failed(format!(
            "no embedded store in {} (IOTPIPE_DATA_DIR)",
            config.data_dir.display()
        )));
    }
    std::fs::create_dir_all(&dir).map_err(|e| failed(&dir.display().to_string(), e))?;
    let started = Instant::now();
    let started_ms = now_ms();
    let bar = progress::bar(None, "copying the event store");

    let target = dir.join(EVENTS_DIR);
    let keyspaces = match open_store(config).await {
        Ok(store) => {
            let copied = store.snapshot_into(target).await;
            let _ = store.close().await;
            copied.map_err(|e| failed("event store", e))?
        }
        Err(OpsError::InUse(_)) => through_server(config, args, &target).await?,
        Err(e) => return Err(e),
    };
    bar.finish_and_clear();

    let out = dir.join(REGISTRY_FILE);
    let mut conn = SqliteConnectOptions::new()
        .filename(&registry)
        .create_if_missing(false)
        .connect()
        .await
        .map_err(|e| failed(&format!("registry {}", registry.display()), e))?;
    sqlx::query("VACUUM INTO ?")
        .bind(out.display().to_string())
        .execute(&mut conn)
        .await
        .map_err(|e| failed("copying the registry", e))?;
    conn.close().await.ok();
    std::fs::File::open(&out)
        .and_then(|f| f.sync_all())
        .map_err(|e| failed("syncing the registry copy", e))?;

    let token = config.data_dir.join(ADMIN_TOKEN_FILE);
    let admin_token = token.is_file();
    if admin_token {
        let copy = dir.join(ADMIN_TOKEN_FILE);
        std::fs::copy(&token, &copy).map_err(|e| failed("copying the admin token", e))?;
        std::fs::File::open(&copy)
            .and_then(|f| f.sync_all())
            .map_err(|e| failed("syncing the admin token", e))?;
    }
    manifest::sync_dir(&dir)?;

    let manifest = Manifest {
        format: FORMAT,
        iotpipe_version: env!("CARGO_PKG_VERSION").to_owned(),
        snapshot_started: format_ms(started_ms),
        finished: format_ms(now_ms()),
        bucket_len_ms: config.pipeline.bucket_len_ms,
        keyspaces,
        admin_token,
    };
    manifest::write(&dir, &manifest)?;
    eprintln!(
        "backup complete: {} events ({} keys in {} keyspaces), the registry{} in {} ({:.1}s)",
        manifest.events(),
        manifest.keyspaces.values().sum::<u64>(),
        manifest.keyspaces.len(),
        if admin_token {
            " and the admin token"
        } else {
            ""
        },
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}

/// The base URL of the server of these settings: its HTTP address, with a wildcard
/// host replaced by loopback (the server is on this host: it holds the directory).
fn server_url(config: &Config, args: &BackupArgs) -> Result<String, OpsError> {
    if let Some(url) = &args.server {
        return Ok(url.trim_end_matches('/').to_owned());
    }
    let mut addr: SocketAddr = config.http.addr.parse().map_err(|_| {
        OpsError::Failed(format!(
            "IOTPIPE_HTTP_ADDR={} is not an address to reach the server at; pass --server",
            config.http.addr
        ))
    })?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("http://{addr}"))
}

/// The admin token, as the server reads it.
fn admin_token(config: &Config) -> Result<String, OpsError> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    std::fs::read_to_string(&path)
        .map(|t| t.trim().to_owned())
        .map_err(|e| failed(&format!("the admin token ({})", path.display()), e))
}

async fn through_server(
    config: &Config,
    args: &BackupArgs,
    target: &Path,
) -> Result<manifest::KeyCounts, OpsError> {
    let url = format!("{}/v1/admin/snapshot", server_url(config, args)?);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| failed("HTTP client", e))?;
    let resp = client
        .post(&url)
        .bearer_auth(admin_token(config)?)
        .json(&serde_json::json!({ "dir": target }))
        .send()
        .await
        .map_err(|e| failed(&format!("the running server at {url}"), e))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        return Err(OpsError::Failed(format!(
            "the running server refused the snapshot ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        )));
    }
    serde_json::from_value(body["keyspaces"].clone())
        .map_err(|e| failed("the server's snapshot answer", e))
}
