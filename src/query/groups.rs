//! The groups of a grouped aggregate, and summing a fleet's counts into them.
//!
//! A grouped read over 1,000 devices sums tens of thousands of pieces into tens of
//! thousands of (window, group) counts. Hashing each pair and sorting the result
//! was a tenth of the query's time; here groups are numbered once (devices as given,
//! types as they first appear), each window keeps a row of counts by group number,
//! and the answer comes out in order by walking the windows and the groups in name
//! order.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::windows::Grid;
use crate::model::DeviceId;

/// What grouped aggregates group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum GroupBy {
    Type,
    Device,
}

/// One (window, group) count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCount {
    pub start_ms: i64,
    pub group: String,
    pub count: u64,
}

/// Counts per (window, group), summed as a fleet's pieces arrive.
pub(super) struct Tally<'g> {
    grid: &'g Grid,
    group_by: GroupBy,
    /// Each wanted device's number; the devices themselves, by number.
    device_slot: HashMap<DeviceId, u32, RandomState>,
    devices: Vec<DeviceId>,
    /// Types by number, and their numbers.
    type_slot: HashMap<String, u32, RandomState>,
    types: Vec<String>,
    /// Per window, counts by group number; empty until the window gets a count.
    windows: Vec<Vec<u64>>,
}

impl<'g> Tally<'g> {
    /// Counts only for `devices` (a deleted device's rows are skipped).
    pub(super) fn new(grid: &'g Grid, group_by: GroupBy, devices: &[DeviceId]) -> Self {
        let mut device_slot =
            HashMap::with_capacity_and_hasher(devices.len(), RandomState::default());
        let mut numbered = Vec::with_capacity(devices.len());
        for d in devices {
            device_slot.entry(*d).or_insert_with(|| {
                numbered.push(*d);
                (numbered.len() - 1) as u32
            });
        }
        Self {
            grid,
            group_by,
            device_slot,
            devices: numbered,
            type_slot: HashMap::default(),
            types: Vec::new(),
            windows: vec![Vec::new(); grid.len()],
        }
    }

    /// Adds `n` events of `device` (and type `kind`) at `at_ms`, if the device is
    /// wanted and the time falls in a window.
    pub(super) fn add(&mut self, at_ms: i64, device: DeviceId, kind: Option<&str>, n: u64) {
        let (Some(w), Some(&d)) = (self.grid.slot(at_ms), self.device_slot.get(&device)) else {
            return;
        };
        let g = match self.group_by {
            GroupBy::Device => d,
            GroupBy::Type => {
                let kind = kind.unwrap_or_default();
                match self.type_slot.get(kind) {
                    Some(&t) => t,
                    None => {
                        let t = self.types.len() as u32;
                        self.types.push(kind.to_owned());
                        self.type_slot.insert(kind.to_owned(), t);
                        t
                    }
                }
            }
        } as usize;
        let row = &mut self.windows[w];
        if row.len() <= g {
            let groups = match self.group_by {
                GroupBy::Device => self.devices.len(),
                GroupBy::Type => g + 1,
            };
            row.resize(groups, 0);
        }
        row[g] += n;
    }

    /// The non-zero counts, by window then group (a device id orders as its text).
    pub(super) fn finish(self) -> Vec<GroupCount> {
        let names: Vec<String> = match self.group_by {
            GroupBy::Device => self.devices.iter().map(DeviceId::to_string).collect(),
            GroupBy::Type => self.types,
        };
        let mut order: Vec<usize> = (0..names.len()).collect();
        match self.group_by {
            GroupBy::Device => order.sort_unstable_by_key(|&g| self.devices[g]),
            GroupBy::Type => order.sort_unstable_by(|&a, &b| names[a].cmp(&names[b])),
        }
        let mut out = Vec::new();
        for (w, row) in self.windows.iter().enumerate() {
            if row.is_empty() {
                continue;
            }
            let start_ms = self.grid.window(w).0;
            for &g in &order {
                match row.get(g) {
                    Some(&count) if count > 0 => out.push(GroupCount {
                        start_ms,
                        group: names[g].clone(),
                        count,
                    }),
                    _ => {}
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::Range;

    fn grid() -> Grid {
        Grid::utc(
            Range {
                from_ms: 0,
                to_ms: 300,
            },
            100,
        )
    }

    fn answer(t: Tally<'_>) -> Vec<(i64, String, u64)> {
        let counts = t.finish().into_iter();
        counts.map(|c| (c.start_ms, c.group, c.count)).collect()
    }

    #[test]
    fn devices_come_out_by_window_then_id_and_only_if_wanted() {
        let (a, b, gone) = (
            DeviceId::from_u128(1),
            DeviceId::from_u128(2),
            DeviceId::from_u128(3),
        );
        let grid = grid();
        // Given out of order: the answer is still in id order.
        let mut t = Tally::new(&grid, GroupBy::Device, &[b, a]);
        t.add(250, a, Some("x"), 1);
        t.add(10, b, Some("x"), 2);
        t.add(20, b, Some("y"), 3);
        t.add(10, a, None, 4);
        t.add(10, gone, Some("x"), 100);
        t.add(300, a, Some("x"), 100);
        let got = answer(t);
        assert_eq!(
            got,
            [
                (0, a.to_string(), 4),
                (0, b.to_string(), 5),
                (200, a.to_string(), 1)
            ]
        );
    }

    #[test]
    fn types_come_out_by_name_and_untyped_pieces_count_as_the_empty_type() {
        let d = DeviceId::from_u128(1);
        let grid = grid();
        let mut t = Tally::new(&grid, GroupBy::Type, &[d]);
        t.add(110, d, Some("z"), 1);
        t.add(120, d, Some("a"), 2);
        t.add(130, d, Some("z"), 3);
        t.add(140, d, None, 4);
        let got = answer(t);
        assert_eq!(
            got,
            [
                (100, String::new(), 4),
                (100, "a".into(), 2),
                (100, "z".into(), 4)
            ]
        );
    }
}
