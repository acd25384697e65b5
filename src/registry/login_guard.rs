//! Slows down repeated failed logins, on HTTP and MQTT alike.
//!
//! Failures (not attempts) are counted per source address and per claimed identity
//! (an MQTT device id) by `governor` keyed limiters: a burst of `per_minute` failures,
//! then one more every `60 / per_minute` seconds. A key over its budget is refused for
//! as long as the limiter says, before its secret is even looked at: a guesser gets
//! few tries a minute, and its guesses cost no registry queries. Successful logins are
//! never counted, so a busy fleet behind one NAT address is not slowed down by its own
//! traffic.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use moka::sync::Cache;

/// Keys tracked by each limiter before idle ones are dropped.
const TRACKED: usize = 10_000;

/// Who is blocked, until when.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Key {
    Ip(IpAddr),
    Identity(String),
}

pub struct LoginGuard {
    by_ip: DefaultKeyedRateLimiter<IpAddr>,
    by_identity: DefaultKeyedRateLimiter<String>,
    blocked: Cache<Key, Instant>,
}

impl LoginGuard {
    /// `None` when `per_minute` is 0: no limit.
    pub fn new(per_minute: u32) -> Option<Self> {
        let burst = NonZeroU32::new(per_minute)?;
        let quota = Quota::per_minute(burst).allow_burst(burst);
        Some(Self {
            by_ip: RateLimiter::keyed(quota),
            by_identity: RateLimiter::keyed(quota),
            blocked: Cache::builder()
                .max_capacity(2 * TRACKED as u64)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        })
    }

    /// How long `ip` (or `identity`) must still wait, if it is blocked.
    pub fn wait(&self, ip: IpAddr, identity: Option<&str>) -> Option<Duration> {
        let now = Instant::now();
        let until = |key| self.blocked.get(&key).filter(|t| *t > now);
        let ip_until = until(Key::Ip(ip));
        let id_until = identity.and_then(|i| until(Key::Identity(i.to_owned())));
        ip_until.max(id_until).map(|t| t - now)
    }

    /// Counts a failure; past the budget, the key is blocked.
    pub fn failed(&self, ip: IpAddr, identity: Option<&str>) {
        let clock = DefaultClock::default();
        if let Err(not_until) = self.by_ip.check_key(&ip) {
            let wait = not_until.wait_time_from(clock.now());
            self.blocked.insert(Key::Ip(ip), Instant::now() + wait);
        }
        if let Some(id) = identity {
            if let Err(not_until) = self.by_identity.check_key(&id.to_owned()) {
                let wait = not_until.wait_time_from(clock.now());
                self.blocked
                    .insert(Key::Identity(id.to_owned()), Instant::now() + wait);
            }
        }
        // governor keeps every key it has seen; drop the ones back to a full budget.
        for limiter in [&self.by_ip as &dyn Forget, &self.by_identity] {
            if limiter.tracked() > TRACKED {
                limiter.forget_idle();
            }
        }
    }
}

/// The two limiters, whatever their key.
trait Forget {
    fn tracked(&self) -> usize;
    fn forget_idle(&self);
}

impl<K: Clone + Eq + std::hash::Hash> Forget for DefaultKeyedRateLimiter<K> {
    fn tracked(&self) -> usize {
        self.len()
    }
    fn forget_idle(&self) {
        self.retain_recent();
        self.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_burst_block_the_address_and_the_identity() {
        let g = LoginGuard::new(3).unwrap();
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(g.wait(a, Some("dev")), None);
            g.failed(a, Some("dev"));
        }
        g.failed(a, Some("dev"));
        let wait = g.wait(a, None).expect("the address is blocked");
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        // The identity is blocked from another address too; other identities are not.
        assert!(g.wait(b, Some("dev")).is_some());
        assert_eq!(g.wait(b, Some("other")), None);
        assert!(LoginGuard::new(0).is_none());
    }
}
