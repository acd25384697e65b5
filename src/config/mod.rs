//! Settings. Every setting comes from a TOML file or an environment variable; the
//! variable wins. The doc comment on each field is its user documentation, and
//! `docs/iotpipe.example.toml` lists them all.

use std::path::{Path, PathBuf};

use serde::Deserialize;

mod retention;

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

impl Config {
    /// Reads `file` (if any), then applies the environment through `env`.
    ///
    /// # Errors
    ///
    /// An unreadable or invalid file, an unparsable variable, or inconsistent values.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::from_toml(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source: Box::new(source),
                })?
            }
        };
        config.apply_env(env)?;
        config.finish()?;
        Ok(config)
    }

    /// Reads the process environment.
    ///
    /// # Errors
    ///
    /// As [`Config::load`].
    pub fn from_process(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load(file, |name| {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        })
    }

    /// Parses TOML without the environment or the derived fields.
    ///
    /// # Errors
    ///
    /// Invalid TOML or unknown fields.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env("IOTPIPE_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("IOTPIPE_HTTP_ADDR") {
            self.http.addr = v;
        }
        if let Some(v) = env("IOTPIPE_MQTT_ADDR") {
            self.mqtt.addr = v;
        }
        if let Some(v) = env("IOTPIPE_MQTT_URL") {
            self.mqtt.url = Some(v);
        }
        if let Some(v) = env("IOTPIPE_MQTT_CLIENT_ID") {
            self.mqtt.client_id = Some(v);
        }
        if let Some(v) = env("IOTPIPE_MQTT_SHARE_GROUP") {
            self.mqtt.share_group = v;
        }
        if let Some(v) = env("IOTPIPE_REGISTRY_URL") {
            self.registry.url = Some(v);
        }
        if let Some(v) = env("IOTPIPE_REDIS_URL") {
            self.live.redis_url = Some(v);
        }
        if let Some(v) = env("IOTPIPE_SCYLLA_NODES") {
            self.store.scylla_nodes = Some(v);
        }
        if let Some(v) = env("IOTPIPE_SCYLLA_KEYSPACE") {
            self.store.keyspace = v;
        }
        if let Some(v) = env("IOTPIPE_SCYLLA_REPLICATION") {
            self.store.replication = v;
        }
        if let Some(v) = env("IOTPIPE_SCYLLA_CONSISTENCY") {
            self.store.consistency = v;
        }
        if let Some(v) = env("IOTPIPE_REDIS_PREFIX") {
            self.live.key_prefix = v;
        }
        if let Some(v) = env("IOTPIPE_ADMIN_TOKEN") {
            self.admin_token = Some(v);
        }
        for (name, slot) in [
            ("IOTPIPE_RETENTION_RAW", &mut self.retention.raw),
            ("IOTPIPE_RETENTION_MINUTES", &mut self.retention.minutes),
            ("IOTPIPE_RETENTION_HOURS", &mut self.retention.hours),
            ("IOTPIPE_RETENTION_DAYS", &mut self.retention.days),
        ] {
            if let Some(v) = env(name) {
                *slot = v;
            }
        }
        parse_env(&env, "IOTPIPE_RATE_DEVICE", &mut self.limits.device_per_sec)?;
        parse_env(&env, "IOTPIPE_RATE_USER", &mut self.limits.user_per_sec)?;
        parse_env(
            &env,
            "IOTPIPE_MAX_BODY_BYTES",
            &mut self.http.max_body_bytes,
        )?;
        parse_env(
            &env,
            "IOTPIPE_MAX_EVENTS",
            &mut self.http.max_events_per_request,
        )?;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), ConfigError> {
        self.pipeline.bucket_len_ms = parse_duration_ms(&self.store.bucket).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "store.bucket = {:?}: expected an integer followed by s, m, h or d",
                self.store.bucket
            ))
        })?;
        self.retention.tiers()?;
        let group = &self.mqtt.share_group;
        if group.is_empty() || group.contains(['/', '+', '#']) {
            return Err(ConfigError::Invalid(format!(
                "mqtt.share_group = {group:?}: must be non-empty, without '/', '+' or '#'"
            )));
        }
        let p = &self.pipeline;
        if p.queue_events < self.http.max_events_per_request {
            return Err(ConfigError::Invalid(format!(
                "pipeline.queue_events ({}) must hold at least http.max_events_per_request ({})",
                p.queue_events, self.http.max_events_per_request
            )));
        }
        for (name, v) in [
            ("pipeline.queue_submissions", p.queue_submissions),
            ("pipeline.batch_max_events", p.batch_max_events),
            ("pipeline.writers", p.writers),
            (
                "http.max_events_per_request",
                self.http.max_events_per_request,
            ),
            (
                "http.max_inflight_requests",
                self.http.max_inflight_requests,
            ),
            ("store.batch_max_bytes", self.store.batch_max_bytes),
            ("store.write_concurrency", self.store.write_concurrency),
            ("mqtt.max_connections", self.mqtt.max_connections),
            ("mqtt.max_inflight", self.mqtt.max_inflight),
            ("mqtt.broker_max_inflight", self.mqtt.broker_max_inflight),
        ] {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        Ok(())
    }

    /// Is the built-in MQTT endpoint enabled?
    pub fn mqtt_listener(&self) -> Option<&str> {
        (!self.mqtt.addr.eq_ignore_ascii_case("off")).then_some(self.mqtt.addr.as_str())
    }
}

fn parse_env<T: std::str::FromStr>(
    env: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    slot: &mut T,
) -> Result<(), ConfigError>
where
    T::Err: std::fmt::Display,
{
    if let Some(value) = env(name) {
        *slot = value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
            name,
            value: value.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Parses a duration such as `10s`, `1m`, `5m`, `1h` or `1d` into ms. Zero, signs,
/// fractions and other units are refused.
pub fn parse_duration_ms(s: &str) -> Option<i64> {
    let unit = s.chars().last()?;
    let n: i64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    if n <= 0 || !s.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    let ms = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../docs/iotpipe.example.toml");
        let parsed = Config::from_toml(text).expect("example parses");
        let d = Config::default();
        assert_eq!(parsed.http.addr, d.http.addr);
        assert_eq!(parsed.http.max_body_bytes, d.http.max_body_bytes);
        assert_eq!(parsed.limits.device_per_sec, d.limits.device_per_sec);
        assert_eq!(parsed.pipeline.queue_events, d.pipeline.queue_events);
        assert_eq!(parsed.store.bucket, d.store.bucket);
        assert_eq!(parsed.store.keyspace, d.store.keyspace);
        assert_eq!(parsed.store.replication, d.store.replication);
        assert_eq!(parsed.store.consistency, d.store.consistency);
        assert_eq!(parsed.store.batch_max_bytes, d.store.batch_max_bytes);
        assert_eq!(parsed.live.key_prefix, d.live.key_prefix);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(Config::from_toml("[http]\nadress = \"x\"\n").is_err());
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[limits]\ndevice_per_sec = 5\n[http]\naddr = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let env: HashMap<&str, &str> =
            [("IOTPIPE_RATE_DEVICE", "7"), ("IOTPIPE_MQTT_ADDR", "off")].into();
        let c = Config::load(Some(&path), |k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.limits.device_per_sec, 7);
        assert_eq!(c.http.addr, "0.0.0.0:1");
        assert_eq!(c.mqtt_listener(), None);
    }

    #[test]
    fn a_bad_variable_is_named() {
        let err =
            Config::load(None, |k| (k == "IOTPIPE_RATE_USER").then(|| "lots".into())).unwrap_err();
        assert!(err.to_string().contains("IOTPIPE_RATE_USER"), "{err}");
    }

    #[test]
    fn the_share_group_cannot_break_the_subscription_filter() {
        for bad in ["", "a/b", "a+", "#"] {
            let err = Config::load(None, |k| {
                (k == "IOTPIPE_MQTT_SHARE_GROUP").then(|| bad.into())
            })
            .unwrap_err();
            assert!(err.to_string().contains("mqtt.share_group"), "{err}");
        }
    }

    #[test]
    fn durations_take_an_integer_and_a_unit() {
        assert_eq!(parse_duration_ms("10s"), Some(10_000));
        assert_eq!(parse_duration_ms("1d"), Some(86_400_000));
        for bad in ["", "s", "0s", "-1s", "1.5m", "1w", "+1s", "1"] {
            assert_eq!(parse_duration_ms(bad), None, "{bad}");
        }
    }
}
