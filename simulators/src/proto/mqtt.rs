//! MQTT 3.1.1: one connection per device (username = device id, password = device
//! token), publishing to `devices/{id}/events` at QoS 0 or 1.
//!
//! rumqttc numbers QoS 1 packets itself, so the link learns a message's packet id
//! only when the event loop reports `Outgoing::Publish(pkid)`. The client's request
//! channel is FIFO, so those reports come in the order the messages were handed
//! over: a queue of pending messages, popped on each report, maps packet ids back
//! to event ids. The PUBACK then settles the message.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::{Link, Message};
use crate::tally::{Outcome, Tally};

/// How long `close` waits for outstanding PUBACKs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest MQTT packet either way: a batch of events can be large.
const MAX_PACKET: usize = 1024 * 1024;

/// Why a device could not connect.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("bad MQTT address {0:?}: expected host:port")]
    Address(String),
    #[error("MQTT connect of device {device}: {reason}")]
    Connect { device: String, reason: String },
}

/// Connection settings shared by every device of a run.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub qos: QoS,
    /// QoS 1 messages awaiting PUBACK per connection.
    pub inflight: u16,
    /// Topic, with `{id}` standing for the device id.
    pub topic: String,
}

impl MqttSettings {
    /// # Errors
    ///
    /// An address that is not `host:port`.
    pub fn parse_addr(addr: &str) -> Result<(String, u16), MqttError> {
        let addr = addr.trim_start_matches("mqtt://");
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| MqttError::Address(addr.to_owned()))?;
        let port = port
            .parse()
            .map_err(|_| MqttError::Address(addr.to_owned()))?;
        Ok((host.to_owned(), port))
    }
}

struct Waiting {
    device: usize,
    ids: Vec<Uuid>,
    since: Instant,
}

#[derive(Default)]
struct Pending {
    /// Handed to the client, packet id not known yet.
    queued: VecDeque<Waiting>,
    /// Written, awaiting PUBACK.
    inflight: HashMap<u16, Waiting>,
    /// The connection is gone; nothing more will be settled by the event loop.
    dead: bool,
}

impl Pending {
    fn outstanding(&self) -> usize {
        self.queued.len() + self.inflight.len()
    }
}

/// One device over MQTT.
pub struct MqttLink {
    client: AsyncClient,
    topic: String,
    qos: QoS,
    tally: Arc<Tally>,
    pending: Arc<Mutex<Pending>>,
    settled: Arc<Notify>,
    poller: JoinHandle<()>,
}

fn lock(p: &Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

impl MqttLink {
    /// Connects and waits for the CONNACK.
    ///
    /// # Errors
    ///
    /// A refused login, or no CONNACK within 10 s.
    pub async fn connect(
        settings: &MqttSettings,
        device_id: &str,
        token: &str,
        tally: Arc<Tally>,
    ) -> Result<Self, MqttError> {
        let mut options = MqttOptions::new(device_id, &settings.host, settings.port);
        options
            .set_credentials(device_id, token)
            .set_keep_alive(Duration::from_secs(30))
            .set_inflight(settings.inflight.max(1))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_clean_session(true);
        // A short request channel: publish() waits when it is full, so memory stays
        // bounded however far the broker falls behind.
        let (client, eventloop) = AsyncClient::new(options, 64);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let settled = Arc::new(Notify::new());
        let (connected_tx, connected_rx) = oneshot::channel();
        let poller = tokio::spawn(poll(
            eventloop,
            connected_tx,
            pending.clone(),
            settled.clone(),
            tally.clone(),
        ));
        let failed = |reason: String| MqttError::Connect {
            device: device_id.to_owned(),
            reason,
        };
        match tokio::time::timeout(Duration::from_secs(10), connected_rx).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(reason))) => return Err(failed(reason)),
            Ok(Err(_)) => return Err(failed("the connection closed".into())),
            Err(_) => {
                poller.abort();
                return Err(failed("no CONNACK within 10 s".into()));
            }
        }
        Ok(Self {
            client,
            topic: settings.topic.replace("{id}", device_id),
            qos: settings.qos,
            tally,
            pending,
            settled,
            poller,
        })
    }
}

async fn poll(
    mut eventloop: EventLoop,
    connected: oneshot::Sender<Result<(), String>>,
    pending: Arc<Mutex<Pending>>,
    settled: Arc<Notify>,
    tally: Arc<Tally>,
) {
    let mut connected = Some(connected);
    let reason = loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(Ok(()));
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                let mut p = lock(&pending);
                if let Some(w) = p.queued.pop_front() {
                    p.inflight.insert(pkid, w);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let w = lock(&pending).inflight.remove(&ack.pkid);
                if let Some(w) = w {
                    let n = w.ids.len();
                    let latency = Some(w.since.elapsed());
                    tally.settle(w.device, w.ids, n, Outcome::Acked, None, latency);
                }
                settled.notify_waiters();
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break "disconnected".to_owned(),
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => {
                break format!("connection refused: {code:?}");
            }
            Err(e) => break format!("MQTT {e}"),
        }
    };
    if let Some(tx) = connected.take() {
        let _ = tx.send(Err(reason.clone()));
    }
    // Whatever was not acknowledged is in doubt: it may have reached the server.
    let left: Vec<Waiting> = {
        let mut p = lock(&pending);
        p.dead = true;
        let mut left: Vec<Waiting> = p.queued.drain(..).collect();
        left.extend(p.inflight.drain().map(|(_, w)| w));
        left
    };
    let reason = if reason == "disconnected" {
        "MQTT no PUBACK before disconnect".to_owned()
    } else {
        reason
    };
    for w in left {
        let n = w.ids.len();
        tally.settle(w.device, w.ids, n, Outcome::Failed, Some(&reason), None);
    }
    settled.notify_waiters();
}

impl Link for MqttLink {
    async fn send(&mut self, msg: Message) {
        let n = msg.items.len();
        let ids: Vec<Uuid> = msg.items.iter().map(|p| p.id()).collect();
        self.tally.plan(msg.device, &msg.items, msg.body.len());
        if self.qos != QoS::AtMostOnce {
            let mut p = lock(&self.pending);
            if p.dead {
                drop(p);
                let reason = Some("MQTT connection lost");
                self.tally
                    .settle(msg.device, ids, n, Outcome::Rejected, reason, None);
                return;
            }
            p.queued.push_back(Waiting {
                device: msg.device,
                ids: ids.clone(),
                since: Instant::now(),
            });
        }
        let handed = self
            .client
            .publish_bytes(self.topic.clone(), self.qos, false, msg.body)
            .await;
        match (handed, self.qos) {
            (Ok(()), QoS::AtMostOnce) => {
                self.tally
                    .settle(msg.device, ids, n, Outcome::Unconfirmed, None, None);
            }
            (Err(_), QoS::AtMostOnce) => {
                let reason = Some("MQTT connection lost");
                self.tally
                    .settle(msg.device, ids, n, Outcome::Rejected, reason, None);
            }
            // At QoS 1 the event loop settles it, or settled it as failed when the
            // connection died (it was queued before the death, under the lock).
            _ => {}
        }
    }

    async fn close(self) {
        if self.qos != QoS::AtMostOnce {
            let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
            loop {
                let notified = self.settled.notified();
                {
                    let p = lock(&self.pending);
                    if p.dead || p.outstanding() == 0 {
                        break;
                    }
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
        }
        // DISCONNECT goes through the same FIFO as the publishes, so at QoS 0 every
        // message is written before it.
        let _ = self.client.disconnect().await;
        let mut poller = self.poller;
        if tokio::time::timeout(Duration::from_secs(5), &mut poller)
            .await
            .is_err()
        {
            poller.abort();
        }
    }
}

/// Can `device_id`/`token` log in at `addr`? Used to decide whether MQTT can be
/// exercised at all (the endpoint may be off).
///
/// # Errors
///
/// The reason it cannot.
pub async fn probe(addr: &str, device_id: &str, token: &str) -> Result<(), MqttError> {
    let (host, port) = MqttSettings::parse_addr(addr)?;
    let settings = MqttSettings {
        host,
        port,
        qos: QoS::AtLeastOnce,
        inflight: 1,
        topic: "devices/{id}/events".into(),
    };
    let link =
        MqttLink::connect(&settings, device_id, token, Arc::new(Tally::new(1, false))).await?;
    link.close().await;
    Ok(())
}
