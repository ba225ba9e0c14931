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

/// What a request task needs to know of its batch.
struct Meta {
    id: BatchId,
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
    room: usize,
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
}

impl Deliver for HttpOutput {
    fn takes_batches(&self) -> bool {
        true
    }

    async fn deliver<B: tokio_uring::buf::BoundedBuf>(
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
        let room = head.room();
        shard.metrics.sinks[sink]
            .concurrency_limit
            .set(i64::from(limit.permits()));
        HttpOutput {
            inner: Rc::new(Inner {
                shard: shard.clone(),
                sink,
                room,
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
    async fn start_request(&mut self, batch: BatchView<'_>, id: BatchId) {
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
        body.resize(inner.room, 0);
        let done = inner.encoder.borrow_mut().encode(batch, &mut body);
        if done.dropped > 0 {
            counters.encode_dropped.add(done.dropped as u64);
            if let Some(held) = inner.log.borrow_mut().ready() {
                tracing::warn!(sink = %inner.name(), shard = inner.shard.id, records = done.dropped, suppressed = held,
                    "records the encoding cannot express were dropped (counted in updraft_sink_encode_dropped_records_total)");
            }
        }
        if done.records == 0 {
            inner.bodies.borrow_mut().push(body);
            if let Some(ack) = &inner.ack {
                ack(id);
            }
            return;
        }
        let mut meta = Meta {
            id,
            records: done.records,
            payload_bytes: batch.payload().len(),
            key: [0; KEY_BYTES_MAX],
            key_len: 0,
        };
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
            meta.key_len = KEY_BYTES_MAX - w.len();
        }
        let key = (meta.key_len > 0).then(|| &meta.key[..meta.key_len]);
        let start = inner.head.write(&mut body, inner.room, key);
        let in_flight = inner.in_flight.get();
        if let Limit::Adaptive(a) = &mut *inner.limit.borrow_mut() {
            a.on_start(in_flight);
        }
        inner.in_flight.set(in_flight + 1);
        counters.in_flight.set(i64::from(in_flight + 1));
        tokio_uring::spawn(request(inner.clone(), body, start, meta));
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
                counters.body_bytes.add((body.len() - inner.room) as u64);
                counters.batches.add(1);
                counters.retry_backoff_ms.set(0);
                if let Some(t) = inner.down_since.take() {
                    tracing::info!(sink = %inner.name(), shard = inner.shard.id, peer = %inner.target.address,
                        down_ms = t.elapsed().as_millis() as u64, "the endpoint takes batches again");
                }
                if let Some(ack) = &inner.ack {
                    let id = meta.id;
                    ack(id);
                }
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
                if let Some(ack) = &inner.ack {
                    let id = meta.id;
                    ack(id);
                }
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
        body: &body[inner.room..],
        records: meta.records,
        key: std::str::from_utf8(&meta.key[..meta.key_len]).unwrap_or(""),
        reason: &reason,
        note,
    };
    inner.dead.put(&inner.shard, letter).await;
}
