//! A bounded soak: while an attacker holds 500 slow HTTP connections and 2,000 idle
//! MQTT sockets and floods logins with wrong secrets, legitimate devices keep
//! ingesting over HTTP and MQTT, every request acknowledged and nothing lost. All on
//! loopback: the attacker from 127.0.0.2, the devices from 127.0.0.1, so that the
//! per-address limits fall on the attacker alone. Everything stops by itself.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::QoS;
use serde_json::json;
use support::{event, topic, Device, TestServer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use uuid::Uuid;

const SOAK: Duration = Duration::from_secs(12);
const SLOW_HTTP: usize = 500;
const IDLE_MQTT: usize = 2_000;
const SLOW_HEADERS: &[u8] = b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\n";
const STALLED_BODY: &[u8] =
    b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n[";

/// A connection from the attacker's address.
async fn from_attacker(to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind("127.0.0.2:0".parse().unwrap()).ok()?;
    socket.connect(to).await.ok()
}

/// Keeps `n` connections open until `until`, opening a new one whenever the server
/// closes one; `first` is written on each.
async fn hold(to: SocketAddr, n: usize, first: &'static [u8], until: Instant) {
    let tasks = (0..n).map(|_| async move {
        while Instant::now() < until {
            let Some(mut s) = from_attacker(to).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let _ = s.write_all(first).await;
            // Held until the server closes it (a read of 0) or the soak ends.
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout_at(until, async {
                use tokio::io::AsyncReadExt;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
            // Closed by the server: come back a little later, as a patient attacker
            // would, rather than spin on the test's own two cores.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    futures::future::join_all(tasks).await;
}

/// Wrong secrets from the attacker's address, as fast as they are answered.
async fn flood_logins(to: SocketAddr, until: Instant) -> (u64, u64) {
    let (mut refused, mut throttled) = (0, 0);
    while Instant::now() < until {
        let Some(mut s) = from_attacker(to).await else {
            continue;
        };
        let req = format!(
            "GET /v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ipk_guess{}\r\n\
             Connection: close\r\n\r\n",
            Uuid::new_v4().simple()
        );
        if s.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut answer = Vec::new();
        use tokio::io::AsyncReadExt;
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        if answer.starts_with("HTTP/1.1 401") {
            refused += 1;
        } else if answer.starts_with("HTTP/1.1 429") {
            throttled += 1;
        }
    }
    (refused, throttled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_devices_keep_ingesting_while_an_attacker_holds_its_slots() {
    let inst = TestServer::with_mqtt(|c| {
        c.http.header_timeout_secs = 2;
        c.mqtt.connect_timeout_secs = 2;
        c.limits.device_per_sec = 0;
        c.limits.user_per_sec = 0;
    })
    .await;
    let http = inst.http_addr();
    let mqtt = inst.mqtt();
    let until = Instant::now() + SOAK;
    let attack = async {
        // Half send headers that never end; half announce a large body and stall in
        // it, which once took every ingest slot.
        let (_, _, _, flood) = tokio::join!(
            hold(http, SLOW_HTTP / 2, SLOW_HEADERS, until),
            hold(http, SLOW_HTTP / 2, STALLED_BODY, until),
            hold(mqtt, IDLE_MQTT, b"", until),
            flood_logins(http, until),
        );
        flood
    };

    let owner = inst.api.owner().await;
    let mqtt_owner = inst.api.owner().await;
    let legit = async {
        // Let the attacker take its positions first.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let client = reqwest::Client::new();
        let mut device = Device::connect(mqtt, &mqtt_owner.device, &mqtt_owner.token);
        device.connected().await;
        let (mut over_http, mut over_mqtt) = (Vec::new(), Vec::new());
        while Instant::now() + Duration::from_secs(1) < until {
            let ids: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
            let body: Vec<_> = ids
                .iter()
                .map(|id| json!({"id": id, "type": "t", "metrics": {"v": 1}}))
                .collect();
            let started = Instant::now();
            let r = client
                .post(format!("{}/v1/ingest", inst.api.base))
                .bearer_auth(&owner.token)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "a legitimate request was refused");
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            over_http.extend(ids);
            let id = Uuid::new_v4();
            device
                .publish(topic(&mqtt_owner.device), QoS::AtLeastOnce, event(&id, 1.0))
                .await;
            device.pubacks(1).await;
            over_mqtt.push(id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (over_http, over_mqtt)
    };
    let ((refused, throttled), (over_http, over_mqtt)) = tokio::join!(attack, legit);
    assert!(
        over_http.len() >= 200 && over_mqtt.len() >= 20,
        "{} {}",
        over_http.len(),
        over_mqtt.len()
    );
    assert!(
        throttled > 0,
        "the login flood was never slowed ({refused} plain 401s)"
    );
    eprintln!(
        "soak: {} events over HTTP and {} over MQTT acknowledged; flood: {refused} x 401, \
         {throttled} x 429",
        over_http.len(),
        over_mqtt.len()
    );

    // Nothing acknowledged is lost, nothing stored twice.
    for (o, sent) in [(&owner, &over_http), (&mqtt_owner, &over_mqtt)] {
        let stored = inst.api.events(o).await;
        let ids: Vec<&str> = stored.iter().map(|e| e["id"].as_str().unwrap()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "stored twice");
        for id in sent.iter() {
            assert!(
                unique.contains(id.to_string().as_str()),
                "acknowledged {id} lost"
            );
        }
    }
}
