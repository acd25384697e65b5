//! The `iotpipe-sim` binary: CLI → provisioning → run → report (→ verification).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use iotpipe_sim::api::Api;
use iotpipe_sim::chaos::Chaos;
use iotpipe_sim::demo::{demo, DemoOptions};
use iotpipe_sim::profile::Profile;
use iotpipe_sim::proto::mqtt::MqttSettings;
use iotpipe_sim::provision::Fleet;
use iotpipe_sim::rate::{parse_duration, Rate};
use iotpipe_sim::run::{run, Limit, Protocol, RunOptions};
use iotpipe_sim::verify::verify;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Device simulator and load-test harness for iotpipe.
#[derive(Parser)]
#[command(name = "iotpipe-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a fleet against a running iotpipe, report, and optionally verify.
    Run(Box<RunArgs>),
    /// Start iotpipe in-process, run a small fleet, verify it and chart the result.
    Demo(DemoArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Http,
    Mqtt,
}

#[derive(clap::Args)]
struct RunArgs {
    /// iotpipe's HTTP API.
    #[arg(long, env = "IOTPIPE_SIM_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// A user API key: devices are created for this user, and verification reads
    /// with it.
    #[arg(long, env = "IOTPIPE_API_KEY")]
    api_key: Option<String>,
    /// The admin token: creates a fresh user first (instead of --api-key).
    #[arg(long, env = "IOTPIPE_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Use the devices of this file ({"api_key", "devices": [{"id", "token"}]})
    /// instead of creating new ones.
    #[arg(long)]
    devices_file: Option<PathBuf>,
    /// Write the fleet (with its secrets, mode 0600) to this file, to reuse it.
    #[arg(long)]
    save_devices: Option<PathBuf>,
    /// Made-up devices, no provisioning: for raw broker benchmarks only.
    #[arg(long)]
    synthetic: bool,
    /// How many devices to create.
    #[arg(long, short = 'n', default_value_t = 10)]
    devices: usize,
    /// Comma-separated profiles, given to devices in turn: smart-meter, env-sensor,
    /// gps-tracker, template:FILE.
    #[arg(long, default_value = "smart-meter", value_delimiter = ',')]
    profile: Vec<String>,
    #[arg(long, value_enum, default_value = "http")]
    protocol: ProtocolArg,
    /// The MQTT endpoint (host:port).
    #[arg(long, env = "IOTPIPE_MQTT_ADDR", default_value = "127.0.0.1:1883")]
    mqtt_addr: String,
    /// MQTT QoS: 0 or 1.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// MQTT topic; {id} is the device id.
    #[arg(long, default_value = "devices/{id}/events")]
    topic: String,
    /// MQTT QoS 1 messages awaiting PUBACK per connection.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
    /// MQTT connections opened at once before the run.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Events per message (HTTP request or MQTT publish).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// HTTP requests in flight at once, for the whole fleet.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP: further tries after 429 or 503.
    #[arg(long, default_value_t = 10)]
    retries: u32,
    /// Events per second per device; 0 is as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Events per second for the whole fleet (instead of --rate).
    #[arg(long)]
    total_rate: Option<f64>,
    /// Linear ramp from 0 to the full rate, e.g. 10s.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    ramp_up: Duration,
    /// How long to send, e.g. 30s, 5m. Default 10s when --count is not given.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// How many events to send in all (stops at whichever of duration and count
    /// comes first).
    #[arg(long)]
    count: Option<u64>,
    /// Fraction of events with a past ts (late, out of order).
    #[arg(long, default_value_t = 0.0)]
    late: f64,
    /// How far in the past late events may be.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    late_by: Duration,
    /// Fraction of sends that resend an earlier event (same id and content).
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,
    /// Fraction of sends that are invalid events.
    #[arg(long, default_value_t = 0.0)]
    invalid: f64,
    /// After the run, read everything back and prove it; exit 1 on FAIL.
    #[arg(long)]
    verify: bool,
    /// Window of the aggregates compared by --verify.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    verify_window: Duration,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Seed for the device models (random by default).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// How long the fleet runs.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    duration: Duration,
    #[arg(long, short = 'n', default_value_t = 12)]
    devices: usize,
    /// Events per second per device.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Print the report as JSON on stdout (the chart goes to stderr).
    #[arg(long)]
    json: bool,
}

fn stop_on_ctrl_c() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("stopping: waiting for outstanding acknowledgements");
            s.cancel();
        }
    });
    stop
}

async fn fleet(args: &RunArgs, api: &Api, profiles: &[Profile]) -> anyhow::Result<Fleet> {
    if let Some(path) = &args.devices_file {
        let mut fleet = Fleet::load(path)?;
        if args.api_key.is_some() {
            fleet.api_key.clone_from(&args.api_key);
        }
        return Ok(fleet);
    }
    if args.synthetic {
        return Ok(Fleet::synthetic(args.devices));
    }
    let key = match (&args.api_key, &args.admin_token) {
        (Some(k), _) => k.clone(),
        (None, Some(admin)) => Fleet::create_user(api, admin)
            .await
            .context("creating a user")?,
        (None, None) => bail!("give --api-key, --admin-token, --devices-file or --synthetic"),
    };
    if !args.quiet {
        eprintln!("creating {} devices...", args.devices);
    }
    Fleet::create(api, &key, args.devices, profiles)
        .await
        .context("creating devices")
}

async fn run_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    let profiles = args
        .profile
        .iter()
        .map(|p| Profile::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let api = Api::new(&args.url, args.concurrency)?;
    if args.verify && args.synthetic {
        bail!("--verify needs a real fleet, not --synthetic");
    }
    let fleet = fleet(&args, &api, &profiles).await?;
    if let Some(path) = &args.save_devices {
        fleet.save(path)?;
    }
    let protocol = match args.protocol {
        ProtocolArg::Http => Protocol::Http {
            concurrency: args.concurrency,
            retries: args.retries,
        },
        ProtocolArg::Mqtt => {
            let (host, port) = MqttSettings::parse_addr(&args.mqtt_addr)?;
            Protocol::Mqtt(MqttSettings {
                host,
                port,
                qos: if args.qos == 0 {
                    rumqttc::QoS::AtMostOnce
                } else {
                    rumqttc::QoS::AtLeastOnce
                },
                inflight: args.inflight,
                topic: args.topic.clone(),
            })
        }
    };
    let duration = match (args.duration, args.count) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let opts = RunOptions {
        protocol,
        batch: args.batch,
        rate: match args.total_rate {
            Some(r) => Rate::Total(r),
            None => Rate::PerDevice(args.rate),
        },
        ramp: args.ramp_up,
        limit: Limit {
            duration,
            count: args.count,
        },
        chaos: Chaos {
            late: args.late,
            late_by_ms: args.late_by.as_millis() as i64,
            duplicates: args.duplicates,
            invalid: args.invalid,
        },
        profiles: profiles.clone(),
        ledger: args.verify,
        progress: !args.quiet && !args.json,
        seed: args.seed.unwrap_or_else(rand::random),
        connect_concurrency: args.connect_concurrency,
    };
    let finished = run(&api, &fleet, &opts, stop_on_ctrl_c()).await?;
    let mut report = finished.report;
    if args.verify {
        let key = fleet
            .api_key
            .as_deref()
            .context("--verify needs the user key: give --api-key, or a devices file with one")?;
        if !args.quiet && !args.json {
            eprintln!("verifying...");
        }
        let window_ms = args.verify_window.as_millis() as i64;
        report.verification =
            Some(verify(&api, key, &fleet, &finished.tally, &profiles, window_ms).await);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(match &report.verification {
        Some(v) if !v.pass => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

async fn demo_command(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        duration: args.duration,
        devices: args.devices,
        rate: args.rate,
        progress: !args.json,
    };
    let (report, chart) = demo(&opts, stop_on_ctrl_c()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        eprint!("{chart}");
    } else {
        print!("{}", report.render());
        println!();
        print!("{chart}");
    }
    Ok(match &report.verification {
        Some(v) if !v.pass => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("warn,fjall=warn,lsm_tree=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run_command(*args).await,
        Command::Demo(args) => demo_command(args).await,
    }
}
