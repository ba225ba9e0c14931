//! `updraft` source: batches from other updrafts over the native protocol
//! ([`crate::native`], whose top comment is the wire format).
//!
//! Each shard listens with `SO_REUSEPORT` like a tcp source (the same
//! bounds: `max_connections`, `idle_timeout_ms`). A connection greets (TLS
//! first, when the source has a `tls` table), then reads frames into one
//! buffer in large reads: each frame is checked whole (header CRC, archive
//! CRC, rkyv validation, the bounds of every record) and its records are
//! offered, as they lie in the read buffer, to the shard's sinks, keeping
//! their receive time and meta; the offer waits while a sink is full, and so
//! does the next read, so the sender is held back by TCP. A frame is
//! acknowledged, in order, once its records are durable in every disk
//! buffer the source feeds (the mqtt source's rule: the sink queue's
//! `settled` mark) or, with memory buffers only, once queued.
//!
//! Duplicates: the highest frame id acknowledged per (source, sender,
//! stream) is kept for the process's life, shared by the shards (a sender
//! that reconnects may land on another one); a frame at or below it is
//! acknowledged as a duplicate and its records are not taken again. Ids are
//! remembered for at most [`STREAMS_MAX`] streams (the oldest forgotten
//! first).
//!
//! A peer that breaks the protocol gets an ERROR naming what was wrong, is
//! disconnected and counted (`protocol_errors`); the log line names it.
//! Other connections go on.

use super::tcp::{Conns, Watch};
use crate::io::TcpStream;
use crate::metrics::DropReason;
use crate::native::{self as wire, Hello, Inbound, Welcome};
use crate::pipeline::ingest::Ingest;
use crate::tls::Link;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// How long a peer has to finish TLS and greet.
const GREETING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a connection reads at once (more when a frame is longer).
const READ_BYTES: usize = 256 * 1024;
/// Frames a sender may keep unacknowledged (told in the WELCOME). The
/// reader holds one frame at a time; what is unacknowledged waits in the
/// sink queues and the log, so this bounds only the acknowledgements queued.
const WINDOW: u32 = 256;
/// Streams (sender, shard) whose last frame id is remembered.
pub const STREAMS_MAX: usize = 65_536;

/// The frame id (segment, offset) acknowledged last per stream, and the
/// order in which streams were first seen (to forget the oldest).
#[derive(Default)]
struct Seen {
    last: HashMap<(usize, u64, u32), (u64, u64)>,
    order: VecDeque<(usize, u64, u32)>,
}

static SEEN: Mutex<Option<Seen>> = Mutex::new(None);

fn seen<T>(f: impl FnOnce(&mut Seen) -> T) -> T {
    let mut g = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Seen::default))
}

/// Whether frame `id` of `stream` was acknowledged before.
fn taken_before(stream: (usize, u64, u32), id: (u64, u64)) -> bool {
    seen(|s| s.last.get(&stream).is_some_and(|&last| id <= last))
}

/// Notes frame `id` of `stream` acknowledged.
fn note_taken(stream: (usize, u64, u32), id: (u64, u64)) {
    seen(|s| match s.last.get_mut(&stream) {
        Some(last) => *last = (*last).max(id),
        None => {
            if s.order.len() >= STREAMS_MAX {
                if let Some(old) = s.order.pop_front() {
                    s.last.remove(&old);
                }
            }
            s.order.push_back(stream);
            s.last.insert(stream, id);
        }
    })
}

/// A frame waiting for its acknowledgement.
struct Pending {
    seq: u64,
    id: (u64, u64),
    duplicate: bool,
    /// Per disk sink: the `appended()` mark the records must settle to.
    marks: Vec<(usize, u64)>,
}

/// The acknowledgements of one connection, in order.
struct Acks {
    pending: RefCell<VecDeque<Pending>>,
    more: Notify,
}

/// Serves one sender ([`super::tcp::Serve`]).
pub fn serve(
    ing: Rc<Ingest>,
    source: usize,
    stream: TcpStream,
    peer: SocketAddr,
    watch: Rc<Watch>,
    conns: Rc<Conns>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TcpStream>>> {
    Box::pin(async move {
        let plan = &ing.plan.sources[source];
        let native = plan
            .native
            .as_ref()
            .expect("an updraft source has its plan");
        let mut link = Link::from_stream(stream);
        let fd_key = ing.watch_fd(source, link.fd());
        let tls = match &native.tls {
            None => Ok(()),
            Some(tls) => match tokio::time::timeout(GREETING_TIMEOUT, link.accept_tls(tls)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                Err(_) => Err("no TLS handshake within 10 s".to_string()),
            },
        };
        let mut link = Rc::new(link);
        let why = match tls {
            Ok(()) => connection(&ing, source, &link, &watch).await,
            Err(why) => {
                ing.metrics.sources[source].protocol_errors.add(1);
                Err(why)
            }
        };
        ing.unwatch_fd(fd_key);
        if let Err(why) = why {
            if let Some(held) = conns.log_input.borrow_mut().ready() {
                tracing::warn!(source = %plan.name, %peer, suppressed = held,
                    "{why}; the connection is closed (counted)");
            }
        }
        link.shutdown();
        // The acker was aborted; it lets go of the link once it is dropped.
        loop {
            match Rc::try_unwrap(link) {
                Ok(l) => return l.into_stream(),
                Err(l) => {
                    link = l;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    })
}

/// Reads into `buf[have..]`, growing it to hold `want` bytes; the number
/// of bytes read, 0 at the end.
async fn read_more(
    link: &Link,
    buf: &mut Vec<u8>,
    have: usize,
    want: usize,
    watch: &Watch,
) -> Result<usize, String> {
    if buf.len() < want {
        buf.resize(want, 0);
    }
    watch.reading_since.set(Some(Instant::now()));
    let (res, b) = link.read(std::mem::take(buf), have).await;
    watch.reading_since.set(None);
    *buf = b;
    res
}

/// One connection after TLS; `Err` says why it was closed for the peer's
/// fault (counted).
async fn connection(
    ing: &Rc<Ingest>,
    source: usize,
    link: &Rc<Link>,
    watch: &Watch,
) -> Result<(), String> {
    let plan = &ing.plan.sources[source];
    let native = plan
        .native
        .as_ref()
        .expect("an updraft source has its plan");
    let counters = &ing.metrics.sources[source];
    let max_frame = native.max_frame_bytes;
    let mut buf = vec![0u8; READ_BYTES];
    let mut have = 0usize;
    let greeted = async {
        loop {
            if let Some(h) = Hello::decode(&buf[..have])? {
                return Ok(h);
            }
            match read_more(link, &mut buf, have, READ_BYTES, watch).await? {
                0 => return Err("closed before its greeting".to_string()),
                n => have += n,
            }
        }
    };
    let hello = match tokio::time::timeout(GREETING_TIMEOUT, greeted).await {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => {
            counters.protocol_errors.add(1);
            return Err(why);
        }
        Err(_) => {
            counters.protocol_errors.add(1);
            return Err("no greeting within 10 s".into());
        }
    };
    let accepted = hello.version == wire::VERSION;
    let welcome = Welcome {
        version: wire::VERSION,
        accepted,
        window: WINDOW,
        max_frame,
    }
    .encode();
    let (res, _) = link.write(welcome.to_vec(), 0..wire::WELCOME_BYTES).await;
    if !accepted {
        counters.protocol_errors.add(1);
        return Err(format!(
            "the sender speaks version {} of the updraft protocol, this updraft speaks {}",
            hello.version,
            wire::VERSION
        ));
    }
    if res.is_err() {
        return Ok(());
    }
    buf.copy_within(wire::HELLO_BYTES..have, 0);
    have -= wire::HELLO_BYTES;
    let stream_key = (source, hello.sender, hello.stream);
    // Looked up again after a reload.
    let mut disk_sinks = ing.disk_sinks(source);
    let mut plan_seen = ing.plan.generation();
    let acks = Rc::new(Acks {
        pending: RefCell::new(VecDeque::new()),
        more: Notify::new(),
    });
    let _acker = AbortOnDrop(crate::io::spawn(acker(
        ing.clone(),
        link.clone(),
        acks.clone(),
        stream_key,
    )));
    // Archives that do not lie 16-byte aligned in `buf` are copied here.
    let mut aligned = rkyv::util::AlignedVec::<16>::new();
    let mut start = 0usize;
    loop {
        // Every whole message in the buffer; then how far the next reaches.
        let need = loop {
            let h = match wire::read_inbound(&buf[start..have], max_frame) {
                Err(why) => return bad(ing, source, link, why).await,
                Ok(None) => break start + wire::FRAME_HEADER_BYTES,
                Ok(Some(Inbound::Ping)) => {
                    start += wire::PING_BYTES;
                    continue;
                }
                Ok(Some(Inbound::Frame(h))) => h,
            };
            let bytes = h.message_bytes();
            if have - start < bytes {
                break start + bytes;
            }
            let at = start + wire::FRAME_HEADER_BYTES;
            let mut archive = &buf[at..at + h.len as usize];
            if !(archive.as_ptr() as usize).is_multiple_of(16) {
                aligned.clear();
                aligned.extend_from_slice(archive);
                archive = &aligned[..];
            }
            let batch = match wire::check_frame(&h, archive) {
                Ok(b) => b,
                Err(why) => return bad(ing, source, link, why).await,
            };
            counters.frames.add(1);
            counters.bytes.add(bytes as u64);
            let id = (h.segment, h.offset);
            let duplicate = taken_before(stream_key, id);
            if duplicate {
                counters.frames_duplicate.add(1);
            } else {
                take(ing, source, batch).await;
            }
            if plan_seen != ing.plan.generation() {
                plan_seen = ing.plan.generation();
                disk_sinks = ing.disk_sinks(source);
            }
            let marks = ing.marks(&disk_sinks);
            acks.pending.borrow_mut().push_back(Pending {
                seq: h.seq,
                id,
                duplicate,
                marks,
            });
            acks.more.notify_one();
            start += bytes;
        };
        // Keep the partial message; make room for (more of) the rest of
        // it: the buffer grows at most twice what came, so a header that
        // claims a long frame costs memory only as its bytes arrive.
        buf.copy_within(start..have, 0);
        have -= start;
        let want = (need - start).clamp(READ_BYTES, (2 * have).max(READ_BYTES));
        start = 0;
        if buf.len() > READ_BYTES * 2 && want <= READ_BYTES {
            buf.truncate(READ_BYTES); // after a long frame: back to the usual buffer
            buf.shrink_to_fit();
        }
        match read_more(link, &mut buf, have, want, watch).await {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    // The sender closed: acknowledge what can still be (it is gone if it
    // does not read them; it sends those frames again).
    let deadline = Instant::now() + Duration::from_secs(1);
    while !acks.pending.borrow().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A protocol error: the peer is told why, then disconnected and counted.
async fn bad(ing: &Ingest, source: usize, link: &Link, why: &'static str) -> Result<(), String> {
    ing.metrics.sources[source].protocol_errors.add(1);
    let e = wire::error(why);
    let n = e.len();
    let _ = tokio::time::timeout(Duration::from_secs(1), link.write(e, 0..n)).await;
    Err(why.to_string())
}

/// Offers a checked frame's records to the shard's sinks.
async fn take(ing: &Ingest, source: usize, batch: &crate::record::ArchivedBatch) {
    let plan = &ing.plan.sources[source];
    let counters = &ing.metrics.sources[source];
    let (p, m) = (batch.payload.as_slice(), batch.meta.as_slice());
    let mut at = 0usize;
    let mut records = 0u64;
    for e in batch.entries.iter() {
        let start = e.offset.to_native() as usize;
        let record = &p[start..start + e.len.to_native() as usize];
        let meta = crate::record::meta::slice(m, &mut at, e.meta_len.to_native());
        if record.len() > plan.max_record_bytes {
            counters.drop(DropReason::Oversize, 1);
            continue;
        }
        if let Some(reason) = ing.refuse(source, record) {
            counters.drop(reason, 1);
            continue;
        }
        ing.offer(source, ing.id, e.ts_ns.to_native(), 0, record, meta, 0)
            .await;
        records += 1;
    }
    counters.records.add(records);
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Writes the acknowledgements of one connection, in order, once each
/// frame's records are durable in every disk buffer the source feeds.
async fn acker(ing: Rc<Ingest>, link: Rc<Link>, acks: Rc<Acks>, stream: (usize, u64, u32)) {
    let mut out = Vec::new();
    loop {
        // Every acknowledgement that is due, in one write.
        let mut waiting = None;
        loop {
            let front = acks
                .pending
                .borrow()
                .front()
                .map(|p| ing.unsettled(&p.marks));
            match front {
                Some(None) => {
                    let p = acks.pending.borrow_mut().pop_front().expect("checked");
                    if !p.duplicate {
                        note_taken(stream, p.id);
                    }
                    out.extend_from_slice(&wire::ack(p.seq, p.duplicate));
                }
                Some(Some(w)) => {
                    waiting = Some(w);
                    break;
                }
                None => break,
            }
        }
        if !out.is_empty() {
            let n = out.len();
            let (res, b) = link.write(std::mem::take(&mut out), 0..n).await;
            out = b;
            out.clear();
            if res.is_err() {
                return; // the reader sees the connection end
            }
            continue;
        }
        match waiting {
            None => {
                let more = acks.more.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                if acks.pending.borrow().is_empty() {
                    more.await;
                }
            }
            Some(w) => ing.settle_wait(w).await,
        }
    }
}
