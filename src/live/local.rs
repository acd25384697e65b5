//! In-process live counters and rate limits: the embedded default.

use std::collections::HashMap;

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    gcra, DeviceCount, DeviceLive, LimitKind, Limited, Live, LiveError, LiveTotal, RateLimits,
    UserLive,
};
use crate::model::{format_ms, now_ms, DeviceId, UserId};

/// Counts per second over the last minute.
#[derive(Debug, Clone)]
struct MinuteRing {
    slots: [(i64, u64); 60],
}

impl Default for MinuteRing {
    fn default() -> Self {
        Self {
            slots: [(i64::MIN, 0); 60],
        }
    }
}

impl MinuteRing {
    fn add(&mut self, at_ms: i64, n: u64) {
        let sec = at_ms.div_euclid(1000);
        let slot = &mut self.slots[sec.rem_euclid(60) as usize];
        if slot.0 != sec {
            *slot = (sec, 0);
        }
        slot.1 += n;
    }

    fn last_minute(&self, now_ms: i64) -> u64 {
        let now = now_ms.div_euclid(1000);
        self.slots
            .iter()
            .filter(|(sec, _)| *sec > now - 60 && *sec <= now)
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Default)]
struct DeviceState {
    events_total: u64,
    rejected_total: u64,
    last_seen: Option<i64>,
    last_error: Option<String>,
    minute: MinuteRing,
}

#[derive(Debug, Default)]
struct UserState {
    events_total: u64,
    minute: MinuteRing,
    last_seen: HashMap<DeviceId, i64>,
}

#[derive(Debug, Default)]
struct Limiters {
    devices: HashMap<DeviceId, f64>,
    users: HashMap<UserId, f64>,
}

/// Budgets at or behind this many entries are pruned once fully refilled.
const LIMITER_PRUNE_AT: usize = 100_000;

/// In-process counters and limits. State is lost on restart; the totals then restart
/// from zero, while stored events are of course kept.
pub struct LocalLive {
    limits: RateLimits,
    devices: Mutex<HashMap<DeviceId, DeviceState>>,
    users: Mutex<HashMap<UserId, UserState>>,
    limiters: Mutex<Limiters>,
}

impl LocalLive {
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            devices: Mutex::default(),
            users: Mutex::default(),
            limiters: Mutex::default(),
        }
    }
}

#[async_trait]
impl Live for LocalLive {
    fn backend(&self) -> &'static str {
        "local"
    }

    async fn admit(
        &self,
        user: UserId,
        device: DeviceId,
        events: u64,
        now_ms: i64,
    ) -> Result<(), Limited> {
        let now = now_ms as f64;
        let mut l = self.limiters.lock();
        let RateLimits {
            device_per_sec,
            user_per_sec,
        } = self.limits;
        if device_per_sec > 0 {
            if let Some(wait) = gcra::debt_ms(l.devices.get(&device).copied(), now) {
                return Err(Limited {
                    limit: LimitKind::Device,
                    retry_after_ms: wait,
                });
            }
        }
        if user_per_sec > 0 {
            if let Some(wait) = gcra::debt_ms(l.users.get(&user).copied(), now) {
                return Err(Limited {
                    limit: LimitKind::User,
                    retry_after_ms: wait,
                });
            }
        }
        if device_per_sec > 0 {
            let tat = l.devices.get(&device).copied();
            l.devices
                .insert(device, gcra::charge(tat, now, device_per_sec, events));
        }
        if user_per_sec > 0 {
            let tat = l.users.get(&user).copied();
            l.users
                .insert(user, gcra::charge(tat, now, user_per_sec, events));
        }
        if l.devices.len() > LIMITER_PRUNE_AT {
            l.devices.retain(|_, tat| *tat > now);
        }
        if l.users.len() > LIMITER_PRUNE_AT {
            l.users.retain(|_, tat| *tat > now);
        }
        Ok(())
    }

    async fn record_ingested(&self, counts: &[DeviceCount]) {
        {
            let mut devices = self.devices.lock();
            for c in counts {
                let d = devices.entry(c.device_id).or_default();
                d.events_total += c.new_events;
                d.minute.add(c.received_ms, c.new_events);
                d.last_seen = Some(d.last_seen.unwrap_or(i64::MIN).max(c.received_ms));
            }
        }
        let mut users = self.users.lock();
        for c in counts {
            let u = users.entry(c.user_id).or_default();
            u.events_total += c.new_events;
            u.minute.add(c.received_ms, c.new_events);
            let seen = u.last_seen.entry(c.device_id).or_insert(c.received_ms);
            *seen = (*seen).max(c.received_ms);
        }
    }

    async fn record_rejected(&self, _user: UserId, device: DeviceId, events: u64, reason: &str) {
        let mut devices = self.devices.lock();
        let d = devices.entry(device).or_default();
        d.rejected_total += events;
        d.last_error = Some(reason.to_owned());
    }

    async fn device(&self, device: DeviceId, now_ms: i64) -> DeviceLive {
        let devices = self.devices.lock();
        match devices.get(&device) {
            None => DeviceLive::default(),
            Some(d) => DeviceLive {
                events_total: d.events_total,
                rejected_total: d.rejected_total,
                events_last_minute: d.minute.last_minute(now_ms),
                last_seen: d.last_seen.map(format_ms),
                last_error: d.last_error.clone(),
            },
        }
    }

    async fn user(&self, user: UserId, now_ms: i64) -> UserLive {
        let mut users = self.users.lock();
        match users.get_mut(&user) {
            None => UserLive::default(),
            Some(u) => {
                let since = now_ms - 5 * 60 * 1000;
                // Forget devices idle for longer than the window, so the map stays small.
                u.last_seen.retain(|_, seen| *seen >= since);
                UserLive {
                    events_total: u.events_total,
                    events_last_minute: u.minute.last_minute(now_ms),
                    devices_active_5m: u.last_seen.len() as u64,
                }
            }
        }
    }

    async fn forget_device(&self, user: UserId, device: DeviceId) -> Result<(), LiveError> {
        let removed = self.devices.lock().remove(&device);
        if let Some(u) = self.users.lock().get_mut(&user) {
            let events = removed.map_or(0, |d| d.events_total);
            u.events_total = u.events_total.saturating_sub(events);
            u.last_seen.remove(&device);
        }
        self.limiters.lock().devices.remove(&device);
        Ok(())
    }

    async fn set_totals(&self, totals: &[LiveTotal]) -> Result<(), LiveError> {
        let mut users: HashMap<UserId, u64> = HashMap::new();
        {
            let mut devices = self.devices.lock();
            for t in totals {
                let d = devices.entry(t.device_id).or_default();
                d.events_total = t.events;
                d.last_seen = d.last_seen.max(t.last_seen_ms);
                *users.entry(t.user_id).or_default() += t.events;
            }
        }
        let mut states = self.users.lock();
        for (user, events) in users {
            states.entry(user).or_default().events_total = events;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), LiveError> {
        // In process: reachable by construction; check the locks are usable.
        drop(self.devices.lock());
        let _ = now_ms();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[tokio::test]
    async fn the_device_limit_refuses_only_once_in_debt() {
        let live = LocalLive::new(RateLimits {
            device_per_sec: 10,
            user_per_sec: 0,
        });
        let d = Uuid::from_u128(1);
        assert!(live.admit(1, d, 11, 0).await.is_ok());
        let refused = live.admit(1, d, 1, 0).await.unwrap_err();
        assert_eq!(refused.limit, LimitKind::Device);
        assert!((refused.retry_after_ms - 100.0).abs() < 1e-9);
        assert!(live.admit(1, d, 1, 100).await.is_ok());
        // Another device of the same user has its own budget.
        assert!(live.admit(1, Uuid::from_u128(2), 1, 0).await.is_ok());
    }

    #[tokio::test]
    async fn the_user_limit_sums_over_devices() {
        let live = LocalLive::new(RateLimits {
            device_per_sec: 0,
            user_per_sec: 10,
        });
        assert!(live.admit(7, Uuid::from_u128(1), 8, 0).await.is_ok());
        assert!(live.admit(7, Uuid::from_u128(2), 8, 0).await.is_ok());
        let refused = live.admit(7, Uuid::from_u128(3), 1, 0).await.unwrap_err();
        assert_eq!(refused.limit, LimitKind::User);
    }

    #[tokio::test]
    async fn live_figures_use_receipt_time_windows() {
        let live = LocalLive::new(RateLimits {
            device_per_sec: 0,
            user_per_sec: 0,
        });
        let d = Uuid::from_u128(1);
        let t = 1_000_000_000;
        live.record_ingested(&[DeviceCount {
            user_id: 1,
            device_id: d,
            new_events: 5,
            received_ms: t,
        }])
        .await;
        assert_eq!(live.device(d, t).await.events_last_minute, 5);
        assert_eq!(live.device(d, t + 59_000).await.events_last_minute, 5);
        assert_eq!(live.device(d, t + 61_000).await.events_last_minute, 0);
        assert_eq!(live.device(d, t + 61_000).await.events_total, 5);
        assert_eq!(live.user(1, t + 299_000).await.devices_active_5m, 1);
        assert_eq!(live.user(1, t + 301_000).await.devices_active_5m, 0);
    }
}
