//! `[retention]`: how long each tier of data is kept, by event time.
//!
//! Parsed and checked here with the rest of the settings; what a tier means for reads,
//! writes and the background sweep is `store::retention`.

use serde::Deserialize;

use super::{parse_duration_ms, ConfigError};

/// The retention tiers. Each is a duration (`90d`, `12h`...) or `forever`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Raw events. Env: `IOTPIPE_RETENTION_RAW`.
    pub raw: String,
    /// Minute rollups. Env: `IOTPIPE_RETENTION_MINUTES`.
    pub minutes: String,
    /// Hour rollups. Env: `IOTPIPE_RETENTION_HOURS`.
    pub hours: String,
    /// Day rollups. Env: `IOTPIPE_RETENTION_DAYS`.
    pub days: String,
    /// How often the embedded store deletes what has expired, in seconds. Expired
    /// data is hidden from reads at once; the sweep only gives the disk space back.
    /// Cassandra/ScyllaDB expire rows by TTL instead.
    pub sweep_every_secs: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            raw: FOREVER.into(),
            minutes: FOREVER.into(),
            hours: FOREVER.into(),
            days: FOREVER.into(),
            sweep_every_secs: 300,
        }
    }
}

const FOREVER: &str = "forever";

/// The longest finite tier: Cassandra refuses a TTL over 20 years.
pub const MAX_KEEP_MS: i64 = 7_300 * 86_400_000;

/// The parsed tiers in ms (`None`: forever), finest first: raw, minutes, hours, days.
pub type Tiers = [Option<i64>; 4];

impl RetentionConfig {
    /// The settings' names, finest first.
    pub const NAMES: [&'static str; 4] = [
        "retention.raw",
        "retention.minutes",
        "retention.hours",
        "retention.days",
    ];

    /// Parses and checks the tiers.
    ///
    /// # Errors
    ///
    /// A tier that is neither a duration nor `forever`, one past 20 years, or a tier
    /// kept longer than a coarser one: each level is summed from the finer one, so a
    /// late event must still find the finer rows of its interval.
    pub fn tiers(&self) -> Result<Tiers, ConfigError> {
        let texts = [&self.raw, &self.minutes, &self.hours, &self.days];
        let mut tiers: Tiers = [None; 4];
        for (i, text) in texts.into_iter().enumerate() {
            let name = Self::NAMES[i];
            tiers[i] = if text.trim().eq_ignore_ascii_case(FOREVER) {
                None
            } else {
                let ms = parse_duration_ms(text.trim()).ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "{name} = {text:?}: expected \"forever\" or an integer followed by \
                         s, m, h or d"
                    ))
                })?;
                if ms > MAX_KEEP_MS {
                    return Err(ConfigError::Invalid(format!(
                        "{name} = {text:?}: at most 7300d (Cassandra's TTL limit); use \"forever\""
                    )));
                }
                Some(ms)
            };
        }
        for i in 1..tiers.len() {
            let longer = |a: Option<i64>, b: Option<i64>| match (a, b) {
                (None, Some(_)) => true,
                (Some(a), Some(b)) => a > b,
                _ => false,
            };
            if longer(tiers[i - 1], tiers[i]) {
                return Err(ConfigError::Invalid(format!(
                    "{} ({}) is kept longer than {} ({}): each tier must be kept at least as \
                     long as the finer one it is summed from",
                    Self::NAMES[i - 1],
                    texts[i - 1],
                    Self::NAMES[i],
                    texts[i]
                )));
            }
        }
        Ok(tiers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(raw: &str, minutes: &str, hours: &str, days: &str) -> RetentionConfig {
        RetentionConfig {
            raw: raw.into(),
            minutes: minutes.into(),
            hours: hours.into(),
            days: days.into(),
            ..RetentionConfig::default()
        }
    }

    #[test]
    fn tiers_parse_finest_first() {
        let t = config("7d", "30d", "365d", "forever").tiers().unwrap();
        assert_eq!(
            t,
            [
                Some(7 * 86_400_000),
                Some(30 * 86_400_000),
                Some(365 * 86_400_000),
                None
            ]
        );
        assert_eq!(RetentionConfig::default().tiers().unwrap(), [None; 4]);
    }

    #[test]
    fn a_bad_tier_is_named() {
        for (c, name) in [
            (
                config("7 days", "forever", "forever", "forever"),
                "retention.raw",
            ),
            (config("1d", "1h", "forever", "forever"), "retention.raw"),
            (
                config("1d", "forever", "30d", "forever"),
                "retention.minutes",
            ),
            (config("1d", "1d", "1d", "99999d"), "retention.days"),
        ] {
            let err = c.tiers().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }
}
