//! MQTT on the wire: what the mqtt sink (and, later, the mqtt source and the
//! load generator) say to a broker, sans-I/O (the caller owns the socket).
//!
//! The packets of a session's life (CONNECT, CONNACK, SUBSCRIBE, SUBACK,
//! DISCONNECT with its reason) are encoded and decoded by `rumqttc`'s
//! `mqttbytes` codec, MQTT 3.1.1 (`v4`) and 5 (`v5`). The two packets sent
//! or received once per message, PUBLISH and PUBACK, are framed here without
//! allocating (the codec's `Publish` owns its topic as a `String`): a
//! PUBLISH is written into the caller's buffer, and an incoming one is read
//! as slices of the caller's buffer. The unit tests check both against the
//! codec.

use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// The protocol level spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// A broker's url resolved: `mqtt://HOST[:PORT]` (port 1883) or
/// `mqtts://HOST[:PORT]` (TLS, port 8883).
pub type Broker = crate::tls::Endpoint;

/// The schemes of a broker's url.
pub const SCHEMES: crate::tls::Schemes = crate::tls::Schemes {
    plain: ("mqtt", 1883),
    tls: ("mqtts", 8883),
    peer: "broker",
};

/// Resolves a broker's url once; the error says what is wrong with it.
pub fn broker(url: &str) -> Result<Broker, String> {
    crate::tls::endpoint(url, &SCHEMES)
}

/// The TLS client settings for a broker (`key` names the `tls` table).
pub fn tls_for(
    key: &str,
    b: &Broker,
    t: Option<&crate::tls::TlsConfig>,
) -> Result<Option<crate::tls::ClientTls>, crate::config::ConfigError> {
    crate::tls::for_endpoint(key, b, t, &SCHEMES)
}

/// The largest packet accepted from a broker.
pub const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024 + 1024;

/// Packet types (the fixed header's high nibble).
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;

/// A malformed packet from the peer.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    #[error("packet of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("{0}")]
    Codec(String),
}

/// Where the next whole packet of `buf` ends: `Ok(None)` until it is all
/// there; `(first byte, header length, total length)`.
pub fn frame(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            let total = i + 1 + len;
            if total > MAX_PACKET_BYTES {
                return Err(WireError::TooLarge(total));
            }
            return Ok((buf.len() >= total).then_some((buf[0], i + 1, total)));
        }
        shift += 7;
    }
    Err(WireError::Malformed("remaining length longer than 4 bytes"))
}

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
}

/// Appends a PUBLISH of `payload` to `topic` to `out`; `pkid` is 0 for QoS
/// 0. Returns the offset of its first byte (where the DUP flag is set when
/// it is sent again).
pub fn put_publish(
    out: &mut Vec<u8>,
    version: Version,
    topic: &[u8],
    qos: u8,
    retain: bool,
    pkid: u16,
    payload: &[u8],
) -> usize {
    let at = out.len();
    let mut rem = 2 + topic.len() + payload.len();
    if qos > 0 {
        rem += 2;
    }
    if version == Version::V5 {
        rem += 1; // no properties
    }
    out.push((PUBLISH << 4) | (qos << 1) | u8::from(retain));
    put_len(out, rem);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == Version::V5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
    at
}

/// Marks the PUBLISH at `at` as sent before (DUP).
pub fn set_dup(buf: &mut [u8], at: usize) {
    buf[at] |= 0x08;
}

/// A PUBACK for `pkid` (success).
pub fn puback(pkid: u16) -> [u8; 4] {
    let p = pkid.to_be_bytes();
    [PUBACK << 4, 2, p[0], p[1]]
}

/// An incoming PUBLISH, borrowed from the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Publish<'a> {
    pub qos: u8,
    pub dup: bool,
    pub retain: bool,
    pub topic: &'a [u8],
    pub pkid: u16,
    pub payload: &'a [u8],
}

fn varint(b: &[u8]) -> Result<(usize, usize), WireError> {
    let mut v = 0usize;
    for (i, &x) in b.iter().take(4).enumerate() {
        v |= ((x & 0x7f) as usize) << (7 * i);
        if x & 0x80 == 0 {
            return Ok((v, i + 1));
        }
    }
    Err(WireError::Malformed("bad variable-length integer"))
}

/// Reads the PUBLISH `packet` (a whole frame: see [`frame`]).
pub fn read_publish(
    version: Version,
    packet: &[u8],
    header: usize,
) -> Result<Publish<'_>, WireError> {
    let first = packet[0];
    let qos = (first >> 1) & 3;
    if qos == 3 {
        return Err(WireError::Malformed("QoS 3"));
    }
    let b = &packet[header..];
    if b.len() < 2 {
        return Err(WireError::Malformed("short PUBLISH"));
    }
    let tlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    let mut at = 2 + tlen;
    if b.len() < at {
        return Err(WireError::Malformed("topic past the packet"));
    }
    let topic = &b[2..at];
    let mut pkid = 0;
    if qos > 0 {
        if b.len() < at + 2 {
            return Err(WireError::Malformed("short PUBLISH"));
        }
        pkid = u16::from_be_bytes([b[at], b[at + 1]]);
        if pkid == 0 {
            return Err(WireError::Malformed("packet id 0"));
        }
        at += 2;
    }
    if version == Version::V5 {
        let (plen, n) = varint(&b[at.min(b.len())..])?;
        at += n + plen;
        if b.len() < at {
            return Err(WireError::Malformed("properties past the packet"));
        }
    }
    Ok(Publish {
        qos,
        dup: first & 0x08 != 0,
        retain: first & 1 != 0,
        topic,
        pkid,
        payload: &b[at..],
    })
}

/// Reads a PUBACK: its packet id and (MQTT 5) its reason code (0: success).
pub fn read_puback(packet: &[u8], header: usize) -> Result<(u16, u8), WireError> {
    let b = &packet[header..];
    if b.len() < 2 {
        return Err(WireError::Malformed("short PUBACK"));
    }
    Ok((
        u16::from_be_bytes([b[0], b[1]]),
        b.get(2).copied().unwrap_or(0),
    ))
}

/// What a session needs to open.
pub struct Hello<'a> {
    pub client_id: &'a str,
    pub keep_alive_s: u16,
    pub clean: bool,
    /// MQTT 5: how long the broker keeps the session after a disconnect.
    pub session_expiry_s: Option<u32>,
    /// MQTT 5: QoS 1 messages the broker may send us unacknowledged.
    pub receive_max: Option<u16>,
    pub login: Option<(&'a str, &'a str)>,
}

/// Encodes a CONNECT.
pub fn connect(version: Version, h: &Hello<'_>) -> Result<BytesMut, WireError> {
    let mut out = BytesMut::new();
    let err = |e: &dyn std::fmt::Debug| WireError::Codec(format!("{e:?}"));
    match version {
        Version::V311 => {
            let mut c = v4::Connect::new(h.client_id);
            c.keep_alive = h.keep_alive_s;
            c.clean_session = h.clean;
            if let Some((u, p)) = h.login {
                c.set_login(u, p);
            }
            c.write(&mut out).map_err(|e| err(&e))?;
        }
        Version::V5 => {
            let mut props = v5::ConnectProperties::new();
            props.session_expiry_interval = h.session_expiry_s;
            props.receive_maximum = h.receive_max;
            // A broker sends us nothing longer (MQTT 5; 3.1.1 cannot say).
            props.max_packet_size = Some(MAX_PACKET_BYTES as u32);
            let c = v5::Connect {
                keep_alive: h.keep_alive_s,
                client_id: h.client_id.to_string(),
                clean_start: h.clean,
                properties: Some(props),
            };
            let login = h.login.map(|(u, p)| v5::Login::new(u, p));
            v5::Packet::Connect(c, None, login)
                .write(&mut out, None)
                .map_err(|e| err(&e))?;
        }
    }
    Ok(out)
}

/// Encodes a SUBSCRIBE of `filters` at `qos`.
pub fn subscribe(
    version: Version,
    pkid: u16,
    filters: &[String],
    qos: u8,
) -> Result<BytesMut, WireError> {
    let mut out = BytesMut::new();
    let err = |e: &dyn std::fmt::Debug| WireError::Codec(format!("{e:?}"));
    match version {
        Version::V311 => {
            let q = if qos == 0 {
                rumqttc::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::mqttbytes::QoS::AtLeastOnce
            };
            let mut s = v4::Subscribe::new_many(
                filters
                    .iter()
                    .map(|f| v4::SubscribeFilter::new(f.clone(), q)),
            );
            s.pkid = pkid;
            s.write(&mut out).map_err(|e| err(&e))?;
        }
        Version::V5 => {
            let q = if qos == 0 {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            };
            let mut s = v5::Subscribe::new_many(
                filters.iter().map(|f| v5::Filter::new(f.clone(), q)),
                None,
            );
            s.pkid = pkid;
            v5::Packet::Subscribe(s)
                .write(&mut out, None)
                .map_err(|e| err(&e))?;
        }
    }
    Ok(out)
}

/// PINGREQ and DISCONNECT (3.1.1 and, with no reason, 5).
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// A control packet from the broker, as the session needs it.
#[derive(Debug)]
pub enum Control {
    /// CONNACK: `None` when accepted, else the broker's reason.
    ConnAck {
        refused: Option<String>,
        session_present: bool,
        /// MQTT 5: the broker's receive maximum.
        receive_max: Option<u16>,
    },
    SubAck {
        pkid: u16,
        /// Filters the broker refused (their index).
        refused: Vec<usize>,
    },
    PingResp,
    /// MQTT 5 DISCONNECT from the broker, with its reason.
    Disconnect(String),
    /// Anything else the session ignores.
    Other(u8),
}

/// Decodes a control packet (a whole frame that is not a PUBLISH/PUBACK).
pub fn control(version: Version, packet: &[u8]) -> Result<Control, WireError> {
    let mut b = BytesMut::from(packet);
    let err = |e: &dyn std::fmt::Debug| WireError::Codec(format!("{e:?}"));
    Ok(match version {
        Version::V311 => match v4::Packet::read(&mut b, MAX_PACKET_BYTES).map_err(|e| err(&e))? {
            v4::Packet::ConnAck(a) => ConnAck {
                refused: (a.code != v4::ConnectReturnCode::Success)
                    .then(|| format!("{:?}", a.code)),
                session_present: a.session_present,
                receive_max: None,
            },
            v4::Packet::SubAck(s) => Control::SubAck {
                pkid: s.pkid,
                refused: s
                    .return_codes
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| matches!(c, v4::SubscribeReasonCode::Failure))
                    .map(|(i, _)| i)
                    .collect(),
            },
            v4::Packet::PingResp => Control::PingResp,
            _ => Control::Other(packet[0] >> 4),
        },
        Version::V5 => {
            match v5::Packet::read(&mut b, Some(MAX_PACKET_BYTES as u32)).map_err(|e| err(&e))? {
                v5::Packet::ConnAck(a) => ConnAck {
                    refused: (a.code != v5::ConnectReturnCode::Success).then(|| {
                        let why = a.properties.as_ref().and_then(|p| p.reason_string.clone());
                        match why {
                            Some(w) => format!("{:?} ({w})", a.code),
                            None => format!("{:?}", a.code),
                        }
                    }),
                    session_present: a.session_present,
                    receive_max: a.properties.as_ref().and_then(|p| p.receive_max),
                },
                v5::Packet::SubAck(s) => Control::SubAck {
                    pkid: s.pkid,
                    refused: s
                        .return_codes
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| !matches!(c, v5::SubscribeReasonCode::Success(_)))
                        .map(|(i, _)| i)
                        .collect(),
                },
                v5::Packet::PingResp(_) => Control::PingResp,
                v5::Packet::Disconnect(d) => Control::Disconnect(format!("{:?}", d.reason_code)),
                _ => Control::Other(packet[0] >> 4),
            }
        }
    })
}

use Control::ConnAck;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_frames_as_the_codec_reads_them() {
        for version in [Version::V311, Version::V5] {
            for qos in [0u8, 1] {
                let mut out = Vec::new();
                let payload = vec![b'x'; 300];
                let pkid = if qos == 1 { 4242 } else { 0 };
                let at = put_publish(
                    &mut out,
                    version,
                    b"gw/sensors/7",
                    qos,
                    true,
                    pkid,
                    &payload,
                );
                set_dup(&mut out, at);
                let (first, header, total) = frame(&out).unwrap().unwrap();
                assert_eq!((first >> 4, total), (PUBLISH, out.len()));
                let p = read_publish(version, &out, header).unwrap();
                assert_eq!(p.topic, b"gw/sensors/7");
                assert_eq!((p.qos, p.pkid, p.retain, p.dup), (qos, pkid, true, true));
                assert_eq!(p.payload, &payload[..]);
                let mut b = BytesMut::from(&out[..]);
                match version {
                    Version::V311 => match v4::Packet::read(&mut b, MAX_PACKET_BYTES).unwrap() {
                        v4::Packet::Publish(c) => {
                            assert_eq!(c.topic, "gw/sensors/7");
                            assert_eq!(c.pkid, pkid);
                            assert_eq!(&c.payload[..], &payload[..]);
                        }
                        p => panic!("{p:?}"),
                    },
                    Version::V5 => match v5::Packet::read(&mut b, None).unwrap() {
                        v5::Packet::Publish(c) => {
                            assert_eq!(&c.topic[..], b"gw/sensors/7");
                            assert_eq!(c.pkid, pkid);
                            assert_eq!(&c.payload[..], &payload[..]);
                        }
                        p => panic!("{p:?}"),
                    },
                }
            }
        }
    }

    #[test]
    fn frames_wait_for_the_whole_packet_and_refuse_garbage() {
        let mut out = Vec::new();
        put_publish(&mut out, Version::V311, b"t", 1, false, 1, &[b'y'; 200]);
        for cut in 0..out.len() {
            assert!(frame(&out[..cut]).unwrap().is_none(), "{cut}");
        }
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        assert!(frame(&[0x30, 0xff, 0xff, 0xff, 0x7f]).is_err(), "too large");
        assert!(read_publish(Version::V311, &[0x32, 0x03, 0x00, 0x09, b'a'], 2).is_err());
        let ack = puback(77);
        assert_eq!(read_puback(&ack, 2).unwrap(), (77, 0));
    }

    #[test]
    fn connect_and_connack_round_trip_through_the_codec() {
        for version in [Version::V311, Version::V5] {
            let h = Hello {
                client_id: "updraft-up-0",
                keep_alive_s: 30,
                clean: true,
                session_expiry_s: None,
                receive_max: Some(100),
                login: Some(("u", "p")),
            };
            let c = connect(version, &h).unwrap();
            let (first, _, total) = frame(&c).unwrap().unwrap();
            assert_eq!((first >> 4, total), (1, c.len()));
        }
        // A refusal names its reason.
        match control(Version::V311, &[0x20, 0x02, 0x00, 0x05]).unwrap() {
            Control::ConnAck {
                refused: Some(r), ..
            } => assert!(r.contains("NotAuthorized"), "{r}"),
            c => panic!("{c:?}"),
        }
    }
}
