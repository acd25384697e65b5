//! The minutes this instance has marked pending in `pending_minutes` and not yet
//! recomputed (see `rollup.rs` for why minutes are marked).
//!
//! One marker row per minute and recomputation, not per flush: a flush that writes
//! into a minute this instance already marked joins that mark instead of writing its
//! own. Every marker row becomes a tombstone once recomputed, and tombstones are what
//! Cassandra reads slowly, then refuses to read (`READ_TOO_MANY_TOMBSTONES`); a busy
//! device flushes a hundred times a minute.
//!
//! A mark may be recomputed only once every flush that joined it has its events
//! durable (`writers` is back to zero), and must then not be joined any more: a
//! recomputation takes the mark out of the table under the lock, so the next flush
//! into that minute opens (and writes) a new one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::rows::{ms, PendingRow};
use crate::model::{DeviceId, UserId};

/// A partition of minute rollups holds one device's UTC day.
pub(super) const DAY_MS: i64 = 86_400_000;

/// A minute is recomputed once no flush has touched it for this long: a device's
/// current minute keeps receiving events until it ends, and reading it again after
/// every flush would cost a read of the whole minute per flush.
const QUIET: Duration = Duration::from_secs(1);

/// A mark older than this is closed to new flushes (they open a new one), so that a
/// minute written without pause is still recomputed every few seconds.
const MAX_AGE: Duration = Duration::from_secs(30);

/// (user, device, minute).
pub(super) type MinuteKey = (UserId, DeviceId, i64);

/// The marker row of a mark.
pub(super) fn marker_row(key: MinuteKey, marker: Uuid) -> PendingRow {
    let (user_id, device_id, minute) = key;
    PendingRow {
        user_id,
        device_id,
        minute: ms(minute),
        flush: marker,
    }
}

struct Mark {
    marker: Uuid,
    /// Flushes that joined the mark and have not finished writing.
    writers: usize,
    opened: Instant,
    touched: Instant,
}

#[derive(Default)]
struct Marks {
    open: HashMap<MinuteKey, Mark>,
    /// Marks too old to join, waiting for their writers.
    closed: Vec<(MinuteKey, Mark)>,
}

#[derive(Default)]
pub(super) struct Pending {
    marks: Mutex<Marks>,
}

/// A flush's hold on its minutes' marks; released (the flush's events are durable, or
/// it failed) when dropped.
pub(super) struct Claim<'a> {
    pending: &'a Pending,
    held: Vec<(MinuteKey, Uuid)>,
}

impl Pending {
    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins this instance's mark of each minute, opening one where there is none.
    /// Returns the claim, and the marker rows of the new marks: they must be written
    /// before the flush's events.
    pub(super) fn claim(
        &self,
        keys: impl IntoIterator<Item = MinuteKey>,
    ) -> (Claim<'_>, Vec<PendingRow>) {
        let now = Instant::now();
        let mut marks = self.marks();
        let mut held = Vec::new();
        let mut new_rows = Vec::new();
        for key in keys {
            let mark = marks.open.entry(key).or_insert_with(|| {
                let marker = Uuid::now_v7();
                new_rows.push(marker_row(key, marker));
                Mark {
                    marker,
                    writers: 0,
                    opened: now,
                    touched: now,
                }
            });
            mark.writers += 1;
            held.push((key, mark.marker));
        }
        (
            Claim {
                pending: self,
                held,
            },
            new_rows,
        )
    }

    /// Takes the marks due for recomputation at `now`: those no flush is writing into
    /// that are quiet, too old, or (with `all`) any. Each comes out of the table.
    pub(super) fn take_due(&self, now: Instant, all: bool) -> Vec<(MinuteKey, Uuid)> {
        let mut marks = self.marks();
        let Marks { open, closed } = &mut *marks;
        let mut due = Vec::new();
        open.retain(|key, m| {
            let old = now.duration_since(m.opened) >= MAX_AGE;
            if m.writers == 0 && (all || old || now.duration_since(m.touched) >= QUIET) {
                due.push((*key, m.marker));
                false
            } else if old {
                closed.push((
                    *key,
                    Mark {
                        marker: m.marker,
                        writers: m.writers,
                        opened: m.opened,
                        touched: m.touched,
                    },
                ));
                false
            } else {
                true
            }
        });
        closed.retain(|(key, m)| {
            if m.writers == 0 {
                due.push((*key, m.marker));
                false
            } else {
                true
            }
        });
        due
    }

    /// Whether `marker` is one of this instance's marks still in the table.
    pub(super) fn holds(&self, key: MinuteKey, marker: Uuid) -> bool {
        let marks = self.marks();
        marks.open.get(&key).is_some_and(|m| m.marker == marker)
            || marks
                .closed
                .iter()
                .any(|(k, m)| *k == key && m.marker == marker)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut marks = self.pending.marks();
        let Marks { open, closed } = &mut *marks;
        for (key, marker) in &self.held {
            let mark = match open.get_mut(key) {
                Some(m) if m.marker == *marker => Some(m),
                _ => closed
                    .iter_mut()
                    .find(|(k, m)| k == key && m.marker == *marker)
                    .map(|(_, m)| m),
            };
            if let Some(m) = mark {
                m.writers -= 1;
                m.touched = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(minute: i64) -> MinuteKey {
        (1, Uuid::nil(), minute)
    }

    #[test]
    fn flushes_into_a_marked_minute_join_its_mark() {
        let p = Pending::default();
        let (a, rows) = p.claim([key(0), key(60_000)]);
        assert_eq!(rows.len(), 2, "two new marks, two rows to write");
        let (b, rows) = p.claim([key(0)]);
        assert!(rows.is_empty(), "joined, nothing to write");
        drop(a);
        let first = p.take_due(Instant::now(), true);
        assert_eq!(
            first.iter().map(|d| d.0).collect::<Vec<_>>(),
            [key(60_000)],
            "the joined minute waits for its other writer"
        );
        drop(b);
        let due = p.take_due(Instant::now(), true);
        assert_eq!(due.len(), 1);
        // Taken out: the next flush opens a new mark, with a row of its own.
        let (_c, rows) = p.claim([key(0)]);
        assert_eq!(rows.len(), 1);
        assert_ne!(rows[0].flush, due.iter().find(|d| d.0 == key(0)).unwrap().1);
    }

    #[test]
    fn a_mark_waits_for_quiet_and_an_old_one_is_closed_to_new_flushes() {
        let p = Pending::default();
        drop(p.claim([key(0)]).0);
        let now = Instant::now();
        assert!(p.take_due(now, false).is_empty(), "just touched");
        assert_eq!(p.take_due(now + QUIET, false).len(), 1);

        let (held, rows) = p.claim([key(0)]);
        let later = Instant::now() + MAX_AGE;
        assert!(p.take_due(later, false).is_empty(), "still being written");
        let (_later, new_rows) = p.claim([key(0)]);
        assert_eq!(new_rows.len(), 1, "an old mark is not joined");
        assert!(p.holds(key(0), rows[0].flush));
        drop(held);
        let due = p.take_due(later, false);
        assert_eq!(due, vec![(key(0), rows[0].flush)]);
    }
}
