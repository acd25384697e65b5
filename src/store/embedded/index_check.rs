//! `iotpipe check`'s look at the duplicate indexes (`ids`, `timed_ids`): a row
//! names a device, an event id and a ts, which give the event's key once the device's
//! user is known (from the devices with stored events). A row whose event is not
//! stored makes a later event with that id look like a duplicate, and be dropped.

use std::collections::HashMap;

use fjall::PersistMode;
use uuid::Uuid;

use super::{corrupt, engine, event_key, unordered, Inner};
use crate::store::{IndexReport, StoreError, MAX_EXAMPLES};

/// Rows removed per batch when repairing.
const REPAIR_BATCH: usize = 10_000;

impl Inner {
    pub(super) fn check_index(&self, repair: bool) -> Result<IndexReport, StoreError> {
        let users: HashMap<Uuid, i64> = self
            .stored_devices()?
            .into_iter()
            .map(|(user, device)| (device, user))
            .collect();
        let mut report = IndexReport::default();
        for index in [&self.ids, &self.timed_ids] {
            let mut orphans = Vec::new();
            for item in index.iter() {
                let (key, value) = item.into_inner().map_err(engine)?;
                report.rows += 1;
                if key.len() != 32 || value.len() != 8 {
                    return Err(corrupt(format!("index row of {} bytes", key.len())));
                }
                let mut id = [0u8; 16];
                for (dst, src) in id.iter_mut().zip(key[..16].iter().rev()) {
                    *dst = *src;
                }
                let (id, device) = (
                    Uuid::from_bytes(id),
                    Uuid::from_slice(&key[16..]).map_err(corrupt)?,
                );
                let ts = unordered(value[..8].try_into().map_err(corrupt)?);
                let stored = match users.get(&device) {
                    Some(&user) => self
                        .events
                        .contains_key(event_key(user, device, self.bucket_len_ms, ts, id))
                        .map_err(engine)?,
                    None => false,
                };
                if !stored {
                    report.orphans += 1;
                    if report.examples.len() < MAX_EXAMPLES {
                        report.examples.push(format!("{device}/{id}"));
                    }
                    if repair {
                        orphans.push(key);
                    }
                }
            }
            for chunk in orphans.chunks(REPAIR_BATCH) {
                let mut batch = self.db.batch();
                for key in chunk {
                    batch.remove(index, key.clone());
                }
                // Under the write mutex: a flush checking this id meanwhile sees the
                // row or its absence, never half of a change.
                let _state = self.dedup.lock().unwrap_or_else(|e| e.into_inner());
                batch.commit().map_err(engine)?;
            }
        }
        if repair && report.orphans > 0 {
            self.db.persist(PersistMode::SyncAll).map_err(engine)?;
        }
        Ok(report)
    }
}
