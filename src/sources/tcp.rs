//! `tcp` source: accept, read through io_uring, frame, offer.
//!
//! A connection starts with a small read buffer ([`IDLE_READ_BYTES`]) and
//! grows it to `max_record_bytes` plus [`READ_BYTES`] once it proves busy (a
//! read fills it, or a frame does not fit); after a run of small reads it
//! goes back to the small one. So a thousand idle connections cost a
//! thousand small buffers, not a thousand large ones. The connection reads
//! into the free tail, cuts records with the [`Decoder`] and offers each to
//! its shard; when the destination is full, the offer waits and so does the
//! next read: the sender feels TCP backpressure instead of the collector
//! buffering without bound.
//!
//! Bounds: `max_connections` over all shards; a connection that sends
//! nothing for `idle_timeout_ms` is closed (a sweeper shuts it down), and at
//! `max_connections` the connection idle longest (at least
//! [`EVICT_IDLE_MS`]) is closed to make room for a new one, so idle peers
//! alone cannot lock senders out. Bad input is counted; log lines about
//! connections (refused, bad input, closed) are rate-limited per source and
//! shard, naming the peer.

use crate::codec::{Decoded, Decoder, End};
use crate::config::{Decoding, WhenExceeded};
use crate::io::BoundedBuf;
use crate::io::{TcpListener, TcpStream};
use crate::logging::LogEvery;
use crate::metrics::{DropReason, SourceCounters};
use crate::pipeline::ingest::{Ingest, Routed};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bytes a busy connection reads at once, beyond room for one whole frame.
pub const READ_BYTES: usize = 64 * 1024;
/// The read buffer of a connection that is not (or no longer) busy.
pub const IDLE_READ_BYTES: usize = 4 * 1024;
/// Consecutive reads of at most [`IDLE_READ_BYTES`] after which a busy
/// connection gives its large buffer back.
const SMALL_READS_TO_SHRINK: u32 = 16;
/// At `max_connections`, a connection waiting this long for data may be
/// closed for a new one (`idle_timeout_ms`, if shorter, is used instead).
pub const EVICT_IDLE_MS: u64 = 1_000;

/// One open connection, as the sweeper and the accept loop see it.
pub struct Watch {
    fd: RawFd,
    /// When the read in flight began (`None` between reads: the connection
    /// is busy, or held back by a full sink, which is not the peer's doing).
    pub reading_since: Cell<Option<Instant>>,
    /// Why it was shut down from outside, if it was.
    closed_for: Cell<Option<Closed>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    Idle,
    Evicted,
}

impl Watch {
    /// Whether the connection was shut down from outside (idle, evicted).
    pub fn closed_from_outside(&self) -> bool {
        self.closed_for.get().is_some()
    }

    fn shut(&self, why: Closed) {
        self.closed_for.set(Some(why));
        // SAFETY: shutdown(2) on a socket its connection task keeps open
        // until it has removed this watch.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
    }
}

/// What one source's connections on one shard share.
pub struct Conns {
    open: RefCell<HashMap<u64, Rc<Watch>>>,
    next_key: Cell<u64>,
    log_refused: RefCell<LogEvery>,
    /// Rate-limits the log lines about a peer's bad input.
    pub log_input: RefCell<LogEvery>,
    log_closed: RefCell<LogEvery>,
    /// Connections that ended since the sweeper last looked.
    ended: Cell<u64>,
}

impl Conns {
    /// The connection that has waited longest for data, if it has waited at
    /// least `min`.
    fn longest_idle(&self, min: Duration) -> Option<Rc<Watch>> {
        let now = Instant::now();
        self.open
            .borrow()
            .values()
            .filter(|w| w.closed_for.get().is_none())
            .filter_map(|w| w.reading_since.get().map(|t| (t, w)))
            .filter(|(t, _)| now.duration_since(*t) >= min)
            .min_by_key(|(t, _)| *t)
            .map(|(_, w)| w.clone())
    }
}

/// Closes connections that have waited `idle_timeout_ms` for data, and
/// after connections ended, gives the memory they freed back to the system
/// (the allocator keeps freed pages of a thread until that thread asks it
/// to collect, and a shard may go quiet after a burst).
async fn sweep(conns: Rc<Conns>, idle_timeout: Duration) {
    let tick = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_collect = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if conns.ended.get() > 0 && last_collect.elapsed() >= Duration::from_secs(1) {
            conns.ended.set(0);
            last_collect = Instant::now();
            // SAFETY: mi_collect takes no pointers; it frees this thread's
            // unused pages (a no-op for memory another allocator holds).
            unsafe { libmimalloc_sys::mi_collect(true) };
        }
        let now = Instant::now();
        for w in conns.open.borrow().values() {
            let idle = w
                .reading_since
                .get()
                .is_some_and(|t| now.duration_since(t) >= idle_timeout);
            if idle && w.closed_for.get().is_none() {
                w.shut(Closed::Idle);
            }
        }
    }
}

/// Serves one accepted connection until it ends; gives the socket back
/// (the accept loop closes it once the connection's watch is gone).
pub type Serve = fn(
    Rc<Ingest>,
    usize,
    TcpStream,
    SocketAddr,
    Rc<Watch>,
    Rc<Conns>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TcpStream>>>;

/// A tcp source's connection ([`Serve`]).
pub fn serve(
    shard: Rc<Ingest>,
    source: usize,
    stream: TcpStream,
    peer: SocketAddr,
    watch: Rc<Watch>,
    conns: Rc<Conns>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = TcpStream>>> {
    Box::pin(async move {
        connection(&shard, source, &stream, peer, &watch, &conns).await;
        stream
    })
}

/// Accepts a stream source's connections (tcp, updraft) within its
/// bounds, and serves each with `serve`.
pub async fn accept_loop(shard: Rc<Ingest>, source: usize, listener: TcpListener, serve: Serve) {
    let plan = &shard.plan.sources[source];
    let counters = &shard.metrics.sources[source];
    let fd_key = shard.watch_fd(source, listener.as_raw_fd());
    let conns = Rc::new(Conns {
        open: RefCell::new(HashMap::new()),
        next_key: Cell::new(0),
        log_refused: RefCell::new(LogEvery::ten_seconds()),
        log_input: RefCell::new(LogEvery::ten_seconds()),
        log_closed: RefCell::new(LogEvery::ten_seconds()),
        ended: Cell::new(0),
    });
    let idle_timeout = Duration::from_millis(plan.idle_timeout_ms);
    let evict_after = idle_timeout.min(Duration::from_millis(EVICT_IDLE_MS));
    let sweeper = crate::io::spawn(sweep(conns.clone(), idle_timeout));
    let mut log_accept = LogEvery::ten_seconds();
    loop {
        let accepted = listener.accept().await;
        if shard.source_stopping(source) {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: wait a little rather than spin.
                if let Some(held) = log_accept.ready() {
                    tracing::warn!(source = %plan.name, error = %e, suppressed = held, "accept failed");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let open = &shard.connections[source];
        if open.fetch_add(1, Ordering::AcqRel) >= plan.max_connections {
            if let Some(w) = conns.longest_idle(evict_after) {
                // Room for the newcomer: the idle one goes (its task ends
                // and gives its slot back; until then one over the cap).
                w.shut(Closed::Evicted);
            } else {
                open.fetch_sub(1, Ordering::AcqRel);
                counters.connections_rejected.add(1);
                if let Some(held) = conns.log_refused.borrow_mut().ready() {
                    tracing::warn!(source = %plan.name, %peer, max_connections = plan.max_connections,
                        suppressed = held, "connection refused: max_connections reached and no connection is idle");
                }
                drop(stream);
                continue;
            }
        }
        counters.connections_accepted.add(1);
        counters.connections_open.add(1);
        let key = conns.next_key.get();
        conns.next_key.set(key + 1);
        let watch = Rc::new(Watch {
            fd: stream.as_raw_fd(),
            reading_since: Cell::new(None),
            closed_for: Cell::new(None),
        });
        conns.open.borrow_mut().insert(key, watch.clone());
        let s = shard.clone();
        let c = conns.clone();
        shard.spawn_source(async move {
            let counters = &s.metrics.sources[source];
            let stream = serve(s.clone(), source, stream, peer, watch.clone(), c.clone()).await;
            c.open.borrow_mut().remove(&key);
            match watch.closed_for.get() {
                Some(Closed::Idle) => counters.connections_idle_closed.add(1),
                Some(Closed::Evicted) => counters.connections_evicted.add(1),
                None => {}
            }
            if let Some(why) = watch.closed_for.get() {
                if let Some(held) = c.log_closed.borrow_mut().ready() {
                    let s_plan = &s.plan.sources[source];
                    match why {
                        Closed::Idle => tracing::info!(source = %s_plan.name, %peer,
                            idle_timeout_ms = s_plan.idle_timeout_ms, suppressed = held,
                            "connection closed: it sent nothing for idle_timeout_ms"),
                        Closed::Evicted => {
                            tracing::info!(source = %s_plan.name, %peer, suppressed = held,
                            "idle connection closed to make room at max_connections")
                        }
                    }
                }
            }
            // The watch is gone before the socket closes (fds are reused).
            drop(stream);
            c.ended.set(c.ended.get() + 1);
            s.connections[source].fetch_sub(1, Ordering::AcqRel);
            counters.connections_open.add(-1);
        });
    }
    sweeper.abort();
    shard.unwatch_fd(fd_key);
}

/// What one connection dropped since the last read.
#[derive(Default)]
struct Dropped {
    oversize: u64,
    invalid_utf8: u64,
    empty: u64,
}

impl Dropped {
    /// Moves the counts into the shard's counters (once per read).
    fn flush(&mut self, counters: &SourceCounters) {
        counters.drop(DropReason::Oversize, std::mem::take(&mut self.oversize));
        counters.drop(
            DropReason::InvalidUtf8,
            std::mem::take(&mut self.invalid_utf8),
        );
        counters.drop(DropReason::Empty, std::mem::take(&mut self.empty));
    }
}

async fn connection(
    shard: &Rc<Ingest>,
    source: usize,
    stream: &TcpStream,
    peer: SocketAddr,
    watch: &Watch,
    conns: &Conns,
) {
    let plan = &shard.plan.sources[source];
    let counters = &shard.metrics.sources[source];
    let fd_key = shard.watch_fd(source, stream.as_raw_fd());
    let mut decoder = Decoder::new(plan.framing, plan.max_record_bytes);
    let busy_capacity = decoder.frame_bytes_max() + READ_BYTES;
    let mut capacity = IDLE_READ_BYTES.min(busy_capacity);
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    let mut small_reads = 0u32;
    let (key, dest) = shard.owner(source, &peer);
    let mut dropped = Dropped::default();
    let mut start = 0usize;
    let mut close_reason: Option<String> = None;
    let mut records = 0u64;
    // A record's meta (its field index), reused.
    let mut meta: Vec<u8> = Vec::new();
    // The first bad record of each kind is logged (rate-limited per source).
    let mut logged_bad = false;
    let mut log_bad = |what: &str, offset: usize| {
        if !logged_bad {
            logged_bad = true;
            if let Some(held) = conns.log_input.borrow_mut().ready() {
                tracing::warn!(source = %plan.name, %peer, offset, suppressed = held, "{what}");
            }
        }
    };

    'read: loop {
        if start > 0 {
            buf.copy_within(start.., 0);
            buf.truncate(buf.len() - start);
            start = 0;
        }
        if buf.len() == capacity && capacity < busy_capacity {
            // A frame longer than the small buffer: room for a whole one.
            capacity = busy_capacity;
            buf.reserve_exact(capacity - buf.len());
        }
        let filled = buf.len();
        watch.reading_since.set(Some(Instant::now()));
        let (res, slice) = stream.read(buf.slice(filled..capacity)).await;
        watch.reading_since.set(None);
        buf = slice.into_inner();
        let n = match res {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                if watch.closed_for.get().is_none() {
                    close_reason = Some(format!("read error: {e}"));
                }
                break;
            }
        };
        // Busy (the read filled the room): read in large pieces. Trickling
        // again for a while: give the large buffer back.
        if capacity < busy_capacity && filled + n == capacity {
            capacity = busy_capacity;
            buf.reserve_exact(capacity - buf.len());
            small_reads = 0;
        } else if capacity == busy_capacity && n <= IDLE_READ_BYTES {
            small_reads += 1;
        } else {
            small_reads = 0;
        }
        counters.bytes.add(n as u64);
        let ts = shard.now_ns();
        loop {
            match decoder.decode(&buf[start..]) {
                Decoded::Record { record, consumed } => {
                    let from = start;
                    start += consumed;
                    match shard.refuse(source, record) {
                        None => {}
                        Some(DropReason::Empty) => {
                            dropped.empty += 1;
                            continue;
                        }
                        Some(DropReason::InvalidUtf8) => {
                            log_bad("record is not valid UTF-8; dropped (set utf8 = \"pass\" for binary records)", from);
                            dropped.invalid_utf8 += 1;
                            continue;
                        }
                        Some(reason) => {
                            counters.drop(reason, 1);
                            continue;
                        }
                    }
                    if let Some(rl) = plan.rate_limit {
                        if !shard.rate_admit(source) {
                            if rl.when_exceeded == WhenExceeded::Drop {
                                counters.drop(DropReason::RateLimit, 1);
                                log_bad("over the source's rate_limit: records are dropped (counted as rate_limit)", from);
                                continue;
                            }
                            shard.rate_wait(source).await;
                        }
                    }
                    meta.clear();
                    let ((key, dest), skip) = match plan.decoding {
                        Decoding::Raw => ((key, dest), 0),
                        _ => match shard.route(source, record, ts, (key, dest), &mut meta) {
                            Routed::To(r, None, skip) => (r, skip),
                            Routed::To(r, Some(why), skip) => {
                                log_bad(why, from);
                                (r, skip)
                            }
                            Routed::Dropped(why) => {
                                log_bad(why, from);
                                continue;
                            }
                        },
                    };
                    records += 1;
                    shard
                        .offer(source, dest, ts, key, record, &meta, skip)
                        .await;
                }
                Decoded::NeedMore { consumed } => {
                    start += consumed;
                    break;
                }
                Decoded::Oversize { consumed, fatal } => {
                    log_bad("record longer than max_record_bytes; dropped", start);
                    start += consumed;
                    dropped.oversize += 1;
                    if fatal {
                        close_reason = Some("a frame longer than max_record_bytes".into());
                        break 'read;
                    }
                }
                Decoded::Invalid { reason } => {
                    counters.drop(DropReason::Framing, 1);
                    close_reason = Some(format!("framing lost: {reason}"));
                    break 'read;
                }
            }
        }
        counters.records.add(std::mem::take(&mut records));
        dropped.flush(counters);
        if small_reads >= SMALL_READS_TO_SHRINK && start == buf.len() {
            // Nothing pending: a small buffer again.
            capacity = IDLE_READ_BYTES.min(busy_capacity);
            buf = Vec::with_capacity(capacity);
            start = 0;
            small_reads = 0;
        }
    }
    if close_reason.is_none() {
        match decoder.finish(&buf[start..]) {
            End::Clean => {}
            End::Truncated => {
                counters.drop(DropReason::Truncated, 1);
                log_bad(
                    "the connection ended inside a frame; its bytes are dropped (counted as truncated)",
                    start,
                );
            }
            End::Record(record) => match shard.refuse(source, record) {
                None => {
                    let ts = shard.now_ns();
                    meta.clear();
                    if let Routed::To((key, dest), _, skip) =
                        shard.route(source, record, ts, (key, dest), &mut meta)
                    {
                        shard
                            .offer(source, dest, ts, key, record, &meta, skip)
                            .await;
                        records += 1;
                    }
                }
                Some(DropReason::InvalidUtf8) => {
                    log_bad("record is not valid UTF-8; dropped (set utf8 = \"pass\" for binary records)", start);
                    counters.drop(DropReason::InvalidUtf8, 1);
                }
                Some(reason) => counters.drop(reason, 1),
            },
        }
    }
    counters.records.add(records);
    dropped.flush(counters);
    shard.unwatch_fd(fd_key);
    if let Some(reason) = close_reason {
        if let Some(held) = conns.log_closed.borrow_mut().ready() {
            tracing::warn!(source = %plan.name, %peer, suppressed = held, "closing connection: {reason}");
        }
    }
}
