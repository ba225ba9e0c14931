//! `mqtt`: each record published as one message to a broker, QoS 0 or 1,
//! MQTT 3.1.1 or 5, one connection per shard.
//!
//! A batch output: [`Deliver::submit`] encodes a batch's records into one
//! buffer of PUBLISH packets (each with its packet id, assigned in order),
//! queues it and returns; the batch's own buffers are free again. A writer
//! task owns the connection and writes the queued packets in runs, keeping
//! at most `inflight` messages unacknowledged (less if an MQTT 5 broker's
//! receive maximum says so); a reader task takes the PUBACKs. A batch is
//! delivered when every one of its messages was acknowledged (QoS 1) or
//! written (QoS 0): then it is acknowledged to the disk buffer (out of order
//! where several are in flight) and counted. A connection that breaks is
//! opened again after a backoff with full jitter; every message not yet
//! acknowledged is sent again, with the DUP flag, so nothing is lost while
//! the collector runs (a broker may see a message twice: at least once).
//! With a disk buffer, what was unacknowledged at a crash is replayed from
//! the log at the next start.
//!
//! Bounds: at most [`QUEUED_BATCHES`] encoded batches per shard (submit
//! waits, and the sink's queue fills behind it: sources are held back); a
//! packet id is never reused while its message is unacknowledged. A
//! refusal of the connection (CONNACK) is logged with the broker's address
//! and reason, and retried; an MQTT 5 PUBACK with a failure reason refuses
//! that message for good: it is dropped and counted
//! (`updraft_sink_buffer_dropped_records_total`) with the reason logged.

use super::util::Backoff;
use super::{Kind, PlanCx};
use crate::config::{expand_env, invalid, ConfigError, Redacted};
use crate::logging::LogEvery;
use crate::mqtt::{self as wire, Control, Version};
use crate::pipeline::{Ack, BatchId, Deliver, SinkCtx};
use crate::record::meta::Field;
use crate::record::BatchView;
use super::util::template::Template;
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;
use crate::tls::Link;

/// Encoded batches queued per shard before `submit` waits.
pub const QUEUED_BATCHES: usize = 8;
/// The most messages a connection keeps unacknowledged by default.
pub const INFLIGHT_DEFAULT: u32 = 1000;
/// Packet ids are 1..=65535; the messages between the oldest unacknowledged
/// one and the newest stay within this span, so no id is reused early.
const SEQ_SPAN_MAX: u64 = 32_768;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A read of acknowledgements shorter than this waits [`ACK_GATHER_WAIT`]
/// before the next (while the window has room): PUBACKs are 4 bytes and
/// come a few at a time.
const ACK_GATHER_BELOW_BYTES: usize = 4096;
/// Tokio's timer rounds this up to its 1 ms tick.
const ACK_GATHER_WAIT: Duration = Duration::from_micros(500);
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
    type Output = MqttOutput;

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

    fn output(cx: &Rc<SinkCtx>, sink: usize, t: &Target, ack: Option<Ack>) -> MqttOutput {
        MqttOutput::new(cx, sink, t.clone(), ack)
    }

    fn fields(t: &Target) -> Vec<(&'static str, Field)> {
        t.topic.fields().into_iter().map(|f| ("topic", f)).collect()
    }
}

/// One batch's messages, encoded.
struct Out {
    id: BatchId,
    /// Sequence number of the first message (its packet id derives from it).
    first_seq: u64,
    /// Where each message starts in `body`, and the end.
    offsets: Vec<u32>,
    /// `None` while a write of it is under way.
    body: Option<Vec<u8>>,
    acked: Vec<bool>,
    acked_count: u32,
    /// Messages written on the current connection (a prefix).
    written: u32,
    /// Sent before on an earlier connection: runs get the DUP flag.
    resend: bool,
    payload_bytes: u64,
    done: bool,
}

impl Out {
    fn count(&self) -> u32 {
        (self.offsets.len() - 1) as u32
    }
}

struct State {
    batches: VecDeque<Out>,
    next_seq: u64,
    spare: Vec<Out>,
    conn: Option<Rc<Link>>,
    /// Bumped at each new connection; a reader of an old one stops.
    epoch: u64,
    /// Written on this connection and not yet acknowledged (QoS 1).
    unacked: u32,
    window: u32,
}

struct Inner {
    cx: Rc<SinkCtx>,
    sink: usize,
    t: Target,
    ack: Option<Ack>,
    st: RefCell<State>,
    /// Something to write (a batch, room in the window, a new connection).
    wake: Notify,
    /// A batch was delivered (room to submit; close waits on it).
    progress: Notify,
    closing: Cell<bool>,
    /// Signalled once `closing` is set (cuts a retry's wait short).
    closed: Notify,
    log: RefCell<LogEvery>,
}

/// A sink's connection to its broker on one shard.
pub struct MqttOutput {
    inner: Rc<Inner>,
    writer: Option<tokio::task::JoinHandle<()>>,
    /// A record's topic rendered from the template (reused).
    topic: Vec<u8>,
}

impl MqttOutput {
    pub fn new(cx: &Rc<SinkCtx>, sink: usize, t: Target, ack: Option<Ack>) -> MqttOutput {
        let window = t.inflight;
        let inner = Rc::new(Inner {
            cx: cx.clone(),
            sink,
            t,
            ack,
            st: RefCell::new(State {
                batches: VecDeque::new(),
                next_seq: 0,
                spare: Vec::new(),
                conn: None,
                epoch: 0,
                unacked: 0,
                window,
            }),
            wake: Notify::new(),
            progress: Notify::new(),
            closing: Cell::new(false),
            closed: Notify::new(),
            log: RefCell::new(LogEvery::ten_seconds()),
        });
        let writer = tokio_uring::spawn(writer(inner.clone()));
        MqttOutput {
            inner,
            writer: Some(writer),
            topic: Vec::new(),
        }
    }
}

impl Inner {
    fn name(&self) -> &str {
        &self.cx.plan.sinks[self.sink].name
    }

    fn counters(&self) -> &crate::metrics::SinkCounters {
        &self.cx.metrics.sinks[self.sink]
    }

    fn pkid(seq: u64) -> u16 {
        (seq % 65_535) as u16 + 1
    }

    /// Marks message `seq` acknowledged (or refused, with `refused`).
    fn settle(&self, st: &mut State, seq: u64, refused: bool) {
        let Some(i) = st
            .batches
            .iter()
            .position(|o| seq >= o.first_seq && seq < o.first_seq + u64::from(o.count()))
        else {
            return; // a duplicate PUBACK
        };
        let o = &mut st.batches[i];
        let k = (seq - o.first_seq) as usize;
        if o.acked[k] || o.done {
            return;
        }
        o.acked[k] = true;
        o.acked_count += 1;
        if (k as u32) < o.written {
            st.unacked = st.unacked.saturating_sub(1);
        }
        if refused {
            self.counters().buffer_dropped.add(1);
        }
        if o.acked_count == o.count() {
            o.done = true;
            let c = self.counters();
            c.records.add(u64::from(o.count()));
            c.bytes.add(o.payload_bytes);
            c.batches.add(1);
            if let Some(ack) = &self.ack {
                ack(o.id);
            }
            // Batches leave in order, so the span of sequence numbers in
            // flight starts at the oldest one still open.
            while st.batches.front().is_some_and(|o| o.done && o.body.is_some()) {
                let o = st.batches.pop_front().expect("checked");
                st.spare.push(o);
            }
            self.progress.notify_waiters();
        }
        self.counters().in_flight.set(i64::from(st.unacked));
        self.wake.notify_one();
    }

    /// The packet id `pkid` back to its sequence number (ids in flight lie
    /// within [`SEQ_SPAN_MAX`] of the oldest open batch).
    fn seq_of(st: &State, pkid: u16) -> Option<u64> {
        let base = st.batches.front()?.first_seq;
        let off = (u64::from(pkid) + 65_535 - 1 - base % 65_535) % 65_535;
        Some(base + off)
    }
}

impl Deliver for MqttOutput {
    fn takes_batches(&self) -> bool {
        true
    }

    async fn deliver<B: BoundedBuf>(
        &mut self,
        _cx: &SinkCtx,
        _buf: B,
        _give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        unreachable!("an mqtt output takes batches through submit")
    }

    /// Encodes `batch` into PUBLISH packets and queues them; waits first
    /// while [`QUEUED_BATCHES`] are queued or the ids in flight would span
    /// too far.
    async fn submit(&mut self, batch: BatchView<'_>, id: BatchId) {
        let inner = &self.inner;
        let n = batch.len() as u64;
        loop {
            let wait = inner.progress.notified();
            {
                let st = inner.st.borrow();
                let span = st
                    .batches
                    .front()
                    .map_or(0, |o| st.next_seq - o.first_seq);
                if st.batches.len() < QUEUED_BATCHES && (span == 0 || span + n <= SEQ_SPAN_MAX) {
                    break;
                }
            }
            wait.await;
        }
        let mut st = inner.st.borrow_mut();
        let mut o = st.spare.pop().unwrap_or_else(|| Out {
            id,
            first_seq: 0,
            offsets: Vec::new(),
            body: Some(Vec::new()),
            acked: Vec::new(),
            acked_count: 0,
            written: 0,
            resend: false,
            payload_bytes: 0,
            done: false,
        });
        o.id = id;
        o.first_seq = st.next_seq;
        o.offsets.clear();
        o.acked.clear();
        o.acked_count = 0;
        o.written = 0;
        o.resend = false;
        o.done = false;
        o.payload_bytes = batch.payload().len() as u64;
        let body = o.body.as_mut().expect("a spare batch holds its body");
        body.clear();
        let t = &inner.t;
        let mut seq = o.first_seq;
        let fixed = t.topic.fixed().map(str::as_bytes);
        let rendered = &mut self.topic;
        let mut unnamed = 0u64;
        batch.for_each(|_, _, record, meta| {
            let topic = match fixed {
                Some(f) => f,
                None => {
                    rendered.clear();
                    t.topic.render(meta, rendered);
                    rendered.as_slice()
                }
            };
            if topic.is_empty() || topic.len() > 65_535 {
                // A record whose topic could not travel with it (over 64 KiB).
                unnamed += 1;
                return;
            }
            o.offsets.push(body.len() as u32);
            let pkid = if t.qos > 0 { Inner::pkid(seq) } else { 0 };
            wire::put_publish(body, t.version, topic, t.qos, t.retain, pkid, record);
            seq += 1;
        });
        o.offsets.push(body.len() as u32);
        if unnamed > 0 {
            inner.counters().buffer_dropped.add(unnamed);
            if let Some(held) = inner.log.borrow_mut().ready() {
                tracing::warn!(sink = inner.name(), broker = %t.url, records = unnamed, suppressed = held,
                    "records whose topic renders empty or longer than 65535 bytes are dropped");
            }
        }
        let n = seq - o.first_seq;
        o.acked.resize(n as usize, false);
        st.next_seq = seq;
        if n == 0 {
            o.done = true;
            if let Some(ack) = &inner.ack {
                ack(id);
            }
            st.spare.push(o);
            return;
        }
        st.batches.push_back(o);
        drop(st);
        inner.wake.notify_one();
    }

    /// Waits for what is queued to be delivered, at most half the shutdown
    /// timeout; what is left then stays unacknowledged (a disk buffer sends
    /// it again at the next start; a memory buffer loses it, counted).
    async fn close(&mut self, cx: &SinkCtx) {
        let inner = &self.inner;
        let deadline = Instant::now() + Duration::from_millis(cx.plan.shutdown_timeout_ms / 2);
        loop {
            let wait = inner.progress.notified();
            if inner.st.borrow().batches.iter().all(|o| o.done) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, wait).await.is_err() {
                let st = inner.st.borrow();
                let open: u64 = st
                    .batches
                    .iter()
                    .filter(|o| !o.done)
                    .map(|o| u64::from(o.count() - o.acked_count))
                    .sum();
                tracing::warn!(sink = inner.name(), shard = cx.id, broker = %inner.t.url, messages = open,
                    "messages not acknowledged by the broker at shutdown are abandoned (a disk buffer sends them again at the next start)");
                if inner.ack.is_none() {
                    inner.counters().buffer_dropped.add(open);
                }
                break;
            }
        }
        inner.closing.set(true);
        inner.closed.notify_one();
        inner.wake.notify_one();
        if let Some(w) = self.writer.take() {
            let _ = w.await;
        }
    }
}

/// Opens a session: TCP, CONNECT, CONNACK. Returns the stream, the bytes
/// read past the CONNACK, and the broker's receive maximum.
async fn open(inner: &Inner, shard: usize) -> Result<(Link, Vec<u8>, Option<u16>), String> {
    let t = &inner.t;
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

/// Reads one connection's packets: PUBACKs settle messages; ends when the
/// connection does (or a newer one replaced it).
async fn reader(inner: Rc<Inner>, stream: Rc<Link>, epoch: u64, mut buf: Vec<u8>) {
    let version = inner.t.version;
    let mut have = buf.len();
    buf.resize(64 * 1024, 0);
    let why = 'conn: loop {
        let mut start = 0;
        loop {
            match wire::frame(&buf[start..have]) {
                Ok(Some((first, header, total))) => {
                    let p = &buf[start..start + total];
                    match first >> 4 {
                        wire::PUBACK => match wire::read_puback(p, header) {
                            Ok((pkid, reason)) => {
                                let mut st = inner.st.borrow_mut();
                                if let Some(seq) = Inner::seq_of(&st, pkid) {
                                    let refused = reason >= 0x80;
                                    if refused {
                                        if let Some(held) = inner.log.borrow_mut().ready() {
                                            tracing::warn!(sink = inner.name(), broker = %inner.t.url, reason = format!("0x{reason:02x}"),
                                                suppressed = held, "the broker refused a message for good; it is dropped (counted)");
                                        }
                                    }
                                    inner.settle(&mut st, seq, refused);
                                }
                            }
                            Err(e) => break 'conn e.to_string(),
                        },
                        wire::PUBLISH => {} // nothing is subscribed
                        _ => match wire::control(version, p) {
                            Ok(Control::Disconnect(reason)) => {
                                break 'conn format!("the broker disconnected: {reason}")
                            }
                            Ok(_) => {}
                            Err(e) => break 'conn e.to_string(),
                        },
                    }
                    start += total;
                }
                Ok(None) => break,
                Err(e) => break 'conn e.to_string(),
            }
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let (res, b) = stream.read(buf, have).await;
        buf = b;
        match res {
            Ok(0) => break "the broker closed the connection".to_string(),
            Ok(n) => {
                have += n;
                // A few acknowledgements: let more gather before the next
                // read while the writer still has half its window to use
                // (reading each as it came cost the most CPU per message).
                let room = {
                    let st = inner.st.borrow();
                    st.unacked.saturating_mul(2) <= st.window
                };
                if n < ACK_GATHER_BELOW_BYTES && room {
                    tokio::time::sleep(ACK_GATHER_WAIT).await;
                }
            }
            Err(e) => break e,
        }
        if inner.st.borrow().epoch != epoch {
            return;
        }
    };
    let mut st = inner.st.borrow_mut();
    if st.epoch == epoch && st.conn.is_some() {
        if !inner.closing.get() {
            if let Some(held) = inner.log.borrow_mut().ready() {
                tracing::warn!(sink = inner.name(), shard = inner.cx.id, broker = %inner.t.url, suppressed = held,
                    "{why}; reconnecting (unacknowledged messages are sent again)");
            }
        }
        stream.shutdown();
        st.conn = None;
        inner.counters().connected.set(0);
        drop(st);
        inner.wake.notify_one();
    }
}

/// The next run of messages to write: (batch index, first message, count).
fn next_run(st: &State) -> Option<(usize, u32, u32)> {
    let room = st.window.saturating_sub(st.unacked);
    if room == 0 {
        return None;
    }
    for (i, o) in st.batches.iter().enumerate() {
        if o.done || o.body.is_none() {
            continue;
        }
        let n = o.count();
        let mut k = o.written;
        while k < n && o.acked[k as usize] {
            k += 1;
        }
        if k < n {
            let mut end = k;
            while end < n && !o.acked[end as usize] && end - k < room {
                end += 1;
            }
            return Some((i, k, end - k));
        }
    }
    None
}

/// Owns the connection: opens it (again), writes queued messages within the
/// window, pings when idle. Runs until the output closes.
async fn writer(inner: Rc<Inner>) {
    let shard = inner.cx.id;
    let mut backoff = Backoff::new(inner.cx.plan.sinks[inner.sink].retry);
    let mut down_since: Option<Instant> = None;
    let keep_alive = Duration::from_secs(u64::from(inner.t.keep_alive_s));
    let mut last_write = Instant::now();
    loop {
        if inner.closing.get() {
            break;
        }
        let conn = inner.st.borrow().conn.clone();
        let Some(conn) = conn else {
            let pending = inner.st.borrow().batches.iter().any(|o| !o.done);
            if !pending {
                // Connect when there is something to send.
                let wait = inner.wake.notified();
                if !inner.st.borrow().batches.iter().any(|o| !o.done) && !inner.closing.get() {
                    wait.await;
                }
                continue;
            }
            match open(&inner, shard).await {
                Ok((stream, rest, receive_max)) => {
                    let stream = Rc::new(stream);
                    let epoch = {
                        let mut st = inner.st.borrow_mut();
                        st.epoch += 1;
                        st.conn = Some(stream.clone());
                        st.unacked = 0;
                        st.window = inner
                            .t
                            .inflight
                            .min(receive_max.map_or(u32::MAX, u32::from).max(1));
                        for o in st.batches.iter_mut() {
                            o.resend |= o.written > 0;
                            o.written = 0;
                        }
                        st.epoch
                    };
                    let c = inner.counters();
                    c.connected.set(1);
                    c.retry_backoff_ms.set(0);
                    backoff.reset();
                    if let Some(t) = down_since.take() {
                        tracing::info!(sink = inner.name(), shard, broker = %inner.t.url,
                            down_ms = t.elapsed().as_millis() as u64, "connected to the broker again");
                    }
                    last_write = Instant::now();
                    tokio_uring::spawn(reader(inner.clone(), stream, epoch, rest));
                }
                Err(why) => {
                    let c = inner.counters();
                    c.send_errors.add(1);
                    down_since.get_or_insert_with(Instant::now);
                    if let Some(held) = inner.log.borrow_mut().ready() {
                        tracing::warn!(sink = inner.name(), shard, broker = %inner.t.url, suppressed = held,
                            "{why}; messages wait in the sink's buffer");
                    }
                    let delay = backoff.next_delay();
                    c.retry_backoff_ms.set(delay.as_millis() as i64);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = inner.closed.notified() => {}
                    }
                    c.retries.add(1);
                }
            }
            continue;
        };
        let run = {
            let mut st = inner.st.borrow_mut();
            match next_run(&st) {
                Some((i, k, n)) => {
                    let o = &mut st.batches[i];
                    let mut body = o.body.take().expect("checked in next_run");
                    if o.resend && inner.t.qos > 0 {
                        for m in k..k + n {
                            wire::set_dup(&mut body, o.offsets[m as usize] as usize);
                        }
                    }
                    let (a, b) = (o.offsets[k as usize], o.offsets[(k + n) as usize]);
                    o.written = k + n;
                    let first_seq = o.first_seq;
                    if inner.t.qos > 0 {
                        st.unacked += n;
                    }
                    Some((first_seq, k, n, body, a as usize, b as usize))
                }
                None => None,
            }
        };
        let Some((first_seq, k, n, body, a, b)) = run else {
            let wait = inner.wake.notified();
            let idle = keep_alive / 2;
            let quiet = next_run(&inner.st.borrow()).is_none() && inner.st.borrow().conn.is_some();
            if quiet
                && tokio::time::timeout(idle, wait).await.is_err()
                && last_write.elapsed() >= idle
            {
                let (res, _) = conn.write(wire::PINGREQ.to_vec(), 0..2).await;
                if res.is_ok() {
                    last_write = Instant::now();
                }
            }
            continue;
        };
        let (res, body) = conn.write(body, a..b).await;
        last_write = Instant::now();
        let mut st = inner.st.borrow_mut();
        let i = st
            .batches
            .iter()
            .position(|o| o.first_seq == first_seq)
            .expect("a batch being written stays queued");
        st.batches[i].body = Some(body);
        match res {
            Ok(()) => {
                inner.counters().in_flight.set(i64::from(st.unacked));
                if inner.t.qos == 0 {
                    for m in k..k + n {
                        inner.settle(&mut st, first_seq + u64::from(m), false);
                    }
                } else {
                    // A batch whose acks all came during the write.
                    let o = &st.batches[i];
                    if o.acked_count == o.count() && o.done {
                        while st.batches.front().is_some_and(|o| o.done && o.body.is_some()) {
                            let o = st.batches.pop_front().expect("checked");
                            st.spare.push(o);
                        }
                    }
                }
            }
            Err(e) => {
                inner.counters().send_errors.add(1);
                if let Some(held) = inner.log.borrow_mut().ready() {
                    tracing::warn!(sink = inner.name(), shard, broker = %inner.t.url, error = %e, suppressed = held,
                        "write failed; reconnecting (unacknowledged messages are sent again)");
                }
                if st.conn.as_ref().is_some_and(|c| Rc::ptr_eq(c, &conn)) {
                    conn.shutdown();
                    st.conn = None;
                    st.epoch += 1;
                    inner.counters().connected.set(0);
                }
                down_since.get_or_insert_with(Instant::now);
            }
        }
    }
    let conn = inner.st.borrow_mut().conn.take();
    if let Some(conn) = conn {
        let (_, _) = conn.write(wire::DISCONNECT.to_vec(), 0..2).await;
        conn.shutdown();
    }
    inner.counters().connected.set(0);
}
