//! `iotpipe check [--repair]` against an embedded store with Redis live figures, and
//! against Cassandra + MariaDB + Redis (never skipped), each disagreement made on
//! purpose: events of a device deleted without a purge, a duplicate-index row without
//! its event, rollup rows removed, and a live total changed in Redis. Each is found
//! (non-zero exit, counted), the repairable ones are repaired, and a second run is
//! clean.

mod support;

use std::process::Output;

use fjall::{KeyspaceCreateOptions, PersistMode};
use iotpipe::model::now_ms;
use iotpipe::store::scylla::ScyllaStore;
use iotpipe::Config;
use support::{events, Api, Production};
use uuid::Uuid;

fn check(config: &Config, repair: bool) -> (bool, String) {
    let mut cmd = support::ops_command(config);
    cmd.arg("check");
    if repair {
        cmd.arg("--repair");
    }
    let Output { status, stderr, .. } = cmd.output().unwrap();
    (
        status.success(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// The line of one finding in the report.
fn line<'a>(report: &'a str, what: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no {what:?} in {report}"))
}

/// A user with two devices with events two days old (their days' rollups are
/// complete), and a third device, with events, deleted without a purge. Returns
/// (user key, kept device ids, deleted device id).
async fn populate(api: &Api) -> (String, Vec<String>, String) {
    let from = now_ms() - 2 * 86_400_000;
    let (key, mut devices) = api
        .fleet(&[40, 25, 10], false, |n| events(n, from, 60_000))
        .await;
    let deleted = devices.pop().unwrap();
    api.delete_device(&key, &deleted).await;
    (key, devices, deleted)
}

async fn set_live_total(prefix: &str, device: &str, events: u64) {
    let client = redis::Client::open(support::REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}d:{device}"))
        .arg("events")
        .arg(events)
        .query_async(&mut conn)
        .await
        .unwrap();
}

fn base_config(dir: &std::path::Path, prefix: &str) -> Config {
    let mut config = support::config(dir);
    config.limits.device_per_sec = 0;
    config.limits.user_per_sec = 0;
    config.live.redis_url = Some(support::REDIS.into());
    config.live.key_prefix = prefix.to_owned();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_and_repairs_each_disagreement_on_the_embedded_store() {
    let prefix = support::redis_prefix();
    let dir = tempfile::tempdir().unwrap();
    let config = base_config(dir.path(), &prefix);
    let server = support::start(config.clone()).await;
    let api = Api::new(&server);
    let (_, kept, deleted) = populate(&api).await;
    server.stop().await;

    // Only the deleted device's events disagree so far (a plain delete keeps them).
    let (ok, report) = check(&config, false);
    assert!(!ok, "the deleted device's events are a finding: {report}");
    assert!(line(&report, "no registry row").contains(": 1"), "{report}");
    assert!(
        line(&report, "no registry row").contains(&deleted),
        "{report}"
    );
    assert!(
        line(&report, "rollups that differ").starts_with("ok"),
        "{report}"
    );
    assert!(line(&report, "live totals").starts_with("ok"), "{report}");
    assert!(
        line(&report, "duplicate-index").starts_with("ok"),
        "{report}"
    );

    // Corrupt: an index row whose event does not exist, and a live total.
    {
        let db = fjall::Database::builder(dir.path().join("events"))
            .open()
            .unwrap();
        let ids = db.keyspace("ids", KeyspaceCreateOptions::default).unwrap();
        let mut key = Uuid::new_v4().as_bytes().to_vec();
        key.extend_from_slice(Uuid::parse_str(&kept[0]).unwrap().as_bytes());
        ids.insert(key, ((now_ms() as u64) ^ (1 << 63)).to_be_bytes())
            .unwrap();
        db.persist(PersistMode::SyncAll).unwrap();
    }
    set_live_total(&prefix, &kept[1], 999).await;
    let (ok, report) = check(&config, false);
    assert!(!ok);
    assert!(line(&report, "duplicate-index").contains(": 1"), "{report}");
    assert!(line(&report, "live totals").contains(&kept[1]), "{report}");

    let (ok, report) = check(&config, true);
    assert!(!ok, "found is non-zero even when repaired: {report}");
    assert!(
        line(&report, "duplicate-index").contains("repaired"),
        "{report}"
    );
    assert!(
        line(&report, "no registry row").contains("repaired"),
        "{report}"
    );
    let (ok, report) = check(&config, false);
    assert!(ok, "clean after the repair: {report}");
    assert!(report.contains("0 disagreements"), "{report}");

    // Corrupt the hour and day rollups: found, and not "repaired".
    {
        let db = fjall::Database::builder(dir.path().join("events"))
            .open()
            .unwrap();
        let coarse = db
            .keyspace("rollups_coarse", KeyspaceCreateOptions::default)
            .unwrap();
        let keys: Vec<_> = coarse.iter().map(|kv| kv.key().unwrap()).collect();
        assert!(!keys.is_empty());
        for k in keys {
            coarse.remove(k).unwrap();
        }
        db.persist(PersistMode::SyncAll).unwrap();
    }
    let (ok, report) = check(&config, true);
    assert!(!ok);
    let rollups = line(&report, "rollups that differ");
    assert!(
        rollups.starts_with("FOUND") && !rollups.contains("repaired"),
        "{report}"
    );
    assert!(
        rollups.contains(&kept[0]) || rollups.contains(&kept[1]),
        "{report}"
    );
    support::clear_redis(support::REDIS, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_and_repairs_on_cassandra_mariadb_and_redis() {
    let backends = Production::new("check").await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = base_config(dir.path(), &backends.prefix);
    let settings = backends.apply(&mut config).await;
    let server = support::start(config.clone()).await;
    let api = Api::new(&server);
    let (_, kept, deleted) = populate(&api).await;
    // Wait for the background rollups, then stop: the check runs beside a cluster.
    let store = ScyllaStore::connect(settings.clone()).await.unwrap();
    store.settle().await;
    server.stop().await;
    store.sweep().await.unwrap();

    let session = support::cassandra_session().await;
    let ks = &settings.keyspace;
    let orphan = Uuid::new_v4();
    session
        .query_unpaged(
            format!("INSERT INTO {ks}.event_ids (device_id, event_id, ts) VALUES (?, ?, ?)"),
            (
                Uuid::parse_str(&kept[0]).unwrap(),
                orphan,
                scylla::value::CqlTimestamp(now_ms()),
            ),
        )
        .await
        .unwrap();
    set_live_total(&backends.prefix, &kept[1], 999).await;

    let (ok, report) = check(&config, false);
    assert!(!ok);
    assert!(
        line(&report, "no registry row").contains(&deleted),
        "{report}"
    );
    assert!(
        line(&report, "duplicate-index").contains(&orphan.to_string()),
        "{report}"
    );
    assert!(line(&report, "live totals").contains(&kept[1]), "{report}");
    assert!(
        line(&report, "rollups that differ").starts_with("ok"),
        "{report}"
    );

    let (ok, _) = check(&config, true);
    assert!(!ok);
    let (ok, report) = check(&config, false);
    assert!(ok, "clean after the repair: {report}");
    backends.cleanup().await;
}
