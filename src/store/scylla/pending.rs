//! The minutes this instance has marked pending, not yet recomputed (see `rollup.rs`
//! for why minutes are marked, `fleet.rs` for the per-user rows).
//!
//! Marks live at two grains. In memory, one mark per minute and recomputation, not
//! per flush: a flush that writes into a minute this instance already marked joins
//! that mark, and the mark is recomputed once quiet. In the tables, one mark per
//! (device, hour) at a time: every minute mark opened in an hour joins the instance's
//! mark of that hour, whose row in `pending_by_device` holds the minutes (a set,
//! added to as minutes join). Hour marks of a device's day opened within `MAX_AGE` of
//! each other share their id and one row in `pending_by_user` (its `hour` is the
//! day's start), which names the day for fleet reads: a **day mark**. Every row
//! becomes a tombstone once recomputed, and tombstones are what Cassandra reads
//! slowly, then refuses to read (`READ_TOO_MANY_TOMBSTONES`): a fleet's flush of a day
//! of one device writes 24 device rows, not 1,440, and one row by user, not 24 (after
//! a backfill of 1,000 devices, fleet reads walked 24,000 tombstones: 6 ms of the
//! node's CPU each).
//!
//! A minute mark may be recomputed only once every flush that joined it has its
//! events durable (`writers` is back to zero), and must then not be joined any more:
//! a recomputation takes the mark out of the table under the lock, so the next flush
//! into that minute opens a new one. An hour mark's rows are deleted once the last
//! minute mark that joined it has been recomputed at every level; if any of them
//! failed, they stay for the sweep. An hour mark too old to join (`MAX_AGE`) makes
//! new minutes open another, so that the sweep, which waits far longer, never deletes
//! a mark still being joined. A day mark's row is deleted once its last hour mark
//! ends, and stays if any of them stayed. A day mark takes no new hour once one of
//! its hours has ended, so an hour never has two marks with the same id.
//!
//! A flush that joins a mark whose rows another flush is still writing writes them
//! too (the same keys and set elements: no second tombstone): its own events must not
//! become durable before the rows that cover them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use uuid::Uuid;

use super::rows::{ms, PendingAddIn, PendingHourRow, PendingRow};
use crate::model::{bucket_start, DeviceId, UserId};

/// A partition of minute rollups holds one device's UTC day.
pub(super) const DAY_MS: i64 = 86_400_000;

pub(super) const HOUR_MS: i64 = 3_600_000;

/// A partition of `pending_by_user` holds one user's 28 days.
pub(super) const HOUR_SLAB_MS: i64 = 28 * DAY_MS;

/// A minute is recomputed once no flush has touched it for this long: a device's
/// current minute keeps receiving events until it ends, and reading it again after
/// every flush would cost a read of the whole minute per flush.
const QUIET: Duration = Duration::from_secs(1);

/// A mark older than this is closed to new flushes (they open a new one), so that a
/// minute written without pause is still recomputed every few seconds, and so that
/// the sweep, which waits far longer, never deletes a mark that is still joined.
const MAX_AGE: Duration = Duration::from_secs(30);

/// (user, device, minute).
pub(super) type MinuteKey = (UserId, DeviceId, i64);

/// (user, device, hour).
pub(super) type HourKey = (UserId, DeviceId, i64);

/// (user, device, day): a day mark's key.
pub(super) type DayKey = (UserId, DeviceId, i64);

fn hour_of((user, device, minute): MinuteKey) -> HourKey {
    (user, device, bucket_start(minute, HOUR_MS))
}

fn day_of((user, device, hour): HourKey) -> DayKey {
    (user, device, bucket_start(hour, DAY_MS))
}

/// The offset of a minute in its hour (0-59), as `pending_by_device` keeps it.
pub(super) fn minute_offset(minute: i64) -> i32 {
    ((minute - bucket_start(minute, HOUR_MS)) / 60_000) as i32
}

/// The key of an hour mark's row in `pending_by_device`.
pub(super) fn device_row(key: HourKey, marker: Uuid) -> PendingRow {
    let (user_id, device_id, hour) = key;
    PendingRow {
        user_id,
        device_id,
        hour: ms(hour),
        flush: marker,
    }
}

/// A mark's row in `pending_by_user`: of a day mark (`key` is the day's start), or of
/// an hour mark written by an older version or carried by `iotpipe migrate`. Readers
/// take either as covering its whole day.
pub(super) fn hour_row(key: HourKey, marker: Uuid) -> PendingHourRow {
    let (user_id, device_id, hour) = key;
    PendingHourRow {
        user_id,
        slab: ms(bucket_start(hour, HOUR_SLAB_MS)),
        hour: ms(hour),
        device_id,
        flush: marker,
    }
}

struct Mark {
    marker: Uuid,
    /// The hour mark this minute's mark joined.
    hour: Uuid,
    /// Flushes that joined the mark and have not finished writing.
    writers: usize,
    opened: Instant,
    touched: Instant,
    /// Its row is known written.
    durable: bool,
}

struct HourMark {
    /// Minute marks that joined it and are not yet recomputed.
    minutes: usize,
    opened: Instant,
    /// A minute under it failed: its row stays for the sweep.
    kept: bool,
}

struct DayMark {
    /// Hour marks that share its id and have not ended.
    hours: usize,
    opened: Instant,
    /// Its row in `pending_by_user` is known written.
    durable: bool,
    /// An hour under it stayed for the sweep: so does its row.
    kept: bool,
}

/// The tables below hold a mark per pending minute (up to `store.rollup_backlog_max`)
/// and are looked up per minute of every flush: a fast hasher, not SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, RandomState>;

#[derive(Default)]
struct Marks {
    open: HashMap<MinuteKey, Mark>,
    /// Marks too old to join, waiting for their writers.
    closed: Vec<(MinuteKey, Mark)>,
    /// Every hour mark with a minute mark under it, open or not.
    hours: HashMap<(HourKey, Uuid), HourMark>,
    /// The hour mark new minute marks join.
    open_hours: HashMap<HourKey, Uuid>,
    /// Every day mark with an hour mark under it.
    days: HashMap<(DayKey, Uuid), DayMark>,
    /// The day mark new hour marks join.
    open_days: HashMap<DayKey, Uuid>,
    /// The hour mark of each minute mark taken for recomputation, until `finish`.
    taken: HashMap<Uuid, Uuid>,
}

impl Marks {
    fn mark_mut(&mut self, key: &MinuteKey, marker: Uuid) -> Option<&mut Mark> {
        match self.open.get_mut(key) {
            Some(m) if m.marker == marker => Some(m),
            _ => self
                .closed
                .iter_mut()
                .find(|(k, m)| k == key && m.marker == marker)
                .map(|(_, m)| m),
        }
    }
}

#[derive(Default)]
pub(super) struct Pending {
    marks: Mutex<Marks>,
}

/// Rows a flush must write before its events.
#[derive(Debug, Default)]
pub(super) struct Markers {
    /// Minutes to add to hour marks' rows in `pending_by_device`, one per mark.
    pub(super) minutes: Vec<PendingAddIn>,
    /// Rows of day marks in `pending_by_user`.
    pub(super) days: Vec<PendingHourRow>,
    /// The minute marks these rows cover, for [`Pending::confirm`].
    marks: Vec<(MinuteKey, Uuid)>,
}

/// Marks whose rows are to be deleted (see [`Pending::finish`]).
#[derive(Debug, Default)]
pub(super) struct Ended {
    pub(super) hours: Vec<(HourKey, Uuid)>,
    pub(super) days: Vec<(DayKey, Uuid)>,
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

    /// Joins this instance's mark of each minute, opening one where there is none,
    /// and of its hour. Returns the claim, and the marker rows not yet known written:
    /// they must be written (then [`Pending::confirm`]ed) before the flush's events.
    pub(super) fn claim(&self, keys: impl IntoIterator<Item = MinuteKey>) -> (Claim<'_>, Markers) {
        let now = Instant::now();
        let mut marks = self.marks();
        let Marks {
            open,
            hours,
            open_hours,
            days,
            open_days,
            ..
        } = &mut *marks;
        let mut held = Vec::new();
        let mut rows = Markers::default();
        let mut adds: BTreeMap<(HourKey, Uuid), Vec<i32>> = BTreeMap::new();
        let mut unwritten_days = BTreeSet::new();
        for key in keys {
            let mark = open.entry(key).or_insert_with(|| {
                let hk = hour_of(key);
                let joinable = open_hours.get(&hk).copied().filter(|id| {
                    hours
                        .get(&(hk, *id))
                        .is_some_and(|h| now.duration_since(h.opened) < MAX_AGE)
                });
                let hour = joinable.unwrap_or_else(|| {
                    // The id of the day mark it joins (opened no later than it, so
                    // closed by age no later either).
                    let dk = day_of(hk);
                    let young = |id: &Uuid| {
                        (days.get(&(dk, *id)))
                            .is_some_and(|d| now.duration_since(d.opened) < MAX_AGE)
                    };
                    let id = open_days
                        .get(&dk)
                        .copied()
                        .filter(young)
                        .unwrap_or_else(|| {
                            let id = Uuid::now_v7();
                            open_days.insert(dk, id);
                            let day = DayMark {
                                hours: 0,
                                opened: now,
                                durable: false,
                                kept: false,
                            };
                            days.insert((dk, id), day);
                            id
                        });
                    if let Some(d) = days.get_mut(&(dk, id)) {
                        d.hours += 1;
                    }
                    open_hours.insert(hk, id);
                    let mark = HourMark {
                        minutes: 0,
                        opened: now,
                        kept: false,
                    };
                    hours.insert((hk, id), mark);
                    id
                });
                if let Some(h) = hours.get_mut(&(hk, hour)) {
                    h.minutes += 1;
                }
                Mark {
                    marker: Uuid::now_v7(),
                    hour,
                    writers: 0,
                    opened: now,
                    touched: now,
                    durable: false,
                }
            });
            let hk = hour_of(key);
            if !mark.durable {
                adds.entry((hk, mark.hour))
                    .or_default()
                    .push(minute_offset(key.2));
                rows.marks.push((key, mark.marker));
            }
            let dk = day_of(hk);
            if days.get(&(dk, mark.hour)).is_some_and(|d| !d.durable) {
                unwritten_days.insert((dk, mark.hour));
            }
            mark.writers += 1;
            held.push((key, mark.marker));
        }
        rows.days = unwritten_days
            .into_iter()
            .map(|(dk, id)| hour_row(dk, id))
            .collect();
        // Grouped by partition (user, slab), as written.
        rows.days
            .sort_unstable_by_key(|r| (r.user_id, r.slab.0, r.hour.0, r.device_id, r.flush));
        // Sorted by device: written per partition.
        rows.minutes = adds
            .into_iter()
            .map(|((hk, marker), mut minutes)| {
                minutes.sort_unstable();
                minutes.dedup();
                let row = device_row(hk, marker);
                PendingAddIn {
                    minutes,
                    user_id: row.user_id,
                    device_id: row.device_id,
                    hour: row.hour,
                    flush: row.flush,
                }
            })
            .collect();
        (
            Claim {
                pending: self,
                held,
            },
            rows,
        )
    }

    /// Records that `rows` are written: flushes that join their marks from now on
    /// need not write them again.
    pub(super) fn confirm(&self, rows: &Markers) {
        let mut marks = self.marks();
        for (key, marker) in &rows.marks {
            if let Some(m) = marks.mark_mut(key, *marker) {
                m.durable = true;
            }
        }
        for r in &rows.days {
            if let Some(d) = marks
                .days
                .get_mut(&((r.user_id, r.device_id, r.hour.0), r.flush))
            {
                d.durable = true;
            }
        }
    }

    /// Takes at most `limit` of the marks due for recomputation at `now`: those no
    /// flush is writing into that are quiet, too old, or (with `all`) any; the closed
    /// ones (the oldest) first. Each comes out of the table.
    pub(super) fn take_due(&self, now: Instant, all: bool, limit: usize) -> Vec<(MinuteKey, Uuid)> {
        let mut marks = self.marks();
        let Marks {
            open,
            closed,
            taken,
            ..
        } = &mut *marks;
        let mut due = Vec::new();
        closed.retain(|(key, m)| {
            if m.writers == 0 && due.len() < limit {
                due.push((*key, m.marker));
                taken.insert(m.marker, m.hour);
                false
            } else {
                true
            }
        });
        let old = |m: &Mark| now.duration_since(m.opened) >= MAX_AGE;
        // In key order, so that a pass holds whole runs of a device's minutes, whose
        // events, hours and days it then reads once (`rollup.rs`, `levels.rs`); in
        // the map's order, every pass touched every device's day again.
        let mut ready: Vec<MinuteKey> = open
            .iter()
            .filter(|(_, m)| {
                m.writers == 0 && (all || old(m) || now.duration_since(m.touched) >= QUIET)
            })
            .map(|(key, _)| *key)
            .collect();
        // The first `want` in key order, without sorting the rest: sorting the whole
        // backlog (up to 200,000 minutes) on every pass was 3 to 6% of the server's CPU
        // in the fleet bench on Cassandra.
        let want = limit.saturating_sub(due.len());
        if ready.len() > want {
            if want > 0 {
                ready.select_nth_unstable(want);
            }
            ready.truncate(want);
        }
        ready.sort_unstable();
        for key in ready {
            if let Some(m) = open.remove(&key) {
                due.push((key, m.marker));
                taken.insert(m.marker, m.hour);
            }
        }
        // The old marks left are closed to new flushes.
        closed.extend(open.extract_if(|_, m| old(m)));
        due
    }

    /// Ends taken marks: `ok` when the minute was recomputed at every level. Returns
    /// the marks whose rows are to be deleted: the hour marks whose every minute is
    /// done (their rows in `pending_by_device`) and the day marks whose every hour is
    /// (their rows in `pending_by_user`). Marks this instance did not take (the
    /// sweep's) are ignored.
    pub(super) fn finish(
        &self,
        results: impl IntoIterator<Item = (MinuteKey, Uuid, bool)>,
    ) -> Ended {
        let mut marks = self.marks();
        let Marks {
            hours,
            open_hours,
            days,
            open_days,
            taken,
            ..
        } = &mut *marks;
        let mut done = Ended::default();
        for (key, marker, ok) in results {
            let Some(hour) = taken.remove(&marker) else {
                continue;
            };
            let hk = hour_of(key);
            let Some(h) = hours.get_mut(&(hk, hour)) else {
                continue;
            };
            h.minutes -= 1;
            h.kept |= !ok;
            if h.minutes > 0 {
                continue;
            }
            if open_hours.get(&hk) == Some(&hour) {
                open_hours.remove(&hk);
            }
            let kept = hours.remove(&(hk, hour)).is_some_and(|h| h.kept);
            if !kept {
                done.hours.push((hk, hour));
            }
            let dk = day_of(hk);
            // Closed to new hours: one of this hour's could get its id again.
            if open_days.get(&dk) == Some(&hour) {
                open_days.remove(&dk);
            }
            let Some(d) = days.get_mut(&(dk, hour)) else {
                continue;
            };
            d.hours -= 1;
            d.kept |= kept;
            if d.hours == 0 && days.remove(&(dk, hour)).is_some_and(|d| !d.kept) {
                done.days.push((dk, hour));
            }
        }
        done
    }

    /// Marks not yet recomputed: open, closed, or taken by a round in progress.
    pub(super) fn backlog(&self) -> usize {
        let marks = self.marks();
        marks.open.len() + marks.closed.len() + marks.taken.len()
    }

    /// Whether `marker` is one of this instance's marks still in the table.
    #[cfg(test)]
    fn holds(&self, key: MinuteKey, marker: Uuid) -> bool {
        self.marks().mark_mut(&key, marker).is_some()
    }

    /// Whether `marker` is one of this instance's hour marks still in use.
    pub(super) fn holds_hour(&self, key: HourKey, marker: Uuid) -> bool {
        self.marks().hours.contains_key(&(key, marker))
    }

    /// Whether `marker` is one of this instance's day marks still in use.
    pub(super) fn holds_day(&self, key: DayKey, marker: Uuid) -> bool {
        self.marks().days.contains_key(&(key, marker))
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut marks = self.pending.marks();
        for (key, marker) in &self.held {
            if let Some(m) = marks.mark_mut(key, *marker) {
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
        assert_eq!(
            rows.minutes.len(),
            1,
            "two new minutes, one hour mark's row"
        );
        assert_eq!(rows.minutes[0].minutes, [0, 1]);
        assert_eq!(rows.days.len(), 1, "and its row by user");
        let (early, again) = p.claim([key(0)]);
        assert_eq!(
            (again.minutes.len(), again.days.len()),
            (1, 1),
            "joined before the rows are known written: written again"
        );
        assert_eq!(again.minutes[0].minutes, [0]);
        drop(early);
        p.confirm(&rows);
        let (b, rows) = p.claim([key(0)]);
        assert!(
            rows.minutes.is_empty() && rows.days.is_empty(),
            "joined, nothing to write"
        );
        drop(a);
        let first = p.take_due(Instant::now(), true, usize::MAX);
        assert_eq!(
            first.iter().map(|d| d.0).collect::<Vec<_>>(),
            [key(60_000)],
            "the joined minute waits for its other writer"
        );
        drop(b);
        let due = p.take_due(Instant::now(), true, usize::MAX);
        assert_eq!(due.len(), 1);
        // Taken out: the next flush opens a new minute mark, which adds itself to
        // the hour mark's row again.
        let (_c, rows) = p.claim([key(0)]);
        assert_eq!(rows.minutes.len(), 1);
        assert_eq!(rows.minutes[0].minutes, [0]);
        assert!(p.holds(key(0), rows.marks[0].1));
        assert_ne!(rows.marks[0].1, due[0].1);
    }

    #[test]
    fn a_mark_waits_for_quiet_and_an_old_one_is_closed_to_new_flushes() {
        let p = Pending::default();
        drop(p.claim([key(0)]).0);
        let now = Instant::now();
        assert!(
            p.take_due(now, false, usize::MAX).is_empty(),
            "just touched"
        );
        assert_eq!(p.take_due(now + QUIET, false, usize::MAX).len(), 1);

        let (held, rows) = p.claim([key(0)]);
        let later = Instant::now() + MAX_AGE;
        assert!(
            p.take_due(later, false, usize::MAX).is_empty(),
            "still being written"
        );
        let (_later, new_rows) = p.claim([key(0)]);
        assert_eq!(new_rows.marks.len(), 1, "an old mark is not joined");
        assert_ne!(new_rows.marks[0].1, rows.marks[0].1);
        assert!(p.holds(key(0), rows.marks[0].1));
        drop(held);
        let due = p.take_due(later, false, usize::MAX);
        assert_eq!(due, vec![(key(0), rows.marks[0].1)]);
    }

    #[test]
    fn an_hour_mark_ends_with_its_last_minute_and_stays_if_one_failed() {
        let p = Pending::default();
        let hour = |h: i64| (1, Uuid::nil(), h * HOUR_MS);
        let (a, rows) = p.claim([key(0), key(60_000), key(HOUR_MS)]);
        assert_eq!(
            rows.minutes.len(),
            2,
            "two hours: two rows by device, not three"
        );
        assert_eq!(rows.days.len(), 1, "one day: one row by user");
        assert_eq!(rows.days[0].hour.0, 0, "at the day's start");
        p.confirm(&rows);
        drop(a);
        let (b, more) = p.claim([key(120_000)]);
        assert_eq!(more.minutes.len(), 1);
        assert_eq!(
            more.minutes[0].minutes,
            [2],
            "added to the open hour mark's row"
        );
        assert!(more.days.is_empty(), "whose row by user is written");
        let first_hour = rows.days[0].flush;
        assert!(p.holds_hour(hour(0), first_hour));
        assert!(
            p.holds_hour(hour(1), first_hour),
            "hours of a day share the id"
        );
        assert!(p.holds_day(hour(0), first_hour));

        let due = p.take_due(Instant::now(), true, usize::MAX);
        assert_eq!(due.len(), 3, "the fourth minute is still being written");
        let done = p.finish(due.iter().map(|(k, m)| (*k, *m, true)));
        assert_eq!(
            done.hours.iter().map(|(k, _)| k.2).collect::<Vec<_>>(),
            [HOUR_MS],
            "hour 0 still has a minute to recompute"
        );
        assert!(done.days.is_empty(), "and so its day");
        let (_d, next) = p.claim([key(HOUR_MS + 60_000)]);
        assert_ne!(
            next.minutes[0].flush, first_hour,
            "a day mark with an ended hour takes no new one"
        );
        drop(b);
        let due = p.take_due(Instant::now(), true, usize::MAX);
        let done = p.finish(due.iter().map(|(k, m)| (*k, *m, false)));
        assert!(
            done.hours.is_empty() && done.days.is_empty(),
            "a failed minute leaves its hour's and day's rows for the sweep"
        );
        assert!(!p.holds_hour(hour(0), first_hour), "but not in memory");
        assert!(!p.holds_day(hour(0), first_hour));
        let (_c, rows) = p.claim([key(0)]);
        assert_eq!(rows.days.len(), 1, "the next minute opens a new mark");
        assert_ne!(rows.days[0].flush, first_hour);
    }

    #[test]
    fn due_marks_are_taken_at_most_a_limit_at_a_time_and_stay_counted_until_finished() {
        let p = Pending::default();
        let (claim, _rows) = p.claim((0..5).map(|m| key(m * 60_000)));
        drop(claim);
        let first = p.take_due(Instant::now(), true, 2);
        assert_eq!(first.len(), 2);
        assert_eq!(p.backlog(), 5, "taken minutes count until their pass ends");
        p.finish(first.into_iter().map(|(k, m)| (k, m, true)));
        assert_eq!(p.backlog(), 3);
        let rest: Vec<_> = (0..2)
            .flat_map(|_| p.take_due(Instant::now(), true, 2))
            .collect();
        assert_eq!(rest.len(), 3, "the others in later passes, each once");
        assert!(p.take_due(Instant::now(), true, 2).is_empty());
    }
}
