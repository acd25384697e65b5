//! Where the settings come from: the TOML file, then the environment (which wins),
//! then the checks that the values fit together. The types and their defaults are in
//! the parent module.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

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
