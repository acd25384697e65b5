//! Aggregates: a device's windows, and counts grouped over a fleet, read along the
//! plan (`plan.rs`) from whatever each store keeps.

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt, TryStreamExt};
use futures::FutureExt;

use super::groups::{GroupBy, GroupCount, Tally};
use super::plan::{plan, refine, Segment, Source};
use super::windows::{Grid, Window, Windows};
use super::{Range, Scope};
use crate::model::DeviceId;
use crate::store::{
    EventStore, FleetQuery, Level, Point, PointQuery, RollupQuery, Sketch, StoreError, Summary,
};

/// How many chunks a device scan is split into, at most.
const SCAN_CHUNKS: i64 = 8;

/// How many reads run at once for one query.
const READ_CONCURRENCY: usize = 8;

/// Filters for an aggregate.
#[derive(Debug, Clone, Default)]
pub struct AggregateFilter {
    pub metric: Option<String>,
    pub kind: Option<String>,
    /// Merge the metric's sketches too (percentiles were asked for).
    pub sketches: bool,
}

/// Events summarized over an interval that lies inside one window (one event, for a
/// raw read).
struct Piece {
    at_ms: i64,
    kind: Option<String>,
    summary: Summary,
    sketch: Option<Sketch>,
}

/// One device's reads.
#[derive(Clone, Copy)]
struct DeviceRead<'a> {
    scope: Scope<'a>,
    device_id: DeviceId,
    filter: &'a AggregateFilter,
    /// Keep each piece's event type (grouping by type).
    with_kind: bool,
}

impl<'a> DeviceRead<'a> {
    async fn all(self, segments: Vec<Segment>) -> Result<Vec<Piece>, StoreError> {
        let parts: Vec<Vec<Piece>> = stream::iter(segments)
            .map(|s| self.read(s))
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    /// One segment; a level the store does not keep is read at the finer ones.
    fn read(self, segment: Segment) -> BoxFuture<'a, Result<Vec<Piece>, StoreError>> {
        async move {
            let level = match segment.source {
                Source::Raw => return self.raw(segment.range).await,
                // Minutes keep no sketches (see `store::rollup`): percentiles of
                // minute pieces come from their events.
                Source::Rollup(Level::Minute) if self.filter.sketches => {
                    return self.raw(segment.range).await
                }
                Source::Rollup(level) => level,
            };
            let q = RollupQuery {
                user_id: self.scope.user_id,
                device_id: self.device_id,
                level,
                from_ms: segment.range.from_ms,
                to_ms: segment.range.to_ms,
                metric: self.filter.metric.clone(),
                kind: self.filter.kind.clone(),
            };
            match self.scope.store.rollups(q).await? {
                Some(rows) => Ok(rows
                    .into_iter()
                    .map(|r| Piece {
                        at_ms: r.start_ms,
                        kind: self.with_kind.then_some(r.kind),
                        summary: r.summary,
                        sketch: r.sketch.filter(|_| self.filter.sketches),
                    })
                    .collect()),
                None => {
                    let mut out = Vec::new();
                    for s in refine(segment.range, finer(level)) {
                        out.extend(self.read(s).await?);
                    }
                    Ok(out)
                }
            }
        }
        .boxed()
    }

    async fn raw(self, range: Range) -> Result<Vec<Piece>, StoreError> {
        let template = PointQuery {
            user_id: self.scope.user_id,
            device_id: self.device_id,
            from_ms: range.from_ms,
            to_ms: range.to_ms,
            kind: self.filter.kind.clone(),
            metric: self.filter.metric.clone(),
            with_kind: self.with_kind,
        };
        let chunks = points(self.scope, template, range).await?;
        Ok(chunks
            .into_iter()
            .flatten()
            .map(|p| {
                let mut summary = Summary::EMPTY;
                summary.add(p.value);
                Piece {
                    at_ms: p.ts_ms,
                    kind: p.kind,
                    summary,
                    sketch: p.value.filter(|_| self.filter.sketches).map(Sketch::of),
                }
            })
            .collect())
    }
}

/// The levels finer than `level`, coarsest first.
fn finer(level: Level) -> &'static [Level] {
    let all = &Level::COARSEST_FIRST;
    let i = all.iter().position(|l| *l == level).unwrap_or(all.len());
    &all[(i + 1).min(all.len())..]
}

/// Scans one device's points over a range, in parallel chunks, in time order.
async fn points(
    scope: Scope<'_>,
    template: PointQuery,
    range: Range,
) -> Result<Vec<Vec<Point>>, StoreError> {
    let store: &dyn EventStore = scope.store;
    let queries = range
        .chunks(scope.bucket_len_ms, SCAN_CHUNKS)
        .into_iter()
        .map(|chunk| PointQuery {
            from_ms: chunk.from_ms,
            to_ms: chunk.to_ms,
            ..template.clone()
        });
    stream::iter(queries)
        .map(|q| store.points(q))
        .buffered(READ_CONCURRENCY)
        .try_collect()
        .await
}

/// The windows of one device. With a metric, only events carrying it are counted and
/// its statistics are filled.
///
/// # Errors
///
/// A store failure.
pub async fn device_aggregate(
    scope: Scope<'_>,
    device_id: DeviceId,
    grid: Grid,
    range: Range,
    filter: AggregateFilter,
) -> Result<Vec<Window>, StoreError> {
    let segments = plan(&grid, range);
    let read = DeviceRead {
        scope,
        device_id,
        filter: &filter,
        with_kind: false,
    };
    let pieces = read.all(segments).await?;
    let mut windows = if filter.sketches {
        Windows::with_sketches(grid)
    } else {
        Windows::new(grid)
    };
    for p in &pieces {
        windows.merge(p.at_ms, &p.summary);
        if let Some(s) = &p.sketch {
            windows.merge_sketch(p.at_ms, s);
        }
    }
    Ok(windows.finish())
}

/// The newest value of the filter's metric before `before_ms`, looking back up to a
/// year: what `fill=previous` and `fill=linear` carry into a range.
///
/// # Errors
///
/// A store failure.
pub async fn last_value_before(
    scope: Scope<'_>,
    device_id: DeviceId,
    filter: &AggregateFilter,
    before_ms: i64,
) -> Result<Option<(i64, f64)>, StoreError> {
    const LOOK_BACK_DAYS: i64 = 366;
    let day = Level::Day.ms();
    let read = DeviceRead {
        scope,
        device_id,
        filter,
        with_kind: false,
    };
    let last_in = |pieces: Vec<Piece>| {
        pieces
            .last()
            .map(|p| (p.at_ms, p.summary.sum / p.summary.count.max(1) as f64))
    };
    // The day `before_ms` is in, raw; then the newest earlier day that has the metric,
    // found from the day rollups (or, for a store without them, a day at a time).
    let today = crate::model::bucket_start(before_ms, day);
    let head = Range {
        from_ms: today,
        to_ms: before_ms,
    };
    if let Some(v) = last_in(read.raw(head).await?) {
        return Ok(Some(v));
    }
    let back = Range {
        from_ms: today - LOOK_BACK_DAYS * day,
        to_ms: today,
    };
    let days = read
        .read(Segment {
            source: Source::Rollup(Level::Day),
            range: back,
        })
        .await?;
    let mut starts: Vec<i64> = days
        .iter()
        .map(|p| crate::model::bucket_start(p.at_ms, day))
        .collect();
    starts.dedup();
    for start in starts.into_iter().rev() {
        let whole = Range {
            from_ms: start,
            to_ms: start + day,
        };
        if let Some(v) = last_in(read.raw(whole).await?) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The part of a grouped aggregate read for the whole fleet at once: the store's fleet
/// rows of the hour and day pieces of the plan, and the pieces left to read device by
/// device (minutes, raw edges, or a store without fleet rows). It needs no device
/// list, so it is read while the registry lists the devices.
pub struct FleetPieces {
    rows: Vec<crate::store::FleetCount>,
    per_device: Vec<Segment>,
}

/// Reads the fleet-wide part of a grouped aggregate (see [`FleetPieces`]).
///
/// # Errors
///
/// A store failure.
pub async fn fleet_pieces(
    scope: Scope<'_>,
    grid: &Grid,
    range: Range,
    group_by: GroupBy,
    kind: Option<String>,
) -> Result<FleetPieces, StoreError> {
    let mut out = FleetPieces {
        rows: Vec::new(),
        per_device: Vec::new(),
    };
    for segment in plan(grid, range) {
        let level = match segment.source {
            Source::Rollup(level @ (Level::Hour | Level::Day)) => level,
            _ => {
                out.per_device.push(segment);
                continue;
            }
        };
        let q = FleetQuery {
            user_id: scope.user_id,
            level,
            from_ms: segment.range.from_ms,
            to_ms: segment.range.to_ms,
            kind: kind.clone(),
            // Counts by device need no types: a store may answer its totals.
            by_type: group_by == GroupBy::Type,
        };
        match scope.store.fleet_counts(q).await? {
            Some(rows) => out.rows.extend(rows),
            None => out.per_device.push(segment),
        }
    }
    Ok(out)
}

/// Counts per window and group over `devices`, sorted by window then group: the fleet
/// rows read by [`fleet_pieces`] for the same query, and the rest read device by
/// device. Fleet rows are filtered to `devices`, so a deleted device's events are
/// never counted.
///
/// # Errors
///
/// A store failure.
pub async fn grouped_counts(
    scope: Scope<'_>,
    devices: &[DeviceId],
    grid: Grid,
    group_by: GroupBy,
    kind: Option<String>,
    fleet: FleetPieces,
) -> Result<Vec<GroupCount>, StoreError> {
    let mut tally = Tally::new(&grid, group_by, devices);
    for r in fleet.rows {
        tally.add(r.start_ms, r.device_id, Some(&r.kind), r.count);
    }
    let per_device = fleet.per_device;
    if !per_device.is_empty() {
        let filter = AggregateFilter {
            metric: None,
            kind,
            sketches: false,
        };
        let filter = &filter;
        let per_device = &per_device;
        let mut reads = stream::iter(devices.iter().copied())
            .map(|device_id| async move {
                let read = DeviceRead {
                    scope,
                    device_id,
                    filter,
                    with_kind: group_by == GroupBy::Type,
                };
                Ok::<_, StoreError>((device_id, read.all(per_device.clone()).await?))
            })
            .buffer_unordered(READ_CONCURRENCY / 2);
        while let Some((device, pieces)) = reads.try_next().await? {
            for p in pieces {
                tally.add(p.at_ms, device, p.kind.as_deref(), p.summary.count);
            }
        }
    }
    Ok(tally.finish())
}
