//! Reads over a real socket: aggregates checked against figures computed here,
//! independently, from what the test sent; listings, cursors, and query refusals.

mod support;

use std::collections::BTreeMap;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{now_ms, TestServer};

const MIN: i64 = 60_000;

/// Count, min, max, sum per window, computed the plain way.
fn expected(
    points: &[(i64, f64)],
    from: i64,
    to: i64,
    window: i64,
) -> BTreeMap<i64, (u64, f64, f64, f64)> {
    let mut out: BTreeMap<i64, (u64, f64, f64, f64)> = BTreeMap::new();
    for &(ts, v) in points {
        if ts < from || ts >= to {
            continue;
        }
        let start = ts - ts.rem_euclid(window);
        let e = out.entry(start).or_insert((0, f64::MAX, f64::MIN, 0.0));
        e.0 += 1;
        e.1 = e.1.min(v);
        e.2 = e.2.max(v);
        e.3 += v;
    }
    out
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

#[tokio::test]
async fn device_aggregates_match_an_independent_computation() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    // Two hours of events, sent out of order (late ones last), with window-edge
    // timestamps, duplicates, and events without the metric.
    let base = (now_ms() - 3 * 3_600_000) / 3_600_000 * 3_600_000;
    let mut sent: Vec<Value> = Vec::new();
    let mut points: Vec<(i64, f64)> = Vec::new();
    for i in 0..600i64 {
        let ts = base + i * 12_345 % (2 * 3_600_000);
        let v = ((i * 37) % 101) as f64 / 7.0 - 5.0;
        let id = uuid::Uuid::new_v4();
        sent.push(json!({"id": id, "ts": ts, "type": "t", "metrics": {"temp": v, "other": 1}}));
        points.push((ts, v));
    }
    for edge in [base, base + MIN, base + MIN - 1, base + 5 * MIN] {
        sent.push(json!({"ts": edge, "type": "t", "metrics": {"temp": 100.0}}));
        points.push((edge, 100.0));
    }
    // Events of another type, and events without the metric.
    for i in 0..50 {
        sent.push(json!({"ts": base + i * MIN, "type": "boot"}));
    }
    let late: Vec<Value> = sent.drain(..100).collect();
    let dupes: Vec<Value> = sent[..40].to_vec();
    for chunk in sent.chunks(97) {
        assert_eq!(
            t.ingest(&token, Value::Array(chunk.to_vec())).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(t.ingest(&token, Value::Array(late)).await.0, StatusCode::OK);
    assert_eq!(
        t.ingest(&token, Value::Array(dupes)).await.0,
        StatusCode::OK
    );

    for (from, to, window) in [
        (base, base + 2 * 3_600_000, MIN),
        (base + 7 * MIN + 123, base + 95 * MIN + 7, 5 * MIN),
        (base - 3_600_000, base + 4 * 3_600_000, 3_600_000),
        (base + MIN - 1, base + MIN + 1, 1000),
    ] {
        let want = expected(&points, from, to, window);
        let path = format!(
            "/v1/devices/{dev}/aggregates?from={from}&to={to}&window={}s&metric=temp",
            window / 1000
        );
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["device_id"], dev);
        assert_eq!(v["window_ms"], window);
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), want.len(), "{path}");
        for (b, (start, (count, min, max, sum))) in buckets.iter().zip(&want) {
            assert_eq!(b["start_ms"], *start);
            assert_eq!(b["start"], iotpipe::model::format_ms(*start));
            assert_eq!(b["count"], *count, "{path} at {start}");
            assert!(close(b["min"].as_f64().unwrap(), *min));
            assert!(close(b["max"].as_f64().unwrap(), *max));
            assert!(close(b["sum"].as_f64().unwrap(), *sum));
            assert!(close(b["avg"].as_f64().unwrap(), sum / *count as f64));
        }
    }

    // Without a metric: every event counts, only start/start_ms/count are given.
    let (from, to) = (base, base + 2 * 3_600_000);
    let (_, v) = t
        .get(
            &format!("/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1h"),
            &key,
        )
        .await;
    let total: u64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 604 + 50);
    assert!(v["buckets"][0].get("min").is_none());
    assert_eq!(v["buckets"][0].as_object().unwrap().len(), 3);
    // With a type filter.
    let (_, v) = t
        .get(
            &format!("/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1d&type=boot"),
            &key,
        )
        .await;
    let total: u64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 50);
}

#[tokio::test]
async fn grouped_aggregates_count_by_type_and_by_device_across_the_users_devices() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (d1, t1) = t.device(&key, "one").await;
    let (d2, t2) = t.device(&key, "two").await;
    let (d3, t3) = t.device(&key, "gone").await;
    let base = (now_ms() - 3_600_000) / MIN * MIN;
    let ev = |ts: i64, kind: &str| json!({"ts": ts, "type": kind});
    t.ingest(
        &t1,
        json!([ev(base, "a"), ev(base + 1, "b"), ev(base + MIN, "a")]),
    )
    .await;
    t.ingest(&t2, json!([ev(base + 2, "a"), ev(base + MIN + 5, "b")]))
        .await;
    t.ingest(&t3, json!([ev(base, "a")])).await;
    // A deleted device's events are never served.
    t.call(
        reqwest::Method::DELETE,
        &format!("/v1/devices/{d3}"),
        Some(&key),
        None,
    )
    .await;

    let q = format!("from={base}&to={}&window=1m", base + 2 * MIN);
    let (status, v) = t
        .get(&format!("/v1/aggregates?{q}&group_by=type"), &key)
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["window_ms"], MIN);
    let got: Vec<(i64, String, u64)> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start_ms"].as_i64().unwrap(),
                b["group"].as_str().unwrap().to_owned(),
                b["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (base, "a".into(), 2),
            (base, "b".into(), 1),
            (base + MIN, "a".into(), 1),
            (base + MIN, "b".into(), 1),
        ]
    );
    let (_, v) = t
        .get(&format!("/v1/aggregates?{q}&group_by=device"), &key)
        .await;
    let mut want = vec![
        (base, d1.clone(), 2),
        (base, d2.clone(), 1),
        (base + MIN, d1.clone(), 1),
        (base + MIN, d2.clone(), 1),
    ];
    want.sort();
    let got: Vec<(i64, String, u64)> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["start_ms"].as_i64().unwrap(),
                b["group"].as_str().unwrap().to_owned(),
                b["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, want);
    let (_, v) = t
        .get(&format!("/v1/aggregates?{q}&group_by=device&type=b"), &key)
        .await;
    assert_eq!(v["buckets"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn events_page_newest_first_with_cursors() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let base = now_ms() - 100_000;
    // Several events share a timestamp, so the cursor must break ties by id.
    let sent: Vec<Value> = (0..57)
        .map(|i| json!({"ts": base + (i / 3) * 1000, "type": if i % 2 == 0 { "even" } else { "odd" }}))
        .collect();
    t.ingest(&token, Value::Array(sent)).await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/devices/{dev}/events?limit=10");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let page = v["events"].as_array().unwrap();
        assert!(page.len() <= 10);
        seen.extend(page.iter().cloned());
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 57);
    let ids: std::collections::HashSet<_> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 57);
    let ts: Vec<String> = seen
        .iter()
        .map(|e| e["ts"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = ts.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(ts, sorted, "newest first");

    let (_, v) = t
        .get(
            &format!("/v1/devices/{dev}/events?type=odd&limit=1000"),
            &key,
        )
        .await;
    assert_eq!(v["events"].as_array().unwrap().len(), 28);
    assert_eq!(v["next_cursor"], Value::Null);
    let (from, to) = (base + 3000, base + 6000);
    let (_, v) = t
        .get(
            &format!("/v1/devices/{dev}/events?from={from}&to={to}"),
            &key,
        )
        .await;
    assert_eq!(
        v["events"].as_array().unwrap().len(),
        9,
        "[from, to) is half-open"
    );
}

/// Without parameters the events endpoint serves its documented defaults: 100 a page,
/// newest first, from the whole past up to 5 minutes ahead.
#[tokio::test]
async fn the_events_page_defaults_to_100_newest_first_over_the_whole_past() {
    let t = TestServer::start().await;
    let o = t.owner().await;
    let now = now_ms();
    let mut sent: Vec<Value> = (0..149)
        .map(|i| json!({"ts": now - 3_600_000 + i * 1000, "type": "t"}))
        .collect();
    let oldest = json!({"ts": "2000-01-02T00:00:00Z", "type": "old"});
    let newest = json!({"ts": now + 4 * 60_000, "type": "ahead"});
    sent.extend([oldest, newest]);
    t.ingest_ok(&o.token, Value::Array(sent)).await;

    let path = format!("/v1/devices/{}/events", o.device);
    let first = t.ok(&path, &o.key).await;
    let page = first["events"].as_array().unwrap();
    assert_eq!(page.len(), 100, "the default limit");
    assert_eq!(
        page[0]["type"], "ahead",
        "newest first, up to 5 minutes ahead"
    );
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second = t.ok(&format!("{path}?cursor={cursor}"), &o.key).await;
    let rest = second["events"].as_array().unwrap();
    assert_eq!(rest.len(), 51);
    assert_eq!(rest[50]["type"], "old", "the whole past");
    assert_eq!(second["next_cursor"], Value::Null);
}

#[tokio::test]
async fn bad_query_parameters_are_named() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, _) = t.device(&key, "d").await;
    let agg = format!("/v1/devices/{dev}/aggregates");
    let cases = [
        (format!("{agg}?to=1000&window=1s"), "from"),
        (format!("{agg}?from=0&window=1s"), "to"),
        (format!("{agg}?from=1000&to=1000&window=1s"), "to"),
        (format!("{agg}?from=0&to=1000"), "window"),
        (format!("{agg}?from=0&to=1000&window=500ms"), "window"),
        (format!("{agg}?from=0&to=1000&window=1.5s"), "window"),
        (format!("{agg}?from=0&to=10001000&window=1s"), "window"),
        (format!("{agg}?from=yesterday&to=1000&window=1s"), "from"),
        (format!("/v1/devices/{dev}/events?limit=10001"), "limit"),
        (format!("/v1/devices/{dev}/events?limit=0"), "limit"),
        (format!("/v1/devices/{dev}/events?cursor=zzz"), "cursor"),
        (
            "/v1/aggregates?from=0&to=1000&window=1s&group_by=color".to_string(),
            "group_by",
        ),
        // The fleet's aggregates take the same range rules.
        ("/v1/aggregates?to=1000&window=1s".to_string(), "from"),
        ("/v1/aggregates?from=0&window=1s".to_string(), "to"),
        (
            "/v1/aggregates?from=1000&to=1000&window=1s".to_string(),
            "to",
        ),
        (
            "/v1/aggregates?from=2000&to=1000&window=1s".to_string(),
            "to",
        ),
        (
            "/v1/aggregates?from=0&to=10001000&window=1s".to_string(),
            "window",
        ),
    ];
    for (path, field) in cases {
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["field"], field, "{path}: {v}");
    }
    // Exactly 10,000 windows is allowed.
    let (status, _) = t
        .get(&format!("{agg}?from=0&to=10000000&window=1s"), &key)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = t
        .get(
            &format!("{agg}?from=2026-11-21T10:00:00Z&to=2026-11-21T11:00:00.000Z&window=1m"),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn live_figures_count_new_events_once() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (d1, t1) = t.device(&key, "a").await;
    let (_, t2) = t.device(&key, "b").await;
    let (_, _idle) = t.device(&key, "c").await;
    let id = uuid::Uuid::new_v4();
    // An old ts still counts as received now.
    t.ingest(
        &t1,
        json!([{"id": id, "type": "t", "ts": "2001-01-01T00:00:00Z"}, {"type": "t"}]),
    )
    .await;
    t.ingest(
        &t1,
        json!([{"id": id, "type": "t", "ts": "2001-01-01T00:00:00Z"}]),
    )
    .await;
    t.ingest(&t2, json!({"type": "t"})).await;
    let (status, v) = t.get(&format!("/v1/devices/{d1}/live"), &key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["events_total"], 2, "{v}");
    assert_eq!(v["events_last_minute"], 2);
    assert_eq!(v["rejected_total"], 0);
    assert_eq!(v["last_error"], Value::Null);
    let last_seen = iotpipe::model::parse_rfc3339_ms(v["last_seen"].as_str().unwrap()).unwrap();
    assert!((now_ms() - last_seen).abs() < 60_000);
    let (_, v) = t.get("/v1/live", &key).await;
    assert_eq!(
        v,
        json!({"events_total": 3, "events_last_minute": 3, "devices_active_5m": 2})
    );
}

#[tokio::test]
async fn latest_values_are_served_per_device_and_per_fleet_and_never_go_back_in_time() {
    let t = TestServer::start().await;
    let (_, key) = t.user("lia").await;
    let (dev, token) = t.device(&key, "meter").await;
    let (quiet, _) = t.device(&key, "quiet").await;
    // A thermostat, so the fleet form's type filter has something to tell apart.
    let (s, _, v) = t
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(&key),
            Some(json!({"name": "hall", "type": "thermostat"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (thermo, thermo_token) = (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    );
    let base = now_ms() - 3_600_000;
    let (s, v) = t
        .ingest(
            &token,
            json!([
                {"ts": base + 5_000, "type": "t", "metrics": {"temp": 5.0, "hum": 40.0}},
                {"ts": base + 9_000, "type": "t", "metrics": {"temp": 9.0}},
            ]),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // Late: older than what is stored, in a later request.
    let (s, _) = t
        .ingest(
            &token,
            json!({"ts": base + 1_000, "type": "t", "metrics": {"temp": 1.0, "hum": 10.0}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = t
        .ingest(
            &thermo_token,
            json!({"ts": base, "type": "t", "metrics": {"temp": 19.5}}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);

    let (s, v) = t.get(&format!("/v1/devices/{dev}/latest"), &key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["device_id"], dev.as_str());
    assert_eq!(v["metrics"]["temp"]["value"], 9.0);
    assert_eq!(v["metrics"]["temp"]["ts_ms"], base + 9_000);
    assert_eq!(v["metrics"]["hum"]["value"], 40.0, "the late 10.0 is older");
    assert!(v["metrics"]["temp"]["ts"].as_str().unwrap().ends_with('Z'));

    let (s, v) = t.get("/v1/latest", &key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let devices = v["devices"].as_array().unwrap();
    assert_eq!(
        devices.len(),
        3,
        "every device, with or without values: {v}"
    );
    let quiet_row = devices.iter().find(|d| d["device_id"] == quiet.as_str());
    assert_eq!(quiet_row.unwrap()["metrics"], json!({}));
    let (s, v) = t.get("/v1/latest?type=thermostat", &key).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["devices"].as_array().unwrap().len(), 1);
    assert_eq!(v["devices"][0]["device_id"], thermo.as_str());
    assert_eq!(v["devices"][0]["type"], "thermostat");
    assert_eq!(v["devices"][0]["metrics"]["temp"]["value"], 19.5);
    let (s, v) = t.get("/v1/latest?type=", &key).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["field"], "type", "{v}");

    // Another user sees none of it.
    let (_, other) = t.user("max").await;
    let (s, _) = t.get(&format!("/v1/devices/{dev}/latest"), &other).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = t.get("/v1/latest", &other).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["devices"], json!([]));
}

#[tokio::test]
async fn extreme_ranges_answer_at_once_without_harm() {
    let t = TestServer::start().await;
    let (_, key) = t.user("rex").await;
    let (dev, token) = t.device(&key, "d").await;
    let (s, _) = t
        .ingest(&token, json!({"type": "t", "metrics": {"v": 1}}))
        .await;
    assert_eq!(s, StatusCode::OK);
    let max = i64::MAX;
    let min = i64::MIN;
    // Once a loop that wrapped around and grew until the process aborted.
    for path in [
        format!("/v1/devices/{dev}/aggregates?from=9223372036854775000&to={max}&window=1s"),
        format!("/v1/aggregates?from=9223372036854775000&to={max}&window=1s"),
        format!("/v1/devices/{dev}/aggregates?from=-1000&to=0&window=1s"),
    ] {
        let (s, v) = t.get(&path, &key).await;
        assert_eq!(s, StatusCode::OK, "{path}: {v}");
        assert_eq!(v["buckets"], json!([]), "{path}: {v}");
    }
    // A span that overflows i64 once wrapped the window count below the limit.
    for path in [
        format!("/v1/devices/{dev}/aggregates?from={min}&to={max}&window=1s"),
        format!("/v1/aggregates?from={min}&to={max}&window=1s"),
    ] {
        let (s, v) = t.get(&path, &key).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["field"], "window", "{v}");
    }
    // From 1970 in 30-day windows is fine, and read only where events can exist.
    let to = support::now_ms() + 86_400_000;
    let (s, v) = t
        .get(
            &format!("/v1/devices/{dev}/aggregates?from=0&to={to}&window=30d"),
            &key,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["buckets"].as_array().unwrap().len(), 1);
    let (s, v) = t
        .get(
            &format!("/v1/devices/{dev}/events?from={min}&to={max}"),
            &key,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 1);
    // The server is still there.
    let (s, _) = t.get("/v1/devices", &key).await;
    assert_eq!(s, StatusCode::OK);
}
