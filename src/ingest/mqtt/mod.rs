//! MQTT ingestion: the built-in endpoint devices connect to ([`server`],
//! [`connection`]) and the external-broker subscriber ([`external`]).
//!
//! Both turn one PUBLISH into one pipeline submission and acknowledge it only once
//! its events are durable:
//!
//! ```text
//! PUBLISH ─▶ topic check ─▶ decode ─▶ rate limit ─▶ Pipeline::submit ─▶ durable ─▶ PUBACK
//!                                      (QoS 1: wait)  (QoS 1: wait for room)  (in order)
//! ```
//!
//! Each connection (and the broker subscriber) keeps the messages it has read and not
//! yet acknowledged in an ordered, bounded window. Acknowledgements leave in the order
//! the messages came, as MQTT requires, and every ack that is ready when the first one
//! completes goes out in the same write: a flushed batch is acknowledged together.
//! When the window is full the source stops reading, so a slow store slows the
//! devices down instead of filling memory.
//!
//! What each outcome means for the device:
//! - durable: PUBACK (QoS 1), counted as ingested;
//! - invalid payload, unknown device: PUBACK all the same (a poison message must not
//!   be resent forever), counted as rejected;
//! - over the rate limit: QoS 1 waits until the limiter admits it, QoS 0 is dropped;
//! - store failure or shutdown before submission: no PUBACK, the connection closes and
//!   the device resends. Resent events are stored once if they carry an `id`.

pub mod connection;
pub mod external;
pub mod server;
pub mod sessions;
mod status;
pub mod topic;
mod wire;

pub use status::MqttStatus;

use std::future::Future;
use std::pin::Pin;

use tokio::time::{sleep, Duration, Instant};
use tokio_util::sync::CancellationToken;

use super::decode::Format;
pub(crate) use super::Rejection;
use super::{Intake, Unowned};
use crate::model::{now_ms, DeviceId, Record, UserId};
use crate::pipeline::{AckError, SubmitError};
use crate::registry::auth::Principal;
use crate::telemetry::{Reason, Source};

/// Why the MQTT source could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("IOTPIPE_MQTT_URL={url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("cannot keep the MQTT client id in {path}: {source}")]
    ClientId {
        path: String,
        source: std::io::Error,
    },
}

/// Limits shared by both MQTT sources.
#[derive(Debug, Clone, Copy)]
pub struct MqttLimits {
    /// Largest payload accepted, in bytes (the HTTP body limit).
    pub max_payload_bytes: usize,
    /// Messages read and not yet acknowledged, per connection.
    pub max_inflight: usize,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    /// Longest keep-alive granted; also the one for a device that asks for none.
    pub max_keep_alive_secs: u16,
    pub max_per_device: usize,
    pub max_per_ip: usize,
}

/// What an MQTT source needs from the rest of iotpipe. Cheap to clone.
#[derive(Clone)]
pub struct MqttContext {
    pub intake: Intake,
    pub limits: MqttLimits,
    /// Cancelled when iotpipe stops: sources stop reading, and messages still waiting
    /// for the rate limiter are given up (not acknowledged).
    pub shutdown: CancellationToken,
    /// The built-in endpoint's open connections, for client takeover.
    pub sessions: sessions::Sessions,
}

/// How one message ended, in the order it was received.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Acknowledge it (QoS 1): durable, or refused for good.
    Ack {
        pkid: u16,
        received: Instant,
        /// Refused for good (bad payload): MQTT 5 devices hear why in the PUBACK.
        refused: bool,
    },
    /// Nothing to acknowledge (QoS 0).
    Done,
    /// Do not acknowledge; close, so that the device (or broker) sends it again.
    Retry(&'static str),
}

pub(crate) type Pending = Pin<Box<dyn Future<Output = Outcome> + Send>>;

impl MqttContext {
    /// Counts a refusal; see [`Intake::reject`].
    pub(crate) async fn reject(&self, device: Option<(UserId, DeviceId)>, r: &Rejection) {
        self.intake.reject(Source::Mqtt, device, r).await;
    }

    /// Decodes a payload into the device's records, with the same rules as HTTP with
    /// a device token.
    pub(crate) async fn decode(
        &self,
        payload: &[u8],
        user: UserId,
        device: DeviceId,
    ) -> Result<Vec<Record>, Rejection> {
        let received_ms = now_ms();
        if payload.len() > self.limits.max_payload_bytes {
            return Err(Rejection::new(
                Reason::TooLarge,
                1,
                format!(
                    "the payload is larger than {} bytes",
                    self.limits.max_payload_bytes
                ),
            ));
        }
        let decoded = self
            .intake
            .decode(payload, Format::Json, received_ms)
            .map_err(|e| Rejection::new(e.reason(), e.events() as u64, e.to_string()))?;
        let events = decoded.len() as u64;
        let principal = Principal::Device {
            id: device,
            user_id: user,
        };
        self.intake
            .records(principal, decoded, received_ms)
            .await
            .map_err(|e| match e {
                Unowned::DeviceIdNotAllowed { index } => Rejection::new(
                    Reason::Invalid,
                    events,
                    format!("event {index}: device_id: is not allowed over MQTT; the topic names the device"),
                ),
                // A device's own records need no registry look-up, so nothing else
                // can refuse them; counted as unknown should that ever change.
                _ => Rejection::new(Reason::UnknownDevice, events, "unknown device"),
            })
    }

    /// QoS 1: waits until the rate limiter admits the events, submits them (waiting
    /// for room), and resolves once they are durable. Never drops them: a failure is
    /// [`Outcome::Retry`], and the caller must not acknowledge.
    pub(crate) async fn deliver_qos1(
        self,
        records: Vec<Record>,
        pkid: u16,
        received: Instant,
        cancel: CancellationToken,
    ) -> Outcome {
        let events = records.len() as u64;
        if events > 0 {
            let (user, device) = (records[0].user_id, records[0].device_id);
            if !self.admit_patiently(user, device, events, &cancel).await {
                return Outcome::Retry("stopping before the rate limiter admitted the message");
            }
            let ack = tokio::select! {
                biased;
                ack = self.intake.pipeline.submit(records) => match ack {
                    Ok(ack) => ack,
                    Err(SubmitError::Closed | SubmitError::Full) => {
                        return Outcome::Retry("the pipeline is shutting down")
                    }
                },
                _ = cancel.cancelled() => {
                    return Outcome::Retry("stopping before the pipeline had room");
                }
            };
            if let Err(e) = self.intake.stored(Source::Mqtt, ack, events).await {
                log_store_failure(&e);
                return Outcome::Retry("the store write failed");
            }
        }
        Outcome::Ack {
            pkid,
            received,
            refused: false,
        }
    }

    /// Rate-limit hold-back: sleeps until the budgets are out of debt. False if
    /// `cancel` fired first.
    async fn admit_patiently(
        &self,
        user: UserId,
        device: DeviceId,
        events: u64,
        cancel: &CancellationToken,
    ) -> bool {
        loop {
            match self.intake.live.admit(user, device, events, now_ms()).await {
                Ok(()) => return true,
                Err(limited) => {
                    let wait = Duration::from_secs_f64(
                        (limited.retry_after_ms / 1000.0).clamp(0.001, 1.0),
                    );
                    tokio::select! {
                        _ = sleep(wait) => {}
                        _ = cancel.cancelled() => return false,
                    }
                }
            }
        }
    }

    /// QoS 0: admitted or dropped at once, submitted only if the pipeline has room.
    /// Returns the future that counts the events once durable.
    pub(crate) async fn deliver_qos0(&self, records: Vec<Record>) -> Option<Pending> {
        let events = records.len() as u64;
        let (user, device) = (records.first()?.user_id, records[0].device_id);
        if let Err((_, limited)) = self.intake.admit(&records, now_ms()).await {
            let message = format!(
                "rate_limited ({} limit): QoS 0 message dropped",
                limited.limit.as_str()
            );
            let r = Rejection::new(Reason::RateLimited, events, message);
            self.reject(Some((user, device)), &r).await;
            return None;
        }
        match self.intake.pipeline.try_submit(records) {
            Ok(ack) => {
                let this = self.clone();
                Some(Box::pin(async move {
                    match this.intake.stored(Source::Mqtt, ack, events).await {
                        Ok(()) => {}
                        Err(e) => {
                            log_store_failure(&e);
                            let r = Rejection::new(
                                Reason::Overloaded,
                                events,
                                "overloaded: the store write failed; QoS 0 message lost",
                            );
                            this.reject(Some((user, device)), &r).await;
                        }
                    }
                    Outcome::Done
                }))
            }
            Err(e) => {
                let r = Rejection::new(
                    Reason::Overloaded,
                    events,
                    format!("overloaded: {e}; QoS 0 message dropped"),
                );
                self.reject(Some((user, device)), &r).await;
                None
            }
        }
    }
}

fn log_store_failure(e: &AckError) {
    tracing::warn!(error = %e, "MQTT message not written; it is not acknowledged and will be resent");
}
