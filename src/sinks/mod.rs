//! Sinks: where batches leave the collector.
//!
//! Each sink has one [`SinkQueue`] per shard: the batch being filled
//! ([`BatchBuilder`]) and a bounded queue of sealed batches. Sources and the
//! shard's inbound rings append records; the sink's sender task takes sealed
//! batches and writes them; a linger task seals a batch that has waited
//! `batch.linger_ms`. When the queue is full, appends are refused and the
//! caller waits on [`SinkQueue::space`] (TCP) or counts a drop (UDP): memory
//! stays bounded by `queue_batches` batches per sink and shard.
//!
//! An [`Output`] ([`tcp`], [`file`], blackhole) keeps a batch until it is
//! written, retrying with [`util::Backoff`]. With a memory buffer a sent
//! batch goes back to the shard's pool; with a disk buffer
//! ([`crate::wal::driver`]) batches pass through the write-ahead log first
//! and the output sends them from there.

pub mod file;
pub mod http;
pub mod tcp;
pub mod util;

use crate::config::{SinkPlan, SinkTarget};
use crate::metrics::SinkCounters;
use crate::pipeline::SinkCtx;
use crate::record::{Batch, BatchBuilder, BatchPool, BatchView, FrameBuf, Payload, HEADROOM};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;

/// One sink's batches on one shard.
pub struct SinkQueue {
    pub sink: usize,
    state: RefCell<QueueState>,
    /// Signalled when a batch is sealed or the queue closes (the sender waits).
    work: Notify,
    /// Signalled when a sealed batch leaves the queue (sources wait).
    pub space: Notify,
    /// Signalled when a record opens a batch (the linger task waits).
    opened: Notify,
    capacity: usize,
    /// Sealed batches past which sources that can wait are held back
    /// (`capacity` less the headroom kept for those that cannot).
    wait_capacity: usize,
    counters: Arc<crate::metrics::ShardMetrics>,
    /// A memory buffer with `when_full = "drop_newest"`: a record that finds
    /// the queue full is dropped and counted instead of waiting.
    pub drops_when_full: bool,
    /// A disk buffer: payloads are checksummed as they fill, while the
    /// records just appended are still in the cache (the log frames them).
    checksum: bool,
}

struct QueueState {
    builder: BatchBuilder,
    sealed: VecDeque<Batch>,
    closed: bool,
}

impl SinkQueue {
    pub fn new(
        plan: &SinkPlan,
        sink: usize,
        counters: Arc<crate::metrics::ShardMetrics>,
    ) -> SinkQueue {
        SinkQueue {
            sink,
            state: RefCell::new(QueueState {
                builder: BatchBuilder::new(plan.batch),
                sealed: VecDeque::with_capacity(plan.queue_batches),
                closed: false,
            }),
            work: Notify::new(),
            space: Notify::new(),
            opened: Notify::new(),
            capacity: plan.queue_batches,
            wait_capacity: plan.wait_batches,
            counters,
            drops_when_full: plan.buffer.kind == crate::config::BufferKind::Memory
                && plan.buffer.when_full == crate::config::WhenFull::DropNewest,
            checksum: plan.buffer.kind == crate::config::BufferKind::Disk,
        }
    }

    fn counters(&self) -> &SinkCounters {
        &self.counters.sinks[self.sink]
    }

    /// Whether a record of `len` bytes can be appended now. A source that
    /// can wait (`can_wait`: tcp) is held back once `wait_capacity` batches
    /// are sealed, even with room in the open batch, so that what it adds
    /// per batch sent is one batch at most and the rest of the queue stays
    /// headroom for sources that cannot wait (udp), which may fill it all.
    #[inline]
    pub fn has_room(&self, len: usize, can_wait: bool) -> bool {
        let st = self.state.borrow();
        if can_wait {
            st.sealed.len() < self.wait_capacity
        } else {
            st.builder.fits(len) || st.sealed.len() < self.capacity
        }
    }

    /// Appends a record; the caller checked [`has_room`](Self::has_room).
    #[inline]
    pub fn append(
        &self,
        pool: &mut BatchPool,
        ts_ns: u64,
        key_hash: u32,
        source: u16,
        record: &[u8],
    ) {
        let mut st = self.state.borrow_mut();
        if !st.builder.fits(record.len()) {
            self.seal(&mut st);
        }
        if st.builder.push(pool, ts_ns, key_hash, source, record) {
            self.opened.notify_one();
        }
        if self.checksum {
            st.builder.checksum_ahead();
        }
        if st.builder.is_full() && st.sealed.len() < self.capacity {
            self.seal(&mut st);
        }
    }

    fn seal(&self, st: &mut QueueState) {
        debug_assert!(st.sealed.len() < self.capacity || st.closed);
        if let Some(b) = st.builder.seal() {
            st.sealed.push_back(b);
            self.counters().queued_batches.set(st.sealed.len() as i64);
            self.work.notify_one();
        }
    }

    /// Seals the open batch if the queue has room; false if it had to wait.
    pub fn seal_open(&self) -> bool {
        let mut st = self.state.borrow_mut();
        if !st.builder.is_open() {
            return true;
        }
        if st.sealed.len() < self.capacity {
            self.seal(&mut st);
            return true;
        }
        false
    }

    /// Closes the queue: the open batch is sealed and the sender drains what
    /// is queued, then stops.
    pub fn close(&self) {
        let mut st = self.state.borrow_mut();
        st.closed = true;
        self.seal(&mut st);
        self.work.notify_one();
    }

    pub fn is_idle(&self) -> bool {
        let st = self.state.borrow();
        st.sealed.is_empty() && !st.builder.is_open()
    }

    /// Seals the open batch if it has lingered and nothing is queued: the
    /// sender asks for work, and that batch is due. (While batches are
    /// queued, a lingered batch goes on filling instead of being sealed
    /// part-full: it could not leave sooner, and the queue's budget, counted
    /// in batches, stays a budget of full batches.)
    fn seal_lingered(&self, st: &mut QueueState) {
        if st.sealed.is_empty()
            && st
                .builder
                .deadline()
                .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            self.seal(st);
        }
    }

    /// The next sealed batch, waiting for one; `None` once closed and empty.
    pub async fn next(&self) -> Option<Batch> {
        loop {
            {
                let mut st = self.state.borrow_mut();
                self.seal_lingered(&mut st);
                if let Some(b) = st.sealed.pop_front() {
                    self.counters().queued_batches.set(st.sealed.len() as i64);
                    drop(st);
                    self.space.notify_waiters();
                    return Some(b);
                }
                if st.closed {
                    return None;
                }
            }
            self.work.notified().await;
        }
    }

    /// The next sealed batch if one is queued, without waiting.
    pub fn try_next(&self) -> Option<Batch> {
        let mut st = self.state.borrow_mut();
        self.seal_lingered(&mut st);
        let b = st.sealed.pop_front()?;
        self.counters().queued_batches.set(st.sealed.len() as i64);
        drop(st);
        self.space.notify_waiters();
        Some(b)
    }

    /// Seals each batch once it has lingered `batch.linger_ms`, unless
    /// sealed batches are waiting (the sender is behind: the open batch goes
    /// on filling and the sender seals it when it asks for the next one).
    /// Runs until the queue closes.
    pub async fn linger(&self) {
        loop {
            let (deadline, queued) = {
                let st = self.state.borrow();
                if st.closed {
                    return;
                }
                (st.builder.deadline(), !st.sealed.is_empty())
            };
            match deadline {
                None => self.opened.notified().await,
                Some(d) if queued && tokio::time::Instant::now() >= d => {
                    let left = self.space.notified();
                    tokio::pin!(left);
                    left.as_mut().enable();
                    if !self.state.borrow().sealed.is_empty() {
                        left.await;
                    }
                }
                Some(d) if tokio::time::Instant::now() >= d => {
                    if !self.seal_open() {
                        // The queue is full: try again a linger later.
                        let linger = self.state.borrow().builder.limits().linger_ms;
                        tokio::time::sleep(std::time::Duration::from_millis(linger.max(1))).await;
                    }
                }
                Some(d) => tokio::time::sleep_until(d).await,
            }
        }
    }
}

/// Where one sink's batches go from one shard.
///
/// Stream outputs (tcp, file, blackhole) take a batch's newline-delimited
/// payload with [`deliver`](Output::deliver) and are done with it when that
/// returns. The http output takes the batch itself ([`http::HttpOutput::submit`])
/// because it encodes it, keeps several requests in flight, and acknowledges
/// each batch (through `ack`) when its request succeeds.
pub enum Output {
    Tcp(tcp::TcpOutput),
    File(file::FileOutput),
    Http(http::HttpOutput),
    Blackhole,
}

impl Output {
    /// `ack` is called with a batch's id once an http request delivered it
    /// (disk buffers); stream outputs are acknowledged by their caller.
    pub fn new(shard: &Rc<SinkCtx>, sink: usize, ack: Option<http::Ack>) -> Output {
        match shard.plan.sinks[sink].target.clone() {
            SinkTarget::Tcp { address } => Output::Tcp(tcp::TcpOutput::new(shard, sink, address)),
            SinkTarget::File { path } => Output::File(file::FileOutput::new(shard, sink, path)),
            SinkTarget::Http(t) => Output::Http(http::HttpOutput::new(shard, sink, *t, ack)),
            SinkTarget::Blackhole => Output::Blackhole,
        }
    }

    /// Delivers newline-delimited records, retrying until they are taken;
    /// gives the buffer back (`Ok`). With `give_up`, no attempt starts after
    /// it (`Err`: not delivered); an attempt under way is never cut off.
    pub async fn deliver<B: tokio_uring::buf::BoundedBuf>(
        &mut self,
        shard: &SinkCtx,
        buf: B,
        give_up: Option<tokio::time::Instant>,
    ) -> Result<B, B> {
        match self {
            Output::Tcp(o) => o.deliver(shard, buf, give_up).await,
            Output::File(o) => o.deliver(shard, buf, give_up).await,
            Output::Http(_) => unreachable!("an http output takes batches through submit"),
            Output::Blackhole => Ok(buf),
        }
    }

    pub async fn close(&mut self, shard: &SinkCtx) {
        match self {
            Output::Tcp(o) => o.close(shard),
            Output::File(o) => o.close(shard).await,
            Output::Http(o) => {
                o.close(std::time::Duration::from_millis(
                    shard.plan.shutdown_timeout_ms / 2,
                ))
                .await
            }
            Output::Blackhole => {}
        }
    }
}

/// Sends a memory buffer's batches: each payload is delivered whole, then
/// the batch goes back to the pool.
async fn run_memory(shard: Rc<SinkCtx>, queue: Rc<SinkQueue>) {
    let mut out = Output::new(&shard, queue.sink, None);
    let counters = &shard.metrics.sinks[queue.sink];
    while let Some(mut batch) = queue.next().await {
        if let Output::Http(h) = &mut out {
            // Encoded into the request's own buffer: the batch is free now.
            h.submit(BatchView::Native(&batch), None).await;
            shard.recycle(batch);
            continue;
        }
        let bytes = batch.payload_bytes();
        // The records as they lie in the batch's (aligned) buffer.
        let buf = FrameBuf(std::mem::take(&mut batch.payload).into_buffer());
        let end = HEADROOM + bytes;
        // A memory buffer holds nothing after the process: keep trying until
        // the shutdown timeout ends the process.
        let (Ok(buf) | Err(buf)) = out.deliver(&shard, buf.slice(HEADROOM..end), None).await;
        batch.payload = Payload::from_buffer(buf.into_inner().0);
        counters.records.add(batch.len() as u64);
        counters.bytes.add(bytes as u64);
        counters.batches.add(1);
        shard.recycle(batch);
    }
    out.close(&shard).await;
}

/// Starts the sender of one sink on a shard; a disk buffer starts from what
/// recovery found in its log (`rec`).
pub fn spawn_sender(
    shard: Rc<SinkCtx>,
    queue: Rc<SinkQueue>,
    rec: Option<crate::wal::recovery::Recovery>,
) -> tokio::task::JoinHandle<()> {
    match (shard.plan.sinks[queue.sink].buffer.kind, rec) {
        (crate::config::BufferKind::Disk, Some(rec)) => {
            tokio_uring::spawn(crate::wal::driver::run(shard, queue, rec))
        }
        (crate::config::BufferKind::Disk, None) => {
            unreachable!("a disk buffer is recovered before its shard starts")
        }
        (crate::config::BufferKind::Memory, _) => tokio_uring::spawn(run_memory(shard, queue)),
    }
}
