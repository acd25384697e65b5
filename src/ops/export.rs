//! `iotpipe export`: one device's events in a range, as NDJSON or CSV, to a file or
//! stdout, in constant memory (the same pages and encoders as the HTTP export).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::TryStreamExt;
use uuid::Uuid;

use super::{open_registry, open_store, progress, OpsError};
use crate::config::Config;
use crate::model::{now_ms, parse_instant, MAX_FUTURE_MS, MIN_TS_MS};
use crate::query::export::{pages, Export, Format};
use crate::query::Range;

/// What `iotpipe export` was asked for, as typed.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    pub device: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub kind: Option<String>,
    pub format: String,
    /// `None` or `-`: stdout.
    pub out: Option<PathBuf>,
}

/// What was exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub events: u64,
    pub bytes: u64,
}

fn instant(name: &str, raw: Option<&str>, default: i64) -> Result<i64, OpsError> {
    match raw {
        None => Ok(default),
        Some(v) => parse_instant(v).ok_or_else(|| {
            OpsError::Failed(format!(
                "--{name}: {v:?} is not an RFC 3339 instant or integer ms"
            ))
        }),
    }
}

/// Runs the export.
///
/// # Errors
///
/// Bad arguments (naming the flag), an unknown device, an unreachable backend, or a
/// write that failed. A file target is written as `<file>.partial` and renamed only
/// once complete, so an interrupted export never leaves a file that looks whole.
pub async fn run(config: &Config, args: &ExportArgs) -> Result<ExportSummary, OpsError> {
    let device = Uuid::parse_str(&args.device)
        .map_err(|_| OpsError::Failed(format!("--device: {:?} is not a UUID", args.device)))?;
    let format = Format::parse(&args.format).ok_or_else(|| {
        OpsError::Failed(format!("--format: {:?} must be ndjson or csv", args.format))
    })?;
    if let Some(k) = &args.kind {
        if !crate::model::is_valid_name(k) {
            return Err(OpsError::Failed(format!(
                "--type: {k:?} is not a valid event type"
            )));
        }
    }
    let now = now_ms();
    let from = instant("from", args.from.as_deref(), MIN_TS_MS)?;
    let to = instant("to", args.to.as_deref(), now + MAX_FUTURE_MS)?;
    if to <= from {
        return Err(OpsError::Failed("--to: must be after --from".to_owned()));
    }
    let range = Range::bounded(from, to, now);

    let registry = open_registry(config).await?;
    let owner = registry
        .device(device)
        .await
        .map_err(|e| OpsError::Failed(format!("registry: {e}")))?
        .ok_or_else(|| OpsError::Failed(format!("--device: no device {device} is registered")))?
        .user_id;
    let store = open_store(config).await?;
    let export = Export {
        user_id: owner,
        device_id: device,
        from_ms: range.from_ms,
        to_ms: range.to_ms,
        kind: args.kind.clone(),
    };

    let target = args.out.as_deref().filter(|p| *p != Path::new("-"));
    let partial = target.map(|p| {
        let mut name = p.as_os_str().to_owned();
        name.push(".partial");
        PathBuf::from(name)
    });
    let io = |what: &str, e: std::io::Error| OpsError::Failed(format!("{what}: {e}"));
    let mut out: Box<dyn Write + Send> = match &partial {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| io(&p.display().to_string(), e))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let bar = progress::bar(None, "events");
    let started = Instant::now();
    let mut summary = ExportSummary {
        events: 0,
        bytes: 0,
    };
    let mut chunks = std::pin::pin!(pages(store.clone(), export, format));
    let result = async {
        while let Some((chunk, events)) = chunks
            .try_next()
            .await
            .map_err(|e| OpsError::Failed(e.to_string()))?
        {
            out.write_all(&chunk).map_err(|e| io("writing", e))?;
            summary.events += events as u64;
            summary.bytes += chunk.len() as u64;
            bar.inc(events as u64);
        }
        out.flush().map_err(|e| io("writing", e))?;
        Ok::<_, OpsError>(())
    }
    .await;
    bar.finish_and_clear();
    let _ = store.close().await;
    if let Err(e) = result {
        if let Some(p) = &partial {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    drop(out);
    if let (Some(partial), Some(target)) = (&partial, target) {
        std::fs::File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("syncing", e))?;
        std::fs::rename(partial, target).map_err(|e| io(&target.display().to_string(), e))?;
    }
    eprintln!(
        "exported {} events ({} bytes) of device {device} in {:.1}s",
        summary.events,
        summary.bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}
