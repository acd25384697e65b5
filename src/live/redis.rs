//! Live counters and distributed rate limits in Redis, shared by every instance.
//!
//! Key layout, all under the configured prefix `P` (default `iotpipe:`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `P d:{device}` | hash | `events`, `rejected`, `last_error` |
//! | `P d:{device}:s:{second}` | string, TTL 120 s | new events received in that second |
//! | `P seen` | sorted set | device → last time of receipt (ms) |
//! | `P u:{user}` | hash | `events` |
//! | `P u:{user}:s:{second}` | string, TTL 120 s | the user's events in that second |
//! | `P u:{user}:active` | sorted set | the user's devices → last time of receipt |
//! | `P rl:d:{device}`, `P rl:u:{user}` | string, TTL until refilled | GCRA TAT (ms) |
//! | `P device-deleted` | pub/sub channel | `{device} {token hash}`, or `- {hash}` for a replaced user key |
//!
//! Maintenance (forgetting a purged device, totals recomputed from the store) is in
//! `redis/maintenance.rs`; the deletion channel, which carries the registry's cache
//! invalidation between instances, is in `redis/invalidation.rs`.
//!
//! Round trips: one pipeline per [`Live::record_ingested`] call (one per flush, not per
//! event), one script call per admitted request, one pipeline per read.
//!
//! Degradation: the first failed call marks Redis down. From then on every call goes
//! straight to an in-process [`LocalLive`] (limits enforced per instance, counters
//! kept here), and what is counted meanwhile is also kept in a backlog. A probe task
//! pings Redis every [`PROBE_EVERY`]; once it answers, the backlog (totals, the
//! per-second counts still inside the minute, last seen, last error) is pushed in one
//! pipeline and Redis is used again. So totals catch up; the only figures that differ
//! during the gap are the live reads, which show this instance's local view.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Pipeline, Script};

mod invalidation;
mod maintenance;

use super::local::LocalLive;
use super::{
    gcra, DeviceCount, DeviceLive, LimitKind, Limited, Live, LiveError, RateLimits, UserLive,
};
use crate::model::{format_ms, DeviceId, UserId};

/// How often a down Redis is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// How long a Redis call may take before it counts as failed. Short: the hot path
/// waits at most this once before switching to local state.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// Per-second count keys outlive the minute they serve by a margin, for clock skew.
const SECOND_KEY_TTL_SECS: i64 = 120;

/// The active-device window of `/v1/live`.
const ACTIVE_WINDOW_MS: i64 = 5 * 60 * 1000;

/// The GCRA of [`super::gcra`], run atomically in Redis over any number of budgets.
///
/// KEYS: one TAT key per budget. ARGV: now (ms), events, burst (ms), then one rate
/// (events/s) per key; a rate of 0 means unlimited. Returns `{0, "0"}` when admitted
/// (and charged), or `{i, wait_ms}` for the first budget `i` (1-based) in debt. The
/// wait is a string because Redis truncates Lua numbers to integers.
const ADMIT_LUA: &str = r#"
local now = tonumber(ARGV[1])
local events = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tats = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[3 + i])
  if rate > 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    tats[i] = tat
    if tat and tat - now > burst then
      return {i, string.format('%.17g', tat - now - burst)}
    end
  end
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[3 + i])
  if rate > 0 then
    local base = now
    if tats[i] and tats[i] > now then base = tats[i] end
    local tat = base + events * 1000 / rate
    -- Once the TAT is past, a missing key means the same as the stale one.
    local ttl = math.max(1, math.ceil(tat - now))
    redis.call('SET', KEYS[i], string.format('%.17g', tat), 'PX', ttl)
  end
end
return {0, '0'}
"#;

/// Counts kept while Redis is down, pushed when it returns.
#[derive(Debug, Default)]
struct Backlog {
    devices: HashMap<DeviceId, DeviceGap>,
}

#[derive(Debug, Default)]
struct DeviceGap {
    user: Option<UserId>,
    events: u64,
    rejected: u64,
    last_error: Option<String>,
    last_seen: Option<i64>,
    /// Events per second of receipt; only the last minute matters once pushed.
    seconds: BTreeMap<i64, u64>,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn ingested(&mut self, c: &DeviceCount) {
        let gap = self.devices.entry(c.device_id).or_default();
        gap.user = Some(c.user_id);
        gap.events += c.new_events;
        gap.last_seen = Some(gap.last_seen.unwrap_or(i64::MIN).max(c.received_ms));
        *gap.seconds
            .entry(c.received_ms.div_euclid(1000))
            .or_default() += c.new_events;
        // Keep the map small over a long outage: seconds older than a key's TTL would
        // expire at once when pushed.
        if gap.seconds.len() > SECOND_KEY_TTL_SECS as usize {
            let newest = *gap.seconds.keys().next_back().unwrap_or(&0);
            gap.seconds.retain(|s, _| *s > newest - SECOND_KEY_TTL_SECS);
        }
    }

    fn rejected(&mut self, device: DeviceId, events: u64, reason: &str) {
        let gap = self.devices.entry(device).or_default();
        gap.rejected += events;
        gap.last_error = Some(reason.to_owned());
    }
}

/// The key names.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn device(&self, d: DeviceId) -> String {
        format!("{}d:{}", self.prefix, d)
    }
    fn device_second(&self, d: DeviceId, sec: i64) -> String {
        format!("{}d:{}:s:{}", self.prefix, d, sec)
    }
    fn seen(&self) -> String {
        format!("{}seen", self.prefix)
    }
    fn user(&self, u: UserId) -> String {
        format!("{}u:{}", self.prefix, u)
    }
    fn user_second(&self, u: UserId, sec: i64) -> String {
        format!("{}u:{}:s:{}", self.prefix, u, sec)
    }
    fn user_active(&self, u: UserId) -> String {
        format!("{}u:{}:active", self.prefix, u)
    }
    fn device_budget(&self, d: DeviceId) -> String {
        format!("{}rl:d:{}", self.prefix, d)
    }
    fn user_budget(&self, u: UserId) -> String {
        format!("{}rl:u:{}", self.prefix, u)
    }
    fn deletions(&self) -> String {
        format!("{}device-deleted", self.prefix)
    }
}

/// Live counters and limits in Redis, with a local fallback. See the module docs.
pub struct RedisLive {
    client: Client,
    conn: ConnectionManager,
    keys: Keys,
    limits: RateLimits,
    admit_script: Script,
    local: LocalLive,
    up: AtomicBool,
    backlog: Mutex<Backlog>,
}

impl RedisLive {
    /// Opens the backend and starts its probe task. Does not wait for Redis: if it is
    /// down at start, iotpipe starts degraded and switches over when it answers.
    ///
    /// # Errors
    ///
    /// A malformed URL.
    pub fn open(url: &str, prefix: &str, limits: RateLimits) -> Result<Arc<Self>, LiveError> {
        let client =
            Client::open(url).map_err(|e| LiveError::Unavailable(format!("bad Redis URL: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| LiveError::Unavailable(e.to_string()))?;
        let live = Arc::new(Self {
            client,
            conn,
            keys: Keys {
                prefix: prefix.to_owned(),
            },
            limits,
            admit_script: Script::new(ADMIT_LUA),
            local: LocalLive::new(limits),
            // Optimistic: the first failed call marks it down.
            up: AtomicBool::new(true),
            backlog: Mutex::default(),
        });
        tokio::spawn(probe(Arc::downgrade(&live)));
        Ok(live)
    }

    /// Is Redis in use (as opposed to the local fallback)?
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn mark_down(&self, e: &redis::RedisError) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = %e, "Redis unavailable; using local counters and limits until it returns");
        }
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Adds one device's new events to a pipeline.
    fn add_ingested(
        &self,
        pipe: &mut Pipeline,
        user: UserId,
        device: DeviceId,
        events: u64,
        seconds: &[(i64, u64)],
        last_seen: i64,
    ) {
        let k = &self.keys;
        pipe.hincr(k.device(device), "events", events).ignore();
        pipe.hincr(k.user(user), "events", events).ignore();
        for &(sec, n) in seconds {
            pipe.incr(k.device_second(device, sec), n).ignore();
            pipe.expire(k.device_second(device, sec), SECOND_KEY_TTL_SECS)
                .ignore();
            pipe.incr(k.user_second(user, sec), n).ignore();
            pipe.expire(k.user_second(user, sec), SECOND_KEY_TTL_SECS)
                .ignore();
        }
        // GT: several instances may report out of order; last seen only moves forward.
        pipe.cmd("ZADD")
            .arg(k.seen())
            .arg("GT")
            .arg(last_seen)
            .arg(device.to_string())
            .ignore();
        let active = k.user_active(user);
        pipe.cmd("ZADD")
            .arg(&active)
            .arg("GT")
            .arg(last_seen)
            .arg(device.to_string())
            .ignore();
        pipe.zrembyscore(
            &active,
            "-inf",
            format!("({}", last_seen - ACTIVE_WINDOW_MS),
        )
        .ignore();
        pipe.expire(&active, ACTIVE_WINDOW_MS / 1000 * 2).ignore();
    }

    /// Pushes what was counted while Redis was down, in one pipeline.
    async fn push_backlog(&self) -> Result<(), redis::RedisError> {
        let backlog = std::mem::take(&mut *self.backlog.lock());
        if backlog.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (device, gap) in &backlog.devices {
            if let (Some(user), Some(seen)) = (gap.user, gap.last_seen) {
                let seconds: Vec<(i64, u64)> = gap.seconds.iter().map(|(s, n)| (*s, *n)).collect();
                self.add_ingested(&mut pipe, user, *device, gap.events, &seconds, seen);
            }
            if gap.rejected > 0 {
                pipe.hincr(self.keys.device(*device), "rejected", gap.rejected)
                    .ignore();
            }
            if let Some(e) = &gap.last_error {
                pipe.hset(self.keys.device(*device), "last_error", e)
                    .ignore();
            }
        }
        match pipe.query_async::<()>(&mut self.conn()).await {
            Ok(()) => {
                tracing::info!(
                    devices = backlog.devices.len(),
                    "pushed the counts kept while Redis was down"
                );
                Ok(())
            }
            Err(e) => {
                // Put it back (merged with anything counted meanwhile) for the next try.
                let mut current = self.backlog.lock();
                for (device, gap) in backlog.devices {
                    let slot = current.devices.entry(device).or_default();
                    slot.user = slot.user.or(gap.user);
                    slot.events += gap.events;
                    slot.rejected += gap.rejected;
                    slot.last_error = slot.last_error.take().or(gap.last_error);
                    slot.last_seen = slot.last_seen.max(gap.last_seen);
                    for (s, n) in gap.seconds {
                        *slot.seconds.entry(s).or_default() += n;
                    }
                }
                Err(e)
            }
        }
    }

    async fn redis_admit(
        &self,
        user: UserId,
        device: DeviceId,
        events: u64,
        now_ms: i64,
    ) -> Result<Result<(), Limited>, redis::RedisError> {
        let (which, wait): (i64, String) = self
            .admit_script
            .key(self.keys.device_budget(device))
            .key(self.keys.user_budget(user))
            .arg(now_ms)
            .arg(events)
            .arg(gcra::BURST_MS)
            .arg(self.limits.device_per_sec)
            .arg(self.limits.user_per_sec)
            .invoke_async(&mut self.conn())
            .await?;
        let limit = match which {
            0 => return Ok(Ok(())),
            1 => LimitKind::Device,
            _ => LimitKind::User,
        };
        Ok(Err(Limited {
            limit,
            retry_after_ms: wait.parse().unwrap_or(gcra::BURST_MS),
        }))
    }

    /// The per-second keys of the minute ending at `now_ms`, oldest first.
    fn minute(now_ms: i64) -> impl Iterator<Item = i64> {
        let now = now_ms.div_euclid(1000);
        (now - 59)..=now
    }

    async fn redis_device(
        &self,
        device: DeviceId,
        now_ms: i64,
    ) -> Result<DeviceLive, redis::RedisError> {
        let seconds: Vec<String> = Self::minute(now_ms)
            .map(|s| self.keys.device_second(device, s))
            .collect();
        let mut pipe = redis::pipe();
        pipe.cmd("HMGET")
            .arg(self.keys.device(device))
            .arg(&["events", "rejected", "last_error"])
            .zscore(self.keys.seen(), device.to_string())
            .mget(&seconds);
        type Reply = (
            (Option<u64>, Option<u64>, Option<String>),
            Option<f64>,
            Vec<Option<u64>>,
        );
        let ((events, rejected, last_error), seen, minute): Reply =
            pipe.query_async(&mut self.conn()).await?;
        Ok(DeviceLive {
            events_total: events.unwrap_or(0),
            rejected_total: rejected.unwrap_or(0),
            events_last_minute: minute.into_iter().flatten().sum(),
            last_seen: seen.map(|ms| format_ms(ms as i64)),
            last_error,
        })
    }

    async fn redis_user(&self, user: UserId, now_ms: i64) -> Result<UserLive, redis::RedisError> {
        let seconds: Vec<String> = Self::minute(now_ms)
            .map(|s| self.keys.user_second(user, s))
            .collect();
        let mut pipe = redis::pipe();
        pipe.hget(self.keys.user(user), "events")
            .zcount(
                self.keys.user_active(user),
                now_ms - ACTIVE_WINDOW_MS,
                "+inf",
            )
            .mget(&seconds);
        let (events, active, minute): (Option<u64>, u64, Vec<Option<u64>>) =
            pipe.query_async(&mut self.conn()).await?;
        Ok(UserLive {
            events_total: events.unwrap_or(0),
            events_last_minute: minute.into_iter().flatten().sum(),
            devices_active_5m: active,
        })
    }
}

/// Probes a down Redis and switches back once it answers and the backlog is pushed.
async fn probe(live: Weak<RedisLive>) {
    loop {
        tokio::time::sleep(PROBE_EVERY).await;
        let Some(live) = live.upgrade() else { return };
        if live.is_up() {
            continue;
        }
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut live.conn()).await;
        if pong.is_err() {
            continue;
        }
        match live.push_backlog().await {
            Ok(()) => {
                live.up.store(true, Ordering::Release);
                tracing::info!("Redis is back; counters and limits are shared again");
            }
            Err(e) => tracing::debug!(error = %e, "Redis answered but the backlog push failed"),
        }
    }
}

#[async_trait]
impl Live for RedisLive {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn admit(
        &self,
        user: UserId,
        device: DeviceId,
        events: u64,
        now_ms: i64,
    ) -> Result<(), Limited> {
        if self.limits.device_per_sec == 0 && self.limits.user_per_sec == 0 {
            return Ok(());
        }
        if self.is_up() {
            match self.redis_admit(user, device, events, now_ms).await {
                Ok(verdict) => return verdict,
                Err(e) => self.mark_down(&e),
            }
        }
        self.local.admit(user, device, events, now_ms).await
    }

    async fn record_ingested(&self, counts: &[DeviceCount]) {
        if counts.is_empty() {
            return;
        }
        if self.is_up() {
            let mut pipe = redis::pipe();
            for c in counts {
                let sec = c.received_ms.div_euclid(1000);
                self.add_ingested(
                    &mut pipe,
                    c.user_id,
                    c.device_id,
                    c.new_events,
                    &[(sec, c.new_events)],
                    c.received_ms,
                );
            }
            match pipe.query_async::<()>(&mut self.conn()).await {
                Ok(()) => return,
                // Whether the pipeline was applied is unknown: a timeout may hide a
                // success. Counting it locally may double-count it once pushed; losing
                // it would undercount. Totals are approximate across a failure.
                Err(e) => self.mark_down(&e),
            }
        }
        self.local.record_ingested(counts).await;
        let mut backlog = self.backlog.lock();
        for c in counts {
            backlog.ingested(c);
        }
    }

    async fn record_rejected(&self, user: UserId, device: DeviceId, events: u64, reason: &str) {
        if self.is_up() {
            let mut pipe = redis::pipe();
            pipe.hincr(self.keys.device(device), "rejected", events)
                .ignore()
                .hset(self.keys.device(device), "last_error", reason)
                .ignore();
            match pipe.query_async::<()>(&mut self.conn()).await {
                Ok(()) => return,
                Err(e) => self.mark_down(&e),
            }
        }
        self.local
            .record_rejected(user, device, events, reason)
            .await;
        self.backlog.lock().rejected(device, events, reason);
    }

    async fn device(&self, device: DeviceId, now_ms: i64) -> DeviceLive {
        if self.is_up() {
            match self.redis_device(device, now_ms).await {
                Ok(live) => return live,
                Err(e) => self.mark_down(&e),
            }
        }
        self.local.device(device, now_ms).await
    }

    async fn user(&self, user: UserId, now_ms: i64) -> UserLive {
        if self.is_up() {
            match self.redis_user(user, now_ms).await {
                Ok(live) => return live,
                Err(e) => self.mark_down(&e),
            }
        }
        self.local.user(user, now_ms).await
    }

    async fn forget_device(&self, user: UserId, device: DeviceId) -> Result<(), LiveError> {
        self.forget(user, device).await
    }

    async fn set_totals(&self, totals: &[crate::live::LiveTotal]) -> Result<(), LiveError> {
        self.replace_totals(totals).await
    }

    async fn ping(&self) -> Result<(), LiveError> {
        if !self.is_up() {
            return Err(LiveError::Unavailable(
                "Redis is down; using local state".into(),
            ));
        }
        let pong: Result<String, _> = redis::cmd("PING").query_async(&mut self.conn()).await;
        match pong {
            Ok(_) => Ok(()),
            Err(e) => {
                self.mark_down(&e);
                Err(LiveError::Unavailable(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_keeps_totals_and_recent_seconds() {
        let mut b = Backlog::default();
        let d = DeviceId::from_u128(1);
        for i in 0..300 {
            b.ingested(&DeviceCount {
                user_id: 1,
                device_id: d,
                new_events: 2,
                received_ms: i * 1000,
            });
        }
        b.rejected(d, 3, "invalid");
        let gap = &b.devices[&d];
        assert_eq!(gap.events, 600);
        assert_eq!(gap.rejected, 3);
        assert_eq!(gap.last_seen, Some(299_000));
        assert!(gap.seconds.len() <= SECOND_KEY_TTL_SECS as usize + 1);
        assert_eq!(gap.seconds.get(&299), Some(&2));
    }
}
