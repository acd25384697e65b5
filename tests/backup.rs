//! `iotpipe backup` of a running embedded server while it ingests, and `iotpipe
//! restore` into an empty data directory: every event acknowledged before the backup
//! started is in it, and the restored server serves the same events, aggregates and
//! registry (the same user key and admin token work).

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use support::{now_ms, TestServer};
use uuid::Uuid;

/// The ids of one acknowledged request, and when its answer arrived.
type Acked = (Instant, Vec<String>);

fn iotpipe(data_dir: &Path) -> tokio::process::Command {
    let mut cmd = support::iotpipe();
    cmd.env("IOTPIPE_DATA_DIR", data_dir);
    cmd.into()
}

async fn run(cmd: &mut tokio::process::Command) -> (bool, String) {
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_while_ingesting_restores_every_acknowledged_event() {
    // No configured admin token: the generated one is part of what is restored.
    let mut t = TestServer::start_with(|c| {
        c.admin_token = None;
        c.limits.device_per_sec = 0;
        c.limits.user_per_sec = 0;
    })
    .await;
    let (_, key) = t.user("owner").await;
    let (history, history_token) = t.device(&key, "history").await;
    let (live, live_token) = t.device(&key, "live").await;
    let from = (now_ms() - 2 * 86_400_000) / 3_600_000 * 3_600_000;
    let events: Vec<Value> = (0..3_000i64)
        .map(
            |i| json!({"ts": from + i * 20_000, "type": "r", "metrics": {"temp": (i % 97) as f64}}),
        )
        .collect();
    for chunk in events.chunks(1_000) {
        assert_eq!(
            t.ingest(&history_token, json!(chunk)).await.0,
            StatusCode::OK
        );
    }
    let aggregates = format!(
        "/v1/devices/{history}/aggregates?from={from}&to={}&window=1h&metric=temp",
        from + 86_400_000
    );
    let (_, history_aggregates) = t.get(&aggregates, &key).await;
    let history_events = t.all_events(&key, &history).await;

    // Ingest keeps going through the backup; each acknowledged request is noted with
    // the instant its answer arrived.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let writer = {
        let (stop, acked, http) = (stop.clone(), acked.clone(), t.http.clone());
        let url = format!("{}/v1/ingest", t.base);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..50).map(|_| Uuid::new_v4().to_string()).collect();
                let body: Vec<Value> = ids
                    .iter()
                    .map(|id| json!({"id": id, "type": "r", "metrics": {"temp": 1.0}}))
                    .collect();
                let resp = http
                    .post(&url)
                    .bearer_auth(&live_token)
                    .json(&body)
                    .send()
                    .await;
                if resp.is_ok_and(|r| r.status() == StatusCode::OK) {
                    acked.lock().unwrap().push((Instant::now(), ids));
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    let backups = tempfile::tempdir().unwrap();
    let backup = backups.path().join("b1");
    let started = Instant::now();
    let (ok, err) = run(iotpipe(t.dir.path())
        .arg("backup")
        .arg(&backup)
        .args(["--server", &t.base]))
    .await;
    assert!(ok, "{err}");
    assert!(err.contains("backup complete"), "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let before: HashSet<String> = acked
        .iter()
        .filter(|(at, _)| *at < started)
        .flat_map(|(_, ids)| ids.iter().cloned())
        .collect();
    let after = acked.iter().filter(|(at, _)| *at > started).count();
    assert!(
        before.len() >= 50 && after > 0,
        "ingest ran before ({}) and during ({after})",
        before.len()
    );

    // A second backup into the same directory is refused; nothing is overwritten.
    let (ok, err) = run(iotpipe(t.dir.path())
        .arg("backup")
        .arg(&backup)
        .args(["--server", &t.base]))
    .await;
    assert!(!ok && err.contains("not empty"), "{err}");
    let admin = t.admin.clone();
    t.stop().await;

    // A backup without its manifest is not complete, and is refused.
    let partial = backups.path().join("partial");
    std::fs::create_dir_all(partial.join("events")).unwrap();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let (ok, err) = run(iotpipe(&data).arg("restore").arg(&partial)).await;
    assert!(!ok && err.contains("not a complete backup"), "{err}");
    assert!(!data.exists());

    let (ok, err) = run(iotpipe(&data).arg("restore").arg(&backup)).await;
    assert!(ok, "{err}");
    assert!(err.contains("restore complete"), "{err}");
    // Restoring again into what is now a non-empty data directory is refused.
    let (ok, err) = run(iotpipe(&data).arg("restore").arg(&backup)).await;
    assert!(!ok && err.contains("not empty"), "{err}");

    let mut config = support::config(&data);
    config.admin_token = None;
    let server = support::start(config).await;
    assert_eq!(server.admin_token, admin, "the admin token is restored");
    let r = support::Api::new(&server);
    // The same user key works (the registry, hashed secrets included, is restored).
    assert_eq!(r.all_events(&key, &history).await, history_events);
    assert_eq!(r.get(&aggregates, &key).await.1, history_aggregates);
    let restored: Vec<String> = r
        .all_events(&key, &live)
        .await
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let unique: HashSet<String> = restored.iter().cloned().collect();
    assert_eq!(unique.len(), restored.len(), "no event twice");
    let missing: Vec<&String> = before.difference(&unique).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged events missing",
        missing.len()
    );
    // The rollups of the copy agree with its events (one snapshot holds both).
    let (s, v) = r
        .get(
            &format!(
                "/v1/devices/{live}/aggregates?from={}&to={}&window=1d",
                now_ms() - 86_400_000,
                now_ms() + 60_000
            ),
            &key,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let counted: u64 = v["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, restored.len() as u64);
    let (s, _) = r.get("/v1/devices", &key).await;
    assert_eq!(s, StatusCode::OK);
}

/// The endpoint behind `iotpipe backup` takes the admin token only, and names a bad
/// directory.
#[tokio::test]
async fn the_snapshot_endpoint_is_for_the_admin_and_checks_its_directory() {
    let t = TestServer::start().await;
    let (_, key) = t.user("someone").await;
    let body = json!({"dir": t.dir.path().join("snap")});
    for (secret, want) in [(key.as_str(), StatusCode::UNAUTHORIZED)] {
        let (s, _, _) = t
            .call(
                reqwest::Method::POST,
                "/v1/admin/snapshot",
                Some(secret),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, want);
    }
    for (dir, why) in [
        (json!("relative/dir"), "absolute"),
        (json!(t.dir.path()), "not empty"),
    ] {
        let (s, _, v) = t
            .call(
                reqwest::Method::POST,
                "/v1/admin/snapshot",
                Some(&t.admin),
                Some(json!({"dir": dir})),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(v["error"].as_str().unwrap().contains(why), "{v}");
        assert_eq!(v["field"], "dir", "{v}");
    }
    let (s, _, v) = t
        .call(
            reqwest::Method::POST,
            "/v1/admin/snapshot",
            Some(&t.admin),
            Some(body),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["keyspaces"]["events"].is_u64(), "{v}");
}
