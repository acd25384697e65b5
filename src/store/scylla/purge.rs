//! Removing every trace of one device from the wide-column store (`DELETE
//! /v1/devices/{id}?purge=true`).
//!
//! What a device holds, and how it is found: its buckets come from the `buckets`
//! index; each bucket is one `events` partition, and its event ids name the
//! `event_ids` rows (keyed by device and id, so they cannot be found otherwise); the
//! buckets' days and slabs name the `rollups` and `rollups_coarse` partitions;
//! `pending_by_device` is one partition per device; `latest` rows are one clustering
//! prefix of the user's partition; its `fleet_by_type` rows are one row per type
//! (the types of its count rows in `rollups_coarse`, and the totals' "") in the
//! user's fleet partitions of its buckets' days, and its `pending_by_user` marks a
//! prefix (hour, device) of the user's partitions, for each hour of its buckets.
//! Everything is removed by partition or prefix deletes (one tombstone each), except
//! `event_ids` (one per event).
//!
//! Order: per bucket, the ids first, then the events partition; the fleet rows before
//! the `rollups_coarse` partitions that name their types; the `buckets` index last.
//! A purge that stops half-way is therefore found again and finished by the next
//! run: what is left is always reachable from the index.
//!
//! Rollup rows are written `USING TIMESTAMP` their count, so a delete at the current
//! time also shadows what a recomputation still queued for the device would write
//! later. Latest rows are written with their event's time, which may run up to five
//! minutes ahead of this node's clock; their delete is stamped a day ahead for that.

use std::collections::BTreeSet;

use futures::stream::{self, StreamExt, TryStreamExt};
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use super::errors::{exec_error, prepare_error};
use super::fleet::fleet_slab_ms;
use super::levels::slab_ms;
use super::pending::{DAY_MS, HOUR_MS, HOUR_SLAB_MS};
use super::rows::ms;
use super::Inner;
use crate::model::{bucket_start, buckets_in, now_ms, DeviceId, UserId, MIN_TS_MS, QUERY_AHEAD_MS};
use crate::store::{Level, StoreError};

/// Id rows deleted at once.
const DELETE_FANOUT: usize = 64;

impl Inner {
    async fn prepare(&self, cql: String) -> Result<PreparedStatement, StoreError> {
        let mut statement = self.session.prepare(cql).await.map_err(prepare_error)?;
        // Deletes by whole key: safe to retry.
        statement.set_is_idempotent(true);
        Ok(statement)
    }

    /// Removes the device's data; returns how many events were removed.
    pub(super) async fn purge_device(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<u64, StoreError> {
        let ks = &self.settings.keyspace;
        let select_ids = self
            .prepare(format!(
                "SELECT event_id FROM {ks}.events WHERE user_id = ? AND device_id = ? AND bucket = ?"
            ))
            .await?;
        let delete_id = self
            .prepare(format!(
                "DELETE FROM {ks}.event_ids WHERE device_id = ? AND event_id = ?"
            ))
            .await?;
        let delete_bucket = self
            .prepare(format!(
                "DELETE FROM {ks}.events WHERE user_id = ? AND device_id = ? AND bucket = ?"
            ))
            .await?;
        let delete_day = self
            .prepare(format!(
                "DELETE FROM {ks}.rollups WHERE user_id = ? AND device_id = ? AND day = ?"
            ))
            .await?;
        let delete_slab = self
            .prepare(format!(
                "DELETE FROM {ks}.rollups_coarse WHERE user_id = ? AND device_id = ? AND level = ? AND slab = ?"
            ))
            .await?;
        let delete_latest = self
            .prepare(format!(
                "DELETE FROM {ks}.latest USING TIMESTAMP ? WHERE user_id = ? AND device_id = ?"
            ))
            .await?;
        let select_types = self
            .prepare(format!(
                "SELECT type FROM {ks}.rollups_coarse WHERE user_id = ? AND device_id = ? \
                 AND level = ? AND slab = ? AND metric = ''"
            ))
            .await?;
        let delete_fleet = self
            .prepare(format!(
                "DELETE FROM {ks}.fleet_by_type WHERE user_id = ? AND level = ? AND slab = ? \
                 AND type = ? AND device_id = ?"
            ))
            .await?;
        let delete_hour_markers = self
            .prepare(format!(
                "DELETE FROM {ks}.pending_by_user WHERE user_id = ? AND slab = ? AND hour = ? \
                 AND device_id = ?"
            ))
            .await?;
        let delete_device = |table: &str| {
            self.prepare(format!(
                "DELETE FROM {ks}.{table} WHERE user_id = ? AND device_id = ?"
            ))
        };
        let delete_pending = delete_device("pending_by_device").await?;
        let delete_index = delete_device("buckets").await?;

        let len = self.settings.bucket_len_ms;
        let buckets = self
            .buckets(user, device, MIN_TS_MS, now_ms() + QUERY_AHEAD_MS)
            .await?;
        let mut events = 0u64;
        let (mut days, mut slabs, mut hours) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        for bucket in buckets {
            let key = (user, device, ms(bucket));
            let ids: Vec<(Uuid,)> = self.all_rows(&select_ids, key).await?;
            events += ids.len() as u64;
            let delete_id = &delete_id;
            stream::iter(ids)
                .map(|(id,)| async move {
                    let _p = self.permit().await;
                    self.session
                        .execute_unpaged(delete_id, (device, id))
                        .await
                        .map_err(exec_error)
                })
                .buffer_unordered(DELETE_FANOUT)
                .try_collect::<Vec<_>>()
                .await?;
            self.session
                .execute_unpaged(&delete_bucket, key)
                .await
                .map_err(exec_error)?;
            // The hours of its marks' rows by user: a day mark's is its day's start.
            for (hour, _, _) in buckets_in(bucket, bucket + len, HOUR_MS) {
                hours.insert(hour);
                hours.insert(bucket_start(hour, DAY_MS));
            }
            // Every day and slab the bucket's events may have rollups in.
            for (day, _, _) in buckets_in(bucket, bucket + len, DAY_MS) {
                days.insert(day);
                for level in [Level::Hour, Level::Day] {
                    slabs.insert((level.tag(), bucket_start(day, slab_ms(level))));
                }
            }
        }
        // The device's rows in the user's fleet partitions, one per type it has count
        // rows of, and its totals.
        let mut types = BTreeSet::from([String::new()]);
        for (level, slab) in &slabs {
            let values = (user, device, i32::from(*level), ms(*slab));
            let rows: Vec<(String,)> = self.all_rows(&select_types, values).await?;
            types.extend(rows.into_iter().map(|(kind,)| kind));
        }
        let fleet_slabs: BTreeSet<(Level, i64)> = days
            .iter()
            .flat_map(|day| {
                [Level::Hour, Level::Day]
                    .map(|level| (level, bucket_start(*day, fleet_slab_ms(level))))
            })
            .collect();
        for (level, slab) in fleet_slabs {
            for kind in &types {
                let values = (user, i32::from(level.tag()), ms(slab), kind, device);
                self.session
                    .execute_unpaged(&delete_fleet, values)
                    .await
                    .map_err(exec_error)?;
            }
        }
        for day in &days {
            self.session
                .execute_unpaged(&delete_day, (user, device, ms(*day)))
                .await
                .map_err(exec_error)?;
        }
        for (level, slab) in slabs {
            let values = (user, device, i32::from(level), ms(slab));
            self.session
                .execute_unpaged(&delete_slab, values)
                .await
                .map_err(exec_error)?;
        }
        // Its marks in the user's partitions.
        stream::iter(hours)
            .map(|hour| {
                let values = (user, ms(bucket_start(hour, HOUR_SLAB_MS)), ms(hour), device);
                let delete_hour_markers = &delete_hour_markers;
                async move {
                    let _p = self.permit().await;
                    self.session
                        .execute_unpaged(delete_hour_markers, values)
                        .await
                        .map_err(exec_error)
                }
            })
            .buffer_unordered(DELETE_FANOUT)
            .try_collect::<Vec<_>>()
            .await?;
        let ahead_us = (now_ms() + DAY_MS) * 1000;
        self.session
            .execute_unpaged(&delete_latest, (ahead_us, user, device))
            .await
            .map_err(exec_error)?;
        for statement in [&delete_pending, &delete_index] {
            self.session
                .execute_unpaged(statement, (user, device))
                .await
                .map_err(exec_error)?;
        }
        Ok(events)
    }
}
