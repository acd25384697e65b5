//! iotpipe: a time-series ingestion pipeline for IoT events.
//!
//! # Module map
//!
//! An event travels through the crate in this order:
//!
//! - [`ingest`]: the sources. [`ingest::Intake`] holds the steps every source shares;
//!   [`api::ingest`] takes `POST /v1/ingest`; [`ingest::mqtt`] is the built-in MQTT
//!   endpoint devices connect to, and the external-broker subscriber;
//!   [`ingest::decode`] turns any payload into validated [`model::Event`]s.
//! - [`pipeline`]: where events wait. A bounded queue feeds the
//!   [`pipeline::batcher`], which groups events by store partition and flushes on size or
//!   age; the [`pipeline::writer`] writes each flush durably and only then acknowledges
//!   the sources.
//! - [`store`]: where events are written and read back, behind the [`store::EventStore`]
//!   trait: [`store::embedded`] (fjall, the default) and [`store::scylla`].
//! - [`query`]: where events are read: windowed aggregates and event listings, computed
//!   above the store trait so that every backend shares them.
//!
//! Beside the data path:
//!
//! - [`registry`]: users, devices and their hashed secrets, behind [`registry::Registry`]
//!   ([`registry::sqlite`] by default, [`registry::mysql`]).
//! - [`live`]: live counters and rate limits, behind [`live::Live`] ([`live::local`] by
//!   default, [`live::redis`]).
//! - [`http`]: the HTTP plumbing (state, authentication, error mapping, accept loop);
//!   [`api`]: the route table and its handlers, above it.
//!
//! The modules stand in layers, each importing only from its own and lower ones;
//! `docs/architecture.md` lists them and `tests/import_graph.rs` checks it.
//! - [`ops`]: the operations commands (export, …), above everything else.
//! - [`config`], [`topology`] (wiring, start-up and ordered shutdown), [`telemetry`]
//!   (Prometheus series) and [`model`] (shared types and time rules).
#![warn(unreachable_pub)]
#![warn(clippy::await_holding_lock)]

pub mod api;
pub mod config;
pub mod http;
pub mod ingest;
pub mod live;
pub mod model;
pub mod ops;
pub mod pipeline;
pub mod query;
pub mod registry;
pub mod store;
pub mod telemetry;
pub mod topology;

pub use config::Config;
