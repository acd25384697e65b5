//! `POST /v1/ingest` over a real socket: formats, gateway mode, every refusal, and
//! that a refused request stores nothing.

mod support;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{metric, now_ms, TestServer};

/// Asserts a 400 naming the index and the field.
fn assert_invalid(status: StatusCode, v: &Value, index: u64, field: &str) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["index"], index, "{v}");
    assert_eq!(v["field"], field, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
}

#[tokio::test]
async fn one_event_an_array_and_ndjson_are_accepted_and_stored() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let (status, v) = t
        .ingest(&token, json!({"type": "telemetry", "metrics": {"temperature": 21.5}, "attrs": {"fw": "1.4.2"}}))
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 1})));
    let (status, v) = t
        .ingest(
            &token,
            json!([{"type": "a"}, {"type": "b", "ts": now_ms() - 1000}]),
        )
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 2})));
    let nd = "{\"type\":\"n1\"}\n\n{\"type\":\"n2\"}\n";
    let (status, _, v) = t.ingest_raw(&token, Some("application/x-ndjson"), nd).await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 2})));
    // No Content-Type is read as JSON.
    let (status, _, v) = t.ingest_raw(&token, None, r#"{"type":"plain"}"#).await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 1})));

    let events = t.all_events(&key, &dev).await;
    assert_eq!(events.len(), 6);
    let first = events.iter().find(|e| e["type"] == "telemetry").unwrap();
    assert_eq!(first["metrics"], json!({"temperature": 21.5}));
    assert_eq!(first["attrs"], json!({"fw": "1.4.2"}));
}

#[tokio::test]
async fn an_empty_array_is_accepted_as_zero() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (_, token) = t.device(&key, "d").await;
    let (status, v) = t.ingest(&token, json!([])).await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 0})));
}

#[tokio::test]
async fn each_bad_event_gets_a_400_naming_index_and_field_and_nothing_is_stored() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let good = json!({"type": "ok", "metrics": {"v": 1}});
    let future = now_ms() + 6 * 60 * 1000;
    let cases: Vec<(String, u64, &str)> = vec![
        (
            json!([good, {"type": "t", "colour": "red"}]).to_string(),
            1,
            "colour",
        ),
        (json!([good, good, {"type": 5}]).to_string(), 2, "type"),
        (json!([{"type": "t", "ts": future}]).to_string(), 0, "ts"),
        (
            json!([{"type": "t", "ts": "1999-01-01T00:00:00Z"}]).to_string(),
            0,
            "ts",
        ),
        (
            r#"[{"type":"ok"},{"type":"t","ts":1795000000000.5}]"#.to_string(),
            1,
            "ts",
        ),
        (
            r#"[{"type":"t","metrics":{"x":1e400}}]"#.to_string(),
            0,
            "metrics.x",
        ),
        (
            r#"[{"type":"t","metrics":{"x":"NaN"}}]"#.to_string(),
            0,
            "metrics.x",
        ),
        (
            r#"[{"type":"t","metrics":{"bad name":1}}]"#.to_string(),
            0,
            "metrics.bad name",
        ),
        (
            json!([{"type": "t", "attrs": {"a": "x".repeat(1025)}}]).to_string(),
            0,
            "attrs.a",
        ),
        (
            json!([{"type": "t", "id": "not-a-uuid"}]).to_string(),
            0,
            "id",
        ),
        (json!([{"ts": 1}]).to_string(), 0, "type"),
        (r#"[{"type":"ok"},{"type":"t","#.to_string(), 1, "body"),
    ];
    for (body, index, field) in &cases {
        let (status, _, v) = t
            .ingest_raw(&token, Some("application/json"), body.clone())
            .await;
        assert_invalid(status, &v, *index, field);
    }
    // NDJSON counts the index among events, blank lines skipped.
    let nd = "{\"type\":\"a\"}\n\n{\"type\":\"b\",\"x\":1}\n";
    let (status, _, v) = t.ingest_raw(&token, Some("application/x-ndjson"), nd).await;
    assert_invalid(status, &v, 1, "x");

    assert!(
        t.all_events(&key, &dev).await.is_empty(),
        "nothing is half-stored"
    );
    let (_, live) = t.get(&format!("/v1/devices/{dev}/live"), &key).await;
    assert_eq!(live["events_total"], 0);
    // All or nothing: every event of a refused request counts, 19 over the 13.
    assert_eq!(live["rejected_total"], 19, "{live}");
    assert!(live["last_error"].as_str().unwrap().contains('x'), "{live}");
    let m = t.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"iotpipe_events_rejected_total{source="http",reason="invalid"}"#
        ),
        19.0
    );
}

#[tokio::test]
async fn an_event_carries_at_most_64_attrs() {
    let t = TestServer::start().await;
    let o = t.owner().await;
    let attrs = |n: usize| -> serde_json::Map<String, serde_json::Value> {
        (0..n).map(|i| (format!("a{i}"), json!("v"))).collect()
    };
    t.ingest_ok(&o.token, json!({"type": "t", "attrs": attrs(64)}))
        .await;
    let (status, v) = t
        .ingest(&o.token, json!({"type": "t", "attrs": attrs(65)}))
        .await;
    assert_invalid(status, &v, 0, "attrs");
    let stored = t.events(&o).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["attrs"].as_object().unwrap().len(), 64);
}

#[tokio::test]
async fn too_many_events_and_too_large_bodies_get_413() {
    let t = TestServer::start_with(|c| {
        c.http.max_events_per_request = 100;
        c.http.max_body_bytes = 64 * 1024;
    })
    .await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let many: Vec<Value> = (0..101).map(|_| json!({"type": "t"})).collect();
    let (status, v) = t.ingest(&token, Value::Array(many)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"].is_string());
    let one = json!({"type": "t", "attrs": {"a": "x".repeat(1000)}});
    let big = Value::Array(vec![one; 70]).to_string();
    assert!(big.len() > 64 * 1024);
    let (status, _, v) = t.ingest_raw(&token, None, big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert!(v["error"].is_string());
    assert!(t.all_events(&key, &dev).await.is_empty());
    let m = t.metrics().await;
    assert!(
        metric(
            &m,
            r#"iotpipe_events_rejected_total{source="http",reason="too_large"}"#
        ) >= 2.0
    );
}

#[tokio::test]
async fn duplicates_are_stored_once_but_accepted_counts_them() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let id = uuid::Uuid::new_v4();
    let upper = id.to_string().to_uppercase();
    let ts = now_ms() - 10_000;
    let body = json!([
        {"id": id, "type": "t", "ts": ts, "metrics": {"v": 1}},
        {"id": upper, "type": "t", "ts": ts, "metrics": {"v": 1}},
    ]);
    let (status, v) = t.ingest(&token, body.clone()).await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 2})));
    // Sent again, even with another ts: still the same event.
    let again =
        json!([{"id": id.simple().to_string(), "type": "t", "ts": ts + 5, "metrics": {"v": 1}}]);
    let (status, _) = t.ingest(&token, again).await;
    assert_eq!(status, StatusCode::OK);
    let events = t.all_events(&key, &dev).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], id.to_string());
    let (_, live) = t.get(&format!("/v1/devices/{dev}/live"), &key).await;
    assert_eq!(live["events_total"], 1, "{live}");
}

#[tokio::test]
async fn a_server_assigned_id_sent_back_is_a_duplicate_too() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let ts = now_ms() - 60_000;
    let (status, _) = t
        .ingest(&token, json!({"type": "t", "ts": ts, "metrics": {"v": 1}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let events = t.all_events(&key, &dev).await;
    let id = events[0]["id"].as_str().unwrap().to_owned();
    // The device learns the id from a listing and sends the event again, once as it
    // was and once with another ts: both are the stored event.
    for resend_ts in [ts, ts + 1234] {
        let body = json!({"id": id, "type": "t", "ts": resend_ts, "metrics": {"v": 1}});
        assert_eq!(t.ingest(&token, body).await.0, StatusCode::OK);
    }
    let events = t.all_events(&key, &dev).await;
    assert_eq!(events.len(), 1, "{events:?}");
    let (_, live) = t.get(&format!("/v1/devices/{dev}/live"), &key).await;
    assert_eq!(live["events_total"], 1);
    let (_, agg) = t
        .get(
            &format!(
                "/v1/devices/{dev}/aggregates?from={}&to={}&window=1h",
                ts - 3_600_000,
                ts + 3_600_000
            ),
            &key,
        )
        .await;
    let total: u64 = agg["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 1);
}

#[tokio::test]
async fn gateway_mode_writes_for_the_users_own_devices_only() {
    let t = TestServer::start().await;
    let (_, ann) = t.user("ann").await;
    let (_, bob) = t.user("bob").await;
    let (d1, token1) = t.device(&ann, "d1").await;
    let (d2, _) = t.device(&ann, "d2").await;
    let (bob_dev, _) = t.device(&bob, "b").await;

    let (status, v) = t
        .ingest(&ann, json!([{"type": "t", "device_id": d1}, {"type": "t", "device_id": d2}, {"type": "t", "device_id": d2}]))
        .await;
    assert_eq!((status, v), (StatusCode::OK, json!({"accepted": 3})));
    assert_eq!(t.all_events(&ann, &d1).await.len(), 1);
    assert_eq!(t.all_events(&ann, &d2).await.len(), 2);

    // A user key needs device_id on every event.
    let (status, v) = t
        .ingest(&ann, json!([{"type": "t", "device_id": d1}, {"type": "t"}]))
        .await;
    assert_invalid(status, &v, 1, "device_id");
    // A device token may not name a device.
    let (status, v) = t
        .ingest(&token1, json!([{"type": "t", "device_id": d1}]))
        .await;
    assert_invalid(status, &v, 0, "device_id");
    // Another user's device, or none at all: 404, and nothing of the request stored.
    for other in [bob_dev.clone(), uuid::Uuid::new_v4().to_string()] {
        let (status, v) = t
            .ingest(
                &ann,
                json!([{"type": "t", "device_id": d1}, {"type": "t", "device_id": other}]),
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    }
    assert_eq!(t.all_events(&ann, &d1).await.len(), 1);
    assert!(t.all_events(&bob, &bob_dev).await.is_empty());
}

#[tokio::test]
async fn a_bad_or_missing_token_is_a_401() {
    let t = TestServer::start().await;
    let (status, _, v) = t.ingest_raw("ipd_unknown", None, r#"{"type":"t"}"#).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(v["error"].is_string());
    let resp = t
        .http
        .post(format!("{}/v1/ingest", t.base))
        .body(r#"{"type":"t"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let m = t.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"iotpipe_events_rejected_total{source="http",reason="unauthorized"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn the_device_limit_answers_429_with_retry_after() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 10).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let (_, other_token) = t.device(&key, "e").await;
    // More than the burst in one request is admitted, into debt...
    let batch: Vec<Value> = (0..25).map(|_| json!({"type": "t"})).collect();
    let (status, _) = t.ingest(&token, Value::Array(batch)).await;
    assert_eq!(status, StatusCode::OK);
    // ...and the next request waits.
    let (status, headers, v) = t.ingest_raw(&token, None, r#"{"type":"t"}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["limit"], "device");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Other devices have their own budget.
    let (status, _) = t.ingest(&other_token, json!({"type": "t"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t.all_events(&key, &dev).await.len(), 25);
    let (_, live) = t.get(&format!("/v1/devices/{dev}/live"), &key).await;
    assert_eq!(live["rejected_total"], 1);
}

#[tokio::test]
async fn the_user_limit_sums_over_the_users_devices() {
    let t = TestServer::start_with(|c| {
        c.limits.device_per_sec = 0;
        c.limits.user_per_sec = 10;
    })
    .await;
    let (_, key) = t.user("ann").await;
    let (_, a) = t.device(&key, "a").await;
    let (_, b) = t.device(&key, "b").await;
    let ten: Vec<Value> = (0..10).map(|_| json!({"type": "t"})).collect();
    assert_eq!(
        t.ingest(&a, Value::Array(ten.clone())).await.0,
        StatusCode::OK
    );
    assert_eq!(t.ingest(&b, Value::Array(ten)).await.0, StatusCode::OK);
    let (status, headers, v) = t.ingest_raw(&a, None, r#"{"type":"t"}"#).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["limit"], "user");
    assert!(headers.contains_key("retry-after"));
}

/// Sends the head of a POST /v1/ingest announcing `length` body bytes, then `body`,
/// and leaves the connection open.
async fn stalled_ingest(
    base: &str,
    token: Option<&str>,
    length: usize,
    body: &[u8],
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST /v1/ingest HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    s
}

async fn status_line(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("an answer in time")
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn stalled_bodies_cannot_hold_the_ingest_slots() {
    let t = TestServer::start_with(|c| {
        c.http.max_inflight_requests = 1;
        c.http.body_timeout_secs = 1;
    })
    .await;
    let (_, key) = t.user("sam").await;
    let (_, token) = t.device(&key, "d").await;
    // A stranger announcing a large body and stalling is refused before any slot is
    // taken, without its body being waited for.
    let mut stranger = stalled_ingest(&t.base, None, 1_000_000, b"[").await;
    assert!(status_line(&mut stranger).await.contains(" 401 "));
    // A device that stalls holds the only slot, but only until the body deadline.
    let started = std::time::Instant::now();
    let mut slow = stalled_ingest(&t.base, Some(&token), 1_000, b"[").await;
    let line = status_line(&mut slow).await;
    assert!(line.contains(" 408 "), "{line}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // The slot is free again.
    let (s, v) = t.ingest(&token, json!({"type": "t"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn half_sent_headers_are_closed_and_connections_are_capped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestServer::start_with(|c| {
        c.http.header_timeout_secs = 1;
        c.http.max_connections = 2;
    })
    .await;
    let addr = t.base.trim_start_matches("http://").to_owned();
    // Headers that never end: closed after the header timeout.
    let mut trickle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickle
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), trickle.read(&mut buf))
        .await
        .expect("closed within the header timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));

    // Two silent connections take both slots: a third client waits...
    let idle: Vec<_> =
        futures::future::join_all((0..2).map(|_| tokio::net::TcpStream::connect(addr.clone())))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let early =
        tokio::time::timeout(std::time::Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "served past the connection cap");
    // ...and is served once a slot frees (the idle ones time out too).
    drop(idle);
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}
