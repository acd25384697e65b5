//! External broker mode, against the machine's Mosquitto on 127.0.0.1:1883 and
//! against private Mosquitto instances for the tests that kill or share.

mod support;

use std::collections::HashSet;

use rumqttc::QoS;
use serde_json::json;
use support::*;
use uuid::Uuid;

/// Drops a persistent session from the shared broker, so that a finished test leaves
/// no subscriber behind in the `iotpipe` share group: connecting with the same
/// client id and a clean session discards it.
struct SessionCleanup {
    client_id: String,
}

impl Drop for SessionCleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", "1883", "-i", &self.client_id])
            .args(["-t", "iotpipe-test/cleanup", "-m", "x"])
            .status();
    }
}

#[tokio::test]
async fn messages_through_the_shared_broker_are_stored_and_bad_ones_counted() {
    let client_id = format!("itest{}", &Uuid::new_v4().simple().to_string()[..16]);
    let _cleanup = SessionCleanup {
        client_id: client_id.clone(),
    };
    // A group of its own: a subscriber left in the `iotpipe` group on the shared
    // broker (another test run, another engineer) cannot take this test's messages.
    let group = format!("g{}", &Uuid::new_v4().simple().to_string()[..12]);
    let mut inst = TestServer::with_mqtt(|c| {
        c.mqtt.addr = "off".into();
        c.mqtt.url = Some("mqtt://127.0.0.1:1883".into());
        c.mqtt.client_id = Some(client_id.clone());
        c.mqtt.share_group = group.clone();
    })
    .await;
    wait_mqtt_ok(&inst.api).await;
    assert_eq!(
        inst.api.health().await["components"]["mqtt"]["backend"],
        "external"
    );
    let o = inst.api.owner().await;
    let mut d = broker_device(1883);
    d.connected().await;
    let t = topic(&o.device);

    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    d.publish(&t, QoS::AtLeastOnce, event(&ids[0], 1.0)).await;
    let array: Vec<_> = ids[1..3]
        .iter()
        .map(|id| json!({"id": id.to_string(), "type": "telemetry", "metrics": {"temperature": 2.0}}))
        .collect();
    d.publish(&t, QoS::AtLeastOnce, serde_json::to_vec(&array).unwrap())
        .await;
    d.publish(&t, QoS::AtMostOnce, event(&ids[3], 3.0)).await;
    d.publish(&t, QoS::AtLeastOnce, r#"{"type": "bad type"}"#)
        .await;
    d.publish(
        topic(&Uuid::new_v4().to_string()),
        QoS::AtLeastOnce,
        event(&Uuid::new_v4(), 1.0),
    )
    .await;

    let stored = inst.api.wait_events(&o, 4).await;
    let counts = id_counts(&stored);
    assert_eq!(stored.len(), 4, "{stored:?}");
    assert!(ids.iter().all(|id| counts.get(&id.to_string()) == Some(&1)));

    // The invalid message is counted on its device, the unknown device in /metrics.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let live = inst.api.live(&o).await;
        let page = inst.api.metrics().await;
        let unknown = metric(
            &page,
            r#"iotpipe_events_rejected_total{source="mqtt",reason="unknown_device"}"#,
        );
        // Rejections are counted before their acknowledgements go out: wait for both.
        let acks = metric(&page, "iotpipe_mqtt_acks_sent_total");
        if live["rejected_total"] == 1 && unknown >= 1.0 && acks >= 4.0 {
            assert!(
                live["last_error"].as_str().unwrap().contains("type"),
                "{live}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{live} unknown={unknown} acks={acks}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    inst.stop().await;
}

#[tokio::test]
async fn two_instances_split_a_shared_subscription_with_no_double_count() {
    let broker = Broker::start().await;
    let shared = tempfile::tempdir().unwrap();
    let registry = format!("sqlite://{}", shared.path().join("registry.db").display());
    let start = |id: &'static str| {
        let registry = registry.clone();
        let url = broker.url();
        TestServer::with_mqtt(move |c| {
            c.mqtt.addr = "off".into();
            c.mqtt.url = Some(url);
            c.mqtt.client_id = Some(id.into());
            c.registry.url = Some(registry);
        })
    };
    let mut a = start("iotpipe-a").await;
    let mut b = start("iotpipe-b").await;
    wait_mqtt_ok(&a.api).await;
    wait_mqtt_ok(&b.api).await;
    let o = a.api.owner().await;

    let mut d = broker_device(broker.port);
    d.connected().await;
    let ts = iotpipe::model::now_ms();
    let ids: Vec<Uuid> = (0..400).map(|_| Uuid::new_v4()).collect();
    let acked = stream_ids(&mut d, &topic(&o.device), &ids, ts, |_| {}).await;
    assert_eq!(acked.len(), ids.len(), "the broker took every message");

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let (in_a, in_b) = loop {
        let in_a = id_counts(&a.api.events(&o).await);
        let in_b = id_counts(&b.api.events(&o).await);
        if in_a.len() + in_b.len() >= ids.len() || tokio::time::Instant::now() > deadline {
            break (in_a, in_b);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        !in_a.is_empty() && !in_b.is_empty(),
        "{} / {}",
        in_a.len(),
        in_b.len()
    );
    let union: HashSet<&String> = in_a.keys().chain(in_b.keys()).collect();
    let sent: HashSet<String> = ids.iter().map(|id| id.to_string()).collect();
    assert_eq!(
        union.len(),
        in_a.len() + in_b.len(),
        "no message in both instances"
    );
    assert_eq!(union.into_iter().cloned().collect::<HashSet<_>>(), sent);
    let total = a.api.live(&o).await["events_total"].as_u64().unwrap()
        + b.api.live(&o).await["events_total"].as_u64().unwrap();
    assert_eq!(total, ids.len() as u64, "counted once");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn nothing_the_broker_acknowledged_is_lost_when_iotpipe_is_killed() {
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("IOTPIPE_MQTT_ADDR", "off".to_owned()),
        ("IOTPIPE_MQTT_URL", broker.url()),
    ];
    let first = Process::spawn(dir.path(), &env).await;
    let api = first.api();
    wait_mqtt_ok(&api).await;
    let o = api.owner().await;

    let mut d = broker_device(broker.port);
    d.connected().await;
    let ts = iotpipe::model::now_ms();
    let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::new_v4()).collect();
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let mut kill_tx = Some(kill_tx);
    let killer = tokio::spawn(async move {
        if kill_rx.await.is_ok() {
            first.kill9();
        }
    });
    // iotpipe dies a third of the way through; the device goes on publishing.
    let acked = stream_ids(&mut d, &topic(&o.device), &ids, ts, |n| {
        if n == 1000 {
            if let Some(tx) = kill_tx.take() {
                let _ = tx.send(());
            }
        }
    })
    .await;
    killer.await.unwrap();
    assert_eq!(
        acked.len(),
        ids.len(),
        "the broker acknowledged every message"
    );

    // Same data dir, so the same client id and persistent session.
    let second = Process::spawn(dir.path(), &env).await;
    let api = second.api();
    let stored = api.wait_events(&o, ids.len()).await;
    let counts = id_counts(&stored);
    assert_eq!(stored.len(), ids.len(), "every message stored, none twice");
    assert!(ids.iter().all(|id| counts.get(&id.to_string()) == Some(&1)));
    second.kill9();
}
