//! The registry's cache invalidation ([`DeletionBroadcast`]) over Redis pub/sub: each
//! instance announces its deletions on the `P device-deleted` channel, and listens
//! there to forget what the others deleted.

use async_trait::async_trait;
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{RedisLive, PROBE_EVERY, RESPONSE_TIMEOUT};
use crate::model::DeviceId;
use crate::registry::auth::SharedAuth;
use crate::registry::invalidation::DeletionBroadcast;

impl RedisLive {
    /// Listens for device deletions announced by any instance (this one included)
    /// and makes `auth` forget them. Reconnects by itself; after a disconnection it
    /// forgets the whole auth cache, since announcements may have been missed.
    pub fn spawn_deletion_listener(
        &self,
        auth: SharedAuth,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let client = self.client.clone();
        let channel = self.keys.deletions();
        tokio::spawn(async move {
            let mut was_connected = false;
            loop {
                let subscribed = async {
                    let mut pubsub = client.get_async_pubsub().await?;
                    pubsub.subscribe(&channel).await?;
                    Ok::<_, redis::RedisError>(pubsub)
                };
                let pubsub = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = tokio::time::timeout(RESPONSE_TIMEOUT * 4, subscribed) => r,
                };
                match pubsub {
                    Ok(Ok(pubsub)) => {
                        if was_connected {
                            tracing::info!("deletion channel back; forgetting the auth cache");
                            auth.forget_all();
                        }
                        was_connected = true;
                        let mut messages = pubsub.into_on_message();
                        loop {
                            let msg = tokio::select! {
                                _ = shutdown.cancelled() => return,
                                m = messages.next() => m,
                            };
                            let Some(msg) = msg else { break };
                            let payload: String = msg.get_payload().unwrap_or_default();
                            match parse_deletion(&payload) {
                                Some((Some(device), hash)) => auth.forget_device(device, hash),
                                Some((None, hash)) => auth.forget_secret(hash),
                                None => {
                                    tracing::warn!(payload, "ignoring a malformed deletion notice")
                                }
                            }
                        }
                        tracing::warn!("deletion channel lost; reconnecting");
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "cannot subscribe to the deletion channel")
                    }
                    Err(_) => tracing::debug!("subscribing to the deletion channel timed out"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
        })
    }
}

/// `{device} {hash}` (a deleted device), or `- {hash}` (a replaced secret).
fn parse_deletion(payload: &str) -> Option<(Option<DeviceId>, &str)> {
    let (device, hash) = payload.split_once(' ')?;
    if device == "-" {
        return Some((None, hash));
    }
    Some((Some(device.parse().ok()?), hash))
}

#[async_trait]
impl DeletionBroadcast for RedisLive {
    async fn device_deleted(&self, device: DeviceId, token_hash: &str) {
        let published: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(self.keys.deletions())
            .arg(format!("{device} {token_hash}"))
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = published {
            // The other instances forget the whole cache when their subscription comes
            // back, and their cache entries expire after `registry.cache_ttl_secs`.
            tracing::warn!(error = %e, %device, "cannot announce a device deletion");
        }
    }

    async fn secret_revoked(&self, token_hash: &str) {
        let published: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(self.keys.deletions())
            .arg(format!("- {token_hash}"))
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = published {
            tracing::warn!(error = %e, "cannot announce a replaced key");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_notices_round_trip() {
        let d = DeviceId::from_u128(7);
        let payload = format!("{d} abc123");
        assert_eq!(parse_deletion(&payload), Some((Some(d), "abc123")));
        assert_eq!(parse_deletion("- abc123"), Some((None, "abc123")));
        assert_eq!(parse_deletion("garbage"), None);
    }
}
