//! Settings. Every setting comes from a TOML file or an environment variable; the
//! variable wins. The doc comment on each field is its user documentation, and
//! `docs/iotpipe.example.toml` lists them all.

use std::path::PathBuf;

use serde::Deserialize;

mod load;
mod retention;

pub use load::parse_duration_ms;
pub use retention::{RetentionConfig, Tiers, MAX_KEEP_MS};

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{name}={value:?}: {reason}")]
    Env {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for embedded state: the event store, the SQLite registry and the
    /// generated admin token. Env: `IOTPIPE_DATA_DIR`.
    pub data_dir: PathBuf,
    /// The admin bearer token. Unset: generated on first start and written to
    /// `DATA_DIR/admin.token` (mode 0600). Env: `IOTPIPE_ADMIN_TOKEN`.
    pub admin_token: Option<String>,
    pub http: HttpConfig,
    pub mqtt: MqttConfig,
    pub registry: RegistryConfig,
    pub live: LiveConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub pipeline: PipelineConfig,
    pub retention: RetentionConfig,
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address. Env: `IOTPIPE_HTTP_ADDR`.
    pub addr: String,
    /// Largest request body accepted, in bytes; larger gets 413.
    /// Env: `IOTPIPE_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// Most events in one request; more gets 413. Env: `IOTPIPE_MAX_EVENTS`.
    pub max_events_per_request: usize,
    /// Most ingest requests read and processed at once; further ones get 503. With
    /// `max_body_bytes` this bounds the memory held by request bodies.
    pub max_inflight_requests: usize,
    /// How long an ingest request's body may take to arrive, in seconds; a slower one
    /// gets 408 and frees its slot.
    pub body_timeout_secs: u64,
    /// How long a request's headers may take to arrive, in seconds; a connection that
    /// is slower (or idle that long between requests) is closed.
    pub header_timeout_secs: u64,
    /// Most HTTP connections open at once; further clients wait in the listen backlog.
    pub max_connections: usize,
}

/// MQTT ingestion.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Listen address of the built-in MQTT endpoint; `off` disables it.
    /// Env: `IOTPIPE_MQTT_ADDR`.
    pub addr: String,
    /// External broker to subscribe to, e.g. `mqtt://127.0.0.1:1883` (optionally
    /// `mqtt://user:pass@host:port`). Env: `IOTPIPE_MQTT_URL`.
    pub url: Option<String>,
    /// Client id of this instance's persistent session on the external broker. It
    /// must be stable across restarts and unique per instance. Unset: generated once
    /// and kept in `DATA_DIR/mqtt.client_id`. Env: `IOTPIPE_MQTT_CLIENT_ID`.
    pub client_id: Option<String>,
    /// Shared-subscription group on the external broker: iotpipe subscribes to
    /// `$share/{group}/devices/+/events`, and the instances of one group split the
    /// stream. Only a second, separate iotpipe cluster on the same broker needs
    /// another group. Env: `IOTPIPE_MQTT_SHARE_GROUP`.
    pub share_group: String,
    /// Most device connections open at once on the built-in endpoint; further ones
    /// wait in the listen backlog.
    pub max_connections: usize,
    /// Most QoS 1 messages per device connection read and not yet acknowledged;
    /// past it the connection is not read (backpressure).
    pub max_inflight: usize,
    /// Most messages from the external broker received and not yet acknowledged;
    /// past it iotpipe stops reading from the broker. Should be at least the broker's
    /// own in-flight limit (Mosquitto `max_inflight_messages`).
    pub broker_max_inflight: usize,
    /// How long a new connection may take to send CONNECT, in seconds.
    pub connect_timeout_secs: u64,
    /// Longest keep-alive granted, in seconds: a device asking for more, or for none
    /// (0), gets this one (MQTT 5 devices are told, as Server Keep Alive), and is
    /// closed after one and a half of it in silence.
    pub max_keep_alive_secs: u16,
    /// Most connections of one device at once on the built-in endpoint.
    pub max_connections_per_device: usize,
    /// Most connections from one IP address at once on the built-in endpoint.
    pub max_connections_per_ip: usize,
}

/// The user and device registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `sqlite://PATH` or `mysql://user:pass@host:port/db`. Unset: a SQLite file in
    /// the data dir. Env: `IOTPIPE_REGISTRY_URL`.
    pub url: Option<String>,
    /// How long a cached secret or device owner is trusted, in seconds.
    pub cache_ttl_secs: u64,
    /// How long a cached answer may still be served, in seconds, while the registry
    /// cannot be asked: known devices keep ingesting through a short outage, and a
    /// revoked secret is not honoured for long where a deletion was missed.
    pub stale_limit_secs: u64,
}

/// Live counters and distributed rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// `redis://host:port/db`. Unset: in-process counters and limits.
    /// Env: `IOTPIPE_REDIS_URL`.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key and channel iotpipe uses, so that several
    /// deployments (or test runs) can share one Redis. Env: `IOTPIPE_REDIS_PREFIX`.
    pub key_prefix: String,
}

/// Rate limits, in events per second. The burst is one second's worth.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Per device; 0 means no limit. Env: `IOTPIPE_RATE_DEVICE`.
    pub device_per_sec: u64,
    /// Per user, summed over the user's devices; 0 means no limit.
    /// Env: `IOTPIPE_RATE_USER`.
    pub user_per_sec: u64,
    /// Failed logins (HTTP or MQTT) allowed per source address, and per claimed MQTT
    /// device, in a burst and then per minute; 0 means no limit.
    pub failed_logins_per_minute: u32,
}

/// The event store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// ScyllaDB/Cassandra nodes, comma-separated `host:port`. Unset: the embedded
    /// store in the data dir. Env: `IOTPIPE_SCYLLA_NODES`.
    pub scylla_nodes: Option<String>,
    /// Length of a partition's time bucket, e.g. `1h` or `1d`. Fixed once a store
    /// holds data.
    pub bucket: String,
    /// ScyllaDB keyspace. Env: `IOTPIPE_SCYLLA_KEYSPACE`.
    pub keyspace: String,
    /// Replication of the keyspace, as a CQL map, used by `iotpipe migrate` when it
    /// creates the keyspace. Env: `IOTPIPE_SCYLLA_REPLICATION`.
    pub replication: String,
    /// Consistency of reads and writes: `LOCAL_QUORUM`, `QUORUM`, `LOCAL_ONE`, `ONE`,
    /// `ALL`... Env: `IOTPIPE_SCYLLA_CONSISTENCY`.
    pub consistency: String,
    /// Deprecated: use `[retention]`. When not 0, every tier of `[retention]` left at
    /// `forever` is kept this many seconds instead (what this setting meant before the
    /// tiers: events and rollups alike).
    pub ttl_secs: u64,
    /// Largest unlogged batch sent to ScyllaDB, in bytes of bound values; a partition's
    /// events are split into batches under it (ScyllaDB warns past 5 KiB by default).
    pub batch_max_bytes: usize,
    /// Most ScyllaDB writes in flight at once, per instance.
    pub write_concurrency: usize,
    /// How long one ScyllaDB request may take, in ms, before it counts as failed.
    pub request_timeout_ms: u64,
    /// Rows per page when reading a partition.
    pub page_size: i32,
    /// The local datacenter, for datacenter-aware routing. Unset: any.
    pub local_datacenter: Option<String>,
    /// Seconds after which a minute still marked pending (its writer crashed before
    /// recomputing its rollups) is recomputed by any instance's sweep. Longer than a
    /// flush may keep retrying.
    pub rollup_sweep_after_secs: u64,
    /// Minutes this instance may hold pending (written, rollups not yet recomputed)
    /// before its writes are refused as overload (retried, then 503): the pending
    /// minutes are held in memory, and a fleet can be acknowledged faster than its
    /// rollups are recomputed.
    pub rollup_backlog_max: usize,
}

/// Batching and queue bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Most events accepted and not yet durable; past it HTTP answers 503 and MQTT
    /// stops reading. Must hold at least one largest request.
    pub queue_events: usize,
    /// Most submissions (requests, messages) queued before the batcher.
    pub queue_submissions: usize,
    /// A batch is flushed once it holds this many events...
    pub batch_max_events: usize,
    /// ...or once its oldest event has waited this long, in ms.
    pub batch_max_age_ms: u64,
    /// Flushes written concurrently.
    pub writers: usize,
    /// How long a failing store write is retried before the sources hear 503, in ms.
    pub retry_budget_ms: u64,
    /// Derived from `store.bucket`; not a setting of its own.
    #[serde(skip)]
    pub bucket_len_ms: i64,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_http_addr() -> String {
    "127.0.0.1:8080".to_owned()
}

fn default_mqtt_addr() -> String {
    "127.0.0.1:1883".to_owned()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            admin_token: None,
            http: HttpConfig::default(),
            mqtt: MqttConfig::default(),
            registry: RegistryConfig::default(),
            live: LiveConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            pipeline: PipelineConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: default_http_addr(),
            max_body_bytes: 1024 * 1024,
            max_events_per_request: 10_000,
            max_inflight_requests: 128,
            body_timeout_secs: 10,
            header_timeout_secs: 10,
            max_connections: 2_048,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            addr: default_mqtt_addr(),
            url: None,
            client_id: None,
            share_group: "iotpipe".to_owned(),
            max_connections: 10_000,
            max_inflight: 100,
            broker_max_inflight: 1000,
            connect_timeout_secs: 10,
            max_keep_alive_secs: 300,
            max_connections_per_device: 4,
            max_connections_per_ip: 1_000,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: None,
            cache_ttl_secs: 60,
            stale_limit_secs: 600,
        }
    }
}

impl Default for LiveConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            key_prefix: "iotpipe:".to_owned(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            device_per_sec: 1000,
            user_per_sec: 50_000,
            failed_logins_per_minute: 30,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            scylla_nodes: None,
            bucket: "1h".to_owned(),
            keyspace: "iotpipe".to_owned(),
            replication: "{'class': 'NetworkTopologyStrategy', 'replication_factor': 3}".to_owned(),
            consistency: "LOCAL_QUORUM".to_owned(),
            ttl_secs: 0,
            batch_max_bytes: 5 * 1024,
            write_concurrency: 64,
            request_timeout_ms: 5_000,
            page_size: 5_000,
            local_datacenter: None,
            rollup_sweep_after_secs: 300,
            rollup_backlog_max: 200_000,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            queue_events: 200_000,
            queue_submissions: 4096,
            batch_max_events: 5_000,
            batch_max_age_ms: 5,
            writers: 2,
            retry_budget_ms: 5_000,
            bucket_len_ms: 3_600_000,
        }
    }
}
