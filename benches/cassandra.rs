//! The wide-column store on a real Apache Cassandra node, each figure beside a baseline
//! measured in the same run:
//!
//! - **ingest**: HTTP ingest into iotpipe on Cassandra (acknowledged = durable on the
//!   node, rollups maintained) against the raw rate the `scylla` driver reaches on the
//!   same node with the same rows: prepared inserts in unlogged per-partition batches,
//!   64 in flight. Rounds alternate between the two, and the medians are compared.
//! - **aggregate**: a 24 h / 1-minute aggregate of one 1 Hz device (86,400 events)
//!   over HTTP, served from the rollups, against reading the same rows straight from
//!   the events table with the driver and aggregating them in the client.
//! - **grouped**: `GET /v1/aggregates?group_by=device` over 24 h in 1-minute windows
//!   for 100 devices of one user (one event per device per minute), against the same
//!   driver scan over the 100 devices.
//!
//! Needs the node of `scripts/cassandra` (127.0.0.1:9042, or `IOTPIPE_TEST_SCYLLA`).
//! Run: `cargo bench --bench cassandra` (`CASSANDRA_BENCH_ROUNDS=n` to change the
//! number of ingest rounds, 5 by default).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt, TryStreamExt};
use iotpipe::config::StoreConfig;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::batch::{Batch, BatchType};
use scylla::value::CqlTimestamp;
use serde_json::{json, Value};
use support::Api;
use uuid::Uuid;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;
/// Events per HTTP request and per raw round's partition run.
const PER_REQUEST: usize = 1_000;
/// HTTP clients (one device each) and requests per client in one round.
const CLIENTS: usize = 8;
const REQUESTS_PER_CLIENT: usize = 10;
/// Rows per raw unlogged batch: about the store's default 5 KiB per batch.
const RAW_BATCH_ROWS: usize = 50;
const RAW_IN_FLIGHT: usize = 64;

fn node() -> String {
    std::env::var("IOTPIPE_TEST_SCYLLA").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Server {
    api: Api,
    key: String,
    _server: iotpipe::topology::Server,
    _dir: tempfile::TempDir,
}

async fn server(keyspace: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.store.scylla_nodes = Some(node());
    config.store.keyspace = keyspace.to_owned();
    config.store.consistency = "ONE".into();
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    Server {
        api,
        key,
        _server: server,
        _dir: dir,
    }
}

fn events_json(n: usize, first_ts: Option<i64>, step_ms: i64) -> Value {
    json!((0..n)
        .map(|i| {
            let mut e =
                json!({"type": "telemetry", "metrics": {"temp": (i % 50) as f64, "battery": 0.5}});
            if let Some(t) = first_ts {
                e["ts"] = json!(iotpipe::model::format_ms(t + i as i64 * step_ms));
            }
            e
        })
        .collect::<Vec<_>>())
}

/// One HTTP round: every client posts its requests one after another; events/s.
async fn http_round(api: &Api, tokens: &[String]) -> f64 {
    let body = events_json(PER_REQUEST, None, 0);
    let started = Instant::now();
    stream::iter(tokens)
        .for_each_concurrent(CLIENTS, |token| {
            let body = &body;
            async move {
                for _ in 0..REQUESTS_PER_CLIENT {
                    let (s, v) = api.post("/v1/ingest", token, body.clone()).await;
                    assert_eq!(s, 200, "{v}");
                }
            }
        })
        .await;
    (CLIENTS * REQUESTS_PER_CLIENT * PER_REQUEST) as f64 / started.elapsed().as_secs_f64()
}

/// The raw driver round: the same number of rows, of the same shape, for as many
/// devices, written as fast as the driver will; events/s.
async fn raw_round(session: &Session, ks: &str) -> f64 {
    let insert = session
        .prepare(format!(
            "INSERT INTO {ks}.events (user_id, device_id, bucket, ts, event_id, type, metrics, \
             attrs, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .await
        .unwrap();
    let now = iotpipe::model::now_ms();
    let bucket = CqlTimestamp(now - now.rem_euclid(HOUR));
    let batches = CLIENTS * REQUESTS_PER_CLIENT * PER_REQUEST / RAW_BATCH_ROWS;
    let devices: Vec<Uuid> = (0..CLIENTS).map(|_| Uuid::new_v4()).collect();
    let started = Instant::now();
    stream::iter(0..batches)
        .map(|b| {
            let insert = insert.clone();
            let device = devices[b % CLIENTS];
            async move {
                let mut batch = Batch::new(BatchType::Unlogged);
                let mut rows = Vec::with_capacity(RAW_BATCH_ROWS);
                for i in 0..RAW_BATCH_ROWS {
                    batch.append_statement(insert.clone());
                    let metrics: BTreeMap<&str, f64> =
                        [("temp", (i % 50) as f64), ("battery", 0.5)].into();
                    rows.push((
                        1i64,
                        device,
                        bucket,
                        CqlTimestamp(now),
                        Uuid::now_v7(),
                        "telemetry",
                        metrics,
                        BTreeMap::<&str, &str>::new(),
                        CqlTimestamp(now),
                    ));
                }
                session.batch(&batch, rows).await.unwrap();
            }
        })
        .buffer_unordered(RAW_IN_FLIGHT)
        .collect::<Vec<()>>()
        .await;
    (batches * RAW_BATCH_ROWS) as f64 / started.elapsed().as_secs_f64()
}

/// Waits until the rollups of `devices` for the day starting at `day` have caught up,
/// so the query figures read rollups.
async fn settled(session: &Session, ks: &str, user: i64, devices: &[Uuid], day: i64) {
    let select = session
        .prepare(format!(
            "SELECT hour FROM {ks}.pending_by_device WHERE user_id = ? AND device_id = ? \
             AND hour >= ? AND hour < ? LIMIT 1"
        ))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    for d in devices {
        loop {
            let rows = session
                .execute_unpaged(
                    &select,
                    (user, d, CqlTimestamp(day), CqlTimestamp(day + DAY)),
                )
                .await
                .unwrap()
                .into_rows_result()
                .unwrap()
                .rows_num();
            if rows == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device {d} still has pending minutes"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The driver-only baseline of an aggregate: every event of `devices` in the day,
/// read from its hourly partitions and counted per (device, minute) in the client.
async fn raw_scan(session: &Session, ks: &str, user: i64, devices: &[Uuid], from: i64) -> usize {
    let select = session
        .prepare(format!(
            "SELECT ts, metrics FROM {ks}.events WHERE user_id = ? AND device_id = ? AND bucket = ?"
        ))
        .await
        .unwrap();
    let parts: Vec<(Uuid, i64)> = devices
        .iter()
        .flat_map(|d| (0..24).map(move |h| (*d, from + h * HOUR)))
        .collect();
    let windows: Vec<BTreeMap<i64, (u64, f64)>> = stream::iter(parts)
        .map(|(d, bucket)| {
            let select = select.clone();
            async move {
                let mut w: BTreeMap<i64, (u64, f64)> = BTreeMap::new();
                let mut rows = session
                    .execute_iter(select, (user, d, CqlTimestamp(bucket)))
                    .await
                    .unwrap()
                    .rows_stream::<(CqlTimestamp, Option<BTreeMap<String, f64>>)>()
                    .unwrap();
                while let Some((ts, m)) = rows.try_next().await.unwrap() {
                    let e = w.entry(ts.0 - ts.0.rem_euclid(60_000)).or_default();
                    e.0 += 1;
                    e.1 += m.and_then(|m| m.get("temp").copied()).unwrap_or(0.0);
                }
                Ok::<_, ()>(w)
            }
        })
        .buffer_unordered(16)
        .try_collect()
        .await
        .unwrap();
    windows.iter().map(BTreeMap::len).sum()
}

async fn time_ms<F: std::future::Future>(f: impl Fn() -> F, n: usize) -> f64 {
    let mut t = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        f().await;
        t.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    median(t)
}

async fn run() {
    let keyspace = format!("iotpipe_bench_{}", support::random_name());
    let config = StoreConfig {
        scylla_nodes: Some(node()),
        keyspace: keyspace.clone(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        ..StoreConfig::default()
    };
    ScyllaStore::migrate(&ScyllaSettings::from_config(&config, HOUR).unwrap())
        .await
        .expect("a Cassandra node answers (scripts/deps starts one)");
    let session = SessionBuilder::new()
        .known_node(node())
        .build()
        .await
        .unwrap();
    let s = server(&keyspace).await;
    let api = &s.api;

    // Ingest, alternating rounds.
    let mut tokens = Vec::new();
    for _ in 0..CLIENTS {
        tokens.push(api.device(&s.key, "d").await.1);
    }
    http_round(api, &tokens).await; // warm-up: connections, prepared statements
    raw_round(&session, &keyspace).await;
    let rounds: usize = std::env::var("CASSANDRA_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let (mut http, mut raw) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raw.push(raw_round(&session, &keyspace).await);
        http.push(http_round(api, &tokens).await);
    }
    let (http, raw) = (median(http), median(raw));
    println!(
        "ingest, {} events per round, {rounds} rounds each, medians:",
        CLIENTS * REQUESTS_PER_CLIENT * PER_REQUEST
    );
    println!("  raw driver, unlogged per-partition batches: {raw:>9.0} events/s");
    println!("  iotpipe HTTP, acked durable, with rollups:  {http:>9.0} events/s");
    println!(
        "  ratio iotpipe / raw:                        {:>9.2}",
        http / raw
    );

    // One device at 1 Hz for a day, ingested with its own timestamps.
    let from = {
        let now = iotpipe::model::now_ms();
        now - now.rem_euclid(DAY) - 2 * DAY
    };
    let (device, token) = api.device(&s.key, "d").await;
    for chunk in 0..9 {
        let body = events_json(9_600, Some(from + chunk * 9_600_000), 1_000);
        let (st, v) = api.post("/v1/ingest", &token, body).await;
        assert_eq!(st, 200, "{v}");
    }
    // 100 devices, one event a minute each for the same day.
    let mut fleet = Vec::new();
    for _ in 0..100 {
        let (id, token) = api.device(&s.key, "d").await;
        let body = events_json(1_440, Some(from + 7_000), 60_000);
        let (st, v) = api.post("/v1/ingest", &token, body).await;
        assert_eq!(st, 200, "{v}");
        fleet.push(id);
    }
    let user = user_of(&session, &keyspace, &device).await;
    let mut all: Vec<Uuid> = fleet.iter().map(|d| d.parse().unwrap()).collect();
    all.push(device.parse().unwrap());
    settled(&session, &keyspace, user, &all, from).await;
    let range = format!(
        "from={}&to={}&window=1m",
        iotpipe::model::format_ms(from),
        iotpipe::model::format_ms(from + DAY)
    );
    let path = format!("/v1/devices/{device}/aggregates?{range}&metric=temp");
    let (st, v) = api.get(&path, &s.key).await;
    assert_eq!(st, 200, "{v}");
    let served: u64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["count"].as_u64().unwrap())
        .sum();
    assert_eq!(served, 86_400, "every event counted once");
    let agg = time_ms(|| api.get(&path, &s.key), 41).await;
    let dev: Vec<Uuid> = vec![device.parse().unwrap()];
    let agg_raw = time_ms(|| raw_scan(&session, &keyspace, user, &dev, from), 11).await;
    println!("24 h / 1 min aggregate of a 1 Hz device (86,400 events), medians:");
    println!("  iotpipe over HTTP, from rollups: {agg:>8.1} ms");
    println!(
        "  driver scan of the raw events:   {agg_raw:>8.1} ms ({:.0}x)",
        agg_raw / agg
    );

    let grouped = format!("/v1/aggregates?{range}&group_by=device");
    let (st, v) = api.get(&grouped, &s.key).await;
    assert_eq!(st, 200, "{v}");
    let g = time_ms(|| api.get(&grouped, &s.key), 11).await;
    let fleet_ids: Vec<Uuid> = fleet.iter().map(|d| d.parse().unwrap()).collect();
    let g_raw = time_ms(|| raw_scan(&session, &keyspace, user, &fleet_ids, from), 5).await;
    println!("24 h / 1 min grouped by device, 100 devices (+1 dense), medians:");
    println!("  iotpipe over HTTP:               {g:>8.1} ms");
    println!(
        "  driver scan of the 100 devices:  {g_raw:>8.1} ms ({:.1}x)",
        g_raw / g
    );

    // The same figures as one markdown table, which `scripts/bench` copies into
    // docs/performance.md as they are.
    println!();
    println!("| figure | iotpipe | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| HTTP ingest into Cassandra, acked durable, with rollups (median of {rounds} rounds) | {http:.0} events/s | raw driver, unlogged per-partition batches: {raw:.0} events/s | {:.0}% |",
        100.0 * http / raw
    );
    println!(
        "| 24 h / 1 min aggregate of a 1 Hz device (86,400 events), HTTP, median | {agg:.1} ms | driver scan of the raw events: {agg_raw:.1} ms | {:.1}x faster |",
        agg_raw / agg
    );
    println!(
        "| 24 h / 1 min grouped by device, 101 devices, HTTP, median | {g:.1} ms | driver scan of the 100 devices: {g_raw:.1} ms | {:.1}x {} |",
        g_raw / g,
        if g_raw >= g { "faster" } else { "(slower)" }
    );

    drop(s);
    session
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .unwrap();
}

async fn user_of(session: &Session, ks: &str, device: &str) -> i64 {
    let device: Uuid = device.parse().unwrap();
    let (user,): (i64,) = session
        .query_unpaged(
            format!("SELECT user_id FROM {ks}.buckets WHERE device_id = ? ALLOW FILTERING"),
            (device,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .first_row()
        .unwrap();
    user
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}
