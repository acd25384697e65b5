//! The wide-column store when its node stops answering: a private Apache Cassandra
//! node (never the shared one) is paused with SIGSTOP for 30 s during ingest over HTTP
//! and MQTT, then resumed.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use iotpipe::config::StoreConfig;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use rumqttc::QoS;
use serde_json::json;
use support::CassandraNode;
use support::{event, topic, Device, Seen};
use tokio::time::{timeout, Instant};
use uuid::Uuid;

/// How long the node stays paused.
const PAUSE: Duration = Duration::from_secs(30);

/// Ingests one event with a fresh id; returns the status, the id, and Retry-After.
async fn ingest_one(api: &support::Api, token: &str) -> (u16, Uuid, Option<String>) {
    let id = Uuid::new_v4();
    let (s, headers, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/ingest",
            Some(token),
            Some(json!({"id": id, "type": "t", "metrics": {"v": 1}})),
        )
        .await;
    let retry = headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (s.as_u16(), id, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_gets_503s_and_no_acks_then_ingest_resumes_with_nothing_lost() {
    let node = CassandraNode::start();
    let addr = format!("127.0.0.1:{}", node.port);
    let store = StoreConfig {
        scylla_nodes: Some(addr.clone()),
        keyspace: "iotpipe_faults".into(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        // A paused node is noticed after a second, not five.
        request_timeout_ms: 1_000,
        ..StoreConfig::default()
    };
    ScyllaStore::migrate(&ScyllaSettings::from_config(&store, 3_600_000).unwrap())
        .await
        .expect("schema on the private node");
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.store = store;
    config.mqtt.addr = "127.0.0.1:0".into();
    let server = support::start(config).await;
    let api = support::Api::new(&server);
    let mqtt_addr = server.mqtt_addr.unwrap();
    let key = api.user_key().await;
    let (device, token) = api.device(&key, "d").await;

    let mut acked: Vec<Uuid> = Vec::new();
    for _ in 0..5 {
        let (s, id, _) = ingest_one(&api, &token).await;
        assert_eq!(s, 200);
        acked.push(id);
    }
    let mut d = Device::connect(mqtt_addr, &device, &token);
    d.connected().await;
    let before = Uuid::new_v4();
    d.publish(topic(&device), QoS::AtLeastOnce, event(&before, 1.0))
        .await;
    d.pubacks(1).await;
    acked.push(before);

    node.signal("STOP");
    let paused_at = Instant::now();

    // MQTT: a message sent now is not acknowledged while the node is paused.
    let during = Uuid::new_v4();
    d.publish(topic(&device), QoS::AtLeastOnce, event(&during, 2.0))
        .await;
    // HTTP: 503 with Retry-After, within the store's timeout and the retry budget.
    let mut refused = None;
    while refused.is_none() {
        assert!(
            paused_at.elapsed() < Duration::from_secs(15),
            "no 503 while the node is paused"
        );
        match ingest_one(&api, &token).await {
            (200, id, _) => acked.push(id),
            (503, _, retry) => refused = Some(retry),
            (s, _, _) => panic!("unexpected status {s}"),
        }
    }
    assert!(
        refused.unwrap().is_some_and(|r| r.parse::<u64>().is_ok()),
        "503 without Retry-After"
    );
    let health = api.health().await;
    assert_eq!(health["components"]["store"]["ok"], false, "{health}");
    assert_ne!(health["status"], "ok", "{health}");
    // Still no PUBACK for the message sent during the pause (the connection may have
    // been closed instead, so that the device sends it again).
    let deadline = paused_at + PAUSE - Duration::from_secs(2);
    while Instant::now() < deadline {
        match timeout(deadline - Instant::now(), d.seen.recv()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Seen::PubAck(id))) => panic!("PUBACK {id} while the node is paused"),
            Ok(Some(Seen::Closed(_))) => break,
            Ok(Some(_)) => {}
        }
    }
    tokio::time::sleep_until(paused_at + PAUSE).await;
    node.signal("CONT");
    let resumed_at = Instant::now();

    // Ingest resumes by itself.
    loop {
        assert!(
            resumed_at.elapsed() < Duration::from_secs(60),
            "ingest did not resume"
        );
        match ingest_one(&api, &token).await {
            (200, id, _) => {
                acked.push(id);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let healthy = api.health().await;
    assert_eq!(healthy["status"], "ok", "{healthy}");
    // The device sends its unacknowledged message again, as MQTT devices do.
    let mut again = Device::connect(mqtt_addr, &device, &token);
    again.connected().await;
    again
        .publish(topic(&device), QoS::AtLeastOnce, event(&during, 2.0))
        .await;
    again.pubacks(1).await;
    acked.push(during);

    // Everything acknowledged is stored, once.
    let (s, v) = api
        .get(&format!("/v1/devices/{device}/events?limit=10000"), &key)
        .await;
    assert_eq!(s, 200, "{v}");
    let mut stored: HashMap<String, usize> = HashMap::new();
    for e in v["events"].as_array().unwrap() {
        *stored
            .entry(e["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for id in &acked {
        assert_eq!(
            stored.get(&id.to_string()),
            Some(&1),
            "acknowledged event {id} stored {:?} times",
            stored.get(&id.to_string())
        );
    }
    assert!(stored.values().all(|n| *n == 1), "{stored:?}");
    server.stop().await;
}

/// What Cassandra would refuse never reaches it: out-of-range instants and oversized
/// texts are refused whole at ingest with the field named, and the largest event the
/// contract allows is stored whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_the_node_would_refuse_get_a_clear_400_and_the_largest_event_is_stored() {
    let store = support::cassandra_store("limits");
    let keyspace = store.keyspace.clone();
    ScyllaStore::migrate(&ScyllaSettings::from_config(&store, 3_600_000).unwrap())
        .await
        .expect("the node of scripts/cassandra answers");
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.store = store;
    let server = support::start(config).await;
    let api = support::Api::new(&server);
    let key = api.user_key().await;
    let (device, token) = api.device(&key, "d").await;

    let good = json!({"type": "t", "metrics": {"v": 1}});
    let cases = [
        (json!({"type": "t", "ts": "1969-12-31T23:59:59Z"}), "ts"),
        (json!({"type": "t", "ts": "9999-12-31T23:59:59Z"}), "ts"),
        (json!({"type": "t", "ts": i64::MAX}), "ts"),
        (
            json!({"type": "t", "attrs": {"note": "x".repeat(1025)}}),
            "attrs.note",
        ),
        (json!({"type": "x".repeat(65)}), "type"),
    ];
    for (bad, field) in cases {
        let (s, v) = api.post("/v1/ingest", &token, json!([good, bad])).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["index"], 1, "{v}");
        assert_eq!(v["field"], field, "{v}");
    }
    let (s, v) = api.get(&format!("/v1/devices/{device}/events"), &key).await;
    assert_eq!(s, 200);
    assert_eq!(
        v["events"],
        json!([]),
        "nothing of a refused request is stored"
    );

    // The largest event: 64 metrics and 64 attrs of 1 KiB each, with multi-byte text.
    let metrics: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("m{i}"), json!(i as f64 / 3.0)))
        .collect();
    let attrs: serde_json::Map<String, serde_json::Value> = (0..64)
        .map(|i| (format!("a{i}"), json!("é".repeat(512))))
        .collect();
    let big = json!({"type": "t", "metrics": metrics, "attrs": attrs});
    let (s, v) = api.post("/v1/ingest", &token, big.clone()).await;
    assert_eq!(s, 200, "{v}");
    let (_, v) = api.get(&format!("/v1/devices/{device}/events"), &key).await;
    assert_eq!(v["events"][0]["attrs"], big["attrs"]);
    assert_eq!(v["events"][0]["metrics"], big["metrics"]);
    server.stop().await;
    support::drop_keyspace(&keyspace).await;
}
