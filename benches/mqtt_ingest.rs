//! MQTT ingest throughput: the built-in endpoint (QoS 1, acked after durable) against
//! Mosquitto's own QoS 1 publisher → subscriber pass-through, measured in the same run
//! on the same machine, with the same publishers.
//!
//! `cargo bench --bench mqtt_ingest` (needs `mosquitto` on the PATH). Environment:
//! `MQTT_BENCH_MESSAGES` (default 200000), `MQTT_BENCH_PUBLISHERS` (default 4),
//! `MQTT_BENCH_ONLY=builtin` (only the built-in endpoint, e.g. under `perf`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use serde_json::json;
use support::{Api, Broker, Process};

#[path = "../tests/support/mod.rs"]
mod support;

/// Messages in flight per publisher: the same for both paths.
const INFLIGHT: u16 = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let messages: usize = env_or("MQTT_BENCH_MESSAGES", 200_000);
    let publishers: usize = env_or("MQTT_BENCH_PUBLISHERS", 4);
    let per = messages / publishers;
    let total = per * publishers;

    // `MQTT_BENCH_ONLY=builtin` skips the broker paths, e.g. to profile the endpoint.
    let builtin_only = std::env::var("MQTT_BENCH_ONLY").is_ok_and(|v| v == "builtin");
    let (mut baseline, mut baseline_ten, mut external) = (f64::NAN, f64::NAN, f64::NAN);
    if !builtin_only {
        let broker = Broker::start().await;
        baseline = mosquitto_pass_through(broker.port, publishers, per, 1).await?;
        baseline_ten = mosquitto_pass_through(broker.port, publishers, per / 10, 10).await?;
        drop(broker);

        let broker = Broker::start().await;
        external = self::external(broker.port, publishers, per).await?;
        drop(broker);
    }

    let dir = tempfile::tempdir()?;
    let mut config = support::config(dir.path());
    config.mqtt.addr = "127.0.0.1:0".into();
    config.mqtt.max_inflight = usize::from(INFLIGHT);
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config).await;
    let mqtt = server.mqtt_addr.context("MQTT endpoint")?;
    let devices = devices(&Api::new(&server), publishers).await;

    let single = builtin(mqtt, &devices, per, 1, Ids::V4).await?;
    let ten = builtin(mqtt, &devices, per / 10, 10, Ids::V4).await?;
    let ten_v7 = builtin(mqtt, &devices, per / 10, 10, Ids::V7).await?;
    server.stop().await;

    println!("MQTT QoS 1, {publishers} publishers, {INFLIGHT} in flight each, ~100-byte events");
    println!(
        "  mosquitto pass-through (pub→broker→sub): {:>9.0} msg/s ({total} messages)",
        baseline
    );
    println!(
        "  mosquitto pass-through, 10 events/msg:   {:>9.0} events/s ({:.0} msg/s)",
        baseline_ten * 10.0,
        baseline_ten
    );
    println!(
        "  iotpipe built-in, 1 event/message:       {:>9.0} msg/s, acked after durable",
        single
    );
    println!(
        "  iotpipe built-in, 10 events/message:     {:>9.0} events/s ({:.0} msg/s), v4 ids",
        ten * 10.0,
        ten
    );
    println!(
        "  iotpipe built-in, 10 events/message:     {:>9.0} events/s ({:.0} msg/s), v7 ids",
        ten_v7 * 10.0,
        ten_v7
    );
    println!(
        "  iotpipe external (pub→broker→iotpipe):   {:>9.0} msg/s, stored durably",
        external
    );
    println!(
        "  ratio built-in / mosquitto:              {:>9.2}",
        single / baseline
    );
    println!(
        "  ratio external / mosquitto:              {:>9.2}",
        external / baseline
    );
    println!(
        "  ratio built-in / mosquitto, 10 events:   {:>9.2} (v4 ids), {:.2} (v7 ids)",
        ten / baseline_ten,
        ten_v7 / baseline_ten
    );

    let connections = env_or("MQTT_BENCH_IDLE_CONNECTIONS", 10_000);
    let mut idle_kb = f64::NAN;
    if connections > 0 {
        idle_kb = idle_memory(connections).await? / 1024.0;
        println!(
            "  idle connections: {connections}, RSS {idle_kb:.1} KB per connection (iotpipe process)"
        );
    }

    // The same figures as one markdown table, which `scripts/bench` copies into
    // docs/performance.md as they are (a path not measured in this run shows NaN).
    println!();
    println!("| figure | iotpipe | baseline (same run) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| built-in, 1 event/msg, QoS 1, acked durable ({total} msgs) | {single:.0} msg/s | Mosquitto pass-through {baseline:.0} msg/s | {:.2} |",
        single / baseline
    );
    println!(
        "| external mode (pub → Mosquitto → iotpipe), stored durably | {external:.0} msg/s | Mosquitto pass-through {baseline:.0} msg/s | {:.2} |",
        external / baseline
    );
    for (ids, rate) in [("v4", ten), ("UUIDv7", ten_v7)] {
        println!(
            "| built-in, 10 events/msg, {ids} ids | {:.0} events/s | Mosquitto 10-event pass-through {:.0} events/s | {:.2} |",
            rate * 10.0,
            baseline_ten * 10.0,
            rate / baseline_ten
        );
    }
    if connections > 0 {
        println!(
            "| idle RSS per connection ({connections} connections) | {idle_kb:.1} KB | bar: 20 KB | {:.0}% of bar |",
            100.0 * idle_kb / 20.0
        );
    }
    Ok(())
}

/// Opens `n` idle, logged-in connections to the real binary and returns its RSS
/// growth per connection, in bytes.
async fn idle_memory(n: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    // All connections log in as one device from one address: the hardening limits of
    // issue 14 (4 per device, 1,000 per address, 10,000 in all) would refuse most of
    // them, so this server allows `n` (only in a config file: they have no variables).
    let conf = dir.path().join("idle.toml");
    std::fs::write(
        &conf,
        format!(
            "[mqtt]\nmax_connections = {}\nmax_connections_per_device = {n}\nmax_connections_per_ip = {n}\n",
            n + 16
        ),
    )?;
    let mut cmd = Process::command(&dir.path().join("data"));
    cmd.arg("--config")
        .arg(&conf)
        .env("IOTPIPE_MQTT_ADDR", "127.0.0.1:0");
    let process = tokio::task::spawn_blocking(move || Process::launch(cmd)).await??;
    let pid = process.child.id();
    let mqtt = process.mqtt.context("MQTT endpoint")?;
    let (id, token) = devices(&process.api(), 1).await.remove(0);
    // One client id per connection: a second login under the same one would take over
    // (close) the first.
    let connect = |i: usize| -> anyhow::Result<Vec<u8>> {
        let mut connect = rumqttc::Connect::new(format!("idle-{i}"));
        connect.keep_alive = 0;
        connect.set_login(&id, &token);
        let mut bytes = bytes::BytesMut::new();
        rumqttc::Packet::Connect(connect).write(&mut bytes, usize::MAX)?;
        Ok(bytes.to_vec())
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = support::rss_mb(pid);
    let mut streams = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = tokio::net::TcpStream::connect(mqtt).await?;
        s.write_all(&connect(i)?).await?;
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).await?;
        if connack != [0x20, 2, 0, 0] {
            bail!("CONNACK {connack:?}");
        }
        streams.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = support::rss_mb(pid);
    drop(streams);
    process.kill9();
    Ok((after - before).max(0.0) * 1024.0 * 1024.0 / n as f64)
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which ids the events carry.
#[derive(Clone, Copy)]
enum Ids {
    /// Random (v4): the store's duplicate index gets an entry per event.
    V4,
    /// UUIDv7 whose time field is the event's `ts`: found from the id alone.
    V7,
}

fn payload(events: usize, ids: Ids) -> Vec<u8> {
    let ts = iotpipe::model::now_ms();
    let one = |_| {
        let id = match ids {
            Ids::V4 => uuid::Uuid::new_v4(),
            Ids::V7 => iotpipe::model::assigned_id(ts),
        };
        json!({"id": id.to_string(), "ts": ts, "type": "telemetry",
               "metrics": {"temperature": 21.5}})
    };
    if events == 1 {
        serde_json::to_vec(&one(0)).unwrap()
    } else {
        serde_json::to_vec(&(0..events).map(one).collect::<Vec<_>>()).unwrap()
    }
}

fn options(id: String, addr: SocketAddr) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(60))
        .set_inflight(INFLIGHT)
        .set_max_packet_size(2 << 20, 2 << 20);
    o
}

/// Publishes `count` messages and waits for all their PUBACKs. Payloads are made
/// before the clock starts.
async fn publisher(
    options: MqttOptions,
    topic: String,
    payloads: Vec<Vec<u8>>,
    start: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client, mut eventloop) = AsyncClient::new(options, 10_000);
    wait_connack(&mut eventloop).await?;
    let count = payloads.len();
    let mut start = start;
    start.wait_for(|s| *s).await?;
    let sender = tokio::spawn(async move {
        for p in payloads {
            client.publish(&topic, QoS::AtLeastOnce, false, p).await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    while acked < count {
        if let Event::Incoming(Incoming::PubAck(_)) = eventloop.poll().await? {
            acked += 1;
        }
    }
    let _client = sender.await??;
    Ok(())
}

async fn wait_connack(eventloop: &mut EventLoop) -> anyhow::Result<()> {
    loop {
        if let Event::Incoming(Incoming::ConnAck(_)) = eventloop.poll().await? {
            return Ok(());
        }
    }
}

/// Runs the publishers and returns messages per second.
async fn run_publishers(
    jobs: Vec<(MqttOptions, String, Vec<Vec<u8>>)>,
    until: impl std::future::Future<Output = anyhow::Result<()>>,
    total: usize,
) -> anyhow::Result<f64> {
    let (start_tx, start_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (o, topic, payloads) in jobs {
        tasks.push(tokio::spawn(publisher(
            o,
            topic,
            payloads,
            start_rx.clone(),
        )));
    }
    // Let every publisher connect before the clock starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    start_tx.send(true)?;
    for t in tasks {
        t.await??;
    }
    until.await?;
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

async fn mosquitto_pass_through(
    port: u16,
    publishers: usize,
    per: usize,
    events: usize,
) -> anyhow::Result<f64> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let total = per * publishers;
    let (sub, mut sub_loop) = AsyncClient::new(options("bench-sub".into(), addr), 10_000);
    wait_connack(&mut sub_loop).await?;
    sub.subscribe("bench/+/events", QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Incoming::SubAck(_)) = sub_loop.poll().await? {
            break;
        }
    }
    let received = tokio::spawn(async move {
        let mut n = 0;
        while n < total {
            if let Event::Incoming(Incoming::Publish(_)) = sub_loop.poll().await? {
                n += 1;
            }
        }
        drop(sub);
        anyhow::Ok(())
    });
    let jobs = (0..publishers)
        .map(|i| {
            let payloads = (0..per).map(|_| payload(events, Ids::V4)).collect();
            (
                options(format!("bench-pub-{i}"), addr),
                format!("bench/{i}/events"),
                payloads,
            )
        })
        .collect();
    run_publishers(jobs, async { received.await? }, total).await
}

/// External mode: publishers → tuned Mosquitto → iotpipe's shared subscription. The
/// clock stops when iotpipe has every event durable.
async fn external(port: u16, publishers: usize, per: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mut config = support::config(dir.path());
    config.mqtt.url = Some(format!("mqtt://127.0.0.1:{port}"));
    config.mqtt.client_id = Some("bench-iotpipe".into());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config).await;
    let api = Api::new(&server);
    support::wait_mqtt_ok(&api).await;
    let devices = devices(&api, publishers).await;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let total = per * publishers;
    let jobs = devices
        .iter()
        .enumerate()
        .map(|(i, (id, _))| {
            let payloads = (0..per).map(|_| payload(1, Ids::V4)).collect();
            (
                options(format!("bench-ext-{i}"), addr),
                format!("devices/{id}/events"),
                payloads,
            )
        })
        .collect();
    let stored = async move {
        let series = r#"iotpipe_events_ingested_total{source="mqtt"}"#;
        while support::metric(&api.metrics().await, series) < total as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    };
    let rate = run_publishers(jobs, stored, total).await?;
    server.stop().await;
    Ok(rate)
}

async fn builtin(
    addr: SocketAddr,
    devices: &[(String, String)],
    per: usize,
    events: usize,
    ids: Ids,
) -> anyhow::Result<f64> {
    let jobs = devices
        .iter()
        .map(|(id, token)| {
            let mut o = options(format!("bench-{}", &id[..8]), addr);
            o.set_credentials(id, token);
            let payloads = (0..per).map(|_| payload(events, ids)).collect();
            (o, format!("devices/{id}/events"), payloads)
        })
        .collect();
    run_publishers(jobs, async { Ok(()) }, per * devices.len()).await
}

/// `n` devices of one user: (id, token) each.
async fn devices(api: &Api, n: usize) -> Vec<(String, String)> {
    let key = api.user_key().await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(api.device(&key, "bench").await);
    }
    out
}
