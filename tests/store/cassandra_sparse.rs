//! Sparse minutes (`store/scylla/sparse.rs`) on the real node: a minute of few events
//! keeps no rollup rows, and every level stays exact as such minutes fill up.

use iotpipe::model::{bucket_start, Event};
use iotpipe::store::{EventStore, ROLLUP_MS};
use uuid::Uuid;

use super::cassandra::{assert_fleet, assert_levels, ts, Keyspace, DAY};
use super::{event, flush, HOUR, T0};

/// The minutes of `device` that have rows in `rollups` (of metric `""`).
async fn minutes_with_rows(ks: &Keyspace, user: i64, device: Uuid) -> Vec<i64> {
    let name = &ks.settings.keyspace;
    let cql = format!(
        "SELECT minute FROM {name}.rollups WHERE user_id = ? AND device_id = ? \
         AND day = ? AND metric = ''"
    );
    let day = ts(bucket_start(T0, DAY));
    let rows = ks.session.query_unpaged(cql, (user, device, day)).await;
    let rows = rows.unwrap().into_rows_result().unwrap();
    let mut minutes: Vec<i64> = rows
        .rows::<(scylla::value::CqlTimestamp,)>()
        .unwrap()
        .map(|r| r.unwrap().0 .0)
        .collect();
    minutes.dedup();
    minutes
}

/// The time of event `id` in `minute` of `hour`: spread within the minute by a prime
/// step, so that a minute's events are not in id order.
fn in_minute(hour: i64, minute: i64, id: u128, step: i64) -> i64 {
    hour + minute * ROLLUP_MS + (id as i64 * step) % ROLLUP_MS
}

#[tokio::test]
async fn sparse_minutes_keep_no_rows_and_stay_exact_as_they_fill_up() {
    let ks = Keyspace::new(|_| {}).await;
    let store = ks.store().await;
    let (user, device) = (14, Uuid::new_v4());
    let hour = T0 - T0.rem_euclid(HOUR);
    let mut id = 0u128;
    let mut make = |minute: i64, kind: &str, temp: Option<f64>| {
        id += 1;
        let ts = in_minute(hour, minute, id, 997);
        let metrics: Vec<(&str, f64)> = temp.map(|t| ("temp", t)).into_iter().collect();
        event(id, ts, kind, &metrics)
    };
    // A fleet device's hour: one event a minute, some without the metric; minute 10
    // holds two, still sparse.
    let mut truth: Vec<Event> = (0..10)
        .map(|m| make(m, "telemetry", (m % 3 != 0).then_some(m as f64)))
        .collect();
    truth.push(make(10, "alarm", Some(-4.0)));
    truth.push(make(10, "telemetry", None));
    store
        .write(flush(user, device, truth.clone()))
        .await
        .unwrap();
    store.settle().await;
    assert_eq!(
        minutes_with_rows(&ks, user, device).await,
        Vec::<i64>::new()
    );
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "sparse minutes").await;

    // Minutes 3 and 10 fill up past the limit and get their rows; the others stay
    // their events. The metric is in only one of minute 3's new events.
    let more = vec![
        make(3, "telemetry", Some(30.5)),
        make(3, "alarm", None),
        make(10, "telemetry", Some(7.0)),
    ];
    store
        .write(flush(user, device, more.clone()))
        .await
        .unwrap();
    // Before the recomputation too: pending minutes are read from their events.
    truth.extend(more);
    assert_levels(&store, (user, device), &truth).await;
    store.settle().await;
    let dense = vec![hour + 3 * ROLLUP_MS, hour + 10 * ROLLUP_MS];
    assert_eq!(minutes_with_rows(&ks, user, device).await, dense);
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "sparse and dense minutes").await;
    ks.drop_it().await;
}

#[tokio::test]
async fn hours_read_whole_in_one_round_are_summed_from_that_read() {
    let ks = Keyspace::new(|_| {}).await;
    let store = ks.store().await;
    let (user, device) = (15, Uuid::new_v4());
    let hour = T0 - T0.rem_euclid(HOUR);
    let mut id = 0u128;
    let mut make = |minute: i64, temp: f64| {
        id += 1;
        let ts = in_minute(hour, minute, id, 7919);
        event(
            id,
            ts,
            ["telemetry", "alarm"][id as usize % 2],
            &[("temp", temp)],
        )
    };
    // Three hours at once, as a gateway sends a day: every minute sparse in the first,
    // one minute dense in the second (both read whole), the third's last minute empty
    // (its read does not reach it, so the hour's events are read again).
    let mut truth: Vec<Event> = (0..180)
        .filter(|m| *m != 179)
        .flat_map(|m| (0..1 + m % 2).map(move |i| (m, i)))
        .map(|(m, i)| make(m, (m * 3 + i) as f64 / 7.0))
        .collect();
    truth.extend((0..4).map(|i| make(75, i as f64)));
    truth.push(make(180, 1.0));
    store
        .write(flush(user, device, truth.clone()))
        .await
        .unwrap();
    store.settle().await;
    assert_eq!(
        minutes_with_rows(&ks, user, device).await,
        [hour + 75 * ROLLUP_MS]
    );
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "hours read whole").await;

    // Late events into every hour, one minute at a time: the hours are summed from
    // their minutes again, and the first stays without rows.
    let late = vec![make(30, -1.0), make(100, 50.0), make(179, 2.5)];
    store
        .write(flush(user, device, late.clone()))
        .await
        .unwrap();
    store.settle().await;
    truth.extend(late);
    assert_levels(&store, (user, device), &truth).await;
    assert_fleet(&store, (user, device), &truth, "late events").await;
    ks.drop_it().await;
}
