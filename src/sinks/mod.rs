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
//! Senders ([`tcp`], [`file`], [`blackhole`]) keep a batch until it is
//! written, retrying with [`util::Backoff`]; a sent batch goes back to the
//! shard's pool.

pub mod blackhole;
pub mod file;
pub mod tcp;
pub mod util;

use crate::config::{SinkPlan, SinkTarget};
use crate::metrics::SinkCounters;
use crate::record::{Batch, BatchBuilder, BatchPool};
use crate::runtime::shard::Shard;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use tokio::sync::Notify;

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
    counters: Arc<crate::metrics::ShardMetrics>,
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
            counters,
        }
    }

    fn counters(&self) -> &SinkCounters {
        &self.counters.sinks[self.sink]
    }

    /// Whether a record of `len` bytes can be appended now.
    #[inline]
    pub fn has_room(&self, len: usize) -> bool {
        let st = self.state.borrow();
        st.builder.fits(len) || st.sealed.len() < self.capacity
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

    /// The next sealed batch, waiting for one; `None` once closed and empty.
    pub async fn next(&self) -> Option<Batch> {
        loop {
            {
                let mut st = self.state.borrow_mut();
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

    /// Seals each batch once it has lingered `batch.linger_ms`. Runs until
    /// the queue closes.
    pub async fn linger(&self) {
        loop {
            let deadline = {
                let st = self.state.borrow();
                if st.closed {
                    return;
                }
                st.builder.deadline()
            };
            match deadline {
                None => self.opened.notified().await,
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

/// Starts the sender of one sink on a shard.
pub fn spawn_sender(shard: Rc<Shard>, queue: Rc<SinkQueue>) -> tokio::task::JoinHandle<()> {
    let plan = &shard.plan.sinks[queue.sink];
    match plan.target.clone() {
        SinkTarget::Tcp { address } => tokio_uring::spawn(tcp::run(shard, queue, address)),
        SinkTarget::File { path } => tokio_uring::spawn(file::run(shard, queue, path)),
        SinkTarget::Blackhole => tokio_uring::spawn(blackhole::run(shard, queue)),
    }
}
