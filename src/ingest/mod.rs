//! The sources: where events enter. Each source authenticates, decodes with
//! [`decode`], and submits to the [`crate::pipeline`]; it answers the device only when
//! the pipeline says the events are durable.

use crate::live::Live;
use crate::model::{DeviceId, UserId};
use crate::telemetry::{Reason, Source, Telemetry};

pub mod decode;
pub mod http;
pub mod mqtt;
mod schema;

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

/// Counts refused events in `/metrics` and, where the device is known, in its live
/// `rejected_total` and `last_error`. Every source reports its refusals through here.
pub(crate) async fn count_rejected(
    telemetry: &Telemetry,
    live: &dyn Live,
    source: Source,
    device: Option<(UserId, DeviceId)>,
    r: &Rejection,
) {
    telemetry.rejected(source, r.reason, r.events);
    if let Some((user, device)) = device {
        live.record_rejected(user, device, r.events, &r.message)
            .await;
    }
}
