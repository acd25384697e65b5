//! The final report: what was sent and what became of it, throughput, ack latency
//! percentiles and per-second rates, as text for people or JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::tally::Snapshot;
use crate::verify::Verification;

/// The counts of one second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Second {
    pub second: u64,
    pub sent: u64,
    pub acked: u64,
    pub rejected: u64,
    pub failed: u64,
}

/// Ack latency in ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// How many acknowledgements were timed (requests or messages, not events).
    pub samples: u64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub protocol: String,
    pub devices: usize,
    pub events_per_message: usize,
    pub elapsed_s: f64,
    pub events: Snapshot,
    /// Acknowledged events per second over the whole run.
    pub acked_per_s: f64,
    /// Events handed to the network per second.
    pub sent_per_s: f64,
    pub latency: Latency,
    /// MQTT devices that could not connect (they sent nothing).
    pub connect_failed: usize,
    /// Why events were refused or failed, by event.
    pub reasons: BTreeMap<String, u64>,
    pub per_second: Vec<Second>,
    /// CPU time of the simulator process over the run, and its share of one core.
    pub cpu_s: Option<f64>,
    pub cpu_share_of_one_core: Option<f64>,
    pub verification: Option<Verification>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        protocol: String,
        devices: usize,
        events_per_message: usize,
        elapsed: Duration,
        events: Snapshot,
        reasons: BTreeMap<String, u64>,
        latency: &Histogram<u64>,
        per_second: Vec<Second>,
        cpu_s: Option<f64>,
    ) -> Self {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Self {
            protocol,
            devices,
            events_per_message,
            elapsed_s: secs,
            acked_per_s: events.acked as f64 / secs,
            sent_per_s: events.sent as f64 / secs,
            events,
            latency: Latency::of(latency),
            connect_failed: 0,
            reasons,
            per_second,
            cpu_s,
            cpu_share_of_one_core: cpu_s.map(|c| c / secs),
            verification: None,
        }
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let e = &self.events;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "iotpipe-sim: {} devices over {}, {} event(s) per message, {:.1} s",
            self.devices, self.protocol, self.events_per_message, self.elapsed_s
        );
        let _ = writeln!(
            out,
            "  sent        {:>10}  ({} messages; {} late, {} resent duplicates, {} invalid)",
            e.sent, e.messages, e.late, e.resent, e.invalid
        );
        if self.connect_failed > 0 {
            let _ = writeln!(
                out,
                "  {} device(s) could not connect and sent nothing",
                self.connect_failed
            );
        }
        let _ = writeln!(out, "  acked       {:>10}", e.acked);
        let _ = writeln!(out, "  rejected    {:>10}", e.rejected);
        let _ = writeln!(out, "  failed      {:>10}", e.failed);
        if e.unconfirmed > 0 {
            let _ = writeln!(
                out,
                "  unconfirmed {:>10}  (QoS 0: no acknowledgement)",
                e.unconfirmed
            );
        }
        if e.retries > 0 {
            let _ = writeln!(out, "  retried     {:>10}  (after 429/503)", e.retries);
        }
        for (reason, n) in &self.reasons {
            let _ = writeln!(out, "    {n:>8} {reason}");
        }
        let _ = writeln!(
            out,
            "  throughput  {:.0} events/s sent, {:.0} events/s acked, {:.1} MB/s",
            self.sent_per_s,
            self.acked_per_s,
            e.bytes as f64 / self.elapsed_s / 1e6
        );
        let l = &self.latency;
        if l.samples > 0 {
            let _ = writeln!(
                out,
                "  ack latency p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} acks)",
                l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.samples
            );
        }
        if let (Some(cpu), Some(share)) = (self.cpu_s, self.cpu_share_of_one_core) {
            let _ = writeln!(
                out,
                "  simulator CPU {cpu:.1} s ({:.0}% of one core)",
                share * 100.0
            );
        }
        if !self.per_second.is_empty() {
            let _ = writeln!(out, "  per second (sent/acked):");
            let mut line = String::from("   ");
            for s in &self.per_second {
                let cell = format!(" {}:{}/{}", s.second, s.sent, s.acked);
                if line.len() + cell.len() > 96 {
                    let _ = writeln!(out, "{line}");
                    line = String::from("   ");
                }
                line.push_str(&cell);
            }
            let _ = writeln!(out, "{line}");
        }
        if let Some(v) = &self.verification {
            out.push_str(&v.render());
        }
        out
    }
}

/// CPU time (user + system) of this process so far, in seconds; Linux only.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields are counted after its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture the kernel exports to userspace.
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.samples, 1000);
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
    }

    #[test]
    fn the_report_shows_counts_rates_and_latency() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        h.record(2_000).unwrap();
        let events = Snapshot {
            messages: 90,
            sent: 100,
            acked: 90,
            rejected: 10,
            ..Snapshot::default()
        };
        let r = Report::new(
            "http".into(),
            3,
            1,
            Duration::from_secs(10),
            events,
            [("HTTP 400".to_owned(), 10)].into(),
            &h,
            vec![Second {
                second: 1,
                sent: 10,
                acked: 9,
                ..Second::default()
            }],
            Some(1.0),
        );
        assert_eq!(r.acked_per_s, 9.0);
        assert_eq!(r.cpu_share_of_one_core, Some(0.1));
        let text = r.render();
        for want in [
            "acked               90",
            "HTTP 400",
            "p50 2.00 ms",
            "1:10/9",
            "10% of one core",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["events"]["rejected"], 10);
        assert_eq!(json["latency"]["samples"], 1);
    }

    #[test]
    fn cpu_time_is_readable_here() {
        if cfg!(target_os = "linux") {
            assert!(cpu_seconds().is_some());
        }
    }
}
