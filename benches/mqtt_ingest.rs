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
use iotpipe::topology;
use iotpipe::Config;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};

const ADMIN: &str = "ipa_mqtt-bench-admin-token-0123456789";
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
        let broker = Mosquitto::start()?;
        wait_port(broker.port).await?;
        baseline = mosquitto_pass_through(broker.port, publishers, per, 1).await?;
        baseline_ten = mosquitto_pass_through(broker.port, publishers, per / 10, 10).await?;
        drop(broker);

        let broker = Mosquitto::start()?;
        wait_port(broker.port).await?;
        external = self::external(broker.port, publishers, per).await?;
        drop(broker);
    }

    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        admin_token: Some(ADMIN.into()),
        ..Config::default()
    };
    config.http.addr = "127.0.0.1:0".into();
    config.mqtt.addr = "127.0.0.1:0".into();
    config.mqtt.max_inflight = usize::from(INFLIGHT);
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = topology::start(config).await?;
    let mqtt = server.mqtt_addr.context("MQTT endpoint")?;
    let devices = devices(server.http_addr, publishers).await?;

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
    if connections > 0 {
        let per_connection = idle_memory(connections).await?;
        println!(
            "  idle connections: {connections}, RSS {:.1} KB per connection (iotpipe process)",
            per_connection / 1024.0
        );
    }
    Ok(())
}

/// Opens `n` idle, logged-in connections to the real binary and returns its RSS
/// growth per connection, in bytes.
async fn idle_memory(n: usize) -> anyhow::Result<f64> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"))
        .arg("serve")
        .env("IOTPIPE_DATA_DIR", dir.path())
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_ADMIN_TOKEN", ADMIN)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("pid")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let line = lines.next_line().await?.context("no stdout line")?;
    let field = |name: &str| -> anyhow::Result<SocketAddr> {
        Ok(line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .context("address")?
            .parse()?)
    };
    let (http, mqtt) = (field("http=")?, field("mqtt=")?);
    let (id, token) = devices(http, 1).await?.remove(0);
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
    let before = rss(pid)?;
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
    let after = rss(pid)?;
    drop(streams);
    child.kill().await?;
    Ok((after.saturating_sub(before)) as f64 / n as f64)
}

/// Resident set size of a process, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
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
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        admin_token: Some(ADMIN.into()),
        ..Config::default()
    };
    config.http.addr = "127.0.0.1:0".into();
    config.mqtt.addr = "off".into();
    config.mqtt.url = Some(format!("mqtt://127.0.0.1:{port}"));
    config.mqtt.client_id = Some("bench-iotpipe".into());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = topology::start(config).await?;
    let http = server.http_addr;
    let api = reqwest::Client::new();
    let health = format!("http://{http}/health");
    for attempt in 0.. {
        let h: Value = api.get(&health).send().await?.json().await?;
        if h["components"]["mqtt"]["ok"] == true {
            break;
        }
        if attempt > 400 {
            bail!("iotpipe never subscribed: {h}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let devices = devices(http, publishers).await?;
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
    let metrics = format!("http://{http}/metrics");
    let stored = async move {
        loop {
            let page = api.get(&metrics).send().await?.text().await?;
            let ingested = page
                .lines()
                .find_map(|l| l.strip_prefix(r#"iotpipe_events_ingested_total{source="mqtt"} "#))
                .context("ingested series")?
                .trim()
                .parse::<f64>()?;
            if ingested >= total as f64 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

async fn devices(http: SocketAddr, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let api = reqwest::Client::new();
    let base = format!("http://{http}");
    let user: Value = api
        .post(format!("{base}/v1/users"))
        .bearer_auth(ADMIN)
        .json(&json!({"username": "bench", "email": "bench@example.com"}))
        .send()
        .await?
        .json()
        .await?;
    let key = user["api_key"].as_str().context("api_key")?.to_owned();
    let mut out = Vec::new();
    for _ in 0..n {
        let d: Value = api
            .post(format!("{base}/v1/devices"))
            .bearer_auth(&key)
            .json(&json!({"name": "bench", "type": "bench"}))
            .send()
            .await?
            .json()
            .await?;
        out.push((
            d["id"].as_str().context("id")?.to_owned(),
            d["token"].as_str().context("token")?.to_owned(),
        ));
    }
    Ok(out)
}

/// A private, tuned Mosquitto (as docs/mqtt.md requires), killed on drop.
struct Mosquitto {
    port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            // The same settings as every broker of the project, persistence included.
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 persistence_location {}/\nlog_dest none\n{}",
                dir.path().display(),
                include_str!("../deploy/mosquitto.conf")
            ),
        )?;
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        Ok(Self {
            port,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("mosquitto did not start")
}
