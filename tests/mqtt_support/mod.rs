//! Helpers for the MQTT tests: an in-process server on port 0, the HTTP API through
//! reqwest, and rumqttc devices whose events arrive on a channel.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use iotpipe::topology::{self, Server};
use iotpipe::Config;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

/// Generous: the machine is small and shared.
pub const PATIENCE: Duration = Duration::from_secs(30);
pub const ADMIN: &str = "test-admin-token";

/// A test configuration: loopback port 0 for HTTP and MQTT, data in `dir`.
pub fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_owned();
    c.http.addr = "127.0.0.1:0".into();
    c.mqtt.addr = "127.0.0.1:0".into();
    c.admin_token = Some(ADMIN.into());
    c
}

pub struct Instance {
    pub server: Server,
    pub api: Api,
    pub dir: tempfile::TempDir,
}

impl Instance {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        tweak(&mut c);
        let server = topology::start(c).await.expect("server starts");
        let api = Api::new(server.http_addr);
        Self { server, api, dir }
    }

    pub fn mqtt(&self) -> SocketAddr {
        self.server.mqtt_addr.expect("the built-in endpoint is on")
    }
}

/// The HTTP API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    http: reqwest::Client,
}

/// A user with one device.
#[derive(Debug, Clone)]
pub struct Owner {
    pub key: String,
    pub device: String,
    pub token: String,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn user(&self) -> String {
        let name = format!("u{}", uuid::Uuid::new_v4().simple());
        let r = self
            .http
            .post(format!("{}/v1/users", self.base))
            .bearer_auth(ADMIN)
            .json(&json!({"username": name, "email": format!("{name}@example.com")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["api_key"].as_str().unwrap().to_owned()
    }

    pub async fn device(&self, key: &str) -> (String, String) {
        let r = self
            .http
            .post(format!("{}/v1/devices", self.base))
            .bearer_auth(key)
            .json(&json!({"name": "sensor", "type": "thermo"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn owner(&self) -> Owner {
        let key = self.user().await;
        let (device, token) = self.device(&key).await;
        Owner { key, device, token }
    }

    pub async fn get(&self, key: &str, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Every stored event of a device, newest first.
    pub async fn events(&self, o: &Owner) -> Vec<Value> {
        let v = self
            .get(&o.key, &format!("/v1/devices/{}/events?limit=10000", o.device))
            .await;
        v["events"].as_array().unwrap().clone()
    }

    pub async fn live(&self, o: &Owner) -> Value {
        self.get(&o.key, &format!("/v1/devices/{}/live", o.device)).await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn health(&self) -> Value {
        self.http
            .get(format!("{}/health", self.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until a device has stored at least `n` events; returns them.
    pub async fn wait_events(&self, o: &Owner, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = self.events(o).await;
            if events.len() >= n || Instant::now() > deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The value of one series in a Prometheus text page, e.g.
/// `iotpipe_events_rejected_total{source="mqtt",reason="invalid"}`.
pub fn metric(page: &str, series: &str) -> f64 {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
        None => (series, None),
    };
    for line in page.lines() {
        let Some((key, value)) = line.rsplit_once(' ') else { continue };
        let (kname, klabels) = match key.split_once('{') {
            Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
            None => (key, None),
        };
        if kname != name {
            continue;
        }
        let matches = match (labels, klabels) {
            (None, None) => true,
            (Some(want), Some(have)) => want.split(',').all(|w| have.split(',').any(|h| h == w)),
            _ => false,
        };
        if matches {
            return value.parse().unwrap();
        }
    }
    panic!("no series {series} in /metrics")
}

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
