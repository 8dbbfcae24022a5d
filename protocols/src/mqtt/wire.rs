//! MQTT 3.1.1 and 5 on the wire for the embedded gateway: packets are decoded with
//! rumqttc's maintained `mqttbytes` codecs (v4 and v5), and the few packets a server
//! sends are written here, so that the session code never depends on the version.

use bytes::{BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::{self, v4};
use rumqttc::v5::mqttbytes::v5;

/// The protocol a connection speaks, from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A CONNECT, whatever its version.
#[derive(Debug)]
pub(crate) struct Hello {
    pub version: Version,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub login: Option<(String, String)>,
    pub will: Option<(String, Bytes)>,
    /// MQTT 5: how long the session outlives the connection (0: it ends with it).
    /// MQTT 3.1.1: `u32::MAX` for a persistent session (`clean_session = false`).
    pub session_expiry: u32,
}

/// Why a CONNECT was not read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BadHello {
    /// A protocol level other than 4 and 5 (e.g. MQTT 3.1's "MQIsdp"/3): answered with
    /// return code 0x01, as MQTT 3.1.1 prescribes, then closed.
    Unsupported(u8),
    /// The reserved bit of the connect flags is set: closed without an answer (MQTT
    /// 3.1.1 §3.1.2.3, MQTT 5 §3.1.2.3).
    ReservedFlag,
    /// Not a CONNECT, or not a well-formed one: closed.
    Malformed(String),
}

/// Reads the first packet of a connection.
pub(crate) fn read_connect(frame: &[u8], max: usize) -> Result<Hello, BadHello> {
    let header = mqttbytes::check(frame.iter(), max).map_err(|e| BadHello::Malformed(format!("{e:?}")))?;
    if !matches!(header.packet_type(), Ok(mqttbytes::PacketType::Connect)) {
        return Err(BadHello::Malformed("the first packet is not a CONNECT".into()));
    }
    // Variable header: protocol name (2-byte length + bytes), level, flags.
    // Fixed header: one byte, then the remaining length in 1 to 4 bytes of 7 bits.
    let len_bytes = frame.iter().skip(1).take(4).position(|b| b & 0x80 == 0).unwrap_or(3) + 1;
    let body = &frame[(1 + len_bytes).min(frame.len())..];
    let name_len = body.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let Some(name_len) = name_len else { return Err(BadHello::Malformed("CONNECT too short".into())) };
    let (Some(name), Some(&level), Some(&flags)) =
        (body.get(2..2 + name_len), body.get(2 + name_len), body.get(3 + name_len))
    else {
        return Err(BadHello::Malformed("CONNECT too short".into()));
    };
    if name == b"MQIsdp" || (name == b"MQTT" && level != 4 && level != 5) {
        return Err(BadHello::Unsupported(level));
    }
    if name != b"MQTT" {
        return Err(BadHello::Malformed(format!("protocol name {:?}", String::from_utf8_lossy(name))));
    }
    if flags & 1 != 0 {
        return Err(BadHello::ReservedFlag);
    }
    let mut buf = BytesMut::from(frame);
    if level == 4 {
        match v4::Packet::read(&mut buf, max) {
            Ok(v4::Packet::Connect(c)) => Ok(Hello {
                version: Version::V4,
                session_expiry: if c.clean_session { 0 } else { u32::MAX },
                client_id: c.client_id,
                clean: c.clean_session,
                keep_alive: c.keep_alive,
                login: c.login.map(|l| (l.username, l.password)),
                will: c.last_will.map(|w| (w.topic, w.message)),
            }),
            Ok(_) => Err(BadHello::Malformed("not a CONNECT".into())),
            Err(e) => Err(BadHello::Malformed(format!("{e:?}"))),
        }
    } else {
        match v5::Packet::read(&mut buf, Some(max as u32)) {
            Ok(v5::Packet::Connect(c, will, login)) => {
                let topic = match will.as_ref().map(|w| String::from_utf8(w.topic.to_vec())) {
                    Some(Err(_)) => return Err(BadHello::Malformed("will topic is not UTF-8".into())),
                    Some(Ok(t)) => Some(t),
                    None => None,
                };
                Ok(Hello {
                    version: Version::V5,
                    session_expiry: c.properties.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0),
                    client_id: c.client_id,
                    clean: c.clean_start,
                    keep_alive: c.keep_alive,
                    login: login.map(|l| (l.username, l.password)),
                    will: topic.zip(will.map(|w| w.message)),
                })
            }
            Ok(_) => Err(BadHello::Malformed("not a CONNECT".into())),
            Err(e) => Err(BadHello::Malformed(format!("{e:?}"))),
        }
    }
}

/// A packet from a connected client.
#[derive(Debug)]
pub(crate) enum Incoming {
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        retain: bool,
        payload: Bytes,
        alias: bool,
    },
    PubAck,
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    PingReq,
    /// `will`: MQTT 5's "disconnect with will message".
    Disconnect {
        will: bool,
    },
    /// A packet a client may not send, or one this gateway does not serve (QoS 2's
    /// PUBREL, AUTH, a second CONNECT).
    Unexpected(&'static str),
}

fn qos(q: mqttbytes::QoS) -> u8 {
    q as u8
}

fn qos5(q: rumqttc::v5::mqttbytes::QoS) -> u8 {
    q as u8
}

/// Decodes one whole frame.
pub(crate) fn read(version: Version, frame: BytesMut, max: usize) -> Result<Incoming, String> {
    let mut frame = frame;
    match version {
        Version::V4 => Ok(match v4::Packet::read(&mut frame, max).map_err(|e| format!("{e:?}"))? {
            v4::Packet::Publish(p) => Incoming::Publish {
                topic: p.topic,
                qos: qos(p.qos),
                pkid: p.pkid,
                retain: p.retain,
                payload: p.payload,
                alias: false,
            },
            v4::Packet::PubAck(_) => Incoming::PubAck,
            v4::Packet::Subscribe(s) => Incoming::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, qos(f.qos))).collect(),
            },
            v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe { pkid: u.pkid, filters: u.topics.len() },
            v4::Packet::PingReq => Incoming::PingReq,
            v4::Packet::Disconnect => Incoming::Disconnect { will: false },
            v4::Packet::Connect(_) => Incoming::Unexpected("a second CONNECT"),
            _ => Incoming::Unexpected("a packet only a server sends, or QoS 2"),
        }),
        Version::V5 => Ok(match v5::Packet::read(&mut frame, Some(max as u32)).map_err(|e| format!("{e:?}"))? {
            v5::Packet::Publish(p) => Incoming::Publish {
                topic: String::from_utf8(p.topic.to_vec()).map_err(|_| "topic is not UTF-8".to_string())?,
                qos: qos5(p.qos),
                pkid: p.pkid,
                retain: p.retain,
                alias: p.properties.as_ref().is_some_and(|p| p.topic_alias.is_some()),
                payload: p.payload,
            },
            v5::Packet::PubAck(_) => Incoming::PubAck,
            v5::Packet::Subscribe(s) => Incoming::Subscribe {
                pkid: s.pkid,
                filters: s.filters.into_iter().map(|f| (f.path, qos5(f.qos))).collect(),
            },
            v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe { pkid: u.pkid, filters: u.filters.len() },
            v5::Packet::PingReq(_) => Incoming::PingReq,
            v5::Packet::Disconnect(d) => {
                Incoming::Disconnect { will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage }
            }
            v5::Packet::Connect(..) => Incoming::Unexpected("a second CONNECT"),
            v5::Packet::Auth(_) => Incoming::Unexpected("AUTH (no enhanced authentication here)"),
            _ => Incoming::Unexpected("a packet only a server sends, or QoS 2"),
        }),
    }
}

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    BadCredentials,
    NotAuthorized,
    BadClientId,
    Unavailable,
}

fn remaining_len(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            return;
        }
    }
}

/// A CONNACK: `Ok(session_present)` accepts. MQTT 5's also says what this server does
/// not do (QoS 2, retained messages, wildcard and shared subscriptions, topic aliases)
/// and how many QoS 1 messages it takes at once (`receive_max`).
pub(crate) fn connack(version: Version, answer: Result<bool, Refusal>, receive_max: u16, out: &mut BytesMut) {
    match version {
        Version::V4 => {
            let code = match answer {
                Ok(_) => 0,
                Err(Refusal::BadClientId) => 2,
                Err(Refusal::Unavailable) => 3,
                Err(Refusal::BadCredentials) => 4,
                Err(Refusal::NotAuthorized) => 5,
            };
            out.put_slice(&[0x20, 0x02, u8::from(answer == Ok(true)), code]);
        }
        Version::V5 => {
            use v5::ConnectReturnCode as C;
            let code = match answer {
                Ok(_) => C::Success,
                Err(Refusal::BadClientId) => C::ClientIdentifierNotValid,
                Err(Refusal::Unavailable) => C::ServerUnavailable,
                Err(Refusal::BadCredentials) => C::BadUserNamePassword,
                Err(Refusal::NotAuthorized) => C::NotAuthorized,
            };
            let properties = answer.is_ok().then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(receive_max),
                max_qos: Some(1),
                retain_available: Some(0),
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            let ack = v5::ConnAck { session_present: answer == Ok(true), code, properties };
            let _ = ack.write(out);
        }
    }
}

/// MQTT 5 PUBACK reason codes.
pub(crate) const PUBACK_NOT_AUTHORIZED: u8 = 0x87;
pub(crate) const PUBACK_PAYLOAD_INVALID: u8 = 0x99;
pub(crate) const PUBACK_UNSPECIFIED: u8 = 0x80;

/// A PUBACK; `reason` (MQTT 5 only; 0 = success) says why a message was refused.
pub(crate) fn puback(version: Version, pkid: u16, reason: u8, out: &mut BytesMut) {
    let [hi, lo] = pkid.to_be_bytes();
    match version {
        Version::V5 if reason != 0 => out.put_slice(&[0x40, 0x03, hi, lo, reason]),
        _ => out.put_slice(&[0x40, 0x02, hi, lo]),
    }
}

/// A SUBACK: `granted` per filter (`None`: refused).
pub(crate) fn suback(version: Version, pkid: u16, granted: &[Option<u8>], out: &mut BytesMut) {
    let v5 = version == Version::V5;
    out.put_u8(0x90);
    remaining_len(out, 2 + usize::from(v5) + granted.len());
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    for g in granted {
        // 0x80: failure (3.1.1) / unspecified error (5); 0x87 not authorized (5).
        out.put_u8(match g {
            Some(q) => *q,
            None if v5 => 0x87,
            None => 0x80,
        });
    }
}

pub(crate) fn unsuback(version: Version, pkid: u16, filters: usize, out: &mut BytesMut) {
    out.put_u8(0xB0);
    match version {
        Version::V4 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            remaining_len(out, 3 + filters);
            out.put_u16(pkid);
            out.put_u8(0);
            // 0x11: no subscription existed; 0x00: success. Either is honest enough
            // for the one filter a device may hold; say success.
            out.put_bytes(0, filters);
        }
    }
}

pub(crate) fn pingresp(out: &mut BytesMut) {
    out.put_slice(&[0xD0, 0x00]);
}

/// A QoS 1 PUBLISH from the platform.
pub(crate) fn publish(version: Version, topic: &str, pkid: u16, payload: &[u8], out: &mut BytesMut) {
    let v5 = version == Version::V5;
    out.put_u8(0x32);
    remaining_len(out, 2 + topic.len() + 2 + usize::from(v5) + payload.len());
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    out.put_u16(pkid);
    if v5 {
        out.put_u8(0);
    }
    out.put_slice(payload);
}

/// MQTT 5 DISCONNECT reason codes the server sends.
pub(crate) const DISCONNECT_NOT_AUTHORIZED: u8 = 0x87;
pub(crate) const DISCONNECT_SERVER_BUSY: u8 = 0x89;
pub(crate) const DISCONNECT_SHUTTING_DOWN: u8 = 0x8B;
pub(crate) const DISCONNECT_KEEP_ALIVE: u8 = 0x8D;
pub(crate) const DISCONNECT_TAKEN_OVER: u8 = 0x8E;
pub(crate) const DISCONNECT_PROTOCOL_ERROR: u8 = 0x82;
pub(crate) const DISCONNECT_MALFORMED: u8 = 0x81;
pub(crate) const DISCONNECT_TOO_LARGE: u8 = 0x95;
pub(crate) const DISCONNECT_QOS_NOT_SUPPORTED: u8 = 0x9B;
pub(crate) const DISCONNECT_RETAIN_NOT_SUPPORTED: u8 = 0x9A;

/// A server's DISCONNECT exists in MQTT 5 only; a 3.1.1 connection is just closed.
pub(crate) fn disconnect(version: Version, reason: u8, out: &mut BytesMut) {
    if version == Version::V5 {
        out.put_slice(&[0xE0, 0x01, reason]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_v4(flags: u8) -> Vec<u8> {
        let mut c = v4::Connect::new("d1");
        c.set_login("d1", "tok");
        let mut out = BytesMut::new();
        c.write(&mut out).unwrap();
        let mut v = out.to_vec();
        // Fixed header (2 bytes here), name (6), level (1), then the flags.
        v[9] |= flags;
        v
    }

    #[test]
    fn connects_of_both_versions_are_read_and_bad_ones_named() {
        let h = read_connect(&connect_v4(0), 1024).unwrap();
        assert_eq!((h.version, h.client_id.as_str(), h.login), (Version::V4, "d1", Some(("d1".into(), "tok".into()))));
        assert_eq!(read_connect(&connect_v4(1), 1024).unwrap_err(), BadHello::ReservedFlag);

        let mut c5 = v5::Connect { keep_alive: 30, client_id: "d2".into(), clean_start: true, properties: None };
        c5.client_id = "d2".into();
        let mut out = BytesMut::new();
        v5::Packet::Connect(c5, None, Some(v5::Login::new("d2", "t2"))).write(&mut out, None).unwrap();
        let h = read_connect(&out, 1024).unwrap();
        assert_eq!((h.version, h.client_id.as_str(), h.session_expiry), (Version::V5, "d2", 0));

        let mut v3 = connect_v4(0);
        v3[8] = 3;
        assert_eq!(read_connect(&v3, 1024).unwrap_err(), BadHello::Unsupported(3));
        assert!(matches!(read_connect(&[0x30, 0x00], 1024), Err(BadHello::Malformed(_))));
        assert!(matches!(read_connect(&[0x10, 0x03, 0, 4, b'M'], 1024), Err(BadHello::Malformed(_))));
    }

    #[test]
    fn packets_written_here_decode_with_the_client_codecs() {
        for version in [Version::V4, Version::V5] {
            let mut out = BytesMut::new();
            publish(version, "devices/d1/commands", 7, b"{}", &mut out);
            puback(version, 9, PUBACK_PAYLOAD_INVALID, &mut out);
            suback(version, 3, &[Some(1), None], &mut out);
            unsuback(version, 4, 1, &mut out);
            pingresp(&mut out);
            connack(version, Ok(true), 32, &mut out);
            match version {
                Version::V4 => {
                    for _ in 0..6 {
                        v4::Packet::read(&mut out, 1 << 20).unwrap();
                    }
                }
                Version::V5 => {
                    for _ in 0..6 {
                        v5::Packet::read(&mut out, None).unwrap();
                    }
                }
            }
            assert!(out.is_empty());
        }
    }
}
