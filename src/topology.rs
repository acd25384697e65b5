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

use crate::api;
use crate::config::Config;
use crate::http::{self, AppState, RequestLimits};
use crate::ingest::mqtt::external::ExternalSettings;
use crate::ingest::mqtt::{self, MqttContext, MqttError, MqttLimits, MqttStatus};
use crate::ingest::Intake;
use crate::live::local::LocalLive;
use crate::live::redis::RedisLive;
use crate::live::{LiveError, RateLimits, SharedLive};
use crate::pipeline;
use crate::registry::auth::Auth;
use crate::registry::login_guard::LoginGuard;
use crate::registry::mysql::MySqlRegistry;
use crate::registry::secrets::{self, SecretKind};
use crate::registry::sqlite::SqliteRegistry;
use crate::registry::{RegistryError, SharedRegistry};
use crate::store::embedded::EmbeddedStore;
use crate::store::retention::{self, Retention};
use crate::store::scylla::{ScyllaSettings, ScyllaStore};
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
    #[error("live backend: {0}")]
    Live(#[from] LiveError),
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

/// The shortest admin token accepted from the settings.
const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// The admin token: configured, or read from (or generated into) `DATA_DIR/admin.token`.
fn admin_token(config: &Config) -> Result<String, StartError> {
    if let Some(t) = &config.admin_token {
        // The admin token creates users: a short one could be guessed.
        if t.chars().count() < MIN_ADMIN_TOKEN_CHARS {
            return Err(StartError::Unsupported(format!(
                "IOTPIPE_ADMIN_TOKEN has {} characters; it needs at least \
                 {MIN_ADMIN_TOKEN_CHARS} (or leave it unset to have one generated)",
                t.chars().count()
            )));
        }
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

/// Creates the data dir, readable by this user only: it holds the registry (hashed
/// secrets), the admin token and every event.
pub fn ensure_data_dir(dir: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Makes a file this process created readable by this user only, when it exists.
fn owner_only(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    }
}

/// The configured event store, opened on its own (the operations commands use it too).
///
/// # Errors
///
/// As [`start`].
pub async fn open_store(config: &Config) -> Result<SharedStore, StartError> {
    if config.store.scylla_nodes.is_some() {
        let settings = scylla_settings(config)?;
        return Ok(Arc::new(ScyllaStore::connect(settings).await?));
    }
    let store = EmbeddedStore::open_with(
        &config.data_dir.join("events"),
        config.pipeline.bucket_len_ms,
        Retention::from_config(config),
    )?;
    Ok(Arc::new(store))
}

fn scylla_settings(config: &Config) -> Result<ScyllaSettings, StoreError> {
    let mut settings = ScyllaSettings::from_config(&config.store, config.pipeline.bucket_len_ms)?;
    settings.retention = Retention::from_config(config);
    Ok(settings)
}

/// The configured registry, migrated.
///
/// # Errors
///
/// As [`start`].
pub async fn open_registry(config: &Config) -> Result<SharedRegistry, StartError> {
    let url = config
        .registry
        .url
        .clone()
        .unwrap_or_else(|| SqliteRegistry::default_url(&config.data_dir));
    if url.starts_with("sqlite:") {
        let registry = SqliteRegistry::connect(&url).await?;
        if let Some(path) = url.strip_prefix("sqlite://") {
            for suffix in ["", "-wal", "-shm"] {
                owner_only(Path::new(&format!("{path}{suffix}")));
            }
        }
        registry.migrate().await?;
        Ok(Arc::new(registry))
    } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        let url = url.replacen("mariadb:", "mysql:", 1);
        let registry = MySqlRegistry::connect(&url).await?;
        registry.migrate().await?;
        Ok(Arc::new(registry))
    } else {
        Err(StartError::Unsupported(format!(
            "IOTPIPE_REGISTRY_URL={url}: expected sqlite://PATH or mysql://user:pass@host:port/db"
        )))
    }
}

/// The live backend, and the Redis one again when configured: it also carries the
/// deletion broadcast and its listener.
///
/// # Errors
///
/// As [`start`].
pub fn open_live(config: &Config) -> Result<(SharedLive, Option<Arc<RedisLive>>), StartError> {
    let limits = RateLimits {
        device_per_sec: config.limits.device_per_sec,
        user_per_sec: config.limits.user_per_sec,
    };
    match &config.live.redis_url {
        None => Ok((Arc::new(LocalLive::new(limits)), None)),
        Some(url) => {
            let redis = RedisLive::open(url, &config.live.key_prefix, limits)?;
            Ok((redis.clone(), Some(redis)))
        }
    }
}

/// In-process live figures live only as long as the process: at start-up, before
/// anything is ingested (so that no count can be lost between the reads and the
/// update), their totals are recomputed from the store, so that a restarted server
/// shows the totals it showed before. A store that cannot list its devices leaves
/// them at zero, as before this existed.
async fn restore_live_totals(store: &SharedStore, live: &SharedLive, bucket_len_ms: i64) {
    let started = std::time::Instant::now();
    let totals = crate::query::totals::live_totals(store.as_ref(), bucket_len_ms, || {}).await;
    match totals {
        Ok(totals) => {
            if let Err(e) = live.set_totals(&totals).await {
                tracing::warn!(error = %e, "cannot restore the live totals");
            }
            tracing::info!(
                devices = totals.len(),
                ms = started.elapsed().as_millis() as u64,
                "live totals recomputed from the event store"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "live totals start from zero: cannot read them from the store")
        }
    }
}

/// Applies the registry migrations and, with ScyllaDB configured, creates its
/// keyspace and tables (`cql/schema.cql`), then returns.
///
/// # Errors
///
/// As [`start`].
pub async fn migrate(config: &Config) -> Result<(), StartError> {
    ensure_data_dir(&config.data_dir)?;
    open_registry(config).await?;
    if config.store.scylla_nodes.is_some() {
        let settings = scylla_settings(config)?;
        ScyllaStore::migrate(&settings).await?;
        tracing::info!(keyspace = %settings.keyspace, "ScyllaDB schema applied");
    }
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
    let store = open_store(&config).await?;
    start_with_store(config, store).await
}

/// As [`start`], with an event store built by the caller instead of the configured
/// one (tests wrap a store to make it fail on demand).
///
/// # Errors
///
/// As [`start`].
pub async fn start_with_store(config: Config, store: SharedStore) -> Result<Server, StartError> {
    ensure_data_dir(&config.data_dir)?;
    let admin_token = admin_token(&config)?;
    let registry = open_registry(&config).await?;
    let (live, redis) = open_live(&config)?;
    if redis.is_none() {
        restore_live_totals(&store, &live, config.pipeline.bucket_len_ms).await;
    }
    let telemetry = Telemetry::new();
    let retention = Retention::from_config(&config);
    let mut auth = Auth::new(
        registry,
        &admin_token,
        Duration::from_secs(config.registry.cache_ttl_secs),
        Duration::from_secs(config.registry.stale_limit_secs),
    );
    auth = auth.with_login_guard(LoginGuard::new(config.limits.failed_logins_per_minute));
    if let Some(redis) = &redis {
        auth = auth.with_broadcast(redis.clone());
    }
    let auth = Arc::new(auth);
    let shutdown = CancellationToken::new();
    // Deletions announced by other instances reach this one through this listener.
    let deletions = redis
        .as_ref()
        .map(|r| r.spawn_deletion_listener(auth.clone(), shutdown.child_token()));

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
    let broker = ExternalSettings::from_config(&config.mqtt, &config.data_dir)?;
    // The external component is ok only while connected; the built-in one while it
    // listens, which is as long as the server runs.
    let mqtt = match (&mqtt_listener, &broker) {
        (None, None) => MqttStatus::new("off", true),
        (Some(_), None) => MqttStatus::new("builtin", true),
        (None, Some(_)) => MqttStatus::new("external", false),
        (Some(_), Some(_)) => MqttStatus::new("builtin+external", false),
    };

    let sweeper = (!retention.is_forever()).then(|| {
        let every = Duration::from_secs(config.retention.sweep_every_secs);
        retention::spawn_sweeper(store.clone(), every, shutdown.child_token())
    });
    let (pipeline, pipeline_tasks) = pipeline::spawn(
        &config.pipeline,
        store.clone(),
        live.clone(),
        telemetry.clone(),
    );
    // Both sources share one intake: the same limits, the same counters.
    let intake = Intake {
        auth,
        live,
        pipeline,
        telemetry,
        max_events: config.http.max_events_per_request,
        retention,
    };
    let mqtt_ctx = MqttContext {
        intake: intake.clone(),
        limits: MqttLimits {
            max_payload_bytes: config.http.max_body_bytes,
            max_inflight: config.mqtt.max_inflight,
            max_connections: config.mqtt.max_connections,
            connect_timeout: Duration::from_secs(config.mqtt.connect_timeout_secs),
            max_keep_alive_secs: config.mqtt.max_keep_alive_secs.max(1),
            max_per_device: config.mqtt.max_connections_per_device.max(1),
            max_per_ip: config.mqtt.max_connections_per_ip.max(1),
        },
        shutdown: shutdown.clone(),
        sessions: Default::default(),
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
        intake,
        store: store.clone(),
        limits: RequestLimits {
            max_body_bytes: config.http.max_body_bytes,
            body_timeout: Duration::from_secs(config.http.body_timeout_secs.max(1)),
        },
        ingest_slots: Arc::new(Semaphore::new(config.http.max_inflight_requests)),
        bucket_len_ms: config.pipeline.bucket_len_ms,
        mqtt,
    };
    let stop = shutdown.clone();
    let app = api::router(state);
    tracing::info!(%http_addr, "HTTP API listening");
    let http_limits = http::serve::HttpLimits {
        max_connections: config.http.max_connections,
        header_timeout: Duration::from_secs(config.http.header_timeout_secs.max(1)),
    };
    let task = tokio::spawn(async move {
        http::serve::serve(http, app, http_limits, stop.clone()).await;
        // The MQTT sources stop reading and send the acks still due while the
        // pipeline still runs; only then is the pipeline drained.
        stop.cancel();
        for task in mqtt_tasks {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "MQTT task failed");
            }
        }
        pipeline_tasks.shutdown().await;
        if let Some(task) = sweeper {
            let _ = task.await;
        }
        if let Some(task) = deletions {
            let _ = task.await;
        }
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
