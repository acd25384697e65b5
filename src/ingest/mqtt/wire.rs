//! The two MQTT versions a device may speak, behind one interface.
//!
//! A connection's first bytes say which version its CONNECT is (the protocol level).
//! [`Wire::accept`] reads that far, waiting for each byte (no polling), and picks
//! rumqttc's v4 codec (MQTT 3.1.1) or its v5 codec (MQTT 5), which starts with those
//! bytes already in its read buffer. The connection logic then sees only
//! [`Inbound`] packets and sends [`Outbound`] ones; this module maps them to and from
//! each version's packets.
//! No codec is written here.

use bytes::Bytes;
use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes as m5;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};

use crate::telemetry::Reason;

/// Bytes enough to see a CONNECT's protocol level: the fixed header (at most 5),
/// the protocol name's length (2) and name ("MQTT", 4), then the level.
const SNIFF_BYTES: usize = 5 + 2 + 6 + 1;
/// Largest CONNECT accepted: before login a connection holds no more memory than
/// this. A CONNECT is a client id, a user name and a password (and a will, which
/// devices here have no use for).
pub(crate) const MAX_CONNECT_BYTES: usize = 4 * 1024;

/// A device connection, framed for the version its CONNECT asked for.
pub(crate) enum Wire {
    V4(Framed<TcpStream, v4::Codec>),
    V5(Framed<TcpStream, m5::v5::Codec>),
}

/// What a device sent, whatever its version.
#[derive(Debug)]
pub(crate) enum Inbound {
    Connect(Connect),
    Publish {
        topic: Bytes,
        qos: QoS,
        pkid: u16,
        payload: Bytes,
    },
    PingReq,
    Subscribe {
        pkid: u16,
        filters: usize,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    Disconnect,
    /// A packet a device has no business sending; named for the log.
    Unexpected(&'static str),
}

/// A CONNECT.
#[derive(Debug)]
pub(crate) struct Connect {
    pub client_id: String,
    pub keep_alive: u16,
    pub clean_session: bool,
    pub login: Option<(String, String)>,
}

/// Why a CONNECT is refused; each version has its own code for it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refusal {
    BadLogin,
    NotAuthorized,
    Unavailable,
    BadClientId,
    /// Too many connections of this device.
    TooMany,
}

/// What iotpipe sends.
pub(crate) enum Outbound {
    /// CONNECT accepted. MQTT 5 devices also hear the in-flight window (Receive
    /// Maximum), the largest packet, QoS 1 as the highest, and `client_id` if the
    /// server assigned it.
    Accepted {
        receive_max: u16,
        max_packet_bytes: u32,
        client_id: Option<String>,
        /// The keep-alive granted, when it is not the one the device asked for.
        keep_alive: Option<u16>,
    },
    Refused(Refusal),
    /// `refused`: the message was acknowledged but not stored (a bad payload); MQTT 5
    /// says so with reason 0x99, payload format invalid.
    PubAck {
        pkid: u16,
        refused: bool,
    },
    PingResp,
    /// Every filter of a SUBSCRIBE refused.
    SubscribeRefused {
        pkid: u16,
        filters: usize,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
}

/// A packet that could not be read or written.
#[derive(Debug)]
pub(crate) struct WireError {
    pub reason: Reason,
    pub message: String,
}

impl Wire {
    /// Reads the start of the first packet to learn the version; the codec then
    /// reads on from those bytes, with packets limited to [`MAX_CONNECT_BYTES`] until
    /// [`Wire::logged_in`]. `None` if the connection closed first.
    pub(crate) async fn accept(
        mut stream: TcpStream,
        max_outgoing: usize,
        read_buffer: usize,
    ) -> std::io::Result<Option<Wire>> {
        let mut head = BytesMut::with_capacity(read_buffer.max(SNIFF_BYTES));
        let is_v5 = loop {
            if stream.read_buf(&mut head).await? == 0 {
                return Ok(None);
            }
            match is_v5(&head) {
                Some(v5) => break v5,
                // The v4 codec refuses what is not a CONNECT.
                None if head.len() >= SNIFF_BYTES => break false,
                None => {}
            }
        };
        Ok(Some(if is_v5 {
            let codec = m5::v5::Codec {
                max_incoming_size: Some(MAX_CONNECT_BYTES as u32),
                max_outgoing_size: None,
            };
            let mut parts = FramedParts::new::<m5::v5::Packet>(stream, codec);
            parts.read_buf = head;
            Wire::V5(Framed::from_parts(parts))
        } else {
            let codec = v4::Codec {
                max_incoming_size: MAX_CONNECT_BYTES,
                max_outgoing_size: max_outgoing,
            };
            let mut parts = FramedParts::new::<v4::Packet>(stream, codec);
            parts.read_buf = head;
            Wire::V4(Framed::from_parts(parts))
        }))
    }

    /// Lifts the packet limit to `max_incoming` once the device is logged in.
    pub(crate) fn logged_in(&mut self, max_incoming: usize) {
        match self {
            Wire::V4(f) => f.codec_mut().max_incoming_size = max_incoming,
            Wire::V5(f) => {
                f.codec_mut().max_incoming_size =
                    Some(u32::try_from(max_incoming).unwrap_or(u32::MAX))
            }
        }
    }

    /// True for an MQTT 5 connection.
    pub(crate) fn is_v5(&self) -> bool {
        matches!(self, Wire::V5(_))
    }

    /// The next packet; `None` once the device closed the connection.
    pub(crate) async fn next(&mut self) -> Option<Result<Inbound, WireError>> {
        match self {
            Wire::V4(f) => Some(match f.next().await? {
                Ok(p) => Ok(from_v4(p)),
                Err(e) => Err(v4_error(&e)),
            }),
            Wire::V5(f) => Some(match f.next().await? {
                Ok(p) => Ok(from_v5(p)),
                Err(e) => Err(v5_error(&e)),
            }),
        }
    }

    /// Queues a packet for the next [`Wire::flush`].
    pub(crate) async fn feed(&mut self, packet: Outbound) -> Result<(), WireError> {
        match self {
            Wire::V4(f) => f.feed(to_v4(packet)).await.map_err(|e| v4_error(&e)),
            Wire::V5(f) => f.feed(to_v5(packet)).await.map_err(|e| v5_error(&e)),
        }
    }

    pub(crate) async fn flush(&mut self) -> Result<(), WireError> {
        match self {
            Wire::V4(f) => SinkExt::<v4::Packet>::flush(f)
                .await
                .map_err(|e| v4_error(&e)),
            Wire::V5(f) => SinkExt::<m5::v5::Packet>::flush(f)
                .await
                .map_err(|e| v5_error(&e)),
        }
    }

    pub(crate) async fn send(&mut self, packet: Outbound) -> Result<(), WireError> {
        self.feed(packet).await?;
        self.flush().await
    }
}

/// Whether the start of a connection is an MQTT 5 CONNECT, or `None` if
/// more bytes are needed to tell. Anything that is not a well-formed CONNECT header
/// goes to the v4 codec, which refuses it as it always has.
fn is_v5(b: &[u8]) -> Option<bool> {
    let first = *b.first()?;
    if first >> 4 != 1 {
        return Some(false);
    }
    // Remaining length: 1 to 4 bytes, high bit set on all but the last.
    let mut i = 1;
    loop {
        let byte = *b.get(i)?;
        i += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Some(false);
        }
    }
    let name_len = usize::from(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
    if name_len > 6 {
        return Some(false);
    }
    debug_assert!(i + 2 + name_len < SNIFF_BYTES);
    Some(*b.get(i + 2 + name_len)? == 5)
}

fn from_v4(p: v4::Packet) -> Inbound {
    match p {
        v4::Packet::Connect(c) => Inbound::Connect(Connect {
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean_session: c.clean_session,
            login: c.login.map(|l| (l.username, l.password)),
        }),
        v4::Packet::Publish(p) => Inbound::Publish {
            topic: Bytes::from(p.topic.into_bytes()),
            qos: p.qos,
            pkid: p.pkid,
            payload: p.payload,
        },
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.len(),
        },
        v4::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics.len(),
        },
        v4::Packet::Disconnect => Inbound::Disconnect,
        v4::Packet::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        v4::Packet::PubAck(_) => Inbound::Unexpected("PUBACK"),
        v4::Packet::PubRec(_) => Inbound::Unexpected("PUBREC"),
        v4::Packet::PubRel(_) => Inbound::Unexpected("PUBREL"),
        v4::Packet::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        v4::Packet::SubAck(_) => Inbound::Unexpected("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        v4::Packet::PingResp => Inbound::Unexpected("PINGRESP"),
    }
}

fn from_v5(p: m5::v5::Packet) -> Inbound {
    use m5::v5::Packet as P;
    match p {
        P::Connect(c, _will, login) => Inbound::Connect(Connect {
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean_session: c.clean_start,
            login: login.map(|l| (l.username, l.password)),
        }),
        P::Publish(p) => Inbound::Publish {
            topic: p.topic,
            qos: match p.qos {
                m5::QoS::AtMostOnce => QoS::AtMostOnce,
                m5::QoS::AtLeastOnce => QoS::AtLeastOnce,
                m5::QoS::ExactlyOnce => QoS::ExactlyOnce,
            },
            pkid: p.pkid,
            payload: p.payload,
        },
        P::PingReq(_) => Inbound::PingReq,
        P::Subscribe(s) => Inbound::Subscribe {
            pkid: s.pkid,
            filters: s.filters.len(),
        },
        P::Unsubscribe(u) => Inbound::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters.len(),
        },
        P::Disconnect(_) => Inbound::Disconnect,
        P::Auth(_) => Inbound::Unexpected("AUTH"),
        P::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        P::PubAck(_) => Inbound::Unexpected("PUBACK"),
        P::PubRec(_) => Inbound::Unexpected("PUBREC"),
        P::PubRel(_) => Inbound::Unexpected("PUBREL"),
        P::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        P::SubAck(_) => Inbound::Unexpected("SUBACK"),
        P::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        P::PingResp(_) => Inbound::Unexpected("PINGRESP"),
    }
}

fn to_v4(p: Outbound) -> v4::Packet {
    use v4::ConnectReturnCode as C;
    match p {
        Outbound::Accepted { .. } => v4::Packet::ConnAck(v4::ConnAck::new(C::Success, false)),
        Outbound::Refused(r) => v4::Packet::ConnAck(v4::ConnAck::new(
            match r {
                Refusal::BadLogin => C::BadUserNamePassword,
                Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::Unavailable | Refusal::TooMany => C::ServiceUnavailable,
                Refusal::BadClientId => C::BadClientId,
            },
            false,
        )),
        Outbound::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Outbound::PingResp => v4::Packet::PingResp,
        Outbound::SubscribeRefused { pkid, filters } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            vec![v4::SubscribeReasonCode::Failure; filters],
        )),
        Outbound::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
    }
}

fn to_v5(p: Outbound) -> m5::v5::Packet {
    use m5::v5::{ConnAck, ConnAckProperties, ConnectReturnCode as C, Packet as P};
    let connack = |code, properties| {
        P::ConnAck(ConnAck {
            session_present: false,
            code,
            properties,
        })
    };
    match p {
        Outbound::Accepted {
            receive_max,
            max_packet_bytes,
            client_id,
            keep_alive,
        } => connack(
            C::Success,
            Some(ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(receive_max),
                max_qos: Some(1),
                retain_available: None,
                max_packet_size: Some(max_packet_bytes),
                assigned_client_identifier: client_id,
                // Zero (absent): devices must not use topic aliases.
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        ),
        Outbound::Refused(r) => connack(
            match r {
                Refusal::BadLogin => C::BadUserNamePassword,
                Refusal::NotAuthorized => C::NotAuthorized,
                Refusal::Unavailable => C::ServerUnavailable,
                Refusal::BadClientId => C::ClientIdentifierNotValid,
                Refusal::TooMany => C::QuotaExceeded,
            },
            None,
        ),
        Outbound::PubAck { pkid, refused } => P::PubAck(m5::v5::PubAck {
            pkid,
            reason: if refused {
                m5::v5::PubAckReason::PayloadFormatInvalid
            } else {
                m5::v5::PubAckReason::Success
            },
            properties: None,
        }),
        Outbound::PingResp => P::PingResp(m5::v5::PingResp),
        Outbound::SubscribeRefused { pkid, filters } => P::SubAck(m5::v5::SubAck {
            pkid,
            return_codes: vec![m5::v5::SubscribeReasonCode::NotAuthorized; filters],
            properties: None,
        }),
        Outbound::UnsubAck { pkid, filters } => P::UnsubAck(m5::v5::UnsubAck {
            pkid,
            reasons: vec![m5::v5::UnsubAckReason::NoSubscriptionExisted; filters],
            properties: None,
        }),
    }
}

fn v4_error(e: &rumqttc::mqttbytes::Error) -> WireError {
    let reason = match e {
        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_) => Reason::TooLarge,
        _ => Reason::Invalid,
    };
    WireError {
        reason,
        message: e.to_string(),
    }
}

fn v5_error(e: &m5::Error) -> WireError {
    let reason = match e {
        m5::Error::PayloadSizeLimitExceeded { .. } => Reason::TooLarge,
        _ => Reason::Invalid,
    };
    WireError {
        reason,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8) -> Vec<u8> {
        let mut b = vec![0x10, 20, 0, 4];
        b.extend_from_slice(b"MQTT");
        b.push(level);
        b
    }

    #[test]
    fn the_protocol_level_picks_the_codec() {
        assert_eq!(is_v5(&connect_bytes(5)), Some(true));
        assert_eq!(is_v5(&connect_bytes(4)), Some(false));
        // Not yet enough bytes to tell.
        assert_eq!(is_v5(&connect_bytes(5)[..6]), None);
        assert_eq!(is_v5(&[]), None);
        // Not a CONNECT, or a malformed header: the v4 codec refuses it.
        assert_eq!(is_v5(&[0x30, 2, 0, 0]), Some(false));
        assert_eq!(is_v5(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]), Some(false));
        assert_eq!(is_v5(&[0x10, 20, 0, 200]), Some(false));
    }
}
