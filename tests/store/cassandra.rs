//! The wide-column store against a real Apache Cassandra node (`scripts/cassandra`,
//! 127.0.0.1:9042; another node with `IOTPIPE_TEST_SCYLLA=host:port`). Never skipped:
//! a missing node fails these tests. Each test works in a fresh keyspace, created by
//! the same migration `iotpipe migrate` runs, and dropped at the end.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use iotpipe::config::StoreConfig;
use iotpipe::model::{bucket_start, Event};
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::store::{EventStore, FleetQuery, Level, RollupQuery, Summary, ROLLUP_MS};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use uuid::Uuid;

use super::{event, flush, HOUR, T0};

pub(crate) const DAY: i64 = 86_400_000;
/// The UTC day that holds T0.
pub(crate) const DAY0: i64 = T0 - T0.rem_euclid(DAY);

pub fn node() -> String {
    std::env::var("IOTPIPE_TEST_SCYLLA").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// A fresh keyspace on the test node, migrated; dropped when the guard is.
pub struct Keyspace {
    pub settings: ScyllaSettings,
    pub session: Session,
}

impl Keyspace {
    pub async fn new(tweak: impl FnOnce(&mut StoreConfig)) -> Self {
        let mut config = StoreConfig {
            scylla_nodes: Some(node()),
            keyspace: format!("iotpipe_test_{}", crate::support::random_name()),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            consistency: "ONE".into(),
            ..StoreConfig::default()
        };
        tweak(&mut config);
        let settings = ScyllaSettings::from_config(&config, HOUR).unwrap();
        ScyllaStore::migrate(&settings).await.unwrap_or_else(|e| {
            panic!(
                "no Cassandra/ScyllaDB node answers at {} ({e}); scripts/deps starts one",
                node()
            )
        });
        let session = SessionBuilder::new()
            .known_node(node())
            .build()
            .await
            .unwrap();
        Self { settings, session }
    }

    pub async fn store(&self) -> ScyllaStore {
        ScyllaStore::connect(self.settings.clone()).await.unwrap()
    }

    pub async fn drop_it(self) {
        let ks = &self.settings.keyspace;
        self.session
            .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
            .await
            .unwrap();
    }

    pub(crate) async fn count(&self, table: &str) -> i64 {
        let ks = &self.settings.keyspace;
        self.one_i64(format!("SELECT count(*) FROM {ks}.{table}"), ())
            .await
    }

    /// Writes an event's row as a writer that dies before anything else would leave
    /// it: no id row, no rollup, no mark (a telemetry event of T0's bucket).
    pub(crate) async fn store_by_hand(&self, user: i64, device: Uuid, e: &Event) {
        let name = &self.settings.keyspace;
        let metrics: HashMap<String, f64> = e.metrics.iter().cloned().collect();
        self.session
            .query_unpaged(
                format!(
                    "INSERT INTO {name}.events (user_id, device_id, bucket, ts, event_id, type, \
                     metrics, attrs, received) VALUES (?, ?, ?, ?, ?, 'telemetry', ?, {{}}, ?)"
                ),
                (user, device, ts(T0), ts(e.ts_ms), e.id, metrics, ts(T0)),
            )
            .await
            .unwrap();
    }

    /// The single bigint a query answers.
    async fn one_i64(&self, cql: String, values: impl scylla::serialize::row::SerializeRow) -> i64 {
        self.session
            .query_unpaged(cql, values)
            .await
            .unwrap()
            .into_rows_result()
            .unwrap()
            .single_row::<(i64,)>()
            .unwrap()
            .0
    }
}

/// Per (minute, type) summaries of `metric` ("" counts every event), computed here
/// from the events the test knows it sent, each id once.
fn expected(events: &[Event], metric: &str) -> BTreeMap<(i64, String), Summary> {
    expected_at(Level::Minute, events, metric)
}

/// The same per interval of `level`.
fn expected_at(level: Level, events: &[Event], metric: &str) -> BTreeMap<(i64, String), Summary> {
    let mut out = BTreeMap::new();
    for e in events {
        let minute = bucket_start(e.ts_ms, level.ms());
        let value = e.metrics.iter().find(|(m, _)| m == metric).map(|(_, v)| *v);
        if metric.is_empty() || value.is_some() {
            out.entry((minute, e.kind.clone()))
                .or_insert(Summary::EMPTY)
                .add(value);
        }
    }
    out
}

async fn rollups(
    store: &dyn EventStore,
    user: i64,
    device: Uuid,
    metric: &str,
    from_ms: i64,
    to_ms: i64,
) -> BTreeMap<(i64, String), Summary> {
    rollups_at(Level::Minute, store, user, device, metric, from_ms, to_ms).await
}

async fn rollups_at(
    level: Level,
    store: &dyn EventStore,
    user: i64,
    device: Uuid,
    metric: &str,
    from_ms: i64,
    to_ms: i64,
) -> BTreeMap<(i64, String), Summary> {
    let q = RollupQuery {
        user_id: user,
        device_id: device,
        level,
        from_ms,
        to_ms,
        metric: (!metric.is_empty()).then(|| metric.to_owned()),
        kind: None,
    };
    let rows = store.rollups(q).await.unwrap().expect("keeps rollups");
    rows.into_iter()
        .map(|r| ((r.start_ms, r.kind), r.summary))
        .collect()
}

/// A user's fleet counts at `level`, by (interval, device, type); without `by_type`,
/// each device's totals over its types (type "").
pub(crate) async fn fleet_at(
    (level, by_type): (Level, bool),
    store: &dyn EventStore,
    user: i64,
    from_ms: i64,
    to_ms: i64,
) -> BTreeMap<(i64, Uuid, String), u64> {
    let q = FleetQuery {
        user_id: user,
        level,
        from_ms,
        to_ms,
        kind: None,
        by_type,
    };
    let rows = store
        .fleet_counts(q)
        .await
        .unwrap()
        .expect("keeps fleet rows");
    let mut out = BTreeMap::new();
    for r in rows {
        let kind = if by_type { r.kind } else { String::new() };
        *out.entry((r.start_ms, r.device_id, kind)).or_default() += r.count;
    }
    out
}

/// Both metrics of a device's first two days, at every level, read through `store`,
/// are those of `truth`.
pub(crate) async fn assert_levels(
    store: &dyn EventStore,
    (user, device): (i64, Uuid),
    truth: &[Event],
) {
    for metric in ["", "temp"] {
        for level in [Level::Minute, Level::Hour, Level::Day] {
            let got = rollups_at(level, store, user, device, metric, DAY0, DAY0 + 2 * DAY).await;
            let why = format!("{level:?} rows of metric {metric:?}");
            assert_same(&got, &expected_at(level, truth, metric), &why);
        }
    }
}

/// The user's fleet counts of its first two days, hours and days, are those of its
/// one device's `truth`.
pub(crate) async fn assert_fleet(
    store: &dyn EventStore,
    (user, device): (i64, Uuid),
    truth: &[Event],
    why: &str,
) {
    for level in [Level::Hour, Level::Day] {
        for by_type in [true, false] {
            assert_eq!(
                fleet_at((level, by_type), store, user, DAY0, DAY0 + 2 * DAY).await,
                fleet_expected((level, by_type), device, truth),
                "{level:?}, by type: {by_type}, {why}"
            );
        }
    }
}

/// What `fleet_at` must answer for one device's events.
pub(crate) fn fleet_expected(
    (level, by_type): (Level, bool),
    device: Uuid,
    events: &[Event],
) -> BTreeMap<(i64, Uuid, String), u64> {
    let mut out = BTreeMap::new();
    for ((start, kind), s) in expected_at(level, events, "") {
        let kind = if by_type { kind } else { String::new() };
        *out.entry((start, device, kind)).or_default() += s.count;
    }
    out
}

/// Sums may differ in the last bits with the order of addition.
fn assert_same(
    got: &BTreeMap<(i64, String), Summary>,
    want: &BTreeMap<(i64, String), Summary>,
    why: &str,
) {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{why}"
    );
    for (k, w) in want {
        let g = &got[k];
        let (got, want) = ((g.count, g.min, g.max), (w.count, w.min, w.max));
        assert_eq!(got, want, "{why}: {k:?}");
        assert!(
            (g.sum - w.sum).abs() < 1e-6,
            "{why}: {k:?}: {} vs {}",
            g.sum,
            w.sum
        );
    }
}

#[tokio::test]
async fn two_writers_on_the_same_minutes_keep_the_rollups_exact() {
    let ks = Keyspace::new(|c| c.batch_max_bytes = 1024).await;
    // Two instances: two sessions, two recomputers, one keyspace.
    let (a, b) = (ks.store().await, ks.store().await);
    let user = 42;
    let device = Uuid::new_v4();
    let mut rng = StdRng::seed_from_u64(7);
    // A pool of events over six minutes; both writers send overlapping random parts
    // of it at once, in several rounds, with repeats (QoS 1 redelivery, `$share`
    // moving a device between instances) and late events into earlier minutes.
    let pool: Vec<Event> = (0..600u128)
        .map(|i| {
            // Six minutes in each of three hours, so that hours and days are summed
            // from several recomputed minutes.
            let ts = T0 + (i % 3) as i64 * HOUR + rng.random_range(0..6 * ROLLUP_MS);
            let kind = if i % 5 == 0 { "alarm" } else { "telemetry" };
            let metrics: &[(&str, f64)] = if i % 3 == 0 { &[] } else { &[("temp", 0.0)] };
            let mut e = event(i + 1, ts, kind, metrics);
            e.metrics
                .iter_mut()
                .for_each(|m| m.1 = rng.random_range(-40.0..60.0));
            e
        })
        .collect();
    let mut sent: HashMap<Uuid, Event> = HashMap::new();
    for _round in 0..6 {
        let pick = |rng: &mut StdRng| -> Vec<Event> {
            (0..120)
                .map(|_| pool[rng.random_range(0..pool.len())].clone())
                .collect()
        };
        let (left, right) = (pick(&mut rng), pick(&mut rng));
        sent.extend(left.iter().chain(&right).map(|e| (e.id, e.clone())));
        let (ra, rb) = tokio::join!(
            a.write(flush(user, device, left)),
            b.write(flush(user, device, right))
        );
        ra.unwrap();
        rb.unwrap();
        // Exact at once, before any recomputation has caught up: pending minutes
        // are read from the events.
        let truth: Vec<Event> = sent.values().cloned().collect();
        assert_levels(&a, (user, device), &truth).await;
        // The fleet rows too: the pending hours are read from the device's rows.
        assert_fleet(&b, (user, device), &truth, "").await;
    }
    a.settle().await;
    b.settle().await;
    assert_eq!(
        ks.count("pending_by_device").await,
        0,
        "every minute recomputed"
    );
    assert_eq!(ks.count("pending_by_user").await, 0, "every user mark gone");
    let truth: Vec<Event> = sent.values().cloned().collect();
    assert_fleet(&a, (user, device), &truth, "from the fleet rows alone").await;
    // Now from the rollup rows alone, through either instance, at every level.
    assert_levels(&b, (user, device), &truth).await;
    ks.drop_it().await;
}

#[tokio::test]
async fn a_writer_that_crashed_before_its_rollups_is_repaired_by_the_sweep() {
    // The sweep's own ticks come once a minute: the test's sweep is the one to find
    // the marks, made (by their ids) two hours ago.
    let ks = Keyspace::new(|c| c.rollup_sweep_after_secs = 3_600).await;
    let store = ks.store().await;
    let (user, device) = (9, Uuid::new_v4());
    let first: Vec<Event> = (1..=3)
        .map(|i| event(i, T0 + i as i64 * 1_000, "telemetry", &[("temp", i as f64)]))
        .collect();
    store
        .write(flush(user, device, first.clone()))
        .await
        .unwrap();
    store.settle().await;

    // What a writer that died mid-flush leaves: its mark of the minute (a device row
    // and its user twin, one flush id), its events stored, its rollups never written.
    // Beside it, a user row whose device row is gone (a writer that died between the
    // two deletes): the sweep drops it.
    let name = &ks.settings.keyspace;
    let crashed = made_ago(2 * HOUR);
    let hour = T0 - T0.rem_euclid(HOUR);
    let user_row = |hour: i64, flush: Uuid| {
        let cql = format!(
            "INSERT INTO {name}.pending_by_user (user_id, slab, hour, device_id, flush) \
             VALUES (?, ?, ?, ?, ?)"
        );
        let values = (
            user,
            ts(hour - hour.rem_euclid(28 * DAY)),
            ts(hour),
            device,
            flush,
        );
        let session = &ks.session;
        async move { session.query_unpaged(cql, values).await.unwrap() }
    };
    user_row(hour, crashed).await;
    user_row(hour + 2 * HOUR, made_ago(2 * HOUR)).await;
    let late = event(50, T0 + 30_000, "telemetry", &[("temp", 100.0)]);
    ks.session
        .query_unpaged(
            format!(
                "UPDATE {name}.pending_by_device SET minutes = minutes + ? \
                 WHERE user_id = ? AND device_id = ? AND hour = ? AND flush = ?"
            ),
            (
                vec![((T0 - hour) / 60_000) as i32],
                user,
                device,
                ts(hour),
                crashed,
            ),
        )
        .await
        .unwrap();
    ks.store_by_hand(user, device, &late).await;
    let truth: Vec<Event> = first.iter().cloned().chain([late]).collect();

    // Aggregates are exact at once (the minute is pending, so read from the events)...
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "").await;
    // ...and the rollup rows themselves still miss the event until the sweep.
    let stale = scalar_count(&ks, user, device).await;
    assert_eq!(stale, 3);
    assert_eq!(
        store.sweep().await.unwrap(),
        3,
        "the crashed writer's mark, then the rows by user: its twin and the one left alone"
    );
    assert_eq!(ks.count("pending_by_device").await, 0);
    assert_eq!(ks.count("pending_by_user").await, 0);
    assert_fleet(
        &store,
        (user, device),
        &truth,
        "from the fleet rows once swept",
    )
    .await;
    assert_eq!(scalar_count(&ks, user, device).await, 4);
    for metric in ["", "temp"] {
        assert_same(
            &rollups(&store, user, device, metric, T0, T0 + HOUR).await,
            &expected(&truth, metric),
            "minutes",
        );
    }
    ks.drop_it().await;
}

#[tokio::test]
async fn minutes_recomputed_together_match_brute_force() {
    // Small pages, so that a run's slice is read over several of them.
    let ks = Keyspace::new(|c| c.page_size = 7).await;
    let store = ks.store().await;
    let (user, device) = (11, Uuid::new_v4());
    let mut rng = StdRng::seed_from_u64(3);
    // Minutes that one round recomputes in runs of one read each: neighbours, minutes
    // a few apart (read across the gap), far apart (two reads), either side of an
    // hour boundary (two buckets), and in the next day.
    let minutes = [0, 1, 2, 4, 7, 20, 58, 59, 60, 61, 24 * 60 + 3];
    let mut id = 0u128;
    let mut make = |rng: &mut StdRng, minute: i64| {
        id += 1;
        let kind = ["telemetry", "alarm"][rng.random_range(0..2)];
        let metrics: &[(&str, f64)] = if rng.random_bool(0.3) {
            &[]
        } else {
            &[("temp", 0.0)]
        };
        let mut e = event(
            id,
            T0 + minute * ROLLUP_MS + rng.random_range(0..ROLLUP_MS),
            kind,
            metrics,
        );
        e.metrics
            .iter_mut()
            .for_each(|m| m.1 = rng.random_range(-40.0..60.0));
        e
    };
    // Minute 3 is recomputed first; later its events sit inside the slice of the run
    // 0..=7 without being due, and must count for no other minute. Minute 20 is
    // recomputed first too, and gets late events.
    let early: Vec<Event> = [3, 3, 3, 3, 3, 20, 20]
        .into_iter()
        .map(|m| make(&mut rng, m))
        .collect();
    store
        .write(flush(user, device, early.clone()))
        .await
        .unwrap();
    store.settle().await;
    let mut sent: HashMap<Uuid, Event> = early.iter().map(|e| (e.id, e.clone())).collect();
    // Several flushes before one settle: repeats of earlier ids (one with another ts,
    // which stays a duplicate) and late events into minutes already written.
    let mut all: Vec<Event> = Vec::new();
    for _flush in 0..3 {
        let mut events: Vec<Event> = (0..40)
            .map(|_| {
                let minute = minutes[rng.random_range(0..minutes.len())];
                make(&mut rng, minute)
            })
            .collect();
        for _ in 0..if all.is_empty() { 0 } else { 10 } {
            let mut again = all[rng.random_range(0..all.len())].clone();
            if rng.random_bool(0.3) {
                again.ts_ms += ROLLUP_MS;
            }
            events.push(again);
        }
        for e in &events {
            sent.entry(e.id).or_insert_with(|| e.clone());
        }
        all.extend(events.iter().cloned());
        store.write(flush(user, device, events)).await.unwrap();
    }
    store.settle().await;
    assert_eq!(
        ks.count("pending_by_device").await,
        0,
        "every minute recomputed"
    );
    // Now read from the rollup rows alone.
    let truth: Vec<Event> = sent.into_values().collect();
    assert_levels(&store, (user, device), &truth).await;
    ks.drop_it().await;
}

/// An hour recomputed in two rounds, most of its minutes in the second: the minutes
/// of the first round still count in the hour, and the next hour's minutes only in
/// theirs. (A variant that summed such hours straight from their events, not
/// committed, was checked against this test.)
#[tokio::test]
async fn an_hour_recomputed_in_two_rounds_matches_brute_force() {
    let ks = Keyspace::new(|c| c.page_size = 50).await;
    let store = ks.store().await;
    let (user, device) = (12, Uuid::new_v4());
    let hour = T0 - T0.rem_euclid(HOUR);
    let mut rng = StdRng::seed_from_u64(5);
    let mut id = 0u128;
    let mut make = |rng: &mut StdRng, minute: i64| {
        id += 1;
        let kind = ["telemetry", "alarm"][rng.random_range(0..2)];
        let ts = hour + minute * ROLLUP_MS + rng.random_range(0..ROLLUP_MS);
        event(id, ts, kind, &[("temp", rng.random_range(-40.0..60.0))])
    };
    // Minutes 45-59 are recomputed first, and minute 0 of the next hour.
    let early: Vec<Event> = (45..60).chain([60]).map(|m| make(&mut rng, m)).collect();
    store
        .write(flush(user, device, early.clone()))
        .await
        .unwrap();
    store.settle().await;
    // Then minutes 0-39 at once (one run of 40 due minutes of the hour, with
    // repeats), and two minutes of the next hour.
    let mut late: Vec<Event> = (0..40)
        .chain([61, 62])
        .flat_map(|m| [make(&mut rng, m), make(&mut rng, m)])
        .collect();
    late.push(late[3].clone());
    store
        .write(flush(user, device, late.clone()))
        .await
        .unwrap();
    store.settle().await;
    assert_eq!(ks.count("pending_by_device").await, 0);
    let truth: Vec<Event> = early
        .into_iter()
        .chain(late)
        .map(|e| (e.id, e))
        .collect::<HashMap<_, _>>()
        .into_values()
        .collect();
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "from the fleet rows alone").await;
    ks.drop_it().await;
}

/// The stored count of the rollup row (T0's minute, all events, telemetry).
async fn scalar_count(ks: &Keyspace, user: i64, device: Uuid) -> i64 {
    let name = &ks.settings.keyspace;
    let cql = format!(
        "SELECT count FROM {name}.rollups WHERE user_id = ? AND device_id = ? \
         AND day = ? AND metric = '' AND minute = ? AND type = 'telemetry'"
    );
    let day = ts(bucket_start(T0, 86_400_000));
    ks.one_i64(cql, (user, device, day, ts(T0))).await
}

/// A mark's id as a writer `ago` milliseconds back would have made it (UUIDv7).
pub(crate) fn made_ago(ago: i64) -> Uuid {
    let at = std::time::SystemTime::now() - Duration::from_millis(ago as u64);
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap();
    let stamp = uuid::Timestamp::from_unix(uuid::NoContext, since.as_secs(), since.subsec_nanos());
    Uuid::new_v7(stamp)
}

pub(crate) fn ts(ms: i64) -> scylla::value::CqlTimestamp {
    scylla::value::CqlTimestamp(ms)
}

#[tokio::test]
async fn writes_past_the_rollup_backlog_are_refused_as_overload_and_store_nothing() {
    let ks = Keyspace::new(|c| c.rollup_backlog_max = 10).await;
    let store = ks.store().await;
    let user = 12;
    let minutes = |id: u128| -> Vec<Event> {
        (0..20u128)
            .map(|m| event(id + m, T0 + m as i64 * ROLLUP_MS, "telemetry", &[]))
            .collect()
    };
    // Under the bound when it starts, a flush goes through whatever it adds...
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    store.write(flush(user, first, minutes(1))).await.unwrap();
    // ...and leaves 20 minutes pending for at least a second (a minute waits that long
    // for quiet), so the next one is refused, retryably, before anything is written.
    let refused = store
        .write(flush(user, second, minutes(100)))
        .await
        .unwrap_err();
    assert!(refused.is_retryable(), "{refused}");
    assert!(
        refused.to_string().contains("store.rollup_backlog_max"),
        "{refused}"
    );
    assert_eq!(ks.count("events").await, 20, "nothing of the refused flush");
    // Once the rollups catch up, the same flush is taken.
    store.settle().await;
    store
        .write(flush(user, second, minutes(100)))
        .await
        .unwrap();
    store.settle().await;
    assert_eq!(ks.count("events").await, 40);
    assert_eq!(ks.count("pending_by_device").await, 0);
    ks.drop_it().await;
}
