//! HTTP: `POST /v1/ingest` with the device's token, one event or a batch per request.
//!
//! Requests of the whole fleet share one in-flight window (a semaphore), like a
//! gateway with a connection pool. 429 and 503 are retried after `Retry-After`, as a
//! well-behaved device does, while holding the request's slot in the window.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Link, Message};
use crate::api::{Api, IngestAnswer};
use crate::tally::{Outcome, Tally};

/// Longest wait between two tries, whatever `Retry-After` says: a load test wants to
/// see the server recover, not sleep through it.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the HTTP links of a run share.
#[derive(Clone)]
pub struct HttpShared {
    pub api: Api,
    pub slots: Arc<Semaphore>,
    pub tally: Arc<Tally>,
    /// Further tries after a 429 or 503.
    pub retries: u32,
}

/// One device over HTTP.
pub struct HttpLink {
    shared: HttpShared,
    token: Arc<str>,
    tasks: JoinSet<()>,
}

impl HttpLink {
    pub fn new(shared: HttpShared, token: &str) -> Self {
        Self {
            shared,
            token: token.into(),
            tasks: JoinSet::new(),
        }
    }
}

async fn deliver(shared: HttpShared, token: Arc<str>, msg: Message) {
    let ids = || msg.items.iter().map(|p| p.id());
    let n = msg.items.len();
    let tally = &shared.tally;
    let mut tries = 0;
    loop {
        let started = Instant::now();
        match shared.api.ingest(&token, msg.body.clone()).await {
            IngestAnswer::Accepted => {
                let latency = Some(started.elapsed());
                tally.settle(msg.device, ids(), n, Outcome::Acked, None, latency);
            }
            IngestAnswer::RetryLater { after, .. } if tries < shared.retries => {
                tries += 1;
                tally
                    .counters
                    .retries
                    .fetch_add(n as u64, Ordering::Relaxed);
                tokio::time::sleep(after.min(MAX_BACKOFF)).await;
                continue;
            }
            // Out of tries. A 429 stored nothing; a 503 may come from a store write
            // that failed half-way, so its events are in doubt.
            IngestAnswer::RetryLater { status: 429, .. } => {
                tally.settle(
                    msg.device,
                    ids(),
                    n,
                    Outcome::Rejected,
                    Some("HTTP 429"),
                    None,
                );
            }
            IngestAnswer::RetryLater { status, .. } => {
                let reason = format!("HTTP {status}");
                tally.settle(msg.device, ids(), n, Outcome::Failed, Some(&reason), None);
            }
            IngestAnswer::Refused { status } => {
                let reason = format!("HTTP {status}");
                tally.settle(msg.device, ids(), n, Outcome::Rejected, Some(&reason), None);
            }
            IngestAnswer::Unknown { reason } => {
                let reason = short_reason(&reason);
                tally.settle(msg.device, ids(), n, Outcome::Failed, Some(&reason), None);
            }
        }
        return;
    }
}

/// A short, low-cardinality name for a transport error, for the report.
fn short_reason(reason: &str) -> String {
    let r = reason.to_ascii_lowercase();
    let kind = if r.contains("timed out") || r.contains("timeout") {
        "timeout"
    } else if r.contains("connect") {
        "connection error"
    } else if r.starts_with("http ") {
        return reason.to_owned();
    } else {
        "transport error"
    };
    format!("HTTP {kind}")
}

impl Link for HttpLink {
    async fn send(&mut self, msg: Message) {
        // Reap finished requests so the set stays as small as the window.
        while self.tasks.try_join_next().is_some() {}
        let slot = match self.shared.slots.clone().acquire_owned().await {
            Ok(s) => s,
            // The semaphore is never closed while links exist.
            Err(_) => return,
        };
        self.shared
            .tally
            .plan(msg.device, &msg.items, msg.body.len());
        let shared = self.shared.clone();
        let token = self.token.clone();
        self.tasks.spawn(async move {
            deliver(shared, token, msg).await;
            drop(slot);
        });
    }

    async fn close(mut self) {
        // Each request is bounded by the client's timeout and the retry budget.
        while self.tasks.join_next().await.is_some() {}
    }
}
