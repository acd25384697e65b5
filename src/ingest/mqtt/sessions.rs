//! Which connections are open, so that a device reconnecting under the same client id
//! takes over from its old connection, as MQTT 3.1.1 §3.1.4 requires, and so that a
//! deleted device's connections are closed at once (credentials are checked only at
//! CONNECT, so an open connection would otherwise outlive its device).
//!
//! A connection is keyed by (device, client id), not by client id alone: a device
//! must not be able to disconnect another device by borrowing its client id. An empty
//! client id names no session, so it never takes over anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::model::DeviceId;

type Key = (DeviceId, String);

/// The open connections of the built-in endpoint. Cheap to clone.
#[derive(Clone, Default)]
pub struct Sessions {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    open: Mutex<Open>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Open {
    /// By (device, client id): the connection that holds the session.
    sessions: HashMap<Key, (u64, CancellationToken)>,
    /// Every connection of each device, client id or not.
    devices: HashMap<DeviceId, HashMap<u64, CancellationToken>>,
}

/// A connection's place in [`Sessions`]; it leaves when dropped.
pub struct Claim {
    sessions: Sessions,
    key: Option<Key>,
    id: u64,
    device: DeviceId,
    /// Cancelled when a newer connection of the same device and client id logs in,
    /// or when the device is deleted.
    pub close: CancellationToken,
}

impl Sessions {
    /// Registers a logged-in connection, and tells the one it replaces, if any, to
    /// close.
    pub fn claim(&self, device: DeviceId, client_id: &str) -> Claim {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let key = (!client_id.is_empty()).then(|| (device, client_id.to_owned()));
        let mut open = self.lock();
        open.devices
            .entry(device)
            .or_default()
            .insert(id, close.clone());
        if let Some(key) = &key {
            let replaced = open.sessions.insert(key.clone(), (id, close.clone()));
            if let Some((_, old)) = replaced {
                tracing::info!(%device, client_id, "MQTT client reconnected; closing its old connection");
                old.cancel();
            }
        }
        drop(open);
        Claim {
            sessions: self.clone(),
            key,
            id,
            device,
            close,
        }
    }

    /// How many connections of `device` are logged in.
    pub fn connections_of(&self, device: DeviceId) -> usize {
        self.lock().devices.get(&device).map_or(0, HashMap::len)
    }

    /// Closes every connection of a deleted device.
    pub fn revoke(&self, device: DeviceId) {
        if let Some(conns) = self.lock().devices.get(&device) {
            tracing::warn!(%device, connections = conns.len(), "device deleted; closing its MQTT connections");
            conns.values().for_each(CancellationToken::cancel);
        }
    }

    /// Closes every connection: some deletions may have been missed. Devices that
    /// still exist log in again.
    pub fn revoke_all(&self) {
        let open = self.lock();
        tracing::warn!("deletions may have been missed; closing every MQTT connection");
        open.devices
            .values()
            .flat_map(HashMap::values)
            .for_each(CancellationToken::cancel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut open = self.sessions.lock();
        if let Some(conns) = open.devices.get_mut(&self.device) {
            conns.remove(&self.id);
            if conns.is_empty() {
                open.devices.remove(&self.device);
            }
        }
        let Some(key) = self.key.take() else { return };
        // Only if it is still ours: a newer connection may have replaced it.
        if open
            .sessions
            .get(&key)
            .is_some_and(|(id, _)| *id == self.id)
        {
            open.sessions.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn a_second_login_replaces_the_first_and_only_its_own_key() {
        let sessions = Sessions::default();
        let open = || sessions.lock().sessions.len();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = sessions.claim(a, "meter");
        let other_device = sessions.claim(b, "meter");
        let other_client = sessions.claim(a, "meter-2");
        assert!(!first.close.is_cancelled());
        let second = sessions.claim(a, "meter");
        assert!(first.close.is_cancelled());
        assert!(!other_device.close.is_cancelled());
        assert!(!other_client.close.is_cancelled());
        // The replaced connection leaving does not remove its successor.
        drop(first);
        assert_eq!(open(), 3);
        drop(second);
        assert_eq!(open(), 2);
    }

    #[test]
    fn an_empty_client_id_takes_over_nothing() {
        let sessions = Sessions::default();
        let d = Uuid::from_u128(1);
        let first = sessions.claim(d, "");
        let _second = sessions.claim(d, "");
        assert!(!first.close.is_cancelled());
        assert!(sessions.lock().sessions.is_empty());
    }

    #[test]
    fn deleting_a_device_closes_all_its_connections_and_only_its() {
        let sessions = Sessions::default();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let named = sessions.claim(a, "meter");
        let anonymous = sessions.claim(a, "");
        let other = sessions.claim(b, "meter");
        sessions.revoke(a);
        assert!(named.close.is_cancelled());
        assert!(anonymous.close.is_cancelled());
        assert!(!other.close.is_cancelled());
        drop((named, anonymous));
        assert!(
            !sessions.lock().devices.contains_key(&a),
            "nothing left behind"
        );
        sessions.revoke_all();
        assert!(other.close.is_cancelled());
    }
}
