//! `iotpipe migrate` against a real Apache Cassandra node: a fresh keyspace, and the
//! upgrades of older ones (columns, levels, fleet rows, the older pending marks).
//! Same node and keyspace rules as `cassandra.rs`, whose helpers these use.

use std::sync::Arc;

use iotpipe::config::StoreConfig;
use iotpipe::model::Event;
use iotpipe::store::scylla::{ScyllaSettings, ScyllaStore};
use iotpipe::store::{EventStore, ROLLUP_MS};
use scylla::client::session_builder::SessionBuilder;
use uuid::Uuid;

use super::cassandra::{assert_fleet, made_ago, node, ts, Keyspace};
use super::{event, flush, HOUR, T0};

#[tokio::test]
async fn iotpipe_migrate_creates_the_schema_in_a_fresh_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let keyspace = format!("iotpipe_migrate_{}", crate::support::random_name());
    let config = dir.path().join("iotpipe.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[store]\nscylla_nodes = {:?}\nkeyspace = {keyspace:?}\n\
             replication = \"{{'class': 'SimpleStrategy', 'replication_factor': 1}}\"\n",
            dir.path(),
            node()
        ),
    )
    .unwrap();
    let run = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iotpipe"));
        // Only the file speaks: a developer's exported settings must not redirect it.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("IOTPIPE_")) {
            cmd.env_remove(k);
        }
        cmd.arg("migrate").arg("--config").arg(&config);
        cmd.output().unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let session = SessionBuilder::new()
        .known_node(node())
        .build()
        .await
        .unwrap();
    let tables: Vec<String> = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (&keyspace,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows::<(String,)>()
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    let mut tables = tables;
    tables.sort();
    assert_eq!(
        tables,
        [
            "buckets",
            "event_ids",
            "events",
            "fleet_by_type",
            "latest",
            "meta",
            "pending_by_device",
            "pending_by_user",
            "rollups",
            "rollups_coarse"
        ]
    );
    // Twice is harmless, and the keyspace then serves a store.
    assert!(run().status.success());
    let settings = || {
        ScyllaSettings::from_config(
            &StoreConfig {
                scylla_nodes: Some(node()),
                keyspace: keyspace.clone(),
                consistency: "ONE".into(),
                ..StoreConfig::default()
            },
            HOUR,
        )
        .unwrap()
    };
    let store = Arc::new(ScyllaStore::connect(settings()).await.unwrap());
    store.ping().await.unwrap();

    // A table from before sketches gets its column from migrate.
    session
        .query_unpaged(format!("ALTER TABLE {keyspace}.rollups DROP sketch"), ())
        .await
        .unwrap();
    assert!(run().status.success());
    let columns = session
        .query_unpaged(
            "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? \
             AND table_name = 'rollups' AND column_name = 'sketch'",
            (&keyspace,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num();
    assert_eq!(columns, 1);

    // A keyspace from before hour and day rollups (minute rows, no marker) is refused
    // by migrate and by the server, rather than served with hours and days missing.
    for cql in [
        format!("DELETE FROM {keyspace}.meta WHERE name = 'rollup_levels'"),
        format!(
            "INSERT INTO {keyspace}.rollups (user_id, device_id, day, metric, minute, type, \
             count, min, max, sum) VALUES (1, uuid(), 0, '', 0, 't', 1, 0, 0, 0)"
        ),
    ] {
        session.query_unpaged(cql, ()).await.unwrap();
    }
    let out = run();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("predates hour and day rollups"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ScyllaStore::connect(settings()).await.is_err());
    session
        .query_unpaged(format!("DROP KEYSPACE {keyspace}"), ())
        .await
        .unwrap();
}

/// A keyspace written before the fleet rows: refused until `iotpipe migrate` has built
/// them from its hour and day rows.
#[tokio::test]
async fn migrate_builds_the_fleet_rows_of_an_older_keyspace() {
    let ks = Keyspace::new(|_| {}).await;
    let store = ks.store().await;
    let (user, device) = (11, Uuid::new_v4());
    let events: Vec<Event> = (0..40u128)
        .map(|i| {
            let kind = if i % 4 == 0 { "alarm" } else { "telemetry" };
            event(i + 1, T0 + i as i64 * 7 * ROLLUP_MS, kind, &[("temp", 1.0)])
        })
        .collect();
    store
        .write(flush(user, device, events.clone()))
        .await
        .unwrap();
    store.settle().await;
    drop(store);
    let name = &ks.settings.keyspace;
    // The older keyspace marked pending minutes one row each, in `pending_minutes`:
    // one is left by a writer that stored an event and died before its rollups.
    let late = event(500, T0 + 30_000, "telemetry", &[("temp", 2.0)]);
    for cql in [
        format!("TRUNCATE {name}.fleet_by_type"),
        format!("DELETE FROM {name}.meta WHERE name = 'fleet_by_type'"),
        format!(
            "CREATE TABLE {name}.pending_minutes (user_id bigint, device_id uuid, \
             minute timestamp, flush uuid, PRIMARY KEY ((user_id, device_id), minute, flush))"
        ),
    ] {
        ks.session.query_unpaged(cql, ()).await.unwrap();
    }
    ks.session
        .query_unpaged(
            format!("INSERT INTO {name}.pending_minutes (user_id, device_id, minute, flush) VALUES (?, ?, ?, ?)"),
            (user, device, ts(T0), made_ago(2 * HOUR)),
        )
        .await
        .unwrap();
    ks.store_by_hand(user, device, &late).await;
    let truth: Vec<Event> = events.iter().cloned().chain([late]).collect();

    let refused = ScyllaStore::connect(ks.settings.clone())
        .await
        .err()
        .unwrap();
    assert!(refused.to_string().contains("iotpipe migrate"), "{refused}");
    ScyllaStore::migrate(&ks.settings).await.unwrap();
    assert_eq!(
        ks.count("pending_by_device").await,
        1,
        "the old mark carried"
    );
    assert_eq!(ks.count("pending_by_user").await, 1);
    // Until it is swept (by the store's first tick, at start, or by this test's),
    // the fleet read takes that hour from the device's rows, which read the marked
    // minute from its events; after, from the repaired fleet rows.
    let store = ks.store().await;
    assert_fleet(&store, (user, device), &truth, "").await;
    store.sweep().await.unwrap();
    assert_eq!(ks.count("pending_by_device").await, 0);
    assert_eq!(ks.count("pending_by_user").await, 0);
    assert_fleet(
        &store,
        (user, device),
        &truth,
        "from the fleet rows once swept",
    )
    .await;
    ks.drop_it().await;
}
