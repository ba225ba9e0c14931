//! `receive --proto mqtt`: subscribe at a broker and verify what arrives.
//!
//! One client, a persistent session (`clean session` off, a fixed client
//! id), so a broker that restarts keeps what it queued for us; QoS 1
//! messages are acknowledged once counted. When the connection breaks, the
//! client connects again every 100 ms until told to stop. Each message's
//! payload is one record (a trailing newline is allowed).

use super::{pace, parse_record, unix_ns, Block, Framing, Shape, Tracker};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use updraft::mqtt::{self as wire, Control, Version};

#[derive(clap::Args, Clone)]
pub struct MqttArgs {
    /// `--proto mqtt`: topic filter to subscribe to.
    #[arg(long, default_value = "#")]
    pub topic: String,
    /// `--proto mqtt`: QoS of the subscription (0 or 1).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// `--proto mqtt`: "3.1.1" or "5".
    #[arg(long, default_value = "3.1.1")]
    pub mqtt_version: String,
    /// `--proto mqtt`: the client id of the (persistent) session.
    #[arg(long, default_value = "updraft-loadgen-receive")]
    pub client_id: String,
    /// `--proto mqtt`: the topic each record must arrive on, `{stream}`
    /// standing for its stream id (`gw/sensors/{stream}`); others are
    /// counted as `wrong_topic`.
    #[arg(long)]
    pub expect_topic: Option<String>,
}

/// `--expect-topic` (or http's `--expect-path`) split around its `{stream}`.
pub(crate) struct ExpectTopic {
    prefix: Vec<u8>,
    /// None: the topic is fixed (no `{stream}`).
    suffix: Option<Vec<u8>>,
}

impl ExpectTopic {
    pub(crate) fn new(t: &str) -> ExpectTopic {
        match t.split_once("{stream}") {
            Some((p, s)) => ExpectTopic {
                prefix: p.as_bytes().to_vec(),
                suffix: Some(s.as_bytes().to_vec()),
            },
            None => ExpectTopic {
                prefix: t.as_bytes().to_vec(),
                suffix: None,
            },
        }
    }

    /// Whether `topic` is the one a record of `stream` must arrive on.
    pub(crate) fn matches(&self, topic: &[u8], stream: u64) -> bool {
        let Some(suffix) = &self.suffix else {
            return topic == self.prefix.as_slice();
        };
        let Some(mid) = topic
            .strip_prefix(self.prefix.as_slice())
            .and_then(|t| t.strip_suffix(suffix.as_slice()))
        else {
            return false;
        };
        let mut v = 0u64;
        !mid.is_empty()
            && mid.len() <= 19
            && mid.iter().all(|&c| {
                v = v
                    .wrapping_mul(10)
                    .wrapping_add((c as u64).wrapping_sub(b'0' as u64));
                c.is_ascii_digit()
            })
            && v == stream
    }
}

/// Counts of the session's life.
#[derive(Default)]
pub struct MqttStats {
    pub connects: AtomicU64,
    pub messages: AtomicU64,
    /// Records not on the topic `--expect-topic` names for them.
    pub wrong_topic: AtomicU64,
}

fn version(a: &MqttArgs) -> Result<Version> {
    Ok(match a.mqtt_version.as_str() {
        "3.1.1" => Version::V311,
        "5" => Version::V5,
        v => bail!("--mqtt-version {v:?}: 3.1.1 or 5"),
    })
}

/// Connects, subscribes, and returns the stream (and bytes read past the
/// SUBACK).
fn session(broker: SocketAddr, a: &MqttArgs, v: Version) -> Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&broker, Duration::from_secs(2))
        .with_context(|| format!("connect {broker}"))?;
    s.set_nodelay(true)?;
    let hello = wire::Hello {
        client_id: &a.client_id,
        keep_alive_s: 60,
        clean: false,
        session_expiry_s: Some(3600),
        receive_max: Some(1000),
        login: None,
    };
    s.write_all(&wire::connect(v, &hello)?)?;
    s.write_all(&wire::subscribe(
        v,
        1,
        std::slice::from_ref(&a.topic),
        a.qos,
    )?)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut have = 0;
    // Messages a restored session delivers before the SUBACK are kept for
    // the caller.
    let mut early = Vec::new();
    let mut subscribed = false;
    while !subscribed {
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[have..])?;
        if n == 0 {
            bail!("{broker} closed the connection during the handshake");
        }
        have += n;
        let mut start = 0;
        while let Some((first, _, total)) = wire::frame(&buf[start..have])? {
            let packet = &buf[start..start + total];
            start += total;
            match first >> 4 {
                2 | 9 => match wire::control(v, packet)? {
                    Control::ConnAck {
                        refused: Some(why), ..
                    } => bail!("{broker} refused the connection: {why}"),
                    Control::SubAck { refused, .. } if !refused.is_empty() => {
                        bail!("{broker} refused the subscription to {:?}", a.topic)
                    }
                    Control::SubAck { .. } => subscribed = true,
                    _ => {}
                },
                wire::PUBLISH => early.extend_from_slice(packet),
                _ => {}
            }
            if subscribed {
                break;
            }
        }
        buf.copy_within(start..have, 0);
        have -= start;
    }
    early.extend_from_slice(&buf[..have]);
    let buf = early;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok((s, buf))
}

/// Subscribes (once, before returning, so a sender started next is seen),
/// then reads in a thread until `stop`.
pub fn start(
    broker: SocketAddr,
    a: MqttArgs,
    tracker: Arc<Mutex<Tracker>>,
    stop: Arc<AtomicBool>,
    stats: Arc<MqttStats>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let v = version(&a)?;
    let first = session(broker, &a, v)?;
    stats.connects.fetch_add(1, Relaxed);
    eprintln!("subscribed to {:?} at {broker}", a.topic);
    let expect = a.expect_topic.as_deref().map(ExpectTopic::new);
    Ok(std::thread::spawn(move || {
        let mut conn = Some(first);
        while !stop.load(Relaxed) {
            let (s, rest) = match conn.take() {
                Some(c) => c,
                None => match session(broker, &a, v) {
                    Ok(c) => {
                        stats.connects.fetch_add(1, Relaxed);
                        c
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                },
            };
            read_messages(s, rest, v, &tracker, &stop, &stats, expect.as_ref());
        }
        Ok(())
    }))
}

/// Reads messages until the connection ends or `stop`.
fn read_messages(
    mut s: TcpStream,
    mut buf: Vec<u8>,
    v: Version,
    tracker: &Mutex<Tracker>,
    stop: &AtomicBool,
    stats: &MqttStats,
    expect: Option<&ExpectTopic>,
) {
    let mut have = buf.len();
    buf.resize(1 << 20, 0);
    let mut parsed = Vec::new();
    let mut acks = Vec::new();
    // What came with the SUBACK is parsed before the first read: a broker
    // restoring a session may have filled its window with it and wait for
    // our acknowledgements.
    let mut first = true;
    while !stop.load(Relaxed) {
        if !first {
            match s.read(&mut buf[have..]) {
                Ok(0) => return,
                Ok(n) => have += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    continue
                }
                Err(_) => return,
            }
        }
        first = false;
        let mut start = 0;
        parsed.clear();
        acks.clear();
        let (mut malformed, mut bytes, mut wrong_topic) = (0u64, 0u64, 0u64);
        loop {
            let (first, header, total) = match wire::frame(&buf[start..have]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => return,
            };
            if first >> 4 == wire::PUBLISH {
                let Ok(p) = wire::read_publish(v, &buf[start..start + total], header) else {
                    return;
                };
                bytes += p.payload.len() as u64;
                let line = p.payload.strip_suffix(b"\n").unwrap_or(p.payload);
                match parse_record(line) {
                    Some(r) => {
                        if expect.is_some_and(|e| !e.matches(p.topic, r.0)) {
                            wrong_topic += 1;
                        }
                        parsed.push(r)
                    }
                    None => malformed += 1,
                }
                if p.qos > 0 {
                    acks.extend_from_slice(&wire::puback(p.pkid));
                }
            }
            start += total;
        }
        stats
            .messages
            .fetch_add(parsed.len() as u64 + malformed, Relaxed);
        stats.wrong_topic.fetch_add(wrong_topic, Relaxed);
        tracker
            .lock()
            .expect("tracker")
            .apply(&parsed, malformed, bytes);
        if !acks.is_empty() && s.write_all(&acks).is_err() {
            return;
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

/// `send --proto mqtt`: one client per connection publishing its stream.
pub struct Publisher {
    pub topic: String,
    pub qos: u8,
    pub version: String,
    /// `--format` and `--devices`, as for tcp.
    pub shape: Shape,
}

/// Messages a publisher keeps unacknowledged at most (QoS 1).
const SEND_WINDOW: u64 = 1000;

impl Publisher {
    pub fn send(
        &self,
        broker: SocketAddr,
        stream: u64,
        count: u64,
        size: usize,
        rate: Option<f64>,
        progress: &AtomicU64,
    ) -> Result<()> {
        if self.qos > 1 {
            bail!("--qos {}: 0 or 1", self.qos);
        }
        let v = match self.version.as_str() {
            "3.1.1" => Version::V311,
            "5" => Version::V5,
            x => bail!("--mqtt-version {x:?}: 3.1.1 or 5"),
        };
        let mut s = TcpStream::connect(broker).with_context(|| format!("connect {broker}"))?;
        s.set_nodelay(true)?;
        let id = format!("updraft-loadgen-send-{stream}");
        let hello = wire::Hello {
            client_id: &id,
            keep_alive_s: 60,
            clean: true,
            session_expiry_s: None,
            receive_max: None,
            login: None,
        };
        s.write_all(&wire::connect(v, &hello)?)?;
        let mut buf = vec![0u8; 4096];
        let mut have = 0;
        loop {
            let n = s.read(&mut buf[have..])?;
            if n == 0 {
                bail!("{broker} closed the connection before CONNACK");
            }
            have += n;
            if let Some((_, _, total)) = wire::frame(&buf[..have])? {
                if let Control::ConnAck {
                    refused: Some(why), ..
                } = wire::control(v, &buf[..total])?
                {
                    bail!("{broker} refused the connection: {why}");
                }
                break;
            }
        }
        let acked = Arc::new(AtomicU64::new(0));
        let reader = {
            let (mut r, acked) = (s.try_clone()?, acked.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let mut have = 0;
                loop {
                    match r.read(&mut buf[have..]) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    let mut start = 0;
                    while let Ok(Some((first, _, total))) = wire::frame(&buf[start..have]) {
                        if first >> 4 == wire::PUBACK {
                            acked.fetch_add(1, Relaxed);
                        }
                        start += total;
                    }
                    buf.copy_within(start..have, 0);
                    have -= start;
                }
            })
        };
        let per_block = match rate {
            Some(r) => ((r / 1000.0) as usize).clamp(1, 256),
            None => 256,
        };
        let mut block = Block::shaped(
            stream,
            size,
            Framing::Newline,
            per_block,
            self.shape.format,
            self.shape.devices,
        )?;
        let mut out = Vec::new();
        let start = quanta::Instant::now();
        let mut sent = 0u64;
        while sent < count {
            if let Some(r) = rate {
                pace(start, sent, r);
            }
            let n = ((count - sent) as usize).min(per_block);
            if self.qos == 1 {
                while sent + n as u64 - acked.load(Relaxed) > SEND_WINDOW {
                    if reader.is_finished() {
                        bail!("{broker} closed the connection");
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            let frame = block.frame;
            let bytes = block.fill(sent, n, unix_ns());
            out.clear();
            for i in 0..n {
                let record = &bytes[i * frame..(i + 1) * frame - 1];
                let pkid = ((sent + i as u64) % 65_535) as u16 + 1;
                let pkid = if self.qos == 1 { pkid } else { 0 };
                wire::put_publish(
                    &mut out,
                    v,
                    self.topic.as_bytes(),
                    self.qos,
                    false,
                    pkid,
                    record,
                );
            }
            s.write_all(&out)
                .with_context(|| format!("write to {broker}"))?;
            sent += n as u64;
            progress.fetch_add(n as u64, Relaxed);
        }
        if self.qos == 1 {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while acked.load(Relaxed) < count {
                if reader.is_finished() || std::time::Instant::now() > deadline {
                    bail!("{broker} acknowledged {} of {count}", acked.load(Relaxed));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        s.write_all(&wire::DISCONNECT)?;
        let _ = s.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ExpectTopic;

    #[test]
    fn expect_topic_puts_the_stream_in_its_place() {
        let e = ExpectTopic::new("gw/sensors/{stream}");
        assert!(e.matches(b"gw/sensors/7", 7));
        assert!(!e.matches(b"gw/sensors/7", 8));
        assert!(!e.matches(b"gw/sensors/", 0));
        assert!(!e.matches(b"gw/sensors/7x", 7));
        assert!(!e.matches(b"sensors/7", 7));
        let fixed = ExpectTopic::new("site-7/app");
        assert!(fixed.matches(b"site-7/app", 3));
        assert!(!fixed.matches(b"site-7/ap", 3));
    }
}
