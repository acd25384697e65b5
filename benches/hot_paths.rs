//! Micro-benchmarks of the hot paths: decode and validate, batching, and window
//! aggregation. Run: `cargo bench --bench hot_paths`.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use iotpipe::ingest::decode::{decode, DecodeOptions, Format};
use iotpipe::model::{Event, Record};
use iotpipe::pipeline::batcher::Batcher;
use iotpipe::query::{Grid, Range, Windows};
use iotpipe::store::embedded::EmbeddedStore;
use iotpipe::store::EventStore;
use serde_json::json;
use tokio::time::{Duration, Instant};
use uuid::Uuid;

const N: usize = 1_000;
const NOW: i64 = 1_795_000_000_000;

fn body() -> Vec<u8> {
    let events: Vec<_> = (0..N)
        .map(|i| {
            json!({"id": Uuid::new_v4(), "ts": NOW - i as i64, "type": "telemetry",
                   "metrics": {"temperature": 21.5, "battery": 0.93}, "attrs": {"fw": "1.4.2"}})
        })
        .collect();
    serde_json::to_vec(&events).unwrap()
}

fn bench_decode(c: &mut Criterion) {
    let body = body();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("json_array_1000_events", |b| {
        b.iter(|| {
            decode(
                &body,
                Format::Json,
                DecodeOptions {
                    max_events: 10_000,
                    now_ms: NOW,
                    retention: Default::default(),
                },
            )
            .unwrap()
        })
    });
    g.finish();
}

fn records() -> Vec<Record> {
    (0..N)
        .map(|i| Record {
            user_id: 1,
            device_id: Uuid::from_u128((i % 10) as u128),
            received_ms: NOW,
            event: Event {
                id: Uuid::new_v4(),
                id_assigned: false,
                ts_ms: NOW - (i as i64) * 7_000,
                kind: "telemetry".into(),
                metrics: vec![("temperature".into(), 21.5), ("battery".into(), 0.93)],
                attrs: vec![("fw".into(), "1.4.2".into())],
            },
        })
        .collect()
}

fn bench_batcher(c: &mut Criterion) {
    let mut g = c.benchmark_group("batcher");
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function("group_1000_events_10_devices", |b| {
        b.iter_batched(
            records,
            |r| {
                let mut batcher = Batcher::new(5_000, Duration::from_millis(5), 3_600_000);
                batcher.push(r, (), Instant::now());
                batcher.take().unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_windows(c: &mut Criterion) {
    let day = 86_400i64;
    let mut g = c.benchmark_group("aggregate");
    g.throughput(Throughput::Elements(day as u64));
    g.bench_function("86400_points_into_1m_windows", |b| {
        b.iter(|| {
            let mut w = Windows::new(Grid::utc(
                Range {
                    from_ms: 0,
                    to_ms: day * 1000,
                },
                60_000,
            ));
            for i in 0..day {
                w.add(i * 1000, Some(i as f64));
            }
            w.finish()
        })
    });
    g.finish();
}

fn bench_store_write(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), 3_600_000).unwrap();
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(5 * N as u64));
    g.sample_size(20);
    g.bench_function("embedded_write_5000_events_durable", |b| {
        b.iter_batched(
            || {
                let mut batcher = Batcher::new(usize::MAX, Duration::from_secs(1), 3_600_000);
                for _ in 0..5 {
                    batcher.push(records(), (), Instant::now());
                }
                Arc::new(batcher.take().unwrap().partitions)
            },
            |partitions| rt.block_on(store.write(partitions)).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_batcher,
    bench_windows,
    bench_store_write
);
criterion_main!(benches);
