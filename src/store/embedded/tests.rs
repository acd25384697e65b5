use super::*;
use crate::model::PartitionKey;

#[test]
fn key_order_is_numeric_order_across_the_sign() {
    let d = Uuid::nil();
    let a = event_key(1, d, 1000, -5, Uuid::nil());
    let b = event_key(1, d, 1000, 3, Uuid::nil());
    let c = event_key(1, d, 1000, 3, Uuid::from_u128(1));
    assert!(a < b && b < c);
    assert_eq!(decode_key_tail(&c).unwrap(), (3, Uuid::from_u128(1)));
}

/// One event of type "t" with `metrics`, as a flush of its own partition: the
/// store's tests (here and in its submodules) build their writes from it.
pub(super) fn batch(
    device: DeviceId,
    id: Uuid,
    ts_ms: i64,
    metrics: &[(&str, f64)],
) -> PartitionBatch {
    let record = Record {
        user_id: 1,
        device_id: device,
        received_ms: ts_ms,
        event: Event {
            id,
            id_assigned: false,
            ts_ms,
            kind: "t".into(),
            metrics: metrics.iter().map(|(k, v)| ((*k).into(), *v)).collect(),
            attrs: vec![],
        },
    };
    PartitionBatch {
        key: PartitionKey::of(&record, 3_600_000),
        records: vec![record],
    }
}

fn one(device: DeviceId, id: Uuid, ts_ms: i64) -> Vec<PartitionBatch> {
    vec![batch(device, id, ts_ms, &[])]
}

#[test]
fn a_directory_from_before_timed_ids_still_finds_uuidv7_rows_in_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (device, ts) = (Uuid::new_v4(), 1_800_000_000_000);
    let id = crate::model::assigned_id(ts + 1);
    {
        // As the older layout left it: the row of a UUIDv7 stored with another ts
        // in `ids`, and no marker.
        let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
        let inner = &store.inner;
        inner.ids.insert(id_key(device, id), ordered(ts)).unwrap();
        let meta = inner
            .db
            .keyspace("meta", KeyspaceCreateOptions::default)
            .unwrap();
        meta.remove(TIMED_IDS_META_KEY).unwrap();
        inner.db.persist(PersistMode::SyncAll).unwrap();
    }
    let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
    assert!(store.inner.timed_in_ids);
    assert_eq!(
        store.inner.write(&one(device, id, ts + 5)).unwrap(),
        vec![0]
    );

    // A new directory keeps them apart, and says so.
    let fresh = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(fresh.path(), 3_600_000).unwrap();
    assert!(!store.inner.timed_in_ids);
    assert_eq!(store.inner.write(&one(device, id, ts)).unwrap(), vec![1]);
    assert_eq!(
        store.inner.write(&one(device, id, ts + 5)).unwrap(),
        vec![0]
    );
    assert!(store.inner.ids.is_empty().unwrap());
}
