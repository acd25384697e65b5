//! The devices that have stored events, found by skipping through the `events`
//! keyspace: one seek per device (to the first key past the previous device's
//! prefix), not one step per event.

use uuid::Uuid;

use super::{corrupt, engine, unordered, Inner};
use crate::model::{DeviceId, UserId};
use crate::store::StoreError;

/// The key prefix of one device: user (8) | device (16).
const DEVICE_PREFIX: usize = 24;

/// The smallest byte string greater than every key starting with `prefix`, or
/// `None` when the prefix is all 0xff.
pub(super) fn past(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut next = prefix.to_vec();
    while let Some(last) = next.pop() {
        if last < u8::MAX {
            next.push(last + 1);
            return Some(next);
        }
    }
    None
}

impl Inner {
    pub(super) fn stored_devices(&self) -> Result<Vec<(UserId, DeviceId)>, StoreError> {
        let mut out = Vec::new();
        let mut from = Vec::new();
        loop {
            let Some(item) = self.events.range(from.as_slice()..).next() else {
                break;
            };
            let key = item.key().map_err(engine)?;
            let prefix = key
                .get(..DEVICE_PREFIX)
                .ok_or_else(|| corrupt(format!("event key of {} bytes", key.len())))?;
            let user = unordered(prefix[..8].try_into().map_err(corrupt)?);
            let device = Uuid::from_slice(&prefix[8..]).map_err(corrupt)?;
            out.push((user, device));
            match past(prefix) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::past;

    #[test]
    fn past_a_prefix_carries_over_full_bytes() {
        assert_eq!(past(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(past(&[1, 0xff]), Some(vec![2]));
        assert_eq!(past(&[0xff, 0xff]), None);
    }
}
