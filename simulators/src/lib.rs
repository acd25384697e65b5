//! iotpipe-sim: a device simulator and load-test harness for iotpipe.
//!
//! # Module map
//!
//! A run goes through the crate in this order:
//!
//! - [`provision`]: the fleet: devices created through the registry API, read from a
//!   devices file, or synthetic.
//! - [`profile`]: what each device measures and how its readings move
//!   (`smart-meter`, `env-sensor`, `gps-tracker`, JSON templates).
//! - [`chaos`]: what a device sends: fresh events, late ones, resends of the same id,
//!   invalid ones; and their wire form.
//! - [`rate`]: when each event is due (rate, ramp-up, count split).
//! - [`run`]: the fleet driver, pacing each device and handing its messages to a
//!   protocol [`proto::Link`] ([`proto::http`], [`proto::mqtt`]).
//! - [`tally`]: counters, the latency histogram and the per-id ledger.
//! - [`report`]: the final report, as text or JSON.
//! - [`verify`]: reads everything back through the API and diffs it with the ledger.
//! - [`demo`]: an embedded iotpipe, a small fleet, a verification and a chart.
//! - [`api`]: the HTTP client for iotpipe's API.
#![warn(unreachable_pub)]
#![warn(clippy::await_holding_lock)]

pub mod api;
pub mod chaos;
pub mod demo;
pub mod profile;
pub mod proto;
pub mod provision;
pub mod rate;
pub mod report;
pub mod run;
pub mod tally;
pub mod verify;
