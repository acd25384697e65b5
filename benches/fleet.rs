//! The fleet shape (issue 11), against the release binary over HTTP, each figure
//! beside a baseline measured in the same run:
//!
//! 1. Ingest: 1,000 devices sending one event a minute for 24 h (1.44M events),
//!    posted in gateway mode (a user key, 5 devices x 1,440 events per request), vs.
//!    one device's dense 1 Hz stream of as many events (10,000 per request), by the
//!    same client with the same concurrency.
//! 2. Queries, median of 21: grouped 24 h / 1 h over the 1,000 devices (by device and
//!    by type), beside the same query in 59m59s windows, which hour rows do not fit
//!    (so minute rows are read device by device, as before the hour and day levels);
//!    30 d / 1 d and 365 d / 1 d for the dense device, beside SQLite's GROUP BY over
//!    the same events; the fleet's latest values, beside the device list.
//! 3. Peak RSS of the server over the whole run.
//!
//! Run: `cargo bench --bench fleet`. `FLEET_DEVICES` and `FLEET_HOURS` scale the
//! fleet; `FLEET_STORE=cassandra` runs it on the Cassandra node at 127.0.0.1:9042 (or
//! `IOTPIPE_TEST_SCYLLA`) in a fresh keyspace.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use support::{median, post_json, rss_mb, Process as Server, ADMIN};

#[path = "../tests/support/mod.rs"]
mod support;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
const CONCURRENCY: usize = 4;

/// Ingest requests the server refused as overload, over the run.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Samples the server's RSS until stopped, keeping the peak (in KB) in `peak`, which
/// a phase may reset (`swap(0)`) to get its own; returns the peak of the whole run.
fn watch_rss(
    pid: u32,
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<f64> {
    tokio::spawn(async move {
        let mut overall = 0.0f64;
        while !stop.load(Ordering::Relaxed) {
            let now = rss_mb(pid);
            overall = overall.max(now);
            peak.fetch_max((now * 1024.0) as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        overall
    })
}

/// The peak RSS since the last call, in MB.
fn phase_peak(peak: &AtomicU64) -> f64 {
    peak.swap(0, Ordering::Relaxed) as f64 / 1024.0
}

/// Posts the request bodies built by `body(i)` for `i in 0..n`, `CONCURRENCY` at a
/// time; returns events per second. The bodies are built before the clock starts: on
/// 2 cores the client shares the server's CPU, and building a fleet's bodies (a device
/// id in every event) costs more than a dense stream's, which would count against the
/// fleet a cost that is not the server's.
async fn ingest(
    http: &reqwest::Client,
    url: &str,
    secret: &str,
    n: usize,
    events_per_request: usize,
    body: impl Fn(usize) -> Vec<u8>,
) -> Result<f64> {
    let bodies: Vec<Vec<u8>> = (0..n).map(body).collect();
    let started = Instant::now();
    stream::iter(bodies)
        .map(|b| async move {
            // As a gateway does: an overloaded server (503, 429) is asked again after
            // its Retry-After; the wait counts in the rate.
            loop {
                let r = http
                    .post(url)
                    .bearer_auth(secret)
                    .header("content-type", "application/json")
                    .body(b.clone())
                    .send()
                    .await?;
                let status = r.status().as_u16();
                if status == 503 || status == 429 {
                    let secs = r
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                        .context("an overload answer without Retry-After")?;
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                    continue;
                }
                anyhow::ensure!(r.status().is_success(), "ingest answered {}", r.status());
                return Ok(());
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok((n * events_per_request) as f64 / started.elapsed().as_secs_f64())
}

/// Median ms of a GET, after checking it once with `check`.
async fn query_ms(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    runs: usize,
    check: impl Fn(&Value) -> Result<()>,
) -> Result<f64> {
    let v: Value = http.get(url).bearer_auth(key).send().await?.json().await?;
    check(&v).with_context(|| format!("{url}: {v}"))?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let r = http.get(url).bearer_auth(key).send().await?;
        anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
        let _ = r.bytes().await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(times))
}

fn count_sum(v: &Value) -> u64 {
    v["buckets"]
        .as_array()
        .map(|b| b.iter().filter_map(|b| b["count"].as_u64()).sum())
        .unwrap_or(0)
}

/// The dense device's events in SQLite (a file, WAL), the baseline for its queries.
struct Sqlite {
    pool: sqlx::SqlitePool,
    _dir: tempfile::TempDir,
}

impl Sqlite {
    async fn load(start: i64, n: usize) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("dense.db").display()
        );
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await?;
        sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&pool)
            .await?;
        sqlx::query("CREATE TABLE ev (ts INTEGER PRIMARY KEY, temperature REAL)")
            .execute(&pool)
            .await?;
        let mut tx = pool.begin().await?;
        for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO ev (ts, temperature) ");
            q.push_values(chunk, |mut b, &i| {
                b.push_bind(start + i as i64 * 1000)
                    .push_bind((i % 500) as f64 / 10.0);
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Sqlite { pool, _dir: dir })
    }

    /// Median ms of the day-window aggregate over `[from, to)`.
    async fn group_by_day_ms(&self, from: i64, to: i64) -> Result<f64> {
        let q = "SELECT ts / 86400000 AS w, COUNT(*), MIN(temperature), MAX(temperature), \
                 AVG(temperature), SUM(temperature) FROM ev WHERE ts >= ? AND ts < ? \
                 GROUP BY w ORDER BY w";
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let rows = sqlx::query(q)
                .bind(from)
                .bind(to)
                .fetch_all(&self.pool)
                .await?;
            anyhow::ensure!(!rows.is_empty());
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(median(times))
    }
}

/// Extra settings for the server, and the keyspace to drop afterwards.
async fn store_env() -> Result<Vec<(&'static str, String)>> {
    if std::env::var("FLEET_STORE").as_deref() != Ok("cassandra") {
        return Ok(Vec::new());
    }
    let node = std::env::var("IOTPIPE_TEST_SCYLLA").unwrap_or_else(|_| "127.0.0.1:9042".into());
    let ks = format!("bench_fleet_{}", std::process::id());
    let env = vec![
        ("IOTPIPE_SCYLLA_NODES", node),
        ("IOTPIPE_SCYLLA_KEYSPACE", ks),
        // One local node.
        (
            "IOTPIPE_SCYLLA_REPLICATION",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        ),
        ("IOTPIPE_SCYLLA_CONSISTENCY", "ONE".into()),
    ];
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .arg("migrate")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .status()?;
    anyhow::ensure!(status.success(), "iotpipe migrate failed");
    Ok(env)
}

/// A session on the bench's node and its keyspace, if it uses one.
async fn node_session(
    env: &[(&str, String)],
) -> Result<Option<(scylla::client::session::Session, String)>> {
    let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    let (Some(node), Some(ks)) = (get("IOTPIPE_SCYLLA_NODES"), get("IOTPIPE_SCYLLA_KEYSPACE"))
    else {
        return Ok(None);
    };
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(node)
        .build()
        .await?;
    Ok(Some((session, ks)))
}

/// Waits until the node runs no compaction (`system_views.sstable_tasks` empty for
/// two seconds running, at most three minutes); returns how long that took. The
/// node shares the machine: compacting what the ingest phases wrote, it would take
/// the CPU from the queries measured next, a cost of the ingest.
async fn node_idle(env: &[(&str, String)]) -> Result<Option<f64>> {
    let Some((session, _)) = node_session(env).await? else {
        return Ok(None);
    };
    let started = Instant::now();
    let mut quiet = 0;
    while quiet < 2 && started.elapsed() < Duration::from_secs(180) {
        let tasks = session
            .query_unpaged("SELECT kind FROM system_views.sstable_tasks", ())
            .await?
            .into_rows_result()?
            .rows_num();
        quiet = if tasks == 0 { quiet + 1 } else { 0 };
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(Some(started.elapsed().as_secs_f64()))
}

/// Drops the bench's keyspace, if it made one.
async fn drop_keyspace(env: &[(&str, String)]) -> Result<()> {
    let Some((session, ks)) = node_session(env).await? else {
        return Ok(());
    };
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {ks}"), ())
        .await?;
    Ok(())
}

/// The server's CPU time so far (user + system), in seconds.
fn cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are
    // the 12th and 13th, in clock ticks (100 a second on Linux).
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .context("stat")?
        .split_whitespace()
        .collect();
    Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / 100.0)
}

/// Waits until the server is idle (under a tenth of a core for half a second): the
/// engine keeps flushing and merging after the last answer, and that work belongs to
/// the phase that caused it, not to the next one.
async fn settle(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let before = cpu_s(pid)?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        if cpu_s(pid)? - before < 0.05 || Instant::now() > deadline {
            return Ok(());
        }
    }
}

/// Waits until the store has recomputed every minute it was handed (the wide-column
/// store does that in the background; `iotpipe_rollup_backlog` on `/metrics`).
async fn caught_up(http: &reqwest::Client, base: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1_200);
    loop {
        let page = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if support::metric(&page, "iotpipe_rollup_backlog") == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "rollups still behind after 20 min"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What one ingest phase measured.
struct Phase {
    /// Events acknowledged per second.
    acked: f64,
    /// Events per second until their rollups were recomputed too: the acknowledged
    /// time plus the wait for the backlog it left.
    caught_up: f64,
    /// The server's CPU seconds for the phase, including the background work it left.
    cpu: f64,
}

async fn run_phase(
    pid: u32,
    (http, base): (&reqwest::Client, &str),
    events: usize,
    ingest: impl std::future::Future<Output = Result<f64>>,
) -> Result<Phase> {
    caught_up(http, base).await?;
    settle(pid).await?;
    let before = cpu_s(pid)?;
    let acked = ingest.await?;
    let done = Instant::now();
    caught_up(http, base).await?;
    let behind = done.elapsed().as_secs_f64();
    settle(pid).await?;
    Ok(Phase {
        acked,
        caught_up: events as f64 / (events as f64 / acked + behind),
        cpu: cpu_s(pid)? - before,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    let devices: usize = std::env::var("FLEET_DEVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let hours: i64 = std::env::var("FLEET_HOURS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let cpu = std::thread::available_parallelism().map_or(0, |n| n.get());
    let env = store_env().await?;
    let store = if env.is_empty() {
        "embedded (fjall)"
    } else {
        "Cassandra"
    };
    println!("machine: {cpu} cores; store: {store}; fleet: {devices} devices x {hours} h");

    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path(), &env)?;
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU64::new(0));
    let peak = watch_rss(server.child.id(), stop.clone(), phase.clone());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(16)
        .build()?;
    let base = server.base.clone();
    let user = post_json(
        &http,
        &format!("{base}/v1/users"),
        ADMIN,
        &json!({"username": "fleet", "email": "f@example.com"}),
    )
    .await?;
    let key = user["api_key"].as_str().context("key")?.to_owned();
    let ids: Vec<String> = stream::iter(0..devices)
        .map(|d| {
            let (http, base, key) = (&http, &base, &key);
            async move {
                let types = ["thermostat", "meter", "tracker"];
                let v = post_json(
                    http,
                    &format!("{base}/v1/devices"),
                    key,
                    &json!({"name": format!("d{d}"), "type": types[d % 3]}),
                )
                .await?;
                Ok::<_, anyhow::Error>(v["id"].as_str().context("id")?.to_owned())
            }
        })
        .buffered(8)
        .try_collect()
        .await?;
    // The dense device belongs to another user, so that the fleet's figures are the
    // fleet's alone.
    let other = post_json(
        &http,
        &format!("{base}/v1/users"),
        ADMIN,
        &json!({"username": "dense", "email": "d@example.com"}),
    )
    .await?;
    let other_key = other["api_key"].as_str().context("key")?.to_owned();
    let dense = post_json(
        &http,
        &format!("{base}/v1/devices"),
        &other_key,
        &json!({"name": "dense", "type": "meter"}),
    )
    .await?;
    let (dense_id, dense_token) = (
        dense["id"].as_str().context("id")?.to_owned(),
        dense["token"].as_str().context("token")?.to_owned(),
    );

    // 1. Ingest. The fleet's day ends at the last whole hour; the dense stream's
    //    events end there too and go back as many seconds as the fleet has events.
    let end = iotpipe::model::now_ms() / HOUR * HOUR;
    let start = end - hours * HOUR;
    let minutes = (hours * 60) as usize;
    let url = format!("{base}/v1/ingest");
    let per_request = 5;
    let setup_rss = phase_peak(&phase);
    let pid = server.child.id();
    let total = devices / per_request * per_request * minutes;
    let fleet = run_phase(pid, (&http, &base), total, ingest(&http, &url, &key, devices / per_request, per_request * minutes, |r| {
        let mut events = Vec::with_capacity(per_request * minutes);
        for d in &ids[r * per_request..(r + 1) * per_request] {
            for m in 0..minutes {
                let kind = ["telemetry", "telemetry", "status"][m % 3];
                events.push(json!({"device_id": d, "ts": start + m as i64 * MIN, "type": kind, "metrics": {"temperature": (m % 300) as f64 / 10.0}}));
            }
        }
        serde_json::to_vec(&events).unwrap()
    }))
    .await?;
    let dense_per_request = 10_000;
    // Whole requests only: as many events as the fleet's, rounded down.
    let dense_total = total / dense_per_request * dense_per_request;
    let dense_start = end - (dense_total as i64) * 1000;
    let fleet_rss = phase_peak(&phase);
    let dense = run_phase(pid, (&http, &base), dense_total, ingest(&http, &url, &dense_token, dense_total / dense_per_request, dense_per_request, |r| {
        let events: Vec<Value> = (0..dense_per_request)
            .map(|i| {
                let n = (r * dense_per_request + i) as i64;
                json!({"ts": dense_start + n * 1000, "type": "telemetry", "metrics": {"temperature": (n % 500) as f64 / 10.0}})
            })
            .collect();
        serde_json::to_vec(&events).unwrap()
    }))
    .await?;
    let (fleet_rate, dense_rate) = (fleet.acked, dense.acked);
    println!(
        "ingest requests refused as overload and sent again after Retry-After: {}",
        REFUSED.load(Ordering::Relaxed)
    );
    let (fleet_cpu, dense_cpu) = (fleet.cpu, dense.cpu);
    println!(
        "fleet ingest: {fleet_rate:.0} ev/s acked, {:.0} ev/s with its rollups; dense ingest: \
         {dense_rate:.0} ev/s acked, {:.0} ev/s with its rollups ({:.0}% / {:.0}%)",
        fleet.caught_up,
        dense.caught_up,
        100.0 * fleet_rate / dense_rate,
        100.0 * fleet.caught_up / dense.caught_up
    );
    println!(
        "server CPU per phase, background work included: fleet {fleet_cpu:.2} s, dense {dense_cpu:.2} s (dense/fleet {:.0}%)",
        100.0 * dense_cpu / fleet_cpu
    );
    let dense_rss = phase_peak(&phase);
    println!(
        "peak RSS by phase: set-up {setup_rss:.0} MB, fleet ingest {fleet_rss:.0} MB, dense ingest {dense_rss:.0} MB"
    );

    let refused = REFUSED.load(Ordering::Relaxed);
    // The ingest phases' rows of the markdown table that `scripts/bench` copies into
    // docs/performance.md; the query rows follow unless `FLEET_QUERIES=0`.
    let ingest_rows = format!(
        "| fleet-shaped ingest ({devices} devices x 1/min x {hours} h, {} per request), acknowledged; requests refused as overload and sent again: {refused} | {fleet_rate:.0} ev/s | dense 1 Hz, one device, 10,000 per request: {dense_rate:.0} ev/s | {:.0}% | ≥ 70% |\n\
         | the same, until every rollup is recomputed (`iotpipe_rollup_backlog` back to 0) | {:.0} ev/s | dense: {:.0} ev/s | {:.0}% | |\n\
         | server CPU for the phase, background work included | fleet {fleet_cpu:.2} s | dense {dense_cpu:.2} s | dense/fleet {:.0}% | |\n\
         | server peak RSS by phase (set-up / fleet / dense) | {setup_rss:.0} / {fleet_rss:.0} / {dense_rss:.0} MB | bar: 300 MB | | < 300 MB |",
        per_request * minutes,
        100.0 * fleet_rate / dense_rate,
        fleet.caught_up,
        dense.caught_up,
        100.0 * fleet.caught_up / dense.caught_up,
        100.0 * dense_cpu / fleet_cpu
    );
    let table_head =
        "| figure | iotpipe | baseline (same run) | ratio | target |\n|---|---|---|---|---|";

    if std::env::var("FLEET_QUERIES").as_deref() == Ok("0") {
        println!();
        println!("{table_head}\n{ingest_rows}");
        return drop_keyspace(&env).await;
    }
    // 2. Queries, each beside a baseline, on a node done with the ingest's compactions.
    if let Some(secs) = node_idle(&env).await? {
        println!("the node's compactions after the ingest phases ended {secs:.0} s later");
    }
    let runs = 21;
    let fleet_events = total as u64;
    let grouped = |window: &str, by: &str| {
        format!("{base}/v1/aggregates?from={start}&to={end}&window={window}&group_by={by}")
    };
    let all_fleet = |v: &Value| {
        anyhow::ensure!(count_sum(v) == fleet_events, "count {}", count_sum(v));
        Ok(())
    };
    let mut rows = Vec::new();
    // Peaks while the product's queries run, and while the baselines' do (they read
    // minute rows device by device, which no dashboard query of this shape does).
    let (mut query_rss, mut baseline_rss) = (0.0f64, 0.0f64);
    phase_peak(&phase);
    // The product's queries first: a baseline reads the whole fleet's minutes, and
    // on Cassandra the query measured right after one ran slower for it.
    let mut fast = Vec::new();
    for by in ["device", "type"] {
        fast.push(query_ms(&http, &grouped("1h", by), &key, runs, all_fleet).await?);
        query_rss = query_rss.max(phase_peak(&phase));
    }
    for (by, fast) in ["device", "type"].into_iter().zip(fast) {
        let slow = query_ms(&http, &grouped("3599s", by), &key, 5, |_| Ok(())).await?;
        baseline_rss = baseline_rss.max(phase_peak(&phase));
        rows.push((
            format!("grouped {hours} h / 1 h by {by}, {devices} devices"),
            fast,
            "same in 59m59s windows, which hour rows do not fit: minutes device by device, as before the levels",
            slow,
            "50 ms",
        ));
    }
    let sqlite = Sqlite::load(dense_start, dense_total).await?;
    let dense_agg = |days: i64, window: &str| {
        format!("{base}/v1/devices/{dense_id}/aggregates?from={}&to={end}&window={window}&metric=temperature", end - days * DAY)
    };
    for (days, target) in [(30, "5 ms"), (365, "10 ms")] {
        let fast = query_ms(&http, &dense_agg(days, "1d"), &other_key, runs, |v| {
            anyhow::ensure!(count_sum(v) == dense_total as u64, "count {}", count_sum(v));
            Ok(())
        })
        .await?;
        let slow = sqlite.group_by_day_ms(end - days * DAY, end).await?;
        rows.push((
            format!("{days} d / 1 d, one device ({dense_total} events)"),
            fast,
            "SQLite GROUP BY over the same events",
            slow,
            target,
        ));
    }
    let latest = query_ms(&http, &format!("{base}/v1/latest"), &key, runs, |v| {
        let n = v["devices"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == devices, "{n} devices");
        Ok(())
    })
    .await?;
    let list = query_ms(&http, &format!("{base}/v1/devices"), &key, runs, |_| Ok(())).await?;
    query_rss = query_rss.max(phase_peak(&phase));
    stop.store(true, Ordering::Relaxed);
    let peak = peak.await?;

    println!();
    println!("{table_head}\n{ingest_rows}");
    for (what, fast, baseline, slow, target) in rows {
        println!(
            "| {what} | {fast:.1} ms | {baseline}: {slow:.0} ms | {:.0}x faster | ≤ {target} |",
            slow / fast
        );
    }
    println!("| fleet latest values, {devices} devices | {latest:.1} ms | device list (registry): {list:.1} ms | {:.1}x | ≤ 20 ms |", latest / list);
    println!(
        "| server peak RSS over the run | {peak:.0} MB | bar: 300 MB | {:.0}% of bar | < 300 MB |",
        100.0 * peak / 300.0
    );
    println!(
        "| server peak RSS by query phase (the queries above / their 59m59s baselines) | {query_rss:.0} / {baseline_rss:.0} MB | bar: 300 MB | | |"
    );
    drop(server);
    drop_keyspace(&env).await
}
