//! End-to-end figures behind `docs/performance.md`, each beside a baseline measured in
//! the same run (these machines are noisy; ratios travel better than absolutes).
//!
//! 1. Ingest: HTTP `POST /v1/ingest` of 1,000-event batches against the release
//!    binary, acknowledged = durable, vs. the embedded store's own bulk-write rate.
//! 2. Aggregate: a 1-minute aggregate of one metric over 24 h of 1 Hz data (86,400
//!    events) over HTTP, vs. SQLite's GROUP BY over the same rows.
//! 3. Memory: the server's peak RSS while ingesting at full speed.
//!
//! Run: `cargo bench --bench e2e` (set `E2E_SECS` to change the ingest duration).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use iotpipe::model::PartitionBatch;
use iotpipe::model::{Event, PartitionKey, Record};
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::EventStore;
use serde_json::{json, Value};
use sqlx::sqlite::SqlitePoolOptions;
use support::{median, post_json, rss_mb, Process as Server, ADMIN};
use uuid::Uuid;

#[path = "../tests/support/mod.rs"]
mod support;

const BATCH: usize = 1_000;
const DAY: i64 = 86_400;

/// An event as the HTTP phase sends it: no `id`, so the server assigns one.
fn event(i: usize, ts_ms: i64) -> Event {
    Event {
        id: iotpipe::model::assigned_id(ts_ms),
        id_assigned: true,
        ts_ms,
        kind: "telemetry".into(),
        metrics: vec![
            ("temperature".into(), 20.0 + (i % 100) as f64 / 10.0),
            ("battery".into(), 0.93),
        ],
        attrs: vec![("fw".into(), "1.4.2".into())],
    }
}

/// The store's own rate: flushes of 5 x 1,000 events written directly, each durable,
/// shaped like the HTTP phase's events (server-assigned ids, a spread of timestamps).
async fn raw_store_rate(secs: f64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let store = EmbeddedStore::open(dir.path(), 3_600_000)?;
    let now = iotpipe::model::now_ms();
    let started = Instant::now();
    let mut written = 0usize;
    while started.elapsed().as_secs_f64() < secs {
        let partitions: Vec<PartitionBatch> = (0..5)
            .map(|d| {
                let records: Vec<Record> = (0..BATCH)
                    .map(|i| Record {
                        user_id: 1,
                        device_id: Uuid::from_u128(d),
                        received_ms: now,
                        event: event(i, now - (i as i64)),
                    })
                    .collect();
                PartitionBatch {
                    key: PartitionKey::of(&records[0], 3_600_000),
                    records,
                }
            })
            .collect();
        written += store
            .write(Arc::new(partitions))
            .await?
            .iter()
            .sum::<usize>();
    }
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

/// Returns (events/s, peak RSS in MB).
async fn http_ingest_rate(
    server: &Server,
    http: &reqwest::Client,
    token: &str,
    secs: f64,
) -> Result<(f64, f64)> {
    // Pre-built bodies, so the client spends its time on HTTP, not on JSON.
    let now = iotpipe::model::now_ms();
    let bodies: Vec<bytes::Bytes> = (0..64)
        .map(|b| {
            let events: Vec<Value> = (0..BATCH)
                .map(|i| {
                    json!({"ts": now - ((b * BATCH + i) as i64 % 3_600_000), "type": "telemetry",
                           "metrics": {"temperature": 20.0 + (i % 100) as f64 / 10.0, "battery": 0.93},
                           "attrs": {"fw": "1.4.2"}})
                })
                .collect();
            bytes::Bytes::from(serde_json::to_vec(&events).unwrap())
        })
        .collect();
    let bodies = Arc::new(bodies);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/v1/ingest", server.base);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for w in 0..8 {
        let (http, url, token, bodies, done, stop) = (
            http.clone(),
            url.clone(),
            token.to_owned(),
            bodies.clone(),
            done.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let body = bodies[i % bodies.len()].clone();
                i += 8;
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("request");
                assert!(r.status().is_success(), "ingest answered {}", r.status());
                done.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
        }));
    }
    let mut peak = 0.0f64;
    while started.elapsed().as_secs_f64() < secs {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_mb(server.child.id()));
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    Ok((rate, peak))
}

/// Median ms of the HTTP aggregate query over 86,400 events of one device.
async fn aggregate_query_ms(
    server: &Server,
    http: &reqwest::Client,
    key: &str,
    token: &str,
    dev: &str,
) -> Result<(f64, i64)> {
    let end = iotpipe::model::now_ms() / 60_000 * 60_000;
    let start = end - DAY * 1000;
    let url = format!("{}/v1/ingest", server.base);
    for chunk in 0..(DAY as usize / 10_000 + 1) {
        let events: Vec<Value> = (chunk * 10_000..((chunk + 1) * 10_000).min(DAY as usize))
            .map(|i| json!({"ts": start + i as i64 * 1000, "type": "telemetry", "metrics": {"temperature": (i % 500) as f64 / 10.0}}))
            .collect();
        if !events.is_empty() {
            post_json(http, &url, token, &Value::Array(events)).await?;
        }
    }
    let q = format!(
        "{}/v1/devices/{dev}/aggregates?from={start}&to={end}&window=1m&metric=temperature",
        server.base
    );
    let check: Value = http.get(&q).bearer_auth(key).send().await?.json().await?;
    let n: u64 = check["buckets"]
        .as_array()
        .context("buckets")?
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    anyhow::ensure!(
        n == DAY as u64,
        "expected 86400 events, the aggregate saw {n}"
    );
    let mut times = Vec::new();
    for _ in 0..41 {
        let t = Instant::now();
        let r = http.get(&q).bearer_auth(key).send().await?;
        let _ = r.bytes().await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((median(times), start))
}

/// Median ms of SQLite's GROUP BY over the same 86,400 rows (a file DB, WAL).
async fn sqlite_group_by_ms() -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("agg.db").display());
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    sqlx::query(
        "CREATE TABLE ev (device TEXT, ts INTEGER, temperature REAL, PRIMARY KEY (device, ts))",
    )
    .execute(&pool)
    .await?;
    let mut tx = pool.begin().await?;
    for i in 0..DAY {
        sqlx::query("INSERT INTO ev VALUES ('d', ?, ?)")
            .bind(i * 1000)
            .bind((i % 500) as f64 / 10.0)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let q = "SELECT ts / 60000 AS w, COUNT(*), MIN(temperature), MAX(temperature), AVG(temperature), SUM(temperature) \
             FROM ev WHERE device = 'd' AND ts >= 0 AND ts < 86400000 GROUP BY w ORDER BY w";
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let rows = sqlx::query(q).fetch_all(&pool).await?;
        anyhow::ensure!(rows.len() == 1440);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(times))
}

#[tokio::main]
async fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; anything else (e.g. `cargo test --benches`) only
    // checks that this builds.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let secs: f64 = std::env::var("E2E_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cpu} cores");

    let raw = raw_store_rate(secs).await?;
    println!("raw store bulk write: {raw:.0} events/s");

    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &[])?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()?;
    let user = post_json(
        &http,
        &format!("{}/v1/users", server.base),
        ADMIN,
        &json!({"username": "bench", "email": "b@example.com"}),
    )
    .await?;
    let key = user["api_key"].as_str().context("key")?.to_owned();
    let dev = post_json(
        &http,
        &format!("{}/v1/devices", server.base),
        &key,
        &json!({"name": "d", "type": "t"}),
    )
    .await?;
    let token = dev["token"].as_str().context("token")?.to_owned();
    let (rate, peak_rss) = http_ingest_rate(&server, &http, &token, secs).await?;
    println!("http ingest, 1,000-event batches: {rate:.0} events/s, peak RSS {peak_rss:.0} MB");

    let agg_dev = post_json(
        &http,
        &format!("{}/v1/devices", server.base),
        &key,
        &json!({"name": "agg", "type": "t"}),
    )
    .await?;
    let (agg_ms, _) = aggregate_query_ms(
        &server,
        &http,
        &key,
        agg_dev["token"].as_str().context("token")?,
        agg_dev["id"].as_str().context("id")?,
    )
    .await?;
    let sqlite_ms = sqlite_group_by_ms().await?;
    println!("aggregate 86,400 events / 1m windows over HTTP: median {agg_ms:.2} ms; SQLite GROUP BY: median {sqlite_ms:.2} ms");

    println!();
    println!("| figure | iotpipe | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!("| HTTP ingest, 1,000-event batches, acked durable | {rate:.0} ev/s | raw store bulk write {raw:.0} ev/s | {:.0}% |", 100.0 * rate / raw);
    println!("| 1-minute aggregate, 86,400 events, HTTP, median | {agg_ms:.2} ms | SQLite GROUP BY {sqlite_ms:.2} ms | {:.2}x faster |", sqlite_ms / agg_ms);
    println!(
        "| server peak RSS while ingesting | {peak_rss:.0} MB | bar: 300 MB | {:.0}% of bar |",
        100.0 * peak_rss / 300.0
    );
    Ok(())
}
