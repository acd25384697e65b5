//! Which connections are open, so that a device reconnecting under the same client id
//! takes over from its old connection, as MQTT 3.1.1 §3.1.4 requires.
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
    open: Mutex<HashMap<Key, (u64, CancellationToken)>>,
    next_id: AtomicU64,
}

/// A connection's place in [`Sessions`]; it leaves when dropped.
pub struct Claim {
    sessions: Sessions,
    key: Option<Key>,
    id: u64,
    /// Cancelled when a newer connection of the same device and client id logs in.
    pub taken_over: CancellationToken,
}

impl Sessions {
    /// Registers a logged-in connection, and tells the one it replaces, if any, to
    /// close.
    pub fn claim(&self, device: DeviceId, client_id: &str) -> Claim {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let taken_over = CancellationToken::new();
        let key = (!client_id.is_empty()).then(|| (device, client_id.to_owned()));
        if let Some(key) = &key {
            let replaced = self.lock().insert(key.clone(), (id, taken_over.clone()));
            if let Some((_, old)) = replaced {
                tracing::info!(%device, client_id, "MQTT client reconnected; closing its old connection");
                old.cancel();
            }
        }
        Claim {
            sessions: self.clone(),
            key,
            id,
            taken_over,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (u64, CancellationToken)>> {
        self.inner.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut open = self.sessions.lock();
        // Only if it is still ours: a newer connection may have replaced it.
        if open.get(&key).is_some_and(|(id, _)| *id == self.id) {
            open.remove(&key);
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
        let open = || sessions.lock().len();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let first = sessions.claim(a, "meter");
        let other_device = sessions.claim(b, "meter");
        let other_client = sessions.claim(a, "meter-2");
        assert!(!first.taken_over.is_cancelled());
        let second = sessions.claim(a, "meter");
        assert!(first.taken_over.is_cancelled());
        assert!(!other_device.taken_over.is_cancelled());
        assert!(!other_client.taken_over.is_cancelled());
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
        assert!(!first.taken_over.is_cancelled());
        assert!(sessions.lock().is_empty());
    }
}
