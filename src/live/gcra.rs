//! The rate-limit rule of the contract, as a generic cell rate algorithm (GCRA) that
//! can go into debt.
//!
//! A budget is a "theoretical arrival time" (TAT): the instant at which it would be
//! full again. With a rate of `r` events/s each event adds `1000 / r` ms, and the burst
//! is one second's worth, so a budget is in debt when its TAT is more than 1000 ms
//! ahead of now. A request is admitted when no budget is in debt, and then charged in
//! full, so a request larger than the burst still gets through and the next ones wait.
//!
//! Why not `governor`'s GCRA: it refuses a request larger than the burst outright
//! (`InsufficientCapacity`) and has no notion of debt, which the contract requires.
//! The Redis backend runs this same arithmetic in a Lua script.

/// The burst window: one second's worth of events.
pub const BURST_MS: f64 = 1000.0;

/// Is a budget with this TAT in debt at `now_ms`? Returns how long until it is not.
pub fn debt_ms(tat_ms: Option<f64>, now_ms: f64) -> Option<f64> {
    let tat = tat_ms?;
    let ahead = tat - now_ms;
    (ahead > BURST_MS).then_some(ahead - BURST_MS)
}

/// The TAT after charging `events` at `rate_per_sec`.
pub fn charge(tat_ms: Option<f64>, now_ms: f64, rate_per_sec: u64, events: u64) -> f64 {
    let base = tat_ms.map_or(now_ms, |t| t.max(now_ms));
    base + events as f64 * 1000.0 / rate_per_sec as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_budget_admits_a_burst_larger_than_itself_then_waits() {
        let now = 10_000.0;
        assert_eq!(debt_ms(None, now), None);
        // 10/s: 25 events is 2.5 s of budget; 1 s of it is burst.
        let tat = charge(None, now, 10, 25);
        assert_eq!(tat, now + 2500.0);
        assert_eq!(debt_ms(Some(tat), now), Some(1500.0));
        assert_eq!(debt_ms(Some(tat), now + 1500.0), None);
    }

    #[test]
    fn exactly_one_burst_is_not_debt() {
        let tat = charge(None, 0.0, 100, 100);
        assert_eq!(debt_ms(Some(tat), 0.0), None);
        let tat = charge(Some(tat), 0.0, 100, 1);
        assert!(debt_ms(Some(tat), 0.0).is_some());
    }

    #[test]
    fn an_idle_budget_refills_but_never_beyond_the_burst() {
        let tat = charge(None, 0.0, 10, 5);
        // Long idle: the TAT is in the past and the next charge starts from now.
        let tat = charge(Some(tat), 60_000.0, 10, 10);
        assert_eq!(tat, 61_000.0);
        assert_eq!(debt_ms(Some(tat), 60_000.0), None);
    }
}
