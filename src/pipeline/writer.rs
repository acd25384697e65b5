//! Writes flushes to the store with bounded concurrency, retries what is worth
//! retrying, updates the live counters, and only then acknowledges the sources.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, Duration, Instant};

use super::batcher::Flush;
use super::{AckError, Pending};
use crate::live::{DeviceCount, SharedLive};
use crate::store::SharedStore;
use crate::telemetry::Telemetry;

pub(super) struct Writer {
    pub(super) store: SharedStore,
    pub(super) live: SharedLive,
    pub(super) telemetry: Telemetry,
    /// How long a retryable store failure is retried before the flush fails.
    pub(super) retry_budget: Duration,
}

impl Writer {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Flush<Pending>>, concurrency: usize) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        while let Some(flush) = rx.recv().await {
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let this = this.clone();
            tasks.spawn(async move {
                this.write(flush).await;
                drop(slot);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn write(&self, flush: Flush<Pending>) {
        let partitions = Arc::new(flush.partitions);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(10);
        let result = loop {
            match self.store.write(partitions.clone()).await {
                Ok(counts) => break Ok(counts),
                Err(e) if e.is_retryable() && started.elapsed() < self.retry_budget => {
                    tracing::warn!(error = %e, events = flush.events, "store write failed; retrying");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(counts) => {
                self.telemetry
                    .batch_written(started.elapsed().as_secs_f64());
                let mut per_device: HashMap<_, DeviceCount> = HashMap::new();
                for (p, new) in partitions.iter().zip(counts) {
                    let last = p.records.iter().map(|r| r.received_ms).max().unwrap_or(0);
                    let c = per_device.entry(p.key.device_id).or_insert(DeviceCount {
                        user_id: p.key.user_id,
                        device_id: p.key.device_id,
                        new_events: 0,
                        received_ms: last,
                    });
                    c.new_events += new as u64;
                    c.received_ms = c.received_ms.max(last);
                }
                let counts: Vec<DeviceCount> = per_device.into_values().collect();
                self.live.record_ingested(&counts).await;
                for pending in flush.tokens {
                    pending.complete(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, events = flush.events, "store write failed; the sources are told, nothing was acknowledged");
                for pending in flush.tokens {
                    pending.complete(Err(AckError::Store(e.clone())));
                }
            }
        }
    }
}
