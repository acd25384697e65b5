//! MQTT: rumqttc devices whose events arrive on a channel, raw packets for what a
//! well-behaved client library will not send, and a private Mosquitto.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

use super::{free_port, wait_for_port, Api, Owner, Proc, PATIENCE};

/// What a device's event loop reported.
#[derive(Debug)]
pub enum Seen {
    ConnAck(rumqttc::ConnectReturnCode),
    PubAck(u16),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    /// The k-th publish went out with this packet id.
    Sent(u16),
    Refused(rumqttc::ConnectReturnCode),
    Closed(String),
}

/// A rumqttc device whose event loop runs in a task until the connection ends.
pub struct Device {
    pub client: AsyncClient,
    pub seen: mpsc::UnboundedReceiver<Seen>,
}

pub fn options(addr: SocketAddr, user: &str, pass: &str) -> MqttOptions {
    let mut o = MqttOptions::new(
        format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_credentials(user, pass);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

impl Device {
    pub fn connect(addr: SocketAddr, user: &str, pass: &str) -> Self {
        Self::with_options(options(addr, user, pass))
    }

    /// Queues a PUBLISH (not retained); it goes out as the event loop runs.
    pub async fn publish(&self, topic: impl Into<String>, qos: QoS, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, qos, false, payload)
            .await
            .expect("the client queues the publish");
    }

    pub fn with_options(o: MqttOptions) -> Self {
        let (client, eventloop) = AsyncClient::new(o, 1000);
        let (tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(drive(eventloop, tx));
        Self { client, seen }
    }

    pub async fn next(&mut self) -> Seen {
        timeout(PATIENCE, self.seen.recv())
            .await
            .expect("the device heard something in time")
            .expect("the event loop task reports its end")
    }

    pub async fn connected(&mut self) {
        match self.next().await {
            Seen::ConnAck(rumqttc::ConnectReturnCode::Success) => {}
            other => panic!("expected CONNACK success, got {other:?}"),
        }
    }

    /// Waits for `n` PUBACKs; panics if the connection ends first.
    pub async fn pubacks(&mut self, n: usize) -> Vec<u16> {
        let mut acks = Vec::new();
        while acks.len() < n {
            match self.next().await {
                Seen::PubAck(id) => acks.push(id),
                Seen::Closed(why) => panic!("closed after {} of {n} PUBACKs: {why}", acks.len()),
                _ => {}
            }
        }
        acks
    }

    /// Waits until the server closes the connection; panics on a PUBACK.
    pub async fn closed(&mut self) -> String {
        loop {
            match self.next().await {
                Seen::Closed(why) => return why,
                Seen::PubAck(id) => panic!("unexpected PUBACK {id}"),
                _ => {}
            }
        }
    }
}

async fn drive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Seen>) {
    loop {
        let seen = match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(a))) => Seen::ConnAck(a.code),
            Ok(Event::Incoming(Incoming::PubAck(a))) => Seen::PubAck(a.pkid),
            Ok(Event::Incoming(Incoming::SubAck(a))) => Seen::SubAck(a.return_codes),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Seen::Sent(pkid),
            Ok(_) => continue,
            Err(ConnectionError::ConnectionRefused(code)) => {
                let _ = tx.send(Seen::Refused(code));
                return;
            }
            Err(e) => {
                let _ = tx.send(Seen::Closed(e.to_string()));
                return;
            }
        };
        if tx.send(seen).is_err() {
            return;
        }
    }
}

/// One event with an id, as JSON text.
pub fn event(id: &uuid::Uuid, value: f64) -> String {
    json!({"id": id.to_string(), "type": "telemetry", "metrics": {"temperature": value}})
        .to_string()
}

/// Counts how often each id appears among stored events.
pub fn id_counts(events: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in events {
        *counts
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// The topic of a device.
pub fn topic(device: &str) -> String {
    format!("devices/{device}/events")
}

/// One event with an id and a fixed `ts`, as JSON text.
fn event_at(id: &uuid::Uuid, ts_ms: i64) -> String {
    json!({"id": id.to_string(), "ts": ts_ms, "type": "telemetry", "metrics": {"seq": 1.0}})
        .to_string()
}

/// Publishes `ids` at QoS 1 through `addr` and returns which of them were PUBACKed
/// before the connection ended (or all were). `on_ack` sees the running count.
pub async fn stream_ids(
    device: &mut Device,
    topic: &str,
    ids: &[uuid::Uuid],
    ts_ms: i64,
    mut on_ack: impl FnMut(usize),
) -> Vec<uuid::Uuid> {
    let client = device.client.clone();
    let payloads: Vec<String> = ids.iter().map(|id| event_at(id, ts_ms)).collect();
    let topic = topic.to_owned();
    let publisher = tokio::spawn(async move {
        for p in payloads {
            if client
                .publish(&topic, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    // rumqttc sends publishes in the order they were requested, so the k-th
    // outgoing PUBLISH carries ids[k]; a packet id names one message in flight.
    let mut in_flight: HashMap<u16, uuid::Uuid> = HashMap::new();
    let mut next = 0;
    let mut acked = Vec::new();
    while acked.len() < ids.len() {
        match device.next().await {
            Seen::Sent(pkid) => {
                in_flight.insert(pkid, ids[next]);
                next += 1;
            }
            Seen::PubAck(pkid) => {
                acked.push(
                    in_flight
                        .remove(&pkid)
                        .expect("a PUBACK for a message sent"),
                );
                on_ack(acked.len());
            }
            Seen::Closed(_) => break,
            _ => {}
        }
    }
    publisher.abort();
    acked
}

/// A private Mosquitto on a free loopback port, with its own config and data dir.
/// Killed when dropped.
pub struct Broker {
    pub port: u16,
    _child: Proc,
    pub dir: tempfile::TempDir,
}

/// The broker settings the delivery guarantee needs, as every broker of the project
/// uses them.
const MOSQUITTO_CONF: &str = include_str!("../../deploy/mosquitto.conf");

impl Broker {
    /// Tuned as `deploy/mosquitto.conf` says the guarantee needs: a large in-flight
    /// window, a queue that never drops QoS 1 messages, and persistence.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 persistence_location {}/\nlog_dest none\n{}",
                dir.path().display(),
                MOSQUITTO_CONF
            ),
        )
        .unwrap();
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto is installed");
        let child = Proc(child);
        assert!(
            wait_for_port(port, PATIENCE).await,
            "mosquitto did not start"
        );
        Self {
            port,
            _child: child,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// A device publishing straight to a broker (which authenticates it, not iotpipe).
pub fn broker_device(port: u16) -> Device {
    let mut o = MqttOptions::new(
        format!("p{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
        "127.0.0.1",
        port,
    );
    o.set_keep_alive(Duration::from_secs(30));
    Device::with_options(o)
}

/// Waits until `/health` reports the MQTT component ok.
pub async fn wait_mqtt_ok(api: &Api) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let h = api.health().await;
        if h["components"]["mqtt"]["ok"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "MQTT never became ok: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Raw packets, for what a well-behaved client library will not send.

/// A v4 CONNECT.
pub fn connect_bytes(user: &str, pass: &str, keep_alive: u16) -> Vec<u8> {
    // A client id of its own: a second login under the same one would take over.
    let mut c = rumqttc::Connect::new(format!(
        "raw-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    ));
    c.keep_alive = keep_alive;
    c.set_login(user, pass);
    let mut buf = BytesMut::new();
    rumqttc::Packet::Connect(c)
        .write(&mut buf, usize::MAX)
        .unwrap();
    buf.to_vec()
}

pub fn publish_bytes(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut p = rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
    p.pkid = 1;
    let mut buf = BytesMut::new();
    rumqttc::Packet::Publish(p)
        .write(&mut buf, usize::MAX)
        .unwrap();
    buf.to_vec()
}

/// Reads until the server closes the socket. Panics if it stays open.
pub async fn expect_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept the connection open");
    got
}

/// A raw connection that has logged in; the CONNACK is consumed.
pub async fn raw_login(addr: SocketAddr, o: &Owner, keep_alive: u16) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect_bytes(&o.device, &o.token, keep_alive))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    timeout(PATIENCE, s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    s
}
