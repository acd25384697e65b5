//! Live totals recomputed from the event store: at start-up with in-process figures
//! (a restarted embedded server shows the totals it showed before), and by `iotpipe
//! rebuild-live` into Redis after its keys were lost (Cassandra, MariaDB and Redis;
//! never skipped).

mod prod_support;

use iotpipe::config::StoreConfig;
use iotpipe::model::now_ms;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::topology::Server;
use prod_support::{Api, TestDb};
use reqwest::Method;
use serde_json::{json, Value};
use uuid::Uuid;

struct Fleet {
    key: String,
    devices: Vec<String>,
}

/// Two devices with events (duplicates among them, counted once), and a third
/// deleted without a purge: its events stay, and so does their share of the user's
/// total.
async fn populate(server: &Server, api: &Api) -> Fleet {
    let key = api.user(&server.admin_token).await;
    let mut devices = Vec::new();
    for n in [30usize, 7, 12] {
        let (id, token) = api.device(&key).await;
        let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
        let body: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| json!({"id": id, "ts": now_ms() - 3_600_000 + i as i64 * 1000, "type": "t"}))
            .collect();
        for _ in 0..2 {
            let (s, v, _) = api
                .call(Method::POST, "/v1/ingest", &token, Some(json!(body)))
                .await;
            assert_eq!(s, 200, "{v}");
        }
        devices.push(id);
    }
    let (s, _, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/devices/{}", devices[2]),
            &key,
            None,
        )
        .await;
    assert_eq!(s, 204);
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
    let mut config = prod_support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = prod_support::start(config.clone()).await;
    let api = Api::new(&server);
    let f = populate(&server, &api).await;
    let before = figures(&api, &f).await;
    assert_eq!(before, (49, vec![(30, true), (7, true)]));
    server.stop().await;

    let server = prod_support::start(config.clone()).await;
    let api = Api::new(&server);
    assert_eq!(figures(&api, &f).await, before);
    // And counting goes on from there.
    let (_, token) = api.device(&f.key).await;
    let (s, _, _) = api.ingest(&token, 3).await;
    assert_eq!(s, 200);
    assert_eq!(figures(&api, &f).await.0, 52);
    server.stop().await;

    // The command has nothing to do without Redis, and says why.
    let out = prod_support::command(&config)
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
    let db = TestDb::create(prod_support::MARIADB).await;
    let prefix = prod_support::redis_prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut config = prod_support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    config.store = StoreConfig {
        scylla_nodes: Some("127.0.0.1:9042".into()),
        keyspace: format!("iotpipe_live_{}", prod_support::random_name()),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: "ONE".into(),
        ..StoreConfig::default()
    };
    config.registry.url = Some(db.url.clone());
    config.live.redis_url = Some(prod_support::REDIS.into());
    config.live.key_prefix = prefix.clone();
    let settings =
        ScyllaSettings::from_config(&config.store, config.pipeline.bucket_len_ms).unwrap();
    ScyllaStore::migrate(&settings)
        .await
        .expect("the Cassandra node of scripts/deps answers at 127.0.0.1:9042");
    let server = prod_support::start(config.clone()).await;
    let api = Api::new(&server);
    let f = populate(&server, &api).await;
    let before = figures(&api, &f).await;
    assert_eq!(before, (49, vec![(30, true), (7, true)]));

    // Redis loses everything; the server keeps running.
    prod_support::clear_redis(prod_support::REDIS, &prefix).await;
    assert_eq!(figures(&api, &f).await, (0, vec![(0, false), (0, false)]));

    let out = prod_support::command(&config)
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
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node("127.0.0.1:9042")
        .build()
        .await
        .unwrap();
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", settings.keyspace), ())
        .await
        .unwrap();
    prod_support::clear_redis(prod_support::REDIS, &prefix).await;
}
