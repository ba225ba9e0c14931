//! `receive --proto mqtt`: subscribe at a broker and verify what arrives.
//!
//! One client, a persistent session (`clean session` off, a fixed client
//! id), so a broker that restarts keeps what it queued for us; QoS 1
//! messages are acknowledged once counted. When the connection breaks, the
//! client connects again every 100 ms until told to stop. Each message's
//! payload is one record (a trailing newline is allowed).

use super::{parse_record, Tracker};
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
}

/// Counts of the session's life.
#[derive(Default)]
pub struct MqttStats {
    pub connects: AtomicU64,
    pub messages: AtomicU64,
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
            read_messages(s, rest, v, &tracker, &stop, &stats);
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
) {
    let mut have = buf.len();
    buf.resize(1 << 20, 0);
    let mut parsed = Vec::new();
    let mut acks = Vec::new();
    while !stop.load(Relaxed) {
        match s.read(&mut buf[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        let mut start = 0;
        parsed.clear();
        acks.clear();
        let (mut malformed, mut bytes) = (0u64, 0u64);
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
                    Some(r) => parsed.push(r),
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
