//! `mqtt` source: subscribe at a broker, one record per message.
//!
//! One session per source, on the first shard: CONNECT (by default a
//! persistent session: `clean_session = false`, a fixed client id, so the
//! broker keeps QoS 1 messages for us while we are away), SUBSCRIBE to
//! `topics`, then each PUBLISH's payload is offered as a record. The read
//! loop waits while the destination is full, so a slow sink stops the reads
//! and the broker queues for the session: QoS 1 is never dropped for lack of
//! room.
//!
//! A QoS 1 message is acknowledged (PUBACK) only once its record is held:
//! in the sink's queue when every sink the source feeds has a memory buffer;
//! when any has a disk buffer, only once the record is durable there
//! ([`SinkQueue::settled`](crate::pipeline::SinkQueue::settled) reached the
//! mark noted after the offer). So a `kill -9` of updraft loses nothing the
//! broker was told it had: what was not acknowledged is delivered again.
//! Duplicates are bounded by what was taken but not yet acknowledged.
//!
//! A message the source cannot take for good (empty, longer than
//! `max_record_bytes`, not UTF-8 under `utf8 = "drop"`) is counted and
//! acknowledged, so the broker does not send it again and again. A refused
//! CONNECT or SUBSCRIBE is logged with the broker and the reason; the session
//! is opened again after a backoff.

use crate::config::{Decoding, MqttSourcePlan, RetryPlan, WhenExceeded};
use crate::logging::LogEvery;
use crate::metrics::DropReason;
use crate::mqtt::{self as wire, Control, Version};
use crate::pipeline::ingest::{Ingest, Routed};
use crate::pipeline::Backoff;
use crate::record::meta::{self, Field};
use crate::tls::Link;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The session's read buffer (it grows for a longer packet, and back).
const READ_BYTES: usize = 64 * 1024;
/// A read shorter than this waits [`GATHER_WAIT`] before the next: a
/// broker writes a message or a few at a time, and reading them as they
/// come cost four times the CPU per message (measured: 1.5 against 4.6 s
/// per million at QoS 1, BENCHMARKS.md).
const GATHER_BELOW_BYTES: usize = 16 * 1024;
/// Tokio's timer rounds this up to its 1 ms tick.
const GATHER_WAIT: Duration = Duration::from_micros(500);
/// QoS 1 messages an MQTT 5 broker may send before our acknowledgements
/// (an MQTT 3.1.1 broker decides for itself: mosquitto's
/// `max_inflight_messages`).
pub const RECEIVE_MAXIMUM: u16 = 1000;
/// How long a stopping source waits for its last records to settle before
/// it acknowledges them (else the broker sends them again next time).
const STOP_SETTLE_WAIT: Duration = Duration::from_secs(1);
/// MQTT 5 persistent sessions: how long the broker keeps ours (7 days).
const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;

/// What the session writes (acknowledgements, pings), in order, from one
/// writer task.
struct Out {
    buf: RefCell<Vec<u8>>,
    ready: Notify,
}

/// Acknowledgements that wait for their records to be durable.
struct Pending {
    /// Per disk sink: the `appended()` mark the records must settle to.
    marks: Vec<(usize, u64)>,
    pkids: Vec<u16>,
}

pub async fn run(ing: Rc<Ingest>, source: usize) {
    let plan = &ing.plan.sources[source];
    let m = plan.mqtt.as_ref().expect("an mqtt source has its plan");
    let counters = &ing.metrics.sources[source];
    let mut backoff = Backoff::new(RetryPlan {
        initial_backoff_ms: 100,
        max_backoff_ms: 10_000,
    });
    let mut log = LogEvery::ten_seconds();
    let mut down_since: Option<Instant> = None;
    while !ing.source_stopping(source) {
        let r = session(&ing, source, m, &mut backoff, &mut down_since).await;
        counters.connections_open.set(0);
        match r {
            Ok(()) => break,
            Err(why) => {
                if ing.source_stopping(source) {
                    break;
                }
                down_since.get_or_insert_with(Instant::now);
                if let Some(held) = log.ready() {
                    tracing::warn!(source = %plan.name, broker = %m.url, suppressed = held,
                        "{why}; subscribing again after a backoff");
                }
                let stop_signal = ing.stop_signal(source);
                let stop = stop_signal.notified();
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = stop => break,
                }
            }
        }
    }
}

/// One session, until the connection ends (`Err`, with why) or the source
/// stops (`Ok`).
async fn session(
    ing: &Rc<Ingest>,
    source: usize,
    m: &MqttSourcePlan,
    backoff: &mut Backoff,
    down_since: &mut Option<Instant>,
) -> Result<(), String> {
    let connect = Link::connect(m.address, m.tls.as_ref());
    let stop_signal = ing.stop_signal(source);
    let stream = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, connect) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("connect timed out".into()),
        },
        _ = stop_signal.notified() => return Ok(()),
    };
    let stream = Rc::new(stream);
    let fd_key = ing.watch_fd(source, stream.fd());
    let result = serve(ing, source, m, &stream, backoff, down_since).await;
    ing.unwatch_fd(fd_key);
    stream.shutdown();
    result
}

async fn write(stream: &Link, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    let n = bytes.len();
    let (res, b) = stream.write(bytes, 0..n).await;
    res.map_err(|e| format!("write failed: {e}"))?;
    Ok(b)
}

async fn serve(
    ing: &Rc<Ingest>,
    source: usize,
    m: &MqttSourcePlan,
    stream: &Rc<Link>,
    backoff: &mut Backoff,
    down_since: &mut Option<Instant>,
) -> Result<(), String> {
    let plan = &ing.plan.sources[source];
    let counters = &ing.metrics.sources[source];
    let v = m.version;
    let hello = wire::Hello {
        client_id: &m.client_id,
        keep_alive_s: m.keep_alive_s,
        clean: m.clean_session,
        session_expiry_s: (v == Version::V5 && !m.clean_session).then_some(SESSION_EXPIRY_S),
        receive_max: Some(RECEIVE_MAXIMUM),
        login: m.login.as_ref().map(|(u, p)| (u.0.as_str(), p.0.as_str())),
    };
    let mut hello_bytes = wire::connect(v, &hello)
        .map_err(|e| e.to_string())?
        .to_vec();
    hello_bytes
        .extend_from_slice(&wire::subscribe(v, 1, &m.topics, m.qos).map_err(|e| e.to_string())?);
    write(stream, hello_bytes).await?;

    // The sinks whose durability a PUBACK waits for (looked up again after
    // a reload).
    let mut disk_sinks = ing.disk_sinks(source);
    let mut plan_seen = ing.plan.generation();
    let out = Rc::new(Out {
        buf: RefCell::new(Vec::new()),
        ready: Notify::new(),
    });
    let pending: Rc<RefCell<VecDeque<Pending>>> = Rc::new(RefCell::new(VecDeque::new()));
    let acked = Rc::new(Notify::new());
    let writer = crate::io::spawn(writer(stream.clone(), out.clone(), m.keep_alive_s));
    let acker = crate::io::spawn(acker(
        ing.clone(),
        pending.clone(),
        out.clone(),
        acked.clone(),
    ));
    let tasks = Tasks(vec![writer, acker]);

    let mut buf: Vec<u8> = vec![0u8; READ_BYTES];
    let mut have = 0usize;
    let mut connected = false;
    let mut pkids: Vec<u16> = Vec::new();
    // The record's meta, when a sink uses the topic (reused; no allocation
    // once it fits the longest topic).
    let mut meta: Vec<u8> = Vec::new();
    let mut log_bad = LogEvery::ten_seconds();
    let why = loop {
        // Room for one whole packet, up to the protocol's limit here: a
        // message longer than max_record_bytes must still be read whole, to
        // be counted and acknowledged (else the broker sends it forever).
        if have == buf.len() {
            if buf.len() >= wire::MAX_PACKET_BYTES {
                break "a packet longer than 16 MiB".to_string();
            }
            buf.resize((buf.len() * 2).min(wire::MAX_PACKET_BYTES), 0);
        }
        let deadline = (!connected).then(|| tokio::time::Instant::now() + CONNECT_TIMEOUT);
        let read = stream.read(std::mem::take(&mut buf), have);
        let (res, b) = match deadline {
            Some(d) => match tokio::time::timeout_at(d, read).await {
                Ok(r) => r,
                Err(_) => return Err("no CONNACK within 10 s".into()),
            },
            None => read.await,
        };
        buf = b;
        let n = match res {
            Ok(0) if ing.source_stopping(source) => break String::new(),
            Ok(0) => break "the broker closed the connection".to_string(),
            Ok(n) => n,
            Err(_) if ing.source_stopping(source) => break String::new(),
            Err(e) => break e,
        };
        have += n;
        let ts = ing.now_ns();
        let mut start = 0;
        let mut records = 0u64;
        pkids.clear();
        loop {
            let (first, header, total) = match wire::frame(&buf[start..have]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(wire::WireError::TooLarge(_)) if !connected => {
                    return Err("the broker's answer is not MQTT".into())
                }
                Err(e) => return Err(format!("{e} from the broker")),
            };
            let packet = start..start + total;
            start += total;
            if first >> 4 != wire::PUBLISH {
                match wire::control(v, &buf[packet]).map_err(|e| e.to_string())? {
                    Control::ConnAck {
                        refused: Some(why), ..
                    } => return Err(format!("the broker refused the connection: {why}")),
                    Control::ConnAck {
                        session_present, ..
                    } => {
                        connected = true;
                        backoff.reset();
                        counters.connections_accepted.add(1);
                        counters.connections_open.set(1);
                        match down_since.take() {
                            Some(t) => {
                                tracing::info!(source = %plan.name, broker = %m.url, session_present,
                                down_ms = t.elapsed().as_millis() as u64, "subscribed again")
                            }
                            None => {
                                tracing::info!(source = %plan.name, broker = %m.url, session_present, "connected")
                            }
                        }
                    }
                    Control::SubAck { refused, .. } => {
                        for i in refused {
                            tracing::error!(source = %plan.name, broker = %m.url, topic = %m.topics[i],
                                "the broker refused the subscription to this topic filter");
                        }
                    }
                    Control::Disconnect(reason) => {
                        return Err(format!("the broker disconnected: {reason}"));
                    }
                    _ => {}
                }
                continue;
            }
            let p = wire::read_publish(v, &buf[packet.clone()], header)
                .map_err(|e| format!("{e} from the broker"))?;
            counters.bytes.add(p.payload.len() as u64);
            let reason = if p.payload.len() > plan.max_record_bytes {
                Some(DropReason::Oversize)
            } else {
                ing.refuse(source, p.payload)
            };
            if let Some(reason) = reason {
                counters.drop(reason, 1);
                if reason != DropReason::Empty {
                    if let Some(held) = log_bad.ready() {
                        tracing::warn!(source = %plan.name, broker = %m.url, topic = %String::from_utf8_lossy(p.topic),
                            reason = reason.label(), suppressed = held, "message dropped");
                    }
                }
            } else {
                if let Some(rl) = plan.rate_limit {
                    if !ing.rate_admit(source) {
                        if rl.when_exceeded == WhenExceeded::Drop {
                            counters.drop(DropReason::RateLimit, 1);
                            if p.qos > 0 {
                                pkids.push(p.pkid);
                            }
                            continue;
                        }
                        ing.rate_wait(source).await;
                    }
                }
                // The payload stays borrowed from `buf` while the offer
                // waits: nothing else reads into it meanwhile.
                let record = &buf[packet.start + (total - p.payload.len())..packet.end];
                meta.clear();
                // Looked at per message: a reload may add a sink that uses it.
                if ing.plan.sources[source].fields.contains(&Field::Topic) {
                    // A topic too long to keep (over 64 KiB less 3 bytes)
                    // travels without it.
                    meta::put(&mut meta, meta::TOPIC, p.topic);
                }
                // An mqtt source keeps its records on its shard
                // (partition_by is refused): only `where` and the index.
                let skip = match plan.decoding {
                    Decoding::Raw => Some(0),
                    _ => match ing.route(source, record, ts, (0, ing.id), &mut meta) {
                        Routed::To(_, why, skip) => {
                            if let Some(why) = why {
                                if let Some(held) = log_bad.ready() {
                                    tracing::warn!(source = %plan.name, broker = %m.url, topic = %String::from_utf8_lossy(p.topic),
                                        suppressed = held, "{why}; passed on as it came");
                                }
                            }
                            Some(skip)
                        }
                        Routed::Dropped(why) => {
                            if let Some(held) = log_bad.ready() {
                                tracing::warn!(source = %plan.name, broker = %m.url, topic = %String::from_utf8_lossy(p.topic),
                                    suppressed = held, "{why}; dropped (counted as decode)");
                            }
                            None
                        }
                    },
                };
                if let Some(skip) = skip {
                    ing.offer(source, ing.id, ts, 0, record, &meta, skip).await;
                    records += 1;
                }
            }
            if p.qos > 0 {
                pkids.push(p.pkid);
            }
        }
        counters.records.add(records);
        let acked_in_read = pkids.len();
        if plan_seen != ing.plan.generation() {
            plan_seen = ing.plan.generation();
            disk_sinks = ing.disk_sinks(source);
        }
        if !pkids.is_empty() {
            if disk_sinks.is_empty() {
                let mut o = out.buf.borrow_mut();
                for &id in &pkids {
                    o.extend_from_slice(&wire::puback(id));
                }
                drop(o);
                out.ready.notify_one();
            } else {
                let marks = ing.marks(&disk_sinks);
                pending.borrow_mut().push_back(Pending {
                    marks,
                    pkids: std::mem::take(&mut pkids),
                });
                acked.notify_one();
            }
        }
        buf.copy_within(start..have, 0);
        have -= start;
        if connected && n < GATHER_BELOW_BYTES && gather_ok(v, acked_in_read) {
            // A small read: let the broker's next messages gather in the
            // socket, so they are taken in one read (and acknowledged in
            // one write) rather than a few at a time.
            tokio::time::sleep(GATHER_WAIT).await;
        }
        if buf.len() > READ_BYTES * 16 && have <= READ_BYTES {
            // After a long message: back to the usual buffer.
            buf.truncate(READ_BYTES);
            buf.shrink_to_fit();
        }
    };
    // Stopping: give the last records a moment to settle, so their
    // acknowledgements go out and the broker does not send them again.
    if ing.source_stopping(source) {
        let deadline = Instant::now() + STOP_SETTLE_WAIT;
        while !pending.borrow().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wait = Instant::now() + Duration::from_millis(200);
        while !out.buf.borrow().is_empty() && Instant::now() < wait {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = write(stream, wire::DISCONNECT.to_vec()).await;
    }
    drop(tasks);
    if why.is_empty() {
        Ok(())
    } else {
        Err(why)
    }
}

/// Whether waiting after a small read costs no throughput: at QoS 1 the
/// broker sends only a window of unacknowledged messages, and a wait while
/// it has used its window up would stall it. MQTT 5 tells us the window (our
/// receive maximum), so a read well under it means the broker had no more;
/// MQTT 3.1.1 does not (mosquitto's default is 20), so its QoS 1 reads never
/// wait. QoS 0 has no window.
fn gather_ok(v: Version, acked_in_read: usize) -> bool {
    match v {
        Version::V5 => acked_in_read < usize::from(RECEIVE_MAXIMUM) / 4,
        _ => acked_in_read == 0,
    }
}

/// Aborts the session's helper tasks when the session ends.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Writes what the session queued, in order; pings when idle.
async fn writer(stream: Rc<Link>, out: Rc<Out>, keep_alive_s: u16) {
    let idle = Duration::from_secs(u64::from(keep_alive_s)) / 2;
    let mut spare = Vec::new();
    let mut last = Instant::now();
    loop {
        let wait = out.ready.notified();
        if out.buf.borrow().is_empty() {
            if tokio::time::timeout(idle, wait).await.is_err() && last.elapsed() >= idle {
                out.buf.borrow_mut().extend_from_slice(&wire::PINGREQ);
            }
            continue;
        }
        std::mem::swap(&mut *out.buf.borrow_mut(), &mut spare);
        match write(&stream, spare).await {
            Ok(mut b) => {
                b.clear();
                spare = b;
                last = Instant::now();
            }
            Err(_) => return, // the read loop sees the connection end
        }
    }
}

/// Sends the acknowledgements of records once they are durable in every
/// disk buffer the source feeds, in order.
async fn acker(
    ing: Rc<Ingest>,
    pending: Rc<RefCell<VecDeque<Pending>>>,
    out: Rc<Out>,
    more: Rc<Notify>,
) {
    loop {
        let front = pending.borrow().front().map(|p| ing.unsettled(&p.marks));
        match front {
            None => more.notified().await,
            Some(Some(w)) => ing.settle_wait(w).await,
            Some(None) => {
                let p = pending.borrow_mut().pop_front().expect("checked");
                let mut o = out.buf.borrow_mut();
                for id in p.pkids {
                    o.extend_from_slice(&wire::puback(id));
                }
                drop(o);
                out.ready.notify_one();
            }
        }
    }
}
