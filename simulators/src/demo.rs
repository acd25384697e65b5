//! `iotpipe-sim demo`: the whole product in a minute. Starts iotpipe in-process on a
//! temp data dir, provisions a small mixed fleet, runs it with a little chaos,
//! verifies every event, and charts events per window from the aggregates API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use iotpipe::topology::{self, StartError};
use iotpipe::Config;
use tokio_util::sync::CancellationToken;

use crate::api::{Api, ApiError, GroupBucket};
use crate::chaos::{format_ts, Chaos};
use crate::profile::Profile;
use crate::provision::{Fleet, ProvisionError};
use crate::rate::Rate;
use crate::report::Report;
use crate::run::{run, Limit, Protocol, RunError, RunOptions};
use crate::verify::verify;

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create a temp data dir: {0}")]
    TempDir(std::io::Error),
    #[error("iotpipe configuration: {0}")]
    Config(String),
    #[error("starting iotpipe: {0}")]
    Start(#[from] StartError),
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    pub devices: usize,
    /// Events per second per device.
    pub rate: f64,
    pub progress: bool,
}

/// Width of the longest bar of the chart, in characters.
const CHART_WIDTH: usize = 50;

/// Runs the demo; returns the report (with its verification) and the chart.
///
/// # Errors
///
/// iotpipe cannot start, or an API call fails.
pub async fn demo(
    opts: &DemoOptions,
    stop: CancellationToken,
) -> Result<(Report, String), DemoError> {
    let dir = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let mut config = Config::load(None, |_| None).map_err(|e| DemoError::Config(e.to_string()))?;
    config.data_dir = dir.path().to_owned();
    config.http.addr = "127.0.0.1:0".into();
    // The simulator speaks HTTP here; the built-in MQTT endpoint stays off so the
    // demo never collides with a broker on 1883.
    config.mqtt.addr = "off".into();
    let server = topology::start(config).await?;
    let base = format!("http://{}", server.http_addr);
    eprintln!(
        "iotpipe is running in-process at {base} (data in {})",
        dir.path().display()
    );

    let result = async {
        let api = Api::new(&base, 64)?;
        let key = Fleet::create_user(&api, &server.admin_token).await?;
        let profiles = vec![Profile::SmartMeter, Profile::EnvSensor, Profile::GpsTracker];
        let fleet = Fleet::create(&api, &key, opts.devices, &profiles).await?;
        eprintln!(
            "provisioned {} devices (smart-meter, env-sensor, gps-tracker); simulating for {} s \
             over HTTP with late, duplicate and invalid events...",
            fleet.devices.len(),
            opts.duration.as_secs()
        );
        let run_opts = RunOptions {
            protocol: Protocol::Http {
                concurrency: 32,
                retries: 10,
            },
            batch: 5,
            rate: Rate::PerDevice(opts.rate),
            ramp: Duration::from_secs(2).min(opts.duration / 4),
            limit: Limit {
                duration: Some(opts.duration),
                count: None,
            },
            chaos: Chaos {
                late: 0.05,
                late_by_ms: 8_000,
                duplicates: 0.03,
                invalid: 0.01,
            },
            profiles: profiles.clone(),
            ledger: true,
            progress: opts.progress,
            seed: rand::random(),
            connect_concurrency: 1,
        };
        let finished = run(&api, &fleet, &run_opts, stop).await?;
        let mut report = finished.report;
        let verification = verify(&api, &key, &fleet, &finished.tally, &profiles, 2_000).await;
        let window_ms = verification.window_ms.max(1000);
        report.verification = Some(verification);
        let now = chrono::Utc::now().timestamp_millis();
        let from =
            (now - opts.duration.as_millis() as i64 - 10_000).div_euclid(window_ms) * window_ms;
        let to = (now.div_euclid(window_ms) + 1) * window_ms;
        let buckets = api
            .grouped_aggregates(&key, from, to, &format!("{}s", window_ms / 1000), "type")
            .await?;
        Ok::<_, DemoError>((report, render_chart(&buckets, window_ms)))
    }
    .await;
    server.stop().await;
    result
}

/// A horizontal bar per window, split by group (event type), scaled to the busiest
/// window.
pub fn render_chart(buckets: &[GroupBucket], window_ms: i64) -> String {
    const MARKS: [char; 6] = ['█', '▓', '▒', '░', '#', '+'];
    let mut groups: Vec<&str> = buckets.iter().map(|b| b.group.as_str()).collect();
    groups.sort_unstable();
    groups.dedup();
    let mut windows: BTreeMap<i64, BTreeMap<&str, u64>> = BTreeMap::new();
    for b in buckets {
        *windows
            .entry(b.start_ms)
            .or_default()
            .entry(&b.group)
            .or_default() += b.count;
    }
    let busiest = windows
        .values()
        .map(|g| g.values().sum::<u64>())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "events per {} s window, by type (GET /v1/aggregates?group_by=type):",
        window_ms / 1000
    );
    if busiest == 0 {
        out.push_str("  (no events)\n");
        return out;
    }
    for (start, by_group) in &windows {
        let total: u64 = by_group.values().sum();
        let mut bar = String::new();
        for (i, g) in groups.iter().enumerate() {
            let n = by_group.get(g).copied().unwrap_or(0);
            let width = (n as f64 / busiest as f64 * CHART_WIDTH as f64).round() as usize;
            bar.extend(std::iter::repeat_n(MARKS[i % MARKS.len()], width));
        }
        let time = format_ts(*start);
        let _ = writeln!(
            out,
            "  {} {:<width$} {total}",
            &time[11..19],
            bar,
            width = CHART_WIDTH
        );
    }
    let legend: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| format!("{} {g}", MARKS[i % MARKS.len()]))
        .collect();
    let _ = writeln!(out, "  {}", legend.join("   "));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(start_ms: i64, group: &str, count: u64) -> GroupBucket {
        GroupBucket {
            start_ms,
            group: group.into(),
            count,
        }
    }

    #[test]
    fn the_chart_scales_to_the_busiest_window_and_stacks_types() {
        let t = 1_795_000_000_000;
        let chart = render_chart(
            &[
                b(t, "meter", 10),
                b(t, "location", 10),
                b(t + 2000, "meter", 5),
            ],
            2000,
        );
        let lines: Vec<&str> = chart.lines().collect();
        assert_eq!(lines.len(), 4, "{chart}");
        // location sorts first: its mark is the first one.
        assert_eq!(lines[1].matches('█').count(), 25);
        assert_eq!(lines[1].matches('▓').count(), 25);
        assert!(lines[1].trim_end().ends_with(" 20"));
        assert_eq!(lines[2].matches('▓').count(), 13);
        assert!(lines[3].contains("█ location") && lines[3].contains("▓ meter"));
    }

    #[test]
    fn an_empty_chart_says_so() {
        assert!(render_chart(&[], 1000).contains("no events"));
    }
}
