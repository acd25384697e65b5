//! Live totals recomputed from the event store: at start-up with in-process figures
//! (a restarted embedded server shows the totals it showed before), and by `iotpipe
//! rebuild-live` into Redis after its keys were lost (Cassandra, MariaDB and Redis;
//! never skipped).

mod support;

use iotpipe::model::now_ms;
use support::{events, telemetry, Api, Production};

struct Fleet {
    key: String,
    devices: Vec<String>,
}

/// Two devices with events (each batch sent twice: counted once), and a third
/// deleted without a purge: its events stay, and so does their share of the user's
/// total.
async fn populate(api: &Api) -> Fleet {
    let from = now_ms() - 3_600_000;
    let (key, devices) = api
        .fleet(&[30, 7, 12], true, |n| events(n, from, 1000))
        .await;
    api.delete_device(&key, &devices[2]).await;
    Fleet { key, devices }
}

/// (user total, each live device's total, whether each has a last seen).
async fn figures(api: &Api, f: &Fleet) -> (u64, Vec<(u64, bool)>) {
    let (s, user) = api.get("/v1/live", &f.key).await;
    assert_eq!(s, 200, "{user}");
    let mut devices = Vec::new();
    for d in &f.devices[..2] {
        let (s, v) = api.get(&format!("/v1/devices/{d}/live"), &f.key).await;
        assert_eq!(s, 200, "{v}");
        devices.push((
            v["events_total"].as_u64().unwrap(),
            v["last_seen"].is_string(),
        ));
    }
    (user["events_total"].as_u64().unwrap(), devices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_embedded_server_shows_the_same_totals() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config.clone()).await;
    let api = Api::new(&server);
    let f = populate(&api).await;
    let before = figures(&api, &f).await;
    assert_eq!(before, (49, vec![(30, true), (7, true)]));
    server.stop().await;

    let server = support::start(config.clone()).await;
    let api = Api::new(&server);
    assert_eq!(figures(&api, &f).await, before);
    // And counting goes on from there.
    let (_, token) = api.device(&f.key, "d").await;
    let (s, _) = api.ingest(&token, telemetry(3)).await;
    assert_eq!(s, 200);
    assert_eq!(figures(&api, &f).await.0, 52);
    server.stop().await;

    // The command has nothing to do without Redis, and says why.
    let out = support::ops_command(&config)
        .arg("rebuild-live")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("recomputes them from the store at every start-up"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_live_restores_redis_totals_from_cassandra() {
    let backends = Production::new("live").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    backends.apply(&mut config).await;
    let server = support::start(config.clone()).await;
    let api = Api::new(&server);
    let f = populate(&api).await;
    let before = figures(&api, &f).await;
    assert_eq!(before, (49, vec![(30, true), (7, true)]));

    // Redis loses everything; the server keeps running.
    support::clear_redis(support::REDIS, &backends.prefix).await;
    assert_eq!(figures(&api, &f).await, (0, vec![(0, false), (0, false)]));

    let out = support::ops_command(&config)
        .arg("rebuild-live")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("rebuilt the live totals of 3 devices of 1 users (49 events)"),
        "{err}"
    );
    assert_eq!(figures(&api, &f).await, before);

    server.stop().await;
    backends.cleanup().await;
}
