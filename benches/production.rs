//! Production backends against the embedded defaults, measured in the same run:
//! HTTP ingest with Redis counters and limits, and with a MySQL registry (warm auth
//! cache), each against the all-embedded baseline.
//!
//! Needs the machine's MariaDB (127.0.0.1:3306) and Redis (127.0.0.1:6379); uses a
//! fresh database and a random key prefix. Run:
//! `cargo bench --bench production` (or `--profile dev` for a quick look;
//! `PRODUCTION_BENCH_ROUNDS` sets the interleaved rounds, 30 by default).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures::stream::{self, StreamExt};
use iotpipe::Config;
use serde_json::{json, Value};
use support::{Api, TestDb, MARIADB, REDIS};

const EVENTS_PER_REQUEST: usize = 100;
const REQUESTS_PER_ROUND: usize = 64;
const IN_FLIGHT: usize = 16;
const INTERLEAVED_ROUNDS: usize = 30;

struct Target {
    api: Api,
    token: String,
    body: Value,
    _server: iotpipe::topology::Server,
    _dir: tempfile::TempDir,
}

async fn target(configure: impl FnOnce(&mut Config)) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    // Limits enabled, but high enough never to refuse: the cost is what is measured.
    config.limits.device_per_sec = 100_000_000;
    config.limits.user_per_sec = 100_000_000;
    configure(&mut config);
    let server = support::start(config).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    let (_, token) = api.device(&key, "d").await;
    let body = json!((0..EVENTS_PER_REQUEST)
        .map(|i| json!({"type": "telemetry", "metrics": {"temp": i as f64, "battery": 0.5}}))
        .collect::<Vec<_>>());
    Target {
        api,
        token,
        body,
        _server: server,
        _dir: dir,
    }
}

async fn round(t: &Target) {
    let results: Vec<u16> = stream::iter(0..REQUESTS_PER_ROUND)
        .map(|_| async {
            let resp = t
                .api
                .http
                .post(format!("{}/v1/ingest", t.api.base))
                .bearer_auth(&t.token)
                .json(&t.body)
                .send()
                .await
                .unwrap();
            resp.status().as_u16()
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    assert!(results.iter().all(|s| *s == 200), "{results:?}");
}

fn production(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(TestDb::create(MARIADB));
    let prefix = support::redis_prefix();
    let targets = rt.block_on(async {
        vec![
            ("embedded", target(|_| {}).await),
            (
                "redis_live",
                target(|c| {
                    c.live.redis_url = Some(REDIS.into());
                    c.live.key_prefix = prefix.clone();
                })
                .await,
            ),
            (
                "mysql_registry",
                target(|c| c.registry.url = Some(db.url.clone())).await,
            ),
        ]
    });
    let mut group = c.benchmark_group("http_ingest");
    group.throughput(Throughput::Elements(
        (EVENTS_PER_REQUEST * REQUESTS_PER_ROUND) as u64,
    ));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    for (name, t) in &targets {
        rt.block_on(round(t)); // warm the auth cache and connections
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    rt.block_on(round(t));
                }
                started.elapsed()
            })
        });
    }
    group.finish();

    // The machine is shared, so load from elsewhere drifts over a run. Interleaving the
    // configurations round by round exposes them to the same drift; the ratios of the
    // medians are the figures to compare against the speed bars.
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    // `PRODUCTION_BENCH_ROUNDS` shortens this for a check of the plumbing.
    let rounds: usize = std::env::var("PRODUCTION_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(INTERLEAVED_ROUNDS);
    for _ in 0..rounds {
        for (i, (_, t)) in targets.iter().enumerate() {
            let started = Instant::now();
            rt.block_on(round(t));
            let events = (EVENTS_PER_REQUEST * REQUESTS_PER_ROUND) as f64;
            samples[i].push(events / started.elapsed().as_secs_f64());
        }
    }
    let medians: Vec<f64> = samples
        .iter_mut()
        .map(|s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect();
    for ((name, _), m) in targets.iter().zip(&medians) {
        println!(
            "interleaved median {name}: {m:.0} events/s ({:.1}% of embedded)",
            m / medians[0] * 100.0
        );
    }
    // The interleaved medians as one markdown table, which `scripts/bench` copies into
    // docs/performance.md as it is.
    println!();
    println!("| figure | iotpipe | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    for ((name, _), m) in targets.iter().zip(&medians).skip(1) {
        let what = match *name {
            "redis_live" => "Redis counters and limits",
            "mysql_registry" => "MySQL registry, warm auth cache",
            other => other,
        };
        println!(
            "| HTTP ingest, {EVENTS_PER_REQUEST}-event requests, {what} (median of {rounds} interleaved rounds) | {m:.0} events/s | all-embedded: {:.0} events/s | {:.0}% |",
            medians[0],
            100.0 * m / medians[0]
        );
    }
    drop(targets);
    rt.block_on(support::clear_redis(REDIS, &prefix));
    drop(db);
}

criterion_group!(benches, production);
criterion_main!(benches);
