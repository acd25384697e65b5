//! The fleet driver: paces every device on its schedule, builds its messages and
//! hands them to the protocol's [`Link`], while a sampler records per-second rates
//! and draws the progress bar.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::chaos::{encode, Chaos, DeviceStream, Planned};
use crate::profile::Profile;
use crate::proto::http::{HttpLink, HttpShared};
use crate::proto::mqtt::{MqttError, MqttLink, MqttSettings};
use crate::proto::{Link, Message};
use crate::provision::Fleet;
use crate::rate::{split_count, Rate, Schedule};
use crate::report::{cpu_seconds, Report, Second};
use crate::tally::{Snapshot, Tally};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// How devices reach iotpipe.
#[derive(Debug, Clone)]
pub enum Protocol {
    Http {
        /// Requests in flight at once, for the whole fleet.
        concurrency: usize,
        /// Further tries after 429 or 503.
        retries: u32,
    },
    Mqtt(MqttSettings),
}

/// When a run stops: at the deadline, after the count, or at whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub duration: Option<Duration>,
    /// Events (sends) for the whole fleet.
    pub count: Option<u64>,
}

/// Everything that shapes a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub protocol: Protocol,
    /// Events per message; 1 sends bare objects, more sends arrays.
    pub batch: usize,
    pub rate: Rate,
    pub ramp: Duration,
    pub limit: Limit,
    pub chaos: Chaos,
    /// Device `i` simulates `profiles[i % len]`.
    pub profiles: Vec<Profile>,
    /// Keep every event id for verification.
    pub ledger: bool,
    pub progress: bool,
    pub seed: u64,
    /// MQTT connections opened at once while connecting the fleet.
    pub connect_concurrency: usize,
}

/// A finished run: its report, and the tally verification reads.
pub struct Finished {
    pub report: Report,
    pub tally: Arc<Tally>,
}

struct DevicePlan {
    index: usize,
    schedule: Schedule,
    /// Spreads the devices' first events over one period, so that a fleet does not
    /// fire in lockstep.
    phase: Duration,
    count: Option<u64>,
    deadline: Option<tokio::time::Instant>,
    start: tokio::time::Instant,
    batch: usize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

async fn drive<L: Link>(
    plan: DevicePlan,
    mut link: L,
    mut stream: DeviceStream,
    stop: CancellationToken,
) {
    let mut n: u64 = 0;
    let more = |n: u64| plan.count.is_none_or(|c| n < c);
    // The spacing of readings at the full rate: a device batching k readings took
    // them over k periods, so their timestamps are spread the same way.
    let period_ms = if plan.schedule.rate > 0.0 {
        (1000.0 / plan.schedule.rate) as i64
    } else {
        0
    };
    while more(n) {
        let k = plan
            .count
            .map_or(plan.batch as u64, |c| (c - n).min(plan.batch as u64));
        // A message leaves once its last reading is due.
        let due = plan.start + plan.phase + plan.schedule.due(n + k - 1);
        let now = tokio::time::Instant::now();
        // `due` alone never reaches the deadline when the rate is unlimited.
        if plan.deadline.is_some_and(|d| due.max(now) >= d) {
            break;
        }
        if due > now {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = stop.cancelled() => break,
            }
        } else if stop.is_cancelled() {
            break;
        }
        let stamp = now_ms();
        let mut items = Vec::with_capacity(plan.batch);
        let first = n;
        while items.len() < plan.batch && more(n) {
            let behind = (k - 1).saturating_sub(n - first) as i64;
            n += 1;
            match stream.next(stamp - behind * period_ms) {
                // An invalid event goes alone: the contract refuses a whole request
                // for one bad event, and the valid ones should not pay for it.
                p @ Planned::Invalid(_) => {
                    let body = encode(std::slice::from_ref(&p), false).into();
                    link.send(Message {
                        device: plan.index,
                        items: vec![p],
                        body,
                    })
                    .await;
                }
                p => items.push(p),
            }
        }
        if !items.is_empty() {
            let body = encode(&items, plan.batch > 1).into();
            link.send(Message {
                device: plan.index,
                items,
                body,
            })
            .await;
        }
    }
    link.close().await;
}

/// Runs the fleet to its limit (or until `stop`), and reports.
///
/// # Errors
///
/// Inconsistent options, or an MQTT device that cannot connect.
pub async fn run(
    api: &Api,
    fleet: &Fleet,
    opts: &RunOptions,
    stop: CancellationToken,
) -> Result<Finished, RunError> {
    let devices = fleet.devices.len();
    if devices == 0 || opts.profiles.is_empty() || opts.batch == 0 {
        return Err(RunError::Options(
            "a run needs at least one device, one profile and a batch of at least 1".into(),
        ));
    }
    if opts.limit.duration.is_none() && opts.limit.count.is_none() {
        return Err(RunError::Options("give a duration or a count".into()));
    }
    opts.chaos.check().map_err(RunError::Options)?;
    let tally = Arc::new(Tally::new(devices, opts.ledger));
    let cpu_before = cpu_seconds();

    // Connect the whole fleet before the clock starts, so that the run measures
    // traffic rather than handshakes.
    let mut mqtt_links = Vec::new();
    let mut connect_failed = 0usize;
    if let Protocol::Mqtt(settings) = &opts.protocol {
        let connecting = stream::iter(fleet.devices.iter())
            .map(|d| MqttLink::connect(settings, &d.id, &d.token, tally.clone()))
            .buffered(opts.connect_concurrency.max(1));
        let results: Vec<_> = connecting.collect().await;
        let mut first_error = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(link) => mqtt_links.push((i, link)),
                Err(e) => {
                    connect_failed += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        // A few refused devices in a large fleet are a finding for the report; a fleet
        // where none could connect is a misconfiguration.
        if let (true, Some(e)) = (mqtt_links.is_empty(), first_error.take()) {
            return Err(e.into());
        }
        if let Some(e) = first_error {
            tracing::warn!(failed = connect_failed, error = %e, "some devices could not connect");
        }
    }

    let started = Instant::now();
    let start = tokio::time::Instant::now();
    let deadline = opts.limit.duration.map(|d| start + d);
    let schedule = opts.rate.schedule(devices, opts.ramp);
    let mut seeds = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let plan = |index: usize, phase_seed: f64| DevicePlan {
        index,
        schedule,
        phase: if schedule.rate > 0.0 {
            Duration::from_secs_f64(phase_seed / schedule.rate)
        } else {
            Duration::ZERO
        },
        count: opts.limit.count.map(|c| split_count(c, devices, index)),
        deadline,
        start,
        batch: opts.batch,
    };
    let device_stream = |index: usize, seed: u64| {
        let profile = &opts.profiles[index % opts.profiles.len()];
        DeviceStream::new(profile.model(index, seed), opts.chaos, seed)
    };

    let sampler_stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(
        tally.clone(),
        opts.progress,
        opts.limit,
        sampler_stop.clone(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    match &opts.protocol {
        Protocol::Http {
            concurrency,
            retries,
        } => {
            let shared = HttpShared {
                api: api.clone(),
                slots: Arc::new(Semaphore::new((*concurrency).max(1))),
                tally: tally.clone(),
                retries: *retries,
            };
            for (i, d) in fleet.devices.iter().enumerate() {
                let link = HttpLink::new(shared.clone(), &d.token);
                let seed = seeds.random();
                tasks.spawn(drive(
                    plan(i, seeds.random()),
                    link,
                    device_stream(i, seed),
                    stop.clone(),
                ));
            }
        }
        Protocol::Mqtt(_) => {
            for (i, link) in mqtt_links {
                let seed = seeds.random();
                tasks.spawn(drive(
                    plan(i, seeds.random()),
                    link,
                    device_stream(i, seed),
                    stop.clone(),
                ));
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    sampler_stop.cancel();
    let per_second = sampler.await.unwrap_or_default();
    let cpu = match (cpu_before, cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let protocol = match &opts.protocol {
        Protocol::Http { .. } => "http".to_owned(),
        Protocol::Mqtt(s) => format!("mqtt-qos{}", s.qos as u8),
    };
    let report = Report::new(
        protocol,
        devices,
        opts.batch,
        elapsed,
        tally.snapshot(),
        tally.reasons(),
        &tally.latency(),
        per_second,
        cpu,
    );
    let mut report = report;
    report.connect_failed = connect_failed;
    Ok(Finished { report, tally })
}

/// Most per-second samples kept: an hour. Longer runs keep their first hour.
const MAX_SECONDS: usize = 3600;

/// Records per-second deltas and draws the progress bar until `done`.
async fn sample(
    tally: Arc<Tally>,
    progress: bool,
    limit: Limit,
    done: CancellationToken,
) -> Vec<Second> {
    let bar = if progress {
        let target = ProgressDrawTarget::stderr_with_hz(4);
        match limit.count {
            Some(c) => ProgressBar::with_draw_target(Some(c), target).with_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} events  {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            ),
            None => {
                ProgressBar::with_draw_target(limit.duration.map(|d| d.as_secs().max(1)), target)
                    .with_style(
                        ProgressStyle::with_template(
                            "{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    )
            }
        }
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let mut seconds = Vec::new();
    let mut last = Snapshot::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        let finished = tokio::select! {
            _ = tick.tick() => false,
            _ = done.cancelled() => true,
        };
        let now = tally.snapshot();
        let s = Second {
            second: seconds.len() as u64 + 1,
            sent: now.sent - last.sent,
            acked: now.acked - last.acked,
            rejected: now.rejected - last.rejected,
            failed: now.failed - last.failed,
        };
        // The last, partial second is kept only if something happened in it.
        let idle = s.sent + s.acked + s.rejected + s.failed == 0;
        if finished && idle {
            break;
        }
        if seconds.len() < MAX_SECONDS {
            seconds.push(s);
        }
        match limit.count {
            Some(_) => bar.set_position(now.sent),
            None => bar.set_position(started.elapsed().as_secs()),
        }
        bar.set_message(format!(
            "{} ev/s sent, {} ev/s acked | acked {} rejected {} failed {}",
            s.sent, s.acked, now.acked, now.rejected, now.failed
        ));
        last = now;
        if finished {
            break;
        }
    }
    bar.finish_and_clear();
    seconds
}
