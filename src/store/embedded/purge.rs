//! Removing every trace of one device from the embedded store (`DELETE
//! /v1/devices/{id}?purge=true`): its events, their duplicate-index rows, its rollups
//! at every level, its fleet rows and its latest values.
//!
//! fjall has no range delete, so keys are removed one by one, in batches of
//! [`PURGE_BATCH`] committed under the write mutex: a month of a 1 Hz device is 2.6
//! million keys, too many for one batch in memory, and holding the mutex for all of
//! them would stall every other device's ingest meanwhile. The purge is idempotent:
//! interrupted, it is simply run again.

use std::ops::Bound;

use fjall::{Keyspace, PersistMode, Slice};

use super::{decode_key_tail, engine, id_key, ordered, Inner, WriteState};
use crate::model::{assigned_id_ts, DeviceId, UserId};
use crate::store::StoreError;

/// Keys removed per committed batch.
const PURGE_BATCH: usize = 10_000;

impl Inner {
    /// Removes the device's data; returns how many events were removed.
    pub(super) fn purge_device(&self, user: UserId, device: DeviceId) -> Result<u64, StoreError> {
        let mut prefix = ordered(user).to_vec();
        prefix.extend_from_slice(device.as_bytes());

        // Events, and with each its duplicate-index row, found from the event's id
        // (the index is keyed by id first, so it cannot be scanned by device).
        let mut events = 0u64;
        let mut after = None;
        while let Some(keys) = self.next_keys(&self.events, &prefix, &mut after)? {
            let mut batch = self.db.batch();
            for key in keys {
                let (ts, id) = decode_key_tail(&key)?;
                let index = id_key(device, id);
                // Rows exist only for ids whose time is not their event's (see
                // `Inner::write`); which keyspace holds one depends on the id's kind.
                match assigned_id_ts(id) {
                    Some(t) if t == ts => {}
                    Some(_) => {
                        batch.remove(&self.timed_ids, index);
                        if self.timed_in_ids {
                            batch.remove(&self.ids, index);
                        }
                    }
                    None => batch.remove(&self.ids, index),
                }
                batch.remove(&self.events, key);
                events += 1;
            }
            self.commit_locked(batch)?;
        }

        // Rows keyed by user and device first.
        let r = &self.rollups;
        for keyspace in [&r.minute, &r.old_minute, &r.coarse] {
            self.remove_matching(keyspace, &prefix, |_| true)?;
        }
        let mut latest_prefix = user.to_be_bytes().to_vec();
        latest_prefix.extend_from_slice(device.as_bytes());
        self.remove_matching(&self.latest, &latest_prefix, |_| true)?;
        // Fleet rows are keyed user | level | start | device | type: the user's slice
        // is read and the device's rows picked out.
        self.remove_matching(&r.fleet, &ordered(user), |key| {
            key.get(17..33) == Some(device.as_bytes().as_slice())
        })?;

        // The write caches may hold the removed rows; they are only caches, so they
        // are dropped whole.
        {
            let mut state = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
            *state = WriteState::default();
        }
        self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        Ok(events)
    }

    /// Removes the keys under `prefix` that `selected` picks, batch by batch.
    fn remove_matching(
        &self,
        keyspace: &Keyspace,
        prefix: &[u8],
        selected: impl Fn(&[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut after = None;
        while let Some(keys) = self.next_keys(keyspace, prefix, &mut after)? {
            let mut batch = self.db.batch();
            for key in keys.into_iter().filter(|k| selected(k)) {
                batch.remove(keyspace, key);
            }
            if !batch.is_empty() {
                self.commit_locked(batch)?;
            }
        }
        Ok(())
    }

    /// The next (at most [`PURGE_BATCH`]) keys under `prefix` after `after`, which
    /// moves on. Each scan starts past the last key seen rather than at the prefix:
    /// the keys already removed stay as tombstones until compaction, and skipping
    /// them again on every batch would cost the square of the device's size.
    fn next_keys(
        &self,
        keyspace: &Keyspace,
        prefix: &[u8],
        after: &mut Option<Slice>,
    ) -> Result<Option<Vec<Slice>>, StoreError> {
        let iter = match after.as_ref() {
            None => keyspace.prefix(prefix),
            Some(last) => {
                keyspace.range::<&[u8], _>((Bound::Excluded(last.as_ref()), Bound::Unbounded))
            }
        };
        let mut keys = Vec::new();
        for item in iter {
            let key = item.key().map_err(engine)?;
            if !key.starts_with(prefix) || keys.len() == PURGE_BATCH {
                break;
            }
            keys.push(key);
        }
        *after = keys.last().cloned();
        Ok((!keys.is_empty()).then_some(keys))
    }

    /// Commits a batch under the write mutex, so that no flush's read-modify-write
    /// of a rollup row interleaves with the removal of that row.
    fn commit_locked(&self, batch: fjall::OwnedWriteBatch) -> Result<(), StoreError> {
        let _state = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
        batch.commit().map_err(engine)
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::super::tests::batch;
    use super::super::EmbeddedStore;
    use crate::model::{assigned_id, PartitionBatch};

    fn flush(device: Uuid, ids: &[(Uuid, i64)]) -> Vec<PartitionBatch> {
        ids.iter()
            .map(|&(id, ts_ms)| batch(device, id, ts_ms, &[("x", 1.0)]))
            .collect()
    }

    /// The index keyspaces cannot be read through the trait: this checks that the
    /// purged device's rows leave both, and that another device's stay.
    #[test]
    fn a_purge_removes_the_devices_index_rows_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
        let inner = &store.inner;
        let ts = 1_800_000_000_000;
        let (gone, kept) = (Uuid::new_v4(), Uuid::new_v4());
        for device in [gone, kept] {
            // A random id (an `ids` row), a UUIDv7 of another time (a `timed_ids`
            // row), and a UUIDv7 of its own time (no row).
            let ids = [
                (Uuid::new_v4(), ts),
                (assigned_id(ts + 7), ts),
                (assigned_id(ts + 9), ts + 9),
            ];
            assert_eq!(inner.write(&flush(device, &ids)).unwrap(), vec![1, 1, 1]);
        }
        assert_eq!(inner.ids.len().unwrap(), 2);
        assert_eq!(inner.timed_ids.len().unwrap(), 2);
        assert_eq!(inner.purge_device(1, gone).unwrap(), 3);
        assert_eq!(inner.ids.len().unwrap(), 1);
        assert_eq!(inner.timed_ids.len().unwrap(), 1);
        assert_eq!(inner.events.len().unwrap(), 3);
        // Purging again finds nothing and changes nothing.
        assert_eq!(inner.purge_device(1, gone).unwrap(), 0);
        assert_eq!(inner.events.len().unwrap(), 3);
    }
}
