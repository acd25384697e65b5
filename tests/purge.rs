//! `DELETE /v1/devices/{id}?purge=true` over real HTTP, on the embedded backends
//! (fjall, SQLite, in-process live figures) and on the production ones (Apache
//! Cassandra at 127.0.0.1:9042, MariaDB, Redis; never skipped: a missing service
//! fails the test). After a purge the device's events, rollups at every level, fleet
//! rows and latest values are gone from the store and its live figures from the live
//! backend, while another device of the same user keeps all of its own.

mod support;

use std::time::Duration;

use iotpipe::model::now_ms;
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::scylla::ScyllaStore;
use iotpipe::store::{EventStore, FleetQuery, Level, ListQuery, RollupQuery};
use iotpipe::topology::Server;
use iotpipe::Config;
use reqwest::Method;
use serde_json::{json, Value};
use support::{Api, Production};
use uuid::Uuid;

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

struct Fixture {
    api: Api,
    key: String,
    user: i64,
    purged: Uuid,
    kept: Uuid,
    /// Events stored per device.
    events: u64,
    from: i64,
}

/// Events over three days, so that several days, hours and buckets hold rollups; a
/// third with server-assigned ids, a third with random ids (duplicate-index rows), a
/// third with UUIDv7 ids of another time (timed index rows).
fn events(from: i64) -> Vec<Value> {
    (0..300i64)
        .map(|i| {
            let mut e = json!({
                "ts": from + i * 15 * 60_000,
                "type": if i % 4 == 0 { "alarm" } else { "reading" },
                "metrics": {"temp": i as f64},
            });
            match i % 3 {
                1 => e["id"] = json!(Uuid::new_v4()),
                2 => e["id"] = json!(Uuid::now_v7()),
                _ => {}
            }
            e
        })
        .collect()
}

async fn populate(server: &Server) -> Fixture {
    let api = Api::new(server);
    let (user, key) = api.user(&format!("u{}", support::random_name())).await;
    let (purged, purged_token) = api.device(&key, "purged").await;
    let (kept, kept_token) = api.device(&key, "kept").await;
    let from = (now_ms() - 4 * DAY).div_euclid(DAY) * DAY + 7 * HOUR;
    for token in [&purged_token, &kept_token] {
        api.ingest_ok(token, json!(events(from))).await;
    }
    Fixture {
        api,
        key,
        user,
        purged: purged.parse().unwrap(),
        kept: kept.parse().unwrap(),
        events: 300,
        from,
    }
}

async fn user_total(f: &Fixture) -> u64 {
    let (s, v) = f.api.get("/v1/live", &f.key).await;
    assert_eq!(s, 200, "{v}");
    v["events_total"].as_u64().unwrap()
}

/// Purges through the API and checks what the API shows.
async fn purge(f: &Fixture) {
    assert_eq!(user_total(f).await, 2 * f.events);
    let path = format!("/v1/devices/{}", f.purged);
    // A bad value is refused, naming the parameter, and deletes nothing.
    let (s, _, v) = f
        .api
        .call(
            Method::DELETE,
            &format!("{path}?purge=yes"),
            Some(&f.key),
            None,
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("purge"), "{v}");
    let (s, _) = f.api.get(&path, &f.key).await;
    assert_eq!(s, 200, "the device survives a refused delete");

    let (s, _, v) = f
        .api
        .call(
            Method::DELETE,
            &format!("{path}?purge=true"),
            Some(&f.key),
            None,
        )
        .await;
    assert_eq!(s, 204, "{v}");
    let (s, _) = f.api.get(&path, &f.key).await;
    assert_eq!(s, 404);
    // Its events left the user's live total; the other device's stayed.
    assert_eq!(user_total(f).await, f.events);
    let (s, v) = f
        .api
        .get(&format!("/v1/devices/{}/live", f.kept), &f.key)
        .await;
    assert_eq!(
        (s.as_u16(), v["events_total"].as_u64()),
        (200, Some(f.events)),
        "{v}"
    );
    // Nothing is left, so a second purge finds nothing.
    let (s, _, _) = f
        .api
        .call(
            Method::DELETE,
            &format!("{path}?purge=true"),
            Some(&f.key),
            None,
        )
        .await;
    assert_eq!(s, 404);
}

async fn count_rollups(store: &dyn EventStore, f: &Fixture, device: Uuid, level: Level) -> u64 {
    let rows = store
        .rollups(RollupQuery {
            user_id: f.user,
            device_id: device,
            level,
            from_ms: f.from - DAY,
            to_ms: f.from + 5 * DAY,
            metric: Some("temp".into()),
            kind: None,
        })
        .await
        .unwrap()
        .unwrap_or_default();
    rows.iter().map(|r| r.summary.count).sum()
}

async fn list(store: &dyn EventStore, f: &Fixture, device: Uuid) -> usize {
    store
        .list(ListQuery {
            user_id: f.user,
            device_id: device,
            from_ms: f.from - DAY,
            to_ms: f.from + 5 * DAY,
            before: None,
            kind: None,
            limit: 10_000,
        })
        .await
        .unwrap()
        .len()
}

/// What the store holds: nothing of the purged device, everything of the kept one.
async fn assert_store(store: &dyn EventStore, f: &Fixture) {
    assert_eq!(list(store, f, f.purged).await, 0);
    assert_eq!(list(store, f, f.kept).await as u64, f.events);
    for level in [Level::Minute, Level::Hour, Level::Day] {
        assert_eq!(
            count_rollups(store, f, f.purged, level).await,
            0,
            "{level:?}"
        );
        assert_eq!(
            count_rollups(store, f, f.kept, level).await,
            f.events,
            "{level:?}"
        );
    }
    // By type, and as each device's totals (which the wide-column store keeps apart).
    for (level, by_type) in [Level::Hour, Level::Day]
        .into_iter()
        .flat_map(|l| [(l, true), (l, false)])
    {
        let fleet = store
            .fleet_counts(FleetQuery {
                user_id: f.user,
                level,
                from_ms: (f.from - DAY).div_euclid(DAY) * DAY,
                to_ms: (f.from + 5 * DAY).div_euclid(DAY) * DAY,
                kind: None,
                by_type,
            })
            .await
            .unwrap();
        if let Some(rows) = fleet {
            let why = format!("{level:?}, by type: {by_type}");
            assert!(rows.iter().all(|r| r.device_id != f.purged), "{why}");
            let kept: u64 = rows
                .iter()
                .filter(|r| r.device_id == f.kept)
                .map(|r| r.count)
                .sum();
            assert_eq!(kept, f.events, "{why}");
        }
    }
    assert!(store
        .latest(f.user, Some(f.purged))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(store.latest(f.user, Some(f.kept)).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_the_embedded_backends() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config.clone()).await;
    let f = populate(&server).await;
    purge(&f).await;
    server.stop().await;
    let store =
        EmbeddedStore::open(&dir.path().join("events"), config.pipeline.bucket_len_ms).unwrap();
    assert_store(&store, &f).await;
}

/// A plain delete keeps the events (they are no longer served); a purge sent later
/// for the same id still removes them, since they are the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_delete_keeps_the_events_and_a_later_purge_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let server = support::start(config.clone()).await;
    let f = populate(&server).await;
    let path = format!("/v1/devices/{}", f.purged);
    let (s, _, _) = f.api.call(Method::DELETE, &path, Some(&f.key), None).await;
    assert_eq!(s, 204);
    // Another user cannot purge what is not theirs: nothing of theirs is there.
    let other = f.api.user_key().await;
    let (s, _, _) = f
        .api
        .call(
            Method::DELETE,
            &format!("{path}?purge=true"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(s, 404);
    server.stop().await;
    {
        let store =
            EmbeddedStore::open(&dir.path().join("events"), config.pipeline.bucket_len_ms).unwrap();
        assert_eq!(
            list(&store, &f, f.purged).await as u64,
            f.events,
            "a plain delete keeps events"
        );
        store.close().await.unwrap();
    }
    let server = support::start(config.clone()).await;
    let f = Fixture {
        api: Api::new(&server),
        ..f
    };
    let (s, _, _) = f
        .api
        .call(
            Method::DELETE,
            &format!("{path}?purge=true"),
            Some(&f.key),
            None,
        )
        .await;
    assert_eq!(s, 204);
    server.stop().await;
    let store =
        EmbeddedStore::open(&dir.path().join("events"), config.pipeline.bucket_len_ms).unwrap();
    assert_store(&store, &f).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_on_cassandra_mariadb_and_redis() {
    let backends = Production::new("purge").await;
    let prefix = backends.prefix.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut config: Config = support::config(dir.path());
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    let settings = backends.apply(&mut config).await;
    let server = support::start(config.clone()).await;
    let f = populate(&server).await;

    // The rollups are recomputed in the background, once a minute has been quiet for a
    // second: the gauge counts the minutes still to do, and at 0 both devices have
    // their rows at every level, so that the purge has rows to remove.
    let backlog = |page: String| support::metric(&page, "iotpipe_rollup_backlog");
    assert!(
        backlog(f.api.metrics().await) > 0.0,
        "the last flush's minutes wait"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while backlog(f.api.metrics().await) > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollups never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let store = ScyllaStore::connect(settings.clone()).await.unwrap();
    for device in [f.purged, f.kept] {
        for level in [Level::Minute, Level::Hour, Level::Day] {
            assert_eq!(count_rollups(&store, &f, device, level).await, f.events);
        }
    }
    let redis = redis::Client::open(support::REDIS).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let device_key = format!("{prefix}d:{}", f.purged);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&device_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(exists);

    purge(&f).await;
    server.stop().await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&device_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!exists, "the purged device's live hash is gone from Redis");
    let seen: Option<f64> = redis::cmd("ZSCORE")
        .arg(format!("{prefix}seen"))
        .arg(f.purged.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(seen, None);

    assert_store(&store, &f).await;
    // The tables read by no trait method: the id index and the bucket index.
    let session = support::cassandra_session().await;
    let ks = &settings.keyspace;
    for table in [
        "event_ids",
        "buckets",
        "pending_by_device",
        "pending_by_user",
    ] {
        let rows = session
            .query_unpaged(format!("SELECT device_id FROM {ks}.{table}"), ())
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        let devices: Vec<Uuid> = rows
            .rows::<(Uuid,)>()
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect();
        assert!(
            !devices.contains(&f.purged),
            "{table} still holds the purged device"
        );
        if !table.starts_with("pending") {
            assert!(devices.contains(&f.kept), "{table} lost the kept device");
        }
    }
    backends.cleanup().await;
}
