//! One event-store behaviour suite over `&dyn EventStore`, run against the embedded
//! store and against a real Apache Cassandra node (`scripts/cassandra`; any
//! Cassandra or ScyllaDB node with `IOTPIPE_TEST_SCYLLA=host:port`), in a fresh random
//! keyspace that is dropped afterwards. The wide-column store's own tests (rollups
//! under concurrent writers and crashes) are in `store/cassandra.rs`, `iotpipe migrate`'s
//! in `store/cassandra_migrate.rs`, sparse minutes' in `store/cassandra_sparse.rs`.

#[path = "store/cassandra.rs"]
mod cassandra;
#[path = "store/cassandra_migrate.rs"]
mod cassandra_migrate;
#[path = "store/cassandra_sparse.rs"]
mod cassandra_sparse;
#[path = "store/levels.rs"]
mod levels;
#[path = "store/retention.rs"]
mod retention;
mod support;

use std::collections::HashSet;
use std::sync::Arc;

use iotpipe::model::PartitionBatch;
use iotpipe::model::{assigned_id, Event, Record, MIN_TS_MS};
use iotpipe::pipeline::batcher::Batcher;
use iotpipe::query::{device_aggregate, AggregateFilter, Grid, Range, Scope};
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::store::{EventStore, ListQuery, Point, PointQuery, Position};
use tokio::time::{Duration, Instant};
use uuid::Uuid;

const HOUR: i64 = 3_600_000;
/// 2023-11-14T22:00:00Z, on an hour boundary.
const T0: i64 = 1_700_000_000_000 - 1_700_000_000_000 % HOUR;

fn event(id: u128, ts_ms: i64, kind: &str, metrics: &[(&str, f64)]) -> Event {
    Event {
        id: Uuid::from_u128(id),
        id_assigned: false,
        ts_ms,
        kind: kind.into(),
        // Sorted by name, as every engine may hand them back sorted.
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        attrs: vec![("fw".into(), "1.4.2".into())],
    }
}

/// Groups records into partitions with the real batcher, as the pipeline does.
fn flush(user: i64, device: Uuid, events: Vec<Event>) -> Arc<Vec<PartitionBatch>> {
    let mut batcher: Batcher<()> = Batcher::new(1_000_000, Duration::from_secs(60), HOUR);
    let records = events
        .into_iter()
        .map(|event| Record {
            user_id: user,
            device_id: device,
            received_ms: T0,
            event,
        })
        .collect();
    batcher.push(records, (), Instant::now());
    let mut partitions = batcher.take().expect("a flush").partitions;
    partitions.sort_by_key(|p| p.key);
    Arc::new(partitions)
}

fn ids(events: &[Event]) -> Vec<u128> {
    events.iter().map(|e| e.id.as_u128()).collect()
}

fn list(user: i64, device: Uuid, from_ms: i64, to_ms: i64, limit: usize) -> ListQuery {
    ListQuery {
        user_id: user,
        device_id: device,
        from_ms,
        to_ms,
        before: None,
        kind: None,
        limit,
    }
}

/// What every event store must do. `user` keeps concurrent runs apart.
async fn store_behaves(store: &dyn EventStore) {
    store.ping().await.expect("ping");
    let user = (Uuid::new_v4().as_u128() % 1_000_000_000) as i64;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let m = |v: f64| vec![("temp", v)];

    // Four buckets for device a, with gaps between them; one event for device b.
    let first = vec![
        event(1, T0 + 1_000, "telemetry", &m(1.0)),
        event(2, T0 + 2_000, "alarm", &[]),
        event(3, T0 + HOUR + 5, "telemetry", &m(3.0)),
        event(4, T0 + 5 * HOUR, "telemetry", &m(4.0)),
        event(5, T0 + 5 * HOUR, "telemetry", &m(5.0)),
        event(6, T0 - 30 * 24 * HOUR, "telemetry", &m(6.0)),
    ];
    let counts = store.write(flush(user, a, first.clone())).await.unwrap();
    assert_eq!(counts.iter().sum::<usize>(), 6, "{counts:?}");
    assert_eq!(
        store
            .write(flush(user, b, vec![event(1, T0, "x", &[])]))
            .await
            .unwrap(),
        vec![1]
    );

    // Duplicates: the same id again, even with another ts and in another bucket, is
    // skipped; so is a repeat within one flush.
    let again = vec![
        event(3, T0 + 3 * HOUR, "telemetry", &m(99.0)),
        event(7, T0 + 3 * HOUR + 1, "telemetry", &m(7.0)),
        event(7, T0 + 3 * HOUR + 1, "telemetry", &m(7.0)),
        event(1, T0 + 1_000, "telemetry", &m(1.0)),
    ];
    let counts = store.write(flush(user, a, again)).await.unwrap();
    assert_eq!(
        counts.iter().sum::<usize>(),
        1,
        "only id 7 is new: {counts:?}"
    );

    // The whole past, newest first; the duplicate kept its first ts.
    let far = T0 + 24 * HOUR;
    let all = store
        .list(list(user, a, MIN_TS_MS, far, 100))
        .await
        .unwrap();
    let expected_order = {
        let mut e = ids(&all);
        e.sort_by_key(|id| {
            std::cmp::Reverse(all.iter().find(|x| x.id.as_u128() == *id).unwrap().ts_ms)
        });
        e
    };
    assert_eq!(ids(&all), expected_order, "newest first");
    let set: HashSet<u128> = ids(&all).into_iter().collect();
    assert_eq!(set, [1, 2, 3, 4, 5, 6, 7].into_iter().collect());
    let three = all.iter().find(|e| e.id.as_u128() == 3).unwrap();
    assert_eq!(three.ts_ms, T0 + HOUR + 5);
    assert_eq!(three, &first[2], "stored content comes back whole");
    assert_eq!(
        ids(&store
            .list(list(user, b, MIN_TS_MS, far, 100))
            .await
            .unwrap()),
        vec![1]
    );
    assert!(store
        .list(list(user + 1, a, MIN_TS_MS, far, 100))
        .await
        .unwrap()
        .is_empty());

    // Paging with a cursor visits everything once, in order, even across equal ts.
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let mut q = list(user, a, MIN_TS_MS, far, 2);
        q.before = before;
        let page = store.list(q).await.unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(Position::of);
        paged.extend(page);
    }
    assert_eq!(ids(&paged), ids(&all));

    // Half-open ranges, limits and the type filter.
    let r = store
        .list(list(user, a, T0 + 1_000, T0 + HOUR + 5, 100))
        .await
        .unwrap();
    assert_eq!(ids(&r), vec![2, 1]);
    assert_eq!(
        store
            .list(list(user, a, MIN_TS_MS, far, 3))
            .await
            .unwrap()
            .len(),
        3
    );
    let mut q = list(user, a, MIN_TS_MS, far, 100);
    q.kind = Some("alarm".into());
    assert_eq!(ids(&store.list(q).await.unwrap()), vec![2]);

    // Points: oldest first, projected.
    let pq = |metric: Option<&str>, kind: Option<&str>, with_kind: bool| PointQuery {
        user_id: user,
        device_id: a,
        from_ms: T0,
        to_ms: far,
        kind: kind.map(str::to_owned),
        metric: metric.map(str::to_owned),
        with_kind,
    };
    let with_metric = store.points(pq(Some("temp"), None, false)).await.unwrap();
    let values: Vec<(i64, Option<f64>)> = with_metric.iter().map(|p| (p.ts_ms, p.value)).collect();
    assert_eq!(values.len(), 5, "{values:?}");
    assert_eq!(values[0], (T0 + 1_000, Some(1.0)));
    assert_eq!(values[1], (T0 + HOUR + 5, Some(3.0)));
    assert_eq!(values[2], (T0 + 3 * HOUR + 1, Some(7.0)));
    assert!(values.windows(2).all(|w| w[0].0 <= w[1].0));
    let kinds = store.points(pq(None, None, true)).await.unwrap();
    assert_eq!(kinds.len(), 6);
    assert_eq!(
        kinds[1],
        Point {
            ts_ms: T0 + 2_000,
            value: None,
            kind: Some("alarm".into())
        }
    );
    assert_eq!(
        store
            .points(pq(None, Some("alarm"), false))
            .await
            .unwrap()
            .len(),
        1
    );

    // The shared query layer on top: hourly windows over the day.
    let scope = Scope {
        store,
        user_id: user,
        bucket_len_ms: HOUR,
    };
    let range = Range {
        from_ms: T0,
        to_ms: far,
    };
    let windows = device_aggregate(
        scope,
        a,
        Grid::utc(range, HOUR),
        range,
        AggregateFilter {
            metric: Some("temp".into()),
            kind: None,
            sketches: false,
        },
    )
    .await
    .unwrap();
    let summary: Vec<(i64, u64, f64)> = windows
        .iter()
        .map(|w| (w.start_ms - T0, w.stats.count, w.stats.sum))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, 1, 1.0),
            (HOUR, 1, 3.0),
            (3 * HOUR, 1, 7.0),
            (5 * HOUR, 2, 9.0)
        ]
    );

    time_ids_are_duplicates_whatever_their_ts(store, user).await;
    latest_values_are_the_newest_whatever_the_order(store, user).await;
}

/// The newest value per metric, never replaced by a late (older) event or a repeat.
async fn latest_values_are_the_newest_whatever_the_order(store: &dyn EventStore, user: i64) {
    // A user of its own: the fleet form lists every device of the user.
    let user = user + 1;
    let (d, e) = (Uuid::new_v4(), Uuid::new_v4());
    let first = vec![
        event(901, T0 + 5_000, "t", &[("temp", 5.0), ("hum", 50.0)]),
        event(902, T0 + 9_000, "t", &[("temp", 9.0)]),
        event(903, T0 + 1_000, "t", &[("temp", 1.0)]),
    ];
    store.write(flush(user, d, first)).await.unwrap();
    // A late event in a later flush, an older repeat of a stored id, and a newer value.
    let second = vec![
        event(904, T0 + 2_000, "t", &[("temp", 2.0), ("hum", 20.0)]),
        event(902, T0 + 9_000, "t", &[("temp", 9.0)]),
        event(905, T0 + 7_000, "t", &[("hum", 70.0)]),
    ];
    store.write(flush(user, d, second)).await.unwrap();
    store
        .write(flush(user, e, vec![event(906, T0, "t", &[("temp", -1.0)])]))
        .await
        .unwrap();
    let of = |rows: Vec<iotpipe::store::latest::Latest>| {
        let mut v: Vec<(Uuid, String, i64, f64)> = rows
            .into_iter()
            .map(|l| (l.device_id, l.metric, l.ts_ms - T0, l.value))
            .collect();
        v.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        v
    };
    let one = of(store.latest(user, Some(d)).await.unwrap());
    assert_eq!(
        one,
        vec![
            (d, "hum".into(), 7_000, 70.0),
            (d, "temp".into(), 9_000, 9.0)
        ]
    );
    let fleet = of(store.latest(user, None).await.unwrap());
    assert_eq!(fleet.len(), 3, "{fleet:?}");
    assert!(fleet.contains(&(e, "temp".into(), 0, -1.0)));
    assert!(store.latest(user + 1, None).await.unwrap().is_empty());
}

/// Device-chosen UUIDv7 ids carry a time; one whose time is the event's `ts` may be
/// found through its event alone. Either way a repeat is a duplicate, whichever `ts`
/// came first.
async fn time_ids_are_duplicates_whatever_their_ts(store: &dyn EventStore, user: i64) {
    let c = Uuid::new_v4();
    let timed = |id: Uuid, ts_ms: i64| Event {
        id,
        ..event(0, ts_ms, "telemetry", &[("temp", 1.0)])
    };
    let (x, y) = (assigned_id(T0 + 10_000), assigned_id(T0 + 20_000));
    let first = vec![timed(x, T0 + 10_000), timed(y, T0 + 30_000)];
    assert_eq!(store.write(flush(user, c, first)).await.unwrap(), vec![2]);
    let again = vec![
        timed(x, T0 + 2 * HOUR),
        timed(x, T0 + 10_000),
        timed(y, T0 + 20_000),
        timed(y, T0 + 30_000),
    ];
    let counts = store.write(flush(user, c, again)).await.unwrap();
    assert_eq!(counts.iter().sum::<usize>(), 0, "{counts:?}");
    let stored = store
        .list(list(user, c, MIN_TS_MS, T0 + 24 * HOUR, 10))
        .await
        .unwrap();
    let kept: Vec<(Uuid, i64)> = stored.iter().map(|e| (e.id, e.ts_ms - T0)).collect();
    assert_eq!(kept, vec![(y, 30_000), (x, 10_000)]);

    // An id the server assigned, sent back by the device (a retry of an event it was
    // told about), is the same event.
    let d = Uuid::new_v4();
    let z = assigned_id(T0 + 40_000);
    let assigned = Event {
        id_assigned: true,
        ..timed(z, T0 + 40_000)
    };
    assert_eq!(
        store.write(flush(user, d, vec![assigned])).await.unwrap(),
        vec![1]
    );
    let resent = vec![timed(z, T0 + 40_000)];
    assert_eq!(store.write(flush(user, d, resent)).await.unwrap(), vec![0]);
}

#[tokio::test]
async fn the_embedded_store_passes_the_shared_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), HOUR).unwrap();
    store_behaves(&store).await;
    store.close().await.unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// Every level of the embedded store equals a brute-force scan, whatever the
    /// history.
    #[test]
    fn embedded_rollups_are_exact_at_every_level(seed in proptest::num::u64::ANY) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path(), HOUR).unwrap();
        let result = rt.block_on(levels::levels_match_brute_force(&store, seed));
        proptest::prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

#[tokio::test]
async fn wide_column_rollups_are_exact_at_every_level_on_cassandra() {
    let ks = cassandra::Keyspace::new(|c| c.batch_max_bytes = 2048).await;
    let store = ks.store().await;
    for seed in [1, 2, 3] {
        // Exact at once (pending minutes are read from the events)...
        levels::levels_match_brute_force(&store, seed)
            .await
            .unwrap();
    }
    // ...and from the rows alone once every recomputation is done.
    store.settle().await;
    for seed in [1, 2, 3] {
        levels::levels_match_brute_force(&store, seed)
            .await
            .unwrap();
    }
    ks.drop_it().await;
}

#[tokio::test]
async fn the_wide_column_store_passes_the_shared_suite_on_cassandra() {
    let ks = cassandra::Keyspace::new(|c| {
        // Small, so the suite also crosses batch and page boundaries.
        c.batch_max_bytes = 512;
        c.page_size = 2;
    })
    .await;
    // Applying the schema again is harmless.
    ScyllaStore::migrate(&ks.settings)
        .await
        .expect("schema applied twice");
    let store = ks.store().await;
    store_behaves(&store).await;

    // A keyspace keeps its bucket length.
    let other = ScyllaSettings {
        bucket_len_ms: 2 * HOUR,
        ..ks.settings.clone()
    };
    assert!(ScyllaStore::connect(other).await.is_err());
    ks.drop_it().await;
}
