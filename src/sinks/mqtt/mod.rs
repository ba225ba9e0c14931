//! `mqtt`: each record published as one message to a broker, QoS 0 or 1,
//! MQTT 3.1.1 or 5, one connection per shard.
//!
//! A [`Publisher`] (the pipelining, windows, acknowledgements and resends
//! every broker output shares) with MQTT's [`Protocol`]: each message is a
//! PUBLISH whose packet id comes from its sequence number, at most
//! `inflight` unacknowledged (less if an MQTT 5 broker's receive maximum
//! says so), sent again with the DUP flag after a reconnect; a packet id is
//! never reused while its message is unacknowledged. A refusal of the
//! connection (CONNACK) is logged with the broker's address and reason, and
//! retried; an MQTT 5 PUBACK with a failure reason refuses that message for
//! good: it is not sent again, and goes to the dead-letter directory with
//! the reason (`updraft_sink_dead_letter_records_total`).

use super::util::publisher::{Answer, Opened, Protocol, Publisher};
use super::util::template::Template;
use super::{Kind, PlanCx};
use crate::config::{expand_env, invalid, ConfigError, Redacted};
use crate::mqtt::{self as wire, Control, Version};
use crate::pipeline::{Ack, BatchId, SinkCtx};
use crate::record::meta::Field;
use crate::tls::Link;
use serde::Deserialize;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;
/// The most messages a connection keeps unacknowledged by default.
pub const INFLIGHT_DEFAULT: u32 = 1000;
/// Packet ids are 1..=65535; the messages between the oldest unacknowledged
/// one and the newest stay within this span, so no id is reused early.
const SEQ_SPAN_MAX: u64 = 32_768;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE_S_DEFAULT: u16 = 30;

pub struct Sink;

/// The keys of an mqtt sink.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `mqtt://HOST:PORT` or `mqtts://HOST[:PORT]` (TLS).
    pub url: Option<String>,
    pub topic: Option<String>,
    pub qos: Option<u8>,
    /// `"3.1.1"` (default) or `"5"`.
    pub protocol: Option<String>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive_s: Option<u16>,
    pub inflight: Option<u32>,
    pub retain: Option<bool>,
    pub tls: Option<crate::tls::TlsConfig>,
}

#[derive(Debug, Clone)]
pub struct Target {
    /// The url as configured (for logs).
    pub url: String,
    pub address: SocketAddr,
    /// Fixed, or naming the record's `{topic}`.
    pub topic: Template,
    pub qos: u8,
    pub version: Version,
    /// Each shard connects as `<client_id>-<shard>`.
    pub client_id: String,
    pub login: Option<(Redacted, Redacted)>,
    pub keep_alive_s: u16,
    pub inflight: u32,
    pub retain: bool,
    pub tls: Option<crate::tls::ClientTls>,
}

impl Kind for Sink {
    const NAME: &'static str = "mqtt";
    type Config = Config;
    type Target = Target;
    type Output = Publisher<Target>;

    fn plan(c: Config, cx: &PlanCx<'_>) -> Result<Target, ConfigError> {
        let url = c
            .url
            .ok_or_else(|| invalid(cx.key("url"), "an mqtt sink needs a url (mqtt://HOST:PORT)"))?;
        let broker = wire::broker(&url).map_err(|m| invalid(cx.key("url"), m))?;
        let tls = wire::tls_for(&cx.key("tls"), &broker, c.tls.as_ref())?;
        let address = broker.address;
        let topic = c
            .topic
            .ok_or_else(|| invalid(cx.key("topic"), "an mqtt sink needs a topic"))?;
        if topic.is_empty() || topic.len() > 65_535 {
            return Err(invalid(cx.key("topic"), "1 to 65535 bytes"));
        }
        let topic = Template::parse(&topic).map_err(|m| invalid(cx.key("topic"), m))?;
        if topic.literal_text().contains(['+', '#']) {
            return Err(invalid(
                cx.key("topic"),
                "a topic to publish to may not hold the wildcards + or #",
            ));
        }
        if topic.fixed() == Some("") {
            return Err(invalid(cx.key("topic"), "1 to 65535 bytes"));
        }
        let qos = c.qos.unwrap_or(1);
        if qos > 1 {
            return Err(invalid(cx.key("qos"), "0 or 1"));
        }
        let version = match c.protocol.as_deref() {
            None | Some("3.1.1") => Version::V311,
            Some("5") => Version::V5,
            Some(p) => {
                return Err(invalid(
                    cx.key("protocol"),
                    format!("{p:?}: \"3.1.1\" or \"5\""),
                ))
            }
        };
        let client_id = c.client_id.unwrap_or_else(|| format!("updraft-{}", cx.name));
        if client_id.is_empty() || client_id.len() > 60 {
            return Err(invalid(cx.key("client_id"), "1 to 60 bytes"));
        }
        let login = match (c.username, c.password) {
            (None, None) => None,
            (Some(u), p) => {
                let u = expand_env(&u).map_err(|m| invalid(cx.key("username"), m))?;
                let p = match p {
                    Some(p) => expand_env(&p).map_err(|m| invalid(cx.key("password"), m))?,
                    None => String::new(),
                };
                Some((Redacted(u), Redacted(p)))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    cx.key("password"),
                    "a password needs a username",
                ))
            }
        };
        let keep_alive_s = c.keep_alive_s.unwrap_or(KEEP_ALIVE_S_DEFAULT);
        if keep_alive_s == 0 {
            return Err(invalid(cx.key("keep_alive_s"), "at least 1"));
        }
        let inflight = c.inflight.unwrap_or(INFLIGHT_DEFAULT);
        if inflight == 0 || u64::from(inflight) > SEQ_SPAN_MAX / 2 {
            return Err(invalid(
                cx.key("inflight"),
                format!("between 1 and {}", SEQ_SPAN_MAX / 2),
            ));
        }
        Ok(Target {
            url,
            address,
            topic,
            qos,
            version,
            client_id,
            login,
            keep_alive_s,
            inflight,
            retain: c.retain.unwrap_or(false),
            tls,
        })
    }

    fn output(cx: &Rc<SinkCtx>, sink: usize, t: &Target, ack: Option<Ack>) -> Publisher<Target> {
        Publisher::new(cx, sink, t.clone(), ack)
    }

    fn fields(t: &Target) -> Vec<(&'static str, Field)> {
        t.topic.fields().into_iter().map(|f| ("topic", f)).collect()
    }
}

/// The packet id of message `seq` (1..=65535, in order).
fn pkid(seq: u64) -> u16 {
    (seq % 65_535) as u16 + 1
}

/// The packet id `pkid` back to its sequence number (ids in flight lie
/// within [`SEQ_SPAN_MAX`] of the oldest one, `oldest`).
fn seq_of(oldest: u64, pkid: u16) -> u64 {
    let off = (u64::from(pkid) + 65_535 - 1 - oldest % 65_535) % 65_535;
    oldest + off
}

impl Protocol for Target {
    const PEER: &'static str = "broker";

    fn url(&self) -> &str {
        &self.url
    }

    fn window(&self) -> u32 {
        self.inflight
    }

    fn acknowledged(&self) -> bool {
        self.qos > 0
    }

    fn keep_alive(&self) -> Duration {
        Duration::from_secs(u64::from(self.keep_alive_s))
    }

    fn seq_span(&self) -> u64 {
        SEQ_SPAN_MAX
    }

    fn ping(&self) -> &'static [u8] {
        &wire::PINGREQ
    }

    fn goodbye(&self) -> &'static [u8] {
        &wire::DISCONNECT
    }

    async fn open(&self, cx: &SinkCtx, _epoch: u64) -> Result<Opened, String> {
        let (link, rest, receive_max) = open(self, cx.id).await?;
        Ok(Opened {
            link,
            rest,
            window: receive_max.map(u32::from),
        })
    }

    fn encode(
        &self,
        scratch: &mut Vec<u8>,
        body: &mut Vec<u8>,
        seq: u64,
        _id: BatchId,
        _index: u32,
        record: &[u8],
        meta: &[u8],
    ) -> bool {
        let topic = match self.topic.fixed() {
            Some(f) => f.as_bytes(),
            None => {
                scratch.clear();
                self.topic.render(record, meta, scratch);
                // A field's value is the sender's: a wildcard, a NUL or bytes
                // that are not UTF-8 would make the broker end the session.
                if scratch.iter().any(|&c| matches!(c, b'+' | b'#' | 0))
                    || std::str::from_utf8(scratch).is_err()
                {
                    return false;
                }
                scratch.as_slice()
            }
        };
        if topic.is_empty() || topic.len() > 65_535 {
            return false;
        }
        let pkid = if self.qos > 0 { pkid(seq) } else { 0 };
        wire::put_publish(body, self.version, topic, self.qos, self.retain, pkid, record);
        true
    }

    fn why_unsendable(&self) -> &'static str {
        "records whose topic renders empty, longer than 65535 bytes, or with a wildcard, a NUL or bytes that are not UTF-8"
    }

    fn mark_resend(&self, body: &mut [u8], at: usize) {
        if self.qos > 0 {
            wire::set_dup(body, at);
        }
    }

    fn read(
        &self,
        buf: &[u8],
        oldest: Option<u64>,
        _epoch: u64,
    ) -> Result<Option<(Answer, usize)>, String> {
        let Some((first, header, total)) = wire::frame(buf).map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let p = &buf[..total];
        let answer = match first >> 4 {
            wire::PUBACK => {
                let (id, reason) = wire::read_puback(p, header).map_err(|e| e.to_string())?;
                match oldest.map(|o| seq_of(o, id)) {
                    None => Answer::Nothing,
                    Some(seq) if reason >= 0x80 => {
                        Answer::Refused(seq, format!("PUBACK reason 0x{reason:02x}"))
                    }
                    Some(seq) => Answer::Acked(seq),
                }
            }
            wire::PUBLISH => Answer::Nothing, // nothing is subscribed
            _ => match wire::control(self.version, p).map_err(|e| e.to_string())? {
                Control::Disconnect(reason) => {
                    return Err(format!("the broker disconnected: {reason}"))
                }
                _ => Answer::Nothing,
            },
        };
        Ok(Some((answer, total)))
    }
}

/// Opens a session: TCP, CONNECT, CONNACK. Returns the stream, the bytes
/// read past the CONNACK, and the broker's receive maximum.
async fn open(t: &Target, shard: usize) -> Result<(Link, Vec<u8>, Option<u16>), String> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, Link::connect(t.address, t.tls.as_ref())).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err("connect timed out".into()),
    };
    let client_id = format!("{}-{shard}", t.client_id);
    let hello = wire::Hello {
        client_id: &client_id,
        keep_alive_s: t.keep_alive_s,
        clean: true,
        session_expiry_s: None,
        receive_max: None,
        login: t.login.as_ref().map(|(u, p)| (u.0.as_str(), p.0.as_str())),
    };
    let packet = wire::connect(t.version, &hello).map_err(|e| e.to_string())?.to_vec();
    let n = packet.len();
    let (res, _) = stream.write(packet, 0..n).await;
    res.map_err(|e| format!("cannot send CONNECT: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let mut have = 0;
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    loop {
        if let Some((first, _, total)) = wire::frame(&buf[..have]).map_err(|e| e.to_string())? {
            if first >> 4 != 2 {
                return Err(format!("the broker answered CONNECT with packet type {}", first >> 4));
            }
            return match wire::control(t.version, &buf[..total]).map_err(|e| e.to_string())? {
                Control::ConnAck {
                    refused: None,
                    receive_max,
                    ..
                } => {
                    buf.copy_within(total..have, 0);
                    buf.truncate(have - total);
                    Ok((stream, buf, receive_max))
                }
                Control::ConnAck {
                    refused: Some(why), ..
                } => Err(format!("the broker refused the connection: {why}")),
                c => Err(format!("unexpected answer to CONNECT: {c:?}")),
            };
        }
        if have == buf.len() {
            return Err("the CONNACK is too long".into());
        }
        let read = stream.read(std::mem::take(&mut buf), have);
        let (res, b) = match tokio::time::timeout_at(deadline, read).await {
            Ok(r) => r,
            Err(_) => return Err("no CONNACK within 10 s".into()),
        };
        buf = b;
        match res {
            Ok(0) => return Err("the broker closed the connection before CONNACK".into()),
            Ok(n) => have += n,
            Err(e) => return Err(e),
        }
    }
}

