//! Dashboard queries over a real socket: multi-day ranges read through every rollup
//! level, time-zone windows across DST and :30/:45 zones, empty-window fills, and
//! grouped counts over a fleet, each checked against figures computed here from what
//! the test sent.

mod support;

use std::collections::BTreeMap;

use futures::StreamExt;

use chrono::{TimeZone, Timelike};
use chrono_tz::Tz;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::TestServer;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;

fn at(s: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap()
        .timestamp_millis()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Sends `events` (JSON objects) in chunks.
async fn send(t: &TestServer, token: &str, events: &[Value]) {
    for chunk in events.chunks(2_000) {
        let (status, v) = t.ingest(token, Value::Array(chunk.to_vec())).await;
        assert_eq!(status, StatusCode::OK, "{v}");
    }
}

/// (count, min, max, sum) per window, keyed by the window's start as computed by
/// `start_of` for each point.
fn brute(
    points: &[(i64, f64)],
    from: i64,
    to: i64,
    start_of: impl Fn(i64) -> i64,
) -> BTreeMap<i64, (u64, f64, f64, f64)> {
    let mut out: BTreeMap<i64, (u64, f64, f64, f64)> = BTreeMap::new();
    for &(ts, v) in points.iter().filter(|p| p.0 >= from && p.0 < to) {
        let e = out
            .entry(start_of(ts))
            .or_insert((0, f64::MAX, f64::MIN, 0.0));
        e.0 += 1;
        e.1 = e.1.min(v);
        e.2 = e.2.max(v);
        e.3 += v;
    }
    out
}

fn assert_windows(v: &Value, want: &BTreeMap<i64, (u64, f64, f64, f64)>, what: &str) {
    let buckets = v["buckets"].as_array().unwrap();
    let got: Vec<i64> = buckets
        .iter()
        .map(|b| b["start_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(got, want.keys().copied().collect::<Vec<_>>(), "{what}");
    for (b, (count, min, max, sum)) in buckets.iter().zip(want.values()) {
        assert_eq!(b["count"], *count, "{what}: {b}");
        assert!(close(b["min"].as_f64().unwrap(), *min), "{what}: {b}");
        assert!(close(b["max"].as_f64().unwrap(), *max), "{what}: {b}");
        assert!(close(b["sum"].as_f64().unwrap(), *sum), "{what}: {b}");
    }
}

/// The local midnight that starts the local day of `ts` in `tz`, computed from the
/// local calendar (not from the server's code).
fn local_day_start(tz: Tz, ts: i64) -> i64 {
    let date = tz.timestamp_millis_opt(ts).unwrap().date_naive();
    let mut t = date.and_hms_opt(0, 0, 0).unwrap();
    loop {
        if let Some(x) = tz.from_local_datetime(&t).earliest() {
            return x.timestamp_millis();
        }
        t += chrono::Duration::minutes(15);
    }
}

#[tokio::test]
async fn multi_day_ranges_read_through_every_level_match_a_brute_force_scan() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    // Four days every 97 s, then late events into the first day and duplicates.
    let base = at("2026-06-01T00:00:00Z");
    let mut events = Vec::new();
    let mut points = Vec::new();
    let mut i = 0i64;
    while i * 97_000 < 4 * DAY {
        let ts = base + i * 97_000;
        let v = ((i * 31) % 113) as f64 / 3.0 - 10.0;
        events.push(
            json!({"id": uuid::Uuid::new_v4(), "ts": ts, "type": "t", "metrics": {"temp": v}}),
        );
        points.push((ts, v));
        i += 1;
    }
    let (late, on_time) = events.split_at(300);
    send(&t, &token, on_time).await;
    send(&t, &token, late).await;
    send(&t, &token, &events[1_000..1_500]).await; // duplicates: ignored

    for (from, to, window) in [
        (base, base + 4 * DAY, DAY),
        (base - 3 * DAY, base + 30 * DAY, DAY),
        (base, base + 4 * DAY, HOUR),
        (
            base + 5 * HOUR + 7 * MIN + 300,
            base + 3 * DAY - 2 * MIN - 5,
            DAY,
        ),
        (
            base + 5 * HOUR + 7 * MIN + 300,
            base + 3 * DAY - 2 * MIN - 5,
            2 * HOUR,
        ),
        (base + 17 * MIN, base + DAY + 3 * MIN, 15 * MIN),
    ] {
        let path = format!(
            "/v1/devices/{dev}/aggregates?from={from}&to={to}&window={}s&metric=temp",
            window / 1000
        );
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let want = brute(&points, from, to, |ts| ts - ts.rem_euclid(window));
        assert_windows(&v, &want, &path);
    }
}

#[tokio::test]
async fn zoned_windows_follow_local_midnight_across_dst_and_odd_offsets() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    // Every 5 minutes around both of Berlin's 2026 changes (29 March, 25 October).
    let mut events = Vec::new();
    let mut points = Vec::new();
    for (start, end) in [
        ("2026-03-27T00:00:00Z", "2026-03-31T00:00:00Z"),
        ("2026-10-23T00:00:00Z", "2026-10-27T00:00:00Z"),
    ] {
        let mut ts = at(start);
        while ts < at(end) {
            let v = (ts / MIN % 1000) as f64;
            events.push(json!({"ts": ts, "type": "t", "metrics": {"v": v}}));
            points.push((ts, v));
            ts += 5 * MIN;
        }
    }
    send(&t, &token, &events).await;

    for zone in ["Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "UTC"] {
        let tz: Tz = zone.parse().unwrap();
        for (from, to) in [
            (at("2026-03-27T00:00:00Z"), at("2026-03-31T00:00:00Z")),
            (at("2026-10-23T00:00:00Z"), at("2026-10-27T00:00:00Z")),
        ] {
            let path = format!(
                "/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1d&metric=v&tz={zone}"
            );
            let (status, v) = t.get(&path, &key).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            let want = brute(&points, from, to, |ts| local_day_start(tz, ts));
            // The first window starts at the local midnight before `from`.
            let got = v["buckets"].as_array().unwrap();
            assert_eq!(
                got[0]["start_ms"].as_i64().unwrap(),
                local_day_start(tz, from),
                "{path}"
            );
            assert_windows(&v, &want, &path);
            for b in got {
                let start = tz
                    .timestamp_millis_opt(b["start_ms"].as_i64().unwrap())
                    .unwrap();
                assert_eq!((start.hour(), start.minute()), (0, 0), "{zone}: {b}");
            }
        }
    }

    // Hour windows on the 23- and 25-hour days, filled so that every window shows.
    for (day, hours) in [("2026-03-29", 23), ("2026-10-25", 25)] {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap();
        let from = local_day_start(
            tz,
            tz.from_local_datetime(&date.and_hms_opt(12, 0, 0).unwrap())
                .unwrap()
                .timestamp_millis(),
        );
        let to = local_day_start(tz, from + 30 * HOUR);
        let path = format!(
            "/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1h&tz=Europe/Berlin&fill=zero"
        );
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let buckets = v["buckets"].as_array().unwrap();
        assert_eq!(buckets.len(), hours, "{day}");
        assert!(buckets.iter().all(|b| b["count"] == 12), "{day}: {v}");
    }

    // Kolkata's hours start at :30 UTC, Kathmandu's days at 18:15 UTC.
    let from = at("2026-03-28T00:30:00Z");
    let (_, v) = t
        .get(
            &format!(
                "/v1/devices/{dev}/aggregates?from={from}&to={}&window=1h&tz=Asia/Kolkata",
                from + 3 * HOUR
            ),
            &key,
        )
        .await;
    let starts: Vec<i64> = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["start_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(starts, [from, from + HOUR, from + 2 * HOUR]);
    assert!(v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["count"] == 12));
}

#[tokio::test]
async fn empty_windows_are_filled_as_asked_with_the_value_before_the_range_carried_in() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let base = at("2026-06-01T00:00:00Z");
    // A value two days before the range, then values in windows 2 and 5 of 8.
    send(
        &t,
        &token,
        &[
            json!({"ts": base - 2 * DAY, "type": "t", "metrics": {"v": 4.0}}),
            json!({"ts": base + 2 * MIN + 10, "type": "t", "metrics": {"v": 10.0}}),
            json!({"ts": base + 5 * MIN, "type": "t", "metrics": {"v": 16.0}}),
            json!({"ts": base + 5 * MIN + 1, "type": "t", "metrics": {"v": 20.0}}),
            json!({"ts": base + 6 * MIN, "type": "boot"}),
        ],
    )
    .await;
    let (from, to) = (base, base + 8 * MIN);
    let q = |fill: &str| {
        format!("/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1m&metric=v&fill={fill}")
    };
    let avgs = |v: &Value| -> Vec<Option<f64>> {
        v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["avg"].as_f64())
            .collect()
    };
    let (_, none) = t.get(&q("none"), &key).await;
    assert_eq!(avgs(&none), [Some(10.0), Some(18.0)]);
    let (_, null) = t.get(&q("null"), &key).await;
    assert_eq!(
        avgs(&null),
        [None, None, Some(10.0), None, None, Some(18.0), None, None]
    );
    let b0 = &null["buckets"][0];
    assert_eq!(
        (b0["count"].as_u64(), b0["filled"].as_bool()),
        (Some(0), Some(true))
    );
    assert!(b0["min"].is_null() && b0["sum"].is_null());
    assert!(null["buckets"][2].get("filled").is_none());
    let (_, zero) = t.get(&q("zero"), &key).await;
    assert_eq!(
        avgs(&zero),
        [
            Some(0.0),
            Some(0.0),
            Some(10.0),
            Some(0.0),
            Some(0.0),
            Some(18.0),
            Some(0.0),
            Some(0.0)
        ]
    );
    let (_, prev) = t.get(&q("previous"), &key).await;
    assert_eq!(
        avgs(&prev),
        [
            Some(4.0),
            Some(4.0),
            Some(10.0),
            Some(10.0),
            Some(10.0),
            Some(18.0),
            Some(18.0),
            Some(18.0)
        ]
    );
    let (_, lin) = t.get(&q("linear"), &key).await;
    let got = avgs(&lin);
    // From 4.0 at base - 2 days to 10.0 at minute 2: nearly flat, then 10 -> 18.
    let slope = 6.0 / (2.0 * DAY as f64 + 2.0 * MIN as f64);
    assert!(close(got[0].unwrap(), 4.0 + slope * 2.0 * DAY as f64));
    assert!(close(got[3].unwrap(), 10.0 + 8.0 / 3.0));
    assert!(close(got[4].unwrap(), 10.0 + 16.0 / 3.0));
    assert_eq!(&got[5..], [Some(18.0), None, None]);
    // Without a metric, fills list the empty windows with a count of 0.
    let (_, counts) = t
        .get(
            &format!("/v1/devices/{dev}/aggregates?from={from}&to={to}&window=1m&fill=previous"),
            &key,
        )
        .await;
    let counts: Vec<u64> = counts["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, [0, 0, 1, 0, 0, 2, 1, 0]);
}

#[tokio::test]
async fn grouped_counts_over_a_fleet_match_and_skip_deleted_devices() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (_, other) = t.user("bob").await;
    let base = at("2026-06-01T00:00:00Z");
    let mut devices = Vec::new();
    // (device, ts, type), as sent by the devices that stay.
    let mut sent: Vec<(String, i64, &str)> = Vec::new();
    for d in 0..6 {
        let (id, token) = t.device(&key, &format!("d{d}")).await;
        let mut events = Vec::new();
        for i in 0..(200 + d * 17) {
            let ts = base - 5 * HOUR + i * (13 * MIN + d * 1_000) % (3 * DAY);
            let kind = ["telemetry", "alarm", "boot"][(i % 3) as usize];
            events.push(json!({"ts": ts, "type": kind}));
            sent.push((id.clone(), ts, kind));
        }
        send(&t, &token, &events).await;
        devices.push(id);
    }
    // Another user's device, and a device that is deleted: neither counts.
    let (_, bob_token) = t.device(&other, "b").await;
    send(
        &t,
        &bob_token,
        &[json!({"ts": base + HOUR, "type": "telemetry"})],
    )
    .await;
    let gone = devices.pop().unwrap();
    sent.retain(|s| s.0 != gone);
    let (status, _, _) = t
        .call(
            reqwest::Method::DELETE,
            &format!("/v1/devices/{gone}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    for (from, to, window) in [
        (base, base + 2 * DAY, HOUR),
        (base - DAY, base + 3 * DAY, DAY),
        (base + 7 * MIN + 5, base + DAY + 3 * HOUR + 11, 3 * HOUR),
    ] {
        for group_by in ["type", "device"] {
            let path = format!(
                "/v1/aggregates?from={from}&to={to}&window={}s&group_by={group_by}",
                window / 1000
            );
            let (status, v) = t.get(&path, &key).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            let mut want: BTreeMap<(i64, String), u64> = BTreeMap::new();
            for (dev, ts, kind) in sent.iter().filter(|s| s.1 >= from && s.1 < to) {
                let group = if group_by == "type" {
                    kind.to_string()
                } else {
                    dev.clone()
                };
                *want.entry((ts - ts.rem_euclid(window), group)).or_default() += 1;
            }
            let got: BTreeMap<(i64, String), u64> = v["buckets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        (
                            b["start_ms"].as_i64().unwrap(),
                            b["group"].as_str().unwrap().to_owned(),
                        ),
                        b["count"].as_u64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(got, want, "{path}");
        }
    }

    // Paged over devices: two pages of 3 and 2, in id order, covering everything.
    let (from, to) = (base, base + 2 * DAY);
    let page = |after: Option<&str>| {
        let mut p =
            format!("/v1/aggregates?from={from}&to={to}&window=1d&group_by=device&device_limit=3");
        if let Some(a) = after {
            p.push_str(&format!("&after_device={a}"));
        }
        p
    };
    let (_, first) = t.get(&page(None), &key).await;
    let next = first["next_after_device"].as_str().unwrap().to_owned();
    let (_, second) = t.get(&page(Some(&next)), &key).await;
    assert!(second.get("next_after_device").is_none(), "{second}");
    let groups = |v: &Value| -> std::collections::BTreeSet<String> {
        v["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["group"].as_str().unwrap().to_owned())
            .collect()
    };
    let (a, b) = (groups(&first), groups(&second));
    assert_eq!(a.len(), 3);
    assert!(a.iter().all(|x| x.as_str() <= next.as_str()));
    assert!(b.iter().all(|x| x.as_str() > next.as_str()));
    let mut all: Vec<String> = a.union(&b).cloned().collect();
    all.sort();
    let mut want = devices.clone();
    want.sort();
    assert_eq!(all, want);
}

#[tokio::test]
async fn bad_dashboard_parameters_are_refused_by_name() {
    let t = TestServer::start().await;
    let (_, key) = t.user("ann").await;
    let (dev, _) = t.device(&key, "d").await;
    let agg = format!("/v1/devices/{dev}/aggregates?from=0&to=86400000");
    let cases = [
        (format!("{agg}&window=1h&tz=Mars/Olympus_Mons"), "tz"),
        (format!("{agg}&window=1h&tz="), "tz"),
        (format!("{agg}&window=1h&fill=sideways"), "fill"),
        (format!("{agg}&window=7h&tz=Europe/Berlin"), "window"),
        (format!("{agg}&window=36h&tz=Europe/Berlin"), "window"),
        (
            format!("/v1/devices/{dev}/aggregates?from=0&to=864000000&window=1m&tz=UTC"),
            "window",
        ),
        (
            "/v1/aggregates?from=0&to=3600000&window=1h&group_by=device&device_limit=0".into(),
            "device_limit",
        ),
        (
            "/v1/aggregates?from=0&to=3600000&window=1h&group_by=device&device_limit=1001".into(),
            "device_limit",
        ),
        (
            "/v1/aggregates?from=0&to=3600000&window=1h&group_by=device&after_device=x".into(),
            "after_device",
        ),
        (
            "/v1/aggregates?from=0&to=3600000&window=1h&tz=Nowhere".into(),
            "tz",
        ),
    ];
    for (path, field) in cases {
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["field"], field, "{path}: {v}");
    }
}

#[tokio::test]
async fn percentiles_are_within_the_documented_relative_error_of_exact_ones() {
    let t = TestServer::start_with(|c| c.limits.device_per_sec = 0).await;
    let (_, key) = t.user("ann").await;
    let (dev, token) = t.device(&key, "d").await;
    let base = at("2026-06-01T00:00:00Z");
    // Three hours of values spread over five orders of magnitude, both signs and
    // zero, at pseudo-random times.
    let mut points = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..6_000 {
        let ts = base + (next() % (3 * HOUR as u64)) as i64;
        let magnitude = 10f64.powi((next() % 5) as i32 - 1);
        let v = match next() % 10 {
            0 => 0.0,
            1 | 2 => -magnitude * (next() % 1000) as f64 / 100.0,
            _ => magnitude * (next() % 1000) as f64 / 100.0,
        };
        points.push((ts, v));
    }
    let events: Vec<Value> = points
        .iter()
        .map(|(ts, v)| json!({"ts": ts, "type": "t", "metrics": {"v": v}}))
        .collect();
    send(&t, &token, &events).await;
    let asked = [50.0, 90.0, 95.0, 99.0, 99.9];
    // Hour rows; minute rows with raw edges; and a window no rollup fits.
    for (from, to, window) in [
        (base, base + 3 * HOUR, HOUR),
        (base + 7 * MIN + 311, base + 2 * HOUR + 5, 20 * MIN),
        (base, base + 3 * HOUR, 47_000),
    ] {
        let path = format!(
            "/v1/devices/{dev}/aggregates?from={from}&to={to}&window={}s&metric=v&percentiles=50,90,95,99,99.9",
            window / 1000
        );
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        for b in v["buckets"].as_array().unwrap() {
            let start = b["start_ms"].as_i64().unwrap();
            let mut values: Vec<f64> = points
                .iter()
                .filter(|(ts, _)| *ts >= from.max(start) && *ts < to.min(start + window))
                .map(|p| p.1)
                .collect();
            values.sort_by(f64::total_cmp);
            assert_eq!(b["count"], values.len(), "{path}: {b}");
            for p in asked {
                // The documented rank: floor(q * (n - 1)).
                let exact = values[((p / 100.0) * (values.len() - 1) as f64) as usize];
                let got = b[format!("p{p}")].as_f64().unwrap();
                assert!(
                    (got - exact).abs() <= 0.01 * exact.abs() + 1e-9,
                    "{path} at {start}: p{p} = {got}, exact {exact}"
                );
            }
        }
    }
    for (q, why) in [
        ("percentiles=0", "percentiles"),
        ("percentiles=100", "percentiles"),
        ("percentiles=50,abc", "percentiles"),
        ("percentiles=-5", "percentiles"),
        ("percentiles=1,2,3,4,5,6,7,8,9,10,11", "percentiles"),
    ] {
        let path = format!(
            "/v1/devices/{dev}/aggregates?from={base}&to={}&window=1h&metric=v&{q}",
            base + HOUR
        );
        let (status, v) = t.get(&path, &key).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["field"], why, "{v}");
    }
    let path = format!(
        "/v1/devices/{dev}/aggregates?from={base}&to={}&window=1h&percentiles=50",
        base + HOUR
    );
    let (status, v) = t.get(&path, &key).await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("percentiles"))
    );
}

#[tokio::test]
async fn grouping_more_devices_than_the_cap_is_refused_unless_paged() {
    let t = TestServer::start().await;
    let (_, key) = t.user("fleet").await;
    // One past the cap; no events are needed, the count is of registered devices.
    let names: Vec<String> = (0..1_001).map(|i| format!("d{i}")).collect();
    futures::stream::iter(names.iter().map(|n| t.device(&key, n)))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let grouped = "/v1/aggregates?from=0&to=3600000&window=1h&group_by=device";
    let (status, v) = t.get(grouped, &key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "group_by", "{v}");
    assert!(v["error"].as_str().unwrap().contains("1001"), "{v}");

    let (status, v) = t.get(&format!("{grouped}&device_limit=1000"), &key).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let after = v["next_after_device"]
        .as_str()
        .expect("a next page")
        .to_owned();
    let (status, v) = t
        .get(
            &format!("{grouped}&device_limit=1000&after_device={after}"),
            &key,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["next_after_device"].is_null(), "the last page: {v}");
}
