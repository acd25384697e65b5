//! `--verify`: reads back what iotpipe stored and proves it matches the simulator's
//! own ledger.
//!
//! For each device, over the run's time range:
//! - every acknowledged event is stored exactly once, with the content sent;
//! - an event in doubt (no answer, QoS 0) is stored at most once;
//! - refused and invalid events are not stored, and nothing else is;
//! - the windowed aggregates of the profile's metric (count, min, max, sum) equal
//!   those computed from the ledger: the query path is checked too, not just the
//!   listing.
//!
//! It assumes nothing else writes to the fleet's devices in that time range.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use futures::stream::{self, StreamExt};
use serde::Serialize;
use uuid::Uuid;

use crate::api::{Api, Bucket, StoredEvent};
use crate::chaos::{parse_ts, SimEvent};
use crate::profile::Profile;
use crate::provision::Fleet;
use crate::tally::{Expect, Tally};

/// Most problems kept for the report; the total is always counted.
const MAX_PROBLEMS: usize = 50;
/// Most windows per aggregate query, as the API allows.
const MAX_WINDOWS: i64 = 10_000;
/// Devices read back at once.
const VERIFY_CONCURRENCY: usize = 8;

/// One difference between the ledger and the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    /// Acknowledged, not stored.
    Missing { device: String, id: Uuid },
    /// Stored more than once.
    Duplicated {
        device: String,
        id: Uuid,
        copies: usize,
    },
    /// Stored, though refused or invalid.
    StoredButRefused { device: String, id: Uuid },
    /// Stored, never sent by this run.
    Unexpected { device: String, id: Uuid },
    /// Stored with other content than sent.
    ContentDiffers {
        device: String,
        id: Uuid,
        what: String,
    },
    /// A window's aggregate differs from the ledger's.
    WindowDiffers {
        device: String,
        start_ms: i64,
        field: &'static str,
        expected: String,
        actual: String,
    },
    /// A query failed, so nothing could be proven for this device.
    QueryFailed { device: String, error: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Missing { device, id } => {
                write!(f, "{device}: acked event {id} is not stored")
            }
            Problem::Duplicated { device, id, copies } => {
                write!(f, "{device}: event {id} is stored {copies} times")
            }
            Problem::StoredButRefused { device, id } => {
                write!(f, "{device}: refused or invalid event {id} is stored")
            }
            Problem::Unexpected { device, id } => {
                write!(f, "{device}: stored event {id} was never sent by this run")
            }
            Problem::ContentDiffers { device, id, what } => {
                write!(f, "{device}: event {id} differs: {what}")
            }
            Problem::WindowDiffers {
                device,
                start_ms,
                field,
                expected,
                actual,
            } => write!(
                f,
                "{device}: window {}: {field} is {actual}, expected {expected}",
                crate::chaos::format_ts(*start_ms)
            ),
            Problem::QueryFailed { device, error } => write!(f, "{device}: query failed: {error}"),
        }
    }
}

/// The verdict.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verification {
    pub pass: bool,
    pub devices: usize,
    /// Events that must be stored exactly once.
    pub expected_once: u64,
    /// Events in doubt, and how many of them were found stored.
    pub in_doubt: u64,
    pub in_doubt_stored: u64,
    /// Refused or invalid events checked absent.
    pub expected_absent: u64,
    /// Distinct events read back.
    pub stored: u64,
    pub windows_compared: u64,
    pub window_ms: i64,
    pub problem_count: usize,
    pub problems: Vec<Problem>,
}

impl Verification {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "verification: {}",
            if self.pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(
            out,
            "  {} devices; {} acked events expected exactly once, {} distinct events read back; \
             {} in doubt ({} stored); {} refused/invalid checked absent; {} windows of {} s \
             compared",
            self.devices,
            self.expected_once,
            self.stored,
            self.in_doubt,
            self.in_doubt_stored,
            self.expected_absent,
            self.windows_compared,
            self.window_ms / 1000
        );
        if self.problem_count > 0 {
            let _ = writeln!(out, "  {} difference(s):", self.problem_count);
            for p in &self.problems {
                let _ = writeln!(out, "  - {p}");
            }
            if self.problem_count > self.problems.len() {
                let _ = writeln!(
                    out,
                    "  - ... and {} more",
                    self.problem_count - self.problems.len()
                );
            }
        }
        out
    }
}

/// What the ledger says of one id.
#[derive(Debug, Clone)]
pub struct Expected {
    pub id: Uuid,
    pub expect: Expect,
    pub event: Option<SimEvent>,
}

fn close(a: f64, b: f64) -> bool {
    // JSON round trips may move a float by an ulp or so; sums add up such errors.
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn content_diff(sent: &SimEvent, stored: &StoredEvent) -> Option<String> {
    match parse_ts(&stored.ts) {
        Some(ts) if ts == sent.ts_ms => {}
        _ => {
            return Some(format!(
                "ts {} instead of {}",
                stored.ts,
                crate::chaos::format_ts(sent.ts_ms)
            ))
        }
    }
    if stored.kind != sent.sample.kind {
        return Some(format!(
            "type {:?} instead of {:?}",
            stored.kind, sent.sample.kind
        ));
    }
    if stored.metrics.len() != sent.sample.metrics.len() {
        return Some(format!(
            "{} metrics instead of {}",
            stored.metrics.len(),
            sent.sample.metrics.len()
        ));
    }
    for (name, v) in &sent.sample.metrics {
        match stored.metrics.get(name).and_then(|x| x.as_f64()) {
            Some(s) if close(s, *v) => {}
            other => return Some(format!("metric {name} is {other:?} instead of {v}")),
        }
    }
    if stored.attrs.len() != sent.sample.attrs.len() {
        return Some(format!(
            "{} attrs instead of {}",
            stored.attrs.len(),
            sent.sample.attrs.len()
        ));
    }
    for (name, v) in &sent.sample.attrs {
        if stored.attrs.get(name).and_then(|x| x.as_str()) != Some(v.as_str()) {
            return Some(format!("attr {name} differs"));
        }
    }
    None
}

/// Compares one device's ledger with its stored events. Returns the problems and the
/// events that count (acked ones, and those in doubt that were found), for the
/// aggregates.
pub fn diff_events(
    device: &str,
    expected: &[Expected],
    stored: &[StoredEvent],
) -> (Vec<Problem>, Vec<SimEvent>) {
    let mut copies: HashMap<Uuid, Vec<&StoredEvent>> = HashMap::new();
    for s in stored {
        copies.entry(s.id).or_default().push(s);
    }
    let mut problems = Vec::new();
    let mut counted = Vec::new();
    let known: HashMap<Uuid, &Expected> = expected.iter().map(|e| (e.id, e)).collect();
    for e in expected {
        let found = copies.get(&e.id).map(Vec::as_slice).unwrap_or_default();
        let dev = || device.to_owned();
        match (e.expect, found.len()) {
            (Expect::Once, 0) => problems.push(Problem::Missing {
                device: dev(),
                id: e.id,
            }),
            (Expect::Never, n) if n > 0 => problems.push(Problem::StoredButRefused {
                device: dev(),
                id: e.id,
            }),
            (Expect::Once | Expect::AtMostOnce, n) if n > 1 => problems.push(Problem::Duplicated {
                device: dev(),
                id: e.id,
                copies: n,
            }),
            _ => {}
        }
        if e.expect != Expect::Never && !found.is_empty() {
            if let Some(sent) = &e.event {
                if let Some(what) = content_diff(sent, found[0]) {
                    problems.push(Problem::ContentDiffers {
                        device: dev(),
                        id: e.id,
                        what,
                    });
                }
                counted.push(sent.clone());
            }
        }
    }
    let mut unexpected: Vec<Uuid> = copies
        .keys()
        .filter(|id| !known.contains_key(id))
        .copied()
        .collect();
    unexpected.sort();
    for id in unexpected {
        problems.push(Problem::Unexpected {
            device: device.to_owned(),
            id,
        });
    }
    (problems, counted)
}

/// The windowed aggregates of `metric` over `events`, as the API computes them:
/// windows start at multiples of `window_ms`, empty ones are left out.
pub fn expected_windows(events: &[SimEvent], metric: &str, window_ms: i64) -> Vec<Bucket> {
    let mut windows: BTreeMap<i64, Bucket> = BTreeMap::new();
    for e in events {
        let Some(v) = e
            .sample
            .metrics
            .iter()
            .find(|(k, _)| k == metric)
            .map(|(_, v)| *v)
        else {
            continue;
        };
        let start = e.ts_ms.div_euclid(window_ms) * window_ms;
        let b = windows.entry(start).or_insert(Bucket {
            start_ms: start,
            count: 0,
            min: Some(v),
            max: Some(v),
            sum: Some(0.0),
        });
        b.count += 1;
        b.min = b.min.map(|m| m.min(v));
        b.max = b.max.map(|m| m.max(v));
        b.sum = b.sum.map(|s| s + v);
    }
    windows.into_values().collect()
}

/// Compares the ledger's windows with the API's.
pub fn diff_windows(device: &str, expected: &[Bucket], actual: &[Bucket]) -> Vec<Problem> {
    let exp: BTreeMap<i64, &Bucket> = expected.iter().map(|b| (b.start_ms, b)).collect();
    let act: BTreeMap<i64, &Bucket> = actual.iter().map(|b| (b.start_ms, b)).collect();
    let mut starts: Vec<i64> = exp.keys().chain(act.keys()).copied().collect();
    starts.sort_unstable();
    starts.dedup();
    let mut problems = Vec::new();
    let show = |v: Option<f64>| v.map_or("none".to_owned(), |v| v.to_string());
    for start in starts {
        let mut differs = |field: &'static str, e: String, a: String| {
            problems.push(Problem::WindowDiffers {
                device: device.to_owned(),
                start_ms: start,
                field,
                expected: e,
                actual: a,
            })
        };
        match (exp.get(&start), act.get(&start)) {
            (Some(e), Some(a)) => {
                if e.count != a.count {
                    differs("count", e.count.to_string(), a.count.to_string());
                }
                for (field, ev, av) in [
                    ("min", e.min, a.min),
                    ("max", e.max, a.max),
                    ("sum", e.sum, a.sum),
                ] {
                    let same = match (ev, av) {
                        (Some(x), Some(y)) => close(x, y),
                        (x, y) => x.is_none() && y.is_none(),
                    };
                    if !same {
                        differs(field, show(ev), show(av));
                    }
                }
            }
            (Some(e), None) => differs("count", e.count.to_string(), "no window".into()),
            (None, Some(a)) => differs("count", "no window".into(), a.count.to_string()),
            (None, None) => {}
        }
    }
    problems
}

/// The window used for the aggregates: `preferred_ms`, doubled until the range
/// fits in the API's window limit.
pub fn pick_window(from_ms: i64, to_ms: i64, preferred_ms: i64) -> i64 {
    let mut w = preferred_ms.max(1000) / 1000 * 1000;
    while (to_ms - from_ms + w - 1) / w > MAX_WINDOWS {
        w *= 2;
    }
    w
}

/// Reads back the whole fleet and compares it with the tally's ledger.
///
/// # Panics
///
/// Never: a tally without a ledger gives a FAIL that says so.
pub async fn verify(
    api: &Api,
    key: &str,
    fleet: &Fleet,
    tally: &Tally,
    profiles: &[Profile],
    preferred_window_ms: i64,
) -> Verification {
    let mut v = Verification {
        devices: fleet.devices.len(),
        ..Verification::default()
    };
    if !tally.has_ledger() {
        v.problems.push(Problem::QueryFailed {
            device: "*".into(),
            error: "the run kept no ledger".into(),
        });
        v.problem_count = 1;
        return v;
    }
    // Per device: what the ledger expects; over the fleet: the time range it covers.
    let mut per_device: Vec<Vec<Expected>> = Vec::with_capacity(fleet.devices.len());
    let (mut min_ts, mut max_ts) = (i64::MAX, i64::MIN);
    for i in 0..fleet.devices.len() {
        let Some(ledger) = tally.ledger(i) else {
            continue;
        };
        let ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<Expected> = ledger
            .expectations()
            .map(|(id, expect, event)| {
                if let Some(e) = event {
                    min_ts = min_ts.min(e.ts_ms);
                    max_ts = max_ts.max(e.ts_ms);
                }
                match expect {
                    Expect::Once => v.expected_once += 1,
                    Expect::AtMostOnce => v.in_doubt += 1,
                    Expect::Never => v.expected_absent += 1,
                }
                Expected {
                    id,
                    expect,
                    event: event.cloned(),
                }
            })
            .collect();
        per_device.push(list);
    }
    if min_ts > max_ts {
        // Nothing valid was sent: nothing to compare, and no proof either.
        v.pass = v.expected_once == 0;
        return v;
    }
    let window_ms = pick_window(min_ts, max_ts + 1, preferred_window_ms);
    let from = min_ts.div_euclid(window_ms) * window_ms;
    let to = (max_ts.div_euclid(window_ms) + 1) * window_ms;
    v.window_ms = window_ms;
    let window = format!("{}s", window_ms / 1000);

    let checks = stream::iter(fleet.devices.iter().zip(per_device).enumerate())
        .map(|(i, (device, expected))| {
            let metric = profiles[i % profiles.len()].primary_metric().to_owned();
            let window = window.clone();
            async move {
                let id = device.id.as_str();
                let stored = match api.all_events(key, id, from, to).await {
                    Ok(s) => s,
                    Err(e) => {
                        let p = Problem::QueryFailed {
                            device: id.to_owned(),
                            error: e.to_string(),
                        };
                        return (vec![p], 0, 0, 0);
                    }
                };
                let ids: HashSet<Uuid> = stored.iter().map(|s| s.id).collect();
                let in_doubt_stored = expected
                    .iter()
                    .filter(|e| e.expect == Expect::AtMostOnce && ids.contains(&e.id))
                    .count();
                let (mut problems, counted) = diff_events(id, &expected, &stored);
                let distinct = ids.len();
                let want = expected_windows(&counted, &metric, window_ms);
                let windows = want.len();
                match api
                    .device_aggregates(key, id, from, to, &window, &metric)
                    .await
                {
                    Ok(got) => problems.extend(diff_windows(id, &want, &got)),
                    Err(e) => problems.push(Problem::QueryFailed {
                        device: id.to_owned(),
                        error: e.to_string(),
                    }),
                }
                (problems, distinct, in_doubt_stored, windows)
            }
        })
        .buffer_unordered(VERIFY_CONCURRENCY);
    let results: Vec<_> = checks.collect().await;
    for (problems, stored, in_doubt_stored, windows) in results {
        v.stored += stored as u64;
        v.in_doubt_stored += in_doubt_stored as u64;
        v.windows_compared += windows as u64;
        v.problem_count += problems.len();
        for p in problems {
            if v.problems.len() < MAX_PROBLEMS {
                v.problems.push(p);
            }
        }
    }
    v.pass = v.problem_count == 0;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Sample;

    fn sent(n: u128, ts_ms: i64, m: f64) -> SimEvent {
        SimEvent {
            id: Uuid::from_u128(n),
            ts_ms,
            sample: Sample {
                kind: "t".into(),
                metrics: vec![("m".into(), m)],
                attrs: vec![("a".into(), "x".into())],
            },
        }
    }

    fn stored(e: &SimEvent) -> StoredEvent {
        StoredEvent {
            id: e.id,
            ts: crate::chaos::format_ts(e.ts_ms),
            kind: e.sample.kind.clone(),
            metrics: e
                .sample
                .metrics
                .iter()
                .map(|(k, v)| (k.clone(), (*v).into()))
                .collect(),
            attrs: e
                .sample
                .attrs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        }
    }

    fn exp(e: &SimEvent, expect: Expect) -> Expected {
        Expected {
            id: e.id,
            expect,
            event: Some(e.clone()),
        }
    }

    const T: i64 = 1_795_000_000_000;

    #[test]
    fn a_faithful_store_shows_no_difference() {
        let (a, b, c) = (sent(1, T, 1.0), sent(2, T + 1, 2.0), sent(3, T + 2, 3.0));
        let ledger = [
            exp(&a, Expect::Once),
            exp(&b, Expect::AtMostOnce),
            exp(&c, Expect::Never),
        ];
        let (problems, counted) = diff_events("d", &ledger, &[stored(&a), stored(&b)]);
        assert_eq!(problems, vec![]);
        assert_eq!(counted, vec![a.clone(), b.clone()]);
        // In doubt and not stored is fine too.
        let (problems, counted) = diff_events("d", &ledger, &[stored(&a)]);
        assert_eq!(problems, vec![]);
        assert_eq!(counted, vec![a]);
    }

    #[test]
    fn every_kind_of_difference_is_named() {
        let (a, b, c) = (sent(1, T, 1.0), sent(2, T, 2.0), sent(3, T, 3.0));
        let mut changed = stored(&b);
        changed.metrics.insert("m".into(), 2.5.into());
        let stray = sent(9, T, 0.0);
        let ledger = [
            exp(&a, Expect::Once),
            exp(&b, Expect::Once),
            exp(&c, Expect::Never),
        ];
        let d = |s: &str| s.to_owned();
        // a missing, b changed and duplicated, c stored though refused, 9 unknown.
        let (problems, _) = diff_events(
            "d",
            &ledger,
            &[changed.clone(), changed, stored(&c), stored(&stray)],
        );
        assert!(problems.contains(&Problem::Missing {
            device: d("d"),
            id: a.id
        }));
        assert!(problems.contains(&Problem::Duplicated {
            device: d("d"),
            id: b.id,
            copies: 2
        }));
        assert!(problems.contains(&Problem::StoredButRefused {
            device: d("d"),
            id: c.id
        }));
        assert!(problems.contains(&Problem::Unexpected {
            device: d("d"),
            id: stray.id
        }));
        assert!(problems.iter().any(|p| matches!(p,
            Problem::ContentDiffers { id, what, .. } if *id == b.id && what.contains("metric m"))));
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn windows_aggregate_like_the_api() {
        let events = [
            sent(1, T + 100, 5.0),
            sent(2, T + 9_999, -1.0),
            sent(3, T + 10_000, 2.0),
        ];
        let w = expected_windows(&events, "m", 10_000);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].start_ms, T);
        assert_eq!(
            (w[0].count, w[0].min, w[0].max, w[0].sum),
            (2, Some(-1.0), Some(5.0), Some(4.0))
        );
        assert_eq!((w[1].count, w[1].sum), (1, Some(2.0)));
        assert!(expected_windows(&events, "other", 10_000).is_empty());
    }

    #[test]
    fn window_differences_are_reported_field_by_field() {
        let events = [
            sent(1, T, 5.0),
            sent(2, T + 1, 1.0),
            sent(3, T + 20_000, 2.0),
        ];
        let want = expected_windows(&events, "m", 10_000);
        assert!(diff_windows("d", &want, &want).is_empty());
        let mut got = want.clone();
        got[0].count = 3;
        got[0].max = Some(7.0);
        got[0].sum = Some(6.0 + 1e-12);
        got.remove(1);
        let problems = diff_windows("d", &want, &got);
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| match p {
                Problem::WindowDiffers { field, .. } => *field,
                _ => "other",
            })
            .collect();
        // The sum is within rounding; the missing second window shows as a count.
        assert_eq!(fields, vec!["count", "max", "count"]);
    }

    #[test]
    fn the_window_grows_to_fit_the_api_limit() {
        assert_eq!(pick_window(0, 60_000, 10_000), 10_000);
        let w = pick_window(0, 86_400_000 * 2, 10_000);
        assert!(86_400_000 * 2 / w <= MAX_WINDOWS);
        assert_eq!(pick_window(0, 1000, 1500), 1000);
    }
}
