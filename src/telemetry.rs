//! The Prometheus series of one iotpipe instance.
//!
//! Each instance owns its recorder instead of installing a global one, so that several
//! servers in one process (the tests) keep separate figures. Handles are registered
//! once at start-up, which also makes every series exist at zero from the start, as
//! the contract asks. Label values come from small fixed sets: never a device id.

use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Http,
    Mqtt,
}

impl Source {
    pub const ALL: [Source; 2] = [Source::Http, Source::Mqtt];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Mqtt => "mqtt",
        }
    }
}

/// Why events were rejected. These are the `reason` label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Invalid,
    Unauthorized,
    RateLimited,
    TooLarge,
    UnknownDevice,
    Overloaded,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::Invalid,
        Reason::Unauthorized,
        Reason::RateLimited,
        Reason::TooLarge,
        Reason::UnknownDevice,
        Reason::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Invalid => "invalid",
            Reason::Unauthorized => "unauthorized",
            Reason::RateLimited => "rate_limited",
            Reason::TooLarge => "too_large",
            Reason::UnknownDevice => "unknown_device",
            Reason::Overloaded => "overloaded",
        }
    }
}

/// Upper bounds of the store write latency histogram, in seconds.
const WRITE_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Upper bounds of the MQTT ack latency histogram (PUBLISH read → PUBACK written),
/// in seconds. It spans a flush (a few ms) up to a stalled store.
const ACK_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The instance's series. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    handle: PrometheusHandle,
    ingested: [Counter; 2],
    rejected: [[Counter; 6]; 2],
    batches_written: Counter,
    store_write_seconds: Histogram,
    queue_depth: Gauge,
    rollup_backlog: Gauge,
    mqtt_connections: Gauge,
    mqtt_messages_received: Counter,
    mqtt_acks_sent: Counter,
    mqtt_ack_latency: Histogram,
    /// Failed logins by source, and those refused unheard for too many failures.
    logins_failed: [Counter; 2],
    logins_throttled: [Counter; 2],
}

impl Telemetry {
    pub fn new() -> Self {
        let recorder: PrometheusRecorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("iotpipe_store_write_seconds".into()),
                WRITE_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full("iotpipe_mqtt_ack_latency_seconds".into()),
                ACK_BUCKETS,
            )
            .expect("the bucket list is not empty")
            .build_recorder();
        let meta = Metadata::new(module_path!(), Level::INFO, None);
        recorder.describe_counter(
            "iotpipe_events_ingested_total".into(),
            Some(Unit::Count),
            "Events acknowledged to their source, duplicates included.".into(),
        );
        recorder.describe_counter(
            "iotpipe_events_rejected_total".into(),
            Some(Unit::Count),
            "Events refused, by source and reason.".into(),
        );
        recorder.describe_counter(
            "iotpipe_logins_failed_total".into(),
            Some(Unit::Count),
            "Logins with a missing or unknown secret, by source.".into(),
        );
        recorder.describe_counter(
            "iotpipe_logins_throttled_total".into(),
            Some(Unit::Count),
            "Logins refused unheard after too many failures from the address, by source.".into(),
        );
        recorder.describe_counter(
            "iotpipe_batches_written_total".into(),
            Some(Unit::Count),
            "Flushes written durably to the event store.".into(),
        );
        recorder.describe_histogram(
            "iotpipe_store_write_seconds".into(),
            Some(Unit::Seconds),
            "Time to write one flush durably, retries included.".into(),
        );
        recorder.describe_gauge(
            "iotpipe_pipeline_queue_depth".into(),
            Some(Unit::Count),
            "Events accepted by the pipeline and not yet durable.".into(),
        );
        recorder.describe_gauge(
            "iotpipe_rollup_backlog".into(),
            Some(Unit::Count),
            "Minutes this instance marked pending and has not yet recomputed into rollups \
             (wide-column store; aggregates read them from their events meanwhile)."
                .into(),
        );
        recorder.describe_gauge(
            "iotpipe_mqtt_connections".into(),
            Some(Unit::Count),
            "Devices connected to the built-in MQTT endpoint.".into(),
        );
        recorder.describe_counter(
            "iotpipe_mqtt_messages_received_total".into(),
            Some(Unit::Count),
            "MQTT PUBLISH messages received, from devices or the external broker.".into(),
        );
        recorder.describe_counter(
            "iotpipe_mqtt_acks_sent_total".into(),
            Some(Unit::Count),
            "MQTT PUBACKs sent (built-in) or acks given to the external broker.".into(),
        );
        recorder.describe_histogram(
            "iotpipe_mqtt_ack_latency_seconds".into(),
            Some(Unit::Seconds),
            "Time from receiving a QoS 1 PUBLISH to sending its acknowledgement.".into(),
        );
        let ingested = Source::ALL.map(|s| {
            let key = Key::from_parts("iotpipe_events_ingested_total", vec![source_label(s)]);
            recorder.register_counter(&key, &meta)
        });
        let rejected = Source::ALL.map(|s| {
            Reason::ALL.map(|r| {
                let labels = vec![source_label(s), Label::new("reason", r.as_str())];
                let key = Key::from_parts("iotpipe_events_rejected_total", labels);
                recorder.register_counter(&key, &meta)
            })
        });
        let by_source = |name: &'static str| {
            Source::ALL.map(|s| {
                recorder.register_counter(&Key::from_parts(name, vec![source_label(s)]), &meta)
            })
        };
        let logins_failed = by_source("iotpipe_logins_failed_total");
        let logins_throttled = by_source("iotpipe_logins_throttled_total");
        let batches_written =
            recorder.register_counter(&Key::from_name("iotpipe_batches_written_total"), &meta);
        let store_write_seconds =
            recorder.register_histogram(&Key::from_name("iotpipe_store_write_seconds"), &meta);
        let queue_depth =
            recorder.register_gauge(&Key::from_name("iotpipe_pipeline_queue_depth"), &meta);
        let rollup_backlog =
            recorder.register_gauge(&Key::from_name("iotpipe_rollup_backlog"), &meta);
        let mqtt_connections =
            recorder.register_gauge(&Key::from_name("iotpipe_mqtt_connections"), &meta);
        let mqtt_messages_received = recorder.register_counter(
            &Key::from_name("iotpipe_mqtt_messages_received_total"),
            &meta,
        );
        let mqtt_acks_sent =
            recorder.register_counter(&Key::from_name("iotpipe_mqtt_acks_sent_total"), &meta);
        let mqtt_ack_latency =
            recorder.register_histogram(&Key::from_name("iotpipe_mqtt_ack_latency_seconds"), &meta);
        for c in ingested
            .iter()
            .chain(rejected.iter().flatten())
            .chain(logins_failed.iter().chain(&logins_throttled))
            .chain([&mqtt_messages_received, &mqtt_acks_sent])
        {
            c.increment(0);
        }
        mqtt_connections.set(0.0);
        batches_written.increment(0);
        queue_depth.set(0.0);
        rollup_backlog.set(0.0);
        Self {
            inner: Arc::new(Inner {
                handle: recorder.handle(),
                ingested,
                rejected,
                batches_written,
                store_write_seconds,
                queue_depth,
                rollup_backlog,
                mqtt_connections,
                mqtt_messages_received,
                mqtt_acks_sent,
                mqtt_ack_latency,
                logins_failed,
                logins_throttled,
            }),
        }
    }

    pub fn ingested(&self, source: Source, events: u64) {
        self.inner.ingested[source as usize].increment(events);
    }

    pub fn rejected(&self, source: Source, reason: Reason, events: u64) {
        self.inner.rejected[source as usize][reason as usize].increment(events);
    }

    pub fn login_failed(&self, source: Source) {
        self.inner.logins_failed[source as usize].increment(1);
    }

    pub fn login_throttled(&self, source: Source) {
        self.inner.logins_throttled[source as usize].increment(1);
    }

    pub fn batch_written(&self, seconds: f64) {
        self.inner.batches_written.increment(1);
        self.inner.store_write_seconds.record(seconds);
    }

    /// A device connected to the built-in MQTT endpoint (CONNACK accepted).
    pub fn mqtt_connected(&self) {
        self.inner.mqtt_connections.increment(1.0);
    }

    /// A connected device went away.
    pub fn mqtt_disconnected(&self) {
        self.inner.mqtt_connections.decrement(1.0);
    }

    pub fn mqtt_received(&self, messages: u64) {
        self.inner.mqtt_messages_received.increment(messages);
    }

    /// One acknowledgement sent, `seconds` after its PUBLISH was received.
    pub fn mqtt_acked(&self, seconds: f64) {
        self.inner.mqtt_acks_sent.increment(1);
        self.inner.mqtt_ack_latency.record(seconds);
    }

    /// Renders the Prometheus text format, with the queue depth and the store's rollup
    /// backlog sampled now.
    pub fn render(&self, queue_depth: usize, rollup_backlog: usize) -> String {
        self.inner.queue_depth.set(queue_depth as f64);
        self.inner.rollup_backlog.set(rollup_backlog as f64);
        self.inner.handle.run_upkeep();
        self.inner.handle.render()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

fn source_label(s: Source) -> Label {
    Label::new("source", s.as_str())
}
