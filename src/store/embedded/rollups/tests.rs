use super::rows::*;
use super::*;
use crate::store::embedded::EmbeddedStore;
use fjall::{KeyspaceCreateOptions, PersistMode};

#[test]
fn a_directory_from_before_the_levels_gets_them_built_from_its_minute_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = DeviceId::from_u128(7);
    let m0 = 1_800_000_000_000 - 1_800_000_000_000 % 86_400_000;
    let minutes = [
        (m0 + 60_000, 2.0),
        (m0 + 61 * 60_000, 4.0),
        (m0 + 62 * 60_000, 6.0),
    ];
    {
        // As the older layout left it: one row per minute, a bare Summary, in
        // `rollups`, and no marker.
        let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
        let inner = &store.inner;
        for (minute, v) in minutes {
            for (metric, value) in [("", None), ("temp", Some(v))] {
                let mut s = Summary::EMPTY;
                s.add(value);
                let key = minute_key(1, d, metric, minute, "t");
                inner
                    .rollups
                    .old_minute
                    .insert(key, postcard::to_allocvec(&s).unwrap())
                    .unwrap();
            }
        }
        let meta = inner
            .db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .unwrap();
        meta.remove(LEVELS_META_KEY).unwrap();
        inner.db.persist(PersistMode::SyncAll).unwrap();
    }
    let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
    let q = |level, metric: Option<&str>| RollupQuery {
        user_id: 1,
        device_id: d,
        level,
        from_ms: m0,
        to_ms: m0 + 86_400_000,
        metric: metric.map(str::to_owned),
        kind: None,
    };
    let minute_rows = store
        .inner
        .read_rollups(&q(Level::Minute, Some("temp")))
        .unwrap();
    assert_eq!(
        minute_rows
            .iter()
            .map(|r| (r.start_ms, r.summary.sum))
            .collect::<Vec<_>>(),
        minutes.to_vec()
    );
    let hours = store.inner.read_rollups(&q(Level::Hour, None)).unwrap();
    assert_eq!(
        hours
            .iter()
            .map(|r| (r.start_ms, r.summary.count))
            .collect::<Vec<_>>(),
        [(m0, 1), (m0 + 3_600_000, 2)]
    );
    let days = store
        .inner
        .read_rollups(&q(Level::Day, Some("temp")))
        .unwrap();
    assert_eq!((days.len(), days[0].summary.sum), (1, 12.0));
    let fleet = store
        .inner
        .read_fleet(&FleetQuery {
            user_id: 1,
            level: Level::Day,
            from_ms: m0,
            to_ms: m0 + 86_400_000,
            kind: None,
            by_type: true,
        })
        .unwrap()
        .unwrap();
    assert_eq!(fleet.iter().map(|f| f.count).collect::<Vec<_>>(), [3]);
}

#[test]
fn minutes_round_trip_packed_and_read_the_older_encoding() {
    let mut count = Summary::EMPTY;
    count.add(None);
    count.add(None);
    let mut one = Summary::EMPTY;
    one.add(Some(-0.5));
    let mut full = Summary::EMPTY;
    full.add(Some(1.0));
    full.add(Some(3.0));
    // One value of -0.0: its sum (0.0 + -0.0) is +0.0, so it is not stored as one.
    let mut negative_zero = Summary::EMPTY;
    negative_zero.add(Some(-0.0));
    let minutes = Minutes(vec![(0, count), (7, one), (8, full), (59, negative_zero)]);
    let packed = minutes.encode().unwrap();
    let bits = |m: &Minutes| {
        m.0.iter()
            .map(|(i, s)| {
                (
                    *i,
                    s.count,
                    s.min.to_bits(),
                    s.max.to_bits(),
                    s.sum.to_bits(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(bits(&Minutes::decode(&packed).unwrap()), bits(&minutes));
    let older = postcard::to_allocvec(&minutes.0).unwrap();
    assert!(packed.len() < older.len());
    assert_eq!(bits(&Minutes::decode(&older).unwrap()), bits(&minutes));
}

#[test]
fn minute_keys_parse_back() {
    let d = DeviceId::from_u128(7);
    let k = minute_key(-3, d, "temp", 120_000, "telemetry");
    assert_eq!(
        parse_minute_key(&k).unwrap(),
        (-3, d, "temp", 120_000, "telemetry")
    );
}

#[test]
fn fleet_keys_sort_by_time_before_device() {
    let (a, b) = (DeviceId::from_u128(9), DeviceId::from_u128(1));
    assert!(fleet_key(1, Level::Hour, 0, a, "x") < fleet_key(1, Level::Hour, 3_600_000, b, "x"));
    assert!(fleet_key(1, Level::Hour, 0, a, "x") < fleet_key(1, Level::Day, 0, b, "x"));
}
