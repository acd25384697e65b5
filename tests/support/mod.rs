//! The one test harness: every suite under `tests/`, the benches and the simulator's
//! tests include this module (`mod support;`, or `#[path]` from outside `tests/`).
//!
//! - `server`: the server, in process or as a child process of the built binary with
//!   a cleaned environment;
//! - `http`: the API client, one argument order everywhere: `(path, secret)`;
//! - `mqtt`: devices, raw packets and a private broker;
//! - `backends`: MariaDB, Redis and Cassandra (shared ones and private processes);
//! - `metrics`: the Prometheus text parser.

// Each test binary compiles this module on its own and uses a part of it, so rustc
// sees the rest as dead in that binary; every item here is used by some suite.
#![allow(dead_code, unused_imports)]

pub mod backends;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod server;

use std::time::Duration;

pub use backends::*;
pub use http::*;
pub use metrics::*;
pub use mqtt::*;
pub use server::*;

/// How long a test waits for something that should happen at once. Generous: the
/// machine is small and shared with other builds.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The admin token of every server the harness starts.
pub const ADMIN: &str = "ipa_harness-admin-token-0123456789abcdef";

/// A random suffix for names that must not collide: users, databases, key prefixes.
pub fn random_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Now in ms since the epoch, as the server counts it.
pub fn now_ms() -> i64 {
    iotpipe::model::now_ms()
}

/// The median of a sample (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
