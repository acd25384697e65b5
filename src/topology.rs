//! Wiring: builds the backends from the configuration, starts consumers before
//! producers, and stops in the reverse order.
//!
//! Start: store → registry → live → pipeline (batcher, writer) → listeners (HTTP, the
//! built-in MQTT endpoint, the external broker subscriber).
//! Stop: listeners stop taking work and MQTT sends the acks still due → the pipeline
//! flushes its partial batches and drains the writer → the store syncs and closes.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState, MqttStatus, RequestLimits};
use crate::config::Config;
use crate::ingest::mqtt::external::ExternalSettings;
use crate::ingest::mqtt::{self, MqttContext, MqttError, MqttLimits};
use crate::live::local::LocalLive;
use crate::live::{RateLimits, SharedLive};
use crate::pipeline;
use crate::registry::auth::Auth;
use crate::registry::secrets::{self, SecretKind};
use crate::registry::sqlite::SqliteRegistry;
use crate::registry::{RegistryError, SharedRegistry};
use crate::store::embedded::EmbeddedStore;
use crate::store::{SharedStore, StoreError};
use crate::telemetry::Telemetry;

/// Why iotpipe could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} ({source}); set {setting} to a free address")]
    Bind {
        addr: String,
        setting: &'static str,
        source: std::io::Error,
    },
    #[error("event store: {0}")]
    Store(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("MQTT: {0}")]
    Mqtt(#[from] MqttError),
    #[error("{0}")]
    Unsupported(String),
}

/// A running instance.
pub struct Server {
    pub http_addr: SocketAddr,
    /// Where the built-in MQTT endpoint listens; `None` when it is off.
    pub mqtt_addr: Option<SocketAddr>,
    pub admin_token: String,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    /// A token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops gracefully: every event acknowledged so far is durable when this returns.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "server task failed");
        }
    }
}

/// The admin token: configured, or read from (or generated into) `DATA_DIR/admin.token`.
fn admin_token(config: &Config) -> Result<String, StartError> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = config.data_dir.join("admin.token");
    let dir_err = |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(dir_err(e)),
    }
    let token = secrets::generate(SecretKind::Admin);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(dir_err)?;
    writeln!(file, "{token}").map_err(dir_err)?;
    file.sync_all().map_err(dir_err)?;
    tracing::info!(path = %path.display(), "generated the admin token");
    Ok(token)
}

fn ensure_data_dir(dir: &Path) -> Result<(), StartError> {
    std::fs::create_dir_all(dir).map_err(|source| StartError::DataDir {
        path: dir.display().to_string(),
        source,
    })
}

fn open_store(config: &Config) -> Result<SharedStore, StartError> {
    if config.store.scylla_nodes.is_some() {
        return Err(StartError::Unsupported(
            "IOTPIPE_SCYLLA_NODES is set, but this build has no ScyllaDB store yet; unset it \
             to use the embedded store"
                .into(),
        ));
    }
    let store = EmbeddedStore::open(
        &config.data_dir.join("events"),
        config.pipeline.bucket_len_ms,
    )?;
    Ok(Arc::new(store))
}

async fn open_registry(config: &Config) -> Result<SharedRegistry, StartError> {
    let url = config
        .registry
        .url
        .clone()
        .unwrap_or_else(|| SqliteRegistry::default_url(&config.data_dir));
    if !url.starts_with("sqlite:") {
        return Err(StartError::Unsupported(format!(
            "IOTPIPE_REGISTRY_URL={url}: this build supports only sqlite:// registries"
        )));
    }
    let registry = SqliteRegistry::connect(&url).await?;
    registry.migrate().await?;
    Ok(Arc::new(registry))
}

fn open_live(config: &Config) -> Result<SharedLive, StartError> {
    if config.live.redis_url.is_some() {
        return Err(StartError::Unsupported(
            "IOTPIPE_REDIS_URL is set, but this build has no Redis backend yet; unset it to use \
             in-process counters and limits"
                .into(),
        ));
    }
    Ok(Arc::new(LocalLive::new(RateLimits {
        device_per_sec: config.limits.device_per_sec,
        user_per_sec: config.limits.user_per_sec,
    })))
}

/// Applies the registry migrations (and, later, the CQL schema) for the configured
/// backends, then returns.
///
/// # Errors
///
/// As [`start`].
pub async fn migrate(config: &Config) -> Result<(), StartError> {
    ensure_data_dir(&config.data_dir)?;
    open_registry(config).await?;
    Ok(())
}

async fn bind(addr: &str, setting: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            addr: addr.to_owned(),
            setting,
            source,
        })
}

/// Starts every component and returns once the listeners are bound.
///
/// # Errors
///
/// A backend that cannot be opened, or an address that cannot be bound.
pub async fn start(config: Config) -> Result<Server, StartError> {
    ensure_data_dir(&config.data_dir)?;
    let admin_token = admin_token(&config)?;
    let store = open_store(&config)?;
    let registry = open_registry(&config).await?;
    let live = open_live(&config)?;
    let telemetry = Telemetry::new();
    let auth = Arc::new(Auth::new(
        registry,
        &admin_token,
        Duration::from_secs(config.registry.cache_ttl_secs),
    ));

    // Producers are bound before the consumers start, so a taken port fails start-up
    // without leaving pipeline tasks behind.
    let http = bind(&config.http.addr, "IOTPIPE_HTTP_ADDR").await?;
    let http_addr = http.local_addr().map_err(|source| StartError::Bind {
        addr: config.http.addr.clone(),
        setting: "IOTPIPE_HTTP_ADDR",
        source,
    })?;
    let mqtt_listener = match config.mqtt_listener() {
        None => None,
        Some(addr) => Some(bind(addr, "IOTPIPE_MQTT_ADDR").await?),
    };
    let mqtt_addr = match &mqtt_listener {
        None => None,
        Some(l) => Some(l.local_addr().map_err(|source| StartError::Bind {
            addr: config.mqtt.addr.clone(),
            setting: "IOTPIPE_MQTT_ADDR",
            source,
        })?),
    };
    let broker = ExternalSettings::from_config(&config)?;
    // The external component is ok only while connected; the built-in one while it
    // listens, which is as long as the server runs.
    let mqtt = match (&mqtt_listener, &broker) {
        (None, None) => MqttStatus::new("off", true),
        (Some(_), None) => MqttStatus::new("builtin", true),
        (None, Some(_)) => MqttStatus::new("external", false),
        (Some(_), Some(_)) => MqttStatus::new("builtin+external", false),
    };

    let (pipeline, pipeline_tasks) = pipeline::spawn(
        &config.pipeline,
        store.clone(),
        live.clone(),
        telemetry.clone(),
    );
    let shutdown = CancellationToken::new();
    let mqtt_ctx = MqttContext {
        auth: auth.clone(),
        live: live.clone(),
        pipeline: pipeline.clone(),
        telemetry: telemetry.clone(),
        limits: MqttLimits {
            max_payload_bytes: config.http.max_body_bytes,
            max_events: config.http.max_events_per_request,
            max_inflight: config.mqtt.max_inflight,
            max_connections: config.mqtt.max_connections,
            connect_timeout: Duration::from_secs(config.mqtt.connect_timeout_secs),
        },
        shutdown: shutdown.clone(),
    };
    let mut mqtt_tasks = Vec::new();
    if let Some(listener) = mqtt_listener {
        tracing::info!(addr = ?mqtt_addr, "built-in MQTT endpoint listening");
        mqtt_tasks.push(tokio::spawn(mqtt::server::run(listener, mqtt_ctx.clone())));
    }
    if let Some(broker) = broker {
        mqtt_tasks.push(tokio::spawn(mqtt::external::run(
            broker,
            mqtt_ctx,
            mqtt.clone(),
        )));
    }
    let state = AppState {
        auth,
        store: store.clone(),
        live,
        pipeline,
        telemetry,
        limits: RequestLimits {
            max_body_bytes: config.http.max_body_bytes,
            max_events: config.http.max_events_per_request,
        },
        ingest_slots: Arc::new(Semaphore::new(config.http.max_inflight_requests)),
        bucket_len_ms: config.pipeline.bucket_len_ms,
        mqtt,
    };
    let stop = shutdown.clone();
    let app = api::router(state);
    tracing::info!(%http_addr, "HTTP API listening");
    let task = tokio::spawn(async move {
        let served = axum::serve(http, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "HTTP server failed");
        }
        // The MQTT sources stop reading and send the acks still due while the
        // pipeline still runs; only then is the pipeline drained.
        stop.cancel();
        for task in mqtt_tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "MQTT task failed");
            }
        }
        pipeline_tasks.shutdown().await;
        if let Err(e) = store.close().await {
            tracing::error!(error = %e, "closing the event store failed");
        }
        tracing::info!("stopped");
    });
    Ok(Server {
        http_addr,
        mqtt_addr,
        admin_token,
        shutdown,
        task,
    })
}
