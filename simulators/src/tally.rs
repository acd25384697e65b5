//! The simulator's own account of a run: counters for the report, the latency
//! histogram, and (for `--verify`) a ledger of every event id and what became of it.
//!
//! Counters are atomics, so senders never wait on each other to count. The ledger
//! is one mutex per device: a device's sends are few and short-lived compared with
//! a network round trip, so the locks are uncontended in practice.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::chaos::{Planned, SimEvent};

/// What the sender learnt about one send of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged: durable (HTTP 2xx, MQTT PUBACK).
    Acked,
    /// Refused: nothing stored (HTTP 4xx, including 429 after the last retry).
    Rejected,
    /// No answer: the event may or may not be stored (errors, timeouts, 5xx).
    Failed,
    /// Sent with no acknowledgement by design (MQTT QoS 0).
    Unconfirmed,
}

/// What verification may expect of one event id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Stored exactly once: some send of it was acknowledged.
    Once,
    /// Stored at most once: no send was acknowledged, but some may have landed.
    AtMostOnce,
    /// Never stored: it is invalid, or every send of it was refused.
    Never,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The content, for valid events; `None` for invalid ones.
    event: Option<SimEvent>,
    acked: bool,
    maybe: bool,
}

/// The ledger of one device.
#[derive(Debug, Default)]
pub struct DeviceLedger {
    entries: HashMap<Uuid, Entry>,
}

impl DeviceLedger {
    fn plan(&mut self, p: &Planned) {
        let event = match p {
            Planned::Fresh { event, .. } | Planned::Resend(event) => Some(event.clone()),
            Planned::Invalid(_) => None,
        };
        self.entries.entry(p.id()).or_insert(Entry {
            event,
            acked: false,
            maybe: false,
        });
    }

    fn settle(&mut self, id: Uuid, outcome: Outcome) {
        if let Some(e) = self.entries.get_mut(&id) {
            match outcome {
                Outcome::Acked => e.acked = true,
                Outcome::Failed | Outcome::Unconfirmed => e.maybe = true,
                Outcome::Rejected => {}
            }
        }
    }

    /// Every id with what may be expected of it, and its content when valid.
    pub fn expectations(&self) -> impl Iterator<Item = (Uuid, Expect, Option<&SimEvent>)> {
        self.entries.iter().map(|(id, e)| {
            let expect = match (&e.event, e.acked, e.maybe) {
                // An invalid event must never be stored, even if a protocol
                // acknowledged it (MQTT PUBACKs poison messages on purpose).
                (None, _, _) => Expect::Never,
                (Some(_), true, _) => Expect::Once,
                (Some(_), false, true) => Expect::AtMostOnce,
                (Some(_), false, false) => Expect::Never,
            };
            (*id, expect, e.event.as_ref())
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Counts, by event (a message of k events counts k).
#[derive(Debug, Default)]
pub struct Counters {
    pub messages: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub rejected: AtomicU64,
    pub failed: AtomicU64,
    pub unconfirmed: AtomicU64,
    pub resent: AtomicU64,
    pub late: AtomicU64,
    pub invalid: AtomicU64,
    pub retries: AtomicU64,
    pub bytes: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub messages: u64,
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    pub failed: u64,
    pub unconfirmed: u64,
    pub resent: u64,
    pub late: u64,
    pub invalid: u64,
    pub retries: u64,
    pub bytes: u64,
}

/// Everything a run counts.
pub struct Tally {
    pub counters: Counters,
    /// Ack latency in microseconds, 1 µs to 1 h at 3 significant digits.
    latency: Mutex<Histogram<u64>>,
    /// Why events were refused or failed: HTTP status or error kind, by event.
    reasons: Mutex<BTreeMap<String, u64>>,
    ledgers: Option<Vec<Mutex<DeviceLedger>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain counters behind, still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tally {
    /// `ledger`: keep every id for verification (memory grows with the event count).
    pub fn new(devices: usize, ledger: bool) -> Self {
        Self {
            counters: Counters::default(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"),
            ),
            reasons: Mutex::new(BTreeMap::new()),
            ledgers: ledger.then(|| (0..devices).map(|_| Mutex::default()).collect()),
        }
    }

    /// Records the sends of one message before it goes out.
    pub fn plan(&self, device: usize, items: &[Planned], bytes: usize) {
        let c = &self.counters;
        c.messages.fetch_add(1, Ordering::Relaxed);
        c.sent.fetch_add(items.len() as u64, Ordering::Relaxed);
        c.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        for p in items {
            match p {
                Planned::Fresh { late: true, .. } => c.late.fetch_add(1, Ordering::Relaxed),
                Planned::Resend(_) => c.resent.fetch_add(1, Ordering::Relaxed),
                Planned::Invalid(_) => c.invalid.fetch_add(1, Ordering::Relaxed),
                Planned::Fresh { .. } => 0,
            };
        }
        if let Some(l) = self.ledger(device) {
            let mut l = lock(l);
            for p in items {
                l.plan(p);
            }
        }
    }

    /// Records what became of a message's events. `reason` explains a refusal or
    /// failure; `latency` is the time to the acknowledgement.
    pub fn settle(
        &self,
        device: usize,
        ids: impl IntoIterator<Item = Uuid>,
        n: usize,
        outcome: Outcome,
        reason: Option<&str>,
        latency: Option<Duration>,
    ) {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Acked => &c.acked,
            Outcome::Rejected => &c.rejected,
            Outcome::Failed => &c.failed,
            Outcome::Unconfirmed => &c.unconfirmed,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(r) = reason {
            *lock(&self.reasons).entry(r.to_owned()).or_default() += n as u64;
        }
        if let Some(d) = latency {
            let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
            // In bounds by the clamp, so recording cannot fail.
            let _ = lock(&self.latency).record(us);
        }
        if let Some(l) = self.ledger(device) {
            let mut l = lock(l);
            for id in ids {
                l.settle(id, outcome);
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            messages: g(&c.messages),
            sent: g(&c.sent),
            acked: g(&c.acked),
            rejected: g(&c.rejected),
            failed: g(&c.failed),
            unconfirmed: g(&c.unconfirmed),
            resent: g(&c.resent),
            late: g(&c.late),
            invalid: g(&c.invalid),
            retries: g(&c.retries),
            bytes: g(&c.bytes),
        }
    }

    /// A copy of the latency histogram.
    pub fn latency(&self) -> Histogram<u64> {
        lock(&self.latency).clone()
    }

    pub fn reasons(&self) -> BTreeMap<String, u64> {
        lock(&self.reasons).clone()
    }

    /// The ledger of a device, when the run keeps one.
    pub fn ledger(&self, device: usize) -> Option<&Mutex<DeviceLedger>> {
        self.ledgers.as_ref().and_then(|l| l.get(device))
    }

    pub fn has_ledger(&self) -> bool {
        self.ledgers.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Sample;

    fn event(n: u128) -> SimEvent {
        SimEvent {
            id: Uuid::from_u128(n),
            ts_ms: 1_795_000_000_000,
            sample: Sample {
                kind: "t".into(),
                metrics: vec![("m".into(), 1.0)],
                attrs: vec![],
            },
        }
    }

    fn expect_of(t: &Tally, id: u128) -> Expect {
        let l = t.ledger(0).unwrap().lock().unwrap();
        let found = l
            .expectations()
            .find(|(i, _, _)| *i == Uuid::from_u128(id))
            .map(|(_, e, _)| e);
        found.unwrap()
    }

    #[test]
    fn an_ack_on_any_send_makes_an_event_expected_once() {
        let t = Tally::new(1, true);
        let e = event(1);
        t.plan(
            0,
            &[Planned::Fresh {
                event: e.clone(),
                late: false,
            }],
            10,
        );
        t.settle(0, [e.id], 1, Outcome::Failed, Some("timeout"), None);
        assert_eq!(expect_of(&t, 1), Expect::AtMostOnce);
        t.plan(0, &[Planned::Resend(e.clone())], 10);
        t.settle(
            0,
            [e.id],
            1,
            Outcome::Acked,
            None,
            Some(Duration::from_millis(3)),
        );
        assert_eq!(expect_of(&t, 1), Expect::Once);
        // A later refusal does not undo the ack.
        t.settle(0, [e.id], 1, Outcome::Rejected, Some("429"), None);
        assert_eq!(expect_of(&t, 1), Expect::Once);
        let s = t.snapshot();
        assert_eq!(
            (s.sent, s.acked, s.failed, s.rejected, s.resent),
            (2, 1, 1, 1, 1)
        );
        assert_eq!(t.reasons().get("429"), Some(&1));
        assert_eq!(t.latency().len(), 1);
    }

    #[test]
    fn refused_and_invalid_events_are_expected_never() {
        let t = Tally::new(1, true);
        t.plan(
            0,
            &[Planned::Fresh {
                event: event(2),
                late: true,
            }],
            10,
        );
        t.settle(
            0,
            [Uuid::from_u128(2)],
            1,
            Outcome::Rejected,
            Some("429"),
            None,
        );
        assert_eq!(expect_of(&t, 2), Expect::Never);
        let bad = crate::chaos::InvalidEvent {
            id: Uuid::from_u128(3),
            body: serde_json::json!({}),
            flaw: "test",
        };
        t.plan(0, &[Planned::Invalid(bad)], 10);
        // MQTT QoS 1 acknowledges a poison message; it must still not be stored.
        t.settle(0, [Uuid::from_u128(3)], 1, Outcome::Acked, None, None);
        assert_eq!(expect_of(&t, 3), Expect::Never);
        let s = t.snapshot();
        assert_eq!((s.late, s.invalid), (1, 1));
    }

    #[test]
    fn qos0_sends_may_or_may_not_be_stored() {
        let t = Tally::new(1, true);
        t.plan(
            0,
            &[Planned::Fresh {
                event: event(4),
                late: false,
            }],
            10,
        );
        t.settle(0, [Uuid::from_u128(4)], 1, Outcome::Unconfirmed, None, None);
        assert_eq!(expect_of(&t, 4), Expect::AtMostOnce);
    }

    #[test]
    fn without_a_ledger_only_counters_are_kept() {
        let t = Tally::new(3, false);
        t.plan(
            1,
            &[Planned::Fresh {
                event: event(5),
                late: false,
            }],
            10,
        );
        t.settle(1, [Uuid::from_u128(5)], 1, Outcome::Acked, None, None);
        assert!(t.ledger(1).is_none());
        assert_eq!(t.snapshot().acked, 1);
    }
}
