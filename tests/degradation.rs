//! Production mode over HTTP: several instances sharing MariaDB and Redis, and what
//! happens when one backend goes away and comes back.
//!
//! Redis outages use a private `redis-server` on a free port (killed and restarted);
//! MariaDB outages cut a TCP proxy owned by the test; event store outages wrap the
//! embedded store in-process. The shared servers are never stopped.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::json;
use support::{free_port, start_redis, telemetry, Api, TestDb, MARIADB, REDIS};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn a_device_deleted_on_one_instance_is_refused_on_another_within_a_second() {
    let db = TestDb::create(MARIADB).await;
    let prefix = support::redis_prefix();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = support::config(dir_a.path());
    a.registry.url = Some(db.url.clone());
    a.live.redis_url = Some(REDIS.into());
    a.live.key_prefix = prefix.clone();
    // An hour: only the broadcast can make instance b forget in time.
    a.registry.cache_ttl_secs = 3600;
    let mut b = a.clone();
    b.data_dir = dir_b.path().to_owned();
    // Instance b also holds the device's MQTT connection.
    b.mqtt.addr = "127.0.0.1:0".into();
    let admin = a.admin_token.clone().unwrap();
    let (a, b) = (support::start(a).await, support::start(b).await);
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));

    let key = api_a.user_key().await;
    let (id, token) = api_a.device(&key, "d").await;
    // Warm instance b's cache for the token and the device's owner.
    let (s, v) = api_b.ingest(&token, telemetry(2)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        api_b.get(&format!("/v1/devices/{id}/live"), &key).await.0,
        200
    );
    let mut device = support::Device::connect(b.mqtt_addr.unwrap(), &id, &token);
    device.connected().await;
    let health = api_b.health().await;
    assert_eq!(health["components"]["live"]["backend"], "redis");
    assert_eq!(health["status"], "ok", "{health}");

    // Both instances are subscribed before the delete.
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{prefix}device-deleted");
    let subscribed = wait_until(Duration::from_secs(5), || {
        let mut conn = conn.clone();
        let channel = channel.clone();
        async move {
            let (_, n): (String, i64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut conn)
                .await
                .unwrap();
            n >= 2
        }
    })
    .await;
    assert!(subscribed);
    let _ = &mut conn;

    api_a.delete_device(&key, &id).await;
    let deleted_at = Instant::now();
    let refused = wait_until(Duration::from_secs(1), || async {
        api_b.ingest(&token, telemetry(1)).await.0 == 401
    })
    .await;
    assert!(
        refused,
        "instance b still took the token after {:?}",
        deleted_at.elapsed()
    );
    // A user key rotated on a is refused on b within a second too.
    let (s, created) = api_a
        .post(
            "/v1/users",
            &admin,
            json!({"username": "rot", "email": "r@x.y"}),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let (uid, old_key) = (
        created["id"].as_i64().unwrap(),
        created["api_key"].as_str().unwrap().to_owned(),
    );
    assert_eq!(
        api_b.get("/v1/devices", &old_key).await.0,
        200,
        "b caches the old key"
    );
    let (s, _) = api_a
        .post(&format!("/v1/users/{uid}/rotate-key"), &old_key, json!({}))
        .await;
    assert_eq!(s, 200);
    let rotated_at = Instant::now();
    let refused = wait_until(Duration::from_secs(1), || async {
        api_b.get("/v1/devices", &old_key).await.0 == 401
    })
    .await;
    assert!(
        refused,
        "b still took the old key after {:?}",
        rotated_at.elapsed()
    );
    // And its open MQTT connection is closed, although credentials are checked only
    // at CONNECT.
    device.closed().await;
    assert!(
        deleted_at.elapsed() < Duration::from_secs(1),
        "MQTT connection on b closed after {:?}",
        deleted_at.elapsed()
    );
    assert_eq!(
        api_b.get(&format!("/v1/devices/{id}/events"), &key).await.0,
        404
    );
    a.stop().await;
    b.stop().await;
    support::clear_redis(REDIS, &prefix).await;
}

#[tokio::test]
async fn with_redis_down_ingest_continues_locally_and_counts_catch_up_when_it_returns() {
    let port = free_port();
    let redis_proc = start_redis(port).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.live.redis_url = Some(format!("redis://127.0.0.1:{port}/0"));
    config.live.key_prefix = support::redis_prefix();
    let server = support::start(config).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    let (id, token) = api.device(&key, "d").await;
    let live_path = format!("/v1/devices/{id}/live");

    assert_eq!(api.ingest(&token, telemetry(5)).await.0, 200);
    assert_eq!(api.get(&live_path, &key).await.1["events_total"], 5);
    assert_eq!(api.health().await["status"], "ok");

    drop(redis_proc);
    let started = Instant::now();
    let (s, v) = api.ingest(&token, telemetry(7)).await;
    assert_eq!(s, 200, "ingest goes on without Redis: {v}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let health = api.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["components"]["live"]["ok"], false);
    assert_eq!(health["components"]["store"]["ok"], true);
    // Meanwhile the live figures are this instance's local view of the gap.
    let (s, live) = api.get(&live_path, &key).await;
    assert_eq!(s, 200);
    assert_eq!(live["events_total"], 7, "{live}");
    // Local limits still apply: a 2000-event request puts the device (1000/s) in debt.
    assert_eq!(api.ingest(&token, telemetry(2000)).await.0, 200);
    let (s, headers, v) = api
        .ingest_raw(&token, Some("application/json"), telemetry(1).to_string())
        .await;
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["limit"], "device");
    assert!(headers.contains_key("retry-after"));

    // Redis returns empty (no persistence): the backlog is pushed, then shared again.
    let _redis_proc = start_redis(port).await;
    let back = wait_until(Duration::from_secs(10), || async {
        api.health().await["status"] == "ok"
    })
    .await;
    assert!(back, "health is ok again once Redis answers");
    let (_, live) = api.get(&live_path, &key).await;
    assert_eq!(
        live["events_total"], 2007,
        "the gap's counts were pushed: {live}"
    );
    assert_eq!(live["rejected_total"], 1, "{live}");
    assert_eq!(live["events_last_minute"], 2007, "{live}");
    assert!(live["last_seen"].is_string());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(api.ingest(&token, telemetry(1)).await.0, 200);
    assert_eq!(api.get(&live_path, &key).await.1["events_total"], 2008);
    server.stop().await;
}

/// A TCP forwarder the test can cut: existing connections are dropped and new ones
/// are closed at once, as when a database host disappears.
struct CuttableProxy {
    port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl CuttableProxy {
    async fn start(upstream: u16) -> CuttableProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (cut, links) = (cut.clone(), links.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    links.lock().push(tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            })
        };
        CuttableProxy {
            port,
            cut,
            links,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn with_mysql_down_known_devices_keep_ingesting_and_registry_writes_answer_503() {
    let db = TestDb::create(MARIADB).await;
    let proxy = CuttableProxy::start(3306).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.registry.url = Some(format!("mysql://root@127.0.0.1:{}/{}", proxy.port, db.name));
    // Short, so that the outage outlasts the freshness of every cached answer, and
    // then how long stale answers may be served.
    config.registry.cache_ttl_secs = 1;
    config.registry.stale_limit_secs = 4;
    let admin = config.admin_token.clone().unwrap();
    let server = support::start(config).await;
    let api = Api::new(&server);
    let key = api.user_key().await;
    let (id, token) = api.device(&key, "d").await;
    assert_eq!(api.ingest(&token, telemetry(3)).await.0, 200);
    assert_eq!(
        api.get(&format!("/v1/devices/{id}/events"), &key).await.0,
        200
    );

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Known device, stale cache: still ingesting.
    let (s, v) = api.ingest(&token, telemetry(4)).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = api
        .get(&format!("/v1/devices/{id}/events?limit=100"), &key)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["events"].as_array().unwrap().len(), 7);
    // Registry writes cannot be served.
    let (s, headers, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/devices",
            Some(&key),
            Some(json!({"name": "n", "type": "t"})),
        )
        .await;
    assert_eq!(s, 503, "{v}");
    assert!(headers.contains_key("retry-after"));
    assert!(v["error"].is_string());
    let (s, _, _) = api
        .call(
            reqwest::Method::POST,
            "/v1/users",
            Some(&admin),
            Some(json!({"username": "x", "email": "a@b.c"})),
        )
        .await;
    assert_eq!(s, 503);
    // An unknown secret cannot be checked either: 503, not 401.
    let (s, _) = api
        .ingest(
            "ipd_unknownunknownunknownunknownunknownunknow",
            telemetry(1),
        )
        .await;
    assert_eq!(s, 503);
    let health = api.health().await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["components"]["registry"]["ok"], false);
    // Past the stale limit, even a known device cannot be vouched for: 503.
    let expired = wait_until(Duration::from_secs(8), || async {
        api.ingest(&token, telemetry(1)).await.0 == 503
    })
    .await;
    assert!(
        expired,
        "stale answers served past registry.stale_limit_secs"
    );

    proxy.restore();
    let back = wait_until(Duration::from_secs(10), || async {
        api.post("/v1/devices", &key, json!({"name": "n", "type": "t"}))
            .await
            .0
            == 201
    })
    .await;
    assert!(back, "registry writes work again once MySQL is back");
    assert_eq!(api.health().await["status"], "ok");
    server.stop().await;
}

// The store-down case (503 + Retry-After, health "down", resumes by itself) is
// covered in tests/ops_and_failures.rs.
