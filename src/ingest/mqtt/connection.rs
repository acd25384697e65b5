//! One device connection on the built-in endpoint: CONNECT, then a loop that reads
//! packets while the in-flight window has room and writes PUBACKs in order as their
//! messages become durable.
//!
//! Design: one task per connection, with no channel between a reader and a writer.
//! The window is a [`FuturesOrdered`]: each QoS 1 message is a future that waits for
//! the rate limiter, for room in the pipeline and for durability, and they all make
//! progress at once while the results come out in arrival order. One task keeps an
//! idle connection small, and the window bound is simply its length.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rumqttc::mqttbytes::QoS;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep_until, timeout, Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::sessions::Claim;
use super::wire::{Inbound, Outbound, Refusal, Wire};
use super::{topic, MqttContext, Outcome, Pending, Rejection};
use crate::model::{DeviceId, UserId};
use crate::telemetry::{Reason, Source};

/// Room for the topic, packet id and length prefixes on top of the largest payload.
const PACKET_OVERHEAD: usize = 1024;
/// A write the device does not take within this long closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// After the connection stops reading, acknowledgements still due are sent for at
/// most this long.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Initial read buffer; it grows for larger packets. Small, so that idle
/// connections stay cheap.
const READ_BUFFER: usize = 1024;
/// Longest wait before a throttled login is refused.
const LOGIN_PENALTY: Duration = Duration::from_secs(2);
/// Longest client id accepted: it is kept for as long as the connection is open.
/// MQTT requires servers to take at least 23 characters.
const MAX_CLIENT_ID_BYTES: usize = 256;

/// Serves one accepted connection until it closes. `_slot` is its place in the
/// connection limit.
pub(crate) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: MqttContext,
    _slot: OwnedSemaphorePermit,
) {
    let accepted = Wire::accept(stream, PACKET_OVERHEAD, READ_BUFFER);
    let mut wire = match timeout(ctx.limits.connect_timeout, accepted).await {
        Ok(Ok(Some(wire))) => wire,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "MQTT connection failed before CONNECT");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no MQTT CONNECT in time; closing");
            return;
        }
    };
    let Some(Login {
        user,
        device,
        keep_alive,
        client_id,
    }) = login(&mut wire, &ctx, peer).await
    else {
        return;
    };
    ctx.intake.telemetry.mqtt_connected();
    let claim = ctx.sessions.claim(device, &client_id);
    let session = Session {
        claim,
        cancel: ctx.shutdown.child_token(),
        ctx,
        user,
        device,
        keep_alive,
        pending: FuturesOrdered::new(),
        reading: true,
        drain_deadline: None,
    };
    session.serve(wire).await;
}

/// The largest packet a device may send: the largest payload, plus room for the topic
/// and headers.
fn max_packet(ctx: &MqttContext) -> usize {
    ctx.limits.max_payload_bytes + PACKET_OVERHEAD
}

/// An accepted CONNECT.
struct Login {
    user: UserId,
    device: DeviceId,
    keep_alive: Option<Duration>,
    client_id: String,
}

/// Reads CONNECT and answers it.
async fn login(wire: &mut Wire, ctx: &MqttContext, peer: SocketAddr) -> Option<Login> {
    let connect = match timeout(ctx.limits.connect_timeout, wire.next()).await {
        Ok(Some(Ok(Inbound::Connect(c)))) => c,
        Ok(Some(Ok(Inbound::Publish { .. }))) => {
            tracing::debug!(%peer, "MQTT PUBLISH before CONNECT; closing");
            ctx.intake
                .telemetry
                .rejected(Source::Mqtt, Reason::Unauthorized, 1);
            return None;
        }
        Ok(Some(Ok(other))) => {
            tracing::debug!(%peer, packet = ?other, "MQTT packet before CONNECT; closing");
            ctx.intake
                .telemetry
                .rejected(Source::Mqtt, Reason::Invalid, 1);
            return None;
        }
        Ok(Some(Err(e))) => {
            tracing::debug!(%peer, error = %e.message, "malformed MQTT packet before CONNECT; closing");
            ctx.intake.telemetry.rejected(Source::Mqtt, e.reason, 1);
            return None;
        }
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(%peer, "no MQTT CONNECT in time; closing");
            return None;
        }
    };
    let mut client_id = connect.client_id;
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return refuse(wire, Refusal::BadClientId).await;
    }
    // MQTT 5 lets the server name a client that sent no id; MQTT 3.1.1 allows no id
    // only for a clean session.
    let mut assigned = None;
    if client_id.is_empty() {
        if wire.is_v5() {
            client_id = format!("iotpipe-{}", Uuid::new_v4().simple());
            assigned = Some(client_id.clone());
        } else if !connect.clean_session {
            return refuse(wire, Refusal::BadClientId).await;
        }
    }
    let Some((username, password)) = connect.login else {
        ctx.intake
            .telemetry
            .rejected(Source::Mqtt, Reason::Unauthorized, 1);
        return refuse(wire, Refusal::NotAuthorized).await;
    };
    let Ok(device) = Uuid::parse_str(&username) else {
        ctx.intake
            .telemetry
            .rejected(Source::Mqtt, Reason::Unauthorized, 1);
        return refuse(wire, Refusal::BadLogin).await;
    };
    let identity = device.to_string();
    if let Some(wait) = ctx.intake.auth.login_wait(peer.ip(), Some(&identity)) {
        // Too many failures: answer slowly, and without looking at the password.
        tokio::time::sleep(wait.min(LOGIN_PENALTY)).await;
        ctx.intake.telemetry.login_throttled(Source::Mqtt);
        return refuse(wire, Refusal::NotAuthorized).await;
    }
    let user = match ctx.intake.auth.authenticate_device(device, &password).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            ctx.intake
                .auth
                .login_failed(peer.ip(), Some(&identity), "mqtt");
            ctx.intake.telemetry.login_failed(Source::Mqtt);
            ctx.intake
                .telemetry
                .rejected(Source::Mqtt, Reason::Unauthorized, 1);
            return refuse(wire, Refusal::BadLogin).await;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "cannot check MQTT credentials");
            return refuse(wire, Refusal::Unavailable).await;
        }
    };
    if ctx.sessions.connections_of(device) >= ctx.limits.max_per_device {
        tracing::warn!(%peer, %device, "MQTT device over its connection limit; refused");
        ctx.intake
            .telemetry
            .rejected(Source::Mqtt, Reason::RateLimited, 1);
        return refuse(wire, Refusal::TooMany).await;
    }
    // Every connection has a keep-alive, at most the server's: a device asking for
    // none (0) would otherwise hold its slot forever once it goes silent.
    let max_keep_alive = ctx.limits.max_keep_alive_secs;
    let granted = match connect.keep_alive {
        0 => max_keep_alive,
        asked => asked.min(max_keep_alive),
    };
    // No session state is kept: a device only publishes, and a QoS 1 publisher keeps
    // its unacknowledged messages itself.
    let accepted = Outbound::Accepted {
        receive_max: u16::try_from(ctx.limits.max_inflight).unwrap_or(u16::MAX),
        max_packet_bytes: u32::try_from(max_packet(ctx)).unwrap_or(u32::MAX),
        client_id: assigned,
        keep_alive: (granted != connect.keep_alive).then_some(granted),
    };
    match timeout(WRITE_TIMEOUT, wire.send(accepted)).await {
        Ok(Ok(())) => {}
        _ => return None,
    }
    wire.logged_in(max_packet(ctx));
    // MQTT 3.1.1 §3.1.2.10 (and 5 §3.1.2.10): close after one and a half keepalive
    // periods of silence.
    let keep_alive = Some(Duration::from_millis(u64::from(granted) * 1500));
    tracing::debug!(%peer, %device, v5 = wire.is_v5(), "MQTT device connected");
    Some(Login {
        user,
        device,
        keep_alive,
        client_id,
    })
}

/// Tells the device why it is refused; the connection then closes.
async fn refuse<T>(wire: &mut Wire, why: Refusal) -> Option<T> {
    let _ = timeout(WRITE_TIMEOUT, wire.send(Outbound::Refused(why))).await;
    None
}

/// A logged-in connection.
struct Session {
    ctx: MqttContext,
    /// Its place among the open connections; a newer login of the same device and
    /// client id, or the device's deletion, cancels `claim.close`.
    claim: Claim,
    user: UserId,
    device: DeviceId,
    keep_alive: Option<Duration>,
    /// Messages read and not yet acknowledged, in arrival order.
    pending: FuturesOrdered<Pending>,
    reading: bool,
    /// Cancelled when this connection stops reading: messages not yet submitted are
    /// given up (and will be resent), those submitted still complete.
    cancel: CancellationToken,
    drain_deadline: Option<Instant>,
}

/// What to do after a packet.
enum Next {
    Continue,
    /// Stop reading; acknowledge what is due, then close.
    Close,
}

impl Session {
    async fn serve(mut self, mut wire: Wire) {
        let window = self.ctx.limits.max_inflight;
        let mut last_heard = Instant::now();
        loop {
            if !self.reading && self.pending.is_empty() {
                break;
            }
            let can_read = self.reading && self.pending.len() < window;
            let idle_deadline = self.keep_alive.map(|ka| last_heard + ka);
            tokio::select! {
                biased;
                Some(first) = self.pending.next(), if !self.pending.is_empty() => {
                    let was_full = self.pending.len() + 1 >= window;
                    if !self.acknowledge(&mut wire, first).await {
                        break;
                    }
                    if was_full {
                        // The device was not read while the window was full; its
                        // silence then is ours, not a dead connection.
                        last_heard = Instant::now();
                    }
                }
                _ = self.ctx.shutdown.cancelled(), if self.reading => {
                    self.stop_reading();
                }
                _ = self.claim.close.cancelled(), if self.reading => {
                    // Taken over, or the device was deleted: stop reading, send the
                    // acks already due, close.
                    self.stop_reading();
                }
                _ = sleep_until(self.drain_deadline.unwrap_or_else(Instant::now)),
                    if self.drain_deadline.is_some() =>
                {
                    tracing::debug!(device = %self.device, "MQTT acks not durable in time; closing");
                    break;
                }
                _ = sleep_until(idle_deadline.unwrap_or_else(Instant::now)),
                    if can_read && idle_deadline.is_some() =>
                {
                    tracing::debug!(device = %self.device, "MQTT keepalive expired; closing");
                    self.stop_reading();
                }
                packet = wire.next(), if can_read => {
                    last_heard = Instant::now();
                    let next = match packet {
                        None => Next::Close,
                        Some(Ok(packet)) => self.handle(&mut wire, packet).await,
                        Some(Err(e)) => {
                            let r = Rejection::new(
                                e.reason,
                                1,
                                format!("malformed MQTT packet: {}", e.message),
                            );
                            self.ctx.reject(Some((self.user, self.device)), &r).await;
                            Next::Close
                        }
                    };
                    if let Next::Close = next {
                        self.stop_reading();
                    }
                }
            }
        }
        self.cancel.cancel();
        tracing::debug!(device = %self.device, "MQTT device disconnected");
        self.ctx.intake.telemetry.mqtt_disconnected();
    }

    fn stop_reading(&mut self) {
        self.reading = false;
        self.cancel.cancel();
        self.drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
    }

    /// Sends the PUBACK of `first` and of every later message already complete, in
    /// one write. False if the connection must close now.
    async fn acknowledge(&mut self, wire: &mut Wire, first: Outcome) -> bool {
        let mut acked = Vec::new();
        let mut outcome = Some(first);
        let mut keep_open = true;
        while let Some(o) = outcome.take() {
            match o {
                Outcome::Ack {
                    pkid,
                    received,
                    refused,
                } => {
                    let puback = Outbound::PubAck { pkid, refused };
                    if !matches!(timeout(WRITE_TIMEOUT, wire.feed(puback)).await, Ok(Ok(()))) {
                        return false;
                    }
                    acked.push(received);
                }
                Outcome::Done => {}
                Outcome::Retry(why) => {
                    // Later messages must not be acknowledged before this one, so the
                    // connection closes; the device resends from here.
                    tracing::debug!(device = %self.device, why, "closing without PUBACK");
                    keep_open = false;
                    break;
                }
            }
            outcome = self.pending.next().now_or_never().flatten();
        }
        if !acked.is_empty() {
            match timeout(WRITE_TIMEOUT, wire.flush()).await {
                Ok(Ok(())) => {
                    for received in acked {
                        self.ctx
                            .intake
                            .telemetry
                            .mqtt_acked(received.elapsed().as_secs_f64());
                    }
                }
                _ => return false,
            }
        }
        keep_open
    }

    async fn handle(&mut self, wire: &mut Wire, packet: Inbound) -> Next {
        match packet {
            Inbound::Publish {
                topic,
                qos,
                pkid,
                payload,
            } => self.publish(topic, qos, pkid, payload).await,
            Inbound::PingReq => reply(wire, Outbound::PingResp).await,
            // Devices only publish in v1: every filter is refused.
            Inbound::Subscribe { pkid, filters } => {
                reply(wire, Outbound::SubscribeRefused { pkid, filters }).await
            }
            Inbound::Unsubscribe { pkid, filters } => {
                reply(wire, Outbound::UnsubAck { pkid, filters }).await
            }
            Inbound::Disconnect => Next::Close,
            Inbound::Connect(_) => self.unexpected("a second CONNECT").await,
            Inbound::Unexpected(name) => self.unexpected(name).await,
        }
    }

    /// A packet a device must not send: counted, and the connection closes.
    async fn unexpected(&mut self, name: &str) -> Next {
        let r = Rejection::new(
            Reason::Invalid,
            1,
            format!("unexpected MQTT packet from a device: {name}"),
        );
        self.ctx.reject(Some((self.user, self.device)), &r).await;
        Next::Close
    }

    async fn publish(&mut self, topic: Bytes, qos: QoS, pkid: u16, payload: Bytes) -> Next {
        let received = Instant::now();
        let owner = Some((self.user, self.device));
        self.ctx.intake.telemetry.mqtt_received(1);
        if qos == QoS::ExactlyOnce {
            let r = Rejection::new(Reason::Invalid, 1, "QoS 2 is not supported; use QoS 0 or 1");
            self.ctx.reject(owner, &r).await;
            return Next::Close;
        }
        let topic = String::from_utf8_lossy(&topic);
        if topic::device_of(&topic) != Some(self.device) {
            let r = Rejection::new(
                Reason::Unauthorized,
                1,
                format!(
                    "unauthorized: publish to {topic:?} refused; a device publishes only to {}",
                    topic::of_device(self.device)
                ),
            );
            self.ctx.reject(owner, &r).await;
            return Next::Close;
        }
        let records = match self.ctx.decode(&payload, self.user, self.device).await {
            Ok(records) => records,
            Err(r) => {
                self.ctx.reject(owner, &r).await;
                if qos == QoS::AtLeastOnce {
                    // A poison message is acknowledged, or the device resends it forever.
                    let ack = Outcome::Ack {
                        pkid,
                        received,
                        refused: true,
                    };
                    self.pending.push_back(Box::pin(std::future::ready(ack)));
                }
                return Next::Continue;
            }
        };
        if qos == QoS::AtLeastOnce {
            let delivery =
                self.ctx
                    .clone()
                    .deliver_qos1(records, pkid, received, self.cancel.clone());
            self.pending.push_back(Box::pin(delivery));
        } else if let Some(counting) = self.ctx.deliver_qos0(records).await {
            self.pending.push_back(counting);
        }
        Next::Continue
    }
}

async fn reply(wire: &mut Wire, packet: Outbound) -> Next {
    match timeout(WRITE_TIMEOUT, wire.send(packet)).await {
        Ok(Ok(())) => Next::Continue,
        _ => Next::Close,
    }
}
