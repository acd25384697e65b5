//! Retention tiers in both stores: an expired row is never read again, at once (the
//! embedded store clips its reads, Cassandra expires rows by TTL), and the embedded
//! sweep then deletes it, with its duplicate-index row.

use std::collections::BTreeSet;

use iotpipe::model::{bucket_start, now_ms, Event};
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::retention::Retention;
use iotpipe::store::{EventStore, FleetQuery, Level, ListQuery, RollupQuery};
use uuid::Uuid;

use super::cassandra::Keyspace;
use super::{event, flush, HOUR};

const DAY: i64 = 86_400_000;
const USER: i64 = 5;

/// Raw events a day, minutes 3 days, hours 10 days, days forever.
fn tiers() -> Retention {
    Retention::new([Some(DAY), Some(3 * DAY), Some(10 * DAY), None])
}

async fn listed(store: &dyn EventStore, device: Uuid, from: i64, to: i64) -> BTreeSet<i64> {
    let q = ListQuery {
        user_id: USER,
        device_id: device,
        from_ms: from,
        to_ms: to,
        kind: None,
        before: None,
        limit: 1_000,
    };
    store
        .list(q)
        .await
        .unwrap()
        .iter()
        .map(|e| e.ts_ms)
        .collect()
}

/// Starts of the rows of `level` over `[from, to)`, counting every event.
async fn starts(
    store: &dyn EventStore,
    device: Uuid,
    level: Level,
    from: i64,
    to: i64,
) -> Vec<i64> {
    let q = RollupQuery {
        user_id: USER,
        device_id: device,
        level,
        from_ms: from,
        to_ms: to,
        metric: None,
        kind: None,
    };
    let rows = store.rollups(q).await.unwrap().expect("kept");
    rows.iter().map(|r| r.start_ms).collect()
}

async fn fleet_starts(store: &dyn EventStore, level: Level, from: i64, to: i64) -> Vec<i64> {
    let q = FleetQuery {
        user_id: USER,
        level,
        from_ms: from,
        to_ms: to,
        kind: None,
        by_type: true,
    };
    let rows = store.fleet_counts(q).await.unwrap().expect("kept");
    // In no particular order.
    let mut starts: Vec<i64> = rows.iter().map(|r| r.start_ms).collect();
    starts.sort_unstable();
    starts
}

/// What the tiers keep of the test's four events.
struct Kept {
    device: Uuid,
    from: i64,
    to: i64,
    fresh: i64,
    minutes: Vec<i64>,
    hours: Vec<i64>,
    days: Vec<i64>,
}

impl Kept {
    async fn check(&self, store: &dyn EventStore) {
        let (d, from, to) = (self.device, self.from, self.to);
        assert_eq!(
            listed(store, d, from, to).await,
            BTreeSet::from([self.fresh])
        );
        assert_eq!(
            starts(store, d, Level::Minute, from, to).await,
            self.minutes
        );
        assert_eq!(starts(store, d, Level::Hour, from, to).await, self.hours);
        assert_eq!(starts(store, d, Level::Day, from, to).await, self.days);
    }
}

#[tokio::test]
async fn embedded_hides_expired_tiers_at_once_and_the_sweep_deletes_them() {
    let dir = tempfile::tempdir().unwrap();
    // Two devices whose ids share their first bytes: the sweep must not skip the
    // second's expired hours when it passes the first's kept days.
    let devices = [
        Uuid::from_u128(0x42 << 120 | 1),
        Uuid::from_u128(0x42 << 120 | 2),
    ];
    let now = now_ms();
    // One event per age, on a whole minute: older than every finite tier, than all
    // but hours, than raw only, and fresh.
    let ages = [12 * DAY, 5 * DAY, 2 * DAY, HOUR];
    let ts: Vec<i64> = ages.iter().map(|a| bucket_start(now - a, 60_000)).collect();
    let events: Vec<_> = ts
        .iter()
        .map(|&t| {
            let mut e = event(0, t, "t", &[("temp", 1.0)]);
            e.id = Uuid::new_v4(); // a device-chosen id: it has an index row
            e
        })
        .collect();
    let (from, to) = (now - 20 * DAY, now + HOUR);
    let day_starts: Vec<i64> = ts.iter().map(|&t| bucket_start(t, DAY)).collect();
    let hour_starts: Vec<i64> = ts.iter().map(|&t| bucket_start(t, HOUR)).collect();

    let store = EmbeddedStore::open_with(dir.path(), HOUR, tiers()).unwrap();
    let second: Vec<_> = events
        .iter()
        .map(|e| Event {
            id: Uuid::new_v4(),
            ..e.clone()
        })
        .collect();
    store
        .write(flush(USER, devices[0], events.clone()))
        .await
        .unwrap();
    store.write(flush(USER, devices[1], second)).await.unwrap();
    // Hidden at once, before any sweep.
    let kept = devices.map(|device| Kept {
        device,
        from,
        to,
        fresh: ts[3],
        minutes: ts[2..].to_vec(),
        hours: hour_starts[1..].to_vec(),
        days: day_starts.clone(),
    });
    for k in &kept {
        k.check(&store).await;
    }
    let twice = |starts: &[i64]| -> Vec<i64> { starts.iter().flat_map(|&s| [s, s]).collect() };
    assert_eq!(
        fleet_starts(&store, Level::Hour, from, to).await,
        twice(&hour_starts[1..])
    );
    assert_eq!(
        fleet_starts(&store, Level::Day, from, to).await,
        twice(&day_starts)
    );

    let deleted = store.expire(now_ms()).await.unwrap();
    // Per device: three events (their index rows are not counted); the packed minutes
    // of two hours, for "" and temp; one hour row for each of those, and its fleet
    // row.
    assert_eq!(deleted, 2 * (3 + 2 * 2 + 2 + 1), "rows deleted");
    assert_eq!(
        store.expire(now_ms()).await.unwrap(),
        0,
        "nothing left to sweep"
    );
    drop(store);

    // Opened again keeping everything: what the sweep deleted is gone from disk.
    let store = EmbeddedStore::open(dir.path(), HOUR).unwrap();
    for k in &kept {
        k.check(&store).await;
    }
    // The swept events' duplicate-index rows went with them (ingest refuses such old
    // events before they reach the store, so an orphan row would only waste space).
    let again = store.write(flush(USER, devices[0], vec![events[2].clone()]));
    assert_eq!(again.await.unwrap(), vec![1]);
}

#[tokio::test]
async fn cassandra_rows_expire_by_ttl_counted_from_their_event_time() {
    let mut ks = Keyspace::new(|_| {}).await;
    // Raw events for 4 s, minutes for an hour, the rest forever.
    ks.settings.retention = Retention::new([Some(4_000), Some(HOUR), None, None]);
    iotpipe::store::scylla::ScyllaStore::migrate(&ks.settings)
        .await
        .unwrap();
    let table_ttl = ks
        .session
        .query_unpaged(
            "SELECT default_time_to_live FROM system_schema.tables \
             WHERE keyspace_name = ? AND table_name = 'events'",
            (ks.settings.keyspace.as_str(),),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i32,)>()
        .unwrap()
        .0;
    assert_eq!(
        table_ttl, 4,
        "migrate sets the raw tier as the table default"
    );

    let store = ks.store().await;
    let device = Uuid::new_v4();
    // Two seconds old: it expires in about two seconds, not four.
    let ts = now_ms() - 2_000;
    let e = event(1, ts, "t", &[("temp", 20.0)]);
    store.write(flush(USER, device, vec![e])).await.unwrap();
    store.settle().await;
    let (from, to) = (ts - HOUR, ts + HOUR);
    assert_eq!(listed(&store, device, from, to).await, BTreeSet::from([ts]));
    let minute = bucket_start(ts, 60_000);
    assert_eq!(
        starts(&store, device, Level::Minute, from, to).await,
        [minute]
    );

    tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
    assert!(
        listed(&store, device, from, to).await.is_empty(),
        "the raw tier expired the event by its ts"
    );
    assert_eq!(
        starts(&store, device, Level::Minute, from, to).await,
        [minute],
        "its minute stays for the minute tier"
    );
    ks.drop_it().await;
}
