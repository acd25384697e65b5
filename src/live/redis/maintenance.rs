//! Changes to the live figures that ingest never makes: forgetting a purged device,
//! and totals recomputed from the event store.

use std::collections::HashMap;

use redis::Script;

use super::RedisLive;
use crate::live::{Live, LiveError, LiveTotal};
use crate::model::{DeviceId, UserId};

/// KEYS: the device hash, the user hash, `seen`, the user's active set, the device's
/// budget. ARGV: the device id. Takes the device's total out of its user's in one
/// step, so that no flush counted in between is lost from either. Returns that total.
const FORGET_LUA: &str = r#"
local n = tonumber(redis.call('HGET', KEYS[1], 'events') or '0')
if n > 0 then redis.call('HINCRBY', KEYS[2], 'events', -n) end
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return n
"#;

/// Devices written per pipeline.
const TOTALS_PER_PIPELINE: usize = 1_000;

impl RedisLive {
    pub(super) async fn replace_totals(&self, totals: &[LiveTotal]) -> Result<(), LiveError> {
        // The local fallback serves while Redis is down: it gets the same figures.
        self.local.set_totals(totals).await?;
        let k = &self.keys;
        let mut users: HashMap<UserId, u64> = HashMap::new();
        for chunk in totals.chunks(TOTALS_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for t in chunk {
                pipe.hset(k.device(t.device_id), "events", t.events)
                    .ignore();
                if let Some(seen) = t.last_seen_ms {
                    // GT: a receipt time already known is newer than any event's ts.
                    pipe.cmd("ZADD")
                        .arg(k.seen())
                        .arg("GT")
                        .arg(seen)
                        .arg(t.device_id.to_string())
                        .ignore();
                }
                *users.entry(t.user_id).or_default() += t.events;
            }
            self.query(pipe).await?;
        }
        let users: Vec<(UserId, u64)> = users.into_iter().collect();
        for chunk in users.chunks(TOTALS_PER_PIPELINE) {
            let mut pipe = redis::pipe();
            for (user, events) in chunk {
                pipe.hset(k.user(*user), "events", *events).ignore();
            }
            self.query(pipe).await?;
        }
        Ok(())
    }

    async fn query(&self, pipe: redis::Pipeline) -> Result<(), LiveError> {
        pipe.query_async::<()>(&mut self.conn()).await.map_err(|e| {
            self.mark_down(&e);
            LiveError::Unavailable(e.to_string())
        })
    }

    pub(super) async fn forget(&self, user: UserId, device: DeviceId) -> Result<(), LiveError> {
        // The local fallback and the backlog may count the device too (an outage):
        // they forget it whatever Redis answers.
        self.local.forget_device(user, device).await?;
        self.backlog.lock().devices.remove(&device);
        let k = &self.keys;
        let forgotten: Result<i64, _> = Script::new(FORGET_LUA)
            .key(k.device(device))
            .key(k.user(user))
            .key(k.seen())
            .key(k.user_active(user))
            .key(k.device_budget(device))
            .arg(device.to_string())
            .invoke_async(&mut self.conn())
            .await;
        match forgotten {
            Ok(_) => Ok(()),
            Err(e) => {
                self.mark_down(&e);
                Err(LiveError::Unavailable(e.to_string()))
            }
        }
    }
}
