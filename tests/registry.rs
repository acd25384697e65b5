//! One registry behaviour suite, run against SQLite and against the real MariaDB of
//! this machine (a fresh database per run), plus the MySQL-backed HTTP API.

mod support;

use iotpipe::registry::mysql::MySqlRegistry;
use iotpipe::registry::sqlite::SqliteRegistry;
use iotpipe::registry::{Registry, RegistryError};
use serde_json::json;
use support::{telemetry, Api, TestDb, MARIADB};
use uuid::Uuid;

/// What every registry backend must do.
async fn registry_behaves(reg: &dyn Registry) {
    reg.ping().await.expect("ping");
    let alice = reg
        .create_user("alice", "a@x.io", "ka", 1_000)
        .await
        .unwrap();
    let bob = reg.create_user("bob", "b@x.io", "kb", 2_000).await.unwrap();
    assert_ne!(alice.id, bob.id);
    assert_eq!(alice.username, "alice");
    assert_eq!(alice.created_at_ms, 1_000);
    assert!(matches!(
        reg.create_user("alice", "other@x.io", "kc", 3_000).await,
        Err(RegistryError::Conflict(_))
    ));
    assert_eq!(reg.user_by_key("ka").await.unwrap(), Some(alice.id));
    assert_eq!(reg.user_by_key("kb").await.unwrap(), Some(bob.id));
    assert_eq!(reg.user_by_key("nope").await.unwrap(), None);
    // A rotated key: the old hash comes back, and only the new one finds the user.
    assert_eq!(
        reg.rotate_user_key(bob.id, "kb2").await.unwrap().as_deref(),
        Some("kb")
    );
    assert_eq!(reg.user_by_key("kb").await.unwrap(), None);
    assert_eq!(reg.user_by_key("kb2").await.unwrap(), Some(bob.id));
    assert_eq!(
        reg.rotate_user_key(bob.id + 1_000_000, "x").await.unwrap(),
        None
    );

    let d1 = reg
        .create_device(alice.id, "one", "sensor", "t1", 10)
        .await
        .unwrap();
    let d2 = reg
        .create_device(alice.id, "two", "gw", "t2", 20)
        .await
        .unwrap();
    let d3 = reg
        .create_device(bob.id, "three", "sensor", "t3", 15)
        .await
        .unwrap();
    assert_eq!(d1.user_id, alice.id);
    assert_eq!(reg.device_by_token("t2").await.unwrap(), Some(d2.clone()));
    assert_eq!(reg.device_by_token("t9").await.unwrap(), None);
    assert_eq!(reg.device(d3.id).await.unwrap(), Some(d3.clone()));
    assert_eq!(reg.device(Uuid::new_v4()).await.unwrap(), None);
    // Oldest first, and only the user's own.
    assert_eq!(
        reg.devices(alice.id).await.unwrap(),
        vec![d1.clone(), d2.clone()]
    );
    assert_eq!(reg.devices(bob.id).await.unwrap(), vec![d3.clone()]);
    assert_eq!(reg.devices(9_999_999).await.unwrap(), vec![]);

    // Another user's device cannot be deleted, and stays.
    assert_eq!(reg.delete_device(bob.id, d1.id).await.unwrap(), None);
    assert!(reg.device(d1.id).await.unwrap().is_some());
    // The owner's delete returns the token hash, once.
    assert_eq!(
        reg.delete_device(alice.id, d1.id).await.unwrap(),
        Some("t1".into())
    );
    assert_eq!(reg.delete_device(alice.id, d1.id).await.unwrap(), None);
    assert_eq!(reg.device(d1.id).await.unwrap(), None);
    assert_eq!(reg.device_by_token("t1").await.unwrap(), None);
    assert_eq!(reg.devices(alice.id).await.unwrap(), vec![d2]);
}

#[tokio::test]
async fn sqlite_registry_passes_the_shared_suite() {
    let dir = tempfile::tempdir().unwrap();
    let reg = SqliteRegistry::connect(&SqliteRegistry::default_url(dir.path()))
        .await
        .unwrap();
    reg.migrate().await.unwrap();
    registry_behaves(&reg).await;
}

#[tokio::test]
async fn mysql_registry_passes_the_shared_suite() {
    let db = TestDb::create(MARIADB).await;
    let reg = MySqlRegistry::connect(&db.url).await.unwrap();
    reg.migrate().await.unwrap();
    // Applying again is a no-op, as at every `serve` start.
    reg.migrate().await.unwrap();
    registry_behaves(&reg).await;
    reg.close().await;
}

#[tokio::test]
async fn mysql_registry_reports_an_unreachable_server_as_unavailable() {
    let port = support::free_port();
    let reg = MySqlRegistry::connect_lazy(&format!("mysql://root@127.0.0.1:{port}/x")).unwrap();
    assert!(matches!(
        reg.ping().await,
        Err(RegistryError::Unavailable(_))
    ));
    assert!(matches!(
        reg.create_user("u", "e@x", "k", 1).await,
        Err(RegistryError::Unavailable(_))
    ));
}

#[tokio::test]
async fn the_http_api_works_on_a_mysql_registry() {
    let db = TestDb::create(MARIADB).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.registry.url = Some(db.url.clone());
    let admin = config.admin_token.clone().unwrap();
    let server = support::start(config).await;
    let api = Api::new(&server);

    let health = api.health().await;
    assert_eq!(health["components"]["registry"]["backend"], "mysql");
    assert_eq!(health["components"]["registry"]["ok"], true);

    let key = api.user_key().await;
    let (s, v) = api
        .post(
            "/v1/users",
            &admin,
            json!({"username": "dup", "email": "a@b.c"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = api
        .post(
            "/v1/users",
            &admin,
            json!({"username": "dup", "email": "a@b.c"}),
        )
        .await;
    assert_eq!(s, 409);

    let (id, token) = api.device(&key, "d").await;
    let (s, v) = api.ingest(&token, telemetry(3)).await;
    assert_eq!((s.as_u16(), v["accepted"].as_u64()), (200, Some(3)), "{v}");
    let (s, v) = api.get(&format!("/v1/devices/{id}/events"), &key).await;
    assert_eq!(s, 200);
    assert_eq!(v["events"].as_array().unwrap().len(), 3);
    let (s, v) = api.get("/v1/devices", &key).await;
    assert_eq!(s, 200);
    assert_eq!(v["devices"][0]["id"], id.as_str());

    api.delete_device(&key, &id).await;
    let (s, _) = api.ingest(&token, telemetry(1)).await;
    assert_eq!(s, 401);
    let (s, _) = api.get(&format!("/v1/devices/{id}"), &key).await;
    assert_eq!(s, 404);
    server.stop().await;
}

#[tokio::test]
async fn iotpipe_migrate_creates_the_mysql_tables() {
    let db = TestDb::create(MARIADB).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.registry.url = Some(db.url.clone());
    iotpipe::topology::migrate(&config).await.expect("migrate");
    let reg = MySqlRegistry::connect(&db.url).await.unwrap();
    // The tables exist and work without `serve` having run.
    let user = reg.create_user("m", "m@x.io", "km", 1).await.unwrap();
    assert_eq!(reg.user_by_key("km").await.unwrap(), Some(user.id));
    // And a second migrate (as at `serve` start) keeps the data.
    iotpipe::topology::migrate(&config)
        .await
        .expect("migrate again");
    assert_eq!(reg.user_by_key("km").await.unwrap(), Some(user.id));
    reg.close().await;
}
