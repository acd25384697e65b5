//! Where events wait between a source and the store.
//!
//! ```text
//! source ──try_submit/submit──▶ [bounded queue] ──▶ batcher ──▶ [bounded] ──▶ writer ──▶ store
//!    ▲                                                                          │
//!    └──────────────────────── ack (only once durable) ◀────────────────────────┘
//! ```
//!
//! The queue is bounded in events, not only in submissions: a source takes one permit
//! per event before it may enqueue, and the permits are returned only when the events
//! are durable (or failed). So the permits count everything between a source and the
//! disk, and [`Pipeline::depth`] is exactly the backlog.

pub mod batcher;
pub mod writer;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Duration, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::live::SharedLive;
use crate::model::Record;
use crate::store::{SharedStore, StoreError};
use crate::telemetry::Telemetry;
use batcher::{Batcher, Flush};

/// Why a submission was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The pipeline holds as many events as it may; try again shortly.
    #[error("the ingest pipeline is full")]
    Full,
    /// The pipeline is shutting down.
    #[error("the ingest pipeline is shutting down")]
    Closed,
}

/// Why acknowledged-to-be events did not become durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AckError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the pipeline stopped before the events were written")]
    Dropped,
}

/// One submission's place in the pipeline: its acknowledgement channel and the queue
/// permits it holds until it is durable.
#[derive(Debug)]
pub struct Pending {
    ack: oneshot::Sender<Result<(), AckError>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Pending {
    fn complete(self, result: Result<(), AckError>) {
        // The source may have gone away (client hung up); the events are stored anyway.
        let _ = self.ack.send(result);
    }
}

/// Resolves once a submission is durable, or has failed.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<Result<(), AckError>>);

impl Ack {
    /// # Errors
    ///
    /// The store error that failed the write, or [`AckError::Dropped`].
    pub async fn durable(self) -> Result<(), AckError> {
        self.0.await.unwrap_or(Err(AckError::Dropped))
    }
}

struct Submission {
    records: Vec<Record>,
    pending: Pending,
}

/// The sources' handle on the pipeline. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<Submission>,
    permits: Arc<Semaphore>,
    capacity: usize,
}

impl Pipeline {
    /// Enqueues without waiting; a full pipeline is answered at once (HTTP 503).
    ///
    /// # Errors
    ///
    /// [`SubmitError::Full`] or [`SubmitError::Closed`].
    pub fn try_submit(&self, records: Vec<Record>) -> Result<Ack, SubmitError> {
        let permit = match self
            .permits
            .clone()
            .try_acquire_many_owned(weight(&records))
        {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(SubmitError::Full),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::Closed),
        };
        let (submission, ack) = Self::submission(records, permit);
        self.tx.try_send(submission).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::Full,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })?;
        Ok(ack)
    }

    /// Enqueues, waiting for room: the caller slows down instead (MQTT backpressure).
    ///
    /// # Errors
    ///
    /// [`SubmitError::Closed`] once the pipeline shuts down.
    pub async fn submit(&self, records: Vec<Record>) -> Result<Ack, SubmitError> {
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(weight(&records))
            .await
            .map_err(|_| SubmitError::Closed)?;
        let (submission, ack) = Self::submission(records, permit);
        self.tx
            .send(submission)
            .await
            .map_err(|_| SubmitError::Closed)?;
        Ok(ack)
    }

    fn submission(records: Vec<Record>, permit: OwnedSemaphorePermit) -> (Submission, Ack) {
        let (tx, rx) = oneshot::channel();
        let pending = Pending {
            ack: tx,
            _permit: Some(permit),
        };
        (Submission { records, pending }, Ack(rx))
    }

    /// Events accepted and not yet durable.
    pub fn depth(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// The most events the pipeline holds at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn weight(records: &[Record]) -> u32 {
    // Even an empty submission takes a permit, so that it is ordered with the rest.
    u32::try_from(records.len().max(1)).unwrap_or(u32::MAX)
}

/// The running pipeline tasks.
pub struct PipelineTasks {
    closing: CancellationToken,
    batcher: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl PipelineTasks {
    /// Stops taking submissions, flushes what is queued, and waits until every flush
    /// has been written and acknowledged.
    pub async fn shutdown(self) {
        self.closing.cancel();
        if let Err(e) = self.batcher.await {
            tracing::error!(error = %e, "batcher task failed");
        }
        if let Err(e) = self.writer.await {
            tracing::error!(error = %e, "writer task failed");
        }
    }
}

/// Starts the batcher and the writer. Consumers start before the handle is returned,
/// so a source can never submit into a pipeline nobody drains.
pub fn spawn(
    config: &PipelineConfig,
    store: SharedStore,
    live: SharedLive,
    telemetry: Telemetry,
) -> (Pipeline, PipelineTasks) {
    let (tx, rx) = mpsc::channel(config.queue_submissions);
    let (flush_tx, flush_rx) = mpsc::channel(config.writers);
    let writer = writer::Writer {
        store,
        live,
        telemetry,
        retry_budget: Duration::from_millis(config.retry_budget_ms),
    };
    let writer = tokio::spawn(writer.run(flush_rx, config.writers));
    let closing = CancellationToken::new();
    let batcher = Batcher::new(
        config.batch_max_events,
        Duration::from_millis(config.batch_max_age_ms),
        config.bucket_len_ms,
    );
    let batcher = tokio::spawn(run_batcher(batcher, rx, flush_tx, closing.clone()));
    let pipeline = Pipeline {
        tx,
        permits: Arc::new(Semaphore::new(config.queue_events)),
        capacity: config.queue_events,
    };
    (
        pipeline,
        PipelineTasks {
            closing,
            batcher,
            writer,
        },
    )
}

/// Drives the batcher: a flush leaves on size, on age, or at shutdown.
async fn run_batcher(
    mut batcher: Batcher<Pending>,
    mut rx: mpsc::Receiver<Submission>,
    flush_tx: mpsc::Sender<Flush<Pending>>,
    closing: CancellationToken,
) {
    let mut closed = false;
    loop {
        let deadline = batcher.deadline();
        let flush = tokio::select! {
            biased;
            _ = closing.cancelled(), if !closed => {
                // Refuse new submissions; keep draining what is already queued.
                rx.close();
                closed = true;
                continue;
            }
            msg = rx.recv() => match msg {
                Some(s) => batcher.push(s.records, s.pending, Instant::now()),
                None => break,
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                batcher.take()
            }
        };
        if let Some(flush) = flush {
            // Awaiting here is the backpressure: while the writers are busy the queue
            // fills, and sources get "full" (HTTP) or wait (MQTT).
            if flush_tx.send(flush).await.is_err() {
                tracing::error!("writer stopped while the batcher was running");
                return;
            }
        }
    }
    if let Some(flush) = batcher.take() {
        let _ = flush_tx.send(flush).await;
    }
}
