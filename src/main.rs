//! The `iotpipe` binary: CLI → Config → topology.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use iotpipe::{ops, topology, Config};
use tracing_subscriber::EnvFilter;

// mimalloc rather than glibc's malloc: the write path allocates and frees many small
// buffers from several threads, and glibc's per-thread arenas kept the fleet bench's
// freed memory resident (see docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A time-series ingestion pipeline for IoT events.
#[derive(Parser)]
#[command(name = "iotpipe", version, about)]
struct Cli {
    /// A TOML settings file; environment variables win over it. Every command reads
    /// the same settings as `serve`.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start everything: HTTP API, ingest pipeline and store.
    Serve,
    /// Apply the registry migrations and the schema of the configured backends.
    Migrate,
    /// Write one device's events in a range as NDJSON or CSV (newest first). With the
    /// embedded store the server must be stopped; use the HTTP export while it runs.
    Export {
        /// The device's id.
        #[arg(long)]
        device: String,
        /// Start of the range (RFC 3339 or ms), inclusive; default: the beginning.
        #[arg(long)]
        from: Option<String>,
        /// End of the range (RFC 3339 or ms), exclusive; default: now.
        #[arg(long)]
        to: Option<String>,
        /// Only events of this type.
        #[arg(long = "type")]
        kind: Option<String>,
        /// ndjson or csv.
        #[arg(long, default_value = "ndjson")]
        format: String,
        /// The file to write (complete once renamed from FILE.partial); default: stdout.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Copy a running (or stopped) embedded deployment into a new directory: a
    /// consistent snapshot of the events, the registry and the admin token.
    Backup {
        /// A new or empty directory on this host.
        dir: PathBuf,
        /// The running server's base URL (default: from IOTPIPE_HTTP_ADDR).
        #[arg(long)]
        server: Option<String>,
    },
    /// Check that the registry, the event store and the live figures agree; exit
    /// non-zero when they do not.
    Check {
        /// Fix what can be fixed (see docs/operations.md).
        #[arg(long)]
        repair: bool,
        /// UTC days whose rollups are compared with the events, per device.
        #[arg(long, default_value_t = 2)]
        sample_days: usize,
    },
    /// Recompute live totals (per device and user) and last seen from the event store
    /// into Redis, after Redis lost them.
    RebuildLive,
    /// Copy the registry and every event to the backends of another settings file
    /// (e.g. embedded to MySQL + Cassandra); resumable, verified per device.
    Transfer {
        /// The target's settings (TOML); its environment is not read.
        #[arg(long)]
        to: PathBuf,
        /// Cap on events copied per second, so that a live source keeps serving
        /// (0: none).
        #[arg(long, default_value_t = 20_000)]
        max_events_per_sec: u64,
    },
    /// Restore a complete backup into an empty data directory (IOTPIPE_DATA_DIR).
    Restore {
        /// The backup's directory.
        dir: PathBuf,
    },
}

/// Threads for blocking work (the embedded store's reads and writes, fsyncs).
/// Tokio's default is 512: a grouped query fans out one store read per device and
/// piece, and every thread that joins keeps its own allocator heap, so the peak
/// memory grew with the fan-out (measured in `docs/performance.md`).
const MAX_BLOCKING_THREADS: usize = 32;

/// mimalloc's `mi_option_purge_delay`: its place in `mi_option_t` (v2 and v3), which
/// the sys crate does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc give freed pages back to the OS at once rather than 10 ms later: under
/// full ingest the pages freed by one flush were still held when the next allocated,
/// and the fleet bench's peak RSS was 57 MB lower with no measurable cost in ingest
/// (`docs/performance.md`).
fn return_freed_memory_at_once() {
    // SAFETY: mimalloc's option calls are not thread safe; this runs first in `main`,
    // before any other thread exists. The default (10) is checked first so that a
    // mimalloc whose options moved is left as it is.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 10 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
        }
    }
}

fn main() -> anyhow::Result<()> {
    return_freed_memory_at_once();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = Config::from_process(cli.config.as_deref()).context("configuration")?;
    match cli.command {
        Command::Serve => {
            let server = topology::start(config).await?;
            // One stable line on stdout, for scripts and tests that start on port 0.
            let mqtt = server
                .mqtt_addr
                .map_or_else(|| "off".to_owned(), |a| a.to_string());
            println!("iotpipe listening http={} mqtt={mqtt}", server.http_addr);
            let stop = server.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: draining in-flight batches");
                stop.cancel();
            });
            server.wait().await;
        }
        Command::Migrate => {
            topology::migrate(&config).await?;
            println!("migrations applied");
        }
        Command::Export {
            device,
            from,
            to,
            kind,
            format,
            out,
        } => {
            let args = ops::export::ExportArgs {
                device,
                from,
                to,
                kind,
                format,
                out,
            };
            ops::export::run(&config, &args).await?;
        }
        Command::Backup { dir, server } => {
            ops::backup::run(&config, &ops::backup::BackupArgs { dir, server }).await?;
        }
        Command::Check {
            repair,
            sample_days,
        } => {
            let args = ops::check::CheckArgs {
                repair,
                sample_days,
            };
            ops::check::run(&config, &args).await?;
        }
        Command::RebuildLive => {
            ops::rebuild_live::run(&config).await?;
        }
        Command::Transfer {
            to,
            max_events_per_sec,
        } => {
            let args = ops::transfer::TransferArgs {
                to,
                max_events_per_sec,
            };
            ops::transfer::run(&config, &args).await?;
        }
        Command::Restore { dir } => {
            ops::restore::run(&config, &dir).await?;
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
