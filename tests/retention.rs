//! Retention tiers over HTTP: an event older than the raw tier is refused by name,
//! listing an expired range answers only what is kept, and aggregates over it are
//! still served from the rollups that remain.

mod support;

use std::sync::Arc;
use std::time::Duration;

use iotpipe::model::{bucket_start, Event, Record};
use iotpipe::pipeline::batcher::Batcher;
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::retention::Retention;
use iotpipe::store::EventStore;
use reqwest::StatusCode;
use serde_json::json;
use support::{now_ms, TestServer};
use uuid::Uuid;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

#[tokio::test]
async fn expired_raw_events_are_refused_unlisted_and_still_aggregated() {
    let dir = tempfile::tempdir().unwrap();
    let tiers = Retention::new([Some(DAY), Some(30 * DAY), None, None]);
    let store = Arc::new(EmbeddedStore::open_with(dir.path(), HOUR, tiers).unwrap());
    let t = TestServer::start_with_store(store.clone(), |c| {
        c.retention.raw = "1d".into();
        c.retention.minutes = "30d".into();
        c.retention.sweep_every_secs = 1;
    })
    .await;
    let (user, key) = t.user("ret").await;
    let (device, token) = t.device(&key, "d").await;

    // Too old to be kept: refused, naming the field, and nothing stored.
    let old = now_ms() - 2 * DAY;
    let (status, v) = t
        .ingest(
            &token,
            json!([{"type": "t", "ts": now_ms(), "metrics": {"v": 1}},
                               {"type": "t", "ts": old, "metrics": {"v": 2}}]),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "ts", "{v}");
    assert_eq!(v["index"], 1, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("retention.raw"),
        "{v}"
    );

    // Events written three days ago (as if kept before the tiers were set): the
    // store holds them, the sweep deletes them.
    let hour = bucket_start(now_ms() - 3 * DAY, HOUR);
    let records: Vec<Record> = (0..10)
        .map(|i| Record {
            user_id: user,
            device_id: device.parse().unwrap(),
            received_ms: hour,
            event: Event {
                id: Uuid::new_v4(),
                id_assigned: false,
                ts_ms: hour + i * 60_000,
                kind: "t".into(),
                metrics: vec![("v".into(), i as f64)],
                attrs: vec![],
            },
        })
        .collect();
    let mut batcher: Batcher<()> = Batcher::new(1_000, Duration::from_secs(60), HOUR);
    batcher.push(records, (), tokio::time::Instant::now());
    let partitions = batcher.take().unwrap().partitions;
    store.write(Arc::new(partitions)).await.unwrap();
    let (status, v) = t
        .ingest(&token, json!([{"type": "t", "metrics": {"v": 100}}]))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Wait for the sweep (every second here) so that the answers below come from
    // what is left on disk, not only from the read clipping.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (from, to) = (hour - HOUR, now_ms() + 60_000);
    let (status, v) = t
        .get(
            &format!("/v1/devices/{device}/events?from={from}&to={to}&limit=100"),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let listed = v["events"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "only the fresh event is listed: {v}");

    let (status, v) = t
        .get(
            &format!(
                "/v1/devices/{device}/aggregates?from={hour}&to={}&window=1h&metric=v",
                hour + HOUR
            ),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let b = &v["buckets"][0];
    assert_eq!(b["count"], 10, "served from the minute rollups: {v}");
    assert_eq!(b["sum"], 45.0, "{v}");
}
