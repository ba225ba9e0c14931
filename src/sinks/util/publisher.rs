//! The part every message-broker output shares (mqtt, nats): a batch's
//! records encoded as one buffer of messages, written in runs over one
//! connection per shard within a window of unacknowledged messages, each
//! acknowledgement matched back to its message, the batch delivered when
//! all of its messages are, and everything unacknowledged sent again after
//! a reconnect. A [`Protocol`] says how to connect, how to encode a message
//! and how to read what the peer answers; this file owns the rest.
//!
//! [`Deliver::submit`] encodes a batch and queues it, then returns: the
//! batch's own buffers are free again. A writer task owns the connection:
//! it opens it (again, after a backoff with full jitter), writes the queued
//! messages in runs, keeping at most `window` of them unacknowledged, and
//! pings when idle; a reader task per connection takes the answers. A batch
//! is delivered when every one of its messages was acknowledged (or, for a
//! protocol without acknowledgements, written): then it is acknowledged to
//! the disk buffer (out of order where several are in flight) and counted.
//! So nothing is lost while the collector runs (a peer may see a message
//! twice: at least once); with a disk buffer, what was unacknowledged at a
//! crash is replayed from the log at the next start.
//!
//! A message the peer refuses for good (a failure reason in an MQTT 5
//! PUBACK, a JetStream error) is not sent again: once its batch is
//! settled, the batch's refused messages go to the dead-letter directory
//! together, as they were sent, with the peer's reason.
//!
//! Bounds: at most [`QUEUED_BATCHES`] encoded batches per shard (or the
//! window, for a protocol of whole-batch frames; submit
//! waits, and the sink's queue fills behind it: sources are held back); the
//! sequence numbers in flight stay within the protocol's `seq_span`; at most
//! [`QUEUED_BATCHES`] batches of dead letters wait to be written (more are
//! dropped and counted).

use super::dead_letter::{DeadLetters, Letter};
use super::Backoff;
use crate::logging::LogEvery;
use crate::pipeline::{Ack, BatchId, Deliver, SinkCtx};
use crate::record::BatchView;
use crate::tls::Link;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Encoded batches queued per shard before `submit` waits.
pub const QUEUED_BATCHES: usize = 8;
/// A read of answers shorter than this waits [`ANSWER_GATHER_WAIT`] before
/// the next (while the window has room): acknowledgements are small and
/// come a few at a time, and reading each as it came cost the most CPU per
/// message (BENCHMARKS.md, the MQTT bridge).
const ANSWER_GATHER_BELOW_BYTES: usize = 4096;
/// Tokio's timer rounds this up to its 1 ms tick.
const ANSWER_GATHER_WAIT: Duration = Duration::from_micros(500);

/// A connection just opened.
pub struct Opened {
    pub link: Link,
    /// Bytes read past the greeting.
    pub rest: Vec<u8>,
    /// The most unacknowledged messages the peer takes, if it says.
    pub window: Option<u32>,
}

/// What the peer said, read from the front of the reader's buffer.
pub enum Answer {
    /// Message `seq` is acknowledged.
    Acked(u64),
    /// Message `seq` is refused for good, for the peer's reason: not sent
    /// again, a dead letter.
    Refused(u64, String),
    /// Bytes to send back (a PONG).
    Reply(&'static [u8]),
    /// Nothing the core acts on.
    Nothing,
}

/// How one protocol connects, encodes and reads answers (single-threaded:
/// the futures stay on their shard, so no `Send` bound is wanted).
#[allow(async_fn_in_trait)]
pub trait Protocol: Sized + 'static {
    /// What the peer is called in logs ("broker", "server").
    const PEER: &'static str;
    /// The peer's url, for logs.
    fn url(&self) -> &str;
    /// The most unacknowledged messages per connection (configured).
    fn window(&self) -> u32;
    /// Whether messages are acknowledged (QoS 1, JetStream); if not, a
    /// message is delivered once written.
    fn acknowledged(&self) -> bool;
    fn keep_alive(&self) -> Duration;
    /// The sequence numbers in flight stay within this span (MQTT's packet
    /// ids repeat every 65,535).
    fn seq_span(&self) -> u64;
    fn ping(&self) -> &'static [u8];
    /// Sent before the connection is closed on shutdown (may be empty).
    fn goodbye(&self) -> &'static [u8];
    /// Connects and greets the peer; the error says why not.
    async fn open(&self, cx: &SinkCtx, epoch: u64) -> Result<Opened, String>;
    /// Appends message `seq`, record `index` of batch `id`, to `body`;
    /// false when it cannot be sent (it is dropped, counted and logged by
    /// the caller with `why_unsendable`). `scratch` is the caller's, reused.
    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        scratch: &mut Vec<u8>,
        body: &mut Vec<u8>,
        seq: u64,
        id: BatchId,
        index: u32,
        record: &[u8],
        meta: &[u8],
    ) -> bool;
    /// Why `encode` refused a message (for the log line).
    fn why_unsendable(&self) -> &'static str;
    /// Whether a batch goes as one message (the native protocol's frame)
    /// rather than as one message per record: then [`encode_frame`](Self::encode_frame)
    /// is called instead of `encode`, and the peer never refuses a message.
    fn frames(&self) -> bool {
        false
    }
    /// Appends batch `id` as message `seq` to `body` (when `frames`); false
    /// when it cannot be sent.
    fn encode_frame(
        &self,
        _body: &mut Vec<u8>,
        _seq: u64,
        _id: BatchId,
        _batch: &BatchView<'_>,
    ) -> bool {
        unreachable!("only a protocol that sends frames encodes them")
    }
    /// Marks the message at `at` in `body` as sent before (MQTT's DUP).
    fn mark_resend(&self, body: &mut [u8], at: usize);
    /// Reads the answer at the front of `buf`: `Ok(None)` when more bytes
    /// are needed. `oldest` is the sequence number of the oldest message
    /// in flight, `epoch` the connection's. An error ends the connection.
    fn read(
        &self,
        buf: &[u8],
        oldest: Option<u64>,
        epoch: u64,
    ) -> Result<Option<(Answer, usize)>, String>;
}

/// One batch's messages, encoded.
struct Out {
    id: BatchId,
    /// Sequence number of the first message.
    first_seq: u64,
    /// Where each message starts in `body`, and the end.
    offsets: Vec<u32>,
    /// `None` while a write of it is under way.
    body: Option<Vec<u8>>,
    acked: Vec<bool>,
    acked_count: u32,
    /// Messages written on the current connection (a prefix).
    written: u32,
    /// Sent before on an earlier connection.
    resend: bool,
    payload_bytes: u64,
    done: bool,
    /// Messages refused for good, and the first reason given.
    refused: Vec<u32>,
    refused_why: String,
    /// Records the messages carry (one each, or a whole batch in a frame).
    records: u64,
}

/// A batch's refused messages, waiting to be written as a dead letter.
struct DeadJob {
    body: Vec<u8>,
    records: usize,
    key: String,
    why: String,
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
    /// Written on this connection and not yet acknowledged.
    unacked: u32,
    /// The far end answered a message (stored or refused) on this
    /// connection: when it ends, the next one opens at once.
    answered: bool,
    window: u32,
    /// Replies the reader asked for (PONGs), written before the next run.
    replies: Vec<u8>,
    /// Dead letters for the dead-letter task.
    dead: VecDeque<DeadJob>,
}

struct Inner<P: Protocol> {
    cx: Rc<SinkCtx>,
    sink: usize,
    p: P,
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
    /// A dead letter is queued.
    dead_ready: Notify,
}

/// A sink's connection to its peer on one shard.
pub struct Publisher<P: Protocol> {
    inner: Rc<Inner<P>>,
    writer: Option<tokio::task::JoinHandle<()>>,
    dead: Rc<DeadLetters>,
    /// Reused by the protocol's encoder.
    scratch: Vec<u8>,
}

impl<P: Protocol> Publisher<P> {
    pub fn new(cx: &Rc<SinkCtx>, sink: usize, p: P, ack: Option<Ack>) -> Publisher<P> {
        let window = p.window();
        let inner = Rc::new(Inner {
            cx: cx.clone(),
            sink,
            p,
            ack,
            st: RefCell::new(State {
                batches: VecDeque::new(),
                next_seq: 0,
                spare: Vec::new(),
                conn: None,
                epoch: 0,
                unacked: 0,
                answered: false,
                window,
                replies: Vec::new(),
                dead: VecDeque::new(),
            }),
            wake: Notify::new(),
            progress: Notify::new(),
            closing: Cell::new(false),
            closed: Notify::new(),
            log: RefCell::new(LogEvery::ten_seconds()),
            dead_ready: Notify::new(),
        });
        let writer = crate::io::spawn(writer(inner.clone()));
        let dead = Rc::new(DeadLetters::new(cx, sink));
        crate::io::spawn(dead_letters(inner.clone(), dead.clone()));
        Publisher {
            inner,
            writer: Some(writer),
            dead,
            scratch: Vec::new(),
        }
    }
}

impl<P: Protocol> Inner<P> {
    fn name(&self) -> &str {
        &self.cx.plan.sinks[self.sink].name
    }

    fn counters(&self) -> &crate::metrics::SinkCounters {
        &self.cx.metrics.sinks[self.sink]
    }

    /// Marks message `seq` acknowledged (or refused for good, with the
    /// peer's reason).
    fn settle(&self, st: &mut State, seq: u64, refused: Option<String>) {
        let Some(i) = st
            .batches
            .iter()
            .position(|o| seq >= o.first_seq && seq < o.first_seq + u64::from(o.count()))
        else {
            return; // a second answer to the same message
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
        if let Some(why) = refused {
            o.refused.push(k as u32);
            if o.refused_why.is_empty() {
                o.refused_why = why;
            }
        }
        if o.acked_count == o.count() {
            o.done = true;
            let c = self.counters();
            c.records.add(o.records - o.refused.len() as u64);
            c.bytes.add(o.payload_bytes);
            c.batches.add(1);
            if let Some(ack) = &self.ack {
                ack(o.id);
            }
            self.retire_done(st);
            self.progress.notify_waiters();
        }
        self.counters().in_flight.set(i64::from(st.unacked));
        self.wake.notify_one();
    }

    /// Batches leave in order, so the span of sequence numbers in flight
    /// starts at the oldest one still open. A batch's refused messages are
    /// copied out for the dead-letter task as it leaves.
    fn retire_done(&self, st: &mut State) {
        while st
            .batches
            .front()
            .is_some_and(|o| o.done && o.body.is_some())
        {
            let mut o = st.batches.pop_front().expect("checked");
            if !o.refused.is_empty() {
                self.queue_dead_letter(st, &mut o);
            }
            st.spare.push(o);
        }
    }

    fn queue_dead_letter(&self, st: &mut State, o: &mut Out) {
        let records = o.refused.len();
        if st.dead.len() >= QUEUED_BATCHES {
            self.counters().buffer_dropped.add(records as u64);
            if let Some(held) = self.log.borrow_mut().ready() {
                tracing::error!(sink = self.name(), url = self.p.url(), records, suppressed = held,
                    "messages refused for good could not wait for the dead-letter directory; dropped (counted)");
            }
        } else {
            let b = o.body.as_deref().unwrap_or(&[]);
            let mut body = Vec::new();
            for &k in &o.refused {
                let (a, e) = (o.offsets[k as usize], o.offsets[k as usize + 1]);
                body.extend_from_slice(&b[a as usize..e as usize]);
            }
            st.dead.push_back(DeadJob {
                body,
                records,
                key: format!("{}-{}", o.id.segment, o.id.offset),
                why: std::mem::take(&mut o.refused_why),
            });
            self.dead_ready.notify_one();
        }
        o.refused.clear();
        o.refused_why.clear();
    }
}

/// Writes dead letters as the reader queues them.
async fn dead_letters<P: Protocol>(inner: Rc<Inner<P>>, dead: Rc<DeadLetters>) {
    loop {
        let job = inner.st.borrow_mut().dead.pop_front();
        match job {
            Some(j) => put_dead(&inner, &dead, j).await,
            None => {
                if inner.closing.get() {
                    return;
                }
                inner.dead_ready.notified().await;
            }
        }
    }
}

async fn put_dead<P: Protocol>(inner: &Inner<P>, dead: &DeadLetters, j: DeadJob) {
    let note = serde_json::json!({
        "sink": inner.name(),
        "url": inner.p.url(),
        "reason": j.why,
        "body": format!("the refused messages as sent to the {}, back to back", P::PEER),
    });
    dead.put(
        &inner.cx,
        Letter {
            body: &j.body,
            records: j.records,
            key: &j.key,
            reason: &j.why,
            note,
        },
    )
    .await;
}

impl<P: Protocol> Deliver for Publisher<P> {
    fn takes_batches(&self) -> bool {
        true
    }

    async fn deliver<B: crate::io::Buf>(
        &mut self,
        _cx: &SinkCtx,
        _buf: B,
        _give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        unreachable!("a publisher takes batches through submit")
    }

    /// Encodes `batch` into messages and queues them; waits first while
    /// [`QUEUED_BATCHES`] are queued or the sequence numbers in flight
    /// would span too far.
    async fn submit(&mut self, batch: BatchView<'_>, id: BatchId) {
        let inner = &self.inner;
        let n = batch.len() as u64;
        let span_max = inner.p.seq_span();
        loop {
            let wait = inner.progress.notified();
            {
                let st = inner.st.borrow();
                let span = st.batches.front().map_or(0, |o| st.next_seq - o.first_seq);
                // A protocol of frames keeps a window of whole batches.
                let queued = if inner.p.frames() {
                    QUEUED_BATCHES.max(inner.p.window() as usize)
                } else {
                    QUEUED_BATCHES
                };
                if st.batches.len() < queued && (span == 0 || span + n <= span_max) {
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
            refused: Vec::new(),
            refused_why: String::new(),
            records: 0,
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
        let mut seq = o.first_seq;
        let mut unsendable = 0u64;
        let mut index = 0u32;
        let scratch = &mut self.scratch;
        if inner.p.frames() {
            if inner.p.encode_frame(body, seq, id, &batch) {
                o.offsets.push(0);
                seq += 1;
            } else {
                body.clear();
                unsendable = n;
            }
        } else {
            batch.for_each(|_, _, record, meta| {
                let at = body.len();
                if inner.p.encode(scratch, body, seq, id, index, record, meta) {
                    o.offsets.push(at as u32);
                    seq += 1;
                } else {
                    body.truncate(at);
                    unsendable += 1;
                }
                index += 1;
            });
        }
        o.records = n - unsendable;
        o.offsets.push(body.len() as u32);
        if unsendable > 0 {
            inner.counters().buffer_dropped.add(unsendable);
            if let Some(held) = inner.log.borrow_mut().ready() {
                tracing::warn!(
                    sink = inner.name(),
                    url = inner.p.url(),
                    records = unsendable,
                    suppressed = held,
                    "{}: dropped (counted)",
                    inner.p.why_unsendable()
                );
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
                    .map(|o| {
                        if inner.p.frames() {
                            o.records // a frame is one message carrying them all
                        } else {
                            u64::from(o.count() - o.acked_count)
                        }
                    })
                    .sum();
                tracing::warn!(sink = inner.name(), shard = cx.id, url = inner.p.url(), records = open,
                    "records not acknowledged by the {} at shutdown are abandoned (a disk buffer sends them again at the next start)", P::PEER);
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
        // What the dead-letter task had not written yet.
        inner.dead_ready.notify_one();
        loop {
            let job = inner.st.borrow_mut().dead.pop_front();
            let Some(j) = job else { break };
            put_dead(inner, &self.dead, j).await;
        }
    }
}

/// Reads one connection's answers; ends when the connection does (or a
/// newer one replaced it).
async fn reader<P: Protocol>(inner: Rc<Inner<P>>, stream: Rc<Link>, epoch: u64, mut buf: Vec<u8>) {
    let mut have = buf.len();
    buf.resize(64 * 1024, 0);
    let why = 'conn: loop {
        let mut start = 0;
        loop {
            let oldest = inner.st.borrow().batches.front().map(|o| o.first_seq);
            match inner.p.read(&buf[start..have], oldest, epoch) {
                Ok(Some((answer, used))) => {
                    start += used;
                    let mut st = inner.st.borrow_mut();
                    match answer {
                        Answer::Acked(seq) => {
                            st.answered = true;
                            inner.settle(&mut st, seq, None)
                        }
                        Answer::Refused(seq, why) => {
                            st.answered = true;
                            inner.settle(&mut st, seq, Some(why))
                        }
                        Answer::Reply(bytes) => {
                            st.replies.extend_from_slice(bytes);
                            inner.wake.notify_one();
                        }
                        Answer::Nothing => {}
                    }
                }
                Ok(None) => break,
                Err(e) => break 'conn e,
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
            Ok(0) => break format!("the {} closed the connection", P::PEER),
            Ok(n) => {
                have += n;
                // A few answers: let more gather before the next read while
                // the writer still has half its window to use.
                let room = {
                    let st = inner.st.borrow();
                    st.unacked.saturating_mul(2) <= st.window
                };
                if n < ANSWER_GATHER_BELOW_BYTES && room {
                    tokio::time::sleep(ANSWER_GATHER_WAIT).await;
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
                tracing::warn!(
                    sink = inner.name(),
                    shard = inner.cx.id,
                    url = inner.p.url(),
                    suppressed = held,
                    "{why}; reconnecting (unacknowledged messages are sent again)"
                );
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

/// Waits the backoff's next delay before trying to connect again (cut
/// short when the output closes), counted as a retry.
async fn retry_wait<P: Protocol>(inner: &Inner<P>, backoff: &mut Backoff) {
    let delay = backoff.next_delay();
    let c = inner.counters();
    c.retry_backoff_ms.set(delay.as_millis() as i64);
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = inner.closed.notified() => {}
    }
    c.retries.add(1);
}

/// Owns the connection: opens it (again), writes queued messages within the
/// window, pings when idle. Runs until the output closes.
async fn writer<P: Protocol>(inner: Rc<Inner<P>>) {
    let shard = inner.cx.id;
    let mut backoff = Backoff::new(inner.cx.plan.sinks[inner.sink].retry);
    let mut down_since: Option<Instant> = None;
    let keep_alive = inner.p.keep_alive();
    let acknowledged = inner.p.acknowledged();
    let mut last_write = Instant::now();
    let mut replies = Vec::new();
    // A connection of ours ended: the next opens after a backoff unless
    // the far end answered something on it (a server that takes the login
    // and then ends every connection, or answers only with an error that
    // ends it, is not hammered). A backoff of its own, from the initial
    // delay: not the one failed connects grew (after a server restart
    // that is at its ceiling, and the nats sink's wait for JetStream
    // would run out in one such sleep).
    let mut was_open = false;
    let mut unanswered = Backoff::new(inner.cx.plan.sinks[inner.sink].retry);
    loop {
        if inner.closing.get() {
            break;
        }
        let conn = inner.st.borrow().conn.clone();
        let Some(conn) = conn else {
            if std::mem::take(&mut was_open) && acknowledged {
                if inner.st.borrow().answered {
                    unanswered.reset();
                } else {
                    retry_wait(&inner, &mut unanswered).await;
                    continue;
                }
            }
            let pending = inner.st.borrow().batches.iter().any(|o| !o.done);
            if !pending {
                // Connect when there is something to send.
                let wait = inner.wake.notified();
                if !inner.st.borrow().batches.iter().any(|o| !o.done) && !inner.closing.get() {
                    wait.await;
                }
                continue;
            }
            let epoch = inner.st.borrow().epoch + 1;
            match inner.p.open(&inner.cx, epoch).await {
                Ok(opened) => {
                    let stream = Rc::new(opened.link);
                    {
                        let mut st = inner.st.borrow_mut();
                        st.epoch = epoch;
                        st.conn = Some(stream.clone());
                        st.unacked = 0;
                        st.answered = false;
                        st.replies.clear();
                        st.window = inner
                            .p
                            .window()
                            .min(opened.window.unwrap_or(u32::MAX).max(1));
                        for o in st.batches.iter_mut() {
                            o.resend |= o.written > 0;
                            o.written = 0;
                        }
                    }
                    let c = inner.counters();
                    c.connected.set(1);
                    c.retry_backoff_ms.set(0);
                    backoff.reset();
                    was_open = true;
                    if let Some(t) = down_since.take() {
                        tracing::info!(
                            sink = inner.name(),
                            shard,
                            url = inner.p.url(),
                            down_ms = t.elapsed().as_millis() as u64,
                            "connected to the {} again",
                            P::PEER
                        );
                    }
                    last_write = Instant::now();
                    crate::io::spawn(reader(inner.clone(), stream, epoch, opened.rest));
                }
                Err(why) => {
                    let c = inner.counters();
                    c.send_errors.add(1);
                    down_since.get_or_insert_with(Instant::now);
                    if let Some(held) = inner.log.borrow_mut().ready() {
                        tracing::warn!(
                            sink = inner.name(),
                            shard,
                            url = inner.p.url(),
                            suppressed = held,
                            "{why}; messages wait in the sink's buffer"
                        );
                    }
                    retry_wait(&inner, &mut backoff).await;
                }
            }
            continue;
        };
        // Replies first (a PONG the peer waits for).
        std::mem::swap(&mut replies, &mut inner.st.borrow_mut().replies);
        if !replies.is_empty() {
            let n = replies.len();
            let (res, b) = conn.write(std::mem::take(&mut replies), 0..n).await;
            replies = b;
            replies.clear();
            if res.is_err() {
                continue; // the reader sees the connection end
            }
            last_write = Instant::now();
        }
        // The rate limit: wait for the budget before taking a run of
        // messages, charge what was written after.
        inner.cx.rate_wait(inner.sink).await;
        let run = {
            let mut st = inner.st.borrow_mut();
            match next_run(&st) {
                Some((i, k, n)) => {
                    let o = &mut st.batches[i];
                    let mut body = o.body.take().expect("checked in next_run");
                    if o.resend {
                        for m in k..k + n {
                            inner
                                .p
                                .mark_resend(&mut body, o.offsets[m as usize] as usize);
                        }
                    }
                    let (a, b) = (o.offsets[k as usize], o.offsets[(k + n) as usize]);
                    o.written = k + n;
                    let first_seq = o.first_seq;
                    if acknowledged {
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
            let quiet = {
                let st = inner.st.borrow();
                next_run(&st).is_none() && st.conn.is_some() && st.replies.is_empty()
            };
            if quiet
                && tokio::time::timeout(idle, wait).await.is_err()
                && last_write.elapsed() >= idle
            {
                let ping = inner.p.ping();
                let (res, _) = conn.write(ping.to_vec(), 0..ping.len()).await;
                if res.is_ok() {
                    last_write = Instant::now();
                }
            }
            continue;
        };
        let (res, body) = conn.write(body, a..b).await;
        inner.cx.rate_charge(inner.sink, b - a);
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
                if !acknowledged {
                    for m in k..k + n {
                        inner.settle(&mut st, first_seq + u64::from(m), None);
                    }
                } else {
                    // A batch whose acks all came during the write.
                    let o = &st.batches[i];
                    if o.acked_count == o.count() && o.done {
                        inner.retire_done(&mut st);
                    }
                }
            }
            Err(e) => {
                inner.counters().send_errors.add(1);
                if let Some(held) = inner.log.borrow_mut().ready() {
                    tracing::warn!(sink = inner.name(), shard, url = inner.p.url(), error = %e, suppressed = held,
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
        let bye = inner.p.goodbye();
        if !bye.is_empty() {
            let (_, _) = conn.write(bye.to_vec(), 0..bye.len()).await;
        }
        conn.shutdown();
    }
    inner.counters().connected.set(0);
}
