//! The retention sweep of the embedded store: deletes what the tiers expired (see
//! `store::retention`). Reads already hide expired rows, so the sweep only gives the
//! disk back, and it may run late or be cut short by a crash without anyone seeing
//! the difference.
//!
//! Every keyspace here is ordered as groups (a device, a device's metric, a user's
//! level...) followed by a time, so expired rows are a prefix of each group: the
//! sweep seeks from group to group and deletes each group's prefix, without reading
//! the live rows. It deletes in small batches outside the write mutex, so ingest
//! never waits behind it: nothing it deletes can be written again, because ingest
//! refuses events that are already expired.

use fjall::Keyspace;

use super::devices::past;
use super::{engine, id_key, ordered, Inner};
use crate::model::{assigned_id_ts, bucket_start, DeviceId};
use crate::store::retention::Tier;
use crate::store::{Level, StoreError};

/// Rows deleted per batch: large enough to amortise a commit, small enough that the
/// journal is never held long.
const CHUNK: usize = 4_096;

/// Where a group's key prefix ends, and below which bytes after it rows are expired
/// (`None`: the group is kept).
type Bound = (usize, Option<Vec<u8>>);

impl Inner {
    /// Deletes every row expired at `now_ms`; returns how many went.
    pub(super) fn expire(&self, now_ms: i64) -> Result<u64, StoreError> {
        let r = self.retention;
        let first = |tier| r.first_visible(tier, now_ms);
        let mut deleted = 0;
        if let Some(first_raw) = first(Tier::Raw) {
            // An event key is user | device | bucket | ts | id: below the bucket and ts
            // of the first visible instant lies exactly what expired.
            let mut bound = ordered(bucket_start(first_raw, self.bucket_len_ms)).to_vec();
            bound.extend_from_slice(&ordered(first_raw));
            deleted += self.sweep(&self.events, |_| Ok((24, Some(bound.clone()))), true)?;
        }
        if let Some(first_minute) = first(Tier::Rollup(Level::Minute)) {
            // A row packs an hour of minutes: it goes once its last minute has.
            let last_minute = Level::Hour.ms() - Level::Minute.ms();
            let bound = ordered(first_minute - last_minute).to_vec();
            deleted += self.sweep(
                &self.rollups.minute,
                |key| {
                    let metric_len = usize::from(*key.get(24).ok_or_else(|| short(key))?);
                    Ok((25 + metric_len, Some(bound.clone())))
                },
                false,
            )?;
        }
        let level_bound = |tag: u8| -> Option<Vec<u8>> {
            let level = [Level::Hour, Level::Day]
                .into_iter()
                .find(|l| l.tag() == tag)?;
            first(Tier::Rollup(level)).map(|f| ordered(f).to_vec())
        };
        if first(Tier::Rollup(Level::Hour)).is_some() {
            // user | device | level | metric length | metric | start | type
            deleted += self.sweep(
                &self.rollups.coarse,
                |key| {
                    let (tag, metric_len) = match key.get(24..26) {
                        Some(&[tag, len]) => (tag, usize::from(len)),
                        _ => return Err(short(key)),
                    };
                    Ok((26 + metric_len, level_bound(tag)))
                },
                false,
            )?;
            // user | level | start | device | type
            deleted += self.sweep(
                &self.rollups.fleet,
                |key| {
                    let tag = *key.get(8).ok_or_else(|| short(key))?;
                    Ok((9, level_bound(tag)))
                },
                false,
            )?;
        }
        if deleted > 0 {
            tracing::info!(deleted, "retention sweep deleted expired rows");
        }
        Ok(deleted)
    }

    /// Deletes, in each group of `ks`, the rows below the group's bound. `events`:
    /// the rows are events, whose duplicate-index rows go with them.
    fn sweep(
        &self,
        ks: &Keyspace,
        bound_of: impl Fn(&[u8]) -> Result<Bound, StoreError>,
        events: bool,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let mut doomed = Vec::with_capacity(CHUNK);
        let mut cursor = Vec::new();
        loop {
            let Some(item) = ks.range(cursor.as_slice()..).next() else {
                break;
            };
            let key = item.key().map_err(engine)?;
            // A kept group is skipped whole, and only it: its neighbours may not be.
            let (len, bound) = bound_of(&key)?;
            let group = key.get(..len).ok_or_else(|| short(&key))?.to_vec();
            if let Some(bound) = bound {
                let hi = [group.as_slice(), &bound].concat();
                for item in ks.range(group.as_slice()..hi.as_slice()) {
                    doomed.push(item.key().map_err(engine)?);
                    if doomed.len() == CHUNK {
                        deleted += self.delete(ks, &mut doomed, events)?;
                    }
                }
            }
            let Some(next) = past(&group) else {
                break;
            };
            cursor = next;
        }
        deleted += self.delete(ks, &mut doomed, events)?;
        Ok(deleted)
    }

    fn delete(
        &self,
        ks: &Keyspace,
        keys: &mut Vec<fjall::UserKey>,
        events: bool,
    ) -> Result<u64, StoreError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut batch = self.db.batch();
        for key in keys.iter() {
            if events {
                if let Some(index_key) = index_row_of(key)? {
                    // Only one of the two holds it; deleting the absent one is cheap.
                    batch.remove(&self.ids, index_key);
                    batch.remove(&self.timed_ids, index_key);
                }
            }
            batch.remove(ks, key.clone());
        }
        batch.commit().map_err(engine)?;
        let n = keys.len() as u64;
        keys.clear();
        Ok(n)
    }
}

/// The duplicate-index key of a stored event, if it has one: only ids without their
/// event's ts in them are indexed (see `mod.rs`).
fn index_row_of(event_key: &[u8]) -> Result<Option<[u8; 32]>, StoreError> {
    let (ts, id) = super::decode_key_tail(event_key)?;
    if assigned_id_ts(id) == Some(ts) {
        return Ok(None);
    }
    let device = DeviceId::from_slice(&event_key[8..24]).map_err(super::corrupt)?;
    Ok(Some(id_key(device, id)))
}

fn short(key: &[u8]) -> StoreError {
    StoreError::Corrupt(format!("a key of {} bytes", key.len()))
}
