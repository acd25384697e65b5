//! Cache invalidation between instances. Each instance caches secrets and device
//! owners in [`super::auth::Auth`]; a deletion on one must reach the caches of all.
//! The registry only says what must be announced; a shared backend (the Redis live
//! backend, in production mode) carries the announcements, and its listener calls
//! `Auth::forget_device` and `Auth::forget_secret` on every instance.

use async_trait::async_trait;

use crate::model::DeviceId;

/// Tells the other instances that a device was deleted, so that they forget it too.
#[async_trait]
pub trait DeletionBroadcast: Send + Sync + 'static {
    /// Best effort: a failure is logged by the implementation, and the other instances
    /// then fall back on their own recovery (see `docs/production.md`).
    async fn device_deleted(&self, device: DeviceId, token_hash: &str);

    /// The same for a secret replaced (a rotated user key).
    async fn secret_revoked(&self, token_hash: &str);
}
