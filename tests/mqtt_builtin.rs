//! The built-in MQTT endpoint, through real rumqttc devices and raw sockets.

mod support;

use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use uuid::Uuid;

/// MQTT refusals for `reason` in a `/metrics` page.
fn mqtt_rejected(page: &str, reason: &str) -> f64 {
    metric(
        page,
        &format!(r#"iotpipe_events_rejected_total{{source="mqtt",reason="{reason}"}}"#),
    )
}

/// The device's live figures count `n` refusals, the last naming `fragment`.
async fn assert_refused(inst: &TestServer, o: &Owner, n: u64, fragment: &str) {
    let live = inst.api.live(o).await;
    assert_eq!(live["rejected_total"], n, "{live}");
    let last = live["last_error"].as_str().unwrap_or_default();
    assert!(last.contains(fragment), "{live}");
}

async fn connected(inst: &TestServer, o: &Owner) -> Device {
    let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
    d.connected().await;
    d
}

#[tokio::test]
async fn qos1_and_qos0_events_are_stored_and_aggregated() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    let topic = topic(&o.device);

    // QoS 1: one event, then an array of three. Once PUBACKed they are queryable at
    // once: the ack came after durable.
    let single = Uuid::new_v4();
    d.publish(&topic, QoS::AtLeastOnce, event(&single, 20.0))
        .await;
    d.pubacks(1).await;
    let stored = inst.api.events(&o).await;
    assert_eq!(stored.len(), 1, "queryable right after the PUBACK");
    assert_eq!(stored[0]["id"], single.to_string());

    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let array: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| json!({"id": id.to_string(), "type": "telemetry", "metrics": {"temperature": 21.0 + i as f64}}))
        .collect();
    d.publish(
        &topic,
        QoS::AtLeastOnce,
        serde_json::to_vec(&array).unwrap(),
    )
    .await;
    d.pubacks(1).await;
    assert_eq!(inst.api.events(&o).await.len(), 4);

    // QoS 0: best effort, but stored all the same.
    let q0 = Uuid::new_v4();
    d.publish(&topic, QoS::AtMostOnce, event(&q0, 30.0)).await;
    let stored = inst.api.wait_events(&o, 5).await;
    assert_eq!(stored.len(), 5);
    let counts = id_counts(&stored);
    for id in ids.iter().chain([&single, &q0]) {
        assert_eq!(counts.get(&id.to_string()), Some(&1), "{id}");
    }

    // The aggregates see the same five events.
    let now = iotpipe::model::now_ms();
    let agg = inst
        .api
        .ok(
            &format!(
                "/v1/devices/{}/aggregates?from={}&to={}&window=1d&metric=temperature",
                o.device,
                now - 3_600_000,
                now + 60_000
            ),
            &o.key,
        )
        .await;
    let buckets = agg["buckets"].as_array().unwrap();
    let count: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    let sum: f64 = buckets.iter().map(|b| b["sum"].as_f64().unwrap()).sum();
    assert_eq!(count, 5);
    assert!(
        (sum - (20.0 + 21.0 + 22.0 + 23.0 + 30.0)).abs() < 1e-9,
        "{sum}"
    );

    let live = inst.api.live(&o).await;
    assert_eq!(live["events_total"], 5);
    let page = inst.api.metrics().await;
    assert_eq!(
        metric(&page, r#"iotpipe_events_ingested_total{source="mqtt"}"#),
        5.0
    );
    assert_eq!(metric(&page, "iotpipe_mqtt_messages_received_total"), 3.0);
    assert_eq!(metric(&page, "iotpipe_mqtt_acks_sent_total"), 2.0);
    assert_eq!(metric(&page, "iotpipe_mqtt_connections"), 1.0);
    assert_eq!(metric(&page, "iotpipe_mqtt_ack_latency_seconds_count"), 2.0);
    inst.stop().await;
}

#[tokio::test]
async fn a_resent_event_with_an_id_is_stored_once() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    let id = Uuid::new_v4();
    for _ in 0..3 {
        d.publish(topic(&o.device), QoS::AtLeastOnce, event(&id, 1.0))
            .await;
    }
    d.pubacks(3).await;
    assert_eq!(inst.api.events(&o).await.len(), 1);
    assert_eq!(inst.api.live(&o).await["events_total"], 1);
    inst.stop().await;
}

#[tokio::test]
async fn a_reconnect_under_the_same_client_id_takes_over_the_old_connection() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let same = options(inst.mqtt(), &o.device, &o.token);
    let mut old = Device::with_options(same.clone());
    old.connected().await;
    // Another client id of the same device is a separate session and stays.
    let mut beside = connected(&inst, &o).await;

    let mut new = Device::with_options(same);
    new.connected().await;
    let why = old.closed().await;
    assert!(!why.is_empty());

    // The new connection and the other one both carry on.
    for (d, value) in [(&mut new, 1.0), (&mut beside, 2.0)] {
        d.publish(
            topic(&o.device),
            QoS::AtLeastOnce,
            event(&Uuid::new_v4(), value),
        )
        .await;
        d.pubacks(1).await;
    }
    assert_eq!(inst.api.events(&o).await.len(), 2);
    inst.stop().await;
}

#[tokio::test]
async fn bad_credentials_are_refused_at_connect() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let other = inst.api.owner().await;
    let cases = [
        (o.device.clone(), "wrong-token".to_owned()),
        (o.device.clone(), other.token.clone()),
        (Uuid::new_v4().to_string(), o.token.clone()),
        ("not-a-uuid".to_owned(), o.token.clone()),
    ];
    for (user, pass) in cases {
        let mut d = Device::connect(inst.mqtt(), &user, &pass);
        match d.next().await {
            Seen::Refused(
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized,
            ) => {}
            other => panic!("{user}: expected CONNACK 4 or 5, got {other:?}"),
        }
    }
    // Good credentials with an oversized client id: refused as a bad client id.
    let mut long = options(inst.mqtt(), &o.device, &o.token);
    long.set_client_id("c".repeat(300));
    let mut d = Device::with_options(long);
    match d.next().await {
        Seen::Refused(ConnectReturnCode::BadClientId) => {}
        other => panic!("expected CONNACK 2, got {other:?}"),
    }
    let page = inst.api.metrics().await;
    assert_eq!(mqtt_rejected(&page, "unauthorized"), 4.0);
    assert_eq!(metric(&page, "iotpipe_mqtt_connections"), 0.0);
    inst.stop().await;
}

#[tokio::test]
async fn publishing_to_another_devices_topic_closes_the_connection_and_stores_nothing() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let victim = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    d.publish(
        topic(&victim.device),
        QoS::AtLeastOnce,
        event(&Uuid::new_v4(), 1.0),
    )
    .await;
    d.closed().await;

    assert!(inst.api.events(&victim).await.is_empty());
    assert!(inst.api.events(&o).await.is_empty());
    assert_refused(&inst, &o, 1, "unauthorized").await;
    let page = inst.api.metrics().await;
    assert_eq!(mqtt_rejected(&page, "unauthorized"), 1.0);
    inst.stop().await;
}

#[tokio::test]
async fn subscribe_is_refused_and_the_connection_stays_usable() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    d.client
        .subscribe(topic(&o.device), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match d.next().await {
            Seen::SubAck(codes) => {
                assert_eq!(codes, vec![SubscribeReasonCode::Failure]);
                break;
            }
            Seen::Closed(why) => panic!("closed: {why}"),
            _ => {}
        }
    }
    d.publish(
        topic(&o.device),
        QoS::AtLeastOnce,
        event(&Uuid::new_v4(), 1.0),
    )
    .await;
    d.pubacks(1).await;
    inst.stop().await;
}

#[tokio::test]
async fn an_invalid_payload_at_qos1_is_acked_counted_and_the_connection_stays_open() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    let t = topic(&o.device);
    let bad = [
        r#"{"type": "t", "metrics": {"x": "not a number"}}"#.to_owned(),
        "not json".to_owned(),
        format!(r#"{{"type": "t", "device_id": "{}"}}"#, o.device),
        r#"[{"type": "ok"}, {"type": "bad type!"}]"#.to_owned(),
    ];
    for payload in &bad {
        d.publish(&t, QoS::AtLeastOnce, payload.clone()).await;
    }
    d.pubacks(bad.len()).await;
    // Still open: a good message goes through.
    let good = Uuid::new_v4();
    d.publish(&t, QoS::AtLeastOnce, event(&good, 1.0)).await;
    d.pubacks(1).await;

    let stored = inst.api.events(&o).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["id"], good.to_string());
    // One event each, and two for the array: all or nothing.
    assert_refused(&inst, &o, 5, "event 1: type").await;
    let page = inst.api.metrics().await;
    assert_eq!(mqtt_rejected(&page, "invalid"), 5.0);
    inst.stop().await;
}

/// `rejected_total` counts a device's refusals from every source, and `/metrics`
/// splits the same refusals by source: the two add up.
#[tokio::test]
async fn rejected_total_adds_up_http_and_mqtt_refusals() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    for _ in 0..3 {
        d.publish(topic(&o.device), QoS::AtLeastOnce, "not json")
            .await;
    }
    d.pubacks(3).await;
    for _ in 0..2 {
        let (s, v) = inst
            .api
            .ingest(&o.token, json!({"type": "bad type!"}))
            .await;
        assert_eq!(s, 400, "{v}");
    }
    assert_refused(&inst, &o, 5, "type").await;
    let page = inst.api.metrics().await;
    let http = metric(
        &page,
        r#"iotpipe_events_rejected_total{source="http",reason="invalid"}"#,
    );
    assert_eq!((http, mqtt_rejected(&page, "invalid")), (2.0, 3.0));
    let all: f64 = page
        .lines()
        .filter(|l| l.starts_with("iotpipe_events_rejected_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum();
    assert_eq!(all, 5.0, "{page}");
    inst.stop().await;
}

#[tokio::test]
async fn qos2_closes_the_connection() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    d.publish(
        topic(&o.device),
        QoS::ExactlyOnce,
        event(&Uuid::new_v4(), 1.0),
    )
    .await;
    d.closed().await;
    assert!(inst.api.events(&o).await.is_empty());
    inst.stop().await;
}

async fn publish_ok(good: &mut Device, t: &str) {
    good.publish(t, QoS::AtLeastOnce, event(&Uuid::new_v4(), 1.0))
        .await;
    good.pubacks(1).await;
}

#[tokio::test]
async fn malformed_packets_close_only_their_own_connection() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut good = connected(&inst, &o).await;
    let t = topic(&o.device);
    let mut sent = 0;

    // PUBLISH before CONNECT.
    let mut s = TcpStream::connect(inst.mqtt()).await.unwrap();
    s.write_all(&publish_bytes(&t, br#"{"type":"t"}"#))
        .await
        .unwrap();
    assert!(
        expect_closed(&mut s).await.is_empty(),
        "no answer, just closed"
    );
    publish_ok(&mut good, &t).await;
    sent += 1;

    // A truncated frame: the header promises more than ever comes.
    let mut s = raw_login(inst.mqtt(), &o, 60).await;
    let full = publish_bytes(&t, br#"{"type":"t"}"#);
    s.write_all(&full[..full.len() - 5]).await.unwrap();
    s.shutdown().await.unwrap();
    expect_closed(&mut s).await;
    publish_ok(&mut good, &t).await;
    sent += 1;

    // A frame whose topic length crosses the frame's end.
    let mut s = raw_login(inst.mqtt(), &o, 60).await;
    s.write_all(&[0x32, 6, 0x00, 0x40, b'a', b'b', 0, 1])
        .await
        .unwrap();
    expect_closed(&mut s).await;
    publish_ok(&mut good, &t).await;
    sent += 1;

    // An oversized packet: refused from its header, before its body is read.
    let mut s = raw_login(inst.mqtt(), &o, 60).await;
    // Remaining length 4 MiB, as a variable byte integer.
    s.write_all(&[0x32, 0x80, 0x80, 0x80, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    expect_closed(&mut s).await;
    publish_ok(&mut good, &t).await;
    sent += 1;

    // An invalid packet type.
    let mut s = raw_login(inst.mqtt(), &o, 60).await;
    s.write_all(&[0xF0, 0x00]).await.unwrap();
    expect_closed(&mut s).await;
    publish_ok(&mut good, &t).await;
    sent += 1;

    assert_eq!(inst.api.events(&o).await.len(), sent);
    let page = inst.api.metrics().await;
    assert_eq!(mqtt_rejected(&page, "too_large"), 1.0);
    assert_eq!(mqtt_rejected(&page, "unauthorized"), 1.0);
    // Exactly the three malformed frames of a logged-in device: truncated, topic past
    // the frame's end, unknown packet type.
    assert_eq!(mqtt_rejected(&page, "invalid"), 3.0);
    inst.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_its_keepalive_and_pings_keep_it_open() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;

    // Keepalive 1 s: pinging every 500 ms keeps it open past 1.5 s...
    let mut s = raw_login(inst.mqtt(), &o, 1).await;
    let mut last_ping = Instant::now();
    for _ in 0..6 {
        last_ping = Instant::now();
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        let mut pingresp = [0u8; 2];
        timeout(PATIENCE, s.read_exact(&mut pingresp))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(pingresp, [0xD0, 0x00]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // ...and silence closes it, 1.5 keepalives after the server last heard from it
    // (which is after the last ping was written).
    expect_closed(&mut s).await;
    let silent = last_ping.elapsed();
    assert!(
        silent >= Duration::from_millis(1400) && silent < Duration::from_secs(3),
        "closed {silent:?} after the last ping, not 1.5 keepalives"
    );

    // No CONNECT at all is closed too, at the connect timeout (shortened here): a
    // setting that were ignored would keep it open for the default 10 s.
    let mut inst2 = TestServer::with_mqtt(|c| c.mqtt.connect_timeout_secs = 1).await;
    let opened = Instant::now();
    let mut s = TcpStream::connect(inst2.mqtt()).await.unwrap();
    expect_closed(&mut s).await;
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "a silent connection closed after {waited:?}, not at the 1 s connect timeout"
    );
    inst.stop().await;
    inst2.stop().await;
}

#[tokio::test]
async fn qos1_over_the_rate_limit_is_held_back_not_dropped_and_qos0_is_dropped() {
    let mut inst = TestServer::with_mqtt(|c| c.limits.device_per_sec = 5).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    let t = topic(&o.device);
    let started = Instant::now();
    for i in 0..15 {
        d.publish(&t, QoS::AtLeastOnce, event(&Uuid::new_v4(), f64::from(i)))
            .await;
    }
    d.pubacks(15).await;
    // A burst of 5, then 10 more at 5/s (2 s): the device was slowed down to the
    // limit, not refused, nor stalled beyond it.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert_eq!(inst.api.events(&o).await.len(), 15);
    assert_eq!(inst.api.live(&o).await["rejected_total"], 0);

    // The budget is in debt now: QoS 0 messages are dropped and counted.
    for i in 0..3 {
        d.publish(&t, QoS::AtMostOnce, event(&Uuid::new_v4(), f64::from(i)))
            .await;
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let page = inst.api.metrics().await;
        let limited = mqtt_rejected(&page, "rate_limited");
        if limited >= 1.0 || Instant::now() > deadline {
            assert!(
                limited >= 1.0,
                "QoS 0 over the limit is counted as rate_limited"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let live = inst.api.live(&o).await;
    assert!(
        live["last_error"]
            .as_str()
            .unwrap()
            .contains("rate_limited"),
        "{live}"
    );
    inst.stop().await;
}

#[tokio::test]
async fn health_reports_the_endpoint_and_a_taken_port_names_the_setting() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let h = inst.api.health().await;
    assert_eq!(h["components"]["mqtt"]["backend"], "builtin");
    assert_eq!(h["components"]["mqtt"]["ok"], true);

    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.mqtt.addr = inst.mqtt().to_string();
    let err = iotpipe::topology::start(c)
        .await
        .err()
        .expect("the port is taken");
    let msg = err.to_string();
    assert!(
        msg.contains("IOTPIPE_MQTT_ADDR") && msg.contains(&inst.mqtt().to_string()),
        "{msg}"
    );

    let mut off = TestServer::with_mqtt(|c| c.mqtt.addr = "off".into()).await;
    assert!(off.server.as_ref().unwrap().mqtt_addr.is_none());
    let h = off.api.health().await;
    assert_eq!(h["components"]["mqtt"]["backend"], "off");
    assert_eq!(h["components"]["mqtt"]["ok"], true);
    inst.stop().await;
    off.stop().await;
}

#[tokio::test]
async fn shutdown_acknowledges_what_is_durable_and_waits_for_connections() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    for i in 0..50 {
        d.publish(
            topic(&o.device),
            QoS::AtLeastOnce,
            event(&Uuid::new_v4(), f64::from(i)),
        )
        .await;
    }
    // Wait until the first messages are in, then stop while the rest are in flight.
    d.pubacks(1).await;
    let mut acked = 1;
    let api = inst.api.clone();
    inst.stop().await;
    let dir = inst.dir;
    loop {
        match d.next().await {
            Seen::PubAck(_) => acked += 1,
            Seen::Closed(_) => break,
            _ => {}
        }
    }
    drop(api);
    // Every acknowledged event is on disk: reopen the data dir and count.
    let mut c = config(dir.path());
    c.mqtt.addr = "off".into();
    let server = iotpipe::topology::start(c).await.unwrap();
    let stored = Api::new(&server).events(&o).await;
    assert!(
        stored.len() >= acked,
        "{} stored, {acked} acknowledged",
        stored.len()
    );
    server.stop().await;
}

#[tokio::test]
async fn every_acknowledged_event_survives_kill_9_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let mqtt_on = [("IOTPIPE_MQTT_ADDR", "127.0.0.1:0".to_owned())];
    let first = Process::spawn(dir.path(), &mqtt_on).await;
    let api = first.api();
    let o = api.owner().await;
    let t = topic(&o.device);
    let ts = iotpipe::model::now_ms();
    let ids: Vec<Uuid> = (0..3000).map(|_| Uuid::new_v4()).collect();

    let mut d = Device::connect(first.mqtt.unwrap(), &o.device, &o.token);
    d.connected().await;
    // Kill -9 once 500 PUBACKs have arrived, in the middle of the stream.
    let (kill_tx, kill_rx) = tokio::sync::oneshot::channel();
    let mut kill_tx = Some(kill_tx);
    let killer = tokio::spawn(async move {
        if kill_rx.await.is_ok() {
            first.kill9();
        }
    });
    let acked = stream_ids(&mut d, &t, &ids, ts, |n| {
        if n == 500 {
            if let Some(tx) = kill_tx.take() {
                let _ = tx.send(());
            }
        }
    })
    .await;
    killer.await.unwrap();
    assert!(
        acked.len() >= 500 && acked.len() < ids.len(),
        "{} acked",
        acked.len()
    );

    // Restart on the same data dir; the device resends everything not acknowledged.
    let second = Process::spawn(dir.path(), &mqtt_on).await;
    let api = second.api();
    let acked_set: std::collections::HashSet<Uuid> = acked.iter().copied().collect();
    let stored = api.events(&o).await;
    let counts = id_counts(&stored);
    for id in &acked {
        assert_eq!(
            counts.get(&id.to_string()),
            Some(&1),
            "acked {id} is stored once"
        );
    }
    let resend: Vec<Uuid> = ids
        .iter()
        .filter(|id| !acked_set.contains(id))
        .copied()
        .collect();
    let mut d = Device::connect(second.mqtt.unwrap(), &o.device, &o.token);
    d.connected().await;
    let acked_again = stream_ids(&mut d, &t, &resend, ts, |_| {}).await;
    assert_eq!(acked_again.len(), resend.len());

    let stored = api.events(&o).await;
    let counts = id_counts(&stored);
    assert_eq!(stored.len(), ids.len(), "every event once, no duplicate");
    assert!(ids.iter().all(|id| counts.get(&id.to_string()) == Some(&1)));
    let live = api.live(&o).await;
    assert!(live["events_total"].as_u64().unwrap() <= ids.len() as u64);
    second.kill9();
}

#[tokio::test]
async fn a_slow_flush_fills_the_window_and_reading_stops_until_acks_go_out() {
    // Flushes wait 1.5 s: a slow store, as seen from the connection.
    let mut inst = TestServer::with_mqtt(|c| {
        c.mqtt.max_inflight = 10;
        c.pipeline.batch_max_age_ms = 1500;
    })
    .await;
    let o = inst.api.owner().await;
    let mut d = connected(&inst, &o).await;
    for i in 0..40 {
        d.publish(
            topic(&o.device),
            QoS::AtLeastOnce,
            event(&Uuid::new_v4(), f64::from(i)),
        )
        .await;
    }
    let api = inst.api.clone();
    let done = tokio_util::sync::CancellationToken::new();
    let stop = done.clone();
    let sampler = tokio::spawn(async move {
        let mut most = 0.0f64;
        while !stop.is_cancelled() {
            let page = api.metrics().await;
            let outstanding = metric(&page, "iotpipe_mqtt_messages_received_total")
                - metric(&page, "iotpipe_mqtt_acks_sent_total");
            assert!(
                outstanding <= 10.0,
                "{outstanding} messages read and not acknowledged"
            );
            most = most.max(outstanding);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        most
    });
    d.pubacks(40).await;
    done.cancel();
    let most = sampler.await.unwrap();
    assert_eq!(most, 10.0, "the window filled while the flush was slow");
    assert_eq!(inst.api.events(&o).await.len(), 40, "nothing lost");
    inst.stop().await;
}

#[tokio::test]
async fn mosquitto_pub_can_publish_to_the_builtin_endpoint() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut sent = Vec::new();
    for version in ["mqttv311", "mqttv5"] {
        let id = Uuid::new_v4();
        let status = tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &inst.mqtt().port().to_string()])
            .args(["-V", version, "-q", "1", "-u", &o.device, "-P", &o.token])
            .args(["-t", &topic(&o.device), "-m", &event(&id, 21.5)])
            .status()
            .await
            .expect("mosquitto_pub is installed");
        assert!(status.success(), "{version}");
        sent.push(id.to_string());
        // mosquitto_pub exits after its PUBACK: the event is already stored.
        let stored = inst.api.events(&o).await;
        assert_eq!(stored.len(), sent.len(), "{version}");
        assert_eq!(stored[0]["id"], id.to_string(), "{version}");
    }
    inst.stop().await;
}

/// An MQTT 5 device: connects, hears the server's limits in CONNACK, publishes at QoS 1.
#[tokio::test]
async fn an_mqtt5_device_logs_in_hears_the_window_and_its_events_are_stored() {
    use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as Code, Packet, PubAckReason};
    use rumqttc::v5::mqttbytes::QoS as QoS5;
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};

    let mut inst = TestServer::with_mqtt(|c| {
        c.mqtt.max_inflight = 7;
        c.http.max_body_bytes = 50_000;
    })
    .await;
    let o = inst.api.owner().await;
    let addr = inst.mqtt();
    let options = |pass: &str| {
        let id = format!("v5-{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        opts.set_credentials(o.device.clone(), pass.to_owned());
        opts
    };

    // A wrong token is refused with MQTT 5's own code.
    let (_client, mut refused) = AsyncClient::new(options("wrong"), 10);
    match timeout(Duration::from_secs(10), refused.poll())
        .await
        .unwrap()
    {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, Code::BadUserNamePassword)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    let (client, mut eventloop) = AsyncClient::new(options(&o.token), 10);
    let connack = loop {
        match timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::ConnAck(c)) => break c,
            _ => continue,
        }
    };
    assert_eq!(connack.code, Code::Success);
    let props = connack.properties.expect("CONNACK properties");
    assert_eq!(props.receive_max, Some(7), "the window, as Receive Maximum");
    assert_eq!(
        props.max_packet_size,
        Some(50_000 + 1024),
        "the largest payload plus 1 KiB of packet, as Maximum Packet Size"
    );
    assert_eq!(props.max_qos, Some(1));

    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        client
            .publish(
                topic(&o.device),
                QoS5::AtLeastOnce,
                false,
                event(id, i as f64),
            )
            .await
            .unwrap();
    }
    // A bad payload is acknowledged too, so that it is not resent, but MQTT 5 says
    // why: reason 0x99, payload format invalid.
    client
        .publish(topic(&o.device), QoS5::AtLeastOnce, false, "not json")
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while reasons.len() < ids.len() + 1 {
        match timeout(Duration::from_secs(10), eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::PubAck(ack)) => reasons.push(ack.reason),
            Event::Incoming(Packet::Disconnect(d)) => panic!("disconnected: {d:?}"),
            _ => {}
        }
    }
    let mut expected = vec![PubAckReason::Success; ids.len()];
    expected.push(PubAckReason::PayloadFormatInvalid);
    assert_eq!(reasons, expected);
    // PUBACK means durable: the events are there at once.
    let stored = inst.api.events(&o).await;
    let counts = id_counts(&stored);
    assert_eq!(counts.len(), 3);
    assert!(ids.iter().all(|id| counts.get(&id.to_string()) == Some(&1)));
    inst.stop().await;
}

/// A raw MQTT 5 connection: logs in with `client_id` and returns the socket and the
/// CONNACK.
async fn v5_login(
    inst: &TestServer,
    o: &Owner,
    client_id: &str,
) -> (TcpStream, rumqttc::v5::mqttbytes::v5::ConnAck) {
    use rumqttc::v5::mqttbytes::v5::{Connect, Login, Packet};
    let connect = Packet::Connect(
        Connect {
            keep_alive: 30,
            client_id: client_id.to_owned(),
            clean_start: true,
            properties: None,
        },
        None,
        Some(Login::new(o.device.clone(), o.token.clone())),
    );
    let mut s = TcpStream::connect(inst.mqtt()).await.unwrap();
    write_v5(&mut s, connect).await;
    match read_v5(&mut s).await {
        Some(Packet::ConnAck(connack)) => (s, connack),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn write_v5(s: &mut TcpStream, packet: rumqttc::v5::mqttbytes::v5::Packet) {
    let mut bytes = BytesMut::new();
    packet.write(&mut bytes, None).unwrap();
    s.write_all(&bytes).await.unwrap();
}

/// The next MQTT 5 packet from the server, or `None` once it closed the connection.
/// Reads one packet at most: the tests here expect one answer at a time.
async fn read_v5(s: &mut TcpStream) -> Option<rumqttc::v5::mqttbytes::v5::Packet> {
    let mut answer = BytesMut::new();
    loop {
        let n = timeout(Duration::from_secs(10), s.read_buf(&mut answer))
            .await
            .expect("the server answers in time")
            .unwrap_or(0);
        if let Ok(packet) = rumqttc::v5::mqttbytes::v5::Packet::read(&mut answer, None) {
            return Some(packet);
        }
        if n == 0 {
            return None;
        }
    }
}

/// MQTT 5 lets a device leave its client id empty; the server then names it in
/// CONNACK.
#[tokio::test]
async fn an_mqtt5_device_without_a_client_id_is_given_one() {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode;

    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let (_s, connack) = v5_login(&inst, &o, "").await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    let assigned = connack.properties.unwrap().assigned_client_identifier;
    assert!(assigned.is_some_and(|id| !id.is_empty()));
    inst.stop().await;
}

/// MQTT 5's bad input: SUBSCRIBE gets MQTT 5's refusal code and the connection stays;
/// an oversized PUBLISH closes the connection, is counted, and stores nothing.
#[tokio::test]
async fn mqtt5_subscribe_is_refused_and_an_oversized_publish_closes_the_connection() {
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, Subscribe, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS as QoS5;

    let mut inst = TestServer::with_mqtt(|c| c.http.max_body_bytes = 4096).await;
    let o = inst.api.owner().await;
    let (mut s, _) = v5_login(&inst, &o, "v5-bad-input").await;

    let mut subscribe = Subscribe::new(Filter::new(topic(&o.device), QoS5::AtLeastOnce), None);
    subscribe.pkid = 1;
    write_v5(&mut s, Packet::Subscribe(subscribe)).await;
    match read_v5(&mut s).await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let mut big = Publish::new(topic(&o.device), QoS5::AtLeastOnce, vec![b' '; 8192], None);
    big.pkid = 2;
    write_v5(&mut s, Packet::Publish(big)).await;
    assert!(read_v5(&mut s).await.is_none(), "closed without a PUBACK");

    assert!(inst.api.events(&o).await.is_empty());
    assert_refused(&inst, &o, 1, "malformed MQTT packet").await;
    let page = inst.api.metrics().await;
    assert_eq!(mqtt_rejected(&page, "too_large"), 1.0);
    inst.stop().await;
}

/// A CONNECT that arrives a few bytes at a time is still read and answered.
#[tokio::test]
async fn a_connect_split_across_many_writes_is_answered() {
    let mut inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    let mut s = TcpStream::connect(inst.mqtt()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for piece in connect_bytes(&o.device, &o.token, 30).chunks(3) {
        s.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let mut connack = [0u8; 4];
    timeout(Duration::from_secs(10), s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    inst.stop().await;
}

#[tokio::test]
async fn a_deleted_device_is_disconnected_at_once_and_cannot_log_in_again() {
    let inst = TestServer::with_mqtt(|_| {}).await;
    let o = inst.api.owner().await;
    // A long keep-alive: only the deletion can close this connection in time.
    let mut d = Device::connect(inst.mqtt(), &o.device, &o.token);
    d.connected().await;
    d.publish(
        topic(&o.device),
        QoS::AtLeastOnce,
        event(&Uuid::new_v4(), 1.0),
    )
    .await;
    d.pubacks(1).await;
    let deleted = reqwest::Client::new()
        .delete(format!("{}/v1/devices/{}", inst.api.base, o.device))
        .bearer_auth(&o.key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let started = Instant::now();
    d.closed().await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        started.elapsed()
    );
    let mut again = Device::connect(inst.mqtt(), &o.device, &o.token);
    match again.next().await {
        Seen::Refused(code) => assert_ne!(code, ConnectReturnCode::Success),
        other => panic!("a deleted device logged in again: {other:?}"),
    }
}
