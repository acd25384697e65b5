//! Retention tiers: raw events, minute, hour and day rollups, each kept for its own
//! period of event time (`[retention]`).
//!
//! What expiry means is decided here, once, for both stores:
//! - a row covering `[start, start + len)` expires when `start + len + keep <= now`
//!   (an event is a row of length 0);
//! - an expired row is never read again: Cassandra/ScyllaDB hide it by TTL (computed
//!   here from the row's time, not from when it was written, so a backfill or a
//!   transfer expires on the same day as live data), and the embedded store clips its
//!   reads to [`Retention::first_visible`], then deletes in a background sweep;
//! - ingest refuses an event that would already be expired, so no level is ever
//!   summed from finer rows that are partly gone.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RetentionConfig, Tiers};
use crate::model::now_ms;
use crate::store::{Level, SharedStore};

/// A tier of stored data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Raw,
    Rollup(Level),
}

impl Tier {
    /// Length of a row's interval.
    fn len_ms(self) -> i64 {
        match self {
            Tier::Raw => 0,
            Tier::Rollup(level) => level.ms(),
        }
    }

    fn index(self) -> usize {
        match self {
            Tier::Raw => 0,
            Tier::Rollup(Level::Minute) => 1,
            Tier::Rollup(Level::Hour) => 2,
            Tier::Rollup(Level::Day) => 3,
        }
    }

    /// The setting that configures it, for messages.
    pub fn setting(self) -> &'static str {
        RetentionConfig::NAMES[self.index()]
    }
}

/// The tiers, resolved. `Default` keeps everything forever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    keep_ms: Tiers,
}

/// What a Cassandra write binds as its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    Forever,
    Secs(i32),
    /// Already expired: not worth writing.
    Expired,
}

impl Ttl {
    /// As bound to `USING TTL ?`: 0 is no TTL (and overrides a table default).
    pub fn cql(self) -> i32 {
        match self {
            Ttl::Forever => 0,
            Ttl::Secs(s) => s,
            // The write still goes through; the row vanishes at once.
            Ttl::Expired => 1,
        }
    }
}

impl Retention {
    /// The tiers of `config`, the deprecated `store.ttl_secs` filling those left at
    /// `forever`. The settings were checked when loaded.
    pub fn from_config(config: &Config) -> Self {
        let mut keep_ms = config.retention.tiers().unwrap_or_default();
        if config.store.ttl_secs > 0 {
            let legacy = (config.store.ttl_secs as i64).saturating_mul(1000);
            let mut finer = 0;
            for keep in &mut keep_ms {
                // Never shorter than the finer tier: see `RetentionConfig::tiers`.
                let k = keep.get_or_insert(legacy.max(finer));
                finer = (*k).max(finer);
            }
        }
        Self { keep_ms }
    }

    /// Tiers given directly, finest first (tests and tools).
    pub fn new(keep_ms: Tiers) -> Self {
        Self { keep_ms }
    }

    /// How long `tier` is kept; `None`: forever.
    pub fn keep_ms(&self, tier: Tier) -> Option<i64> {
        self.keep_ms[tier.index()]
    }

    /// Does everything stay forever?
    pub fn is_forever(&self) -> bool {
        self.keep_ms.iter().all(Option::is_none)
    }

    /// The earliest start a row of `tier` may have and still be visible at `now_ms`;
    /// `None` when the tier is kept forever.
    pub fn first_visible(&self, tier: Tier, now_ms: i64) -> Option<i64> {
        let keep = self.keep_ms(tier)?;
        Some(now_ms - keep - tier.len_ms() + 1)
    }

    /// Does every event stay visible at least as long as the row of `level` that
    /// covers it? Then a store may keep an interval of few events as just its events.
    pub fn events_outlive(&self, level: Level) -> bool {
        match (self.keep_ms(Tier::Raw), self.keep_ms(Tier::Rollup(level))) {
            (None, _) => true,
            (Some(_), None) => false,
            // An event at the start of the interval expires first.
            (Some(raw), Some(rollup)) => raw >= rollup + level.ms(),
        }
    }

    /// Is an event at `ts_ms` already expired at `now_ms`?
    pub fn is_expired(&self, ts_ms: i64, now_ms: i64) -> bool {
        self.first_visible(Tier::Raw, now_ms)
            .is_some_and(|first| ts_ms < first)
    }

    /// The TTL of a row of `tier` starting at `start_ms`, written at `now_ms`:
    /// whole seconds, rounded up, so a row never expires before its time.
    pub fn ttl(&self, tier: Tier, start_ms: i64, now_ms: i64) -> Ttl {
        let Some(keep) = self.keep_ms(tier) else {
            return Ttl::Forever;
        };
        let left_ms = start_ms + tier.len_ms() + keep - now_ms;
        if left_ms <= 0 {
            return Ttl::Expired;
        }
        Ttl::Secs(i32::try_from((left_ms + 999) / 1000).unwrap_or(i32::MAX))
    }

    /// Clips the start of a read of `tier` to what is still visible.
    pub fn clip(&self, tier: Tier, from_ms: i64, now_ms: i64) -> i64 {
        self.first_visible(tier, now_ms)
            .map_or(from_ms, |first| from_ms.max(first))
    }
}

/// Runs [`crate::store::EventStore::expire`] at start and then every `every`, until
/// `stop`. A failed sweep is logged and tried again at the next tick: expired rows are
/// hidden from reads meanwhile, so nothing depends on it finishing.
pub fn spawn_sweeper(
    store: SharedStore,
    every: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = store.expire(now_ms()).await {
                tracing::warn!(error = %e, "retention sweep failed; trying again at the next tick");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;

    fn tiers() -> Retention {
        Retention::new([Some(DAY), Some(7 * DAY), Some(365 * DAY), None])
    }

    #[test]
    fn a_row_is_visible_until_its_whole_interval_is_older_than_its_tier() {
        let r = tiers();
        let now = 1_800_000_000_000;
        let hour = Tier::Rollup(Level::Hour);
        let first = r.first_visible(hour, now).unwrap();
        // The hour starting at `first` ends exactly 365 days and 1 ms before now.
        assert_eq!(first + Level::Hour.ms() + 365 * DAY, now + 1);
        assert_eq!(r.ttl(hour, first, now), Ttl::Secs(1));
        assert_eq!(r.ttl(hour, first - 1, now), Ttl::Expired);
        assert!(r.is_expired(now - DAY, now));
        assert!(!r.is_expired(now - DAY + 1, now));
        assert_eq!(r.ttl(Tier::Raw, now, now), Ttl::Secs(86_400));
        assert_eq!(r.ttl(Tier::Rollup(Level::Day), 0, now), Ttl::Forever);
        assert_eq!(r.clip(Tier::Raw, 0, now), now - DAY + 1);
        assert_eq!(r.clip(Tier::Rollup(Level::Day), 5, now), 5);
    }

    #[test]
    fn the_deprecated_ttl_fills_the_tiers_left_forever() {
        let mut c = Config::default();
        c.retention.raw = "1d".into();
        c.store.ttl_secs = 3_600 * 24 * 30;
        let r = Retention::from_config(&c);
        assert_eq!(r.keep_ms(Tier::Raw), Some(DAY));
        assert_eq!(r.keep_ms(Tier::Rollup(Level::Day)), Some(30 * DAY));
        assert!(Retention::from_config(&Config::default()).is_forever());
    }
}
