//! /health, /metrics, a full pipeline, and an unreachable store, over real sockets.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use iotpipe::model::Event;
use iotpipe::model::PartitionBatch;
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::latest::Latest;
use iotpipe::store::{
    EventStore, FleetCount, FleetQuery, ListQuery, Point, PointQuery, Rollup, RollupQuery,
    StoreError,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{metric, TestServer};
use tokio::sync::Notify;
use uuid::Uuid;

/// Wraps the embedded store: writes can be held at a gate, and the store can be made
/// unreachable.
struct FaultyStore {
    inner: EmbeddedStore,
    gate_closed: AtomicBool,
    gate: Notify,
    down: AtomicBool,
}

impl FaultyStore {
    fn new(dir: &std::path::Path) -> Arc<Self> {
        Arc::new(Self {
            inner: EmbeddedStore::open(dir, 3_600_000).unwrap(),
            gate_closed: AtomicBool::new(false),
            gate: Notify::new(),
            down: AtomicBool::new(false),
        })
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("connection refused (test)".into()))
        } else {
            Ok(())
        }
    }

    fn open_gate(&self) {
        self.gate_closed.store(false, Ordering::SeqCst);
        self.gate.notify_waiters();
    }
}

#[async_trait]
impl EventStore for FaultyStore {
    fn backend(&self) -> &'static str {
        "faulty"
    }
    async fn write(&self, p: Arc<Vec<PartitionBatch>>) -> Result<Vec<usize>, StoreError> {
        while self.gate_closed.load(Ordering::SeqCst) {
            let notified = self.gate.notified();
            if !self.gate_closed.load(Ordering::SeqCst) {
                break;
            }
            notified.await;
        }
        self.check()?;
        self.inner.write(p).await
    }
    async fn list(&self, q: ListQuery) -> Result<Vec<Event>, StoreError> {
        self.check()?;
        self.inner.list(q).await
    }
    async fn points(&self, q: PointQuery) -> Result<Vec<Point>, StoreError> {
        self.check()?;
        self.inner.points(q).await
    }
    async fn rollups(&self, q: RollupQuery) -> Result<Option<Vec<Rollup>>, StoreError> {
        self.check()?;
        self.inner.rollups(q).await
    }
    async fn fleet_counts(&self, q: FleetQuery) -> Result<Option<Vec<FleetCount>>, StoreError> {
        self.check()?;
        self.inner.fleet_counts(q).await
    }
    async fn latest(&self, user: i64, device: Option<Uuid>) -> Result<Vec<Latest>, StoreError> {
        self.check()?;
        self.inner.latest(user, device).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
    async fn close(&self) -> Result<(), StoreError> {
        self.inner.close().await
    }
}

#[tokio::test]
async fn health_reports_every_component() {
    let t = TestServer::start().await;
    let resp = t
        .http
        .get(format!("{}/health", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "ok");
    for (name, backend) in [
        ("store", "embedded"),
        ("registry", "sqlite"),
        ("live", "local"),
        ("mqtt", "off"),
    ] {
        let c = &v["components"][name];
        assert_eq!(c["backend"], backend, "{v}");
        assert_eq!(c["ok"], true);
        assert!(c["latency_ms"].as_f64().unwrap() >= 0.0);
    }
}

#[tokio::test]
async fn every_listed_series_exists_at_zero_from_start_up() {
    let t = TestServer::start().await;
    let m = t.metrics().await;
    for source in ["http", "mqtt"] {
        assert_eq!(
            metric(
                &m,
                &format!(r#"iotpipe_events_ingested_total{{source="{source}"}}"#)
            ),
            0.0,
            "{m}"
        );
        for reason in [
            "invalid",
            "unauthorized",
            "rate_limited",
            "too_large",
            "unknown_device",
            "overloaded",
        ] {
            let series =
                format!(r#"iotpipe_events_rejected_total{{source="{source}",reason="{reason}"}}"#);
            assert_eq!(metric(&m, &series), 0.0, "{series}");
        }
    }
    assert_eq!(metric(&m, "iotpipe_batches_written_total"), 0.0);
    assert_eq!(metric(&m, "iotpipe_pipeline_queue_depth"), 0.0);
    assert!(
        m.contains("# TYPE iotpipe_store_write_seconds histogram"),
        "{m}"
    );

    let (_, key) = t.user("ann").await;
    let (_, token) = t.device(&key, "d").await;
    t.ingest(&token, json!([{"type": "t"}, {"type": "t"}]))
        .await;
    let m = t.metrics().await;
    assert_eq!(
        metric(&m, r#"iotpipe_events_ingested_total{source="http"}"#),
        2.0
    );
    assert_eq!(metric(&m, "iotpipe_batches_written_total"), 1.0);
    assert!(m.contains("iotpipe_store_write_seconds_bucket{le="), "{m}");
    assert_eq!(metric(&m, "iotpipe_store_write_seconds_count"), 1.0);
}

#[tokio::test]
async fn a_full_pipeline_answers_503_with_retry_after_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(&dir.path().join("events"));
    store.gate_closed.store(true, Ordering::SeqCst);
    let t = TestServer::start_with_store(store.clone(), |c| {
        c.http.max_events_per_request = 50;
        c.pipeline.queue_events = 100;
    })
    .await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let fifty = Value::Array((0..50).map(|_| json!({"type": "t"})).collect());
    // Two requests fill the pipeline; they wait for durability at the gate.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let (t2, body, token) = (t.http.clone(), fifty.to_string(), token.clone());
        let url = format!("{}/v1/ingest", t.base);
        waiting.push(tokio::spawn(async move {
            t2.post(url)
                .bearer_auth(token)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    // Wait until both are inside the pipeline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = t.metrics().await;
        if metric(&m, "iotpipe_pipeline_queue_depth") == 100.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline never filled: {m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, headers, v) = t.ingest_raw(&token, None, r#"{"type":"t"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(headers.contains_key("retry-after"));
    assert!(v["error"].is_string());
    // Health still answers while ingest is saturated.
    let resp = t
        .http
        .get(format!("{}/health", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);

    store.open_gate();
    for w in waiting {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    let (status, _) = t.ingest(&token, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t.all_events(&key, &dev).await.len(), 101);
    let m = t.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"iotpipe_events_rejected_total{source="http",reason="overloaded"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn an_unreachable_store_is_503_health_down_and_nothing_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(&dir.path().join("events"));
    let t = TestServer::start_with_store(store.clone(), |c| c.pipeline.retry_budget_ms = 200).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    store.down.store(true, Ordering::SeqCst);
    let (status, headers, v) = t.ingest_raw(&token, None, r#"{"type":"t"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(headers.contains_key("retry-after"));
    let resp = t
        .http
        .get(format!("{}/health", t.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let h: Value = resp.json().await.unwrap();
    assert_eq!(h["status"], "down");
    assert_eq!(h["components"]["store"]["ok"], false);

    // Back up: ingest resumes by itself, and the refused event was not stored.
    store.down.store(false, Ordering::SeqCst);
    let (status, _) = t.ingest(&token, json!({"type": "after"})).await;
    assert_eq!(status, StatusCode::OK);
    let events = t.all_events(&key, &dev).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "after");
}

#[tokio::test]
async fn a_write_that_is_retried_through_a_short_outage_is_acknowledged_once_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = FaultyStore::new(&dir.path().join("events"));
    let t =
        TestServer::start_with_store(store.clone(), |c| c.pipeline.retry_budget_ms = 30_000).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    store.down.store(true, Ordering::SeqCst);
    let (client, url) = (t.http.clone(), format!("{}/v1/ingest", t.base));
    let pending = tokio::spawn(async move {
        client
            .post(url)
            .bearer_auth(token)
            .body(r#"{"type":"t"}"#)
            .send()
            .await
            .unwrap()
            .status()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "acknowledged while the store was down"
    );
    store.down.store(false, Ordering::SeqCst);
    assert_eq!(pending.await.unwrap(), StatusCode::OK);
    assert_eq!(t.all_events(&key, &dev).await.len(), 1);
}
