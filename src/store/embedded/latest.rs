//! The embedded store's `latest` keyspace: key = user (8) | device (16) | metric, value
//! = ts (8) | value (8), big-endian. Updated in the same atomic batch as the events,
//! under the write mutex, only when the flush holds a newer value.

use fjall::OwnedWriteBatch as WriteBatch;

use super::{corrupt, engine, Inner, WriteState, CACHE_ROWS};
use crate::model::{DeviceId, Record, UserId};
use crate::store::latest::{is_newer, newest, Latest};
use crate::store::StoreError;

/// A `latest` row: its key, and (ts, value).
pub(super) type LatestRow = (Vec<u8>, (i64, f64));

fn key(user: UserId, device: DeviceId, metric: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(24 + metric.len());
    k.extend_from_slice(&user.to_be_bytes());
    k.extend_from_slice(device.as_bytes());
    k.extend_from_slice(metric.as_bytes());
    k
}

fn decode(value: &[u8]) -> Result<(i64, f64), StoreError> {
    let ts = value.get(..8).ok_or_else(|| corrupt("short latest row"))?;
    let v = value
        .get(8..16)
        .ok_or_else(|| corrupt("short latest row"))?;
    Ok((
        i64::from_be_bytes(ts.try_into().map_err(corrupt)?),
        f64::from_be_bytes(v.try_into().map_err(corrupt)?),
    ))
}

impl Inner {
    /// Adds to `batch` the rows of `records` that are newer than what is stored;
    /// returns them for the cache, to be kept once the batch is committed.
    pub(super) fn newer_latest(
        &self,
        state: &mut WriteState,
        records: Vec<&Record>,
        batch: &mut WriteBatch,
    ) -> Result<Vec<LatestRow>, StoreError> {
        let candidates = newest(records);
        if state.latest.len() + candidates.len() > CACHE_ROWS {
            state.latest.clear();
        }
        let mut out = Vec::new();
        for ((user, device, metric), (ts, v)) in candidates {
            let k = key(user, device, metric);
            let old = match state.latest.get(&k) {
                Some(cached) => Some(*cached),
                None => match self.latest.get(&k).map_err(engine)? {
                    Some(bytes) => Some(decode(&bytes)?),
                    None => None,
                },
            };
            if old.is_none_or(|old| is_newer(ts, v, old)) {
                let mut value = [0u8; 16];
                value[..8].copy_from_slice(&ts.to_be_bytes());
                value[8..].copy_from_slice(&v.to_be_bytes());
                batch.insert(&self.latest, k.clone(), value);
                out.push((k, (ts, v)));
            }
        }
        Ok(out)
    }

    pub(super) fn read_latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<Latest>, StoreError> {
        let mut prefix = user.to_be_bytes().to_vec();
        if let Some(d) = device {
            prefix.extend_from_slice(d.as_bytes());
        }
        let mut out = Vec::new();
        for item in self.latest.prefix(&prefix) {
            let (k, v) = item.into_inner().map_err(engine)?;
            let device_id = DeviceId::from_slice(&k[8..24]).map_err(corrupt)?;
            let metric = std::str::from_utf8(&k[24..]).map_err(corrupt)?.to_owned();
            let (ts_ms, value) = decode(&v)?;
            out.push(Latest {
                device_id,
                metric,
                ts_ms,
                value,
            });
        }
        Ok(out)
    }
}
