//! What every source does with a payload once it knows who sent it: decode it, charge
//! the events to their devices, admit them under the rate limits, submit them and wait
//! until they are durable, and count what was refused. The HTTP handler and the MQTT
//! sources differ only in how they read the payload and how they answer.

use std::collections::HashMap;

use super::decode::{self, DecodeError, DecodeOptions, Decoded, Format};
use crate::live::{Limited, SharedLive};
use crate::model::{DeviceId, Record, UserId};
use crate::pipeline::{Ack, AckError, Pipeline};
use crate::registry::auth::{Principal, SharedAuth};
use crate::registry::RegistryError;
use crate::store::retention::Retention;
use crate::telemetry::{Reason, Source, Telemetry};

/// A refusal, for the counters.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub(crate) reason: Reason,
    pub(crate) events: u64,
    pub(crate) message: String,
}

impl Rejection {
    pub(crate) fn new(reason: Reason, events: u64, message: impl Into<String>) -> Self {
        Self {
            reason,
            events,
            message: message.into(),
        }
    }
}

impl DecodeError {
    /// The `/metrics` reason this refusal is counted under, whichever the source.
    pub(crate) fn reason(&self) -> Reason {
        match self {
            DecodeError::TooMany { .. } => Reason::TooLarge,
            DecodeError::Invalid { .. } => Reason::Invalid,
        }
    }
}

/// Why decoded events cannot be charged to the caller. Each source words the first
/// two in its own terms: a device over MQTT is named by its topic, over HTTP by its
/// token.
#[derive(Debug)]
pub(crate) enum Unowned {
    /// A device's own secret, and an event that names a device anyway.
    DeviceIdNotAllowed { index: usize },
    /// A user key (gateway mode), and an event that names no device.
    DeviceIdRequired { index: usize },
    /// A named device that is not the user's, or does not exist.
    NotOwned,
    /// Ownership could not be checked.
    Registry(RegistryError),
}

/// The ingest steps both sources share, and what they need for them. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    pub auth: SharedAuth,
    pub live: SharedLive,
    pub pipeline: Pipeline,
    pub telemetry: Telemetry,
    /// Most events in one request or message.
    pub max_events: usize,
    /// Events the raw tier has already expired are refused.
    pub retention: Retention,
}

impl Intake {
    /// Decodes a payload received at `received_ms`, with the limits every source shares.
    pub(crate) fn decode(
        &self,
        payload: &[u8],
        format: Format,
        received_ms: i64,
    ) -> Result<Vec<Decoded>, DecodeError> {
        let opts = DecodeOptions {
            max_events: self.max_events,
            now_ms: received_ms,
            retention: self.retention,
        };
        decode::decode(payload, format, opts)
    }

    /// Charges each decoded event to a device of `principal`: a device's secret owns
    /// its events; a user key (gateway mode) names a device of the user's in each.
    pub(crate) async fn records(
        &self,
        principal: Principal,
        decoded: Vec<Decoded>,
        received_ms: i64,
    ) -> Result<Vec<Record>, Unowned> {
        let owner = |user_id, device_id, d: Decoded| Record {
            user_id,
            device_id,
            received_ms,
            event: d.event,
        };
        match principal {
            Principal::Device { id, user_id } => {
                if let Some(index) = decoded.iter().position(|d| d.device_id.is_some()) {
                    return Err(Unowned::DeviceIdNotAllowed { index });
                }
                Ok(decoded.into_iter().map(|d| owner(user_id, id, d)).collect())
            }
            Principal::User(user_id) => {
                if let Some(index) = decoded.iter().position(|d| d.device_id.is_none()) {
                    return Err(Unowned::DeviceIdRequired { index });
                }
                let mut checked: Vec<DeviceId> = Vec::new();
                for device in decoded.iter().filter_map(|d| d.device_id) {
                    if checked.contains(&device) {
                        continue;
                    }
                    match self.auth.device_owner(device).await {
                        Ok(Some(owner)) if owner == user_id => checked.push(device),
                        Ok(_) => return Err(Unowned::NotOwned),
                        Err(e) => return Err(Unowned::Registry(e)),
                    }
                }
                Ok(decoded
                    .into_iter()
                    .map(|d| owner(user_id, d.device_id.unwrap_or_default(), d))
                    .collect())
            }
            // No source lets the admin token ingest; refused as an unknown device.
            Principal::Admin => Err(Unowned::NotOwned),
        }
    }

    /// Admits the records under the per-device and per-user rate limits, device by
    /// device. On refusal, names the device whose budget was exceeded.
    pub(crate) async fn admit(
        &self,
        records: &[Record],
        now_ms: i64,
    ) -> Result<(), ((UserId, DeviceId), Limited)> {
        let mut per_device: HashMap<(UserId, DeviceId), u64> = HashMap::new();
        for r in records {
            *per_device.entry((r.user_id, r.device_id)).or_default() += 1;
        }
        for ((user, device), n) in per_device {
            self.live
                .admit(user, device, n, now_ms)
                .await
                .map_err(|limited| ((user, device), limited))?;
        }
        Ok(())
    }

    /// Waits until a submission is durable and counts its events as ingested.
    pub(crate) async fn stored(
        &self,
        source: Source,
        ack: Ack,
        events: u64,
    ) -> Result<(), AckError> {
        ack.durable().await?;
        self.telemetry.ingested(source, events);
        Ok(())
    }

    /// Counts refused events in `/metrics` and, where the device is known, in its live
    /// `rejected_total` and `last_error`. Every source reports its refusals through here.
    pub(crate) async fn reject(
        &self,
        source: Source,
        device: Option<(UserId, DeviceId)>,
        r: &Rejection,
    ) {
        self.telemetry.rejected(source, r.reason, r.events);
        if let Some((user, device)) = device {
            self.live
                .record_rejected(user, device, r.events, &r.message)
                .await;
        }
    }
}
