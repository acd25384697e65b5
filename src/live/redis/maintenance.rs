//! Changes to the live figures that ingest never makes: forgetting a purged device.

use redis::Script;

use super::RedisLive;
use crate::live::{Live, LiveError};
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

impl RedisLive {
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
