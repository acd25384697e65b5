//! Rate control: when each event of a device is due.
//!
//! Pacing is open-loop: the n-th event is due at a fixed instant computed from the
//! start, whatever happened before. A sender that falls behind (slow acks, a full
//! in-flight window) catches up with a burst instead of silently lowering the
//! offered load, so the report shows what the server really absorbed.

use std::time::Duration;

/// A linear ramp from 0 to `rate` events per second over `ramp`, then `rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Events per second once ramped up; 0 or less means as fast as possible.
    pub rate: f64,
    pub ramp: Duration,
}

impl Schedule {
    /// When the `n`-th event (0-based) is due, counted from the start.
    ///
    /// During the ramp the rate at time t is `rate * t / ramp`, so the number of
    /// events due by t is `rate * t^2 / (2 * ramp)`; this inverts it.
    pub fn due(&self, n: u64) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let n = n as f64;
        let ramp = self.ramp.as_secs_f64();
        let in_ramp = self.rate * ramp / 2.0;
        let secs = if n < in_ramp {
            (2.0 * ramp * n / self.rate).sqrt()
        } else {
            ramp + (n - in_ramp) / self.rate
        };
        Duration::from_secs_f64(secs)
    }

    /// How many events are due by `elapsed` (the inverse of [`Schedule::due`]).
    pub fn due_by(&self, elapsed: Duration) -> f64 {
        if self.rate <= 0.0 {
            return f64::INFINITY;
        }
        let t = elapsed.as_secs_f64();
        let ramp = self.ramp.as_secs_f64();
        if t < ramp {
            self.rate * t * t / (2.0 * ramp)
        } else {
            self.rate * ramp / 2.0 + self.rate * (t - ramp)
        }
    }
}

/// The offered load of the whole run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Events per second for each device.
    PerDevice(f64),
    /// Events per second for the whole fleet, split evenly.
    Total(f64),
}

impl Rate {
    /// The schedule of one device in a fleet of `devices`.
    pub fn schedule(self, devices: usize, ramp: Duration) -> Schedule {
        let rate = match self {
            Rate::PerDevice(r) => r,
            Rate::Total(r) => r / devices.max(1) as f64,
        };
        Schedule { rate, ramp }
    }
}

/// Splits `total` events over `devices` as evenly as possible; the first devices take
/// the remainder.
pub fn split_count(total: u64, devices: usize, index: usize) -> u64 {
    let d = devices.max(1) as u64;
    total / d + u64::from((index as u64) < total % d)
}

/// Parses `500ms`, `20s`, `5m`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 20s, 5m or 1h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} must be a non-negative duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rate_spaces_events_evenly() {
        let s = Schedule {
            rate: 10.0,
            ramp: Duration::ZERO,
        };
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(10), Duration::from_secs(1));
        assert_eq!(s.due(25), Duration::from_millis(2500));
    }

    #[test]
    fn the_ramp_starts_slow_and_reaches_the_full_rate() {
        let s = Schedule {
            rate: 100.0,
            ramp: Duration::from_secs(10),
        };
        // 500 events are due during the ramp (half of 10 s at 100/s).
        assert!((s.due(500).as_secs_f64() - 10.0).abs() < 1e-9);
        // The first second of the ramp carries 5 events, the last one 95.
        assert!((s.due_by(Duration::from_secs(1)) - 5.0).abs() < 1e-9);
        let last = s.due_by(Duration::from_secs(10)) - s.due_by(Duration::from_secs(9));
        assert!((last - 95.0).abs() < 1e-9);
        // After the ramp: the full rate.
        assert!((s.due(600).as_secs_f64() - 11.0).abs() < 1e-9);
    }

    #[test]
    fn due_and_due_by_are_inverses() {
        let s = Schedule {
            rate: 37.5,
            ramp: Duration::from_secs(4),
        };
        for n in [0u64, 1, 7, 74, 75, 76, 1000] {
            let t = s.due(n);
            assert!((s.due_by(t) - n as f64).abs() < 1e-6, "n={n}");
        }
        let mut last = Duration::ZERO;
        for n in 0..500 {
            let t = s.due(n);
            assert!(t >= last);
            last = t;
        }
    }

    #[test]
    fn unlimited_means_everything_is_due_now() {
        let s = Rate::PerDevice(0.0).schedule(4, Duration::from_secs(3));
        assert_eq!(s.due(1_000_000), Duration::ZERO);
    }

    #[test]
    fn a_total_rate_is_shared_by_the_fleet() {
        let s = Rate::Total(1000.0).schedule(8, Duration::ZERO);
        assert_eq!(s.rate, 125.0);
        let sum: u64 = (0..7).map(|i| split_count(100, 7, i)).sum();
        assert_eq!(sum, 100);
        assert_eq!(split_count(100, 7, 0), 15);
        assert_eq!(split_count(100, 7, 6), 14);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
