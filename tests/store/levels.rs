//! Rollup exactness at every level, for any store: random events over three days
//! and three devices, sent in random order (late events) with repeats of earlier ids
//! (redelivery, sometimes with another `ts`), checked against a brute-force scan of
//! what was stored: the first version of each id.

use std::collections::{BTreeMap, HashMap};

use iotpipe::model::{bucket_start, Event};
use iotpipe::store::{EventStore, FleetQuery, Level, RollupQuery, Summary};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use super::{event, flush, HOUR};

const DAY: i64 = 86_400_000;
/// A UTC midnight.
const DAY0: i64 = 1_699_920_000_000;

type Rows = BTreeMap<(i64, String), Summary>;

fn brute(events: &[&Event], level: Level, metric: &str) -> Rows {
    let mut out = Rows::new();
    for e in events {
        let value = e.metrics.iter().find(|(m, _)| m == metric).map(|(_, v)| *v);
        if metric.is_empty() || value.is_some() {
            out.entry((bucket_start(e.ts_ms, level.ms()), e.kind.clone()))
                .or_insert(Summary::EMPTY)
                .add(value);
        }
    }
    out
}

fn same(got: &Rows, want: &Rows) -> Result<(), String> {
    if got.keys().ne(want.keys()) {
        return Err(format!(
            "intervals differ: {:?} vs {:?}",
            got.keys(),
            want.keys()
        ));
    }
    for (k, w) in want {
        let g = &got[k];
        if (g.count, g.min, g.max) != (w.count, w.min, w.max) || (g.sum - w.sum).abs() > 1e-6 {
            return Err(format!("{k:?}: {g:?} vs {w:?}"));
        }
    }
    Ok(())
}

/// Writes a random history for a new user and checks every level of every device,
/// and the fleet counts where the store keeps them.
pub async fn levels_match_brute_force(store: &dyn EventStore, seed: u64) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let user = rng.random_range(1..1_000_000_000);
    let devices: Vec<Uuid> = (0..3).map(|_| Uuid::from_u128(rng.random())).collect();
    let mut stored: HashMap<Uuid, (Uuid, Event)> = HashMap::new();
    let mut history: Vec<(Uuid, Event)> = Vec::new();
    let n = rng.random_range(50..400);
    for _ in 0..n {
        let device = devices[rng.random_range(0..devices.len())];
        // Clustered in a few hours, so that intervals collect several events.
        let ts = DAY0
            + rng.random_range(0..3) * DAY
            + rng.random_range(0..4) * 5 * HOUR
            + rng.random_range(0..3 * HOUR);
        let kind = ["telemetry", "alarm"][rng.random_range(0..2)];
        let metrics: Vec<(&str, f64)> = [
            ("temp", rng.random_range(-20.0..40.0)),
            ("rh", rng.random_range(0.0..1.0)),
        ]
        .into_iter()
        .filter(|_| rng.random_bool(0.7))
        .collect();
        let e = event(rng.random(), ts, kind, &metrics);
        history.push((device, e));
    }
    // Repeats of earlier ids, some with another ts: the first version stays.
    for _ in 0..n / 4 {
        let (device, mut e) = history[rng.random_range(0..history.len())].clone();
        if rng.random_bool(0.5) {
            e.ts_ms += rng.random_range(-HOUR..HOUR);
        }
        history.push((device, e));
    }
    // Late arrivals: flushes in shuffled order, each of a random run.
    let mut order: Vec<usize> = (0..history.len()).collect();
    order[n..].shuffle(&mut rng);
    let mut chunks: Vec<Vec<usize>> = order
        .chunks(rng.random_range(5..60))
        .map(<[usize]>::to_vec)
        .collect();
    let repeats = chunks.split_off(chunks.len() / 2);
    chunks.shuffle(&mut rng);
    chunks.extend(repeats);
    for chunk in chunks {
        for device in &devices {
            let events: Vec<Event> = chunk
                .iter()
                .filter(|&&i| history[i].0 == *device)
                .map(|&i| history[i].1.clone())
                .collect();
            // Within a flush, the first of two same ids in flush order stays: the
            // order of partitions (by bucket), then of arrival.
            let mut in_flush_order: Vec<&Event> = events.iter().collect();
            in_flush_order.sort_by_key(|e| bucket_start(e.ts_ms, HOUR));
            for e in in_flush_order {
                stored.entry(e.id).or_insert((*device, e.clone()));
            }
            if !events.is_empty() {
                store
                    .write(flush(user, *device, events))
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    let (from, to) = (DAY0 - DAY, DAY0 + 4 * DAY);
    for level in [Level::Minute, Level::Hour, Level::Day] {
        for device in &devices {
            let events: Vec<&Event> = stored
                .values()
                .filter(|s| s.0 == *device)
                .map(|s| &s.1)
                .collect();
            for metric in ["", "temp", "rh"] {
                let q = RollupQuery {
                    user_id: user,
                    device_id: *device,
                    level,
                    from_ms: from,
                    to_ms: to,
                    metric: (!metric.is_empty()).then(|| metric.to_owned()),
                    kind: None,
                };
                let Some(rows) = store.rollups(q).await.map_err(|e| e.to_string())? else {
                    continue;
                };
                let got: Rows = rows
                    .into_iter()
                    .map(|r| ((r.start_ms, r.kind), r.summary))
                    .collect();
                same(&got, &brute(&events, level, metric))
                    .map_err(|e| format!("seed {seed}, {level:?}, metric {metric:?}: {e}"))?;
            }
        }
        let mut want: BTreeMap<(i64, Uuid, String), u64> = BTreeMap::new();
        for (device, e) in stored.values() {
            *want
                .entry((bucket_start(e.ts_ms, level.ms()), *device, e.kind.clone()))
                .or_default() += 1;
        }
        // Each device's totals over its types, as `group_by=device` asks.
        let mut totals: BTreeMap<(i64, Uuid), u64> = BTreeMap::new();
        for ((start, device, _), n) in &want {
            *totals.entry((*start, *device)).or_default() += n;
        }
        // Every type, each device's totals, and one type alone (the stores read each
        // their own way).
        let one = want.keys().next().map(|(_, _, kind)| kind.clone());
        for (kind, by_type) in [(None, true), (None, false), (one, true)] {
            let want: BTreeMap<(i64, Uuid, String), u64> = (want.iter())
                .filter(|((_, _, k), _)| kind.as_ref().is_none_or(|one| one == k))
                .map(|(k, n)| (k.clone(), *n))
                .collect();
            let q = FleetQuery {
                user_id: user,
                level,
                from_ms: from,
                to_ms: to,
                kind: kind.clone(),
                by_type,
            };
            let Some(rows) = store.fleet_counts(q).await.map_err(|e| e.to_string())? else {
                continue;
            };
            let differ = if by_type {
                let got: BTreeMap<(i64, Uuid, String), u64> = rows
                    .into_iter()
                    .map(|r| ((r.start_ms, r.device_id, r.kind), r.count))
                    .collect();
                got != want
            } else {
                let mut got: BTreeMap<(i64, Uuid), u64> = BTreeMap::new();
                for r in rows {
                    *got.entry((r.start_ms, r.device_id)).or_default() += r.count;
                }
                got != totals
            };
            if differ {
                return Err(format!(
                    "seed {seed}: fleet counts at {level:?} (type {kind:?}, by type: {by_type}) differ"
                ));
            }
        }
    }
    Ok(())
}
