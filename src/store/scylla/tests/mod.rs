//! Offline checks: every statement's bind markers and result columns are derived from
//! `cql/schema.cql` (parsed here), and every Rust row type is checked against them with
//! the driver's own serialization and deserialization type checks, as a prepared
//! statement's metadata would drive them against a live server.

use scylla::frame::response::result::{CollectionType, ColumnType, NativeType};

use std::collections::BTreeMap;
use std::time::Duration;

use scylla::frame::types::Consistency;
use scylla::value::{CqlTimestamp, MaybeUnset};
use scylla::{DeserializeRow, SerializeRow};
use uuid::Uuid;

use super::rows::*;
use super::schema::{schema_statements, BUCKET_META};
use super::statements::Cql;
use super::ScyllaSettings;
use crate::config::StoreConfig;
use crate::model::{Event, PartitionKey, Record};
use crate::store::retention::Retention;

const KS: &str = "ks";

/// Table → column → type, parsed from the schema file.
mod cql;
use cql::*;

fn record() -> Record {
    Record {
        user_id: 7,
        device_id: Uuid::from_u128(1),
        received_ms: 1_800_000_000_500,
        event: Event {
            id: Uuid::from_u128(2),
            id_assigned: false,
            ts_ms: 1_800_000_000_000,
            kind: "telemetry".into(),
            metrics: vec![("battery".into(), 0.9), ("temp".into(), 21.5)],
            attrs: vec![("fw".into(), "1.4.2".into())],
        },
    }
}

#[test]
fn the_schema_parses_into_its_tables() {
    let s = schema();
    let mut names: Vec<_> = s.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
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
    assert_eq!(s["events"]["ts"], ColumnType::Native(NativeType::Timestamp));
    assert!(matches!(
        s["events"]["metrics"],
        ColumnType::Collection {
            frozen: true,
            typ: CollectionType::Map(..)
        }
    ));
}

#[test]
fn every_bound_row_type_serializes_against_the_schema() {
    let r = record();
    let t = ms(1);
    let (d, e) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let pending = PendingRow {
        user_id: 1,
        device_id: d,
        hour: t,
        flush: e,
    };
    let hour = PendingHourRow {
        user_id: 1,
        slab: t,
        hour: t,
        device_id: d,
        flush: e,
    };
    let checks = [
        check_bind(&Cql::insert_event(KS), &event_row(&r, 3_600_000, 60)),
        check_bind(
            &Cql::insert_bucket(KS),
            &BucketIn {
                user_id: 1,
                device_id: d,
                bucket: t,
                ttl: 60,
            },
        ),
        check_bind(
            &Cql::insert_id(KS),
            &IdIn {
                device_id: d,
                event_id: e,
                ts: t,
                ttl: 60,
            },
        ),
        check_bind(
            &Cql::select_id(KS),
            &IdKeyIn {
                device_id: d,
                event_id: e,
            },
        ),
        check_bind(
            &Cql::select_buckets(KS),
            &BucketRangeIn {
                user_id: 1,
                device_id: d,
                lo: t,
                hi: t,
            },
        ),
        check_bind(
            &Cql::list_slice(KS),
            &SliceIn {
                user_id: 1,
                device_id: d,
                bucket: t,
                from_ts: t,
                to_ts: t,
            },
        ),
        check_bind(
            &Cql::list_before(KS),
            &SliceBeforeIn {
                user_id: 1,
                device_id: d,
                bucket: t,
                before_ts: t,
                before_id: e,
            },
        ),
        check_bind(
            &Cql::metric_slice(KS),
            &SlicesIn {
                user_id: 1,
                device_id: d,
                buckets: vec![t, t],
                from_ts: t,
                to_ts: t,
            },
        ),
        check_bind(
            &Cql::count_slice(KS),
            &SliceIn {
                user_id: 1,
                device_id: d,
                bucket: t,
                from_ts: t,
                to_ts: t,
            },
        ),
        check_bind(&Cql::select_meta(KS), &MetaKeyIn { name: BUCKET_META }),
        check_bind(
            &Cql::insert_rollup(KS),
            &RollupIn {
                user_id: 1,
                device_id: d,
                day: t,
                metric: "temp",
                minute: t,
                kind: "telemetry",
                count: 3,
                min: 1.0,
                max: 2.0,
                sum: 4.5,
                sketch: MaybeUnset::Unset,
                writetime: 3,
                ttl: 0,
            },
        ),
        check_bind(
            &Cql::select_rollups(KS),
            &RollupSliceIn {
                user_id: 1,
                device_id: d,
                day: t,
                metric: "",
                from_minute: t,
                to_minute: t,
            },
        ),
        check_bind(
            &Cql::insert_pending(KS),
            &PendingAddIn {
                minutes: vec![0, 59],
                user_id: 1,
                device_id: d,
                hour: t,
                flush: e,
            },
        ),
        check_bind(
            &Cql::insert_coarse(KS),
            &CoarseIn {
                user_id: 1,
                device_id: d,
                level: 1,
                slab: t,
                metric: "temp",
                start: t,
                kind: "telemetry",
                count: 3,
                min: 1.0,
                max: 2.0,
                sum: 4.5,
                sketch: MaybeUnset::Unset,
                writetime: 3,
                ttl: 0,
            },
        ),
        check_bind(
            &Cql::select_coarse(KS),
            &CoarseSliceIn {
                user_id: 1,
                device_id: d,
                level: 2,
                slab: t,
                metric: "",
                from_start: t,
                to_start: t,
            },
        ),
        check_bind(
            &Cql::insert_latest(KS),
            &LatestIn {
                user_id: 1,
                device_id: d,
                metric: "temp",
                ts: t,
                value: 1.5,
                writetime: 1_000,
            },
        ),
        check_bind(&Cql::select_latest(KS), &(1i64,)),
        check_bind(&Cql::select_device_latest(KS), &(1i64, d)),
        check_bind(
            &Cql::select_event_key(KS),
            &EventKeyIn {
                user_id: 1,
                device_id: d,
                bucket: t,
                ts: t,
                event_id: e,
            },
        ),
        check_bind(&Cql::delete_pending(KS), &pending),
        check_bind(
            &Cql::select_pending(KS),
            &PendingRangeIn {
                user_id: 1,
                device_id: d,
                from_hour: t,
                to_hour: t,
            },
        ),
        check_bind(
            &Cql::insert_fleet(KS),
            &FleetIn {
                writetime: 3,
                ttl: 0,
                index: 23,
                count: 3,
                user_id: 1,
                level: 1,
                slab: t,
                device_id: d,
                kind: "telemetry",
            },
        ),
        check_bind(
            &Cql::select_fleet_type(KS),
            &FleetTypeIn {
                user_id: 1,
                level: 2,
                slab: t,
                kind: "",
            },
        ),
        check_bind(
            &Cql::select_fleet_types(KS),
            &FleetPartitionIn {
                user_id: 1,
                level: 2,
                slab: t,
            },
        ),
        check_bind(&Cql::insert_pending_hour(KS), &hour),
        check_bind(&Cql::delete_pending_hour(KS), &hour),
        check_bind(
            &Cql::select_pending_hours(KS),
            &PendingHourRangeIn {
                user_id: 1,
                slab: t,
                from_hour: t,
                to_hour: t,
            },
        ),
        check_bind(
            &Cql::insert_meta(KS),
            &MetaIn {
                name: BUCKET_META,
                value: 1,
            },
        ),
    ];
    for c in checks {
        c.unwrap();
    }
}

#[test]
fn every_read_row_type_type_checks_against_the_schema() {
    check_read::<IdOut>(&Cql::select_id(KS)).unwrap();
    check_read::<IdOut>(&Cql::select_event_key(KS)).unwrap();
    check_read::<BucketOut>(&Cql::select_buckets(KS)).unwrap();
    check_read::<EventOut>(&Cql::list_slice(KS)).unwrap();
    check_read::<EventOut>(&Cql::list_before(KS)).unwrap();
    check_read::<MetricOut>(&Cql::metric_slice(KS)).unwrap();
    check_read::<CountOut>(&Cql::count_slice(KS)).unwrap();
    check_read::<MetaOut>(&Cql::select_meta(KS)).unwrap();
    check_read::<RollupOut>(&Cql::select_rollups(KS)).unwrap();
    check_read::<CoarseOut>(&Cql::select_coarse(KS)).unwrap();
    check_read::<PendingOut>(&Cql::select_pending(KS)).unwrap();
    check_read::<PendingScan>(&Cql::scan_pending(KS)).unwrap();
    check_read::<FleetOut>(&Cql::select_fleet_type(KS)).unwrap();
    check_read::<FleetOut>(&Cql::select_fleet_types(KS)).unwrap();
    check_read::<PendingHourOut>(&Cql::select_pending_hours(KS)).unwrap();
    check_read::<PendingHourRow>(&Cql::scan_pending_hours(KS)).unwrap();
    check_read::<LatestOut>(&Cql::select_latest(KS)).unwrap();
    check_read::<LatestOut>(&Cql::select_device_latest(KS)).unwrap();
}

#[test]
fn the_checks_catch_a_row_type_that_does_not_match_the_schema() {
    // user_id is a bigint: an i32 must be refused.
    #[derive(SerializeRow)]
    struct NarrowUser {
        user_id: i32,
        device_id: Uuid,
        bucket: CqlTimestamp,
    }
    let wrong = NarrowUser {
        user_id: 1,
        device_id: Uuid::nil(),
        bucket: ms(0),
    };
    assert!(check_bind(&Cql::insert_bucket(KS), &wrong).is_err());
    // A bind marker name the statement does not have.
    #[derive(SerializeRow)]
    struct Misnamed {
        user_id: i64,
        device_id: Uuid,
        low: CqlTimestamp,
        hi: CqlTimestamp,
    }
    let wrong = Misnamed {
        user_id: 1,
        device_id: Uuid::nil(),
        low: ms(0),
        hi: ms(0),
    };
    assert!(check_bind(&Cql::select_buckets(KS), &wrong).is_err());
    // ts is a timestamp, not text; metrics a map of doubles, not of text.
    #[derive(DeserializeRow)]
    #[allow(dead_code)]
    struct TextTs {
        ts: String,
    }
    assert!(check_read::<TextTs>(&Cql::select_id(KS)).is_err());
    #[derive(DeserializeRow)]
    #[allow(dead_code)]
    struct TextMetrics {
        ts: CqlTimestamp,
        #[scylla(rename = "type")]
        kind: String,
        metrics: Option<BTreeMap<String, String>>,
    }
    assert!(check_read::<TextMetrics>(&Cql::metric_slice(KS)).is_err());
}

#[test]
fn the_size_estimate_bounds_the_serialized_row() {
    let mut r = record();
    r.event.attrs.push(("note".into(), "é".repeat(500)));
    let actual = check_bind(&Cql::insert_event(KS), &event_row(&r, 3_600_000, 60)).unwrap();
    assert!(
        actual <= row_bytes(&r.event),
        "{actual} > {}",
        row_bytes(&r.event)
    );
}

#[test]
fn partitions_split_into_batches_under_the_byte_limit_in_order() {
    let records: Vec<Record> = (0..100)
        .map(|i| {
            let mut r = record();
            r.event.id = Uuid::from_u128(i);
            if i == 50 {
                r.event.attrs.push(("big".into(), "x".repeat(1000)));
                for j in 0..10 {
                    r.event.attrs.push((format!("a{j}"), "y".repeat(1000)));
                }
            }
            r
        })
        .collect();
    let refs: Vec<&Record> = records.iter().collect();
    let runs = split_by_bytes(&refs, 5 * 1024);
    assert!(runs.len() > 1);
    let flat: Vec<Uuid> = runs.iter().flatten().map(|r| r.event.id).collect();
    assert_eq!(flat, records.iter().map(|r| r.event.id).collect::<Vec<_>>());
    for run in &runs {
        let size: usize = run.iter().map(|r| row_bytes(&r.event)).sum();
        assert!(
            size <= 5 * 1024 || run.len() == 1,
            "a run of {} bytes",
            size
        );
    }
    // Every run stays within one partition: the batcher hands one partition at a
    // time, and the rows' partition key is the batch key.
    let key = PartitionKey::of(&records[0], 3_600_000);
    assert!(records
        .iter()
        .all(|r| PartitionKey::of(r, 3_600_000) == key));
}

#[test]
fn settings_are_checked() {
    let mut c = StoreConfig::default();
    assert!(ScyllaSettings::from_config(&c, 1000).is_err(), "no nodes");
    c.scylla_nodes = Some("10.0.0.1:9042, 10.0.0.2:9042".into());
    let s = ScyllaSettings::from_config(&c, 1000).unwrap();
    assert_eq!(s.nodes, ["10.0.0.1:9042", "10.0.0.2:9042"]);
    assert_eq!(s.consistency, Consistency::LocalQuorum);
    c.keyspace = "x; DROP TABLE y".into();
    assert!(ScyllaSettings::from_config(&c, 1000).is_err());
    c.keyspace = "iotpipe".into();
    c.consistency = "MOST".into();
    assert!(ScyllaSettings::from_config(&c, 1000).is_err());
}

#[test]
fn the_schema_is_filled_from_the_settings() {
    let mut c = StoreConfig {
        scylla_nodes: Some("n:9042".into()),
        keyspace: "metrics_prod".into(),
        ..StoreConfig::default()
    };
    c.replication = "{'class': 'NetworkTopologyStrategy', 'dc1': 3}".into();
    let mut settings = ScyllaSettings::from_config(&c, 1000).unwrap();
    let day = 86_400_000;
    settings.retention = Retention::new([Some(day), Some(7 * day), Some(365 * day), None]);
    let stmts = schema_statements(&settings);
    assert_eq!(stmts.len(), 11);
    assert!(stmts[0].starts_with("CREATE KEYSPACE IF NOT EXISTS metrics_prod"));
    assert!(stmts[0].ends_with("replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"));
    assert!(stmts.iter().skip(1).all(|s| s.contains("metrics_prod.")));
    assert!(stmts[1].contains("TimeWindowCompactionStrategy"));
    assert!(stmts[1].contains("default_time_to_live = 86400"));
    let ttl_of = |table: &str| {
        let s = stmts
            .iter()
            .find(|s| s.contains(&format!("metrics_prod.{table} (")))
            .unwrap();
        s.rsplit("default_time_to_live = ")
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(ttl_of("rollups"), "604800");
    assert_eq!(ttl_of("rollups_coarse"), "31536000");
    assert_eq!(ttl_of("fleet_by_type"), "31536000");
    let alters = super::schema::tier_ttl_statements(&settings);
    assert!(alters.contains(
        &"ALTER TABLE metrics_prod.event_ids WITH default_time_to_live = 86400".to_owned()
    ));
    for placeholder in [
        "{keyspace}",
        "{replication}",
        "{raw_ttl}",
        "{minute_ttl}",
        "{hour_ttl}",
    ] {
        assert!(
            stmts.iter().all(|s| !s.contains(placeholder)),
            "{placeholder} left"
        );
    }
}
