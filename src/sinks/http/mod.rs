//! `http`: batches POSTed to an ingest endpoint, several in flight.
//!
//! Per sink and shard an [`HttpOutput`] takes one batch at a time from the
//! buffer (memory queue or write-ahead log): it waits for a permit of the
//! concurrency limit (adaptive or fixed), encodes and compresses the batch
//! into a pooled body buffer (the batch's own buffers are free again at
//! once), writes the request head in front of the body, and starts a request
//! task. The task sends on a pooled keep-alive [`conn::Connection`] and
//! classifies the answer:
//!
//! - 2xx: delivered: counted, acknowledged to the write-ahead log;
//! - 408, 429, 5xx, a timeout (`request.timeout_ms`), a connection or TLS
//!   error: sent again after a backoff with full jitter (at least the
//!   `Retry-After` of a 429/503), for as long as it takes;
//! - any other status: refused for good: the request body and a note with
//!   the status and the first bytes of the answer go to the dead-letter
//!   directory `data_dir/dlq/<sink>/`, counted, and the batch is
//!   acknowledged so it does not hold up the log.
//!
//! Acknowledgements arrive in completion order; the log's checkpoint moves
//! over the contiguous prefix. Each request carries the batch's stable id
//! in `idempotency_header` (sink, shard, segment, offset on a disk buffer),
//! the same on every retry and after a replay.
//!
//! Memory: at most `limit` bodies (plus one being encoded) per sink and
//! shard, and one connection per request in flight. Nothing is allocated per
//! record; a body buffer grows only past its largest size so far.

pub mod config;
pub mod conn;
pub mod encode;
pub mod proto;

use self::conn::{ConnError, Connection};
use self::encode::Encoder;
use self::proto::{parse_response, RequestHead};
use super::util::dead_letter::{DeadLetters, Letter};
use super::util::Backoff;
use self::config::{Concurrency, HttpTarget};
use super::{Kind, PlanCx};
use crate::config::ConfigError;
use crate::pipeline::Deliver;
use crate::record::meta::Field;
use crate::limiter::{AdaptiveLimit, Outcome};
use crate::logging::LogEvery;
use crate::metrics::SinkCounters;
use crate::pipeline::BatchId;
use crate::pipeline::SinkCtx;
use crate::record::BatchView;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Bytes of a refused answer kept in the dead-letter note.
const DLQ_EXCERPT_BYTES: usize = 512;

/// Bytes of an idempotency key: a sink name (at most
/// `config::SINK_NAME_BYTES_MAX`) and four numbers fit.
const KEY_BYTES_MAX: usize = 128;
const _: () = assert!(crate::config::SINK_NAME_BYTES_MAX + 4 * 21 <= KEY_BYTES_MAX);

/// Acknowledges a delivered (or dead-lettered) batch to the buffer.
pub use crate::pipeline::Ack;

enum Limit {
    Fixed(u32),
    Adaptive(AdaptiveLimit),
}

impl Limit {
    fn permits(&self) -> u32 {
        match self {
            Limit::Fixed(n) => *n,
            Limit::Adaptive(a) => a.permits(),
        }
    }
}

/// One destination's share of a batch split by destination.
struct Group<'a> {
    /// Each record's group.
    of: &'a [u16],
    index: u16,
    /// The rendered path and header block.
    dest: (&'a [u8], &'a [u8]),
    pending: Rc<Cell<u32>>,
}

/// A batch's records grouped by the destination they render (reused from
/// batch to batch: after the first batches it allocates nothing).
#[derive(Default)]
pub struct Split {
    /// Each record's group; `u16::MAX`: dropped.
    of: Vec<u16>,
    /// The groups' rendered destinations, back to back.
    keys: Vec<u8>,
    /// Per group: (start, path length, end) in `keys`.
    dests: Vec<(usize, usize, usize)>,
    /// A destination's hash to its group (the bytes are compared too).
    index: std::collections::HashMap<u64, u16>,
    scratch: Vec<u8>,
}

/// Most destinations one batch is split into (more than a batch holds
/// records; past it a record would be dropped and counted).
const GROUPS_MAX: usize = u16::MAX as usize - 1;

impl Split {
    /// Groups `batch`'s records by their rendered destination; returns how
    /// many were dropped (a header value with a line break or NUL).
    fn group(&mut self, batch: BatchView<'_>, t: &HttpTarget) -> u64 {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        self.of.clear();
        self.keys.clear();
        self.dests.clear();
        self.index.clear();
        let mut dropped = 0u64;
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        batch.for_each(|_, _, record, meta| {
            let d = &mut self.scratch;
            d.clear();
            match &t.path_template {
                Some(p) => p.render_with(record, meta, d, percent_encode),
                None => d.extend_from_slice(t.path.as_bytes()),
            }
            let path_len = d.len();
            let mut bad = false;
            for (name, v) in &t.header_templates {
                d.extend_from_slice(b"\r\n");
                d.extend_from_slice(name.as_bytes());
                d.extend_from_slice(b": ");
                let at = d.len();
                v.render(record, meta, d);
                bad |= d[at..].iter().any(|&b| matches!(b, b'\r' | b'\n' | 0));
            }
            if bad {
                self.of.push(u16::MAX);
                dropped += 1;
                return;
            }
            let h = hasher.hash_one(&d[..]);
            let keys = &self.keys;
            let same = |&(s, _, e): &(usize, usize, usize)| keys[s..e] == d[..];
            let found = match self.index.get(&h) {
                Some(&g) if same(&self.dests[g as usize]) => Some(g),
                // A hash shared by two destinations: look them all up.
                Some(_) => self.dests.iter().position(same).map(|g| g as u16),
                None => None,
            };
            let g = match found {
                Some(g) => g,
                None if self.dests.len() < GROUPS_MAX => {
                    let g = self.dests.len() as u16;
                    let start = self.keys.len();
                    self.keys.extend_from_slice(d);
                    self.dests.push((start, path_len, self.keys.len()));
                    self.index.entry(h).or_insert(g);
                    g
                }
                None => {
                    self.of.push(u16::MAX);
                    dropped += 1;
                    return;
                }
            };
            self.of.push(g);
        });
        dropped
    }
}

/// Appends a field's value to a path, percent-encoded (all but RFC 3986's
/// unreserved characters), so a value cannot add a path segment or a query.
fn percent_encode(v: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in v {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
    }
}

impl Meta {
    /// The request is done with (delivered or dead-lettered): the batch is
    /// acknowledged, once all its requests are.
    fn settled(&self, inner: &Inner) {
        if let Some(p) = &self.pending {
            p.set(p.get() - 1);
            if p.get() > 0 {
                return;
            }
        }
        if let Some(ack) = &inner.ack {
            ack(self.id);
        }
    }
}

/// What a request task needs to know of its batch.
struct Meta {
    id: BatchId,
    /// Bytes left in front of the body for the head.
    room: usize,
    /// A batch split by destination: its requests not yet settled (the
    /// batch is acknowledged when the last one is).
    pending: Option<Rc<Cell<u32>>>,
    records: usize,
    payload_bytes: usize,
    key: [u8; KEY_BYTES_MAX],
    key_len: usize,
}

struct Inner {
    shard: Rc<SinkCtx>,
    sink: usize,
    target: HttpTarget,
    head: RequestHead,
    /// A batch split by destination (reused).
    split: RefCell<Split>,
    limit: RefCell<Limit>,
    in_flight: Cell<u32>,
    /// A request finished: a permit may be free.
    finished: Notify,
    /// No new request before this (a `Retry-After`).
    hold_until: Cell<Option<Instant>>,
    idle: RefCell<Vec<Connection>>,
    bodies: RefCell<Vec<Vec<u8>>>,
    encoder: RefCell<Encoder>,
    ack: Option<Ack>,
    log: RefCell<LogEvery>,
    started: Instant,
    dead: DeadLetters,
    down_since: Cell<Option<Instant>>,
}

pub struct Sink;

impl Kind for Sink {
    const NAME: &'static str = "http";
    type Config = config::Config;
    type Target = Box<HttpTarget>;
    type Output = HttpOutput;

    fn plan(c: config::Config, cx: &PlanCx<'_>) -> Result<Box<HttpTarget>, ConfigError> {
        config::plan(cx.name, &c).map(Box::new)
    }

    fn output(
        cx: &Rc<SinkCtx>,
        sink: usize,
        t: &Box<HttpTarget>,
        ack: Option<Ack>,
    ) -> HttpOutput {
        HttpOutput::new(cx, sink, (**t).clone(), ack)
    }

    /// Dead letters go under `data_dir/dlq/<sink>`.
    fn uses_data_dir(_t: &Box<HttpTarget>) -> bool {
        true
    }

    fn encodes_fields(t: &Box<HttpTarget>) -> bool {
        t.encoding != config::Encoding::Raw
    }

    fn fields(t: &Box<HttpTarget>) -> Vec<(&'static str, Field)> {
        let mut out: Vec<(&'static str, Field)> = Vec::new();
        for f in t.path_template.iter().flat_map(|p| p.fields()) {
            out.push(("uri", f));
        }
        for (_, h) in &t.header_templates {
            for f in h.fields() {
                out.push(("headers", f));
            }
        }
        out
    }
}

impl Deliver for HttpOutput {
    fn takes_batches(&self) -> bool {
        true
    }

    async fn deliver<B: crate::io::Buf>(
        &mut self,
        _cx: &SinkCtx,
        _buf: B,
        _give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        unreachable!("an http output takes batches through submit")
    }

    /// Starts sending `batch`: waits for a permit, encodes it, and returns
    /// once the request is under way (the batch's buffers are free again).
    async fn submit(&mut self, batch: BatchView<'_>, id: BatchId) {
        self.start_request(batch, id).await
    }

    /// Waits for the requests in flight, at most half the shutdown timeout.
    async fn close(&mut self, cx: &SinkCtx) {
        self.drain(Duration::from_millis(cx.plan.shutdown_timeout_ms / 2))
            .await
    }
}

/// A sink's requests on one shard.
pub struct HttpOutput {
    inner: Rc<Inner>,
}

impl HttpOutput {
    pub fn new(
        shard: &Rc<SinkCtx>,
        sink: usize,
        target: HttpTarget,
        ack: Option<Ack>,
    ) -> HttpOutput {
        let limit = match target.concurrency {
            Concurrency::Fixed(n) => Limit::Fixed(n),
            Concurrency::Adaptive(p) => Limit::Adaptive(AdaptiveLimit::new(p, 0)),
        };
        let sources = shard.plan.sources.iter().map(|s| s.name.clone()).collect();
        let encoder = Encoder::new(target.encoding, target.compression, sources);
        let head = RequestHead::new(&target, &encoder);
        shard.metrics.sinks[sink]
            .concurrency_limit
            .set(i64::from(limit.permits()));
        HttpOutput {
            inner: Rc::new(Inner {
                shard: shard.clone(),
                sink,
                split: RefCell::new(Split::default()),
                head,
                target,
                limit: RefCell::new(limit),
                in_flight: Cell::new(0),
                finished: Notify::new(),
                hold_until: Cell::new(None),
                idle: RefCell::new(Vec::new()),
                bodies: RefCell::new(Vec::new()),
                encoder: RefCell::new(encoder),
                ack,
                log: RefCell::new(LogEvery::new(Duration::from_secs(10))),
                started: Instant::now(),
                dead: DeadLetters::new(shard, sink),
                down_since: Cell::new(None),
            }),
        }
    }

    /// Starts sending `batch`: waits for a permit, encodes it, and returns
    /// once the request is under way (the batch's buffers are free again).
    /// A sink whose uri or headers name fields sends one request per
    /// destination its records render, in the order each first appears.
    async fn start_request(&mut self, batch: BatchView<'_>, id: BatchId) {
        let t = &self.inner.target;
        if t.path_template.is_none() && t.header_templates.is_empty() {
            return self.request_for(batch, id, None).await;
        }
        let mut split = std::mem::take(&mut *self.inner.split.borrow_mut());
        let dropped = split.group(batch, t);
        if dropped > 0 {
            self.inner.counters().encode_dropped.add(dropped);
            if let Some(held) = self.inner.log.borrow_mut().ready() {
                tracing::warn!(sink = %self.inner.name(), shard = self.inner.shard.id, records = dropped, suppressed = held,
                    "records whose header value renders with a line break or NUL were dropped (counted in updraft_sink_encode_dropped_records_total)");
            }
        }
        let groups = split.dests.len();
        if groups == 0 {
            if let Some(ack) = &self.inner.ack {
                ack(id);
            }
        } else {
            let pending = Rc::new(Cell::new(groups as u32));
            for g in 0..groups {
                let (start, path_len, end) = split.dests[g];
                let dest = &split.keys[start..end];
                let group = Group {
                    of: &split.of,
                    index: g as u16,
                    dest: dest.split_at(path_len),
                    pending: pending.clone(),
                };
                self.request_for(batch, id, Some(group)).await;
            }
        }
        *self.inner.split.borrow_mut() = split;
    }

    /// One request: all of `batch`, or one destination's records of it.
    async fn request_for(
        &mut self,
        batch: BatchView<'_>,
        id: BatchId,
        group: Option<Group<'_>>,
    ) {
        let inner = &self.inner;
        loop {
            if let Some(t) = inner.hold_until.get() {
                if Instant::now() < t {
                    tokio::time::sleep_until(t.into()).await;
                    continue;
                }
                inner.hold_until.set(None);
            }
            if inner.in_flight.get() < inner.limit.borrow().permits() {
                break;
            }
            inner.finished.notified().await;
        }
        let counters = inner.counters();
        let mut body = inner.bodies.borrow_mut().pop().unwrap_or_default();
        body.clear();
        let dest = group.as_ref().map(|g| g.dest);
        let room = inner.head.room(dest.map_or(0, |(p, h)| p.len() + h.len()));
        body.resize(room, 0);
        let only = group.as_ref().map(|g| (g.of, g.index));
        let done = {
            let mut encoder = inner.encoder.borrow_mut();
            let sources = &inner.shard.plan.sources;
            if encoder.sources() != sources.len() {
                // A reload added sources: their names label their records.
                encoder.set_sources(sources.iter().map(|s| s.name.clone()).collect());
            }
            encoder.encode_some(batch, &mut body, only)
        };
        let pending = group.map(|g| g.pending);
        if done.dropped > 0 {
            counters.encode_dropped.add(done.dropped as u64);
            if let Some(held) = inner.log.borrow_mut().ready() {
                tracing::warn!(sink = %inner.name(), shard = inner.shard.id, records = done.dropped, suppressed = held,
                    "records the encoding cannot express were dropped (counted in updraft_sink_encode_dropped_records_total)");
            }
        }
        let mut meta = Meta {
            id,
            room,
            pending,
            records: done.records,
            payload_bytes: if only.is_some() {
                done.plain_bytes
            } else {
                batch.payload().len()
            },
            key: [0; KEY_BYTES_MAX],
            key_len: 0,
        };
        if done.records == 0 {
            inner.bodies.borrow_mut().push(body);
            meta.settled(inner);
            return;
        }
        if inner.target.idempotency_header.is_some() {
            use std::io::Write;
            let mut w = &mut meta.key[..];
            let _ = write!(
                w,
                "{}-{}-{}-{}",
                inner.name(),
                inner.shard.id,
                id.segment,
                id.offset
            );
            if let Some((_, g)) = only {
                let _ = write!(w, "-{g}");
            }
            meta.key_len = KEY_BYTES_MAX - w.len();
        }
        let key = (meta.key_len > 0).then(|| &meta.key[..meta.key_len]);
        let start = inner.head.write(&mut body, room, key, dest);
        let in_flight = inner.in_flight.get();
        if let Limit::Adaptive(a) = &mut *inner.limit.borrow_mut() {
            a.on_start(in_flight);
        }
        inner.in_flight.set(in_flight + 1);
        counters.in_flight.set(i64::from(in_flight + 1));
        crate::io::spawn(request(inner.clone(), body, start, meta));
    }

    /// Waits for the requests in flight, at most `give_up`; what is still
    /// in flight then stays unacknowledged (a disk buffer replays it).
    async fn drain(&mut self, give_up: Duration) {
        let inner = &self.inner;
        let deadline = Instant::now() + give_up;
        while inner.in_flight.get() > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero()
                || tokio::time::timeout(left, inner.finished.notified())
                    .await
                    .is_err()
            {
                tracing::warn!(sink = %inner.name(), shard = inner.shard.id, in_flight = inner.in_flight.get(),
                    "requests still in flight at shutdown are abandoned (a disk buffer sends them again at the next start)");
                break;
            }
        }
        inner.idle.borrow_mut().clear();
        inner.counters().connected.set(0);
    }
}

impl Inner {
    fn name(&self) -> &str {
        &self.shard.plan.sinks[self.sink].name
    }

    fn counters(&self) -> &SinkCounters {
        &self.shard.metrics.sinks[self.sink]
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn limiter_done(&self, outcome: Outcome, rtt: Duration) {
        let mut l = self.limit.borrow_mut();
        if let Limit::Adaptive(a) = &mut *l {
            a.on_done(outcome, rtt.as_nanos() as u64, self.now_ns());
        }
        self.counters()
            .concurrency_limit
            .set(i64::from(l.permits()));
    }
}

/// How one attempt ended.
enum Attempt {
    Answered {
        status: u16,
        retry_after_ms: Option<u64>,
        excerpt: Vec<u8>,
    },
    Failed(ConnError),
    Malformed(String),
    TimedOut,
}

/// Sends one request until it is delivered or refused for good.
async fn request(inner: Rc<Inner>, mut body: Vec<u8>, start: usize, meta: Meta) {
    let counters = inner.counters();
    let mut backoff = Backoff::new(inner.shard.plan.sinks[inner.sink].retry);
    let timeout = Duration::from_millis(inner.target.timeout_ms);
    let mut response = Vec::new();
    loop {
        // The rate limit's wait is not part of the request's time.
        inner.shard.rate_take(inner.sink, body.len() - start).await;
        let t0 = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let attempt = attempt(&inner, &mut body, start, &mut response, deadline).await;
        let rtt = t0.elapsed();
        debug_assert!(body.len() > start, "the body comes back from every attempt");
        let mut wait_at_least = None;
        let why: String = match attempt {
            Attempt::Answered { status, .. } if (200..300).contains(&status) => {
                inner.limiter_done(Outcome::Answered, rtt);
                counters.responses_2xx.add(1);
                counters.records.add(meta.records as u64);
                counters.bytes.add(meta.payload_bytes as u64);
                counters.body_bytes.add((body.len() - meta.room) as u64);
                counters.batches.add(1);
                counters.retry_backoff_ms.set(0);
                if let Some(t) = inner.down_since.take() {
                    tracing::info!(sink = %inner.name(), shard = inner.shard.id, peer = %inner.target.address,
                        down_ms = t.elapsed().as_millis() as u64, "the endpoint takes batches again");
                }
                meta.settled(&inner);
                break;
            }
            Attempt::Answered {
                status,
                retry_after_ms,
                ..
            } if status == 429 || status == 503 || status == 408 => {
                inner.limiter_done(Outcome::PushBack, rtt);
                counters.responses_throttled.add(1);
                if let Some(ms) = retry_after_ms {
                    let until = Instant::now() + Duration::from_millis(ms);
                    if inner.hold_until.get().is_none_or(|h| h < until) {
                        inner.hold_until.set(Some(until));
                    }
                    wait_at_least = Some(Duration::from_millis(ms));
                }
                format!("the endpoint pushes back: status {status}")
            }
            Attempt::Answered { status, .. } if (500..600).contains(&status) => {
                inner.limiter_done(Outcome::Answered, rtt);
                counters.responses_5xx.add(1);
                format!("status {status}")
            }
            Attempt::Answered {
                status, excerpt, ..
            } => {
                inner.limiter_done(Outcome::Answered, rtt);
                counters.responses_4xx.add(1);
                dead_letter(&inner, &body, &meta, status, &excerpt).await;
                meta.settled(&inner);
                break;
            }
            Attempt::Failed(e) => {
                inner.limiter_done(Outcome::PushBack, rtt);
                counters.send_errors.add(1);
                let hint = if matches!(e, ConnError::Tls(_)) {
                    " (check tls.ca_file and that the uri's host matches the certificate)"
                } else {
                    ""
                };
                format!("{e}{hint}")
            }
            Attempt::Malformed(m) => {
                inner.limiter_done(Outcome::PushBack, rtt);
                counters.send_errors.add(1);
                m
            }
            Attempt::TimedOut => {
                inner.limiter_done(Outcome::PushBack, rtt);
                counters.timeouts.add(1);
                format!(
                    "no answer within request.timeout_ms = {}",
                    inner.target.timeout_ms
                )
            }
        };
        if inner.down_since.get().is_none() {
            inner.down_since.set(Some(Instant::now()));
        }
        let mut delay = backoff.next_delay();
        if let Some(min) = wait_at_least {
            delay = delay.max(min);
        }
        counters.retry_backoff_ms.set(delay.as_millis() as i64);
        if let Some(held) = inner.log.borrow_mut().ready() {
            tracing::warn!(sink = %inner.name(), shard = inner.shard.id, uri = %inner.target.uri, error = %why,
                suppressed = held, retry_in_ms = delay.as_millis() as u64, "request failed; the batch will be sent again");
        }
        tokio::time::sleep(delay).await;
        counters.retries.add(1);
    }
    let left = inner.in_flight.get() - 1;
    inner.in_flight.set(left);
    counters.in_flight.set(i64::from(left));
    let mut bodies = inner.bodies.borrow_mut();
    if bodies.len() < 4 {
        bodies.push(body);
    }
    drop(bodies);
    inner.finished.notify_waiters();
}

/// One try: a connection (pooled or new), the request, the answer. A pooled
/// connection the endpoint closed while it sat idle (keep-alive timeouts)
/// fails before any answer; that try is repeated at once on a new
/// connection rather than counted as a failure.
///
/// `deadline` bounds the whole try. The body is lent to the socket while it
/// is written, so that write is never dropped half-way: at the deadline the
/// socket is shut down, the write ends with an error and the body comes back.
async fn attempt(
    inner: &Inner,
    body: &mut Vec<u8>,
    start: usize,
    response: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Attempt {
    loop {
        let pooled = inner.idle.borrow_mut().pop();
        let reused = pooled.is_some();
        let conn = match pooled {
            Some(c) => c,
            None => {
                match tokio::time::timeout_at(deadline, Connection::open(&inner.target)).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => return Attempt::Failed(e),
                    Err(_) => return Attempt::TimedOut,
                }
            }
        };
        inner.counters().connected.set(1);
        match exchange(inner, conn, body, start, response, deadline).await {
            Attempt::Failed(_) if reused && response.is_empty() => continue,
            a => return a,
        }
    }
}

/// Sends the request on `conn` and reads the answer; keeps the connection
/// for the next request when the answer allows.
async fn exchange(
    inner: &Inner,
    mut conn: Connection,
    body: &mut Vec<u8>,
    start: usize,
    response: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> Attempt {
    response.clear();
    let end = body.len();
    let fd = conn.abort_handle();
    let mut timed_out = false;
    let (res, b) = {
        let send = conn.send(std::mem::take(body), start..end);
        tokio::pin!(send);
        tokio::select! {
            r = &mut send => r,
            _ = tokio::time::sleep_until(deadline) => {
                timed_out = true;
                // SAFETY: shutdown(2) on the connection's own open socket;
                // the pending write then fails and hands the body back.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                send.await
            }
        }
    };
    *body = b;
    if timed_out {
        return Attempt::TimedOut;
    }
    if let Err(e) = res {
        return Attempt::Failed(e);
    }
    loop {
        // On a timeout here the connection is dropped; nothing of ours is
        // in flight on it but its own read buffer.
        let n = match tokio::time::timeout_at(deadline, conn.read(response)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Attempt::Failed(e),
            Err(_) => return Attempt::TimedOut,
        };
        if n == 0 && response.is_empty() {
            return Attempt::Failed(ConnError::Closed);
        }
        match parse_response(response, n == 0) {
            Ok(Some(r)) => {
                let excerpt_end = r
                    .body
                    .end
                    .min(r.body.start.saturating_add(DLQ_EXCERPT_BYTES));
                let excerpt = response
                    .get(r.body.start..excerpt_end)
                    .unwrap_or_default()
                    .to_vec();
                if !r.close {
                    let mut idle = inner.idle.borrow_mut();
                    if idle.len() < 64 {
                        idle.push(conn);
                    }
                }
                return Attempt::Answered {
                    status: r.status,
                    retry_after_ms: r.retry_after_ms,
                    excerpt,
                };
            }
            Ok(None) if n == 0 => return Attempt::Failed(ConnError::Closed),
            Ok(None) => continue,
            Err(e) => return Attempt::Malformed(e.to_string()),
        }
    }
}

/// Keeps a refused batch as a dead letter: the request body as it was sent
/// (replayable with curl) and a note with the status and the first bytes
/// of the answer.
async fn dead_letter(inner: &Inner, body: &[u8], meta: &Meta, status: u16, excerpt: &[u8]) {
    let note = serde_json::json!({
        "status": status,
        "response": String::from_utf8_lossy(excerpt),
        "uri": inner.target.uri,
        "content_type": inner.encoder.borrow().content_type(),
        "content_encoding": inner.encoder.borrow().content_encoding(),
    });
    let reason = format!(
        "HTTP {status}: {}",
        String::from_utf8_lossy(&excerpt[..excerpt.len().min(120)])
    );
    let letter = Letter {
        body: &body[meta.room..],
        records: meta.records,
        key: std::str::from_utf8(&meta.key[..meta.key_len]).unwrap_or(""),
        reason: &reason,
        note,
    };
    inner.dead.put(&inner.shard, letter).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::index;
    use crate::record::{meta, Batch};

    #[test]
    fn a_batch_splits_by_its_rendered_destination_in_first_seen_order() {
        let mut headers = std::collections::BTreeMap::new();
        headers.insert("X-Device".to_string(), "{tag.device}".to_string());
        headers.insert("X-Fixed".to_string(), "{{literal}}".to_string());
        let t = config::plan(
            "t",
            &config::Config {
                uri: Some("http://127.0.0.1:9/i/{tag.device}?q=1".into()),
                headers: Some(headers),
                ..Default::default()
            },
        )
        .unwrap();
        let mut b = Batch::default();
        for l in [
            &b"m,device=a v=1"[..],
            b"m,device=b/c v=1",
            b"m,device=a v=2",
            b"m,device=x\ry v=1",
            b"m v=1",
        ] {
            let mut m = Vec::new();
            let p = index::parse(crate::config::Decoding::Influx, l, 0, None).unwrap();
            meta::put_with(&mut m, meta::FIELDS, |o| p.write(l.len(), o));
            b.push(0, 0, 0, l, &m);
        }
        let mut split = Split::default();
        // A line break in a header value: that record is dropped.
        assert_eq!(split.group(BatchView::Native(&b), &t), 1);
        assert_eq!(split.of, vec![0, 1, 0, u16::MAX, 2]);
        let dest = |g: usize| {
            let (s, p, e) = split.dests[g];
            let (path, headers) = split.keys[s..e].split_at(p);
            (
                String::from_utf8(path.to_vec()).unwrap(),
                String::from_utf8(headers.to_vec()).unwrap(),
            )
        };
        // A value cannot add a path segment or a query: percent-encoded.
        assert_eq!(dest(1), ("/i/b%2Fc?q=1".into(), "\r\nX-Device: b/c".into()));
        assert_eq!(dest(2), ("/i/?q=1".into(), "\r\nX-Device: ".into()));

        let enc = Encoder::new(t.encoding, t.compression, vec![]);
        let head = RequestHead::new(&t, &enc);
        let (s, p, e) = split.dests[1];
        let (path, hdrs) = split.keys[s..e].split_at(p);
        let room = head.room(path.len() + hdrs.len());
        let mut buf = vec![0u8; room];
        buf.extend_from_slice(b"body");
        let start = head.write(&mut buf, room, None, Some((path, hdrs)));
        let text = String::from_utf8(buf[start..].to_vec()).unwrap();
        assert!(
            text.starts_with("POST /i/b%2Fc?q=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nX-Fixed: {literal}\r\n"), "{text}");
        assert!(
            text.ends_with("\r\nX-Device: b/c\r\nContent-Length: 4\r\n\r\nbody"),
            "{text}"
        );
    }
}
