//! The newest value of each metric of each device, as both stores keep it: written with
//! the events, and never replaced by an older event, so a late event cannot make a
//! dashboard's "current" value go back in time.

use rustc_hash::FxHashMap as HashMap;

use crate::model::{DeviceId, Record, UserId};

/// One device's newest value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    pub device_id: DeviceId,
    pub metric: String,
    pub ts_ms: i64,
    pub value: f64,
}

/// Whether `(ts, value)` replaces `old`: a later `ts` wins; at the same `ts` the larger
/// value, so that every engine and every order of arrival settle on the same one.
pub fn is_newer(ts_ms: i64, value: f64, old: (i64, f64)) -> bool {
    ts_ms > old.0 || (ts_ms == old.0 && value.total_cmp(&old.1).is_gt())
}

/// The newest value per (user, device, metric) among `records`.
pub fn newest<'a>(
    records: impl IntoIterator<Item = &'a Record>,
) -> HashMap<(UserId, DeviceId, &'a str), (i64, f64)> {
    let mut out: HashMap<(UserId, DeviceId, &str), (i64, f64)> = HashMap::default();
    for r in records {
        for (metric, v) in &r.event.metrics {
            let ts = r.event.ts_ms;
            out.entry((r.user_id, r.device_id, metric))
                .and_modify(|old| {
                    if is_newer(ts, *v, *old) {
                        *old = (ts, *v);
                    }
                })
                .or_insert((ts, *v));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Event;

    fn record(ts_ms: i64, v: f64) -> Record {
        Record {
            user_id: 1,
            device_id: DeviceId::nil(),
            received_ms: 0,
            event: Event {
                id: uuid::Uuid::new_v4(),
                id_assigned: false,
                ts_ms,
                kind: "t".into(),
                metrics: vec![("temp".into(), v)],
                attrs: vec![],
            },
        }
    }

    #[test]
    fn the_latest_ts_wins_whatever_the_order_and_ties_go_to_the_larger_value() {
        let rs = [record(20, 1.0), record(30, 2.0), record(10, 3.0)];
        assert_eq!(newest(&rs)[&(1, DeviceId::nil(), "temp")], (30, 2.0));
        assert!(is_newer(30, 5.0, (30, 2.0)));
        assert!(!is_newer(30, 1.0, (30, 2.0)));
        assert!(!is_newer(29, 9.0, (30, 2.0)));
        assert!(!is_newer(30, 2.0, (30, 2.0)), "a repeat is not newer");
    }
}
