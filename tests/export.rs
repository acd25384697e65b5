//! Exports: `GET /v1/devices/{id}/events` as NDJSON or CSV over a real socket, and
//! `iotpipe export` (the binary) against the same data directory.

mod support;

use std::collections::BTreeSet;

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{iotpipe, now_ms, TestServer};

/// More than two store pages, so that paging is crossed twice and ends short.
const EVENTS: i64 = 2_345;

async fn fixture() -> (TestServer, String, String, i64) {
    let t = TestServer::start_with(|c| {
        c.limits.device_per_sec = 0;
        c.limits.user_per_sec = 0;
    })
    .await;
    let (_, key) = t.user("exporter").await;
    let (dev, token) = t.device(&key, "meter").await;
    let base = now_ms() - 3_600_000;
    let sent: Vec<Value> = (0..EVENTS)
        .map(|i| {
            json!({
                "ts": base + i * 1000,
                "type": if i % 5 == 0 { "alarm" } else { "reading" },
                "metrics": {"temp": i as f64 / 10.0},
                // A comma, a quote and a line break: CSV must quote the cell.
                "attrs": {"note": format!("a,\"b\"\nc{i}")},
            })
        })
        .collect();
    for chunk in sent.chunks(1000) {
        let (s, v) = t.ingest(&token, Value::Array(chunk.to_vec())).await;
        assert_eq!(s, StatusCode::OK, "{v}");
    }
    (t, key, dev, base)
}

async fn fetch(
    t: &TestServer,
    key: &str,
    path: &str,
    accept: Option<&str>,
) -> (StatusCode, String, String) {
    let mut req = t.http.get(format!("{}{path}", t.base)).bearer_auth(key);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, ct, resp.text().await.unwrap())
}

/// A minimal RFC 4180 reader: enough to check that every quoted cell reads back.
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let (mut rows, mut row, mut cell) = (Vec::new(), Vec::new(), String::new());
    let (mut quoted, mut chars) = (false, text.chars().peekable());
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                cell.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => cell.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut cell)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut cell));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => cell.push(c),
        }
    }
    assert!(cell.is_empty() && row.is_empty(), "the CSV ends mid-row");
    rows
}

#[tokio::test]
async fn ndjson_and_csv_stream_the_whole_range_and_json_stays_paged() {
    let (t, key, dev, base) = fixture().await;
    let paged = t.all_events(&key, &dev).await;
    assert_eq!(paged.len() as i64, EVENTS);

    // NDJSON by `format=`: the same events as the paged listing, in the same order.
    let (s, ct, body) = fetch(
        &t,
        &key,
        &format!("/v1/devices/{dev}/events?format=ndjson&from=0"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(ct, "application/x-ndjson");
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, paged);

    // CSV by `Accept`: a header, then one row per event whose cells read back.
    let (s, ct, body) = fetch(
        &t,
        &key,
        &format!("/v1/devices/{dev}/events?from=0"),
        Some("text/csv"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(ct.starts_with("text/csv"), "{ct}");
    let rows = csv_rows(&body);
    assert_eq!(rows[0], ["id", "ts", "type", "metrics", "attrs"]);
    assert_eq!(rows.len() as i64, EVENTS + 1);
    for (row, event) in rows[1..].iter().zip(&paged) {
        assert_eq!(row[0], event["id"].as_str().unwrap());
        assert_eq!(row[1], event["ts"].as_str().unwrap());
        assert_eq!(row[2], event["type"].as_str().unwrap());
        assert_eq!(
            serde_json::from_str::<Value>(&row[3]).unwrap(),
            event["metrics"]
        );
        assert_eq!(
            serde_json::from_str::<Value>(&row[4]).unwrap(),
            event["attrs"]
        );
    }

    // A range and a type: exactly the matching events.
    let (from, to) = (base + 100_000, base + 1_600_000);
    let (_, _, body) = fetch(
        &t,
        &key,
        &format!("/v1/devices/{dev}/events?format=ndjson&type=alarm&from={from}&to={to}"),
        None,
    )
    .await;
    let got: BTreeSet<String> = body
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let want: BTreeSet<String> = paged
        .iter()
        .filter(|e| e["type"] == "alarm")
        .filter(|e| {
            let ts = iotpipe::model::parse_instant(e["ts"].as_str().unwrap()).unwrap();
            (from..to).contains(&ts)
        })
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 300);
    assert_eq!(got, want);

    // Without a streaming format the answer is still one page of JSON.
    let (s, v) = t
        .get(&format!("/v1/devices/{dev}/events?limit=10"), &key)
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["events"].as_array().unwrap().len(), 10);
    assert!(v["next_cursor"].is_string());
    let (s, ct, _) = fetch(
        &t,
        &key,
        &format!("/v1/devices/{dev}/events?format=json&limit=1"),
        Some("text/csv"),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        ct.starts_with("application/json"),
        "format= wins over Accept: {ct}"
    );
}

#[tokio::test]
async fn bad_export_requests_name_the_field() {
    let (t, key, dev, _) = fixture().await;
    for (query, field) in [
        ("format=xml", "format"),
        ("format=csv&limit=5", "limit"),
        ("format=ndjson&cursor=abc", "cursor"),
        ("format=csv&from=yesterday", "from"),
        ("format=csv&type=no%20spaces", "type"),
    ] {
        let (s, v) = t
            .get(&format!("/v1/devices/{dev}/events?{query}"), &key)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {v}");
        assert!(v.to_string().contains(field), "{query}: {v}");
    }
    // Another user's key sees the same 404 as for a missing device.
    let (_, other) = t.user("stranger").await;
    let (s, _) = t
        .get(&format!("/v1/devices/{dev}/events?format=csv"), &other)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_export_command_writes_what_the_api_streams() {
    let (mut t, key, dev, _) = fixture().await;
    let (_, _, http_csv) = fetch(
        &t,
        &key,
        &format!("/v1/devices/{dev}/events?format=csv&from=0"),
        None,
    )
    .await;
    let out = t.dir.path().join("export.csv");

    // While the server holds the data directory, the command says so and fails.
    let busy = iotpipe()
        .env("IOTPIPE_DATA_DIR", t.dir.path())
        .args(["export", "--device", &dev, "--format", "csv", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(err.contains("in use by a running server"), "{err}");
    assert!(!out.exists());

    t.stop().await;
    let done = iotpipe()
        .env("IOTPIPE_DATA_DIR", t.dir.path())
        .args([
            "export", "--device", &dev, "--format", "csv", "--from", "0", "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{err}");
    assert!(err.contains(&format!("exported {EVENTS} events")), "{err}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), http_csv);

    // To stdout as NDJSON.
    let ndjson = iotpipe()
        .env("IOTPIPE_DATA_DIR", t.dir.path())
        .args(["export", "--device", &dev])
        .output()
        .unwrap();
    assert!(ndjson.status.success());
    assert_eq!(
        String::from_utf8_lossy(&ndjson.stdout).lines().count() as i64,
        EVENTS
    );

    // Bad input names the flag; an unknown device is an error, not an empty file.
    for (args, flag) in [
        (vec!["--device", "nope"], "--device"),
        (vec!["--device", &dev, "--format", "xml"], "--format"),
        (vec!["--device", &dev, "--from", "soon"], "--from"),
        (
            vec!["--device", "00000000-0000-0000-0000-000000000001"],
            "no device",
        ),
    ] {
        let o = iotpipe()
            .env("IOTPIPE_DATA_DIR", t.dir.path())
            .arg("export")
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// A 30-day export of a 1 Hz device (2,592,000 events, about 320 MB of NDJSON) is
/// streamed: the server's resident memory stops growing early in the first export
/// and does not grow at all in a second one. The events are written straight into
/// the store (ingesting them over HTTP would take minutes here); the export is read
/// over a real socket from the binary. What the first read of a month costs above a
/// cold idle (the store's block cache, the allocator heaps of its reading threads)
/// is printed; `docs/operations.md` gives the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_month_of_a_1hz_device_exports_in_constant_memory() {
    use iotpipe::model::PartitionBatch;
    use iotpipe::model::{assigned_id, Event, PartitionKey, Record};
    use iotpipe::store::EventStore;
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let mut t = TestServer::start().await;
    let (user, key) = t.user("monthly").await;
    let (dev, _) = t.device(&key, "1hz").await;
    t.stop().await;
    let device: uuid::Uuid = dev.parse().unwrap();
    const HOUR: i64 = 3_600_000;
    let hours = 30 * 24;
    let start = (now_ms() - 31 * 24 * HOUR) / HOUR * HOUR;
    {
        let store =
            iotpipe::store::embedded::EmbeddedStore::open(&t.dir.path().join("events"), HOUR)
                .unwrap();
        for hour in 0..hours {
            let records: Vec<Record> = (0..3_600)
                .map(|s| {
                    let ts_ms = start + hour * HOUR + s * 1000;
                    Record {
                        user_id: user,
                        device_id: device,
                        received_ms: ts_ms,
                        event: Event {
                            id: assigned_id(ts_ms),
                            id_assigned: true,
                            ts_ms,
                            kind: "reading".into(),
                            metrics: vec![("temp".into(), s as f64 / 10.0)],
                            attrs: vec![],
                        },
                    }
                })
                .collect();
            let batch = PartitionBatch {
                key: PartitionKey::of(&records[0], HOUR),
                records,
            };
            store.write(Arc::new(vec![batch])).await.unwrap();
        }
        store.close().await.unwrap();
    }

    let mut child = iotpipe()
        .env("IOTPIPE_DATA_DIR", t.dir.path())
        .arg("serve")
        .env("IOTPIPE_HTTP_ADDR", "127.0.0.1:0")
        .env("IOTPIPE_MQTT_ADDR", "off")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let pid = child.id();
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/devices/{dev}/events?format=ndjson&from=0");
    // Idle, after one small answer (so that lazily built state is counted as idle).
    let small = http
        .get(format!("http://{addr}/v1/devices/{dev}/events?limit=10"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), StatusCode::OK);
    small.bytes().await.unwrap();
    let idle = rss(pid);

    let peak = Arc::new(AtomicU64::new(idle));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss(pid), Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    // One export; the RSS at each tenth of it.
    let export = || async {
        let mut resp = http.get(&url).bearer_auth(&key).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (mut bytes, mut lines, mut tenths) = (0u64, 0u64, Vec::new());
        while let Some(chunk) = resp.chunk().await.unwrap() {
            bytes += chunk.len() as u64;
            lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            if lines / 259_200 > tenths.len() as u64 {
                tenths.push(rss(pid));
            }
        }
        (bytes, lines, tenths)
    };
    let (bytes, lines, first) = export().await;
    let (_, again, second) = export().await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let _ = child.kill();
    let _ = child.wait();

    let mb = |v: &[u64]| v.iter().map(|b| b >> 20).collect::<Vec<_>>();
    eprintln!(
        "exported {lines} events, {} MB; idle {} MB; first export, each tenth: {:?} MB; \
         second: {:?} MB; peak {} MB above idle",
        bytes >> 20,
        idle >> 20,
        mb(&first),
        mb(&second),
        (peak.load(Ordering::Relaxed) - idle) >> 20
    );
    assert_eq!((lines, again), (30 * 86_400, 30 * 86_400));
    assert!(bytes > 300 << 20, "{bytes}");
    // Held whole, the body alone would add 300 MB.
    let peak = peak.load(Ordering::Relaxed);
    assert!(
        peak - idle < 150 << 20,
        "RSS grew by {} MB",
        (peak - idle) >> 20
    );
    // It stops growing: the rest of the first export, and all of the second, stay
    // within a few MB of where its first three tenths left it.
    let plateau = first[2];
    for (i, at) in first[3..].iter().chain(&second).enumerate() {
        assert!(
            *at < plateau + (24 << 20),
            "RSS still growing at sample {i}: {} MB after {} MB",
            at >> 20,
            plateau >> 20
        );
    }
}
