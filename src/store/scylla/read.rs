//! The read path: a device's buckets from the index, then slices of each bucket's
//! partition, a few buckets at a time.

use futures::stream::{self, StreamExt, TryStreamExt};

use super::rows::{
    ms, BucketOut, BucketRangeIn, CountOut, EventOut, LatestOut, MetricOut, SliceBeforeIn, SliceIn,
    SlicesIn,
};
use super::Inner;
use crate::model::{bucket_start, DeviceId, Event, UserId};
use crate::store::latest::Latest;
use crate::store::{ListQuery, Point, PointQuery, StoreError};

/// Buckets of one device scanned at once by one read.
const READ_FANOUT: usize = 4;

impl Inner {
    /// The buckets of a device that hold events in `[from_ms, to_ms)`, newest first.
    pub(super) async fn buckets(
        &self,
        user: UserId,
        device: DeviceId,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, StoreError> {
        if from_ms >= to_ms {
            return Ok(Vec::new());
        }
        let len = self.settings.bucket_len_ms;
        let range = BucketRangeIn {
            user_id: user,
            device_id: device,
            lo: ms(bucket_start(from_ms, len)),
            hi: ms(bucket_start(to_ms - 1, len)),
        };
        let rows: Vec<BucketOut> = self.all_rows(&self.cql.select_buckets, range).await?;
        Ok(rows.into_iter().map(|b| b.bucket.0).collect())
    }

    /// Up to `limit` events of one bucket, newest first.
    async fn list_bucket(&self, q: &ListQuery, bucket: i64) -> Result<Vec<Event>, StoreError> {
        let rows = match q.before.filter(|p| p.ts_ms < q.to_ms) {
            Some(p) => {
                let v = SliceBeforeIn {
                    user_id: q.user_id,
                    device_id: q.device_id,
                    bucket: ms(bucket),
                    before_ts: ms(p.ts_ms),
                    before_id: p.id,
                };
                self.rows::<EventOut>(&self.cql.list_before, v).await?
            }
            None => {
                let v = SliceIn {
                    user_id: q.user_id,
                    device_id: q.device_id,
                    bucket: ms(bucket),
                    from_ts: ms(q.from_ms),
                    to_ts: ms(q.to_ms),
                };
                self.rows::<EventOut>(&self.cql.list_slice, v).await?
            }
        };
        // Newest first: the first row older than `from` ends the bucket's slice.
        rows.try_take_while(|r| futures::future::ready(Ok(r.ts.0 >= q.from_ms)))
            .try_filter(|r| futures::future::ready(q.kind.as_deref().is_none_or(|k| k == r.kind)))
            .take(q.limit)
            .map_ok(|r| Event {
                id: r.event_id,
                id_assigned: false,
                ts_ms: r.ts.0,
                kind: r.kind,
                metrics: r.metrics.unwrap_or_default().into_iter().collect(),
                attrs: r.attrs.unwrap_or_default().into_iter().collect(),
            })
            .try_collect()
            .await
    }

    pub(super) async fn list(&self, q: &ListQuery) -> Result<Vec<Event>, StoreError> {
        let hi = match q.before {
            Some(p) if p.ts_ms < q.to_ms => p.ts_ms + 1,
            _ => q.to_ms,
        };
        let buckets = self.buckets(q.user_id, q.device_id, q.from_ms, hi).await?;
        let mut out = Vec::with_capacity(q.limit.min(1024));
        let mut pages = stream::iter(buckets)
            .map(|b| self.list_bucket(q, b))
            .buffered(READ_FANOUT);
        while let Some(page) = pages.try_next().await? {
            out.extend(page.into_iter().take(q.limit - out.len()));
            if out.len() == q.limit {
                break;
            }
        }
        Ok(out)
    }

    async fn points_bucket(&self, q: &PointQuery, bucket: i64) -> Result<Vec<Point>, StoreError> {
        let slice = SliceIn {
            user_id: q.user_id,
            device_id: q.device_id,
            bucket: ms(bucket),
            from_ts: ms(q.from_ms),
            to_ts: ms(q.to_ms),
        };
        let kind_ok = |k: &str| q.kind.as_deref().is_none_or(|want| want == k);
        match &q.metric {
            Some(metric) => {
                let slice = SlicesIn {
                    user_id: slice.user_id,
                    device_id: slice.device_id,
                    buckets: vec![slice.bucket],
                    from_ts: slice.from_ts,
                    to_ts: slice.to_ts,
                };
                let mut rows = self
                    .rows::<MetricOut>(&self.cql.metric_slice, slice)
                    .await?;
                let mut out = Vec::new();
                while let Some(r) = rows.try_next().await? {
                    let value = r.metrics.as_ref().and_then(|m| m.get(metric).copied());
                    if let (true, Some(v)) = (kind_ok(&r.kind), value) {
                        out.push(Point {
                            ts_ms: r.ts.0,
                            value: Some(v),
                            kind: q.with_kind.then_some(r.kind),
                        });
                    }
                }
                Ok(out)
            }
            None => {
                let mut rows = self.rows::<CountOut>(&self.cql.count_slice, slice).await?;
                let mut out = Vec::new();
                while let Some(r) = rows.try_next().await? {
                    if kind_ok(&r.kind) {
                        out.push(Point {
                            ts_ms: r.ts.0,
                            value: None,
                            kind: q.with_kind.then_some(r.kind),
                        });
                    }
                }
                Ok(out)
            }
        }
    }

    pub(super) async fn points(&self, q: &PointQuery) -> Result<Vec<Point>, StoreError> {
        let mut buckets = self
            .buckets(q.user_id, q.device_id, q.from_ms, q.to_ms)
            .await?;
        buckets.reverse();
        let parts: Vec<Vec<Point>> = stream::iter(buckets)
            .map(|b| self.points_bucket(q, b))
            .buffered(READ_FANOUT)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    pub(super) async fn latest(
        &self,
        user: UserId,
        device: Option<DeviceId>,
    ) -> Result<Vec<Latest>, StoreError> {
        let rows: Vec<LatestOut> = match device {
            Some(d) => (self.all_rows(&self.cql.select_device_latest, (user, d))).await?,
            None => self.all_rows(&self.cql.select_latest, (user,)).await?,
        };
        Ok(rows
            .into_iter()
            .map(|r| Latest {
                device_id: r.device_id,
                metric: r.metric,
                ts_ms: r.ts.0,
                value: r.value,
            })
            .collect())
    }
}
