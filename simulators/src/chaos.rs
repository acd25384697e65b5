//! What a device actually sends: fresh readings, plus the things real fleets do:
//! late and out-of-order events (buffered while offline), resends of an event
//! already sent (same id, after a lost ack) and invalid payloads (firmware bugs).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use uuid::Uuid;

use crate::profile::{DeviceModel, Sample};

/// Fractions of each kind of misbehaviour, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Chaos {
    /// Share of fresh events whose `ts` lies in the past, up to `late_by_ms`.
    pub late: f64,
    pub late_by_ms: i64,
    /// Share of sends that resend an event already sent.
    pub duplicates: f64,
    /// Share of sends that are invalid.
    pub invalid: f64,
}

impl Chaos {
    pub const NONE: Chaos = Chaos {
        late: 0.0,
        late_by_ms: 0,
        duplicates: 0.0,
        invalid: 0.0,
    };

    /// # Errors
    ///
    /// A fraction outside `[0, 1]`, or duplicates and invalid over 1 together.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("--late", self.late),
            ("--duplicates", self.duplicates),
            ("--invalid", self.invalid),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} must be a fraction from 0 to 1, not {v}"));
            }
        }
        if self.duplicates + self.invalid > 1.0 {
            return Err("--duplicates and --invalid add up to more than 1".into());
        }
        if self.late > 0.0 && self.late_by_ms < 1000 {
            return Err("--late-by must be at least 1s".into());
        }
        Ok(())
    }
}

/// A valid event, as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct SimEvent {
    pub id: Uuid,
    pub ts_ms: i64,
    pub sample: Sample,
}

/// An event iotpipe must refuse, and why.
#[derive(Debug, Clone)]
pub struct InvalidEvent {
    pub id: Uuid,
    pub body: serde_json::Value,
    pub flaw: &'static str,
}

/// One send of a device.
#[derive(Debug, Clone)]
pub enum Planned {
    Fresh { event: SimEvent, late: bool },
    Resend(SimEvent),
    Invalid(InvalidEvent),
}

impl Planned {
    pub fn id(&self) -> Uuid {
        match self {
            Planned::Fresh { event, .. } | Planned::Resend(event) => event.id,
            Planned::Invalid(i) => i.id,
        }
    }
}

/// How many recent events a device may resend: a device only keeps a short outbox.
const OUTBOX: usize = 32;

/// One device's stream of sends.
pub struct DeviceStream {
    model: DeviceModel,
    chaos: Chaos,
    rng: StdRng,
    outbox: VecDeque<SimEvent>,
}

impl DeviceStream {
    pub fn new(model: DeviceModel, chaos: Chaos, seed: u64) -> Self {
        Self {
            model,
            chaos,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed_c4a0_5000_0000),
            outbox: VecDeque::with_capacity(OUTBOX),
        }
    }

    /// The next send, stamped relative to `now_ms`.
    pub fn next(&mut self, now_ms: i64) -> Planned {
        let roll: f64 = self.rng.random();
        if roll < self.chaos.invalid {
            return Planned::Invalid(self.invalid(now_ms));
        }
        if roll < self.chaos.invalid + self.chaos.duplicates && !self.outbox.is_empty() {
            let i = self.rng.random_range(0..self.outbox.len());
            return Planned::Resend(self.outbox[i].clone());
        }
        let late = self.chaos.late > 0.0 && self.rng.random_bool(self.chaos.late);
        let ts_ms = if late {
            now_ms - self.rng.random_range(1000..=self.chaos.late_by_ms)
        } else {
            now_ms
        };
        let event = SimEvent {
            id: Uuid::new_v4(),
            ts_ms,
            sample: self.model.next_sample(),
        };
        if self.chaos.duplicates > 0.0 {
            if self.outbox.len() == OUTBOX {
                self.outbox.pop_front();
            }
            self.outbox.push_back(event.clone());
        }
        Planned::Fresh { event, late }
    }

    fn invalid(&mut self, now_ms: i64) -> InvalidEvent {
        let id = Uuid::new_v4();
        let base = SimEvent {
            id,
            ts_ms: now_ms,
            sample: self.model.next_sample(),
        };
        let mut body = serde_json::to_value(&base).unwrap_or_default();
        let flaw = match self.rng.random_range(0..6) {
            0 => {
                body["type"] = "bad type!".into();
                "type with a space and '!'"
            }
            1 => {
                body["metrics"]["reading"] = "high".into();
                "metric that is not a number"
            }
            2 => {
                body["colour"] = "red".into();
                "unknown top-level field"
            }
            3 => {
                body["ts"] = format_ts(now_ms + 86_400_000).into();
                "ts a day in the future"
            }
            4 => {
                body["ts"] = "1999-12-31T23:59:59.000Z".into();
                "ts before 2000"
            }
            _ => {
                body["attrs"]["note"] = "x".repeat(1025).into();
                "attr over 1 KiB"
            }
        };
        InvalidEvent { id, body, flaw }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.sssZ`, as in the contract.
pub fn format_ts(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses an RFC 3339 instant into ms.
pub fn parse_ts(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

struct Pairs<'a, V>(&'a [(String, V)]);

impl<V: Serialize> Serialize for Pairs<'_, V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl Serialize for SimEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("ts", &format_ts(self.ts_ms))?;
        map.serialize_entry("type", &self.sample.kind)?;
        map.serialize_entry("metrics", &Pairs(&self.sample.metrics))?;
        map.serialize_entry("attrs", &Pairs(&self.sample.attrs))?;
        map.end()
    }
}

/// The wire form of a message: one object, or an array when `batch` is set.
pub fn encode(items: &[Planned], as_array: bool) -> Vec<u8> {
    fn one(p: &Planned, out: &mut Vec<u8>) {
        let r = match p {
            Planned::Fresh { event, .. } | Planned::Resend(event) => {
                serde_json::to_writer(&mut *out, event)
            }
            Planned::Invalid(i) => serde_json::to_writer(&mut *out, &i.body),
        };
        // Writing JSON into a Vec cannot fail: no I/O, and every key is a string.
        debug_assert!(r.is_ok());
    }
    let mut out = Vec::with_capacity(256 * items.len());
    if !as_array && items.len() == 1 {
        one(&items[0], &mut out);
        return out;
    }
    out.push(b'[');
    for (i, p) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        one(p, &mut out);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::Profile;

    fn stream(chaos: Chaos) -> DeviceStream {
        DeviceStream::new(Profile::EnvSensor.model(0, 1), chaos, 1)
    }

    #[test]
    fn fractions_come_out_about_right() {
        let chaos = Chaos {
            late: 0.2,
            late_by_ms: 30_000,
            duplicates: 0.1,
            invalid: 0.05,
        };
        let mut s = stream(chaos);
        let now = 1_795_000_000_000;
        let (mut late, mut dup, mut bad, n) = (0, 0, 0, 20_000);
        for _ in 0..n {
            match s.next(now) {
                Planned::Fresh { event, late: l } => {
                    if l {
                        late += 1;
                        assert!(event.ts_ms <= now - 1000 && event.ts_ms >= now - 30_000);
                    } else {
                        assert_eq!(event.ts_ms, now);
                    }
                }
                Planned::Resend(_) => dup += 1,
                Planned::Invalid(_) => bad += 1,
            }
        }
        let share = |k: i32| f64::from(k) / f64::from(n);
        assert!((share(dup) - 0.1).abs() < 0.02, "dup {}", share(dup));
        assert!((share(bad) - 0.05).abs() < 0.01, "bad {}", share(bad));
        // Late is a share of the fresh events.
        let fresh = n - dup - bad;
        assert!((f64::from(late) / f64::from(fresh) - 0.2).abs() < 0.02);
    }

    #[test]
    fn a_resend_repeats_an_earlier_event_exactly() {
        let mut s = stream(Chaos {
            duplicates: 0.5,
            ..Chaos::NONE
        });
        let mut sent = std::collections::HashMap::new();
        let mut resends = 0;
        for i in 0..1_000 {
            match s.next(1_795_000_000_000 + i) {
                Planned::Fresh { event, .. } => {
                    assert!(sent.insert(event.id, event).is_none(), "fresh ids are new");
                }
                Planned::Resend(e) => {
                    assert_eq!(sent.get(&e.id), Some(&e));
                    resends += 1;
                }
                Planned::Invalid(_) => unreachable!("no invalid share"),
            }
        }
        assert!(resends > 300);
    }

    #[test]
    fn without_chaos_every_send_is_fresh_and_on_time() {
        let mut s = stream(Chaos::NONE);
        for _ in 0..1_000 {
            assert!(matches!(s.next(5), Planned::Fresh { late: false, .. }));
        }
    }

    #[test]
    fn invalid_events_break_exactly_one_rule_and_keep_their_id() {
        let mut s = stream(Chaos {
            invalid: 1.0,
            ..Chaos::NONE
        });
        let mut flaws = std::collections::HashSet::new();
        for _ in 0..200 {
            let Planned::Invalid(i) = s.next(1_795_000_000_000) else {
                panic!("expected an invalid event")
            };
            assert_eq!(i.body["id"], serde_json::json!(i.id));
            flaws.insert(i.flaw);
        }
        assert_eq!(flaws.len(), 6);
    }

    #[test]
    fn the_wire_form_is_the_contract_event() {
        let e = SimEvent {
            id: Uuid::from_u128(1),
            ts_ms: 1_795_000_000_123,
            sample: Sample {
                kind: "meter".into(),
                metrics: vec![("a".into(), 1.5)],
                attrs: vec![("fw".into(), "1".into())],
            },
        };
        let one = encode(&[Planned::Resend(e.clone())], false);
        let v: serde_json::Value = serde_json::from_slice(&one).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "00000000-0000-0000-0000-000000000001",
                "ts": "2026-11-18T11:06:40.123Z", "type": "meter",
                "metrics": {"a": 1.5}, "attrs": {"fw": "1"}})
        );
        let two = encode(&[Planned::Resend(e.clone()), Planned::Resend(e)], true);
        let v: serde_json::Value = serde_json::from_slice(&two).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 2);
        assert_eq!(
            parse_ts("2026-11-18T11:06:40.123Z"),
            Some(1_795_000_000_123)
        );
    }

    #[test]
    fn bad_fractions_are_refused() {
        let c = Chaos {
            duplicates: 0.7,
            invalid: 0.5,
            ..Chaos::NONE
        };
        assert!(c.check().is_err());
        let c = Chaos {
            late: 1.5,
            ..Chaos::NONE
        };
        assert!(c.check().is_err());
    }
}
