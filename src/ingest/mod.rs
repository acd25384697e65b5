//! The sources: where events enter. Each source authenticates, decodes with
//! [`decode`], and submits to the [`crate::pipeline`]; it answers the device only when
//! the pipeline says the events are durable.

pub mod decode;
pub mod http;
pub mod mqtt;
