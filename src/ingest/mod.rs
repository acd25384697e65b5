//! The sources: where events enter. Each source authenticates, then hands the payload
//! to the shared [`Intake`], which decodes it with [`decode`], admits it and submits it
//! to the [`crate::pipeline`]; the source answers the device only when the pipeline
//! says the events are durable. The HTTP source's handler is in `crate::api::ingest`,
//! above the HTTP plumbing it needs.

pub mod decode;
mod intake;
pub mod mqtt;
mod schema;

pub use intake::Intake;
pub(crate) use intake::{Rejection, Unowned};
