//! The built-in endpoint's accept loop.
//!
//! A semaphore bounds the open connections: past the limit the loop stops accepting
//! and new devices wait in the listen backlog. One address may hold at most
//! `mqtt.max_connections_per_ip` of them; past it, new connections are closed at
//! once. On shutdown the listener closes first, then every connection stops reading
//! and sends the acknowledgements still due; [`run`] returns once they have all
//! closed, before the pipeline is drained.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{sleep, Duration};
use tokio_util::task::TaskTracker;

use super::{connection, MqttContext};

/// Pause after a failed accept (out of file descriptors, typically), so that the
/// loop does not spin while it lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts devices until shutdown, then waits for their connections to finish.
pub async fn run(listener: TcpListener, ctx: MqttContext) {
    tokio::spawn(close_deleted_devices(ctx.clone()));
    let slots = Arc::new(Semaphore::new(ctx.limits.max_connections));
    let per_ip: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "MQTT accept failed");
                    sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(per_ip) = PerIp::claim(&per_ip, peer.ip(), ctx.limits.max_per_ip) else {
            tracing::warn!(%peer, "too many MQTT connections from this address; closed");
            drop(stream);
            continue;
        };
        // PUBACKs are small and latency-bound; do not let Nagle hold them back.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let ctx = ctx.clone();
        connections.spawn(async move {
            connection::run(stream, peer, ctx, slot).await;
            drop(per_ip);
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    tracing::info!("MQTT endpoint stopped");
}

/// Closes the connections of every device deleted on this instance or, through the
/// deletion broadcast, on another one.
async fn close_deleted_devices(ctx: MqttContext) {
    use tokio::sync::broadcast::error::RecvError;
    let mut revoked = ctx.intake.auth.revocations();
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            r = revoked.recv() => match r {
                Ok(device) => ctx.sessions.revoke(device),
                Err(RecvError::Lagged(_)) => ctx.sessions.revoke_all(),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// A connection's place in its address's count; leaves when dropped. One address may
/// not hold every slot of the endpoint.
struct PerIp {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PerIp {
    fn claim(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PerIp {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}
