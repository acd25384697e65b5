//! External broker mode: iotpipe subscribes to `$share/iotpipe/devices/+/events` (the
//! group is `mqtt.share_group`) on a
//! broker (Mosquitto, EMQX…) in a persistent session and acknowledges each message to
//! the broker only once its events are durable.
//!
//! Two tasks share the work:
//! - the poller drives rumqttc's event loop (network, pings, reconnects, outgoing
//!   acks) and hands each PUBLISH to the acker through a bounded channel;
//! - the acker keeps the ordered window of messages in progress and queues each ack
//!   (`client.ack`) once the message is durable.
//!
//! Design: the acker never waits on the poller. It queues acks with `try_ack` into a
//! request channel larger than the 65,535 packet ids MQTT allows in flight, so the
//! queue cannot be full, and the poller can always make progress sending them. The
//! poller waits on the acker only while the window is full: that is the
//! backpressure, and the broker then keeps the backlog (its own queue settings decide
//! how much; see `docs/mqtt.md`).

use std::path::Path;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, Outgoing, Publish, QoS};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout_at, Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::MqttStatus;
use super::{topic, MqttContext, MqttError, Outcome, Rejection};
use crate::config::MqttConfig;
use crate::telemetry::Reason;

/// More than the packet ids MQTT 3.1.1 can have in flight, so `try_ack` never finds
/// the request queue full.
const REQUEST_CAPACITY: usize = 65_536 + 64;
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The largest packet MQTT can frame. A smaller client limit would make an oversized
/// message a poison pill: rumqttc would drop the connection on it, and the broker
/// would deliver it again on every reconnect. Taken whole, it is refused as
/// `too_large` and acknowledged. The broker's `max_packet_size` bounds it.
const MAX_INCOMING_PACKET: usize = 268_435_455;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// At shutdown, how long messages in progress may take to become durable and be
/// acknowledged before the connection is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ExternalSettings {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
    pub client_id: String,
    /// `$share/{group}/devices/+/events`.
    pub subscription: String,
    /// Messages received and not yet acknowledged, at most.
    pub max_inflight: usize,
}

impl ExternalSettings {
    /// Reads `mqtt.url` and the client id, kept in `data_dir` unless configured.
    /// `Ok(None)` when no broker is configured.
    ///
    /// # Errors
    ///
    /// An unparsable URL, or a client id that cannot be kept in the data dir.
    pub fn from_config(mqtt: &MqttConfig, data_dir: &Path) -> Result<Option<Self>, MqttError> {
        let Some(url) = &mqtt.url else {
            return Ok(None);
        };
        let (host, port, credentials) = parse_url(url).map_err(|reason| MqttError::Url {
            url: url.clone(),
            reason,
        })?;
        let client_id = match &mqtt.client_id {
            Some(id) => id.clone(),
            None => persistent_client_id(data_dir)?,
        };
        Ok(Some(Self {
            host,
            port,
            credentials,
            client_id,
            subscription: topic::shared_subscription(&mqtt.share_group),
            max_inflight: mqtt.broker_max_inflight,
        }))
    }
}

/// Broker host, port, and optional user name and password.
type BrokerAddress = (String, u16, Option<(String, String)>);

/// `mqtt://[user[:pass]@]host[:port]` (also `tcp://`); the port defaults to 1883.
fn parse_url(url: &str) -> Result<BrokerAddress, String> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .ok_or("expected mqtt://host:port (TLS is not supported)")?
        .trim_end_matches('/');
    let (credentials, address) = match rest.rsplit_once('@') {
        Some((c, a)) => {
            let (user, pass) = c.split_once(':').unwrap_or((c, ""));
            (Some((user.to_owned(), pass.to_owned())), a)
        }
        None => (None, rest),
    };
    let (host, port) = match address.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => {
            let port = p.parse().map_err(|_| format!("{p:?} is not a port"))?;
            (h, port)
        }
        _ => (address, 1883),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err("expected mqtt://host:port".to_owned());
    }
    Ok((host.to_owned(), port, credentials))
}

/// The instance's client id, generated once and kept in the data dir: the broker
/// keeps the persistent session (and the messages queued for it) under this id, so
/// it must survive restarts.
fn persistent_client_id(data_dir: &Path) -> Result<String, MqttError> {
    let path = data_dir.join("mqtt.client_id");
    let err = |source| MqttError::ClientId {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // 23 characters from [0-9a-z]: what every MQTT 3.1.1 broker must accept.
    let id = format!("iotpipe{}", &Uuid::new_v4().simple().to_string()[..16]);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    Ok(id)
}

/// Subscribes and ingests until shutdown; reconnects with backoff on any failure.
pub async fn run(settings: ExternalSettings, ctx: MqttContext, status: MqttStatus) {
    let mut options = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(MAX_INCOMING_PACKET, 64 * 1024);
    if let Some((user, pass)) = &settings.credentials {
        options.set_credentials(user, pass);
    }
    let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
    let (tx, rx) = mpsc::channel(settings.max_inflight);
    let acker = tokio::spawn(ack_loop(
        ctx.clone(),
        client.clone(),
        rx,
        settings.max_inflight,
    ));

    let broker = format!("{}:{}", settings.host, settings.port);
    let mut backoff = MIN_BACKOFF;
    let mut drain_deadline = None;
    loop {
        let polled = match drain_deadline {
            Some(deadline) => match timeout_at(deadline, eventloop.poll()).await {
                Ok(polled) => polled,
                Err(_) => break,
            },
            None => tokio::select! {
                polled = eventloop.poll() => polled,
                _ = ctx.shutdown.cancelled() => {
                    drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT + KEEP_ALIVE);
                    continue;
                }
            },
        };
        match polled {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                tracing::info!(%broker, client_id = %settings.client_id, session_present = ack.session_present, "connected to the MQTT broker");
                backoff = MIN_BACKOFF;
                // Subscribing again is harmless when the session kept the subscription,
                // and needed when the broker lost it.
                if let Err(e) = client.try_subscribe(&settings.subscription, QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "cannot subscribe on the MQTT broker");
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::error!(%broker, topic = %settings.subscription, "the MQTT broker refused the subscription");
                }
                status.set_ok(!refused);
            }
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                // Waiting here while the window is full is the backpressure. Once the
                // acker has stopped, a message is left unacknowledged: the broker
                // delivers it again to the next session.
                if drain_deadline.is_none() {
                    let _ = tx.send(publish).await;
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) if drain_deadline.is_some() => break,
            Ok(_) => {}
            Err(e) => {
                status.set_ok(false);
                if drain_deadline.is_some() {
                    break;
                }
                tracing::warn!(%broker, error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT broker connection failed");
                tokio::select! {
                    _ = sleep(backoff) => {}
                    _ = ctx.shutdown.cancelled() => {
                        drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT + KEEP_ALIVE);
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
    drop(tx);
    status.set_ok(false);
    if let Err(e) = acker.await {
        tracing::error!(error = %e, "MQTT ack task failed");
    }
    tracing::info!("MQTT broker subscriber stopped");
}

/// Keeps the ordered window of messages in progress and acknowledges them in order.
/// At shutdown it stops taking messages, finishes those in progress, and asks the
/// poller to disconnect once their acks are queued.
async fn ack_loop(
    ctx: MqttContext,
    client: AsyncClient,
    mut rx: mpsc::Receiver<Publish>,
    window: usize,
) {
    let mut pending = FuturesOrdered::new();
    let cancel = ctx.shutdown.child_token();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some(outcome) = pending.next(), if !pending.is_empty() => match outcome {
                Outcome::Ack { pkid, received, .. } => {
                    let mut ack = Publish::new("", QoS::AtLeastOnce, Vec::new());
                    ack.pkid = pkid;
                    match client.try_ack(&ack) {
                        Ok(()) => ctx.intake.telemetry.mqtt_acked(received.elapsed().as_secs_f64()),
                        Err(e) => tracing::warn!(error = %e, pkid, "cannot queue an MQTT ack"),
                    }
                }
                Outcome::Done => {}
                Outcome::Retry(why) => {
                    // The broker redelivers unacknowledged messages only to a new
                    // connection of the session: reconnect.
                    tracing::warn!(why, "MQTT message not acknowledged; reconnecting for redelivery");
                    if !ctx.shutdown.is_cancelled() {
                        let _ = client.try_disconnect();
                    }
                }
            },
            _ = ctx.shutdown.cancelled(), if open => {
                rx.close();
                open = false;
            }
            received = rx.recv(), if open && pending.len() < window => match received {
                Some(publish) => pending.push_back(deliver(ctx.clone(), publish, cancel.clone())),
                None => open = false,
            },
        }
    }
    if let Err(e) = client.try_disconnect() {
        tracing::debug!(error = %e, "MQTT disconnect not queued");
    }
}

fn deliver(ctx: MqttContext, publish: Publish, cancel: CancellationToken) -> super::Pending {
    Box::pin(async move {
        let received = Instant::now();
        ctx.intake.telemetry.mqtt_received(1);
        let settled = if publish.qos == QoS::AtMostOnce {
            Outcome::Done
        } else {
            Outcome::Ack {
                pkid: publish.pkid,
                received,
                refused: false,
            }
        };
        let Some(device) = topic::device_of(&publish.topic) else {
            let r = Rejection::new(Reason::UnknownDevice, 1, "not a device topic");
            ctx.reject(None, &r).await;
            return settled;
        };
        let owner = loop {
            match ctx.intake.auth.device_owner(device).await {
                Ok(owner) => break owner,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look up the device of an MQTT message; retrying");
                    tokio::select! {
                        _ = sleep(Duration::from_secs(1)) => {}
                        _ = cancel.cancelled() => return Outcome::Retry("registry unavailable"),
                    }
                }
            }
        };
        let Some(user) = owner else {
            let r = Rejection::new(Reason::UnknownDevice, 1, "unknown device");
            ctx.reject(None, &r).await;
            return settled;
        };
        let records = match ctx.decode(&publish.payload, user, device).await {
            Ok(records) => records,
            Err(r) => {
                ctx.reject(Some((user, device)), &r).await;
                return settled;
            }
        };
        match publish.qos {
            QoS::AtMostOnce => {
                if let Some(counting) = ctx.deliver_qos0(records).await {
                    counting.await;
                }
                Outcome::Done
            }
            QoS::AtLeastOnce | QoS::ExactlyOnce => {
                ctx.deliver_qos1(records, publish.pkid, received, cancel)
                    .await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_defaults() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".to_owned(), 1884, None)
        );
        assert_eq!(
            parse_url("tcp://broker/").unwrap(),
            ("broker".to_owned(), 1883, None)
        );
        assert_eq!(
            parse_url("mqtt://u:p@h:1").unwrap(),
            ("h".to_owned(), 1, Some(("u".to_owned(), "p".to_owned())))
        );
        assert_eq!(parse_url("mqtt://[::1]:1883").unwrap().0, "::1");
        for bad in ["http://h:1", "mqtt://", "mqtt://h:port", "h:1883"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_generated_client_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = persistent_client_id(dir.path()).unwrap();
        let b = persistent_client_id(dir.path()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 23);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
}
