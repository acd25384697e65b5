//! The write path: duplicate lookups, per-partition batches, then the id index.

use std::collections::HashSet;

use scylla::statement::batch::{Batch, BatchType};

use super::errors::{corrupt, exec_error};
use super::pending::{Markers, MinuteKey};
use super::rows::{
    event_row, ms, split_by_bytes, BucketIn, EventIn, EventKeyIn, IdIn, IdKeyIn, IdOut, LatestIn,
};
use super::Inner;
use crate::model::PartitionBatch;
use crate::model::{assigned_id_ts, bucket_start, now_ms, DeviceId, Record, UserId};
use crate::store::latest::newest;
use crate::store::retention::Tier;
use crate::store::{StoreError, ROLLUP_MS};

/// The distinct (user, device, minute) triples of `records`.
fn minutes<'a>(records: impl Iterator<Item = &'a Record>) -> Vec<MinuteKey> {
    let mut seen = HashSet::new();
    records
        .map(|r| {
            (
                r.user_id,
                r.device_id,
                bucket_start(r.event.ts_ms, ROLLUP_MS),
            )
        })
        .filter(|k| seen.insert(*k))
        .collect()
}

impl Inner {
    pub(super) async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits
            .acquire()
            .await
            .expect("the semaphore is never closed")
    }

    /// Whether the event's id is already stored for its device.
    async fn is_known(&self, r: &Record) -> Result<bool, StoreError> {
        if r.event.id_assigned {
            // The server made this id just now: it cannot have been stored before.
            return Ok(false);
        }
        let _p = self.permit().await;
        if assigned_id_ts(r.event.id) == Some(r.event.ts_ms) {
            // A device may send back an id the server assigned (a retry of an event
            // it was told about). Such ids were never written to `event_ids`, but
            // their time is their event's ts, so their own event row is found.
            let key = EventKeyIn {
                user_id: r.user_id,
                device_id: r.device_id,
                bucket: ms(bucket_start(r.event.ts_ms, self.settings.bucket_len_ms)),
                ts: ms(r.event.ts_ms),
                event_id: r.event.id,
            };
            let rows = self
                .session
                .execute_unpaged(&self.cql.select_event_key, key)
                .await
                .map_err(exec_error)?
                .into_rows_result()
                .map_err(corrupt)?;
            if rows.maybe_first_row::<IdOut>().map_err(corrupt)?.is_some() {
                return Ok(true);
            }
        }
        let key = IdKeyIn {
            device_id: r.device_id,
            event_id: r.event.id,
        };
        let rows = self
            .session
            .execute_unpaged(&self.cql.select_id, key)
            .await
            .map_err(exec_error)?
            .into_rows_result()
            .map_err(corrupt)?;
        Ok(rows.maybe_first_row::<IdOut>().map_err(corrupt)?.is_some())
    }

    async fn write_run(&self, run: &[&Record]) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let len = self.settings.bucket_len_ms;
        let now = now_ms();
        let ttl = |r: &Record| {
            self.settings
                .retention
                .ttl(Tier::Raw, r.event.ts_ms, now)
                .cql()
        };
        if let [one] = run {
            self.session
                .execute_unpaged(&self.cql.insert_event, event_row(one, len, ttl(one)))
                .await
                .map_err(exec_error)?;
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in run {
            batch.append_statement(self.cql.insert_event.clone());
        }
        batch.set_is_idempotent(true);
        let rows: Vec<EventIn<'_>> = run.iter().map(|r| event_row(r, len, ttl(r))).collect();
        self.session.batch(&batch, rows).await.map_err(exec_error)?;
        Ok(())
    }

    /// The `buckets` index rows of the partitions written, one device's in shared
    /// batches (its partition of `buckets`): a fleet flush writes a day of a device in
    /// 24 small partitions, and one write per bucket row cost as much as its events.
    async fn write_buckets(&self, partitions: &[&PartitionBatch]) -> Result<(), StoreError> {
        let now = now_ms();
        let mut rows: Vec<BucketIn> = partitions
            .iter()
            .map(|p| {
                // The bucket row goes with the bucket's last instant.
                let last_ms = p.key.bucket_ms + self.settings.bucket_len_ms - 1;
                BucketIn {
                    user_id: p.key.user_id,
                    device_id: p.key.device_id,
                    bucket: ms(p.key.bucket_ms),
                    ttl: self.settings.retention.ttl(Tier::Raw, last_ms, now).cql(),
                }
            })
            .collect();
        rows.sort_unstable_by_key(|r| (r.user_id, r.device_id));
        self.write_grouped(&self.cql.insert_bucket, &rows, |r| (r.user_id, r.device_id))
            .await
    }

    /// Writes mark rows, grouped by partition (a device's hours, a user's 28 days of
    /// hours) into unlogged batches: a fleet flush of a few devices marks a day of
    /// hours each, and one write each was most of its cost. The minutes of a mark go
    /// in one set update, not a row each. The partitions are written concurrently.
    async fn write_markers(&self, markers: &mut Markers) -> Result<(), StoreError> {
        markers
            .minutes
            .sort_unstable_by_key(|m| (m.user_id, m.device_id));
        let per_device = self.write_grouped(&self.cql.insert_pending, &markers.minutes, |r| {
            (r.user_id, r.device_id)
        });
        // `claim` sorted these by partition.
        let per_slab = self.write_grouped(&self.cql.insert_pending_hour, &markers.days, |r| {
            (r.user_id, r.slab.0)
        });
        futures::future::try_join(per_device, per_slab).await?;
        self.recomputer.pending.confirm(markers);
        Ok(())
    }

    async fn write_latest(
        &self,
        (user, device, metric): (UserId, DeviceId, &str),
        (ts, value): (i64, f64),
    ) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let row = LatestIn {
            user_id: user,
            device_id: device,
            metric,
            ts: ms(ts),
            value,
            // Microseconds: a later event's row wins whatever order they arrive in.
            writetime: ts.saturating_mul(1000),
        };
        self.session
            .execute_unpaged(&self.cql.insert_latest, row)
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    async fn write_id(&self, r: &Record) -> Result<(), StoreError> {
        let _p = self.permit().await;
        let row = IdIn {
            device_id: r.device_id,
            event_id: r.event.id,
            ts: ms(r.event.ts_ms),
            ttl: (self.settings.retention)
                .ttl(Tier::Raw, r.event.ts_ms, now_ms())
                .cql(),
        };
        self.session
            .execute_unpaged(&self.cql.insert_id, row)
            .await
            .map_err(exec_error)?;
        Ok(())
    }

    pub(super) async fn write(
        &self,
        partitions: &[PartitionBatch],
    ) -> Result<Vec<usize>, StoreError> {
        // 0. Pending minutes are held in memory until recomputed: past the bound, the
        //    flush is refused as overload, so the pipeline retries it with backoff and
        //    then answers 503, and its queues fill instead of this instance's memory.
        let backlog = self.recomputer.pending.backlog();
        if backlog >= self.settings.rollup_backlog_max {
            return Err(StoreError::Unavailable(format!(
                "{backlog} minutes wait for their rollups (store.rollup_backlog_max)"
            )));
        }
        // 1. Drop duplicates within the flush, then look the rest up.
        let mut in_flush = HashSet::new();
        let candidates: Vec<Vec<&Record>> = partitions
            .iter()
            .map(|p| {
                p.records
                    .iter()
                    .filter(|r| in_flush.insert((r.device_id, r.event.id)))
                    .collect()
            })
            .collect();
        // The semaphore bounds how many of these lookups are in flight.
        let lookups = candidates.iter().flatten().map(|r| self.is_known(r));
        let known = futures::future::try_join_all(lookups).await?;
        let mut known = known.into_iter();
        let fresh: Vec<Vec<&Record>> = candidates
            .iter()
            .map(|rs| {
                rs.iter()
                    .copied()
                    .filter(|_| !known.next().unwrap_or(false))
                    .collect()
            })
            .collect();

        // 2. The minutes whose rollups this flush changes are pending until a
        //    recomputation has read its events (see rollup.rs and pending.rs). Marked
        //    first, so a crash after the events leaves them marked for the sweep. The
        //    claim is released when this function returns, failed or not.
        let (claim, mut markers) = self
            .recomputer
            .pending
            .claim(minutes(fresh.iter().flatten().copied()));
        self.write_markers(&mut markers).await?;

        // 3. Events, and the bucket index, partition by partition.
        let max = self.settings.batch_max_bytes;
        let mut writes = Vec::new();
        let mut written = Vec::new();
        for (p, rs) in partitions.iter().zip(&fresh) {
            if rs.is_empty() {
                continue;
            }
            for run in split_by_bytes(rs, max) {
                writes.push(async move { self.write_run(&run).await });
            }
            written.push(p);
        }
        futures::future::try_join(
            futures::future::try_join_all(writes),
            self.write_buckets(&written),
        )
        .await?;

        // 3b. The newest values. Before the ids, so that a flush that fails before them
        //     is retried in full and writes these again.
        let newest = newest(fresh.iter().flatten().copied());
        futures::future::try_join_all(newest.iter().map(|(k, v)| self.write_latest(*k, *v)))
            .await?;

        // 4. Only now the ids (see the module docs). Ids the server assigned need no
        //    row: nobody else can hold them, and their event row finds them.
        let ids = fresh.iter().flatten().filter(|r| !r.event.id_assigned);
        futures::future::try_join_all(ids.map(|r| self.write_id(r))).await?;

        // 5. The events are durable; their rollups follow, once the minutes are quiet.
        drop(claim);
        Ok(fresh.iter().map(Vec::len).collect())
    }
}
